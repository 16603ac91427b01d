//! The floor under tiergate: a bare hyper proxy built the way tiergate's
//! server is, with nothing else. One current-thread runtime per core on
//! `SO_REUSEPORT` listeners (tiergate's own `bind_workers`), and each
//! client connection with its own upstream connection, driven in the same
//! task. No identity, no limiter, no headers added and none removed but
//! `Connection`, no timeouts, no metrics.
//!
//! Why: the gap between tiergate and nginx is the sum of what the HTTP
//! stack costs (hyper, tokio) and what tiergate does on top. This target
//! (`hyper floor`) measures the first part alone, in the same run, so
//! that "tiergate memory against hyper floor" is the price of tiergate's
//! own work and "hyper floor against nginx + `limit_req`" the stack's.
//! The bench binary runs it in a child process of its own
//! (`--floor-proxy PORT UPSTREAM_PORT`) so that its CPU is counted like
//! every other target's.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hyper::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// The argument that makes the bench binary run the floor proxy.
pub const ARG: &str = "--floor-proxy";

/// Serves on 127.0.0.1:`port`, forwarding to 127.0.0.1:`upstream`, until
/// SIGINT (or killed).
pub fn run(port: u16, upstream: u16) -> std::io::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    let listeners = tiergate::server::bind_workers(addr, n)?;
    // SIGINT ends the process normally, so that a profiler or a PGO
    // training run gets its data written at exit.
    let signals = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        let _ = signals.block_on(tokio::signal::ctrl_c());
        std::process::exit(0);
    });
    let workers: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            std::thread::spawn(move || -> std::io::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(accept(l, upstream))
            })
        })
        .collect();
    for w in workers {
        w.join()
            .map_err(|_| std::io::Error::other("worker panicked"))??;
    }
    Ok(())
}

async fn accept(listener: std::net::TcpListener, upstream: u16) -> std::io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(connection(stream, upstream));
    }
}

/// One client connection and its upstream connection, in one task.
async fn connection(stream: TcpStream, upstream: u16) {
    let _ = stream.set_nodelay(true);
    let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let _ = up.set_nodelay(true);
    let Ok((sender, client)) =
        hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(up)).await
    else {
        return;
    };
    // HTTP/1 serves one request at a time, so the lock is never contended;
    // it is not held across an await.
    let sender = Arc::new(Mutex::new(sender));
    let svc = service_fn(move |mut req: Request<Incoming>| {
        let sender = sender.clone();
        async move {
            // The one hop-by-hop header a client here sends (the bench's
            // probe: `Connection: close`) is not the upstream's business.
            req.headers_mut().remove(hyper::header::CONNECTION);
            let lock = || sender.lock().unwrap_or_else(|e| e.into_inner());
            std::future::poll_fn(|cx| lock().poll_ready(cx)).await?;
            let sent = lock().send_request(req);
            sent.await
        }
    });
    let server = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), svc);
    // Until the client connection ends; an upstream that closes first
    // does not cut short the response being written.
    tokio::pin!(server, client);
    let mut upstream_open = true;
    loop {
        tokio::select! {
            _ = &mut server => break,
            _ = &mut client, if upstream_open => upstream_open = false,
        }
    }
}
