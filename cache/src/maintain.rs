//! Keeping the store healthy and moving entries around: verify, gc, materialize, bundles.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::error::{CacheError, Result, io_err};
use crate::key::CacheKey;
use crate::store::{Entry, Manifest, Store, hash_file, walk_files, write_atomic};

/// A problem `verify` found in one entry.
#[derive(Clone, Debug, Serialize)]
pub struct Corruption {
    pub key: String,
    pub path: String,
    pub problem: String,
}

/// What gc did or would do.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    pub removed: Vec<(CacheKey, String, u64)>,
    pub kept: usize,
    pub freed_bytes: u64,
    pub remaining_bytes: u64,
}

impl Store {
    /// Re-hashes every file of every entry. Returns the entries that do not match their manifest.
    pub fn verify(&self, progress: &mut dyn FnMut(&Entry)) -> Result<Vec<Corruption>> {
        let mut problems = Vec::new();
        let dir = self.root().join("entries");
        for item in fs::read_dir(&dir).map_err(|e| io_err(&dir, "list the entries", e))? {
            let Ok(item) = item else { continue };
            let name = item.file_name().to_string_lossy().to_string();
            let Ok(key) = name.parse::<CacheKey>() else {
                continue;
            };
            let entry = match self.get(&key) {
                Ok(Some(e)) => e,
                Ok(None) => {
                    problems.push(Corruption {
                        key: name,
                        path: String::new(),
                        problem: "no manifest".into(),
                    });
                    continue;
                }
                Err(e) => {
                    problems.push(Corruption {
                        key: name,
                        path: "manifest.json".into(),
                        problem: e.to_string(),
                    });
                    continue;
                }
            };
            progress(&entry);
            problems.extend(check_entry(&entry)?);
        }
        Ok(problems)
    }

    /// Removes entries no pin reaches beyond `keep`; with `max_size`, removes only the least
    /// recently finished unreached entries until the store fits.
    pub fn gc(
        &self,
        keep: &BTreeSet<CacheKey>,
        max_size: Option<u64>,
        dry_run: bool,
    ) -> Result<GcReport> {
        let mut keep = keep.clone();
        keep.extend(self.pinned()?);
        let mut entries = self.entries()?;
        let total: u64 = entries.iter().map(|e| e.manifest.total_size()).sum();
        // Oldest first, so a size budget removes the least recent work.
        entries.sort_by_key(|e| e.manifest.finished.unwrap_or(SystemTime::UNIX_EPOCH));
        let mut report = GcReport {
            remaining_bytes: total,
            ..Default::default()
        };
        for entry in entries {
            let key = entry.manifest.key;
            if keep.contains(&key) {
                report.kept += 1;
                continue;
            }
            if let Some(max) = max_size
                && report.remaining_bytes <= max
            {
                report.kept += 1;
                continue;
            }
            let size = entry.manifest.total_size();
            if !dry_run {
                self.remove(&key)?;
            }
            report.freed_bytes += size;
            report.remaining_bytes -= size;
            report
                .removed
                .push((key, entry.manifest.step.clone(), size));
        }
        Ok(report)
    }

    /// Writes a bundle of `keys` into `dir` (created): their entries, hard-linked where possible,
    /// and `bundle.json` with `extra` (the recipe and lock, say) for the importer.
    pub fn export_bundle(
        &self,
        keys: &[CacheKey],
        dir: &Path,
        extra: serde_json::Value,
    ) -> Result<()> {
        fs::create_dir_all(dir.join("entries")).map_err(|e| io_err(dir, "create the bundle", e))?;
        for key in keys {
            let entry = self.get(key)?.ok_or_else(|| CacheError::Bundle {
                path: dir.to_path_buf(),
                why: format!("entry {key} is not in the cache"),
            })?;
            let target = dir.join("entries").join(key.to_hex());
            materialize_dir(&entry.dir, &target)?;
        }
        let meta = BundleMeta {
            format: 1,
            keys: keys.to_vec(),
            extra,
        };
        write_atomic(
            &dir.join("bundle.json"),
            serde_json::to_string_pretty(&meta).unwrap().as_bytes(),
        )
    }

