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
use crate::parallel::{Collective, Ranks};
use crate::runtime::{self, Backend as B, Device, TrainBackend as TB};
use crate::stats::{read_vectors, write_vectors};

mod checkpoint;
mod gradients;
pub mod head;
mod metrics;
mod objective;
mod optimizer;
pub mod precision;
mod schedule;

use checkpoint::*;
pub use gradients::NonFinite;
use gradients::*;
pub use head::chunked_head_loss;
pub use metrics::summarize;
use metrics::*;
pub use objective::{
    CrossEntropy, Objective, chunks_head, cross_entropy, cross_entropy_rows, trained_rows,
    trained_targets,
};
pub use optimizer::{AdamState, Piece, StepError, StepOutcome, optimizer_step, pieces};

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
    /// The dtype matmuls run in.
    pub compute: Compute,
    /// The dtypes of the trained matrices, their gradients and the AdamW moments.
    pub precision: precision::Precision,
    /// `recompute`: "on", "off" or "auto" ([`TrainConfig::recomputes`]).
    pub recompute: Recompute,
}

/// Whether blocks recompute their activations in the backward pass (`recompute`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recompute {
    On,
    Off,
    /// On when the blocks' kept activations would pass [`crate::estimate::RECOMPUTE_ABOVE_BYTES`].
    Auto,
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
        ParamSpec::with_default(
            "loss_chunk",
            ParamType::Int,
            I(256),
            "tokens per chunk of the output head and loss: the logits [tokens, vocab] exist one chunk at a time (0: the whole micro-batch at once)",
        ),
        ParamSpec::with_default(
            "recompute",
            ParamType::Choice(&["auto", "on", "off"]),
            ParamValue::Str("auto".into()),
            "recompute each block's activations in the backward pass instead of keeping them (one more forward per step): auto turns it on when the kept activations would pass 2 GiB",
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
            "dtype the matmuls run in (for CUDA); the weights and optimizer state follow main_params_dtype and moments_dtype",
        ),
        ParamSpec::with_default(
            "dtype",
            ParamType::Choice(&["same", "float32", "bfloat16", "float16"]),
            ParamValue::Str("same".into()),
            "dtype of the written checkpoint",
        ),
    ]
    .into_iter()
    .chain(precision::Precision::params())
    .collect()
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
            precision: precision::Precision::from_params(p)?,
            recompute: match p.str("recompute")? {
                "on" => Recompute::On,
                "off" => Recompute::Off,
                _ => Recompute::Auto,
            },
        })
    }

    /// Whether a student of `config` recomputes its blocks at this micro-batch and sequence.
    pub fn recomputes(&self, config: &ModelConfig) -> bool {
        match self.recompute {
            Recompute::On => true,
            Recompute::Off => false,
            Recompute::Auto => {
                let tokens = self.micro_batch * self.seq_len;
                crate::estimate::block_activation_bytes(config, tokens, false, self.compute)
                    > crate::estimate::RECOMPUTE_ABOVE_BYTES
            }
        }
    }
}

/// The activation bytes of training a student of `config` with these parameters (`terms` loss
/// terms on the head), and whether its blocks recompute; `None` when a parameter is unreadable.
/// Without recomputation, the cast copies of the matrices that the products keep for the
/// backward count too (bf16 copies of f32 matrices under bf16 compute, f32 copies of bf16
/// matrices under f32 compute).
pub fn activation_estimate(p: &Params, config: &ModelConfig, terms: usize) -> Option<(f64, bool)> {
    let cfg = TrainConfig::from_params(p).ok()?;
    let recompute = cfg.recomputes(config);
    let tokens = cfg.micro_batch * cfg.seq_len;
    let chunk = p.usize("loss_chunk").ok()?;
    // Without recomputation each product keeps its cast weight for the backward: bf16 copies of
    // f32 matrices under bf16 compute, f32 copies of bf16 matrices under f32 compute.
    let copy_bytes = match (cfg.compute, cfg.precision.main_params) {
        (Compute::Bf16, precision::StateDType::F32) => 2.0,
        (Compute::F32, precision::StateDType::Bf16) => 4.0,
        _ => 0.0,
    };
    let weight_copies = if recompute {
        0.0
    } else {
        copy_bytes * config.parameter_count().0 as f64
    };
    Some((
        crate::estimate::block_activation_bytes(config, tokens, recompute, cfg.compute)
            + crate::estimate::head_activation_bytes(config, tokens, chunk, terms)
            + weight_copies,
        recompute,
    ))
}

