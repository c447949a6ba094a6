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

/// Just One Byte's quantization of a projected gradient `p` (ezelikman/justonebyte): the power
/// `clamp(round(16 ln|p|), -127, 127)` (rounded half to even, as torch.round), one byte; `None`
/// for a NaN. With the sign of `p` (one more bit) it is what a machine sends; [`one_byte`] is
/// the value every machine applies.
pub fn one_byte_power(p: f64) -> Option<i8> {
    if p.is_nan() {
        return None;
    }
    let power = (16.0 * p.abs().ln()).round_ties_even().clamp(-127.0, 127.0);
    Some(power as i8)
}

/// The value of `p` after Just One Byte's quantization: `e^(power / 16) * sign(p)` with
/// [`one_byte_power`]'s power (0 for `p = 0`, NaN for a NaN): what the `spsa_job` rule takes as
/// `p_hat`.
pub fn one_byte(p: f64) -> f64 {
    match one_byte_power(p) {
        None => f64::NAN,
        Some(_) if p == 0.0 => 0.0,
        Some(power) => (f64::from(power) / 16.0).exp().copysign(p),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_byte_rounds_the_log_to_sixteenths() {
        use super::{one_byte, one_byte_power};
        assert_eq!(one_byte_power(1.0), Some(0));
        assert_eq!(one_byte(1.0), 1.0);
        // 16 ln 0.5 = -11.09: power -11.
        assert_eq!(one_byte_power(-0.5), Some(-11));
        assert_eq!(one_byte(-0.5), -(-11.0f64 / 16.0).exp());
        // Half to even: 16 ln p = 2.5 gives 2, 3.5 gives 4.
        assert_eq!(one_byte_power((2.5f64 / 16.0).exp()), Some(2));
        assert_eq!(one_byte_power((3.5f64 / 16.0).exp()), Some(4));
        // Clamped to +-127; zero and NaN.
        assert_eq!(one_byte_power(1e-30), Some(-127));
        assert_eq!(one_byte_power(1e30), Some(127));
        assert_eq!(one_byte(1e30), (127.0f64 / 16.0).exp());
        assert_eq!(one_byte_power(0.0), Some(-127));
        assert_eq!(one_byte(0.0), 0.0);
        assert_eq!(one_byte_power(f64::NAN), None);
        assert!(one_byte(f64::NAN).is_nan());
        // Within 1/32 in log: the relative error is at most e^(1/32) - 1.
        for p in [0.013, 0.7, 3.3, -42.0] {
            let q = one_byte(p);
            assert!(
                (q / p - 1.0).abs() <= (1.0f64 / 32.0).exp() - 1.0,
                "{p} -> {q}"
            );
        }
    }

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
