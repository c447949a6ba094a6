//! The optc runtime: owns a compiled rule's buffers, optimizer state, scalar state, step counter
//! and hyperparameter values, and runs its stages over the host's tensors.
//!
//! Every call checks its inputs first and returns an [`Error`] without touching any parameter or
//! state; a stage that starts always completes.
//!
//! Kernels run on the reference interpreter or, with [`Backend::Cranelift`], as machine code on a
//! thread pool ([`jit`]). The JIT module is the only place with unsafe code.

use optc_compiler::backend::interp::{Buffers, StepEnv, StepRun};
use optc_compiler::ir::{BufRole, Kind, Node, NodeId, Program, Ty};
use optc_compiler::ops::Float;
use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

pub mod checkpoint;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod device;
#[cfg(feature = "cuda")]
pub mod emulator;
#[cfg(feature = "cuda")]
pub mod gpu;
#[cfg(not(feature = "cuda"))]
mod gpu {
    //! Without the `cuda` feature: host buffers are always the current ones.
    use optc_compiler::backend::interp::Buffers;
    use optc_compiler::ops::Float;

    #[derive(Debug, Clone, Default)]
    pub(crate) struct GpuSlot<T>(std::marker::PhantomData<T>);

    impl<T: Float> GpuSlot<T> {
        pub(crate) fn host<'a>(
            &'a self,
            bufs: &'a Buffers<T>,
            b: usize,
        ) -> Result<&'a Vec<Vec<T>>, std::convert::Infallible> {
            Ok(&bufs[b])
        }
        pub(crate) fn forget(&mut self, _b: usize) {}
    }
}
#[cfg(feature = "cuda")]
pub use gpu::DeviceInputs;
pub mod jit;
pub mod mixed;
pub mod schedule;
pub use jit::JitProgram;
use optc_compiler::backend::clif::Precision;
use optc_compiler::passes::finite::is_guard;
use optc_compiler::passes::runnable;
use optc_compiler::passes::specialize::Decisions;
pub use schedule::Schedule;

/// What can go wrong when driving a rule.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    /// A hyperparameter name the rule does not declare.
    #[error("rule `{rule}` has no hyperparameter `{name}` (it has: {known})")]
    UnknownHyper {
        /// The rule.
        rule: String,
        /// The name given.
        name: String,
        /// The names it has.
        known: String,
    },
    /// A value that is not finite, or not 0/1 for a boolean.
    #[error("bad value {value} for hyperparameter `{name}`: {why}")]
    BadHyper {
        /// The hyperparameter.
        name: String,
        /// The value given.
        value: f64,
        /// Why it is rejected.
        why: &'static str,
    },
    /// An input held an infinity or a NaN (policy [`NonFinite::Error`]); nothing was changed.
    #[error("non-finite values in the inputs of rule `{rule}`; the step was not taken")]
    NonFinite {
        /// The rule.
        rule: String,
    },
    /// A setting the rule cannot support.
    #[error("{0}")]
    Policy(String),
    /// A value outside the range the rule declares for the hyperparameter.
    #[error("{name} = {value} is out of range: rule declares {name} in {range}")]
    OutOfRange {
        /// The hyperparameter.
        name: String,
        /// The value given.
        value: f64,
        /// The declared range.
        range: String,
    },
    /// The tensors of a space do not match what the optimizer was built with.
    #[error("{what}: expected {expected} elements, got {got}")]
    Length {
        /// Which buffer and tensor.
        what: String,
        /// Elements expected.
        expected: usize,
        /// Elements given.
        got: usize,
    },
    /// An input the stage reads was not given.
    #[error("stage `{stage}` of rule `{rule}` needs input `{name}`")]
    MissingInput {
        /// The rule.
        rule: String,
        /// The stage.
        stage: String,
        /// The input.
        name: String,
    },
    /// A name given as input that the rule does not declare as an input.
    #[error("rule `{rule}` has no input `{name}`")]
    UnknownInput {
        /// The rule.
        rule: String,
        /// The name given.
        name: String,
    },
    /// Stages must run in order.
    #[error("stage {got} run out of order: the next stage is {expected} (`{name}`)")]
    StageOrder {
        /// The stage expected next.
        expected: usize,
        /// Its name.
        name: String,
        /// The stage asked for.
        got: usize,
    },
    /// A checkpoint could not be written or read, or does not fit this optimizer.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// The Cranelift backend could not compile the rule.
    #[error("{0}")]
    Jit(#[from] jit::JitError),
    /// A thread pool could not be started.
    #[error("cannot start {threads} threads: {why}")]
    Threads {
        /// Threads asked for.
        threads: usize,
        /// Why not.
        why: String,
    },
    /// The CUDA backend: no driver or GPU, a compile error, a failed launch or copy.
    #[cfg(feature = "cuda")]
    #[error("{0}")]
    Cuda(#[from] cuda::CudaError),
    /// A tensor name this optimizer does not have.
    #[error("no parameter tensor named `{0}`")]
    UnknownTensor(String),
    /// A parameter-group request that cannot be honoured.
    #[error("parameter groups: {0}")]
    Group(String),
    /// Params lent to an optimizer that owns its own, or not lent to one that borrows them.
    #[error("{0}")]
    Params(String),
    /// Params given at construction are not one list per param of the rule.
    #[error("rule `{rule}` has {expected} param(s), got tensors for {got}")]
    Spaces {
        /// The rule.
        rule: String,
        /// Params it has.
        expected: usize,
        /// Lists given.
        got: usize,
    },
}

/// Inputs of one stage: per-element inputs by name (one array per tensor) and scalar inputs by name.
#[derive(Debug, Clone)]
pub struct Inputs<'a, T> {
    /// Per-element inputs.
    pub tensors: HashMap<String, Vec<&'a [T]>>,
    /// Scalar inputs.
    pub scalars: HashMap<String, f64>,
}

impl<T> Default for Inputs<'_, T> {
    fn default() -> Self {
        Inputs {
            tensors: HashMap::new(),
            scalars: HashMap::new(),
        }
    }
}

impl<'a, T> Inputs<'a, T> {
    /// Adds a per-element input.
    pub fn tensor(mut self, name: &str, data: Vec<&'a [T]>) -> Self {
        self.tensors.insert(name.to_string(), data);
        self
    }
    /// Adds a scalar input.
    pub fn scalar(mut self, name: &str, v: f64) -> Self {
        self.scalars.insert(name.to_string(), v);
        self
    }
}

