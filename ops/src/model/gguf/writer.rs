//! Writing GGUF v3 files for llama.cpp: the family's tensor names and metadata from the
//! architecture table, llama.cpp's conventions applied (Q/K row permutation for Llama, norm
//! offsets stored), the tokenizer as `tokenizer.ggml.*` metadata, quantized tensor by tensor.

use std::io::{BufWriter, Seek, Write};
use std::path::Path;

use serde_json::Value;

use super::quants::{GgmlType, quantize};
use super::{gguf_query_scale, permute_rows, rope_freq_divisors};
use crate::model::ModelError;
use crate::model::arch::{Role, TensorSpec};
use crate::model::config::ModelConfig;

/// Tensor data starts, and every tensor's data is padded, at this alignment (GGUF's default).
const ALIGNMENT: usize = 32;

/// The quantization of an exported GGUF, by llama.cpp's `llama-quantize` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum GgufQuant {
    F32,
    F16,
    Q8_0,
    Q4_K_M,
    Q5_K_M,
    Q6_K,
}

impl GgufQuant {
    pub const NAMES: [&'static str; 6] = ["f32", "f16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"];

    pub fn from_name(name: &str) -> Option<GgufQuant> {
        Some(match name.to_ascii_lowercase().as_str() {
            "f32" => GgufQuant::F32,
            "f16" => GgufQuant::F16,
            "q8_0" => GgufQuant::Q8_0,
            "q4_k_m" => GgufQuant::Q4_K_M,
            "q5_k_m" => GgufQuant::Q5_K_M,
            "q6_k" => GgufQuant::Q6_K,
            _ => return None,
        })
    }

    /// llama.cpp's `general.file_type` (`llama_ftype`).
    fn file_type(self) -> u32 {
        match self {
            GgufQuant::F32 => 0,
            GgufQuant::F16 => 1,
            GgufQuant::Q8_0 => 7,
            GgufQuant::Q4_K_M => 15,
            GgufQuant::Q5_K_M => 17,
            GgufQuant::Q6_K => 18,
        }
    }

    /// The type of one tensor, as `llama-quantize` picks it: 1-D tensors stay F32; the `_M`
    /// mixes give the output matrix (the embedding when tied), and `attn_v`/`ffn_down` in the
    /// first and last eighth of the layers and every third one between, Q6_K (`use_more_bits`),
    /// and a fused `attn_qkv` one step more than the base. Rows that are not whole
    /// 256-blocks fall back as llama-quantize does (Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0),
    /// then to F16.
    pub fn tensor_type(
        self,
        spec: &TensorSpec,
        shape: &[usize],
        layers: usize,
        tied: bool,
    ) -> GgmlType {
        if shape.len() < 2 {
            return GgmlType::F32;
        }
        let more_bits = |l: usize| {
            l < layers / 8 || l >= 7 * layers / 8 || (l >= layers / 8 && (l - layers / 8) % 3 == 2)
        };
        let wanted = match self {
            GgufQuant::F32 => GgmlType::F32,
            GgufQuant::F16 => GgmlType::F16,
            GgufQuant::Q8_0 => GgmlType::Q8_0,
            GgufQuant::Q6_K => GgmlType::Q6_K,
            GgufQuant::Q4_K_M | GgufQuant::Q5_K_M => {
                let base = if self == GgufQuant::Q4_K_M {
                    GgmlType::Q4_K
                } else {
                    GgmlType::Q5_K
                };
                match (spec.role, spec.layer) {
                    // The output matrix (the embedding when tied) gets Q6_K.
                    (Role::Head, _) => GgmlType::Q6_K,
                    (Role::Embed, _) if tied => GgmlType::Q6_K,
                    (Role::V | Role::Down, Some(l)) if more_bits(l) => GgmlType::Q6_K,
                    // Phi-3's fused qkv: one step up, as llama-quantize gives attn_qkv.
                    (Role::Qkv, _) if self == GgufQuant::Q4_K_M => GgmlType::Q5_K,
                    (Role::Qkv, _) => GgmlType::Q6_K,
                    _ => base,
                }
            }
        };
        // llama-quantize's fallbacks for rows that are not whole 256-blocks.
        let cols = *shape.last().unwrap();
        let fallback = match wanted {
            GgmlType::Q4_K => GgmlType::Q5_0,
            GgmlType::Q5_K => GgmlType::Q5_1,
            _ => GgmlType::Q8_0,
        };
        [wanted, fallback, GgmlType::F16]
            .into_iter()
            .find(|t| cols % t.block().0 == 0)
            .unwrap_or(GgmlType::F32)
    }
}

/// One metadata value to write.
enum Kv {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    F32s(Vec<f32>),
}

/// The GGUF metadata of a model: architecture, shapes and norms, RoPE, windows and soft-caps as
/// llama.cpp reads them, for `config` (refusing by name what llama.cpp would compute otherwise).
fn model_metadata(config: &ModelConfig) -> Result<Vec<(String, Kv)>, String> {
    let f = config.family;
    let arch = f.gguf_arch;
    let k = |s: &str| format!("{arch}.{s}");
    let mut kv = vec![
        ("general.architecture".to_string(), Kv::Str(arch.into())),
        (
            k("context_length"),
            Kv::U32(config.max_position_embeddings as u32),
        ),
        (k("embedding_length"), Kv::U32(config.hidden_size as u32)),
        (k("block_count"), Kv::U32(config.num_hidden_layers as u32)),
        (
            k("feed_forward_length"),
            Kv::U32(config.intermediate_size as u32),
        ),
        (
            k("attention.head_count"),
            Kv::U32(config.num_attention_heads as u32),
        ),
        (
            k("attention.head_count_kv"),
            Kv::U32(config.num_key_value_heads as u32),
        ),
        (k("attention.key_length"), Kv::U32(config.head_dim as u32)),
        (k("attention.value_length"), Kv::U32(config.head_dim as u32)),
        (k("rope.freq_base"), Kv::F32(config.rope_theta as f32)),
        (k("vocab_size"), Kv::U32(config.vocab_size as u32)),
    ];
    let eps_key = if f.norm.has_bias() {
        "attention.layer_norm_epsilon"
    } else {
        "attention.layer_norm_rms_epsilon"
    };
    kv.push((k(eps_key), Kv::F32(config.norm_eps as f32)));
    let rotary = (config.head_dim as f64 * config.partial_rotary_factor).round() as u32;
    if rotary as usize != config.head_dim && !f.partial_rotary {
        return Err(format!(
            "partial_rotary_factor {} on a {}",
            config.partial_rotary_factor, f.architecture
        ));
    }
    kv.push((k("rope.dimension_count"), Kv::U32(rotary)));
    if let Some(scaling) = &config.rope_scaling {
        let j = scaling.to_json();
        match j["rope_type"].as_str().unwrap_or("") {
            "linear" => {
                kv.push((k("rope.scaling.type"), Kv::Str("linear".into())));
                kv.push((
                    k("rope.scaling.factor"),
                    Kv::F32(j["factor"].as_f64().unwrap_or(1.0) as f32),
                ));
            }
            // Written as the `rope_freqs.weight` tensor (see `rope_freq_divisors`); llama.cpp
            // has no keys for the low/high frequency factors, so readers assume Llama 3's 1 and 4.
            "llama3" if arch == "llama" => {
                let (low, high) = (
                    j["low_freq_factor"].as_f64(),
                    j["high_freq_factor"].as_f64(),
                );
                if (low, high) != (Some(1.0), Some(4.0)) {
                    return Err(format!(
                        "llama3 rope_scaling with low_freq_factor {low:?} and high_freq_factor {high:?}: GGUF readers assume Llama 3's 1 and 4"
                    ));
                }
                if let Some(o) = j["original_max_position_embeddings"].as_u64() {
                    kv.push((k("rope.scaling.original_context_length"), Kv::U32(o as u32)));
                }
            }
            other => {
                return Err(format!(
                    "rope_scaling \"{other}\" on a {}: llama.cpp has no such scaling for it; export this model as Hugging Face safetensors",
                    f.architecture
                ));
            }
        }
    }
    if f.rope_per_layer_type
        && let Some(local) = &config.rope_local
    {
        kv.push((k("rope.freq_base_swa"), Kv::F32(local.theta as f32)));
    }
    // Windows: llama.cpp derives which layers slide from the architecture (Gemma 2: even layers;
    // Gemma 3: five of every six) and runs the others without (it disables Phi-3's window too).
    let windows: Vec<Option<usize>> = (0..config.num_hidden_layers)
        .map(|l| {
            config
                .window_of(l)
                .filter(|&w| w < config.max_position_embeddings)
        })
        .collect();
    let pattern: Option<fn(usize) -> bool> = match arch {
        "gemma2" => Some(|l| l % 2 == 0),
        "gemma3" => Some(|l| (l + 1) % 6 != 0),
        _ => None,
    };
    if let Some(w) = windows.iter().flatten().next() {
        kv.push((k("attention.sliding_window"), Kv::U32(*w as u32)));
    }
    let slides = |l: usize| pattern.is_some_and(|p| p(l));
    if let Some(l) = (0..windows.len()).find(|&l| windows[l].is_some() != slides(l)) {
        return Err(format!(
            "layer {l} {} sliding window, but llama.cpp {}; export this model as Hugging Face safetensors{}",
            if windows[l].is_some() {
                "has a"
            } else {
                "has no"
            },
            match pattern {
                None => format!("runs {} without windows", f.architecture),
                Some(_) => format!(
                    "derives {}'s sliding layers from the layer index",
                    f.architecture
                ),
            },
            if pattern.is_some() {
                " (or prune layers in whole periods of the pattern)"
            } else {
                ""
            }
        ));
    }
    if f.softcaps {
        let caps = [
            ("attn_logit_softcapping", config.attn_logit_softcapping),
            ("final_logit_softcapping", config.final_logit_softcapping),
        ];
        for (key, cap) in caps {
            match (arch, cap) {
                // llama.cpp's Gemma 2 always caps (a 0 would divide by zero).
                ("gemma2", Some(cap)) => kv.push((k(key), Kv::F32(cap as f32))),
                ("gemma2", None) => {
                    return Err(format!(
                        "{key} is null (no cap), but llama.cpp's Gemma 2 always applies one"
                    ));
                }
                (_, Some(cap)) => {
                    return Err(format!(
                        "{key} is {cap}, but llama.cpp runs {} without soft-capping",
                        f.architecture
                    ));
                }
                (_, None) => {}
            }
        }
    }
    if f.query_pre_attn_scalar {
        let derived = gguf_query_scale(
            f,
            config.hidden_size,
            config.num_attention_heads,
            config.head_dim,
            config.num_hidden_layers,
        );
        let want = config
            .query_pre_attn_scalar
            .unwrap_or(config.head_dim as f64);
        if (want - derived as f64).abs() > 1e-9 {
            return Err(format!(
                "query_pre_attn_scalar is {want}, but llama.cpp derives {derived} for this {} shape; the GGUF would compute another model",
                f.architecture
            ));
        }
    }
    Ok(kv)
}

/// `tokenizer.ggml.*` metadata from a Hugging Face `tokenizer.json` and `tokenizer_config.json`:
/// byte-level BPE as `gpt2` (the pre-tokenizer named by matching the ones distillery's reader
/// rebuilds), SentencePiece-style BPE with byte fallback as `llama` (scores from merge ranks).
fn tokenizer_metadata(
    tokenizer_json: &str,
    tokenizer_config: Option<&Value>,
    vocab_size: usize,
) -> Result<Vec<(String, Kv)>, String> {
    let tok: Value =
        serde_json::from_str(tokenizer_json).map_err(|e| format!("tokenizer.json: {e}"))?;
    let model = &tok["model"];
    if model["type"] != "BPE" {
        return Err(format!(
            "tokenizer.json has a {} model; GGUF export writes BPE tokenizers (gpt2, llama)",
            model["type"]
        ));
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or("tokenizer.json has no model.vocab")?;
    let mut tokens: Vec<Option<String>> = Vec::new();
    let mut put = |id: usize, t: &str| {
        if tokens.len() <= id {
            tokens.resize(id + 1, None);
        }
        tokens[id] = Some(t.to_string());
    };
    for (t, id) in vocab {
        put(id.as_u64().ok_or("a vocab id is not a number")? as usize, t);
    }
    let mut types = vec![1i32; 0];
    let added = tok["added_tokens"].as_array().cloned().unwrap_or_default();
    let added_id = |a: &Value| -> Result<usize, String> {
        a["id"]
            .as_u64()
            .map(|i| i as usize)
            .ok_or_else(|| format!("tokenizer.json: added token {} has no id", a["content"]))
    };
    for a in &added {
        put(added_id(a)?, a["content"].as_str().unwrap_or(""));
    }
    // llama.cpp sizes the embedding from the token list: pad it to the model's rows with unused
    // tokens (type 5), as its converter does.
    if tokens.len() > vocab_size {
        return Err(format!(
            "the tokenizer has {} tokens but the model's vocab_size is {vocab_size}",
            tokens.len()
        ));
    }
    let padded_from = tokens.len();
    tokens.extend((padded_from..vocab_size).map(|i| Some(format!("[PAD{i}]"))));
    types.resize(tokens.len(), 1);
    for t in types.iter_mut().skip(padded_from) {
        *t = 5;
    }
    for a in &added {
        let id = added_id(a)?;
        types[id] = if a["special"].as_bool().unwrap_or(false) {
            3
        } else {
            4
        };
    }
    if let Some(gap) = tokens.iter().position(Option::is_none) {
        return Err(format!("tokenizer.json has no token with id {gap}"));
    }
    let tokens: Vec<String> = tokens.into_iter().map(Option::unwrap).collect();
    let merges: Vec<String> = model["merges"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|x| match x {
                    Value::String(s) => s.clone(),
                    Value::Array(p) => format!(
                        "{} {}",
                        p[0].as_str().unwrap_or(""),
                        p[1].as_str().unwrap_or("")
                    ),
                    _ => String::new(),
                })
                .collect()
        })
        .unwrap_or_default();
    let byte_level = tokenizer_json.contains("\"ByteLevel\"");
    let mut kv = Vec::new();
    if byte_level {
        // Offsets trimming changes no token id: compared without it.
        fn ids_only(v: &Value) -> Value {
            match v {
                Value::Object(o) => Value::Object(
                    o.iter()
                        .filter(|(k, _)| k.as_str() != "trim_offsets")
                        .map(|(k, v)| (k.clone(), ids_only(v)))
                        .collect(),
                ),
                Value::Array(a) => Value::Array(a.iter().map(ids_only).collect()),
                other => other.clone(),
            }
        }
        let pre = super::PRE_TOKENIZERS
            .iter()
            .find(|(_, rebuilt)| ids_only(&rebuilt()) == ids_only(&tok["pre_tokenizer"]))
            .map(|(name, _)| *name)
            .ok_or_else(|| {
                format!(
                    "tokenizer.json's pre_tokenizer is none llama.cpp names that distillery knows ({}); GGUF export cannot say how to split text",
                    super::PRE_TOKENIZERS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
                )
            })?;
        kv.push(("tokenizer.ggml.model".into(), Kv::Str("gpt2".into())));
        kv.push(("tokenizer.ggml.pre".into(), Kv::Str(pre.into())));
        kv.push(("tokenizer.ggml.merges".into(), Kv::Strs(merges)));
    } else if model["byte_fallback"].as_bool() == Some(true) {
        // SentencePiece BPE merges by score: the rank of the merge that makes each piece.
        let mut scores = vec![0f32; tokens.len()];
        let index: std::collections::HashMap<&str, usize> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        // The first (best) merge that makes a piece gives its score.
        for (rank, m) in merges.iter().enumerate().rev() {
            if let Some(id) = index.get(m.replace(' ', "").as_str()) {
                scores[*id] = -(rank as f32);
            }
        }
        for (i, t) in tokens.iter().enumerate() {
            if t.starts_with("<0x") && t.len() == 6 && types[i] == 1 {
                types[i] = 6; // byte tokens
            }
        }
        kv.push(("tokenizer.ggml.model".into(), Kv::Str("llama".into())));
        kv.push(("tokenizer.ggml.scores".into(), Kv::F32s(scores)));
        // llama.cpp prepends "▁" to a SentencePiece text unless told not to; Llama 2's
        // normalizer prepends it, Gemma's does not.
        let prepends = tok["normalizer"].to_string().contains("\"Prepend\"")
            || tok["pre_tokenizer"]
                .to_string()
                .contains("\"prepend_scheme\":\"always\"");
        kv.push(("tokenizer.ggml.add_space_prefix".into(), Kv::Bool(prepends)));
    } else {
        return Err("tokenizer.json is neither byte-level BPE nor BPE with byte fallback; GGUF export cannot describe it".into());
    }
    let id_of = |key: &str| -> Option<u32> {
        let t = tokenizer_config?.get(key)?;
        let text = t.as_str().or_else(|| t["content"].as_str())?;
        tokens.iter().position(|x| x == text).map(|i| i as u32)
    };
    for (key, gguf) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(id) = id_of(key) {
            kv.push((gguf.into(), Kv::U32(id)));
        }
    }
    // Whether a BOS goes before every text: as tokenizer_config.json says, else as the
    // tokenizer.json post-processor does (Llama 3's and Gemma's add one).
    let post_adds_bos = id_of("bos_token").is_some_and(|bos| {
        let post = tok["post_processor"].to_string();
        post.contains("TemplateProcessing") && post.contains(&format!("[{bos}]"))
    });
    let add_bos = tokenizer_config
        .and_then(|c| c.get("add_bos_token"))
        .and_then(Value::as_bool)
        .unwrap_or(post_adds_bos);
    kv.push(("tokenizer.ggml.add_bos_token".into(), Kv::Bool(add_bos)));
    if let Some(cfg) = tokenizer_config {
        if let Some(b) = cfg.get("add_eos_token").and_then(Value::as_bool) {
            kv.push(("tokenizer.ggml.add_eos_token".into(), Kv::Bool(b)));
        }
        if let Some(t) = cfg.get("chat_template").and_then(Value::as_str) {
            kv.push(("tokenizer.chat_template".into(), Kv::Str(t.into())));
        }
    }
    kv.push(("tokenizer.ggml.tokens".into(), Kv::Strs(tokens)));
    kv.push(("tokenizer.ggml.token_type".into(), Kv::I32s(types)));
    Ok(kv)
}

