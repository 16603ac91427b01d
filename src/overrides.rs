//! Admin overrides: per-tenant tier, rate or burst changed at runtime,
//! stored durably, applied on every replica within a second, and audited.
//!
//! The request path reads a lock-free snapshot (`ArcSwap` of a map); writes
//! go to the store first and then replace the snapshot, so the replica that
//! took the admin call applies the change before answering it.
//!
//! Storage (SPEC §7):
//! - **redis**: overrides in the hash `{prefix}:{!admin}:overrides`, the
//!   audit log in the list `{prefix}:{!admin}:audit` (both in one Cluster
//!   slot; `!` cannot occur in tenant ids, so these never collide with
//!   bucket keys), each change made by one Lua script (read old value,
//!   write, append audit, trim) and announced on the pub/sub channel
//!   `{prefix}:overrides`. Every replica subscribes and reloads the whole
//!   hash on each message *and on every (re)connect*, so a replica that was
//!   cut off catches up as soon as it is back.
//! - **memory**: `backend.state_file`, a JSON document rewritten atomically
//!   (temporary file, fsync, rename, fsync of the directory) so a crash never
//!   leaves a torn file.
//!
//! An override whose `expires_at` has passed stops applying at once (the
//! read path checks it); a background task then deletes it from the store
//! with an `expire` audit entry (compare-and-delete, so one replica does it).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::{Config, Limit, Rate, RedisTarget};
use crate::identity::TenantId;
use crate::limiter::redis::RedisConn;
use crate::metrics::Metrics;

fn not_connected() -> StoreError {
    StoreError::Redis("not connected yet".into())
}

/// How many audit entries are kept.
pub const AUDIT_RETENTION: usize = 1000;

/// A stored override, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// Tier to put the tenant on.
    pub tier: Option<String>,
    /// Replacement refill rate.
    pub rate: Option<Rate>,
    /// Replacement burst.
    pub burst: Option<u32>,
    /// When it stops applying.
    pub expires_at: Option<OffsetDateTime>,
    /// Why (free text).
    pub reason: Option<String>,
    /// When it was written.
    pub updated_at: OffsetDateTime,
}

impl Override {
    /// Whether it still applies at `now`.
    pub fn active_at(&self, now: OffsetDateTime) -> bool {
        self.expires_at.is_none_or(|e| e > now)
    }

    /// The tenant bucket size given the tier's own limit.
    pub fn apply(&self, base: Limit) -> Limit {
        Limit {
            rate: self.rate.unwrap_or(base.rate),
            burst: self.burst.unwrap_or(base.burst),
        }
    }

    /// The JSON form used by the API and the stores.
    pub fn to_doc(&self) -> OverrideDoc {
        OverrideDoc {
            tier: self.tier.clone(),
            rate: self.rate.map(|r| r.to_string()),
            burst: self.burst,
            expires_at: self.expires_at.map(fmt_time),
            reason: self.reason.clone(),
            updated_at: fmt_time(self.updated_at),
        }
    }

    fn from_doc(doc: &OverrideDoc) -> Option<Override> {
        Some(Override {
            tier: doc.tier.clone(),
            rate: match &doc.rate {
                Some(r) => Some(Rate::parse(r).ok()?),
                None => None,
            },
            burst: doc.burst,
            expires_at: match &doc.expires_at {
                Some(e) => Some(OffsetDateTime::parse(e, &Rfc3339).ok()?),
                None => None,
            },
            reason: doc.reason.clone(),
            updated_at: OffsetDateTime::parse(&doc.updated_at, &Rfc3339).ok()?,
        })
    }
}

/// Formats a timestamp as RFC 3339.
pub fn fmt_time(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// An override as JSON (API responses, stores, audit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OverrideDoc {
    /// Tier.
    pub tier: Option<String>,
    /// Rate as text (`10/s`).
    pub rate: Option<String>,
    /// Burst.
    pub burst: Option<u32>,
    /// RFC 3339.
    pub expires_at: Option<String>,
    /// Reason.
    pub reason: Option<String>,
    /// RFC 3339.
    pub updated_at: String,
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When (RFC 3339).
    pub at: String,
    /// Whose override.
    pub tenant: String,
    /// `set`, `delete` or `expire`.
    pub action: String,
    /// The override before the change.
    #[serde(default)]
    pub before: Option<OverrideDoc>,
    /// The override after the change.
    #[serde(default)]
    pub after: Option<OverrideDoc>,
    /// The change's reason, when given.
    #[serde(default)]
    pub reason: Option<String>,
    /// Fingerprint of the admin token that made it (`system` for expiry).
    pub actor: String,
}

