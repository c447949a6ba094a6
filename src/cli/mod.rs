//! The `optc` command, one module per command: `check`, `compile`, `run`, `bench`, `list` and
//! `doc` (in [`doc`]); [`io`] reads and writes safetensors files. What the commands share is here:
//! loading and compiling a rule, `--set`, the backend options, and [`Fail`].

use clap::{Parser, Subcommand, ValueEnum};
use optc::compiler::ir::Program;
use optc::runtime::{Backend, NonFinite, Optimizer};
use optc::{compile, compiler, render, stdlib};
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

mod bench;
mod check;
mod compile;
mod doc;
mod io;
mod run;

#[derive(Parser, Debug)]
#[command(
    name = "optc",
    version,
    about = "A compiler for optimizer update rules"
)]
pub(crate) struct Cli {
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
    Compile(compile::CompileArgs),
    /// Apply a rule to parameters stored in a safetensors file.
    Run(run::RunArgs),
    /// Measure a rule's step time and effective bandwidth against this machine's ceiling.
    Bench(bench::BenchArgs),
    /// List the standard library.
    List,
    /// Show a standard-library rule's documentation, hyperparameters and interface.
    Doc {
        /// A standard-library name or a rule file (every rule in it is documented).
        name: String,
    },
}

/// A user error: printed, exit code 1.
#[derive(Debug)]
pub(crate) struct Fail(pub(crate) String);

impl<E: std::fmt::Display> From<E> for Fail {
    /// An error of the runtime or the system, as the one line `optc` prints: `error: ...`.
    fn from(e: E) -> Self {
        let msg = e.to_string();
        Fail(if msg.starts_with("error:") {
            msg
        } else {
            format!("error: {msg}")
        })
    }
}

