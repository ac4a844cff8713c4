//! The training loop shared by `train` (teacher correction, fine-tuning) and `distill`: AdamW with
//! decoupled weight decay, linear warmup then cosine decay, clipping by the global gradient norm,
//! gradient accumulation to a global batch, a token budget, checkpoints in the step's scratch
//! directory (resumed after an interruption, bit-identical on the CPU), and a clean stop on a
//! non-finite loss or gradient.

use std::path::Path;
use std::time::Instant;

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use serde_json::json;

use crate::data::{Packed, pack_with_mask, tokenized};
use crate::model::checkpoint::{LoadedModel, SaveOptions, load_model};
use crate::model::config::ModelConfig;
use crate::model::decoder::{Compute, Decoder, tokens_tensor};
use crate::model::weights::DType;
use crate::op::{OpContext, OpError, ParamSpec, ParamType, ParamValue, Params, Problem};
use crate::runtime::{self, Backend as B, TrainBackend as TB};
use crate::stats::{read_vectors, write_vectors};

/// What a training op optimizes: the model, plus the learned projections `[student_hidden,
/// teacher_hidden]` of intermediate-state losses (empty for plain training). Only the model is
/// saved as the output; the projections live in the resumable checkpoints.
#[derive(Module, Debug)]
pub struct Student<B: burn::tensor::backend::Backend> {
    pub model: Decoder<B>,
    pub projections: Vec<Param<Tensor<B, 2>>>,
}

impl<Bk: burn::tensor::backend::Backend> Student<Bk> {
    /// A student without projections.
    pub fn plain(model: Decoder<Bk>) -> Student<Bk> {
        Student {
            model,
            projections: Vec::new(),
        }
    }
}

/// A learned projection's shape `[rows, cols]` and starting weights (row-major).
pub struct ProjectionInit {
    pub shape: [usize; 2],
    pub weights: Vec<f32>,
}

/// A selection matrix `[rows, cols]` sending row `i` to column `map[i]`, or to column `i` without
/// a map (a rectangular identity). Projections start there: the cosine loss is undefined at zero,
/// and a pruned student's hidden channel `i` is its teacher's channel `map[i]`.
pub fn selection_projection(rows: usize, cols: usize, map: Option<&[usize]>) -> Vec<f32> {
    let mut w = vec![0f32; rows * cols];
    for i in 0..rows {
        let j = map.map_or(i, |m| m[i]);
        if j < cols {
            w[i * cols + j] = 1.0;
        }
    }
    w
}

/// Hyperparameters of a run, from the step's parameters.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub tokens: u64,
    pub seq_len: usize,
    pub micro_batch: usize,
    pub global_batch: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub clip: f64,
    pub checkpoint_every: usize,
    pub val_every: usize,
    pub val_sequences: usize,
    /// The dtype matmuls run in; weights and optimizer state stay f32.
    pub compute: Compute,
}

/// The parameters every training op takes.
pub fn params() -> Vec<ParamSpec> {
    use ParamValue::{Float, Int as I};
    vec![
        ParamSpec::with_default(
            "tokens",
            ParamType::Int,
            I(1_000_000),
            "training budget in tokens (\"2M\"); steps follow",
        ),
        ParamSpec::with_default("seq_len", ParamType::Int, I(512), "tokens per sequence"),
        ParamSpec::with_default(
            "micro_batch",
            ParamType::Int,
            I(4),
            "sequences per forward/backward",
        ),
        ParamSpec::with_default(
            "global_batch",
            ParamType::Int,
            I(16),
            "sequences per optimizer step (accumulated)",
        ),
        ParamSpec::with_default("lr", ParamType::Float, Float(1e-4), "peak learning rate"),
        ParamSpec::with_default(
            "min_lr",
            ParamType::Float,
            Float(1e-5),
            "learning rate at the end of the cosine decay",
        ),
        ParamSpec::with_default("warmup_steps", ParamType::Int, I(10), "linear warmup steps"),
        ParamSpec::with_default("beta1", ParamType::Float, Float(0.9), "Adam beta1"),
        ParamSpec::with_default(
            "beta2",
            ParamType::Float,
            Float(0.95),
            "Adam beta2 (0.95 in the Minitron runs)",
        ),
        ParamSpec::with_default("eps", ParamType::Float, Float(1e-8), "Adam epsilon"),
        ParamSpec::with_default(
            "weight_decay",
            ParamType::Float,
            Float(0.1),
            "decoupled weight decay",
        ),
        ParamSpec::with_default(
            "clip",
            ParamType::Float,
            Float(1.0),
            "clip the global gradient norm to this (0: off)",
        ),
        ParamSpec::with_default(
            "checkpoint_every",
            ParamType::Int,
            I(20),
            "steps between resumable checkpoints",
        ),
        ParamSpec::with_default(
            "val_every",
            ParamType::Int,
            I(0),
            "steps between validation losses (0: at the end only)",
        ),
        ParamSpec::with_default(
            "val_sequences",
            ParamType::Int,
            I(8),
            "held-out sequences for validation loss",
        ),
        ParamSpec::with_default(
            "compute",
            ParamType::Choice(&Compute::NAMES),
            ParamValue::Str("float32".into()),
            "dtype the matmuls run in; bfloat16 keeps f32 master weights and optimizer state (for CUDA)",
        ),
        ParamSpec::with_default(
            "dtype",
            ParamType::Choice(&["same", "float32", "bfloat16", "float16"]),
            ParamValue::Str("same".into()),
            "dtype of the written checkpoint",
        ),
    ]
}

