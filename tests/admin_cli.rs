//! The admin CLI (SPEC §1: `tiergate override set|rm|ls`, `tiergate
//! tenant`, `tiergate health`) round-tripping against a real running
//! instance: what people see in tables, what scripts get with `--json`,
//! and that every failure (validation, missing token, unreachable admin
//! listener) exits non-zero with a message that says what to do.

mod common;

use common::{Tiergate, Upstream, closed_port_url, run_tiergate};
use serde_json::Value;

/// The admin token the instance and the CLI share.
const TOKEN: &str = "t0ken";

/// Memory backend, header identity; `free` burst 2 and `gold` burst 5,
/// one token a minute so remaining counts are exact.
fn config(upstream: &str) -> String {
    format!(
        "server:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\nupstream:\n  url: \"{upstream}\"\nbackend:\n  type: memory\n  state_file: \"state.json\"\ntiers:\n  free: {{ rate: 1/m, burst: 2 }}\n  gold: {{ rate: 1/m, burst: 5 }}\ndefault_tier: free\n"
    )
}

/// A running instance with the admin token set.
fn start(up: &Upstream) -> Tiergate {
    Tiergate::start_with_env(&config(&up.url()), &[("TIERGATE_ADMIN_TOKEN", TOKEN)])
}

/// One CLI run's result.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ok(&self) -> &Self {
        assert_eq!(self.code, 0, "expected success: {self:#?}");
        self
    }

    fn failed(&self) -> &Self {
        assert_ne!(self.code, 0, "expected a non-zero exit: {self:#?}");
        assert!(
            self.stdout.trim().is_empty(),
            "nothing on stdout on failure: {self:#?}"
        );
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }
}

/// Runs `tiergate <args...> --admin <admin>` with `env`.
fn cli(admin: &str, args: &[&str], env: &[(&str, &str)]) -> Out {
    let mut all = args.to_vec();
    all.extend(["--admin", admin]);
    let (code, stdout, stderr) = run_tiergate(&all, env);
    Out {
        code,
        stdout,
        stderr,
    }
}

/// Runs the CLI with the right token.
fn cli_ok(tg: &Tiergate, args: &[&str]) -> Out {
    cli(&tg.admin_url(), args, &[("TIERGATE_ADMIN_TOKEN", TOKEN)])
}

/// One proxied request as `tenant`; returns its status.
async fn hit(tg: &Tiergate, tenant: &str) -> u16 {
    common::client()
        .get(format!("{}/api/items", tg.proxy_url()))
        .header("x-tenant-id", tenant)
        .send()
        .await
        .expect("proxy request")
        .status()
        .as_u16()
}

