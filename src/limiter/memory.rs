//! In-process buckets: the `memory` backend, and the `local` fallback of the
//! Redis backend.
//!
//! State is one GCRA TAT (nanoseconds on a monotonic clock) per bucket,
//! with the emission interval it was written under (see
//! [`Gcra::normalize`]),
//! grouped by tenant in a sharded hash map: a request locks only its
//! tenant's shard, so all of a request's buckets are checked and debited
//! atomically with no global lock. Idle tenants whose buckets are all full
//! again carry no information and are swept away, so memory stays bounded by
//! the tenants active within one refill window.
//!
//! Why not governor: its keyed limiters hold one quota per limiter, while a
//! tenant's capacity here depends on its tier (and on runtime overrides), a
//! request must pass several buckets all-or-nothing, and the HTTP contract
//! needs remaining tokens and reset times for every decision. The arithmetic
//! is twenty lines (see [`super::evaluate`]); the sharding is what matters.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{BucketSpec, Decision, Gcra, evaluate};
use crate::identity::TenantId;

const NANOS: f64 = 1e9;

/// A source of monotonic time in nanoseconds; injectable for tests.
pub trait Clock: Send + Sync {
    /// Nanoseconds since an arbitrary fixed origin.
    fn now_nanos(&self) -> u64;
}

/// The real monotonic clock.
pub struct MonotonicClock(Instant);

impl Default for MonotonicClock {
    fn default() -> Self {
        // Start a little after the origin so that a TAT of 0 always means
        // "full" (see `evaluate`).
        MonotonicClock(Instant::now() - Duration::from_secs(1))
    }
}

