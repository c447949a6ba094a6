//! `optc run`: apply a rule to parameters in a safetensors file, step by step over inputs from
//! safetensors files, and write the parameters (and a checkpoint).

use super::io::{read_tensors, tensors_bytes, NamedTensor, Shaped, TensorFile};
use super::{apply_sets, compile_one, ExecArgs, Fail};
use optc::compiler::ir::{BufRole, Program, RuleInfo};
use optc::compiler::ops::Float;
use optc::runtime::checkpoint::{recover, write_files_atomic};
use optc::runtime::{Error, Inputs, TensorSpec};
use safetensors::tensor::Dtype;
use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub(crate) struct RunArgs {
    /// A rule file or a standard-library name.
    pub(crate) rule: String,
    /// Which rule, when the file has several.
    #[arg(long = "rule")]
    pub(crate) rule_name: Option<String>,
    /// Initial parameters. With several params (x, y, ...), tensors named `x` or `x.*` belong to `x`.
    #[arg(long)]
    pub(crate) params: PathBuf,
    /// A per-element or scalar input: NAME=FILE. The file holds, for every parameter tensor, a
    /// tensor of the same name with a leading step axis [N, ...shape] (a scalar input: a tensor
    /// named NAME of shape [N]).
    #[arg(long = "input", value_name = "NAME=FILE")]
    pub(crate) inputs: Vec<String>,
    /// Shorthand for the rule's gradient input (`g`, or its only per-element input).
    #[arg(long)]
    pub(crate) grads: Option<PathBuf>,
    /// Steps to run (default: the length of the inputs' step axis).
    #[arg(long)]
    pub(crate) steps: Option<usize>,
    /// Set a hyperparameter: NAME=VALUE (VALUE a number, true or false).
    #[arg(long = "set", value_name = "NAME=VALUE")]
    pub(crate) sets: Vec<String>,
    /// Where to write the parameters after the last step. With --state-out and --outputs, the
    /// files are written as one transaction: all of them, or (on an error) none.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Schedule a hyperparameter: NAME=SCHEDULE, e.g. `lr=warmup(100) then cosine(900, 0.1)`, or
    /// `lr=refined(NORMS, TAU)` from a file of gradient norms (one per line) of an earlier run.
    #[arg(long = "schedule", value_name = "NAME=SCHEDULE")]
    pub(crate) schedules: Vec<String>,
    /// Resume from a checkpoint (optimizer state, step counter, hyperparameters); `--set` still
    /// overrides hyperparameters.
    #[arg(long)]
    pub(crate) state_in: Option<PathBuf>,
    /// Write a checkpoint after the last step.
    #[arg(long)]
    pub(crate) state_out: Option<PathBuf>,
    /// Write the rule's outputs after the last step (tensors `<output>.<param tensor>`).
    #[arg(long, visible_alias = "outs")]
    pub(crate) outputs: Option<PathBuf>,
    /// The seed of the rule's random draws (`uniform()`, `normal()`) and of stochastic rounding;
    /// a checkpoint from --state-in brings its own, which this overrides.
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Print nothing but errors.
    #[arg(long, short)]
    pub(crate) quiet: bool,
    #[command(flatten)]
    pub(crate) exec: ExecArgs,
}

/// Runs `optc run`.
pub(crate) fn command(args: &RunArgs) -> Result<(), Fail> {
    // An earlier run's interrupted write of these files is completed (or its temporary files
    // removed) before anything is read.
    let mut files: Vec<&Path> = vec![&args.params, &args.out];
    files.extend(args.state_in.as_deref());
    files.extend(args.state_out.as_deref());
    files.extend(args.outputs.as_deref());
    recover(&files).map_err(|e| {
        Fail(format!(
            "error: cannot complete an interrupted write of these files: {e}"
        ))
    })?;
    let (program, _, _) = compile_one(&args.rule, args.rule_name.as_deref())?;
    let params = read_tensors(&args.params)?;
    // The precision that holds every tensor exactly; each tensor is written back in its own dtype
    // (an F32 tensor of a run in f64 is rounded to f32 after every step, as its file holds it).
    if params.widest() == Dtype::F64 {
        run_typed::<f64>(args, program, params)
    } else {
        run_typed::<f32>(args, program, params)
    }
}

