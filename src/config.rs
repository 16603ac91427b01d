//! Configuration: the YAML file (SPEC §2) parsed into raw serde structs, then
//! validated into types that cannot hold bad states.
//!
//! This is the only module that knows about `serde_yaml`. Parsing is two
//! steps so that users see *every* mistake at once:
//!
//! 1. `serde_yaml` reads the text into [`RawConfig`] (`deny_unknown_fields`
//!    everywhere). A structural error (unknown key, wrong type) stops here and
//!    is reported with its YAML path, line and column as serde gives them.
//! 2. [`RawConfig`] is converted into [`Config`]; each conversion failure is
//!    collected as a [`ConfigError`] naming its YAML path, and all of them are
//!    returned together.
//!
//! `tiergate check` and `tiergate serve` share this one path; `serve`
//! additionally resolves secrets from the environment (see
//! [`crate::identity`]).

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};
use ipnet::IpNet;
use serde::Deserialize;

/// One configuration mistake: where it is and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted YAML path, e.g. `tiers.free.rate` or `routes[0].cost`.
    pub path: String,
    /// 1-based line when the YAML parser reported one.
    pub line: Option<usize>,
    /// What is wrong and what was expected.
    pub message: String,
}

impl ConfigError {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            line: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{} (line {}): {}", self.path, line, self.message),
            None => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

/// Every error found in one config file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors {
    /// The file the errors came from, when there was one.
    pub file: Option<PathBuf>,
    /// The errors, in validation order (section by section).
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match &self.file {
                Some(file) => write!(f, "{}: {}", file.display(), e)?,
                None => write!(f, "{e}")?,
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Validated types
// ---------------------------------------------------------------------------

/// A refill rate in tokens per second; always finite and > 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    per_second: f64,
    /// The amount and unit as written, for display (`10/s`, `1/m`).
    amount: f64,
    unit: RateUnit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RateUnit {
    Second,
    Minute,
    Hour,
    Day,
}

impl RateUnit {
    fn seconds(self) -> f64 {
        match self {
            RateUnit::Second => 1.0,
            RateUnit::Minute => 60.0,
            RateUnit::Hour => 3600.0,
            RateUnit::Day => 86400.0,
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            RateUnit::Second => "s",
            RateUnit::Minute => "m",
            RateUnit::Hour => "h",
            RateUnit::Day => "d",
        }
    }
}

impl Rate {
    /// Parses `<number>/<unit>` with unit `s|m|h|d|sec|min|hour|day`.
    pub fn parse(text: &str) -> Result<Rate, String> {
        let expected = "expected a rate like `10/s`, `1/m`, `0.5/s` (units: s, m, h, d)";
        let (num, unit) = text
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("`{text}` is not a rate; {expected}"))?;
        let unit = match unit.trim() {
            "s" | "sec" | "second" => RateUnit::Second,
            "m" | "min" | "minute" => RateUnit::Minute,
            "h" | "hour" => RateUnit::Hour,
            "d" | "day" => RateUnit::Day,
            other => {
                return Err(format!(
                    "unknown rate unit `{other}` in `{text}`; {expected}"
                ));
            }
        };
        let amount: f64 = num
            .trim()
            .parse()
            .map_err(|_| format!("`{text}` is not a rate; {expected}"))?;
        if !amount.is_finite() || amount <= 0.0 {
            return Err(format!("rate must be greater than 0, got `{text}`"));
        }
        let per_second = amount / unit.seconds();
        if per_second > 1e9 {
            return Err(format!("rate `{text}` is too high (max 1e9/s)"));
        }
        Ok(Rate {
            per_second,
            amount,
            unit,
        })
    }

    /// Tokens added per second.
    pub fn per_second(&self) -> f64 {
        self.per_second
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.amount, self.unit.suffix())
    }
}

/// A bucket size: capacity `burst`, refilled at `rate`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// Refill rate.
    pub rate: Rate,
    /// Capacity, at least 1.
    pub burst: u32,
}

impl Limit {
    /// Seconds to refill from empty to full, the IETF `w` parameter.
    pub fn window_secs(&self) -> f64 {
        self.burst as f64 / self.rate.per_second()
    }
}

/// Index of a tier in [`Config::tiers`]; only exists for configured tiers.
pub type TierIdx = usize;

/// A configured tier.
#[derive(Debug, Clone)]
pub struct Tier {
    /// Tier name as written (`free`, `enterprise`, ...).
    pub name: Arc<str>,
    /// Its tenant bucket.
    pub limit: Limit,
}

/// How a route recognises requests; every present field must match.
#[derive(Debug, Clone, Default)]
pub struct RouteMatch {
    /// Exact path.
    pub path: Option<String>,
    /// Path prefix.
    pub path_prefix: Option<String>,
    /// Allowed methods; empty means any.
    pub methods: Vec<Method>,
}

impl RouteMatch {
    /// Whether a request with this method and path matches.
    pub fn matches(&self, method: &Method, path: &str) -> bool {
        if let Some(p) = &self.path
            && p != path
        {
            return false;
        }
        if let Some(p) = &self.path_prefix
            && !path.starts_with(p.as_str())
        {
            return false;
        }
        self.methods.is_empty() || self.methods.iter().any(|m| m == method)
    }
}

