//! Checking and lowering: AST → [`Program`].
//!
//! The checker resolves names, infers each value's type and kind, and rejects what cannot be
//! compiled, with a diagnostic at the exact span. Lowering runs twice per rule — once for the first
//! step (`t = 1`, state initializers applied) and once for every later step — and writes each
//! statement into the graph in SSA form: an assignment replaces a buffer's current value, a
//! statement `if` merges the two branches with selects, and the final value of each changed buffer
//! becomes a store at the end of its stage. Diagnostics come from the later-steps lowering (the
//! first-step lowering adds only the initializers).

#![allow(clippy::needless_range_loop)] // parallel arrays indexed by buffer id

use crate::ir::{
    self, Axis, BinOp, BufId, BufInfo, BufRole, HyperInfo, Kind, Node, NodeId, ReduceOp, RuleInfo,
    Ty, UnOp,
};
use crate::random::{self, Dist};
use optc_grammar::ast::{self, DeclKind, ExprKind, Span, StmtKind, TypeAnn};
use optc_grammar::Diagnostic;
use std::collections::{HashMap, HashSet};

/// Builtin elementwise functions of one argument.
/// The most entries of each table a rule may declare (hyperparameters, buffers, scalar states,
/// scalar inputs, stages): their ids are 16-bit.
pub const MAX_ENTRIES: usize = 1 << 16;

/// The longest chain of operations one value may be computed by (its depth in the graph). Passes,
/// the interpreter and the code generators walk values recursively; this bound keeps those walks
/// inside a 2 MiB thread stack, even unoptimized (about 3,000 levels fit there). Real rules are a
/// few dozen operations deep.
pub const MAX_VALUE_DEPTH: u32 = 2048;

const UNARY_FNS: &[(&str, UnOp)] = &[
    ("sqrt", UnOp::Sqrt),
    ("rsqrt", UnOp::Rsqrt),
    ("abs", UnOp::Abs),
    ("sign", UnOp::Sign),
    ("exp", UnOp::Exp),
    ("log", UnOp::Log),
    ("log1p", UnOp::Log1p),
    ("expm1", UnOp::Expm1),
    ("sigmoid", UnOp::Sigmoid),
    ("tanh", UnOp::Tanh),
    ("floor", UnOp::Floor),
    ("ceil", UnOp::Ceil),
    ("round", UnOp::Round),
];
const BINARY_FNS: &[(&str, BinOp)] = &[
    ("min", BinOp::Min),
    ("max", BinOp::Max),
    ("pow", BinOp::Pow),
];
/// Reductions: name, number of per-element arguments.
const REDUCTIONS: &[(&str, usize)] = &[
    ("sum", 1),
    ("mean", 1),
    ("norm", 1),
    ("sqnorm", 1),
    ("dot", 2),
    ("max_abs", 1),
    ("numel", 1),
];

/// Reductions over an axis: `sample_sum`, `particle_min`, ...
const AXIS_FNS: &[&str] = &[
    "sample_sum",
    "sample_mean",
    "sample_max",
    "sample_min",
    "particle_sum",
    "particle_mean",
    "particle_max",
    "particle_min",
];

/// The axis and operation (`sum`, `mean`, `max`, `min`) of an axis reduction's name.
fn axis_fn(name: &str) -> Option<(Axis, &str)> {
    if !AXIS_FNS.contains(&name) {
        return None;
    }
    let (axis, op) = name.split_once('_')?;
    Some((
        if axis == "sample" {
            Axis::Samples
        } else {
            Axis::Particles
        },
        op,
    ))
}

/// Every function name, for "did you mean".
fn function_names() -> Vec<String> {
    let mut v: Vec<String> = UNARY_FNS.iter().map(|f| f.0.to_string()).collect();
    v.extend(BINARY_FNS.iter().map(|f| f.0.to_string()));
    v.push("clamp".into());
    v.push("tensor_count".into());
    v.extend(AXIS_FNS.iter().map(|f| f.to_string()));
    v.push("uniform".into());
    v.push("normal".into());
    for (r, _) in REDUCTIONS {
        v.push(r.to_string());
        v.push(format!("tensor_{r}"));
    }
    v
}

/// Edit distance counting a swap of neighbours as one edit (optimal string alignment).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for j in 0..=b.len() {
        d[0][j] = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}

/// The closest candidate to `name`, if close enough to be a likely typo (one edit per three
/// characters, a swap of neighbours counting as one).
pub fn suggest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    // One edit per three characters: short names get no guesses (`m` is not a typo of `g`).
    let limit = name.chars().count() / 3;
    if limit == 0 {
        return None;
    }
    candidates
        .into_iter()
        .filter(|c| *c != name)
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, c)| (*d, *c))
        .map(|(_, c)| c)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Sym {
    Hyper(u16),
    Buf(BufId),
    ScalarState(u16),
    ScalarInput(u16),
    /// A declared `random` value (index into `Checker::randoms`).
    Random(u16),
}

/// A declared `random NAME = normal(...)`.
#[derive(Debug, Clone)]
struct RandomDecl<'a> {
    dist: Dist,
    kind: Kind,
    stream: u32,
    seed: Option<&'a ast::Expr>,
}

#[derive(Debug, Clone)]
struct LetBinding {
    node: NodeId,
    stage: u16,
    span: Span,
    used: bool,
}

/// Where a name was declared, and what it is.
#[derive(Debug, Clone)]
struct Declared {
    sym: Sym,
    span: Span,
    used: bool,
    assigned: bool,
    /// Position in declaration order.
    pos: usize,
}

/// Per-rule checking state shared by both lowerings.
struct Checker<'a> {
    rule: &'a ast::Rule,
    info: RuleInfo,
    names: HashMap<String, Declared>,
    /// Declaration order of names, for messages and initializer ordering.
    order: Vec<String>,
    /// Initializers of per-element states (by buffer) and scalar states.
    buf_init: HashMap<BufId, &'a ast::Expr>,
    scalar_init: Vec<Option<&'a ast::Expr>>,
    /// The stage where each state is first used.
    home: HashMap<String, usize>,
    /// Statements, grouped into stages.
    stages: Vec<(String, Vec<&'a ast::Stmt>)>,
    /// Spans of `out` statements by output buffer.
    out_spans: HashMap<BufId, Span>,
    /// Spans of scalar `out` statements by name.
    scalar_out_spans: HashMap<String, Span>,
    /// Unknown names already reported.
    unknown: HashSet<String>,
    /// Tables whose size limit was reported.
    full: HashSet<&'static str>,
    /// Depth of each graph node (the longest chain of operations below it, itself included).
    node_depth: Vec<u32>,
    /// Whether a value too deep was reported.
    deep_reported: bool,
    /// Whether each graph node varies along the rule's axis (per sample or per particle: it
    /// depends on a buffer or scalar input on the axis and is not reduced over it).
    node_sampled: Vec<bool>,
    /// Declared `random` values.
    randoms: Vec<RandomDecl<'a>>,
    /// The defaults of scalar inputs that have one.
    input_default: HashMap<u16, &'a ast::Expr>,
    /// The site index of each draw written in a stage, by (stage, byte offset of the call).
    draw_sites: HashMap<(u16, usize), u16>,
    /// Draws written in each stage so far.
    sites_per_stage: HashMap<u16, u16>,
    diags: Vec<Diagnostic>,
}

/// Result of checking one rule.
#[derive(Debug)]
pub struct Lowered {
    /// The program, when the rule has no errors.
    pub program: Option<ir::Program>,
    /// Errors and warnings.
    pub diagnostics: Vec<Diagnostic>,
}

/// Checks and lowers one rule.
pub fn lower_rule(rule: &ast::Rule) -> Lowered {
    let mut ck = Checker {
        rule,
        info: RuleInfo {
            name: rule.name.name.clone(),
            doc: rule.doc.join("\n"),
            hypers: Vec::new(),
            spaces: Vec::new(),
            buffers: Vec::new(),
            scalar_states: Vec::new(),
            scalar_inputs: Vec::new(),
            scalar_outs: Vec::new(),
            axis: None,
            axis_scalars: Vec::new(),
            stages: Vec::new(),
        },
        names: HashMap::new(),
        order: Vec::new(),
        buf_init: HashMap::new(),
        scalar_init: Vec::new(),
        home: HashMap::new(),
        stages: Vec::new(),
        out_spans: HashMap::new(),
        scalar_out_spans: HashMap::new(),
        unknown: HashSet::new(),
        full: HashSet::new(),
        node_depth: Vec::new(),
        deep_reported: false,
        node_sampled: Vec::new(),
        randoms: Vec::new(),
        input_default: HashMap::new(),
        draw_sites: HashMap::new(),
        sites_per_stage: HashMap::new(),
        diags: Vec::new(),
    };
    ck.declare_hypers();
    ck.declare_body();
    if ck.diags.iter().any(|d| d.is_error()) {
        return Lowered {
            program: None,
            diagnostics: ck.diags,
        };
    }
    ck.find_homes();
    let mut graph = ir::Graph::new(false);
    let later = Lowerer::run(&mut ck, &mut graph, false, true);
    if ck.diags.iter().any(|d| d.is_error()) {
        return Lowered {
            program: None,
            diagnostics: ck.diags,
        };
    }
    let first = Lowerer::run(&mut ck, &mut graph, true, false);
    ck.usage_warnings();
    let program = ir::Program {
        info: ck.info,
        graph,
        variants: [first, later],
        axis_form: None,
    };
    ck.diags
        .sort_by_key(|d| (d.primary.span.start, d.primary.span.end));
    Lowered {
        program: if ck.diags.iter().any(|d| d.is_error()) {
            None
        } else {
            Some(program)
        },
        diagnostics: ck.diags,
    }
}

