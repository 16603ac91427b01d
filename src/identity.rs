//! Tenant identity (SPEC §3): who is this request for?
//!
//! Sources are tried in configured order and the first one whose header is
//! present decides. A JWT that is present but invalid is a hard 401: it never
//! falls through to the next source, so a forged token plus a spoofed
//! `x-tenant-id` header cannot work. Tenant ids are validated here, once, so
//! nothing downstream (Redis keys, metric labels, logs) ever sees a bad one.

pub mod jwt;

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
        if s.starts_with("ip:") {
            return Err(IdentityError::InvalidTenant);
        }
        Self::parse(s)
    }

    /// The anonymous tenant of a client address, `ip:<addr>`.
    pub fn for_ip(ip: IpAddr) -> TenantId {
        TenantId(Arc::from(format!("ip:{ip}")))
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
    pub fn identify(
        &self,
        headers: &HeaderMap,
        client_ip: IpAddr,
    ) -> Result<Identity, IdentityError> {
        for source in &self.sources {
            match source {
                Source::Jwt(jwt) => {
                    if let Some(value) = headers.get(jwt.header()) {
                        let claims = jwt.verify(value).map_err(IdentityError::InvalidToken)?;
                        let tenant = TenantId::parse_claimed(&claims.tenant)?;
                        return Ok(Identity {
                            tenant,
                            claimed_tier: claims.tier.map(Arc::from),
                            source: IdentitySource::Jwt,
                        });
                    }
                }
                Source::Header(name) => {
                    if let Some(value) = headers.get(name) {
                        let text = value.to_str().map_err(|_| IdentityError::InvalidTenant)?;
                        return Ok(Identity {
                            tenant: TenantId::parse_claimed(text)?,
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
                tenant: TenantId::for_ip(client_ip),
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
