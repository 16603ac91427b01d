//! The redis limiter's batching: one worker's concurrent decisions share one
//! script call, and that changes no count (SPEC §4 exactness) and no failure
//! behaviour (SPEC §6); and its deny cache across a rate change. Drives
//! `RedisLimiter` and `Limiter` directly, against throw-away
//! `redis-server`s, on current-thread runtimes like tiergate's workers.
//! Rates are `/m` (one test lets a `100/s` bucket drain), so every count is
//! exact.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Fault, FaultProxy, RedisServer};
use futures_util::future::join_all;
use tiergate::config::{Limit, OnError, Rate, RedisConfig, RedisTarget};
use tiergate::identity::TenantId;
use tiergate::limiter::{
    BackendHealth, BucketSpec, Decision, Limiter, LimiterError, MemoryLimiter, Outcome,
    RedisLimiter,
};
use tiergate::metrics::Metrics;

fn redis_config(url: &str, prefix: &str, timeout: Duration) -> RedisConfig {
    RedisConfig {
        target: RedisTarget::Single(url.to_string()),
        key_prefix: prefix.to_string(),
        timeout,
    }
}

fn bucket(name: &str, rate: &str, burst: u32, cost: u32) -> BucketSpec {
    BucketSpec {
        name: Arc::from(name),
        limit: Limit {
            rate: Rate::parse(rate).expect("rate"),
            burst,
        },
        cost,
    }
}

fn tenant(s: &str) -> TenantId {
    TenantId::parse(s).expect("tenant id")
}

/// A current-thread runtime, like each tiergate worker's.
fn worker_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// How many `EVALSHA` commands the server has executed so far.
fn evalsha_calls(server: &RedisServer) -> u64 {
    let stats = server.cli(&["INFO", "commandstats"]);
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .map(|rest| {
            rest.split(',')
                .next()
                .and_then(|n| n.parse().ok())
                .expect("calls count")
        })
        .unwrap_or(0)
}

/// A decision reduced to what does not depend on the microseconds between
/// two calls: verdict, reporting bucket, whole tokens left, and reset and
/// retry-after in whole seconds (the rates here are per minute).
fn summary(d: &Decision) -> Summary {
    let secs = |d: Duration| d.as_secs_f64().round() as u64;
    match d {
        Decision::Allow { state } => (
            true,
            state.name.to_string(),
            state.remaining,
            secs(state.reset),
            0,
        ),
        Decision::Deny { state, retry_after } => (
            false,
            state.name.to_string(),
            state.remaining,
            secs(state.reset),
            secs(*retry_after),
        ),
    }
}

/// Two workers (two limiters, each on its own runtime and thread) flood one
/// tenant with 100 concurrent decisions each: the batches they send must
/// admit exactly the burst between them, and the decisions must really have
/// been batched (far fewer script calls than decisions).
#[test]
fn concurrent_decisions_from_two_workers_admit_exactly_the_burst() {
    let server = RedisServer::start();
    let cfg = redis_config(&server.url(), "tg", Duration::from_secs(5));
    let buckets = [bucket("tenant", "10/m", 10, 1)];
    let before = evalsha_calls(&server);
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let cfg = cfg.clone();
            let buckets = buckets.clone();
            std::thread::spawn(move || {
                worker_runtime().block_on(async {
                    let limiter = RedisLimiter::new(&cfg).expect("limiter");
                    let acme = tenant("acme");
                    let calls = (0..100).map(|_| limiter.check(&acme, &buckets, 0));
                    join_all(calls)
                        .await
                        .into_iter()
                        .map(|r| match r.expect("redis decision") {
                            Decision::Allow { .. } => 1,
                            Decision::Deny { .. } => 0,
                        })
                        .sum::<u32>()
                })
            })
        })
        .collect();
    let admitted: u32 = workers.into_iter().map(|w| w.join().expect("worker")).sum();
    assert_eq!(admitted, 10, "exactly the burst is admitted");
    let calls = evalsha_calls(&server) - before;
    assert!(
        calls <= 20,
        "200 decisions should share a few script calls, took {calls}"
    );
}

/// A decision as [`summary`] reduces it.
type Summary = (bool, String, u64, u64, u64);

