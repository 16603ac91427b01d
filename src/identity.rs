//! Tenant identity (SPEC §3): who is this request for?
//!
//! Sources are tried in configured order and the first one whose header is
//! present decides. A JWT that is present but invalid is a hard 401: it never
//! falls through to the next source, so a forged token plus a spoofed
//! `x-tenant-id` header cannot work. Tenant ids are validated here, once, so
//! nothing downstream (Redis keys, metric labels, logs) ever sees a bad one.

pub mod jwt;
mod verified;

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderName};

use crate::config::{Anonymous, ConfigError, IdentityConfig, SourceConfig};
pub use jwt::{JwtError, JwtSource, VerifiedClaims};

/// A validated tenant id: 1..=128 bytes of `[A-Za-z0-9._:@-]`.
///
/// The alphabet excludes `{`, `}`, spaces and control characters, which is
/// what makes the Redis key `{prefix}:{<tenant>}:<bucket>` injective and keeps
/// the tenant inside its hash tag.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TenantId(Arc<str>);

impl TenantId {
    /// Maximum length in bytes.
    pub const MAX_LEN: usize = 128;

    /// Whether `s` is a valid tenant id.
    pub fn is_valid(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-'))
    }

    /// Validates and wraps.
    pub fn parse(s: &str) -> Result<TenantId, IdentityError> {
        if Self::is_valid(s) {
            Ok(TenantId(Arc::from(s)))
        } else {
            Err(IdentityError::InvalidTenant)
        }
    }

    /// Validates a tenant id presented by a client (header or token): the
    /// `ip:` prefix is reserved for anonymous tenants, so that nobody can
    /// spend another client's anonymous bucket by naming it.
    pub fn parse_claimed(s: &str) -> Result<TenantId, IdentityError> {
        Self::claimed(s, None)
    }

    /// [`TenantId::parse_claimed`], answering with `known` itself (a
    /// reference-count increment, no allocation) when `s` is its id.
    fn claimed(s: &str, known: Option<&TenantId>) -> Result<TenantId, IdentityError> {
        if s.starts_with("ip:") {
            return Err(IdentityError::InvalidTenant);
        }
        match known {
            // `known` is valid, and so is `s`, its id.
            Some(k) if k.as_str() == s => Ok(k.clone()),
            _ => Self::parse(s),
        }
    }

    /// The anonymous tenant of a client address, `ip:<addr>`.
    pub fn for_ip(ip: IpAddr) -> TenantId {
        Self::for_ip_known(ip, None)
    }

    /// [`TenantId::for_ip`], answering with `known` itself when it is that
    /// id. The text is made on the stack, so a new id is one allocation.
    fn for_ip_known(ip: IpAddr, known: Option<&TenantId>) -> TenantId {
        use std::io::Write as _;
        // "ip:" and the longest IPv6 text (45 bytes) fit.
        let mut buf = [0u8; 64];
        let len = {
            let mut w = &mut buf[..];
            write!(w, "ip:{ip}").expect("an address fits in 64 bytes");
            64 - w.len()
        };
        let text = std::str::from_utf8(&buf[..len]).expect("an address is ASCII");
        match known {
            Some(k) if k.as_str() == text => k.clone(),
            _ => TenantId(Arc::from(text)),
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantId({})", &self.0)
    }
}

/// Why a request has no usable identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// No source applied and anonymous requests are rejected.
    #[error("no tenant identity in the request")]
    Missing {
        /// Whether a JWT source exists (adds `WWW-Authenticate: Bearer`).
        bearer: bool,
    },
    /// A token was present and failed verification.
    #[error("invalid token: {0}")]
    InvalidToken(JwtError),
    /// The tenant id is malformed.
    #[error("tenant id must be 1..=128 characters of [A-Za-z0-9._:@-]")]
    InvalidTenant,
}

/// How the tenant was identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentitySource {
    /// A verified JWT.
    Jwt,
    /// A plain header.
    Header,
    /// The client IP (`anonymous: ip`).
    Anonymous,
}

