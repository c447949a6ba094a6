//! Non-finite inputs: with `Skip` the step is not taken (parameters, state and step counter stay
//! bit-identical, the skip is counted), with `Error` an error is returned and nothing changes, and
//! on finite inputs a guarded optimizer gives exactly the numbers of an unguarded one.

use optc::runtime::{Backend, Error, Inputs, NonFinite, Optimizer};
use std::sync::Arc;

fn make(rule: &str, backend: Backend, policy: NonFinite) -> Optimizer<f32> {
    let p = optc::stdlib_rule(rule).unwrap();
    let params = vec![vec![
        (0..37).map(|i| (i as f32 * 0.4).sin()).collect(),
        vec![0.3; 5],
    ]];
    let mut o = Optimizer::new(Arc::new(p), params)
        .unwrap()
        .with_backend(backend)
        .unwrap()
        .with_non_finite(policy)
        .unwrap();
    if rule == "adan" {
        o.set_hyper("max_grad_norm", 1.0).unwrap();
    }
    o
}

fn grads(s: usize) -> (Vec<f32>, Vec<f32>) {
    (
        (0..37).map(|i| ((i + 3 * s) as f32 * 0.7).cos()).collect(),
        (0..5).map(|i| (i + s) as f32 * 0.1).collect(),
    )
}

fn step(o: &mut Optimizer<f32>, g: &(Vec<f32>, Vec<f32>)) -> Result<(), Error> {
    o.step(&Inputs::default().tensor("g", vec![&g.0, &g.1]))
}

fn snapshot(o: &Optimizer<f32>) -> (Vec<Vec<f32>>, Vec<u8>, u64) {
    (
        o.params(0).to_vec(),
        o.checkpoint_bytes().unwrap(),
        o.steps(),
    )
}

#[test]
fn skip_leaves_everything_and_later_steps_match_a_run_without_the_bad_step() {
    for rule in ["adam", "adan", "sgd", "lamb"] {
        for backend in [Backend::Interpreter, Backend::Cranelift { threads: 2 }] {
            let mut guarded = make(rule, backend, NonFinite::Skip);
            let mut plain = make(rule, backend, NonFinite::Proceed);
            for s in 0..3 {
                step(&mut guarded, &grads(s)).unwrap();
                step(&mut plain, &grads(s)).unwrap();
            }
            assert_eq!(
                guarded.params(0),
                plain.params(0),
                "{rule}: guarding changes no number"
            );
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let before = snapshot(&guarded);
                let mut g = grads(9);
                g.1[4] = bad;
                step(&mut guarded, &g).unwrap();
                assert!(
                    snapshot(&guarded) == before,
                    "{rule} {backend:?}: a skipped step changes nothing"
                );
            }
            assert_eq!(guarded.skipped_steps(), 3);
            for s in 3..6 {
                step(&mut guarded, &grads(s)).unwrap();
                step(&mut plain, &grads(s)).unwrap();
            }
            assert_eq!(guarded.params(0), plain.params(0), "{rule} {backend:?}");
        }
    }
}

#[test]
fn error_reports_and_changes_nothing() {
    let mut o = make("adam", Backend::Cranelift { threads: 1 }, NonFinite::Error);
    step(&mut o, &grads(0)).unwrap();
    let before = snapshot(&o);
    let mut g = grads(1);
    g.0[17] = f32::NAN;
    let e = step(&mut o, &g).unwrap_err();
    assert!(matches!(e, Error::NonFinite { .. }), "{e}");
    assert!(snapshot(&o) == before);
    step(&mut o, &grads(1)).unwrap();
    assert_eq!(o.steps(), 2);
}

#[test]
fn the_check_is_free_when_the_rule_already_reads_its_gradient_first() {
    let adan = make("adan", Backend::Interpreter, NonFinite::Skip);
    let passes = |o: &Optimizer<f32>| o.active_program().variants[1].stages[0].phases.len();
    assert_eq!(
        passes(&adan),
        2,
        "adan with clipping: the check joins the norm's pass"
    );
    let adam = make("adam", Backend::Interpreter, NonFinite::Skip);
    assert_eq!(
        passes(&adam),
        2,
        "adam: one extra pass that reads only the gradient"
    );
    let first_phase_reads: Vec<_> = adam.active_program().variants[1].stages[0].phases[0].kernels
        [0]
    .stores
    .clone();
    assert!(
        first_phase_reads.is_empty(),
        "the first pass stores nothing"
    );
}

