//! Checkpoint metadata: hyperparameters and scalar state come back bit for bit (any finite
//! value, and infinities and NaN in scalar state), and a tampered record is refused like the
//! same value given to `set_hyper`, with nothing changed.

use optc::runtime::{Error, Inputs, Optimizer};
use std::sync::Arc;

const RULE: &str = "rule acc(lr = 0.1 in (0, 1), beta = 0.5 in [0, 1), on = true) {
    param p
    input g
    state c: scalar = 0
    c = beta * c + sum(g)
    p = if on { p - lr * g * c } else { p }
}";

fn opt() -> Optimizer<f64> {
    with_params(vec![1.0; 3])
}

fn with_params(p: Vec<f64>) -> Optimizer<f64> {
    let program = optc::compiler::compile(RULE).programs.remove(0);
    Optimizer::new(Arc::new(program), vec![vec![p]]).unwrap()
}

/// A xorshift stream of 64-bit patterns.
fn bits(seed: u64) -> impl Iterator<Item = u64> {
    let mut x = seed | 1;
    std::iter::from_fn(move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        Some(x)
    })
}

#[test]
fn hyperparameters_and_scalar_state_round_trip_bit_for_bit() {
    let mut checked = 0;
    for pattern in bits(0x9e37_79b9).take(20_000) {
        // Random mantissa and a spread of exponents: a value in (0, 1).
        let v = f64::from_bits((pattern & 0x000f_ffff_ffff_ffff) | ((1000 + pattern % 22) << 52));
        if !(v > 0.0 && v < 1.0) {
            continue;
        }
        let mut a = opt();
        a.set_hyper("lr", v).unwrap();
        a.set_hyper("beta", v).unwrap();
        let bytes = a.checkpoint_bytes().unwrap();
        let mut b = opt();
        b.load_checkpoint_bytes(&bytes).unwrap();
        assert_eq!(b.hyper("lr").unwrap().to_bits(), v.to_bits(), "lr = {v:e}");
        assert_eq!(b.hyper("beta").unwrap().to_bits(), v.to_bits());
        checked += 1;
    }
    assert!(checked > 15_000, "{checked} values checked");
    // Scalar state: a few steps make `c` an arbitrary double.
    let mut a = opt();
    a.set_hyper("lr", 0.00011584103343932075).unwrap();
    for s in 0..4 {
        let g = [0.1 * s as f64 + 1e-30, -0.3, 0.7];
        a.step(&Inputs::default().tensor("g", vec![&g])).unwrap();
    }
    // Checkpoints hold state; the params travel separately (as `optc run --out` writes them).
    let mut b = with_params(a.params(0)[0].clone());
    b.load_checkpoint_bytes(&a.checkpoint_bytes().unwrap())
        .unwrap();
    assert_eq!(
        b.scalar_state("c").unwrap().to_bits(),
        a.scalar_state("c").unwrap().to_bits()
    );
    // Resumed steps equal straight ones.
    for s in 4..8 {
        let g = [0.1 * s as f64, -0.3, 0.7];
        a.step(&Inputs::default().tensor("g", vec![&g])).unwrap();
        b.step(&Inputs::default().tensor("g", vec![&g])).unwrap();
    }
    assert_eq!(a.params(0), b.params(0));
}

#[test]
fn non_finite_scalar_state_is_saved_and_resumed() {
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let mut a = opt();
        let g = [bad, 0.0, 0.0];
        a.step(&Inputs::default().tensor("g", vec![&g])).unwrap();
        let c = a.scalar_state("c").unwrap();
        assert!(!c.is_finite());
        let mut b = opt();
        b.load_checkpoint_bytes(&a.checkpoint_bytes().unwrap())
            .unwrap();
        let r = b.scalar_state("c").unwrap();
        assert!(
            r.is_nan() == c.is_nan() && (c.is_nan() || r == c),
            "{c} came back as {r}"
        );
        assert_eq!(b.steps(), 1);
    }
}

/// A change to a checkpoint's metadata record.
type Edit = dyn Fn(&mut serde_json::Value);

