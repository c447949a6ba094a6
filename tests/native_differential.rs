//! The native backend (kernels as C built by the system C compiler) against the Cranelift
//! backend, bit for bit, and against the reference interpreter: every standard-library rule,
//! default and all-options hyperparameters, awkward sizes (0, 1, vector widths ± 1, the task
//! size ± 1, many small tensors), f32, f64 and 16-bit storage (bf16 and f16, to nearest and
//! stochastically); bit-identical for any number of threads; the library cache refuses a
//! corrupt or foreign entry.
//!
//! Without a working C compiler the tests print why and pass, unless `OPTC_REQUIRE_CC=1`.

use optc::compiler::backend::clif::Precision;
use optc::compiler::ir::{BufRole, Program};
use optc::compiler::storage::{Storage, StorageMap};
use optc::runtime::engine::native::{self, NativeCache, Toolchain};
use optc::runtime::mixed::{bf16, f16, MixedOptimizer, MixedOptions, Rounding};
use optc::runtime::{Backend, Inputs, Optimizer, TensorSpec};
use std::sync::Arc;

mod common;
use common::{fill, input_data, ulps, OPTIONS};

/// Prints past the test harness's capture (to stderr).
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

/// Vector widths (4, 8, 16 f32 lanes) ± 1 and the task size (16384) ± 1.
const SIZES: &[usize] = &[
    0, 1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 127, 128, 129, 1023, 4097, 16383, 16385,
];
const STEPS: usize = 3;

/// Many small tensors (batched several to a kernel call).
fn small_sizes() -> Vec<usize> {
    (0..300).map(|j| (j * 7 + 3) % 10).collect()
}

/// Whether the native backend can run here; otherwise why not (a failure with
/// `OPTC_REQUIRE_CC=1`).
fn have_cc() -> bool {
    match Toolchain::find() {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var("OPTC_REQUIRE_CC").as_deref() != Ok("1"),
                "OPTC_REQUIRE_CC=1 but {e}"
            );
            say!("skipped: {e}");
            false
        }
    }
}

struct Run<T> {
    params: Vec<Vec<Vec<T>>>,
    state: Vec<(String, Vec<Vec<T>>)>,
}

trait Elem: optc::compiler::ops::Float + Default {
    fn from32(x: f32) -> Self;
    fn bits(self) -> u64;
    fn is_nan(self) -> bool;
}
impl Elem for f32 {
    fn from32(x: f32) -> Self {
        x
    }
    fn bits(self) -> u64 {
        u64::from(self.to_bits())
    }
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
}
impl Elem for f64 {
    fn from32(x: f32) -> Self {
        f64::from(x)
    }
    fn bits(self) -> u64 {
        self.to_bits()
    }
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
}

/// `steps` steps of a rule on a backend; every tensor of every space has the sizes given.
fn run<T: Elem>(
    program: &Program,
    sizes: &[usize],
    backend: Backend,
    hypers: &[(&str, f64)],
    steps: usize,
) -> Run<T> {
    let info = &program.info;
    let conv = |v: Vec<f32>| v.into_iter().map(T::from32).collect::<Vec<T>>();
    let params: Vec<Vec<Vec<T>>> = (0..info.spaces.len())
        .map(|s| {
            sizes
                .iter()
                .enumerate()
                .map(|(j, &n)| conv(fill(1000 * s as u64 + j as u64, n)))
                .collect()
        })
        .collect();
    let mut opt = Optimizer::new(Arc::new(program.clone()), params)
        .expect("bind")
        .with_backend(backend)
        .expect("backend");
    for (h, v) in hypers {
        if info.hyper(h).is_some() {
            opt.set_hyper(h, *v).expect("hyper");
        }
    }
    for step in 0..steps {
        let data: Vec<(String, Vec<Vec<T>>)> = input_data(info, sizes, step)
            .into_iter()
            .map(|(n, ts)| (n, ts.into_iter().map(&conv).collect()))
            .collect();
        let mut inputs = Inputs::default();
        for (n, d) in &data {
            inputs = inputs.tensor(n, d.iter().map(|v| v.as_slice()).collect());
        }
        for s in &info.scalar_inputs {
            inputs = inputs.scalar(s, common::scalar_input(step as f64, steps as f64));
        }
        opt.step(&inputs).expect("step");
    }
    let state = info
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
    Run {
        params: (0..info.spaces.len())
            .map(|s| opt.params(s).to_vec())
            .collect(),
        state,
    }
}

