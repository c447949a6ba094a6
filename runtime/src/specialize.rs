//! Specializations: the rule's program with its hyperparameter decisions fixed (and guarded
//! against non-finite inputs when the policy asks), compiled by the engine, cached by the
//! decisions' outcomes.

use crate::engine::{Compiled, Engine};
use crate::{Error, NonFinite};
use optc_compiler::ir::{Node, NodeId, Program};
use optc_compiler::ops::Float;
use optc_compiler::passes::finite::is_guard;
use optc_compiler::passes::runnable_at;
use optc_compiler::passes::specialize::{Decisions, StepFacts};
use optc_compiler::storage::StorageMap;
use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// What each stage reads from the host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StageNeeds {
    /// Per-element inputs (buffer ids).
    pub tensors: BTreeSet<u16>,
    /// Scalar inputs (indices).
    pub scalars: BTreeSet<u16>,
}

/// The rule specialized for one set of hyperparameter decisions, compiled by an engine.
#[derive(Debug)]
pub(crate) struct Specialization {
    pub(crate) key: Vec<Option<bool>>,
    pub(crate) program: Arc<Program>,
    /// The engine's compiled kernels.
    pub(crate) compiled: Compiled,
    pub(crate) needs: [Vec<StageNeeds>; 2],
    /// Guard reductions (non-finite inputs) of stage 0, phase 0, per variant.
    pub(crate) guards: [Vec<NodeId>; 2],
}

impl Specialization {
    /// `sets` holds the hyperparameter values of each parameter group (group 0 first): the
    /// program is specialized on the decisions they all agree on.
    fn build<T: Float>(
        base: &Arc<Program>,
        decisions: &Decisions,
        sets: &[&[f64]],
        facts: &StepFacts<'_>,
        how: &How<'_, T>,
    ) -> Result<Specialization, Error> {
        let key = decision_key(decisions, base, sets, facts);
        let guard = how.policy != NonFinite::Proceed;
        let program = match runnable_at(base, decisions, sets, facts, guard) {
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
        let compiled = how.engine.compile(&program, how.storage)?;
        let needs = [needs_of(&program, 0), needs_of(&program, 1)];
        Ok(Specialization {
            key,
            program,
            compiled,
            needs,
            guards,
        })
    }
}

/// What a specialization is compiled for.
pub(crate) struct How<'a, T> {
    pub(crate) engine: &'a dyn Engine<T>,
    pub(crate) storage: &'a StorageMap,
    pub(crate) policy: NonFinite,
}

/// The specializations compiled so far and the one the current step runs.
#[derive(Debug, Clone)]
pub(crate) struct Specializations {
    /// Hyperparameter decisions the rule's kernels can be specialized on.
    decisions: Decisions,
    /// By decision outcomes.
    cache: HashMap<Vec<Option<bool>>, Arc<Specialization>>,
    /// The specialization the current step runs.
    pub(crate) active: Arc<Specialization>,
}

impl Specializations {
    /// The specialization for `sets` (group values) at a step with these facts, the only one
    /// cached.
    pub(crate) fn new<T: Float>(
        program: &Arc<Program>,
        decisions: Decisions,
        sets: &[&[f64]],
        facts: &StepFacts<'_>,
        how: &How<'_, T>,
    ) -> Result<Specializations, Error> {
        let active = Arc::new(Specialization::build(
            program, &decisions, sets, facts, how,
        )?);
        Ok(Specializations {
            decisions,
            cache: HashMap::from([(active.key.clone(), Arc::clone(&active))]),
            active,
        })
    }

    /// The decisions specialized on.
    pub(crate) fn decisions(&self) -> &Decisions {
        &self.decisions
    }

    /// Makes the specialization for `sets` active, compiling it the first time its decisions'
    /// outcomes are seen.
    pub(crate) fn activate<T: Float>(
        &mut self,
        program: &Arc<Program>,
        sets: &[&[f64]],
        facts: &StepFacts<'_>,
        how: &How<'_, T>,
    ) -> Result<(), Error> {
        let key = decision_key(&self.decisions, program, sets, facts);
        if key == self.active.key {
            return Ok(());
        }
        let active = match self.cache.get(&key) {
            Some(a) => Arc::clone(a),
            None => {
                let a = Arc::new(Specialization::build(
                    program,
                    &self.decisions,
                    sets,
                    facts,
                    how,
                )?);
                self.cache.insert(key, Arc::clone(&a));
                a
            }
        };
        self.active = active;
        Ok(())
    }

    /// What stage `k` of a step with these facts and group values reads from the host, without
    /// compiling anything (the active specialization's when it serves them).
    pub(crate) fn needs_at(
        &self,
        program: &Arc<Program>,
        sets: &[&[f64]],
        facts: &StepFacts<'_>,
        policy: NonFinite,
        first: bool,
        k: usize,
    ) -> StageNeeds {
        let key = decision_key(&self.decisions, program, sets, facts);
        let v = usize::from(!first);
        if let Some(s) = self.cache.get(&key) {
            return s.needs[v][k].clone();
        }
        let p = runnable_at(
            program,
            &self.decisions,
            sets,
            facts,
            policy != NonFinite::Proceed,
        );
        needs_of(&p, v).swap_remove(k)
    }
}

/// Which specialization serves these groups' values at a step with these facts: each
/// decision's outcome where every group agrees, `None` where they differ (that decision stays
/// in the program).
fn decision_key(
    decisions: &Decisions,
    p: &Program,
    sets: &[&[f64]],
    facts: &StepFacts<'_>,
) -> Vec<Option<bool>> {
    let keys: Vec<Vec<Option<bool>>> = sets
        .iter()
        .map(|h| decisions.key_at(p, h, Some(facts)))
        .collect();
    (0..decisions.len())
        .map(|i| {
            if keys.iter().all(|k| k[i] == keys[0][i]) {
                keys[0][i]
            } else {
                None
            }
        })
        .collect()
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
                Node::Load { buf, .. } if p.info.is_input(buf) => {
                    n.tensors.insert(buf);
                }
                Node::ScalarInput(i) => {
                    n.scalars.insert(i);
                }
                // An input with a default is optional: the default when it is not given.
                Node::InputOr(_, d) => roots.push(d),
                // A reduction's argument was read by the stage that computed it.
                Node::Reduce { .. } => {}
                node => roots.extend(node.children()),
            }
        }
        out.push(n);
    }
    out
}
