//! The operational artifacts shipped next to the code — Grafana dashboard,
//! Prometheus alert rules, their promtool unit tests and scrape config, the
//! Dockerfile, the compose stack and the runbook — agree with the metrics
//! tiergate exports (SPEC §8) and with each other.
//!
//! No network and no Docker: the files are parsed and cross-checked. When
//! `promtool` is on `PATH` the rules, their unit tests, the Prometheus config
//! and every dashboard query are also checked by it; without it the promtool
//! tests print a skip note, except under `CI`, where they fail (`.ci/run`
//! installs Debian's `prometheus` package, which ships promtool).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use prometheus::core::Collector;
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;
use tiergate::config::{BackendKind, Config, RedisTarget};
use tiergate::metrics::{METRIC_NAMES, Metrics};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_tiergate");

const DASHBOARD: &str = "config/grafana/tiergate.json";
const ALERTS: &str = "config/prometheus/alerts.yml";
const ALERTS_TEST: &str = "config/prometheus/alerts_test.yml";
const PROMETHEUS: &str = "config/prometheus/prometheus.yml";
const COMPOSE: &str = "deploy/docker-compose.yml";
const DEPLOY_CONFIG: &str = "deploy/tiergate.yaml";
const RUNBOOK: &str = "docs/OPERATIONS.md";

/// The alerts the runbook and the on-call rotation expect.
const ALERT_NAMES: &[&str] = &[
    "TiergateHighThrottleRatio",
    "TiergateTenantThrottledContinuously",
    "TiergateBackendDegraded",
    "TiergateLimiterLatencyHigh",
    "TiergateUpstream5xxRatio",
    "TiergateConfigReloadFailed",
    "TiergateScrapeDown",
];

/// Label values SPEC §8 fixes; a query matching anything else matches nothing.
const LABEL_VALUES: &[(&str, &[&str])] = &[
    (
        "decision",
        &[
            "allowed",
            "throttled",
            "unauthenticated",
            "invalid",
            "error",
        ],
    ),
    ("result", &["ok", "error"]),
    ("status_class", &["1xx", "2xx", "3xx", "4xx", "5xx"]),
    ("kind", &["unavailable", "timeout", "error"]),
    ("backend", &["memory", "redis"]),
];

/// Labels Prometheus attaches to every scraped series.
const TARGET_LABELS: &[&str] = &["instance", "job"];

// ---------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

fn yaml(rel: &str) -> Yaml {
    serde_yaml::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
}

fn dashboard() -> Json {
    serde_json::from_str(&read(DASHBOARD))
        .unwrap_or_else(|e| panic!("{DASHBOARD} is not valid JSON: {e}"))
}

fn ystr<'a>(v: &'a Yaml, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Yaml::as_str)
}

fn yseq<'a>(v: &'a Yaml, key: &str) -> &'a [Yaml] {
    v.get(key)
        .and_then(Yaml::as_sequence)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// Every metric tiergate registers, with its label names, read from the
/// collectors themselves; and the subset that are histograms.
struct Exported {
    labels: BTreeMap<String, Vec<String>>,
    histograms: BTreeSet<String>,
}

fn exported() -> Exported {
    let m = Metrics::new(prometheus::Registry::new());
    let mut labels = BTreeMap::new();
    let collectors: [&dyn Collector; 13] = [
        &m.requests,
        &m.limiter_duration,
        &m.backend_errors,
        &m.backend_degraded,
        &m.upstream_duration,
        &m.active_connections,
        &m.tenant_throttled,
        &m.tenant_near_limit,
        &m.near_limit,
        &m.unknown_tier,
        &m.config_reloads,
        &m.overrides,
        &m.override_reseeds,
    ];
    for c in collectors {
        for d in c.desc() {
            labels.insert(d.fq_name.clone(), d.variable_labels.clone());
        }
    }
    let histograms = [&m.limiter_duration, &m.upstream_duration]
        .iter()
        .flat_map(|h| h.desc())
        .map(|d| d.fq_name.clone())
        .collect();
    Exported { labels, histograms }
}

/// A `tiergate_*` (or `process_*`) series selector found in a PromQL
/// expression: the metric name as written and its label matchers.
#[derive(Debug)]
struct Selector {
    name: String,
    matchers: Vec<(String, String, String)>,
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b':'
}

/// Finds every metric name starting with `prefix` in `expr`, with the
/// matchers of the `{...}` that follows it, if any.
fn selectors(expr: &str, prefix: &str) -> Vec<Selector> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(off) = expr[i..].find(prefix) {
        let start = i + off;
        if start > 0 && is_ident(b[start - 1]) {
            i = start + prefix.len();
            continue;
        }
        let mut end = start;
        while end < b.len() && is_ident(b[end]) {
            end += 1;
        }
        let name = expr[start..end].to_owned();
        let mut matchers = Vec::new();
        i = end;
        if i < b.len() && b[i] == b'{' {
            let close = matching_brace(expr, i).unwrap_or_else(|| panic!("unclosed {{ in {expr}"));
            matchers = parse_matchers(&expr[i + 1..close], expr);
            i = close + 1;
        }
        out.push(Selector { name, matchers });
    }
    out
}

