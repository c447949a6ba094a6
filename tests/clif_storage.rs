//! 16-bit storage fused into the Cranelift kernels (`JitProgram::compile_stored`,
//! `run_kernel_stored`), run directly over bf16/f16 buffers, bit for bit against
//! - the same rule's f32 Cranelift kernels with every 16-bit store rounded (and read back) after
//!   each kernel by the shared scalar conversions (`optc_compiler::storage`): every stdlib rule;
//! - today's CPU `MixedOptimizer` (f32 step, rounded at its end), on Cranelift: every rule and
//!   setting where the two mean the same (`rounded_then_reloaded` is `None`);
//! - the CUDA emulator running the same `StorageMap`: rules whose f32 arithmetic agrees there;
//!
//! and every conversion (widening all 65,536 patterns, rounding a large probe of f32 values to
//! nearest and stochastically) against `half` and the shared functions, through the vector and
//! scalar paths, at odd element offsets.

use optc::compiler::backend::clif::Precision;
use optc::compiler::backend::interp::{StepEnv, StepRun};
use optc::compiler::ir::{BufRole, Program};
use optc::compiler::passes::specialize::{specialize, Decisions};
use optc::compiler::storage::{self, key_buffer, rounded_then_reloaded, Storage, StorageMap};
use optc::runtime::engine::cranelift::{run_kernel_stored, tensor_bases, JitProgram, RoundingKey};
use optc::runtime::mixed::{bf16, f16, MixedOptimizer, MixedOptions, Rounding};
use optc::runtime::{Backend, Inputs, TensorSpec};
use std::sync::Arc;

mod common;
use common::fill;
use common::OPTIONS;

/// Prints past the test harness's capture (to stderr).
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

/// Tensor sizes: the vector widths and the task size (16384) plus and minus one.
const SIZES: &[usize] = &[0, 1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 1023, 4097, 16383, 16385];
const STEPS: usize = 3;
const SEED: u64 = 0x5eed_0123_4567_89ab;

/// Many small tensors (batched several to a kernel call).
fn small_sizes() -> Vec<usize> {
    (0..300).map(|j| (j * 7 + 3) % 10).collect()
}

/// Rules whose CUDA and CPU steps agree bit for bit in f32 (no reductions, no transcendental
/// functions of elements).
const EXACT: &[&str] = &[
    "sgd", "adam", "adamw", "amsgrad", "adagrad", "rmsprop", "adamax",
];

/// A 16-bit value as the kernels load it: exact, a signaling NaN kept as it is.
fn load16(s: Storage, h: u16) -> f32 {
    let x = storage::widen(s, h);
    if !x.is_nan() {
        return x;
    }
    let h = u32::from(h);
    match s {
        Storage::Bf16 => f32::from_bits(h << 16),
        _ => f32::from_bits((h & 0x8000) << 16 | 0x7f80_0000 | (h & 0x3ff) << 13),
    }
}

/// One buffer: every tensor of its space, back to back after `SKEW` elements (so tensors start
/// at odd element offsets).
enum Arena {
    F32(Vec<f32>),
    Bits(Vec<u16>),
}

const SKEW: usize = 1;

struct Layout {
    /// `lens[space]`: the tensor sizes.
    lens: Vec<Vec<usize>>,
}

impl Layout {
    fn offsets(&self, space: usize) -> Vec<usize> {
        tensor_bases(&self.lens[space])
            .into_iter()
            .map(|b| b as usize + SKEW)
            .collect()
    }
    fn total(&self, space: usize) -> usize {
        self.lens[space].iter().sum::<usize>() + SKEW
    }
}

fn hyper_values(p: &Program, hypers: &[(&str, f64)]) -> Vec<f64> {
    p.info
        .hypers
        .iter()
        .map(|h| {
            hypers
                .iter()
                .find(|(n, _)| *n == h.name)
                .map_or(h.default, |&(_, v)| v)
        })
        .collect()
}

/// The program as the runtime runs it for these hyperparameter values (specialized).
fn specialized(p: &Program, values: &[f64]) -> Program {
    let d = Decisions::of(p).agreeing(p, &[values]);
    if d.is_empty() {
        p.clone()
    } else {
        specialize(p, &d, values)
    }
}

