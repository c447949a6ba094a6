//! Mixed precision: 16-bit parameters and state with f32 arithmetic, against an f32 reference;
//! stochastic rounding unbiased and reproducible; Philox against its published test vectors.

use optc::runtime::mixed::{
    bf16, f16, philox4x32, rounding_bits, MixedOptimizer, MixedOptions, Rounding, Storage,
};
use optc::runtime::{Backend, Error, Inputs, Optimizer, TensorSpec};
use std::sync::Arc;

mod common;
use common::fill_grid;

/// Known-answer vectors of Random123 (kat_vectors, philox4x32 with 10 rounds).
#[test]
fn philox_known_answers() {
    assert_eq!(
        philox4x32([0; 4], [0; 2]),
        [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
    );
    assert_eq!(
        philox4x32([u32::MAX; 4], [u32::MAX; 2]),
        [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
    );
    assert_eq!(
        philox4x32(
            [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
            [0xa4093822, 0x299f31d0]
        ),
        [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
    );
}

/// The mean of many stochastic roundings of one value is that value (within 5 standard errors);
/// every result is one of the two neighbours; nearest rounding would be off by the whole bias.
#[test]
fn stochastic_rounding_is_unbiased() {
    const N: u64 = 1 << 20;
    for &x in &[1.0f32 + 3.0 / 1024.0, -0.3337, 1.0e-3 + 1.0e-6, 123.456] {
        // The neighbours: x truncated toward zero, and one unit further from zero.
        let toward = bf16::from_bits((x.to_bits() >> 16) as u16);
        let away = bf16::from_bits(toward.to_bits() + 1);
        let (a, b) = if toward.to_f32() <= away.to_f32() {
            (toward, away)
        } else {
            (away, toward)
        };
        let mut sum = 0.0f64;
        for i in 0..N {
            let r = bf16::stochastic(x, rounding_bits(7, 3, 0, i));
            assert!(r == a || r == b, "{x}: {r} is not a neighbour");
            sum += f64::from(r.to_f32());
        }
        let gap = f64::from(b.to_f32() - a.to_f32());
        let p = (f64::from(x) - f64::from(a.to_f32())) / gap;
        let se = gap * (p * (1.0 - p) / N as f64).sqrt();
        let mean = sum / N as f64;
        assert!(
            (mean - f64::from(x)).abs() < 5.0 * se + 1e-12,
            "bf16 {x}: mean {mean}, standard error {se}"
        );
        // f16 too.
        let mut sum = 0.0f64;
        for i in 0..N {
            sum += f64::from(f16::stochastic(x, rounding_bits(7, 3, 1, i)).to_f32());
        }
        let near = f16::from_f32(x);
        let ulp = f64::from((f16::from_bits(near.to_bits() + 1).to_f32() - near.to_f32()).abs());
        let mean = sum / N as f64;
        assert!(
            (mean - f64::from(x)).abs() < 5.0 * ulp / (N as f64).sqrt(),
            "f16 {x}: mean {mean}"
        );
    }
    // Exact and special values are kept.
    for x in [0.0f32, -0.0, 1.0, -2.5, f32::INFINITY, f32::NEG_INFINITY] {
        assert_eq!(
            bf16::stochastic(x, 0xFFFF_FFFF).to_f32().to_bits(),
            x.to_bits()
        );
        assert_eq!(
            f16::stochastic(x, 0xFFFF_FFFF).to_f32().to_bits(),
            x.to_bits()
        );
    }
    assert!(bf16::stochastic(f32::NAN, 12345).is_nan());
    assert!(f16::stochastic(f32::NAN, 12345).is_nan());
}

#[test]
fn stochastic_rounding_is_reproducible() {
    let x = 1.0f32 + 1.0 / 512.0;
    let draw = |seed, step| -> Vec<bf16> {
        (0..4096)
            .map(|i| bf16::stochastic(x, rounding_bits(seed, step, 2, i)))
            .collect()
    };
    assert_eq!(draw(1, 5), draw(1, 5));
    let differ = |a: &[bf16], b: &[bf16]| a.iter().zip(b).filter(|(a, b)| a != b).count();
    // p = 1/4 per element: two independent draws differ in about 2 * 1/4 * 3/4 = 37.5% of them.
    for (a, b) in [(draw(1, 5), draw(2, 5)), (draw(1, 5), draw(1, 6))] {
        let d = differ(&a, &b);
        assert!((1200..1900).contains(&d), "{d} of 4096 differ");
    }
}

const LENS: [usize; 3] = [1, 37, 1000];

fn specs() -> Vec<Vec<TensorSpec>> {
    vec![LENS
        .iter()
        .enumerate()
        .map(|(j, &n)| TensorSpec::new(format!("t{j}"), &[n]))
        .collect()]
}

fn grads(s: u64) -> Vec<Vec<f32>> {
    LENS.iter()
        .enumerate()
        .map(|(j, &n)| fill_grid(s * 13 + j as u64, n))
        .collect()
}

fn init() -> Vec<Vec<f32>> {
    LENS.iter()
        .enumerate()
        .map(|(j, &n)| fill_grid(50 + j as u64, n))
        .collect()
}

/// The f32 reference: the same rule over f32 params, starting from the 16-bit params' values.
fn reference(rule: &str, start: &[Vec<f32>], steps: u64, sets: &[(&str, f64)]) -> Optimizer<f32> {
    let p = Arc::new(optc::stdlib_rule(rule).unwrap());
    let mut o = Optimizer::new(p, vec![start.to_vec()]).unwrap();
    for (k, v) in sets {
        o.set_hyper(k, *v).unwrap();
    }
    for s in 0..steps {
        let g = grads(s);
        o.step(&Inputs::default().tensor("g", g.iter().map(Vec::as_slice).collect()))
            .unwrap();
    }
    o
}

fn mixed<S: Storage>(
    rule: &str,
    options: MixedOptions,
    backend: Backend,
    steps: u64,
    sets: &[(&str, f64)],
) -> (MixedOptimizer<S>, Vec<Vec<S>>) {
    let p = Arc::new(optc::stdlib_rule(rule).unwrap());
    let mut o = MixedOptimizer::<S>::new(p, specs(), options)
        .unwrap()
        .with_backend(backend)
        .unwrap();
    for (k, v) in sets {
        o.inner_mut().set_hyper(k, *v).unwrap();
    }
    let mut params: Vec<Vec<S>> = init()
        .iter()
        .map(|t| t.iter().map(|&x| S::nearest(x)).collect())
        .collect();
    for s in 0..steps {
        let g = grads(s);
        let mut lend: Vec<&mut [S]> = params.iter_mut().map(Vec::as_mut_slice).collect();
        o.step_with(
            std::slice::from_mut(&mut lend),
            &Inputs::default().tensor("g", g.iter().map(Vec::as_slice).collect()),
        )
        .unwrap();
    }
    (o, params)
}

fn widen<S: Storage>(p: &[Vec<S>]) -> Vec<Vec<f32>> {
    p.iter()
        .map(|t| t.iter().map(|x| x.to_f32()).collect())
        .collect()
}

/// With master weights, the masters follow the f32 reference bit for bit and the bf16 params are
/// the masters rounded to nearest.
#[test]
fn master_weights_equal_the_f32_reference() {
    let sets = [("lr", 0.01), ("weight_decay", 0.05)];
    for backend in [Backend::Interpreter, Backend::Cranelift { threads: 2 }] {
        let options = MixedOptions {
            master_weights: true,
            ..Default::default()
        };
        let (o, params) = mixed::<bf16>("adamw", options, backend, 12, &sets);
        let start = widen(
            &init()
                .iter()
                .map(|t| t.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>())
                .collect::<Vec<_>>(),
        );
        let r = reference("adamw", &start, 12, &sets);
        let masters = &o.master_weights().unwrap()[0];
        assert_eq!(&masters[..], r.params(0), "{backend:?}");
        for (m, p) in masters.iter().zip(&params) {
            for (&m, &p) in m.iter().zip(p) {
                assert_eq!(p, bf16::from_f32(m));
            }
        }
        assert_eq!(o.state("m").unwrap(), r.buffer("m").unwrap());
    }
}

/// Without master weights: bf16 or f16 params, f32 or bf16 state, against the f32 reference.
/// Tolerance per element after 12 Adam steps of lr 0.01: |mixed - f32| <= 8 ulp of the storage
/// type at the value (rounding after each step moves a value by at most half an ulp) plus
/// 0.1 * lr for the state rounding's effect on the update direction.
#[test]
fn sixteen_bit_params_and_state_track_f32() {
    let sets = [("lr", 0.01), ("beta2", 0.99)];
    for bf16_state in [false, true] {
        for rounding in [Rounding::Nearest, Rounding::Stochastic { seed: 42 }] {
            let options = MixedOptions {
                master_weights: false,
                bf16_state,
                rounding,
            };
            let (_, pb) = mixed::<bf16>(
                "adam",
                options,
                Backend::Cranelift { threads: 2 },
                12,
                &sets,
            );
            let (_, ph) = mixed::<f16>(
                "adam",
                options,
                Backend::Cranelift { threads: 1 },
                12,
                &sets,
            );
            let r = reference("adam", &init(), 12, &sets);
            for (got, ulp) in [(widen(&pb), 1.0 / 128.0), (widen(&ph), 1.0 / 1024.0)] {
                let mut worst = 0.0f32;
                for (g, w) in got.iter().zip(r.params(0)) {
                    for (&g, &w) in g.iter().zip(w) {
                        let tol = 8.0 * ulp * w.abs().max(1.0 / 64.0) + 0.1 * 0.01;
                        worst = worst.max((g - w).abs() / tol);
                    }
                }
                assert!(
                    worst <= 1.0,
                    "bf16_state {bf16_state} {rounding:?}: {worst} x tolerance"
                );
            }
        }
    }
}

/// Updates smaller than half an ulp: nearest rounding never moves a bf16 parameter, stochastic
/// rounding moves it by the right amount on average.
#[test]
fn stochastic_rounding_keeps_small_updates() {
    let src = "rule sgd(lr = 1e-4) { param theta\n input g\n theta = theta - lr * g }";
    let p = Arc::new(optc::compile_rule(src).unwrap());
    let n = 20_000;
    let mut results = Vec::new();
    for rounding in [Rounding::Nearest, Rounding::Stochastic { seed: 9 }] {
        let options = MixedOptions {
            rounding,
            ..Default::default()
        };
        let mut o = MixedOptimizer::<bf16>::new(
            Arc::clone(&p),
            vec![vec![TensorSpec::new("w", &[n])]],
            options,
        )
        .unwrap()
        .with_backend(Backend::Cranelift { threads: 2 })
        .unwrap();
        let mut w = vec![bf16::ONE; n];
        let g = vec![1.0f32; n];
        for _ in 0..100 {
            o.step_with(
                &mut [vec![&mut w[..]]],
                &Inputs::default().tensor("g", vec![&g]),
            )
            .unwrap();
        }
        results.push(w.iter().map(|x| f64::from(x.to_f32())).sum::<f64>() / n as f64);
    }
    assert_eq!(results[0], 1.0, "nearest rounding stalls");
    assert!(
        (results[1] - 0.99).abs() < 1e-3,
        "stochastic: mean {}",
        results[1]
    );
}

/// A failed step changes neither the params, nor the masters, nor the state.
#[test]
fn mixed_errors_change_nothing() {
    let options = MixedOptions {
        master_weights: true,
        bf16_state: true,
        rounding: Rounding::Stochastic { seed: 1 },
    };
    let (mut o, mut params) =
        mixed::<bf16>("adam", options, Backend::Cranelift { threads: 1 }, 3, &[]);
    let before = params.clone();
    let masters = o.master_weights().unwrap().to_vec();
    let m = o.state("m").unwrap();
    let g = grads(0);
    let mut lend: Vec<&mut [bf16]> = params.iter_mut().map(Vec::as_mut_slice).collect();
    let short: Vec<&[f32]> = vec![&g[0], &g[1]];
    assert!(matches!(
        o.step_with(
            std::slice::from_mut(&mut lend),
            &Inputs::default().tensor("g", short)
        ),
        Err(Error::Length { .. })
    ));
    assert!(matches!(
        o.step_with::<f32>(std::slice::from_mut(&mut lend), &Inputs::default()),
        Err(Error::MissingInput { .. })
    ));
    assert_eq!(params, before);
    assert_eq!(o.master_weights().unwrap(), &masters[..]);
    assert_eq!(o.state("m").unwrap(), m);
    assert_eq!(o.inner().steps(), 3);
}

/// bf16 gradients are accepted as inputs, and the result equals widening them by hand.
#[test]
fn sixteen_bit_inputs() {
    let p = Arc::new(optc::stdlib_rule("lion").unwrap());
    let run = |bf16_grads: bool| {
        let mut o =
            MixedOptimizer::<bf16>::new(Arc::clone(&p), specs(), MixedOptions::default()).unwrap();
        let mut params: Vec<Vec<bf16>> = init()
            .iter()
            .map(|t| t.iter().map(|&x| bf16::from_f32(x)).collect())
            .collect();
        for s in 0..3 {
            let g: Vec<Vec<bf16>> = grads(s)
                .iter()
                .map(|t| t.iter().map(|&x| bf16::from_f32(x)).collect())
                .collect();
            let wide: Vec<Vec<f32>> = widen(&g);
            let mut lend: Vec<&mut [bf16]> = params.iter_mut().map(Vec::as_mut_slice).collect();
            if bf16_grads {
                o.step_with(
                    std::slice::from_mut(&mut lend),
                    &Inputs::default().tensor("g", g.iter().map(Vec::as_slice).collect()),
                )
                .unwrap();
            } else {
                o.step_with(
                    std::slice::from_mut(&mut lend),
                    &Inputs::default().tensor("g", wide.iter().map(Vec::as_slice).collect()),
                )
                .unwrap();
            }
        }
        params
    };
    assert_eq!(run(true), run(false));
}

/// A mixed-precision run resumed from a checkpoint (master weights, bf16 state, stochastic
/// rounding) is bit-identical to one that never stopped; other settings are refused unchanged.
#[test]
fn mixed_checkpoints_resume_exactly() {
    for master_weights in [false, true] {
        let options = MixedOptions {
            master_weights,
            bf16_state: true,
            rounding: Rounding::Stochastic { seed: 5 },
        };
        let sets = [("lr", 0.01)];
        let (_, want) = mixed::<bf16>("adan", options, Backend::Cranelift { threads: 2 }, 6, &sets);
        let (first, mut params) =
            mixed::<bf16>("adan", options, Backend::Cranelift { threads: 2 }, 3, &sets);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mixed.safetensors");
        first.save_checkpoint(&path).unwrap();

        let p = Arc::new(optc::stdlib_rule("adan").unwrap());
        let mut resumed = MixedOptimizer::<bf16>::new(Arc::clone(&p), specs(), options)
            .unwrap()
            .with_backend(Backend::Cranelift { threads: 1 })
            .unwrap();
        resumed.load_checkpoint(&path).unwrap();
        assert_eq!(resumed.inner().steps(), 3);
        assert_eq!(resumed.inner().hyper("lr"), Some(0.01));
        for s in 3..6 {
            let g = grads(s);
            let mut lend: Vec<&mut [bf16]> = params.iter_mut().map(Vec::as_mut_slice).collect();
            resumed
                .step_with(
                    std::slice::from_mut(&mut lend),
                    &Inputs::default().tensor("g", g.iter().map(Vec::as_slice).collect()),
                )
                .unwrap();
        }
        assert_eq!(params, want, "master weights {master_weights}");

        // Other settings, or a plain f32 checkpoint: refused, nothing changed.
        let other = MixedOptions {
            rounding: Rounding::Stochastic { seed: 6 },
            ..options
        };
        let mut o = MixedOptimizer::<bf16>::new(Arc::clone(&p), specs(), other).unwrap();
        let e = o.load_checkpoint(&path).unwrap_err();
        assert!(e.to_string().contains("settings"), "{e}");
        assert_eq!(o.inner().steps(), 0);
        let mut h = MixedOptimizer::<f16>::new(Arc::clone(&p), specs(), options).unwrap();
        assert!(h.load_checkpoint(&path).is_err());
        let plain = Optimizer::<f32>::lending(p, specs()).unwrap();
        let e = o
            .load_checkpoint_bytes(&plain.checkpoint_bytes().unwrap())
            .unwrap_err();
        assert!(e.to_string().contains("optc.mixed"), "{e}");
    }
}

/// `optc bench --storage`: the bytes it counts follow each buffer's storage, the conversions are
/// fused unless asked otherwise, and 16-bit-only options without 16-bit params are refused.
#[test]
fn bench_measures_sixteen_bit_storage() {
    let bench = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_optc"))
            .args([
                "bench",
                "adam",
                "--elems",
                "1000000",
                "--steps",
                "1",
                "--threads",
                "1",
            ])
            .args(args)
            .output()
            .expect("optc runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // adam, one pass: param, g, m, v read; param, m, v written.
    for (args, mb, how) in [
        (&[][..], "28.0 MB", None),
        (
            &["--storage", "bf16"][..],
            "24.0 MB",
            Some("fused into the kernels"),
        ),
        (
            &["--storage", "f16", "--state-storage", "bf16"][..],
            "16.0 MB",
            Some("fused into the kernels"),
        ),
        (
            &["--storage", "bf16", "--separate-passes"][..],
            "24.0 MB",
            Some("separate passes"),
        ),
        // Master weights: one more f32 buffer read and written; the bf16 param only written.
        (
            &[
                "--storage",
                "bf16",
                "--master-weights",
                "--rounding",
                "stochastic",
            ][..],
            "30.0 MB",
            Some("fused into the kernels"),
        ),
    ] {
        let (code, stdout, stderr) = bench(args);
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        let must = stdout
            .lines()
            .find(|l| l.contains("bytes the rule must move"))
            .unwrap_or_else(|| panic!("{args:?}: {stdout}"));
        assert!(must.contains(mb), "{args:?}: {must}");
        if let Some(how) = how {
            assert!(stdout.contains(how), "{args:?}: {stdout}");
        }
    }
    let (code, _, stderr) = bench(&["--state-storage", "bf16"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("need 16-bit params"), "{stderr}");
}

/// On the fused path a step skipped for a non-finite gradient stores nothing: the lent 16-bit
/// params, the bf16 state the engine holds and the masters stay as they were.
#[test]
fn fused_skipped_steps_change_nothing() {
    for master_weights in [false, true] {
        let options = MixedOptions {
            master_weights,
            bf16_state: true,
            rounding: Rounding::Stochastic { seed: 9 },
        };
        let (o, mut params) =
            mixed::<bf16>("adam", options, Backend::Cranelift { threads: 2 }, 2, &[]);
        let mut o = o.with_non_finite(optc::runtime::NonFinite::Skip).unwrap();
        assert!(o.is_fused());
        let (before, m, masters) = (params.clone(), o.state("m"), o.master_weights());
        let mut g = grads(5);
        g[1][3] = f32::NAN;
        let mut lend: Vec<&mut [bf16]> = params.iter_mut().map(Vec::as_mut_slice).collect();
        o.step_with(
            std::slice::from_mut(&mut lend),
            &Inputs::default().tensor("g", g.iter().map(Vec::as_slice).collect()),
        )
        .unwrap();
        assert_eq!(o.inner().skipped_steps(), 1);
        assert_eq!(o.inner().steps(), 2);
        assert_eq!(params, before);
        assert_eq!(o.state("m"), m);
        assert_eq!(o.master_weights(), masters);
    }
}
