//! Running `wrk` and reading its report.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::procs::{ChildGuard, write_file};

/// What one wrk run measured.
#[derive(Debug, Clone, Default)]
pub struct WrkResult {
    /// Completed requests.
    pub requests: u64,
    /// Requests per second as wrk reports it.
    pub rps: f64,
    /// Median latency, microseconds.
    pub p50_us: f64,
    /// 99th percentile latency, microseconds.
    pub p99_us: f64,
    /// Responses that were not 2xx/3xx.
    pub non2xx: u64,
    /// connect + read + write + timeout errors.
    pub socket_errors: u64,
}

/// One wrk invocation.
pub struct WrkRun {
    pub threads: usize,
    pub conns: usize,
    pub duration: Duration,
    pub port: u16,
    /// Lua script path and its arguments, if any.
    pub script: Option<(std::path::PathBuf, Vec<String>)>,
    /// Extra `-H` headers.
    pub headers: Vec<String>,
}

impl WrkRun {
    /// Starts wrk (always against 127.0.0.1) with stdout piped.
    pub fn spawn(&self) -> ChildGuard {
        let mut cmd = Command::new("wrk");
        cmd.arg(format!("-t{}", self.threads))
            .arg(format!("-c{}", self.conns.max(self.threads)))
            .arg(format!("-d{}s", self.duration.as_secs_f64().ceil() as u64))
            .args(["--timeout", "5s", "--latency"]);
        for h in &self.headers {
            cmd.args(["-H", h]);
        }
        if let Some((script, _)) = &self.script {
            cmd.arg("-s").arg(script);
        }
        cmd.arg(format!("http://127.0.0.1:{}/", self.port));
        if let Some((_, args)) = &self.script
            && !args.is_empty()
        {
            cmd.arg("--").args(args);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        ChildGuard::spawn("wrk", &mut cmd).expect("spawn wrk")
    }

    /// Runs to completion (bounded: duration + 20 s) and parses the report.
    pub fn run(&self) -> Result<WrkResult, String> {
        let mut child = self.spawn();
        finish(&mut child, self.duration)
    }
}

/// Waits for a spawned wrk (bounded) and parses its stdout.
pub fn finish(child: &mut ChildGuard, duration: Duration) -> Result<WrkResult, String> {
    let exited = child.wait_bounded(duration + Duration::from_secs(20));
    let mut out = String::new();
    let mut err = String::new();
    if let Some(c) = child.child_mut() {
        if let Some(s) = c.stdout.as_mut() {
            let _ = s.read_to_string(&mut out);
        }
        if let Some(s) = c.stderr.as_mut() {
            let _ = s.read_to_string(&mut err);
        }
    }
    child.kill();
    if !exited {
        return Err(format!("wrk did not finish in time\n{out}{err}"));
    }
    parse(&out).ok_or_else(|| format!("cannot parse wrk output:\n{out}\n{err}"))
}

/// Parses `wrk --latency` output.
pub fn parse(out: &str) -> Option<WrkResult> {
    let mut r = WrkResult::default();
    let mut saw_rps = false;
    for line in out.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().ok()?;
            saw_rps = true;
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            r.non2xx = v.trim().parse().ok()?;
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            r.socket_errors = v
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
        } else if let Some(v) = t.strip_prefix("50%") {
            r.p50_us = time_us(v.trim())?;
        } else if let Some(v) = t.strip_prefix("99%") {
            r.p99_us = time_us(v.trim())?;
        } else if t.contains(" requests in ") {
            r.requests = t.split_whitespace().next()?.parse().ok()?;
        }
    }
    saw_rps.then_some(r)
}

/// wrk's time format: `812.00us`, `1.23ms`, `2.00s`, `1.00m`.
fn time_us(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some(n * mult)
}

/// A script that sends one fixed tenant.
pub fn tenant_script(dir: &Path, name: &str, tenant: &str) -> std::path::PathBuf {
    write_file(
        dir,
        name,
        &format!("wrk.method = \"GET\"\nwrk.headers[\"x-tenant-id\"] = \"{tenant}\"\n"),
    )
}

/// A script that sends one fixed tenant and a bearer token.
pub fn token_script(dir: &Path, name: &str, tenant: &str, token: &str) -> std::path::PathBuf {
    write_file(
        dir,
        name,
        &format!(
            "wrk.method = \"GET\"\nwrk.headers[\"x-tenant-id\"] = \"{tenant}\"\n\
             wrk.headers[\"authorization\"] = \"Bearer {token}\"\n"
        ),
    )
}

/// A script that cycles `x-tenant-id` over `t0 .. t{n-1}` (argument 1),
/// each wrk thread starting at its own offset.
pub fn many_tenants_script(dir: &Path) -> std::path::PathBuf {
    write_file(
        dir,
        "tenants.lua",
        r#"-- cycles x-tenant-id over n distinct tenants (script argument 1)
local next_id = 0
function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
end
function init(args)
  n = tonumber(args[1]) or 100000
  i = ((tid or 0) * 50021) % n
end
function request()
  i = (i + 1) % n
  wrk.headers["x-tenant-id"] = "t" .. i
  return wrk.format()
end
"#,
    )
}

/// One tenant with `delay_ms` of think time between requests on each
/// connection.
pub fn paced_script(dir: &Path, name: &str, tenant: &str, delay_ms: u64) -> std::path::PathBuf {
    write_file(
        dir,
        name,
        &format!(
            "wrk.method = \"GET\"\nwrk.headers[\"x-tenant-id\"] = \"{tenant}\"\n\
             function delay()\n  return {delay_ms}\nend\n"
        ),
    )
}

/// Checks the parser on a captured report (run at startup: the bench has
/// no test harness).
pub fn self_check() {
    let out = "Running 3s test @ http://127.0.0.1:1/
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.10ms  300.00us   9.00ms   90.00%
    Req/Sec    29.00k     1.00k   31.00k    70.00%
  Latency Distribution
     50%  812.00us
     75%    1.10ms
     90%    1.50ms
     99%    2.75ms
  173580 requests in 3.00s, 25.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 17
Requests/sec:  57860.00
Transfer/sec:      8.33MB
";
    let r = parse(out).unwrap();
    assert_eq!(r.requests, 173580);
    assert_eq!(r.non2xx, 17);
    assert_eq!(r.socket_errors, 3);
    assert!((r.p50_us - 812.0).abs() < 1e-9);
    assert!((r.p99_us - 2750.0).abs() < 1e-9);
    assert!((r.rps - 57860.0).abs() < 1e-9);
}