/// The body of `PUT /v1/tenants/{id}/override`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverrideRequest {
    /// Tier name.
    pub tier: Option<String>,
    /// Rate (`100/s`).
    pub rate: Option<String>,
    /// Burst (>= 1).
    pub burst: Option<i64>,
    /// RFC 3339 expiry.
    pub expires_at: Option<String>,
    /// Free text.
    pub reason: Option<String>,
}

impl OverrideRequest {
    /// Validates against the current config; every problem in one message.
    pub fn validate(&self, cfg: &Config, now: OffsetDateTime) -> Result<Override, String> {
        let mut problems = Vec::new();
        if self.tier.is_none() && self.rate.is_none() && self.burst.is_none() {
            problems.push("give at least one of `tier`, `rate`, `burst`".to_string());
        }
        if let Some(t) = &self.tier
            && cfg.tier_index(t).is_none()
        {
            let known: Vec<&str> = cfg.tiers.iter().map(|t| &*t.name).collect();
            problems.push(format!(
                "unknown tier `{t}`; configured tiers: {}",
                known.join(", ")
            ));
        }
        let rate = match self.rate.as_deref().map(Rate::parse) {
            Some(Err(e)) => {
                problems.push(format!("rate: {e}"));
                None
            }
            Some(Ok(r)) => Some(r),
            None => None,
        };
        let burst = match self.burst {
            Some(b) if !(1..=u32::MAX as i64).contains(&b) => {
                problems.push(format!("burst must be between 1 and {}, got {b}", u32::MAX));
                None
            }
            Some(b) => Some(b as u32),
            None => None,
        };
        let expires_at = match self
            .expires_at
            .as_deref()
            .map(|e| (e, OffsetDateTime::parse(e, &Rfc3339)))
        {
            Some((text, Err(_))) => {
                problems.push(format!(
                    "expires_at `{text}` is not an RFC 3339 time like `2026-12-31T23:59:59Z`"
                ));
                None
            }
            Some((text, Ok(t))) if t <= now => {
                problems.push(format!("expires_at `{text}` is in the past"));
                None
            }
            Some((_, Ok(t))) => Some(t),
            None => None,
        };
        if let Some(r) = &self.reason
            && r.len() > 1024
        {
            problems.push("reason is longer than 1024 bytes".to_string());
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        Ok(Override {
            tier: self.tier.clone(),
            rate,
            burst,
            expires_at,
            reason: self.reason.clone(),
            updated_at: now,
        })
    }
}

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis failed or is unreachable.
    #[error("override store (redis) failed: {0}")]
    Redis(String),
    /// The state file could not be read or written.
    #[error("override store (state file {path}) failed: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// The state file's content.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateDoc {
    #[serde(default)]
    overrides: BTreeMap<String, OverrideDoc>,
    /// Newest first.
    #[serde(default)]
    audit: Vec<AuditEntry>,
}

/// Change script: KEYS = overrides hash, audit list; ARGV = tenant, new
/// doc ("" to delete), audit template JSON (without before/after), max
/// audit entries, expected current value (only for `expire`: delete only
/// if unchanged; "" otherwise). Returns the previous doc or false.
const CHANGE_SCRIPT: &str = r#"
local old = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[5] ~= '' and old ~= ARGV[5] then return false end
if ARGV[2] == '' then
  if not old then return false end
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
local entry = cjson.decode(ARGV[3])
if old then entry['before'] = cjson.decode(old) end
if ARGV[2] ~= '' then entry['after'] = cjson.decode(ARGV[2]) end
redis.call('LPUSH', KEYS[2], cjson.encode(entry))
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[4]) - 1)
return old or ''
"#;

// One per process: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
/// Re-seed after Redis lost its data: KEYS = epoch marker, overrides hash;
/// ARGV = new epoch, then tenant/doc pairs. Runs only if the marker is
/// missing, so of all replicas noticing an empty Redis exactly one re-seeds.
const RESEED_SCRIPT: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
redis.call('SET', KEYS[1], ARGV[1])
local added = 0
for i = 2, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 0 then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    added = added + 1
  end
end
return added
"#;

/// Reads the override hash and whether the epoch marker exists, in one
/// step: KEYS = epoch marker, overrides hash. Returns `{exists, hgetall}`.
const LOAD_SCRIPT: &str = r#"
return { redis.call('EXISTS', KEYS[1]), redis.call('HGETALL', KEYS[2]) }
"#;

