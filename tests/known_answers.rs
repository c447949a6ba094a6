//! Known answers: stdlib rules checked against results known in closed form (or against a few
//! lines of plain Rust that restate shared/ALGORITHMS.md), through the reference interpreter.
//!
//! Tolerances (f32 buffers unless a test says otherwise):
//! - one-step identities (Adan, diffGrad, clipping): |got − want| ≤ 1e-5·lr + 2.5e-7·|want|, i.e. a
//!   1e-5 relative error on the step plus two f32 ulps of the parameter;
//! - clip_global_norm output: |got − want| ≤ 1e-6·|want| + 1e-12;
//! - N-HARPG / N-PG-IGT: probe points and parameters within 1e-6·(1 + |want|) of the f64
//!   re-implementation; step length |‖θ_{t+1} − θ_t‖ − γ_t| ≤ 1e-5·γ_t;
//! - penalty_bilevel (f64 buffers): ‖x − x*‖∞ ≤ 1e-4 and ‖y − Ax*‖∞, ‖z − Ax*‖∞ ≤ 3e-4 after 3000
//!   steps (the penalty's own bias is O(1/λ) with λ = 3001: about 3e-5 for x, 1e-4 for y), λ to
//!   1e-12 relative.

use optc::runtime::{Inputs, Optimizer};
use std::sync::Arc;

// ---------------------------------------------------------------- helpers

/// A small deterministic generator (xorshift64*), uniform in [0, 1).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next()
    }
    /// A random sign times a log-uniform magnitude in [lo, hi].
    fn signed_log(&mut self, lo: f64, hi: f64) -> f64 {
        let mag = (lo.ln() + (hi.ln() - lo.ln()) * self.next()).exp();
        if self.next() < 0.5 {
            -mag
        } else {
            mag
        }
    }
}

fn tensors(sizes: &[usize], mut f: impl FnMut() -> f64) -> Vec<Vec<f32>> {
    sizes
        .iter()
        .map(|&n| (0..n).map(|_| f() as f32).collect())
        .collect()
}

fn optimizer(rule: &str, params: Vec<Vec<f32>>) -> Optimizer<f32> {
    let program = optc::stdlib_rule(rule).unwrap_or_else(|| panic!("stdlib rule {rule} compiles"));
    Optimizer::new(Arc::new(program), vec![params]).expect("optimizer")
}

fn set(opt: &mut Optimizer<impl optc::compiler::ops::Float + Default>, hypers: &[(&str, f64)]) {
    for &(name, v) in hypers {
        opt.set_hyper(name, v)
            .unwrap_or_else(|e| panic!("set {name}: {e}"));
    }
}

fn slices(ts: &[Vec<f32>]) -> Vec<&[f32]> {
    ts.iter().map(|t| t.as_slice()).collect()
}

/// Asserts every element of `got` is within `tol(want)` of `want`.
fn assert_close(what: &str, got: &[Vec<f32>], want: &[Vec<f64>], tol: impl Fn(f64) -> f64) {
    assert_eq!(got.len(), want.len(), "{what}: number of tensors");
    for (j, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}: length of tensor {j}");
        for (i, (&a, &b)) in g.iter().zip(w).enumerate() {
            let err = (a as f64 - b).abs();
            assert!(
                err <= tol(b),
                "{what}: tensor {j}[{i}]: got {a}, want {b} (error {err:e}, tolerance {:e})",
                tol(b)
            );
        }
    }
}

