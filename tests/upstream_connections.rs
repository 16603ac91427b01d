//! How tiergate holds upstream connections (src/proxy/affinity.rs): each
//! client connection reuses one upstream connection of its own, a closed or
//! quiet client connection gives it back, an upstream that closes its side
//! (`connection: close`) costs the client nothing, and concurrent HTTP/2
//! streams still all get through.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{Behaviour, CountingUpstream, Tiergate, Upstream, poll_until};

fn config(upstream: &str, server_extra: &str) -> String {
    config_with(upstream, server_extra, "")
}

fn config_with(upstream: &str, server_extra: &str, upstream_extra: &str) -> String {
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
  free: {{ rate: 1/m, burst: 1000000 }}
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
        self.send("GET", path, "")
    }

    /// Sends one request (with `body`, if not empty) and returns the
    /// response status. A HEAD response has no body, whatever its
    /// `content-length`.
    fn send(&mut self, method: &str, path: &str, body: &str) -> u16 {
        let length = if body.is_empty() {
            String::new()
        } else {
            format!("content-length: {}\r\n", body.len())
        };
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: t\r\nx-tenant-id: acme\r\n{length}\r\n{body}"
        );
        self.stream
            .write_all(req.as_bytes())
            .expect("write request");
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
                let len: usize = if method == "HEAD" {
                    0
                } else {
                    head.lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0)
                };
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

/// Settings for the tests of an upstream that closes a connection as a
/// request arrives: the watchdog sweeps every `upstream.timeout` / 8 =
/// 250 ms, and a quiet client connection keeps its upstream connection for
/// `header_read_timeout` / 4 = 2.5 s, so after a pause of 1 s the next
/// request reuses a connection idle since before the last sweep.
const PAUSE: Duration = Duration::from_secs(1);

/// An upstream behaving as `behaviour`, tiergate in front of it, and a
/// client connection that has had one GET answered and then paused, so
/// its next request reuses a connection idle since before the last sweep.
fn after_a_pause(behaviour: Behaviour) -> (CountingUpstream, Tiergate, KeepAlive) {
    let up = CountingUpstream::with(behaviour);
    let tg = Tiergate::start(&racing_config(&up));
    let mut c = KeepAlive::connect(tg.proxy_addr());
    assert_eq!(c.get("/first"), 200);
    std::thread::sleep(PAUSE);
    (up, tg, c)
}

fn racing_config(up: &CountingUpstream) -> String {
    config_with(&up.url(), "", "  timeout: 2s")
}

/// The upstream's keep-alive timer closes the connection just as tiergate
/// reuses it, after the request was written: a GET goes again, once, on a
/// new connection, and the client never sees the race (nginx does the same).
#[test]
fn a_get_lost_to_an_upstream_closing_its_idle_connection_is_sent_again() {
    let (up, _tg, mut c) = after_a_pause(Behaviour::DropSecondOnConnection);
    assert_eq!(c.get("/second"), 200, "the dropped GET was not sent again");
    assert_eq!(
        up.dropped(),
        1,
        "the upstream read the GET on the old connection"
    );
    assert_eq!(up.accepted(), 2, "sent again on a new connection");
    assert_eq!(up.requests(), 2);
}

/// The same race when the upstream resets the connection instead of
/// closing it; and a HEAD and a DELETE go again too.
#[test]
fn a_request_lost_to_a_reset_is_sent_again() {
    let (up, _tg, mut c) = after_a_pause(Behaviour::ResetSecondOnConnection);
    assert_eq!(c.get("/second"), 200, "the reset GET was not sent again");
    assert_eq!((up.dropped(), up.accepted()), (1, 2));
    std::thread::sleep(PAUSE);
    assert_eq!(c.send("DELETE", "/item/1", ""), 200);
    assert_eq!((up.dropped(), up.accepted()), (2, 3));
    std::thread::sleep(PAUSE);
    assert_eq!(c.send("HEAD", "/item/2", ""), 200);
    assert_eq!((up.dropped(), up.accepted()), (3, 4));
}