/// What `write_gguf` needs besides the tensors.
pub struct GgufExport<'a> {
    pub config: &'a ModelConfig,
    pub tokenizer_json: Option<&'a str>,
    pub tokenizer_config: Option<&'a Value>,
    pub quant: GgufQuant,
    /// `general.name` and provenance keys (`distillery.recipe`, `distillery.key`...).
    pub name: &'a str,
    pub provenance: &'a [(String, String)],
}

/// Per tensor written: name, type, shape (Hugging Face order).
pub type GgufTensorReport = Vec<(String, GgmlType, Vec<usize>)>;

/// `"97 tensors: 25 F32, 60 Q4_K, 12 Q6_K"`.
pub fn describe(report: &GgufTensorReport) -> String {
    let mut by_type: std::collections::BTreeMap<&str, usize> = Default::default();
    for (_, ty, _) in report {
        *by_type.entry(ty.name()).or_default() += 1;
    }
    let types: Vec<String> = by_type.iter().map(|(t, n)| format!("{n} {t}")).collect();
    format!("{} tensors: {}", report.len(), types.join(", "))
}

/// Writes `out` (a GGUF v3 file, via a temporary file renamed at the end), reading each tensor
/// from `tensor(hf_name)` as f32 in Hugging Face layout, one at a time.
pub fn write_gguf(
    out: &Path,
    export: &GgufExport,
    tensor: &mut dyn FnMut(&str) -> Result<Vec<f32>, ModelError>,
) -> Result<GgufTensorReport, ModelError> {
    let bad = |why: String| ModelError::Gguf {
        path: out.to_path_buf(),
        why,
    };
    let config = export.config;
    let family = config.family;
    let mut kv = vec![
        ("general.name".to_string(), Kv::Str(export.name.into())),
        (
            "general.file_type".to_string(),
            Kv::U32(export.quant.file_type()),
        ),
        ("general.quantization_version".to_string(), Kv::U32(2)),
        ("general.alignment".to_string(), Kv::U32(ALIGNMENT as u32)),
    ];
    kv.extend(model_metadata(config).map_err(bad)?);
    match export.tokenizer_json {
        Some(t) => kv.extend(
            tokenizer_metadata(t, export.tokenizer_config, config.vocab_size).map_err(bad)?,
        ),
        None => return Err(bad(
            "the model has no tokenizer.json; a GGUF without a tokenizer does not run in llama.cpp"
                .into(),
        )),
    }
    for (key, value) in export.provenance {
        kv.push((format!("distillery.{key}"), Kv::Str(value.clone())));
    }

    let specs: Vec<TensorSpec> = config.tensor_specs();
    let shapes = config.tensor_shapes();
    let layers = config.num_hidden_layers;
    // (GGUF name, tensor spec or the data itself, shape, type, offset)
    let mut planned: Vec<(
        String,
        Result<&TensorSpec, Vec<f32>>,
        Vec<usize>,
        GgmlType,
        usize,
    )> = Vec::new();
    let mut offset = 0usize;
    let mut plan = |name: String, source, shape: Vec<usize>, ty: GgmlType| {
        let numel: usize = shape.iter().product();
        let bytes = ty.bytes_for(numel).expect("the row length was checked");
        planned.push((name, source, shape, ty, offset));
        offset += bytes.div_ceil(ALIGNMENT) * ALIGNMENT;
    };
    if let Some(scaling @ crate::model::config::RopeScaling::Llama3 { .. }) = &config.rope_scaling {
        let freqs = rope_freq_divisors(config.head_dim, config.rope_theta, scaling);
        let n = freqs.len();
        plan(
            "rope_freqs.weight".into(),
            Err(freqs),
            vec![n],
            GgmlType::F32,
        );
    }
    for spec in &specs {
        let shape = shapes
            .iter()
            .find(|(n, _)| n == &spec.name)
            .map(|(_, s)| s.clone())
            .ok_or_else(|| bad(format!("no shape for `{}`", spec.name)))?;
        let ty = export
            .quant
            .tensor_type(spec, &shape, layers, config.tie_word_embeddings);
        plan(spec.gguf_name(), Ok(spec), shape, ty);
    }

    let tmp = PartialFile(std::path::PathBuf::from(format!(
        "{}.partial",
        out.display()
    )));
    let file = std::fs::File::create(&tmp.0)
        .map_err(|e| bad(format!("create {}: {e}", tmp.0.display())))?;
    let mut w = BufWriter::new(file);
    let io = |e: std::io::Error| ModelError::Gguf {
        path: out.to_path_buf(),
        why: format!("write: {e}"),
    };
    w.write_all(b"GGUF").map_err(io)?;
    w.write_all(&3u32.to_le_bytes()).map_err(io)?;
    w.write_all(&(planned.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&(kv.len() as u64).to_le_bytes()).map_err(io)?;
    for (key, value) in &kv {
        write_str(&mut w, key).map_err(io)?;
        write_kv(&mut w, value).map_err(io)?;
    }
    for (name, _, shape, ty, offset) in &planned {
        write_str(&mut w, name).map_err(io)?;
        w.write_all(&(shape.len() as u32).to_le_bytes())
            .map_err(io)?;
        for d in shape.iter().rev() {
            w.write_all(&(*d as u64).to_le_bytes()).map_err(io)?;
        }
        w.write_all(&ty.id().to_le_bytes()).map_err(io)?;
        w.write_all(&(*offset as u64).to_le_bytes()).map_err(io)?;
    }
    let pos = w.stream_position().map_err(io)? as usize;
    w.write_all(&vec![0u8; pos.div_ceil(ALIGNMENT) * ALIGNMENT - pos])
        .map_err(io)?;
    let shift = family.norm.offset();
    let mut report = Vec::new();
    for (name, source, shape, ty, _) in planned {
        let data = match source {
            Err(data) => data,
            Ok(spec) => {
                let mut data = tensor(&spec.name)?;
                let cols = shape.get(1).copied().unwrap_or(1);
                // llama.cpp's converter permutes the biases of q/k with their rows.
                match spec.role {
                    Role::Q | Role::QBias if family.gguf_permutes_qk => {
                        data = permute_rows(&data, config.num_attention_heads, cols)
                    }
                    Role::K | Role::KBias if family.gguf_permutes_qk => {
                        data = permute_rows(&data, config.num_key_value_heads, cols)
                    }
                    r if r.is_norm_scale() && shift != 0.0 => {
                        data.iter_mut().for_each(|v| *v += shift)
                    }
                    _ => {}
                }
                data
            }
        };
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!(
                "tensor `{name}` holds {} at flat index {i}",
                data[i]
            )));
        }
        let bytes = quantize(ty, &data).expect("export types all quantize");
        w.write_all(&bytes).map_err(io)?;
        w.write_all(&vec![
            0u8;
            bytes.len().div_ceil(ALIGNMENT) * ALIGNMENT
                - bytes.len()
        ])
        .map_err(io)?;
        report.push((name, ty, shape));
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp.0, out).map_err(io)?;
    std::mem::forget(tmp);
    Ok(report)
}

