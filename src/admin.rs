//! The admin listener (SPEC §7): liveness, readiness, metrics, and the
//! authenticated `/v1` API for tiers, tenants, overrides, audit and reload.
//!
//! It runs on the control runtime, apart from the proxy workers, and
//! defaults to loopback. `/healthz` answers while the process runs;
//! `/readyz` answers 200 while requests can be served (healthy, or degraded
//! under `on_error: local|allow`) and 503 while starting, draining, or with
//! the backend down under `on_error: deny`.
//!
//! Every `/v1` request is authenticated *before* routing (so an unknown or
//! future path is 401 too, never an unprotected hole): `Authorization:
//! Bearer <token>`, compared in constant time against the token(s) in the
//! env var named by `admin.token_env` (comma-separated, for rotation).
//! Tokens in query strings are never looked at. With the variable unset,
//! `/v1` answers 403.

// Handlers return early with ready-made responses; boxing them would only
// add noise to a path that serves a few admin calls.
#![allow(clippy::result_large_err)]

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{ALLOW, AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;

use crate::config::Limit;
use crate::identity::{Identity, IdentitySource, TenantId};
use crate::limiter::BucketSpec;
use crate::overrides::{AUDIT_RETENTION, Override, OverrideRequest, token_fingerprint};
use crate::{App, Lifecycle};

/// Serves the admin API on `listener` for the life of the process: it
/// keeps answering (`/readyz`: 503 draining) while the proxy drains.
pub async fn serve(app: Arc<App>, listener: TcpListener) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let app = app.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(route(&app, req).await) }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Full<Bytes>> {
    json_response(status, json!({ "error": code, "message": message.into() }))
}

async fn route(app: &App, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, json!({ "status": "ok" })),
        (&Method::GET, "/readyz") => readyz(app),
        (&Method::GET, "/metrics") => {
            let mut resp = Response::new(Full::new(Bytes::from(app.metrics.render())));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        (_, "/healthz" | "/readyz" | "/metrics") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use GET",
        ),
        (_, p) if p == "/v1" || p.starts_with("/v1/") => match authenticate(app, &req) {
            Ok(actor) => v1(app, req, &actor).await,
            Err(resp) => resp,
        },
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint"),
    }
}

/// Checks the bearer token; returns the caller's fingerprint for the audit.
fn authenticate(app: &App, req: &Request<Incoming>) -> Result<String, Response<Full<Bytes>>> {
    let Some(tokens) = &app.admin_tokens else {
        let env = app.live.load().policy.config().admin.token_env.clone();
        return Err(error(
            StatusCode::FORBIDDEN,
            "admin_disabled",
            format!("admin API disabled: set ${env} on the tiergate process to enable it"),
        ));
    };
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let unauthorized = |msg: &str| {
        let mut r = error(StatusCode::UNAUTHORIZED, "unauthorized", msg);
        r.headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        r
    };
    let Some(presented) = presented else {
        return Err(unauthorized("send `Authorization: Bearer <admin token>`"));
    };
    // Compare every configured token (no early exit) in constant time.
    let mut ok = false;
    for t in tokens {
        ok |= constant_time_eq(t.as_bytes(), presented.as_bytes());
    }
    if ok {
        Ok(token_fingerprint(presented))
    } else {
        Err(unauthorized("invalid admin token"))
    }
}

/// Equality whose time does not depend on where the inputs differ: both
/// sides are hashed to a fixed length first, then compared without
/// branching.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::Digest;
    let ha = sha2::Sha256::digest(a);
    let hb = sha2::Sha256::digest(b);
    ha.iter()
        .zip(hb.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

async fn v1(app: &App, req: Request<Incoming>, actor: &str) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_start_matches("/v1").split('/').skip(1).collect();
    let method = req.method().clone();
    match (segments.as_slice(), &method) {
        (["tiers"], &Method::GET) => tiers(app),
        (["overrides"], &Method::GET) => list_overrides(app),
        (["audit"], &Method::GET) => audit(app, req.uri().query()).await,
        (["reload"], &Method::POST) => reload(app),
        (["tenants", id], &Method::GET) => match tenant_id(id) {
            Ok(t) => tenant(app, &t).await,
            Err(r) => r,
        },
        (["tenants", id, "override"], &Method::PUT) => match tenant_id(id) {
            Ok(t) => put_override(app, &t, req, actor).await,
            Err(r) => r,
        },
        (["tenants", id, "override"], &Method::DELETE) => match tenant_id(id) {
            Ok(t) => delete_override(app, &t, actor).await,
            Err(r) => r,
        },
        (["tiers"] | ["overrides"] | ["audit"], _) => method_not_allowed("GET"),
        (["reload"], _) => method_not_allowed("POST"),
        (["tenants", _], _) => method_not_allowed("GET"),
        (["tenants", _, "override"], _) => method_not_allowed("PUT, DELETE"),
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint"),
    }
}

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("allowed: {allow}"),
    );
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    r
}

