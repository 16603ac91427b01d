//! The HTTP contract of the proxy and admin listeners (SPEC §5, §7): what the
//! upstream is told, size limits, upstream failures, HTTP/2, admin endpoints
//! and `tiergate check` — all against the real binary.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Tiergate, Upstream, client, closed_port_url, h2c_request, raw_http, run_tiergate};
use serde_json::Value;

/// Base config: loopback listeners, header identity (the default), slow
/// rates with bursts large enough never to throttle, plus `extra` server
/// settings and `upstream` settings.
fn config(upstream: &str, server_extra: &str, upstream_extra: &str) -> String {
    format!(
        r#"
server:
  listen: "127.0.0.1:0"
{server_extra}
admin:
  listen: "127.0.0.1:0"
upstream:
  url: "{upstream}"
{upstream_extra}
tiers:
  free:       {{ rate: 1/m, burst: 100 }}
  enterprise: {{ rate: 1/m, burst: 500 }}
  twice:      {{ rate: 2/m, burst: 100 }}
default_tier: free
tenants:
  acme: {{ tier: enterprise }}
  carol: {{ tier: twice }}
"#
    )
}

/// Value of header `name` as text, or "" when absent.
fn header<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// Sends `req`; returns status, headers and body text.
async fn send(req: reqwest::RequestBuilder) -> (u16, reqwest::header::HeaderMap, String) {
    let resp = req.send().await.expect("request to tiergate");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.expect("response body");
    (status, headers, text)
}

/// Asserts a tiergate-generated JSON error: status, `error` code, a
/// `message`, JSON content type and `x-tiergate-error`.
fn assert_tiergate_error(
    (status, headers, text): &(u16, reqwest::header::HeaderMap, String),
    want_status: u16,
    want_code: &str,
) {
    assert_eq!(*status, want_status, "body: {text}");
    let body: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(body["error"], want_code, "body: {text}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "no message: {text}"
    );
    assert!(
        header(headers, "content-type").starts_with("application/json"),
        "{headers:?}"
    );
    assert_eq!(
        header(headers, "x-tiergate-error"),
        want_code,
        "{headers:?}"
    );
}

