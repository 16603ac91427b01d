//! Coarse deadlines for one worker's connections: slowloris heads
//! (`header_read_timeout`), silent connections (`idle_timeout`), quiet
//! connections' upstream slots, graceful drain, and the upstream request
//! deadline (`upstream.timeout`) of requests sent over a client
//! connection's own upstream connection.
//!
//! Why one sweep per worker instead of timers: a Tokio interval per
//! connection is polled on every wake of the connection task, a drain
//! `watch` per connection likewise, and a Tokio timeout per upstream
//! request goes in and out of the timer wheel each time. Together they
//! measured ~3,100 of a proxied request's ~49,000 instructions (callgrind),
//! and CPU per request 4–7% higher in the e2e bench. Here one task per
//! worker wakes every [`Watchdog::tick`], reads the clock once, and looks at
//! each connection's few atomics; a connection hears from it only when
//! something is due. Reads and writes stamp the connection with the time of
//! the last sweep (an atomic load, no clock read).
//!
//! The price is precision. Stamps are up to one tick old, so every check
//! allows one extra tick: a deadline fires no earlier than configured and at
//! most two ticks later — unless the sweep itself runs late (a worker busy
//! for longer than a tick), when the header and idle checks can fire early
//! by that lateness. The upstream deadline is armed on the real clock and
//! never fires early. The tick is an eighth of the shortest of the three
//! timeouts, between 20 ms and 1 s (1 s with the defaults).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;

/// The shortest and longest sweep interval.
const MIN_TICK: Duration = Duration::from_millis(20);
const MAX_TICK: Duration = Duration::from_secs(1);

/// Signal: the request head took longer than `header_read_timeout`; close.
pub const CLOSE: u8 = 1;
/// Signal: silent for `idle_timeout`, or the worker drains; shut down
/// gracefully (finish the request in flight, then close).
pub const SHUT_DOWN: u8 = 2;
/// Signal: quiet for a while; give the upstream slot back.
pub const RELEASE: u8 = 4;

/// A deadline that fired.
const FIRED: u64 = u64::MAX;

/// One worker's sweep: its clock, its limits, the connections it watches.
pub struct Watchdog {
    start: Instant,
    /// Milliseconds since `start` at the last sweep.
    now: AtomicU64,
    tick: Duration,
    tick_ms: u64,
    header_ms: u64,
    idle_ms: u64,
    release_ms: u64,
    draining: AtomicBool,
    conns: Mutex<Vec<Arc<Watched>>>,
}

impl Watchdog {
    /// A watchdog for `header_read_timeout`, `idle_timeout` and
    /// `upstream.timeout`; a connection quiet for `release_after` gives its
    /// upstream slot back.
    pub fn new(
        header: Duration,
        idle: Duration,
        upstream: Duration,
        release_after: Duration,
    ) -> Arc<Watchdog> {
        let tick = (header.min(idle).min(upstream) / 8).clamp(MIN_TICK, MAX_TICK);
        Arc::new(Watchdog {
            start: Instant::now(),
            now: AtomicU64::new(0),
            tick,
            tick_ms: ms(tick),
            header_ms: ms(header),
            idle_ms: ms(idle),
            release_ms: ms(release_after),
            draining: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        })
    }

    /// How often [`Watchdog::run`] sweeps.
    pub fn tick(&self) -> Duration {
        self.tick
    }

    /// Starts watching a new connection.
    pub fn watch(self: &Arc<Self>) -> Arc<Watched> {
        let stamp = self.now.load(Ordering::Relaxed);
        let draining = self.draining.load(Ordering::Relaxed);
        let w = Arc::new(Watched {
            dog: self.clone(),
            last_activity: AtomicU64::new(stamp),
            head_since: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            released_for: AtomicU64::new(u64::MAX),
            signals: AtomicU8::new(if draining { SHUT_DOWN } else { 0 }),
            waker: AtomicWaker::new(),
            upstream: Deadline::default(),
            head_clock: AtomicBool::new(true),
            shut_down: AtomicBool::new(draining),
            closed: AtomicBool::new(false),
        });
        lock(&self.conns).push(w.clone());
        w
    }

