//! Compile time of every standard-library rule: source to kernels (parse, check, passes) and
//! kernels to machine code (Cranelift), median of 9 runs each.
//!
//! Run: `cargo run --release --example compile_times`

use optc::compiler::backend::clif::Precision;
use optc::runtime::JitProgram;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    println!(
        "{:<18} {:>8} {:>14} {:>12}",
        "rule", "kernels", "front+passes", "cranelift"
    );
    let (mut fronts, mut jits) = (Vec::new(), Vec::new());
    for (name, src) in optc::stdlib::RULES {
        let mut front = Vec::new();
        let mut jit = Vec::new();
        let mut kernels = 0;
        for _ in 0..9 {
            let start = Instant::now();
            let program = optc::compile_rule(src).expect("stdlib rule compiles");
            front.push(start.elapsed().as_secs_f64() * 1e3);
            let start = Instant::now();
            let j = JitProgram::compile(&program, Precision::F32).expect("cranelift");
            jit.push(start.elapsed().as_secs_f64() * 1e3);
            kernels = j.kernels.iter().flatten().flatten().flatten().count();
        }
        let (f, j) = (median(front), median(jit));
        fronts.push(f);
        jits.push(j);
        println!("{name:<18} {kernels:>8} {f:>11.2} ms {j:>9.2} ms");
    }
    println!(
        "{:<18} {:>8} {:>11.2} ms {:>9.2} ms",
        "median",
        "",
        median(fronts),
        median(jits)
    );
}
