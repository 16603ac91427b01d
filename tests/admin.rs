//! The admin listener (SPEC §7) against the real binary: authentication of
//! every `/v1` route, the tiers/tenant views, overrides (validation,
//! immediate effect, expiry, audit, persistence on the memory backend,
//! propagation between replicas on the redis backend, catch-up after a cut
//! Redis link), the `tiergate_overrides` gauge, and config reloads through
//! `POST /v1/reload` (including reloads under load).
//!
//! Rates are `1/m` so every count is exact within a test's lifetime;
//! propagation is observed with bounded polling, never with bare sleeps.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{RedisServer, Resp, Tiergate, Upstream, eventually};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The admin token every test starts tiergate with.
const TOKEN: &str = "t0ken";
/// HMAC secret of the JWT source in the claim test.
const JWT_SECRET: &str = "admin-test-secret-0123456789abcdef";

/// Tiers used throughout. `free` is the default (burst 2, one token a
/// minute), `gold` is the usual override target (burst 5), `half` has a
/// fractional rate (for `/v1/tiers`), `enterprise` is large enough that
/// load loops never hit it. `pinned` is on `gold` through the tenants map,
/// `loadco` on `enterprise`.
fn tiers(free_burst: u32) -> String {
    format!(
        "tiers:\n  free: {{ rate: 1/m, burst: {free_burst} }}\n  gold: {{ rate: 1/m, burst: 5 }}\n  half: {{ rate: 0.5/s, burst: 3 }}\n  enterprise: {{ rate: 100000/s, burst: 100000 }}\ndefault_tier: free\ntenants:\n  pinned: {{ tier: gold }}\n  loadco: {{ tier: enterprise }}\n"
    )
}

/// A full config: listeners (`listen` for the proxy), `upstream`, the
/// `backend` block as given, then the tiers with `free_burst`.
fn config_with(upstream: &str, listen: &str, backend: &str, free_burst: u32) -> String {
    format!(
        "server:\n  listen: \"{listen}\"\nadmin:\n  listen: \"127.0.0.1:0\"\nupstream:\n  url: \"{upstream}\"\n{backend}{}",
        tiers(free_burst)
    )
}

/// Memory backend with overrides persisted to `state.json` in the
/// process's working directory.
const MEMORY_BACKEND: &str = "backend:\n  type: memory\n  state_file: \"state.json\"\n";

/// The standard memory-backend config.
fn memory_config(upstream: &str) -> String {
    config_with(upstream, "127.0.0.1:0", MEMORY_BACKEND, 2)
}

/// A redis-backend config for `redis_url`. A generous per-call timeout
/// keeps a loaded machine out of the fallback; `on_error` decides what a
/// failure looks like.
fn redis_config(upstream: &str, redis_url: &str, on_error: &str) -> String {
    let backend = format!(
        "backend:\n  type: redis\n  redis:\n    url: \"{redis_url}\"\n    timeout: 2s\n  on_error: {on_error}\n"
    );
    config_with(upstream, "127.0.0.1:0", &backend, 2)
}

/// Starts tiergate from `yaml` with the admin token set.
fn start(yaml: &str) -> Tiergate {
    Tiergate::start_with_env(yaml, &[("TIERGATE_ADMIN_TOKEN", TOKEN)])
}

/// Helpers on the shared [`Resp`] that only these tests use.
impl Resp {
    /// The error body's `message`, asserting the JSON error shape.
    fn error_message(&self) -> String {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "error responses are JSON: {self:#?}"
        );
        let v = self.json();
        assert!(v["error"].is_string(), "error body has `error`: {self:#?}");
        v["message"]
            .as_str()
            .unwrap_or_else(|| panic!("error body has `message`: {self:#?}"))
            .to_string()
    }
}

/// Sends `method url` with `headers` and an optional body; fully read.
async fn send(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Resp {
    let mut req = common::request(http, method, url, headers);
    if let Some(b) = body {
        req = req.body(b);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{url}: {e:?}"));
    Resp::read(resp).await
}

/// An authenticated client of one instance's admin API.
struct Admin {
    base: String,
    http: reqwest::Client,
}

impl Admin {
    fn new(tg: &Tiergate) -> Admin {
        Admin {
            base: tg.admin_url(),
            http: common::client(),
        }
    }

    /// `method path` with the bearer token; JSON `body` if given.
    async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Resp {
        let auth = format!("Bearer {TOKEN}");
        let mut headers = vec![("authorization", auth.as_str())];
        if body.is_some() {
            headers.push(("content-type", "application/json"));
        }
        let url = format!("{}{path}", self.base);
        send(
            &self.http,
            method,
            &url,
            &headers,
            body.map(|b| b.to_string().into_bytes()),
        )
        .await
    }

    /// `PUT` with a raw body and content type (for malformed payloads).
    async fn put_raw(&self, path: &str, content_type: Option<&str>, body: Vec<u8>) -> Resp {
        let auth = format!("Bearer {TOKEN}");
        let mut headers = vec![("authorization", auth.as_str())];
        if let Some(ct) = content_type {
            headers.push(("content-type", ct));
        }
        let url = format!("{}{path}", self.base);
        send(&self.http, "PUT", &url, &headers, Some(body)).await
    }

    async fn put_override(&self, tenant: &str, body: &Value) -> Resp {
        self.call("PUT", &format!("/v1/tenants/{tenant}/override"), Some(body))
            .await
    }

    /// Sets an override and asserts 200; returns the stored override.
    async fn set_override(&self, tenant: &str, body: &Value) -> Value {
        let r = self.put_override(tenant, body).await;
        assert_eq!(r.status, 200, "PUT override for {tenant}: {r:#?}");
        r.json()
    }

    async fn delete_override(&self, tenant: &str) -> Resp {
        self.call("DELETE", &format!("/v1/tenants/{tenant}/override"), None)
            .await
    }

    /// `GET path`, asserting 200 and a JSON body.
    async fn get_json(&self, path: &str) -> Value {
        let r = self.call("GET", path, None).await;
        assert_eq!(r.status, 200, "GET {path}: {r:#?}");
        r.json()
    }

    async fn tenant(&self, tenant: &str) -> Value {
        self.get_json(&format!("/v1/tenants/{tenant}")).await
    }

    async fn overrides(&self) -> Value {
        self.get_json("/v1/overrides").await
    }

    async fn audit(&self) -> Value {
        self.get_json(&format!("/v1/audit?limit={}", 1000)).await
    }

    async fn reload(&self) -> Resp {
        self.call("POST", "/v1/reload", None).await
    }

    /// The value of the sample `series` (name plus labels, exactly as
    /// exported) in `/metrics`.
    async fn metric(&self, series: &str) -> f64 {
        let r = send(
            &self.http,
            "GET",
            &format!("{}/metrics", self.base),
            &[],
            None,
        )
        .await;
        assert_eq!(r.status, 200, "GET /metrics: {r:#?}");
        r.body
            .lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .map(|v| v.trim().parse::<f64>().expect("numeric sample"))
            })
            .unwrap_or_else(|| panic!("no sample `{series}` in /metrics:\n{}", r.body))
    }
}

