//! Self-tests of the shared integration-test harness (`tests/common`), for
//! the parts that do not need a working `tiergate` binary.

mod common;

use std::time::{Duration, Instant};

use common::{RedisServer, Tiergate, Upstream};

/// A fake "tiergate" that prints a valid ready line, reports SIGHUP on
/// stderr, and otherwise idles.
const FAKE_READY: &str = r#"trap 'echo "got hup" >&2' HUP
echo 'not json' >&2
echo '{"level":"INFO","fields":{"message":"ready","proxy":"127.0.0.1:41234","admin":"127.0.0.1:41235"}}' >&2
while :; do sleep 0.05; done"#;

/// redis-server comes up, answers PING through redis-cli, and `restart`
/// brings it back empty on the same port.
#[test]
fn redis_starts_and_restart_empties_it() {
    let mut redis = RedisServer::start();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}/0", redis.port()));
    assert_eq!(redis.cli(&["PING"]), "PONG");
    assert_eq!(redis.cli(&["SET", "k", "v", "EX", "100"]), "OK");
    let ttl: i64 = redis.cli(&["TTL", "k"]).parse().unwrap();
    assert!((1..=100).contains(&ttl), "ttl {ttl}");
    assert_eq!(redis.cli(&["KEYS", "*"]), "k");

    let port = redis.port();
    redis.restart();
    assert_eq!(redis.port(), port);
    assert!(redis.is_up());
    assert_eq!(redis.cli(&["DBSIZE"]), "0");
}

/// `kill` makes redis unreachable until `restart`.
#[test]
fn redis_kill_and_restart() {
    let mut redis = RedisServer::start();
    redis.kill();
    assert!(!redis.is_up());
    redis.restart();
    assert!(redis.is_up());
}

/// The URL works with the `redis` crate the product uses.
#[tokio::test]
async fn redis_url_works_with_redis_crate() {
    let redis = RedisServer::start();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    assert_eq!(pong, "PONG");
}

/// Two servers started together get different ports and do not share data.
#[test]
fn redis_servers_are_isolated() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    assert_ne!(a.port(), b.port());
    a.cli(&["SET", "only-a", "1"]);
    assert_eq!(b.cli(&["EXISTS", "only-a"]), "0");
}

