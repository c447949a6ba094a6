//! Sharded optimizer state (ZeRO stage 1): each rank of a group of processes (or threads) owns
//! a contiguous slice of every param space and keeps state only for it, and the results are
//! bit-identical to one optimizer over the whole tensors, for any number of ranks.
//!
//! Ranks talk only where the rule's phases meet: reductions. A slice is cut on task
//! boundaries ([`TASK_ELEMS`]-element tasks from each tensor's start, as the CPU engines cut
//! work), so each rank computes exactly the single optimizer's task partials for its tasks;
//! a [`Collective`] gathers every rank's partials, and every rank combines them in global task
//! order — global and per-tensor reductions, a tensor split across ranks included, come out
//! as one optimizer computes them. Random draws and stochastic rounding are keyed by the
//! element's index in the whole tensors. Scalar state is computed identically on every rank.
//!
//! [`ShardedOptimizer`] wraps an [`Optimizer`] over the rank's pieces (at most one per tensor:
//! a contiguous slice of a space meets each tensor in one range); the step driver reads the
//! shard's view (`ShardCtx`) for the whole tensors' lengths and groups and combines the
//! gathered partials. The CPU engines (Cranelift, native) run shards.
//!
//! ```
//! use optc_runtime::{Backend, Inputs, LocalGroup, ShardedOptimizer, TensorSpec};
//! use std::sync::Arc;
//! use std::time::Duration;
//! # let src = "rule sgd(lr = 0.5) { param theta\n input g\n theta = theta - lr * g }";
//! # let program = Arc::new(optc_compiler::compile(src).programs.remove(0));
//! let n = 40_000; // three tasks of 16384 elements: two ranks share them
//! let ranks: Vec<_> = LocalGroup::members(2, Duration::from_secs(10))
//!     .into_iter()
//!     .map(|member| {
//!         let program = Arc::clone(&program);
//!         std::thread::spawn(move || {
//!             let tensors = vec![vec![TensorSpec::new("w", &[n])]];
//!             let cpu = Backend::Cranelift { threads: 1 };
//!             let mut opt = ShardedOptimizer::<f32>::new(program, tensors, member, cpu)?;
//!             let (mut w, g) = (vec![1.0f32; n], vec![1.0f32; n]);
//!             opt.step_with(&mut [vec![&mut w[..]]], &Inputs::default().tensor("g", vec![&g]))?;
//!             Ok::<_, optc_runtime::Error>((opt.pieces(0).to_vec(), w))
//!         })
//!     })
//!     .collect();
//! let mut updated = 0;
//! for rank in ranks {
//!     let (pieces, w) = rank.join().expect("rank")?;
//!     for p in pieces {
//!         // each rank updated its own piece of the whole tensor
//!         assert!(w[p.start..p.start + p.len].iter().all(|&x| x == 0.5));
//!         updated += p.len;
//!     }
//! }
//! assert_eq!(updated, n);
//! # Ok::<(), optc_runtime::Error>(())
//! ```

use crate::engine::cranelift::TASK_ELEMS;
use crate::{Backend, Error, Inputs, Optimizer, TensorSpec};
use optc_compiler::ops::Float;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How the ranks of a sharded optimizer exchange reduction partials.
pub trait Collective: Send + Sync + std::fmt::Debug {
    /// This rank's number, `0..size`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Every rank's `local` (lengths may differ), in rank order. Every rank calls it the same
    /// number of times in the same order; a rank that fails or does not come makes it an error
    /// on every other rank (no hang).
    fn all_gather(&self, local: &[f64]) -> Result<Vec<Vec<f64>>, Error>;
}

/// A contiguous range of one tensor held by one rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// The tensor's index in its space.
    pub tensor: usize,
    /// Its first element within the tensor (a multiple of [`TASK_ELEMS`]).
    pub start: usize,
    /// Its number of elements.
    pub len: usize,
}

/// Where every rank's share of every space lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLayout {
    /// The whole tensors' lengths, `[space][tensor]`.
    pub lens: Vec<Vec<usize>>,
    /// `[space][rank]`: the rank's pieces, in tensor order.
    pub pieces: Vec<Vec<Vec<Piece>>>,
}

