//! The sample axis (`input G: samples`): every engine gives the interpreter's bits for any
//! number of samples, sizes and thread counts; DP-SGD's noise is the seed's normal draws;
//! reductions over one sample and over the samples against a transcription; bad shapes are
//! errors that change nothing; a resumed run equals a straight one; the bytes a step moves.
//! (Parity with Opacus and AdAdaGrad's tests: tests/parity.rs.)

use optc::compiler::ir::{Node, Program};
use optc::compiler::random::{self, Dist};
use optc::runtime::{Backend, Error, Inputs, Optimizer};
use std::sync::Arc;

mod common;
#[cfg(feature = "cuda")]
use common::cuda_backend;
use common::{fill, have_cc};

fn stdlib(name: &str) -> Program {
    optc::stdlib_rule(name).expect("stdlib rule")
}

/// Per-sample reductions of every kind: over one sample (all tensors, per tensor, max), over
/// the samples (sum, mean, max), scalar outputs, a per-sample scalar under `if`.
const REDUCTIONS: &str = r#"
rule r(lr = 0.1, c = 0.9) {
    param x
    input G: samples
    input h
    let gbar = sample_mean(G)
    let n = norm(G)
    let nt = tensor_norm(G)
    let m = max_abs(G)
    let w = if n > c { c / n } else { 1 }
    out top = sample_max(n)
    out spread = sample_sum(sum((G - gbar) ^ 2)) / samples
    out per_tensor = sum(sample_sum(nt))
    x = x - lr * (sample_sum(w * G) / samples + sample_max(m) * h) - 0.01 * sample_max(G * nt)
}
"#;

/// Everything a run leaves: params, every state and output buffer, scalar outputs.
type Run = Vec<(String, Vec<Vec<f32>>)>;

/// `batches[k]` samples at step `k`; per-sample gradients spread around the clip threshold.
fn run(
    p: &Program,
    sizes: &[usize],
    backend: Backend,
    batches: &[usize],
    hypers: &[(&str, f64)],
) -> Run {
    let params = vec![sizes
        .iter()
        .enumerate()
        .map(|(j, &n)| fill(j as u64 + 3, n))
        .collect()];
    let mut opt = Optimizer::new(Arc::new(p.clone()), params)
        .expect("bind")
        .with_backend(backend)
        .expect("backend");
    for &(h, v) in hypers {
        opt.set_hyper(h, v).expect("hyper");
    }
    for (step, &b) in batches.iter().enumerate() {
        let g: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(j, &n)| {
                fill(1000 * step as u64 + j as u64, n * b)
                    .into_iter()
                    .enumerate()
                    .map(|(e, v)| v * (0.2 + (e / n.max(1)) as f32 * 0.7))
                    .collect()
            })
            .collect();
        let h: Vec<Vec<f32>> = sizes.iter().map(|&n| fill(77 + step as u64, n)).collect();
        let mut inp = Inputs::default().tensor("G", g.iter().map(|v| &v[..]).collect());
        if p.info.buffer("h").is_some() {
            inp = inp.tensor("h", h.iter().map(|v| &v[..]).collect());
        }
        opt.step(&inp).expect("step");
        assert_eq!(opt.samples(), b);
    }
    let info = &opt.program().info;
    let mut out: Run = info
        .buffers
        .iter()
        .filter(|b| b.role != optc::compiler::ir::BufRole::Input)
        .map(|b| {
            (
                b.name.clone(),
                opt.buffer(&b.name).expect("buffer").to_vec(),
            )
        })
        .collect();
    for &i in &info.scalar_outs {
        let name = &info.scalar_states[i as usize];
        out.push((
            name.clone(),
            vec![vec![opt.scalar_out(name).unwrap() as f32]],
        ));
    }
    out
}