    /// Sweeps every tick, forever (the worker aborts it when it is done).
    pub async fn run(self: Arc<Self>) {
        let mut every = tokio::time::interval(self.tick);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            self.sweep();
        }
    }

    /// Asks every connection, now and later, to shut down gracefully.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        for c in lock(&self.conns).iter() {
            if !c.shut_down.swap(true, Ordering::Relaxed) {
                c.signal(SHUT_DOWN);
            }
        }
    }

    /// Stops watching every connection (the worker is done). Also breaks
    /// the `Watchdog` ↔ `Watched` reference cycle.
    pub fn forget_all(&self) {
        lock(&self.conns).clear();
    }

    /// One pass: advance the clock, check each connection, forget closed
    /// ones.
    fn sweep(&self) {
        let now = ms(self.start.elapsed());
        self.now.store(now, Ordering::Relaxed);
        lock(&self.conns).retain(|c| {
            if c.closed.load(Ordering::Relaxed) {
                return false;
            }
            self.check(c, now);
            true
        });
    }

    /// What is due on `c` at `now`. Stamps may be up to a tick older than
    /// the event they record, hence the extra tick everywhere.
    fn check(&self, c: &Watched, now: u64) {
        let age = |stamp: u64| now.saturating_sub(stamp).saturating_sub(self.tick_ms);
        let since = c.head_since.load(Ordering::Relaxed);
        if since != 0
            && c.in_flight.load(Ordering::Relaxed) == 0
            && age(since - 1) >= self.header_ms
        {
            c.signal(CLOSE);
        }
        let last = c.last_activity.load(Ordering::Relaxed);
        let idle = age(last);
        if idle >= self.release_ms && c.released_for.load(Ordering::Relaxed) != last {
            c.released_for.store(last, Ordering::Relaxed);
            c.signal(RELEASE);
        }
        if idle >= self.idle_ms && !c.shut_down.swap(true, Ordering::Relaxed) {
            // Once: a connection shutting down gracefully may still finish
            // a long response, and need not be woken every tick meanwhile.
            c.signal(SHUT_DOWN);
        }
        c.upstream.check(now);
    }

    fn stamp(&self) -> u64 {
        self.now.load(Ordering::Relaxed)
    }
}

/// What the watchdog knows of one connection, updated by the stream and
/// the service with plain atomics.
pub struct Watched {
    dog: Arc<Watchdog>,
    /// When bytes last moved either way (a sweep's time).
    last_activity: AtomicU64,
    /// 1 + when the first byte of a not-yet-complete request head arrived;
    /// 0 while no head is pending.
    head_since: AtomicU64,
    /// Requests whose head is complete and whose response is not yet made.
    in_flight: AtomicU32,
    /// The `last_activity` the upstream slot was last released for.
    released_for: AtomicU64,
    /// Signals not yet taken by the connection task.
    signals: AtomicU8,
    /// The connection task, woken when a signal is set.
    waker: AtomicWaker,
    /// The deadline of the request on the connection's own upstream
    /// connection.
    pub upstream: Deadline,
    /// Whether bytes count: between requests they start the head clock,
    /// and any move is activity. True until an HTTP/2 request shows the
    /// connection is multiplexed (see [`Watched::multiplexed`]).
    head_clock: AtomicBool,
    /// SHUT_DOWN was sent (idle or drain): once is enough.
    shut_down: AtomicBool,
    closed: AtomicBool,
}

impl Watched {
    /// Bytes arrived from the client. On a multiplexed connection they are
    /// frames, which say nothing about a head or idleness (see
    /// [`Watched::multiplexed`]).
    pub fn bytes_read(&self) {
        if !self.head_clock.load(Ordering::Relaxed) {
            return;
        }
        let now = self.dog.stamp();
        self.last_activity.store(now, Ordering::Relaxed);
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_since.load(Ordering::Relaxed) == 0
        {
            self.head_since.store(now + 1, Ordering::Relaxed);
        }
    }

    /// Bytes went to the client.
    pub fn bytes_written(&self) {
        if self.head_clock.load(Ordering::Relaxed) {
            self.last_activity
                .store(self.dog.stamp(), Ordering::Relaxed);
        }
    }