fn input_data(p: &Program, b: usize, space_lens: &[usize], step: usize) -> Vec<f32> {
    let mut v = vec![0.0f32; SKEW];
    for (j, &n) in space_lens.iter().enumerate() {
        v.extend(fill((step * 7919 + b * 104729 + j) as u64 + 17, n));
    }
    let _ = p;
    v
}

fn initial_param(space: usize, lens: &[usize]) -> Vec<f32> {
    let mut v = vec![0.0f32; SKEW];
    for (j, &n) in lens.iter().enumerate() {
        v.extend(fill(1000 * space as u64 + j as u64, n));
    }
    v
}

/// The params' bits and every state and output buffer (as f32) after the steps.
#[derive(Debug, PartialEq)]
struct Outcome {
    params: Vec<Vec<Vec<u16>>>,
    buffers: Vec<(String, Vec<Vec<u32>>)>,
}

/// Runs `steps` steps of `p` over `layout` with buffers stored as `map`: `fused` with the
/// 16-bit kernels, otherwise with the f32 kernels and every 16-bit store rounded and read back
/// after each kernel.
#[allow(unsafe_code)] // runs kernels over the arenas
fn run(
    p: &Program,
    layout: &Layout,
    map: &StorageMap,
    seed: u64,
    hypers: &[(&str, f64)],
    fused: bool,
    pool: &rayon::ThreadPool,
) -> Outcome {
    let info = &p.info;
    let values = hyper_values(p, hypers);
    let sp = specialized(p, &values);
    let jit = if fused {
        JitProgram::compile_stored(&sp, Precision::F32, map).expect("compile_stored")
    } else {
        JitProgram::compile(&sp, Precision::F32).expect("compile")
    };
    let mut arenas: Vec<Arena> = info
        .buffers
        .iter()
        .enumerate()
        .map(|(b, bi)| {
            let space = bi.space as usize;
            let st = map.of(b as u16);
            let init = match bi.role {
                BufRole::Param => initial_param(space, &layout.lens[space]),
                _ => vec![0.0; layout.total(space)],
            };
            match (st, fused) {
                (Storage::Native, _) => Arena::F32(init),
                (_, true) => Arena::Bits(init.iter().map(|&x| storage::nearest(st, x)).collect()),
                (_, false) => Arena::F32(
                    init.iter()
                        .map(|&x| load16(st, storage::nearest(st, x)))
                        .collect(),
                ),
            }
        })
        .collect();
    let mut scalar_states = vec![0.0; info.scalar_states.len()];
    for s in 0..STEPS {
        let t = (s + 1) as u64;
        for (b, bi) in info.buffers.iter().enumerate() {
            if bi.role == BufRole::Input {
                let space = bi.space as usize;
                arenas[b] = Arena::F32(input_data(p, b, &layout.lens[space], s));
            }
        }
        let scalar_inputs: Vec<f64> = (0..info.scalar_inputs.len())
            .map(|_| common::scalar_input(s as f64, STEPS as f64))
            .collect();
        let env = StepEnv {
            hypers: &values,
            groups: &[],
            tensor_groups: &[],
            t: t as f64,
            scalar_states: &scalar_states,
            scalar_inputs: &scalar_inputs,
            scalar_given: &[],
            seed,
        };
        let mut step = StepRun::new(&sp, s == 0, layout.lens.clone());
        let variant = step.variant();
        for (k, stage) in jit.kernels[variant].iter().enumerate() {
            for (pi, phase) in stage.iter().enumerate() {
                let ir_kernels = &sp.variants[variant].stages[k].phases[pi].kernels;
                for (jk, ik) in phase.iter().zip(ir_kernels) {
                    let space = jk.space as usize;
                    let lens = &layout.lens[space];
                    let offs = layout.offsets(space);
                    let uniforms: Vec<Vec<f32>> = (0..lens.len())
                        .map(|j| {
                            jk.abi
                                .uniforms
                                .iter()
                                .map(|&u| step.uniform(&env, u, space, j) as f32)
                                .collect()
                        })
                        .collect();
                    let ptrs: Vec<Vec<*mut u8>> = (0..lens.len())
                        .map(|j| {
                            jk.abi
                                .slots
                                .iter()
                                .map(|&b| match &mut arenas[b as usize] {
                                    Arena::F32(v) => v[offs[j]..].as_mut_ptr() as *mut u8,
                                    Arena::Bits(v) => v[offs[j]..].as_mut_ptr() as *mut u8,
                                })
                                .collect()
                        })
                        .collect();
                    let bases = tensor_bases(lens);
                    let key = RoundingKey {
                        bases: &bases,
                        seed,
                        step: t,
                    };
                    // SAFETY: each pointer addresses the rest of a live arena holding the
                    // tensor's elements in the slot's storage type; slots are distinct arenas.
                    let results = unsafe {
                        if fused {
                            run_kernel_stored(jk, &sp, lens, &ptrs, &uniforms, key, Some(pool))
                        } else {
                            // The same key: draws (spsa) take it too.
                            run_kernel_stored(jk, &sp, lens, &ptrs, &uniforms, key, Some(pool))
                        }
                    };
                    for (r, v) in results {
                        step.set_reduction(r, v);
                    }
                    if !fused {
                        // Round what the kernel stored into 16-bit buffers, and read it back.
                        for &(b, _) in &ik.stores {
                            let st = map.of(b);
                            if st == Storage::Native {
                                continue;
                            }
                            let Arena::F32(v) = &mut arenas[b as usize] else {
                                unreachable!()
                            };
                            let kb = key_buffer(&sp, b);
                            for (i, x) in v[SKEW..].iter_mut().enumerate() {
                                let h = if map.stochastic {
                                    let r = storage::rounding_bits(seed, t, kb, i as u64);
                                    storage::stochastic(st, *x, r)
                                } else {
                                    storage::nearest(st, *x)
                                };
                                *x = load16(st, h);
                            }
                        }
                    }
                }
            }
        }
        scalar_states = step.scalar_updates(&env);
    }
    let params = (0..info.spaces.len())
        .map(|space| {
            let offs = layout.offsets(space);
            layout.lens[space]
                .iter()
                .zip(offs)
                .map(|(&n, o)| match &arenas[space] {
                    Arena::Bits(v) => v[o..o + n].to_vec(),
                    Arena::F32(v) => v[o..o + n]
                        .iter()
                        .map(|&x| storage::nearest(map.of(space as u16), x))
                        .collect(),
                })
                .collect()
        })
        .collect();
    let buffers = info
        .buffers
        .iter()
        .enumerate()
        .filter(|(_, bi)| matches!(bi.role, BufRole::State | BufRole::Output))
        .map(|(b, bi)| {
            let space = bi.space as usize;
            let st = map.of(b as u16);
            let offs = layout.offsets(space);
            let ts = layout.lens[space]
                .iter()
                .zip(offs)
                .map(|(&n, o)| match &arenas[b] {
                    Arena::Bits(v) => v[o..o + n]
                        .iter()
                        .map(|&h| storage::widen(st, h).to_bits())
                        .collect(),
                    Arena::F32(v) => v[o..o + n].iter().map(|x| x.to_bits()).collect(),
                })
                .collect();
            (bi.name.clone(), ts)
        })
        .collect();
    Outcome { params, buffers }
}

