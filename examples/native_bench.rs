//! CPU benchmark of the native backend against Cranelift: adam, adamw, diffgrad and lion over
//! `OPTC_BENCH_ELEMS` elements (default 64M, one tensor) on `OPTC_BENCH_THREADS` threads
//! (default 2), `OPTC_BENCH_STEPS` timed steps (default 9) after two warm-up steps, with
//!
//! - f32 params and state (an [`Optimizer`] over lent f32 params);
//! - bf16 params, f32 state ([`MixedOptimizer<bf16>`], the conversions fused into the kernels);
//!
//! each on Cranelift and on the native backend, and two ceilings measured in the same run: the
//! rule's own access pattern (a trivial kernel over as many read, in-place and written streams,
//! of the same element sizes: [`optc::ceiling`]) and `a += s * b`. Every configuration of a rule
//! takes its turn step by step, so a busy machine slows them alike; prints medians (and the best
//! step). Run with `cargo run --release --example native_bench`.

use optc::ceiling::{Ceiling, Streams};
use optc::compiler::backend::clif::Precision;
use optc::compiler::storage::StorageMap;
use optc::runtime::mixed::{bf16, MixedOptimizer, MixedOptions};
use optc::runtime::{Backend, Inputs, Optimizer, TensorSpec};
use std::sync::Arc;
use std::time::Instant;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(default, |v| v as usize)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 16_777_216.0
                - 0.5
        })
        .collect()
}

/// One configuration under test: a step (or a pass of a ceiling kernel).
trait Config {
    fn step(&mut self, g: &[f32]) -> Result<(), optc::runtime::Error>;
}

struct F32 {
    opt: Optimizer<f32>,
    w: Vec<f32>,
}

impl Config for F32 {
    fn step(&mut self, g: &[f32]) -> Result<(), optc::runtime::Error> {
        self.opt.step_with(
            &mut [vec![&mut self.w[..]]],
            &Inputs::default().tensor("g", vec![g]),
        )
    }
}

struct Mixed {
    opt: MixedOptimizer<bf16>,
    w: Vec<bf16>,
}

impl Config for Mixed {
    fn step(&mut self, g: &[f32]) -> Result<(), optc::runtime::Error> {
        self.opt.step_with(
            &mut [vec![&mut self.w[..]]],
            &Inputs::default().tensor("g", vec![g]),
        )
    }
}

struct Pattern(Ceiling);

impl Config for Pattern {
    fn step(&mut self, _: &[f32]) -> Result<(), optc::runtime::Error> {
        self.0.run();
        Ok(())
    }
}

/// One configuration: its name, the bytes a step must move per element, the ceiling it is
/// measured against (index into the configurations), and the configuration.
type Entry = (String, usize, usize, Box<dyn Config>);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n = env_usize("OPTC_BENCH_ELEMS", 1 << 26);
    let threads = env_usize("OPTC_BENCH_THREADS", 2).max(1);
    let steps = env_usize("OPTC_BENCH_STEPS", 9).max(1);
    let rules: Vec<String> = std::env::var("OPTC_BENCH_RULES")
        .unwrap_or_else(|_| "adam,adamw,diffgrad,lion".into())
        .split(',')
        .map(str::to_string)
        .collect();
    if let Err(e) = optc::runtime::engine::native::Toolchain::find() {
        return Err(format!("{e}").into());
    }
    let g = values(n, 7).iter().map(|x| x * 1e-2).collect::<Vec<f32>>();
    let w0 = values(n, 1);
    let specs = || vec![vec![TensorSpec::new("w", &[n])]];
    println!("{n} elements, {threads} threads, median (best) of {steps} steps, taking turns");
    for rule in &rules {
        let program = Arc::new(optc::stdlib_rule(rule).ok_or("stdlib rule")?);
        let mut configs: Vec<Entry> = Vec::new();
        // The ceilings first: [0] f32 pattern, [1] bf16-param pattern, [2] a += s * b.
        // The program a step runs (specialized for the default hyperparameters).
        let mut probe = Optimizer::<f32>::new(Arc::clone(&program), vec![vec![vec![0.5; 4]]])?;
        probe.step(&Inputs::default().tensor("g", vec![&[1e-3; 4][..]]))?;
        let later = probe.active_program().clone();
        let map = StorageMap::mixed(&later, optc::compiler::storage::Storage::Bf16, false, false);
        for (name, streams) in [
            ("f32", Streams::of(&later, |_| 4)),
            (
                "bf16 params",
                Streams::of(&later, |b| map.of(b).bytes(Precision::F32)),
            ),
        ] {
            let bytes = streams.bytes_per_element();
            configs.push((
                format!("ceiling: its access pattern, {name}"),
                bytes,
                configs.len(),
                Box::new(Pattern(Ceiling::new(&streams, n, threads)?)),
            ));
        }
        let axpy = Streams {
            read: vec![4],
            inplace: vec![4],
            write: vec![],
        };
        configs.push((
            "ceiling: a += s * b".into(),
            12,
            2,
            Box::new(Pattern(Ceiling::new(&axpy, n, threads)?)),
        ));
        let (f32_bytes, bf16_bytes) = (configs[0].1, configs[1].1);
        for (bname, backend) in [
            ("cranelift", Backend::Cranelift { threads }),
            ("native", Backend::Native { threads }),
        ] {
            configs.push((
                format!("f32, {bname}"),
                f32_bytes,
                0,
                Box::new(F32 {
                    opt: Optimizer::lending(Arc::clone(&program), specs())?
                        .with_backend(backend)?,
                    w: w0.clone(),
                }),
            ));
            configs.push((
                format!("bf16 params, f32 state, {bname}"),
                bf16_bytes,
                1,
                Box::new(Mixed {
                    opt: MixedOptimizer::<bf16>::new(
                        Arc::clone(&program),
                        specs(),
                        MixedOptions::default(),
                    )?
                    .with_backend(backend)?,
                    w: w0.iter().map(|&x| bf16::from_f32(x)).collect(),
                }),
            ));
        }
        for (_, _, _, c) in configs.iter_mut() {
            c.step(&g)?;
            c.step(&g)?;
        }
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
        for _ in 0..steps {
            for (i, (_, _, _, c)) in configs.iter_mut().enumerate() {
                let start = Instant::now();
                c.step(&g)?;
                times[i].push(start.elapsed().as_secs_f64());
            }
        }
        let gbs: Vec<f64> = configs
            .iter()
            .zip(&times)
            .map(|((_, bytes, _, _), t)| (*bytes * n) as f64 / median(t.clone()) / 1e9)
            .collect();
        println!("{rule}:");
        for (i, ((name, bytes, ceiling, _), t)) in configs.iter().zip(&times).enumerate() {
            let med = median(t.clone());
            let best = t.iter().copied().fold(f64::INFINITY, f64::min);
            println!(
                "  {name:<40} {:>7.1} ms ({:>6.1})  {bytes:>2} B/elem  {:>6.2} GB/s  {:>5.2} of its pattern  {:>5.2} of a+=s*b",
                med * 1e3,
                best * 1e3,
                gbs[i],
                gbs[i] / gbs[*ceiling],
                gbs[i] / gbs[2],
            );
        }
        for prec in ["f32", "bf16 params, f32 state"] {
            let find = |b: &str| {
                configs
                    .iter()
                    .position(|c| c.0 == format!("{prec}, {b}"))
                    .map(|i| median(times[i].clone()))
            };
            if let (Some(c), Some(nat)) = (find("cranelift"), find("native")) {
                println!("  {prec}: native / cranelift step time {:.3}", nat / c);
            }
        }
    }
    Ok(())
}
