//! The properties every fuzz target checks, and the structured generator of well-typed rules.
//!
//! [`check_source`] takes any text: it must compile or fail with diagnostics (never panic), and
//! a rule that compiles is run on small tensors with these properties checked:
//! - no panic in any engine;
//! - Cranelift on one thread and on two give the same bits (every NaN counted as one);
//! - rules without reductions and inline approximations (f32 exp, log, sigmoid, tanh) give the
//!   same bits on the interpreter and on Cranelift;
//! - a step that fails validation (a gradient of the wrong length) changes nothing;
//! - a run resumed from a checkpoint equals the run that never stopped, bit for bit;
//! - with `NonFinite::Skip`, a step whose gradient holds a NaN changes nothing.
//!
//! [`GenRule`] draws a rule from fuzzer bytes ([`arbitrary`]): several params, inputs, per-element
//! and scalar state, stages, reductions of reductions, conditionals, so the fuzzer reaches the
//! phase planner and the code generators with rules that type-check.

use arbitrary::{Arbitrary, Unstructured};
use optc::compiler::ir::{BufRole, Node, Program};
use optc::runtime::{Backend, Inputs, NonFinite, Optimizer};
use std::fmt::Write;
use std::sync::Arc;

/// Tensor sizes per param space: awkward ones around the vector widths.
const SIZES: &[usize] = &[1, 5, 17];
/// Steps per run.
const STEPS: usize = 3;

/// Deterministic values in [-1, 1).
fn fill(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Whether a program is small enough to run in a fuzz iteration.
fn runnable(p: &Program) -> bool {
    p.info.spaces.len() <= 4
        && p.info.buffers.len() <= 32
        && p.info.stages.len() <= 4
        && p.graph.len() <= 4000
}

/// Whether the Cranelift kernels of an f32 program approximate a function inline (exp, log,
/// sigmoid, tanh: within 2 ulp of the interpreter's, by design).
fn approximates(p: &Program) -> bool {
    use optc::compiler::ir::UnOp;
    (0..p.graph.len()).any(|i| {
        matches!(
            p.graph.node(optc::compiler::ir::NodeId(i as u32)),
            Node::Unary(UnOp::Exp | UnOp::Log | UnOp::Sigmoid | UnOp::Tanh, _)
        )
    })
}

/// Whether any kernel of the program reduces.
fn reduces(p: &Program) -> bool {
    p.variants.iter().any(|v| {
        v.stages.iter().any(|s| {
            s.phases
                .iter()
                .any(|ph| ph.kernels.iter().any(|k| !k.reductions.is_empty()))
        })
    }) || (0..p.graph.len()).any(|i| {
        matches!(
            p.graph.node(optc::compiler::ir::NodeId(i as u32)),
            Node::Reduce { .. }
        )
    })
}

/// The per-element inputs a later step reads.
fn read_inputs(p: &Program) -> Vec<String> {
    let mut names = std::collections::BTreeSet::new();
    for s in &p.variants[1].stages {
        for k in s.phases.iter().flat_map(|ph| &ph.kernels) {
            for &n in &k.loads {
                if let Node::Load { buf, .. } = p.graph.node(n) {
                    if p.info.is_input(buf) {
                        names.insert(p.info.buffers[buf as usize].name.clone());
                    }
                }
            }
        }
    }
    names.into_iter().collect()
}

/// The per-element inputs of step `s`: `[input][tensor]`.
fn inputs_for(p: &Program, s: usize) -> Vec<(String, Vec<Vec<f32>>)> {
    p.info
        .inputs()
        .map(|(b, bi)| {
            let ts = SIZES
                .iter()
                .enumerate()
                .map(|(j, &n)| fill(1 + 1000 * s as u64 + 100 * u64::from(b) + j as u64, n))
                .collect();
            (bi.name.clone(), ts)
        })
        .collect()
}

fn as_inputs<'a>(p: &Program, data: &'a [(String, Vec<Vec<f32>>)], s: usize) -> Inputs<'a, f32> {
    let mut inputs = Inputs::default();
    for (n, d) in data {
        inputs = inputs.tensor(n, d.iter().map(Vec::as_slice).collect());
    }
    for (i, name) in p.info.scalar_inputs.iter().enumerate() {
        inputs = inputs.scalar(name, 0.25 + 0.5 * i as f64 + 0.125 * s as f64);
    }
    inputs
}

