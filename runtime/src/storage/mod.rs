//! How buffers are stored: per buffer the program's precision, bf16 or f16 (a
//! [`StorageMap`](optc_compiler::backend::cuda::StorageMap)), with stores rounded to nearest or
//! stochastically from Philox-4x32-10 ([`mixed::philox4x32`], [`mixed::rounding_bits`]), and the
//! mixed-precision optimizer built on it.

pub mod mixed;