/// A route: first match wins.
#[derive(Debug, Clone)]
pub struct Route {
    /// Name, used in bucket keys, headers and metric labels.
    pub name: Arc<str>,
    /// What it matches.
    pub matcher: RouteMatch,
    /// Tokens taken from the tenant's tier bucket.
    pub cost: u32,
    /// Never limited and never needs identity.
    pub exempt: bool,
    /// Per-tier route bucket, indexed by [`TierIdx`].
    pub limits: Vec<Option<Limit>>,
}

/// Where a JWT source gets its verification key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// HMAC secret read from this environment variable.
    SecretEnv(String),
    /// PEM public key (RSA, EC or Ed25519).
    PublicKeyFile(PathBuf),
    /// JWKS JSON document; keys chosen by `kid`.
    JwksFile(PathBuf),
}

/// A JWT identity source.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// Header carrying `Bearer <jwt>`.
    pub header: HeaderName,
    /// Accepted algorithms (never `none`).
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    /// Key material.
    pub key: KeySource,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud`, when set.
    pub audience: Option<String>,
    /// Claim holding the tenant id.
    pub tenant_claim: String,
    /// Claim holding the tier name, when set.
    pub tier_claim: Option<String>,
    /// Clock leeway for `exp` and `nbf`.
    pub leeway: Duration,
}

/// An identity source, tried in order.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// Signed JWT.
    Jwt(JwtConfig),
    /// Plain header carrying the tenant id.
    Header {
        /// Header name.
        name: HeaderName,
    },
}

/// What to do with a request no source applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anonymous {
    /// 401 `unauthenticated`.
    Reject,
    /// Tenant `ip:<addr>` on tier `anonymous`.
    Ip,
}

/// Identity settings.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// Sources in order.
    pub sources: Vec<SourceConfig>,
    /// Fallback when none applies.
    pub anonymous: Anonymous,
}

/// Listener hardening and limits.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Proxy listen address.
    pub listen: SocketAddr,
    /// Global connection cap.
    pub max_connections: usize,
    /// Per client IP connection cap.
    pub max_connections_per_ip: usize,
    /// Optional per-IP bucket, checked before identity.
    pub ip_limit: Option<Limit>,
    /// Slowloris guard.
    pub header_read_timeout: Duration,
    /// Header size cap (431).
    pub max_header_bytes: usize,
    /// Body size cap (413).
    pub max_body_bytes: u64,
    /// Close connections idle this long.
    pub idle_timeout: Duration,
    /// Drain deadline on SIGTERM.
    pub shutdown_grace: Duration,
    /// Log one `tiergate::access` event per request.
    pub access_log: bool,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
}

/// Admin listener.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Env var holding the bearer token.
    pub token_env: String,
}

/// Upstream service.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Base URI (`http://host:port`).
    pub url: http::Uri,
    /// TCP connect timeout (502 beyond).
    pub connect_timeout: Duration,
    /// Deadline for response headers (504 beyond).
    pub timeout: Duration,
}

/// Where the Redis backend connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// A single server (or a proxy in front of one).
    Single(String),
    /// A Redis Cluster, by seed node URLs.
    Cluster(Vec<String>),
}

/// Redis backend settings.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// Server or cluster.
    pub target: RedisTarget,
    /// Prefix of every key.
    pub key_prefix: String,
    /// Bound on each limiter call.
    pub timeout: Duration,
}

/// Which limiter stores the buckets.
#[derive(Debug, Clone)]
pub enum BackendKind {
    /// In-process buckets; each replica limits alone.
    Memory,
    /// Shared buckets in Redis.
    Redis(RedisConfig),
}

/// What to do when the Redis limiter fails (SPEC §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Decide with in-process buckets of the same tier.
    Local,
    /// Admit.
    Allow,
    /// 503.
    Deny,
}

/// Backend settings.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// Memory or Redis.
    pub kind: BackendKind,
    /// Policy on limiter failure.
    pub on_error: OnError,
    /// Where the memory backend persists overrides.
    pub state_file: PathBuf,
}

/// Metrics settings.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// Bound on distinct `tenant` label values.
    pub max_tenant_labels: usize,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Proxy listener.
    pub server: ServerConfig,
    /// Admin listener.
    pub admin: AdminConfig,
    /// Upstream.
    pub upstream: UpstreamConfig,
    /// Identity sources.
    pub identity: IdentityConfig,
    /// Limiter backend.
    pub backend: BackendConfig,
    /// Tiers in file order.
    pub tiers: Vec<Tier>,
    /// Tier of tenants with nothing else.
    pub default_tier: TierIdx,
    /// Routes, first match wins.
    pub routes: Vec<Route>,
    /// Static tenant → tier map.
    pub tenants: HashMap<String, TierIdx>,
    /// Metrics.
    pub metrics: MetricsConfig,
}

impl Config {
    /// Parses and validates a YAML document.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigErrors> {
        guard_yaml(text).map_err(|e| ConfigErrors {
            file: None,
            errors: vec![e],
        })?;
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| ConfigErrors {
            file: None,
            errors: vec![yaml_error(&e)],
        })?;
        raw.validate()
            .map_err(|errors| ConfigErrors { file: None, errors })
    }

    /// Reads, parses and validates a file; errors carry the file name.
    pub fn from_file(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            file: Some(path.to_path_buf()),
            errors: vec![ConfigError::new("(file)", format!("cannot read: {e}"))],
        })?;
        Config::from_yaml(&text).map_err(|mut e| {
            e.file = Some(path.to_path_buf());
            e
        })
    }

    /// Finds a tier by name.
    pub fn tier_index(&self, name: &str) -> Option<TierIdx> {
        self.tiers.iter().position(|t| &*t.name == name)
    }

    /// One-line summary for `tiergate check`.
    pub fn summary(&self) -> String {
        let backend = match &self.backend.kind {
            BackendKind::Memory => "memory",
            BackendKind::Redis(_) => "redis",
        };
        format!(
            "ok: {} tiers (default {}), {} routes, {} tenants, {} identity sources, {} backend, upstream {}",
            self.tiers.len(),
            self.tiers[self.default_tier].name,
            self.routes.len(),
            self.tenants.len(),
            self.identity.sources.len(),
            backend,
            self.upstream.url
        )
    }
}