/// What one limiter answers to `decisions` made one at a time, what another
/// (separate keys, same server) answers to them made all at once, and how
/// many script calls the concurrent ones took.
async fn one_at_a_time_and_batched(
    decisions: &[(TenantId, Vec<BucketSpec>)],
) -> (Vec<Summary>, Vec<Summary>, u64) {
    let server = RedisServer::start();
    let timeout = Duration::from_secs(5);
    let one_by_one =
        RedisLimiter::new(&redis_config(&server.url(), "seq", timeout)).expect("limiter");
    let batched = RedisLimiter::new(&redis_config(&server.url(), "bat", timeout)).expect("limiter");
    let mut expected = Vec::new();
    for (t, b) in decisions {
        expected.push(summary(&one_by_one.check(t, b, 0).await.expect("decision")));
    }
    let before = evalsha_calls(&server);
    let got: Vec<_> = join_all(decisions.iter().map(|(t, b)| batched.check(t, b, 0)))
        .await
        .into_iter()
        .map(|r| summary(&r.expect("decision")))
        .collect();
    let calls = evalsha_calls(&server) - before;
    (expected, got, calls)
}

/// A batch that mixes tenants, routes, costs and refusals must give every
/// decision the answer it gets when the same decisions are made one at a
/// time, in the same order (against separate keys of the same server).
#[tokio::test]
async fn a_batch_mixing_tenants_and_buckets_decides_like_one_call_at_a_time() {
    let tier = bucket("tenant", "1/m", 4, 1);
    let export = bucket("export", "1/m", 2, 1);
    let bulk = bucket("export", "1/m", 2, 2);
    let ip = bucket("ip", "2/m", 3, 1);
    let shapes: [Vec<BucketSpec>; 4] = [
        vec![tier.clone()],
        vec![tier.clone(), export],
        vec![tier.clone(), bulk, ip.clone()],
        vec![ip, tier],
    ];
    let decisions: Vec<(TenantId, Vec<BucketSpec>)> = (0..24)
        .map(|i| {
            let t = tenant(["a", "b", "c"][i % 3]);
            (t, shapes[(i / 3 + i) % 4].clone())
        })
        .collect();

    let (expected, got, calls) = one_at_a_time_and_batched(&decisions).await;
    assert_eq!(got, expected);
    assert!(
        expected.iter().any(|d| d.0) && expected.iter().any(|d| !d.0),
        "the sequence admits some and refuses some: {expected:?}"
    );
    assert!(
        expected.iter().any(|d| !d.0 && d.1 == "export"),
        "a route bucket refuses while the tenant bucket has room: {expected:?}"
    );
    assert!(
        calls <= 3,
        "24 concurrent decisions should share a few script calls, took {calls}"
    );
}

/// Consecutive identical decisions (a busy tenant's concurrent requests)
/// go to Redis as one run with its length. A run that outlasts the tokens
/// (6 of a tenant whose burst is 4), one cut short by its second bucket
/// (a route with burst 2), and a run after both must each give every
/// decision the answer, tokens left and retry time it gets one at a time.
#[tokio::test]
async fn runs_of_identical_decisions_decide_like_one_call_at_a_time() {
    let tier = vec![bucket("tenant", "1/m", 4, 1)];
    let routed = vec![bucket("tenant", "1/m", 4, 1), bucket("export", "1/m", 2, 1)];
    let (t, u) = (tenant("busy"), tenant("exporter"));
    let mut decisions: Vec<(TenantId, Vec<BucketSpec>)> = Vec::new();
    decisions.extend(std::iter::repeat_n((t.clone(), tier.clone()), 6));
    decisions.extend(std::iter::repeat_n((u.clone(), routed), 3));
    decisions.extend(std::iter::repeat_n((u, tier), 3));

    let (expected, got, calls) = one_at_a_time_and_batched(&decisions).await;
    assert_eq!(got, expected);
    let admitted: Vec<bool> = expected.iter().map(|d| d.0).collect();
    assert_eq!(
        admitted,
        [
            true, true, true, true, false, false, true, true, false, true, true, false
        ],
        "{expected:?}"
    );
    assert!(
        calls <= 3,
        "12 concurrent decisions took {calls} script calls"
    );
}