/// Every per-element buffer's bits and every scalar state's bits.
type Snapshot = (Vec<Vec<Vec<u32>>>, Vec<u64>);

/// An element's bits, every NaN as one (engines may propagate different NaN payloads and signs).
fn bits(x: f32) -> u32 {
    if x.is_nan() {
        f32::NAN.to_bits()
    } else {
        x.to_bits()
    }
}

fn snapshot(o: &Optimizer<f32>) -> Snapshot {
    let info = &o.program().info;
    let bufs = info
        .buffers
        .iter()
        .enumerate()
        .filter(|(_, b)| b.role != BufRole::Input)
        .map(|(i, b)| {
            let v = if b.role == BufRole::Param {
                o.params(i).to_vec()
            } else {
                o.buffer(&b.name)
                    .map(<[Vec<f32>]>::to_vec)
                    .unwrap_or_default()
            };
            v.iter()
                .map(|t| t.iter().map(|&x| bits(x)).collect())
                .collect()
        })
        .collect();
    let scalars = info
        .scalar_states
        .iter()
        .map(|n| {
            o.scalar_state(n).map_or(0, |x| {
                if x.is_nan() {
                    f64::NAN.to_bits()
                } else {
                    x.to_bits()
                }
            })
        })
        .collect();
    (bufs, scalars)
}

fn optimizer(p: &Arc<Program>, backend: Backend) -> Option<Optimizer<f32>> {
    let params: Vec<Vec<Vec<f32>>> = (0..p.info.spaces.len())
        .map(|s| {
            SIZES
                .iter()
                .enumerate()
                .map(|(j, &n)| fill(50_000 + 10 * s as u64 + j as u64, n))
                .collect()
        })
        .collect();
    // A rule can be refused here (a hyperparameter default out of its range, ...): not a failure.
    Optimizer::new(Arc::clone(p), params)
        .ok()?
        .with_backend(backend)
        .ok()
}

/// Runs steps `from..to`; the error of the first failing step, if any.
fn steps(o: &mut Optimizer<f32>, from: usize, to: usize) -> Result<(), optc::runtime::Error> {
    let p = o.program().clone();
    for s in from..to {
        let data = inputs_for(&p, s);
        o.step(&as_inputs(&p, &data, s))?;
    }
    Ok(())
}

/// Compiles `src` and checks the module's properties on every rule small enough to run.
pub fn check_source(src: &str) {
    let out = optc::compile(src);
    for program in out.programs.into_iter().take(2) {
        if runnable(&program) {
            check_program(Arc::new(program), src);
        }
    }
}

/// Where two snapshots first differ.
fn difference(a: &Snapshot, b: &Snapshot) -> String {
    for (i, (x, y)) in a.0.iter().zip(&b.0).enumerate() {
        for (j, (u, v)) in x.iter().zip(y).enumerate() {
            for (e, (p, q)) in u.iter().zip(v).enumerate() {
                if p != q {
                    return format!(
                        "buffer {i} tensor {j} element {e}: {} vs {}",
                        f32::from_bits(*p),
                        f32::from_bits(*q)
                    );
                }
            }
        }
    }
    format!("scalar states {:?} vs {:?}", a.1, b.1)
}

