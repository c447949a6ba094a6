//! [`Optimizer`]: a compiled rule bound to tensors. It composes the owners of its state: the
//! hyperparameter values (with ranges, schedules and groups), the specializations, the step
//! state (step counter, scalar state, what carries between stages), the host buffers, the storage
//! policy and a boxed [`Engine`]. The step itself is in [`crate::step`].

use crate::engine::cranelift::JitProgram;
use crate::engine::interp::Interp;
use crate::engine::Engine;
use crate::hypers::Hypers;
use crate::io::TensorSpec;
use crate::specialize::{How, Specializations, StageNeeds};
use crate::step::StepState;
use crate::{Error, Schedule};

/// The seed an optimizer starts with ([`Optimizer::seed`]).
pub const DEFAULT_SEED: u64 = 0x6f70_7463;
use optc_compiler::backend::interp::Buffers;
use optc_compiler::ir::{BufRole, Node, NodeId, Program, Ty};
use optc_compiler::ops::Float;
use optc_compiler::passes::specialize::{Decisions, StepFacts};
use optc_compiler::storage::StorageMap;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// A rule bound to a set of tensors: parameters, state, step counter and hyperparameters.
#[derive(Debug)]
pub struct Optimizer<T: Float> {
    /// The program the steps run: the compiled rule, or for a rule with a sample axis, the rule
    /// written out for the current number of samples.
    pub(crate) program: Arc<Program>,
    /// The compiled rule as given (with a sample axis: written out for one sample).
    pub(crate) base: Arc<Program>,
    /// The number of samples `program` is written out for (1 without a sample axis).
    pub(crate) samples: usize,
    /// The programs and specializations of the other numbers of samples used so far.
    pub(crate) by_samples: HashMap<usize, (Arc<Program>, Specializations)>,
    /// Hyperparameter values, schedules and parameter groups.
    pub(crate) hp: Hypers,
    /// The step counter, scalar state and what carries between the stages of a step.
    pub(crate) st: StepState,
    /// Host buffers by buffer id: owned params, state, outputs (inputs and lent params are not
    /// kept; an engine may keep newer values in its own memory, see [`Engine::host`]).
    pub(crate) bufs: Buffers<T>,
    pub(crate) lens: Vec<Vec<usize>>,
    /// The registered tensors, `[space][tensor]`.
    pub(crate) tensors: Vec<Vec<TensorSpec>>,
    /// Whether the host lends the params at each step (they are not stored in `bufs`).
    pub(crate) lent: bool,
    /// The specializations compiled so far and the active one.
    pub(crate) specs: Specializations,
    /// What runs the kernels.
    pub(crate) engine: Box<dyn Engine<T>>,
    /// How each buffer is stored (16-bit storage is set by the mixed-precision optimizer).
    pub(crate) storage: Arc<StorageMap>,
    /// The key of stochastic rounding.
    pub(crate) seed: u64,
    pub(crate) policy: NonFinite,
    /// One rank's share of a sharded optimizer ([`crate::shard`]): the whole tensors' view.
    pub(crate) shard: Option<Arc<crate::shard::ShardCtx>>,
}

