//! A Redis that comes back empty (restarted without persistence, or
//! flushed): SPEC §7 "overrides ... survive restarts" and SPEC §4 "a new
//! bucket starts full", with two replicas on one real `redis-server`.
//!
//! The override store keeps an epoch marker (`{prefix}:{!admin}:epoch`);
//! when it is missing, the replicas write the override set they hold in
//! memory back, and exactly one of them does it (`RESEED_SCRIPT`), counted
//! in `tiergate_override_reseeds_total` and logged once at WARN.
//!
//! Rates are `1/m`, so every count is exact.

mod common;

use std::time::{Duration, Instant};

use common::{RedisServer, Tiergate, Upstream, eventually, poll_until};
use serde_json::{Value, json};

/// Admin bearer token of both replicas.
const TOKEN: &str = "reseed-admin-token";
/// The override hash.
const HASH: &str = "tiergate:{!admin}:overrides";
/// The epoch marker.
const EPOCH: &str = "tiergate:{!admin}:epoch";
/// The re-seed counter.
const RESEEDS: &str = "tiergate_override_reseeds_total";
/// Part of the WARN line logged by the replica that re-seeds.
const RESEED_LOG: &str = "re-seeded";
/// Burst of the `free` tier (1/m).
const BURST: usize = 3;
/// How long after the data loss the overrides must be back.
const RESEED_WITHIN: Duration = Duration::from_secs(3);

/// The three overrides (tenant, PUT body, expected `X-RateLimit-Limit`).
fn overrides() -> [(&'static str, Value, &'static str); 3] {
    [
        ("ov-burst", json!({ "burst": 7 }), "7"),
        ("ov-tier", json!({ "tier": "gold" }), "6"),
        (
            "ov-both",
            json!({ "rate": "2/m", "burst": 4, "reason": "reseed test" }),
            "4",
        ),
    ]
}

/// Redis backend at `redis_url` with `on_error: deny` and a generous
/// timeout, so that any Redis failure is a visible 503 rather than a
/// silently different count.
fn config(upstream: &str, redis_url: &str) -> String {
    format!(
        r#"server:
  listen: "127.0.0.1:0"
admin:
  listen: "127.0.0.1:0"
upstream:
  url: "{upstream}"
backend:
  type: redis
  redis:
    url: "{redis_url}"
    timeout: 2s
  on_error: deny
tiers:
  free: {{ rate: 1/m, burst: {BURST} }}
  gold: {{ rate: 1/m, burst: 6 }}
default_tier: free
"#
    )
}

/// One response, fully read.
#[derive(Debug, Clone)]
struct Resp {
    status: u16,
    error: Option<String>,
    limit: Option<String>,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:#?}"))
    }
}

