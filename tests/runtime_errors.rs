//! Error paths of the runtime and of the `optc` command.
//!
//! Runtime: every rejected call must return the right [`Error`] variant and leave the optimizer
//! exactly as it was: params, per-element state, scalar state, step counter and hyperparameters
//! compare bit for bit before and after, and a following valid call gives bit-identical results
//! to the same call on a twin optimizer that never saw the bad call.
//!
//! CLI: user errors exit with code 1 and a message on stderr, never with a panic.

use optc::compiler::ir::BufRole;
use optc::compiler::ops::Float;
use optc::runtime::{Error, Inputs, Optimizer};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

// ---------------------------------------------------------------- runtime helpers

/// Everything an error must not touch, as bits.
#[derive(Debug, PartialEq)]
struct Snapshot {
    buffers: Vec<(String, Vec<Vec<u64>>)>,
    scalar_states: Vec<(String, u64)>,
    hypers: Vec<(String, u64)>,
    steps: u64,
}

fn snapshot<T: Float + Default>(opt: &Optimizer<T>) -> Snapshot {
    let info = &opt.program().info;
    let buffers = info
        .buffers
        .iter()
        .filter(|b| matches!(b.role, BufRole::Param | BufRole::State))
        .map(|b| {
            let data = opt
                .buffer(&b.name)
                .expect("buffer")
                .iter()
                .map(|t| t.iter().map(|x| x.to_f64().to_bits()).collect())
                .collect();
            (b.name.clone(), data)
        })
        .collect();
    let scalar_states = info
        .scalar_states
        .iter()
        .map(|s| {
            (
                s.clone(),
                opt.scalar_state(s).expect("scalar state").to_bits(),
            )
        })
        .collect();
    let hypers = info
        .hypers
        .iter()
        .map(|h| (h.name.clone(), opt.hyper(&h.name).expect("hyper").to_bits()))
        .collect();
    Snapshot {
        buffers,
        scalar_states,
        hypers,
        steps: opt.steps(),
    }
}

/// Runs `bad` on a fresh optimizer from `make`, checks the error with `is_expected`, checks that
/// nothing changed, then runs `next` on it and on an untouched twin and compares the two.
fn assert_rejected_without_trace<T: Float + Default>(
    make: impl Fn() -> Optimizer<T>,
    bad: impl FnOnce(&mut Optimizer<T>) -> Result<(), Error>,
    is_expected: impl FnOnce(&Error) -> bool,
    next: impl Fn(&mut Optimizer<T>),
) {
    let mut opt = make();
    let before = snapshot(&opt);
    let err = bad(&mut opt).expect_err("the call must be rejected");
    assert!(is_expected(&err), "unexpected error: {err:?}");
    assert!(!err.to_string().is_empty());
    assert_eq!(
        snapshot(&opt),
        before,
        "the rejected call ({err}) changed the optimizer"
    );
    let mut twin = make();
    next(&mut opt);
    next(&mut twin);
    assert_eq!(
        snapshot(&opt),
        snapshot(&twin),
        "after the rejected call ({err}), a valid call gives a different result"
    );
}

const SIZES: [usize; 3] = [3, 0, 5];

fn data(seed: u32, sizes: &[usize]) -> Vec<Vec<f32>> {
    sizes
        .iter()
        .enumerate()
        .map(|(j, &n)| {
            (0..n)
                .map(|i| ((seed * 7 + j as u32 * 3 + i as u32) as f32 * 0.37).sin())
                .collect()
        })
        .collect()
}

fn slices(ts: &[Vec<f32>]) -> Vec<&[f32]> {
    ts.iter().map(|t| t.as_slice()).collect()
}

/// Adan with weight decay and clipping, after two steps (so that every state is non-trivial).
fn adan() -> Optimizer<f32> {
    let program = optc::stdlib_rule("adan").expect("adan");
    let mut opt = Optimizer::new(Arc::new(program), vec![data(0, &SIZES)]).unwrap();
    opt.set_hyper("lr", 0.01).unwrap();
    opt.set_hyper("weight_decay", 0.02).unwrap();
    opt.set_hyper("max_grad_norm", 1.0).unwrap();
    for s in 1..=2 {
        opt.step(&Inputs::default().tensor("g", slices(&data(s, &SIZES))))
            .unwrap();
    }
    opt
}

fn adan_next(opt: &mut Optimizer<f32>) {
    let g = data(3, &SIZES);
    opt.step(&Inputs::default().tensor("g", slices(&g)))
        .unwrap();
    opt.step(&Inputs::default().tensor("g", slices(&g)))
        .unwrap();
}

// ---------------------------------------------------------------- hyperparameters

