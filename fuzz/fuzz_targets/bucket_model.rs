//! The memory limiter against the naive `f64` token-bucket model.
//!
//! The input is decoded into a sequence of steps (advance the clock by some
//! milliseconds, then one request of one of two tenants touching the tenant
//! bucket and maybe a route bucket, each with a rate from a fixed table, a
//! burst and a cost), which drive `MemoryLimiter::with_clock(ManualClock)`
//! and the model of `tests/bucket_model/model.rs` side by side. The same
//! model runs on stable in `cargo test --test bucket_model`; see its module
//! docs for the full list of checks. In short: decisions agree (either answer
//! within 1e-6 tokens of a threshold), `remaining` is in `[0, burst]`, a
//! refused request debits nothing, tenants are isolated, and per bucket the
//! run admits at most `max burst + ∫ rate dt + 1` tokens.
#![no_main]

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../tests/bucket_model/model.rs"]
mod model;

use model::{Harness, Spec, Step};

/// Longest run decoded from one input.
const MAX_STEPS: usize = 512;

fn spec(u: &mut Unstructured) -> Result<Spec> {
    // Small bursts most of the time, so buckets are actually exhausted.
    let burst = if u.ratio(7, 8)? {
        u.int_in_range(1..=16)?
    } else {
        u.int_in_range(1..=model::MAX_BURST)?
    };
    Ok(Spec {
        rate: u.choose_index(model::RATES.len())?,
        burst,
        cost: u.int_in_range(1..=burst + 1)?,
    })
}

fn advance_ms(u: &mut Unstructured) -> Result<u64> {
    Ok(match u.int_in_range(0..=3u8)? {
        0 => 0,
        1 => u.int_in_range(0..=100)?,
        2 => u.int_in_range(0..=10_000)?,
        _ => u.int_in_range(0..=model::MAX_ADVANCE_MS)?,
    })
}

fn step(u: &mut Unstructured, tier: &mut [Spec; 2], route: &mut [Spec; 2]) -> Result<Step> {
    let tenant = u.choose_index(model::TENANTS)?;
    // Keep a bucket's limit for a while; change it now and then.
    if u.ratio(1, 8)? {
        tier[tenant] = spec(u)?;
    }
    if u.ratio(1, 8)? {
        route[tenant] = spec(u)?;
    }
    tier[tenant].cost = u.int_in_range(1..=tier[tenant].burst + 1)?;
    route[tenant].cost = u.int_in_range(1..=route[tenant].burst + 1)?;
    let route = if u.arbitrary()? {
        Some((u.choose_index(model::ROUTES.len())?, route[tenant]))
    } else {
        None
    };
    Ok(Step {
        advance_ms: advance_ms(u)?,
        tenant,
        tier: tier[tenant],
        route,
    })
}

fn steps(data: &[u8]) -> Vec<Step> {
    let mut u = Unstructured::new(data);
    let mut out = Vec::new();
    let (Ok(t0), Ok(t1), Ok(r0), Ok(r1)) = (spec(&mut u), spec(&mut u), spec(&mut u), spec(&mut u))
    else {
        return out;
    };
    let (mut tier, mut route) = ([t0, t1], [r0, r1]);
    while out.len() < MAX_STEPS && !u.is_empty() {
        match step(&mut u, &mut tier, &mut route) {
            Ok(s) => out.push(s),
            Err(_) => break,
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let steps = steps(data);
    if let Err(e) = Harness::run(&steps) {
        panic!("{e}\nsteps: {steps:#?}");
    }
});
