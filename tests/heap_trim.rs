//! Memory freed after a burst goes back to the OS (`src/heap_trim.rs`),
//! against the real binary: thousands of keep-alive connections each have
//! one request proxied, are held, then closed; tiergate's RSS must fall
//! back most of the way to where it started. Without the trim it stays at
//! its peak (glibc keeps the freed buffers in its arenas). glibc only.
#![cfg(all(target_os = "linux", target_env = "gnu"))]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{Tiergate, Upstream, fd_count, poll_until, rss_kib, soft_nofile};

/// Connections in the burst: ~18.5 KB of buffers each, so closing them
/// leaves well over the 32 MiB of new slack (resident but unused memory)
/// that makes the check trim.
const CONNS: usize = 4_000;

/// Sends one keep-alive `GET` and reads its whole response (head and a
/// `content-length` body); returns the open connection and the status line.
fn one_request(addr: SocketAddr) -> (TcpStream, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /burst HTTP/1.1\r\nhost: t\r\nx-tenant-id: burst\r\n\r\n")
        .expect("send");
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        let n = s.read(&mut chunk).expect("read response");
        assert!(n > 0, "connection closed before a response");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .expect("content-length");
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).expect("read body");
        assert!(n > 0, "connection closed inside the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let status = head.lines().next().unwrap_or_default().to_string();
    (s, status)
}

/// Raises this process's soft `RLIMIT_NOFILE` to `want` where the hard
/// limit allows; tiergate, started after, inherits it.
fn raise_nofile(want: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < want as u64 {
            lim.rlim_cur = (want as u64).min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[test]
fn rss_falls_back_after_a_burst_of_connections_closes() {
    raise_nofile(CONNS + 512);
    let limit = soft_nofile();
    assert!(
        limit >= CONNS + 512,
        "RLIMIT_NOFILE soft limit {limit} (hard limit included) is below the {} this test \
         needs",
        CONNS + 512
    );
    let upstream = Upstream::start();
    let tg = Tiergate::start(&format!(
        r#"server:
  listen: "127.0.0.1:0"
  max_connections: {max}
  max_connections_per_ip: {max}
  idle_timeout: 120s
admin:
  listen: "127.0.0.1:0"
upstream:
  url: "{url}"
tiers:
  free: {{ rate: 100000/s, burst: 100000 }}
default_tier: free
"#,
        max = CONNS + 100,
        url = upstream.url()
    ));
    let pid = tg.pid();
    let addr = tg.proxy_addr();
    let fd_base = fd_count(pid);
    let base = rss_kib(pid);

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut conns = Vec::with_capacity(CONNS);
    for i in 0..CONNS {
        assert!(Instant::now() < deadline, "only {i} connections in 60 s");
        let (conn, status) = one_request(addr);
        assert!(status.contains(" 200 "), "request {i}: {status}");
        conns.push(conn);
    }
    let held = rss_kib(pid);
    assert!(
        held > base + 32 * 1024,
        "{CONNS} held connections should take well over 32 MiB: {base} KiB → {held} KiB"
    );

    drop(conns);
    assert!(
        poll_until(Duration::from_secs(15), || fd_count(pid) < fd_base + 100),
        "tiergate still holds {} fds after the clients closed",
        fd_count(pid)
    );
    // The check runs every 10 s: give it two chances.
    let halfway = base + (held - base) / 2;
    let fell = poll_until(Duration::from_secs(25), || rss_kib(pid) < halfway);
    assert!(
        fell,
        "RSS {base} KiB at start, {held} KiB holding {CONNS} connections, still {} KiB 25 s \
         after they closed (wanted below {halfway} KiB)",
        rss_kib(pid)
    );
}