fn pool() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("pool")
}

fn layouts(p: &Program) -> Vec<(&'static str, Layout)> {
    let n = p.info.spaces.len();
    vec![
        (
            "awkward sizes",
            Layout {
                lens: vec![SIZES.to_vec(); n],
            },
        ),
        (
            "many small tensors",
            Layout {
                lens: vec![small_sizes(); n],
            },
        ),
    ]
}

/// The storage settings: params as bf16 or f16; state f32 or bf16; nearest or stochastic.
fn settings() -> Vec<(Storage, bool, bool)> {
    let mut v = Vec::new();
    for param in [Storage::Bf16, Storage::F16] {
        for bf16_state in [false, true] {
            for stochastic in [false, true] {
                v.push((param, bf16_state, stochastic));
            }
        }
    }
    v
}

fn first_difference(a: &Outcome, b: &Outcome) -> String {
    for (s, (x, y)) in a.params.iter().zip(&b.params).enumerate() {
        for (j, (x, y)) in x.iter().zip(y).enumerate() {
            if let Some(e) = (0..x.len()).find(|&e| x[e] != y[e]) {
                return format!(
                    "param space {s} tensor {j} element {e}: {:#06x} vs {:#06x}",
                    x[e], y[e]
                );
            }
        }
    }
    for ((n, x), (_, y)) in a.buffers.iter().zip(&b.buffers) {
        for (j, (x, y)) in x.iter().zip(y).enumerate() {
            if let Some(e) = (0..x.len()).find(|&e| x[e] != y[e]) {
                return format!(
                    "{n} tensor {j} element {e}: {} vs {}",
                    f32::from_bits(x[e]),
                    f32::from_bits(y[e])
                );
            }
        }
    }
    "shapes differ".into()
}

