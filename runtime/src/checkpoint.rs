//! Checkpoints: an optimizer's state in a safetensors file.
//!
//! Tensors `state.<buffer>.<tensor name>` hold every per-element state buffer (flat, in the
//! buffer's dtype). The metadata holds the format version, the rule's name and a hash of its
//! compiled form (interface, declared ranges and kernels), the step counter, hyperparameter
//! values, scalar states, the tensor lengths of every param space, and a checksum of every
//! tensor's bytes, and `record_checksum`, the checksum of the record's text without it.
//! Files are written atomically (temporary file, fsync, rename, fsync of the folder); loading
//! validates everything before changing the optimizer. Version 1 files (`state.<buffer>.<tensor
//! index>`, no checksums) are still read.
//!
//! [`write_files_atomic`] writes several files as one transaction (a commit journal, see there);
//! [`recover`] completes one a crash interrupted and removes temporary files no live writer holds.

use crate::{Error, Optimizer};
use optc_compiler::ir::{BufRole, Program};
use optc_compiler::ops::Float;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The format written in the metadata.
pub const FORMAT: &str = "optc-checkpoint-2";

/// The previous format (tensors named by index, no checksums), still read.
const FORMAT_1: &str = "optc-checkpoint-1";

/// A stable 64-bit FNV-1a hash of a compiled rule's interface, declared hyperparameter ranges and
/// kernels.
pub fn program_hash(p: &Program) -> String {
    let ranges: String = p
        .info
        .hypers
        .iter()
        .map(|h| format!("range {} {:?}\n", h.name, h.range))
        .collect();
    fnv_text(&format!(
        "{}{ranges}{}",
        optc_compiler::print::interface(p),
        optc_compiler::print::kernels(p)
    ))
}

/// The hash format 1 checkpoints hold (no ranges).
fn program_hash_1(p: &Program) -> String {
    fnv_text(&format!(
        "{}{}",
        optc_compiler::print::interface(p),
        optc_compiler::print::kernels(p)
    ))
}

fn fnv_text(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The checksum of a checkpoint's tensor data (and of its record): 64 bits, over 8-byte words
/// (each step `h = rotl((h ^ word) * K, 31)` is a bijection in `h` and in the word, so any change
/// of one word changes the result), then the tail bytes, then murmur3's finalizer. As text, 16 hex
/// digits.
pub fn checksum(bytes: &[u8]) -> String {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ (bytes.len() as u64);
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        h = (h ^ w).wrapping_mul(K).rotate_left(31);
    }
    for &b in words.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(K).rotate_left(31);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
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
    /// After writing and syncing, before the rename (of a transaction: before its journal's).
    Rename,
    /// In a transaction of several files, after its commit and the first rename.
    Commit,
}

pub(crate) fn err(msg: impl Into<String>) -> Error {
    Error::Checkpoint(msg.into())
}

pub(crate) fn dtype_of<T: Float>() -> Dtype {
    if T::BYTES == 4 {
        Dtype::F32
    } else {
        Dtype::F64
    }
}

/// Writes `bytes` to `path` atomically: a temporary file with a unique name beside it (held
/// locked while it exists), fsync, rename, fsync of the folder. On any error the temporary file is
/// removed and `path` is as it was; a crash at any point leaves `path` either as it was or fully
/// written (and at most a temporary file that [`recover`] removes). Every file optc writes
/// (checkpoints, `optc run --out`) goes through this function or [`write_files_atomic`].
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_files_failing(&[(path, bytes)], None)
}

/// [`write_file_atomic`] for checkpoints, with their error; `fail` simulates a crash at one point
/// (tests).
pub(crate) fn write_atomic(
    path: &Path,
    bytes: &[u8],
    fail: Option<FailPoint>,
) -> Result<(), Error> {
    write_files_failing(&[(path, bytes)], fail)
        .map_err(|e| err(format!("cannot write `{}`: {e}", path.display())))
}

