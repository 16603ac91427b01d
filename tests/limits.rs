//! Limiting semantics (SPEC §4) and the rate-limit part of the HTTP contract
//! (SPEC §5), measured exactly against the real `tiergate` binary, a real
//! upstream and, for the redis backend, a real `redis-server` per test.
//!
//! Every scenario is one `async fn(Backend)` and runs twice, once per
//! backend (`memory::*` and `redis::*`), through [`both_backends!`]: the
//! contract is the same whichever backend holds the buckets. Rates are `1/m`
//! or slower, so nothing refills during a test and every count is exact; no
//! assertion depends on how fast the machine is (header values that are
//! "seconds until ..." are checked within a few seconds of the exact figure).

mod common;

use std::collections::BTreeMap;

use common::{RedisServer, Resp, Tiergate, Upstream};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------
// Rig: one tiergate (+ upstream, + redis) per test
// ---------------------------------------------------------------------------

/// Which backend holds the buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// `backend.type: memory`.
    Memory,
    /// `backend.type: redis` against a fresh `redis-server`.
    Redis,
}

impl Backend {
    /// The `backend:` block. Redis gets a generous call timeout and
    /// `on_error: deny` so that a slow or failing Redis shows up as a 503
    /// instead of silently deciding with the local fallback (which would make
    /// exact counts lie).
    fn yaml(self, redis: Option<&RedisServer>) -> String {
        match (self, redis) {
            (Backend::Memory, _) => "backend:\n  type: memory\n".to_string(),
            (Backend::Redis, Some(r)) => format!(
                "backend:\n  type: redis\n  redis:\n    url: \"{}\"\n    timeout: 2s\n  on_error: deny\n",
                r.url()
            ),
            (Backend::Redis, None) => unreachable!("redis backend needs a server"),
        }
    }
}

/// A running tiergate with its upstream (and Redis). Field order is drop
/// order: tiergate goes first, Redis last.
struct Rig {
    tg: Tiergate,
    upstream: Upstream,
    _redis: Option<RedisServer>,
    http: reqwest::Client,
}

/// Helpers on the shared [`Resp`] that only these tests use.
impl Resp {
    /// A header parsed as an integer; panics if absent or not a number.
    fn int(&self, name: &str) -> u64 {
        self.expect_header(name)
            .parse()
            .unwrap_or_else(|e| panic!("`{name}` is not an integer ({e}) in {self:#?}"))
    }
}

impl Rig {
    /// Starts tiergate with `tail` (tiers, routes, identity, ...) appended to
    /// the standard listeners, upstream and backend blocks.
    fn start(backend: Backend, tail: &str) -> Rig {
        Rig::start_with(backend, "", tail, &[])
    }

    /// Like [`start`](Self::start); `server_extra` are extra lines under
    /// `server:` (indented by two spaces), `env` extra environment variables.
    fn start_with(backend: Backend, server_extra: &str, tail: &str, env: &[(&str, &str)]) -> Rig {
        let redis = (backend == Backend::Redis).then(RedisServer::start);
        let upstream = Upstream::start();
        let yaml = format!(
            "server:\n  listen: \"127.0.0.1:0\"\n{server_extra}admin:\n  listen: \"127.0.0.1:0\"\nupstream:\n  url: \"{}\"\n{}{tail}",
            upstream.url(),
            backend.yaml(redis.as_ref()),
        );
        let tg = Tiergate::start_with_env(&yaml, env);
        Rig {
            tg,
            upstream,
            _redis: redis,
            http: common::client(),
        }
    }