impl ShardLayout {
    /// Cuts every space into `ranks` contiguous slices of about equal size, on task boundaries.
    pub fn new(lens: Vec<Vec<usize>>, ranks: usize) -> ShardLayout {
        let ranks = ranks.max(1);
        let pieces = lens
            .iter()
            .map(|ls| {
                let total: usize = ls.iter().sum();
                let mut out: Vec<Vec<Piece>> = vec![Vec::new(); ranks];
                let mut at = 0usize; // elements of the space before this task
                for (j, &n) in ls.iter().enumerate() {
                    let mut s = 0;
                    while s < n {
                        let e = (s + TASK_ELEMS).min(n);
                        // The rank whose share [r N / R, (r + 1) N / R) holds the task's start.
                        let r = ((at as u128 * ranks as u128) / total.max(1) as u128) as usize;
                        let r = r.min(ranks - 1);
                        match out[r].last_mut() {
                            Some(p) if p.tensor == j && p.start + p.len == s => p.len += e - s,
                            _ => out[r].push(Piece {
                                tensor: j,
                                start: s,
                                len: e - s,
                            }),
                        }
                        at += e - s;
                        s = e;
                    }
                }
                out
            })
            .collect();
        ShardLayout { lens, pieces }
    }

    /// The number of ranks.
    pub fn ranks(&self) -> usize {
        self.pieces.first().map_or(1, Vec::len)
    }

    /// Elements rank `rank` holds, over every space.
    pub fn elements(&self, rank: usize) -> usize {
        self.pieces
            .iter()
            .map(|rs| rs[rank].iter().map(|p| p.len).sum::<usize>())
            .sum()
    }
}

fn tasks(n: usize) -> usize {
    n.div_ceil(TASK_ELEMS)
}

/// What the step driver of a shard reads: the whole tensors' view and the collective.
#[derive(Debug, Clone)]
pub(crate) struct ShardCtx {
    pub(crate) collective: Arc<dyn Collective>,
    pub(crate) layout: ShardLayout,
    /// Per space, per piece of this rank: the tensor it is part of.
    pub(crate) orig: Vec<Vec<usize>>,
    /// Per space, per piece: the index of its element 0 among all elements of the space.
    pub(crate) bases: Vec<Vec<u64>>,
    /// Per space: the tensor of every task of every rank, in global task order.
    pub(crate) owner: Vec<Vec<usize>>,
    /// Per space, per rank: its number of tasks.
    pub(crate) rank_tasks: Vec<Vec<usize>>,
    /// The group of every whole tensor, `[space][tensor]`.
    pub(crate) groups: Vec<Vec<usize>>,
}

impl ShardCtx {
    fn new(collective: Arc<dyn Collective>, layout: ShardLayout) -> ShardCtx {
        let rank = collective.rank();
        let orig = layout
            .pieces
            .iter()
            .map(|rs| rs[rank].iter().map(|p| p.tensor).collect())
            .collect();
        let bases = layout
            .pieces
            .iter()
            .zip(&layout.lens)
            .map(|(rs, ls)| {
                let starts = crate::engine::cranelift::tensor_bases(ls);
                rs[rank]
                    .iter()
                    .map(|p| starts[p.tensor] + p.start as u64)
                    .collect()
            })
            .collect();
        let owner = layout
            .pieces
            .iter()
            .map(|rs| {
                rs.iter()
                    .flatten()
                    .flat_map(|p| std::iter::repeat_n(p.tensor, tasks(p.len)))
                    .collect()
            })
            .collect();
        let rank_tasks = layout
            .pieces
            .iter()
            .map(|rs| {
                rs.iter()
                    .map(|ps| ps.iter().map(|p| tasks(p.len)).sum())
                    .collect()
            })
            .collect();
        let groups = layout.lens.iter().map(|ls| vec![0; ls.len()]).collect();
        ShardCtx {
            collective,
            layout,
            orig,
            bases,
            owner,
            rank_tasks,
            groups,
        }
    }

    /// Whether every rank passed its checks (`ok`): an error naming the ranks that did not,
    /// on every rank, before anything runs.
    pub(crate) fn agree(&self, ok: bool) -> Result<(), Error> {
        let all = self.collective.all_gather(&[if ok { 1.0 } else { 0.0 }])?;
        let failed: Vec<String> = all
            .iter()
            .enumerate()
            .filter(|(_, v)| v.first() != Some(&1.0))
            .map(|(r, _)| r.to_string())
            .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(Error::Params(format!(
                "rank(s) {} refused the step: no rank changed anything",
                failed.join(", ")
            )))
        }
    }

    /// Gathers every rank's task partials of a kernel over `space` (`local[reduction]`, one
    /// value per local task) and returns, per reduction, every task's partial in global order.
    pub(crate) fn gather(&self, space: usize, local: &[Vec<f64>]) -> Result<Vec<Vec<f64>>, Error> {
        let flat: Vec<f64> = local.iter().flatten().copied().collect();
        let all = self.collective.all_gather(&flat)?;
        let nred = local.len();
        let mut out = vec![Vec::with_capacity(self.owner[space].len()); nred];
        for (r, part) in all.iter().enumerate() {
            let n = self.rank_tasks[space].get(r).copied().unwrap_or(0);
            if part.len() != n * nred {
                return Err(Error::Params(format!(
                    "rank {r} sent {} reduction partials where {} were expected: the ranks \
                     disagree on the layout or the rule",
                    part.len(),
                    n * nred
                )));
            }
            for (ri, o) in out.iter_mut().enumerate() {
                o.extend_from_slice(&part[ri * n..(ri + 1) * n]);
            }
        }
        Ok(out)
    }
}

