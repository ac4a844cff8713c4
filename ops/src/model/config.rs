//! `config.json` of Llama/Mistral-family checkpoints. Fields mirror Hugging Face's; fields we do not
//! use are kept verbatim and written back, so a saved config loses nothing.

use std::path::Path;

use serde_json::{Map, Value};

use crate::model::ModelError;
use crate::model::arch::{
    Activation, AttentionBias, AxisSizes, DefaultPattern, Family, Role, TensorFeatures, TensorSpec,
    WindowRule, tensor_specs,
};

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

/// RoPE as a config states it (one set; Gemma 3 has one per layer type).
#[derive(Clone, Debug, PartialEq)]
pub struct RopeSet {
    pub theta: f64,
    pub scaling: Option<RopeScaling>,
}

/// Reads a number field that may be absent or null.
fn opt_f64(v: Option<Value>, field: &str) -> Result<Option<f64>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| format!("field `{field}` is {v}, not a number")),
    }
}

/// Takes an object field that may be absent or null.
fn opt_object(
    map: &mut Map<String, Value>,
    field: &str,
) -> Result<Option<Map<String, Value>>, String> {
    match map.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(v) => Err(format!("field `{field}` is {v}, not an object or null")),
    }
}

/// RoPE as the config states it: `rope_theta`, scaling and `partial_rotary_factor` from
/// transformers 5's `rope_parameters` or the legacy top-level `rope_theta` / `rope_scaling` (with
/// `type`, `rope_type` or both) / `partial_rotary_factor`, which must agree where both are given.
/// For a family with RoPE per layer type (Gemma 3) also the sliding layers' set, from
/// `rope_parameters.sliding_attention` or the legacy `rope_local_base_freq`. Returns the (full
/// attention) set, the rotary fraction and the local set.
fn parse_rope(
    map: &mut Map<String, Value>,
    family: &Family,
) -> Result<(RopeSet, f64, Option<RopeSet>), String> {
    let legacy_theta = opt_f64(map.remove("rope_theta"), "rope_theta")?;
    let legacy_scaling = opt_object(map, "rope_scaling")?;
    let legacy_local = opt_f64(map.remove("rope_local_base_freq"), "rope_local_base_freq")?;
    let legacy_partial = opt_f64(map.remove("partial_rotary_factor"), "partial_rotary_factor")?;
    let mut params = opt_object(map, "rope_parameters")?;
    let mut local_params = None;
    if let Some(p) = &params
        && p.values().any(Value::is_object)
    {
        if !family.rope_per_layer_type {
            return Err(format!(
                "field `rope_parameters` holds one set per layer type (Gemma-3 style); {} has one RoPE for all layers",
                family.architecture
            ));
        }
        let mut p = params.take().unwrap();
        let mut take = |k: &str| match p.remove(k) {
            Some(Value::Object(o)) => Ok(o),
            other => Err(format!(
                "field `rope_parameters.{k}` is {}, not an object",
                other
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "missing".into())
            )),
        };
        params = Some(take("full_attention")?);
        local_params = Some(take("sliding_attention")?);
        if let Some(k) = p.keys().next() {
            return Err(format!(
                "field `rope_parameters.{k}` names a layer type distillery does not know (it reads full_attention and sliding_attention)"
            ));
        }
    }
    // `partial_rotary_factor` (top level in 4.x, inside rope_parameters in 5.x): the fraction of
    // each head that is rotated.
    let params_partial = opt_f64(
        params
            .as_ref()
            .and_then(|p| p.get("partial_rotary_factor").cloned()),
        "rope_parameters.partial_rotary_factor",
    )?;
    let partial = match (legacy_partial, params_partial) {
        (Some(a), Some(b)) if a != b => {
            return Err(format!(
                "fields `partial_rotary_factor` ({a}) and `rope_parameters.partial_rotary_factor` ({b}) disagree; keep one"
            ));
        }
        (a, b) => b.or(a).unwrap_or(family.default_partial_rotary),
    };
    if partial != 1.0 && !family.partial_rotary {
        return Err(format!(
            "field `partial_rotary_factor` is {partial}; {} rotates whole heads (1.0)",
            family.architecture
        ));
    }
    if !(partial > 0.0 && partial <= 1.0) {
        return Err(format!(
            "field `partial_rotary_factor` is {partial}; it must be in (0, 1]"
        ));
    }
    let params_theta = opt_f64(
        params.as_ref().and_then(|p| p.get("rope_theta").cloned()),
        "rope_parameters.rope_theta",
    )?;
    let theta = match (legacy_theta, params_theta) {
        (Some(a), Some(b)) if a != b => {
            return Err(format!(
                "fields `rope_theta` ({a}) and `rope_parameters.rope_theta` ({b}) disagree; keep one"
            ));
        }
        (a, b) => b.or(a).unwrap_or(family.default_rope_theta),
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
    let params_field = if local_params.is_some() {
        "rope_parameters.full_attention"
    } else {
        "rope_parameters"
    };
    let scaling_params = params
        .map(|o| parse_scaling(params_field, &o))
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
    let local = if family.rope_per_layer_type {
        let field = "rope_parameters.sliding_attention";
        let (theta_l, scaling_l) = match &local_params {
            Some(o) => (
                opt_f64(o.get("rope_theta").cloned(), &format!("{field}.rope_theta"))?,
                parse_scaling(field, o)?,
            ),
            None => (None, None),
        };
        let theta_l = match (legacy_local, theta_l) {
            (Some(a), Some(b)) if a != b => {
                return Err(format!(
                    "fields `rope_local_base_freq` ({a}) and `{field}.rope_theta` ({b}) disagree; keep one"
                ));
            }
            // transformers' default local base for Gemma 3.
            (a, b) => b.or(a).unwrap_or(10000.0),
        };
        Some(RopeSet {
            theta: theta_l,
            scaling: scaling_l,
        })
    } else {
        if legacy_local.is_some() {
            return Err(format!(
                "field `rope_local_base_freq` is not understood for {} (it has one RoPE for all layers)",
                family.architecture
            ));
        }
        None
    };
    if scaling.is_some() && !family.rope_scaling {
        return Err(format!(
            "field `rope_scaling` is {}; {} accepts no linear or llama3 scaling (transformers refuses it)",
            scaling.as_ref().unwrap().to_json(),
            family.architecture
        ));
    }
    Ok((RopeSet { theta, scaling }, partial, local))
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
    /// The family (`architectures[0]`): everything about the forward the fields below don't say.
    pub family: &'static Family,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Always explicit: Mistral-NeMo and every hidden-pruned model break `hidden / heads`.
    pub head_dim: usize,
    pub vocab_size: usize,
    /// The norms' epsilon (`rms_norm_eps`, Nemotron's `norm_eps`).
    pub norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    /// The fraction of each head RoPE rotates (Nemotron 0.5; 1 elsewhere): the first
    /// `head_dim * factor` dimensions, pairs (i, i + rotary_dim / 2).
    pub partial_rotary_factor: f64,
    /// Gemma 3's RoPE for sliding-window layers (`None`: every layer uses the one above).
    pub rope_local: Option<RopeSet>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub sliding_window: Option<usize>,
    /// Per layer, `"full_attention"` or `"sliding_attention"` (transformers' `layer_types`): as
    /// read, or derived by the family's rule when the config has none and the family has
    /// per-layer kinds; checked against what the architecture runs; sliced with the layers.
    pub layer_types: Option<Vec<String>>,
    pub hidden_act: Activation,
    /// Biases on q/k/v and on o (as the family and `attention_bias` say).
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Gemma 2: `tanh(x / cap) * cap` on attention scores and on the final logits.
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    /// Gemma: attention scaled by `query_pre_attn_scalar^-0.5`.
    pub query_pre_attn_scalar: Option<f64>,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<Value>,
    /// Every other field of the original config.json, written back untouched.
    pub extra: Map<String, Value>,
}