/// A request with a body, or with a method that is not idempotent, may
/// have had its effect: it is not repeated, the client gets the 502.
#[test]
fn a_post_lost_the_same_way_is_not_sent_again() {
    let (up, _tg, mut c) = after_a_pause(Behaviour::DropSecondOnConnection);
    // A POST, even without a body: not idempotent.
    assert_eq!(c.send("POST", "/order", ""), 502);
    assert_eq!(up.dropped(), 1);
    assert_eq!(up.accepted(), 1, "no second connection for the POST");
    // A PUT is idempotent, but its body has been consumed: not repeated.
    assert_eq!(c.get("/again"), 200);
    std::thread::sleep(PAUSE);
    assert_eq!(c.send("PUT", "/item", "x"), 502);
    assert_eq!(up.dropped(), 2);
    assert_eq!(up.accepted(), 2);
}

/// One more try, not a loop: when the new connection fails too, the
/// client gets the 502.
#[test]
fn a_get_is_sent_again_only_once() {
    let (up, _tg, mut c) = after_a_pause(Behaviour::DropAllButFirst);
    assert_eq!(c.get("/second"), 502);
    assert_eq!(up.dropped(), 2, "the GET and its one repeat");
    assert_eq!(up.accepted(), 2);
}

/// A request body of HTTP/2 test streams, fed chunk by chunk.
type Frames = std::pin::Pin<
    Box<
        dyn futures_util::Stream<
                Item = Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
            > + Send,
    >,
>;

/// A request body fed chunk by chunk through a channel; it ends when the
/// channel's sender is dropped.
fn body(rx: tokio::sync::mpsc::Receiver<bytes::Bytes>) -> http_body_util::StreamBody<Frames> {
    http_body_util::StreamBody::new(Box::pin(futures_util::stream::unfold(
        rx,
        |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok(hyper::body::Frame::data(b)), rx))
        },
    )))
}

/// One h2c client connection whose streams can be made to hold the client
/// connection's own upstream connection, so that the next go through the
/// worker's shared pool.
struct Streams {
    sender: hyper::client::conn::http2::SendRequest<http_body_util::StreamBody<Frames>>,
}

/// A stream's body sender and its answer, once it comes.
type Held = (
    tokio::sync::mpsc::Sender<bytes::Bytes>,
    tokio::task::JoinHandle<hyper::Result<hyper::StatusCode>>,
);

impl Streams {
    async fn connect(addr: SocketAddr) -> Streams {
        Streams {
            sender: h2c_connect(addr).await,
        }
    }

    /// A bodiless GET for tenant acme, answered within 5 s: its status.
    async fn pooled_get(&self, path: &'static str) -> u16 {
        let mut s = self.sender.clone();
        // A body that ends at once (its sender is gone).
        let (_, rx) = tokio::sync::mpsc::channel(1);
        let req = hyper::Request::builder()
            .uri(format!("http://t{path}"))
            .header("x-tenant-id", "acme")
            .body(body(rx))
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), s.send_request(req))
            .await
            .expect("answered in time")
            .expect("stream")
            .status()
            .as_u16()
    }

    /// A POST of 10 bytes, none sent yet: once its first bytes are, it
    /// holds the client connection's own upstream connection until the
    /// rest comes.
    fn holding(&self, path: &'static str) -> Held {
        let mut s = self.sender.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let req = hyper::Request::builder()
            .method("POST")
            .uri(format!("http://t{path}"))
            .header("x-tenant-id", "acme")
            .header("content-length", "10")
            .body(body(rx))
            .unwrap();
        let answer = tokio::spawn(async move { s.send_request(req).await.map(|r| r.status()) });
        (tx, answer)
    }
}

/// Stream A, a POST whose body is half sent, holds the client connection's
/// own upstream connection; stream B then goes through the worker's shared
/// pool and is answered. Returns A's body sender and answer.
async fn one_held_one_pooled(h2: &Streams, up: &CountingUpstream) -> Held {
    let (a_tx, a) = h2.holding("/a");
    a_tx.send(bytes::Bytes::from_static(b"hello"))
        .await
        .unwrap();
    assert!(
        poll_until(Duration::from_secs(5), || up.heads() == 1),
        "stream A reached the upstream"
    );
    assert_eq!(h2.pooled_get("/b").await, 200, "stream B, through the pool");
    assert_eq!(up.accepted(), 2, "one connection each");
    (a_tx, a)
}