/// Random sequences in which decisions often repeat the one before (runs
/// of every length, cut short by either bucket, mixed with other tenants'
/// and other shapes) decide batched exactly as one call at a time.
#[tokio::test]
async fn random_sequences_with_runs_decide_like_one_call_at_a_time() {
    // Rates apart, so that when two buckets refuse, the longer wait (the
    // one reported) is never a near tie that the microseconds between
    // one-at-a-time calls could tip.
    let tier = bucket("tenant", "1/m", 5, 1);
    let shapes: [Vec<BucketSpec>; 4] = [
        vec![tier.clone()],
        vec![tier.clone(), bucket("export", "2/m", 2, 1)],
        vec![bucket("tenant", "1/m", 5, 2)],
        vec![bucket("ip", "3/m", 3, 1), tier],
    ];
    let tenants = [tenant("a"), tenant("b")];
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    for round in 0..6 {
        let mut decisions: Vec<(TenantId, Vec<BucketSpec>)> = Vec::new();
        for _ in 0..40 {
            let repeat = !decisions.is_empty() && next(10) < 6;
            let d = if repeat {
                decisions.last().cloned().unwrap()
            } else {
                let t = tenants[next(2) as usize].clone();
                (t, shapes[next(4) as usize].clone())
            };
            decisions.push(d);
        }
        let (expected, got, _) = one_at_a_time_and_batched(&decisions).await;
        assert_eq!(got, expected, "round {round}");
        assert!(
            expected.iter().any(|d| d.0) && expected.iter().any(|d| !d.0),
            "round {round} admits some and refuses some: {expected:?}"
        );
    }
}

/// A bucket whose rate changes between decisions of one batch (a tier
/// change landing mid-batch): the script re-expresses the stored state in
/// the new rate, and every later decision of the batch must see that, just
/// as one call per decision would. The script keeps each key in a Lua table
/// and writes it once at the end, so this is where that could go wrong.
#[tokio::test]
async fn a_rate_change_inside_a_batch_decides_like_one_call_at_a_time() {
    let slow = vec![bucket("tenant", "1/m", 4, 1)];
    let fast = vec![bucket("tenant", "2/m", 4, 1)];
    let pattern = [
        &slow, &slow, &fast, &slow, &fast, &fast, &slow, &fast, &slow, &slow,
    ];
    let t = tenant("upgraded");
    let decisions: Vec<(TenantId, Vec<BucketSpec>)> =
        pattern.iter().map(|b| (t.clone(), (*b).clone())).collect();

    let (expected, got, _) = one_at_a_time_and_batched(&decisions).await;

    assert_eq!(got, expected);
    assert!(
        expected.iter().any(|d| d.0) && expected.iter().any(|d| !d.0),
        "the sequence admits some and refuses some: {expected:?}"
    );
    // Both rates left their mark on the stored value: 1/m refusals retry
    // after a minute, 2/m ones after 30 s.
    let retries: std::collections::BTreeSet<u64> =
        expected.iter().filter(|d| !d.0).map(|d| d.4).collect();
    assert_eq!(retries, [30, 60].into(), "{expected:?}");
}

