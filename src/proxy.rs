//! Forwarding to the upstream with a pooled keep-alive hyper-util client.
//!
//! Bodies stream both ways. Hop-by-hop headers (RFC 9110 §7.6.1, plus any
//! named in `Connection`) are removed in both directions; `Upgrade`
//! requests (WebSocket) are passed through and, on `101`, the two upgraded
//! connections are spliced together.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use tokio::net::TcpStream;

use crate::config::UpstreamConfig;
use crate::hardening::{LimitedBody, Tripped};
use crate::server::watchdog::Watched;

pub mod affinity;

use affinity::Claim;
pub use affinity::{Affinity, Held};

/// The request body type sent upstream.
pub type UpstreamBody = LimitedBody<Incoming>;

/// Why forwarding failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Connect refused/failed or the exchange broke.
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    /// No response headers within `upstream.timeout`.
    #[error("upstream timed out")]
    Timeout,
    /// The client's body went over `max_body_bytes` mid-stream.
    #[error("request body too large")]
    BodyTooLarge,
}

/// Which message [`strip_hop_by_hop`] cleans.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Hop {
    /// A client's request; `upgrade` when it is an upgrade being forwarded.
    Request { upgrade: bool },
    /// The upstream's response.
    Response,
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1's list, the obsolete
/// `Keep-Alive` and `Proxy-Connection`, and those listed in `Connection`).
/// `Upgrade` is kept only on a request being forwarded as an upgrade.
///
/// Trailers flow one way, upstream to client. On a request, a `TE` that
/// accepts `trailers` is passed on as just `TE: trailers` with
/// `Connection: te` (RFC 9110 §10.1.4), so the upstream may send trailer
/// fields (hyper and most servers send them only to a client that says
/// so). A request's own `Trailer` is removed, and with it the client's
/// trailer fields (hyper sends only announced ones): they would reach the
/// upstream after tiergate's checks, e.g. a forged `x-tenant-tier`. A
/// response's `Trailer` stays (it is end to end, RFC 9110 §6.6.2).
/// On a request this runs before tiergate adds its own headers, so a
/// client's `Connection` can name only what the client sent (RFC 9110
/// §7.6.1 applies connection options to the fields received).
///
/// Runs on every request and response, so it makes one pass over the
/// names present instead of one hash lookup per hop-by-hop name (19 per
/// request measured ~5% of a proxied request's instructions), compares
/// standard names as enums rather than strings, splits `Connection` once,
/// and keeps what it removes on the stack.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, hop: Hop) {
    let (request, keep_upgrade) = match hop {
        Hop::Request { upgrade } => (true, upgrade),
        Hop::Response => (false, false),
    };
    // The names `Connection` lists; more than fit here is rare enough to
    // take the slow path below.
    let mut listed: [&[u8]; 8] = [&[]; 8];
    let mut n_listed = 0;
    let mut overflow = false;
    for v in headers.get_all(header::CONNECTION) {
        for t in v.as_bytes().split(|&b| b == b',') {
            let t = t.trim_ascii();
            if t.is_empty() {
                continue;
            }
            if n_listed == listed.len() {
                overflow = true;
                break;
            }
            listed[n_listed] = t;
            n_listed += 1;
        }
    }
    let listed = &listed[..n_listed];
    let is_listed = |name: &HeaderName| {
        let n = name.as_str().as_bytes();
        listed.iter().any(|t| t.eq_ignore_ascii_case(n))
            || (overflow
                && headers
                    .get_all(header::CONNECTION)
                    .iter()
                    .any(|v| names(v, name)))
    };
    let mut doomed: [Option<HeaderName>; 4] = Default::default();
    let mut more: Vec<HeaderName> = Vec::new();
    let mut n_doomed = 0;
    let mut te_trailers = false;
    for name in headers.keys() {
        let hop = if name == header::UPGRADE {
            // Kept when forwarding an upgrade, however `Connection` lists it.
            !keep_upgrade
        } else if name == header::TE {
            te_trailers = request && headers.get_all(header::TE).iter().any(offers_trailers);
            true
        } else if name == header::TRAILER {
            request
        } else {
            is_hop(name) || is_listed(name)
        };
        if hop {
            match doomed.get_mut(n_doomed) {
                Some(slot) => *slot = Some(name.clone()),
                None => more.push(name.clone()),
            }
            n_doomed += 1;
        }
    }
    for name in doomed.into_iter().flatten().chain(more) {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("te"));
    }
}

