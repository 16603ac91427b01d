//! End-to-end load bench on loopback: `wrk` → proxy → upstream, for tiergate
//! (memory and redis backends) next to nginx and haproxy doing the same job.
//!
//! ```text
//! cargo bench --bench e2e                                  # 10 s runs, 64 and 256 conns
//! E2E_DURATION=3s E2E_CONNS=64 cargo bench --bench e2e     # quick
//! E2E_MODE=flood cargo bench --bench e2e                   # noisy neighbour
//! E2E_MODE=tenants cargo bench --bench e2e                 # 100k distinct tenants
//! E2E_MODE=jwt cargo bench --bench e2e                     # tiergate identifies by an RS256 token
//! E2E_MODE=conns cargo bench --bench e2e                   # RSS holding 10,000 keep-alive connections
//! ```
//!
//! Settings (environment):
//!
//! | variable | default | meaning |
//! | --- | --- | --- |
//! | `E2E_DURATION` | `10s` | length of each measured wrk run (`3s`, `1m`) |
//! | `E2E_CONNS` | `64,256` | connection counts to measure (`wrk -t2 -cN`; conns mode: `10000`) |
//! | `E2E_ROUNDS` | `2` | interleaved rounds; the table shows their mean |
//! | `E2E_MODE` | `allowed` | `allowed`: one tenant, everything admitted; `tenants`: `x-tenant-id` cycles over `E2E_TENANTS` (100000) ids; `flood`: tenant `flood` limited to `E2E_FLOOD_RATE`/s (100) hammered by `wrk -cN` (as fast as the proxy answers, or with `E2E_FLOOD_DELAY_MS` of think time per connection for an offered load that does not depend on the proxy's speed) while tenant `good` sends paced traffic (8 conns, `E2E_GOOD_DELAY_MS`=10 ms think time); then, as a control, the same flood goes to a server of its own while `good` goes through the proxy; `jwt`: like `allowed`, but every request also carries an RS256 token (`Authorization: Bearer`, the test fixtures' key, tenant `bench`), which tiergate verifies (its JWT source comes before the header) while nginx and haproxy key on the header as before; `conns`: each proxy's RSS (its processes', not redis-server's) before and while it holds `E2E_CONNS` (here 10000) keep-alive connections that have each had one request answered (see `e2e/conns.rs`; not haproxy, whose `maxconn` here is 4096, nor the hyper floor, which keeps an upstream connection per client connection) |
//! | `E2E_TARGETS` | all | comma-separated substrings of target names to run |
//! | `E2E_TIERGATE_BIN` | this build's | the tiergate build run as `tiergate memory` / `tiergate redis` (e.g. `target/pgo/tiergate` from `scripts/pgo-build`) |
//! | `E2E_BASELINE_BIN` | unset | another tiergate build (e.g. the last release) to run as `baseline memory` / `baseline redis` next to this one, for before/after ratios from one run |
//! | `E2E_PAIRS` | unset | allowed, tenants and jwt modes: this many *pairs* per comparison instead of rounds (see below) |
//!
//! **Pairs.** On a shared VM the host's speed drifts by tens of percent
//! within minutes, and in a round of six targets the reference may have
//! run 40 s before the target it is compared with. With `E2E_PAIRS=N`
//! each comparison is instead N pairs of back-to-back runs of the two
//! targets, the order alternating, and the table shows the median of the
//! per-pair ratios, their range and how many pairs favour the subject:
//! drift between pairs cancels out, and the spread is visible. The
//! comparisons are every target against nginx + `limit_req`, the redis
//! backend against the memory backend (the issue's redis target), each
//! tiergate backend against its baseline when `E2E_BASELINE_BIN` is set
//! and, in tenants mode, each tiergate backend serving the many tenants
//! against itself serving one (the issue's "cost flat in tenants").
//!
//! `hyper floor` (see `e2e/floor.rs`) is a bare hyper proxy built like
//! tiergate's server with nothing else in it: its ratio to nginx +
//! `limit_req` is what the HTTP stack costs, and tiergate's ratio to it
//! what tiergate's own work costs (a comparison of its own in pairs mode).
//! Not in flood mode, where it would only repeat nginx `proxy_pass`, nor in
//! conns mode.
//!
//! Everything runs on 127.0.0.1 on free ports, in a temp dir; every child
//! process (nginx, haproxy, redis-server, tiergate, wrk) is killed on exit,
//! Ctrl-C included. Fairness: the proxies under test get two workers each
//! (nginx `worker_processes auto` = cores, haproxy `nbthread 2`, tiergate and the
//! hyper floor one worker per core), the nginx upstream one worker; wrk, the proxy, the
//! upstream (and redis) share the machine's cores. "CPU µs/req" is the
//! proxy's own CPU time (plus redis-server's for the redis backend) per
//! completed request, from /proc.

