//! `optc._optc`: the native half of the `optc` Python package.
//!
//! It compiles rules ([`Rule`]) and binds them to tensors the host owns ([`Session`]): the host
//! passes the addresses of its parameter and input tensors at every step and the rule's kernels
//! update the parameters in place, with the global interpreter lock released. The Python half
//! (`optc/__init__.py`) checks devices, dtypes, shapes and contiguity and turns a session into a
//! `torch.optim.Optimizer`; this half checks what it can see — alignment, lengths, that no
//! parameter overlaps another tensor — before it makes a slice of an address.
//!
//! Errors are raised as the classes of `optc._errors`: `RuleError` for a rule that does not
//! compile (with the rendered report, its code and span), `ConfigError` (a `ValueError`) for what
//! the host asked, `NonFiniteError` and `EngineError` (`RuntimeError`s) for what happened when
//! running. A call that fails changes nothing.

#![allow(unsafe_code)]

use optc::compiler::ir::{Axis, BufRole, Program, Ty};
use optc::compiler::ops::Float;
use optc::runtime::mixed::{bf16, f16, MixedOptimizer, MixedOptions, Rounding, Storage};
use optc::runtime::{Backend, DeviceInputs, Error, Inputs, NonFinite, Optimizer, TensorSpec};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::sync::Arc;

/// An instance of `optc._errors.<class>` built from `args`, as a Python exception.
fn raise<'py, A>(py: Python<'py>, class: &str, args: A) -> PyErr
where
    A: pyo3::call::PyCallArgs<'py>,
{
    match py
        .import("optc._errors")
        .and_then(|m| m.getattr(class))
        .and_then(|c| c.call1(args))
    {
        Ok(obj) => PyErr::from_value(obj),
        Err(e) => e,
    }
}

fn config(py: Python<'_>, msg: impl Into<String>) -> PyErr {
    raise(py, "ConfigError", (msg.into(),))
}

/// The Python exception for a runtime error.
fn runtime(py: Python<'_>, e: Error) -> PyErr {
    let class = match &e {
        Error::NonFinite { .. } => "NonFiniteError",
        Error::Jit(_) | Error::Native(_) | Error::Threads { .. } | Error::Cuda(_) => "EngineError",
        Error::Checkpoint(_) => "CheckpointError",
        _ => "ConfigError",
    };
    raise(py, class, (e.to_string(),))
}

/// Compiles rule source; `file` names it in reports. Raises `RuleError` (all diagnostics, the
/// first error's code and byte span) when it does not compile. Returns every rule it defines.
#[pyfunction]
#[pyo3(signature = (source, file = "<rule>"))]
fn compile(py: Python<'_>, source: &str, file: &str) -> PyResult<Vec<Rule>> {
    let c = optc::compile(source);
    if c.has_errors() {
        let report = optc::render(&c.diagnostics, source, file, false);
        let diags: Vec<(String, String, String, usize, usize)> = c
            .diagnostics
            .iter()
            .map(|d| {
                (
                    if d.is_error() { "error" } else { "warning" }.to_string(),
                    d.code.to_string(),
                    d.message.clone(),
                    d.primary.span.start,
                    d.primary.span.end,
                )
            })
            .collect();
        return Err(raise(py, "RuleError", (report, diags)));
    }
    let warnings = if c.diagnostics.is_empty() {
        String::new()
    } else {
        optc::render(&c.diagnostics, source, file, false)
    };
    Ok(c.programs
        .into_iter()
        .map(|p| Rule {
            program: Arc::new(p),
            source: source.to_string(),
            warnings: warnings.clone(),
        })
        .collect())
}

/// The source of a standard-library rule, or None.
#[pyfunction]
fn stdlib_source(name: &str) -> Option<&'static str> {
    optc::stdlib::source(name)
}

/// The names of the standard library's rules, sorted.
#[pyfunction]
fn stdlib_names() -> Vec<&'static str> {
    optc::stdlib::names().collect()
}

