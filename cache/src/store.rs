//! The on-disk store: committed entries, partial directories, scratch directories and pins.
//!
//! Layout under the root:
//! ```text
//! entries/<key>/manifest.json   written last; its presence is what makes an entry
//! entries/<key>/data/...        the step's output files
//! partial/<key>.<host>.<pid>.<nonce>/   a step being written; never read as a result
//! scratch/<key>/                checkpoints of a long step, removed after its commit
//! locks/<key>.lock              one advisory lock per key
//! pins/<name>                   keys that gc must keep (lock files, manual pins)
//! state/                        small memos (source hashes, last runs)
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::{CacheError, Result, io_err};
use crate::key::CacheKey;
use crate::lock::KeyLock;

/// Version of the manifest format.
pub const MANIFEST_FORMAT: u32 = 1;

/// One output file of an entry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FileRecord {
    /// Path relative to the entry's data directory, with `/` separators.
    pub path: String,
    pub size: u64,
    pub blake3: String,
    /// Modification time (ns since the epoch) when committed: a cheap witness that the file was
    /// not edited in place since (an exported hard link shares the inode). Absent in old entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime_ns: Option<i128>,
}

/// What the committer knows about the step; the store adds files and times.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CommitInfo {
    pub op: String,
    pub op_version: u32,
    /// The step's name in the recipe that first produced it (for people; not part of the key).
    pub step: String,
    pub params: serde_json::Value,
    pub inputs: BTreeMap<String, CacheKey>,
    pub tool_version: String,
    pub started: Option<SystemTime>,
}

/// The manifest of a committed entry.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub key: CacheKey,
    pub op: String,
    pub op_version: u32,
    pub step: String,
    pub params: serde_json::Value,
    pub inputs: BTreeMap<String, CacheKey>,
    pub files: Vec<FileRecord>,
    pub tool_version: String,
    pub host: String,
    #[serde(with = "humantime_serde_opt")]
    pub started: Option<SystemTime>,
    #[serde(with = "humantime_serde_opt")]
    pub finished: Option<SystemTime>,
}

impl Manifest {
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    pub fn duration(&self) -> Option<Duration> {
        self.finished?.duration_since(self.started?).ok()
    }
}

mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::SystemTime;

    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&humantime::format_rfc3339_millis(*t).to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| humantime::parse_rfc3339_weak(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// A committed entry: its manifest and where its files are.
#[derive(Clone, Debug)]
pub struct Entry {
    pub manifest: Manifest,
    pub dir: PathBuf,
}

impl Entry {
    /// The directory holding the step's output files.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
}

/// The content-addressed store.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens (creating if needed) a store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        for sub in ["entries", "partial", "scratch", "locks", "pins", "state"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(|e| io_err(&dir, "create the cache directory", e))?;
        }
        Ok(Store { root })
    }

    /// The default location: `$DISTILLERY_CACHE`, else `$XDG_CACHE_HOME/distillery`, else
    /// `~/.cache/distillery`.
    pub fn default_root() -> PathBuf {
        if let Some(dir) = std::env::var_os("DISTILLERY_CACHE").filter(|s| !s.is_empty()) {
            return PathBuf::from(dir);
        }
        if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|s| !s.is_empty()) {
            return PathBuf::from(dir).join("distillery");
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
        PathBuf::from(home).join(".cache").join("distillery")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn entry_dir(&self, key: &CacheKey) -> PathBuf {
        self.root.join("entries").join(key.to_hex())
    }

    /// A small directory for memos that are not entries (source hashes, last runs).
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    /// The committed entry for `key`, if there is one. A directory without a readable manifest is
    /// not an entry.
    pub fn get(&self, key: &CacheKey) -> Result<Option<Entry>> {
        let dir = self.entry_dir(key);
        let path = dir.join("manifest.json");
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path, "read the manifest", e)),
        };
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| CacheError::Corrupt {
            path: path.clone(),
            why: format!("manifest is not valid: {e}"),
        })?;
        Ok(Some(Entry { manifest, dir }))
    }

    pub fn contains(&self, key: &CacheKey) -> bool {
        self.entry_dir(key).join("manifest.json").is_file()
    }

    /// The first file of the entry for `key` whose size or modification time differs from its
    /// manifest (edited in place, through an exported hard link say), with what differs; `None`
    /// when the entry looks intact or does not exist. `stat`s every file and re-hashes only one
    /// whose mtime moved; `cache verify` re-hashes everything.
    pub fn modified_file(&self, key: &CacheKey) -> Option<String> {
        let entry = self.get(key).ok()??;
        let data = entry.data_dir();
        for f in &entry.manifest.files {
            let path = data.join(&f.path);
            let Ok(meta) = fs::metadata(&path) else {
                return Some(format!("`{}` is missing", f.path));
            };
            if meta.len() != f.size {
                return Some(format!(
                    "`{}` changed size {} → {}",
                    f.path,
                    f.size,
                    meta.len()
                ));
            }
            // A new mtime alone (a cache copied with `cp -r` or tar) is not an edit: the content
            // decides, re-hashed only then.
            if let Some(t) = f.mtime_ns
                && mtime_ns(&meta) != t
                && hash_file(&path).map(|(h, _)| h != f.blake3).unwrap_or(true)
            {
                return Some(format!("`{}` was modified after it was committed", f.path));
            }
        }
        None
    }

    /// Every committed entry (unreadable ones are skipped; `verify` reports them).
    pub fn entries(&self) -> Result<Vec<Entry>> {
        let dir = self.root.join("entries");
        let mut out = Vec::new();
        for item in fs::read_dir(&dir).map_err(|e| io_err(&dir, "list the entries", e))? {
            let item = item.map_err(|e| io_err(&dir, "list the entries", e))?;
            if let Ok(key) = item.file_name().to_string_lossy().parse::<CacheKey>()
                && let Ok(Some(entry)) = self.get(&key)
            {
                out.push(entry);
            }
        }
        out.sort_by_key(|e| e.manifest.key);
        Ok(out)
    }

    /// Takes the advisory lock of `key`, waiting up to `timeout`. `on_wait` is told once who holds
    /// it when we have to wait.
    pub fn lock(
        &self,
        key: &CacheKey,
        timeout: Duration,
        on_wait: &mut dyn FnMut(&str),
    ) -> Result<KeyLock> {
        KeyLock::acquire(
            &self
                .root
                .join("locks")
                .join(format!("{}.lock", key.to_hex())),
            timeout,
            on_wait,
        )
    }

    /// The scratch directory of `key`, created if missing. A long step checkpoints here; it
    /// survives interruptions and is removed after the step commits.
    pub fn scratch_dir(&self, key: &CacheKey) -> Result<PathBuf> {
        let dir = self.scratch_path(key);
        fs::create_dir_all(&dir).map_err(|e| io_err(&dir, "create the scratch directory", e))?;
        Ok(dir)
    }

    fn scratch_path(&self, key: &CacheKey) -> PathBuf {
        self.root.join("scratch").join(key.to_hex())
    }

    /// Removes the scratch directory of `key` (checkpoints of an interrupted run), so that the
    /// next run starts from nothing. Call it while holding the key's lock.
    pub fn clear_scratch(&self, key: &CacheKey) -> Result<()> {
        let dir = self.scratch_path(key);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&dir, "remove the scratch directory", e)),
        }
    }

    /// Removes the scratch directory of `key` if the step left nothing in it (a failed step
    /// that never checkpointed): checkpoints stay for the next run to resume from.
    pub fn remove_empty_scratch(&self, key: &CacheKey) {
        // remove_dir refuses a non-empty directory: exactly the rule.
        let _ = fs::remove_dir(self.scratch_path(key));
    }

    /// Starts writing the entry for `key` into a fresh partial directory.
    pub fn begin(&self, key: &CacheKey) -> Result<Partial> {
        let nonce = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let name = format!(
            "{}.{}.{}.{}",
            key.to_hex(),
            hostname(),
            std::process::id(),
            nonce
        );
        let dir = self.root.join("partial").join(name);
        let data = dir.join("data");
        fs::create_dir_all(&data).map_err(|e| io_err(&data, "create the partial directory", e))?;
        Ok(Partial {
            store: self.clone(),
            key: *key,
            dir,
            committed: false,
        })
    }

    /// Removes partial directories left by processes of this host that are gone, and any older
    /// than a week (another host's crash). Returns what it removed.
    pub fn sweep_partials(&self) -> Result<Vec<PathBuf>> {
        let dir = self.root.join("partial");
        let host = hostname();
        let mut removed = Vec::new();
        for item in fs::read_dir(&dir).map_err(|e| io_err(&dir, "list partial directories", e))? {
            let Ok(item) = item else { continue };
            let name = item.file_name().to_string_lossy().to_string();
            let parts: Vec<&str> = name.rsplitn(3, '.').collect();
            // name = key.host.pid.nonce, host may contain dots: split from the right.
            let stale = match parts.as_slice() {
                [_nonce, pid, rest] => {
                    let same_host = rest.split_once('.').map(|(_, h)| h) == Some(host.as_str());
                    let pid: i32 = pid.parse().unwrap_or(0);
                    (same_host && !process_alive(pid)) || older_than(&item.path(), WEEK)
                }
                _ => older_than(&item.path(), WEEK),
            };
            if stale && fs::remove_dir_all(item.path()).is_ok() {
                removed.push(item.path());
            }
        }
        Ok(removed)
    }

    /// Removes an entry (gc). Renamed away first so a reader never sees half an entry.
    pub fn remove(&self, key: &CacheKey) -> Result<()> {
        let dir = self.entry_dir(key);
        let doomed =
            self.root
                .join("partial")
                .join(format!("{}.gc.{}.0", key.to_hex(), std::process::id()));
        match fs::rename(&dir, &doomed) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(&dir, "remove the entry", e)),
        }
        fs::remove_dir_all(&doomed).map_err(|e| io_err(&doomed, "remove the entry", e))?;
        let _ = self.clear_scratch(key);
        Ok(())
    }

    /// Keys that a pin (a lock file or a manual pin) holds on to.
    pub fn pinned(&self) -> Result<BTreeSet<CacheKey>> {
        let mut keys = BTreeSet::new();
        for pin in self.pins()? {
            keys.extend(pin.keys);
        }
        Ok(keys)
    }

    /// Every pin, read only. A pin whose recipe or lock file is gone still keeps its keys (the
    /// file may be on another branch); only [`Store::unpin`] removes a pin.
    pub fn pins(&self) -> Result<Vec<Pin>> {
        Ok(self.pin_files()?.into_iter().map(|(_, pin)| pin).collect())
    }

    fn pin_files(&self) -> Result<Vec<(PathBuf, Pin)>> {
        let dir = self.root.join("pins");
        let mut pins = Vec::new();
        for item in fs::read_dir(&dir).map_err(|e| io_err(&dir, "list pins", e))? {
            let item = item.map_err(|e| io_err(&dir, "list pins", e))?;
            // `write_atomic`'s temporaries (a concurrent run's, or a crashed one's) are no pins.
            if item.file_name().to_string_lossy().contains(".tmp.") {
                continue;
            }
            let text = match fs::read_to_string(item.path()) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // replaced meanwhile
                Err(e) => return Err(io_err(&item.path(), "read the pin", e)),
            };
            // An unreadable pin must not let gc delete what it protected.
            let pin = serde_json::from_str::<Pin>(&text).map_err(|e| CacheError::Corrupt {
                path: item.path(),
                why: format!("pin is not valid JSON ({e}); fix or remove it before gc"),
            })?;
            pins.push((item.path(), pin));
        }
        pins.sort_by(|a, b| a.1.name.cmp(&b.1.name));
        Ok(pins)
    }

    /// Removes the pins `which` selects (unless `dry_run`) and returns them.
    pub fn unpin(&self, which: &dyn Fn(&Pin) -> bool, dry_run: bool) -> Result<Vec<Pin>> {
        let mut removed = Vec::new();
        for (file, pin) in self.pin_files()? {
            if which(&pin) {
                if !dry_run {
                    fs::remove_file(&file).map_err(|e| io_err(&file, "remove the pin", e))?;
                }
                removed.push(pin);
            }
        }
        Ok(removed)
    }

    /// Records a pin under `name` (replacing an older one of that name).
    pub fn pin(&self, name: &str, pin: &Pin) -> Result<()> {
        let file = self
            .root
            .join("pins")
            .join(CacheKey::of_bytes(name.as_bytes()).to_hex());
        write_atomic(&file, serde_json::to_string_pretty(pin).unwrap().as_bytes())
    }
}

