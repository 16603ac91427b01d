//! The request path, outermost first:
//!
//! 1. **route** — match the route once; exempt routes skip steps 3–6
//!    entirely (no identity read, nothing limited).
//! 2. **hardening** — reject a declared body over `max_body_bytes` (413)
//!    before any work, and resolve the real client address.
//! 3. **ip guard** — the optional `ip_limit` bucket, checked before identity
//!    so a flood of bogus tokens is stopped before paying for JWT
//!    verification.
//! 4. **identity** — JWT or header source; 401/400 here.
//! 5. **policy** — effective tier and the buckets this request touches.
//! 6. **limiter** — one atomic check-and-debit; 429 or `on_error` here.
//! 7. **upstream** — forward with tiergate's headers; 502/504/413 here.
//!
//! Every response tiergate produces itself goes through
//! [`ProxyError::to_response`] (the one error table); every decided
//! response carries the rate-limit headers of its most constraining bucket.
//! This is a plain async function rather than a tower stack: each step is a
//! few lines, the order is fixed, and the hot path stays free of boxed
//! futures.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HeaderName, HeaderValue};
use http::{Request, Response};
use http_body::Body as _;
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::error::ProxyError;
use crate::hardening::{LimitedBody, Tripped, client_ip};
use crate::identity::{Identifier, Identity, IdentityError, TenantId};
use crate::limiter::{BucketSpec, BucketState, Decision, Limiter, Outcome};
use crate::metrics::DecisionLabel;
use crate::proxy::{
    Affinity, Held, Hop, Upstream, UpstreamBody, UpstreamError, is_upgrade, strip_hop_by_hop,
};
use crate::server::watchdog::{InFlight, Watched};
use crate::{App, Live};

/// The body of every response the proxy returns.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

static X_TENANT_ID: HeaderName = HeaderName::from_static("x-tenant-id");
static X_TENANT_TIER: HeaderName = HeaderName::from_static("x-tenant-tier");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Label for requests that matched no route.
const NO_ROUTE: &str = "default";

/// One worker's request handler: shared state plus the worker's own
/// upstream pool and limiter connection.
pub struct Gate {
    app: Arc<App>,
    upstream: Upstream,
    limiter: Limiter,
}

impl Gate {
    /// A handler for one worker runtime.
    pub fn new(app: Arc<App>, upstream: Upstream, limiter: Limiter) -> Gate {
        Gate {
            app,
            upstream,
            limiter,
        }
    }

