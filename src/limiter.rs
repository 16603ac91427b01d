//! The limiter: given a tenant and the buckets its request touches, admit or
//! refuse, all-or-nothing (SPEC §4).
//!
//! Buckets are token buckets expressed as GCRA: each stores one number, its
//! *theoretical arrival time* (TAT). With emission interval `T = 1/rate` and
//! tolerance `tau = burst * T`, a request of cost `c` is admitted iff
//! `max(TAT, now) + c*T - now <= tau`, and admission moves TAT there. This is
//! exactly a bucket of capacity `burst` refilling continuously at `rate`
//! (tokens = `(tau - (TAT - now)) / T`), it starts full (an absent TAT means
//! `now`), and it needs a single value per bucket, which is what makes the
//! Redis script cheap.
//!
//! Worked example, `rate: 1/m, burst: 2`: `T = 60 s`, `tau = 120 s`. At t=0
//! two requests move TAT to 60 s then 120 s; a third needs
//! `120 + 60 - 0 = 180 > 120`: refused, retry after 60 s.
//!
//! Being over the limit is a value ([`Decision::Deny`]), not an error;
//! [`LimiterError`] is for a backend that could not answer, and what to do
//! then (`on_error`) is decided in one place, [`Limiter::check`].

pub mod memory;
pub mod redis;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::config::{Limit, OnError};
use crate::identity::TenantId;
use crate::metrics::Metrics;

pub use memory::MemoryLimiter;
pub use redis::RedisLimiter;

/// Name of the tier bucket every limited request touches.
pub const TENANT_BUCKET: &str = "tenant";
/// Name of the per-client-IP bucket.
pub const IP_BUCKET: &str = "ip";

/// One bucket a request must pass.
#[derive(Debug, Clone)]
pub struct BucketSpec {
    /// `tenant`, a route name, or `ip`.
    pub name: Arc<str>,
    /// Its size.
    pub limit: Limit,
    /// Tokens this request takes.
    pub cost: u32,
}

/// GCRA parameters of a bucket in some integer time unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    /// Emission interval: time per token.
    pub interval: u64,
    /// Tolerance: `burst * interval`.
    pub tau: u64,
}

impl Gcra {
    /// Parameters for `limit` with `units_per_sec` time units per second
    /// (1e9 for nanoseconds, 1e6 for microseconds).
    pub fn new(limit: &Limit, units_per_sec: f64) -> Gcra {
        let interval = (units_per_sec / limit.rate.per_second()).round().max(1.0) as u64;
        Gcra {
            interval,
            tau: interval.saturating_mul(limit.burst as u64),
        }
    }

    /// Re-expresses a TAT stored under another emission interval in this
    /// one, keeping the *tokens in use* constant. A tier or override change
    /// therefore takes effect at once: a larger burst frees tokens
    /// immediately, a faster rate refills faster from now on, and a smaller
    /// limit never hands out a fresh burst.
    pub fn normalize(&self, tat: u64, stored_interval: u64, now: u64) -> u64 {
        if stored_interval == self.interval || stored_interval == 0 || tat <= now {
            return tat;
        }
        let used = (tat - now) as u128 * self.interval as u128 / stored_interval as u128;
        now.saturating_add(used.min(u64::MAX as u128) as u64)
    }

    /// Whole tokens left when the bucket's TAT is `tat` at `now`.
    pub fn remaining(&self, now: u64, tat: u64) -> u64 {
        let used = tat.saturating_sub(now);
        self.tau.saturating_sub(used) / self.interval
    }
}

/// The state of one bucket as reported to the client.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketState {
    /// Bucket name (`tenant`, route name, `ip`).
    pub name: Arc<str>,
    /// Capacity.
    pub burst: u32,
    /// Whole tokens left.
    pub remaining: u64,
    /// Time until the bucket is full again.
    pub reset: Duration,
    /// Time to refill from empty.
    pub window: Duration,
}