/// A set of keys gc must keep.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pin {
    pub name: String,
    /// The recipe or lock file this pin stands for. When it is gone the pin stays (and says so
    /// in `gc`); `distillery cache unpin` releases it.
    pub lock_file: Option<PathBuf>,
    pub keys: BTreeSet<CacheKey>,
}

impl Pin {
    /// Whether the recipe or lock file this pin stands for no longer exists.
    pub fn file_gone(&self) -> bool {
        self.lock_file.as_ref().is_some_and(|f| !f.exists())
    }
}

const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);

fn older_than(path: &Path, age: Duration) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|e| e > age)
}

/// Whether a process of this host with `pid` exists.
pub fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 sends nothing; it only checks that the pid exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

pub fn hostname() -> String {
    gethostname::gethostname()
        .to_string_lossy()
        .replace(['/', ' '], "_")
}

/// An entry being written. Dropping it without [`Partial::commit`] removes the directory; a
/// process killed meanwhile leaves it for [`Store::sweep_partials`].
#[derive(Debug)]
pub struct Partial {
    store: Store,
    key: CacheKey,
    dir: PathBuf,
    committed: bool,
}

impl Partial {
    /// Where the step writes its output files.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Hashes and fsyncs every file, writes the manifest last, and renames the directory into
    /// place. If another process committed the same key meanwhile, its entry wins and ours is
    /// discarded (same key, same content by construction).
    pub fn commit(self, info: CommitInfo) -> Result<Entry> {
        self.commit_inner(info, false)
    }