/// Whether a `TE` value lists `trailers` (RFC 9110 §10.1.4: a
/// comma-separated list of codings, each maybe with `;q=` parameters).
fn offers_trailers(v: &HeaderValue) -> bool {
    v.as_bytes().split(|&b| b == b',').any(|t| {
        let coding = t.split(|&b| b == b';').next().unwrap_or_default();
        coding.trim_ascii().eq_ignore_ascii_case(b"trailers")
    })
}

/// The fixed hop-by-hop names. Standard names compare as enums; only a
/// custom name (not in the `http` crate's table) is compared as a string.
/// (`Upgrade`, `TE` and `Trailer` are decided by the caller.)
fn is_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::PROXY_AUTHORIZATION
        || name == header::PROXY_AUTHENTICATE
        || matches!(name.as_str(), "keep-alive" | "proxy-connection")
}

/// Whether the `Connection` value `v` lists `name` (names are lowercase).
fn names(v: &HeaderValue, name: &HeaderName) -> bool {
    v.as_bytes().split(|&b| b == b',').any(|t| {
        t.trim_ascii()
            .eq_ignore_ascii_case(name.as_str().as_bytes())
    })
}

/// Whether a request asks for a protocol upgrade (e.g. WebSocket).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// The upstream: base address, the worker's shared pool, and what a
/// connection of its own needs (see [`affinity`]).
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, UpstreamBody>,
    scheme: Scheme,
    authority: Authority,
    /// `authority` as a `Host` value.
    host_header: HeaderValue,
    /// `host:port` to connect to (IPv6 literals without brackets).
    host: Arc<str>,
    port: u16,
    connect_timeout: Duration,
    timeout: Duration,
}

