//! Prometheus metrics (SPEC §8), registered on a passed-in registry so that
//! tests and embedders can read them without global state.
//!
//! Per-tenant series are bounded: [`TenantLabels`] admits at most
//! `metrics.max_tenant_labels` distinct tenant values — tenants named in the
//! config's `tenants:` map first, then the first tenants seen being throttled
//! or near their limit — and folds everyone else into `tenant="__other__"`.
//! A flood of random tenant ids therefore cannot grow the series count. The
//! set is read lock-free (an `ArcSwap` snapshot) and copied only when a new
//! tenant is admitted, which happens at most `max_tenant_labels` times.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;

use arc_swap::ArcSwap;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// Every metric name tiergate exports (besides the process collector's).
pub const METRIC_NAMES: &[&str] = &[
    "tiergate_requests_total",
    "tiergate_tenant_throttled_total",
    "tiergate_tenant_near_limit_total",
    "tiergate_near_limit_total",
    "tiergate_unknown_tier_total",
    "tiergate_limiter_duration_seconds",
    "tiergate_backend_errors_total",
    "tiergate_backend_degraded",
    "tiergate_upstream_duration_seconds",
    "tiergate_active_connections",
    "tiergate_config_reloads_total",
    "tiergate_overrides",
    "tiergate_override_reseeds_total",
];

/// Label value of tenants beyond the bound.
pub const OTHER_TENANT: &str = "__other__";

/// Every metric tiergate exports.
pub struct Metrics {
    /// `tiergate_requests_total{tier,route,decision}`.
    pub requests: IntCounterVec,
    /// `tiergate_limiter_duration_seconds{backend}`.
    pub limiter_duration: HistogramVec,
    /// `tiergate_backend_errors_total{backend,kind}`.
    pub backend_errors: IntCounterVec,
    /// `tiergate_backend_degraded`.
    pub backend_degraded: IntGauge,
    /// `tiergate_upstream_duration_seconds{status_class}`.
    pub upstream_duration: HistogramVec,
    /// `tiergate_active_connections`.
    pub active_connections: IntGauge,
    /// `tiergate_tenant_throttled_total{tenant,tier}` (bounded tenants).
    pub tenant_throttled: IntCounterVec,
    /// `tiergate_tenant_near_limit_total{tenant,tier}`: admitted requests that
    /// left the tenant under 10% of its burst (bounded tenants).
    pub tenant_near_limit: IntCounterVec,
    /// `tiergate_near_limit_total{tier}`: the same, per tier.
    pub near_limit: IntCounterVec,
    /// `tiergate_unknown_tier_total`: claimed or overridden tiers that are
    /// not configured (the default tier was used).
    pub unknown_tier: IntCounter,
    /// `tiergate_config_reloads_total{result}`.
    pub config_reloads: IntCounterVec,
    /// `tiergate_overrides`: admin overrides currently stored.
    pub overrides: IntGauge,
    /// `tiergate_override_reseeds_total`: times this replica re-wrote the
    /// override set into a Redis that had lost it.
    pub override_reseeds: IntCounter,
    /// Bounded tenant label set.
    pub tenant_labels: TenantLabels,
    upstream_by_class: [Histogram; 5],
    /// The registry they live on.
    pub registry: Registry,
}

