//! The contract between the engine and an op: a typed signature (ports, output kind, parameter
//! schema with defaults) and a `run` that reads input directories and writes one output directory.
//! Nothing here knows about hashing, caches or recipes.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What flows along an edge of the step graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ArtifactKind {
    /// A Hugging Face checkpoint directory (or, as a source, a GGUF file).
    Model,
    /// Text documents.
    Dataset,
    /// Accumulated activation statistics.
    Stats,
    /// Importance scores per axis.
    Scores,
    /// JSON metrics and plots.
    Report,
    /// A frozen teacher's top-k log-probabilities over a dataset's packed sequences
    /// (`teacher_logits`).
    Logits,
}

impl ArtifactKind {
    pub const ALL: [ArtifactKind; 6] = [
        ArtifactKind::Model,
        ArtifactKind::Dataset,
        ArtifactKind::Stats,
        ArtifactKind::Scores,
        ArtifactKind::Report,
        ArtifactKind::Logits,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ArtifactKind::Model => "model",
            ArtifactKind::Dataset => "dataset",
            ArtifactKind::Stats => "stats",
            ArtifactKind::Scores => "scores",
            ArtifactKind::Report => "report",
            ArtifactKind::Logits => "logits",
        }
    }

    pub fn parse(s: &str) -> Option<ArtifactKind> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }
}

impl fmt::Display for ArtifactKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The type of a parameter. Integers also accept strings with a decimal suffix (`"127B"`,
/// `"2M"`, `"512K"`); floats accept integers.
#[derive(Clone, Debug, PartialEq)]
pub enum ParamType {
    Int,
    Float,
    Bool,
    Str,
    /// One of a fixed set of strings.
    Choice(&'static [&'static str]),
    IntList,
    FloatList,
    StrList,
    /// A list of `[a, b]` integer pairs (layer mappings).
    IntPairs,
}

impl ParamType {
    pub fn describe(&self) -> String {
        match self {
            ParamType::Int => {
                "an integer (suffixes K, M, B, T allowed in a string: \"127B\")".into()
            }
            ParamType::Float => "a number".into(),
            ParamType::Bool => "true or false".into(),
            ParamType::Str => "a string".into(),
            ParamType::Choice(c) => format!(
                "one of {}",
                c.iter()
                    .map(|s| format!("\"{s}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            ParamType::IntList => "a list of integers".into(),
            ParamType::FloatList => "a list of numbers".into(),
            ParamType::StrList => "a list of strings".into(),
            ParamType::IntPairs => "a list of [a, b] integer pairs".into(),
        }
    }
}

/// A parameter value after normalization.
#[derive(Clone, Debug, PartialEq)]
pub enum ParamValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    List(Vec<ParamValue>),
}

impl ParamValue {
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            ParamValue::Int(i) => (*i).into(),
            ParamValue::Float(x) => serde_json::Number::from_f64(*x)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            ParamValue::Bool(b) => (*b).into(),
            ParamValue::Str(s) => s.clone().into(),
            ParamValue::List(v) => v.iter().map(ParamValue::to_json).collect(),
        }
    }
}

impl fmt::Display for ParamValue {
    /// TOML-like rendering, with small and large floats in exponent form (`1e-4`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamValue::Int(i) => write!(f, "{i}"),
            ParamValue::Float(x) => {
                let a = x.abs();
                if a != 0.0 && !(1e-2..1e6).contains(&a) {
                    write!(f, "{x:e}")
                } else {
                    write!(f, "{x:?}")
                }
            }
            ParamValue::Bool(b) => write!(f, "{b}"),
            ParamValue::Str(s) => write!(f, "\"{s}\""),
            ParamValue::List(v) => {
                f.write_str("[")?;
                for (i, item) in v.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
        }
    }
}

/// What happens when a recipe leaves a parameter out.
#[derive(Clone, Debug, PartialEq)]
pub enum ParamDefault {
    /// The recipe must give it.
    Required,
    /// Absent means "not used" (an optional pruning axis, say).
    Optional,
    Value(ParamValue),
}

