//! The `init` op: a model of any config with random weights, written on the spot, so that
//! benchmarks and GPU checks can run at a real model's width and sequence length without its
//! weights (which no machine without a registry can fetch, and which a device run cannot carry).
//!
//! Matrices and embeddings are drawn from `N(0, initializer_range²)` (the config's, as
//! transformers' `_init_weights` does; 0.02 where the config has none), norm scales start at the
//! identity (`1 - offset`: 1 for Llama's RMSNorm, 0 for Gemma's `1 + w`), biases at zero. Each
//! value is a counter-based draw from (seed, tensor, element), so the same recipe writes the same
//! bytes on any machine. The tokenizer is the input's `tokenizer.json` where it has one, else a
//! byte-level tokenizer of 256 tokens (ids 0–255, a byte each), which any vocabulary of at least
//! 256 holds.

use std::path::Path;

use serde_json::json;

use crate::counter_rng;
use crate::model::checkpoint::{SaveOptions, TOKENIZER_FILES, load_config};
use crate::model::config::ModelConfig;
use crate::model::weights::DType;
use crate::op::{
    ArtifactKind, Estimate, Op, OpContext, OpError, OpSignature, ParamSpec, ParamType, ParamValue,
    Params, Port, Problem,
};

pub struct Init;

/// The config `init` writes: the input's, cut to its first `num_layers` layers (0: all).
pub fn initialized_config(config: &ModelConfig, num_layers: usize) -> ModelConfig {
    if num_layers == 0 || num_layers >= config.num_hidden_layers {
        return config.clone();
    }
    config.keep_layers(&(0..num_layers).collect::<Vec<_>>())
}

impl Op for Init {
    fn signature(&self) -> OpSignature {
        OpSignature {
            name: "init",
            version: 1,
            doc: "a model of the input's config with random weights (benchmarks at a real model's width)",
            inputs: vec![Port::new(
                "model",
                ArtifactKind::Model,
                "whose config.json to follow (a directory holding only config.json is enough)",
            )],
            output: ArtifactKind::Model,
            params: vec![
                ParamSpec::with_default(
                    "num_layers",
                    ParamType::Int,
                    ParamValue::Int(0),
                    "keep the config's first layers only (0: all of them)",
                ),
                ParamSpec::with_default(
                    "dtype",
                    ParamType::Choice(&["float32", "bfloat16", "float16"]),
                    ParamValue::Str("bfloat16".into()),
                    "dtype of the written checkpoint",
                ),
                ParamSpec::with_default(
                    "initializer_range",
                    ParamType::Float,
                    ParamValue::Float(0.0),
                    "standard deviation of the matrices' normal draws (0: the config's initializer_range, else 0.02)",
                ),
            ],
        }
    }

    fn check(&self, p: &Params) -> Vec<Problem> {
        let mut out = Vec::new();
        if p.int("num_layers").is_ok_and(|n| n < 0) {
            out.push(Problem {
                param: Some("num_layers".into()),
                message: "num_layers must be 0 (all layers) or a number of layers".into(),
            });
        }
        if p.float("initializer_range")
            .is_ok_and(|s| !(s >= 0.0 && s.is_finite()))
        {
            out.push(Problem {
                param: Some("initializer_range".into()),
                message:
                    "initializer_range must be 0 (the config's) or a positive standard deviation"
                        .into(),
            });
        }
        out
    }

    fn estimate(
        &self,
        p: &Params,
        inputs: &std::collections::BTreeMap<String, Estimate>,
    ) -> Option<Estimate> {
        let c = crate::estimate::input_config(inputs, "model")?;
        let c = initialized_config(&c, p.usize("num_layers").ok()?);
        let mut e = crate::estimate::model_estimate(&c);
        e.basis = "random weights, written once".into();
        Some(e)
    }

