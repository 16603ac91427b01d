//! A reference token-bucket model of the memory limiter, shared by
//! `tests/bucket_model.rs` (deterministic property test, stable toolchain)
//! and `fuzz/fuzz_targets/bucket_model.rs` (coverage-guided, nightly).
//!
//! The model is deliberately naive: every bucket holds `used` tokens as an
//! `f64`, refills continuously (`used -= elapsed * rate`, floored at 0) and
//! admits a request of cost `c` iff `used + c <= burst`. It knows nothing of
//! GCRA, TATs or nanosecond integers. [`Harness`] drives a real
//! [`MemoryLimiter`] on a [`ManualClock`] alongside it and checks, at every
//! step:
//!
//! * the decision agrees with the model (all buckets of the request must
//!   admit; when the model is within [`EPS`] tokens of a threshold either
//!   answer is accepted, and the model then follows the limiter);
//! * the reported `remaining` is the model's whole tokens and lies in
//!   `[0, burst]`; a refusal's `retry_after` is the model's wait;
//! * after the step, `peek` of every bucket of every tenant matches the
//!   model, so a refused request debited nothing (all-or-nothing) and
//!   tenants never see each other's buckets;
//! * over the whole run, per bucket, the limiter admitted at most
//!   `max burst + ∫ rate dt + 1` tokens (checked by [`Harness::finish`],
//!   from the limiter's decisions alone).
//!
//! Two facts about the implementation are modelled explicitly, both
//! documented in `src/limiter.rs`:
//!
//! * time is integer nanoseconds and a token is `interval =
//!   round(1e9 / rate)` ns, so the model refills at `1e9 / interval` tokens
//!   per second; [`Harness`] asserts that `interval` is within 0.5 ns of the
//!   nominal `1e9 / rate` (a relative error below 1e-9 for the rates here);
//! * when a bucket's rate changes, the tokens in use are kept
//!   ([`Gcra::normalize`]), re-expressed under the new interval with integer
//!   division, which may drop up to 1 ns, i.e. `1 / interval` tokens. Each
//!   such conversion widens that bucket's tolerance by that much until the
//!   bucket is certainly full again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tiergate::config::{Limit, Rate};
use tiergate::identity::TenantId;
use tiergate::limiter::memory::ManualClock;
use tiergate::limiter::{BucketSpec, Decision, Gcra, MemoryLimiter, TENANT_BUCKET};

/// Rates a step can choose from (index into this table). Exact and inexact
/// nanosecond intervals, from one per hour to 1000/s. Faster rates would make
/// one nanosecond worth more than [`EPS`] tokens.
pub const RATES: &[&str] = &[
    "1/s", "2/s", "3/s", "7/s", "10/s", "0.5/s", "0.3/s", "100/s", "250/s", "1000/s", "1/m", "7/m",
    "90/m", "1/h", "13/h",
];

/// Route buckets a step can add to the tenant bucket.
pub const ROUTES: &[&str] = &["export", "search"];

/// Number of distinct tenants a run uses.
pub const TENANTS: usize = 2;

/// Largest burst a step may ask for.
pub const MAX_BURST: u32 = 1000;

/// Longest single clock advance (30 days); longer ones are clamped, which
/// keeps a run of tens of thousands of steps far from `u64` nanoseconds.
pub const MAX_ADVANCE_MS: u64 = 30 * 24 * 3_600_000;

/// Decision tolerance in tokens: when the model is this close to a
/// threshold, either answer is accepted.
pub const EPS: f64 = 1e-6;

/// One bucket of one request: which rate, how big, how much it takes.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// Index into [`RATES`] (taken modulo its length).
    pub rate: usize,
    /// Capacity (clamped to `1..=MAX_BURST`).
    pub burst: u32,
    /// Tokens this request takes (clamped to `1..=burst + 1`, so a request
    /// can be larger than the bucket and then must never pass).
    pub cost: u32,
}