/// The upstream records method, path+query, headers and body length, and
/// implements `/status/N`, `/echo` and the default JSON body.
#[tokio::test]
async fn upstream_records_requests() {
    let up = Upstream::start();
    let http = common::client();

    let resp = http
        .get(format!("{}/hello?x=1", up.url()))
        .header("x-test", "yes")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-upstream"], "1");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body, serde_json::json!({"ok": true, "path": "/hello"}));

    let resp = http
        .get(format!("{}/status/503", up.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);

    let resp = http
        .post(format!("{}/echo", up.url()))
        .header("content-type", "text/plain")
        .body("hello echo")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/plain");
    assert_eq!(resp.text().await.unwrap(), "hello echo");

    let resp = http
        .put(format!("{}/upload", up.url()))
        .body(vec![7u8; 5000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let seen = up.seen();
    assert_eq!(seen.len(), 4);
    assert_eq!(up.count(), 4);
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].path, "/hello?x=1");
    assert_eq!(seen[0].version, "HTTP/1.1");
    assert_eq!(seen[0].header("X-Test"), Some("yes"));
    assert_eq!(seen[1].path, "/status/503");
    assert_eq!(seen[2].method, "POST");
    assert_eq!(seen[2].body_len, 10);
    assert_eq!(seen[3].body_len, 5000);
    assert_eq!(up.count_path("/status/"), 1);
    assert_eq!(up.count_path("/hello"), 1);
    assert_eq!(up.last().unwrap().method, "PUT");

    up.clear();
    assert_eq!(up.count(), 0);
}

/// `/slow?ms=N` waits at least N ms; `burst` returns every status.
#[tokio::test]
async fn upstream_slow_and_burst() {
    let up = Upstream::start();
    let http = common::client();
    let start = Instant::now();
    let statuses = common::burst(&http, &format!("{}/slow?ms=200", up.url()), &[], 10).await;
    assert!(start.elapsed() >= Duration::from_millis(200));
    // Concurrent, not sequential (10 x 200 ms would be 2 s).
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(statuses, vec![200; 10]);
    assert_eq!(up.count_path("/slow"), 10);

    let statuses = common::burst(
        &http,
        &format!("{}/status/429", up.url()),
        &[("x-tenant-id", "acme")],
        3,
    )
    .await;
    assert_eq!(statuses, vec![429; 3]);
    assert!(
        up.seen()
            .iter()
            .filter(|s| s.path == "/status/429")
            .all(|s| s.header("x-tenant-id") == Some("acme"))
    );
}

/// The upstream speaks h2c (prior knowledge) too.
#[tokio::test]
async fn upstream_speaks_h2c() {
    let up = Upstream::start();
    let url = format!("{}/h2?y=2", up.url());
    let (status, headers, body) = common::h2c_request("POST", &url, &[("x-h", "1")], "abc").await;
    assert_eq!(status, 200);
    assert!(headers.iter().any(|(k, v)| k == "x-upstream" && v == "1"));
    assert!(String::from_utf8_lossy(&body).contains("\"/h2\""));
    let seen = up.last().unwrap();
    assert_eq!(seen.version, "HTTP/2.0");
    assert_eq!(seen.path, "/h2?y=2");
    assert_eq!(seen.header("x-h"), Some("1"));
    assert_eq!(seen.body_len, 3);
}

/// The upstream works from a plain `#[test]` (own runtime), and `raw_http`
/// reads a complete response.
#[test]
fn upstream_from_sync_test_with_raw_http() {
    let up = Upstream::start();
    let resp = common::raw_http(
        up.addr(),
        b"GET /status/418 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(resp.starts_with("HTTP/1.1 418"), "{resp}");
    assert!(resp.ends_with(r#"{"status":418}"#), "{resp}");
    assert_eq!(up.count_path("/status/418"), 1);
}

/// A request with `Upgrade` gets 101 and then a raw byte echo.
#[test]
fn upstream_upgrade_echoes_bytes() {
    let up = Upstream::start();
    let resp = common::raw_http(
        up.addr(),
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nping-bytes",
        Duration::from_millis(500),
    );
    assert!(resp.starts_with("HTTP/1.1 101"), "{resp}");
    assert!(
        resp.to_ascii_lowercase().contains("upgrade: websocket"),
        "{resp}"
    );
    assert!(resp.ends_with("ping-bytes"), "{resp}");
}

/// Dropping the upstream closes its port.
#[tokio::test]
async fn upstream_drop_closes_port() {
    let up = Upstream::start();
    let url = up.url();
    drop(up);
    let err = common::client().get(&url).send().await.unwrap_err();
    assert!(err.is_connect(), "{err:?}");
}

/// Nothing listens on `closed_port_url()`.
#[tokio::test]
async fn closed_port_refuses() {
    let url = common::closed_port_url();
    assert!(url.starts_with("http://127.0.0.1:"));
    let err = common::client().get(&url).send().await.unwrap_err();
    assert!(err.is_connect(), "{err:?}");
    assert_ne!(common::free_port(), 0);
}

/// The readiness contract: addresses come from the JSON ready line, all
/// stderr is kept, signals are delivered, and SIGTERM ends the process.
#[test]
fn tiergate_handle_follows_ready_contract() {
    let tg = Tiergate::start_program("sh", &["-c", FAKE_READY], "server: {}\n", &[]);
    assert_eq!(tg.proxy_url(), "http://127.0.0.1:41234");
    assert_eq!(tg.admin_url(), "http://127.0.0.1:41235");
    assert_eq!(tg.proxy_addr().port(), 41234);
    assert!(tg.pid() > 0);
    assert_eq!(
        std::fs::read_to_string(tg.config_path()).unwrap(),
        "server: {}\n"
    );
    assert_eq!(tg.logs()[0], "not json");
    assert_eq!(tg.logs().len(), 2);

    tg.sighup();
    assert!(
        tg.wait_for_log("got hup", Duration::from_secs(5)).is_some(),
        "{}",
        tg.dump()
    );
    assert!(tg.is_running());

    tg.sigterm();
    let status = tg
        .wait_exit(Duration::from_secs(5))
        .expect("exits on SIGTERM");
    assert!(!status.success());
    assert!(!tg.is_running());
}

/// A process that exits before the ready line makes `start` panic with its
/// stderr.
#[test]
#[should_panic(expected = "boom: bad config")]
fn tiergate_start_panics_with_stderr_on_early_exit() {
    Tiergate::start_program(
        "sh",
        &["-c", "echo 'boom: bad config' >&2; exit 3"],
        "",
        &[],
    );
}

/// `restart` relaunches in the same directory and waits for readiness again.
#[test]
fn tiergate_handle_restart() {
    let mut tg = Tiergate::start_program("sh", &["-c", FAKE_READY], "", &[]);
    let dir = tg.dir().to_path_buf();
    let pid = tg.pid();
    tg.restart();
    assert_ne!(tg.pid(), pid);
    assert_eq!(tg.dir(), dir);
    assert!(tg.is_running());
}