/// Largest config document accepted.
const MAX_CONFIG_BYTES: usize = 1 << 20;
/// Deepest `[`/`{` nesting accepted.
const MAX_FLOW_DEPTH: usize = 32;

/// Refuses, before the YAML parser sees them, the constructs whose parsing
/// cost grows faster than the document: anchors and aliases (an alias
/// fan-out is quadratic in size, and a config never needs them), deep flow
/// nesting (quadratic in the scanner), and huge documents. Found by fuzzing
/// (docs/FUZZING.md).
fn guard_yaml(text: &str) -> Result<(), ConfigError> {
    if text.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::new(
            "(document)",
            format!("the config is {} bytes; the limit is 1 MiB", text.len()),
        ));
    }
    let mut depth = 0usize;
    for (n, line) in text.lines().enumerate() {
        let mut quote: Option<char> = None;
        let mut prev = ' ';
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match quote {
                Some(q) => {
                    if c == q {
                        quote = None;
                    }
                }
                None => match c {
                    '"' | '\'' if matches!(prev, ' ' | ':' | '[' | '{' | ',' | '-') => {
                        quote = Some(c)
                    }
                    '#' if prev == ' ' || prev == '\t' => break,
                    '[' | '{' => {
                        depth += 1;
                        if depth > MAX_FLOW_DEPTH {
                            return Err(ConfigError {
                                path: "(document)".into(),
                                line: Some(n + 1),
                                message: format!(
                                    "`[`/`{{` nested deeper than {MAX_FLOW_DEPTH} levels"
                                ),
                            });
                        }
                    }
                    ']' | '}' => depth = depth.saturating_sub(1),
                    '&' | '*'
                        if matches!(prev, ' ' | ':' | '[' | '{' | ',' | '-' | '\t')
                            && chars
                                .peek()
                                .is_some_and(|n| n.is_alphanumeric() || *n == '_') =>
                    {
                        return Err(ConfigError {
                            path: "(document)".into(),
                            line: Some(n + 1),
                            message: "YAML anchors (`&name`, `*name`) are not supported in tiergate configs: write values out in full".into(),
                        });
                    }
                    _ => {}
                },
            }
            prev = c;
        }
    }
    Ok(())
}

fn yaml_error(e: &serde_yaml::Error) -> ConfigError {
    // serde_yaml renders "path: message at line L column C"; split the path
    // off so the message reads the same as validation errors.
    let text = e.to_string();
    let text = match text.find(" at line ") {
        Some(i) => text[..i].to_string(),
        None => text,
    };
    let (path, message) = match text.split_once(": ") {
        Some((p, m)) if !p.contains(' ') => (p.to_string(), m.to_string()),
        _ => ("(document)".to_string(), text.clone()),
    };
    ConfigError {
        path,
        line: e.location().map(|l| l.line()),
        message,
    }
}

// ---------------------------------------------------------------------------
// Scalar parsers shared by validation
// ---------------------------------------------------------------------------