#[path = "e2e/conns.rs"]
mod conns;
#[path = "e2e/floor.rs"]
mod floor;
#[path = "e2e/procs.rs"]
mod procs;
#[path = "e2e/targets.rs"]
mod targets;
#[path = "e2e/wrk.rs"]
mod wrk;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use targets::{Limits, Target};
use wrk::{WrkResult, WrkRun};

const BIN: &str = env!("CARGO_BIN_EXE_tiergate");

/// The binary named by environment variable `name`, if set, made absolute
/// against the current directory: targets run in their own temp dirs,
/// where a relative program path would not resolve.
fn env_bin(name: &str) -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os(name).filter(|v| !v.is_empty())?);
    Some(std::path::absolute(&path).unwrap_or(path))
}

/// The target every ratio is relative to.
const REFERENCE: &str = "nginx+limit_req";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Allowed,
    Tenants,
    Flood,
    Jwt,
    Conns,
}

struct Settings {
    duration: Duration,
    conns: Vec<usize>,
    rounds: usize,
    mode: Mode,
    only: Option<Vec<String>>,
    tenants: u32,
    flood_rate: u32,
    good_delay_ms: u64,
    /// Think time per flood connection; 0: the flood saturates.
    flood_delay_ms: u64,
    /// Pairs per comparison; `None`: interleaved rounds.
    pairs: Option<usize>,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_string())
}

fn parse_secs(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let secs = num.trim().parse::<f64>().ok()? * mult;
    (1.0..=3600.0)
        .contains(&secs)
        .then(|| Duration::from_secs_f64(secs.round()))
}

impl Settings {
    fn from_env() -> Result<Settings, String> {
        let d = env_or("E2E_DURATION", "10s");
        let duration = parse_secs(&d).ok_or(format!("E2E_DURATION `{d}`: want 1s..60m"))?;
        let mode = match env_or("E2E_MODE", "allowed").as_str() {
            "allowed" | "throughput" | "" => Mode::Allowed,
            "tenants" => Mode::Tenants,
            "flood" => Mode::Flood,
            "jwt" => Mode::Jwt,
            "conns" => Mode::Conns,
            other => {
                return Err(format!(
                    "E2E_MODE `{other}`: want allowed, tenants, flood, jwt or conns"
                ));
            }
        };
        let c = env_or(
            "E2E_CONNS",
            if mode == Mode::Conns {
                "10000"
            } else {
                "64,256"
            },
        );
        let conns = c
            .split(',')
            .map(|x| {
                x.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=10_000).contains(n))
            })
            .collect::<Option<Vec<_>>>()
            .ok_or(format!("E2E_CONNS `{c}`: want e.g. 64,256"))?;
        let rounds = env_or("E2E_ROUNDS", "2")
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=20).contains(n))
            .ok_or("E2E_ROUNDS: want 1..=20")?;
        let only = std::env::var("E2E_TARGETS")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
        let num = |name: &str, default: &str| -> Result<u64, String> {
            env_or(name, default)
                .parse::<u64>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or(format!("{name}: want a positive integer"))
        };
        Ok(Settings {
            duration,
            conns,
            rounds,
            mode,
            only,
            tenants: num("E2E_TENANTS", "100000")?.min(10_000_000) as u32,
            flood_rate: num("E2E_FLOOD_RATE", "100")?.min(1_000_000) as u32,
            good_delay_ms: num("E2E_GOOD_DELAY_MS", "10")?.min(10_000),
            flood_delay_ms: env_or("E2E_FLOOD_DELAY_MS", "0")
                .parse::<u64>()
                .map_err(
                    |_| "E2E_FLOOD_DELAY_MS: want a whole number of milliseconds (0: saturate)",
                )?
                .min(10_000),
            pairs: match std::env::var("E2E_PAIRS") {
                Ok(v) if !v.trim().is_empty() => Some(
                    v.trim()
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=50).contains(n))
                        .ok_or("E2E_PAIRS: want 1..=50")?,
                ),
                _ => None,
            },
        })
    }

    fn wants(&self, name: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|s| name.contains(s.as_str())))
    }
}