/// The data addresses of torch tensors (`item.<attr>` when `attr` is given), or None when one
/// is missing (None), or is not of `dtype`, on `device` (None: the CPU), of its shape in
/// `shapes`, or contiguous: the caller then finds which and says why. Checks a tensor in a few
/// attribute lookups, without the interpreter's overhead.
#[pyfunction]
#[pyo3(signature = (items, attr, dtype, device, shapes))]
fn torch_addrs(
    py: Python<'_>,
    items: Vec<Bound<'_, PyAny>>,
    attr: Option<&str>,
    dtype: &Bound<'_, PyAny>,
    device: Option<&Bound<'_, PyAny>>,
    shapes: Vec<Bound<'_, PyAny>>,
) -> PyResult<Option<Vec<usize>>> {
    if items.len() != shapes.len() {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(items.len());
    for (item, shape) in items.iter().zip(&shapes) {
        let t = match attr {
            Some(a) => item.getattr(a)?,
            None => item.clone(),
        };
        if t.is_none() || !t.getattr(pyo3::intern!(py, "dtype"))?.is(dtype) {
            return Ok(None);
        }
        let on_device = match device {
            None => t.getattr(pyo3::intern!(py, "is_cpu"))?.is_truthy()?,
            Some(d) => t.getattr(pyo3::intern!(py, "device"))?.eq(d)?,
        };
        if !on_device
            || !t.getattr(pyo3::intern!(py, "shape"))?.eq(shape)?
            || !t
                .call_method0(pyo3::intern!(py, "is_contiguous"))?
                .is_truthy()?
        {
            return Ok(None);
        }
        out.push(
            t.call_method0(pyo3::intern!(py, "data_ptr"))?
                .extract::<usize>()?,
        );
    }
    Ok(Some(out))
}

/// A compiled rule: its interface (hyperparameters, params, inputs, state, stages).
#[pyclass(frozen, module = "optc._optc")]
#[derive(Debug)]
struct Rule {
    program: Arc<Program>,
    source: String,
    warnings: String,
}

impl Rule {
    /// The interface with the rule's axis (per-sample inputs, per-particle scalars), if it has one.
    fn axis_info(&self) -> &optc::compiler::ir::RuleInfo {
        match &self.program.axis_form {
            Some((a, _)) => &a.info,
            None => &self.program.info,
        }
    }
}

#[pymethods]
impl Rule {
    #[getter]
    fn name(&self) -> &str {
        &self.program.info.name
    }
    #[getter]
    fn doc(&self) -> &str {
        &self.program.info.doc
    }
    #[getter]
    fn source(&self) -> &str {
        &self.source
    }
    /// Warnings the compiler reported, rendered ("" when there are none).
    #[getter]
    fn warnings(&self) -> &str {
        &self.warnings
    }
    /// `(name, is_bool, default, doc, range)` per hyperparameter, in declaration order; `range`
    /// is `(lo, lo_closed, hi, hi_closed)` or None.
    #[getter]
    #[allow(clippy::type_complexity)]
    fn hypers(&self) -> Vec<(String, bool, f64, String, Option<(f64, bool, f64, bool)>)> {
        self.program
            .info
            .hypers
            .iter()
            .map(|h| {
                (
                    h.name.clone(),
                    h.ty == Ty::Bool,
                    h.default,
                    h.doc.clone(),
                    h.range.map(|r| (r.lo, r.lo_closed, r.hi, r.hi_closed)),
                )
            })
            .collect()
    }
    /// The params (one space each), in order.
    #[getter]
    fn spaces(&self) -> Vec<String> {
        self.program.info.spaces.clone()
    }
    /// `(name, role, space, per_sample)` per per-element buffer; role is "param", "input",
    /// "state" or "output".
    #[getter]
    fn buffers(&self) -> Vec<(String, &'static str, usize, bool)> {
        let axis = self.axis_info();
        self.program
            .info
            .buffers
            .iter()
            .map(|b| {
                let per_sample = axis.axis == Some(Axis::Samples)
                    && axis
                        .buffers
                        .iter()
                        .any(|a| a.name == b.name && a.axis && a.role == BufRole::Input);
                let role = match b.role {
                    BufRole::Param => "param",
                    BufRole::Input => "input",
                    BufRole::State => "state",
                    BufRole::Output => "output",
                };
                (b.name.clone(), role, b.space as usize, per_sample)
            })
            .collect()
    }
    /// `(name, per_particle)` per scalar input.
    #[getter]
    fn scalar_inputs(&self) -> Vec<(String, bool)> {
        let axis = self.axis_info();
        if self.program.axis_form.is_some() {
            return axis
                .scalar_inputs
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), axis.axis_scalars.contains(&(i as u16))))
                .collect();
        }
        axis.scalar_inputs
            .iter()
            .map(|n| (n.clone(), false))
            .collect()
    }
    /// Scalar state names (scalar outputs included).
    #[getter]
    fn scalar_states(&self) -> Vec<String> {
        self.program.info.scalar_states.clone()
    }
    /// Scalar output names (`out NAME = <scalar>`).
    #[getter]
    fn scalar_outs(&self) -> Vec<String> {
        let info = &self.program.info;
        info.scalar_outs
            .iter()
            .map(|&i| info.scalar_states[i as usize].clone())
            .collect()
    }
    /// Stage names (`step` for a rule without stages).
    #[getter]
    fn stages(&self) -> Vec<String> {
        self.program.info.stages.clone()
    }
    /// "samples", "particles" or None.
    #[getter]
    fn axis(&self) -> Option<&'static str> {
        match self.axis_info().axis {
            Some(Axis::Samples) => Some("samples"),
            Some(Axis::Particles) => Some("particles"),
            None => None,
        }
    }
    /// The per-element outputs stage `k` writes.
    fn stage_outputs(&self, k: usize) -> Vec<String> {
        let info = &self.program.info;
        let mut out: Vec<String> = Vec::new();
        for v in &self.program.variants {
            if let Some(stage) = v.stages.get(k) {
                for &(b, _) in &stage.stores {
                    let bi = &info.buffers[b as usize];
                    if bi.role == BufRole::Output && !out.contains(&bi.name) {
                        out.push(bi.name.clone());
                    }
                }
            }
        }
        out
    }
    fn __repr__(&self) -> String {
        format!("<optc.Rule {}>", self.program.info.name)
    }
}