/// One proxied `GET /api/items` as `tenant` (header identity).
async fn hit(http: &reqwest::Client, tg: &Tiergate, tenant: &str) -> Resp {
    let url = format!("{}/api/items", tg.proxy_url());
    send(http, "GET", &url, &[("x-tenant-id", tenant)], None).await
}

/// Proxies one request as `tenant` and asserts its status and, when
/// admitted, the remaining-token header.
async fn expect_hit(
    http: &reqwest::Client,
    tg: &Tiergate,
    tenant: &str,
    status: u16,
    remaining: Option<u64>,
) -> Resp {
    let r = hit(http, tg, tenant).await;
    assert_eq!(r.status, status, "request as {tenant}: {r:#?}");
    if let Some(rem) = remaining {
        assert_eq!(
            r.header("x-ratelimit-remaining"),
            Some(rem.to_string().as_str()),
            "remaining after request as {tenant}: {r:#?}"
        );
    }
    r
}

/// RFC 3339 for `now + secs` (negative for the past).
fn rfc3339_in(secs: i64) -> String {
    (OffsetDateTime::now_utc() + time::Duration::seconds(secs))
        .format(&Rfc3339)
        .expect("format time")
}

/// The audit actor tiergate derives from [`TOKEN`]: `sha256:` and the
/// first 12 hex digits of its SHA-256.
fn token_fingerprint() -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(TOKEN.as_bytes());
    let hex: String = d.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Every `/v1` route tiergate has (plus an unknown one and the bare
/// prefix), for the authentication walks.
const V1_PATHS: &[&str] = &[
    "/v1/tiers",
    "/v1/tenants/x",
    "/v1/tenants/x/override",
    "/v1/overrides",
    "/v1/audit",
    "/v1/reload",
    "/v1/unknown",
    "/v1",
];
/// Every method the walks try on each path.
const METHODS: &[&str] = &["GET", "PUT", "DELETE", "POST", "PATCH"];

/// Asserts the three open endpoints answer 200 without any token.
async fn assert_open_endpoints(http: &reqwest::Client, tg: &Tiergate) {
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = send(http, "GET", &format!("{}{path}", tg.admin_url()), &[], None).await;
        assert_eq!(r.status, 200, "{path} is open: {r:#?}");
    }
}

/// Request headers as `(name, value)` pairs.
type Headers = &'static [(&'static str, &'static str)];

/// One refused `PUT`: why, tenant in the path, content type, body, the
/// expected status, and words the error message must contain.
type BadPut<'a> = (
    &'a str,
    &'a str,
    Option<&'a str>,
    Vec<u8>,
    u16,
    &'a [&'a str],
);

/// The bearer check runs before routing, so no route, method or unknown
/// path is reachable without the exact token, and tokens in query strings
/// (which end up in access logs) are never accepted.
#[tokio::test]
async fn every_v1_route_and_method_is_401_without_the_exact_bearer_token() {
    let up = Upstream::start();
    let tg = start(&memory_config(&up.url()));
    let http = common::client();
    let wrong: &[(&str, Headers, &str)] = &[
        ("no header", &[], ""),
        ("wrong token", &[("authorization", "Bearer wr0ng")], ""),
        ("token prefix", &[("authorization", "Bearer t0k")], ""),
        (
            "token plus suffix",
            &[("authorization", "Bearer t0ken2")],
            "",
        ),
        ("empty bearer", &[("authorization", "Bearer ")], ""),
        ("no scheme", &[("authorization", TOKEN)], ""),
        ("basic scheme", &[("authorization", "Basic t0ken")], ""),
        ("query token", &[], "?token=t0ken"),
        ("query access_token", &[], "?access_token=t0ken"),
    ];
    for path in V1_PATHS {
        for method in METHODS {
            for (why, headers, query) in wrong {
                let url = format!("{}{path}{query}", tg.admin_url());
                let r = send(&http, method, &url, headers, Some(b"{}".to_vec())).await;
                assert_eq!(r.status, 401, "{method} {path} with {why}: {r:#?}");
                let msg = r.error_message();
                assert!(!msg.is_empty(), "{method} {path} with {why}: {r:#?}");
                assert_eq!(
                    r.json()["error"],
                    "unauthorized",
                    "{method} {path} with {why}"
                );
                assert_eq!(
                    r.header("www-authenticate"),
                    Some("Bearer"),
                    "{method} {path} with {why}: {r:#?}"
                );
            }
            // The right token gets past authentication on every route.
            let auth = format!("Bearer {TOKEN}");
            let url = format!("{}{path}", tg.admin_url());
            let r = send(&http, method, &url, &[("authorization", &auth)], None).await;
            assert!(
                r.status != 401 && r.status != 403,
                "{method} {path} with the token must pass authentication: {r:#?}"
            );
        }
    }
    let admin = Admin::new(&tg);
    assert_eq!(admin.call("GET", "/v1/unknown", None).await.status, 404);
    assert_eq!(admin.call("GET", "/v1/tiers", None).await.status, 200);
    assert_open_endpoints(&http, &tg).await;
    assert!(
        !tg.logs().iter().any(|l| l.contains(TOKEN)),
        "the admin token never appears in logs:\n{}",
        tg.dump()
    );
}

/// Without the token variable there is no valid credential at all: every
/// `/v1` call is 403 "admin API disabled" (even with a plausible token),
/// while health, readiness and metrics stay open.
#[tokio::test]
async fn every_v1_route_is_403_admin_api_disabled_when_the_token_env_is_unset() {
    let up = Upstream::start();
    let tg = Tiergate::start(&memory_config(&up.url()));
    let http = common::client();
    let auth = format!("Bearer {TOKEN}");
    for path in V1_PATHS {
        for method in METHODS {
            for headers in [&[][..], &[("authorization", auth.as_str())][..]] {
                let url = format!("{}{path}", tg.admin_url());
                let r = send(&http, method, &url, headers, Some(b"{}".to_vec())).await;
                assert_eq!(r.status, 403, "{method} {path} {headers:?}: {r:#?}");
                let msg = r.error_message();
                assert!(
                    msg.contains("admin API disabled"),
                    "{method} {path}: message says the API is disabled: {msg}"
                );
                assert!(
                    msg.contains("TIERGATE_ADMIN_TOKEN"),
                    "message names the variable to set: {msg}"
                );
            }
        }
    }
    assert_open_endpoints(&http, &tg).await;
}