/// Evaluates a constant expression (a hyperparameter default).
fn const_eval(e: &ast::Expr) -> Result<(f64, Ty), Box<Diagnostic>> {
    let num = |e: &ast::Expr| -> Result<f64, Box<Diagnostic>> {
        match const_eval(e)? {
            (v, Ty::Num) => Ok(v),
            (_, Ty::Bool) => Err(Box::new(Diagnostic::error(
                "E0201",
                "expected a number, found a boolean",
                e.span,
                "a boolean",
            ))),
        }
    };
    Ok(match &e.kind {
        ExprKind::Num(v) => (*v, Ty::Num),
        ExprKind::Bool(b) => (f64::from(u8::from(*b)), Ty::Bool),
        ExprKind::Unary(ast::UnOp::Neg, a) => (-num(a)?, Ty::Num),
        ExprKind::Binary(op, a, b)
            if matches!(
                op,
                ast::BinOp::Add
                    | ast::BinOp::Sub
                    | ast::BinOp::Mul
                    | ast::BinOp::Div
                    | ast::BinOp::Pow
            ) =>
        {
            let (a, b) = (num(a)?, num(b)?);
            let v = match op {
                ast::BinOp::Add => a + b,
                ast::BinOp::Sub => a - b,
                ast::BinOp::Mul => a * b,
                ast::BinOp::Div => a / b,
                _ => a.powf(b),
            };
            (v, Ty::Num)
        }
        ExprKind::Call(f, args) if args.len() == 2 && BINARY_FNS.iter().any(|u| u.0 == f.name) => {
            let op = BINARY_FNS
                .iter()
                .find(|u| u.0 == f.name)
                .map(|u| u.1)
                .unwrap_or(BinOp::Max);
            (
                crate::ops::binary_f64(op, num(&args[0])?, num(&args[1])?),
                Ty::Num,
            )
        }
        ExprKind::Call(f, args) if args.len() == 1 && UNARY_FNS.iter().any(|u| u.0 == f.name) => {
            let op = UNARY_FNS
                .iter()
                .find(|u| u.0 == f.name)
                .map(|u| u.1)
                .unwrap_or(UnOp::Abs);
            (crate::ops::unary_f64(op, num(&args[0])?), Ty::Num)
        }
        _ => {
            return Err(Box::new(
                Diagnostic::error(
                    "E0306",
                    "a hyperparameter default must be a constant",
                    e.span,
                    "not a constant",
                )
                .with_help(
                    "write a number, `true`/`false`, or arithmetic on numbers such as `1/3`",
                ),
            ))
        }
    })
}