/// A parameter tensor registered with an optimizer: its name and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// The name (unique within the optimizer).
    pub name: String,
    /// The shape; the tensor holds the product of its dimensions (1 for a 0-d tensor).
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// A named tensor of this shape.
    pub fn new(name: impl Into<String>, shape: &[usize]) -> Self {
        TensorSpec {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }

    /// Its number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A tensor given for an input: host data (its length is checked) or a device address (its length
/// is the caller's contract).
pub(crate) trait GivenTensor {
    /// Its number of elements, when known.
    fn elems(&self) -> Option<usize>;
}

impl<T> GivenTensor for &[T] {
    fn elems(&self) -> Option<usize> {
        Some(self.len())
    }
}

impl<T> GivenTensor for &mut [T] {
    fn elems(&self) -> Option<usize> {
        Some(self.len())
    }
}

impl GivenTensor for u64 {
    fn elems(&self) -> Option<usize> {
        None
    }
}

/// What each stage reads from the host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StageNeeds {
    /// Per-element inputs (buffer ids).
    pub tensors: BTreeSet<u16>,
    /// Scalar inputs (indices).
    pub scalars: BTreeSet<u16>,
}

/// A rule bound to a set of tensors: parameters, state, step counter and hyperparameters.
#[derive(Debug, Clone)]
pub struct Optimizer<T: Float> {
    program: Arc<Program>,
    hypers: Vec<f64>,
    /// Completed steps.
    steps: u64,
    scalar_states: Vec<f64>,
    bufs: Buffers<T>,
    lens: Vec<Vec<usize>>,
    /// The registered tensors, `[space][tensor]`.
    tensors: Vec<Vec<TensorSpec>>,
    /// Whether the host lends the params at each step (they are not stored in `bufs`).
    lent: bool,
    /// Hyperparameter overrides of parameter groups 1, 2, ... (`None`: follows group 0).
    groups: Vec<Vec<Option<f64>>>,
    /// The group of each tensor, `[space][tensor]` (0 unless assigned).
    tensor_groups: Vec<Vec<usize>>,
    /// The values of groups 1, 2, ... in the current (or next) step.
    effective_groups: Vec<Vec<f64>>,
    /// Stage to run next (0 between steps).
    next_stage: usize,
    pending: HashMap<NodeId, Vec<f64>>,
    pending_scalars: HashMap<u16, f64>,
    /// Schedules by hyperparameter index.
    schedules: Vec<Option<Schedule>>,
    /// The values the current (or next) step uses: base values times their schedules' factors.
    effective: Vec<f64>,
    /// Hyperparameter decisions the rule's kernels can be specialized on.
    decisions: Decisions,
    /// Specializations compiled so far, by decision outcomes.
    cache: HashMap<Vec<Option<bool>>, Arc<Active>>,
    /// The specialization the current step runs.
    active: Arc<Active>,
    engine: Backend,
    /// The GPU side on [`Backend::Cuda`] (device buffers, host copies downloaded on access).
    gpu: gpu::GpuSlot<T>,
    pool: Option<Arc<rayon::ThreadPool>>,
    policy: NonFinite,
    skipped: u64,
}

/// The rule specialized for one set of hyperparameter decisions, ready to run.
#[derive(Debug)]
struct Active {
    key: Vec<Option<bool>>,
    program: Arc<Program>,
    /// Compiled kernels on the Cranelift backend (the interpreter runs `program` otherwise).
    jit: Option<Arc<JitProgram>>,
    /// Compiled and loaded kernels on the CUDA backend.
    #[cfg(feature = "cuda")]
    gpu: Option<Arc<device::GpuProgram>>,
    needs: [Vec<StageNeeds>; 2],
    /// Guard reductions (non-finite inputs) of stage 0, phase 0, per variant.
    guards: [Vec<NodeId>; 2],
}

impl Active {
    /// `sets` holds the hyperparameter values of each parameter group (group 0 first): the
    /// program is specialized on the decisions they all agree on.
    fn build(
        base: &Arc<Program>,
        decisions: &Decisions,
        sets: &[&[f64]],
        engine: Backend,
        precision: Precision,
        policy: NonFinite,
        #[cfg(feature = "cuda")] (dev, storage): (
            Option<&Arc<device::Device>>,
            &optc_compiler::backend::cuda::StorageMap,
        ),
    ) -> Result<Active, Error> {
        let key = decision_key(decisions, base, sets);
        let program = match runnable(base, decisions, sets, policy != NonFinite::Proceed) {
            Cow::Borrowed(_) => Arc::clone(base),
            Cow::Owned(p) => Arc::new(p),
        };
        let guards = [0, 1].map(|v| {
            program.variants[v].stages[0]
                .phases
                .first()
                .map(|ph| {
                    ph.kernels
                        .iter()
                        .flat_map(|k| k.reductions.iter().map(|r| r.0))
                        .filter(|&r| is_guard(&program, r))
                        .collect()
                })
                .unwrap_or_default()
        });
        let jit = match engine {
            Backend::Cranelift { .. } => Some(Arc::new(JitProgram::compile(&program, precision)?)),
            _ => None,
        };
        #[cfg(feature = "cuda")]
        if engine.is_cuda() && !storage.is_native() {
            if let Some(b) = optc_compiler::backend::cuda::rounded_then_reloaded(&program, storage)
            {
                return Err(Error::Policy(format!(
                    "rule `{}` reads `{}` again after storing it within a step, so its 16-bit \
                     storage cannot be fused into the GPU kernels; run it on a CPU backend",
                    program.info.name, program.info.buffers[b as usize].name
                )));
            }
        }
        #[cfg(feature = "cuda")]
        let gpu = match (engine, dev) {
            (Backend::Cuda { .. } | Backend::CudaEmulator, Some(dev)) => Some(Arc::new(
                device::GpuProgram::compile(&program, precision, dev, storage)?,
            )),
            (Backend::Cuda { .. } | Backend::CudaEmulator, None) => {
                return Err(Error::Cuda(cuda::CudaError::DriverMissing(
                    "no GPU opened".into(),
                )))
            }
            _ => None,
        };
        let needs = [needs_of(&program, 0), needs_of(&program, 1)];
        Ok(Active {
            key,
            program,
            jit,
            #[cfg(feature = "cuda")]
            gpu,
            needs,
            guards,
        })
    }
}