/// `/v1/tiers` is what admin tools and the CLI build on; its shape is a
/// contract (SPEC §7), including rates rendered as `<n>/<unit>`.
#[tokio::test]
async fn get_tiers_returns_default_tier_and_each_tiers_rate_and_burst_exactly() {
    let up = Upstream::start();
    let tg = start(&memory_config(&up.url()));
    let tiers = Admin::new(&tg).get_json("/v1/tiers").await;
    assert_eq!(
        tiers,
        json!({
            "default_tier": "free",
            "tiers": {
                "free": { "rate": "1/m", "burst": 2 },
                "gold": { "rate": "1/m", "burst": 5 },
                "half": { "rate": "0.5/s", "burst": 3 },
                "enterprise": { "rate": "100000/s", "burst": 100000 },
            }
        })
    );
}

/// The point of an override is relief (or restraint) without a deploy: on
/// the replica that took the call it applies to the very next request, a
/// raised burst frees tokens at once, a lowered one never hands out a
/// fresh burst, and deleting it puts the tenant back on its tier with the
/// tokens it already used still counted.
#[tokio::test]
async fn override_applies_to_the_next_request_and_delete_restores_the_tier() {
    let up = Upstream::start();
    let tg = start(&memory_config(&up.url()));
    let admin = Admin::new(&tg);
    let http = common::client();

    // On `free` (burst 2): two admitted, the third refused.
    expect_hit(&http, &tg, "busy", 200, Some(1)).await;
    expect_hit(&http, &tg, "busy", 200, Some(0)).await;
    expect_hit(&http, &tg, "busy", 429, None).await;
    assert_eq!(
        admin.tenant("busy").await,
        json!({
            "tenant": "busy",
            "tier": "free",
            "source": "default",
            "limit": { "rate": "1/m", "burst": 2 },
            "remaining": 0,
            "override": null,
        })
    );

    // Raise: tier gold with burst 10. 2 tokens used, so 8 are free at once.
    let stored = admin
        .set_override(
            "busy",
            &json!({ "tier": "gold", "burst": 10, "reason": "launch week" }),
        )
        .await;
    assert_eq!(stored["tenant"], "busy");
    assert_eq!(stored["tier"], "gold");
    assert_eq!(stored["burst"], 10);
    assert_eq!(stored["rate"], Value::Null);
    assert_eq!(stored["expires_at"], Value::Null);
    assert_eq!(stored["reason"], "launch week");
    let updated = stored["updated_at"].as_str().expect("updated_at");
    OffsetDateTime::parse(updated, &Rfc3339).expect("updated_at is RFC 3339");
    let r = expect_hit(&http, &tg, "busy", 200, Some(7)).await;
    assert_eq!(r.header("x-ratelimit-limit"), Some("10"));
    assert_eq!(
        up.last().expect("forwarded").header("x-tenant-tier"),
        Some("gold")
    );
    let view = admin.tenant("busy").await;
    assert_eq!(view["tier"], "gold");
    assert_eq!(view["source"], "override");
    assert_eq!(view["limit"], json!({ "rate": "1/m", "burst": 10 }));
    assert_eq!(view["remaining"], 7);
    assert_eq!(view["override"], stored);

    // Lower to burst 1 (rate/tier from `free` again): 3 tokens are in use,
    // so nothing is left and nothing is handed out.
    admin.set_override("busy", &json!({ "burst": 1 })).await;
    let r = expect_hit(&http, &tg, "busy", 429, None).await;
    assert_eq!(r.header("x-ratelimit-limit"), Some("1"));
    let view = admin.tenant("busy").await;
    assert_eq!(view["tier"], "free");
    assert_eq!(view["source"], "default");
    assert_eq!(view["limit"], json!({ "rate": "1/m", "burst": 1 }));
    assert_eq!(view["remaining"], 0);
    assert_eq!(view["override"]["burst"], 1);
    assert_eq!(view["override"]["tier"], Value::Null);

    // Delete: back to free burst 2, still with 3 used, still refused.
    let r = admin.delete_override("busy").await;
    assert_eq!(r.status, 204, "{r:#?}");
    assert!(r.body.is_empty(), "204 has no body: {r:#?}");
    let r = expect_hit(&http, &tg, "busy", 429, None).await;
    assert_eq!(r.header("x-ratelimit-limit"), Some("2"));
    let view = admin.tenant("busy").await;
    assert_eq!(view["source"], "default");
    assert_eq!(view["override"], Value::Null);
    assert_eq!(view["limit"], json!({ "rate": "1/m", "burst": 2 }));
    assert_eq!(admin.overrides().await, json!({ "overrides": [] }));

    // A second delete has nothing to delete.
    let r = admin.delete_override("busy").await;
    assert_eq!(r.status, 404, "{r:#?}");
    assert!(r.error_message().contains("no override"), "{r:#?}");
}