/// How long a freshly started replica that holds no overrides leaves an
/// emptied Redis to replicas that do, before marking it complete.
const FRESH_REPLICA_GRACE: Duration = Duration::from_secs(5);

enum Store {
    File {
        path: PathBuf,
        state: Mutex<StateDoc>,
    },
    Redis {
        conn: RedisConn,
        /// One client per configured node, for pub/sub: any node will do
        /// (a Cluster broadcasts PUBLISH), so the subscriber rotates through
        /// them when one is down.
        clients: Vec<redis::Client>,
        hash: String,
        audit: String,
        epoch: String,
        channel: String,
        script: redis::Script,
        reseed: redis::Script,
        load: redis::Script,
    },
}

/// The override set of this process and its store.
pub struct Overrides {
    current: ArcSwap<HashMap<TenantId, Arc<Override>>>,
    store: Store,
    metrics: Arc<Metrics>,
    started: std::time::Instant,
}

impl Overrides {
    /// Opens the store and loads what it holds. The memory backend's state
    /// file must be readable (a corrupt file is an error, never silently
    /// replaced); Redis may be down (the sync task fills the set later).
    pub async fn open(cfg: &Config, metrics: Arc<Metrics>) -> Result<Arc<Overrides>, StoreError> {
        let store = match &cfg.backend.kind {
            crate::config::BackendKind::Memory => {
                let path = cfg.backend.state_file.clone();
                let state = read_state(&path)?;
                Store::File {
                    path,
                    state: Mutex::new(state),
                }
            }
            crate::config::BackendKind::Redis(r) => {
                let urls = match &r.target {
                    RedisTarget::Single(u) => vec![u.clone()],
                    RedisTarget::Cluster(nodes) => nodes.clone(),
                };
                let clients = urls
                    .iter()
                    .map(|u| redis::Client::open(u.as_str()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| StoreError::Redis(e.to_string()))?;
                let conn = RedisConn::connect(
                    &r.target,
                    Some(Duration::from_secs(2)),
                    Duration::from_secs(1),
                )
                .map_err(|e| StoreError::Redis(e.to_string()))?;
                let p = &r.key_prefix;
                Store::Redis {
                    conn,
                    clients,
                    hash: format!("{p}:{{!admin}}:overrides"),
                    audit: format!("{p}:{{!admin}}:audit"),
                    epoch: format!("{p}:{{!admin}}:epoch"),
                    channel: format!("{p}:overrides"),
                    script: redis::Script::new(CHANGE_SCRIPT),
                    reseed: redis::Script::new(RESEED_SCRIPT),
                    load: redis::Script::new(LOAD_SCRIPT),
                }
            }
        };
        let me = Arc::new(Overrides {
            current: ArcSwap::from_pointee(HashMap::new()),
            store,
            metrics,
            started: std::time::Instant::now(),
        });
        match &me.store {
            Store::File { state, .. } => {
                let docs = state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .overrides
                    .clone();
                me.install(docs);
            }
            Store::Redis { .. } => {
                if let Err(e) = me.reload_from_redis().await {
                    tracing::warn!(error = %e, "cannot load overrides from redis yet; will retry");
                }
            }
        }
        Ok(me)
    }

    /// The override that applies to `tenant` now, if any. Lock-free.
    pub fn get(&self, tenant: &TenantId) -> Option<Arc<Override>> {
        let map = self.current.load();
        if map.is_empty() {
            return None;
        }
        let o = map.get(tenant)?;
        o.active_at(OffsetDateTime::now_utc()).then(|| o.clone())
    }

    /// Every active override, sorted by tenant.
    pub fn list(&self) -> Vec<(TenantId, Arc<Override>)> {
        let now = OffsetDateTime::now_utc();
        let mut v: Vec<_> = self
            .current
            .load()
            .iter()
            .filter(|(_, o)| o.active_at(now))
            .map(|(t, o)| (t.clone(), o.clone()))
            .collect();
        v.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        v
    }

    /// Stores an override and applies it here at once.
    pub async fn set(
        &self,
        tenant: &TenantId,
        ov: Override,
        actor: &str,
    ) -> Result<(), StoreError> {
        let doc = ov.to_doc();
        self.change(tenant, Some(&doc), "set", ov.reason.clone(), actor, None)
            .await?;
        let mut next = HashMap::clone(&self.current.load());
        next.insert(tenant.clone(), Arc::new(ov));
        self.publish_local(next);
        Ok(())
    }

    /// Removes an override; `false` when there was none.
    pub async fn remove(&self, tenant: &TenantId, actor: &str) -> Result<bool, StoreError> {
        let existed = self
            .change(tenant, None, "delete", None, actor, None)
            .await?;
        let mut next = HashMap::clone(&self.current.load());
        next.remove(tenant);
        self.publish_local(next);
        let now = OffsetDateTime::now_utc();
        // An expired override is already gone as far as anyone can tell.
        Ok(existed
            .as_ref()
            .and_then(Override::from_doc)
            .is_some_and(|o| o.active_at(now)))
    }

    /// The latest `limit` audit entries, newest first.
    pub async fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        match &self.store {
            Store::File { state, .. } => {
                let s = state.lock().unwrap_or_else(|p| p.into_inner());
                Ok(s.audit.iter().take(limit).cloned().collect())
            }
            Store::Redis { conn, audit, .. } => {
                let mut c = conn.get().ok_or_else(not_connected)?;
                let raw: Vec<String> = redis::cmd("LRANGE")
                    .arg(audit)
                    .arg(0)
                    .arg(limit.saturating_sub(1) as i64)
                    .query_async(&mut c)
                    .await
                    .map_err(|e| StoreError::Redis(e.to_string()))?;
                Ok(raw
                    .iter()
                    .filter_map(|r| serde_json::from_str(r).ok())
                    .collect())
            }
        }
    }