impl TrainConfig {
    pub fn from_params(p: &Params) -> Result<TrainConfig, OpError> {
        Ok(TrainConfig {
            tokens: p.int("tokens")?.max(0) as u64,
            seq_len: p.usize("seq_len")?,
            micro_batch: p.usize("micro_batch")?,
            global_batch: p.usize("global_batch")?,
            lr: p.float("lr")?,
            min_lr: p.float("min_lr")?,
            warmup_steps: p.usize("warmup_steps")?,
            beta1: p.float("beta1")?,
            beta2: p.float("beta2")?,
            eps: p.float("eps")?,
            weight_decay: p.float("weight_decay")?,
            clip: p.float("clip")?,
            checkpoint_every: p.usize("checkpoint_every")?,
            val_every: p.usize("val_every")?,
            val_sequences: p.usize("val_sequences")?,
            compute: Compute::from_name(p.str("compute")?).unwrap_or_default(),
        })
    }

    pub fn steps(&self) -> usize {
        let per_step = (self.seq_len * self.global_batch) as u64;
        self.tokens.div_ceil(per_step.max(1)).max(1) as usize
    }

    /// Linear warmup to the peak, then cosine decay to `min_lr` at the last step.
    pub fn lr_at(&self, step: usize) -> f64 {
        let total = self.steps();
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
        let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
        self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// Parameter checks shared by the training ops.
pub fn check(p: &Params) -> Vec<Problem> {
    let mut out = p.require_positive(&["seq_len", "micro_batch", "global_batch", "tokens"]);
    if let (Ok(m), Ok(g)) = (p.int("micro_batch"), p.int("global_batch"))
        && m > 0
        && g % m != 0
    {
        out.push(Problem {
            param: Some("global_batch".into()),
            message: format!("global_batch {g} must be a multiple of micro_batch {m}"),
        });
    }
    for n in ["beta1", "beta2"] {
        if p.float(n).is_ok_and(|v| !(0.0..1.0).contains(&v)) {
            out.push(Problem {
                param: Some(n.into()),
                message: format!("{n} must be in [0, 1)"),
            });
        }
    }
    out
}

/// Per-parameter names (module paths) in visiting order.
struct Names {
    path: Vec<String>,
    names: Vec<String>,
}

impl<Bk: burn::tensor::backend::Backend> ModuleVisitor<Bk> for Names {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, _: &Param<Tensor<Bk, D>>) {
        self.names.push(self.path.join("."));
    }
}

/// Squared norm of each parameter's gradient, in visiting order.
struct GradNorms<'a> {
    grads: &'a burn::optim::GradientsParams,
    sq: Vec<f64>,
}

impl ModuleVisitor<TB> for GradNorms<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<TB, D>>) {
        let s = match self.grads.get::<B, D>(param.id) {
            Some(g) => g
                .powf_scalar(2.0)
                .sum()
                .into_data()
                .convert::<f64>()
                .to_vec::<f64>()
                .unwrap()[0],
            None => 0.0,
        };
        self.sq.push(s);
    }
}

/// AdamW state: first and second moments per parameter, flattened, in visiting order.
pub struct AdamState {
    pub step: usize,
    pub m: Vec<Tensor<B, 1>>,
    pub v: Vec<Tensor<B, 1>>,
}

struct AdamStep<'a> {
    grads: &'a mut burn::optim::GradientsParams,
    state: &'a mut AdamState,
    cfg: &'a TrainConfig,
    lr: f64,
    scale: f64,
    index: usize,
}

impl ModuleMapper<TB> for AdamStep<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<TB, D>>) -> Param<Tensor<TB, D>> {
        let (id, tensor, mapper) = param.consume();
        let i = self.index;
        self.index += 1;
        let Some(g) = self.grads.remove::<B, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let dims = g.dims();
        let n: usize = dims.iter().product();
        let g = g.reshape([n]) * self.scale;
        let p = tensor.inner().reshape([n]);
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        if self.state.m.len() <= i {
            self.state.m.push(Tensor::zeros([n], &g.device()));
            self.state.v.push(Tensor::zeros([n], &g.device()));
        }
        let m = self.state.m[i].clone() * b1 + g.clone() * (1.0 - b1);
        let v = self.state.v[i].clone() * b2 + g.powf_scalar(2.0) * (1.0 - b2);
        let t = self.state.step as i32 + 1;
        let mhat = m.clone() / (1.0 - b1.powi(t));
        let vhat = v.clone() / (1.0 - b2.powi(t));
        let update = mhat / (vhat.sqrt() + self.cfg.eps) + p.clone() * self.cfg.weight_decay;
        let p = p - update * self.lr;
        self.state.m[i] = m;
        self.state.v[i] = v;
        let p: Tensor<B, D> = p.reshape(dims);
        Param::from_mapped_value(id, Tensor::from_inner(p).require_grad(), mapper)
    }
}

