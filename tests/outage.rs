//! Redis and upstream outages (SPEC §6, §7 `/readyz`, §8 metrics) against
//! the real binary: tiergate → [`FaultProxy`] → `redis-server`, with a
//! bounded load loop running through the outage.
//!
//! What every outage test checks, whatever the fault:
//! - under `on_error: local|allow` no request gets a 5xx or a transport
//!   error, and none waits longer than `backend.redis.timeout` + a generous
//!   margin ([`BOUND`]);
//! - `/readyz`, `tiergate_backend_degraded` and
//!   `tiergate_backend_errors_total` show the outage;
//! - after the fault is removed, `/readyz` is `ready` within 2 s without any
//!   proxy traffic (the background probe), and decisions are Redis's again.
//!
//! Rates are `1/m`, so every count is exact.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Fault, FaultProxy, RedisServer, Tiergate, Upstream, eventually, fd_count};
use serde_json::Value;

/// `backend.redis.timeout`.
const REDIS_TIMEOUT: Duration = Duration::from_millis(50);
/// No request may take longer than this while Redis is failing.
const BOUND: Duration = Duration::from_millis(50 + 500);
/// SPEC §6: recovery within 2 s of Redis answering again.
const RECOVERY: Duration = Duration::from_secs(2);
/// Upper bound for an outage to show in `/readyz` (probe every 500 ms).
const DETECTION: Duration = Duration::from_secs(2);
/// Tenants of the load loop (tier `bulk`: never throttled).
const LOAD_TENANTS: [&str; 4] = ["load-0", "load-1", "load-2", "load-3"];
/// Log message of the degraded transition.
const DEGRADED_LOG: &str = "limiter backend degraded";
/// Explanation attached to the post-recovery assertions.
const STALE: &str = "(known cause: the probe pings on its own connection \
(App::admin_redis); each worker's Redis connection stays broken while the circuit is \
open and its first call after recovery fails and takes the on_error path)";
/// Log message of the recovered transition.
const RECOVERED_LOG: &str = "limiter backend recovered";

/// Tiers: `free` is 1/m burst 5 (exact counts); `bulk` for the load loop.
fn config(upstream: &str, redis_url: &str, on_error: &str) -> String {
    let tenants: String = LOAD_TENANTS
        .iter()
        .map(|t| format!("  {t}: {{ tier: bulk }}\n"))
        .collect();
    format!(
        r#"server:
  listen: "127.0.0.1:0"
admin:
  listen: "127.0.0.1:0"
upstream:
  url: "{upstream}"
  connect_timeout: 500ms
  timeout: 2s
backend:
  type: redis
  redis:
    url: "{redis_url}"
    timeout: {}ms
  on_error: {on_error}
tiers:
  free: {{ rate: 1/m, burst: 5 }}
  bulk: {{ rate: 10000/s, burst: 100000 }}
default_tier: free
tenants:
{tenants}"#,
        REDIS_TIMEOUT.as_millis()
    )
}

/// One proxied response.
#[derive(Debug, Clone)]
struct Resp {
    status: u16,
    error: Option<String>,
    retry_after: Option<String>,
    limited: bool,
    elapsed: Duration,
}

/// `GET {proxy}/{path}` as `tenant`; transport errors are status 0.
async fn get(http: &reqwest::Client, tg: &Tiergate, tenant: &str, path: &str) -> Resp {
    let started = Instant::now();
    let r = http
        .get(format!("{}{path}", tg.proxy_url()))
        .header("x-tenant-id", tenant)
        .send()
        .await;
    match r {
        Ok(r) => {
            let h = r.headers();
            let text = |n: &str| h.get(n).map(|v| v.to_str().unwrap_or("?").to_string());
            let mut resp = Resp {
                status: r.status().as_u16(),
                error: text("x-tiergate-error"),
                retry_after: text("retry-after"),
                limited: h.contains_key("x-ratelimit-limit") || h.contains_key("ratelimit"),
                elapsed: Duration::ZERO,
            };
            let _ = r.bytes().await;
            resp.elapsed = started.elapsed();
            resp
        }
        Err(e) => Resp {
            status: 0,
            error: Some(format!("transport: {e}")),
            retry_after: None,
            limited: false,
            elapsed: started.elapsed(),
        },
    }
}

