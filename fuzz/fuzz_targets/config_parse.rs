//! `Config::from_yaml` on arbitrary UTF-8.
//!
//! Proves that no document makes the parser or the validator panic, that
//! every refusal holds at least one error and renders as text, and that an
//! accepted configuration can be summarised and keeps the invariants the
//! limiter divides and multiplies by (rate in (0, 1e9]/s, burst >= 1).
//! Resource exhaustion (YAML alias bombs, deep nesting) shows up
//! as libFuzzer `timeout-*` / `oom-*` / `slow-unit-*` artifacts: run with
//! `-timeout=` and `-rss_limit_mb=` (docs/FUZZING.md).
//!
//! Seeds: `fuzz/seeds/config_parse/` (the example config and every
//! `tests/fixtures/config/*.yaml`); dictionary: `fuzz/dict/config_parse.dict`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tiergate::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_yaml(text) {
        Ok(config) => {
            let summary = config.summary();
            assert!(!summary.is_empty());
            // Invariants the limiter relies on (`Gcra::new` divides by the
            // rate and multiplies by the burst).
            assert!(config.default_tier < config.tiers.len());
            for tier in &config.tiers {
                let rate = tier.limit.rate.per_second();
                assert!(rate.is_finite() && rate > 0.0 && rate <= 1e9, "{tier:?}");
                assert!(tier.limit.burst >= 1, "{tier:?}");
            }
        }
        Err(errors) => {
            assert!(!errors.errors.is_empty(), "an Err with no error");
            let _ = errors.to_string();
        }
    }
});
