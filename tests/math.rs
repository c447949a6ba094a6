//! Inline math of the Cranelift backend against Rust's standard library (f32): `exp`, `log`,
//! `sigmoid` and `tanh` within 2 ulp over dense sweeps of their whole range and at the edges
//! (0, -0, subnormals, ±inf, NaN, overflow and underflow thresholds), in the vector loop and in
//! the scalar tail.

use optc::runtime::{Backend, Inputs, Optimizer};
use std::sync::Arc;

mod common;
use common::ulps_nan_max;

/// Every `step`-th f32 bit pattern of both signs, plus the edge values.
fn sweep(step: u32) -> Vec<f32> {
    let mut v: Vec<f32> = (0..0x7f80_0000u32)
        .step_by(step as usize)
        .flat_map(|b| [f32::from_bits(b), -f32::from_bits(b)])
        .collect();
    v.extend([
        0.0,
        -0.0,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        1e-45,
        -1e-45,
        1e-40,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MAX,
        f32::MIN,
        88.72283,
        88.7229,
        89.0,
        -87.33654,
        -87.3366,
        -103.972,
        -103.98,
        -104.0,
        0.625,
        -0.625,
        0.6249999,
        9.0,
        -9.0,
        1.0,
        -1.0,
        std::f32::consts::FRAC_1_SQRT_2,
        f32::from_bits(0x3f35_04f4),
        std::f32::consts::SQRT_2,
        0.5,
        2.0,
    ]);
    v
}

/// Evaluates `f(g)` elementwise with the Cranelift backend.
fn jit_eval(f: &str, xs: &[f32]) -> Vec<f32> {
    let src = format!("rule m() {{ param x  input g  out y = {f}(g) }}");
    let program = optc::compile_rule(&src).unwrap();
    let mut opt = Optimizer::new(Arc::new(program), vec![vec![vec![0.0; xs.len()]]])
        .unwrap()
        .with_backend(Backend::Cranelift { threads: 2 })
        .unwrap();
    opt.step(&Inputs::default().tensor("g", vec![xs])).unwrap();
    opt.buffer("y").unwrap()[0].clone()
}

fn check(f: &str, reference: fn(f32) -> f32, max: u64) {
    let xs = sweep(997);
    // Odd length: the last elements run through the scalar tail.
    for xs in [&xs[..], &xs[..3], &xs[xs.len() - 37..]] {
        let ys = jit_eval(f, xs);
        let mut worst = (0u64, 0f32);
        for (&x, &y) in xs.iter().zip(&ys) {
            let r = reference(x);
            let d = ulps_nan_max(y, r);
            if d > worst.0 {
                worst = (d, x);
            }
            assert!(d <= max, "{f}({x:e}) = {y:e}, std gives {r:e} ({d} ulps)");
        }
        println!(
            "{f}: {} values, worst {} ulp at {:e}",
            xs.len(),
            worst.0,
            worst.1
        );
    }
}

#[test]
fn exp_is_within_two_ulps() {
    check("exp", f32::exp, 2);
}

#[test]
fn log_is_within_two_ulps() {
    check("log", f32::ln, 2);
}

#[test]
fn sigmoid_is_within_two_ulps() {
    // The correctly rounded value (the interpreter's definition).
    check(
        "sigmoid",
        |x| (1.0 / (1.0 + (-f64::from(x)).exp())) as f32,
        2,
    );
}

#[test]
fn tanh_is_within_two_ulps() {
    check("tanh", f32::tanh, 2);
}
