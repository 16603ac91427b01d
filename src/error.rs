//! The one table from "why tiergate answered itself" to an HTTP response
//! (SPEC §5): status, stable `error` code, public message. Internal causes
//! (addresses, Redis errors) are logged where they happen and never reach
//! this table's output.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

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

/// The JSON body of a response tiergate makes itself (SPEC §5). Fields are
/// in alphabetical order, as they always were.
#[derive(Serialize)]
struct Body<'a> {
    error: &'static str,
    message: &'a str,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    limited: Option<Limited<'a>>,
}

/// The fields a 429 adds (`null` where unknown, e.g. the ip guard's).
#[derive(Serialize)]
struct Limited<'a> {
    retry_after_seconds: u64,
    route: Option<&'a str>,
    tenant: Option<&'a str>,
    tier: Option<&'a str>,
}

/// Seconds for `Retry-After`: ceil, at least 1.
pub fn retry_after_secs(d: Duration) -> u64 {
    (d.as_secs_f64().ceil() as u64).max(1)
}

impl ProxyError {
    /// `(status, code, message)` — the table.
    pub fn parts(&self) -> (StatusCode, &'static str, Cow<'static, str>) {
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
                format!("invalid token: {why}").into(),
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
        let limited = match self {
            ProxyError::RateLimited {
                tenant,
                tier,
                route,
                retry_after,
            } => Some(Limited {
                retry_after_seconds: retry_after_secs(*retry_after),
                route: route.as_deref(),
                tenant: tenant.as_ref().map(|t| t.as_str()),
                tier: tier.as_deref(),
            }),
            _ => None,
        };
        let body = Body {
            error: code,
            message: &message,
            limited,
        };
        // A struct of borrowed fields serializes straight into one buffer
        // (no map of owned keys to build and drop): this runs for every
        // refusal of a flood.
        // Room for the longest body (a 429 with a 128-byte tenant id) at
        // once, instead of growing from empty.
        let mut buf = Vec::with_capacity(384);
        let body = match serde_json::to_writer(&mut buf, &body) {
            Ok(()) => buf,
            Err(_) => Vec::new(),
        };
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        // Sized once for these three and the five RateLimit headers a 429
        // gets, instead of growing insert by insert.
        h.reserve(8);
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(TIERGATE_ERROR, HeaderValue::from_static(code));
        match self {
            ProxyError::RateLimited { retry_after, .. } => {
                h.insert(RETRY_AFTER, number(retry_after_secs(*retry_after)));
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

/// `n` as a header value. Below [`SMALL`] (most limits, remainders and
/// resets) it is a clone of a value made once, which allocates nothing;
/// a fresh value costs an allocation and its free on every response.
pub fn number(n: u64) -> HeaderValue {
    use std::sync::OnceLock;
    static TABLE: OnceLock<Vec<HeaderValue>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut text = String::new();
        let mut ends = Vec::with_capacity(SMALL as usize);
        for i in 0..SMALL {
            text.push_str(itoa::Buffer::new().format(i));
            ends.push(text.len());
        }
        // One string for the whole table, made once per process.
        let text: &'static str = Box::leak(text.into_boxed_str());
        let mut start = 0;
        ends.into_iter()
            .map(|end| {
                let v = HeaderValue::from_static(&text[start..end]);
                start = end;
                v
            })
            .collect()
    });
    match table.get(n as usize) {
        Some(v) if n < SMALL => v.clone(),
        _ => shared_value(&[itoa::Buffer::new().format(n).as_bytes()])
            .unwrap_or_else(|| HeaderValue::from(n)),
    }
}

/// Room for a value made by [`shared_value`] in its one allocation.
const INLINE: usize = 48;

/// Up to [`INLINE`] bytes, held in place.
struct Inline {
    len: usize,
    buf: [u8; INLINE],
}

impl AsRef<[u8]> for Inline {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// `parts` joined as a header value that is shared from the start (`None`:
/// not a valid header value). A value made from a `Vec` allocates again
/// on its first clone, to start counting references; one made up to
/// [`INLINE`] bytes long here allocates once, and its clones never do,
/// which is what a value kept for reuse needs. Longer values take the
/// `Vec` path.
pub fn shared_value(parts: &[&[u8]]) -> Option<HeaderValue> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let bytes = if len <= INLINE {
        let mut v = Inline {
            len,
            buf: [0; INLINE],
        };
        let mut at = 0;
        for p in parts {
            v.buf[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        Bytes::from_owner(v)
    } else {
        Bytes::from(parts.concat())
    };
    HeaderValue::from_maybe_shared(bytes).ok()
}

/// Numbers [`number`] keeps ready.
const SMALL: u64 = 10_000;

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    #[test]
    fn numbers_from_the_table_and_beyond_it_read_the_same() {
        for n in [
            0,
            1,
            9,
            10,
            99,
            100,
            4321,
            SMALL - 1,
            SMALL,
            SMALL + 1,
            u64::MAX,
        ] {
            assert_eq!(number(n), HeaderValue::from(n), "{n}");
        }
    }

    #[test]
    fn shared_values_read_as_their_parts_joined() {
        let long = "x".repeat(INLINE);
        for parts in [
            &[][..],
            &[&b"\"tenant\""[..], b";q=", b"100"][..],
            &[long.as_bytes(), b";r=1"][..],
        ] {
            let v = shared_value(parts).expect("valid");
            assert_eq!(v.as_bytes(), parts.concat(), "{parts:?}");
            assert_eq!(v.clone(), v);
        }
        assert!(shared_value(&[b"a\nb"]).is_none(), "a newline is refused");
    }

    async fn body_of(e: ProxyError) -> String {
        let bytes = e.to_response().into_body().collect().await.unwrap();
        String::from_utf8(bytes.to_bytes().to_vec()).unwrap()
    }

    /// The exact bytes clients and scripts see: a 429 names every field,
    /// `null` where unknown; other errors carry only `error` and `message`.
    #[tokio::test]
    async fn bodies_keep_their_fields_and_order() {
        let ip_guard = ProxyError::RateLimited {
            tenant: None,
            tier: None,
            route: None,
            retry_after: Duration::from_millis(1500),
        };
        assert_eq!(
            body_of(ip_guard).await,
            r#"{"error":"rate_limited","message":"too many requests from this client address","retry_after_seconds":2,"route":null,"tenant":null,"tier":null}"#
        );
        let tenant = ProxyError::RateLimited {
            tenant: Some(TenantId::for_ip("10.0.0.1".parse().unwrap())),
            tier: Some("free".into()),
            route: Some("export".into()),
            retry_after: Duration::from_secs(60),
        };
        let body: serde_json::Value = serde_json::from_str(&body_of(tenant).await).unwrap();
        assert_eq!(body["tier"], "free");
        assert_eq!(body["route"], "export");
        assert_eq!(body["retry_after_seconds"], 60);
        assert!(body["tenant"].is_string(), "{body}");
        assert_eq!(
            body_of(ProxyError::InvalidToken("expired".into())).await,
            r#"{"error":"invalid_token","message":"invalid token: expired"}"#
        );
    }
}