/// One rank of a sharded optimizer: the rule's state for this rank's share of every space.
///
/// Every rank is made with the same rule, the same whole tensors and its own [`Collective`];
/// every rank then calls the same methods in the same order (hyperparameters, groups,
/// steps). A step takes the whole tensors of params and inputs (as data-parallel ranks hold
/// them) and updates this rank's share of the params; the other ranks update theirs.
#[derive(Debug)]
pub struct ShardedOptimizer<T: Float> {
    inner: Optimizer<T>,
    names: Vec<Vec<String>>,
}

impl<T: Float + Default> ShardedOptimizer<T> {
    /// This rank's share of `tensors` (`[space]`: every param's whole tensors, named), run on
    /// `backend` (Cranelift or native, or `Auto`).
    pub fn new(
        program: Arc<optc_compiler::ir::Program>,
        tensors: Vec<Vec<TensorSpec>>,
        collective: Arc<dyn Collective>,
        backend: Backend,
    ) -> Result<Self, Error> {
        if program.axis_form.is_some() {
            return Err(Error::Policy(format!(
                "rule `{}` has a sample or particle axis, which sharding does not support",
                program.info.name
            )));
        }
        match backend.resolved() {
            Backend::Cranelift { .. } | Backend::Native { .. } => {}
            other => {
                return Err(Error::Policy(format!(
                    "a sharded optimizer runs on the cranelift or native engine, not {other:?}"
                )))
            }
        }
        if collective.rank() >= collective.size() {
            return Err(Error::Params(format!(
                "rank {} of a group of {}",
                collective.rank(),
                collective.size()
            )));
        }
        let lens: Vec<Vec<usize>> = tensors
            .iter()
            .map(|ts| ts.iter().map(TensorSpec::numel).collect())
            .collect();
        let layout = ShardLayout::new(lens, collective.size());
        let rank = collective.rank();
        let pieces: Vec<Vec<TensorSpec>> = layout
            .pieces
            .iter()
            .zip(&tensors)
            .map(|(rs, ts)| {
                rs[rank]
                    .iter()
                    .map(|p| {
                        TensorSpec::new(format!("{}@{}", ts[p.tensor].name, p.start), &[p.len])
                    })
                    .collect()
            })
            .collect();
        let names = tensors
            .iter()
            .map(|ts| ts.iter().map(|t| t.name.clone()).collect())
            .collect();
        let mut inner = Optimizer::lending(program, pieces)?.with_backend(backend)?;
        inner.shard = Some(Arc::new(ShardCtx::new(collective, layout)));
        Ok(ShardedOptimizer { inner, names })
    }

    /// The layout of every rank's share.
    pub fn layout(&self) -> &ShardLayout {
        &self.ctx().layout
    }

    fn ctx(&self) -> &ShardCtx {
        self.inner
            .shard
            .as_deref()
            .expect("a sharded optimizer has a shard")
    }

    /// This rank's pieces of space `space`.
    pub fn pieces(&self, space: usize) -> &[Piece] {
        let ctx = self.ctx();
        &ctx.layout.pieces[space][ctx.collective.rank()]
    }

    /// The optimizer over this rank's pieces (steps, scalar state, state of the pieces).
    pub fn inner(&self) -> &Optimizer<T> {
        &self.inner
    }

    /// Sets a hyperparameter (as [`Optimizer::set_hyper`]).
    pub fn set_hyper(&mut self, name: &str, value: f64) -> Result<(), Error> {
        self.inner.set_hyper(name, value)
    }

    /// Starts a parameter group of the named whole tensors (as [`Optimizer::add_group`]).
    pub fn add_group(&mut self, tensors: &[&str], values: &[(&str, f64)]) -> Result<usize, Error> {
        let mut places = Vec::new();
        for &name in tensors {
            let place = self
                .names
                .iter()
                .enumerate()
                .find_map(|(s, ns)| ns.iter().position(|n| n == name).map(|j| (s, j)))
                .ok_or_else(|| Error::UnknownTensor(name.to_string()))?;
            places.push(place);
        }
        let ctx = self.ctx();
        let rank = ctx.collective.rank();
        let mine: Vec<String> = places
            .iter()
            .filter_map(|&(s, j)| {
                ctx.layout.pieces[s][rank]
                    .iter()
                    .find(|p| p.tensor == j)
                    .map(|p| format!("{}@{}", self.names[s][j], p.start))
            })
            .collect();
        let mine: Vec<&str> = mine.iter().map(String::as_str).collect();
        let g = self.inner.add_group(&mine, values)?;
        let ctx = Arc::make_mut(self.inner.shard.as_mut().expect("shard"));
        for (s, j) in places {
            ctx.groups[s][j] = g;
        }
        Ok(g)
    }

