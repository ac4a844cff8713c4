//! Why a step runs: its key against the record of the recipe's last run, change by change.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use distillery_cache::{CacheKey, Canon, Store};
use distillery_ops::ParamValue;
use serde::Serialize;

use super::records::read_record;
use crate::recipe::{Recipe, Ref};

/// Why a step runs.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Reason {
    /// Never computed for this recipe.
    New,
    Forced,
    /// Forced by a run that was interrupted: recomputed, resuming from its checkpoints
    /// (a resubmitted Slurm job of a `--force`d step).
    ForcedResumed,
    ParamChanged {
        step: String,
        param: String,
        old: String,
        new: String,
    },
    ParamAdded {
        step: String,
        param: String,
        new: String,
    },
    ParamRemoved {
        step: String,
        param: String,
        old: String,
    },
    InputChanged {
        port: String,
        from: String,
    },
    InputRewired {
        port: String,
        old: String,
        new: String,
    },
    OpChanged {
        old: String,
        new: String,
    },
    OpVersionChanged {
        op: String,
        old: u32,
        new: u32,
    },
    /// The recipe seed changed and this step's op uses it.
    SeedChanged {
        old: String,
        new: String,
    },
    /// The cache key scheme of this distillery differs from the one of the last run: every key
    /// moved, whatever else changed.
    KeySchemeChanged {
        old: u32,
        new: u32,
    },
    /// Computed before with this very key, but the entry is gone (gc, a different cache).
    EntryMissing,
    /// The entry is there, but a file of it was changed in place since it was committed.
    EntryModified {
        what: String,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::New => write!(f, "new"),
            Reason::Forced => write!(f, "forced"),
            Reason::ForcedResumed => write!(f, "forced, resuming"),
            Reason::ParamChanged {
                step,
                param,
                old,
                new,
            } => write!(f, "param `{step}.{param}` changed {old} → {new}"),
            Reason::ParamAdded { step, param, new } => {
                write!(f, "param `{step}.{param}` set to {new}")
            }
            Reason::ParamRemoved { step, param, old } => {
                write!(f, "param `{step}.{param}` ({old}) removed")
            }
            Reason::InputChanged { port, from } => write!(f, "input `{port}` changed ({from})"),
            Reason::InputRewired { port, old, new } => {
                write!(f, "input `{port}` rewired {old} → {new}")
            }
            Reason::OpChanged { old, new } => write!(f, "op changed {old} → {new}"),
            Reason::OpVersionChanged { op, old, new } => {
                write!(f, "op `{op}` version changed {old} → {new}")
            }
            Reason::SeedChanged { old, new } => write!(f, "recipe seed changed {old} → {new}"),
            Reason::KeySchemeChanged { old, new } => write!(
                f,
                "cache key scheme changed {old} → {new} (a distillery update; every key moved)"
            ),
            Reason::EntryModified { what } => write!(
                f,
                "the cached output was edited in place ({what}); recomputing it"
            ),
            Reason::EntryMissing => {
                write!(f, "output not in the cache (removed, or another cache)")
            }
        }
    }
}

fn json_to_param(v: &serde_json::Value) -> String {
    fn conv(v: &serde_json::Value) -> Option<ParamValue> {
        Some(match v {
            serde_json::Value::Bool(b) => ParamValue::Bool(*b),
            serde_json::Value::Number(n) if n.is_i64() => ParamValue::Int(n.as_i64()?),
            serde_json::Value::Number(n) => ParamValue::Float(n.as_f64()?),
            serde_json::Value::String(s) => ParamValue::Str(s.clone()),
            serde_json::Value::Array(a) => {
                ParamValue::List(a.iter().map(conv).collect::<Option<_>>()?)
            }
            _ => return None,
        })
    }
    conv(v)
        .map(|p| p.to_string())
        .unwrap_or_else(|| v.to_string())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn explain(
    recipe: &Recipe,
    store: &Store,
    i: usize,
    key: CacheKey,
    op_version: &u32,
    params: &Canon,
    inputs: &BTreeMap<String, CacheKey>,
    seed: Option<u64>,
) -> Vec<Reason> {
    let step = &recipe.steps[i];
    let Some(record) = read_record(store, recipe, &step.name) else {
        return vec![Reason::New];
    };
    if record.key == key {
        return vec![Reason::EntryMissing];
    }
    let mut reasons = Vec::new();
    let scheme_moved = record.key_scheme != distillery_cache::KEY_SCHEME_VERSION;
    if scheme_moved {
        reasons.push(Reason::KeySchemeChanged {
            old: record.key_scheme,
            new: distillery_cache::KEY_SCHEME_VERSION,
        });
    } else if record.seed != seed && seed.is_some() {
        let show = |s: Option<u64>| s.map_or("unused".to_string(), |s| s.to_string());
        reasons.push(Reason::SeedChanged {
            old: show(record.seed),
            new: show(seed),
        });
    }
    if record.op != step.op {
        reasons.push(Reason::OpChanged {
            old: record.op.clone(),
            new: step.op.clone(),
        });
    } else if record.op_version != *op_version {
        reasons.push(Reason::OpVersionChanged {
            op: step.op.clone(),
            old: record.op_version,
            new: *op_version,
        });
    }
    let old = record.params.as_object().cloned().unwrap_or_default();
    let new = params.to_json();
    let new = new.as_object().cloned().unwrap_or_default();
    let names: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for name in names {
        match (old.get(name), new.get(name)) {
            (Some(a), Some(b)) if a != b => reasons.push(Reason::ParamChanged {
                step: step.name.clone(),
                param: name.clone(),
                old: json_to_param(a),
                new: json_to_param(b),
            }),
            (None, Some(b)) => reasons.push(Reason::ParamAdded {
                step: step.name.clone(),
                param: name.clone(),
                new: json_to_param(b),
            }),
            (Some(a), None) => reasons.push(Reason::ParamRemoved {
                step: step.name.clone(),
                param: name.clone(),
                old: json_to_param(a),
            }),
            _ => {}
        }
    }
    for input in &step.inputs {
        let Some(&now) = inputs.get(&input.port) else {
            continue;
        };
        if scheme_moved {
            // Every input key moved with the scheme; naming each would only hide the reason.
            break;
        }
        match record.inputs.get(&input.port) {
            Some((written, _)) if *written != input.written => reasons.push(Reason::InputRewired {
                port: input.port.clone(),
                old: written.clone(),
                new: input.written.clone(),
            }),
            Some((_, old_key)) if *old_key != now => {
                let from = match input.target {
                    Ref::Source(_) => format!("the content of `{}` changed", input.written),
                    Ref::Step(_) => format!("`{}` changed", input.written),
                };
                reasons.push(Reason::InputChanged {
                    port: input.port.clone(),
                    from,
                });
            }
            None => reasons.push(Reason::InputRewired {
                port: input.port.clone(),
                old: "nothing".into(),
                new: input.written.clone(),
            }),
            _ => {}
        }
    }
    if reasons.is_empty() {
        // Same params, inputs and op version, different key: the recipe format or key scheme moved.
        reasons.push(Reason::New);
    }
    reasons
}
