//! Launching generated CUDA kernels: the chunk table a launch runs over (tensors cut into chunks
//! in tensor order, partials combined in that order) and the device-side tables kept between
//! launches.

use super::device::{drv, Backing, Device, DeviceBuffer, Func, GpuProgram};
use super::emulator;
use super::nvrtc::CudaError;
use cudarc::driver::result;
use optc_compiler::backend::cuda::{self as gen, BLOCK};
use optc_compiler::ops::Float;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;
/// One launch-table entry, laid out as the kernels read it (`optc_chunk`, 16 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// First element of the chunk in its tensor.
    pub offset: u64,
    /// The tensor (row of the pointer and per-tensor uniform tables).
    pub tensor: u32,
    /// Elements in the chunk.
    pub count: u32,
}

/// The launch table of a kernel over the tensors of its space: tensors cut into chunks of at most
/// `chunk` elements, in tensor order. Its partials are combined in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchTable {
    /// The entries.
    pub chunks: Vec<Chunk>,
    /// Number of tensors.
    pub tensors: usize,
}

/// Elements per chunk the runtime uses: a block of 256 threads makes 64 passes of 128-bit accesses.
pub const DEFAULT_CHUNK: usize = 1 << 16;

impl LaunchTable {
    /// Cuts tensors of `lens` elements into chunks of at most `chunk` elements. `chunk` must be a
    /// positive multiple of 4 below 2^32, so every chunk of an aligned tensor starts 16-byte aligned.
    pub fn new(lens: &[usize], chunk: usize) -> Option<LaunchTable> {
        if chunk == 0 || !chunk.is_multiple_of(4) || u32::try_from(chunk).is_err() {
            return None;
        }
        let tensors = u32::try_from(lens.len()).ok()?;
        let mut chunks = Vec::new();
        for (j, &len) in (0..tensors).zip(lens) {
            let mut s = 0;
            while s < len {
                let n = chunk.min(len - s);
                chunks.push(Chunk {
                    offset: s as u64,
                    tensor: j,
                    count: n as u32,
                });
                s += n;
            }
        }
        Some(LaunchTable {
            chunks,
            tensors: lens.len(),
        })
    }

    /// The table as the bytes the kernels read (little-endian `optc_chunk`s).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.chunks.len() * 16);
        for c in &self.chunks {
            out.extend_from_slice(&c.offset.to_le_bytes());
            out.extend_from_slice(&c.tensor.to_le_bytes());
            out.extend_from_slice(&c.count.to_le_bytes());
        }
        out
    }

    /// Blocks to launch: one per chunk, at most `max_blocks` (blocks then take several chunks).
    pub fn grid(&self, max_blocks: u32) -> u32 {
        u32::try_from(self.chunks.len())
            .unwrap_or(u32::MAX)
            .min(max_blocks)
            .max(1)
    }

    /// Combines a kernel's partials (`partials[r * nchunks + c]`, as the kernel wrote them) in
    /// chunk order: for each reduction, one value per tensor (per-tensor) or one value.
    pub fn combine(
        &self,
        program: &optc_compiler::ir::Program,
        kernel: &optc_compiler::backend::cuda::CudaKernel,
        partials: &[f64],
    ) -> Vec<(optc_compiler::ir::NodeId, Vec<f64>)> {
        let n = self.chunks.len();
        let owner: Vec<usize> = self.chunks.iter().map(|c| c.tensor as usize).collect();
        crate::engine::cranelift::combine_partials(
            program,
            &kernel.reductions,
            self.tensors,
            &owner,
            |ri, c| partials.get(ri * n + c).copied().unwrap_or(0.0),
        )
    }
}

/// A table in device memory re-uploaded only when its contents change.
#[derive(Debug)]
struct Cached {
    bytes: Vec<u8>,
    buf: DeviceBuffer,
}

