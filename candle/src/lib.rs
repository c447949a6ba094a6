//! Any optc rule as a [candle](https://github.com/huggingface/candle) optimizer.
//!
//! [`OptcOptimizer`] implements [`candle_nn::Optimizer`]: build it from the trainable variables
//! and an [`OptcConfig`] (a compiled rule and its hyperparameter values), then call
//! `backward_step(&loss)` as with candle's own optimizers. The rule must have one param and one
//! per-element input (the gradient); its state lives in optc, the parameters in candle's
//! variables. Each step reads every variable and its gradient, runs the rule's kernels, and writes
//! the variables back. A variable without a gradient in the step's `GradStore` gets a zero gradient
//! (its state still advances, as the rule says for a zero gradient).
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use candle_nn::Optimizer;
//! use optc_candle::{OptcConfig, OptcOptimizer};
//!
//! let w = Var::new(&[3.0f32, -2.0], &Device::Cpu)?;
//! let program = optc_stdlib_rule("adam");
//! let config = OptcConfig::new(program).hyper("lr", 0.1);
//! let mut opt = OptcOptimizer::new(vec![w.clone()], config)?;
//! for _ in 0..200 {
//!     let loss = w.as_tensor().sqr()?.sum_all()?;
//!     opt.backward_step(&loss)?;
//! }
//! assert!(w.as_tensor().abs()?.max(0)?.to_scalar::<f32>()? < 0.05);
//! # fn optc_stdlib_rule(name: &str) -> std::sync::Arc<optc_compiler::ir::Program> {
//! #     let src = optc_stdlib::source(name).unwrap();
//! #     std::sync::Arc::new(optc_compiler::compile(src).programs.remove(0))
//! # }
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};
use optc_compiler::ir::{BufRole, Program};
use optc_runtime::{Backend, Inputs, Optimizer, TensorSpec};
use std::sync::Arc;

/// A compiled rule, its hyperparameter values and the backend that runs it.
#[derive(Debug, Clone)]
pub struct OptcConfig {
    /// The rule.
    pub program: Arc<Program>,
    /// Hyperparameter values set at construction (the others keep the rule's defaults).
    pub hypers: Vec<(String, f64)>,
    /// Where the kernels run (Cranelift on one thread unless set).
    pub backend: Backend,
}

impl OptcConfig {
    /// The rule with its default values, on Cranelift with one thread.
    pub fn new(program: Arc<Program>) -> Self {
        OptcConfig {
            program,
            hypers: Vec::new(),
            backend: Backend::Cranelift { threads: 1 },
        }
    }

    /// Sets a hyperparameter.
    pub fn hyper(mut self, name: &str, value: f64) -> Self {
        self.hypers.push((name.to_string(), value));
        self
    }

    /// Chooses the backend.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }
}

/// A candle optimizer running an optc rule over f32 variables.
#[derive(Debug)]
pub struct OptcOptimizer {
    vars: Vec<Var>,
    opt: Optimizer<f32>,
    input: String,
}

fn err(e: optc_runtime::Error) -> candle_core::Error {
    candle_core::Error::msg(e)
}

impl OptcOptimizer {
    /// The optc optimizer underneath (hyperparameters, schedules, groups, state, checkpoints).
    pub fn optc(&mut self) -> &mut Optimizer<f32> {
        &mut self.opt
    }
}

impl candle_nn::Optimizer for OptcOptimizer {
    type Config = OptcConfig;

    fn new(vars: Vec<Var>, config: OptcConfig) -> Result<Self> {
        let info = &config.program.info;
        let inputs: Vec<&str> = info
            .buffers
            .iter()
            .filter(|b| b.role == BufRole::Input)
            .map(|b| b.name.as_str())
            .collect();
        if info.spaces.len() != 1 || inputs.len() != 1 || !info.scalar_inputs.is_empty() {
            candle_core::bail!(
                "rule `{}` must have one param and one per-element input (the gradient) to drive candle variables",
                info.name
            );
        }
        let input = inputs[0].to_string();
        let mut specs = Vec::with_capacity(vars.len());
        for (i, v) in vars.iter().enumerate() {
            if v.dtype() != DType::F32 {
                candle_core::bail!(
                    "variable {i} is {:?}; optc's candle optimizer takes f32 variables",
                    v.dtype()
                );
            }
            specs.push(TensorSpec::new(format!("var{i}"), v.dims()));
        }
        let mut opt = Optimizer::lending(Arc::clone(&config.program), vec![specs])
            .and_then(|o| o.with_backend(config.backend))
            .map_err(err)?;
        for (k, v) in &config.hypers {
            opt.set_hyper(k, *v).map_err(err)?;
        }
        Ok(OptcOptimizer { vars, opt, input })
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let mut params = Vec::with_capacity(self.vars.len());
        let mut gs = Vec::with_capacity(self.vars.len());
        for v in &self.vars {
            params.push(v.as_tensor().flatten_all()?.to_vec1::<f32>()?);
            gs.push(match grads.get(v.as_tensor()) {
                Some(g) => g.flatten_all()?.to_vec1::<f32>()?,
                None => vec![0.0; v.elem_count()],
            });
        }
        let inputs = Inputs::default().tensor(&self.input, gs.iter().map(Vec::as_slice).collect());
        let mut lend: Vec<&mut [f32]> = params.iter_mut().map(Vec::as_mut_slice).collect();
        self.opt
            .step_with(std::slice::from_mut(&mut lend), &inputs)
            .map_err(err)?;
        for (v, p) in self.vars.iter().zip(params) {
            v.set(&Tensor::from_vec(p, v.shape(), v.device())?)?;
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.opt.hyper("lr").unwrap_or(f64::NAN)
    }

    fn set_learning_rate(&mut self, lr: f64) {
        // The trait cannot report an error: a rule without `lr`, or a value out of its range, is
        // left unchanged (`learning_rate` shows the value in use).
        let _ = self.opt.set_hyper("lr", lr);
    }
}
