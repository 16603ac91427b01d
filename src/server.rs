//! Listeners: one accept loop per core, each on its own current-thread
//! Tokio runtime with its own `SO_REUSEPORT` socket, upstream pool and
//! Redis connection, so a request never crosses threads on the hot path.
//! The kernel spreads new connections across the sockets.
//!
//! Connection hardening lives here: the global `max_connections` cap (a
//! semaphore: beyond it, new connections wait in the backlog), the per-IP
//! cap (refused), the header-read timeout and header size cap (given to
//! hyper, which answers 431 itself), `idle_timeout`, and graceful drain.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::App;
use crate::stack::Gate;

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
    /// Open connections (for draining).
    pub open: AtomicU64,
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
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server_cfg.header_read_timeout)
        .max_buf_size(server_cfg.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(server_cfg.max_header_bytes as u32)
        .max_concurrent_streams(256);
    let builder = Arc::new(builder);
    let idle_timeout = server_cfg.idle_timeout;
    let grace = server_cfg.shutdown_grace;
    let (drain_tx, drain_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();

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
        let builder = builder.clone();
        let mut drain = drain_rx.clone();
        app.connections.open.fetch_add(1, Ordering::Relaxed);
        app.metrics.active_connections.inc();
        tasks.spawn(async move {
            let activity = Arc::new(AtomicU64::new(0));
            let born = Instant::now();
            let io = TokioIo::new(Tracked {
                inner: stream,
                activity: activity.clone(),
                born,
            });
            let svc = service_fn(move |req| {
                let gate = gate.clone();
                async move { Ok::<_, Infallible>(gate.handle(req, peer).await) }
            });
            let conn = builder.serve_connection_with_upgrades(io, svc);
            tokio::pin!(conn);
            let mut closing = false;
            let mut idle_check = tokio::time::interval(idle_timeout.max(Duration::from_millis(100)) / 4);
            idle_check.tick().await;
            loop {
                tokio::select! {
                    res = conn.as_mut() => {
                        if let Err(e) = res {
                            tracing::debug!(error = %e, peer = %peer, "connection ended with error");
                        }
                        break;
                    }
                    _ = drain.wait_for(|d| *d), if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    _ = idle_check.tick(), if !closing => {
                        let last = Duration::from_micros(activity.load(Ordering::Relaxed));
                        if born.elapsed().saturating_sub(last) >= idle_timeout {
                            closing = true;
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
            drop(ip_slot);
            drop(permit);
            app2.connections.open.fetch_sub(1, Ordering::Relaxed);
            app2.metrics.active_connections.dec();
        });
    }
    drop(listener);
    let _ = drain_tx.send(true);
    let drained =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            open = tasks.len(),
            "shutdown_grace elapsed; closing remaining connections"
        );
        tasks.shutdown().await;
    }
    Ok(())
}

/// A TCP stream that records when bytes last moved (for `idle_timeout`).
struct Tracked {
    inner: TcpStream,
    activity: Arc<AtomicU64>,
    born: Instant,
}

impl Tracked {
    fn touch(&self) {
        self.activity
            .store(self.born.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
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
            this.touch();
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
            this.touch();
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
            this.touch();
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