/// Parses `250ms`, `2s`, `5m`, `1h` (also `d`); fractions allowed (`1.5s`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| {
            format!("`{text}` needs a unit; expected a duration like `250ms`, `2s`, `5m`, `1h`")
        })?;
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| {
        format!("`{text}` is not a duration; expected e.g. `250ms`, `2s`, `5m`, `1h`")
    })?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        other => {
            return Err(format!(
                "unknown duration unit `{other}` in `{text}`; expected ms, s, m, h or d"
            ));
        }
    };
    if !secs.is_finite() || secs > 1e9 {
        return Err(format!("duration `{text}` is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `512`, `16KiB`, `10MiB`, `1GiB` (also `KB`/`MB`/`GB` as decimal).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a size; expected e.g. `512`, `16KiB`, `10MiB`"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{text}`; expected B, KiB, MiB or GiB"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size `{text}` is out of range"))
}

/// Tier and route names: they end up in headers, keys and metric labels.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

// ---------------------------------------------------------------------------
// Raw (serde) types
// ---------------------------------------------------------------------------

/// A YAML scalar kept as text so that `512` and `16KiB` parse alike.
#[derive(Debug, Clone)]
struct Scalar(String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Any {
            S(String),
            U(u64),
            I(i64),
            F(f64),
        }
        let text = match Any::deserialize(d)
            .map_err(|_| serde::de::Error::custom("expected a string or a number"))?
        {
            Any::S(s) => s,
            Any::U(u) => u.to_string(),
            Any::I(i) => i.to_string(),
            Any::F(f) => f.to_string(),
        };
        Ok(Scalar(text))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    admin: RawAdmin,
    upstream: RawUpstream,
    #[serde(default)]
    identity: Option<RawIdentity>,
    #[serde(default)]
    backend: RawBackend,
    tiers: Option<indexmap_like::OrderedMap<RawLimit>>,
    default_tier: Option<String>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    tenants: indexmap_like::OrderedMap<RawTenant>,
    #[serde(default)]
    metrics: RawMetrics,
}

/// A YAML mapping deserialised in document order without pulling in a map crate.
mod indexmap_like {
    use serde::{Deserialize, Deserializer};
    use std::fmt;
    use std::marker::PhantomData;

    #[derive(Debug)]
    pub struct OrderedMap<V>(pub Vec<(String, V)>);

    impl<V> Default for OrderedMap<V> {
        fn default() -> Self {
            OrderedMap(Vec::new())
        }
    }

    impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Visitor<V>(PhantomData<V>);
            impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Visitor<V> {
                type Value = OrderedMap<V>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a mapping")
                }
                fn visit_unit<E>(self) -> Result<Self::Value, E> {
                    Ok(OrderedMap(Vec::new()))
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Self::Value, A::Error> {
                    let mut out: Vec<(String, V)> = Vec::new();
                    let mut seen = std::collections::HashSet::new();
                    while let Some((k, v)) = map.next_entry::<String, V>()? {
                        if !seen.insert(k.clone()) {
                            return Err(serde::de::Error::custom(format!("duplicate key `{k}`")));
                        }
                        out.push((k, v));
                    }
                    Ok(OrderedMap(out))
                }
            }
            d.deserialize_map(Visitor(PhantomData))
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    ip_limit: Option<RawLimit>,
    header_read_timeout: Option<Scalar>,
    max_header_bytes: Option<Scalar>,
    max_body_bytes: Option<Scalar>,
    idle_timeout: Option<Scalar>,
    shutdown_grace: Option<Scalar>,
    access_log: Option<bool>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
    token_env: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: String,
    connect_timeout: Option<Scalar>,
    timeout: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    #[serde(default)]
    sources: Vec<RawSource>,
    anonymous: Option<String>,
}

// Parsed once at start-up; the size difference between variants is irrelevant.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum RawSource {
    Jwt {
        header: Option<String>,
        #[serde(default)]
        algorithms: Vec<String>,
        secret_env: Option<String>,
        public_key_file: Option<PathBuf>,
        jwks_file: Option<PathBuf>,
        issuer: Option<String>,
        audience: Option<String>,
        tenant_claim: Option<String>,
        tier_claim: Option<String>,
        leeway: Option<Scalar>,
    },
    Header {
        name: Option<String>,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    #[serde(rename = "type")]
    kind: Option<String>,
    redis: Option<RawRedis>,
    on_error: Option<String>,
    state_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    url: Option<String>,
    cluster: Option<Vec<String>>,
    key_prefix: Option<String>,
    timeout: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    rate: Scalar,
    burst: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: String,
    #[serde(rename = "match", default)]
    matcher: RawMatch,
    cost: Option<i64>,
    #[serde(default)]
    exempt: bool,
    #[serde(default)]
    limits: indexmap_like::OrderedMap<RawLimit>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    path: Option<String>,
    path_prefix: Option<String>,
    #[serde(default)]
    methods: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    tier: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    max_tenant_labels: Option<usize>,
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

/// Collects errors while converting; each helper returns `None` on error.
struct Check {
    errors: Vec<ConfigError>,
}

impl Check {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError::new(path, message));
    }

    fn duration(&mut self, path: &str, v: &Option<Scalar>, default: Duration) -> Duration {
        match v {
            None => default,
            Some(Scalar(s)) => parse_duration(s).unwrap_or_else(|m| {
                self.err(path, m);
                default
            }),
        }
    }

    fn size(&mut self, path: &str, v: &Option<Scalar>, default: u64) -> u64 {
        match v {
            None => default,
            Some(Scalar(s)) => parse_size(s).unwrap_or_else(|m| {
                self.err(path, m);
                default
            }),
        }
    }

    fn addr(&mut self, path: &str, v: &Option<String>, default: &str) -> SocketAddr {
        let text = v.as_deref().unwrap_or(default);
        text.parse().unwrap_or_else(|_| {
            self.err(
                path,
                format!("`{text}` is not a listen address; expected `IP:PORT` like `0.0.0.0:8080`"),
            );
            default.parse().expect("default address parses")
        })
    }

    fn limit(&mut self, path: &str, raw: &RawLimit) -> Option<Limit> {
        let rate = match Rate::parse(&raw.rate.0) {
            Ok(r) => Some(r),
            Err(m) => {
                self.err(format!("{path}.rate"), m);
                None
            }
        };
        let burst = if raw.burst < 1 {
            self.err(
                format!("{path}.burst"),
                format!("burst must be at least 1, got {}", raw.burst),
            );
            None
        } else if raw.burst > u32::MAX as i64 {
            self.err(format!("{path}.burst"), "burst is too large");
            None
        } else {
            Some(raw.burst as u32)
        };
        Some(Limit {
            rate: rate?,
            burst: burst?,
        })
    }

    fn header_name(&mut self, path: &str, v: &str) -> Option<HeaderName> {
        match HeaderName::from_bytes(v.to_ascii_lowercase().as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.err(path, format!("`{v}` is not a valid HTTP header name"));
                None
            }
        }
    }
}

fn parse_algorithm(s: &str) -> Option<jsonwebtoken::Algorithm> {
    use jsonwebtoken::Algorithm::*;
    Some(match s {
        "HS256" => HS256,
        "HS384" => HS384,
        "HS512" => HS512,
        "RS256" => RS256,
        "RS384" => RS384,
        "RS512" => RS512,
        "PS256" => PS256,
        "PS384" => PS384,
        "PS512" => PS512,
        "ES256" => ES256,
        "ES384" => ES384,
        "EdDSA" => EdDSA,
        _ => return None,
    })
}

fn is_hmac(a: jsonwebtoken::Algorithm) -> bool {
    use jsonwebtoken::Algorithm::*;
    matches!(a, HS256 | HS384 | HS512)
}

impl RawConfig {
    fn validate(self) -> Result<Config, Vec<ConfigError>> {
        let mut c = Check { errors: Vec::new() };

        // --- tiers -----------------------------------------------------------
        let mut tiers: Vec<Tier> = Vec::new();
        match &self.tiers {
            None => c.err("tiers", "required: define at least one tier"),
            Some(map) if map.0.is_empty() => c.err("tiers", "define at least one tier"),
            Some(map) => {
                for (name, raw) in &map.0 {
                    let path = format!("tiers.{name}");
                    if !valid_name(name) {
                        c.err(&path, "tier names are 1..=64 characters of [A-Za-z0-9_.-]");
                        continue;
                    }
                    if let Some(limit) = c.limit(&path, raw) {
                        tiers.push(Tier {
                            name: Arc::from(name.as_str()),
                            limit,
                        });
                    }
                }
            }
        }
        let declared: Vec<&str> = self
            .tiers
            .as_ref()
            .map(|m| m.0.iter().map(|(k, _)| k.as_str()).collect())
            .unwrap_or_default();
        let known = declared.join(", ");
        let tier_idx = |name: &str| tiers.iter().position(|t| &*t.name == name);

        let default_tier = match &self.default_tier {
            None => {
                c.err(
                    "default_tier",
                    "required: name the tier of tenants with no other tier",
                );
                None
            }
            Some(name) => match tier_idx(name) {
                Some(i) => Some(i),
                None => {
                    if !declared.is_empty() && !declared.contains(&name.as_str()) {
                        c.err(
                            "default_tier",
                            format!("unknown tier `{name}`; defined tiers: {known}"),
                        );
                    }
                    None
                }
            },
        };

        // --- server ----------------------------------------------------------
        let s = &self.server;
        let listen = c.addr("server.listen", &s.listen, "0.0.0.0:8080");
        let max_connections = s.max_connections.unwrap_or(10_000);
        if max_connections == 0 {
            c.err("server.max_connections", "must be at least 1");
        }
        let max_connections_per_ip = s.max_connections_per_ip.unwrap_or(256);
        if max_connections_per_ip == 0 {
            c.err("server.max_connections_per_ip", "must be at least 1");
        }
        let ip_limit = s
            .ip_limit
            .as_ref()
            .and_then(|l| c.limit("server.ip_limit", l));
        let header_read_timeout = c.duration(
            "server.header_read_timeout",
            &s.header_read_timeout,
            Duration::from_secs(10),
        );
        let max_header_bytes = c.size("server.max_header_bytes", &s.max_header_bytes, 16 * 1024);
        if !(8192..=1 << 20).contains(&max_header_bytes) {
            c.err(
                "server.max_header_bytes",
                format!("must be between 8KiB and 1MiB, got {max_header_bytes}"),
            );
        }
        let max_body_bytes = c.size("server.max_body_bytes", &s.max_body_bytes, 10 << 20);
        let idle_timeout = c.duration(
            "server.idle_timeout",
            &s.idle_timeout,
            Duration::from_secs(60),
        );
        let shutdown_grace = c.duration(
            "server.shutdown_grace",
            &s.shutdown_grace,
            Duration::from_secs(30),
        );
        for (name, d) in [
            ("server.header_read_timeout", header_read_timeout),
            ("server.idle_timeout", idle_timeout),
        ] {
            if d.is_zero() {
                c.err(name, "must be greater than 0");
            }
        }
        let mut trusted_proxies = Vec::new();
        for (i, p) in s.trusted_proxies.iter().enumerate() {
            let parsed = p
                .parse::<IpNet>()
                .or_else(|_| p.parse::<std::net::IpAddr>().map(IpNet::from));
            match parsed {
                Ok(net) => trusted_proxies.push(net),
                Err(_) => c.err(
                    format!("server.trusted_proxies[{i}]"),
                    format!("`{p}` is not an IP address or CIDR like `10.0.0.0/8`"),
                ),
            }
        }

        // --- admin -----------------------------------------------------------
        let admin_listen = c.addr("admin.listen", &self.admin.listen, "127.0.0.1:9090");
        let token_env = self
            .admin
            .token_env
            .clone()
            .unwrap_or_else(|| "TIERGATE_ADMIN_TOKEN".into());
        if token_env.is_empty() {
            c.err("admin.token_env", "must name an environment variable");
        }

        // --- upstream --------------------------------------------------------
        let url = match self.upstream.url.parse::<http::Uri>() {
            Ok(u)
                if u.scheme_str() == Some("http")
                    && u.authority().is_some()
                    && matches!(u.path(), "" | "/")
                    && u.query().is_none() =>
            {
                Some(u)
            }
            Ok(ref u) if u.scheme_str() == Some("https") => {
                c.err(
                    "upstream.url",
                    format!(
                        "`{}`: https upstreams are not supported yet; use http://",
                        self.upstream.url
                    ),
                );
                None
            }
            _ => {
                c.err(
                    "upstream.url",
                    format!(
                        "`{}` is not a valid upstream URL; expected `http://host:port` with no path",
                        self.upstream.url
                    ),
                );
                None
            }
        };
        let connect_timeout = c.duration(
            "upstream.connect_timeout",
            &self.upstream.connect_timeout,
            Duration::from_secs(1),
        );
        let up_timeout = c.duration(
            "upstream.timeout",
            &self.upstream.timeout,
            Duration::from_secs(30),
        );

        // --- identity --------------------------------------------------------
        let identity = match &self.identity {
            None => IdentityConfig {
                sources: vec![SourceConfig::Header {
                    name: HeaderName::from_static("x-tenant-id"),
                }],
                anonymous: Anonymous::Reject,
            },
            Some(raw) => validate_identity(&mut c, raw),
        };
        if identity.anonymous == Anonymous::Ip
            && !declared.is_empty()
            && !declared.contains(&"anonymous")
        {
            c.err(
                "identity.anonymous",
                format!("`ip` puts anonymous clients on tier `anonymous`, which is not defined; defined tiers: {known}"),
            );
        }

        // --- backend ---------------------------------------------------------
        let b = &self.backend;
        let kind = match b.kind.as_deref().unwrap_or("memory") {
            "memory" => {
                if b.redis.is_some() {
                    c.err("backend.redis", "set only with `backend.type: redis`");
                }
                Some(BackendKind::Memory)
            }
            "redis" => {
                let defaults = RawRedis {
                    url: None,
                    cluster: None,
                    key_prefix: None,
                    timeout: None,
                };
                validate_redis(&mut c, b.redis.as_ref().unwrap_or(&defaults))
                    .map(BackendKind::Redis)
            }
            other => {
                c.err(
                    "backend.type",
                    format!("unknown backend `{other}`; expected `memory` or `redis`"),
                );
                None
            }
        };
        let on_error = match b.on_error.as_deref().unwrap_or("local") {
            "local" => OnError::Local,
            "allow" => OnError::Allow,
            "deny" => OnError::Deny,
            other => {
                c.err(
                    "backend.on_error",
                    format!("unknown policy `{other}`; expected `local`, `allow` or `deny`"),
                );
                OnError::Local
            }
        };
        let state_file = b
            .state_file
            .clone()
            .unwrap_or_else(|| PathBuf::from("tiergate-state.json"));

        // --- routes ----------------------------------------------------------
        let mut routes = Vec::new();
        let min_burst = tiers
            .iter()
            .map(|t| t.limit.burst)
            .min()
            .unwrap_or(u32::MAX);
        for (i, r) in self.routes.iter().enumerate() {
            let path = format!("routes[{i}]");
            if !valid_name(&r.name) {
                c.err(
                    format!("{path}.name"),
                    format!(
                        "`{}`: route names are 1..=64 characters of [A-Za-z0-9_.-]",
                        r.name
                    ),
                );
            } else if matches!(r.name.as_str(), "tenant" | "ip" | "default") {
                c.err(
                    format!("{path}.name"),
                    format!(
                        "`{}` is reserved (it names a built-in bucket or label)",
                        r.name
                    ),
                );
            } else if self.routes[..i].iter().any(|o| o.name == r.name) {
                c.err(
                    format!("{path}.name"),
                    format!("duplicate route name `{}`", r.name),
                );
            }
            let m = &r.matcher;
            if m.path.is_none() && m.path_prefix.is_none() && m.methods.is_empty() {
                c.err(
                    format!("{path}.match"),
                    "give at least one of `path`, `path_prefix`, `methods`",
                );
            }
            for (field, v) in [("path", &m.path), ("path_prefix", &m.path_prefix)] {
                if let Some(p) = v
                    && !p.starts_with('/')
                {
                    c.err(
                        format!("{path}.match.{field}"),
                        format!("`{p}` must start with `/`"),
                    );
                }
            }
            let mut methods = Vec::new();
            for (j, meth) in m.methods.iter().enumerate() {
                match Method::from_bytes(meth.to_ascii_uppercase().as_bytes()) {
                    Ok(mm) => methods.push(mm),
                    Err(_) => c.err(
                        format!("{path}.match.methods[{j}]"),
                        format!("`{meth}` is not an HTTP method"),
                    ),
                }
            }
            let cost = match r.cost {
                None => 1,
                Some(n) if n < 1 => {
                    c.err(
                        format!("{path}.cost"),
                        format!("cost must be at least 1, got {n}"),
                    );
                    1
                }
                Some(n) if n > u32::MAX as i64 => {
                    c.err(format!("{path}.cost"), "cost is too large");
                    1
                }
                Some(n) => n as u32,
            };
            if r.exempt && (r.cost.is_some() || !r.limits.0.is_empty()) {
                c.err(
                    &path,
                    "an exempt route is never limited: remove `cost` and `limits`, or `exempt`",
                );
            }
            if !r.exempt && cost > min_burst {
                // The tenant bucket of any tier can apply to any route.
                let (smallest, burst) = tiers
                    .iter()
                    .min_by_key(|t| t.limit.burst)
                    .map(|t| (t.name.to_string(), t.limit.burst))
                    .unwrap_or_default();
                c.err(
                    format!("{path}.cost"),
                    format!(
                        "cost {cost} is greater than the burst {burst} of tier `{smallest}`: such requests could never be admitted"
                    ),
                );
            }
            let mut limits = vec![None; tiers.len()];
            for (tier, raw) in &r.limits.0 {
                let lpath = format!("{path}.limits.{tier}");
                let limit = c.limit(&lpath, raw);
                match tier_idx(tier) {
                    Some(t) => limits[t] = limit,
                    None => {
                        if !declared.is_empty() && !declared.contains(&tier.as_str()) {
                            c.err(
                                &lpath,
                                format!("unknown tier `{tier}`; defined tiers: {known}"),
                            );
                        }
                    }
                }
            }
            routes.push(Route {
                name: Arc::from(r.name.as_str()),
                matcher: RouteMatch {
                    path: m.path.clone(),
                    path_prefix: m.path_prefix.clone(),
                    methods,
                },
                cost,
                exempt: r.exempt,
                limits,
            });
        }

        // --- tenants ---------------------------------------------------------
        let mut tenants = HashMap::new();
        for (id, t) in &self.tenants.0 {
            let path = format!("tenants.{id}");
            if !crate::identity::TenantId::is_valid(id) {
                c.err(
                    &path,
                    "tenant ids are 1..=128 characters of [A-Za-z0-9._:@-]",
                );
                continue;
            }
            match tier_idx(&t.tier) {
                Some(i) => {
                    tenants.insert(id.clone(), i);
                }
                None => {
                    if !declared.is_empty() && !declared.contains(&t.tier.as_str()) {
                        c.err(
                            format!("{path}.tier"),
                            format!("unknown tier `{}`; defined tiers: {known}", t.tier),
                        );
                    }
                }
            }
        }

        let max_tenant_labels = self.metrics.max_tenant_labels.unwrap_or(100);

        if !c.errors.is_empty() {
            return Err(c.errors);
        }
        Ok(Config {
            server: ServerConfig {
                listen,
                max_connections,
                max_connections_per_ip,
                ip_limit,
                header_read_timeout,
                max_header_bytes: max_header_bytes as usize,
                max_body_bytes,
                idle_timeout,
                shutdown_grace,
                access_log: s.access_log.unwrap_or(false),
                trusted_proxies,
            },
            admin: AdminConfig {
                listen: admin_listen,
                token_env,
            },
            upstream: UpstreamConfig {
                url: url.expect("checked above"),
                connect_timeout,
                timeout: up_timeout,
            },
            identity,
            backend: BackendConfig {
                kind: kind.expect("checked above"),
                on_error,
                state_file,
            },
            tiers,
            default_tier: default_tier.expect("checked above"),
            routes,
            tenants,
            metrics: MetricsConfig { max_tenant_labels },
        })
    }
}

