//! The recipe language: a TOML file of `[recipe]`, `[sources.NAME]` and `[steps.NAME]`, checked
//! against the ops' signatures into a typed [`Recipe`]. Every problem is a [`Diagnostic`] that
//! points at the text that caused it; all of them are collected, not just the first.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use distillery_ops::{
    ArtifactKind, OpRegistry, OpSignature, ParamDefault, ParamType, ParamValue, Params,
};

use crate::diag::{Diagnostic, SourceMap, Span, closest, did_you_mean};
use crate::slurm::settings::{ExecutorKind, ExecutorSettings};
use crate::tree::{self, Node, Table, Value};

/// Version of the recipe format; part of every key.
pub const RECIPE_FORMAT: u32 = 1;

/// A recipe that parsed and validated.
#[derive(Clone, Debug)]
pub struct Recipe {
    pub path: PathBuf,
    pub name: String,
    pub description: String,
    pub seed: u64,
    /// `[executor]`: where the steps run by default (never part of a key).
    pub executor: ExecutorSettings,
    pub sources: Vec<SourceDecl>,
    pub steps: Vec<StepDecl>,
    pub map: SourceMap,
}

#[derive(Clone, Debug, PartialEq)]
pub enum DatasetFormat {
    Text,
    Jsonl {
        field: String,
    },
    /// JSONL conversations (`field`: a list of `{role, content}` messages), rendered by the
    /// model's chat template, the loss on assistant tokens only.
    Chat {
        field: String,
    },
}

#[derive(Clone, Debug)]
pub enum SourceSpec {
    /// A Hugging Face checkpoint directory or a GGUF file.
    Model { path: String, span: Span },
    /// Text files by glob patterns (relative to the recipe).
    Dataset {
        files: Vec<(String, Span)>,
        exclude: Vec<String>,
        format: DatasetFormat,
    },
}

#[derive(Clone, Debug)]
pub struct SourceDecl {
    pub name: String,
    pub span: Span,
    pub kind: ArtifactKind,
    pub spec: SourceSpec,
    /// When its files are missing, the source is absent instead of an error: inputs wired to it
    /// are left out (only optional ports may take it).
    pub optional: bool,
}

/// What an input port is wired to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ref {
    Source(usize),
    Step(usize),
}

#[derive(Clone, Debug)]
pub struct InputDecl {
    pub port: String,
    pub target: Ref,
    /// The reference as written (`steps.prune`).
    pub written: String,
    pub span: Span,
}

/// Scheduling hints: never part of a key, but for `tasks` (the data-parallel world changes the
/// result's bits, so a step's key names it when it is more than one).
#[derive(Clone, Debug, Default)]
pub struct Resources {
    pub threads: Option<usize>,
    /// GPUs the step may use: estimates, and `sbatch --gpus` under the Slurm executor. With
    /// `tasks`, one per task.
    pub gpus: Option<usize>,
    /// Data-parallel ranks (Slurm's tasks): processes that each train on a share of every global
    /// batch, for ops that can. In the key when more than 1.
    pub tasks: Option<usize>,
    /// Nodes the tasks spread over (Slurm's `--nodes`); 1 for the local executor.
    pub nodes: Option<usize>,
    pub devices: Vec<String>,
    pub memory: Option<u64>,
    /// The step's time limit in seconds: its Slurm job's `--time` (the local executor has none).
    pub time: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct StepDecl {
    pub name: String,
    pub span: Span,
    pub op: String,
    pub inputs: Vec<InputDecl>,
    /// Normalized, with defaults filled in.
    pub params: Params,
    pub param_spans: BTreeMap<String, Span>,
    pub resources: Resources,
}

impl Recipe {
    pub fn step(&self, name: &str) -> Option<(usize, &StepDecl)> {
        self.steps.iter().enumerate().find(|(_, s)| s.name == name)
    }

    pub fn dir(&self) -> PathBuf {
        self.path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    /// `recipe.toml` → `recipe.lock`.
    pub fn lock_path(&self) -> PathBuf {
        self.path.with_extension("lock")
    }

    pub fn ref_name(&self, r: Ref) -> String {
        match r {
            Ref::Source(i) => format!("sources.{}", self.sources[i].name),
            Ref::Step(i) => format!("steps.{}", self.steps[i].name),
        }
    }
}

/// A recipe that did not validate: every problem found, and the texts to render them against.
#[derive(Debug)]
pub struct RecipeErrors {
    pub diagnostics: Vec<Diagnostic>,
    pub map: SourceMap,
}

impl RecipeErrors {
    pub fn render(&self) -> String {
        let mut out = String::new();
        for d in &self.diagnostics {
            out.push_str(&d.render(&self.map));
            out.push('\n');
        }
        let n = self.diagnostics.len();
        out.push_str(&format!(
            "the recipe has {n} error{}\n",
            if n == 1 { "" } else { "s" }
        ));
        out
    }
}

/// Reads, overrides and validates a recipe file.
pub fn load(
    path: &Path,
    overrides: &[String],
    registry: &OpRegistry,
) -> Result<Recipe, RecipeErrors> {
    let mut map = SourceMap::default();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            return Err(RecipeErrors {
                diagnostics: vec![Diagnostic::new(
                    format!("cannot read recipe `{}`: {e}", path.display()),
                    None,
                )],
                map,
            });
        }
    };
    let mut root = match tree::parse_file(path, text, &mut map) {
        Ok(t) => t,
        Err(d) => {
            return Err(RecipeErrors {
                diagnostics: vec![d],
                map,
            });
        }
    };
    let mut diags = Vec::new();
    for (i, arg) in overrides.iter().enumerate() {
        if let Err(d) = tree::apply_override(&mut root, i + 1, arg, &mut map) {
            diags.push(d);
        }
    }
    let recipe = Checker {
        registry,
        diags: &mut diags,
    }
    .recipe(path, &root, map.clone());
    match recipe {
        Some(r) if diags.is_empty() => Ok(r),
        _ => Err(RecipeErrors {
            diagnostics: diags,
            map,
        }),
    }
}

