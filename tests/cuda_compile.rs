//! The CUDA backend compiles: every standard-library rule's kernels (both step variants, f32 and
//! f64 buffers, 16-bit storage with both roundings) go through NVRTC down to machine code (CUBIN)
//! for sm_80 and sm_90.
//!
//! NVRTC is found as `optc_runtime::cuda::Nvrtc::load` says (`$OPTC_NVRTC_LIB`, or
//! `LD_LIBRARY_PATH`; `.ci/run` installs it from PyPI). Without it these tests print why and pass,
//! unless `OPTC_REQUIRE_NVRTC=1`, which makes its absence a failure (CI sets it).
#![cfg(feature = "cuda")]

use optc::compiler::backend::clif::Precision;
use optc::compiler::backend::cuda::{self, CudaModule, Storage, StorageMap};
use optc::runtime::cuda::{CudaError, Nvrtc, PtxCache};
use std::path::Path;
use std::process::Command;

const ARCHS: [&str; 2] = ["sm_80", "sm_90"];

/// Prints past the test harness's capture (to stderr), so CI logs show counts and skip reasons.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// NVRTC, or `None` (after printing why) when it is absent and not required.
fn nvrtc(test: &str) -> Option<Nvrtc> {
    match Nvrtc::load() {
        Ok(n) => Some(n),
        Err(e) => {
            let required = std::env::var("OPTC_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
            assert!(!required, "OPTC_REQUIRE_NVRTC=1 but {e}");
            say(&format!("SKIPPED {test}: {e}"));
            None
        }
    }
}

/// One translation unit to compile for one architecture.
struct Job<'a> {
    name: &'a str,
    m: &'a CudaModule,
    arch: &'static str,
}

fn modules() -> Vec<(String, CudaModule)> {
    let mut out = Vec::new();
    for (name, _) in optc::stdlib::RULES {
        let p = optc::stdlib_rule(name).expect("stdlib rule compiles");
        for prec in [Precision::F32, Precision::F64] {
            out.push((name.to_string(), cuda::module(&p, prec)));
        }
        // The form parameter groups use: every uniform read per tensor.
        out.push((
            format!("{name} (per-tensor uniforms)"),
            cuda::module_per_tensor(&p, Precision::F32),
        ));
        // 16-bit storage (mixed precision on the GPU): bf16 params and state rounded to nearest;
        // f16 params and bf16 state rounded stochastically.
        for (param, stochastic) in [(Storage::Bf16, false), (Storage::F16, true)] {
            let map = StorageMap::mixed(&p, param, true, stochastic);
            let m = cuda::module_stored(&p, Precision::F32, false, &map).expect("f32 program");
            out.push((format!("{name} ({param:?} storage)"), m));
        }
    }
    // Rules with an axis written out for several copies: 7 and 64 samples, 3 and 50 particles.
    for (name, copies) in [
        ("dp_sgd", [7usize, 64]),
        ("adadagrad", [7, 64]),
        ("cbo", [3, 50]),
        ("spsa_job", [3, 50]),
    ] {
        let base = optc::stdlib_rule(name).expect("stdlib rule compiles");
        for n in copies {
            let p = match optc::compiler::passes::for_samples(&base, n) {
                Some(p) => p,
                None => optc::compiler::passes::for_particles(&base, n).expect("particles"),
            };
            out.push((
                format!("{name} ({n} copies)"),
                cuda::module(&p, Precision::F32),
            ));
        }
    }
    // The programs under tests/good (random draws among them).
    let mut good: Vec<_> = std::fs::read_dir("tests/good")
        .expect("tests/good")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "opt"))
        .collect();
    good.sort();
    for path in good {
        let src = std::fs::read_to_string(&path).expect("read");
        let c = optc::compiler::compile(&src);
        for p in &c.programs {
            for prec in [Precision::F32, Precision::F64] {
                out.push((
                    format!("{} ({})", path.display(), p.info.name),
                    cuda::module(p, prec),
                ));
            }
        }
    }
    out
}

