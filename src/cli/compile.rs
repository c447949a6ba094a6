//! `optc compile`: print one stage of the compiler for a rule.

use super::{apply_sets, color, compile_one, load_source, Fail, NonFiniteArg, PrecisionArg};
use clap::ValueEnum;
use optc::compiler::ir::Program;
use optc::compiler::passes::runnable_with;
use optc::compiler::passes::specialize::Decisions;
use optc::compiler::PassObserver;
use optc::runtime::{NonFinite, Optimizer};
use optc::{compiler, render};
use std::borrow::Cow;
use std::sync::Arc;

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct CompileArgs {
    /// A rule file or a standard-library name.
    pub(crate) rule: String,
    /// What to print.
    #[arg(long, value_enum, default_value = "kernels")]
    pub(crate) emit: Emit,
    /// Which rule, when the file has several.
    #[arg(long = "rule")]
    pub(crate) rule_name: Option<String>,
    /// Element precision of the buffers, for `--emit clif|cuda|c|ptx`.
    #[arg(long, value_enum, default_value = "f32")]
    pub(crate) precision: PrecisionArg,
    /// GPU architecture for `--emit ptx` (`sm_80`, `sm_90`, ...).
    #[arg(long, default_value = "sm_90")]
    pub(crate) arch: String,
    /// Storage of params and state for `--emit clif|cuda|c|ptx` (bf16/f16: f32 arithmetic).
    #[arg(long, value_enum, default_value = "native")]
    pub(crate) storage: StorageArg,
    /// Rounding of stores into 16-bit storage.
    #[arg(long, value_enum, default_value = "nearest")]
    pub(crate) rounding: RoundingArg,
    /// Set a hyperparameter: NAME=VALUE (VALUE a number, true or false), checked as `optc run`
    /// checks it. The program printed is the one the runtime runs for these values: specialized
    /// on their decisions (`amsgrad`, `max_grad_norm > 0`, ...); unset ones take their defaults.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    pub(crate) sets: Vec<String>,
    /// What a step does when an input holds an infinity or a NaN: with `skip` or `error` the
    /// program printed is guarded against non-finite inputs, as the runtime runs it.
    #[arg(long = "non-finite", value_enum, default_value = "proceed")]
    pub(crate) non_finite: NonFiniteArg,
    /// Print the program without specialization on hyperparameter decisions: every option's
    /// branches kept (as `Optimizer::with_specialization(false)` runs it).
    #[arg(long)]
    pub(crate) no_specialize: bool,
    /// For a rule with a sample-axis input (`input G: samples`): the number of samples the
    /// program printed is written out for (a step's kernels read every sample's block).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub(crate) samples: usize,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
pub(crate) enum Emit {
    /// The syntax tree.
    Ast,
    /// The IR after lowering and after each pass.
    Ir,
    /// The final kernels: phases, uniforms, per-element work, stores and reductions.
    Kernels,
    /// Cranelift IR of every kernel, before Cranelift's optimizations.
    Clif,
    /// CUDA C of every kernel (both step variants, one translation unit).
    Cuda,
    /// C of every kernel for the native backend (both step variants, one translation unit).
    C,
    /// PTX of every kernel, compiled by NVRTC for `--arch` (needs the NVRTC library at run time).
    Ptx,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
pub(crate) enum StorageArg {
    /// The precision of the buffers.
    Native,
    /// bf16 params and state.
    Bf16,
    /// f16 params, bf16 state.
    F16,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
pub(crate) enum RoundingArg {
    /// To nearest, ties to even.
    Nearest,
    /// Stochastically (Philox keyed by seed, step, buffer and element).
    Stochastic,
}

/// The storage map `--storage` and `--rounding` ask for.
fn storage_map(
    p: &Program,
    storage: StorageArg,
    rounding: RoundingArg,
) -> compiler::storage::StorageMap {
    use compiler::storage::{Storage, StorageMap};
    match storage {
        StorageArg::Native => StorageMap::default(),
        StorageArg::Bf16 | StorageArg::F16 => StorageMap::mixed(
            p,
            if storage == StorageArg::Bf16 {
                Storage::Bf16
            } else {
                Storage::F16
            },
            true,
            rounding == RoundingArg::Stochastic,
        ),
    }
}

/// The CUDA source of a program as `--precision`, `--storage` and `--rounding` ask.
fn cuda_source(
    p: &Program,
    precision: PrecisionArg,
    storage: StorageArg,
    rounding: RoundingArg,
) -> Result<String, Fail> {
    let map = storage_map(p, storage, rounding);
    compiler::backend::cuda::module_stored(p, precision.precision(), false, &map)
        .map(|m| m.source)
        .map_err(|e| Fail(format!("error: {e}")))
}

/// Runs `optc compile`.
pub(crate) fn command(args: &CompileArgs) -> Result<(), Fail> {
    let CompileArgs {
        ref rule,
        emit,
        ref rule_name,
        precision,
        ref arch,
        storage,
        rounding,
        ..
    } = *args;
    let rule_name = rule_name.as_deref();
    let (name, src) = load_source(rule)?;
    match emit {
        Emit::Ast => {
            let (file, diags) = optc::grammar::parse(&src);
            if diags.iter().any(|d| d.is_error()) {
                return Err(Fail(render(&diags, &src, &name, color())));
            }
            println!("{file:#?}");
        }
        Emit::Ir => {
            // Each rule after lowering and each pass of the pipeline, then after each step
            // that makes it the program the runtime runs.
            let mut pipeline: Vec<(String, String)> = Vec::new();
            let c = compiler::compile_with(&src, &mut |pass, p| {
                if rule_name.is_none_or(|r| r == p.info.name) {
                    pipeline.push((p.info.name.clone(), dump(pass, p)));
                }
            });
            if c.has_errors() {
                return Err(Fail(render(&c.diagnostics, &src, &name, color())));
            }
            let mut dumps = Vec::new();
            for p in c
                .programs
                .iter()
                .filter(|p| rule_name.is_none_or(|r| r == p.info.name))
            {
                dumps.extend(
                    pipeline
                        .iter()
                        .filter(|(rule, _)| *rule == p.info.name)
                        .map(|(_, d)| d.clone()),
                );
                runnable(p, args, &mut |pass, q| dumps.push(dump(pass, q)))?;
            }
            println!("{}", dumps.join("\n"));
        }
        Emit::Kernels => {
            let (base, _, _) = compile_one(rule, rule_name)?;
            let p = runnable(&base, args, &mut |_, _| {})?;
            print!(
                "{}{}",
                compiler::print::interface(&p),
                compiler::print::kernels(&p)
            );
        }
        Emit::Clif => {
            let (base, _, _) = compile_one(rule, rule_name)?;
            let p = runnable(&base, args, &mut |_, _| {})?;
            let map = storage_map(&p, storage, rounding);
            let text = compiler::backend::clif::clif_text_stored(&p, precision.precision(), &map)
                .map_err(|e| Fail(format!("error: {e}")))?;
            print!("{text}");
        }
        Emit::Cuda => {
            let (base, _, _) = compile_one(rule, rule_name)?;
            let p = runnable(&base, args, &mut |_, _| {})?;
            print!("{}", cuda_source(&p, precision, storage, rounding)?);
        }
        Emit::C => {
            let (base, _, _) = compile_one(rule, rule_name)?;
            let p = runnable(&base, args, &mut |_, _| {})?;
            let map = storage_map(&p, storage, rounding);
            let m = compiler::backend::c::module(&p, precision.precision(), &map)
                .map_err(|e| Fail(format!("error: {e}")))?;
            print!("{}", m.source);
        }
        Emit::Ptx => {
            let (base, _, _) = compile_one(rule, rule_name)?;
            let p = runnable(&base, args, &mut |_, _| {})?;
            print!(
                "{}",
                ptx(&cuda_source(&p, precision, storage, rounding)?, arch)?
            );
        }
    }
    Ok(())
}

/// A program after a pass, as `--emit ir` prints it: the graph, or the kernels once planned.
fn dump(pass: &str, p: &Program) -> String {
    let body = if pass == "phases" || pass == "hoist" {
        compiler::print::kernels(p)
    } else {
        compiler::print::graph(p)
    };
    format!("== {} after {pass} ==\n{body}", p.info.name)
}

/// The program the runtime runs for `base` with the values of `--set` (checked by the runtime,
/// as `optc run` sets them) and the `--non-finite` policy: `optc_compiler::passes::runnable`, observed.
fn runnable<'a>(
    base: &'a Program,
    args: &CompileArgs,
    observe: PassObserver<'_>,
) -> Result<Cow<'a, Program>, Fail> {
    if args.samples != 1 {
        let max = compiler::passes::unroll::MAX_SAMPLES;
        if base.axis_form.is_none() {
            return Err(Fail(format!(
                "error: --samples: rule `{}` has no sample-axis input",
                base.info.name
            )));
        }
        let q = compiler::passes::for_samples(base, args.samples).ok_or_else(|| {
            Fail(format!(
                "error: --samples takes 1 to {max}, got {}",
                args.samples
            ))
        })?;
        let rest = CompileArgs {
            samples: 1,
            ..args.clone()
        };
        return runnable(&q, &rest, observe).map(|p| Cow::Owned(p.into_owned()));
    }
    let info = &base.info;
    let fail = |e: optc::runtime::Error| Fail(format!("error: {e}"));
    // An optimizer over no tensors: it checks the values and the policy as `optc run` does.
    let mut opt =
        Optimizer::<f32>::lending(Arc::new(base.clone()), vec![Vec::new(); info.spaces.len()])
            .map_err(fail)?;
    apply_sets(&mut opt, &args.sets)?;
    let policy = args.non_finite.policy();
    let opt = opt.with_non_finite(policy).map_err(fail)?;
    let values: Vec<f64> = info
        .hypers
        .iter()
        .map(|h| opt.hyper(&h.name).unwrap_or(h.default))
        .collect();
    let decisions = if args.no_specialize {
        Decisions::none()
    } else {
        Decisions::of(base)
    };
    Ok(runnable_with(
        base,
        &decisions,
        &[&values],
        policy != NonFinite::Proceed,
        observe,
    ))
}

/// The PTX of a program's CUDA source, through NVRTC (and the on-disk cache).
#[cfg(feature = "cuda")]
fn ptx(source: &str, arch: &str) -> Result<String, Fail> {
    use optc::runtime::cuda;
    let nvrtc = cuda::Nvrtc::load().map_err(|e| Fail(format!("error: {e}")))?;
    let ptx = nvrtc
        .compile_ptx_cached(source, arch, &cuda::PtxCache::default_location())
        .map_err(|e| Fail(format!("error: {e}")))?;
    Ok(ptx.text)
}

#[cfg(not(feature = "cuda"))]
fn ptx(_: &str, _: &str) -> Result<String, Fail> {
    Err(Fail(
        "error: this optc was built without the `cuda` feature; --emit ptx needs it".to_string(),
    ))
}