/// What a step does when an input (a gradient) holds an infinity or a NaN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NonFinite {
    /// Run the step anyway (the default; the values propagate as IEEE arithmetic says).
    #[default]
    Proceed,
    /// Skip the step: parameters, state and the step counter stay as they were; the skip is counted.
    Skip,
    /// Return [`Error::NonFinite`], with nothing changed.
    Error,
}

/// Which engine runs a rule's kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The reference interpreter (the oracle; slow).
    Interpreter,
    /// Cranelift machine code on `threads` threads (1: the calling thread only).
    Cranelift {
        /// Worker threads.
        threads: usize,
    },
    /// CUDA kernels on GPU `device` (compiled by NVRTC for its architecture); params (when
    /// owned), state and outputs in device memory. See [`gpu`].
    #[cfg(feature = "cuda")]
    Cuda {
        /// The CUDA device ordinal.
        device: usize,
    },
    /// The CUDA backend with the CUDA emulator ([`emulator`]) as its device: the same generated
    /// kernels, launch tables and host logic as [`Backend::Cuda`], built by the host's C++
    /// compiler and run on the CPU one block at a time. For testing the GPU path where there is
    /// no GPU; slow.
    #[cfg(feature = "cuda")]
    CudaEmulator,
}

impl Backend {
    /// Whether this backend runs on a CUDA device ([`Backend::Cuda`] or the emulator).
    pub fn is_cuda(self) -> bool {
        #[cfg(feature = "cuda")]
        if matches!(self, Backend::Cuda { .. } | Backend::CudaEmulator) {
            return true;
        }
        false
    }
}

/// Which specialization serves these groups' values: each decision's outcome where every group
/// agrees, `None` where they differ (that decision stays in the program).
fn decision_key(decisions: &Decisions, p: &Program, sets: &[&[f64]]) -> Vec<Option<bool>> {
    let keys: Vec<Vec<bool>> = sets.iter().map(|h| decisions.key(p, h)).collect();
    (0..decisions.len())
        .map(|i| {
            keys.iter()
                .all(|k| k[i] == keys[0][i])
                .then_some(keys[0][i])
        })
        .collect()
}

/// The hyperparameters the scalar-state updates read (they cannot differ between groups).
fn scalar_state_hypers(p: &Program) -> BTreeSet<u16> {
    let mut out = BTreeSet::new();
    let mut seen = BTreeSet::new();
    let mut stack: Vec<NodeId> = p
        .variants
        .iter()
        .flat_map(|v| v.scalar_updates.iter().map(|u| u.1))
        .collect();
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        match p.graph.node(id) {
            Node::Hyper(h) => {
                out.insert(h);
            }
            // A reduction's elements may use each tensor's own group values.
            Node::Reduce { .. } => {}
            node => stack.extend(node.children()),
        }
    }
    out
}

fn needs_of(p: &Program, variant: usize) -> Vec<StageNeeds> {
    let v = &p.variants[variant];
    let mut out = Vec::new();
    for (k, s) in v.stages.iter().enumerate() {
        let mut n = StageNeeds::default();
        let mut roots: Vec<NodeId> = Vec::new();
        for ph in &s.phases {
            for kern in &ph.kernels {
                roots.extend(kern.body.iter().copied());
                roots.extend(kern.uniforms.iter().copied());
            }
        }
        if k + 1 == v.stages.len() {
            roots.extend(v.scalar_updates.iter().map(|u| u.1));
        }
        let mut seen = BTreeSet::new();
        while let Some(id) = roots.pop() {
            if !seen.insert(id) {
                continue;
            }
            match p.graph.node(id) {
                Node::Load { buf, .. } if p.info.buffers[buf as usize].role == BufRole::Input => {
                    n.tensors.insert(buf);
                }
                Node::ScalarInput(i) => {
                    n.scalars.insert(i);
                }
                // A reduction's argument was read by the stage that computed it.
                Node::Reduce { .. } => {}
                node => roots.extend(node.children()),
            }
        }
        out.push(n);
    }
    out
}

impl<T: Float + Default> Optimizer<T> {
    /// Binds a compiled rule to tensors: `params[space]` lists the initial values of each tensor of
    /// that param. States start zero-filled; hyperparameters at their defaults.
    pub fn new(program: Arc<Program>, params: Vec<Vec<Vec<T>>>) -> Result<Self, Error> {
        let info = &program.info;
        if params.len() != info.spaces.len() {
            return Err(Error::Spaces {
                rule: info.name.clone(),
                expected: info.spaces.len(),
                got: params.len(),
            });
        }
        let tensors: Vec<Vec<TensorSpec>> = params
            .iter()
            .zip(&info.spaces)
            .map(|(ts, space)| {
                ts.iter()
                    .enumerate()
                    .map(|(j, t)| TensorSpec::new(format!("{space}[{j}]"), &[t.len()]))
                    .collect()
            })
            .collect();
        Self::build(program, tensors, Some(params))
    }

    /// Binds a compiled rule to named tensors of any shape, `tensors[space]` for each param of
    /// the rule, whose buffers the host keeps: it lends them to every step
    /// ([`Optimizer::step_with`]). The optimizer owns the state (zero-filled), the step counter and
    /// the hyperparameter values.
    ///
    /// ```
    /// use optc_runtime::{Inputs, Optimizer, TensorSpec};
    /// # let src = "rule sgd(lr = 0.1) { param theta\n input g\n theta = theta - lr * g }";
    /// # let program = std::sync::Arc::new(optc_compiler::compile(src).programs.remove(0));
    /// let mut opt = Optimizer::<f32>::lending(
    ///     program,
    ///     vec![vec![TensorSpec::new("w", &[2, 2]), TensorSpec::new("b", &[2])]],
    /// )?;
    /// let (mut w, mut b) = (vec![1.0f32; 4], vec![0.0f32; 2]);
    /// let (gw, gb) = (vec![1.0f32; 4], vec![-1.0f32; 2]);
    /// opt.step_with(
    ///     &mut [vec![&mut w[..], &mut b[..]]],
    ///     &Inputs::default().tensor("g", vec![&gw, &gb]),
    /// )?;
    /// assert_eq!(w, [0.9; 4]);
    /// assert_eq!(b, [0.1; 2]);
    /// # Ok::<(), optc_runtime::Error>(())
    /// ```
    pub fn lending(program: Arc<Program>, tensors: Vec<Vec<TensorSpec>>) -> Result<Self, Error> {
        Self::build(program, tensors, None)
    }

