//! The admin API client behind `tiergate override …`, `tiergate tenant`
//! and `tiergate health`: one small HTTP/1.1 request per command, clear
//! errors (connection refused, 401, validation messages passed through),
//! tables for people and `--json` for scripts.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// What went wrong talking to the admin API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad `--admin` URL.
    #[error("invalid admin URL `{0}`: expected e.g. http://127.0.0.1:9090")]
    BadUrl(String),
    /// Could not connect or the exchange failed.
    #[error(
        "cannot reach the admin API at {url}: {cause} (is tiergate running, and is --admin right?)"
    )]
    Unreachable {
        /// Where.
        url: String,
        /// Why.
        cause: String,
    },
    /// The server answered with an error.
    #[error("{status}: {message}")]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// The server's message.
        message: String,
    },
}

/// A connection to one admin listener.
pub struct AdminClient {
    base: String,
    token: Option<String>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl AdminClient {
    /// `base` like `http://127.0.0.1:9090`; `token` from `$TIERGATE_ADMIN_TOKEN`.
    pub fn new(base: &str, token: Option<String>) -> Result<AdminClient, ClientError> {
        let base = base.trim_end_matches('/').to_string();
        let uri: http::Uri = base
            .parse()
            .map_err(|_| ClientError::BadUrl(base.clone()))?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(ClientError::BadUrl(base));
        }
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(3)));
        Ok(AdminClient {
            base,
            token,
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// Sends a request and returns `(status, JSON body or Null)`; API errors
    /// (4xx/5xx) become [`ClientError::Api`] with the server's message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), ClientError> {
        let url = format!("{}{}", self.base, path);
        let mut req = Request::builder().method(method).uri(&url);
        if let Some(t) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let payload = match body {
            Some(v) => {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(payload))
            .map_err(|_| ClientError::BadUrl(self.base.clone()))?;
        let unreachable = |cause: String| ClientError::Unreachable {
            url: self.base.clone(),
            cause,
        };
        let resp = tokio::time::timeout(Duration::from_secs(10), self.client.request(req))
            .await
            .map_err(|_| unreachable("timed out".into()))?
            .map_err(|e| unreachable(root_cause(&e)))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        let json: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        if status.is_client_error() || status.is_server_error() {
            let mut message = json
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| json.to_string());
            if status == StatusCode::UNAUTHORIZED && self.token.is_none() {
                message.push_str(" (set $TIERGATE_ADMIN_TOKEN)");
            }
            if let Some(errors) = json.get("errors").and_then(Value::as_array) {
                for e in errors {
                    message.push_str("\n  ");
                    message.push_str(e.as_str().unwrap_or_default());
                }
            }
            return Err(ClientError::Api { status, message });
        }
        Ok((status, json))
    }
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Renders rows as an aligned table with a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(header.iter().map(|h| h.to_string()).collect(), &mut out);
    for r in rows {
        line(r.clone(), &mut out);
    }
    out
}

/// The fields of an override, in display order.
const OVERRIDE_FIELDS: [&str; 6] = [
    "tier",
    "rate",
    "burst",
    "expires_at",
    "reason",
    "updated_at",
];

/// One override row for `override ls` / `override set`.
pub fn override_rows(list: &[Value]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|o| {
            std::iter::once("tenant")
                .chain(OVERRIDE_FIELDS)
                .map(|k| text(o.get(k).unwrap_or(&Value::Null)))
                .collect()
        })
        .collect();
    table(
        &[
            "TENANT", "TIER", "RATE", "BURST", "EXPIRES", "REASON", "UPDATED",
        ],
        &rows,
    )
}

/// Human view of `GET /v1/tenants/{id}`.
pub fn tenant_view(v: &Value) -> String {
    let limit = v.get("limit").cloned().unwrap_or(Value::Null);
    let mut out = String::new();
    out.push_str(&format!("tenant     {}\n", text(&v["tenant"])));
    out.push_str(&format!(
        "tier       {} (from {})\n",
        text(&v["tier"]),
        text(&v["source"])
    ));
    out.push_str(&format!(
        "limit      {} burst {}\n",
        text(&limit["rate"]),
        text(&limit["burst"])
    ));
    out.push_str(&format!("remaining  {}\n", text(&v["remaining"])));
    match v.get("override") {
        Some(o) if !o.is_null() => {
            out.push_str("override\n");
            for k in OVERRIDE_FIELDS {
                if let Some(x) = o.get(k).filter(|x| !x.is_null()) {
                    out.push_str(&format!("  {k:<11}{}\n", text(x)));
                }
            }
        }
        _ => out.push_str("override   none\n"),
    }
    out
}
