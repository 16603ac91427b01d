//! Shared buckets in Redis: the `redis` backend.
//!
//! A Lua script checks and debits every bucket of a request atomically,
//! reading the Redis server's clock (`TIME`) so that replicas' clocks never
//! enter the arithmetic. Each bucket is one string key,
//! `{prefix}:{<tenant>}:<bucket>`, holding `<tat>:<interval>` (its GCRA TAT
//! and the emission interval it was written under, both in microseconds;
//! see [`Gcra::normalize`]): the tenant
//! sits in a hash tag, so all keys of one request live on one Cluster slot,
//! and tenant ids cannot contain `{`, `}` or `:`-ambiguity-breaking bytes
//! (see [`TenantId`]), which keeps the key layout injective. Keys expire
//! when their bucket would be full again, so idle tenants cost nothing.
//!
//! **Batching.** On a single server, one worker's concurrent decisions are
//! coalesced into one script call (module `batch`): the script takes a
//! sequence of decisions and evaluates them one after another, each
//! all-or-nothing, in arrival order, exactly as separate calls would, and
//! Redis runs the whole script atomically, so the counts are exact. A
//! decision goes out at once while fewer than four batches are in flight,
//! so a quiet worker adds no latency; under load the decisions that arrive
//! meanwhile share the next call (up to 128 per call). On a Cluster the
//! tenants' keys live on different slots, so each decision is its own call
//! of the same script (a batch of one), routed by its keys.
//!
//! The script is sent by SHA (`EVALSHA`) and reloaded on `NOSCRIPT` (a Redis
//! restarted empty). Every decision is bounded by `backend.redis.timeout`
//! (a decision that times out is answered [`LimiterError::Timeout`]; its
//! batch may still complete later, or, if not yet sent, leaves it out);
//! a call that fails on a dropped connection is retried once. The
//! connection is a multiplexed, auto-reconnecting one per worker.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use tokio::sync::OnceCell;

mod batch;

use super::{BucketSpec, Decision, Gcra, LimiterError, evaluate};
use crate::config::{RedisConfig, RedisTarget};
use crate::identity::TenantId;
use batch::{Batcher, Request};

const MICROS: f64 = 1e6;