/// A connection the shared pool no longer hands out is closed, not kept:
/// a burst that grew the pool must not hold the upstream's sockets (and
/// tiergate's memory) after it. Here one stream holds the client
/// connection's own upstream connection while another goes through the
/// pool; the pooled one, then idle, is closed within a few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_pool_closes_a_connection_idle_for_over_a_second() {
    use bytes::Bytes;

    let up = CountingUpstream::start(false);
    let tg = Tiergate::start(&config(&up.url(), ""));
    let h2 = Streams::connect(tg.proxy_addr()).await;
    let (a_tx, a) = one_held_one_pooled(&h2, &up).await;
    assert_eq!(up.open(), 2);
    assert!(
        poll_until(Duration::from_secs(10), || up.open() == 1),
        "the pooled connection is still open 10 s after its response"
    );
    // Stream A's own connection was left alone.
    a_tx.send(Bytes::from_static(b"world")).await.unwrap();
    assert_eq!(a.await.unwrap().expect("stream A").as_u16(), 200);
    assert_eq!(up.accepted(), 2);
}

/// The shared pool does not reuse a connection that has been idle for over
/// a second, so an upstream's keep-alive timer cannot close one under a
/// request: by then the pool's timer has closed it (the test below), and
/// checkout skips one it has not closed yet. Here the pool carries an
/// HTTP/2 stream sent while another stream (a POST whose body is still
/// coming) holds the client connection's own upstream connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_pool_does_not_reuse_a_connection_idle_for_over_a_second() {
    use bytes::Bytes;

    let up = CountingUpstream::with(Behaviour::DropSecondOnConnection);
    let tg = Tiergate::start(&racing_config(&up));
    let h2 = Streams::connect(tg.proxy_addr()).await;
    let (a_tx, a) = one_held_one_pooled(&h2, &up).await;
    a_tx.send(Bytes::from_static(b"world")).await.unwrap();
    assert_eq!(a.await.unwrap().expect("stream A").as_u16(), 200);

    // Both upstream connections sit idle past a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (c_tx, _c) = h2.holding("/c");
    c_tx.send(Bytes::from_static(b"hello")).await.unwrap();
    assert!(
        poll_until(Duration::from_secs(5), || up.heads() == 3),
        "stream C reached the upstream"
    );
    let d = h2.pooled_get("/d").await;
    assert_eq!(
        d,
        200,
        "the pool reused a connection idle for 1.5 s; dropped {} accepted {}; logs: {:?}",
        up.dropped(),
        up.accepted(),
        tg.logs()
    );
    assert_eq!(up.dropped(), 0);
    assert_eq!(up.accepted(), 3, "a new pooled connection");
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

/// Mirrors `proxy::affinity::MAX_HELD_PER_WORKER`.
const MAX_HELD_PER_WORKER: usize = 256;

/// Many client connections that each send now and then must not hold one
/// upstream connection each: beyond the per-worker cap, requests go through
/// the shared pool; and a closed client connection gives its place back.
#[test]
fn upstream_connections_held_for_client_connections_are_capped_per_worker() {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cap = workers * MAX_HELD_PER_WORKER;
    let clients = cap + 100;
    let up = CountingUpstream::start(false);
    let tg = Tiergate::start(&config(&up.url(), "  max_connections_per_ip: 100000"));
    let phase = |round: usize| -> Vec<KeepAlive> {
        (0..clients)
            .map(|i| {
                let mut c = KeepAlive::connect(tg.proxy_addr());
                assert_eq!(c.get(&format!("/r{round}/{i}")), 200, "client {i}");
                c
            })
            .collect()
    };
    let first = phase(1);
    // At most `cap` held in slots, plus the shared pool's one connection
    // per worker (the requests beyond the cap came one at a time).
    let open = up.open();
    assert!(
        open <= cap + 2 * workers,
        "{open} upstream connections for {clients} client connections (cap {cap})"
    );
    drop(first);
    let before = up.accepted();
    let _second = phase(2);
    // Had the closed client connections not given their places back,
    // every request of this round would have gone through the pool. However
    // the kernel spread the connections, one worker got at least its cap.
    let fresh = up.accepted() - before;
    assert!(
        fresh >= MAX_HELD_PER_WORKER,
        "only {fresh} new upstream connections after the first clients left"
    );
}

/// One h2c (prior knowledge) client connection to `addr`, driven by a
/// spawned task; clone the sender for concurrent streams.
async fn h2c_connect<B>(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_http2_streams_of_one_connection_all_get_through() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};

    let up = CountingUpstream::start(false);
    let tg = Tiergate::start(&config(&up.url(), ""));
    let sender = h2c_connect(tg.proxy_addr()).await;
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

