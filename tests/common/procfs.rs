//! What /proc says about a process: open files, their limit, memory.

/// The soft `RLIMIT_NOFILE` of this process (children inherit it), from
/// /proc/self/limits; `usize::MAX` when unlimited, 1024 when unreadable.
pub fn soft_nofile() -> usize {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .map(|v| {
            if v == "unlimited" {
                usize::MAX
            } else {
                v.parse().unwrap_or(1024)
            }
        })
        .unwrap_or(1024)
}

/// Open file descriptors of `pid` (panics if the process is gone).
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/<pid>/fd")
        .count()
}

/// Resident set size of `pid` in KiB (panics if the process is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("read /proc/<pid>/status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}