/// `n` concurrent requests as `tenant`.
async fn burst(http: &reqwest::Client, tg: &Tiergate, tenant: &str, n: usize) -> Vec<Resp> {
    let reqs = (0..n).map(|_| get(http, tg, tenant, "/burst"));
    futures_util::future::join_all(reqs).await
}

/// How many of `rs` were admitted (200).
fn admitted(rs: &[Resp]) -> usize {
    rs.iter().filter(|r| r.status == 200).count()
}

/// `/readyz`: status code and body.
async fn readyz(http: &reqwest::Client, tg: &Tiergate) -> (u16, Value) {
    let r = http
        .get(format!("{}/readyz", tg.admin_url()))
        .send()
        .await
        .expect("readyz");
    let code = r.status().as_u16();
    (code, r.json().await.expect("readyz json"))
}

/// `/metrics` text.
async fn metrics(http: &reqwest::Client, tg: &Tiergate) -> String {
    http.get(format!("{}/metrics", tg.admin_url()))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text")
}

/// Sum of the samples of `name` whose labels contain every `labels` pair.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until `/readyz` reports `degraded == want` (and the matching
/// status); panics with the logs otherwise.
async fn wait_degraded(http: &reqwest::Client, tg: &Tiergate, want: bool, within: Duration) {
    let ok = eventually(within, || async {
        let (_, body) = readyz(http, tg).await;
        body["degraded"] == Value::Bool(want)
    })
    .await;
    let (code, body) = readyz(http, tg).await;
    assert!(
        ok,
        "/readyz did not show degraded={want} within {within:?}: {code} {body}\n{}",
        tg.dump()
    );
}

/// Log lines containing `needle`.
fn log_count(tg: &Tiergate, needle: &str) -> usize {
    tg.logs().iter().filter(|l| l.contains(needle)).count()
}

/// A bounded load loop: a few tasks sending requests as the `bulk` tenants
/// until stopped (or 15 s, as a safety net).
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Resp>>>,
}

impl Load {
    fn start(tg: &Tiergate) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let url = tg.proxy_url();
        let tasks = LOAD_TENANTS
            .iter()
            .map(|tenant| {
                let stop = stop.clone();
                let url = url.clone();
                let tenant = tenant.to_string();
                tokio::spawn(async move {
                    let http = common::client_5s();
                    let started = Instant::now();
                    let mut out = Vec::new();
                    while !stop.load(Ordering::Relaxed)
                        && started.elapsed() < Duration::from_secs(15)
                    {
                        let t0 = Instant::now();
                        let r = http
                            .get(format!("{url}/load"))
                            .header("x-tenant-id", &tenant)
                            .send()
                            .await;
                        let resp = match r {
                            Ok(r) => {
                                let status = r.status().as_u16();
                                let error = r
                                    .headers()
                                    .get("x-tiergate-error")
                                    .map(|v| v.to_str().unwrap_or("?").to_string());
                                let limited = r.headers().contains_key("x-ratelimit-limit");
                                let _ = r.bytes().await;
                                Resp {
                                    status,
                                    error,
                                    retry_after: None,
                                    limited,
                                    elapsed: t0.elapsed(),
                                }
                            }
                            Err(e) => Resp {
                                status: 0,
                                error: Some(format!("transport: {e}")),
                                retry_after: None,
                                limited: false,
                                elapsed: t0.elapsed(),
                            },
                        };
                        out.push(resp);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    out
                })
            })
            .collect();
        Load { stop, tasks }
    }

    async fn finish(self) -> Vec<Resp> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.expect("load task"));
        }
        all
    }
}

/// No 5xx, no transport error, nothing slower than [`BOUND`].
fn assert_clean(what: &str, samples: &[Resp]) {
    assert!(
        samples.len() >= 20,
        "{what}: too few load samples ({})",
        samples.len()
    );
    let bad: Vec<&Resp> = samples
        .iter()
        .filter(|r| r.status == 0 || r.status >= 500)
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} requests failed (status, x-tiergate-error): {:?}",
        bad.len(),
        samples.len(),
        bad.iter()
            .take(10)
            .map(|r| (r.status, r.error.clone()))
            .collect::<Vec<_>>()
    );
    let slowest = samples.iter().map(|r| r.elapsed).max().unwrap_or_default();
    assert!(
        slowest <= BOUND,
        "{what}: a request took {slowest:?} (> redis timeout {REDIS_TIMEOUT:?} + margin = {BOUND:?})"
    );
}

