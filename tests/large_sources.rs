//! Deep, long and large sources: every one gets a diagnostic or compiles, never a stack overflow,
//! a wrapped id or minutes of work.
//!
//! - Nesting past `optc_grammar::MAX_DEPTH` (expressions, calls, `if`s, hyperparameter
//!   defaults, statement `if`s and `else if` chains) is E0004, cut while parsing, so no later
//!   walk (or `Drop`) sees a deeper tree; just under the limit, rules compile and run on a 2 MiB
//!   thread stack.
//! - A value computed by a chain longer than `MAX_VALUE_DEPTH` operations (long runs of
//!   assignments, `let` chains, `if` lines) is E0317; just under it, rules run on a 2 MiB stack.
//! - More than 65,536 hyperparameters, buffers or scalar states is E0316 at the declaration that
//!   crosses the limit (the ids are 16-bit); at the limit they work.
//! - Floods of errors are capped when rendered, and checking stays near linear.

use optc::compiler::lower::{MAX_ENTRIES, MAX_VALUE_DEPTH};
use optc::grammar::MAX_DEPTH;
use optc::runtime::{Backend, Inputs, Optimizer};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Runs `f` on a thread with a 2 MiB stack (the default of spawned threads and of the test harness).
fn on_small_stack<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(f)
        .expect("thread")
        .join()
        .expect("no stack overflow or panic")
}

fn codes(src: &str) -> Vec<&'static str> {
    optc::compile(src)
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(|d| d.code)
        .collect()
}

fn rule(body: &str) -> String {
    format!("rule r(lr = 0.001) {{ param p\n input g\n {body}\n}}")
}

/// Sources nested `n` levels deep, one per construct.
fn nested(n: usize) -> Vec<(&'static str, String)> {
    vec![
        (
            "subtraction chain",
            rule(&format!("p = p{}", " - g".repeat(n))),
        ),
        ("unary minus", rule(&format!("p = {}g", "-".repeat(n)))),
        (
            "not",
            rule(&format!(
                "p = if {}(g > 0) {{ g }} else {{ p }}",
                "!".repeat(n)
            )),
        ),
        ("power", rule(&format!("p = {}1", "g ^ ".repeat(n)))),
        (
            "and chain",
            rule(&format!(
                "p = if g > 0{} {{ g }} else {{ p }}",
                " && g > 0".repeat(n)
            )),
        ),
        (
            "abs",
            rule(&format!("p = {}g{}", "abs(".repeat(n), ")".repeat(n))),
        ),
        (
            "max",
            rule(&format!("p = {}g{}", "max(g, ".repeat(n), ")".repeat(n))),
        ),
        (
            "sum",
            rule(&format!(
                "p = p - lr * {}g{}",
                "sum(g * ".repeat(n / 2),
                ")".repeat(n / 2)
            )),
        ),
        (
            "if expression",
            rule(&format!(
                "p = {}g{}",
                "if t > 1 { g } else { ".repeat(n / 2),
                " }".repeat(n / 2)
            )),
        ),
        (
            "if statement",
            rule(&format!(
                "{}p = p - g{}",
                "if t > 1 { ".repeat(n / 2),
                " }".repeat(n / 2)
            )),
        ),
        (
            "else if",
            rule(&format!(
                "if t > 0 {{ p = p - g }}{}",
                (0..n / 2)
                    .map(|i| format!(" else if t > {i} {{ p = p - g }}"))
                    .collect::<String>()
            )),
        ),
        (
            "hyperparameter default",
            format!(
                "rule r(lr = 0.1{}) {{ param p\n input g\n p = p - lr * g }}",
                " + 0".repeat(n)
            ),
        ),
    ]
}

#[test]
fn nesting_past_the_limit_is_one_e0004_per_statement() {
    for (what, src) in nested(30_000) {
        let c = on_small_stack(move || codes(&src));
        assert_eq!(c, vec!["E0004"], "{what}");
    }
    // A million levels: parsed, cut and dropped without recursion.
    let src = rule(&format!("p = {}g", "-".repeat(1_000_000)));
    assert_eq!(on_small_stack(move || codes(&src)), vec!["E0004"]);
    // A deep tree the parser is holding when it meets a syntax error.
    let src = rule(&format!("p = p{} )", " - g".repeat(200_000)));
    let c = on_small_stack(move || codes(&src));
    assert!(c.contains(&"E0002"), "{c:?}");
    // A million parentheses still parse (they add no level).
    let n = 1_000_000;
    let src = rule(&format!("p = p - lr * {}g{}", "(".repeat(n), ")".repeat(n)));
    assert_eq!(on_small_stack(move || codes(&src)), Vec::<&str>::new());
}

