//! Micro-benchmarks of one admission decision, piece by piece:
//!
//! * `identity` — header source; JWT verification (HS256, and RS256 and
//!   ES256 with the test fixtures' keys), and a token remembered from an
//!   earlier request;
//! * `policy` — route match + tier resolution + bucket lookup (10 routes,
//!   5 tiers);
//! * `memory` — `MemoryLimiter::check` for one tenant and across 100k
//!   tenants (always on the admitted path: the rate is huge);
//! * `redis` — `RedisLimiter::check` against a `redis-server` this bench
//!   spawns on a free loopback port (skipped with a note when it is not
//!   installed): sequentially, 64 decisions of 64 tenants in flight per
//!   iteration, and 64 of one tenant;
//! * `redis_cluster` — the same against a Redis Cluster you started, when
//!   `DECISION_REDIS_CLUSTER` lists its nodes (`redis://127.0.0.1:7000,...`).
//!
//! Every group reports throughput in decisions (`Throughput::Elements`).
//!
//! ```text
//! cargo bench --bench decision                 # full run
//! cargo bench --bench decision -- --quick      # a few minutes at most
//! cargo bench --bench decision -- memory       # one group
//! DECISION_REDIS_CLUSTER=redis://127.0.0.1:7000,redis://127.0.0.1:7001 \
//!   cargo bench --bench decision -- redis_cluster
//! ```

#[path = "e2e/procs.rs"]
mod procs;

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group};
use http::{HeaderMap, HeaderValue, Method};
use tiergate::config::{BackendKind, Config, SourceConfig};
use tiergate::identity::jwt::JwtSource;
use tiergate::identity::{Identifier, Identity, IdentitySource, TenantId};
use tiergate::limiter::{BucketSpec, Decision, MemoryLimiter, RedisLimiter};
use tiergate::policy::Policy;

const SECRET: &str = "bench-secret-0123456789abcdef";
const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Five tiers, ten routes (a few with per-route limits), a JWT source then
/// a header source. `huge` is the rate of every tier: big enough that every
/// benchmarked decision is admitted.
fn config_yaml(backend: &str) -> String {
    let huge = "rate: 100000000/s, burst: 1000000000";
    format!(
        r#"
upstream: {{ url: "http://127.0.0.1:1" }}
identity:
  sources:
    - type: jwt
      header: authorization
      algorithms: [HS256]
      secret_env: BENCH_JWT_SECRET
      tenant_claim: tenant_id
      tier_claim: tier
    - type: header
      name: x-tenant-id
{backend}
tiers:
  anonymous:    {{ {huge} }}
  free:         {{ {huge} }}
  starter:      {{ {huge} }}
  professional: {{ {huge} }}
  enterprise:   {{ {huge} }}
default_tier: free
routes:
  - {{ name: health, match: {{ path: "/health" }}, exempt: true }}
  - {{ name: login, match: {{ path: "/api/login", methods: [POST] }}, cost: 2 }}
  - {{ name: search, match: {{ path_prefix: "/api/search", methods: [GET] }}, cost: 2 }}
  - {{ name: upload, match: {{ path_prefix: "/api/upload", methods: [POST, PUT] }}, cost: 3 }}
  - name: export
    match: {{ path_prefix: "/api/export", methods: [POST] }}
    cost: 5
    limits: {{ free: {{ {huge} }}, starter: {{ {huge} }} }}
  - {{ name: reports, match: {{ path_prefix: "/api/reports" }}, cost: 2 }}
  - {{ name: users, match: {{ path_prefix: "/api/users", methods: [GET, POST, DELETE] }} }}
  - {{ name: billing, match: {{ path_prefix: "/api/billing" }}, cost: 4 }}
  - {{ name: webhooks, match: {{ path_prefix: "/api/webhooks", methods: [POST] }} }}
  - name: orders
    match: {{ path_prefix: "/api/orders" }}
    limits: {{ free: {{ {huge} }}, professional: {{ {huge} }} }}
tenants:
  acme: {{ tier: enterprise }}
  globex: {{ tier: starter }}
  initech: {{ tier: professional }}
"#
    )
}

fn config(backend: &str) -> Config {
    Config::from_yaml(&config_yaml(backend)).unwrap_or_else(|e| panic!("bench config: {e}"))
}