fn main() {
    // The `hyper floor` target: this binary again, as a child process.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(floor::ARG) {
        let port = |i: usize| args.get(i).and_then(|a| a.parse::<u16>().ok());
        let (Some(port), Some(upstream)) = (port(2), port(3)) else {
            eprintln!("usage: {} PORT UPSTREAM_PORT", floor::ARG);
            std::process::exit(2);
        };
        if let Err(e) = floor::run(port, upstream) {
            eprintln!("hyper floor: {e}");
            std::process::exit(1);
        }
        return;
    }
    // `cargo test --benches` runs this binary without `--bench`: do nothing.
    if !args.iter().any(|a| a == "--bench") {
        println!("e2e: load bench; run it with `cargo bench --bench e2e`");
        return;
    }
    wrk::self_check();
    if procs::which("wrk").is_none() {
        println!("e2e: `wrk` is not installed; install it with `apt-get install wrk`");
        println!("     (optional: `apt-get install nginx-light haproxy redis-server`)");
        return;
    }
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("e2e: {e}");
            std::process::exit(2);
        }
    };
    procs::install_signal_handler();
    let tmp = tempfile::Builder::new()
        .prefix("tiergate-e2e-")
        .tempdir()
        .expect("temp dir");
    let started = Instant::now();
    run(&settings, tmp.path());
    eprintln!("e2e: done in {:.0?}", started.elapsed());
}

fn run(s: &Settings, tmp: &Path) {
    let limits = Limits {
        flood_rate: (s.mode == Mode::Flood).then_some(s.flood_rate),
        jwt: s.mode == Mode::Jwt,
    };
    let (upstream, up) = targets::start_upstream(tmp);
    let mut list: Vec<Target> = Vec::new();
    let mut add = |name: &str, needs: &[&str], start: &dyn Fn() -> Result<Target, String>| {
        if !s.wants(name) {
            return;
        }
        if let Some(missing) = needs.iter().find(|p| procs::which(p).is_none()) {
            println!("note: skipping {name}: `{missing}` is not installed");
            return;
        }
        match start() {
            Ok(t) => list.push(t),
            Err(e) => println!("note: skipping {name}: {e}"),
        }
    };
    add("nginx proxy_pass", &["nginx"], &|| {
        targets::nginx_proxy(tmp, up, false, limits)
    });
    add(REFERENCE, &["nginx"], &|| {
        targets::nginx_proxy(tmp, up, true, limits)
    });
    // haproxy's `maxconn` here (4096) is below conns mode's count.
    if s.mode != Mode::Conns {
        add("haproxy stick-table", &["haproxy"], &|| {
            targets::haproxy(tmp, up, limits)
        });
    }
    // A throughput reference; under a flood it would only repeat nginx
    // proxy_pass (no limit, everything admitted). Not in conns mode: it
    // keeps an upstream connection per client connection, twice the fds
    // (and upstream connections) the others need.
    if s.mode != Mode::Flood && s.mode != Mode::Conns {
        add("hyper floor", &[], &|| targets::floor(tmp, up));
    }
    // The build under test: `E2E_TIERGATE_BIN`, else this build's.
    let bin = env_bin("E2E_TIERGATE_BIN").unwrap_or_else(|| PathBuf::from(BIN));
    add("tiergate memory", &[], &|| {
        targets::tiergate(&bin, "tiergate memory", tmp, up, false, limits)
    });
    add("tiergate redis", &["redis-server"], &|| {
        targets::tiergate(&bin, "tiergate redis", tmp, up, true, limits)
    });
    // An older build, for before/after ratios measured in one run.
    if let Some(base) = env_bin("E2E_BASELINE_BIN") {
        add("baseline memory", &[], &|| {
            targets::tiergate(&base, "baseline memory", tmp, up, false, limits)
        });
        add("baseline redis", &["redis-server"], &|| {
            targets::tiergate(&base, "baseline redis", tmp, up, true, limits)
        });
    }
    if list.is_empty() {
        println!("e2e: no target could be started");
        return;
    }

    println!(
        "e2e: mode={:?} duration={:?} conns={:?} {} cores={} upstream={}",
        s.mode,
        s.duration,
        s.conns,
        match s.pairs {
            Some(n) if s.mode != Mode::Flood => format!("pairs={n}"),
            _ => format!("rounds={}", s.rounds),
        },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        upstream.describe()
    );
    println!("e2e: tiergate binary {}", bin.display());
    let scripts = Scripts::write(tmp, s);
    match s.mode {
        Mode::Allowed | Mode::Tenants | Mode::Jwt if s.pairs.is_some() => {
            pairs(s, &mut list, &scripts)
        }
        Mode::Allowed | Mode::Tenants | Mode::Jwt => throughput(s, &mut list, &scripts),
        Mode::Conns => hold_conns(s, &list),
        Mode::Flood => {
            // The control: the same flood aimed at a server of its own.
            let (sink, sink_port) = targets::start_upstream(&tmp.join("sink"));
            flood(s, &mut list, &scripts, sink_port);
            drop(sink);
        }
    }
    for t in &list {
        if let Some(admin) = t.admin {
            // By kind (timeout, unavailable, error): a total alone cannot
            // say whether errors were a slow host or a broken Redis.
            let errors = targets::metric_samples(admin, "tiergate_backend_errors_total");
            let degraded = targets::metric_sum(admin, "tiergate_backend_degraded");
            let throttled = targets::metric_sum(admin, "tiergate_tenant_throttled_total");
            println!(
                "{}: backend_errors_total={} backend_degraded={} tenant_throttled_total={}",
                t.name,
                errors.map_or("?".into(), |e| fmt_samples(&e)),
                fmt_opt(degraded),
                fmt_opt(throttled)
            );
        }
    }
    drop(list);
    drop(upstream);
}