/// The optimizer of a session, by how its params are stored.
#[derive(Debug)]
enum Inner {
    F32(Optimizer<f32>),
    F64(Optimizer<f64>),
    Bf16(MixedOptimizer<bf16>),
    F16(MixedOptimizer<f16>),
}

impl Inner {
    /// The optimizer that holds hyperparameters, groups and counters.
    fn hp(&self) -> Hp<'_> {
        match self {
            Inner::F32(o) => Hp::F32(o),
            Inner::F64(o) => Hp::F64(o),
            Inner::Bf16(m) => Hp::F32(m.inner()),
            Inner::F16(m) => Hp::F32(m.inner()),
        }
    }
    fn hp_mut(&mut self) -> HpMut<'_> {
        match self {
            Inner::F32(o) => HpMut::F32(o),
            Inner::F64(o) => HpMut::F64(o),
            Inner::Bf16(m) => HpMut::F32(m.inner_mut()),
            Inner::F16(m) => HpMut::F32(m.inner_mut()),
        }
    }
}

enum Hp<'a> {
    F32(&'a Optimizer<f32>),
    F64(&'a Optimizer<f64>),
}
enum HpMut<'a> {
    F32(&'a mut Optimizer<f32>),
    F64(&'a mut Optimizer<f64>),
}

/// Runs `$body` with `$o` bound to the f32 or f64 optimizer.
macro_rules! with_hp {
    ($hp:expr, $o:ident => $body:expr) => {
        match $hp {
            Hp::F32($o) => $body,
            Hp::F64($o) => $body,
        }
    };
}
macro_rules! with_hp_mut {
    ($hp:expr, $o:ident => $body:expr) => {
        match $hp {
            HpMut::F32($o) => $body,
            HpMut::F64($o) => $body,
        }
    };
}

/// The per-element inputs of a step: name, the address of one tensor per param tensor of its
/// space.
type TensorInputs = Vec<(String, Vec<usize>)>;

/// The per-element inputs of a step with the number of elements of each tensor.
type SizedInputs = Vec<(String, Vec<(usize, usize)>)>;

/// A rule bound to the host's tensors (registered by name and shape), with its state.
#[pyclass(module = "optc._optc")]
#[derive(Debug)]
struct Session {
    inner: Inner,
    /// Elements of each registered tensor, `[space][tensor]`.
    lens: Vec<Vec<usize>>,
    /// Bytes per element of the params.
    elem: usize,
    /// Bytes per element of the state and outputs the session reports.
    state_elem: usize,
    /// The params' sorted byte ranges at the last step (checked disjoint then).
    checked: Vec<(usize, usize)>,
    /// The params' addresses at the last step.
    last: Vec<Vec<usize>>,
    /// Per-element inputs by name: their space, and whether they hold samples.
    inputs: std::collections::HashMap<String, (usize, bool)>,
}

fn backend_of(engine: &str, threads: usize) -> Result<Backend, String> {
    let threads = threads.max(1);
    Ok(match engine {
        "auto" => Backend::Auto { threads },
        "native" => Backend::Native { threads },
        "cranelift" => Backend::Cranelift { threads },
        "interpreter" | "interp" => Backend::Interpreter,
        "cuda" => Backend::Cuda { device: 0 },
        "cuda-emulator" => Backend::CudaEmulator,
        other => {
            if let Some(d) = other.strip_prefix("cuda:") {
                let device = d
                    .parse()
                    .map_err(|_| format!("bad CUDA device in engine `{other}`"))?;
                Backend::Cuda { device }
            } else {
                return Err(format!(
                    "unknown engine `{other}` (auto, native, cranelift, interpreter, cuda, cuda:N, cuda-emulator)"
                ));
            }
        }
    })
}

/// # Safety
/// `addr` must point at `n` readable elements of `T` that nothing writes while the slice lives.
unsafe fn slice<'a, T>(addr: usize, n: usize) -> &'a [T] {
    if n == 0 {
        &[]
    } else {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts(addr as *const T, n) }
    }
}

/// # Safety
/// `addr` must point at `n` writable elements of `T` that nothing else reads or writes while the
/// slice lives.
unsafe fn slice_mut<'a, T>(addr: usize, n: usize) -> &'a mut [T] {
    if n == 0 {
        &mut []
    } else {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(addr as *mut T, n) }
    }
}