impl<'a> Checker<'a> {
    fn error(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    /// Whether a table of `len` entries has room for one more; reports the declaration that
    /// would cross the limit (once per table).
    fn room(&mut self, table: &'static str, len: usize, span: Span) -> bool {
        if len < MAX_ENTRIES {
            return true;
        }
        if self.full.insert(table) {
            self.error(
                Diagnostic::error(
                    "E0316",
                    format!("too many {table} (limit {MAX_ENTRIES})"),
                    span,
                    format!("one more than {MAX_ENTRIES} {table}"),
                )
                .with_note("ids of hyperparameters, buffers, scalar states, scalar inputs and stages are 16-bit"),
            );
        }
        false
    }

    fn declare(&mut self, ident: &ast::Ident, sym: Sym) -> bool {
        if let Some(prev) = self.names.get(&ident.name) {
            let prev_span = prev.span;
            self.error(
                Diagnostic::error(
                    "E0102",
                    format!("`{}` is declared twice", ident.name),
                    ident.span,
                    "declared again here",
                )
                .with_label(prev_span, "first declared here"),
            );
            return false;
        }
        self.names.insert(
            ident.name.clone(),
            Declared {
                sym,
                span: ident.span,
                used: false,
                assigned: false,
                pos: self.order.len(),
            },
        );
        self.order.push(ident.name.clone());
        true
    }

    /// Checks a hyperparameter's `in [lo, hi)` range: constant bounds, a number, the default inside.
    fn hyper_range(
        &mut self,
        h: &ast::Hyper,
        r: &ast::Range,
        ty: Ty,
        default: f64,
    ) -> Option<ir::HyperRange> {
        if ty == Ty::Bool {
            self.error(Diagnostic::error(
                "E0315",
                format!("`{}` is a boolean and cannot have a range", h.name.name),
                r.span,
                "a range of numbers",
            ));
            return None;
        }
        let bound = |ck: &mut Self, e: &ast::Expr| -> Option<f64> {
            match &e.kind {
                ExprKind::Name(n) if n == "inf" => Some(f64::INFINITY),
                ExprKind::Unary(ast::UnOp::Neg, a) if matches!(&a.kind, ExprKind::Name(n) if n == "inf") => {
                    Some(f64::NEG_INFINITY)
                }
                _ => match const_eval(e) {
                    Ok((v, Ty::Num)) => Some(v),
                    Ok((_, Ty::Bool)) => {
                        ck.error(Diagnostic::error(
                            "E0201",
                            "a range bound must be a number",
                            e.span,
                            "a boolean",
                        ));
                        None
                    }
                    Err(d) => {
                        ck.error(*d);
                        None
                    }
                },
            }
        };
        let (lo, hi) = (bound(self, &r.lo), bound(self, &r.hi));
        let range = ir::HyperRange {
            lo: lo?,
            lo_closed: r.lo_closed,
            hi: hi?,
            hi_closed: r.hi_closed,
        };
        if range.lo > range.hi || (range.lo == range.hi && !(range.lo_closed && range.hi_closed)) {
            self.error(Diagnostic::error(
                "E0315",
                format!("the range of `{}` is empty", h.name.name),
                r.span,
                format!("{range} holds no value"),
            ));
            return None;
        }
        if default.is_finite() && !range.contains(default) {
            self.error(
                Diagnostic::error(
                    "E0315",
                    format!("the default of `{}` is outside its range", h.name.name),
                    h.default.span,
                    format!("{default} is not in {range}"),
                )
                .with_label(r.span, "the range"),
            );
        }
        Some(range)
    }

    fn declare_hypers(&mut self) {
        for h in &self.rule.hypers {
            let (default, ty) = match const_eval(&h.default) {
                Ok(v) => v,
                Err(d) => {
                    self.error(*d);
                    (0.0, Ty::Num)
                }
            };
            if !default.is_finite() {
                self.error(Diagnostic::error(
                    "E0312",
                    format!("the default of `{}` is not a finite number", h.name.name),
                    h.default.span,
                    format!("evaluates to {default}"),
                ));
            }
            let range = h
                .range
                .as_ref()
                .and_then(|r| self.hyper_range(h, r, ty, default));
            let id = self.info.hypers.len() as u16;
            if self.room("hyperparameters", self.info.hypers.len(), h.name.span)
                && self.declare(&h.name, Sym::Hyper(id))
            {
                self.info.hypers.push(HyperInfo {
                    name: h.name.name.clone(),
                    ty,
                    default,
                    doc: h.doc.join("\n"),
                    range,
                });
            }
        }
    }

    fn declare_body(&mut self) {
        let rule = self.rule;
        // Declarations first, params before everything else so annotations can name them.
        let mut seen_stmt: Option<Span> = None;
        let mut decls = Vec::new();
        for item in &rule.body {
            match item {
                ast::Item::Decl(d) => {
                    if let Some(s) = seen_stmt {
                        self.error(
                            Diagnostic::error(
                                "E0301",
                                format!("`{}` declaration after a statement", d.kind.keyword()),
                                d.span,
                                "declared here",
                            )
                            .with_label(s, "the first statement")
                            .with_help("move declarations to the top of the rule body"),
                        );
                    }
                    decls.push(d);
                }
                ast::Item::Stmt(s) => {
                    seen_stmt.get_or_insert(s.span);
                }
                ast::Item::Stage(s) => {
                    seen_stmt.get_or_insert(s.span);
                }
            }
        }
        for d in decls.iter().filter(|d| d.kind == DeclKind::Param) {
            for e in &d.entries {
                if e.ty.is_some() || e.init.is_some() {
                    let span = e
                        .init
                        .as_ref()
                        .map(|i| i.span)
                        .or(e.ty.as_ref().map(|t| t.span()));
                    self.error(
                        Diagnostic::error(
                            "E0305",
                            "a param takes no type or initializer",
                            span.unwrap_or(e.name.span),
                            "not allowed here",
                        )
                        .with_note("the host owns params and gives their values"),
                    );
                }
                let id = self.info.buffers.len() as BufId;
                if self.room("buffers", self.info.buffers.len(), e.name.span)
                    && self.declare(&e.name, Sym::Buf(id))
                {
                    self.info.spaces.push(e.name.name.clone());
                    self.info.buffers.push(BufInfo {
                        name: e.name.name.clone(),
                        role: BufRole::Param,
                        space: (self.info.spaces.len() - 1) as u16,
                        axis: false,
                    });
                }
            }
        }
        if self.info.spaces.is_empty() {
            self.error(
                Diagnostic::error(
                    "E0303",
                    format!("rule `{}` has no param", rule.name.name),
                    rule.name.span,
                    "this rule",
                )
                .with_help("declare the parameter the rule updates, e.g. `param theta`"),
            );
            return;
        }
        for d in decls.iter().filter(|d| d.kind != DeclKind::Param) {
            for e in &d.entries {
                self.declare_entry(d.kind, e);
            }
        }
        // Statements or stages, not both.
        let stmts: Vec<&ast::Stmt> = rule
            .body
            .iter()
            .filter_map(|i| {
                if let ast::Item::Stmt(s) = i {
                    Some(s)
                } else {
                    None
                }
            })
            .collect();
        let stages: Vec<&ast::Stage> = rule
            .body
            .iter()
            .filter_map(|i| {
                if let ast::Item::Stage(s) = i {
                    Some(s)
                } else {
                    None
                }
            })
            .collect();
        if !stages.is_empty() {
            if let Some(s) = stmts.first() {
                self.error(
                    Diagnostic::error(
                        "E0302",
                        "statements outside a stage in a rule with stages",
                        s.span,
                        "outside any stage",
                    )
                    .with_label(stages[0].name.span, "the rule has stages")
                    .with_help("put every statement in a `stage`"),
                );
            }
            let mut seen: HashMap<&str, Span> = HashMap::new();
            for s in &stages {
                if !self.room("stages", self.stages.len(), s.name.span) {
                    break;
                }
                if let Some(prev) = seen.insert(&s.name.name, s.name.span) {
                    self.error(
                        Diagnostic::error(
                            "E0102",
                            format!("stage `{}` is declared twice", s.name.name),
                            s.name.span,
                            "declared again here",
                        )
                        .with_label(prev, "first declared here"),
                    );
                }
                self.stages
                    .push((s.name.name.clone(), s.body.iter().collect()));
            }
        } else {
            self.stages.push(("step".to_string(), stmts));
        }
        self.info.stages = self.stages.iter().map(|s| s.0.clone()).collect();
    }

    /// The space an annotation names.
    fn space_of(&mut self, ident: &ast::Ident) -> Option<u16> {
        if let Some(Declared {
            sym: Sym::Buf(b), ..
        }) = self.names.get(&ident.name)
        {
            let b = &self.info.buffers[*b as usize];
            if b.role == BufRole::Param {
                return Some(b.space);
            }
        }
        let mut d = Diagnostic::error(
            "E0307",
            format!("`{}` is not a param", ident.name),
            ident.span,
            "expected the name of a param or `scalar`",
        );
        if let Some(s) = suggest(&ident.name, self.info.spaces.iter().map(|s| s.as_str())) {
            d = d.with_help(format!("did you mean `{s}`?"));
        } else {
            d = d.with_note(format!("the params are: {}", self.info.spaces.join(", ")));
        }
        self.error(d);
        None
    }

    /// The space an unannotated per-element declaration belongs to.
    fn default_space(&mut self, e: &ast::DeclEntry, kind: DeclKind) -> Option<u16> {
        if let Some(init) = &e.init {
            let mut found = None;
            visit_names(init, &mut |n, _| {
                if found.is_none() {
                    if let Some(Declared {
                        sym: Sym::Buf(b), ..
                    }) = self.names.get(n)
                    {
                        found = Some(self.info.buffers[*b as usize].space);
                    }
                }
            });
            if found.is_some() {
                return found;
            }
        }
        if self.info.spaces.len() == 1 {
            return Some(0);
        }
        self.error(
            Diagnostic::error(
                "E0304",
                format!("which param is `{}` shaped like?", e.name.name),
                e.name.span,
                "the rule has several params",
            )
            .with_help(format!(
                "write `{} {}: {}`",
                kind.keyword(),
                e.name.name,
                self.info.spaces[0]
            )),
        );
        None
    }

    /// The axis an annotation asks for (`: samples`, `: samples(x)`, `: particles`,
    /// `: particles(x)`, `: particles scalar`), reporting an unknown axis, an axis on the wrong
    /// declaration, and a second axis; `Err` after an error.
    fn axis_of(&mut self, kind: DeclKind, e: &ast::DeclEntry) -> Result<Option<Axis>, ()> {
        let (name, span) = match &e.ty {
            Some(TypeAnn::Space(i)) if i.name == "samples" || i.name == "particles" => {
                if matches!(self.names.get(&i.name), Some(Declared { sym: Sym::Buf(b), .. })
                    if self.info.buffers[*b as usize].role == BufRole::Param)
                {
                    return Ok(None); // a param of that name
                }
                (i.name.as_str(), i.span)
            }
            Some(TypeAnn::Axis { axis, span, .. }) => (axis.name.as_str(), *span),
            _ => return Ok(None),
        };
        let axis = match name {
            "samples" => Axis::Samples,
            "particles" => Axis::Particles,
            other => {
                self.error(
                    Diagnostic::error(
                        "E0406",
                        format!("unknown axis `{other}`"),
                        span,
                        "not an axis",
                    )
                    .with_help("the axes are `samples` (per-sample inputs: `input G: samples(x)`) and `particles` (an ensemble: `state X: particles(x)`)"),
                );
                return Err(());
            }
        };
        let scalar = matches!(e.ty, Some(TypeAnn::Axis { scalar: true, .. }));
        let allowed = match axis {
            Axis::Samples => kind == DeclKind::Input && !scalar,
            Axis::Particles => (kind == DeclKind::State && !scalar) || kind == DeclKind::Input,
        };
        if !allowed {
            let what = if scalar {
                format!("a scalar {}", kind.keyword())
            } else {
                format!("a {}", kind.keyword())
            };
            let note = match axis {
                Axis::Samples => "the host gives per-sample values (per-sample gradients) as an input `[samples, ...shape]` per tensor; reduce them over the samples with `sample_sum` or `sample_mean`",
                Axis::Particles => "particles are states (`state X: particles`) and inputs (`input G: particles`, `input f: particles scalar`)",
            };
            self.error(
                Diagnostic::error(
                    "E0406",
                    format!("{what} has no `{}` axis", axis.name()),
                    span,
                    "not allowed here",
                )
                .with_note(note),
            );
            return Err(());
        }
        match self.info.axis {
            Some(a) if a != axis => {
                self.error(
                    Diagnostic::error(
                        "E0410",
                        format!("a rule has one axis: this one already has `{}`", a.name()),
                        span,
                        format!("a second axis, `{}`", axis.name()),
                    )
                    .with_note("per-sample inputs and particles cannot be combined in one rule"),
                );
                Err(())
            }
            _ => {
                self.info.axis = Some(axis);
                Ok(Some(axis))
            }
        }
    }

    fn declare_entry(&mut self, kind: DeclKind, e: &'a ast::DeclEntry) {
        let scalar = matches!(
            e.ty,
            Some(TypeAnn::Scalar(_)) | Some(TypeAnn::Axis { scalar: true, .. })
        );
        let Ok(axis) = self.axis_of(kind, e) else {
            return;
        };
        let sampled = axis.is_some();
        match kind {
            DeclKind::Input => {
                if let (Some(init), false) = (&e.init, scalar) {
                    self.error(
                        Diagnostic::error(
                            "E0305",
                            "a per-element input takes no initializer",
                            init.span,
                            "not allowed here",
                        )
                        .with_note("the host gives every per-element input's value at every step")
                        .with_help("a scalar input may have a default, used when the host does not give it: `input q: scalar = uniform()`"),
                    );
                }
                if let (true, true, Some(init)) = (scalar, sampled, &e.init) {
                    self.error(
                        Diagnostic::error(
                            "E0406",
                            "a per-particle scalar input takes no default",
                            init.span,
                            "not allowed here",
                        )
                        .with_note("the host gives one value per particle at every step"),
                    );
                    return;
                }
                if scalar {
                    let id = self.info.scalar_inputs.len() as u16;
                    if self.room("scalar inputs", self.info.scalar_inputs.len(), e.name.span)
                        && self.declare(&e.name, Sym::ScalarInput(id))
                    {
                        self.info.scalar_inputs.push(e.name.name.clone());
                        if sampled {
                            self.info.axis_scalars.push(id);
                        }
                        if let Some(init) = &e.init {
                            self.input_default.insert(id, init);
                        }
                    }
                    return;
                }
            }
            DeclKind::State => {
                if scalar {
                    let id = self.info.scalar_states.len() as u16;
                    if self.room("scalar states", self.info.scalar_states.len(), e.name.span)
                        && self.declare(&e.name, Sym::ScalarState(id))
                    {
                        self.info.scalar_states.push(e.name.name.clone());
                        self.scalar_init.push(e.init.as_ref());
                    }
                    return;
                }
            }
            DeclKind::Random => {
                self.declare_random(e, scalar);
                return;
            }
            DeclKind::Param => unreachable!("params are declared first"),
        }
        let space = match &e.ty {
            Some(TypeAnn::Space(i)) if !sampled => self.space_of(i),
            Some(TypeAnn::Axis { of: Some(i), .. }) => self.space_of(i),
            _ => self.default_space(e, kind),
        };
        let Some(space) = space else { return };
        let id = self.info.buffers.len() as BufId;
        if self.room("buffers", self.info.buffers.len(), e.name.span)
            && self.declare(&e.name, Sym::Buf(id))
        {
            self.info.buffers.push(BufInfo {
                name: e.name.name.clone(),
                role: if kind == DeclKind::Input {
                    BufRole::Input
                } else {
                    BufRole::State
                },
                space,
                axis: sampled,
            });
            if let Some(init) = &e.init {
                self.buf_init.insert(id, init);
            }
        }
    }

    /// `random NAME[: scalar | : PARAM] = normal([seed])` or `uniform([seed])`.
    fn declare_random(&mut self, e: &'a ast::DeclEntry, scalar: bool) {
        let call = match e.init.as_ref().map(|i| &i.kind) {
            Some(ExprKind::Call(f, args)) => Dist::from_name(&f.name).map(|d| (d, args)),
            _ => None,
        };
        let Some((dist, args)) = call else {
            let span = e.init.as_ref().map_or(e.name.span, |i| i.span);
            self.error(
                Diagnostic::error(
                    "E0401",
                    format!("`random {}` must be drawn from `normal()` or `uniform()`", e.name.name),
                    span,
                    if e.init.is_some() { "not a draw" } else { "no distribution" },
                )
                .with_help(format!("write `random {} = normal()`", e.name.name))
                .with_note("a random value is drawn afresh every step; use `let` for values computed from it"),
            );
            return;
        };
        if args.len() > 1 {
            self.error(Diagnostic::error(
                "E0402",
                format!(
                    "`{}` takes at most one argument, its seed, but {} were given",
                    dist.name(),
                    args.len()
                ),
                args[1].span,
                "extra argument",
            ));
            return;
        }
        let kind = if scalar {
            Kind::Scalar
        } else {
            let space = match &e.ty {
                Some(TypeAnn::Space(i)) => self.space_of(i),
                _ => self.default_space(e, DeclKind::Random),
            };
            let Some(space) = space else { return };
            Kind::Element(space)
        };
        let id = self.randoms.len() as u16;
        if self.room("random values", self.randoms.len(), e.name.span)
            && self.declare(&e.name, Sym::Random(id))
        {
            self.randoms.push(RandomDecl {
                dist,
                kind,
                stream: random::named_stream(&e.name.name),
                seed: args.first(),
            });
        }
    }

    /// The first stage that mentions each state (directly, or through another state's initializer).
    fn find_homes(&mut self) {
        for (k, (_, stmts)) in self.stages.iter().enumerate() {
            let mut names = HashSet::new();
            for s in stmts {
                visit_stmt_names(s, &mut |n| {
                    names.insert(n.to_string());
                });
            }
            for n in names {
                self.home.entry(n).or_insert(k);
            }
        }
    }

    fn usage_warnings(&mut self) {
        let mut warns = Vec::new();
        for name in &self.order {
            let d = &self.names[name];
            let w = match d.sym {
                Sym::Hyper(_) if !d.used => {
                    Some(("W0004", format!("hyperparameter `{name}` is never used")))
                }
                Sym::ScalarInput(_) if !d.used => {
                    Some(("W0004", format!("input `{name}` is never used")))
                }
                Sym::ScalarState(_) if !d.used => {
                    Some(("W0003", format!("state `{name}` is never read")))
                }
                Sym::Random(_) if !d.used => {
                    Some(("W0004", format!("random value `{name}` is never used")))
                }
                Sym::Buf(b) => match self.info.buffers[b as usize].role {
                    BufRole::Param if !d.assigned => {
                        Some(("W0002", format!("param `{name}` is never assigned")))
                    }
                    BufRole::Input if !d.used => {
                        Some(("W0004", format!("input `{name}` is never used")))
                    }
                    BufRole::State if !d.used => {
                        Some(("W0003", format!("state `{name}` is never read")))
                    }
                    _ => None,
                },
                _ => None,
            };
            if let Some((code, msg)) = w {
                let mut diag = Diagnostic::error(code, msg, d.span, "declared here");
                diag.severity = optc_grammar::Severity::Warning;
                warns.push(diag);
            }
        }
        self.diags.extend(warns);
    }
}

fn visit_names(e: &ast::Expr, f: &mut impl FnMut(&str, Span)) {
    match &e.kind {
        ExprKind::Name(n) => f(n, e.span),
        ExprKind::Unary(_, a) => visit_names(a, f),
        ExprKind::Binary(_, a, b) => {
            visit_names(a, f);
            visit_names(b, f);
        }
        ExprKind::If(c, a, b) => {
            visit_names(c, f);
            visit_names(a, f);
            visit_names(b, f);
        }
        ExprKind::Call(_, args) => args.iter().for_each(|a| visit_names(a, f)),
        ExprKind::Num(_) | ExprKind::Bool(_) | ExprKind::Step | ExprKind::Error => {}
    }
}

fn visit_stmt_names(s: &ast::Stmt, f: &mut impl FnMut(&str)) {
    match &s.kind {
        StmtKind::Let(_, e) | StmtKind::Out(_, e) => visit_names(e, &mut |n, _| f(n)),
        StmtKind::Assign(n, e) => {
            f(&n.name);
            visit_names(e, &mut |n, _| f(n));
        }
        StmtKind::If { cond, then, els } => {
            visit_names(cond, &mut |n, _| f(n));
            then.iter().chain(els).for_each(|s| visit_stmt_names(s, f));
        }
        StmtKind::Error => {}
    }
}

/// One lowering of the step (first step or later steps).
struct Lowerer<'c, 'a> {
    ck: &'c mut Checker<'a>,
    graph: &'c mut ir::Graph,
    first: bool,
    report: bool,
    stage: u16,
    /// Current value of each buffer (params, states, outputs).
    bufs: Vec<Option<NodeId>>,
    /// Current value of each scalar state.
    scalars: Vec<NodeId>,
    scopes: Vec<Vec<(String, LetBinding)>>,
    /// Set while lowering an initializer: only names declared before this one are visible.
    init_of: Option<usize>,
    /// The statement or initializer being lowered.
    at: Span,
    /// The kind a draw written without a kind of its own takes (see `expr_in`).
    draw_kind: Kind,
    /// Whether a draw was lowered since `expr_in` last cleared it.
    drew: bool,
    /// Whether draws written now are per particle (an assignment to, or the initializer of, a
    /// per-particle state).
    particle_draws: bool,
}

impl<'c, 'a> Lowerer<'c, 'a> {
    fn run(
        ck: &'c mut Checker<'a>,
        graph: &'c mut ir::Graph,
        first: bool,
        report: bool,
    ) -> ir::Variant {
        let nbuf = ck.info.buffers.len();
        let mut lw = Lowerer {
            ck,
            graph,
            first,
            report,
            stage: 0,
            bufs: vec![None; nbuf],
            scalars: Vec::new(),
            scopes: vec![Vec::new()],
            init_of: None,
            at: Span::default(),
            draw_kind: Kind::Scalar,
            drew: false,
            particle_draws: false,
        };
        let mut variant = ir::Variant::default();
        let nstages = lw.ck.stages.len();
        let mut scalar_start = Vec::new();
        for k in 0..nstages {
            lw.stage = k as u16;
            let starts = lw.start_stage(k);
            if k == 0 {
                for i in 0..lw.ck.info.scalar_states.len() {
                    let init = match lw.ck.scalar_init[i] {
                        Some(init) if first || lw.report => Some(lw.scalar_init(init, i)),
                        _ => None,
                    };
                    let v = match (first, init) {
                        (true, Some(v)) => v,
                        (true, None) => lw.add(Node::num(0.0)),
                        (false, _) => lw.add(Node::ScalarState(i as u16)),
                    };
                    lw.scalars.push(v);
                }
                scalar_start = lw.scalars.clone();
                if first {
                    // The initial value of a scalar state is stored even if no statement changes it.
                    scalar_start = (0..lw.scalars.len())
                        .map(|i| lw.add(Node::ScalarState(i as u16)))
                        .collect();
                }
            }
            let stmts = lw.ck.stages[k].1.clone();
            for s in stmts {
                lw.stmt(s);
            }
            let mut stage = ir::Stage::default();
            for b in 0..lw.bufs.len() {
                if let Some(v) = lw.bufs[b] {
                    if Some(v) != starts.get(b).copied().flatten() {
                        stage.stores.push((b as BufId, v));
                    }
                }
            }
            variant.stages.push(stage);
            // Per-element lets do not survive their stage; scalar ones do (checked on use).
        }
        for (i, &v) in lw.scalars.iter().enumerate() {
            if scalar_start.get(i) != Some(&v) {
                variant.scalar_updates.push((i as u16, v));
            }
        }
        if lw.report {
            let top = std::mem::take(&mut lw.scopes[0]);
            lw.warn_unused(top);
        }
        variant
    }