#[test]
fn unknown_hyperparameter() {
    for name in ["learning_rate", "", "LR", "t"] {
        assert_rejected_without_trace(
            adan,
            |o| o.set_hyper(name, 0.1),
            |e| matches!(e, Error::UnknownHyper { rule, name: n, known } if rule == "adan" && n == name && known.contains("lr")),
            adan_next,
        );
    }
}

#[test]
fn non_finite_hyperparameter() {
    for name in ["lr", "eps", "no_prox"] {
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_rejected_without_trace(
                adan,
                |o| o.set_hyper(name, v),
                |e| matches!(e, Error::BadHyper { name: n, value, .. } if n == name && (value.to_bits() == v.to_bits())),
                adan_next,
            );
        }
    }
}

#[test]
fn bool_hyperparameter_set_to_a_non_boolean() {
    for v in [0.5, 2.0, -1.0, 1e-300] {
        assert_rejected_without_trace(
            adan,
            |o| o.set_hyper("no_prox", v),
            |e| matches!(e, Error::BadHyper { name, value, .. } if name == "no_prox" && *value == v),
            |o| {
                // The following valid call sets the same flag properly.
                o.set_hyper("no_prox", 1.0).unwrap();
                adan_next(o);
            },
        );
    }
}

// ---------------------------------------------------------------- inputs

#[test]
fn missing_input() {
    assert_rejected_without_trace(
        adan,
        |o| o.step(&Inputs::default()),
        |e| matches!(e, Error::MissingInput { rule, name, .. } if rule == "adan" && name == "g"),
        adan_next,
    );
    assert_rejected_without_trace(
        adan,
        |o| o.run_stage(0, &Inputs::default()),
        |e| matches!(e, Error::MissingInput { name, .. } if name == "g"),
        adan_next,
    );
}

#[test]
fn unknown_input_name() {
    let g = data(5, &SIZES);
    // An unknown tensor name, even beside the right input.
    assert_rejected_without_trace(
        adan,
        |o| {
            o.step(
                &Inputs::default()
                    .tensor("g", slices(&g))
                    .tensor("grad", slices(&g)),
            )
        },
        |e| matches!(e, Error::UnknownInput { rule, name } if rule == "adan" && name == "grad"),
        adan_next,
    );
    // A param or state name is not an input either.
    for name in ["theta", "m", "g_prev"] {
        assert_rejected_without_trace(
            adan,
            |o| {
                o.step(
                    &Inputs::default()
                        .tensor("g", slices(&g))
                        .tensor(name, slices(&g)),
                )
            },
            |e| matches!(e, Error::UnknownInput { name: n, .. } if n == name),
            adan_next,
        );
    }
    // An unknown scalar input.
    assert_rejected_without_trace(
        adan,
        |o| {
            o.step(
                &Inputs::default()
                    .tensor("g", slices(&g))
                    .scalar("loss", 1.0),
            )
        },
        |e| matches!(e, Error::UnknownInput { name, .. } if name == "loss"),
        adan_next,
    );
}

#[test]
fn wrong_number_of_tensors() {
    for sizes in [&SIZES[..2], &[3, 0, 5, 1][..], &[][..]] {
        let g = data(6, sizes);
        assert_rejected_without_trace(
            adan,
            |o| o.step(&Inputs::default().tensor("g", slices(&g))),
            |e| matches!(e, Error::Length { expected: 3, got, .. } if *got == sizes.len()),
            adan_next,
        );
    }
}

#[test]
fn wrong_tensor_length() {
    for (sizes, expected, got) in [
        ([3, 0, 4], 5, 4),
        ([3, 0, 6], 5, 6),
        ([3, 1, 5], 0, 1),
        ([2, 0, 5], 3, 2),
    ] {
        let g = data(7, &sizes);
        assert_rejected_without_trace(
            adan,
            |o| o.step(&Inputs::default().tensor("g", slices(&g))),
            |e| matches!(e, Error::Length { expected: x, got: y, .. } if *x == expected && *y == got),
            adan_next,
        );
    }
}

// ---------------------------------------------------------------- stages and scalar inputs (N-HARPG)

/// N-HARPG after two full steps.
fn harpg() -> Optimizer<f32> {
    let program = optc::stdlib_rule("n_harpg").expect("n_harpg");
    let mut opt = Optimizer::new(Arc::new(program), vec![data(0, &SIZES)]).unwrap();
    opt.set_hyper("gamma0", 0.3).unwrap();
    for s in 1..=2 {
        let (g, hv) = (data(s, &SIZES), data(s + 10, &SIZES));
        opt.step(
            &Inputs::default()
                .scalar("q", 0.25 * s as f64)
                .tensor("g", slices(&g))
                .tensor("hv", slices(&hv)),
        )
        .unwrap();
    }
    opt
}

