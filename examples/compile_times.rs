//! Compile time of every standard-library rule: source to kernels (parse, check, passes) and
//! kernels to machine code (Cranelift), median of 9 runs each; and the native engine's
//! `with_backend` (the program the runtime runs, specialized on the default values): its first
//! compile into an empty cache (the C compiler; median of 3) and a load from the cache (median
//! of 9). The native columns are left out where no C compiler works.
//!
//! Run: `cargo run --release --example compile_times`

use optc::compiler::backend::clif::Precision;
use optc::runtime::{Backend, JitProgram, Optimizer};
use std::sync::Arc;
use std::time::Instant;

/// The native engine's first compile of `program` into an empty cache and its load from the
/// cache, in ms.
fn native(program: &Arc<optc::compiler::ir::Program>) -> Option<(f64, f64)> {
    optc::runtime::engine::native::Toolchain::find().ok()?;
    let bind = || {
        let params = vec![vec![vec![0.5f32; 8]]; program.info.spaces.len()];
        let opt = Optimizer::new(Arc::clone(program), params).ok()?;
        let start = Instant::now();
        let opt = opt.with_backend(Backend::Native { threads: 1 }).ok()?;
        let t = start.elapsed().as_secs_f64() * 1e3;
        drop(opt);
        Some(t)
    };
    let mut first = Vec::new();
    for _ in 0..3 {
        let dir = tempfile::tempdir().ok()?;
        std::env::set_var("OPTC_CACHE_DIR", dir.path());
        first.push(bind()?);
        let mut cached = Vec::new();
        for _ in 0..9 {
            cached.push(bind()?);
        }
        if first.len() == 3 {
            return Some((median(first), median(cached)));
        }
    }
    None
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    println!(
        "{:<18} {:>8} {:>14} {:>12} {:>14} {:>14}",
        "rule", "kernels", "front+passes", "cranelift", "native first", "native cached"
    );
    let (mut fronts, mut jits, mut firsts, mut loads) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
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
        let program = Arc::new(optc::compile_rule(src).expect("stdlib rule compiles"));
        let nat = match native(&program) {
            Some((first, cached)) => {
                firsts.push(first);
                loads.push(cached);
                format!("{first:>11.2} ms {cached:>11.3} ms")
            }
            None => String::new(),
        };
        println!("{name:<18} {kernels:>8} {f:>11.2} ms {j:>9.2} ms {nat}");
    }
    let nat = if firsts.is_empty() {
        String::new()
    } else {
        let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        format!(
            "{:>11.2} ms {:>11.3} ms   (slowest: {:.2} ms, {:.3} ms)",
            median(firsts.clone()),
            median(loads.clone()),
            max(&firsts),
            max(&loads)
        )
    };
    println!(
        "{:<18} {:>8} {:>11.2} ms {:>9.2} ms {nat}",
        "median",
        "",
        median(fronts),
        median(jits)
    );
}
