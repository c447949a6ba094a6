//! The Cranelift backend against the reference interpreter: every standard-library rule, over
//! awkward sizes (0, 1, vector width ± 1, not a multiple of the chunk) and many tensors at once,
//! for several steps; and bit-identical results for any number of threads.

use optc::compiler::ir::{BufRole, Program};
use optc::runtime::{Backend, Inputs, Optimizer};
use std::sync::Arc;

/// Awkward sizes, all in one parameter group.
const SIZES: &[usize] = &[0, 1, 3, 4, 5, 7, 8, 15, 16, 17, 1023, 4097];
const STEPS: usize = 3;

mod common;
use common::OPTIONS;
use common::{fill, ulps};

struct Run {
    params: Vec<Vec<Vec<f32>>>,
    state: Vec<(String, Vec<Vec<f32>>)>,
}

/// Runs `steps` steps of a rule on a backend; every tensor of every space has the sizes given.
fn run(
    program: &Program,
    sizes: &[usize],
    backend: Backend,
    hypers: &[(&str, f64)],
    steps: usize,
) -> Run {
    let info = &program.info;
    let params: Vec<Vec<Vec<f32>>> = (0..info.spaces.len())
        .map(|s| {
            sizes
                .iter()
                .enumerate()
                .map(|(j, &n)| fill(1000 * s as u64 + j as u64, n))
                .collect()
        })
        .collect();
    let mut opt = Optimizer::new(Arc::new(program.clone()), params)
        .expect("bind")
        .with_backend(backend)
        .expect("backend");
    for (h, v) in hypers {
        if info.hyper(h).is_some() {
            opt.set_hyper(h, *v).expect("hyper");
        }
    }
    for step in 0..steps {
        let data: Vec<(String, Vec<Vec<f32>>)> = info
            .buffers
            .iter()
            .enumerate()
            .filter(|(_, b)| b.role == BufRole::Input)
            .map(|(bi, b)| {
                (
                    b.name.clone(),
                    sizes
                        .iter()
                        .enumerate()
                        .map(|(j, &n)| fill((step * 7919 + bi * 104729 + j) as u64 + 17, n))
                        .collect(),
                )
            })
            .collect();
        let mut inputs = Inputs::default();
        for (n, d) in &data {
            inputs = inputs.tensor(n, d.iter().map(|v| v.as_slice()).collect());
        }
        for s in &info.scalar_inputs {
            inputs = inputs.scalar(s, 0.25 + 0.5 * (step as f64 / steps as f64));
        }
        opt.step(&inputs).expect("step");
    }
    let state = info
        .buffers
        .iter()
        .filter(|b| b.role != BufRole::Input)
        .map(|b| {
            (
                b.name.clone(),
                opt.buffer(&b.name).expect("buffer").to_vec(),
            )
        })
        .collect();
    Run {
        params: (0..info.spaces.len())
            .map(|s| opt.params(s).to_vec())
            .collect(),
        state,
    }
}

/// Whether a rule's kernels use a function the backends approximate differently (within 2 ulp).
fn transcendental(name: &str) -> bool {
    let src = optc::stdlib::source(name).unwrap_or_default();
    ["exp(", "log(", "sigmoid(", "tanh(", "log1p(", "expm1("]
        .iter()
        .any(|f| src.contains(f))
}

fn compare(name: &str, a: &Run, b: &Run, max_ulps: u64) -> Result<(), String> {
    for ((an, ad), (_, bd)) in a.state.iter().zip(&b.state) {
        for (j, (x, y)) in ad.iter().zip(bd).enumerate() {
            // Where a function's last-bit difference is followed by cancellation (θ - Δ near 0),
            // ulps of the small result mean nothing: measure those in ulps of the tensor's scale.
            let scale = if transcendental(name) {
                x.iter().fold(0f32, |m, v| m.max(v.abs()))
            } else {
                0.0
            };
            for (e, (&u, &v)) in x.iter().zip(y).enumerate() {
                let d = ulps(u, v);
                if d > max_ulps && (u - v).abs() > max_ulps as f32 * f32::EPSILON * scale {
                    return Err(format!("{name}: buffer {an}, tensor {j} (size {}), element {e}: interpreter {u:e}, cranelift {v:e} ({d} ulps)", x.len()));
                }
            }
        }
    }
    Ok(())
}