/// Device-side tables and partial buffers of the launches, kept across steps.
#[derive(Debug, Default)]
pub struct LaunchCache {
    /// Chunk tables by tensor lengths (uploaded once per layout).
    chunks: HashMap<Vec<usize>, (LaunchTable, DeviceBuffer)>,
    /// Per-tensor first-element indices (`tbase` of stochastic rounding) by tensor lengths.
    bases: HashMap<Vec<usize>, DeviceBuffer>,
    /// Pointer and uniform tables by (kernel name, which table).
    tables: HashMap<(String, u8), Cached>,
    /// Partials buffers by kernel name.
    partials: HashMap<String, DeviceBuffer>,
    /// Kernel launches so far.
    pub launches: u64,
}

impl LaunchCache {
    fn table(
        &mut self,
        dev: &Arc<Device>,
        key: (String, u8),
        bytes: Vec<u8>,
    ) -> Result<u64, CudaError> {
        if bytes.is_empty() {
            return Ok(0);
        }
        if let Some(c) = self.tables.get(&key) {
            if c.bytes == bytes {
                return Ok(c.buf.ptr());
            }
            if c.buf.bytes() >= bytes.len() {
                c.buf.upload(0, &bytes)?;
                let ptr = c.buf.ptr();
                if let Some(c) = self.tables.get_mut(&key) {
                    c.bytes = bytes;
                }
                return Ok(ptr);
            }
        }
        let buf = dev.alloc(bytes.len())?;
        buf.upload(0, &bytes)?;
        let ptr = buf.ptr();
        self.tables.insert(key, Cached { bytes, buf });
        Ok(ptr)
    }

