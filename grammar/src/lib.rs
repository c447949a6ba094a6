//! The front end of optc: a logos lexer, a lalrpop grammar and the AST with byte spans.
//!
//! [`parse`] turns source text into an [`ast::File`] and a list of [`Diagnostic`]s. The parser
//! recovers at statement boundaries, so one run reports several syntax errors.

pub mod ast;
pub mod diag;
pub mod lexer;

#[allow(clippy::all, missing_debug_implementations, unused_qualifications)]
mod grammar {
    lalrpop_util::lalrpop_mod!(pub grammar);
    pub use self::grammar::*;
}

pub use diag::{Diagnostic, Label, Severity};

use ast::{BinOp, Expr, ExprKind, Span, Stmt, StmtKind};
use lalrpop_util::ParseError;
use lexer::{LexError, Tok};

/// The deepest expression or statement nesting the parser accepts. Real rules nest fewer than
/// 100 levels; every later stage (checker, lowering, constant evaluation, printers, `Drop`) walks
/// trees recursively, and this bound keeps those walks far inside a 2 MiB thread stack.
pub const MAX_DEPTH: u32 = 256;

/// A node's depth from its children's: one more than the deepest.
fn depth_over(children: impl IntoIterator<Item = u32>) -> u32 {
    1 + children.into_iter().max().unwrap_or(0)
}

/// Builds an expression node (used by the grammar). A node nested deeper than [`MAX_DEPTH`] is
/// cut to an `Error` node (with no children; its `depth` says `MAX_DEPTH + 1`), its span recorded
/// in `deep`: a node over a cut node is cut too, silently, so a statement gets one report and no
/// tree is ever deeper than the limit.
pub(crate) fn expr(deep: &mut Vec<Span>, kind: ExprKind, span: Span) -> Expr {
    let depth = match &kind {
        ExprKind::Unary(_, a) => depth_over([a.depth]),
        ExprKind::Binary(_, a, b) => depth_over([a.depth, b.depth]),
        ExprKind::If(c, a, b) => depth_over([c.depth, a.depth, b.depth]),
        ExprKind::Call(_, args) => depth_over(args.iter().map(|a| a.depth)),
        _ => 1,
    };
    if depth > MAX_DEPTH {
        // Exactly one level over: every child is within the limit, so this is where it is
        // crossed. A cut node carries `MAX_DEPTH + 1`, so nodes over it are further over.
        if depth == MAX_DEPTH + 1 {
            deep.push(span);
        }
        return Expr {
            kind: ExprKind::Error,
            span,
            depth: MAX_DEPTH + 1,
        };
    }
    Expr { kind, span, depth }
}

/// Builds a statement node (used by the grammar), cut like [`expr`] past [`MAX_DEPTH`] levels
/// (its expressions' levels included).
pub(crate) fn stmt(deep: &mut Vec<Span>, kind: StmtKind, span: Span) -> Stmt {
    let depth = match &kind {
        StmtKind::Let(_, e) | StmtKind::Assign(_, e) | StmtKind::Out(_, e) => depth_over([e.depth]),
        StmtKind::If { cond, then, els } => depth_over(
            [cond.depth]
                .into_iter()
                .chain(then.iter().chain(els).map(|s| s.depth)),
        ),
        StmtKind::Error => 1,
    };
    if depth > MAX_DEPTH {
        if depth == MAX_DEPTH + 1 {
            deep.push(span);
        }
        return Stmt {
            kind: StmtKind::Error,
            span,
            depth: MAX_DEPTH + 1,
        };
    }
    Stmt { kind, span, depth }
}

/// Builds a binary expression spanning both operands (used by the grammar).
pub(crate) fn binary(deep: &mut Vec<Span>, op: BinOp, a: Expr, b: Expr) -> Expr {
    let span = a.span.to(b.span);
    expr(deep, ExprKind::Binary(op, Box::new(a), Box::new(b)), span)
}

/// The report for an expression or statement nested deeper than [`MAX_DEPTH`].
fn too_deep(span: Span) -> Diagnostic {
    Diagnostic::error(
        "E0004",
        format!("nested too deeply (limit {MAX_DEPTH} levels)"),
        span,
        format!("more than {MAX_DEPTH} levels of nesting end here"),
    )
    .with_help("name parts of it with `let`, or split it into several statements")
}