    /// Full proxy URL of `path`.
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.tg.proxy_url())
    }

    /// Sends one request through the proxy and reads the whole response.
    async fn send(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
        let resp = common::request(&self.http, method, &self.url(path), headers)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}\n{}", self.tg.dump()));
        Resp::read(resp).await
    }

    /// `GET path` with `headers`.
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        self.send("GET", path, headers).await
    }

    /// `GET path` as `tenant` (header identity).
    async fn get_as(&self, tenant: &str, path: &str) -> Resp {
        self.get(path, &[("x-tenant-id", tenant)]).await
    }

    /// Sends `n` sequential `GET path` as `tenant`; returns the statuses.
    async fn statuses_as(&self, tenant: &str, path: &str, n: usize) -> Vec<u16> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.get_as(tenant, path).await.status);
        }
        out
    }

    /// `GET` on the admin listener; status and body.
    async fn admin_get(&self, path: &str) -> (u16, String) {
        let resp = self
            .http
            .get(format!("{}{path}", self.tg.admin_url()))
            .send()
            .await
            .unwrap_or_else(|e| panic!("admin {path}: {e}"));
        (
            resp.status().as_u16(),
            resp.text().await.expect("admin body"),
        )
    }
}

/// How many of `statuses` equal `code`.
fn count(statuses: &[u16], code: u16) -> usize {
    statuses.iter().filter(|s| **s == code).count()
}

/// Asserts that `actual` (a "seconds until ..." figure, rounded up by the
/// server) is `expected` give or take the few seconds a slow test machine
/// may have taken since the bucket was debited; it can only have shrunk.
#[track_caller]
fn assert_secs(what: &str, actual: u64, expected: u64) {
    assert!(
        actual <= expected && actual + 5 >= expected,
        "{what}: expected {expected} s (at most 5 s less), got {actual}"
    );
}

/// Parses a structured-field `"<name>";k=v;k=v` item into its name and
/// integer parameters.
fn sf_item(value: &str) -> (String, BTreeMap<String, u64>) {
    let mut parts = value.split(';');
    let name = parts.next().unwrap_or_default().trim();
    assert!(
        name.len() >= 2 && name.starts_with('"') && name.ends_with('"'),
        "`{value}`: the bucket name must be a quoted sf-string"
    );
    let params = parts
        .map(|p| {
            let (k, v) = p
                .trim()
                .split_once('=')
                .unwrap_or_else(|| panic!("`{value}`: parameter `{p}` has no value"));
            let v = v
                .parse()
                .unwrap_or_else(|e| panic!("`{value}`: `{k}` is not an integer: {e}"));
            (k.to_string(), v)
        })
        .collect();
    (name[1..name.len() - 1].to_string(), params)
}

/// Checks every rate-limit header of `r` against one bucket: its name,
/// `burst`, the whole tokens left and (approximately) the seconds until it
/// is full again; `window` is the seconds to refill from empty.
#[track_caller]
fn assert_rate_headers(
    r: &Resp,
    bucket: &str,
    burst: u64,
    remaining: u64,
    reset: u64,
    window: u64,
) {
    assert_eq!(r.int("x-ratelimit-limit"), burst, "X-RateLimit-Limit");
    assert_eq!(
        r.int("x-ratelimit-remaining"),
        remaining,
        "X-RateLimit-Remaining"
    );
    assert_secs("X-RateLimit-Reset", r.int("x-ratelimit-reset"), reset);

    let (name, p) = sf_item(r.expect_header("ratelimit-policy"));
    assert_eq!(name, bucket, "RateLimit-Policy bucket");
    assert_eq!(p.get("q"), Some(&burst), "RateLimit-Policy q");
    assert_eq!(p.get("w"), Some(&window), "RateLimit-Policy w");

    let (name, p) = sf_item(r.expect_header("ratelimit"));
    assert_eq!(name, bucket, "RateLimit bucket");
    assert_eq!(p.get("r"), Some(&remaining), "RateLimit r");
    let t = *p.get("t").expect("RateLimit t");
    assert_eq!(
        t,
        r.int("x-ratelimit-reset"),
        "RateLimit t equals X-RateLimit-Reset"
    );
}

