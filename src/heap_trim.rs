//! Gives memory tiergate has freed back to the operating system.
//!
//! glibc's `malloc` keeps what is freed in its arenas for reuse and returns
//! only a free stretch at the very top of an arena by itself. After a burst
//! of connections closes, their buffers are free but scattered between
//! chunks still in use, so the process keeps them: 10,000 keep-alive
//! connections took tiergate to 182 MiB of RSS, and closing them all left
//! it at 182 MiB for the rest of its life. `malloc_trim(0)` hands the free
//! pages inside the arenas back as well (`madvise`): the same process fell
//! to 41 MiB.
//!
//! What can be given back is *slack*: resident memory that `malloc` is
//! not using (RSS minus the bytes it has handed out). A check every 10 s
//! reads the process's RSS (`/proc/self/status`, no lock). Only while RSS
//! is [`TRIM_AFTER`] or more above the lowest it has been does it also
//! read how much `malloc` has handed out (`mallinfo2`), and it trims when
//! the slack is [`TRIM_AFTER`] above the lowest slack since the last trim;
//! after a trim, the slack it left is the new reference. So memory freed
//! all at once, freed bit by bit over several checks, or freed after a
//! second, smaller burst is each given back once it adds up to
//! [`TRIM_AFTER`]; a burst still open is not trimmed (its memory is in
//! use, not slack); and a trim that could release nothing (free chunks
//! sharing pages with live ones) is not repeated, because its slack
//! becomes the reference. The free count `mallinfo2` also reports is no
//! use as a trigger: a trim leaves the chunks free and only drops their
//! pages, so it stays high.
//!
//! Both calls walk every arena under its lock, and the trim makes a
//! system call per free stretch: after 10,000 connections closed, the
//! reading took 3 ms and the trim 11–24 ms. They run on Tokio's blocking
//! pool, so no worker spends its time on them, but a worker that
//! allocates in an arena while it is locked waits (once per trim, for at
//! most that long). Under a steady `wrk -c64` load the reading took
//! 10–23 µs.
//!
//! Only for glibc on Linux (`target_env = "gnu"`; `mallinfo2` needs glibc
//! 2.33 or later); elsewhere this does nothing.

use std::time::Duration;

use tokio::sync::watch;

/// How far RSS must be above its lowest before `malloc` is asked anything,
/// and how much the slack must grow to trim: about 1,800 closed
/// connections' worth (18.5 KB each).
pub const TRIM_AFTER: usize = 32 << 20;

/// How often RSS is checked.
const EVERY: Duration = Duration::from_secs(10);

/// Decides when to trim from readings of RSS and of the bytes `malloc`
/// has handed out.
#[derive(Debug, Default)]
pub struct Trigger {
    /// The lowest RSS seen.
    low_rss: Option<usize>,
    /// The slack the last trim left, or the lowest read since if lower.
    low_slack: Option<usize>,
}

impl Trigger {
    /// True when RSS is [`TRIM_AFTER`] or more above its lowest and the
    /// slack (`rss` minus `in_use()`, read only then) is [`TRIM_AFTER`]
    /// or more above its reference. The first check always reads, so that
    /// the reference is the slack at start.
    pub fn check(&mut self, rss: usize, in_use: impl FnOnce() -> usize) -> bool {
        let low_rss = self.low_rss.map_or(rss, |l| l.min(rss));
        self.low_rss = Some(low_rss);
        if self.low_slack.is_some() && rss - low_rss < TRIM_AFTER {
            return false;
        }
        let slack = rss.saturating_sub(in_use());
        let low_slack = self.low_slack.map_or(slack, |l| l.min(slack));
        self.low_slack = Some(low_slack);
        slack - low_slack >= TRIM_AFTER
    }

    /// Records the slack a trim left: the next trim needs as much again.
    pub fn trimmed(&mut self, rss: usize, in_use: usize) {
        self.low_slack = Some(rss.saturating_sub(in_use));
    }
}

/// Checks every 10 s until `shutdown` turns true (or its sender is gone),
/// trimming when [`Trigger`] says so. The check and the trim run on
/// Tokio's blocking pool, off the runtime that hosts the admin listener.
pub fn spawn(mut shutdown: watch::Receiver<bool>) {
    if !supported() {
        return;
    }
    tokio::spawn(async move {
        let mut trigger = Trigger::default();
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return;
                    }
                    continue;
                }
            }
            let checked = tokio::task::spawn_blocking(move || {
                let Some(rss) = rss_bytes() else {
                    return trigger;
                };
                if trigger.check(rss, in_use_bytes) {
                    let started = std::time::Instant::now();
                    let released = trim();
                    let after = rss_bytes().unwrap_or(rss);
                    trigger.trimmed(after, in_use_bytes());
                    tracing::debug!(
                        rss_before = rss,
                        rss_after = after,
                        released,
                        took_us = started.elapsed().as_micros() as u64,
                        "returned free heap memory to the OS"
                    );
                }
                trigger
            })
            .await;
            match checked {
                Ok(t) => trigger = t,
                Err(_) => return,
            }
        }
    });
}