    /// Imports every entry of a bundle after checking each file against its manifest. Entries
    /// already present are left alone. Returns the imported keys.
    pub fn import_bundle(&self, dir: &Path) -> Result<Vec<CacheKey>> {
        let meta_path = dir.join("bundle.json");
        let text = fs::read_to_string(&meta_path).map_err(|e| io_err(&meta_path, "read", e))?;
        let meta: BundleMeta = serde_json::from_str(&text).map_err(|e| CacheError::Bundle {
            path: meta_path.clone(),
            why: e.to_string(),
        })?;
        let mut imported = Vec::new();
        for key in meta.keys {
            if self.contains(&key) {
                continue;
            }
            let src = dir.join("entries").join(key.to_hex());
            let manifest_path = src.join("manifest.json");
            let text = fs::read_to_string(&manifest_path)
                .map_err(|e| io_err(&manifest_path, "read", e))?;
            let manifest: Manifest =
                serde_json::from_str(&text).map_err(|e| CacheError::Bundle {
                    path: manifest_path.clone(),
                    why: e.to_string(),
                })?;
            if manifest.key != key {
                return Err(CacheError::Bundle {
                    path: manifest_path,
                    why: format!("manifest names key {} instead of {key}", manifest.key),
                });
            }
            let entry = Entry {
                manifest,
                dir: src.clone(),
            };
            if let Some(bad) = check_entry(&entry)?.into_iter().next() {
                return Err(CacheError::Bundle {
                    path: src.join("data").join(&bad.path),
                    why: bad.problem,
                });
            }
            let partial = self.begin(&key)?;
            let pdir = partial.data_dir();
            fs::remove_dir_all(&pdir).ok();
            materialize_dir(&src.join("data"), &pdir)?;
            let m = entry.manifest;
            partial.commit(crate::store::CommitInfo {
                op: m.op,
                op_version: m.op_version,
                step: m.step,
                params: m.params,
                inputs: m.inputs,
                tool_version: m.tool_version,
                started: m.started,
            })?;
            imported.push(key);
        }
        Ok(imported)
    }
}

#[derive(Serialize, Deserialize)]
struct BundleMeta {
    format: u32,
    keys: Vec<CacheKey>,
    extra: serde_json::Value,
}

fn check_entry(entry: &Entry) -> Result<Vec<Corruption>> {
    let key = entry.manifest.key.to_hex();
    let mut problems = Vec::new();
    let data = entry.data_dir();
    let listed: BTreeSet<&str> = entry
        .manifest
        .files
        .iter()
        .map(|f| f.path.as_str())
        .collect();
    for rec in &entry.manifest.files {
        let path = data.join(&rec.path);
        match hash_file(&path) {
            Ok((hash, size)) if hash == rec.blake3 && size == rec.size => {}
            Ok((_, size)) => problems.push(Corruption {
                key: key.clone(),
                path: rec.path.clone(),
                problem: format!("content changed (size {size}, manifest says {})", rec.size),
            }),
            Err(_) => problems.push(Corruption {
                key: key.clone(),
                path: rec.path.clone(),
                problem: "missing".into(),
            }),
        }
    }
    if data.is_dir() {
        for rel in walk_files(&data)? {
            if !listed.contains(rel.as_str()) {
                problems.push(Corruption {
                    key: key.clone(),
                    path: rel,
                    problem: "file not in the manifest".into(),
                });
            }
        }
    }
    Ok(problems)
}

/// Makes `dst` a copy of the tree `src`: hard links first, then a reflink, then a plain copy
/// (across file systems). Entries are immutable, so sharing inodes is safe.
pub fn materialize_dir(src: &Path, dst: &Path) -> Result<()> {
    fs::create_dir_all(dst).map_err(|e| io_err(dst, "create", e))?;
    for rel in walk_files(src)? {
        let from = src.join(&rel);
        let to = dst.join(&rel);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(|e| io_err(parent, "create", e))?;
        }
        materialize_file(&from, &to)?;
    }
    Ok(())
}

/// How [`export_entry`] treats an existing target and the files it writes.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExportMode {
    /// Replace a previous export (atomically: the new tree is complete before the old goes).
    pub replace: bool,
    /// Write independent, writable copies instead of read-only hard links into the cache.
    pub copy: bool,
}

/// The hidden file that marks a directory as an export: which entry it holds. `--replace` only
/// ever removes a directory that has one, never a folder of the user's.
pub const EXPORT_MARKER: &str = ".distillery-export.json";