/// Checks the shape every 429 shares: JSON body with `error`, a `message`,
/// `x-tiergate-error`, and `Retry-After` (>= 1) equal to
/// `retry_after_seconds`. Returns the body.
#[track_caller]
fn assert_429(r: &Resp) -> Value {
    assert_eq!(r.status, 429, "{r:#?}");
    assert_eq!(r.expect_header("content-type"), "application/json");
    assert_eq!(r.expect_header("x-tiergate-error"), "rate_limited");
    assert!(
        !r.headers.contains_key("x-upstream"),
        "a 429 is tiergate's own answer"
    );
    let retry = r.int("retry-after");
    assert!(retry >= 1, "Retry-After {retry} must be at least 1");
    let body = r.json();
    assert_eq!(body["error"], "rate_limited", "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(
        body["retry_after_seconds"],
        json!(retry),
        "retry_after_seconds equals Retry-After: {body}"
    );
    body
}

/// `tiergate_requests_total` samples: label set -> value.
fn requests_total(metrics: &str) -> BTreeMap<BTreeMap<String, String>, u64> {
    let mut out = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("tiergate_requests_total{") else {
            continue;
        };
        let (labels, value) = rest.split_once("} ").expect("sample line");
        let labels = labels
            .split(',')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once('=').expect("label");
                (k.to_string(), v.trim_matches('"').to_string())
            })
            .collect();
        let value: f64 = value.trim().parse().expect("sample value");
        out.insert(labels, value as u64);
    }
    out
}

/// Label set `{tier, route, decision}`.
fn labels(tier: &str, route: &str, decision: &str) -> BTreeMap<String, String> {
    [("tier", tier), ("route", route), ("decision", decision)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Generates `memory::<scenario>` and `redis::<scenario>` tests.
macro_rules! both_backends {
    ($($scenario:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::$scenario(super::Backend::Memory).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::$scenario(super::Backend::Redis).await
                }
            )*
        }
    };
}

both_backends!(
    concurrent_burst_admits_exactly_burst_and_upstream_sees_only_those,
    over_limit_answers_429_with_every_rate_limit_header_and_field,
    admitted_responses_count_remaining_down_from_burst,
    one_tenants_flood_leaves_another_tenants_burst_untouched,
    route_cost_is_taken_from_the_tenant_bucket,
    request_refused_by_route_bucket_takes_nothing_from_tenant_bucket,
    exempt_route_needs_no_identity_and_is_never_limited,
    tenants_map_sets_tier_and_upstream_gets_tiergates_tier_header,
    anonymous_ip_limits_requests_without_identity_as_ip_tenant,
    ip_limit_refuses_before_identity_with_null_tenant_tier_and_route,
    ip_limit_tokens_spent_by_failed_identity_stay_spent,
    ip_limit_token_is_refunded_when_the_tenant_bucket_refuses,
    requests_total_metric_matches_what_clients_saw,
);

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

/// SPEC §4's first consequence: N simultaneous requests admit exactly
/// `min(N, burst)` — the check-and-debit must be atomic under concurrency,
/// and refused requests must never reach the upstream.
async fn concurrent_burst_admits_exactly_burst_and_upstream_sees_only_those(backend: Backend) {
    let rig = Rig::start(
        backend,
        "tiers:\n  free: { rate: 1/m, burst: 5 }\ndefault_tier: free\n",
    );
    let statuses = common::burst(
        &rig.http,
        &rig.url("/api/items"),
        &[("x-tenant-id", "acme")],
        30,
    )
    .await;
    assert_eq!(count(&statuses, 200), 5, "{statuses:?}\n{}", rig.tg.dump());
    assert_eq!(count(&statuses, 429), 25, "{statuses:?}");
    assert_eq!(
        rig.upstream.count(),
        5,
        "the upstream saw only admitted requests"
    );
}

