//! A real HTTP/1.1 + h2c origin server that records every request it sees.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::oneshot;

use super::free_port;

/// One request as received by the [`Upstream`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Request method, e.g. `"GET"`.
    pub method: String,
    /// Path plus query string, e.g. `"/slow?ms=50"`.
    pub path: String,
    /// Protocol version as hyper debug-prints it: `"HTTP/1.1"` or `"HTTP/2.0"`.
    pub version: String,
    /// All headers in arrival order; names lowercase, values lossy UTF-8.
    pub headers: Vec<(String, String)>,
    /// Number of request body bytes read (final once the body has ended).
    pub body_len: usize,
    /// Trailer fields that ended the request body (names lowercase).
    pub trailers: Vec<(String, String)>,
}

impl Seen {
    /// First value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// All values of header `name` (case-insensitive), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Shared request log of an [`Upstream`].
type SeenLog = Arc<Mutex<Vec<Seen>>>;
/// Response body type used by the upstream's handlers.
type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A test origin server on `127.0.0.1:<random>` speaking HTTP/1.1 and h2c
/// (prior knowledge), running on its own thread and tokio runtime so it works
/// from both `#[test]` and `#[tokio::test]`.
///
/// Behaviour by path:
/// - `/slow?ms=N`: sleeps N ms, then 200 with the default JSON body;
/// - `/echo`: streams the request body back as it arrives (same
///   `content-type`), 200;
/// - `/trailers`: 200, a chunked body `data` announced by
///   `Trailer: x-checksum`, then the trailer field `x-checksum: abc` (hyper
///   sends it only when the request said `TE: trailers`);
/// - `/status/N`: answers status N (JSON body `{"status":N}`, empty for
///   1xx/204/304);
/// - any request carrying an `Upgrade` header (HTTP/1.1): 101 with the same
///   `Upgrade` value, then echoes raw bytes on the upgraded connection;
/// - anything else: 200 `{"ok":true,"path":"<path>"}` as `application/json`.
///
/// Every response carries `x-upstream: 1`, so tests can tell upstream
/// responses from ones tiergate generated. Every request is recorded (at
/// arrival; `body_len` is filled in once the body has been read). Shut down on
/// drop.
pub struct Upstream {
    addr: SocketAddr,
    seen: SeenLog,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    /// Binds `127.0.0.1:0` and starts serving; ready when this returns.
    pub fn start() -> Upstream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        listener.set_nonblocking(true).expect("set_nonblocking");
        let addr = listener.local_addr().expect("upstream local_addr");
        let seen: SeenLog = Arc::default();
        let (tx, rx) = oneshot::channel();
        let log = seen.clone();
        let thread = std::thread::Builder::new()
            .name(format!("upstream-{}", addr.port()))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("upstream runtime");
                rt.block_on(serve(listener, log, rx));
                // Dropping the runtime here cancels in-flight connections.
            })
            .expect("spawn upstream thread");
        Upstream {
            addr,
            seen,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// Base URL, `http://127.0.0.1:P` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The socket address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A snapshot of every request received so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The most recent request, if any.
    pub fn last(&self) -> Option<Seen> {
        self.seen.lock().unwrap().last().cloned()
    }

    /// How many requests were received so far.
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// How many requests had a path (incl. query) starting with `prefix`.
    pub fn count_path(&self, prefix: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path.starts_with(prefix))
            .count()
    }

    /// Forgets every request recorded so far.
    pub fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A URL (`http://127.0.0.1:P`) of a port nothing listens on, for 502 tests.
pub fn closed_port_url() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

/// Accept loop: serves each connection with the auto (h1 + h2c) builder
/// until `shutdown` fires.
async fn serve(
    listener: std::net::TcpListener,
    seen: SeenLog,
    mut shutdown: oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let seen = seen.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, seen.clone()));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Records the request, then dispatches on its path.
async fn handle(mut req: Request<Incoming>, seen: SeenLog) -> Result<Response<Body>, Infallible> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    let idx = {
        let mut log = seen.lock().unwrap();
        log.push(Seen {
            method: req.method().to_string(),
            path: path.clone(),
            version: format!("{:?}", req.version()),
            headers: req
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body_len: 0,
            trailers: Vec::new(),
        });
        log.len() - 1
    };
    let route = req.uri().path().to_string();

    if let Some(proto) = req.headers().get(hyper::header::UPGRADE).cloned() {
        return Ok(upgrade(&mut req, proto));
    }
    if route == "/echo" {
        return Ok(echo(req, seen, idx));
    }

    let (body_len, trailers) = read_body(req.into_body()).await;
    if let Some(entry) = seen.lock().unwrap().get_mut(idx) {
        entry.body_len = body_len;
        entry.trailers = trailers;
    }

    if let Some(code) = route.strip_prefix("/status/") {
        return Ok(status_response(code));
    }
    if route == "/trailers" {
        return Ok(with_trailers());
    }
    if route == "/slow" {
        let ms = query_param(&path, "ms")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let body = serde_json::json!({ "ok": true, "path": route }).to_string();
    Ok(json_response(StatusCode::OK, body))
}

