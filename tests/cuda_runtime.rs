//! The CUDA backend on a GPU against the reference interpreter: every standard-library rule over
//! awkward sizes as one multi-tensor launch and over many tensors, default and non-default
//! hyperparameters, several steps; bit-identical results across runs; parameter groups whose
//! values differ (kernels with every uniform per tensor); checkpoints written on the GPU resumed
//! on the CPU; the no-driver path returning an error.
//!
//! Without a CUDA driver or GPU the tests run on the CUDA emulator (it needs only a C++ compiler),
//! unless `OPTC_REQUIRE_GPU=1` (scripts/gpu-check.sh), where no GPU is a failure. With neither a
//! GPU nor the emulator every test fails, saying why, unless `OPTC_SKIP_CUDA_RUNTIME=1`, where it
//! prints why and passes. On a GPU, NVRTC must be loadable (`OPTC_NVRTC_LIB`).
#![cfg(feature = "cuda")]

use optc::compiler::ir::{BufRole, Program};
use optc::runtime::cuda::driver_present;
use optc::runtime::device::Device;
use optc::runtime::{Backend, Inputs, Optimizer};
use std::sync::Arc;

/// Prints past the test harness's capture (to stderr), so logs show counts and skip reasons.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

const SIZES: &[usize] = &[0, 1, 3, 4, 5, 7, 8, 15, 16, 17, 1023, 4097];
const STEPS: usize = 3;
/// The device the tests run on: GPU 0 when there is one, else the CUDA emulator (the same
/// generated kernels and host logic, run on the CPU). With neither, a failure, or `None` (the
/// test passes without running anything) when `OPTC_SKIP_CUDA_RUNTIME=1`.
fn device(test: &str) -> Option<Backend> {
    let why = match driver_present() {
        Err(e) => e.to_string(),
        Ok(()) => match Device::open(0) {
            Ok(d) => {
                say!("{test}: running on {} ({})", d.name(), d.arch());
                return Some(Backend::Cuda { device: 0 });
            }
            Err(e) => e.to_string(),
        },
    };
    if std::env::var("OPTC_REQUIRE_GPU").as_deref() == Ok("1") {
        panic!("{test}: OPTC_REQUIRE_GPU=1 but no GPU: {why}");
    }
    match Device::emulator() {
        Ok(d) => {
            say!("{test}: no GPU ({why}); running on {}", d.name());
            Some(Backend::CudaEmulator)
        }
        Err(e) => {
            if std::env::var("OPTC_SKIP_CUDA_RUNTIME").as_deref() == Ok("1") {
                say!("{test}: skipped (OPTC_SKIP_CUDA_RUNTIME=1), no GPU ({why}) and no CUDA emulator ({e})");
                return None;
            }
            panic!(
                "{test}: nothing to run on: no GPU ({why}) and no CUDA emulator ({e}); install a \
                 C++ compiler for the emulator, or set OPTC_SKIP_CUDA_RUNTIME=1 to skip these tests"
            );
        }
    }
}

mod common;
use common::OPTIONS;
use common::{fill, ulps};

#[derive(Debug, PartialEq)]
struct Run {
    state: Vec<(String, Vec<Vec<f32>>)>,
}

fn inputs_for(
    info: &optc::compiler::ir::RuleInfo,
    sizes: &[usize],
    step: usize,
) -> Vec<(String, Vec<Vec<f32>>)> {
    info.buffers
        .iter()
        .enumerate()
        .filter(|(_, b)| b.role == BufRole::Input)
        .map(|(bi, b)| {
            (
                b.name.clone(),
                sizes
                    .iter()
                    .enumerate()
                    .map(|(j, &n)| fill((step * 7919 + bi * 104729 + j) as u64 + 17, n))
                    .collect(),
            )
        })
        .collect()
}

fn step(opt: &mut Optimizer<f32>, sizes: &[usize], s: usize, steps: usize) {
    let info = opt.program().info.clone();
    let data = inputs_for(&info, sizes, s);
    let mut inputs = Inputs::default();
    for (n, d) in &data {
        inputs = inputs.tensor(n, d.iter().map(|v| v.as_slice()).collect());
    }
    for sc in &info.scalar_inputs {
        inputs = inputs.scalar(sc, common::scalar_input(s as f64, steps as f64));
    }
    opt.step(&inputs).expect("step");
}

fn make(
    program: &Program,
    sizes: &[usize],
    backend: Backend,
    hypers: &[(&str, f64)],
) -> Optimizer<f32> {
    let info = &program.info;
    let params: Vec<Vec<Vec<f32>>> = (0..info.spaces.len())
        .map(|s| {
            sizes
                .iter()
                .enumerate()
                .map(|(j, &n)| fill(1000 * s as u64 + j as u64, n))
                .collect()
        })
        .collect();
    let mut opt = Optimizer::new(Arc::new(program.clone()), params)
        .expect("bind")
        .with_backend(backend)
        .expect("backend");
    for (h, v) in hypers {
        if info.hyper(h).is_some() {
            opt.set_hyper(h, *v).expect("hyper");
        }
    }
    opt
}