#[test]
fn every_stdlib_rule_matches_the_interpreter_on_awkward_sizes() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for (name, _) in optc::stdlib::RULES {
        let program = optc::stdlib_rule(name).expect("stdlib rule");
        for hypers in [&[][..], OPTIONS] {
            let reference = run(&program, SIZES, Backend::Interpreter, hypers, STEPS);
            let jit = run(
                &program,
                SIZES,
                Backend::Cranelift { threads: 2 },
                hypers,
                STEPS,
            );
            assert_eq!(reference.params.len(), jit.params.len());
            // Reductions accumulate in a different order (lanes vs. one by one), and a rounding
            // difference in a norm moves every element it scales by about an ulp.
            if let Err(e) = compare(name, &reference, &jit, 4) {
                failures.push(e);
            }
            checked += 1;
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    println!("{checked} rule configurations agree within 4 ulps");
}

#[test]
fn large_tensors_match_the_interpreter() {
    for name in ["adam", "adan", "lamb", "diffgrad", "n_harpg"] {
        let program = optc::stdlib_rule(name).expect("stdlib rule");
        let reference = run(&program, &[1_000_003], Backend::Interpreter, OPTIONS, 2);
        let jit = run(
            &program,
            &[1_000_003],
            Backend::Cranelift { threads: 2 },
            OPTIONS,
            2,
        );
        compare(name, &reference, &jit, 4).unwrap();
    }
}

#[test]
fn results_are_bit_identical_for_any_thread_count() {
    let sizes = [100_000, 3, 50_001, 0, 16_384, 16_385];
    for name in [
        "adan",
        "lamb",
        "n_harpg",
        "penalty_bilevel",
        "clip_global_norm",
        "adam",
    ] {
        let program = optc::stdlib_rule(name).expect("stdlib rule");
        let runs: Vec<Run> = [1, 2, 3]
            .iter()
            .map(|&t| {
                run(
                    &program,
                    &sizes,
                    Backend::Cranelift { threads: t },
                    OPTIONS,
                    3,
                )
            })
            .collect();
        for r in &runs[1..] {
            compare(name, &runs[0], r, 0).unwrap();
        }
        // And the same again: runs are reproducible.
        let again = run(
            &program,
            &sizes,
            Backend::Cranelift { threads: 3 },
            OPTIONS,
            3,
        );
        compare(name, &runs[0], &again, 0).unwrap();
    }
}

#[test]
fn f64_buffers_match_the_interpreter() {
    for name in ["adam", "adan", "diffgrad"] {
        let program = optc::stdlib_rule(name).expect("stdlib rule");
        let make = |backend| {
            let params: Vec<Vec<Vec<f64>>> = vec![SIZES
                .iter()
                .map(|&n| fill(n as u64, n).into_iter().map(f64::from).collect())
                .collect()];
            let mut opt = Optimizer::new(Arc::new(program.clone()), params)
                .unwrap()
                .with_backend(backend)
                .unwrap();
            for step in 0..3 {
                let g: Vec<Vec<f64>> = SIZES
                    .iter()
                    .map(|&n| {
                        fill(n as u64 + 99 + step, n)
                            .into_iter()
                            .map(f64::from)
                            .collect()
                    })
                    .collect();
                opt.step(&Inputs::default().tensor("g", g.iter().map(|v| v.as_slice()).collect()))
                    .unwrap();
            }
            opt.params(0).to_vec()
        };
        let (a, b) = (
            make(Backend::Interpreter),
            make(Backend::Cranelift { threads: 1 }),
        );
        for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
            assert!(
                (x - y).abs() <= 1e-13 * x.abs().max(1e-300),
                "{name}: {x} vs {y}"
            );
        }
    }
}