    /// Writes one change to the store with its audit entry. Returns the
    /// previous doc (`None` when there was none). With `expect`, the change
    /// happens only if the stored doc still equals it.
    async fn change(
        &self,
        tenant: &TenantId,
        new: Option<&OverrideDoc>,
        action: &str,
        reason: Option<String>,
        actor: &str,
        expect: Option<&OverrideDoc>,
    ) -> Result<Option<OverrideDoc>, StoreError> {
        let entry = AuditEntry {
            at: fmt_time(OffsetDateTime::now_utc()),
            tenant: tenant.to_string(),
            action: action.to_string(),
            before: None,
            after: None,
            reason,
            actor: actor.to_string(),
        };
        match &self.store {
            Store::File { path, state } => {
                let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                let old = s.overrides.get(tenant.as_str()).cloned();
                if let Some(expect) = expect
                    && old.as_ref() != Some(expect)
                {
                    return Ok(None);
                }
                if new.is_none() && old.is_none() {
                    return Ok(None);
                }
                let mut next = StateDoc {
                    overrides: s.overrides.clone(),
                    audit: Vec::with_capacity(s.audit.len() + 1),
                };
                match new {
                    Some(d) => next.overrides.insert(tenant.to_string(), d.clone()),
                    None => next.overrides.remove(tenant.as_str()),
                };
                next.audit.push(AuditEntry {
                    before: old.clone(),
                    after: new.cloned(),
                    ..entry
                });
                next.audit
                    .extend(s.audit.iter().take(AUDIT_RETENTION - 1).cloned());
                write_state(path, &next)?;
                *s = next;
                Ok(old)
            }
            Store::Redis {
                conn,
                hash,
                audit,
                channel,
                script,
                ..
            } => {
                let mut c = conn.get().ok_or_else(not_connected)?;
                let new_json = new
                    .map(|d| serde_json::to_string(d).expect("serializable"))
                    .unwrap_or_default();
                let expect_json = expect
                    .map(|d| serde_json::to_string(d).expect("serializable"))
                    .unwrap_or_default();
                let template = serde_json::to_string(&entry).expect("serializable");
                let old: Option<String> = script
                    .key(hash)
                    .key(audit)
                    .arg(tenant.as_str())
                    .arg(&new_json)
                    .arg(&template)
                    .arg(AUDIT_RETENTION)
                    .arg(&expect_json)
                    .invoke_async(&mut c)
                    .await
                    .map_err(|e| StoreError::Redis(e.to_string()))?;
                let _: Result<i64, _> = redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(tenant.as_str())
                    .query_async(&mut c)
                    .await;
                Ok(old
                    .filter(|o| !o.is_empty())
                    .and_then(|o| serde_json::from_str(&o).ok()))
            }
        }
    }

