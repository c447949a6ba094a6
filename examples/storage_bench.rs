//! CPU benchmark of 16-bit storage fused into the Cranelift kernels: adam over
//! `OPTC_BENCH_ELEMS` elements (default 64M, one tensor) on `OPTC_BENCH_THREADS` threads
//! (default 2), `OPTC_BENCH_STEPS` timed steps each (default 7) after one warm-up step, the
//! configurations taking turns step by step; prints the median and the best step.
//!
//! - fused: bf16 params, f32 gradient and state (`StorageMap::mixed(p, Bf16, false, false)`),
//!   `JitProgram::compile_stored` + `run_kernel_stored`: 24 bytes per element (param read and
//!   written as bf16, 4 B; g read, 4 B; m and v read and written, 16 B);
//! - fused, rounded stochastically: the same with `StorageMap::mixed(p, Bf16, false, true)`;
//! - f32: the same step with f32 params (`JitProgram::compile` + `run_kernel`): 28 bytes;
//! - MixedOptimizer: today's separate-pass CPU mixed precision on Cranelift (widen the bf16
//!   params, f32 step, round them back), counted at the fused step's 24 bytes for comparison.
//!
//! - ceiling: `a += s * b` over f32 (rayon, the same threads): 12 bytes per element, the
//!   in-place bandwidth this machine gives such a loop.
//!
//! Prints ms per step and the implied GB/s (bytes over time). Run with
//! `cargo run --release --example storage_bench`.
use optc::compiler::backend::clif::Precision;
use optc::compiler::backend::interp::{StepEnv, StepRun};
use optc::compiler::ir::{BufRole, Program};
use optc::compiler::passes::specialize::{specialize, Decisions};
use optc::compiler::storage::{self, Storage, StorageMap};
use optc::runtime::engine::cranelift::{run_kernel_stored, tensor_bases, JitProgram, RoundingKey};
use optc::runtime::mixed::{bf16, MixedOptimizer, MixedOptions};
use optc::runtime::{Backend, Inputs, TensorSpec};
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

/// A buffer in its storage type.
enum Buf {
    F32(Vec<f32>),
    Bits(Vec<u16>),
}

/// Steps of a program's Cranelift kernels over buffers stored as `map` (one tensor per space).
struct Stepper {
    program: Program,
    jit: JitProgram,
    bufs: Vec<Buf>,
    lens: Vec<Vec<usize>>,
    hypers: Vec<f64>,
    scalar_states: Vec<f64>,
    steps: u64,
}

impl Stepper {
    fn new(program: Program, map: &StorageMap, n: usize) -> Stepper {
        // Specialized for the default hyperparameters, as the runtime does.
        let hypers: Vec<f64> = program.info.hypers.iter().map(|h| h.default).collect();
        let decisions = Decisions::of(&program);
        let program = if decisions.is_empty() {
            program
        } else {
            specialize(&program, &decisions, &hypers)
        };
        let jit = JitProgram::compile_stored(&program, Precision::F32, map).expect("compile");
        let bufs = program
            .info
            .buffers
            .iter()
            .enumerate()
            .map(|(b, bi)| {
                let init = match bi.role {
                    BufRole::Param => values(n, 1),
                    BufRole::Input => values(n, 2).iter().map(|x| x * 1e-2).collect(),
                    _ => vec![0.0; n],
                };
                match map.of(b as u16) {
                    Storage::Native => Buf::F32(init),
                    st => Buf::Bits(init.iter().map(|&x| storage::nearest(st, x)).collect()),
                }
            })
            .collect();
        Stepper {
            lens: vec![vec![n]; program.info.spaces.len()],
            scalar_states: vec![0.0; program.info.scalar_states.len()],
            program,
            jit,
            bufs,
            hypers,
            steps: 0,
        }
    }