/// A file being written, removed unless the write completes (then it is renamed and forgotten).
struct PartialFile(std::path::PathBuf);

impl Drop for PartialFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn write_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

/// A value with its GGUF type tag (gguf.md: 4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array).
fn write_kv(w: &mut impl Write, v: &Kv) -> std::io::Result<()> {
    let array = |w: &mut dyn Write, ty: u32, n: usize| -> std::io::Result<()> {
        w.write_all(&9u32.to_le_bytes())?;
        w.write_all(&ty.to_le_bytes())?;
        w.write_all(&(n as u64).to_le_bytes())
    };
    match v {
        Kv::U32(x) => {
            w.write_all(&4u32.to_le_bytes())?;
            w.write_all(&x.to_le_bytes())
        }
        Kv::F32(x) => {
            w.write_all(&6u32.to_le_bytes())?;
            w.write_all(&x.to_le_bytes())
        }
        Kv::Bool(b) => {
            w.write_all(&7u32.to_le_bytes())?;
            w.write_all(&[*b as u8])
        }
        Kv::Str(s) => {
            w.write_all(&8u32.to_le_bytes())?;
            write_str(w, s)
        }
        Kv::Strs(a) => {
            array(w, 8, a.len())?;
            a.iter().try_for_each(|s| write_str(w, s))
        }
        Kv::I32s(a) => {
            array(w, 5, a.len())?;
            a.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
        }
        Kv::F32s(a) => {
            array(w, 6, a.len())?;
            a.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
        }
    }
}