/// The marker in the name of every temporary file optc writes: `.<target name>.optc-tmp-<16 hex
/// digits>`, beside the target.
const TMP_MARK: &str = ".optc-tmp-";
/// The suffix of a commit journal: `.<first target name>.optc-commit`, beside the first target.
const JOURNAL_MARK: &str = ".optc-commit";
/// The first line of a journal.
const JOURNAL_FORMAT: &str = "optc-commit-1";

/// A fresh temporary file beside `path`, created (never an existing file) and locked: the lock,
/// held until the file is closed, tells [`recover`] that a live writer owns it.
fn create_temp(path: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    use std::hash::{BuildHasher, Hasher};
    use std::io::{Error as IoError, ErrorKind};
    let name = path
        .file_name()
        .ok_or_else(|| IoError::new(ErrorKind::InvalidInput, "not a file path"))?;
    loop {
        // A random name (std's per-process random hash keys, the time, a counter).
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        let tmp = path.with_file_name(format!(
            ".{}{TMP_MARK}{:016x}",
            name.to_string_lossy(),
            h.finish()
        ));
        match std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)
        {
            Ok(f) => {
                if let Err(e) = f.lock() {
                    drop(f);
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
                // A `recover` may have taken the file for stale between its creation and the
                // lock: then the name no longer leads to it, and another name is tried.
                if same_file(&f, &tmp) {
                    return Ok((tmp, f));
                }
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Whether `path` leads to the open file `f`.
fn same_file(f: &std::fs::File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (f.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = f;
        path.exists()
    }
}

fn sync_dir(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The folder of `path`, absolute, joined with its file name.
fn absolute(path: &Path) -> std::io::Result<PathBuf> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"))?;
    Ok(std::fs::canonicalize(dir)?.join(name))
}

/// The journal of a transaction whose first file is `path`.
fn journal_of(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{}{JOURNAL_MARK}", name.unwrap_or_default()))
}

/// Writes several files as one transaction: after a crash at any point, either every file is as
/// it was or the transaction is committed and [`recover`] (which `optc run` calls on its files
/// first) completes it; an error leaves every file as it was. With one file this is
/// [`write_file_atomic`].
///
/// The protocol: stale temporary files of the targets are removed and interrupted transactions
/// completed ([`recover`]); every file is written to a locked temporary file beside its target
/// and synced; the commit point is the atomic creation (temporary file, sync, rename) of the
/// journal `.<first name>.optc-commit` beside the first target, which lists every (temporary,
/// target) pair; then each temporary file is renamed onto its target, the folders synced, and the
/// journal removed. A crash before the journal exists leaves only temporary files (removed by the
/// next [`recover`]); a crash after it leaves a journal that [`recover`] rolls forward.
pub fn write_files_atomic(files: &[(&Path, &[u8])]) -> std::io::Result<()> {
    write_files_failing(files, None)
}

/// [`write_files_atomic`]; `fail` simulates a crash (an error, with the cleanup an error does) at
/// one point (tests).
#[doc(hidden)]
pub fn write_files_failing(
    files: &[(&Path, &[u8])],
    fail: Option<FailPoint>,
) -> std::io::Result<()> {
    use std::io::{Error as IoError, ErrorKind};
    let simulated = |at: FailPoint| {
        if fail == Some(at) {
            Err(IoError::other(format!("simulated failure at {at:?}")))
        } else {
            Ok(())
        }
    };
    let mut targets = Vec::new();
    for (path, _) in files {
        if path.is_dir() {
            return Err(IoError::new(
                ErrorKind::InvalidInput,
                format!("`{}` is a directory", path.display()),
            ));
        }
        let abs = absolute(path)?;
        if targets.contains(&abs) {
            return Err(IoError::new(
                ErrorKind::InvalidInput,
                format!("`{}` is written twice", path.display()),
            ));
        }
        targets.push(abs);
    }
    let paths: Vec<&Path> = targets.iter().map(PathBuf::as_path).collect();
    recover(&paths)?;
    // Every file to a temporary file; on an error, every temporary file removed.
    let mut temps: Vec<(PathBuf, std::fs::File)> = Vec::new();
    let cleanup = |temps: &mut Vec<(PathBuf, std::fs::File)>| {
        for (t, f) in temps.drain(..) {
            drop(f);
            let _ = std::fs::remove_file(&t);
        }
    };
    let written = (|| {
        for ((_, bytes), target) in files.iter().zip(&targets) {
            let (tmp, mut f) = create_temp(target)?;
            temps.push((tmp, f.try_clone()?));
            simulated(FailPoint::Create)?;
            let half = bytes.len() / 2;
            f.write_all(&bytes[..half])?;
            simulated(FailPoint::Write)?;
            f.write_all(&bytes[half..])?;
            f.sync_all()?;
        }
        Ok::<(), IoError>(())
    })();
    if let Err(e) = written {
        cleanup(&mut temps);
        return Err(e);
    }
    if let [(tmp, _)] = &temps[..] {
        // One file: the rename is the commit.
        let renamed = simulated(FailPoint::Rename).and_then(|()| std::fs::rename(tmp, &targets[0]));
        if let Err(e) = renamed {
            cleanup(&mut temps);
            return Err(e);
        }
        sync_dir(&targets[0]);
        return Ok(());
    }
    // The journal, written atomically and kept locked until the transaction is done.
    let journal = journal_of(&targets[0]);
    let record = serde_json::json!({
        "format": JOURNAL_FORMAT,
        "renames": temps.iter().zip(&targets).map(|((t, _), target)| {
            serde_json::json!([t.to_string_lossy(), target.to_string_lossy()])
        }).collect::<Vec<_>>(),
    });
    let committed = (|| {
        if temps.iter().chain([]).any(|(t, _)| t.to_str().is_none())
            || targets.iter().any(|t| t.to_str().is_none())
        {
            return Err(IoError::new(
                ErrorKind::InvalidInput,
                "a path of a transaction is not UTF-8",
            ));
        }
        let (jtmp, mut jf) = create_temp(&journal)?;
        let r = (|| {
            jf.write_all(record.to_string().as_bytes())?;
            jf.sync_all()?;
            simulated(FailPoint::Rename)?;
            std::fs::rename(&jtmp, &journal)
        })();
        if let Err(e) = r {
            drop(jf);
            let _ = std::fs::remove_file(&jtmp);
            return Err(e);
        }
        sync_dir(&journal);
        Ok(jf)
    })();
    let jf = match committed {
        Ok(jf) => jf,
        Err(e) => {
            cleanup(&mut temps);
            return Err(e);
        }
    };
    // Committed: roll forward.
    for (i, ((tmp, _), target)) in temps.iter().zip(&targets).enumerate() {
        let r = if i == 1 {
            simulated(FailPoint::Commit)
        } else {
            Ok(())
        }
        .and_then(|()| std::fs::rename(tmp, target));
        if let Err(e) = r {
            if i == 0 {
                // Nothing replaced yet: roll back.
                let _ = std::fs::remove_file(&journal);
                drop(jf);
                cleanup(&mut temps);
                return Err(e);
            }
            // Some targets replaced: the journal stays for `recover` to complete.
            return Err(IoError::other(format!(
                "{e}; the write is committed and will be completed by the next run (journal `{}`)",
                journal.display()
            )));
        }
    }
    for target in &targets {
        sync_dir(target);
    }
    std::fs::remove_file(&journal)?;
    sync_dir(&journal);
    drop(jf);
    Ok(())
}

/// Completes interrupted transactions and removes stale temporary files, for the files at
/// `paths` (files optc is about to read or write): every journal (`.*.optc-commit`) in their
/// folders that no live writer holds locked is rolled forward (each listed temporary file that
/// still exists is renamed onto its target) and removed; then every temporary file of those
/// files (`.<name>.optc-tmp-*`, and those of their journals) that no live writer holds locked is
/// removed. Files that are not optc's are never touched.
pub fn recover(paths: &[&Path]) -> std::io::Result<()> {
    use std::collections::BTreeSet;
    let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
    let mut prefixes: BTreeSet<(PathBuf, String)> = BTreeSet::new();
    for p in paths {
        let Ok(abs) = absolute(p) else { continue };
        let (Some(dir), Some(name)) = (abs.parent(), abs.file_name()) else {
            continue;
        };
        let name = name.to_string_lossy();
        dirs.insert(dir.to_path_buf());
        prefixes.insert((dir.to_path_buf(), format!(".{name}{TMP_MARK}")));
        prefixes.insert((
            dir.to_path_buf(),
            format!(".{}{TMP_MARK}", format_args!(".{name}{JOURNAL_MARK}")),
        ));
    }
    // A file no live writer holds: opened and locked here (None when a writer holds it).
    let unheld = |p: &Path| -> Option<std::fs::File> {
        let f = std::fs::File::open(p).ok()?;
        f.try_lock().ok()?;
        Some(f)
    };
    for dir in &dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !(name.starts_with('.') && name.ends_with(JOURNAL_MARK)) {
                continue;
            }
            let journal = dir.join(&name);
            let Some(lock) = unheld(&journal) else {
                continue;
            };
            let text = std::fs::read_to_string(&journal)?;
            let bad = || {
                std::io::Error::other(format!(
                    "`{}` is not an optc commit journal; remove it",
                    journal.display()
                ))
            };
            let record: serde_json::Value = serde_json::from_str(&text).map_err(|_| bad())?;
            if record["format"] != JOURNAL_FORMAT {
                return Err(bad());
            }
            let renames = record["renames"].as_array().ok_or_else(bad)?;
            for pair in renames {
                let (Some(tmp), Some(target)) = (pair[0].as_str(), pair[1].as_str()) else {
                    return Err(bad());
                };
                let (tmp, target) = (Path::new(tmp), Path::new(target));
                // Only optc's own temporary files, beside their targets.
                let ours = tmp.parent() == target.parent()
                    && tmp.file_name().is_some_and(|n| {
                        n.to_string_lossy().starts_with(&format!(
                            ".{}{TMP_MARK}",
                            target.file_name().unwrap_or_default().to_string_lossy()
                        ))
                    });
                if !ours {
                    return Err(bad());
                }
                if tmp.exists() {
                    std::fs::rename(tmp, target)?;
                    sync_dir(target);
                }
            }
            std::fs::remove_file(&journal)?;
            sync_dir(&journal);
            drop(lock);
        }
    }
    for (dir, prefix) in &prefixes {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let stale = name.strip_prefix(prefix.as_str()).is_some_and(|rest| {
                rest.len() == 16 && rest.bytes().all(|b| b.is_ascii_hexdigit())
            });
            if !stale {
                continue;
            }
            let p = dir.join(&name);
            if let Some(lock) = unheld(&p) {
                let _ = std::fs::remove_file(&p);
                drop(lock);
            }
        }
    }
    Ok(())
}

/// A parameter group read from a checkpoint: its overrides and its tensors' places.
type GroupRecord = (Vec<Option<f64>>, Vec<(usize, usize)>);

impl<T: Float + Default> Optimizer<T> {
    /// Parameter groups 1, 2, ...: their tensors by name and their own hyperparameter values.
    fn groups_record(&self) -> serde_json::Value {
        let info = &self.base.info;
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
                if crate::optimizer::scalar_state_hypers(&self.base).contains(&(h as u16)) {
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
        let info = &self.base.info;
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
                let tensor = &self.tensors[bi.space as usize][j].name;
                owned.push((
                    format!("state.{}.{tensor}", bi.name),
                    vec![data.len()],
                    bytes,
                ));
            }
        }
        let checksums: serde_json::Map<String, serde_json::Value> = owned
            .iter()
            .map(|(n, _, bytes)| (n.clone(), serde_json::Value::String(checksum(bytes))))
            .collect();
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
            "program_hash": program_hash(&self.base),
            "steps": self.st.steps,
            "seed": self.seed.to_string(),
            "hyperparameters": hypers,
            "scalar_states": scalars,
            "schedules": self.schedules().into_iter().map(|(n, s)| (n, serde_json::Value::String(s.to_string()))).collect::<serde_json::Map<_, _>>(),
            "tensor_lengths": self.lens,
            "groups": self.groups_record(),
            "dtype": format!("{:?}", dtype_of::<T>()),
            "checksums": checksums,
        });
        // The record's checksum, of its text without the checksum itself (one metadata entry, so
        // the header's bytes do not depend on a map's order).
        let mut record = record;
        let sum = checksum(record.to_string().as_bytes());
        record["record_checksum"] = serde_json::Value::String(sum);
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
        let version_1 = match text("format")?.as_str() {
            FORMAT => false,
            FORMAT_1 => true,
            other => {
                return Err(err(format!(
                    "unknown checkpoint format `{other}` (expected `{FORMAT}` or `{FORMAT_1}`)"
                )))
            }
        };
        let info = &self.base.info;
        if text("rule")? != info.name {
            return Err(err(format!(
                "the checkpoint is for rule `{}`, this optimizer runs `{}`",
                text("rule")?,
                info.name
            )));
        }
        let hash = if version_1 {
            program_hash_1(&self.base)
        } else {
            program_hash(&self.base)
        };
        if text("program_hash")? != hash {
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
        // The seed of random draws and stochastic rounding (absent from older checkpoints,
        // which keep the optimizer's).
        let new_seed = match meta.get("seed") {
            None => self.seed,
            Some(v) => v
                .as_str()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| err("`seed` is not a decimal 64-bit unsigned integer"))?,
        };
        let st = SafeTensors::deserialize(bytes).map_err(|e| corrupt(&e))?;
        // Format 2: the record's own checksum, and one checksum per tensor.
        let checksums = if version_1 {
            None
        } else {
            let stored = text("record_checksum")?;
            let mut rest = meta.clone();
            rest.remove("record_checksum");
            if stored != checksum(serde_json::Value::Object(rest).to_string().as_bytes()) {
                return Err(err(
                    "the checkpoint's record does not match its checksum (the file is damaged or was edited)",
                ));
            }
            Some(object("checksums")?)
        };
        let mut expected = 0;
        let mut new_bufs: Vec<(usize, Vec<Vec<T>>)> = Vec::new();
        for (b, bi) in info.buffers.iter().enumerate() {
            if bi.role != BufRole::State {
                continue;
            }
            let mut tensors = Vec::new();
            for (j, &n) in self.lens[bi.space as usize].iter().enumerate() {
                let name = if version_1 {
                    format!("state.{}.{j}", bi.name)
                } else {
                    format!(
                        "state.{}.{}",
                        bi.name, self.tensors[bi.space as usize][j].name
                    )
                };
                expected += 1;
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
                if let Some(sums) = &checksums {
                    if sums.get(&name).and_then(|c| c.as_str()) != Some(&checksum(v.data())) {
                        return Err(err(format!(
                            "tensor `{name}` does not match its checksum (the file is damaged or was edited)"
                        )));
                    }
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
        if st.len() != expected || checksums.as_ref().is_some_and(|c| c.len() != expected) {
            return Err(err(format!(
                "the checkpoint holds {} tensor(s), this optimizer's state {expected}",
                st.len()
            )));
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
        self.seed = new_seed;
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