/// Everything an outage test needs.
struct Rig {
    redis: RedisServer,
    fault: FaultProxy,
    _upstream: Upstream,
    tg: Tiergate,
    http: reqwest::Client,
}

impl Rig {
    fn start(on_error: &str) -> Rig {
        Rig::start_in(on_error, Fault::Pass)
    }

    fn start_in(on_error: &str, mode: Fault) -> Rig {
        let redis = RedisServer::start();
        let fault = FaultProxy::start_in(redis.addr(), mode);
        let upstream = Upstream::start();
        let tg = Tiergate::start(&config(&upstream.url(), &fault.redis_url(), on_error));
        Rig {
            redis,
            fault,
            _upstream: upstream,
            tg,
            http: common::client_5s(),
        }
    }

    /// Whether Redis holds any key for `tenant` (i.e. Redis decided).
    fn redis_has(&self, tenant: &str) -> bool {
        !self
            .redis
            .cli(&["KEYS", &format!("*{{{tenant}}}*")])
            .is_empty()
    }
}

/// A fault and how to undo it.
enum Outage {
    Proxy(Fault),
    Stop,
    Kill,
}

/// The whole `on_error: local` cycle for one kind of outage: load through
/// it, exact local decisions, `/readyz`/metrics/logs while down, recovery
/// within 2 s with no traffic, and Redis deciding again afterwards.
async fn local_outage_cycle(outage: Outage) {
    let mut rig = Rig::start("local");
    let (tg, http) = (&rig.tg, &rig.http);
    wait_degraded(http, tg, false, DETECTION).await;

    // Before: Redis decides; `held` spends its whole Redis bucket.
    let before = burst(http, tg, "held", 7).await;
    assert_eq!(admitted(&before), 5, "{before:?}");
    assert!(rig.redis_has("held"), "Redis decided before the outage");

    let load = Load::start(tg);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut frozen = None;
    match &outage {
        Outage::Proxy(f) => rig.fault.set(*f),
        Outage::Stop => frozen = Some(rig.redis.freeze()),
        Outage::Kill => tokio::task::block_in_place(|| rig.redis.kill()),
    }
    let (tg, http) = (&rig.tg, &rig.http);
    wait_degraded(http, tg, true, DETECTION).await;

    // While down: served from local buckets, exactly per replica.
    let (code, body) = readyz(http, tg).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "degraded", "{body}");
    let during = burst(http, tg, "fresh", 8).await;
    assert_eq!(
        admitted(&during),
        5,
        "a fresh 1/m burst-5 tenant gets exactly 5 from the local bucket: {during:?}"
    );
    assert!(during.iter().all(|r| r.status == 200 || r.status == 429));
    assert!(
        during.iter().all(|r| r.limited),
        "local decisions carry rate-limit headers"
    );
    let m1 = metrics(http, tg).await;
    assert_eq!(metric(&m1, "tiergate_backend_degraded", &[]), 1.0, "{m1}");
    let errors1 = metric(
        &m1,
        "tiergate_backend_errors_total",
        &[("backend", "redis")],
    );
    assert!(errors1 >= 1.0, "backend errors counted:\n{m1}");
    // The probe keeps failing (every 500 ms): the counter keeps growing.
    let grew = eventually(Duration::from_secs(2), || async {
        let m = metrics(http, tg).await;
        metric(&m, "tiergate_backend_errors_total", &[("backend", "redis")]) > errors1
    })
    .await;
    assert!(
        grew,
        "tiergate_backend_errors_total grows while Redis is down"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    let samples = load.finish().await;
    assert_clean("load through the outage", &samples);

    // Restore, with no proxy traffic at all.
    match outage {
        Outage::Proxy(_) => rig.fault.set(Fault::Pass),
        Outage::Stop => drop(frozen.take()),
        Outage::Kill => tokio::task::block_in_place(|| rig.redis.restart()),
    }
    let (tg, http) = (&rig.tg, &rig.http);
    let restored = Instant::now();
    wait_degraded(http, tg, false, RECOVERY).await;
    let (code, body) = readyz(http, tg).await;
    assert_eq!(
        (code, body["status"].as_str()),
        (200, Some("ready")),
        "{body}"
    );
    let m2 = metrics(http, tg).await;
    assert_eq!(metric(&m2, "tiergate_backend_degraded", &[]), 0.0, "{m2}");
    assert!(restored.elapsed() <= RECOVERY + Duration::from_millis(500));

    // After: Redis decides again.
    let after = burst(http, tg, "held", 7).await;
    assert!(
        after.iter().all(|r| r.status == 200 || r.status == 429),
        "{after:?}"
    );
    if matches!(outage, Outage::Kill) {
        // Restarted empty: full buckets again, and the script is reloaded
        // (NOSCRIPT) transparently.
        assert_eq!(
            admitted(&after),
            5,
            "fresh Redis, full bucket — more than 5 means some requests after \
             recovery were still decided by the local fallback: {after:?}\n{STALE}"
        );
    } else {
        // Redis kept its state: `held` is still spent there, whereas a
        // local bucket would have admitted 5.
        assert_eq!(
            admitted(&after),
            0,
            "Redis still holds `held` spent; any 200 was decided by the local \
             fallback after /readyz said ready: {after:?}\n{STALE}"
        );
    }
    assert!(rig.redis_has("held"));
    let post = get(http, tg, "post-recovery", "/").await;
    assert_eq!(post.status, 200);
    assert!(
        rig.redis_has("post-recovery"),
        "Redis decides after recovery"
    );
    let m3 = metrics(http, tg).await;
    assert_eq!(metric(&m3, "tiergate_backend_degraded", &[]), 0.0);

    // One log line per transition, not per request.
    assert!(
        tg.wait_for_log(RECOVERED_LOG, Duration::from_secs(1))
            .is_some(),
        "{}",
        tg.dump()
    );
    assert_eq!(log_count(tg, DEGRADED_LOG), 1, "{}", tg.dump());
    assert_eq!(log_count(tg, RECOVERED_LOG), 1, "{}", tg.dump());
}

