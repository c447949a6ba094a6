//! Robustness: arbitrary and mutated programs go through the parser and checker (and, when they
//! compile, through every pass and one interpreted step) without panicking. Bounded so CI stays fast;
//! raise PROPTEST_CASES to run longer.

use optc::runtime::{Inputs, Optimizer};
use proptest::prelude::*;
use std::sync::Arc;

/// Fragments that mutations splice in: tokens and snippets of the language.
const FRAGMENTS: &[&str] = &[
    " ",
    "\n",
    "(",
    ")",
    "{",
    "}",
    ",",
    ":",
    "=",
    "+",
    "-",
    "*",
    "/",
    "^",
    "%",
    "==",
    "<",
    "&&",
    "!",
    "if",
    "else",
    "let",
    "state",
    "input",
    "param",
    "out",
    "stage",
    "rule",
    "t",
    "0",
    "1e-3",
    "1e999",
    "sqrt(",
    "norm(",
    "tensor_norm(",
    "max(",
    "clamp(",
    "scalar",
    "theta",
    "g",
    "m",
    "x",
    "true",
    "///",
    "//",
    "$",
    "é",
];

fn mutate(src: &str, edits: &[(usize, usize, usize)]) -> String {
    let mut s: Vec<char> = src.chars().collect();
    for &(pos, del, frag) in edits {
        if s.is_empty() {
            break;
        }
        let pos = pos % s.len();
        let end = (pos + del % 8).min(s.len());
        let ins: Vec<char> = FRAGMENTS[frag % FRAGMENTS.len()].chars().collect();
        s.splice(pos..end, ins);
    }
    s.into_iter().collect()
}

/// Compiles; if it compiles, binds every rule to small tensors and runs one full step.
fn exercise(src: &str) {
    let c = optc::compile(src);
    let _ = optc::render(&c.diagnostics, src, "fuzz.opt", false);
    for p in c.programs {
        let info = p.info.clone();
        let params: Vec<Vec<Vec<f32>>> = info
            .spaces
            .iter()
            .map(|_| vec![vec![0.5; 3], vec![-1.0; 0], vec![2.0; 5]])
            .collect();
        let Ok(mut opt) = Optimizer::<f32>::new(Arc::new(p), params) else {
            continue;
        };
        let inputs_data: Vec<(String, Vec<Vec<f32>>)> = info
            .buffers
            .iter()
            .filter(|b| b.role == optc::compiler::ir::BufRole::Input)
            .map(|b| (b.name.clone(), vec![vec![0.25; 3], vec![], vec![-0.5; 5]]))
            .collect();
        let mut inputs = Inputs::default();
        for (n, d) in &inputs_data {
            inputs = inputs.tensor(n, d.iter().map(|v| v.as_slice()).collect());
        }
        for s in &info.scalar_inputs {
            inputs = inputs.scalar(s, 0.5);
        }
        opt.step(&inputs)
            .expect("a step with every input given succeeds");
        opt.step(&inputs).expect("and so does the second");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(src in "\\PC{0,200}") {
        exercise(&src);
    }

    #[test]
    fn mutated_stdlib_rules_never_panic(
        which in 0usize..64,
        edits in prop::collection::vec((0usize..4000, 0usize..8, 0usize..64), 1..6),
    ) {
        let rules = optc::stdlib::RULES;
        let (_, src) = rules[which % rules.len()];
        exercise(&mutate(src, &edits));
    }

    #[test]
    fn token_soup_never_panics(frags in prop::collection::vec(0usize..64, 0..60)) {
        let src: String = frags.iter().map(|&f| FRAGMENTS[f % FRAGMENTS.len()]).collect::<Vec<_>>().join(" ");
        exercise(&format!("rule r(lr = 1) {{ param theta input g {src} }}"));
    }
}
