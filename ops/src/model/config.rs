//! `config.json` of Llama/Mistral-family checkpoints. Fields mirror Hugging Face's; fields we do not
//! use are kept verbatim and written back, so a saved config loses nothing.

use std::path::Path;

use serde_json::{Map, Value};

use crate::model::ModelError;

/// RoPE frequency scaling, as transformers' `ROPE_INIT_FUNCTIONS` names the kinds
/// (`modeling_rope_utils.py`). Kinds distillery does not compute (dynamic, yarn, longrope, ...)
/// are refused by name when the config is read, never replaced by a default.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Position interpolation: every inverse frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's long-context scaling: low frequencies divided by `factor`, high ones kept,
    /// a smooth ramp between (wavelengths measured against `original_max_position_embeddings`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

impl RopeScaling {
    /// The `rope_type` transformers uses for this kind.
    pub fn rope_type(&self) -> &'static str {
        match self {
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Llama3 { .. } => "llama3",
        }
    }

    /// The legacy `rope_scaling` object (transformers 4.46+ reads it, 5.x converts it).
    pub fn to_json(&self) -> Value {
        match self {
            RopeScaling::Linear { factor } => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => serde_json::json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
        }
    }
}

/// RoPE kinds transformers knows that distillery does not compute, refused by name.
const UNSUPPORTED_ROPE_TYPES: [&str; 4] = ["dynamic", "yarn", "longrope", "proportional"];

/// RoPE as the config states it: `rope_theta` and scaling from transformers 5's
/// `rope_parameters` or the legacy top-level `rope_theta` / `rope_scaling` (with `type`,
/// `rope_type` or both), which must agree where both are given.
fn parse_rope(map: &mut Map<String, Value>) -> Result<(f64, Option<RopeScaling>), String> {
    let legacy_theta = match map.remove("rope_theta") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_f64()
                .ok_or_else(|| format!("field `rope_theta` is {v}, not a number"))?,
        ),
    };
    let legacy_scaling = match map.remove("rope_scaling") {
        None | Some(Value::Null) => None,
        Some(Value::Object(o)) => Some(o),
        Some(v) => {
            return Err(format!(
                "field `rope_scaling` is {v}, not an object or null"
            ));
        }
    };
    let params = match map.remove("rope_parameters") {
        None | Some(Value::Null) => None,
        Some(Value::Object(o)) => Some(o),
        Some(v) => {
            return Err(format!(
                "field `rope_parameters` is {v}, not an object or null"
            ));
        }
    };
    if let Some(p) = &params
        && p.values().any(Value::is_object)
    {
        return Err("field `rope_parameters` holds one set per layer type (Gemma-3 style); this architecture has one RoPE for all layers".into());
    }
    // `partial_rotary_factor` (top level in 4.x, inside rope_parameters in 5.x) rotates only
    // part of each head; the Llama/Mistral decoder rotates it whole.
    for (field, v) in [
        ("partial_rotary_factor", map.remove("partial_rotary_factor")),
        (
            "rope_parameters.partial_rotary_factor",
            params
                .as_ref()
                .and_then(|p| p.get("partial_rotary_factor").cloned()),
        ),
    ] {
        if let Some(v) = v.filter(|v| !v.is_null())
            && v.as_f64() != Some(1.0)
        {
            return Err(format!(
                "field `{field}` is {v}; this architecture rotates whole heads (1.0)"
            ));
        }
    }
    let params_theta = params.as_ref().and_then(|p| p.get("rope_theta")).map(|v| {
        v.as_f64()
            .ok_or_else(|| format!("field `rope_parameters.rope_theta` is {v}, not a number"))
    });
    let params_theta = params_theta.transpose()?;
    let theta = match (legacy_theta, params_theta) {
        (Some(a), Some(b)) if a != b => {
            return Err(format!(
                "fields `rope_theta` ({a}) and `rope_parameters.rope_theta` ({b}) disagree; keep one"
            ));
        }
        (a, b) => b.or(a).unwrap_or(10000.0), // transformers' default for Llama and Mistral
    };
    let had_both = legacy_scaling.is_some() && params.is_some();
    if let Some(v) = legacy_scaling.as_ref().and_then(|o| o.get("rope_theta"))
        && v.as_f64() != Some(theta)
    {
        return Err(format!(
            "field `rope_scaling.rope_theta` is {v} but the model's rope_theta is {theta}; keep one"
        ));
    }
    let scaling_legacy = legacy_scaling
        .map(|o| parse_scaling("rope_scaling", &o))
        .transpose()?
        .flatten();
    let scaling_params = params
        .map(|o| parse_scaling("rope_parameters", &o))
        .transpose()?
        .flatten();
    // transformers 5 takes `rope_scaling` whole when present and 4.46 never reads
    // `rope_parameters`: with both objects given, they must say the same thing.
    let scaling = if had_both {
        if scaling_legacy != scaling_params {
            let show = |s: &Option<RopeScaling>| {
                s.as_ref()
                    .map(|s| s.to_json().to_string())
                    .unwrap_or_else(|| "no scaling".into())
            };
            return Err(format!(
                "fields `rope_scaling` ({}) and `rope_parameters` ({}) disagree; keep one",
                show(&scaling_legacy),
                show(&scaling_params)
            ));
        }
        scaling_params
    } else {
        scaling_params.or(scaling_legacy)
    };
    Ok((theta, scaling))
}

