//! Logistic regression on the Breast Cancer Wisconsin data set (569 samples, 30 features), trained
//! full-batch with rules from the optc standard library and with one rule written inline, each
//! compiled to machine code with Cranelift.
//!
//! Run: `cargo run --release --example quickstart`

use optc::runtime::{Backend, Inputs, Optimizer};
use std::sync::Arc;

const DATA: &str = include_str!("data/breast_cancer.csv");
const EPOCHS: usize = 100;

/// A user-written rule: sign descent with momentum, compiled at start-up.
const MY_RULE: &str = "
/// Sign descent with momentum.
rule signum(lr = 0.01, momentum = 0.9) {
    param theta
    input g
    state m = 0
    m = momentum * m + (1 - momentum) * g
    theta = theta - lr * sign(m)
}";

/// A rule under trial: its name, compiled program and hyperparameter settings.
type Trial = (
    String,
    optc::compiler::ir::Program,
    Vec<(&'static str, f64)>,
);

struct Data {
    x: Vec<[f32; 30]>,
    y: Vec<f32>,
}

fn load() -> Data {
    let mut lines = DATA.lines();
    lines.next(); // header
    let mut x = Vec::new();
    let mut y = Vec::new();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let vals: Vec<f32> = line
            .split(',')
            .map(|v| v.trim().parse().expect("a number"))
            .collect();
        let mut row = [0f32; 30];
        row.copy_from_slice(&vals[..30]);
        x.push(row);
        y.push(vals[30]);
    }
    // Standardize each feature.
    for j in 0..30 {
        let n = x.len() as f32;
        let mean = x.iter().map(|r| r[j]).sum::<f32>() / n;
        let std = (x.iter().map(|r| (r[j] - mean).powi(2)).sum::<f32>() / n)
            .sqrt()
            .max(1e-12);
        for r in &mut x {
            r[j] = (r[j] - mean) / std;
        }
    }
    Data { x, y }
}

/// Mean binary cross-entropy, accuracy, and the gradient with respect to (w, b).
fn loss_and_grad(d: &Data, w: &[f32], b: f32) -> (f32, f32, Vec<f32>, f32) {
    let n = d.x.len() as f32;
    let (mut loss, mut correct, mut gw, mut gb) = (0.0f32, 0usize, vec![0.0f32; 30], 0.0f32);
    for (row, &y) in d.x.iter().zip(&d.y) {
        let z: f32 = row.iter().zip(w).map(|(a, b)| a * b).sum::<f32>() + b;
        let p = 1.0 / (1.0 + (-z).exp());
        loss += -(y * p.max(1e-7).ln() + (1.0 - y) * (1.0 - p).max(1e-7).ln());
        correct += usize::from((p > 0.5) == (y > 0.5));
        for (g, a) in gw.iter_mut().zip(row) {
            *g += (p - y) * a / n;
        }
        gb += (p - y) / n;
    }
    (loss / n, correct as f32 / n, gw, gb)
}

fn main() {
    let data = load();
    let mut rules: Vec<Trial> = Vec::new();
    for (name, sets) in [
        ("sgd", vec![("lr", 0.5), ("momentum", 0.9)]),
        ("adam", vec![("lr", 0.05)]),
        ("adan", vec![("lr", 0.05)]),
        ("diffgrad", vec![("lr", 0.05)]),
    ] {
        let start = std::time::Instant::now();
        let p = optc::stdlib_rule(name).expect("a standard-library rule");
        println!(
            "compiled {name:<9} in {:>6.2} ms",
            start.elapsed().as_secs_f64() * 1e3
        );
        rules.push((name.to_string(), p, sets));
    }
    let p = optc::compile_rule(MY_RULE).unwrap_or_else(|e| panic!("{e}"));
    rules.push(("signum (inline)".to_string(), p, vec![("lr", 0.01)]));

    println!(
        "\nlogistic regression, {} samples x 30 features, full batch, {EPOCHS} epochs",
        data.x.len()
    );
    let mut header = format!("{:>6}", "epoch");
    for (name, _, _) in &rules {
        header.push_str(&format!("  {:>17}", name));
    }
    println!(
        "{header}\n{:>6}{}",
        "",
        "  loss / accuracy  ".repeat(rules.len())
    );
    let mut opts: Vec<Optimizer<f32>> = rules
        .iter()
        .map(|(_, p, sets)| {
            let mut o =
                Optimizer::new(Arc::new(p.clone()), vec![vec![vec![0.0; 30], vec![0.0; 1]]])
                    .and_then(|o| o.with_backend(Backend::Cranelift { threads: 1 }))
                    .expect("bind and compile to machine code");
            for (k, v) in sets {
                o.set_hyper(k, *v).expect("hyperparameter");
            }
            o
        })
        .collect();
    for epoch in 1..=EPOCHS {
        let mut row = format!("{epoch:>6}");
        for opt in &mut opts {
            let (w, b) = (opt.params(0)[0].clone(), opt.params(0)[1][0]);
            let (loss, acc, gw, gb) = loss_and_grad(&data, &w, b);
            opt.step(&Inputs::default().tensor("g", vec![&gw, &[gb]]))
                .expect("step");
            row.push_str(&format!("  {loss:>8.4} / {:>5.1}%", acc * 100.0));
        }
        if epoch <= 3 || epoch % 10 == 0 {
            println!("{row}");
        }
    }
    println!("\nfinal training loss:");
    for ((name, _, _), opt) in rules.iter().zip(&opts) {
        let (loss, acc, _, _) = loss_and_grad(&data, &opt.params(0)[0], opt.params(0)[1][0]);
        println!("  {name:<17} {loss:.4}  (accuracy {:.1}%)", acc * 100.0);
    }
}
