//! Work that is off costs nothing: statements under a scalar condition that is false this step
//! (`t % I == 0`, a comparison of scalar state, a scalar draw) run no pass, read and write none
//! of their buffers and do not need their inputs; `stage_needs` says so before each step and
//! follows `set_hyper`. Scalar inputs fall under the non-finite policy.

use optc::compiler::ir::{Node, Program};
use optc::runtime::{Backend, Error, Inputs, NonFinite, Optimizer, StageNeeds};
use std::collections::BTreeSet;
use std::sync::Arc;

mod common;
use common::fill;

/// BO-REP's shape: the upper level every step, the lower level every `I` steps.
const PERIODIC: &str = r#"
rule periodic(I = 3, gamma = 0.1, lr = 0.01) {
    param x, y
    input gx: x
    input gy: y
    x = x - lr * gx
    if t % I == 0 { y = y - gamma * gy }
}
"#;

fn program(src: &str) -> Arc<Program> {
    Arc::new(optc::compile_rule(src).expect("rule compiles"))
}

/// The buffers the kernels of a program load or store.
fn touched(p: &Program) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for v in &p.variants {
        for s in &v.stages {
            for ph in &s.phases {
                for k in &ph.kernels {
                    for &n in &k.loads {
                        if let Node::Load { buf, .. } = p.graph.node(n) {
                            out.insert(p.info.buffers[buf as usize].name.clone());
                        }
                    }
                    for &(b, _) in &k.stores {
                        out.insert(p.info.buffers[b as usize].name.clone());
                    }
                }
            }
        }
    }
    out
}

fn names(p: &Program, n: &StageNeeds) -> Vec<String> {
    n.tensors
        .iter()
        .map(|&b| p.info.buffers[b as usize].name.clone())
        .collect()
}

#[test]
fn off_steps_need_no_input_and_touch_no_buffer_of_the_work_that_is_off() {
    let p = program(PERIODIC);
    for backend in [
        Backend::Interpreter,
        Backend::Cranelift { threads: 2 },
        Backend::Native { threads: 2 },
    ] {
        if matches!(backend, Backend::Native { .. })
            && optc::runtime::engine::native::Toolchain::find().is_err()
        {
            println!("skipping the native engine: no C compiler");
            continue;
        }
        let (x0, y0) = (fill(1, 1000), fill(2, 37));
        let mut opt = Optimizer::new(Arc::clone(&p), vec![vec![x0.clone()], vec![y0.clone()]])
            .expect("bind")
            .with_backend(backend)
            .expect("backend");
        let (mut x, mut y) = (x0, y0);
        for t in 1..=7u32 {
            let on = t % 3 == 0;
            let needs = opt.stage_needs(0).expect("stage 0");
            let want: Vec<&str> = if on { vec!["gx", "gy"] } else { vec!["gx"] };
            assert_eq!(names(&p, &needs), want, "{backend:?} step {t}");
            let gx = fill(10 + u64::from(t), 1000);
            let gy = fill(20 + u64::from(t), 37);
            let mut inputs = Inputs::default().tensor("gx", vec![&gx[..]]);
            if on {
                // Without gy, the step is refused and changes nothing.
                let before = opt.params(1).to_vec();
                let e = opt.step(&inputs).expect_err("gy is needed");
                assert!(
                    matches!(e, Error::MissingInput { ref name, .. } if name == "gy"),
                    "{e}"
                );
                assert_eq!(opt.params(1), &before[..]);
                inputs = inputs.tensor("gy", vec![&gy[..]]);
            }
            opt.step(&inputs).expect("step");
            // The program that ran touches y and gy only on steps that update y.
            let t_buf = touched(opt.active_program());
            assert_eq!(t_buf.contains("gy"), on, "{backend:?} step {t}: {t_buf:?}");
            assert_eq!(t_buf.contains("y"), on, "{backend:?} step {t}: {t_buf:?}");
            for (xi, g) in x.iter_mut().zip(&gx) {
                *xi -= (0.01f64 as f32) * g;
            }
            if on {
                for (yi, g) in y.iter_mut().zip(&gy) {
                    *yi -= (0.1f64 as f32) * g;
                }
            }
            assert_eq!(opt.params(0)[0], x, "{backend:?} x at step {t}");
            assert_eq!(opt.params(1)[0], y, "{backend:?} y at step {t}");
        }
    }
}

