//! How tiergate holds upstream connections (src/proxy/affinity.rs): each
//! client connection reuses one upstream connection of its own, a closed or
//! quiet client connection gives it back, an upstream that closes its side
//! (`connection: close`) costs the client nothing, and concurrent HTTP/2
//! streams still all get through.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{CountingUpstream, Tiergate, poll_until};

fn config(upstream: &str, server_extra: &str) -> String {
    format!(
        r#"
server:
  listen: "127.0.0.1:0"
{server_extra}
admin:
  listen: "127.0.0.1:0"
upstream:
  url: "{upstream}"
tiers:
  free: {{ rate: 1/m, burst: 1000 }}
default_tier: free
"#
    )
}

/// A keep-alive HTTP/1.1 client connection that reads whole responses.
struct KeepAlive {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl KeepAlive {
    fn connect(addr: SocketAddr) -> KeepAlive {
        let stream = TcpStream::connect(addr).expect("connect to tiergate");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        KeepAlive {
            stream,
            buf: Vec::new(),
        }
    }

    /// Sends one GET and returns the response status.
    fn get(&mut self, path: &str) -> u16 {
        let req = format!("GET {path} HTTP/1.1\r\nhost: t\r\nx-tenant-id: acme\r\n\r\n");
        self.stream
            .write_all(req.as_bytes())
            .expect("write request");
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                if self.buf.len() >= end + 4 + len {
                    self.buf.drain(..end + 4 + len);
                    return head
                        .split_whitespace()
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                }
            }
            let n = self.stream.read(&mut chunk).expect("read response");
            assert!(n > 0, "tiergate closed the client connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[test]
fn a_client_connection_reuses_one_upstream_connection() {
    let up = CountingUpstream::start(false);
    let tg = Tiergate::start(&config(&up.url(), ""));
    let mut c = KeepAlive::connect(tg.proxy_addr());
    for i in 0..50 {
        assert_eq!(c.get(&format!("/r{i}")), 200);
    }
    assert_eq!(up.requests(), 50);
    assert_eq!(up.accepted(), 1, "50 requests on one client connection");
    // A second client connection gets its own upstream connection.
    let mut d = KeepAlive::connect(tg.proxy_addr());
    assert_eq!(d.get("/other"), 200);
    assert_eq!(c.get("/again"), 200);
    assert_eq!(up.accepted(), 2);
}

#[test]
fn an_upstream_that_closes_after_every_response_gets_a_new_connection_each_time() {
    let up = CountingUpstream::start(true);
    let tg = Tiergate::start(&config(&up.url(), ""));
    let mut c = KeepAlive::connect(tg.proxy_addr());
    for i in 0..30 {
        assert_eq!(c.get(&format!("/r{i}")), 200, "request {i}");
    }
    assert_eq!(up.requests(), 30);
    assert_eq!(up.accepted(), 30, "one upstream connection per response");
}

#[test]
fn closing_the_client_connection_closes_its_upstream_connection() {
    let up = CountingUpstream::start(false);
    let tg = Tiergate::start(&config(&up.url(), ""));
    let mut c = KeepAlive::connect(tg.proxy_addr());
    assert_eq!(c.get("/"), 200);
    assert_eq!(up.open(), 1);
    drop(c);
    assert!(
        poll_until(Duration::from_secs(5), || up.open() == 0),
        "upstream connection still open after the client left"
    );
}

#[test]
fn a_quiet_client_connection_gives_its_upstream_connection_back() {
    let up = CountingUpstream::start(false);
    // Checks run every header_read_timeout / 4 = 100 ms.
    let tg = Tiergate::start(&config(
        &up.url(),
        "  header_read_timeout: 400ms\n  idle_timeout: 60s",
    ));
    let mut c = KeepAlive::connect(tg.proxy_addr());
    assert_eq!(c.get("/"), 200);
    assert!(
        poll_until(Duration::from_secs(5), || up.open() == 0),
        "the quiet client connection kept its upstream connection"
    );
    // The client connection itself stays usable.
    assert_eq!(c.get("/later"), 200);
    assert_eq!(up.accepted(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_http2_streams_of_one_connection_all_get_through() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let up = CountingUpstream::start(false);
    let tg = Tiergate::start(&config(&up.url(), ""));
    let tcp = tokio::net::TcpStream::connect(tg.proxy_addr())
        .await
        .expect("connect");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let mut tasks = Vec::new();
    for i in 0..40 {
        let mut s = sender.clone();
        tasks.push(tokio::spawn(async move {
            let req = hyper::Request::builder()
                .uri(format!("http://t/s{i}"))
                .header("x-tenant-id", "acme")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = s.send_request(req).await.expect("h2 request");
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            (status, body)
        }));
    }
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(&body[..], b"ok");
    }
    assert_eq!(up.requests(), 40);
}