impl Spec {
    fn clamped(self) -> Spec {
        let burst = self.burst.clamp(1, MAX_BURST);
        Spec {
            rate: self.rate % RATES.len(),
            burst,
            cost: self.cost.clamp(1, burst + 1),
        }
    }
}

/// One step: let time pass, then one request of one tenant.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    /// Milliseconds to advance the clock before the request.
    pub advance_ms: u64,
    /// Which tenant (taken modulo [`TENANTS`]).
    pub tenant: usize,
    /// The tenant (tier) bucket.
    pub tier: Spec,
    /// An optional route bucket: index into [`ROUTES`] and its spec.
    pub route: Option<(usize, Spec)>,
}

/// The model of one bucket of one tenant.
#[derive(Debug)]
struct ModelBucket {
    /// Tokens in use (0 = full).
    used: f64,
    /// When `used` was last brought up to date (ns, limiter clock).
    last_ns: u64,
    /// Emission interval (ns per token) of the limit last applied.
    interval: u64,
    /// The limit last applied (for `peek`).
    limit: Limit,
    /// Extra tolerance in tokens from interval conversions.
    slack: f64,
    /// Tokens the limiter admitted through this bucket.
    admitted: u64,
    /// Largest burst ever applied.
    max_burst: u32,
    /// `∫ nominal rate dt` over the run, in tokens.
    refill_budget: f64,
    /// Time the budget has been accounted up to.
    budget_ns: u64,
}

impl ModelBucket {
    fn new(now: u64, limit: Limit, interval: u64) -> ModelBucket {
        ModelBucket {
            used: 0.0,
            last_ns: now,
            interval,
            limit,
            slack: 0.0,
            admitted: 0,
            max_burst: limit.burst,
            refill_budget: 0.0,
            budget_ns: now,
        }
    }

    /// Used tokens at `now` after refilling under the current interval, and
    /// whether the bucket is certainly full by then.
    fn used_at(&self, now: u64) -> (f64, bool) {
        let refill = (now - self.last_ns) as f64 / self.interval as f64;
        let left = self.used - refill;
        (left.max(0.0), left < -self.tol())
    }

    /// Refills up to `now` and accounts the admission budget.
    fn advance(&mut self, now: u64) {
        let (used, certainly_full) = self.used_at(now);
        self.used = used;
        if certainly_full {
            self.slack = 0.0;
        }
        self.last_ns = now;
        self.refill_budget += (now - self.budget_ns) as f64 / 1e9 * self.limit.rate.per_second();
        self.budget_ns = now;
    }

    /// Applies a (possibly new) limit, as the limiter's `normalize` does.
    fn apply(&mut self, limit: Limit, interval: u64) {
        if interval != self.interval && self.used > 0.0 {
            self.slack += 1.0 / interval as f64;
        }
        self.interval = interval;
        self.limit = limit;
        self.max_burst = self.max_burst.max(limit.burst);
    }

    fn tol(&self) -> f64 {
        EPS + self.slack
    }
}

/// Whole tokens `x` may floor to, allowing `tol` either way, clamped at 0.
fn floor_range(x: f64, tol: f64) -> (u64, u64) {
    let lo = (x - tol).floor().max(0.0) as u64;
    let hi = (x + tol).floor().max(0.0) as u64;
    (lo, hi)
}

/// A parsed limit and its interval, checked against the nominal rate.
fn limit_of(spec: Spec) -> (Limit, u64) {
    let rate = Rate::parse(RATES[spec.rate]).expect("RATES are valid");
    let limit = Limit {
        rate,
        burst: spec.burst,
    };
    let g = Gcra::new(&limit, 1e9);
    let nominal = 1e9 / rate.per_second();
    assert!(
        (g.interval as f64 - nominal).abs() <= 0.5 + nominal * 1e-15,
        "interval {} is not round(1e9 / {}) = {nominal}",
        g.interval,
        RATES[spec.rate]
    );
    assert_eq!(
        g.tau,
        g.interval * spec.burst as u64,
        "tau = burst * interval"
    );
    (limit, g.interval)
}