    fn add(&mut self, node: Node) -> NodeId {
        let id = self.graph.add(node, &self.ck.info);
        let depths = &mut self.ck.node_depth;
        let depth = 1 + node
            .children()
            .iter()
            .map(|c| depths[c.0 as usize])
            .max()
            .unwrap_or(0);
        depths.push(depth);
        let sampled = match node {
            Node::Load { buf, .. } => self.ck.info.buffers[buf as usize].axis,
            Node::ScalarInput(i) => self.ck.info.axis_scalars.contains(&i),
            Node::ParticleDraw { .. } => true,
            Node::AxisReduce { .. } | Node::Count(_) => false,
            n => n
                .children()
                .iter()
                .any(|c| self.ck.node_sampled[c.0 as usize]),
        };
        self.ck.node_sampled.push(sampled);
        if depth > MAX_VALUE_DEPTH && !self.ck.deep_reported {
            self.ck.deep_reported = true;
            self.ck.error(
                Diagnostic::error(
                    "E0317",
                    format!(
                        "a value computed by a chain of more than {MAX_VALUE_DEPTH} operations"
                    ),
                    self.at,
                    format!("the chain passes {MAX_VALUE_DEPTH} operations here"),
                )
                .with_help("split the rule into stages, or keep intermediate values in states"),
            );
        }
        id
    }

    fn error(&mut self, d: Diagnostic) {
        if self.report {
            self.ck.error(d);
        }
    }

    /// Sets every buffer to its value at the start of stage `k`; returns the load nodes, so the
    /// end of the stage can tell which buffers changed.
    fn start_stage(&mut self, k: usize) -> Vec<Option<NodeId>> {
        let mut starts = vec![None; self.bufs.len()];
        for b in 0..self.bufs.len() {
            let info = &self.ck.info.buffers[b];
            match info.role {
                BufRole::Param | BufRole::State => {
                    let load = self.add(Node::Load {
                        buf: b as BufId,
                        gen: k as u16,
                    });
                    starts[b] = Some(load);
                    self.bufs[b] = Some(load);
                }
                BufRole::Output => self.bufs[b] = None,
                BufRole::Input => {}
            }
        }
        if self.first || self.report {
            // States first used in this stage start from their initializers (checked once, in the
            // reporting lowering; used in the first-step lowering).
            for b in 0..self.bufs.len() {
                let info = &self.ck.info.buffers[b];
                if info.role == BufRole::State && self.ck.home.get(&info.name) == Some(&k) {
                    let on_axis = info.axis;
                    let (v, span) = match self.ck.buf_init.get(&(b as BufId)).copied() {
                        Some(init) => {
                            let pos = self.decl_pos(&info.name.clone());
                            let ctx = Kind::Element(info.space);
                            let saved = std::mem::replace(&mut self.particle_draws, on_axis);
                            let v = self.lower_init(init, pos, ctx);
                            self.particle_draws = saved;
                            (v, Some(init.span))
                        }
                        // A per-particle state without an initializer starts from its buffers,
                        // which the host sets (the particles' starting points).
                        None if on_axis => continue,
                        None => (self.add(Node::num(0.0)), None),
                    };
                    let v = self.fit_to_buffer(v, b as BufId, span).unwrap_or(v);
                    if self.first {
                        self.bufs[b] = Some(v);
                    }
                }
            }
        }
        starts
    }

    /// Position of a declared name in declaration order.
    fn decl_pos(&self, name: &str) -> usize {
        self.ck.names.get(name).map_or(0, |d| d.pos)
    }

    /// Lowers and checks the initializer of scalar state `i`.
    fn scalar_init(&mut self, init: &ast::Expr, i: usize) -> NodeId {
        let name = self.ck.info.scalar_states[i].clone();
        let v = self.lower_init(init, self.decl_pos(&name), Kind::Scalar);
        if self.graph.ty(v) == Ty::Bool {
            self.error(Diagnostic::error(
                "E0201",
                format!("scalar state `{name}` holds a number, but this is a boolean"),
                init.span,
                "a boolean",
            ));
        } else if self.graph.kind(v) != Kind::Scalar {
            let k = self.kind_name(self.graph.kind(v));
            self.error(
                Diagnostic::error(
                    "E0202",
                    format!("scalar state `{name}` cannot start from a value that is {k}"),
                    init.span,
                    "not a scalar",
                )
                .with_help("reduce it first, e.g. with `sum`, `mean` or `norm`"),
            );
        } else if self
            .not_per_sample(v, init.span, &format!("scalar state `{name}`"))
            .is_none()
        {
            return self.add(Node::num(0.0));
        }
        v
    }

    /// Lowers an initializer, seeing only names declared before position `pos`; draws in it
    /// take the kind `ctx` of the value it initializes.
    fn lower_init(&mut self, init: &ast::Expr, pos: usize, ctx: Kind) -> NodeId {
        let scopes = std::mem::replace(&mut self.scopes, vec![Vec::new()]);
        let saved = self.init_of.replace(pos);
        self.at = init.span;
        let v = self
            .expr_in(init, Some(ctx))
            .unwrap_or_else(|| self.add(Node::num(0.0)));
        self.init_of = saved;
        self.scopes = scopes;
        v
    }

