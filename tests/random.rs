//! Random numbers in rules (`uniform()`, `normal()`, `random` declarations): the keying of the
//! bits, the distributions, and the same bits from every engine for any thread count, chunking
//! or grouping of tensors; regeneration across stages; resumed runs; memory.

use optc::compiler::ir::{BufRole, Program};
use optc::compiler::random::{self, Dist};
use optc::compiler::storage::philox4x32;
use optc::runtime::{Backend, Inputs, Optimizer};
use std::sync::Arc;

mod common;
#[cfg(feature = "cuda")]
use common::cuda_backend;
use common::{fill, have_cc};

/// Draws of every shape: declared (per element, per step, with a seed from a scalar input),
/// written in statements (per element, per step, in a reduction), read in two stages.
const DRAWS: &str = r#"
/// Draws of every kind.
rule draws(scale = 1.5) {
    param x
    input g
    input s: scalar
    random z = normal()
    random q: scalar = uniform()
    random w = uniform(s)
    state m = 0
    stage a {
        out za = z
        out wa = w
        out gn = g * normal()
        m = m + q * z
    }
    stage b {
        out zb = z
        let mean_zg = sum(normal() * g) / numel(g)
        out ub = uniform()
        x = x + scale * z - mean_zg + uniform() * 0.5
    }
}
"#;

fn program(src: &str) -> Program {
    optc::compile_rule(src).expect("rule compiles")
}

/// Everything a run leaves: every buffer but the inputs, and the params.
type Run<T> = Vec<(String, Vec<Vec<T>>)>;

fn run<T: optc::compiler::ops::Float + Default>(
    p: &Program,
    sizes: &[usize],
    backend: Backend,
    steps: usize,
    seed: Option<u64>,
) -> Run<T> {
    let info = &p.info;
    let conv = |v: Vec<f32>| v.into_iter().map(|x| T::from_f64(f64::from(x))).collect();
    let params: Vec<Vec<Vec<T>>> = (0..info.spaces.len())
        .map(|s| {
            sizes
                .iter()
                .enumerate()
                .map(|(j, &n)| conv(fill(100 * s as u64 + j as u64, n)))
                .collect()
        })
        .collect();
    let mut opt = Optimizer::new(Arc::new(p.clone()), params)
        .expect("bind")
        .with_backend(backend)
        .expect("backend");
    if let Some(s) = seed {
        opt.set_seed(s);
    }
    for step in 0..steps {
        let data: Vec<(String, Vec<Vec<T>>)> = info
            .buffers
            .iter()
            .enumerate()
            .filter(|(_, b)| b.role == BufRole::Input)
            .map(|(bi, b)| {
                let d = sizes
                    .iter()
                    .enumerate()
                    .map(|(j, &n)| conv(fill((step * 31 + bi * 7 + j) as u64 + 5, n)))
                    .collect();
                (b.name.clone(), d)
            })
            .collect();
        let mut inputs = Inputs::default();
        for (n, d) in &data {
            inputs = inputs.tensor(n, d.iter().map(|v| v.as_slice()).collect());
        }
        for s in &info.scalar_inputs {
            inputs = inputs.scalar(s, (11 + step) as f64);
        }
        opt.step(&inputs).expect("step");
    }
    let mut out: Run<T> = info
        .buffers
        .iter()
        .filter(|b| b.role != BufRole::Input)
        .map(|b| {
            (
                b.name.clone(),
                opt.buffer(&b.name).expect("buffer").to_vec(),
            )
        })
        .collect();
    out.push(("scalar state".into(), vec![vec![]]));
    out
}

fn same_bits(a: &Run<f32>, b: &Run<f32>, what: &str) {
    assert_eq!(a.len(), b.len());
    for ((n, x), (_, y)) in a.iter().zip(b) {
        for (j, (u, v)) in x.iter().zip(y).enumerate() {
            assert_eq!(u.len(), v.len());
            for (e, (p, q)) in u.iter().zip(v).enumerate() {
                assert_eq!(
                    p.to_bits(),
                    q.to_bits(),
                    "{what}: `{n}` tensor {j} element {e}: {p:e} against {q:e}"
                );
            }
        }
    }
}

