//! The upstream and the proxies under test, each a child process on a free
//! loopback port with its config and logs in the bench's temp dir.

use std::convert::Infallible;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use super::procs::{
    ChildGuard, Redis, free_port, http_get, wait_for_port, which, with_children, write_file,
};

/// How each proxy limits tenants in this run.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Tenant `flood` gets this many requests per second (and as burst);
    /// `None` = every tenant has a huge limit.
    pub flood_rate: Option<u32>,
    /// tiergate identifies by an RS256 token before the header (jwt mode).
    pub jwt: bool,
}

/// The test fixtures' JWT keys (`tests/fixtures/jwt`).
const JWT_FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt");

/// An RS256 token for `tenant`, valid for a day, signed with the fixture
/// key whose public half tiergate verifies with in jwt mode.
pub fn bench_token(tenant: &str) -> String {
    let pem = std::fs::read(format!("{JWT_FIXTURES}/rsa_private.pem")).expect("fixture key");
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&pem).expect("fixture key parses");
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
        + 24 * 3600;
    let claims = serde_json::json!({ "tenant_id": tenant, "exp": exp });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims,
        &key,
    )
    .expect("sign the bench token")
}

/// A huge per-tenant rate that keeps all traffic admitted.
const HUGE_RATE: u64 = 100_000_000;

/// The origin every proxy forwards to (held until the end: dropping it
/// stops the server).
#[allow(dead_code)]
pub enum Upstream {
    Nginx(ChildGuard),
    Builtin(BuiltinUpstream),
}

impl Upstream {
    pub fn describe(&self) -> &'static str {
        match self {
            Upstream::Nginx(_) => "nginx (worker_processes 1, `return 200`)",
            Upstream::Builtin(_) => "built-in hyper server (1 thread)",
        }
    }
}

/// A proxy under test.
pub struct Target {
    pub name: &'static str,
    pub port: u16,
    /// tiergate's admin port (for /metrics).
    pub admin: Option<u16>,
    guards: Vec<ChildGuard>,
    redis: Option<Redis>,
}

impl Target {
    /// Processes whose CPU time is the proxy's cost (incl. redis).
    pub fn pids(&self) -> Vec<u32> {
        let mut v = self.proxy_pids();
        if let Some(r) = &self.redis {
            v.extend(r.pid());
        }
        v
    }

    /// The proxy's own processes (not its redis-server).
    pub fn proxy_pids(&self) -> Vec<u32> {
        self.guards.iter().filter_map(|g| g.pid()).collect()
    }

    /// Whether every process of this target still runs.
    pub fn alive(&mut self) -> bool {
        self.guards.iter_mut().all(|g| !g.exited())
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            == Some("0")
    })
}

/// Common nginx preamble: foreground child, all files in `dir`.
fn nginx_main(dir: &Path, workers: &str) -> String {
    let user = if is_root() { "user root;\n" } else { "" };
    format!(
        "{user}worker_processes {workers};\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 8192; multi_accept on; }}\n",
        d = dir.display()
    )
}

fn nginx_http_common(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
         keepalive_requests 100000000;\n  keepalive_timeout 120s;\n"
    )
}

/// Starts nginx with `conf` in its own prefix `dir`; waits for `port`.
fn start_nginx(name: &str, dir: &Path, conf: &str, port: u16) -> Result<ChildGuard, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let conf_path = write_file(dir, "nginx.conf", conf);
    let mut cmd = Command::new("nginx");
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(dir.join("error.log"))
        .args(["-g", "daemon off;"]);
    spawn_listening(name, &mut cmd, port, dir, &["error.log"])
}

/// Spawns `cmd` (stdin and stdout closed, stderr to `dir/stderr.log`) and
/// waits up to 10 s for it to listen on `port`. If it does not, kills it
/// and returns what it logged there and in `dir`'s `more_logs`.
fn spawn_listening(
    name: &str,
    cmd: &mut Command,
    port: u16,
    dir: &Path,
    more_logs: &[&str],
) -> Result<ChildGuard, String> {
    let log = dir.join("stderr.log");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).map_err(|e| e.to_string())?);
    let mut g = ChildGuard::spawn(name, cmd).map_err(|e| format!("spawn {name}: {e}"))?;
    if !wait_for_port(port, Duration::from_secs(10)) || g.exited() {
        g.kill();
        let mut text = std::fs::read_to_string(&log).unwrap_or_default();
        for more in more_logs {
            text.push_str(&std::fs::read_to_string(dir.join(more)).unwrap_or_default());
        }
        return Err(format!("{name} did not start:\n{text}"));
    }
    Ok(g)
}

