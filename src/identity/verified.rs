//! Tokens that verified, remembered until they expire.
//!
//! Checking a public-key signature is the dearest step of a request: with
//! the test fixtures' keys, `cargo bench --bench decision -- identity`
//! measured 189 µs for RS256 and 236 µs for ES256 (HS256: 2 µs), against
//! ~15 µs of CPU for the whole of a proxied request. A client sends the
//! same token on every request until it expires, so each [`JwtSource`]
//! keeps the outcome of its successful verifications: the identity a
//! token gave, keyed by the token's exact bytes, with its `exp` and `nbf`.
//!
//! Why a hit gives the same answer a verification would: everything a
//! verification checks except the clock (signature, `alg`, key, issuer,
//! audience, the claims' types, the tenant id) is a function of the token's
//! bytes and the source's configuration, and a source never changes (a
//! reload builds new sources, with empty caches). The clock is checked on
//! every hit by jsonwebtoken's own rule (`exp` not before `now - leeway`,
//! `nbf` not after `now + leeway`); a hit that fails it is dropped and the
//! token verified again, so the refusal and its message come from
//! jsonwebtoken as before. Only successes are kept: a bad token is checked
//! in full every time (the `ip_limit` guard is what makes floods of them
//! pay).
//!
//! The key is the whole token, compared in full: a digest would let two
//! tokens share an entry. Hashing reads only the token's last
//! [`HASHED_TAIL`] bytes (its signature, different for every token that
//! verifies), under a per-process random key, so a long token costs no
//! more to look up than a short one. The signature is also the token's
//! only secret part, so a probe that varies it lands on another entry's
//! comparison only by chance: the comparison's timing does not help
//! guess a remembered token.
//!
//! Bounded: 64 shards (so the workers rarely meet on a lock), each holding
//! at most [`SHARD_BYTES`] (tokens, the identities they gave and
//! [`ENTRY_OVERHEAD`] per entry for the rest), 8 MiB in all. A full shard
//! first drops its expired tokens, when it has any, then arbitrary ones
//! down to three quarters full, so the next inserts find room without a
//! sweep. Tokens longer than [`MAX_CACHED_TOKEN`] are verified every time.
//!
//! [`JwtSource`]: super::JwtSource

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};

use super::TenantId;

/// How many of a token's last bytes its hash reads: 96 bits of the
/// signature's base64, plenty to tell tokens apart (equality is checked in
/// full anyway). 64 bytes cost 189 more instructions per request
/// (callgrind, two hashes per lookup).
pub const HASHED_TAIL: usize = 16;

/// What one shard's entries may cost in all, counted as in
/// [`ENTRY_OVERHEAD`].
pub const SHARD_BYTES: usize = 128 * 1024;

/// Longest token kept, in bytes (identity providers' tokens are a few
/// hundred bytes to a couple of KiB).
pub const MAX_CACHED_TOKEN: usize = 4096;

/// What an entry costs beyond its token's, tenant's and tier's bytes (the
/// map's slot, the entry, the allocations' headers), counted against
/// [`SHARD_BYTES`].
pub const ENTRY_OVERHEAD: usize = 128;

const SHARDS: usize = 64;

/// What a verified token gave, and until when it holds.
struct Entry {
    tenant: TenantId,
    tier: Option<Arc<str>>,
    exp: u64,
    nbf: Option<u64>,
    /// What it is counted as against [`SHARD_BYTES`].
    cost: usize,
}

struct Shard {
    map: HashMap<Box<[u8]>, Entry, TailHash>,
    /// Sum of the entries' costs.
    bytes: usize,
    /// No entry's `exp` is earlier (`u64::MAX` when empty): while
    /// `now - leeway` has not passed it, nothing has expired and a full
    /// shard need not be swept.
    first_exp: u64,
}

/// The successful verifications of one JWT source (see the module docs).
pub struct VerifiedTokens {
    shards: Box<[Mutex<Shard>]>,
    hash: TailHash,
    leeway: u64,
}