/// Fields that change the forward of some model and that no supported family reads: refused by
/// name wherever they hold anything but their neutral value, never ignored.
const FOREIGN_FORWARD_FIELDS: [(&str, &str); 8] = [
    ("quantization_config", "quantized weights"),
    ("num_experts", "mixture of experts"),
    ("num_local_experts", "mixture of experts"),
    ("embedding_multiplier", "Granite's embedding multiplier"),
    ("logits_scaling", "Granite's logit scaling"),
    ("residual_multiplier", "Granite's residual multiplier"),
    ("attention_multiplier", "Granite's attention multiplier"),
    ("use_qk_norm", "q/k norms on a family without them"),
];

/// Takes a bool field that may be absent or null.
fn opt_bool(v: Option<Value>, field: &str) -> Result<Option<bool>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(b)),
        Some(v) => Err(format!("field `{field}` is {v}, not true, false or null")),
    }
}

fn usize_field(v: Option<Value>, name: &str) -> Result<usize, String> {
    v.and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .ok_or_else(|| format!("field `{name}` is missing or not a non-negative integer"))
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<ModelConfig, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, "read", e))?;
        Self::from_json_str(&text).map_err(|why| ModelError::Config {
            path: path.to_path_buf(),
            why,
        })
    }

    /// The Hugging Face class name (`architectures[0]`).
    pub fn architecture(&self) -> &'static str {
        self.family.architecture
    }

    pub fn from_json_str(text: &str) -> Result<ModelConfig, String> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let Value::Object(mut map) = value else {
            return Err("expected a JSON object".into());
        };
        let family = read_family(&mut map)?;
        // Spellings of converted Megatron configs (Nemotron-4, Minitron): `rope_percent` for
        // `partial_rotary_factor`, `kv_channels` for `head_dim`; both spellings must agree.
        for (alias, field) in [
            ("rope_percent", "partial_rotary_factor"),
            ("kv_channels", "head_dim"),
        ] {
            if let Some(v) = map.remove(alias).filter(|v| !v.is_null()) {
                match map.get(field).filter(|v| !v.is_null()) {
                    Some(w) if w.as_f64() != v.as_f64() => {
                        return Err(format!(
                            "fields `{alias}` ({v}) and `{field}` ({w}) disagree; keep one"
                        ));
                    }
                    _ => {
                        map.insert(field.into(), v);
                    }
                }
            }
        }
        let (rope, partial_rotary_factor, rope_local) = parse_rope(&mut map, family)?;
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
        for (field, what) in FOREIGN_FORWARD_FIELDS {
            match map.get(field) {
                None | Some(Value::Null) | Some(Value::Bool(false)) => {}
                Some(v)
                    if v.as_f64() == Some(0.0)
                        || v.as_f64() == Some(1.0) && field.ends_with("multiplier") => {}
                Some(v) => {
                    return Err(format!(
                        "field `{field}` is {v} ({what}); {} does not have it and distillery cannot compute it",
                        family.architecture
                    ));
                }
            }
        }
        let use_sliding_window =
            opt_bool(map.get("use_sliding_window").cloned(), "use_sliding_window")?;
        // Absent keys take the class defaults (Gemma 2: 50 and 30); an explicit null is none.
        let (attn_cap_absent, final_cap_absent) = (
            !map.contains_key("attn_logit_softcapping"),
            !map.contains_key("final_logit_softcapping"),
        );
        let mut take = |k: &str| map.remove(k);
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
            None | Some(Value::Null) if family.default_head_dim.is_some() => {
                family.default_head_dim.unwrap()
            }
            None | Some(Value::Null) => {
                if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
                    return Err("field `head_dim` is missing and hidden_size is not a multiple of num_attention_heads".into());
                }
                hidden_size / num_attention_heads
            }
            v => usize_field(v, "head_dim")?,
        };
        let vocab_size = usize_field(take("vocab_size"), "vocab_size")?;
        // Nemotron's key is `norm_eps`; a config naming the other family's key means a model
        // this reader would run with the wrong epsilon.
        let other_eps = if family.eps_key == "norm_eps" {
            "rms_norm_eps"
        } else {
            "norm_eps"
        };
        if take(other_eps).is_some_and(|v| !v.is_null()) {
            return Err(format!(
                "field `{other_eps}` is not read by {} (its norms' epsilon is `{}`)",
                family.architecture, family.eps_key
            ));
        }
        let norm_eps = opt_f64(take(family.eps_key), family.eps_key)?.unwrap_or(family.default_eps);
        let max_position_embeddings = take("max_position_embeddings")
            .and_then(|v| v.as_u64())
            .unwrap_or(2048) as usize;
        let tie_word_embeddings = opt_bool(take("tie_word_embeddings"), "tie_word_embeddings")?
            // Gemma's configs default to tied; the others to untied.
            .unwrap_or(family.embed_scale);
        let mut sliding_window = match take("sliding_window") {
            None => family.default_sliding_window,
            Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().filter(|&w| w > 0).ok_or_else(|| {
                format!("field `sliding_window` is {v}, not a positive integer or null")
            })? as usize),
        };
        if family.windows == WindowRule::LayerTypes(DefaultPattern::QwenMaxWindowLayers) {
            // transformers 5: the window is 4096 unless given, and none at all unless
            // `use_sliding_window` (which stays in `extra`, rewritten by to_json).
            sliding_window = if use_sliding_window == Some(true) {
                sliding_window.or(Some(4096))
            } else {
                None
            };
        }
        let act_name = match take(family.act_key) {
            None | Some(Value::Null) => family.default_act.to_string(),
            Some(Value::String(s)) => s,
            Some(v) => return Err(format!("field `{}` is {v}, not a name", family.act_key)),
        };
        // Gemma's configs carry a legacy `hidden_act` beside `hidden_activation`; transformers
        // reads only the latter.
        if family.act_key != "hidden_act" {
            map.remove("hidden_act");
        }
        let hidden_act = Activation::from_name(&act_name).ok_or_else(|| {
            format!(
                "field `{}` is \"{act_name}\", an activation distillery does not compute (it computes silu, gelu_pytorch_tanh, gelu and relu2)",
                family.act_key
            )
        })?;
        if family.gated_mlp && hidden_act == Activation::Relu2 {
            return Err(format!(
                "field `{}` is \"relu2\" on the gated MLP of {}; distillery computes relu2 only in Nemotron's ungated MLP",
                family.act_key, family.architecture
            ));
        }
        let attention_bias = opt_bool(map.remove("attention_bias"), "attention_bias")?;
        let (qkv_bias, o_bias) = match family.attention_bias {
            AttentionBias::QkvAlways => (true, false),
            AttentionBias::FromConfig => {
                let b = attention_bias.unwrap_or(false);
                (b, b)
            }
            AttentionBias::Never => {
                if attention_bias == Some(true) {
                    return Err(format!(
                        "field `attention_bias` is true; {} has no attention biases",
                        family.architecture
                    ));
                }
                (false, false)
            }
        };
        let mlp_bias = opt_bool(map.remove("mlp_bias"), "mlp_bias")?.unwrap_or(false);
        if mlp_bias && !family.mlp_bias_key {
            return Err(format!(
                "field `mlp_bias` is true; {} has no MLP biases",
                family.architecture
            ));
        }
        let mut cap = |k: &str| -> Result<Option<f64>, String> {
            let v = opt_f64(map.remove(k), k)?;
            if v.is_some() && !family.softcaps {
                return Err(format!(
                    "field `{k}` is set; {} has no soft-capping",
                    family.architecture
                ));
            }
            match v {
                Some(c) if c <= 0.0 => {
                    Err(format!("field `{k}` is {c}; it must be positive or null"))
                }
                v => Ok(v),
            }
        };
        let mut attn_logit_softcapping = cap("attn_logit_softcapping")?;
        let mut final_logit_softcapping = cap("final_logit_softcapping")?;
        if attn_cap_absent {
            attn_logit_softcapping = family.default_softcaps.0;
        }
        if final_cap_absent {
            final_logit_softcapping = family.default_softcaps.1;
        }
        if family.rope_per_layer_type && attn_logit_softcapping.is_some() {
            return Err(format!(
                "field `attn_logit_softcapping` is set; {} does not cap attention scores",
                family.architecture
            ));
        }
        let query_pre_attn_scalar = if family.query_pre_attn_scalar {
            Some(
                opt_f64(map.remove("query_pre_attn_scalar"), "query_pre_attn_scalar")?
                    .unwrap_or(256.0),
            )
        } else {
            None
        };
        if let Some(b) = opt_bool(
            map.get("use_bidirectional_attention").cloned(),
            "use_bidirectional_attention",
        )? && b
        {
            return Err(
                "field `use_bidirectional_attention` is true; distillery runs causal decoders"
                    .into(),
            );
        }
        let layer_types = read_layer_types(&mut map, family, num_hidden_layers, sliding_window)?;
        let bos_token_id = map.remove("bos_token_id").and_then(|v| v.as_i64());
        let eos_token_id = map.remove("eos_token_id").filter(|v| !v.is_null());
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})"
            ));
        }
        let rotary = head_dim as f64 * partial_rotary_factor;
        if rotary as usize % 2 != 0 || rotary < 2.0 {
            return Err(format!(
                "head_dim {head_dim} × partial_rotary_factor {partial_rotary_factor} rotates {} dimensions; RoPE needs an even number of at least 2",
                rotary as usize
            ));
        }
        Ok(ModelConfig {
            family,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            norm_eps,
            rope_theta: rope.theta,
            rope_scaling: rope.scaling,
            partial_rotary_factor,
            rope_local,
            max_position_embeddings,
            tie_word_embeddings,
            sliding_window,
            layer_types,
            hidden_act,
            qkv_bias,
            o_bias,
            mlp_bias,
            attn_logit_softcapping,
            final_logit_softcapping,
            query_pre_attn_scalar,
            bos_token_id,
            eos_token_id,
            extra: map,
        })
    }

    /// The attention window of layer `layer` (`None`: full causal attention), as transformers
    /// runs the family: Mistral and Phi-3 window every layer by `sliding_window`, Llama none,
    /// the others per `layer_types`.
    pub fn window_of(&self, layer: usize) -> Option<usize> {
        match self.family.windows {
            WindowRule::Never => None,
            WindowRule::Every => self.sliding_window,
            WindowRule::LayerTypes(_) => self
                .layer_types
                .as_ref()
                .filter(|k| k[layer] == "sliding_attention")
                .and(self.sliding_window),
        }
    }

    /// Whether layer `layer` runs the local RoPE (Gemma 3's sliding layers).
    pub fn uses_local_rope(&self, layer: usize) -> bool {
        self.rope_local.is_some()
            && self
                .layer_types
                .as_ref()
                .is_some_and(|k| k[layer] == "sliding_attention")
    }

    /// The number of dimensions RoPE rotates in each head.
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim as f64 * self.partial_rotary_factor) as usize
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
        let f = self.family;
        let mut map = self.extra.clone();
        let mut set = |k: &str, v: Value| {
            map.insert(k.to_string(), v);
        };
        set("architectures", Value::Array(vec![f.architecture.into()]));
        set("model_type", f.model_type.into());
        set("hidden_size", self.hidden_size.into());
        set("intermediate_size", self.intermediate_size.into());
        set("num_hidden_layers", self.num_hidden_layers.into());
        set("num_attention_heads", self.num_attention_heads.into());
        set("num_key_value_heads", self.num_key_value_heads.into());
        set("head_dim", self.head_dim.into());
        set("vocab_size", self.vocab_size.into());
        set(f.eps_key, self.norm_eps.into());
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
        if f.partial_rotary {
            set("partial_rotary_factor", self.partial_rotary_factor.into());
        }
        if let Some(local) = &self.rope_local {
            // transformers has no legacy key for a scaled local RoPE; from_json_str never
            // produces one (a sliding set with scaling is read, and written here as 5.x does).
            if local.scaling.is_some() {
                let mut full = self
                    .rope_scaling
                    .as_ref()
                    .map(RopeScaling::to_json)
                    .unwrap_or_else(|| serde_json::json!({"rope_type": "default"}));
                full["rope_theta"] = self.rope_theta.into();
                let mut sliding = local.scaling.as_ref().map(RopeScaling::to_json).unwrap();
                sliding["rope_theta"] = local.theta.into();
                map.remove("rope_theta");
                map.remove("rope_scaling");
                map.insert(
                    "rope_parameters".into(),
                    serde_json::json!({"full_attention": full, "sliding_attention": sliding}),
                );
            } else {
                map.insert("rope_local_base_freq".into(), local.theta.into());
            }
        }
        let mut set = |k: &str, v: Value| {
            map.insert(k.to_string(), v);
        };
        if let Some(kinds) = &self.layer_types {
            set("layer_types", serde_json::to_value(kinds).unwrap());
            if f.windows == WindowRule::LayerTypes(DefaultPattern::QwenMaxWindowLayers) {
                // transformers 4.x derives the kinds from these two: keep them saying the same.
                // (With no sliding layer, `max_window_layers` says nothing and stays as read.)
                if kinds.iter().any(|k| k == "sliding_attention") {
                    let full_prefix = kinds.iter().take_while(|k| *k == "full_attention").count();
                    set("use_sliding_window", true.into());
                    set("max_window_layers", full_prefix.into());
                } else {
                    set("use_sliding_window", false.into());
                }
            }
        }
        if let Some(d) = self.extra.get("dtype").cloned() {
            set("torch_dtype", d);
        }
        set(
            "max_position_embeddings",
            self.max_position_embeddings.into(),
        );
        set("tie_word_embeddings", self.tie_word_embeddings.into());
        if f.windows != WindowRule::Never || self.sliding_window.is_some() {
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
        set(f.act_key, self.hidden_act.name().into());
        match f.attention_bias {
            AttentionBias::FromConfig => set("attention_bias", self.o_bias.into()),
            AttentionBias::Never if f.model_type != "phi3" => set("attention_bias", false.into()),
            _ => {}
        }
        if f.mlp_bias_key {
            set("mlp_bias", self.mlp_bias.into());
        }
        if f.softcaps {
            let opt = |v: Option<f64>| v.map(Value::from).unwrap_or(Value::Null);
            set("attn_logit_softcapping", opt(self.attn_logit_softcapping));
            set("final_logit_softcapping", opt(self.final_logit_softcapping));
        }
        if let Some(q) = self.query_pre_attn_scalar {
            // transformers 5 types the field as an int and refuses `20.0`.
            let v = if q.fract() == 0.0 && q.abs() < 1e15 {
                Value::from(q as i64)
            } else {
                q.into()
            };
            set("query_pre_attn_scalar", v);
        }
        Value::Object(
            map.into_iter()
                .collect::<std::collections::BTreeMap<_, _>>()
                .into_iter()
                .collect(),
        )
    }

    /// Every EOS id `eos_token_id` names (one, or a list: Llama 3's instruct models end turns
    /// with either of two): where greedy generation stops.
    pub fn eos_ids(&self) -> Vec<u32> {
        token_ids(self.eos_token_id.as_ref())
    }

    /// The first EOS id (some configs list several).
    pub fn eos_id(&self) -> Option<u32> {
        match &self.eos_token_id {
            Some(Value::Number(n)) => n.as_u64().map(|v| v as u32),
            Some(Value::Array(a)) => a.first().and_then(Value::as_u64).map(|v| v as u32),
            _ => None,
        }
    }

    /// The sizes of every axis a tensor runs along.
    pub fn axis_sizes(&self) -> AxisSizes {
        AxisSizes {
            vocab: self.vocab_size,
            hidden: self.hidden_size,
            ffn: self.intermediate_size,
            heads: self.num_attention_heads,
            kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
        }
    }

    /// Every tensor of the checkpoint, from the family's table.
    pub fn tensor_specs(&self) -> Vec<TensorSpec> {
        tensor_specs(
            self.family,
            TensorFeatures {
                layers: self.num_hidden_layers,
                qkv_bias: self.qkv_bias,
                o_bias: self.o_bias,
                mlp_bias: self.mlp_bias,
                tie_word_embeddings: self.tie_word_embeddings,
            },
        )
    }

    /// Exact parameter counts: (total, without the input embedding).
    pub fn parameter_count(&self) -> (u64, u64) {
        let sizes = self.axis_sizes();
        let mut total = 0u64;
        let mut embed = 0u64;
        for spec in self.tensor_specs() {
            let n: u64 = spec.axes.iter().map(|&a| sizes.len(a) as u64).product();
            total += n;
            if spec.role == Role::Embed {
                embed = n;
            }
        }
        (total, total - embed)
    }

    /// Shape of every tensor of the checkpoint, by Hugging Face name.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let sizes = self.axis_sizes();
        self.tensor_specs()
            .into_iter()
            .map(|s| {
                let shape = s.axes.iter().map(|&a| sizes.len(a)).collect();
                (s.name, shape)
            })
            .collect()
    }
}

