//! tiergate: a per-tenant, tier-aware rate-limiting reverse proxy.
//!
//! A request flows `listener → hardening → identity → policy → limiter →
//! upstream`, and the modules follow that path:
//!
//! | module | job |
//! | --- | --- |
//! | [`server`] | per-core listeners, connection caps, timeouts, drain |
//! | [`stack`] | the request path, step by step, in one function |
//! | [`hardening`] | client address, body cap, per-IP connection cap |
//! | [`identity`] | tenant id from a JWT or a header |
//! | [`policy`] | effective tier and the buckets a request touches |
//! | [`limiter`] | token buckets in memory or Redis, `on_error` policy |
//! | [`proxy`] | forwarding with a pooled client, hop-by-hop headers |
//! | [`error`] | the one table of responses tiergate makes itself |
//! | [`admin`] | `/healthz`, `/readyz`, `/metrics` |
//! | [`config`] | YAML → validated [`config::Config`] (the only YAML user) |
//! | [`metrics`] | Prometheus metrics on a passed-in registry |
//! | [`demo`] | `tiergate demo`: echo upstream and sample credentials |
//! | [`heap_trim`] | freed heap memory back to the OS after a burst |
//!
//! [`start`] builds a running instance from a validated config; the binary
//! (`main.rs`) adds the CLI, logging and signals around it.

pub mod admin;
pub mod client;
pub mod config;
pub mod demo;
pub mod error;
pub mod hardening;
pub mod heap_trim;
pub mod identity;
pub mod limiter;
pub mod metrics;
pub mod overrides;
pub mod policy;
pub mod proxy;
pub mod server;
pub mod stack;
pub mod top;

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderValue;
use tokio::sync::{Semaphore, watch};

use crate::config::{BackendKind, Config, ConfigErrors};
use crate::identity::Identifier;
use crate::limiter::{BackendHealth, Limiter, MemoryLimiter, RedisLimiter};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::proxy::Upstream;
use crate::server::Connections;
use crate::stack::Gate;

/// Resolves an environment variable; injectable so `check` and tests need
/// not touch the process environment.
pub type EnvFn = dyn Fn(&str) -> Option<String> + Send + Sync;

/// The process environment.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Everything a config reload replaces, swapped atomically as one value so
/// no request sees half of two configs.
pub struct Live {
    /// Tiers, routes, tenants.
    pub policy: Policy,
    /// Identity sources with loaded keys.
    pub identifier: Identifier,
    /// `tiergate_requests_total` children for this config's tiers and routes.
    pub counters: metrics::RequestCounters,
    tier_headers: Vec<HeaderValue>,
}

impl Live {
    /// Compiles a config; loads key material through `env`.
    pub fn new(config: Arc<Config>, env: &EnvFn, metrics: &Metrics) -> Result<Live, ConfigErrors> {
        let identifier = Identifier::new(&config.identity, env)
            .map_err(|errors| ConfigErrors { file: None, errors })?;
        let tier_headers = config
            .tiers
            .iter()
            .map(|t| HeaderValue::from_str(&t.name).expect("tier names are header-safe"))
            .collect();
        let tier_names: Vec<&str> = config.tiers.iter().map(|t| &*t.name).collect();
        let route_names: Vec<&str> = config.routes.iter().map(|r| &*r.name).collect();
        let counters = metrics::RequestCounters::new(metrics, &tier_names, &route_names);
        Ok(Live {
            policy: Policy::new(config),
            identifier,
            counters,
            tier_headers,
        })
    }

    /// The `x-tenant-tier` value of a tier.
    pub fn tier_header(&self, tier: usize) -> HeaderValue {
        self.tier_headers[tier].clone()
    }
}

/// Where the process is in its life (for `/readyz`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Lifecycle {
    /// Binding and connecting.
    Starting = 0,
    /// Serving.
    Ready = 1,
    /// Shutting down: not accepting, finishing in-flight requests.
    Draining = 2,
}

/// State shared by every worker and the admin listener.
pub struct App {
    /// The current config, swapped on reload.
    pub live: ArcSwap<Live>,
    /// Backend health (degraded or not).
    pub health: Arc<BackendHealth>,
    /// In-process buckets: the memory backend, or Redis's `local` fallback.
    pub local: Arc<MemoryLimiter>,
    /// `ip_limit` buckets (always per replica).
    pub ip_limiter: Arc<MemoryLimiter>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Connection accounting.
    pub connections: Connections,
    /// Admin overrides (survive reloads).
    pub overrides: Arc<overrides::Overrides>,
    /// Tiers claimed by recent verified tokens (admin API `source`).
    pub claims: identity::RecentClaims,
    /// Accepted admin bearer tokens (comma-separated in the env var, for
    /// rotation); `None` disables `/v1`.
    pub admin_tokens: Option<Vec<String>>,
    /// The config file, for reloads (`None` for the demo).
    pub config_path: Option<std::path::PathBuf>,
    /// A Redis connection for admin reads (`remaining`), on the control runtime.
    pub admin_redis: Option<RedisLimiter>,
    lifecycle: AtomicU8,
    env: Arc<EnvFn>,
}