    /// Runs a step: `params[space]` and every input are the whole tensors; this rank's share
    /// of the params is updated in place. Checked first: on an error nothing changes.
    pub fn step_with(
        &mut self,
        params: &mut [Vec<&mut [T]>],
        inputs: &Inputs<'_, T>,
    ) -> Result<(), Error> {
        let ctx = Arc::clone(self.inner.shard.as_ref().expect("shard"));
        match self.pieces_of(&ctx, params, inputs) {
            Ok((mut pieces, piece_inputs)) => self.inner.step_with(&mut pieces, &piece_inputs),
            Err(e) => {
                // The other ranks are waiting to agree that every rank passed its checks.
                let _ = ctx.agree(false);
                Err(e)
            }
        }
    }

    /// Brings every rank's share of the params into this rank's whole `params` (after a step,
    /// each rank updated only its own): an all-gather of the pieces, exact for f32 and f64.
    /// Every rank calls it; a rank whose tensors do not fit makes every rank fail, with
    /// nothing changed.
    pub fn gather_params(&self, params: &mut [Vec<&mut [T]>]) -> Result<(), Error> {
        let ctx = self.ctx();
        let rank = ctx.collective.rank();
        let lens = &ctx.layout.lens;
        let fits = params.len() == lens.len()
            && params.iter().zip(lens).all(|(ps, ls)| {
                ps.len() == ls.len() && ps.iter().zip(ls).all(|(p, &n)| p.len() == n)
            });
        ctx.agree(fits)?;
        let mut local = Vec::new();
        for (s, rs) in ctx.layout.pieces.iter().enumerate() {
            for p in &rs[rank] {
                local.extend(
                    params[s][p.tensor][p.start..p.start + p.len]
                        .iter()
                        .map(|x| x.to_f64()),
                );
            }
        }
        let all = ctx.collective.all_gather(&local)?;
        // Check every rank's count before writing anything.
        for (r, values) in all.iter().enumerate() {
            let n: usize = ctx
                .layout
                .pieces
                .iter()
                .map(|rs| rs[r].iter().map(|p| p.len).sum::<usize>())
                .sum();
            if values.len() != n {
                return Err(Error::Params(format!(
                    "rank {r} sent {} parameter values where its share holds {n}",
                    values.len()
                )));
            }
        }
        for (r, values) in all.iter().enumerate() {
            if r == rank {
                continue;
            }
            let mut at = 0;
            for (s, rs) in ctx.layout.pieces.iter().enumerate() {
                for p in &rs[r] {
                    for (d, &v) in params[s][p.tensor][p.start..p.start + p.len]
                        .iter_mut()
                        .zip(&values[at..at + p.len])
                    {
                        *d = T::from_f64(v);
                    }
                    at += p.len;
                }
            }
        }
        Ok(())
    }

