//! The content-addressed store of distillery: step outputs under blake3 keys, committed
//! atomically, locked per key, verified, collected and bundled. Knows nothing of models or recipes.
//!
//! ```no_run
//! use distillery_cache::{Store, CacheKey, CommitInfo};
//! let store = Store::open("/tmp/cache")?;
//! let key = CacheKey::of_bytes(b"example");
//! let _lock = store.lock(&key, std::time::Duration::from_secs(60), &mut |_| {})?;
//! if store.get(&key)?.is_none() {
//!     let partial = store.begin(&key)?;
//!     std::fs::write(partial.data_dir().join("out.txt"), "result").unwrap();
//!     partial.commit(CommitInfo::default())?;
//! }
//! # Ok::<(), distillery_cache::CacheError>(())
//! ```

mod error;
pub mod key;
mod lock;
pub mod maintain;
pub mod sources;
pub mod store;

pub use error::{CacheError, Result};
pub use key::{CacheKey, Canon, KEY_SCHEME_VERSION, KeyParts};
pub use lock::KeyLock;
pub use maintain::{
    Corruption, EXPORT_MARKER, ExportMode, GcReport, export_entry, materialize_dir,
    materialize_file,
};
pub use sources::SourceHasher;
pub use store::{CommitInfo, Entry, FileRecord, Manifest, Partial, Pin, Store};
