//! The step driver: the one stage loop of the runtime. Every way in — `step`, `step_with`,
//! `run_stage`, `run_stage_with`, `step_device`, the mixed-precision optimizer — comes here:
//! validate every stage the call runs, pick the specialization, run each phase's kernels through
//! the engine, feed reduction results to the next phases, apply the non-finite policy after the
//! first phase, and advance scalar state and the step counter.

use crate::engine::{Given, KernelAt, Lent, StageIo};
use crate::io::{DeviceInputs, GivenTensor, Inputs};
use crate::{Error, NonFinite, Optimizer};
use optc_compiler::backend::interp::{StepEnv, StepRun};
use optc_compiler::ir::{BufRole, Kind, NodeId};
use optc_compiler::ops::Float;
use optc_compiler::passes::unroll::copy_name;
use std::collections::HashMap;
use std::sync::Arc;

/// Where the optimizer is in its steps.
#[derive(Debug, Clone, Default)]
pub(crate) struct StepState {
    /// Completed steps.
    pub(crate) steps: u64,
    /// Scalar state values.
    pub(crate) scalar_states: Vec<f64>,
    /// Stage to run next (0 between steps).
    pub(crate) next_stage: usize,
    /// Reduction results carried from one stage to the next within a step.
    pub(crate) pending: HashMap<NodeId, Vec<f64>>,
    /// Scalar inputs given earlier in the current step.
    pub(crate) pending_scalars: HashMap<u16, f64>,
    /// Steps skipped because of non-finite inputs.
    pub(crate) skipped: u64,
}

/// Which stages a call runs.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stages {
    /// The rest of the current step.
    Rest,
    /// Stage `k` only (it must be the next one).
    One(usize),
}

impl<T: Float + Default> Optimizer<T> {
    /// Runs the rest of the current step (every remaining stage, with the same inputs). The
    /// inputs of all those stages are checked before any of them runs.
    pub fn step(&mut self, inputs: &Inputs<'_, T>) -> Result<(), Error> {
        self.drive(Lent::Owned, Given::Host(inputs), Stages::Rest)
    }

    /// [`Optimizer::step`] for an optimizer built with [`Optimizer::lending`]: `params[space]`
    /// are the host's tensors of each param, in registration order, updated in place.
    pub fn step_with(
        &mut self,
        params: &mut [Vec<&mut [T]>],
        inputs: &Inputs<'_, T>,
    ) -> Result<(), Error> {
        self.drive(Lent::Host(params), Given::Host(inputs), Stages::Rest)
    }

    /// Runs stage `k` of the current step. Inputs the stage does not read are ignored; names the
    /// rule does not declare are errors.
    pub fn run_stage(&mut self, k: usize, inputs: &Inputs<'_, T>) -> Result<(), Error> {
        self.drive(Lent::Owned, Given::Host(inputs), Stages::One(k))
    }

    /// [`Optimizer::run_stage`] for an optimizer built with [`Optimizer::lending`].
    pub fn run_stage_with(
        &mut self,
        k: usize,
        params: &mut [Vec<&mut [T]>],
        inputs: &Inputs<'_, T>,
    ) -> Result<(), Error> {
        self.drive(Lent::Host(params), Given::Host(inputs), Stages::One(k))
    }

    /// [`Optimizer::step`] / [`Optimizer::step_with`] on [`crate::Backend::Cuda`] with tensors
    /// already in device memory: `params[space][tensor]` (only for an optimizer built with
    /// [`Optimizer::lending`]; `None` otherwise) and each input's tensors are device addresses,
    /// used in place. Names, counts of tensors and scalar inputs are checked as in `step`.
    ///
    /// # Safety
    /// Every address must point at the data of its tensor in this optimizer's device context
    /// (see [`Optimizer::device`]): at least as many elements of `T` as the tensor registered
    /// at that place, readable, and for params writable; alive and not accessed by anything
    /// else until this call returns. Params must not overlap each other or any input. Addresses
    /// need no particular alignment (16-byte-aligned tensors get 128-bit accesses).
    #[allow(unsafe_code)]
    pub unsafe fn step_device(
        &mut self,
        params: Option<&[Vec<u64>]>,
        inputs: &DeviceInputs,
    ) -> Result<(), Error> {
        if !self.backend().is_cuda() {
            return Err(Error::Params(
                "step_device needs Backend::Cuda or Backend::CudaEmulator (with_backend)".into(),
            ));
        }
        let lent = match params {
            Some(ps) => Lent::Device(ps),
            None => Lent::Owned,
        };
        self.drive(lent, Given::Device(inputs), Stages::Rest)
    }