/// The upstream: nginx answering a static 200 over keep-alive when nginx
/// is installed, else a built-in hyper server on its own thread.
pub fn start_upstream(tmp: &Path) -> (Upstream, u16) {
    let port = free_port();
    if which("nginx").is_some() {
        let dir = tmp.join("upstream");
        let conf = format!(
            "{main}http {{\n  {common}  server {{\n    listen 127.0.0.1:{port} backlog=4096;\n    \
             location / {{ default_type text/plain; return 200 \"ok\\n\"; }}\n  }}\n}}\n",
            main = nginx_main(&dir, "1"),
            common = nginx_http_common(&dir),
        );
        match start_nginx("nginx-upstream", &dir, &conf, port) {
            Ok(g) => return (Upstream::Nginx(g), port),
            Err(e) => eprintln!("note: nginx upstream failed, using the built-in one: {e}"),
        }
    }
    let port = free_port();
    (Upstream::Builtin(BuiltinUpstream::start(port)), port)
}

/// nginx `proxy_pass` to the upstream over a keep-alive pool, optionally
/// with `limit_req` keyed on `x-tenant-id`.
pub fn nginx_proxy(tmp: &Path, up: u16, limit_req: bool, limits: Limits) -> Result<Target, String> {
    let name = if limit_req {
        "nginx+limit_req"
    } else {
        "nginx proxy_pass"
    };
    let dir = tmp.join(if limit_req {
        "nginx-limit"
    } else {
        "nginx-proxy"
    });
    let port = free_port();
    let (zones, directives) = if limit_req {
        let mut zones = format!(
            "limit_req_zone $http_x_tenant_id zone=tenants:64m rate={HUGE_RATE}r/s;\n  \
             limit_req_status 429;\n"
        );
        let mut dirs = "limit_req zone=tenants burst=1000000 nodelay;\n      ".to_string();
        if let Some(r) = limits.flood_rate {
            zones.push_str(&format!(
                "  map $http_x_tenant_id $flood_key {{ flood flood; default \"\"; }}\n  \
                 limit_req_zone $flood_key zone=flood:1m rate={r}r/s;\n"
            ));
            dirs.push_str(&format!("limit_req zone=flood burst={r} nodelay;\n      "));
        }
        (zones, dirs)
    } else {
        (String::new(), String::new())
    };
    let conf = format!(
        "{main}http {{\n  {common}  {zones}\n  \
         upstream up {{ server 127.0.0.1:{up}; keepalive 512; keepalive_requests 100000000; }}\n  \
         server {{\n    listen 127.0.0.1:{port} backlog=4096 reuseport;\n    location / {{\n      \
         {directives}proxy_pass http://up;\n      proxy_http_version 1.1;\n      \
         proxy_set_header Connection \"\";\n      \
         proxy_set_header X-Forwarded-For $remote_addr;\n      \
         proxy_set_header X-Forwarded-Proto $scheme;\n    }}\n  }}\n}}\n",
        main = nginx_main(&dir, "auto"),
        common = nginx_http_common(&dir),
    );
    let g = start_nginx(name, &dir, &conf, port)?;
    serving(name, port, g)
}

/// The bare hyper proxy of `floor.rs`: this bench binary run again with
/// `--floor-proxy`.
pub fn floor(tmp: &Path, up: u16) -> Result<Target, String> {
    let name = "hyper floor";
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = tmp.join("hyper-floor");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let port = free_port();
    let mut cmd = Command::new(exe);
    cmd.arg(super::floor::ARG)
        .arg(port.to_string())
        .arg(up.to_string());
    let g = spawn_listening(name, &mut cmd, port, &dir, &[])?;
    serving(name, port, g)
}

/// haproxy with a stick-table tracking `x-tenant-id` request rates.
pub fn haproxy(tmp: &Path, up: u16, limits: Limits) -> Result<Target, String> {
    let dir = tmp.join("haproxy");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let port = free_port();
    let flood = match limits.flood_rate {
        Some(r) => format!(
            "  http-request deny deny_status 429 if {{ req.hdr(x-tenant-id) -m str flood }} \
             {{ sc_http_req_rate(0) gt {r} }}\n"
        ),
        None => String::new(),
    };
    let conf = format!(
        "global\n  nbthread 2\n  maxconn 4096\n\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 120s\n  \
         timeout server 120s\n  option http-keep-alive\n  http-reuse always\n\n\
         frontend fe\n  bind 127.0.0.1:{port}\n  \
         stick-table type string len 128 size 200k expire 60s store http_req_rate(1s)\n  \
         http-request track-sc0 req.hdr(x-tenant-id)\n{flood}  \
         http-request deny deny_status 429 if {{ sc_http_req_rate(0) gt {HUGE_RATE} }}\n  \
         default_backend be\n\n\
         backend be\n  server up 127.0.0.1:{up}\n"
    );
    let cfg = write_file(&dir, "haproxy.cfg", &conf);
    let mut cmd = Command::new("haproxy");
    cmd.arg("-f").arg(&cfg).arg("-db").current_dir(&dir);
    let g = spawn_listening("haproxy", &mut cmd, port, &dir, &[])?;
    serving("haproxy stick-table", port, g)
}