/// Compiles `src` and runs two steps on the interpreter and on Cranelift, printing its kernels,
/// CLIF and CUDA C on the way; returns the params after each backend.
fn compile_and_run(src: &str) -> Vec<Vec<f32>> {
    let program = Arc::new(optc::compile_rule(src).unwrap_or_else(|e| panic!("{e}")));
    let _ = optc::compiler::print::kernels(&program);
    let _ = optc::compiler::backend::cuda::cuda_text(
        &program,
        optc::compiler::backend::clif::Precision::F32,
    );
    let _ = optc::compiler::print::graph(&program);
    let mut out = Vec::new();
    for backend in [Backend::Interpreter, Backend::Cranelift { threads: 1 }] {
        let mut opt = Optimizer::<f32>::new(program.clone(), vec![vec![vec![1.0, -2.0, 0.5]]])
            .expect("optimizer")
            .with_backend(backend)
            .expect("backend");
        for _ in 0..2 {
            let g = [0.25f32, -0.5, 1.0];
            opt.step(&Inputs::default().tensor("g", vec![&g]))
                .expect("step");
        }
        out.push(opt.params(0)[0].clone());
    }
    out
}

#[test]
fn nesting_just_under_the_limit_compiles_and_runs_on_a_small_stack() {
    for (what, src) in nested(MAX_DEPTH as usize - 8) {
        if what == "power" || what == "hyperparameter default" {
            // `g ^ g ^ ... ^ 1` overflows to inf/nan, which is fine; the default must compile.
            let c = on_small_stack(move || codes(&src));
            assert!(c.is_empty(), "{what}: {c:?}");
            continue;
        }
        let runs = on_small_stack(move || compile_and_run(&src));
        assert_eq!(runs.len(), 2, "{what}");
    }
}

#[test]
fn chains_past_the_value_depth_limit_are_e0317() {
    let n = MAX_VALUE_DEPTH as usize * 10;
    let long = [
        rule(&" p = p - lr * g\n".repeat(n)),
        rule(&format!(
            "let a0 = g\n{}\n p = p - 0.001 * a{}",
            (1..n)
                .map(|i| format!(" let a{i} = a{} + g\n", i - 1))
                .collect::<String>(),
            n - 1
        )),
        rule(
            &(0..n)
                .map(|i| format!(" if t > {i} {{ p = p - lr * g }}\n"))
                .collect::<String>(),
        ),
    ];
    for src in long {
        assert_eq!(on_small_stack(move || codes(&src)), vec!["E0317"]);
    }
    // Just under the limit: compiles, and the backends agree with the arithmetic.
    let n = MAX_VALUE_DEPTH as usize - 16;
    let src = rule(&" p = p - lr * g\n".repeat(n));
    let runs = on_small_stack(move || compile_and_run(&src));
    for r in &runs {
        let want = [1.0f32, -2.0, 0.5]
            .iter()
            .zip([0.25f32, -0.5, 1.0])
            .map(|(&p, g)| p as f64 - 2.0 * n as f64 * 0.001 * g as f64)
            .collect::<Vec<_>>();
        for (a, b) in r.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-3, "{a} vs {b}");
        }
    }
}

fn first_error(src: &str) -> optc::Diagnostic {
    optc::compile(src)
        .diagnostics
        .into_iter()
        .find(|d| d.is_error())
        .expect("an error")
}

