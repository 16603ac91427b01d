//! A fault-injecting TCP proxy: put it between tiergate and Redis (or the
//! upstream) and switch, at run time, how the "network" behaves.
//!
//! Modes ([`Fault`]):
//! - `Pass`: forward bytes both ways;
//! - `Latency(d)`: forward, but hold every chunk `d` before writing it on
//!   (each direction stays in order);
//! - `Blackhole`: accept and read, but forward and answer nothing. Bytes
//!   read are *held*, not dropped, and delivered when the mode changes back —
//!   what TCP does across a short partition (retransmission), so a
//!   pipelining client such as redis-rs never sees replies out of step. New
//!   connections are accepted and held without connecting to the target;
//! - `Reset`: every existing connection (both sides) and every new one is
//!   closed with an RST (`SO_LINGER` 0);
//! - `Refuse`: the listener is closed (connects are refused) and existing
//!   connections are reset — a host whose server process is gone. Leaving
//!   `Refuse` re-binds the same port.
//!
//! Runs on its own thread and Tokio runtime (like [`Upstream`](super::Upstream)),
//! so it works from `#[test]` and `#[tokio::test]` alike. Loopback only.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

/// How the proxy treats traffic; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    Pass,
    /// Delay every forwarded chunk by this much.
    Latency(Duration),
    /// Accept and read, never forward or answer (held until the mode changes).
    Blackhole,
    /// RST existing and new connections.
    Reset,
    /// Close the listener and RST existing connections.
    Refuse,
}

impl Fault {
    /// Whether connections must be torn down with an RST in this mode.
    fn kills(self) -> bool {
        matches!(self, Fault::Reset | Fault::Refuse)
    }
}

/// A running fault proxy on `127.0.0.1:<random>` in front of `target`.
/// Stopped (its thread joined, all its sockets closed) on drop.
pub struct FaultProxy {
    addr: SocketAddr,
    mode: watch::Sender<Fault>,
    accepted: Arc<AtomicUsize>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts forwarding to `target` in [`Fault::Pass`].
    pub fn start(target: SocketAddr) -> FaultProxy {
        FaultProxy::start_in(target, Fault::Pass)
    }