/// The checkpoint with its metadata record changed by `edit`.
fn tampered(bytes: &[u8], edit: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let record = header["__metadata__"]["optc"].as_str().unwrap().to_string();
    let mut record: serde_json::Value = serde_json::from_str(&record).unwrap();
    edit(&mut record);
    header["__metadata__"]["optc"] = serde_json::Value::String(record.to_string());
    let mut text = header.to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

#[test]
fn tampered_metadata_is_refused_and_changes_nothing() {
    let mut a = opt();
    let g = [0.5, 0.25, -1.0];
    a.step(&Inputs::default().tensor("g", vec![&g])).unwrap();
    let good = a.checkpoint_bytes().unwrap();
    // The helper itself leaves a loadable checkpoint.
    let mut b = opt();
    b.load_checkpoint_bytes(&tampered(&good, |_| {})).unwrap();
    assert_eq!(b.steps(), 1);
    let cases: Vec<(Box<Edit>, &str)> = vec![
        (
            Box::new(|r| r["hyperparameters"]["beta"] = serde_json::json!(5.0)),
            "out of range",
        ),
        (
            Box::new(|r| r["hyperparameters"]["on"] = serde_json::json!(0.5)),
            "boolean",
        ),
        (
            Box::new(|r| r["hyperparameters"]["lr"] = serde_json::json!("inf")),
            "not a finite number",
        ),
        (
            Box::new(|r| r["steps"] = serde_json::json!(u64::MAX)),
            "step count",
        ),
        (
            Box::new(|r| r["schedules"]["on"] = serde_json::json!("cosine(10)")),
            "boolean",
        ),
    ];
    for (edit, needle) in cases {
        let mut c = opt();
        c.set_hyper("lr", 0.25).unwrap();
        let before = c.checkpoint_bytes().unwrap();
        let e: Error = c
            .load_checkpoint_bytes(&tampered(&good, edit))
            .expect_err("a tampered checkpoint is refused");
        assert!(
            e.to_string().contains(needle),
            "`{e}` should say `{needle}`"
        );
        assert_eq!(c.checkpoint_bytes().unwrap(), before, "nothing changed");
    }
}

/// Every tensor of a checkpoint has a checksum: any flipped byte of the tensor data, and state
/// tensors swapped between buffers, are refused; so is any edit of the record that its own
/// validation lets through (an in-range value).
#[test]
fn damaged_tensors_and_records_are_refused() {
    let adam = || {
        let p = Arc::new(optc::stdlib_rule("adam").unwrap());
        Optimizer::<f64>::new(p, vec![vec![vec![1.0; 3], vec![2.0; 2]]]).unwrap()
    };
    let mut a = adam();
    let g = ([0.5, 0.25, -1.0], [0.125, 4.0]);
    for _ in 0..2 {
        a.step(&Inputs::default().tensor("g", vec![&g.0, &g.1]))
            .unwrap();
    }
    let good = a.checkpoint_bytes().unwrap();
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut c = adam();
    let before = c.checkpoint_bytes().unwrap();
    for i in 8 + n..good.len() {
        let mut bad = good.clone();
        bad[i] ^= 0x10;
        let e = c
            .load_checkpoint_bytes(&bad)
            .expect_err("a flipped byte is refused");
        assert!(e.to_string().contains("checksum"), "byte {i}: {e}");
        assert_eq!(c.checkpoint_bytes().unwrap(), before);
    }
    // Two state tensors' names swapped in the header.
    let mut header: serde_json::Value = serde_json::from_slice(&good[8..8 + n]).unwrap();
    // Two tensors of the same shape: state.m and state.v of one param tensor.
    let names = [
        "state.m.theta[0]".to_string(),
        "state.v.theta[0]".to_string(),
    ];
    let (x, y) = (header[&names[0]].clone(), header[&names[1]].clone());
    header[&names[0]] = y;
    header[&names[1]] = x;
    let mut text = header.to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut swapped = (text.len() as u64).to_le_bytes().to_vec();
    swapped.extend_from_slice(&text);
    swapped.extend_from_slice(&good[8 + n..]);
    let e = c.load_checkpoint_bytes(&swapped).unwrap_err();
    assert!(e.to_string().contains("checksum"), "{e}");
    // An in-range edit of the record.
    let edited = tampered(&good, |r| {
        r["hyperparameters"]["lr"] = serde_json::json!(0.5)
    });
    let e = c.load_checkpoint_bytes(&edited).unwrap_err();
    assert!(e.to_string().contains("checksum"), "{e}");
    assert_eq!(c.checkpoint_bytes().unwrap(), before);
    c.load_checkpoint_bytes(&good).unwrap();
}

/// A rule whose declared ranges changed has another program hash.
#[test]
fn declared_ranges_are_part_of_the_program_hash() {
    use optc::runtime::checkpoint::program_hash;
    let hash = |range: &str| {
        let src = format!(
            "rule r(lr = 0.1 {range}) {{ param theta\n input g\n theta = theta - lr * g }}"
        );
        program_hash(&optc::compile(&src).programs.remove(0))
    };
    assert_ne!(hash("in [0, 1]"), hash("in [0, 2]"));
    assert_ne!(hash(""), hash("in [0, 1]"));
}