    fn build(
        program: Arc<Program>,
        tensors: Vec<Vec<TensorSpec>>,
        params: Option<Vec<Vec<Vec<T>>>>,
    ) -> Result<Self, Error> {
        let info = &program.info;
        if tensors.len() != info.spaces.len() {
            return Err(Error::Spaces {
                rule: info.name.clone(),
                expected: info.spaces.len(),
                got: tensors.len(),
            });
        }
        let mut names = BTreeSet::new();
        for t in tensors.iter().flatten() {
            if !names.insert(t.name.as_str()) {
                return Err(Error::Params(format!("two tensors are named `{}`", t.name)));
            }
        }
        let lens: Vec<Vec<usize>> = tensors
            .iter()
            .map(|ts| ts.iter().map(TensorSpec::numel).collect())
            .collect();
        let lent = params.is_none();
        let mut params = params
            .unwrap_or_else(|| vec![Vec::new(); tensors.len()])
            .into_iter();
        let bufs = info
            .buffers
            .iter()
            .map(|b| match b.role {
                BufRole::Param => params.next().unwrap_or_default(),
                BufRole::Input => Vec::new(),
                _ => lens[b.space as usize]
                    .iter()
                    .map(|&n| vec![T::default(); n])
                    .collect(),
            })
            .collect();
        let decisions = Decisions::of(&program);
        let hypers: Vec<f64> = info.hypers.iter().map(|h| h.default).collect();
        let active = Arc::new(Active::build(
            &program,
            &decisions,
            &[&hypers],
            Backend::Interpreter,
            Self::precision(),
            NonFinite::Proceed,
            #[cfg(feature = "cuda")]
            (None, &Default::default()),
        )?);
        Ok(Optimizer {
            schedules: vec![None; hypers.len()],
            effective: hypers.clone(),
            hypers,
            scalar_states: vec![0.0; info.scalar_states.len()],
            steps: 0,
            bufs,
            tensor_groups: lens.iter().map(|l| vec![0; l.len()]).collect(),
            lens,
            tensors,
            lent,
            groups: Vec::new(),
            effective_groups: Vec::new(),
            next_stage: 0,
            pending: HashMap::new(),
            pending_scalars: HashMap::new(),
            decisions,
            cache: HashMap::from([(active.key.clone(), Arc::clone(&active))]),
            active,
            program,
            engine: Backend::Interpreter,
            gpu: Default::default(),
            pool: None,
            policy: NonFinite::Proceed,
            skipped: 0,
        })
    }

    fn precision() -> Precision {
        if T::BYTES == 4 {
            Precision::F32
        } else {
            Precision::F64
        }
    }

    /// Builds the specialization for the current hyperparameter values, backend and policy.
    fn build_active(&self) -> Result<Arc<Active>, Error> {
        let a = Active::build(
            &self.program,
            &self.decisions,
            &self.value_sets(),
            self.engine,
            Self::precision(),
            self.policy,
            #[cfg(feature = "cuda")]
            (self.gpu.dev.as_ref(), &self.gpu.storage),
        )?;
        Ok(Arc::new(a))
    }

    /// Rebuilds the active specialization after a setting changed, dropping the cached ones.
    fn reset_active(&mut self) -> Result<(), Error> {
        let active = self.build_active()?;
        self.cache = HashMap::from([(active.key.clone(), Arc::clone(&active))]);
        self.active = active;
        Ok(())
    }

    /// Makes the specialization for the current hyperparameter values active (compiling it the
    /// first time those decisions are seen). Called at the start of each step.
    fn activate(&mut self) -> Result<(), Error> {
        let t = self.steps + 1;
        let effective = self.scheduled(&self.hypers, t)?;
        let mut groups = Vec::with_capacity(self.groups.len());
        for overrides in &self.groups {
            let base: Vec<f64> = overrides
                .iter()
                .zip(&self.hypers)
                .map(|(o, &v)| o.unwrap_or(v))
                .collect();
            groups.push(self.scheduled(&base, t)?);
        }
        self.effective = effective;
        self.effective_groups = groups;
        let key = decision_key(&self.decisions, &self.program, &self.value_sets());
        if key == self.active.key {
            return Ok(());
        }
        let active = match self.cache.get(&key) {
            Some(a) => Arc::clone(a),
            None => {
                let a = self.build_active()?;
                self.cache.insert(key, Arc::clone(&a));
                a
            }
        };
        self.active = active;
        Ok(())
    }

    /// Base values times their schedules' factors at step `t`, each checked against its range.
    fn scheduled(&self, base: &[f64], t: u64) -> Result<Vec<f64>, Error> {
        let mut out = base.to_vec();
        for (h, s) in self.schedules.iter().enumerate() {
            if let Some(s) = s {
                let v = base[h] * s.factor(t);
                if !v.is_finite() {
                    return Err(Error::BadHyper {
                        name: self.program.info.hypers[h].name.clone(),
                        value: v,
                        why: "its schedule gives a value that is not finite",
                    });
                }
                if let Some(range) = self.program.info.hypers[h].range {
                    if !range.contains(v) {
                        return Err(Error::OutOfRange {
                            name: self.program.info.hypers[h].name.clone(),
                            value: v,
                            range: range.to_string(),
                        });
                    }
                }
                out[h] = v;
            }
        }
        Ok(out)
    }

    /// The effective values of every group, group 0 first.
    fn value_sets(&self) -> Vec<&[f64]> {
        std::iter::once(self.effective.as_slice())
            .chain(self.effective_groups.iter().map(Vec::as_slice))
            .collect()
    }