fn validate_identity(c: &mut Check, raw: &RawIdentity) -> IdentityConfig {
    let mut sources = Vec::new();
    if raw.sources.is_empty() && raw.anonymous.as_deref() != Some("ip") {
        c.err(
            "identity.sources",
            "give at least one source (`jwt` or `header`), or set `anonymous: ip` to limit by client address only",
        );
    }
    for (i, s) in raw.sources.iter().enumerate() {
        let path = format!("identity.sources[{i}]");
        match s {
            RawSource::Header { name } => {
                let name = name.as_deref().unwrap_or("x-tenant-id");
                if let Some(h) = c.header_name(&format!("{path}.name"), name) {
                    sources.push(SourceConfig::Header { name: h });
                }
            }
            RawSource::Jwt {
                header,
                algorithms,
                secret_env,
                public_key_file,
                jwks_file,
                issuer,
                audience,
                tenant_claim,
                tier_claim,
                leeway,
            } => {
                let header = c.header_name(
                    &format!("{path}.header"),
                    header.as_deref().unwrap_or("authorization"),
                );
                let mut algs = Vec::new();
                let names: Vec<String> = if algorithms.is_empty() {
                    vec!["HS256".into()]
                } else {
                    algorithms.clone()
                };
                for (j, a) in names.iter().enumerate() {
                    match parse_algorithm(a) {
                        Some(alg) => algs.push(alg),
                        None => c.err(
                            format!("{path}.algorithms[{j}]"),
                            format!("unsupported algorithm `{a}`; expected HS256/384/512, RS256/384/512, PS256/384/512, ES256/384 or EdDSA"),
                        ),
                    }
                }
                let key = match (secret_env, public_key_file, jwks_file) {
                    (Some(env), None, None) => Some(KeySource::SecretEnv(env.clone())),
                    (None, Some(f), None) => Some(KeySource::PublicKeyFile(f.clone())),
                    (None, None, Some(f)) => Some(KeySource::JwksFile(f.clone())),
                    (None, None, None) => {
                        c.err(
                            &path,
                            "no key material: give one of `secret_env`, `public_key_file`, `jwks_file`",
                        );
                        None
                    }
                    _ => {
                        c.err(
                            &path,
                            "give exactly one of `secret_env`, `public_key_file`, `jwks_file`",
                        );
                        None
                    }
                };
                if let Some(k) = &key {
                    let hmac = matches!(k, KeySource::SecretEnv(_));
                    for (j, a) in algs.iter().enumerate() {
                        if is_hmac(*a) != hmac {
                            c.err(
                                format!("{path}.algorithms[{j}]"),
                                format!(
                                    "`{a:?}` needs {}; HMAC and public-key algorithms cannot share a source",
                                    if is_hmac(*a) { "`secret_env`" } else { "`public_key_file` or `jwks_file`" }
                                ),
                            );
                        }
                    }
                }
                let leeway = c.duration(&format!("{path}.leeway"), leeway, Duration::from_secs(30));
                let tenant_claim = tenant_claim.clone().unwrap_or_else(|| "tenant_id".into());
                if tenant_claim.is_empty() {
                    c.err(format!("{path}.tenant_claim"), "must not be empty");
                }
                if let (Some(header), Some(key)) = (header, key) {
                    sources.push(SourceConfig::Jwt(JwtConfig {
                        header,
                        algorithms: algs,
                        key,
                        issuer: issuer.clone(),
                        audience: audience.clone(),
                        tenant_claim,
                        tier_claim: tier_claim.clone(),
                        leeway,
                    }));
                }
            }
        }
    }
    let anonymous = match raw.anonymous.as_deref().unwrap_or("reject") {
        "reject" => Anonymous::Reject,
        "ip" => Anonymous::Ip,
        other => {
            c.err(
                "identity.anonymous",
                format!("unknown mode `{other}`; expected `reject` or `ip`"),
            );
            Anonymous::Reject
        }
    };
    IdentityConfig { sources, anonymous }
}

