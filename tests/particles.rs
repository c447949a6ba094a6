//! The particle axis (`state X: particles`): CBO against CBXpy for 1, 3 and 50 particles; the
//! noise is each particle's own stream of the seed's draws; every engine gives the interpreter's
//! bits; bad inputs are errors that change nothing; a resumed run equals a straight one.

use optc::compiler::ir::{Node, NodeId, Program};
use optc::compiler::passes::{for_particles, unroll::copy_name};
use optc::compiler::random::{self, Dist};
use optc::runtime::{Backend, Error, Inputs, Optimizer};
use std::sync::Arc;

mod common;
#[cfg(feature = "cuda")]
use common::cuda_backend;
use common::{fill, have_cc};

fn cbo(k: usize) -> Program {
    for_particles(&optc::stdlib_rule("cbo").expect("cbo"), k).expect("written out")
}

fn json(path: &str) -> serde_json::Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    serde_json::from_str(&std::fs::read_to_string(p).expect("fixture")).expect("json")
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .flat_map(|x| match x.as_array() {
            Some(_) => floats(x),
            None => vec![x.as_f64().expect("number")],
        })
        .collect()
}

/// A flat particle split into the tensors of `sizes`.
fn split(flat: &[f64], sizes: &[usize]) -> Vec<Vec<f64>> {
    let mut at = 0;
    sizes
        .iter()
        .map(|&n| {
            at += n;
            flat[at - n..at].to_vec()
        })
        .collect()
}