/// Runs a parsed command line: prints a failure's message on stderr.
pub(crate) fn execute(cli: Cli) -> ExitCode {
    let result = match cli.cmd {
        Cmd::Check { files } => check::command(&files),
        Cmd::Compile(args) => compile::command(&args),
        Cmd::Run(args) => run::command(&args),
        Cmd::Bench(args) => bench::command(&args),
        Cmd::List => doc::list(),
        Cmd::Doc { name } => doc::show(&name),
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

pub(crate) fn color() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// Reads a rule file, or a standard-library rule when no such file exists.
pub(crate) fn load_source(rule: &str) -> Result<(String, String), Fail> {
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

pub(crate) fn closest<'a>(
    name: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    optc::compiler::lower::suggest(name, candidates)
}

/// Compiles a rule file and picks one rule from it.
pub(crate) fn compile_one(
    rule: &str,
    rule_name: Option<&str>,
) -> Result<(Program, String, String), Fail> {
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

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
pub(crate) enum PrecisionArg {
    /// f32 buffers.
    F32,
    /// f64 buffers.
    F64,
}

impl PrecisionArg {
    pub(crate) fn precision(self) -> compiler::backend::clif::Precision {
        match self {
            PrecisionArg::F32 => compiler::backend::clif::Precision::F32,
            PrecisionArg::F64 => compiler::backend::clif::Precision::F64,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
pub(crate) enum BackendArg {
    /// The fastest CPU engine that works here (the default): native where a C compiler
    /// works, else Cranelift (saying so in one line).
    Auto,
    /// Cranelift machine code (no C compiler needed; compiles in milliseconds).
    Cranelift,
    /// Kernels as C built by the system C compiler for this machine (wide vectors); falls back
    /// to Cranelift, saying so, where no C compiler works.
    Native,
    /// The reference interpreter.
    Interp,
    /// CUDA kernels on a GPU (`--device`), compiled by NVRTC.
    Cuda,
    /// The CUDA kernels run on the CPU by the CUDA emulator (needs a C++ compiler; for testing).
    CudaEmulator,
}

/// Which engine runs the kernels.
#[derive(clap::Args, Debug, Clone, Copy)]
pub(crate) struct ExecArgs {
    /// The engine that runs the kernels (`--engine` is the same option).
    #[arg(long, alias = "engine", value_enum, default_value = "auto")]
    pub(crate) backend: BackendArg,
    /// Worker threads for the Cranelift and native backends (default: all cores).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// The GPU of the cuda backend (CUDA device ordinal).
    #[arg(long, default_value_t = 0)]
    pub(crate) device: usize,
    /// What a step does when a gradient holds an infinity or a NaN.
    #[arg(long = "non-finite", value_enum, default_value = "proceed")]
    pub(crate) non_finite: NonFiniteArg,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
pub(crate) enum NonFiniteArg {
    /// Take the step anyway.
    Proceed,
    /// Skip the step (nothing changes) and count it.
    Skip,
    /// Stop with an error (nothing changes).
    Error,
}

impl NonFiniteArg {
    /// The runtime's policy.
    pub(crate) fn policy(self) -> NonFinite {
        match self {
            NonFiniteArg::Proceed => NonFinite::Proceed,
            NonFiniteArg::Skip => NonFinite::Skip,
            NonFiniteArg::Error => NonFinite::Error,
        }
    }
}

impl ExecArgs {
    /// Binds a rule with this backend and non-finite policy.
    pub(crate) fn bind<T: optc::compiler::ops::Float + Default>(
        &self,
        program: Arc<Program>,
        params: Vec<Vec<Vec<T>>>,
    ) -> Result<Optimizer<T>, Fail> {
        Ok(Optimizer::new(program, params)?
            .with_backend(self.backend()?)?
            .with_non_finite(self.non_finite.policy())?)
    }

    /// Binds a rule to named tensors the caller keeps and lends to each step.
    pub(crate) fn lend<T: optc::compiler::ops::Float + Default>(
        &self,
        program: Arc<Program>,
        tensors: Vec<Vec<optc::runtime::TensorSpec>>,
    ) -> Result<Optimizer<T>, Fail> {
        Ok(Optimizer::lending(program, tensors)?
            .with_backend(self.backend()?)?
            .with_non_finite(self.non_finite.policy())?)
    }

    pub(crate) fn backend(&self) -> Result<Backend, Fail> {
        let threads = self
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1);
        Ok(match self.backend {
            BackendArg::Interp => Backend::Interpreter,
            BackendArg::Cranelift => Backend::Cranelift { threads },
            // Native where a C compiler works, else Cranelift, saying so once.
            BackendArg::Native | BackendArg::Auto => Backend::Auto { threads }.resolved(),
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

/// Applies `--set NAME=VALUE` options.
pub(crate) fn apply_sets<T: optc::compiler::ops::Float + Default>(
    opt: &mut Optimizer<T>,
    sets: &[String],
) -> Result<(), Fail> {
    for s in sets {
        let (n, v) = s
            .split_once('=')
            .ok_or_else(|| Fail(format!("error: `--set {s}`: expected NAME=VALUE")))?;
        let text = v.trim();
        let v = parse_value(text).ok_or_else(|| {
            Fail(format!(
                "error: `--set {s}`: `{text}` is not a number, true or false"
            ))
        })?;
        let info = &opt.program().info;
        if let Some(h) = info.hyper(n.trim()) {
            let boolean = info.hypers[h].ty == optc::compiler::ir::Ty::Bool;
            let word = matches!(text, "true" | "True" | "false" | "False");
            if word && !boolean {
                return Err(Fail(format!(
                    "error: `--set {s}`: `{}` is a number, not true or false",
                    n.trim()
                )));
            }
            if boolean && !word && v != 0.0 && v != 1.0 {
                return Err(Fail(format!(
                    "error: `--set {s}`: `{}` is true or false",
                    n.trim()
                )));
            }
        }
        opt.set_hyper(n.trim(), v)
            .map_err(|e| Fail(format!("error: {e}")))?;
    }
    Ok(())
}

pub(crate) fn parse_value(s: &str) -> Option<f64> {
    match s.trim() {
        "true" | "True" => Some(1.0),
        "false" | "False" => Some(0.0),
        other => other.parse::<f64>().ok(),
    }
}
