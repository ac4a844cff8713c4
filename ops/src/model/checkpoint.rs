//! Loading a model from a Hugging Face checkpoint directory or a GGUF file, and writing Hugging Face
//! checkpoints: config.json with explicit sizes, generation_config.json, shards written one at a
//! time with the index last, tokenizer files, and provenance.

use std::path::{Path, PathBuf};

use crate::model::ModelError;
use crate::model::config::ModelConfig;
use crate::model::gguf;
use crate::model::weights::{DType, TensorMeta, Weights, write_shards};

/// Tokenizer files copied along with a checkpoint.
pub const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
];

/// A model opened for reading.
pub struct LoadedModel {
    pub config: ModelConfig,
    pub weights: Weights,
    /// A Hugging Face `tokenizer.json`, as text (from the directory, or rebuilt from GGUF metadata).
    pub tokenizer_json: Option<String>,
    /// Tokenizer files to copy next to a derived checkpoint.
    pub tokenizer_files: Vec<PathBuf>,
    /// generation_config.json, when the source has one.
    pub generation_config: Option<serde_json::Value>,
    pub path: PathBuf,
}

/// Opens a Hugging Face checkpoint directory or a `.gguf` file, validating it against its config.
pub fn load_model(path: &Path) -> Result<LoadedModel, ModelError> {
    if path.is_file() {
        return gguf::load(path);
    }
    let config = ModelConfig::from_file(&path.join("config.json"))?;
    let weights = Weights::open_safetensors_dir(path)?;
    weights.check_against(&config)?;
    let tokenizer_files: Vec<PathBuf> = TOKENIZER_FILES
        .iter()
        .map(|f| path.join(f))
        .filter(|p| p.is_file())
        .collect();
    let tokenizer_json = std::fs::read_to_string(path.join("tokenizer.json")).ok();
    let generation_config = std::fs::read_to_string(path.join("generation_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    Ok(LoadedModel {
        config,
        weights,
        tokenizer_json,
        tokenizer_files,
        generation_config,
        path: path.to_path_buf(),
    })
}

/// Reads only the config of a model source (a directory with config.json, or a GGUF file's metadata).
pub fn load_config(path: &Path) -> Result<ModelConfig, ModelError> {
    if path.is_file() {
        return gguf::read_config(path);
    }
    ModelConfig::from_file(&path.join("config.json"))
}

/// What to write besides the tensors.
pub struct SaveOptions<'a> {
    pub dtype: DType,
    pub shard_bytes: u64,
    pub tokenizer_json: Option<&'a str>,
    pub tokenizer_files: &'a [PathBuf],
    pub generation_config: Option<&'a serde_json::Value>,
    /// Recipe, step, key, tool version: written to `distillery.json`.
    pub provenance: &'a serde_json::Value,
}

/// Writes a Hugging Face checkpoint into `dir`. `tensor(name)` returns each tensor as f32 in
/// Hugging Face layout when its turn comes; `raw(name)` may return bytes already in `dtype` to be
/// copied bit for bit instead.
pub fn save_checkpoint(
    dir: &Path,
    config: &ModelConfig,
    opts: &SaveOptions,
    mut tensor: impl FnMut(&str) -> Result<Vec<f32>, ModelError>,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, "create", e))?;
    let shapes = config.tensor_shapes();
    let metas: Vec<(String, TensorMeta)> = shapes
        .into_iter()
        .map(|(n, shape)| {
            (
                n,
                TensorMeta {
                    dtype: opts.dtype,
                    shape,
                },
            )
        })
        .collect();
    write_shards(dir, &metas, opts.shard_bytes, |name| {
        Ok(crate::model::weights::f32_to_bytes(
            opts.dtype,
            &tensor(name)?,
        ))
    })?;

    let mut cfg = config.to_json();
    cfg["torch_dtype"] = opts.dtype.torch_name().into();
    cfg["transformers_version"] = "4.46.3".into();
    write_json(&dir.join("config.json"), &cfg)?;
    let generation = match opts.generation_config {
        Some(g) => g.clone(),
        None => {
            let mut g = serde_json::json!({"_from_model_config": true});
            if let Some(b) = config.bos_token_id {
                g["bos_token_id"] = b.into();
            }
            if let Some(e) = &config.eos_token_id {
                g["eos_token_id"] = e.clone();
            }
            g
        }
    };
    write_json(&dir.join("generation_config.json"), &generation)?;
    for f in opts.tokenizer_files {
        let name = f.file_name().unwrap();
        if opts.tokenizer_json.is_some() && name == "tokenizer.json" {
            continue;
        }
        let to = dir.join(name);
        std::fs::copy(f, &to).map_err(|e| ModelError::io(&to, "copy the tokenizer file to", e))?;
    }
    if let Some(t) = opts.tokenizer_json {
        let to = dir.join("tokenizer.json");
        std::fs::write(&to, t).map_err(|e| ModelError::io(&to, "write", e))?;
    }
    write_json(&dir.join("distillery.json"), opts.provenance)?;
    if opts.provenance.get("recipe").is_some() {
        let card = model_card(config, opts.provenance);
        let p = dir.join("README.md");
        std::fs::write(&p, card).map_err(|e| ModelError::io(&p, "write", e))?;
    }
    Ok(())
}

/// A short model card from the provenance: what made this checkpoint and how to reproduce it.
fn model_card(config: &ModelConfig, prov: &serde_json::Value) -> String {
    let (params, non_embed) = config.parameter_count();
    let s = |k: &str| prov[k].as_str().unwrap_or("?").to_string();
    format!(
        "---\nlibrary_name: transformers\ntags: [distillery, minitron, pruning, distillation]\n---\n\n\
         # {recipe} / {step}\n\n\
         Made by [distillery](https://github.com/distillery/distillery) {tool}: step `{step}` (op `{op}`) of recipe\n\
         `{recipe}` (`{file}`), cache key `{key}`.\n\n\
         | | |\n|---|---|\n| architecture | {arch} |\n| parameters | {p:.1}M ({ne:.1}M without embeddings) |\n\
         | layers | {layers} |\n| hidden | {hidden} |\n| ffn | {ffn} |\n| heads / KV heads | {heads} / {kv} |\n| head_dim | {hd} |\n\n\
         Parameters of the step:\n\n```json\n{params}\n```\n\n\
         To reproduce: `distillery run {file} --locked` with the recipe's lock file; `distillery.json` next to\n\
         this card records the recipe, the step, its key and its inputs' keys.\n",
        recipe = s("recipe"),
        step = s("step"),
        op = s("op"),
        key = s("key"),
        file = s("recipe_file"),
        tool = s("tool_version"),
        arch = config.architecture,
        p = params as f64 / 1e6,
        ne = non_embed as f64 / 1e6,
        layers = config.num_hidden_layers,
        hidden = config.hidden_size,
        ffn = config.intermediate_size,
        heads = config.num_attention_heads,
        kv = config.num_key_value_heads,
        hd = config.head_dim,
        params = serde_json::to_string_pretty(&prov["params"]).unwrap_or_default(),
    )
}

pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), ModelError> {
    std::fs::write(path, serde_json::to_string_pretty(value).unwrap() + "\n")
        .map_err(|e| ModelError::io(path, "write", e))
}