/// Which of a training step's settings would shrink its memory, for an estimate that does not
/// fit: the optimizer precision modes not yet in bf16, recomputation where it is off, smaller
/// micro-batches and head chunks, and for a live teacher (`live_teacher`) cached logits.
/// `recomputes`: whether the step already recomputes its blocks.
pub fn shrink_memory(p: &Params, live_teacher: bool, recomputes: bool) -> String {
    let mut out = Vec::new();
    if p.str("main_params_dtype").is_ok_and(|d| d != "bfloat16") {
        out.push("main_params_dtype = \"bfloat16\" (4 bytes a parameter less)".to_string());
    }
    if p.str("moments_dtype").is_ok_and(|d| d != "bfloat16") {
        out.push("moments_dtype = \"bfloat16\" (4 bytes a parameter less)".into());
    }
    if live_teacher {
        out.push(
            "a teacher_logits step as the teacher_logits input instead of the live teacher".into(),
        );
    }
    if !recomputes {
        out.push("recompute = \"on\"".into());
    }
    out.push("a smaller micro_batch or loss_chunk".into());
    format!("what shrinks it: {}", out.join(", "))
}

/// Whether a step sums several micro-batches' gradients (`global_batch` > `micro_batch`, on one
/// rank); `None` when unreadable.
pub fn accumulates(p: &Params) -> Option<bool> {
    Some(p.int("global_batch").ok()? > p.int("micro_batch").ok()?)
}