impl App {
    /// Current lifecycle stage.
    pub fn lifecycle(&self) -> Lifecycle {
        match self.lifecycle.load(Ordering::Relaxed) {
            0 => Lifecycle::Starting,
            1 => Lifecycle::Ready,
            _ => Lifecycle::Draining,
        }
    }

    /// Moves to a lifecycle stage.
    pub fn set_lifecycle(&self, l: Lifecycle) {
        self.lifecycle.store(l as u8, Ordering::Relaxed);
    }

    /// Name of the configured backend.
    pub fn backend_name(&self) -> &'static str {
        match self.live.load().policy.config().backend.kind {
            BackendKind::Memory => "memory",
            BackendKind::Redis(_) => "redis",
        }
    }

    /// Re-reads the config file and swaps tiers, routes, tenants and
    /// identity atomically. Returns the settings that changed but need a
    /// restart; on error the old config keeps serving.
    pub fn reload(&self, path: &Path) -> Result<Vec<String>, ConfigErrors> {
        let result = self.try_reload(path);
        let label = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .config_reloads
            .with_label_values(&[label])
            .inc();
        result
    }

    fn try_reload(&self, path: &Path) -> Result<Vec<String>, ConfigErrors> {
        let new = Config::from_file(path)?;
        let old = self.live.load().policy.config().clone();
        let mut restart = Vec::new();
        if new.server.listen != old.server.listen {
            restart.push("server.listen".to_string());
        }
        if new.admin.listen != old.admin.listen {
            restart.push("admin.listen".to_string());
        }
        if new.upstream.url != old.upstream.url
            || new.upstream.timeout != old.upstream.timeout
            || new.upstream.connect_timeout != old.upstream.connect_timeout
        {
            restart.push("upstream".to_string());
        }
        if format!("{:?}", new.backend) != format!("{:?}", old.backend) {
            restart.push("backend".to_string());
        }
        let live = Live::new(Arc::new(new), &*self.env, &self.metrics).map_err(|mut e| {
            e.file = Some(path.to_path_buf());
            e
        })?;
        let cfg = live.policy.config().clone();
        self.metrics.tenant_labels.configure(
            cfg.metrics.max_tenant_labels,
            cfg.tenants.keys().map(String::as_str),
        );
        self.live.store(Arc::new(live));
        Ok(restart)
    }

    /// A limiter for the calling worker runtime (its own Redis connection).
    fn make_limiter(self: &Arc<Self>) -> Result<Limiter, limiter::LimiterError> {
        let cfg = self.live.load().policy.config().clone();
        Ok(match &cfg.backend.kind {
            BackendKind::Memory => Limiter::memory(
                self.local.clone(),
                self.health.clone(),
                self.metrics.clone(),
            ),
            BackendKind::Redis(r) => Limiter::redis(
                RedisLimiter::new(r)?,
                self.local.clone(),
                cfg.backend.on_error,
                self.health.clone(),
                self.metrics.clone(),
            ),
        })
    }
}

/// Why an instance could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config (or its secrets) is invalid.
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {cause}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        cause: io::Error,
    },
    /// A worker could not start.
    #[error("cannot start worker: {0}")]
    Worker(String),
    /// The override store could not be opened.
    #[error("{0}")]
    Store(String),
}

/// A running tiergate instance.
pub struct Running {
    /// Bound proxy address.
    pub proxy_addr: SocketAddr,
    /// Bound admin address.
    pub admin_addr: SocketAddr,
    /// Shared state.
    pub app: Arc<App>,
    shutdown: watch::Sender<bool>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, drains in-flight requests (up to
    /// `server.shutdown_grace`) and waits for the workers to finish.
    pub async fn shutdown(self) {
        self.app.set_lifecycle(Lifecycle::Draining);
        let _ = self.shutdown.send(true);
        let workers = self.workers;
        let _ = tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.join();
            }
        })
        .await;
    }
}

/// Probes Redis every 500 ms so that `/readyz`, the degraded gauge and the
/// circuit breaker follow Redis's real state without waiting for traffic:
/// an outage shows within one probe, and recovery is noticed within one
/// probe of Redis answering again.
fn spawn_probe(app: &Arc<App>) {
    let app = Arc::downgrade(app);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate: skip it, so that a connection still
        // being set up at start-up is not reported as an outage.
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(app) = app.upgrade() else { return };
            let Some(redis) = &app.admin_redis else {
                return;
            };
            let result = redis.ping().await;
            if let Err(e) = &result {
                app.metrics
                    .backend_errors
                    .with_label_values(&["redis", e.kind()])
                    .inc();
            }
            app.health.probe_result(result.as_ref().map(|_| ()));
        }
    });
}