fn matching_brace(expr: &str, open: usize) -> Option<usize> {
    let mut in_quote = false;
    let mut escaped = false;
    for (j, c) in expr[open..].char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quote => escaped = true,
            '"' => in_quote = !in_quote,
            '}' if !in_quote => return Some(open + j),
            _ => {}
        }
    }
    None
}

/// `a="x", b=~"y|z"` → `[(a, =, x), (b, =~, y|z)]`.
fn parse_matchers(body: &str, expr: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut rest = body.trim();
    while !rest.is_empty() {
        let name_end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or_else(|| panic!("bad matcher `{rest}` in {expr}"));
        let name = rest[..name_end].to_owned();
        rest = rest[name_end..].trim_start();
        let op_len = rest
            .find('"')
            .unwrap_or_else(|| panic!("matcher without a quoted value in {expr}"));
        let op = rest[..op_len].trim().to_owned();
        assert!(
            ["=", "!=", "=~", "!~"].contains(&op.as_str()),
            "bad operator `{op}` in {expr}"
        );
        rest = &rest[op_len + 1..];
        let close = rest
            .find('"')
            .unwrap_or_else(|| panic!("unterminated label value in {expr}"));
        out.push((name, op, rest[..close].to_owned()));
        rest = rest[close + 1..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    out
}

/// The exported metric a name written in a query refers to: itself, or the
/// histogram whose `_bucket`/`_sum`/`_count` series it is.
fn base_name(name: &str, exported: &Exported) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && exported.histograms.contains(base)
        {
            return base.to_owned();
        }
    }
    name.to_owned()
}

/// Asserts that every `tiergate_*` name in `expr` is exported, and that its
/// matchers use labels the metric has with values it can take. Returns the
/// metric names used.
fn check_expr(expr: &str, what: &str, exported: &Exported) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for sel in selectors(expr, "tiergate_") {
        let base = base_name(&sel.name, exported);
        assert!(
            METRIC_NAMES.contains(&base.as_str()),
            "{what}: `{}` is not in tiergate::metrics::METRIC_NAMES (expr: {expr})",
            sel.name
        );
        let labels = exported
            .labels
            .get(&base)
            .unwrap_or_else(|| panic!("{what}: `{base}` is in METRIC_NAMES but not registered"));
        for (label, op, value) in &sel.matchers {
            let is_le = label == "le" && sel.name.ends_with("_bucket");
            assert!(
                labels.contains(label) || TARGET_LABELS.contains(&label.as_str()) || is_le,
                "{what}: `{base}` has no label `{label}` (it has {labels:?}; expr: {expr})"
            );
            // Positive matchers only: `!~` may legitimately exclude anything.
            if op != "!~"
                && let Some((_, allowed)) = LABEL_VALUES.iter().find(|(l, _)| l == label)
            {
                let values: Vec<&str> = if op == "=~" {
                    value.split('|').collect()
                } else {
                    vec![value.as_str()]
                };
                for v in values {
                    assert!(
                        allowed.contains(&v),
                        "{what}: `{label}` never takes the value `{v}` (expected one of {allowed:?}; expr: {expr})"
                    );
                }
            }
        }
        used.insert(base);
    }
    // `by (...)` / `without (...)` must name labels some metric of the
    // expression has: a typo there silently merges every series into one.
    let known: BTreeSet<&str> = used
        .iter()
        .flat_map(|m| exported.labels[m].iter().map(String::as_str))
        .chain(TARGET_LABELS.iter().copied())
        .chain(["le"])
        .collect();
    if !used.is_empty() {
        for kw in ["by (", "without ("] {
            for (pos, _) in expr.match_indices(kw) {
                let list = &expr[pos + kw.len()..];
                let list = &list[..list.find(')').expect("closing parenthesis")];
                for label in list.split(',').map(str::trim).filter(|l| !l.is_empty()) {
                    assert!(
                        known.contains(label),
                        "{what}: grouping by `{label}`, which none of {used:?} has (expr: {expr})"
                    );
                }
            }
        }
    }
    used
}

