//! `TenantId::parse` and `RedisLimiter::key`.
//!
//! Input: `<tenant bytes>[\0<bucket bytes>]`. Proves, for every input:
//!
//! * `TenantId::parse` accepts exactly 1..=128 bytes of `[A-Za-z0-9._:@-]`
//!   (an independent restatement of the alphabet), so no accepted id holds
//!   `{`, `}`, whitespace or control characters;
//! * for an accepted tenant, every key `RedisLimiter::key(prefix, tenant,
//!   bucket)` decodes back to exactly `(prefix, tenant, bucket)` (a left
//!   inverse, hence the key is injective: two tenants never share a key),
//!   for the default prefix and for one containing `:`, for fixed bucket
//!   names and for the fuzzed one (any text, even with braces);
//! * the key's Redis Cluster hash tag is the tenant, so all of a tenant's
//!   buckets live in one slot and the Lua script may touch them together;
//! * nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tiergate::identity::TenantId;
use tiergate::limiter::RedisLimiter;

/// Prefixes as `backend.redis.key_prefix` allows them: non-empty, no braces,
/// no whitespace.
const PREFIXES: &[&str] = &["tiergate", "tg:prod", "a"];
const BUCKETS: &[&str] = &["tenant", "ip", "export", "a:b", "}{", ""];

/// The alphabet, restated independently of `TenantId::is_valid`.
fn spec_valid(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.chars().all(|c| {
            c.is_ascii_lowercase()
                || c.is_ascii_uppercase()
                || c.is_ascii_digit()
                || ".:_@-".contains(c)
        })
}

/// Splits `{prefix}:{<tenant>}:<bucket>`, relying only on the prefix having
/// no `{` and the tenant having no `}`.
fn decode(key: &str) -> Option<(&str, &str, &str)> {
    let open = key.find('{')?;
    let prefix = key[..open].strip_suffix(':')?;
    let rest = &key[open + 1..];
    let close = rest.find('}')?;
    let tenant = &rest[..close];
    let bucket = rest[close + 1..].strip_prefix(':')?;
    Some((prefix, tenant, bucket))
}

/// The Redis Cluster hash tag: between the first `{` and the first `}`
/// after it, when non-empty.
fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let close = key[open + 1..].find('}')?;
    (close > 0).then(|| &key[open + 1..open + 1 + close])
}

fuzz_target!(|data: &[u8]| {
    let (tenant_bytes, bucket_bytes) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let Ok(text) = std::str::from_utf8(tenant_bytes) else {
        return;
    };
    let parsed = TenantId::parse(text);
    assert_eq!(
        parsed.is_ok(),
        spec_valid(text),
        "TenantId::parse disagrees with the alphabet on {text:?}"
    );
    assert_eq!(TenantId::is_valid(text), parsed.is_ok());
    let Ok(tenant) = parsed else {
        return;
    };
    assert_eq!(tenant.as_str(), text);

    let fuzzed = bucket_bytes.and_then(|b| std::str::from_utf8(b).ok());
    for prefix in PREFIXES {
        for bucket in BUCKETS.iter().copied().chain(fuzzed) {
            let key = RedisLimiter::key(prefix, &tenant, bucket);
            assert_eq!(
                decode(&key),
                Some((*prefix, text, bucket)),
                "key {key:?} does not round-trip"
            );
            assert_eq!(hash_tag(&key), Some(text), "hash tag of {key:?}");
        }
    }
});