/// What a training op optimizes.
pub trait Objective {
    /// Loss of the student on `[batch, seq]` inputs with `[batch, seq]` next-token targets,
    /// averaged over the targets `trained` marks (`[batch, seq]`; chat data's assistant tokens),
    /// or over all of them when it is `None`.
    fn loss(
        &self,
        student: &Student<TB>,
        input: &[u32],
        targets: &[u32],
        trained: Option<&[bool]>,
        batch: usize,
    ) -> Tensor<TB, 1>;
    fn name(&self) -> &'static str;
    /// Asked only once the loss on `input` (`[batch, seq]`) came out non-finite: a cause outside
    /// the student (a frozen teacher whose forward overflows), said as what to do, or `None`.
    fn non_finite_cause(&self, _input: &[u32], _batch: usize) -> Option<String> {
        None
    }
    /// The learned projections this objective uses (`[student_hidden, teacher_hidden]`), in the
    /// order `loss` reads `student.projections`.
    fn projections(&self) -> Vec<ProjectionInit> {
        Vec::new()
    }
}

/// Plain next-token cross-entropy.
pub struct CrossEntropy;

/// Mean next-token cross-entropy of `logits [batch, seq, vocab]` against `targets [batch * seq]`
/// over the targets `trained` marks (all when `None`); 0, with no gradient, when it marks none.
pub fn cross_entropy<Bk: burn::tensor::backend::Backend>(
    logits: Tensor<Bk, 3>,
    targets: &[u32],
    trained: Option<&[bool]>,
) -> Tensor<Bk, 1> {
    let [b, s, v] = logits.dims();
    let device = logits.device();
    let logits = logits.reshape([b * s, v]);
    let kept: Vec<i64> = match trained {
        Some(mask) => targets
            .iter()
            .zip(mask)
            .filter(|(_, m)| **m)
            .map(|(&t, _)| t as i64)
            .collect(),
        None => targets.iter().map(|&x| x as i64).collect(),
    };
    let Some(kept_logits) = trained_rows(logits.clone(), trained) else {
        // Zero, on the graph: backward gives zero gradients rather than none.
        return (logits.sum() * 0.0).reshape([1]);
    };
    let logits = kept_logits;
    let n = kept.len();
    let t = Tensor::<Bk, 2, Int>::from_data(TensorData::new(kept, [n, 1]), &device);
    log_softmax(logits, 1).gather(1, t).mean().neg()
}

/// The rows `[tokens, width]` the loss counts: all (`trained` is `None`), or those it marks;
/// `None` when it marks none.
pub fn trained_rows<Bk: burn::tensor::backend::Backend>(
    rows: Tensor<Bk, 2>,
    trained: Option<&[bool]>,
) -> Option<Tensor<Bk, 2>> {
    let Some(mask) = trained else {
        return Some(rows);
    };
    let kept: Vec<i64> = mask
        .iter()
        .enumerate()
        .filter(|(_, m)| **m)
        .map(|(i, _)| i as i64)
        .collect();
    if kept.is_empty() {
        return None;
    }
    if kept.len() == mask.len() {
        return Some(rows);
    }
    let device = rows.device();
    let n = kept.len();
    Some(rows.select(
        0,
        Tensor::<Bk, 1, Int>::from_data(TensorData::new(kept, [n]), &device),
    ))
}

impl Objective for CrossEntropy {
    fn loss(
        &self,
        student: &Student<TB>,
        input: &[u32],
        targets: &[u32],
        trained: Option<&[bool]>,
        batch: usize,
    ) -> Tensor<TB, 1> {
        let logits = student
            .model
            .forward(tokens_tensor::<TB>(input, batch, &runtime::device()));
        cross_entropy(logits, targets, trained)
    }
    fn name(&self) -> &'static str {
        "cross_entropy"
    }
}

fn dtype_for(ctx: &OpContext, model: &LoadedModel) -> Result<DType, OpError> {
    Ok(match ctx.params.str("dtype")? {
        "same" => model.weights.dominant_dtype(),
        other => DType::from_torch_name(other).unwrap(),
    })
}