/// Parses a rule file. Returns the AST (absent only when the parser could not recover) and the
/// diagnostics, in source order. The AST may contain `Error` nodes where statements failed to parse.
pub fn parse(src: &str) -> (Option<ast::File>, Vec<Diagnostic>) {
    let (tokens, lex_errors) = lexer::lex(src);
    let mut diags: Vec<Diagnostic> = lex_errors
        .iter()
        .map(|e| {
            let span = Span::new(e.span.0, e.span.1);
            let text = &src[e.span.0..e.span.1];
            Diagnostic::error(
                "E0001",
                format!(
                    "unexpected character{} `{text}`",
                    if text.chars().count() > 1 { "s" } else { "" }
                ),
                span,
                "not part of the language",
            )
        })
        .collect();
    let mut recovered = Vec::new();
    let mut deep = Vec::new();
    let kept = tokens.clone();
    let result = grammar::FileParser::new().parse(
        &mut recovered,
        &mut deep,
        tokens.into_iter().map(Ok::<_, LexError>),
    );
    for r in recovered {
        diags.push(refine(src, &kept, parse_error(src, r.error)));
    }
    diags.extend(deep.into_iter().map(too_deep));
    let file = match result {
        Ok(file) => Some(file),
        Err(e) => {
            diags.push(refine(src, &kept, parse_error(src, e)));
            None
        }
    };
    diags.sort_by_key(|d| (d.primary.span.start, d.primary.span.end));
    // Recovery resynchronizes token by token, so one broken statement can produce a report per
    // token; keep the first syntax error of each line.
    // Line starts, so each report finds its line in O(log n).
    let starts: Vec<usize> = src
        .bytes()
        .enumerate()
        .filter(|&(_, b)| b == b'\n')
        .map(|(i, _)| i)
        .collect();
    let line_of = |pos: usize| starts.partition_point(|&nl| nl < pos.min(src.len()));
    let mut last_line = None;
    diags.retain(|d| {
        if d.code != "E0002" && d.code != "E0003" {
            return true;
        }
        let line = line_of(d.primary.span.start);
        let keep = last_line != Some(line);
        last_line = Some(line);
        keep
    });
    (file, diags)
}

/// Parses a single expression (used by the CLI for `--set name=expr` and by tests).
pub fn parse_expr(src: &str) -> Result<Expr, Vec<Diagnostic>> {
    let (tokens, lex_errors) = lexer::lex(src);
    if let Some(e) = lex_errors.first() {
        let span = Span::new(e.span.0, e.span.1);
        return Err(vec![Diagnostic::error(
            "E0001",
            "unexpected character",
            span,
            "not part of the language",
        )]);
    }
    let mut recovered = Vec::new();
    let mut deep = Vec::new();
    let result = grammar::ExprParser::new().parse(
        &mut recovered,
        &mut deep,
        tokens.into_iter().map(Ok::<_, LexError>),
    );
    let mut diags: Vec<Diagnostic> = recovered
        .into_iter()
        .map(|r| parse_error(src, r.error))
        .chain(deep.into_iter().map(too_deep))
        .collect();
    match result {
        Ok(e) if diags.is_empty() => Ok(e),
        Ok(_) => Err(diags),
        Err(e) => {
            diags.push(parse_error(src, e));
            Err(diags)
        }
    }
}

/// The keywords that begin a declaration or a statement, for "did you mean".
const STATEMENT_KEYWORDS: &[&str] = &[
    "param", "input", "state", "random", "out", "stage", "let", "if",
];

/// Edit distance between two short words (insertions, deletions, substitutions).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Whether a token can end an operand (so that a name right after it lacks an operator).
fn ends_operand(tok: &Tok) -> bool {
    matches!(
        tok,
        Tok::Ident(_) | Tok::Num(_) | Tok::RParen | Tok::True | Tok::False | Tok::Step
    )
}