/// The properties of the module documentation for one compiled rule (`src`: its source, for
/// the messages).
pub fn check_program(p: Arc<Program>, src: &str) {
    let one = Backend::Cranelift { threads: 1 };
    let two = Backend::Cranelift { threads: 2 };
    let Some(mut a) = optimizer(&p, one) else {
        return;
    };
    let straight = steps(&mut a, 0, STEPS);
    let mut b = optimizer(&p, two).expect("the same rule binds on two threads");
    let twice = steps(&mut b, 0, STEPS);
    assert_eq!(
        straight.is_ok(),
        twice.is_ok(),
        "thread counts disagree on failing: {straight:?} {twice:?}"
    );
    if straight.is_err() {
        return;
    }
    let (sa, sb) = (snapshot(&a), snapshot(&b));
    assert!(
        sa == sb,
        "one and two threads differ: {}\n{src}",
        difference(&sa, &sb)
    );
    if !reduces(&p) && !approximates(&p) {
        let mut i = optimizer(&p, Backend::Interpreter).expect("binds on the interpreter");
        steps(&mut i, 0, STEPS).expect("the interpreter steps where Cranelift does");
        let si = snapshot(&i);
        assert!(
            si == sa,
            "interpreter and Cranelift differ: {}\n{src}",
            difference(&si, &sa)
        );
    }
    // A failed step changes nothing.
    let data = inputs_for(&p, STEPS);
    if let Some(read) = read_inputs(&p).first() {
        let before = snapshot(&a);
        let short = vec![0.5f32; 2];
        let mut bad = as_inputs(&p, &data, STEPS);
        bad = bad.tensor(read, SIZES.iter().map(|_| &short[..]).collect());
        let r = a.step(&bad);
        assert!(r.is_err(), "a short `{read}` is refused\n{src}");
        assert!(
            snapshot(&a) == before,
            "a failed step changed the optimizer\n{src}"
        );
    }
    // Resume from a checkpoint = a run that never stopped.
    // (A checkpoint holds the state; the params travel beside it.)
    let mut c = optimizer(&p, one).expect("binds again");
    steps(&mut c, 0, 1).expect("first step");
    let bytes = c.checkpoint_bytes().expect("checkpoint");
    let params = (0..p.info.spaces.len())
        .map(|s| c.params(s).to_vec())
        .collect();
    let mut d = Optimizer::new(Arc::clone(&p), params)
        .and_then(|o| o.with_backend(one))
        .expect("binds again");
    d.load_checkpoint_bytes(&bytes)
        .expect("own checkpoint loads");
    steps(&mut d, 1, STEPS).expect("resumed steps");
    let sd = snapshot(&d);
    assert!(
        sd == sa,
        "a resumed run differs from the straight one: {}\n{src}",
        difference(&sd, &sa)
    );
    // NonFinite::Skip: a NaN gradient changes nothing.
    if p.info.stages.len() == 1 && !read_inputs(&p).is_empty() {
        if let Ok(mut e) = optimizer(&p, one)
            .expect("binds again")
            .with_non_finite(NonFinite::Skip)
        {
            steps(&mut e, 0, 1).expect("first step");
            // Only inputs the step as specialized reads are checked (the others cannot matter).
            if read_inputs(e.active_program()).is_empty() {
                return;
            }
            let before = snapshot(&e);
            let mut data = inputs_for(&p, 1);
            for (_, ts) in &mut data {
                ts[2][3] = f32::NAN;
            }
            e.step(&as_inputs(&p, &data, 1))
                .expect("a skipped step is not an error");
            assert_eq!(e.skipped_steps(), 1, "the NaN step is skipped\n{src}");
            assert!(
                snapshot(&e) == before,
                "a skipped step changed the optimizer\n{src}"
            );
        }
    }
}

/// Checkpoints of the optimizer [`check_checkpoint`] loads into, after 0, 1 and 3 steps.
pub fn checkpoint_seeds() -> Vec<Vec<u8>> {
    let p = Arc::new(optc::stdlib_rule("adam").expect("adam"));
    let mut o = optimizer(&p, Backend::Interpreter).expect("adam binds");
    let mut out = vec![o.checkpoint_bytes().expect("checkpoint")];
    for (from, to) in [(0, 1), (1, 3)] {
        steps(&mut o, from, to).expect("steps");
        out.push(o.checkpoint_bytes().expect("checkpoint"));
    }
    out
}

