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
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

pub mod checkpoint;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod jit;
pub mod schedule;
pub use jit::JitProgram;
use optc_compiler::backend::clif::Precision;
use optc_compiler::passes::finite::{guard_inputs, is_guard};
use optc_compiler::passes::specialize::{specialize, Decisions};
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
    cache: HashMap<Vec<bool>, Arc<Active>>,
    /// The specialization the current step runs.
    active: Arc<Active>,
    engine: Backend,
    pool: Option<Arc<rayon::ThreadPool>>,
    policy: NonFinite,
    skipped: u64,
}

/// The rule specialized for one set of hyperparameter decisions, ready to run.
#[derive(Debug)]
struct Active {
    key: Vec<bool>,
    program: Arc<Program>,
    /// Compiled kernels on the Cranelift backend (the interpreter runs `program` otherwise).
    jit: Option<Arc<JitProgram>>,
    needs: [Vec<StageNeeds>; 2],
    /// Guard reductions (non-finite inputs) of stage 0, phase 0, per variant.
    guards: [Vec<NodeId>; 2],
}

impl Active {
    fn build(
        base: &Arc<Program>,
        decisions: &Decisions,
        hypers: &[f64],
        engine: Backend,
        precision: Precision,
        policy: NonFinite,
    ) -> Result<Active, Error> {
        let key = decisions.key(base, hypers);
        let program = if decisions.is_empty() {
            Arc::clone(base)
        } else {
            Arc::new(specialize(base, decisions, hypers))
        };
        let program = if policy == NonFinite::Proceed {
            program
        } else {
            Arc::new(guard_inputs(&program))
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
            Backend::Interpreter => None,
            Backend::Cranelift { .. } => Some(Arc::new(JitProgram::compile(&program, precision)?)),
        };
        let needs = [needs_of(&program, 0), needs_of(&program, 1)];
        Ok(Active {
            key,
            program,
            jit,
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
        let lens: Vec<Vec<usize>> = params
            .iter()
            .map(|ts| ts.iter().map(|t| t.len()).collect())
            .collect();
        let mut params = params.into_iter();
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
            &hypers,
            Backend::Interpreter,
            Self::precision(),
            NonFinite::Proceed,
        )?);
        Ok(Optimizer {
            schedules: vec![None; hypers.len()],
            effective: hypers.clone(),
            hypers,
            scalar_states: vec![0.0; info.scalar_states.len()],
            steps: 0,
            bufs,
            lens,
            next_stage: 0,
            pending: HashMap::new(),
            pending_scalars: HashMap::new(),
            decisions,
            cache: HashMap::from([(active.key.clone(), Arc::clone(&active))]),
            active,
            program,
            engine: Backend::Interpreter,
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
            &self.effective,
            self.engine,
            Self::precision(),
            self.policy,
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
        let mut effective = self.hypers.clone();
        for (h, s) in self.schedules.iter().enumerate() {
            if let Some(s) = s {
                let v = self.hypers[h] * s.factor(t);
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
                effective[h] = v;
            }
        }
        self.effective = effective;
        let key = self.decisions.key(&self.program, &self.effective);
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

    /// Switches to another backend (compiling the rule for it); state and step count are kept.
    pub fn with_backend(mut self, backend: Backend) -> Result<Self, Error> {
        self.engine = backend;
        self.reset_active()?;
        match backend {
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

    /// Sets a hyperparameter (booleans as 0/1).
    pub fn set_hyper(&mut self, name: &str, value: f64) -> Result<(), Error> {
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
        self.hypers[h] = value;
        Ok(())
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
    pub fn buffer(&self, name: &str) -> Option<&[Vec<T>]> {
        let b = self.program.info.buffer(name)?;
        Some(&self.bufs[b as usize])
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

    /// The tensors of param `space`.
    pub fn params(&self, space: usize) -> &[Vec<T>] {
        &self.bufs[space]
    }

    /// What stage `k` reads from the host in the coming step.
    pub fn stage_needs(&self, k: usize) -> &StageNeeds {
        &self.active.needs[usize::from(self.steps > 0)][k]
    }

    /// Runs the rest of the current step (every remaining stage, with the same inputs). The
    /// inputs of all those stages are checked before any of them runs.
    pub fn step(&mut self, inputs: &Inputs<'_, T>) -> Result<(), Error> {
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
            if !self.exec_stage(k, inputs, scalars) {
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
        if !self.exec_stage(k, inputs, scalars) {
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
        let info = &self.program.info;
        for name in inputs.tensors.keys() {
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
        for name in inputs.scalars.keys() {
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
            if let Some(&v) = inputs.scalars.get(name) {
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
            let Some(data) = inputs.tensors.get(&bi.name) else {
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
                if d.len() != n {
                    return Err(Error::Length {
                        what: format!("input `{}`, tensor {j}", bi.name),
                        expected: n,
                        got: d.len(),
                    });
                }
            }
        }
        Ok(scalars)
    }

    /// Runs stage `k`, whose inputs [`Self::check_stage`] accepted. Cannot fail.
    #[allow(unsafe_code)] // calls JIT kernels over the buffers this optimizer owns
    /// Returns false when the guard found non-finite inputs after the first phase (nothing written).
    fn exec_stage(&mut self, k: usize, inputs: &Inputs<'_, T>, scalars: HashMap<u16, f64>) -> bool {
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
        }
        let scalar_inputs: Vec<f64> = (0..info.scalar_inputs.len())
            .map(|i| scalars.get(&(i as u16)).copied().unwrap_or(0.0))
            .collect();
        let env = StepEnv {
            hypers: &self.effective,
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
                                    .map(|&u| T::from_f64(run.scalar(&env, u, j)))
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
                for &b in &needs.tensors {
                    self.bufs[b as usize] = Vec::new();
                }
                return false;
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
        for &b in &needs.tensors {
            self.bufs[b as usize] = Vec::new();
        }
        true
    }
}

/// Whether a node is computed per element (re-exported for hosts inspecting programs).
pub fn is_per_element(p: &Program, id: NodeId) -> bool {
    matches!(p.graph.kind(id), Kind::Element(_))
}