#[test]
fn fused_kernels_match_rounding_after_each_kernel() {
    let pool = pool();
    let mut runs = 0;
    for name in optc::stdlib::names() {
        let p = optc::stdlib_rule(name).expect("stdlib rule");
        for (param, bf16_state, stochastic) in settings() {
            let map = StorageMap::mixed(&p, param, bf16_state, stochastic);
            for hypers in [&[][..], OPTIONS] {
                for (what, layout) in layouts(&p) {
                    let fused = run(&p, &layout, &map, SEED, hypers, true, &pool);
                    let reference = run(&p, &layout, &map, SEED, hypers, false, &pool);
                    assert!(
                        fused == reference,
                        "{name} {param:?} bf16 state {bf16_state} stochastic {stochastic} \
                         {hypers:?} {what}: {}",
                        first_difference(&fused, &reference)
                    );
                    runs += 1;
                }
            }
        }
    }
    say!("fused Cranelift kernels: {runs} runs bit for bit with rounding after each kernel");
}

/// The same run through `MixedOptimizer` on `backend`: with `separate`, as an f32 step with
/// conversion passes around it; otherwise fused where it can be. The buffers include the master
/// weights (as `NAME.master`) when there are any.
fn mixed_run<S: optc::runtime::mixed::Storage>(
    p: &Program,
    layout: &Layout,
    options: MixedOptions,
    hypers: &[(&str, f64)],
    backend: Backend,
    separate: bool,
) -> Result<Outcome, optc::runtime::Error> {
    let info = &p.info;
    let specs: Vec<Vec<TensorSpec>> = (0..info.spaces.len())
        .map(|s| {
            layout.lens[s]
                .iter()
                .enumerate()
                .map(|(j, &n)| TensorSpec::new(format!("s{s}.t{j}"), &[n]))
                .collect()
        })
        .collect();
    let mut opt = MixedOptimizer::<S>::new(Arc::new(p.clone()), specs, options)?
        .with_backend(backend)?
        .with_separate_passes(separate)?;
    for (h, v) in hypers {
        if info.hyper(h).is_some() {
            opt.inner_mut().set_hyper(h, *v)?;
        }
    }
    let mut params: Vec<Vec<Vec<S>>> = (0..info.spaces.len())
        .map(|s| {
            let all = initial_param(s, &layout.lens[s]);
            let offs = layout.offsets(s);
            layout.lens[s]
                .iter()
                .zip(offs)
                .map(|(&n, o)| all[o..o + n].iter().map(|&x| S::nearest(x)).collect())
                .collect()
        })
        .collect();
    for s in 0..STEPS {
        let data: Vec<(String, Vec<Vec<f32>>)> = info
            .buffers
            .iter()
            .enumerate()
            .filter(|(_, b)| b.role == BufRole::Input)
            .map(|(b, bi)| {
                let space = bi.space as usize;
                let all = input_data(p, b, &layout.lens[space], s);
                let offs = layout.offsets(space);
                let ts = layout.lens[space]
                    .iter()
                    .zip(offs)
                    .map(|(&n, o)| all[o..o + n].to_vec())
                    .collect();
                (bi.name.clone(), ts)
            })
            .collect();
        let mut inputs = Inputs::default();
        for (n, d) in &data {
            inputs = inputs.tensor(n, d.iter().map(Vec::as_slice).collect());
        }
        for sc in &info.scalar_inputs {
            inputs = inputs.scalar(sc, common::scalar_input(s as f64, STEPS as f64));
        }
        let mut lend: Vec<Vec<&mut [S]>> = params
            .iter_mut()
            .map(|ts| ts.iter_mut().map(Vec::as_mut_slice).collect())
            .collect();
        opt.step_with(&mut lend, &inputs)?;
    }
    let params = params
        .iter()
        .map(|ts| {
            ts.iter()
                .map(|t| S::bits_mut(&mut t.clone()).expect("16-bit").to_vec())
                .collect()
        })
        .collect();
    let bits = |v: &[Vec<f32>]| -> Vec<Vec<u32>> {
        v.iter()
            .map(|t| t.iter().map(|x| x.to_bits()).collect())
            .collect()
    };
    let mut buffers: Vec<(String, Vec<Vec<u32>>)> = info
        .buffers
        .iter()
        .filter(|bi| matches!(bi.role, BufRole::State | BufRole::Output))
        .map(|bi| (bi.name.clone(), bits(&opt.state(&bi.name).expect("buffer"))))
        .collect();
    for (s, m) in opt.master_weights().into_iter().flatten().enumerate() {
        buffers.push((format!("{}.master", info.spaces[s]), bits(&m)));
    }
    Ok(Outcome { params, buffers })
}