/// N-HARPG after two full steps and the probe stage of the third.
fn harpg_mid_step() -> Optimizer<f32> {
    let mut opt = harpg();
    opt.run_stage(0, &Inputs::default().scalar("q", 0.6))
        .unwrap();
    opt
}

fn harpg_update(opt: &mut Optimizer<f32>) {
    let (g, hv) = (data(20, &SIZES), data(21, &SIZES));
    opt.run_stage(
        1,
        &Inputs::default()
            .tensor("g", slices(&g))
            .tensor("hv", slices(&hv)),
    )
    .unwrap();
}

fn harpg_next(opt: &mut Optimizer<f32>) {
    opt.run_stage(0, &Inputs::default().scalar("q", 0.6))
        .unwrap();
    let probe = opt.buffer("theta_hat").unwrap().to_vec();
    harpg_update(opt);
    let (g, hv) = (data(22, &SIZES), slices(&probe));
    opt.step(
        &Inputs::default()
            .scalar("q", 0.9)
            .tensor("g", slices(&g))
            .tensor("hv", hv),
    )
    .unwrap();
}

#[test]
fn stage_run_out_of_order() {
    // The update before the probe.
    assert_rejected_without_trace(
        harpg,
        |o| {
            o.run_stage(
                1,
                &Inputs::default()
                    .tensor("g", slices(&data(20, &SIZES)))
                    .tensor("hv", slices(&data(21, &SIZES))),
            )
        },
        |e| matches!(e, Error::StageOrder { expected: 0, got: 1, name } if name == "probe"),
        harpg_next,
    );
    // A stage index past the last stage.
    assert_rejected_without_trace(
        harpg,
        |o| o.run_stage(2, &Inputs::default().scalar("q", 0.5)),
        |e| matches!(e, Error::Params(m) if m.contains("has no stage 2")),
        harpg_next,
    );
    // The probe twice.
    assert_rejected_without_trace(
        harpg_mid_step,
        |o| o.run_stage(0, &Inputs::default().scalar("q", 0.1)),
        |e| matches!(e, Error::StageOrder { expected: 1, got: 0, name } if name == "update"),
        |o| {
            harpg_update(o);
            harpg_next(o);
        },
    );
    // On a fresh optimizer too (no state initialized yet).
    let fresh = || {
        Optimizer::<f32>::new(
            Arc::new(optc::stdlib_rule("n_harpg").unwrap()),
            vec![data(0, &SIZES)],
        )
        .unwrap()
    };
    assert_rejected_without_trace(
        fresh,
        |o| {
            o.run_stage(
                1,
                &Inputs::default()
                    .tensor("g", slices(&data(20, &SIZES)))
                    .tensor("hv", slices(&data(21, &SIZES))),
            )
        },
        |e| {
            matches!(
                e,
                Error::StageOrder {
                    expected: 0,
                    got: 1,
                    ..
                }
            )
        },
        harpg_next,
    );
}

#[test]
fn missing_scalar_input() {
    // normalized_gd's loss has no default (n_harpg's q has one: it is drawn).
    let ngd = || {
        let program = optc::stdlib_rule("normalized_gd").expect("normalized_gd");
        let mut opt = Optimizer::new(Arc::new(program), vec![data(0, &SIZES)]).unwrap();
        let g = data(1, &SIZES);
        opt.step(
            &Inputs::default()
                .tensor("g", slices(&g))
                .scalar("loss", 2.0),
        )
        .unwrap();
        opt
    };
    let ngd_next = |o: &mut Optimizer<f32>| {
        let g = data(2, &SIZES);
        o.step(
            &Inputs::default()
                .tensor("g", slices(&g))
                .scalar("loss", 3.0),
        )
        .unwrap();
    };
    let g = data(20, &SIZES);
    assert_rejected_without_trace(
        ngd,
        |o| o.step(&Inputs::default().tensor("g", slices(&g))),
        |e| matches!(e, Error::MissingInput { rule, stage, name } if rule == "normalized_gd" && stage == "step" && name == "loss"),
        ngd_next,
    );
    // A scalar input with a default may be left out.
    let mut h = harpg();
    h.run_stage(0, &Inputs::default()).expect("q is drawn");
    // An unknown scalar beside the right one.
    assert_rejected_without_trace(
        harpg,
        |o| o.run_stage(0, &Inputs::default().scalar("q", 0.5).scalar("seed", 1.0)),
        |e| matches!(e, Error::UnknownInput { name, .. } if name == "seed"),
        harpg_next,
    );
}

#[test]
fn missing_input_of_the_second_stage() {
    // run_stage: the update without hv (needed from t = 2 on).
    let g = data(20, &SIZES);
    assert_rejected_without_trace(
        harpg_mid_step,
        |o| o.run_stage(1, &Inputs::default().tensor("g", slices(&g))),
        |e| matches!(e, Error::MissingInput { stage, name, .. } if stage == "update" && name == "hv"),
        |o| {
            harpg_update(o);
            harpg_next(o);
        },
    );
}