/// Writes a decoder as a checkpoint directory.
fn save_decoder(
    dir: &Path,
    model: &Decoder<B>,
    config: &ModelConfig,
    dtype: DType,
    src: &LoadedModel,
    provenance: &serde_json::Value,
) -> Result<(), OpError> {
    let tensors = model.named_tensors(config);
    let map: std::collections::HashMap<String, Vec<f32>> =
        tensors.into_iter().map(|(n, _, v)| (n, v)).collect();
    let opts = SaveOptions {
        dtype,
        shard_bytes: 5_000_000_000,
        tokenizer_json: src.tokenizer_json.as_deref(),
        tokenizer_files: &src.tokenizer_files,
        generation_config: src.generation_config.as_ref(),
        tokenizer_config: src.tokenizer_config.as_ref(),
        provenance,
    };
    crate::model::save_checkpoint(dir, config, &opts, |n| {
        map.get(n)
            .cloned()
            .ok_or_else(|| crate::model::ModelError::Checkpoint {
                path: dir.to_path_buf(),
                why: format!("no tensor {n}"),
            })
    })?;
    Ok(())
}

fn save_state(dir: &Path, state: &AdamState) -> Result<(), OpError> {
    let mut v = std::collections::BTreeMap::new();
    for (i, (m, s)) in state.m.iter().zip(&state.v).enumerate() {
        v.insert(
            format!("m.{i:05}"),
            m.clone().into_data().to_vec::<f32>().unwrap(),
        );
        v.insert(
            format!("v.{i:05}"),
            s.clone().into_data().to_vec::<f32>().unwrap(),
        );
    }
    write_vectors(&dir.join("optimizer.safetensors"), &v)
}

fn load_state(dir: &Path, step: usize) -> Result<AdamState, OpError> {
    let v = read_vectors(&dir.join("optimizer.safetensors"))?;
    let device = runtime::device();
    let mut state = AdamState {
        step,
        m: Vec::new(),
        v: Vec::new(),
    };
    for (k, x) in v {
        let t = Tensor::<B, 1>::from_data(TensorData::new(x.clone(), [x.len()]), &device);
        if k.starts_with("m.") {
            state.m.push(t);
        } else {
            state.v.push(t);
        }
    }
    Ok(state)
}

fn save_projections(dir: &Path, student: &Student<TB>) -> Result<(), OpError> {
    let v: std::collections::BTreeMap<String, Vec<f32>> = student
        .projections
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                format!("p.{i:05}"),
                p.val().inner().into_data().to_vec::<f32>().unwrap(),
            )
        })
        .collect();
    write_vectors(&dir.join("projections.safetensors"), &v)
}

/// The projections: from a checkpoint directory when given, else their starting weights.
fn projections(
    inits: &[ProjectionInit],
    checkpoint: Option<&Path>,
) -> Result<Vec<Param<Tensor<TB, 2>>>, OpError> {
    let saved = match checkpoint {
        Some(dir) => Some(read_vectors(&dir.join("projections.safetensors"))?),
        None => None,
    };
    let device = runtime::device();
    inits
        .iter()
        .enumerate()
        .map(|(i, init)| {
            let [r, c] = init.shape;
            let w = match &saved {
                Some(v) => v
                    .get(&format!("p.{i:05}"))
                    .filter(|w| w.len() == r * c)
                    .cloned()
                    .ok_or_else(|| {
                        OpError::Invalid(format!(
                            "the checkpoint has no projection {i} of shape [{r}, {c}]"
                        ))
                    })?,
                None => init.weights.clone(),
            };
            Ok(Param::from_tensor(
                Tensor::<TB, 2>::from_data(TensorData::new(w, [r, c]), &device).require_grad(),
            ))
        })
        .collect()
}

/// Mean loss over held-out sequences (no gradients).
fn validation_loss(
    objective: &dyn Objective,
    model: &Student<TB>,
    val: &Packed,
    micro: usize,
) -> f64 {
    if val.tokens.is_empty() {
        return f64::NAN;
    }
    let mut total = 0.0;
    let mut n = 0;
    for chunk in val.chunks(micro) {
        let (input, targets, trained) = split(&chunk);
        // Weighted by sequences, or by marked targets in chat data (none: no weight).
        let weight = match &trained {
            None => chunk.tokens.len(),
            Some(_) => chunk.trained_targets(),
        };
        if weight == 0 {
            continue;
        }
        let l = objective.loss(
            model,
            &input,
            &targets,
            trained.as_deref(),
            chunk.tokens.len(),
        );
        total += l.into_data().convert::<f64>().to_vec::<f64>().unwrap()[0] * weight as f64;
        n += weight;
    }
    if n == 0 {
        return f64::NAN;
    }
    total / n as f64
}

/// What one optimizer step did.
pub struct StepOutcome {
    pub student: Student<TB>,
    /// The loss summed over micro-batches (each scaled by 1 / micro-batches): the batch's mean.
    pub loss: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens predicted in the step.
    pub tokens: u64,
}