    /// Always: the weights are drawn from the seed.
    fn uses_seed(&self, _params: &Params) -> bool {
        true
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        let source = ctx.input("model")?;
        let config =
            initialized_config(&load_config(&source.path)?, ctx.params.usize("num_layers")?);
        let std = match ctx.params.float("initializer_range")? {
            s if s > 0.0 => s,
            _ => initializer_range(&source.path).unwrap_or(0.02),
        } as f32;
        let dtype = DType::from_torch_name(ctx.params.str("dtype")?).expect("a listed dtype");
        let seed = ctx.seed()?;
        let tokenizer_files: Vec<std::path::PathBuf> = TOKENIZER_FILES
            .iter()
            .map(|f| source.path.join(f))
            .filter(|p| p.is_file())
            .collect();
        let byte_level;
        let (tokenizer_json, tokenizer_config) = match std::fs::read_to_string(
            source.path.join("tokenizer.json"),
        ) {
            Ok(t) => (t, None),
            Err(_) => {
                if config.vocab_size < 256 {
                    return Err(OpError::Invalid(format!(
                        "{} has no tokenizer.json, and its vocab_size {} is below the 256 tokens of the byte-level tokenizer init writes in its place: give the model directory a tokenizer.json",
                        source.path.display(),
                        config.vocab_size
                    )));
                }
                byte_level = json!({"tokenizer_class": "PreTrainedTokenizerFast",
                                    "model_max_length": config.max_position_embeddings});
                (byte_level_tokenizer(), Some(&byte_level))
            }
        };
        let specs = config.tensor_specs();
        let offset = config.family.norm.offset();
        let shapes = config.tensor_shapes();
        let total: usize = shapes
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        ctx.progress
            .phase("drawing weights", total as u64, "values");
        let mut done = 0u64;
        let opts = SaveOptions {
            dtype,
            shard_bytes: 5_000_000_000,
            tokenizer_json: Some(&tokenizer_json),
            tokenizer_files: &tokenizer_files,
            generation_config: None,
            tokenizer_config,
            provenance: &ctx.provenance,
        };
        crate::model::save_checkpoint(&ctx.out_dir, &config, &opts, |name| {
            let i = specs
                .iter()
                .position(|s| s.name == name)
                .expect("save_checkpoint asks for the config's own tensors");
            let n: usize = shapes[i].1.iter().product();
            let role = specs[i].role;
            let values = if role.is_norm_scale() {
                vec![1.0 - offset; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                draw(counter_rng::stream(&[seed, i as u64]), n, std)
            };
            done += n as u64;
            ctx.progress.set(done);
            Ok(values)
        })?;
        ctx.progress.note(&format!(
            "{} layers, {:.2}G parameters, N(0, {std}²)",
            config.num_hidden_layers,
            total as f64 / 1e9
        ));
        Ok(())
    }
}

/// `n` draws of `N(0, std²)` from stream `key`, on every thread.
fn draw(key: u64, n: usize, std: f32) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; n];
    out.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(c, chunk)| {
            let base = (c << 16) as u64;
            for (j, x) in chunk.iter_mut().enumerate() {
                *x = counter_rng::normal(key, base + j as u64) * std;
            }
        });
    out
}

/// The config's `initializer_range`, which the parsed config does not keep.
fn initializer_range(dir: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["initializer_range"].as_f64().filter(|s| *s > 0.0)
}

/// A byte-level BPE tokenizer without merges: each UTF-8 byte one token, id = the byte's value,
/// spelled as GPT-2's `bytes_to_unicode` spells it (the tokenizers library's ByteLevel).
pub fn byte_level_tokenizer() -> String {
    // GPT-2's printable bytes keep their own character; the others map to 256, 257, ...
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    let vocab: serde_json::Map<String, serde_json::Value> = (0u32..256)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            (char::from_u32(c).unwrap().to_string(), json!(b))
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_level_tokenizer_gives_each_byte_its_value() {
        let t = crate::model::tokenizer::Tokenizer::from_json(
            &byte_level_tokenizer(),
            Path::new("byte-level"),
        )
        .unwrap();
        let text = "Hé, world\n";
        let ids = t.encode(text).unwrap();
        let want: Vec<u32> = text.bytes().map(u32::from).collect();
        assert_eq!(ids, want);
    }
}