/// Writes the data of `entry` to `dst`, with [`EXPORT_MARKER`]. A `dst` that does not exist or
/// is an empty directory (a mount point, say) is written in place; a previous export is replaced
/// only with `mode.replace`; anything else is refused, so two outputs never mix in one folder and
/// no folder of the user's is deleted.
///
/// Errors: [`CacheError::Exists`] for a non-empty target that is not (or may not be replaced as)
/// an export; I/O errors name the path.
pub fn export_entry(entry: &Entry, dst: &Path, mode: ExportMode) -> Result<()> {
    let src = entry.data_dir();
    let marker = serde_json::json!({
        "key": entry.manifest.key,
        "step": entry.manifest.step,
        "op": entry.manifest.op,
        "files": if mode.copy { "copies" } else { "read-only hard links into the cache" },
    });
    let write = |into: &Path| -> Result<()> {
        fs::create_dir_all(into).map_err(|e| io_err(into, "create", e))?;
        for rel in walk_files(&src)? {
            let to = into.join(&rel);
            if let Some(p) = to.parent() {
                fs::create_dir_all(p).map_err(|e| io_err(p, "create", e))?;
            }
            if mode.copy {
                fs::copy(src.join(&rel), &to).map_err(|e| io_err(&to, "copy", e))?;
                use std::os::unix::fs::PermissionsExt;
                let meta = fs::metadata(&to).map_err(|e| io_err(&to, "stat", e))?;
                let mut perms = meta.permissions();
                perms.set_mode(perms.mode() | 0o200); // the owner may write; umask bits kept
                fs::set_permissions(&to, perms).map_err(|e| io_err(&to, "make writable", e))?;
            } else {
                materialize_file(&src.join(&rel), &to)?;
            }
        }
        write_atomic(
            &into.join(EXPORT_MARKER),
            serde_json::to_string_pretty(&marker).unwrap().as_bytes(),
        )
    };
    let listing = match fs::read_dir(dst) {
        Ok(it) => Some(it.filter_map(|e| e.ok()).count()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) if dst.exists() && !dst.is_dir() => {
            let _ = e;
            return Err(CacheError::Exists {
                path: dst.to_path_buf(),
            });
        }
        Err(e) => return Err(io_err(dst, "read", e)),
    };
    match listing {
        // New or empty: written in place (an empty mount point cannot be renamed over).
        None | Some(0) => {
            let fresh = listing.is_none();
            write(dst).inspect_err(|_| {
                if fresh {
                    let _ = fs::remove_dir_all(dst);
                }
            })
        }
        Some(_) if !mode.replace || !dst.join(EXPORT_MARKER).is_file() => Err(CacheError::Exists {
            path: dst.to_path_buf(),
        }),
        Some(_) => {
            let parent = dst
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let name = dst
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let staging = parent.join(format!(".{name}.export-{}", std::process::id()));
            let old = parent.join(format!(".{name}.replaced-{}", std::process::id()));
            let _ = fs::remove_dir_all(&staging);
            if let Err(e) = write(&staging) {
                let _ = fs::remove_dir_all(&staging);
                return Err(e);
            }
            if let Err(e) = fs::rename(dst, &old) {
                let _ = fs::remove_dir_all(&staging);
                return Err(io_err(dst, "move the old export aside", e));
            }
            if let Err(e) = fs::rename(&staging, dst) {
                let _ = fs::rename(&old, dst);
                let _ = fs::remove_dir_all(&staging);
                return Err(io_err(dst, "move the export into place", e));
            }
            let _ = fs::remove_dir_all(&old);
            Ok(())
        }
    }
}

/// One file by hard link, else reflink, else copy. An existing target is replaced.
pub fn materialize_file(from: &Path, to: &Path) -> Result<()> {
    if to.exists() {
        fs::remove_file(to).map_err(|e| io_err(to, "replace", e))?;
    }
    if fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    reflink_copy::reflink_or_copy(from, to).map_err(|e| io_err(to, "copy", e))?;
    Ok(())
}

/// Bytes per entry: (key, step, op, size, finished).
pub fn sizes(store: &Store) -> Result<Vec<(CacheKey, String, String, u64)>> {
    Ok(store
        .entries()?
        .into_iter()
        .map(|e| {
            (
                e.manifest.key,
                e.manifest.step.clone(),
                e.manifest.op.clone(),
                e.manifest.total_size(),
            )
        })
        .collect())
}