/// The whole admin workflow an operator runs from a shell: set an
/// override, see it listed, inspect the tenant, remove it; each step must
/// show the right data in the table and in `--json`.
#[tokio::test]
async fn override_set_ls_tenant_rm_round_trip_through_the_admin_api() {
    let up = Upstream::start();
    let tg = start(&up);

    let set = cli_ok(
        &tg,
        &["override", "set", "acme", "--tier", "gold", "--reason", "x"],
    );
    set.ok();
    let header = set.stdout.lines().next().expect("table header");
    for col in [
        "TENANT", "TIER", "RATE", "BURST", "EXPIRES", "REASON", "UPDATED",
    ] {
        assert!(header.contains(col), "header has {col}: {set:#?}");
    }
    let row = set.stdout.lines().nth(1).expect("one row");
    assert!(
        row.starts_with("acme") && row.contains("gold") && row.contains(" x "),
        "row shows tenant, tier and reason: {set:#?}"
    );

    let ls = cli_ok(&tg, &["override", "ls"]);
    ls.ok();
    let rows: Vec<&str> = ls.stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{ls:#?}");
    assert!(
        rows[0].starts_with("acme") && rows[0].contains("gold"),
        "{ls:#?}"
    );

    let ls_json = cli_ok(&tg, &["override", "ls", "--json"]);
    let v = ls_json.ok().json();
    let list = v["overrides"].as_array().expect("overrides array");
    assert_eq!(list.len(), 1, "{v:#}");
    let o = &list[0];
    assert_eq!(o["tenant"], "acme");
    assert_eq!(o["tier"], "gold");
    assert_eq!(o["reason"], "x");
    assert_eq!(o["rate"], Value::Null);
    assert_eq!(o["burst"], Value::Null);
    assert_eq!(o["expires_at"], Value::Null);
    assert!(o["updated_at"].is_string(), "{v:#}");

    // `--json` on set prints the stored override; `--rate/--burst/--expires`
    // are passed through.
    let set_json = cli_ok(
        &tg,
        &[
            "override",
            "set",
            "globex",
            "--rate",
            "2/m",
            "--burst",
            "7",
            "--expires",
            "2099-01-01T00:00:00Z",
            "--json",
        ],
    );
    let g = set_json.ok().json();
    assert_eq!(g["tenant"], "globex");
    assert_eq!(g["rate"], "2/m");
    assert_eq!(g["burst"], 7);
    assert_eq!(g["expires_at"], "2099-01-01T00:00:00Z");
    assert_eq!(g["tier"], Value::Null);

    // Tenant view: two requests on gold (burst 5) leave exactly 3.
    assert_eq!(hit(&tg, "acme").await, 200);
    assert_eq!(hit(&tg, "acme").await, 200);
    let t = cli_ok(&tg, &["tenant", "acme"]);
    t.ok();
    for needle in [
        "acme",
        "gold (from override)",
        "1/m burst 5",
        "remaining  3",
        "reason     x",
    ] {
        assert!(
            t.stdout.contains(needle),
            "tenant view shows `{needle}`: {t:#?}"
        );
    }
    let tj = cli_ok(&tg, &["tenant", "acme", "--json"]);
    let v = tj.ok().json();
    assert_eq!(v["tenant"], "acme");
    assert_eq!(v["tier"], "gold");
    assert_eq!(v["source"], "override");
    assert_eq!(v["limit"]["burst"], 5);
    assert_eq!(v["limit"]["rate"], "1/m");
    assert_eq!(v["remaining"], 3);
    assert_eq!(v["override"]["tier"], "gold");

    let rm = cli_ok(&tg, &["override", "rm", "acme"]);
    rm.ok();
    assert!(rm.stdout.contains("acme"), "{rm:#?}");
    let t = cli_ok(&tg, &["tenant", "acme"]);
    assert!(t.ok().stdout.contains("free (from default)"), "{t:#?}");
    assert!(t.stdout.contains("override   none"), "{t:#?}");
    let ls = cli_ok(&tg, &["override", "ls", "--json"]);
    let v = ls.ok().json();
    let tenants: Vec<&str> = v["overrides"]
        .as_array()
        .expect("list")
        .iter()
        .map(|o| o["tenant"].as_str().expect("tenant"))
        .collect();
    assert_eq!(tenants, ["globex"]);

    let again = cli_ok(&tg, &["override", "rm", "acme"]);
    again.failed();
    assert!(again.stderr.contains("no override"), "{again:#?}");
}

/// Scripts rely on the exit code and operators on the message: a value
/// the server rejects must fail the command and show the server's own
/// explanation, and change nothing.
#[test]
fn override_set_with_invalid_values_exits_non_zero_with_the_servers_message() {
    let up = Upstream::start();
    let tg = start(&up);
    let bad_tier = cli_ok(&tg, &["override", "set", "acme", "--tier", "nope"]);
    bad_tier.failed();
    assert!(
        bad_tier.stderr.contains("unknown tier `nope`") && bad_tier.stderr.contains("gold"),
        "the server's message (with the known tiers) is passed through: {bad_tier:#?}"
    );
    let bad_rate = cli_ok(&tg, &["override", "set", "acme", "--rate", "lots"]);
    bad_rate.failed();
    assert!(bad_rate.stderr.contains("lots"), "{bad_rate:#?}");
    let nothing = cli_ok(&tg, &["override", "set", "acme", "--reason", "r"]);
    nothing.failed();
    assert!(nothing.stderr.contains("at least one"), "{nothing:#?}");
    let bad_id = cli_ok(&tg, &["override", "set", "a*b", "--tier", "gold"]);
    bad_id.failed();
    assert!(bad_id.stderr.contains("tenant id"), "{bad_id:#?}");
    let past = cli_ok(
        &tg,
        &[
            "override",
            "set",
            "acme",
            "--tier",
            "gold",
            "--expires",
            "2000-01-01T00:00:00Z",
        ],
    );
    past.failed();
    assert!(past.stderr.contains("past"), "{past:#?}");

    let ls = cli_ok(&tg, &["override", "ls", "--json"]);
    assert_eq!(ls.ok().json()["overrides"], serde_json::json!([]));
}

/// The most common setup mistake is a missing or wrong token; the error
/// must name the variable to set rather than a bare "401".
#[test]
fn cli_without_or_with_a_wrong_token_exits_non_zero_naming_tiergate_admin_token() {
    let up = Upstream::start();
    let tg = start(&up);
    for args in [
        &["override", "ls"][..],
        &["override", "set", "acme", "--tier", "gold"],
        &["override", "rm", "acme"],
        &["tenant", "acme"],
    ] {
        let out = cli(&tg.admin_url(), args, &[]);
        out.failed();
        assert!(
            out.stderr.contains("TIERGATE_ADMIN_TOKEN"),
            "{args:?} without a token mentions TIERGATE_ADMIN_TOKEN: {out:#?}"
        );
    }
    let wrong = cli(
        &tg.admin_url(),
        &["override", "ls"],
        &[("TIERGATE_ADMIN_TOKEN", "wr0ng")],
    );
    wrong.failed();
    assert!(wrong.stderr.contains("invalid admin token"), "{wrong:#?}");
    assert!(
        !wrong.stderr.contains("wr0ng"),
        "the token is not echoed: {wrong:#?}"
    );
    let ls = cli_ok(&tg, &["override", "ls", "--json"]);
    assert_eq!(ls.ok().json()["overrides"], serde_json::json!([]));
}

/// A wrong `--admin` or a stopped instance must fail fast with a message
/// that says the admin API could not be reached (not a panic or a hang).
#[test]
fn cli_against_a_closed_port_exits_non_zero_with_a_clear_message() {
    for url in ["http://127.0.0.1:1".to_string(), closed_port_url()] {
        for args in [&["override", "ls"][..], &["tenant", "acme"]] {
            let out = cli(&url, args, &[("TIERGATE_ADMIN_TOKEN", TOKEN)]);
            out.failed();
            assert!(
                out.stderr.contains("cannot reach the admin API"),
                "{args:?} against {url}: {out:#?}"
            );
            assert!(
                out.stderr.to_lowercase().contains("refused"),
                "the cause is given: {out:#?}"
            );
        }
    }
    let bad = cli(
        "not a url",
        &["override", "ls"],
        &[("TIERGATE_ADMIN_TOKEN", TOKEN)],
    );
    bad.failed();
    assert!(bad.stderr.contains("invalid admin URL"), "{bad:#?}");
}

/// `tiergate health` is the container health check: exit 0 exactly when
/// the admin listener answers, and it needs no token.
#[test]
fn health_exits_zero_against_a_running_instance_and_non_zero_against_a_closed_port() {
    let up = Upstream::start();
    let tg = Tiergate::start(&config(&up.url()));
    cli(&tg.admin_url(), &["health"], &[]).ok();
    let down = cli(&closed_port_url(), &["health"], &[]);
    assert_ne!(down.code, 0, "{down:#?}");
    assert!(down.stderr.contains("cannot reach"), "{down:#?}");
}