    #[allow(unsafe_code)] // runs the kernels over the buffers this stepper owns
    fn step(&mut self, pool: &rayon::ThreadPool) {
        let p = &self.program;
        let t = self.steps + 1;
        let env = StepEnv {
            hypers: &self.hypers,
            groups: &[],
            tensor_groups: &[],
            t: t as f64,
            scalar_states: &self.scalar_states,
            scalar_inputs: &[],
        };
        let mut run = StepRun::new(p, self.steps == 0, self.lens.clone());
        let variant = run.variant();
        for stage in &self.jit.kernels[variant] {
            for phase in stage {
                for jk in phase {
                    let space = jk.space as usize;
                    let lens = &self.lens[space];
                    let uniforms: Vec<Vec<f32>> = vec![jk
                        .abi
                        .uniforms
                        .iter()
                        .map(|&u| run.uniform(&env, u, space, 0) as f32)
                        .collect()];
                    let ptrs: Vec<Vec<*mut u8>> = vec![jk
                        .abi
                        .slots
                        .iter()
                        .map(|&b| match &mut self.bufs[b as usize] {
                            Buf::F32(v) => v.as_mut_ptr() as *mut u8,
                            Buf::Bits(v) => v.as_mut_ptr() as *mut u8,
                        })
                        .collect()];
                    let bases = tensor_bases(lens);
                    let key = RoundingKey {
                        bases: &bases,
                        seed: 1,
                        step: t,
                    };
                    // SAFETY: every pointer addresses a live buffer of `lens[0]` elements of
                    // its slot's storage type, owned by this stepper; slots are distinct buffers.
                    let results = unsafe {
                        run_kernel_stored(jk, p, lens, &ptrs, &uniforms, key, Some(pool))
                    };
                    for (r, v) in results {
                        run.set_reduction(r, v);
                    }
                }
            }
        }
        self.scalar_states = run.scalar_updates(&env);
        self.steps += 1;
    }
}

fn report(what: &str, times: &[f64], n: usize, bytes_per_elem: usize) {
    let med = median(times.to_vec());
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    let gbs = |secs: f64| (n * bytes_per_elem) as f64 / secs / 1e9;
    println!(
        "{what:<40} median {:>7.2} ms/step {:>6.2} GB/s | best {:>7.2} ms {:>6.2} GB/s  ({bytes_per_elem} B/element)",
        med * 1e3,
        gbs(med),
        min * 1e3,
        gbs(min)
    );
}

fn main() {
    let n = env_usize("OPTC_BENCH_ELEMS", 64 << 20);
    let threads = env_usize("OPTC_BENCH_THREADS", 2);
    let steps = env_usize("OPTC_BENCH_STEPS", 7);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool");
    let adam = optc::stdlib_rule("adam").expect("adam");

    let mut a = values(n, 3);
    let b = values(n, 4);
    let map = StorageMap::mixed(&adam, Storage::Bf16, false, false);
    let mut fused = Stepper::new(adam.clone(), &map, n);
    let map_sr = StorageMap::mixed(&adam, Storage::Bf16, false, true);
    let mut fused_sr = Stepper::new(adam.clone(), &map_sr, n);
    let mut f32_step = Stepper::new(adam.clone(), &StorageMap::default(), n);
    let specs = vec![vec![TensorSpec::new("w", &[n])]];
    let mut mixed = MixedOptimizer::<bf16>::new(Arc::new(adam), specs, MixedOptions::default())
        .and_then(|o| o.with_backend(Backend::Cranelift { threads }))
        .expect("mixed optimizer");
    let mut w: Vec<bf16> = values(n, 1).into_iter().map(bf16::from_f32).collect();
    let g: Vec<f32> = values(n, 2).iter().map(|x| x * 1e-2).collect();

    // The configurations take turns, one step each per round (the first round warms up), so
    // load from other processes spreads over all of them.
    let mut times = vec![Vec::new(); 5];
    for round in 0..=steps {
        let mut time = |i: usize, f: &mut dyn FnMut()| {
            let t0 = Instant::now();
            f();
            if round > 0 {
                times[i].push(t0.elapsed().as_secs_f64());
            }
        };
        time(0, &mut || {
            use rayon::prelude::*;
            pool.install(|| {
                a.par_chunks_mut(1 << 16)
                    .zip(b.par_chunks(1 << 16))
                    .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += 1e-3 * b))
            })
        });
        time(1, &mut || fused.step(&pool));
        time(2, &mut || f32_step.step(&pool));
        time(3, &mut || {
            let inputs = Inputs::default().tensor("g", vec![&g[..]]);
            mixed
                .step_with(&mut [vec![&mut w[..]]], &inputs)
                .expect("step");
        });
        time(4, &mut || fused_sr.step(&pool));
    }
    println!(
        "adam, {n} elements in one tensor, {threads} threads, {steps} steps each, taking turns"
    );
    report("ceiling: a += s * b (f32, rayon)", &times[0], n, 12);
    report("fused: bf16 params, f32 state", &times[1], n, 24);
    report("f32 params and state", &times[2], n, 28);
    report("MixedOptimizer<bf16> (separate passes)", &times[3], n, 24);
    report("fused, rounded stochastically", &times[4], n, 24);
}
