//! Observability end to end (SPEC §1 logging, §8 metrics; README "Metrics"
//! and "Observability"): what SREs and dashboards read from a running
//! tiergate — the `/metrics` exposition (names, label sets, exact counts,
//! bounded tenant cardinality, near-limit and unknown-tier signals, the
//! connection gauge), the access log, secrets staying out of every log
//! line, and `tiergate top`.
//!
//! Everything runs against the real binary, a real upstream and the memory
//! backend unless a test says otherwise. Rates are `1/h`, so nothing refills
//! during a test and every count is exact.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Tiergate, Upstream, client, closed_port_url, eventually, free_port, run_tiergate};
use futures_util::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use tiergate::metrics::METRIC_NAMES;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------
// Prometheus text exposition, parsed independently of tiergate's own parser
// ---------------------------------------------------------------------------

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed `/metrics` body.
#[derive(Debug, Clone, Default)]
struct Exposition {
    samples: Vec<Sample>,
    /// `# TYPE name kind` lines.
    types: BTreeMap<String, String>,
    text: String,
}

impl Exposition {
    /// Parses the text format (no timestamps; label values may contain
    /// escaped `\\`, `\"` and `\n`). Panics on a line it cannot read, so a
    /// malformed exposition fails the test instead of being skipped.
    fn parse(text: &str) -> Exposition {
        let mut out = Exposition {
            text: text.to_string(),
            ..Exposition::default()
        };
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                let (name, kind) = (it.next().unwrap(), it.next().unwrap());
                out.types.insert(name.to_string(), kind.to_string());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (name, rest) = match line.find(['{', ' ']) {
                Some(i) => (&line[..i], &line[i..]),
                None => panic!("unreadable exposition line `{line}`"),
            };
            let mut labels = BTreeMap::new();
            let rest = if let Some(body) = rest.strip_prefix('{') {
                let mut chars = body.char_indices();
                let mut key = String::new();
                let mut end = None;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '}' => {
                            end = Some(i + 1);
                            break;
                        }
                        ',' | ' ' => {}
                        '=' => {
                            assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "in `{line}`");
                            let mut value = String::new();
                            loop {
                                match chars.next() {
                                    Some((_, '\\')) => match chars.next() {
                                        Some((_, 'n')) => value.push('\n'),
                                        Some((_, c)) => value.push(c),
                                        None => panic!("dangling escape in `{line}`"),
                                    },
                                    Some((_, '"')) => break,
                                    Some((_, c)) => value.push(c),
                                    None => panic!("unterminated label value in `{line}`"),
                                }
                            }
                            let dup = labels.insert(std::mem::take(&mut key), value);
                            assert!(dup.is_none(), "duplicate label in `{line}`");
                        }
                        c => key.push(c),
                    }
                }
                &body[end.unwrap_or_else(|| panic!("unterminated labels in `{line}`"))..]
            } else {
                rest
            };
            let value = rest.trim();
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad sample value in `{line}`")),
            };
            out.samples.push(Sample {
                name: name.to_string(),
                labels,
                value,
            });
        }
        out
    }

    /// Samples of metric `name`.
    fn series<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// Sum of the samples of `name` whose labels include every pair in
    /// `filter` (0 when there are none).
    fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.series(name)
            .filter(|s| {
                filter
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// Distinct values of label `label` on `name`.
    fn label_values(&self, name: &str, label: &str) -> BTreeSet<String> {
        self.series(name)
            .filter_map(|s| s.labels.get(label).cloned())
            .collect()
    }
}

/// Scrapes the admin listener's `/metrics`.
async fn scrape(tg: &Tiergate) -> Exposition {
    let resp = client()
        .get(format!("{}/metrics", tg.admin_url()))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(resp.status(), 200, "/metrics status");
    Exposition::parse(&resp.text().await.expect("/metrics body"))
}

// ---------------------------------------------------------------------------
// Config and request helpers
// ---------------------------------------------------------------------------

/// HMAC secret for the JWT source (except in the canary test).
const SECRET: &str = "observability-test-secret-0123456789";

/// Listeners on ephemeral ports, `upstream`, then `rest` verbatim.
fn config(upstream: &str, server_extra: &str, rest: &str) -> String {
    format!(
        "server:\n  listen: \"127.0.0.1:0\"\n{server_extra}admin:\n  listen: \"127.0.0.1:0\"\nupstream:\n  url: \"{upstream}\"\n{rest}"
    )
}

/// A JWT source (HS256, tenant and tier claims) then an `x-tenant-id`
/// header source; anonymous requests are refused.
const JWT_THEN_HEADER: &str = "identity:\n  sources:\n    - type: jwt\n      algorithms: [HS256]\n      secret_env: TIERGATE_JWT_SECRET\n      tenant_claim: tenant_id\n      tier_claim: tier\n    - type: header\n      name: x-tenant-id\n  anonymous: reject\n";

/// Seconds since the Unix epoch.
fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// A `Bearer` value for an HS256 token for `tenant` (and `tier` claim)
/// signed with `secret`, expiring `exp_in` seconds from now.
fn bearer(secret: &str, tenant: &str, tier: Option<&str>, exp_in: i64) -> String {
    let mut claims = json!({ "tenant_id": tenant, "iat": now(), "exp": now() + exp_in });
    if let Some(t) = tier {
        claims["tier"] = json!(t);
    }
    let token = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign token");
    format!("Bearer {token}")
}

/// GETs `url` with `headers`; returns the status and response headers.
async fn get(
    http: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap) {
    let mut req = http.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let _ = resp.bytes().await;
    (status, headers)
}

/// GET as tenant `tenant` (header source); returns the status.
async fn get_as(http: &reqwest::Client, tg: &Tiergate, path: &str, tenant: &str) -> u16 {
    get(
        http,
        &format!("{}{path}", tg.proxy_url()),
        &[("x-tenant-id", tenant)],
    )
    .await
    .0
}

/// The JSON log lines on target `target` (other lines are ignored).
fn log_lines_with_target(tg: &Tiergate, target: &str) -> Vec<Value> {
    tg.logs()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == target)
        .collect()
}

