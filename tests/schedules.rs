//! Schedules drive hyperparameters step by step, compose, survive checkpoints, and are usable from
//! `optc run --schedule`.

use optc::runtime::{Backend, Inputs, Optimizer, Schedule};
use std::sync::Arc;

fn opt(rule: &str) -> Optimizer<f32> {
    let p = optc::stdlib_rule(rule).unwrap();
    Optimizer::new(
        Arc::new(p),
        vec![vec![(0..50).map(|i| (i as f32 * 0.3).sin()).collect()]],
    )
    .unwrap()
    .with_backend(Backend::Cranelift { threads: 1 })
    .unwrap()
}

fn grad(s: usize) -> Vec<f32> {
    (0..50).map(|i| ((i + 7 * s) as f32 * 0.21).cos()).collect()
}

#[test]
fn a_schedule_equals_setting_the_value_every_step() {
    let schedule = Schedule::parse("warmup(3, 0.1) then cosine(10, 0.05)").unwrap();
    let mut a = opt("adamw");
    a.set_hyper("lr", 0.02).unwrap();
    a.set_schedule("lr", schedule.clone()).unwrap();
    let mut b = opt("adamw");
    for s in 0..15 {
        let g = grad(s);
        a.step(&Inputs::default().tensor("g", vec![&g])).unwrap();
        b.set_hyper("lr", 0.02 * schedule.factor(s as u64 + 1))
            .unwrap();
        b.step(&Inputs::default().tensor("g", vec![&g])).unwrap();
        assert_eq!(a.effective_hyper("lr"), b.hyper("lr"));
        assert_eq!(a.params(0), b.params(0), "step {}", s + 1);
    }
    assert_eq!(a.hyper("lr"), Some(0.02), "the base value is unchanged");
}

#[test]
fn schedules_survive_checkpoints() {
    let mut straight = opt("adan");
    straight
        .set_schedule("lr", Schedule::parse("linear_decay(12)").unwrap())
        .unwrap();
    let mut first = opt("adan");
    first
        .set_schedule("lr", Schedule::parse("linear_decay(12)").unwrap())
        .unwrap();
    for s in 0..5 {
        let g = grad(s);
        straight
            .step(&Inputs::default().tensor("g", vec![&g]))
            .unwrap();
        first
            .step(&Inputs::default().tensor("g", vec![&g]))
            .unwrap();
    }
    let bytes = first.checkpoint_bytes().unwrap();
    let mut resumed = Optimizer::new(
        Arc::new(optc::stdlib_rule("adan").unwrap()),
        vec![first.params(0).to_vec()],
    )
    .unwrap();
    resumed.load_checkpoint_bytes(&bytes).unwrap();
    assert_eq!(resumed.schedules(), first.schedules());
    for s in 5..10 {
        let g = grad(s);
        straight
            .step(&Inputs::default().tensor("g", vec![&g]))
            .unwrap();
        resumed
            .step(&Inputs::default().tensor("g", vec![&g]))
            .unwrap();
    }
    assert_eq!(resumed.params(0), straight.params(0));
}

#[test]
fn booleans_and_unknown_names_cannot_be_scheduled() {
    let mut o = opt("adam");
    assert!(o.set_schedule("amsgrad", Schedule::Constant).is_err());
    assert!(o.set_schedule("learning_rate", Schedule::Constant).is_err());
}

#[test]
fn the_cli_takes_schedules() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    let write = |path: &str, name: &str, shape: Vec<usize>, data: Vec<f32>| {
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        let v =
            safetensors::tensor::TensorView::new(safetensors::tensor::Dtype::F32, shape, &bytes)
                .unwrap();
        safetensors::serialize_to_file(
            vec![(name.to_string(), v)],
            None,
            std::path::Path::new(path),
        )
        .unwrap();
    };
    write(&p("p.safetensors"), "w", vec![4], vec![1.0, -1.0, 0.5, 2.0]);
    write(&p("g.safetensors"), "w", vec![3, 4], vec![1.0; 12]);
    std::fs::write(p("norms.txt"), "1 1 1\n").unwrap();
    let run = |sched: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_optc"))
            .args([
                "run",
                "sgd",
                "--params",
                &p("p.safetensors"),
                "--grads",
                &p("g.safetensors"),
                "--set",
                "lr=0.1",
                "--schedule",
                sched,
                "--out",
                &p("out.safetensors"),
                "-q",
            ])
            .output()
            .unwrap()
    };
    let out = run("lr=linear(1, 0, 2)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(p("out.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let w: Vec<f32> = st
        .tensor("w")
        .unwrap()
        .data()
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    // Factors 0.5, 0, 0 at steps 1, 2, 3: one step of 0.05.
    assert_eq!(w, vec![0.95, -1.05, 0.45, 1.95]);
    let out = run(&format!("lr=refined({}, 0)", p("norms.txt")));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for bad in [
        "lr=sawtooth(3)",
        "amsgrad=constant",
        "lr=refined(/nonexistent, 0.1)",
        "lr",
    ] {
        let out = run(bad);
        assert_eq!(out.status.code(), Some(1), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("error") && !err.contains("panicked"),
            "{bad}: {err}"
        );
    }
}