    /// Runs one kernel over every tensor of its space in one launch and returns its reductions
    /// combined in chunk order (as `jit::run_kernel` does).
    ///
    /// `ptrs[tensor][slot]` are device addresses of the kernel's slots; `uniforms[tensor]` the
    /// values of every uniform of the kernel in `Kernel::uniforms` order, as computed by the
    /// host for that tensor (constants included, ignored). `key` is the (seed, step) of
    /// stochastic rounding, read by kernels that round stochastically (zeros otherwise).
    ///
    /// # Safety
    /// Every pointer must address at least `lens[tensor]` elements of its buffer's storage type in
    /// `prog`'s device context, live until the launch completes (the caller synchronizes by
    /// downloading partials or by a later synchronous copy); stored slots must not overlap any
    /// other slot of the launch.
    #[allow(unsafe_code, clippy::too_many_arguments)]
    pub unsafe fn run_kernel<T: Float>(
        &mut self,
        prog: &GpuProgram,
        at: [usize; 4],
        lens: &[usize],
        uniform_ids: &[optc_compiler::ir::NodeId],
        ptrs: &[Vec<u64>],
        uniforms: &[Vec<T>],
        key: (u64, u32),
    ) -> Result<Vec<(optc_compiler::ir::NodeId, Vec<f64>)>, CudaError> {
        let dev = &prog.dev;
        // Per-launch arguments are valid only when every tensor has the same value.
        let (split, _) = prog.kernel(at, false)?;
        let col = |u| uniform_ids.iter().position(|&x| x == u);
        let agree = split.args.iter().all(|&u| match col(u) {
            Some(c) => uniforms
                .iter()
                .all(|row| row[c].to_f64().to_bits() == uniforms[0][c].to_f64().to_bits()),
            None => true,
        });
        let (k, func) = prog.kernel(at, !agree)?;
        if !self.chunks.contains_key(lens) {
            let table = LaunchTable::new(lens, DEFAULT_CHUNK)
                .ok_or_else(|| CudaError::Driver("too many tensors for one launch".into()))?;
            let buf = dev.alloc(table.chunks.len() * gen::CHUNK_ENTRY_BYTES)?;
            buf.upload(0, &table.to_bytes())?;
            self.chunks.insert(lens.to_vec(), (table, buf));
        }
        let Some((table, chunk_buf)) = self.chunks.get(lens) else {
            return Err(CudaError::Driver("launch table missing".into()));
        };
        let (table, chunk_ptr) = (table.clone(), chunk_buf.ptr());
        let nchunks = table.chunks.len();
        if nchunks == 0 {
            return Ok(table.combine(&prog.program, k, &[]));
        }
        let mut ptr_bytes = Vec::with_capacity(lens.len() * k.slots.len() * 8);
        for row in ptrs {
            for p in row {
                ptr_bytes.extend_from_slice(&p.to_le_bytes());
            }
        }
        let esize = std::mem::size_of::<T>();
        let mut tuni_bytes = Vec::with_capacity(lens.len() * k.tensor_uniforms.len() * esize);
        let tcols: Vec<usize> = k
            .tensor_uniforms
            .iter()
            .map(|&u| col(u).ok_or_else(|| CudaError::Driver("uniform missing".into())))
            .collect::<Result<_, _>>()?;
        for row in uniforms {
            for &c in &tcols {
                tuni_bytes.extend_from_slice(&row[c].to_le_bytes_vec());
            }
        }
        let ptrs_dev = self.table(dev, (k.name.clone(), 0), ptr_bytes)?;
        let tuni_dev = self.table(dev, (k.name.clone(), 1), tuni_bytes)?;
        let nred = k.reductions.len();
        let partials_dev = if nred == 0 {
            0
        } else {
            let need = nred * nchunks * 8;
            let fits = self
                .partials
                .get(&k.name)
                .is_some_and(|b| b.bytes() >= need);
            if !fits {
                self.partials.insert(k.name.clone(), dev.alloc(need)?);
            }
            self.partials.get(&k.name).map_or(0, DeviceBuffer::ptr)
        };
        let first = uniforms.first();
        let mut args: Vec<T> = Vec::with_capacity(k.args.len());
        for &u in &k.args {
            let c = col(u).ok_or_else(|| CudaError::Driver("argument missing".into()))?;
            match first {
                Some(row) => args.push(row[c]),
                None => return Ok(table.combine(&prog.program, k, &[])),
            }
        }
        let nchunks32 = u32::try_from(nchunks)
            .map_err(|_| CudaError::Driver("too many chunks for one launch".into()))?;
        let mut tbase_dev = 0u64;
        if k.rounding_key {
            if !self.bases.contains_key(lens) {
                let mut at = 0u64;
                let bases: Vec<u64> = lens
                    .iter()
                    .map(|&n| {
                        let b = at;
                        at += n as u64;
                        b
                    })
                    .collect();
                let buf = dev.alloc(bases.len() * 8)?;
                buf.upload(0, &bases)?;
                self.bases.insert(lens.to_vec(), buf);
            }
            tbase_dev = self.bases.get(lens).map_or(0, DeviceBuffer::ptr);
        }
        let (mut seed, mut step) = key;
        let mut fixed: [u64; 5] = [chunk_ptr, ptrs_dev, tuni_dev, partials_dev, tbase_dev];
        let mut n32 = nchunks32;
        let mut params: Vec<*mut c_void> = vec![
            &mut fixed[0] as *mut u64 as *mut c_void,
            &mut n32 as *mut u32 as *mut c_void,
        ];
        let (_, rest) = fixed.split_at_mut(1);
        let (pointers, tbase) = rest.split_at_mut(3);
        for p in pointers.iter_mut() {
            params.push(p as *mut u64 as *mut c_void);
        }
        if k.rounding_key {
            params.push(&mut tbase[0] as *mut u64 as *mut c_void);
            params.push(&mut seed as *mut u64 as *mut c_void);
            params.push(&mut step as *mut u32 as *mut c_void);
        }
        for a in args.iter_mut() {
            params.push(a as *mut T as *mut c_void);
        }
        let grid = table.grid(1 << 30);
        dev.bind()?;
        match (func, &dev.kind) {
            // SAFETY: `func` belongs to a module loaded in this context; `params` points at one
            // live value per kernel parameter, of the types the ABI declares (three device
            // pointers and a u32 after the chunk table pointer; for a rounding kernel a device
            // pointer, a u64 and a u32; then one `T` per argument),
            // alive for the call (the driver copies them); the tables were uploaded
            // synchronously above; the buffers behind `ptrs` are the caller's contract.
            (Func::Driver(f), _) => unsafe {
                result::launch_kernel(
                    f,
                    (grid, 1, 1),
                    (BLOCK, 1, 1),
                    0,
                    std::ptr::null_mut(),
                    &mut params,
                )
            }
            .map_err(drv("kernel launch failed"))?,
            (Func::Emulator(f), Backing::Emulator(mem)) => {
                // SAFETY: as above; the launcher unpacks `params` with the kernel's own
                // parameter types and runs it to completion before returning.
                let code = unsafe { f(grid, BLOCK, params.as_mut_ptr()) };
                emulator::status(code)
                    .and_then(|()| mem.check_guards().map_err(CudaError::Emulator))
                    .map_err(|e| CudaError::Emulator(format!("kernel `{}`: {e}", k.name)))?;
            }
            (Func::Emulator(_), Backing::Driver(_)) => {
                return Err(CudaError::Driver(
                    "an emulated kernel launched on a GPU".into(),
                ))
            }
        }
        self.launches += 1;
        // Debugging a first run: OPTC_CUDA_SYNC=1 waits for each kernel, so a fault names it.
        if std::env::var_os("OPTC_CUDA_SYNC").is_some_and(|v| v == "1") {
            dev.synchronize()
                .map_err(|e| CudaError::Driver(format!("kernel `{}` failed: {e}", k.name)))?;
        }
        if nred == 0 {
            return Ok(Vec::new());
        }
        let mut partials = vec![0f64; nred * nchunks];
        if let Some(b) = self.partials.get(&k.name) {
            b.download(0, &mut partials)?;
        }
        Ok(table.combine(&prog.program, k, &partials))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_tables_cut_tensors_in_order() {
        let t = LaunchTable::new(&[10, 0, 4, 9], 8).unwrap();
        let c: Vec<(u32, u64, u32)> = t
            .chunks
            .iter()
            .map(|c| (c.tensor, c.offset, c.count))
            .collect();
        assert_eq!(
            c,
            vec![(0, 0, 8), (0, 8, 2), (2, 0, 4), (3, 0, 8), (3, 8, 1)]
        );
        assert_eq!(std::mem::size_of::<Chunk>(), 16);
        let bytes = t.to_bytes();
        assert_eq!(bytes.len(), 16 * 5);
        assert_eq!(
            &bytes[16..32],
            &[8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0]
        );
        assert_eq!(t.grid(2), 2);
        assert_eq!(t.grid(100), 5);
        assert_eq!(LaunchTable::new(&[], 8).unwrap().grid(4), 1);
        assert_eq!(
            LaunchTable::new(&[1], 6),
            None,
            "chunks keep 16-byte alignment"
        );
        assert_eq!(LaunchTable::new(&[1], 0), None);
    }

    #[test]
    fn partials_combine_in_chunk_order_per_tensor_or_globally() {
        let c = optc_compiler::compile(
            "rule r(lr = 0.1) { param w  input g  w = w - lr * g * sum(g) / (tensor_max_abs(g) + 1) }",
        );
        let p = c.programs.into_iter().next().expect("compiles");
        let m =
            optc_compiler::backend::cuda::module(&p, optc_compiler::backend::clif::Precision::F32);
        let k = m
            .kernels
            .iter()
            .find(|k| k.variant == 1 && k.reductions.len() == 2)
            .expect("a kernel with both reductions");
        let t = LaunchTable::new(&[8, 12], 8).unwrap(); // chunks: (0), (1, 0..8), (1, 8..12)
        let per_tensor = |r| match p.graph.node(r) {
            optc_compiler::ir::Node::Reduce { per_tensor, .. } => per_tensor,
            _ => unreachable!(),
        };
        let mut partials = vec![0.0; 6];
        for (ri, &r) in k.reductions.iter().enumerate() {
            let vals = if per_tensor(r) {
                [3.0, 1.0, f64::NAN]
            } else {
                [1.0, 2.0, 4.0]
            };
            partials[ri * 3..ri * 3 + 3].copy_from_slice(&vals);
        }
        for (r, v) in t.combine(&p, k, &partials) {
            if per_tensor(r) {
                assert_eq!(v.len(), 2);
                assert_eq!(v[0], 3.0);
                assert!(v[1].is_nan(), "a NaN partial makes the max NaN");
            } else {
                assert_eq!(v, vec![7.0]);
            }
        }
    }
}