/// A loss or gradient that is NaN or infinite; `param` indexes the module's parameters in
/// visiting order.
pub struct NonFinite {
    pub what: &'static str,
    pub param: Option<usize>,
    /// What the objective found wrong besides the student (a frozen teacher's logits).
    pub cause: Option<String>,
}

/// One optimizer step: loss and gradients over the micro-batches (`[micro_batch]` sequences
/// each, accumulated), clipping by the global norm, then AdamW at `lr`.
pub fn optimizer_step(
    student: Student<TB>,
    state: &mut AdamState,
    objective: &dyn Objective,
    micro_batches: &[Packed],
    cfg: &TrainConfig,
    lr: f64,
) -> Result<StepOutcome, NonFinite> {
    let accum = micro_batches.len();
    let mut grads_acc: Option<burn::optim::GradientsParams> = None;
    let mut loss_sum = 0.0;
    let mut tokens = 0u64;
    // Chat data: each micro-batch's mean over its marked targets weighs by their count, so the
    // step's loss is the mean over the global batch's marked targets whatever micro_batch is.
    let marked: Vec<usize> = micro_batches.iter().map(Packed::trained_targets).collect();
    let all_marked: usize = marked.iter().sum();
    for (batch, &count) in micro_batches.iter().zip(&marked) {
        let (input, targets, trained) = split(batch);
        if trained.is_some() && count == 0 {
            // Nothing to learn from here; the others carry the step.
            continue;
        }
        let loss = objective.loss(
            &student,
            &input,
            &targets,
            trained.as_deref(),
            batch.tokens.len(),
        );
        let loss = match trained {
            None => loss / accum as f64,
            Some(_) => loss * (count as f64 / all_marked as f64),
        };
        let value = loss
            .clone()
            .into_data()
            .convert::<f64>()
            .to_vec::<f64>()
            .unwrap()[0];
        if !value.is_finite() {
            return Err(NonFinite {
                what: "loss",
                param: None,
                cause: objective.non_finite_cause(&input, batch.tokens.len()),
            });
        }
        loss_sum += value;
        let grads = burn::optim::GradientsParams::from_grads(loss.backward(), &student);
        grads_acc = Some(match grads_acc {
            None => grads,
            Some(acc) => add_grads(acc, grads, &student),
        });
        tokens += batch.tokens.iter().map(|s| s.len() as u64 - 1).sum::<u64>();
    }
    let Some(mut grads) = grads_acc else {
        // A global batch of chat data with no assistant token: no update, nothing learned.
        return Ok(StepOutcome {
            student,
            loss: 0.0,
            grad_norm: 0.0,
            tokens,
        });
    };
    let mut norms = GradNorms {
        grads: &grads,
        sq: Vec::new(),
    };
    student.visit(&mut norms);
    if let Some(i) = norms.sq.iter().position(|x| !x.is_finite()) {
        return Err(NonFinite {
            what: "gradient",
            param: Some(i),
            cause: None,
        });
    }
    let norm = norms.sq.iter().sum::<f64>().sqrt();
    let scale = if cfg.clip > 0.0 && norm > cfg.clip {
        cfg.clip / norm
    } else {
        1.0
    };
    let mut mapper = AdamStep {
        grads: &mut grads,
        state,
        cfg,
        lr,
        scale,
        index: 0,
    };
    let student = student.map(&mut mapper);
    state.step += 1;
    Ok(StepOutcome {
        student,
        loss: loss_sum,
        grad_norm: norm,
        tokens,
    })
}

/// Inputs (all but the last token), targets (all but the first) and, for chat data, whether
/// each target is trained (its token's mask).
fn split(seqs: &Packed) -> (Vec<u32>, Vec<u32>, Option<Vec<bool>>) {
    let input = seqs
        .tokens
        .iter()
        .flat_map(|s| s[..s.len() - 1].iter().copied())
        .collect();
    let targets = seqs
        .tokens
        .iter()
        .flat_map(|s| s[1..].iter().copied())
        .collect();
    let trained = seqs
        .trained
        .as_ref()
        .map(|m| m.iter().flat_map(|s| s[1..].iter().copied()).collect());
    (input, targets, trained)
}