fn validate_redis_url(c: &mut Check, path: &str, url: &str) -> bool {
    let ok = (url.starts_with("redis://") || url.starts_with("rediss://"))
        && url
            .parse::<http::Uri>()
            .is_ok_and(|u| u.authority().is_some());
    if !ok {
        c.err(
            path,
            format!("`{url}` is not a Redis URL; expected `redis://host:port/db`"),
        );
    }
    ok
}

fn validate_redis(c: &mut Check, r: &RawRedis) -> Option<RedisConfig> {
    let target = match (&r.url, &r.cluster) {
        (Some(url), None) => validate_redis_url(c, "backend.redis.url", url)
            .then(|| RedisTarget::Single(url.clone())),
        (None, Some(nodes)) if !nodes.is_empty() => {
            let mut ok = true;
            for (i, n) in nodes.iter().enumerate() {
                ok &= validate_redis_url(c, &format!("backend.redis.cluster[{i}]"), n);
            }
            ok.then(|| RedisTarget::Cluster(nodes.clone()))
        }
        (None, Some(_)) => {
            c.err("backend.redis.cluster", "list at least one node URL");
            None
        }
        (None, None) => Some(RedisTarget::Single("redis://127.0.0.1:6379/0".into())),
        (Some(_), Some(_)) => {
            c.err("backend.redis", "give either `url` or `cluster`, not both");
            None
        }
    };
    let key_prefix = r.key_prefix.clone().unwrap_or_else(|| "tiergate".into());
    if key_prefix.is_empty()
        || key_prefix.contains(['{', '}'])
        || key_prefix.contains(char::is_whitespace)
    {
        c.err(
            "backend.redis.key_prefix",
            "must be non-empty, without `{`, `}` or spaces (they would break the key layout)",
        );
    }
    let timeout = c.duration(
        "backend.redis.timeout",
        &r.timeout,
        Duration::from_millis(25),
    );
    if timeout.is_zero() {
        c.err("backend.redis.timeout", "must be greater than 0");
    }
    Some(RedisConfig {
        target: target?,
        key_prefix,
        timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "upstream: { url: \"http://127.0.0.1:3000\" }\ntiers:\n  free: { rate: 10/s, burst: 20 }\ndefault_tier: free\n";

    #[test]
    fn minimal_config_gets_spec_defaults() {
        let c = Config::from_yaml(MINIMAL).unwrap();
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.server.max_header_bytes, 16384);
        assert_eq!(c.server.max_body_bytes, 10 << 20);
        assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9090");
        assert!(matches!(c.backend.kind, BackendKind::Memory));
        assert_eq!(c.backend.on_error, OnError::Local);
        assert_eq!(c.identity.anonymous, Anonymous::Reject);
        assert!(
            matches!(&c.identity.sources[..], [SourceConfig::Header { name }] if name == "x-tenant-id")
        );
    }

    #[test]
    fn rates_parse_every_unit_and_fraction() {
        assert_eq!(Rate::parse("10/s").unwrap().per_second(), 10.0);
        assert_eq!(Rate::parse("60/min").unwrap().per_second(), 1.0);
        assert_eq!(Rate::parse("0.5/s").unwrap().per_second(), 0.5);
        assert_eq!(Rate::parse("24/day").unwrap().per_second(), 24.0 / 86400.0);
        assert_eq!(Rate::parse("1/m").unwrap().to_string(), "1/m");
        assert!(Rate::parse("0/s").is_err());
        assert!(Rate::parse("-1/s").is_err());
        assert!(Rate::parse("10").is_err());
        assert!(Rate::parse("10/w").is_err());
    }

    #[test]
    fn durations_and_sizes_parse() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5y").is_err());
        assert_eq!(parse_size("16KiB").unwrap(), 16384);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("1PiB").is_err());
    }

    #[test]
    fn collects_every_error_with_its_path() {
        let yaml = "upstream: { url: \"nope\" }\ntiers:\n  free: { rate: 0/s, burst: 0 }\ndefault_tier: gold\n";
        let e = Config::from_yaml(yaml).unwrap_err();
        let paths: Vec<_> = e.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "tiers.free.rate",
                "tiers.free.burst",
                "default_tier",
                "upstream.url"
            ]
        );
    }

    #[test]
    fn unknown_key_reports_path_and_line() {
        let yaml = "upstream: { url: \"http://a:1\" }\ntiers:\n  free: { rate: 1/s, burst: 1, brust: 2 }\ndefault_tier: free\n";
        let e = Config::from_yaml(yaml).unwrap_err();
        assert_eq!(e.errors.len(), 1);
        assert_eq!(e.errors[0].path, "tiers.free");
        assert_eq!(e.errors[0].line, Some(3));
        assert!(
            e.errors[0].message.contains("unknown field `brust`"),
            "{}",
            e.errors[0].message
        );
    }
}