impl VerifiedTokens {
    /// An empty cache for a source whose clock leeway is `leeway` seconds.
    pub fn new(leeway: u64) -> VerifiedTokens {
        let hash = TailHash(RandomState::new());
        VerifiedTokens {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashMap::with_hasher(hash.clone()),
                        bytes: 0,
                        first_exp: u64::MAX,
                    })
                })
                .collect(),
            hash,
            leeway,
        }
    }

    fn shard(&self, token: &[u8]) -> MutexGuard<'_, Shard> {
        let h = self.hash.hash_one(token);
        // The map's own buckets use the low bits of the same hash.
        let shard = &self.shards[((h >> 32) as usize) % SHARDS];
        shard.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The tenant and claimed tier of `token` if it verified before and
    /// still holds at `now` (Unix seconds). An entry whose time is up is
    /// dropped.
    pub fn get(&self, token: &[u8], now: u64) -> Option<(TenantId, Option<Arc<str>>)> {
        if token.len() > MAX_CACHED_TOKEN {
            return None;
        }
        let mut shard = self.shard(token);
        let e = shard.map.get(token)?;
        if self.holds(e, now) {
            return Some((e.tenant.clone(), e.tier.clone()));
        }
        if let Some(e) = shard.map.remove(token) {
            shard.bytes -= e.cost;
        }
        None
    }

    /// Remembers that `token` verified, giving `tenant` and `tier`, with
    /// its `exp` and `nbf` as jsonwebtoken read them.
    pub fn insert(
        &self,
        token: &[u8],
        tenant: TenantId,
        tier: Option<Arc<str>>,
        exp: u64,
        nbf: Option<u64>,
        now: u64,
    ) {
        if token.len() > MAX_CACHED_TOKEN {
            return;
        }
        let cost = token.len()
            + tenant.as_str().len()
            + tier.as_deref().map_or(0, str::len)
            + ENTRY_OVERHEAD;
        let entry = Entry {
            tenant,
            tier,
            exp,
            nbf,
            cost,
        };
        let mut shard = self.shard(token);
        let Shard {
            map,
            bytes,
            first_exp,
        } = &mut *shard;
        if let Some(old) = map.remove(token) {
            *bytes -= old.cost;
        }
        if *bytes + cost > SHARD_BYTES {
            if *first_exp < now.saturating_sub(self.leeway) {
                *first_exp = u64::MAX;
                map.retain(|_, e| {
                    let keep = self.holds(e, now);
                    if keep {
                        *first_exp = (*first_exp).min(e.exp);
                    } else {
                        *bytes -= e.cost;
                    }
                    keep
                });
            }
            if *bytes + cost > SHARD_BYTES {
                // Arbitrary ones (the map's order), down to three quarters.
                map.retain(|_, e| {
                    if *bytes + cost <= SHARD_BYTES / 4 * 3 {
                        return true;
                    }
                    *bytes -= e.cost;
                    false
                });
            }
        }
        *bytes += cost;
        *first_exp = (*first_exp).min(exp);
        map.insert(token.into(), entry);
    }

    /// jsonwebtoken's time rule (`validation.rs`: a token is expired when
    /// `exp < now - leeway`, premature when `nbf > now + leeway`).
    /// A clock that reads earlier than the leeway (before 1970 and a bit)
    /// holds nothing: jsonwebtoken would refuse or panic there.
    fn holds(&self, e: &Entry, now: u64) -> bool {
        now > self.leeway
            && e.exp >= now - self.leeway
            && e.nbf
                .is_none_or(|nbf| nbf <= now.saturating_add(self.leeway))
    }

    /// Tokens held, over all shards.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap().map.len())
            .sum()
    }
}

/// Hashes a byte string by its length and last [`HASHED_TAIL`] bytes,
/// under a per-process random key.
#[derive(Clone)]
struct TailHash(RandomState);

impl BuildHasher for TailHash {
    type Hasher = TailHasher;
    fn build_hasher(&self) -> TailHasher {
        TailHasher(self.0.build_hasher())
    }
}

struct TailHasher(std::hash::DefaultHasher);