/// Runs the loop on `model` (the student) with `objective`; writes the trained checkpoint, metrics
/// and a loss curve into the output directory.
pub fn run(ctx: &OpContext, objective: &dyn Objective, model_port: &str) -> Result<(), OpError> {
    let cfg = TrainConfig::from_params(&ctx.params)?;
    runtime::compute(&ctx.params)?;
    let device = runtime::device();
    let src = runtime::open_model(ctx.input(model_port)?)?;
    let tok = runtime::tokenizer(&src)?;
    let config = src.config.clone();
    let data = tokenized(ctx.input("data")?, &tok)?;
    let eos = config.eos_id().unwrap_or(0);
    let seqs = pack_with_mask(
        &data,
        cfg.seq_len.min(config.max_position_embeddings),
        eos,
        ctx.seed()?,
    )?;
    if seqs.tokens.len() <= cfg.val_sequences {
        return Err(OpError::Invalid(format!(
            "the data packs into {} sequences of {} tokens: not enough to hold out {} for validation and train on the rest",
            seqs.tokens.len(),
            cfg.seq_len,
            cfg.val_sequences
        )));
    }
    let (val, train) = seqs.split_at(cfg.val_sequences);
    if let Some(t) = &seqs.trained {
        let (on, all) = (
            t.iter().flatten().filter(|m| **m).count(),
            t.len() * cfg.seq_len,
        );
        ctx.progress.note(&format!(
            "chat data: the loss counts {on} of {all} tokens ({:.1}%, the assistant's)",
            100.0 * on as f64 / all.max(1) as f64
        ));
    }
    let steps = cfg.steps();
    let accum = cfg.global_batch / cfg.micro_batch;
    let key = ctx.provenance["key"]
        .as_str()
        .unwrap_or_default()
        .to_string();

    // Resume from the scratch checkpoint of this very step, if any.
    let ckpt = ctx.scratch_dir.join("checkpoint");
    let mut start = 0;
    let mut metrics: Vec<serde_json::Value> = Vec::new();
    let (mut student, mut state) = if ckpt.join("state.json").is_file() {
        let s: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(ckpt.join("state.json"))
                .map_err(|e| OpError::io(&ckpt, "read", e))?,
        )
        .map_err(|e| OpError::Invalid(format!("checkpoint state: {e}")))?;
        if s["key"].as_str() != Some(key.as_str()) {
            return Err(OpError::Invalid(format!(
                "refusing to resume: the checkpoint in {} belongs to key {}, not {key}",
                ckpt.display(),
                s["key"]
            )));
        }
        start = s["step"].as_u64().unwrap_or(0) as usize;
        metrics = s["metrics"].as_array().cloned().unwrap_or_default();
        let saved = load_model(&ckpt)?;
        ctx.progress
            .note(&format!("resuming from the checkpoint at step {start}"));
        (
            Student {
                model: Decoder::<TB>::load(&config, &saved.weights, &device)?
                    .with_compute(cfg.compute),
                projections: projections(&objective.projections(), Some(&ckpt))?,
            },
            load_state(&ckpt, start)?,
        )
    } else {
        (
            Student {
                model: Decoder::<TB>::load(&config, &src.weights, &device)?
                    .with_compute(cfg.compute),
                projections: projections(&objective.projections(), None)?,
            },
            AdamState {
                step: 0,
                m: Vec::new(),
                v: Vec::new(),
            },
        )
    };
    let names = {
        let mut n = Names {
            path: Vec::new(),
            names: Vec::new(),
        };
        student.visit(&mut n);
        // Named as in the checkpoint: `layers.0.mlp.down_proj`, `projections.1`.
        n.names
            .into_iter()
            .map(|name| {
                name.strip_prefix("model.")
                    .map(str::to_string)
                    .unwrap_or(name)
            })
            .collect::<Vec<_>>()
    };

    ctx.progress.phase(objective.name(), steps as u64, "steps");
    ctx.progress.set(start as u64);
    let mut last_ckpt_step = start;
    let t0 = Instant::now();
    let mut tokens_done = 0u64;
    for step in start..steps {
        let lr = cfg.lr_at(step);
        let micro_batches: Vec<Packed> = (0..accum)
            .map(|a| {
                let base = step * cfg.global_batch + a * cfg.micro_batch;
                train.pick((0..cfg.micro_batch).map(|e| (base + e) % train.tokens.len()))
            })
            .collect();
        let outcome = match optimizer_step(student, &mut state, objective, &micro_batches, &cfg, lr)
        {
            Ok(o) => o,
            Err(NonFinite { what, param, cause }) => {
                let param = param.map(|i| names[i].as_str());
                return Err(nan_error(step, what, param, cause, last_ckpt_step, &ckpt));
            }
        };
        student = outcome.student;
        tokens_done += outcome.tokens;
        let (loss_sum, norm) = (outcome.loss, outcome.grad_norm);
        let mut m = json!({"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": norm,
                            "tokens": (step + 1) as u64 * (cfg.global_batch * cfg.seq_len) as u64});
        let last = step + 1 == steps;
        if last || (cfg.val_every > 0 && (step + 1) % cfg.val_every == 0) {
            m["val_loss"] = validation_loss(objective, &student, &val, cfg.micro_batch).into();
        }
        metrics.push(m);
        let elapsed = t0.elapsed().as_secs_f64().max(1e-9);
        ctx.progress.set_with(
            (step + 1) as u64,
            &format!(
                "loss {loss_sum:.4}, {:.0} tokens/s",
                tokens_done as f64 / elapsed
            ),
        );
        if cfg.checkpoint_every > 0 && (step + 1) % cfg.checkpoint_every == 0 && !last {
            write_checkpoint(
                &ckpt,
                &student,
                &state,
                &config,
                &src,
                step + 1,
                &key,
                &metrics,
            )?;
            last_ckpt_step = step + 1;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let dtype = dtype_for(ctx, &src)?;
    let trained = student.model.valid();
    save_decoder(
        &ctx.out_dir,
        &trained,
        &config,
        dtype,
        &src,
        &ctx.provenance,
    )?;
    let mut lines = String::new();
    for m in &metrics {
        lines.push_str(&m.to_string());
        lines.push('\n');
    }
    let p = ctx.out_dir.join("metrics.jsonl");
    std::fs::write(&p, lines).map_err(|e| OpError::io(&p, "write", e))?;
    let losses: Vec<f64> = metrics.iter().filter_map(|m| m["loss"].as_f64()).collect();
    let p = ctx.out_dir.join("loss.svg");
    std::fs::write(&p, loss_svg(objective.name(), &losses))
        .map_err(|e| OpError::io(&p, "write", e))?;
    let final_val = metrics.last().and_then(|m| m["val_loss"].as_f64());
    let summary = json!({
        "objective": objective.name(),
        "steps": steps,
        "resumed_at": start,
        "tokens": steps as u64 * (cfg.global_batch * cfg.seq_len) as u64,
        "final_loss": losses.last(),
        "final_val_loss": final_val,
        "final_val_perplexity": final_val.map(f64::exp),
        "seconds_this_run": secs,
        "tokens_per_second_this_run": tokens_done as f64 / secs.max(1e-9),
    });
    let p = ctx.out_dir.join("train.json");
    std::fs::write(&p, serde_json::to_string_pretty(&summary).unwrap())
        .map_err(|e| OpError::io(&p, "write", e))
}

fn add_grads(
    mut acc: burn::optim::GradientsParams,
    mut more: burn::optim::GradientsParams,
    model: &Student<TB>,
) -> burn::optim::GradientsParams {
    struct Add<'a> {
        acc: &'a mut burn::optim::GradientsParams,
        more: &'a mut burn::optim::GradientsParams,
    }
    impl ModuleVisitor<TB> for Add<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<TB, D>>) {
            if let Some(g) = self.more.remove::<B, D>(param.id) {
                let sum = match self.acc.remove::<B, D>(param.id) {
                    Some(a) => a + g,
                    None => g,
                };
                self.acc.register::<B, D>(param.id, sum);
            }
        }
    }
    model.visit(&mut Add {
        acc: &mut acc,
        more: &mut more,
    });
    acc
}