/// The verdict on one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Admitted; every bucket was debited. `state` is the most constraining
    /// bucket after the debit.
    Allow {
        /// Most constraining bucket.
        state: BucketState,
    },
    /// Refused; nothing was debited.
    Deny {
        /// The bucket that refused (the one with the longest wait).
        state: BucketState,
        /// When the request could first be admitted.
        retry_after: Duration,
    },
}

impl Decision {
    /// The bucket reported in headers.
    pub fn state(&self) -> &BucketState {
        match self {
            Decision::Allow { state } | Decision::Deny { state, .. } => state,
        }
    }
}

/// Evaluates GCRA over all buckets at `now` against their current TATs
/// (`0` = absent = full). On admission the new TATs are written back into
/// `tats`; on refusal `tats` is left as it was. Time is in units of
/// `units_per_sec`. Shared by the memory backend and (for the reply) Redis.
pub fn evaluate(
    buckets: &[BucketSpec],
    gcras: &[Gcra],
    tats: &mut [u64],
    now: u64,
    units_per_sec: f64,
) -> Decision {
    let to_dur = |units: u64| Duration::from_secs_f64(units as f64 / units_per_sec);
    let mut deny: Option<(usize, u64)> = None;
    for (i, (b, g)) in buckets.iter().zip(gcras).enumerate() {
        let tat = tats[i].max(now);
        let needed = tat.saturating_add(g.interval.saturating_mul(b.cost as u64));
        if needed - now > g.tau {
            let wait = needed - now - g.tau;
            if deny.is_none_or(|(_, w)| wait > w) {
                deny = Some((i, wait));
            }
        }
    }
    if let Some((i, wait)) = deny {
        let g = gcras[i];
        let tat = tats[i].max(now);
        return Decision::Deny {
            state: BucketState {
                name: buckets[i].name.clone(),
                burst: buckets[i].limit.burst,
                remaining: g.remaining(now, tat),
                reset: to_dur(tat - now),
                window: to_dur(g.tau),
            },
            retry_after: to_dur(wait),
        };
    }
    let mut best: Option<(usize, u64)> = None;
    for (i, (b, g)) in buckets.iter().zip(gcras).enumerate() {
        let tat = tats[i].max(now) + g.interval * b.cost as u64;
        tats[i] = tat;
        let rem = g.remaining(now, tat);
        if best.is_none_or(|(_, r)| rem < r) {
            best = Some((i, rem));
        }
    }
    let (i, remaining) = best.expect("at least one bucket");
    Decision::Allow {
        state: BucketState {
            name: buckets[i].name.clone(),
            burst: buckets[i].limit.burst,
            remaining,
            reset: to_dur(tats[i] - now),
            window: to_dur(gcras[i].tau),
        },
    }
}

/// A backend failed to answer in time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimiterError {
    /// No connection to Redis (yet, or any more).
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// The call did not finish within `backend.redis.timeout`.
    #[error("redis call timed out")]
    Timeout,
    /// Redis answered with an error.
    #[error("redis error: {0}")]
    Redis(String),
}

impl LimiterError {
    /// Short stable label for `tiergate_backend_errors_total{kind}`.
    pub fn kind(&self) -> &'static str {
        match self {
            LimiterError::Unavailable(_) => "unavailable",
            LimiterError::Timeout => "timeout",
            LimiterError::Redis(_) => "error",
        }
    }
}

/// What the request path should do.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A real decision (from the backend or the local fallback).
    Decided(Decision),
    /// Backend down under `on_error: allow`: admit without headers.
    FailOpen,
    /// Backend down under `on_error: deny`: 503.
    Unavailable,
}

enum Backend {
    Memory,
    Redis(RedisLimiter),
}

/// Whether the shared backend is answering; one per process, read by
/// `/readyz` and written by every worker's [`Limiter`].
pub struct BackendHealth {
    degraded: AtomicBool,
    failures: std::sync::atomic::AtomicU32,
    /// Bumped on every Redis failure: a Redis that failed may have lost its
    /// data, so the workers' deny caches start over.
    generation: std::sync::atomic::AtomicU64,
    on_error: OnError,
    metrics: Arc<Metrics>,
}