/// `/trailers`: one data frame, then a trailers frame.
fn with_trailers() -> Response<Body> {
    let mut trailers = hyper::HeaderMap::new();
    trailers.insert("x-checksum", HeaderValue::from_static("abc"));
    let frames = [
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"data"))),
        Ok(Frame::trailers(trailers)),
    ];
    let mut resp = Response::new(BodyExt::boxed_unsync(StreamBody::new(
        futures_util::stream::iter(frames),
    )));
    let h = resp.headers_mut();
    h.insert(
        hyper::header::TRAILER,
        HeaderValue::from_static("x-checksum"),
    );
    h.insert("x-upstream", HeaderValue::from_static("1"));
    resp
}

/// Reads a body to its end, returning how many data bytes it had and the
/// trailer fields it ended with.
async fn read_body(mut body: Incoming) -> (usize, Vec<(String, String)>) {
    let mut n = 0;
    let mut trailers = Vec::new();
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(data) = frame.data_ref() {
            n += data.len();
        } else if let Some(t) = frame.trailers_ref() {
            trailers.extend(t.iter().map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            }));
        }
    }
    (n, trailers)
}

/// `/echo`: forwards request data frames into the response as they arrive,
/// and records the total length once the request body has ended.
fn echo(req: Request<Incoming>, seen: SeenLog, idx: usize) -> Response<Body> {
    let content_type = req.headers().get(CONTENT_TYPE).cloned();
    let (tx, rx) = tokio::sync::mpsc::channel::<Frame<Bytes>>(16);
    tokio::spawn(async move {
        let mut body = req.into_body();
        let mut n = 0;
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                n += data.len();
                // Keep reading (and counting) even if the client went away.
                let _ = tx.send(Frame::data(data)).await;
            }
        }
        if let Some(entry) = seen.lock().unwrap().get_mut(idx) {
            entry.body_len = n;
        }
        // `tx` dropped here: ends the response body.
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|f| (Ok::<_, Infallible>(f), rx))
    });
    let mut resp = Response::new(BodyExt::boxed_unsync(StreamBody::new(stream)));
    if let Some(ct) = content_type {
        resp.headers_mut().insert(CONTENT_TYPE, ct);
    }
    resp.headers_mut()
        .insert("x-upstream", HeaderValue::from_static("1"));
    resp
}

/// Answers 101 with the requested protocol, then echoes raw bytes on the
/// upgraded connection until either side closes.
fn upgrade(req: &mut Request<Incoming>, proto: HeaderValue) -> Response<Body> {
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    });
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(
        hyper::header::CONNECTION,
        HeaderValue::from_static("upgrade"),
    );
    h.insert(hyper::header::UPGRADE, proto);
    h.insert("x-upstream", HeaderValue::from_static("1"));
    resp
}

/// `/status/N`: status N (400 if N is not a valid status code).
fn status_response(code: &str) -> Response<Body> {
    let Some(status) = code
        .parse::<u16>()
        .ok()
        .and_then(|c| StatusCode::from_u16(c).ok())
    else {
        return json_response(
            StatusCode::BAD_REQUEST,
            r#"{"error":"bad status"}"#.to_string(),
        );
    };
    let n = status.as_u16();
    if status.is_informational() || n == 204 || n == 304 {
        let mut resp = Response::new(empty());
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert("x-upstream", HeaderValue::from_static("1"));
        return resp;
    }
    json_response(status, format!(r#"{{"status":{n}}}"#))
}

/// A JSON response with the given status and body, tagged `x-upstream: 1`.
fn json_response(status: StatusCode, body: String) -> Response<Body> {
    let mut resp = Response::new(BodyExt::boxed_unsync(Full::new(Bytes::from(body))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert("x-upstream", HeaderValue::from_static("1"));
    resp
}

/// An empty response body.
fn empty() -> Body {
    BodyExt::boxed_unsync(Full::new(Bytes::new()))
}

/// Value of query parameter `key` in a path-and-query string, undecoded.
fn query_param<'a>(path_and_query: &'a str, key: &str) -> Option<&'a str> {
    let (_, query) = path_and_query.split_once('?')?;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then_some(v)
    })
}