/// Drives a [`MemoryLimiter`] and the model side by side.
pub struct Harness {
    clock: Arc<ManualClock>,
    limiter: MemoryLimiter,
    tenants: Vec<TenantId>,
    now: u64,
    steps: usize,
    /// (tenant, bucket name) → model.
    buckets: BTreeMap<(usize, &'static str), ModelBucket>,
    /// Decisions where the model was too close to call.
    pub ambiguous: usize,
    /// Requests admitted.
    pub allowed: usize,
    /// Requests refused.
    pub denied: usize,
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

impl Harness {
    /// A fresh limiter (every bucket full) on a manual clock.
    pub fn new() -> Harness {
        let clock = Arc::new(ManualClock::new());
        let limiter = MemoryLimiter::with_clock(clock.clone());
        // ManualClock starts at one second.
        Harness {
            clock,
            limiter,
            tenants: (0..TENANTS)
                .map(|i| TenantId::parse(&format!("tenant-{i}")).expect("valid"))
                .collect(),
            now: 1_000_000_000,
            steps: 0,
            buckets: BTreeMap::new(),
            ambiguous: 0,
            allowed: 0,
            denied: 0,
        }
    }

    /// Runs one step; `Err` describes the first disagreement.
    pub fn step(&mut self, step: &Step) -> Result<(), String> {
        self.steps += 1;
        let n = self.steps;
        let ms = step.advance_ms.min(MAX_ADVANCE_MS);
        self.clock.advance(Duration::from_millis(ms));
        self.now += ms * 1_000_000;
        let now = self.now;
        let t = step.tenant % TENANTS;

        // The buckets of this request, in the order the limiter sees them.
        let mut parts: Vec<(&'static str, Spec)> = vec![(TENANT_BUCKET, step.tier.clamped())];
        if let Some((r, spec)) = step.route {
            parts.push((ROUTES[r % ROUTES.len()], spec.clamped()));
        }
        let mut specs = Vec::with_capacity(parts.len());
        // Per bucket: (need = used + cost - burst, tolerance, interval).
        let mut needs = Vec::with_capacity(parts.len());
        for &(name, spec) in &parts {
            let (limit, interval) = limit_of(spec);
            let m = self
                .buckets
                .entry((t, name))
                .or_insert_with(|| ModelBucket::new(now, limit, interval));
            m.advance(now);
            m.apply(limit, interval);
            needs.push((
                m.used + spec.cost as f64 - spec.burst as f64,
                m.tol(),
                interval,
            ));
            specs.push(BucketSpec {
                name: Arc::from(name),
                limit,
                cost: spec.cost,
            });
        }

        let certainly_denied = needs.iter().any(|&(need, tol, _)| need > tol);
        let certainly_allowed = needs.iter().all(|&(need, tol, _)| need < -tol);
        let ctx = || format!("step {n} (t={now}ns, tenant {t}, {parts:?}), model needs {needs:?}");

        let decision = self.limiter.check(&self.tenants[t], &specs);
        match &decision {
            Decision::Allow { state } => {
                if certainly_denied {
                    return Err(format!("limiter admitted, model refuses: {}", ctx()));
                }
                if !certainly_allowed {
                    self.ambiguous += 1;
                }
                self.allowed += 1;
                // Debit every bucket; find the model's tightest one.
                let mut min_left = f64::INFINITY;
                let mut min_tol = 0.0_f64;
                for &(name, spec) in &parts {
                    let m = self.buckets.get_mut(&(t, name)).expect("touched above");
                    m.used += spec.cost as f64;
                    m.admitted += spec.cost as u64;
                    let left = spec.burst as f64 - m.used;
                    if left < min_left {
                        min_left = left;
                    }
                    min_tol = min_tol.max(m.tol());
                }
                let (lo, hi) = floor_range(min_left, min_tol);
                if state.remaining < lo || state.remaining > hi {
                    return Err(format!(
                        "remaining {} after admission, model says {min_left}: {}",
                        state.remaining,
                        ctx()
                    ));
                }
                let Some(&(_, reported)) = parts.iter().find(|(name, _)| *name == &*state.name)
                else {
                    return Err(format!("reported bucket {:?} not in request", state.name));
                };
                if state.burst != reported.burst || state.remaining > reported.burst as u64 {
                    return Err(format!(
                        "reported state {state:?} outside [0, burst]: {}",
                        ctx()
                    ));
                }
            }
            Decision::Deny { state, retry_after } => {
                if certainly_allowed {
                    return Err(format!("limiter refused, model admits: {}", ctx()));
                }
                if !certainly_denied {
                    self.ambiguous += 1;
                }
                self.denied += 1;
                // The wait is the longest of the refusing buckets.
                let mut wait = 0.0_f64;
                let mut wait_tol = 0.0_f64;
                for &(need, tol, interval) in &needs {
                    wait = wait.max(need * interval as f64);
                    wait_tol = wait_tol.max(tol * interval as f64);
                }
                let got = retry_after.as_nanos() as f64;
                if (got - wait).abs() > wait_tol + 2.0 {
                    return Err(format!(
                        "retry_after {retry_after:?}, model waits {wait} ns (±{wait_tol}): {}",
                        ctx()
                    ));
                }
                let Some(i) = parts.iter().position(|(name, _)| *name == &*state.name) else {
                    return Err(format!("reported bucket {:?} not in request", state.name));
                };
                let m = &self.buckets[&(t, parts[i].0)];
                let (lo, hi) = floor_range(parts[i].1.burst as f64 - m.used, m.tol());
                if state.burst != parts[i].1.burst || state.remaining < lo || state.remaining > hi {
                    return Err(format!(
                        "refusing bucket state {state:?}, model has {} used: {}",
                        m.used,
                        ctx()
                    ));
                }
            }
        }

        // Every bucket of every tenant, touched or not, matches the model.
        for (&(tenant, name), m) in &self.buckets {
            let spec = BucketSpec {
                name: Arc::from(name),
                limit: m.limit,
                cost: 1,
            };
            let (used, _) = m.used_at(now);
            let (lo, hi) = floor_range(m.limit.burst as f64 - used, m.tol());
            let got = self.limiter.peek(&self.tenants[tenant], &spec);
            if got < lo || got > hi || got > m.limit.burst as u64 {
                return Err(format!(
                    "peek(tenant {tenant}, {name}) = {got}, model has {used} of {} used, \
                     after {decision:?} at {}",
                    m.limit.burst,
                    ctx()
                ));
            }
        }
        Ok(())
    }

    /// Checks the whole-run bound: per bucket, admitted tokens never exceed
    /// the largest burst plus what the nominal rates refilled, plus one.
    pub fn finish(&mut self) -> Result<(), String> {
        let now = self.now;
        for (&(tenant, name), m) in &mut self.buckets {
            m.refill_budget += (now - m.budget_ns) as f64 / 1e9 * m.limit.rate.per_second();
            m.budget_ns = now;
            let bound = m.max_burst as f64 + m.refill_budget + 1.0;
            if m.admitted as f64 > bound {
                return Err(format!(
                    "tenant {tenant} bucket {name}: admitted {} tokens, bound {bound}",
                    m.admitted
                ));
            }
        }
        Ok(())
    }

    /// Runs all steps then [`Harness::finish`].
    pub fn run(steps: &[Step]) -> Result<Harness, String> {
        let mut h = Harness::new();
        for s in steps {
            h.step(s)?;
        }
        h.finish()?;
        Ok(h)
    }
}