fn env(name: &str) -> Option<String> {
    (name == "BENCH_JWT_SECRET").then(|| SECRET.to_string())
}

fn tenant(s: &str) -> TenantId {
    TenantId::parse(s).expect("valid tenant id")
}

fn identity(c: &mut Criterion) {
    let cfg = config("");
    let identifier = Identifier::new(&cfg.identity, &env).expect("identifier");
    let mut g = c.benchmark_group("identity");
    g.throughput(Throughput::Elements(1));

    let mut headers = HeaderMap::new();
    headers.insert("x-tenant-id", HeaderValue::from_static("acme"));
    headers.insert("accept", HeaderValue::from_static("application/json"));
    headers.insert("user-agent", HeaderValue::from_static("bench/1.0"));
    g.bench_function("header", |b| {
        b.iter(|| {
            let id = identifier.identify(black_box(&headers), CLIENT, None);
            black_box(id.expect("identified"))
        })
    });
    // The usual keep-alive case: the connection's last request named the
    // same tenant, whose id is reused.
    let known = tenant("acme");
    g.bench_function("header_known", |b| {
        b.iter(|| {
            let id = identifier.identify(black_box(&headers), CLIENT, Some(&known));
            black_box(id.expect("identified"))
        })
    });

    #[derive(serde::Serialize)]
    struct Claims<'a> {
        tenant_id: &'a str,
        tier: &'a str,
        exp: u64,
        iat: u64,
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &Claims {
            tenant_id: "acme",
            tier: "enterprise",
            exp: now + 24 * 3600,
            iat: now,
        },
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign token");
    let mut jwt_headers = headers.clone();
    jwt_headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).expect("header value"),
    );
    let id = identifier
        .identify(&jwt_headers, CLIENT, None)
        .expect("the signed token verifies");
    assert_eq!(id.source, IdentitySource::Jwt);
    assert_eq!(id.claimed_tier.as_deref(), Some("enterprise"));
    // Full verification, as for a token not seen before (requests go
    // through `identify`, which remembers the tokens that verified).
    let jwt_source = |cfg: &Config| match &cfg.identity.sources[0] {
        SourceConfig::Jwt(j) => JwtSource::from_config(j, &env).expect("jwt source"),
        SourceConfig::Header { .. } => unreachable!("the first source is the JWT one"),
    };
    let hs256 = jwt_source(&cfg);
    let value = jwt_headers.get("authorization").expect("set above").clone();
    g.bench_function("jwt_hs256_verify", |b| {
        b.iter(|| black_box(hs256.verify(black_box(&value)).expect("verified")))
    });

    // Public-key tokens, as an identity provider issues them (the test
    // fixtures' 2048-bit RSA and P-256 keys).
    let claims = Claims {
        tenant_id: "acme",
        tier: "enterprise",
        exp: now + 24 * 3600,
        iat: now,
    };
    for (name, alg, public, private) in [
        ("jwt_rs256", "RS256", "rsa_public.pem", "rsa_private.pem"),
        ("jwt_es256", "ES256", "ec_public.pem", "ec_private.pem"),
    ] {
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt");
        let yaml = format!(
            "upstream: {{ url: \"http://127.0.0.1:1\" }}\n\
             identity:\n  sources:\n    - type: jwt\n      header: authorization\n      \
             algorithms: [{alg}]\n      public_key_file: {fixtures}/{public}\n      \
             tenant_claim: tenant_id\n      tier_claim: tier\n\
             tiers:\n  free: {{ rate: 1/s, burst: 1 }}\ndefault_tier: free\n"
        );
        let cfg = Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("{name} config: {e}"));
        let identifier = Identifier::new(&cfg.identity, &env).expect("identifier");
        let pem = std::fs::read(format!("{fixtures}/{private}")).expect("fixture key");
        let (key, alg) = match alg {
            "RS256" => (
                jsonwebtoken::EncodingKey::from_rsa_pem(&pem),
                jsonwebtoken::Algorithm::RS256,
            ),
            _ => (
                jsonwebtoken::EncodingKey::from_ec_pem(&pem),
                jsonwebtoken::Algorithm::ES256,
            ),
        };
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(alg),
            &claims,
            &key.expect("fixture key parses"),
        )
        .expect("sign token");
        let mut headers = headers.clone();
        headers.insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}")).expect("header value"),
        );
        let source = jwt_source(&cfg);
        let value = headers.get("authorization").expect("set above").clone();
        g.bench_function(format!("{name}_verify"), |b| {
            b.iter(|| black_box(source.verify(black_box(&value)).expect("verified")))
        });
        // A client's next request with the same token: remembered.
        identifier
            .identify(&headers, CLIENT, None)
            .expect("the signed token verifies");
        g.bench_function(format!("{name}_remembered"), |b| {
            b.iter(|| {
                let id = identifier.identify(black_box(&headers), CLIENT, None);
                black_box(id.expect("verified"))
            })
        });
        // The same token on two threads at once, as tiergate's two workers
        // serve one busy client: time per lookup on each thread.
        if name == "jwt_rs256" {
            g.bench_function(format!("{name}_remembered_2_threads"), |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    std::thread::scope(|s| {
                        for _ in 0..2 {
                            s.spawn(|| {
                                for _ in 0..iters {
                                    let id = identifier.identify(black_box(&headers), CLIENT, None);
                                    black_box(id.expect("verified"));
                                }
                            });
                        }
                    });
                    start.elapsed()
                })
            });
        }
    }
    g.finish();
}

