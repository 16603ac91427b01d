//! The one table from "why tiergate answered itself" to an HTTP response
//! (SPEC §5): status, stable `error` code, public message. Internal causes
//! (addresses, Redis errors) are logged where they happen and never reach
//! this table's output.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use crate::identity::{IdentityError, TenantId};
use crate::metrics::DecisionLabel;

/// Header marking responses tiergate generated itself.
pub const TIERGATE_ERROR: &str = "x-tiergate-error";

/// Every response tiergate generates instead of the upstream's.
#[derive(Debug, Clone, PartialEq)]
pub enum ProxyError {
    /// Over a bucket's limit (tenant, route or ip).
    RateLimited {
        /// The tenant, or `None` for the `ip_limit` guard.
        tenant: Option<TenantId>,
        /// Its tier.
        tier: Option<Arc<str>>,
        /// Matched route.
        route: Option<Arc<str>>,
        /// Wait before retrying.
        retry_after: Duration,
    },
    /// No identity and `anonymous: reject`.
    Unauthenticated {
        /// A JWT source exists: add `WWW-Authenticate: Bearer`.
        bearer: bool,
    },
    /// A token was present and invalid; the reason is public.
    InvalidToken(String),
    /// Malformed tenant id.
    InvalidTenant,
    /// Body over `max_body_bytes`.
    BodyTooLarge,
    /// Upstream unreachable or broke the exchange.
    BadGateway,
    /// Upstream did not answer within `upstream.timeout`.
    GatewayTimeout,
    /// Limiter down under `on_error: deny`.
    LimiterUnavailable,
}

impl From<IdentityError> for ProxyError {
    fn from(e: IdentityError) -> Self {
        match e {
            IdentityError::Missing { bearer } => ProxyError::Unauthenticated { bearer },
            IdentityError::InvalidToken(j) => ProxyError::InvalidToken(j.to_string()),
            IdentityError::InvalidTenant => ProxyError::InvalidTenant,
        }
    }
}

/// Seconds for `Retry-After`: ceil, at least 1.
pub fn retry_after_secs(d: Duration) -> u64 {
    (d.as_secs_f64().ceil() as u64).max(1)
}

impl ProxyError {
    /// `(status, code, message)` — the table.
    pub fn parts(&self) -> (StatusCode, &'static str, String) {
        match self {
            ProxyError::RateLimited { tenant: None, .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests from this client address".into(),
            ),
            ProxyError::RateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "rate limit exceeded for this tenant".into(),
            ),
            ProxyError::Unauthenticated { .. } => (
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "no tenant identity: send a bearer token or a tenant header".into(),
            ),
            ProxyError::InvalidToken(why) => (
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                format!("invalid token: {why}"),
            ),
            ProxyError::InvalidTenant => (
                StatusCode::BAD_REQUEST,
                "invalid_tenant",
                "tenant id must be 1 to 128 characters of A-Z a-z 0-9 . _ : @ -".into(),
            ),
            ProxyError::BodyTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "request body exceeds the configured limit".into(),
            ),
            ProxyError::BadGateway => (
                StatusCode::BAD_GATEWAY,
                "bad_gateway",
                "the upstream service could not be reached".into(),
            ),
            ProxyError::GatewayTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "gateway_timeout",
                "the upstream service did not answer in time".into(),
            ),
            ProxyError::LimiterUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "limiter_unavailable",
                "rate limiter unavailable; retry shortly".into(),
            ),
        }
    }

    /// The metric `decision` this response counts as.
    pub fn decision(&self) -> DecisionLabel {
        match self {
            ProxyError::RateLimited { .. } => DecisionLabel::Throttled,
            ProxyError::Unauthenticated { .. } | ProxyError::InvalidToken(_) => {
                DecisionLabel::Unauthenticated
            }
            ProxyError::InvalidTenant | ProxyError::BodyTooLarge => DecisionLabel::Invalid,
            ProxyError::BadGateway
            | ProxyError::GatewayTimeout
            | ProxyError::LimiterUnavailable => DecisionLabel::Error,
        }
    }

    /// Builds the JSON response with `x-tiergate-error`.
    pub fn to_response(&self) -> Response<Full<Bytes>> {
        let (status, code, message) = self.parts();
        let mut body = json!({ "error": code, "message": message });
        if let ProxyError::RateLimited {
            tenant,
            tier,
            route,
            retry_after,
        } = self
        {
            body["tenant"] = json!(tenant.as_ref().map(|t| t.as_str()));
            body["tier"] = json!(tier.as_deref());
            body["route"] = json!(route.as_deref());
            body["retry_after_seconds"] = json!(retry_after_secs(*retry_after));
        }
        let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(TIERGATE_ERROR, HeaderValue::from_static(code));
        match self {
            ProxyError::RateLimited { retry_after, .. } => {
                h.insert(
                    RETRY_AFTER,
                    HeaderValue::from(retry_after_secs(*retry_after)),
                );
            }
            ProxyError::LimiterUnavailable => {
                h.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ProxyError::Unauthenticated { bearer: true } => {
                h.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ProxyError::InvalidToken(_) => {
                h.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            _ => {}
        }
        resp
    }
}