    /// An HTTP/2 request arrived. From now on the bytes that move are
    /// frames of any stream or of none (PING, SETTINGS, WINDOW_UPDATE), so
    /// they neither start the head clock nor count as activity: the
    /// connection is idle when no request has started or finished for
    /// `idle_timeout` (what Envoy and Go call idle), and then gets a
    /// graceful GOAWAY, which lets a response still streaming finish. A
    /// client cannot keep an idle connection with PINGs. Before its first
    /// request an HTTP/2 connection's preface counts as a head, as nginx's
    /// `client_header_timeout` does.
    pub fn multiplexed(&self) {
        if self.head_clock.swap(false, Ordering::Relaxed) {
            self.head_since.store(0, Ordering::Relaxed);
        }
    }

    /// A request head is complete.
    fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_since.store(0, Ordering::Relaxed);
        self.requests_are_activity();
    }

    /// Its response is made (or it was dropped).
    fn request_finished(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.requests_are_activity();
    }

    /// On a multiplexed connection, requests starting and finishing are
    /// its activity (bytes are not).
    fn requests_are_activity(&self) {
        if !self.head_clock.load(Ordering::Relaxed) {
            self.last_activity
                .store(self.dog.stamp(), Ordering::Relaxed);
        }
    }

    /// Waits for signals ([`CLOSE`], [`SHUT_DOWN`], [`RELEASE`]) and takes
    /// them.
    pub fn signals(&self) -> Signals<'_> {
        Signals(self)
    }

    /// The connection is gone; the next sweep forgets it. The wakers go
    /// now, so the finished task's memory does not wait for that sweep.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        drop(self.waker.take());
        drop(self.upstream.waker.take());
    }

    /// The watchdog's clock as of its last sweep (ms): cheap, coarse.
    pub fn clock(&self) -> u64 {
        self.dog.stamp()
    }

    /// The watchdog's clock read now (ms), for [`Deadline::arm`].
    fn now(&self) -> u64 {
        ms(self.dog.start.elapsed())
    }

    fn signal(&self, bits: u8) {
        let before = self.signals.fetch_or(bits, Ordering::Release);
        if before & bits != bits {
            self.waker.wake();
        }
    }
}

/// A request in flight, from its complete head until dropped: bytes read
/// meanwhile are its body, not the next head. The service holds one until
/// the response is made (also when hyper drops the service future: client
/// gone, HTTP/2 stream reset), and a request body still arriving after
/// that holds another until it ends, so a slow upload answered early is
/// bounded by `idle_timeout`, not cut at `header_read_timeout`.
pub struct InFlight(Arc<Watched>);

impl InFlight {
    /// Counts a request (or its body) as in flight on `state`.
    pub fn start(state: Arc<Watched>) -> InFlight {
        state.request_started();
        InFlight(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// Future of [`Watched::signals`].
pub struct Signals<'a>(&'a Watched);

impl Future for Signals<'_> {
    type Output = u8;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u8> {
        let w = self.0;
        w.waker.register(cx.waker());
        if w.signals.load(Ordering::Relaxed) == 0 {
            return Poll::Pending;
        }
        Poll::Ready(w.signals.swap(0, Ordering::Acquire))
    }
}

/// A coarse one-shot deadline, checked by the sweep: 0 when disarmed, the
/// due time (watchdog ms) when armed, [`FIRED`] once due.
#[derive(Default)]
pub struct Deadline {
    at: AtomicU64,
    waker: AtomicWaker,
}

impl Deadline {
    /// Arms the deadline `after` from now; the future resolves once a
    /// sweep finds it due and disarms when dropped. One request at a time
    /// uses a connection's deadline (the one holding its upstream slot).
    pub fn arm<'a>(&'a self, w: &Watched, after: Duration) -> Armed<'a> {
        // The real clock, not a stamp: a stamp can be older than a tick
        // when a sweep runs late, and this deadline must never fire early.
        let at = w.now() + ms(after);
        self.at.store(at.max(1), Ordering::Relaxed);
        Armed(self)
    }

    fn check(&self, now: u64) {
        let at = self.at.load(Ordering::Relaxed);
        if at != 0
            && at != FIRED
            && now >= at
            && self
                .at
                .compare_exchange(at, FIRED, Ordering::Release, Ordering::Relaxed)
                .is_ok()
        {
            self.waker.wake();
        }
    }
}

/// An armed [`Deadline`]: resolves once due, disarms on drop.
pub struct Armed<'a>(&'a Deadline);

