//! What the last run of a recipe computed for each step: what `plan` explains changes against.

use std::collections::BTreeMap;
use std::path::PathBuf;

use distillery_cache::{CacheKey, Store};
use serde::{Deserialize, Serialize};

use crate::recipe::Recipe;

/// What the last run of a recipe computed for a step: what `plan` explains changes against.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepRecord {
    pub key: CacheKey,
    pub op: String,
    pub op_version: u32,
    pub params: serde_json::Value,
    /// port → (reference as written, key)
    pub inputs: BTreeMap<String, (String, CacheKey)>,
    /// The recipe seed, when the op used it.
    #[serde(default)]
    pub seed: Option<u64>,
    /// The key scheme the key was made with (records from before it was written: scheme 1).
    #[serde(default = "first_key_scheme")]
    pub key_scheme: u32,
}

fn first_key_scheme() -> u32 {
    1
}

fn records_dir(store: &Store, recipe: &Recipe) -> PathBuf {
    let abs = std::fs::canonicalize(&recipe.path).unwrap_or_else(|_| recipe.path.clone());
    store
        .state_dir()
        .join("runs")
        .join(CacheKey::of_bytes(abs.to_string_lossy().as_bytes()).to_hex())
}

pub fn read_record(store: &Store, recipe: &Recipe, step: &str) -> Option<StepRecord> {
    let text =
        std::fs::read_to_string(records_dir(store, recipe).join(format!("{step}.json"))).ok()?;
    serde_json::from_str(&text).ok()
}

pub fn write_record(store: &Store, recipe: &Recipe, step: &str, record: &StepRecord) {
    let dir = records_dir(store, recipe);
    if std::fs::create_dir_all(&dir).is_ok() {
        // A lost record only makes the next plan say "new" instead of naming the change.
        let _ = distillery_cache::store::write_atomic(
            &dir.join(format!("{step}.json")),
            serde_json::to_string_pretty(record).unwrap().as_bytes(),
        );
    }
}