struct Checker<'a> {
    registry: &'a OpRegistry,
    diags: &'a mut Vec<Diagnostic>,
}

fn file_span(map: &SourceMap) -> Span {
    Span {
        source: 0,
        range: 0..map.texts.first().map(|t| t.text.len().min(1)).unwrap_or(0),
    }
}

impl Checker<'_> {
    fn err(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    fn unknown_keys(&mut self, table: &Table, allowed: &[&str], what: &str) {
        for (key, _) in &table.entries {
            if !allowed.contains(&key.name.as_str()) {
                let help = did_you_mean(&key.name, allowed.iter().copied())
                    .unwrap_or_else(|| format!("allowed here: {}", allowed.join(", ")));
                self.err(
                    Diagnostic::at(&key.span, format!("unknown key `{}` in {what}", key.name))
                        .help(help),
                );
            }
        }
    }

    fn as_table<'n>(&mut self, node: &'n Node, what: &str) -> Option<&'n Table> {
        match &node.value {
            Value::Table(t) => Some(t),
            other => {
                self.err(Diagnostic::at(
                    &node.span,
                    format!("{what} must be a table, found {}", other.type_name()),
                ));
                None
            }
        }
    }

    fn as_str<'n>(&mut self, node: &'n Node, what: &str) -> Option<&'n str> {
        match &node.value {
            Value::Str(s) => Some(s),
            other => {
                self.err(Diagnostic::at(
                    &node.span,
                    format!("{what} must be a string, found {}", other.type_name()),
                ));
                None
            }
        }
    }

    fn recipe(&mut self, path: &Path, root: &Table, map: SourceMap) -> Option<Recipe> {
        self.unknown_keys(
            root,
            &["recipe", "sources", "steps", "executor"],
            "the recipe's top level",
        );
        let mut name = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let mut description = String::new();
        let mut seed = 0u64;
        if let Some(node) = root.get("recipe")
            && let Some(t) = self.as_table(node, "[recipe]")
        {
            self.unknown_keys(t, &["name", "description", "seed"], "[recipe]");
            if let Some(n) = t.get("name").and_then(|n| self.as_str(n, "recipe.name")) {
                name = n.to_string();
            }
            if let Some(n) = t
                .get("description")
                .and_then(|n| self.as_str(n, "recipe.description"))
            {
                description = n.to_string();
            }
            if let Some(n) = t.get("seed") {
                match n.value {
                    Value::Int(i) if i >= 0 => seed = i as u64,
                    _ => self.err(Diagnostic::at(
                        &n.span,
                        "recipe.seed must be a non-negative integer",
                    )),
                }
            }
        }

        let mut sources = Vec::new();
        // Declared but invalid (already reported): references to them are not errors of their own.
        let mut broken_sources = std::collections::HashSet::new();
        if let Some(node) = root.get("sources")
            && let Some(t) = self.as_table(node, "[sources]")
        {
            for (key, node) in &t.entries {
                match self.source(&key.name, &key.span, node) {
                    Some(s) => sources.push(s),
                    None => {
                        broken_sources.insert(key.name.clone());
                    }
                }
            }
        }

        let mut step_tables = Vec::new();
        match root.get("steps") {
            Some(node) => {
                if let Some(t) = self.as_table(node, "[steps]") {
                    for (key, node) in &t.entries {
                        if let Some(st) = self.as_table(node, &format!("steps.{}", key.name)) {
                            step_tables.push((key.clone(), st));
                        }
                    }
                }
            }
            None => self.err(
                Diagnostic::new("the recipe has no steps", Some(file_span(&map)))
                    .help("add a [steps.NAME] table with op = \"...\""),
            ),
        }

        let source_index: HashMap<&str, usize> = sources
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let step_index: HashMap<&str, usize> = step_tables
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.name.as_str(), i))
            .collect();
        // Output kinds, for wiring checks (None: the op is unknown and already reported).
        let step_kinds: Vec<Option<ArtifactKind>> = step_tables
            .iter()
            .map(|(_, t)| match t.get("op").map(|n| &n.value) {
                Some(Value::Str(op)) => self.registry.get(op).map(|o| o.signature().output),
                _ => None,
            })
            .collect();

        let mut steps = Vec::new();
        for (key, table) in &step_tables {
            let ctx = WireCtx {
                sources: &sources,
                broken_sources: &broken_sources,
                source_index: &source_index,
                step_index: &step_index,
                step_kinds: &step_kinds,
                step_names: step_tables.iter().map(|(k, _)| k.name.as_str()).collect(),
            };
            if let Some(s) = self.step(key, table, &ctx) {
                steps.push(s);
            }
        }
        let executor = match root.get("executor") {
            Some(node) => self.executor(node),
            None => ExecutorSettings::default(),
        };
        if !self.diags.is_empty() {
            return None;
        }
        self.check_producers(&steps);
        if !self.diags.is_empty() {
            return None;
        }
        Some(Recipe {
            path: path.to_path_buf(),
            name,
            description,
            seed,
            executor,
            sources,
            steps,
            map,
        })
    }

    /// Each step's parameters against those of the steps feeding it ([`Op::check_producer`]),
    /// reported at the step's parameter (else at the input).
    fn check_producers(&mut self, steps: &[StepDecl]) {
        for s in steps {
            let Some(op) = self.registry.get(&s.op) else {
                continue;
            };
            for input in &s.inputs {
                let Ref::Step(j) = input.target else { continue };
                let producer = distillery_ops::Producer {
                    step: &steps[j].name,
                    op: &steps[j].op,
                    params: &steps[j].params,
                };
                for problem in op.check_producer(&s.params, &input.port, &producer) {
                    let span = problem
                        .param
                        .as_ref()
                        .and_then(|p| s.param_spans.get(p))
                        .unwrap_or(&input.span)
                        .clone();
                    self.err(Diagnostic::at(
                        &span,
                        format!("step `{}`: {}", s.name, problem.message),
                    ));
                }
            }
        }
    }

    fn source(&mut self, name: &str, key_span: &Span, node: &Node) -> Option<SourceDecl> {
        let what = format!("sources.{name}");
        let t = self.as_table(node, &what)?;
        let kind_node = match t.get("kind") {
            Some(k) => k,
            None => {
                self.err(
                    Diagnostic::at(key_span, format!("source `{name}` has no `kind`"))
                        .help("add kind = \"model\" (with path = ...) or kind = \"dataset\" (with files = ...)"),
                );
                return None;
            }
        };
        let kind = self.as_str(kind_node, &format!("{what}.kind"))?;
        let optional = match t.get("optional") {
            None => false,
            Some(Node {
                value: Value::Bool(b),
                ..
            }) => *b,
            Some(n) => {
                self.err(Diagnostic::at(
                    &n.span,
                    format!("{what}.optional must be true or false"),
                ));
                false
            }
        };
        match kind {
            "model" => {
                self.unknown_keys(
                    t,
                    &["kind", "path", "description"],
                    &format!("model source `{name}`"),
                );
                let Some(p) = t.get("path") else {
                    self.err(
                        Diagnostic::at(key_span, format!("model source `{name}` has no `path`"))
                            .help("path = \"a Hugging Face checkpoint directory or a .gguf file\""),
                    );
                    return None;
                };
                let path = self.as_str(p, &format!("{what}.path"))?.to_string();
                Some(SourceDecl {
                    name: name.to_string(),
                    optional,
                    span: key_span.clone(),
                    kind: ArtifactKind::Model,
                    spec: SourceSpec::Model {
                        path,
                        span: p.span.clone(),
                    },
                })
            }
            "dataset" => {
                self.unknown_keys(
                    t,
                    &[
                        "kind",
                        "files",
                        "exclude",
                        "format",
                        "field",
                        "description",
                        "optional",
                    ],
                    &format!("dataset source `{name}`"),
                );
                let files = match t.get("files") {
                    None => {
                        self.err(
                            Diagnostic::at(
                                key_span,
                                format!("dataset source `{name}` has no `files`"),
                            )
                            .help("files = \"data/*.txt\" (a glob or a list of globs)"),
                        );
                        return None;
                    }
                    Some(n) => self.str_list(n, &format!("{what}.files"))?,
                };
                let exclude = match t.get("exclude") {
                    None => Vec::new(),
                    Some(n) => self
                        .str_list(n, &format!("{what}.exclude"))?
                        .into_iter()
                        .map(|(s, _)| s)
                        .collect(),
                };
                let format_name = match t.get("format") {
                    Some(n) => {
                        let f = self.as_str(n, &format!("{what}.format"))?;
                        if f != "text" && f != "jsonl" && f != "chat" {
                            self.err(
                                Diagnostic::at(&n.span, format!("unknown dataset format `{f}`"))
                                    .help("expected \"text\", \"jsonl\" or \"chat\""),
                            );
                            return None;
                        }
                        f.to_string()
                    }
                    None if files.iter().all(|(f, _)| f.ends_with(".jsonl")) => "jsonl".into(),
                    None => "text".into(),
                };
                let mut field = |default: &str| -> Option<String> {
                    Some(match t.get("field") {
                        Some(n) => self.as_str(n, &format!("{what}.field"))?.to_string(),
                        None => default.to_string(),
                    })
                };
                let format = match format_name.as_str() {
                    "jsonl" => DatasetFormat::Jsonl {
                        field: field("text")?,
                    },
                    "chat" => DatasetFormat::Chat {
                        field: field("messages")?,
                    },
                    _ => {
                        if let Some(n) = t.get("field") {
                            self.err(
                                Diagnostic::at(&n.span, "`field` only applies to JSONL datasets")
                                    .help("set format = \"jsonl\" (or \"chat\") or remove `field`"),
                            );
                        }
                        DatasetFormat::Text
                    }
                };
                Some(SourceDecl {
                    name: name.to_string(),
                    optional,
                    span: key_span.clone(),
                    kind: ArtifactKind::Dataset,
                    spec: SourceSpec::Dataset {
                        files,
                        exclude,
                        format,
                    },
                })
            }
            other => {
                let help = did_you_mean(other, ["model", "dataset"])
                    .unwrap_or_else(|| "expected \"model\" or \"dataset\"".into());
                self.err(
                    Diagnostic::at(&kind_node.span, format!("unknown source kind `{other}`"))
                        .help(help),
                );
                None
            }
        }
    }

    fn str_list(&mut self, node: &Node, what: &str) -> Option<Vec<(String, Span)>> {
        match &node.value {
            Value::Str(s) => Some(vec![(s.clone(), node.span.clone())]),
            Value::Array(items) => {
                let mut out = Vec::new();
                for item in items {
                    out.push((self.as_str(item, what)?.to_string(), item.span.clone()));
                }
                if out.is_empty() {
                    self.err(Diagnostic::at(&node.span, format!("{what} is empty")));
                    return None;
                }
                Some(out)
            }
            other => {
                self.err(Diagnostic::at(
                    &node.span,
                    format!(
                        "{what} must be a string or a list of strings, found {}",
                        other.type_name()
                    ),
                ));
                None
            }
        }
    }

    fn step(&mut self, key: &tree::Key, t: &Table, w: &WireCtx) -> Option<StepDecl> {
        let name = &key.name;
        self.unknown_keys(
            t,
            &["op", "inputs", "params", "resources", "description"],
            &format!("step `{name}`"),
        );
        let Some(op_node) = t.get("op") else {
            self.err(
                Diagnostic::at(&key.span, format!("step `{name}` has no `op`")).help(format!(
                    "add op = \"...\"; known ops: {}",
                    self.registry.names().collect::<Vec<_>>().join(", ")
                )),
            );
            return None;
        };
        let op_name = self.as_str(op_node, &format!("steps.{name}.op"))?;
        let Some(op) = self.registry.get(op_name) else {
            let names: Vec<&str> = self.registry.names().collect();
            let help = did_you_mean(op_name, names.iter().copied())
                .unwrap_or_else(|| format!("known ops: {}", names.join(", ")));
            self.err(Diagnostic::at(&op_node.span, format!("unknown op `{op_name}`")).help(help));
            return None;
        };
        let sig = op.signature();
        let before = self.diags.len();

        let inputs = self.inputs(name, &key.span, t.get("inputs"), &sig, w);
        let (params, param_spans) = self.params(name, &key.span, t.get("params"), &sig);
        let resources = self.resources(t.get("resources"));
        self.check_tasks(name, op.as_ref(), &params, &resources, t.get("resources"));
        if self.diags.len() == before {
            for problem in op.check(&params) {
                let span = problem
                    .param
                    .as_ref()
                    .and_then(|p| param_spans.get(p))
                    .cloned()
                    .unwrap_or_else(|| {
                        t.get("params")
                            .map(|n| n.span.clone())
                            .unwrap_or(key.span.clone())
                    });
                self.err(Diagnostic::at(
                    &span,
                    format!("step `{name}`: {}", problem.message),
                ));
            }
            if let Some(inputs) = &inputs {
                let wired: Vec<&str> = inputs.iter().map(|i| i.port.as_str()).collect();
                for problem in op.check_inputs(&params, &wired) {
                    let span = problem
                        .param
                        .as_ref()
                        .and_then(|p| param_spans.get(p))
                        .or_else(|| t.get("inputs").map(|n| &n.span))
                        .cloned()
                        .unwrap_or(key.span.clone());
                    self.err(Diagnostic::at(
                        &span,
                        format!("step `{name}`: {}", problem.message),
                    ));
                }
            }
        }
        if self.diags.len() != before {
            return None;
        }
        Some(StepDecl {
            name: name.clone(),
            span: key.span.clone(),
            op: op_name.to_string(),
            inputs: inputs?,
            params,
            param_spans,
            resources,
        })
    }

    fn inputs(
        &mut self,
        step: &str,
        step_span: &Span,
        node: Option<&Node>,
        sig: &OpSignature,
        w: &WireCtx,
    ) -> Option<Vec<InputDecl>> {
        let empty = Table::default();
        let table = match node {
            Some(n) => self.as_table(n, &format!("steps.{step}.inputs"))?,
            None => &empty,
        };
        let mut out = Vec::new();
        let mut ok = true;
        for (key, node) in &table.entries {
            let Some(port) = sig.port(&key.name) else {
                let ports: Vec<&str> = sig.inputs.iter().map(|p| p.name).collect();
                let help = did_you_mean(&key.name, ports.iter().copied())
                    .unwrap_or_else(|| format!("op `{}` takes: {}", sig.name, describe_ports(sig)));
                self.err(
                    Diagnostic::at(
                        &key.span,
                        format!("op `{}` has no input port `{}`", sig.name, key.name),
                    )
                    .help(help),
                );
                ok = false;
                continue;
            };
            let Some(written) = self.as_str(node, &format!("steps.{step}.inputs.{}", key.name))
            else {
                ok = false;
                continue;
            };
            let Some((target, kind)) = self.resolve_ref(written, &node.span, w) else {
                ok = false;
                continue;
            };
            if target == Ref::Step(w.step_index[step]) {
                self.err(Diagnostic::at(
                    &node.span,
                    format!("step `{step}` takes its own output as input"),
                ));
                ok = false;
                continue;
            }
            if let Ref::Source(j) = target
                && w.sources[j].optional
                && !port.optional
            {
                self.err(
                    Diagnostic::at(
                        &node.span,
                        format!(
                            "`{written}` is optional, but input `{}` of op `{}` is required",
                            port.name, sig.name
                        ),
                    )
                    .help("make the source required, or wire it to an optional input"),
                );
                ok = false;
                continue;
            }
            if let Some(kind) = kind
                && kind != port.kind
            {
                self.err(
                    Diagnostic::at(
                        &node.span,
                        format!(
                            "`{written}` is a {kind}, but input `{}` of op `{}` takes a {}",
                            port.name, sig.name, port.kind
                        ),
                    )
                    .help(format!("wire a {} here", port.kind)),
                );
                ok = false;
                continue;
            }
            out.push(InputDecl {
                port: key.name.clone(),
                target,
                written: written.to_string(),
                span: node.span.clone(),
            });
        }
        for port in &sig.inputs {
            if !port.optional && table.get(port.name).is_none() {
                let span = node
                    .map(|n| n.span.clone())
                    .unwrap_or_else(|| step_span.clone());
                self.err(
                    Diagnostic::at(
                        &span,
                        format!(
                            "step `{step}` is missing input `{}` ({})",
                            port.name, port.kind
                        ),
                    )
                    .help(format!(
                        "inputs = {{ {} = \"sources.NAME\" or \"steps.NAME\" }}",
                        port.name
                    )),
                );
                ok = false;
            }
        }
        ok.then_some(out)
    }

    fn resolve_ref(
        &mut self,
        written: &str,
        span: &Span,
        w: &WireCtx,
    ) -> Option<(Ref, Option<ArtifactKind>)> {
        let (ns, name) = match written.split_once('.') {
            Some((ns @ ("sources" | "steps"), name)) => (ns, name),
            _ => {
                let guess = if w.source_index.contains_key(written) {
                    format!("did you mean `sources.{written}`?")
                } else if w.step_index.contains_key(written) {
                    format!("did you mean `steps.{written}`?")
                } else {
                    "write \"sources.NAME\" or \"steps.NAME\"".into()
                };
                self.err(
                    Diagnostic::at(span, format!("`{written}` is not a reference")).help(guess),
                );
                return None;
            }
        };
        if ns == "sources" {
            match w.source_index.get(name) {
                Some(&i) => Some((Ref::Source(i), Some(w.sources[i].kind))),
                None if w.broken_sources.contains(name) => None,
                None => {
                    let help = closest(name, w.sources.iter().map(|s| s.name.as_str()))
                        .map(|c| format!("did you mean `sources.{c}`?"))
                        .unwrap_or_else(|| "declare it under [sources.NAME]".into());
                    self.err(Diagnostic::at(span, format!("no source named `{name}`")).help(help));
                    None
                }
            }
        } else {
            match w.step_index.get(name) {
                Some(&i) => Some((Ref::Step(i), w.step_kinds[i])),
                None => {
                    let help = closest(name, w.step_names.iter().copied())
                        .map(|c| format!("did you mean `steps.{c}`?"))
                        .unwrap_or_else(|| "declare it under [steps.NAME]".into());
                    self.err(Diagnostic::at(span, format!("no step named `{name}`")).help(help));
                    None
                }
            }
        }
    }

    fn params(
        &mut self,
        step: &str,
        step_span: &Span,
        node: Option<&Node>,
        sig: &OpSignature,
    ) -> (Params, BTreeMap<String, Span>) {
        let mut params = BTreeMap::new();
        let mut spans = BTreeMap::new();
        let empty = Table::default();
        let table = match node {
            Some(n) => self
                .as_table(n, &format!("steps.{step}.params"))
                .unwrap_or(&empty),
            None => &empty,
        };
        for (key, value) in &table.entries {
            let Some(spec) = sig.param(&key.name) else {
                let names: Vec<&str> = sig.params.iter().map(|p| p.name).collect();
                let help = did_you_mean(&key.name, names.iter().copied()).unwrap_or_else(|| {
                    if names.is_empty() {
                        format!("op `{}` takes no parameters", sig.name)
                    } else {
                        format!("op `{}` takes: {}", sig.name, names.join(", "))
                    }
                });
                self.err(
                    Diagnostic::at(
                        &key.span,
                        format!("unknown parameter `{}` for op `{}`", key.name, sig.name),
                    )
                    .help(help),
                );
                continue;
            };
            match normalize(&spec.ty, value) {
                Ok(v) => {
                    params.insert(key.name.clone(), v);
                    spans.insert(key.name.clone(), value.span.clone());
                }
                Err(d) => self.err(d.with_context(&key.name, &spec.ty)),
            }
        }
        for spec in &sig.params {
            if params.contains_key(spec.name) {
                continue;
            }
            match &spec.default {
                ParamDefault::Value(v) => {
                    params.insert(spec.name.to_string(), v.clone());
                }
                ParamDefault::Optional => {}
                ParamDefault::Required => {
                    let span = node
                        .map(|n| n.span.clone())
                        .unwrap_or_else(|| step_span.clone());
                    self.err(
                        Diagnostic::at(
                            &span,
                            format!("step `{step}` is missing parameter `{}`", spec.name),
                        )
                        .help(format!(
                            "{}: {}; {}",
                            spec.name,
                            spec.ty.describe(),
                            spec.doc
                        )),
                    );
                }
            }
        }
        (Params(params), spans)
    }

    /// `[executor]`: kind, partition, account, time, sbatch_args, max_requeue.
    fn executor(&mut self, node: &Node) -> ExecutorSettings {
        let mut e = ExecutorSettings::default();
        let Some(t) = self.as_table(node, "[executor]") else {
            return e;
        };
        self.unknown_keys(
            t,
            &[
                "kind",
                "partition",
                "account",
                "time",
                "sbatch_args",
                "max_requeue",
            ],
            "[executor]",
        );
        if let Some(n) = t.get("kind")
            && let Some(k) = self.as_str(n, "executor.kind")
        {
            match ExecutorKind::parse(k) {
                Some(k) => e.kind = Some(k),
                None => self.err(
                    Diagnostic::at(&n.span, format!("unknown executor `{k}`"))
                        .help("expected \"local\" or \"slurm\""),
                ),
            }
        }
        if let Some(n) = t.get("partition") {
            e.partition = self.as_str(n, "executor.partition").map(String::from);
        }
        if let Some(n) = t.get("account") {
            e.account = self.as_str(n, "executor.account").map(String::from);
        }
        if let Some(n) = t.get("time")
            && let Some(s) = self.as_str(n, "executor.time")
        {
            match crate::slurm::settings::parse_time(s) {
                Some(secs) => e.time = Some(secs),
                None => self.err(
                    Diagnostic::at(&n.span, format!("`{s}` is not a time limit"))
                        .help(crate::slurm::settings::TIME_HELP),
                ),
            }
        }
        if let Some(n) = t.get("sbatch_args") {
            e.sbatch_args = self
                .str_list(n, "executor.sbatch_args")
                .map(|l| l.into_iter().map(|(s, _)| s).collect());
        }
        if let Some(n) = t.get("max_requeue") {
            match n.value {
                Value::Int(i) if (0..=100).contains(&i) => e.max_requeue = Some(i as u32),
                _ => self.err(Diagnostic::at(
                    &n.span,
                    "executor.max_requeue must be an integer from 0 to 100",
                )),
            }
        }
        e
    }

    /// Data-parallel settings that cannot work: several tasks for an op that runs as one
    /// process, nodes that do not divide the tasks, GPUs that are not one per task.
    fn check_tasks(
        &mut self,
        step: &str,
        op: &dyn distillery_ops::Op,
        params: &Params,
        r: &Resources,
        node: Option<&Node>,
    ) {
        let Some(Value::Table(t)) = node.map(|n| &n.value) else {
            return;
        };
        let span = |field: &str| t.get(field).map(|n| n.span.clone());
        let tasks = r.tasks.unwrap_or(1);
        if tasks > 1 && !op.data_parallel() {
            let parallel: Vec<&str> = self
                .registry
                .names()
                .filter(|n| self.registry.get(n).is_some_and(|o| o.data_parallel()))
                .collect();
            self.err(
                Diagnostic::at(
                    &span("tasks").expect("tasks was given"),
                    format!(
                        "step `{step}`: op `{}` runs as one process; it cannot use {tasks} tasks",
                        op.signature().name
                    ),
                )
                .help(format!(
                    "remove resources.tasks; ops that run data-parallel: {}",
                    parallel.join(", ")
                )),
            );
        }
        if tasks > 1 && op.data_parallel() {
            for problem in op.check_tasks(params, tasks) {
                self.err(
                    Diagnostic::at(
                        &span("tasks").expect("tasks was given"),
                        format!("step `{step}`: {}", problem.message),
                    )
                    .help(format!(
                        "make global_batch / micro_batch a multiple of {tasks}, or use fewer tasks"
                    )),
                );
            }
        }
        if let (Some(nodes), Some(s)) = (r.nodes, span("nodes"))
            && (nodes > tasks || !tasks.is_multiple_of(nodes))
        {
            self.err(
                Diagnostic::at(
                    &s,
                    format!(
                        "step `{step}`: {tasks} task(s) do not spread evenly over {nodes} nodes"
                    ),
                )
                .help("make resources.tasks a multiple of resources.nodes"),
            );
        }
        if tasks > 1
            && let Some(gpus) = r.gpus
            && gpus != tasks
        {
            self.err(
                Diagnostic::at(
                    &span("gpus").expect("gpus was given"),
                    format!(
                        "step `{step}`: {gpus} GPUs for {tasks} tasks; each task (rank) drives one GPU"
                    ),
                )
                .help(format!("set resources.gpus = {tasks}, or leave it out on the CPU")),
            );
        }
    }

    fn resources(&mut self, node: Option<&Node>) -> Resources {
        let mut r = Resources::default();
        let Some(node) = node else { return r };
        let Some(t) = self.as_table(node, "resources") else {
            return r;
        };
        self.unknown_keys(
            t,
            &[
                "threads", "devices", "memory", "gpus", "time", "tasks", "nodes",
            ],
            "resources",
        );
        if let Some(n) = t.get("time") {
            match &n.value {
                Value::Str(s) => match crate::slurm::settings::parse_time(s) {
                    Some(secs) => r.time = Some(secs),
                    None => self.err(
                        Diagnostic::at(&n.span, format!("`{s}` is not a time limit"))
                            .help(crate::slurm::settings::TIME_HELP),
                    ),
                },
                _ => self.err(
                    Diagnostic::at(&n.span, "resources.time must be a string")
                        .help(crate::slurm::settings::TIME_HELP),
                ),
            }
        }
        if let Some(n) = t.get("gpus") {
            match n.value {
                Value::Int(i) if i > 0 => r.gpus = Some(i as usize),
                _ => self.err(Diagnostic::at(
                    &n.span,
                    "resources.gpus must be a positive integer",
                )),
            }
        }
        for (field, slot) in [("tasks", &mut r.tasks), ("nodes", &mut r.nodes)] {
            if let Some(n) = t.get(field) {
                match n.value {
                    Value::Int(i) if i > 0 => *slot = Some(i as usize),
                    _ => self.err(Diagnostic::at(
                        &n.span,
                        format!("resources.{field} must be a positive integer"),
                    )),
                }
            }
        }
        if let Some(n) = t.get("threads") {
            match n.value {
                Value::Int(i) if i > 0 => r.threads = Some(i as usize),
                _ => self.err(Diagnostic::at(
                    &n.span,
                    "resources.threads must be a positive integer",
                )),
            }
        }
        if let Some(n) = t.get("devices")
            && let Some(list) = self.str_list(n, "resources.devices")
        {
            r.devices = list.into_iter().map(|(s, _)| s).collect();
        }
        if let Some(n) = t.get("memory") {
            match &n.value {
                Value::Str(s) => match parse_bytes(s) {
                    Some(b) => r.memory = Some(b),
                    None => self.err(
                        Diagnostic::at(&n.span, format!("`{s}` is not a size"))
                            .help("write e.g. \"80GB\""),
                    ),
                },
                Value::Int(i) if *i > 0 => r.memory = Some(*i as u64),
                _ => self.err(Diagnostic::at(
                    &n.span,
                    "resources.memory must be a size like \"80GB\"",
                )),
            }
        }
        r
    }
}