/// `step` on a two-stage rule whose second stage lacks an input: the call must fail as a whole,
/// before the first stage runs, so that the host can retry the step from its first stage.
#[test]

fn failed_step_of_a_two_stage_rule_leaves_the_step_unstarted() {
    let g = data(20, &SIZES);
    assert_rejected_without_trace(
        harpg,
        |o| o.step(&Inputs::default().scalar("q", 0.6).tensor("g", slices(&g))),
        |e| matches!(e, Error::MissingInput { stage, name, .. } if stage == "update" && name == "hv"),
        harpg_next,
    );
}

#[test]

fn failed_step_of_a_two_stage_rule_leaves_state_untouched() {
    let src = "rule two(lr = 0.1) { param x  input g, h  state s = 0\n  stage a { s = s + g }\n  stage b { x = x - lr * s * h } }";
    let make = || {
        Optimizer::<f32>::new(
            Arc::new(optc::compile_rule(src).expect("compiles")),
            vec![data(0, &SIZES)],
        )
        .unwrap()
    };
    let g = data(1, &SIZES);
    assert_rejected_without_trace(
        make,
        |o| o.step(&Inputs::default().tensor("g", slices(&g))),
        |e| matches!(e, Error::MissingInput { stage, name, .. } if stage == "b" && name == "h"),
        |o| {
            let h = data(2, &SIZES);
            o.step(
                &Inputs::default()
                    .tensor("g", slices(&g))
                    .tensor("h", slices(&h)),
            )
            .unwrap();
            o.step(
                &Inputs::default()
                    .tensor("g", slices(&h))
                    .tensor("h", slices(&g)),
            )
            .unwrap();
        },
    );
}

// ---------------------------------------------------------------- several params (penalty_bilevel, f64)

fn bilevel() -> Optimizer<f64> {
    let program = optc::stdlib_rule("penalty_bilevel").expect("penalty_bilevel");
    let mut opt = Optimizer::<f64>::new(
        Arc::new(program),
        vec![
            vec![vec![0.5, -1.0, 2.0]],
            vec![vec![0.1; 4]],
            vec![vec![-0.2; 4]],
        ],
    )
    .unwrap();
    bilevel_next(&mut opt);
    opt
}

fn bilevel_inputs<'a>(x: &'a [f64], y: &'a [f64]) -> Inputs<'a, f64> {
    Inputs::default()
        .tensor("fx", vec![x])
        .tensor("gx_y", vec![x])
        .tensor("gx_z", vec![x])
        .tensor("fy", vec![y])
        .tensor("gy", vec![y])
        .tensor("gz", vec![y])
}

fn bilevel_next(opt: &mut Optimizer<f64>) {
    let (x, y) = ([0.3, -0.1, 0.2], [1.0, 0.5, -0.5, 0.25]);
    opt.step(&bilevel_inputs(&x, &y)).unwrap();
}

#[test]
fn several_params_errors() {
    let (x, y) = ([0.3, -0.1, 0.2], [1.0, 0.5, -0.5, 0.25]);
    // An x-space input with y's length.
    assert_rejected_without_trace(
        bilevel,
        |o| o.step(&bilevel_inputs(&x, &y).tensor("fx", vec![&y])),
        |e| {
            matches!(
                e,
                Error::Length {
                    expected: 3,
                    got: 4,
                    ..
                }
            )
        },
        bilevel_next,
    );
    // A y-space input with x's length.
    assert_rejected_without_trace(
        bilevel,
        |o| o.step(&bilevel_inputs(&x, &y).tensor("gz", vec![&x])),
        |e| {
            matches!(
                e,
                Error::Length {
                    expected: 4,
                    got: 3,
                    ..
                }
            )
        },
        bilevel_next,
    );
    // One input missing.
    assert_rejected_without_trace(
        bilevel,
        |o| {
            let mut i = bilevel_inputs(&x, &y);
            i.tensors.remove("gx_z");
            o.step(&i)
        },
        |e| matches!(e, Error::MissingInput { name, .. } if name == "gx_z"),
        bilevel_next,
    );
    // Non-finite hyperparameter on a rule with scalar state.
    assert_rejected_without_trace(
        bilevel,
        |o| o.set_hyper("c_lam", f64::NAN),
        |e| matches!(e, Error::BadHyper { name, .. } if name == "c_lam"),
        bilevel_next,
    );
    // Construction with tensors for two of the three params.
    let err = Optimizer::<f64>::new(
        Arc::new(optc::stdlib_rule("penalty_bilevel").unwrap()),
        vec![vec![vec![0.0; 3]], vec![vec![0.0; 4]]],
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Spaces {
                expected: 3,
                got: 2,
                ..
            }
        ),
        "{err:?}"
    );
}