/// A tensor's elements as little-endian bytes of `dtype`.
fn to_le<T: Float>(v: &[T], dtype: Dtype) -> Vec<u8> {
    if dtype == Dtype::F64 {
        v.iter().flat_map(|x| x.to_f64().to_le_bytes()).collect()
    } else {
        v.iter()
            .flat_map(|x| (x.to_f64() as f32).to_le_bytes())
            .collect()
    }
}

fn run_typed<T: Float + Default>(
    args: &RunArgs,
    program: Program,
    params: TensorFile,
) -> Result<(), Fail> {
    let info = program.info.clone();
    // Which tensors belong to which param.
    let mut spaces: Vec<Vec<NamedTensor<T>>> = vec![Vec::new(); info.spaces.len()];
    let mut dtypes: Vec<Vec<Dtype>> = vec![Vec::new(); info.spaces.len()];
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
        dtypes[space].push(params.dtypes[name]);
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
    let outputs: Vec<&optc::compiler::ir::BufInfo> = info
        .buffers
        .iter()
        .filter(|b| b.role == BufRole::Output)
        .collect();
    let scalar_outs: Vec<&str> = info
        .scalar_outs
        .iter()
        .map(|&i| info.scalar_states[i as usize].as_str())
        .collect();
    if args.outputs.is_some() && outputs.is_empty() && scalar_outs.is_empty() {
        return Err(Fail(format!(
            "error: --outputs: rule `{}` has no outputs",
            info.name
        )));
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
        let name = grads_input(&info).ok_or_else(|| {
            let elem_inputs: Vec<&str> = info.inputs().map(|(_, b)| b.name.as_str()).collect();
            Fail(format!(
                "error: --grads is ambiguous for rule `{}` (inputs: {}); use --input NAME=FILE",
                info.name,
                elem_inputs.join(", ")
            ))
        })?;
        input_files.push((name.to_string(), g.clone()));
    }
    for (k, (name, _)) in input_files.iter().enumerate() {
        if input_files[..k].iter().any(|(n, _)| n == name) {
            let grads = if args.grads.is_some() && grads_input(&info) == Some(name.as_str()) {
                " (--grads gives it too)"
            } else {
                ""
            };
            return Err(Fail(format!("error: input `{name}` is given twice{grads}")));
        }
    }
    let mut tensor_inputs: HashMap<String, Vec<Shaped>> = HashMap::new();
    let sampled: Vec<&str> = program
        .axis_form
        .as_ref()
        .filter(|(axis, _)| axis.info.axis == Some(optc::compiler::ir::Axis::Samples))
        .map(|(axis, _)| {
            axis.info
                .buffers
                .iter()
                .filter(|b| b.axis)
                .map(|b| b.name.as_str())
                .collect()
        })
        .unwrap_or_default();
    let mut scalar_inputs: HashMap<String, Vec<f64>> = HashMap::new();
    let mut steps_avail: Option<usize> = None;
    let mut steps_max = 0usize;
    for (name, file) in &input_files {
        let tf = read_tensors(file)?;
        if let Some(b) = info.buffer(name).filter(|&b| info.is_input(b)) {
            let space = info.buffers[b as usize].space as usize;
            if let Some(extra) = tf
                .tensors
                .keys()
                .find(|t| !spaces[space].iter().any(|p| &p.0 == *t))
            {
                return Err(Fail(format!(
                    "error: input file `{}` has tensor `{extra}`, which is no tensor of param `{}` in `{}`",
                    file.display(),
                    info.spaces[space],
                    args.params.display()
                )));
            }
            let mut per = Vec::new();
            for (tname, shape, _) in &spaces[space] {
                let (ishape, data) = tf.tensors.get(tname).ok_or_else(|| {
                    Fail(format!(
                        "error: input file `{}` has no tensor `{tname}`",
                        file.display()
                    ))
                })?;
                // A sample-axis input: [steps, samples, ...shape] (or [steps, ...shape], one
                // sample a step).
                let per_sample = sampled.contains(&name.as_str())
                    && ishape.len() == shape.len() + 2
                    && ishape[2..] == shape[..];
                if !per_sample && (ishape.len() != shape.len() + 1 || ishape[1..] != shape[..]) {
                    let lead = if sampled.contains(&name.as_str()) {
                        "steps, samples"
                    } else {
                        "steps"
                    };
                    let want: Vec<String> = std::iter::once(lead.to_string())
                        .chain(shape.iter().map(|d| d.to_string()))
                        .collect();
                    let axes = if lead == "steps" {
                        "a leading step axis"
                    } else {
                        "leading step and sample axes"
                    };
                    return Err(Fail(format!(
                        "error: input `{name}`, tensor `{tname}`: shape {ishape:?} is not [{}] \
                         ({axes} before the tensor's shape {shape:?})",
                        want.join(", ")
                    )));
                }
                steps_avail = Some(steps_avail.map_or(ishape[0], |s: usize| s.min(ishape[0])));
                steps_max = steps_max.max(ishape[0]);
                per.push((ishape.clone(), data.clone()));
            }
            tensor_inputs.insert(name.clone(), per);
        } else if info.scalar_inputs.contains(name) {
            if let Some(extra) = tf.tensors.keys().find(|t| !info.scalar_inputs.contains(t)) {
                return Err(Fail(format!(
                    "error: input file `{}` has tensor `{extra}`, which is no scalar input of rule `{}`",
                    file.display(),
                    info.name
                )));
            }
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
            // A file cannot be read for an input the rule does not have: the runtime's error,
            // with the inputs it has.
            let e = Error::UnknownInput {
                rule: info.name.clone(),
                name: name.clone(),
            };
            return Err(Fail(format!(
                "error: {e} (inputs: {})",
                declared_inputs(&info).join(", ")
            )));
        }
    }
    let program = Arc::new(program);
    // The optimizer borrows the params (this command keeps them, to round F32 tensors of a run
    // in f64), with the file's tensor names (checkpoints name state tensors by them).
    let specs: Vec<Vec<TensorSpec>> = spaces
        .iter()
        .map(|ts| ts.iter().map(|t| TensorSpec::new(&t.0, &t.1)).collect())
        .collect();
    let mut values: Vec<Vec<Vec<T>>> = spaces
        .iter_mut()
        .map(|ts| ts.iter_mut().map(|t| std::mem::take(&mut t.2)).collect())
        .collect();
    let mut opt = args.exec.lend(Arc::clone(&program), specs)?;
    if let Some(path) = &args.state_in {
        opt.load_checkpoint(path)
            .map_err(|e| Fail(format!("error: {e}")))?;
    }
    if let Some(seed) = args.seed {
        opt.set_seed(seed);
    }
    apply_sets(&mut opt, &args.sets)?;
    let mut refined_ends: Vec<(String, u64)> = Vec::new();
    for spec in &args.schedules {
        let (n, text) = spec.split_once('=').ok_or_else(|| {
            Fail(format!(
                "error: `--schedule {spec}`: expected NAME=SCHEDULE"
            ))
        })?;
        let schedule = parse_schedule(text.trim())?;
        if text
            .rsplit(" then ")
            .next()
            .is_some_and(|t| t.trim().starts_with("refined("))
        {
            // Its last factor, eta_T = 0, would hold past the end of the log.
            refined_ends.push((n.trim().to_string(), schedule.length().unwrap_or(u64::MAX)));
        }
        opt.set_schedule(n.trim(), schedule)
            .map_err(|e| Fail(format!("error: {e}")))?;
    }
    // The runtime checks every step's inputs (names, counts, lengths, what each stage reads)
    // before it changes anything.
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
            let declared = declared_inputs(&info);
            return Err(Fail(if declared.is_empty() {
                "error: no input gives a step count; pass --steps".into()
            } else {
                format!(
                    "error: no input gives a step count; give the inputs of rule `{}` ({}) with --input NAME=FILE{}, or pass --steps",
                    info.name,
                    declared.join(", "),
                    if grads_input(&info).is_some() { " or --grads FILE" } else { "" }
                )
            }));
        }
    };
    let last_step = opt.steps() + steps as u64;
    if let Some((name, len)) = refined_ends.iter().find(|(_, len)| *len < last_step) {
        return Err(Fail(format!(
            "error: the refined schedule of `{name}` covers steps 1 to {len} (its log of gradient \
             norms), but this run ends at step {last_step}; past its end {name} would be 0"
        )));
    }
    let show = !args.quiet && std::io::stdout().is_terminal();
    let every = (steps / 10).max(1);
    if !args.quiet {
        println!(
            "rule {}: {} step(s) over {} tensor(s), {} elements",
            info.name,
            steps,
            values.iter().map(|s| s.len()).sum::<usize>(),
            values.iter().flatten().map(|t| t.len()).sum::<usize>()
        );
        println!("{:>6}  {:>14}  {:>14}", "step", "|params|", "|update|");
    }
    if !outputs.is_empty() && args.outputs.is_none() && !args.quiet {
        let mut names: Vec<&str> = outputs.iter().map(|b| b.name.as_str()).collect();
        names.extend(&scalar_outs);
        eprintln!(
            "note: rule `{}` has outputs ({}); --outputs FILE writes them",
            info.name,
            names.join(", ")
        );
    }
    // A progress bar on a terminal (stderr); hidden when piped or with --quiet.
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(steps as u64)
    };
    let round_f32 = T::BYTES == 8 && dtypes.iter().flatten().any(|&d| d == Dtype::F32);
    for step in 0..steps {
        let report =
            !args.quiet && (step + 1 == steps || (step + 1) % every == 0 || show && step < 3);
        let before: Vec<Vec<T>> = if report {
            values.iter().flatten().cloned().collect()
        } else {
            Vec::new()
        };
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
        let mut lent: Vec<Vec<&mut [T]>> = values
            .iter_mut()
            .map(|ts| ts.iter_mut().map(Vec::as_mut_slice).collect())
            .collect();
        opt.step_with(&mut lent, &inputs)
            .map_err(|e| step_failed(&info, step + 1, &e))?;
        if round_f32 {
            for (ts, ds) in values.iter_mut().zip(&dtypes) {
                for (t, &d) in ts.iter_mut().zip(ds) {
                    if d == Dtype::F32 {
                        t.iter_mut()
                            .for_each(|x| *x = T::from_f64(x.to_f64() as f32 as f64));
                    }
                }
            }
        }
        if report {
            let after = values.iter().flatten();
            let norm = after
                .clone()
                .flatten()
                .map(|x| x.to_f64().powi(2))
                .fold(0.0, |a, b| a + b)
                .sqrt();
            let upd = after
                .flatten()
                .zip(before.iter().flatten())
                .map(|(a, b)| (a.to_f64() - b.to_f64()).powi(2))
                .fold(0.0, |a, b| a + b)
                .sqrt();
            bar.suspend(|| println!("{:>6}  {:>14.6e}  {:>14.6e}", step + 1, norm, upd));
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    // Every output's bytes first, then all of them written as one transaction: an error leaves
    // every output as it was, and a crash leaves them all old or (once `recover` has run) all new.
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (s, ts) in spaces.iter().enumerate() {
        for (j, (name, shape, _)) in ts.iter().enumerate() {
            let d = dtypes[s][j];
            tensors.push((name.clone(), d, shape.clone(), to_le(&values[s][j], d)));
        }
    }
    let meta = BTreeMap::from([
        ("rule".to_string(), info.name.clone()),
        ("steps".to_string(), opt.steps().to_string()),
    ]);
    let out = tensors_bytes(&tensors, &meta)
        .map_err(|e| Fail(format!("error: cannot write `{}`: {e}", args.out.display())))?;
    let mut files: Vec<(&Path, Vec<u8>)> = vec![(&args.out, out)];
    if let Some(path) = &args.state_out {
        let bytes = opt
            .checkpoint_bytes()
            .map_err(|e| Fail(format!("error: {e}")))?;
        files.push((path, bytes));
    }
    if let Some(path) = &args.outputs {
        let mut held = Vec::new();
        for b in &outputs {
            let data = opt
                .buffer(&b.name)
                .ok_or_else(|| Fail(format!("error: cannot read output `{}`", b.name)))?;
            let space = b.space as usize;
            for (j, (tname, shape, _)) in spaces[space].iter().enumerate() {
                let d = dtypes[space][j];
                held.push((
                    format!("{}.{tname}", b.name),
                    d,
                    shape.clone(),
                    to_le(&data[j], d),
                ));
            }
        }
        for name in &scalar_outs {
            let v = opt
                .scalar_out(name)
                .ok_or_else(|| Fail(format!("error: cannot read output `{name}`")))?;
            held.push((
                name.to_string(),
                Dtype::F64,
                Vec::new(),
                v.to_le_bytes().to_vec(),
            ));
        }
        let bytes = tensors_bytes(&held, &meta)
            .map_err(|e| Fail(format!("error: cannot write `{}`: {e}", path.display())))?;
        files.push((path, bytes));
    }
    let refs: Vec<(&Path, &[u8])> = files.iter().map(|(p, b)| (*p, b.as_slice())).collect();
    write_files_atomic(&refs).map_err(|e| {
        let names: Vec<String> = files
            .iter()
            .map(|(p, _)| format!("`{}`", p.display()))
            .collect();
        Fail(format!(
            "error: cannot write {}: {e}{}",
            names.join(", "),
            if names.len() > 1 {
                " (every file is as it was)"
            } else {
                ""
            }
        ))
    })?;
    if !args.quiet {
        if opt.skipped_steps() > 0 {
            println!(
                "skipped {} step(s) with non-finite inputs",
                opt.skipped_steps()
            );
        }
        for name in &scalar_outs {
            if let Some(v) = opt.scalar_out(name) {
                println!("out {name} = {v:e}");
            }
        }
        println!("wrote {} ({} tensor(s))", args.out.display(), tensors.len());
        if let Some(path) = &args.state_out {
            println!("wrote checkpoint {} (step {})", path.display(), opt.steps());
        }
        if let Some(path) = &args.outputs {
            println!("wrote outputs {}", path.display());
        }
    }
    Ok(())
}

/// The per-element input `--grads` stands for: `g`, or the rule's only per-element input.
fn grads_input(info: &RuleInfo) -> Option<&str> {
    let names: Vec<&str> = info.inputs().map(|(_, b)| b.name.as_str()).collect();
    if names.contains(&"g") {
        Some("g")
    } else if names.len() == 1 {
        Some(names[0])
    } else {
        None
    }
}

/// The rule's inputs: per-element, then scalar.
fn declared_inputs(info: &RuleInfo) -> Vec<&str> {
    info.inputs()
        .map(|(_, b)| b.name.as_str())
        .chain(info.scalar_inputs.iter().map(String::as_str))
        .collect()
}

/// The runtime's error for step `step`, with how to give an input the rule reads.
fn step_failed(info: &RuleInfo, step: usize, e: &Error) -> Fail {
    let help = match e {
        Error::MissingInput { name, .. } => format!(
            "; give it with --input {name}=FILE{}",
            if grads_input(info) == Some(name.as_str()) {
                " or --grads FILE"
            } else {
                ""
            }
        ),
        _ => String::new(),
    };
    Fail(format!("error: step {step}: {e}{help}"))
}

/// A schedule from the command line: the text form, or `refined(FILE[, TAU[, l1]])`.
fn parse_schedule(text: &str) -> Result<optc::runtime::Schedule, Fail> {
    use optc::runtime::Schedule;
    let bad = |why: String| Fail(format!("error: schedule `{text}`: {why}"));
    // `A then B then ...`, each part the text form or `refined(FILE[, TAU[, l1|l2]])`.
    let mut parts = Vec::new();
    for part in text.split(" then ").map(str::trim) {
        let Some(args) = part.strip_prefix("refined(") else {
            parts.push(Schedule::parse(part).map_err(|e| Fail(format!("error: {e}")))?);
            continue;
        };
        let args = args
            .strip_suffix(')')
            .ok_or_else(|| bad(format!("`{part}`: missing `)`")))?;
        let args: Vec<&str> = args.split(',').map(str::trim).collect();
        if args.len() > 3 || args[0].is_empty() {
            return Err(bad(
                "refined takes a file of gradient norms, then optionally TAU and l1 or l2".into(),
            ));
        }
        let path = args[0];
        let tau = match args.get(1) {
            Some(t) => t
                .parse::<f64>()
                .ok()
                .filter(|v| (0.0..=1.0).contains(v))
                .ok_or_else(|| bad(format!("TAU `{t}` is not a number in [0, 1]")))?,
            None => 0.1,
        };
        let l1 = match args.get(2).copied() {
            None | Some("l2") => false,
            Some("l1") => true,
            Some(w) => {
                return Err(bad(format!(
                    "unknown weighting `{w}` (l1: 1/|g|, for Adam-like rules; l2: 1/|g|^2, the default)"
                )))
            }
        };
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
        parts.push(Schedule::refined(&norms, tau, l1).map_err(|e| Fail(format!("error: {e}")))?);
    }
    let mut out = parts.pop().expect("split gives at least one part");
    if let Some(open) = parts.iter().find(|s| s.length().is_none()) {
        return Err(bad(format!(
            "`{open}` never ends, so nothing can follow it with `then`"
        )));
    }
    while let Some(s) = parts.pop() {
        out = Schedule::Then(Box::new(s), Box::new(out));
    }
    Ok(out)
}
