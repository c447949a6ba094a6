//! The reference interpreter as an engine: it runs kernels over the host buffers, copying a
//! stage's inputs and lent params into them for the stage (and lent params back after it).

use super::{host_input, Compiled, Engine, KernelAt, Lent, Reductions, StageIo};
use crate::{Backend, Error};
use optc_compiler::backend::interp::{run_kernel, DrawKey};
use optc_compiler::ir::{Kernel, Program};
use optc_compiler::ops::Float;
use optc_compiler::storage::StorageMap;
use std::any::Any;
use std::sync::Arc;

/// The reference interpreter (the oracle every engine is tested against; slow).
#[derive(Debug, Clone, Copy, Default)]
pub struct Interp;

impl<T: Float + Default> Engine<T> for Interp {
    fn backend(&self) -> Backend {
        Backend::Interpreter
    }

    fn boxed_clone(&self) -> Box<dyn Engine<T>> {
        Box::new(Interp)
    }

    fn compile(&self, program: &Arc<Program>, storage: &StorageMap) -> Result<Compiled, Error> {
        native_only(program, storage, "the interpreter")?;
        Ok(Arc::new(()))
    }

    fn begin_stage(&mut self, io: &mut StageIo<'_, '_, '_, '_, T>) -> Result<(), Error> {
        let info = &io.program.info;
        for &b in &io.needs.tensors {
            let name = &info.buffers[b as usize].name;
            io.bufs[b as usize] = host_input(io.inputs, name)?
                .iter()
                .map(|d| d.to_vec())
                .collect();
        }
        match &io.params {
            Lent::Owned => {}
            Lent::Host(ps) => {
                for (space, tensors) in ps.iter().enumerate() {
                    io.bufs[space] = tensors.iter().map(|d| d.to_vec()).collect();
                }
            }
            Lent::Bits(_) | Lent::Device(_) => {
                return Err(Error::Params(
                    "16-bit or device params need Backend::Cuda or Backend::CudaEmulator".into(),
                ))
            }
        }
        Ok(())
    }

    fn run_kernel(
        &mut self,
        _compiled: &Compiled,
        _at: KernelAt,
        kernel: &Kernel,
        uniforms: &[Vec<T>],
        io: &mut StageIo<'_, '_, '_, '_, T>,
    ) -> Result<Reductions, Error> {
        if io.raw_partials || io.bases.is_some() {
            return Err(Error::Params(
                "a sharded optimizer runs on the cranelift or native engine".into(),
            ));
        }
        let lens = &io.lens[kernel.space as usize];
        let key = DrawKey {
            seed: io.seed,
            step: io.t,
        };
        Ok(run_kernel(io.program, kernel, lens, uniforms, key, io.bufs))
    }

    fn end_stage(
        &mut self,
        io: &mut StageIo<'_, '_, '_, '_, T>,
        completed: bool,
    ) -> Result<(), Error> {
        if let Lent::Host(ps) = &mut io.params {
            for (space, tensors) in ps.iter_mut().enumerate() {
                if completed {
                    for (d, v) in tensors.iter_mut().zip(&io.bufs[space]) {
                        d.copy_from_slice(v);
                    }
                }
                io.bufs[space] = Vec::new();
            }
        }
        for &b in &io.needs.tensors {
            io.bufs[b as usize] = Vec::new();
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Refuses a storage map this CPU engine cannot apply inside its kernels.
fn native_only(program: &Program, storage: &StorageMap, engine: &str) -> Result<(), Error> {
    if storage.is_native() {
        return Ok(());
    }
    Err(Error::Policy(format!(
        "rule `{}`: {engine} keeps every buffer in the program's precision; 16-bit storage \
         is applied by the mixed-precision optimizer on this backend",
        program.info.name
    )))
}