fn same_bits(a: &Run, b: &Run, what: &str) {
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

/// Awkward sizes: empty, one, vector width ± 1, a task (16K) + 1.
const SIZES: &[usize] = &[0, 1, 3, 4, 5, 63, 65, 16_385];
/// 1, 7 and 64 samples, changing every step.
const BATCHES: &[usize] = &[7, 1, 64, 3, 1, 5];

/// A rule to run: its name in messages, the program and the hyperparameters it runs with.
type Case = (&'static str, Program, Vec<(&'static str, f64)>);

fn rules() -> Vec<Case> {
    vec![
        (
            "dp_sgd",
            stdlib("dp_sgd"),
            vec![("lr", 0.05), ("momentum", 0.9), ("noise_multiplier", 1.1)],
        ),
        (
            "dp_sgd per layer",
            stdlib("dp_sgd"),
            vec![("per_layer", 1.0), ("nesterov", 1.0), ("momentum", 0.5)],
        ),
        ("adadagrad", stdlib("adadagrad"), vec![("test_type", 2.0)]),
        (
            "reductions",
            optc::compile_rule(REDUCTIONS).expect("compiles"),
            vec![],
        ),
    ]
}

#[test]
fn cranelift_gives_the_interpreters_bits_for_any_samples_sizes_and_threads() {
    for (name, p, hypers) in rules() {
        let reference = run(&p, SIZES, Backend::Interpreter, BATCHES, &hypers);
        for threads in [1, 2, 3] {
            let jit = run(&p, SIZES, Backend::Cranelift { threads }, BATCHES, &hypers);
            same_bits(
                &reference,
                &jit,
                &format!("{name}: Cranelift, {threads} threads"),
            );
        }
        let many: Vec<usize> = (0..200).map(|i| i % 7).collect();
        let a = run(&p, &many, Backend::Interpreter, &[4, 9], &hypers);
        let b = run(
            &p,
            &many,
            Backend::Cranelift { threads: 2 },
            &[4, 9],
            &hypers,
        );
        same_bits(&a, &b, &format!("{name}: many small tensors"));
    }
}

#[test]
fn the_native_engine_gives_the_same_bits() {
    if !have_cc() {
        return;
    }
    for (name, p, hypers) in rules() {
        let reference = run(
            &p,
            SIZES,
            Backend::Cranelift { threads: 2 },
            BATCHES,
            &hypers,
        );
        let native = run(&p, SIZES, Backend::Native { threads: 3 }, BATCHES, &hypers);
        same_bits(&reference, &native, &format!("{name}: native"));
    }
}

#[cfg(feature = "cuda")]
#[test]
fn the_cuda_kernels_give_the_same_bits() {
    let Some(backend) = cuda_backend() else {
        return;
    };
    let sizes: &[usize] = &[0, 1, 5, 257, 1030];
    for (name, p, hypers) in rules() {
        let reference = run(&p, sizes, Backend::Interpreter, &[7, 1, 12, 3], &hypers);
        let gpu = run(&p, sizes, backend, &[7, 1, 12, 3], &hypers);
        same_bits(&reference, &gpu, &format!("{name}: {backend:?}"));
    }
}

/// The stream of the rule's only per-element draw.
fn draw_stream(p: &Program) -> u32 {
    let streams: Vec<u32> = (0..p.graph.len())
        .filter_map(
            |i| match p.graph.node(optc::compiler::ir::NodeId(i as u32)) {
                Node::Random { stream, .. } => Some(stream),
                _ => None,
            },
        )
        .collect();
    assert!(!streams.is_empty() && streams.iter().all(|&s| s == streams[0]));
    streams[0]
}

