//! The candle adapter: training through candle's `Optimizer` trait equals stepping the optc rule
//! by hand, bit for bit; the adamw rule matches candle's own AdamW; bad configurations are errors.

use candle_core::{Device, Tensor, Var};
use candle_nn::Optimizer as _;
use optc_candle::{OptcConfig, OptcOptimizer};
use optc_runtime::{Backend, Inputs, Optimizer};
use std::sync::Arc;

fn rule(name: &str) -> Arc<optc_compiler::ir::Program> {
    let src = optc_stdlib::source(name).unwrap();
    Arc::new(optc_compiler::compile(src).programs.remove(0))
}

fn data() -> (Tensor, Tensor) {
    let x: Vec<f32> = (0..40)
        .map(|i| ((i * 37 % 17) as f32 / 8.0) - 1.0)
        .collect();
    let y: Vec<f32> = (0..10).map(|i| (i as f32 * 0.3).sin()).collect();
    (
        Tensor::from_vec(x, (10, 4), &Device::Cpu).unwrap(),
        Tensor::from_vec(y, (10, 1), &Device::Cpu).unwrap(),
    )
}

/// Least squares on a fixed batch: loss and variables.
fn loss(w: &Var, b: &Var) -> Tensor {
    let (x, y) = data();
    let pred = x
        .matmul(w.as_tensor())
        .unwrap()
        .broadcast_add(b.as_tensor())
        .unwrap();
    (pred - y).unwrap().sqr().unwrap().mean_all().unwrap()
}

fn vars() -> (Var, Var) {
    (
        Var::from_vec(vec![0.1f32, -0.2, 0.3, 0.05], (4, 1), &Device::Cpu).unwrap(),
        Var::from_vec(vec![0.0f32], 1, &Device::Cpu).unwrap(),
    )
}

#[test]
fn adapter_equals_stepping_by_hand() {
    for name in ["adan", "lion", "diffgrad"] {
        let (w, b) = vars();
        let config = OptcConfig::new(rule(name)).hyper("lr", 0.01);
        let mut opt = OptcOptimizer::new(vec![w.clone(), b.clone()], config).unwrap();
        let (hw, hb) = vars();
        let mut by_hand = Optimizer::new(
            rule(name),
            vec![vec![
                hw.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
                hb.as_tensor().to_vec1::<f32>().unwrap(),
            ]],
        )
        .unwrap()
        .with_backend(Backend::Cranelift { threads: 1 })
        .unwrap();
        by_hand.set_hyper("lr", 0.01).unwrap();
        for _ in 0..20 {
            // Gradients at the by-hand parameters.
            let p = by_hand.params(0).to_vec();
            hw.set(&Tensor::from_vec(p[0].clone(), (4, 1), &Device::Cpu).unwrap())
                .unwrap();
            hb.set(&Tensor::from_vec(p[1].clone(), 1, &Device::Cpu).unwrap())
                .unwrap();
            let grads = loss(&hw, &hb).backward().unwrap();
            let gw = grads
                .get(hw.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let gb = grads.get(hb.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
            by_hand
                .step(&Inputs::default().tensor("g", vec![&gw, &gb]))
                .unwrap();
            opt.backward_step(&loss(&w, &b)).unwrap();
        }
        assert_eq!(
            w.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            by_hand.params(0)[0],
            "{name}"
        );
        assert_eq!(
            b.as_tensor().to_vec1::<f32>().unwrap(),
            by_hand.params(0)[1],
            "{name}"
        );
    }
}

/// candle's AdamW and the standard library's adamw (nondefault values) agree within
/// 1e-5 relative + 1e-6 absolute per element after 50 steps.
#[test]
fn adamw_matches_candle_adamw() {
    let (w1, b1) = vars();
    let (w2, b2) = vars();
    let params = candle_nn::ParamsAdamW {
        lr: 0.02,
        beta1: 0.8,
        beta2: 0.95,
        eps: 1e-6,
        weight_decay: 0.1,
    };
    let mut theirs = candle_nn::AdamW::new(vec![w1.clone(), b1.clone()], params).unwrap();
    let config = OptcConfig::new(rule("adamw"))
        .hyper("lr", 0.02)
        .hyper("beta1", 0.8)
        .hyper("beta2", 0.95)
        .hyper("eps", 1e-6)
        .hyper("weight_decay", 0.1);
    let mut ours = OptcOptimizer::new(vec![w2.clone(), b2.clone()], config).unwrap();
    assert_eq!(ours.learning_rate(), 0.02);
    for _ in 0..50 {
        theirs.backward_step(&loss(&w1, &b1)).unwrap();
        ours.backward_step(&loss(&w2, &b2)).unwrap();
    }
    for (a, b) in [(&w1, &w2), (&b1, &b2)] {
        let a = a
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = b
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 * x.abs() + 1e-6, "{x} vs {y}");
        }
    }
    ours.set_learning_rate(0.5);
    assert_eq!(ours.learning_rate(), 0.5);
    ours.set_learning_rate(-1.0); // out of range: kept
    assert_eq!(ours.learning_rate(), 0.5);
}

#[test]
fn bad_configurations_are_errors() {
    let (w, _) = vars();
    // Three params: not a candle optimizer.
    let e =
        OptcOptimizer::new(vec![w.clone()], OptcConfig::new(rule("penalty_bilevel"))).unwrap_err();
    assert!(e.to_string().contains("one param"), "{e}");
    // A scalar input.
    let e = OptcOptimizer::new(vec![w.clone()], OptcConfig::new(rule("n_harpg"))).unwrap_err();
    assert!(e.to_string().contains("one param"), "{e}");
    // f64 variables.
    let v = Var::new(&[1.0f64], &Device::Cpu).unwrap();
    assert!(OptcOptimizer::new(vec![v], OptcConfig::new(rule("adam"))).is_err());
    // An unknown hyperparameter.
    let e =
        OptcOptimizer::new(vec![w], OptcConfig::new(rule("adam")).hyper("betta", 0.5)).unwrap_err();
    assert!(e.to_string().contains("betta"), "{e}");
}