/// One scaling object (`rope_scaling` or `rope_parameters`); `None` for the default kind.
fn parse_scaling(field: &str, o: &Map<String, Value>) -> Result<Option<RopeScaling>, String> {
    let kind = match (o.get("rope_type"), o.get("type")) {
        (Some(a), Some(b)) if a != b => {
            return Err(format!(
                "field `{field}` has `rope_type` {a} and `type` {b}, which disagree; keep one"
            ));
        }
        (Some(v), _) | (None, Some(v)) => v
            .as_str()
            .ok_or_else(|| format!("field `{field}.rope_type` is {v}, not a string"))?
            .to_string(),
        (None, None) if field == "rope_parameters" => "default".into(),
        (None, None) => return Err(format!("field `{field}` has no `rope_type` (or `type`)")),
    };
    let allowed: &[&str] = match kind.as_str() {
        "default" => &[],
        "linear" => &["factor"],
        "llama3" => &[
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ],
        k if UNSUPPORTED_ROPE_TYPES.contains(&k) => {
            return Err(format!(
                "field `{field}.rope_type` is \"{k}\": distillery computes the \"default\", \"linear\" and \"llama3\" RoPE kinds, not \"{k}\""
            ));
        }
        k => {
            return Err(format!(
                "field `{field}.rope_type` is \"{k}\", a RoPE kind distillery does not know (it computes \"default\", \"linear\" and \"llama3\")"
            ));
        }
    };
    for k in o.keys() {
        let always = ["rope_type", "type", "rope_theta", "partial_rotary_factor"];
        if !always.contains(&k.as_str()) && !allowed.contains(&k.as_str()) {
            return Err(format!(
                "field `{field}.{k}` is not understood for rope_type \"{kind}\" (it would change the model's RoPE)"
            ));
        }
    }
    let num = |k: &str| -> Result<Option<f64>, String> {
        o.get(k)
            .filter(|v| !v.is_null())
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| format!("field `{field}.{k}` is {v}, not a number"))
            })
            .transpose()
    };
    let factor = || -> Result<f64, String> {
        let f = num("factor")?
            .ok_or_else(|| format!("field `{field}.factor` is missing for rope_type \"{kind}\""))?;
        if f < 1.0 {
            return Err(format!(
                "field `{field}.factor` is {f}; it must be at least 1"
            ));
        }
        Ok(f)
    };
    Ok(match kind.as_str() {
        "default" => None,
        "linear" => Some(RopeScaling::Linear { factor: factor()? }),
        _ => {
            // transformers requires all four (its llama3 initializer reads them unguarded).
            let need = |k: &str| -> Result<f64, String> {
                num(k)?.ok_or_else(|| {
                    format!("field `{field}.{k}` is missing; rope_type \"llama3\" needs it")
                })
            };
            let original = need("original_max_position_embeddings")? as usize;
            if original == 0 {
                return Err(format!(
                    "field `{field}.original_max_position_embeddings` is 0; it must be positive"
                ));
            }
            Some(RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max_position_embeddings: original,
            })
        }
    })
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
    /// Per layer, `"full_attention"` or `"sliding_attention"` (transformers' `layer_types`),
    /// checked against what the architecture runs; kept to be written back, sliced with the
    /// layers. `None` when the config has none.
    pub layer_types: Option<Vec<String>>,
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
        let (rope_theta, rope_scaling) = parse_rope(&mut map)?;
        // transformers 5 writes `dtype`, 4.x `torch_dtype`; read either (they must agree), and
        // `to_json` writes both with one value, for readers of either era.
        match (map.remove("dtype"), map.remove("torch_dtype")) {
            (Some(a), Some(b)) if !a.is_null() && !b.is_null() && a != b => {
                return Err(format!(
                    "fields `dtype` ({a}) and `torch_dtype` ({b}) disagree; keep one"
                ));
            }
            (a, b) => {
                if let Some(v) = a.filter(|v| !v.is_null()).or(b) {
                    map.insert("dtype".into(), v);
                }
            }
        }
        let mut take = |k: &str| map.remove(k);
        let model_type = take("model_type");
        let architecture = match take("architectures") {
            Some(Value::Array(a)) if !a.is_empty() => {
                if a.len() > 1 {
                    return Err(format!(
                        "field `architectures` lists {} classes; a checkpoint of one model names one",
                        a.len()
                    ));
                }
                a[0].as_str()
                    .ok_or_else(|| format!("field `architectures` is {a:?}, not a list of names"))?
                    .to_string()
            }
            None | Some(Value::Null) | Some(Value::Array(_)) => {
                // As transformers' AutoModelForCausalLM does: the class from `model_type`.
                match model_type.as_ref().and_then(Value::as_str) {
                    Some("llama") => "LlamaForCausalLM".to_string(),
                    Some("mistral") => "MistralForCausalLM".to_string(),
                    Some(other) => {
                        return Err(format!(
                            "field `architectures` is missing and `model_type` is \"{other}\"; distillery supports {}",
                            SUPPORTED_ARCHITECTURES.join(" and ")
                        ));
                    }
                    None => {
                        return Err(
                            "fields `architectures` and `model_type` are both missing; add \"architectures\": [\"LlamaForCausalLM\"] (or the model's class)".into(),
                        );
                    }
                }
            }
            Some(v) => return Err(format!("field `architectures` is {v}, not a list of names")),
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
        let max_position_embeddings = take("max_position_embeddings")
            .and_then(|v| v.as_u64())
            .unwrap_or(2048) as usize;
        let tie_word_embeddings = take("tie_word_embeddings")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let sliding_window = match take("sliding_window") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                format!("field `sliding_window` is {v}, not a positive integer or null")
            })? as usize),
        };
        let layer_types = match take("layer_types") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) => {
                let mut kinds = Vec::with_capacity(a.len());
                for (i, v) in a.iter().enumerate() {
                    match v.as_str() {
                        Some(k @ ("full_attention" | "sliding_attention")) => {
                            kinds.push(k.to_string())
                        }
                        _ => {
                            return Err(format!(
                                "field `layer_types[{i}]` is {v}; this architecture has \"full_attention\" and \"sliding_attention\" layers"
                            ));
                        }
                    }
                }
                if kinds.len() != num_hidden_layers {
                    return Err(format!(
                        "field `layer_types` has {} entries for {num_hidden_layers} layers (num_hidden_layers)",
                        kinds.len()
                    ));
                }
                // Llama and Mistral have one attention for every layer: Mistral windows all of
                // them by `sliding_window`, Llama none (transformers ignores the field for it).
                // Per-layer kinds that say otherwise describe a model these classes do not run.
                let windowed = architecture == "MistralForCausalLM" && sliding_window.is_some();
                let want = if windowed {
                    "sliding_attention"
                } else {
                    "full_attention"
                };
                if let Some(i) = kinds.iter().position(|k| k != want) {
                    return Err(format!(
                        "field `layer_types[{i}]` is \"{}\", but {architecture} with sliding_window {} runs every layer as \"{want}\" (per-layer attention kinds belong to other architectures)",
                        kinds[i],
                        sliding_window.map_or("null".to_string(), |w| w.to_string())
                    ));
                }
                Some(kinds)
            }
            Some(v) => return Err(format!("field `layer_types` is {v}, not a list")),
        };
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
        // Follows from what we checked; to_json writes it again (and model_type).
        map.remove("hidden_act");
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
            layer_types,
            bos_token_id,
            eos_token_id,
            extra: map,
        })
    }

    /// The attention window of layer `layer` (`None`: full causal attention), as transformers
    /// runs the architecture: Mistral windows every layer by `sliding_window`; Llama ignores it.
    pub fn window_of(&self, _layer: usize) -> Option<usize> {
        if self.architecture == "LlamaForCausalLM" {
            None
        } else {
            self.sliding_window
        }
    }

    /// The config after keeping only layers `kept` (indices into this config's layers, in
    /// order): the layer count and every per-layer list follow.
    pub fn keep_layers(&self, kept: &[usize]) -> ModelConfig {
        let mut c = self.clone();
        c.num_hidden_layers = kept.len();
        c.layer_types = self
            .layer_types
            .as_ref()
            .map(|k| kept.iter().map(|&l| k[l].clone()).collect());
        c
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
        // RoPE in the legacy keys only: transformers 4.46+ reads them, 5.x converts them into
        // `rope_parameters` (written alongside, they could only contradict each other).
        set("rope_theta", self.rope_theta.into());
        set(
            "rope_scaling",
            self.rope_scaling
                .as_ref()
                .map(RopeScaling::to_json)
                .unwrap_or(Value::Null),
        );
        if let Some(kinds) = &self.layer_types {
            set("layer_types", serde_json::to_value(kinds).unwrap());
        }
        if let Some(d) = self.extra.get("dtype").cloned() {
            set("torch_dtype", d);
        }
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

    /// A tiny Llama config with `extra` fields merged in (as transformers 4.x or 5.x writes them).
    fn with(extra: &str) -> Result<ModelConfig, String> {
        let mut v: Value = serde_json::from_str(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":96,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,
            "vocab_size":128,"max_position_embeddings":256}"#,
        )
        .unwrap();
        let e: Value = serde_json::from_str(extra).unwrap();
        for (k, x) in e.as_object().unwrap() {
            if x.is_null() {
                v.as_object_mut().unwrap().remove(k);
            } else {
                v[k] = x.clone();
            }
        }
        ModelConfig::from_json_str(&v.to_string())
    }

    #[test]
    fn transformers5_rope_parameters_are_read() {
        let c =
            with(r#"{"rope_parameters":{"rope_theta":500000.0,"rope_type":"default"}}"#).unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling.clone()), (500000.0, None));
        let c = with(
            r#"{"rope_parameters":{"rope_theta":500000.0,"rope_type":"llama3","factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":64}}"#,
        )
        .unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(
            c.rope_scaling,
            Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64
            })
        );
        // Written back in the legacy keys only, which both 4.46 and 5.x read: no contradiction.
        let j = c.to_json();
        assert!(j.get("rope_parameters").is_none(), "{j}");
        assert_eq!(j["rope_theta"], 500000.0);
        assert_eq!(j["rope_scaling"]["rope_type"], "llama3");
        assert_eq!(ModelConfig::from_json_str(&j.to_string()).unwrap(), c);
    }

    #[test]
    fn legacy_rope_scaling_spellings() {
        let both = with(
            r#"{"rope_theta":500000.0,"rope_scaling":{"type":"llama3","rope_type":"llama3","factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":64}}"#,
        )
        .unwrap();
        assert!(matches!(
            both.rope_scaling,
            Some(RopeScaling::Llama3 { .. })
        ));
        let linear = with(r#"{"rope_scaling":{"type":"linear","factor":2.0}}"#).unwrap();
        assert_eq!(
            linear.rope_scaling,
            Some(RopeScaling::Linear { factor: 2.0 })
        );
        assert_eq!(linear.rope_theta, 10000.0);
        let e = with(r#"{"rope_scaling":{"type":"linear","rope_type":"dynamic","factor":2.0}}"#)
            .unwrap_err();
        assert!(e.contains("disagree"), "{e}");
    }

    #[test]
    fn rope_that_is_not_computed_is_refused_by_name() {
        for (json, words) in [
            (
                r#"{"rope_scaling":{"rope_type":"yarn","factor":4.0}}"#,
                ["`rope_scaling.rope_type`", "yarn"],
            ),
            (
                r#"{"rope_parameters":{"rope_type":"dynamic","factor":2.0,"rope_theta":1e4}}"#,
                ["rope_parameters", "dynamic"],
            ),
            (
                r#"{"rope_parameters":{"rope_type":"longrope","rope_theta":1e4}}"#,
                ["rope_parameters", "longrope"],
            ),
            (
                r#"{"rope_scaling":{"rope_type":"linear","factor":2.0,"beta_fast":32}}"#,
                ["beta_fast", "not understood"],
            ),
            (
                r#"{"rope_theta":1e4,"rope_parameters":{"rope_theta":5e5}}"#,
                ["disagree", "rope_theta"],
            ),
            (
                r#"{"rope_scaling":{"rope_type":"linear","factor":2.0},"rope_parameters":{"rope_type":"default","rope_theta":1e4}}"#,
                ["disagree", "no scaling"],
            ),
            (
                r#"{"rope_theta":1e4,"rope_scaling":{"rope_type":"linear","factor":2.0,"rope_theta":5e5}}"#,
                ["rope_scaling.rope_theta", "keep one"],
            ),
            (
                r#"{"partial_rotary_factor":0.5}"#,
                ["partial_rotary_factor", "0.5"],
            ),
            (
                r#"{"rope_scaling":{"rope_type":"llama3","factor":8.0}}"#,
                ["is missing", "llama3"],
            ),
            (
                r#"{"rope_parameters":{"full_attention":{"rope_theta":1e6},"sliding_attention":{"rope_theta":1e4}}}"#,
                ["per layer type", "rope_parameters"],
            ),
        ] {
            let e = with(json).unwrap_err();
            assert!(words.iter().all(|w| e.contains(w)), "{json}: {e}");
        }
    }

    #[test]
    fn architectures_dtype_and_layer_types() {
        let c = with(r#"{"architectures":null,"model_type":"mistral"}"#).unwrap();
        assert_eq!(c.architecture, "MistralForCausalLM");
        let e = with(r#"{"architectures":null,"model_type":"gpt2"}"#).unwrap_err();
        assert!(e.contains("missing") && e.contains("gpt2"), "{e}");
        let e = with(r#"{"architectures":null}"#).unwrap_err();
        assert!(e.contains("both missing"), "{e}");
        let c = with(r#"{"dtype":"bfloat16"}"#).unwrap();
        assert_eq!(c.to_json()["dtype"], "bfloat16");
        assert_eq!(c.to_json()["torch_dtype"], "bfloat16");
        let c = with(r#"{"torch_dtype":"float16"}"#).unwrap();
        assert_eq!(c.to_json()["dtype"], "float16");
        assert_eq!(
            ModelConfig::from_json_str(&c.to_json().to_string()).unwrap(),
            c
        );
        assert!(with(r#"{"dtype":"bfloat16","torch_dtype":"float32"}"#).is_err());
        let e = with(r#"{"layer_types":["full_attention"]}"#).unwrap_err();
        assert!(e.contains("1 entries for 2 layers"), "{e}");
        let e = with(r#"{"layer_types":["full_attention","sliding_attention"]}"#).unwrap_err();
        assert!(
            e.contains("layer_types[1]") && e.contains("full_attention"),
            "{e}"
        );
        // Mistral windows every layer; mixed kinds are another architecture's model.
        let mistral = r#""architectures":["MistralForCausalLM"],"sliding_window":8"#;
        let e = with(&format!(
            r#"{{{mistral},"layer_types":["sliding_attention","full_attention"]}}"#
        ))
        .unwrap_err();
        assert!(e.contains("layer_types[1]"), "{e}");
        let c = with(&format!(
            r#"{{{mistral},"layer_types":["sliding_attention","sliding_attention"]}}"#
        ))
        .unwrap();
        assert_eq!((c.window_of(0), c.window_of(1)), (Some(8), Some(8)));
        let kept = c.keep_layers(&[1]);
        assert_eq!(
            kept.layer_types,
            Some(vec!["sliding_attention".to_string()])
        );
        assert_eq!(kept.to_json()["layer_types"].as_array().unwrap().len(), 1);
        // Llama ignores sliding_window, as transformers does.
        let c = with(r#"{"sliding_window":8}"#).unwrap();
        assert_eq!((c.window_of(0), c.window_of(1)), (None, None));
    }

    #[test]
    fn round_trips_and_keeps_unknown_fields() {
        let mut c = nemo();
        c.extra.insert("dtype".into(), "bfloat16".into());
        let back = ModelConfig::from_json_str(&c.to_json().to_string()).unwrap();
        assert_eq!(back, c);
        assert_eq!(c.to_json()["head_dim"], 128);
    }
}
