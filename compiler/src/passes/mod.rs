//! Passes over a [`Program`]: small named rewrites, run from named lists. [`PIPELINE`] is what
//! [`crate::compile`] runs after lowering; [`SPECIALIZED`] and [`GUARDED`] are what
//! [`specialize`](specialize::specialize) and [`guard_inputs`](finite::guard_inputs) run after their
//! own rewrite, made of the same named parts. [`runnable`] is the program the runtime runs.
//! `optc compile --emit ir` dumps the program after each pass.

use crate::ir::Program;
use crate::PassObserver;
use std::borrow::Cow;

pub mod cse;
pub mod dse;
pub mod finite;
pub mod fold;
pub mod hoist;
pub mod phases;
pub mod simplify;
pub mod specialize;
pub mod unroll;

/// A named pass.
pub type Pass = (&'static str, fn(&mut Program));

/// Rewrites of the graph: constants, algebra, shared subexpressions, and constants again (after
/// `simplify` and `cse` expose more).
pub const REWRITE: &[Pass] = &[
    ("fold", fold::run),
    ("simplify", simplify::run),
    ("cse", cse::run),
    ("fold", fold::run),
];

/// Dead stores: stores that write back the value the buffer holds. Every state stays updated
/// (states are observable through buffers and checkpoints).
pub const PRUNE: &[Pass] = &[("dse", dse::run)];

/// Planning: passes over memory and their kernels, then the kernels' uniforms.
pub const PLAN: &[Pass] = &[("phases", phases::run), ("hoist", hoist::run)];

/// The pipeline, in order: what [`crate::compile`] runs after lowering.
pub const PIPELINE: &[&[Pass]] = &[REWRITE, PRUNE, PLAN];

/// What [`specialize::specialize`] runs after fixing the decisions.
pub const SPECIALIZED: &[&[Pass]] = &[REWRITE, PRUNE, PLAN];

/// What [`finite::guard_inputs`] runs after adding the guards.
pub const GUARDED: &[&[Pass]] = &[PLAN];

/// A program with a sample axis ([`unroll`]) written out for `n` samples and planned: what
/// the runtime runs for a step with `n` samples. `None` when `p` has no sample axis or `n` is
/// outside `1..=unroll::MAX_SAMPLES`.
pub fn for_samples(p: &Program, n: usize) -> Option<Program> {
    let (axis, _) = p.axis_form.as_ref()?;
    if axis.info.axis != Some(crate::ir::Axis::Samples) || !(1..=unroll::MAX_SAMPLES).contains(&n) {
        return None;
    }
    let mut q = unroll::copies_of(axis, n);
    run_pipeline(&mut q, PIPELINE, &mut |_, _| {});
    Some(q)
}

/// A program with particles (`state X: particles`) written out for `n` particles and planned:
/// what an optimizer over an ensemble of `n` particles runs. An error when `p` has no particles
/// or `n` is outside `1..=unroll::MAX_PARTICLES`.
pub fn for_particles(p: &Program, n: usize) -> Result<Program, String> {
    let axis = match &p.axis_form {
        Some((axis, _)) if axis.info.axis == Some(crate::ir::Axis::Particles) => axis,
        _ => return Err(format!("rule `{}` has no particles", p.info.name)),
    };
    if !(1..=unroll::MAX_PARTICLES).contains(&n) {
        return Err(format!(
            "an ensemble has 1 to {} particles, not {n}",
            unroll::MAX_PARTICLES
        ));
    }
    let bufs = axis.info.buffers.iter().filter(|b| b.axis).count();
    let scalars = axis.info.axis_scalars.len();
    if axis.info.buffers.len() + bufs * (n - 1) > 1 << 16
        || axis.info.scalar_inputs.len() + scalars * (n - 1) > 1 << 16
    {
        return Err(format!(
            "{n} particles would take more than 65,536 buffers or scalar inputs"
        ));
    }
    let mut q = unroll::copies_of(axis, n);
    run_pipeline(&mut q, PIPELINE, &mut |_, _| {});
    Ok(q)
}

/// Runs the passes of `pipeline` in order, calling `observe` with each pass's name and the
/// program after it.
pub fn run_pipeline(p: &mut Program, pipeline: &[&[Pass]], observe: PassObserver<'_>) {
    for (name, pass) in pipeline.iter().flat_map(|part| part.iter()) {
        pass(p);
        observe(name, p);
    }
}

/// The program the runtime runs for these hyperparameter values (one set per parameter group):
/// `base` specialized on the `decisions` every set agrees on (when there are any), then guarded
/// against non-finite inputs when `guard` (a non-finite policy other than proceeding). Borrows
/// `base` when neither applies.
pub fn runnable<'a>(
    base: &'a Program,
    decisions: &specialize::Decisions,
    sets: &[&[f64]],
    guard: bool,
) -> Cow<'a, Program> {
    runnable_with(base, decisions, sets, guard, &mut |_, _| {})
}