// ---------------------------------------------------------------------------
// Metric contract
// ---------------------------------------------------------------------------

/// Every tiergate metric family: type and label names (SPEC §8 plus the
/// README's near-limit and unknown-tier additions and the override re-seed
/// counter). Histograms' `_bucket` series carry `le` on top. A metric added
/// to `METRIC_NAMES` must be added here with its labels.
const FAMILIES: &[(&str, &str, &[&str])] = &[
    (
        "tiergate_requests_total",
        "counter",
        &["tier", "route", "decision"],
    ),
    (
        "tiergate_tenant_throttled_total",
        "counter",
        &["tenant", "tier"],
    ),
    (
        "tiergate_tenant_near_limit_total",
        "counter",
        &["tenant", "tier"],
    ),
    ("tiergate_near_limit_total", "counter", &["tier"]),
    ("tiergate_unknown_tier_total", "counter", &[]),
    (
        "tiergate_limiter_duration_seconds",
        "histogram",
        &["backend"],
    ),
    (
        "tiergate_backend_errors_total",
        "counter",
        &["backend", "kind"],
    ),
    ("tiergate_backend_degraded", "gauge", &[]),
    (
        "tiergate_upstream_duration_seconds",
        "histogram",
        &["status_class"],
    ),
    ("tiergate_active_connections", "gauge", &[]),
    ("tiergate_config_reloads_total", "counter", &["result"]),
    ("tiergate_overrides", "gauge", &[]),
    // Redis backend only: overrides re-written into a Redis that lost them.
    ("tiergate_override_reseeds_total", "counter", &[]),
];

/// The `decision` values SPEC §8 allows.
const DECISIONS: &[&str] = &[
    "allowed",
    "throttled",
    "unauthenticated",
    "invalid",
    "error",
];

/// Checks every `tiergate_*` sample of `exp` against [`FAMILIES`]: known
/// family, declared type, exactly the contract's label names.
fn check_label_sets(exp: &Exposition, which: &str) {
    for s in exp
        .samples
        .iter()
        .filter(|s| s.name.starts_with("tiergate_"))
    {
        let (family, kind, labels, suffix) = FAMILIES
            .iter()
            .find_map(|(f, kind, labels)| {
                let rest = s.name.strip_prefix(f)?;
                let ok = rest.is_empty()
                    || (*kind == "histogram" && ["_bucket", "_sum", "_count"].contains(&rest));
                ok.then_some((*f, *kind, *labels, rest))
            })
            .unwrap_or_else(|| {
                panic!(
                    "{which}: `{}` is not a tiergate metric of SPEC §8/README",
                    s.name
                )
            });
        assert_eq!(
            exp.types.get(family).map(String::as_str),
            Some(kind),
            "{which}: # TYPE of {family}"
        );
        let mut want: BTreeSet<&str> = labels.iter().copied().collect();
        if suffix == "_bucket" {
            want.insert("le");
        }
        let got: BTreeSet<&str> = s.labels.keys().map(String::as_str).collect();
        assert_eq!(
            got, want,
            "{which}: label names of {} (sample {s:?})",
            s.name
        );
    }
}