fn snapshot(opt: &Optimizer<f32>) -> Run {
    let info = &opt.program().info;
    Run {
        state: info
            .buffers
            .iter()
            .filter(|b| b.role != BufRole::Input)
            .map(|b| {
                (
                    b.name.clone(),
                    opt.buffer(&b.name).expect("buffer").to_vec(),
                )
            })
            .collect(),
    }
}

fn run(
    program: &Program,
    sizes: &[usize],
    backend: Backend,
    hypers: &[(&str, f64)],
    steps: usize,
) -> Run {
    let mut opt = make(program, sizes, backend, hypers);
    for s in 0..steps {
        step(&mut opt, sizes, s, steps);
    }
    snapshot(&opt)
}

fn transcendental(name: &str) -> bool {
    let src = optc::stdlib::source(name).unwrap_or_default();
    ["exp(", "log(", "sigmoid(", "tanh(", "log1p(", "expm1(", "^"]
        .iter()
        .any(|f| src.contains(f))
}

/// Within `max_ulps` (more for rules with transcendental functions: CUDA's expf/logf/powf/tanhf
/// differ from libm by a few ulp), measured against the tensor's scale where cancellation
/// makes ulps of a small result meaningless.
fn compare(name: &str, a: &Run, b: &Run, max_ulps: u64) -> Result<(), String> {
    let max_ulps = if max_ulps > 0 && transcendental(name) {
        max_ulps + 4
    } else {
        max_ulps
    };
    for ((an, ad), (_, bd)) in a.state.iter().zip(&b.state) {
        if ad.len() != bd.len() {
            return Err(format!(
                "{name}: buffer {an}: {} vs {} tensors",
                ad.len(),
                bd.len()
            ));
        }
        for (j, (x, y)) in ad.iter().zip(bd).enumerate() {
            if x.len() != y.len() {
                return Err(format!(
                    "{name}: buffer {an}, tensor {j}: lengths {} vs {}",
                    x.len(),
                    y.len()
                ));
            }
            let scale = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (e, (&u, &v)) in x.iter().zip(y).enumerate() {
                let d = ulps(u, v);
                if d > max_ulps && (u - v).abs() > max_ulps as f32 * f32::EPSILON * scale {
                    return Err(format!("{name}: buffer {an}, tensor {j} (size {}), element {e}: interpreter {u:e}, cuda {v:e} ({d} ulps)", x.len()));
                }
            }
        }
    }
    Ok(())
}