    /// Makes `v` storable in buffer `b`: broadcasts scalars, rejects other spaces and booleans.
    fn fit_to_buffer(&mut self, v: NodeId, b: BufId, at: Option<Span>) -> Option<NodeId> {
        let space = self.ck.info.buffers[b as usize].space;
        let name = self.ck.info.buffers[b as usize].name.clone();
        if let (Some(span), false) = (at, self.ck.info.buffers[b as usize].axis) {
            self.not_per_sample(v, span, &format!("`{name}`"))?;
        }
        if self.graph.ty(v) == Ty::Bool {
            if let Some(span) = at {
                self.error(Diagnostic::error(
                    "E0201",
                    format!("`{name}` holds numbers, but this is a boolean"),
                    span,
                    "a boolean",
                ));
            }
            return None;
        }
        match self.graph.kind(v) {
            Kind::Element(s) if s == space => Some(v),
            Kind::Scalar => Some(self.add(Node::Splat(space, v))),
            Kind::Tensor(s) if s == space => Some(self.add(Node::Splat(space, v))),
            Kind::Element(s) | Kind::Tensor(s) => {
                if let Some(span) = at {
                    let (a, b2) = (
                        self.ck.info.spaces[space as usize].clone(),
                        self.ck.info.spaces[s as usize].clone(),
                    );
                    self.error(
                        Diagnostic::error("E0203", format!("`{name}` is shaped like `{a}`, but this value is shaped like `{b2}`"), span, format!("shaped like `{b2}`"))
                            .with_note("values of different params have different sizes and cannot be mixed"),
                    );
                }
                None
            }
        }
    }

    /// The error for a use of an axis the rule does not have.
    fn no_axis(&self, axis: Axis, span: Span) -> Diagnostic {
        let (what, help) = match axis {
            Axis::Samples => (
                "a sample-axis input",
                "declare the per-sample input as `input G: samples` (or `input G: samples(x)`)",
            ),
            Axis::Particles => (
                "particles",
                "declare the ensemble as `state X: particles` (or `state X: particles(x)`)",
            ),
        };
        Diagnostic::error(
            "E0408",
            format!(
                "`{}` and the `{}_*` reductions need {what}, but this rule has none",
                axis.name(),
                axis.prefix()
            ),
            span,
            format!("no {}", axis.name()),
        )
        .with_help(help)
    }

    /// Reports a per-sample value where one value for all samples is needed (a store, a
    /// scalar state, a statement `if`'s condition); `None` after the error.
    fn not_per_sample(&mut self, v: NodeId, span: Span, what: &str) -> Option<NodeId> {
        if !self.ck.node_sampled[v.0 as usize] {
            return Some(v);
        }
        let (one, help) = match self.ck.info.axis {
            Some(Axis::Particles) => (
                "particle",
                "reduce it over the particles first (`particle_sum`, `particle_mean`, `particle_max`, `particle_min`), or keep it in a state declared `: particles`",
            ),
            _ => (
                "sample",
                "reduce it over the samples first, with `sample_sum`, `sample_mean` or `sample_max`",
            ),
        };
        let msg = if what == "if" {
            format!("an `if` statement cannot branch on a value that differs from {one} to {one}")
        } else {
            format!("{what} cannot hold a value that differs from {one} to {one}")
        };
        self.error(Diagnostic::error("E0407", msg, span, format!("per {one}")).with_help(help));
        None
    }

    fn lookup_let(&mut self, name: &str) -> Option<&mut LetBinding> {
        self.scopes
            .iter_mut()
            .rev()
            .flat_map(|s| s.iter_mut().rev())
            .find(|(n, _)| n == name)
            .map(|(_, b)| b)
    }

    fn warn_unused(&mut self, scope: Vec<(String, LetBinding)>) {
        if !self.report {
            return;
        }
        for (name, b) in scope {
            if !b.used && !name.starts_with('_') {
                let mut d = Diagnostic::error(
                    "W0001",
                    format!("`{name}` is never used"),
                    b.span,
                    "defined here",
                )
                .with_help(format!("remove it, or name it `_{name}`"));
                d.severity = optc_grammar::Severity::Warning;
                self.ck.diags.push(d);
            }
        }
    }

    fn all_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .scopes
            .iter()
            .flatten()
            .map(|(n, _)| n.clone())
            .collect();
        v.extend(self.ck.names.keys().cloned());
        v
    }

    fn unknown_name(&mut self, name: &str, span: Span, assigned: bool) {
        if !self.ck.unknown.insert(name.to_string()) {
            return; // reported at its first use
        }
        let names = self.all_names();
        let mut d = Diagnostic::error(
            "E0101",
            format!("unknown name `{name}`"),
            span,
            "not declared",
        );
        if let Some(s) = suggest(name, names.iter().map(|s| s.as_str())) {
            d = d.with_help(format!("did you mean `{s}`?"));
        } else {
            d = d.with_help(if assigned {
                format!("declare it at the top of the rule, e.g. `state {name} = 0`")
            } else {
                "declare it as a hyperparameter, `param`, `input` or `state`, or define it with `let`".to_string()
            });
        }
        self.error(d);
    }

    fn name(&mut self, name: &str, span: Span) -> Option<NodeId> {
        let stage = self.stage;
        if self.init_of.is_none() {
            if let Some(b) = self.lookup_let(name) {
                b.used = true;
                let (node, bstage, bspan) = (b.node, b.stage, b.span);
                if bstage != stage && matches!(self.graph.kind(node), Kind::Element(_)) {
                    self.error(
                        Diagnostic::error("E0207", format!("per-element value `{name}` is from an earlier stage"), span, "used here")
                            .with_label(bspan, "defined here, in an earlier stage")
                            .with_help("per-element values do not outlive their stage; keep it in a `state` instead"),
                    );
                    return None;
                }
                return Some(node);
            }
        }
        if (name == "samples" || name == "particles") && !self.ck.names.contains_key(name) {
            let axis = if name == "samples" {
                Axis::Samples
            } else {
                Axis::Particles
            };
            if self.ck.info.axis == Some(axis) {
                return Some(self.add(Node::Count(axis)));
            }
            if self.ck.unknown.insert(name.to_string()) {
                self.error(self.no_axis(axis, span));
            }
            return None;
        }
        let Some(decl) = self.ck.names.get_mut(name) else {
            self.unknown_name(name, span, false);
            return None;
        };
        decl.used = true;
        let (sym, dspan) = (decl.sym, decl.span);
        if let Some(pos) = self.init_of {
            let at = self
                .ck
                .order
                .iter()
                .position(|n| n == name)
                .unwrap_or(usize::MAX);
            let is_state = matches!(sym, Sym::ScalarState(_))
                || matches!(sym, Sym::Buf(b) if self.ck.info.buffers[b as usize].role == BufRole::State);
            if is_state && at >= pos {
                let me = self.ck.order[pos].clone();
                self.error(
                    Diagnostic::error("E0314", format!("the initializer of `{me}` reads `{name}`, which is declared after it or is itself"), span, "read here")
                        .with_label(dspan, "declared here")
                        .with_help("an initializer may read hyperparameters, `t`, params, inputs and states declared before it"),
                );
                return None;
            }
        }
        Some(match sym {
            Sym::Random(i) => {
                let d = self.ck.randoms[i as usize].clone();
                let seed = match d.seed {
                    Some(s) => Some(self.draw_seed(s, d.dist)?),
                    None => None,
                };
                self.drew = true;
                self.add(Node::Random {
                    dist: d.dist,
                    stream: d.stream,
                    kind: d.kind,
                    seed,
                })
            }
            Sym::Hyper(h) => self.add(Node::Hyper(h)),
            Sym::ScalarInput(i) => match self.ck.input_default.get(&i).copied() {
                None => self.add(Node::ScalarInput(i)),
                Some(init) => {
                    // The default, one value per step: its draws belong to stage 0 whichever
                    // stage reads it, so every stage sees the same value.
                    let (stage, at) = (self.stage, self.at);
                    self.stage = 0;
                    let d = self.lower_init(init, self.decl_pos(name), Kind::Scalar);
                    self.stage = stage;
                    self.at = at;
                    let k = self.graph.kind(d);
                    if self.graph.ty(d) != Ty::Num || k != Kind::Scalar {
                        let what = if self.graph.ty(d) != Ty::Num {
                            "a boolean".to_string()
                        } else {
                            self.kind_name(k)
                        };
                        self.error(
                            Diagnostic::error(
                                "E0405",
                                format!("the default of scalar input `{name}` must be one number per step, but this is {what}"),
                                init.span,
                                "not one number per step",
                            )
                            .with_label(span, "read here"),
                        );
                        return None;
                    }
                    self.add(Node::InputOr(i, d))
                }
            },
            Sym::ScalarState(i) if self.ck.info.scalar_outs.contains(&i) => {
                self.error(
                    Diagnostic::error("E0209", format!("output `{name}` cannot be read"), span, "read here")
                        .with_note("outputs are written for the host; keep the value in a `let` or a `state` to read it"),
                );
                return None;
            }
            Sym::ScalarState(i) => match self.scalars.get(i as usize) {
                Some(&v) => v,
                None => {
                    // Another scalar state's initializer reads this one before it is set.
                    self.add(Node::ScalarState(i))
                }
            },
            Sym::Buf(b) => match self.ck.info.buffers[b as usize].role {
                BufRole::Input => self.add(Node::Load { buf: b, gen: 0 }),
                BufRole::Param | BufRole::State => {
                    self.bufs[b as usize].expect("set at stage start")
                }
                BufRole::Output => {
                    self.error(
                        Diagnostic::error("E0209", format!("output `{name}` cannot be read"), span, "read here")
                            .with_note("outputs are written for the host; keep the value in a `let` or a `state` to read it"),
                    );
                    return None;
                }
            },
        })
    }

    fn expect_num(&mut self, v: NodeId, span: Span, what: &str) -> Option<NodeId> {
        if self.graph.ty(v) == Ty::Num {
            Some(v)
        } else {
            self.error(
                Diagnostic::error(
                    "E0201",
                    format!("{what} needs a number, found a boolean"),
                    span,
                    "a boolean",
                )
                .with_help("use `if c { a } else { b }` to turn a condition into a number"),
            );
            None
        }
    }