/// Redis unreachable without an answer (packets dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_redis_blackholed() {
    local_outage_cycle(Outage::Proxy(Fault::Blackhole)).await;
}

/// Redis answering, but slower than `backend.redis.timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_redis_latency_above_timeout() {
    local_outage_cycle(Outage::Proxy(Fault::Latency(Duration::from_millis(200)))).await;
}

/// Every connection to Redis reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_redis_connections_reset() {
    local_outage_cycle(Outage::Proxy(Fault::Reset)).await;
}

/// `redis-server` frozen (SIGSTOP), then thawed (SIGCONT).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_redis_sigstop_then_sigcont() {
    local_outage_cycle(Outage::Stop).await;
}

/// `redis-server` SIGKILLed, then restarted empty on the same port.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_redis_sigkill_then_restart_empty() {
    local_outage_cycle(Outage::Kill).await;
}

/// `on_error: allow`: admitted without rate-limit headers while down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn allow_fails_open_without_headers() {
    let rig = Rig::start("allow");
    let (tg, http) = (&rig.tg, &rig.http);
    wait_degraded(http, tg, false, DETECTION).await;
    let load = Load::start(tg);
    tokio::time::sleep(Duration::from_millis(200)).await;
    rig.fault.set(Fault::Blackhole);
    wait_degraded(http, tg, true, DETECTION).await;
    let (code, body) = readyz(http, tg).await;
    assert_eq!(
        (code, body["status"].as_str()),
        (200, Some("degraded")),
        "{body}"
    );

    let during = burst(http, tg, "open", 10).await;
    assert!(
        during.iter().all(|r| r.status == 200 && !r.limited),
        "fail open: all admitted, no rate-limit headers: {during:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let samples = load.finish().await;
    assert_clean("load under on_error: allow", &samples);
    let late: Vec<&Resp> = samples.iter().rev().take(4).collect();
    assert!(
        late.iter().all(|r| !r.limited),
        "no rate-limit headers once degraded: {late:?}"
    );

    rig.fault.set(Fault::Pass);
    wait_degraded(http, tg, false, RECOVERY).await;
    let after = get(http, tg, "open", "/").await;
    assert_eq!(after.status, 200);
    assert!(after.limited, "decided by Redis again, headers back");
    assert!(rig.redis_has("open"));
}

