//! Listeners: one accept loop per core, each on its own current-thread
//! Tokio runtime with its own `SO_REUSEPORT` socket, upstream pool and
//! Redis connection, so a request never crosses threads on the hot path.
//! The kernel spreads new connections across the sockets. Each client
//! connection's task also drives that connection's own upstream connection
//! (see `proxy::affinity`), so an HTTP/1 request and its response never
//! leave the task that accepted them.
//!
//! Connection hardening lives here: the global `max_connections` cap (a
//! semaphore: beyond it, new connections wait), the per-IP cap (refused),
//! the header size cap (given to hyper, which answers 431 itself), and
//! graceful drain. Deadlines — a request head taking longer than
//! `header_read_timeout` (slowloris), a connection silent for
//! `idle_timeout`, a quiet connection's upstream slot — are checked by one
//! coarse sweep per worker (see [`watchdog`]), not by timers per
//! connection or per request.

pub mod branches;
mod protocol;
pub mod watchdog;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use branches::Branches;
use protocol::Protocols;
use watchdog::{CLOSE, InFlight, RELEASE, SHUT_DOWN, Watchdog, Watched};

use crate::App;
use crate::proxy::Held;
use crate::stack::{ClientConn, Gate};

/// Binds a non-blocking listener with `SO_REUSEPORT` (so every worker can
/// bind the same address) and a deep backlog.
pub fn bind_reuseport(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Binds one listener per worker on `addr` (port 0 picks one port for all).
pub fn bind_workers(addr: SocketAddr, workers: usize) -> io::Result<Vec<std::net::TcpListener>> {
    if addr.port() != 0 {
        // SO_REUSEPORT would let a second tiergate (same user) share the
        // port and silently split the traffic: first make sure nobody is
        // listening there, with a plain bind.
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        probe.set_reuse_address(true)?;
        probe.bind(&addr.into())?;
    }
    let first = bind_reuseport(addr)?;
    let actual = first.local_addr()?;
    let mut out = vec![first];
    for _ in 1..workers {
        out.push(bind_reuseport(actual)?);
    }
    Ok(out)
}

/// Process-wide connection accounting shared by the workers.
pub struct Connections {
    /// Global cap.
    pub permits: Arc<Semaphore>,
    /// Per-IP cap.
    pub per_ip: Arc<crate::hardening::PerIpConnections>,
}

/// Runs one worker's accept loop until `shutdown` flips to true, then
/// drains its connections for up to `grace`.
pub async fn run_worker(
    app: Arc<App>,
    gate: Arc<Gate>,
    listener: std::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    let cfg = app.live.load().policy.config().clone();
    let server_cfg = &cfg.server;
    let protocols = Arc::new(Protocols::new(server_cfg.max_header_bytes));
    // A quiet client connection gives its upstream slot back after a
    // quarter of the shorter of the two client timeouts.
    let release_after = (server_cfg.idle_timeout.min(server_cfg.header_read_timeout) / 4)
        .max(Duration::from_millis(50));
    let watchdog = Watchdog::new(
        server_cfg.header_read_timeout,
        server_cfg.idle_timeout,
        cfg.upstream.timeout,
        release_after,
    );
    let sweeping = AbortOnDrop(tokio::spawn(watchdog.clone().run()));
    let grace = server_cfg.shutdown_grace;
    let mut tasks = tokio::task::JoinSet::new();
    // This worker's upstream connections held by client connections.
    let held = Held::default();

    loop {
        while tasks.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(ip_slot) = app.connections.per_ip.acquire(peer.ip()) else {
            tracing::debug!(peer = %peer.ip(), "max_connections_per_ip reached; refusing");
            drop(stream);
            continue;
        };
        // Beyond `max_connections` the accepted connection waits here (and
        // this worker stops accepting) until another one closes. Taking the
        // permit after accepting keeps idle workers from holding permits
        // that connections queued on another worker's socket need.
        let permit = match app.connections.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => break,
                p = app.connections.permits.clone().acquire_owned() => p.expect("semaphore never closed"),
            },
        };
        let _ = stream.set_nodelay(true);
        let app2 = app.clone();
        let gate = gate.clone();
        let protocols = protocols.clone();
        let held = held.clone();
        let state = watchdog.watch();
        app.metrics.active_connections.inc();
        tasks.spawn(async move {
            let io = TokioIo::new(Tracked {
                inner: stream,
                state: state.clone(),
            });
            // Closed on every way out of this task (end, panic, abort).
            let _forget = Closing(state.clone());
            let svc_state = state.clone();
            let client = Arc::new(ClientConn::new(peer, held, state.clone()));
            let svc_client = client.clone();
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let gate = gate.clone();
                if req.version() == hyper::Version::HTTP_2 {
                    svc_state.multiplexed();
                }
                let in_flight = InFlight::start(svc_state.clone());
                // `handle`'s own future, not one wrapping it: a wrapper
                // would keep a second copy of the request (see `handle`).
                Gate::handle(gate, req, svc_client.clone(), in_flight)
            });
            let conn = protocols.serve(io, svc);
            tokio::pin!(conn);
            let mut closing = false;
            // Each future with its own waker (see `branches`): hyper's
            // server side, the connection's own upstream connection, the
            // watchdog's signals.
            let branches = Branches::<3>::new();
            let drive = client.upstream.drive();
            tokio::pin!(drive);
            let signals = state.signals();
            tokio::pin!(signals);
            loop {
                let event = std::future::poll_fn(|cx| {
                    branches.poll(cx, |i, cx| match i {
                        0 => conn.as_mut().poll(cx).map(Event::Ended),
                        1 => drive.as_mut().poll(cx).map(|never| match never {}),
                        _ => signals.as_mut().poll(cx).map(Event::Signals),
                    })
                })
                .await;
                match event {
                    Event::Ended(res) => {
                        if let Err(e) = res {
                            tracing::debug!(error = %e, peer = %peer, "connection ended with error");
                        }
                        break;
                    }
                    Event::Signals(signals) => {
                        if signals & CLOSE != 0 {
                            // Slowloris: bytes of a request head keep coming
                            // (or stopped) but it never completed. No request
                            // is in flight, so closing loses nothing.
                            tracing::debug!(peer = %peer, "header_read_timeout: closing");
                            break;
                        }
                        if signals & RELEASE != 0 {
                            // A quiet client gives its upstream connection
                            // back (see proxy::affinity).
                            client.upstream.release();
                            branches.mark(1);
                        }
                        if signals & SHUT_DOWN != 0 && !closing {
                            // idle_timeout, or the worker drains.
                            closing = true;
                            conn.as_mut().graceful_shutdown();
                            branches.mark(0);
                        }
                        // The signals future took them: look again.
                        branches.mark(2);
                    }
                }
            }
            drop(ip_slot);
            drop(permit);
            app2.metrics.active_connections.dec();
        });
    }
    drop(listener);
    watchdog.drain();
    let drained =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            open = tasks.len(),
            "shutdown_grace elapsed; closing remaining connections"
        );
        tasks.shutdown().await;
    }
    drop(sweeping);
    watchdog.forget_all();
    Ok(())
}

/// Tells the watchdog a connection is gone when dropped.
struct Closing(Arc<Watched>);

impl Drop for Closing {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// What woke a connection task's loop.
enum Event {
    /// hyper is done with the connection.
    Ended(Result<(), Box<dyn std::error::Error + Send + Sync>>),
    /// The watchdog's signals.
    Signals(u8),
}

/// Aborts the task when dropped (the sweep has no end of its own).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A TCP stream that reports its reads and writes to the [`Watched`].
struct Tracked {
    inner: TcpStream,
    state: Arc<Watched>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.state.bytes_read();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.state.bytes_written();
        }
        r
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.state.bytes_written();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
