//! The standard library of optc rules: one `.opt` file per rule in `stdlib/rules/`, embedded by
//! name. Each file is plain rule source; compile it like any other.

include!(concat!(env!("OUT_DIR"), "/rules.rs"));

/// The source of a standard-library rule.
pub fn source(name: &str) -> Option<&'static str> {
    RULES.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// The names of all rules, sorted.
pub fn names() -> impl Iterator<Item = &'static str> {
    RULES.iter().map(|(n, _)| *n)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_rule_is_named_after_its_file() {
        assert!(!super::RULES.is_empty());
        for (name, src) in super::RULES {
            assert!(
                src.contains(&format!("rule {name}(")),
                "{name}.opt must define rule `{name}`"
            );
        }
    }
}
