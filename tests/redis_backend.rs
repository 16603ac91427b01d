//! The redis backend specifically (SPEC §4 "across any number of replicas",
//! bucket keys and TTLs, SPEC §6 Redis failures, SPEC §7 `/readyz`), against
//! real `redis-server` processes and the real binary. Rates are `1/m` so
//! every count is exact.

mod common;

use common::{RedisServer, Resp, Tiergate, Upstream};
use std::time::Duration;

use serde_json::{Value, json};

/// Tiers used throughout: `free` burst 3, one interval = 60 s.
const TIERS: &str = "tiers:\n  free: { rate: 1/m, burst: 3 }\ndefault_tier: free\n";

/// Full config: listeners on port 0, `upstream`, a `backend:` block of
/// type redis with `redis_lines` (indented by four spaces) and `on_error`,
/// then `tail`.
fn config(upstream: &str, redis_lines: &str, on_error: &str, tail: &str) -> String {
    format!(
        "server:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\nupstream:\n  url: \"{upstream}\"\nbackend:\n  type: redis\n  redis:\n{redis_lines}  on_error: {on_error}\n{tail}"
    )
}

/// `url:` plus a generous per-call timeout, so that a loaded test machine
/// cannot push decisions into the fallback (`on_error: deny` then makes
/// any such failure a visible 503 rather than a wrong count).
fn redis_lines(url: &str) -> String {
    format!("    url: \"{url}\"\n    timeout: 2s\n")
}

/// A URL of a Redis that is not there: a port nothing listens on.
fn dead_redis_url() -> String {
    format!("redis://127.0.0.1:{}/0", common::free_port())
}

/// Starts tiergate against `dead_redis_url()` with `on_error` and [`TIERS`].
fn start_with_dead_redis(upstream: &Upstream, on_error: &str) -> Tiergate {
    Tiergate::start(&config(
        &upstream.url(),
        &format!("    url: \"{}\"\n", dead_redis_url()),
        on_error,
        TIERS,
    ))
}

/// The `/readyz` body of a redis-backed replica whose backend is degraded.
fn degraded_readyz() -> Value {
    json!({"status": "degraded", "backend": "redis", "degraded": true})
}

/// `method url` with `headers`, fully read.
async fn send(http: &reqwest::Client, method: &str, url: &str, headers: &[(&str, &str)]) -> Resp {
    let resp = common::request(http, method, url, headers)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    Resp::read(resp).await
}

/// `GET {tg}{path}` as `tenant`.
async fn get_as(http: &reqwest::Client, tg: &Tiergate, tenant: &str, path: &str) -> Resp {
    let url = format!("{}{path}", tg.proxy_url());
    send(http, "GET", &url, &[("x-tenant-id", tenant)]).await
}

/// `n` sequential `GET path` as `tenant`; their statuses.
async fn statuses(
    http: &reqwest::Client,
    tg: &Tiergate,
    tenant: &str,
    path: &str,
    n: usize,
) -> Vec<u16> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(get_as(http, tg, tenant, path).await.status);
    }
    out
}

/// `GET /readyz` on the admin listener: status and JSON body.
async fn readyz(http: &reqwest::Client, tg: &Tiergate) -> (u16, Value) {
    let r = send(http, "GET", &format!("{}/readyz", tg.admin_url()), &[]).await;
    (r.status, r.json())
}

/// `PTTL key` in milliseconds (-2: no key, -1: no TTL).
fn pttl(redis: &RedisServer, key: &str) -> i64 {
    redis
        .cli(&["PTTL", key])
        .parse()
        .unwrap_or_else(|e| panic!("PTTL {key}: {e}"))
}

/// Every bucket key in the Redis, sorted (the admin keys under the
/// `{!admin}` hash tag — override epoch, hash, audit — are left out).
fn keys(redis: &RedisServer) -> Vec<String> {
    let mut k: Vec<String> = redis
        .cli(&["KEYS", "*"])
        .lines()
        .filter(|l| !l.is_empty() && !l.contains(":{!admin}:"))
        .map(str::to_string)
        .collect();
    k.sort();
    k
}