fn global_norm(ts: &[Vec<f32>]) -> f64 {
    ts.iter()
        .flatten()
        .map(|&x| (x as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn step_tol(lr: f64) -> impl Fn(f64) -> f64 {
    move |want: f64| 1e-5 * lr + 2.5e-7 * want.abs()
}

/// Gradients with a few exact zeros and magnitudes spread over [lo, hi].
fn grads(sizes: &[usize], seed: u64, lo: f64, hi: f64) -> Vec<Vec<f32>> {
    let mut r = Rng::new(seed);
    tensors(sizes, || {
        if r.next() < 0.05 {
            0.0
        } else {
            r.signed_log(lo, hi)
        }
    })
}

fn params(sizes: &[usize], seed: u64) -> Vec<Vec<f32>> {
    let mut r = Rng::new(seed);
    tensors(sizes, || r.uniform(-2.0, 2.0))
}

// ---------------------------------------------------------------- Adan

/// θ − lr·g/(|g| + eps), elementwise, in f64 from the f32 inputs.
fn adan_first_step(theta: &[Vec<f32>], g: &[Vec<f64>], lr: f64, eps: f64) -> Vec<Vec<f64>> {
    theta
        .iter()
        .zip(g)
        .map(|(th, g)| {
            th.iter()
                .zip(g)
                .map(|(&th, &g)| th as f64 - lr * g / (g.abs() + eps))
                .collect()
        })
        .collect()
}

fn widen(ts: &[Vec<f32>]) -> Vec<Vec<f64>> {
    ts.iter()
        .map(|t| t.iter().map(|&x| x as f64).collect())
        .collect()
}

#[test]
fn adan_first_step_identity() {
    let sizes = [0, 1, 5, 1000];
    let configs: &[&[(&str, f64)]] = &[
        &[],
        &[
            ("lr", 0.05),
            ("beta1", 0.9),
            ("beta2", 0.5),
            ("beta3", 0.7),
            ("eps", 0.1),
        ],
        &[
            ("lr", 0.3),
            ("beta1", 0.5),
            ("beta2", 0.99),
            ("beta3", 0.999),
            ("eps", 1e-3),
        ],
    ];
    for (c, hypers) in configs.iter().enumerate() {
        let theta0 = params(&sizes, 10 + c as u64);
        let g = grads(&sizes, 20 + c as u64, 1e-3, 10.0);
        let mut opt = optimizer("adan", theta0.clone());
        set(&mut opt, hypers);
        let lr = opt.hyper("lr").unwrap();
        let eps = opt.hyper("eps").unwrap();
        opt.step(&Inputs::default().tensor("g", slices(&g)))
            .unwrap();
        let want = adan_first_step(&theta0, &widen(&g), lr, eps);
        assert_close(
            &format!("adan config {c}"),
            opt.params(0),
            &want,
            step_tol(lr),
        );
    }
}

#[test]
fn adan_first_step_on_the_globally_clipped_gradient() {
    // eps comparable to the clipped gradient, so that the step depends on the clipping (with
    // |g| >> eps the first step would be −lr·sign(g) whatever the clipping), and on where eps
    // enters the clip coefficient: the rule implements g·min(1, max_grad_norm / (‖g‖_global + eps)).
    let sizes = [3, 1, 0, 200];
    for (case, max_grad_norm) in [(0, 0.5), (1, 2.0), (2, 1e3)] {
        let theta0 = params(&sizes, 30 + case);
        let mut r = Rng::new(40 + case);
        let g = tensors(&sizes, || r.uniform(-1.0, 1.0));
        let (lr, eps) = (0.01, 0.05);
        let mut opt = optimizer("adan", theta0.clone());
        set(
            &mut opt,
            &[
                ("lr", lr),
                ("eps", eps),
                ("max_grad_norm", max_grad_norm),
                ("beta1", 0.9),
            ],
        );
        opt.step(&Inputs::default().tensor("g", slices(&g)))
            .unwrap();
        let norm = global_norm(&g);
        let coef = (max_grad_norm / (norm + eps)).min(1.0);
        if case < 2 {
            assert!(coef < 0.5, "case {case} should clip (norm {norm})");
        } else {
            assert_eq!(coef, 1.0);
        }
        let gc: Vec<Vec<f64>> = g
            .iter()
            .map(|t| t.iter().map(|&x| x as f64 * coef).collect())
            .collect();
        let want = adan_first_step(&theta0, &gc, lr, eps);
        assert_close(
            &format!("adan clipped, max_grad_norm {max_grad_norm}"),
            opt.params(0),
            &want,
            step_tol(lr),
        );
        // The same step with the norm taken per tensor (or without eps) would be measurably different.
        if case == 0 {
            let unclipped = adan_first_step(&theta0, &widen(&g), lr, eps);
            let diff = opt.params(0)[3]
                .iter()
                .zip(&unclipped[3])
                .map(|(&a, &b)| (a as f64 - b).abs())
                .fold(0.0, f64::max);
            assert!(
                diff > 100.0 * step_tol(lr)(2.0),
                "clipping has no visible effect: {diff:e}"
            );
            let no_eps: Vec<Vec<f64>> = g
                .iter()
                .map(|t| {
                    t.iter()
                        .map(|&x| x as f64 * (max_grad_norm / norm))
                        .collect()
                })
                .collect();
            let other = adan_first_step(&theta0, &no_eps, lr, eps);
            let diff = opt.params(0)[3]
                .iter()
                .zip(&other[3])
                .map(|(&a, &b)| (a as f64 - b).abs())
                .fold(0.0, f64::max);
            assert!(
                diff > 10.0 * step_tol(lr)(2.0),
                "eps in the clip coefficient has no visible effect: {diff:e}"
            );
        }
    }
}

#[test]
fn adan_weight_decay_proximal_and_no_prox() {
    let sizes = [4, 1, 17];
    let theta0 = params(&sizes, 50);
    let g = grads(&sizes, 51, 1e-2, 1.0);
    let (lr, wd, eps) = (0.1, 0.5, 1e-8);
    let step = adan_first_step(&theta0, &widen(&g), lr, eps);
    let mut results = Vec::new();
    for decouple in [false, true] {
        let mut opt = optimizer("adan", theta0.clone());
        set(
            &mut opt,
            &[
                ("lr", lr),
                ("weight_decay", wd),
                ("no_prox", if decouple { 1.0 } else { 0.0 }),
            ],
        );
        opt.step(&Inputs::default().tensor("g", slices(&g)))
            .unwrap();
        let want: Vec<Vec<f64>> = theta0
            .iter()
            .zip(&step)
            .map(|(th, s)| {
                th.iter()
                    .zip(s)
                    .map(|(&th, &s)| {
                        let th = th as f64;
                        let delta = s - th; // −lr·g/(|g| + eps)
                        if decouple {
                            // no_prox: θ·(1 − lr·wd) before the step
                            th * (1.0 - lr * wd) + delta
                        } else {
                            // proximal: (θ + Δ) / (1 + lr·wd) after the step
                            (th + delta) / (1.0 + lr * wd)
                        }
                    })
                    .collect()
            })
            .collect();
        assert_close(
            &format!("adan no_prox = {decouple}"),
            opt.params(0),
            &want,
            step_tol(lr),
        );
        results.push(opt.params(0).to_vec());
    }
    assert_ne!(
        results[0], results[1],
        "the two weight-decay variants must differ"
    );
}

// ---------------------------------------------------------------- diffGrad

#[test]
fn diffgrad_first_step() {
    let sizes = [0, 1, 6, 300];
    let configs: &[&[(&str, f64)]] = &[
        &[],
        &[("lr", 0.01), ("beta1", 0.8), ("beta2", 0.99), ("eps", 1e-3)],
    ];
    for (c, hypers) in configs.iter().enumerate() {
        let theta0 = params(&sizes, 60 + c as u64);
        let g = grads(&sizes, 70 + c as u64, 1e-2, 5.0);
        let mut opt = optimizer("diffgrad", theta0.clone());
        set(&mut opt, hypers);
        let [lr, b1, b2, eps] = ["lr", "beta1", "beta2", "eps"].map(|h| opt.hyper(h).unwrap());
        opt.step(&Inputs::default().tensor("g", slices(&g)))
            .unwrap();
        // ξ = sigmoid(|g − 0|); m = (1−β1)g; v = (1−β2)g². The rule adds 1e-15 to v under the
        // square root (as pytorch_optimizer does); with |g| ≥ 1e-2 that is far below f32 resolution.
        let want: Vec<Vec<f64>> = theta0
            .iter()
            .zip(&g)
            .map(|(th, g)| {
                th.iter()
                    .zip(g)
                    .map(|(&th, &g)| {
                        let g = g as f64;
                        let xi = 1.0 / (1.0 + (-g.abs()).exp());
                        let m = (1.0 - b1) * g;
                        let v = (1.0 - b2) * g * g;
                        th as f64 - lr * (1.0 - b2).sqrt() / (1.0 - b1) * xi * m / (v.sqrt() + eps)
                    })
                    .collect()
            })
            .collect();
        assert_close(
            &format!("diffgrad config {c}"),
            opt.params(0),
            &want,
            step_tol(lr),
        );
    }
}

// ---------------------------------------------------------------- clip_global_norm

#[test]
fn clip_global_norm_output() {
    let sizes = [2, 0, 1, 50];
    for (case, max_norm, eps) in [
        (0u64, 1.0, 1e-6),
        (1, 0.3, 0.5),
        (2, 1e4, 1e-6),
        (3, 2.0, 0.0),
    ] {
        let theta0 = params(&sizes, 80 + case);
        let mut r = Rng::new(90 + case);
        let g = tensors(&sizes, || r.uniform(-3.0, 3.0));
        let program = optc::stdlib_rule("clip_global_norm").unwrap();
        let mut opt = Optimizer::<f32>::new(Arc::new(program), vec![theta0.clone()]).unwrap();
        set(&mut opt, &[("max_norm", max_norm), ("eps", eps)]);
        opt.step(&Inputs::default().tensor("g", slices(&g)))
            .unwrap();
        let coef = (max_norm / (global_norm(&g) + eps)).min(1.0);
        let want: Vec<Vec<f64>> = g
            .iter()
            .map(|t| t.iter().map(|&x| x as f64 * coef).collect())
            .collect();
        assert_close(
            &format!("clip case {case}"),
            opt.buffer("g_clipped").expect("output g_clipped"),
            &want,
            |w| 1e-6 * w.abs() + 1e-12,
        );
        assert_eq!(
            opt.params(0),
            theta0.as_slice(),
            "clip_global_norm must not change the parameter"
        );
        if case == 2 {
            assert_eq!(
                opt.buffer("g_clipped").unwrap(),
                g.as_slice(),
                "below the threshold g passes unchanged"
            );
        }
    }
}

// ---------------------------------------------------------------- N-HARPG

fn norm_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// An arbitrary smooth "gradient": g_i = c_i·θ_i + sin(3·θ_i) + b_i.
fn fake_grad(theta: &[Vec<f32>], seed: u64) -> Vec<Vec<f32>> {
    let mut r = Rng::new(seed);
    theta
        .iter()
        .map(|t| {
            t.iter()
                .map(|&x| {
                    (r.uniform(0.5, 2.0) * x as f64 + (3.0 * x as f64).sin() + r.uniform(-1.0, 1.0))
                        as f32
                })
                .collect()
        })
        .collect()
}

#[test]
fn n_harpg_by_hand() {
    let sizes = [4, 1, 0, 9];
    let (gamma0, eta0) = (0.8, 0.7);
    let mut opt = optimizer("n_harpg", params(&sizes, 100));
    set(&mut opt, &[("gamma0", gamma0), ("eta0", eta0)]);
    assert_eq!(
        opt.program().info.stages,
        vec!["probe".to_string(), "update".to_string()]
    );

    let mut theta_prev: Vec<Vec<f32>> = opt.params(0).to_vec(); // θ_0 := θ_1 (u = 0 at t = 1)
    let mut theta_ref = widen(opt.params(0));
    let mut d_ref: Vec<Vec<f64>> = theta_ref.iter().map(|t| vec![0.0; t.len()]).collect();
    for (t, q) in [(1u32, 0.3), (2, 0.75), (3, 0.1)] {
        let theta_t: Vec<Vec<f32>> = opt.params(0).to_vec();
        opt.run_stage(0, &Inputs::default().scalar("q", q)).unwrap();
        // Probe: θ̂ = q·θ_t + (1 − q)·θ_{t−1}, u = θ_t − θ_{t−1}.
        let hat_want: Vec<Vec<f64>> = theta_t
            .iter()
            .zip(&theta_prev)
            .map(|(a, b)| {
                a.iter()
                    .zip(b)
                    .map(|(&a, &b)| q * a as f64 + (1.0 - q) * b as f64)
                    .collect()
            })
            .collect();
        let u_want: Vec<Vec<f64>> = theta_t
            .iter()
            .zip(&theta_prev)
            .map(|(a, b)| {
                a.iter()
                    .zip(b)
                    .map(|(&a, &b)| a as f64 - b as f64)
                    .collect()
            })
            .collect();
        let theta_hat = opt.buffer("theta_hat").expect("output theta_hat").to_vec();
        let u = opt.buffer("u").expect("output u").to_vec();
        assert_close(
            &format!("theta_hat at t = {t}"),
            &theta_hat,
            &hat_want,
            |w| 1e-6 * (1.0 + w.abs()),
        );
        assert_close(&format!("u at t = {t}"), &u, &u_want, |w| {
            1e-6 * (1.0 + w.abs())
        });
        assert_eq!(
            opt.params(0),
            theta_t.as_slice(),
            "the probe stage must not move θ"
        );

        // The host's oracle: g at θ_t, hv at θ̂ along u.
        let g = fake_grad(&theta_t, 7);
        let hv: Vec<Vec<f32>> = theta_hat
            .iter()
            .zip(&u)
            .map(|(h, u)| h.iter().zip(u).map(|(&h, &u)| 2.0 * u + 0.1 * h).collect())
            .collect();
        opt.run_stage(
            1,
            &Inputs::default()
                .tensor("g", slices(&g))
                .tensor("hv", slices(&hv)),
        )
        .unwrap();

        // Reference (ALGORITHMS.md): γ_t = γ0·2/(t+2), η_t = 2·η0/(t+2).
        let tf = t as f64;
        let gamma = gamma0 * 2.0 / (tf + 2.0);
        let eta = 2.0 * eta0 / (tf + 2.0);
        for (j, d) in d_ref.iter_mut().enumerate() {
            for (i, d) in d.iter_mut().enumerate() {
                let (g, hv) = (g[j][i] as f64, hv[j][i] as f64);
                *d = if t == 1 {
                    g
                } else {
                    (1.0 - eta) * (*d + hv) + eta * g
                };
            }
        }
        let dn = d_ref.iter().flatten().map(|x| x * x).sum::<f64>().sqrt();
        for (th, d) in theta_ref.iter_mut().zip(&d_ref) {
            for (th, d) in th.iter_mut().zip(d) {
                *th -= gamma * d / dn;
            }
        }
        assert_close(
            &format!("theta after step {t}"),
            opt.params(0),
            &theta_ref,
            |w| 1e-6 * (1.0 + w.abs()),
        );
        let len = norm_diff(opt.params(0), &theta_t);
        assert!(
            (len - gamma).abs() <= 1e-5 * gamma,
            "step {t}: ‖θ_(t+1) − θ_t‖ = {len}, want γ_t = {gamma}"
        );
        assert_eq!(opt.steps(), t as u64);
        theta_prev = theta_t;
    }
}

// ---------------------------------------------------------------- N-PG-IGT

#[test]
fn n_pg_igt_by_hand() {
    let sizes = [3, 0, 1, 8];
    let (gamma0, eta0) = (0.5, 0.9);
    let mut opt = optimizer("n_pg_igt", params(&sizes, 110));
    set(&mut opt, &[("gamma0", gamma0), ("eta0", eta0)]);
    let mut theta_prev: Vec<Vec<f32>> = opt.params(0).to_vec();
    let mut d_ref: Vec<Vec<f64>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
    for t in 1u32..=4 {
        let tf = t as f64;
        let gamma = gamma0 * 2.0 / (tf + 2.0);
        let eta = eta0 * (2.0 / (tf + 2.0)).powf(0.8);
        let theta_t: Vec<Vec<f32>> = opt.params(0).to_vec();
        opt.run_stage(0, &Inputs::default()).unwrap();
        let tilde = opt
            .buffer("theta_tilde")
            .expect("output theta_tilde")
            .to_vec();
        if t == 1 {
            assert_eq!(tilde, theta_t, "no shift at the first step");
        } else {
            let want: Vec<Vec<f64>> = theta_t
                .iter()
                .zip(&theta_prev)
                .map(|(a, b)| {
                    a.iter()
                        .zip(b)
                        .map(|(&a, &b)| a as f64 + (1.0 - eta) / eta * (a as f64 - b as f64))
                        .collect()
                })
                .collect();
            assert_close(&format!("theta_tilde at t = {t}"), &tilde, &want, |w| {
                1e-6 * (1.0 + w.abs())
            });
        }
        let g = fake_grad(&tilde, 11);
        opt.run_stage(1, &Inputs::default().tensor("g", slices(&g)))
            .unwrap();
        for (j, d) in d_ref.iter_mut().enumerate() {
            for (i, d) in d.iter_mut().enumerate() {
                let g = g[j][i] as f64;
                *d = if t == 1 {
                    g
                } else {
                    (1.0 - eta) * *d + eta * g
                };
            }
        }
        let dn = d_ref.iter().flatten().map(|x| x * x).sum::<f64>().sqrt();
        // θ_{t+1} from the optimizer's own θ_t, so that only this step's error is measured.
        let want: Vec<Vec<f64>> = theta_t
            .iter()
            .zip(&d_ref)
            .map(|(th, d)| {
                th.iter()
                    .zip(d)
                    .map(|(&th, &d)| th as f64 - gamma * d / dn)
                    .collect()
            })
            .collect();
        assert_close(
            &format!("theta after step {t}"),
            opt.params(0),
            &want,
            |w| 1e-6 * (1.0 + w.abs()),
        );
        let len = norm_diff(opt.params(0), &theta_t);
        assert!(
            (len - gamma).abs() <= 1e-5 * gamma,
            "step {t}: ‖θ_(t+1) − θ_t‖ = {len}, want γ_t = {gamma}"
        );
        theta_prev = theta_t;
    }
}

// ---------------------------------------------------------------- penalty_bilevel

const A: [[f64; 3]; 4] = [
    [1.0, 0.5, -0.3],
    [0.2, -1.0, 0.4],
    [0.7, 0.1, 1.2],
    [-0.4, 0.8, 0.3],
];
const B: [f64; 4] = [1.0, -2.0, 0.5, 1.5];
const MU: f64 = 0.1;

fn a_x(x: &[f64]) -> Vec<f64> {
    A.iter()
        .map(|row| row.iter().zip(x).map(|(a, x)| a * x).sum())
        .collect()
}

fn a_t(r: &[f64]) -> Vec<f64> {
    (0..3)
        .map(|j| (0..4).map(|i| A[i][j] * r[i]).sum())
        .collect()
}

/// Solves the 3×3 system m·x = rhs by Cramer's rule.
fn solve3(m: [[f64; 3]; 3], rhs: [f64; 3]) -> [f64; 3] {
    let det = |m: [[f64; 3]; 3]| {
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    };
    let d = det(m);
    assert!(d.abs() > 1e-9);
    let mut x = [0.0; 3];
    for (k, xk) in x.iter_mut().enumerate() {
        let mut mk = m;
        for i in 0..3 {
            mk[i][k] = rhs[i];
        }
        *xk = det(mk) / d;
    }
    x
}

/// x* = (AᵀA + μI)⁻¹ Aᵀb, the minimizer of ½‖Ax − b‖² + ½μ‖x‖².
fn x_star() -> [f64; 3] {
    let mut m = [[0.0; 3]; 3];
    for (i, row) in m.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = (0..4).map(|k| A[k][i] * A[k][j]).sum::<f64>() + if i == j { MU } else { 0.0 };
        }
    }
    let atb = a_t(&B);
    solve3(m, [atb[0], atb[1], atb[2]])
}

/// f(x, y) = ½‖y − b‖² + ½μ‖x‖², g(x, y) = ½‖y − Ax‖²: the rule's six gradient inputs at (x, y, z).
fn bilevel_inputs(x: &[f64], y: &[f64], z: &[f64]) -> [(&'static str, Vec<f64>); 6] {
    let ax = a_x(x);
    let ry: Vec<f64> = y.iter().zip(&ax).map(|(y, a)| y - a).collect();
    let rz: Vec<f64> = z.iter().zip(&ax).map(|(z, a)| z - a).collect();
    [
        ("fx", x.iter().map(|x| MU * x).collect()),
        ("gx_y", a_t(&ry).iter().map(|v| -v).collect()),
        ("gx_z", a_t(&rz).iter().map(|v| -v).collect()),
        ("fy", y.iter().zip(&B).map(|(y, b)| y - b).collect()),
        ("gy", ry),
        ("gz", rz),
    ]
}

fn bilevel_step(opt: &mut Optimizer<f64>) {
    let (x, y, z) = (
        opt.params(0)[0].clone(),
        opt.params(1)[0].clone(),
        opt.params(2)[0].clone(),
    );
    let ins = bilevel_inputs(&x, &y, &z);
    let mut inputs = Inputs::default();
    for (name, v) in &ins {
        inputs = inputs.tensor(name, vec![v.as_slice()]);
    }
    opt.step(&inputs).unwrap();
}

fn bilevel_optimizer() -> Optimizer<f64> {
    let program = optc::stdlib_rule("penalty_bilevel").unwrap();
    assert_eq!(
        program.info.spaces,
        vec!["x".to_string(), "y".to_string(), "z".to_string()]
    );
    Optimizer::<f64>::new(
        Arc::new(program),
        vec![vec![vec![0.0; 3]], vec![vec![0.0; 4]], vec![vec![0.0; 4]]],
    )
    .unwrap()
}

#[test]
fn penalty_bilevel_converges_to_the_closed_form_minimizer() {
    let mut opt = bilevel_optimizer();
    // Step sizes chosen so that α_y·(1 + λ_t) = c_y (λ_t = 1 + (t − 1), α_y = c_y/(t + 1)): the
    // penalized lower level stays well conditioned while λ grows linearly, and y and z follow
    // their targets at the same rate.
    set(
        &mut opt,
        &[
            ("c_y", 0.5),
            ("e_y", 1.0),
            ("c_z", 0.5),
            ("e_z", 0.0),
            ("c_x", 0.1),
            ("e_x", 0.0),
            ("lam0", 1.0),
            ("c_lam", 1.0),
            ("e_lam", 0.0),
        ],
    );
    let steps = 3000;
    for _ in 0..steps {
        bilevel_step(&mut opt);
    }
    let lam = opt.scalar_state("lam").unwrap();
    assert!(
        (lam - (1.0 + steps as f64)).abs() <= 1e-12 * lam,
        "lam = {lam}, want {}",
        1 + steps
    );
    let xs = x_star();
    let x = &opt.params(0)[0];
    let err = x
        .iter()
        .zip(&xs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(err <= 1e-4, "x = {x:?}, x* = {xs:?}, error {err:e}");
    // The lower levels: z → y*(x) = A x, and y → A x as λ → ∞ (y's bias is (b − Ax)/(1 + λ)).
    let ax = a_x(&xs);
    for (name, space) in [("y", 1), ("z", 2)] {
        let v = &opt.params(space)[0];
        let err = v
            .iter()
            .zip(&ax)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(err <= 3e-4, "{name} = {v:?}, A x* = {ax:?}, error {err:e}");
    }
}

#[test]
fn penalty_bilevel_lambda_schedule() {
    let mut opt = bilevel_optimizer();
    let [lam0, c_lam, e_lam] = ["lam0", "c_lam", "e_lam"].map(|h| opt.hyper(h).unwrap());
    assert_eq!((lam0, c_lam), (1.0, 0.1));
    assert!((e_lam - 1.0 / 7.0).abs() < 1e-15);
    let mut want = lam0;
    for k in 1..=12u32 {
        bilevel_step(&mut opt);
        want += c_lam / (k as f64 + 1.0).powf(e_lam);
        let lam = opt.scalar_state("lam").unwrap();
        assert!(
            (lam - want).abs() <= 1e-12 * want,
            "after {k} steps: lam = {lam}, want {want}"
        );
    }
    // And with other constants.
    let mut opt = bilevel_optimizer();
    set(&mut opt, &[("lam0", 2.5), ("c_lam", 0.3), ("e_lam", 0.5)]);
    let mut want = 2.5;
    for k in 1..=5u32 {
        bilevel_step(&mut opt);
        want += 0.3 / (k as f64 + 1.0).sqrt();
    }
    let lam = opt.scalar_state("lam").unwrap();
    assert!(
        (lam - want).abs() <= 1e-12 * want,
        "lam = {lam}, want {want}"
    );
}