impl Upstream {
    /// A client for `cfg`; must be created inside a Tokio runtime, whose
    /// tasks then drive its pooled connections.
    pub fn new(cfg: &UpstreamConfig) -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(cfg.connect_timeout));
        connector.set_nodelay(true);
        connector.set_keepalive(Some(TCP_KEEPALIVE));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_timer(TokioTimer::new())
            .pool_max_idle_per_host(1024)
            .build(connector);
        let scheme = cfg.url.scheme().cloned().unwrap_or(Scheme::HTTP);
        let authority = cfg
            .url
            .authority()
            .cloned()
            .expect("validated upstream url");
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .into();
        let port = authority
            .port_u16()
            .unwrap_or(if scheme == Scheme::HTTPS { 443 } else { 80 });
        let host_header = HeaderValue::from_str(authority.as_str())
            .expect("an authority is a valid header value");
        Upstream {
            client,
            scheme,
            authority,
            host_header,
            host,
            port,
            connect_timeout: cfg.connect_timeout,
            timeout: cfg.timeout,
        }
    }

    /// Forwards `req` (headers prepared by the caller, hop-by-hop ones
    /// already removed: see `stack::set_forwarding_headers`) and returns
    /// the upstream's response head with a streaming body. `body_tripped`
    /// is the flag of the request's [`LimitedBody`]. With `affinity` (the
    /// client connection's slot and its watch) the request goes over the
    /// client connection's own upstream connection when it is free, under
    /// the watchdog's coarse deadline; otherwise over the worker's shared
    /// pool, under a Tokio timeout.
    pub async fn forward(
        &self,
        mut req: Request<UpstreamBody>,
        body_tripped: &Tripped,
        affinity: Option<(&Affinity, &Watched)>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        // The caller stripped hop-by-hop headers, keeping `Upgrade` only
        // for an upgrade (see `strip_hop_by_hop`).
        let upgrade = req.headers().contains_key(header::UPGRADE);
        let pq = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        if !req.headers().contains_key(header::HOST) {
            // HTTP/1.0 without `Host`: the request's own authority, else
            // the upstream's (what a pooled client would have sent).
            let host = req
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                .unwrap_or_else(|| self.host_header.clone());
            req.headers_mut().insert(header::HOST, host);
        }
        *req.version_mut() = Version::HTTP_11;

        let claimed = match affinity {
            Some((a, w)) if !upgrade => match a.claim(w.clock()) {
                Claim::Busy => None,
                claim => Some((claim, w)),
            },
            _ => None,
        };
        let result = match claimed {
            None => {
                let uri = Uri::builder()
                    .scheme(self.scheme.clone())
                    .authority(self.authority.clone())
                    .path_and_query(pq)
                    .build()
                    .map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
                *req.uri_mut() = uri;
                return self.forward_pooled(req, body_tripped, upgrade).await;
            }
            Some((claim, w)) => {
                // Origin-form: this connection speaks to the upstream only.
                *req.uri_mut() = Uri::from(pq);
                let due = w.upstream.arm(w, self.timeout);
                tokio::select! {
                    biased;
                    r = self.send_affine(claim, req) => Some(r),
                    () = due => None,
                }
            }
        };
        let mut resp = match result {
            None => return Err(UpstreamError::Timeout),
            Some(Err(e)) => {
                if body_tripped.get() {
                    return Err(UpstreamError::BodyTooLarge);
                }
                return Err(e);
            }
            Some(Ok(resp)) => resp,
        };
        strip_hop_by_hop(resp.headers_mut(), Hop::Response);
        Ok(resp)
    }

    /// Sends over the client connection's own upstream connection, making
    /// one when there is none or the old one has closed.
    async fn send_affine(
        &self,
        claim: Claim<'_>,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let (mut lease, sender, cold) = match claim {
            Claim::Open(lease, sender, cold) => (lease, Some(sender), cold),
            Claim::Empty(lease) => (lease, None, false),
            Claim::Busy => unreachable!("busy slots take the pooled path"),
        };
        if let Some(mut sender) = sender
            // The previous response may still be finishing.
            && sender.ready().await.is_ok()
        {
            // Only a connection idle since before the last sweep can have
            // been closed by an upstream's keep-alive timer (see
            // `replayable`); a busy one costs no copy.
            let again = if cold { replayable(&req) } else { None };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    lease.put_back(sender);
                    return Ok(resp);
                }
                Err(mut e) => match (e.take_message(), again) {
                    // Never written: the upstream closed the idle
                    // connection as we reused it. Retry on a new one.
                    (Some(r), _) => req = r,
                    // Written, but the upstream closed the connection
                    // without answering: its keep-alive timer fired as the
                    // request arrived. Sent once more on a new connection
                    // when that is safe, as nginx does.
                    (None, Some(r)) if closed_unanswered(e.error()) => req = r,
                    (None, _) => return Err(UpstreamError::Unreachable(error_chain(e.error()))),
                },
            }
        }
        let stream = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect((&*self.host, self.port)),
        )
        .await
        .map_err(|_| UpstreamError::Unreachable("connect timed out".into()))?
        .map_err(|e| UpstreamError::Unreachable(format!("connect: {e}")))?;
        let _ = stream.set_nodelay(true);
        let _ = socket2::SockRef::from(&stream)
            .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE));
        let (mut sender, driver) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError::Unreachable(error_chain(&e)))?;
        lease.install(driver);
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| UpstreamError::Unreachable(error_chain(&e)))?;
        lease.put_back(sender);
        Ok(resp)
    }

    /// Sends through the worker's shared pool (upgrades, and HTTP/2
    /// streams beyond the first of a connection).
    async fn forward_pooled(
        &self,
        mut req: Request<UpstreamBody>,
        body_tripped: &Tripped,
        upgrade: bool,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        if upgrade {
            let te = req.headers().contains_key(header::TE);
            let connection = if te { "upgrade, te" } else { "upgrade" };
            req.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static(connection));
        }
        let result = tokio::time::timeout(self.timeout, self.client.request(req)).await;
        let mut resp = match result {
            Err(_) => return Err(UpstreamError::Timeout),
            Ok(Err(e)) => {
                if body_tripped.get() {
                    return Err(UpstreamError::BodyTooLarge);
                }
                return Err(UpstreamError::Unreachable(error_chain(&e)));
            }
            Ok(Ok(resp)) => resp,
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((client, upstream)) => {
                        let mut client = TokioIo::new(client);
                        let mut upstream = TokioIo::new(upstream);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                }
            });
            // Keep Connection/Upgrade on a 101.
            return Ok(resp);
        }
        strip_hop_by_hop(resp.headers_mut(), Hop::Response);
        Ok(resp)
    }
}

/// TCP keep-alive probes on upstream connections.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// The shared pool does not hand out a connection that has sat in it for
/// longer than this (checked at checkout). Upstreams close idle keep-alive
/// connections after seconds (gunicorn 2 s, Node and Apache 5 s), and a
/// connection reused just as that timer fires loses the request (502; the
/// pooled path does not send it again). This narrows that race without
/// closing it: the pool's clock starts when the last response has been
/// read out, which a slow client can make later than the upstream's. A
/// busy pool keeps its connections.
///
/// The pool's timer also closes connections idle for longer than this,
/// once a second: without it, checkout only skips them, and a burst that
/// grew the pool to hundreds of connections kept them all (each ~25 KB
/// here, and a socket at the upstream) until the upstream closed them.
const POOL_IDLE: Duration = Duration::from_secs(1);

