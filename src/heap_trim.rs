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
//! Trimming walks every arena's free chunks, each under its arena's lock,
//! and makes a system call per free stretch, and so does reading how much
//! is free (`mallinfo2`, without the system calls): after 10,000
//! connections closed, the reading took 3 ms and the trim 21 ms. Neither
//! runs blindly. A check every 10 s reads the process's RSS
//! (`/proc/self/status`, no lock), and only when that is [`TRIM_AFTER`]
//! above where the last trim left it (or where tiergate started) does it
//! read the arenas' free bytes and, if [`TRIM_AFTER`] of them are free,
//! trim. Memory freed by closed connections, evicted tenants or a drained
//! upstream pool is returned once; the next trim needs RSS to grow by as
//! much again. Under a steady load that holds its memory, the check finds
//! little free and costs ~10–20 µs.
//!
//! Only for glibc on Linux (`target_env = "gnu"`); elsewhere this does
//! nothing.

use std::sync::Weak;
use std::time::Duration;

/// How far RSS must have grown since the last trim, and how much of the
/// arenas must be free, for the check to trim: about 1,800 closed
/// connections' worth (18.5 KB each).
pub const TRIM_AFTER: usize = 32 << 20;

/// How often RSS is checked.
const EVERY: Duration = Duration::from_secs(10);

/// Decides when to trim from readings of RSS and the arenas' free bytes.
#[derive(Debug, Default)]
pub struct Trigger {
    /// RSS after the last trim, or the lowest reading since if lower.
    floor: Option<usize>,
}

impl Trigger {
    /// True when `rss` is [`TRIM_AFTER`] or more above the floor and
    /// `free()` (read only then) reports as much free in the arenas.
    pub fn check(&mut self, rss: usize, free: impl FnOnce() -> usize) -> bool {
        let floor = self.floor.map_or(rss, |f| f.min(rss));
        self.floor = Some(floor);
        rss - floor >= TRIM_AFTER && free() >= TRIM_AFTER
    }

    /// Records the RSS a trim left: the next trim needs growth from there.
    pub fn trimmed(&mut self, rss: usize) {
        self.floor = Some(rss);
    }
}

/// Checks every 10 s for as long as `alive` can be upgraded, trimming when
/// [`Trigger`] says so. The check and the trim run on Tokio's blocking
/// pool, off the runtime that hosts the admin listener.
pub fn spawn<T: Send + Sync + 'static>(alive: Weak<T>) {
    if !supported() {
        return;
    }
    tokio::spawn(async move {
        let mut trigger = Trigger::default();
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if alive.strong_count() == 0 {
                return;
            }
            let checked = tokio::task::spawn_blocking(move || {
                let Some(rss) = rss_bytes() else {
                    return trigger;
                };
                if trigger.check(rss, free_bytes) {
                    let started = std::time::Instant::now();
                    trim();
                    let after = rss_bytes().unwrap_or(rss);
                    trigger.trimmed(after);
                    tracing::debug!(
                        rss_before = rss,
                        rss_after = after,
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

/// Bytes the arenas hold free (`mallinfo2().fordblks`); 0 where unsupported.
pub fn free_bytes() -> usize {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 takes no arguments and returns a plain struct
        // by value; glibc locks each arena while it reads it.
        unsafe { libc::mallinfo2() }.fordblks
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        0
    }
}

/// Returns the arenas' free pages to the OS (`malloc_trim(0)`).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only releases pages of chunks that are free,
        // under each arena's lock; no memory in use is touched.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn trims_once_rss_has_grown_by_the_threshold_and_that_much_is_free() {
        let mut t = Trigger::default();
        let never = || -> usize { panic!("free memory read below the threshold") };
        assert!(!t.check(20 * MIB, never), "the first reading is the floor");
        assert!(!t.check(20 * MIB + TRIM_AFTER - 1, never));
        // Grown enough, but the memory is in use: no trim, floor kept.
        assert!(!t.check(20 * MIB + TRIM_AFTER, || MIB));
        assert!(t.check(20 * MIB + TRIM_AFTER, || TRIM_AFTER));
        t.trimmed(24 * MIB);
        assert!(!t.check(24 * MIB + TRIM_AFTER - 1, never));
        assert!(t.check(24 * MIB + TRIM_AFTER, || TRIM_AFTER));
    }

    #[test]
    fn a_trim_that_frees_nothing_is_not_repeated() {
        let mut t = Trigger::default();
        assert!(!t.check(10 * MIB, || 0));
        assert!(t.check(100 * MIB, || 90 * MIB));
        // The free chunks' pages were already gone: RSS stays where it was.
        t.trimmed(100 * MIB);
        let never = || -> usize { panic!("free memory read below the threshold") };
        assert!(!t.check(100 * MIB, never));
        assert!(!t.check(100 * MIB + TRIM_AFTER - 1, never));
    }

    #[test]
    fn the_floor_follows_rss_down() {
        let mut t = Trigger::default();
        let never = || -> usize { panic!("free memory read below the threshold") };
        assert!(!t.check(60 * MIB, never));
        assert!(!t.check(8 * MIB, never));
        assert!(t.check(8 * MIB + TRIM_AFTER, || TRIM_AFTER));
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn rss_and_free_memory_are_read() {
        assert!(rss_bytes().is_some_and(|r| r > MIB));
        // 8 MiB in 8 KiB pieces, all freed but the last, which pins the
        // arena's top so that glibc cannot return the rest by itself.
        let mut pieces: Vec<Vec<u8>> = (0..1024).map(|_| vec![1u8; 8 << 10]).collect();
        let pin = pieces.pop();
        let before = free_bytes();
        drop(pieces);
        assert!(
            free_bytes() >= before + 4 * MIB,
            "freed 8 MiB; free bytes went from {before} to {}",
            free_bytes()
        );
        trim();
        // The trimmed chunks are still free and can be handed out again.
        let again: Vec<Vec<u8>> = (0..1024).map(|_| vec![2u8; 8 << 10]).collect();
        assert!(again.iter().all(|p| p.iter().all(|&b| b == 2)));
        drop(pin);
    }
}
