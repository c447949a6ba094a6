//! Checkpoints: a resumed run is bit-identical to one that never stopped; an interrupted save
//! leaves the previous checkpoint loadable; a checkpoint of another rule, other tensors, or a
//! corrupt file is refused with a clear error and changes nothing.

use optc::runtime::checkpoint::FailPoint;
use optc::runtime::{Backend, Error, Inputs, Optimizer};
use std::sync::Arc;

mod common;
use common::fill_grid;

fn sizes(rule: &str) -> Vec<Vec<usize>> {
    match rule {
        "penalty_bilevel" => vec![vec![3, 5], vec![4], vec![4]],
        _ => vec![vec![7, 1, 33]],
    }
}

fn new_opt(rule: &str, params: Vec<Vec<Vec<f32>>>, backend: Backend) -> Optimizer<f32> {
    let p = optc::stdlib_rule(rule).unwrap();
    let mut o = Optimizer::new(Arc::new(p), params)
        .unwrap()
        .with_backend(backend)
        .unwrap();
    if rule == "adan" {
        o.set_hyper("max_grad_norm", 0.8).unwrap();
    }
    o
}

fn step(o: &mut Optimizer<f32>, s: u64) {
    let info = o.program().info.clone();
    let data: Vec<(String, Vec<Vec<f32>>)> = info
        .buffers
        .iter()
        .filter(|b| b.role == optc::compiler::ir::BufRole::Input)
        .map(|b| {
            (
                b.name.clone(),
                o.params(b.space as usize)
                    .iter()
                    .enumerate()
                    .map(|(j, t)| fill_grid(s * 31 + j as u64 + b.name.len() as u64, t.len()))
                    .collect(),
            )
        })
        .collect();
    let mut inputs = Inputs::default();
    for (n, d) in &data {
        inputs = inputs.tensor(n, d.iter().map(|v| v.as_slice()).collect());
    }
    for n in &info.scalar_inputs {
        inputs = inputs.scalar(n, 0.1 + 0.07 * s as f64);
    }
    o.step(&inputs).unwrap();
}

fn initial(rule: &str) -> Vec<Vec<Vec<f32>>> {
    sizes(rule)
        .iter()
        .enumerate()
        .map(|(s, ts)| {
            ts.iter()
                .enumerate()
                .map(|(j, &n)| fill_grid(1000 + 10 * s as u64 + j as u64, n))
                .collect()
        })
        .collect()
}

fn all_params(o: &Optimizer<f32>) -> Vec<Vec<Vec<f32>>> {
    (0..o.program().info.spaces.len())
        .map(|s| o.params(s).to_vec())
        .collect()
}

#[test]
fn resumed_runs_are_bit_identical() {
    for rule in ["adam", "adan", "n_harpg", "penalty_bilevel", "lamb"] {
        for backend in [Backend::Interpreter, Backend::Cranelift { threads: 2 }] {
            let mut straight = new_opt(rule, initial(rule), backend);
            for s in 0..10 {
                step(&mut straight, s);
            }
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("opt.safetensors");
            let mut first = new_opt(rule, initial(rule), backend);
            for s in 0..4 {
                step(&mut first, s);
            }
            first.save_checkpoint(&path).unwrap();
            // A new process: the host brings its params, the optimizer its state.
            let mut resumed = new_opt(rule, all_params(&first), backend);
            resumed.load_checkpoint(&path).unwrap();
            assert_eq!(resumed.steps(), 4);
            for s in 4..10 {
                step(&mut resumed, s);
            }
            assert_eq!(
                all_params(&resumed),
                all_params(&straight),
                "{rule} {backend:?}: params"
            );
            assert!(
                resumed.checkpoint_bytes().unwrap() == straight.checkpoint_bytes().unwrap(),
                "{rule} {backend:?}: state differs"
            );
        }
    }
}

#[test]
fn an_interrupted_save_leaves_the_previous_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.safetensors");
    let mut o = new_opt("adan", initial("adan"), Backend::Interpreter);
    for s in 0..3 {
        step(&mut o, s);
    }
    o.save_checkpoint(&path).unwrap();
    let saved = std::fs::read(&path).unwrap();
    for s in 3..5 {
        step(&mut o, s);
    }
    for at in [FailPoint::Create, FailPoint::Write, FailPoint::Rename] {
        let e = o.save_checkpoint_failing(&path, Some(at)).unwrap_err();
        assert!(matches!(e, Error::Checkpoint(_)), "{e}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            saved,
            "{at:?}: the previous checkpoint is untouched"
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            leftovers.len(),
            1,
            "{at:?}: no temporary file left: {leftovers:?}"
        );
        let mut fresh = new_opt("adan", initial("adan"), Backend::Interpreter);
        fresh.load_checkpoint(&path).unwrap();
        assert_eq!(fresh.steps(), 3);
    }
}

fn refused(o: &mut Optimizer<f32>, bytes: &[u8], needle: &str) {
    let before = o.checkpoint_bytes().unwrap();
    let steps = o.steps();
    let e = o.load_checkpoint_bytes(bytes).unwrap_err();
    assert!(
        e.to_string().contains(needle),
        "expected `{needle}` in: {e}"
    );
    assert!(
        o.checkpoint_bytes().unwrap() == before,
        "a refused checkpoint changes nothing"
    );
    assert_eq!(o.steps(), steps);
}