#[test]
fn every_stdlib_rule_matches_the_interpreter_on_the_gpu() {
    let Some(gpu) = device("every_stdlib_rule_matches_the_interpreter_on_the_gpu") else {
        return;
    };
    // Awkward sizes in one launch, and many tensors (more than one chunk each for some).
    let many: Vec<usize> = (0..300)
        .map(|j| (j * 37) % 700 + (j % 5))
        .chain([70_001, 65_536, 65_537])
        .collect();
    let mut failures = Vec::new();
    let mut checked = 0;
    for (name, _) in optc::stdlib::RULES {
        let program = optc::stdlib_rule(name).expect("stdlib rule");
        for sizes in [SIZES, &many[..]] {
            for hypers in [&[][..], OPTIONS] {
                let reference = run(&program, sizes, Backend::Interpreter, hypers, STEPS);
                let cuda = run(&program, sizes, gpu, hypers, STEPS);
                if let Err(e) = compare(name, &reference, &cuda, 4) {
                    failures.push(e);
                }
                checked += 1;
            }
        }
    }
    say!(
        "{checked} rule configurations compared on the GPU, {} failed",
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn gpu_results_are_bit_identical_across_runs() {
    let Some(gpu) = device("gpu_results_are_bit_identical_across_runs") else {
        return;
    };
    let sizes = [100_000, 3, 50_001, 0, 16_384, 16_385, 200_003];
    for name in [
        "adan",
        "lamb",
        "n_harpg",
        "penalty_bilevel",
        "clip_global_norm",
        "adam",
    ] {
        let program = optc::stdlib_rule(name).expect("stdlib rule");
        let a = run(&program, &sizes, gpu, OPTIONS, 3);
        let b = run(&program, &sizes, gpu, OPTIONS, 3);
        assert!(a == b, "{name}: two GPU runs differ");
    }
}

#[test]
fn groups_with_different_values_match_the_interpreter() {
    let Some(gpu) = device("groups_with_different_values_match_the_interpreter") else {
        return;
    };
    for name in ["adam", "lamb", "clip_global_norm"] {
        let program = optc::stdlib_rule(name).expect("stdlib rule");
        let go = |backend| {
            let mut opt = make(&program, SIZES, backend, OPTIONS);
            let lr = if program.info.hyper("lr").is_some() {
                vec![("lr", 0.05)]
            } else {
                vec![]
            };
            let mut vals = lr;
            if program.info.hyper("weight_decay").is_some() {
                vals.push(("weight_decay", 0.3));
            }
            let names: Vec<String> = opt
                .tensors(0)
                .iter()
                .step_by(2)
                .map(|t| t.name.clone())
                .collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            opt.add_group(&refs, &vals).expect("group");
            for s in 0..STEPS {
                step(&mut opt, SIZES, s, STEPS);
            }
            snapshot(&opt)
        };
        let (a, b) = (go(Backend::Interpreter), go(gpu));
        compare(name, &a, &b, 4).unwrap();
    }
}

#[test]
fn checkpoint_written_on_the_gpu_resumes_on_the_cpu() {
    let Some(gpu) = device("checkpoint_written_on_the_gpu_resumes_on_the_cpu") else {
        return;
    };
    for name in ["adam", "adan", "lamb"] {
        let program = optc::stdlib_rule(name).expect("stdlib rule");
        let cpu = Backend::Cranelift { threads: 1 };
        // Reference: 4 steps on the CPU.
        let mut reference = make(&program, SIZES, cpu, OPTIONS);
        for s in 0..4 {
            step(&mut reference, SIZES, s, 4);
        }
        // 2 steps on the GPU, checkpoint, params moved by hand; 2 more on the CPU.
        let mut g = make(&program, SIZES, gpu, OPTIONS);
        for s in 0..2 {
            step(&mut g, SIZES, s, 4);
        }
        let bytes = g.checkpoint_bytes().expect("checkpoint on the GPU");
        let params: Vec<Vec<Vec<f32>>> = (0..program.info.spaces.len())
            .map(|s| g.params(s).to_vec())
            .collect();
        let mut c = Optimizer::new(Arc::new(program.clone()), params)
            .unwrap()
            .with_backend(cpu)
            .unwrap();
        c.load_checkpoint_bytes(&bytes).expect("load on the CPU");
        for s in 2..4 {
            step(&mut c, SIZES, s, 4);
        }
        compare(name, &snapshot(&reference), &snapshot(&c), 4).unwrap();
        // And the GPU optimizer back on the CPU continues too.
        let mut back = g.with_backend(cpu).expect("back to the CPU");
        for s in 2..4 {
            step(&mut back, SIZES, s, 4);
        }
        compare(name, &snapshot(&reference), &snapshot(&back), 4).unwrap();
    }
}

#[test]
fn without_a_driver_the_gpu_backend_is_an_error() {
    if driver_present().is_ok() {
        say!("without_a_driver_the_gpu_backend_is_an_error: a driver is present; checking a bad ordinal instead");
        let program = optc::stdlib_rule("sgd").unwrap();
        let r = Optimizer::<f32>::new(Arc::new(program), vec![vec![vec![1.0; 4]]])
            .unwrap()
            .with_backend(Backend::Cuda { device: 4096 });
        assert!(matches!(r, Err(optc::runtime::Error::Cuda(_))));
        return;
    }
    let program = optc::stdlib_rule("adam").unwrap();
    let r = Optimizer::<f32>::new(Arc::new(program), vec![vec![vec![1.0; 4]]])
        .unwrap()
        .with_backend(Backend::Cuda { device: 0 });
    match r {
        Err(optc::runtime::Error::Cuda(e)) => say!("no driver: {e}"),
        other => panic!("expected a CUDA error, got {other:?}"),
    }
}

/// Tensors packed one after another in one allocation, the first at element `skew`: with a skew
/// of 1 and odd sizes most tensors are not 16-byte aligned (the kernels' scalar path).
struct Packed {
    buf: optc::runtime::device::DeviceBuffer,
    offsets: Vec<usize>,
}

impl Packed {
    fn new(dev: &Arc<Device>, data: &[Vec<f32>], skew: usize) -> Packed {
        let mut offsets = Vec::new();
        let mut at = skew;
        for d in data {
            offsets.push(at);
            at += d.len();
        }
        let buf = dev.alloc(at * 4).expect("device memory");
        for (d, &o) in data.iter().zip(&offsets) {
            buf.upload(o * 4, d).expect("upload");
        }
        Packed { buf, offsets }
    }
    fn ptrs(&self) -> Vec<u64> {
        self.offsets
            .iter()
            .map(|&o| self.buf.ptr() + 4 * o as u64)
            .collect()
    }
    fn upload(&self, data: &[Vec<f32>]) {
        for (d, &o) in data.iter().zip(&self.offsets) {
            self.buf.upload(o * 4, d).expect("upload");
        }
    }
    fn download(&self, sizes: &[usize]) -> Vec<Vec<f32>> {
        sizes
            .iter()
            .zip(&self.offsets)
            .map(|(&n, &o)| {
                let mut v = vec![0f32; n];
                self.buf.download(o * 4, &mut v).expect("download");
                v
            })
            .collect()
    }
}

#[test]
#[allow(unsafe_code)]
fn device_pointers_are_used_in_place_aligned_or_not() {
    let Some(gpu) = device("device_pointers_are_used_in_place_aligned_or_not") else {
        return;
    };
    let dev = match gpu {
        Backend::Cuda { device } => Device::open(device),
        _ => Device::emulator(),
    }
    .expect("device");
    for name in ["adam", "adan", "lamb", "sgd"] {
        let program = optc::stdlib_rule(name).expect("stdlib rule");
        let info = program.info.clone();
        assert_eq!(info.spaces.len(), 1, "{name}: one parameter space");
        let reference = run(&program, SIZES, Backend::Interpreter, OPTIONS, STEPS);
        for skew in [0, 1] {
            let specs: Vec<optc::runtime::TensorSpec> = SIZES
                .iter()
                .enumerate()
                .map(|(j, &n)| optc::runtime::TensorSpec::new(format!("p{j}"), &[n]))
                .collect();
            let mut opt = Optimizer::<f32>::lending(Arc::new(program.clone()), vec![specs])
                .expect("lending")
                .with_backend(gpu)
                .expect("backend");
            for (h, v) in OPTIONS {
                if info.hyper(h).is_some() {
                    opt.set_hyper(h, *v).expect("hyper");
                }
            }
            let init: Vec<Vec<f32>> = SIZES
                .iter()
                .enumerate()
                .map(|(j, &n)| fill(j as u64, n))
                .collect();
            let params = Packed::new(&dev, &init, skew);
            let mut grads: Vec<(String, Packed)> = Vec::new();
            for s in 0..STEPS {
                let data = inputs_for(&info, SIZES, s);
                let mut inputs = optc::runtime::DeviceInputs::default();
                for (j, (n, d)) in data.iter().enumerate() {
                    if grads.len() <= j {
                        grads.push((n.clone(), Packed::new(&dev, d, skew)));
                    } else {
                        grads[j].1.upload(d);
                    }
                    inputs = inputs.tensor(n, grads[j].1.ptrs());
                }
                for sc in &info.scalar_inputs {
                    inputs = inputs.scalar(sc, common::scalar_input(s as f64, STEPS as f64));
                }
                // SAFETY: every address is a tensor of its registered size inside a live
                // allocation of this device; params and gradients are distinct allocations.
                unsafe { opt.step_device(Some(&[params.ptrs()]), &inputs) }.expect("step");
            }
            let state = info
                .buffers
                .iter()
                .filter(|b| b.role != BufRole::Input)
                .map(|b| {
                    let v = if b.role == BufRole::Param {
                        params.download(SIZES)
                    } else {
                        opt.buffer(&b.name).expect("buffer").to_vec()
                    };
                    (b.name.clone(), v)
                })
                .collect();
            compare(name, &reference, &Run { state }, 4)
                .unwrap_or_else(|e| panic!("skew {skew}: {e}"));
        }
    }
}

use optc::runtime::mixed::{bf16, f16, MixedOptimizer, MixedOptions, Rounding, Storage};
use optc::runtime::{Error, TensorSpec};

/// A mixed-precision run: `steps` whole steps over tensors of `sizes` in every param space,
/// started from the same values; the params' bits and every state buffer (widened) after them.
type MixedRun = (Vec<Vec<Vec<u16>>>, Vec<(String, Vec<Vec<f32>>)>);

fn mixed_run<S: Storage>(
    program: &Program,
    backend: Backend,
    options: MixedOptions,
    hypers: &[(&str, f64)],
    steps: usize,
) -> Result<MixedRun, Error> {
    let info = program.info.clone();
    let specs: Vec<Vec<TensorSpec>> = (0..info.spaces.len())
        .map(|s| {
            SIZES
                .iter()
                .enumerate()
                .map(|(j, &n)| TensorSpec::new(format!("s{s}.t{j}"), &[n]))
                .collect()
        })
        .collect();
    let mut opt = MixedOptimizer::<S>::new(Arc::new(program.clone()), specs, options)?
        .with_backend(backend)?;
    for (h, v) in hypers {
        if info.hyper(h).is_some() {
            opt.inner_mut().set_hyper(h, *v)?;
        }
    }
    let mut params: Vec<Vec<Vec<S>>> = (0..info.spaces.len())
        .map(|s| {
            SIZES
                .iter()
                .enumerate()
                .map(|(j, &n)| {
                    fill(1000 * s as u64 + j as u64, n)
                        .into_iter()
                        .map(S::nearest)
                        .collect()
                })
                .collect()
        })
        .collect();
    for s in 0..steps {
        let data = inputs_for(&info, SIZES, s);
        let mut inputs = Inputs::default();
        for (n, d) in &data {
            inputs = inputs.tensor(n, d.iter().map(|v| v.as_slice()).collect());
        }
        for sc in &info.scalar_inputs {
            inputs = inputs.scalar(sc, common::scalar_input(s as f64, steps as f64));
        }
        let mut lend: Vec<Vec<&mut [S]>> = params
            .iter_mut()
            .map(|ts| ts.iter_mut().map(Vec::as_mut_slice).collect())
            .collect();
        opt.step_with(&mut lend, &inputs)?;
    }
    let bits = params
        .iter()
        .map(|ts| {
            ts.iter()
                .map(|t| S::bits_mut(&mut t.clone()).expect("16-bit").to_vec())
                .collect()
        })
        .collect();
    let state = info
        .buffers
        .iter()
        .filter(|b| b.role == BufRole::State)
        .map(|b| (b.name.clone(), opt.state(&b.name).expect("state")))
        .collect();
    Ok((bits, state))
}

/// Distance between two 16-bit values of one format in units of its last place.
fn ulps16(a: u16, b: u16) -> u64 {
    let key = |x: u16| {
        if x & 0x8000 != 0 {
            -i64::from(x & 0x7fff)
        } else {
            i64::from(x)
        }
    };
    (key(a) - key(b)).unsigned_abs()
}

/// Rules whose GPU and CPU steps agree bit for bit in f32 (no reductions, whose order differs,
/// and no transcendental functions of elements, where CUDA and libm differ).
const EXACT: &[&str] = &[
    "sgd", "adam", "adamw", "amsgrad", "adagrad", "rmsprop", "adamax",
];

fn mixed_cases<S: Storage>(gpu: Backend) -> (usize, std::collections::BTreeSet<String>) {
    let (mut compared, mut refused) = (0, std::collections::BTreeSet::new());
    let settings = [
        MixedOptions::default(),
        MixedOptions {
            bf16_state: true,
            ..Default::default()
        },
        MixedOptions {
            bf16_state: true,
            rounding: Rounding::Stochastic {
                seed: 0x5eed_0123_4567,
            },
            ..Default::default()
        },
        MixedOptions {
            master_weights: true,
            bf16_state: true,
            rounding: Rounding::Stochastic {
                seed: 0x5eed_0123_4567,
            },
        },
    ];
    for name in optc::stdlib::names() {
        let program = optc::stdlib_rule(name).expect("stdlib rule");
        if has_sample_axis(&program) {
            continue; // 16-bit storage refuses a sample axis (tests/sample_axis.rs)
        }
        for options in settings {
            for hypers in [&[][..], OPTIONS] {
                let cpu = mixed_run::<S>(&program, Backend::Interpreter, options, hypers, STEPS)
                    .expect("CPU run");
                let on_gpu = match mixed_run::<S>(&program, gpu, options, hypers, STEPS) {
                    Ok(r) => r,
                    Err(Error::Policy(why)) => {
                        assert!(why.contains("again after storing it"), "{name}: {why}");
                        refused.insert(format!("{name} ({options:?})"));
                        continue;
                    }
                    Err(e) => panic!("{name} {options:?}: {e}"),
                };
                let tol = if EXACT.contains(&name) { 0 } else { 1 };
                for (s, (a, b)) in on_gpu.0.iter().zip(&cpu.0).enumerate() {
                    for (j, (x, y)) in a.iter().zip(b).enumerate() {
                        for (e, (&p, &q)) in x.iter().zip(y).enumerate() {
                            assert!(
                                ulps16(p, q) <= tol,
                                "{name} {} {options:?} {hypers:?}: space {s} tensor {j} element {e}: \
                                 GPU {p:#06x}, CPU {q:#06x}",
                                S::NAME
                            );
                        }
                    }
                }
                for ((n, a), (_, b)) in on_gpu.1.iter().zip(&cpu.1) {
                    for (x, y) in a.iter().zip(b) {
                        for (&p, &q) in x.iter().zip(y) {
                            let close = if tol == 0 {
                                p.to_bits() == q.to_bits()
                            } else {
                                ulps(p, q) <= 4
                                    || (p - q).abs() <= p.abs().max(q.abs()) * 2f32.powi(-6)
                            };
                            assert!(close, "{name} {options:?}: state {n}: GPU {p}, CPU {q}");
                        }
                    }
                }
                compared += 1;
            }
        }
    }
    (compared, refused)
}

#[test]
fn mixed_precision_on_the_gpu_matches_the_cpu() {
    let Some(gpu) = device("mixed_precision_on_the_gpu_matches_the_cpu") else {
        return;
    };
    let (c1, mut refused) = mixed_cases::<bf16>(gpu);
    let (c2, r2) = mixed_cases::<f16>(gpu);
    refused.extend(r2);
    say!(
        "mixed precision on the GPU: {} configurations matched the CPU; refused (rules that read a stored buffer again within a step): {refused:?}",
        c1 + c2
    );
    assert!(c1 + c2 > 0);
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
        0.0,
        -0.0,
        1.0,
        -1.0,
        f32::MIN_POSITIVE,
        f32::MAX,
        f32::MIN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ]);
    v
}