    /// [`Optimizer::step_with`] with params in their 16-bit storage type (a storage map set by
    /// [`Optimizer::reconfigure`]): updated in place on Cranelift, uploaded, updated and
    /// downloaded as they are on the GPU backends. Checked like `step_with`; on an error before
    /// the kernels run nothing changes.
    pub(crate) fn step_with_bits(
        &mut self,
        params: &mut [Vec<&mut [u16]>],
        inputs: &Inputs<'_, T>,
    ) -> Result<(), Error> {
        if self.backend() == crate::Backend::Interpreter {
            return Err(Error::Params(
                "16-bit params need the Cranelift or a CUDA backend".into(),
            ));
        }
        let params_16 = (0..params.len())
            .all(|s| self.storage.of(s as u16) != optc_compiler::storage::Storage::Native);
        if !params_16 {
            return Err(Error::Params("the params are not stored in 16 bits".into()));
        }
        self.drive(Lent::Bits(params), Given::Host(inputs), Stages::Rest)
    }

    /// The one stage loop: checks every stage the call runs before any runs, then runs them.
    fn drive(
        &mut self,
        params: Lent<'_, '_, T>,
        inputs: Given<'_, '_, T>,
        stages: Stages,
    ) -> Result<(), Error> {
        let mut agreed = false;
        let r = self.drive_agreed(params, inputs, stages, &mut agreed);
        // A shard that fails its checks tells the other ranks, which are waiting to agree
        // (none of them has changed anything).
        if let (Err(_), false, Some(sh)) = (&r, agreed, &self.shard) {
            let _ = sh.agree(false);
        }
        r
    }

    /// [`Optimizer::drive`]; a shard's ranks agree after their checks that every one passed
    /// (`agreed` then set) before anything runs.
    fn drive_agreed(
        &mut self,
        mut params: Lent<'_, '_, T>,
        inputs: Given<'_, '_, T>,
        stages: Stages,
        agreed: &mut bool,
    ) -> Result<(), Error> {
        let (lend, own) = match &params {
            Lent::Device(_) => ("pass their device addresses", "pass None"),
            Lent::Bits(_) => ("lend them", "call step"),
            _ => (
                "lend them with step_with / run_stage_with",
                "call step / run_stage",
            ),
        };
        match &params {
            Lent::Owned => self.check_lent::<&[T]>(None, lend, own)?,
            Lent::Host(ps) => self.check_lent(Some(&ps[..]), lend, own)?,
            Lent::Bits(ps) => self.check_lent(Some(&ps[..]), lend, own)?,
            Lent::Device(ps) => self.check_lent(Some(ps), lend, own)?,
        }
        let range = match stages {
            Stages::Rest => self.st.next_stage..self.program.info.stages.len(),
            Stages::One(k) => {
                let info = &self.program.info;
                if k >= info.stages.len() {
                    return Err(Error::Params(format!(
                        "rule `{}` has no stage {k}: it has {} (numbered from 0: {})",
                        info.name,
                        info.stages.len(),
                        info.stages.join(", ")
                    )));
                }
                if k != self.st.next_stage {
                    return Err(Error::StageOrder {
                        expected: self.st.next_stage,
                        name: info.stages[self.st.next_stage].clone(),
                        got: k,
                    });
                }
                k..k + 1
            }
        };
        // A rule with a sample axis runs written out for the number of samples given.
        let (expanded_host, expanded_device);
        let sampled = self
            .base
            .axis_form
            .as_ref()
            .is_some_and(|(a, _)| a.info.axis == Some(optc_compiler::ir::Axis::Samples));
        let prev = self.samples;
        let inputs = if sampled {
            let n = match inputs {
                Given::Host(i) => match (self.samples_given(&i.tensors)?, i.samples) {
                    (Some(n), Some(m)) if n != m => {
                        return Err(Error::Samples(format!(
                            "the inputs hold {n} samples, but Inputs::samples says {m}"
                        )))
                    }
                    (n, m) => n.or(m),
                },
                Given::Device(i) => self.device_samples(i)?,
            };
            if let Some(n) = n {
                if self.st.next_stage == 0 {
                    self.use_samples(n)?;
                } else if n != self.samples {
                    return Err(Error::Samples(format!(
                        "this step runs {} samples (set by its first stage); stage {} was given {n} \
                         (give the count to the first stage with Inputs::with_samples)",
                        self.samples, self.st.next_stage
                    )));
                }
            }
            match inputs {
                Given::Host(i) => {
                    expanded_host = self.expand_host(i);
                    Given::Host(&expanded_host)
                }
                Given::Device(i) => {
                    expanded_device = self.expand_device(i);
                    Given::Device(&expanded_device)
                }
            }
        } else {
            inputs
        };
        // A call that fails its checks changes nothing: not the number of samples either.
        let checked = match self.check_stages(range, inputs) {
            Ok(c) => c,
            Err(e) => {
                if self.samples != prev {
                    let _ = self.use_samples(prev);
                }
                return Err(e);
            }
        };
        // Scalar inputs are checked here, before anything runs (the kernels' guard checks the
        // per-element inputs).
        if self.policy != NonFinite::Proceed
            && checked
                .iter()
                .any(|(_, s)| s.values().any(|v| !v.is_finite()))
        {
            return self.not_taken();
        }
        if let Some(sh) = &self.shard {
            *agreed = true;
            sh.agree(true)?;
        }
        for (k, scalars) in checked {
            if !self.run_stage_checked(k, &mut params, inputs, scalars)? {
                return self.not_taken();
            }
        }
        Ok(())
    }

