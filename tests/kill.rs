//! `optc run --out --state-out` killed (SIGKILL) at random points: afterwards, once the next run
//! (here: `recover`, which every `optc run` calls first) has looked at the files, the params and
//! the checkpoint are either both as they were or both fully new, and no temporary file remains.

use optc::runtime::checkpoint::{recover, write_files_failing, FailPoint};
use safetensors::tensor::{Dtype, TensorView};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const ELEMS: usize = 1 << 18;

fn write(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
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

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn p(&self, n: &str) -> PathBuf {
        self.dir.path().join(n)
    }
    fn s(&self, n: &str) -> String {
        self.p(n).to_string_lossy().into_owned()
    }
    /// The retry of a run: `--params out --state-in ck --out out --state-out ck`.
    fn command(&self) -> std::process::Command {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_optc"));
        c.args(["run", "adam", "--params", &self.s("out.safetensors")])
            .args(["--grads", &self.s("g.safetensors")])
            .args(["--state-in", &self.s("ck.safetensors")])
            .args(["--out", &self.s("out.safetensors")])
            .args(["--state-out", &self.s("ck.safetensors"), "-q"])
            .args(["--threads", "1"]);
        c
    }
    fn outputs(&self) -> Pair {
        (
            std::fs::read(self.p("out.safetensors")).unwrap(),
            std::fs::read(self.p("ck.safetensors")).unwrap(),
        )
    }
    fn restore(&self, o: &Pair) {
        std::fs::write(self.p("out.safetensors"), &o.0).unwrap();
        std::fs::write(self.p("ck.safetensors"), &o.1).unwrap();
    }
    fn listing(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

/// The bytes of the params and the checkpoint.
type Pair = (Vec<u8>, Vec<u8>);

fn setup() -> (Setup, Pair, Pair, Duration) {
    let s = Setup {
        dir: tempfile::tempdir().unwrap(),
    };
    let half = ELEMS / 2;
    let wave = |n: usize, k: f32| (0..n).map(|i| (i as f32 * k).sin()).collect::<Vec<f32>>();
    write(
        &s.p("params.safetensors"),
        &[
            ("w", vec![half], wave(half, 0.1)),
            ("b", vec![half], wave(half, 0.2)),
        ],
    );
    write(
        &s.p("g.safetensors"),
        &[
            ("w", vec![1, half], wave(half, 0.3)),
            ("b", vec![1, half], wave(half, 0.4)),
        ],
    );
    // The old outputs: a first run.
    let first = std::process::Command::new(env!("CARGO_BIN_EXE_optc"))
        .args(["run", "adam", "--params", &s.s("params.safetensors")])
        .args([
            "--grads",
            &s.s("g.safetensors"),
            "--out",
            &s.s("out.safetensors"),
        ])
        .args(["--state-out", &s.s("ck.safetensors"), "-q"])
        .status()
        .unwrap();
    assert!(first.success());
    let old = s.outputs();
    // The new outputs: the retry, uninterrupted.
    let start = Instant::now();
    assert!(s.command().status().unwrap().success());
    let took = start.elapsed();
    let new = s.outputs();
    assert_ne!(old.0, new.0);
    assert_ne!(old.1, new.1);
    (s, old, new, took)
}

const FILES: [&str; 4] = [
    "ck.safetensors",
    "g.safetensors",
    "out.safetensors",
    "params.safetensors",
];

#[test]
fn a_killed_run_leaves_all_old_or_all_new_outputs_and_no_temporary_file() {
    let (s, old, new, took) = setup();
    // A seeded xorshift: delays over the whole run (most of which is writing and syncing).
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 11) as f64 / (1u64 << 53) as f64
    };
    let (mut olds, mut news, mut pending) = (0, 0, 0);
    for i in 0..30 {
        s.restore(&old);
        let f = 0.95 * next();
        let delay = took.mul_f64(f);
        let mut child = s.command().spawn().unwrap();
        std::thread::sleep(delay);
        let _ = child.kill();
        let _ = child.wait();
        let p = [s.p("out.safetensors"), s.p("ck.safetensors")];
        if s.listing().iter().any(|n| n.ends_with(".optc-commit")) {
            pending += 1;
        }
        recover(&[&p[0], &p[1]]).unwrap();
        let now = s.outputs();
        if now == old {
            olds += 1;
        } else if now == new {
            news += 1;
        } else {
            panic!(
                "kill {i} after {delay:?}: the outputs are neither all old nor all new (params {}, checkpoint {})",
                if now.0 == new.0 { "new" } else if now.0 == old.0 { "old" } else { "neither" },
                if now.1 == new.1 { "new" } else if now.1 == old.1 { "old" } else { "neither" },
            );
        }
        assert_eq!(
            s.listing(),
            FILES,
            "kill {i} after {delay:?}: no temporary file remains"
        );
    }
    eprintln!("30 kills: {olds} all old, {news} all new ({pending} completed by recover)");
}

/// A commit interrupted between its renames (new params, old checkpoint on disk): the retry,
/// `optc run` with the same files, completes it first, so it continues from the new pair exactly
/// as a run from an uninterrupted commit does.
#[test]
fn the_next_run_completes_an_interrupted_commit() {
    let (s, old, new, _) = setup();
    s.restore(&old);
    let (o, c) = (s.p("out.safetensors"), s.p("ck.safetensors"));
    let e = write_files_failing(&[(&o, &new.0), (&c, &new.1)], Some(FailPoint::Commit));
    assert!(e.is_err());
    assert_eq!(std::fs::read(&o).unwrap(), new.0, "params renamed");
    assert_eq!(std::fs::read(&c).unwrap(), old.1, "checkpoint not yet");
    assert!(s.command().status().unwrap().success());
    let after_interrupted = s.outputs();
    s.restore(&new);
    assert!(s.command().status().unwrap().success());
    assert_eq!(after_interrupted, s.outputs());
    assert_eq!(s.listing(), FILES);
}