/// A syntax error made more precise from the tokens around it: a missing operator between two
/// operands on one line is reported where it is missing (the parser only notices it at the next
/// token that cannot continue); a misspelled keyword gets "did you mean"; `**` gets `^`.
fn refine(src: &str, tokens: &[(usize, Tok, usize)], d: Diagnostic) -> Diagnostic {
    if d.code != "E0002" {
        return d;
    }
    let at = d.primary.span.start;
    let Some(i) = tokens.iter().position(|t| t.0 == at) else {
        return d;
    };
    let same_line = |a: usize, b: usize| !src[a.min(b)..a.max(b)].contains('\n');
    let line_start = |k: usize| {
        let before = &src[..tokens[k].0];
        before[before.rfind('\n').map_or(0, |n| n + 1)..]
            .chars()
            .all(char::is_whitespace)
    };
    if tokens[i].1 == Tok::Star && i > 0 && tokens[i - 1].1 == Tok::Star && tokens[i - 1].2 == at {
        return d.with_help("powers are written `^`: `g ^ 2`");
    }
    // `(1 - beta * g` then a new line: the `(` that is never closed, not the next line's token.
    if d.help.as_deref().is_some_and(|h| h.contains("`)`")) {
        let mut open: Vec<usize> = Vec::new();
        for (k, t) in tokens[..i].iter().enumerate() {
            match t.1 {
                Tok::LParen => open.push(k),
                Tok::RParen => {
                    open.pop();
                }
                // A statement does not continue past a brace: parentheses before it are
                // another statement's.
                Tok::LBrace | Tok::RBrace => open.clear(),
                _ => {}
            }
        }
        if let Some(&k) = open.last() {
            if !same_line(tokens[k].0, at) {
                let (l, _, r) = tokens[k];
                // Where the `)` belongs: after the last token of the `(`'s line.
                let last = tokens[k..i]
                    .iter()
                    .take_while(|t| same_line(tokens[k].0, t.0))
                    .last()
                    .map_or(r, |t| t.2);
                return Diagnostic::error(
                    "E0002",
                    "unclosed `(`",
                    Span::new(l, r),
                    "this `(` is never closed",
                )
                .with_label(Span::new(last, last), "expected `)` by here")
                .with_label(d.primary.span, "the parser stopped here")
                .with_help("close it with `)`");
            }
        }
    }
    let wants_assign = d.help.as_deref() == Some("expected `=`");
    if i >= 1 && wants_assign {
        let (l, prev, r) = &tokens[i - 1];
        if let Tok::Ident(name) = prev {
            // `parm x`: a misspelled keyword read as the name of an assignment.
            if line_start(i - 1) {
                if let Some(k) = STATEMENT_KEYWORDS
                    .iter()
                    .filter(|k| edit_distance(name, k) <= 2)
                    .min_by_key(|k| edit_distance(name, k))
                {
                    return Diagnostic::error(
                        "E0002",
                        format!("unknown keyword `{name}`"),
                        Span::new(*l, *r),
                        "a statement starts with a keyword or the name it assigns",
                    )
                    .with_help(format!("did you mean `{k}`?"));
                }
            }
            // `(1 - beta) g`: two operands with no operator between them, on one line.
            if i >= 2 && ends_operand(&tokens[i - 2].1) && same_line(tokens[i - 2].2, *l) {
                return Diagnostic::error(
                    "E0002",
                    format!("missing operator before `{name}`"),
                    Span::new(*l, *r),
                    "an operator is missing here",
                )
                .with_help(format!(
                    "write the operation, e.g. `* {name}` for a product (a statement ends at the \
                     end of its expression, so `{name}` started a new one)"
                ));
            }
        }
    }
    d
}

fn describe_expected(expected: &[String]) -> Option<String> {
    let mut names: Vec<String> = expected
        .iter()
        .map(|e| match e.as_str() {
            "ident" => "a name".to_string(),
            "num" => "a number".to_string(),
            "doc" => "a doc comment".to_string(),
            other => format!("`{}`", other.trim_matches('"')),
        })
        .collect();
    names.dedup();
    match names.len() {
        0 => None,
        1 => Some(format!("expected {}", names[0])),
        n if n <= 8 => Some(format!("expected one of {}", names.join(", "))),
        _ => None,
    }
}

