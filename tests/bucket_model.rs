//! The memory limiter against a naive `f64` token-bucket model
//! (`tests/bucket_model/model.rs`, shared with the `bucket_model` fuzz
//! target): thousands of pseudo-random request sequences from fixed seeds,
//! on the stable toolchain, deterministic, well under a second in release
//! and a few seconds at most in debug.
//!
//! What each step checks is listed in the model's module docs: decision
//! agreement (within 1e-6 tokens of a threshold either answer is fine),
//! `remaining` in `[0, burst]` and equal to the model's whole tokens,
//! `retry_after` equal to the model's wait, `peek` of every bucket of every
//! tenant after every step (so a refused multi-bucket request debits
//! nothing), and over the run `admitted <= max burst + ∫ rate dt + 1`.
//!
//! The exact-boundary tests at the end pin what the tolerance leaves open:
//! a request that needs exactly the tokens left is admitted, and one
//! nanosecond earlier it is not.

#[path = "bucket_model/model.rs"]
mod model;

use std::sync::Arc;
use std::time::Duration;

use model::{Harness, MAX_BURST, RATES, ROUTES, Spec, Step, TENANTS};
use tiergate::config::{Limit, Rate};
use tiergate::identity::TenantId;
use tiergate::limiter::memory::ManualClock;
use tiergate::limiter::{BucketSpec, Decision, MemoryLimiter};

/// xorshift64*: small, fast, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // Never zero; spread small seeds.
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant here).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `percent`/100.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A random bucket spec: mostly small bursts (where boundaries are hit
/// often), sometimes large; cost mostly 1, sometimes up to burst + 1.
fn spec(rng: &mut Rng) -> Spec {
    let burst = if rng.chance(85) {
        1 + rng.below(12) as u32
    } else {
        1 + rng.below(MAX_BURST as u64) as u32
    };
    Spec {
        rate: rng.below(RATES.len() as u64) as usize,
        burst,
        cost: cost(rng, burst),
    }
}

/// A random cost for a bucket of `burst`.
fn cost(rng: &mut Rng, burst: u32) -> u32 {
    match rng.below(20) {
        0..=11 => 1,
        12..=18 => 1 + rng.below(burst as u64) as u32,
        _ => burst + 1,
    }
}

/// Milliseconds between requests: bursts of back-to-back requests, short and
/// long gaps, and now and then hours or days.
fn gap(rng: &mut Rng) -> u64 {
    match rng.below(20) {
        0..=7 => 0,
        8..=12 => rng.below(50),
        13..=16 => rng.below(2_000),
        17..=18 => rng.below(120_000),
        _ => rng.below(7 * 24 * 3_600_000),
    }
}

/// A sequence of up to `max_steps` steps. Each bucket keeps its spec for a
/// while (so bursts are actually exhausted) and changes it now and then (so
/// tier and override changes are exercised); costs vary every step.
fn sequence(rng: &mut Rng, max_steps: u64, routes: bool) -> Vec<Step> {
    let n = 1 + rng.below(max_steps);
    let mut tier = [spec(rng), spec(rng)];
    let mut route = [spec(rng), spec(rng)];
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let tenant = rng.below(TENANTS as u64) as usize;
        if rng.chance(8) {
            tier[tenant] = spec(rng);
        }
        if rng.chance(8) {
            route[tenant] = spec(rng);
        }
        tier[tenant].cost = cost(rng, tier[tenant].burst);
        route[tenant].cost = cost(rng, route[tenant].burst);
        let route = (routes && rng.chance(70))
            .then(|| (rng.below(ROUTES.len() as u64) as usize, route[tenant]));
        out.push(Step {
            advance_ms: gap(rng),
            tenant,
            tier: tier[tenant],
            route,
        });
    }
    out
}

/// Runs `count` sequences from `seed`; panics with the seed and the failing
/// step on the first disagreement.
fn run(seed: u64, count: u64, max_steps: u64, routes: bool) -> (usize, usize, usize) {
    let mut rng = Rng::new(seed);
    let (mut allowed, mut denied, mut ambiguous) = (0, 0, 0);
    for i in 0..count {
        let steps = sequence(&mut rng, max_steps, routes);
        match Harness::run(&steps) {
            Ok(h) => {
                allowed += h.allowed;
                denied += h.denied;
                ambiguous += h.ambiguous;
            }
            Err(e) => panic!("seed {seed}, sequence {i}: {e}\nsteps: {steps:#?}"),
        }
    }
    (allowed, denied, ambiguous)
}