fn tenant_id(raw: &str) -> Result<TenantId, Response<Full<Bytes>>> {
    let decoded = percent_decode(raw);
    TenantId::parse(&decoded).map_err(|_| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_tenant",
            "tenant id must be 1 to 128 characters of A-Z a-z 0-9 . _ : @ -",
        )
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn limit_json(l: &Limit) -> serde_json::Value {
    json!({ "rate": l.rate.to_string(), "burst": l.burst })
}

fn tiers(app: &App) -> Response<Full<Bytes>> {
    let live = app.live.load();
    let cfg = live.policy.config();
    let tiers: serde_json::Map<String, serde_json::Value> = cfg
        .tiers
        .iter()
        .map(|t| (t.name.to_string(), limit_json(&t.limit)))
        .collect();
    json_response(
        StatusCode::OK,
        json!({ "default_tier": &*cfg.tiers[cfg.default_tier].name, "tiers": tiers }),
    )
}

fn override_json(tenant: &TenantId, o: &Override) -> serde_json::Value {
    let mut v = serde_json::to_value(o.to_doc()).expect("serializable");
    v["tenant"] = json!(tenant.as_str());
    v
}

fn list_overrides(app: &App) -> Response<Full<Bytes>> {
    let list: Vec<_> = app
        .overrides
        .list()
        .iter()
        .map(|(t, o)| override_json(t, o))
        .collect();
    json_response(StatusCode::OK, json!({ "overrides": list }))
}

async fn tenant(app: &App, tenant: &TenantId) -> Response<Full<Bytes>> {
    let live = app.live.load();
    let policy = &live.policy;
    let cfg = policy.config();
    let ov = app.overrides.get(tenant);
    let ov_tier = ov
        .as_ref()
        .and_then(|o| o.tier.as_deref())
        .and_then(|t| cfg.tier_index(t));
    let anonymous = cfg.identity.anonymous == crate::config::Anonymous::Ip
        && tenant.as_str().starts_with("ip:");
    let identity = Identity {
        tenant: tenant.clone(),
        claimed_tier: app.claims.get(tenant),
        source: if anonymous {
            IdentitySource::Anonymous
        } else {
            IdentitySource::Jwt
        },
    };
    let (tier, source) = policy.resolve_tier(&identity, ov_tier);
    let limit = policy.tenant_limit(tier, ov.as_deref());
    let spec = BucketSpec {
        name: policy.tenant_bucket().clone(),
        limit,
        cost: 1,
    };
    let remaining = match &app.admin_redis {
        None => Some(app.local.peek(tenant, &spec)),
        Some(r) => r.peek(tenant, &spec).await.ok(),
    };
    json_response(
        StatusCode::OK,
        json!({
            "tenant": tenant.as_str(),
            "tier": &*cfg.tiers[tier].name,
            "source": source.as_str(),
            "limit": limit_json(&limit),
            "remaining": remaining,
            "override": ov.as_ref().map(|o| override_json(tenant, o)),
        }),
    )
}

/// Largest accepted admin request body.
const MAX_ADMIN_BODY: usize = 64 * 1024;

async fn put_override(
    app: &App,
    tenant: &TenantId,
    req: Request<Incoming>,
    actor: &str,
) -> Response<Full<Bytes>> {
    let is_json = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the override as `Content-Type: application/json`",
        );
    }
    let body = match Limited::new(req.into_body(), MAX_ADMIN_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("admin request bodies are limited to {MAX_ADMIN_BODY} bytes"),
            );
        }
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_override",
            "empty body: send a JSON object with at least one of `tier`, `rate`, `burst`",
        );
    }
    let request = match parse_override_request(&body) {
        Ok(r) => r,
        Err(msg) => return error(StatusCode::BAD_REQUEST, "invalid_override", msg),
    };
    let now = time::OffsetDateTime::now_utc();
    let ov = match request.validate(app.live.load().policy.config(), now) {
        Ok(o) => o,
        Err(msg) => return error(StatusCode::BAD_REQUEST, "invalid_override", msg),
    };
    match app.overrides.set(tenant, ov.clone(), actor).await {
        Ok(()) => {
            tracing::info!(tenant = %tenant, actor, "override set");
            json_response(StatusCode::OK, override_json(tenant, &ov))
        }
        Err(e) => store_error(e),
    }
}