fn parse_error(src: &str, e: ParseError<usize, Tok, LexError>) -> Diagnostic {
    match e {
        ParseError::InvalidToken { location } => Diagnostic::error(
            "E0001",
            "invalid token",
            Span::new(location, location + 1),
            "not part of the language",
        ),
        ParseError::UnrecognizedEof { location, expected } => {
            let at = location.min(src.len());
            let d = Diagnostic::error(
                "E0003",
                "unexpected end of file",
                Span::new(at, at),
                "the file ends here",
            );
            match describe_expected(&expected) {
                Some(h) => d.with_help(h),
                None => d,
            }
        }
        ParseError::UnrecognizedToken {
            token: (l, tok, r),
            expected,
        } => {
            let d = Diagnostic::error(
                "E0002",
                format!("unexpected {tok}"),
                Span::new(l, r),
                match &tok {
                    Tok::Doc(_) => {
                        "doc comments document a rule or a hyperparameter; use `//` here"
                            .to_string()
                    }
                    _ => "not expected here".to_string(),
                },
            );
            match describe_expected(&expected) {
                Some(h) => d.with_help(h),
                None => d,
            }
        }
        ParseError::ExtraToken { token: (l, tok, r) } => Diagnostic::error(
            "E0002",
            format!("unexpected {tok}"),
            Span::new(l, r),
            "not expected here",
        ),
        ParseError::User { error } => Diagnostic::error(
            "E0001",
            "unexpected character",
            Span::new(error.span.0, error.span.1),
            "not part of the language",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ast::*;

    fn rule(src: &str) -> Rule {
        let (file, diags) = parse(src);
        assert!(diags.is_empty(), "{diags:?}");
        file.unwrap().rules.into_iter().next().unwrap()
    }

    #[test]
    fn parses_a_rule_with_docs_hypers_decls_and_statements() {
        let r = rule("/// Plain SGD.\nrule sgd(\n /// step size\n lr = 1e-3,) {\n param theta\n input g\n theta = theta - lr * g\n}");
        assert_eq!(r.doc, vec!["Plain SGD."]);
        assert_eq!(r.name.name, "sgd");
        assert_eq!(r.hypers.len(), 1);
        assert_eq!(r.hypers[0].doc, vec!["step size"]);
        assert_eq!(r.body.len(), 3);
        assert!(
            matches!(&r.body[2], Item::Stmt(Stmt { kind: StmtKind::Assign(n, _), .. }) if n.name == "theta")
        );
    }

    #[test]
    fn power_binds_tighter_than_unary_minus_and_is_right_associative() {
        let e = parse_expr("-a^b^c").unwrap();
        let ExprKind::Unary(UnOp::Neg, inner) = e.kind else {
            panic!("{e:?}")
        };
        let ExprKind::Binary(BinOp::Pow, a, rest) = inner.kind else {
            panic!()
        };
        assert_eq!(a.kind, ExprKind::Name("a".into()));
        assert!(matches!(rest.kind, ExprKind::Binary(BinOp::Pow, _, _)));
        let e = parse_expr("2^-1").unwrap();
        assert!(matches!(e.kind, ExprKind::Binary(BinOp::Pow, _, _)));
    }

    #[test]
    fn spans_are_byte_offsets() {
        let e = parse_expr("a + foo(b, 2)").unwrap();
        assert_eq!(e.span, Span::new(0, 13));
        let ExprKind::Binary(_, _, call) = e.kind else {
            panic!()
        };
        assert_eq!(call.span, Span::new(4, 13));
    }

    #[test]
    fn recovers_and_reports_several_errors() {
        let src =
            "rule r(lr = 1) {\n param theta\n let a = * 2\n theta = theta - lr\n let b = )\n}";
        let (file, diags) = parse(src);
        assert!(file.is_some());
        assert_eq!(diags.len(), 2, "{diags:?}");
        assert!(diags.iter().all(|d| d.code == "E0002"));
        assert_eq!(
            &src[diags[0].primary.span.start..diags[0].primary.span.end],
            "*"
        );
    }

    /// The first report of each source, at the span and with the words that name the mistake.
    #[test]
    fn recovery_names_the_mistake_where_it_is() {
        for (src, at, message, help) in [
            (
                "rule r(beta = 0.9) {\n param p\n input g\n state m = 0\n m = beta * m + (1 - beta) g\n p = p - m\n}",
                "g\n p",
                "missing operator before `g`",
                "`* g`",
            ),
            (
                "rule r() {\n parm x\n input g\n x = x - g\n}",
                "parm",
                "unknown keyword `parm`",
                "did you mean `param`?",
            ),
            (
                "rule r() {\n param x\n input g\n x = x - g ** 2\n}",
                "* 2",
                "unexpected `*`",
                "`^`",
            ),
        ] {
            let (_, diags) = parse(src);
            let d = &diags[0];
            assert_eq!(d.primary.span.start, src.find(at).unwrap(), "{src}: {d:?}");
            assert_eq!(d.message, message, "{src}");
            assert!(d.help.as_deref().unwrap_or("").contains(help), "{src}: {d:?}");
        }
        // A genuine assignment to an unknown name is not taken for a typo.
        let (_, diags) = parse("rule r() {\n param x\n x = x - 1\n}");
        assert!(diags.is_empty(), "{diags:?}");
    }

    #[test]
    fn if_statements_and_expressions() {
        let r = rule("rule r() { param x\n if t == 1 { x = 0 } else if t > 3 { x = 1 } else { x = if x > 0 { x } else { -x } } }");
        let Item::Stmt(Stmt {
            kind: StmtKind::If { els, .. },
            ..
        }) = &r.body[1]
        else {
            panic!()
        };
        assert!(matches!(els[0].kind, StmtKind::If { .. }));
    }
}