impl Metrics {
    /// Creates and registers every metric (and the process collector on
    /// Linux) on `registry`.
    pub fn new(registry: Registry) -> Metrics {
        let requests = IntCounterVec::new(
            Opts::new(
                "tiergate_requests_total",
                "Requests decided by tiergate, by tier, route and decision.",
            ),
            &["tier", "route", "decision"],
        )
        .expect("valid metric");
        let limiter_duration = HistogramVec::new(
            HistogramOpts::new(
                "tiergate_limiter_duration_seconds",
                "Time to reach a limiter decision.",
            )
            .buckets(vec![
                0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                0.025, 0.05, 0.1,
            ]),
            &["backend"],
        )
        .expect("valid metric");
        let backend_errors = IntCounterVec::new(
            Opts::new(
                "tiergate_backend_errors_total",
                "Limiter backend failures, by backend and kind.",
            ),
            &["backend", "kind"],
        )
        .expect("valid metric");
        let backend_degraded = IntGauge::new(
            "tiergate_backend_degraded",
            "1 while decisions are made by the on_error fallback, else 0.",
        )
        .expect("valid metric");
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "tiergate_upstream_duration_seconds",
                "Time from forwarding a request to the upstream's response headers.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["status_class"],
        )
        .expect("valid metric");
        let active_connections = IntGauge::new(
            "tiergate_active_connections",
            "Client connections currently open on the proxy listener.",
        )
        .expect("valid metric");
        let tenant_throttled = IntCounterVec::new(
            Opts::new(
                "tiergate_tenant_throttled_total",
                "Throttled requests per tenant (bounded; the rest are tenant=\"__other__\").",
            ),
            &["tenant", "tier"],
        )
        .expect("valid metric");
        let tenant_near_limit = IntCounterVec::new(
            Opts::new(
                "tiergate_tenant_near_limit_total",
                "Admitted requests that left the tenant with under 10% of its burst (bounded tenants).",
            ),
            &["tenant", "tier"],
        )
        .expect("valid metric");
        let near_limit = IntCounterVec::new(
            Opts::new(
                "tiergate_near_limit_total",
                "Admitted requests that left their tenant with under 10% of its burst, per tier.",
            ),
            &["tier"],
        )
        .expect("valid metric");
        let unknown_tier = IntCounter::new(
            "tiergate_unknown_tier_total",
            "Requests whose claimed or overridden tier is not configured (default tier used).",
        )
        .expect("valid metric");
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "tiergate_config_reloads_total",
                "Config reload attempts by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let overrides = IntGauge::new("tiergate_overrides", "Admin overrides currently stored.")
            .expect("valid metric");
        let override_reseeds = IntCounter::new(
            "tiergate_override_reseeds_total",
            "Times this replica re-seeded overrides into a Redis that had lost its data.",
        )
        .expect("valid metric");
        for r in ["ok", "error"] {
            config_reloads.with_label_values(&[r]);
        }
        for c in [
            Box::new(tenant_throttled.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(tenant_near_limit.clone()),
            Box::new(near_limit.clone()),
            Box::new(unknown_tier.clone()),
            Box::new(config_reloads.clone()),
            Box::new(overrides.clone()),
            Box::new(override_reseeds.clone()),
            Box::new(requests.clone()),
            Box::new(limiter_duration.clone()),
            Box::new(backend_errors.clone()),
            Box::new(backend_degraded.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(active_connections.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            let _ = registry.register(Box::new(pc));
        }
        let upstream_by_class =
            ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|c| upstream_duration.with_label_values(&[c]));
        Metrics {
            requests,
            limiter_duration,
            backend_errors,
            backend_degraded,
            upstream_duration,
            active_connections,
            tenant_throttled,
            tenant_near_limit,
            near_limit,
            unknown_tier,
            config_reloads,
            overrides,
            override_reseeds,
            tenant_labels: TenantLabels::new(100),
            upstream_by_class,
            registry,
        }
    }

    /// Renders the registry in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let encoder = prometheus::TextEncoder::new();
        let _ = encoder.encode_utf8(&self.registry.gather(), &mut out);
        out
    }

    /// Counts a throttled request for `tenant` (bounded label).
    pub fn throttled(&self, tenant: &str, tier: &str) {
        let label = self.tenant_labels.label(tenant);
        self.tenant_throttled
            .with_label_values(&[&label, tier])
            .inc();
    }

    /// Counts an admitted request that left its tenant near the limit.
    pub fn near_limit(&self, tenant: &str, tier: &str) {
        self.near_limit.with_label_values(&[tier]).inc();
        let label = self.tenant_labels.label(tenant);
        self.tenant_near_limit
            .with_label_values(&[&label, tier])
            .inc();
    }

    /// The upstream latency histogram of a response status's class
    /// (resolved once; observing is lock-free).
    pub fn upstream_histogram(&self, status: u16) -> &Histogram {
        let i = match status {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        };
        &self.upstream_by_class[i]
    }
}

/// The `decision` label of `tiergate_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionLabel {
    /// Admitted.
    Allowed = 0,
    /// Refused by a bucket.
    Throttled = 1,
    /// No or invalid credentials.
    Unauthenticated = 2,
    /// Malformed request (tenant id, body size).
    Invalid = 3,
    /// tiergate or a dependency failed.
    Error = 4,
}

impl DecisionLabel {
    const ALL: [DecisionLabel; 5] = [
        DecisionLabel::Allowed,
        DecisionLabel::Throttled,
        DecisionLabel::Unauthenticated,
        DecisionLabel::Invalid,
        DecisionLabel::Error,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionLabel::Allowed => "allowed",
            DecisionLabel::Throttled => "throttled",
            DecisionLabel::Unauthenticated => "unauthenticated",
            DecisionLabel::Invalid => "invalid",
            DecisionLabel::Error => "error",
        }
    }
}