/// After a scripted run that produces every decision, `/metrics` exports
/// every name of `METRIC_NAMES` with exactly the label names of SPEC §8
/// (and the process collector's RSS and fd gauges).
///
/// Why: metric and label names are a contract — the shipped dashboard and
/// alert rules select on them, and a renamed or extra label silently
/// empties a panel or disables an alert.
#[tokio::test]
async fn metrics_export_every_contract_name_with_exactly_the_spec_label_sets() {
    let up = Upstream::start();
    let http = client();

    // Instance A (memory): allowed, throttled, unauthenticated, invalid,
    // near-limit, unknown tier, an exempt route and a reload.
    let yaml = config(
        &up.url(),
        "",
        &format!(
            "{JWT_THEN_HEADER}tiers:\n  free: {{ rate: 1/h, burst: 2 }}\n  gold: {{ rate: 1/h, burst: 50 }}\ndefault_tier: free\nroutes:\n  - name: export\n    match: {{ path_prefix: \"/export\" }}\n  - name: health\n    match: {{ path: \"/health\" }}\n    exempt: true\ntenants:\n  acme: {{ tier: gold }}\n"
        ),
    );
    let a = Tiergate::start_with_env(&yaml, &[("TIERGATE_JWT_SECRET", SECRET)]);
    let p = a.proxy_url();
    assert_eq!(get_as(&http, &a, "/x", "alice").await, 200);
    assert_eq!(get_as(&http, &a, "/x", "alice").await, 200);
    assert_eq!(get_as(&http, &a, "/x", "alice").await, 429);
    assert_eq!(get_as(&http, &a, "/export/1", "acme").await, 200);
    assert_eq!(get(&http, &format!("{p}/x"), &[]).await.0, 401);
    assert_eq!(get_as(&http, &a, "/x", "bad/tenant").await, 400);
    let forged = bearer("not-the-secret", "alice", None, 600);
    let forged_status = get(&http, &format!("{p}/x"), &[("authorization", &forged)])
        .await
        .0;
    assert_eq!(forged_status, 401);
    let platinum = bearer(SECRET, "newco", Some("platinum"), 600);
    let platinum_status = get(&http, &format!("{p}/x"), &[("authorization", &platinum)])
        .await
        .0;
    assert_eq!(platinum_status, 200);
    assert_eq!(get(&http, &format!("{p}/health"), &[]).await.0, 200);
    a.sighup();
    assert!(
        eventually(Duration::from_secs(5), || async {
            scrape(&a)
                .await
                .sum("tiergate_config_reloads_total", &[("result", "ok")])
                == 1.0
        })
        .await,
        "SIGHUP reload not counted\n{}",
        a.dump()
    );

    // Instance B (redis on a closed port, on_error: deny): error.
    let redis_url = format!("redis://127.0.0.1:{}/0", free_port());
    let yaml = config(
        &up.url(),
        "",
        &format!(
            "backend:\n  type: redis\n  redis:\n    url: \"{redis_url}\"\n    timeout: 200ms\n  on_error: deny\ntiers:\n  free: {{ rate: 1/h, burst: 2 }}\ndefault_tier: free\n"
        ),
    );
    let b = Tiergate::start(&yaml);
    let (status, headers) = get(
        &http,
        &format!("{}/x", b.proxy_url()),
        &[("x-tenant-id", "alice")],
    )
    .await;
    assert_eq!(status, 503, "redis down under on_error: deny");
    assert_eq!(
        headers
            .get("x-tiergate-error")
            .and_then(|v| v.to_str().ok()),
        Some("limiter_unavailable")
    );

    let ea = scrape(&a).await;
    let eb = scrape(&b).await;
    check_label_sets(&ea, "memory instance");
    check_label_sets(&eb, "redis instance");

    // Every advertised name is exported (by at least one of the runs), and
    // every name the table knows is advertised.
    let table: BTreeSet<&str> = FAMILIES.iter().map(|f| f.0).collect();
    let advertised: BTreeSet<&str> = METRIC_NAMES.iter().copied().collect();
    assert_eq!(advertised, table, "METRIC_NAMES vs the contract table");
    for (name, kind, _) in FAMILIES {
        let sample = if *kind == "histogram" {
            format!("{name}_count")
        } else {
            name.to_string()
        };
        assert!(
            ea.series(&sample).next().is_some() || eb.series(&sample).next().is_some(),
            "{name} has no sample in either exposition\n--- memory ---\n{}\n--- redis ---\n{}",
            ea.text,
            eb.text
        );
    }
    // Gauges that SPEC §8 says are always exported.
    for e in [&ea, &eb] {
        for name in [
            "tiergate_backend_degraded",
            "tiergate_active_connections",
            "tiergate_overrides",
        ] {
            assert_eq!(e.series(name).count(), 1, "{name} exported once");
        }
    }

    // Each decision was produced and counted; no other decision exists.
    let mut seen = BTreeSet::new();
    for e in [&ea, &eb] {
        for s in e.series("tiergate_requests_total") {
            let d = &s.labels["decision"];
            assert!(DECISIONS.contains(&d.as_str()), "decision `{d}`");
            if s.value > 0.0 {
                seen.insert(d.clone());
            }
        }
    }
    let all: BTreeSet<String> = DECISIONS.iter().map(|d| d.to_string()).collect();
    assert_eq!(seen, all, "decisions counted across the scripted run");
    // Requests refused before a tier was known are `tier="none"`.
    let none = |d| {
        ea.sum(
            "tiergate_requests_total",
            &[("tier", "none"), ("route", "default"), ("decision", d)],
        )
    };
    assert_eq!(none("unauthenticated"), 2.0, "no identity + forged token");
    assert_eq!(none("invalid"), 1.0, "bad tenant id");
    assert_eq!(
        eb.sum(
            "tiergate_requests_total",
            &[("tier", "free"), ("decision", "error")]
        ),
        1.0
    );
    assert!(
        eb.sum("tiergate_backend_errors_total", &[("backend", "redis")]) >= 1.0,
        "{}",
        eb.text
    );
    assert_eq!(
        ea.sum(
            "tiergate_limiter_duration_seconds_count",
            &[("backend", "memory")]
        ),
        5.0,
        "one limiter call per limited request (3 alice, acme, newco)"
    );
    assert!(
        ea.sum(
            "tiergate_upstream_duration_seconds_count",
            &[("status_class", "2xx")]
        ) >= 5.0
    );

    // The process collector.
    for e in [&ea, &eb] {
        for name in ["process_resident_memory_bytes", "process_open_fds"] {
            let v = e.sum(name, &[]);
            assert!(v > 0.0, "{name} = {v}\n{}", e.text);
        }
    }
}