/// `source` tells an admin *why* a tenant is on its tier; every branch of
/// the resolution order (override → claim → tenants map → default) must be
/// reported, with `claim` only after a verified token was actually seen.
#[tokio::test]
async fn tenant_view_reports_override_claim_config_and_default_sources() {
    let up = Upstream::start();
    let yaml = format!(
        "server:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\nupstream:\n  url: \"{}\"\nidentity:\n  sources:\n    - type: jwt\n      header: authorization\n      algorithms: [HS256]\n      secret_env: TIERGATE_JWT_SECRET\n      tenant_claim: tenant_id\n      tier_claim: tier\n    - type: header\n      name: x-tenant-id\n  anonymous: reject\n{MEMORY_BACKEND}{}",
        up.url(),
        tiers(2)
    );
    let tg = Tiergate::start_with_env(
        &yaml,
        &[
            ("TIERGATE_ADMIN_TOKEN", TOKEN),
            ("TIERGATE_JWT_SECRET", JWT_SECRET),
        ],
    );
    let admin = Admin::new(&tg);
    let http = common::client();

    let v = admin.tenant("nobody").await;
    assert_eq!(
        (v["tier"].as_str(), v["source"].as_str()),
        (Some("free"), Some("default"))
    );
    assert_eq!(v["remaining"], 2, "a tenant never seen has a full bucket");
    let v = admin.tenant("pinned").await;
    assert_eq!(
        (v["tier"].as_str(), v["source"].as_str()),
        (Some("gold"), Some("config"))
    );
    assert_eq!(v["limit"], json!({ "rate": "1/m", "burst": 5 }));

    // Before any token for `jwtco` was seen, nothing is claimed.
    let v = admin.tenant("jwtco").await;
    assert_eq!(v["source"], "default");

    let exp = OffsetDateTime::now_utc().unix_timestamp() + 3600;
    let token = encode(
        &Header::new(Algorithm::HS256),
        &json!({ "tenant_id": "jwtco", "tier": "gold", "exp": exp }),
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("sign token");
    let bearer = format!("Bearer {token}");
    let url = format!("{}/api/items", tg.proxy_url());
    let r = send(&http, "GET", &url, &[("authorization", &bearer)], None).await;
    assert_eq!(r.status, 200, "{r:#?}");
    assert_eq!(r.header("x-ratelimit-remaining"), Some("4"));

    let v = admin.tenant("jwtco").await;
    assert_eq!(
        v,
        json!({
            "tenant": "jwtco",
            "tier": "gold",
            "source": "claim",
            "limit": { "rate": "1/m", "burst": 5 },
            "remaining": 4,
            "override": null,
        })
    );

    // An override outranks the claim.
    let stored = admin
        .set_override("jwtco", &json!({ "tier": "free" }))
        .await;
    let v = admin.tenant("jwtco").await;
    assert_eq!(v["tier"], "free");
    assert_eq!(v["source"], "override");
    assert_eq!(v["override"], stored);
    assert_eq!(v["limit"], json!({ "rate": "1/m", "burst": 2 }));
    assert_eq!(v["remaining"], 1, "1 of 2 in use after the gold request");
}

/// A bad admin call must be refused with a message that says what is
/// wrong, and must not half-write anything: the override list and the
/// audit log are exactly as before.
#[tokio::test]
async fn invalid_override_payloads_are_refused_with_a_clear_message_and_write_nothing() {
    let up = Upstream::start();
    let tg = start(&memory_config(&up.url()));
    let admin = Admin::new(&tg);
    admin
        .set_override("existing", &json!({ "tier": "gold", "reason": "baseline" }))
        .await;
    let overrides_before = admin.overrides().await;
    let audit_before = admin.audit().await;
    assert_eq!(audit_before["entries"].as_array().map(Vec::len), Some(1));

    let json_ct = Some("application/json");
    let past = rfc3339_in(-60);
    let cases: Vec<BadPut> = vec![
        (
            "unknown tier",
            "existing",
            json_ct,
            br#"{"tier":"platinum"}"#.to_vec(),
            400,
            &["unknown tier", "platinum", "free"],
        ),
        (
            "bad rate",
            "existing",
            json_ct,
            br#"{"rate":"fast"}"#.to_vec(),
            400,
            &["rate", "fast"],
        ),
        (
            "zero rate",
            "existing",
            json_ct,
            br#"{"rate":"0/s"}"#.to_vec(),
            400,
            &["rate", "greater than 0"],
        ),
        (
            "bad rate unit",
            "existing",
            json_ct,
            br#"{"rate":"5/fortnight"}"#.to_vec(),
            400,
            &["rate", "fortnight"],
        ),
        (
            "burst 0",
            "existing",
            json_ct,
            br#"{"burst":0}"#.to_vec(),
            400,
            &["burst"],
        ),
        (
            "negative burst",
            "existing",
            json_ct,
            br#"{"burst":-3}"#.to_vec(),
            400,
            &["burst"],
        ),
        (
            "burst of the wrong type",
            "existing",
            json_ct,
            br#"{"burst":"ten"}"#.to_vec(),
            400,
            &["ten"],
        ),
        (
            "bad tenant id",
            "a*b",
            json_ct,
            br#"{"tier":"gold"}"#.to_vec(),
            400,
            &["tenant"],
        ),
        (
            "percent-encoded bad tenant id",
            "a%2Ab",
            json_ct,
            br#"{"tier":"gold"}"#.to_vec(),
            400,
            &["tenant"],
        ),
        (
            "empty body",
            "existing",
            json_ct,
            Vec::new(),
            400,
            &["empty"],
        ),
        (
            "empty object",
            "existing",
            json_ct,
            b"{}".to_vec(),
            400,
            &["tier", "rate", "burst"],
        ),
        (
            "only a reason",
            "existing",
            json_ct,
            br#"{"reason":"why not"}"#.to_vec(),
            400,
            &["at least one"],
        ),
        (
            "malformed JSON",
            "existing",
            json_ct,
            br#"{"tier": "gold""#.to_vec(),
            400,
            &["JSON"],
        ),
        (
            "not an object",
            "existing",
            json_ct,
            b"[1,2]".to_vec(),
            400,
            &["JSON"],
        ),
        (
            "unknown field",
            "existing",
            json_ct,
            br#"{"tier":"gold","colour":"red"}"#.to_vec(),
            400,
            &["colour"],
        ),
        (
            "malformed expires_at",
            "existing",
            json_ct,
            br#"{"tier":"gold","expires_at":"next tuesday"}"#.to_vec(),
            400,
            &["expires_at", "RFC 3339"],
        ),
        (
            "expires_at in the past",
            "existing",
            json_ct,
            format!(r#"{{"tier":"gold","expires_at":"{past}"}}"#).into_bytes(),
            400,
            &["expires_at", "past"],
        ),
        (
            "text/plain",
            "existing",
            Some("text/plain"),
            br#"{"tier":"gold"}"#.to_vec(),
            415,
            &["application/json"],
        ),
        (
            "form content type",
            "existing",
            Some("application/x-www-form-urlencoded"),
            b"tier=gold".to_vec(),
            415,
            &["application/json"],
        ),
        (
            "no content type",
            "existing",
            None,
            br#"{"tier":"gold"}"#.to_vec(),
            415,
            &["application/json"],
        ),
        (
            "100 KiB body",
            "existing",
            json_ct,
            format!(r#"{{"tier":"gold","reason":"{}"}}"#, "x".repeat(100 * 1024)).into_bytes(),
            413,
            &["limited"],
        ),
    ];
    for (why, tenant, ct, body, status, needles) in cases {
        let r = admin
            .put_raw(&format!("/v1/tenants/{tenant}/override"), ct, body)
            .await;
        assert_eq!(r.status, status, "{why}: {r:#?}");
        let msg = r.error_message();
        for n in needles {
            assert!(
                msg.contains(n),
                "{why}: message `{msg}` should mention `{n}`"
            );
        }
        assert_eq!(
            admin.overrides().await,
            overrides_before,
            "{why} wrote nothing"
        );
        assert_eq!(admin.audit().await, audit_before, "{why} audited nothing");
    }
    // A bad tenant id is refused on DELETE and GET too.
    let r = admin.delete_override("a*b").await;
    assert_eq!(r.status, 400, "{r:#?}");
    let r = admin.call("GET", "/v1/tenants/a*b", None).await;
    assert_eq!(r.status, 400, "{r:#?}");
    assert_eq!(admin.audit().await, audit_before);
    assert_eq!(
        admin.tenant("existing").await["override"]["reason"],
        "baseline",
        "the valid override is untouched"
    );
}

/// A time-boxed override ("double their limit until Friday") must end by
/// itself: it stops applying at `expires_at` with no admin action, drops
/// out of the list and the gauge, and the audit says it expired.
#[tokio::test]
async fn override_stops_applying_at_expires_at_and_the_expiry_is_audited() {
    let up = Upstream::start();
    let tg = start(&memory_config(&up.url()));
    let admin = Admin::new(&tg);
    let http = common::client();

    let expires = rfc3339_in(2);
    let stored = admin
        .set_override(
            "brief",
            &json!({ "burst": 10, "expires_at": expires, "reason": "demo" }),
        )
        .await;
    let stored_expiry = stored["expires_at"].as_str().expect("expires_at");
    assert_eq!(
        OffsetDateTime::parse(stored_expiry, &Rfc3339).expect("RFC 3339"),
        OffsetDateTime::parse(&expires, &Rfc3339).expect("RFC 3339"),
    );
    assert_eq!(admin.metric("tiergate_overrides").await, 1.0);
    // While active: three requests, more than `free` would allow.
    for left in [9, 8, 7] {
        let r = expect_hit(&http, &tg, "brief", 200, Some(left)).await;
        assert_eq!(r.header("x-ratelimit-limit"), Some("10"));
    }

    // After expiry, with nobody deleting it: back on free (3 used of 2).
    let gone = eventually(Duration::from_secs(4), || {
        let admin = &admin;
        async move {
            let v = admin.tenant("brief").await;
            v["override"].is_null() && v["limit"]["burst"] == 2
        }
    })
    .await;
    assert!(
        gone,
        "the override still applies after expires_at:\n{}",
        tg.dump()
    );
    let r = expect_hit(&http, &tg, "brief", 429, None).await;
    assert_eq!(r.header("x-ratelimit-limit"), Some("2"));
    assert_eq!(admin.overrides().await, json!({ "overrides": [] }));

    // The sweeper removes it from the store with an `expire` entry.
    let audited = eventually(Duration::from_secs(3), || {
        let admin = &admin;
        async move {
            admin.audit().await["entries"]
                .as_array()
                .is_some_and(|e| e.iter().any(|x| x["action"] == "expire"))
        }
    })
    .await;
    assert!(audited, "no `expire` audit entry:\n{}", tg.dump());
    let audit = admin.audit().await;
    let entry = &audit["entries"][0];
    assert_eq!(entry["action"], "expire", "{audit:#}");
    assert_eq!(entry["tenant"], "brief");
    assert_eq!(entry["before"]["burst"], 10);
    assert_eq!(entry["after"], Value::Null);
    assert_eq!(entry["actor"], "system");
    assert_eq!(admin.metric("tiergate_overrides").await, 0.0);
    // Nothing left to delete.
    assert_eq!(admin.delete_override("brief").await.status, 404);
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(tg.dir().join("state.json")).expect("state file"),
    )
    .expect("state file is JSON");
    assert_eq!(
        state["overrides"],
        json!({}),
        "expired override left the file"
    );
}

/// Who changed what, when and why is the audit's whole purpose; it must
/// identify the admin without ever storing the secret token itself.
#[tokio::test]
async fn audit_records_each_change_with_before_after_reason_and_token_fingerprint() {
    let up = Upstream::start();
    let tg = start(&memory_config(&up.url()));
    let admin = Admin::new(&tg);
    let started = OffsetDateTime::now_utc() - time::Duration::seconds(1);

    let first = admin
        .set_override("acme", &json!({ "tier": "gold", "reason": "contract" }))
        .await;
    let second = admin
        .set_override(
            "acme",
            &json!({ "rate": "2/m", "burst": 7, "reason": "bump" }),
        )
        .await;
    assert_eq!(admin.delete_override("acme").await.status, 204);

    let r = admin.call("GET", "/v1/audit", None).await;
    assert_eq!(r.status, 200, "{r:#?}");
    assert!(
        !r.body.contains(TOKEN),
        "the token is never in the audit: {}",
        r.body
    );
    let entries = r.json()["entries"].as_array().cloned().expect("entries");
    assert_eq!(entries.len(), 3, "{entries:#?}");
    let fingerprint = token_fingerprint();
    for e in &entries {
        let at = OffsetDateTime::parse(e["at"].as_str().expect("at"), &Rfc3339).expect("RFC 3339");
        assert!(at >= started && at <= OffsetDateTime::now_utc(), "{e:#}");
        assert_eq!(e["tenant"], "acme");
        assert_eq!(e["actor"], fingerprint.as_str(), "{e:#}");
    }
    // Newest first.
    let (del, upd, set) = (&entries[0], &entries[1], &entries[2]);
    assert_eq!(set["action"], "set");
    assert_eq!(set["before"], Value::Null);
    assert_eq!(set["after"]["tier"], "gold");
    assert_eq!(set["reason"], "contract");
    assert_eq!(upd["action"], "set");
    assert_eq!(upd["before"]["tier"], "gold");
    assert_eq!(upd["after"]["rate"], "2/m");
    assert_eq!(upd["after"]["burst"], 7);
    assert_eq!(upd["reason"], "bump");
    assert_eq!(del["action"], "delete");
    assert_eq!(del["before"]["burst"], 7);
    assert_eq!(del["after"], Value::Null);
    // before/after hold the stored override (without the tenant key).
    let mut first_doc = first.clone();
    first_doc.as_object_mut().expect("object").remove("tenant");
    assert_eq!(set["after"], first_doc);
    let mut second_doc = second.clone();
    second_doc.as_object_mut().expect("object").remove("tenant");
    assert_eq!(upd["after"], second_doc);

    let one = admin.get_json("/v1/audit?limit=1").await;
    assert_eq!(one["entries"].as_array().map(Vec::len), Some(1));
    assert_eq!(one["entries"][0], *del);
    for bad in ["limit=0", "limit=x", "limit=-1", "limit=", "lmit=3"] {
        let r = admin.call("GET", &format!("/v1/audit?{bad}"), None).await;
        assert_eq!(r.status, 400, "?{bad}: {r:#?}");
        assert!(r.error_message().contains("limit"), "?{bad}: {r:#?}");
    }
    let state = std::fs::read_to_string(tg.dir().join("state.json")).expect("state file");
    assert!(!state.contains(TOKEN), "the token is never persisted");
    assert!(
        !tg.logs().iter().any(|l| l.contains(TOKEN)),
        "the token is never logged:\n{}",
        tg.dump()
    );
}

/// Files in `dir` that look like leftovers of an unfinished atomic write.
fn temp_files(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n != "tiergate.yaml" && n != "state.json")
        .collect()
}

/// On the memory backend the state file is the only durable copy: it must
/// be complete JSON after every write (atomic replace, no temp files left
/// behind) and a restarted process must come back with the same overrides
/// and audit.
#[tokio::test]
async fn memory_backend_overrides_survive_a_restart_via_an_atomically_written_state_file() {
    let up = Upstream::start();
    let mut tg = start(&memory_config(&up.url()));
    let http = common::client();
    let state_path = tg.dir().join("state.json");
    {
        let admin = Admin::new(&tg);
        let steps: Vec<(&str, Option<Value>)> = vec![
            ("keep", Some(json!({ "burst": 4, "reason": "kept" }))),
            ("drop", Some(json!({ "tier": "gold" }))),
            ("keep", Some(json!({ "burst": 3, "reason": "kept" }))),
            ("drop", None),
        ];
        for (tenant, body) in steps {
            match &body {
                Some(b) => {
                    admin.set_override(tenant, b).await;
                }
                None => assert_eq!(admin.delete_override(tenant).await.status, 204),
            }
            let text = std::fs::read_to_string(&state_path).expect("state file exists");
            let state: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("state file is not valid JSON ({e}):\n{text}"));
            let has = state["overrides"].get(tenant).is_some();
            assert_eq!(has, body.is_some(), "state after {tenant}: {state:#}");
            assert_eq!(temp_files(tg.dir()), Vec::<String>::new());
        }
        expect_hit(&http, &tg, "keep", 200, Some(2)).await;
    }
    let before = Admin::new(&tg).overrides().await;
    let audit_before = Admin::new(&tg).audit().await;

    tg.restart();
    let admin = Admin::new(&tg);
    assert_eq!(admin.overrides().await, before);
    assert_eq!(admin.audit().await, audit_before, "the audit survives too");
    let v = admin.tenant("keep").await;
    assert_eq!(v["override"]["burst"], 3);
    assert_eq!(v["limit"]["burst"], 3);
    // Buckets are in memory (fresh after a restart); the override is not.
    let r = expect_hit(&http, &tg, "keep", 200, Some(2)).await;
    assert_eq!(r.header("x-ratelimit-limit"), Some("3"));
    assert_eq!(admin.metric("tiergate_overrides").await, 1.0);
    assert_eq!(temp_files(tg.dir()), Vec::<String>::new());
}