/// The host's params and inputs of a step as slices, with its scalar inputs.
///
/// # Safety
/// `Session::check` verified that each address is non-null and aligned and that no param
/// overlaps another param or an input; the Python caller keeps the tensors alive and untouched
/// for the call; lengths are the registered ones (params) or the tensor's own (inputs).
unsafe fn lend<'a, T>(
    lens: &[Vec<usize>],
    params: &[Vec<usize>],
    tensors: &SizedInputs,
    scalars: &[(String, f64)],
    particles: &[(String, Vec<f64>)],
    samples: Option<usize>,
) -> (Vec<Vec<&'a mut [T]>>, Inputs<'a, T>) {
    let ps = params
        .iter()
        .zip(lens)
        .map(|(ps, ls)| {
            ps.iter()
                .zip(ls)
                // SAFETY: the caller's contract.
                .map(|(&p, &n)| unsafe { slice_mut::<T>(p, n) })
                .collect()
        })
        .collect();
    let mut inputs = Inputs::default();
    for (name, ts) in tensors {
        // SAFETY: the caller's contract.
        let data = ts
            .iter()
            .map(|&(p, n)| unsafe { slice::<T>(p, n) })
            .collect();
        inputs = inputs.tensor(name, data);
    }
    for (name, v) in scalars {
        inputs = inputs.scalar(name, *v);
    }
    for (name, vs) in particles {
        inputs = inputs.per_particle(name, vs);
    }
    if let Some(n) = samples {
        inputs = inputs.with_samples(n);
    }
    (ps, inputs)
}

#[allow(clippy::too_many_arguments)] // one per part of a step; a struct would only rename them
fn host_step<T: Float + Default>(
    o: &mut Optimizer<T>,
    lens: &[Vec<usize>],
    params: &[Vec<usize>],
    tensors: &SizedInputs,
    scalars: &[(String, f64)],
    particles: &[(String, Vec<f64>)],
    stage: Option<usize>,
    samples: Option<usize>,
) -> Result<(), Error> {
    // SAFETY: `Session::step` checked the addresses (see `lend`).
    let (mut ps, inputs) = unsafe { lend::<T>(lens, params, tensors, scalars, particles, samples) };
    match stage {
        None => o.step_with(&mut ps, &inputs),
        Some(k) => o.run_stage_with(k, &mut ps, &inputs),
    }
}

fn mixed_step<S: Storage>(
    m: &mut MixedOptimizer<S>,
    lens: &[Vec<usize>],
    params: &[Vec<usize>],
    tensors: &SizedInputs,
    scalars: &[(String, f64)],
    particles: &[(String, Vec<f64>)],
) -> Result<(), Error> {
    // SAFETY: `Session::step` checked the addresses (see `lend`).
    let (mut ps, inputs) = unsafe { lend::<S>(lens, params, tensors, scalars, particles, None) };
    m.step_with(&mut ps, &inputs)
}