    /// Switches to another backend (compiling the rule for it); state and step count are kept.
    ///
    /// [`Backend::Cuda`] opens the GPU (an [`Error::Cuda`] without a driver or GPU) and compiles
    /// the kernels for it with NVRTC; see [`gpu`] for where values live. Leaving it downloads
    /// the device's values first.
    pub fn with_backend(mut self, backend: Backend) -> Result<Self, Error> {
        #[cfg(feature = "cuda")]
        match backend {
            Backend::Cuda { .. } | Backend::CudaEmulator => self.open_gpu(backend)?,
            _ => {
                self.gpu.sync(&mut self.bufs)?;
                self.gpu.release();
                self.gpu.dev = None;
            }
        }
        self.engine = backend;
        self.reset_active()?;
        match backend {
            #[cfg(feature = "cuda")]
            Backend::Cuda { .. } | Backend::CudaEmulator => self.pool = None,
            Backend::Interpreter => self.pool = None,
            Backend::Cranelift { threads } => {
                self.pool = if threads > 1 {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .map_err(|e| Error::Threads {
                            threads,
                            why: e.to_string(),
                        })?;
                    Some(Arc::new(pool))
                } else {
                    None
                };
            }
        }
        Ok(self)
    }

    /// Turns specialization on hyperparameter decisions on (the default) or off. Off, every
    /// step runs the general program: options that are switched off still cost their traffic.
    pub fn with_specialization(mut self, on: bool) -> Result<Self, Error> {
        self.decisions = if on {
            Decisions::of(&self.program)
        } else {
            Decisions::none()
        };
        self.reset_active()?;
        Ok(self)
    }

    /// Sets what a step does with non-finite inputs. `Skip` and `Error` decide before anything is
    /// written: the check joins a pass that already reads the inputs before the update (a clipping
    /// norm) for free, or costs one read of the inputs. Rules with several stages support `Proceed` only.
    pub fn with_non_finite(mut self, policy: NonFinite) -> Result<Self, Error> {
        if policy != NonFinite::Proceed && self.program.info.stages.len() > 1 {
            return Err(Error::Policy(format!(
                "rule `{}` has several stages; a non-finite input found in a later stage could not undo the earlier ones",
                self.program.info.name
            )));
        }
        self.policy = policy;
        self.reset_active()?;
        Ok(self)
    }

    /// Steps skipped because of non-finite inputs (policy [`NonFinite::Skip`]).
    pub fn skipped_steps(&self) -> u64 {
        self.skipped
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.engine
    }

    /// The compiled kernels, on the Cranelift backend.
    pub fn jit(&self) -> Option<&JitProgram> {
        self.active.jit.as_deref()
    }

    /// The program the current step runs: the rule specialized for the hyperparameter decisions
    /// (`amsgrad`, `max_grad_norm > 0`, ...) of the current values.
    pub fn active_program(&self) -> &Program {
        &self.active.program
    }

    /// The compiled rule.
    pub fn program(&self) -> &Program {
        &self.program
    }

