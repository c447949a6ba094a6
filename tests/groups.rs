//! Parameter groups (each tensor updates with its own group's hyperparameter values; reductions
//! span every group) and params lent by the host at each step.

use optc::runtime::{Backend, Error, Inputs, Optimizer, Schedule, TensorSpec};
use std::sync::Arc;

mod common;
use common::fill_grid;

const BACKENDS: [Backend; 2] = [Backend::Interpreter, Backend::Cranelift { threads: 2 }];

const LENS: [usize; 3] = [17, 1, 300];

fn specs() -> Vec<Vec<TensorSpec>> {
    vec![vec![
        TensorSpec::new("layer.weight", &[17]),
        TensorSpec::new("layer.bias", &[]),
        TensorSpec::new("head.weight", &[3, 100]),
    ]]
}

fn lent(rule: &str, backend: Backend) -> Optimizer<f32> {
    let p = Arc::new(optc::stdlib_rule(rule).unwrap());
    Optimizer::lending(p, specs())
        .unwrap()
        .with_backend(backend)
        .unwrap()
}

fn grads(step: u64) -> Vec<Vec<f32>> {
    LENS.iter()
        .enumerate()
        .map(|(j, &n)| fill_grid(step * 7 + j as u64, n))
        .collect()
}

/// Runs `steps` steps of a lent optimizer over fresh params; returns the params.
fn run(opt: &mut Optimizer<f32>, steps: u64) -> Vec<Vec<f32>> {
    let mut params: Vec<Vec<f32>> = LENS
        .iter()
        .enumerate()
        .map(|(j, &n)| fill_grid(100 + j as u64, n))
        .collect();
    for s in 0..steps {
        let g = grads(s);
        let inputs = Inputs::default().tensor("g", g.iter().map(Vec::as_slice).collect());
        let mut lend: Vec<&mut [f32]> = params.iter_mut().map(Vec::as_mut_slice).collect();
        opt.step_with(std::slice::from_mut(&mut lend), &inputs)
            .unwrap();
    }
    params
}

