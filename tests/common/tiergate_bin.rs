//! Runs the real `tiergate` binary built by cargo for this test run.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{run_with_timeout, wait_timeout};

/// Path of the binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_tiergate");
/// Upper bound on waiting for the `ready` log line.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound for one-shot CLI invocations (`check`, `override`, ...).
const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// Shared, growing list of output lines from a child process.
type Lines = Arc<Mutex<Vec<String>>>;

/// What the stderr reader thread reports to the starter.
enum Event {
    /// The ready line, with the proxy and admin addresses.
    Ready(SocketAddr, SocketAddr),
    /// A ready line whose `proxy`/`admin` fields did not parse.
    BadReady(String),
    /// stderr reached EOF (the process is gone or closed it).
    Eof,
}

/// A running `tiergate serve` process.
///
/// Started with `serve --config <tempdir>/tiergate.yaml --log-format json`,
/// working directory = that temp dir (so relative paths such as the memory
/// backend's `state_file` land there), inherited `TIERGATE_*` variables
/// removed and `RUST_LOG=info` unless the caller sets it. All stderr lines are
/// kept (see [`logs`](Self::logs)). SIGKILLed on drop if still alive.
pub struct Tiergate {
    dir: tempfile::TempDir,
    config: PathBuf,
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(String, String)>,
    child: Mutex<Child>,
    exit: Mutex<Option<ExitStatus>>,
    proxy: SocketAddr,
    admin: SocketAddr,
    logs: Lines,
    stdout: Lines,
}

impl Tiergate {
    /// Starts tiergate with config `yaml` and waits (10 s) until it logs
    /// `ready`. Panics with all of its stderr if it exits or times out first.
    pub fn start(yaml: &str) -> Tiergate {
        Tiergate::start_with_env(yaml, &[])
    }

    /// Like [`start`](Self::start), with extra environment variables (e.g.
    /// `TIERGATE_JWT_SECRET`, `TIERGATE_ADMIN_TOKEN`, `RUST_LOG`).
    pub fn start_with_env(yaml: &str, env: &[(&str, &str)]) -> Tiergate {
        Tiergate::start_inner(BIN.into(), None, yaml, env)
    }

    /// Runs `program args...` instead of `tiergate serve ...`, in the same
    /// kind of temp dir (with `yaml` written to `tiergate.yaml`) and under the
    /// same readiness contract. For other subcommands that serve, or for fake
    /// processes in the harness's own tests.
    pub fn start_program(
        program: &str,
        args: &[&str],
        yaml: &str,
        env: &[(&str, &str)],
    ) -> Tiergate {
        let args = args.iter().map(OsString::from).collect();
        Tiergate::start_inner(program.into(), Some(args), yaml, env)
    }

    /// Shared body of the constructors; `args: None` means the standard
    /// `serve --config <file> --log-format json`.
    fn start_inner(
        program: OsString,
        args: Option<Vec<OsString>>,
        yaml: &str,
        env: &[(&str, &str)],
    ) -> Tiergate {
        let dir = tempfile::tempdir().expect("tempdir for tiergate");
        let config = dir.path().join("tiergate.yaml");
        std::fs::write(&config, yaml).expect("write tiergate.yaml");
        let args = args.unwrap_or_else(|| {
            vec![
                "serve".into(),
                "--config".into(),
                config.clone().into_os_string(),
                "--log-format".into(),
                "json".into(),
            ]
        });
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let run = launch(dir.path(), &program, &args, &env);
        Tiergate {
            dir,
            config,
            program,
            args,
            env,
            child: Mutex::new(run.child),
            exit: Mutex::new(None),
            proxy: run.proxy,
            admin: run.admin,
            logs: run.logs,
            stdout: run.stdout,
        }
    }