fn copy_on_gpu<S: Storage>(
    gpu: Backend,
    src: &str,
    theta: Vec<Vec<S>>,
    g: &[Vec<f32>],
    rounding: Rounding,
) -> Vec<Vec<S>> {
    let program = Arc::new(optc::compile_rule(src).expect("rule"));
    let specs = theta
        .iter()
        .enumerate()
        .map(|(j, t)| TensorSpec::new(format!("t{j}"), &[t.len()]))
        .collect();
    let options = MixedOptions {
        rounding,
        ..Default::default()
    };
    let mut opt = MixedOptimizer::<S>::new(program, vec![specs], options)
        .and_then(|o| o.with_backend(gpu))
        .expect("mixed optimizer on the GPU");
    let mut theta = theta;
    let mut lend: Vec<Vec<&mut [S]>> = vec![theta.iter_mut().map(Vec::as_mut_slice).collect()];
    let inputs = Inputs::default().tensor("g", g.iter().map(Vec::as_slice).collect());
    opt.step_with(&mut lend, &inputs).expect("step");
    theta
}

fn conversions<S: Storage>(gpu: Backend) {
    let probe = rounding_probe();
    // Two tensors (odd sizes, so the second starts at an odd element of the buffer).
    let cut = (probe.len() / 3) | 1;
    let g = vec![probe[..cut].to_vec(), probe[cut..].to_vec()];
    let zeros: Vec<Vec<S>> = g.iter().map(|t| vec![S::nearest(0.0); t.len()]).collect();
    let copy = "rule copy() { param theta\n input g\n theta = g }";
    let seed = 0x0123_4567_89ab_cdef;
    for rounding in [Rounding::Nearest, Rounding::Stochastic { seed }] {
        let out = copy_on_gpu::<S>(gpu, copy, zeros.clone(), &g, rounding);
        let mut e = 0u64;
        for (t, o) in g.iter().zip(&out) {
            for (&x, &y) in t.iter().zip(o) {
                let want = match rounding {
                    Rounding::Nearest => S::nearest(x),
                    Rounding::Stochastic { seed } => {
                        S::stochastic(x, optc::runtime::mixed::rounding_bits(seed, 1, 0, e))
                    }
                };
                let same = want == y || (want.to_f32().is_nan() && y.to_f32().is_nan());
                assert!(
                    same,
                    "{} {rounding:?}: {x:e} ({:#010x}) became {:?}, expected {want:?}",
                    S::NAME,
                    x.to_bits(),
                    y
                );
                e += 1;
            }
        }
    }
    // Widening: every 16-bit pattern goes through a load and a store unchanged.
    let all: Vec<S> = (0..=u16::MAX)
        .map(|b| {
            let mut v = [S::nearest(0.0)];
            S::bits_mut(&mut v).expect("16-bit")[0] = b;
            v[0]
        })
        .collect();
    let keep = "rule keep() { param theta\n input g\n theta = max(theta, g) }";
    let out = copy_on_gpu::<S>(
        gpu,
        keep,
        vec![all.clone()],
        &[vec![f32::NEG_INFINITY; all.len()]],
        Rounding::Nearest,
    );
    for (&x, &y) in all.iter().zip(&out[0]) {
        let same = x == y && x.to_f32().to_bits() == y.to_f32().to_bits();
        assert!(
            same || (x.to_f32().is_nan() && y.to_f32().is_nan()),
            "{} {x:?} became {y:?}",
            S::NAME
        );
    }
}

