//! Child processes for the benches: kill-on-drop guards, free ports, a
//! throw-away `redis-server`, and a Ctrl-C/SIGTERM handler that kills every
//! live child before the bench process exits.
//!
//! Shared by `benches/decision.rs` and `benches/e2e.rs` (via `#[path]`), so
//! not every item is used by both.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Pids of every child still alive, for the signal handler.
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Kills every registered child on SIGINT/SIGTERM, then exits. Without it a
/// Ctrl-C during a bench would orphan nginx/redis (Drop does not run).
pub fn install_signal_handler() {
    let _ = std::thread::Builder::new()
        .name("bench-signals".into())
        .spawn(|| {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut int), Ok(mut term)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) else {
                    return;
                };
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            });
            kill_all_registered();
            eprintln!("interrupted: killed child processes");
            std::process::exit(130);
        });
}

fn kill_all_registered() {
    let pids: Vec<u32> = LIVE.lock().map(|v| v.clone()).unwrap_or_default();
    signal(&with_children(&pids), "-KILL");
}

/// Sends `sig` (`-TERM`, `-KILL`) to `pids` with kill(1).
fn signal(pids: &[u32], sig: &str) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(sig)
        .args(pids.iter().map(|p| p.to_string()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// `pids` and their direct children (nginx workers), each once.
pub fn with_children(pids: &[u32]) -> Vec<u32> {
    let mut all = pids.to_vec();
    all.extend(children_of(pids));
    all.sort_unstable();
    all.dedup();
    all
}

/// Direct children of `pids` (nginx workers), from /proc.
pub fn children_of(pids: &[u32]) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(ppid) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                let rest = &s[s.rfind(')')? + 2..];
                rest.split_whitespace().nth(1)?.parse::<u32>().ok()
            })
            && pids.contains(&ppid)
        {
            out.push(pid);
        }
    }
    out
}

/// A child process that is SIGKILLed and reaped when dropped.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
}

impl ChildGuard {
    /// Spawns `cmd` and registers it for the signal handler.
    pub fn spawn(name: &str, cmd: &mut Command) -> std::io::Result<ChildGuard> {
        let child = cmd.spawn()?;
        if let Ok(mut v) = LIVE.lock() {
            v.push(child.id());
        }
        Ok(ChildGuard {
            name: name.to_string(),
            child: Some(child),
        })
    }

    /// Whether the process has exited (reaps it if so).
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits for exit for at most `limit`; on timeout kills it. Returns
    /// whether it exited by itself.
    pub fn wait_bounded(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.exited() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }

    /// Stops and reaps the process and its direct children (idempotent):
    /// SIGTERM first, so that nginx's master takes its workers down with it,
    /// then SIGKILL for whatever is left after 3 s.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = c.id();
            if matches!(c.try_wait(), Ok(None)) {
                let children = children_of(&[pid]);
                signal(&[pid], "-TERM");
                let deadline = Instant::now() + Duration::from_secs(3);
                while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let _ = c.kill();
                let _ = c.wait();
                // Children the master did not reap in time (pids are not
                // reused this fast; a dead one makes kill(1) a no-op).
                let left: Vec<u32> = children
                    .into_iter()
                    .filter(|p| Path::new(&format!("/proc/{p}")).exists())
                    .collect();
                signal(&left, "-KILL");
            } else {
                let _ = c.wait();
            }
            if let Ok(mut v) = LIVE.lock() {
                v.retain(|p| *p != pid);
            }
        }
    }

    /// The underlying child (for stdout).
    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether `prog` is an executable on `$PATH` (or in sbin dirs).
pub fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|d| d.join(prog))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// The loopback address of `port`.
pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Polls until something accepts on 127.0.0.1:`port` or `limit` passes.
pub fn wait_for_port(port: u16, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&local(port), Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

/// One HTTP/1.1 request on a fresh connection to 127.0.0.1:`port`; returns
/// the status and the whole response text. Bounded by a 5 s socket timeout.
pub fn http_get(port: u16, path: &str, headers: &[(&str, &str)]) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&local(port), Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut req = format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, text))
}

/// A throw-away `redis-server` on 127.0.0.1 with persistence off, its
/// working directory in a temp dir; killed on drop.
pub struct Redis {
    pub port: u16,
    child: ChildGuard,
    _dir: tempfile::TempDir,
}

impl Redis {
    /// Starts redis on a free port (retrying a few ports), waiting up to 10 s
    /// for `PING`. `None` with a note on stderr when `redis-server` is not
    /// installed or does not come up.
    pub fn start() -> Option<Redis> {
        let Some(bin) = which("redis-server") else {
            eprintln!("note: `redis-server` is not on PATH (apt-get install redis-server)");
            return None;
        };
        let dir = tempfile::tempdir().ok()?;
        for _ in 0..5 {
            let port = free_port();
            let mut cmd = Command::new(&bin);
            cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--protected-mode", "yes", "--loglevel", "warning"])
                .arg("--dir")
                .arg(dir.path())
                .arg("--logfile")
                .arg(dir.path().join("redis.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let Ok(mut child) = ChildGuard::spawn("redis-server", &mut cmd) else {
                continue;
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && !child.exited() {
                if ping(port) {
                    return Some(Redis {
                        port,
                        child,
                        _dir: dir,
                    });
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            child.kill();
        }
        eprintln!(
            "note: redis-server did not start; log:\n{}",
            std::fs::read_to_string(dir.path().join("redis.log")).unwrap_or_default()
        );
        None
    }

    /// The server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    /// `redis://127.0.0.1:P/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&local(port), Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    p
}
