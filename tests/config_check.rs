//! `tiergate check` against one fixture per validation error (SPEC §1, §2).
//!
//! Modelled on envoyproxy/ratelimit's `test/config` and vector's config
//! compiler tests: every rejected config is a file under
//! `tests/fixtures/config/<case>.yaml`, next to `<case>.expected` holding the
//! exact stderr `tiergate check` must print for it:
//!
//! ```text
//! <file>: <yaml path>: <message>
//! <file>: <yaml path> (line N): <message>      (structural errors from the YAML parser)
//! <file>: N error(s)
//! ```
//!
//! The binary runs with the crate root as its working directory and the
//! fixture given as a relative path, so `<file>` is
//! `tests/fixtures/config/<case>.yaml` and relative key paths inside fixtures
//! (`tests/fixtures/jwt/...`) resolve. Inherited `TIERGATE_*` and `RUST_LOG`
//! variables are removed so the host environment cannot change the outcome.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_tiergate");
/// Fixture directory, relative to the crate root.
const FIXTURES: &str = "tests/fixtures/config";
/// Upper bound for one `tiergate` run; `check` does no I/O beyond files.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);
/// The env var named by `secret_env` in `valid_secret_env_unset.yaml`.
const UNSET_SECRET_ENV: &str = "TIERGATE_TEST_UNSET_JWT_SECRET";