/// SPEC §4: with the redis backend the limit holds "across any number of
/// replicas together" — two tiergates on one Redis, hit concurrently for
/// one tenant, admit exactly `burst` between them, not `burst` each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_redis_admit_exactly_burst_together() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let yaml = config(
        &upstream.url(),
        &redis_lines(&redis.url()),
        "deny",
        "tiers:\n  free: { rate: 1/m, burst: 5 }\ndefault_tier: free\n",
    );
    let a = Tiergate::start(&yaml);
    let b = Tiergate::start(&yaml);
    let http = common::client();
    let headers = [("x-tenant-id", "acme")];
    let (url_a, url_b) = (
        format!("{}/x", a.proxy_url()),
        format!("{}/x", b.proxy_url()),
    );
    let (sa, sb) = tokio::join!(
        common::burst(&http, &url_a, &headers, 15),
        common::burst(&http, &url_b, &headers, 15),
    );
    let all = [sa.clone(), sb.clone()].concat();
    let admitted = all.iter().filter(|s| **s == 200).count();
    let refused = all.iter().filter(|s| **s == 429).count();
    assert_eq!(
        (admitted, refused),
        (5, 25),
        "a: {sa:?}, b: {sb:?}\n{}\n{}",
        a.dump(),
        b.dump()
    );
    assert_eq!(upstream.count(), 5);
    // Either replica now refuses, and an interleaved follow-up agrees.
    for tg in [&a, &b, &a] {
        assert_eq!(get_as(&http, tg, "acme", "/x").await.status, 429);
    }
}

/// SPEC §4 key layout and TTL: `{prefix}:{<tenant>}:<bucket>` (tenant in a
/// hash tag), one key per bucket touched, each expiring when its bucket
/// would be full again so idle tenants cost no memory.
#[tokio::test]
async fn bucket_keys_use_the_hash_tagged_layout_and_expire_when_full_again() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let tail = format!(
        "{TIERS}routes:\n  - name: export\n    match: {{ path_prefix: \"/api/export\" }}\n    limits:\n      free: {{ rate: 1/m, burst: 2 }}\n  - name: search\n    match: {{ path_prefix: \"/api/search\" }}\n"
    );
    let tg = Tiergate::start(&config(
        &upstream.url(),
        &redis_lines(&redis.url()),
        "deny",
        &tail,
    ));
    let http = common::client();

    let r = get_as(&http, &tg, "acme", "/api/items").await;
    assert_eq!(r.status, 200, "{r:#?}\n{}", tg.dump());
    assert_eq!(keys(&redis), ["tiergate:{acme}:tenant"]);
    // One token taken from a 1/m bucket: full again in 60 s.
    let ttl = pttl(&redis, "tiergate:{acme}:tenant");
    assert!(ttl > 0 && ttl <= 60_000, "PTTL {ttl}");

    let r = get_as(&http, &tg, "acme", "/api/export/1").await;
    assert_eq!(r.status, 200, "{r:#?}");
    // A route without `limits` has no bucket of its own.
    let r = get_as(&http, &tg, "acme", "/api/search").await;
    assert_eq!(r.status, 200, "{r:#?}");
    assert_eq!(
        keys(&redis),
        ["tiergate:{acme}:export", "tiergate:{acme}:tenant"]
    );
    // Tenant bucket: 3 tokens taken, full again in 3 x 60 s (and it was
    // already more than 2 x 60 s away when the last token was taken).
    let ttl = pttl(&redis, "tiergate:{acme}:tenant");
    assert!(ttl > 120_000 && ttl <= 180_000, "tenant PTTL {ttl}");
    // Route bucket: 1 token taken, full again in 60 s.
    let ttl = pttl(&redis, "tiergate:{acme}:export");
    assert!(ttl > 0 && ttl <= 60_000, "route PTTL {ttl}");

    // A refused request writes nothing.
    let before = redis.cli(&["GET", "tiergate:{acme}:tenant"]);
    assert_eq!(get_as(&http, &tg, "acme", "/api/items").await.status, 429);
    assert_eq!(redis.cli(&["GET", "tiergate:{acme}:tenant"]), before);

    // Tenants never share keys.
    assert_eq!(get_as(&http, &tg, "globex", "/x").await.status, 200);
    assert!(keys(&redis).contains(&"tiergate:{globex}:tenant".to_string()));
}

/// SPEC §2 `backend.redis.key_prefix`: several deployments can share one
/// Redis; the prefix is honoured and nothing is written under the default.
#[tokio::test]
async fn custom_key_prefix_is_honoured() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let lines = format!("{}    key_prefix: \"shop-eu\"\n", redis_lines(&redis.url()));
    let tg = Tiergate::start(&config(&upstream.url(), &lines, "deny", TIERS));
    let http = common::client();
    assert_eq!(
        statuses(&http, &tg, "acme", "/x", 4).await,
        [200, 200, 200, 429]
    );
    assert_eq!(keys(&redis), ["shop-eu:{acme}:tenant"]);
    let ttl = pttl(&redis, "shop-eu:{acme}:tenant");
    assert!(ttl > 120_000 && ttl <= 180_000, "PTTL {ttl}");
}