/// One parameter of an op.
#[derive(Clone, Debug)]
pub struct ParamSpec {
    pub name: &'static str,
    pub ty: ParamType,
    pub default: ParamDefault,
    pub doc: &'static str,
}

impl ParamSpec {
    pub fn required(name: &'static str, ty: ParamType, doc: &'static str) -> Self {
        ParamSpec {
            name,
            ty,
            default: ParamDefault::Required,
            doc,
        }
    }
    pub fn optional(name: &'static str, ty: ParamType, doc: &'static str) -> Self {
        ParamSpec {
            name,
            ty,
            default: ParamDefault::Optional,
            doc,
        }
    }
    pub fn with_default(
        name: &'static str,
        ty: ParamType,
        default: ParamValue,
        doc: &'static str,
    ) -> Self {
        ParamSpec {
            name,
            ty,
            default: ParamDefault::Value(default),
            doc,
        }
    }
}

/// An input port of an op.
#[derive(Clone, Debug)]
pub struct Port {
    pub name: &'static str,
    pub kind: ArtifactKind,
    pub optional: bool,
    pub doc: &'static str,
}

impl Port {
    pub fn new(name: &'static str, kind: ArtifactKind, doc: &'static str) -> Self {
        Port {
            name,
            kind,
            optional: false,
            doc,
        }
    }
    pub fn optional(name: &'static str, kind: ArtifactKind, doc: &'static str) -> Self {
        Port {
            name,
            kind,
            optional: true,
            doc,
        }
    }
}

/// The typed signature an op registers.
#[derive(Clone, Debug)]
pub struct OpSignature {
    pub name: &'static str,
    /// Bumped whenever the op's output for the same inputs and parameters changes.
    pub version: u32,
    pub doc: &'static str,
    pub inputs: Vec<Port>,
    pub output: ArtifactKind,
    pub params: Vec<ParamSpec>,
}

impl OpSignature {
    pub fn param(&self, name: &str) -> Option<&ParamSpec> {
        self.params.iter().find(|p| p.name == name)
    }
    pub fn port(&self, name: &str) -> Option<&Port> {
        self.inputs.iter().find(|p| p.name == name)
    }
}

/// Normalized parameters of one step: every parameter with a value or default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Params(pub BTreeMap<String, ParamValue>);