impl<T: Float> Clone for Optimizer<T> {
    /// A clone shares compiled kernels and devices, not buffers: on a device engine it carries
    /// host copies of the device's current values.
    fn clone(&self) -> Self {
        Optimizer {
            program: Arc::clone(&self.program),
            base: Arc::clone(&self.base),
            samples: self.samples,
            by_samples: self.by_samples.clone(),
            hp: self.hp.clone(),
            st: self.st.clone(),
            bufs: self.bufs.clone(),
            lens: self.lens.clone(),
            tensors: self.tensors.clone(),
            lent: self.lent,
            specs: self.specs.clone(),
            engine: self.engine.boxed_clone(),
            storage: Arc::clone(&self.storage),
            seed: self.seed,
            policy: self.policy,
            shard: self.shard.clone(),
        }
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
    /// Kernels generated as C and compiled by the system C compiler for this machine (wide
    /// vectors), on `threads` threads with the Cranelift engine's host; cached on disk. Opening
    /// it fails with [`crate::engine::native::NativeError::NoCompiler`] where no C compiler
    /// works. See [`crate::engine::native`].
    Native {
        /// Worker threads.
        threads: usize,
    },
    /// The fastest CPU engine that works on this machine, on `threads` threads:
    /// [`Backend::Native`] where a C compiler builds its kernels, else [`Backend::Cranelift`]
    /// (saying so once per process on stderr). The two give the same bits.
    Auto {
        /// Worker threads.
        threads: usize,
    },
    /// CUDA kernels on GPU `device` (compiled by NVRTC for its architecture); params (when
    /// owned), state and outputs in device memory. See [`crate::engine::cuda`].
    #[cfg(feature = "cuda")]
    Cuda {
        /// The CUDA device ordinal.
        device: usize,
    },
    /// The CUDA backend with the CUDA emulator ([`crate::engine::cuda::emulator`]) as its device: the same generated
    /// kernels, launch tables and host logic as [`Backend::Cuda`], built by the host's C++
    /// compiler and run on the CPU one block at a time. For testing the GPU path where there is
    /// no GPU; slow.
    #[cfg(feature = "cuda")]
    CudaEmulator,
}

impl Backend {
    /// What [`Backend::Auto`] stands for on this machine (every other backend is itself).
    pub fn resolved(self) -> Backend {
        match self {
            Backend::Auto { threads } => match crate::engine::native::Toolchain::find() {
                Ok(_) => Backend::Native { threads },
                Err(e) => {
                    static SAID: std::sync::Once = std::sync::Once::new();
                    SAID.call_once(|| eprintln!("optc: {e}; using the cranelift backend"));
                    Backend::Cranelift { threads }
                }
            },
            b => b,
        }
    }

    /// Whether this backend runs on a CUDA device ([`Backend::Cuda`] or the emulator).
    pub fn is_cuda(self) -> bool {
        #[cfg(feature = "cuda")]
        if matches!(self, Backend::Cuda { .. } | Backend::CudaEmulator) {
            return true;
        }
        false
    }
}

/// The hyperparameters the scalar-state updates read (they cannot differ between groups).
pub(crate) fn scalar_state_hypers(p: &Program) -> BTreeSet<u16> {
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
        let hypers: Vec<f64> = info.hypers.iter().map(|h| h.default).collect();
        let engine: Box<dyn Engine<T>> = Box::new(Interp);
        let storage = Arc::new(StorageMap::default());
        let how = How {
            engine: engine.as_ref(),
            storage: &storage,
            policy: NonFinite::Proceed,
        };
        let zeros = vec![0.0; info.scalar_states.len()];
        let facts = StepFacts {
            t: 1.0,
            scalar_states: &zeros,
            seed: DEFAULT_SEED,
        };
        let specs =
            Specializations::new(&program, Decisions::of(&program), &[&hypers], &facts, &how)?;
        Ok(Optimizer {
            hp: Hypers {
                schedules: vec![None; hypers.len()],
                effective: hypers.clone(),
                values: hypers,
                groups: Vec::new(),
                tensor_groups: lens.iter().map(|l| vec![0; l.len()]).collect(),
                effective_groups: Vec::new(),
            },
            st: StepState {
                scalar_states: vec![0.0; info.scalar_states.len()],
                ..StepState::default()
            },
            bufs,
            lens,
            tensors,
            lent,
            specs,
            base: Arc::clone(&program),
            // A program already written out for n samples runs n-sample steps as it is.
            samples: program
                .axis_form
                .as_ref()
                .filter(|(a, _)| a.info.axis == Some(optc_compiler::ir::Axis::Samples))
                .map_or(1, |(_, n)| *n),
            by_samples: HashMap::new(),
            program,
            engine,
            storage,
            seed: DEFAULT_SEED,
            policy: NonFinite::Proceed,
            shard: None,
        })
    }

