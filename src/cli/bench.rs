//! `optc bench`: a rule's step time and effective bandwidth against this machine's ceiling.

use super::{apply_sets, compile_one, ExecArgs, Fail};
use optc::ceiling::{Ceiling, Streams};
use optc::compiler;
use optc::compiler::ir::Program;
use optc::runtime::mixed::{bf16, f16, MixedOptimizer, MixedOptions, Rounding, Storage};
use optc::runtime::{Backend, Inputs, Optimizer, TensorSpec};
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    /// A rule file or a standard-library name.
    pub(crate) rule: String,
    /// Which rule, when the file has several.
    #[arg(long = "rule")]
    pub(crate) rule_name: Option<String>,
    /// Elements per param, in all.
    #[arg(long, default_value_t = 1 << 26)]
    pub(crate) elems: usize,
    /// Tensors the elements are split into.
    #[arg(long, default_value_t = 1)]
    pub(crate) tensors: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub(crate) steps: usize,
    /// Set a hyperparameter: NAME=VALUE.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    pub(crate) sets: Vec<String>,
    /// How the params are stored: f32, or 16 bits with f32 arithmetic (mixed precision, the
    /// conversions fused into the kernels).
    #[arg(long, value_enum, default_value = "f32")]
    pub(crate) storage: StorageArg,
    /// How the state is stored (bf16 needs 16-bit params).
    #[arg(long = "state-storage", value_enum, default_value = "f32")]
    pub(crate) state_storage: StateStorageArg,
    /// How stores into 16-bit buffers round.
    #[arg(long, value_enum, default_value = "nearest")]
    pub(crate) rounding: RoundingArg,
    /// Keep f32 master weights of the 16-bit params (one more f32 buffer per param).
    #[arg(long = "master-weights")]
    pub(crate) master_weights: bool,
    /// Convert 16-bit buffers in separate passes around an f32 step instead of inside the
    /// kernels (CPU backends; for comparison).
    #[arg(long = "separate-passes")]
    pub(crate) separate_passes: bool,
    #[command(flatten)]
    pub(crate) exec: ExecArgs,
}

/// How params are stored.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StorageArg {
    /// 32-bit floats.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half precision.
    F16,
}

/// How state is stored.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StateStorageArg {
    /// 32-bit floats.
    F32,
    /// bfloat16.
    Bf16,
}

/// How stores into 16-bit buffers round.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RoundingArg {
    /// To nearest, ties to even.
    Nearest,
    /// Stochastically (Philox bits, a fixed seed).
    Stochastic,
}