#[test]
fn storage_conversions_match_the_cpu_bit_for_bit() {
    let Some(gpu) = device("storage_conversions_match_the_cpu_bit_for_bit") else {
        return;
    };
    conversions::<bf16>(gpu);
    conversions::<f16>(gpu);
}

#[test]
fn mixed_precision_on_the_gpu_refuses_what_it_cannot_fuse() {
    let Some(gpu) = device("mixed_precision_on_the_gpu_refuses_what_it_cannot_fuse") else {
        return;
    };
    let program = Arc::new(optc::stdlib_rule("adam").expect("adam"));
    let specs = || vec![vec![TensorSpec::new("w", &[5])]];
    let err = MixedOptimizer::<f32>::new(program, specs(), MixedOptions::default())
        .and_then(|o| o.with_backend(gpu))
        .expect_err("f32 storage through MixedOptimizer on the GPU");
    assert!(
        matches!(&err, Error::Policy(m) if m.contains("bf16 or f16")),
        "{err}"
    );
    // A rule whose kernels read a state they stored earlier in the step is refused, naming it.
    let lamb = Arc::new(optc::stdlib_rule("lamb").expect("lamb"));
    let opts = MixedOptions {
        bf16_state: true,
        ..Default::default()
    };
    let err = MixedOptimizer::<bf16>::new(lamb, specs(), opts)
        .and_then(|o| o.with_backend(gpu))
        .expect_err("a reloading rule");
    assert!(
        matches!(&err, Error::Policy(m) if m.contains("lamb") && m.contains("again after storing it")),
        "{err}"
    );
}