/// The script is sent by SHA; a Redis that lost its script cache (restart,
/// failover, `SCRIPT FLUSH`) answers NOSCRIPT and tiergate must reload it
/// and keep deciding correctly, without ever failing a request.
#[tokio::test]
async fn decisions_survive_script_flush() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let tg = Tiergate::start(&config(
        &upstream.url(),
        &redis_lines(&redis.url()),
        "deny",
        TIERS,
    ));
    let http = common::client();
    assert_eq!(statuses(&http, &tg, "acme", "/x", 2).await, [200, 200]);
    assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]), "OK");
    assert_eq!(statuses(&http, &tg, "acme", "/x", 3).await, [200, 429, 429]);
    redis.cli(&["SCRIPT", "FLUSH"]);
    assert_eq!(
        statuses(&http, &tg, "globex", "/x", 4).await,
        [200, 200, 200, 429]
    );
    assert_eq!(upstream.count(), 6);
    let (status, body) = readyz(&http, &tg).await;
    assert_eq!(status, 200);
    assert_eq!(body["degraded"], false, "NOSCRIPT is not an outage: {body}");
}

/// SPEC §5/§6 `on_error: deny` (fail closed): with Redis unreachable every
/// limited request is a 503 `limiter_unavailable` with `Retry-After: 1`,
/// the upstream sees nothing, and `/readyz` reports the outage with 503 so
/// a load balancer takes the replica out.
#[tokio::test]
async fn redis_down_with_on_error_deny_answers_503_and_readyz_is_503() {
    let upstream = Upstream::start();
    let tg = start_with_dead_redis(&upstream, "deny");
    let http = common::client();
    for _ in 0..5 {
        let r = get_as(&http, &tg, "acme", "/x").await;
        assert_eq!(r.status, 503, "{r:#?}\n{}", tg.dump());
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_eq!(r.header("x-tiergate-error"), Some("limiter_unavailable"));
        assert_eq!(r.header("content-type"), Some("application/json"));
        let body = r.json();
        assert_eq!(body["error"], "limiter_unavailable", "{body}");
        assert!(body["message"].is_string(), "{body}");
        assert!(
            !r.body.contains("127.0.0.1") && !r.body.to_lowercase().contains("refused"),
            "internal causes are never sent to the client: {}",
            r.body
        );
    }
    assert_eq!(upstream.count(), 0);
    let (status, body) = readyz(&http, &tg).await;
    assert_eq!((status, body), (503, degraded_readyz()));
}

/// SPEC §6 `on_error: allow` (fail open): a Redis outage admits every
/// request, with no rate-limit headers (nothing was decided), and
/// `/readyz` stays 200 while saying it is degraded.
#[tokio::test]
async fn redis_down_with_on_error_allow_admits_everything_without_headers() {
    let upstream = Upstream::start();
    let tg = start_with_dead_redis(&upstream, "allow");
    let http = common::client();
    for i in 0..10 {
        let r = get_as(&http, &tg, "acme", "/x").await;
        assert_eq!(r.status, 200, "request {i}: {r:#?}\n{}", tg.dump());
        assert_eq!(r.header("x-upstream"), Some("1"));
        assert!(!r.has_rate_limit_headers(), "{r:#?}");
    }
    assert_eq!(upstream.count(), 10);
    let (status, body) = readyz(&http, &tg).await;
    assert_eq!((status, body), (200, degraded_readyz()));
}

/// SPEC §6 `on_error: local` (the default): with Redis unreachable each
/// replica still enforces the full tier limit itself, exactly, with the
/// usual headers; `/readyz` is 200 and degraded.
#[tokio::test]
async fn redis_down_with_on_error_local_limits_exactly_by_local_buckets() {
    let upstream = Upstream::start();
    let tg = start_with_dead_redis(&upstream, "local");
    let http = common::client();
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(get_as(&http, &tg, "acme", "/x").await);
    }
    let codes: Vec<u16> = seen.iter().map(|r| r.status).collect();
    assert_eq!(codes, [200, 200, 200, 429, 429, 429], "{}", tg.dump());
    let remaining: Vec<Option<&str>> = seen
        .iter()
        .map(|r| r.header("x-ratelimit-remaining"))
        .collect();
    assert_eq!(
        remaining,
        [
            Some("2"),
            Some("1"),
            Some("0"),
            Some("0"),
            Some("0"),
            Some("0")
        ]
    );
    assert_eq!(
        seen[3].header("ratelimit-policy"),
        Some("\"tenant\";q=3;w=180")
    );
    assert_eq!(seen[3].json()["error"], "rate_limited");
    // Another tenant has its own local bucket.
    assert_eq!(
        statuses(&http, &tg, "globex", "/x", 4).await,
        [200, 200, 200, 429]
    );
    assert_eq!(upstream.count(), 6);
    let (status, body) = readyz(&http, &tg).await;
    assert_eq!((status, body), (200, degraded_readyz()));
}