#[test]
fn cbo_matches_cbxpy_for_1_3_and_50_particles() {
    for (case, k) in [("cbo_k1", 1usize), ("cbo_k3", 3), ("cbo_k50", 50)] {
        let fx = json(&format!("tests/parity/cbo/{case}.json"));
        let sizes: Vec<usize> = fx["shapes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s[0].as_u64().unwrap() as usize)
            .collect();
        let d: usize = sizes.iter().sum();
        let p = Arc::new(cbo(k));
        let mut opt =
            Optimizer::<f64>::new(p, vec![sizes.iter().map(|&n| vec![0.0; n]).collect()]).unwrap();
        for (h, v) in fx["hyper"].as_object().unwrap() {
            opt.set_hyper(h, v.as_f64().unwrap()).unwrap();
        }
        let x0 = floats(&fx["x0"]);
        for j in 0..k {
            let t = split(&x0[j * d..(j + 1) * d], &sizes);
            let refs: Vec<&[f64]> = t.iter().map(|v| &v[..]).collect();
            opt.set_state(&copy_name("X", j), &refs).unwrap();
        }
        let (f, xs, cs) = (floats(&fx["f"]), floats(&fx["x"]), floats(&fx["consensus"]));
        let steps = f.len() / k;
        assert_eq!(steps, 20);
        let mut worst = 0.0f64;
        for t in 0..steps {
            opt.step(&Inputs::default().per_particle("f", &f[t * k..(t + 1) * k]))
                .unwrap();
            let check = |ours: f64, theirs: f64, what: String, worst: &mut f64| {
                let err = (ours - theirs).abs() / (1e-12 + 1e-9 * theirs.abs());
                *worst = worst.max(err);
                assert!(
                    err <= 1.0,
                    "{case} step {}: {what}: ours {ours}, CBXpy {theirs}",
                    t + 1
                );
            };
            let c: Vec<f64> = opt.params(0).iter().flatten().copied().collect();
            for (e, (&a, &b)) in c.iter().zip(&cs[t * d..(t + 1) * d]).enumerate() {
                check(a, b, format!("consensus[{e}]"), &mut worst);
            }
            for j in 0..k {
                let ours: Vec<f64> = opt
                    .buffer(&copy_name("X", j))
                    .unwrap()
                    .iter()
                    .flatten()
                    .copied()
                    .collect();
                let theirs = &xs[(t * k + j) * d..(t * k + j + 1) * d];
                for (e, (&a, &b)) in ours.iter().zip(theirs).enumerate() {
                    check(a, b, format!("particle {j}[{e}]"), &mut worst);
                }
            }
        }
        println!("{case}: worst error / tolerance {worst:.3}");
    }
}

/// The stream of the rule's per-particle draw before the particle's (the axis form's).
fn particle_draw_stream() -> u32 {
    let p = optc::stdlib_rule("cbo").unwrap();
    let axis = &p.axis_form.as_ref().expect("an axis form").0;
    (0..axis.graph.len())
        .find_map(|i| match axis.graph.node(NodeId(i as u32)) {
            Node::ParticleDraw { stream, .. } => Some(stream),
            _ => None,
        })
        .expect("a per-particle draw")
}

/// One step of CBO by hand in f64, with optc's draws: the particles after it and the consensus.
fn cbo_by_hand(
    xs: &[Vec<f64>],
    f: &[f64],
    (lamda, sigma, dt, alpha): (f64, f64, f64, f64),
    anisotropic: bool,
    seed: u64,
    t: u64,
) -> (Vec<Vec<f64>>, Vec<f64>) {
    let stream = particle_draw_stream();
    let a: Vec<f64> = f.iter().map(|v| -alpha * v).collect();
    let amax = a.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
    let w: Vec<f64> = a.iter().map(|v| (v - amax).exp()).collect();
    let n = xs[0].len();
    // The sum over particles in particle order, as the rule's.
    let ws: f64 = w.iter().skip(1).fold(w[0], |s, v| s + v);
    let c: Vec<f64> = (0..n)
        .map(|e| {
            let s = (1..xs.len()).fold(w[0] * xs[0][e], |s, j| s + w[j] * xs[j][e]);
            s / ws
        })
        .collect();
    let out = xs
        .iter()
        .enumerate()
        .map(|(j, x)| {
            let d: Vec<f64> = x.iter().zip(&c).map(|(a, b)| a - b).collect();
            let norm = d.iter().map(|v| v * v).sum::<f64>().sqrt();
            let pj = random::particle_stream(stream, j as u32);
            (0..n)
                .map(|e| {
                    let z = f64::from(random::draw(Dist::Normal, seed, t, pj, e as u64));
                    let scale = if anisotropic { d[e] } else { norm };
                    x[e] - lamda * dt * d[e] + sigma * dt.sqrt() * scale * z
                })
                .collect()
        })
        .collect();
    (out, c)
}

#[test]
fn the_noise_is_each_particles_own_stream() {
    let sizes = [4usize, 1, 6];
    let n: usize = sizes.iter().sum();
    let hyper = (0.8, 1.7, 0.05, 2.0);
    for anisotropic in [false, true] {
        for k in [1usize, 3, 50] {
            let mut opt = Optimizer::<f64>::new(
                Arc::new(cbo(k)),
                vec![sizes.iter().map(|&m| vec![0.0; m]).collect()],
            )
            .unwrap();
            opt.set_seed(77);
            for (h, v) in [
                ("lamda", hyper.0),
                ("sigma", hyper.1),
                ("dt", hyper.2),
                ("alpha", hyper.3),
            ] {
                opt.set_hyper(h, v).unwrap();
            }
            opt.set_hyper("anisotropic", f64::from(u8::from(anisotropic)))
                .unwrap();
            let mut xs: Vec<Vec<f64>> = (0..k)
                .map(|j| {
                    fill(j as u64 + 1, n)
                        .iter()
                        .map(|&v| 3.0 * f64::from(v))
                        .collect()
                })
                .collect();
            for (j, x) in xs.iter().enumerate() {
                let t = split(x, &sizes);
                opt.set_state(
                    &copy_name("X", j),
                    &t.iter().map(|v| &v[..]).collect::<Vec<_>>(),
                )
                .unwrap();
            }
            for t in 1..=3u64 {
                let f: Vec<f64> = xs.iter().map(|x| x.iter().map(|v| v * v).sum()).collect();
                opt.step(&Inputs::default().per_particle("f", &f)).unwrap();
                let (want, c) = cbo_by_hand(&xs, &f, hyper, anisotropic, 77, t);
                for (j, want_j) in want.iter().enumerate() {
                    let ours: Vec<f64> = opt
                        .buffer(&copy_name("X", j))
                        .unwrap()
                        .iter()
                        .flatten()
                        .copied()
                        .collect();
                    for (e, (a, b)) in ours.iter().zip(want_j).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-12 * (1.0 + b.abs()),
                            "{k} particles, anisotropic {anisotropic}, step {t}, particle {j}[{e}]: {a} against {b}"
                        );
                    }
                }
                let ours_c: Vec<f64> = opt.params(0).iter().flatten().copied().collect();
                for (a, b) in ours_c.iter().zip(&c) {
                    assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()));
                }
                xs = want;
            }
        }
    }
}

