//! optc: a small language for optimizer update rules, and its compiler and runtime.
//!
//! This crate is the facade host programs depend on, and the home of the `optc` command.
//!
//! ```
//! use optc::{compile_rule, runtime::{Inputs, Optimizer}};
//! use std::sync::Arc;
//!
//! let program = compile_rule("rule sgd(lr = 0.1) { param theta  input g  theta = theta - lr * g }").unwrap();
//! let mut opt = Optimizer::<f32>::new(Arc::new(program), vec![vec![vec![1.0, 2.0]]]).unwrap();
//! let g = [0.5f32, -1.0];
//! opt.step(&Inputs::default().tensor("g", vec![&g])).unwrap();
//! assert_eq!(opt.params(0)[0], vec![0.95, 2.1]);
//! ```

pub mod ceiling;

pub use optc_compiler as compiler;
pub use optc_compiler::{compile, Compilation, Diagnostic};
pub use optc_grammar as grammar;
pub use optc_runtime as runtime;
pub use optc_stdlib as stdlib;

use ariadne::{Config, Label, Report, ReportKind, Source};

/// The most diagnostics [`render`] shows; it says how many more there are.
pub const MAX_REPORTS: usize = 50;

/// Renders diagnostics with ariadne. `color: false` gives plain text (used in snapshots).
///
/// At most [`MAX_REPORTS`] are shown, errors before warnings, in source order, followed by a line
/// saying how many errors and warnings were left out.
pub fn render(diags: &[Diagnostic], src: &str, file: &str, color: bool) -> String {
    let mut out = Vec::new();
    let mut shown: Vec<usize> = (0..diags.len()).filter(|&i| diags[i].is_error()).collect();
    shown.extend((0..diags.len()).filter(|&i| !diags[i].is_error()));
    shown.truncate(MAX_REPORTS);
    shown.sort_unstable();
    // One source (its line index) for every report.
    let mut cache = (file.to_string(), Source::from(src));
    for d in shown.iter().map(|&i| &diags[i]) {
        let kind = if d.is_error() {
            ReportKind::Error
        } else {
            ReportKind::Warning
        };
        let range = |s: optc_grammar::ast::Span| {
            let end = s.end.min(src.len());
            (file.to_string(), s.start.min(end)..end)
        };
        let mut r = Report::build(kind, range(d.primary.span))
            .with_config(Config::default().with_color(color))
            .with_code(d.code)
            .with_message(&d.message)
            .with_label(
                Label::new(range(d.primary.span))
                    .with_message(&d.primary.message)
                    .with_order(0),
            );
        for (i, l) in d.secondary.iter().enumerate() {
            r = r.with_label(
                Label::new(range(l.span))
                    .with_message(&l.message)
                    .with_order(i as i32 + 1),
            );
        }
        for n in &d.notes {
            r = r.with_note(n);
        }
        if let Some(h) = &d.help {
            r = r.with_help(h);
        }
        let _ = r.finish().write(&mut cache, &mut out);
    }
    if diags.len() > shown.len() {
        let mut left = vec![true; diags.len()];
        for &i in &shown {
            left[i] = false;
        }
        let errors = (0..diags.len())
            .filter(|&i| left[i] && diags[i].is_error())
            .count();
        let warnings = diags.len() - shown.len() - errors;
        let mut parts = Vec::new();
        if errors > 0 {
            parts.push(format!("{errors} more error(s)"));
        }
        if warnings > 0 {
            parts.push(format!("{warnings} more warning(s)"));
        }
        out.extend_from_slice(format!("{} not shown\n", parts.join(" and ")).as_bytes());
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Compiles a source holding exactly one rule; on failure returns the rendered diagnostics.
pub fn compile_rule(src: &str) -> Result<compiler::ir::Program, String> {
    let c = compile(src);
    if c.has_errors() {
        return Err(render(&c.diagnostics, src, "<rule>", false));
    }
    match c.programs.len() {
        1 => Ok(c.programs.into_iter().next().expect("one program")),
        n => Err(format!("expected one rule, found {n}")),
    }
}

/// Compiles a standard-library rule by name.
pub fn stdlib_rule(name: &str) -> Option<compiler::ir::Program> {
    stdlib::source(name).and_then(|s| compile_rule(s).ok())
}
