//! `tiergate demo`: everything a first-time user needs in one process — a
//! built-in echo upstream, the example tiers on the memory backend, a
//! header source and a JWT source with a demo secret, and ready-to-paste
//! curl commands (with a token signed here) that reach a 429 in seconds.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;

use crate::config::Config;

/// The example config shipped in `config/tiergate.yaml`.
pub const EXAMPLE_CONFIG: &str = include_str!("../config/tiergate.yaml");

/// HMAC secret of the demo JWT source (demo only, never for production).
pub const DEMO_SECRET: &str = "tiergate-demo-secret-not-for-production";

/// Starts the echo upstream on loopback; it answers every request with a
/// JSON summary of what it received (method, path, tiergate's headers).
pub async fn start_echo() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let builder = auto::Builder::new(TokioExecutor::new());
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let builder = builder.clone();
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let header = |n: &str| {
                        req.headers()
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    let summary = json!({
                        "echo": true,
                        "method": req.method().as_str(),
                        "path": req.uri().path(),
                        "x-tenant-id": header("x-tenant-id"),
                        "x-tenant-tier": header("x-tenant-tier"),
                        "x-request-id": header("x-request-id"),
                        "x-forwarded-for": header("x-forwarded-for"),
                    });
                    let body_len = req
                        .into_body()
                        .collect()
                        .await
                        .map_or(0, |b| b.to_bytes().len());
                    let mut summary = summary;
                    summary["body_bytes"] = json!(body_len);
                    let mut resp =
                        Response::new(Full::new(Bytes::from(summary.to_string() + "\n")));
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, Infallible>(resp)
                });
                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok(addr)
}

/// The demo config: the example tiers and routes, memory backend, the echo
/// upstream, a JWT source on the demo secret and the `x-tenant-id` header.
pub fn config(echo: SocketAddr, listen: SocketAddr, admin: SocketAddr) -> Config {
    let mut cfg = Config::from_yaml(EXAMPLE_CONFIG).expect("the shipped example config is valid");
    cfg.upstream.url = format!("http://{echo}").parse().expect("valid uri");
    cfg.server.listen = listen;
    cfg.admin.listen = admin;
    cfg.backend.kind = crate::config::BackendKind::Memory;
    cfg.identity = crate::config::IdentityConfig {
        sources: vec![
            crate::config::SourceConfig::Jwt(crate::config::JwtConfig {
                header: http::header::AUTHORIZATION,
                algorithms: vec![jsonwebtoken::Algorithm::HS256],
                key: crate::config::KeySource::SecretEnv("TIERGATE_DEMO_SECRET".into()),
                issuer: None,
                audience: None,
                tenant_claim: "tenant_id".into(),
                tier_claim: Some("tier".into()),
                leeway: std::time::Duration::from_secs(30),
            }),
            crate::config::SourceConfig::Header {
                name: http::HeaderName::from_static("x-tenant-id"),
            },
        ],
        anonymous: crate::config::Anonymous::Reject,
    };
    cfg
}

/// Environment for the demo: only the demo secret.
pub fn env() -> Arc<crate::EnvFn> {
    Arc::new(|name: &str| (name == "TIERGATE_DEMO_SECRET").then(|| DEMO_SECRET.to_string()))
}

/// A demo token for `tenant` on `tier`, valid for a day.
pub fn token(tenant: &str, tier: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 86_400;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({ "tenant_id": tenant, "tier": tier, "exp": exp }),
        &jsonwebtoken::EncodingKey::from_secret(DEMO_SECRET.as_bytes()),
    )
    .expect("HS256 signing cannot fail")
}

/// The text printed after the demo starts.
pub fn instructions(proxy: SocketAddr, admin: SocketAddr) -> String {
    let jwt = token("demo-jwt", "starter");
    format!(
        r#"tiergate demo is running (memory backend, built-in echo upstream).

  proxy  http://{proxy}
  admin  http://{admin}

1. One request as tenant "alice" (no tier configured: the default tier, free):
   curl -i -H 'x-tenant-id: alice' http://{proxy}/api/hello

2. Burn through free's burst (20) and watch the 429s arrive:
   for i in $(seq 30); do curl -s -o /dev/null -w '%{{http_code}} ' -H 'x-tenant-id: alice' http://{proxy}/api/hello; done; echo

3. A verified JWT for tenant "demo-jwt" on tier starter (burst 100):
   curl -i -H 'authorization: Bearer {jwt}' http://{proxy}/api/hello

4. A forged token never falls back to the header (401 invalid_token):
   curl -i -H 'authorization: Bearer not.a.jwt' -H 'x-tenant-id: acme' http://{proxy}/api/hello

5. Health and metrics:
   curl -s http://{admin}/readyz; curl -s http://{admin}/metrics | grep tiergate_requests_total

Ctrl-C to stop.
"#
    )
}