/// [`runnable`] for one step whose facts are known: the decisions they settle (`t % I == 0`,
/// comparisons of scalar state, scalar draws) are fixed too, so work under a condition that is
/// false this step runs no pass and reads none of its buffers.
pub fn runnable_at<'a>(
    base: &'a Program,
    decisions: &specialize::Decisions,
    sets: &[&[f64]],
    facts: &specialize::StepFacts<'_>,
    guard: bool,
) -> Cow<'a, Program> {
    runnable_impl(base, decisions, sets, Some(facts), guard, &mut |_, _| {})
}

/// [`runnable`], calling `observe` after each step: `specialize` (the decisions fixed) and the
/// passes of [`SPECIALIZED`], then `guard` (the checks added) and the passes of [`GUARDED`].
pub fn runnable_with<'a>(
    base: &'a Program,
    decisions: &specialize::Decisions,
    sets: &[&[f64]],
    guard: bool,
    observe: PassObserver<'_>,
) -> Cow<'a, Program> {
    runnable_impl(base, decisions, sets, None, guard, observe)
}

fn runnable_impl<'a>(
    base: &'a Program,
    decisions: &specialize::Decisions,
    sets: &[&[f64]],
    facts: Option<&specialize::StepFacts<'_>>,
    guard: bool,
    observe: PassObserver<'_>,
) -> Cow<'a, Program> {
    let mut program = Cow::Borrowed(base);
    if let Some(first) = sets.first() {
        let agreed = decisions.agreeing_at(base, sets, facts);
        if !agreed.is_empty() {
            let mut q = specialize::fixed_at(base, &agreed, first, facts);
            observe("specialize", &q);
            run_pipeline(&mut q, SPECIALIZED, observe);
            program = Cow::Owned(q);
        }
    }
    if guard {
        let mut q = program.into_owned();
        finite::guard(&mut q);
        observe("guard", &q);
        run_pipeline(&mut q, GUARDED, observe);
        program = Cow::Owned(q);
    }
    program
}

#[cfg(test)]
mod tests {
    use super::specialize::{specialize, Decisions};
    use super::{finite::guard_inputs, runnable, runnable_with};
    use std::borrow::Cow;

    const SRC: &str = "rule r(lr = 0.1, amsgrad = false) {
        param theta
        input g
        state v = 0, vmax = 0
        v = 0.9 * v + 0.1 * g * g
        if amsgrad { vmax = max(vmax, v) }
        let vhat = if amsgrad { vmax } else { v }
        theta = theta - lr * g / (sqrt(vhat) + 1e-8)
    }";

    /// A program as text: interface, graph and kernels.
    fn text(p: &crate::ir::Program) -> String {
        use crate::print;
        format!(
            "{}{}{}",
            print::interface(p),
            print::graph(p),
            print::kernels(p)
        )
    }

    fn base() -> crate::ir::Program {
        let mut c = crate::compile(SRC);
        assert!(!c.has_errors(), "{:?}", c.diagnostics);
        c.programs.remove(0)
    }

    #[test]
    fn runnable_is_specialize_then_guard_inputs() {
        let p = base();
        let d = Decisions::of(&p);
        assert_eq!(d.len(), 1);
        for on in [0.0, 1.0] {
            let set = [0.1, on];
            let specialized = specialize(&p, &d, &set);
            assert_eq!(text(&runnable(&p, &d, &[&set], false)), text(&specialized));
            assert_eq!(
                text(&runnable(&p, &d, &[&set], true)),
                text(&guard_inputs(&specialized))
            );
        }
        // Groups that disagree leave the decision in the program.
        let (off, on) = ([0.1, 0.0], [0.1, 1.0]);
        assert!(matches!(
            runnable(&p, &d, &[&off, &on], false),
            Cow::Borrowed(_)
        ));
        assert_eq!(
            text(&runnable(&p, &d, &[&off, &on], true)),
            text(&guard_inputs(&p))
        );
        assert!(matches!(
            runnable(&p, &Decisions::none(), &[&on], false),
            Cow::Borrowed(_)
        ));
        assert!(matches!(runnable(&p, &d, &[], false), Cow::Borrowed(_)));
    }

    #[test]
    fn runnable_with_names_every_step() {
        let p = base();
        let mut names = Vec::new();
        runnable_with(
            &p,
            &Decisions::of(&p),
            &[&[0.1, 1.0]],
            true,
            &mut |name, _| names.push(name.to_string()),
        );
        let expected = "specialize fold simplify cse fold dse phases hoist guard phases hoist";
        assert_eq!(names.join(" "), expected);
    }
}