/// Steps `from..to` of the inputs [`inputs_for`] gives, over params lent by the caller.
fn mixed_steps<S: Storage>(
    opt: &mut MixedOptimizer<S>,
    params: &mut [Vec<Vec<S>>],
    steps: std::ops::Range<usize>,
) {
    let info = opt.inner().program().info.clone();
    for s in steps {
        let data = inputs_for(&info, SIZES, s);
        let mut inputs = Inputs::default();
        for (n, d) in &data {
            inputs = inputs.tensor(n, d.iter().map(|v| v.as_slice()).collect());
        }
        let mut lend: Vec<Vec<&mut [S]>> = params
            .iter_mut()
            .map(|ts| ts.iter_mut().map(Vec::as_mut_slice).collect())
            .collect();
        opt.step_with(&mut lend, &inputs).expect("step");
    }
}

#[test]
fn mixed_precision_moves_between_the_gpu_and_the_cpu() {
    let Some(gpu) = device("mixed_precision_moves_between_the_gpu_and_the_cpu") else {
        return;
    };
    let program = Arc::new(optc::stdlib_rule("adam").expect("adam"));
    let specs = || {
        vec![SIZES
            .iter()
            .enumerate()
            .map(|(j, &n)| TensorSpec::new(format!("t{j}"), &[n]))
            .collect::<Vec<_>>()]
    };
    let options = MixedOptions {
        bf16_state: true,
        rounding: Rounding::Stochastic { seed: 7 },
        ..Default::default()
    };
    let start = || -> Vec<Vec<Vec<bf16>>> {
        vec![SIZES
            .iter()
            .enumerate()
            .map(|(j, &n)| fill(j as u64, n).into_iter().map(bf16::from_f32).collect())
            .collect()]
    };
    let new = |backend| {
        MixedOptimizer::<bf16>::new(Arc::clone(&program), specs(), options)
            .and_then(|o| o.with_backend(backend))
            .expect("optimizer")
    };
    // Reference: four steps on the CPU.
    let mut cpu = new(Backend::Interpreter);
    let mut want = start();
    mixed_steps(&mut cpu, &mut want, 0..4);
    // Two steps on the GPU, a checkpoint, two more on the CPU.
    let mut g = new(gpu);
    let mut got = start();
    mixed_steps(&mut g, &mut got, 0..2);
    let bytes = g.checkpoint_bytes().expect("checkpoint on the GPU");
    let mut resumed = new(Backend::Interpreter);
    resumed
        .load_checkpoint_bytes(&bytes)
        .expect("load on the CPU");
    let mut got2 = got.clone();
    mixed_steps(&mut resumed, &mut got2, 2..4);
    assert_eq!(got2, want, "GPU checkpoint resumed on the CPU");
    assert_eq!(resumed.state("m"), cpu.state("m"));
    assert_eq!(resumed.state("v"), cpu.state("v"));
    // The same optimizer moved from the GPU to the CPU, and a CPU one moved to the GPU.
    let mut moved = g.with_backend(Backend::Interpreter).expect("to the CPU");
    mixed_steps(&mut moved, &mut got, 2..4);
    assert_eq!(got, want, "moved from the GPU to the CPU");
    assert_eq!(moved.state("v"), cpu.state("v"));
    let mut c = new(Backend::Interpreter);
    let mut p = start();
    mixed_steps(&mut c, &mut p, 0..2);
    let mut up = c.with_backend(gpu).expect("to the GPU");
    mixed_steps(&mut up, &mut p, 2..4);
    assert_eq!(p, want, "moved from the CPU to the GPU");
    assert_eq!(up.state("m"), cpu.state("m"));
}

