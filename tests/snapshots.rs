//! Snapshot tests (insta): every standard-library rule at every compiler stage (AST, IR after each
//! pass, kernels, Cranelift IR, CUDA C), and the rendered
//! diagnostics of every program under tests/bad (uncolored). Programs under tests/good snapshot
//! their kernels. Review changes with `cargo insta review` or `INSTA_UPDATE=always cargo test`.

use optc::compiler::{compile, compile_with, print};

fn stage_dumps(src: &str) -> (String, String, String) {
    let (file, diags) = optc::grammar::parse(src);
    assert!(diags.is_empty(), "{diags:?}");
    let ast = format!("{:#?}", file.expect("ast"));
    let mut ir = String::new();
    let c = compile_with(src, &mut |pass, p| {
        let body = if pass == "phases" || pass == "hoist" {
            print::kernels(p)
        } else {
            print::graph(p)
        };
        ir.push_str(&format!("== after {pass} ==\n{body}"));
    });
    assert!(!c.has_errors());
    let p = &c.programs[0];
    (
        ast,
        ir,
        format!("{}{}", print::interface(p), print::kernels(p)),
    )
}

#[test]
fn stdlib_at_every_stage() {
    for (name, src) in optc::stdlib::RULES {
        let (ast, ir, kernels) = stage_dumps(src);
        insta::assert_snapshot!(format!("stdlib_{name}_ast"), ast);
        insta::assert_snapshot!(format!("stdlib_{name}_ir"), ir);
        insta::assert_snapshot!(format!("stdlib_{name}_kernels"), kernels);
        let program = optc::stdlib_rule(name).expect("compiles");
        let clif = optc::compiler::backend::clif::clif_text(
            &program,
            optc::compiler::backend::clif::Precision::F32,
        );
        insta::assert_snapshot!(format!("stdlib_{name}_clif"), clif);
        let cuda = optc::compiler::backend::cuda::cuda_text(
            &program,
            optc::compiler::backend::clif::Precision::F32,
        );
        insta::assert_snapshot!(format!("stdlib_{name}_cuda"), cuda);
    }
}

/// 16-bit storage in the CUDA C: bf16 params and state rounded stochastically (adam), f16 params
/// rounded to nearest with f32 state (adan), as `optc compile --emit cuda --storage` prints them.
#[test]
fn cuda_with_16_bit_storage() {
    use optc::compiler::backend::cuda::{module_stored, Storage, StorageMap};
    let f32 = optc::compiler::backend::clif::Precision::F32;
    for (name, st, bf16_state, stochastic) in [
        ("adam", Storage::Bf16, true, true),
        ("adan", Storage::F16, false, false),
    ] {
        let p = optc::stdlib_rule(name).expect("compiles");
        let m = module_stored(
            &p,
            f32,
            false,
            &StorageMap::mixed(&p, st, bf16_state, stochastic),
        )
        .expect("f32 program");
        insta::assert_snapshot!(
            format!("stdlib_{name}_cuda_{st:?}").to_lowercase(),
            m.source
        );
    }
}

/// 16-bit storage in the Cranelift kernels: adam with bf16 params and f32 state rounded to
/// nearest (the CPU-offload pattern), and with bf16 params and state rounded stochastically.
#[test]
fn clif_with_16_bit_storage() {
    use optc::compiler::storage::{Storage, StorageMap};
    let f32 = optc::compiler::backend::clif::Precision::F32;
    let p = optc::stdlib_rule("adam").expect("compiles");
    for (tag, bf16_state, stochastic) in [("bf16", false, false), ("bf16_stochastic", true, true)] {
        let map = StorageMap::mixed(&p, Storage::Bf16, bf16_state, stochastic);
        let clif =
            optc::compiler::backend::clif::clif_text_stored(&p, f32, &map).expect("f32 program");
        insta::assert_snapshot!(format!("stdlib_adam_clif_{tag}"), clif);
    }
}

/// The native engine's C (`optc compile --emit c`): every stdlib rule in f32 (kernels with and
/// without reductions, random draws), adam in f64, and adam with bf16 params and state rounded
/// stochastically; and the stream kernel of `optc bench`'s access-pattern ceiling.
#[test]
fn c_for_the_native_engine() {
    use optc::compiler::backend::c;
    use optc::compiler::backend::clif::Precision;
    use optc::compiler::storage::{Storage, StorageMap};
    let native = StorageMap::default();
    for (name, _) in optc::stdlib::RULES {
        let p = optc::stdlib_rule(name).expect("compiles");
        let m = c::module(&p, Precision::F32, &native).expect("f32 module");
        insta::assert_snapshot!(format!("stdlib_{name}_c"), m.source);
    }
    let adam = optc::stdlib_rule("adam").expect("compiles");
    let m = c::module(&adam, Precision::F64, &native).expect("f64 module");
    insta::assert_snapshot!("stdlib_adam_c_f64", m.source);
    let map = StorageMap::mixed(&adam, Storage::Bf16, true, true);
    let m = c::module(&adam, Precision::F32, &map).expect("bf16 module");
    insta::assert_snapshot!("stdlib_adam_c_bf16_stochastic", m.source);
    insta::assert_snapshot!(
        "stream_kernel",
        format!(
            "{}\n{}",
            c::stream_kernel(&[4, 2], &[4, 2], &[4]),
            c::stream_kernel(&[4, 4], &[], &[])
        )
    );
}