/// Checks that arbitrary bytes loaded as a checkpoint into an adam optimizer (one step taken)
/// either load or fail leaving the optimizer as it was.
pub fn check_checkpoint(bytes: &[u8]) {
    static BASE: std::sync::OnceLock<(Optimizer<f32>, Vec<u8>)> = std::sync::OnceLock::new();
    let (base, before) = BASE.get_or_init(|| {
        let p = Arc::new(optc::stdlib_rule("adam").expect("adam"));
        let mut o = optimizer(&p, Backend::Interpreter).expect("adam binds");
        steps(&mut o, 0, 1).expect("a step");
        let bytes = o.checkpoint_bytes().expect("checkpoint");
        (o, bytes)
    });
    let mut o = base.clone();
    if o.load_checkpoint_bytes(bytes).is_err() {
        assert_eq!(
            &o.checkpoint_bytes().expect("checkpoint"),
            before,
            "a refused checkpoint changed the optimizer"
        );
    } else {
        // A checkpoint that loads steps like any other.
        let _ = steps(&mut o, 1, 2);
    }
}

/// Compiles `src` (parse, check, lowering, every pass) and prints every program's kernels and
/// interface, without running anything: the front end and the printers at full speed.
pub fn check_compile(src: &str) {
    let out = optc::compile(src);
    let _ = optc::render(&out.diagnostics, src, "fuzz.opt", false);
    for p in out.programs.iter().take(2) {
        let _ = optc::compiler::print::interface(p);
        let _ = optc::compiler::print::kernels(p);
    }
}

/// A rule drawn from fuzzer bytes; its `Display` is the source text.
#[derive(Debug)]
pub struct GenRule(pub String);

/// Names in scope for one param space.
struct Space {
    param: String,
    inputs: Vec<String>,
    states: Vec<String>,
}

struct Gen<'a, 'b> {
    u: &'a mut Unstructured<'b>,
    hypers: Vec<String>,
    bools: Vec<String>,
    scalar_states: Vec<String>,
    scalar_inputs: Vec<String>,
}