impl Params {
    pub fn get(&self, name: &str) -> Option<&ParamValue> {
        self.0.get(name)
    }
    pub fn int(&self, name: &str) -> Result<i64, OpError> {
        self.opt_int(name)?.ok_or_else(|| missing(name))
    }
    pub fn opt_int(&self, name: &str) -> Result<Option<i64>, OpError> {
        match self.0.get(name) {
            None => Ok(None),
            Some(ParamValue::Int(i)) => Ok(Some(*i)),
            Some(v) => Err(wrong(name, "an integer", v)),
        }
    }
    pub fn usize(&self, name: &str) -> Result<usize, OpError> {
        let v = self.int(name)?;
        usize::try_from(v).map_err(|_| {
            OpError::Invalid(format!("parameter `{name}` must not be negative (got {v})"))
        })
    }
    pub fn float(&self, name: &str) -> Result<f64, OpError> {
        match self.0.get(name) {
            None => Err(missing(name)),
            Some(ParamValue::Float(x)) => Ok(*x),
            Some(ParamValue::Int(i)) => Ok(*i as f64),
            Some(v) => Err(wrong(name, "a number", v)),
        }
    }
    pub fn bool(&self, name: &str) -> Result<bool, OpError> {
        match self.0.get(name) {
            None => Err(missing(name)),
            Some(ParamValue::Bool(b)) => Ok(*b),
            Some(v) => Err(wrong(name, "a boolean", v)),
        }
    }
    pub fn str(&self, name: &str) -> Result<&str, OpError> {
        self.opt_str(name)?.ok_or_else(|| missing(name))
    }
    pub fn opt_str(&self, name: &str) -> Result<Option<&str>, OpError> {
        match self.0.get(name) {
            None => Ok(None),
            Some(ParamValue::Str(s)) => Ok(Some(s)),
            Some(v) => Err(wrong(name, "a string", v)),
        }
    }
    pub fn int_list(&self, name: &str) -> Result<Option<Vec<i64>>, OpError> {
        match self.0.get(name) {
            None => Ok(None),
            Some(ParamValue::List(items)) => items
                .iter()
                .map(|v| match v {
                    ParamValue::Int(i) => Ok(*i),
                    v => Err(wrong(name, "a list of integers", v)),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(wrong(name, "a list of integers", v)),
        }
    }
    /// A list of strings; absent is empty.
    pub fn str_list(&self, name: &str) -> Result<Vec<String>, OpError> {
        match self.0.get(name) {
            None => Ok(Vec::new()),
            Some(ParamValue::List(items)) => items
                .iter()
                .map(|v| match v {
                    ParamValue::Str(s) => Ok(s.clone()),
                    v => Err(wrong(name, "a list of strings", v)),
                })
                .collect(),
            Some(v) => Err(wrong(name, "a list of strings", v)),
        }
    }
    /// A list of `[a, b]` integer pairs; absent is empty.
    pub fn int_pairs(&self, name: &str) -> Result<Vec<(i64, i64)>, OpError> {
        let expected = "a list of [a, b] integer pairs";
        match self.0.get(name) {
            None => Ok(Vec::new()),
            Some(ParamValue::List(items)) => items
                .iter()
                .map(|v| match v {
                    ParamValue::List(p) => match p.as_slice() {
                        [ParamValue::Int(a), ParamValue::Int(b)] => Ok((*a, *b)),
                        _ => Err(wrong(name, expected, v)),
                    },
                    v => Err(wrong(name, expected, v)),
                })
                .collect(),
            Some(v) => Err(wrong(name, expected, v)),
        }
    }
    /// A problem for each named integer parameter below 1 (counts, sizes, steps).
    pub fn require_positive(&self, names: &[&str]) -> Vec<Problem> {
        names
            .iter()
            .filter(|n| self.int(n).is_ok_and(|v| v < 1))
            .map(|n| Problem {
                param: Some(n.to_string()),
                message: format!("{n} must be at least 1"),
            })
            .collect()
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), v.to_json()))
                .collect(),
        )
    }
}

fn missing(name: &str) -> OpError {
    OpError::Invalid(format!(
        "parameter `{name}` is missing (the engine should have filled it)"
    ))
}

fn wrong(name: &str, expected: &str, got: &ParamValue) -> OpError {
    OpError::Invalid(format!("parameter `{name}` must be {expected}, got {got}"))
}

/// How an input artifact reaches an op.
#[derive(Clone, Debug)]
pub struct Artifact {
    pub kind: ArtifactKind,
    /// A directory (a step's output, a checkpoint directory) or a file (a GGUF source).
    pub path: PathBuf,
    /// For dataset sources: the files, in a stable order.
    pub files: Vec<PathBuf>,
    /// For dataset sources: `format` ("text" or "jsonl") and `field`.
    pub options: BTreeMap<String, String>,
}

impl Artifact {
    pub fn dir(kind: ArtifactKind, path: impl Into<PathBuf>) -> Self {
        Artifact {
            kind,
            path: path.into(),
            files: Vec::new(),
            options: BTreeMap::new(),
        }
    }
}

/// Where an op reports what it is doing. Calls are cheap; the engine throttles rendering.
pub trait Progress: Send + Sync {
    /// Starts (or restarts) a phase with a known amount of work in `unit`s.
    fn phase(&self, label: &str, total: u64, unit: &str);
    /// Work done so far in the current phase.
    fn set(&self, done: u64);
    /// Work done so far, with the latest figures worth a log line (`"loss 2.31"`).
    fn set_with(&self, done: u64, _detail: &str) {
        self.set(done);
    }
    /// A line for the log (a metric, a warning).
    fn note(&self, message: &str);
}