/// `method url` with `headers` and an optional JSON body.
async fn send(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> Resp {
    let mut req = common::request(http, method, url, headers);
    if let Some(b) = body {
        req = req.json(b);
    }
    let r = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let h = r.headers();
    let text = |n: &str| h.get(n).map(|v| v.to_str().unwrap_or("?").to_string());
    let status = r.status().as_u16();
    let error = text("x-tiergate-error");
    let limit = text("x-ratelimit-limit");
    Resp {
        status,
        error,
        limit,
        body: r.text().await.unwrap_or_default(),
    }
}

/// `GET {proxy}/` as `tenant`.
async fn get(http: &reqwest::Client, tg: &Tiergate, tenant: &str) -> Resp {
    let url = format!("{}/", tg.proxy_url());
    send(http, "GET", &url, &[("x-tenant-id", tenant)], None).await
}

/// An authenticated admin call.
async fn admin(
    http: &reqwest::Client,
    tg: &Tiergate,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Resp {
    let auth = format!("Bearer {TOKEN}");
    let url = format!("{}{path}", tg.admin_url());
    send(http, method, &url, &[("authorization", &auth)], body).await
}

/// `n` concurrent requests as `tenant` to each replica, each on a
/// connection of its own (so they spread over the replicas' workers, each
/// of which has its own deny cache).
async fn spread_burst(replicas: &[&Tiergate], tenant: &str, n: usize) -> Vec<Resp> {
    let mut reqs = Vec::new();
    for &tg in replicas {
        for _ in 0..n {
            reqs.push(async move { get(&common::client_5s(), tg, tenant).await });
        }
    }
    futures_util::future::join_all(reqs).await
}

fn admitted(rs: &[Resp]) -> usize {
    rs.iter().filter(|r| r.status == 200).count()
}

/// `tiergate_override_reseeds_total` of one replica.
async fn reseeds(http: &reqwest::Client, tg: &Tiergate) -> u64 {
    let r = send(
        http,
        "GET",
        &format!("{}/metrics", tg.admin_url()),
        &[],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{r:#?}");
    r.body
        .lines()
        .find_map(|l| {
            l.strip_prefix(RESEEDS)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no `{RESEEDS}` sample in /metrics:\n{}", r.body))
}

/// `RESEED_LOG` lines across `replicas`.
fn reseed_logs(replicas: &[&Tiergate]) -> Vec<String> {
    replicas
        .iter()
        .flat_map(|tg| tg.logs())
        .filter(|l| l.contains(RESEED_LOG))
        .collect()
}

/// The override hash as `tenant -> doc`.
fn stored(redis: &RedisServer) -> serde_json::Map<String, Value> {
    let raw = redis.cli(&["HGETALL", HASH]);
    let lines: Vec<&str> = raw.lines().filter(|l| !l.is_empty()).collect();
    lines
        .chunks(2)
        .map(|kv| {
            let doc = serde_json::from_str(kv[1])
                .unwrap_or_else(|e| panic!("HGETALL {HASH}: {e}: {raw}"));
            (kv[0].to_string(), doc)
        })
        .collect()
}

/// Waits until `/readyz` says `ready` (not degraded).
async fn wait_ready(http: &reqwest::Client, tg: &Tiergate, within: Duration) {
    let url = format!("{}/readyz", tg.admin_url());
    let ok = eventually(within, || async {
        let r = send(http, "GET", &url, &[], None).await;
        r.status == 200 && r.json()["status"] == "ready"
    })
    .await;
    assert!(ok, "/readyz not ready within {within:?}\n{}", tg.dump());
}

/// Whether every override applies on `tg`: the admin view shows it and a
/// proxied request carries its limit. Returns what does not.
async fn overrides_not_applied(http: &reqwest::Client, tg: &Tiergate, which: &str) -> Vec<String> {
    let mut wrong = Vec::new();
    for (tenant, body, limit) in overrides() {
        let view = admin(http, tg, "GET", &format!("/v1/tenants/{tenant}"), None).await;
        let view = view.json();
        for (k, v) in body.as_object().expect("object") {
            if &view["override"][k] != v {
                wrong.push(format!(
                    "{which}: GET /v1/tenants/{tenant}: {k} != {v}: {view}"
                ));
            }
        }
        let r = get(http, tg, tenant).await;
        if r.status != 200 || r.limit.as_deref() != Some(limit) {
            wrong.push(format!(
                "{which}: {tenant} not decided under its override (want X-RateLimit-Limit \
                 {limit}): status {}, limit {:?}, x-tiergate-error {:?}",
                r.status, r.limit, r.error
            ));
        }
    }
    wrong
}

/// How Redis loses its data.
#[derive(Debug, Clone, Copy)]
enum Loss {
    /// `FLUSHALL` on a running server: no connection breaks, nothing fails.
    Flushall,
    /// SIGKILL and start again on the same port, empty.
    Restart,
}

/// The whole scenario for one kind of data loss.
async fn reseed_after(loss: Loss) {
    let mut redis = RedisServer::start();
    let upstream = Upstream::start();
    let yaml = config(&upstream.url(), &redis.url());
    let env = [
        ("TIERGATE_ADMIN_TOKEN", TOKEN),
        ("RUST_LOG", "info,tiergate::overrides=debug"),
    ];
    let a = Tiergate::start_with_env(&yaml, &env);
    let b = Tiergate::start_with_env(&yaml, &env);
    let http = common::client_5s();
    wait_ready(&http, &a, Duration::from_secs(3)).await;
    wait_ready(&http, &b, Duration::from_secs(3)).await;
    // Three overrides through A; B has them all (pub/sub) before the loss.
    for (tenant, body, _) in overrides() {
        let r = admin(
            &http,
            &a,
            "PUT",
            &format!("/v1/tenants/{tenant}/override"),
            Some(&body),
        )
        .await;
        assert_eq!(r.status, 200, "PUT {tenant}: {r:#?}");
    }
    let synced = eventually(Duration::from_secs(1), || async {
        let r = admin(&http, &b, "GET", "/v1/overrides", None).await;
        r.status == 200 && r.json()["overrides"].as_array().map(Vec::len) == Some(3)
    })
    .await;
    assert!(
        synced,
        "B did not get the 3 overrides within 1 s\n{}",
        b.dump()
    );
    // A fresh deployment marks its Redis once a replica holds overrides
    // (or after a short start-up grace): the epoch check runs every 2 s.
    assert!(
        poll_until(Duration::from_secs(4), || redis.cli(&["EXISTS", EPOCH])
            == "1"),
        "epoch marker never written\n{}",
        a.dump()
    );
    let before = stored(&redis);
    assert_eq!(before.len(), 3, "{before:?}");

    // A tenant spends its whole bucket, then is refused through both
    // replicas, 16 times each, each request on a connection of its own so
    // that every worker (each has its own deny cache) remembers a refusal.
    for _ in 0..BURST {
        let r = get(&http, &a, "spent").await;
        assert_eq!(r.status, 200, "{r:#?}");
    }
    let refused = spread_burst(&[&a, &b], "spent", 16).await;
    assert!(
        refused.iter().all(|r| r.status == 429),
        "spent: {refused:#?}"
    );
    assert_eq!(reseeds(&http, &a).await + reseeds(&http, &b).await, 0);

    // Redis loses everything.
    match loss {
        Loss::Flushall => assert_eq!(redis.cli(&["FLUSHALL"]), "OK"),
        Loss::Restart => tokio::task::block_in_place(|| redis.restart()),
    }
    let lost_at = Instant::now();
    assert_eq!(redis.cli(&["DBSIZE"]), "0", "{loss:?} left data behind");

    // From here on every expectation is checked and all that fail are
    // reported together, so that one broken step does not hide the others.
    let mut findings: Vec<String> = Vec::new();

    // Within RESEED_WITHIN: the three overrides and the marker are back.
    let back = eventually(RESEED_WITHIN, || async {
        stored(&redis).len() == 3 && redis.cli(&["EXISTS", EPOCH]) == "1"
    })
    .await;
    if !back {
        let list_a = admin(&http, &a, "GET", "/v1/overrides", None).await.body;
        let list_b = admin(&http, &b, "GET", "/v1/overrides", None).await.body;
        findings.push(format!(
            "overrides not re-seeded within {RESEED_WITHIN:?}: hash {:?}, epoch marker \
             exists: {}; GET /v1/overrides on A: {list_a}; on B: {list_b}",
            stored(&redis),
            redis.cli(&["EXISTS", EPOCH]),
        ));
    } else if stored(&redis) != before {
        findings.push(format!(
            "re-seeded hash differs: {:?} != {before:?}",
            stored(&redis)
        ));
    }

    // Exactly one replica re-seeded: counted once, logged once. Wait past
    // the next periodic marker check (every 2 s) before concluding.
    let _ = eventually(Duration::from_secs(1), || async {
        reseeds(&http, &a).await + reseeds(&http, &b).await >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (ra, rb) = (reseeds(&http, &a).await, reseeds(&http, &b).await);
    if ra + rb != 1 {
        findings.push(format!(
            "{RESEEDS} summed over both replicas is {} (A {ra}, B {rb}), want exactly 1",
            ra + rb
        ));
    }
    let logs = reseed_logs(&[&a, &b]);
    if logs.len() != 1 || !logs[0].contains("WARN") {
        findings.push(format!(
            "want exactly one WARN `{RESEED_LOG}` line across both replicas, got {logs:?}"
        ));
    }
    if back && stored(&redis) != before {
        findings.push(format!(
            "the hash changed after the re-seed: {:?}",
            stored(&redis)
        ));
    }

    if matches!(loss, Loss::Restart) {
        wait_ready(&http, &a, Duration::from_secs(3)).await;
        wait_ready(&http, &b, Duration::from_secs(3)).await;
    }

    // The overrides still apply on both replicas.
    findings.extend(overrides_not_applied(&http, &a, "A").await);
    findings.extend(overrides_not_applied(&http, &b, "B").await);

    // Buckets start full again: Redis holds nothing for `spent`, so it gets
    // its whole burst back — across both replicas, exactly once.
    assert_eq!(
        redis.cli(&["EXISTS", "tiergate:{spent}:tenant"]),
        "0",
        "{loss:?}: the bucket is gone from Redis"
    );
    let view = admin(&http, &a, "GET", "/v1/tenants/spent", None)
        .await
        .json();
    let again = spread_burst(&[&a, &b], "spent", 4).await;
    let written = redis.cli(&["EXISTS", "tiergate:{spent}:tenant"]) == "1";
    if admitted(&again) != BURST || !again.iter().all(|r| r.status == 200 || r.status == 429) {
        findings.push(format!(
            "after Redis lost its data the bucket of `spent` starts full (SPEC §4), so \
             exactly {BURST} of 8 should be admitted across both replicas; got {} \
             (statuses {:?}, x-tiergate-error {:?}; Redis key written: {written}; the admin \
             view just before said remaining = {}). Fewer \
             means refusals answered from the workers' local deny caches \
             (src/limiter/redis.rs DenyCache), which are cleared only after a Redis \
             *failure* (BackendHealth generation), never on data loss without one",
            admitted(&again),
            again.iter().map(|r| r.status).collect::<Vec<_>>(),
            again
                .iter()
                .filter_map(|r| r.error.clone())
                .collect::<Vec<_>>(),
            view["remaining"],
        ));
    }

    assert!(
        findings.is_empty(),
        "{loss:?} ({:?} after the loss):\n- {}\n--- A ---\n{}\n--- B ---\n{}",
        lost_at.elapsed(),
        findings.join("\n- "),
        a.dump(),
        b.dump()
    );
}

/// `FLUSHALL` while both replicas stay connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overrides_are_reseeded_once_after_flushall() {
    reseed_after(Loss::Flushall).await;
}

/// Redis killed and restarted empty on the same port.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overrides_are_reseeded_once_after_a_restart() {
    reseed_after(Loss::Restart).await;
}
