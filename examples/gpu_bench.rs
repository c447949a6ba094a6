//! GPU benchmark of the CUDA backend: adam, adamw and adan over `OPTC_BENCH_PARAMS` f32
//! parameters (default 1e9) in 100 tensors and in 10,000 tensors, params and gradients in
//! device memory (`Optimizer::step_device`, no host copies in the timed steps).
//!
//! Prints per configuration: median time per step (synchronized wall clock over `OPTC_BENCH_STEPS`
//! steps, default 10, after 2 warm-up steps), the bytes the step must move (each buffer the step
//! reads, read once, plus each buffer it writes, written once), effective GB/s, the
//! device-to-device copy bandwidth measured in the same run (cuMemcpyDtoD of a 4 GB buffer,
//! counting read + write), their ratio, and kernel launches per step.
//!
//! Then the same for adam in mixed precision (`MixedOptimizer<bf16>`: bf16 params and state in
//! device memory, f32 gradients, conversions fused into the kernel), counting 2 bytes per
//! element of a 16-bit buffer.
//!
//! Without a GPU it prints why and exits 0.
use optc::compiler::ir::Node;
use optc::runtime::device::{Device, DeviceBuffer};
use optc::runtime::mixed::{bf16, MixedOptimizer, MixedOptions};
use optc::runtime::{Backend, DeviceInputs, Optimizer, TensorSpec};
use std::collections::BTreeSet;
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

/// One step over the benchmark's device buffers.
#[allow(unsafe_code)]
fn step_on_device(
    opt: &mut Optimizer<f32>,
    params: &[Vec<u64>],
    inputs: &DeviceInputs,
) -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: the addresses are the tensors of the registered sizes, in allocations of this
    // optimizer's device that `run` keeps alive across every step; params and gradients are
    // distinct allocations.
    unsafe { opt.step_device(Some(params), inputs)? };
    Ok(())
}

/// The backend that runs on `dev`.
fn backend_of(dev: &Device) -> Backend {
    if dev.is_emulator() {
        Backend::CudaEmulator
    } else {
        Backend::Cuda {
            device: dev.ordinal(),
        }
    }
}

/// Tensor sizes: `total` elements in `ntensors` tensors.
fn split(total: usize, ntensors: usize) -> Vec<usize> {
    let per = total / ntensors;
    (0..ntensors)
        .map(|j| {
            if j + 1 == ntensors {
                total - per * (ntensors - 1)
            } else {
                per
            }
        })
        .collect()
}

/// One device allocation for tensors of `sizes` elements of `esize` bytes, each 16-byte aligned,
/// every 32-bit word set to `word`; and each tensor's address.
fn alloc_tensors(
    dev: &Arc<Device>,
    sizes: &[usize],
    esize: usize,
    word: u32,
) -> Result<(DeviceBuffer, Vec<u64>), Box<dyn std::error::Error>> {
    let per16 = 16 / esize;
    let padded: Vec<usize> = sizes.iter().map(|n| n.div_ceil(per16) * per16).collect();
    let buf = dev.alloc(padded.iter().sum::<usize>() * esize)?;
    buf.fill_u32(word, buf.bytes() / 4)?;
    let mut at = buf.ptr();
    let ptrs = padded
        .iter()
        .map(|n| {
            let p = at;
            at += (*n * esize) as u64;
            p
        })
        .collect();
    Ok((buf, ptrs))
}

/// adam in mixed precision over device buffers: bf16 params and state, f32 gradients.
#[allow(unsafe_code)]
fn bench_mixed(
    dev: &Arc<Device>,
    total: usize,
    steps: usize,
    copy_bw: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    let program = Arc::new(optc::stdlib_rule("adam").ok_or("no stdlib rule adam")?);
    for ntensors in [100usize, 10_000] {
        let sizes = split(total, ntensors);
        let specs: Vec<TensorSpec> = sizes
            .iter()
            .enumerate()
            .map(|(j, &n)| TensorSpec::new(format!("p{j}"), &[n]))
            .collect();
        let options = MixedOptions {
            bf16_state: true,
            ..Default::default()
        };
        let mut opt = MixedOptimizer::<bf16>::new(Arc::clone(&program), vec![specs], options)?
            .with_backend(backend_of(dev))?;
        let half = u32::from(bf16::from_f32(0.5).to_bits());
        let (_params, pp) = alloc_tensors(dev, &sizes, 2, half << 16 | half)?;
        let (_grads, gp) = alloc_tensors(dev, &sizes, 4, 1e-3f32.to_bits())?;
        let inputs = DeviceInputs::default().tensor("g", gp);
        let params = vec![pp];
        let step = |opt: &mut MixedOptimizer<bf16>| -> Result<(), Box<dyn std::error::Error>> {
            // SAFETY: bf16 params and f32 gradients of the registered sizes, in allocations
            // of the optimizer's device alive across every step; distinct allocations.
            unsafe { opt.step_device(&params, &inputs)? };
            Ok(())
        };
        for _ in 0..2 {
            step(&mut opt)?;
        }
        dev.synchronize()?;
        let before = opt.inner().launches();
        let mut times = Vec::new();
        for _ in 0..steps {
            let t = Instant::now();
            step(&mut opt)?;
            dev.synchronize()?;
            times.push(t.elapsed().as_secs_f64());
        }
        let launches = (opt.inner().launches() - before) as f64 / steps as f64;
        let p = opt.inner().active_program();
        let (read, written) = traffic(p);
        let size = |b: u16| match p.info.buffers[b as usize].role {
            optc::compiler::ir::BufRole::Input => 4.0,
            _ => 2.0,
        };
        let bytes = read.iter().chain(&written).map(|&b| size(b)).sum::<f64>() * total as f64;
        let t = median(times);
        let gbs = bytes / t / 1e9;
        println!(
            "{:<7} {ntensors:>8} {:>12.3} {:>10.1} {gbs:>9.0} {:>7.2} {launches:>9.1}   bf16 params and state, f32 g",
            "adam16",
            t * 1e3,
            bytes / 1e9,
            gbs / copy_bw,
        );
    }
    Ok(())
}

