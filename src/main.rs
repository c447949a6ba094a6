//! The `optc` command: check, compile and run optimizer rules.

use clap::{Parser, Subcommand, ValueEnum};
use optc::compiler::ir::{BufRole, Program, Ty};
use optc::runtime::{Backend, Inputs, NonFinite, Optimizer};
use optc::{compile, compiler, render, stdlib};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(
    name = "optc",
    version,
    about = "A compiler for optimizer update rules"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Check rule files and report every error and warning.
    Check {
        /// Rule files (or standard-library names).
        #[arg(required = true)]
        files: Vec<String>,
    },
    /// Compile a rule and print one stage of the compiler.
    Compile {
        /// A rule file or a standard-library name.
        rule: String,
        /// What to print.
        #[arg(long, value_enum, default_value = "kernels")]
        emit: Emit,
        /// Which rule, when the file has several.
        #[arg(long = "rule")]
        rule_name: Option<String>,
        /// Element precision of the buffers, for `--emit clif|cuda|ptx`.
        #[arg(long, value_enum, default_value = "f32")]
        precision: PrecisionArg,
        /// GPU architecture for `--emit ptx` (`sm_80`, `sm_90`, ...).
        #[arg(long, default_value = "sm_90")]
        arch: String,
        /// Device storage of params and state for `--emit cuda|ptx` (bf16/f16: f32 arithmetic).
        #[arg(long, value_enum, default_value = "native")]
        storage: StorageArg,
        /// Rounding of stores into 16-bit storage.
        #[arg(long, value_enum, default_value = "nearest")]
        rounding: RoundingArg,
    },
    /// Apply a rule to parameters stored in a safetensors file.
    Run(RunArgs),
    /// Measure a rule's step time and effective bandwidth against this machine's ceiling.
    Bench(BenchArgs),
    /// List the standard library.
    List,
    /// Show a standard-library rule's documentation, hyperparameters and interface.
    Doc {
        /// The rule's name.
        name: String,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
enum Emit {
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
    /// PTX of every kernel, compiled by NVRTC for `--arch` (needs the NVRTC library at run time).
    Ptx,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
enum StorageArg {
    /// The precision of the buffers.
    Native,
    /// bf16 params and state.
    Bf16,
    /// f16 params, bf16 state.
    F16,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
enum RoundingArg {
    /// To nearest, ties to even.
    Nearest,
    /// Stochastically (Philox keyed by seed, step, buffer and element).
    Stochastic,
}

/// The CUDA source of a program as `--precision`, `--storage` and `--rounding` ask.
fn cuda_source(
    p: &Program,
    precision: PrecisionArg,
    storage: StorageArg,
    rounding: RoundingArg,
) -> Result<String, Fail> {
    use compiler::backend::cuda::{module_stored, Storage, StorageMap};
    let map = match storage {
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
    };
    module_stored(p, precision.precision(), false, &map)
        .map(|m| m.source)
        .map_err(|e| Fail(format!("error: {e}")))
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
enum PrecisionArg {
    /// f32 buffers.
    F32,
    /// f64 buffers.
    F64,
}

impl PrecisionArg {
    fn precision(self) -> compiler::backend::clif::Precision {
        match self {
            PrecisionArg::F32 => compiler::backend::clif::Precision::F32,
            PrecisionArg::F64 => compiler::backend::clif::Precision::F64,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
enum BackendArg {
    /// Cranelift machine code (the default).
    Cranelift,
    /// The reference interpreter.
    Interp,
    /// CUDA kernels on a GPU (`--device`), compiled by NVRTC.
    Cuda,
    /// The CUDA kernels run on the CPU by the CUDA emulator (needs a C++ compiler; for testing).
    CudaEmulator,
}

/// Which engine runs the kernels.
#[derive(clap::Args, Debug, Clone, Copy)]
struct ExecArgs {
    /// The backend.
    #[arg(long, value_enum, default_value = "cranelift")]
    backend: BackendArg,
    /// Worker threads for the Cranelift backend (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// The GPU of the cuda backend (CUDA device ordinal).
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// What a step does when a gradient holds an infinity or a NaN.
    #[arg(long = "non-finite", value_enum, default_value = "proceed")]
    non_finite: NonFiniteArg,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
enum NonFiniteArg {
    /// Take the step anyway.
    Proceed,
    /// Skip the step (nothing changes) and count it.
    Skip,
    /// Stop with an error (nothing changes).
    Error,
}

impl ExecArgs {
    /// Binds a rule with this backend and non-finite policy.
    fn bind<T: optc::compiler::ops::Float + Default>(
        &self,
        program: Arc<Program>,
        params: Vec<Vec<Vec<T>>>,
    ) -> Result<Optimizer<T>, Fail> {
        let policy = match self.non_finite {
            NonFiniteArg::Proceed => NonFinite::Proceed,
            NonFiniteArg::Skip => NonFinite::Skip,
            NonFiniteArg::Error => NonFinite::Error,
        };
        Ok(Optimizer::new(program, params)?
            .with_backend(self.backend()?)?
            .with_non_finite(policy)?)
    }

    fn backend(&self) -> Result<Backend, Fail> {
        Ok(match self.backend {
            BackendArg::Interp => Backend::Interpreter,
            BackendArg::Cranelift => Backend::Cranelift {
                threads: self
                    .threads
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
                    .max(1),
            },
            #[cfg(feature = "cuda")]
            BackendArg::Cuda => Backend::Cuda {
                device: self.device,
            },
            #[cfg(feature = "cuda")]
            BackendArg::CudaEmulator => Backend::CudaEmulator,
            #[cfg(not(feature = "cuda"))]
            BackendArg::Cuda | BackendArg::CudaEmulator => {
                return Err(Fail(
                    "error: this optc was built without the `cuda` feature".to_string(),
                ))
            }
        })
    }
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// A rule file or a standard-library name.
    rule: String,
    /// Which rule, when the file has several.
    #[arg(long = "rule")]
    rule_name: Option<String>,
    /// Initial parameters. With several params (x, y, ...), tensors named `x` or `x.*` belong to `x`.
    #[arg(long)]
    params: PathBuf,
    /// A per-element or scalar input: NAME=FILE. The file holds, for every parameter tensor, a
    /// tensor of the same name with a leading step axis [N, ...shape] (a scalar input: a tensor
    /// named NAME of shape [N]).
    #[arg(long = "input", value_name = "NAME=FILE")]
    inputs: Vec<String>,
    /// Shorthand for the rule's gradient input (`g`, or its only per-element input).
    #[arg(long)]
    grads: Option<PathBuf>,
    /// Steps to run (default: the length of the inputs' step axis).
    #[arg(long)]
    steps: Option<usize>,
    /// Set a hyperparameter: NAME=VALUE (VALUE a number, true or false).
    #[arg(long = "set", value_name = "NAME=VALUE")]
    sets: Vec<String>,
    /// Where to write the parameters after the last step.
    #[arg(long)]
    out: PathBuf,
    /// Schedule a hyperparameter: NAME=SCHEDULE, e.g. `lr=warmup(100) then cosine(900, 0.1)`, or
    /// `lr=refined(NORMS, TAU)` from a file of gradient norms (one per line) of an earlier run.
    #[arg(long = "schedule", value_name = "NAME=SCHEDULE")]
    schedules: Vec<String>,
    /// Resume from a checkpoint (optimizer state, step counter, hyperparameters); `--set` still
    /// overrides hyperparameters.
    #[arg(long)]
    state_in: Option<PathBuf>,
    /// Write a checkpoint after the last step.
    #[arg(long)]
    state_out: Option<PathBuf>,
    /// Print nothing but errors.
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    exec: ExecArgs,
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// A rule file or a standard-library name.
    rule: String,
    /// Which rule, when the file has several.
    #[arg(long = "rule")]
    rule_name: Option<String>,
    /// Elements per param, in all.
    #[arg(long, default_value_t = 1 << 26)]
    elems: usize,
    /// Tensors the elements are split into.
    #[arg(long, default_value_t = 1)]
    tensors: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Set a hyperparameter: NAME=VALUE.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    sets: Vec<String>,
    #[command(flatten)]
    exec: ExecArgs,
}

/// A user error: printed, exit code 1.
#[derive(Debug)]
struct Fail(String);

impl<E: std::fmt::Display> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail(e.to_string())
    }
}

/// Restores the default SIGPIPE action, so `optc ... | head` ends quietly like other command-line
/// tools instead of failing on a closed pipe.
#[allow(unsafe_code)]
fn quiet_broken_pipes() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to SIG_DFL at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    quiet_broken_pipes();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Check { files } => check(&files),
        Cmd::Compile {
            rule,
            emit,
            rule_name,
            precision,
            arch,
            storage,
            rounding,
        } => compile_cmd(
            &rule,
            rule_name.as_deref(),
            emit,
            (precision, storage, rounding),
            &arch,
        ),
        Cmd::Run(args) => run(&args),
        Cmd::Bench(args) => bench(&args),
        Cmd::List => list(),
        Cmd::Doc { name } => doc(&name),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(msg)) => {
            if !msg.is_empty() {
                eprintln!("{}", msg.trim_end());
            }
            ExitCode::FAILURE
        }
    }
}

fn color() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// Reads a rule file, or a standard-library rule when no such file exists.
fn load_source(rule: &str) -> Result<(String, String), Fail> {
    let path = Path::new(rule);
    if path.exists() {
        let src = std::fs::read_to_string(path)
            .map_err(|e| Fail(format!("error: cannot read `{rule}`: {e}")))?;
        return Ok((rule.to_string(), src));
    }
    if let Some(src) = stdlib::source(rule) {
        return Ok((format!("stdlib/rules/{rule}.opt"), src.to_string()));
    }
    let mut msg = format!("error: `{rule}` is neither a file nor a standard-library rule");
    if let Some(s) = closest(rule, stdlib::names()) {
        msg.push_str(&format!("\n  help: did you mean `{s}`?"));
    }
    Err(Fail(msg))
}

fn closest<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    optc::compiler::lower::suggest(name, candidates)
}

fn check(files: &[String]) -> Result<(), Fail> {
    let mut failed = false;
    for f in files {
        let (name, src) = load_source(f)?;
        let c = compile(&src);
        eprint!("{}", render(&c.diagnostics, &src, &name, color()));
        let errors = c.diagnostics.iter().filter(|d| d.is_error()).count();
        let warnings = c.diagnostics.len() - errors;
        if errors > 0 {
            failed = true;
            eprintln!("{name}: {errors} error(s), {warnings} warning(s)");
        } else {
            let rules: Vec<&str> = c.programs.iter().map(|p| p.info.name.as_str()).collect();
            println!(
                "{name}: ok ({}){}",
                rules.join(", "),
                if warnings > 0 {
                    format!(", {warnings} warning(s)")
                } else {
                    String::new()
                }
            );
        }
    }
    if failed {
        Err(Fail(String::new()))
    } else {
        Ok(())
    }
}

/// Compiles a rule file and picks one rule from it.
fn compile_one(rule: &str, rule_name: Option<&str>) -> Result<(Program, String, String), Fail> {
    let (name, src) = load_source(rule)?;
    let c = compile(&src);
    if c.has_errors() {
        return Err(Fail(render(&c.diagnostics, &src, &name, color())));
    }
    let mut programs = c.programs;
    let idx = match rule_name {
        Some(r) => programs
            .iter()
            .position(|p| p.info.name == r)
            .ok_or_else(|| Fail(format!("error: `{name}` has no rule `{r}`")))?,
        None if programs.len() == 1 => 0,
        None => {
            let names: Vec<&str> = programs.iter().map(|p| p.info.name.as_str()).collect();
            return Err(Fail(format!(
                "error: `{name}` has several rules ({}); choose one with --rule",
                names.join(", ")
            )));
        }
    };
    Ok((programs.swap_remove(idx), name, src))
}

fn compile_cmd(
    rule: &str,
    rule_name: Option<&str>,
    emit: Emit,
    (precision, storage, rounding): (PrecisionArg, StorageArg, RoundingArg),
    arch: &str,
) -> Result<(), Fail> {
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
            let mut dumps = Vec::new();
            let c = compiler::compile_with(&src, &mut |pass, p| {
                if rule_name.is_none_or(|r| r == p.info.name) {
                    let body = if pass == "phases" || pass == "hoist" {
                        compiler::print::kernels(p)
                    } else {
                        compiler::print::graph(p)
                    };
                    dumps.push(format!("== {} after {pass} ==\n{body}", p.info.name));
                }
            });
            if c.has_errors() {
                return Err(Fail(render(&c.diagnostics, &src, &name, color())));
            }
            println!("{}", dumps.join("\n"));
        }
        Emit::Kernels => {
            let (p, _, _) = compile_one(rule, rule_name)?;
            print!(
                "{}{}",
                compiler::print::interface(&p),
                compiler::print::kernels(&p)
            );
        }
        Emit::Clif => {
            let (p, _, _) = compile_one(rule, rule_name)?;
            print!(
                "{}",
                compiler::backend::clif::clif_text(&p, precision.precision())
            );
        }
        Emit::Cuda => {
            let (p, _, _) = compile_one(rule, rule_name)?;
            print!("{}", cuda_source(&p, precision, storage, rounding)?);
        }
        Emit::Ptx => {
            let (p, _, _) = compile_one(rule, rule_name)?;
            print!(
                "{}",
                ptx(&cuda_source(&p, precision, storage, rounding)?, arch)?
            );
        }
    }
    Ok(())
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

fn list() -> Result<(), Fail> {
    for (name, src) in stdlib::RULES {
        let first = optc::grammar::parse(src)
            .0
            .and_then(|f| f.rules.into_iter().next())
            .and_then(|r| r.doc.into_iter().next())
            .unwrap_or_default();
        println!("{name:<18} {first}");
    }
    Ok(())
}

fn doc(name: &str) -> Result<(), Fail> {
    let src = stdlib::source(name).ok_or_else(|| {
        let mut m = format!("error: no standard-library rule `{name}`");
        if let Some(s) = closest(name, stdlib::names()) {
            m.push_str(&format!("\n  help: did you mean `{s}`?"));
        }
        Fail(m)
    })?;
    let (p, _, _) = compile_one(name, None)?;
    let i = &p.info;
    println!("{}\n", i.name);
    if !i.doc.is_empty() {
        println!("{}\n", i.doc);
    }
    println!("hyperparameters:");
    for h in &i.hypers {
        let default = if h.ty == Ty::Bool {
            (h.default != 0.0).to_string()
        } else {
            format!("{}", h.default)
        };
        let range = h.range.map(|r| format!(" in {r}")).unwrap_or_default();
        println!(
            "  {:<24} = {:<18} {}",
            format!("{}", h.name),
            format!("{default}{range}"),
            h.doc.replace('\n', " ")
        );
    }
    for (role, title) in [
        (BufRole::Param, "params"),
        (BufRole::Input, "inputs"),
        (BufRole::State, "state"),
        (BufRole::Output, "outputs"),
    ] {
        let names: Vec<String> = i
            .buffers
            .iter()
            .filter(|b| b.role == role)
            .map(|b| b.name.clone())
            .collect();
        let extra: Vec<String> = match role {
            BufRole::Input => i
                .scalar_inputs
                .iter()
                .map(|s| format!("{s} (scalar)"))
                .collect(),
            BufRole::State => i
                .scalar_states
                .iter()
                .map(|s| format!("{s} (scalar)"))
                .collect(),
            _ => Vec::new(),
        };
        let all: Vec<String> = names.into_iter().chain(extra).collect();
        if !all.is_empty() {
            println!("{title}: {}", all.join(", "));
        }
    }
    if i.stages.len() > 1 {
        println!("stages: {}", i.stages.join(", "));
    }
    let _ = src;
    Ok(())
}

/// A parameter tensor: name, shape, data.
type NamedTensor<T> = (String, Vec<usize>, Vec<T>);
/// A tensor's shape and data.
type Shaped = (Vec<usize>, Vec<f64>);

/// Tensors of a safetensors file, converted to f64, by name.
struct TensorFile {
    tensors: BTreeMap<String, (Vec<usize>, Vec<f64>)>,
    dtype: Dtype,
}

fn read_tensors(path: &Path) -> Result<TensorFile, Fail> {
    let bytes = std::fs::read(path)
        .map_err(|e| Fail(format!("error: cannot read `{}`: {e}", path.display())))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        Fail(format!(
            "error: `{}` is not a valid safetensors file: {e}",
            path.display()
        ))
    })?;
    let mut tensors = BTreeMap::new();
    let mut dtype = Dtype::F32;
    for (name, view) in st.tensors() {
        let data = to_f64(&view).ok_or_else(|| {
            Fail(format!(
                "error: tensor `{name}` in `{}` has dtype {:?}; optc reads F32 and F64 here",
                path.display(),
                view.dtype()
            ))
        })?;
        dtype = view.dtype();
        tensors.insert(name, (view.shape().to_vec(), data));
    }
    Ok(TensorFile { tensors, dtype })
}