fn mixed_options(bf16_state: bool, stochastic: bool) -> MixedOptions {
    MixedOptions {
        master_weights: false,
        bf16_state,
        rounding: if stochastic {
            Rounding::Stochastic { seed: SEED }
        } else {
            Rounding::Nearest
        },
    }
}

fn mixed_by_type(
    p: &Program,
    layout: &Layout,
    param: Storage,
    options: MixedOptions,
    hypers: &[(&str, f64)],
    backend: Backend,
    separate: bool,
) -> Result<Outcome, optc::runtime::Error> {
    match param {
        Storage::Bf16 => mixed_run::<bf16>(p, layout, options, hypers, backend, separate),
        _ => mixed_run::<f16>(p, layout, options, hypers, backend, separate),
    }
}

#[test]
fn fused_kernels_match_the_cpu_mixed_optimizer() {
    let pool = pool();
    let (mut compared, mut skipped) = (0, std::collections::BTreeSet::new());
    for name in optc::stdlib::names() {
        let p = optc::stdlib_rule(name).expect("stdlib rule");
        if has_sample_axis(&p) {
            continue; // 16-bit storage refuses a sample axis (tests/sample_axis.rs)
        }
        for (param, bf16_state, stochastic) in settings() {
            let map = StorageMap::mixed(&p, param, bf16_state, stochastic);
            for hypers in [&[][..], OPTIONS] {
                let sp = specialized(&p, &hyper_values(&p, hypers));
                if rounded_then_reloaded(&sp, &map).is_some() {
                    skipped.insert(format!("{name} (bf16 state {bf16_state})"));
                    continue;
                }
                let options = mixed_options(bf16_state, stochastic);
                for (what, layout) in layouts(&p) {
                    let fused = run(&p, &layout, &map, SEED, hypers, true, &pool);
                    let cpu = mixed_by_type(
                        &p,
                        &layout,
                        param,
                        options,
                        hypers,
                        Backend::Cranelift { threads: 2 },
                        true,
                    )
                    .expect("CPU mixed run");
                    assert!(
                        fused == cpu,
                        "{name} {param:?} {options:?} {hypers:?} {what}: {}",
                        first_difference(&fused, &cpu)
                    );
                    compared += 1;
                }
            }
        }
    }
    say!(
        "fused Cranelift kernels: {compared} runs bit for bit with MixedOptimizer; \
         not comparable (a 16-bit buffer read again after its store): {skipped:?}"
    );
    assert!(compared > 0);
}

