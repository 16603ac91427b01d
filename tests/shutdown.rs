//! Process lifecycle of the real binary (SPEC §2 `shutdown_grace`, §7
//! reload): graceful drain on SIGTERM/SIGINT and config reload on SIGHUP.

mod common;

use std::net::TcpStream;
use std::time::Duration;

use common::{Tiergate, Upstream, burst, client, eventually};
use serde_json::Value;

/// Loopback listeners, header identity, one `free` tier with the given
/// burst and a rate so slow nothing refills during a test.
fn config(upstream: &str, burst: u32) -> String {
    format!(
        r#"
server:
  listen: "127.0.0.1:0"
  shutdown_grace: 10s
admin:
  listen: "127.0.0.1:0"
upstream:
  url: "{upstream}"
tiers:
  free: {{ rate: 1/h, burst: {burst} }}
default_tier: free
"#
    )
}

/// Number of 200s among `statuses`, after checking every other status is
/// a 429.
fn admitted(statuses: &[u16]) -> usize {
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "unexpected statuses: {statuses:?}"
    );
    statuses.iter().filter(|s| **s == 200).count()
}

/// A request in flight when SIGTERM arrives completes with 200; meanwhile
/// `/readyz` says 503 `draining` and the proxy stops accepting; then the
/// process exits 0.
///
/// Why: SPEC §2 `shutdown_grace` — rolling deploys must not cut requests,
/// and load balancers must see the replica leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_request_then_exits_0() {
    let up = Upstream::start();
    let tg = Tiergate::start(&config(&up.url(), 10));
    let http = client();

    let slow = {
        let req = http
            .get(format!("{}/slow?ms=1500", tg.proxy_url()))
            .header("x-tenant-id", "t1");
        tokio::spawn(async move {
            let resp = req.send().await?;
            let status = resp.status().as_u16();
            let body = resp.text().await?;
            Ok::<_, reqwest::Error>((status, body))
        })
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            up.count_path("/slow") == 1
        })
        .await,
        "the slow request never reached the upstream\n{}",
        tg.dump()
    );

    tg.sigterm();

    // While the slow request keeps it draining: not ready, not accepting.
    let readyz = format!("{}/readyz", tg.admin_url());
    let mut last = String::new();
    let mut draining = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while !draining && tokio::time::Instant::now() < deadline {
        match http.get(&readyz).send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let text = resp.text().await.unwrap_or_default();
                let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                draining = status == 503 && body["status"] == "draining";
                last = format!("{status} {text}");
            }
            Err(e) => last = format!("error: {e}"),
        }
        if !draining {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert!(draining, "/readyz never said 503 draining: {last}");
    let proxy = tg.proxy_addr();
    let refusing = eventually(Duration::from_secs(1), || async move {
        tokio::task::spawn_blocking(move || {
            TcpStream::connect_timeout(&proxy, Duration::from_millis(200)).is_err()
        })
        .await
        .unwrap_or(false)
    })
    .await;
    assert!(
        refusing,
        "the proxy still accepts connections while draining"
    );

    let (status, body) = tokio::time::timeout(Duration::from_secs(5), slow)
        .await
        .expect("the in-flight request finishes within 5 s")
        .expect("task")
        .expect("the in-flight request survives SIGTERM");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""ok":true"#), "{body}");

    let exit = tokio::task::block_in_place(|| tg.wait_exit(Duration::from_secs(5)))
        .unwrap_or_else(|| panic!("still running 5 s after draining\n{}", tg.dump()));
    assert!(exit.success(), "exit status {exit}\n{}", tg.dump());
}

/// SIGINT (Ctrl-C) shuts down cleanly with exit code 0.
///
/// Why: SPEC §2 — SIGINT is handled like SIGTERM (local runs, `docker stop`
/// with a custom stop signal).
#[tokio::test]
async fn sigint_exits_0() {
    let up = Upstream::start();
    let tg = Tiergate::start(&config(&up.url(), 10));
    let resp = client()
        .get(format!("{}/x", tg.proxy_url()))
        .header("x-tenant-id", "t1")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    drop(resp);

    tg.sigint();
    let exit = tg
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("still running 5 s after SIGINT\n{}", tg.dump()));
    assert!(exit.success(), "exit status {exit}\n{}", tg.dump());
}

/// SIGHUP with a changed valid config applies it without a restart (a
/// bigger burst admits exactly more); SIGHUP with an invalid file keeps the
/// old config serving and logs an error.
///
/// Why: SPEC §7 — admins change tiers without dropping traffic, and a typo
/// must never take the limits away.
#[tokio::test]
async fn sighup_applies_valid_config_and_keeps_old_one_on_invalid() {
    let up = Upstream::start();
    let tg = Tiergate::start(&config(&up.url(), 3));
    let http = client();
    let url = format!("{}/r", tg.proxy_url());
    let pid = tg.pid();

    assert_eq!(
        admitted(&burst(&http, &url, &[("x-tenant-id", "a")], 6).await),
        3
    );

    tg.write_config(&config(&up.url(), 5));
    tg.reload_by_sighup();
    assert_eq!(
        admitted(&burst(&http, &url, &[("x-tenant-id", "b")], 8).await),
        5,
        "the new burst is not applied"
    );

    tg.write_config("tiers: [this is not: a valid config\n");
    tg.sighup();
    let line = tg
        .wait_for_log("reload refused", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no refused-reload log\n{}", tg.dump()));
    assert!(line.contains("ERROR"), "not logged as an error: {line}");
    assert_eq!(
        admitted(&burst(&http, &url, &[("x-tenant-id", "c")], 8).await),
        5,
        "the old config stopped serving after an invalid reload"
    );
    assert!(tg.is_running());
    assert_eq!(tg.pid(), pid, "reload restarted the process");
}
