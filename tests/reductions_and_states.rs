//! Rules `optc check` accepts that used to panic when run, and states nothing reads: each run on
//! the reference interpreter and on Cranelift, against a hand computation.
//!
//! - A reduction of inputs only, nested in a reduction of a stage's values, must be computed no
//!   later than that stage (it was planned for the last stage, after its use).
//! - A reduction whose argument folds to a scalar (a select on a hyperparameter) still reduces over
//!   the elements of its space (the argument was left scalar, and the kernels evaluated a
//!   per-element node as a scalar).
//! - A state that nothing reads is still updated: `buffer("m")` and checkpoints see it.

use optc::runtime::{Backend, Inputs, Optimizer};
use std::sync::Arc;

const BACKENDS: [Backend; 2] = [Backend::Interpreter, Backend::Cranelift { threads: 2 }];

fn optimizer(src: &str, params: Vec<Vec<Vec<f32>>>, backend: Backend) -> Optimizer<f32> {
    let program = optc::compile_rule(src).unwrap_or_else(|e| panic!("{e}"));
    Optimizer::new(Arc::new(program), params)
        .expect("optimizer")
        .with_backend(backend)
        .expect("backend")
}

/// The gradient of step `s` (1-based), element `i` of tensor `j`.
fn grad(s: usize, j: usize, i: usize) -> f32 {
    0.25 * (s as f32) - 0.5 * (i as f32) + j as f32
}

#[test]
fn an_input_reduction_nested_in_a_stage_reduction_is_ready_in_that_stage() {
    let src = "rule r() {
        param p
        input g
        state c: scalar = 0
        stage a { c = sum(p + sum(g)) }
        stage b { p = p - g }
    }";
    let sizes = [3usize, 5];
    for backend in BACKENDS {
        let p0: Vec<Vec<f32>> = sizes
            .iter()
            .map(|&n| (0..n).map(|i| 1.0 + i as f32).collect())
            .collect();
        let mut opt = optimizer(src, vec![p0.clone()], backend);
        let mut p: Vec<Vec<f64>> = p0
            .iter()
            .map(|t| t.iter().map(|&v| v as f64).collect())
            .collect();
        for s in 1..=4 {
            let g: Vec<Vec<f32>> = sizes
                .iter()
                .enumerate()
                .map(|(j, &n)| (0..n).map(|i| grad(s, j, i)).collect())
                .collect();
            opt.step(&Inputs::default().tensor("g", g.iter().map(|t| t.as_slice()).collect()))
                .expect("step");
            // Stage a reads p before stage b updates it.
            let sum_g: f64 = g.iter().flatten().map(|&v| v as f64).sum();
            let n: usize = sizes.iter().sum();
            let want_c = p.iter().flatten().sum::<f64>() + n as f64 * sum_g;
            let got_c = opt.scalar_state("c").expect("c");
            assert!(
                (got_c - want_c).abs() <= 1e-9 * want_c.abs().max(1.0),
                "{backend:?} step {s}: c = {got_c}, want {want_c}"
            );
            for (pt, gt) in p.iter_mut().zip(&g) {
                for (x, &d) in pt.iter_mut().zip(gt) {
                    *x -= d as f64;
                }
            }
            for (j, (got, want)) in opt.params(0).iter().zip(&p).enumerate() {
                for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
                    assert_eq!(a as f64, b, "{backend:?} step {s}: p[{j}][{i}]");
                }
            }
        }
    }
}

#[test]
fn a_reduction_of_a_select_folded_to_a_scalar_reduces_over_the_elements() {
    let src = "rule r(h = -1) {
        param x, y
        input g: y
        y = if t > 4 { tensor_sum(if h > 0 { y } else { h }) } else { g }
    }";
    let sizes = [3usize, 5];
    for h in [-1.0, 1.0, -2.5] {
        for backend in BACKENDS {
            let y0: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.5; n]).collect();
            let mut opt = optimizer(src, vec![vec![vec![7.0; 2]], y0], backend);
            opt.set_hyper("h", h).expect("h");
            let mut y: Vec<Vec<f64>> = sizes.iter().map(|&n| vec![0.5; n]).collect();
            for s in 1..=7 {
                let g: Vec<Vec<f32>> = sizes
                    .iter()
                    .enumerate()
                    .map(|(j, &n)| (0..n).map(|i| grad(s, j, i)).collect())
                    .collect();
                opt.step(&Inputs::default().tensor("g", g.iter().map(|t| t.as_slice()).collect()))
                    .expect("step");
                for (j, yt) in y.iter_mut().enumerate() {
                    let v: Vec<f64> = if s > 4 {
                        let total = if h > 0.0 {
                            yt.iter().sum::<f64>()
                        } else {
                            h * yt.len() as f64
                        };
                        vec![total; yt.len()]
                    } else {
                        g[j].iter().map(|&v| v as f64).collect()
                    };
                    *yt = v;
                }
                for (j, (got, want)) in opt.params(1).iter().zip(&y).enumerate() {
                    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
                        assert!(
                            (a as f64 - b).abs() <= 1e-5 * b.abs().max(1.0),
                            "{backend:?} h = {h} step {s}: y[{j}][{i}] = {a}, want {b}"
                        );
                    }
                }
                assert_eq!(opt.params(0), &[vec![7.0f32; 2]][..]);
            }
        }
    }
}

#[test]
fn a_state_nothing_reads_is_still_updated() {
    let src = "rule r(lr = 0.5) {
        param p
        input g
        state m = 0
        state k: scalar = 0
        m = m + g
        k = k + 1
        p = p - lr * g
    }";
    for backend in BACKENDS {
        let mut opt = optimizer(src, vec![vec![vec![1.0, 2.0, 3.0]]], backend);
        let mut m = [0.0f32; 3];
        for s in 1..=3 {
            let g: Vec<f32> = (0..3).map(|i| grad(s, 0, i)).collect();
            opt.step(&Inputs::default().tensor("g", vec![g.as_slice()]))
                .expect("step");
            for (m, g) in m.iter_mut().zip(&g) {
                *m += g;
            }
            assert_eq!(opt.buffer("m").expect("m")[0], m, "{backend:?} step {s}");
            assert_eq!(opt.scalar_state("k"), Some(s as f64));
        }
    }
    // And the compiled program stores it.
    let program = optc::compile_rule(src).expect("compiles");
    let m = program.info.buffer("m").expect("m");
    for v in &program.variants {
        assert!(
            v.stages[0].stores.iter().any(|&(b, _)| b == m),
            "m is stored"
        );
    }
}