    /// Handles one request that came on `conn`, writing the access log line when
    /// `server.access_log` is on.
    ///
    /// hyper moves this future into place for every request, so its size
    /// is paid per request: the access-log data sits behind one pointer
    /// (no allocation when the log is off), steps 1-6 (`admit`) and the upstream
    /// call each have one call site here, and step 7's work before and
    /// after that call is plain functions rather than a layer of its own
    /// (each layer keeps its own copy of the request). It is also hyper's
    /// service future itself, so it holds `_in_flight` (the watchdog's
    /// count of the connection's requests) until the response is made,
    /// and never fails: every error is a response.
    pub async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        conn: Arc<ClientConn>,
        _in_flight: InFlight,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let conn = &*conn;
        // One snapshot of the config for the whole request.
        let live = self.app.live.load_full();
        let mut logged = live.policy.config().server.access_log.then(|| {
            Box::new(Logged {
                started: Instant::now(),
                method: req.method().clone(),
                path: req.uri().path().to_owned(),
                record: AccessRecord::default(),
            })
        });
        let mut record = logged.as_deref_mut().map(|l| &mut l.record);
        let resp = match self.admit(&live, &mut req, conn, &mut record).await {
            Ok(shown) => {
                // 7. upstream: one call site, and no layer of its own
                let limit = live.policy.config().server.max_body_bytes;
                let tripped = Tripped::for_body(req.body().is_end_stream());
                let req = self.upstream_request(req, limit, &tripped, conn, &mut record);
                let started = Instant::now();
                let affinity = Some((&conn.upstream, &*conn.watched));
                let result = self.upstream.forward(req, &tripped, affinity).await;
                self.upstream_response(result, started, shown.as_ref(), conn, &mut record)
            }
            Err(refused) => refused,
        };
        let Some(l) = logged else {
            return Ok(resp);
        };
        let r = &l.record;
        let decision = resp
            .headers()
            .get(crate::error::TIERGATE_ERROR)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(if r.exempt { "exempt" } else { "allowed" });
        tracing::info!(
            target: "tiergate::access",
            request_id = r.request_id.as_deref().unwrap_or("-"),
            peer = %conn.peer.ip(),
            method = %l.method,
            path = %l.path,
            tenant = r.tenant.as_ref().map_or("-", |t| t.as_str()),
            tier = r.tier.as_deref().unwrap_or("-"),
            route = r.route.as_deref().unwrap_or(NO_ROUTE),
            decision,
            status = resp.status().as_u16(),
            duration_ms = l.started.elapsed().as_secs_f64() * 1e3,
            upstream_ms = r.upstream_ms,
            "access"
        );
        Ok(resp)
    }

    /// Admits `req` or returns its refusal. Admitted, the request's headers
    /// are ready for the upstream, and the result is the bucket state to
    /// show the client (`None`: nothing to show, e.g. an exempt route).
    async fn admit(
        &self,
        live: &Live,
        req: &mut Request<Incoming>,
        conn: &ClientConn,
        record: &mut Option<&mut AccessRecord>,
    ) -> Result<Option<BucketState>, Response<ProxyBody>> {
        let policy = &live.policy;
        let cfg = policy.config();

        // 1. route
        let route_idx = policy.route(req.method(), req.uri().path());
        let route = route_idx.map(|i| &cfg.routes[i]);
        let route_label: &str = route.map_or(NO_ROUTE, |r| &r.name);
        if let Some(r) = record.as_mut() {
            r.route = route.map(|r| r.name.clone());
            r.exempt = route.is_some_and(|r| r.exempt);
            // The client's id, so refused requests can be found by it too.
            r.request_id = req
                .headers()
                .get(&X_REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
        }

        // 2. hardening
        let declared_len = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared_len.is_some_and(|n| n > cfg.server.max_body_bytes) {
            return Err(self.refuse(live, conn, ProxyError::BodyTooLarge, None, route_idx, None));
        }
        let peer = conn.peer;
        let ip = client_ip(peer, req.headers(), &cfg.server.trusted_proxies);
        let peer_trusted = cfg
            .server
            .trusted_proxies
            .iter()
            .any(|n| n.contains(&peer.ip()));

        if route.is_some_and(|r| r.exempt) {
            // No identity was established: the upstream must not see a
            // client-supplied tenant as if tiergate had vouched for it.
            set_forwarding_headers(req, conn, peer_trusted);
            req.headers_mut().remove(&X_TENANT_TIER);
            req.headers_mut().remove(&X_TENANT_ID);
            return Ok(None);
        }

        // 3. ip guard
        let mut ip_debit: Option<(TenantId, &BucketSpec, BucketState)> = None;
        if let Some(spec) = policy.ip_bucket() {
            let key = TenantId::for_ip(ip);
            match self.app.ip_limiter.check(&key, std::slice::from_ref(spec)) {
                Decision::Allow { state } => ip_debit = Some((key, spec, state)),
                Decision::Deny { state, retry_after } => {
                    let err = ProxyError::RateLimited {
                        tenant: None,
                        tier: None,
                        route: None,
                        retry_after,
                    };
                    return Err(self.refuse(live, conn, err, None, route_idx, Some(&state)));
                }
            }
        }

        // 4. identity (an ip token spent here stays spent: the guard exists
        //    to make floods of bad credentials pay)
        let identity = match conn.identify(&live.identifier, req.headers(), ip) {
            Ok(id) => id,
            Err(e) => {
                let state = ip_debit.as_ref().map(|(_, _, s)| s);
                return Err(self.refuse(live, conn, e.into(), None, route_idx, state));
            }
        };

        // 5. policy
        let ov = self.app.overrides.get(&identity.tenant);
        let ov_tier = ov.as_ref().and_then(|o| o.tier.as_deref()).and_then(|t| {
            let idx = cfg.tier_index(t);
            if idx.is_none() {
                // Overridden to a tier a later reload removed.
                self.app.metrics.unknown_tier.inc();
            }
            idx
        });
        let (tier, _source) = policy.resolve_tier(&identity, ov_tier);
        if let Some(claimed) = &identity.claimed_tier {
            match cfg.tier_index(claimed) {
                Some(_) => self.app.claims.record(&identity.tenant, claimed),
                None => self.app.metrics.unknown_tier.inc(),
            }
        }
        let tier_name = &cfg.tiers[tier].name;
        if let Some(r) = record.as_mut() {
            r.tenant = Some(identity.tenant.clone());
            r.tier = Some(tier_name.clone());
        }
        let buckets = policy.buckets_with(route_idx, tier, ov.as_deref());

        // 6. limiter
        let state = match self.limiter.check(&identity.tenant, &buckets).await {
            Outcome::Decided(Decision::Allow { state }) => Some(state),
            Outcome::Decided(Decision::Deny { state, retry_after }) => {
                if let Some((key, spec, _)) = &ip_debit {
                    self.app.ip_limiter.refund(key, spec);
                }
                tracing::debug!(tenant = %identity.tenant, tier = %tier_name, route = route_label, bucket = %state.name, "throttled");
                self.app
                    .metrics
                    .throttled(identity.tenant.as_str(), tier_name);
                let err = ProxyError::RateLimited {
                    tenant: Some(identity.tenant.clone()),
                    tier: Some(tier_name.clone()),
                    route: route.map(|r| r.name.clone()),
                    retry_after,
                };
                return Err(self.refuse(live, conn, err, Some(tier), route_idx, Some(&state)));
            }
            Outcome::FailOpen => None,
            Outcome::Unavailable => {
                if let Some((key, spec, _)) = &ip_debit {
                    self.app.ip_limiter.refund(key, spec);
                }
                return Err(self.refuse(
                    live,
                    conn,
                    ProxyError::LimiterUnavailable,
                    Some(tier),
                    route_idx,
                    None,
                ));
            }
        };
        if let Some(s) = &state
            && s.remaining * 10 < s.burst as u64
        {
            self.app
                .metrics
                .near_limit(identity.tenant.as_str(), tier_name);
        }
        let shown = match (state, ip_debit) {
            (Some(s), Some((_, _, ip_state))) if ip_state.remaining < s.remaining => Some(ip_state),
            (Some(s), _) => Some(s),
            (None, ip) => ip.map(|(_, _, s)| s),
        };
        live.counters
            .get(route_idx, Some(tier), DecisionLabel::Allowed)
            .inc();

        // 7. upstream
        set_forwarding_headers(req, conn, peer_trusted);
        let h = req.headers_mut();
        h.insert(&X_TENANT_TIER, live.tier_header(tier));
        if let Some(v) = conn.tenant_header(&identity.tenant) {
            h.insert(&X_TENANT_ID, v);
        }
        Ok(shown)
    }

    /// Step 7, before the upstream call: `req` as the upstream gets it, its
    /// body capped at `limit` bytes (`tripped` flips past the cap) and, if
    /// it has one, keeping the request in flight for the watchdog until it
    /// ends. Records the request id for the access log.
    fn upstream_request(
        &self,
        req: Request<Incoming>,
        limit: u64,
        tripped: &Tripped,
        conn: &ClientConn,
        record: &mut Option<&mut AccessRecord>,
    ) -> Request<UpstreamBody> {
        if let Some(r) = record.as_mut() {
            r.request_id = req
                .headers()
                .get(&X_REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
        }
        req.map(|b| {
            let body = LimitedBody::new(b, limit, tripped.clone());
            if body.is_end_stream() {
                body
            } else {
                body.in_flight(InFlight::start(conn.watched.clone()))
            }
        })
    }

    /// Step 7, after the upstream call (sent at `started`): the client's
    /// response (an upstream failure becomes the SPEC's 502, 504 or 413),
    /// with the rate-limit headers of `state`. Observes the upstream
    /// histogram and records the upstream time for the access log.
    fn upstream_response(
        &self,
        result: Result<Response<Incoming>, UpstreamError>,
        started: Instant,
        state: Option<&BucketState>,
        conn: &ClientConn,
        record: &mut Option<&mut AccessRecord>,
    ) -> Response<ProxyBody> {
        let mut resp = match result {
            Ok(resp) => {
                let took = started.elapsed().as_secs_f64();
                if let Some(r) = record.as_mut() {
                    r.upstream_ms = took * 1e3;
                }
                self.app
                    .metrics
                    .upstream_histogram(resp.status().as_u16())
                    .observe(took);
                resp.map(Either::Left)
            }
            Err(e) => {
                let err = match &e {
                    UpstreamError::Timeout => ProxyError::GatewayTimeout,
                    UpstreamError::BodyTooLarge => ProxyError::BodyTooLarge,
                    UpstreamError::Unreachable(_) => ProxyError::BadGateway,
                };
                if !matches!(e, UpstreamError::BodyTooLarge) {
                    tracing::warn!(error = %e, "upstream request failed");
                    self.app
                        .metrics
                        .upstream_histogram(err.parts().0.as_u16())
                        .observe(started.elapsed().as_secs_f64());
                }
                err.to_response().map(Either::Right)
            }
        };
        if let Some(s) = state {
            rate_limit_headers(resp.headers_mut(), s, conn);
        }
        resp
    }

    fn refuse(
        &self,
        live: &Live,
        conn: &ClientConn,
        err: ProxyError,
        tier: Option<usize>,
        route: Option<usize>,
        state: Option<&BucketState>,
    ) -> Response<ProxyBody> {
        live.counters.get(route, tier, err.decision()).inc();
        let mut resp = err.to_response().map(Either::Right);
        if let Some(s) = state {
            rate_limit_headers(resp.headers_mut(), s, conn);
        }
        resp
    }
}

/// A request's access log line in the making: what it is known by from
/// the start, and what the request path records on the way.
struct Logged {
    started: Instant,
    method: http::Method,
    path: String,
    record: AccessRecord,
}

/// What the access log line needs from inside the request path.
#[derive(Default)]
struct AccessRecord {
    request_id: Option<String>,
    tenant: Option<TenantId>,
    tier: Option<Arc<str>>,
    route: Option<Arc<str>>,
    exempt: bool,
    upstream_ms: f64,
}

/// Removes the client's hop-by-hop headers, then sets `x-forwarded-for`
/// (appended when the peer is a trusted proxy, replaced otherwise),
/// `x-forwarded-proto` and `x-request-id`. Stripping first means a
/// client's `Connection` cannot name away the headers tiergate adds (these
/// and the tenant pair the caller adds next).
fn set_forwarding_headers<B>(req: &mut Request<B>, conn: &ClientConn, peer_trusted: bool) {
    let upgrade = is_upgrade(req);
    strip_hop_by_hop(req.headers_mut(), Hop::Request { upgrade });
    let h = req.headers_mut();
    // Room for these three and the two tenant headers the caller adds.
    h.reserve(5);
    let appended = match (
        peer_trusted,
        h.get(&X_FORWARDED_FOR)
            .and_then(|v| v.to_str().ok())
            .map(str::as_bytes),
    ) {
        (true, Some(prev)) if !prev.is_empty() => {
            let peer = conn.peer_header.as_bytes();
            let mut v = Vec::with_capacity(prev.len() + 2 + peer.len());
            v.extend_from_slice(prev);
            v.extend_from_slice(b", ");
            v.extend_from_slice(peer);
            HeaderValue::from_maybe_shared(Bytes::from(v)).ok()
        }
        _ => None,
    };
    h.insert(
        &X_FORWARDED_FOR,
        appended.unwrap_or_else(|| conn.peer_header.clone()),
    );
    h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    let keep = h
        .get(&X_REQUEST_ID)
        .is_some_and(|v| !v.is_empty() && v.len() <= 200);
    if !keep {
        h.insert(&X_REQUEST_ID, request_id());
    }
}

/// A unique-enough request id: a process-random prefix and a counter, 32
/// lowercase hex digits.
fn request_id() -> HeaderValue {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| {
        use std::hash::{BuildHasher, RandomState};
        RandomState::new().hash_one(std::process::id())
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 32];
    for (i, word) in [seed, n].into_iter().enumerate() {
        for j in 0..16 {
            out[i * 16 + j] = HEX[((word >> (60 - 4 * j)) & 0xf) as usize];
        }
    }
    HeaderValue::from_bytes(&out).expect("hex is a valid header")
}

/// Adds the legacy `X-RateLimit-*` trio and the IETF structured pair,
/// without going through `format!` (this runs on every decided request).
/// The values come from `conn`'s memo when its last response showed the
/// same bucket in the same state (see [`Memo`]).
fn rate_limit_headers(h: &mut http::HeaderMap, s: &BucketState, conn: &ClientConn) {
    let v = conn.rate_limit_values(s);
    // One growth of the map for the five, not one per insert.
    h.reserve(5);
    h.insert(&X_RATELIMIT_LIMIT, v.limit);
    h.insert(&X_RATELIMIT_REMAINING, v.remaining);
    h.insert(&X_RATELIMIT_RESET, v.reset);
    if let Some(p) = v.policy {
        h.insert(&RATELIMIT_POLICY, p);
    }
    if let Some(r) = v.ratelimit {
        h.insert(&RATELIMIT, r);
    }
}

/// The five rate-limit header values of one bucket state.
#[derive(Clone)]
struct RateLimitValues {
    limit: HeaderValue,
    remaining: HeaderValue,
    reset: HeaderValue,
    /// `None` only for a bucket name that is not a valid header value.
    policy: Option<HeaderValue>,
    ratelimit: Option<HeaderValue>,
}

/// `"<name>"<ka><a><kb><b>`, e.g. `"tenant";r=9;t=1`, shared from the
/// start (see [`crate::error::shared_value`]).
fn structured(name: &str, ka: &[u8], a: u64, kb: &[u8], b: u64) -> Option<HeaderValue> {
    let mut fa = itoa::Buffer::new();
    let mut fb = itoa::Buffer::new();
    crate::error::shared_value(&[
        b"\"",
        name.as_bytes(),
        b"\"",
        ka,
        fa.format(a).as_bytes(),
        kb,
        fb.format(b).as_bytes(),
    ])
}

/// What the request path knows of the client connection a request came on.
pub struct ClientConn {
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The peer's address as an `x-forwarded-for` value, made once.
    peer_header: HeaderValue,
    /// The connection's own upstream connection slot.
    pub upstream: Affinity,
    /// The worker's watch over this connection (its upstream deadline).
    pub watched: Arc<Watched>,
    /// Header values this connection's last request used.
    memo: Mutex<Memo>,
}

/// The tenant id and header values kept from a connection's last request
/// for its next one. A client's keep-alive connection usually carries one
/// tenant limited by one bucket, so its tenant id and its `X-Tenant-Id`,
/// `X-RateLimit-Limit` and `RateLimit-Policy` values repeat; and a tenant
/// requesting more slowly than its bucket refills finds it as full at
/// each request as at the last, so the remaining count, the reset and the
/// `RateLimit` value repeat too. Reusing a value is a reference-count
/// increment where making it is an allocation, its formatting and
/// validation, and a free. A connection that switches tenant, bucket or
/// state makes the new values once and keeps them instead. (The lock is
/// never contended: a connection's requests run on one worker thread.)
#[derive(Default)]
struct Memo {
    /// The last tenant, and its `X-Tenant-Id` value once one was made
    /// (a refused request makes none).
    tenant: Option<(TenantId, Option<HeaderValue>)>,
    shown: Option<ShownMemo>,
}

/// The rate-limit header values last shown, with what they were made
/// from. The name is held, so a pointer match is always the same name.
struct ShownMemo {
    name: Arc<str>,
    burst: u32,
    /// Whole seconds, as shown.
    window: u64,
    remaining: u64,
    /// Whole seconds, as shown.
    reset: u64,
    values: RateLimitValues,
}

impl ClientConn {
    /// The context of a connection accepted from `peer` by the worker
    /// whose upstream connections `held` counts, watched by `watched`.
    pub fn new(peer: SocketAddr, held: Held, watched: Arc<Watched>) -> ClientConn {
        ClientConn {
            peer,
            peer_header: HeaderValue::from_str(&peer.ip().to_string())
                .expect("an IP address is a valid header value"),
            upstream: Affinity::new(held),
            watched,
            memo: Mutex::default(),
        }
    }

    fn memo(&self) -> std::sync::MutexGuard<'_, Memo> {
        self.memo.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Identifies the tenant of a request on this connection (from
    /// `client_ip`): a request naming the connection's last tenant gets
    /// that tenant's id again, without allocating and validating a copy.
    fn identify(
        &self,
        identifier: &Identifier,
        headers: &http::HeaderMap,
        client_ip: std::net::IpAddr,
    ) -> Result<Identity, IdentityError> {
        let mut memo = self.memo();
        let known = memo.tenant.as_ref().map(|(t, _)| t);
        let identity = identifier.identify(headers, client_ip, known)?;
        if known != Some(&identity.tenant) {
            memo.tenant = Some((identity.tenant.clone(), None));
        }
        Ok(identity)
    }

    /// `tenant` as an `X-Tenant-Id` value (`None`: not a valid header value,
    /// which a valid tenant id always is).
    fn tenant_header(&self, tenant: &TenantId) -> Option<HeaderValue> {
        let mut memo = self.memo();
        if let Some((t, v)) = &mut memo.tenant
            && t == tenant
        {
            if let Some(v) = v {
                return Some(v.clone());
            }
            let made = crate::error::shared_value(&[tenant.as_str().as_bytes()])?;
            *v = Some(made.clone());
            return Some(made);
        }
        let v = crate::error::shared_value(&[tenant.as_str().as_bytes()])?;
        memo.tenant = Some((tenant.clone(), Some(v.clone())));
        Some(v)
    }

    /// The rate-limit header values of `s`: from the memo where it shows
    /// the same bucket (the limit and policy) in the same state (the rest).
    fn rate_limit_values(&self, s: &BucketState) -> RateLimitValues {
        let reset = s.reset.as_secs_f64().ceil() as u64;
        let window = s.window.as_secs_f64().ceil() as u64;
        let mut memo = self.memo();
        let same_bucket = memo.shown.as_ref().is_some_and(|m| {
            Arc::ptr_eq(&m.name, &s.name) && m.burst == s.burst && m.window == window
        });
        if let Some(m) = memo.shown.as_mut().filter(|_| same_bucket) {
            if m.remaining != s.remaining || m.reset != reset {
                m.remaining = s.remaining;
                m.reset = reset;
                m.values.remaining = crate::error::number(s.remaining);
                m.values.reset = crate::error::number(reset);
                m.values.ratelimit = structured(&s.name, b";r=", s.remaining, b";t=", reset);
            }
            return m.values.clone();
        }
        let burst = u64::from(s.burst);
        let values = RateLimitValues {
            limit: crate::error::number(burst),
            remaining: crate::error::number(s.remaining),
            reset: crate::error::number(reset),
            policy: structured(&s.name, b";q=", burst, b";w=", window),
            ratelimit: structured(&s.name, b";r=", s.remaining, b";t=", reset),
        };
        memo.shown = Some(ShownMemo {
            name: s.name.clone(),
            burst: s.burst,
            window,
            remaining: s.remaining,
            reset,
            values: values.clone(),
        });
        values
    }
}