/// The family from `architectures` (or, as transformers' AutoModelForCausalLM does, from
/// `model_type` when it is missing); the two must agree where both are given.
fn read_family(map: &mut Map<String, Value>) -> Result<&'static Family, String> {
    let model_type = map.remove("model_type");
    let model_type = model_type.as_ref().and_then(Value::as_str);
    let family = match map.remove("architectures") {
        Some(Value::Array(a)) if !a.is_empty() => {
            if a.len() > 1 {
                return Err(format!(
                    "field `architectures` lists {} classes; a checkpoint of one model names one",
                    a.len()
                ));
            }
            let name = a[0]
                .as_str()
                .ok_or_else(|| format!("field `architectures` is {a:?}, not a list of names"))?;
            Family::by_architecture(name).ok_or_else(|| {
                format!(
                    "field `architectures` is [\"{name}\"]; distillery supports {}",
                    Family::supported()
                )
            })?
        }
        None | Some(Value::Null) | Some(Value::Array(_)) => match model_type {
            Some(t) => Family::by_model_type(t).ok_or_else(|| {
                format!(
                    "field `architectures` is missing and `model_type` is \"{t}\"; distillery supports {}",
                    Family::supported()
                )
            })?,
            None => {
                return Err(
                    "fields `architectures` and `model_type` are both missing; add \"architectures\": [\"LlamaForCausalLM\"] (or the model's class)".into(),
                );
            }
        },
        Some(v) => return Err(format!("field `architectures` is {v}, not a list of names")),
    };
    // Gemma 3's text model is saved as "gemma3_text"; a multimodal "gemma3" config holds its
    // text model under `text_config` and is not this class.
    if let Some(t) = model_type
        && t != family.model_type
    {
        return Err(format!(
            "fields `architectures` ({}) and `model_type` (\"{t}\") name different families; fix one",
            family.architecture
        ));
    }
    Ok(family)
}

