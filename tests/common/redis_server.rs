//! A real, throw-away `redis-server` process for tests.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, run_with_timeout};

/// How many fresh ports [`RedisServer::start`] tries before giving up.
const START_ATTEMPTS: usize = 5;
/// Upper bound on how long one start attempt waits for `PING`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A `redis-server` child process bound to `127.0.0.1` on a free port, with
/// persistence disabled and its working directory and log in a temp dir.
///
/// SIGKILLed (and reaped) on drop.
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// Why one attempt to bring redis up failed.
enum StartError {
    /// The process exited before answering PING (typically: port taken).
    Exited(String),
    /// It kept running but never answered PING in time.
    Timeout,
}

impl RedisServer {
    /// Starts `redis-server` on a free port and waits (up to 10 s) until it
    /// answers `PING`. Retries with a new port up to 5 times if the process
    /// dies early (e.g. the port was taken). Panics with the server log if it
    /// cannot be started.
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir for redis");
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            match spawn_and_wait(port, dir.path()) {
                Ok(child) => {
                    return RedisServer {
                        port,
                        dir,
                        child: Some(child),
                    };
                }
                Err(StartError::Exited(why)) => last = why,
                Err(StartError::Timeout) => {
                    panic!(
                        "redis-server on port {port} did not answer PING within {READY_TIMEOUT:?}\n{}",
                        read_logs(dir.path())
                    )
                }
            }
        }
        panic!("redis-server failed to start after {START_ATTEMPTS} attempts\n{last}");
    }

    /// The TCP port redis listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The socket address redis listens on.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Connection URL for database 0: `redis://127.0.0.1:P/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The server's working directory (also holds `redis.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `redis-cli -p P <args...>` and returns its stdout, trimmed.
    ///
    /// Output is redis-cli's non-TTY ("raw") format: one value per line, e.g.
    /// `cli(&["TTL", "k"])` gives `"42"`, `cli(&["KEYS", "*"])` gives the keys
    /// separated by `\n`. Panics if redis-cli exits non-zero or takes > 10 s.
    pub fn cli(&self, args: &[&str]) -> String {
        let port = self.port.to_string();
        let out = run_with_timeout(
            Command::new("redis-cli")
                .args(["-h", "127.0.0.1", "-p", &port])
                .args(args),
            Duration::from_secs(10),
        );
        assert!(
            out.code == 0,
            "redis-cli {args:?} exited {}\nstdout: {}\nstderr: {}",
            out.code,
            out.stdout,
            out.stderr
        );
        out.stdout.trim().to_string()
    }

    /// Whether a `PING` currently gets `+PONG` back.
    pub fn is_up(&self) -> bool {
        ping(self.port)
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is
    /// answered, and what clients send waits in the socket, to be run in
    /// order once thawed. Thawed (SIGCONT) when the guard drops, so a
    /// failing assertion never leaves a stopped process behind.
    pub fn freeze(&self) -> Frozen {
        let pid = self.child.as_ref().expect("redis-server is running").id();
        signal(pid, "STOP");
        Frozen(pid)
    }

    /// SIGKILLs the server and reaps it (no-op if already dead). The port is
    /// left closed until [`restart`](Self::restart).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server if running and starts a fresh one on the same port
    /// and directory. It comes back empty (persistence is off). Panics with
    /// the log if it cannot come back within 10 s.
    pub fn restart(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(self.dir.path().join("dump.rdb"));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match spawn_and_wait(self.port, self.dir.path()) {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                // The old socket may linger briefly; retry until the deadline.
                Err(StartError::Exited(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(_) => panic!(
                    "redis-server failed to restart on port {}\n{}",
                    self.port,
                    read_logs(self.dir.path())
                ),
            }
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Spawns redis on `port` with `dir` as working dir and waits for PING.
fn spawn_and_wait(port: u16, dir: &Path) -> Result<Child, StartError> {
    let mut child = redis_server_command(port, dir)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning redis-server (is it installed?): {e}"));
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(StartError::Exited(format!(
                "redis-server on port {port} exited with {status}\n{}",
                read_logs(dir)
            )));
        }
        if ping(port) {
            return Ok(child);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(StartError::Timeout);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `redis-server` command on 127.0.0.1:`port` without persistence, with
/// `dir` as its working dir, logging to `dir/redis.log` and its stderr to
/// `dir/redis.stderr`; stdin and stdout are null. Callers may add arguments.
pub(super) fn redis_server_command(port: u16, dir: &Path) -> Command {
    let stderr = std::fs::File::create(dir.join("redis.stderr")).expect("create redis.stderr");
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(log_path(dir))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    cmd
}

/// Path of the redis log file inside `dir`.
fn log_path(dir: &Path) -> PathBuf {
    dir.join("redis.log")
}

/// The redis log plus anything it wrote to stderr, for panic messages.
fn read_logs(dir: &Path) -> String {
    let log = std::fs::read_to_string(log_path(dir)).unwrap_or_default();
    let err = std::fs::read_to_string(dir.join("redis.stderr")).unwrap_or_default();
    format!("--- redis.log ---\n{log}\n--- redis stderr ---\n{err}")
}

/// Sends an inline `PING` and checks for `+PONG` (bounded to ~500 ms).
fn ping(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(300)));
    let _ = stream.set_write_timeout(Some(Duration::from_millis(300)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    stream.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// A frozen `redis-server` (see [`RedisServer::freeze`]); thaws it on drop.
pub struct Frozen(u32);

impl Drop for Frozen {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

/// `kill -SIG pid`.
fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok || std::thread::panicking(), "kill -{sig} {pid} failed");
}