/// The outcome of identification.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Who.
    pub tenant: TenantId,
    /// Tier named by a verified token's `tier_claim`, if any.
    pub claimed_tier: Option<Arc<str>>,
    /// How.
    pub source: IdentitySource,
}

enum Source {
    Jwt(Box<JwtSource>),
    Header(HeaderName),
}

/// The configured identity sources, ready to run.
pub struct Identifier {
    sources: Vec<Source>,
    anonymous: Anonymous,
    has_jwt: bool,
}

impl Identifier {
    /// Builds the sources, loading key material. `env` resolves environment
    /// variables (so `check` can skip secrets while `serve` requires them).
    /// Errors carry the YAML path of the failing source.
    pub fn new(
        cfg: &IdentityConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Identifier, Vec<ConfigError>> {
        let mut sources = Vec::new();
        let mut errors = Vec::new();
        for (i, s) in cfg.sources.iter().enumerate() {
            match s {
                SourceConfig::Header { name } => sources.push(Source::Header(name.clone())),
                SourceConfig::Jwt(j) => match JwtSource::from_config(j, env) {
                    Ok(src) => sources.push(Source::Jwt(Box::new(src))),
                    Err(message) => errors.push(ConfigError {
                        path: format!("identity.sources[{i}]"),
                        line: None,
                        message,
                    }),
                },
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let has_jwt = sources.iter().any(|s| matches!(s, Source::Jwt(_)));
        Ok(Identifier {
            sources,
            anonymous: cfg.anonymous,
            has_jwt,
        })
    }

    /// Identifies the tenant of a request from its headers and client IP.
    /// `known` is a tenant id identified before (its connection's last):
    /// a request naming the same tenant gets that id back rather than a
    /// new copy of it.
    pub fn identify(
        &self,
        headers: &HeaderMap,
        client_ip: IpAddr,
        known: Option<&TenantId>,
    ) -> Result<Identity, IdentityError> {
        for source in &self.sources {
            match source {
                Source::Jwt(jwt) => {
                    if let Some(value) = headers.get(jwt.header()) {
                        let (tenant, claimed_tier) = jwt.identify(value, known)?;
                        return Ok(Identity {
                            tenant,
                            claimed_tier,
                            source: IdentitySource::Jwt,
                        });
                    }
                }
                Source::Header(name) => {
                    if let Some(value) = headers.get(name) {
                        let text = value.to_str().map_err(|_| IdentityError::InvalidTenant)?;
                        return Ok(Identity {
                            tenant: TenantId::claimed(text, known)?,
                            claimed_tier: None,
                            source: IdentitySource::Header,
                        });
                    }
                }
            }
        }
        match self.anonymous {
            Anonymous::Reject => Err(IdentityError::Missing {
                bearer: self.has_jwt,
            }),
            Anonymous::Ip => Ok(Identity {
                tenant: TenantId::for_ip_known(client_ip, known),
                claimed_tier: None,
                source: IdentitySource::Anonymous,
            }),
        }
    }
}

/// How long a verified tier claim counts as "seen recently" for the admin
/// API's `source: claim`.
pub const CLAIM_MEMORY: std::time::Duration = std::time::Duration::from_secs(300);

/// One shard of [`RecentClaims`]: tenant → (claimed tier, last seen).
type ClaimShard =
    std::sync::Mutex<std::collections::HashMap<TenantId, (Arc<str>, std::time::Instant)>>;

/// Remembers the tier claimed by each tenant's recent verified tokens, so
/// the admin API can say where a tenant's tier comes from. Sharded and
/// bounded (at most 4096 tenants per shard; stale entries go first).
pub struct RecentClaims {
    shards: Box<[ClaimShard]>,
    hasher: std::hash::RandomState,
}

impl Default for RecentClaims {
    fn default() -> Self {
        RecentClaims {
            shards: (0..64).map(|_| Default::default()).collect(),
            hasher: std::hash::RandomState::new(),
        }
    }
}

impl RecentClaims {
    const PER_SHARD: usize = 4096;

    fn shard(&self, tenant: &TenantId) -> &ClaimShard {
        use std::hash::BuildHasher;
        let h = self.hasher.hash_one(tenant.as_str()) as usize;
        &self.shards[h % self.shards.len()]
    }

    /// Records that a verified token for `tenant` claimed `tier`.
    pub fn record(&self, tenant: &TenantId, tier: &Arc<str>) {
        let now = std::time::Instant::now();
        let mut map = self.shard(tenant).lock().unwrap_or_else(|p| p.into_inner());
        if let Some((t, seen)) = map.get_mut(tenant) {
            if Arc::ptr_eq(t, tier) || **t == **tier {
                if now.duration_since(*seen) > std::time::Duration::from_secs(5) {
                    *seen = now;
                }
                return;
            }
            *t = tier.clone();
            *seen = now;
            return;
        }
        if map.len() >= Self::PER_SHARD {
            map.retain(|_, (_, seen)| now.duration_since(*seen) < CLAIM_MEMORY);
            if map.len() >= Self::PER_SHARD {
                return;
            }
        }
        map.insert(tenant.clone(), (tier.clone(), now));
    }

    /// The tier claimed for `tenant` within [`CLAIM_MEMORY`], if any.
    pub fn get(&self, tenant: &TenantId) -> Option<Arc<str>> {
        let map = self.shard(tenant).lock().unwrap_or_else(|p| p.into_inner());
        map.get(tenant)
            .filter(|(_, seen)| seen.elapsed() < CLAIM_MEMORY)
            .map(|(t, _)| t.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ip:` ids belong to anonymous clients only.
    #[test]
    fn clients_cannot_claim_anonymous_ids() {
        assert!(TenantId::parse_claimed("ip:1.2.3.4").is_err());
        assert!(TenantId::parse_claimed("acme:ip:1").is_ok());
        // Not even when the connection's last tenant was that anonymous id.
        let anonymous = TenantId::for_ip("1.2.3.4".parse().unwrap());
        assert!(TenantId::claimed("ip:1.2.3.4", Some(&anonymous)).is_err());
    }

    /// A known id is reused only for its own text, and never skips
    /// validation of another.
    #[test]
    fn a_known_id_is_reused_for_itself_only() {
        let acme = TenantId::parse("acme").unwrap();
        let again = TenantId::claimed("acme", Some(&acme)).unwrap();
        assert!(Arc::ptr_eq(&acme.0, &again.0));
        let other = TenantId::claimed("globex", Some(&acme)).unwrap();
        assert_eq!(other.as_str(), "globex");
        assert!(TenantId::claimed("a b", Some(&acme)).is_err());
        assert!(TenantId::claimed("acmex", Some(&acme)).is_ok());

        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        let anonymous = TenantId::for_ip(ip);
        assert_eq!(anonymous.as_str(), "ip:2001:db8::1");
        let again = TenantId::for_ip_known(ip, Some(&anonymous));
        assert!(Arc::ptr_eq(&anonymous.0, &again.0));
        let other = TenantId::for_ip_known("10.0.0.1".parse().unwrap(), Some(&anonymous));
        assert_eq!(other.as_str(), "ip:10.0.0.1");
        // The longest IPv6 text.
        let long: IpAddr = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"
            .parse()
            .unwrap();
        assert_eq!(TenantId::for_ip(long).as_str(), format!("ip:{long}"));
    }

    #[test]
    fn tenant_alphabet_is_enforced() {
        assert!(TenantId::is_valid("acme"));
        assert!(TenantId::is_valid("user@example.com"));
        assert!(TenantId::is_valid("ip:::1"));
        assert!(TenantId::is_valid(&"a".repeat(128)));
        for bad in ["", "a b", "{x}", "a*", "a\r\n", "é", "a/b"] {
            assert!(!TenantId::is_valid(bad), "{bad:?}");
        }
        assert!(!TenantId::is_valid(&"a".repeat(129)));
    }
}