fn policy(c: &mut Criterion) {
    let policy = Policy::new(Arc::new(config("")));
    let id = Identity {
        tenant: tenant("initech"),
        claimed_tier: None,
        source: IdentitySource::Header,
    };
    let mut g = c.benchmark_group("policy");
    g.throughput(Throughput::Elements(1));
    // Matches the 10th (last) route: the worst case of first-match-wins.
    let method = Method::GET;
    let path = "/api/orders/12345/items";
    assert_eq!(policy.route(&method, path), Some(9));
    g.bench_function("route_tier_buckets_last_route", |b| {
        b.iter(|| {
            let route = policy.route(black_box(&method), black_box(path));
            let (tier, _) = policy.resolve_tier(black_box(&id), None);
            black_box(policy.buckets(route, tier).len())
        })
    });
    // No route matches: every matcher is tried, then the default plan.
    let miss = "/v2/unmatched/path";
    g.bench_function("route_tier_buckets_no_match", |b| {
        b.iter(|| {
            let route = policy.route(black_box(&method), black_box(miss));
            let (tier, _) = policy.resolve_tier(black_box(&id), None);
            black_box(policy.buckets(route, tier).len())
        })
    });
    g.finish();
}

fn plan(policy: &Policy, method: &Method, path: &str, t: &Identity) -> Vec<BucketSpec> {
    let route = policy.route(method, path);
    let (tier, _) = policy.resolve_tier(t, None);
    policy.buckets(route, tier).to_vec()
}

fn assert_allowed(d: &Decision) {
    assert!(matches!(d, Decision::Allow { .. }), "expected Allow: {d:?}");
}

const TENANTS: usize = 100_000;

fn memory(c: &mut Criterion) {
    let policy = Policy::new(Arc::new(config("")));
    let acme = Identity {
        tenant: tenant("acme"),
        claimed_tier: None,
        source: IdentitySource::Header,
    };
    let one = plan(&policy, &Method::GET, "/api/users/1", &acme);
    assert_eq!(one.len(), 1);
    let free = Identity {
        tenant: tenant("someone"),
        claimed_tier: None,
        source: IdentitySource::Header,
    };
    let two = plan(&policy, &Method::GET, "/api/orders/1", &free);
    assert_eq!(two.len(), 2, "orders has a route bucket on the free tier");
    let tenants: Vec<TenantId> = (0..TENANTS).map(|i| tenant(&format!("t{i}"))).collect();

    let mut g = c.benchmark_group("memory");
    g.throughput(Throughput::Elements(1));

    let limiter = MemoryLimiter::new();
    assert_allowed(&limiter.check(&acme.tenant, &one));
    g.bench_function("one_tenant", |b| {
        b.iter(|| black_box(limiter.check(black_box(&acme.tenant), &one)))
    });
    g.bench_function("one_tenant_two_buckets", |b| {
        b.iter(|| black_box(limiter.check(black_box(&free.tenant), &two)))
    });
    assert_allowed(&limiter.check(&acme.tenant, &one));

    let limiter = MemoryLimiter::new();
    // Populate every tenant first so the measurement is the steady state
    // of a map holding 100k tenants, not its growth.
    for t in &tenants {
        assert_allowed(&limiter.check(t, &one));
    }
    assert_eq!(limiter.len(), TENANTS);
    let mut i = 0usize;
    g.bench_function("100k_tenants", |b| {
        b.iter(|| {
            i = if i + 1 == TENANTS { 0 } else { i + 1 };
            black_box(limiter.check(&tenants[i], &one))
        })
    });
    g.finish();
}