/// Exit code (`None` when killed by a signal), stdout and stderr of one run.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Everything the process printed, for assertion messages.
    fn dump(&self) -> String {
        format!(
            "exit code: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Reads a pipe to EOF on its own thread so a chatty child cannot block.
fn drain(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Waits for `child` up to `timeout`; SIGKILLs it and panics beyond.
fn wait_bounded(child: &mut Child, what: &str, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait().expect("try_wait on tiergate") {
            Some(status) => return status.code(),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`tiergate {what}` did not exit within {timeout:?}");
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Runs `tiergate <args>` from the crate root with a hermetic environment.
fn tiergate(args: &[&str], timeout: Duration) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("RUST_LOG");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TIERGATE_") {
            cmd.env_remove(name);
        }
    }
    let mut child = cmd.spawn().expect("spawn tiergate");
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let code = wait_bounded(&mut child, &args.join(" "), timeout);
    Run {
        code,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// `tiergate check --config <file>`.
fn check(file: &str) -> Run {
    tiergate(&["check", "--config", file], RUN_TIMEOUT)
}

/// Path of fixture `name` (with extension), relative to the crate root.
fn fixture(name: &str) -> String {
    format!("{FIXTURES}/{name}")
}

/// Reads a fixture file (relative to the crate root).
fn read_fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(fixture(name));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Runs `check` on `<case>.yaml` and asserts exit 1, nothing on stdout, and
/// stderr equal, line for line, to `<case>.expected`.
fn assert_rejected(case: &str) {
    let file = fixture(&format!("{case}.yaml"));
    let expected = read_fixture(&format!("{case}.expected"));
    let expected: Vec<&str> = expected.lines().collect();

    // The expected file itself must follow the contract: error lines on
    // this file, then the count.
    let (count, errors) = expected
        .split_last()
        .unwrap_or_else(|| panic!("{case}.expected is empty"));
    assert_eq!(
        *count,
        format!("{file}: {} error(s)", errors.len()),
        "{case}.expected: the last line must count the error lines above it"
    );
    assert!(!errors.is_empty(), "{case}.expected lists no error");
    for line in errors {
        assert!(
            line.starts_with(&format!("{file}: ")),
            "{case}.expected: `{line}` does not start with `{file}: `"
        );
    }

    let run = check(&file);
    assert_eq!(
        run.code,
        Some(1),
        "`check` must reject {file}\n{}",
        run.dump()
    );
    assert_eq!(run.stdout, "", "nothing on stdout when rejecting {file}");
    let actual: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(
        actual,
        expected,
        "stderr of `tiergate check --config {file}` (left) differs from {case}.expected (right)\n{}",
        run.dump()
    );
}

/// Runs `check` on `file`, asserts exit 0, empty stderr and exactly one
/// stdout line `<file>: ok: ...`; returns that line.
fn assert_accepted(file: &str) -> String {
    let run = check(file);
    assert_eq!(
        run.code,
        Some(0),
        "`check` must accept {file}\n{}",
        run.dump()
    );
    assert_eq!(run.stderr, "", "nothing on stderr when accepting {file}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "`check` prints a one-line summary\n{}",
        run.dump()
    );
    let prefix = format!("{file}: ok: ");
    assert!(
        lines[0].starts_with(&prefix),
        "summary must start with `{prefix}`: {}",
        lines[0]
    );
    lines[0].to_owned()
}

/// Asserts that `summary` mentions every fact in `facts`.
fn assert_mentions(summary: &str, facts: &[&str]) {
    for fact in facts {
        assert!(
            summary.contains(fact),
            "summary should mention `{fact}`: {summary}"
        );
    }
}

/// One `#[test]` per rejected fixture, plus the list of them for
/// [`every_fixture_has_a_test`].
macro_rules! rejected {
    ($( $(#[doc = $doc:literal])* $case:ident, )*) => {
        $(
            $(#[doc = $doc])*
            #[test]
            fn $case() {
                assert_rejected(stringify!($case));
            }
        )*

        /// Names of the rejected fixtures covered above.
        const REJECTED: &[&str] = &[$(stringify!($case)),*];
    };
}

rejected! {
    /// An unknown top-level key is an error (deny_unknown_fields) with its line.
    unknown_top_level_key,
    /// A misspelt key inside a tier (`brust`) is reported at `tiers.pro` with its line.
    unknown_tier_key,
    /// A string where a number belongs is a type error with path and line.
    wrong_type,
    /// `upstream` without `url`: the one required upstream key.
    missing_upstream_url,
    /// No `upstream` block at all.
    missing_upstream,
    /// No `tiers`: one error, without a follow-on "unknown tier" for `default_tier`.
    missing_tiers,
    /// `tiers: {}`: one error, without a follow-on "unknown tier" for `default_tier`.
    empty_tiers,
    /// `default_tier` is required.
    missing_default_tier,
    /// `default_tier` must name a defined tier; the message lists the defined ones.
    default_tier_unknown,
    /// A static tenant on an undefined tier.
    tenant_unknown_tier,
    /// A route's per-tier `limits` naming an undefined tier.
    route_limit_unknown_tier,
    /// A route cost above the smallest burst of any tier could never be admitted.
    route_cost_exceeds_burst,
    /// `rate: 0/s` is rejected (rates must be > 0).
    rate_zero,
    /// `rate: -1/s` is rejected (rates must be > 0).
    rate_negative,
    /// `rate: 10` without `/unit` is not a rate.
    rate_without_unit,
    /// `rate: 10/w`: `w` is not a rate unit.
    rate_bad_unit,
    /// `burst: 0` is rejected (burst >= 1).
    burst_zero,
    /// A JWT source with no `secret_env`, `public_key_file` or `jwks_file`.
    jwt_no_key,
    /// A JWT source with two key sources at once.
    jwt_two_keys,
    /// An HMAC algorithm cannot verify with a public key file.
    jwt_hs_with_public_key,
    /// An algorithm name that does not exist (`HS257`) is reported at its index.
    jwt_unknown_algorithm,
    /// `alg: none` can never be configured.
    jwt_algorithm_none,
    /// `upstream.url` that is not a URL at all.
    upstream_url_malformed,
    /// `https://` upstreams are refused with the URL as written in the file.
    upstream_https,
    /// `upstream.url` with a path is refused (the request path is appended as is).
    upstream_url_with_path,
    /// A duration that is not a number plus unit (`soon`).
    duration_malformed,
    /// A bare number (`30`) is not a duration: the unit is required.
    duration_without_unit,
    /// A duration with an unknown unit (`5y`).
    duration_unknown_unit,
    /// A size that is not a number plus unit (`big`).
    size_malformed,
    /// A size with an unknown unit (`10PiB`).
    size_unknown_unit,
    /// `max_header_bytes` below the 8KiB floor.
    max_header_bytes_too_small,
    /// `server.listen` that is not `IP:PORT`.
    listen_bad,
    /// A `trusted_proxies` entry that is not an IP or CIDR, reported at its index.
    trusted_proxies_bad,
    /// `backend.type` other than `memory` or `redis`.
    backend_unknown_type,
    /// `backend.type: redis` without a `backend.redis` block.
    /// `backend.redis.url` that is not a `redis://` URL.
    redis_bad_url,
    /// `backend.redis` with both `url` and `cluster`.
    redis_url_and_cluster,
    /// `backend.on_error` other than `local`, `allow`, `deny`.
    on_error_bad,
    /// `identity.anonymous` other than `reject` or `ip`.
    anonymous_unknown_mode,
    /// `anonymous: ip` needs a tier named `anonymous`.
    anonymous_ip_without_tier,
    /// A declared but invalid `anonymous` tier is reported once, not also as "not defined".
    anonymous_tier_invalid,
    /// A route may not be named `tenant` (a built-in bucket name).
    route_reserved_name,
    /// Two routes with the same name: the second is reported.
    route_duplicate_name,
    /// A route with no `match` criteria would match everything.
    route_no_match,
    /// An exempt route is never limited, so a `cost` on it is a mistake.
    route_exempt_with_cost,
    /// `check` loads `public_key_file` too: a missing file is a config error.
    public_key_file_missing,
    /// Several independent semantic errors are all reported in one run.
    several_errors,
}

/// Every `*.yaml` fixture has a test here and every rejected one an
/// `.expected` file, so no fixture silently goes unchecked.
#[test]
fn every_fixture_has_a_test() {
    let accepted = ["valid", "valid_secret_env_unset"];
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURES);
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("read fixture dir") {
        let path = entry.expect("dir entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if let Some(case) = name.strip_suffix(".yaml") {
            assert!(
                REJECTED.contains(&case) || accepted.contains(&case),
                "fixture {name} has no test in tests/config_check.rs"
            );
            seen.push(case.to_owned());
        } else if let Some(case) = name.strip_suffix(".expected") {
            assert!(
                REJECTED.contains(&case),
                "{name} belongs to no rejected fixture"
            );
        } else {
            panic!("unexpected file {name} in {FIXTURES}");
        }
    }
    for case in REJECTED.iter().chain(&accepted) {
        assert!(seen.iter().any(|s| s == case), "{case}.yaml is missing");
    }
    for case in REJECTED {
        assert!(
            dir.join(format!("{case}.expected")).is_file(),
            "{case}.expected is missing"
        );
    }
}

/// A complete valid fixture: exit 0, one `ok:` summary line naming what was loaded.
#[test]
fn valid_fixture_is_accepted() {
    let summary = assert_accepted(&fixture("valid.yaml"));
    assert_mentions(
        &summary,
        &[
            "3 tiers",
            "default free",
            "2 routes",
            "1 tenant",
            "2 identity sources",
            "memory backend",
            "http://127.0.0.1:3000",
        ],
    );
}

/// The shipped example config/tiergate.yaml passes `check` (with no secrets in the environment).
#[test]
fn shipped_example_is_accepted() {
    let summary = assert_accepted("config/tiergate.yaml");
    assert_mentions(
        &summary,
        &[
            "5 tiers",
            "default free",
            "2 routes",
            "2 tenants",
            "2 identity sources",
            "memory backend",
        ],
    );
}

/// An unset `secret_env` variable does not fail `check` (SPEC §2: it is a serve-time error).
#[test]
fn unset_secret_env_passes_check() {
    assert_accepted(&fixture("valid_secret_env_unset.yaml"));
}

/// The same config fails `serve` at start-up, naming the source and the variable once.
#[test]
fn unset_secret_env_fails_serve() {
    let file = fixture("valid_secret_env_unset.yaml");
    let run = tiergate(
        &["serve", "--config", &file, "--log-format", "text"],
        Duration::from_secs(15),
    );
    assert_eq!(
        run.code,
        Some(1),
        "`serve` must refuse to start\n{}",
        run.dump()
    );
    let message = format!(
        "identity.sources[0]: environment variable `{UNSET_SECRET_ENV}` (secret_env) is not set"
    );
    let line = run
        .stderr
        .lines()
        .find(|l| l.starts_with("tiergate: "))
        .unwrap_or_else(|| panic!("no `tiergate: ` error line\n{}", run.dump()));
    assert_eq!(
        line.matches(&message).count(),
        1,
        "the error line names the unset variable exactly once: {line}"
    );
}

/// A config file that does not exist: exit 1, the reason, and the error count.
#[test]
fn missing_config_file_is_reported() {
    let file = fixture("does-not-exist.yaml");
    let run = check(&file);
    assert_eq!(run.code, Some(1), "{}", run.dump());
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{}", run.dump());
    assert!(
        lines[0].starts_with(&format!("{file}: "))
            && lines[0].contains("No such file or directory"),
        "{}",
        run.dump()
    );
    assert_eq!(lines[1], format!("{file}: 1 error(s)"));
}
