//! `optc check`: report every error and warning of rule files.

use super::{color, load_source, Fail};
use optc::{compile, render};

/// Runs `optc check`.
pub(crate) fn command(files: &[String]) -> Result<(), Fail> {
    let mut failed = false;
    for f in files {
        let (name, src) = load_source(f)?;
        let c = compile(&src);
        eprint!("{}", render(&c.diagnostics, &src, &name, color()));
        let errors = c.diagnostics.iter().filter(|d| d.is_error()).count();
        let warnings = c.diagnostics.len() - errors;
        if errors > 0 {
            failed = true;
            eprintln!("{name}: {errors} error(s), {warnings} warning(s)");
        } else {
            let rules: Vec<&str> = c.programs.iter().map(|p| p.info.name.as_str()).collect();
            println!(
                "{name}: ok ({}){}",
                rules.join(", "),
                if warnings > 0 {
                    format!(", {warnings} warning(s)")
                } else {
                    String::new()
                }
            );
        }
    }
    if failed {
        Err(Fail(String::new()))
    } else {
        Ok(())
    }
}