/// Everything a run leaves: the param and every particle.
fn run(k: usize, sizes: &[usize], backend: Backend, anisotropic: bool) -> Vec<Vec<Vec<f32>>> {
    let mut opt = Optimizer::<f32>::new(
        Arc::new(cbo(k)),
        vec![sizes.iter().map(|&m| vec![0.0; m]).collect()],
    )
    .unwrap()
    .with_backend(backend)
    .unwrap();
    opt.set_hyper("anisotropic", f64::from(u8::from(anisotropic)))
        .unwrap();
    opt.set_hyper("sigma", 0.9).unwrap();
    for j in 0..k {
        let t: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &m)| fill((j * 10 + i) as u64, m))
            .collect();
        opt.set_state(
            &copy_name("X", j),
            &t.iter().map(|v| &v[..]).collect::<Vec<_>>(),
        )
        .unwrap();
    }
    for t in 0..3 {
        let f: Vec<f64> = (0..k).map(|j| ((j * 7 + t) % 5) as f64 * 0.3).collect();
        opt.step(&Inputs::default().per_particle("f", &f)).unwrap();
    }
    let mut out = vec![opt.params(0).to_vec()];
    for j in 0..k {
        out.push(opt.buffer(&copy_name("X", j)).unwrap().to_vec());
    }
    out
}

fn same_bits(a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>], what: &str) {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        for (j, (u, v)) in x.iter().zip(y).enumerate() {
            for (e, (p, q)) in u.iter().zip(v).enumerate() {
                assert_eq!(
                    p.to_bits(),
                    q.to_bits(),
                    "{what}: buffer {i} tensor {j} [{e}]: {p:e} against {q:e}"
                );
            }
        }
    }
}

const SIZES: &[usize] = &[0, 1, 3, 5, 65, 16_385];

#[test]
fn every_cpu_engine_gives_the_interpreters_bits() {
    for (k, sizes) in [(1usize, SIZES), (3, SIZES), (50, &[1usize, 5, 70][..])] {
        for anisotropic in [false, true] {
            let reference = run(k, sizes, Backend::Interpreter, anisotropic);
            for threads in [1, 2, 3] {
                let jit = run(k, sizes, Backend::Cranelift { threads }, anisotropic);
                same_bits(
                    &reference,
                    &jit,
                    &format!("{k} particles, Cranelift {threads}"),
                );
            }
            if have_cc() {
                let native = run(k, sizes, Backend::Native { threads: 2 }, anisotropic);
                same_bits(&reference, &native, &format!("{k} particles, native"));
            }
        }
    }
}

#[cfg(feature = "cuda")]
#[test]
fn the_cuda_kernels_give_the_same_bits() {
    let Some(backend) = cuda_backend() else {
        return;
    };
    for k in [1usize, 3, 50] {
        let sizes = [0usize, 1, 5, 300];
        let reference = run(k, &sizes, Backend::Interpreter, false);
        let gpu = run(k, &sizes, backend, false);
        same_bits(&reference, &gpu, &format!("{k} particles, {backend:?}"));
    }
}

#[test]
fn bad_particles_are_errors_that_change_nothing() {
    assert!(for_particles(&optc::stdlib_rule("cbo").unwrap(), 0)
        .unwrap_err()
        .contains("1 to 256 particles"));
    assert!(for_particles(&optc::stdlib_rule("sgd").unwrap(), 3)
        .unwrap_err()
        .contains("no particles"));
    let mut opt =
        Optimizer::<f32>::new(Arc::new(cbo(3)), vec![vec![vec![0.0; 4], vec![0.0; 2]]]).unwrap();
    let x = [vec![0.5f32; 4], vec![0.25; 2]];
    opt.set_state("X[2]", &[&x[0], &x[1]]).unwrap();
    let before = (
        opt.buffer("X[2]").unwrap().to_vec(),
        opt.params(0).to_vec(),
        opt.steps(),
    );
    // A particle's objective value missing.
    let e = opt
        .step(&Inputs::default().scalar("f", 1.0).scalar("f[1]", 2.0))
        .unwrap_err();
    assert!(
        matches!(e, Error::MissingInput { ref name, .. } if name == "f[2]"),
        "{e}"
    );
    // Particles of the wrong shape, and a buffer that is no state.
    let e = opt.set_state("X[1]", &[&x[0]]).unwrap_err();
    assert!(e.to_string().contains("number of tensors"), "{e}");
    let e = opt.set_state("X[1]", &[&x[1], &x[0]]).unwrap_err();
    assert!(e.to_string().contains("tensor"), "{e}");
    let e = opt.set_state("x", &[&x[0], &x[1]]).unwrap_err();
    assert!(e.to_string().contains("no per-element state"), "{e}");
    let after = (
        opt.buffer("X[2]").unwrap().to_vec(),
        opt.params(0).to_vec(),
        opt.steps(),
    );
    assert_eq!(before, after);
}