struct WireCtx<'a> {
    sources: &'a [SourceDecl],
    broken_sources: &'a std::collections::HashSet<String>,
    source_index: &'a HashMap<&'a str, usize>,
    step_index: &'a HashMap<&'a str, usize>,
    step_kinds: &'a [Option<ArtifactKind>],
    step_names: Vec<&'a str>,
}

fn describe_ports(sig: &OpSignature) -> String {
    if sig.inputs.is_empty() {
        return "no inputs".into();
    }
    sig.inputs
        .iter()
        .map(|p| format!("{} ({})", p.name, p.kind))
        .collect::<Vec<_>>()
        .join(", ")
}

trait WithContext {
    fn with_context(self, name: &str, ty: &ParamType) -> Diagnostic;
}

impl WithContext for Diagnostic {
    fn with_context(mut self, name: &str, ty: &ParamType) -> Diagnostic {
        self.message = format!("parameter `{name}`: {}", self.message);
        if self.help.is_none() {
            self.help = Some(format!("expected {}", ty.describe()));
        }
        self
    }
}

/// Parses a count with an optional decimal suffix: `4096`, `"127B"`, `"1.5M"`, `"2_000"`.
pub fn parse_count(s: &str) -> Option<i64> {
    let s = s.trim().replace('_', "");
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1e3),
        'M' => (&s[..s.len() - 1], 1e6),
        'B' | 'G' => (&s[..s.len() - 1], 1e9),
        'T' => (&s[..s.len() - 1], 1e12),
        _ => (s.as_str(), 1.0),
    };
    if mult == 1.0 {
        return num.parse().ok();
    }
    if let Ok(i) = num.parse::<i64>() {
        return i.checked_mul(mult as i64);
    }
    let x: f64 = num.parse().ok()?;
    let v = x * mult;
    (v.fract() == 0.0 && v.is_finite() && v.abs() < 9.2e18).then_some(v as i64)
}