impl Gen<'_, '_> {
    fn pick<'s>(&mut self, v: &'s [String]) -> arbitrary::Result<Option<&'s str>> {
        if v.is_empty() {
            return Ok(None);
        }
        Ok(Some(&v[self.u.choose_index(v.len())?]))
    }

    /// A scalar expression (hyperparameters, `t`, scalar state and inputs, reductions).
    fn scalar(&mut self, spaces: &[Space], depth: u32) -> arbitrary::Result<String> {
        let k = if depth == 0 { 5 } else { 12 };
        Ok(match self.u.choose_index(k)? {
            0 => format!("{}", f64::from(self.u.int_in_range(-8i32..=8)?) * 0.25),
            1 => "t".into(),
            2 => match self.pick(&self.hypers.clone())? {
                Some(h) => h.to_string(),
                None => "0.5".into(),
            },
            3 => match self.pick(&self.scalar_states.clone())? {
                Some(s) => s.to_string(),
                None => "1".into(),
            },
            4 => match self.pick(&self.scalar_inputs.clone())? {
                Some(s) => s.to_string(),
                None => "2".into(),
            },
            5 | 6 => {
                let s = self.u.choose_index(spaces.len())?;
                let f = [
                    "sum",
                    "norm",
                    "sqnorm",
                    "max_abs",
                    "tensor_norm",
                    "tensor_sum",
                ][self.u.choose_index(6)?];
                let e = self.element(spaces, s, depth - 1)?;
                format!("{f}({e})")
            }
            7 => {
                let (a, b) = (
                    self.scalar(spaces, depth - 1)?,
                    self.scalar(spaces, depth - 1)?,
                );
                let op = ["+", "-", "*"][self.u.choose_index(3)?];
                format!("({a} {op} {b})")
            }
            8 => {
                let (a, b) = (
                    self.scalar(spaces, depth - 1)?,
                    self.scalar(spaces, depth - 1)?,
                );
                format!("({a} / (abs({b}) + 1))")
            }
            9 => {
                let a = self.scalar(spaces, depth - 1)?;
                let f =
                    ["sqrt(abs(", "exp(-abs(", "log(1 + abs(", "tanh(("][self.u.choose_index(4)?];
                format!("{f}{a}))")
            }
            10 => {
                let c = self.cond(spaces, None, depth - 1)?;
                let (a, b) = (
                    self.scalar(spaces, depth - 1)?,
                    self.scalar(spaces, depth - 1)?,
                );
                format!("(if {c} {{ {a} }} else {{ {b} }})")
            }
            _ => {
                let a = self.scalar(spaces, depth - 1)?;
                format!("min(max({a}, -4), 4)")
            }
        })
    }

    /// A boolean: a comparison of scalars (or of elements of space `s`), or a bool hyper.
    fn cond(
        &mut self,
        spaces: &[Space],
        s: Option<usize>,
        depth: u32,
    ) -> arbitrary::Result<String> {
        if let (Some(b), true) = (self.pick(&self.bools.clone())?, self.u.ratio(1, 4)?) {
            let b = b.to_string();
            return Ok(if self.u.arbitrary()? {
                format!("!{b}")
            } else {
                b
            });
        }
        let op = [">", "<", ">=", "<=", "==", "!="][self.u.choose_index(6)?];
        let (a, b) = match s {
            Some(s) => (self.element(spaces, s, depth)?, self.scalar(spaces, depth)?),
            None => (self.scalar(spaces, depth)?, self.scalar(spaces, depth)?),
        };
        Ok(format!("{a} {op} {b}"))
    }

    /// A per-element expression over space `s`.
    fn element(&mut self, spaces: &[Space], s: usize, depth: u32) -> arbitrary::Result<String> {
        let k = if depth == 0 { 4 } else { 11 };
        let sp = &spaces[s];
        Ok(match self.u.choose_index(k)? {
            0 => sp.param.clone(),
            1 => self.pick(&sp.inputs)?.unwrap_or(&sp.param).to_string(),
            2 => self.pick(&sp.states)?.unwrap_or(&sp.param).to_string(),
            3 => self.scalar(spaces, 0)?,
            4 | 5 => {
                let (a, b) = (
                    self.element(spaces, s, depth - 1)?,
                    self.element(spaces, s, depth - 1)?,
                );
                let op = ["+", "-", "*"][self.u.choose_index(3)?];
                format!("({a} {op} {b})")
            }
            6 => {
                let (a, b) = (
                    self.element(spaces, s, depth - 1)?,
                    self.scalar(spaces, depth - 1)?,
                );
                format!("({a} * {b})")
            }
            7 => {
                let (a, b) = (
                    self.element(spaces, s, depth - 1)?,
                    self.element(spaces, s, depth - 1)?,
                );
                format!("({a} / (abs({b}) + 1))")
            }
            8 => {
                let a = self.element(spaces, s, depth - 1)?;
                let f = [
                    "sqrt(abs(",
                    "exp(-abs(",
                    "log(1 + abs(",
                    "sigmoid((",
                    "sign((",
                    "abs((",
                ][self.u.choose_index(6)?];
                format!("{f}{a}))")
            }
            9 => {
                let c = self.cond(spaces, Some(s), depth - 1)?;
                let (a, b) = (
                    self.element(spaces, s, depth - 1)?,
                    self.element(spaces, s, depth - 1)?,
                );
                format!("(if {c} {{ {a} }} else {{ {b} }})")
            }
            _ => {
                let (a, b) = (
                    self.element(spaces, s, depth - 1)?,
                    self.element(spaces, s, depth - 1)?,
                );
                let f = ["max", "min"][self.u.choose_index(2)?];
                format!("{f}({a}, {b})")
            }
        })
    }

    /// Statements of one stage (or of a rule without stages), indented.
    fn statements(&mut self, spaces: &[Space], out: &mut String) -> arbitrary::Result<()> {
        let n = self.u.int_in_range(1..=4)?;
        for _ in 0..n {
            let s = self.u.choose_index(spaces.len())?;
            match self.u.choose_index(4)? {
                0 if !self.scalar_states.is_empty() => {
                    let c = self
                        .pick(&self.scalar_states.clone())?
                        .unwrap_or("c")
                        .to_string();
                    let e = self.scalar(spaces, 2)?;
                    writeln!(out, "    {c} = {c} + 0.1 * min(max({e}, -4), 4)").ok();
                }
                1 if !spaces[s].states.is_empty() => {
                    let m = self.pick(&spaces[s].states)?.unwrap_or("m").to_string();
                    let e = self.element(spaces, s, 3)?;
                    writeln!(out, "    {m} = 0.9 * {m} + 0.1 * min(max({e}, -4), 4)").ok();
                }
                2 => {
                    let c = self.cond(spaces, None, 1)?;
                    let e = self.element(spaces, s, 2)?;
                    let p = spaces[s].param.clone();
                    writeln!(
                        out,
                        "    if {c} {{ {p} = {p} - 0.01 * min(max({e}, -4), 4) }}"
                    )
                    .ok();
                }
                _ => {
                    let e = self.element(spaces, s, 3)?;
                    let p = spaces[s].param.clone();
                    writeln!(out, "    {p} = {p} - 0.01 * min(max({e}, -4), 4)").ok();
                }
            }
        }
        Ok(())
    }
}