/// A copy of `req` to send again if the reused connection it goes out on
/// turns out to have been closed by the upstream: only for a request
/// without a body whose method is idempotent (RFC 9110 §9.2.2), which may
/// be repeated safely; nginx retries the same ones. The copy is the head
/// alone (header values are shared, not copied), and it is made only for
/// a connection no request has used since before the watchdog's last
/// sweep: an upstream closes a connection for idleness after seconds, and
/// a copy of every request's head measured +5.8% instructions per proxied
/// request (callgrind).
fn replayable(req: &Request<UpstreamBody>) -> Option<Request<UpstreamBody>> {
    use http::Method;
    let idempotent = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    if !idempotent || !hyper::body::Body::is_end_stream(req.body()) {
        return None;
    }
    let mut again = Request::new(UpstreamBody::empty());
    *again.method_mut() = req.method().clone();
    *again.uri_mut() = req.uri().clone();
    *again.version_mut() = req.version();
    *again.headers_mut() = req.headers().clone();
    Some(again)
}

/// Whether a failed exchange means the upstream closed the connection
/// before any of its answer arrived: end of stream before a response head,
/// or the connection reset or broken under the request.
fn closed_unanswered(e: &hyper::Error) -> bool {
    use std::io::ErrorKind;
    if e.is_incomplete_message() {
        return true;
    }
    let mut cur = std::error::Error::source(e);
    while let Some(inner) = cur {
        if let Some(io) = inner.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
            );
        }
        cur = inner.source();
    }
    false
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// Bytes of a response body we generate ourselves.
pub type Generated = http_body_util::Full<Bytes>;

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn names_of(h: &HeaderMap) -> Vec<&str> {
        let mut v: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        v.sort();
        v
    }

    #[test]
    fn strips_the_fixed_list_and_what_connection_names() {
        let mut h = map(&[
            ("host", "a"),
            ("connection", "keep-alive, X-Secret"),
            ("connection", " close ,x-other"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "s"),
            ("x-other", "o"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic x"),
            ("proxy-authenticate", "Basic"),
            ("te", "gzip, deflate;q=0.5"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-kept", "k"),
        ]);
        strip_hop_by_hop(&mut h, Hop::Request { upgrade: false });
        assert_eq!(names_of(&h), ["host", "x-kept"]);
    }

    #[test]
    fn trailers_flow_from_the_upstream_only() {
        const REQUEST: Hop = Hop::Request { upgrade: false };
        let pairs = [
            // `TE` is hop-by-hop (here listed in `Connection`, as RFC 9110
            // asks), but a request's `trailers` survives it.
            ("connection", "TE"),
            ("te", "gzip;q=0.5, Trailers ;q=1"),
            ("trailer", "x-tenant-tier"),
        ];
        let mut h = map(&pairs);
        strip_hop_by_hop(&mut h, REQUEST);
        assert_eq!(names_of(&h), ["connection", "te"], "no request trailers");
        assert_eq!(h[header::TE], "trailers");
        assert_eq!(h[header::CONNECTION], "te");
        // A response keeps its `Trailer`; `TE` means nothing there.
        let mut h = map(&pairs);
        strip_hop_by_hop(&mut h, Hop::Response);
        assert_eq!(names_of(&h), ["trailer"]);
        let mut h = map(&[("te", "trailersx, deflate")]);
        strip_hop_by_hop(&mut h, REQUEST);
        assert!(names_of(&h).is_empty());
    }

    #[test]
    fn keeps_upgrade_only_when_forwarding_one() {
        let pairs = [
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("x-kept", "k"),
        ];
        let mut h = map(&pairs);
        strip_hop_by_hop(&mut h, Hop::Request { upgrade: true });
        assert_eq!(names_of(&h), ["upgrade", "x-kept"]);
        let mut h = map(&pairs);
        strip_hop_by_hop(&mut h, Hop::Request { upgrade: false });
        assert_eq!(names_of(&h), ["x-kept"]);
    }

    #[test]
    fn strips_many_listed_names_past_the_stack_buffers() {
        // Ten names in `Connection` (more than the token buffer) and ten
        // doomed headers (more than the removal buffer).
        let names: Vec<String> = (0..10).map(|i| format!("x-h{i}")).collect();
        let mut pairs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
        let listed = names.join(", ");
        pairs.push(("connection", &listed));
        pairs.push(("x-kept", "k"));
        let mut h = map(&pairs);
        strip_hop_by_hop(&mut h, Hop::Request { upgrade: false });
        assert_eq!(names_of(&h), ["x-kept"]);
    }

    #[test]
    fn leaves_a_clean_message_alone() {
        let mut h = map(&[("host", "a"), ("x-connection", "keep-alive"), ("te-x", "1")]);
        strip_hop_by_hop(&mut h, Hop::Request { upgrade: false });
        assert_eq!(names_of(&h), ["host", "te-x", "x-connection"]);
    }
}