#[test]
fn dp_sgd_noise_is_the_seeds_normal_draws_whatever_the_samples() {
    let p = stdlib("dp_sgd");
    let stream = draw_stream(&p);
    let sizes = [3usize, 130, 7];
    let (lr, c, sigma) = (0.5, 0.8, 1.3);
    for b in [1usize, 7, 64] {
        let mk = |noise: f64| {
            let mut opt = Optimizer::<f64>::new(
                Arc::new(p.clone()),
                vec![sizes
                    .iter()
                    .map(|&n| fill(n as u64, n).iter().map(|&v| f64::from(v)).collect())
                    .collect()],
            )
            .unwrap();
            opt.set_seed(4242);
            opt.set_hyper("lr", lr).unwrap();
            opt.set_hyper("max_grad_norm", c).unwrap();
            opt.set_hyper("noise_multiplier", noise).unwrap();
            let g: Vec<Vec<f64>> = sizes
                .iter()
                .map(|&n| {
                    fill(9 + n as u64, n * b)
                        .iter()
                        .map(|&v| f64::from(v))
                        .collect()
                })
                .collect();
            for _ in 0..2 {
                opt.step(&Inputs::default().tensor("G", g.iter().map(|v| &v[..]).collect()))
                    .unwrap();
            }
            opt.params(0).to_vec()
        };
        let (noisy, clean) = (mk(sigma), mk(0.0));
        // After two steps: the sum of both steps' noise, -lr * sigma * C / b * (z1 + z2).
        let mut e = 0u64;
        for (x, y) in noisy.iter().zip(&clean) {
            for (a, b0) in x.iter().zip(y) {
                let z: f64 = (1..=2)
                    .map(|t| f64::from(random::draw(Dist::Normal, 4242, t, stream, e)))
                    .sum();
                let want = b0 - lr * sigma * c / b as f64 * z;
                assert!(
                    (a - want).abs() <= 1e-12 * (1.0 + want.abs()),
                    "{b} samples, element {e}: {a} against {want}"
                );
                e += 1;
            }
        }
    }
}

/// The rule `REDUCTIONS` in f64 by hand, one step from x with per-sample gradients g[i][t][e].
fn reductions_by_hand(
    x: &[Vec<f64>],
    g: &[Vec<Vec<f64>>],
    h: &[Vec<f64>],
    lr: f64,
    c: f64,
) -> (Vec<Vec<f64>>, [f64; 3]) {
    let b = g.len();
    let nt: Vec<Vec<f64>> = g
        .iter()
        .map(|s| {
            s.iter()
                .map(|t| t.iter().map(|v| v * v).sum::<f64>().sqrt())
                .collect()
        })
        .collect();
    let n: Vec<f64> = nt
        .iter()
        .map(|t| t.iter().map(|v| v * v).sum::<f64>().sqrt())
        .collect();
    let m: Vec<f64> = g
        .iter()
        .map(|s| s.iter().flatten().fold(0.0f64, |a, v| a.max(v.abs())))
        .collect();
    let w: Vec<f64> = n.iter().map(|&n| if n > c { c / n } else { 1.0 }).collect();
    let mmax = m.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v));
    let mut out = Vec::new();
    let mut spread = 0.0;
    for (t, xt) in x.iter().enumerate() {
        let mut xn = Vec::new();
        for (e, &xe) in xt.iter().enumerate() {
            let gbar = (0..b).map(|i| g[i][t][e]).sum::<f64>() / b as f64;
            spread += (0..b).map(|i| (g[i][t][e] - gbar).powi(2)).sum::<f64>();
            let clipped = (0..b).map(|i| w[i] * g[i][t][e]).sum::<f64>() / b as f64;
            let gm = (0..b)
                .map(|i| g[i][t][e] * nt[i][t])
                .fold(f64::NEG_INFINITY, f64::max);
            xn.push(xe - lr * (clipped + mmax * h[t][e]) - 0.01 * gm);
        }
        out.push(xn);
    }
    let top = n.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v));
    let per_tensor: f64 = nt.iter().flatten().sum();
    (out, [top, spread / b as f64, per_tensor])
}