impl Clock for MonotonicClock {
    fn now_nanos(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

/// A clock that moves only when told to.
#[derive(Debug)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// Starts at one second.
    pub fn new() -> ManualClock {
        ManualClock(AtomicU64::new(1_000_000_000))
    }
    /// Moves time forward.
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now_nanos(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One bucket's state: name, TAT, and the interval the TAT was written under.
type Slot = (Arc<str>, u64, u64);

/// A tenant's buckets: nearly always one (the tenant bucket), kept inline
/// so an idle tenant costs one map entry and its id (see
/// `benches/tenant_memory.rs`); route buckets spill into a vector.
enum Entry {
    One(Slot),
    Many(Vec<Slot>),
}

impl Entry {
    fn slots(&self) -> &[Slot] {
        match self {
            Entry::One(s) => std::slice::from_ref(s),
            Entry::Many(v) => v,
        }
    }

    fn slots_mut(&mut self) -> &mut [Slot] {
        match self {
            Entry::One(s) => std::slice::from_mut(s),
            Entry::Many(v) => v,
        }
    }

    fn find_mut(&mut self, name: &str) -> Option<&mut Slot> {
        self.slots_mut().iter_mut().find(|(n, _, _)| **n == *name)
    }

    fn push(&mut self, slot: Slot) {
        match self {
            Entry::Many(v) => v.push(slot),
            Entry::One(_) => {
                let Entry::One(first) = std::mem::replace(self, Entry::Many(Vec::new())) else {
                    unreachable!()
                };
                *self = Entry::Many(vec![first, slot]);
            }
        }
    }
}

struct Shard {
    map: Mutex<HashMap<TenantId, Entry>>,
}

/// Sharded in-process buckets.
pub struct MemoryLimiter {
    shards: Box<[Shard]>,
    hasher: RandomState,
    clock: Arc<dyn Clock>,
}

impl MemoryLimiter {
    /// A limiter on the real clock with a shard count suited to this machine.
    pub fn new() -> MemoryLimiter {
        Self::with_clock(Arc::new(MonotonicClock::default()))
    }

    /// A limiter on a given clock.
    pub fn with_clock(clock: Arc<dyn Clock>) -> MemoryLimiter {
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        let shards = (cores * 16).next_power_of_two();
        MemoryLimiter {
            shards: (0..shards)
                .map(|_| Shard {
                    map: Mutex::new(HashMap::new()),
                })
                .collect(),
            hasher: RandomState::new(),
            clock,
        }
    }

    fn shard(&self, tenant: &TenantId) -> &Shard {
        let h = self.hasher.hash_one(tenant.as_str()) as usize;
        &self.shards[h & (self.shards.len() - 1)]
    }

    /// Checks and (if admitted) debits every bucket, atomically.
    pub fn check(&self, tenant: &TenantId, buckets: &[BucketSpec]) -> Decision {
        let mut gcras = [Gcra {
            interval: 1,
            tau: 1,
        }; 4];
        let mut tats = [0u64; 4];
        let n = buckets.len();
        assert!((1..=4).contains(&n), "a request touches 1..=4 buckets");
        for (g, b) in gcras.iter_mut().zip(buckets) {
            *g = Gcra::new(&b.limit, NANOS);
        }
        let now = self.clock.now_nanos();
        let mut map = self
            .shard(tenant)
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // One lookup for the read and the write-back (a new tenant pays a
        // second one to insert).
        let found = map.get_mut(tenant);
        if let Some(entry) = found.as_deref() {
            let slots = entry.slots();
            for ((t, b), g) in tats.iter_mut().zip(buckets).zip(&gcras) {
                *t = slots
                    .iter()
                    .find(|(name, _, _)| **name == *b.name)
                    .map_or(0, |(_, tat, iv)| g.normalize(*tat, *iv, now));
            }
        }
        let decision = evaluate(buckets, &gcras[..n], &mut tats[..n], now, NANOS);
        let admitted = matches!(decision, Decision::Allow { .. });
        match found {
            Some(entry) => {
                for ((b, tat), g) in buckets.iter().zip(&tats[..n]).zip(&gcras) {
                    match entry.find_mut(&b.name) {
                        // Admitted: the debited TAT. Refused: nothing is
                        // debited, but a TAT re-expressed under a new
                        // interval is stored so that time from now on
                        // counts at the new rate.
                        Some(slot) if admitted || slot.2 != g.interval => {
                            slot.1 = *tat;
                            slot.2 = g.interval;
                        }
                        Some(_) => {}
                        None if admitted => entry.push((b.name.clone(), *tat, g.interval)),
                        None => {}
                    }
                }
            }
            None if admitted => {
                let mut slots = buckets
                    .iter()
                    .zip(&tats[..n])
                    .zip(&gcras)
                    .map(|((b, tat), g)| (b.name.clone(), *tat, g.interval));
                let first = slots.next().expect("at least one bucket");
                let mut entry = Entry::One(first);
                for slot in slots {
                    entry.push(slot);
                }
                map.insert(tenant.clone(), entry);
            }
            None => {}
        }
        decision
    }

    /// Returns tokens to a bucket (used to undo an `ip` debit when a later
    /// bucket refuses the request, keeping the all-or-nothing rule).
    pub fn refund(&self, tenant: &TenantId, bucket: &BucketSpec) {
        let g = Gcra::new(&bucket.limit, NANOS);
        let mut map = self
            .shard(tenant)
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = map.get_mut(tenant)
            && let Some(slot) = entry.find_mut(&bucket.name)
        {
            let per_token = if slot.2 == 0 { g.interval } else { slot.2 };
            slot.1 = slot.1.saturating_sub(per_token * bucket.cost as u64);
        }
    }

    /// Whole tokens left in a bucket without touching it (admin views).
    pub fn peek(&self, tenant: &TenantId, bucket: &BucketSpec) -> u64 {
        let g = Gcra::new(&bucket.limit, NANOS);
        let now = self.clock.now_nanos();
        let map = self
            .shard(tenant)
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let tat = map
            .get(tenant)
            .and_then(|e| e.slots().iter().find(|(n, _, _)| **n == *bucket.name))
            .map_or(0, |(_, t, iv)| g.normalize(*t, *iv, now));
        g.remaining(now, tat)
    }

    /// Drops tenants whose buckets are all full again; returns how many.
    pub fn sweep(&self) -> usize {
        let now = self.clock.now_nanos();
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut map = shard.map.lock().unwrap_or_else(|p| p.into_inner());
            let before = map.len();
            map.retain(|_, entry| entry.slots().iter().any(|(_, tat, _)| *tat > now));
            removed += before - map.len();
            // Give the memory back after a burst of tenants has gone idle
            // (keeping room to grow again without rehashing at once).
            let len = map.len();
            if map.capacity() > 4 * len.max(64) {
                map.shrink_to(2 * len);
            }
        }
        removed
    }

    /// Tenants currently holding state.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.map.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// Whether no tenant holds state.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sweeps every `every` for as long as the limiter lives.
    pub fn spawn_sweeper(self: &Arc<Self>, every: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(l) => {
                        l.sweep();
                    }
                    None => return,
                }
            }
        });
    }
}

