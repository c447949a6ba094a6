//! Any text through parse, check, lowering and the passes; rules that compile are run (see
//! `optc_fuzz::check_program` for the properties).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(src) = std::str::from_utf8(data) {
        optc_fuzz::check_source(src);
    }
});