/// When the model at `model` is a GGUF with quantized tensors, the warning to give: exporting it
/// quantizes it a second time. `None` for a checkpoint directory or a float GGUF.
pub fn requantization_warning(model: &Path) -> Option<String> {
    let file = super::GgufFile::open(&crate::model::checkpoint::gguf_file(model)?).ok()?;
    let mut types: Vec<&'static str> = file
        .tensors
        .iter()
        .filter(|t| !matches!(t.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16))
        .map(|t| t.ty.name())
        .collect();
    types.sort_unstable();
    types.dedup();
    (!types.is_empty()).then(|| {
        format!(
            "the model is already quantized ({}); quantizing it again adds a second rounding",
            types.join(", ")
        )
    })
}

/// Exports the model at `model` (a Hugging Face checkpoint directory or a GGUF file) as the GGUF
/// file `out`, quantized as `quant`, with `provenance` under `distillery.*` keys.
pub fn export_model(
    model: &Path,
    out: &Path,
    quant: GgufQuant,
    name: &str,
    provenance: &[(String, String)],
) -> Result<GgufTensorReport, ModelError> {
    let m = crate::model::checkpoint::load_model(model)?;
    let mut tokenizer_config: Option<Value> = m.tokenizer_config.clone().or_else(|| {
        let file = m
            .tokenizer_files
            .iter()
            .find(|f| f.ends_with("tokenizer_config.json"))?;
        serde_json::from_str(&std::fs::read_to_string(file).ok()?).ok()
    });
    // The template wherever the checkpoint keeps it (transformers 5: chat_template.jinja; named
    // templates: the default one), as `tokenizer.chat_template`.
    if let Some(t) = crate::model::chat::template_source(&m) {
        let t = t.map_err(|why| ModelError::Tokenizer {
            path: m.path.clone(),
            why: format!("its chat template cannot be read: {why}"),
        })?;
        tokenizer_config.get_or_insert_with(|| serde_json::json!({}))["chat_template"] = t.into();
    }
    let export = GgufExport {
        config: &m.config,
        tokenizer_json: m.tokenizer_json.as_deref(),
        tokenizer_config: tokenizer_config.as_ref(),
        quant,
        name,
        provenance,
    };
    write_gguf(out, &export, &mut |n| m.weights.f32(n).map(|(_, v)| v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer_with_pre(pre: Value) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/golden/gguf-tokenizer/tokenizer.json");
        let mut tok: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        tok["pre_tokenizer"] = pre;
        tok.to_string()
    }

    /// Every pre-tokenizer the reader rebuilds is named back by the writer (names that share one
    /// split give the first), and one it does not know is refused, not written as another.
    #[test]
    fn pre_tokenizers_are_named_as_the_reader_rebuilds_them() {
        for (name, rebuild) in super::super::PRE_TOKENIZERS.iter() {
            let kv = tokenizer_metadata(&tokenizer_with_pre(rebuild()), None, 160).unwrap();
            let written = kv.iter().find_map(|(k, v)| match v {
                Kv::Str(s) if k == "tokenizer.ggml.pre" => Some(s.clone()),
                _ => None,
            });
            let first = super::super::PRE_TOKENIZERS
                .iter()
                .find(|(_, r)| r() == rebuild())
                .unwrap()
                .0;
            assert_eq!(written.as_deref(), Some(first), "{name}");
        }
        let odd = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Punctuation", "behavior": "Isolated"},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]});
        let err = tokenizer_metadata(&tokenizer_with_pre(odd), None, 160)
            .err()
            .unwrap();
        assert!(err.contains("pre_tokenizer"), "{err}");
    }
}