impl<'a> Arbitrary<'a> for GenRule {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let nspaces = u.int_in_range(1..=3)?;
        let nhypers = u.int_in_range(0..=3)?;
        let nbools = u.int_in_range(0..=1)?;
        let hypers: Vec<String> = (0..nhypers).map(|i| format!("h{i}")).collect();
        let bools: Vec<String> = (0..nbools).map(|i| format!("b{i}")).collect();
        let scalar_states: Vec<String> = (0..u.int_in_range(0..=2)?)
            .map(|i| format!("c{i}"))
            .collect();
        let scalar_inputs: Vec<String> = (0..u.int_in_range(0..=1)?)
            .map(|i| format!("q{i}"))
            .collect();
        let mut spaces = Vec::new();
        for s in 0..nspaces {
            let inputs = (0..u.int_in_range(1..=2)?)
                .map(|i| format!("g{s}_{i}"))
                .collect();
            let states = (0..u.int_in_range(0..=2)?)
                .map(|i| format!("m{s}_{i}"))
                .collect();
            spaces.push(Space {
                param: format!("p{s}"),
                inputs,
                states,
            });
        }
        let mut out = String::from("rule fuzzed(");
        for h in &hypers {
            let v = f64::from(u.int_in_range(1i32..=9)?) * 0.1;
            write!(out, "{h} = {v}, ").ok();
        }
        for b in &bools {
            let v: bool = u.arbitrary()?;
            write!(out, "{b} = {v}, ").ok();
        }
        out.push_str(") {\n");
        let params: Vec<&str> = spaces.iter().map(|s| s.param.as_str()).collect();
        writeln!(out, "    param {}", params.join(", ")).ok();
        for sp in &spaces {
            for g in &sp.inputs {
                writeln!(out, "    input {g}: {}", sp.param).ok();
            }
            for m in &sp.states {
                writeln!(out, "    state {m}: {} = 0", sp.param).ok();
            }
        }
        for c in &scalar_states {
            writeln!(out, "    state {c}: scalar = 1").ok();
        }
        for q in &scalar_inputs {
            writeln!(out, "    input {q}: scalar").ok();
        }
        let mut gen = Gen {
            u,
            hypers,
            bools,
            scalar_states,
            scalar_inputs,
        };
        let nstages = gen.u.int_in_range(1..=3)?;
        if nstages == 1 {
            gen.statements(&spaces, &mut out)?;
        } else {
            for k in 0..nstages {
                writeln!(out, "    stage s{k} {{").ok();
                gen.statements(&spaces, &mut out)?;
                writeln!(out, "    }}").ok();
            }
        }
        out.push_str("}\n");
        Ok(GenRule(out))
    }
}