    /// Rebuilds the active specialization after a setting changed (engine, storage, policy,
    /// decisions), dropping the cached ones.
    pub(crate) fn reset_active(&mut self) -> Result<(), Error> {
        let decisions = self.specs.decisions().clone();
        self.reset_with(decisions)
    }

    fn reset_with(&mut self, decisions: Decisions) -> Result<(), Error> {
        self.by_samples.clear();
        self.specs = self.specializations(&self.program, decisions)?;
        Ok(())
    }

    /// The specializations of `program` on `decisions` for the coming step, compiled by the
    /// current engine for the current storage and policy.
    fn specializations(
        &self,
        program: &Arc<Program>,
        decisions: Decisions,
    ) -> Result<Specializations, Error> {
        let how = How {
            engine: self.engine.as_ref(),
            storage: &self.storage,
            policy: self.policy,
        };
        let facts = StepFacts {
            t: (self.st.steps + 1) as f64,
            scalar_states: &self.st.scalar_states,
            seed: self.seed,
        };
        Specializations::new(program, decisions, &self.hp.value_sets(), &facts, &how)
    }

    /// Makes the specialization for the current hyperparameter values active (compiling it the
    /// first time those decisions are seen). Called at the start of each step.
    pub(crate) fn activate(&mut self) -> Result<(), Error> {
        let t = self.st.steps + 1;
        let (effective, groups) = self.values_at(t)?;
        self.hp.effective = effective;
        self.hp.effective_groups = groups;
        let how = How {
            engine: self.engine.as_ref(),
            storage: &self.storage,
            policy: self.policy,
        };
        let facts = StepFacts {
            t: t as f64,
            scalar_states: &self.st.scalar_states,
            seed: self.seed,
        };
        self.specs
            .activate(&self.program, &self.hp.value_sets(), &facts, &how)
    }

    /// The hyperparameter values of group 0 and of the other groups at step `t`, schedules
    /// applied.
    fn values_at(&self, t: u64) -> Result<(Vec<f64>, Vec<Vec<f64>>), Error> {
        let effective = self.scheduled(&self.hp.values, t)?;
        let mut groups = Vec::with_capacity(self.hp.groups.len());
        for overrides in &self.hp.groups {
            let base: Vec<f64> = overrides
                .iter()
                .zip(&self.hp.values)
                .map(|(o, &v)| o.unwrap_or(v))
                .collect();
            groups.push(self.scheduled(&base, t)?);
        }
        Ok((effective, groups))
    }