impl Default for MemoryLimiter {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::test_bucket as spec;

    fn admitted(l: &MemoryLimiter, t: &TenantId, b: &[BucketSpec], n: usize) -> usize {
        (0..n)
            .filter(|_| matches!(l.check(t, b), Decision::Allow { .. }))
            .count()
    }

    /// The defining property: a bucket starts full and admits exactly `burst`.
    #[test]
    fn burst_is_exact_then_refills_at_rate() {
        let clock = Arc::new(ManualClock::new());
        let l = MemoryLimiter::with_clock(clock.clone());
        let t = TenantId::parse("acme").unwrap();
        let b = [spec("tenant", "10/s", 20, 1)];
        assert_eq!(admitted(&l, &t, &b, 100), 20);
        clock.advance(Duration::from_millis(500));
        assert_eq!(admitted(&l, &t, &b, 100), 5, "0.5 s at 10/s refills 5");
        clock.advance(Duration::from_secs(60));
        assert_eq!(admitted(&l, &t, &b, 100), 20, "never more than burst");
    }

    /// Fractional rates accumulate fractional tokens.
    #[test]
    fn fractional_rate_accumulates() {
        let clock = Arc::new(ManualClock::new());
        let l = MemoryLimiter::with_clock(clock.clone());
        let t = TenantId::parse("acme").unwrap();
        let b = [spec("tenant", "0.5/s", 1, 1)];
        assert_eq!(admitted(&l, &t, &b, 5), 1);
        clock.advance(Duration::from_millis(1999));
        assert_eq!(admitted(&l, &t, &b, 5), 0);
        clock.advance(Duration::from_millis(1));
        assert_eq!(admitted(&l, &t, &b, 5), 1);
    }

    /// Idle tenants are evicted once their buckets are full again.
    #[test]
    fn sweep_evicts_only_full_buckets() {
        let clock = Arc::new(ManualClock::new());
        let l = MemoryLimiter::with_clock(clock.clone());
        let b = [spec("tenant", "1/s", 2, 1)];
        for i in 0..1000 {
            l.check(&TenantId::parse(&format!("t{i}")).unwrap(), &b);
        }
        assert_eq!(l.sweep(), 0);
        assert_eq!(l.len(), 1000);
        clock.advance(Duration::from_secs(1));
        assert_eq!(l.sweep(), 1000);
        assert!(l.is_empty());
    }

    /// Raising a limit helps at once; lowering it never grants a new burst.
    #[test]
    fn limit_changes_keep_tokens_in_use() {
        let clock = Arc::new(ManualClock::new());
        let l = MemoryLimiter::with_clock(clock.clone());
        let t = TenantId::parse("acme").unwrap();
        assert_eq!(admitted(&l, &t, &[spec("tenant", "1/m", 5, 1)], 10), 5);
        // Bigger burst, same rate: 5 in use of 8.
        assert_eq!(admitted(&l, &t, &[spec("tenant", "1/m", 8, 1)], 10), 3);
        // Faster rate: still 8 in use, but refilling at 10/s now.
        assert_eq!(admitted(&l, &t, &[spec("tenant", "10/s", 8, 1)], 10), 0);
        clock.advance(Duration::from_millis(300));
        assert_eq!(admitted(&l, &t, &[spec("tenant", "10/s", 8, 1)], 10), 3);
        // Lower burst: all in use, nothing new.
        assert_eq!(admitted(&l, &t, &[spec("tenant", "1/m", 2, 1)], 10), 0);
    }

    /// Refund undoes exactly one debit.
    #[test]
    fn refund_returns_the_token() {
        let clock = Arc::new(ManualClock::new());
        let l = MemoryLimiter::with_clock(clock);
        let t = TenantId::parse("ip:1.2.3.4").unwrap();
        let b = [spec("ip", "1/m", 1, 1)];
        assert_eq!(admitted(&l, &t, &b, 1), 1);
        l.refund(&t, &b[0]);
        assert_eq!(l.peek(&t, &b[0]), 1);
        assert_eq!(admitted(&l, &t, &b, 2), 1);
    }
}