/// A tiergate binary (`E2E_TIERGATE_BIN` or this build's, or
/// `E2E_BASELINE_BIN`) named `name`, memory or redis backend.
pub fn tiergate(
    bin: &Path,
    name: &'static str,
    tmp: &Path,
    up: u16,
    redis: bool,
    limits: Limits,
) -> Result<Target, String> {
    let sub = name.replace(' ', "-");
    let dir = tmp.join(sub);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let redis_server = if redis {
        Some(Redis::start().ok_or("redis-server is not available")?)
    } else {
        None
    };
    let backend = match &redis_server {
        Some(r) => format!(
            "backend:\n  type: redis\n  redis:\n    url: \"{}\"\n    key_prefix: bench\n",
            r.url()
        ),
        None => format!(
            "backend:\n  type: memory\n  state_file: \"{}\"\n",
            dir.join("state.json").display()
        ),
    };
    let (flood_tier, flood_tenant) = match limits.flood_rate {
        Some(r) => (
            format!("  limited: {{ rate: {r}/s, burst: {r} }}\n"),
            "tenants:\n  flood: { tier: limited }\n".to_string(),
        ),
        None => (String::new(), String::new()),
    };
    let identity = if limits.jwt {
        format!(
            "identity:\n  sources:\n    - type: jwt\n      algorithms: [RS256]\n      \
             public_key_file: \"{JWT_FIXTURES}/rsa_public.pem\"\n      tenant_claim: tenant_id\n    \
             - type: header\n      name: x-tenant-id\n"
        )
    } else {
        String::new()
    };
    let port = free_port();
    let admin = free_port();
    let yaml = format!(
        "server:\n  listen: \"127.0.0.1:{port}\"\n  max_connections: 20000\n  \
         max_connections_per_ip: 100000\nadmin:\n  listen: \"127.0.0.1:{admin}\"\n\
         upstream:\n  url: \"http://127.0.0.1:{up}\"\n{backend}{identity}\
         tiers:\n  bench: {{ rate: {HUGE_RATE}/s, burst: 1000000000 }}\n{flood_tier}\
         default_tier: bench\n{flood_tenant}"
    );
    let cfg = write_file(&dir, "tiergate.yaml", &yaml);
    let log = dir.join("stderr.log");
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .arg("--config")
        .arg(&cfg)
        .args(["--log-format", "text"])
        .env("RUST_LOG", "warn")
        .env_remove("TIERGATE_ADMIN_TOKEN")
        .env_remove("TIERGATE_CONFIG")
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).map_err(|e| e.to_string())?);
    let mut g = ChildGuard::spawn(name, &mut cmd).map_err(|e| e.to_string())?;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if g.exited() {
            return Err(format!(
                "{name} exited:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        if http_get(admin, "/readyz", &[]).is_some_and(|(s, _)| s == 200) {
            break;
        }
        if std::time::Instant::now() > deadline {
            g.kill();
            return Err(format!(
                "{name} not ready in 15 s:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Target {
        name,
        port,
        admin: Some(admin),
        guards: vec![g],
        redis: redis_server,
    };
    probe(&t)?;
    Ok(t)
}

/// One request through the target must come back 200.
/// A proxy with no admin port, once it answers on `port`.
fn serving(name: &'static str, port: u16, g: ChildGuard) -> Result<Target, String> {
    let t = Target {
        name,
        port,
        admin: None,
        guards: vec![g],
        redis: None,
    };
    probe(&t)?;
    Ok(t)
}

fn probe(t: &Target) -> Result<(), String> {
    match http_get(t.port, "/", &[("x-tenant-id", "probe")]) {
        Some((200, _)) => Ok(()),
        Some((s, text)) => Err(format!("{}: probe got {s}:\n{text}", t.name)),
        None => Err(format!("{}: probe got no response", t.name)),
    }
}

/// A metric's samples in tiergate's `/metrics`: each label set (`{...}`,
/// or empty) with its value.
pub fn metric_samples(admin: u16, name: &str) -> Option<Vec<(String, f64)>> {
    let (_, text) = http_get(admin, "/metrics", &[])?;
    let body = text.split("\r\n\r\n").nth(1)?;
    Some(
        body.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(name)?;
                let (labels, value) = rest.rsplit_once(' ')?;
                if !(labels.is_empty() || labels.starts_with('{')) {
                    return None; // another metric sharing the prefix
                }
                Some((labels.to_string(), value.parse::<f64>().ok()?))
            })
            .collect(),
    )
}

/// Sum of a metric's samples over all label sets.
pub fn metric_sum(admin: u16, name: &str) -> Option<f64> {
    metric_samples(admin, name).map(|s| s.iter().map(|(_, v)| v).sum::<f64>() + 0.0)
}

/// CPU seconds used so far by `pids` and their direct children (nginx
/// workers), from /proc. Linux only; 0 where unreadable.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    let tick = 100.0; // USER_HZ on Linux
    let ticks: u64 = with_children(pids)
        .iter()
        .filter_map(|p| stat(*p))
        .map(|(_, t)| t)
        .sum();
    ticks as f64 / tick
}