/// Before any failure the redis backend reports itself ready, so the
/// degraded states above are caused by the outage, not by the backend type.
#[tokio::test]
async fn healthy_redis_backend_is_ready_and_not_degraded() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let tg = Tiergate::start(&config(
        &upstream.url(),
        &redis_lines(&redis.url()),
        "deny",
        TIERS,
    ));
    let http = common::client();
    assert_eq!(get_as(&http, &tg, "acme", "/x").await.status, 200);
    let (status, body) = readyz(&http, &tg).await;
    assert_eq!(
        (status, body),
        (
            200,
            json!({"status": "ready", "backend": "redis", "degraded": false})
        )
    );
}

/// SPEC §6/§7: an outage "is visible in `/readyz`" and `/readyz` is 503
/// "with the backend down under `on_error: deny`" — a replica started
/// against a dead Redis must not advertise itself ready to a load balancer
/// just because no request has failed yet.
#[tokio::test]
async fn dead_redis_at_start_shows_in_readyz_without_any_traffic() {
    let upstream = Upstream::start();
    let tg = start_with_dead_redis(&upstream, "deny");
    let http = common::client();
    // Bounded polling: a background probe may take a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let mut last = readyz(&http, &tg).await;
    while last.0 != 503 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        last = readyz(&http, &tg).await;
    }
    let reported = last.0 == 503;
    assert!(
        reported,
        "no request sent, Redis down for 3 s: /readyz still says {last:?}\n{}",
        tg.dump()
    );
    assert_eq!(last.1, degraded_readyz());
    assert_eq!(upstream.count(), 0);
}

/// Script calls Redis has served so far (`INFO commandstats`).
fn script_calls(redis: &RedisServer) -> u64 {
    let info = redis.cli(&["INFO", "commandstats"]);
    info.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// A tenant flooding far over its limit is refused from the exact local
/// deny cache: after the first refusal per worker, its refused requests
/// cost no Redis call, and another tenant is unaffected.
#[tokio::test]
async fn refused_flood_is_answered_without_redis_calls() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let tg = Tiergate::start(&config(
        &upstream.url(),
        &redis_lines(&redis.url()),
        "deny",
        TIERS,
    ));
    let http = common::client();
    let url = format!("{}/flood", tg.proxy_url());
    let statuses = common::burst(&http, &url, &[("x-tenant-id", "flooder")], 3).await;
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 3);
    // One refusal per worker primes each worker's cache (bounded by 8).
    for _ in 0..8 {
        assert_eq!(
            send(&http, "GET", &url, &[("x-tenant-id", "flooder")])
                .await
                .status,
            429
        );
    }
    let before = script_calls(&redis);
    for _ in 0..200 {
        let r = send(&http, "GET", &url, &[("x-tenant-id", "flooder")]).await;
        assert_eq!(r.status, 429);
        assert_eq!(r.header("ratelimit"), Some("\"tenant\";r=0;t=180"));
    }
    let after = script_calls(&redis);
    assert!(
        after - before <= 2,
        "refused requests reached Redis {} times",
        after - before
    );
    // Other tenants still go to Redis and get their full burst.
    let other = common::burst(&http, &url, &[("x-tenant-id", "quiet")], 5).await;
    assert_eq!(other.iter().filter(|s| **s == 200).count(), 3);
    assert_eq!(upstream.count(), 6);
}

/// Raising a refused tenant's limit helps at once on the redis backend: the
/// deny cache's entries no longer match the new limit and are ignored.
#[tokio::test]
async fn raising_an_override_bypasses_the_deny_cache() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let tg = Tiergate::start_with_env(
        &config(&upstream.url(), &redis_lines(&redis.url()), "deny", TIERS),
        &[("TIERGATE_ADMIN_TOKEN", "t0ken")],
    );
    let http = common::client();
    let url = format!("{}/x", tg.proxy_url());
    for expected in [200, 200, 200, 429, 429] {
        assert_eq!(
            send(&http, "GET", &url, &[("x-tenant-id", "acme")])
                .await
                .status,
            expected
        );
    }
    let put = http
        .put(format!("{}/v1/tenants/acme/override", tg.admin_url()))
        .header("authorization", "Bearer t0ken")
        .json(&json!({ "burst": 5 }))
        .send()
        .await
        .expect("admin call");
    assert_eq!(put.status().as_u16(), 200);
    // 3 of 5 tokens are in use: exactly 2 more now.
    for expected in [200, 200, 429] {
        assert_eq!(
            send(&http, "GET", &url, &[("x-tenant-id", "acme")])
                .await
                .status,
            expected
        );
    }
}
