//! `optc run` and `optc bench` on the data they read and write: sizes that cannot be allocated,
//! mixed F32/F64 params, deterministic outputs, output metadata after a resume, the rule's
//! outputs, and input files that do not fit the params.

use safetensors::tensor::{Dtype, TensorView};
use std::path::Path;
use std::process::Output;

/// A tensor to write: name, dtype, shape, values.
type T = (&'static str, Dtype, Vec<usize>, Vec<f64>);

fn write(path: &Path, tensors: &[T]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, d, _, v)| match d {
            Dtype::F64 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            _ => v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect(),
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            (
                t.0.to_string(),
                TensorView::new(t.1, t.2.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn optc(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_optc"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn fails(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` in: {err}");
    }
}

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Self {
        let d = Dir(tempfile::tempdir().unwrap());
        write(
            &d.p("params.safetensors"),
            &[
                ("a", Dtype::F32, vec![3], vec![1.0, -2.0, 0.5]),
                ("b", Dtype::F64, vec![2], vec![0.1, 1e-300]),
            ],
        );
        let g = |n: usize, s: f64| (0..n).map(|i| ((i as f64 + s) * 0.37).sin()).collect();
        write(
            &d.p("grads.safetensors"),
            &[
                ("a", Dtype::F32, vec![4, 3], g(12, 0.0)),
                ("b", Dtype::F64, vec![4, 2], g(8, 5.0)),
            ],
        );
        d
    }
    fn p(&self, n: &str) -> std::path::PathBuf {
        self.0.path().join(n)
    }
    fn s(&self, n: &str) -> String {
        self.p(n).to_string_lossy().into_owned()
    }
    fn read(&self, n: &str) -> Vec<u8> {
        std::fs::read(self.p(n)).unwrap()
    }
}

#[test]
fn bench_refuses_sizes_that_cannot_be_allocated() {
    for elems in ["18446744073709551615", "100000000000000"] {
        fails(
            &optc(&["bench", "adam", "--elems", elems, "--steps", "1"]),
            &["--elems", elems],
        );
    }
}

#[test]
fn each_tensor_keeps_its_dtype() {
    let d = Dir::new();
    ok(&optc(&[
        "run",
        "adam",
        "--params",
        &d.s("params.safetensors"),
        "--grads",
        &d.s("grads.safetensors"),
        "--set",
        "lr=0.1",
        "--out",
        &d.s("out.safetensors"),
        "-q",
    ]));
    let bytes = d.read("out.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("a").unwrap().dtype(), Dtype::F32);
    assert_eq!(st.tensor("b").unwrap().dtype(), Dtype::F64);
    // b keeps f64 precision: 1e-300 is not an f32.
    let b = st.tensor("b").unwrap();
    let b1 = f64::from_le_bytes(b.data()[8..16].try_into().unwrap());
    assert!(b1 != 0.0 && b1.abs() < 1.0, "{b1}");
}

#[test]
fn a_resumed_mixed_run_matches_a_straight_one_and_outputs_are_deterministic() {
    let d = Dir::new();
    let g = |n: usize, s: f64| {
        (0..n)
            .map(|i| ((i as f64 + s) * 0.37).sin())
            .collect::<Vec<_>>()
    };
    let (ga, gb) = (g(12, 0.0), g(8, 5.0));
    write(
        &d.p("g1.safetensors"),
        &[
            ("a", Dtype::F32, vec![2, 3], ga[..6].to_vec()),
            ("b", Dtype::F64, vec![2, 2], gb[..4].to_vec()),
        ],
    );
    write(
        &d.p("g2.safetensors"),
        &[
            ("a", Dtype::F32, vec![2, 3], ga[6..].to_vec()),
            ("b", Dtype::F64, vec![2, 2], gb[4..].to_vec()),
        ],
    );
    let run = |params: &str, grads: &str, out: &str, extra: &[&str]| {
        let (p, g, o) = (d.s(params), d.s(grads), d.s(out));
        let mut args = vec![
            "run", "adan", "--params", &p, "--grads", &g, "--out", &o, "-q",
        ];
        args.extend_from_slice(extra);
        ok(&optc(&args));
    };
    let ck = d.s("ck.safetensors");
    let ck2 = d.s("ck2.safetensors");
    run(
        "params.safetensors",
        "grads.safetensors",
        "straight.safetensors",
        &[],
    );
    run(
        "params.safetensors",
        "grads.safetensors",
        "again.safetensors",
        &[],
    );
    assert_eq!(
        d.read("straight.safetensors"),
        d.read("again.safetensors"),
        "identical runs write identical bytes"
    );
    run(
        "params.safetensors",
        "g1.safetensors",
        "mid.safetensors",
        &["--state-out", &ck],
    );
    run(
        "mid.safetensors",
        "g2.safetensors",
        "resumed.safetensors",
        &["--state-in", &ck, "--state-out", &ck2],
    );
    assert_eq!(
        d.read("resumed.safetensors"),
        d.read("straight.safetensors")
    );
    let bytes = d.read("resumed.safetensors");
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .unwrap()
            .get("steps")
            .map(String::as_str),
        Some("4"),
        "the step count of the params, not of this run"
    );
    // State tensors are named by tensor name.
    let ckb = d.read("ck2.safetensors");
    let st = safetensors::SafeTensors::deserialize(&ckb).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    assert!(names.contains(&"state.m.a".to_string()), "{names:?}");
    assert!(names.contains(&"state.m.b".to_string()), "{names:?}");
}

#[test]
fn the_rules_outputs_are_written_with_outputs() {
    let d = Dir::new();
    let (p, g) = (d.s("params.safetensors"), d.s("grads.safetensors"));
    let (o, outs) = (d.s("out.safetensors"), d.s("outputs.safetensors"));
    let args = [
        "run",
        "clip_global_norm",
        "--params",
        &p,
        "--grads",
        &g,
        "--out",
        &o,
    ];
    let out = optc(&args);
    ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--outputs"),
        "a note says the outputs are not written"
    );
    let mut with = args.to_vec();
    with.extend(["--outputs", &outs, "-q"]);
    ok(&optc(&with));
    let bytes = d.read("outputs.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    assert_eq!(names, ["g_clipped.a", "g_clipped.b"]);
    // A rule without outputs refuses --outputs.
    fails(
        &optc(&[
            "run",
            "sgd",
            "--params",
            &p,
            "--grads",
            &g,
            "--out",
            &o,
            "--outputs",
            &outs,
        ]),
        &["no outputs"],
    );
}

#[test]
fn input_files_that_do_not_fit_are_refused() {
    let d = Dir::new();
    let (p, g, o) = (
        d.s("params.safetensors"),
        d.s("grads.safetensors"),
        d.s("out.safetensors"),
    );
    write(
        &d.p("extra.safetensors"),
        &[
            ("a", Dtype::F32, vec![1, 3], vec![0.0; 3]),
            ("b", Dtype::F32, vec![1, 2], vec![0.0; 2]),
            ("c", Dtype::F32, vec![1, 2], vec![0.0; 2]),
        ],
    );
    let x = d.s("extra.safetensors");
    fails(
        &optc(&["run", "sgd", "--params", &p, "--grads", &x, "--out", &o]),
        &["tensor `c`"],
    );
    let twice = format!("g={g}");
    fails(
        &optc(&[
            "run", "sgd", "--params", &p, "--grads", &g, "--input", &twice, "--out", &o,
        ]),
        &["`g` is given twice"],
    );
    fails(
        &optc(&[
            "run", "sgd", "--params", &p, "--input", &twice, "--input", &twice, "--out", &o,
        ]),
        &["`g` is given twice"],
    );
    assert!(!d.p("out.safetensors").exists());
}

#[test]
fn per_sample_inputs_and_scalar_outputs_go_through_files() {
    let d = Dir::new();
    let g = |n: usize, s: f64| (0..n).map(|i| ((i as f64 + s) * 0.61).cos()).collect();
    // [steps = 2, samples = 5, ...shape]
    write(
        &d.p("G.safetensors"),
        &[
            ("a", Dtype::F32, vec![2, 5, 3], g(30, 0.0)),
            ("b", Dtype::F32, vec![2, 5, 2], g(20, 3.0)),
        ],
    );
    let (p, gs) = (d.s("params.safetensors"), d.s("G.safetensors"));
    let (o, outs) = (d.s("out.safetensors"), d.s("outs.safetensors"));
    let out = optc(&[
        "run",
        "adadagrad",
        "--params",
        &p,
        "--input",
        &format!("G={gs}"),
        "--out",
        &o,
        "--outs",
        &outs,
    ]);
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("out batch = "), "{text}");
    let st_bytes = d.read("outs.safetensors");
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    let batch = st.tensor("batch").unwrap();
    assert_eq!(batch.dtype(), Dtype::F64);
    assert!(batch.shape().is_empty());
    let b = f64::from_le_bytes(batch.data().try_into().unwrap());
    assert!(
        b >= 5.0 && b == b.ceil(),
        "the batch the norm test asks for: {b}"
    );
    assert!(text.contains(&format!("out batch = {b:e}")), "{text}");
    // A sample-axis file with a per-step number of samples that differs between tensors.
    write(
        &d.p("bad.safetensors"),
        &[
            ("a", Dtype::F32, vec![2, 5, 3], g(30, 0.0)),
            ("b", Dtype::F32, vec![2, 4, 2], g(16, 3.0)),
        ],
    );
    let bad = d.s("bad.safetensors");
    fails(
        &optc(&[
            "run",
            "dp_sgd",
            "--params",
            &p,
            "--input",
            &format!("G={bad}"),
            "--out",
            &o,
        ]),
        &["samples", "holds 5 samples, but", "holds 4"],
    );
}
