//! Known answers for the seed papers' rules that have no reference implementation to run
//! (normalized_gd, prox_sgd, optimistic_omd, adagrad_norm, meco) and for spsa's MeZO steps: each
//! rule against a transcription of its paper's equations (per-step scalars in f64 rounded once to
//! f32, per-element arithmetic in f32, as the rules compute), on nondefault hyperparameters, for
//! 20+ steps, on the interpreter and Cranelift, and on problems with a closed-form answer.

use optc::compiler::random::{self, Dist};
use optc::runtime::{Backend, Inputs, Optimizer};
use std::sync::Arc;

mod common;
use common::fill;

const BACKENDS: [Backend; 2] = [Backend::Interpreter, Backend::Cranelift { threads: 2 }];

fn opt(
    name: &str,
    params: Vec<Vec<f32>>,
    backend: Backend,
    hypers: &[(&str, f64)],
) -> Optimizer<f32> {
    let p = optc::stdlib_rule(name).unwrap_or_else(|| panic!("stdlib rule {name}"));
    let mut o = Optimizer::new(Arc::new(p), params.into_iter().map(|t| vec![t]).collect())
        .expect("bind")
        .with_backend(backend)
        .expect("backend");
    for (h, v) in hypers {
        o.set_hyper(h, *v).expect("hyper");
    }
    o
}

fn f(v: f64) -> f32 {
    v as f32
}

#[test]
fn normalized_gd_divides_the_step_by_the_loss() {
    // f(theta) = 1/2 |theta|^2 + 1 > 0, g = theta.
    let n = 257;
    for backend in BACKENDS {
        let mut o = opt("normalized_gd", vec![fill(1, n)], backend, &[("lr", 0.7)]);
        let mut th = fill(1, n);
        for _ in 0..25 {
            let loss = 0.5 * th.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>() + 1.0;
            let g = th.clone();
            o.step(
                &Inputs::default()
                    .tensor("g", vec![&g[..]])
                    .scalar("loss", loss),
            )
            .expect("step");
            let s = f(0.7 / loss);
            for (x, gi) in th.iter_mut().zip(&g) {
                *x -= s * gi;
            }
            assert_eq!(o.params(0)[0], th, "{backend:?}");
        }
        // Each step shrinks theta toward the minimizer 0 by the factor 1 - lr / f(theta).
        let end = 0.5 * th.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>() + 1.0;
        let start = 0.5
            * fill(1, n)
                .iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum::<f64>()
            + 1.0;
        assert!(end < start, "{backend:?}: {end} from {start}");
    }
}

#[test]
fn prox_sgd_soft_thresholds_and_clamps() {
    let n = 100;
    for (l1, boxed) in [(0.3, false), (0.5, true), (0.0, true)] {
        for backend in BACKENDS {
            let hs = [
                ("lr", 0.2),
                ("l1", l1),
                ("box", if boxed { 1.0 } else { 0.0 }),
                ("lo", -0.25),
                ("hi", 0.5),
            ];
            let mut o = opt("prox_sgd", vec![fill(2, n)], backend, &hs);
            let mut th = fill(2, n);
            for s in 0..21 {
                let g = fill(100 + s, n);
                o.step(&Inputs::default().tensor("g", vec![&g[..]]))
                    .expect("step");
                for (x, gi) in th.iter_mut().zip(&g) {
                    let y = *x - f(0.2) * gi;
                    let sh = y.signum() * (y.abs() - f(0.2 * l1)).max(0.0);
                    let sh = if y == 0.0 { 0.0 } else { sh };
                    *x = if boxed { sh.clamp(-0.25, 0.5) } else { sh };
                }
                assert_eq!(o.params(0)[0], th, "{backend:?} l1 {l1} box {boxed}");
            }
        }
    }
    // Closed form: minimizing 1/2 |theta - c|^2 + l1 |theta|_1 gives soft(c, l1).
    let c = fill(7, 64);
    let mut o = opt(
        "prox_sgd",
        vec![vec![0.0; 64]],
        Backend::Cranelift { threads: 2 },
        &[("lr", 0.5), ("l1", 0.2)],
    );
    for _ in 0..200 {
        let g: Vec<f32> = o.params(0)[0].iter().zip(&c).map(|(x, c)| x - c).collect();
        o.step(&Inputs::default().tensor("g", vec![&g[..]]))
            .expect("step");
    }
    for (x, c) in o.params(0)[0].iter().zip(&c) {
        let want = c.signum() * (c.abs() - 0.2).max(0.0);
        assert!((x - want).abs() < 1e-5, "{x} against {want}");
    }
}