/// Every `expr` string in a JSON document, with where it was found.
fn json_exprs(v: &Json, path: &str, out: &mut Vec<(String, String)>) {
    match v {
        Json::Object(map) => {
            for (k, child) in map {
                let p = format!("{path}.{k}");
                match (k.as_str(), child) {
                    ("expr", Json::String(s)) => out.push((p, s.clone())),
                    _ => json_exprs(child, &p, out),
                }
            }
        }
        Json::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                json_exprs(child, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// The dashboard's panel queries plus its template variable queries.
fn dashboard_exprs(d: &Json) -> Vec<(String, String)> {
    let mut out = Vec::new();
    json_exprs(&d["panels"], "panels", &mut out);
    for var in d["templating"]["list"].as_array().into_iter().flatten() {
        if var["type"] == "query" {
            let name = var["name"].as_str().unwrap_or("?");
            if let Some(q) = var["definition"].as_str() {
                out.push((format!("templating.{name}.definition"), q.to_owned()));
            }
            if let Some(q) = var["query"]["query"].as_str().or(var["query"].as_str()) {
                out.push((format!("templating.{name}.query"), q.to_owned()));
            }
        }
    }
    out
}

/// Alerting rules of the rule file: (name, rule).
fn alert_rules(rules: &Yaml) -> Vec<(String, Yaml)> {
    let groups = yseq(rules, "groups");
    assert!(!groups.is_empty(), "{ALERTS}: no `groups:`");
    groups
        .iter()
        .flat_map(|g| yseq(g, "rules"))
        .filter_map(|r| ystr(r, "alert").map(|a| (a.to_owned(), r.clone())))
        .collect()
}

/// GitHub's anchor for a Markdown heading.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn runbook_anchors() -> BTreeSet<String> {
    read(RUNBOOK)
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| slug(l.trim_start_matches('#')))
        .collect()
}

/// `services.<name>` of the compose file.
fn service<'a>(compose: &'a Yaml, name: &str) -> &'a Yaml {
    compose
        .get("services")
        .and_then(|s| s.get(name))
        .unwrap_or_else(|| panic!("{COMPOSE}: no service `{name}`"))
}

/// A compose service's bind mounts `(host path resolved against deploy/,
/// container path)`, short syntax.
fn bind_mounts(svc: &Yaml) -> Vec<(PathBuf, String)> {
    yseq(svc, "volumes")
        .iter()
        .filter_map(Yaml::as_str)
        .filter(|v| v.starts_with('.') || v.starts_with('/'))
        .map(|v| {
            let mut parts = v.split(':');
            let host = parts.next().unwrap_or_default();
            let target = parts.next().unwrap_or_default();
            (root().join("deploy").join(host), target.to_owned())
        })
        .collect()
}

/// The host path mounted at exactly `target` in `svc`.
fn host_path_of(svc: &Yaml, target: &str, what: &str) -> PathBuf {
    bind_mounts(svc)
        .into_iter()
        .find(|(_, t)| t == target)
        .map(|(h, _)| h)
        .unwrap_or_else(|| panic!("{COMPOSE}: {what} mounts nothing at {target}"))
}

fn host_port(url_or_addr: &str) -> (String, u16) {
    let s = url_or_addr
        .split("://")
        .last()
        .unwrap_or(url_or_addr)
        .split('/')
        .next()
        .unwrap_or_default();
    let (host, port) = s
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("no port in `{url_or_addr}`"));
    (
        host.to_owned(),
        port.parse()
            .unwrap_or_else(|_| panic!("bad port in `{url_or_addr}`")),
    )
}

/// `promtool`, if installed. Without it: a failure under `CI`, else `None`
/// after a skip note.
fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("promtool"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        if std::env::var_os("CI").is_some() {
            panic!(
                "promtool is not on PATH but CI is set: .ci/run must install the Debian \
                 `prometheus` package (apt-get install -y prometheus), which provides promtool"
            );
        }
        eprintln!(
            "note: promtool not on PATH; skipping (install Debian's `prometheus` package to run this check)"
        );
    }
    found
}