/// `on_error: deny`: 503 `limiter_unavailable` with `Retry-After: 1`, and
/// `/readyz` 503, while down; normal service afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deny_fails_closed_then_recovers() {
    let rig = Rig::start("deny");
    let (tg, http) = (&rig.tg, &rig.http);
    wait_degraded(http, tg, false, DETECTION).await;
    assert_eq!(get(http, tg, "closed", "/").await.status, 200);

    rig.fault.set(Fault::Reset);
    wait_degraded(http, tg, true, DETECTION).await;
    let (code, body) = readyz(http, tg).await;
    assert_eq!(code, 503, "{body}");
    let during = burst(http, tg, "closed", 5).await;
    for r in &during {
        assert_eq!(r.status, 503, "{during:?}");
        assert_eq!(r.error.as_deref(), Some("limiter_unavailable"), "{r:?}");
        assert_eq!(r.retry_after.as_deref(), Some("1"), "{r:?}");
        assert!(r.elapsed <= BOUND, "{r:?}");
    }

    rig.fault.set(Fault::Pass);
    wait_degraded(http, tg, false, RECOVERY).await;
    let (code, body) = readyz(http, tg).await;
    assert_eq!(
        (code, body["status"].as_str()),
        (200, Some("ready")),
        "{body}"
    );
    let after = burst(http, tg, "closed", 3).await;
    assert!(
        after.iter().all(|r| r.status == 200),
        "/readyz said ready, yet: {after:?}\n{STALE}"
    );
}

/// Redis down when tiergate starts: it serves from local buckets, says
/// so, and switches to Redis within 2 s of Redis appearing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn start_with_redis_down_then_recover() {
    let rig = Rig::start_in("local", Fault::Refuse);
    let (tg, http) = (&rig.tg, &rig.http);
    wait_degraded(http, tg, true, DETECTION).await;
    let (code, body) = readyz(http, tg).await;
    assert_eq!(
        (code, body["status"].as_str()),
        (200, Some("degraded")),
        "{body}"
    );

    let during = burst(http, tg, "early", 8).await;
    assert_eq!(admitted(&during), 5, "local bucket: {during:?}");
    assert!(during.iter().all(|r| r.status == 200 || r.status == 429));
    assert!(during.iter().all(|r| r.elapsed <= BOUND), "{during:?}");
    assert!(!rig.redis_has("early"));

    rig.fault.set(Fault::Pass);
    wait_degraded(http, tg, false, RECOVERY).await;
    let after = get(http, tg, "late", "/").await;
    assert_eq!(after.status, 200, "{after:?}");
    assert!(rig.redis_has("late"), "Redis decides once it is up");
}

/// Two outages under load: exactly two `degraded` and two `recovered`
/// lines, never one per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logs_once_per_transition() {
    let rig = Rig::start("local");
    let (tg, http) = (&rig.tg, &rig.http);
    wait_degraded(http, tg, false, DETECTION).await;
    let load = Load::start(tg);
    for round in 1..=2 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        rig.fault.set(Fault::Reset);
        wait_degraded(http, tg, true, DETECTION).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        rig.fault.set(Fault::Pass);
        wait_degraded(http, tg, false, RECOVERY).await;
        // Let traffic run on the recovered backend for a moment, so a
        // flapping breaker would show.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let pred = |n: &str| log_count(tg, n) >= round;
        assert!(pred(DEGRADED_LOG) && pred(RECOVERED_LOG), "{}", tg.dump());
    }
    let samples = load.finish().await;
    assert_clean("load through two outages", &samples);
    assert_eq!(log_count(tg, DEGRADED_LOG), 2, "{}", tg.dump());
    assert_eq!(log_count(tg, RECOVERED_LOG), 2, "{}", tg.dump());
}

/// Threads of `pid`.
fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("read /proc/<pid>/task")
        .count()
}