#[test]
fn optimistic_omd_follows_its_two_sequences() {
    let n = 33;
    for (radius, boxed, adaptive) in [(0.0, false, false), (1.5, false, true), (0.0, true, true)] {
        for backend in BACKENDS {
            let hs = [
                ("lr", 0.3),
                ("radius", radius),
                ("box", f64::from(u8::from(boxed))),
                ("lo", -0.2),
                ("hi", 0.3),
                ("adaptive", f64::from(u8::from(adaptive))),
            ];
            let mut o = opt("optimistic_omd", vec![fill(3, n)], backend, &hs);
            let (mut xhat, mut gp) = (fill(3, n), vec![0f32; n]);
            let mut var = 0f64;
            let proj = |v: Vec<f32>| -> Vec<f32> {
                if radius > 0.0 {
                    let norm = v
                        .iter()
                        .map(|&a| f64::from(a) * f64::from(a))
                        .sum::<f64>()
                        .sqrt();
                    let s = f((1f64).min(radius / norm));
                    v.iter().map(|a| a * s).collect()
                } else if boxed {
                    v.iter().map(|a| a.clamp(-0.2, 0.3)).collect()
                } else {
                    v
                }
            };
            for s in 0..22 {
                let g = fill(50 + s, n);
                o.step(&Inputs::default().tensor("g", vec![&g[..]]))
                    .expect("step");
                if adaptive {
                    var += g
                        .iter()
                        .zip(&gp)
                        .map(|(a, b)| f64::from(a - b) * f64::from(a - b))
                        .sum::<f64>();
                }
                let eta = f(if adaptive {
                    0.3 / (1.0 + var).sqrt()
                } else {
                    0.3
                });
                xhat = proj(xhat.iter().zip(&g).map(|(a, b)| a - eta * b).collect());
                let x = proj(xhat.iter().zip(&g).map(|(a, b)| a - eta * b).collect());
                gp = g;
                let got = &o.params(0)[0];
                for (e, (a, b)) in got.iter().zip(&x).enumerate() {
                    // Norms are sums in another order: a last-bit difference in a projection's scale.
                    assert!(
                        (a - b).abs() <= 4.0 * f32::EPSILON * b.abs().max(1e-3),
                        "{backend:?} {hs:?} step {s} element {e}: {a} against {b}"
                    );
                }
                if radius > 0.0 {
                    let norm = got
                        .iter()
                        .map(|&a| f64::from(a) * f64::from(a))
                        .sum::<f64>()
                        .sqrt();
                    assert!(norm <= radius * (1.0 + 1e-6));
                }
            }
        }
    }
}

#[test]
fn adagrad_norm_keeps_one_accumulator() {
    let n = 300;
    for backend in BACKENDS {
        let hs = [("lr", 0.05), ("b0_sq", 0.5), ("weight_decay", 0.01)];
        let mut o = opt("adagrad_norm", vec![fill(4, n)], backend, &hs);
        let mut th = fill(4, n);
        let mut b_sq = 0.5f64;
        for s in 0..20 {
            let g = fill(200 + s, n);
            o.step(&Inputs::default().tensor("g", vec![&g[..]]))
                .expect("step");
            let gw: Vec<f32> = g.iter().zip(&th).map(|(g, t)| g + f(0.01) * t).collect();
            b_sq += gw.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>();
            let s = f(0.05 / b_sq.sqrt());
            for (t, gi) in th.iter_mut().zip(&gw) {
                *t -= s * gi;
            }
            let got = &o.params(0)[0];
            for (a, b) in got.iter().zip(&th) {
                assert!(
                    (a - b).abs() <= 2.0 * f32::EPSILON * b.abs().max(1e-3),
                    "{backend:?}: {a} against {b}"
                );
            }
            let acc = o.scalar_state("b_sq").expect("b_sq");
            assert!((acc - b_sq).abs() <= 1e-6 * b_sq, "{acc} against {b_sq}");
        }
    }
}