    /// Completed steps.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The index of a hyperparameter, or the error naming the ones the rule has.
    fn hyper_index(&self, name: &str) -> Result<usize, Error> {
        let info = &self.program.info;
        info.hyper(name).ok_or_else(|| Error::UnknownHyper {
            rule: info.name.clone(),
            name: name.to_string(),
            known: info
                .hypers
                .iter()
                .map(|h| h.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Sets a hyperparameter (booleans as 0/1) for group 0 and every group that does not override it.
    pub fn set_hyper(&mut self, name: &str, value: f64) -> Result<(), Error> {
        let h = self.check_value(name, value)?;
        self.hypers[h] = value;
        Ok(())
    }

    /// The index of hyperparameter `name` if `value` is acceptable for it.
    fn check_value(&self, name: &str, value: f64) -> Result<usize, Error> {
        let h = self.hyper_index(name)?;
        let info = &self.program.info;
        if !value.is_finite() {
            return Err(Error::BadHyper {
                name: name.to_string(),
                value,
                why: "not a finite number",
            });
        }
        if let Some(range) = info.hypers[h].range {
            if !range.contains(value) {
                return Err(Error::OutOfRange {
                    name: name.to_string(),
                    value,
                    range: range.to_string(),
                });
            }
        }
        if info.hypers[h].ty == Ty::Bool && value != 0.0 && value != 1.0 {
            return Err(Error::BadHyper {
                name: name.to_string(),
                value,
                why: "a boolean is true (1) or false (0)",
            });
        }
        Ok(h)
    }

    /// Starts a parameter group holding the named tensors (taken out of the groups they were in),
    /// with its own values for some hyperparameters; the others follow group 0 (the values of
    /// [`Optimizer::set_hyper`]). Returns the group's number (groups count from 1; group 0 holds
    /// every tensor not assigned elsewhere). Schedules scale every group's value.
    ///
    /// Reductions over all tensors (a global gradient norm) still span every group; each tensor
    /// updates with its own group's values. A hyperparameter that scalar state reads cannot differ
    /// between groups.
    ///
    /// ```
    /// use optc_runtime::{Inputs, Optimizer, TensorSpec};
    /// # let src = "rule sgdw(lr = 0.1, wd = 0.5) { param theta\n input g\n theta = theta - lr * (g + wd * theta) }";
    /// # let program = std::sync::Arc::new(optc_compiler::compile(src).programs.remove(0));
    /// let mut opt = Optimizer::<f64>::lending(
    ///     program,
    ///     vec![vec![TensorSpec::new("weight", &[3]), TensorSpec::new("bias", &[1])]],
    /// )?;
    /// let no_decay = opt.add_group(&["bias"], &[("wd", 0.0)])?;
    /// assert_eq!(opt.group_hyper(no_decay, "wd"), Some(0.0));
    /// let (mut w, mut b) = (vec![1.0; 3], vec![1.0]);
    /// let g = vec![0.0; 3];
    /// opt.step_with(&mut [vec![&mut w[..], &mut b[..]]], &Inputs::default().tensor("g", vec![&g, &[0.0]]))?;
    /// assert_eq!(w, [0.95; 3]); // decayed
    /// assert_eq!(b, [1.0]); // not decayed
    /// # Ok::<(), optc_runtime::Error>(())
    /// ```
    pub fn add_group(&mut self, tensors: &[&str], values: &[(&str, f64)]) -> Result<usize, Error> {
        let mut overrides = vec![None; self.hypers.len()];
        let fixed = scalar_state_hypers(&self.program);
        for &(name, v) in values {
            let h = self.check_value(name, v)?;
            if fixed.contains(&(h as u16)) {
                return Err(Error::Group(format!(
                    "`{name}` feeds the rule's scalar state, which all groups share; it cannot differ between groups"
                )));
            }
            overrides[h] = Some(v);
        }
        let mut places = Vec::new();
        for &name in tensors {
            places.push(
                self.tensor_index(name)
                    .ok_or_else(|| Error::UnknownTensor(name.to_string()))?,
            );
        }
        self.groups.push(overrides);
        let g = self.groups.len();
        for (space, j) in places {
            self.tensor_groups[space][j] = g;
        }
        Ok(g)
    }

    /// Sets a hyperparameter of one group (group 0: as [`Optimizer::set_hyper`]).
    pub fn set_group_hyper(&mut self, group: usize, name: &str, value: f64) -> Result<(), Error> {
        if group == 0 {
            return self.set_hyper(name, value);
        }
        if group > self.groups.len() {
            return Err(Error::Group(format!(
                "there is no group {group} (groups: 0 to {})",
                self.groups.len()
            )));
        }
        let h = self.check_value(name, value)?;
        if scalar_state_hypers(&self.program).contains(&(h as u16)) {
            return Err(Error::Group(format!(
                "`{name}` feeds the rule's scalar state, which all groups share; it cannot differ between groups"
            )));
        }
        self.groups[group - 1][h] = Some(value);
        Ok(())
    }

    /// The (base) value of a hyperparameter in a group.
    pub fn group_hyper(&self, group: usize, name: &str) -> Option<f64> {
        let h = self.program.info.hyper(name)?;
        match group {
            0 => Some(self.hypers[h]),
            g => self
                .groups
                .get(g - 1)
                .map(|o| o[h].unwrap_or(self.hypers[h])),
        }
    }

    /// The number of parameter groups, group 0 included.
    pub fn group_count(&self) -> usize {
        self.groups.len() + 1
    }

    /// The group a tensor belongs to.
    pub fn group_of(&self, tensor: &str) -> Option<usize> {
        let (space, j) = self.tensor_index(tensor)?;
        Some(self.tensor_groups[space][j])
    }

    /// Where a named tensor is: its param space and index within it.
    pub fn tensor_index(&self, name: &str) -> Option<(usize, usize)> {
        self.tensors
            .iter()
            .enumerate()
            .find_map(|(space, ts)| ts.iter().position(|t| t.name == name).map(|j| (space, j)))
    }

    /// The tensors registered for param `space`.
    pub fn tensors(&self, space: usize) -> &[TensorSpec] {
        &self.tensors[space]
    }

    /// Schedules a hyperparameter: each step uses its base value (see [`Optimizer::set_hyper`])
    /// times the schedule's factor at that step.
    pub fn set_schedule(&mut self, name: &str, schedule: Schedule) -> Result<(), Error> {
        let h = self.hyper_index(name)?;
        let info = &self.program.info;
        if info.hypers[h].ty == Ty::Bool {
            return Err(Error::BadHyper {
                name: name.to_string(),
                value: self.hypers[h],
                why: "a boolean cannot follow a schedule",
            });
        }
        self.schedules[h] = Some(schedule);
        Ok(())
    }

    /// Removes a hyperparameter's schedule.
    pub fn clear_schedule(&mut self, name: &str) {
        if let Some(h) = self.program.info.hyper(name) {
            self.schedules[h] = None;
        }
    }

    /// The schedules, by hyperparameter name.
    pub fn schedules(&self) -> Vec<(String, Schedule)> {
        self.schedules
            .iter()
            .enumerate()
            .filter_map(|(h, s)| {
                s.clone()
                    .map(|s| (self.program.info.hypers[h].name.clone(), s))
            })
            .collect()
    }

    /// The value a hyperparameter had in the last step (its base value times its schedule).
    pub fn effective_hyper(&self, name: &str) -> Option<f64> {
        self.program.info.hyper(name).map(|h| self.effective[h])
    }

    /// Current (base) value of a hyperparameter.
    pub fn hyper(&self, name: &str) -> Option<f64> {
        self.program.info.hyper(name).map(|h| self.hypers[h])
    }

    /// The tensors of a per-element buffer (param, state or output) by name.
    ///
    /// On [`Backend::Cuda`] the first call after a step downloads the buffer (`None` if that
    /// fails; [`Optimizer::sync_host`] reports why).
    pub fn buffer(&self, name: &str) -> Option<&[Vec<T>]> {
        let b = self.program.info.buffer(name)?;
        self.gpu
            .host(&self.bufs, b as usize)
            .ok()
            .map(Vec::as_slice)
    }

    /// A scalar state by name.
    pub fn scalar_state(&self, name: &str) -> Option<f64> {
        let i = self
            .program
            .info
            .scalar_states
            .iter()
            .position(|s| s == name)?;
        Some(self.scalar_states[i])
    }

    /// The tensors of param `space` (empty for an optimizer built with [`Optimizer::lending`],
    /// whose params the host keeps).
    ///
    /// On [`Backend::Cuda`] the first call after a step downloads them (an empty list if that
    /// fails; [`Optimizer::sync_host`] reports why).
    pub fn params(&self, space: usize) -> &[Vec<T>] {
        self.gpu
            .host(&self.bufs, space)
            .map_or(&[][..], Vec::as_slice)
    }

    /// What stage `k` reads from the host in the coming step.
    pub fn stage_needs(&self, k: usize) -> &StageNeeds {
        &self.active.needs[usize::from(self.steps > 0)][k]
    }

    /// Runs the rest of the current step (every remaining stage, with the same inputs). The
    /// inputs of all those stages are checked before any of them runs.
    pub fn step(&mut self, inputs: &Inputs<'_, T>) -> Result<(), Error> {
        self.step_inner(None, inputs)
    }

    /// [`Optimizer::step`] for an optimizer built with [`Optimizer::lending`]: `params[space]`
    /// are the host's tensors of each param, in registration order, updated in place.
    pub fn step_with(
        &mut self,
        params: &mut [Vec<&mut [T]>],
        inputs: &Inputs<'_, T>,
    ) -> Result<(), Error> {
        self.step_inner(Some(params), inputs)
    }

    /// [`Optimizer::run_stage`] for an optimizer built with [`Optimizer::lending`].
    pub fn run_stage_with(
        &mut self,
        k: usize,
        params: &mut [Vec<&mut [T]>],
        inputs: &Inputs<'_, T>,
    ) -> Result<(), Error> {
        self.run_stage_inner(k, Some(params), inputs)
    }

    /// Checks that params are lent exactly when the optimizer borrows them, with the registered lengths.
    fn check_params(&self, params: Option<&[Vec<&mut [T]>]>) -> Result<(), Error> {
        self.check_lent(
            params,
            "lend them with step_with / run_stage_with",
            "call step / run_stage",
        )
    }

    /// [`Self::check_params`] over params given as host data or as device addresses; `lend` and
    /// `own` say what to do instead when they are missing or not expected.
    pub(crate) fn check_lent<L: GivenTensor>(
        &self,
        params: Option<&[Vec<L>]>,
        lend: &str,
        own: &str,
    ) -> Result<(), Error> {
        let ps = match (self.lent, params) {
            (false, None) => return Ok(()),
            (true, None) => {
                return Err(Error::Params(format!(
                    "this optimizer borrows its params (Optimizer::lending): {lend}"
                )))
            }
            (false, Some(_)) => {
                return Err(Error::Params(format!(
                    "this optimizer owns its params (Optimizer::new): {own}"
                )))
            }
            (true, Some(ps)) => ps,
        };
        if ps.len() != self.tensors.len() {
            return Err(Error::Spaces {
                rule: self.program.info.name.clone(),
                expected: self.tensors.len(),
                got: ps.len(),
            });
        }
        for (space, (given, specs)) in ps.iter().zip(&self.tensors).enumerate() {
            if given.len() != specs.len() {
                return Err(Error::Length {
                    what: format!(
                        "param `{}` (number of tensors)",
                        self.program.info.spaces[space]
                    ),
                    expected: specs.len(),
                    got: given.len(),
                });
            }
            for (d, spec) in given.iter().zip(specs) {
                match d.elems() {
                    Some(got) if got != spec.numel() => {
                        return Err(Error::Length {
                            what: format!("tensor `{}` of shape {:?}", spec.name, spec.shape),
                            expected: spec.numel(),
                            got,
                        })
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn step_inner(
        &mut self,
        mut params: Option<&mut [Vec<&mut [T]>]>,
        inputs: &Inputs<'_, T>,
    ) -> Result<(), Error> {
        self.check_params(params.as_deref())?;
        if self.next_stage == 0 {
            self.activate()?;
        }
        // Check every remaining stage first; each check gives the scalar inputs its stage sees.
        let mut checked = Vec::new();
        let mut scalars = self.pending_scalars.clone();
        for k in self.next_stage..self.program.info.stages.len() {
            scalars = self.check_stage(k, inputs, &scalars)?;
            checked.push((k, scalars.clone()));
        }
        for (k, scalars) in checked {
            if !self.exec_stage(k, params.as_deref_mut(), inputs, scalars)? {
                return self.non_finite();
            }
        }
        Ok(())
    }

    /// After a stage stopped on non-finite inputs: count the skip, or report it.
    fn non_finite(&mut self) -> Result<(), Error> {
        match self.policy {
            NonFinite::Error => Err(Error::NonFinite {
                rule: self.program.info.name.clone(),
            }),
            _ => {
                self.skipped += 1;
                Ok(())
            }
        }
    }

    /// Runs stage `k` of the current step. Inputs the stage does not read are ignored; names the
    /// rule does not declare are errors.
    pub fn run_stage(&mut self, k: usize, inputs: &Inputs<'_, T>) -> Result<(), Error> {
        self.run_stage_inner(k, None, inputs)
    }

    fn run_stage_inner(
        &mut self,
        k: usize,
        params: Option<&mut [Vec<&mut [T]>]>,
        inputs: &Inputs<'_, T>,
    ) -> Result<(), Error> {
        self.check_params(params.as_deref())?;
        if k != self.next_stage {
            let info = &self.program.info;
            return Err(Error::StageOrder {
                expected: self.next_stage,
                name: info.stages[self.next_stage].clone(),
                got: k,
            });
        }
        if k == 0 {
            self.activate()?;
        }
        let scalars = self.check_stage(k, inputs, &self.pending_scalars)?;
        if !self.exec_stage(k, params, inputs, scalars)? {
            return self.non_finite();
        }
        Ok(())
    }

    /// Checks the inputs of stage `k`; returns the scalar inputs it will see (those given earlier in
    /// the step, updated by `inputs`).
    fn check_stage(
        &self,
        k: usize,
        inputs: &Inputs<'_, T>,
        pending: &HashMap<u16, f64>,
    ) -> Result<HashMap<u16, f64>, Error> {
        self.check_given(k, &inputs.tensors, &inputs.scalars, pending)
    }

    /// [`Self::check_stage`] over inputs given as host data or as device addresses.
    pub(crate) fn check_given<L: GivenTensor>(
        &self,
        k: usize,
        tensors: &HashMap<String, Vec<L>>,
        given_scalars: &HashMap<String, f64>,
        pending: &HashMap<u16, f64>,
    ) -> Result<HashMap<u16, f64>, Error> {
        let info = &self.program.info;
        for name in tensors.keys() {
            if !matches!(
                info.buffer(name).map(|b| info.buffers[b as usize].role),
                Some(BufRole::Input)
            ) {
                return Err(Error::UnknownInput {
                    rule: info.name.clone(),
                    name: name.clone(),
                });
            }
        }
        for name in given_scalars.keys() {
            if !info.scalar_inputs.contains(name) {
                return Err(Error::UnknownInput {
                    rule: info.name.clone(),
                    name: name.clone(),
                });
            }
        }
        let needs = self.stage_needs(k).clone();
        let missing = |name: &str| Error::MissingInput {
            rule: info.name.clone(),
            stage: info.stages[k].clone(),
            name: name.to_string(),
        };
        let mut scalars = pending.clone();
        for (i, name) in info.scalar_inputs.iter().enumerate() {
            if let Some(&v) = given_scalars.get(name) {
                scalars.insert(i as u16, v);
            }
        }
        for &i in &needs.scalars {
            if !scalars.contains_key(&i) {
                return Err(missing(&info.scalar_inputs[i as usize]));
            }
        }
        for &b in &needs.tensors {
            let bi = &info.buffers[b as usize];
            let Some(data) = tensors.get(&bi.name) else {
                return Err(missing(&bi.name));
            };
            let lens = &self.lens[bi.space as usize];
            if data.len() != lens.len() {
                return Err(Error::Length {
                    what: format!("input `{}` (number of tensors)", bi.name),
                    expected: lens.len(),
                    got: data.len(),
                });
            }
            for (j, (d, &n)) in data.iter().zip(lens).enumerate() {
                match d.elems() {
                    Some(got) if got != n => {
                        return Err(Error::Length {
                            what: format!("input `{}`, tensor {j}", bi.name),
                            expected: n,
                            got,
                        })
                    }
                    _ => {}
                }
            }
        }
        Ok(scalars)
    }

    /// Runs stage `k`, whose inputs [`Self::check_stage`] accepted. Cannot fail on the CPU
    /// backends; on the GPU a driver error is an [`Error::Cuda`].
    #[allow(unsafe_code)] // calls JIT kernels over the buffers this optimizer owns
    /// Returns false when the guard found non-finite inputs after the first phase (nothing written).
    fn exec_stage(
        &mut self,
        k: usize,
        mut params: Option<&mut [Vec<&mut [T]>]>,
        inputs: &Inputs<'_, T>,
        scalars: HashMap<u16, f64>,
    ) -> Result<bool, Error> {
        #[cfg(feature = "cuda")]
        if self.engine.is_cuda() {
            return self.exec_stage_cuda(k, gpu::Source::Host { params, inputs }, scalars);
        }
        let active = Arc::clone(&self.active);
        let prog = Arc::clone(&active.program);
        let info = &prog.info;
        let needs = self.stage_needs(k).clone();
        if active.jit.is_none() {
            // The interpreter reads inputs from its own buffers; the JIT reads the host's slices.
            for &b in &needs.tensors {
                let name = &info.buffers[b as usize].name;
                self.bufs[b as usize] = inputs.tensors[name].iter().map(|d| d.to_vec()).collect();
            }
            if let Some(ps) = params.as_deref() {
                for (space, tensors) in ps.iter().enumerate() {
                    self.bufs[space] = tensors.iter().map(|d| d.to_vec()).collect();
                }
            }
        }
        let scalar_inputs: Vec<f64> = (0..info.scalar_inputs.len())
            .map(|i| scalars.get(&(i as u16)).copied().unwrap_or(0.0))
            .collect();
        let env = StepEnv {
            hypers: &self.effective,
            groups: &self.effective_groups,
            tensor_groups: &self.tensor_groups,
            t: (self.steps + 1) as f64,
            scalar_states: &self.scalar_states,
            scalar_inputs: &scalar_inputs,
        };
        let mut run = StepRun::new(&prog, self.steps == 0, self.lens.clone())
            .with_reductions(std::mem::take(&mut self.pending));
        let nphases = prog.variants[run.variant()].stages[k].phases.len();
        for pi in 0..nphases {
            match &active.jit {
                None => run.run_phase(&env, k, pi, &mut self.bufs),
                Some(jit) => {
                    for jk in &jit.kernels[run.variant()][k][pi] {
                        let lens = &self.lens[jk.space as usize];
                        let uniforms: Vec<Vec<T>> = (0..lens.len())
                            .map(|j| {
                                jk.abi
                                    .uniforms
                                    .iter()
                                    .map(|&u| {
                                        T::from_f64(run.uniform(&env, u, jk.space as usize, j))
                                    })
                                    .collect()
                            })
                            .collect();
                        let ptrs: Vec<Vec<*mut u8>> = (0..lens.len())
                            .map(|j| {
                                jk.abi
                                    .slots
                                    .iter()
                                    .map(|&b| {
                                        let bi = &info.buffers[b as usize];
                                        if bi.role == BufRole::Input {
                                            inputs.tensors[&bi.name][j].as_ptr() as *mut u8
                                        } else if let (BufRole::Param, Some(ps)) =
                                            (bi.role, params.as_deref_mut())
                                        {
                                            ps[b as usize][j].as_mut_ptr() as *mut u8
                                        } else {
                                            self.bufs[b as usize][j].as_mut_ptr() as *mut u8
                                        }
                                    })
                                    .collect()
                            })
                            .collect();
                        // SAFETY: every pointer addresses a live buffer of `lens[j]` elements
                        // (checked by `check_stage` for inputs; owned by `self` otherwise); inputs
                        // are only read; the kernel writes only its store slots, which are distinct
                        // buffers owned by `self`, and nothing else touches them during the call.
                        let results = unsafe {
                            jit::run_kernel(jk, &prog, lens, &ptrs, &uniforms, self.pool.as_deref())
                        };
                        for (r, v) in results {
                            run.set_reduction(r, v);
                        }
                    }
                }
            }
            // The guard: after the first phase, which stores nothing when guards exist.
            let guards = if k == 0 && pi == 0 {
                &active.guards[run.variant()]
            } else {
                &Vec::new()
            };
            if guards.iter().any(|&r| !run.scalar(&env, r, 0).is_finite()) {
                self.drop_borrowed(&needs, params.is_some());
                return Ok(false);
            }
        }
        if active.jit.is_none() {
            if let Some(ps) = params.as_deref_mut() {
                for (space, tensors) in ps.iter_mut().enumerate() {
                    for (d, v) in tensors.iter_mut().zip(&self.bufs[space]) {
                        d.copy_from_slice(v);
                    }
                }
            }
        }
        if k + 1 == info.stages.len() {
            self.scalar_states = run.scalar_updates(&env);
            self.steps += 1;
            self.next_stage = 0;
            self.pending_scalars.clear();
        } else {
            self.pending = run.take_reductions();
            self.pending_scalars = scalars;
            self.next_stage = k + 1;
        }
        self.drop_borrowed(&needs, params.is_some());
        Ok(true)
    }

    /// Drops the interpreter's copies of the host's inputs and lent params after a stage.
    fn drop_borrowed(&mut self, needs: &StageNeeds, lent: bool) {
        for &b in &needs.tensors {
            self.bufs[b as usize] = Vec::new();
        }
        if lent {
            for space in 0..self.tensors.len() {
                self.bufs[space] = Vec::new();
            }
        }
    }
}

/// Whether a node is computed per element (re-exported for hosts inspecting programs).
pub fn is_per_element(p: &Program, id: NodeId) -> bool {
    matches!(p.graph.kind(id), Kind::Element(_))
}
