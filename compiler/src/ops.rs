//! The meaning of each operation, shared by constant folding (f64), the host's scalar evaluation
//! (f64) and the reference interpreter (f32 or f64). Backends must agree with these definitions.
//!
//! Conventions (those of PyTorch): `min`/`max` propagate NaN; `sign(0) = 0`; `round` rounds half to
//! even; `%` is floored (the result has the divisor's sign); `rsqrt(x) = 1 / sqrt(x)`;
//! `sigmoid(x) = 1 / (1 + exp(-x))`, evaluated in f64 and rounded once. Booleans are 1 and 0.

use crate::ir::{BinOp, UnOp};

/// The element types the interpreter computes in.
pub trait Float: Copy + PartialOrd + std::fmt::Debug + Send + Sync + 'static {
    /// Bytes per value.
    const BYTES: usize;
    /// Conversion from the host's f64 (rounds to nearest).
    fn from_f64(v: f64) -> Self;
    /// Conversion to f64 (exact).
    fn to_f64(self) -> f64;
    /// Little-endian bytes.
    fn to_le_bytes_vec(self) -> Vec<u8>;
    /// From little-endian bytes (`bytes.len() == BYTES`).
    fn from_le_bytes_slice(bytes: &[u8]) -> Self;
    /// `op(a)`.
    fn unary(op: UnOp, a: Self) -> Self;
    /// `op(a, b)`.
    fn binary(op: BinOp, a: Self, b: Self) -> Self;
}

macro_rules! impl_float {
    ($t:ty) => {
        impl Float for $t {
            const BYTES: usize = std::mem::size_of::<$t>();
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn to_le_bytes_vec(self) -> Vec<u8> {
                self.to_le_bytes().to_vec()
            }
            fn from_le_bytes_slice(bytes: &[u8]) -> Self {
                let mut b = [0u8; std::mem::size_of::<$t>()];
                b.copy_from_slice(bytes);
                <$t>::from_le_bytes(b)
            }
            fn unary(op: UnOp, a: Self) -> Self {
                match op {
                    UnOp::Neg => -a,
                    UnOp::Not => {
                        if a == 0.0 {
                            1.0
                        } else {
                            0.0
                        }
                    }
                    UnOp::Sqrt => a.sqrt(),
                    UnOp::Rsqrt => 1.0 / a.sqrt(),
                    UnOp::Abs => a.abs(),
                    UnOp::Sign => {
                        if a > 0.0 {
                            1.0
                        } else if a < 0.0 {
                            -1.0
                        } else {
                            a * 0.0
                        }
                    }
                    UnOp::Exp => a.exp(),
                    UnOp::Log => a.ln(),
                    UnOp::Log1p => a.ln_1p(),
                    UnOp::Expm1 => a.exp_m1(),
                    // Computed in f64 and rounded once: the correctly rounded value, which every
                    // backend approximates within 2 ulp.
                    UnOp::Sigmoid => (1.0 / (1.0 + (-(a as f64)).exp())) as $t,
                    UnOp::Tanh => a.tanh(),
                    UnOp::Floor => a.floor(),
                    UnOp::Ceil => a.ceil(),
                    UnOp::Round => a.round_ties_even(),
                }
            }
            fn binary(op: BinOp, a: Self, b: Self) -> Self {
                let bool = |c: bool| if c { 1.0 } else { 0.0 };
                match op {
                    BinOp::Add => a + b,
                    BinOp::Sub => a - b,
                    BinOp::Mul => a * b,
                    BinOp::Div => a / b,
                    BinOp::Rem => {
                        let r = a % b;
                        if r != 0.0 && ((r < 0.0) != (b < 0.0)) {
                            r + b
                        } else {
                            r
                        }
                    }
                    BinOp::Pow => a.powf(b),
                    BinOp::Min => {
                        if a.is_nan() || b.is_nan() {
                            <$t>::NAN
                        } else if b < a {
                            b
                        } else {
                            a
                        }
                    }
                    BinOp::Max => {
                        if a.is_nan() || b.is_nan() {
                            <$t>::NAN
                        } else if b > a {
                            b
                        } else {
                            a
                        }
                    }
                    BinOp::Eq => bool(a == b),
                    BinOp::Ne => bool(a != b),
                    BinOp::Lt => bool(a < b),
                    BinOp::Le => bool(a <= b),
                    BinOp::Gt => bool(a > b),
                    BinOp::Ge => bool(a >= b),
                    BinOp::And => bool(a != 0.0 && b != 0.0),
                    BinOp::Or => bool(a != 0.0 || b != 0.0),
                }
            }
        }
    };
}
impl_float!(f32);
impl_float!(f64);

/// `op(a)` in f64.
pub fn unary_f64(op: UnOp, a: f64) -> f64 {
    f64::unary(op, a)
}

/// `op(a, b)` in f64.
pub fn binary_f64(op: BinOp, a: f64, b: f64) -> f64 {
    f64::binary(op, a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_conventions() {
        assert_eq!(f32::unary(UnOp::Sign, 0.0), 0.0);
        assert_eq!(f32::unary(UnOp::Sign, -3.0), -1.0);
        assert!(f32::unary(UnOp::Sign, f32::NAN).is_nan());
        assert_eq!(f32::unary(UnOp::Round, 2.5), 2.0);
        assert_eq!(f32::unary(UnOp::Round, -0.5), -0.0);
        assert!(f32::binary(BinOp::Max, f32::NAN, 1.0).is_nan());
        assert!(f32::binary(BinOp::Min, 1.0, f32::NAN).is_nan());
        assert_eq!(f64::binary(BinOp::Rem, -1.0, 3.0), 2.0);
        assert_eq!(f64::binary(BinOp::Rem, 7.0, 3.0), 1.0);
        assert_eq!(f64::binary(BinOp::Rem, 1.0, -3.0), -2.0);
        assert_eq!(f32::unary(UnOp::Sigmoid, 0.0), 0.5);
    }
}