    fn publish_local(&self, next: HashMap<TenantId, Arc<Override>>) {
        let now = OffsetDateTime::now_utc();
        self.metrics
            .overrides
            .set(next.values().filter(|o| o.active_at(now)).count() as i64);
        self.current.store(Arc::new(next));
    }

    fn install(&self, docs: impl IntoIterator<Item = (String, OverrideDoc)>) {
        let mut next = HashMap::new();
        for (tenant, doc) in docs {
            match (TenantId::parse(&tenant), Override::from_doc(&doc)) {
                (Ok(t), Some(o)) => {
                    next.insert(t, Arc::new(o));
                }
                _ => {
                    tracing::warn!(tenant = %tenant.escape_debug(), "ignoring a malformed stored override")
                }
            }
        }
        self.publish_local(next);
    }

    async fn reload_from_redis(&self) -> Result<(), StoreError> {
        let Store::Redis {
            conn,
            hash,
            epoch,
            load,
            ..
        } = &self.store
        else {
            return Ok(());
        };
        // Never replace the set in memory with the contents of a Redis that
        // lost its data (epoch marker missing): re-seed it first. A replica
        // holding nothing has nothing to lose and takes what is there.
        for _ in 0..2 {
            let mut c = conn.get().ok_or_else(not_connected)?;
            let (exists, raw): (i64, HashMap<String, String>) = load
                .key(epoch)
                .key(hash)
                .invoke_async(&mut c)
                .await
                .map_err(|e| StoreError::Redis(e.to_string()))?;
            let holding_nothing = self.current.load().is_empty();
            if exists == 1 || holding_nothing {
                self.install(raw.into_iter().filter_map(|(t, d)| {
                    serde_json::from_str::<OverrideDoc>(&d).ok().map(|d| (t, d))
                }));
                if exists == 0 {
                    // Marks a fresh Redis once past the start-up grace.
                    let _ = self.ensure_epoch().await;
                }
                return Ok(());
            }
            self.ensure_epoch().await?;
        }
        Err(StoreError::Redis(
            "override epoch marker keeps disappearing".into(),
        ))
    }