    /// Base values times their schedules' factors at step `t`, each checked against its range.
    fn scheduled(&self, base: &[f64], t: u64) -> Result<Vec<f64>, Error> {
        let mut out = base.to_vec();
        for (h, s) in self.hp.schedules.iter().enumerate() {
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

    /// Switches to another backend (compiling the rule for it); state and step count are kept.
    ///
    /// [`Backend::Cuda`] opens the GPU (an [`Error::Cuda`] without a driver or GPU) and compiles
    /// the kernels for it with NVRTC; see [`crate::engine::cuda`] for where values live. Leaving
    /// it downloads the device's values first.
    pub fn with_backend(mut self, backend: Backend) -> Result<Self, Error> {
        let storage = (*self.storage).clone();
        self.reconfigure(backend, storage, self.seed)?;
        Ok(self)
    }

    /// Moves to `backend` with buffers stored as `storage` says (16-bit params and state,
    /// widened on load and rounded on store inside the kernels; see [`StorageMap`]), rounding
    /// stochastically under `seed` when it asks for that. Host copies stay in `T`, as exact
    /// widenings. The kernels are compiled first; then the values the old engine holds are
    /// brought to the host and the new engine takes over. On an error nothing changes.
    pub(crate) fn reconfigure(
        &mut self,
        backend: Backend,
        storage: StorageMap,
        seed: u64,
    ) -> Result<(), Error> {
        if T::BYTES != 4 && !storage.is_native() {
            return Err(Error::Policy(
                "16-bit storage needs an f32 optimizer".into(),
            ));
        }
        let engine = crate::engine::open(backend, Some(self.engine.as_ref()))?;
        let how = How {
            engine: engine.as_ref(),
            storage: &storage,
            policy: self.policy,
        };
        let facts = StepFacts {
            t: (self.st.steps + 1) as f64,
            scalar_states: &self.st.scalar_states,
            seed: self.seed,
        };
        let specs = Specializations::new(
            &self.program,
            self.specs.decisions().clone(),
            &self.hp.value_sets(),
            &facts,
            &how,
        )?;
        self.engine.sync(&mut self.bufs)?;
        self.engine = engine;
        self.specs = specs;
        // Programs written out for other numbers of samples were compiled for the old engine.
        self.by_samples.clear();
        self.storage = Arc::new(storage);
        self.seed = seed;
        Ok(())
    }

    /// The seed of the rule's random draws (`uniform()`, `normal()`) and of stochastic
    /// rounding: with the step and the draw's place in the rule, it fixes every random number
    /// (see `optc_compiler::random`). [`DEFAULT_SEED`] until set; saved in checkpoints.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Sets the seed ([`Optimizer::seed`]); it takes effect at the next step.
    pub fn set_seed(&mut self, seed: u64) {
        self.seed = seed;
    }

    /// The storage of every buffer.
    pub fn storage(&self) -> &StorageMap {
        &self.storage
    }

    /// Turns specialization on hyperparameter decisions on (the default) or off. Off, every
    /// step runs the general program: options that are switched off still cost their traffic.
    pub fn with_specialization(mut self, on: bool) -> Result<Self, Error> {
        let decisions = if on {
            Decisions::of(&self.program)
        } else {
            Decisions::none()
        };
        self.reset_with(decisions)?;
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
        self.st.skipped
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.engine.backend()
    }

    /// The compiled kernels, on the Cranelift backend.
    pub fn jit(&self) -> Option<&JitProgram> {
        self.specs.active.compiled.downcast_ref::<JitProgram>()
    }

    /// Brings every host copy up to date with the engine's memory, so [`Optimizer::params`] and
    /// [`Optimizer::buffer`] need no download (and report no error silently). A no-op on the CPU
    /// engines.
    pub fn sync_host(&mut self) -> Result<(), Error> {
        self.engine.sync(&mut self.bufs)
    }

    /// Kernel launches made on a device so far (0 on the CPU engines).
    pub fn launches(&self) -> u64 {
        self.engine.launches()
    }

    /// The GPU this optimizer runs on ([`Backend::Cuda`], [`Backend::CudaEmulator`]).
    #[cfg(feature = "cuda")]
    pub fn device(&self) -> Option<&Arc<crate::engine::cuda::device::Device>> {
        self.engine
            .as_any()
            .downcast_ref::<crate::engine::cuda::Cuda<T>>()
            .map(|c| c.device())
    }

    /// The program the current step runs: the rule specialized for the hyperparameter decisions
    /// (`amsgrad`, `max_grad_norm > 0`, ...) of the current values.
    pub fn active_program(&self) -> &Program {
        &self.specs.active.program
    }

    /// The compiled rule (as given; `active_program` is what the current step runs).
    #[allow(clippy::misnamed_getters)] // `program` is the running program, `base` the rule given
    pub fn program(&self) -> &Program {
        &self.base
    }

    /// The number of samples the last step's sample-axis inputs held (1 before the first, and
    /// for a rule without a sample axis).
    pub fn samples(&self) -> usize {
        self.samples
    }

    /// Makes the steps run the rule written out for `n` samples (a rule with a sample axis; a
    /// step sets it from its inputs' shapes). Compiles it the first time `n` is used.
    pub(crate) fn use_samples(&mut self, n: usize) -> Result<(), Error> {
        if n == self.samples {
            return Ok(());
        }
        let max = optc_compiler::passes::unroll::MAX_SAMPLES;
        if n == 0 || n > max {
            return Err(Error::Samples(format!(
                "a step takes 1 to {max} samples, got {n}"
            )));
        }
        if let Some((axis, _)) = &self.base.axis_form {
            let per_copy = axis.info.buffers.iter().filter(|b| b.axis).count();
            if axis.info.buffers.len() + per_copy * (n - 1) > 1 << 16 {
                return Err(Error::Samples(format!(
                    "{n} samples of {per_copy} sample-axis inputs would take more than 65,536 buffers"
                )));
            }
        }
        let (program, specs) = match self.by_samples.remove(&n) {
            Some(x) => x,
            None => {
                let p = Arc::new(
                    optc_compiler::passes::for_samples(&self.base, n).ok_or_else(|| {
                        Error::Samples(format!("rule `{}` has no sample axis", self.base.info.name))
                    })?,
                );
                let decisions = if self.specs.decisions().is_empty() {
                    Decisions::none()
                } else {
                    Decisions::of(&p)
                };
                let specs = self.specializations(&p, decisions)?;
                (p, specs)
            }
        };
        let old_program = std::mem::replace(&mut self.program, program);
        let old_specs = std::mem::replace(&mut self.specs, specs);
        self.by_samples
            .insert(self.samples, (old_program, old_specs));
        self.samples = n;
        self.bufs
            .resize_with(self.program.info.buffers.len(), Vec::new);
        Ok(())
    }

    /// Completed steps.
    pub fn steps(&self) -> u64 {
        self.st.steps
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
        if let Some(s) = &self.hp.schedules[h] {
            self.check_horizon(h, s, value)?;
        }
        self.hp.values[h] = value;
        Ok(())
    }

    /// Steps a schedule's horizon covers from the next step: its length and the step after it
    /// (from there its last factor holds), or 10,000 steps for one that never ends; at most 10^6.
    const HORIZON_CAP: u64 = 1_000_000;

    /// Checks that `base` times schedule `s` stays finite and in hyperparameter `h`'s range at
    /// every step of the schedule's horizon (see [`Optimizer::HORIZON_CAP`]), so a run does not
    /// stop part-way with a value out of range.
    fn check_horizon(&self, h: usize, s: &Schedule, base: f64) -> Result<(), Error> {
        let info = &self.program.info.hypers[h];
        let first = self.st.steps + 1;
        let span = s.length().map_or(10_000, |n| n.saturating_add(1));
        let last = first.saturating_add(span.min(Self::HORIZON_CAP));
        for t in first..last {
            let v = base * s.factor(t);
            if !v.is_finite() {
                return Err(Error::BadHyper {
                    name: info.name.clone(),
                    value: v,
                    why: "its schedule gives a value that is not finite",
                });
            }
            if let Some(range) = info.range {
                if !range.contains(v) {
                    return Err(Error::Policy(format!(
                        "the schedule `{s}` of `{name}` gives {name} = {} at step {t}, outside \
                         the rule's range {name} in {range}",
                        crate::error::short(v),
                        name = info.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// The index of hyperparameter `name` if `value` is acceptable for it.
    pub(crate) fn check_value(&self, name: &str, value: f64) -> Result<usize, Error> {
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
        let mut overrides = vec![None; self.hp.values.len()];
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
        self.hp.groups.push(overrides);
        let g = self.hp.groups.len();
        for (space, j) in places {
            self.hp.tensor_groups[space][j] = g;
        }
        Ok(g)
    }

    /// Sets a hyperparameter of one group (group 0: as [`Optimizer::set_hyper`]).
    pub fn set_group_hyper(&mut self, group: usize, name: &str, value: f64) -> Result<(), Error> {
        if group == 0 {
            return self.set_hyper(name, value);
        }
        if group > self.hp.groups.len() {
            return Err(Error::Group(format!(
                "there is no group {group} (groups: 0 to {})",
                self.hp.groups.len()
            )));
        }
        let h = self.check_value(name, value)?;
        if scalar_state_hypers(&self.program).contains(&(h as u16)) {
            return Err(Error::Group(format!(
                "`{name}` feeds the rule's scalar state, which all groups share; it cannot differ between groups"
            )));
        }
        self.hp.groups[group - 1][h] = Some(value);
        Ok(())
    }

    /// The (base) value of a hyperparameter in a group.
    pub fn group_hyper(&self, group: usize, name: &str) -> Option<f64> {
        let h = self.program.info.hyper(name)?;
        match group {
            0 => Some(self.hp.values[h]),
            g => self
                .hp
                .groups
                .get(g - 1)
                .map(|o| o[h].unwrap_or(self.hp.values[h])),
        }
    }

    /// The hyperparameters that cannot differ between parameter groups: those the rule's scalar
    /// state reads (scalar state is shared by every tensor), in declaration order.
    pub fn shared_hypers(&self) -> Vec<&str> {
        let fixed = scalar_state_hypers(&self.program);
        let info = &self.program.info;
        (0..info.hypers.len())
            .filter(|&h| fixed.contains(&(h as u16)))
            .map(|h| info.hypers[h].name.as_str())
            .collect()
    }

    /// The number of parameter groups, group 0 included.
    pub fn group_count(&self) -> usize {
        self.hp.groups.len() + 1
    }

    /// The group a tensor belongs to.
    pub fn group_of(&self, tensor: &str) -> Option<usize> {
        let (space, j) = self.tensor_index(tensor)?;
        Some(self.hp.tensor_groups[space][j])
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
                value: self.hp.values[h],
                why: "a boolean cannot follow a schedule",
            });
        }
        self.check_horizon(h, &schedule, self.hp.values[h])?;
        for g in &self.hp.groups {
            if let Some(v) = g[h] {
                self.check_horizon(h, &schedule, v)?;
            }
        }
        self.hp.schedules[h] = Some(schedule);
        Ok(())
    }

    /// Removes a hyperparameter's schedule.
    pub fn clear_schedule(&mut self, name: &str) {
        if let Some(h) = self.program.info.hyper(name) {
            self.hp.schedules[h] = None;
        }
    }

    /// The schedules, by hyperparameter name.
    pub fn schedules(&self) -> Vec<(String, Schedule)> {
        self.hp
            .schedules
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
        self.program.info.hyper(name).map(|h| self.hp.effective[h])
    }

    /// Current (base) value of a hyperparameter.
    pub fn hyper(&self, name: &str) -> Option<f64> {
        self.program.info.hyper(name).map(|h| self.hp.values[h])
    }

    /// The tensors of a per-element buffer (param, state or output) by name.
    ///
    /// On [`Backend::Cuda`] the first call after a step downloads the buffer (`None` if that
    /// fails; [`Optimizer::sync_host`] reports why).
    pub fn buffer(&self, name: &str) -> Option<&[Vec<T>]> {
        let b = self.program.info.buffer(name)?;
        self.engine
            .host(&self.bufs, b as usize)
            .ok()
            .map(Vec::as_slice)
    }

    /// Sets the values of per-element state `name`, `data[tensor]` for each tensor of its
    /// param (the starting points of an ensemble's particles, `X`, `X[1]`, ..., before the first
    /// step). An error, with nothing changed, for a name that is no per-element state or data of
    /// the wrong number or lengths of tensors.
    pub fn set_state(&mut self, name: &str, data: &[&[T]]) -> Result<(), Error> {
        let info = &self.program.info;
        let b = info
            .buffer(name)
            .filter(|&b| info.buffers[b as usize].role == BufRole::State)
            .ok_or_else(|| {
                Error::Params(format!(
                    "rule `{}` has no per-element state `{name}`",
                    info.name
                ))
            })?;
        let space = info.buffers[b as usize].space as usize;
        let lens = &self.lens[space];
        if data.len() != lens.len() {
            return Err(Error::Length {
                what: format!("state `{name}` (number of tensors)"),
                expected: lens.len(),
                got: data.len(),
            });
        }
        for (j, (d, &n)) in data.iter().zip(lens).enumerate() {
            if d.len() != n {
                return Err(Error::Length {
                    what: format!(
                        "state `{name}` for tensor `{}`",
                        self.tensors[space][j].name
                    ),
                    expected: n,
                    got: d.len(),
                });
            }
        }
        self.bufs[b as usize] = data.iter().map(|d| d.to_vec()).collect();
        self.engine.forget(b as usize);
        Ok(())
    }

    /// A scalar output (`out NAME = <scalar>`) by name: its value after the last step (0
    /// before the first).
    pub fn scalar_out(&self, name: &str) -> Option<f64> {
        let info = &self.program.info;
        let i = info.scalar_states.iter().position(|s| s == name)?;
        info.scalar_outs
            .contains(&(i as u16))
            .then(|| self.st.scalar_states[i])
    }

    /// A scalar state by name (scalar outputs included).
    pub fn scalar_state(&self, name: &str) -> Option<f64> {
        let i = self
            .program
            .info
            .scalar_states
            .iter()
            .position(|s| s == name)?;
        Some(self.st.scalar_states[i])
    }

    /// The tensors of param `space` (empty for an optimizer built with [`Optimizer::lending`],
    /// whose params the host keeps).
    ///
    /// On [`Backend::Cuda`] the first call after a step downloads them (an empty list if that
    /// fails; [`Optimizer::sync_host`] reports why).
    pub fn params(&self, space: usize) -> &[Vec<T>] {
        self.engine
            .host(&self.bufs, space)
            .map_or(&[][..], Vec::as_slice)
    }

    /// What stage `k` of the step being run reads from the host (the active specialization's).
    pub(crate) fn active_needs(&self, k: usize) -> &StageNeeds {
        &self.specs.active.needs[usize::from(self.st.steps > 0)][k]
    }

    /// What stage `k` reads from the host in the coming step (in the middle of a step: in this
    /// one). Inputs that only work which is off this step reads — under a false `t % I == 0`, a
    /// disabled option, a comparison of scalar state — are not among them; it follows
    /// `set_hyper`, schedules, scalar state and the step counter. A stage past the end is an
    /// [`Error::Params`].
    pub fn stage_needs(&self, k: usize) -> Result<StageNeeds, Error> {
        let info = &self.program.info;
        if k >= info.stages.len() {
            return Err(Error::Params(format!(
                "rule `{}` has no stage {k}: it has {} (numbered from 0: {})",
                info.name,
                info.stages.len(),
                info.stages.join(", ")
            )));
        }
        let needs = if self.st.next_stage != 0 {
            self.active_needs(k).clone()
        } else {
            let t = self.st.steps + 1;
            let (values, groups) = self.values_at(t)?;
            let sets: Vec<&[f64]> = std::iter::once(values.as_slice())
                .chain(groups.iter().map(Vec::as_slice))
                .collect();
            let facts = StepFacts {
                t: t as f64,
                scalar_states: &self.st.scalar_states,
                seed: self.seed,
            };
            self.specs.needs_at(
                &self.program,
                &sets,
                &facts,
                self.policy,
                self.st.steps == 0,
                k,
            )
        };
        Ok(self.as_given(needs))
    }

    /// Needs in the ids of the rule as given ([`Optimizer::program`]): the copies of a
    /// sample-axis input (the program written out for several samples) are that input.
    fn as_given(&self, mut needs: StageNeeds) -> StageNeeds {
        if self.samples <= 1 {
            return needs;
        }
        let Some((axis, _)) = &self.base.axis_form else {
            return needs;
        };
        let copies = optc_compiler::passes::unroll::copies(axis, self.samples);
        needs.tensors = needs
            .tensors
            .into_iter()
            .map(|b| {
                copies
                    .iter()
                    .find(|(_, ids)| ids.contains(&b))
                    .map_or(b, |(orig, _)| *orig)
            })
            .collect();
        needs
    }
}
