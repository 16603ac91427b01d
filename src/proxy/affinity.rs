//! Connection affinity: each client connection gets its own keep-alive
//! HTTP/1.1 connection to the upstream, driven by the client connection's
//! own task.
//!
//! Why: with a shared pool (hyper-util's legacy client) every request pays
//! for a pool checkout (a lock and a hashed key), a hop to the pooled
//! connection's task and back, and a task spawned to return the connection
//! to the pool. Here the upstream connection lives in a slot owned by the
//! client connection; the client connection's task polls it (see
//! [`Affinity::drive`]) next to the server side, so a request and its
//! response never leave the task that accepted them. This is HAProxy's
//! classic "server-side keep-alive tied to the client connection".
//!
//! The cost is one upstream connection per *busy* client connection: the
//! slot is released when the client connection goes quiet (see
//! [`Affinity::release`], called when the worker's sweep finds it quiet) or
//! closes, but never while a response body is still coming over it.
//! Requests that cannot use the slot — an HTTP/2 stream while another
//! stream's request or response is still on the connection, protocol
//! upgrades — go through the worker's shared pool instead.
//!
//! A worker holds at most [`MAX_HELD_PER_WORKER`] such connections: with
//! thousands of client connections each sending now and then, one
//! upstream connection per client connection would cost the upstream that
//! many sockets and tiergate ~25 KB each (measured, 9,000 client
//! connections with one request each: 546 MB of RSS uncapped, 360 MB
//! capped). A client connection that finds the
//! worker at its cap sends through the shared pool, which holds only as
//! many connections as there are requests at once.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::UpstreamBody;

type Sender = http1::SendRequest<UpstreamBody>;
type Driver = http1::Connection<TokioIo<TcpStream>, UpstreamBody>;

/// Upstream connections a worker holds in client connections' slots at
/// most (two racing client connections may each take the last one).
pub const MAX_HELD_PER_WORKER: usize = 256;

/// How many upstream connections a worker's slots hold; one per worker,
/// shared by its client connections.
#[derive(Clone, Default)]
pub struct Held(Arc<AtomicUsize>);