/// A connection to a single Redis (auto-reconnecting, multiplexed) or to a
/// Cluster (slot-aware, following MOVED/ASK), usable wherever redis-rs
/// wants a connection.
#[derive(Clone)]
pub enum Conn {
    /// One server.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// A Redis connection that may not exist yet: single servers connect
/// lazily (and reconnect by themselves); a Cluster client is built in the
/// background, retrying until the cluster answers, so that tiergate starts
/// (and serves by `on_error`) while Redis is down.
#[derive(Clone)]
pub struct RedisConn(Arc<OnceCell<Conn>>);

impl RedisConn {
    /// Starts connecting to `target`. Must be called inside a Tokio runtime.
    /// `response_timeout` bounds each command inside redis-rs; `None` when
    /// the caller bounds every call itself (redis-rs's bound would be a
    /// second timer per call). A Cluster client always gets one (it
    /// retries and follows redirects on its own, each attempt bounded),
    /// `connect_timeout` when none is given.
    pub fn connect(
        target: &RedisTarget,
        response_timeout: Option<Duration>,
        connect_timeout: Duration,
    ) -> Result<RedisConn, LimiterError> {
        let cell = Arc::new(OnceCell::new());
        match target {
            RedisTarget::Single(url) => {
                let client = redis::Client::open(url.as_str())
                    .map_err(|e| LimiterError::Unavailable(e.to_string()))?;
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(response_timeout)
                    .set_connection_timeout(Some(connect_timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                let manager = ConnectionManager::new_lazy_with_config(client, config)
                    .map_err(|e| LimiterError::Unavailable(e.to_string()))?;
                let _ = cell.set(Conn::Single(manager));
            }
            RedisTarget::Cluster(nodes) => {
                let client = redis::cluster::ClusterClient::builder(nodes.clone())
                    .connection_timeout(connect_timeout)
                    .response_timeout(response_timeout.unwrap_or(connect_timeout))
                    .build()
                    .map_err(|e| LimiterError::Unavailable(e.to_string()))?;
                let fill = cell.clone();
                tokio::spawn(async move {
                    let mut warned = false;
                    loop {
                        match client.get_async_connection().await {
                            Ok(c) => {
                                let _ = fill.set(Conn::Cluster(c));
                                tracing::info!("connected to redis cluster");
                                return;
                            }
                            Err(e) => {
                                if !warned {
                                    tracing::warn!(error = %e, "redis cluster not reachable yet; retrying");
                                    warned = true;
                                }
                                tokio::time::sleep(Duration::from_millis(500)).await;
                            }
                        }
                    }
                });
            }
        }
        Ok(RedisConn(cell))
    }

    /// The connection, once established.
    pub fn get(&self) -> Option<Conn> {
        self.0.get().cloned()
    }
}

/// The Redis limiter.
pub struct RedisLimiter {
    conn: RedisConn,
    /// The batch script, for one-decision calls on a Cluster.
    script: redis::Script,
    /// Coalesces decisions into script calls on a single server; `None` on
    /// a Cluster.
    batcher: Option<Batcher>,
    prefix: String,
    timeout: Duration,
    deny_cache: DenyCache,
}

/// The exact local deny cache. When Redis refuses a request it tells us the
/// TATs of the request's buckets; tokens are only ever taken between now and
/// then, so a bucket's TAT can only grow and our copy is a lower bound. A
/// later request that this lower bound already refuses would certainly be
/// refused by Redis too, so it is answered here, with no Redis call. A
/// tenant flooding at 100× its limit costs Redis about two calls per token
/// it is granted (one that takes the token, one that learns the next wait),
/// per worker, plus one a second while a wait is longer than that (entries
/// are trusted for a second, see [`DenyCache::MAX_AGE_US`]): not one per
/// request. Entries carry the bucket's (interval, tau): when an override or
/// tier change alters the limit they no longer match and are ignored, so a
/// raised limit helps at once, and this worker forgets them (a bucket run
/// at two rates in turn, say during a tier change, can see its TAT lowered
/// by the conversion between them). Another worker or replica running the
/// same bucket at a different rate meanwhile can do the same unseen: for
/// that window, at most [`DenyCache::MAX_AGE_US`], a refusal here may be
/// one Redis would not have made. Times are mapped to the local
/// clock from the moment the call was *sent* (before Redis read its clock),
/// which keeps the copy a lower bound. One cache per worker (no sharing).
struct DenyCache {
    base: std::time::Instant,
    entries: std::sync::Mutex<CacheMap>,
}

/// Cached TATs and the failure generation they were learnt in.
#[derive(Default)]
struct CacheMap {
    generation: u64,
    map: std::collections::HashMap<(TenantId, Arc<str>), CachedTat>,
}

#[derive(Clone, Copy)]
struct CachedTat {
    /// TAT in microseconds on `base`'s clock.
    tat: u64,
    gcra: Gcra,
    /// When it was learnt, on the same clock.
    learnt: u64,
}

impl DenyCache {
    const MAX_ENTRIES: usize = 65_536;
    /// How long an entry is trusted: Redis can lose state without an error
    /// we would see (`FLUSHALL`, eviction, an operator deleting a key to
    /// unblock a tenant), so a flood still costs one Redis call per second
    /// per worker, never one per request, and a reset bucket is noticed
    /// within a second.
    const MAX_AGE_US: u64 = 1_000_000;

    fn new() -> DenyCache {
        DenyCache {
            // Offset so that local "now" is never 0 (0 means "full").
            base: std::time::Instant::now() - Duration::from_secs(1),
            entries: Default::default(),
        }
    }

    fn now(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }

    /// A refusal decided from cached TATs, if they already refuse.
    fn check(
        &self,
        tenant: &TenantId,
        buckets: &[BucketSpec],
        gcras: &[Gcra],
        generation: u64,
    ) -> Option<Decision> {
        let mut guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if guard.generation != generation {
            // Redis failed since these were learnt: it may have restarted
            // empty, with every bucket full again.
            guard.map.clear();
            guard.generation = generation;
        }
        let entries = &mut guard.map;
        if entries.is_empty() {
            return None;
        }
        let now = self.now();
        let mut tats = [0u64; 4];
        let mut any = false;
        for (i, (b, g)) in buckets.iter().zip(gcras).enumerate() {
            let key = (tenant.clone(), b.name.clone());
            let Some(c) = entries.get(&key) else { continue };
            if c.gcra != *g {
                // This request runs the bucket at another rate: Redis will
                // re-express its TAT in that rate, which can lower the TAT
                // in the old one, so the entry is no longer a lower bound.
                entries.remove(&key);
            } else if c.tat > now && now.saturating_sub(c.learnt) < Self::MAX_AGE_US {
                tats[i] = c.tat;
                any = true;
            }
        }
        drop(guard);
        if !any {
            return None;
        }
        let n = buckets.len();
        match evaluate(buckets, gcras, &mut tats[..n], now, MICROS) {
            d @ Decision::Deny { .. } => Some(d),
            Decision::Allow { .. } => None,
        }
    }

    /// Remembers the TATs Redis reported with a refusal.
    fn remember(
        &self,
        tenant: &TenantId,
        buckets: &[BucketSpec],
        gcras: &[Gcra],
        tats: &[u64],
        redis_now: u64,
        sent: u64,
    ) {
        let mut guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let entries = &mut guard.map;
        if entries.len() >= Self::MAX_ENTRIES {
            let now = self.now();
            entries.retain(|_, c| c.tat > now);
            if entries.len() >= Self::MAX_ENTRIES {
                entries.clear();
            }
        }
        for ((b, g), tat) in buckets.iter().zip(gcras).zip(tats) {
            if *tat > redis_now {
                entries.insert(
                    (tenant.clone(), b.name.clone()),
                    CachedTat {
                        tat: sent + (tat - redis_now),
                        gcra: *g,
                        learnt: sent,
                    },
                );
            }
        }
    }
}

impl RedisLimiter {
    /// Creates the limiter and starts connecting in the background; until a
    /// connection exists, calls fail with [`LimiterError::Unavailable`] and
    /// the `on_error` policy decides. Must be called inside a Tokio runtime.
    pub fn new(cfg: &RedisConfig) -> Result<RedisLimiter, LimiterError> {
        let timeout = cfg.timeout;
        // Connection attempts get a little more room than one call.
        let connect_timeout = timeout.max(Duration::from_millis(250));
        // Every call the limiter makes is bounded by its own deadline; a
        // single server's connection needs no second bound per command.
        let per_command = match cfg.target {
            RedisTarget::Single(_) => None,
            RedisTarget::Cluster(_) => Some(timeout),
        };
        let conn = RedisConn::connect(&cfg.target, per_command, connect_timeout)?;
        let batcher = match conn.get() {
            Some(Conn::Single(manager)) => Some(Batcher::new(manager, timeout)),
            _ => None,
        };
        Ok(RedisLimiter {
            conn,
            script: redis::Script::new(batch::SCRIPT),
            batcher,
            prefix: cfg.key_prefix.clone(),
            timeout,
            deny_cache: DenyCache::new(),
        })
    }

    /// The Redis key of a bucket: `{prefix}:{<tenant>}:<bucket>`.
    pub fn key(prefix: &str, tenant: &TenantId, bucket: &str) -> String {
        let mut k = String::with_capacity(prefix.len() + tenant.as_str().len() + bucket.len() + 4);
        k.push_str(prefix);
        k.push_str(":{");
        k.push_str(tenant.as_str());
        k.push_str("}:");
        k.push_str(bucket);
        k
    }

    /// Checks that Redis answers a keyed command within the call timeout
    /// (the health probe). A keyed command goes where decisions go: on a
    /// Cluster it reaches the slot's master and fails with `CLUSTERDOWN`
    /// when the cluster refuses commands, where a `PING` would still be
    /// answered by the surviving nodes.
    pub async fn ping(&self) -> Result<(), LimiterError> {
        let Some(mut conn) = self.conn.get() else {
            return Err(LimiterError::Unavailable("not connected".into()));
        };
        let mut probe = redis::cmd("EXISTS");
        probe.arg(format!("{}:{{!probe}}", self.prefix));
        let call = probe.query_async::<i64>(&mut conn);
        match tokio::time::timeout(self.timeout, call).await {
            Err(_) => Err(LimiterError::Timeout),
            Ok(Err(e)) => Err(LimiterError::Unavailable(e.to_string())),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// Whole tokens left in one bucket, without touching it (admin reads).
    pub async fn peek(&self, tenant: &TenantId, bucket: &BucketSpec) -> Result<u64, LimiterError> {
        let Some(conn) = self.conn.get() else {
            return Err(LimiterError::Unavailable("not connected".into()));
        };
        let g = Gcra::new(&bucket.limit, MICROS);
        let key = Self::key(&self.prefix, tenant, &bucket.name);
        let mut pipe = redis::pipe();
        pipe.cmd("TIME").cmd("GET").arg(&key);
        let call = async {
            match conn.clone() {
                Conn::Single(mut c) => {
                    pipe.query_async::<((u64, u64), Option<String>)>(&mut c)
                        .await
                }
                Conn::Cluster(mut c) => {
                    pipe.query_async::<((u64, u64), Option<String>)>(&mut c)
                        .await
                }
            }
        };
        let ((secs, micros), value) =
            tokio::time::timeout(self.timeout.max(Duration::from_millis(500)), call)
                .await
                .map_err(|_| LimiterError::Timeout)?
                .map_err(|e| LimiterError::Redis(e.to_string()))?;
        let now = secs * 1_000_000 + micros;
        let tat = value
            .as_deref()
            .and_then(|v| {
                let (tat, iv) = v.split_once(':')?;
                Some(g.normalize(tat.parse().ok()?, iv.parse().ok()?, now))
            })
            .unwrap_or(0);
        Ok(g.remaining(now, tat))
    }

    /// Checks and (if admitted) debits every bucket in one script call
    /// (shared with the worker's other concurrent decisions on a single
    /// server, see the module docs).
    /// `generation` is the backend's failure generation (see
    /// [`super::BackendHealth`]); a change empties the deny cache.
    pub async fn check(
        &self,
        tenant: &TenantId,
        buckets: &[BucketSpec],
        generation: u64,
    ) -> Result<Decision, LimiterError> {
        let n = buckets.len();
        assert!((1..=4).contains(&n), "a request touches 1..=4 buckets");
        let mut gcras = [Gcra {
            interval: 1,
            tau: 1,
        }; 4];
        for (g, b) in gcras.iter_mut().zip(buckets) {
            *g = Gcra::new(&b.limit, MICROS);
        }
        if let Some(d) = self
            .deny_cache
            .check(tenant, buckets, &gcras[..n], generation)
        {
            return Ok(d);
        }
        let mut req = Request {
            keys: Default::default(),
            args: [0; 12],
            n,
        };
        for (i, (g, b)) in gcras.iter().zip(buckets).enumerate() {
            req.keys[i] = Self::key(&self.prefix, tenant, &b.name);
            req.args[3 * i..3 * i + 3].copy_from_slice(&[g.interval, g.tau, b.cost as u64]);
        }
        // Deny-cache times are mapped from before the request was queued:
        // earlier than Redis's clock read, which keeps them lower bounds.
        let sent = self.deny_cache.now();
        let verdict = match &self.batcher {
            Some(batcher) => batcher.submit(req).await?,
            None => {
                let Some(mut conn) = self.conn.get() else {
                    return Err(LimiterError::Unavailable("not connected".into()));
                };
                let one = [&req];
                let call = batch::call(&mut conn, &self.script, &one);
                tokio::time::timeout(self.timeout, call)
                    .await
                    .map_err(|_| LimiterError::Timeout)??
                    .pop()
                    .ok_or_else(|| LimiterError::Redis("empty script reply".into()))?
            }
        };
        let admitted = verdict.admitted;
        let now = verdict.now;
        let mut tats = verdict.tats;
        let decision = evaluate(buckets, &gcras[..n], &mut tats[..n], now, MICROS);
        if !admitted {
            self.deny_cache
                .remember(tenant, buckets, &gcras[..n], &tats[..n], now, sent);
        }
        if admitted != matches!(decision, Decision::Allow { .. }) {
            // The script and `evaluate` implement one rule; disagreement
            // would be a bug, and Redis's verdict (already applied) wins.
            tracing::error!(admitted, "redis script and local arithmetic disagree");
        }
        Ok(decision)
    }
}