    fn expect_bool(&mut self, v: NodeId, span: Span, what: &str) -> Option<NodeId> {
        if self.graph.ty(v) == Ty::Bool {
            Some(v)
        } else {
            self.error(
                Diagnostic::error(
                    "E0201",
                    format!("{what} needs a boolean, found a number"),
                    span,
                    "a number",
                )
                .with_help("compare it, e.g. `x > 0`"),
            );
            None
        }
    }

    fn kind_name(&self, k: Kind) -> String {
        match k {
            Kind::Scalar => "a scalar".into(),
            Kind::Tensor(s) => format!("per tensor of `{}`", self.ck.info.spaces[s as usize]),
            Kind::Element(s) => format!("per element of `{}`", self.ck.info.spaces[s as usize]),
        }
    }

    /// Checks that values can be combined elementwise.
    fn join(&mut self, parts: &[(NodeId, Span)]) -> bool {
        let mut acc = Kind::Scalar;
        let mut acc_span = parts[0].1;
        for &(v, span) in parts {
            let k = self.graph.kind(v);
            match acc.join(k) {
                Some(j) => {
                    if j != acc && k != Kind::Scalar {
                        acc_span = span;
                    }
                    acc = j;
                }
                None => {
                    let (ka, kb) = (self.kind_name(acc), self.kind_name(k));
                    self.error(
                        Diagnostic::error("E0203", "values of different params cannot be mixed", span, format!("this is {kb}"))
                            .with_label(acc_span, format!("this is {ka}"))
                            .with_note("each param has its own size; combine them through reductions such as `dot` or `norm`"),
                    );
                    return false;
                }
            }
        }
        true
    }

    fn expr(&mut self, e: &ast::Expr) -> Option<NodeId> {
        match &e.kind {
            ExprKind::Num(v) => {
                if !v.is_finite() {
                    self.error(Diagnostic::error(
                        "E0312",
                        "number literal out of range",
                        e.span,
                        "too large for a 64-bit float",
                    ));
                    return None;
                }
                Some(self.add(Node::num(*v)))
            }
            ExprKind::Bool(b) => Some(self.add(Node::Bool(*b))),
            ExprKind::Step => Some(if self.first {
                self.add(Node::num(1.0))
            } else {
                self.add(Node::Step)
            }),
            ExprKind::Name(n) => self.name(n, e.span),
            ExprKind::Error => None,
            ExprKind::Unary(op, a) => {
                let v = self.expr(a)?;
                match op {
                    ast::UnOp::Neg => {
                        let v = self.expect_num(v, a.span, "`-`")?;
                        Some(self.add(Node::Unary(UnOp::Neg, v)))
                    }
                    ast::UnOp::Not => {
                        let v = self.expect_bool(v, a.span, "`!`")?;
                        Some(self.add(Node::Unary(UnOp::Not, v)))
                    }
                }
            }
            ExprKind::Binary(op, a, b) => {
                let va = self.expr(a);
                let vb = self.expr(b);
                let (va, vb) = (va?, vb?);
                let what = format!("`{}`", op.symbol());
                let irop = match op {
                    ast::BinOp::Add => BinOp::Add,
                    ast::BinOp::Sub => BinOp::Sub,
                    ast::BinOp::Mul => BinOp::Mul,
                    ast::BinOp::Div => BinOp::Div,
                    ast::BinOp::Rem => BinOp::Rem,
                    ast::BinOp::Pow => BinOp::Pow,
                    ast::BinOp::Eq => BinOp::Eq,
                    ast::BinOp::Ne => BinOp::Ne,
                    ast::BinOp::Lt => BinOp::Lt,
                    ast::BinOp::Le => BinOp::Le,
                    ast::BinOp::Gt => BinOp::Gt,
                    ast::BinOp::Ge => BinOp::Ge,
                    ast::BinOp::And => BinOp::And,
                    ast::BinOp::Or => BinOp::Or,
                };
                let both_bool = self.graph.ty(va) == Ty::Bool && self.graph.ty(vb) == Ty::Bool;
                if matches!(irop, BinOp::And | BinOp::Or)
                    || (both_bool && matches!(irop, BinOp::Eq | BinOp::Ne))
                {
                    let a2 = self.expect_bool(va, a.span, &what);
                    let b2 = self.expect_bool(vb, b.span, &what);
                    let (va, vb) = (a2?, b2?);
                    if !self.join(&[(va, a.span), (vb, b.span)]) {
                        return None;
                    }
                    return Some(self.add(Node::Binary(irop, va, vb)));
                }
                let a2 = self.expect_num(va, a.span, &what);
                let b2 = self.expect_num(vb, b.span, &what);
                let (va, vb) = (a2?, b2?);
                if !self.join(&[(va, a.span), (vb, b.span)]) {
                    return None;
                }
                Some(self.add(Node::Binary(irop, va, vb)))
            }
            ExprKind::If(c, a, b) => {
                let vc = self.expr(c);
                let va = self.expr(a);
                let vb = self.expr(b);
                let vc = self.expect_bool(vc?, c.span, "an `if` condition")?;
                let (va, vb) = (va?, vb?);
                if self.graph.ty(va) != self.graph.ty(vb) {
                    self.error(
                        Diagnostic::error(
                            "E0201",
                            "the branches of `if` have different types",
                            b.span,
                            "this branch",
                        )
                        .with_label(a.span, "the other branch"),
                    );
                    return None;
                }
                if !self.join(&[(vc, c.span), (va, a.span), (vb, b.span)]) {
                    return None;
                }
                Some(self.add(Node::Select(vc, va, vb)))
            }
            ExprKind::Call(f, args) => self.call(f, args, e.span),
        }
    }

    fn arity(&mut self, f: &ast::Ident, args: &[ast::Expr], n: usize, span: Span) -> bool {
        if args.len() == n {
            return true;
        }
        self.error(Diagnostic::error(
            "E0105",
            format!(
                "`{}` takes {n} argument{}, but {} {} given",
                f.name,
                if n == 1 { "" } else { "s" },
                args.len(),
                if args.len() == 1 { "was" } else { "were" }
            ),
            span,
            format!("expected {n}"),
        ));
        false
    }

    /// Lowers `e` with the draws written in it without a kind of their own (`normal()`) taking
    /// the kind `ctx` (that of the value a statement assigns), or, without one, the kind of the
    /// rest of the expression: one value per step when it is scalar, per element when it is
    /// per element (`let d = g * normal()`), found by lowering it again.
    fn expr_in(&mut self, e: &ast::Expr, ctx: Option<Kind>) -> Option<NodeId> {
        let saved = (self.draw_kind, self.drew);
        self.drew = false;
        let v = match ctx {
            Some(k) => {
                self.draw_kind = k;
                self.expr(e)
            }
            None => {
                self.draw_kind = Kind::Scalar;
                let v = self.expr(e);
                match v {
                    Some(v) if self.drew && self.graph.kind(v) != Kind::Scalar => {
                        // The same expression again, with the draws of its kind; everything it
                        // could report was reported by the first lowering.
                        self.draw_kind = self.graph.kind(v);
                        let report = std::mem::replace(&mut self.report, false);
                        let w = self.expr(e);
                        self.report = report;
                        w
                    }
                    other => other,
                }
            }
        };
        self.draw_kind = saved.0;
        self.drew |= saved.1;
        v
    }

    /// The seed argument of a draw: a number, one value per step.
    fn draw_seed(&mut self, s: &ast::Expr, dist: Dist) -> Option<NodeId> {
        let v = self.expr_in(s, Some(Kind::Scalar))?;
        let v = self.expect_num(v, s.span, &format!("the seed of `{}`", dist.name()))?;
        let k = self.graph.kind(v);
        if k != Kind::Scalar {
            let kn = self.kind_name(k);
            self.error(
                Diagnostic::error(
                    "E0403",
                    format!("the seed of `{}` must be one value per step, but this is {kn}", dist.name()),
                    s.span,
                    "not a scalar",
                )
                .with_note("a seed keys every element's draw; a hyperparameter or a scalar input can be one"),
            );
            return None;
        }
        Some(v)
    }

    /// `uniform()` / `normal()`, optionally with a seed: a draw of the current draw kind.
    fn draw(&mut self, f: &ast::Ident, dist: Dist, args: &[ast::Expr]) -> Option<NodeId> {
        if args.len() > 1 {
            self.error(
                Diagnostic::error(
                    "E0402",
                    format!(
                        "`{}` takes at most one argument, its seed, but {} were given",
                        dist.name(),
                        args.len()
                    ),
                    args[1].span,
                    "extra argument",
                )
                .with_help("a draw's shape comes from where it is used; declare `random z: PARAM = normal()` to choose it"),
            );
            return None;
        }
        let seed = match args.first() {
            Some(s) => Some(self.draw_seed(s, dist)?),
            None => None,
        };
        let stage = self.stage;
        let key = (stage, f.span.start);
        let site = match self.ck.draw_sites.get(&key) {
            Some(&s) => s,
            None => {
                let n = self.ck.sites_per_stage.entry(stage).or_insert(0);
                if usize::from(stage) >= random::MAX_DRAW_STAGES
                    || usize::from(*n) + 1 >= random::MAX_SITES
                {
                    self.error(Diagnostic::error(
                        "E0404",
                        format!(
                            "too many random draws: a stage may write {} and a rule with draws may have {} stages",
                            random::MAX_SITES - 1,
                            random::MAX_DRAW_STAGES
                        ),
                        f.span,
                        "one draw too many",
                    ));
                    return None;
                }
                let s = *n;
                *n += 1;
                self.ck.draw_sites.insert(key, s);
                s
            }
        };
        self.drew = true;
        if self.particle_draws && seed.is_none() {
            if let Kind::Element(_) = self.draw_kind {
                return Some(self.add(Node::ParticleDraw {
                    dist,
                    stream: random::inline_stream(stage, site),
                    kind: self.draw_kind,
                }));
            }
        }
        Some(self.add(Node::Random {
            dist,
            stream: random::inline_stream(stage, site),
            kind: self.draw_kind,
            seed,
        }))
    }