/// An outage and recovery under load leaks neither file descriptors nor
/// threads: after settling, both are back within a small bound of the
/// baseline taken after the same load on a healthy Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fds_and_threads_flat_across_outage() {
    let rig = Rig::start("local");
    let (tg, http) = (&rig.tg, &rig.http);
    let pid = tg.pid();
    wait_degraded(http, tg, false, DETECTION).await;

    // Warm up with the same load, so pools are at their working size.
    let warm = Load::start(tg);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_clean("warm-up", &warm.finish().await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (fd0, th0) = (fd_count(pid), thread_count(pid));

    for fault in [Fault::Reset, Fault::Blackhole] {
        let load = Load::start(tg);
        tokio::time::sleep(Duration::from_millis(200)).await;
        rig.fault.set(fault);
        wait_degraded(http, tg, true, DETECTION).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        rig.fault.set(Fault::Pass);
        wait_degraded(http, tg, false, RECOVERY).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_clean(&format!("load through {fault:?}"), &load.finish().await);
    }
    // Settle: bounded wait for the counts to come back down. The slack is
    // the upstream keep-alive pool, whose size follows how the load happened
    // to spread over the workers (observed: +4..+5 after 2..6 outages, all
    // of it pooled upstream sockets; Redis sockets back to one per client).
    let settled = eventually(Duration::from_secs(3), || async {
        fd_count(pid) <= fd0 + 8 && thread_count(pid) <= th0 + 2
    })
    .await;
    let (fd1, th1) = (fd_count(pid), thread_count(pid));
    eprintln!("fds {fd0} -> {fd1}, threads {th0} -> {th1}");
    assert!(
        settled,
        "fds {fd0} -> {fd1}, threads {th0} -> {th1} after two outages (bound +8 fds, +2 threads)"
    );
}

/// Upstream faults through the fault proxy: blackholed → 504 within
/// `upstream.timeout` + margin, reset or refused → 502; none of them is a
/// limiter problem (`/readyz` stays `ready`, no backend errors).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_faults_are_not_limiter_faults() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let fault = FaultProxy::start(upstream.addr());
    let yaml = config(&fault.http_url(), &redis.url(), "local")
        .replace("  timeout: 2s\n", "  timeout: 500ms\n")
        .replace(
            &format!("    timeout: {}ms\n", REDIS_TIMEOUT.as_millis()),
            "    timeout: 1s\n",
        );
    let tg = Tiergate::start(&yaml);
    let http = common::client_5s();
    let upstream_timeout = Duration::from_millis(500);
    assert_eq!(get(&http, &tg, "load-0", "/").await.status, 200);

    fault.set(Fault::Blackhole);
    for _ in 0..3 {
        let r = get(&http, &tg, "load-0", "/").await;
        assert_eq!(r.status, 504, "{r:?}");
        assert_eq!(r.error.as_deref(), Some("gateway_timeout"));
        assert!(
            r.elapsed <= upstream_timeout + Duration::from_millis(500),
            "{r:?}"
        );
    }
    fault.set(Fault::Latency(Duration::from_millis(800)));
    let r = get(&http, &tg, "load-0", "/").await;
    assert_eq!(
        (r.status, r.error.as_deref()),
        (504, Some("gateway_timeout")),
        "{r:?}"
    );

    fault.set(Fault::Reset);
    for _ in 0..3 {
        let r = get(&http, &tg, "load-0", "/").await;
        assert_eq!(
            (r.status, r.error.as_deref()),
            (502, Some("bad_gateway")),
            "{r:?}"
        );
        assert!(
            r.elapsed <= upstream_timeout + Duration::from_millis(500),
            "{r:?}"
        );
    }
    fault.set(Fault::Refuse);
    let r = get(&http, &tg, "load-0", "/").await;
    assert_eq!(
        (r.status, r.error.as_deref()),
        (502, Some("bad_gateway")),
        "{r:?}"
    );

    let (code, body) = readyz(&http, &tg).await;
    assert_eq!(
        (code, body["status"].as_str()),
        (200, Some("ready")),
        "{body}"
    );
    let m = metrics(&http, &tg).await;
    assert_eq!(metric(&m, "tiergate_backend_degraded", &[]), 0.0);
    assert_eq!(metric(&m, "tiergate_backend_errors_total", &[]), 0.0, "{m}");

    fault.set(Fault::Pass);
    let ok = eventually(Duration::from_secs(2), || async {
        get(&http, &tg, "load-0", "/").await.status == 200
    })
    .await;
    assert!(ok, "upstream reachable again");
}