#[allow(clippy::too_many_arguments)]
fn write_checkpoint(
    ckpt: &Path,
    student: &Student<TB>,
    state: &AdamState,
    config: &ModelConfig,
    src: &LoadedModel,
    step: usize,
    key: &str,
    metrics: &[serde_json::Value],
) -> Result<(), OpError> {
    // Written beside, then swapped in: a kill mid-write leaves the previous checkpoint intact.
    let tmp = ckpt.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| OpError::io(&tmp, "create", e))?;
    save_decoder(
        &tmp,
        &student.model.valid(),
        config,
        DType::F32,
        src,
        &json!({"checkpoint_step": step}),
    )?;
    save_state(&tmp, state)?;
    save_projections(&tmp, student)?;
    let s = json!({"step": step, "key": key, "metrics": metrics});
    let p = tmp.join("state.json");
    std::fs::write(&p, s.to_string()).map_err(|e| OpError::io(&p, "write", e))?;
    let old = ckpt.with_extension("old");
    let _ = std::fs::remove_dir_all(&old);
    if ckpt.exists() {
        std::fs::rename(ckpt, &old).map_err(|e| OpError::io(ckpt, "move aside", e))?;
    }
    std::fs::rename(&tmp, ckpt).map_err(|e| OpError::io(ckpt, "install", e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

fn nan_error(
    step: usize,
    what: &str,
    param: Option<&str>,
    cause: Option<String>,
    last: usize,
    ckpt: &Path,
) -> OpError {
    let at = param
        .map(|p| format!(" (first non-finite gradient: parameter `{p}`)"))
        .unwrap_or_default();
    let resume = if last > 0 {
        format!(
            "the last good checkpoint is step {last} in {}",
            ckpt.display()
        )
    } else {
        "no checkpoint was written yet".into()
    };
    let fix = match cause {
        // Not the student's learning: no learning rate helps.
        Some(cause) => cause,
        None => "lower lr or raise warmup_steps".into(),
    };
    OpError::Failed(format!(
        "non-finite {what} at step {}{at}; nothing was committed; {resume}; {fix}",
        step + 1
    ))
}

fn loss_svg(title: &str, losses: &[f64]) -> String {
    let (w, h, pad) = (640.0, 320.0, 40.0);
    let finite: Vec<f64> = losses.iter().copied().filter(|x| x.is_finite()).collect();
    let (lo, hi) = finite
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    let span = (hi - lo).max(1e-9);
    let n = losses.len().max(2) as f64;
    let points: Vec<String> = losses
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .map(|(i, l)| {
            format!(
                "{:.1},{:.1}",
                pad + (w - 2.0 * pad) * i as f64 / (n - 1.0),
                h - pad - (h - 2.0 * pad) * (l - lo) / span
            )
        })
        .collect();
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\"><rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
         <text x=\"{pad}\" y=\"20\" font-family=\"sans-serif\" font-size=\"13\">{title} loss per step ({lo:.3} .. {hi:.3})</text>\
         <polyline fill=\"none\" stroke=\"#c0392b\" stroke-width=\"1.5\" points=\"{}\"/></svg>\n",
        points.join(" ")
    )
}

/// Reads the summary of a training output for `show`.
pub fn summarize(out_dir: &Path) -> Option<String> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("train.json")).ok()?).ok()?;
    let objective = v["objective"].as_str()?;
    // exp(loss) is a perplexity only for cross-entropy; of a KL it is a meaningless (often
    // overflowing) number (field case 15).
    let perplexity = match (objective, v["final_val_perplexity"].as_f64()) {
        ("cross_entropy", Some(p)) => format!(" (perplexity {p:.2})"),
        _ => String::new(),
    };
    Some(format!(
        "{objective} for {} steps ({} tokens): final loss {:.4}, validation loss {:.4}{perplexity}, {:.0} tokens/s",
        v["steps"],
        v["tokens"],
        v["final_loss"].as_f64().unwrap_or(f64::NAN),
        v["final_val_loss"].as_f64().unwrap_or(f64::NAN),
        v["tokens_per_second_this_run"].as_f64().unwrap_or(0.0)
    ))
}