/// SPEC §5 over-limit row: after `burst` requests a 1/m tenant gets a 429
/// that carries everything a client needs to back off (Retry-After, the
/// JSON body fields) and the rate-limit headers of the refusing bucket.
async fn over_limit_answers_429_with_every_rate_limit_header_and_field(backend: Backend) {
    let rig = Rig::start(
        backend,
        "tiers:\n  free: { rate: 1/m, burst: 3 }\ndefault_tier: free\n",
    );
    for i in 0..3 {
        let r = rig.get_as("acme", "/api/items").await;
        assert_eq!(r.status, 200, "request {i}: {r:#?}\n{}", rig.tg.dump());
    }
    let r = rig.get_as("acme", "/api/items").await;
    let body = assert_429(&r);
    assert_eq!(body["tenant"], "acme", "{body}");
    assert_eq!(body["tier"], "free", "{body}");
    assert_eq!(body["route"], Value::Null, "no route matched: {body}");
    // The next token arrives 60 s after the first debit.
    assert_secs("Retry-After", r.int("retry-after"), 60);
    // Empty bucket: 0 left, full again 3 x 60 s after it was emptied.
    assert_rate_headers(&r, "tenant", 3, 0, 180, 180);
    assert_eq!(rig.upstream.count(), 3, "the upstream never sees a 429");
}

/// SPEC §5 "every response that tiergate decided (admitted or not)": the
/// admitted responses carry the headers too, and Remaining counts down
/// burst-1, burst-2, ... 0 while Reset grows by one interval per request.
async fn admitted_responses_count_remaining_down_from_burst(backend: Backend) {
    let rig = Rig::start(
        backend,
        "tiers:\n  free: { rate: 1/m, burst: 4 }\ndefault_tier: free\n",
    );
    for i in 1..=4u64 {
        let r = rig.get_as("acme", "/api/items").await;
        assert_eq!(r.status, 200, "{r:#?}");
        assert_eq!(
            r.expect_header("x-upstream"),
            "1",
            "the upstream's own answer"
        );
        assert_rate_headers(&r, "tenant", 4, 4 - i, 60 * i, 240);
    }
}

/// SPEC §4: tenants never share a bucket — 50 requests from one tenant do
/// not take a single token from another.
async fn one_tenants_flood_leaves_another_tenants_burst_untouched(backend: Backend) {
    let rig = Rig::start(
        backend,
        "tiers:\n  free: { rate: 1/m, burst: 4 }\ndefault_tier: free\n",
    );
    let url = rig.url("/api/items");
    let flood = common::burst(&rig.http, &url, &[("x-tenant-id", "tenant-a")], 50).await;
    assert_eq!(count(&flood, 200), 4, "{flood:?}");
    assert_eq!(count(&flood, 429), 46, "{flood:?}");
    let b = rig.statuses_as("tenant-b", "/api/items", 10).await;
    assert_eq!(b, [vec![200; 4], vec![429; 6]].concat());
}

/// SPEC §2 `cost`: a costly route takes `cost` tokens from the tenant's
/// bucket, so 6 tokens buy exactly two cost-3 requests, and the emptied
/// bucket also refuses a cost-1 request elsewhere. The waits are exact
/// multiples of the interval.
async fn route_cost_is_taken_from_the_tenant_bucket(backend: Backend) {
    let rig = Rig::start(
        backend,
        "tiers:\n  free: { rate: 1/m, burst: 6 }\ndefault_tier: free\nroutes:\n  - name: export\n    match: { path_prefix: \"/api/export\" }\n    cost: 3\n",
    );
    let r = rig.get_as("acme", "/api/export").await;
    assert_eq!(r.status, 200, "{r:#?}\n{}", rig.tg.dump());
    assert_rate_headers(&r, "tenant", 6, 3, 180, 360);
    let r = rig.get_as("acme", "/api/export").await;
    assert_eq!(r.status, 200, "{r:#?}");
    assert_rate_headers(&r, "tenant", 6, 0, 360, 360);

    let r = rig.get_as("acme", "/api/export").await;
    let body = assert_429(&r);
    assert_eq!(body["route"], "export", "{body}");
    assert_eq!(body["tenant"], "acme", "{body}");
    // Three tokens are needed: three intervals.
    assert_secs("Retry-After (cost 3)", r.int("retry-after"), 180);
    assert_rate_headers(&r, "tenant", 6, 0, 360, 360);

    let r = rig.get_as("acme", "/api/other").await;
    let body = assert_429(&r);
    assert_eq!(body["route"], Value::Null, "{body}");
    assert_secs("Retry-After (cost 1)", r.int("retry-after"), 60);
    assert_eq!(rig.upstream.count(), 2);
}