/// `tiergate_overrides` feeds the "overrides in force" dashboard panel; it
/// must follow sets, replacements, deletes and expiries exactly.
#[tokio::test]
async fn overrides_gauge_equals_the_number_of_active_overrides() {
    let up = Upstream::start();
    let tg = start(&memory_config(&up.url()));
    let admin = Admin::new(&tg);
    let gauge = || admin.metric("tiergate_overrides");
    assert_eq!(gauge().await, 0.0);
    admin.set_override("a", &json!({ "tier": "gold" })).await;
    assert_eq!(gauge().await, 1.0);
    admin.set_override("b", &json!({ "burst": 9 })).await;
    assert_eq!(gauge().await, 2.0);
    admin.set_override("a", &json!({ "burst": 3 })).await;
    assert_eq!(gauge().await, 2.0, "replacing is not adding");
    admin
        .set_override("c", &json!({ "burst": 9, "expires_at": rfc3339_in(1) }))
        .await;
    assert_eq!(gauge().await, 3.0);
    assert_eq!(admin.delete_override("b").await.status, 204);
    assert_eq!(gauge().await, 2.0);
    assert_eq!(admin.delete_override("b").await.status, 404);
    assert_eq!(gauge().await, 2.0);
    let expired = eventually(Duration::from_secs(4), || {
        let admin = &admin;
        async move { admin.metric("tiergate_overrides").await == 1.0 }
    })
    .await;
    assert!(expired, "gauge still counts an expired override");
    let listed = admin.overrides().await["overrides"]
        .as_array()
        .map(Vec::len);
    assert_eq!(listed, Some(1));
}