impl BackendHealth {
    /// Healthy to start with.
    pub fn new(on_error: OnError, metrics: Arc<Metrics>) -> Arc<BackendHealth> {
        metrics.backend_degraded.set(0);
        Arc::new(BackendHealth {
            degraded: AtomicBool::new(false),
            failures: std::sync::atomic::AtomicU32::new(0),
            generation: std::sync::atomic::AtomicU64::new(0),
            on_error,
            metrics,
        })
    }

    /// Whether decisions are currently made by the `on_error` policy.
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// Whether requests can be served now (for `/readyz`).
    pub fn can_serve(&self) -> bool {
        !(self.degraded() && self.on_error == OnError::Deny)
    }

    /// Consecutive request failures that open the circuit.
    pub const TRIP_AFTER: u32 = 3;

    /// A request's Redis call failed: after [`Self::TRIP_AFTER`] in a row the
    /// circuit opens (requests stop waiting on Redis until the probe sees it
    /// answer again).
    pub fn record_failure(&self, cause: &LimiterError) {
        self.generation.fetch_add(1, Ordering::Relaxed);
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= Self::TRIP_AFTER {
            self.set(true, Some(cause));
        }
    }

    /// A request's Redis call succeeded.
    pub fn record_success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// The background probe's verdict: closes the circuit when Redis
    /// answers, opens it when it does not.
    pub fn probe_result(&self, result: Result<(), &LimiterError>) {
        match result {
            Ok(()) => {
                self.failures.store(0, Ordering::Relaxed);
                self.set(false, None);
            }
            Err(e) => {
                self.generation.fetch_add(1, Ordering::Relaxed);
                self.set(true, Some(e));
            }
        }
    }

    /// The current failure generation (see the field's doc).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Records the backend's state; logs and updates the gauge once per
    /// transition, not per request.
    fn set(&self, degraded: bool, cause: Option<&LimiterError>) {
        if self.degraded.load(Ordering::Relaxed) == degraded {
            return;
        }
        if self.degraded.swap(degraded, Ordering::Relaxed) != degraded {
            self.metrics.backend_degraded.set(degraded as i64);
            match cause {
                Some(e) => {
                    tracing::warn!(error = %e, on_error = ?self.on_error, "limiter backend degraded; deciding by on_error policy")
                }
                None => tracing::info!("limiter backend recovered"),
            }
        }
    }
}

/// A worker's limiter: the backend connection plus the shared fallback
/// buckets and health, with the `on_error` policy applied in one place.
pub struct Limiter {
    backend: Backend,
    /// The memory backend itself, or the `local` fallback for Redis.
    local: Arc<MemoryLimiter>,
    on_error: OnError,
    health: Arc<BackendHealth>,
    metrics: Arc<Metrics>,
    backend_label: &'static str,
    /// `tiergate_limiter_duration_seconds{backend}`, resolved once.
    duration: prometheus::Histogram,
}

impl Limiter {
    /// An in-process limiter over shared buckets.
    pub fn memory(
        local: Arc<MemoryLimiter>,
        health: Arc<BackendHealth>,
        metrics: Arc<Metrics>,
    ) -> Limiter {
        Limiter {
            backend: Backend::Memory,
            local,
            on_error: OnError::Local,
            health,
            duration: metrics.limiter_duration.with_label_values(&["memory"]),
            metrics,
            backend_label: "memory",
        }
    }

    /// A Redis limiter with a local fallback.
    pub fn redis(
        redis: RedisLimiter,
        local: Arc<MemoryLimiter>,
        on_error: OnError,
        health: Arc<BackendHealth>,
        metrics: Arc<Metrics>,
    ) -> Limiter {
        Limiter {
            backend: Backend::Redis(redis),
            local,
            on_error,
            health,
            duration: metrics.limiter_duration.with_label_values(&["redis"]),
            metrics,
            backend_label: "redis",
        }
    }

