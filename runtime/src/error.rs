//! What can go wrong when driving a rule.

#[allow(unused_imports)] // named by the documentation
use crate::NonFinite;

/// What can go wrong when driving a rule.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    /// A hyperparameter name the rule does not declare.
    #[error("rule `{rule}` has no hyperparameter `{name}` (it has: {known})")]
    UnknownHyper {
        /// The rule.
        rule: String,
        /// The name given.
        name: String,
        /// The names it has.
        known: String,
    },
    /// A value that is not finite, or not 0/1 for a boolean.
    #[error("bad value {} for hyperparameter `{name}`: {why}", short(*value))]
    BadHyper {
        /// The hyperparameter.
        name: String,
        /// The value given.
        value: f64,
        /// Why it is rejected.
        why: &'static str,
    },
    /// An input held an infinity or a NaN (policy [`NonFinite::Error`]); nothing was changed.
    #[error("non-finite values in the inputs of rule `{rule}`; the step was not taken")]
    NonFinite {
        /// The rule.
        rule: String,
    },
    /// A setting the rule cannot support.
    #[error("{0}")]
    Policy(String),
    /// A value outside the range the rule declares for the hyperparameter.
    #[error("{name} = {} is out of range: rule declares {name} in {range}", short(*value))]
    OutOfRange {
        /// The hyperparameter.
        name: String,
        /// The value given.
        value: f64,
        /// The declared range.
        range: String,
    },
    /// The tensors of a space do not match what the optimizer was built with.
    #[error("{what}: expected {}, got {got}", count(*expected, what))]
    Length {
        /// Which buffer and tensor.
        what: String,
        /// Elements expected.
        expected: usize,
        /// Elements given.
        got: usize,
    },
    /// An input the stage reads was not given.
    #[error("stage `{stage}` of rule `{rule}` needs input `{name}`")]
    MissingInput {
        /// The rule.
        rule: String,
        /// The stage.
        stage: String,
        /// The input.
        name: String,
    },
    /// A name given as input that the rule does not declare as an input.
    #[error("rule `{rule}` has no input `{name}`")]
    UnknownInput {
        /// The rule.
        rule: String,
        /// The name given.
        name: String,
    },
    /// Stages must run in order.
    #[error("stage {got} run out of order: the next stage is {expected} (`{name}`)")]
    StageOrder {
        /// The stage expected next.
        expected: usize,
        /// Its name.
        name: String,
        /// The stage asked for.
        got: usize,
    },
    /// A checkpoint could not be written or read, or does not fit this optimizer.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// The Cranelift backend could not compile the rule.
    #[error("{0}")]
    Jit(#[from] crate::engine::cranelift::JitError),
    /// The native backend: no working C compiler, or the kernels could not be built or loaded.
    #[error("{0}")]
    Native(#[from] crate::engine::native::NativeError),
    /// A thread pool could not be started.
    #[error("cannot start {threads} threads: {why}")]
    Threads {
        /// Threads asked for.
        threads: usize,
        /// Why not.
        why: String,
    },
    /// The CUDA backend: no driver or GPU, a compile error, a failed launch or copy.
    #[cfg(feature = "cuda")]
    #[error("{0}")]
    Cuda(#[from] crate::engine::cuda::nvrtc::CudaError),
    /// A tensor name this optimizer does not have.
    #[error("no parameter tensor named `{0}`")]
    UnknownTensor(String),
    /// A parameter-group request that cannot be honoured.
    #[error("parameter groups: {0}")]
    Group(String),
    /// Params lent to an optimizer that owns its own, or not lent to one that borrows them.
    #[error("{0}")]
    Params(String),
    /// A sample-axis input's shape: its number of samples, or blocks that do not fit.
    #[error("samples: {0}")]
    Samples(String),
    /// Params given at construction are not one list per param of the rule.
    #[error("rule `{rule}` has {expected} param(s), got tensors for {got}")]
    Spaces {
        /// The rule.
        rule: String,
        /// Params it has.
        expected: usize,
        /// Lists given.
        got: usize,
    },
}

/// `n` elements, or `n` tensors when `what` counts tensors, in words.
fn count(n: usize, what: &str) -> String {
    let unit = if what.contains("number of tensors") {
        "tensor"
    } else {
        "element"
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

/// A value as its shortest text that reads back the same (`1e-300`, not 300 digits).
pub(crate) fn short(v: f64) -> String {
    let plain = v.to_string();
    let debug = format!("{v:?}");
    if plain.len() <= debug.len() {
        plain
    } else {
        debug
    }
}
