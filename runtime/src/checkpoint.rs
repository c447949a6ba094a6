//! Checkpoints: an optimizer's state in a safetensors file.
//!
//! Tensors `state.<buffer>.<tensor index>` hold every per-element state buffer (flat, in the
//! buffer's dtype). The metadata holds the format version, the rule's name and a hash of its
//! compiled form, the step counter, hyperparameter values, scalar states and the tensor lengths of
//! every param space. Files are written atomically (temporary file, fsync, rename, fsync of the
//! folder); loading validates everything before changing the optimizer.

use crate::{Error, Optimizer};
use optc_compiler::ir::{BufRole, Program};
use optc_compiler::ops::Float;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// The format written in the metadata.
pub const FORMAT: &str = "optc-checkpoint-1";

/// A stable 64-bit FNV-1a hash of a compiled rule's interface and kernels.
pub fn program_hash(p: &Program) -> String {
    let text = format!(
        "{}{}",
        optc_compiler::print::interface(p),
        optc_compiler::print::kernels(p)
    );
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Where a simulated failure interrupts a save (for tests of atomicity).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailPoint {
    /// After creating the temporary file, before writing.
    Create,
    /// Halfway through writing the temporary file.
    Write,
    /// After writing and syncing, before the rename.
    Rename,
}

fn err(msg: impl Into<String>) -> Error {
    Error::Checkpoint(msg.into())
}

fn dtype_of<T: Float>() -> Dtype {
    if T::BYTES == 4 {
        Dtype::F32
    } else {
        Dtype::F64
    }
}

/// Writes `bytes` to `path` atomically: a temporary file with a unique name beside it, fsync,
/// rename, fsync of the folder. On any error the temporary file is removed and `path` is as it
/// was; a crash at any point leaves `path` either as it was or fully written. Every file optc
/// writes (checkpoints, `optc run --out`) goes through this function.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_file_failing(path, bytes, None)
}

/// [`write_file_atomic`] for checkpoints, with their error; `fail` simulates a crash at one point
/// (tests).
pub(crate) fn write_atomic(
    path: &Path,
    bytes: &[u8],
    fail: Option<FailPoint>,
) -> Result<(), Error> {
    write_file_failing(path, bytes, fail)
        .map_err(|e| err(format!("cannot write `{}`: {e}", path.display())))
}

/// [`write_file_atomic`]; `fail` simulates a crash at one point.
fn write_file_failing(path: &Path, bytes: &[u8], fail: Option<FailPoint>) -> std::io::Result<()> {
    use std::io::{Error as IoError, ErrorKind};
    use std::sync::atomic::{AtomicU64, Ordering};
    /// Writes started by this process, so concurrent writes get different temporary files.
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| IoError::new(ErrorKind::InvalidInput, "not a file path"))?;
    let simulated = |at: FailPoint| {
        if fail == Some(at) {
            Err(IoError::other(format!("simulated failure at {at:?}")))
        } else {
            Ok(())
        }
    };
    // A fresh name: this process's id and write count; a file left by an earlier process that
    // had the same id is never opened.
    let (tmp, mut f) = loop {
        let tmp = path.with_file_name(format!(
            ".{}.tmp-{}-{}",
            name.to_string_lossy(),
            std::process::id(),
            WRITES.fetch_add(1, Ordering::Relaxed)
        ));
        match std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)
        {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    };
    let result = (|| {
        simulated(FailPoint::Create)?;
        let half = bytes.len() / 2;
        f.write_all(&bytes[..half])?;
        simulated(FailPoint::Write)?;
        f.write_all(&bytes[half..])?;
        f.sync_all()?;
        simulated(FailPoint::Rename)?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    })();
    drop(f);
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A parameter group read from a checkpoint: its overrides and its tensors' places.
type GroupRecord = (Vec<Option<f64>>, Vec<(usize, usize)>);

