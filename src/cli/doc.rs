//! `optc list` and `optc doc`: the standard library and a rule's documentation.

use super::{color, load_source, Fail};
use optc::compiler::ir::{BufRole, Program, Ty};
use optc::stdlib;
use optc::{compile, render};

/// Runs `optc list`.
pub(crate) fn list() -> Result<(), Fail> {
    for (name, src) in stdlib::RULES {
        let first = optc::grammar::parse(src)
            .0
            .and_then(|f| f.rules.into_iter().next())
            .and_then(|r| r.doc.into_iter().next())
            .unwrap_or_default();
        println!("{name:<18} {first}");
    }
    Ok(())
}

/// Runs `optc doc RULE`: a standard-library name or a rule file (every rule in it).
pub(crate) fn show(name: &str) -> Result<(), Fail> {
    let (file, src) = load_source(name)?;
    let c = compile(&src);
    if c.has_errors() {
        return Err(Fail(render(&c.diagnostics, &src, &file, color())));
    }
    for (k, p) in c.programs.iter().enumerate() {
        if k > 0 {
            println!();
        }
        document(p);
    }
    Ok(())
}

/// Prints one rule's documentation, hyperparameters and interface.
fn document(p: &Program) {
    let i = &p.info;
    println!("{}\n", i.name);
    if !i.doc.is_empty() {
        println!("{}\n", i.doc);
    }
    println!("hyperparameters:");
    for h in &i.hypers {
        let default = if h.ty == Ty::Bool {
            (h.default != 0.0).to_string()
        } else {
            format!("{}", h.default)
        };
        let range = h.range.map(|r| format!(" in {r}")).unwrap_or_default();
        println!(
            "  {:<24} = {:<18} {}",
            format!("{}", h.name),
            format!("{default}{range}"),
            h.doc.replace('\n', " ")
        );
    }
    for (role, title) in [
        (BufRole::Param, "params"),
        (BufRole::Input, "inputs"),
        (BufRole::State, "state"),
        (BufRole::Output, "outputs"),
    ] {
        let names: Vec<String> = i
            .buffers
            .iter()
            .filter(|b| b.role == role)
            .map(|b| b.name.clone())
            .collect();
        let extra: Vec<String> = match role {
            BufRole::Input => i
                .scalar_inputs
                .iter()
                .map(|s| format!("{s} (scalar)"))
                .collect(),
            BufRole::State => i
                .scalar_states
                .iter()
                .map(|s| format!("{s} (scalar)"))
                .collect(),
            _ => Vec::new(),
        };
        let all: Vec<String> = names.into_iter().chain(extra).collect();
        if !all.is_empty() {
            println!("{title}: {}", all.join(", "));
        }
    }
    if i.stages.len() > 1 {
        println!("stages: {}", i.stages.join(", "));
    }
}