/// `train`: next-token cross-entropy (teacher correction, plain fine-tuning).
pub struct Train;

impl crate::op::Op for Train {
    fn signature(&self) -> crate::op::OpSignature {
        crate::op::OpSignature {
            name: "train",
            // 3: writes tokenizer_config.json. 4: the fused CPU forward for validation. 5: the fused
            // CPU attention. 6: its key product reads transposed keys.
            // 7: config.json from the family table (attention_bias, mlp_bias explicit).
            // 8: Gemma's embedding scale rounded to bf16 under bf16 compute, as transformers does.
            // 9: chat data (the loss on the assistant's tokens); chat_template.jinja kept.
            version: 9,
            doc: "fine-tune with next-token cross-entropy (teacher correction)",
            inputs: vec![
                crate::op::Port::new(
                    "model",
                    crate::op::ArtifactKind::Model,
                    "the model to train",
                ),
                crate::op::Port::new(
                    "data",
                    crate::op::ArtifactKind::Dataset,
                    "training texts (held-out sequences for validation)",
                ),
            ],
            output: crate::op::ArtifactKind::Model,
            params: params(),
        }
    }

    fn check(&self, p: &Params) -> Vec<Problem> {
        check(p)
    }

    fn estimate(
        &self,
        p: &Params,
        inputs: &std::collections::BTreeMap<String, crate::op::Estimate>,
    ) -> Option<crate::op::Estimate> {
        let c = crate::estimate::input_config(inputs, "model")?;
        let params = c.parameter_count().0 as f64;
        let tokens = p.int("tokens").ok()? as f64;
        let mut e = crate::estimate::model_estimate(&c);
        e.flops = 6.0 * params * tokens;
        e.memory_bytes = crate::estimate::TRAIN_BYTES_PER_PARAM * params;
        e.basis = "6·P·T; 16 bytes/param (f32 weights, grads and Adam), activations extra".into();
        Some(e)
    }

    /// Always: data order and the held-out split come from the seed.
    fn uses_seed(&self, _params: &Params) -> bool {
        true
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        runtime::with_threads(ctx.threads, || run(ctx, &CrossEntropy, "model"))
    }

    fn summarize(&self, out_dir: &Path) -> Option<String> {
        summarize(out_dir)
    }
}

#[cfg(test)]
mod tests {
    /// exp(validation loss) is shown as a perplexity for cross-entropy only, never for a KL.
    #[test]
    fn summaries_show_a_perplexity_for_cross_entropy_only() {
        let dir = tempfile::tempdir().unwrap();
        let write = |objective: &str| {
            let v = serde_json::json!({"objective": objective, "steps": 2, "tokens": 64,
                "final_loss": 3.0, "final_val_loss": 3.0, "final_val_perplexity": 20.09,
                "tokens_per_second_this_run": 10.0});
            std::fs::write(dir.path().join("train.json"), v.to_string()).unwrap();
            super::summarize(dir.path()).unwrap()
        };
        assert!(write("cross_entropy").contains("(perplexity 20.09)"));
        assert!(!write("distillation").contains("perplexity"));
    }
}