/// Two replicas on one Redis are one system: an override made through one
/// must govern the other within a second (SPEC §7), both in the admin view
/// and in what the proxy admits, and survive restarts of both.
#[tokio::test]
async fn redis_override_set_on_one_replica_applies_on_the_other_within_a_second() {
    let redis = RedisServer::start();
    let up = Upstream::start();
    let yaml = redis_config(&up.url(), &redis.url(), "deny");
    let mut a = start(&yaml);
    let mut b = start(&yaml);
    let http = common::client();
    {
        let (admin_a, admin_b) = (Admin::new(&a), Admin::new(&b));
        assert_eq!(admin_b.tenant("shared").await["limit"]["burst"], 2);

        let stored = admin_a
            .set_override("shared", &json!({ "burst": 50, "reason": "replicated" }))
            .await;
        let sent = Instant::now();
        let admitted = std::cell::Cell::new(0u64);
        let applied = eventually(Duration::from_secs(1), || {
            let (admin_b, b, http, admitted) = (&admin_b, &b, &http, &admitted);
            async move {
                let view = admin_b.tenant("shared").await;
                let r = hit(http, b, "shared").await;
                if r.status == 200 {
                    admitted.set(admitted.get() + 1);
                }
                view["limit"]["burst"] == 50 && r.header("x-ratelimit-limit") == Some("50")
            }
        })
        .await;
        assert!(
            applied,
            "B did not apply A's override within 1 s (waited {:?})\nA:\n{}\nB:\n{}",
            sent.elapsed(),
            a.dump(),
            b.dump()
        );
        // One shared bucket: both replicas see the same remaining tokens.
        let view_b = admin_b.tenant("shared").await;
        assert_eq!(view_b["override"], stored);
        assert_eq!(view_b["source"], "default");
        let admitted = admitted.get();
        assert_eq!(view_b["remaining"], 50 - admitted);
        assert_eq!(admin_a.tenant("shared").await["remaining"], 50 - admitted);
        assert_eq!(admin_b.metric("tiergate_overrides").await, 1.0);

        // Deletion propagates the same way.
        assert_eq!(admin_a.delete_override("shared").await.status, 204);
        let removed = eventually(Duration::from_secs(1), || {
            let admin_b = &admin_b;
            async move { admin_b.tenant("shared").await["override"].is_null() }
        })
        .await;
        assert!(removed, "B kept a deleted override:\n{}", b.dump());
        assert_eq!(admin_b.metric("tiergate_overrides").await, 0.0);

        // And a change made through B reaches A.
        admin_b
            .set_override("durable", &json!({ "tier": "gold" }))
            .await;
        let on_a = eventually(Duration::from_secs(1), || {
            let admin_a = &admin_a;
            async move { admin_a.tenant("durable").await["tier"] == "gold" }
        })
        .await;
        assert!(on_a, "A did not apply B's override:\n{}", a.dump());
    }

    a.restart();
    b.restart();
    for tg in [&a, &b] {
        let admin = Admin::new(tg);
        let list = admin.overrides().await;
        let tenants: Vec<&str> = list["overrides"]
            .as_array()
            .expect("list")
            .iter()
            .map(|o| o["tenant"].as_str().expect("tenant"))
            .collect();
        assert_eq!(tenants, ["durable"], "{list:#}");
        let v = admin.tenant("durable").await;
        assert_eq!(
            (v["tier"].as_str(), v["source"].as_str()),
            (Some("gold"), Some("override"))
        );
        let r = hit(&http, tg, "durable").await;
        assert_eq!(r.header("x-ratelimit-limit"), Some("5"), "{r:#?}");
    }
    let audit = Admin::new(&a).audit().await;
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["action"].as_str().expect("action"))
        .collect();
    assert_eq!(actions, ["set", "delete", "set"], "{audit:#}");
}