/// `layer_types`, checked against the family's rule, or derived as transformers derives it.
fn read_layer_types(
    map: &mut Map<String, Value>,
    family: &Family,
    layers: usize,
    sliding_window: Option<usize>,
) -> Result<Option<Vec<String>>, String> {
    let read = match map.remove("layer_types") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => {
            let mut kinds = Vec::with_capacity(a.len());
            for (i, v) in a.iter().enumerate() {
                match v.as_str() {
                    Some(k @ ("full_attention" | "sliding_attention")) => kinds.push(k.to_string()),
                    _ => {
                        return Err(format!(
                            "field `layer_types[{i}]` is {v}; distillery knows \"full_attention\" and \"sliding_attention\" layers"
                        ));
                    }
                }
            }
            if kinds.len() != layers {
                return Err(format!(
                    "field `layer_types` has {} entries for {layers} layers (num_hidden_layers)",
                    kinds.len()
                ));
            }
            Some(kinds)
        }
        Some(v) => return Err(format!("field `layer_types` is {v}, not a list")),
    };
    let kind = |sliding: bool| {
        if sliding {
            "sliding_attention"
        } else {
            "full_attention"
        }
        .to_string()
    };
    match family.windows {
        WindowRule::Never | WindowRule::Every => {
            // One attention for every layer: Mistral/Phi-3 window all of them by
            // `sliding_window`, Llama none (transformers ignores the field for it). Per-layer
            // kinds that say otherwise describe a model these classes do not run.
            let windowed = family.windows == WindowRule::Every && sliding_window.is_some();
            let want = kind(windowed);
            if let Some(kinds) = &read
                && let Some(i) = kinds.iter().position(|k| *k != want)
            {
                return Err(format!(
                    "field `layer_types[{i}]` is \"{}\", but {} with sliding_window {} runs every layer as \"{want}\" (per-layer attention kinds belong to other architectures)",
                    kinds[i],
                    family.architecture,
                    sliding_window.map_or("null".to_string(), |w| w.to_string())
                ));
            }
            Ok(read)
        }
        WindowRule::LayerTypes(pattern) => {
            // Keys transformers derives `layer_types` from; kept in `extra` and rewritten by
            // to_json to agree with the kinds.
            let num = |m: &Map<String, Value>, k: &str| m.get(k).and_then(Value::as_u64);
            let derived: Vec<String> = match pattern {
                DefaultPattern::QwenMaxWindowLayers => {
                    let on = map.get("use_sliding_window").and_then(Value::as_bool) == Some(true);
                    let from = num(map, "max_window_layers").unwrap_or(28) as usize;
                    (0..layers)
                        .map(|i| kind(on && sliding_window.is_some() && i >= from))
                        .collect()
                }
                DefaultPattern::Alternating => (0..layers).map(|i| kind(i % 2 == 0)).collect(),
                DefaultPattern::EveryNthFull => {
                    let n = num(map, "sliding_window_pattern").unwrap_or(6).max(1) as usize;
                    (0..layers).map(|i| kind((i + 1) % n != 0)).collect()
                }
            };
            let kinds = read.unwrap_or(derived);
            if sliding_window.is_none()
                && let Some(i) = kinds.iter().position(|k| k == "sliding_attention")
            {
                return Err(format!(
                    "field `layer_types[{i}]` is \"sliding_attention\" but `sliding_window` is null; set the window or make the layer full"
                ));
            }
            Ok(Some(kinds))
        }
    }
}