#[test]
fn a_resumed_run_equals_a_straight_one() {
    let p = Arc::new(cbo(5));
    let sizes = [3usize, 8];
    let f = |t: usize| -> Vec<f64> { (0..5).map(|j| ((j + 2 * t) % 4) as f64).collect() };
    let new = || {
        let mut o = Optimizer::<f32>::new(
            Arc::clone(&p),
            vec![sizes.iter().map(|&m| vec![0.0; m]).collect()],
        )
        .unwrap();
        for j in 0..5 {
            let t: Vec<Vec<f32>> = sizes.iter().map(|&m| fill(j as u64 + 40, m)).collect();
            o.set_state(
                &copy_name("X", j),
                &t.iter().map(|v| &v[..]).collect::<Vec<_>>(),
            )
            .unwrap();
        }
        o
    };
    let mut straight = new();
    for t in 0..6 {
        straight
            .step(&Inputs::default().per_particle("f", &f(t)))
            .unwrap();
    }
    let mut first = new();
    for t in 0..3 {
        first
            .step(&Inputs::default().per_particle("f", &f(t)))
            .unwrap();
    }
    let bytes = first.checkpoint_bytes().unwrap();
    let mut resumed =
        Optimizer::<f32>::new(Arc::clone(&p), vec![first.params(0).to_vec()]).unwrap();
    resumed.load_checkpoint_bytes(&bytes).unwrap();
    for t in 3..6 {
        resumed
            .step(&Inputs::default().per_particle("f", &f(t)))
            .unwrap();
    }
    assert_eq!(straight.params(0), resumed.params(0));
    for j in 0..5 {
        let n = copy_name("X", j);
        assert_eq!(straight.buffer(&n), resumed.buffer(&n), "{n}");
    }
}

/// Just One Byte: each machine perturbs with `spsa` under its own seed; `spsa_job` regenerates
/// every machine's z from its seed and applies the one-byte projected gradients.
#[test]
fn spsa_job_applies_every_machines_z_from_its_seed() {
    let sizes = [5usize, 1, 130];
    let spsa = Arc::new(optc::stdlib_rule("spsa").unwrap());
    let eps = 1e-3;
    let theta0: Vec<Vec<f64>> = sizes
        .iter()
        .map(|&n| fill(n as u64, n).iter().map(|&v| f64::from(v)).collect())
        .collect();
    // Two machines, seeds below 2^24: the z each perturbed with at step 1.
    let seeds = [12_345u64, 777];
    let zs: Vec<Vec<f64>> = seeds
        .iter()
        .map(|&s| {
            let mut m = Optimizer::<f64>::new(Arc::clone(&spsa), vec![theta0.clone()]).unwrap();
            m.set_seed(s);
            m.set_hyper("eps", eps).unwrap();
            m.run_stage(0, &Inputs::default()).unwrap();
            m.params(0)
                .iter()
                .flatten()
                .zip(theta0.iter().flatten())
                .map(|(a, b)| (a - b) / eps)
                .collect()
        })
        .collect();
    let p = [0.37f64, -2.9];
    let p_hat: Vec<f64> = p.iter().map(|&v| optc::stdlib::one_byte(v)).collect();
    let job = Arc::new(for_particles(&optc::stdlib_rule("spsa_job").unwrap(), 2).unwrap());
    let lr = 0.01;
    let mut other = Optimizer::<f64>::new(job, vec![theta0.clone()]).unwrap();
    other.set_hyper("lr", lr).unwrap();
    let seeds_f: Vec<f64> = seeds.iter().map(|&s| s as f64).collect();
    other
        .step(
            &Inputs::default()
                .per_particle("seed", &seeds_f)
                .per_particle("p_hat", &p_hat),
        )
        .unwrap();
    for (e, (ours, t0)) in other
        .params(0)
        .iter()
        .flatten()
        .zip(theta0.iter().flatten())
        .enumerate()
    {
        let want = t0 - lr / 2f64.sqrt() * (p_hat[0] * zs[0][e] + p_hat[1] * zs[1][e]);
        assert!(
            (ours - want).abs() <= 1e-9 * (1.0 + want.abs()),
            "element {e}: {ours} against {want}"
        );
    }
    // The machines' z differ, and match the seed's draws of `spsa`'s stream.
    assert!(zs[0].iter().zip(&zs[1]).any(|(a, b)| a != b));
    let stream = random::named_stream("z");
    for (e, z) in zs[1].iter().enumerate() {
        let d = f64::from(random::draw(Dist::Normal, 777, 1, stream, e as u64));
        assert!((z - d).abs() <= 1e-9, "element {e}: {z} against {d}");
    }
}
