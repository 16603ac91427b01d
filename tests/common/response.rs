//! A fully read HTTP response and the request builder the proxy/admin tests
//! share.

use reqwest::header::HeaderMap;
use serde_json::Value;

/// Builds a `method url` request on `http` with `headers` added; the caller
/// adds a body if any and sends it.
pub fn request(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> reqwest::RequestBuilder {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut req = http.request(method, url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req
}

/// One response, fully read.
#[derive(Debug)]
pub struct Resp {
    /// Status code.
    pub status: u16,
    /// Response headers.
    pub headers: HeaderMap,
    /// The body as text.
    pub body: String,
}

impl Resp {
    /// Reads `resp` to the end into a [`Resp`]; panics if the body cannot be
    /// read.
    pub async fn read(resp: reqwest::Response) -> Resp {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.text().await.expect("read body");
        Resp {
            status,
            headers,
            body,
        }
    }

    /// A header's value as text, `None` if absent; panics if not ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ascii header"))
    }

    /// A header's value as text; panics if absent or not ASCII.
    pub fn expect_header(&self, name: &str) -> &str {
        self.header(name)
            .unwrap_or_else(|| panic!("no `{name}` header in {self:#?}"))
    }

    /// The body as JSON; panics if it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {self:#?}"))
    }

    /// Whether any rate-limit header is present.
    pub fn has_rate_limit_headers(&self) -> bool {
        [
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
            "ratelimit-policy",
            "ratelimit",
        ]
        .iter()
        .any(|h| self.headers.contains_key(*h))
    }
}