#[test]
fn reductions_over_a_sample_and_over_the_samples_match_a_transcription() {
    let p = optc::compile_rule(REDUCTIONS).expect("compiles");
    let sizes = [4usize, 1, 9];
    for b in [1usize, 2, 7, 64] {
        let x0: Vec<Vec<f64>> = sizes
            .iter()
            .map(|&n| fill(n as u64, n).iter().map(|&v| f64::from(v)).collect())
            .collect();
        let g: Vec<Vec<Vec<f64>>> = (0..b)
            .map(|i| {
                sizes
                    .iter()
                    .map(|&n| {
                        fill(31 * i as u64 + n as u64, n)
                            .iter()
                            .map(|&v| f64::from(v) * (0.3 + 0.2 * i as f64))
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let h: Vec<Vec<f64>> = sizes
            .iter()
            .map(|&n| {
                fill(5 + n as u64, n)
                    .iter()
                    .map(|&v| f64::from(v))
                    .collect()
            })
            .collect();
        let (want, outs) = reductions_by_hand(&x0, &g, &h, 0.1, 0.9);
        let mut opt = Optimizer::<f64>::new(Arc::new(p.clone()), vec![x0.clone()]).unwrap();
        // The host's layout: [samples, ...shape] per tensor.
        let flat: Vec<Vec<f64>> = (0..sizes.len())
            .map(|t| (0..b).flat_map(|i| g[i][t].clone()).collect())
            .collect();
        opt.step(
            &Inputs::default()
                .tensor("G", flat.iter().map(|v| &v[..]).collect())
                .tensor("h", h.iter().map(|v| &v[..]).collect()),
        )
        .unwrap();
        for (ours, theirs) in opt.params(0).iter().flatten().zip(want.iter().flatten()) {
            assert!(
                (ours - theirs).abs() <= 1e-12 * (1.0 + theirs.abs()),
                "{b} samples: {ours} against {theirs}"
            );
        }
        for (name, v) in ["top", "spread", "per_tensor"].iter().zip(outs) {
            let ours = opt.scalar_out(name).unwrap();
            assert!(
                (ours - v).abs() <= 1e-12 * (1.0 + v.abs()),
                "{b} samples: out {name} = {ours}, by hand {v}"
            );
        }
    }
}

#[test]
fn bad_sample_inputs_are_errors_that_change_nothing() {
    let p = stdlib("dp_sgd");
    let sizes = [3usize, 2];
    let mut opt = Optimizer::<f32>::new(
        Arc::new(p),
        vec![sizes.iter().map(|&n| fill(n as u64, n)).collect()],
    )
    .unwrap();
    let good: Vec<Vec<f32>> = sizes.iter().map(|&n| fill(1, 4 * n)).collect();
    opt.step(&Inputs::default().tensor("G", good.iter().map(|v| &v[..]).collect()))
        .unwrap();
    let before = (
        opt.params(0).to_vec(),
        opt.buffer("buf").unwrap().to_vec(),
        opt.steps(),
        opt.samples(),
    );
    let cases: Vec<(Vec<usize>, &str)> = vec![
        (vec![3 * 4 + 1, 2 * 4], "not one or more samples"),
        (vec![3 * 4, 2 * 5], "holds 4 samples, but"),
        (vec![0, 0], "not one or more samples"),
        (vec![3 * 257, 2 * 257], "1 to 256 samples, got 257"),
    ];
    for (lens, why) in cases {
        let g: Vec<Vec<f32>> = lens.iter().map(|&n| vec![0.5; n]).collect();
        let e = opt
            .step(&Inputs::default().tensor("G", g.iter().map(|v| &v[..]).collect()))
            .unwrap_err();
        assert!(matches!(e, Error::Samples(_)), "{e}");
        assert!(e.to_string().contains(why), "{e} (expected: {why})");
        let after = (
            opt.params(0).to_vec(),
            opt.buffer("buf").unwrap().to_vec(),
            opt.steps(),
            opt.samples(),
        );
        assert_eq!(before, after, "a failed step changed something: {e}");
    }
    let one: Vec<Vec<f32>> = vec![vec![0.5; 3 * 4]];
    let e = opt
        .step(&Inputs::default().tensor("G", one.iter().map(|v| &v[..]).collect()))
        .unwrap_err();
    assert!(e.to_string().contains("number of tensors"), "{e}");
    // 16-bit storage does not take a sample axis.
    let e = optc::runtime::mixed::MixedOptimizer::<optc::runtime::mixed::bf16>::new(
        Arc::new(stdlib("dp_sgd")),
        vec![vec![optc::runtime::TensorSpec::new("w", &[3])]],
        Default::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("sample axis"), "{e}");
}

#[test]
fn a_resumed_run_equals_a_straight_one_across_sample_counts() {
    let p = Arc::new(stdlib("dp_sgd"));
    let sizes = [5usize, 17];
    let batches = [3usize, 8, 1, 8, 5, 2];
    let grads = |k: usize, b: usize| -> Vec<Vec<f32>> {
        sizes.iter().map(|&n| fill(50 + k as u64, n * b)).collect()
    };
    let init: Vec<Vec<f32>> = sizes.iter().map(|&n| fill(n as u64, n)).collect();
    let new = || {
        let mut o = Optimizer::<f32>::new(Arc::clone(&p), vec![init.clone()]).unwrap();
        o.set_hyper("momentum", 0.9).unwrap();
        o
    };
    let step = |o: &mut Optimizer<f32>, k: usize| {
        let g = grads(k, batches[k]);
        o.step(&Inputs::default().tensor("G", g.iter().map(|v| &v[..]).collect()))
            .unwrap();
    };
    let mut straight = new();
    for k in 0..batches.len() {
        step(&mut straight, k);
    }
    let mut first = new();
    for k in 0..3 {
        step(&mut first, k);
    }
    let bytes = first.checkpoint_bytes().unwrap();
    let mut resumed =
        Optimizer::<f32>::new(Arc::clone(&p), vec![first.params(0).to_vec()]).unwrap();
    resumed.load_checkpoint_bytes(&bytes).unwrap();
    for k in 3..batches.len() {
        step(&mut resumed, k);
    }
    assert_eq!(straight.params(0), resumed.params(0));
    assert_eq!(straight.buffer("buf"), resumed.buffer("buf"));
}

/// Bytes a step's kernels move per element of the param space: each kernel reads its loads and
/// writes its stores once per element.
fn bytes_per_element(p: &Program) -> usize {
    let v = &p.variants[1];
    v.stages
        .iter()
        .flat_map(|s| &s.phases)
        .flat_map(|ph| &ph.kernels)
        .map(|k| {
            let loads: std::collections::BTreeSet<_> = k
                .loads
                .iter()
                .map(|&l| match p.graph.node(l) {
                    Node::Load { buf, .. } => buf,
                    _ => unreachable!(),
                })
                .collect();
            4 * (loads.len() + k.stores.len())
        })
        .sum()
}

#[test]
fn dp_sgd_reads_the_samples_twice_and_writes_nothing_per_sample() {
    let base = Arc::new(stdlib("dp_sgd"));
    for b in [1usize, 7, 64] {
        // The program a step with b samples runs at the default values (no momentum).
        let mut opt = Optimizer::<f32>::new(Arc::clone(&base), vec![vec![vec![0.5; 4]]]).unwrap();
        let g = vec![0.25f32; 4 * b];
        for _ in 0..2 {
            opt.step(&Inputs::default().tensor("G", vec![&g[..]]))
                .unwrap();
        }
        // The host asks in the rule's own names: the input G, not its copies.
        let needs = opt.stage_needs(0).unwrap();
        let g_id = opt.program().info.buffer("G").unwrap();
        assert_eq!(
            needs.tensors.iter().copied().collect::<Vec<_>>(),
            [g_id],
            "{b} samples"
        );
        let p = opt.active_program();
        let kernels: usize = p.variants[1].stages.iter().map(|s| s.phases.len()).sum();
        assert_eq!(kernels, 2, "{b} samples: passes");
        // Phase 0 reads the b blocks (the norms); phase 1 reads them again with theta and
        // writes theta. Computed unfused (clip into a b x N buffer, sum it, add the noise,
        // step), a step moves (4b + 5) x 4 bytes per element.
        let fused = bytes_per_element(p);
        assert_eq!(fused, 4 * (2 * b + 2), "{b} samples");
        let unfused = 4 * (4 * b + 5);
        println!("dp_sgd, {b} samples: {fused} bytes per element fused, {unfused} unfused");
        assert!(fused < unfused);
    }
}

/// The number of samples across engines, stages, prebuilt programs and failed calls.
#[test]
fn sample_counts_survive_engine_switches_stages_and_failures() {
    let sizes = [3usize, 2];
    let init = || vec![sizes.iter().map(|&n| fill(n as u64, n)).collect::<Vec<_>>()];
    let g = |b: usize| -> Vec<Vec<f32>> { sizes.iter().map(|&n| fill(9, n * b)).collect() };
    let step = |o: &mut Optimizer<f32>, b: usize| {
        let gs = g(b);
        o.step(&Inputs::default().tensor("G", gs.iter().map(|v| &v[..]).collect()))
    };
    // A switch of engine after several counts were compiled.
    let p = Arc::new(stdlib("dp_sgd"));
    let mut o = Optimizer::<f32>::new(Arc::clone(&p), init()).unwrap();
    step(&mut o, 2).unwrap();
    let mut o = o.with_backend(Backend::Cranelift { threads: 1 }).unwrap();
    step(&mut o, 1).unwrap();
    step(&mut o, 2).unwrap();
    let mut reference = Optimizer::<f32>::new(Arc::clone(&p), init()).unwrap();
    for b in [2, 1, 2] {
        step(&mut reference, b).unwrap();
    }
    assert_eq!(o.params(0), reference.params(0));
    // A program already written out for 3 samples.
    let three = Arc::new(optc::compiler::passes::for_samples(&p, 3).unwrap());
    let mut o = Optimizer::<f32>::new(three, init()).unwrap();
    assert_eq!(o.samples(), 3);
    step(&mut o, 3).unwrap();
    step(&mut o, 1).unwrap();
    // A rule whose sample input comes in its second stage, run stage by stage.
    let src = "rule r(lr = 0.1) { param x\n input h\n input G: samples\n \
               stage a { x = x - lr * h }\n stage b { x = x - lr * sample_mean(G) / samples } }";
    let p2 = Arc::new(optc::compile_rule(src).unwrap());
    let mut o = Optimizer::<f32>::new(p2, init()).unwrap();
    let h: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.5; n]).collect();
    let hs = || Inputs::default().tensor("h", h.iter().map(|v| &v[..]).collect());
    let g3 = g(3);
    let gs = || Inputs::default().tensor("G", g3.iter().map(|v| &v[..]).collect());
    o.run_stage(0, &hs()).unwrap();
    let e = o.run_stage(1, &gs()).unwrap_err();
    assert!(e.to_string().contains("with_samples"), "{e}");
    o.run_stage(1, &gs().with_samples(1)).unwrap_err();
    // The count given to the first stage.
    let mut o2 = Optimizer::<f32>::new(Arc::new(optc::compile_rule(src).unwrap()), init()).unwrap();
    o2.run_stage(0, &hs().with_samples(3)).unwrap();
    o2.run_stage(1, &gs()).unwrap();
    assert_eq!(o2.samples(), 3);
    let before: Vec<Vec<f32>> = o2.params(0).to_vec();
    // A failed call leaves the count as it was.
    let e = o2.step(&gs()).unwrap_err(); // no `h`
    assert!(matches!(e, Error::MissingInput { .. }), "{e}");
    assert_eq!(o2.samples(), 3);
    assert_eq!(o2.params(0), &before[..]);
    let g5 = g(5);
    let e = o2
        .step(&Inputs::default().tensor("G", g5.iter().map(|v| &v[..]).collect()))
        .unwrap_err();
    assert!(matches!(e, Error::MissingInput { .. }), "{e}");
    assert_eq!(o2.samples(), 3, "the failed call switched the count");
}