/// `MixedOptimizer` on Cranelift fuses its conversions into the kernels wherever no 16-bit
/// buffer is read again after its store, with master weights too, and gives the bits of its
/// separate passes (f32 step, rounded at its end).
#[test]
fn the_mixed_optimizer_fuses_on_cranelift() {
    let (mut fused_runs, mut separate_only) = (0, std::collections::BTreeSet::new());
    let backend = Backend::Cranelift { threads: 2 };
    for name in optc::stdlib::names() {
        let p = optc::stdlib_rule(name).expect("stdlib rule");
        if has_sample_axis(&p) {
            continue; // 16-bit storage refuses a sample axis (tests/sample_axis.rs)
        }
        for (param, bf16_state, stochastic) in settings() {
            for master_weights in [false, true] {
                let options = MixedOptions {
                    master_weights,
                    ..mixed_options(bf16_state, stochastic)
                };
                for hypers in [&[][..], OPTIONS] {
                    let (what, layout) = layouts(&p).swap_remove(0);
                    let one = |separate| {
                        mixed_by_type(&p, &layout, param, options, hypers, backend, separate)
                            .expect("mixed run")
                    };
                    let (fused, separate) = (one(false), one(true));
                    assert!(
                        fused == separate,
                        "{name} {param:?} {options:?} {hypers:?} {what}: {}",
                        first_difference(&fused, &separate)
                    );
                    let probe = match param {
                        Storage::Bf16 => MixedOptimizer::<bf16>::new(
                            Arc::new(p.clone()),
                            single_specs(&p),
                            options,
                        )
                        .and_then(|o| o.with_backend(backend))
                        .map(|o| o.is_fused()),
                        _ => MixedOptimizer::<f16>::new(
                            Arc::new(p.clone()),
                            single_specs(&p),
                            options,
                        )
                        .and_then(|o| o.with_backend(backend))
                        .map(|o| o.is_fused()),
                    }
                    .expect("optimizer");
                    let (q, map) = if master_weights {
                        let q = storage::with_master_weights(&p);
                        let map = StorageMap::mixed_with_masters(&q, param, bf16_state, stochastic);
                        (q, map)
                    } else {
                        (
                            p.clone(),
                            StorageMap::mixed(&p, param, bf16_state, stochastic),
                        )
                    };
                    let reloads = rounded_then_reloaded(&q, &map).is_some();
                    assert_eq!(probe, !reloads, "{name} {options:?}: fused {probe}");
                    if probe {
                        fused_runs += 1;
                    } else {
                        separate_only.insert(format!("{name} (bf16 state {bf16_state})"));
                    }
                }
            }
        }
    }
    say!(
        "MixedOptimizer on Cranelift: {fused_runs} fused runs bit for bit with separate passes; \
         separate passes only (a 16-bit buffer read again after its store): {separate_only:?}"
    );
    assert!(fused_runs > 0);
}

/// One tensor of 3 elements per space.
fn single_specs(p: &Program) -> Vec<Vec<TensorSpec>> {
    (0..p.info.spaces.len())
        .map(|s| vec![TensorSpec::new(format!("s{s}"), &[3])])
        .collect()
}

#[cfg(feature = "cuda")]
#[test]
fn fused_kernels_match_the_cuda_emulator() {
    let pool = pool();
    if let Err(e) = optc::runtime::device::Device::emulator() {
        if std::env::var("OPTC_REQUIRE_EMULATOR").as_deref() == Ok("1") {
            panic!("OPTC_REQUIRE_EMULATOR=1 but the CUDA emulator is unavailable: {e}");
        }
        say!("fused_kernels_match_the_cuda_emulator: skipped, no CUDA emulator ({e})");
        return;
    }
    let mut compared = 0;
    for &name in EXACT {
        let p = optc::stdlib_rule(name).expect("stdlib rule");
        for (param, bf16_state, stochastic) in settings() {
            let map = StorageMap::mixed(&p, param, bf16_state, stochastic);
            let options = mixed_options(bf16_state, stochastic);
            let hypers = OPTIONS;
            let layout = Layout {
                lens: vec![SIZES.to_vec(); p.info.spaces.len()],
            };
            let fused = run(&p, &layout, &map, SEED, hypers, true, &pool);
            let gpu = mixed_by_type(
                &p,
                &layout,
                param,
                options,
                hypers,
                Backend::CudaEmulator,
                false,
            )
            .expect("emulator run");
            assert!(
                fused == gpu,
                "{name} {param:?} {options:?}: {}",
                first_difference(&fused, &gpu)
            );
            compared += 1;
        }
    }
    say!("fused Cranelift kernels: {compared} runs bit for bit with the CUDA emulator");
}

/// f32 values that exercise 16-bit rounding: every 65,537th bit pattern (all exponents, both
/// signs, NaNs and infinities), ties and near-ties at the bf16 and f16 boundaries, the f16
/// subnormal range and overflow threshold.
fn rounding_probe() -> Vec<f32> {
    let mut v: Vec<f32> = (0..65536u32)
        .map(|i| f32::from_bits(i.wrapping_mul(65537)))
        .collect();
    for h in 0..0x400u32 {
        let x = (h as f32 + 0.5) * 2f32.powi(-24); // f16 subnormal ties
        v.extend([x, -x, x.next_up(), x.next_down()]);
    }
    for h in (0..0x7c00u32).step_by(7) {
        // f16 ties and near-ties between normals.
        let lo = f32::from(f16::from_bits(h as u16));
        let hi = f32::from(f16::from_bits(h as u16 + 1));
        let mid = ((f64::from(lo) + f64::from(hi)) / 2.0) as f32;
        v.extend([mid, -mid, mid.next_up(), mid.next_down()]);
    }
    for b in (0..0x10000u32).step_by(97) {
        let tie = f32::from_bits((b << 16) | 0x8000); // bf16 ties
        v.extend([tie, tie.next_up(), tie.next_down()]);
    }
    v.extend([
        65504.0,
        65519.99,
        65520.0,
        65536.0,
        -65520.0,
        1e-8,
        6e-8,
        3e-8,
        2f32.powi(-25), // the tie between 0 and the least f16 subnormal
        0.0,
        -0.0,
        1.0,
        -1.0,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        f32::from_bits(0x807f_ffff),
        f32::MAX,
        f32::MIN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::from_bits(0x7f80_0001), // signaling NaN
        f32::from_bits(0xffff_ffff),
        f32::from_bits(0x7f7f_8000), // rounds up to infinity in bf16
    ]);
    v
}