/// The buffers the later-step variant reads and writes.
fn traffic(p: &optc::compiler::ir::Program) -> (BTreeSet<u16>, BTreeSet<u16>) {
    let (mut read, mut written) = (BTreeSet::new(), BTreeSet::new());
    for st in &p.variants[1].stages {
        for ph in &st.phases {
            for k in &ph.kernels {
                for &n in &k.body {
                    if let Node::Load { buf, .. } = p.graph.node(n) {
                        read.insert(buf);
                    }
                }
                written.extend(k.stores.iter().map(|s| s.0));
            }
        }
    }
    (read, written)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("gpu_bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    // OPTC_BENCH_EMULATOR=1 runs on the CUDA emulator where there is no GPU (to check the
    // benchmark itself; its figures say nothing about a GPU).
    let emulate = std::env::var("OPTC_BENCH_EMULATOR").is_ok_and(|v| v == "1");
    let opened = optc::runtime::cuda::driver_present().and_then(|()| Device::open(0));
    let dev = match (opened, emulate) {
        (Ok(d), _) => d,
        (Err(_), true) => Device::emulator()?,
        (Err(e), false) => {
            println!("gpu_bench: no GPU: {e}");
            return Ok(());
        }
    };
    let total = env_usize("OPTC_BENCH_PARAMS", 1_000_000_000);
    let steps = env_usize("OPTC_BENCH_STEPS", 10).max(1);
    println!(
        "gpu_bench: {} ({}, {} SMs), {total} f32 params, median of {steps} steps",
        dev.name(),
        dev.arch(),
        dev.multiprocessors()
    );

    // Copy bandwidth: a 4 GB (or smaller, with fewer params) device-to-device copy.
    let copy_bytes = (total * 4).min(4 << 30);
    let copy_bw = {
        let a = dev.alloc(copy_bytes)?;
        let b = dev.alloc(copy_bytes)?;
        a.fill_u32(0x3f80_0000, copy_bytes / 4)?;
        b.copy_from(&a, copy_bytes)?;
        dev.synchronize()?;
        let mut times = Vec::new();
        for _ in 0..steps {
            let t = Instant::now();
            b.copy_from(&a, copy_bytes)?;
            dev.synchronize()?;
            times.push(t.elapsed().as_secs_f64());
        }
        2.0 * copy_bytes as f64 / median(times) / 1e9
    };
    println!(
        "gpu_bench: device-to-device copy: {copy_bw:.0} GB/s (read + write, {copy_bytes} bytes)"
    );
    println!(
        "{:<7} {:>8} {:>12} {:>10} {:>9} {:>7} {:>9}",
        "rule", "tensors", "ms/step", "GB moved", "GB/s", "ratio", "launches"
    );
    for rule in ["adam", "adamw", "adan"] {
        for ntensors in [100usize, 10_000] {
            let program =
                Arc::new(optc::stdlib_rule(rule).ok_or_else(|| format!("no stdlib rule {rule}"))?);
            let sizes = split(total, ntensors);
            let specs: Vec<TensorSpec> = sizes
                .iter()
                .enumerate()
                .map(|(j, &n)| TensorSpec::new(format!("p{j}"), &[n]))
                .collect();
            let mut opt = Optimizer::<f32>::lending(Arc::clone(&program), vec![specs])?
                .with_backend(backend_of(&dev))?;
            // Params and gradients: one device allocation each, tensors 16-byte aligned.
            let (_params, pp) = alloc_tensors(&dev, &sizes, 4, 0.5f32.to_bits())?;
            let (_grads, gp) = alloc_tensors(&dev, &sizes, 4, 1e-3f32.to_bits())?;
            let inputs = DeviceInputs::default().tensor("g", gp);
            let params = vec![pp];
            let step = |opt: &mut Optimizer<f32>| step_on_device(opt, &params, &inputs);
            for _ in 0..2 {
                step(&mut opt)?;
            }
            dev.synchronize()?;
            let before = opt.launches();
            let mut times = Vec::new();
            for _ in 0..steps {
                let t = Instant::now();
                step(&mut opt)?;
                dev.synchronize()?;
                times.push(t.elapsed().as_secs_f64());
            }
            let launches = (opt.launches() - before) as f64 / steps as f64;
            // Bytes the step must move: every buffer read once, every buffer written once.
            let p = opt.active_program();
            let (read, written) = traffic(p);
            let bytes = (read.len() + written.len()) as f64 * total as f64 * 4.0;
            let t = median(times);
            let gbs = bytes / t / 1e9;
            let names = |s: &BTreeSet<u16>| {
                s.iter()
                    .map(|&b| p.info.buffers[b as usize].name.clone())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            println!(
                "{rule:<7} {ntensors:>8} {:>12.3} {:>10.1} {gbs:>9.0} {:>7.2} {launches:>9.1}   reads {} writes {}",
                t * 1e3,
                bytes / 1e9,
                gbs / copy_bw,
                names(&read),
                names(&written),
            );
        }
    }
    bench_mixed(&dev, total, steps, copy_bw)?;
    Ok(())
}