/// On Redis every replica runs the expiry sweeper; an expired override must
/// stop applying everywhere and be deleted exactly once (compare-and-delete),
/// so the shared audit shows one `expire`, not one per replica.
#[tokio::test]
async fn redis_override_expires_on_every_replica_with_a_single_expire_audit_entry() {
    let redis = RedisServer::start();
    let up = Upstream::start();
    let yaml = redis_config(&up.url(), &redis.url(), "deny");
    let a = start(&yaml);
    let b = start(&yaml);
    let (admin_a, admin_b) = (Admin::new(&a), Admin::new(&b));
    admin_a
        .set_override(
            "fleeting",
            &json!({ "tier": "gold", "expires_at": rfc3339_in(2) }),
        )
        .await;
    let seen_on_b = eventually(Duration::from_secs(1), || {
        let admin_b = &admin_b;
        async move { admin_b.tenant("fleeting").await["source"] == "override" }
    })
    .await;
    assert!(seen_on_b, "B never applied the override:\n{}", b.dump());

    let expired_everywhere = eventually(Duration::from_secs(4), || {
        let (admin_a, admin_b) = (&admin_a, &admin_b);
        async move {
            let (va, vb) = (
                admin_a.tenant("fleeting").await,
                admin_b.tenant("fleeting").await,
            );
            va["override"].is_null() && vb["override"].is_null() && vb["tier"] == "free"
        }
    })
    .await;
    assert!(expired_everywhere, "override outlived expires_at");
    // The sweepers (every 500 ms) then delete it from Redis and the gauges.
    let settled = eventually(Duration::from_secs(2), || {
        let (admin_a, admin_b, redis) = (&admin_a, &admin_b, &redis);
        async move {
            redis.cli(&["HLEN", "tiergate:{!admin}:overrides"]) == "0"
                && admin_a.metric("tiergate_overrides").await == 0.0
                && admin_b.metric("tiergate_overrides").await == 0.0
        }
    })
    .await;
    assert!(
        settled,
        "the expired override is still stored or counted: HLEN {}",
        redis.cli(&["HLEN", "tiergate:{!admin}:overrides"])
    );
    let audit = admin_b.audit().await;
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["action"].as_str().expect("action"))
        .collect();
    assert_eq!(actions, ["expire", "set"], "{audit:#}");
    assert_eq!(audit["entries"][0]["actor"], "system");
    assert_eq!(audit["entries"][0]["before"]["tier"], "gold");
}

/// A TCP forwarder in front of Redis whose link can be cut: every open
/// connection is closed and new ones are accepted and closed at once until
/// [`restore`](Self::restore). Runs on its own thread and runtime so that
/// blocking harness calls in the test cannot stall it.
struct Forwarder {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    kill: Arc<tokio::sync::watch::Sender<u64>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Forwarder {
    fn start(target: SocketAddr) -> Forwarder {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind forwarder");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("forwarder addr");
        let cut = Arc::new(AtomicBool::new(false));
        let (kill, _) = tokio::sync::watch::channel(0u64);
        let kill = Arc::new(kill);
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (cut2, kill2) = (cut.clone(), kill.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("forwarder runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let accept = async {
                    loop {
                        let Ok((mut down, _)) = listener.accept().await else {
                            continue;
                        };
                        // Subscribe before reading the flag: a cut either
                        // is seen here or kills the connection later.
                        let mut killed = kill2.subscribe();
                        if cut2.load(Ordering::SeqCst) {
                            drop(down);
                            continue;
                        }
                        tokio::spawn(async move {
                            let Ok(mut up) = tokio::net::TcpStream::connect(target).await else {
                                return;
                            };
                            tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                                _ = killed.changed() => {}
                            }
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stop_rx => {}
                }
            });
        });
        Forwarder {
            addr,
            cut,
            kill,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// Closes every forwarded connection and refuses new ones.
    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.kill.send_modify(|g| *g += 1);
    }

