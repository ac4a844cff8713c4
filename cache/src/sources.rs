//! Content keys of sources (model checkpoints, dataset files), memoized by
//! (path, size, mtime, inode) so an unchanged 24 GB checkpoint is read once, not on every plan.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Result, io_err};
use crate::key::{CacheKey, Canon};
use crate::store::{Store, hash_file, write_atomic};

/// Hashes files, remembering each file's hash by its identity on disk.
pub struct SourceHasher {
    memo_path: PathBuf,
    memo: Mutex<BTreeMap<String, String>>,
}

impl SourceHasher {
    pub fn new(store: &Store) -> SourceHasher {
        let memo_path = store.state_dir().join("file-hashes.json");
        let memo = fs::read_to_string(&memo_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        SourceHasher {
            memo_path,
            memo: Mutex::new(memo),
        }
    }

    fn identity(path: &Path) -> Result<(String, u64)> {
        let meta = fs::metadata(path).map_err(|e| io_err(path, "read", e))?;
        let canonical = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Ok((
            format!(
                "{}|{}|{}.{}|{}|{}",
                canonical.display(),
                meta.size(),
                meta.mtime(),
                meta.mtime_nsec(),
                meta.ino(),
                meta.dev()
            ),
            meta.size(),
        ))
    }

    /// The key of a source made of `files` (name as the op will see it, path on disk) and its
    /// declaration (`decl`, e.g. a JSONL field name). `progress(done, total)` is called only when
    /// some file has to be read.
    pub fn key(
        &self,
        decl: &Canon,
        files: &[(String, PathBuf)],
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<CacheKey> {
        let mut ids = Vec::with_capacity(files.len());
        let mut todo_bytes = 0u64;
        {
            let memo = self.memo.lock().unwrap();
            for (_, path) in files {
                let (id, size) = Self::identity(path)?;
                if !memo.contains_key(&id) {
                    todo_bytes += size;
                }
                ids.push(id);
            }
        }
        let mut done = 0u64;
        let mut entries = BTreeMap::new();
        let mut changed = false;
        for ((name, path), id) in files.iter().zip(&ids) {
            let known = self.memo.lock().unwrap().get(id).cloned();
            let hash = match known {
                Some(h) => h,
                None => {
                    let (h, size) = hash_file(path)?;
                    done += size;
                    progress(done, todo_bytes);
                    self.memo.lock().unwrap().insert(id.clone(), h.clone());
                    changed = true;
                    h
                }
            };
            entries.insert(name.clone(), Canon::Str(hash));
        }
        if changed {
            let memo = self.memo.lock().unwrap();
            // Losing a memo write to a concurrent process only costs a re-hash later.
            let _ = write_atomic(
                &self.memo_path,
                serde_json::to_string(&*memo).unwrap().as_bytes(),
            );
        }
        let mut top = BTreeMap::new();
        top.insert("decl".to_string(), decl.clone());
        top.insert("files".to_string(), Canon::Map(entries));
        let mut hasher = blake3::Hasher::new_derive_key("distillery source key");
        hasher.update(&Canon::Map(top).encode());
        Ok(hasher.finalize().into())
    }
}

/// The files under a source directory, as `/`-separated names relative to it, sorted; hidden
/// files (a leading `.` in any component) are skipped. Symbolic links are followed, so a Hugging
/// Face hub snapshot (whose files link into `blobs/`) reads like the resolved copy.
///
/// Errors: a dangling link, or one that leads to something other than a file or directory, names
/// the link and its target.
pub fn walk_source_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    fn walk(
        dir: &Path,
        prefix: &str,
        depth: usize,
        out: &mut Vec<(String, PathBuf)>,
    ) -> Result<()> {
        if depth > 32 {
            return Err(crate::CacheError::Source {
                path: dir.to_path_buf(),
                why: "directories nest more than 32 deep (a symbolic link loop?)".into(),
            });
        }
        for item in fs::read_dir(dir).map_err(|e| io_err(dir, "list", e))? {
            let item = item.map_err(|e| io_err(dir, "list", e))?;
            let name = item.file_name().to_string_lossy().to_string();
            if name.starts_with('.') {
                continue;
            }
            let path = item.path();
            let meta = match fs::metadata(&path) {
                Ok(m) => m,
                Err(e) => {
                    return Err(match fs::read_link(&path) {
                        Ok(target) => crate::CacheError::Source {
                            path,
                            why: format!(
                                "a dangling symbolic link to `{}` ({e}); restore the file it points to (for a Hugging Face hub folder, download the snapshot again)",
                                target.display()
                            ),
                        },
                        Err(_) => io_err(&path, "stat", e),
                    });
                }
            };
            let rel = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            if meta.is_dir() {
                walk(&path, &rel, depth + 1, out)?;
            } else if meta.is_file() {
                out.push((rel, path));
            } else {
                return Err(crate::CacheError::Source {
                    path,
                    why: "neither a file nor a directory (a source may hold only those)".into(),
                });
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, "", 0, &mut out)?;
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_not_path_decides_and_changes_are_seen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("cache")).unwrap();
        let a = dir.path().join("a.txt");
        let b = dir.path().join("b.txt");
        fs::write(&a, b"hello").unwrap();
        fs::write(&b, b"hello").unwrap();
        let h = SourceHasher::new(&store);
        let mut calls = 0;
        let ka = h
            .key(&Canon::Null, &[("x".into(), a.clone())], &mut |_, _| {
                calls += 1
            })
            .unwrap();
        let kb = h
            .key(&Canon::Null, &[("x".into(), b.clone())], &mut |_, _| {
                calls += 1
            })
            .unwrap();
        assert_eq!(ka, kb);
        assert_eq!(calls, 2);
        // Memoized: a second hasher reads the memo and hashes nothing.
        let h2 = SourceHasher::new(&store);
        let mut calls2 = 0;
        assert_eq!(
            h2.key(&Canon::Null, &[("x".into(), a.clone())], &mut |_, _| {
                calls2 += 1
            })
            .unwrap(),
            ka
        );
        assert_eq!(calls2, 0);
        // Different name or declaration: different key.
        assert_ne!(
            h.key(&Canon::Null, &[("y".into(), a.clone())], &mut |_, _| {})
                .unwrap(),
            ka
        );
        assert_ne!(
            h.key(
                &Canon::Str("f".into()),
                &[("x".into(), a.clone())],
                &mut |_, _| {}
            )
            .unwrap(),
            ka
        );
        // Changed content (size changes): new key.
        fs::write(&a, b"hello world").unwrap();
        assert_ne!(
            h.key(&Canon::Null, &[("x".into(), a)], &mut |_, _| {})
                .unwrap(),
            ka
        );
    }
}