/// SPEC §4 all-or-nothing: a request refused by its route's own bucket
/// takes nothing from the tenant bucket. Tier burst 5: one export request
/// (5 -> 4), one refused by the export bucket (still 4), then exactly four
/// plain requests are admitted — three would mean the refusal leaked a token.
async fn request_refused_by_route_bucket_takes_nothing_from_tenant_bucket(backend: Backend) {
    let rig = Rig::start(
        backend,
        "tiers:\n  free: { rate: 1/m, burst: 5 }\ndefault_tier: free\nroutes:\n  - name: export\n    match: { path_prefix: \"/api/export\", methods: [POST] }\n    limits:\n      free: { rate: 1/m, burst: 1 }\n",
    );
    let tenant = [("x-tenant-id", "acme")];
    let r = rig.send("POST", "/api/export", &tenant).await;
    assert_eq!(r.status, 200, "{r:#?}\n{}", rig.tg.dump());
    // The route bucket (0 left) is more constraining than the tenant's (4).
    assert_rate_headers(&r, "export", 1, 0, 60, 60);

    let r = rig.send("POST", "/api/export", &tenant).await;
    let body = assert_429(&r);
    assert_eq!(body["route"], "export", "{body}");
    assert_eq!(body["tenant"], "acme", "{body}");
    assert_eq!(body["tier"], "free", "{body}");
    assert_secs("Retry-After", r.int("retry-after"), 60);
    assert_rate_headers(&r, "export", 1, 0, 60, 60);

    // The route only matches POST: a GET there is a plain request.
    let plain = rig.statuses_as("acme", "/api/export", 6).await;
    assert_eq!(plain, [vec![200; 4], vec![429; 2]].concat());
    let r = rig.get_as("acme", "/api/items").await;
    assert_429(&r);
    assert_rate_headers(&r, "tenant", 5, 0, 300, 300);
    assert_eq!(rig.upstream.count(), 5);
}

/// SPEC §3/§2 exempt routes: no identity is read (a garbage bearer token is
/// not an error there although it is one elsewhere), nothing is limited,
/// and no rate-limit headers are sent because nothing was decided.
async fn exempt_route_needs_no_identity_and_is_never_limited(backend: Backend) {
    let rig = Rig::start_with(
        backend,
        "",
        "identity:\n  sources:\n    - type: jwt\n      header: authorization\n      algorithms: [HS256]\n      secret_env: TIERGATE_JWT_SECRET\n    - type: header\n      name: x-tenant-id\ntiers:\n  free: { rate: 1/m, burst: 1 }\ndefault_tier: free\nroutes:\n  - name: health\n    match: { path: \"/health\" }\n    exempt: true\n",
        &[("TIERGATE_JWT_SECRET", "limits-test-secret")],
    );
    for i in 0..20 {
        let headers: &[(&str, &str)] = if i % 2 == 0 {
            &[]
        } else {
            &[("authorization", "Bearer x")]
        };
        let r = rig.get("/health", headers).await;
        assert_eq!(r.status, 200, "request {i}: {r:#?}\n{}", rig.tg.dump());
        assert_eq!(r.expect_header("x-upstream"), "1");
        assert!(!r.has_rate_limit_headers(), "request {i}: {r:#?}");
        assert!(!r.headers.contains_key("x-tiergate-error"), "{r:#?}");
    }
    assert_eq!(rig.upstream.count_path("/health"), 20);

    // Control: the same garbage token elsewhere is a hard 401, and no
    // identity at all is 401 too — the JWT source really is active.
    let r = rig
        .get(
            "/api/items",
            &[("authorization", "Bearer x"), ("x-tenant-id", "acme")],
        )
        .await;
    assert_eq!(r.status, 401, "{r:#?}");
    assert_eq!(r.json()["error"], "invalid_token");
    let r = rig.get("/api/items", &[]).await;
    assert_eq!(r.status, 401, "{r:#?}");
    assert_eq!(r.json()["error"], "unauthenticated");
    assert_eq!(rig.upstream.count(), 20);
}