    /// Lets connections through again.
    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Pub/sub is fire-and-forget: a replica that was cut off when a change
/// was announced never gets that message. It must catch up by itself as
/// soon as its Redis link is back (SPEC §7: every replica within a second),
/// not wait for the next unrelated change.
#[tokio::test]
async fn replica_cut_off_from_redis_during_a_change_applies_it_after_reconnecting() {
    let redis = RedisServer::start();
    let up = Upstream::start();
    let fwd = Forwarder::start(redis.addr());
    let a = start(&redis_config(&up.url(), &redis.url(), "local"));
    let b = start(&redis_config(&up.url(), &fwd.url(), "local"));
    let (admin_a, admin_b) = (Admin::new(&a), Admin::new(&b));

    // The link works: a first change reaches B.
    admin_a.set_override("warmup", &json!({ "burst": 3 })).await;
    let synced = eventually(Duration::from_secs(1), || {
        let admin_b = &admin_b;
        async move { !admin_b.tenant("warmup").await["override"].is_null() }
    })
    .await;
    assert!(
        synced,
        "B never synced through the forwarder:\n{}",
        b.dump()
    );

    fwd.cut();
    let stored = admin_a
        .set_override("missed", &json!({ "tier": "gold", "reason": "while cut" }))
        .await;
    assert_eq!(admin_a.delete_override("warmup").await.status, 204);
    let v = admin_b.tenant("missed").await;
    assert!(
        v["override"].is_null(),
        "B cannot have heard of the change while cut off: {v:#}"
    );
    // Stay cut long enough for B's reconnect attempts to fail a few times.
    tokio::time::sleep(Duration::from_millis(600)).await;

    fwd.restore();
    let restored = Instant::now();
    let caught_up = eventually(Duration::from_secs(2), || {
        let admin_b = &admin_b;
        async move {
            let v = admin_b.tenant("missed").await;
            let w = admin_b.tenant("warmup").await;
            v["tier"] == "gold" && v["source"] == "override" && w["override"].is_null()
        }
    })
    .await;
    assert!(
        caught_up,
        "B did not catch up within 2 s of the link coming back (waited {:?})\nB: {:#}\nB logs:\n{}",
        restored.elapsed(),
        admin_b.overrides().await,
        b.dump()
    );
    assert_eq!(admin_b.tenant("missed").await["override"], stored);
    assert_eq!(admin_b.metric("tiergate_overrides").await, 1.0);
    let http = common::client();
    let r = hit(&http, &b, "missed").await;
    assert_eq!(r.status, 200, "{r:#?}");
    assert_eq!(r.header("x-ratelimit-limit"), Some("5"), "{r:#?}");
}

/// Reloading is how tier changes ship without a restart: a valid file
/// applies at once and exactly, and is counted as `ok`.
#[tokio::test]
async fn reload_applies_a_raised_burst_exactly_and_counts_ok() {
    let up = Upstream::start();
    let tg = start(&memory_config(&up.url()));
    let admin = Admin::new(&tg);
    let http = common::client();
    expect_hit(&http, &tg, "grow", 200, Some(1)).await;
    expect_hit(&http, &tg, "grow", 200, Some(0)).await;
    expect_hit(&http, &tg, "grow", 429, None).await;

    tg.write_config(&config_with(&up.url(), "127.0.0.1:0", MEMORY_BACKEND, 5));
    let r = admin.reload().await;
    assert_eq!(r.status, 200, "{r:#?}");
    assert_eq!(r.json()["restart_required"], json!([]), "{r:#?}");
    // 2 of 5 used: exactly three more.
    for left in [2, 1, 0] {
        let r = expect_hit(&http, &tg, "grow", 200, Some(left)).await;
        assert_eq!(r.header("x-ratelimit-limit"), Some("5"));
    }
    expect_hit(&http, &tg, "grow", 429, None).await;
    assert_eq!(
        admin.get_json("/v1/tiers").await["tiers"]["free"],
        json!({ "rate": "1/m", "burst": 5 })
    );
    let ok = "tiergate_config_reloads_total{result=\"ok\"}";
    let err = "tiergate_config_reloads_total{result=\"error\"}";
    assert_eq!(admin.metric(ok).await, 1.0);
    assert_eq!(admin.metric(err).await, 0.0);
}

/// A typo in the config must never take the proxy down or half-apply: the
/// reload is refused with every error and its YAML path, the old config
/// keeps serving exactly, and the failure is counted for alerting.
#[tokio::test]
async fn invalid_reload_is_refused_with_yaml_paths_and_the_old_config_keeps_serving() {
    let up = Upstream::start();
    let tg = start(&memory_config(&up.url()));
    let admin = Admin::new(&tg);
    let http = common::client();
    let tiers_before = admin.get_json("/v1/tiers").await;
    expect_hit(&http, &tg, "steady", 200, Some(1)).await;

    let bad = memory_config(&up.url())
        .replace(
            "free: { rate: 1/m, burst: 2 }",
            "free: { rate: 0/m, burst: 2 }",
        )
        .replace("default_tier: free", "default_tier: bronze");
    tg.write_config(&bad);
    let r = admin.reload().await;
    assert_eq!(r.status, 400, "{r:#?}");
    let v = r.json();
    assert_eq!(v["error"], "invalid_config");
    assert!(v["message"].is_string(), "{v:#}");
    let errors: Vec<&str> = v["errors"]
        .as_array()
        .expect("errors array")
        .iter()
        .map(|e| e.as_str().expect("string"))
        .collect();
    assert!(
        errors.iter().any(|e| e.contains("tiers.free.rate")),
        "errors name tiers.free.rate: {errors:#?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("default_tier") && e.contains("bronze")),
        "errors name default_tier: {errors:#?}"
    );

    // Unparseable YAML is refused the same way.
    tg.write_config("tiers: [unclosed\n");
    let r = admin.reload().await;
    assert_eq!(r.status, 400, "{r:#?}");
    assert!(!r.json()["errors"].as_array().expect("errors").is_empty());

    assert_eq!(admin.get_json("/v1/tiers").await, tiers_before);
    expect_hit(&http, &tg, "steady", 200, Some(0)).await;
    expect_hit(&http, &tg, "steady", 429, None).await;
    let ok = "tiergate_config_reloads_total{result=\"ok\"}";
    let err = "tiergate_config_reloads_total{result=\"error\"}";
    assert_eq!(admin.metric(err).await, 2.0);
    assert_eq!(admin.metric(ok).await, 0.0);
}

/// Some settings (listeners, upstream, backend) cannot change in place; an
/// operator who edits them must be told a restart is needed rather than
/// believe the change is live.
#[tokio::test]
async fn reload_reports_restart_only_changes_in_restart_required() {
    let up = Upstream::start();
    let tg = start(&memory_config(&up.url()));
    let admin = Admin::new(&tg);
    let http = common::client();
    let elsewhere = format!("127.0.0.1:{}", common::free_port());
    tg.write_config(&config_with(&up.url(), &elsewhere, MEMORY_BACKEND, 3));
    let r = admin.reload().await;
    assert_eq!(r.status, 200, "{r:#?}");
    let v = r.json();
    assert_eq!(v["restart_required"], json!(["server.listen"]), "{v:#}");
    // The rest applied; the proxy still serves on its old address.
    let r = expect_hit(&http, &tg, "mover", 200, Some(2)).await;
    assert_eq!(r.header("x-ratelimit-limit"), Some("3"));
    assert_eq!(
        admin
            .metric("tiergate_config_reloads_total{result=\"ok\"}")
            .await,
        1.0
    );
}

/// Reload must swap config without dropping or failing in-flight and
/// following requests (SPEC §7 "without dropping connections"), whether
/// the new file is valid or refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reloads_valid_and_invalid_under_load_fail_no_requests() {
    let up = Upstream::start();
    let tg = start(&memory_config(&up.url()));
    let admin = Admin::new(&tg);
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let deadline = Instant::now() + Duration::from_millis(1500);
    let url = format!("{}/api/items", tg.proxy_url());
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (ok, failed, url) = (ok.clone(), failed.clone(), url.clone());
            tokio::spawn(async move {
                let http = common::client();
                while Instant::now() < deadline {
                    match http.get(&url).header("x-tenant-id", "loadco").send().await {
                        Ok(r) if r.status() == 200 => match r.bytes().await {
                            Ok(_) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => failed.lock().unwrap().push(format!("body: {e:?}")),
                        },
                        Ok(r) => failed
                            .lock()
                            .unwrap()
                            .push(format!("status {}", r.status())),
                        Err(e) => failed.lock().unwrap().push(format!("{e:?}")),
                    }
                }
            })
        })
        .collect();

    let (mut valid, mut invalid) = (0, 0);
    let mut i = 0u32;
    while Instant::now() + Duration::from_millis(150) < deadline {
        if i.is_multiple_of(2) {
            tg.write_config(&config_with(
                &up.url(),
                "127.0.0.1:0",
                MEMORY_BACKEND,
                3 + i,
            ));
            let r = admin.reload().await;
            assert_eq!(r.status, 200, "{r:#?}");
            valid += 1;
        } else {
            tg.write_config("tiers: {}\n");
            let r = admin.reload().await;
            assert_eq!(r.status, 400, "{r:#?}");
            invalid += 1;
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for w in workers {
        w.await.expect("load task");
    }
    let failed = failed.lock().unwrap().clone();
    let ok = ok.load(Ordering::Relaxed);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed across reloads: {:?}\n{}",
        failed.len(),
        failed.len() + ok,
        &failed[..failed.len().min(10)],
        tg.dump()
    );
    assert!(ok >= 40, "the load loop barely ran: {ok} requests");
    assert!(
        valid >= 2 && invalid >= 2,
        "{valid} valid, {invalid} invalid reloads"
    );
    let ok_reloads = "tiergate_config_reloads_total{result=\"ok\"}";
    let err_reloads = "tiergate_config_reloads_total{result=\"error\"}";
    assert_eq!(admin.metric(ok_reloads).await, f64::from(valid));
    assert_eq!(admin.metric(err_reloads).await, f64::from(invalid));
}
