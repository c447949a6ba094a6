//! The machine code of compiled programs is freed with them (alone in its binary: it measures
//! the process's resident memory).

/// Compiled kernels are freed with their program: compiling a rule thousands of times (as a
/// long run whose hyperparameter decisions change does) keeps the memory flat.
#[test]
fn compiled_programs_free_their_machine_code() {
    let rss = || -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
        statm
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 4096
    };
    let p = optc::stdlib_rule("adan").expect("adan");
    let compile = || {
        let jit = optc::runtime::engine::cranelift::JitProgram::compile(
            &p,
            optc::compiler::backend::clif::Precision::F32,
        )
        .expect("compiles");
        assert!(jit.kernels[1].iter().flatten().flatten().count() > 0);
    };
    for _ in 0..200 {
        compile();
    }
    let before = rss();
    for _ in 0..2000 {
        compile();
    }
    let grown = rss().saturating_sub(before);
    println!(
        "2000 compilations of adan: resident memory grew by {} KiB",
        grown / 1024
    );
    assert!(
        before == 0 || grown < 16 << 20,
        "resident memory grew by {} KiB",
        grown / 1024
    );
}
