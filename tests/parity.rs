//! Numerical parity with the reference implementations (torch.optim, pytorch-optimizer).
//!
//! Each fixture in tests/parity/fixtures (written by scripts/parity/make_fixtures.py) holds initial
//! parameters of awkward shapes, 30 steps of gradients, and the reference parameters after every
//! step, with the rule's name and hyperparameters in its metadata. The rule runs through the
//! reference interpreter in f32, and every element at every step must agree with the reference:
//! |ours − ref| ≤ RTOL·|ref| + ATOL.

use optc::runtime::{Inputs, Optimizer};
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::sync::Arc;

const RTOL: f64 = 1e-5;
/// Relative tolerance of scalar outputs (statistics the reference computes in f32 over samples).
const RTOL_OUT: f64 = 1e-4;
/// Absolute floor, for elements that pass through zero (far below f32 resolution of O(1) params).
const ATOL: f64 = 1e-6;

fn f32s(st: &SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<f32>) {
    let v = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("fixture lacks {name}"));
    let data = v
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (v.shape().to_vec(), data)
}

/// Runs one fixture; returns the worst error ratio (error / tolerance) and where it happened.
fn run_fixture(path: &std::path::Path) -> (f64, String) {
    let bytes = std::fs::read(path).expect("read fixture");
    let (_, meta) = SafeTensors::read_metadata(&bytes).expect("header");
    let meta = meta.metadata().clone().expect("metadata");
    let st = SafeTensors::deserialize(&bytes).expect("fixture");
    let rule = &meta["rule"];
    let hyper: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(&meta["hyper"]).expect("hyper json");
    let steps: usize = meta["steps"].parse().expect("steps");
    // A rule with a sample axis (dp_sgd): the number of samples of each step; its input `G`
    // holds each step's samples after those of the steps before.
    let samples: Option<Vec<usize>> = meta
        .get("samples")
        .map(|s| serde_json::from_str(s).expect("samples json"));
    let mut names: Vec<String> = st
        .names()
        .iter()
        .filter_map(|n| n.strip_prefix("param."))
        .map(String::from)
        .collect();
    names.sort();
    let params: Vec<Vec<f32>> = names
        .iter()
        .map(|n| f32s(&st, &format!("param.{n}")).1)
        .collect();
    let program = optc::stdlib_rule(rule).unwrap_or_else(|| panic!("stdlib rule {rule}"));
    let input_names: Vec<String> = st
        .names()
        .iter()
        .filter_map(|n| n.strip_prefix("input."))
        .filter_map(|n| n.split_once('.').map(|(i, _)| i.to_string()))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut opt = Optimizer::<f32>::new(Arc::new(program), vec![params]).expect("optimizer");
    for (k, v) in &hyper {
        let x = match v {
            serde_json::Value::Bool(b) => f64::from(u8::from(*b)),
            other => other.as_f64().expect("number"),
        };
        opt.set_hyper(k, x)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    let inputs: BTreeMap<String, Vec<Vec<f32>>> = input_names
        .iter()
        .map(|i| {
            (
                i.clone(),
                names
                    .iter()
                    .map(|n| f32s(&st, &format!("input.{i}.{n}")).1)
                    .collect(),
            )
        })
        .collect();
    let expected: Vec<Vec<f32>> = names
        .iter()
        .map(|n| f32s(&st, &format!("expected.{n}")).1)
        .collect();
    // Scalar outputs to check after each step (`out.<name>`, [steps]).
    let outs: Vec<(String, Vec<f32>)> = st
        .names()
        .iter()
        .filter_map(|n| n.strip_prefix("out."))
        .map(|n| (n.to_string(), f32s(&st, &format!("out.{n}")).1))
        .collect();
    let mut worst = (0.0f64, String::new());
    for step in 0..steps {
        let mut inp = Inputs::default();
        for (i, per) in &inputs {
            let slices = per
                .iter()
                .zip(&names)
                .enumerate()
                .map(|(j, (d, _))| {
                    let len = opt.params(0)[j].len();
                    match &samples {
                        Some(b) => {
                            let before: usize = b[..step].iter().sum();
                            &d[before * len..(before + b[step]) * len]
                        }
                        None => &d[step * len..(step + 1) * len],
                    }
                })
                .collect();
            inp = inp.tensor(i, slices);
        }
        opt.step(&inp).expect("step");
        for (name, refs) in &outs {
            let ours = opt.scalar_out(name).expect("a scalar output");
            let b = f64::from(refs[step]);
            if ours.is_nan() && b.is_nan() {
                continue;
            }
            // Statistics over the samples: f64 sums here, f32 variances in the reference.
            let ratio = (ours - b).abs() / (RTOL_OUT * b.abs() + ATOL);
            if ratio > worst.0 || ratio.is_nan() {
                worst = (
                    if ratio.is_nan() { f64::INFINITY } else { ratio },
                    format!(
                        "step {} out {name}: ours {ours:e}, reference {b:e}",
                        step + 1
                    ),
                );
            }
        }
        for (j, name) in names.iter().enumerate() {
            let ours = &opt.params(0)[j];
            let len = ours.len();
            let refs = &expected[j][step * len..(step + 1) * len];
            for (e, (&a, &b)) in ours.iter().zip(refs).enumerate() {
                let (a, b) = (a as f64, b as f64);
                let ratio = (a - b).abs() / (RTOL * b.abs() + ATOL);
                if ratio > worst.0 || ratio.is_nan() {
                    worst = (
                        if ratio.is_nan() { f64::INFINITY } else { ratio },
                        format!(
                            "step {} tensor {name}[{e}]: ours {a:e}, reference {b:e}",
                            step + 1
                        ),
                    );
                }
            }
        }
    }
    worst
}

#[test]
fn stdlib_rules_match_their_references() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity/fixtures");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("fixtures")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 30,
        "expected the parity fixtures in {}",
        dir.display()
    );
    let mut failures = Vec::new();
    for f in &files {
        let (ratio, at) = run_fixture(f);
        let case = f.file_stem().unwrap().to_string_lossy().into_owned();
        println!("{case:<45} worst error / tolerance = {ratio:.3}  ({at})");
        if ratio > 1.0 {
            failures.push(format!("{case}: {ratio:.2} × tolerance at {at}"));
        }
    }
    assert!(
        failures.is_empty(),
        "parity failures:\n{}",
        failures.join("\n")
    );
}