/// A grouped optimizer's tensors equal, bit for bit, those of single-group optimizers that give
/// every tensor that group's values: per-tensor rules, a rule whose global clipping norm spans
/// all groups (adan), and groups that disagree on a specialization decision (amsgrad).
#[test]
fn each_tensor_follows_its_group() {
    type Values = Vec<(&'static str, f64)>;
    let cases: Vec<(&str, Values, Values)> = vec![
        (
            "adam",
            vec![("lr", 0.01), ("weight_decay", 0.1)],
            vec![("lr", 0.003), ("weight_decay", 0.0), ("amsgrad", 1.0)],
        ),
        (
            "adan",
            vec![("lr", 0.02), ("max_grad_norm", 0.5)],
            vec![("lr", 0.005), ("weight_decay", 0.3)],
        ),
        (
            "lion",
            vec![("lr", 0.001)],
            vec![("beta1", 0.8), ("lr", 0.002)],
        ),
        (
            "sgd",
            vec![("lr", 0.1), ("momentum", 0.9)],
            vec![("nesterov", 1.0)],
        ),
    ];
    for backend in BACKENDS {
        for (rule, base, group) in &cases {
            let mut grouped = lent(rule, backend);
            for (k, v) in base {
                grouped.set_hyper(k, *v).unwrap();
            }
            let g = grouped.add_group(&["head.weight"], group).unwrap();
            assert_eq!(g, 1);
            assert_eq!(grouped.group_of("head.weight"), Some(1));
            assert_eq!(grouped.group_of("layer.bias"), Some(0));
            let got = run(&mut grouped, 6);

            let mut only_base = lent(rule, backend);
            let mut only_group = lent(rule, backend);
            for (k, v) in base {
                only_base.set_hyper(k, *v).unwrap();
                only_group.set_hyper(k, *v).unwrap();
            }
            for (k, v) in group {
                only_group.set_hyper(k, *v).unwrap();
            }
            let want_base = run(&mut only_base, 6);
            let want_group = run(&mut only_group, 6);
            assert_eq!(got[0], want_base[0], "{rule} {backend:?}: group 0 tensor");
            assert_eq!(got[1], want_base[1], "{rule} {backend:?}: group 0 tensor");
            assert_eq!(got[2], want_group[2], "{rule} {backend:?}: group 1 tensor");
            assert_ne!(want_base[2], want_group[2], "{rule}: the groups differ");
        }
    }
}

/// A value not overridden follows group 0, also when group 0 changes later; schedules scale
/// every group.
#[test]
fn groups_inherit_and_follow_schedules() {
    let mut o = lent("adam", Backend::Cranelift { threads: 1 });
    let g = o.add_group(&["layer.bias"], &[("lr", 0.5)]).unwrap();
    o.set_hyper("beta1", 0.7).unwrap();
    assert_eq!(o.group_hyper(g, "beta1"), Some(0.7));
    assert_eq!(o.group_hyper(g, "lr"), Some(0.5));
    o.set_group_hyper(g, "lr", 0.25).unwrap();
    assert_eq!(o.group_hyper(g, "lr"), Some(0.25));
    assert_eq!(o.group_count(), 2);
    o.set_schedule("lr", Schedule::parse("linear_decay(10)").unwrap())
        .unwrap();
    let got = run(&mut o, 3);

    // By hand: a group-1-only optimizer whose lr follows the same schedule from 0.25.
    let mut by_hand = lent("adam", Backend::Cranelift { threads: 1 });
    by_hand.set_hyper("beta1", 0.7).unwrap();
    by_hand.set_hyper("lr", 0.25).unwrap();
    by_hand
        .set_schedule("lr", Schedule::parse("linear_decay(10)").unwrap())
        .unwrap();
    let want = run(&mut by_hand, 3);
    assert_eq!(got[1], want[1]);
}

#[test]
fn group_errors_change_nothing() {
    let mut o = lent("adam", Backend::Interpreter);
    assert_eq!(
        o.add_group(&["nope"], &[("lr", 0.1)]),
        Err(Error::UnknownTensor("nope".into()))
    );
    assert!(matches!(
        o.add_group(&["layer.bias"], &[("lr", -1.0)]),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        o.add_group(&["layer.bias"], &[("betta", 0.5)]),
        Err(Error::UnknownHyper { .. })
    ));
    assert!(matches!(
        o.set_group_hyper(3, "lr", 0.1),
        Err(Error::Group(_))
    ));
    assert_eq!(o.group_count(), 1);
    assert_eq!(o.group_of("layer.bias"), Some(0));

    // A hyperparameter that scalar state reads is shared by all groups.
    let p = Arc::new(optc::stdlib_rule("penalty_bilevel").unwrap());
    let mut b = Optimizer::<f32>::new(
        p,
        vec![vec![vec![0.0; 3]], vec![vec![0.0; 2]], vec![vec![0.0; 2]]],
    )
    .unwrap();
    let e = b.add_group(&["x[0]"], &[("c_lam", 0.5)]).unwrap_err();
    assert!(e.to_string().contains("scalar state"), "{e}");
    assert_eq!(b.group_count(), 1);
    // Others may differ.
    assert_eq!(b.add_group(&["x[0]"], &[("c_x", 0.5)]), Ok(1));
    // Not even an override equal to today's value (group 0 may change later).
    assert!(matches!(
        b.set_group_hyper(1, "c_lam", 0.1),
        Err(Error::Group(_))
    ));
    assert_eq!(b.group_hyper(1, "c_lam"), b.hyper("c_lam"));
}

/// An optimizer that borrows the host's params equals one that owns them, bit for bit, on both
/// backends, for one- and two-stage rules.
#[test]
fn lent_params_equal_owned_params() {
    for backend in BACKENDS {
        for rule in ["adamw", "lamb", "n_harpg"] {
            let p = Arc::new(optc::stdlib_rule(rule).unwrap());
            let init: Vec<Vec<f32>> = LENS
                .iter()
                .enumerate()
                .map(|(j, &n)| fill_grid(100 + j as u64, n))
                .collect();
            let mut owned = Optimizer::new(Arc::clone(&p), vec![init.clone()])
                .unwrap()
                .with_backend(backend)
                .unwrap();
            let mut borrowing = lent(rule, backend);
            let mut params = init.clone();
            let info = p.info.clone();
            for s in 0..4 {
                let g = grads(s);
                let mut inputs = Inputs::default();
                for b in info
                    .buffers
                    .iter()
                    .filter(|b| b.role == optc::compiler::ir::BufRole::Input)
                {
                    inputs = inputs.tensor(&b.name, g.iter().map(Vec::as_slice).collect());
                }
                for n in &info.scalar_inputs {
                    inputs = inputs.scalar(n, 0.3);
                }
                if info.stages.len() > 1 {
                    for k in 0..info.stages.len() {
                        owned.run_stage(k, &inputs).unwrap();
                        let mut lend: Vec<&mut [f32]> =
                            params.iter_mut().map(Vec::as_mut_slice).collect();
                        borrowing
                            .run_stage_with(k, std::slice::from_mut(&mut lend), &inputs)
                            .unwrap();
                    }
                } else {
                    owned.step(&inputs).unwrap();
                    let mut lend: Vec<&mut [f32]> =
                        params.iter_mut().map(Vec::as_mut_slice).collect();
                    borrowing
                        .step_with(std::slice::from_mut(&mut lend), &inputs)
                        .unwrap();
                }
            }
            assert_eq!(owned.params(0), &params[..], "{rule} {backend:?}");
            for b in info
                .buffers
                .iter()
                .filter(|b| b.role == optc::compiler::ir::BufRole::State)
            {
                assert_eq!(
                    owned.buffer(&b.name),
                    borrowing.buffer(&b.name),
                    "{rule}: {}",
                    b.name
                );
            }
        }
    }
}

#[test]
fn lending_errors_change_nothing() {
    let mut o = lent("adam", Backend::Cranelift { threads: 1 });
    let mut params = run(&mut o, 2);
    let before_m = o.buffer("m").unwrap().to_vec();
    let before = params.clone();
    let g = grads(9);
    let inputs = Inputs::default().tensor("g", g.iter().map(Vec::as_slice).collect());

    // Not lent.
    assert!(matches!(o.step(&inputs), Err(Error::Params(_))));
    // A tensor of the wrong length, named in the error.
    let mut short = params[2][..299].to_vec();
    {
        let (a, b) = params.split_at_mut(1);
        let mut lend: Vec<&mut [f32]> = vec![&mut a[0], &mut b[0], &mut short];
        let e = o
            .step_with(std::slice::from_mut(&mut lend), &inputs)
            .unwrap_err();
        assert!(e.to_string().contains("head.weight"), "{e}");
    }
    // Too few tensors.
    {
        let mut lend: Vec<&mut [f32]> = params[..2].iter_mut().map(Vec::as_mut_slice).collect();
        assert!(matches!(
            o.step_with(std::slice::from_mut(&mut lend), &inputs),
            Err(Error::Length { .. })
        ));
    }
    assert_eq!(params, before);
    assert_eq!(o.buffer("m").unwrap(), &before_m[..]);
    assert_eq!(o.steps(), 2);

    // An owning optimizer refuses lent params.
    let p = Arc::new(optc::stdlib_rule("adam").unwrap());
    let mut owned = Optimizer::new(p.clone(), vec![vec![vec![0.0f32; 2]]]).unwrap();
    let mut x = vec![0.0f32; 2];
    let mut lend: Vec<&mut [f32]> = vec![&mut x];
    assert!(matches!(
        owned.step_with(
            std::slice::from_mut(&mut lend),
            &Inputs::default().tensor("g", vec![&[1.0, 1.0]])
        ),
        Err(Error::Params(_))
    ));
    assert_eq!(owned.steps(), 0);

    // Two tensors with one name.
    let dup = vec![vec![TensorSpec::new("w", &[2]), TensorSpec::new("w", &[3])]];
    assert!(matches!(
        Optimizer::<f32>::lending(p, dup),
        Err(Error::Params(_))
    ));
}

/// Groups travel in checkpoints; a resumed grouped run equals one that never stopped.
#[test]
fn groups_survive_checkpoints() {
    for backend in BACKENDS {
        let mut straight = lent("adamw", backend);
        straight
            .add_group(&["layer.bias", "head.weight"], &[("weight_decay", 0.0)])
            .unwrap();
        let want = run(&mut straight, 4);

        let mut first = lent("adamw", backend);
        first
            .add_group(&["layer.bias", "head.weight"], &[("weight_decay", 0.0)])
            .unwrap();
        let mut params = run(&mut first, 2);
        let bytes = first.checkpoint_bytes().unwrap();
        let mut resumed = lent("adamw", backend);
        resumed.load_checkpoint_bytes(&bytes).unwrap();
        assert_eq!(resumed.group_of("head.weight"), Some(1));
        assert_eq!(resumed.group_hyper(1, "weight_decay"), Some(0.0));
        for s in 2..4 {
            let g = grads(s);
            let inputs = Inputs::default().tensor("g", g.iter().map(Vec::as_slice).collect());
            let mut lend: Vec<&mut [f32]> = params.iter_mut().map(Vec::as_mut_slice).collect();
            resumed
                .step_with(std::slice::from_mut(&mut lend), &inputs)
                .unwrap();
        }
        assert_eq!(params, want);

        // An optimizer without those tensor names refuses the checkpoint.
        let p = Arc::new(optc::stdlib_rule("adamw").unwrap());
        let other: Vec<Vec<TensorSpec>> = vec![LENS
            .iter()
            .enumerate()
            .map(|(j, &n)| TensorSpec::new(format!("t{j}"), &[n]))
            .collect()];
        let mut o = Optimizer::<f32>::lending(p, other).unwrap();
        let e = o.load_checkpoint_bytes(&bytes).unwrap_err();
        assert!(e.to_string().contains("layer.bias"), "{e}");
        assert_eq!(o.steps(), 0);
        assert_eq!(o.group_count(), 1);
    }
}
