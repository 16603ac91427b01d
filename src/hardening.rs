//! Hardening: what is checked about a request before anyone asks who sent
//! it — the real client address (`trusted_proxies`), the body size cap, and
//! per-IP connection accounting.
//!
//! Header size (431) and header-read time (slowloris) are enforced by the
//! HTTP parser itself, configured in [`crate::server`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use ipnet::IpNet;

use crate::server::watchdog::InFlight;

/// The client address: the peer, or — when the peer is a trusted proxy —
/// the rightmost `X-Forwarded-For` entry that is not itself trusted.
pub fn client_ip(peer: SocketAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer_ip = canonical(peer.ip());
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if trusted.is_empty() || !is_trusted(&peer_ip) {
        return peer_ip;
    }
    let mut candidate = peer_ip;
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(text) = value.to_str() else {
            return candidate;
        };
        for part in text.rsplit(',') {
            match part.trim().parse::<IpAddr>() {
                Ok(ip) => {
                    let ip = canonical(ip);
                    candidate = ip;
                    if !is_trusted(&ip) {
                        return ip;
                    }
                }
                // A garbage entry: stop believing anything to its left.
                Err(_) => return candidate,
            }
        }
    }
    candidate
}

/// IPv4-mapped IPv6 addresses are their IPv4 selves.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// A request body that fails once more than `limit` bytes have streamed
/// through, and records that it did so the proxy can answer 413 instead of
/// 502. It ends at the client's trailer fields, which are not forwarded.
pub struct LimitedBody<B> {
    /// `None`: an empty body (see [`LimitedBody::empty`]).
    inner: Option<B>,
    remaining: u64,
    tripped: Tripped,
    /// Keeps the request in flight for the watchdog until the body ends.
    in_flight: Option<InFlight>,
}

/// Whether a request's [`LimitedBody`] went over its limit, shared
/// between the body (which the upstream client consumes) and the proxy
/// (which answers 413 rather than 502 when it did). A body already at its
/// end when the request arrives cannot go over, so it shares no flag:
/// most requests (`GET`s) cost no allocation for it.
#[derive(Clone, Default)]
pub struct Tripped(Option<Arc<AtomicBool>>);

impl Tripped {
    /// A flag for a body that may still carry data (`end_stream`: it has
    /// none, and the flag is never set).
    pub fn for_body(end_stream: bool) -> Tripped {
        Tripped((!end_stream).then(Arc::default))
    }

    /// Whether the body went over its limit.
    pub fn get(&self) -> bool {
        self.0.as_ref().is_some_and(|t| t.load(Ordering::Relaxed))
    }

    fn set(&self) {
        if let Some(t) = &self.0 {
            t.store(true, Ordering::Relaxed);
        }
    }
}

/// The error a [`LimitedBody`] yields when over its limit.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the configured limit")]
pub struct BodyTooLarge;

impl<B> LimitedBody<B> {
    /// Wraps `inner`; `tripped` is set when the limit is exceeded.
    pub fn new(inner: B, limit: u64, tripped: Tripped) -> Self {
        LimitedBody {
            inner: Some(inner),
            remaining: limit,
            tripped,
            in_flight: None,
        }
    }

    /// A body with nothing in it, for a request sent again (see
    /// `proxy::Upstream::forward`).
    pub fn empty() -> Self {
        LimitedBody {
            inner: None,
            remaining: 0,
            tripped: Tripped::default(),
            in_flight: None,
        }
    }

    /// Holds `in_flight` until the body ends or is dropped (see
    /// [`InFlight`]).
    pub fn in_flight(mut self, in_flight: InFlight) -> Self {
        self.in_flight = Some(in_flight);
        self
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if frame.is_trailers() {
                    // A client's trailer fields are not forwarded (see
                    // `proxy::strip_hop_by_hop`): the body ends here.
                    this.in_flight = None;
                    return Poll::Ready(None);
                }
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > this.remaining {
                        this.in_flight = None;
                        this.tripped.set();
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                    }
                    this.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.in_flight = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.in_flight = None;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

/// Counts open connections per client IP; a connection holds a
/// [`IpSlot`] that releases its count on drop.
pub struct PerIpConnections {
    max: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// One counted connection.
pub struct IpSlot {
    owner: Arc<PerIpConnections>,
    ip: IpAddr,
}

impl PerIpConnections {
    /// At most `max` connections per IP.
    pub fn new(max: usize) -> Arc<PerIpConnections> {
        Arc::new(PerIpConnections {
            max,
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a slot for `ip`, or `None` when it already has `max`.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let ip = canonical(ip);
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            owner: self.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = self.owner.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", xff.parse().unwrap());
        h
    }

    /// An untrusted peer's X-Forwarded-For is ignored (no spoofing).
    #[test]
    fn untrusted_peer_is_the_client() {
        let peer: SocketAddr = "203.0.113.9:5000".parse().unwrap();
        let trusted = vec!["10.0.0.0/8".parse().unwrap()];
        assert_eq!(client_ip(peer, &headers("1.2.3.4"), &trusted), peer.ip());
    }

    /// Behind trusted proxies the rightmost untrusted hop is the client.
    #[test]
    fn rightmost_untrusted_hop_behind_trusted_proxies() {
        let peer: SocketAddr = "10.0.0.2:5000".parse().unwrap();
        let trusted = vec!["10.0.0.0/8".parse().unwrap()];
        let h = headers("6.6.6.6, 198.51.100.7, 10.0.0.5");
        assert_eq!(client_ip(peer, &h, &trusted).to_string(), "198.51.100.7");
    }

    /// The per-IP cap counts and releases.
    #[test]
    fn per_ip_slots_release_on_drop() {
        let p = PerIpConnections::new(2);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let a = p.acquire(ip).unwrap();
        let _b = p.acquire(ip).unwrap();
        assert!(p.acquire(ip).is_none());
        drop(a);
        assert!(p.acquire(ip).is_some());
    }
}