/// The ids an `eos_token_id` field holds (config.json and generation_config.json write one id
/// or a list); none for anything else.
pub fn token_ids(field: Option<&Value>) -> Vec<u32> {
    match field {
        Some(Value::Number(n)) => n.as_u64().map(|v| v as u32).into_iter().collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|v| v as u32)
            .collect(),
        _ => Vec::new(),
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
        assert_eq!(c.architecture(), "MistralForCausalLM");
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

    /// A tiny config of `family` (by model_type) with `extra` merged in.
    fn family(model_type: &str, extra: &str) -> Result<ModelConfig, String> {
        let mut v: Value = serde_json::from_str(&format!(
            r#"{{"model_type":"{model_type}","hidden_size":64,"intermediate_size":96,
            "num_hidden_layers":4,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,
            "vocab_size":128}}"#
        ))
        .unwrap();
        let e: Value = serde_json::from_str(extra).unwrap();
        for (k, x) in e.as_object().unwrap() {
            v[k] = x.clone();
        }
        ModelConfig::from_json_str(&v.to_string())
    }

    #[test]
    fn families_read_their_own_fields_and_refuse_the_others() {
        // Defaults as transformers' config classes have them.
        let g = family("gemma2", "{}").unwrap();
        assert_eq!(g.architecture(), "Gemma2ForCausalLM");
        assert!(g.tie_word_embeddings);
        assert_eq!(g.hidden_act, Activation::GeluTanh);
        assert_eq!(g.query_pre_attn_scalar, Some(256.0));
        assert_eq!(
            g.layer_types.as_deref().map(|k| k[0].as_str()),
            Some("sliding_attention")
        );
        let n = family(
            "nemotron",
            r#"{"norm_eps":1e-5,"partial_rotary_factor":0.5}"#,
        )
        .unwrap();
        assert_eq!((n.norm_eps, n.rotary_dim()), (1e-5, 8));
        let m = family(
            "nemotron",
            r#"{"rope_percent":0.5,"kv_channels":16,"head_dim":null}"#,
        )
        .unwrap();
        assert_eq!((m.rotary_dim(), m.head_dim), (8, 16));
        assert!(
            family("nemotron", r#"{"kv_channels":32}"#)
                .unwrap_err()
                .contains("kv_channels")
        );
        assert_eq!(n.hidden_act, Activation::Relu2);
        let q = family(
            "qwen2",
            r#"{"use_sliding_window":true,"sliding_window":8,"max_window_layers":2}"#,
        )
        .unwrap();
        assert_eq!(
            (0..4).map(|l| q.window_of(l)).collect::<Vec<_>>(),
            [None, None, Some(8), Some(8)]
        );
        assert!(q.qkv_bias && !q.o_bias);
        let g3 = family(
            "gemma3_text",
            r#"{"rope_theta":1e6,"rope_local_base_freq":1e4,"sliding_window":4,"sliding_window_pattern":2}"#,
        )
        .unwrap();
        assert_eq!(g3.rope_local.as_ref().map(|r| r.theta), Some(1e4));
        assert!(g3.uses_local_rope(0) && !g3.uses_local_rope(1));
        assert_eq!(
            ModelConfig::from_json_str(&g3.to_json().to_string()).unwrap(),
            g3
        );
        for (model_type, json, words) in [
            ("llama", r#"{"hidden_act":"gelu_pytorch_tanh"}"#, vec![]),
            ("llama", r#"{"hidden_act":"relu2"}"#, vec!["relu2", "gated"]),
            (
                "llama",
                r#"{"hidden_act":"quick_gelu"}"#,
                vec!["quick_gelu"],
            ),
            (
                "llama",
                r#"{"attn_logit_softcapping":50.0}"#,
                vec!["soft-capping"],
            ),
            (
                "llama",
                r#"{"partial_rotary_factor":0.5}"#,
                vec!["whole heads"],
            ),
            (
                "llama",
                r#"{"rope_local_base_freq":1e4}"#,
                vec!["rope_local_base_freq"],
            ),
            (
                "llama",
                r#"{"norm_eps":1e-5}"#,
                vec!["norm_eps", "rms_norm_eps"],
            ),
            (
                "llama",
                r#"{"quantization_config":{"quant_method":"gptq"}}"#,
                vec!["quantized"],
            ),
            (
                "mistral",
                r#"{"attention_bias":true}"#,
                vec!["attention_bias"],
            ),
            ("qwen2", r#"{"mlp_bias":true}"#, vec!["mlp_bias"]),
            (
                "gemma3_text",
                r#"{"attn_logit_softcapping":50.0}"#,
                vec!["does not cap"],
            ),
            (
                "gemma2",
                r#"{"use_bidirectional_attention":true}"#,
                vec!["causal"],
            ),
            (
                "gemma2",
                r#"{"sliding_window":null}"#,
                vec!["sliding_window", "null"],
            ),
            (
                "qwen3",
                r#"{"architectures":["Qwen2ForCausalLM"]}"#,
                vec!["different families"],
            ),
            (
                "phi3",
                r#"{"rope_scaling":{"type":"longrope","short_factor":[1.0],"long_factor":[1.0]}}"#,
                vec!["longrope"],
            ),
        ] {
            let r = family(model_type, json);
            if words.is_empty() {
                assert!(r.is_ok(), "{model_type} {json}: {r:?}");
                continue;
            }
            let e = r.unwrap_err();
            assert!(
                words.iter().all(|w| e.contains(w)),
                "{model_type} {json}: {e}"
            );
        }
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