    /// This rank's pieces of the whole params and inputs of a step, checked.
    #[allow(clippy::type_complexity)]
    fn pieces_of<'a, 'i>(
        &self,
        ctx: &ShardCtx,
        params: &'a mut [Vec<&mut [T]>],
        inputs: &Inputs<'i, T>,
    ) -> Result<(Vec<Vec<&'a mut [T]>>, Inputs<'i, T>), Error> {
        let rank = ctx.collective.rank();
        let lens = &ctx.layout.lens;
        if params.len() != lens.len() {
            return Err(Error::Spaces {
                rule: self.inner.program().info.name.clone(),
                expected: lens.len(),
                got: params.len(),
            });
        }
        for (s, (ps, ls)) in params.iter().zip(lens).enumerate() {
            if ps.len() != ls.len() {
                return Err(Error::Length {
                    what: format!(
                        "param `{}` (number of tensors)",
                        self.inner.program().info.spaces[s]
                    ),
                    expected: ls.len(),
                    got: ps.len(),
                });
            }
            for (j, (p, &n)) in ps.iter().zip(ls).enumerate() {
                if p.len() != n {
                    return Err(Error::Length {
                        what: format!("param tensor `{}`", self.names[s][j]),
                        expected: n,
                        got: p.len(),
                    });
                }
            }
        }
        let info = &self.inner.program().info;
        let mut piece_inputs = Inputs {
            scalars: inputs.scalars.clone(),
            samples: inputs.samples,
            ..Inputs::default()
        };
        for (name, ts) in &inputs.tensors {
            let Some(b) = info.buffer(name) else {
                return Err(Error::UnknownInput {
                    rule: info.name.clone(),
                    name: name.clone(),
                });
            };
            let space = info.buffers[b as usize].space as usize;
            if ts.len() != lens[space].len() {
                return Err(Error::Length {
                    what: format!("input `{name}` (number of tensors)"),
                    expected: lens[space].len(),
                    got: ts.len(),
                });
            }
            // Every whole tensor is checked, held here or not: all ranks refuse the same input.
            for (j, t) in ts.iter().enumerate() {
                if t.len() != lens[space][j] {
                    return Err(Error::Length {
                        what: format!("input `{name}` for tensor `{}`", self.names[space][j]),
                        expected: lens[space][j],
                        got: t.len(),
                    });
                }
            }
            let out: Vec<&[T]> = ctx.layout.pieces[space][rank]
                .iter()
                .map(|p| &ts[p.tensor][p.start..p.start + p.len])
                .collect();
            piece_inputs.tensors.insert(name.clone(), out);
        }
        let pieces: Vec<Vec<&mut [T]>> = params
            .iter_mut()
            .zip(&ctx.layout.pieces)
            .map(|(ps, rs)| {
                let mine = &rs[rank];
                let mut k = 0;
                let mut out = Vec::with_capacity(mine.len());
                for (j, t) in ps.iter_mut().enumerate() {
                    if let Some(p) = mine.get(k).filter(|p| p.tensor == j) {
                        out.push(&mut t[p.start..p.start + p.len]);
                        k += 1;
                    }
                }
                out
            })
            .collect();
        Ok((pieces, piece_inputs))
    }
}

/// Checkpoints: one file per rank, and re-sharding from any number of ranks' files.
impl<T: Float + Default> ShardedOptimizer<T> {
    /// This rank's checkpoint: an optimizer checkpoint of its pieces (state tensors named
    /// `state.<buffer>.<tensor>@<first element>`), with the step, scalar state, seed,
    /// hyperparameters, schedules and groups, plus the groups of the whole tensors. Every
    /// rank's file together is the whole state; [`ShardedOptimizer::load_checkpoints`] reads
    /// them back at any number of ranks.
    pub fn checkpoint_bytes(&self) -> Result<Vec<u8>, Error> {
        let bytes = self.inner.checkpoint_bytes()?;
        let ctx = self.ctx();
        let extra = serde_json::json!({
            "rank": ctx.collective.rank(),
            "ranks": ctx.collective.size(),
            "tensors": self.names,
            "groups": ctx.groups,
        });
        rebuild(&bytes, |meta| {
            meta.insert("optc_shard".into(), extra.to_string());
        })
    }