#[test]
fn meco_tracks_the_ratio_and_the_compositional_gradient() {
    let n = 65;
    for backend in BACKENDS {
        let hs = [("lr", 0.02), ("gamma", 0.3), ("beta", 0.2)];
        let mut o = opt("meco", vec![fill(5, n)], backend, &hs);
        let (mut th, mut v) = (fill(5, n), vec![0f32; n]);
        let mut u = 0f64;
        for s in 0..20u64 {
            let (a, b) = (fill(300 + s, n), fill(400 + s, n));
            let ratio = 1.0 + 0.1 * s as f64;
            o.step(
                &Inputs::default()
                    .tensor("grad_log_p", vec![&a[..]])
                    .tensor("grad_ratio", vec![&b[..]])
                    .scalar("ratio", ratio),
            )
            .expect("step");
            // u starts at the first ratio, then moves (in f64 on the host).
            if s == 0 {
                u = ratio;
            }
            u = (1.0 - 0.3) * u + 0.3 * ratio;
            let (one_b, bb) = (f(1.0 - 0.2), f(0.2));
            for e in 0..n {
                v[e] = one_b * v[e] + bb * (b[e] / f(u) - a[e]);
                th[e] -= f(0.02) * v[e];
            }
            assert_eq!(o.scalar_state("u"), Some(u), "{backend:?} u");
            assert_eq!(o.params(0)[0], th, "{backend:?} step {s}");
        }
    }
}

#[test]
fn spsa_takes_mezo_steps_and_descends_a_quadratic_without_gradients() {
    let n = 50;
    let c: Vec<f32> = fill(9, n);
    let loss = |th: &[f32]| -> f64 {
        th.iter()
            .zip(&c)
            .map(|(a, b)| 0.5 * f64::from(a - b) * f64::from(a - b))
            .sum()
    };
    for backend in BACKENDS {
        let hs = [("lr", 0.02), ("eps", 1e-3), ("weight_decay", 0.01)];
        let mut o = opt("spsa", vec![vec![0.0; n]], backend, &hs);
        o.set_seed(2024);
        let mut th = vec![0f32; n];
        let start = loss(&th);
        for t in 1..=300u64 {
            let z: Vec<f32> = (0..n as u64)
                .map(|e| random::draw(Dist::Normal, 2024, t, random::named_stream("z"), e))
                .collect();
            o.run_stage(0, &Inputs::default()).expect("plus");
            let lp = loss(&o.params(0)[0]);
            o.run_stage(1, &Inputs::default().scalar("loss_plus", lp))
                .expect("minus");
            let lm = loss(&o.params(0)[0]);
            o.run_stage(2, &Inputs::default().scalar("loss_minus", lm))
                .expect("update");
            // The transcription: the same perturbations, the restore, then the step.
            let eps = f(1e-3);
            let two_eps = f(2.0 * 1e-3);
            let p = (lp - lm) / (2.0 * 1e-3);
            for e in 0..n {
                let a = th[e] + eps * z[e];
                let b = a - two_eps * z[e];
                let r = b + eps * z[e];
                th[e] = r - f(0.02) * (f(p) * z[e] + f(0.01) * r);
            }
            assert_eq!(o.params(0)[0], th, "{backend:?} step {t}");
        }
        // No gradient was ever computed, and the loss fell.
        assert!(
            loss(&th) < 0.5 * start,
            "{backend:?}: {} from {start}",
            loss(&th)
        );
    }
}

