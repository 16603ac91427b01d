//! Prometheus metrics (SPEC §8), registered on a passed-in registry so that
//! tests and embedders can read them without global state.

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

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
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
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
        Metrics {
            requests,
            limiter_duration,
            backend_errors,
            backend_degraded,
            upstream_duration,
            active_connections,
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

    /// A histogram child, for callers that cache it.
    pub fn upstream_histogram(&self, status: u16) -> Histogram {
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.upstream_duration.with_label_values(&[class])
    }
}
