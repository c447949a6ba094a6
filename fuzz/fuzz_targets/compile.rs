//! Any text through parse, check, lowering, every pass, the diagnostics renderer and the
//! printers, without running: the front end at full speed.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(src) = std::str::from_utf8(data) {
        optc_fuzz::check_compile(src);
    }
});
