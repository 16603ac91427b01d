//! Which HTTP a new client connection speaks, found by *peeking* at its
//! first bytes, then hyper's HTTP/1 (with upgrades) or HTTP/2 (h2c, prior
//! knowledge) server on the connection as it is.
//!
//! Why not hyper-util's `auto` builder, which does the same: it *reads*
//! up to the 24 bytes of the HTTP/2 preface and hands them back to hyper
//! as a first read of their own. An HTTP/1 request is longer than that,
//! so hyper's first parse fails and its second read finds its 8 KB read
//! buffer 24 bytes short of the room it wants: the buffer is reallocated
//! to 16 KB (and 8 KB copied), and a connection keeps it while idle.
//! Peeking leaves the bytes in the socket, so hyper's first read gets the
//! whole head.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::{HttpService, Service};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::ReadBuf;

use super::Tracked;

/// What HTTP/2 prior knowledge starts with (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

type Io = TokioIo<Tracked>;
type Error = Box<dyn std::error::Error + Send + Sync>;

/// The servers' settings, made once per worker: HTTP/1, HTTP/2, and
/// hyper-util's `auto` for a connection whose first bytes leave it open
/// (see [`Connection`]), all three set alike.
pub struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    auto: auto::Builder<TokioExecutor>,
}

impl Protocols {
    /// A request head (HTTP/1) or header list (HTTP/2) over
    /// `max_header_bytes` is refused (431); at most 256 streams at once.
    /// No hyper timer: the header-read deadline is enforced by the worker's
    /// coarse sweep (`watchdog`), which costs nothing per request (hyper's
    /// per-request timer measured ~10% of throughput).
    pub fn new(max_header_bytes: usize) -> Protocols {
        let mut http1 = http1::Builder::new();
        http1
            .max_buf_size(max_header_bytes.max(8192))
            .keep_alive(true);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .max_header_list_size(max_header_bytes as u32)
            .max_concurrent_streams(256);
        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1()
            .max_buf_size(max_header_bytes.max(8192))
            .keep_alive(true);
        auto.http2()
            .max_header_list_size(max_header_bytes as u32)
            .max_concurrent_streams(256);
        Protocols { http1, http2, auto }
    }

    /// Serves `io` with `service` once its first bytes say which HTTP.
    pub fn serve<S>(&self, io: Io, service: S) -> Connection<'_, S>
    where
        S: HttpService<Incoming>,
    {
        Connection::Sniffing {
            protocols: self,
            io: Some((io, service)),
            closing: false,
        }
    }
}

/// A client connection being served: first its protocol is found, then
/// hyper serves it.
///
/// The first bytes that have come are peeked: one that differs from the
/// HTTP/2 preface means HTTP/1, all 24 matching means HTTP/2. When fewer
/// have come and all match (a client sending a few bytes at a time),
/// peeking again would find the same bytes at once, so the connection
/// goes to hyper-util's `auto` instead, which reads them: the decision is
/// the same as `auto`'s for every connection.
#[expect(
    clippy::large_enum_variant,
    reason = "`Sniffing` lasts until the first bytes and turns into `Http1` in place; \
              boxing `Http1` would cost the common case an allocation per connection"
)]
pub enum Connection<'a, S>
where
    S: HttpService<Incoming>,
{
    Sniffing {
        protocols: &'a Protocols,
        io: Option<(Io, S)>,
        /// Shut down before it sent a byte: ends at once.
        closing: bool,
    },
    Http1(http1::UpgradeableConnection<Io, S>),
    /// Boxed: twice HTTP/1's size, and every connection's task has room
    /// for the largest variant.
    Http2(Pin<Box<http2::Connection<Io, S, TokioExecutor>>>),
    /// Boxed: `auto`'s connection cannot move once polled, and this way is
    /// rare.
    Auto(Pin<Box<auto::UpgradeableConnection<'a, Io, S, TokioExecutor>>>),
}

impl<S, B> Connection<'_, S>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Unpin,
    S::Future: Send + 'static,
    S::Error: Into<Error>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Error>,
{
    /// Ends the connection after the requests in flight (HTTP/1: no
    /// further request; HTTP/2: GOAWAY). One that has sent nothing yet
    /// ends at once.
    pub fn graceful_shutdown(self: Pin<&mut Self>) {
        match self.get_mut() {
            Connection::Sniffing { closing, .. } => *closing = true,
            Connection::Http1(c) => Pin::new(c).graceful_shutdown(),
            Connection::Http2(c) => c.as_mut().graceful_shutdown(),
            Connection::Auto(c) => c.as_mut().graceful_shutdown(),
        }
    }
}

impl<S, B> Future for Connection<'_, S>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Unpin,
    S::Future: Send + 'static,
    S::Error: Into<Error>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Error>,
{
    type Output = Result<(), Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match this {
                Connection::Sniffing {
                    protocols,
                    io,
                    closing,
                } => {
                    if *closing {
                        return Poll::Ready(Ok(()));
                    }
                    let (conn, _) = io.as_ref().expect("sniffed once");
                    let mut buf = [0u8; PREFACE.len()];
                    let mut peeked = ReadBuf::new(&mut buf);
                    ready!(conn.inner().inner.poll_peek(cx, &mut peeked))?;
                    let seen = peeked.filled();
                    let (io, service) = io.take().expect("sniffed once");
                    let protocols: &Protocols = protocols;
                    *this = if seen.is_empty() || seen != &PREFACE[..seen.len()] {
                        // HTTP/1 (or an end before any byte, which
                        // HTTP/1's server then sees).
                        Connection::Http1(
                            protocols
                                .http1
                                .serve_connection(io, service)
                                .with_upgrades(),
                        )
                    } else if seen.len() == PREFACE.len() {
                        Connection::Http2(Box::pin(protocols.http2.serve_connection(io, service)))
                    } else {
                        Connection::Auto(Box::pin(
                            protocols.auto.serve_connection_with_upgrades(io, service),
                        ))
                    };
                }
                Connection::Http1(c) => return Pin::new(c).poll(cx).map_err(Into::into),
                Connection::Http2(c) => return c.as_mut().poll(cx).map_err(Into::into),
                Connection::Auto(c) => return c.as_mut().poll(cx),
            }
        }
    }
}