    /// Proxy listener base URL, `http://127.0.0.1:P`.
    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.proxy)
    }

    /// Admin listener base URL, `http://127.0.0.1:P`.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// Proxy listener address (from the ready line).
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy
    }

    /// Admin listener address (from the ready line).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// OS process id.
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().id()
    }

    /// The process's working directory (a temp dir holding the config).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Path of the config file the process was started with.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Atomically replaces the config file (write + rename), e.g. before
    /// [`sighup`](Self::sighup) or `POST /v1/reload`.
    pub fn write_config(&self, yaml: &str) {
        let tmp = self.dir.path().join("tiergate.yaml.tmp");
        std::fs::write(&tmp, yaml).expect("write new config");
        std::fs::rename(&tmp, &self.config).expect("rename new config into place");
    }

    /// Sends SIGTERM (graceful shutdown).
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Sends SIGHUP (config reload).
    pub fn sighup(&self) {
        self.signal("HUP");
    }

    /// Sends SIGHUP and waits (5 s) until the process logs one more
    /// "config reloaded" line than before; panics with its output if not.
    pub fn reload_by_sighup(&self) {
        let reloads = || {
            self.logs
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains("config reloaded"))
                .count()
        };
        let before = reloads();
        self.sighup();
        let deadline = Instant::now() + Duration::from_secs(5);
        while reloads() <= before {
            assert!(
                Instant::now() < deadline,
                "no \"config reloaded\" log after SIGHUP\n{}",
                self.dump()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGINT (same as Ctrl-C).
    pub fn sigint(&self) {
        self.signal("INT");
    }

    /// Sends signal `name` (as understood by `kill -NAME`, e.g. `"TERM"`).
    /// Panics if the process has already exited.
    pub fn signal(&self, name: &str) {
        if let Some(status) = self.try_exit() {
            panic!(
                "cannot send SIG{name}: tiergate already exited with {status}\n{}",
                self.dump()
            );
        }
        let pid = self.pid().to_string();
        let out = run_with_timeout(
            Command::new("kill").arg(format!("-{name}")).arg(&pid),
            Duration::from_secs(5),
        );
        assert!(out.code == 0, "kill -{name} {pid} failed: {}", out.stderr);
    }

    /// Waits up to `timeout` for the process to exit; its status, or `None`
    /// if it is still running.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(status) = *self.exit.lock().unwrap() {
            return Some(status);
        }
        let status = wait_timeout(&mut self.child.lock().unwrap(), timeout);
        *self.exit.lock().unwrap() = status;
        status
    }

    /// Whether the process is still running.
    pub fn is_running(&self) -> bool {
        self.try_exit().is_none()
    }

    /// SIGKILLs the process (if alive) and reaps it.
    pub fn kill(&self) {
        if self.try_exit().is_none() {
            let status = {
                let mut child = self.child.lock().unwrap();
                let _ = child.kill();
                child.wait().ok()
            };
            *self.exit.lock().unwrap() = status;
        }
    }

    /// Stops the process (SIGTERM, then SIGKILL after 10 s) and starts it
    /// again in the same directory with the same config file and env. The
    /// listeners get new ports; [`logs`](Self::logs) starts over.
    pub fn restart(&mut self) {
        if self.is_running() {
            self.sigterm();
            if self.wait_exit(Duration::from_secs(10)).is_none() {
                self.kill();
            }
        }
        let run = launch(self.dir.path(), &self.program, &self.args, &self.env);
        *self.child.get_mut().unwrap() = run.child;
        *self.exit.get_mut().unwrap() = None;
        self.proxy = run.proxy;
        self.admin = run.admin;
        self.logs = run.logs;
        self.stdout = run.stdout;
    }

    /// Every stderr line so far (JSON log lines), in order.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Every stdout line so far.
    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Waits (bounded polling) until a stderr line containing `needle`
    /// appears; returns that line, or `None` after `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self
                .logs
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return Some(line.clone());
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// All collected output, formatted for assertion/panic messages.
    pub fn dump(&self) -> String {
        format_output(&self.logs(), &self.stdout())
    }

    /// Exit status if the process has exited (non-blocking).
    fn try_exit(&self) -> Option<ExitStatus> {
        let mut exit = self.exit.lock().unwrap();
        if exit.is_none() {
            *exit = self.child.lock().unwrap().try_wait().ok().flatten();
        }
        *exit
    }
}