    /// Loads the state from every rank's [`ShardedOptimizer::checkpoint_bytes`] of an earlier
    /// run, at any number of ranks then and now (every rank passes all the files). Checked
    /// first — the same rule and whole tensors, files that agree on everything but their
    /// pieces, every element of this rank's share present, checksums — so on an error nothing
    /// changes.
    pub fn load_checkpoints(&mut self, files: &[&[u8]]) -> Result<(), Error> {
        use crate::checkpoint::{checksum, err};
        use safetensors::tensor::{SafeTensors, TensorView};
        let corrupt = |e: &dyn std::fmt::Display| err(format!("not a valid shard checkpoint: {e}"));
        if files.is_empty() {
            return Err(err("no shard checkpoints given"));
        }
        // (buffer, whole tensor) -> (first element, values) of every saved piece
        let mut saved: std::collections::HashMap<(String, String), Vec<SavedPiece>> =
            std::collections::HashMap::new();
        let mut base: Option<serde_json::Map<String, serde_json::Value>> = None;
        let mut whole_groups: Option<Vec<Vec<usize>>> = None;
        for (i, bytes) in files.iter().enumerate() {
            let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| corrupt(&e))?;
            let meta = header.metadata().clone().unwrap_or_default();
            let record = meta
                .get("optc")
                .ok_or_else(|| err(format!("file {i} is not an optc checkpoint")))?;
            let shard = meta.get("optc_shard").ok_or_else(|| {
                err(format!(
                    "file {i} is not a shard checkpoint (no `optc_shard`)"
                ))
            })?;
            let mut record: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(record).map_err(|e| corrupt(&e))?;
            let shard: serde_json::Value = serde_json::from_str(shard).map_err(|e| corrupt(&e))?;
            let stored = record
                .remove("record_checksum")
                .and_then(|v| v.as_str().map(String::from))
                .ok_or_else(|| err(format!("file {i} has no record checksum")))?;
            if stored
                != checksum(
                    serde_json::Value::Object(record.clone())
                        .to_string()
                        .as_bytes(),
                )
            {
                return Err(err(format!(
                    "file {i}: the record does not match its checksum"
                )));
            }
            let names: Vec<Vec<String>> =
                serde_json::from_value(shard["tensors"].clone()).map_err(|e| corrupt(&e))?;
            if names != self.names {
                return Err(err(format!(
                    "file {i} is for other tensors than this optimizer's"
                )));
            }
            let groups: Vec<Vec<usize>> =
                serde_json::from_value(shard["groups"].clone()).map_err(|e| corrupt(&e))?;
            // Everything but the pieces must agree between the files.
            let mut common = record.clone();
            for k in ["tensor_lengths", "groups", "checksums"] {
                common.remove(k);
            }
            match &base {
                None => {
                    base = Some(common);
                    whole_groups = Some(groups);
                }
                Some(b) => {
                    if *b != common || whole_groups.as_ref() != Some(&groups) {
                        return Err(err(format!(
                            "file {i} disagrees with file 0 (another step, rule or setting)"
                        )));
                    }
                }
            }
            let sums = record
                .get("checksums")
                .and_then(|c| c.as_object())
                .ok_or_else(|| err(format!("file {i} has no checksums")))?;
            let st = SafeTensors::deserialize(bytes).map_err(|e| corrupt(&e))?;
            for (name, view) in st.tensors() {
                if sums.get(&name).and_then(|c| c.as_str()) != Some(&checksum(view.data())) {
                    return Err(err(format!(
                        "file {i}: tensor `{name}` does not match its checksum"
                    )));
                }
                let rest = name
                    .strip_prefix("state.")
                    .ok_or_else(|| err(format!("file {i}: unexpected tensor `{name}`")))?;
                let (piece, start) = rest
                    .rsplit_once('@')
                    .ok_or_else(|| err(format!("file {i}: `{name}` is not a piece")))?;
                let start: usize = start
                    .parse()
                    .map_err(|_| err(format!("file {i}: `{name}` is not a piece")))?;
                let (buffer, tensor) = self
                    .inner
                    .program()
                    .info
                    .buffers
                    .iter()
                    .filter(|b| b.role == optc_compiler::ir::BufRole::State)
                    .find_map(|b| {
                        piece
                            .strip_prefix(&format!("{}.", b.name))
                            .map(|t| (b.name.clone(), t.to_string()))
                    })
                    .ok_or_else(|| err(format!("file {i}: `{name}` is no state of this rule")))?;
                saved
                    .entry((buffer, tensor))
                    .or_default()
                    .push((start, view.data().to_vec()));
            }
        }
        let mut record = base.expect("one file at least");
        let whole_groups = whole_groups.expect("one file at least");
        // This rank's pieces, assembled from the saved ones.
        let ctx = Arc::clone(self.inner.shard.as_ref().expect("shard"));
        let rank = ctx.collective.rank();
        let info = &self.inner.program().info;
        let bytes_per = T::BYTES;
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for b in info
            .buffers
            .iter()
            .filter(|b| b.role == optc_compiler::ir::BufRole::State)
        {
            let space = b.space as usize;
            for p in &ctx.layout.pieces[space][rank] {
                let whole = &self.names[space][p.tensor];
                let mut data = vec![0u8; p.len * bytes_per];
                let mut have = 0usize;
                for (start, values) in saved
                    .get(&(b.name.clone(), whole.clone()))
                    .into_iter()
                    .flatten()
                {
                    let n = values.len() / bytes_per;
                    let lo = (*start).max(p.start);
                    let hi = (start + n).min(p.start + p.len);
                    if lo < hi {
                        data[(lo - p.start) * bytes_per..(hi - p.start) * bytes_per]
                            .copy_from_slice(
                                &values[(lo - start) * bytes_per..(hi - start) * bytes_per],
                            );
                        have += hi - lo;
                    }
                }
                if have != p.len {
                    return Err(err(format!(
                        "the files hold {have} of the {} elements of `{}` of tensor `{whole}` this rank needs: pass every rank's file",
                        p.len, b.name
                    )));
                }
                tensors.push((
                    format!("state.{}.{whole}@{}", b.name, p.start),
                    vec![p.len],
                    data,
                ));
            }
        }
        // The record of this rank's pieces.
        let piece_name = |s: usize, j: usize| {
            ctx.layout.pieces[s][rank]
                .iter()
                .find(|p| p.tensor == j)
                .map(|p| format!("{}@{}", self.names[s][j], p.start))
        };
        let old_groups = files
            .first()
            .and_then(|f| SafeTensors::read_metadata(f).ok())
            .and_then(|(_, h)| h.metadata().clone())
            .and_then(|m| m.get("optc").cloned())
            .and_then(|r| serde_json::from_str::<serde_json::Value>(&r).ok())
            .and_then(|r| r.get("groups").cloned())
            .unwrap_or(serde_json::Value::Array(Vec::new()));
        let groups: Vec<serde_json::Value> = old_groups
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(g, old)| {
                let mine: Vec<String> = whole_groups
                    .iter()
                    .enumerate()
                    .flat_map(|(s, gs)| {
                        gs.iter()
                            .enumerate()
                            .filter(move |(_, &tg)| tg == g + 1)
                            .map(move |(j, _)| (s, j))
                    })
                    .filter_map(|(s, j)| piece_name(s, j))
                    .collect();
                serde_json::json!({ "tensors": mine, "hyperparameters": old["hyperparameters"].clone() })
            })
            .collect();
        let lens: Vec<Vec<usize>> = ctx
            .layout
            .pieces
            .iter()
            .map(|rs| rs[rank].iter().map(|p| p.len).collect())
            .collect();
        record.insert("tensor_lengths".into(), serde_json::json!(lens));
        record.insert("groups".into(), serde_json::Value::Array(groups));
        let sums: serde_json::Map<String, serde_json::Value> = tensors
            .iter()
            .map(|(n, _, d)| (n.clone(), serde_json::Value::String(checksum(d))))
            .collect();
        record.insert("checksums".into(), serde_json::Value::Object(sums));
        let sum = checksum(
            serde_json::Value::Object(record.clone())
                .to_string()
                .as_bytes(),
        );
        record.insert("record_checksum".into(), serde_json::Value::String(sum));
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, shape, d)| {
                TensorView::new(crate::checkpoint::dtype_of::<T>(), shape.clone(), d)
                    .map(|v| (n.clone(), v))
            })
            .collect::<Result<_, _>>()
            .map_err(|e| err(e.to_string()))?;
        let meta = std::collections::HashMap::from([(
            "optc".to_string(),
            serde_json::Value::Object(record).to_string(),
        )]);
        let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| err(e.to_string()))?;
        self.inner.load_checkpoint_bytes(&bytes)?;
        Arc::make_mut(self.inner.shard.as_mut().expect("shard")).groups = whole_groups;
        Ok(())
    }
}

