//! The abstract syntax tree. Every node carries its byte span in the source file.

use std::fmt;

/// A half-open byte range `[start, end)` in the source text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Span {
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
}

impl Span {
    /// A span from `start` to `end`.
    pub fn new(start: usize, end: usize) -> Self {
        Span { start, end }
    }
    /// The smallest span covering both.
    pub fn to(self, other: Span) -> Span {
        Span::new(self.start.min(other.start), self.end.max(other.end))
    }
}

/// A name with its span.
#[derive(Debug, Clone, PartialEq)]
pub struct Ident {
    /// The name.
    pub name: String,
    /// Where it is written.
    pub span: Span,
}

/// A parsed file: one or more rules.
#[derive(Debug, Clone, PartialEq)]
pub struct File {
    /// The rules, in source order.
    pub rules: Vec<Rule>,
}

/// `rule NAME(hyper = default, ...) { body }`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Lines of the `///` comment before the rule.
    pub doc: Vec<String>,
    /// The rule's name.
    pub name: Ident,
    /// Hyperparameters, in order.
    pub hypers: Vec<Hyper>,
    /// Declarations, statements and stages, in source order.
    pub body: Vec<Item>,
    /// The whole rule.
    pub span: Span,
}

/// A hyperparameter with its default.
#[derive(Debug, Clone, PartialEq)]
pub struct Hyper {
    /// Lines of the `///` comment before it.
    pub doc: Vec<String>,
    /// Its name.
    pub name: Ident,
    /// The default value (a constant expression).
    pub default: Expr,
    /// The values the host may set: `in [lo, hi)`.
    pub range: Option<Range>,
}

/// `[lo, hi]`, `[lo, hi)`, `(lo, hi]` or `(lo, hi)`; bounds are constants (`inf` allowed).
#[derive(Debug, Clone, PartialEq)]
pub struct Range {
    /// Lower bound.
    pub lo: Expr,
    /// Whether `lo` itself is allowed.
    pub lo_closed: bool,
    /// Upper bound.
    pub hi: Expr,
    /// Whether `hi` itself is allowed.
    pub hi_closed: bool,
    /// The whole range.
    pub span: Span,
}

/// One item of a rule body.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// `param`, `input` or `state`.
    Decl(Decl),
    /// A statement of the implicit single stage.
    Stmt(Stmt),
    /// `stage NAME { ... }`.
    Stage(Stage),
}

/// What a declaration declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeclKind {
    /// `param`: a parameter the rule updates.
    Param,
    /// `input`: a value the host supplies every step.
    Input,
    /// `state`: a value the optimizer keeps across steps.
    State,
    /// `random`: a random value drawn afresh every step, the same in every stage.
    Random,
}

impl DeclKind {
    /// The keyword.
    pub fn keyword(self) -> &'static str {
        match self {
            DeclKind::Param => "param",
            DeclKind::Input => "input",
            DeclKind::State => "state",
            DeclKind::Random => "random",
        }
    }
}

/// `input g, hv` / `state m = 0, v: x = 0` / `param x, y`.
#[derive(Debug, Clone, PartialEq)]
pub struct Decl {
    /// The keyword.
    pub kind: DeclKind,
    /// The declared names.
    pub entries: Vec<DeclEntry>,
    /// The whole declaration.
    pub span: Span,
}

/// One declared name, with its optional type annotation and initializer.
#[derive(Debug, Clone, PartialEq)]
pub struct DeclEntry {
    /// The name.
    pub name: Ident,
    /// `: scalar` or `: x`.
    pub ty: Option<TypeAnn>,
    /// `= expr`.
    pub init: Option<Expr>,
}

/// A type annotation on a declaration.
#[derive(Debug, Clone, PartialEq)]
pub enum TypeAnn {
    /// `: scalar`.
    Scalar(Span),
    /// `: x`, the space of param `x` (or `: samples`, read by the checker as an axis).
    Space(Ident),
    /// `: samples(x)`, `: particles(x)`, `: particles scalar`: an axis over the space of param
    /// `x`, or over scalars.
    Axis {
        /// The axis's name (`samples`, `particles`).
        axis: Ident,
        /// The param whose space it extends.
        of: Option<Ident>,
        /// `NAME scalar`: one number per copy.
        scalar: bool,
        /// The whole annotation.
        span: Span,
    },
}

impl TypeAnn {
    /// The annotation's span.
    pub fn span(&self) -> Span {
        match self {
            TypeAnn::Scalar(s) => *s,
            TypeAnn::Space(i) => i.span,
            TypeAnn::Axis { span, .. } => *span,
        }
    }
}

/// `stage NAME { ... }`.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    /// The stage's name.
    pub name: Ident,
    /// Its statements.
    pub body: Vec<Stmt>,
    /// The whole stage.
    pub span: Span,
}

/// A statement.
#[derive(Clone, PartialEq)]
pub struct Stmt {
    /// What it does.
    pub kind: StmtKind,
    /// The whole statement.
    pub span: Span,
    /// Levels of nesting, its expressions' included (1 for `x = y`); the parser keeps it at most
    /// [`MAX_DEPTH`](crate::MAX_DEPTH).
    pub depth: u32,
}

impl fmt::Debug for Stmt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stmt")
            .field("kind", &self.kind)
            .field("span", &self.span)
            .finish()
    }
}

/// The kinds of statement.
#[derive(Debug, Clone, PartialEq)]
pub enum StmtKind {
    /// `let name = expr`.
    Let(Ident, Expr),
    /// `name = expr`.
    Assign(Ident, Expr),
    /// `out name = expr`.
    Out(Ident, Expr),
    /// `if cond { ... } else { ... }`.
    If {
        /// The condition.
        cond: Expr,
        /// Statements when it holds.
        then: Vec<Stmt>,
        /// Statements otherwise (an `else if` is a nested `If`).
        els: Vec<Stmt>,
    },
    /// A statement that did not parse; its error was reported.
    Error,
}

/// An expression.
#[derive(Clone, PartialEq)]
pub struct Expr {
    /// What it computes.
    pub kind: ExprKind,
    /// Where it is written.
    pub span: Span,
    /// Levels of nesting (1 for a name or a number); the parser keeps it at most
    /// [`MAX_DEPTH`](crate::MAX_DEPTH), so every recursive walk of a tree is bounded.
    pub depth: u32,
}

impl fmt::Debug for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Expr")
            .field("kind", &self.kind)
            .field("span", &self.span)
            .finish()
    }
}

/// The kinds of expression.
#[derive(Debug, Clone, PartialEq)]
pub enum ExprKind {
    /// A number literal.
    Num(f64),
    /// `true` or `false`.
    Bool(bool),
    /// A name.
    Name(String),
    /// `t`, the step counter.
    Step,
    /// `-x`, `!x`.
    Unary(UnOp, Box<Expr>),
    /// `a + b`, ...
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// `if c { a } else { b }`.
    If(Box<Expr>, Box<Expr>, Box<Expr>),
    /// `f(a, b)`.
    Call(Ident, Vec<Expr>),
    /// An expression that did not parse; its error was reported.
    Error,
}

/// Unary operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnOp {
    /// `-`
    Neg,
    /// `!`
    Not,
}

/// Binary operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BinOp {
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
    /// `/`
    Div,
    /// `%` (floored, like Python's)
    Rem,
    /// `^`
    Pow,
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `&&`
    And,
    /// `||`
    Or,
}

impl BinOp {
    /// The operator as written.
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Rem => "%",
            BinOp::Pow => "^",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::And => "&&",
            BinOp::Or => "||",
        }
    }
}
