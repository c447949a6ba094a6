//! CPU benchmark of mixed precision on Cranelift, the CPU-offload pattern: adam and adamw over
//! `OPTC_BENCH_ELEMS` elements (default 64M, one tensor) on `OPTC_BENCH_THREADS` threads
//! (default 2), `OPTC_BENCH_STEPS` timed steps each (default 7) after two warm-up steps, the
//! configurations taking turns step by step so that a busy machine slows them alike; prints the
//! median and the best step of each.
//!
//! Per rule:
//! - f32: an f32 [`Optimizer`] over lent f32 params (28 bytes per element: param, m and v read
//!   and written, g read);
//! - bf16 fused: [`MixedOptimizer<bf16>`] with f32 state, the conversions fused into the
//!   kernels (24 bytes: the param read and written as bf16);
//! - bf16 separate passes: the same through [`MixedOptimizer::with_separate_passes`] (widen the
//!   params, f32 step, round them back), counted at the fused step's 24 bytes;
//! - bf16 fused, bf16 state (16 bytes), and bf16 fused with stochastic rounding (24 bytes);
//! - ceiling: `a += s * b` over f32 (rayon, the same threads): 12 bytes per element, the
//!   in-place bandwidth this machine gives such a loop.
//!
//! Prints ms per step, the implied GB/s (bytes the configuration must move over time) and its
//! ratio to the ceiling. Run with `cargo run --release --example storage_bench`.
use optc::runtime::mixed::{bf16, MixedOptimizer, MixedOptions, Rounding};
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

/// One configuration under test: a step over its own params.
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

/// `a += s * b` over f32 on the pool: the in-place ceiling.
struct Ceiling {
    pool: rayon::ThreadPool,
    a: Vec<f32>,
    b: Vec<f32>,
    s: f32,
}

impl Config for Ceiling {
    fn step(&mut self, _: &[f32]) -> Result<(), optc::runtime::Error> {
        use rayon::prelude::*;
        let chunk = (self.a.len() / (self.pool.current_num_threads() * 8)).max(1 << 14);
        self.s += 1e-3;
        let s = self.s;
        let (a, b) = (&mut self.a, &self.b);
        self.pool.install(|| {
            a.par_chunks_mut(chunk)
                .zip(b.par_chunks(chunk))
                .for_each(|(x, y)| x.iter_mut().zip(y).for_each(|(x, y)| *x += s * y))
        });
        std::hint::black_box(&self.a);
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n = env_usize("OPTC_BENCH_ELEMS", 1 << 26);
    let threads = env_usize("OPTC_BENCH_THREADS", 2).max(1);
    let steps = env_usize("OPTC_BENCH_STEPS", 7).max(1);
    let backend = Backend::Cranelift { threads };
    let g = values(n, 7).iter().map(|x| x * 1e-2).collect::<Vec<f32>>();
    let w0 = values(n, 1);
    let specs = || vec![vec![TensorSpec::new("w", &[n])]];
    println!("{n} elements, {threads} threads, median (best) of {steps} steps");
    for rule in ["adam", "adamw"] {
        let program = Arc::new(optc::stdlib_rule(rule).ok_or("stdlib rule")?);
        let mixed =
            |options: MixedOptions, separate: bool| -> Result<Mixed, optc::runtime::Error> {
                Ok(Mixed {
                    opt: MixedOptimizer::<bf16>::new(Arc::clone(&program), specs(), options)?
                        .with_backend(backend)?
                        .with_separate_passes(separate)?,
                    w: w0.iter().map(|&x| bf16::from_f32(x)).collect(),
                })
            };
        let bf16_state = MixedOptions {
            bf16_state: true,
            ..Default::default()
        };
        let stochastic = MixedOptions {
            rounding: Rounding::Stochastic { seed: 0x5eed },
            ..Default::default()
        };
        let mut configs: Vec<(&str, usize, Box<dyn Config>)> = vec![
            (
                "f32 params and state",
                28,
                Box::new(F32 {
                    opt: Optimizer::lending(Arc::clone(&program), specs())?
                        .with_backend(backend)?,
                    w: w0.clone(),
                }),
            ),
            (
                "bf16 params, f32 state, fused",
                24,
                Box::new(mixed(MixedOptions::default(), false)?),
            ),
            (
                "bf16 params, f32 state, separate passes",
                24,
                Box::new(mixed(MixedOptions::default(), true)?),
            ),
            (
                "bf16 params and state, fused",
                16,
                Box::new(mixed(bf16_state, false)?),
            ),
            (
                "bf16 params, f32 state, stochastic, fused",
                24,
                Box::new(mixed(stochastic, false)?),
            ),
            (
                "ceiling a += s * b (f32)",
                12,
                Box::new(Ceiling {
                    pool: rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()?,
                    a: w0.clone(),
                    b: g.clone(),
                    s: 0.0,
                }),
            ),
        ];
        for (_, _, c) in configs.iter_mut() {
            c.step(&g)?;
            c.step(&g)?;
        }
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
        for _ in 0..steps {
            for (i, (_, _, c)) in configs.iter_mut().enumerate() {
                let start = Instant::now();
                c.step(&g)?;
                times[i].push(start.elapsed().as_secs_f64());
            }
        }
        let ceiling_gbs = {
            let t = median(times[configs.len() - 1].clone());
            (12 * n) as f64 / t / 1e9
        };
        println!("{rule}:");
        for ((name, bytes, _), t) in configs.iter().zip(&times) {
            let med = median(t.clone());
            let best = t.iter().copied().fold(f64::INFINITY, f64::min);
            let gbs = (*bytes * n) as f64 / med / 1e9;
            println!(
                "  {name:<44} {:>8.1} ms ({:>6.1})  {bytes:>2} B/elem  {gbs:>6.2} GB/s  {:>5.2} of the ceiling",
                med * 1e3,
                best * 1e3,
                gbs / ceiling_gbs
            );
        }
    }
    Ok(())
}