fn to_f64(v: &TensorView<'_>) -> Option<Vec<f64>> {
    let d = v.data();
    match v.dtype() {
        Dtype::F32 => Some(
            d.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect(),
        ),
        Dtype::F64 => Some(
            d.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        ),
        _ => None,
    }
}

/// Applies `--set NAME=VALUE` options.
fn apply_sets<T: optc::compiler::ops::Float + Default>(
    opt: &mut Optimizer<T>,
    sets: &[String],
) -> Result<(), Fail> {
    for s in sets {
        let (n, v) = s
            .split_once('=')
            .ok_or_else(|| Fail(format!("error: `--set {s}`: expected NAME=VALUE")))?;
        let v = parse_value(v).ok_or_else(|| {
            Fail(format!(
                "error: `--set {s}`: `{v}` is not a number, true or false"
            ))
        })?;
        opt.set_hyper(n.trim(), v)
            .map_err(|e| Fail(format!("error: {e}")))?;
    }
    Ok(())
}

fn parse_value(s: &str) -> Option<f64> {
    match s.trim() {
        "true" | "True" => Some(1.0),
        "false" | "False" => Some(0.0),
        other => other.parse::<f64>().ok(),
    }
}

fn run(args: &RunArgs) -> Result<(), Fail> {
    let (program, _, _) = compile_one(&args.rule, args.rule_name.as_deref())?;
    let params = read_tensors(&args.params)?;
    if params.dtype == Dtype::F64 {
        run_typed::<f64>(args, program, params)
    } else {
        run_typed::<f32>(args, program, params)
    }
}

