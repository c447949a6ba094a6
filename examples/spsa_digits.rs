//! Fine-tuning without gradients: the standard library's `spsa` (SPSA / MeZO, a zeroth-order
//! step from two loss values, its perturbation regenerated from the seed in every stage, never
//! stored) fine-tunes a multinomial logistic regression on the handwritten digits that a short
//! gradient run pre-trained, against fine-tuning the same model with gradients (`sgd`).
//!
//! Each SPSA step evaluates the batch loss twice (at theta + eps z and theta - eps z, the rule's
//! stages `plus` and `minus`); each SGD step evaluates one gradient (a backward pass). Both see
//! the same batches.
//!
//! Run: `cargo run --release --example spsa_digits`

#[path = "common/digits.rs"]
mod digits;

use digits::{batch_grads, evaluate, load, softmax, Rng, Set, WEIGHTS};
use optc::runtime::{Backend, Inputs, Optimizer};
use std::sync::Arc;

const TRAIN: usize = 1400;
const BATCH: usize = 64;
const PRETRAIN: usize = 30;
const STEPS: usize = 20_000;

/// Mean cross-entropy of weights `w` on a batch.
fn batch_loss(w: &[f32], set: &Set, batch: &[usize]) -> f64 {
    batch
        .iter()
        .map(|&i| -f64::from(softmax(w, &set.x[i])[set.label[i]].max(1e-12)).ln())
        .sum::<f64>()
        / batch.len() as f64
}

fn mean_grad(w: &[f32], set: &Set, batch: &[usize]) -> Vec<f32> {
    let g = batch_grads(w, set, batch);
    (0..WEIGHTS)
        .map(|e| (0..batch.len()).map(|i| g[i * WEIGHTS + e]).sum::<f32>() / batch.len() as f32)
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (train, test) = load(TRAIN);
    let mut rng = Rng(31);
    let batches: Vec<Vec<usize>> = (0..PRETRAIN + STEPS)
        .map(|_| (0..BATCH).map(|_| rng.below(TRAIN)).collect())
        .collect();
    let backend = Backend::Cranelift { threads: 1 };
    let sgd_rule = Arc::new(optc::stdlib_rule("sgd").expect("sgd"));

    // Pre-training: a few gradient steps.
    let mut pre = Optimizer::<f32>::new(Arc::clone(&sgd_rule), vec![vec![vec![0.0; WEIGHTS]]])?
        .with_backend(backend)?;
    pre.set_hyper("lr", 0.5)?;
    for b in &batches[..PRETRAIN] {
        let w = pre.params(0)[0].clone();
        pre.step(&Inputs::default().tensor("g", vec![&mean_grad(&w, &train, b)]))?;
    }
    let start = pre.params(0)[0].clone();
    let (_, acc0) = evaluate(&start, &test);

    // Fine-tuning with gradients.
    let mut sgd =
        Optimizer::<f32>::new(sgd_rule, vec![vec![start.clone()]])?.with_backend(backend)?;
    sgd.set_hyper("lr", 0.05)?;
    let mut trace_sgd = Vec::new();
    // Fine-tuning without gradients.
    let mut zo = Optimizer::<f32>::new(
        Arc::new(optc::stdlib_rule("spsa").expect("spsa")),
        vec![vec![start.clone()]],
    )?
    .with_backend(backend)?;
    zo.set_hyper("lr", 5e-4)?;
    zo.set_hyper("eps", 1e-3)?;
    zo.set_seed(3);
    let mut trace_zo = Vec::new();
    for (k, b) in batches[PRETRAIN..].iter().enumerate() {
        let w = sgd.params(0)[0].clone();
        sgd.step(&Inputs::default().tensor("g", vec![&mean_grad(&w, &train, b)]))?;
        zo.run_stage(0, &Inputs::default())?; // theta + eps z
        let lp = batch_loss(&zo.params(0)[0], &train, b);
        zo.run_stage(1, &Inputs::default().scalar("loss_plus", lp))?; // theta - eps z
        let lm = batch_loss(&zo.params(0)[0], &train, b);
        zo.run_stage(2, &Inputs::default().scalar("loss_minus", lm))?; // restore, step
        if (k + 1) % 4000 == 0 {
            trace_sgd.push((k + 1, evaluate(&sgd.params(0)[0], &test).1));
            trace_zo.push((k + 1, evaluate(&zo.params(0)[0], &test).1));
        }
    }
    println!(
        "digits: logistic regression ({WEIGHTS} weights) pre-trained by {PRETRAIN} SGD steps to {:.1}% test accuracy, \
         then fine-tuned {STEPS} steps on batches of {BATCH}",
        100.0 * acc0
    );
    println!(
        "{:>6} {:>22} {:>22}",
        "step", "SGD (gradients)", "SPSA (no gradients)"
    );
    for ((s, a), (_, b)) in trace_sgd.iter().zip(&trace_zo) {
        println!("{s:>6} {:>21.1}% {:>21.1}%", 100.0 * a, 100.0 * b);
    }
    let (ls, acc_s) = evaluate(&sgd.params(0)[0], &train);
    let (lz, acc_z) = evaluate(&zo.params(0)[0], &train);
    let test_s = evaluate(&sgd.params(0)[0], &test).1;
    let test_z = evaluate(&zo.params(0)[0], &test).1;
    println!(
        "{:<22} {:>11} {:>15} {:>11} {:>10} {:>10}",
        "fine-tuning", "gradients", "loss values", "train loss", "train acc", "test acc"
    );
    println!(
        "{:<22} {:>11} {:>15} {:>11.4} {:>9.1}% {:>9.1}%",
        "SGD",
        STEPS,
        0,
        ls,
        100.0 * acc_s,
        100.0 * test_s
    );
    println!(
        "{:<22} {:>11} {:>15} {:>11.4} {:>9.1}% {:>9.1}%",
        "SPSA / MeZO (spsa)",
        0,
        2 * STEPS,
        lz,
        100.0 * acc_z,
        100.0 * test_z
    );
    println!(
        "conclusion: from the same pre-trained model ({:.1}%), SPSA fine-tuning with no gradient at all reaches \
         {:.1}% test accuracy against {:.1}% with gradients, using two loss values per step and no memory \
         for its perturbation.",
        100.0 * acc0,
        100.0 * test_z,
        100.0 * test_s
    );
    Ok(())
}