/// A buffer's tensors as one little-endian byte string, with each tensor's length.
fn bytes_of<T: Copy>(tensors: &[Vec<T>]) -> (Vec<usize>, Vec<u8>) {
    let mut out = Vec::with_capacity(tensors.iter().map(Vec::len).sum::<usize>() * 8);
    let lens = tensors.iter().map(Vec::len).collect();
    for t in tensors {
        // SAFETY: `T` is f32 or f64 (plain old data, no padding); the byte view covers exactly
        // the vector's initialized elements and lives only for this copy.
        let b = unsafe {
            std::slice::from_raw_parts(t.as_ptr().cast::<u8>(), std::mem::size_of_val(&t[..]))
        };
        out.extend_from_slice(b);
    }
    (lens, out)
}

#[pymethods]
impl Session {
    /// Binds `rule` to tensors `tensors[space] = [(name, shape), ...]` stored as `dtype`
    /// ("float32", "float64", "bfloat16", "float16"; 16-bit params compute in f32).
    #[new]
    #[pyo3(signature = (rule, dtype, tensors, engine = "auto", threads = 1, master_weights = false, bf16_state = false, stochastic_rounding = false, seed = None, non_finite = "proceed"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        rule: &Rule,
        dtype: &str,
        tensors: Vec<Vec<(String, Vec<usize>)>>,
        engine: &str,
        threads: usize,
        master_weights: bool,
        bf16_state: bool,
        stochastic_rounding: bool,
        seed: Option<u64>,
        non_finite: &str,
    ) -> PyResult<Self> {
        let backend = backend_of(engine, threads).map_err(|e| config(py, e))?;
        let policy = match non_finite {
            "proceed" => NonFinite::Proceed,
            "skip" => NonFinite::Skip,
            "error" => NonFinite::Error,
            other => {
                return Err(config(
                    py,
                    format!("unknown non_finite policy `{other}` (proceed, skip, error)"),
                ))
            }
        };
        let lens: Vec<Vec<usize>> = tensors
            .iter()
            .map(|ts| ts.iter().map(|(_, s)| s.iter().product()).collect())
            .collect();
        let specs: Vec<Vec<TensorSpec>> = tensors
            .iter()
            .map(|ts| ts.iter().map(|(n, s)| TensorSpec::new(n, s)).collect())
            .collect();
        let program = Arc::clone(&rule.program);
        let sixteen = matches!(dtype, "bfloat16" | "float16");
        if !sixteen && (master_weights || bf16_state || stochastic_rounding) {
            return Err(config(
                py,
                "master_weights, bf16_state and stochastic_rounding are for bfloat16 and float16 params",
            ));
        }
        let options = MixedOptions {
            master_weights,
            bf16_state,
            rounding: if stochastic_rounding {
                Rounding::Stochastic {
                    seed: seed.unwrap_or(optc::runtime::DEFAULT_SEED),
                }
            } else {
                Rounding::Nearest
            },
        };
        let err = |e: Error| runtime(py, e);
        let (inner, elem, state_elem) = py
            .detach(|| -> Result<_, Error> {
                Ok(match dtype {
                    "float32" => {
                        let o = Optimizer::<f32>::lending(program, specs)?
                            .with_backend(backend)?
                            .with_non_finite(policy)?;
                        (Inner::F32(o), 4, 4)
                    }
                    "float64" => {
                        let o = Optimizer::<f64>::lending(program, specs)?
                            .with_backend(backend)?
                            .with_non_finite(policy)?;
                        (Inner::F64(o), 8, 8)
                    }
                    "bfloat16" => {
                        let m = MixedOptimizer::<bf16>::new(program, specs, options)?
                            .with_backend(backend)?
                            .with_non_finite(policy)?;
                        (Inner::Bf16(m), 2, 4)
                    }
                    "float16" => {
                        let m = MixedOptimizer::<f16>::new(program, specs, options)?
                            .with_backend(backend)?
                            .with_non_finite(policy)?;
                        (Inner::F16(m), 2, 4)
                    }
                    other => {
                        return Err(Error::Params(format!(
                            "unsupported dtype `{other}` (float32, float64, bfloat16, float16)"
                        )))
                    }
                })
            })
            .map_err(err)?;
        let mut s = Session {
            inner,
            lens,
            elem,
            state_elem,
            checked: Vec::new(),
            last: Vec::new(),
            inputs: rule
                .buffers()
                .into_iter()
                .filter(|b| b.1 == "input")
                .map(|(name, _, space, per_sample)| (name, (space, per_sample)))
                .collect(),
        };
        if let Some(seed) = seed {
            with_hp_mut!(s.inner.hp_mut(), o => o.set_seed(seed));
        }
        Ok(s)
    }

    /// Starts a parameter group of the named tensors with its own hyperparameter values;
    /// returns its number (group 0 holds the tensors of no other group).
    fn add_group(
        &mut self,
        py: Python<'_>,
        tensors: Vec<String>,
        values: Vec<(String, f64)>,
    ) -> PyResult<usize> {
        let names: Vec<&str> = tensors.iter().map(String::as_str).collect();
        let values: Vec<(&str, f64)> = values.iter().map(|(n, v)| (n.as_str(), *v)).collect();
        with_hp_mut!(self.inner.hp_mut(), o => o.add_group(&names, &values))
            .map_err(|e| runtime(py, e))
    }

    /// Sets a hyperparameter of a group (0: the base value every group without its own follows).
    fn set_hyper(&mut self, py: Python<'_>, group: usize, name: &str, value: f64) -> PyResult<()> {
        with_hp_mut!(self.inner.hp_mut(), o => o.set_group_hyper(group, name, value))
            .map_err(|e| runtime(py, e))
    }

    /// A group's value of a hyperparameter.
    fn hyper(&self, group: usize, name: &str) -> Option<f64> {
        with_hp!(self.inner.hp(), o => o.group_hyper(group, name))
    }

    /// The hyperparameters that must be equal in every group (the rule's scalar state reads them).
    fn shared_hypers(&self) -> Vec<String> {
        with_hp!(self.inner.hp(), o => o.shared_hypers().into_iter().map(String::from).collect())
    }

    /// Completed steps.
    #[getter]
    fn steps(&self) -> u64 {
        with_hp!(self.inner.hp(), o => o.steps())
    }

    /// Steps skipped for non-finite inputs (non_finite="skip").
    #[getter]
    fn skipped_steps(&self) -> u64 {
        with_hp!(self.inner.hp(), o => o.skipped_steps())
    }

    /// The seed of the rule's random draws.
    #[getter]
    fn seed(&self) -> u64 {
        with_hp!(self.inner.hp(), o => o.seed())
    }

    #[setter]
    fn set_seed(&mut self, seed: u64) {
        with_hp_mut!(self.inner.hp_mut(), o => o.set_seed(seed))
    }

    /// The engine that runs the kernels.
    #[getter]
    fn engine(&self) -> String {
        let b = with_hp!(self.inner.hp(), o => o.backend());
        match b {
            Backend::Interpreter => "interpreter".into(),
            Backend::Cranelift { threads } => format!("cranelift ({threads} threads)"),
            Backend::Native { threads } => format!("native ({threads} threads)"),
            Backend::Auto { threads } => format!("auto ({threads} threads)"),
            Backend::Cuda { device } => format!("cuda:{device}"),
            Backend::CudaEmulator => "cuda-emulator".into(),
        }
    }

    /// `(name, value)` of every scalar state (scalar outputs included).
    fn scalar_states(&self) -> Vec<(String, f64)> {
        with_hp!(self.inner.hp(), o => {
            o.program()
                .info
                .scalar_states
                .iter()
                .map(|n| (n.clone(), o.scalar_state(n).unwrap_or(f64::NAN)))
                .collect()
        })
    }

    /// Runs the rest of the step (`stage=None`) or stage `stage`: `params[space]` are the
    /// addresses of the registered tensors, `tensors` the per-element inputs as
    /// `(name, [(address, elements), ...])`, then scalar inputs, per-particle scalar inputs, and
    /// the number of samples of sample-axis inputs given in a later stage.
    #[pyo3(signature = (params, tensors, scalars, particles, stage = None, samples = None))]
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        py: Python<'_>,
        params: Vec<Vec<usize>>,
        tensors: TensorInputs,
        scalars: Vec<(String, f64)>,
        particles: Vec<(String, Vec<f64>)>,
        stage: Option<usize>,
        samples: Option<usize>,
    ) -> PyResult<()> {
        let tensors = self.sized(tensors, samples).map_err(|e| config(py, e))?;
        self.check(&params, &tensors).map_err(|e| config(py, e))?;
        let lens = &self.lens;
        let r = py.detach(|| match &mut self.inner {
            Inner::F32(o) => host_step(
                o, lens, &params, &tensors, &scalars, &particles, stage, samples,
            ),
            Inner::F64(o) => host_step(
                o, lens, &params, &tensors, &scalars, &particles, stage, samples,
            ),
            Inner::Bf16(m) => match stage {
                None => mixed_step(m, lens, &params, &tensors, &scalars, &particles),
                Some(_) => Err(Error::Params(
                    "16-bit params run whole steps only (the rule has stages)".into(),
                )),
            },
            Inner::F16(m) => match stage {
                None => mixed_step(m, lens, &params, &tensors, &scalars, &particles),
                Some(_) => Err(Error::Params(
                    "16-bit params run whole steps only (the rule has stages)".into(),
                )),
            },
        });
        r.map_err(|e| runtime(py, e))
    }

    /// A step on the CUDA engine with params and inputs in device memory: `params[space]` and
    /// each input's tensors are device addresses (their lengths are the registered ones; the
    /// caller checked devices, dtypes and shapes).
    #[pyo3(signature = (params, tensors, scalars, samples = None))]
    fn step_device(
        &mut self,
        py: Python<'_>,
        params: Vec<Vec<u64>>,
        tensors: Vec<(String, Vec<u64>)>,
        scalars: Vec<(String, f64)>,
        samples: Option<usize>,
    ) -> PyResult<()> {
        let mut inputs = DeviceInputs::default();
        for (name, ts) in tensors {
            inputs = inputs.tensor(&name, ts);
        }
        for (name, v) in scalars {
            inputs = inputs.scalar(&name, v);
        }
        if let Some(n) = samples {
            inputs = inputs.samples(n);
        }
        let r = py.detach(|| match &mut self.inner {
            // SAFETY: the Python caller passes the data addresses of live, contiguous CUDA
            // tensors of the registered lengths and dtype on this optimizer's device, params
            // distinct from each other and the inputs, and synchronizes the streams around
            // the call.
            Inner::F32(o) => unsafe { o.step_device(Some(&params), &inputs) },
            Inner::F64(o) => unsafe { o.step_device(Some(&params), &inputs) },
            _ => Err(Error::Params(
                "16-bit CUDA params are not supported; use float32 or float64".into(),
            )),
        });
        r.map_err(|e| runtime(py, e))
    }

    /// The values of per-element state or output `name`: `(lengths, bytes)`, the tensors one
    /// after the other, little-endian, in the session's state dtype (f32 for 16-bit params).
    fn read<'py>(
        &self,
        py: Python<'py>,
        name: &str,
    ) -> PyResult<(Vec<usize>, Bound<'py, PyBytes>)> {
        let missing = || config(py, format!("no per-element state or output `{name}`"));
        let (lens, bytes) = match &self.inner {
            Inner::F32(o) => bytes_of(o.buffer(name).ok_or_else(missing)?),
            Inner::F64(o) => bytes_of(o.buffer(name).ok_or_else(missing)?),
            Inner::Bf16(m) => bytes_of(
                &m.state(name)
                    .or_else(|| m.inner().buffer(name).map(<[Vec<f32>]>::to_vec))
                    .ok_or_else(missing)?,
            ),
            Inner::F16(m) => bytes_of(
                &m.state(name)
                    .or_else(|| m.inner().buffer(name).map(<[Vec<f32>]>::to_vec))
                    .ok_or_else(missing)?,
            ),
        };
        Ok((lens, PyBytes::new(py, &bytes)))
    }

    /// Bytes per element of what `read` returns.
    #[getter]
    fn state_itemsize(&self) -> usize {
        self.state_elem
    }

    /// The whole state (state tensors, step counter, scalar state, seed, hyperparameters and
    /// groups) as bytes: an optc checkpoint (safetensors).
    fn checkpoint<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let b = match &self.inner {
            Inner::F32(o) => o.checkpoint_bytes(),
            Inner::F64(o) => o.checkpoint_bytes(),
            Inner::Bf16(m) => m.checkpoint_bytes(),
            Inner::F16(m) => m.checkpoint_bytes(),
        }
        .map_err(|e| runtime(py, e))?;
        Ok(PyBytes::new(py, &b))
    }

    /// Loads what `checkpoint` returned (for the same rule and tensors); validated first, so
    /// on an error nothing changes.
    fn load_checkpoint(&mut self, py: Python<'_>, bytes: &[u8]) -> PyResult<()> {
        match &mut self.inner {
            Inner::F32(o) => o.load_checkpoint_bytes(bytes),
            Inner::F64(o) => o.load_checkpoint_bytes(bytes),
            Inner::Bf16(m) => m.load_checkpoint_bytes(bytes),
            Inner::F16(m) => m.load_checkpoint_bytes(bytes),
        }
        .map_err(|e| runtime(py, e))
    }
}