    /// Activates the step's specialization (at its first stage) and checks the inputs of every
    /// stage in `range`; returns the scalar inputs each stage sees.
    #[allow(clippy::type_complexity)]
    fn check_stages(
        &mut self,
        range: std::ops::Range<usize>,
        inputs: Given<'_, '_, T>,
    ) -> Result<Vec<(usize, HashMap<u16, f64>)>, Error> {
        if self.st.next_stage == 0 {
            self.activate()?;
        }
        // Check every stage first; each check gives the scalar inputs its stage sees.
        let mut checked = Vec::new();
        let mut scalars = self.st.pending_scalars.clone();
        for k in range {
            scalars = match inputs {
                Given::Host(i) => self.check_given(k, &i.tensors, &i.scalars, &scalars)?,
                Given::Device(i) => self.check_given(k, &i.tensors, &i.scalars, &scalars)?,
            };
            checked.push((k, scalars.clone()));
        }
        Ok(checked)
    }

    /// A step with non-finite inputs under a policy other than proceeding: counted as skipped,
    /// or an error.
    fn not_taken(&mut self) -> Result<(), Error> {
        match self.policy {
            NonFinite::Error => Err(Error::NonFinite {
                rule: self.program.info.name.clone(),
            }),
            _ => {
                self.st.skipped += 1;
                Ok(())
            }
        }
    }