/// Conns mode: each target's RSS before, while it holds each count of
/// keep-alive connections, and once they have closed, one target at a time.
fn hold_conns(s: &Settings, list: &[Target]) {
    let mut rows = Vec::new();
    for &n in &s.conns {
        for t in list {
            let pids = t.proxy_pids();
            let before = conns::rss_kib(&pids);
            let row = match conns::hold(t.port, n) {
                Ok(open) => {
                    let holding = conns::rss_kib(&pids);
                    drop(open);
                    std::thread::sleep(conns::SETTLE);
                    let after = conns::rss_kib(&pids);
                    let per_kb = holding.saturating_sub(before) as f64 * 1.024 / n as f64;
                    format!(
                        "| {} | {n} | {:.1} MiB | {:.1} MiB | {per_kb:.1} KB | {:.1} MiB |",
                        t.name,
                        mib(before),
                        mib(holding),
                        mib(after)
                    )
                }
                Err(e) => {
                    std::thread::sleep(conns::SETTLE);
                    format!("| {} | {n} | {:.1} MiB | {e} | | |", t.name, mib(before))
                }
            };
            println!("{row}");
            rows.push(row);
        }
    }
    println!();
    println!(
        "| target | keep-alive connections | RSS before them | RSS holding them | per connection \
         | RSS {} s after they closed |",
        conns::SETTLE.as_secs()
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for r in rows {
        println!("{r}");
    }
    println!(
        "\n(each connection sent one request and read its 200 before being held; RSS is the \
         proxy's own processes', nginx's workers included, redis-server's not)"
    );
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// `0`, or the nonzero samples: `{backend="redis",kind="timeout"}=16`.
fn fmt_samples(samples: &[(String, f64)]) -> String {
    let nonzero: Vec<String> = samples
        .iter()
        .filter(|(_, v)| *v != 0.0)
        .map(|(labels, v)| format!("{labels}={v}"))
        .collect();
    if nonzero.is_empty() {
        "0".into()
    } else {
        nonzero.join(",")
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("?".into(), |v| format!("{v}"))
}

struct Scripts {
    one: PathBuf,
    many: PathBuf,
    flood: PathBuf,
    good: PathBuf,
    /// Jwt mode's: `one`'s header and an RS256 token.
    jwt: Option<PathBuf>,
    tenants: u32,
}

impl Scripts {
    fn write(tmp: &Path, s: &Settings) -> Scripts {
        Scripts {
            one: wrk::tenant_script(tmp, "one.lua", "bench"),
            many: wrk::many_tenants_script(tmp),
            flood: match s.flood_delay_ms {
                0 => wrk::tenant_script(tmp, "flood.lua", "flood"),
                ms => wrk::paced_script(tmp, "flood.lua", "flood", ms),
            },
            good: wrk::paced_script(tmp, "good.lua", "good", s.good_delay_ms),
            jwt: (s.mode == Mode::Jwt).then(|| {
                wrk::token_script(tmp, "jwt.lua", "bench", &targets::bench_token("bench"))
            }),
            tenants: s.tenants,
        }
    }
}

/// One measured run of one target.
#[derive(Debug, Clone)]
struct Sample {
    r: WrkResult,
    cpu_us_per_req: f64,
    /// Cores used by processes outside the bench during the run.
    foreign: f64,
}

fn pause() {
    std::thread::sleep(Duration::from_millis(300));
}

fn measure(t: &Target, run: &WrkRun) -> Result<Sample, String> {
    let pids = t.pids();
    let cpu0 = targets::cpu_seconds(&pids);
    let snap = targets::CpuSnap::now();
    let r = run.run()?;
    let foreign = targets::CpuSnap::now().foreign_cores_since(&snap);
    let cpu = targets::cpu_seconds(&pids) - cpu0;
    let cpu_us_per_req = if r.requests > 0 {
        cpu * 1e6 / r.requests as f64
    } else {
        0.0
    };
    Ok(Sample {
        r,
        cpu_us_per_req,
        foreign,
    })
}

fn warm_up(s: &Settings, list: &mut [Target], script: &(PathBuf, Vec<String>)) {
    let warm = s.duration.min(Duration::from_secs(2));
    let conns = s.conns.iter().copied().max().unwrap_or(64);
    for t in list.iter() {
        match load(warm, t.port, conns, script).run() {
            Ok(r) => eprintln!(
                "warm-up {:<20} {:>9.0} req/s non-2xx {}",
                t.name, r.rps, r.non2xx
            ),
            Err(e) => eprintln!("warm-up {}: {e}", t.name),
        }
        pause();
    }
}

fn check_alive(t: &mut Target, dead: &mut Vec<&'static str>) -> bool {
    if dead.contains(&t.name) {
        return false;
    }
    if !t.alive() {
        eprintln!("e2e: {} died; dropping it from the run", t.name);
        dead.push(t.name);
        return false;
    }
    true
}

/// The wrk script (and its arguments) of a throughput mode.
fn throughput_script(s: &Settings, scripts: &Scripts) -> (PathBuf, Vec<String>) {
    match s.mode {
        Mode::Tenants => (scripts.many.clone(), vec![scripts.tenants.to_string()]),
        Mode::Jwt => (scripts.jwt.clone().expect("written in jwt mode"), vec![]),
        _ => (scripts.one.clone(), vec![]),
    }
}

/// A `wrk -t2` run of `conns` connections against `port` for `duration`.
fn load(duration: Duration, port: u16, conns: usize, script: &(PathBuf, Vec<String>)) -> WrkRun {
    WrkRun {
        threads: 2,
        conns,
        duration,
        port,
        script: Some(script.clone()),
        headers: vec![],
    }
}

fn throughput(s: &Settings, list: &mut [Target], scripts: &Scripts) {
    let script = throughput_script(s, scripts);
    warm_up(s, list, &script);
    let mut samples: BTreeMap<(usize, usize), Vec<Sample>> = BTreeMap::new();
    let mut dead = Vec::new();
    for round in 0..s.rounds {
        for &conns in &s.conns {
            // Rotate the order each round so no target always goes first.
            for k in 0..list.len() {
                let i = (k + round) % list.len();
                let t = &mut list[i];
                if !check_alive(t, &mut dead) {
                    continue;
                }
                match measure(t, &load(s.duration, t.port, conns, &script)) {
                    Ok(smp) => {
                        eprintln!(
                            "round {}/{} c{:<4} {:<20} {:>9.0} req/s  p50 {:>8}  p99 {:>8}  non-2xx {}  cpu {:.1} us/req  other load {:.2} cores",
                            round + 1,
                            s.rounds,
                            conns,
                            t.name,
                            smp.r.rps,
                            fmt_us(smp.r.p50_us),
                            fmt_us(smp.r.p99_us),
                            smp.r.non2xx,
                            smp.cpu_us_per_req,
                            smp.foreign
                        );
                        samples.entry((conns, i)).or_default().push(smp);
                    }
                    Err(e) => eprintln!("{} c{conns}: {e}", t.name),
                }
                pause();
            }
        }
    }

    println!();
    println!(
        "| target | conns | req/s (mean) | req/s (min–max) | p50 | p99 | non-2xx | socket errors | CPU µs/req | other load | vs {REFERENCE} |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for &conns in &s.conns {
        let reference = list
            .iter()
            .position(|t| t.name == REFERENCE)
            .and_then(|i| samples.get(&(conns, i)))
            .map(|v| mean(v.iter().map(|x| x.r.rps)));
        for (i, t) in list.iter().enumerate() {
            let Some(v) = samples.get(&(conns, i)) else {
                continue;
            };
            let rps = mean(v.iter().map(|x| x.r.rps));
            let lo = v.iter().map(|x| x.r.rps).fold(f64::MAX, f64::min);
            let hi = v.iter().map(|x| x.r.rps).fold(0.0, f64::max);
            println!(
                "| {} | {} | {:.0} | {:.0}–{:.0} | {} | {} | {} | {} | {:.1} | {:.2} | {} |",
                t.name,
                conns,
                rps,
                lo,
                hi,
                fmt_us(mean(v.iter().map(|x| x.r.p50_us))),
                fmt_us(mean(v.iter().map(|x| x.r.p99_us))),
                v.iter().map(|x| x.r.non2xx).sum::<u64>(),
                v.iter().map(|x| x.r.socket_errors).sum::<u64>(),
                mean(v.iter().map(|x| x.cpu_us_per_req)),
                mean(v.iter().map(|x| x.foreign)),
                reference.map_or("–".into(), |r| format!("{:.2}", rps / r)),
            );
        }
    }
    println!();
    println!(
        "(mean of {} rounds of `wrk -t2 -cN -d{}s --latency`; p50/p99 are the means of each run's \
         percentiles; `other load` is the cores used meanwhile by processes outside this bench: \
         above ~0.1 the numbers are disturbed)",
        s.rounds,
        s.duration.as_secs()
    );
}

/// One comparison of pairs mode: the reference and the subject, as
/// indexes into the target list.
#[derive(Clone, Copy)]
struct Cmp {
    a: usize,
    b: usize,
    /// Tenants mode's flatness check: `a` is `b` itself serving one
    /// tenant, while `b` serves the many.
    flat: bool,
}

/// The comparisons of pairs mode: every target against nginx +
/// `limit_req`, redis against memory, each backend against its baseline
/// and, in tenants mode, each tiergate target against itself serving one
/// tenant (issue #6's "cost flat in tenants").
fn comparisons(list: &[Target], mode: Mode) -> Vec<Cmp> {
    let at = |name: &str| list.iter().position(|t| t.name == name);
    let cmp = |a, b| Cmp { a, b, flat: false };
    let mut out = Vec::new();
    if let Some(r) = at(REFERENCE) {
        out.extend((0..list.len()).filter(|&i| i != r).map(|i| cmp(r, i)));
    }
    for (a, b) in [
        ("hyper floor", "tiergate memory"),
        ("tiergate memory", "tiergate redis"),
        ("baseline memory", "tiergate memory"),
        ("baseline redis", "tiergate redis"),
    ] {
        if let (Some(a), Some(b)) = (at(a), at(b)) {
            out.push(cmp(a, b));
        }
    }
    if mode == Mode::Tenants {
        for name in ["tiergate memory", "tiergate redis"] {
            if let Some(i) = at(name) {
                out.push(Cmp {
                    a: i,
                    b: i,
                    flat: true,
                });
            }
        }
    }
    out
}

/// The names a comparison's table row gives its subject and reference.
fn labels(list: &[Target], c: Cmp, tenants: u32) -> (String, String) {
    if c.flat {
        (
            format!("{}, {tenants} tenants", list[c.b].name),
            format!("{}, 1 tenant", list[c.a].name),
        )
    } else {
        (list[c.b].name.to_string(), list[c.a].name.to_string())
    }
}

/// The median of `v` (sorted in place); 0 for none.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Pairs mode (see the module docs): back-to-back runs of two targets,
/// order alternating, summarised by the median per-pair ratio.
fn pairs(s: &Settings, list: &mut [Target], scripts: &Scripts) {
    let script = throughput_script(s, scripts);
    warm_up(s, list, &script);
    let n = s.pairs.unwrap_or(1);
    let cmps = comparisons(list, s.mode);
    if cmps.is_empty() {
        println!("e2e: pairs need two comparable targets (e.g. {REFERENCE} and tiergate memory)");
        return;
    }
    let one = (scripts.one.clone(), vec![]);
    // Per (conns, comparison): each pair's (reference, subject) samples.
    let mut done: BTreeMap<(usize, usize), Vec<(Sample, Sample)>> = BTreeMap::new();
    let mut dead = Vec::new();
    for &conns in &s.conns {
        for (c, &cmp) in cmps.iter().enumerate() {
            let sides = [
                (cmp.a, if cmp.flat { &one } else { &script }),
                (cmp.b, &script),
            ];
            let (sub, against) = labels(list, cmp, scripts.tenants);
            for p in 0..n {
                let order = if p % 2 == 0 { [0, 1] } else { [1, 0] };
                let mut got: [Option<Sample>; 2] = [None, None];
                for side in order {
                    let (i, load_script) = sides[side];
                    let t = &mut list[i];
                    if !check_alive(t, &mut dead) {
                        break;
                    }
                    match measure(t, &load(s.duration, t.port, conns, load_script)) {
                        Ok(smp) => got[side] = Some(smp),
                        Err(e) => eprintln!("{} c{conns}: {e}", t.name),
                    }
                    pause();
                }
                if let [Some(ra), Some(rb)] = got {
                    eprintln!(
                        "pair {}/{n} c{conns:<4} {:<20} {:>9.0} req/s {:>5.1} us/req | {:<20} {:>9.0} req/s {:>5.1} us/req | ratio {:.3}",
                        p + 1,
                        against,
                        ra.r.rps,
                        ra.cpu_us_per_req,
                        sub,
                        rb.r.rps,
                        rb.cpu_us_per_req,
                        rb.r.rps / ra.r.rps.max(1.0)
                    );
                    done.entry((conns, c)).or_default().push((ra, rb));
                }
            }
        }
    }

    println!();
    println!(
        "| subject | against | conns | pairs | req/s ratio (median) | min–max | pairs in favour | CPU µs/req (medians) | p99 (medians) | non-2xx | other load |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for &conns in &s.conns {
        for (c, &cmp) in cmps.iter().enumerate() {
            let Some(v) = done.get(&(conns, c)) else {
                continue;
            };
            let (sub, against) = labels(list, cmp, scripts.tenants);
            let mut ratios: Vec<f64> = v
                .iter()
                .map(|(ra, rb)| rb.r.rps / ra.r.rps.max(1.0))
                .collect();
            let favour = ratios.iter().filter(|&&r| r > 1.0).count();
            let med = median(&mut ratios);
            let col = |f: &dyn Fn(&(Sample, Sample)) -> f64| {
                median(&mut v.iter().map(f).collect::<Vec<_>>())
            };
            println!(
                "| {} | {} | {} | {} | {:.2} | {:.2}–{:.2} | {} of {} | {:.1} vs {:.1} | {} vs {} | {} | {:.2} |",
                sub,
                against,
                conns,
                v.len(),
                med,
                ratios[0],
                ratios[ratios.len() - 1],
                favour,
                v.len(),
                col(&|(_, rb)| rb.cpu_us_per_req),
                col(&|(ra, _)| ra.cpu_us_per_req),
                fmt_us(col(&|(_, rb)| rb.r.p99_us)),
                fmt_us(col(&|(ra, _)| ra.r.p99_us)),
                v.iter()
                    .map(|(ra, rb)| ra.r.non2xx + rb.r.non2xx)
                    .sum::<u64>(),
                col(&|(ra, rb)| ra.foreign.max(rb.foreign)),
            );
        }
    }
    println!();
    println!(
        "(each pair: `wrk -t2 -cN -d{}s --latency` on the two targets back to back, order \
         alternating; the ratio is subject req/s over the other's; CPU and p99 are the medians \
         of the subject's and the other's runs; `other load` is the median over pairs of the \
         cores used by processes outside this bench: above ~0.1 the pairs are disturbed)",
        s.duration.as_secs()
    );
}

/// One flood run: the flooding tenant and the well-behaved one.
struct FloodSample {
    flood: WrkResult,
    good: WrkResult,
    /// The same good traffic just before, with no flood.
    alone: WrkResult,
    /// The same good traffic while the same flood goes to another server
    /// on this machine (the sink): what the flood costs the good tenant
    /// through the shared cores alone.
    elsewhere: WrkResult,
    /// The proxy's CPU per request it answered under the flood (both
    /// tenants' requests), in microseconds.
    cpu_us_per_req: f64,
    /// Cores used by processes outside the bench during the run.
    foreign: f64,
}

fn flood(s: &Settings, list: &mut [Target], scripts: &Scripts, sink_port: u16) {
    warm_up(s, list, &(scripts.good.clone(), vec![]));
    let mut samples: BTreeMap<(usize, usize), Vec<FloodSample>> = BTreeMap::new();
    let mut dead = Vec::new();
    for round in 0..s.rounds {
        for &conns in &s.conns {
            for k in 0..list.len() {
                let i = (k + round) % list.len();
                let t = &mut list[i];
                if !check_alive(t, &mut dead) {
                    continue;
                }
                let flood_run = WrkRun {
                    threads: 2,
                    conns,
                    duration: s.duration,
                    port: t.port,
                    script: Some((scripts.flood.clone(), vec![])),
                    headers: vec![],
                };
                let good_run = WrkRun {
                    threads: 1,
                    conns: 8,
                    duration: s.duration,
                    port: t.port,
                    script: Some((scripts.good.clone(), vec![])),
                    headers: vec![],
                };
                let mut ac = good_run.spawn();
                let alone = wrk::finish(&mut ac, s.duration);
                pause();
                let pids = t.pids();
                let cpu0 = targets::cpu_seconds(&pids);
                let snap = targets::CpuSnap::now();
                let mut fc = flood_run.spawn();
                let mut gc = good_run.spawn();
                let good = wrk::finish(&mut gc, s.duration);
                let fl = wrk::finish(&mut fc, s.duration);
                let foreign = targets::CpuSnap::now().foreign_cores_since(&snap);
                let cpu = targets::cpu_seconds(&pids) - cpu0;
                pause();
                let mut sc = WrkRun {
                    port: sink_port,
                    ..flood_run
                }
                .spawn();
                let mut ec = good_run.spawn();
                // A control whose flood failed is no control: its good run
                // counts only when the flood to the sink ran too.
                let good_elsewhere = wrk::finish(&mut ec, s.duration);
                let elsewhere = wrk::finish(&mut sc, s.duration).and(good_elsewhere);
                match (
                    fl,
                    good.and_then(|g| alone.and_then(|a| elsewhere.map(|e| (g, a, e)))),
                ) {
                    (Ok(flood), Ok((good, alone, elsewhere))) => {
                        let answered = flood.requests + good.requests;
                        let cpu_us_per_req = if answered > 0 {
                            cpu * 1e6 / answered as f64
                        } else {
                            0.0
                        };
                        eprintln!(
                            "round {}/{} c{:<4} {:<20} flood {:>8.0} tries/s, {:>8} rejected | good {:>5.0} req/s p99 {:>8} non-2xx {} | cpu {:.1} us/req | good p99 with the flood elsewhere {:>8}",
                            round + 1,
                            s.rounds,
                            conns,
                            t.name,
                            flood.rps,
                            flood.non2xx,
                            good.rps,
                            fmt_us(good.p99_us),
                            good.non2xx,
                            cpu_us_per_req,
                            fmt_us(elsewhere.p99_us)
                        );
                        samples.entry((conns, i)).or_default().push(FloodSample {
                            flood,
                            good,
                            alone,
                            elsewhere,
                            cpu_us_per_req,
                            foreign,
                        });
                    }
                    (f, g) => eprintln!(
                        "{} c{conns}: flood {:?} good {:?}",
                        t.name,
                        f.err(),
                        g.err()
                    ),
                }
                pause();
            }
        }
    }

    println!();
    println!(
        "flood: tenant `flood` limited to {r}/s (burst {r}) under `wrk -t2 -cN` ({f}); tenant `good` \
         unlimited, 8 connections with {d} ms think time",
        r = s.flood_rate,
        f = match s.flood_delay_ms {
            0 => "saturating".to_string(),
            ms => format!("{ms} ms think time per connection"),
        },
        d = s.good_delay_ms
    );
    println!(
        "| target | conns | flood tries/s | × its limit | flood admitted/s | flood rejected | proxy CPU µs/req | good req/s | good p50 | good p99 | good p99 alone | flood slows good p99 | good p99, flood elsewhere | vs flood elsewhere | good non-2xx | other load | good p99 vs {REFERENCE} |"
    );
    println!(
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for &conns in &s.conns {
        let reference = list
            .iter()
            .position(|t| t.name == REFERENCE)
            .and_then(|i| samples.get(&(conns, i)))
            .map(|v| mean(v.iter().map(|x| x.good.p99_us)));
        for (i, t) in list.iter().enumerate() {
            let Some(v) = samples.get(&(conns, i)) else {
                continue;
            };
            let tries = mean(v.iter().map(|x| x.flood.rps));
            let admitted = mean(v.iter().map(|x| {
                let f = &x.flood;
                if f.requests == 0 {
                    0.0
                } else {
                    f.rps * (f.requests.saturating_sub(f.non2xx)) as f64 / f.requests as f64
                }
            }));
            let good_p99 = mean(v.iter().map(|x| x.good.p99_us));
            let alone_p99 = mean(v.iter().map(|x| x.alone.p99_us));
            let elsewhere_p99 = mean(v.iter().map(|x| x.elsewhere.p99_us));
            println!(
                "| {} | {} | {:.0} | {:.0}× | {:.1} | {} | {:.1} | {:.0} | {} | {} | {} | {:+.0}% | {} | {:.2} | {} | {:.2} | {} |",
                t.name,
                conns,
                tries,
                tries / s.flood_rate as f64,
                admitted,
                v.iter().map(|x| x.flood.non2xx).sum::<u64>(),
                mean(v.iter().map(|x| x.cpu_us_per_req)),
                mean(v.iter().map(|x| x.good.rps)),
                fmt_us(mean(v.iter().map(|x| x.good.p50_us))),
                fmt_us(good_p99),
                fmt_us(alone_p99),
                (good_p99 / alone_p99 - 1.0) * 100.0,
                fmt_us(elsewhere_p99),
                good_p99 / elsewhere_p99,
                v.iter().map(|x| x.good.non2xx).sum::<u64>(),
                mean(v.iter().map(|x| x.foreign)),
                reference.map_or("–".into(), |r| format!("{:.2}", good_p99 / r)),
            );
        }
    }
    println!();
    println!(
        "(mean of {} rounds of {}s; `good p99 alone` is the same good traffic run just before \
         without the flood; `flood rejected` is the total of non-2xx over all rounds; \
         `proxy CPU µs/req` is the proxy's CPU under the flood over the requests of both tenants; \
         `flood elsewhere`: the same flood sent to a server of its own on this machine while the \
         good traffic goes through the proxy, so `vs flood elsewhere` is what the flood costs the \
         good tenant beyond taking the shared cores; \
         nginx proxy_pass does not limit, so its flood is all admitted)",
        s.rounds,
        s.duration.as_secs()
    );
}

fn mean(it: impl Iterator<Item = f64>) -> f64 {
    let (n, sum) = it.fold((0usize, 0.0), |(n, s), x| (n + 1, s + x));
    if n == 0 { 0.0 } else { sum / n as f64 }
}

fn fmt_us(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0}us")
    } else if us < 1e6 {
        format!("{:.2}ms", us / 1e3)
    } else {
        format!("{:.2}s", us / 1e6)
    }
}
