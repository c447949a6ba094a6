//! Specialization on hyperparameter decisions: a disabled option costs no pass and no traffic,
//! and flipping it mid-run gives the same numbers as the general program.

use optc::compiler::ir::{Node, Program};
use optc::runtime::{Backend, Inputs, Optimizer};
use std::sync::Arc;

fn later_passes(p: &Program) -> usize {
    p.variants[1].stages.iter().map(|s| s.phases.len()).sum()
}

fn later_buffers(p: &Program) -> Vec<String> {
    let mut names = std::collections::BTreeSet::new();
    for s in &p.variants[1].stages {
        for ph in &s.phases {
            for k in &ph.kernels {
                for &n in &k.loads {
                    if let Node::Load { buf, .. } = p.graph.node(n) {
                        names.insert(p.info.buffers[buf as usize].name.clone());
                    }
                }
                for &(b, _) in &k.stores {
                    names.insert(p.info.buffers[b as usize].name.clone());
                }
            }
        }
    }
    names.into_iter().collect()
}

fn optimizer(rule: &str, n: usize) -> Optimizer<f32> {
    let p = optc::stdlib_rule(rule).unwrap();
    Optimizer::new(Arc::new(p), vec![vec![vec![0.5; n], vec![-0.25; 3]]]).unwrap()
}

fn step(opt: &mut Optimizer<f32>, seed: f32) {
    let g0: Vec<f32> = (0..opt.params(0)[0].len())
        .map(|i| (i as f32 * 0.37 + seed).sin())
        .collect();
    let g1 = [seed, -seed, 0.5 * seed];
    opt.step(&Inputs::default().tensor("g", vec![&g0, &g1]))
        .unwrap();
}

#[test]
fn disabled_options_cost_nothing() {
    let mut adan = optimizer("adan", 10);
    step(&mut adan, 0.1);
    step(&mut adan, 0.2);
    assert_eq!(
        later_passes(adan.active_program()),
        1,
        "no clipping: one pass"
    );
    adan.set_hyper("max_grad_norm", 1.0).unwrap();
    step(&mut adan, 0.3);
    assert_eq!(
        later_passes(adan.active_program()),
        2,
        "clipping needs the global norm first"
    );
    assert_eq!(
        later_passes(adan.program()),
        2,
        "the general program keeps both"
    );

    let mut adam = optimizer("adam", 10);
    step(&mut adam, 0.1);
    step(&mut adam, 0.2);
    assert!(
        !later_buffers(adam.active_program()).contains(&"vmax".to_string()),
        "{:?}",
        later_buffers(adam.active_program())
    );
    adam.set_hyper("amsgrad", 1.0).unwrap();
    step(&mut adam, 0.3);
    assert!(later_buffers(adam.active_program()).contains(&"vmax".to_string()));
}

#[test]
fn flipping_decisions_mid_run_matches_a_run_that_never_specialized() {
    // Reference: the general program on the interpreter, with the same changes.
    for (rule, hyper, on) in [
        ("adan", "max_grad_norm", 0.5),
        ("adam", "amsgrad", 1.0),
        ("lion", "cautious", 1.0),
        ("sgd", "nesterov", 1.0),
    ] {
        for backend in [Backend::Interpreter, Backend::Cranelift { threads: 2 }] {
            let mut a = optimizer(rule, 37).with_backend(backend).unwrap();
            let mut b = optimizer(rule, 37).with_specialization(false).unwrap();
            if rule == "sgd" {
                a.set_hyper("momentum", 0.9).unwrap();
                b.set_hyper("momentum", 0.9).unwrap();
            }
            for s in 0..6 {
                let v = if (2..4).contains(&s) { on } else { 0.0 };
                a.set_hyper(hyper, v).unwrap();
                b.set_hyper(hyper, v).unwrap();
                step(&mut a, 0.1 * s as f32 + 0.05);
                step(&mut b, 0.1 * s as f32 + 0.05);
            }
            for (x, y) in a
                .params(0)
                .iter()
                .flatten()
                .zip(b.params(0).iter().flatten())
            {
                assert!(
                    (x - y).abs() <= 1e-6 * x.abs().max(1e-3),
                    "{rule} {backend:?}: {x} vs {y}"
                );
            }
        }
    }
}