#[test]
fn stdlib_rules_have_no_warnings_but_the_documented_ones() {
    for (name, src) in optc::stdlib::RULES {
        let c = compile(src);
        let codes: Vec<&str> = c.diagnostics.iter().map(|d| d.code).collect();
        // clip_global_norm writes the clipped gradient as an output and leaves its param alone.
        let allowed: &[&str] = if *name == "clip_global_norm" {
            &["W0002"]
        } else {
            &[]
        };
        assert!(
            codes.iter().all(|c| allowed.contains(c)),
            "{name}: {codes:?}"
        );
    }
}

#[test]
fn bad_programs_report_diagnostics() {
    insta::glob!("bad/*.opt", |path| {
        let src = std::fs::read_to_string(path).expect("read");
        let c = compile(&src);
        assert!(c.has_errors(), "{} must not compile", path.display());
        let name = format!("tests/bad/{}", path.file_name().unwrap().to_string_lossy());
        insta::assert_snapshot!(optc::render(&c.diagnostics, &src, &name, false));
    });
}

#[test]
fn good_programs_compile_to_these_kernels() {
    insta::glob!("good/*.opt", |path| {
        let src = std::fs::read_to_string(path).expect("read");
        let c = compile(&src);
        let name = format!("tests/good/{}", path.file_name().unwrap().to_string_lossy());
        assert!(
            !c.has_errors(),
            "{}",
            optc::render(&c.diagnostics, &src, &name, false)
        );
        let mut out = optc::render(&c.diagnostics, &src, &name, false);
        for p in &c.programs {
            out.push_str(&print::interface(p));
            out.push_str(&print::kernels(p));
        }
        insta::assert_snapshot!(out);
    });
}

/// `optc compile --set ... --non-finite ...` prints the program the runtime runs: the same text as
/// the active program of an optimizer with those values and that policy, at every `--emit` that
/// prints a program (kernels for each case, Cranelift IR and CUDA C for the first).
#[test]
fn compile_prints_the_program_the_runtime_runs() {
    use optc::compiler::backend::{clif, cuda};
    use optc::runtime::{Inputs, NonFinite, Optimizer};
    type Case<'a> = (
        &'a str,
        &'a [&'a str],
        &'a [(&'a str, f64)],
        NonFinite,
        bool,
    );
    let cases: &[Case<'_>] = &[
        (
            "adam",
            &["--set", "amsgrad=true"],
            &[("amsgrad", 1.0)],
            NonFinite::Proceed,
            true,
        ),
        (
            "adan",
            &["--non-finite", "skip"],
            &[],
            NonFinite::Skip,
            true,
        ),
        ("adam", &[], &[], NonFinite::Proceed, false),
        (
            "adan",
            &["--set", "max_grad_norm=1", "--non-finite", "error"],
            &[("max_grad_norm", 1.0)],
            NonFinite::Error,
            false,
        ),
    ];
    let optc = |rule: &str, emit: &str, args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_optc"))
            .args(["compile", rule, "--emit", emit])
            .args(args)
            .output()
            .expect("run optc");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    };
    for (i, &(rule, args, values, policy, snapshot)) in cases.iter().enumerate() {
        let program = optc::stdlib_rule(rule).expect("compiles");
        let mut opt = Optimizer::<f32>::new(std::sync::Arc::new(program), vec![vec![vec![0.5; 8]]])
            .expect("bind")
            .with_non_finite(policy)
            .expect("policy");
        for &(name, v) in values {
            opt.set_hyper(name, v).expect("value");
        }
        // A step makes the values' specialization the active one.
        let g = [0.25f32; 8];
        opt.step(&Inputs::default().tensor("g", vec![&g]))
            .expect("step");
        let runs = opt.active_program();
        let kernels = optc(rule, "kernels", args);
        assert_eq!(
            kernels,
            format!("{}{}", print::interface(runs), print::kernels(runs)),
            "{rule} {args:?}"
        );
        if snapshot {
            let name = format!("cli_compile_{rule}_{}_kernels", args.join("_"))
                .replace("--", "")
                .replace(['=', '-'], "_");
            insta::assert_snapshot!(name, kernels);
        }
        if i == 0 {
            assert_eq!(
                optc(rule, "clif", args),
                clif::clif_text(runs, clif::Precision::F32)
            );
            assert_eq!(
                optc(rule, "cuda", args),
                cuda::cuda_text(runs, clif::Precision::F32)
            );
        }
    }
}
