//! A small neural network (64-48-10 multilayer perceptron) trained with candle's automatic
//! differentiation on the handwritten-digits data set, its optimizer an optc rule through the
//! `optc-candle` adapter (any rule with one param and a gradient input is a candle optimizer).
//!
//! Run: `cargo run --release --example candle_mlp`

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::Optimizer as _;
use indicatif::ProgressBar;
use optc_candle::{OptcConfig, OptcOptimizer};
use std::sync::Arc;

const DATA: &str = include_str!("data/digits.csv");
const TRAIN: usize = 1500;
const HIDDEN: usize = 48;
const BATCH: usize = 100;
const EPOCHS: usize = 20;

/// SplitMix64, for a deterministic initialization and shuffling.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-a, a).
    fn uniform(&mut self, a: f32) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
    }
}

struct Mlp {
    w1: Var,
    b1: Var,
    w2: Var,
    b2: Var,
}

impl Mlp {
    /// The same initial weights for every rule (uniform, scaled by 1/sqrt(fan_in)).
    fn new(dev: &Device) -> candle_core::Result<Mlp> {
        let mut rng = Rng(7);
        let mut init = |rows: usize, cols: usize| {
            let a = 1.0 / (rows as f32).sqrt();
            let v: Vec<f32> = (0..rows * cols).map(|_| rng.uniform(a)).collect();
            Var::from_vec(v, (rows, cols), dev)
        };
        Ok(Mlp {
            w1: init(64, HIDDEN)?,
            b1: Var::zeros(HIDDEN, DType::F32, dev)?,
            w2: init(HIDDEN, 10)?,
            b2: Var::zeros(10, DType::F32, dev)?,
        })
    }

    fn vars(&self) -> Vec<Var> {
        vec![
            self.w1.clone(),
            self.b1.clone(),
            self.w2.clone(),
            self.b2.clone(),
        ]
    }

    fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(self.w1.as_tensor())?
            .broadcast_add(self.b1.as_tensor())?
            .relu()?
            .matmul(self.w2.as_tensor())?
            .broadcast_add(self.b2.as_tensor())
    }
}

fn accuracy(logits: &Tensor, labels: &Tensor) -> candle_core::Result<f32> {
    let pred = logits.argmax(D::Minus1)?;
    let right = pred.eq(labels)?.to_dtype(DType::F32)?.mean_all()?;
    right.to_scalar::<f32>()
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for line in DATA
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let v: Vec<f32> = line
            .split(',')
            .map(|s| s.trim().parse().expect("a number"))
            .collect();
        xs.extend(v[..64].iter().map(|p| p / 16.0));
        ys.push(v[64] as u32);
    }
    let n = ys.len();
    let x = Tensor::from_vec(xs, (n, 64), &dev)?;
    let y = Tensor::from_vec(ys, n, &dev)?;
    let (x_train, y_train) = (x.narrow(0, 0, TRAIN)?, y.narrow(0, 0, TRAIN)?);
    let (x_test, y_test) = (
        x.narrow(0, TRAIN, n - TRAIN)?,
        y.narrow(0, TRAIN, n - TRAIN)?,
    );

    let trials: Vec<(&str, Vec<(&str, f64)>)> = vec![
        ("sgd", vec![("lr", 0.1), ("momentum", 0.9)]),
        ("adam", vec![("lr", 3e-3)]),
        ("adamw", vec![("lr", 3e-3), ("weight_decay", 0.05)]),
        ("adan", vec![("lr", 3e-3)]),
        ("lion", vec![("lr", 1e-3)]),
        ("diffgrad", vec![("lr", 3e-3)]),
    ];
    let mut runs = Vec::new();
    for (name, sets) in &trials {
        let program = optc::stdlib_rule(name).expect("a standard-library rule");
        let mut config = OptcConfig::new(Arc::new(program));
        for (k, v) in sets {
            config = config.hyper(k, *v);
        }
        let model = Mlp::new(&dev)?;
        let opt = OptcOptimizer::new(model.vars(), config)?;
        runs.push((name, model, opt));
    }

    println!(
        "digits MLP 64-{HIDDEN}-10 (candle autodiff, optc rules), {TRAIN} train / {} test, batch {BATCH}",
        n - TRAIN
    );
    let mut header = format!("{:>5}", "epoch");
    for (name, _) in &trials {
        header.push_str(&format!(" {:>15}", name));
    }
    println!(
        "{header}\n{:>5}{}",
        "",
        " train loss/test".repeat(trials.len())
    );
    let bar = ProgressBar::new((EPOCHS * trials.len()) as u64);
    let mut order: Vec<u32> = (0..TRAIN as u32).collect();
    let mut rng = Rng(11);
    for epoch in 1..=EPOCHS {
        // One shuffle per epoch, the same for every rule.
        for i in (1..order.len()).rev() {
            order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
        }
        let mut row = format!("{epoch:>5}");
        for (_, model, opt) in &mut runs {
            for batch in order.chunks(BATCH) {
                let idx = Tensor::from_slice(batch, batch.len(), &dev)?;
                let xb = x_train.index_select(&idx, 0)?;
                let yb = y_train.index_select(&idx, 0)?;
                let loss = candle_nn::loss::cross_entropy(&model.logits(&xb)?, &yb)?;
                opt.backward_step(&loss)?;
            }
            let train_loss = candle_nn::loss::cross_entropy(&model.logits(&x_train)?, &y_train)?
                .to_scalar::<f32>()?;
            let test_acc = accuracy(&model.logits(&x_test)?, &y_test)?;
            row.push_str(&format!(" {train_loss:>7.4} {:>6.1}%", 100.0 * test_acc));
            bar.inc(1);
        }
        bar.suspend(|| println!("{row}"));
    }
    bar.finish_and_clear();
    println!("\nfinal:");
    for (name, model, _) in &runs {
        let train_loss = candle_nn::loss::cross_entropy(&model.logits(&x_train)?, &y_train)?
            .to_scalar::<f32>()?;
        let acc = accuracy(&model.logits(&x_test)?, &y_test)?;
        println!(
            "  {name:<9} train loss {train_loss:.4}  test accuracy {:.1}%",
            100.0 * acc
        );
    }
    Ok(())
}
