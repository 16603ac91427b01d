//! Memory held per idle-but-unexpired tenant by the memory backend, counted
//! exactly with a counting allocator (not RSS, which moves in pages), and
//! that the sweeper gives it all back once the tenants' buckets are full.
//!
//! ```text
//! cargo bench --bench tenant_memory
//! ```
//!
//! Issue #6's budget is 256 bytes per tenant. Tenants here are typical
//! header ids (`tenant-00012345`, 15 bytes) and UUID-sized JWT subjects
//! (36 bytes), each with one `1/m` bucket (unexpired for a minute after
//! one request), at 100k and 1M tenants.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use http::Method;
use tiergate::config::Config;
use tiergate::identity::{Identity, IdentitySource, TenantId};
use tiergate::limiter::memory::ManualClock;
use tiergate::limiter::{Decision, MemoryLimiter};
use tiergate::policy::Policy;

/// The system allocator, counting live bytes.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const BUDGET: f64 = 256.0;

fn main() {
    let cfg = Config::from_yaml(
        "upstream: { url: \"http://127.0.0.1:1\" }\n\
         tiers:\n  free: { rate: 1/m, burst: 10 }\ndefault_tier: free\n",
    )
    .expect("bench config");
    let policy = Policy::new(Arc::new(cfg));
    let mut over = false;
    println!("| tenant id | tenants | bytes/tenant (held) | after sweep |");
    println!("| --- | ---: | ---: | ---: |");
    for (label, width) in [("15-byte header id", 15usize), ("36-byte JWT sub", 36)] {
        for n in [100_000usize, 1_000_000] {
            let id = |i: usize| {
                TenantId::parse(&format!("tenant-{i:0>w$}", w = width - 7)).expect("valid id")
            };
            let clock = Arc::new(ManualClock::new());
            let limiter = MemoryLimiter::with_clock(clock.clone());
            let (tier, _) = policy.resolve_tier(
                &Identity {
                    tenant: id(0),
                    claimed_tier: None,
                    source: IdentitySource::Header,
                },
                None,
            );
            let buckets = policy
                .buckets(policy.route(&Method::GET, "/"), tier)
                .to_vec();
            // Each id is made as a request would make it and dropped after
            // its decision: what stays is what the limiter holds, the id's
            // storage included.
            let before = LIVE.load(Ordering::Relaxed);
            for i in 0..n {
                assert!(matches!(
                    limiter.check(&id(i), &buckets),
                    Decision::Allow { .. }
                ));
            }
            let held = LIVE.load(Ordering::Relaxed) - before;
            assert_eq!(limiter.len(), n);
            // An hour later every bucket is full again: all swept.
            clock.advance(Duration::from_secs(3600));
            assert_eq!(limiter.sweep(), n);
            let after = LIVE.load(Ordering::Relaxed) - before;
            let per = held as f64 / n as f64;
            over |= per > BUDGET;
            println!(
                "| {label} | {n} | {per:.0} | {:.1} |",
                after as f64 / n as f64
            );
            drop(limiter);
        }
    }
    println!(
        "\n(bytes counted by a counting allocator: map entries with their load-factor slack, \
         bucket vectors and the tenant ids' storage; budget {BUDGET} bytes)"
    );
    if over {
        println!("OVER BUDGET");
    }
}
