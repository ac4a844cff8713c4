//! `RECIPE.lock`: the source contents, step keys and output hashes that make a recipe a
//! reproducible artifact. `run --locked` refuses to run when the recipe or a source has moved.

use std::collections::BTreeMap;
use std::path::Path;

use distillery_cache::{CacheKey, Store};
use serde::{Deserialize, Serialize};

use crate::plan::Plan;
use crate::recipe::Recipe;

pub const LOCK_FORMAT: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LockFile {
    pub format: u32,
    pub recipe: String,
    pub tool_version: String,
    pub sources: BTreeMap<String, LockedSource>,
    pub steps: BTreeMap<String, LockedStep>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LockedSource {
    pub key: CacheKey,
    pub files: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LockedStep {
    pub op: String,
    pub op_version: u32,
    pub key: CacheKey,
    /// blake3 of each output file, when the step had been computed at lock time.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub outputs: BTreeMap<String, String>,
}

impl LockFile {
    pub fn from_plan(recipe: &Recipe, plan: &Plan, store: &Store) -> LockFile {
        let sources = plan
            .sources
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    LockedSource {
                        key: s.key,
                        files: s.files.len(),
                    },
                )
            })
            .collect();
        let steps = plan
            .steps
            .iter()
            .map(|p| {
                let outputs = store
                    .get(&p.key)
                    .ok()
                    .flatten()
                    .map(|e| {
                        e.manifest
                            .files
                            .iter()
                            .map(|f| (f.path.clone(), f.blake3.clone()))
                            .collect()
                    })
                    .unwrap_or_default();
                (
                    p.name.clone(),
                    LockedStep {
                        op: p.op.clone(),
                        op_version: p.op_version,
                        key: p.key,
                        outputs,
                    },
                )
            })
            .collect();
        LockFile {
            format: LOCK_FORMAT,
            recipe: recipe.name.clone(),
            tool_version: crate::exec::TOOL_VERSION.to_string(),
            sources,
            steps,
        }
    }

    pub fn read(path: &Path) -> Result<LockFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "cannot read lock file `{}`: {e}; create it with `distillery lock`",
                path.display()
            )
        })?;
        toml::from_str(&text)
            .map_err(|e| format!("lock file `{}` is not valid: {e}", path.display()))
    }

    pub fn write(&self, path: &Path) -> Result<(), String> {
        let body = toml::to_string_pretty(self).map_err(|e| e.to_string())?;
        let text = format!(
            "# distillery lock file: source contents and step keys of recipe `{}`.\n\
             # Commit it beside the recipe; `distillery run --locked` reproduces exactly these keys.\n\n{body}",
            self.recipe
        );
        distillery_cache::store::write_atomic(path, text.as_bytes()).map_err(|e| e.to_string())
    }

    /// Every way `plan` differs from this lock, as sentences.
    pub fn mismatches(&self, plan: &Plan) -> Vec<String> {
        let mut out = Vec::new();
        for s in &plan.sources {
            match self.sources.get(&s.name) {
                Some(l) if l.key != s.key => out.push(format!(
                    "source `{}` no longer matches the lock (locked {}, now {}): its files changed",
                    s.name,
                    l.key.short(),
                    s.key.short()
                )),
                None => out.push(format!("source `{}` is not in the lock", s.name)),
                _ => {}
            }
        }
        for p in &plan.steps {
            match self.steps.get(&p.name) {
                Some(l) if l.key != p.key => out.push(format!(
                    "step `{}` has key {} but the lock says {}: the recipe, an override or an op version changed",
                    p.name,
                    p.key.short(),
                    l.key.short()
                )),
                None => out.push(format!("step `{}` is not in the lock", p.name)),
                _ => {}
            }
        }
        out
    }
}