impl<T: Float + Default> Optimizer<T> {
    /// Parameter groups 1, 2, ...: their tensors by name and their own hyperparameter values.
    fn groups_record(&self) -> serde_json::Value {
        let info = &self.program.info;
        let groups: Vec<serde_json::Value> = self
            .hp
            .groups
            .iter()
            .enumerate()
            .map(|(g, overrides)| {
                let tensors: Vec<&str> = self
                    .tensors
                    .iter()
                    .zip(&self.hp.tensor_groups)
                    .flat_map(|(ts, gs)| ts.iter().zip(gs))
                    .filter(|(_, &tg)| tg == g + 1)
                    .map(|(t, _)| t.name.as_str())
                    .collect();
                let values: serde_json::Map<String, serde_json::Value> = info
                    .hypers
                    .iter()
                    .zip(overrides)
                    .filter_map(|(h, o)| o.map(|v| (h.name.clone(), number_json(v))))
                    .collect();
                serde_json::json!({ "tensors": tensors, "hyperparameters": values })
            })
            .collect();
        serde_json::Value::Array(groups)
    }

    /// Reads and checks the `groups` record of a checkpoint.
    fn parse_groups(&self, value: &serde_json::Value) -> Result<Vec<GroupRecord>, Error> {
        let bad = || err("`groups` is not a list of parameter groups");
        let mut out = Vec::new();
        for g in value.as_array().ok_or_else(bad)? {
            let tensors = g
                .get("tensors")
                .and_then(|t| t.as_array())
                .ok_or_else(bad)?;
            let values = g
                .get("hyperparameters")
                .and_then(|t| t.as_object())
                .ok_or_else(bad)?;
            let mut overrides = vec![None; self.hp.values.len()];
            for (name, v) in values {
                let v = json_number(v).ok_or_else(bad)?;
                let h = self.check_value(name, v)?;
                if crate::optimizer::scalar_state_hypers(&self.program).contains(&(h as u16)) {
                    return Err(err(format!(
                        "a parameter group of the checkpoint overrides `{name}`, which the rule's scalar state reads"
                    )));
                }
                overrides[h] = Some(v);
            }
            let mut places = Vec::new();
            for t in tensors {
                let name = t.as_str().ok_or_else(bad)?;
                let place = self.tensor_index(name).ok_or_else(|| {
                    err(format!(
                        "a parameter group of the checkpoint holds tensor `{name}`, which this optimizer does not have"
                    ))
                })?;
                if places.contains(&place)
                    || out.iter().any(|(_, ps): &GroupRecord| ps.contains(&place))
                {
                    return Err(err(format!(
                        "the checkpoint puts tensor `{name}` in a parameter group twice"
                    )));
                }
                places.push(place);
            }
            out.push((overrides, places));
        }
        Ok(out)
    }

    /// The checkpoint as bytes (safetensors).
    pub fn checkpoint_bytes(&self) -> Result<Vec<u8>, Error> {
        if self.st.next_stage != 0 {
            return Err(err(
                "cannot checkpoint in the middle of a step (between stages)",
            ));
        }
        let info = &self.program.info;
        let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (b, bi) in info.buffers.iter().enumerate() {
            if bi.role != BufRole::State {
                continue;
            }
            let host = self
                .engine
                .host(&self.bufs, b)
                .map_err(|e| err(e.to_string()))?;
            for (j, data) in host.iter().enumerate() {
                let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes_vec()).collect();
                owned.push((format!("state.{}.{j}", bi.name), vec![data.len()], bytes));
            }
        }
        let views: Vec<(String, TensorView<'_>)> = owned
            .iter()
            .map(|(n, shape, bytes)| {
                TensorView::new(dtype_of::<T>(), shape.clone(), bytes).map(|v| (n.clone(), v))
            })
            .collect::<Result<_, _>>()
            .map_err(|e| err(e.to_string()))?;
        let hypers: serde_json::Map<String, serde_json::Value> = info
            .hypers
            .iter()
            .zip(&self.hp.values)
            .map(|(h, &v)| (h.name.clone(), number_json(v)))
            .collect();
        let scalars: serde_json::Map<String, serde_json::Value> = info
            .scalar_states
            .iter()
            .zip(&self.st.scalar_states)
            .map(|(n, &v)| (n.clone(), number_json(v)))
            .collect();
        // One metadata entry holding a JSON object with sorted keys, so equal states give equal bytes.
        let record = serde_json::json!({
            "format": FORMAT,
            "rule": info.name,
            "program_hash": program_hash(&self.program),
            "steps": self.st.steps,
            "hyperparameters": hypers,
            "scalar_states": scalars,
            "schedules": self.schedules().into_iter().map(|(n, s)| (n, serde_json::Value::String(s.to_string()))).collect::<serde_json::Map<_, _>>(),
            "tensor_lengths": self.lens,
            "groups": self.groups_record(),
            "dtype": format!("{:?}", dtype_of::<T>()),
        });
        let meta = HashMap::from([("optc".to_string(), record.to_string())]);
        safetensors::serialize(views, Some(meta)).map_err(|e| err(e.to_string()))
    }