impl Hasher for TailHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0
            .write(&bytes[bytes.len().saturating_sub(HASHED_TAIL)..]);
    }
    fn write_usize(&mut self, n: usize) {
        self.0.write_usize(n);
    }
    fn finish(&self) -> u64 {
        self.0.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn tenant(s: &str) -> TenantId {
        TenantId::parse(s).unwrap()
    }

    fn cache() -> VerifiedTokens {
        VerifiedTokens::new(30)
    }

    #[test]
    fn a_token_is_found_by_its_exact_bytes_only() {
        let c = cache();
        let tier: Arc<str> = Arc::from("enterprise");
        c.insert(
            b"aaa.bbb.ccc",
            tenant("acme"),
            Some(tier.clone()),
            NOW + 60,
            None,
            NOW,
        );
        let (t, got) = c.get(b"aaa.bbb.ccc", NOW).expect("held");
        assert_eq!(t.as_str(), "acme");
        assert!(Arc::ptr_eq(&got.unwrap(), &tier));
        // Same tail, other bytes; a prefix; a longer token.
        assert!(c.get(b"aaX.bbb.ccc", NOW).is_none());
        assert!(c.get(b"aaa.bbb.cc", NOW).is_none());
        assert!(c.get(b"aaa.bbb.cccc", NOW).is_none());
        // Tokens that differ only before the hashed tail are still told apart.
        let long = |first: u8| {
            let mut t = vec![b'x'; 300];
            t[0] = first;
            t
        };
        c.insert(&long(b'a'), tenant("a"), None, NOW + 60, None, NOW);
        c.insert(&long(b'b'), tenant("b"), None, NOW + 60, None, NOW);
        assert_eq!(c.get(&long(b'a'), NOW).unwrap().0.as_str(), "a");
        assert_eq!(c.get(&long(b'b'), NOW).unwrap().0.as_str(), "b");
        assert!(c.get(&long(b'c'), NOW).is_none());
    }

    /// The boundaries are jsonwebtoken's, leeway included: `exp` holds up
    /// to `now - leeway == exp`, `nbf` from `now + leeway == nbf`.
    #[test]
    fn time_is_checked_on_every_hit_with_the_leeway() {
        let c = cache();
        c.insert(b"t", tenant("acme"), None, NOW, Some(NOW - 100), NOW - 200);
        assert!(c.get(b"t", NOW + 30).is_some());
        assert!(c.get(b"t", NOW + 31).is_none());
        // An expired hit is dropped, not kept for later.
        assert_eq!(c.len(), 0);
        assert!(c.get(b"t", NOW).is_none());

        c.insert(
            b"n",
            tenant("acme"),
            None,
            NOW + 600,
            Some(NOW + 100),
            NOW + 70,
        );
        assert!(c.get(b"n", NOW + 70).is_some());
        // A clock that went back before `nbf - leeway`.
        assert!(c.get(b"n", NOW + 69).is_none());
    }

    #[test]
    fn too_long_tokens_are_not_kept() {
        let c = cache();
        let longest = vec![b'a'; MAX_CACHED_TOKEN];
        c.insert(&longest, tenant("acme"), None, NOW + 60, None, NOW);
        assert!(c.get(&longest, NOW).is_some());
        let long = vec![b'a'; MAX_CACHED_TOKEN + 1];
        c.insert(&long, tenant("acme"), None, NOW + 60, None, NOW);
        assert!(c.get(&long, NOW).is_none());
        assert_eq!(c.len(), 1);
    }

    /// A clock that reads before 1970 (plus the leeway) trusts nothing.
    #[test]
    fn a_clock_before_the_leeway_holds_nothing() {
        let c = cache();
        c.insert(b"t", tenant("acme"), None, NOW, None, NOW);
        assert!(c.get(b"t", 31).is_some());
        assert!(c.get(b"t", 30).is_none());
        assert!(c.get(b"t", 0).is_none());
    }

    /// A shard never holds more than its bytes, counted with the
    /// identities and the overhead, and the newest token is always kept.
    #[test]
    fn shards_stay_within_their_bytes() {
        let c = cache();
        let token = |i: usize| format!("{i:0>4000}").into_bytes();
        let n = SHARD_BYTES / 4000 * SHARDS * 3;
        let tier: Arc<str> = Arc::from("enterprise");
        for i in 0..n {
            c.insert(
                &token(i),
                tenant("acme"),
                Some(tier.clone()),
                NOW + 600,
                None,
                NOW,
            );
            assert!(c.get(&token(i), NOW).is_some(), "the newest is kept");
        }
        for s in c.shards.iter() {
            let s = s.lock().unwrap();
            assert!(s.bytes <= SHARD_BYTES, "{} bytes", s.bytes);
            let counted: usize = s.map.values().map(|e| e.cost).sum();
            assert_eq!(s.bytes, counted);
            assert_eq!(counted, s.map.len() * (4000 + 4 + 10 + ENTRY_OVERHEAD));
        }
        assert!(c.len() < n);
    }

    /// A full shard makes room by dropping its expired tokens before it
    /// pushes out live ones.
    #[test]
    fn a_full_shard_drops_expired_tokens_first() {
        let c = cache();
        let token = |i: usize| format!("{i:0>1000}").into_bytes();
        // Every shard full, twice over, of tokens that expire at NOW.
        let full = SHARD_BYTES / 1000 * SHARDS * 2;
        for i in 0..full {
            c.insert(&token(i), tenant("acme"), None, NOW, None, NOW);
        }
        // Later, live tokens: a quarter of the room in all, so no shard
        // needs to push out any of them.
        let later = NOW + 31;
        let live = full..full + SHARD_BYTES / 1000 * SHARDS / 4;
        for i in live.clone() {
            c.insert(&token(i), tenant("acme"), None, NOW + 600, None, later);
        }
        for i in live {
            assert!(
                c.get(&token(i), later).is_some(),
                "live token {i} was pushed out"
            );
        }
    }
}