/// Reads from `s` until `buf` contains `needle` (or EOF / the read timeout:
/// then returns false).
fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, needle: &[u8]) -> bool {
    let mut chunk = [0u8; 4096];
    while !buf.windows(needle.len()).any(|w| w == needle) {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    true
}

/// A response still streaming when the client connection goes quiet (a
/// stream with pauses: here the echo of a request body whose sender
/// pauses) keeps its upstream connection: the quiet-client release must
/// not cut an exchange in the middle.
#[test]
fn a_pause_in_the_middle_of_a_streaming_exchange_does_not_cut_it() {
    let up = Upstream::start();
    // Checks run every header_read_timeout / 4 = 100 ms; the pause below
    // spans several of them.
    let tg = Tiergate::start(&config(
        &up.url(),
        "  header_read_timeout: 400ms\n  idle_timeout: 60s",
    ));
    let mut s = TcpStream::connect(tg.proxy_addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        b"POST /echo HTTP/1.1\r\nhost: t\r\nx-tenant-id: acme\r\ncontent-type: text/plain\r\n\
          transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .expect("write head and first chunk");
    let mut buf = Vec::new();
    assert!(
        read_until(&mut s, &mut buf, b"hello"),
        "first chunk echoed: {}",
        String::from_utf8_lossy(&buf)
    );
    std::thread::sleep(Duration::from_millis(600));
    s.write_all(b"5\r\nworld\r\n0\r\n\r\n")
        .expect("write the rest");
    assert!(
        read_until(&mut s, &mut buf, b"0\r\n\r\n"),
        "the response was cut after the pause: {}",
        String::from_utf8_lossy(&buf)
    );
    assert!(
        String::from_utf8_lossy(&buf).contains("world"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
}

/// An HTTP/2 stream whose response is still streaming holds the client
/// connection's own upstream connection; a second stream must go another
/// way at once, not wait behind it (nor, when it ends, take the first
/// stream's upstream connection down with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_http2_stream_does_not_wait_behind_a_streaming_one() {
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    let up = Upstream::start();
    let tg = Tiergate::start(&config(&up.url(), ""));
    let sender = h2c_connect(tg.proxy_addr()).await;

    // Stream A: an echo whose request body is sent in two parts.
    let (a_tx, a_rx) = mpsc::channel(4);
    let req = hyper::Request::builder()
        .method("POST")
        .uri("http://t/echo")
        .header("x-tenant-id", "acme")
        .body(body(a_rx))
        .unwrap();
    a_tx.send(Bytes::from_static(b"hello")).await.unwrap();
    let mut a = sender.clone();
    let resp = a.send_request(req).await.expect("stream A");
    assert_eq!(resp.status(), 200);
    let mut a_body = resp.into_body();
    let first = a_body.frame().await.expect("a frame").expect("frame ok");
    assert_eq!(first.into_data().ok().as_deref(), Some(&b"hello"[..]));

    // Stream B while A is still open.
    let (b_tx, b_rx) = mpsc::channel(1);
    drop(b_tx);
    let req = hyper::Request::builder()
        .uri("http://t/b")
        .header("x-tenant-id", "acme")
        .body(body(b_rx))
        .unwrap();
    let mut b = sender.clone();
    let resp = tokio::time::timeout(Duration::from_secs(5), b.send_request(req))
        .await
        .expect("stream B answered while A streams")
        .expect("stream B");
    assert_eq!(resp.status(), 200);

    // A finishes intact.
    a_tx.send(Bytes::from_static(b"world")).await.unwrap();
    drop(a_tx);
    let rest = a_body.collect().await.expect("rest of A").to_bytes();
    assert_eq!(&rest[..], b"world");
}

/// An HTTP/1.0 request without `Host` reaches the upstream with one (the
/// upstream's authority), as it did through the shared pool.
#[test]
fn an_http10_request_without_host_gets_the_upstreams() {
    let up = Upstream::start();
    let tg = Tiergate::start(&config(&up.url(), ""));
    let resp = common::raw_http(
        tg.proxy_addr(),
        b"GET /h10 HTTP/1.0\r\nx-tenant-id: acme\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(resp.starts_with("HTTP/1.0 200"), "{resp}");
    let seen = up.last().expect("upstream saw the request");
    let authority = up.url().trim_start_matches("http://").to_string();
    assert_eq!(seen.header("host"), Some(authority.as_str()), "{seen:?}");
}