impl Drop for Tiergate {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A freshly started, ready process.
struct Launched {
    child: Child,
    proxy: SocketAddr,
    admin: SocketAddr,
    logs: Lines,
    stdout: Lines,
}

/// Spawns `program args...` in `dir` and waits for its ready line.
fn launch(dir: &Path, program: &OsStr, args: &[OsString], env: &[(String, String)]) -> Launched {
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(dir);
    hermetic_env(&mut cmd);
    if !env.iter().any(|(k, _)| k == "RUST_LOG") {
        cmd.env("RUST_LOG", "info");
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {program:?}: {e}"));

    let logs: Lines = Arc::default();
    let stdout: Lines = Arc::default();
    let (tx, rx) = mpsc::channel();
    collect_lines(child.stderr.take(), logs.clone(), Some(tx));
    collect_lines(child.stdout.take(), stdout.clone(), None);

    let deadline = Instant::now() + READY_TIMEOUT;
    let fail = |child: &mut Child, why: String| -> ! {
        let _ = child.kill();
        let status = child.wait();
        // Give the reader threads a moment to collect the last lines.
        let _ = rx.recv_timeout(Duration::from_millis(500));
        let logs = logs.lock().unwrap().clone();
        let out = stdout.lock().unwrap().clone();
        panic!(
            "tiergate did not become ready: {why} (status: {status:?})\n{}",
            format_output(&logs, &out)
        );
    };
    loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(Event::Ready(proxy, admin)) => {
                return Launched {
                    child,
                    proxy,
                    admin,
                    logs,
                    stdout,
                };
            }
            Ok(Event::BadReady(line)) => fail(
                &mut child,
                format!("unparseable proxy/admin in ready line {line}"),
            ),
            Ok(Event::Eof) | Err(RecvTimeoutError::Disconnected) => {
                let status = wait_timeout(&mut child, Duration::from_secs(2));
                fail(&mut child, format!("stderr closed; exit status {status:?}"))
            }
            Err(RecvTimeoutError::Timeout) => {
                if let Ok(Some(status)) = child.try_wait() {
                    fail(&mut child, format!("exited with {status}"));
                }
                if Instant::now() >= deadline {
                    fail(
                        &mut child,
                        format!("no ready line within {READY_TIMEOUT:?}"),
                    );
                }
            }
        }
    }
}

/// Reads `pipe` line by line on a thread into `lines`; if `events` is given,
/// reports the ready line and EOF on it.
fn collect_lines<R: Read + Send + 'static>(
    pipe: Option<R>,
    lines: Lines,
    events: Option<mpsc::Sender<Event>>,
) {
    let Some(pipe) = pipe else { return };
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&buf)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            let ready = events.as_ref().and_then(|_| parse_ready(&line));
            lines.lock().unwrap().push(line);
            if let (Some(ev), Some(tx)) = (ready, events.as_ref()) {
                let _ = tx.send(ev);
            }
        }
        if let Some(tx) = events {
            let _ = tx.send(Event::Eof);
        }
    });
}

/// Recognises the readiness line: a JSON object whose `fields` (or, leniently,
/// top level) has `"message": "ready"` plus `proxy` and `admin` addresses.
fn parse_ready(line: &str) -> Option<Event> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = v.get("fields").unwrap_or(&v);
    if fields.get("message")?.as_str()? != "ready" {
        return None;
    }
    let addr = |k: &str| -> Option<SocketAddr> { fields.get(k)?.as_str()?.parse().ok() };
    Some(match (addr("proxy"), addr("admin")) {
        (Some(p), Some(a)) => Event::Ready(p, a),
        _ => Event::BadReady(line.to_string()),
    })
}

/// Removes inherited `TIERGATE_*` variables so the developer's environment
/// cannot leak into tests.
fn hermetic_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TIERGATE_") {
            cmd.env_remove(key);
        }
    }
}

/// Formats stderr and stdout lines for panic messages.
fn format_output(stderr: &[String], stdout: &[String]) -> String {
    format!(
        "--- tiergate stderr ({} lines) ---\n{}\n--- tiergate stdout ({} lines) ---\n{}",
        stderr.len(),
        stderr.join("\n"),
        stdout.len(),
        stdout.join("\n")
    )
}

/// Runs `tiergate <args...>` to completion (30 s bound) in a fresh temp dir,
/// with inherited `TIERGATE_*` variables removed and `env` added.
/// Returns `(exit_code, stdout, stderr)`; exit code -1 means killed by signal.
pub fn run_tiergate(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let dir = tempfile::tempdir().expect("tempdir for tiergate cli");
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(dir.path());
    hermetic_env(&mut cmd);
    cmd.envs(env.iter().copied());
    let out = run_with_timeout(&mut cmd, CLI_TIMEOUT);
    (out.code, out.stdout, out.stderr)
}

/// Writes `yaml` to a temp file and runs `tiergate check --config FILE`.
/// Returns `(exit_code, stdout, stderr)`.
pub fn tiergate_check(yaml: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().expect("tempdir for tiergate check");
    let file = dir.path().join("tiergate.yaml");
    std::fs::write(&file, yaml).expect("write config for check");
    let file = file.to_str().expect("utf-8 temp path");
    run_tiergate(&["check", "--config", file], &[])
}