/// Runs rule `src` (one param `theta`, one input `g`) once over tensors of `sizes` with
/// storage `st_theta` / `st_g`; returns `theta`'s elements as stored (bits, f32 as its bits).
#[allow(unsafe_code)] // runs the kernel over the arenas
fn copy_kernel(
    src: &str,
    st_theta: Storage,
    st_g: Storage,
    stochastic: bool,
    theta: &[u32],
    g: &[u32],
    sizes: &[usize],
) -> Vec<u32> {
    let p = optc::compile_rule(src).expect("rule");
    let map = StorageMap {
        buffers: vec![st_theta, st_g],
        stochastic,
        ..Default::default()
    };
    let jit = JitProgram::compile_stored(&p, Precision::F32, &map).expect("compile");
    let pool = pool();
    // Each buffer an arena of its storage type, tensors back to back after one element.
    let mk = |st: Storage, data: &[u32]| -> Arena {
        if st == Storage::Native {
            let mut v = vec![0.0f32];
            v.extend(data.iter().map(|&b| f32::from_bits(b)));
            Arena::F32(v)
        } else {
            let mut v = vec![0u16];
            v.extend(data.iter().map(|&b| b as u16));
            Arena::Bits(v)
        }
    };
    let mut arenas = [mk(st_theta, theta), mk(st_g, g)];
    let bases = tensor_bases(sizes);
    let jk = &jit.kernels[0][0][0][0];
    let ptrs: Vec<Vec<*mut u8>> = bases
        .iter()
        .map(|&b| {
            jk.abi
                .slots
                .iter()
                .map(|&s| match &mut arenas[s as usize] {
                    Arena::F32(v) => v[1 + b as usize..].as_mut_ptr() as *mut u8,
                    Arena::Bits(v) => v[1 + b as usize..].as_mut_ptr() as *mut u8,
                })
                .collect()
        })
        .collect();
    let uniforms: Vec<Vec<f32>> = vec![Vec::new(); sizes.len()];
    let key = RoundingKey {
        bases: &bases,
        seed: SEED,
        step: 1,
    };
    // SAFETY: the arenas hold every tensor after their first element, in the slots' storage.
    unsafe { run_kernel_stored(jk, &p, sizes, &ptrs, &uniforms, key, Some(&pool)) };
    match &arenas[0] {
        Arena::F32(v) => v[1..].iter().map(|x| x.to_bits()).collect(),
        Arena::Bits(v) => v[1..].iter().map(|&h| u32::from(h)).collect(),
    }
}

/// Cuts `n` elements into tensors of awkward sizes (odd ones first, so most start at odd
/// element offsets), the last taking the rest.
fn cuts(n: usize) -> Vec<usize> {
    let mut sizes = Vec::new();
    let mut left = n;
    for s in [1usize, 3, 5, 7, 9, 17, 1023, 4097, 16385, 33] {
        if left < s {
            break;
        }
        sizes.push(s);
        left -= s;
    }
    sizes.push(left);
    sizes
}

const COPY: &str = "rule copy() { param theta\n input g\n theta = g }";