    /// Starts in `mode` (e.g. [`Fault::Refuse`]: "the backend is down at
    /// start-up"). The port is chosen now and kept for the proxy's life.
    pub fn start_in(target: SocketAddr, mode: Fault) -> FaultProxy {
        let std_listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind fault proxy");
        let addr = std_listener.local_addr().expect("fault proxy local_addr");
        let (mode_tx, mode_rx) = watch::channel(mode);
        let (stop_tx, stop_rx) = oneshot::channel();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let thread = std::thread::Builder::new()
            .name(format!("fault-{}", addr.port()))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("fault proxy runtime");
                rt.block_on(async move {
                    tokio::select! {
                        _ = stop_rx => {}
                        _ = accept_loop(std_listener, addr, target, mode_rx, counter) => {}
                    }
                });
                // Dropping the runtime cancels every connection task and
                // closes their sockets.
            })
            .expect("spawn fault proxy thread");
        FaultProxy {
            addr,
            mode: mode_tx,
            accepted,
            shutdown: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// The address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `redis://127.0.0.1:P/0` through the proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// `http://127.0.0.1:P` through the proxy.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Switches the mode; takes effect at once for new and existing
    /// connections.
    pub fn set(&self, mode: Fault) {
        self.mode.send_replace(mode);
    }

    /// The current mode.
    pub fn mode(&self) -> Fault {
        *self.mode.borrow()
    }

    /// How many client connections were accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A non-blocking listener with `SO_REUSEADDR` (so `Refuse` → `Pass` can
/// re-bind the port at once).
fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// Closes `s` with an RST when it is dropped.
fn arm_rst(s: &TcpStream) {
    let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// Accepts until cancelled, closing and re-binding the listener around
/// `Refuse`.
async fn accept_loop(
    first: std::net::TcpListener,
    addr: SocketAddr,
    target: SocketAddr,
    mut mode: watch::Receiver<Fault>,
    accepted: Arc<AtomicUsize>,
) {
    let mut listener = Some(TcpListener::from_std(first).expect("tokio listener"));
    loop {
        let current = *mode.borrow_and_update();
        if current == Fault::Refuse {
            listener = None;
            if mode.changed().await.is_err() {
                return;
            }
            continue;
        }
        let l = match &listener {
            Some(l) => l,
            None => {
                // Re-bind the same port; retry briefly if the kernel is slow
                // to let it go.
                let mut bound = None;
                for _ in 0..100 {
                    match bind(addr) {
                        Ok(s) => {
                            bound = Some(s);
                            break;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
                let s = bound.unwrap_or_else(|| panic!("fault proxy cannot re-bind {addr}"));
                listener = Some(TcpListener::from_std(s).expect("tokio listener"));
                continue;
            }
        };
        tokio::select! {
            r = l.accept() => {
                let Ok((client, _)) = r else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                accepted.fetch_add(1, Ordering::Relaxed);
                if mode.borrow().kills() {
                    arm_rst(&client);
                    drop(client);
                    continue;
                }
                tokio::spawn(connection(client, target, mode.clone()));
            }
            r = mode.changed() => {
                if r.is_err() {
                    return;
                }
            }
        }
    }
}

/// Resolves once the mode asks for connections to be torn down.
async fn killed(mut mode: watch::Receiver<Fault>) {
    loop {
        if mode.borrow_and_update().kills() {
            return;
        }
        if mode.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Waits until the mode lets a chunk through (applying `Latency`);
/// `false` when the connection is to be torn down instead.
async fn gate(mode: &mut watch::Receiver<Fault>) -> bool {
    loop {
        let current = *mode.borrow_and_update();
        match current {
            Fault::Pass => return true,
            Fault::Latency(d) => {
                tokio::time::sleep(d).await;
                return true;
            }
            Fault::Blackhole => {
                if mode.changed().await.is_err() {
                    return false;
                }
            }
            Fault::Reset | Fault::Refuse => return false,
        }
    }
}

/// One proxied connection: held while blackholed, then connected to the
/// target and pumped both ways until either side ends or the mode kills it.
async fn connection(client: TcpStream, target: SocketAddr, mode: watch::Receiver<Fault>) {
    let _ = client.set_nodelay(true);
    let work = async {
        // Blackholed before connecting: hold the client, reach nobody.
        let mut m = mode.clone();
        if !gate_connect(&mut m).await {
            return None;
        }
        let server = match TcpStream::connect(target).await {
            Ok(s) => s,
            // Target down: the client sees a reset, as if refused.
            Err(_) => return None,
        };
        let _ = server.set_nodelay(true);
        Some(server)
    };
    let server = tokio::select! {
        s = work => s,
        _ = killed(mode.clone()) => None,
    };
    let Some(server) = server else {
        arm_rst(&client);
        return;
    };
    let both = async {
        tokio::join!(
            pump(&client, &server, mode.clone()),
            pump(&server, &client, mode.clone())
        )
    };
    tokio::select! {
        _ = both => {}
        _ = killed(mode.clone()) => {
            arm_rst(&client);
            arm_rst(&server);
        }
    }
}

/// Like [`gate`] but without latency: waits out `Blackhole` before a new
/// connection reaches the target.
async fn gate_connect(mode: &mut watch::Receiver<Fault>) -> bool {
    loop {
        let current = *mode.borrow_and_update();
        match current {
            Fault::Pass | Fault::Latency(_) => return true,
            Fault::Blackhole => {
                if mode.changed().await.is_err() {
                    return false;
                }
            }
            Fault::Reset | Fault::Refuse => return false,
        }
    }
}

/// Copies `from` → `to` chunk by chunk through [`gate`]; on EOF or error
/// half-closes `to`.
async fn pump(from: &TcpStream, to: &TcpStream, mut mode: watch::Receiver<Fault>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match read_some(from, &mut buf).await {
            Ok(0) | Err(_) => {
                let _ = SockRef::from(to).shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
        };
        if !gate(&mut mode).await {
            return;
        }
        if write_all(to, &buf[..n]).await.is_err() {
            let _ = SockRef::from(from).shutdown(Shutdown::Read);
            return;
        }
    }
}

/// Reads whatever is available (at least one byte, or EOF/error).
async fn read_some(s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        s.readable().await?;
        match s.try_read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// Writes all of `data`.
async fn write_all(s: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        s.writable().await?;
        match s.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
