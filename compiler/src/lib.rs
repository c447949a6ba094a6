//! The optc compiler: checking, the IR, its passes and the backends.
//!
//! ```text
//! source ─lex/parse─▶ AST ─lower (check)─▶ IR ─passes─▶ kernels ─▶ interpreter (reference)
//! ```
//! [`compile`] runs the whole pipeline over a source file. It does no I/O and contains no unsafe code.

pub mod backend;
pub mod ir;
pub mod lower;
pub mod ops;
pub mod passes;
pub mod print;
pub mod random;
pub mod storage;

pub use optc_grammar::{ast, Diagnostic, Label, Severity};

/// Codes a rule with a syntax error may report only because a part of it is missing (a name
/// whose declaration or `let` did not parse, a missing `param`, statements and declarations out
/// of place): not reported for such a rule.
const ABSENCE_CODES: &[&str] = &[
    "E0101", "E0103", "E0301", "E0302", "E0303", "E0304", "E0310",
];

/// The result of compiling a source file.
#[derive(Debug)]
pub struct Compilation {
    /// The parsed file (absent when the parser could not recover).
    pub ast: Option<ast::File>,
    /// The compiled rules, in source order (only when there is no error).
    pub programs: Vec<ir::Program>,
    /// Errors and warnings, in source order.
    pub diagnostics: Vec<Diagnostic>,
}

impl Compilation {
    /// Whether any diagnostic is an error.
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(|d| d.is_error())
    }
}

/// Observes the program after each pass (for `--emit ir`).
pub type PassObserver<'a> = &'a mut dyn FnMut(&str, &ir::Program);

/// Compiles every rule of a source file through the whole pipeline.
pub fn compile(src: &str) -> Compilation {
    compile_with(src, &mut |_, _| {})
}

/// Compiles, calling `observe` with the program after lowering (`"lower"`) and after each pass.
pub fn compile_with(src: &str, observe: PassObserver<'_>) -> Compilation {
    let (file, mut diagnostics) = optc_grammar::parse(src);
    let mut programs = Vec::new();
    if let Some(file) = &file {
        let mut names: std::collections::HashMap<&str, ast::Span> =
            std::collections::HashMap::new();
        if file.rules.is_empty() && diagnostics.is_empty() {
            diagnostics.push(
                Diagnostic::error(
                    "E0310",
                    "no rule in this file",
                    ast::Span::new(0, 0),
                    "the file starts here",
                )
                .with_help("write `rule NAME(hyper = value, ...) { ... }`"),
            );
        }
        let parse_ok = !diagnostics.iter().any(|d| d.is_error());
        let syntax_errors: Vec<usize> = diagnostics
            .iter()
            .filter(|d| d.is_error())
            .map(|d| d.primary.span.start)
            .collect();
        // The lines that hold a syntax error: what is left of their statement (a skipped
        // character, a missing token) may read as something else, so nothing else is reported
        // there.
        let newlines: Vec<usize> = src
            .bytes()
            .enumerate()
            .filter(|&(_, b)| b == b'\n')
            .map(|(i, _)| i)
            .collect();
        let line_of = |pos: usize| newlines.partition_point(|&nl| nl < pos);
        let broken_lines: std::collections::HashSet<usize> =
            syntax_errors.iter().map(|&at| line_of(at)).collect();
        for rule in &file.rules {
            if let Some(prev) = names.insert(&rule.name.name, rule.name.span) {
                diagnostics.push(
                    Diagnostic::error(
                        "E0102",
                        format!("rule `{}` is defined twice", rule.name.name),
                        rule.name.span,
                        "defined again here",
                    )
                    .with_label(prev, "first defined here"),
                );
            }
            let broken = syntax_errors
                .iter()
                .any(|&at| at >= rule.span.start && at < rule.span.end.max(rule.span.start + 1));
            let lowered = lower::lower_rule(rule);
            if broken {
                // A statement or declaration of this rule is missing: checking reports the
                // errors its absence cannot cause (types, kinds, misuse of what is there), not
                // "unknown name", "never used" or a missing part, which fixing the syntax may
                // resolve.
                diagnostics.extend(lowered.diagnostics.into_iter().filter(|d| {
                    d.is_error()
                        && !ABSENCE_CODES.contains(&d.code)
                        && !broken_lines.contains(&line_of(d.primary.span.start))
                }));
                continue;
            }
            diagnostics.extend(lowered.diagnostics);
            if let (Some(mut p), true) = (lowered.program, parse_ok) {
                observe("lower", &p);
                if p.info.axis.is_some() {
                    // The axis, written out for one copy: the runtime writes it out again for
                    // each step's number of samples; the host for its number of particles
                    // (passes::for_particles).
                    p = passes::unroll::copies_of(&std::sync::Arc::new(p), 1);
                    observe("unroll", &p);
                }
                passes::run_pipeline(&mut p, passes::PIPELINE, observe);
                programs.push(p);
            }
        }
    }
    diagnostics.sort_by_key(|d| (d.primary.span.start, d.primary.span.end));
    if diagnostics.iter().any(|d| d.is_error()) {
        programs.clear();
    }
    Compilation {
        ast: file,
        programs,
        diagnostics,
    }
}