#[test]
fn tables_past_65536_entries_are_e0316_at_the_declaration_that_crosses() {
    // Hyperparameters: at the limit `lr` is itself; one more is refused at `lr`.
    let hypers = |n: usize| {
        let hs: String = (0..n - 1).map(|i| format!("h{i} = 1, ")).collect();
        format!("rule r({hs}lr = 0.5) {{ param p\n input g\n p = p - lr * g }}")
    };
    let program = optc::compile_rule(&hypers(MAX_ENTRIES)).expect("at the limit");
    let mut opt = Optimizer::<f32>::new(Arc::new(program), vec![vec![vec![1.0]]]).unwrap();
    opt.step(&Inputs::default().tensor("g", vec![&[1.0f32][..]]))
        .unwrap();
    assert_eq!(opt.params(0)[0], vec![0.5]);
    let src = hypers(MAX_ENTRIES + 1);
    let d = first_error(&src);
    assert_eq!(d.code, "E0316");
    assert_eq!(&src[d.primary.span.start..d.primary.span.end], "lr");

    // Per-element states: p, g and the states share the buffer table.
    let states = |n: usize| {
        let decls: String = (0..n).map(|i| format!(" state s{i} = 0\n")).collect();
        format!(
            "rule r() {{ param p\n input g\n{decls} s{} = g\n p = p - 0.5 * g\n}}",
            n - 1
        )
    };
    let src = states(MAX_ENTRIES - 1);
    let d = first_error(&src);
    assert_eq!(d.code, "E0316");
    assert_eq!(
        &src[d.primary.span.start..d.primary.span.end],
        format!("s{}", MAX_ENTRIES - 2)
    );
    assert!(optc::compile_rule(&states(MAX_ENTRIES - 2)).is_ok());

    // Scalar states.
    let scalars = |n: usize| {
        let decls: String = (0..n)
            .map(|i| format!(" state s{i}: scalar = 0\n"))
            .collect();
        format!(
            "rule r() {{ param p\n input g\n{decls} s{} = s{} + 1\n p = p - 0.5 * g\n}}",
            n - 1,
            n - 1
        )
    };
    assert_eq!(first_error(&scalars(MAX_ENTRIES + 1)).code, "E0316");
    assert!(optc::compile_rule(&scalars(MAX_ENTRIES)).is_ok());

    // Many params with an input each: too many buffers, not a false E0203.
    let n = 40_000;
    let src = format!(
        "rule r() {{\n{}{}{}}}",
        (0..n).map(|i| format!(" param p{i}\n")).collect::<String>(),
        (0..n)
            .map(|i| format!(" input g{i}: p{i}\n"))
            .collect::<String>(),
        (0..n)
            .map(|i| format!(" p{i} = p{i} - 0.5 * g{i}\n"))
            .collect::<String>(),
    );
    assert_eq!(codes(&src), vec!["E0316"]);
}

#[test]
fn a_stage_has_room_for_65535_draws() {
    let draws = |n: usize| {
        let lets: String = (0..n).map(|i| format!(" let a{i} = normal()\n")).collect();
        format!("rule r() {{ param p\n input g\n{lets} p = p - 0.5 * g\n}}")
    };
    let src = draws(65_536);
    let d = first_error(&src);
    assert_eq!(d.code, "E0404");
    assert_eq!(&src[d.primary.span.start..d.primary.span.end], "normal");
    assert!(src[..d.primary.span.start].ends_with("let a65535 = "));
    assert!(optc::compile_rule(&draws(65_535)).is_ok());
}

#[test]
fn floods_of_reports_are_capped_and_checking_stays_linear() {
    let timed = |src: String| {
        let start = Instant::now();
        let c = optc::compile(&src);
        let text = optc::render(&c.diagnostics, &src, "big.opt", false);
        (c.diagnostics.len(), text, start.elapsed())
    };
    let limit = Duration::from_secs(20);
    // 30k bad characters on one line.
    let (n, text, took) = timed(rule(&format!("p = p - g {}", "# ".repeat(30_000))));
    assert_eq!(n, 30_000);
    assert!(text.ends_with(&format!(
        "{} more error(s) not shown\n",
        30_000 - optc::MAX_REPORTS
    )));
    assert_eq!(text.matches("[E0001]").count(), optc::MAX_REPORTS);
    assert!(took < limit, "{took:?}");
    // 10k duplicate hyperparameters.
    let hs = vec!["lr = 1"; 10_000].join(", ");
    let (n, text, took) = timed(format!(
        "rule r({hs}) {{ param p\n input g\n p = p - lr * g }}"
    ));
    assert_eq!(n, 9_999);
    assert!(
        text.ends_with("9949 more error(s) not shown\n"),
        "{}",
        &text[text.len() - 200..]
    );
    assert!(took < limit, "{took:?}");
    // Errors are shown before warnings.
    let unused: String = (0..100).map(|i| format!("h{i} = 1, ")).collect();
    let src = format!(
        "rule r({unused}lr = 1) {{ param p\n input g\n p = p - lr * g }}\nrule r() {{ param q }}"
    );
    let c = optc::compile(&src);
    let text = optc::render(&c.diagnostics, &src, "x.opt", false);
    assert!(text.contains("[E0102]"), "{text}");
    // 65,535 states and 30,000 params with inputs check quickly.
    let decls: String = (0..MAX_ENTRIES - 3)
        .map(|i| format!(" state s{i} = 0\n"))
        .collect();
    let (_, _, took) = timed(format!(
        "rule r() {{ param p\n input g\n{decls} p = p - 0.5 * g\n}}"
    ));
    assert!(took < limit, "{took:?}");
    let n = 30_000;
    let (_, _, took) = timed(format!(
        "rule r() {{\n{}{}{}}}",
        (0..n).map(|i| format!(" param p{i}\n")).collect::<String>(),
        (0..n)
            .map(|i| format!(" input g{i}: p{i}\n"))
            .collect::<String>(),
        (0..n)
            .map(|i| format!(" p{i} = p{i} - 0.5 * g{i}\n"))
            .collect::<String>(),
    ));
    assert!(took < limit, "{took:?}");
}