#[test]
fn stage_needs_follows_set_hyper_and_the_step_counter() {
    let p = program(PERIODIC);
    let mut opt =
        Optimizer::new(Arc::clone(&p), vec![vec![fill(1, 10)], vec![fill(2, 10)]]).expect("bind");
    let gy_needed = |o: &Optimizer<f32>| names(&p, &o.stage_needs(0).expect("stage 0")).len() == 2;
    // t = 1: 1 % 3 != 0.
    assert!(!gy_needed(&opt));
    opt.set_hyper("I", 1.0).expect("I");
    assert!(gy_needed(&opt));
    opt.set_hyper("I", 2.0).expect("I");
    assert!(!gy_needed(&opt));
    let g = fill(3, 10);
    opt.step(&Inputs::default().tensor("gx", vec![&g[..]]))
        .expect("step 1");
    // t = 2: on.
    assert!(gy_needed(&opt));
    assert!(opt.stage_needs(1).is_err(), "a stage past the end");
}

#[test]
fn scalar_state_and_scalar_draws_decide_too() {
    // Work gated by a scalar state (a counter) and by a scalar draw with probability p: each
    // step runs only what is on, and the results are those of the rule as written.
    let src = r#"
    rule gated(p = 0.5) {
        param x
        input g
        state n: scalar = 0
        state hits: scalar = 0
        state acc = 0
        let coin = uniform() < p
        if coin { acc = acc + g }
        if coin { hits = hits + 1 }
        if n >= 2 { x = x - 0.5 * acc }
        n = n + 1
    }
    "#;
    let p = program(src);
    let mut opt = Optimizer::new(Arc::clone(&p), vec![vec![fill(1, 100)]])
        .expect("bind")
        .with_backend(Backend::Cranelift { threads: 2 })
        .expect("backend");
    opt.set_seed(11);
    let mut reference = Optimizer::new(Arc::clone(&p), vec![vec![fill(1, 100)]])
        .expect("bind")
        .with_specialization(false)
        .expect("general program");
    reference.set_seed(11);
    let mut offs = 0;
    for t in 1..=12u64 {
        let g = fill(t, 100);
        let i = Inputs::default().tensor("g", vec![&g[..]]);
        opt.step(&i).expect("step");
        reference.step(&i).expect("step");
        let coin = optc::compiler::random::draw(
            optc::compiler::random::Dist::Uniform,
            11,
            t,
            optc::compiler::random::inline_stream(0, 0),
            0,
        ) < 0.5;
        let touched = touched(opt.active_program());
        assert_eq!(touched.contains("g"), coin, "step {t}: {touched:?}");
        assert_eq!(touched.contains("x"), t >= 3, "step {t}: {touched:?}");
        offs += usize::from(!coin);
        assert_eq!(opt.params(0), reference.params(0), "step {t}");
        assert_eq!(opt.buffer("acc"), reference.buffer("acc"), "step {t}");
        assert_eq!(opt.scalar_state("hits"), reference.scalar_state("hits"));
    }
    assert!(
        offs > 0 && offs < 12,
        "the coin lands both ways in 12 steps"
    );
}

#[test]
fn a_non_finite_scalar_input_falls_under_the_policy() {
    // Normalized GD: the step divided by the loss.
    let src =
        "rule ngd(lr = 0.1) { param x\n input g\n input loss: scalar\n x = x - lr * g / loss }";
    let p = program(src);
    let g = fill(5, 16);
    for bad in [f64::NAN, f64::INFINITY] {
        let inputs = Inputs::default()
            .tensor("g", vec![&g[..]])
            .scalar("loss", bad);
        // Skip: nothing changes, the step is counted.
        let mut opt = Optimizer::new(Arc::clone(&p), vec![vec![fill(1, 16)]])
            .expect("bind")
            .with_non_finite(NonFinite::Skip)
            .expect("policy");
        opt.step(&inputs).expect("skipped");
        assert_eq!(opt.params(0)[0], fill(1, 16));
        assert_eq!(opt.skipped_steps(), 1);
        assert_eq!(opt.steps(), 0);
        // Error: an error, nothing changes.
        let mut opt = Optimizer::new(Arc::clone(&p), vec![vec![fill(1, 16)]])
            .expect("bind")
            .with_non_finite(NonFinite::Error)
            .expect("policy");
        assert!(matches!(opt.step(&inputs), Err(Error::NonFinite { .. })));
        assert_eq!(opt.params(0)[0], fill(1, 16));
        // Proceed (the default): the value is used as given.
        let mut opt = Optimizer::new(Arc::clone(&p), vec![vec![fill(1, 16)]]).expect("bind");
        opt.step(&inputs).expect("proceeds");
        if bad.is_nan() {
            assert!(opt.params(0)[0].iter().all(|v| v.is_nan()));
        } else {
            // g / inf = 0: the step moves nothing.
            assert_eq!(opt.params(0)[0], fill(1, 16));
        }
        assert_eq!(opt.steps(), 1);
    }
}
