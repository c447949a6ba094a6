//! Data hyper-cleaning (Franceschi et al., 2017), a bilevel problem, solved with the standard
//! library's `penalty_bilevel` rule (F2SA, Kwon et al., 2023).
//!
//! Half of the training labels of the handwritten-digits data set are replaced by random ones.
//! The inner problem fits a multinomial logistic regression `W` to the training set, each sample
//! weighted by `sigmoid(x_i)`; the outer problem chooses the weights `x` so that `W` does well on
//! a small clean validation set. The rule updates three variables at once: `x` (sample weights),
//! `y` (the classifier of the penalized inner problem) and `z` (the classifier of the plain
//! inner problem). Then BO-REP (`bo_rep`) on the same problem, from Hessian-vector products the
//! host computes (the lower level updated every second step, normalized momentum on the
//! weights). A classifier trained on the corrupted set without cleaning is the baseline.
//!
//! Run: `cargo run --release --example hyper_cleaning`

use indicatif::{ProgressBar, ProgressStyle};
use optc::runtime::{Backend, Inputs, Optimizer};
use std::sync::Arc;

const DATA: &str = include_str!("data/digits.csv");
const CLASSES: usize = 10;
const FEATURES: usize = 65; // 64 pixels and a constant 1
const TRAIN: usize = 1000;
const VALID: usize = 300;
const STEPS: u64 = 4000;
const REG: f64 = 1e-3;

struct Set {
    x: Vec<[f64; FEATURES]>,
    label: Vec<usize>,
}

/// A small deterministic generator (SplitMix64) for the corruption.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn load() -> (Set, Set, Set, Vec<bool>) {
    let mut rows: Vec<([f64; FEATURES], usize)> = Vec::new();
    for line in DATA
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let v: Vec<f64> = line
            .split(',')
            .map(|s| s.trim().parse().expect("a number"))
            .collect();
        let mut x = [1.0; FEATURES];
        for (d, s) in x.iter_mut().zip(&v[..64]) {
            *d = s / 16.0;
        }
        rows.push((x, v[64] as usize));
    }
    let split = |r: &[([f64; FEATURES], usize)]| Set {
        x: r.iter().map(|p| p.0).collect(),
        label: r.iter().map(|p| p.1).collect(),
    };
    let mut train = split(&rows[..TRAIN]);
    let valid = split(&rows[TRAIN..TRAIN + VALID]);
    let test = split(&rows[TRAIN + VALID..]);
    // Corrupt half of the training labels with a different random class.
    let mut rng = Rng(2017);
    let mut corrupted = vec![false; TRAIN];
    for (label, bad) in train.label.iter_mut().zip(&mut corrupted) {
        if rng.next().is_multiple_of(2) {
            let shift = 1 + (rng.next() % (CLASSES as u64 - 1)) as usize;
            *label = (*label + shift) % CLASSES;
            *bad = true;
        }
    }
    (train, valid, test, corrupted)
}

fn sigmoid(v: f64) -> f64 {
    1.0 / (1.0 + (-v).exp())
}

/// Per-sample cross-entropy losses and the softmax residuals (p - onehot) of classifier `w`
/// (`w[c * FEATURES + f]`).
fn forward(set: &Set, w: &[f64]) -> (Vec<f64>, Vec<[f64; CLASSES]>) {
    let mut losses = Vec::with_capacity(set.x.len());
    let mut resid = Vec::with_capacity(set.x.len());
    for (x, &y) in set.x.iter().zip(&set.label) {
        let mut z = [0.0; CLASSES];
        for (c, zc) in z.iter_mut().enumerate() {
            *zc = w[c * FEATURES..(c + 1) * FEATURES]
                .iter()
                .zip(x)
                .map(|(a, b)| a * b)
                .sum();
        }
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = z.iter().map(|v| (v - m).exp()).sum();
        let mut p = [0.0; CLASSES];
        for c in 0..CLASSES {
            p[c] = (z[c] - m).exp() / s;
        }
        losses.push(-(p[y].max(1e-300)).ln());
        p[y] -= 1.0;
        resid.push(p);
    }
    (losses, resid)
}