/// SPEC §3 tier resolution and upstream headers: the `tenants:` map puts a
/// tenant on a bigger tier (exactly that tier's burst), others get
/// `default_tier`, and the upstream learns the tier from tiergate only — a
/// client-sent `x-tenant-tier` neither upgrades the tenant nor reaches it.
async fn tenants_map_sets_tier_and_upstream_gets_tiergates_tier_header(backend: Backend) {
    let rig = Rig::start(
        backend,
        "tiers:\n  free: { rate: 1/m, burst: 2 }\n  pro: { rate: 1/m, burst: 4 }\n  enterprise: { rate: 1/m, burst: 8 }\ndefault_tier: free\ntenants:\n  acme: { tier: pro }\n",
    );
    let spoof = [("x-tenant-id", "acme"), ("x-tenant-tier", "enterprise")];
    let mut acme = Vec::new();
    for _ in 0..10 {
        acme.push(rig.get("/api/items", &spoof).await.status);
    }
    assert_eq!(acme, [vec![200; 4], vec![429; 6]].concat(), "acme is pro");
    let seen = rig.upstream.seen();
    assert_eq!(seen.len(), 4);
    for s in &seen {
        assert_eq!(s.header_all("x-tenant-tier"), ["pro"], "{s:#?}");
        assert_eq!(s.header_all("x-tenant-id"), ["acme"], "{s:#?}");
    }
    rig.upstream.clear();

    let r = rig
        .get(
            "/api/items",
            &[("x-tenant-id", "globex"), ("x-tenant-tier", "pro")],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_rate_headers(&r, "tenant", 2, 1, 60, 120);
    let r = rig.get_as("globex", "/api/items").await;
    assert_eq!(r.status, 200);
    let r = rig.get_as("globex", "/api/items").await;
    let body = assert_429(&r);
    assert_eq!(body["tier"], "free", "{body}");
    let seen = rig.upstream.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.header_all("x-tenant-tier"), ["free"], "{s:#?}");
        assert_eq!(s.header_all("x-tenant-id"), ["globex"], "{s:#?}");
    }
}

/// SPEC §2/§3 `anonymous: ip`: a request with no identity becomes tenant
/// `ip:<addr>` on tier `anonymous`, limited exactly like any tenant, and
/// the upstream is told so.
async fn anonymous_ip_limits_requests_without_identity_as_ip_tenant(backend: Backend) {
    let rig = Rig::start(
        backend,
        "identity:\n  sources:\n    - type: header\n      name: x-tenant-id\n  anonymous: ip\ntiers:\n  anonymous: { rate: 1/m, burst: 2 }\n  free: { rate: 1/m, burst: 5 }\ndefault_tier: free\n",
    );
    for i in 0..2u64 {
        let r = rig.get("/api/items", &[]).await;
        assert_eq!(r.status, 200, "{r:#?}\n{}", rig.tg.dump());
        assert_rate_headers(&r, "tenant", 2, 1 - i, 60 * (i + 1), 120);
    }
    let r = rig.get("/api/items", &[]).await;
    let body = assert_429(&r);
    assert_eq!(body["tenant"], "ip:127.0.0.1", "{body}");
    assert_eq!(body["tier"], "anonymous", "{body}");
    assert_eq!(body["route"], Value::Null, "{body}");

    let seen = rig.upstream.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.header_all("x-tenant-id"), ["ip:127.0.0.1"], "{s:#?}");
        assert_eq!(s.header_all("x-tenant-tier"), ["anonymous"], "{s:#?}");
    }
    // Identified tenants from the same address keep their own bucket.
    let acme = rig.statuses_as("acme", "/api/items", 6).await;
    assert_eq!(acme, [vec![200; 5], vec![429]].concat());
}