/// Awkward sizes: empty, one, vector width ± 1, the draw cache's block (64) ± 1, a task (16K) ± 1.
const SIZES: &[usize] = &[0, 1, 3, 4, 5, 63, 64, 65, 127, 16_383, 16_385, 1000];

#[test]
fn the_bits_are_philox_keyed_by_seed_step_stream_and_element() {
    // Random123's known answers for Philox-4x32-10.
    assert_eq!(
        philox4x32([0; 4], [0; 2]),
        [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
    );
    assert_eq!(
        philox4x32([u32::MAX; 4], [u32::MAX; 2]),
        [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
    );
    assert_eq!(
        philox4x32(
            [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
            [0xa409_3822, 0x299f_31d0]
        ),
        [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
    );
    // A draw's bits: output E % 4 at counter (E / 4 low, E / 4 high, t, stream), key = seed.
    let (seed, step, stream) = (0x0123_4567_89ab_cdef_u64, 7u64, random::named_stream("z"));
    for e in [0u64, 1, 2, 3, 4, 5, 1 << 33 | 6] {
        let b = e / 4;
        let words = philox4x32(
            [b as u32, (b >> 32) as u32, step as u32, stream],
            [seed as u32, (seed >> 32) as u32],
        );
        let bits = words[(e % 4) as usize];
        assert_eq!(
            random::draw(Dist::Uniform, seed, step, stream, e).to_bits(),
            random::uniform(bits).to_bits()
        );
        assert_eq!(
            random::draw(Dist::Normal, seed, step, stream, e).to_bits(),
            random::normal(bits).to_bits()
        );
    }
    // The transforms' known answers.
    assert_eq!(random::uniform(0), 2f32.powi(-24));
    assert_eq!(random::uniform(0x8000_0000), 0.5 + 2f32.powi(-24));
    assert_eq!(random::uniform(u32::MAX), 1.0 - 2f32.powi(-24));
    let n = random::normal(0x8000_0000); // u = 1/2 + 2^-24: z = sqrt(2 pi) 2^-24
    assert!((f64::from(n) - (2.0 * std::f64::consts::PI).sqrt() * 2f64.powi(-24)).abs() < 1e-12);
    // Named streams depend on the name only; written draws on stage and place.
    assert_eq!(random::named_stream("z"), 0x7f0c_53ad);
    assert_eq!(random::inline_stream(2, 5), 0x8002_0005);
}

/// The standard normal CDF.
fn phi(x: f64) -> f64 {
    0.5 * libm_erfc(-x / std::f64::consts::SQRT_2)
}

/// erfc by its continued-fraction-free series (Numerical Recipes' erfcc, |error| < 1.2e-7).
fn libm_erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// Mean, variance and the Kolmogorov–Smirnov statistic of `v` against `cdf`.
fn moments_and_ks(v: &mut [f32], cdf: impl Fn(f64) -> f64) -> (f64, f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let var = v
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / (n - 1.0);
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let mut d = 0f64;
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j < v.len() && v[j] == v[i] {
            j += 1;
        }
        let f = cdf(f64::from(v[i]));
        d = d
            .max((f - i as f64 / n).abs())
            .max((j as f64 / n - f).abs());
        i = j;
    }
    (mean, var, d)
}

#[test]
fn the_distributions_hold_on_2_to_the_24_draws() {
    let n = 1usize << 24;
    let stream = random::inline_stream(0, 0);
    let mut u: Vec<f32> = (0..n as u64)
        .map(|e| random::draw(Dist::Uniform, 42, 3, stream, e))
        .collect();
    let mut z: Vec<f32> = (0..n as u64)
        .map(|e| random::draw(Dist::Normal, 42, 3, stream, e))
        .collect();
    assert!(u.iter().all(|&x| x > 0.0 && x < 1.0));
    let tails = |t: f32| z.iter().filter(|x| x.abs() > t).count() as f64 / n as f64;
    let (t2, t3, t4) = (tails(2.0), tails(3.0), tails(4.0));
    let sd = |p: f64| (p * (1.0 - p) / n as f64).sqrt();
    for (got, t) in [(t2, 2.0), (t3, 3.0), (t4, 4.0)] {
        let want = 2.0 * (1.0 - phi(t));
        assert!(
            (got - want).abs() < 5.0 * sd(want) + 2e-7,
            "P(|z| > {t}) = {got:e}, expected {want:e}"
        );
    }
    // The KS statistic's 99.9% critical value is 1.95 / sqrt(n).
    let crit = 1.95 / (n as f64).sqrt();
    let (m, v, d) = moments_and_ks(&mut u, |x| x.clamp(0.0, 1.0));
    assert!(
        (m - 0.5).abs() < 5.0 * (1.0 / 12.0 / n as f64).sqrt(),
        "uniform mean {m}"
    );
    assert!((v - 1.0 / 12.0).abs() < 1e-4, "uniform variance {v}");
    assert!(d < crit, "uniform KS {d} >= {crit}");
    let (m, v, d) = moments_and_ks(&mut z, phi);
    assert!(m.abs() < 5.0 / (n as f64).sqrt(), "normal mean {m}");
    assert!(
        (v - 1.0).abs() < 5.0 * (2.0 / n as f64).sqrt(),
        "normal variance {v}"
    );
    // The erfc above is good to 1.2e-7, far below the critical value (4.8e-4).
    assert!(d < crit, "normal KS {d} >= {crit}");
    println!(
        "2^24 draws: normal KS {d:.2e} (critical {crit:.2e}), tails {t2:.4e} {t3:.4e} {t4:.4e}"
    );
}

#[test]
fn cranelift_gives_the_interpreters_bits_for_any_thread_count_and_sizes() {
    let p = program(DRAWS);
    let reference = run::<f32>(&p, SIZES, Backend::Interpreter, 3, None);
    for threads in [1, 2, 3] {
        let jit = run::<f32>(&p, SIZES, Backend::Cranelift { threads }, 3, None);
        same_bits(&reference, &jit, &format!("cranelift, {threads} threads"));
    }
    // Many small tensors in one launch.
    let many: Vec<usize> = (0..300).map(|i| i % 9).collect();
    let a = run::<f32>(&p, &many, Backend::Interpreter, 2, Some(9));
    let b = run::<f32>(&p, &many, Backend::Cranelift { threads: 2 }, 2, Some(9));
    same_bits(&a, &b, "many small tensors");
}

#[test]
fn f64_programs_widen_the_same_draws() {
    let p = program(DRAWS);
    let a = run::<f64>(&p, SIZES, Backend::Interpreter, 2, None);
    let b = run::<f64>(&p, SIZES, Backend::Cranelift { threads: 2 }, 2, None);
    for ((n, x), (_, y)) in a.iter().zip(&b) {
        if n == "x" {
            // `x` subtracts a sum, accumulated in another order by the two engines.
            for (u, v) in x.concat().iter().zip(&y.concat()) {
                assert!(
                    (u - v).abs() <= 1e-12 * u.abs().max(1.0),
                    "f64 `x`: {u} against {v}"
                );
            }
        } else {
            assert_eq!(x, y, "f64 `{n}`");
        }
    }
    let f = run::<f32>(&p, SIZES, Backend::Interpreter, 2, None);
    // The drawn outputs are the f32 draws, exactly.
    for name in ["za", "zb", "wa", "ub"] {
        let x = &a.iter().find(|r| r.0 == name).expect("output").1;
        let y = &f.iter().find(|r| r.0 == name).expect("output").1;
        for (u, v) in x.iter().zip(y) {
            let v: Vec<f64> = v.iter().map(|&e| f64::from(e)).collect();
            assert_eq!(u, &v, "`{name}`");
        }
    }
}

#[test]
fn a_declared_draw_is_the_same_in_every_stage_and_independent_of_the_tensor_grouping() {
    let p = program(DRAWS);
    let r = run::<f32>(
        &p,
        &[10, 7, 300],
        Backend::Cranelift { threads: 2 },
        2,
        Some(5),
    );
    let get = |n: &str| r.iter().find(|x| x.0 == n).expect("buffer").1.clone();
    assert_eq!(get("za"), get("zb"));
    // The element index runs over all tensors: one tensor of 317 elements gives the same values.
    let one = run::<f32>(&p, &[317], Backend::Cranelift { threads: 2 }, 2, Some(5));
    let za1 = &one.iter().find(|x| x.0 == "za").expect("za").1[0];
    let flat: Vec<f32> = get("za").concat();
    assert_eq!(&flat, za1);
    // Regenerated from the key alone: step 2, the stream of `z`, seed 5.
    let want: Vec<f32> = (0..317u64)
        .map(|e| random::draw(Dist::Normal, 5, 2, random::named_stream("z"), e))
        .collect();
    assert_eq!(za1, &want);
    // `w` is keyed by the scalar input `s` (12 at step 2), not by the optimizer's seed.
    let wa1 = &one.iter().find(|x| x.0 == "wa").expect("wa").1[0];
    let want: Vec<f32> = (0..317u64)
        .map(|e| random::draw(Dist::Uniform, 12, 2, random::named_stream("w"), e))
        .collect();
    assert_eq!(wa1, &want);
    // Another seed, other values.
    let other = run::<f32>(&p, &[317], Backend::Cranelift { threads: 2 }, 2, Some(6));
    assert_ne!(&other.iter().find(|x| x.0 == "za").expect("za").1[0], za1);
}

/// SPSA / MeZO: perturb by +eps z, by -2 eps z, restore and step along z, z regenerated in every
/// stage from the seed.
const SPSA: &str = r#"
rule spsa(lr = 0.01, eps = 0.001) {
    param theta
    input loss_plus: scalar, loss_minus: scalar
    random z = normal()
    stage plus { theta = theta + eps * z }
    stage minus { theta = theta - 2 * eps * z }
    stage update {
        let g = (loss_plus - loss_minus) / (2 * eps)
        theta = theta + eps * z - lr * g * z
    }
}
"#;

#[test]
fn spsa_regenerates_z_and_allocates_nothing_for_it() {
    let p = program(SPSA);
    // The rule's memory: the param only; no buffer holds z.
    assert_eq!(p.info.buffers.len(), 1);
    let n = 100_003;
    let theta0: Vec<f32> = fill(3, n);
    for backend in [Backend::Interpreter, Backend::Cranelift { threads: 2 }] {
        let mut opt = Optimizer::new(Arc::new(p.clone()), vec![vec![theta0.clone()]])
            .expect("bind")
            .with_backend(backend)
            .expect("backend");
        opt.set_seed(77);
        opt.run_stage(0, &Inputs::default()).expect("plus");
        let plus = opt.params(0)[0].clone();
        opt.run_stage(1, &Inputs::default().scalar("loss_plus", 2.0))
            .expect("minus");
        let minus = opt.params(0)[0].clone();
        opt.run_stage(2, &Inputs::default().scalar("loss_minus", 1.0))
            .expect("update");
        let after = opt.params(0)[0].clone();
        let stream = random::named_stream("z");
        let g = (2.0f64 - 1.0) / (2.0 * 0.001);
        for e in 0..n {
            let z = random::draw(Dist::Normal, 77, 1, stream, e as u64);
            let eps = 0.001f32;
            let p1 = theta0[e] + eps * z;
            assert_eq!(plus[e], p1, "{backend:?} plus {e}");
            let p2 = p1 - (2.0 * 0.001f64) as f32 * z;
            assert_eq!(minus[e], p2, "{backend:?} minus {e}");
            let p3 = p2 + eps * z - (0.01 * g) as f32 * z;
            assert_eq!(after[e], p3, "{backend:?} update {e}");
        }
    }
}

#[test]
fn the_native_engine_gives_the_same_bits() {
    if !have_cc() {
        return;
    }
    let p = program(DRAWS);
    let reference = run::<f32>(&p, SIZES, Backend::Interpreter, 3, None);
    for threads in [1, 3] {
        let native = run::<f32>(&p, SIZES, Backend::Native { threads }, 3, None);
        same_bits(&reference, &native, &format!("native, {threads} threads"));
    }
    let many: Vec<usize> = (0..300).map(|i| i % 9).collect();
    let a = run::<f32>(&p, &many, Backend::Cranelift { threads: 2 }, 2, Some(9));
    let b = run::<f32>(&p, &many, Backend::Native { threads: 2 }, 2, Some(9));
    same_bits(&a, &b, "native, many small tensors");
    let a = run::<f64>(&p, SIZES, Backend::Cranelift { threads: 2 }, 2, None);
    let b = run::<f64>(&p, SIZES, Backend::Native { threads: 2 }, 2, None);
    for ((n, x), (_, y)) in a.iter().zip(&b) {
        assert_eq!(x, y, "native f64 `{n}`");
    }
}

#[cfg(feature = "cuda")]
#[test]
fn the_cuda_kernels_give_the_same_bits() {
    let Some(backend) = cuda_backend() else {
        return;
    };
    let p = program(DRAWS);
    let reference = run::<f32>(&p, SIZES, Backend::Interpreter, 3, None);
    let gpu = run::<f32>(&p, SIZES, backend, 3, None);
    same_bits(&reference, &gpu, &format!("{backend:?}"));
    let many: Vec<usize> = (0..300).map(|i| i % 9).collect();
    let a = run::<f32>(&p, &many, Backend::Interpreter, 2, Some(9));
    let b = run::<f32>(&p, &many, backend, 2, Some(9));
    same_bits(&a, &b, &format!("{backend:?}, many small tensors"));
    let a = run::<f64>(&p, SIZES, Backend::Interpreter, 2, None);
    let b = run::<f64>(&p, SIZES, backend, 2, None);
    for ((n, x), (_, y)) in a.iter().zip(&b) {
        if n != "x" {
            assert_eq!(x, y, "{backend:?} f64 `{n}`");
        }
    }
}

/// Steps `opt` with the inputs `run` gives step `step`.
fn step_draws(opt: &mut Optimizer<f32>, n: usize, step: usize) {
    let g = fill(step as u64 + 40, n);
    opt.step(
        &Inputs::default()
            .tensor("g", vec![&g[..]])
            .scalar("s", step as f64),
    )
    .expect("step");
}

#[test]
fn a_resumed_run_draws_what_an_uninterrupted_one_does() {
    let p = Arc::new(program(DRAWS));
    let n = 1001;
    for backend in [Backend::Interpreter, Backend::Cranelift { threads: 2 }] {
        let new = || {
            Optimizer::new(Arc::clone(&p), vec![vec![fill(1, n)]])
                .expect("bind")
                .with_backend(backend)
                .expect("backend")
        };
        let mut whole = new();
        whole.set_seed(123);
        for s in 0..5 {
            step_draws(&mut whole, n, s);
        }
        let mut first = new();
        first.set_seed(123);
        for s in 0..2 {
            step_draws(&mut first, n, s);
        }
        let bytes = first.checkpoint_bytes().expect("checkpoint");
        // A fresh optimizer with the default seed takes the checkpoint's (params are the
        // host's: they come from the first run).
        let mut resumed = Optimizer::new(Arc::clone(&p), vec![first.params(0).to_vec()])
            .expect("bind")
            .with_backend(backend)
            .expect("backend");
        assert_eq!(resumed.seed(), optc::runtime::DEFAULT_SEED);
        resumed.load_checkpoint_bytes(&bytes).expect("load");
        assert_eq!(resumed.seed(), 123);
        for s in 2..5 {
            step_draws(&mut resumed, n, s);
        }
        assert_eq!(whole.params(0), resumed.params(0), "{backend:?}");
        for b in ["m", "za", "gn", "ub"] {
            assert_eq!(whole.buffer(b), resumed.buffer(b), "{backend:?} `{b}`");
        }
    }
}

#[test]
fn optc_run_takes_a_seed_and_saves_it_in_the_checkpoint() {
    use safetensors::tensor::{Dtype, TensorView};
    let dir = std::env::temp_dir().join(format!("optc-random-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let rule = dir.join("spsa.opt");
    std::fs::write(&rule, SPSA).expect("rule");
    let theta: Vec<u8> = fill(2, 10).iter().flat_map(|x| x.to_le_bytes()).collect();
    let params = dir.join("params.safetensors");
    let view = TensorView::new(Dtype::F32, vec![10], &theta).expect("view");
    safetensors::serialize_to_file(vec![("theta", view)], None, &params).expect("params");
    let losses = |v: f32| -> Vec<u8> { [v, v].iter().flat_map(|x| x.to_le_bytes()).collect() };
    let (lp, lm) = (losses(2.0), losses(1.0));
    let lfile = dir.join("loss.safetensors");
    safetensors::serialize_to_file(
        vec![
            (
                "loss_plus",
                TensorView::new(Dtype::F32, vec![2], &lp).expect("v"),
            ),
            (
                "loss_minus",
                TensorView::new(Dtype::F32, vec![2], &lm).expect("v"),
            ),
        ],
        None,
        &lfile,
    )
    .expect("losses");
    let run = |seed: &str, out: &str| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_optc"));
        cmd.arg("run").arg(&rule).arg("--params").arg(&params);
        cmd.arg("--input")
            .arg(format!("loss_plus={}", lfile.display()));
        cmd.arg("--input")
            .arg(format!("loss_minus={}", lfile.display()));
        cmd.arg("--out").arg(dir.join(out)).arg("-q");
        cmd.arg("--state-out").arg(dir.join(format!("{out}.ckpt")));
        if !seed.is_empty() {
            cmd.args(["--seed", seed]);
        }
        let o = cmd.output().expect("optc runs");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read(dir.join(out)).expect("out")
    };
    let a = run("5", "a.safetensors");
    let b = run("5", "b.safetensors");
    let c = run("6", "c.safetensors");
    let d = run("", "d.safetensors");
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_ne!(a, d);
    // The same two steps through the API with seed 5.
    let mut opt = Optimizer::new(Arc::new(program(SPSA)), vec![vec![fill(2, 10)]]).expect("bind");
    opt.set_seed(5);
    for _ in 0..2 {
        let i = Inputs::default()
            .scalar("loss_plus", 2.0)
            .scalar("loss_minus", 1.0);
        opt.step(&i).expect("step");
    }
    let want: Vec<u8> = opt.params(0)[0]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let st = safetensors::SafeTensors::deserialize(&a).expect("out file");
    assert_eq!(st.tensor("theta").expect("theta").data(), &want[..]);
    let ck = std::fs::read(dir.join("a.safetensors.ckpt")).expect("checkpoint");
    let mut resumed =
        Optimizer::new(Arc::new(program(SPSA)), vec![vec![fill(2, 10)]]).expect("bind");
    resumed.load_checkpoint_bytes(&ck).expect("load");
    assert_eq!(resumed.seed(), 5);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_scalar_input_defaults_to_a_draw_the_host_may_override() {
    // N-HARPG draws q ~ U(0, 1) itself unless the host gives it.
    let p = optc::stdlib_rule("n_harpg").expect("n_harpg");
    let n = 50;
    let (theta, g, hv) = (fill(1, n), fill(2, n), fill(3, n));
    let probe = |q: Option<f64>| {
        let mut opt = Optimizer::new(Arc::new(p.clone()), vec![vec![theta.clone()]])
            .expect("bind")
            .with_backend(Backend::Cranelift { threads: 2 })
            .expect("backend");
        opt.set_seed(21);
        let i = Inputs::default()
            .tensor("g", vec![&g[..]])
            .tensor("hv", vec![&hv[..]]);
        // Step 1, then the probe of step 2 (at step 1 theta_prev = theta: the probe is theta).
        opt.step(&i).expect("step 1");
        let probe = match q {
            Some(q) => Inputs::default().scalar("q", q),
            None => Inputs::default(),
        };
        assert!(opt.stage_needs(0).expect("probe").scalars.is_empty());
        opt.run_stage(0, &probe).expect("probe");
        let theta1 = opt.params(0)[0].clone();
        let prev = opt.buffer("theta_prev").expect("theta_prev")[0].clone();
        let hat = opt.buffer("theta_hat").expect("theta_hat")[0].clone();
        (theta1, prev, hat)
    };
    let (t1, prev, hat) = probe(None);
    let q = random::draw(Dist::Uniform, 21, 2, random::inline_stream(0, 0), 0);
    for e in 0..n {
        let want = (f64::from(q) as f32) * t1[e] + (1.0 - f64::from(q)) as f32 * prev[e];
        assert_eq!(hat[e], want, "element {e}");
    }
    let (_, _, given) = probe(Some(0.25));
    let (t1, prev, _) = probe(Some(0.25));
    for e in 0..n {
        assert_eq!(given[e], 0.25 * t1[e] + 0.75 * prev[e]);
    }
}
