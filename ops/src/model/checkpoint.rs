//! Loading a model from a Hugging Face checkpoint directory or a GGUF file, and writing Hugging Face
//! checkpoints: config.json with explicit sizes, generation_config.json, shards written one at a
//! time with the index last, tokenizer files, and provenance.

use std::path::{Path, PathBuf};

use crate::model::ModelError;
use crate::model::config::ModelConfig;
use crate::model::gguf;
use crate::model::weights::{DType, TensorMeta, Weights, write_shards};

/// Tokenizer files copied along with a checkpoint.
pub const TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    // transformers 5 saves the chat template here rather than in tokenizer_config.json.
    "chat_template.jinja",
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
    /// A tokenizer_config.json made for a source that has no such file (a directory with only
    /// tokenizer.json: its special tokens from config.json; a GGUF: its chat template and
    /// special tokens); None for a directory, whose own file is among `tokenizer_files`.
    pub tokenizer_config: Option<serde_json::Value>,
    pub path: PathBuf,
}

impl LoadedModel {
    /// A special token of the tokenizer (`"bos_token"`, `"eos_token"`, ...) as transformers'
    /// tokenizer sees it: from tokenizer_config.json, else special_tokens_map.json (a string or
    /// an `{"content": ...}` object); `None` when the tokenizer has no such token.
    pub fn special_token(&self, key: &str) -> Option<String> {
        let read = |name: &str| -> Option<serde_json::Value> {
            let file = self.tokenizer_files.iter().find(|f| f.ends_with(name))?;
            serde_json::from_str(&std::fs::read_to_string(file).ok()?).ok()
        };
        let pick = |v: &serde_json::Value| -> Option<String> {
            let t = v.get(key)?;
            t.as_str()
                .or_else(|| t["content"].as_str())
                .map(String::from)
        };
        self.tokenizer_config
            .as_ref()
            .and_then(pick)
            .or_else(|| read("tokenizer_config.json").as_ref().and_then(pick))
            .or_else(|| read("special_tokens_map.json").as_ref().and_then(pick))
    }
}

/// The GGUF file a model source is: the path itself, or the one `.gguf` file of a directory
/// without config.json (an `export_gguf` output).
pub fn gguf_file(path: &Path) -> Option<PathBuf> {
    if path.is_file() {
        return Some(path.to_path_buf());
    }
    if path.join("config.json").exists() {
        return None;
    }
    let mut ggufs = std::fs::read_dir(path)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"));
    let first = ggufs.next()?;
    ggufs.next().is_none().then_some(first)
}