/// BO-REP on a quadratic bilevel problem with a closed form: g(x, y) = |y - a x|^2 / 2 (so
/// y*(x) = a x, H_yy = I, grad^2_xy g z = -a z), f(x, y) = |y - b|^2 / 2 + c |x|^2 / 2, whose
/// minimizer over x is a b / (a^2 + c), elementwise. The rule against a transcription of the
/// repository's order of operations, then its convergence.
#[test]
fn bo_rep_follows_the_repositorys_order_and_solves_a_quadratic_bilevel_problem() {
    let n = 9;
    let a: Vec<f64> = (0..n).map(|i| 0.5 + 0.2 * i as f64).collect();
    let b: Vec<f64> = (0..n).map(|i| (i as f64 * 0.7).sin() * 2.0).collect();
    let c = 0.5;
    let run = |hypers: &[(&str, f64)], steps: usize| {
        let p = Arc::new(optc::stdlib_rule("bo_rep").unwrap());
        let mut o =
            Optimizer::<f64>::new(p, vec![vec![vec![0.3; n]], vec![vec![-0.2; n]]]).unwrap();
        for &(h, v) in hypers {
            o.set_hyper(h, v).unwrap();
        }
        let get = |o: &Optimizer<f64>, name: &str| o.buffer(name).unwrap()[0].clone();
        // The transcription, in the repository's order.
        let (mut x, mut y) = (vec![0.3; n], vec![-0.2; n]);
        let (mut z, mut m) = (vec![0.0; n], vec![0.0; n]);
        let h = |k: &str| hypers.iter().find(|(name, _)| *name == k).map(|p| p.1);
        let (lr, gamma) = (h("lr").unwrap_or(5e-2), h("gamma").unwrap_or(5e-2));
        let (nu, beta) = (h("nu").unwrap_or(1e-2), h("beta").unwrap_or(0.9));
        let interval = h("interval").unwrap_or(2.0) as usize;
        let normalized = h("normalized").unwrap_or(1.0) != 0.0;
        for t in 1..=steps {
            let gy: Vec<f64> = (0..n).map(|i| y[i] - a[i] * x[i]).collect();
            let hz = z.clone();
            o.run_stage(0, &Inputs::default().tensor("gy", vec![&gy]))
                .unwrap();
            if (t - 1) % interval == 0 {
                (0..n).for_each(|i| y[i] -= gamma * gy[i]);
            }
            let fy: Vec<f64> = (0..n).map(|i| y[i] - b[i]).collect();
            o.run_stage(
                1,
                &Inputs::default()
                    .tensor("hz", vec![&hz])
                    .tensor("fy", vec![&fy]),
            )
            .unwrap();
            (0..n).for_each(|i| z[i] -= nu * (hz[i] - fy[i]));
            let hxz: Vec<f64> = (0..n).map(|i| -a[i] * z[i]).collect();
            let fx: Vec<f64> = (0..n).map(|i| c * x[i]).collect();
            o.run_stage(
                2,
                &Inputs::default()
                    .tensor("hxz", vec![&hxz])
                    .tensor("fx", vec![&fx]),
            )
            .unwrap();
            (0..n).for_each(|i| m[i] = beta * m[i] + (1.0 - beta) * (fx[i] - hxz[i]));
            let norm = m.iter().map(|v| v * v).sum::<f64>().sqrt();
            let step = if normalized { lr / (1e-10 + norm) } else { lr };
            (0..n).for_each(|i| x[i] -= step * m[i]);
            for (name, want) in [("x", &x), ("y", &y), ("z", &z), ("m", &m)] {
                for (e, (ours, w)) in get(&o, name).iter().zip(want.iter()).enumerate() {
                    assert!(
                        (ours - w).abs() <= 1e-12 * (1.0 + w.abs()),
                        "step {t}: {name}[{e}] = {ours}, transcription {w}"
                    );
                }
            }
        }
        x
    };
    let nondefault = [
        ("lr", 0.02),
        ("gamma", 0.5),
        ("nu", 0.3),
        ("beta", 0.8),
        ("interval", 3.0),
    ];
    run(&nondefault, 30);
    run(&[], 25);
    // Without normalization it converges to the closed form; normalized, it stays within a few
    // steps of it.
    let best: Vec<f64> = (0..n).map(|i| a[i] * b[i] / (a[i] * a[i] + c)).collect();
    let dist = |x: &[f64]| {
        x.iter()
            .zip(&best)
            .map(|(u, v)| (u - v).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let plain = run(
        &[
            ("lr", 0.2),
            ("gamma", 0.5),
            ("nu", 0.5),
            ("beta", 0.5),
            ("normalized", 0.0),
        ],
        3000,
    );
    assert!(
        dist(&plain) < 1e-6,
        "plain momentum: {} from the minimizer",
        dist(&plain)
    );
    let normed = run(
        &[("lr", 0.005), ("gamma", 0.5), ("nu", 0.5), ("beta", 0.5)],
        3000,
    );
    assert!(
        dist(&normed) < 0.05,
        "normalized: {} from the minimizer",
        dist(&normed)
    );
}

/// On the steps its lower level rests, BO-REP's first stage needs no lower-level gradient.
#[test]
fn bo_rep_asks_for_the_lower_gradient_only_on_periodic_steps() {
    let p = Arc::new(optc::stdlib_rule("bo_rep").unwrap());
    let mut o = Optimizer::<f32>::new(p, vec![vec![vec![0.3; 4]], vec![vec![-0.2; 4]]]).unwrap();
    o.set_hyper("interval", 3.0).unwrap();
    let gy = o.program().info.buffer("gy").unwrap();
    let v = vec![0.1f32; 4];
    for t in 1..=7u64 {
        let needs = o.stage_needs(0).unwrap();
        assert_eq!(needs.tensors.contains(&gy), (t - 1) % 3 == 0, "step {t}");
        let mut lower = Inputs::default();
        if needs.tensors.contains(&gy) {
            lower = lower.tensor("gy", vec![&v]);
        }
        o.run_stage(0, &lower).unwrap();
        o.run_stage(
            1,
            &Inputs::default()
                .tensor("hz", vec![&v])
                .tensor("fy", vec![&v]),
        )
        .unwrap();
        o.run_stage(
            2,
            &Inputs::default()
                .tensor("hxz", vec![&v])
                .tensor("fx", vec![&v]),
        )
        .unwrap();
    }
}
