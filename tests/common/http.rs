//! Small HTTP client helpers for tests.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// A `reqwest` client that ignores any proxy settings in the environment
/// (`.no_proxy()`), with a 30 s overall per-request timeout as a safety net.
/// HTTP/1.1 only; use [`h2c_request`] for HTTP/2.
pub fn client() -> reqwest::Client {
    client_with_timeout(Duration::from_secs(30))
}

/// Like [`client`] but with a 5 s per-request timeout, for tests where a
/// hung request is a finding rather than a hung test.
pub fn client_5s() -> reqwest::Client {
    client_with_timeout(Duration::from_secs(5))
}

/// A `reqwest` client that ignores proxy settings, bounded by `timeout` per
/// request.
fn client_with_timeout(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
        .expect("build reqwest client")
}

/// Fires `n` GET requests to `url` with `headers` concurrently and returns
/// their statuses in request order. Bodies are read to the end. A transport
/// error (connection refused/reset, timeout) shows up as status `0`.
pub async fn burst(
    client: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
    n: usize,
) -> Vec<u16> {
    let requests = (0..n).map(|_| {
        let mut req = client.get(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        async move {
            match req.send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let _ = resp.bytes().await;
                    status
                }
                Err(_) => 0,
            }
        }
    });
    futures_util::future::join_all(requests).await
}

/// Writes `bytes` to a fresh TCP connection to `addr` and reads the reply
/// until EOF or until `timeout` (overall) elapses; returns it as lossy UTF-8.
///
/// For malformed/oversized requests (431, request smuggling). Write errors are
/// ignored (the server may close early), and whatever was read before a
/// reset or timeout is returned. Blocking; the caller's servers must run on
/// other threads or processes (true for [`Tiergate`](super::Tiergate) and
/// [`Upstream`](super::Upstream)).
pub fn raw_http(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .unwrap_or_else(|e| panic!("raw_http: connect to {addr}: {e}"));
    let _ = stream.set_write_timeout(Some(timeout));
    let _ = stream.write_all(bytes);
    let _ = stream.flush();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends one HTTP/2 request over cleartext (h2c, prior knowledge) and returns
/// `(status, headers, body)`; header names are lowercase. Must be awaited
/// inside a tokio runtime. Panics on transport errors.
pub async fn h2c_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> (u16, Vec<(String, String)>, Bytes) {
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let mut req = hyper::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).expect("build h2c request");
    let resp = client
        .request(req)
        .await
        .unwrap_or_else(|e| panic!("h2c {method} {url}: {e:?}"));
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap_or_else(|e| panic!("h2c {method} {url}: reading body: {e}"))
        .to_bytes();
    (status, headers, body)
}