/// SPEC §2/§5 `ip_limit`: the per-address guard runs before identity, so
/// once the address is out of tokens every request is 429 with
/// `tenant`/`tier`/`route` null — whatever tenant it claims, and even with
/// no identity at all (not 401).
async fn ip_limit_refuses_before_identity_with_null_tenant_tier_and_route(backend: Backend) {
    let rig = Rig::start_with(
        backend,
        "  ip_limit: { rate: 1/m, burst: 3 }\n",
        "tiers:\n  free: { rate: 1/m, burst: 10 }\ndefault_tier: free\nroutes:\n  - name: export\n    match: { path_prefix: \"/api/export\" }\n",
        &[],
    );
    for i in 0..3 {
        let r = rig.get_as("acme", "/api/items").await;
        assert_eq!(r.status, 200, "request {i}: {r:#?}\n{}", rig.tg.dump());
    }
    // The last admitted request left the ip bucket (0) most constraining.
    let r = rig.get_as("acme", "/api/items").await;
    let body = assert_429(&r);
    assert_eq!(body["tenant"], Value::Null, "{body}");
    assert_eq!(body["tier"], Value::Null, "{body}");
    assert_eq!(body["route"], Value::Null, "{body}");
    assert_secs("Retry-After", r.int("retry-after"), 60);
    assert_rate_headers(&r, "ip", 3, 0, 180, 180);

    for headers in [
        &[("x-tenant-id", "globex")][..],
        &[][..],
        &[("x-tenant-id", "not a valid tenant!")][..],
    ] {
        let r = rig.get("/api/export", headers).await;
        let body = assert_429(&r);
        assert_eq!(
            (&body["tenant"], &body["tier"], &body["route"]),
            (&Value::Null, &Value::Null, &Value::Null),
            "{headers:?}: {body}"
        );
    }
    assert_eq!(rig.upstream.count(), 3);
}

/// `ip_limit` exists to make floods of bad credentials pay (src/stack.rs,
/// step 4): a request rejected by identity (401) keeps the ip token it
/// spent, so after `burst` unauthenticated requests a valid tenant from the
/// same address is refused by the ip bucket.
async fn ip_limit_tokens_spent_by_failed_identity_stay_spent(backend: Backend) {
    let rig = Rig::start_with(
        backend,
        "  ip_limit: { rate: 1/m, burst: 3 }\n",
        "tiers:\n  free: { rate: 1/m, burst: 10 }\ndefault_tier: free\n",
        &[],
    );
    for i in 0..3u64 {
        let r = rig.get("/api/items", &[]).await;
        assert_eq!(r.status, 401, "{r:#?}\n{}", rig.tg.dump());
        assert_eq!(r.json()["error"], "unauthenticated");
        // Decided by tiergate, so it reports the bucket it debited.
        assert_rate_headers(&r, "ip", 3, 2 - i, 60 * (i + 1), 180);
    }
    let r = rig.get_as("acme", "/api/items").await;
    let body = assert_429(&r);
    assert_eq!(body["tenant"], Value::Null, "{body}");
    assert_eq!(rig.upstream.count(), 0);
}