/// Parses a byte size: `"80GB"`, `"512MiB"`, `"1.5T"`.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let x: f64 = num.trim().parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0f64.powi(4),
        _ => return None,
    };
    (x >= 0.0).then_some((x * mult) as u64)
}

fn type_error(node: &Node, expected: &str) -> Diagnostic {
    Diagnostic::at(
        &node.span,
        format!("expected {expected}, found {}", node.value.type_name()),
    )
}

/// Brings a parameter value to its canonical form for its declared type.
pub fn normalize(ty: &ParamType, node: &Node) -> Result<ParamValue, Diagnostic> {
    let int = |node: &Node| -> Result<i64, Diagnostic> {
        match &node.value {
            Value::Int(i) => Ok(*i),
            Value::Str(s) => parse_count(s).ok_or_else(|| {
                Diagnostic::at(&node.span, format!("`{s}` is not an integer"))
                    .help("write 4096 or \"127B\" (K, M, B, T)")
            }),
            Value::Float(x) if x.fract() == 0.0 && x.is_finite() => Err(Diagnostic::at(
                &node.span,
                format!("expected an integer, found the float {x}"),
            )
            .help(format!("write {}", *x as i64))),
            _ => Err(type_error(node, "an integer")),
        }
    };
    let float = |node: &Node| -> Result<f64, Diagnostic> {
        let x = match &node.value {
            Value::Float(x) => *x,
            Value::Int(i) => *i as f64,
            Value::Str(s) => s
                .trim()
                .parse::<f64>()
                .map_err(|_| Diagnostic::at(&node.span, format!("`{s}` is not a number")))?,
            _ => return Err(type_error(node, "a number")),
        };
        if !x.is_finite() {
            return Err(Diagnostic::at(&node.span, "expected a finite number"));
        }
        Ok(if x == 0.0 { 0.0 } else { x })
    };
    let string = |node: &Node| -> Result<String, Diagnostic> {
        match &node.value {
            Value::Str(s) => Ok(s.clone()),
            _ => Err(type_error(node, "a string")),
        }
    };
    let list = |node: &Node| -> Result<Vec<Node>, Diagnostic> {
        match &node.value {
            Value::Array(items) => Ok(items.clone()),
            _ => Err(type_error(node, "a list")),
        }
    };
    Ok(match ty {
        ParamType::Int => ParamValue::Int(int(node)?),
        ParamType::Float => ParamValue::Float(float(node)?),
        ParamType::Bool => match node.value {
            Value::Bool(b) => ParamValue::Bool(b),
            _ => return Err(type_error(node, "true or false")),
        },
        ParamType::Str => ParamValue::Str(string(node)?),
        ParamType::Choice(choices) => {
            let s = string(node)?;
            if !choices.contains(&s.as_str()) {
                let help =
                    did_you_mean(&s, choices.iter().copied()).unwrap_or_else(|| ty.describe());
                return Err(
                    Diagnostic::at(&node.span, format!("`{s}` is not a valid choice")).help(help),
                );
            }
            ParamValue::Str(s)
        }
        ParamType::IntList => ParamValue::List(
            list(node)?
                .iter()
                .map(|n| int(n).map(ParamValue::Int))
                .collect::<Result<_, _>>()?,
        ),
        ParamType::FloatList => ParamValue::List(
            list(node)?
                .iter()
                .map(|n| float(n).map(ParamValue::Float))
                .collect::<Result<_, _>>()?,
        ),
        ParamType::StrList => ParamValue::List(
            list(node)?
                .iter()
                .map(|n| string(n).map(ParamValue::Str))
                .collect::<Result<_, _>>()?,
        ),
        ParamType::IntPairs => ParamValue::List(
            list(node)?
                .iter()
                .map(|pair| {
                    let items = list(pair)?;
                    if items.len() != 2 {
                        return Err(Diagnostic::at(&pair.span, "expected a pair [a, b]"));
                    }
                    Ok(ParamValue::List(vec![
                        ParamValue::Int(int(&items[0])?),
                        ParamValue::Int(int(&items[1])?),
                    ]))
                })
                .collect::<Result<_, _>>()?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_sizes() {
        assert_eq!(parse_count("127B"), Some(127_000_000_000));
        assert_eq!(parse_count("1.5M"), Some(1_500_000));
        assert_eq!(parse_count("2_000"), Some(2000));
        assert_eq!(parse_count("512K"), Some(512_000));
        assert_eq!(parse_count("1.2345K"), None);
        assert_eq!(parse_count("x"), None);
        assert_eq!(parse_bytes("80GB"), Some(80_000_000_000));
        assert_eq!(parse_bytes("1MiB"), Some(1 << 20));
        assert_eq!(parse_bytes("lots"), None);
    }
}