    fn call(&mut self, f: &ast::Ident, args: &[ast::Expr], span: Span) -> Option<NodeId> {
        let name = f.name.as_str();
        if let Some(dist) = Dist::from_name(name) {
            return self.draw(f, dist, args);
        }
        if let Some(&(_, op)) = UNARY_FNS.iter().find(|u| u.0 == name) {
            if !self.arity(f, args, 1, span) {
                return None;
            }
            let v = self.expr(&args[0])?;
            let v = self.expect_num(v, args[0].span, &format!("`{name}`"))?;
            return Some(self.add(Node::Unary(op, v)));
        }
        if let Some(&(_, op)) = BINARY_FNS.iter().find(|u| u.0 == name) {
            if !self.arity(f, args, 2, span) {
                return None;
            }
            return self
                .num_args(args, name)
                .map(|v| self.add(Node::Binary(op, v[0], v[1])));
        }
        if let Some((axis, op)) = axis_fn(name) {
            if !self.arity(f, args, 1, span) {
                return None;
            }
            let v = self.expr(&args[0])?;
            let v = self.expect_num(v, args[0].span, &format!("`{name}`"))?;
            if self.ck.info.axis != Some(axis) {
                let d = self.no_axis(axis, f.span);
                self.error(d);
                return None;
            }
            if !self.ck.node_sampled[v.0 as usize] {
                let what = match axis {
                    Axis::Samples => "sample",
                    Axis::Particles => "particle",
                };
                self.error(
                    Diagnostic::error(
                        "E0409",
                        format!("`{name}` reduces over the {}, but this value is the same for every {what}", axis.name()),
                        args[0].span,
                        format!("not per {what}"),
                    )
                    .with_note(match axis {
                        Axis::Samples => "per-sample values are those computed from an input declared `: samples`",
                        Axis::Particles => "per-particle values are those computed from a state or input declared `: particles`",
                    }),
                );
                return None;
            }
            let red = |s: &mut Self, op, arg| s.add(Node::AxisReduce { axis, op, arg });
            return Some(match op {
                "max" => red(self, ReduceOp::Max, v),
                "min" => {
                    let neg = self.add(Node::Unary(UnOp::Neg, v));
                    let m = red(self, ReduceOp::Max, neg);
                    self.add(Node::Unary(UnOp::Neg, m))
                }
                _ => {
                    let s = red(self, ReduceOp::Sum, v);
                    if op == "mean" {
                        let n = self.add(Node::Count(axis));
                        self.add(Node::Binary(BinOp::Div, s, n))
                    } else {
                        s
                    }
                }
            });
        }
        if name == "tensor_count" {
            if !self.arity(f, args, 1, span) {
                return None;
            }
            let v = self.num_args_in(args, name, None)?;
            let Some(space) = self.graph.kind(v[0]).space() else {
                self.error(
                    Diagnostic::error(
                        "E0204",
                        "`tensor_count` counts the tensors of a param, but this value is a scalar",
                        args[0].span,
                        "a scalar",
                    )
                    .with_help(
                        "write `tensor_count(x)` for a param `x`, or a value shaped like one",
                    ),
                );
                return None;
            };
            return Some(self.add(Node::TensorCount(space)));
        }
        if name == "clamp" {
            if !self.arity(f, args, 3, span) {
                return None;
            }
            let v = self.num_args(args, name)?;
            let lo = self.add(Node::Binary(BinOp::Max, v[0], v[1]));
            return Some(self.add(Node::Binary(BinOp::Min, lo, v[2])));
        }
        let (per_tensor, base) = match name.strip_prefix("tensor_") {
            Some(b) => (true, b),
            None => (false, name),
        };
        if let Some(&(_, n)) = REDUCTIONS.iter().find(|r| r.0 == base) {
            if !self.arity(f, args, n, span) {
                return None;
            }
            let v = self.num_args_in(args, name, None)?;
            // Over per-tensor values (`sum(tensor_dot(G, g))`): a reduction over the tensors.
            let tensor_kinds = v
                .iter()
                .all(|&a| matches!(self.graph.kind(a), Kind::Tensor(_)));
            if tensor_kinds && !per_tensor {
                if !self.join(
                    &args
                        .iter()
                        .zip(&v)
                        .map(|(a, &x)| (x, a.span))
                        .collect::<Vec<_>>(),
                ) {
                    return None;
                }
                let space = self.graph.kind(v[0]).space().unwrap_or(0);
                return Some(self.reduction(
                    base,
                    &v,
                    |op, arg| Node::TensorReduce { op, arg },
                    Node::TensorCount(space),
                ));
            }
            for (i, &a) in v.iter().enumerate() {
                if !matches!(self.graph.kind(a), Kind::Element(_)) {
                    let k = self.kind_name(self.graph.kind(a));
                    self.error(
                        Diagnostic::error(
                            "E0204",
                            format!("`{name}` reduces a per-element value, but this is {k}"),
                            args[i].span,
                            "not per element",
                        )
                        .with_help(
                            "reductions run over the elements of a param, an input or a state, or (`sum`, `norm`, ... without `tensor_`) over the tensors of a per-tensor value",
                        ),
                    );
                    return None;
                }
            }
            let space = self.graph.kind(v[0]).space().unwrap_or(0);
            return Some(self.reduction(
                base,
                &v,
                |op, arg| Node::Reduce {
                    op,
                    per_tensor,
                    arg,
                },
                Node::Numel { space, per_tensor },
            ));
        }
        let names = function_names();
        let mut d = Diagnostic::error(
            "E0104",
            format!("unknown function `{name}`"),
            f.span,
            "not a function",
        );
        if let Some(s) = suggest(name, names.iter().map(|s| s.as_str())) {
            d = d.with_help(format!("did you mean `{s}`?"));
        } else {
            d = d.with_note("see docs/LANGUAGE.md for the functions and reductions");
        }
        self.error(d);
        None
    }

    /// The reduction `base` (`sum`, `sqnorm`, `norm`, `dot`, `max_abs`, `mean`, `numel`) of the
    /// arguments `v`, with `red` the reduction node (over elements, or over tensors) and `count`
    /// what `mean` divides by and `numel` is.
    fn reduction(
        &mut self,
        base: &str,
        v: &[NodeId],
        red: impl Fn(ReduceOp, NodeId) -> Node,
        count: Node,
    ) -> NodeId {
        match base {
            "sum" => self.add(red(ReduceOp::Sum, v[0])),
            "sqnorm" | "norm" => {
                let sq = self.add(Node::Binary(BinOp::Mul, v[0], v[0]));
                let s = self.add(red(ReduceOp::Sum, sq));
                if base == "norm" {
                    self.add(Node::Unary(UnOp::Sqrt, s))
                } else {
                    s
                }
            }
            "dot" => {
                let p = self.add(Node::Binary(BinOp::Mul, v[0], v[1]));
                self.add(red(ReduceOp::Sum, p))
            }
            "max_abs" => {
                let a = self.add(Node::Unary(UnOp::Abs, v[0]));
                self.add(red(ReduceOp::Max, a))
            }
            "mean" => {
                let s = self.add(red(ReduceOp::Sum, v[0]));
                let n = self.add(count);
                self.add(Node::Binary(BinOp::Div, s, n))
            }
            _ => self.add(count),
        }
    }

    fn num_args(&mut self, args: &[ast::Expr], name: &str) -> Option<Vec<NodeId>> {
        let ctx = Some(self.draw_kind);
        self.num_args_in(args, name, ctx)
    }

    /// `num_args` with draws of kind `ctx` (see `expr_in`).
    fn num_args_in(
        &mut self,
        args: &[ast::Expr],
        name: &str,
        ctx: Option<Kind>,
    ) -> Option<Vec<NodeId>> {
        let vals: Vec<Option<NodeId>> = args.iter().map(|a| self.expr_in(a, ctx)).collect();
        let mut out = Vec::new();
        for (v, a) in vals.into_iter().zip(args) {
            out.push(self.expect_num(v?, a.span, &format!("`{name}`"))?);
        }
        let parts: Vec<(NodeId, Span)> = out
            .iter()
            .copied()
            .zip(args.iter().map(|a| a.span))
            .collect();
        if !self.join(&parts) {
            return None;
        }
        Some(out)
    }

    fn stmts(&mut self, stmts: &[ast::Stmt]) {
        self.scopes.push(Vec::new());
        for s in stmts {
            self.stmt(s);
        }
        let scope = self.scopes.pop().unwrap_or_default();
        self.warn_unused(scope);
    }

