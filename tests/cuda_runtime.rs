//! The CUDA backend on a GPU against the reference interpreter: every standard-library rule over
//! awkward sizes as one multi-tensor launch and over many tensors, default and non-default
//! hyperparameters, several steps; bit-identical results across runs; parameter groups whose
//! values differ (kernels with every uniform per tensor); checkpoints written on the GPU resumed
//! on the CPU; the no-driver path returning an error.
//!
//! Without a CUDA driver or GPU every test prints why and passes, unless `OPTC_REQUIRE_GPU=1`
//! (scripts/gpu-check.sh), where that is a failure. NVRTC must be loadable (`OPTC_NVRTC_LIB`).
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
/// generated kernels and host logic, run on the CPU).
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
            if std::env::var("OPTC_REQUIRE_EMULATOR").as_deref() == Ok("1") {
                panic!("{test}: OPTC_REQUIRE_EMULATOR=1 but the CUDA emulator is unavailable: {e}");
            }
            say!("{test}: skipped, no GPU ({why}) and no CUDA emulator ({e})");
            None
        }
    }
}

mod common;
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
        inputs = inputs.scalar(sc, 0.25 + 0.5 * (s as f64 / steps as f64));
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

const OPTIONS: &[(&str, f64)] = &[
    ("max_grad_norm", 0.5),
    ("weight_decay", 0.01),
    ("momentum", 0.9),
    ("nesterov", 1.0),
    ("centered", 1.0),
    ("amsgrad", 1.0),
    ("cautious", 1.0),
    ("x_ball", 0.5),
    ("y_ball", 0.5),
    ("x_box", 0.3),
];

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
                    inputs = inputs.scalar(sc, 0.25 + 0.5 * (s as f64 / STEPS as f64));
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