#[test]
fn wrong_or_corrupt_checkpoints_are_refused() {
    let mut adam = new_opt("adam", initial("adam"), Backend::Interpreter);
    step(&mut adam, 0);
    let good = adam.checkpoint_bytes().unwrap();
    let mut adan = new_opt("adan", initial("adan"), Backend::Interpreter);
    step(&mut adan, 0);
    refused(&mut adan, &good, "rule `adam`");
    let mut other_sizes = new_opt(
        "adam",
        vec![vec![vec![0.0; 7], vec![0.0; 2], vec![0.0; 33]]],
        Backend::Interpreter,
    );
    refused(&mut other_sizes, &good, "lengths");
    let mut target = new_opt("adam", initial("adam"), Backend::Interpreter);
    step(&mut target, 5);
    refused(
        &mut target,
        &good[..good.len() / 2],
        "not a valid checkpoint",
    );
    refused(
        &mut target,
        b"not a safetensors file at all",
        "not a valid checkpoint",
    );
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped.truncate(last);
    refused(&mut target, &flipped, "not a valid checkpoint");
    // And a good one loads.
    target.load_checkpoint_bytes(&good).unwrap();
    assert!(target.checkpoint_bytes().unwrap() == good);
    let missing = target
        .load_checkpoint(std::path::Path::new("/nonexistent/ckpt.safetensors"))
        .unwrap_err();
    assert!(missing.to_string().contains("cannot read"), "{missing}");
}

#[test]
fn no_checkpoint_between_stages() {
    let mut o = new_opt("n_harpg", initial("n_harpg"), Backend::Interpreter);
    step(&mut o, 0);
    let (g, g2) = (fill_grid(1, 7), fill_grid(2, 33));
    let inputs = Inputs::default()
        .scalar("q", 0.5)
        .tensor("g", vec![&g, &g[..1], &g2]);
    o.run_stage(0, &inputs).unwrap();
    let e = o.checkpoint_bytes().unwrap_err();
    assert!(e.to_string().contains("middle of a step"), "{e}");
}

fn write_st(path: &std::path::Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    use safetensors::tensor::{Dtype, TensorView};
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| t.2.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            (
                t.0.to_string(),
                TensorView::new(Dtype::F32, t.1.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn the_cli_resumes_from_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let theta = fill_grid(3, 6);
    let grads: Vec<f32> = fill_grid(9, 30);
    write_st(&p("params.safetensors"), &[("w", vec![2, 3], theta)]);
    write_st(
        &p("g_all.safetensors"),
        &[("w", vec![5, 2, 3], grads.clone())],
    );
    write_st(
        &p("g_first.safetensors"),
        &[("w", vec![3, 2, 3], grads[..18].to_vec())],
    );
    write_st(
        &p("g_rest.safetensors"),
        &[("w", vec![2, 2, 3], grads[18..].to_vec())],
    );
    let optc = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_optc"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let s = |n: &str| p(n).to_string_lossy().into_owned();
    optc(&[
        "run",
        "adan",
        "--params",
        &s("params.safetensors"),
        "--grads",
        &s("g_all.safetensors"),
        "--set",
        "lr=0.05",
        "--out",
        &s("straight.safetensors"),
        "-q",
    ]);
    optc(&[
        "run",
        "adan",
        "--params",
        &s("params.safetensors"),
        "--grads",
        &s("g_first.safetensors"),
        "--set",
        "lr=0.05",
        "--out",
        &s("mid.safetensors"),
        "--state-out",
        &s("state.safetensors"),
        "-q",
    ]);
    optc(&[
        "run",
        "adan",
        "--params",
        &s("mid.safetensors"),
        "--grads",
        &s("g_rest.safetensors"),
        "--state-in",
        &s("state.safetensors"),
        "--out",
        &s("resumed.safetensors"),
        "-q",
    ]);
    let read = |n: &str| {
        let bytes = std::fs::read(p(n)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensor("w").unwrap().data().to_vec()
    };
    assert_eq!(read("resumed.safetensors"), read("straight.safetensors"));
}

#[test]
fn the_atomic_writer_replaces_a_file_and_leaves_no_temporary() {
    use optc::runtime::checkpoint::write_file_atomic;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.bin");
    write_file_atomic(&path, b"first").unwrap();
    write_file_atomic(&path, b"second").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"second");
    // Writers in parallel: every one finishes with a whole file and no temporary file is left.
    std::thread::scope(|s| {
        for i in 0..8u8 {
            let path = &path;
            s.spawn(move || write_file_atomic(path, &[i; 4096]).unwrap());
        }
    });
    let bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() == 4096 && bytes.iter().all(|&b| b == bytes[0]));
    // A path whose folder does not exist fails and creates nothing.
    assert!(write_file_atomic(&dir.path().join("no/such/file"), b"x").is_err());
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("out.bin")]);
}