    /// Runs stage `k`, whose inputs were checked. Returns false when the guard found non-finite
    /// inputs after the first phase (which stores nothing). Cannot fail on the CPU engines; on
    /// the GPU a driver error is an [`Error::Cuda`](crate::Error).
    fn run_stage_checked(
        &mut self,
        k: usize,
        params: &mut Lent<'_, '_, T>,
        inputs: Given<'_, '_, T>,
        scalars: HashMap<u16, f64>,
    ) -> Result<bool, Error> {
        let active = Arc::clone(&self.specs.active);
        let prog = Arc::clone(&active.program);
        let info = &prog.info;
        let needs = self.active_needs(k).clone();
        let scalar_inputs: Vec<f64> = (0..info.scalar_inputs.len())
            .map(|i| scalars.get(&(i as u16)).copied().unwrap_or(0.0))
            .collect();
        let scalar_given: Vec<bool> = (0..info.scalar_inputs.len())
            .map(|i| scalars.contains_key(&(i as u16)))
            .collect();
        // A shard computes host values over the whole tensors (their lengths, groups and
        // reductions); its engine runs over its pieces.
        let shard = self.shard.clone();
        let (whole_lens, tensor_groups) = match &shard {
            Some(sh) => (sh.layout.lens.clone(), &sh.groups),
            None => (self.lens.clone(), &self.hp.tensor_groups),
        };
        let env = StepEnv {
            hypers: &self.hp.effective,
            groups: &self.hp.effective_groups,
            tensor_groups,
            t: (self.st.steps + 1) as f64,
            scalar_states: &self.st.scalar_states,
            scalar_inputs: &scalar_inputs,
            scalar_given: &scalar_given,
            seed: self.seed,
        };
        let mut run = StepRun::new(&prog, self.st.steps == 0, whole_lens)
            .with_reductions(std::mem::take(&mut self.st.pending));
        let variant = run.variant();
        let mut io = StageIo {
            program: &prog,
            variant,
            stage: k,
            bufs: &mut self.bufs,
            lens: &self.lens,
            params,
            inputs,
            needs: &needs,
            storage: &self.storage,
            seed: self.seed,
            t: self.st.steps + 1,
            raw_partials: shard.is_some(),
            bases: shard.as_ref().map(|sh| sh.bases.as_slice()),
        };
        let engine = &mut self.engine;
        engine.begin_stage(&mut io)?;
        let stage = &prog.variants[variant].stages[k];
        for (pi, ph) in stage.phases.iter().enumerate() {
            for (ki, kern) in ph.kernels.iter().enumerate() {
                let space = kern.space as usize;
                let per_tensor = kern
                    .uniforms
                    .iter()
                    .any(|&u| prog.graph.kind(u) != Kind::Scalar);
                // The whole tensor each of the engine's tensors is (itself, or a shard's piece).
                let whole = |j: usize| shard.as_ref().map_or(j, |sh| sh.orig[space][j]);
                let mut eval = |j: usize| -> Vec<T> {
                    kern.uniforms
                        .iter()
                        .map(|&u| T::from_f64(run.uniform(&env, u, space, whole(j))))
                        .collect()
                };
                let uniforms: Vec<Vec<T>> = if per_tensor {
                    (0..io.lens[space].len()).map(eval).collect()
                } else {
                    // Once per step values depend on the tensor's group only: evaluated once
                    // per group (many small tensors cost a copy each, not an evaluation).
                    let groups = &tensor_groups[space];
                    let mut by_group: Vec<Option<Vec<T>>> = Vec::new();
                    (0..io.lens[space].len())
                        .map(|j| {
                            let g = groups.get(whole(j)).copied().unwrap_or(0);
                            if by_group.len() <= g {
                                by_group.resize(g + 1, None);
                            }
                            by_group[g].get_or_insert_with(|| eval(j)).clone()
                        })
                        .collect()
                };
                let at = KernelAt {
                    variant,
                    stage: k,
                    phase: pi,
                    kernel: ki,
                };
                let results = engine.run_kernel(&active.compiled, at, kern, &uniforms, &mut io)?;
                let results = match &shard {
                    // Every rank's task partials, combined in global task order.
                    Some(sh) if !results.is_empty() => {
                        let local: Vec<Vec<f64>> = results.iter().map(|(_, v)| v.clone()).collect();
                        let all = sh.gather(space, &local)?;
                        let ids: Vec<NodeId> = results.iter().map(|(r, _)| *r).collect();
                        crate::engine::cranelift::combine_partials(
                            &prog,
                            &ids,
                            sh.layout.lens[space].len(),
                            &sh.owner[space],
                            |ri, ti| all[ri][ti],
                        )
                    }
                    _ => results,
                };
                for (r, v) in results {
                    run.set_reduction(r, v);
                }
            }
            // The guard: after the first phase, which stores nothing when guards exist.
            if k == 0 && pi == 0 {
                let guards = &active.guards[variant];
                if guards.iter().any(|&r| !run.scalar(&env, r, 0).is_finite()) {
                    engine.end_stage(&mut io, false)?;
                    return Ok(false);
                }
            }
        }
        engine.end_stage(&mut io, true)?;
        if k + 1 == info.stages.len() {
            self.st.scalar_states = run.scalar_updates(&env);
            self.st.steps += 1;
            self.st.next_stage = 0;
            self.st.pending_scalars.clear();
        } else {
            self.st.pending = run.take_reductions();
            self.st.pending_scalars = scalars;
            self.st.next_stage = k + 1;
        }
        Ok(true)
    }

    /// Checks that params are lent exactly when the optimizer borrows them, with the registered
    /// lengths, given as host data or as device addresses; `lend` and
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