#[test]
fn the_cli_runs_on_the_gpu_backends() {
    let Some(gpu) = device("the_cli_runs_on_the_gpu_backends") else {
        return;
    };
    let backend = match gpu {
        Backend::Cuda { .. } => "cuda",
        _ => "cuda-emulator",
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    let write = |path: &str, shape: Vec<usize>, data: &[f32]| {
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        let v =
            safetensors::tensor::TensorView::new(safetensors::tensor::Dtype::F32, shape, &bytes)
                .expect("view");
        safetensors::serialize_to_file(
            vec![("w".to_string(), v)],
            None,
            std::path::Path::new(path),
        )
        .expect("write");
    };
    write(&p("p.safetensors"), vec![37], &fill(1, 37));
    write(&p("g.safetensors"), vec![5, 37], &fill(2, 5 * 37));
    let run = |backend: &str, out: &str| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_optc"))
            .args([
                "run",
                "adan",
                "--params",
                &p("p.safetensors"),
                "--grads",
                &p("g.safetensors"),
            ])
            .args([
                "--set",
                "max_grad_norm=0.5",
                "--backend",
                backend,
                "--out",
                &p(out),
                "-q",
            ])
            .output()
            .expect("optc runs");
        assert!(
            o.status.success(),
            "{backend}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let bytes = std::fs::read(p(out)).expect("output");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
        st.tensor("w")
            .expect("w")
            .data()
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect::<Vec<f32>>()
    };
    let want = run("interp", "cpu.safetensors");
    let got = run(backend, "gpu.safetensors");
    assert_ne!(want, fill(1, 37), "the run changed the params");
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!(
            ulps(*a, *b) <= 8,
            "element {i}: {backend} {a}, interpreter {b}"
        );
    }
}