/// Every `tiergate_requests_total` child for one config, resolved once so
/// the request path counts with a plain atomic increment (no label hashing,
/// no lock). Route slot 0 is `route="default"`; tier slot `tiers.len()` is
/// `tier="none"`. All combinations are exported from the start, at zero.
pub struct RequestCounters {
    tiers: usize,
    counters: Vec<IntCounter>,
}

impl RequestCounters {
    /// Resolves the children for these tier and route names.
    pub fn new(metrics: &Metrics, tiers: &[&str], routes: &[&str]) -> RequestCounters {
        let mut counters = Vec::with_capacity((routes.len() + 1) * (tiers.len() + 1) * 5);
        for route in std::iter::once("default").chain(routes.iter().copied()) {
            for tier in tiers.iter().copied().chain(std::iter::once("none")) {
                for d in DecisionLabel::ALL {
                    counters.push(
                        metrics
                            .requests
                            .with_label_values(&[tier, route, d.as_str()]),
                    );
                }
            }
        }
        RequestCounters {
            tiers: tiers.len(),
            counters,
        }
    }

    /// The counter of a route (index into the config's routes, `None` for
    /// unmatched) and tier (`None` before the tier is known).
    pub fn get(&self, route: Option<usize>, tier: Option<usize>, d: DecisionLabel) -> &IntCounter {
        let route_slot = route.map_or(0, |r| r + 1);
        let tier_slot = tier.unwrap_or(self.tiers);
        &self.counters[(route_slot * (self.tiers + 1) + tier_slot) * 5 + d as usize]
    }
}

/// The bounded set of tenants that get their own label value.
pub struct TenantLabels {
    known: ArcSwap<HashMap<Box<str>, Arc<str>>>,
    max: std::sync::atomic::AtomicUsize,
    grow: Mutex<()>,
}

impl TenantLabels {
    /// At most `max` tenants.
    pub fn new(max: usize) -> TenantLabels {
        TenantLabels {
            known: ArcSwap::from_pointee(HashMap::new()),
            max: std::sync::atomic::AtomicUsize::new(max),
            grow: Mutex::new(()),
        }
    }

    /// Sets the bound and pre-seeds tenants named in the config, in order,
    /// up to the bound. Tenants already labelled keep their label.
    pub fn configure<'a>(&self, max: usize, seed: impl IntoIterator<Item = &'a str>) {
        self.max.store(max, std::sync::atomic::Ordering::Relaxed);
        for t in seed {
            self.label(t);
        }
    }

    /// The label value for `tenant`: itself while there is room, else
    /// `__other__`.
    pub fn label(&self, tenant: &str) -> Arc<str> {
        if let Some(l) = self.known.load().get(tenant) {
            return l.clone();
        }
        let max = self.max.load(std::sync::atomic::Ordering::Relaxed);
        if self.known.load().len() >= max {
            return Arc::from(OTHER_TENANT);
        }
        let _g = self.grow.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.known.load();
        if let Some(l) = cur.get(tenant) {
            return l.clone();
        }
        if cur.len() >= max {
            return Arc::from(OTHER_TENANT);
        }
        let mut next = HashMap::clone(&cur);
        let label: Arc<str> = Arc::from(tenant);
        next.insert(Box::from(tenant), label.clone());
        self.known.store(Arc::new(next));
        label
    }

    /// How many tenants have their own label.
    pub fn len(&self) -> usize {
        self.known.load().len()
    }

    /// Whether no tenant has its own label yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flood of random tenant ids cannot grow the label set past its bound.
    #[test]
    fn tenant_labels_are_bounded() {
        let l = TenantLabels::new(3);
        l.configure(3, ["acme"]);
        assert_eq!(&*l.label("acme"), "acme");
        assert_eq!(&*l.label("t1"), "t1");
        assert_eq!(&*l.label("t2"), "t2");
        for i in 0..10_000 {
            assert_eq!(&*l.label(&format!("x{i}")), OTHER_TENANT);
        }
        assert_eq!(&*l.label("t1"), "t1");
        assert_eq!(l.len(), 3);
    }

    /// Every advertised metric name is registered.
    #[test]
    fn every_metric_name_is_registered() {
        let m = Metrics::new(Registry::new());
        m.requests
            .with_label_values(&["free", "default", "allowed"])
            .inc();
        m.throttled("acme", "free");
        m.near_limit("acme", "free");
        m.limiter_duration
            .with_label_values(&["memory"])
            .observe(0.0);
        m.backend_errors
            .with_label_values(&["redis", "timeout"])
            .inc();
        m.upstream_histogram(200).observe(0.0);
        let text = m.render();
        for name in METRIC_NAMES {
            assert!(text.contains(name), "{name} missing from /metrics");
        }
    }
}