impl Held {
    /// Connections held now.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// One client connection's upstream slot.
pub struct Affinity {
    slot: Mutex<Slot>,
    held: Held,
}

#[derive(Default)]
struct Slot {
    /// The idle connection's request handle (`None` while a request holds
    /// it, or when there is no connection).
    sender: Option<Sender>,
    /// The connection itself, polled by [`Affinity::drive`].
    driver: Option<Pin<Box<Driver>>>,
    /// The client connection task, to wake when a driver is installed.
    waker: Option<Waker>,
    /// A request holds the slot.
    busy: bool,
    /// The watchdog's clock (its last sweep) when a request last claimed
    /// the slot.
    claimed_at: u64,
}

/// What a request found in the slot.
pub(super) enum Claim<'a> {
    /// An open connection, now held by this request; `cold` when no
    /// request has claimed it since before the watchdog's last sweep, so it
    /// may have sat idle long enough for the upstream to close it.
    Open(Lease<'a>, Sender, bool),
    /// No connection: this request holds the slot and must make one.
    Empty(Lease<'a>),
    /// The slot cannot be used: another request (an HTTP/2 stream) holds
    /// it, or it is empty and the worker holds all the upstream
    /// connections it may. The request goes through the shared pool.
    Busy,
}

impl Slot {
    /// Closes the connection, if any, and gives back its place under the
    /// worker's cap.
    fn close(&mut self, held: &Held) {
        self.sender = None;
        if self.driver.take().is_some() {
            held.0.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Affinity {
    /// An empty slot counting against the worker's `held`.
    pub fn new(held: Held) -> Affinity {
        Affinity {
            slot: Mutex::default(),
            held,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drives the slot's upstream connection; never completes. The client
    /// connection's task polls this alongside the server connection.
    pub fn drive(&self) -> impl Future<Output = Infallible> + '_ {
        std::future::poll_fn(move |cx| self.poll_drive(cx))
    }

    fn poll_drive(&self, cx: &mut Context<'_>) -> Poll<Infallible> {
        let mut s = self.lock();
        if let Some(d) = s.driver.as_mut()
            && let Poll::Ready(r) = d.as_mut().poll(cx)
        {
            if let Err(e) = r {
                tracing::debug!(error = %e, "upstream connection ended with error");
            }
            s.close(&self.held);
        }
        if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            s.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Closes the upstream connection unless an exchange is using it (the
    /// client connection has gone quiet). A response whose body is still
    /// coming (a stream with pauses, a client slow to read) keeps it: the
    /// connection is not ready for another request until that body ends.
    pub fn release(&self) {
        let mut s = self.lock();
        if !s.busy && s.sender.as_ref().is_none_or(|snd| snd.is_ready()) {
            s.close(&self.held);
        }
    }

    /// Claims the slot for one request; `now` is the watchdog's clock.
    pub(super) fn claim(&self, now: u64) -> Claim<'_> {
        let mut s = self.lock();
        if s.busy {
            return Claim::Busy;
        }
        // An upstream that closed an idle connection has usually told us
        // so already (FIN), but the driver may not have been polled since:
        // poll it now, so a dead connection is not reused. It is polled
        // with the waker of whoever drives it (`drive`), never this
        // request's, so its wake-ups keep going where they belong.
        let slot = &mut *s;
        if let (Some(w), Some(d)) = (slot.waker.as_ref(), slot.driver.as_mut())
            && d.as_mut().poll(&mut Context::from_waker(w)).is_ready()
        {
            s.close(&self.held);
        }
        if s.sender
            .as_ref()
            .is_some_and(|snd| !snd.is_ready() && !snd.is_closed())
        {
            // An earlier HTTP/2 stream's response body is still coming over
            // this connection: this request must not wait behind it (nor,
            // should it be cancelled, take that connection down with it).
            return Claim::Busy;
        }
        let open = s.sender.as_ref().is_some_and(|snd| !snd.is_closed());
        if !open && s.driver.is_none() && self.held.get() >= MAX_HELD_PER_WORKER {
            // The worker holds all the upstream connections it may: this
            // request goes through the shared pool.
            return Claim::Busy;
        }
        s.busy = true;
        let cold = std::mem::replace(&mut s.claimed_at, now) != now;
        let lease = Lease {
            affinity: self,
            returned: false,
        };
        match s.sender.take() {
            Some(sender) if open => Claim::Open(lease, sender, cold),
            _ => {
                s.close(&self.held);
                Claim::Empty(lease)
            }
        }
    }
}

/// A request's hold on the slot. Dropping it without [`Lease::put_back`]
/// (an error, a timeout, a cancelled request) closes the connection, whose
/// state is then unknown.
pub(super) struct Lease<'a> {
    affinity: &'a Affinity,
    returned: bool,
}

impl Lease<'_> {
    /// Installs a freshly made connection and wakes the task that drives it.
    pub(super) fn install(&mut self, driver: Driver) {
        let mut s = self.affinity.lock();
        s.close(&self.affinity.held);
        self.affinity.held.0.fetch_add(1, Ordering::Relaxed);
        s.driver = Some(Box::pin(driver));
        if let Some(w) = &s.waker {
            w.wake_by_ref();
        }
    }

    /// Hands the connection back for the client connection's next request.
    pub(super) fn put_back(mut self, sender: Sender) {
        let mut s = self.affinity.lock();
        if !sender.is_closed() && s.driver.is_some() {
            s.sender = Some(sender);
        }
        s.busy = false;
        self.returned = true;
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if !self.returned {
            let mut s = self.affinity.lock();
            s.close(&self.affinity.held);
            s.busy = false;
        }
    }
}

impl Drop for Affinity {
    fn drop(&mut self) {
        let slot = self.slot.get_mut().unwrap_or_else(|p| p.into_inner());
        slot.close(&self.held);
    }
}