/// Parameter checks shared by the training ops.
pub fn check(p: &Params) -> Vec<Problem> {
    let mut out = p.require_positive(&["seq_len", "micro_batch", "global_batch", "tokens"]);
    out.extend(precision::Precision::check(p));
    if let (Ok(m), Ok(g)) = (p.int("micro_batch"), p.int("global_batch"))
        && m > 0
        && g % m != 0
    {
        out.push(Problem {
            param: Some("global_batch".into()),
            message: format!("global_batch {g} must be a multiple of micro_batch {m}"),
        });
    }
    if p.int("loss_chunk").is_ok_and(|v| v < 0) {
        out.push(Problem {
            param: Some("loss_chunk".into()),
            message: "loss_chunk must be 0 (unchunked) or a number of tokens".into(),
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

/// The batch must split evenly over `tasks` data-parallel ranks: each takes the same number of
/// micro-batches of every global batch.
pub fn check_tasks(p: &Params, tasks: usize) -> Vec<Problem> {
    match (p.int("micro_batch"), p.int("global_batch")) {
        (Ok(m), Ok(g)) if m > 0 && g % m == 0 && (g / m) % tasks as i64 != 0 => vec![Problem {
            param: Some("global_batch".into()),
            message: format!(
                "global_batch {g} is {} micro-batches of {m}, which do not split evenly over {tasks} tasks",
                g / m
            ),
        }],
        _ => Vec::new(),
    }
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
/// Everything lives on `device` (the objective's frozen teacher too). With several ranks
/// ([`OpContext::ranks`]) each computes its share of every global batch, the optimizer state is
/// sharded over them, and only the first writes the output.
pub fn run(
    ctx: &OpContext,
    objective: &dyn Objective,
    model_port: &str,
    device: &Device,
) -> Result<(), OpError> {
    let cfg = TrainConfig::from_params(&ctx.params)?;
    runtime::compute(&ctx.params)?;
    for (param, dtype) in [
        ("main_params_dtype", cfg.precision.main_params),
        ("moments_dtype", cfg.precision.moments),
    ] {
        if dtype == precision::StateDType::Bf16 {
            runtime::require_bf16(param)?;
        }
    }
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
    // Training reads train sequences 0, 1, ... cyclically: the first steps·global_batch.
    let read = (steps * cfg.global_batch).min(train.tokens.len());
    objective.check_sequences(
        &mut val
            .tokens
            .iter()
            .chain(&train.tokens[..read])
            .map(|s| &s[..s.len() - 1]),
    )?;
    let ranks = ctx.ranks.clone();
    if cfg.precision.main_grads == precision::StateDType::Bf16 && accum / ranks.world.max(1) > 16 {
        ctx.progress.note(&format!(
            "main_grads_dtype = \"bfloat16\": each rank sums {} micro-batches' gradients in bf16, rounding each addition to nearest; steady components below 2^-8 of the running sum are lost (main_grads_dtype = \"float32\" sums in f32, or more tasks sum fewer each)",
            accum / ranks.world.max(1)
        ));
    }
    if accum % ranks.world != 0 {
        return Err(OpError::Invalid(format!(
            "global_batch {} is {accum} micro-batches of {}, which do not split evenly over {} ranks: make global_batch / micro_batch a multiple of {}",
            cfg.global_batch, cfg.micro_batch, ranks.world, ranks.world
        )));
    }
    // A rank that cannot join (no NCCL, no such GPU, no rendezvous) fails the step itself: it
    // did not lose its peers.
    let collective = crate::parallel::connect(&ranks, &ctx.scratch_dir)
        .map_err(|e| OpError::Failed(e.to_string()))?;
    let collective: &dyn Collective = collective.as_ref();
    let key = ctx.provenance["key"]
        .as_str()
        .unwrap_or_default()
        .to_string();

    // Resume from the scratch checkpoint of this very step, if any.
    let ckpt = ctx.scratch_dir.join("checkpoint");
    let mut start = 0;
    let mut metrics: Vec<serde_json::Value> = Vec::new();
    let (student, mut state) = if ckpt.join("state.json").is_file() {
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
        let saved_world = s["world"].as_u64().unwrap_or(1) as usize;
        metrics = s["metrics"].as_array().cloned().unwrap_or_default();
        let saved = load_model(&ckpt)?;
        ctx.progress
            .note(&format!("resuming from the checkpoint at step {start}"));
        (
            Student {
                model: Decoder::<TB>::load(&config, &saved.weights, device)?
                    .with_compute(cfg.compute)
                    .with_recompute(cfg.recomputes(&config)),
                projections: projections(&objective.projections(), Some(&ckpt), device)?,
            },
            load_state(&ckpt, start, saved_world, &ranks, cfg.precision, device)?,
        )
    } else {
        (
            Student {
                model: Decoder::<TB>::load(&config, &src.weights, device)?
                    .with_compute(cfg.compute)
                    .with_recompute(cfg.recomputes(&config)),
                projections: projections(&objective.projections(), None, device)?,
            },
            AdamState::new(),
        )
    };
    let mut student = Student {
        model: precision::hold_main_params(student.model, cfg.precision),
        ..student
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
        let outcome = match optimizer_step(
            student,
            &mut state,
            objective,
            &micro_batches,
            &cfg,
            lr,
            collective,
            device,
        ) {
            Ok(o) => o,
            Err(StepError::NonFinite(NonFinite { what, param, cause })) => {
                let param = param.map(|i| names[i].as_str());
                return Err(nan_error(step, what, param, cause, last_ckpt_step, &ckpt));
            }
            Err(StepError::Collective(e)) => return Err(collective_error(e)),
        };
        student = outcome.student;
        tokens_done += outcome.tokens;
        let (loss_sum, norm) = (outcome.loss, outcome.grad_norm);
        let mut m = json!({"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": norm,
                            "tokens": (step + 1) as u64 * (cfg.global_batch * cfg.seq_len) as u64});
        let last = step + 1 == steps;
        let validate = last || (cfg.val_every > 0 && (step + 1) % cfg.val_every == 0);
        if ranks.is_first() && validate {
            m["val_loss"] =
                validation_loss(objective, &student, &val, cfg.micro_batch, device).into();
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
                collective,
            )?;
            last_ckpt_step = step + 1;
        }
        if validate {
            // The first rank validated alone; the others wait for it here, with no time limit
            // (a validation can take longer than a collective may wait).
            after_first_alone(collective, &ranks)?;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    // Measured on every rank: the bytes of optimizer state it holds.
    // (In MiB and bytes below one, each exact in an f32.)
    let bytes = state.bytes();
    let state_bytes: Vec<u64> = collective
        .all_gather(&[(bytes >> 20) as f32, (bytes & 0xF_FFFF) as f32])
        .map_err(collective_error)?
        .chunks(2)
        .map(|c| ((c[0] as u64) << 20) + c[1] as u64)
        .collect();
    if !ranks.is_first() {
        return Ok(());
    }
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
        "ranks": ranks.world,
        "optimizer_state_bytes_per_rank": state_bytes,
    });
    let p = ctx.out_dir.join("train.json");
    std::fs::write(&p, serde_json::to_string_pretty(&summary).unwrap())
        .map_err(|e| OpError::io(&p, "write", e))
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
            // 10: the student's attention with its own backward (no [seq, seq] tensors kept);
            // the head and loss in chunks (`loss_chunk`).
            // 11: the training step's fused CPU ops with their own backward (the products by
            // column blocks, RMSNorm, SwiGLU, RoPE), the cross-entropy with its gradient in one
            // pass, AdamW in one pass, gradient norms in f64.
            version: 11,
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
        let (activations, recompute) = activation_estimate(p, &c, 1)?;
        e.flops = if recompute { 8.0 } else { 6.0 } * params * tokens;
        let precision = precision::Precision::from_params(p).ok()?;
        let accumulates = accumulates(p)?;
        e.memory_bytes = precision.bytes_per_param(accumulates) * params + activations;
        e.optimizer_state_bytes = precision.moment_bytes_per_param() * params;
        e.activation_bytes = activations;
        e.shrink_memory = shrink_memory(p, false, recompute);
        e.basis = format!(
            "{}·P·T; {} plus activations{}",
            if recompute { 8 } else { 6 },
            precision.describe(accumulates),
            if recompute {
                " (blocks recomputed)"
            } else {
                ""
            }
        );
        Some(e)
    }

    /// Always: data order and the held-out split come from the seed.
    fn uses_seed(&self, _params: &Params) -> bool {
        true
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        runtime::with_threads(ctx.threads, || {
            run(
                ctx,
                &CrossEntropy {
                    chunk: ctx.params.usize("loss_chunk")?,
                },
                "model",
                &runtime::device_for(&ctx.ranks),
            )
        })
    }

    fn data_parallel(&self) -> bool {
        true
    }

    fn check_tasks(&self, p: &Params, tasks: usize) -> Vec<Problem> {
        check_tasks(p, tasks)
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