/// Single-bucket sequences (the tenant bucket alone), two tenants.
#[test]
fn tenant_bucket_agrees_with_model() {
    let (allowed, denied, ambiguous) = run(0x7133_6a7e, 2_000, 48, false);
    // The generator must actually reach both answers, often.
    assert!(allowed > 10_000 && denied > 10_000, "{allowed} / {denied}");
    // Ties are common (ms steps, exact intervals) but must not be the norm.
    assert!(ambiguous * 10 < allowed + denied, "{ambiguous} ambiguous");
}

/// Tenant + route buckets: all-or-nothing against the model, with `peek`
/// after every step proving a refused request debited neither bucket.
#[test]
fn tenant_and_route_buckets_all_or_nothing() {
    let (allowed, denied, _) = run(0x0b0c_4e75, 2_000, 48, true);
    assert!(allowed > 10_000 && denied > 10_000, "{allowed} / {denied}");
}

/// A few long runs, where rounding could accumulate.
#[test]
fn long_sequences_stay_within_bound() {
    run(0x0010_05e9, 12, 3_000, true);
}

fn limit(rate: &str, burst: u32) -> Limit {
    Limit {
        rate: Rate::parse(rate).expect("valid rate"),
        burst,
    }
}

fn bucket(name: &str, limit: Limit, cost: u32) -> BucketSpec {
    BucketSpec {
        name: Arc::from(name),
        limit,
        cost,
    }
}

fn rig() -> (Arc<ManualClock>, MemoryLimiter, TenantId) {
    let clock = Arc::new(ManualClock::new());
    let limiter = MemoryLimiter::with_clock(clock.clone());
    (clock, limiter, TenantId::parse("acme").expect("valid"))
}

/// Exactly `burst` requests pass at once, the next waits exactly one
/// interval, and it passes at that nanosecond but not one before.
#[test]
fn exact_boundary_is_inclusive() {
    for (rate, interval_ns) in [
        ("1/s", 1_000_000_000u64),
        ("3/s", 333_333_333),
        ("1/m", 60_000_000_000),
    ] {
        let (clock, limiter, t) = rig();
        let b = [bucket("tenant", limit(rate, 3), 1)];
        for i in 0..3 {
            assert!(
                matches!(limiter.check(&t, &b), Decision::Allow { .. }),
                "{rate}: request {i} of the burst"
            );
        }
        match limiter.check(&t, &b) {
            Decision::Deny { retry_after, state } => {
                assert_eq!(retry_after, Duration::from_nanos(interval_ns), "{rate}");
                assert_eq!(state.remaining, 0);
            }
            d => panic!("{rate}: burst + 1 admitted: {d:?}"),
        }
        clock.advance(Duration::from_nanos(interval_ns - 1));
        assert!(
            matches!(limiter.check(&t, &b), Decision::Deny { .. }),
            "{rate}: 1 ns early"
        );
        clock.advance(Duration::from_nanos(1));
        assert!(
            matches!(limiter.check(&t, &b), Decision::Allow { .. }),
            "{rate}: exactly on time"
        );
    }
}

/// A cost equal to the burst passes on a full bucket; one more never does.
#[test]
fn cost_equal_to_burst_passes_and_larger_never_does() {
    let (clock, limiter, t) = rig();
    let exact = [bucket("tenant", limit("10/s", 5), 5)];
    let over = [bucket("tenant", limit("10/s", 5), 6)];
    assert!(matches!(limiter.check(&t, &over), Decision::Deny { .. }));
    assert!(matches!(limiter.check(&t, &exact), Decision::Allow { .. }));
    clock.advance(Duration::from_secs(3600));
    assert!(matches!(limiter.check(&t, &over), Decision::Deny { .. }));
    assert_eq!(limiter.peek(&t, &exact[0]), 5, "refusals debit nothing");
}

/// A route bucket that refuses leaves the tenant bucket untouched, and the
/// reported bucket is the route.
#[test]
fn refused_route_debits_nothing() {
    let (_clock, limiter, t) = rig();
    let tenant = bucket("tenant", limit("1/m", 10), 1);
    let route = bucket("export", limit("1/m", 1), 1);
    let both = [tenant.clone(), route.clone()];
    assert!(matches!(limiter.check(&t, &both), Decision::Allow { .. }));
    for _ in 0..5 {
        match limiter.check(&t, &both) {
            Decision::Deny { state, .. } => assert_eq!(&*state.name, "export"),
            d => panic!("route bucket empty, yet {d:?}"),
        }
    }
    assert_eq!(limiter.peek(&t, &tenant), 9, "only the admitted request");
    assert_eq!(limiter.peek(&t, &route), 0);
    let other = TenantId::parse("globex").expect("valid");
    assert_eq!(limiter.peek(&other, &tenant), 10, "tenants are isolated");
}