#[test]
fn multi_stage_rules_only_proceed() {
    let p = optc::stdlib_rule("n_harpg").unwrap();
    let o = Optimizer::<f32>::new(Arc::new(p), vec![vec![vec![0.0; 3]]]).unwrap();
    assert!(matches!(
        o.with_non_finite(NonFinite::Skip),
        Err(Error::Policy(_))
    ));
}

/// The guard finds one non-finite value wherever it is: every position of tensors whose sizes
/// exercise the unrolled vector loop, the one-vector loop and the scalar tail.
#[test]
fn the_guard_sees_every_position() {
    let p = Arc::new(optc::stdlib_rule("adam").unwrap());
    let sizes = [1usize, 4, 8, 9, 17, 37];
    let params: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.5; n]).collect();
    let mut o = Optimizer::new(p, vec![params.clone()])
        .unwrap()
        .with_backend(Backend::Cranelift { threads: 1 })
        .unwrap()
        .with_non_finite(NonFinite::Skip)
        .unwrap();
    let mut skipped = 0;
    for (t, &n) in sizes.iter().enumerate() {
        for pos in 0..n {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut g: Vec<Vec<f32>> = sizes.iter().map(|&m| vec![-0.25; m]).collect();
                g[t][pos] = bad;
                o.step(&Inputs::default().tensor("g", g.iter().map(Vec::as_slice).collect()))
                    .unwrap();
                skipped += 1;
                assert_eq!(
                    o.skipped_steps(),
                    skipped,
                    "tensor {t}, position {pos}, {bad}"
                );
                assert_eq!(o.steps(), 0);
            }
        }
    }
    assert_eq!(o.params(0), &params[..]);
    // Finite gradients (negative zeros included) are not flagged.
    let g: Vec<Vec<f32>> = sizes.iter().map(|&m| vec![-0.0; m]).collect();
    o.step(&Inputs::default().tensor("g", g.iter().map(Vec::as_slice).collect()))
        .unwrap();
    assert_eq!(o.steps(), 1);
}

/// An optimizer of an inline rule, with the policy.
fn inline(src: &str, backend: Backend, policy: NonFinite) -> Optimizer<f32> {
    let p = optc::compile(src).programs.remove(0);
    Optimizer::new(Arc::new(p), vec![vec![vec![1.0; 37], vec![2.0; 5]]])
        .unwrap()
        .with_backend(backend)
        .unwrap()
        .with_non_finite(policy)
        .unwrap()
}

/// A non-finite value in an input that only a scalar state reads, and a non-finite scalar
/// input, are caught as gradients are: the step is skipped or refused with nothing changed.
#[test]
fn inputs_that_reach_only_scalar_state_and_scalar_inputs_are_guarded() {
    let only_scalar = "rule r(lr = 0.1) { param theta\n input g\n input h\n state c: scalar = 0\n c = c + sum(h)\n theta = theta - lr * g }";
    let only_state =
        "rule r(lr = 0.1) { param theta\n input h\n state c: scalar = 0\n c = c + sum(h) }";
    let scalar_in =
        "rule r(lr = 0.1) { param theta\n input g\n input s: scalar\n theta = theta - lr * s * g }";
    let g = grads(0);
    let mut h = grads(1);
    h.1[3] = f32::NAN;
    for backend in [Backend::Interpreter, Backend::Cranelift { threads: 2 }] {
        for policy in [NonFinite::Skip, NonFinite::Error] {
            for (src, scalar) in [
                (only_scalar, f64::NAN),
                (only_state, 1.0),
                (scalar_in, f64::NAN),
                (scalar_in, f64::INFINITY),
            ] {
                let mut o = inline(src, backend, policy);
                let mut inputs = Inputs::default();
                if src.contains("input g") {
                    inputs = inputs.tensor("g", vec![&g.0, &g.1]);
                }
                if src.contains("input h") {
                    inputs = inputs.tensor("h", vec![&h.0, &h.1]);
                }
                if src.contains("input s") {
                    inputs = inputs.scalar("s", scalar);
                }
                let before = snapshot(&o);
                let r = o.step(&inputs);
                match policy {
                    NonFinite::Error => {
                        assert!(matches!(r, Err(Error::NonFinite { .. })), "{src}: {r:?}")
                    }
                    _ => {
                        r.unwrap();
                        assert_eq!(o.skipped_steps(), 1, "{src}");
                    }
                }
                assert_eq!(snapshot(&o), before, "{src}: nothing changed");
                if src.contains("scalar = 0") {
                    assert_eq!(o.scalar_state("c"), Some(0.0));
                }
            }
        }
    }
}