/// Bytes a later step must move (every buffer its kernels read, once, and every buffer they write,
/// once), the bytes its kernels actually move (a buffer read in two passes counts twice), and the
/// number of passes over memory; `bytes(b)` is the size of an element of buffer `b`.
fn traffic(
    p: &Program,
    elems: usize,
    bytes: impl Fn(compiler::ir::BufId) -> usize,
) -> (usize, usize, usize) {
    use compiler::ir::Node;
    let v = &p.variants[1];
    let (mut read, mut written) = (
        std::collections::BTreeSet::new(),
        std::collections::BTreeSet::new(),
    );
    let (mut moved, mut passes) = (0, 0);
    for s in &v.stages {
        for ph in &s.phases {
            passes += 1;
            for k in &ph.kernels {
                for &n in &k.loads {
                    if let Node::Load { buf, .. } = p.graph.node(n) {
                        read.insert(buf);
                        moved += elems * bytes(buf);
                    }
                }
                for &(b, _) in &k.stores {
                    written.insert(b);
                    moved += elems * bytes(b);
                }
            }
        }
    }
    let must = read.iter().chain(&written).map(|&b| elems * bytes(b)).sum();
    (must, moved, passes)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Times `steps` steps of a rule (after `warm` has run the first step and a warm-up), each
/// followed by one run of each ceiling, so that a busy machine slows them alike: the rule's
/// step times and each ceiling's median bandwidth in GB/s.
fn interleaved(
    steps: usize,
    mut step: impl FnMut() -> Result<(), Fail>,
    ceilings: &mut [Ceiling],
) -> Result<(Vec<f64>, Vec<f64>), Fail> {
    for c in ceilings.iter_mut() {
        c.run();
    }
    let mut times = Vec::new();
    let mut ctimes = vec![Vec::new(); ceilings.len()];
    for _ in 0..steps.max(1) {
        let start = std::time::Instant::now();
        step()?;
        times.push(start.elapsed().as_secs_f64());
        for (c, t) in ceilings.iter_mut().zip(&mut ctimes) {
            let start = std::time::Instant::now();
            c.run();
            t.push(start.elapsed().as_secs_f64());
        }
    }
    let gbs = ceilings
        .iter()
        .zip(ctimes)
        .map(|(c, t)| c.bytes() as f64 / median(t) / 1e9)
        .collect();
    Ok((times, gbs))
}

/// The two ceilings of a CPU bench, over `elems` elements on `threads` threads: the rule's own
/// access pattern (`passes`) and the in-place update `a += s * b` (one read and one in-place
/// f32 stream). Refused when their buffers do not fit in the available memory.
fn ceilings(passes: &[Streams], elems: usize, threads: usize) -> Result<Vec<Ceiling>, Fail> {
    let axpy = Streams {
        read: vec![4],
        inplace: vec![4],
        write: vec![],
    };
    let bytes: usize = passes
        .iter()
        .chain([&axpy])
        .map(|s| {
            (s.read
                .iter()
                .chain(&s.inplace)
                .chain(&s.write)
                .sum::<usize>())
                * elems
        })
        .sum();
    if let Some(avail) = available_memory() {
        if bytes as u64 > avail {
            return Err(Fail(format!(
                "error: --elems {elems}: the ceiling kernels need {:.1} GB beside the rule's buffers, but only {:.1} GB of memory is available",
                bytes as f64 / 1e9,
                avail as f64 / 1e9
            )));
        }
    }
    Ok(vec![
        Ceiling::of_passes(passes, elems, threads)?,
        Ceiling::new(&axpy, elems, threads)?,
    ])
}

/// `n` copies of `v`, or an error when the memory cannot be had.
fn filled(n: usize, v: f32) -> Result<Vec<f32>, Fail> {
    let mut out = Vec::new();
    out.try_reserve_exact(n).map_err(|_| {
        Fail(format!(
            "error: cannot allocate {n} elements ({} bytes)",
            n.saturating_mul(4)
        ))
    })?;
    out.resize(n, v);
    Ok(out)
}

/// Refuses `--elems` values whose buffers cannot be allocated: every buffer of the rule (params,
/// inputs, state, outputs) and the ceiling's two arrays, in f32, against the memory the system
/// says is available (`MemAvailable` in /proc/meminfo, where there is one).
fn check_memory(info: &optc::compiler::ir::RuleInfo, elems: usize) -> Result<(), Fail> {
    // The rule's buffers, its access pattern's (about as many) and `a += s * b`'s two.
    let arrays = 2 * info.buffers.len() + 2;
    let bytes = elems
        .checked_mul(4)
        .and_then(|b| b.checked_mul(arrays))
        .filter(|&b| b <= isize::MAX as usize)
        .ok_or_else(|| {
            Fail(format!(
                "error: --elems {elems}: {arrays} arrays of that many f32 elements cannot be addressed on this machine"
            ))
        })?;
    if let Some(avail) = available_memory() {
        if bytes as u64 > avail {
            return Err(Fail(format!(
                "error: --elems {elems}: rule `{}` needs {arrays} arrays of {elems} f32 elements ({:.1} GB), but only {:.1} GB of memory is available",
                info.name,
                bytes as f64 / 1e9,
                avail as f64 / 1e9
            )));
        }
    }
    Ok(())
}

/// Available memory in bytes (Linux: `MemAvailable` in /proc/meminfo).
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Runs `optc bench`.
pub(crate) fn command(args: &BenchArgs) -> Result<(), Fail> {
    let (program, _, _) = compile_one(&args.rule, args.rule_name.as_deref())?;
    let info = program.info.clone();
    let tensors = args.tensors.max(1);
    let per = args.elems / tensors;
    let sizes: Vec<usize> = (0..tensors)
        .map(|j| {
            if j + 1 == tensors {
                args.elems - per * (tensors - 1)
            } else {
                per
            }
        })
        .collect();
    check_memory(&info, args.elems)?;
    let backend = args.exec.backend()?;
    let threads = match backend {
        Backend::Cranelift { threads } | Backend::Native { threads } => threads,
        _ => 1,
    };
    match args.storage {
        StorageArg::Bf16 => return bench_mixed::<bf16>(args, Arc::new(program), &sizes),
        StorageArg::F16 => return bench_mixed::<f16>(args, Arc::new(program), &sizes),
        StorageArg::F32 => {
            if args.state_storage != StateStorageArg::F32
                || args.master_weights
                || args.separate_passes
                || args.rounding != RoundingArg::Nearest
            {
                return Err(Fail(
                    "error: --state-storage, --rounding, --master-weights and --separate-passes \
                     need 16-bit params (--storage bf16 or f16)"
                        .into(),
                ));
            }
        }
    }
    #[cfg(feature = "cuda")]
    if backend.is_cuda() {
        return bench_cuda(args, Arc::new(program), &sizes);
    }
    let params: Vec<Vec<Vec<f32>>> = info
        .spaces
        .iter()
        .map(|_| sizes.iter().map(|&n| filled(n, 0.5)).collect())
        .collect::<Result<_, _>>()?;
    let program = Arc::new(program);
    let mut opt = args.exec.bind(Arc::clone(&program), params)?;
    apply_sets(&mut opt, &args.sets)?;
    let inputs_data: Vec<(String, Vec<Vec<f32>>)> = info
        .inputs()
        .map(|(_, b)| {
            Ok((
                b.name.clone(),
                sizes
                    .iter()
                    .map(|&n| filled(n, 1e-3))
                    .collect::<Result<_, _>>()?,
            ))
        })
        .collect::<Result<_, Fail>>()?;
    let mut inputs = Inputs::default();
    for (n, d) in &inputs_data {
        inputs = inputs.tensor(n, d.iter().map(|v| v.as_slice()).collect());
    }
    for s in &info.scalar_inputs {
        inputs = inputs.scalar(s, 0.5);
    }
    if let Some(jit) = opt.jit() {
        let n = jit.kernels.iter().flatten().flatten().flatten().count();
        let by = match backend {
            Backend::Native { .. } => "the C compiler (or its cache)",
            _ => "cranelift",
        };
        println!(
            "compiled {n} kernels with {by} in {:.2} ms",
            jit.compile_time.as_secs_f64() * 1e3
        );
    }
    opt.step(&inputs)?; // the first step (its own variant), then a warm-up
    opt.step(&inputs)?;
    let mut ceils = ceilings(
        &Streams::passes(opt.active_program(), |_| 4),
        args.elems,
        threads,
    )?;
    // What each step moved: work that is off on a step (`t % I == 0` false) moves nothing.
    let mut per_step: std::collections::BTreeMap<(usize, usize, usize), usize> =
        std::collections::BTreeMap::new();
    let (times, cgbs) = interleaved(
        args.steps,
        || {
            opt.step(&inputs)?;
            *per_step
                .entry(traffic(opt.active_program(), args.elems, |_| 4))
                .or_default() += 1;
            Ok(())
        },
        &mut ceils,
    )?;
    let nsteps = times.len();
    let mean_time = times.iter().sum::<f64>() / nsteps as f64;
    let t = median(times);
    let (mut must, moved, passes) = traffic(opt.active_program(), args.elems, |_| 4);
    let mut t_bw = t;
    if per_step.len() > 1 {
        // Steps differ: the bandwidth is the mean bytes over the mean time.
        must = per_step.iter().map(|(k, n)| k.0 * n).sum::<usize>() / nsteps;
        t_bw = mean_time;
        for (&(m, mv, ps), &n) in per_step.iter().rev() {
            println!(
                "  {n} of {nsteps} steps: the rule must move {:.1} MB ({ps} pass(es) move {:.1} MB)",
                m as f64 / 1e6,
                mv as f64 / 1e6
            );
        }
    }
    drop(opt);
    let gbs = must as f64 / t_bw / 1e9;
    println!(
        "rule {} on {:?}: {} elements in {} tensor(s) per param",
        info.name, backend, args.elems, tensors
    );
    println!(
        "  step time (median of {})   {:>10.3} ms",
        args.steps.max(1),
        t * 1e3
    );
    println!(
        "  bytes the rule must move   {:>10.1} MB   ({passes} pass(es) over memory move {:.1} MB)",
        must as f64 / 1e6,
        moved as f64 / 1e6
    );
    println!("  effective bandwidth        {gbs:>10.2} GB/s");
    print_ceilings(gbs, t_bw, &ceils, &cgbs);
    Ok(())
}

/// The ceilings' lines of a CPU bench: `a += s * b` and the rule's own access pattern (whose
/// ratio is the pattern's time over the step's: how close the step comes to moving its
/// passes' bytes at the memory's speed).
fn print_ceilings(gbs: f64, step_time: f64, ceils: &[Ceiling], cgbs: &[f64]) {
    let (pattern, axpy) = (&ceils[0], cgbs[1]);
    println!("  in-place ceiling a+=s*b    {axpy:>10.2} GB/s   (same threads, same size)");
    println!("  ratio                      {:>10.3}", gbs / axpy);
    let streams = pattern.streams();
    let shape: Vec<String> = streams
        .iter()
        .map(|s| {
            format!(
                "{} read, {} in-place, {} written",
                s.read.len(),
                s.inplace.len(),
                s.write.len()
            )
        })
        .collect();
    println!(
        "  its access pattern         {:>10.2} GB/s   ({} pass(es) of a trivial kernel over {} stream(s); {})",
        cgbs[0],
        streams.len(),
        shape.join(", then "),
        pattern.how()
    );
    let pattern_time = pattern.bytes() as f64 / (cgbs[0] * 1e9);
    println!(
        "  ratio to the pattern       {:>10.3}   (the pattern's time {:.3} ms over the step's)",
        pattern_time / step_time,
        pattern_time * 1e3
    );
}

/// The key of `--rounding stochastic`.
const BENCH_SEED: u64 = 0x5eed;

/// `optc bench --storage bf16|f16`: a [`MixedOptimizer`] over 16-bit params lent in place, f32
/// gradients; bytes counted at each buffer's storage size (what the fused kernels move).
fn bench_mixed<S: Storage>(
    args: &BenchArgs,
    program: Arc<Program>,
    sizes: &[usize],
) -> Result<(), Fail> {
    let info = program.info.clone();
    let backend = args.exec.backend()?;
    let threads = match backend {
        Backend::Cranelift { threads } | Backend::Native { threads } => threads,
        _ => 1,
    };
    let options = MixedOptions {
        master_weights: args.master_weights,
        bf16_state: args.state_storage == StateStorageArg::Bf16,
        rounding: match args.rounding {
            RoundingArg::Nearest => Rounding::Nearest,
            RoundingArg::Stochastic => Rounding::Stochastic { seed: BENCH_SEED },
        },
    };
    let specs: Vec<Vec<TensorSpec>> = (0..info.spaces.len())
        .map(|s| {
            sizes
                .iter()
                .enumerate()
                .map(|(j, &n)| TensorSpec::new(format!("{}.{j}", info.spaces[s]), &[n]))
                .collect()
        })
        .collect();
    let mut opt = MixedOptimizer::<S>::new(Arc::clone(&program), specs, options)?
        .with_backend(backend)?
        .with_separate_passes(args.separate_passes)?
        .with_non_finite(args.exec.non_finite.policy())?;
    apply_sets(opt.inner_mut(), &args.sets)?;
    let mut params: Vec<Vec<Vec<S>>> = info
        .spaces
        .iter()
        .map(|_| sizes.iter().map(|&n| vec![S::nearest(0.5); n]).collect())
        .collect();
    let inputs_data: Vec<(String, Vec<Vec<f32>>)> = info
        .inputs()
        .map(|(_, b)| {
            (
                b.name.clone(),
                sizes.iter().map(|&n| vec![1e-3f32; n]).collect(),
            )
        })
        .collect();
    let mut inputs = Inputs::default();
    for (n, d) in &inputs_data {
        inputs = inputs.tensor(n, d.iter().map(|v| v.as_slice()).collect());
    }
    for s in &info.scalar_inputs {
        inputs = inputs.scalar(s, 0.5);
    }
    let mut step = |opt: &mut MixedOptimizer<S>| -> Result<(), Fail> {
        let mut lend: Vec<Vec<&mut [S]>> = params
            .iter_mut()
            .map(|ts| ts.iter_mut().map(Vec::as_mut_slice).collect())
            .collect();
        opt.step_with(&mut lend, &inputs)?;
        Ok(())
    };
    step(&mut opt)?; // the first step (its own variant), then a warm-up
    step(&mut opt)?;
    let steps = args.steps.max(1);
    let map = opt.storage_map().unwrap_or_default();
    let bytes = |b| map.of(b).bytes(compiler::backend::clif::Precision::F32);
    let mut ceils = ceilings(
        &Streams::passes(opt.inner().active_program(), bytes),
        args.elems,
        threads,
    )?;
    let (times, cgbs) = interleaved(steps, || step(&mut opt), &mut ceils)?;
    let t = median(times);
    // The bytes the fused kernels move, at each buffer's storage size.
    let active = opt.inner().active_program();
    let (must, moved, passes) = traffic(active, args.elems, bytes);
    let fused = opt.is_fused();
    drop(opt);
    drop(params);
    let gbs = must as f64 / t / 1e9;
    let how = if fused {
        "conversions fused into the kernels"
    } else {
        "conversions in separate passes around an f32 step"
    };
    println!(
        "rule {} on {:?}: {} elements in {} tensor(s) per param, params {}, state {}, \
         {:?} rounding{}; {how}",
        info.name,
        backend,
        args.elems,
        sizes.len(),
        S::NAME,
        if options.bf16_state { "bf16" } else { "f32" },
        args.rounding,
        if options.master_weights {
            ", f32 master weights"
        } else {
            ""
        },
    );
    println!("  step time (median of {steps})   {:>10.3} ms", t * 1e3);
    println!(
        "  bytes the rule must move   {:>10.1} MB   ({passes} pass(es) over memory move {:.1} MB in the fused kernels)",
        must as f64 / 1e6,
        moved as f64 / 1e6
    );
    println!("  effective bandwidth        {gbs:>10.2} GB/s");
    print_ceilings(gbs, t, &ceils, &cgbs);
    Ok(())
}

/// `optc bench` on a CUDA device: gradients in device memory, uploaded once, and steps through
/// `step_device` (no host copies in the timed steps); the ceiling is the device-to-device copy
/// bandwidth measured in the same run.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
fn bench_cuda(args: &BenchArgs, program: Arc<Program>, sizes: &[usize]) -> Result<(), Fail> {
    use optc::runtime::DeviceInputs;
    let info = program.info.clone();
    let params: Vec<Vec<Vec<f32>>> = info
        .spaces
        .iter()
        .map(|_| sizes.iter().map(|&n| filled(n, 0.5)).collect())
        .collect::<Result<_, _>>()?;
    let mut opt = args.exec.bind(Arc::clone(&program), params)?;
    apply_sets(&mut opt, &args.sets)?;
    let dev = Arc::clone(
        opt.device()
            .ok_or_else(|| Fail("error: no CUDA device".to_string()))?,
    );
    // Each input: one allocation, tensors 16-byte aligned, filled with 1e-3.
    let padded: Vec<usize> = sizes.iter().map(|n| n.div_ceil(4) * 4).collect();
    let mut held = Vec::new();
    let mut inputs = DeviceInputs::default();
    for (_, b) in info.inputs() {
        let buf = dev.alloc(padded.iter().sum::<usize>() * 4)?;
        buf.fill_u32(1e-3f32.to_bits(), buf.bytes() / 4)?;
        let mut at = buf.ptr();
        let ptrs = padded
            .iter()
            .map(|n| {
                let p = at;
                at += (*n * 4) as u64;
                p
            })
            .collect();
        inputs = inputs.tensor(&b.name, ptrs);
        held.push(buf);
    }
    for s in &info.scalar_inputs {
        inputs = inputs.scalar(s, 0.5);
    }
    let step = |opt: &mut Optimizer<f32>| -> Result<(), Fail> {
        // SAFETY: every input address is a tensor of its registered size in an allocation of
        // this optimizer's device (`held`, alive until the function returns); params are owned.
        unsafe { opt.step_device(None, &inputs)? };
        dev.synchronize()?;
        Ok(())
    };
    step(&mut opt)?; // the first step (its own variant), then a warm-up
    step(&mut opt)?;
    let before = opt.launches();
    let steps = args.steps.max(1);
    let mut times = Vec::new();
    for _ in 0..steps {
        let start = std::time::Instant::now();
        step(&mut opt)?;
        times.push(start.elapsed().as_secs_f64());
    }
    let launches = (opt.launches() - before) as f64 / steps as f64;
    let t = median(times);
    let (must, moved, passes) = traffic(opt.active_program(), args.elems, |_| 4);
    // Ceiling: copying one param-sized buffer device to device (read + write).
    let copy_bytes = (args.elems * 4).max(4);
    let (a, b) = (dev.alloc(copy_bytes)?, dev.alloc(copy_bytes)?);
    a.fill_u32(0, copy_bytes / 4)?;
    let mut copies = Vec::new();
    for r in 0..6 {
        let start = std::time::Instant::now();
        b.copy_from(&a, copy_bytes)?;
        dev.synchronize()?;
        if r > 0 {
            copies.push(start.elapsed().as_secs_f64());
        }
    }
    let ceiling = 2.0 * copy_bytes as f64 / median(copies) / 1e9;
    let gbs = must as f64 / t / 1e9;
    println!(
        "rule {} on {} ({}): {} elements in {} tensor(s) per param",
        info.name,
        dev.name(),
        dev.arch(),
        args.elems,
        sizes.len()
    );
    println!("  step time (median of {steps})   {:>10.3} ms", t * 1e3);
    println!(
        "  bytes the rule must move   {:>10.1} MB   ({passes} pass(es) over memory move {:.1} MB)",
        must as f64 / 1e6,
        moved as f64 / 1e6
    );
    println!("  kernel launches per step   {launches:>10.1}");
    println!("  effective bandwidth        {gbs:>10.2} GB/s");
    println!("  device-to-device copy      {ceiling:>10.2} GB/s   (read + write, same size)");
    println!("  ratio                      {:>10.3}", gbs / ceiling);
    Ok(())
}