    fn stmt(&mut self, s: &ast::Stmt) {
        self.at = s.span;
        match &s.kind {
            StmtKind::Error => {}
            StmtKind::Let(n, e) => {
                if let Some(d) = self.ck.names.get(&n.name) {
                    let what = match d.sym {
                        Sym::Hyper(_) => "a hyperparameter",
                        Sym::ScalarInput(_) => "an input",
                        Sym::ScalarState(_) => "a state",
                        Sym::Random(_) => "a random value",
                        Sym::Buf(b) => match self.ck.info.buffers[b as usize].role {
                            BufRole::Param => "a param",
                            BufRole::Input => "an input",
                            BufRole::State => "a state",
                            BufRole::Output => "an output",
                        },
                    };
                    let dspan = d.span;
                    self.error(
                        Diagnostic::error(
                            "E0102",
                            format!("`let {}` would hide {what} of the same name", n.name),
                            n.span,
                            "defined here",
                        )
                        .with_label(dspan, "declared here")
                        .with_help(
                            if matches!(what, "a param" | "a state") {
                                format!("assign it with `{} = ...`, or choose another name", n.name)
                            } else {
                                "choose another name".to_string()
                            },
                        ),
                    );
                    return;
                }
                let Some(v) = self.expr_in(e, None) else {
                    // Bind a placeholder so later uses do not report a second, confusing error.
                    let v = self.add(Node::num(0.0));
                    let b = LetBinding {
                        node: v,
                        stage: self.stage,
                        span: n.span,
                        used: true,
                    };
                    self.scopes
                        .last_mut()
                        .expect("scope")
                        .push((n.name.clone(), b));
                    return;
                };
                let b = LetBinding {
                    node: v,
                    stage: self.stage,
                    span: n.span,
                    used: false,
                };
                self.scopes
                    .last_mut()
                    .expect("scope")
                    .push((n.name.clone(), b));
            }
            StmtKind::Assign(n, e) => self.assign(n, e),
            StmtKind::Out(n, e) => self.out(n, e, s.span),
            StmtKind::If { cond, then, els } => {
                let Some(c) = self.expr_in(cond, None) else {
                    self.stmts(then);
                    self.stmts(els);
                    return;
                };
                let c = self
                    .expect_bool(c, cond.span, "an `if` statement")
                    .and_then(|c| self.not_per_sample(c, cond.span, "if"));
                let (bufs0, scalars0) = (self.bufs.clone(), self.scalars.clone());
                self.stmts(then);
                let (mut bufs_t, scalars_t) = (
                    std::mem::replace(&mut self.bufs, bufs0),
                    std::mem::replace(&mut self.scalars, scalars0),
                );
                self.stmts(els);
                // An `out` in one branch may have created a buffer the other branch lacks.
                let n = bufs_t.len().max(self.bufs.len());
                bufs_t.resize(n, None);
                self.bufs.resize(n, None);
                let Some(c) = c else { return };
                let ck = self.graph.kind(c);
                for b in 0..self.bufs.len() {
                    let (t, f) = (bufs_t[b], self.bufs[b]);
                    if t == f {
                        continue;
                    }
                    let info = self.ck.info.buffers[b].clone();
                    if info.role == BufRole::Output {
                        self.error(
                            Diagnostic::error(
                                "E0208",
                                format!("`out {}` inside an `if`", info.name),
                                s.span,
                                "this `if`",
                            )
                            .with_help(format!(
                                "write `out {} = if c {{ a }} else {{ b }}` instead",
                                info.name
                            )),
                        );
                        continue;
                    }
                    let (Some(t), Some(f)) = (t, f) else { continue };
                    if let Some(cs) = ck.space() {
                        if cs != info.space {
                            self.error(Diagnostic::error(
                                "E0203",
                                format!(
                                    "this condition is {}, but it guards `{}`, shaped like `{}`",
                                    self.kind_name(ck),
                                    info.name,
                                    self.ck.info.spaces[info.space as usize]
                                ),
                                cond.span,
                                "the condition",
                            ));
                            continue;
                        }
                    }
                    let v = self.add(Node::Select(c, t, f));
                    self.bufs[b] = Some(v);
                }
                for i in 0..self.scalars.len() {
                    let (t, f) = (scalars_t[i], self.scalars[i]);
                    if t == f {
                        continue;
                    }
                    if ck != Kind::Scalar {
                        let name = self.ck.info.scalar_states[i].clone();
                        self.error(
                            Diagnostic::error("E0205", format!("scalar state `{name}` is assigned under a condition that is {}", self.kind_name(ck)), cond.span, "not a scalar")
                                .with_note("a scalar state has one value; a per-element condition would give it one per element"),
                        );
                        continue;
                    }
                    let v = self.add(Node::Select(c, t, f));
                    self.scalars[i] = v;
                }
            }
        }
    }

    fn assign(&mut self, n: &ast::Ident, e: &ast::Expr) {
        let ctx = match self.ck.names.get(&n.name).map(|d| d.sym) {
            Some(Sym::ScalarState(_)) => Some(Kind::Scalar),
            Some(Sym::Buf(b)) => Some(Kind::Element(self.ck.info.buffers[b as usize].space)),
            _ => None,
        };
        // Draws written in an assignment to a per-particle state are per particle.
        let per_particle = matches!(
            self.ck.names.get(&n.name).map(|d| d.sym),
            Some(Sym::Buf(b)) if self.ck.info.buffers[b as usize].axis
        ) && self.ck.info.axis == Some(Axis::Particles);
        let saved = std::mem::replace(&mut self.particle_draws, per_particle);
        let v = if self.lookup_let(&n.name).is_some() {
            self.expr_in(e, None)
        } else {
            self.expr_in(e, ctx)
        };
        self.particle_draws = saved;
        if let Some(b) = self.lookup_let(&n.name) {
            let bspan = b.span;
            self.error(
                Diagnostic::error(
                    "E0103",
                    format!("cannot assign to `{}`, a `let`", n.name),
                    n.span,
                    "assigned here",
                )
                .with_label(bspan, "defined here")
                .with_help(format!(
                    "define a new value with `let {} = ...`, or declare it as a `state`",
                    n.name
                )),
            );
            return;
        }
        let Some(decl) = self.ck.names.get_mut(&n.name) else {
            self.unknown_name(&n.name, n.span, true);
            return;
        };
        decl.assigned = true;
        let (sym, dspan) = (decl.sym, decl.span);
        let cannot = |what: &str| {
            Diagnostic::error(
                "E0103",
                format!("cannot assign to {what} `{}`", n.name),
                n.span,
                "assigned here",
            )
            .with_label(dspan, "declared here")
        };
        match sym {
            Sym::Hyper(_) => self.error(
                cannot("hyperparameter")
                    .with_help(format!("use `let` for a value derived from `{}`", n.name)),
            ),
            Sym::ScalarInput(_) => {
                self.error(cannot("input").with_note("inputs come from the host and are read-only"))
            }
            Sym::Random(_) => self.error(cannot("random value").with_note(
                "a random value is drawn afresh every step; use `let` for values computed from it",
            )),
            Sym::ScalarState(i) => {
                let Some(v) = v else { return };
                let Some(v) = self.expect_num(v, e.span, "a scalar state") else {
                    return;
                };
                let what = format!("scalar state `{}`", n.name);
                let Some(v) = self.not_per_sample(v, e.span, &what) else {
                    return;
                };
                let k = self.graph.kind(v);
                if k != Kind::Scalar {
                    self.error(
                        Diagnostic::error(
                            "E0202",
                            format!(
                                "scalar state `{}` cannot hold a value that is {}",
                                n.name,
                                self.kind_name(k)
                            ),
                            e.span,
                            "not a scalar",
                        )
                        .with_help("reduce it first, e.g. with `sum`, `mean` or `norm`"),
                    );
                    return;
                }
                self.scalars[i as usize] = v;
            }
            Sym::Buf(b) => match self.ck.info.buffers[b as usize].role {
                BufRole::Input => self.error(cannot("input").with_note(
                    "inputs come from the host and are read-only; use `let` for a modified copy",
                )),
                BufRole::Output => self.error(
                    cannot("output").with_help(format!("write it with `out {} = ...`", n.name)),
                ),
                BufRole::Param | BufRole::State => {
                    let Some(v) = v else { return };
                    let v = self.fit_to_buffer(v, b, Some(e.span));
                    if v.is_some() {
                        self.bufs[b as usize] = v;
                    }
                }
            },
        }
    }

    /// `out NAME = <scalar>`: a scalar state the host reads, set by this step.
    fn scalar_out(&mut self, n: &ast::Ident, v: NodeId, span: Span) {
        if let Some(Declared {
            sym: Sym::ScalarState(i),
            ..
        }) = self.ck.names.get(&n.name)
        {
            let i = *i;
            if self.report {
                if let Some(prev) = self.ck.scalar_out_spans.get(&n.name).copied() {
                    if prev != span {
                        self.error(
                            Diagnostic::error(
                                "E0102",
                                format!("output `{}` is written twice", n.name),
                                n.span,
                                "written again here",
                            )
                            .with_label(prev, "first written here"),
                        );
                        return;
                    }
                }
            }
            self.scalars[i as usize] = v;
            return;
        }
        let i = self.ck.info.scalar_states.len();
        if !self.ck.room("scalar states", i, n.span) {
            return;
        }
        self.ck.info.scalar_states.push(n.name.clone());
        self.ck.info.scalar_outs.push(i as u16);
        self.ck.scalar_init.push(None);
        self.ck.names.insert(
            n.name.clone(),
            Declared {
                sym: Sym::ScalarState(i as u16),
                span: n.span,
                used: true,
                assigned: true,
                pos: self.ck.order.len(),
            },
        );
        self.ck.scalar_out_spans.insert(n.name.clone(), span);
        self.scalars.push(v);
    }

    fn out(&mut self, n: &ast::Ident, e: &ast::Expr, span: Span) {
        // Outputs are per element: with one param, draws are per element of it.
        let ctx = (self.ck.info.spaces.len() == 1).then_some(Kind::Element(0));
        let v = self.expr_in(e, ctx);
        if let Some(b) = self.ck.info.buffer(&n.name) {
            if self.ck.info.buffers[b as usize].role == BufRole::Output {
                if self.report {
                    if let Some(prev) = self.ck.out_spans.get(&b).copied() {
                        if prev != span {
                            self.error(
                                Diagnostic::error(
                                    "E0102",
                                    format!("output `{}` is written twice", n.name),
                                    n.span,
                                    "written again here",
                                )
                                .with_label(prev, "first written here"),
                            );
                            return;
                        }
                    }
                }
                if let Some(v) = v {
                    let v = self.fit_to_buffer(v, b, Some(e.span));
                    if v.is_some() {
                        self.bufs[b as usize] = v;
                    }
                }
                return;
            }
        }
        if let Some(d) = self.ck.names.get(&n.name).filter(
            |d| !matches!(d.sym, Sym::ScalarState(i) if self.ck.info.scalar_outs.contains(&i)),
        ) {
            let dspan = d.span;
            self.error(
                Diagnostic::error(
                    "E0102",
                    format!("`out {}` would hide a name declared in the rule", n.name),
                    n.span,
                    "here",
                )
                .with_label(dspan, "declared here"),
            );
            return;
        }
        let Some(v) = v else { return };
        let Some(v) = self.expect_num(v, e.span, "an output") else {
            return;
        };
        let what = format!("output `{}`", n.name);
        let Some(v) = self.not_per_sample(v, e.span, &what) else {
            return;
        };
        let space = match self.graph.kind(v) {
            Kind::Element(s) => s,
            Kind::Scalar => {
                self.scalar_out(n, v, span);
                return;
            }
            k => {
                self.error(
                    Diagnostic::error(
                        "E0206",
                        format!(
                            "an output is per element or one number per step, but this value is {}",
                            self.kind_name(k)
                        ),
                        e.span,
                        "not per element",
                    )
                    .with_note("outputs are buffers shaped like a param, or one number per step")
                    .with_help(
                        "reduce it to one number (`sum`, `norm`, ...) or broadcast it over a param",
                    ),
                );
                return;
            }
        };
        let b = self.ck.info.buffers.len() as BufId;
        if !self.ck.room("buffers", self.ck.info.buffers.len(), n.span) {
            return;
        }
        self.ck.info.buffers.push(BufInfo {
            name: n.name.clone(),
            role: BufRole::Output,
            space,
            axis: false,
        });
        self.ck.names.insert(
            n.name.clone(),
            Declared {
                sym: Sym::Buf(b),
                span: n.span,
                used: true,
                assigned: true,
                pos: self.ck.order.len(),
            },
        );
        self.ck.out_spans.insert(b, span);
        self.bufs.push(Some(v));
    }
}