/// A progress sink that drops everything (tests, library use).
pub struct NoProgress;

impl Progress for NoProgress {
    fn phase(&self, _: &str, _: u64, _: &str) {}
    fn set(&self, _: u64) {}
    fn note(&self, _: &str) {}
}

/// A step feeding another's input, as [`Op::check_producer`] sees it.
pub struct Producer<'a> {
    /// Its name in the recipe.
    pub step: &'a str,
    /// Its op's name.
    pub op: &'a str,
    /// Its normalized parameters.
    pub params: &'a Params,
}

/// Everything a running op may use.
pub struct OpContext<'a> {
    /// The step's name in its recipe (for messages and provenance only).
    pub step: &'a str,
    pub inputs: BTreeMap<String, Artifact>,
    pub params: Params,
    /// The output directory: empty when `run` starts, committed as is when it returns Ok.
    pub out_dir: PathBuf,
    /// Survives interruptions of this very step (same key); for checkpoints to resume from.
    pub scratch_dir: PathBuf,
    /// The recipe's seed, given only to an op whose [`Op::uses_seed`] says it reads it (the seed is
    /// then part of the step's key); read it through [`OpContext::seed`].
    pub seed: Option<u64>,
    /// Threads the op may use.
    pub threads: usize,
    /// This process's place among the step's data-parallel ranks (one rank unless the op is
    /// [`Op::data_parallel`] and the step asks for more). Only the first rank's `out_dir` is
    /// committed; every rank shares `scratch_dir`.
    pub ranks: crate::parallel::Ranks,
    pub progress: &'a dyn Progress,
    /// Provenance to record in model outputs: recipe, step, key, tool version.
    pub provenance: serde_json::Value,
}

impl OpContext<'_> {
    pub fn input(&self, port: &str) -> Result<&Artifact, OpError> {
        self.inputs
            .get(port)
            .ok_or_else(|| OpError::Invalid(format!("input `{port}` is not wired")))
    }

    /// The recipe's seed. An op that reads it without declaring it in [`Op::uses_seed`] gets an
    /// error instead of a value, so a seed can never change a result its key does not name.
    pub fn seed(&self) -> Result<u64, OpError> {
        self.seed.ok_or_else(|| {
            OpError::Failed(format!(
                "step `{}` read the recipe seed, but its op does not declare that it uses it (a bug in distillery: the seed would be missing from its key)",
                self.step
            ))
        })
    }

    /// Writes one file of the output.
    pub fn write_output(&self, name: &str, body: impl AsRef<[u8]>) -> Result<(), OpError> {
        let p = self.out_dir.join(name);
        std::fs::write(&p, body).map_err(|e| OpError::io(&p, "write", e))
    }
}

/// A problem found before running: a parameter (when `param` is set) or the inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub param: Option<String>,
    pub message: String,
}

