//! The plan: every step's key, whether it is cached, and if not, why it runs. The plan is data;
//! the CLI renders it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use distillery_cache::{CacheKey, Canon, KeyParts, SourceHasher, Store};
use distillery_ops::{Artifact, ArtifactKind, OpRegistry, ParamValue, Params};
use serde::{Deserialize, Serialize};

use crate::diag::Diagnostic;
use crate::graph::StepGraph;
use crate::recipe::{DatasetFormat, RECIPE_FORMAT, Recipe, Ref, SourceSpec};

/// A source with its files found and its content key computed.
#[derive(Clone, Debug)]
pub struct ResolvedSource {
    pub name: String,
    /// False for an optional source whose files are missing.
    pub present: bool,
    pub key: CacheKey,
    pub artifact: Artifact,
    pub files: Vec<(String, PathBuf)>,
}

/// Why a step runs.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Reason {
    /// Never computed for this recipe.
    New,
    Forced,
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
}

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

/// The canonical form of normalized parameters.
pub fn params_canon(params: &Params) -> Canon {
    fn one(v: &ParamValue) -> Canon {
        match v {
            ParamValue::Int(i) => Canon::Int(*i as i128),
            ParamValue::Float(x) => Canon::float(*x).unwrap_or(Canon::Null),
            ParamValue::Bool(b) => Canon::Bool(*b),
            ParamValue::Str(s) => Canon::Str(s.clone()),
            ParamValue::List(items) => Canon::List(items.iter().map(one).collect()),
        }
    }
    Canon::Map(params.0.iter().map(|(k, v)| (k.clone(), one(v))).collect())
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

/// Expands `${VAR}` and a leading `~/`, then resolves against the recipe's directory.
pub fn expand_path(raw: &str, base: &Path) -> Result<PathBuf, String> {
    let mut out = String::new();
    let mut rest = raw;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}') else {
            return Err(format!("unclosed `${{` in `{raw}`"));
        };
        let var = &rest[start + 2..start + end];
        match std::env::var(var) {
            Ok(v) if !v.is_empty() => out.push_str(&v),
            _ if var == "DISTILLERY_CACHE" => {
                out.push_str(&Store::default_root().to_string_lossy())
            }
            _ => return Err(format!("environment variable `{var}` is not set")),
        }
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    if let Some(tail) = out.strip_prefix("~/")
        && let Some(home) = std::env::var_os("HOME")
    {
        out = Path::new(&home).join(tail).to_string_lossy().to_string();
    }
    let p = PathBuf::from(out);
    Ok(if p.is_absolute() { p } else { base.join(p) })
}