    /// Starts the background work: for Redis, the subscriber that applies
    /// other replicas' changes (reloading everything on each (re)connect);
    /// for both, the sweeper that deletes expired overrides.
    pub fn spawn_background(self: &Arc<Self>) {
        if let Store::Redis {
            clients, channel, ..
        } = &self.store
        {
            let me = Arc::downgrade(self);
            let clients = clients.clone();
            let channel = channel.clone();
            tokio::spawn(async move {
                let mut logged_down = false;
                let mut next = 0usize;
                loop {
                    let Some(this) = me.upgrade() else { return };
                    let client = &clients[next % clients.len()];
                    next += 1;
                    match subscribe(client, &channel).await {
                        Ok(mut pubsub) => {
                            // Catch up on anything missed while disconnected,
                            // and re-seed a Redis that came back empty.
                            // The first call on a connection that was cut may
                            // fail while it reconnects: retry briefly, well
                            // within the one-second propagation promise.
                            let mut caught_up = false;
                            for _ in 0..8 {
                                match this.reload_from_redis().await {
                                    Ok(()) => {
                                        caught_up = true;
                                        break;
                                    }
                                    Err(e) => {
                                        tracing::debug!(error = %e, "override catch-up reload failed; retrying");
                                        tokio::time::sleep(Duration::from_millis(100)).await;
                                    }
                                }
                            }
                            if !caught_up {
                                tracing::warn!(
                                    "override catch-up reload keeps failing; resubscribing"
                                );
                                continue;
                            }
                            if logged_down {
                                tracing::info!("override sync reconnected; full set reloaded");
                                logged_down = false;
                            }
                            drop(this);
                            let mut stream = pubsub.on_message();
                            while stream.next().await.is_some() {
                                let Some(this) = me.upgrade() else { return };
                                if let Err(e) = this.reload_from_redis().await {
                                    tracing::warn!(error = %e, "override reload failed");
                                }
                            }
                        }
                        Err(e) => {
                            if !logged_down {
                                tracing::warn!(error = %e, "override sync cannot subscribe; retrying");
                                logged_down = true;
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            });
        }
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            let mut n: u64 = 0;
            loop {
                tick.tick().await;
                n += 1;
                let Some(this) = me.upgrade() else { return };
                this.sweep_expired().await;
                if n.is_multiple_of(20) {
                    // Safety net for a subscription that hangs without
                    // failing (also re-seeds an emptied Redis).
                    if let Err(e) = this.reload_from_redis().await {
                        tracing::debug!(error = %e, "periodic override reload failed");
                    }
                } else if n.is_multiple_of(4)
                    && let Err(e) = this.ensure_epoch().await
                {
                    tracing::debug!(error = %e, "override epoch check failed");
                }
            }
        });
    }

    /// Makes sure Redis still holds our data: the epoch marker is written
    /// with the first override set; when it is missing, Redis lost its
    /// data (restarted empty, failed over to an empty replica) and the
    /// set this replica holds in memory is written back. The script runs
    /// only where the marker is missing, so exactly one replica re-seeds.
    async fn ensure_epoch(&self) -> Result<(), StoreError> {
        let Store::Redis {
            conn,
            epoch,
            hash,
            reseed,
            ..
        } = &self.store
        else {
            return Ok(());
        };
        let mut c = conn.get().ok_or_else(not_connected)?;
        let exists: bool = redis::cmd("EXISTS")
            .arg(epoch)
            .query_async(&mut c)
            .await
            .map_err(|e| StoreError::Redis(e.to_string()))?;
        if exists {
            return Ok(());
        }
        let docs: Vec<(String, String)> = self
            .current
            .load()
            .iter()
            .map(|(t, o)| {
                (
                    t.to_string(),
                    serde_json::to_string(&o.to_doc()).expect("serializable"),
                )
            })
            .collect();
        if docs.is_empty() && self.started.elapsed() < FRESH_REPLICA_GRACE {
            // A replica that has just started holds nothing: leave the
            // re-seed to replicas that do, if any, before marking the
            // (possibly emptied) Redis as complete.
            return Err(StoreError::Redis(
                "override epoch missing; waiting for a replica that holds overrides to re-seed"
                    .into(),
            ));
        }
        let mut inv = reseed.prepare_invoke();
        inv.key(epoch)
            .key(hash)
            .arg(fmt_time(OffsetDateTime::now_utc()));
        for (t, d) in &docs {
            inv.arg(t).arg(d);
        }
        let added: i64 = inv
            .invoke_async(&mut c)
            .await
            .map_err(|e| StoreError::Redis(e.to_string()))?;
        if added > 0 {
            self.metrics.override_reseeds.inc();
            tracing::warn!(
                overrides = added,
                "redis lost its data: re-seeded overrides from memory"
            );
            if let Store::Redis { channel, .. } = &self.store {
                let _: Result<i64, _> = redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg("*")
                    .query_async(&mut c)
                    .await;
            }
        }
        Ok(())
    }

    async fn sweep_expired(&self) {
        let now = OffsetDateTime::now_utc();
        let expired: Vec<(TenantId, Arc<Override>)> = self
            .current
            .load()
            .iter()
            .filter(|(_, o)| !o.active_at(now))
            .map(|(t, o)| (t.clone(), o.clone()))
            .collect();
        if expired.is_empty() {
            return;
        }
        for (tenant, o) in &expired {
            let doc = o.to_doc();
            match self
                .change(tenant, None, "expire", None, "system", Some(&doc))
                .await
            {
                Ok(Some(_)) => tracing::info!(tenant = %tenant, "override expired"),
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "cannot delete an expired override yet");
                    continue;
                }
            }
        }
        let mut next = HashMap::clone(&self.current.load());
        next.retain(|_, o| o.active_at(now));
        self.publish_local(next);
    }
}

async fn subscribe(
    client: &redis::Client,
    channel: &str,
) -> redis::RedisResult<redis::aio::PubSub> {
    let mut pubsub = tokio::time::timeout(Duration::from_secs(2), client.get_async_pubsub())
        .await
        .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "connect timed out")))??;
    pubsub.subscribe(channel).await?;
    Ok(pubsub)
}

fn read_state(path: &Path) -> Result<StateDoc, StoreError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| StoreError::File {
            path: path.to_path_buf(),
            message: format!("not a valid tiergate state file ({e}); fix or move it away"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StateDoc::default()),
        Err(e) => Err(StoreError::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        }),
    }
}

/// Atomic replace: write a sibling temp file, fsync it, rename it over the
/// target, fsync the directory.
fn write_state(path: &Path, state: &StateDoc) -> Result<(), StoreError> {
    let err = |e: std::io::Error| StoreError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let body = serde_json::to_vec_pretty(state).expect("serializable");
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(&body).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })?;
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A short, non-reversible fingerprint of an admin token for the audit log.
pub fn token_fingerprint(token: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(token.as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}