    /// Like [`Partial::commit`], but a forced rerun replaces an existing entry of the same key:
    /// the old one is renamed away only once the new one is complete.
    pub fn commit_replacing(self, info: CommitInfo) -> Result<Entry> {
        self.commit_inner(info, true)
    }

    fn commit_inner(mut self, info: CommitInfo, replace: bool) -> Result<Entry> {
        let data = self.data_dir();
        let mut files = Vec::new();
        for rel in walk_files(&data)? {
            let path = data.join(&rel);
            let (hash, size) = hash_file(&path)?;
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| io_err(&path, "sync", e))?;
            // Entries are immutable: read-only files, so that an exported hard link cannot be
            // edited by accident (root is not stopped by this; the mtime below still tells).
            let meta = fs::metadata(&path).map_err(|e| io_err(&path, "stat", e))?;
            let mut perms = meta.permissions();
            perms.set_readonly(true);
            fs::set_permissions(&path, perms).map_err(|e| io_err(&path, "make read-only", e))?;
            files.push(FileRecord {
                path: rel,
                size,
                blake3: hash,
                mtime_ns: Some(mtime_ns(&meta)),
            });
        }
        sync_tree_dirs(&data)?;
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            key: self.key,
            op: info.op,
            op_version: info.op_version,
            step: info.step,
            params: info.params,
            inputs: info.inputs,
            files,
            tool_version: info.tool_version,
            host: hostname(),
            started: info.started,
            finished: Some(SystemTime::now()),
        };
        let manifest_path = self.dir.join("manifest.json");
        write_atomic(
            &manifest_path,
            serde_json::to_string_pretty(&manifest).unwrap().as_bytes(),
        )?;
        let target = self.store.entry_dir(&self.key);
        if replace && target.exists() {
            let old = self.dir.with_extension("replaced");
            fs::rename(&target, &old)
                .map_err(|e| io_err(&target, "move the old entry aside", e))?;
            let renamed = fs::rename(&self.dir, &target);
            let _ = fs::remove_dir_all(&old);
            renamed.map_err(|e| io_err(&target, "commit the entry", e))?;
            self.committed = true;
            let _ = self.store.clear_scratch(&self.key);
            return self
                .store
                .get(&self.key)?
                .ok_or_else(|| CacheError::Corrupt {
                    path: target,
                    why: "entry vanished right after its commit".into(),
                });
        }
        match fs::rename(&self.dir, &target) {
            Ok(()) => {}
            Err(_) if self.store.contains(&self.key) => {
                let _ = fs::remove_dir_all(&self.dir);
            }
            Err(e) => return Err(io_err(&target, "commit the entry", e)),
        }
        self.committed = true;
        sync_dir(target.parent().unwrap());
        let _ = self.store.clear_scratch(&self.key);
        self.store
            .get(&self.key)?
            .ok_or_else(|| CacheError::Corrupt {
                path: target,
                why: "entry vanished right after its commit".into(),
            })
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Relative paths (with `/`) of every regular file under `dir`, sorted.
pub fn walk_files(dir: &Path) -> Result<Vec<String>> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
        for item in fs::read_dir(dir).map_err(|e| io_err(dir, "list", e))? {
            let item = item.map_err(|e| io_err(dir, "list", e))?;
            let path = item.path();
            let ty = item.file_type().map_err(|e| io_err(&path, "stat", e))?;
            if ty.is_dir() {
                walk(base, &path, out)?;
            } else if ty.is_file() {
                let rel = path.strip_prefix(base).unwrap();
                let rel: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().to_string())
                    .collect();
                out.push(rel.join("/"));
            } else {
                return Err(CacheError::Corrupt {
                    path,
                    why: "outputs must be regular files or directories (no links)".into(),
                });
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

fn mtime_ns(meta: &fs::Metadata) -> i128 {
    use std::os::unix::fs::MetadataExt;
    meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128
}

/// blake3 (hex) and size of a file, streaming (memory-mapped for large files).
pub fn hash_file(path: &Path) -> Result<(String, u64)> {
    let mut hasher = blake3::Hasher::new();
    let file = File::open(path).map_err(|e| io_err(path, "open", e))?;
    let size = io::copy(
        &mut io::BufReader::with_capacity(1 << 20, file),
        &mut hasher,
    )
    .map_err(|e| io_err(path, "read", e))?;
    Ok((hasher.finalize().to_hex().to_string(), size))
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = File::open(dir) {
        let _ = f.sync_all();
    }
}

fn sync_tree_dirs(dir: &Path) -> Result<()> {
    for item in fs::read_dir(dir).map_err(|e| io_err(dir, "list", e))? {
        let item = item.map_err(|e| io_err(dir, "list", e))?;
        if item.file_type().is_ok_and(|t| t.is_dir()) {
            sync_tree_dirs(&item.path())?;
        }
    }
    sync_dir(dir);
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = File::create(&tmp).map_err(|e| io_err(&tmp, "create", e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| io_err(&tmp, "write", e))?;
    fs::rename(&tmp, path).map_err(|e| io_err(path, "rename into place", e))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent);
    }
    Ok(())
}