/// (ppid, utime + stime) of a process.
fn stat(pid: u32) -> Option<(u32, u64)> {
    stat_fields(pid).map(|(ppid, own, _)| (ppid, own))
}

/// (ppid, utime + stime, cutime + cstime) of a process.
fn stat_fields(pid: u32) -> Option<(u32, u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After "pid (comm) ": state=0, ppid=1, ..., utime=11, stime=12,
    // cutime=13, cstime=14.
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some((n(1)? as u32, n(11)? + n(12)?, n(13)? + n(14)?))
}

/// CPU accounting of the whole machine against this bench's process tree,
/// to tell how much of the machine something else used during a run.
#[derive(Debug, Clone, Copy)]
pub struct CpuSnap {
    at: std::time::Instant,
    /// Busy CPU seconds of the machine (all cores).
    machine: f64,
    /// CPU seconds of this process and all its descendants (reaped
    /// children included).
    tree: f64,
}

impl CpuSnap {
    pub fn now() -> CpuSnap {
        let machine = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let line = s.lines().next()?.strip_prefix("cpu ")?.to_string();
                let v: Vec<u64> = line
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                // user nice system idle iowait irq softirq steal ...
                let total: u64 = v.iter().take(8).sum();
                let idle = v.get(3)? + v.get(4)?;
                Some((total - idle) as f64 / 100.0)
            })
            .unwrap_or(0.0);
        let mut parent: Vec<(u32, u32, u64)> = Vec::new();
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok())
                    && let Some((ppid, own, reaped)) = stat_fields(pid)
                {
                    parent.push((pid, ppid, own + reaped));
                }
            }
        }
        let mut tree = vec![std::process::id()];
        let mut i = 0;
        while i < tree.len() {
            let p = tree[i];
            tree.extend(parent.iter().filter(|x| x.1 == p).map(|x| x.0));
            i += 1;
        }
        let ticks: u64 = parent
            .iter()
            .filter(|x| tree.contains(&x.0))
            .map(|x| x.2)
            .sum();
        CpuSnap {
            at: std::time::Instant::now(),
            machine,
            tree: ticks as f64 / 100.0,
        }
    }

    /// Cores' worth of CPU used by processes outside this bench since
    /// `earlier` (a noise indicator: 0 on an otherwise idle machine).
    pub fn foreign_cores_since(&self, earlier: &CpuSnap) -> f64 {
        let wall = self.at.duration_since(earlier.at).as_secs_f64();
        if wall <= 0.0 {
            return 0.0;
        }
        (((self.machine - earlier.machine) - (self.tree - earlier.tree)) / wall).max(0.0)
    }
}

/// A minimal HTTP/1.1 keep-alive origin on its own thread and runtime.
pub struct BuiltinUpstream {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl BuiltinUpstream {
    fn start(port: u16) -> BuiltinUpstream {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind upstream");
        listener.set_nonblocking(true).expect("nonblocking");
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-upstream".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                    loop {
                        let (stream, _) = tokio::select! {
                            _ = &mut rx => return,
                            r = listener.accept() => match r {
                                Ok(x) => x,
                                Err(_) => continue,
                            },
                        };
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(async move {
                            let svc = hyper::service::service_fn(|_req| async {
                                Ok::<_, Infallible>(hyper::Response::new(
                                    http_body_util::Full::new(bytes::Bytes::from_static(b"ok\n")),
                                ))
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .keep_alive(true)
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                });
            })
            .expect("spawn upstream thread");
        assert!(
            wait_for_port(port, Duration::from_secs(5)),
            "built-in upstream did not listen"
        );
        BuiltinUpstream {
            stop: Some(tx),
            thread: Some(thread),
        }
    }
}

impl Drop for BuiltinUpstream {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
