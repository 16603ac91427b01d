//! `tiergate top`: a terminal view for SREs. It scrapes the admin
//! listener's `/metrics` and `/readyz` twice, `interval` apart, and shows
//! per-tier request and throttle rates, the most throttled tenants, and the
//! backend's state; `--once` prints one such snapshot for scripts.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use http::Method;
use serde_json::Value;

use crate::client::{AdminClient, ClientError, table};

/// One scrape: metric samples keyed by name and sorted label pairs.
pub struct Sample {
    at: Instant,
    values: HashMap<(String, Vec<(String, String)>), f64>,
    ready: Value,
}

impl Sample {
    fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.values
            .iter()
            .filter(|((n, labels), _)| {
                n == name
                    && filter
                        .iter()
                        .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, v)| v)
            .sum()
    }

    fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .values
            .keys()
            .filter(|(n, _)| n == name)
            .filter_map(|(_, labels)| {
                labels
                    .iter()
                    .find(|(k, _)| k == label)
                    .map(|(_, v)| v.clone())
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Parses the Prometheus text exposition format (the subset tiergate
/// writes: no timestamps, label values without newlines).
pub fn parse_metrics(text: &str) -> HashMap<(String, Vec<(String, String)>), f64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (head, value) = match line.rfind(' ') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match head.find('{') {
            Some(i) => (
                &head[..i],
                parse_labels(&head[i + 1..head.len().saturating_sub(1)]),
            ),
            None => (head, Vec::new()),
        };
        out.insert((name.to_string(), labels), value);
    }
    out
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut rest = s;
    while let Some(eq) = rest.find("=\"") {
        let key = rest[..eq].trim_start_matches(',').trim().to_string();
        let mut value = String::new();
        let mut chars = rest[eq + 2..].char_indices();
        let mut end = rest.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(match n {
                            'n' => '\n',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = eq + 2 + i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.push((key, value));
        rest = &rest[end.min(rest.len())..];
    }
    labels.sort();
    labels
}

/// Scrapes `/metrics` and `/readyz` once.
pub async fn sample(client: &AdminClient) -> Result<Sample, ClientError> {
    let (_, metrics) = client.call(Method::GET, "/metrics", None).await?;
    let text = metrics.as_str().unwrap_or_default();
    // /readyz answers 503 while degraded under deny or draining: still show it.
    let ready = match client.call(Method::GET, "/readyz", None).await {
        Ok((_, v)) => v,
        Err(ClientError::Api { message, .. }) => {
            serde_json::from_str(&message).unwrap_or(Value::Null)
        }
        Err(e) => return Err(e),
    };
    Ok(Sample {
        at: Instant::now(),
        values: parse_metrics(text),
        ready,
    })
}

/// Renders the view from two samples.
pub fn render(admin: &str, prev: &Sample, cur: &Sample, top_n: usize) -> String {
    let secs = cur.at.duration_since(prev.at).as_secs_f64().max(1e-3);
    let rate = |name: &str, filter: &[(&str, &str)]| {
        (cur.sum(name, filter) - prev.sum(name, filter)).max(0.0) / secs
    };
    let mut out = String::new();
    let status = cur
        .ready
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("unknown");
    let backend = cur
        .ready
        .get("backend")
        .and_then(Value::as_str)
        .unwrap_or("?");
    out.push_str(&format!(
        "tiergate {admin}  backend {backend}  status {status}  degraded {}  overrides {}  connections {}\n\n",
        cur.sum("tiergate_backend_degraded", &[]) as i64 == 1,
        cur.sum("tiergate_overrides", &[]) as i64,
        cur.sum("tiergate_active_connections", &[]) as i64,
    ));
    let mut rows = Vec::new();
    for tier in cur.label_values("tiergate_requests_total", "tier") {
        let all = rate("tiergate_requests_total", &[("tier", &tier)]);
        let allowed = rate(
            "tiergate_requests_total",
            &[("tier", &tier), ("decision", "allowed")],
        );
        let throttled = rate(
            "tiergate_requests_total",
            &[("tier", &tier), ("decision", "throttled")],
        );
        let ratio = if all > 0.0 {
            100.0 * throttled / all
        } else {
            0.0
        };
        rows.push(vec![
            tier,
            format!("{all:.1}"),
            format!("{allowed:.1}"),
            format!("{throttled:.1}"),
            format!("{ratio:.1}%"),
        ]);
    }
    out.push_str(&table(
        &["TIER", "REQ/S", "ALLOWED/S", "THROTTLED/S", "THROTTLED"],
        &rows,
    ));
    out.push('\n');
    let mut tenants: Vec<(String, String, f64, f64)> = cur
        .values
        .iter()
        .filter(|((n, _), _)| n == "tiergate_tenant_throttled_total")
        .map(|((_, labels), total)| {
            let get = |k: &str| {
                labels
                    .iter()
                    .find(|(lk, _)| lk == k)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            let (tenant, tier) = (get("tenant"), get("tier"));
            let before = prev.sum(
                "tiergate_tenant_throttled_total",
                &[("tenant", &tenant), ("tier", &tier)],
            );
            (tenant, tier, (total - before).max(0.0) / secs, *total)
        })
        .collect();
    tenants.sort_by(|a, b| b.2.total_cmp(&a.2).then(b.3.total_cmp(&a.3)));
    let rows: Vec<Vec<String>> = tenants
        .into_iter()
        .take(top_n)
        .map(|(t, tier, r, total)| vec![t, tier, format!("{r:.1}"), format!("{total:.0}")])
        .collect();
    out.push_str("most throttled tenants\n");
    out.push_str(&table(&["TENANT", "TIER", "THROTTLED/S", "TOTAL"], &rows));
    out
}

/// Runs the view: one snapshot with `once`, else refreshes every
/// `interval` until interrupted.
pub async fn run(
    client: &AdminClient,
    admin: &str,
    interval: Duration,
    once: bool,
    top_n: usize,
) -> Result<(), ClientError> {
    let mut prev = sample(client).await?;
    loop {
        tokio::time::sleep(interval).await;
        let cur = sample(client).await?;
        let view = render(admin, &prev, &cur, top_n);
        if once {
            print!("{view}");
            return Ok(());
        }
        print!("\x1b[2J\x1b[H{view}");
        prev = cur;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exposition parser reads names, labels (with escapes) and values.
    #[test]
    fn parses_prometheus_text() {
        let m = parse_metrics(
            "# HELP x y\ntiergate_requests_total{decision=\"allowed\",route=\"default\",tier=\"free\"} 12\ntiergate_overrides 3\nweird{a=\"q\\\"x\"} 1.5\n",
        );
        let key = (
            "tiergate_requests_total".to_string(),
            vec![
                ("decision".to_string(), "allowed".to_string()),
                ("route".to_string(), "default".to_string()),
                ("tier".to_string(), "free".to_string()),
            ],
        );
        assert_eq!(m[&key], 12.0);
        assert_eq!(m[&("tiergate_overrides".to_string(), vec![])], 3.0);
        assert_eq!(
            m[&(
                "weird".to_string(),
                vec![("a".to_string(), "q\"x".to_string())]
            )],
            1.5
        );
    }
}