/// Finds each source's files and computes its content key.
pub fn resolve_sources(
    recipe: &Recipe,
    hasher: &SourceHasher,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<Vec<ResolvedSource>, Vec<Diagnostic>> {
    let base = recipe.dir();
    let mut out = Vec::new();
    let mut diags = Vec::new();
    for src in &recipe.sources {
        if src.optional && !source_exists(src, &base) {
            out.push(ResolvedSource {
                name: src.name.clone(),
                present: false,
                key: CacheKey::of_bytes(b"absent optional source"),
                artifact: Artifact::dir(src.kind, base.clone()),
                files: Vec::new(),
            });
            continue;
        }
        let (artifact, files, decl) = match &src.spec {
            SourceSpec::Model { path, span } => {
                let p = match expand_path(path, &base) {
                    Ok(p) => p,
                    Err(e) => {
                        diags.push(Diagnostic::at(span, e));
                        continue;
                    }
                };
                let files = if p.is_dir() {
                    // Names relative to the checkpoint directory; links (hub snapshots) followed.
                    match distillery_cache::sources::walk_source_files(&p) {
                        Ok(f) => f,
                        Err(e) => {
                            diags.push(
                                Diagnostic::at(span, format!("model source `{}`: {e}", src.name))
                                    .help("a model directory holds files (or links to files) only"),
                            );
                            continue;
                        }
                    }
                } else if p.is_file() {
                    // One file (a GGUF): its content and format count, not its name.
                    let ext = p
                        .extension()
                        .map(|e| e.to_string_lossy().to_ascii_lowercase())
                        .unwrap_or_default();
                    vec![(format!("model.{ext}"), p.clone())]
                } else {
                    diags.push(
                        Diagnostic::at(
                            span,
                            format!(
                                "model source `{}`: `{}` does not exist",
                                src.name,
                                p.display()
                            ),
                        )
                        .help("point path at a Hugging Face checkpoint directory or a .gguf file"),
                    );
                    continue;
                };
                let decl = Canon::Map([("kind".to_string(), Canon::Str("model".into()))].into());
                (Artifact::dir(ArtifactKind::Model, p), files, decl)
            }
            SourceSpec::Dataset {
                files: patterns,
                exclude,
                format,
            } => {
                // Path → its name in the key: relative to the directory its pattern starts
                // from, and with several patterns, the pattern's index in front.
                let mut found: BTreeMap<PathBuf, String> = BTreeMap::new();
                let mut failed = false;
                for (index, (pattern, span)) in patterns.iter().enumerate() {
                    let full = match expand_path(pattern, &base) {
                        Ok(p) => p,
                        Err(e) => {
                            diags.push(Diagnostic::at(span, e));
                            failed = true;
                            continue;
                        }
                    };
                    let matches: Vec<PathBuf> = match glob::glob(&full.to_string_lossy()) {
                        Ok(paths) => paths
                            .filter_map(Result::ok)
                            .filter(|p| p.is_file())
                            .collect(),
                        Err(e) => {
                            diags.push(Diagnostic::at(
                                span,
                                format!("invalid glob `{pattern}`: {e}"),
                            ));
                            failed = true;
                            continue;
                        }
                    };
                    let before_exclude = matches.len();
                    let matches: Vec<PathBuf> = matches
                        .into_iter()
                        .filter(|p| {
                            let name = p
                                .file_name()
                                .map(|n| n.to_string_lossy().to_string())
                                .unwrap_or_default();
                            !exclude.iter().any(|x| {
                                glob::Pattern::new(x)
                                    .is_ok_and(|pat| pat.matches(&name) || pat.matches_path(p))
                            })
                        })
                        .collect();
                    if matches.is_empty() && before_exclude > 0 {
                        diags.push(
                            Diagnostic::at(
                                span,
                                format!(
                                    "`{pattern}` matches {before_exclude} files, but `exclude` removed them all"
                                ),
                            )
                            .help("narrow `exclude` (its patterns match file names or whole paths)"),
                        );
                        failed = true;
                    } else if matches.is_empty() {
                        diags.push(
                            Diagnostic::at(
                                span,
                                format!(
                                    "`{pattern}` matches no files (looked for `{}`)",
                                    full.display()
                                ),
                            )
                            .help("check the path; relative globs start at the recipe's directory"),
                        );
                        failed = true;
                    }
                    let root = glob_root(&full);
                    for m in matches {
                        let rel: Vec<String> = m
                            .strip_prefix(&root)
                            .unwrap_or(&m)
                            .components()
                            .map(|c| c.as_os_str().to_string_lossy().to_string())
                            .collect();
                        let name = if patterns.len() > 1 {
                            format!("{index}/{}", rel.join("/"))
                        } else {
                            rel.join("/")
                        };
                        found.entry(m).or_insert(name);
                    }
                }
                if failed {
                    continue;
                }
                // Where the set lives (the checkout, the cache's downloads) is never part of the
                // key; the names inside it are.
                let files: Vec<PathBuf> = found.keys().cloned().collect();
                let named: Vec<(String, PathBuf)> =
                    found.into_iter().map(|(p, n)| (n, p)).collect();
                let mut options = BTreeMap::new();
                let mut decl = BTreeMap::new();
                decl.insert("kind".to_string(), Canon::Str("dataset".into()));
                match format {
                    DatasetFormat::Text => {
                        options.insert("format".to_string(), "text".to_string());
                        decl.insert("format".into(), Canon::Str("text".into()));
                    }
                    DatasetFormat::Jsonl { field } | DatasetFormat::Chat { field } => {
                        let name = match format {
                            DatasetFormat::Chat { .. } => "chat",
                            _ => "jsonl",
                        };
                        options.insert("format".to_string(), name.to_string());
                        options.insert("field".to_string(), field.clone());
                        decl.insert("format".into(), Canon::Str(name.into()));
                        decl.insert("field".into(), Canon::Str(field.clone()));
                    }
                }
                let artifact = Artifact {
                    kind: ArtifactKind::Dataset,
                    path: base.clone(),
                    files: files.clone(),
                    options,
                };
                (artifact, named, Canon::Map(decl))
            }
        };
        let name = src.name.clone();
        match hasher.key(&decl, &files, &mut |done, total| {
            progress(&name, done, total)
        }) {
            Ok(key) => out.push(ResolvedSource {
                name: src.name.clone(),
                present: true,
                key,
                artifact,
                files,
            }),
            Err(e) => diags.push(Diagnostic::at(
                &src.span,
                format!("cannot read source `{}`: {e}", src.name),
            )),
        }
    }
    if diags.is_empty() {
        Ok(out)
    } else {
        Err(diags)
    }
}

/// The directory a glob starts from: its leading components without a wildcard (for a pattern
/// without wildcards, the file's own directory).
fn glob_root(pattern: &Path) -> PathBuf {
    let root: PathBuf = pattern
        .components()
        .take_while(|c| !c.as_os_str().to_string_lossy().contains(['*', '?', '[']))
        .collect();
    match root.parent() {
        Some(dir) if root.is_file() => dir.to_path_buf(),
        _ => root,
    }
}

fn source_exists(src: &crate::recipe::SourceDecl, base: &Path) -> bool {
    match &src.spec {
        SourceSpec::Model { path, .. } => expand_path(path, base).is_ok_and(|p| p.exists()),
        SourceSpec::Dataset { files, .. } => files.iter().all(|(pattern, _)| {
            expand_path(pattern, base)
                .ok()
                .and_then(|p| glob::glob(&p.to_string_lossy()).ok())
                .is_some_and(|mut g| g.any(|e| e.is_ok_and(|p| p.is_file())))
        }),
    }
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

    let mut keys: Vec<Option<CacheKey>> = vec![None; recipe.steps.len()];
    let mut planned = Vec::new();
    for &i in &graph.order {
        let step = &recipe.steps[i];
        let op = registry.get(&step.op).expect("validated op");
        let sig = op.signature();
        let params = params_canon(&step.params);
        let mut inputs = BTreeMap::new();
        for input in &step.inputs {
            let key = match input.target {
                Ref::Source(j) if !sources[j].present => continue,
                Ref::Source(j) => sources[j].key,
                Ref::Step(j) => keys[j].expect("topological order"),
            };
            inputs.insert(input.port.clone(), key);
        }
        let seed = op.uses_seed(&step.params).then_some(recipe.seed);
        let key = KeyParts {
            recipe_format: RECIPE_FORMAT,
            op: &step.op,
            op_version: sig.version,
            params: &params,
            inputs: &inputs,
            seed,
        }
        .key();
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
        } else if let Some(what) = modified {
            (Status::Run, vec![Reason::EntryModified { what }])
        } else if cached {
            (Status::Cached, Vec::new())
        } else {
            (
                Status::Run,
                explain(recipe, store, i, key, &sig.version, &params, &inputs, seed),
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

#[allow(clippy::too_many_arguments)]
fn explain(
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