#[test]
#[allow(unsafe_code)]
fn mixed_precision_steps_device_buffers_in_place() {
    let Some(gpu) = device("mixed_precision_steps_device_buffers_in_place") else {
        return;
    };
    let program = Arc::new(optc::stdlib_rule("adam").expect("adam"));
    let specs: Vec<TensorSpec> = SIZES
        .iter()
        .enumerate()
        .map(|(j, &n)| TensorSpec::new(format!("t{j}"), &[n]))
        .collect();
    let options = MixedOptions {
        bf16_state: true,
        rounding: Rounding::Stochastic { seed: 11 },
        ..Default::default()
    };
    let new = || {
        MixedOptimizer::<bf16>::new(Arc::clone(&program), vec![specs.clone()], options)
            .and_then(|o| o.with_backend(gpu))
            .expect("optimizer")
    };
    let start: Vec<Vec<bf16>> = SIZES
        .iter()
        .enumerate()
        .map(|(j, &n)| fill(j as u64, n).into_iter().map(bf16::from_f32).collect())
        .collect();
    let mut host = vec![start.clone()];
    let mut lent = new();
    mixed_steps(&mut lent, &mut host, 0..STEPS);

    let mut opt = new();
    let dev = Arc::clone(opt.inner().device().expect("a device"));
    // Params packed as bf16 (odd offsets: 2-byte aligned only), gradients as f32.
    let bits: Vec<Vec<u16>> = start
        .iter()
        .map(|t| t.iter().map(|x| x.to_bits()).collect())
        .collect();
    let total: usize = SIZES.iter().sum::<usize>() + 1;
    let pbuf = dev.alloc(total * 2).expect("device memory");
    let mut offsets = Vec::new();
    let mut at = 1usize;
    for b in &bits {
        pbuf.upload(at * 2, b).expect("upload");
        offsets.push(at);
        at += b.len();
    }
    let pptrs: Vec<u64> = offsets.iter().map(|&o| pbuf.ptr() + 2 * o as u64).collect();
    let info = program.info.clone();
    let mut grads: Option<Packed> = None;
    for s in 0..STEPS {
        let data = inputs_for(&info, SIZES, s);
        let g = &data[0].1;
        match &grads {
            Some(p) => p.upload(g),
            None => grads = Some(Packed::new(&dev, g, 0)),
        }
        let inputs = optc::runtime::DeviceInputs::default()
            .tensor(&data[0].0, grads.as_ref().expect("grads").ptrs());
        // SAFETY: every address is a tensor of its registered size in a live allocation of
        // the optimizer's device; params and gradients are distinct allocations.
        unsafe { opt.step_device(std::slice::from_ref(&pptrs), &inputs) }.expect("step");
    }
    for (j, (&o, want)) in offsets.iter().zip(&host[0]).enumerate() {
        let mut got = vec![0u16; want.len()];
        pbuf.download(o * 2, &mut got).expect("download");
        let want: Vec<u16> = want.iter().map(|x| x.to_bits()).collect();
        assert_eq!(got, want, "tensor {j}");
    }
    assert_eq!(opt.state("m"), lent.state("m"));
    assert_eq!(opt.state("v"), lent.state("v"));
}

/// Whether a stdlib rule takes per-sample inputs (16-bit storage refuses those).
fn has_sample_axis(p: &optc::compiler::ir::Program) -> bool {
    p.axis_form
        .as_ref()
        .is_some_and(|(a, _)| a.info.axis == Some(optc::compiler::ir::Axis::Samples))
}
