//! The plan: every step's key, whether it is cached, and if not, why it runs. The plan is data;
//! the CLI renders it.

mod explain;
mod keys;
mod records;
mod sources;

use std::collections::{BTreeMap, BTreeSet};

use distillery_cache::{CacheKey, Store};
use distillery_ops::{Artifact, ArtifactKind, OpRegistry};
use serde::Serialize;

use crate::diag::Diagnostic;
use crate::graph::StepGraph;
use crate::recipe::{Recipe, Ref};

pub use explain::Reason;
pub use keys::params_canon;
use keys::{StepKey, step_key};
pub use records::{StepRecord, read_record, write_record};
pub use sources::{ResolvedSource, expand_path, resolve_sources};

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Cached,
    Run,
    /// Not selected by --only/--until/--from.
    Skipped,
}

#[derive(Clone, Debug)]
pub struct PlannedStep {
    pub index: usize,
    pub name: String,
    pub op: String,
    pub op_version: u32,
    pub kind: ArtifactKind,
    pub key: CacheKey,
    pub inputs: BTreeMap<String, CacheKey>,
    /// The recipe seed when the op uses it (then it is part of the key), else `None`.
    pub seed: Option<u64>,
    pub status: Status,
    pub reasons: Vec<Reason>,
}

pub struct Plan {
    /// What the ops' plan checks allow but warn about, with the place in the recipe.
    pub warnings: Vec<Diagnostic>,
    pub sources: Vec<ResolvedSource>,
    /// In topological order.
    pub steps: Vec<PlannedStep>,
}

