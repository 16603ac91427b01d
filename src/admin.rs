//! The admin listener: liveness, readiness and metrics (SPEC §7).
//!
//! It runs on the control runtime, apart from the proxy workers, and
//! defaults to loopback. `/healthz` answers while the process runs;
//! `/readyz` answers 200 while requests can be served (healthy, or degraded
//! under `on_error: local|allow`) and 503 while starting, draining, or with
//! the backend down under `on_error: deny`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;

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
                async move { Ok::<_, Infallible>(route(&app, req)) }
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

fn route(app: &App, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
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
        (_, "/healthz" | "/readyz" | "/metrics") => json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({ "error": "method_not_allowed", "message": "use GET" }),
        ),
        _ => json_response(
            StatusCode::NOT_FOUND,
            json!({ "error": "not_found", "message": "no such admin endpoint" }),
        ),
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