impl Future for Armed<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.0.waker.register(cx.waker());
        if self.0.at.load(Ordering::Acquire) == FIRED {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        self.0.at.store(0, Ordering::Relaxed);
        // The waker may be an HTTP/2 stream task's: do not keep that
        // task's memory alive until the next request.
        drop(self.0.waker.take());
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 2)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dog() -> Arc<Watchdog> {
        // tick = 800 ms / 8 = 100 ms
        Watchdog::new(
            Duration::from_millis(800),
            Duration::from_secs(2),
            Duration::from_secs(1),
            Duration::from_millis(400),
        )
    }

    fn at(d: &Watchdog, now: u64) {
        d.now.store(now, Ordering::Relaxed);
        for c in lock(&d.conns).iter() {
            d.check(c, now);
        }
    }

    fn take(w: &Watched) -> u8 {
        w.signals.swap(0, Ordering::Relaxed)
    }

    #[test]
    fn a_head_is_cut_off_no_earlier_than_header_timeout() {
        let d = dog();
        assert_eq!(d.tick(), Duration::from_millis(100));
        at(&d, 1000);
        let w = d.watch();
        w.bytes_read(); // head started, stamped 1000
        at(&d, 1000 + 800);
        assert_eq!(take(&w) & CLOSE, 0, "one tick of slack");
        at(&d, 1000 + 900);
        assert_eq!(take(&w) & CLOSE, CLOSE);
        // A complete head stops the clock; bytes of its body do not
        // restart it while the request (or its body) is in flight.
        let request = InFlight::start(w.clone());
        w.bytes_read();
        at(&d, 5000);
        assert_eq!(take(&w) & CLOSE, 0);
        drop(request);
        w.bytes_read(); // stamped 5000: the next head
        at(&d, 5000 + 900);
        assert_eq!(take(&w) & CLOSE, CLOSE);
    }

    #[test]
    fn frames_between_http2_requests_are_neither_heads_nor_activity() {
        let d = dog();
        at(&d, 1000);
        let w = d.watch();
        w.bytes_read(); // the preface: a head until the first request
        w.multiplexed();
        drop(InFlight::start(w.clone())); // finished at 1000
        for t in (1100..=3100).step_by(100) {
            at(&d, t);
            w.bytes_read(); // a PING
            w.bytes_written(); // its ACK
        }
        assert_eq!(w.head_since.load(Ordering::Relaxed), 0);
        assert_eq!(take(&w) & (CLOSE | SHUT_DOWN), SHUT_DOWN, "idle since 1000");
    }

    #[test]
    fn quiet_connections_release_once_then_shut_down() {
        let d = dog();
        let w = d.watch();
        w.bytes_written(); // stamped 0
        at(&d, 400);
        assert_eq!(take(&w), 0);
        at(&d, 500);
        assert_eq!(take(&w), RELEASE);
        at(&d, 600);
        assert_eq!(take(&w), 0, "released once per quiet spell");
        at(&d, 2100);
        assert_eq!(take(&w), SHUT_DOWN);
        // Activity starts a new spell.
        d.now.store(3000, Ordering::Relaxed);
        w.bytes_read();
        let _request = InFlight::start(w.clone());
        at(&d, 3500);
        assert_eq!(take(&w), RELEASE);
    }

    #[test]
    fn drain_reaches_current_and_later_connections_and_closed_ones_are_forgotten() {
        let d = dog();
        let a = d.watch();
        let b = d.watch();
        b.close();
        d.sweep();
        assert_eq!(lock(&d.conns).len(), 1);
        d.drain();
        assert_eq!(take(&a), SHUT_DOWN);
        let c = d.watch();
        assert_eq!(take(&c), SHUT_DOWN);
    }

    #[test]
    fn an_upstream_deadline_fires_once_due_and_not_after_disarming() {
        let d = dog();
        at(&d, 1000);
        let w = d.watch();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        {
            // Armed on the real clock (≈0 ms into this test): due at ≥ 1 s.
            let armed = w.upstream.arm(&w, Duration::from_secs(1));
            let mut armed = std::pin::pin!(armed);
            at(&d, 999);
            assert!(armed.as_mut().poll(&mut cx).is_pending(), "not early");
            at(&d, 100_000);
            assert!(armed.as_mut().poll(&mut cx).is_ready());
        }
        assert_eq!(w.upstream.at.load(Ordering::Relaxed), 0);
        at(&d, 200_000);
        assert_eq!(w.upstream.at.load(Ordering::Relaxed), 0);
    }
}