const CONCURRENCY: usize = 64;

fn redis(c: &mut Criterion) {
    let Some(server) = procs::Redis::start() else {
        eprintln!("note: skipping the `redis` group (no redis-server on PATH)");
        return;
    };
    let backend = format!(
        "backend:\n  type: redis\n  redis:\n    url: \"{}\"\n    timeout: 2s\n",
        server.url()
    );
    redis_group(c, "redis", &backend);
    drop(server);
}

fn redis_cluster(c: &mut Criterion) {
    let Ok(nodes) = std::env::var("DECISION_REDIS_CLUSTER") else {
        return;
    };
    let list: Vec<String> = nodes
        .split(',')
        .map(|n| format!("\"{}\"", n.trim()))
        .collect();
    let backend = format!(
        "backend:\n  type: redis\n  redis:\n    cluster: [{}]\n    timeout: 2s\n",
        list.join(", ")
    );
    redis_group(c, "redis_cluster", &backend);
}

/// Decisions of `backend` (a redis one): one at a time, 64 tenants' at
/// once, and 64 of one tenant at once.
fn redis_group(c: &mut Criterion, name: &str, backend: &str) {
    let cfg = config(backend);
    let BackendKind::Redis(rcfg) = &cfg.backend.kind else {
        unreachable!("redis backend configured")
    };
    // One current-thread runtime, like each tiergate worker.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let limiter = rt
        .block_on(async { RedisLimiter::new(rcfg) })
        .expect("redis limiter");
    let policy = Policy::new(Arc::new(cfg.clone()));
    let acme = Identity {
        tenant: tenant("acme"),
        claimed_tier: None,
        source: IdentitySource::Header,
    };
    let one = plan(&policy, &Method::GET, "/api/users/1", &acme);
    let tenants: Vec<TenantId> = (0..CONCURRENCY).map(|i| tenant(&format!("c{i}"))).collect();

    // Generation 0 throughout: the backend never fails here, so the deny
    // cache (never used on this all-admitted path) is never reset.
    // The connection is lazy: wait (bounded) for the first good answer.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match rt.block_on(limiter.check(&acme.tenant, &one, 0)) {
            Ok(d) => {
                assert_allowed(&d);
                break;
            }
            Err(e) if Instant::now() > deadline => panic!("redis never answered: {e}"),
            // Sleeping on the runtime lets a Cluster client, which
            // connects in a task of its own, get on.
            Err(_) => rt.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await }),
        }
    }

    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Elements(1));
    g.bench_function("sequential", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(
                limiter
                    .check(black_box(&acme.tenant), &one, 0)
                    .await
                    .expect("redis decision"),
            )
        })
    });
    g.throughput(Throughput::Elements(CONCURRENCY as u64));
    g.bench_function("concurrent_64", |b| {
        b.to_async(&rt).iter(|| async {
            let calls = tenants.iter().map(|t| limiter.check(t, &one, 0));
            for d in futures_util::future::join_all(calls).await {
                black_box(d.expect("redis decision"));
            }
        })
    });
    g.bench_function("concurrent_64_one_tenant", |b| {
        b.to_async(&rt).iter(|| async {
            let calls = (0..CONCURRENCY).map(|_| limiter.check(&acme.tenant, &one, 0));
            for d in futures_util::future::join_all(calls).await {
                black_box(d.expect("redis decision"));
            }
        })
    });
    g.finish();
    drop(limiter);
    drop(rt);
}

criterion_group!(benches, identity, policy, memory, redis, redis_cluster);

fn main() {
    procs::install_signal_handler();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