/// Gradient in `w` of sum_i weight_i * loss_i / n + REG / 2 * |w|^2.
fn grad_w(set: &Set, w: &[f64], resid: &[[f64; CLASSES]], weight: &[f64]) -> Vec<f64> {
    let n = set.x.len() as f64;
    let mut g: Vec<f64> = w.iter().map(|v| REG * v).collect();
    for ((x, r), &s) in set.x.iter().zip(resid).zip(weight) {
        for c in 0..CLASSES {
            let k = s * r[c] / n;
            for f in 0..FEATURES {
                g[c * FEATURES + f] += k * x[f];
            }
        }
    }
    g
}

/// H_ww v of g = sum_i weight_i * loss_i / n + REG / 2 * |w|^2: per sample, the softmax
/// Jacobian (diag(p) - p p^T) applied to V a_i, times a_i.
fn hvp_w(set: &Set, resid: &[[f64; CLASSES]], weight: &[f64], v: &[f64]) -> Vec<f64> {
    let n = set.x.len() as f64;
    let mut out: Vec<f64> = v.iter().map(|e| REG * e).collect();
    for (((x, r), &s), &y) in set.x.iter().zip(resid).zip(weight).zip(&set.label) {
        let mut p = *r;
        p[y] += 1.0;
        let mut va = [0.0; CLASSES];
        for (c, vc) in va.iter_mut().enumerate() {
            *vc = v[c * FEATURES..(c + 1) * FEATURES]
                .iter()
                .zip(x)
                .map(|(a, b)| a * b)
                .sum();
        }
        let pv: f64 = (0..CLASSES).map(|c| p[c] * va[c]).sum();
        for c in 0..CLASSES {
            let k = s * p[c] * (va[c] - pv) / n;
            for f in 0..FEATURES {
                out[c * FEATURES + f] += k * x[f];
            }
        }
    }
    out
}

/// grad_x (grad_w g . z) with weight_i = sigmoid(x_i): dweight_i / n * (r_i (x) a_i) . z.
fn cross_hvp(set: &Set, resid: &[[f64; CLASSES]], dweight: &[f64], z: &[f64]) -> Vec<f64> {
    let n = set.x.len() as f64;
    set.x
        .iter()
        .zip(resid)
        .zip(dweight)
        .map(|((x, r), &d)| {
            let za: f64 = (0..CLASSES)
                .map(|c| {
                    r[c] * z[c * FEATURES..(c + 1) * FEATURES]
                        .iter()
                        .zip(x)
                        .map(|(a, b)| a * b)
                        .sum::<f64>()
                })
                .sum();
            d * za / n
        })
        .collect()
}

/// BO-REP (`bo_rep`) on the same problem: x the sample weights' logits, y the classifier.
/// Returns the weights' logits and the classifier.
fn bo_rep(train: &Set, valid: &Set) -> (Vec<f64>, Vec<f64>) {
    let dim = CLASSES * FEATURES;
    let program = Arc::new(optc::stdlib_rule("bo_rep").expect("in the standard library"));
    let mut opt =
        Optimizer::<f64>::new(program, vec![vec![vec![0.0; TRAIN]], vec![vec![0.0; dim]]])
            .and_then(|o| o.with_backend(Backend::Cranelift { threads: 1 }))
            .expect("bind the rule");
    for (k, v) in [
        ("lr", 0.05),
        ("gamma", 2.0),
        ("nu", 1.0),
        ("beta", 0.9),
        ("interval", 2.0),
    ] {
        opt.set_hyper(k, v).expect("hyperparameter");
    }
    let gy_id = opt.program().info.buffer("gy").expect("gy");
    let zeros = vec![0.0; TRAIN];
    for _ in 0..STEPS {
        let x = opt.params(0)[0].clone();
        let weight: Vec<f64> = x.iter().map(|&v| sigmoid(v)).collect();
        let dweight: Vec<f64> = x.iter().map(|&v| sigmoid(v) * (1.0 - sigmoid(v))).collect();
        let y = opt.params(1)[0].clone();
        let z = opt.buffer("z").expect("z")[0].clone();
        let (_, ry) = forward(train, &y);
        let hz = hvp_w(train, &ry, &weight, &z);
        let mut lower = Inputs::default();
        let gy;
        if opt.stage_needs(0).expect("needs").tensors.contains(&gy_id) {
            gy = grad_w(train, &y, &ry, &weight);
            lower = lower.tensor("gy", vec![&gy]);
        }
        opt.run_stage(0, &lower).expect("lower");
        let y = opt.params(1)[0].clone();
        let (_, rv) = forward(valid, &y);
        let fy = grad_w(valid, &y, &rv, &vec![1.0; VALID]);
        opt.run_stage(
            1,
            &Inputs::default()
                .tensor("hz", vec![&hz])
                .tensor("fy", vec![&fy]),
        )
        .expect("linear");
        let z = opt.buffer("z").expect("z")[0].clone();
        let (_, ry) = forward(train, &y);
        let hxz = cross_hvp(train, &ry, &dweight, &z);
        opt.run_stage(
            2,
            &Inputs::default()
                .tensor("hxz", vec![&hxz])
                .tensor("fx", vec![&zeros]),
        )
        .expect("upper");
    }
    (opt.params(0)[0].clone(), opt.params(1)[0].clone())
}