/// Whether this build can read and trim the heap.
pub const fn supported() -> bool {
    cfg!(all(target_os = "linux", target_env = "gnu"))
}

/// This process's resident set size in bytes (`VmRSS`), if readable.
pub fn rss_bytes() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Bytes `malloc` has handed out and not had back: in its arenas
/// (`mallinfo2().uordblks`) and in chunks mapped on their own (`hblkhd`);
/// 0 where unsupported.
pub fn in_use_bytes() -> usize {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 takes no arguments and returns a plain struct
        // by value; glibc locks each arena while it reads it.
        let m = unsafe { libc::mallinfo2() };
        m.uordblks + m.hblkhd
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        0
    }
}

/// Returns the arenas' free pages to the OS (`malloc_trim(0)`); true if
/// any memory was released.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only releases pages of chunks that are free,
        // under each arena's lock; no memory in use is touched.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    fn never() -> usize {
        panic!("malloc asked while RSS is near its lowest")
    }

    #[test]
    fn a_burst_freed_at_once_is_trimmed_and_its_trim_not_repeated() {
        let mut t = Trigger::default();
        // At start: RSS 10 MiB, 4 in use; the slack reference is 6.
        assert!(!t.check(10 * MIB, || 4 * MIB));
        assert!(!t.check(10 * MIB + TRIM_AFTER - 1, never));
        // Connections open: their memory is in use, not slack.
        assert!(!t.check(200 * MIB, || 194 * MIB));
        // Closed: 190 MiB of slack.
        assert!(t.check(200 * MIB, || 4 * MIB));
        t.trimmed(40 * MIB, 4 * MIB);
        // 36 MiB of slack was left (pages shared with live chunks): the
        // same slack does not trim again.
        assert!(!t.check(44 * MIB, || 4 * MIB));
        assert!(!t.check(44 * MIB, || 4 * MIB));
    }

    #[test]
    fn memory_freed_bit_by_bit_is_trimmed_again_after_a_first_trim() {
        let mut t = Trigger::default();
        assert!(!t.check(26 * MIB, || 20 * MIB));
        assert!(!t.check(98 * MIB, || 92 * MIB));
        // Half the burst closed: 36 MiB of slack above the reference.
        assert!(t.check(98 * MIB, || 56 * MIB));
        t.trimmed(62 * MIB, 56 * MIB);
        // The other half closes: RSS does not grow, the slack does.
        assert!(!t.check(62 * MIB, || 38 * MIB));
        assert!(t.check(62 * MIB, || 20 * MIB));
    }

    #[test]
    fn a_second_smaller_burst_is_trimmed_when_it_closes_not_at_its_peak() {
        let mut t = Trigger::default();
        assert!(!t.check(26 * MIB, || 20 * MIB));
        assert!(t.check(200 * MIB, || 20 * MIB));
        t.trimmed(26 * MIB, 20 * MIB);
        // The second burst reuses chunks whose pages were given back:
        // RSS and the bytes in use grow together.
        assert!(!t.check(68 * MIB, || 62 * MIB));
        assert!(t.check(68 * MIB, || 20 * MIB));
    }

    #[test]
    fn the_slack_reference_follows_the_slack_down() {
        let mut t = Trigger::default();
        assert!(!t.check(10 * MIB, || 2 * MIB));
        // The load grows into the slack there was: 4 MiB left.
        assert!(!t.check(60 * MIB, || 56 * MIB));
        // It frees 33 MiB: above the 4, though not above the first 8.
        assert!(t.check(60 * MIB, || 23 * MIB));
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn rss_and_memory_in_use_are_read_and_free_pages_released() {
        assert!(rss_bytes().is_some_and(|r| r > MIB));
        // 8 MiB in 8 KiB pieces, all freed but the last, which pins the
        // arena's top so that glibc cannot return the rest by itself.
        let mut pieces: Vec<Vec<u8>> = (0..1024).map(|_| vec![1u8; 8 << 10]).collect();
        let pin = pieces.pop();
        let held = in_use_bytes();
        drop(pieces);
        assert!(
            in_use_bytes() + 4 * MIB <= held,
            "freed 8 MiB; in use went from {held} to {}",
            in_use_bytes()
        );
        assert!(trim(), "8 MiB of free chunks, but nothing was released");
        drop(pin);
    }
}