/// A bucket run at two rates in turn (a tier change): Redis re-expresses
/// the stored TAT in each rate, and time spent at the faster rate drains
/// it faster, so the TAT a refusal taught the deny cache at the slow rate
/// is no longer a lower bound. The cache must forget it rather than refuse
/// what Redis would now admit. (The 100/s bucket drains in 30 ms; the
/// sleep only has to be longer than that.)
#[tokio::test]
async fn a_rate_change_makes_the_deny_cache_forget_the_old_wait() {
    let server = RedisServer::start();
    let limiter = RedisLimiter::new(&redis_config(&server.url(), "rc", Duration::from_secs(5)))
        .expect("limiter");
    let slow = vec![bucket("tenant", "1/s", 2, 1)];
    let fast = vec![bucket("tenant", "100/s", 4, 1)];
    let t = tenant("changing");

    for _ in 0..2 {
        let d = limiter.check(&t, &slow, 0).await.expect("decision");
        assert!(matches!(d, Decision::Allow { .. }), "{d:?}");
    }
    // Refused by Redis: the cache learns "no token for ~2 s" at 1/s.
    let d = limiter.check(&t, &slow, 0).await.expect("decision");
    assert!(matches!(d, Decision::Deny { .. }), "{d:?}");
    // At 100/s (burst 4) the same two tokens in use leave room: admitted,
    // so nothing new is cached, and the bucket drains in 30 ms.
    let d = limiter.check(&t, &fast, 0).await.expect("decision");
    assert!(matches!(d, Decision::Allow { .. }), "{d:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Redis sees a full bucket now; a cache still trusting the 1/s wait
    // (it is under a second old) would refuse.
    let d = limiter.check(&t, &slow, 0).await.expect("decision");
    assert!(
        matches!(d, Decision::Allow { .. }),
        "the bucket drained at 100/s, Redis admits: {d:?}"
    );
}

/// Redis killed under concurrent load: every queued decision comes back as
/// an error (no caller is left waiting on a batch that will never answer),
/// and `Limiter` applies `on_error` to each.
#[tokio::test]
async fn decisions_of_a_failed_batch_fail_by_on_error_instead_of_hanging() {
    let mut server = RedisServer::start();
    let cfg = redis_config(&server.url(), "tg", Duration::from_secs(2));
    let buckets = [bucket("tenant", "1/m", 1000, 1)];
    let acme = tenant("acme");
    let metrics = Arc::new(Metrics::new(prometheus::Registry::new()));
    let limiter = |on_error| {
        Limiter::redis(
            RedisLimiter::new(&cfg).expect("limiter"),
            Arc::new(MemoryLimiter::new()),
            on_error,
            BackendHealth::new(on_error, metrics.clone()),
            metrics.clone(),
        )
    };
    let deny = limiter(OnError::Deny);
    let local = limiter(OnError::Local);
    let raw = RedisLimiter::new(&cfg).expect("limiter");
    for l in [&deny, &local] {
        assert!(matches!(
            l.check(&acme, &buckets).await,
            Outcome::Decided(Decision::Allow { .. })
        ));
    }
    raw.check(&acme, &buckets, 0).await.expect("redis is up");

    server.kill();
    let all = async {
        let raw_results = join_all((0..50).map(|_| raw.check(&acme, &buckets, 0))).await;
        let deny_results = join_all((0..50).map(|_| deny.check(&acme, &buckets))).await;
        let local_results = join_all((0..50).map(|_| local.check(&acme, &buckets))).await;
        (raw_results, deny_results, local_results)
    };
    let (raw_results, deny_results, local_results) =
        tokio::time::timeout(Duration::from_secs(60), all)
            .await
            .expect("decisions of a failed batch must not hang");
    for r in raw_results {
        assert!(
            matches!(r, Err(LimiterError::Unavailable(_) | LimiterError::Timeout)),
            "{r:?}"
        );
    }
    for o in deny_results {
        assert_eq!(o, Outcome::Unavailable);
    }
    for o in local_results {
        assert!(
            matches!(o, Outcome::Decided(Decision::Allow { .. })),
            "{o:?}"
        );
    }
}

/// A Redis that stops answering: each decision is bounded by the call
/// timeout on its own and answered `Timeout`, batch or not.
#[tokio::test]
async fn decisions_queued_behind_a_silent_redis_time_out() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(server.addr());
    let cfg = redis_config(&proxy.redis_url(), "tg", Duration::from_millis(300));
    let limiter = RedisLimiter::new(&cfg).expect("limiter");
    let buckets = [bucket("tenant", "1/m", 1000, 1)];
    let acme = tenant("acme");
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            limiter.check(&acme, &buckets, 0).await.is_ok()
        })
        .await,
        "redis answers through the proxy"
    );

    proxy.set(Fault::Blackhole);
    let results = tokio::time::timeout(
        Duration::from_secs(60),
        join_all((0..20).map(|_| limiter.check(&acme, &buckets, 0))),
    )
    .await
    .expect("decisions behind a silent redis must not hang");
    for r in results {
        assert_eq!(r, Err(LimiterError::Timeout));
    }
}

/// One tenant's decisions on a throw-away Redis that the tests below freeze
/// while decisions queue: the limiter is connected and its script loaded.
struct Queueing {
    server: RedisServer,
    limiter: Arc<RedisLimiter>,
    buckets: Arc<[BucketSpec; 1]>,
    acme: TenantId,
    /// `EVALSHA`s run before the test's own.
    calls_before: u64,
}

impl Queueing {
    /// Must run on a worker runtime; `timeout` is `backend.redis.timeout`.
    async fn start(timeout: Duration) -> Queueing {
        let server = RedisServer::start();
        let cfg = redis_config(&server.url(), "tg", timeout);
        let q = Queueing {
            limiter: Arc::new(RedisLimiter::new(&cfg).expect("limiter")),
            buckets: Arc::new([bucket("tenant", "1/m", 1000, 1)]),
            acme: tenant("acme"),
            calls_before: 0,
            server,
        };
        q.check().await.expect("redis is up");
        Queueing {
            calls_before: evalsha_calls(&q.server),
            ..q
        }
    }