/// N allowed and M throttled requests across two tenants (two tiers) and
/// two routes show up in `tiergate_requests_total` per {tier, route,
/// decision} and in `tiergate_tenant_throttled_total` per tenant exactly as
/// the clients saw them.
///
/// Why: throttle-ratio alerts and per-customer dashboards are computed from
/// these counters; an off-by-one or a mislabelled route sends SREs after the
/// wrong customer.
#[tokio::test]
async fn request_counters_match_what_clients_saw() {
    let up = Upstream::start();
    let yaml = config(
        &up.url(),
        "",
        "tiers:\n  free: { rate: 1/h, burst: 3 }\n  pro: { rate: 1/h, burst: 5 }\ndefault_tier: free\nroutes:\n  - name: export\n    match: { path_prefix: \"/export\" }\ntenants:\n  acme: { tier: pro }\n",
    );
    let tg = Tiergate::start(&yaml);
    let http = client();
    // (tenant, tier, requests): acme (pro, burst 5) sends 8, bob (free,
    // burst 3) sends 6, alternating between the export route and no route.
    let plan = [("acme", "pro", 8), ("bob", "free", 6)];
    let mut saw: BTreeMap<(String, String, String), f64> = BTreeMap::new();
    let mut throttled: BTreeMap<&str, f64> = BTreeMap::new();
    for i in 0..8 {
        for (tenant, tier, n) in plan {
            if i >= n {
                continue;
            }
            let (path, route) = if i % 2 == 0 {
                (format!("/export/{i}"), "export")
            } else {
                (format!("/v1/items/{i}"), "default")
            };
            let status = get_as(&http, &tg, &path, tenant).await;
            let decision = match status {
                200 => "allowed",
                429 => {
                    *throttled.entry(tenant).or_default() += 1.0;
                    "throttled"
                }
                s => panic!("{tenant} {path}: unexpected {s}"),
            };
            *saw.entry((tier.into(), route.into(), decision.into()))
                .or_default() += 1.0;
        }
    }
    // Buckets start full and never refill here: exactly `burst` admitted.
    assert_eq!(throttled.get("acme"), Some(&3.0));
    assert_eq!(throttled.get("bob"), Some(&3.0));

    let exp = scrape(&tg).await;
    let mut got: BTreeMap<(String, String, String), f64> = BTreeMap::new();
    for s in exp.series("tiergate_requests_total") {
        if s.value != 0.0 {
            let key = (
                s.labels["tier"].clone(),
                s.labels["route"].clone(),
                s.labels["decision"].clone(),
            );
            *got.entry(key).or_default() += s.value;
        }
    }
    assert_eq!(got, saw, "requests_total vs what the clients saw");
    for (tenant, tier, _) in plan {
        assert_eq!(
            exp.sum(
                "tiergate_tenant_throttled_total",
                &[("tenant", tenant), ("tier", tier)]
            ),
            throttled[tenant],
            "tenant_throttled_total for {tenant}"
        );
    }
    assert_eq!(
        exp.sum("tiergate_tenant_throttled_total", &[]),
        6.0,
        "no other throttled series"
    );
}