/// Opens a Hugging Face checkpoint directory or a `.gguf` file, validating it against its config.
pub fn load_model(path: &Path) -> Result<LoadedModel, ModelError> {
    if let Some(file) = gguf_file(path) {
        return gguf::load(&file);
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
    // A tokenizer.json without tokenizer_config.json: the special tokens every derived checkpoint
    // will name (`save_checkpoint` writes this file), so that a teacher and its pruned student are
    // scored with the same prefix token.
    let has_config = tokenizer_files
        .iter()
        .any(|f| f.ends_with("tokenizer_config.json"));
    let tokenizer_config = match &tokenizer_json {
        Some(json) if !has_config => {
            let mut tc = tokenizer_config(&config, json, None, None);
            // special_tokens_map.json, where there is one, names them as transformers reads it.
            let map: Option<serde_json::Value> =
                std::fs::read_to_string(path.join("special_tokens_map.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok());
            for (key, value) in map.iter().flat_map(|m| m.as_object()).flatten() {
                let text = value.as_str().or_else(|| value["content"].as_str());
                if let Some(text) = text {
                    tc[key] = text.into();
                }
            }
            Some(tc)
        }
        _ => None,
    };
    Ok(LoadedModel {
        config,
        weights,
        tokenizer_json,
        tokenizer_files,
        generation_config,
        tokenizer_config,
        path: path.to_path_buf(),
    })
}

/// Reads only the config of a model source (a directory with config.json, or a GGUF file's metadata).
pub fn load_config(path: &Path) -> Result<ModelConfig, ModelError> {
    if let Some(file) = gguf_file(path) {
        return gguf::read_config(&file);
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
    /// Written as tokenizer_config.json when `tokenizer_files` has none.
    pub tokenizer_config: Option<&'a serde_json::Value>,
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
    // The dtype the shards hold, under both spellings (5.x reads `dtype`, 4.x-era tools
    // `torch_dtype`), one value.
    cfg["dtype"] = opts.dtype.torch_name().into();
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
    // Without tokenizer_config.json, transformers' AutoTokenizer falls back to the architecture's
    // slow-tokenizer defaults (Llama: `<s>`, `</s>`, `<unk>` appended past the vocabulary).
    let has_config = opts
        .tokenizer_files
        .iter()
        .any(|f| f.file_name().is_some_and(|n| n == "tokenizer_config.json"));
    if !has_config && dir.join("tokenizer.json").is_file() {
        let generated;
        let tc = match opts.tokenizer_config {
            Some(tc) => tc,
            None => {
                let json = std::fs::read_to_string(dir.join("tokenizer.json"))
                    .map_err(|e| ModelError::io(&dir.join("tokenizer.json"), "read", e))?;
                generated = tokenizer_config(config, &json, None, None);
                &generated
            }
        };
        write_json(&dir.join("tokenizer_config.json"), tc)?;
    }
    write_json(&dir.join("distillery.json"), opts.provenance)?;
    if opts.provenance.get("recipe").is_some() {
        let card = model_card(config, opts.provenance);
        let p = dir.join("README.md");
        std::fs::write(&p, card).map_err(|e| ModelError::io(&p, "write", e))?;
    }
    Ok(())
}

/// A tokenizer_config.json for a `tokenizer.json` that came without one: the fast tokenizer class
/// (so nothing is added to the vocabulary), the BOS/EOS tokens named by `config`, the context
/// length, and a chat template where the source had one.
pub fn tokenizer_config(
    config: &ModelConfig,
    tokenizer_json: &str,
    chat_template: Option<&str>,
    add_bos_token: Option<bool>,
) -> serde_json::Value {
    let parsed: serde_json::Value = serde_json::from_str(tokenizer_json).unwrap_or_default();
    let content = |id: i64| -> Option<String> {
        let added = parsed["added_tokens"].as_array().and_then(|a| {
            a.iter()
                .find(|t| t["id"].as_i64() == Some(id))
                .and_then(|t| t["content"].as_str())
        });
        let vocab = || {
            parsed["model"]["vocab"]
                .as_object()?
                .iter()
                .find(|(_, v)| v.as_i64() == Some(id))
                .map(|(k, _)| k.as_str())
        };
        added.or_else(vocab).map(String::from)
    };
    let mut tc = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config.max_position_embeddings,
        "clean_up_tokenization_spaces": false,
    });
    if let Some(bos) = config.bos_token_id.and_then(content) {
        tc["bos_token"] = bos.into();
    }
    let eos = match &config.eos_token_id {
        Some(serde_json::Value::Array(ids)) => ids.first().and_then(|v| v.as_i64()),
        Some(v) => v.as_i64(),
        None => None,
    };
    if let Some(eos) = eos.and_then(content) {
        tc["eos_token"] = eos.into();
    }
    if let Some(t) = chat_template {
        tc["chat_template"] = t.into();
    }
    if let Some(b) = add_bos_token {
        tc["add_bos_token"] = b.into();
    }
    tc
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
        arch = config.architecture(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_tokenizer_json_gets_a_fast_tokenizer_config_naming_its_special_tokens() {
        let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden");
        let m = load_model(&golden.join("llama-gqa-tied-f32")).unwrap();
        let mut config = m.config.clone();
        config.bos_token_id = Some(1);
        config.eos_token_id = Some(serde_json::json!([2, 1]));
        let json = std::fs::read_to_string(golden.join("char-tokenizer.json")).unwrap();
        let out = tempfile::tempdir().unwrap();
        let provenance = serde_json::json!({});
        let opts = SaveOptions {
            dtype: DType::F32,
            shard_bytes: u64::MAX,
            tokenizer_json: Some(&json),
            tokenizer_files: &[],
            generation_config: None,
            tokenizer_config: None,
            provenance: &provenance,
        };
        save_checkpoint(out.path(), &config, &opts, |n| Ok(m.weights.f32(n)?.1)).unwrap();
        let tc: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.path().join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(tc["tokenizer_class"], "PreTrainedTokenizerFast");
        assert_eq!(tc["bos_token"], "<s>");
        assert_eq!(tc["eos_token"], "</s>");
        assert_eq!(tc["model_max_length"], config.max_position_embeddings);
        assert!(tc.get("chat_template").is_none());

        // The source itself, without tokenizer_config.json, names the same special tokens as
        // the checkpoint written from it: one prefix token for a teacher and its student.
        let src = tempfile::tempdir().unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(out.path().join(f), src.path().join(f)).unwrap();
        }
        std::fs::write(src.path().join("tokenizer.json"), &json).unwrap();
        let source = load_model(src.path()).unwrap();
        let derived = load_model(out.path()).unwrap();
        for key in ["bos_token", "eos_token"] {
            assert_eq!(
                source.special_token(key),
                derived.special_token(key),
                "{key}"
            );
        }
        assert_eq!(source.special_token("bos_token").as_deref(), Some("<s>"));
    }
}