// ---------------------------------------------------------------- the optc command

fn optc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_optc"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run optc")
}

/// Exit code 1, a message on stderr that contains every `needles`, and no panic.
fn assert_user_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit status {:?}\nstderr:\n{stderr}\nstdout:\n{stdout}",
        out.status
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "a panic:\n{stderr}"
    );
    assert!(
        stderr.to_lowercase().contains("error"),
        "no error message:\n{stderr}"
    );
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks `{n}`:\n{stderr}");
    }
}

fn write_f32(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, d)| d.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, shape, _), b)| {
            (
                n.to_string(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        write_f32(
            &dir.path().join("params.safetensors"),
            &[
                ("w", vec![2, 3], vec![1.0, -2.0, 0.5, 0.0, 3.0, -1.0]),
                ("b", vec![1], vec![0.25]),
            ],
        );
        write_f32(
            &dir.path().join("grads.safetensors"),
            &[
                (
                    "w",
                    vec![4, 2, 3],
                    (0..24).map(|i| (i as f32 * 0.3).sin()).collect(),
                ),
                ("b", vec![4, 1], vec![0.1, -0.2, 0.3, -0.4]),
            ],
        );
        Files { dir }
    }
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }
    /// `optc run RULE --params params --grads grads --out out` with extra arguments.
    fn run(&self, rule: &str, params: &str, grads: &str, extra: &[&str]) -> Output {
        let (p, g, o) = (
            self.path(params),
            self.path(grads),
            self.path("out.safetensors"),
        );
        let mut args = vec![
            "run", rule, "--params", &p, "--grads", &g, "--out", &o, "--quiet",
        ];
        args.extend_from_slice(extra);
        optc(&args)
    }
}