trait Elem: optc::compiler::ops::Float + Default {
    const DTYPE: Dtype;
    fn to_le(v: &[Self]) -> Vec<u8>;
}
impl Elem for f32 {
    const DTYPE: Dtype = Dtype::F32;
    fn to_le(v: &[Self]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
}
impl Elem for f64 {
    const DTYPE: Dtype = Dtype::F64;
    fn to_le(v: &[Self]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
}

fn run_typed<T: Elem>(args: &RunArgs, program: Program, params: TensorFile) -> Result<(), Fail> {
    let info = program.info.clone();
    // Which tensors belong to which param.
    let mut spaces: Vec<Vec<NamedTensor<T>>> = vec![Vec::new(); info.spaces.len()];
    for (name, (shape, data)) in &params.tensors {
        let space = if info.spaces.len() == 1 {
            0
        } else {
            info.spaces
                .iter()
                .position(|s| name == s || name.starts_with(&format!("{s}.")))
                .ok_or_else(|| Fail(format!("error: tensor `{name}` belongs to no param; name it `{}` or `{}.<anything>`", info.spaces[0], info.spaces[0])))?
        };
        spaces[space].push((
            name.clone(),
            shape.clone(),
            data.iter().map(|&x| T::from_f64(x)).collect(),
        ));
    }
    for (s, ts) in spaces.iter().enumerate() {
        if ts.is_empty() {
            return Err(Fail(format!(
                "error: `{}` has no tensor for param `{}`",
                args.params.display(),
                info.spaces[s]
            )));
        }
    }
    // Inputs: NAME=FILE, plus --grads.
    let mut input_files: Vec<(String, PathBuf)> = Vec::new();
    for spec in &args.inputs {
        let (n, f) = spec
            .split_once('=')
            .ok_or_else(|| Fail(format!("error: `--input {spec}`: expected NAME=FILE")))?;
        input_files.push((n.to_string(), PathBuf::from(f)));
    }
    if let Some(g) = &args.grads {
        let elem_inputs: Vec<&str> = info.inputs().map(|(_, b)| b.name.as_str()).collect();
        let name = if elem_inputs.contains(&"g") {
            "g"
        } else if elem_inputs.len() == 1 {
            elem_inputs[0]
        } else {
            return Err(Fail(format!(
                "error: --grads is ambiguous for rule `{}` (inputs: {}); use --input NAME=FILE",
                info.name,
                elem_inputs.join(", ")
            )));
        };
        input_files.push((name.to_string(), g.clone()));
    }
    let mut tensor_inputs: HashMap<String, Vec<Shaped>> = HashMap::new();
    let mut scalar_inputs: HashMap<String, Vec<f64>> = HashMap::new();
    let mut steps_avail: Option<usize> = None;
    let mut steps_max = 0usize;
    for (name, file) in &input_files {
        let tf = read_tensors(file)?;
        if let Some(b) = info.buffer(name).filter(|&b| info.is_input(b)) {
            let space = info.buffers[b as usize].space as usize;
            let mut per = Vec::new();
            for (tname, shape, _) in &spaces[space] {
                let (ishape, data) = tf.tensors.get(tname).ok_or_else(|| {
                    Fail(format!(
                        "error: input file `{}` has no tensor `{tname}`",
                        file.display()
                    ))
                })?;
                if ishape.len() != shape.len() + 1 || ishape[1..] != shape[..] {
                    return Err(Fail(format!(
                        "error: input `{name}`, tensor `{tname}`: shape {ishape:?} is not [steps, {}]",
                        shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
                    )));
                }
                steps_avail = Some(steps_avail.map_or(ishape[0], |s: usize| s.min(ishape[0])));
                steps_max = steps_max.max(ishape[0]);
                per.push((ishape.clone(), data.clone()));
            }
            tensor_inputs.insert(name.clone(), per);
        } else if info.scalar_inputs.contains(name) {
            let (shape, data) = tf.tensors.get(name).ok_or_else(|| {
                Fail(format!(
                    "error: input file `{}` has no tensor `{name}`",
                    file.display()
                ))
            })?;
            if shape.len() != 1 {
                return Err(Fail(format!(
                    "error: scalar input `{name}` must have shape [steps], got {shape:?}"
                )));
            }
            steps_avail = Some(steps_avail.map_or(shape[0], |s: usize| s.min(shape[0])));
            steps_max = steps_max.max(shape[0]);
            scalar_inputs.insert(name.clone(), data.clone());
        } else {
            let known: Vec<String> = info
                .inputs()
                .map(|(_, b)| b.name.clone())
                .chain(info.scalar_inputs.iter().cloned())
                .collect();
            return Err(Fail(format!(
                "error: rule `{}` has no input `{name}` (inputs: {})",
                info.name,
                known.join(", ")
            )));
        }
    }
    let program = Arc::new(program);
    let initial: Vec<Vec<Vec<T>>> = spaces
        .iter()
        .map(|ts| ts.iter().map(|t| t.2.clone()).collect())
        .collect();
    let mut opt = args.exec.bind(Arc::clone(&program), initial.clone())?;
    if let Some(path) = &args.state_in {
        opt.load_checkpoint(path)
            .map_err(|e| Fail(format!("error: {e}")))?;
    }
    apply_sets(&mut opt, &args.sets)?;
    for spec in &args.schedules {
        let (n, text) = spec.split_once('=').ok_or_else(|| {
            Fail(format!(
                "error: `--schedule {spec}`: expected NAME=SCHEDULE"
            ))
        })?;
        let schedule = parse_schedule(text.trim())?;
        opt.set_schedule(n.trim(), schedule)
            .map_err(|e| Fail(format!("error: {e}")))?;
    }

    // Every input the rule reads must be given.
    for k in 0..info.stages.len() {
        for needs in [opt.stage_needs(k).clone()] {
            for b in needs.tensors {
                let n = &info.buffers[b as usize].name;
                if !tensor_inputs.contains_key(n) {
                    return Err(Fail(format!(
                        "error: rule `{}` reads input `{n}`; give it with --input {n}=FILE{}",
                        info.name,
                        if n == "g" { " or --grads FILE" } else { "" }
                    )));
                }
            }
            for i in needs.scalars {
                let n = &info.scalar_inputs[i as usize];
                if !scalar_inputs.contains_key(n) {
                    return Err(Fail(format!(
                        "error: rule `{}` reads scalar input `{n}`; give it with --input {n}=FILE",
                        info.name
                    )));
                }
            }
        }
    }
    let steps = match (args.steps, steps_avail) {
        (Some(s), Some(a)) if s > a => {
            return Err(Fail(format!(
                "error: --steps {s}, but the inputs hold only {a} steps"
            )))
        }
        (Some(s), _) => s,
        (None, Some(a)) if a != steps_max => {
            return Err(Fail(format!(
                "error: the inputs hold different numbers of steps ({a} to {steps_max}); pass --steps to choose"
            )))
        }
        (None, Some(a)) => a,
        (None, None) => {
            return Err(Fail(
                "error: no input gives a step count; pass --steps".into(),
            ))
        }
    };
    let show = !args.quiet && std::io::stdout().is_terminal();
    let every = (steps / 10).max(1);
    if !args.quiet {
        println!(
            "rule {}: {} step(s) over {} tensor(s), {} elements",
            info.name,
            steps,
            spaces.iter().map(|s| s.len()).sum::<usize>(),
            spaces.iter().flatten().map(|t| t.2.len()).sum::<usize>()
        );
        println!("{:>6}  {:>14}  {:>14}", "step", "|params|", "|update|");
    }
    // A progress bar on a terminal (stderr); hidden when piped or with --quiet.
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(steps as u64)
    };
    for step in 0..steps {
        let before: Vec<Vec<T>> = (0..info.spaces.len())
            .flat_map(|s| opt.params(s).to_vec())
            .collect();
        let slices: HashMap<String, Vec<Vec<T>>> = tensor_inputs
            .iter()
            .map(|(n, per)| {
                let v = per
                    .iter()
                    .map(|(shape, data)| {
                        let len: usize = shape[1..].iter().product();
                        data[step * len..(step + 1) * len]
                            .iter()
                            .map(|&x| T::from_f64(x))
                            .collect()
                    })
                    .collect();
                (n.clone(), v)
            })
            .collect();
        let mut inputs = Inputs::default();
        for (n, v) in &slices {
            inputs = inputs.tensor(n, v.iter().map(|x| x.as_slice()).collect());
        }
        for (n, v) in &scalar_inputs {
            inputs = inputs.scalar(n, v[step]);
        }
        opt.step(&inputs)
            .map_err(|e| Fail(format!("error: step {}: {e}", step + 1)))?;
        if !args.quiet && (step + 1 == steps || (step + 1) % every == 0 || show && step < 3) {
            let after: Vec<Vec<T>> = (0..info.spaces.len())
                .flat_map(|s| opt.params(s).to_vec())
                .collect();
            let norm = after
                .iter()
                .flatten()
                .map(|x| x.to_f64().powi(2))
                .sum::<f64>()
                .sqrt();
            let upd = after
                .iter()
                .flatten()
                .zip(before.iter().flatten())
                .map(|(a, b)| (a.to_f64() - b.to_f64()).powi(2))
                .sum::<f64>()
                .sqrt();
            bar.suspend(|| println!("{:>6}  {:>14.6e}  {:>14.6e}", step + 1, norm, upd));
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    // Write the parameters, with the names and shapes they came with.
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (s, ts) in spaces.iter().enumerate() {
        for (j, (name, shape, _)) in ts.iter().enumerate() {
            owned.push((name.clone(), shape.clone(), T::to_le(&opt.params(s)[j])));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(n, shape, bytes)| Ok((n.clone(), TensorView::new(T::DTYPE, shape.clone(), bytes)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    let mut meta = HashMap::new();
    meta.insert("rule".to_string(), info.name.clone());
    meta.insert("steps".to_string(), steps.to_string());
    let tmp = args.out.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(views, Some(meta), &tmp)
        .map_err(|e| Fail(format!("error: cannot write `{}`: {e}", args.out.display())))?;
    std::fs::rename(&tmp, &args.out)
        .map_err(|e| Fail(format!("error: cannot write `{}`: {e}", args.out.display())))?;
    if !args.quiet {
        if opt.skipped_steps() > 0 {
            println!(
                "skipped {} step(s) with non-finite inputs",
                opt.skipped_steps()
            );
        }
        println!("wrote {} ({} tensor(s))", args.out.display(), owned.len());
    }
    if let Some(path) = &args.state_out {
        opt.save_checkpoint(path)
            .map_err(|e| Fail(format!("error: {e}")))?;
        if !args.quiet {
            println!("wrote checkpoint {} (step {})", path.display(), opt.steps());
        }
    }
    Ok(())
}

/// Bytes a later step must move (every buffer its kernels read, once, and every buffer they write,
/// once), the bytes its kernels actually move (a buffer read in two passes counts twice), and the
/// number of passes over memory.
fn traffic(p: &Program, elems: usize, bytes: usize) -> (usize, usize, usize) {
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
                        moved += elems * bytes;
                    }
                }
                for &(b, _) in &k.stores {
                    written.insert(b);
                    moved += elems * bytes;
                }
            }
        }
    }
    ((read.len() + written.len()) * elems * bytes, moved, passes)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The in-place update `a[i] += s * b[i]` over arrays of `n` floats on `threads` threads: the
/// ceiling for a memory-bound step that reads two arrays and writes one of them back.
fn inplace_ceiling(n: usize, threads: usize, runs: usize) -> Result<f64, Fail> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let mut a = vec![1.0f32; n];
    let b = vec![0.5f32; n];
    let chunk = n.div_ceil(threads * 8).max(1 << 14);
    let mut times = Vec::new();
    for r in 0..runs + 1 {
        let s = 1e-3 * (r as f32 + 1.0);
        let start = std::time::Instant::now();
        pool.install(|| {
            use rayon::prelude::*;
            a.par_chunks_mut(chunk)
                .zip(b.par_chunks(chunk))
                .for_each(|(x, y)| {
                    for (x, y) in x.iter_mut().zip(y) {
                        *x += s * y;
                    }
                })
        });
        if r > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    std::hint::black_box(&a);
    Ok((3 * n * 4) as f64 / median(times) / 1e9)
}

fn bench(args: &BenchArgs) -> Result<(), Fail> {
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
    let backend = args.exec.backend()?;
    let threads = match backend {
        Backend::Cranelift { threads } => threads,
        _ => 1,
    };
    #[cfg(feature = "cuda")]
    if backend.is_cuda() {
        return bench_cuda(args, Arc::new(program), &sizes);
    }
    let params: Vec<Vec<Vec<f32>>> = info
        .spaces
        .iter()
        .map(|_| sizes.iter().map(|&n| vec![0.5f32; n]).collect())
        .collect();
    let program = Arc::new(program);
    let mut opt = args.exec.bind(Arc::clone(&program), params)?;
    apply_sets(&mut opt, &args.sets)?;
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
    if let Some(jit) = opt.jit() {
        let n = jit.kernels.iter().flatten().flatten().flatten().count();
        println!(
            "compiled {n} kernels with cranelift in {:.2} ms",
            jit.compile_time.as_secs_f64() * 1e3
        );
    }
    opt.step(&inputs)?; // the first step (its own variant), then a warm-up
    opt.step(&inputs)?;
    let mut times = Vec::new();
    for _ in 0..args.steps.max(1) {
        let start = std::time::Instant::now();
        opt.step(&inputs)?;
        times.push(start.elapsed().as_secs_f64());
    }
    let t = median(times);
    let (must, moved, passes) = traffic(opt.active_program(), args.elems, 4);
    let ceiling = inplace_ceiling(args.elems, threads, 5)?;
    let gbs = must as f64 / t / 1e9;
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
    println!("  in-place ceiling a+=s*b    {ceiling:>10.2} GB/s   (same threads, same size)");
    println!("  ratio                      {:>10.3}", gbs / ceiling);
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
        .map(|_| sizes.iter().map(|&n| vec![0.5f32; n]).collect())
        .collect();
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
    let (must, moved, passes) = traffic(opt.active_program(), args.elems, 4);
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

/// A schedule from the command line: the text form, or `refined(FILE[, TAU[, l1]])`.
fn parse_schedule(text: &str) -> Result<optc::runtime::Schedule, Fail> {
    if let Some(args) = text
        .strip_prefix("refined(")
        .and_then(|r| r.strip_suffix(')'))
    {
        let parts: Vec<&str> = args.split(',').map(str::trim).collect();
        let path = parts[0];
        let tau = match parts.get(1) {
            Some(t) => t
                .parse::<f64>()
                .map_err(|_| Fail(format!("error: schedule `{text}`: `{t}` is not a number")))?,
            None => 0.1,
        };
        let l1 = parts.get(2) == Some(&"l1");
        let norms: Vec<f64> = std::fs::read_to_string(path)
            .map_err(|e| {
                Fail(format!(
                    "error: cannot read gradient norms from `{path}`: {e}"
                ))
            })?
            .split_whitespace()
            .map(|w| {
                w.parse::<f64>()
                    .map_err(|_| Fail(format!("error: `{path}`: `{w}` is not a number")))
            })
            .collect::<Result<_, _>>()?;
        return optc::runtime::Schedule::refined(&norms, tau, l1)
            .map_err(|e| Fail(format!("error: {e}")));
    }
    optc::runtime::Schedule::parse(text).map_err(|e| Fail(format!("error: {e}")))
}