#[test]
fn every_stdlib_kernel_compiles_to_machine_code_for_sm80_and_sm90() {
    let Some(nvrtc) = nvrtc("every_stdlib_kernel_compiles") else {
        return;
    };
    let modules = modules();
    let start = std::time::Instant::now();
    let jobs: Vec<Job> = modules
        .iter()
        .flat_map(|(name, m)| ARCHS.iter().map(move |&arch| Job { name, m, arch }))
        .collect();
    // Two workers: NVRTC programs are independent.
    let results: Vec<(&Job, Result<Vec<u8>, CudaError>)> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .chunks(jobs.len().div_ceil(2))
            .map(|half| {
                s.spawn(move || {
                    half.iter()
                        .map(|j| (j, nvrtc.compile_cubin(&j.m.source, j.arch)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("worker"))
            .collect()
    });
    let mut failures = Vec::new();
    let mut per_arch = [0usize; 2];
    for (j, r) in &results {
        let (what, arch) = (format!("{} ({})", j.name, j.m.precision.suffix()), j.arch);
        match r {
            Ok(cubin) => {
                assert_eq!(
                    &cubin[..4],
                    b"\x7fELF",
                    "{what} {arch}: CUBIN is an ELF file"
                );
                // Every kernel is in the machine code under its name.
                for k in &j.m.kernels {
                    assert!(
                        contains(cubin, k.name.as_bytes()),
                        "{what}: {} missing from the {arch} CUBIN",
                        k.name
                    );
                }
                per_arch[ARCHS.iter().position(|&a| a == arch).expect("arch")] += j.m.kernels.len();
            }
            Err(e) => failures.push(format!("{what} for {arch}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} compilations failed:\n{}",
        failures.len(),
        results.len(),
        failures.join("\n\n")
    );
    let (major, minor) = nvrtc.version();
    say(&format!(
        "NVRTC {major}.{minor}: compiled {} kernels to sm_80 CUBIN and {} to sm_90 CUBIN \
         ({} rules, f32 and f64, both step variants, the per-tensor-uniform form for groups, \
         bf16 and f16 storage; {} translation units) in {:.1} s",
        per_arch[0],
        per_arch[1],
        optc::stdlib::RULES.len(),
        results.len(),
        start.elapsed().as_secs_f64()
    ));
    assert!(per_arch[0] > 0 && per_arch[0] == per_arch[1]);
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn ptx_has_every_entry_and_is_cached_on_disk() {
    let Some(nvrtc) = nvrtc("ptx_has_every_entry_and_is_cached_on_disk") else {
        return;
    };
    let p = optc::stdlib_rule("lamb").expect("lamb");
    let m = cuda::module(&p, Precision::F32);
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = PtxCache::in_dir(dir.path().join("ptx"));
    let first = nvrtc
        .compile_ptx_cached(&m.source, "sm_90", &cache)
        .expect("compiles");
    assert!(!first.cached);
    assert!(
        first.text.contains(".target sm_90"),
        "{}",
        &first.text[..400]
    );
    for k in &m.kernels {
        assert!(
            first.text.contains(&format!(".entry {}(", k.name)),
            "{} is not an entry",
            k.name
        );
    }
    // No fused multiply-add: the source is compiled with --fmad=false.
    assert!(
        !first.text.contains("fma.rn.f32"),
        "PTX contracts a * b + c"
    );
    let second = nvrtc
        .compile_ptx_cached(&m.source, "sm_90", &cache)
        .expect("cached");
    assert!(second.cached);
    assert_eq!(first.text, second.text);
    let files: Vec<_> = std::fs::read_dir(dir.path().join("ptx"))
        .expect("cache dir")
        .collect();
    assert_eq!(files.len(), 1, "one cache entry");
    // Another architecture is another entry.
    let other = nvrtc
        .compile_ptx_cached(&m.source, "sm_80", &cache)
        .expect("compiles");
    assert!(!other.cached && other.text.contains(".target sm_80"));
}

#[test]
fn nvrtc_errors_carry_the_log() {
    let Some(nvrtc) = nvrtc("nvrtc_errors_carry_the_log") else {
        return;
    };
    let e = nvrtc
        .compile_cubin(
            "extern \"C\" __global__ void k() { undefined_name(); }",
            "sm_90",
        )
        .expect_err("does not compile");
    match &e {
        CudaError::Compile { arch, log, .. } => {
            assert_eq!(arch, "sm_90");
            assert!(log.contains("undefined_name"), "{log}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(e.to_string().contains("undefined_name"));
    assert_eq!(
        nvrtc.compile_ptx("", "gfx90a"),
        Err(CudaError::Arch("gfx90a".to_string()))
    );
}

#[test]
fn a_bogus_library_path_is_a_typed_error() {
    // A missing file, and a file that is not a shared library.
    for path in [
        "/nonexistent/libnvrtc.so.13",
        concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
    ] {
        match Nvrtc::load_from(Some(Path::new(path))) {
            Err(CudaError::NvrtcMissing(why)) => assert!(why.contains(path), "{why}"),
            other => panic!("{path}: expected NvrtcMissing, got {other:?}"),
        }
    }
}

#[test]
fn the_cli_reports_a_missing_nvrtc_without_panicking() {
    let out = Command::new(env!("CARGO_BIN_EXE_optc"))
        .args(["compile", "adam", "--emit", "ptx", "--arch", "sm_90"])
        .env("OPTC_NVRTC_LIB", "/nonexistent/libnvrtc.so.13")
        .env(
            "OPTC_CACHE_DIR",
            std::env::temp_dir().join("optc-cli-ptx-cache"),
        )
        .output()
        .expect("optc runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("NVRTC is not available"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // With no library path at all the command either finds a system NVRTC or says it has none.
    let out = Command::new(env!("CARGO_BIN_EXE_optc"))
        .args(["compile", "sgd", "--emit", "ptx"])
        .env_remove("OPTC_NVRTC_LIB")
        .env("LD_LIBRARY_PATH", "")
        .env(
            "OPTC_CACHE_DIR",
            std::env::temp_dir().join("optc-cli-ptx-cache"),
        )
        .output()
        .expect("optc runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    match out.status.code() {
        Some(0) => assert!(String::from_utf8_lossy(&out.stdout).contains(".entry optc_")),
        Some(1) => assert!(stderr.contains("NVRTC is not available"), "{stderr}"),
        other => panic!("exit {other:?}: {stderr}"),
    }
}

#[test]
fn the_cli_prints_ptx() {
    if nvrtc("the_cli_prints_ptx").is_none() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_optc"))
        .args(["compile", "adan", "--emit", "ptx", "--arch", "sm_80"])
        .env("OPTC_CACHE_DIR", dir.path())
        .output()
        .expect("optc runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(".target sm_80") && stdout.contains(".entry optc_later_s0_p0_k0_f32("));
    let out = Command::new(env!("CARGO_BIN_EXE_optc"))
        .args(["compile", "adan", "--emit", "ptx", "--arch", "sm9"])
        .env("OPTC_CACHE_DIR", dir.path())
        .output()
        .expect("optc runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad GPU architecture `sm9`"));
}