    /// The sample-axis inputs of the rule (name, space).
    fn sample_inputs(&self) -> Vec<(String, usize)> {
        match &self.base.axis_form {
            Some((axis, _)) if axis.info.axis == Some(optc_compiler::ir::Axis::Samples) => axis
                .info
                .buffers
                .iter()
                .filter(|b| b.axis)
                .map(|b| (b.name.clone(), b.space as usize))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The number of samples the sample-axis inputs among `tensors` hold (`None` when none is
    /// given, or only for tensors with no element); an error when a tensor's data is not a whole
    /// number of blocks of its size or the inputs disagree.
    fn samples_given<L: GivenTensor>(
        &self,
        tensors: &HashMap<String, Vec<L>>,
    ) -> Result<Option<usize>, Error> {
        let mut found: Option<(usize, String)> = None;
        for (name, space) in self.sample_inputs() {
            let Some(data) = tensors.get(&name) else {
                continue;
            };
            let lens = &self.lens[space];
            if data.len() != lens.len() {
                return Err(Error::Length {
                    what: format!("input `{name}` (number of tensors)"),
                    expected: lens.len(),
                    got: data.len(),
                });
            }
            for (j, (d, &len)) in data.iter().zip(lens).enumerate() {
                let Some(elems) = d.elems() else { continue };
                let spec = &self.tensors[space][j];
                if len == 0 {
                    if elems != 0 {
                        return Err(Error::Samples(format!(
                            "input `{name}` for tensor `{}` (no element) holds {elems} elements",
                            spec.name
                        )));
                    }
                    continue;
                }
                if elems == 0 || elems % len != 0 {
                    return Err(Error::Samples(format!(
                        "input `{name}` for tensor `{}` holds {elems} elements, not one or more samples of shape {:?} ({len} elements each)",
                        spec.name, spec.shape
                    )));
                }
                let n = elems / len;
                let here = format!("input `{name}` for tensor `{}`", spec.name);
                match &found {
                    Some((m, there)) if *m != n => {
                        return Err(Error::Samples(format!(
                            "{there} holds {m} samples, but {here} holds {n}"
                        )))
                    }
                    Some(_) => {}
                    None => found = Some((n, here)),
                }
            }
        }
        Ok(found.map(|(n, _)| n))
    }

    /// The number of samples of device inputs: [`DeviceInputs::samples`], needed when a
    /// sample-axis input is given.
    fn device_samples(&self, inputs: &DeviceInputs) -> Result<Option<usize>, Error> {
        let given = self
            .sample_inputs()
            .into_iter()
            .find(|(name, _)| inputs.tensors.contains_key(name));
        match (given, inputs.samples) {
            (Some(_), Some(n)) => Ok(Some(n)),
            (Some((name, _)), None) => Err(Error::Samples(format!(
                "input `{name}` has a sample axis: say how many samples its device tensors hold with DeviceInputs::samples"
            ))),
            (None, _) => Ok(None),
        }
    }

    /// Host inputs with each sample-axis input split into its samples' blocks, named as the
    /// program written out for the current number of samples names them.
    fn expand_host<'i>(&self, inputs: &Inputs<'i, T>) -> Inputs<'i, T> {
        let mut out = inputs.clone();
        self.split_samples(&mut out.tensors, |d, at, len| &d[at..at + len]);
        out
    }

    /// Device inputs with each sample-axis input split into its samples' blocks.
    fn expand_device(&self, inputs: &DeviceInputs) -> DeviceInputs {
        let mut out = inputs.clone();
        let size = std::mem::size_of::<T>() as u64;
        self.split_samples(&mut out.tensors, |&d, at, _| d + at as u64 * size);
        out
    }

    /// Replaces each sample-axis input of `tensors` by one input per sample, `block(data, at,
    /// len)` giving the `len` elements of a tensor's data from element `at`.
    fn split_samples<L>(
        &self,
        tensors: &mut HashMap<String, Vec<L>>,
        block: impl Fn(&L, usize, usize) -> L,
    ) {
        for (name, space) in self.sample_inputs() {
            let Some(data) = tensors.remove(&name) else {
                continue;
            };
            let lens = &self.lens[space];
            for j in 0..self.samples {
                let blocks = data
                    .iter()
                    .zip(lens)
                    .map(|(d, &len)| block(d, j * len, len))
                    .collect();
                tensors.insert(copy_name(&name, j), blocks);
            }
        }
    }

    /// Checks the inputs of stage `k` (host data or device addresses); returns the scalar inputs
    /// it will see (those given earlier in the step, updated by these).
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
        let needs = self.active_needs(k).clone();
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
            if !tensors.contains_key(&info.buffers[b as usize].name) {
                return Err(missing(&info.buffers[b as usize].name));
            }
        }
        // Every input given is checked, read by this specialization or not: a tensor of the
        // wrong shape is an error whatever the hyperparameters decide.
        let mut given: Vec<(&String, &Vec<L>)> = tensors.iter().collect();
        given.sort_by(|a, b| a.0.cmp(b.0));
        for (name, data) in given {
            let Some(b) = info.buffer(name) else { continue };
            let bi = &info.buffers[b as usize];
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
                            what: format!(
                                "input `{}` for tensor `{}`",
                                bi.name, self.tensors[bi.space as usize][j].name
                            ),
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
}
