//! AdAdaGrad growing its batch while training: the standard library's `adadagrad` (AdaGrad-Norm
//! with the adaptive batch-size tests of Lau et al., 2024) trains a multinomial logistic
//! regression on the handwritten-digits data from per-sample gradients, and after every step the
//! host takes the next batch size from the rule's scalar output `batch` (capped at 256), as the
//! authors' training loop does. Fixed small and large batches, with the same rule and the same
//! budget of samples, are the baselines.
//!
//! Run: `cargo run --release --example adadagrad_digits`

#[path = "common/digits.rs"]
mod digits;

use digits::{batch_grads, evaluate, load, Rng, WEIGHTS};
use optc::runtime::{Backend, Inputs, Optimizer};
use std::sync::Arc;

const TRAIN: usize = 1400;
/// Samples every run may process.
const BUDGET: usize = 60_000;
const MAX_BATCH: usize = 256;
const LR: f64 = 0.5;

struct Run {
    name: String,
    steps: usize,
    /// (step, batch, samples so far, test accuracy) at a few points.
    trace: Vec<(usize, usize, usize, f64)>,
    train_loss: f64,
    test_acc: f64,
}

fn train(
    name: &str,
    start: usize,
    grow: Option<(usize, f64)>,
) -> Result<Run, optc::runtime::Error> {
    let (train, test) = load(TRAIN);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let mut opt = Optimizer::<f32>::new(
        Arc::new(optc::stdlib_rule("adadagrad").expect("adadagrad")),
        vec![vec![vec![0.0; WEIGHTS]]],
    )?
    .with_backend(Backend::Cranelift { threads })?;
    opt.set_hyper("lr", LR)?;
    if let Some((test_type, threshold)) = grow {
        opt.set_hyper("test_type", test_type as f64)?;
        for h in ["eta", "theta", "nu"] {
            opt.set_hyper(h, threshold)?;
        }
    }
    let mut rng = Rng(99);
    let (mut batch, mut seen, mut steps) = (start, 0, 0);
    let mut trace = Vec::new();
    let mut next_report = 1;
    while seen + batch <= BUDGET {
        let w = opt.params(0)[0].clone();
        let idx: Vec<usize> = (0..batch).map(|_| rng.below(TRAIN)).collect();
        let g = batch_grads(&w, &train, &idx);
        opt.step(&Inputs::default().tensor("G", vec![&g]))?;
        seen += batch;
        steps += 1;
        if steps == next_report {
            trace.push((steps, batch, seen, evaluate(&opt.params(0)[0], &test).1));
            next_report *= 2;
        }
        if grow.is_some() {
            let want = opt.scalar_out("batch").expect("the rule's output");
            batch = (want as usize).clamp(batch, MAX_BATCH);
        }
    }
    let w = &opt.params(0)[0];
    trace.push((steps, batch, seen, evaluate(w, &test).1));
    Ok(Run {
        name: name.into(),
        steps,
        trace,
        train_loss: evaluate(w, &train).0,
        test_acc: evaluate(w, &test).1,
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runs = [
        train("fixed batch 4", 4, None)?,
        train("fixed batch 256", 256, None)?,
        train("AdAdaGrad, norm test (eta 1.0)", 4, Some((0, 1.0)))?,
        train("AdAdaGrad, inner product (theta 0.5)", 4, Some((1, 0.5)))?,
    ];
    println!(
        "digits: logistic regression, AdaGrad-Norm (lr {LR}), {BUDGET} samples per run, batches drawn with replacement"
    );
    for r in &runs {
        println!("\n{}", r.name);
        println!(
            "{:>6} {:>6} {:>8} {:>14}",
            "step", "batch", "samples", "test accuracy"
        );
        for &(s, b, n, acc) in &r.trace {
            println!("{s:>6} {b:>6} {n:>8} {:>13.1}%", 100.0 * acc);
        }
    }
    println!(
        "\n{:<38} {:>6} {:>11} {:>14}",
        "run", "steps", "train loss", "test accuracy"
    );
    for r in &runs {
        println!(
            "{:<38} {:>6} {:>11.4} {:>13.1}%",
            r.name,
            r.steps,
            r.train_loss,
            100.0 * r.test_acc
        );
    }
    let (small, large, adaptive) = (&runs[0], &runs[1], &runs[2]);
    let final_batch = adaptive.trace.last().map_or(0, |t| t.1);
    println!(
        "conclusion: the norm test grew the batch from 4 to {final_batch} while training; with the same \
         {BUDGET} samples it took {} steps (batch 4: {}, batch 256: {}) and reached {:.1}% test accuracy \
         (batch 4: {:.1}%, batch 256: {:.1}%).",
        adaptive.steps,
        small.steps,
        large.steps,
        100.0 * adaptive.test_acc,
        100.0 * small.test_acc,
        100.0 * large.test_acc
    );
    Ok(())
}