    async fn check(&self) -> Result<Decision, LimiterError> {
        self.limiter.check(&self.acme, &self.buckets[..], 0).await
    }

    /// One decision, as a task of its own.
    fn decide(&self) -> tokio::task::JoinHandle<Result<Decision, LimiterError>> {
        let (limiter, buckets, acme) = (
            self.limiter.clone(),
            self.buckets.clone(),
            self.acme.clone(),
        );
        tokio::spawn(async move { limiter.check(&acme, &buckets[..], 0).await })
    }

    /// Four decisions, each sent alone in a call of its own: every
    /// in-flight slot of the batcher (four) is taken.
    async fn fill_in_flight(&self) -> Vec<tokio::task::JoinHandle<Result<Decision, LimiterError>>> {
        let mut on_wire = Vec::new();
        for _ in 0..4 {
            on_wire.push(self.decide());
            // The runtime runs until idle: this decision's flusher has
            // sent it alone and waits for Redis.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        on_wire
    }

    /// `EVALSHA`s run since `start`.
    fn calls(&self) -> u64 {
        evalsha_calls(&self.server) - self.calls_before
    }
}

/// A decision that waits in the queue past its deadline is answered
/// `Timeout` and never sent. Four calls to a frozen Redis hold every
/// in-flight slot, five more decisions queue behind them, and the worker
/// is then kept busy beyond every deadline. Once Redis thaws it runs only
/// the four calls that were on the wire: no token is taken for a decision
/// whose caller was already told `Timeout`.
#[test]
fn a_decision_that_expires_in_the_queue_is_never_sent() {
    worker_runtime().block_on(async {
        // A generous timeout: the call after the thaw must not time out on
        // a loaded machine.
        let q = Queueing::start(Duration::from_secs(1)).await;
        let frozen = q.server.freeze();
        let mut decisions = q.fill_in_flight().await;
        decisions.extend((0..5).map(|_| q.decide()));
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The worker busy past every deadline (the last is ~1.1 s away).
        std::thread::sleep(Duration::from_millis(1500));
        for d in decisions {
            assert_eq!(d.await.expect("task"), Err(LimiterError::Timeout));
        }

        drop(frozen);
        // Redis answers in order: once this is answered, every call that
        // reached it has run.
        q.check().await.expect("redis thawed");
        assert_eq!(
            q.calls(),
            4 + 1,
            "the four calls on the wire and the last one; the expired five were never sent"
        );
        let left = q.limiter.peek(&q.acme, &q.buckets[0]).await.expect("peek");
        assert_eq!(left, 1000 - 1 - 4 - 1);
    });
}

/// Each decision of a batch gets its whole timeout: one that queued for a
/// while does not cut short the call it rides in for those that joined
/// later. Four calls to a frozen Redis hold every in-flight slot; `early`
/// queues behind them at ~0.3 s and `late` at ~1.5 s (timeout 2 s). At
/// ~2 s the four calls time out and `early` and `late` go out in one call.
/// Redis thaws at ~2.9 s: after `early`'s deadline, well before `late`'s.
/// `early` is answered `Timeout` at its deadline; `late` gets Redis's
/// verdict.
#[test]
fn each_decision_of_a_batch_gets_its_whole_timeout() {
    worker_runtime().block_on(async {
        let q = Queueing::start(Duration::from_secs(2)).await;
        let start = tokio::time::Instant::now();
        let at = |secs: f64| tokio::time::sleep_until(start + Duration::from_secs_f64(secs));
        let frozen = q.server.freeze();
        let on_wire = q.fill_in_flight().await;
        at(0.3).await;
        let early = q.decide();
        at(1.5).await;
        let late = q.decide();
        at(2.9).await;
        drop(frozen);

        for d in on_wire {
            assert_eq!(d.await.expect("task"), Err(LimiterError::Timeout));
        }
        assert_eq!(early.await.expect("task"), Err(LimiterError::Timeout));
        let late = late.await.expect("task");
        assert!(
            matches!(late, Ok(Decision::Allow { .. })),
            "the call outlived `early`'s deadline for `late`: {late:?}"
        );
        assert_eq!(
            q.calls(),
            4 + 1,
            "the four calls, then `early` and `late` in one"
        );
    });
}