/// A saved piece of a state buffer: its first element in the tensor and its bytes.
type SavedPiece = (usize, Vec<u8>);

/// A safetensors file with its metadata changed by `edit`.
fn rebuild(
    bytes: &[u8],
    edit: impl FnOnce(&mut std::collections::HashMap<String, String>),
) -> Result<Vec<u8>, Error> {
    use safetensors::tensor::SafeTensors;
    let bad = |e: &dyn std::fmt::Display| crate::checkpoint::err(e.to_string());
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| bad(&e))?;
    let mut meta = header.metadata().clone().unwrap_or_default();
    edit(&mut meta);
    let st = SafeTensors::deserialize(bytes).map_err(|e| bad(&e))?;
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = st.tensors();
    safetensors::serialize(views, Some(meta)).map_err(|e| bad(&e))
}

/// A [`Collective`] between threads of one process: its members,
/// one per rank ([`LocalGroup::members`]). A member that does not come within the timeout makes
/// the others fail.
#[derive(Debug)]
pub struct LocalGroup {
    size: usize,
    timeout: Duration,
    round: Mutex<Round>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct Round {
    slots: Vec<Option<Vec<f64>>>,
    filled: usize,
    result: Option<Arc<Vec<Vec<f64>>>>,
    taken: usize,
    broken: bool,
}

/// One rank of a [`LocalGroup`].
#[derive(Debug, Clone)]
pub struct LocalMember {
    group: Arc<LocalGroup>,
    rank: usize,
}

impl LocalGroup {
    /// The members of a group of `size` ranks; a gather waits at most `timeout` for the others.
    pub fn members(size: usize, timeout: Duration) -> Vec<Arc<LocalMember>> {
        let group = Arc::new(LocalGroup {
            size,
            timeout,
            round: Mutex::new(Round {
                slots: vec![None; size],
                ..Round::default()
            }),
            cv: Condvar::new(),
        });
        (0..size)
            .map(|rank| {
                Arc::new(LocalMember {
                    group: Arc::clone(&group),
                    rank,
                })
            })
            .collect()
    }
}

impl LocalGroup {
    /// Waits for a change of the round, at most the timeout.
    fn wait<'a>(
        &'a self,
        st: std::sync::MutexGuard<'a, Round>,
    ) -> Result<std::sync::MutexGuard<'a, Round>, Error> {
        let broken = || Error::Params("a rank of the group failed or timed out".into());
        let (st, t) = self
            .cv
            .wait_timeout(st, self.timeout)
            .map_err(|_| broken())?;
        if t.timed_out() {
            Err(broken())
        } else {
            Ok(st)
        }
    }
}