/// SPEC §4 all-or-nothing covers the ip bucket: a request refused by the
/// tenant bucket gives its ip token back. Tenant burst 1, ip burst 3: acme
/// (ip 2 left), acme refused (still 2), globex and initech admitted (0),
/// umbrella refused by ip. Without the refund initech would be refused.
async fn ip_limit_token_is_refunded_when_the_tenant_bucket_refuses(backend: Backend) {
    let rig = Rig::start_with(
        backend,
        "  ip_limit: { rate: 1/m, burst: 3 }\n",
        "tiers:\n  free: { rate: 1/m, burst: 1 }\ndefault_tier: free\n",
        &[],
    );
    assert_eq!(rig.get_as("acme", "/a").await.status, 200);
    let r = rig.get_as("acme", "/a").await;
    let body = assert_429(&r);
    assert_eq!(
        body["tenant"], "acme",
        "refused by the tenant bucket: {body}"
    );
    assert_rate_headers(&r, "tenant", 1, 0, 60, 60);
    assert_eq!(rig.get_as("globex", "/a").await.status, 200);
    let r = rig.get_as("initech", "/a").await;
    assert_eq!(
        r.status, 200,
        "the refused request's ip token came back: {r:#?}"
    );
    let r = rig.get_as("umbrella", "/a").await;
    let body = assert_429(&r);
    assert_eq!(
        body["tenant"],
        Value::Null,
        "refused by the ip bucket: {body}"
    );
    assert_rate_headers(&r, "ip", 3, 0, 180, 180);
    assert_eq!(rig.upstream.count(), 3);
}

/// SPEC §8: `tiergate_requests_total{tier,route,decision}` is what SREs
/// alert on, so after a scripted run its allowed/throttled/unauthenticated
/// counts must equal exactly what the clients saw, label by label.
async fn requests_total_metric_matches_what_clients_saw(backend: Backend) {
    let rig = Rig::start(
        backend,
        "tiers:\n  free: { rate: 1/m, burst: 3 }\n  pro: { rate: 1/m, burst: 6 }\ndefault_tier: free\ntenants:\n  globex: { tier: pro }\nroutes:\n  - name: export\n    match: { path_prefix: \"/api/export\" }\n    limits:\n      pro: { rate: 1/m, burst: 2 }\n",
    );
    let acme = rig.statuses_as("acme", "/api/items", 5).await;
    let globex_export = rig.statuses_as("globex", "/api/export", 4).await;
    let globex_plain = rig.statuses_as("globex", "/api/items", 5).await;
    let anon = rig.get("/api/items", &[]).await.status;
    assert_eq!(acme, [200, 200, 200, 429, 429]);
    assert_eq!(globex_export, [200, 200, 429, 429]);
    // pro burst 6, 2 taken by the export requests.
    assert_eq!(globex_plain, [200, 200, 200, 200, 429]);
    assert_eq!(anon, 401);

    let (status, text) = rig.admin_get("/metrics").await;
    assert_eq!(status, 200);
    let got = requests_total(&text);
    let want: BTreeMap<_, _> = [
        (labels("free", "default", "allowed"), 3),
        (labels("free", "default", "throttled"), 2),
        (labels("pro", "export", "allowed"), 2),
        (labels("pro", "export", "throttled"), 2),
        (labels("pro", "default", "allowed"), 4),
        (labels("pro", "default", "throttled"), 1),
    ]
    .into_iter()
    .collect();
    // SPEC §8 does not say which `tier` a request refused before its tier
    // was known carries; only its decision and route are pinned here.
    let (unauth, decided): (BTreeMap<_, _>, BTreeMap<_, _>) = got
        .into_iter()
        .filter(|(_, v)| *v > 0)
        .partition(|(k, _)| k["decision"] == "unauthenticated");
    assert_eq!(decided, want, "tiergate_requests_total\n{text}");
    assert_eq!(unauth.len(), 1, "{unauth:?}");
    assert!(
        unauth
            .iter()
            .all(|(k, v)| k["route"] == "default" && *v == 1),
        "{unauth:?}"
    );
    let all: Vec<u16> = [acme, globex_export, globex_plain, vec![anon]].concat();
    let allowed: u64 = want
        .iter()
        .filter(|(k, _)| k["decision"] == "allowed")
        .map(|(_, v)| v)
        .sum();
    assert_eq!(allowed as usize, count(&all, 200));
    assert_eq!(allowed as usize, rig.upstream.count());
}
