//! The lexer: logos tokens with byte spans. Characters that start no token are reported as
//! [`LexError`]s and skipped, so the parser still sees the rest of the file.

use logos::Logos;
use std::fmt;

/// One token of the rule language.
#[derive(Logos, Debug, Clone, PartialEq)]
#[logos(skip r"[ \t\r\n\f]+")]
#[logos(skip(r"//([^/\n][^\n]*)?|////[^\n]*", allow_greedy = true))]
pub enum Tok {
    #[token("rule")]
    Rule,
    #[token("param")]
    Param,
    #[token("input")]
    Input,
    #[token("state")]
    State,
    #[token("random")]
    Random,
    #[token("scalar")]
    Scalar,
    #[token("out")]
    Out,
    #[token("stage")]
    Stage,
    #[token("let")]
    Let,
    #[token("if")]
    If,
    #[token("else")]
    Else,
    #[token("true")]
    True,
    #[token("false")]
    False,
    #[token("t")]
    Step,
    #[token("in")]
    In,
    #[token("[")]
    LBracket,
    #[token("]")]
    RBracket,
    #[token("(")]
    LParen,
    #[token(")")]
    RParen,
    #[token("{")]
    LBrace,
    #[token("}")]
    RBrace,
    #[token(",")]
    Comma,
    #[token(":")]
    Colon,
    #[token(";")]
    Semi,
    #[token("=")]
    Assign,
    #[token("+")]
    Plus,
    #[token("-")]
    Minus,
    #[token("*")]
    Star,
    #[token("/")]
    Slash,
    #[token("%")]
    Percent,
    #[token("^")]
    Caret,
    #[token("==")]
    EqEq,
    #[token("!=")]
    NotEq,
    #[token("<")]
    Lt,
    #[token("<=")]
    Le,
    #[token(">")]
    Gt,
    #[token(">=")]
    Ge,
    #[token("&&")]
    AndAnd,
    #[token("||")]
    OrOr,
    #[token("!")]
    Bang,
    /// A number literal; the value is parsed by the parser so an out-of-range literal gets a span.
    #[regex(r"[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?", |lex| lex.slice().to_string())]
    #[regex(r"\.[0-9]+([eE][+-]?[0-9]+)?", |lex| lex.slice().to_string())]
    Num(String),
    #[regex(r"[A-Za-z_][A-Za-z0-9_]*", |lex| lex.slice().to_string(), priority = 1)]
    Ident(String),
    /// A `///` doc comment; the text after the slashes, with one leading space removed.
    #[regex(r"///([^/\n][^\n]*)?", |lex| doc_text(lex.slice()), allow_greedy = true)]
    Doc(String),
}

fn doc_text(slice: &str) -> String {
    let s = slice.trim_start_matches('/');
    let s = s.strip_prefix(' ').unwrap_or(s);
    s.trim_end_matches('\r').to_string()
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Num(s) => write!(f, "number `{s}`"),
            Tok::Ident(s) => write!(f, "name `{s}`"),
            Tok::Doc(_) => write!(f, "doc comment"),
            other => write!(f, "`{}`", token_text(other)),
        }
    }
}

/// The source text of a fixed token.
pub fn token_text(tok: &Tok) -> &'static str {
    match tok {
        Tok::Rule => "rule",
        Tok::Param => "param",
        Tok::Input => "input",
        Tok::State => "state",
        Tok::Random => "random",
        Tok::Scalar => "scalar",
        Tok::Out => "out",
        Tok::Stage => "stage",
        Tok::Let => "let",
        Tok::If => "if",
        Tok::Else => "else",
        Tok::True => "true",
        Tok::False => "false",
        Tok::Step => "t",
        Tok::In => "in",
        Tok::LBracket => "[",
        Tok::RBracket => "]",
        Tok::LParen => "(",
        Tok::RParen => ")",
        Tok::LBrace => "{",
        Tok::RBrace => "}",
        Tok::Comma => ",",
        Tok::Colon => ":",
        Tok::Semi => ";",
        Tok::Assign => "=",
        Tok::Plus => "+",
        Tok::Minus => "-",
        Tok::Star => "*",
        Tok::Slash => "/",
        Tok::Percent => "%",
        Tok::Caret => "^",
        Tok::EqEq => "==",
        Tok::NotEq => "!=",
        Tok::Lt => "<",
        Tok::Le => "<=",
        Tok::Gt => ">",
        Tok::Ge => ">=",
        Tok::AndAnd => "&&",
        Tok::OrOr => "||",
        Tok::Bang => "!",
        Tok::Num(_) => "number",
        Tok::Ident(_) => "name",
        Tok::Doc(_) => "///",
    }
}

/// A character sequence that starts no token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LexError {
    /// Byte range of the offending text.
    pub span: (usize, usize),
}

/// Tokenizes `src`, returning the tokens with their byte ranges and the lexical errors.
pub fn lex(src: &str) -> (Vec<(usize, Tok, usize)>, Vec<LexError>) {
    let mut tokens = Vec::new();
    let mut errors: Vec<LexError> = Vec::new();
    let mut lexer = Tok::lexer(src);
    while let Some(tok) = lexer.next() {
        let span = lexer.span();
        match tok {
            Ok(tok) => tokens.push((span.start, tok, span.end)),
            Err(()) => match errors.last_mut() {
                // Merge adjacent bad characters into one report.
                Some(last) if last.span.1 == span.start => last.span.1 = span.end,
                _ => errors.push(LexError {
                    span: (span.start, span.end),
                }),
            },
        }
    }
    (tokens, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexes_numbers_names_and_docs() {
        let (toks, errs) = lex("/// doc\nrule a(lr = 1e-3) { t ^ .5 } // c");
        assert!(errs.is_empty());
        let kinds: Vec<_> = toks.iter().map(|t| t.1.clone()).collect();
        assert_eq!(kinds[0], Tok::Doc("doc".into()));
        assert_eq!(kinds[1], Tok::Rule);
        assert_eq!(kinds[6], Tok::Num("1e-3".into()));
        assert!(kinds.contains(&Tok::Step));
        assert!(kinds.contains(&Tok::Num(".5".into())));
        assert_eq!(kinds.last(), Some(&Tok::RBrace));
    }

    #[test]
    fn four_slashes_are_a_plain_comment() {
        let (toks, errs) = lex("//// banner\n/// doc\nx");
        assert!(errs.is_empty());
        assert_eq!(
            toks.iter().map(|t| t.1.clone()).collect::<Vec<_>>(),
            vec![Tok::Doc("doc".into()), Tok::Ident("x".into())]
        );
    }

    #[test]
    fn bad_characters_are_reported_and_skipped() {
        let (toks, errs) = lex("a $$ b # c");
        assert_eq!(toks.len(), 3);
        assert_eq!(
            errs,
            vec![LexError { span: (2, 4) }, LexError { span: (7, 8) }]
        );
    }

    #[test]
    fn tee_is_a_keyword_but_longer_names_are_not() {
        let (toks, _) = lex("t tt t1");
        assert_eq!(toks[0].1, Tok::Step);
        assert_eq!(toks[1].1, Tok::Ident("tt".into()));
        assert_eq!(toks[2].1, Tok::Ident("t1".into()));
    }
}
