//! `tiergate demo` (SPEC §1): zero setup, a built-in echo upstream, the
//! example tiers, and printed curl commands that really work — including a
//! JWT the demo signs itself — so a new user sees a 429 at once.

mod common;

use std::time::Duration;

use common::{Tiergate, client, poll_until};

/// Starts the demo and waits until its instructions are printed.
fn start_demo() -> Tiergate {
    let demo = Tiergate::start_program(
        env!("CARGO_BIN_EXE_tiergate"),
        &["demo", "--log-format", "json"],
        "",
        &[],
    );
    assert!(
        poll_until(Duration::from_secs(5), || demo
            .stdout()
            .iter()
            .any(|l| l.contains("Ctrl-C"))),
        "no instructions printed:\n{}",
        demo.dump()
    );
    demo
}

/// The printed bearer token of step 3.
fn printed_token(demo: &Tiergate) -> String {
    let out = demo.stdout().join("\n");
    let start = out.find("Bearer ").expect("a bearer token is printed") + "Bearer ".len();
    out[start..]
        .split(|c: char| c == '\'' || c.is_whitespace())
        .next()
        .expect("token")
        .to_string()
}

/// The demo needs nothing but the binary: the printed header-mode loop
/// reaches 429 within the free tier's burst, answered by the echo upstream
/// until then.
#[tokio::test]
async fn demo_serves_the_example_tiers_and_reaches_429() {
    let demo = start_demo();
    let http = client();
    let url = format!("{}/api/hello", demo.proxy_url());
    let mut statuses = Vec::new();
    for _ in 0..30 {
        let r = http
            .get(&url)
            .header("x-tenant-id", "alice")
            .send()
            .await
            .expect("request");
        statuses.push(r.status().as_u16());
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        (20..=21).contains(&ok),
        "free tier burst is 20 (+1 refill at most): {statuses:?}"
    );
    assert_eq!(*statuses.last().unwrap(), 429);
    let body: serde_json::Value = http
        .get(&url)
        .header("x-tenant-id", "bob")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["echo"], true);
    assert_eq!(body["x-tenant-id"], "bob");
    assert_eq!(body["x-tenant-tier"], "free");
}

/// The token the demo prints verifies: tenant `demo-jwt` on tier starter;
/// a forged token with a spoofed header is 401.
#[tokio::test]
async fn printed_demo_token_verifies_on_the_starter_tier() {
    let demo = start_demo();
    let token = printed_token(&demo);
    let http = client();
    let url = format!("{}/api/hello", demo.proxy_url());
    let r = http.get(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["x-ratelimit-limit"], "100");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["x-tenant-id"], "demo-jwt");
    assert_eq!(body["x-tenant-tier"], "starter");
    let forged = http
        .get(&url)
        .bearer_auth("not.a.jwt")
        .header("x-tenant-id", "acme")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status().as_u16(), 401);
    let admin = http
        .get(format!("{}/readyz", demo.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status().as_u16(), 200);
}