fn run_promtool(promtool: &Path, args: &[&str]) {
    let out = Command::new(promtool)
        .args(args)
        .current_dir(root())
        .output()
        .expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Dockerfile instructions (continuation lines joined, comments dropped),
/// split into stages at each `FROM`.
fn dockerfile_stages() -> Vec<Vec<String>> {
    let text = read("Dockerfile");
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(t);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stages: Vec<Vec<String>> = Vec::new();
    for ins in instructions {
        if ins.to_uppercase().starts_with("FROM ") {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .expect("Dockerfile starts with FROM")
            .push(ins);
    }
    stages
}

/// Sources of the `COPY` instructions of a stage that copy from the build
/// context (not `--from=`).
fn context_copies(stage: &[String]) -> Vec<String> {
    stage
        .iter()
        .filter(|i| i.to_uppercase().starts_with("COPY "))
        .filter(|i| !i.contains("--from"))
        .flat_map(|i| {
            let words: Vec<&str> = i
                .split_whitespace()
                .skip(1)
                .filter(|w| !w.starts_with("--"))
                .collect();
            words[..words.len() - 1]
                .iter()
                .map(|w| w.trim_end_matches('/').to_owned())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Whether `.dockerignore` keeps `path` out of the build context. Handles
/// what the file uses: plain paths (and everything under them), `*` inside
/// one component, a leading `**/`, and `!` exceptions.
fn dockerignored(path: &str) -> bool {
    fn glob(pattern: &str, text: &str) -> bool {
        match pattern.split_once('*') {
            None => pattern == text,
            Some((pre, post)) => {
                text.starts_with(pre)
                    && (pre.len()..=text.len())
                        .any(|k| glob(post, &text[k..]) && !text[pre.len()..k].contains('/'))
            }
        }
    }
    fn matches(pattern: &str, path: &str) -> bool {
        let comps: Vec<&str> = path.split('/').collect();
        let prefixes = (1..=comps.len()).map(|n| comps[..n].join("/"));
        match pattern.strip_prefix("**/") {
            Some(p) => (0..comps.len())
                .any(|s| (s + 1..=comps.len()).any(|e| glob(p, &comps[s..e].join("/")))),
            None => prefixes.into_iter().any(|pre| glob(pattern, &pre)),
        }
    }
    let mut ignored = false;
    for line in read(".dockerignore").lines() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        match l.strip_prefix('!') {
            Some(p) if matches(p.trim_start_matches('/'), path) => ignored = false,
            Some(_) => {}
            None if matches(l.trim_start_matches('/'), path) => ignored = true,
            None => {}
        }
    }
    ignored
}

/// Paths `include_str!`/`include_bytes!` pull into the crate, relative to
/// the crate root.
fn included_files() -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("src readable").flatten() {
            let p = entry.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&root().join("src"), &mut files);
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("source readable");
        for mac in ["include_str!(\"", "include_bytes!(\""] {
            for (pos, _) in text.match_indices(mac) {
                let rest = &text[pos + mac.len()..];
                let rel = &rest[..rest.find('"').expect("closing quote")];
                let abs = file.parent().expect("has a dir").join(rel);
                let norm = normalize(&abs);
                let rel_root = norm.strip_prefix(root()).unwrap_or_else(|_| {
                    panic!("{} includes a file outside the crate", file.display())
                });
                out.push(rel_root.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    out
}

fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

// ---------------------------------------------------------------------------
// dashboard
// ---------------------------------------------------------------------------

/// Every metric the Grafana dashboard queries is one tiergate exports, with
/// labels and label values it really has, and every exported metric is shown.
#[test]
fn dashboard_queries_use_exported_metrics() {
    let exported = exported();
    let d = dashboard();
    let exprs = dashboard_exprs(&d);
    assert!(
        exprs.len() >= 20,
        "suspiciously few queries: {}",
        exprs.len()
    );
    let mut used = BTreeSet::new();
    for (where_, expr) in &exprs {
        used.extend(check_expr(
            expr,
            &format!("{DASHBOARD} {where_}"),
            &exported,
        ));
    }
    let missing: Vec<_> = METRIC_NAMES
        .iter()
        .filter(|m| !used.contains(**m))
        .collect();
    assert!(
        missing.is_empty(),
        "exported but not on the dashboard: {missing:?}"
    );

    // process_* panels use names the process collector really exports.
    if cfg!(target_os = "linux") {
        let text = Metrics::new(prometheus::Registry::new()).render();
        for (where_, expr) in &exprs {
            for sel in selectors(expr, "process_") {
                assert!(
                    text.lines()
                        .any(|l| l.starts_with(&format!("{} ", sel.name))),
                    "{where_}: `{}` is not exported by the process collector",
                    sel.name
                );
            }
        }
    }
}

/// The dashboard is importable and portable: schema ~39, a `datasource`
/// variable of type prometheus used by every panel and query, an `instance`
/// variable every panel query filters on, unique panel ids, panels on the
/// 24-column grid, and the panels operators look for.
#[test]
fn dashboard_structure() {
    let d = dashboard();
    let schema = d["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    assert_eq!(d["uid"], "tiergate");
    assert!(
        d["id"].is_null(),
        "a provisioned dashboard must not carry an id"
    );

    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no `{name}` template variable"))
    };
    let ds = var("datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    let inst = var("instance");
    assert_eq!(inst["type"], "query");
    assert_eq!(inst["datasource"]["uid"], "${datasource}");
    assert_eq!(inst["includeAll"], true);
    assert_eq!(inst["allValue"], ".*");

    let panels = d["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut titles = Vec::new();
    for p in panels {
        let title = p["title"].as_str().expect("panel title");
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate id: {title}"
        );
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap(), g["w"].as_u64().unwrap());
        assert!(
            x + w <= 24 && g["h"].as_u64().unwrap() > 0,
            "{title}: gridPos {g}"
        );
        if p["type"] == "row" {
            continue;
        }
        titles.push(title.to_owned());
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "{title}: datasource"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no queries");
        for t in targets {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "{title}: target datasource"
            );
            let expr = t["expr"].as_str().expect("expr");
            assert!(
                expr.contains("instance=~\"$instance\""),
                "{title}: query ignores the instance variable: {expr}"
            );
        }
    }
    for wanted in [
        "Request rate by decision",
        "Throttle ratio by tier",
        "Top throttled tenants",
        "Near-limit tenants",
        "Limiter latency p50 / p99 by backend",
        "Backend degraded",
        "Upstream latency p50 / p99 by status class",
        "Upstream responses by status class",
        "Active connections",
        "Config reloads",
        "Overrides",
    ] {
        assert!(titles.iter().any(|t| t == wanted), "no panel `{wanted}`");
    }
    let all = dashboard_exprs(&d)
        .into_iter()
        .map(|(_, e)| e)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(all.contains("topk(10, sum by (tenant, tier) (rate(tiergate_tenant_throttled_total"));
    assert!(all.contains("histogram_quantile(0.99, sum by (backend, le) (rate(tiergate_limiter_duration_seconds_bucket"));
}

/// Every dashboard query is valid PromQL for promtool (with Grafana's
/// `$__rate_interval`, `$__range` and `$instance` substituted).
#[test]
fn dashboard_queries_parse_with_promtool() {
    let Some(promtool) = promtool() else { return };
    let exprs = dashboard_exprs(&dashboard());
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in exprs.iter().enumerate() {
        let mut e = expr
            .replace("$__rate_interval", "1m")
            .replace("$__range", "1h")
            .replace("$instance", ".*");
        // Grafana's `label_values(selector, label)` is not PromQL; check
        // the selector as `group by (label) (selector)`.
        if let Some(args) = e
            .strip_prefix("label_values(")
            .and_then(|a| a.strip_suffix(')'))
        {
            let (sel, label) = args
                .rsplit_once(',')
                .expect("label_values(selector, label)");
            e = format!("group by ({}) ({sel})", label.trim());
        }
        let quoted = serde_json::to_string(&e).expect("string");
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {quoted}\n"
        ));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(&file, rules).expect("write rules");
    run_promtool(
        &promtool,
        &["check", "rules", file.to_str().expect("utf-8 path")],
    );
}

// ---------------------------------------------------------------------------
// alert rules
// ---------------------------------------------------------------------------

/// The rule file defines exactly the expected alerts, each querying only
/// exported metrics (right labels and values), with a severity, a summary, a
/// description and a runbook_url whose anchor exists in docs/OPERATIONS.md.
#[test]
fn alert_rules_use_exported_metrics_and_link_the_runbook() {
    let exported = exported();
    let rules = yaml(ALERTS);
    let alerts = alert_rules(&rules);
    let names: BTreeSet<&str> = alerts.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ALERT_NAMES.iter().copied().collect(), "alert set");
    assert_eq!(names.len(), alerts.len(), "duplicate alert names");

    let anchors = runbook_anchors();
    for (name, rule) in &alerts {
        let expr = ystr(rule, "expr").unwrap_or_else(|| panic!("{name}: no expr"));
        let used = check_expr(expr, &format!("{ALERTS} {name}"), &exported);
        if name == "TiergateScrapeDown" {
            assert!(expr.contains("up{job=\"tiergate\"}"), "{name}: {expr}");
        } else {
            assert!(!used.is_empty(), "{name}: uses no tiergate metric");
        }
        let labels = rule
            .get("labels")
            .unwrap_or_else(|| panic!("{name}: no labels"));
        let severity = ystr(labels, "severity").unwrap_or_else(|| panic!("{name}: no severity"));
        assert!(
            ["critical", "warning", "info"].contains(&severity),
            "{name}: severity {severity}"
        );
        let ann = rule
            .get("annotations")
            .unwrap_or_else(|| panic!("{name}: no annotations"));
        for key in ["summary", "description", "runbook_url"] {
            assert!(
                ystr(ann, key).is_some_and(|s| !s.trim().is_empty()),
                "{name}: no annotations.{key}"
            );
        }
        let url = ystr(ann, "runbook_url").unwrap();
        let (file, anchor) = url
            .split_once('#')
            .unwrap_or_else(|| panic!("{name}: runbook_url without #anchor: {url}"));
        assert!(
            file.ends_with(RUNBOOK),
            "{name}: runbook_url {url} is not {RUNBOOK}"
        );
        assert!(
            anchors.contains(anchor),
            "{name}: {RUNBOOK} has no heading for #{anchor}"
        );
    }
    // The exclusions the runbook promises.
    let expr_of = |n: &str| {
        ystr(&alerts.iter().find(|(a, _)| a == n).unwrap().1, "expr")
            .unwrap()
            .to_owned()
    };
    assert!(expr_of("TiergateTenantThrottledContinuously").contains("tenant!=\"__other__\""));
    assert!(expr_of("TiergateHighThrottleRatio").contains("tier!=\"none\""));
}

/// alerts_test.yml covers every alert with a case where it fires and one
/// where it stays quiet, and its input series are metrics tiergate exports.
#[test]
fn alert_unit_tests_cover_every_alert_both_ways() {
    let exported = exported();
    let tests = yaml(ALERTS_TEST);
    let rule_files: Vec<&str> = yseq(&tests, "rule_files")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert_eq!(
        rule_files,
        ["alerts.yml"],
        "{ALERTS_TEST} must test {ALERTS}"
    );
    let mut fires = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for case in yseq(&tests, "tests") {
        for s in yseq(case, "input_series") {
            let series = ystr(s, "series").expect("series");
            if !series.starts_with("up{") {
                check_expr(series, &format!("{ALERTS_TEST} input series"), &exported);
            }
        }
        for t in yseq(case, "alert_rule_test") {
            let name = ystr(t, "alertname").expect("alertname").to_owned();
            assert!(
                ALERT_NAMES.contains(&name.as_str()),
                "test of unknown alert {name}"
            );
            if yseq(t, "exp_alerts").is_empty() {
                quiet.insert(name);
            } else {
                fires.insert(name);
            }
        }
    }
    for name in ALERT_NAMES {
        assert!(fires.contains(*name), "no test case where {name} fires");
        assert!(
            quiet.contains(*name),
            "no test case where {name} stays quiet"
        );
    }
}

/// The runbook has one entry per alert, plus the deploy and scrape sections.
#[test]
fn runbook_has_an_entry_per_alert() {
    let anchors = runbook_anchors();
    for name in ALERT_NAMES {
        assert!(
            anchors.contains(&name.to_lowercase()),
            "{RUNBOOK}: no `### {name}`"
        );
    }
    for section in [
        "deploying-with-docker-compose",
        "scraping-tiergate-with-prometheus",
    ] {
        assert!(
            anchors.contains(section),
            "{RUNBOOK}: no section #{section}"
        );
    }
}

/// `promtool check rules` accepts the alert rules.
#[test]
fn promtool_check_rules() {
    let Some(promtool) = promtool() else { return };
    run_promtool(&promtool, &["check", "rules", ALERTS]);
}

/// `promtool test rules` passes every alert unit test.
#[test]
fn promtool_test_rules() {
    let Some(promtool) = promtool() else { return };
    run_promtool(&promtool, &["test", "rules", ALERTS_TEST]);
}

/// `promtool check config` accepts prometheus.yml and the rule file it loads.
#[test]
fn promtool_check_config() {
    let Some(promtool) = promtool() else { return };
    run_promtool(&promtool, &["check", "config", PROMETHEUS]);
}

// ---------------------------------------------------------------------------
// prometheus.yml, compose stack, deploy config, Dockerfile
// ---------------------------------------------------------------------------

/// prometheus.yml loads alerts.yml by a path relative to itself (so it works
/// in the repo and mounted in the container) and has the `tiergate` job
/// that TiergateScrapeDown watches.
#[test]
fn prometheus_config_loads_the_rules_and_scrapes_tiergate() {
    let prom = yaml(PROMETHEUS);
    let dir = root().join(PROMETHEUS);
    let dir = dir.parent().expect("config dir");
    let files: Vec<&str> = yseq(&prom, "rule_files")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert_eq!(files, ["alerts.yml"]);
    for f in files {
        assert!(
            !Path::new(f).is_absolute(),
            "rule file {f} must be relative"
        );
        assert!(
            dir.join(f).is_file(),
            "rule file {f} not next to prometheus.yml"
        );
    }
    let jobs: Vec<&Yaml> = yseq(&prom, "scrape_configs")
        .iter()
        .filter(|j| ystr(j, "job_name") == Some("tiergate"))
        .collect();
    assert_eq!(jobs.len(), 1, "exactly one scrape job named `tiergate`");
    assert_eq!(
        ystr(jobs[0], "metrics_path").unwrap_or("/metrics"),
        "/metrics"
    );
}

/// The compose file parses, builds tiergate from the repo's Dockerfile,
/// mounts the deploy config where the image reads it, and wires Prometheus
/// (rules included), Grafana (datasource + dashboard) and the services the
/// deploy config names.
#[test]
fn compose_stack_is_wired_together() {
    let compose = yaml(COMPOSE);
    let deploy = root().join("deploy");

    // tiergate: built from the Dockerfile at the context root.
    let tg = service(&compose, "tiergate");
    let build = tg.get("build").expect("tiergate has a build section");
    let (context, dockerfile) = match build {
        Yaml::String(ctx) => (ctx.as_str(), "Dockerfile"),
        b => (
            ystr(b, "context").expect("build.context"),
            ystr(b, "dockerfile").unwrap_or("Dockerfile"),
        ),
    };
    let context = normalize(&deploy.join(context));
    assert_eq!(
        context,
        normalize(&root()),
        "build context must be the repo root"
    );
    assert!(
        context.join(dockerfile).is_file(),
        "{dockerfile} missing at the build context"
    );
    assert_eq!(dockerfile, "Dockerfile");
    let config = host_path_of(tg, "/etc/tiergate/tiergate.yaml", "tiergate");
    assert_eq!(normalize(&config), root().join(DEPLOY_CONFIG));

    // Prometheus: the mounted dir holds prometheus.yml and the rules it loads.
    let prom = service(&compose, "prometheus");
    let command: Vec<&str> = yseq(prom, "command")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    let config_file = command
        .iter()
        .find_map(|a| a.strip_prefix("--config.file="))
        .expect("prometheus --config.file");
    let (mount_dir, file_name) = config_file.rsplit_once('/').expect("absolute config path");
    let host_dir = normalize(&host_path_of(prom, mount_dir, "prometheus"));
    assert_eq!(host_dir, normalize(&root().join(PROMETHEUS).join("..")));
    let prom_yml = yaml(PROMETHEUS);
    assert_eq!(file_name, "prometheus.yml");
    for rf in yseq(&prom_yml, "rule_files")
        .iter()
        .filter_map(Yaml::as_str)
    {
        assert!(
            host_dir.join(rf).is_file(),
            "rules {rf} not in the mounted dir"
        );
        assert!(
            root().join(ALERTS).ends_with(rf),
            "prometheus.yml loads {rf}, not alerts.yml"
        );
    }

    // Grafana: provisioning dir with a prometheus datasource and a dashboard
    // provider whose path is where the dashboard JSON is mounted.
    let grafana = service(&compose, "grafana");
    let prov = host_path_of(grafana, "/etc/grafana/provisioning", "grafana");
    let ds_dir = prov.join("datasources");
    let datasources: Vec<Yaml> = std::fs::read_dir(&ds_dir)
        .expect("datasources dir")
        .flatten()
        .map(|e| serde_yaml::from_str(&std::fs::read_to_string(e.path()).unwrap()).unwrap())
        .collect();
    let prom_ds = datasources
        .iter()
        .flat_map(|f| yseq(f, "datasources"))
        .find(|d| ystr(d, "type") == Some("prometheus"))
        .expect("a provisioned prometheus datasource");
    assert_eq!(ystr(prom_ds, "url"), Some("http://prometheus:9090"));
    let providers: Vec<Yaml> = std::fs::read_dir(prov.join("dashboards"))
        .expect("dashboards provisioning dir")
        .flatten()
        .map(|e| serde_yaml::from_str(&std::fs::read_to_string(e.path()).unwrap()).unwrap())
        .collect();
    let path = providers
        .iter()
        .flat_map(|f| yseq(f, "providers"))
        .find_map(|p| p.get("options").and_then(|o| ystr(o, "path")))
        .expect("a file dashboard provider");
    let dash_dir = host_path_of(grafana, path, "grafana");
    assert!(
        dash_dir.join("tiergate.json").is_file(),
        "{path} does not hold tiergate.json"
    );

    // The deploy config reaches the other services by their compose names,
    // and Prometheus scrapes its admin listener.
    let cfg = Config::from_file(&root().join(DEPLOY_CONFIG))
        .unwrap_or_else(|e| panic!("{DEPLOY_CONFIG} is not a valid config:\n{e}"));
    let services = compose
        .get("services")
        .and_then(Yaml::as_mapping)
        .expect("services");
    let has_service = |h: &str| services.contains_key(Yaml::String(h.to_owned()));
    let BackendKind::Redis(redis) = &cfg.backend.kind else {
        panic!("{DEPLOY_CONFIG}: the compose stack uses the redis backend")
    };
    let RedisTarget::Single(redis_url) = &redis.target else {
        panic!("{DEPLOY_CONFIG}: single redis expected")
    };
    assert_eq!(redis_url, "redis://redis:6379/0");
    assert!(has_service("redis"));
    let upstream = cfg.upstream.url.host().expect("upstream host");
    assert!(
        has_service(upstream),
        "upstream host {upstream} is not a compose service"
    );
    assert!(
        cfg.admin.listen.ip().is_unspecified(),
        "admin must listen on all interfaces for Prometheus to scrape it"
    );
    let targets: Vec<String> = yseq(&prom_yml, "scrape_configs")
        .iter()
        .filter(|j| ystr(j, "job_name") == Some("tiergate"))
        .flat_map(|j| yseq(j, "static_configs"))
        .flat_map(|s| yseq(s, "targets"))
        .filter_map(Yaml::as_str)
        .map(str::to_owned)
        .collect();
    assert!(!targets.is_empty(), "no static tiergate target");
    for t in targets {
        let (host, port) = host_port(&t);
        assert!(
            has_service(&host),
            "scrape target {t} is not a compose service"
        );
        assert_eq!(
            port,
            cfg.admin.listen.port(),
            "scrape target {t} is not the admin port"
        );
    }
    let proxy_ports: Vec<&str> = yseq(tg, "ports").iter().filter_map(Yaml::as_str).collect();
    assert!(
        proxy_ports
            .iter()
            .any(|p| p.ends_with(&format!(":{}", cfg.server.listen.port()))),
        "proxy port {} not published: {proxy_ports:?}",
        cfg.server.listen.port()
    );
    for secret in ["TIERGATE_ADMIN_TOKEN", "TIERGATE_JWT_SECRET"] {
        assert!(
            tg.get("environment").and_then(|e| e.get(secret)).is_some(),
            "tiergate service does not set {secret}"
        );
    }
}

/// `tiergate check` accepts the compose stack's config, as the runbook tells
/// operators to run it before a reload.
#[test]
fn deploy_config_passes_tiergate_check() {
    let mut cmd = Command::new(BIN);
    cmd.args(["check", "--config", DEPLOY_CONFIG])
        .current_dir(root());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("TIERGATE_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().expect("tiergate runs");
    assert!(
        out.status.success(),
        "tiergate check --config {DEPLOY_CONFIG} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Dockerfile is the promised two-stage build: `cargo build --release
/// --locked` on rust:1-bookworm, a debian:bookworm-slim runtime as uid
/// 10001 with the config path, ports, health check, entrypoint and command
/// of the contract.
#[test]
fn dockerfile_follows_the_contract() {
    let stages = dockerfile_stages();
    assert_eq!(stages.len(), 2, "two stages");
    let (build, runtime) = (&stages[0], &stages[1]);
    assert!(
        build[0].starts_with("FROM rust:1-bookworm AS "),
        "{}",
        build[0]
    );
    assert!(
        build
            .iter()
            .any(|i| i.starts_with("RUN ") && i.contains("cargo build --release --locked")),
        "no `cargo build --release --locked`"
    );
    assert_eq!(runtime[0], "FROM debian:bookworm-slim");
    let has = |ins: &str| runtime.iter().any(|i| i == ins);
    for ins in [
        "ENV TIERGATE_CONFIG=/etc/tiergate/tiergate.yaml",
        "USER 10001:10001",
        "EXPOSE 8080 9090",
        "ENTRYPOINT [\"tiergate\"]",
        "CMD [\"serve\"]",
    ] {
        assert!(has(ins), "runtime stage lacks `{ins}`");
    }
    let hc = runtime
        .iter()
        .find(|i| i.starts_with("HEALTHCHECK"))
        .expect("HEALTHCHECK");
    assert!(hc.ends_with("CMD [\"tiergate\", \"health\"]"), "{hc}");
    let apt = runtime
        .iter()
        .find(|i| i.contains("apt-get install"))
        .expect("runtime installs ca-certificates");
    let pkgs: Vec<&str> = apt
        .split("apt-get install")
        .nth(1)
        .unwrap()
        .split("&&")
        .next()
        .unwrap()
        .split_whitespace()
        .filter(|w| !w.starts_with('-'))
        .collect();
    assert_eq!(pkgs, ["ca-certificates"], "runtime packages");
    assert!(
        runtime
            .iter()
            .any(|i| i.starts_with("COPY --from=") && i.ends_with("/usr/local/bin/tiergate")),
        "binary not copied to /usr/local/bin/tiergate (on PATH for `tiergate health`)"
    );
}

/// Everything `cargo build` reads is copied into the build stage and not
/// excluded by .dockerignore: the manifest, lock file, sources, every
/// explicitly declared target (the bench), and files pulled in with `include_str!` (the demo embeds
/// config/tiergate.yaml). A miss here only shows up as a failed image build.
#[test]
fn docker_build_context_has_what_cargo_reads() {
    let stages = dockerfile_stages();
    let copies = context_copies(&stages[0]);
    let mut needed = vec![
        "Cargo.toml".to_owned(),
        "Cargo.lock".to_owned(),
        "src/main.rs".to_owned(),
        "src/lib.rs".to_owned(),
    ];
    let manifest: toml_like::Manifest = toml_like::parse(&read("Cargo.toml"));
    needed.extend(manifest.target_files);
    needed.extend(included_files());
    for path in &needed {
        assert!(root().join(path).exists(), "{path} does not exist");
        assert!(
            copies
                .iter()
                .any(|c| c == path || path.starts_with(&format!("{c}/"))),
            "the build stage does not COPY {path} (copies: {copies:?})"
        );
        assert!(!dockerignored(path), ".dockerignore excludes {path}");
    }
    for stage in &stages {
        for src in context_copies(stage) {
            assert!(
                !dockerignored(&src),
                ".dockerignore excludes COPY source {src}"
            );
        }
    }
    assert!(
        dockerignored("target/release/tiergate"),
        "target/ must stay out of the context"
    );
    assert!(
        dockerignored(".git/HEAD"),
        ".git must stay out of the context"
    );
}

/// Just enough of Cargo.toml (no TOML parser in the dependency tree): the
/// source files of explicitly declared `[[bench]]`, `[[test]]`,
/// `[[example]]` and `[[bin]]` targets, which cargo requires to exist
/// whatever it builds.
mod toml_like {
    pub struct Manifest {
        pub target_files: Vec<String>,
    }

    fn value(line: &str, key: &str) -> Option<String> {
        let rest = line.strip_prefix(key)?.trim_start().strip_prefix('=')?;
        Some(rest.trim().trim_matches('"').to_owned())
    }

    pub fn parse(text: &str) -> Manifest {
        // (section dir, name, explicit path) per declared target
        let mut targets: Vec<(&str, Option<String>, Option<String>)> = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                let dir = match line {
                    "[[bench]]" => Some("benches"),
                    "[[test]]" => Some("tests"),
                    "[[example]]" => Some("examples"),
                    "[[bin]]" => Some("src/bin"),
                    _ => None,
                };
                if let Some(dir) = dir {
                    targets.push((dir, None, None));
                } else if !line.starts_with("[[") {
                    targets.push(("", None, None));
                }
            } else if let Some((dir, name, path)) = targets.last_mut()
                && !dir.is_empty()
            {
                if let Some(v) = value(line, "name") {
                    *name = Some(v);
                } else if let Some(v) = value(line, "path") {
                    *path = Some(v);
                }
            }
        }
        let target_files = targets
            .into_iter()
            .filter(|(dir, ..)| !dir.is_empty())
            .filter_map(|(dir, name, path)| path.or_else(|| name.map(|n| format!("{dir}/{n}.rs"))))
            .collect();
        Manifest { target_files }
    }
}

/// The image's HEALTHCHECK runs `tiergate health`, so the binary must have
/// that subcommand, with the `--admin URL` option the runbook documents.
#[test]
fn health_subcommand_exists_for_the_image_healthcheck() {
    let out = Command::new(BIN)
        .args(["health", "--help"])
        .env_remove("TIERGATE_CONFIG")
        .output()
        .expect("tiergate runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("--admin"),
        "`tiergate health --help` failed or lacks --admin ({}):\n{text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