impl Plan {
    pub fn step(&self, name: &str) -> Option<&PlannedStep> {
        self.steps.iter().find(|s| s.name == name)
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "sources": self.sources.iter().map(|s| serde_json::json!({"name": s.name, "key": s.key})).collect::<Vec<_>>(),
            "steps": self.steps.iter().map(|s| serde_json::json!({
                "step": s.name, "op": s.op, "key": s.key, "status": s.status,
                "reasons": s.reasons.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }
}

/// Which steps a run is about.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub only: Option<String>,
    pub from: Option<String>,
    pub until: Option<String>,
    pub force: Vec<String>,
    /// Recompute these even if cached, as `force` does, but keep their checkpoints.
    pub force_resume: Vec<String>,
}

/// Computes keys, looks them up, and explains every step that has to run.
pub fn make_plan(
    recipe: &Recipe,
    graph: &StepGraph,
    registry: &OpRegistry,
    store: &Store,
    sources: Vec<ResolvedSource>,
    selection: &Selection,
) -> Result<Plan, Vec<Diagnostic>> {
    let find = |name: &str| -> Result<usize, Diagnostic> {
        recipe.step(name).map(|(i, _)| i).ok_or_else(|| {
            Diagnostic::new(format!("the recipe has no step `{name}`"), None).maybe_help(
                crate::diag::did_you_mean(name, recipe.steps.iter().map(|s| s.name.as_str())),
            )
        })
    };
    let mut targets: BTreeSet<usize> = (0..recipe.steps.len()).collect();
    if let Some(until) = &selection.until {
        let i = find(until).map_err(|d| vec![d])?;
        targets = graph.ancestors(i);
        targets.insert(i);
    }
    if let Some(from) = &selection.from {
        let i = find(from).map_err(|d| vec![d])?;
        let mut down = graph.descendants(i);
        down.insert(i);
        targets = targets.intersection(&down).copied().collect();
    }
    if let Some(only) = &selection.only {
        targets = [find(only).map_err(|d| vec![d])?].into();
    }
    let mut forced = BTreeSet::new();
    for f in &selection.force {
        forced.insert(find(f).map_err(|d| vec![d])?);
    }
    let mut force_resumed = BTreeSet::new();
    for f in &selection.force_resume {
        force_resumed.insert(find(f).map_err(|d| vec![d])?);
    }

    let mut keys: Vec<Option<CacheKey>> = vec![None; recipe.steps.len()];
    let mut planned = Vec::new();
    for &i in &graph.order {
        let step = &recipe.steps[i];
        let op = registry.get(&step.op).expect("validated op");
        let sig = op.signature();
        let StepKey {
            key,
            params,
            inputs,
            seed,
        } = step_key(recipe, i, op.as_ref(), &sources, &keys);
        keys[i] = Some(key);
        let modified = if store.contains(&key) {
            store.modified_file(&key)
        } else {
            None
        };
        let cached = store.contains(&key) && modified.is_none();
        let (status, reasons) = if !targets.contains(&i) {
            (Status::Skipped, Vec::new())
        } else if forced.contains(&i) {
            (Status::Run, vec![Reason::Forced])
        } else if force_resumed.contains(&i) {
            (Status::Run, vec![Reason::ForcedResumed])
        } else if let Some(what) = modified {
            (Status::Run, vec![Reason::EntryModified { what }])
        } else if cached {
            (Status::Cached, Vec::new())
        } else {
            (
                Status::Run,
                explain::explain(recipe, store, i, key, &sig.version, &params, &inputs, seed),
            )
        };
        planned.push(PlannedStep {
            index: i,
            name: step.name.clone(),
            op: step.op.clone(),
            op_version: sig.version,
            kind: sig.output,
            key,
            inputs,
            seed,
            status,
            reasons,
        });
    }
    // Op checks that need the inputs (a pruning target against the model's config, say).
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    for p in &planned {
        if p.status == Status::Skipped {
            continue;
        }
        let step = &recipe.steps[p.index];
        let mut available = BTreeMap::new();
        for input in &step.inputs {
            match input.target {
                Ref::Source(j) => {
                    if sources[j].present {
                        available.insert(input.port.clone(), sources[j].artifact.clone());
                    }
                }
                Ref::Step(j) => {
                    let dep = planned.iter().find(|d| d.index == j).expect("planned");
                    if let Ok(Some(entry)) = store.get(&dep.key) {
                        available.insert(
                            input.port.clone(),
                            Artifact::dir(dep.kind, entry.data_dir()),
                        );
                    }
                }
            }
        }
        let op = registry.get(&step.op).expect("validated op");
        let at = |problem: &distillery_ops::Problem| {
            let span = problem
                .param
                .as_ref()
                .and_then(|n| step.param_spans.get(n))
                .unwrap_or(&step.span);
            Diagnostic::at(span, format!("step `{}`: {}", step.name, problem.message))
        };
        for problem in op.plan_check(&step.params, &available) {
            problems.push(at(&problem));
        }
        for problem in op.plan_warnings(&step.params, &available) {
            warnings.push(at(&problem).as_warning());
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    // A selected step whose input is neither cached nor going to run cannot start.
    let by_index: BTreeMap<usize, &PlannedStep> = planned.iter().map(|p| (p.index, p)).collect();
    for p in &planned {
        if p.status != Status::Run {
            continue;
        }
        for input in &recipe.steps[p.index].inputs {
            if let Ref::Step(j) = input.target {
                let dep = by_index[&j];
                if dep.status == Status::Skipped
                    && let Some(what) = store.modified_file(&dep.key)
                {
                    return Err(vec![Diagnostic::at(
                        &input.span,
                        format!("step `{}` needs `steps.{}`, whose cached output was edited in place ({what})", p.name, dep.name),
                    )
                    .help("run without --only/--from so that it is recomputed, or `--force` it")]);
                }
                if dep.status == Status::Skipped && !store.contains(&dep.key) {
                    return Err(vec![Diagnostic::at(
                        &input.span,
                        format!("step `{}` needs `steps.{}`, which is not in the cache and not selected", p.name, dep.name),
                    )
                    .help("run without --only/--from, or run that step first")]);
                }
            }
        }
    }
    Ok(Plan {
        warnings,
        sources,
        steps: planned,
    })
}