/// An untrusted peer's `X-Forwarded-For` is replaced by the peer address,
/// `X-Forwarded-Proto` is `http`, a client `X-Request-Id` is kept, and a
/// client-sent `x-tenant-tier` is replaced by tiergate's own.
///
/// Why: SPEC §3 — the upstream must be able to trust these headers, so a
/// client cannot spoof its address or tier.
#[tokio::test]
async fn upstream_gets_peer_as_xff_proto_and_kept_request_id() {
    let up = Upstream::start();
    let tg = Tiergate::start(&config(&up.url(), "", ""));
    let (status, _, text) = send(
        client()
            .get(format!("{}/who", tg.proxy_url()))
            .header("x-tenant-id", "t1")
            .header("x-forwarded-for", "6.6.6.6")
            .header("x-request-id", "req-abc-123")
            .header("x-tenant-tier", "enterprise"),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let seen = up.last().expect("upstream saw the request");
    assert_eq!(seen.header_all("x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(seen.header_all("x-forwarded-proto"), vec!["http"]);
    assert_eq!(seen.header_all("x-request-id"), vec!["req-abc-123"]);
    assert_eq!(seen.header_all("x-tenant-id"), vec!["t1"]);
    assert_eq!(seen.header_all("x-tenant-tier"), vec!["free"]);
}

/// A client's `Connection` header cannot name tiergate's own request
/// headers away: `Connection: x-tenant-id, x-forwarded-for, x-tenant-tier`
/// still leaves the upstream with all of them, while a client header it
/// names (`x-secret`) is removed.
///
/// Why: SPEC §3 — the upstream relies on these headers; RFC 9110 §7.6.1
/// applies connection options to received fields, not to those the proxy
/// adds.
#[tokio::test]
async fn connection_cannot_strip_tiergates_own_headers() {
    let up = Upstream::start();
    let tg = Tiergate::start(&config(&up.url(), "", ""));
    let (status, _, text) = send(
        client()
            .get(format!("{}/conn", tg.proxy_url()))
            .header("x-tenant-id", "t1")
            .header(
                "connection",
                "x-tenant-id, x-forwarded-for, x-forwarded-proto, x-request-id, x-tenant-tier, x-secret",
            )
            .header("x-secret", "s"),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let seen = up.last().expect("upstream saw the request");
    assert_eq!(seen.header_all("x-tenant-id"), vec!["t1"]);
    assert_eq!(seen.header_all("x-tenant-tier"), vec!["free"]);
    assert_eq!(seen.header_all("x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(seen.header_all("x-forwarded-proto"), vec!["http"]);
    assert_eq!(seen.header_all("x-request-id").len(), 1);
    assert!(seen.header_all("x-secret").is_empty());
}

/// Without a client `X-Request-Id`, tiergate generates one per request, and
/// two requests get two different ids.
///
/// Why: SPEC §3 — request ids correlate proxy and upstream logs; a repeated
/// id would merge unrelated requests.
#[tokio::test]
async fn request_id_is_generated_and_distinct_when_absent() {
    let up = Upstream::start();
    let tg = Tiergate::start(&config(&up.url(), "", ""));
    for _ in 0..2 {
        let (status, _, text) = send(
            client()
                .get(format!("{}/id", tg.proxy_url()))
                .header("x-tenant-id", "t1"),
        )
        .await;
        assert_eq!(status, 200, "{text}");
    }
    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    let a = seen[0].header("x-request-id").unwrap_or("");
    let b = seen[1].header("x-request-id").unwrap_or("");
    assert!(!a.is_empty() && !b.is_empty(), "missing ids: {a:?} {b:?}");
    assert_ne!(a, b, "request ids repeat");
}

/// From a trusted proxy, the peer is appended to the client's
/// `X-Forwarded-For` instead of replacing it.
///
/// Why: SPEC §3 — behind a load balancer the upstream must still see the
/// real client chain.
#[tokio::test]
async fn trusted_peer_xff_is_appended() {
    let up = Upstream::start();
    let server = r#"  trusted_proxies: ["127.0.0.1/32"]"#;
    let tg = Tiergate::start(&config(&up.url(), server, ""));
    let (status, _, text) = send(
        client()
            .get(format!("{}/who", tg.proxy_url()))
            .header("x-tenant-id", "t1")
            .header("x-forwarded-for", "203.0.113.7"),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let seen = up.last().expect("upstream saw the request");
    assert_eq!(
        seen.header_all("x-forwarded-for"),
        vec!["203.0.113.7, 127.0.0.1"]
    );

    // Without a client X-Forwarded-For, the trusted peer starts the chain.
    let (status, _, text) = send(
        client()
            .get(format!("{}/who", tg.proxy_url()))
            .header("x-tenant-id", "t1"),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let seen = up.last().expect("upstream saw the request");
    assert_eq!(seen.header_all("x-forwarded-for"), vec!["127.0.0.1"]);
}

/// Hop-by-hop headers — those named in `Connection` and the RFC 9110 list
/// (`keep-alive`, `te`, `proxy-authorization`) — are not forwarded.
///
/// Why: RFC 9110 §7.6.1; forwarding `proxy-authorization` would leak
/// credentials meant for this hop to the upstream.
#[test]
fn hop_by_hop_headers_are_not_forwarded() {
    let up = Upstream::start();
    let tg = Tiergate::start(&config(&up.url(), "", ""));
    let req = "GET /hop HTTP/1.1\r\n\
        Host: tiergate\r\n\
        x-tenant-id: t1\r\n\
        Connection: close, x-secret\r\n\
        x-secret: do-not-forward\r\n\
        Keep-Alive: timeout=5\r\n\
        TE: gzip\r\n\
        Proxy-Authorization: Basic dXNlcjpwYXNz\r\n\
        x-kept: yes\r\n\
        \r\n";
    let resp = raw_http(tg.proxy_addr(), req.as_bytes(), Duration::from_secs(5));
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let seen = up.last().expect("upstream saw the request");
    assert_eq!(seen.header("x-kept"), Some("yes"), "{:?}", seen.headers);
    for h in ["x-secret", "keep-alive", "te", "proxy-authorization"] {
        assert_eq!(
            seen.header(h),
            None,
            "{h} was forwarded: {:?}",
            seen.headers
        );
    }
    if let Some(c) = seen.header("connection") {
        assert!(!c.contains("x-secret"), "connection forwarded: {c}");
    }
}

/// Trailer fields flow from the upstream to the client: a client that
/// sends `TE: trailers` (here listed in `Connection`, as RFC 9110 asks of
/// it) gets the upstream's `Trailer` header and, after the last chunk, the
/// trailer field. A client's own trailer fields never reach the upstream.
///
/// Why: gRPC-web, checksums and streamed status lines travel in trailers;
/// a proxy that drops `TE: trailers` or `Trailer` silently loses them. A
/// request trailer would arrive after tiergate's checks, so it could carry
/// a forged `x-tenant-tier` or `x-tenant-id` past them.
#[test]
fn trailers_flow_from_the_upstream_only() {
    let up = Upstream::start();
    let tg = Tiergate::start(&config(&up.url(), "", ""));
    let req = "GET /trailers HTTP/1.1\r\n\
        Host: tiergate\r\n\
        x-tenant-id: t1\r\n\
        TE: trailers\r\n\
        Connection: TE, close\r\n\
        \r\n";
    let resp = raw_http(tg.proxy_addr(), req.as_bytes(), Duration::from_secs(5)).to_lowercase();
    assert!(resp.starts_with("http/1.1 200"), "{resp}");
    assert!(resp.contains("\r\ntrailer: x-checksum\r\n"), "{resp}");
    assert!(
        resp.ends_with("\r\n0\r\nx-checksum: abc\r\n\r\n"),
        "no trailer after the last chunk: {resp:?}"
    );
    let seen = up.last().expect("upstream saw the request");
    assert_eq!(seen.header("te"), Some("trailers"), "{:?}", seen.headers);
    assert_eq!(seen.header("connection"), Some("te"), "{:?}", seen.headers);

    let req = "POST /upload HTTP/1.1\r\n\
        Host: tiergate\r\n\
        x-tenant-id: t1\r\n\
        Trailer: x-tenant-tier, x-tenant-id, x-checksum\r\n\
        Transfer-Encoding: chunked\r\n\
        Connection: close\r\n\
        \r\n\
        4\r\nbody\r\n0\r\nx-tenant-tier: enterprise\r\nx-tenant-id: victim\r\nx-checksum: 1\r\n\r\n";
    let resp = raw_http(tg.proxy_addr(), req.as_bytes(), Duration::from_secs(5));
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let seen = up.last().expect("upstream saw the upload");
    assert_eq!(seen.body_len, 4);
    assert_eq!(seen.header("trailer"), None, "{:?}", seen.headers);
    assert!(
        seen.trailers.is_empty(),
        "client trailers forwarded: {:?}",
        seen.trailers
    );
}

/// Request headers over `max_header_bytes` are answered 431 by the parser.
///
/// Why: SPEC §2/§5 — an unbounded header section is a memory DoS.
#[test]
fn oversized_headers_are_431() {
    let up = Upstream::start();
    let tg = Tiergate::start(&config(&up.url(), "  max_header_bytes: 8KiB", ""));
    let mut req = String::from("GET /big HTTP/1.1\r\nHost: tiergate\r\nx-tenant-id: t1\r\n");
    for i in 0..20 {
        req.push_str(&format!("x-filler-{i}: {}\r\n", "f".repeat(1000)));
    }
    req.push_str("Connection: close\r\n\r\n");
    let resp = raw_http(tg.proxy_addr(), req.as_bytes(), Duration::from_secs(5));
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp:.300}");
    assert_eq!(up.count(), 0);
}

/// A declared body over `max_body_bytes` is 413 `body_too_large` before the
/// upstream is contacted.
///
/// Why: SPEC §5 — oversize uploads are refused cheaply, and the upstream
/// never pays for them.
#[tokio::test]
async fn declared_body_over_limit_is_413_before_upstream() {
    let up = Upstream::start();
    let tg = Tiergate::start(&config(&up.url(), "  max_body_bytes: 1KiB", ""));
    let resp = send(
        client()
            .post(format!("{}/upload", tg.proxy_url()))
            .header("x-tenant-id", "t1")
            .body(vec![b'x'; 4096]),
    )
    .await;
    assert_tiergate_error(&resp, 413, "body_too_large");
    assert_eq!(up.count(), 0, "upstream saw the oversized request");
}

/// A chunked body with no Content-Length is cut off once it streams past
/// `max_body_bytes`, and the client gets 413 `body_too_large`.
///
/// Why: SPEC §2 — the limit is enforced while streaming too, or chunked
/// encoding would bypass it.
#[test]
fn streamed_chunked_body_over_limit_is_413() {
    let up = Upstream::start();
    let tg = Tiergate::start(&config(&up.url(), "  max_body_bytes: 1KiB", ""));
    let mut req = b"POST /upload HTTP/1.1\r\nHost: tiergate\r\nx-tenant-id: t1\r\n\
        Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        .to_vec();
    for _ in 0..64 {
        req.extend_from_slice(b"400\r\n");
        req.extend_from_slice(&[b'y'; 1024]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let resp = raw_http(tg.proxy_addr(), &req, Duration::from_secs(5));
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp:.500}");
    assert!(
        resp.to_ascii_lowercase()
            .contains("x-tiergate-error: body_too_large"),
        "{resp:.500}"
    );
    assert!(resp.contains(r#""error":"body_too_large""#), "{resp:.500}");
    assert!(
        up.seen().iter().all(|s| s.body_len <= 1024),
        "upstream got more than the limit: {:?}",
        up.seen()
    );
}

/// A body under the limit streams through to the upstream and back intact.
///
/// Why: SPEC §5 — admitted requests are proxied byte for byte.
#[tokio::test]
async fn body_under_limit_streams_through_echo() {
    let up = Upstream::start();
    let tg = Tiergate::start(&config(&up.url(), "  max_body_bytes: 1KiB", ""));
    let payload: Vec<u8> = (0..512u32).map(|i| (i % 251) as u8).collect();
    let resp = client()
        .post(format!("{}/echo", tg.proxy_url()))
        .header("x-tenant-id", "t1")
        .header("content-type", "application/octet-stream")
        .body(payload.clone())
        .send()
        .await
        .expect("echo request");
    assert_eq!(resp.status(), 200);
    let got = resp.bytes().await.expect("echo body");
    assert_eq!(got.as_ref(), payload.as_slice());
    assert_eq!(up.last().expect("seen").body_len, 512);
}

/// An unreachable upstream is 502 `bad_gateway`, and the body does not
/// reveal the upstream's address.
///
/// Why: SPEC §5 — internal addresses are logged, never sent to clients.
#[tokio::test]
async fn unreachable_upstream_is_502_without_leaking_address() {
    let tg = Tiergate::start(&config(&closed_port_url(), "", ""));
    let resp = send(
        client()
            .get(format!("{}/x", tg.proxy_url()))
            .header("x-tenant-id", "t1"),
    )
    .await;
    assert_tiergate_error(&resp, 502, "bad_gateway");
    // Admitted first, so the decision's rate-limit headers are there.
    assert_eq!(header(&resp.1, "x-ratelimit-limit"), "100", "{:?}", resp.1);
    assert!(!resp.2.contains("127.0.0.1"), "leaks address: {}", resp.2);
}

/// An upstream slower than `upstream.timeout` is 504 `gateway_timeout`
/// (not 408), without leaking the upstream's address.
///
/// Why: SPEC §5 — a slow upstream is the gateway's timeout, and clients and
/// SREs must be able to tell it apart from a slow client.
#[tokio::test]
async fn slow_upstream_is_504_gateway_timeout() {
    let up = Upstream::start();
    let tg = Tiergate::start(&config(&up.url(), "", "  timeout: 300ms"));
    let resp = send(
        client()
            .get(format!("{}/slow?ms=2000", tg.proxy_url()))
            .header("x-tenant-id", "t1"),
    )
    .await;
    assert_tiergate_error(&resp, 504, "gateway_timeout");
    // Admitted first, so the decision's rate-limit headers are there.
    assert_eq!(header(&resp.1, "x-ratelimit-limit"), "100", "{:?}", resp.1);
    assert!(!resp.2.contains("127.0.0.1"), "leaks address: {}", resp.2);
}

/// The upstream's own 503 is passed through untouched, without
/// `x-tiergate-error`.
///
/// Why: SPEC §5 — SREs tell proxy errors from upstream errors by that
/// header.
#[tokio::test]
async fn upstream_503_passes_through_without_tiergate_error() {
    let up = Upstream::start();
    let tg = Tiergate::start(&config(&up.url(), "", ""));
    let (status, headers, text) = send(
        client()
            .get(format!("{}/status/503", tg.proxy_url()))
            .header("x-tenant-id", "t1"),
    )
    .await;
    assert_eq!(status, 503, "{text}");
    assert_eq!(text, r#"{"status":503}"#);
    assert_eq!(header(&headers, "x-upstream"), "1");
    assert!(
        headers.get("x-tiergate-error").is_none(),
        "x-tiergate-error on an upstream response: {headers:?}"
    );
    assert_eq!(header(&headers, "x-ratelimit-limit"), "100");
}

/// HTTP/2 cleartext with prior knowledge is served, with the rate-limit
/// headers.
///
/// Why: SPEC §5 — h2c is part of the listener contract (gRPC-style clients
/// and service meshes use it).
#[tokio::test]
async fn h2c_prior_knowledge_is_served_with_rate_limit_headers() {
    let up = Upstream::start();
    let tg = Tiergate::start(&config(&up.url(), "", ""));
    let (status, headers, body) = h2c_request(
        "GET",
        &format!("{}/h2", tg.proxy_url()),
        &[("x-tenant-id", "acme")],
        Bytes::new(),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let get = |k: &str| {
        headers
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    };
    assert_eq!(get("x-upstream"), "1");
    assert_eq!(get("x-ratelimit-limit"), "500");
    assert_eq!(get("x-ratelimit-remaining"), "499");
    assert_eq!(get("ratelimit-policy"), r#""tenant";q=500;w=30000"#);
    assert!(
        get("ratelimit").starts_with(r#""tenant";r=499;t="#),
        "{headers:?}"
    );
    let seen = up.last().expect("upstream saw it");
    assert_eq!(seen.header("x-tenant-id"), Some("acme"));
    assert_eq!(seen.header("x-tenant-tier"), Some("enterprise"));
}

/// A TCP stream whose first write sends only the first `first` bytes, and
/// whose next write waits a moment: the server sees a connection's opening
/// bytes arrive in two parts.
struct OpensInParts {
    inner: tokio::net::TcpStream,
    first: usize,
    written: usize,
    pause: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl tokio::io::AsyncRead for OpensInParts {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for OpensInParts {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::future::Future;
        use std::task::{Poll, ready};
        if self.written == 0 {
            let part = data.len().min(self.first);
            let n = ready!(std::pin::Pin::new(&mut self.inner).poll_write(cx, &data[..part]))?;
            self.written = n;
            self.pause = Some(Box::pin(tokio::time::sleep(Duration::from_millis(300))));
            return Poll::Ready(Ok(n));
        }
        if let Some(pause) = self.pause.as_mut() {
            ready!(pause.as_mut().poll(cx));
            self.pause = None;
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An h2c client whose preface reaches tiergate in two parts is still
/// served HTTP/2: tiergate peeks at a connection's first bytes to tell
/// HTTP/2 from HTTP/1, and bytes that are only the start of the preface
/// cannot tell yet (src/server/protocol.rs).
#[tokio::test]
async fn h2c_whose_preface_arrives_in_two_parts_is_served() {
    use http_body_util::{BodyExt, Empty};

    let up = Upstream::start();
    let tg = Tiergate::start(&config(&up.url(), "", ""));
    let tcp = tokio::net::TcpStream::connect(tg.proxy_addr())
        .await
        .expect("connect");
    let io = OpensInParts {
        inner: tcp,
        first: 10, // "PRI * HTTP"
        written: 0,
        pause: None,
    };
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .uri(format!("{}/h2-in-parts", tg.proxy_url()))
        .header("x-tenant-id", "acme")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("answered in time")
        .expect("h2 response");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert!(!body.is_empty());
    let seen = up.last().expect("upstream saw it");
    assert_eq!(seen.header("x-tenant-id"), Some("acme"));
}

/// An HTTP/1 request whose first byte, `P`, arrives alone could still be
/// the HTTP/2 preface; once the rest comes it is served as HTTP/1 (fails
/// if such a connection is taken for HTTP/2, or left waiting).
#[test]
fn an_http1_request_whose_first_byte_arrives_alone_is_served() {
    use std::io::{Read, Write};

    let up = Upstream::start();
    let tg = Tiergate::start(&config(&up.url(), "", ""));
    let mut s = std::net::TcpStream::connect(tg.proxy_addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(b"P").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    s.write_all(
        b"OST /in-parts HTTP/1.1\r\nhost: t\r\nx-tenant-id: acme\r\n\
          content-length: 2\r\nconnection: close\r\n\r\nhi",
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let seen = up.last().expect("upstream saw it");
    assert_eq!(seen.header("x-tenant-id"), Some("acme"));
}

/// One keep-alive connection carrying several tenants gets each request's
/// own tenant and bucket headers: tiergate keeps the last request's
/// `X-Tenant-Id` and rate-limit header values per connection, and must not
/// show them for a different tenant, burst, window or bucket state. `bob`
/// (free) and `carol` (twice) share the bucket name and burst, and differ
/// only in window; `acme` comes twice in a row, one token apart.
///
/// Why: SPEC §3/§5 — the upstream trusts `X-Tenant-Id`, and clients pace
/// themselves by the policy they are shown.
#[tokio::test]
async fn one_connection_carrying_several_tenants_shows_each_its_own() {
    let up = Upstream::start();
    let tg = Tiergate::start(&config(&up.url(), "", ""));
    let stream = tokio::net::TcpStream::connect(tg.proxy_addr())
        .await
        .expect("connect to tiergate");
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("HTTP/1 handshake");
    tokio::spawn(conn);
    let steps = [
        (
            "acme",
            "enterprise",
            "500",
            r#""tenant";q=500;w=30000"#,
            499,
        ),
        ("bob", "free", "100", r#""tenant";q=100;w=6000"#, 99),
        ("carol", "twice", "100", r#""tenant";q=100;w=3000"#, 99),
        (
            "acme",
            "enterprise",
            "500",
            r#""tenant";q=500;w=30000"#,
            498,
        ),
        (
            "acme",
            "enterprise",
            "500",
            r#""tenant";q=500;w=30000"#,
            497,
        ),
        ("bob", "free", "100", r#""tenant";q=100;w=6000"#, 98),
    ];
    for (i, (tenant, tier, limit, policy, remaining)) in steps.into_iter().enumerate() {
        let req = http::Request::get(format!("{}/step{i}", tg.proxy_url()))
            .header("host", "tiergate")
            .header("x-tenant-id", tenant)
            .body(http_body_util::Empty::<Bytes>::new())
            .expect("request");
        let resp = send
            .send_request(req)
            .await
            .expect("response on the connection");
        assert_eq!(resp.status(), 200, "step {i} ({tenant})");
        let h = resp.headers();
        let got = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).unwrap_or("");
        assert_eq!(got("x-ratelimit-limit"), limit, "step {i} ({tenant})");
        assert_eq!(got("ratelimit-policy"), policy, "step {i} ({tenant})");
        assert_eq!(
            got("x-ratelimit-remaining"),
            remaining.to_string(),
            "step {i} ({tenant})"
        );
        let state = format!(r#""tenant";r={remaining};t="#);
        assert!(got("ratelimit").starts_with(&state), "step {i}: {h:?}");
        let seen = up.last().expect("upstream saw it");
        assert_eq!(seen.header_all("x-tenant-id"), vec![tenant], "step {i}");
        assert_eq!(seen.header_all("x-tenant-tier"), vec![tier], "step {i}");
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .expect("body");
    }
    assert_eq!(up.count(), steps.len());
}

/// The admin listener answers `/healthz`, `/readyz` (memory backend,
/// ready) and `/metrics` with the contract metric names.
///
/// Why: SPEC §7/§8 — orchestrators probe these, and dashboards and alerts
/// are written against these names.
#[tokio::test]
async fn admin_health_ready_and_metrics() {
    let up = Upstream::start();
    let tg = Tiergate::start(&config(&up.url(), "", ""));
    let http = client();

    let (status, _, text) = send(http.get(format!("{}/healthz", tg.admin_url()))).await;
    assert_eq!(status, 200, "{text}");

    let (status, headers, text) = send(http.get(format!("{}/readyz", tg.admin_url()))).await;
    assert_eq!(status, 200, "{text}");
    assert!(header(&headers, "content-type").starts_with("application/json"));
    let body: Value = serde_json::from_str(&text).expect("readyz JSON");
    assert_eq!(
        body,
        serde_json::json!({"status": "ready", "backend": "memory", "degraded": false})
    );

    // One decided request so labelled series exist.
    let (status, _, _) = send(
        http.get(format!("{}/m", tg.proxy_url()))
            .header("x-tenant-id", "t1"),
    )
    .await;
    assert_eq!(status, 200);

    let (status, _, text) = send(http.get(format!("{}/metrics", tg.admin_url()))).await;
    assert_eq!(status, 200);
    for name in [
        "tiergate_requests_total",
        "tiergate_limiter_duration_seconds",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("tiergate_requests_total{")
                && l.contains(r#"decision="allowed""#)
                && l.contains(r#"tier="free""#)),
        "no allowed free request counted:\n{text}"
    );
}

/// `tiergate check` on the shipped example config exits 0 with a one-line
/// summary on stdout.
///
/// Why: SPEC §1 — the example must stay valid, and CI scripts rely on the
/// exit code.
#[test]
fn check_on_example_config_exits_0_with_one_line_summary() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/tiergate.yaml");
    let (code, stdout, stderr) = run_tiergate(&["check", "--config", path], &[]);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "not one line: {stdout:?}");
}

/// A WebSocket-style upgrade passes through once admitted: the client gets
/// the upstream's 101 and the two connections are spliced, bytes echoing
/// both ways; an upgrade from a tenant over its limit never reaches the
/// upstream.
#[test]
fn admitted_upgrade_is_spliced_through() {
    use std::io::{Read, Write};
    let upstream = Upstream::start();
    let yaml = config(&upstream.url(), "", "").replace("burst: 100", "burst: 1");
    let tg = Tiergate::start(&yaml);
    let mut s = std::net::TcpStream::connect(tg.proxy_addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nhost: x\r\nx-tenant-id: bob\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
    )
    .unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut buf).expect("read response head");
        assert!(
            n > 0,
            "closed before the response head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(buf[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("x-ratelimit-remaining: 0"), "{head}");
    s.write_all(b"ping-over-upgrade").unwrap();
    let mut echoed = [0u8; 17];
    s.read_exact(&mut echoed).expect("echo through the splice");
    assert_eq!(&echoed, b"ping-over-upgrade");
    // The tenant's only token is spent: a second upgrade is refused here.
    let refused = raw_http(
        tg.proxy_addr(),
        b"GET /ws HTTP/1.1\r\nhost: x\r\nx-tenant-id: bob\r\nconnection: upgrade, close\r\nupgrade: websocket\r\n\r\n",
        Duration::from_secs(2),
    );
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    assert_eq!(upstream.count(), 1);
}