fn accuracy(set: &Set, w: &[f64]) -> f64 {
    let (_, resid) = forward(set, w);
    // p - onehot: the predicted class has the largest entry once the label's -1 is undone.
    let correct = resid
        .iter()
        .zip(&set.label)
        .filter(|(r, &y)| {
            let mut p = **r;
            p[y] += 1.0;
            (0..CLASSES).all(|c| p[c] <= p[y])
        })
        .count();
    correct as f64 / set.x.len() as f64
}

fn main() {
    let (train, valid, test, corrupted) = load();
    let program = Arc::new(optc::stdlib_rule("penalty_bilevel").expect("in the standard library"));
    let dim = CLASSES * FEATURES;
    let mut opt = Optimizer::<f64>::new(
        program,
        vec![
            vec![vec![0.0; TRAIN]],
            vec![vec![0.0; dim]],
            vec![vec![0.0; dim]],
        ],
    )
    .and_then(|o| o.with_backend(Backend::Cranelift { threads: 1 }))
    .expect("bind the rule");
    for (k, v) in [
        ("c_y", 2.0),
        ("e_y", 0.0),
        ("c_z", 2.0),
        ("e_z", 0.0),
        ("c_x", 2000.0),
        ("e_x", 0.2),
        ("lam0", 1.0),
        ("c_lam", 0.02),
        ("e_lam", 0.5),
    ] {
        opt.set_hyper(k, v).expect("hyperparameter");
    }

    // The baseline: the same classifier, trained on the corrupted labels with unit weights.
    let mut base = vec![0.0; dim];
    for _ in 0..STEPS {
        let (_, r) = forward(&train, &base);
        let g = grad_w(&train, &base, &r, &vec![1.0; TRAIN]);
        base.iter_mut().zip(&g).for_each(|(w, g)| *w -= 2.0 * g);
    }

    println!(
        "data hyper-cleaning: {TRAIN} training digits (half the labels random), {VALID} clean validation, {} test",
        test.x.len()
    );
    println!(
        "{:>6}  {:>10}  {:>9}  {:>9}  {:>8}  {:>15}",
        "step", "val loss", "val acc", "test acc", "lambda", "corrupt weight"
    );
    let bar = ProgressBar::new(STEPS).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} steps {msg}").expect("a template"),
    );
    for step in 1..=STEPS {
        let x = opt.params(0)[0].clone();
        let y = opt.params(1)[0].clone();
        let z = opt.params(2)[0].clone();
        let weight: Vec<f64> = x.iter().map(|&v| sigmoid(v)).collect();
        let dweight: Vec<f64> = x.iter().map(|&v| sigmoid(v) * (1.0 - sigmoid(v))).collect();
        let (ly, ry) = forward(&train, &y);
        let (lz, rz) = forward(&train, &z);
        let (_, rv) = forward(&valid, &y);
        let n = TRAIN as f64;
        let gx_y: Vec<f64> = ly.iter().zip(&dweight).map(|(l, d)| d * l / n).collect();
        let gx_z: Vec<f64> = lz.iter().zip(&dweight).map(|(l, d)| d * l / n).collect();
        let fx = vec![0.0; TRAIN];
        let fy = grad_w(&valid, &y, &rv, &vec![1.0; VALID]);
        let gy = grad_w(&train, &y, &ry, &weight);
        let gz = grad_w(&train, &z, &rz, &weight);
        opt.step(
            &Inputs::default()
                .tensor("fx", vec![&fx])
                .tensor("gx_y", vec![&gx_y])
                .tensor("gx_z", vec![&gx_z])
                .tensor("fy", vec![&fy])
                .tensor("gy", vec![&gy])
                .tensor("gz", vec![&gz]),
        )
        .expect("step");
        bar.inc(1);
        if step == 1 || step % 500 == 0 {
            // After the step.
            let y = &opt.params(1)[0];
            let weight: Vec<f64> = opt.params(0)[0].iter().map(|&v| sigmoid(v)).collect();
            let vloss = forward(&valid, y).0.iter().sum::<f64>() / VALID as f64;
            let (wc, wk): (Vec<f64>, Vec<f64>) = (0..TRAIN).fold((vec![], vec![]), |mut acc, i| {
                if corrupted[i] {
                    acc.0.push(weight[i])
                } else {
                    acc.1.push(weight[i])
                }
                acc
            });
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
            bar.suspend(|| {
                println!(
                    "{step:>6}  {vloss:>10.4}  {:>8.1}%  {:>8.1}%  {:>8.2}  {:>6.3} / {:>6.3}",
                    100.0 * accuracy(&valid, y),
                    100.0 * accuracy(&test, y),
                    opt.scalar_state("lam").unwrap_or(f64::NAN),
                    mean(&wc),
                    mean(&wk),
                )
            });
        }
    }
    bar.finish_and_clear();
    let x = &opt.params(0)[0];
    let flagged = |i: usize| sigmoid(x[i]) < 0.5;
    let caught = (0..TRAIN).filter(|&i| corrupted[i] && flagged(i)).count();
    let wrongly = (0..TRAIN).filter(|&i| !corrupted[i] && flagged(i)).count();
    let ncorrupt = corrupted.iter().filter(|&&c| c).count();
    println!("\n(corrupt weight: mean sample weight of corrupted / clean training samples)");
    println!(
        "test accuracy: hyper-cleaned {:.1}%, baseline on corrupted labels {:.1}%",
        100.0 * accuracy(&test, &opt.params(1)[0]),
        100.0 * accuracy(&test, &base)
    );
    println!(
        "samples weighted below 1/2: {caught} of {ncorrupt} corrupted, {wrongly} of {} clean",
        TRAIN - ncorrupt
    );

    // BO-REP on the same data, from the same start.
    let (bx, by) = bo_rep(&train, &valid);
    let caught_b = (0..TRAIN)
        .filter(|&i| corrupted[i] && sigmoid(bx[i]) < 0.5)
        .count();
    let wrongly_b = (0..TRAIN)
        .filter(|&i| !corrupted[i] && sigmoid(bx[i]) < 0.5)
        .count();
    println!(
        "\n{:<34} {:>13} {:>22} {:>18}",
        "method", "test accuracy", "corrupted below 1/2", "clean below 1/2"
    );
    for (name, acc, c, w) in [
        (
            "penalty_bilevel (F2SA)",
            accuracy(&test, &opt.params(1)[0]),
            caught,
            wrongly,
        ),
        (
            "bo_rep (BO-REP, interval 2)",
            accuracy(&test, &by),
            caught_b,
            wrongly_b,
        ),
        (
            "no cleaning (corrupted labels)",
            accuracy(&test, &base),
            0,
            0,
        ),
    ] {
        println!(
            "{name:<34} {:>12.1}% {:>15} of {ncorrupt} {:>11} of {}",
            100.0 * acc,
            c,
            w,
            TRAIN - ncorrupt
        );
    }
    println!(
        "conclusion: both bilevel methods learn to down-weight the corrupted samples and beat the \
         classifier trained on the corrupted labels ({:.1}%): penalty_bilevel {:.1}%, BO-REP {:.1}%.",
        100.0 * accuracy(&test, &base),
        100.0 * accuracy(&test, &opt.params(1)[0]),
        100.0 * accuracy(&test, &by)
    );
}