/// Starts the proxy workers and the admin listener for `config`. Must be
/// called inside a Tokio runtime, which then hosts the admin listener and
/// background tasks; each proxy worker gets a thread and runtime of its own.
pub async fn start(
    config: Config,
    env: Arc<EnvFn>,
    config_path: Option<std::path::PathBuf>,
) -> Result<Running, StartError> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new(prometheus::Registry::new()));
    let live = Live::new(config.clone(), &*env, &metrics)?;
    metrics.tenant_labels.configure(
        config.metrics.max_tenant_labels,
        config.tenants.keys().map(String::as_str),
    );
    let local = Arc::new(MemoryLimiter::new());
    let ip_limiter = Arc::new(MemoryLimiter::new());
    local.spawn_sweeper(Duration::from_secs(10));
    ip_limiter.spawn_sweeper(Duration::from_secs(10));
    let overrides = overrides::Overrides::open(&config, metrics.clone())
        .await
        .map_err(|e| StartError::Store(e.to_string()))?;
    overrides.spawn_background();
    let admin_tokens = env(&config.admin.token_env).map(|v| {
        v.split(',')
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect::<Vec<_>>()
    });
    if admin_tokens.is_none() {
        tracing::info!(token_env = %config.admin.token_env, "admin token not set: /v1 admin API disabled");
    }
    let admin_redis = match &config.backend.kind {
        BackendKind::Redis(r) => {
            Some(RedisLimiter::new(r).map_err(|e| StartError::Store(e.to_string()))?)
        }
        BackendKind::Memory => None,
    };
    let app = Arc::new(App {
        live: ArcSwap::from_pointee(live),
        health: BackendHealth::new(config.backend.on_error, metrics.clone()),
        local,
        ip_limiter,
        metrics,
        connections: Connections {
            permits: Arc::new(Semaphore::new(config.server.max_connections)),
            per_ip: hardening::PerIpConnections::new(config.server.max_connections_per_ip),
        },
        lifecycle: AtomicU8::new(Lifecycle::Starting as u8),
        env,
        overrides,
        claims: Default::default(),
        admin_tokens,
        config_path,
        admin_redis,
    });

    let admin_listener = tokio::net::TcpListener::bind(config.admin.listen)
        .await
        .map_err(|cause| StartError::Bind {
            addr: config.admin.listen,
            cause,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|cause| StartError::Bind {
            addr: config.admin.listen,
            cause,
        })?;

    let workers_n = std::thread::available_parallelism().map_or(1, |n| n.get());
    let listeners = server::bind_workers(config.server.listen, workers_n).map_err(|cause| {
        StartError::Bind {
            addr: config.server.listen,
            cause,
        }
    })?;
    let proxy_addr = listeners[0]
        .local_addr()
        .map_err(|cause| StartError::Bind {
            addr: config.server.listen,
            cause,
        })?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut workers = Vec::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<Result<(), String>>(workers_n);
    for (i, listener) in listeners.into_iter().enumerate() {
        let app = app.clone();
        let rx = shutdown_rx.clone();
        let ready = ready_tx.clone();
        let handle = std::thread::Builder::new()
            .name(format!("tiergate-w{i}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready.blocking_send(Err(e.to_string()));
                        return;
                    }
                };
                rt.block_on(async move {
                    let limiter = match app.make_limiter() {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready.send(Err(e.to_string())).await;
                            return;
                        }
                    };
                    let upstream = Upstream::new(&app.live.load().policy.config().upstream);
                    let gate = Arc::new(Gate::new(app.clone(), upstream, limiter));
                    let _ = ready.send(Ok(())).await;
                    drop(ready);
                    if let Err(e) = server::run_worker(app, gate, listener, rx).await {
                        tracing::error!(error = %e, "worker failed");
                    }
                });
            })
            .map_err(|e| StartError::Worker(e.to_string()))?;
        workers.push(handle);
    }
    drop(ready_tx);
    for _ in 0..workers_n {
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                let _ = shutdown_tx.send(true);
                return Err(StartError::Worker(e));
            }
            None => break,
        }
    }

    tokio::spawn(admin::serve(app.clone(), admin_listener));
    heap_trim::spawn(shutdown_rx.clone());
    if app.admin_redis.is_some() {
        spawn_probe(&app);
    }
    app.set_lifecycle(Lifecycle::Ready);
    Ok(Running {
        proxy_addr,
        admin_addr,
        app,
        shutdown: shutdown_tx,
        workers,
    })
}