#[test]
fn stores_round_as_the_shared_conversions() {
    let probe = rounding_probe();
    let bits: Vec<u32> = probe.iter().map(|x| x.to_bits()).collect();
    let sizes = cuts(bits.len());
    let zeros = vec![0u32; bits.len()];
    for st in [Storage::Bf16, Storage::F16] {
        for stochastic in [false, true] {
            let out = copy_kernel(COPY, st, Storage::Native, stochastic, &zeros, &bits, &sizes);
            for (e, (&x, &y)) in probe.iter().zip(&out).enumerate() {
                let want = if stochastic {
                    storage::stochastic(st, x, storage::rounding_bits(SEED, 1, 0, e as u64))
                } else {
                    storage::nearest(st, x)
                };
                assert_eq!(
                    y,
                    u32::from(want),
                    "{st:?} stochastic {stochastic}: element {e}, {x:e} ({:#010x})",
                    x.to_bits()
                );
                if !stochastic {
                    let half = match st {
                        Storage::Bf16 => bf16::from_f32(x).to_bits(),
                        _ => f16::from_f32(x).to_bits(),
                    };
                    assert_eq!(y, u32::from(half), "{st:?}: {x:e} against half");
                }
            }
        }
    }
}

#[test]
fn loads_widen_every_pattern_exactly() {
    let all: Vec<u32> = (0..=u16::MAX as u32).collect();
    let sizes = cuts(all.len());
    let zeros = vec![0u32; all.len()];
    for st in [Storage::Bf16, Storage::F16] {
        // 16 bits into f32: exact (as half, a signaling NaN's quiet bit kept).
        let out = copy_kernel(COPY, Storage::Native, st, false, &zeros, &all, &sizes);
        for (&h, &y) in all.iter().zip(&out) {
            let want = load16(st, h as u16);
            assert_eq!(y, want.to_bits(), "{st:?} {h:#06x}");
            let half = match st {
                Storage::Bf16 => bf16::from_bits(h as u16).to_f32(),
                _ => f16::from_bits(h as u16).to_f32(),
            };
            assert!(
                y == half.to_bits() || (half.is_nan() && f32::from_bits(y).is_nan()),
                "{st:?} {h:#06x} against half"
            );
        }
        // 16 bits through f32 into 16 bits: every value kept, NaNs made quiet.
        for stochastic in [false, true] {
            let out = copy_kernel(COPY, st, st, stochastic, &zeros, &all, &sizes);
            for (&h, &y) in all.iter().zip(&out) {
                let want = storage::nearest(st, storage::widen(st, h as u16));
                assert_eq!(
                    y,
                    u32::from(want),
                    "{st:?} {h:#06x} stochastic {stochastic}"
                );
            }
        }
    }
}

/// Every f32 bit pattern through the vector and scalar stores, against `half` (run by hand:
/// `cargo test --release --test clif_storage -- --ignored`).
#[test]
#[ignore = "exhaustive: 2^32 values per format"]
fn stores_round_every_f32_as_half() {
    const N: usize = 1 << 24;
    let sizes = [N - 3, 3];
    let zeros = vec![0u32; N];
    for st in [Storage::Bf16, Storage::F16] {
        for hi in 0..256u32 {
            let g: Vec<u32> = (0..N as u32).map(|i| hi << 24 | i).collect();
            let out = copy_kernel(COPY, st, Storage::Native, false, &zeros, &g, &sizes);
            for (&x, &y) in g.iter().zip(&out) {
                let x = f32::from_bits(x);
                let want = match st {
                    Storage::Bf16 => bf16::from_f32(x).to_bits(),
                    _ => f16::from_f32(x).to_bits(),
                };
                assert_eq!(y, u32::from(want), "{st:?}: {x:e} ({:#010x})", x.to_bits());
            }
        }
    }
}

#[test]
fn f64_programs_refuse_16_bit_storage() {
    let p = optc::stdlib_rule("adam").expect("adam");
    let map = StorageMap::mixed(&p, Storage::Bf16, false, false);
    let e = JitProgram::compile_stored(&p, Precision::F64, &map).expect_err("f64 with bf16");
    assert!(e.0.contains("16-bit storage needs f32"), "{e}");
    assert!(optc::compiler::backend::clif::clif_text_stored(&p, Precision::F64, &map).is_err());
    // The native map is fine at either precision.
    JitProgram::compile_stored(&p, Precision::F64, &StorageMap::default()).expect("native");
}

/// Whether a stdlib rule takes per-sample inputs (16-bit storage refuses those).
fn has_sample_axis(p: &optc::compiler::ir::Program) -> bool {
    p.axis_form
        .as_ref()
        .is_some_and(|(a, _)| a.info.axis == Some(optc::compiler::ir::Axis::Samples))
}