impl Collective for LocalMember {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.group.size
    }

    fn all_gather(&self, local: &[f64]) -> Result<Vec<Vec<f64>>, Error> {
        let g = &self.group;
        let broken = || Error::Params("a rank of the group failed or timed out".into());
        let lock_err = |_| broken();
        let mut st = g.round.lock().map_err(lock_err)?;
        // The previous round is still being read.
        while st.result.is_some() && !st.broken {
            st = g.wait(st)?;
        }
        if st.broken {
            return Err(broken());
        }
        st.slots[self.rank] = Some(local.to_vec());
        st.filled += 1;
        if st.filled == g.size {
            let all: Vec<Vec<f64>> = st
                .slots
                .iter_mut()
                .map(|s| s.take().unwrap_or_default())
                .collect();
            st.result = Some(Arc::new(all));
            st.filled = 0;
            g.cv.notify_all();
        }
        while st.result.is_none() && !st.broken {
            st = match g.wait(st) {
                Ok(st) => st,
                Err(e) => {
                    if let Ok(mut s) = g.round.lock() {
                        s.broken = true;
                    }
                    g.cv.notify_all();
                    return Err(e);
                }
            };
        }
        if st.broken {
            return Err(broken());
        }
        let out = st
            .result
            .as_ref()
            .map(|r| r.as_ref().clone())
            .unwrap_or_default();
        st.taken += 1;
        if st.taken == g.size {
            st.result = None;
            st.taken = 0;
            g.cv.notify_all();
        }
        Ok(out)
    }
}

/// A [`Collective`] over MPI (cargo feature `mpi`): the ranks of a communicator.
#[cfg(feature = "mpi")]
pub mod mpi_collective {
    #![allow(unsafe_code)] // Send and Sync for the communicator handle

    use super::Collective;
    use crate::Error;
    use mpi::datatype::PartitionMut;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;
    use mpi::Count;

    /// The ranks of an MPI communicator as a [`Collective`]. MPI must be initialized with at
    /// least `Threading::Serialized` (`mpi::initialize_with_threading`): the optimizer calls it
    /// from whichever thread steps it, one call at a time.
    pub struct MpiCollective {
        comm: SimpleCommunicator,
        rank: usize,
        size: usize,
    }

    impl std::fmt::Debug for MpiCollective {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(
                f,
                "MpiCollective {{ rank: {}, size: {} }}",
                self.rank, self.size
            )
        }
    }

    // SAFETY: the handle is only used through `&self` by `all_gather`, which a sharded
    // optimizer calls from the thread stepping it, never from two threads at once (the
    // optimizer is `&mut` while it steps); MPI initialized with `Threading::Serialized` or
    // higher allows calls from any thread as long as they do not overlap.
    unsafe impl Send for MpiCollective {}
    // SAFETY: as for `Send`.
    unsafe impl Sync for MpiCollective {}

    impl MpiCollective {
        /// The ranks of `comm` (typically `universe.world()`).
        pub fn new(comm: SimpleCommunicator) -> MpiCollective {
            let rank = comm.rank() as usize;
            let size = comm.size() as usize;
            MpiCollective { comm, rank, size }
        }
    }

    impl Collective for MpiCollective {
        fn rank(&self) -> usize {
            self.rank
        }

        fn size(&self) -> usize {
            self.size
        }

        fn all_gather(&self, local: &[f64]) -> Result<Vec<Vec<f64>>, Error> {
            let n = Count::try_from(local.len())
                .map_err(|_| Error::Params("too many partials for one MPI message".into()))?;
            let mut counts = vec![0 as Count; self.size];
            self.comm.all_gather_into(&n, &mut counts[..]);
            let displs: Vec<Count> = counts
                .iter()
                .scan(0 as Count, |acc, &c| {
                    let d = *acc;
                    *acc += c;
                    Some(d)
                })
                .collect();
            let total: usize = counts.iter().map(|&c| c as usize).sum();
            let mut buf = vec![0f64; total];
            {
                let mut part = PartitionMut::new(&mut buf[..], counts.clone(), &displs[..]);
                self.comm.all_gather_varcount_into(local, &mut part);
            }
            Ok(counts
                .iter()
                .zip(&displs)
                .map(|(&c, &d)| buf[d as usize..(d + c) as usize].to_vec())
                .collect())
        }
    }
}
