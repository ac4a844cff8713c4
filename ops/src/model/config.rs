//! `config.json` of Llama/Mistral-family checkpoints. Fields mirror Hugging Face's; fields we do not
//! use are kept verbatim and written back, so a saved config loses nothing.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::model::ModelError;

/// Llama 3.1's long-context RoPE frequency scaling (`rope_scaling.rope_type = "llama3"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    pub factor: f64,
    #[serde(default = "one")]
    pub low_freq_factor: f64,
    #[serde(default = "four")]
    pub high_freq_factor: f64,
    #[serde(default = "default_original_max")]
    pub original_max_position_embeddings: usize,
}

fn one() -> f64 {
    1.0
}
fn four() -> f64 {
    4.0
}
fn default_original_max() -> usize {
    8192
}

/// The geometry and numerics of a decoder.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Always explicit: Mistral-NeMo and every hidden-pruned model break `hidden / heads`.
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<Value>,
    /// Every other field of the original config.json, written back untouched.
    pub extra: Map<String, Value>,
}

pub const SUPPORTED_ARCHITECTURES: [&str; 2] = ["LlamaForCausalLM", "MistralForCausalLM"];

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<ModelConfig, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, "read", e))?;
        Self::from_json_str(&text).map_err(|why| ModelError::Config {
            path: path.to_path_buf(),
            why,
        })
    }

    pub fn from_json_str(text: &str) -> Result<ModelConfig, String> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let Value::Object(mut map) = value else {
            return Err("expected a JSON object".into());
        };
        let mut take = |k: &str| map.remove(k);
        let architecture = match take("architectures") {
            Some(Value::Array(a)) => a
                .first()
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            _ => String::new(),
        };
        if !SUPPORTED_ARCHITECTURES.contains(&architecture.as_str()) {
            return Err(format!(
                "field `architectures` is {:?}; distillery supports {}",
                architecture,
                SUPPORTED_ARCHITECTURES.join(" and ")
            ));
        }
        fn usize_field(v: Option<Value>, name: &str) -> Result<usize, String> {
            v.and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| format!("field `{name}` is missing or not a non-negative integer"))
        }
        let hidden_size = usize_field(take("hidden_size"), "hidden_size")?;
        let intermediate_size = usize_field(take("intermediate_size"), "intermediate_size")?;
        let num_hidden_layers = usize_field(take("num_hidden_layers"), "num_hidden_layers")?;
        let num_attention_heads = usize_field(take("num_attention_heads"), "num_attention_heads")?;
        let num_key_value_heads = match take("num_key_value_heads") {
            None | Some(Value::Null) => num_attention_heads,
            v => usize_field(v, "num_key_value_heads")?,
        };
        // transformers derives head_dim from hidden/heads when the field is absent; so do we, and we
        // write it back explicitly.
        let head_dim = match take("head_dim") {
            None | Some(Value::Null) => {
                if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
                    return Err("field `head_dim` is missing and hidden_size is not a multiple of num_attention_heads".into());
                }
                hidden_size / num_attention_heads
            }
            v => usize_field(v, "head_dim")?,
        };
        let vocab_size = usize_field(take("vocab_size"), "vocab_size")?;
        let rms_norm_eps = take("rms_norm_eps")
            .and_then(|v| v.as_f64())
            .unwrap_or(1e-6);
        let rope_theta = take("rope_theta")
            .and_then(|v| v.as_f64())
            .unwrap_or(10000.0);
        let rope_scaling = match take("rope_scaling") {
            None | Some(Value::Null) => None,
            Some(v) => {
                let s: RopeScaling = serde_json::from_value(v)
                    .map_err(|e| format!("field `rope_scaling` is not understood: {e}"))?;
                if s.rope_type != "llama3" {
                    return Err(format!(
                        "field `rope_scaling.rope_type` is \"{}\"; distillery supports \"llama3\" (or no scaling)",
                        s.rope_type
                    ));
                }
                Some(s)
            }
        };
        let max_position_embeddings = take("max_position_embeddings")
            .and_then(|v| v.as_u64())
            .unwrap_or(2048) as usize;
        let tie_word_embeddings = take("tie_word_embeddings")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let sliding_window = take("sliding_window")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize);
        let bos_token_id = take("bos_token_id").and_then(|v| v.as_i64());
        let eos_token_id = take("eos_token_id").filter(|v| !v.is_null());
        for (flag, what) in [
            ("attention_bias", "attention biases"),
            ("mlp_bias", "MLP biases"),
        ] {
            if map.get(flag).and_then(Value::as_bool) == Some(true) {
                return Err(format!("field `{flag}` is true; {what} are not supported"));
            }
        }
        if let Some(act) = map.get("hidden_act").and_then(Value::as_str)
            && act != "silu"
        {
            return Err(format!(
                "field `hidden_act` is \"{act}\"; only \"silu\" (SwiGLU) is supported"
            ));
        }
        // Both follow from what we checked; to_json writes them again.
        map.remove("hidden_act");
        map.remove("model_type");
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})"
            ));
        }
        Ok(ModelConfig {
            architecture,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings,
            sliding_window,
            bos_token_id,
            eos_token_id,
            extra: map,
        })
    }

    /// config.json as transformers writes it, with every size explicit.
    pub fn to_json(&self) -> Value {
        let mut map = self.extra.clone();
        let mut set = |k: &str, v: Value| {
            map.insert(k.to_string(), v);
        };
        set(
            "architectures",
            Value::Array(vec![self.architecture.clone().into()]),
        );
        set(
            "model_type",
            (if self.architecture == "MistralForCausalLM" {
                "mistral"
            } else {
                "llama"
            })
            .into(),
        );
        set("hidden_size", self.hidden_size.into());
        set("intermediate_size", self.intermediate_size.into());
        set("num_hidden_layers", self.num_hidden_layers.into());
        set("num_attention_heads", self.num_attention_heads.into());
        set("num_key_value_heads", self.num_key_value_heads.into());
        set("head_dim", self.head_dim.into());
        set("vocab_size", self.vocab_size.into());
        set("rms_norm_eps", self.rms_norm_eps.into());
        set("rope_theta", self.rope_theta.into());
        set(
            "rope_scaling",
            self.rope_scaling
                .as_ref()
                .map(|s| serde_json::to_value(s).unwrap())
                .unwrap_or(Value::Null),
        );
        set(
            "max_position_embeddings",
            self.max_position_embeddings.into(),
        );
        set("tie_word_embeddings", self.tie_word_embeddings.into());
        if self.architecture == "MistralForCausalLM" || self.sliding_window.is_some() {
            set(
                "sliding_window",
                self.sliding_window.map(Value::from).unwrap_or(Value::Null),
            );
        }
        if let Some(b) = self.bos_token_id {
            set("bos_token_id", b.into());
        }
        if let Some(e) = &self.eos_token_id {
            set("eos_token_id", e.clone());
        }
        set("hidden_act", "silu".into());
        Value::Object(
            map.into_iter()
                .collect::<std::collections::BTreeMap<_, _>>()
                .into_iter()
                .collect(),
        )
    }

    /// The first EOS id (some configs list several).
    pub fn eos_id(&self) -> Option<u32> {
        match &self.eos_token_id {
            Some(Value::Number(n)) => n.as_u64().map(|v| v as u32),
            Some(Value::Array(a)) => a.first().and_then(Value::as_u64).map(|v| v as u32),
            _ => None,
        }
    }

    /// Exact parameter counts: (total, without the input embedding).
    pub fn parameter_count(&self) -> (u64, u64) {
        let h = self.hidden_size as u64;
        let f = self.intermediate_size as u64;
        let d = self.head_dim as u64;
        let q = self.num_attention_heads as u64 * d;
        let kv = self.num_key_value_heads as u64 * d;
        let per_layer = h * q + 2 * h * kv + q * h + 3 * h * f + 2 * h;
        let embed = self.vocab_size as u64 * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        let total = embed + self.num_hidden_layers as u64 * per_layer + h + head;
        (total, total - embed)
    }

    /// Shape of every tensor of the checkpoint, by Hugging Face name.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, f, d) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let q = self.num_attention_heads * d;
        let kv = self.num_key_value_heads * d;
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
        )];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![f, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![f, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, f]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nemo() -> ModelConfig {
        ModelConfig::from_json_str(
            r#"{"architectures":["MistralForCausalLM"],"hidden_size":5120,"intermediate_size":14336,
            "num_hidden_layers":40,"num_attention_heads":32,"num_key_value_heads":8,"head_dim":128,
            "vocab_size":131072,"rope_theta":1000000.0,"tie_word_embeddings":false,"sliding_window":null}"#,
        )
        .unwrap()
    }

    #[test]
    fn mistral_nemo_counts_12_2b() {
        let (total, _) = nemo().parameter_count();
        assert!((total as f64 / 12.25e9 - 1.0).abs() < 0.01, "{total}");
    }

    #[test]
    fn unknown_architecture_names_the_field() {
        let e = ModelConfig::from_json_str(r#"{"architectures":["GPT2LMHeadModel"]}"#).unwrap_err();
        assert!(
            e.contains("`architectures`") && e.contains("GPT2LMHeadModel"),
            "{e}"
        );
    }

    #[test]
    fn round_trips_and_keeps_unknown_fields() {
        let mut c = nemo();
        c.extra.insert("torch_dtype".into(), "bfloat16".into());
        let back = ModelConfig::from_json_str(&c.to_json().to_string()).unwrap();
        assert_eq!(back, c);
        assert_eq!(c.to_json()["head_dim"], 128);
    }
}
