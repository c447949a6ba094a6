//! Well-typed rules drawn by `optc_fuzz::GenRule`: stages, scalar state, reductions of
//! reductions, several params, through every engine on the CPU.
#![no_main]
libfuzzer_sys::fuzz_target!(|rule: optc_fuzz::GenRule| {
    optc_fuzz::check_source(&rule.0);
});
