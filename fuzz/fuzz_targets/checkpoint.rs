//! Arbitrary bytes as a checkpoint: loaded, or refused with nothing changed.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    optc_fuzz::check_checkpoint(data);
});