/// With `metrics.max_tenant_labels: 5` and two tenants in `tenants:`, a
/// flood of 2,500 random tenant ids (5,000 requests, each tenant throttled
/// once) leaves at most 5 + `__other__` tenant label values; the configured
/// tenants keep their own label when they are throttled later; `__other__`
/// counts everyone else, exactly.
///
/// Why: tenant ids come from clients. Without the bound, a flood of random
/// ids becomes a Prometheus cardinality explosion that takes monitoring
/// down exactly when it is needed.
#[tokio::test]
async fn tenant_label_cardinality_is_bounded_under_a_flood_of_random_ids() {
    const FLOOD: usize = 2_500;
    let up = Upstream::start();
    let yaml = config(
        &up.url(),
        "",
        "tiers:\n  free: { rate: 1/h, burst: 1 }\ndefault_tier: free\ntenants:\n  acme: { tier: free }\n  globex: { tier: free }\nmetrics:\n  max_tenant_labels: 5\n",
    );
    let tg = Tiergate::start(&yaml);
    let http = client();
    let seed = {
        use std::hash::{BuildHasher, RandomState};
        RandomState::new().hash_one(now())
    };
    let proxy = tg.proxy_url();
    // Each random tenant: one admitted request (which empties its bucket),
    // then one throttled. 64 tenants in flight at a time.
    let results: Vec<(u16, u16)> = futures_util::stream::iter(0..FLOOD)
        .map(|i| {
            let http = http.clone();
            let url = format!("{proxy}/x");
            async move {
                let tenant = format!("r{seed:016x}-{i}");
                let first = get(&http, &url, &[("x-tenant-id", &tenant)]).await.0;
                let second = get(&http, &url, &[("x-tenant-id", &tenant)]).await.0;
                (first, second)
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    assert!(
        results.iter().all(|&r| r == (200, 429)),
        "every random tenant: 200 then 429; got {:?}",
        results.iter().find(|&&r| r != (200, 429))
    );
    // The configured tenants, throttled after the flood filled every slot.
    for tenant in ["acme", "globex"] {
        assert_eq!(get_as(&http, &tg, "/x", tenant).await, 200);
        assert_eq!(get_as(&http, &tg, "/x", tenant).await, 429);
    }

    let exp = scrape(&tg).await;
    let name = "tiergate_tenant_throttled_total";
    let tenants = exp.label_values(name, "tenant");
    assert!(
        tenants.len() <= 6,
        "{} tenant label values (bound 5 + __other__): {tenants:?}",
        tenants.len()
    );
    for t in ["acme", "globex", "__other__"] {
        assert!(tenants.contains(t), "{t} missing from {tenants:?}");
    }
    assert_eq!(exp.sum(name, &[("tenant", "acme"), ("tier", "free")]), 1.0);
    assert_eq!(
        exp.sum(name, &[("tenant", "globex"), ("tier", "free")]),
        1.0
    );
    // Random tenants that got a label of their own were throttled once each;
    // `__other__` has the rest of the flood, exactly.
    let own: Vec<&String> = tenants
        .iter()
        .filter(|t| !["acme", "globex", "__other__"].contains(&t.as_str()))
        .collect();
    assert!(own.len() <= 3, "{own:?}");
    for t in &own {
        assert_eq!(exp.sum(name, &[("tenant", t.as_str())]), 1.0, "{t}");
    }
    assert_eq!(
        exp.sum(name, &[("tenant", "__other__"), ("tier", "free")]),
        (FLOOD - own.len()) as f64
    );
    assert_eq!(
        exp.sum(name, &[]),
        exp.sum("tiergate_requests_total", &[("decision", "throttled")]),
        "every throttled request is counted under some tenant label"
    );
    // The near-limit family shares the bound.
    let near = exp.label_values("tiergate_tenant_near_limit_total", "tenant");
    assert!(near.len() <= 6, "{near:?}");
}

/// A tenant with burst 10 that uses all 10 tokens increments
/// `tiergate_near_limit_total{tier}` and
/// `tiergate_tenant_near_limit_total{tenant,tier}` exactly once: only the
/// request that left it under 10% (0 tokens) counts, the throttled 11th
/// does not.
///
/// Why: the near-limit signal is how account managers spot customers about
/// to hit their plan's ceiling before they get 429s; counting every request
/// (or none) makes it useless.
#[tokio::test]
async fn near_limit_counts_only_requests_that_leave_under_ten_percent() {
    let up = Upstream::start();
    let yaml = config(
        &up.url(),
        "",
        "tiers:\n  small: { rate: 1/h, burst: 10 }\n  big: { rate: 1/h, burst: 1000 }\ndefault_tier: small\ntenants:\n  whale: { tier: big }\n",
    );
    let tg = Tiergate::start(&yaml);
    let http = client();
    let url = format!("{}/x", tg.proxy_url());
    let near = |e: &Exposition| {
        (
            e.sum("tiergate_near_limit_total", &[("tier", "small")]),
            e.sum(
                "tiergate_tenant_near_limit_total",
                &[("tenant", "nearco"), ("tier", "small")],
            ),
        )
    };
    for i in 1..=9 {
        let (status, h) = get(&http, &url, &[("x-tenant-id", "nearco")]).await;
        assert_eq!(status, 200, "request {i}");
        assert_eq!(h["x-ratelimit-remaining"], (10 - i).to_string().as_str());
    }
    assert_eq!(near(&scrape(&tg).await), (0.0, 0.0), "1..9 left >= 10%");
    let (status, h) = get(&http, &url, &[("x-tenant-id", "nearco")]).await;
    assert_eq!(status, 200);
    assert_eq!(h["x-ratelimit-remaining"], "0");
    assert_eq!(near(&scrape(&tg).await), (1.0, 1.0), "the 10th left 0");
    assert_eq!(get(&http, &url, &[("x-tenant-id", "nearco")]).await.0, 429);
    // A tenant far from its limit adds nothing.
    assert_eq!(get(&http, &url, &[("x-tenant-id", "whale")]).await.0, 200);
    let exp = scrape(&tg).await;
    assert_eq!(
        near(&exp),
        (1.0, 1.0),
        "the throttled 11th is not near-limit"
    );
    assert_eq!(exp.sum("tiergate_near_limit_total", &[]), 1.0);
    assert_eq!(exp.sum("tiergate_tenant_near_limit_total", &[]), 1.0);
}

/// Sends one request on `stream` and reads until the response headers
/// are complete; returns the status line.
async fn request_on(stream: &mut tokio::net::TcpStream, tenant: &str) -> String {
    let req = format!("GET /keepalive HTTP/1.1\r\nhost: tiergate\r\nx-tenant-id: {tenant}\r\n\r\n");
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
            .await
            .expect("response within 5 s")
            .expect("read");
        assert!(n > 0, "connection closed before the response");
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    text.lines().next().unwrap_or_default().to_string()
}

/// `tiergate_active_connections` counts open keep-alive client connections:
/// three open (each having served a request) → at least baseline + 3;
/// closed → back to the baseline.
///
/// Why: the gauge is how SREs see connection exhaustion coming
/// (`max_connections`); a leak (never decremented) or a miss (counting
/// requests instead of connections) hides it.
#[tokio::test]
async fn active_connections_gauge_follows_open_keepalive_connections() {
    let up = Upstream::start();
    let yaml = config(
        &up.url(),
        "",
        "tiers:\n  free: { rate: 1/h, burst: 100 }\ndefault_tier: free\n",
    );
    let tg = Tiergate::start(&yaml);
    let gauge = |e: &Exposition| e.sum("tiergate_active_connections", &[]);
    let baseline = gauge(&scrape(&tg).await);
    let mut conns = Vec::new();
    for i in 0..3 {
        let mut s = tokio::net::TcpStream::connect(tg.proxy_addr())
            .await
            .expect("connect to proxy");
        let status = request_on(&mut s, &format!("conn-{i}")).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        conns.push(s);
    }
    // Still open: a second request on each goes over the same connection.
    for (i, s) in conns.iter_mut().enumerate() {
        let status = request_on(s, &format!("conn-{i}")).await;
        assert!(status.starts_with("HTTP/1.1 200"), "keep-alive: {status}");
    }
    let open = gauge(&scrape(&tg).await);
    assert!(open >= baseline + 3.0, "baseline {baseline}, open {open}");
    drop(conns);
    assert!(
        eventually(Duration::from_secs(3), || async {
            gauge(&scrape(&tg).await) == baseline
        })
        .await,
        "gauge did not return to {baseline}: {}",
        gauge(&scrape(&tg).await)
    );
}

// ---------------------------------------------------------------------------
// Access log
// ---------------------------------------------------------------------------

/// Tiers and a route for the access-log tests: burst 1, so the second
/// request of a tenant is throttled.
const ACCESS_TIERS: &str = "tiers:\n  free: { rate: 1/h, burst: 1 }\ndefault_tier: free\nroutes:\n  - name: api\n    match: { path_prefix: \"/api\" }\n";

/// With `server.access_log: true`, every proxied request yields exactly one
/// JSON line on target `tiergate::access` with `request_id`, `tenant`,
/// `tier`, `route`, `decision`, `status` and `duration_ms`; a throttled
/// request's decision is `rate_limited`, and a client-supplied
/// `x-request-id` is the logged `request_id` whether the request was
/// admitted or refused.
///
/// Why: the access log is what support greps when a customer reports
/// "request X got a 429"; a missing field or a wrong decision makes it
/// useless, and the request id is the key they grep by.
#[tokio::test]
async fn access_log_has_one_json_line_per_request_with_the_decision() {
    let up = Upstream::start();
    let yaml = config(&up.url(), "  access_log: true\n", ACCESS_TIERS);
    let tg = Tiergate::start(&yaml);
    let http = client();
    let p = tg.proxy_url();
    let (s1, _) = get(
        &http,
        &format!("{p}/api/a"),
        &[("x-tenant-id", "logco"), ("x-request-id", "obs-allowed-1")],
    )
    .await;
    let (s2, _) = get(
        &http,
        &format!("{p}/api/a"),
        &[
            ("x-tenant-id", "logco"),
            ("x-request-id", "obs-throttled-2"),
        ],
    )
    .await;
    let (s3, _) = get(&http, &format!("{p}/other"), &[("x-tenant-id", "otherco")]).await;
    let (s4, _) = get(&http, &format!("{p}/api/b"), &[]).await;
    assert_eq!((s1, s2, s3, s4), (200, 429, 200, 401));
    let generated = up
        .seen()
        .iter()
        .find(|s| s.path == "/other")
        .and_then(|s| s.header("x-request-id").map(str::to_owned))
        .expect("upstream saw /other with an x-request-id");

    assert!(
        eventually(Duration::from_secs(3), || async {
            log_lines_with_target(&tg, "tiergate::access").len() >= 4
        })
        .await,
        "4 access lines expected\n{}",
        tg.dump()
    );
    let lines = log_lines_with_target(&tg, "tiergate::access");
    assert_eq!(lines.len(), 4, "one line per request\n{}", tg.dump());
    for l in &lines {
        let f = &l["fields"];
        for k in [
            "request_id",
            "tenant",
            "tier",
            "route",
            "decision",
            "status",
            "duration_ms",
        ] {
            assert!(!f[k].is_null(), "field {k} missing in {l}");
        }
        assert!(f["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{l}");
        assert_eq!(l["level"], "INFO", "{l}");
    }
    let by_path_status = |path: &str, status: u64| -> &Value {
        lines
            .iter()
            .map(|l| &l["fields"])
            .find(|f| f["path"] == path && f["status"] == status)
            .unwrap_or_else(|| panic!("no access line for {path} {status}: {lines:#?}"))
    };
    let allowed = by_path_status("/api/a", 200);
    assert_eq!(allowed["decision"], "allowed");
    assert_eq!(allowed["tenant"], "logco");
    assert_eq!(allowed["tier"], "free");
    assert_eq!(allowed["route"], "api");
    assert_eq!(allowed["request_id"], "obs-allowed-1");

    let throttled = by_path_status("/api/a", 429);
    assert_eq!(throttled["decision"], "rate_limited");
    assert_eq!(throttled["tenant"], "logco");
    assert_eq!(throttled["tier"], "free");
    assert_eq!(throttled["route"], "api");

    let other = by_path_status("/other", 200);
    assert_eq!(other["decision"], "allowed");
    assert_eq!(other["tenant"], "otherco");
    assert_eq!(
        other["request_id"],
        generated.as_str(),
        "logged id = the id the upstream got"
    );

    let unauth = by_path_status("/api/b", 401);
    assert_eq!(unauth["decision"], "unauthenticated");

    assert_eq!(
        throttled["request_id"], "obs-throttled-2",
        "a refused request's access line must carry the client's x-request-id"
    );
}

/// With `server.access_log` off (the default), no `tiergate::access` lines
/// are written, even at `RUST_LOG=debug`.
///
/// Why: access logs cost I/O per request; the default must not pay it.
#[tokio::test]
async fn access_log_off_writes_no_access_lines() {
    let up = Upstream::start();
    let yaml = config(&up.url(), "", ACCESS_TIERS);
    let tg = Tiergate::start_with_env(&yaml, &[("RUST_LOG", "debug")]);
    let http = client();
    assert_eq!(get_as(&http, &tg, "/api/a", "quietco").await, 200);
    assert_eq!(get_as(&http, &tg, "/api/a", "quietco").await, 429);
    assert_eq!(get_as(&http, &tg, "/api/a", "quietco").await, 429);
    // Barrier: the second throttle's debug line is written after anything
    // the first two requests could have logged.
    assert!(
        eventually(Duration::from_secs(3), || async {
            tg.logs()
                .iter()
                .filter(|l| l.contains("\"throttled\""))
                .count()
                >= 2
        })
        .await,
        "throttle debug lines expected\n{}",
        tg.dump()
    );
    let access = log_lines_with_target(&tg, "tiergate::access");
    assert!(
        access.is_empty(),
        "access lines with access_log off: {access:?}"
    );
}

// ---------------------------------------------------------------------------
// Secrets never logged
// ---------------------------------------------------------------------------

/// With `RUST_LOG=trace`, a JWT secret, an admin token and a Redis password
/// in use (valid and invalid tokens, admin calls with the right and a wrong
/// token, reloads by SIGHUP and the API, one of them refused, Redis
/// unreachable), none of those strings appears in any stdout or stderr
/// line.
///
/// Why: SPEC §1 — secrets never appear in logs. Logs are shipped to
/// systems with far wider access than the secret store; one `Debug` of a
/// config struct or a Redis URL would leak credentials to all of them.
#[tokio::test]
async fn secrets_never_appear_in_logs_even_at_trace() {
    const JWT_SECRET: &str = "CANARY-JWT-SECRET-7f3a";
    const ADMIN_TOKEN: &str = "CANARY-ADMIN-TOKEN-91b2";
    const REDIS_PW: &str = "CANARY-REDIS-PW-55c1";
    const WRONG_TOKEN: &str = "CANARY-WRONG-TOKEN-0d0d";
    let up = Upstream::start();
    let redis_port = free_port();
    let yaml = |default_tier: &str| {
        config(
            &up.url(),
            "  access_log: true\n",
            &format!(
                "{JWT_THEN_HEADER}backend:\n  type: redis\n  redis:\n    url: \"redis://:{REDIS_PW}@127.0.0.1:{redis_port}/0\"\n    timeout: 100ms\n  on_error: local\ntiers:\n  free: {{ rate: 1/h, burst: 5 }}\n  gold: {{ rate: 1/h, burst: 10 }}\ndefault_tier: {default_tier}\n"
            ),
        )
    };
    let tg = Tiergate::start_with_env(
        &yaml("free"),
        &[
            ("RUST_LOG", "trace"),
            ("TIERGATE_JWT_SECRET", JWT_SECRET),
            ("TIERGATE_ADMIN_TOKEN", ADMIN_TOKEN),
        ],
    );
    let http = client();
    let p = tg.proxy_url();
    let admin = tg.admin_url();

    let valid = bearer(JWT_SECRET, "canaryco", Some("gold"), 600);
    assert_eq!(
        get(&http, &format!("{p}/x"), &[("authorization", &valid)])
            .await
            .0,
        200,
        "valid token under on_error: local"
    );
    let expired = bearer(JWT_SECRET, "canaryco", None, -3600);
    let forged = bearer(WRONG_TOKEN, "canaryco", None, 600);
    for bad in [&expired, &forged] {
        let status = get(&http, &format!("{p}/x"), &[("authorization", bad)])
            .await
            .0;
        assert_eq!(status, 401);
    }
    let right = format!("Bearer {ADMIN_TOKEN}");
    let wrong = format!("Bearer {WRONG_TOKEN}");
    let call = |method: reqwest::Method, path: &str, auth: &str, body: Option<Value>| {
        let mut req = http
            .request(method, format!("{admin}{path}"))
            .header("authorization", auth);
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move { req.send().await.expect("admin call").status().as_u16() }
    };
    assert_eq!(
        call(reqwest::Method::GET, "/v1/tiers", &right, None).await,
        200
    );
    assert_eq!(
        call(reqwest::Method::GET, "/v1/tiers", &wrong, None).await,
        401
    );
    assert_eq!(
        call(reqwest::Method::GET, "/v1/overrides", &wrong, None).await,
        401
    );
    let ov = json!({ "tier": "gold", "reason": "canary" });
    // The override store is Redis, which is down: any answer is fine here,
    // what matters is what gets logged on the way.
    let _ = call(
        reqwest::Method::PUT,
        "/v1/tenants/canaryco/override",
        &right,
        Some(ov),
    )
    .await;
    assert_eq!(
        call(reqwest::Method::POST, "/v1/reload", &right, None).await,
        200
    );
    assert_eq!(
        call(reqwest::Method::POST, "/v1/reload", &wrong, None).await,
        401
    );
    tg.reload_by_sighup();
    // A refused reload logs its errors: they must not echo secrets either.
    tg.write_config(&yaml("nope"));
    tg.sighup();
    assert!(
        tg.wait_for_log("reload refused", Duration::from_secs(5))
            .is_some(),
        "{}",
        tg.dump()
    );
    tg.write_config(&yaml("free"));
    assert!(
        tg.wait_for_log("degraded", Duration::from_secs(5))
            .is_some(),
        "Redis on a closed port must be reported degraded\n{}",
        tg.dump()
    );
    // One more round trip so the last lines are flushed and collected.
    assert!(
        eventually(Duration::from_secs(3), || async {
            log_lines_with_target(&tg, "tiergate::access").len() >= 3
        })
        .await
    );

    let lines: Vec<String> = tg.logs().into_iter().chain(tg.stdout()).collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"TRACE\"") || l.contains("\"DEBUG\"")),
        "RUST_LOG=trace did not take effect\n{}",
        tg.dump()
    );
    for canary in [JWT_SECRET, ADMIN_TOKEN, REDIS_PW, WRONG_TOKEN] {
        let leaks: Vec<&String> = lines.iter().filter(|l| l.contains(canary)).collect();
        assert!(
            leaks.is_empty(),
            "secret `{canary}` logged in {} line(s):\n{}",
            leaks.len(),
            leaks
                .iter()
                .map(|l| l.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

// ---------------------------------------------------------------------------
// tiergate top
// ---------------------------------------------------------------------------

/// `tiergate top --once --interval 1s` against a running instance with
/// traffic flowing exits 0 and shows the tier, a non-zero throttle
/// percentage and the throttled tenant's id.
///
/// Why: `top` is the SRE's first look during an incident; it must work
/// against a live instance and name who is being throttled.
#[tokio::test]
async fn top_once_shows_tier_throttle_ratio_and_throttled_tenant() {
    let up = Upstream::start();
    let yaml = config(
        &up.url(),
        "",
        "tiers:\n  bronze: { rate: 1/h, burst: 2 }\ndefault_tier: bronze\n",
    );
    let tg = Tiergate::start(&yaml);
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        let url = format!("{}/x", tg.proxy_url());
        tokio::spawn(async move {
            let http = client();
            let started = tokio::time::Instant::now();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(4) {
                // One throttled tenant and a stream of fresh, admitted ones.
                let _ = get(&http, &url, &[("x-tenant-id", "hot-tenant-42")]).await;
                let _ = get(&http, &url, &[("x-tenant-id", &format!("cool-{i}"))]).await;
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let admin = tg.admin_url();
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || {
        run_tiergate(
            &["top", "--once", "--interval", "1s", "--admin", &admin],
            &[],
        )
    })
    .await
    .expect("top thread");
    stop.store(true, Ordering::Relaxed);
    traffic.await.expect("traffic task");
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("hot-tenant-42"), "{stdout}");
    let tier_row = stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some("bronze"))
        .unwrap_or_else(|| panic!("no row for tier bronze:\n{stdout}"));
    let pct: f64 = tier_row
        .split_whitespace()
        .find_map(|t| t.strip_suffix('%')?.parse().ok())
        .unwrap_or_else(|| panic!("no percentage in `{tier_row}`:\n{stdout}"));
    assert!(
        pct > 0.0 && pct < 100.0,
        "throttle share {pct}% in `{tier_row}`"
    );
}

/// `tiergate top --once` against a closed port exits non-zero with a
/// message naming the address, not a panic or a hang.
///
/// Why: pointing `top` at the wrong `--admin` is the most common mistake;
/// the message must say what is wrong.
#[test]
fn top_once_against_closed_port_fails_clearly() {
    let url = closed_port_url();
    let (code, stdout, stderr) =
        run_tiergate(&["top", "--once", "--interval", "1s", "--admin", &url], &[]);
    assert_ne!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let addr = url.trim_start_matches("http://");
    assert!(
        stderr.contains(addr) && stderr.contains("cannot reach"),
        "stderr should name {addr}:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

// ---------------------------------------------------------------------------
// Unknown tier
// ---------------------------------------------------------------------------

/// A verified JWT claiming tier `platinum` (not configured) is served on
/// `default_tier` (200) and counted in `tiergate_unknown_tier_total`;
/// a claim of a configured tier is not.
///
/// Why: SPEC §3 — an unknown tier is never the client's error, but
/// operators must see that their IdP issues plan names tiergate does not
/// know, or those customers silently get the default limits.
#[tokio::test]
async fn unknown_tier_claim_is_served_on_default_tier_and_counted() {
    let up = Upstream::start();
    let yaml = config(
        &up.url(),
        "",
        &format!(
            "{JWT_THEN_HEADER}tiers:\n  free: {{ rate: 1/h, burst: 10 }}\n  gold: {{ rate: 1/h, burst: 20 }}\ndefault_tier: free\n"
        ),
    );
    let tg = Tiergate::start_with_env(&yaml, &[("TIERGATE_JWT_SECRET", SECRET)]);
    let http = client();
    let url = format!("{}/x", tg.proxy_url());
    let unknown = |e: &Exposition| e.sum("tiergate_unknown_tier_total", &[]);
    assert_eq!(unknown(&scrape(&tg).await), 0.0);

    let platinum = bearer(SECRET, "newco", Some("platinum"), 600);
    let (status, h) = get(&http, &url, &[("authorization", &platinum)]).await;
    assert_eq!(status, 200);
    assert_eq!(h["x-ratelimit-limit"], "10", "default tier's burst");
    let seen = up.last().expect("upstream saw the request");
    assert_eq!(seen.header("x-tenant-tier"), Some("free"));
    let exp = scrape(&tg).await;
    assert_eq!(unknown(&exp), 1.0);
    assert_eq!(
        exp.sum(
            "tiergate_requests_total",
            &[("tier", "free"), ("decision", "allowed")]
        ),
        1.0
    );

    let gold = bearer(SECRET, "goldco", Some("gold"), 600);
    assert_eq!(get(&http, &url, &[("authorization", &gold)]).await.0, 200);
    assert_eq!(
        unknown(&scrape(&tg).await),
        1.0,
        "a known tier is not counted"
    );
}