/// Why an op failed.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Failed(String),
    #[error("cannot {what} `{}`: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A data-parallel rank lost its peers (one died, or the collective library failed).
    #[error(transparent)]
    Collective(#[from] crate::parallel::CollectiveError),
    #[error(transparent)]
    Other(#[from] Box<dyn std::error::Error + Send + Sync>),
}

impl OpError {
    pub fn io(path: &Path, what: &'static str, source: std::io::Error) -> Self {
        OpError::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    }
}

/// An operation a recipe step can name.
pub trait Op: Send + Sync {
    fn signature(&self) -> OpSignature;

    /// Checks parameters beyond their types, before anything runs (a pruning target that is
    /// impossible, say).
    fn check(&self, _params: &Params) -> Vec<Problem> {
        Vec::new()
    }

    /// Checks which optional inputs the recipe wires (`wired`: port names), with the
    /// parameters, before anything runs (two ports of which exactly one is needed, say).
    fn check_inputs(&self, _params: &Params, _wired: &[&str]) -> Vec<Problem> {
        Vec::new()
    }

    /// Checks this step's parameters against those of a step feeding its port `port`
    /// (`producer`), when the recipe loads, before anything runs: settings that two steps must
    /// share (a cache and its reader, say).
    fn check_producer(&self, _params: &Params, _port: &str, _producer: &Producer) -> Vec<Problem> {
        Vec::new()
    }

    /// Checks against the inputs available when planning (sources, and outputs already in the
    /// cache): cheap reads only, such as a model's config.json, never its tensors.
    fn plan_check(&self, _params: &Params, _inputs: &BTreeMap<String, Artifact>) -> Vec<Problem> {
        Vec::new()
    }

    /// Whether the result with these parameters depends on the recipe seed (data order, shuffles,
    /// initializations, sampling, random baselines). When true the seed is part of the step's key
    /// and [`OpContext::seed`] gives it; when false the key leaves it out and the op cannot read it.
    fn uses_seed(&self, _params: &Params) -> bool {
        false
    }

    /// Like [`Op::plan_check`], for what is allowed but likely unwanted (a pruned shape that
    /// transformers 5 will not load, say): reported as warnings, the run goes on.
    fn plan_warnings(
        &self,
        _params: &Params,
        _inputs: &BTreeMap<String, Artifact>,
    ) -> Vec<Problem> {
        Vec::new()
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError>;

    /// Whether `run` can be one of several data-parallel ranks ([`OpContext::ranks`]): a step
    /// with `resources.tasks > 1` is refused for an op that cannot.
    fn data_parallel(&self) -> bool {
        false
    }

    /// Checks the parameters of a data-parallel op against its number of ranks (a batch that
    /// does not split evenly, say); asked only when `tasks > 1`.
    fn check_tasks(&self, _params: &Params, _tasks: usize) -> Vec<Problem> {
        Vec::new()
    }

    /// The output's shape and the cost of producing it, from the inputs' estimates (for
    /// `plan --estimate`); None when the op cannot say.
    fn estimate(&self, _params: &Params, _inputs: &BTreeMap<String, Estimate>) -> Option<Estimate> {
        None
    }

    /// A readable summary of an output directory, for `distillery show`.
    fn summarize(&self, _out_dir: &Path) -> Option<String> {
        None
    }
}

/// The ops a binary knows, by name.
#[derive(Clone, Default)]
pub struct OpRegistry {
    ops: BTreeMap<String, Arc<dyn Op>>,
    describe_source: Option<fn(&Artifact) -> Option<Estimate>>,
}

/// What planning can know about an artifact without computing it: a model's config and parameter
/// count, and the cost of producing it.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Estimate {
    /// config.json of a model artifact.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<u64>,
    /// Floating-point operations to produce it.
    pub flops: f64,
    /// Bytes that must be resident at once on one rank's device (weights, gradients, optimizer
    /// state), with one rank.
    pub memory_bytes: f64,
    /// The part of `memory_bytes` that data-parallel ranks shard (AdamW moments, ZeRO-1): each of
    /// W ranks holds 1/W of it.
    #[serde(skip_serializing_if = "is_zero")]
    pub optimizer_state_bytes: f64,
    /// The part of `memory_bytes` that is activations (at the recipe's micro-batch and
    /// sequence length, recomputation and loss chunks as set).
    #[serde(skip_serializing_if = "is_zero")]
    pub activation_bytes: f64,
    /// How the figures were derived, for the reader.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub basis: String,
    /// Which of the step's settings would shrink its memory, said when it does not fit.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub shrink_memory: String,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

impl OpRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register(&mut self, op: impl Op + 'static) -> &mut Self {
        let name = op.signature().name.to_string();
        self.ops.insert(name, Arc::new(op));
        self
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Op>> {
        self.ops.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.ops.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Arc<dyn Op>)> {
        self.ops.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// How to describe a source for estimates (reads a model's config, never its tensors).
    pub fn set_source_describer(&mut self, f: fn(&Artifact) -> Option<Estimate>) -> &mut Self {
        self.describe_source = Some(f);
        self
    }

    pub fn describe_source(&self, artifact: &Artifact) -> Option<Estimate> {
        self.describe_source.and_then(|f| f(artifact))
    }
}
