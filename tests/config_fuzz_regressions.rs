//! Resource bounds of `Config::from_yaml` found or guarded by the
//! `config_parse` fuzz target (docs/FUZZING.md).
//!
//! YAML aliases let a small document describe a huge tree ("billion
//! laughs"). serde_yaml 0.9 counts alias expansions and refuses a document
//! that needs more than 100 per event ("repetition limit exceeded"), and
//! limits nesting to 128 levels ("recursion limit exceeded"). These tests pin
//! that `Config::from_yaml` inherits both, at the two places where the config
//! types buffer a whole YAML node before looking at it (the untagged
//! `Scalar` of durations and sizes, and the internally tagged identity
//! `sources`): the call returns `Err` within a bounded wall time, and the
//! memory it allocates (measured by a per-thread counting allocator) stays
//! small.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};

use tiergate::config::{Config, ConfigErrors};

/// Counts, per thread and only while enabled, the bytes allocated and not yet
/// freed, and their peak.
struct Counting;

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn account(delta: isize) {
    // `try_with`: never touch a thread-local that is being torn down.
    if TRACK.try_with(Cell::get).unwrap_or(false) {
        let _ = LIVE.try_with(|live| {
            let now = live.get() + delta;
            live.set(now);
            let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
        });
    }
}

// SAFETY: defers every operation to `System`; the bookkeeping touches only
// const-initialised thread-locals without destructors, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            account(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) };
        account(-(layout.size() as isize));
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            account(layout.size() as isize);
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            account(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Parses `text`, returning the result, the wall time and the peak of bytes
/// allocated (and not yet freed) by this thread during the call.
fn measure(text: &str) -> (Result<Config, ConfigErrors>, Duration, usize) {
    LIVE.set(0);
    PEAK.set(0);
    TRACK.set(true);
    let start = Instant::now();
    let result = Config::from_yaml(text);
    let elapsed = start.elapsed();
    TRACK.set(false);
    (result, elapsed, PEAK.get().max(0) as usize)
}

/// Wall-time bound: generous for a debug build on a loaded 2-core machine.
const MAX_TIME: Duration = Duration::from_secs(2);
/// Memory bound for documents of at most a few hundred KiB.
const MAX_BYTES: usize = 64 << 20;

/// Asserts `text` is refused within the bounds, with an error mentioning
/// `reason`.
fn assert_refused_quickly(what: &str, text: &str, reason: &str) {
    let (result, elapsed, peak) = measure(text);
    let errors = match result {
        Ok(_) => panic!("{what}: accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        errors.contains(reason),
        "{what}: expected `{reason}`, got: {errors}"
    );
    assert!(elapsed < MAX_TIME, "{what}: took {elapsed:?}");
    assert!(
        peak < MAX_BYTES,
        "{what}: allocated {} MiB for a {} KiB document",
        peak >> 20,
        text.len() >> 10
    );
}

/// A minimal valid config whose `upstream.timeout` is `value` (a YAML flow
/// node); `Scalar` buffers that node whole.
fn with_timeout(value: &str) -> String {
    format!(
        "upstream: {{ url: \"http://127.0.0.1:3000\", timeout: {value} }}\n\
         tiers: {{ free: {{ rate: 1/s, burst: 1 }} }}\n\
         default_tier: free\n"
    )
}

/// A minimal valid config with one identity source whose extra field `x` is
/// `value`; the internally tagged source buffers the whole mapping.
fn with_source_field(value: &str) -> String {
    format!(
        "upstream: {{ url: \"http://127.0.0.1:3000\" }}\n\
         identity: {{ sources: [ {{ type: header, name: x-tenant-id, x: {value} }} ] }}\n\
         tiers: {{ free: {{ rate: 1/s, burst: 1 }} }}\n\
         default_tier: free\n"
    )
}

/// The classic: `levels` anchors, each a list of `width` aliases of the
/// previous one, i.e. `width^levels` leaves from a few hundred bytes.
fn billion_laughs(levels: usize, width: usize) -> String {
    let mut s = String::from("[ &l0 [");
    s.push_str(&vec!["lol"; width].join(", "));
    s.push(']');
    for i in 1..levels {
        s.push_str(&format!(", &l{i} ["));
        s.push_str(&vec![format!("*l{}", i - 1); width].join(", "));
        s.push(']');
    }
    s.push(']');
    s
}

/// The documents below differ from valid ones only in the node under test.
#[test]
fn the_helpers_build_valid_configs() {
    let (result, _, _) = measure(&with_timeout("5s"));
    result.expect("valid");
    let (result, _, _) = measure(&with_source_field("1"));
    let err = result.expect_err("`x` is not a field").to_string();
    assert!(err.contains("unknown field `x`"), "{err}");
}

#[test]
fn yaml_alias_bomb_is_refused_quickly() {
    // 10^9 leaves from ~700 bytes.
    let bomb = billion_laughs(9, 10);
    assert!(bomb.len() < 1024);
    // Refused by the pre-parse guard before serde_yaml expands anything.
    assert_refused_quickly(
        "billion laughs in a duration",
        &with_timeout(&bomb),
        "anchors (`&name`, `*name`) are not supported",
    );
    assert_refused_quickly(
        "billion laughs in an identity source",
        &with_source_field(&bomb),
        "anchors (`&name`, `*name`) are not supported",
    );
}

/// Nesting deeper than serde_yaml's 128 levels.
#[test]
fn deep_nesting_is_refused_quickly() {
    let deep = format!("{}{}", "[".repeat(1_000), "]".repeat(1_000));
    assert_refused_quickly(
        "deep nesting in a duration",
        &with_timeout(&deep),
        "nested deeper than 32 levels",
    );
    assert_refused_quickly(
        "deep nesting in an identity source",
        &with_source_field(&deep),
        "nested deeper than 32 levels",
    );
}

// ---------------------------------------------------------------------------
// Findings of the config_parse fuzz target, fixed by the pre-parse guard in
// src/config.rs (`guard_yaml`: no anchors or aliases, flow nesting at most 32
// deep, documents at most 1 MiB). The sizes are chosen so that a regression
// fails in seconds and a few hundred MiB, not by exhausting the machine.
// ---------------------------------------------------------------------------

/// Fan-out within serde_yaml's repetition limit (which counts alias jumps,
/// 100 per event, not the size of what they expand to): one anchor of `n`
/// scalars aliased `n` times is `n²` nodes from `~5n` bytes. At the two
/// places that buffer a node whole (`Scalar`, the tagged identity source)
/// all of it is materialised before the type error. Measured in a debug
/// build: n = 3000 (15 KiB) takes ~13 s and peaks at ~380 MiB; n = 30000
/// (150 KiB) would need ~35 GiB.
#[test]
fn alias_fan_out_is_bounded() {
    let n = 3_000;
    let fan_out = format!(
        "[ &a [{}], [{}] ]",
        vec!["x"; n].join(","),
        vec!["*a"; n].join(",")
    );
    assert!(fan_out.len() < 16 << 10);
    assert_refused_quickly(
        "alias fan-out in a duration",
        &with_timeout(&fan_out),
        "anchors (`&name`, `*name`) are not supported",
    );
    assert_refused_quickly(
        "alias fan-out in an identity source",
        &with_source_field(&fan_out),
        "anchors (`&name`, `*name`) are not supported",
    );
}

/// Deep flow nesting costs time quadratic in the depth in the YAML scanner
/// itself (before any deserialisation, even under an unknown key): measured
/// in release, depth 40 000 (78 KiB) ~3.5 s, 160 000 (312 KiB) ~57 s.
#[test]
fn deep_flow_nesting_is_refused_quickly() {
    let deep = format!("{}{}", "[".repeat(50_000), "]".repeat(50_000));
    assert_refused_quickly(
        "deep flow nesting in a duration",
        &with_timeout(&deep),
        "nested deeper than 32 levels",
    );
}
