//! Policy: from (tenant identity, route) to the buckets a request must pass.
//!
//! Tier resolution, highest first (SPEC §3): admin override → the
//! `tier_claim` of a verified JWT → the static `tenants:` map →
//! `default_tier`. A claimed tier that is not configured falls back to the
//! default tier; it is never the client's error.
//!
//! The bucket lists for every (route, tier) pair are built once per config,
//! so the hot path borrows a slice instead of allocating.

use std::borrow::Cow;
use std::sync::Arc;

use http::Method;

use crate::config::{Config, Limit, Route, TierIdx};
use crate::identity::Identity;
use crate::limiter::{BucketSpec, TENANT_BUCKET};
use crate::overrides::Override;

/// Where a tenant's effective tier came from (admin API `source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierSource {
    /// Admin override.
    Override,
    /// `tier_claim` of a verified JWT.
    Claim,
    /// The `tenants:` map.
    Config,
    /// `default_tier`.
    Default,
}

impl TierSource {
    /// Stable name used by the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            TierSource::Override => "override",
            TierSource::Claim => "claim",
            TierSource::Config => "config",
            TierSource::Default => "default",
        }
    }
}

/// The compiled policy of one config.
pub struct Policy {
    config: Arc<Config>,
    /// `plans[route_slot][tier]`; route slot 0 is "no route matched".
    plans: Vec<Vec<Vec<BucketSpec>>>,
    tenant_bucket: Arc<str>,
    ip_bucket: Option<BucketSpec>,
}

impl Policy {
    /// Compiles the policy of a validated config.
    pub fn new(config: Arc<Config>) -> Policy {
        let tenant_bucket: Arc<str> = Arc::from(TENANT_BUCKET);
        let mut plans = Vec::with_capacity(config.routes.len() + 1);
        let routes = std::iter::once(None).chain(config.routes.iter().map(Some));
        for route in routes {
            let per_tier = config
                .tiers
                .iter()
                .enumerate()
                .map(|(t, tier)| Self::plan(&tenant_bucket, tier.limit, route, t))
                .collect();
            plans.push(per_tier);
        }
        let ip_bucket = config.server.ip_limit.map(|limit| BucketSpec {
            name: Arc::from(crate::limiter::IP_BUCKET),
            limit,
            cost: 1,
        });
        Policy {
            config,
            plans,
            tenant_bucket,
            ip_bucket,
        }
    }

    fn plan(
        tenant_bucket: &Arc<str>,
        limit: Limit,
        route: Option<&Route>,
        tier: TierIdx,
    ) -> Vec<BucketSpec> {
        let mut v = vec![BucketSpec {
            name: tenant_bucket.clone(),
            limit,
            cost: route.map_or(1, |r| r.cost),
        }];
        if let Some(r) = route
            && let Some(limit) = r.limits[tier]
        {
            v.push(BucketSpec {
                name: r.name.clone(),
                limit,
                cost: 1,
            });
        }
        v
    }

    /// The config this policy was compiled from.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// The first route matching the request, by index.
    pub fn route(&self, method: &Method, path: &str) -> Option<usize> {
        self.config
            .routes
            .iter()
            .position(|r| r.matcher.matches(method, path))
    }

    /// Resolves the effective tier of an identified tenant. `override_tier`
    /// is the admin override's tier, when one applies.
    pub fn resolve_tier(
        &self,
        identity: &Identity,
        override_tier: Option<TierIdx>,
    ) -> (TierIdx, TierSource) {
        if let Some(t) = override_tier {
            return (t, TierSource::Override);
        }
        if let Some(claimed) = &identity.claimed_tier {
            match self.config.tier_index(claimed) {
                Some(t) => return (t, TierSource::Claim),
                None => {
                    tracing::debug!(tier = %claimed, tenant = %identity.tenant, "claimed tier is not configured; using the default tier")
                }
            }
        }
        if identity.source == crate::identity::IdentitySource::Anonymous
            && let Some(t) = self.config.tier_index("anonymous")
        {
            return (t, TierSource::Config);
        }
        if let Some(&t) = self.config.tenants.get(identity.tenant.as_str()) {
            return (t, TierSource::Config);
        }
        (self.config.default_tier, TierSource::Default)
    }

    /// The buckets a request on `route` (index) for a tenant on `tier` touches.
    pub fn buckets(&self, route: Option<usize>, tier: TierIdx) -> &[BucketSpec] {
        &self.plans[route.map_or(0, |r| r + 1)][tier]
    }

    /// The buckets with an admin override's rate/burst applied to the
    /// tenant bucket; borrows the precompiled list when nothing changes.
    pub fn buckets_with<'a>(
        &'a self,
        route: Option<usize>,
        tier: TierIdx,
        ov: Option<&Override>,
    ) -> Cow<'a, [BucketSpec]> {
        let base = self.buckets(route, tier);
        match ov {
            Some(o) if o.rate.is_some() || o.burst.is_some() => {
                let mut v = base.to_vec();
                v[0].limit = o.apply(v[0].limit);
                Cow::Owned(v)
            }
            _ => Cow::Borrowed(base),
        }
    }

    /// The tenant bucket's limit on `tier` with an override applied.
    pub fn tenant_limit(&self, tier: TierIdx, ov: Option<&Override>) -> Limit {
        let base = self.config.tiers[tier].limit;
        ov.map_or(base, |o| o.apply(base))
    }

    /// The per-client-IP bucket, when `server.ip_limit` is set.
    pub fn ip_bucket(&self) -> Option<&BucketSpec> {
        self.ip_bucket.as_ref()
    }

    /// Name of the tenant bucket.
    pub fn tenant_bucket(&self) -> &Arc<str> {
        &self.tenant_bucket
    }
}