    /// Writes a checkpoint atomically: a crash at any point leaves the previous file intact.
    pub fn save_checkpoint(&self, path: &Path) -> Result<(), Error> {
        self.save_checkpoint_failing(path, None)
    }

    #[doc(hidden)]
    pub fn save_checkpoint_failing(
        &self,
        path: &Path,
        fail: Option<FailPoint>,
    ) -> Result<(), Error> {
        write_atomic(path, &self.checkpoint_bytes()?, fail)
    }

    /// Loads a checkpoint written by [`Optimizer::save_checkpoint`] for the same rule and tensors.
    /// Everything is validated first; on any error the optimizer is unchanged.
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<(), Error> {
        let bytes = std::fs::read(path)
            .map_err(|e| err(format!("cannot read `{}`: {e}", path.display())))?;
        self.load_checkpoint_bytes(&bytes)
    }

    /// Loads a checkpoint from bytes (see [`Optimizer::load_checkpoint`]).
    pub fn load_checkpoint_bytes(&mut self, bytes: &[u8]) -> Result<(), Error> {
        if self.st.next_stage != 0 {
            return Err(err(
                "cannot load a checkpoint in the middle of a step (between stages)",
            ));
        }
        let corrupt = |e: &dyn std::fmt::Display| err(format!("not a valid checkpoint: {e}"));
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| corrupt(&e))?;
        let record = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("optc"))
            .ok_or_else(|| err("not an optc checkpoint: no `optc` record in the metadata"))?;
        let meta: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(record).map_err(|e| corrupt(&e))?;
        let get = |k: &str| {
            meta.get(k)
                .ok_or_else(|| err(format!("not an optc checkpoint: no `{k}` in its record")))
        };
        let text = |k: &str| {
            get(k).and_then(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| err(format!("`{k}` is not a string")))
            })
        };
        if text("format")? != FORMAT {
            return Err(err(format!(
                "unknown checkpoint format `{}` (expected `{FORMAT}`)",
                text("format")?
            )));
        }
        let info = &self.program.info;
        if text("rule")? != info.name {
            return Err(err(format!(
                "the checkpoint is for rule `{}`, this optimizer runs `{}`",
                text("rule")?,
                info.name
            )));
        }
        if text("program_hash")? != program_hash(&self.program) {
            return Err(err(format!("the checkpoint was written by a different version of rule `{}` (its compiled form differs)", info.name)));
        }
        let dtype = format!("{:?}", dtype_of::<T>());
        if text("dtype")? != dtype {
            return Err(err(format!(
                "the checkpoint holds {} state, this optimizer {dtype}",
                text("dtype")?
            )));
        }
        let lens: Vec<Vec<usize>> =
            serde_json::from_value(get("tensor_lengths")?.clone()).map_err(|e| corrupt(&e))?;
        if lens != self.lens {
            return Err(err(format!(
                "the checkpoint is for tensors of lengths {lens:?}, this optimizer has {:?}",
                self.lens
            )));
        }
        let steps: u64 = get("steps")?
            .as_u64()
            .filter(|&n| n < MAX_STEPS)
            .ok_or_else(|| err("`steps` is not a step count below 2^53"))?;
        let object = |k: &str| {
            get(k).and_then(|v| {
                v.as_object()
                    .cloned()
                    .ok_or_else(|| err(format!("`{k}` is not an object")))
            })
        };
        let hypers = object("hyperparameters")?;
        let scalars = object("scalar_states")?;
        let number = |m: &serde_json::Map<String, serde_json::Value>, k: &str| {
            m.get(k)
                .and_then(json_number)
                .ok_or_else(|| err(format!("the checkpoint lacks `{k}`")))
        };
        let new_hypers: Vec<f64> = info
            .hypers
            .iter()
            .map(|h| {
                let v = number(&hypers, &h.name)?;
                // Everything `set_hyper` refuses, a checkpoint cannot bring in either.
                self.check_value(&h.name, v)?;
                Ok(v)
            })
            .collect::<Result<_, Error>>()?;
        let new_scalars: Vec<f64> = info
            .scalar_states
            .iter()
            .map(|n| number(&scalars, n))
            .collect::<Result<_, _>>()?;
        let mut new_schedules = vec![None; info.hypers.len()];
        for (name, text) in object("schedules")? {
            let h = info.hyper(&name).ok_or_else(|| {
                err(format!(
                    "the checkpoint schedules unknown hyperparameter `{name}`"
                ))
            })?;
            let text = text
                .as_str()
                .ok_or_else(|| err(format!("the schedule of `{name}` is not text")))?;
            if info.hypers[h].ty == optc_compiler::ir::Ty::Bool {
                return Err(err(format!(
                    "the checkpoint schedules boolean hyperparameter `{name}`"
                )));
            }
            new_schedules[h] = Some(crate::Schedule::parse(text).map_err(|e| err(e.to_string()))?);
        }
        let new_groups = match meta.get("groups") {
            None => Vec::new(),
            Some(g) => self.parse_groups(g)?,
        };
        let st = SafeTensors::deserialize(bytes).map_err(|e| corrupt(&e))?;
        let mut new_bufs: Vec<(usize, Vec<Vec<T>>)> = Vec::new();
        for (b, bi) in info.buffers.iter().enumerate() {
            if bi.role != BufRole::State {
                continue;
            }
            let mut tensors = Vec::new();
            for (j, &n) in self.lens[bi.space as usize].iter().enumerate() {
                let name = format!("state.{}.{j}", bi.name);
                let v = st
                    .tensor(&name)
                    .map_err(|_| err(format!("the checkpoint lacks tensor `{name}`")))?;
                if v.dtype() != dtype_of::<T>() || v.shape() != [n] {
                    return Err(err(format!(
                        "tensor `{name}` is {:?} {:?}, expected {dtype} [{n}]",
                        v.dtype(),
                        v.shape()
                    )));
                }
                tensors.push(
                    v.data()
                        .chunks_exact(T::BYTES)
                        .map(T::from_le_bytes_slice)
                        .collect(),
                );
            }
            new_bufs.push((b, tensors));
        }
        // Everything checked: apply.
        for (b, t) in new_bufs {
            self.bufs[b] = t;
            self.engine.forget(b);
        }
        self.hp.values = new_hypers;
        self.hp.groups.clear();
        for row in &mut self.hp.tensor_groups {
            row.iter_mut().for_each(|g| *g = 0);
        }
        for (overrides, places) in new_groups {
            self.hp.groups.push(overrides);
            for (space, j) in places {
                self.hp.tensor_groups[space][j] = self.hp.groups.len();
            }
        }
        self.hp.schedules = new_schedules;
        self.st.scalar_states = new_scalars;
        self.st.steps = steps;
        self.st.pending.clear();
        self.st.pending_scalars.clear();
        self.activate()?;
        Ok(())
    }
}

/// Step counts a checkpoint may hold: `t` stays exact as an f64 (2^53).
const MAX_STEPS: u64 = 1 << 53;

/// A number for the metadata record: finite values as JSON numbers (written in the shortest
/// form that reads back to the same bits), infinities and NaN as the strings `inf`, `-inf`, `NaN`.
fn number_json(v: f64) -> serde_json::Value {
    if v.is_finite() {
        serde_json::json!(v)
    } else if v.is_nan() {
        serde_json::Value::String("NaN".into())
    } else if v > 0.0 {
        serde_json::Value::String("inf".into())
    } else {
        serde_json::Value::String("-inf".into())
    }
}

/// A number of the metadata record, as [`number_json`] writes it.
fn json_number(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::String(s) => match s.as_str() {
            "NaN" => Some(f64::NAN),
            "inf" => Some(f64::INFINITY),
            "-inf" => Some(f64::NEG_INFINITY),
            _ => None,
        },
        v => v.as_f64(),
    }
}