    /// `memory` or `redis`.
    pub fn backend_name(&self) -> &'static str {
        self.backend_label
    }

    fn fallback(&self, tenant: &TenantId, buckets: &[BucketSpec]) -> Outcome {
        match self.on_error {
            OnError::Local => Outcome::Decided(self.local.check(tenant, buckets)),
            OnError::Allow => Outcome::FailOpen,
            OnError::Deny => Outcome::Unavailable,
        }
    }

    /// Decides one request: every bucket in `buckets` (all of `tenant`).
    pub async fn check(&self, tenant: &TenantId, buckets: &[BucketSpec]) -> Outcome {
        let started = Instant::now();
        let outcome = match &self.backend {
            Backend::Memory => Outcome::Decided(self.local.check(tenant, buckets)),
            // Circuit open: do not wait on a Redis that is known to be down;
            // the probe closes the circuit when it answers again.
            Backend::Redis(_) if self.health.degraded() => self.fallback(tenant, buckets),
            Backend::Redis(redis) => {
                match redis.check(tenant, buckets, self.health.generation()).await {
                    Ok(decision) => {
                        self.health.record_success();
                        Outcome::Decided(decision)
                    }
                    Err(e) => {
                        self.metrics
                            .backend_errors
                            .with_label_values(&["redis", e.kind()])
                            .inc();
                        tracing::debug!(error = %e, "redis limiter call failed");
                        self.health.record_failure(&e);
                        self.fallback(tenant, buckets)
                    }
                }
            }
        };
        self.duration.observe(started.elapsed().as_secs_f64());
        outcome
    }
}

/// A bucket from text, for tests: `test_bucket("tenant", "1/m", 5, 1)`.
#[cfg(test)]
pub(crate) fn test_bucket(name: &str, rate: &str, burst: u32, cost: u32) -> BucketSpec {
    BucketSpec {
        name: Arc::from(name),
        limit: Limit {
            rate: crate::config::Rate::parse(rate).unwrap(),
            burst,
        },
        cost,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(name: &str, rate: &str, burst: u32, cost: u32) -> BucketSpec {
        test_bucket(name, rate, burst, cost)
    }

    #[test]
    fn worked_example_from_module_docs() {
        let b = [bucket("tenant", "1/m", 2, 1)];
        let g = [Gcra::new(&b[0].limit, 1.0)];
        let mut tats = [0u64];
        let now = 1000;
        tats[0] = now;
        assert!(
            matches!(evaluate(&b, &g, &mut tats, now, 1.0), Decision::Allow { ref state } if state.remaining == 1)
        );
        assert!(
            matches!(evaluate(&b, &g, &mut tats, now, 1.0), Decision::Allow { ref state } if state.remaining == 0)
        );
        match evaluate(&b, &g, &mut tats, now, 1.0) {
            Decision::Deny { retry_after, state } => {
                assert_eq!(retry_after, Duration::from_secs(60));
                assert_eq!(state.reset, Duration::from_secs(120));
            }
            d => panic!("{d:?}"),
        }
        assert_eq!(tats[0], now + 120, "a refused request debits nothing");
    }

    #[test]
    fn refused_route_bucket_takes_nothing_from_tenant_bucket() {
        let b = [
            bucket("tenant", "1/m", 10, 1),
            bucket("export", "1/m", 1, 1),
        ];
        let g = [Gcra::new(&b[0].limit, 1.0), Gcra::new(&b[1].limit, 1.0)];
        let mut tats = [0u64, 0];
        assert!(matches!(
            evaluate(&b, &g, &mut tats, 0, 1.0),
            Decision::Allow { .. }
        ));
        let before = tats;
        let d = evaluate(&b, &g, &mut tats, 0, 1.0);
        assert!(matches!(d, Decision::Deny { ref state, .. } if &*state.name == "export"));
        assert_eq!(tats, before);
    }
}
