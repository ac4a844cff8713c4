//! Cost estimates from configs alone: parameter counts, FLOPs (2·P·T forward, 6·P·T training) and
//! resident memory, so a recipe for a 12B teacher can be planned with only config.json present.

use std::collections::BTreeMap;

use crate::model::checkpoint::load_config;
use crate::model::config::ModelConfig;
use crate::model::decoder::Compute;
use crate::op::{Artifact, ArtifactKind, Estimate};

/// A model source: its config and parameter count.
pub fn describe_source(artifact: &Artifact) -> Option<Estimate> {
    if artifact.kind != ArtifactKind::Model {
        return None;
    }
    let config = load_config(&artifact.path).ok()?;
    Some(model_estimate(&config))
}

pub fn model_estimate(config: &ModelConfig) -> Estimate {
    Estimate {
        config: Some(config.to_json()),
        parameters: Some(config.parameter_count().0),
        ..Default::default()
    }
}

/// The config of a model input's estimate.
pub fn input_config(inputs: &BTreeMap<String, Estimate>, port: &str) -> Option<ModelConfig> {
    let cfg = inputs.get(port)?.config.as_ref()?;
    ModelConfig::from_json_str(&cfg.to_string()).ok()
}

/// Bytes per parameter of a frozen model in the `compute` parameter's dtype (matrices stored in it).
pub fn infer_bytes_per_param(p: &crate::op::Params) -> f64 {
    match p.str("compute") {
        Ok("bfloat16") => 2.0,
        _ => 4.0,
    }
}

/// `recompute = "auto"` turns recomputation on past this many bytes of kept block activations.
pub const RECOMPUTE_ABOVE_BYTES: f64 = 2.0 * 1024.0 * 1024.0 * 1024.0;

/// Bytes of block activations a training step keeps for its backward pass, for `tokens` tokens
/// per micro-batch (`micro_batch · seq_len`), f32. Per token and layer the tensor-op graph keeps
/// about `6·hidden` (two norms' inputs, statistics and outputs), `4·heads·head_dim + 4·kv_heads·
/// head_dim` (q, k before and after RoPE, v, the context; the attention itself keeps only its
/// log-sum-exp), and `5·intermediate` (gate, up, the activation and its input, the product).
/// Under bf16 compute each product also keeps its bf16 input ([`bf16_input_bytes`]).
/// With `recompute`, one residual stream per layer and one block's activations at a time.
/// Measured against this (scripts/distill-memory.sh): SmolLM2's 67.6M student at 2048 tokens,
/// 2.39 GB by the formula without recomputation, peaks at 4.58 GB in all with its f32 teacher
/// (0.54 GB) and training state (1.08 GB); 0.17 GB by the formula with recomputation, 2.51 GB
/// in all.
pub fn block_activation_bytes(
    config: &ModelConfig,
    tokens: usize,
    recompute: bool,
    compute: Compute,
) -> f64 {
    let layers = config.num_hidden_layers as f64;
    let kept = one_block_bytes(config, tokens) + bf16_input_bytes(config, tokens, compute);
    if recompute {
        4.0 * tokens as f64 * layers * config.hidden_size as f64 + kept
    } else {
        layers * kept
    }
}

/// Bytes of one block's kept intermediates at `tokens` tokens, f32 (the per-layer term of
/// [`block_activation_bytes`]); also what a frozen model's forward holds at its peak.
pub fn one_block_bytes(config: &ModelConfig, tokens: usize) -> f64 {
    let h = config.hidden_size as f64;
    let d = config.head_dim as f64;
    let heads = config.num_attention_heads as f64;
    let kv = config.num_key_value_heads as f64;
    let f = config.intermediate_size as f64;
    4.0 * tokens as f64 * (6.0 * h + 4.0 * heads * d + 4.0 * kv * d + 5.0 * f)
}

/// Under bf16 compute, the bf16 copies of one block's product inputs that autodiff keeps for the
/// backward (each product casts its input: q, k, v and gate, up take the normed hidden state,
/// o the context, down the activation), `2·tokens·(5·hidden + heads·head_dim + intermediate)`;
/// 0 in f32.
pub fn bf16_input_bytes(config: &ModelConfig, tokens: usize, compute: Compute) -> f64 {
    if compute == Compute::F32 {
        return 0.0;
    }
    let h = config.hidden_size as f64;
    let qd = (config.num_attention_heads * config.head_dim) as f64;
    2.0 * tokens as f64 * (5.0 * h + qd + config.intermediate_size as f64)
}

/// Bytes of the output head and loss at `tokens` per micro-batch, in chunks of `chunk` tokens
/// (0: all at once): one chunk's logits and the loss's temporaries (about 6 `[chunk, vocab]`
/// tensors) plus, per loss term, the head weight's gradient and the hidden states' gradient.
pub fn head_activation_bytes(
    config: &ModelConfig,
    tokens: usize,
    chunk: usize,
    terms: usize,
) -> f64 {
    let vocab = config.vocab_size as f64;
    let rows = if chunk == 0 {
        tokens
    } else {
        chunk.min(tokens)
    } as f64;
    let term_grads = if chunk == 0 {
        0.0
    } else {
        terms as f64 * (config.hidden_size as f64 * (vocab + tokens as f64))
    };
    4.0 * (6.0 * rows * vocab + term_grads)
}