impl Session {
    /// Checks the addresses of a step: counts, non-null and aligned addresses, and that no
    /// param overlaps another param or an input.
    /// The inputs with each tensor's number of elements: its param tensor's, times the number
    /// of samples for a per-sample input.
    fn sized(&self, tensors: TensorInputs, samples: Option<usize>) -> Result<SizedInputs, String> {
        tensors
            .into_iter()
            .map(|(name, addrs)| {
                let Some(&(space, per_sample)) = self.inputs.get(&name) else {
                    // Unknown names are the runtime's to report; they have no tensors to size.
                    return Ok((name, addrs.into_iter().map(|a| (a, 0)).collect()));
                };
                let times = if per_sample {
                    samples.ok_or_else(|| {
                        format!("per-sample input `{name}` given without its number of samples")
                    })?
                } else {
                    1
                };
                let lens = &self.lens[space];
                if addrs.len() != lens.len() {
                    return Err(format!(
                        "input `{name}`: expected {} tensors, got {}",
                        lens.len(),
                        addrs.len()
                    ));
                }
                let sized = addrs
                    .into_iter()
                    .zip(lens)
                    .map(|(a, &n)| {
                        n.checked_mul(times)
                            .map(|n| (a, n))
                            .ok_or_else(|| format!("input `{name}` is too large"))
                    })
                    .collect::<Result<_, String>>()?;
                Ok((name, sized))
            })
            .collect()
    }

