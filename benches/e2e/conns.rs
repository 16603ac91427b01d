//! Conns mode: what holding many keep-alive connections costs each proxy
//! in memory (issue #6: 10,000 connections in < 256 MiB).
//!
//! For each target in turn: read its processes' RSS, open N connections
//! that each send one request and read its answer, hold them all for two
//! seconds, read the RSS again, then close them and read it once more
//! [`SETTLE`] later. Requests go out in waves of [`WAVE`] so that a wave's
//! answers are read before the next is sent, as N clients arriving over a
//! few seconds would; each wave is one tenant's requests, as in allowed
//! mode.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::procs::{local, with_children};

/// Connections whose request is sent before their answers are read.
const WAVE: usize = 500;
/// The whole of one target's connections must be open and answered in this.
const LIMIT: Duration = Duration::from_secs(120);
/// How long the connections are held before the RSS is read.
const HOLD: Duration = Duration::from_secs(2);
/// How long after closing them the RSS is read again: tiergate checks
/// whether to give freed memory back every 10 s (`src/heap_trim.rs`).
pub const SETTLE: Duration = Duration::from_secs(12);

/// RSS in KiB of `pids` and their direct children (nginx workers), from
/// /proc; 0 for a process that cannot be read.
pub fn rss_kib(pids: &[u32]) -> u64 {
    with_children(pids)
        .iter()
        .filter_map(|p| {
            let status = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Opens `n` keep-alive connections to `port`, each answered 200 to one
/// request, and returns them open. Err names the first that was not.
pub fn hold(port: u16, n: usize) -> Result<Vec<TcpStream>, String> {
    let deadline = Instant::now() + LIMIT;
    let req = b"GET /conns HTTP/1.1\r\nhost: 127.0.0.1\r\nx-tenant-id: conns\r\n\r\n";
    let mut open: Vec<TcpStream> = Vec::with_capacity(n);
    while open.len() < n {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} connections answered in {LIMIT:?}",
                open.len()
            ));
        }
        let wave = WAVE.min(n - open.len());
        let first = open.len();
        for i in 0..wave {
            let mut s = TcpStream::connect_timeout(&local(port), Duration::from_secs(5))
                .map_err(|e| format!("connection {}: connect: {e}", first + i))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .and_then(|()| s.write_all(req))
                .map_err(|e| format!("connection {}: send: {e}", first + i))?;
            open.push(s);
        }
        for (i, s) in open[first..].iter_mut().enumerate() {
            let status = read_response(s).map_err(|e| format!("connection {}: {e}", first + i))?;
            if status != 200 {
                return Err(format!("connection {}: answered {status}", first + i));
            }
        }
    }
    std::thread::sleep(HOLD);
    Ok(open)
}

/// Reads one response (head and `content-length` body); its status.
fn read_response(s: &mut TcpStream) -> Result<u16, String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk) {
            Ok(0) => return Err("closed before an answer".into()),
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            Err(e) => return Err(format!("read: {e}")),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or("no status line")?;
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .ok_or("no content-length (a chunked answer is not expected here)")?;
    while buf.len() < head_end + length {
        match s.read(&mut chunk) {
            Ok(0) => return Err("closed inside the body".into()),
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    Ok(status)
}