/// The names in a folder, sorted.
fn listing(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Several files written as one transaction: a failure at any point leaves every file as it was
/// and no temporary file; a failure after the commit leaves a journal that `recover` completes.
#[test]
fn a_transaction_is_all_or_nothing() {
    use optc::runtime::checkpoint::{recover, write_files_failing};
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.bin"), dir.path().join("b.bin"));
    std::fs::write(&a, b"old a").unwrap();
    std::fs::write(&b, b"old b").unwrap();
    let files: [(&std::path::Path, &[u8]); 2] = [(&a, b"new a"), (&b, b"new b")];
    for at in [FailPoint::Create, FailPoint::Write, FailPoint::Rename] {
        assert!(write_files_failing(&files, Some(at)).is_err());
        assert_eq!(std::fs::read(&a).unwrap(), b"old a", "{at:?}");
        assert_eq!(std::fs::read(&b).unwrap(), b"old b", "{at:?}");
        assert_eq!(listing(dir.path()), ["a.bin", "b.bin"], "{at:?}");
    }
    // Committed, then interrupted between the renames: the next recover completes it.
    let e = write_files_failing(&files, Some(FailPoint::Commit)).unwrap_err();
    assert!(e.to_string().contains("committed"), "{e}");
    recover(&[&a]).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), b"new a");
    assert_eq!(std::fs::read(&b).unwrap(), b"new b");
    assert_eq!(listing(dir.path()), ["a.bin", "b.bin"]);
    // A directory as a target: refused before anything is written.
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let sub = dir.path().join("sub");
    assert!(write_files_failing(&[(&a, b"x"), (&sub, b"y")], None).is_err());
    assert!(optc::runtime::checkpoint::write_file_atomic(&sub, b"y").is_err());
    assert_eq!(std::fs::read(&a).unwrap(), b"new a");
    assert_eq!(listing(dir.path()), ["a.bin", "b.bin", "sub"]);
    assert!(listing(&sub).is_empty());
}

/// Temporary files have unique names (a user's `X.tmp` is never touched), stale ones that no
/// live writer holds are removed by the next write or `recover`, and held ones are left alone.
#[test]
fn temporary_files_are_unique_and_stale_ones_are_removed() {
    use optc::runtime::checkpoint::{recover, write_file_atomic};
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("w.safetensors.tmp"), b"user file").unwrap();
    std::fs::write(p(".w.safetensors.tmp-123-0"), b"not ours").unwrap();
    write_file_atomic(&p("w.safetensors"), b"params").unwrap();
    assert_eq!(std::fs::read(p("w.safetensors.tmp")).unwrap(), b"user file");
    // A stale temporary file (its writer died: not locked) and a held one.
    std::fs::write(p(".w.safetensors.optc-tmp-0123456789abcdef"), b"stale").unwrap();
    std::fs::write(p(".w.safetensors.optc-tmp-fedcba9876543210"), b"held").unwrap();
    let held = std::fs::File::open(p(".w.safetensors.optc-tmp-fedcba9876543210")).unwrap();
    held.lock().unwrap();
    recover(&[&p("w.safetensors")]).unwrap();
    assert_eq!(
        listing(dir.path()),
        [
            ".w.safetensors.optc-tmp-fedcba9876543210",
            ".w.safetensors.tmp-123-0",
            "w.safetensors",
            "w.safetensors.tmp"
        ]
    );
    drop(held);
    write_file_atomic(&p("w.safetensors"), b"params 2").unwrap();
    assert_eq!(
        listing(dir.path()),
        [
            ".w.safetensors.tmp-123-0",
            "w.safetensors",
            "w.safetensors.tmp"
        ]
    );
}

/// The CLI: `--params w.safetensors.tmp --out w.safetensors` reads its input intact, and `--out`
/// naming a folder fails leaving nothing behind.
#[test]
fn the_cli_never_overwrites_a_file_it_did_not_name() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    write_st(
        std::path::Path::new(&p("w.safetensors.tmp")),
        &[("w", vec![3], vec![1.0, 2.0, 3.0])],
    );
    write_st(
        std::path::Path::new(&p("g.safetensors")),
        &[("w", vec![1, 3], vec![0.5; 3])],
    );
    let input = std::fs::read(p("w.safetensors.tmp")).unwrap();
    let run = |out: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_optc"))
            .args(["run", "sgd", "--params", &p("w.safetensors.tmp"), "--grads"])
            .args([&p("g.safetensors"), "--out", out, "-q"])
            .output()
            .unwrap()
    };
    assert!(run(&p("w.safetensors")).status.success());
    assert_eq!(std::fs::read(p("w.safetensors.tmp")).unwrap(), input);
    std::fs::create_dir(p("sub.safetensors")).unwrap();
    let out = run(&p("sub.safetensors"));
    assert_eq!(out.status.code(), Some(1));
    assert!(listing(std::path::Path::new(&p("sub.safetensors"))).is_empty());
    assert_eq!(
        listing(dir.path()),
        [
            "g.safetensors",
            "sub.safetensors",
            "w.safetensors",
            "w.safetensors.tmp"
        ]
    );
}