#[test]
fn cli_control_a_valid_run_succeeds() {
    let f = Files::new();
    let out = f.run(
        "adam",
        "params.safetensors",
        "grads.safetensors",
        &["--set", "lr=0.01", "--set", "amsgrad=true"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(f.path("out.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("w").unwrap().shape(), &[2, 3]);
}

#[test]
fn cli_missing_rule_file() {
    let f = Files::new();
    let missing = f.path("no_such_rule.opt");
    assert_user_error(
        &f.run(&missing, "params.safetensors", "grads.safetensors", &[]),
        &["no_such_rule.opt"],
    );
    assert_user_error(&optc(&["check", &missing]), &["no_such_rule.opt"]);
    assert_user_error(&optc(&["compile", &missing]), &["no_such_rule.opt"]);
}

#[test]
fn cli_unknown_stdlib_name() {
    let f = Files::new();
    assert_user_error(
        &f.run("adamm", "params.safetensors", "grads.safetensors", &[]),
        &["adamm", "did you mean `adam`"],
    );
    assert_user_error(&optc(&["doc", "adamm"]), &["adamm"]);
    assert_user_error(&optc(&["doc", "zzzzzzzz"]), &["zzzzzzzz"]);
}

#[test]
fn cli_params_file_does_not_exist() {
    let f = Files::new();
    assert_user_error(
        &f.run(
            "adam",
            "missing_params.safetensors",
            "grads.safetensors",
            &[],
        ),
        &["missing_params.safetensors"],
    );
    assert_user_error(
        &f.run(
            "adam",
            "params.safetensors",
            "missing_grads.safetensors",
            &[],
        ),
        &["missing_grads.safetensors"],
    );
}

#[test]
fn cli_corrupt_safetensors() {
    let f = Files::new();
    std::fs::write(
        f.path("garbage.safetensors"),
        b"this is not a safetensors file",
    )
    .unwrap();
    // A valid file cut short: the header promises more data than there is.
    let good = std::fs::read(f.path("params.safetensors")).unwrap();
    std::fs::write(f.path("truncated.safetensors"), &good[..good.len() - 5]).unwrap();
    std::fs::write(f.path("empty.safetensors"), b"").unwrap();
    for bad in [
        "garbage.safetensors",
        "truncated.safetensors",
        "empty.safetensors",
    ] {
        assert_user_error(&f.run("adam", bad, "grads.safetensors", &[]), &[bad]);
        assert_user_error(&f.run("adam", "params.safetensors", bad, &[]), &[bad]);
    }
}

#[test]
fn cli_input_shape_not_steps_by_shape() {
    let f = Files::new();
    // No step axis.
    write_f32(
        &f.dir.path().join("flat.safetensors"),
        &[("w", vec![2, 3], vec![0.0; 6]), ("b", vec![1], vec![0.0])],
    );
    // A step axis, but the wrong shape after it.
    write_f32(
        &f.dir.path().join("transposed.safetensors"),
        &[
            ("w", vec![4, 3, 2], vec![0.0; 24]),
            ("b", vec![4, 1], vec![0.0; 4]),
        ],
    );
    // The right shape with the step axis last.
    write_f32(
        &f.dir.path().join("steps_last.safetensors"),
        &[
            ("w", vec![2, 3, 4], vec![0.0; 24]),
            ("b", vec![1, 4], vec![0.0; 4]),
        ],
    );
    for bad in [
        "flat.safetensors",
        "transposed.safetensors",
        "steps_last.safetensors",
    ] {
        assert_user_error(&f.run("adam", "params.safetensors", bad, &[]), &["steps"]);
    }
}

#[test]
fn cli_unknown_set_name() {
    let f = Files::new();
    assert_user_error(
        &f.run(
            "adam",
            "params.safetensors",
            "grads.safetensors",
            &["--set", "learning_rate=0.1"],
        ),
        &["learning_rate"],
    );
}

#[test]
fn cli_set_value_not_a_number() {
    let f = Files::new();
    for v in ["lr=fast", "lr=", "lr=1e-3x", "amsgrad=yes"] {
        let value = v.split_once('=').unwrap().1;
        assert_user_error(
            &f.run(
                "adam",
                "params.safetensors",
                "grads.safetensors",
                &["--set", v],
            ),
            &[&format!("`{value}`")],
        );
    }
    assert_user_error(
        &f.run(
            "adam",
            "params.safetensors",
            "grads.safetensors",
            &["--set", "lr"],
        ),
        &["lr"],
    );
    // Parsed, but not a finite number.
    assert_user_error(
        &f.run(
            "adam",
            "params.safetensors",
            "grads.safetensors",
            &["--set", "lr=inf"],
        ),
        &["lr"],
    );
    assert_user_error(
        &f.run(
            "adam",
            "params.safetensors",
            "grads.safetensors",
            &["--set", "lr=NaN"],
        ),
        &["lr"],
    );
    // A boolean set to something else.
    assert_user_error(
        &f.run(
            "adam",
            "params.safetensors",
            "grads.safetensors",
            &["--set", "amsgrad=0.5"],
        ),
        &["amsgrad"],
    );
}

#[test]
fn cli_rule_file_with_a_syntax_error() {
    let f = Files::new();
    let rule = f.path("broken.opt");
    std::fs::write(
        &rule,
        "rule broken(lr = 0.1) {\n    param theta\n    input g\n    theta = theta - lr * \n}\n",
    )
    .unwrap();
    assert_user_error(
        &f.run(&rule, "params.safetensors", "grads.safetensors", &[]),
        &["broken.opt"],
    );
    assert_user_error(&optc(&["check", &rule]), &["broken.opt"]);
    assert_user_error(&optc(&["compile", &rule]), &["broken.opt"]);
    let unclosed = f.path("unclosed.opt");
    std::fs::write(&unclosed, "rule unclosed(lr = 0.1 {\n    param theta\n").unwrap();
    assert_user_error(
        &f.run(&unclosed, "params.safetensors", "grads.safetensors", &[]),
        &["unclosed.opt"],
    );
}

#[test]
fn values_outside_a_declared_range_are_refused() {
    let program = optc::stdlib_rule("adam").unwrap();
    let mut o =
        Optimizer::<f32>::new(std::sync::Arc::new(program), vec![vec![vec![0.5; 4]]]).unwrap();
    for (name, v) in [
        ("beta1", 1.0),
        ("beta2", -0.1),
        ("lr", -1e-3),
        ("eps", -1.0),
        ("weight_decay", -0.5),
    ] {
        let before = o.hyper(name);
        let e = o.set_hyper(name, v).unwrap_err();
        assert!(
            matches!(e, optc::runtime::Error::OutOfRange { .. }),
            "{name}: {e}"
        );
        assert!(e.to_string().contains("out of range"), "{e}");
        assert_eq!(o.hyper(name), before, "{name} unchanged");
    }
    o.set_hyper("beta1", 0.0).unwrap();
    // A schedule that leaves the range is refused when it is set (its whole horizon is
    // checked), so no run stops part-way; nothing changes.
    let e = o
        .set_schedule(
            "lr",
            optc::runtime::Schedule::parse("linear(1, -1, 4)").unwrap(),
        )
        .unwrap_err();
    assert!(e.to_string().contains("at step 3"), "{e}");
    assert!(o.schedules().is_empty());
    let g = [0.1f32; 4];
    for _ in 0..2 {
        o.step(&optc::runtime::Inputs::default().tensor("g", vec![&g]))
            .unwrap();
    }
    assert_eq!(o.steps(), 2);
}

#[test]
fn cli_inputs_are_checked_by_the_runtime() {
    let f = Files::new();
    // A rule that reads `g`, given no input: the runtime's error at step 1, with what to pass.
    let p = f.path("params.safetensors");
    let o = f.path("out.safetensors");
    let out = optc(&[
        "run", "adam", "--params", &p, "--out", &o, "--steps", "2", "-q",
    ]);
    assert_user_error(
        &out,
        &[
            "step 1",
            "needs input `g`",
            "--input g=FILE",
            "--grads FILE",
        ],
    );
    // No input at all and no --steps: the rule's inputs are named.
    assert_user_error(
        &optc(&["run", "adam", "--params", &p, "--out", &o, "-q"]),
        &["--steps", "(g)"],
    );
    // An input the rule does not have.
    let g = f.path("grads.safetensors");
    assert_user_error(
        &f.run(
            "adam",
            "params.safetensors",
            "grads.safetensors",
            &["--input", &format!("h={g}")],
        ),
        &["no input `h`", "(inputs: g)"],
    );
    assert!(!f.dir.path().join("out.safetensors").exists());
}

#[test]
fn cli_outputs_are_written_atomically() {
    let f = Files::new();
    let listing = |f: &Files| {
        let mut names: Vec<String> = std::fs::read_dir(f.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let before = listing(&f);
    // A checkpoint that cannot be written (its folder does not exist): the outputs are one
    // transaction, so `--out` is not written either, and no temporary file is left.
    let state = f.path("missing/state.safetensors");
    let out = f.run(
        "adam",
        "params.safetensors",
        "grads.safetensors",
        &["--state-out", &state],
    );
    assert_user_error(&out, &["missing/state.safetensors"]);
    assert_eq!(
        listing(&f),
        before,
        "nothing written, no temporary file left"
    );
    let mut expected = before.clone();
    expected.push("out.safetensors".to_string());
    // A run that writes both.
    let state = f.path("state.safetensors");
    let out = f.run(
        "adam",
        "params.safetensors",
        "grads.safetensors",
        &["--state-out", &state],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    expected.push("state.safetensors".to_string());
    expected.sort();
    assert_eq!(listing(&f), expected, "no temporary file is left");
}

#[test]
fn cli_compile_checks_values_as_run_does() {
    for (args, needle) in [
        (&["--set", "beta1=1"][..], "out of range"),
        (&["--set", "amsgrad=0.5"], "amsgrad"),
        (&["--set", "amsgrad=yes"], "`yes`"),
        (&["--set", "learning_rate=0.1"], "learning_rate"),
        (&["--set", "lr=NaN"], "lr"),
        (&["--set", "lr"], "lr"),
    ] {
        for emit in ["ir", "kernels", "clif", "cuda"] {
            let mut all = vec!["compile", "adam", "--emit", emit];
            all.extend_from_slice(args);
            assert_user_error(&optc(&all), &[needle]);
        }
    }
    // The runtime refuses a non-finite guard for a rule with several stages; so does compile.
    assert_user_error(
        &optc(&["compile", "n_harpg", "--non-finite", "skip"]),
        &["several stages"],
    );
}

// ---------------------------------------------------------------- wording and schedules

/// Counts say what they count; a lent tensor is named; a stage past the end says so; values
/// print in their shortest form.
#[test]
fn messages_name_what_is_wrong() {
    let p = Arc::new(optc::stdlib_rule("sgd").unwrap());
    let mut o = Optimizer::<f32>::lending(
        Arc::clone(&p),
        vec![vec![
            optc::runtime::TensorSpec::new("fc.weight", &[3]),
            optc::runtime::TensorSpec::new("fc.bias", &[2]),
        ]],
    )
    .unwrap();
    let (mut w, mut b) = (vec![0f32; 3], vec![0f32; 2]);
    let (gw, gb) = (vec![1f32; 3], vec![1f32; 2]);
    let e = o
        .step_with(
            &mut [vec![&mut w[..], &mut b[..]]],
            &Inputs::default().tensor("g", vec![&gw[..]]),
        )
        .unwrap_err();
    assert!(e.to_string().contains("expected 2 tensors, got 1"), "{e}");
    let e = o
        .step_with(
            &mut [vec![&mut w[..], &mut b[..]]],
            &Inputs::default().tensor("g", vec![&gb[..], &gw[..]]),
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("tensor `fc.weight`") && e.to_string().contains("3 elements"),
        "{e}"
    );
    let e = o.set_hyper("lr", -1e-300).unwrap_err();
    assert!(
        e.to_string().contains("-1e-300") && e.to_string().len() < 100,
        "{e}"
    );
    let staged = Arc::new(optc::stdlib_rule("n_harpg").unwrap());
    let n = staged.info.stages.len();
    let mut o = Optimizer::<f32>::new(staged, vec![vec![vec![0.0; 3]]]).unwrap();
    let e = o.run_stage(n + 2, &Inputs::default()).unwrap_err();
    assert!(
        e.to_string().contains(&format!("has no stage {}", n + 2)),
        "{e}"
    );
}

/// A schedule is checked over its whole horizon when it is set, so a run never stops part-way
/// with a value out of range; nothing changes when it is refused.
#[test]
fn schedules_are_checked_over_their_horizon() {
    let p = Arc::new(
        optc::compile_rule(
            "rule r(gamma = 0.5 in (0, inf)) { param x\n input g\n x = x - gamma * g }",
        )
        .unwrap(),
    );
    let mut o = Optimizer::<f32>::new(p, vec![vec![vec![1.0; 4]]]).unwrap();
    let decay = optc::runtime::Schedule::parse("linear_decay(5)").unwrap();
    let e = o.set_schedule("gamma", decay).unwrap_err();
    assert!(e.to_string().contains("at step 5"), "{e}");
    assert!(o.schedules().is_empty());
    let rise = optc::runtime::Schedule::parse("linear(1, 3, 5)").unwrap();
    o.set_schedule("gamma", rise).unwrap();
    // A new base value is checked against the schedule too: 3 * 1e308 overflows.
    let e = o.set_hyper("gamma", 1e308).unwrap_err();
    assert!(e.to_string().contains("gamma"), "{e}");
    assert_eq!(o.hyper("gamma"), Some(0.5));
}

/// `--schedule` with `refined`: its arguments are checked, it composes with `then`, and a run
/// longer than its log is refused; `--set` keeps numbers and booleans apart; a policy error
/// prints as an error.
#[test]
fn the_cli_checks_schedules_and_values() {
    let dir = tempfile::tempdir().unwrap();
    let params = dir.path().join("p.safetensors");
    let grads = dir.path().join("g.safetensors");
    let norms = dir.path().join("norms.txt");
    write_f32(&params, &[("w", vec![3], vec![1.0, 2.0, 3.0])]);
    write_f32(&grads, &[("w", vec![4, 3], vec![0.5; 12])]);
    std::fs::write(&norms, "1\n2\n3\n").unwrap();
    let out = dir.path().join("o.safetensors");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "sgd",
            "--params",
            params.to_str().unwrap(),
            "--grads",
            grads.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ];
        args.extend_from_slice(extra);
        optc(&args)
    };
    let n = norms.to_str().unwrap();
    for (schedule, needle) in [
        (format!("lr=refined({n}, nan)"), "TAU"),
        (format!("lr=refined({n}, -1)"), "TAU"),
        (format!("lr=refined({n}, inf)"), "TAU"),
        (format!("lr=refined({n}, 0.1, L1)"), "unknown weighting"),
        (format!("lr=refined({n}, 0.1, l1, 3)"), "refined takes"),
        (format!("lr=refined({n})"), "covers steps 1 to 3"),
    ] {
        assert_user_error(&run(&["--schedule", &schedule]), &[needle]);
        assert!(!out.exists(), "{schedule}: nothing is written");
    }
    let ok = run(&[
        "--schedule",
        &format!("lr=refined({n}, 0.1, l2) then cosine(3)"),
    ]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_user_error(&run(&["--set", "lr=true"]), &["is a number"]);
    assert_user_error(&run(&["--set", "nesterov=0.5"]), &["true or false"]);
    let staged = optc(&[
        "run",
        "n_harpg",
        "--params",
        params.to_str().unwrap(),
        "--steps",
        "1",
        "--out",
        out.to_str().unwrap(),
        "--non-finite",
        "skip",
    ]);
    assert_user_error(&staged, &["error: ", "several stages"]);
}

#[test]
fn cli_doc_documents_a_rule_file() {
    let f = Files::new();
    let path = f.path("mine.opt");
    std::fs::write(
        &path,
        "/// My first rule.\nrule one(lr = 0.5 in (0, 1)) { param x\n input g\n x = x - lr * g }\n\
         /// My second rule.\nrule two(beta = 0.9) { param x\n input g, hv\n state m = 0\n m = beta * m + g + hv\n x = x - m }\n",
    )
    .unwrap();
    let out = optc(&["doc", &path]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "one",
        "My first rule.",
        "lr",
        "0.5 in (0, 1)",
        "two",
        "My second rule.",
        "inputs: g, hv",
        "state: m",
    ] {
        assert!(text.contains(needle), "`{needle}` missing from:\n{text}");
    }
    // A file with an error: its report, exit code 1.
    std::fs::write(&path, "rule bad() { param x\n x = x - y }\n").unwrap();
    assert_user_error(&optc(&["doc", &path]), &["E0101", "`y`"]);
}