/// Parses the override body with messages that name the offending field.
fn parse_override_request(body: &[u8]) -> Result<OverrideRequest, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("malformed override JSON: {e}"))?;
    let Some(obj) = value.as_object() else {
        return Err("the body must be a JSON object like {\"tier\": \"enterprise\"}".into());
    };
    for (key, v) in obj {
        let ok = match key.as_str() {
            "tier" | "rate" | "expires_at" | "reason" => v.is_string() || v.is_null(),
            "burst" => v.is_i64() || v.is_u64() || v.is_null(),
            _ => {
                return Err(format!(
                    "unknown field `{key}`; expected `tier`, `rate`, `burst`, `expires_at` or `reason`"
                ));
            }
        };
        if !ok {
            let want = if key == "burst" {
                "a whole number"
            } else {
                "a string"
            };
            return Err(format!("field `{key}` must be {want}, got {v}"));
        }
    }
    serde_json::from_value(value).map_err(|e| format!("invalid override: {e}"))
}

async fn delete_override(app: &App, tenant: &TenantId, actor: &str) -> Response<Full<Bytes>> {
    match app.overrides.remove(tenant, actor).await {
        Ok(true) => {
            tracing::info!(tenant = %tenant, actor, "override removed");
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("tenant `{tenant}` has no override"),
        ),
        Err(e) => store_error(e),
    }
}

fn store_error(e: crate::overrides::StoreError) -> Response<Full<Bytes>> {
    tracing::error!(error = %e, "override store failed");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        "the override store is unavailable; nothing was changed, retry shortly",
    )
}

async fn audit(app: &App, query: Option<&str>) -> Response<Full<Bytes>> {
    let mut limit = 50usize;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("limit", v)) => match v.parse::<usize>() {
                Ok(n) if (1..=AUDIT_RETENTION).contains(&n) => limit = n,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "invalid_query",
                        format!("limit must be a whole number from 1 to {AUDIT_RETENTION}"),
                    );
                }
            },
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    format!("unknown query parameter `{pair}`; only `limit` is accepted"),
                );
            }
        }
    }
    match app.overrides.audit(limit).await {
        Ok(entries) => json_response(StatusCode::OK, json!({ "entries": entries })),
        Err(e) => store_error(e),
    }
}

fn reload(app: &App) -> Response<Full<Bytes>> {
    let Some(path) = &app.config_path else {
        return error(
            StatusCode::CONFLICT,
            "reload_unavailable",
            "this instance was not started from a config file",
        );
    };
    match app.reload(path) {
        Ok(restart) => {
            if restart.is_empty() {
                tracing::info!("config reloaded (admin API)");
            } else {
                tracing::warn!(needs_restart = ?restart, "config reloaded; some changed settings only apply after a restart");
            }
            json_response(
                StatusCode::OK,
                json!({ "status": "reloaded", "restart_required": restart }),
            )
        }
        Err(e) => {
            tracing::error!(errors = %e, "config reload refused; keeping the old config");
            let errors: Vec<String> = e.errors.iter().map(|x| x.to_string()).collect();
            json_response(
                StatusCode::BAD_REQUEST,
                json!({
                    "error": "invalid_config",
                    "message": "the new config is invalid; the old one keeps serving",
                    "errors": errors,
                }),
            )
        }
    }
}

fn readyz(app: &App) -> Response<Full<Bytes>> {
    let degraded = app.health.degraded();
    let (status, code) = match app.lifecycle() {
        Lifecycle::Starting => ("starting", StatusCode::SERVICE_UNAVAILABLE),
        Lifecycle::Draining => ("draining", StatusCode::SERVICE_UNAVAILABLE),
        Lifecycle::Ready if !app.health.can_serve() => {
            ("degraded", StatusCode::SERVICE_UNAVAILABLE)
        }
        Lifecycle::Ready if degraded => ("degraded", StatusCode::OK),
        Lifecycle::Ready => ("ready", StatusCode::OK),
    };
    json_response(
        code,
        json!({ "status": status, "backend": app.backend_name(), "degraded": degraded }),
    )
}