/// The first element where two runs differ in their bits (NaNs equal; +0 and -0 differ).
fn same_bits<T: Elem>(what: &str, a: &Run<T>, b: &Run<T>) -> Result<(), String> {
    let all = |r: &Run<T>| -> Vec<(String, Vec<Vec<T>>)> {
        let mut v: Vec<(String, Vec<Vec<T>>)> = r
            .params
            .iter()
            .enumerate()
            .map(|(s, p)| (format!("param {s}"), p.clone()))
            .collect();
        v.extend(r.state.iter().cloned());
        v
    };
    for ((an, ad), (_, bd)) in all(a).iter().zip(&all(b)) {
        for (j, (x, y)) in ad.iter().zip(bd).enumerate() {
            assert_eq!(x.len(), y.len());
            for (e, (&u, &v)) in x.iter().zip(y).enumerate() {
                if u.bits() != v.bits() && !(u.is_nan() && v.is_nan()) {
                    return Err(format!(
                        "{what}: {an}, tensor {j} (size {}), element {e}: {u:?} vs {v:?}",
                        x.len()
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Whether a rule's kernels use a function the backends approximate differently (within 2 ulp).
fn transcendental(name: &str) -> bool {
    let src = optc::stdlib::source(name).unwrap_or_default();
    ["exp(", "log(", "sigmoid(", "tanh(", "log1p(", "expm1("]
        .iter()
        .any(|f| src.contains(f))
}

/// Within `max_ulps` of the interpreter (as tests/jit_differential.rs measures it).
fn near(name: &str, a: &Run<f32>, b: &Run<f32>, max_ulps: u64) -> Result<(), String> {
    for ((an, ad), (_, bd)) in a.state.iter().zip(&b.state) {
        for (j, (x, y)) in ad.iter().zip(bd).enumerate() {
            let scale = if transcendental(name) {
                x.iter().fold(0f32, |m, v| m.max(v.abs()))
            } else {
                0.0
            };
            for (e, (&u, &v)) in x.iter().zip(y).enumerate() {
                let d = ulps(u, v);
                if d > max_ulps && (u - v).abs() > max_ulps as f32 * f32::EPSILON * scale {
                    return Err(format!(
                        "{name}: {an}, tensor {j} (size {}), element {e}: interpreter {u:e}, native {v:e} ({d} ulps)",
                        x.len()
                    ));
                }
            }
        }
    }
    Ok(())
}

#[test]
fn every_stdlib_rule_matches_cranelift_bit_for_bit_and_the_interpreter() {
    if !have_cc() {
        return;
    }
    let mut failures = Vec::new();
    let mut checked = 0;
    let small = small_sizes();
    for name in optc::stdlib::names() {
        let program = optc::stdlib_rule(name).expect("stdlib rule");
        for hypers in [&[][..], OPTIONS] {
            for sizes in [SIZES, &small[..]] {
                let nat: Run<f32> = run(
                    &program,
                    sizes,
                    Backend::Native { threads: 2 },
                    hypers,
                    STEPS,
                );
                let jit = run(
                    &program,
                    sizes,
                    Backend::Cranelift { threads: 2 },
                    hypers,
                    STEPS,
                );
                let what = format!("{name} {hypers:?} ({} tensors)", sizes.len());
                if let Err(e) = same_bits(&what, &jit, &nat) {
                    failures.push(format!("against cranelift: {e}"));
                }
                let reference = run(&program, sizes, Backend::Interpreter, hypers, STEPS);
                if let Err(e) = near(name, &reference, &nat, 4) {
                    failures.push(format!("against the interpreter: {e}"));
                }
                checked += 1;
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    say!("native: {checked} rule configurations bit for bit with cranelift, within 4 ulps of the interpreter");
}

#[test]
fn results_are_bit_identical_for_any_thread_count() {
    if !have_cc() {
        return;
    }
    let sizes = [100_000, 3, 50_001, 0, 16_384, 16_385];
    for name in ["adan", "lamb", "n_harpg", "clip_global_norm", "adam"] {
        let program = optc::stdlib_rule(name).expect("stdlib rule");
        let runs: Vec<Run<f32>> = [1, 2, 3]
            .iter()
            .map(|&t| run(&program, &sizes, Backend::Native { threads: t }, OPTIONS, 3))
            .collect();
        for (i, r) in runs.iter().enumerate().skip(1) {
            same_bits(&format!("{name}: 1 vs {} threads", i + 1), &runs[0], r).unwrap();
        }
        let jit = run(
            &program,
            &sizes,
            Backend::Cranelift { threads: 3 },
            OPTIONS,
            3,
        );
        same_bits(&format!("{name}: cranelift"), &jit, &runs[0]).unwrap();
    }
}

#[test]
fn f64_buffers_match_cranelift_and_the_interpreter() {
    if !have_cc() {
        return;
    }
    let mut checked = 0;
    for name in optc::stdlib::names() {
        let program = optc::stdlib_rule(name).expect("stdlib rule");
        for hypers in [&[][..], OPTIONS] {
            let nat: Run<f64> = run(&program, SIZES, Backend::Native { threads: 2 }, hypers, 3);
            let jit: Run<f64> = run(
                &program,
                SIZES,
                Backend::Cranelift { threads: 2 },
                hypers,
                3,
            );
            same_bits(&format!("{name} f64 {hypers:?}"), &jit, &nat).unwrap();
            let reference: Run<f64> = run(&program, SIZES, Backend::Interpreter, hypers, 3);
            // Reductions add up in another order: within 1e-12 of the tensor's scale.
            for (xs, ys) in reference
                .params
                .iter()
                .flatten()
                .zip(nat.params.iter().flatten())
            {
                let scale = xs.iter().fold(1e-300f64, |m, v| m.max(v.abs()));
                for (x, y) in xs.iter().zip(ys) {
                    assert!(
                        (x - y).abs() <= 1e-12 * scale || (x.is_nan() && y.is_nan()),
                        "{name}: {x} vs {y}"
                    );
                }
            }
            checked += 1;
        }
    }
    say!("native f64: {checked} rule configurations bit for bit with cranelift");
}

/// A mixed-precision run: the params' bits, the state's bits, whether it was fused.
type Mixed = (Vec<Vec<Vec<u16>>>, Vec<Vec<Vec<u32>>>, bool);

/// 16-bit params (and state) through `MixedOptimizer`, lent in place.
fn mixed<S: optc::runtime::mixed::Storage>(
    p: &Program,
    sizes: &[usize],
    options: MixedOptions,
    hypers: &[(&str, f64)],
    backend: Backend,
) -> Mixed {
    let info = &p.info;
    let specs: Vec<Vec<TensorSpec>> = (0..info.spaces.len())
        .map(|s| {
            sizes
                .iter()
                .enumerate()
                .map(|(j, &n)| TensorSpec::new(format!("s{s}.t{j}"), &[n]))
                .collect()
        })
        .collect();
    let mut opt = MixedOptimizer::<S>::new(Arc::new(p.clone()), specs, options)
        .expect("mixed")
        .with_backend(backend)
        .expect("backend");
    for (h, v) in hypers {
        if info.hyper(h).is_some() {
            opt.inner_mut().set_hyper(h, *v).expect("hyper");
        }
    }
    let mut params: Vec<Vec<Vec<S>>> = (0..info.spaces.len())
        .map(|s| {
            sizes
                .iter()
                .enumerate()
                .map(|(j, &n)| {
                    fill(1000 * s as u64 + j as u64, n)
                        .into_iter()
                        .map(S::nearest)
                        .collect()
                })
                .collect()
        })
        .collect();
    for step in 0..STEPS {
        let data = input_data(info, sizes, step);
        let mut inputs = Inputs::default();
        for (n, d) in &data {
            inputs = inputs.tensor(n, d.iter().map(Vec::as_slice).collect());
        }
        for sc in &info.scalar_inputs {
            inputs = inputs.scalar(sc, common::scalar_input(step as f64, STEPS as f64));
        }
        let mut lend: Vec<Vec<&mut [S]>> = params
            .iter_mut()
            .map(|ts| ts.iter_mut().map(Vec::as_mut_slice).collect())
            .collect();
        opt.step_with(&mut lend, &inputs).expect("step");
    }
    let bits = params
        .iter()
        .map(|ts| {
            ts.iter()
                .map(|t| S::bits_mut(&mut t.clone()).expect("16-bit").to_vec())
                .collect()
        })
        .collect();
    let state = info
        .buffers
        .iter()
        .filter(|bi| matches!(bi.role, BufRole::State | BufRole::Output))
        .map(|bi| {
            opt.state(&bi.name)
                .expect("buffer")
                .iter()
                .map(|t| t.iter().map(|x| x.to_bits()).collect())
                .collect()
        })
        .collect();
    (bits, state, opt.is_fused())
}

#[test]
fn sixteen_bit_storage_matches_cranelift_bit_for_bit() {
    if !have_cc() {
        return;
    }
    let sizes: Vec<usize> = SIZES.to_vec();
    let (mut compared, mut fused) = (0, 0);
    for name in optc::stdlib::names() {
        let p = optc::stdlib_rule(name).expect("stdlib rule");
        if has_sample_axis(&p) {
            continue; // 16-bit storage refuses a sample axis (tests/sample_axis.rs)
        }
        for (param, bf16_state, stochastic, master_weights) in [
            (Storage::Bf16, false, false, false),
            (Storage::Bf16, true, false, false),
            (Storage::Bf16, false, true, false),
            (Storage::Bf16, true, true, false),
            (Storage::F16, false, false, false),
            (Storage::F16, false, true, false),
            (Storage::Bf16, false, true, true),
        ] {
            let options = MixedOptions {
                master_weights,
                bf16_state,
                rounding: if stochastic {
                    Rounding::Stochastic { seed: 0x5eed_0123 }
                } else {
                    Rounding::Nearest
                },
            };
            for hypers in [&[][..], OPTIONS] {
                let one = |backend| match param {
                    Storage::Bf16 => mixed::<bf16>(&p, &sizes, options, hypers, backend),
                    _ => mixed::<f16>(&p, &sizes, options, hypers, backend),
                };
                let nat = one(Backend::Native { threads: 2 });
                let jit = one(Backend::Cranelift { threads: 2 });
                assert_eq!(nat.2, jit.2, "{name}: fused on one backend only");
                assert!(
                    nat.0 == jit.0,
                    "{name} {param:?} {options:?} {hypers:?}: params differ"
                );
                // State: bit for bit, NaN patterns aside.
                for (a, b) in nat
                    .1
                    .iter()
                    .flatten()
                    .flatten()
                    .zip(jit.1.iter().flatten().flatten())
                {
                    let (x, y) = (f32::from_bits(*a), f32::from_bits(*b));
                    assert!(
                        a == b || (x.is_nan() && y.is_nan()),
                        "{name} {param:?} {options:?} {hypers:?}: state {x:e} vs {y:e}"
                    );
                }
                compared += 1;
                fused += usize::from(nat.2);
            }
        }
    }
    say!("native 16-bit storage: {compared} runs bit for bit with cranelift ({fused} fused)");
    assert!(fused > 0);
}

#[test]
fn the_cache_refuses_a_corrupt_or_foreign_entry() {
    if !have_cc() {
        return;
    }
    let tc = Toolchain::find().expect("toolchain");
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = NativeCache::in_dir(dir.path());
    let adam = optc::stdlib_rule("adam").expect("adam");
    let sgd = optc::stdlib_rule("sgd").expect("sgd");
    let map = StorageMap::default();
    let entry = |p: &Program| {
        let m = optc::compiler::backend::c::module(p, Precision::F32, &map).expect("source");
        cache
            .path(&native::cache_key(&m.source, &tc))
            .expect("a cache folder")
    };
    let (a, s) = (entry(&adam), entry(&sgd));
    native::compile(&adam, Precision::F32, &map, &tc, &cache).expect("build adam");
    native::compile(&sgd, Precision::F32, &map, &tc, &cache).expect("build sgd");
    assert!(a.exists() && s.exists(), "both entries are cached");
    let built = std::fs::read(&a).expect("entry");
    // A corrupt entry (replaced, never written in place: the library is mapped).
    std::fs::remove_file(&a).unwrap();
    std::fs::write(&a, b"not a library").unwrap();
    let k = native::compile(&adam, Precision::F32, &map, &tc, &cache).expect("rebuilt");
    assert_eq!(k.kernels[1].len(), adam.variants[1].stages.len());
    assert_ne!(
        std::fs::read(&a).unwrap(),
        b"not a library",
        "the entry was rebuilt"
    );
    // A foreign entry: another rule's library under adam's key.
    std::fs::remove_file(&a).unwrap();
    std::fs::copy(&s, &a).unwrap();
    native::compile(&adam, Precision::F32, &map, &tc, &cache).expect("rebuilt");
    assert_eq!(
        std::fs::read(&a).unwrap().len(),
        built.len(),
        "adam's library again"
    );
    // And it still computes adam.
    let sizes = [5usize, 17];
    let nat: Run<f32> = run(&adam, &sizes, Backend::Native { threads: 1 }, &[], 2);
    let jit: Run<f32> = run(&adam, &sizes, Backend::Cranelift { threads: 1 }, &[], 2);
    same_bits("adam", &jit, &nat).unwrap();
    // No leftovers of the builds.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn optc_falls_back_to_cranelift_without_a_compiler() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_optc"))
        .args([
            "bench",
            "sgd",
            "--elems",
            "1000",
            "--steps",
            "1",
            "--backend",
            "native",
        ])
        .env("OPTC_CC", dir.path().join("no-such-cc"))
        .output()
        .expect("optc runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(
        err.lines()
            .filter(|l| l.contains("using the cranelift backend"))
            .count(),
        1,
        "{err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Cranelift"));
}

/// Whether a stdlib rule takes per-sample inputs (16-bit storage refuses those).
fn has_sample_axis(p: &optc::compiler::ir::Program) -> bool {
    p.axis_form
        .as_ref()
        .is_some_and(|(a, _)| a.info.axis == Some(optc::compiler::ir::Axis::Samples))
}

#[test]
fn the_cache_evicts_the_least_recently_used_entries() {
    if !have_cc() {
        return;
    }
    let tc = Toolchain::find().expect("toolchain");
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = NativeCache::in_dir(dir.path()).with_max_entries(2);
    let map = StorageMap::default();
    let rule = |n: &str| optc::stdlib_rule(n).expect(n);
    let entry = |p: &Program| {
        let m = optc::compiler::backend::c::module(p, Precision::F32, &map).expect("source");
        cache
            .path(&native::cache_key(&m.source, &tc))
            .expect("a cache folder")
    };
    let (adam, sgd, lion) = (rule("adam"), rule("sgd"), rule("lion"));
    let pause = || std::thread::sleep(std::time::Duration::from_millis(30));
    native::compile(&adam, Precision::F32, &map, &tc, &cache).expect("adam");
    pause();
    native::compile(&sgd, Precision::F32, &map, &tc, &cache).expect("sgd");
    pause();
    // A load from the cache marks adam used: sgd is now the least recently used.
    native::compile(&adam, Precision::F32, &map, &tc, &cache).expect("adam again");
    pause();
    native::compile(&lion, Precision::F32, &map, &tc, &cache).expect("lion");
    assert!(entry(&adam).exists(), "adam was used last but one");
    assert!(entry(&lion).exists(), "lion was just built");
    assert!(!entry(&sgd).exists(), "sgd was evicted");
    let libs = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".so"))
        .count();
    assert_eq!(libs, 2);
    // An evicted entry is rebuilt on demand.
    native::compile(&sgd, Precision::F32, &map, &tc, &cache).expect("sgd rebuilt");
    assert!(entry(&sgd).exists());
}

#[test]
fn the_cache_survives_concurrent_builds() {
    if !have_cc() {
        return;
    }
    let tc = Toolchain::find().expect("toolchain");
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = NativeCache::in_dir(dir.path());
    let map = StorageMap::default();
    let lamb = optc::stdlib_rule("lamb").expect("lamb");
    // Four threads build the same library into an empty cache at once, and two processes of
    // optc run the same rule with the same cache at the same time.
    let procs: Vec<std::process::Child> = (0..2)
        .map(|_| {
            std::process::Command::new(env!("CARGO_BIN_EXE_optc"))
                .args([
                    "bench", "lamb", "--elems", "5000", "--steps", "1", "--engine", "native",
                ])
                .env("OPTC_CACHE_DIR", dir.path())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("optc runs")
        })
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| native::compile(&lamb, Precision::F32, &map, &tc, &cache)))
            .collect();
        for h in handles {
            let k = h.join().expect("no panic").expect("built or loaded");
            assert_eq!(k.kernels[1].len(), lamb.variants[1].stages.len());
        }
    });
    for p in procs {
        let out = p.wait_with_output().expect("optc ends");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Whole entries only, and no build folders left behind.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| n.ends_with(".so") && !n.starts_with('.')),
        "{names:?}"
    );
    let m = optc::compiler::backend::c::module(&lamb, Precision::F32, &map).expect("source");
    let entry = cache.path(&native::cache_key(&m.source, &tc)).unwrap();
    assert!(entry.exists());
    // The cached library loads and computes lamb as Cranelift does.
    let sizes = [3usize, 130, 17];
    let nat: Run<f32> = run(&lamb, &sizes, Backend::Native { threads: 2 }, &[], 3);
    let jit: Run<f32> = run(&lamb, &sizes, Backend::Cranelift { threads: 2 }, &[], 3);
    same_bits("lamb", &jit, &nat).unwrap();
}

/// The access-pattern ceiling's stream kernel computes what it says, over sizes that are not a
/// multiple of its task or vector width, with f32 and bf16 streams.
#[test]
fn the_stream_kernel_computes_its_pattern() {
    if !have_cc() {
        return;
    }
    let tc = Toolchain::find().expect("toolchain");
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    for n in [0usize, 1, 15, 17, 65_536 + 3, 200_001] {
        let mut k = native::StreamKernel::new(&tc, &[4, 2], &[4, 2], &[4, 2], n).expect("built");
        assert_eq!(k.bytes(), (4 + 2 + 2 * (4 + 2) + 4 + 2) * n);
        k.run(&pool);
        let bf = |x: f32| f32::from_bits(x.to_bits() & 0xffff_0000);
        let s = 1e-3f32 + bf(1e-3);
        let want = [1e-3, bf(1e-3), 0.5 * 0.5 + s, bf(0.5 * 0.5 + s), s, bf(s)];
        for (j, w) in want.iter().enumerate() {
            let v = k.values(j).expect("stream");
            assert_eq!(v.len(), n);
            assert!(
                v.iter().all(|x| x == w),
                "n {n} stream {j}: {:?} != {w}",
                v.first()
            );
        }
        // A second pass updates the in-place streams again.
        k.run(&pool);
        let again = k.values(2).unwrap();
        assert!(again.iter().all(|&x| x == 0.5 * (0.5 * 0.5 + s) + s));
    }
    // A pass that only reads still reads (its result is not dead code): it runs and changes
    // nothing.
    let mut k = native::StreamKernel::new(&tc, &[4, 4], &[], &[], 1000).expect("built");
    k.run(&pool);
    assert!(k.values(0).unwrap().iter().all(|&x| x == 1e-3));
}

#[test]
fn bench_reports_the_access_pattern_of_each_pass() {
    if !have_cc() {
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_optc"))
        .args(["bench", "lamb", "--elems", "50000", "--steps", "2"])
        .output()
        .expect("optc runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("on Native"), "auto picks native: {text}");
    assert!(
        text.contains("2 pass(es) of a trivial kernel over 2 read, 2 in-place, 0 written, then 2 read, 1 in-place, 0 written"),
        "{text}"
    );
    assert!(text.contains("built by the C compiler"), "{text}");
    let ratio: f64 = text
        .lines()
        .find(|l| l.contains("ratio to the pattern"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|v| v.parse().ok())
        .expect("a ratio");
    assert!(ratio > 0.0 && ratio.is_finite(), "{text}");
}
