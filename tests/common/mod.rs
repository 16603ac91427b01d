//! Shared integration-test harness for `tiergate`.
//!
//! Every test file pulls this in with `mod common;`. It provides real
//! external processes and servers, never mocks:
//!
//! - [`RedisServer`]: a throw-away `redis-server` on a free port;
//! - [`Upstream`]: an HTTP/1.1 + h2c origin server that records what it sees;
//! - [`Tiergate`]: the real `tiergate` binary started from a YAML string;
//! - /proc readings ([`soft_nofile`], [`fd_count`], [`rss_kib`]);
//! - HTTP helpers ([`client`], [`burst`], [`raw_http`], [`h2c_request`]) and
//!   bounded polling helpers ([`poll_until`], [`eventually`]).
//!
//! Not every test file uses every item, hence the crate-level allows below.
#![allow(dead_code, unused_imports)]

mod cluster;
pub use cluster::*;
/// An origin that counts its TCP connections.
mod counting_upstream;
pub use counting_upstream::{Behaviour, CountingUpstream};
/// The fault-injecting TCP proxy.
mod fault;
/// HTTP client helpers.
mod http;
/// Open files, their limit and memory of a process, from /proc.
mod procfs;
/// Throw-away `redis-server` processes.
mod redis_server;
/// A fully read HTTP response and a shared request builder.
mod response;
/// The `tiergate` binary under test.
mod tiergate_bin;
/// The recording origin server.
mod upstream;
pub use fault::*;

/// HTTP client helpers: reqwest client, bursts, raw TCP, h2c.
pub use http::{burst, client, client_5s, h2c_request, raw_http};
/// /proc readings: `soft_nofile`, `fd_count`, `rss_kib`.
pub use procfs::{fd_count, rss_kib, soft_nofile};
/// A real `redis-server` on a free port.
pub use redis_server::RedisServer;
/// A fully read HTTP response, and `method url` + headers as a request.
pub use response::{Resp, request};
/// The real `tiergate` binary: `serve` handle and one-shot CLI runs.
pub use tiergate_bin::{Tiergate, run_tiergate, tiergate_check};
/// The recording HTTP/1.1 + h2c origin server.
pub use upstream::{Seen, Upstream, closed_port_url};

use std::io::Read;
use std::net::TcpListener;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
///
/// Binds `127.0.0.1:0`, reads the port the kernel picked and drops the
/// listener. Another process may grab the port in between, so callers that
/// start a server on it should be ready to retry.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// Calls `cond` every 10 ms until it returns `true` or `timeout` elapses.
///
/// Returns whether the condition became true. Blocking: inside an async test
/// prefer [`eventually`].
pub fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Async version of [`poll_until`]: awaits `cond()` every 10 ms until it
/// yields `true` or `timeout` elapses. Returns whether it became true.
pub async fn eventually<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Exit code, stdout and stderr of a finished command.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// Exit code; `-1` when the process was killed by a signal.
    pub code: i32,
    /// Everything written to stdout (lossy UTF-8).
    pub stdout: String,
    /// Everything written to stderr (lossy UTF-8).
    pub stderr: String,
}

/// Runs `cmd` to completion with piped stdout/stderr, bounded by `timeout`.
///
/// Both pipes are drained on their own threads so a chatty child cannot
/// deadlock. Panics (after SIGKILLing the child) if it does not exit in time.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> CmdOutput {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let status = wait_timeout(&mut child, timeout);
    let status = match status {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out.join().unwrap_or_default();
            let stderr = err.join().unwrap_or_default();
            panic!(
                "{cmd:?} did not exit within {timeout:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
            );
        }
    };
    CmdOutput {
        code: status.code().unwrap_or(-1),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// Reads a pipe to EOF on a background thread, returning its text.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Polls `child.try_wait()` every 10 ms for up to `timeout`; `None` if it is
/// still running at the deadline.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) => panic!("try_wait on pid {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