    fn check(&mut self, params: &[Vec<usize>], tensors: &SizedInputs) -> Result<(), String> {
        if params.len() != self.lens.len() {
            return Err(format!(
                "expected tensors for {} param(s), got {}",
                self.lens.len(),
                params.len()
            ));
        }
        for (space, (ps, ls)) in params.iter().zip(&self.lens).enumerate() {
            if ps.len() != ls.len() {
                return Err(format!(
                    "param {space}: expected {} tensors, got {}",
                    ls.len(),
                    ps.len()
                ));
            }
        }
        let align = |addr: usize, n: usize, elem: usize, what: &str| {
            if n > 0 && (addr == 0 || !addr.is_multiple_of(elem)) {
                Err(format!(
                    "{what} is at a null or misaligned address {addr:#x}"
                ))
            } else {
                Ok(())
            }
        };
        if self.last.as_slice() != params {
            let mut ranges = Vec::new();
            for (ps, ls) in params.iter().zip(&self.lens) {
                for (&p, &n) in ps.iter().zip(ls) {
                    align(p, n, self.elem, "a parameter")?;
                    if n > 0 {
                        ranges.push((p, p + n * self.elem));
                    }
                }
            }
            ranges.sort_unstable();
            if ranges.windows(2).any(|w| w[1].0 < w[0].1) {
                return Err("two parameters share memory: each must have its own".into());
            }
            self.checked = ranges;
            self.last = params.to_vec();
        }
        let input_elem = match self.inner {
            Inner::F64(_) => 8,
            Inner::F32(_) => 4,
            _ => 2,
        };
        for (name, ts) in tensors {
            for &(p, n) in ts {
                align(p, n, input_elem, &format!("input `{name}`"))?;
                if n == 0 {
                    continue;
                }
                let end = p + n * input_elem;
                // The first param range that ends after this input starts.
                let i = self.checked.partition_point(|r| r.1 <= p);
                if self.checked.get(i).is_some_and(|r| r.0 < end) {
                    return Err(format!(
                        "input `{name}` shares memory with a parameter the step writes"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The native half of the `optc` package.
#[pymodule]
fn _optc(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(compile, m)?)?;
    m.add_function(wrap_pyfunction!(stdlib_source, m)?)?;
    m.add_function(wrap_pyfunction!(stdlib_names, m)?)?;
    m.add_function(wrap_pyfunction!(torch_addrs, m)?)?;
    m.add_class::<Rule>()?;
    m.add_class::<Session>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
