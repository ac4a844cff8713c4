//! GGUF (v2, v3) model files: metadata, tensors dequantized to f32 (every type llama.cpp writes
//! for weights, [`quants`]), llama.cpp's Q/K row permutation undone, Hugging Face names, and the
//! tokenizer rebuilt from metadata as a `tokenizer.json`.

mod grids;
pub mod quants;
pub mod writer;

pub use quants::GgmlType;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::{Value, json};

use crate::model::ModelError;
use crate::model::arch::{FAMILIES, Family, Role, TensorSpec};
use crate::model::checkpoint::LoadedModel;
use crate::model::config::ModelConfig;
use crate::model::weights::Weights;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Meta {
    U(u64),
    I(i64),
    F(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Meta>),
}

impl Meta {
    fn as_u64(&self) -> Option<u64> {
        match self {
            Meta::U(v) => Some(*v),
            Meta::I(v) if *v >= 0 => Some(*v as u64),
            _ => None,
        }
    }
    fn as_f64(&self) -> Option<f64> {
        match self {
            Meta::F(v) => Some(*v),
            Meta::U(v) => Some(*v as f64),
            Meta::I(v) => Some(*v as f64),
            _ => None,
        }
    }
    fn as_str(&self) -> Option<&str> {
        match self {
            Meta::Str(s) => Some(s),
            _ => None,
        }
    }
    fn as_bool(&self) -> Option<bool> {
        match self {
            Meta::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

pub struct TensorInfo {
    pub name: String,
    /// Hugging Face order (outermost first): the reverse of ggml's `ne`.
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    pub offset: usize,
}

/// A parsed GGUF file, memory-mapped.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Meta>,
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
    mmap: Mmap,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                format!(
                    "unexpected end of file at byte {} (wanted {n} more bytes): truncated?",
                    self.pos
                )
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.u64()?;
        if n > self.buf.len() as u64 {
            return Err(format!(
                "string length {n} at byte {} is larger than the file",
                self.pos - 8
            ));
        }
        let b = self.take(n as usize)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| format!("string at byte {} is not UTF-8", self.pos - n as usize))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Meta, String> {
        Ok(match ty {
            0 => Meta::U(self.take(1)?[0] as u64),
            1 => Meta::I(self.take(1)?[0] as i8 as i64),
            2 => Meta::U(u16::from_le_bytes(self.take(2)?.try_into().unwrap()) as u64),
            3 => Meta::I(i16::from_le_bytes(self.take(2)?.try_into().unwrap()) as i64),
            4 => Meta::U(self.u32()? as u64),
            5 => Meta::I(self.u32()? as i32 as i64),
            6 => Meta::F(f32::from_le_bytes(self.take(4)?.try_into().unwrap()) as f64),
            7 => Meta::Bool(self.take(1)?[0] != 0),
            8 => Meta::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err("arrays nested too deep".into());
                }
                let inner = self.u32()?;
                let n = self.u64()?;
                if n > self.buf.len() as u64 {
                    return Err(format!("array length {n} is larger than the file"));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(inner, depth + 1)?);
                }
                Meta::Array(items)
            }
            10 => Meta::U(self.u64()?),
            11 => Meta::I(self.u64()? as i64),
            12 => Meta::F(f64::from_le_bytes(self.take(8)?.try_into().unwrap())),
            other => return Err(format!("unknown metadata value type {other}")),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile, ModelError> {
        let bad = |why: String| ModelError::Gguf {
            path: path.to_path_buf(),
            why,
        };
        let file = File::open(path).map_err(|e| ModelError::io(path, "open", e))?;
        // SAFETY: read-only map of a file we do not modify.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, "map", e))?;
        let mut r = Reader { buf: &mmap, pos: 0 };
        let magic = r.take(4).map_err(bad)?;
        if magic != b"GGUF" {
            return Err(bad("not a GGUF file (no GGUF magic)".into()));
        }
        let version = r.u32().map_err(bad)?;
        if !(2..=3).contains(&version) {
            return Err(bad(format!(
                "GGUF version {version}; distillery reads versions 2 and 3"
            )));
        }
        let n_tensors = r.u64().map_err(bad)?;
        let n_kv = r.u64().map_err(bad)?;
        if n_tensors > 1 << 20 || n_kv > 1 << 20 {
            return Err(bad(format!(
                "implausible counts: {n_tensors} tensors, {n_kv} metadata entries"
            )));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string().map_err(bad)?;
            let ty = r.u32().map_err(bad)?;
            let v = r
                .value(ty, 0)
                .map_err(|e| bad(format!("metadata `{key}`: {e}")))?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::new();
        for _ in 0..n_tensors {
            let name = r.string().map_err(bad)?;
            let n_dims = r.u32().map_err(bad)?;
            if n_dims > 4 {
                return Err(bad(format!("tensor `{name}` has {n_dims} dimensions")));
            }
            let mut ne = Vec::new();
            for _ in 0..n_dims {
                ne.push(r.u64().map_err(bad)? as usize);
            }
            let ty_id = r.u32().map_err(bad)?;
            let ty = GgmlType::from_id(ty_id).ok_or_else(|| {
                let known: Vec<&str> = GgmlType::ALL.iter().map(|t| t.name()).collect();
                bad(format!(
                    "tensor `{name}` has ggml type id {ty_id}, which is not a weight type distillery reads ({}); convert the file with a llama.cpp that writes one of them",
                    known.join(", ")
                ))
            })?;
            let offset = r.u64().map_err(bad)? as usize;
            ne.reverse();
            tensors.push(TensorInfo {
                name,
                shape: ne,
                ty,
                offset,
            });
        }
        let align = metadata
            .get("general.alignment")
            .and_then(Meta::as_u64)
            .unwrap_or(32) as usize;
        if align == 0 || !align.is_power_of_two() {
            return Err(bad(format!(
                "general.alignment {align} is not a power of two"
            )));
        }
        let data_start = r.pos.div_ceil(align) * align;
        for t in &tensors {
            // Checked arithmetic: a corrupt header must give an error, not an overflow.
            let numel = t.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            let Some(bytes) = numel.and_then(|n| t.ty.bytes_for(n)) else {
                return Err(bad(format!(
                    "tensor `{}`: shape {:?} is not a whole number of {} blocks",
                    t.name,
                    t.shape,
                    t.ty.name()
                )));
            };
            let end = data_start
                .checked_add(t.offset)
                .and_then(|e| e.checked_add(bytes));
            if end.is_none_or(|end| end > mmap.len()) {
                return Err(bad(format!(
                    "tensor `{}` runs past the end of the file: truncated?",
                    t.name
                )));
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_start,
            mmap,
        })
    }

    fn meta_u(&self, key: &str) -> Result<usize, ModelError> {
        self.metadata
            .get(key)
            .and_then(Meta::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| ModelError::Gguf {
                path: self.path.clone(),
                why: format!("metadata `{key}` is missing"),
            })
    }

    /// RoPE scaling as a Hugging Face `rope_scaling` object, from the metadata llama.cpp writes
    /// (`{arch}.rope.scaling.type` / `.factor`, the older `{arch}.rope.scale_linear`) or from a
    /// `rope_freqs.weight` tensor (Llama 3.x: per-frequency divisors, matched against llama3
    /// scaling). Kinds distillery does not compute are refused by name.
    fn rope_scaling(&self, arch: &str, head_dim: usize) -> Result<Option<Value>, ModelError> {
        let bad = |why: String| ModelError::Gguf {
            path: self.path.clone(),
            why,
        };
        let k = |s: &str| format!("{arch}.{s}");
        let factor = self
            .metadata
            .get(&k("rope.scaling.factor"))
            .and_then(Meta::as_f64);
        let kind = self
            .metadata
            .get(&k("rope.scaling.type"))
            .and_then(Meta::as_str)
            .map(str::to_string);
        // As llama.cpp reads them: the type defaults to linear, the factor is
        // `rope.scaling.factor` else the older `rope.scale_linear`, and 0 or 1 means none.
        let factor = factor
            .or_else(|| {
                self.metadata
                    .get(&k("rope.scale_linear"))
                    .and_then(Meta::as_f64)
            })
            .filter(|f| *f != 0.0 && *f != 1.0);
        let from_meta = match (kind.as_deref().unwrap_or("linear"), factor) {
            (_, None) => None,
            ("linear", Some(f)) => Some(json!({"rope_type": "linear", "factor": f})),
            (other, Some(f)) => {
                return Err(bad(format!(
                    "metadata `{}` is \"{other}\" with factor {f}: distillery computes linear and llama3 RoPE scaling, not {other}",
                    k("rope.scaling.type")
                )));
            }
        };
        let Some(t) = self.tensors.iter().find(|t| t.name == "rope_freqs.weight") else {
            return Ok(from_meta);
        };
        if from_meta.is_some() {
            return Err(bad(
                "the file has both rope scaling metadata and a `rope_freqs.weight` tensor; one of them must go".into(),
            ));
        }
        let divisors = self.dequantize(t);
        if divisors.len() != head_dim / 2 {
            return Err(bad(format!(
                "`rope_freqs.weight` has {} entries for head_dim {head_dim} ({} expected)",
                divisors.len(),
                head_dim / 2
            )));
        }
        if divisors.iter().all(|&d| d == 1.0) {
            return Ok(None);
        }
        // llama.cpp's converter writes llama3 scaling as divisors of the inverse frequencies.
        // The factor is the largest divisor; Llama 3.1–3.3 use low 1, high 4 and 8192 tokens.
        let theta = self
            .metadata
            .get(&k("rope.freq_base"))
            .and_then(Meta::as_f64)
            .unwrap_or(10000.0);
        let factor = divisors.iter().cloned().fold(1.0f32, f32::max) as f64;
        // The original context as the file states it (distillery's exports do), else Llama 3.x's.
        let stated = self
            .metadata
            .get(&k("rope.scaling.original_context_length"))
            .and_then(Meta::as_u64)
            .map(|v| v as usize);
        let candidates = stated.into_iter().chain([8192usize, 4096, 2048]);
        for (low, high, original) in candidates.map(|o| (1.0, 4.0, o)) {
            let scaling = crate::model::config::RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: original,
            };
            let matches = rope_freq_divisors(head_dim, theta, &scaling)
                .iter()
                .zip(&divisors)
                .all(|(want, d)| (want - d).abs() <= 1e-3 * d.abs().max(1.0));
            if matches {
                return Ok(Some(scaling.to_json()));
            }
        }
        Err(bad(format!(
            "`rope_freqs.weight` holds per-frequency RoPE divisors (largest {factor}) that match no llama3 scaling distillery knows (low 1, high 4, original 8192/4096/2048 tokens)"
        )))
    }

    /// The tensor dequantized to f32, in Hugging Face shape order.
    pub fn dequantize(&self, t: &TensorInfo) -> Vec<f32> {
        let numel: usize = t.shape.iter().product();
        let bytes = t.ty.bytes_for(numel).expect("checked at open");
        let start = self.data_start + t.offset;
        quants::dequantize(t.ty, &self.mmap[start..start + bytes])
    }

    /// The family of `general.architecture` (llama.cpp's names: `llama`, `qwen2`, `gemma2`...).
    pub fn family(&self) -> Result<&'static Family, ModelError> {
        let arch = self
            .metadata
            .get("general.architecture")
            .and_then(Meta::as_str)
            .unwrap_or_default();
        // Early llama.cpp wrote Mistral models as "mistral"; the converter now writes "llama".
        if arch == "mistral" {
            return Ok(&crate::model::arch::MISTRAL);
        }
        FAMILIES
            .iter()
            .copied()
            .find(|f| f.gguf_arch == arch)
            .ok_or_else(|| {
                let known: Vec<&str> = FAMILIES.iter().map(|f| f.gguf_arch).collect();
                ModelError::Gguf {
                    path: self.path.clone(),
                    why: format!(
                        "metadata `general.architecture` is \"{arch}\"; distillery reads {}",
                        known.join(", ")
                    ),
                }
            })
    }

    fn meta_f(&self, key: &str) -> Option<f64> {
        self.metadata.get(key).and_then(Meta::as_f64)
    }

    /// The model's config in Hugging Face terms, from llama.cpp's metadata. What llama.cpp derives
    /// rather than stores is derived the same way (Gemma's query scale from head_dim, Gemma 3's
    /// local RoPE base 10000 unless `rope.freq_base_swa` says otherwise, windows by the family's
    /// layer pattern).
    pub fn config(&self) -> Result<ModelConfig, ModelError> {
        let family = self.family()?;
        let arch = self
            .metadata
            .get("general.architecture")
            .and_then(Meta::as_str)
            .unwrap_or_default()
            .to_string();
        let bad = |why: String| ModelError::Gguf {
            path: self.path.clone(),
            why,
        };
        let k = |s: &str| format!("{arch}.{s}");
        let hidden = self.meta_u(&k("embedding_length"))?;
        let heads = self.meta_u(&k("attention.head_count"))?;
        let kv_heads = self
            .metadata
            .get(&k("attention.head_count_kv"))
            .and_then(Meta::as_u64)
            .map(|v| v as usize)
            .unwrap_or(heads);
        let layers = self.meta_u(&k("block_count"))?;
        // llama.cpp: key_length when given, else n_embd / n_head (rope.dimension_count is the
        // rotated part only, which is all of it outside the partial-rotary families).
        let head_dim = self
            .metadata
            .get(&k("attention.key_length"))
            .and_then(Meta::as_u64)
            .map(|v| v as usize)
            .or_else(|| {
                (!family.partial_rotary)
                    .then(|| self.metadata.get(&k("rope.dimension_count")))
                    .flatten()
                    .and_then(Meta::as_u64)
                    .map(|v| v as usize)
            })
            .unwrap_or(hidden / heads);
        let vocab = match self.metadata.get(&k("vocab_size")).and_then(Meta::as_u64) {
            Some(v) => v as usize,
            None => match self.metadata.get("tokenizer.ggml.tokens") {
                Some(Meta::Array(a)) => a.len(),
                _ => self.meta_u(&k("vocab_size"))?,
            },
        };
        let has = |name: &str| self.tensors.iter().any(|t| t.name == name);
        let eps = self
            .meta_f(&k(if family.norm.has_bias() {
                "attention.layer_norm_epsilon"
            } else {
                "attention.layer_norm_rms_epsilon"
            }))
            .unwrap_or(family.default_eps);
        let mut json = json!({
            "architectures": [family.architecture],
            "model_type": family.model_type,
            "hidden_size": hidden,
            "intermediate_size": self.meta_u(&k("feed_forward_length"))?,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "vocab_size": vocab,
            (family.eps_key): eps,
            "rope_theta": self.meta_f(&k("rope.freq_base")).unwrap_or(family.default_rope_theta),
            "max_position_embeddings": self.metadata.get(&k("context_length")).and_then(Meta::as_u64).unwrap_or(2048),
            "tie_word_embeddings": !has("output.weight"),
        });
        if family.attention_bias == crate::model::arch::AttentionBias::FromConfig {
            json["attention_bias"] = has("blk.0.attn_q.bias").into();
        }
        if family.mlp_bias_key {
            json["mlp_bias"] = has("blk.0.ffn_up.bias").into();
        }
        if let Some(rot) = self
            .metadata
            .get(&k("rope.dimension_count"))
            .and_then(Meta::as_u64)
        {
            let rot = rot as usize;
            if family.partial_rotary {
                json["partial_rotary_factor"] = (rot as f64 / head_dim as f64).into();
            } else if rot != head_dim {
                return Err(bad(format!(
                    "metadata `{}` is {rot} but heads have {head_dim} dimensions: a {} model rotates all of them",
                    k("rope.dimension_count"),
                    family.architecture
                )));
            }
        }
        if let Some(w) = self
            .metadata
            .get(&k("attention.sliding_window"))
            .and_then(Meta::as_u64)
        {
            json["sliding_window"] = w.into();
        } else if family.gguf_arch == "llama" && family.default_sliding_window.is_some() {
            // llama.cpp runs a Mistral file without a window key with full attention (Gemma's
            // files without one get Gemma's default window, in llama.cpp as in transformers).
            json["sliding_window"] = Value::Null;
        }
        if family.softcaps {
            for key in ["attn_logit_softcapping", "final_logit_softcapping"] {
                match self.meta_f(&k(key)) {
                    // 0 means none (distillery writes it for a cap that is off).
                    Some(v) if v <= 0.0 => json[key] = Value::Null,
                    Some(v) => json[key] = v.into(),
                    None => {}
                }
            }
        }
        if family.query_pre_attn_scalar {
            json["query_pre_attn_scalar"] =
                gguf_query_scale(family, hidden, heads, head_dim, layers).into();
        }
        if family.rope_per_layer_type {
            json["rope_local_base_freq"] = self
                .meta_f(&k("rope.freq_base_swa"))
                .unwrap_or(10000.0)
                .into();
        }
        if family.rope_scaling {
            if let Some(scaling) = self.rope_scaling(&arch, head_dim)? {
                json["rope_scaling"] = scaling;
            }
        } else if self.metadata.contains_key(&k("rope.scaling.type")) {
            return Err(bad(format!(
                "metadata `{}` is set: distillery computes no RoPE scaling for {}",
                k("rope.scaling.type"),
                family.architecture
            )));
        }
        if let Some(b) = self
            .metadata
            .get("tokenizer.ggml.bos_token_id")
            .and_then(Meta::as_u64)
        {
            json["bos_token_id"] = b.into();
        }
        if let Some(e) = self
            .metadata
            .get("tokenizer.ggml.eos_token_id")
            .and_then(Meta::as_u64)
        {
            json["eos_token_id"] = e.into();
        }
        ModelConfig::from_json_str(&json.to_string()).map_err(bad)
    }
}

/// llama.cpp's `rope_freqs.weight` for a RoPE scaling: per frequency, the divisor of the plain
/// inverse frequency (`[head_dim / 2]`), as its converter writes Llama 3 scaling.
pub fn rope_freq_divisors(
    head_dim: usize,
    theta: f64,
    scaling: &crate::model::config::RopeScaling,
) -> Vec<f32> {
    use crate::model::decoder::rope_inv_freq;
    let plain = rope_inv_freq(head_dim, theta, None);
    let scaled = rope_inv_freq(head_dim, theta, Some(scaling));
    plain.iter().zip(&scaled).map(|(p, s)| p / s).collect()
}

/// Gemma's query scale as llama.cpp derives it (it stores none): `head_dim`, except the 27B
/// models (46 layers for Gemma 2, 62 for Gemma 3), which scale by `hidden / heads`.
pub fn gguf_query_scale(
    family: &Family,
    hidden: usize,
    heads: usize,
    head_dim: usize,
    layers: usize,
) -> usize {
    let is_27b = match family.gguf_arch {
        "gemma2" => layers == 46,
        "gemma3" => layers == 62,
        _ => false,
    };
    if is_27b { hidden / heads } else { head_dim }
}

/// Undoes llama.cpp's `permute` of q_proj/k_proj rows (it interleaves the two RoPE halves of each
/// head). `w` is `[heads * head_dim, cols]` row-major.
pub fn unpermute_rows(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    move_rope_rows(w, heads, cols, false)
}

/// llama.cpp's `LlamaModel.permute` of q_proj/k_proj rows: within each head, the two RoPE halves
/// interleaved (the inverse of [`unpermute_rows`]). `w` is `[heads * head_dim, cols]`.
pub fn permute_rows(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    move_rope_rows(w, heads, cols, true)
}

/// Row `h·d + j·(d/2) + i` (Hugging Face's halves) is row `h·d + 2i + j` in llama.cpp's layout.
fn move_rope_rows(w: &[f32], heads: usize, cols: usize, to_llama_cpp: bool) -> Vec<f32> {
    let d = w.len() / cols / heads;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for j in 0..2 {
                let interleaved = h * d + i * 2 + j;
                let halves = h * d + j * (d / 2) + i;
                let (from, to) = if to_llama_cpp {
                    (halves, interleaved)
                } else {
                    (interleaved, halves)
                };
                out[to * cols..(to + 1) * cols].copy_from_slice(&w[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

/// Reads just the config from a GGUF file's metadata.
pub fn read_config(path: &Path) -> Result<ModelConfig, ModelError> {
    GgufFile::open(path)?.config()
}

/// Loads a GGUF model: dequantized tensors under Hugging Face names (the family's table, llama.cpp's
/// row permutation and norm offsets undone) and the tokenizer.
pub fn load(path: &Path) -> Result<LoadedModel, ModelError> {
    let file = GgufFile::open(path)?;
    let config = file.config()?;
    let family = config.family;
    let specs: std::collections::HashMap<String, TensorSpec> = config
        .tensor_specs()
        .into_iter()
        .map(|s| (s.gguf_name(), s))
        .collect();
    let offset = family.norm.offset();
    let mut tensors = BTreeMap::new();
    for t in &file.tensors {
        if t.name == "rope_freqs.weight" {
            continue; // RoPE scaling, read into the config
        }
        let spec = specs.get(&t.name).ok_or_else(|| ModelError::Gguf {
            path: path.to_path_buf(),
            why: format!(
                "tensor `{}` has no counterpart in a {} with this config",
                t.name, family.architecture
            ),
        })?;
        let mut data = file.dequantize(t);
        let cols = t.shape.get(1).copied().unwrap_or(1);
        match spec.role {
            Role::Q | Role::QBias if family.gguf_permutes_qk => {
                data = unpermute_rows(&data, config.num_attention_heads, cols)
            }
            Role::K | Role::KBias if family.gguf_permutes_qk => {
                data = unpermute_rows(&data, config.num_key_value_heads, cols)
            }
            r if r.is_norm_scale() && offset != 0.0 => data.iter_mut().for_each(|v| *v -= offset),
            _ => {}
        }
        tensors.insert(spec.name.clone(), (t.shape.clone(), data));
    }
    let weights = Weights::from_memory(path.to_path_buf(), tensors);
    weights.check_against(&config)?;
    let tokenizer_json = tokenizer_json(&file)?.to_string();
    let tokenizer_config = crate::model::checkpoint::tokenizer_config(
        &config,
        &tokenizer_json,
        file.metadata
            .get("tokenizer.chat_template")
            .and_then(Meta::as_str),
        file.metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(Meta::as_bool),
    );
    Ok(LoadedModel {
        config,
        weights,
        tokenizer_json: Some(tokenizer_json),
        tokenizer_files: Vec::new(),
        generation_config: None,
        tokenizer_config: Some(tokenizer_config),
        path: path.to_path_buf(),
    })
}

fn byte_level_pre_tokenizer() -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
}

/// The byte-level BPE pre-tokenizers distillery rebuilds, by llama.cpp's `tokenizer.ggml.pre`
/// names: the reader rebuilds a `tokenizer.json` from the name, the writer names a
/// `tokenizer.json` by finding its pre-tokenizer here (the first name wins).
#[allow(clippy::type_complexity)]
pub static PRE_TOKENIZERS: [(&str, fn() -> Value); 8] = [
    ("default", byte_level_pre_tokenizer),
    ("gpt-2", byte_level_pre_tokenizer),
    // SmolLM splits digits one by one before the GPT-2 byte-level split.
    ("smollm", digits_then_byte_level),
    ("starcoder", digits_then_byte_level),
    ("refact", digits_then_byte_level),
    ("llama-bpe", llama3_pre_tokenizer),
    ("llama3", llama3_pre_tokenizer),
    // Qwen2 and Qwen3: Llama 3's split with single digits.
    ("qwen2", qwen2_pre_tokenizer),
];

fn qwen2_pre_tokenizer() -> Value {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
         "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]})
}

fn digits_then_byte_level() -> Value {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": true}, byte_level_pre_tokenizer()]})
}

fn llama3_pre_tokenizer() -> Value {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
         "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]})
}

/// Rebuilds a Hugging Face `tokenizer.json` from `tokenizer.ggml.*` metadata.
pub fn tokenizer_json(file: &GgufFile) -> Result<Value, ModelError> {
    let bad = |why: String| ModelError::Tokenizer {
        path: file.path.clone(),
        why,
    };
    let model = file
        .metadata
        .get("tokenizer.ggml.model")
        .and_then(Meta::as_str)
        .unwrap_or("");
    let strings = |key: &str| -> Result<Vec<String>, ModelError> {
        match file.metadata.get(key) {
            Some(Meta::Array(a)) => a
                .iter()
                .map(|m| {
                    m.as_str()
                        .map(String::from)
                        .ok_or_else(|| bad(format!("`{key}` holds a non-string")))
                })
                .collect(),
            _ => Err(bad(format!("metadata `{key}` is missing"))),
        }
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let types: Vec<u64> = match file.metadata.get("tokenizer.ggml.token_type") {
        Some(Meta::Array(a)) => a.iter().map(|m| m.as_u64().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    // Control (3) and user-defined (4) tokens are matched whole, never split.
    let added: Vec<Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types.get(i) == Some(&3)})
        })
        .collect();
    let flag = |key: &str| file.metadata.get(key).and_then(Meta::as_bool);
    // llama.cpp prepends "▁" to SentencePiece text unless the file says not to (Gemma).
    let add_space_prefix = flag("tokenizer.ggml.add_space_prefix").unwrap_or(true);
    // A BOS before every text, as the file says, through the post-processor (as Hugging Face
    // tokenizers add it, and as evaluate then finds it).
    let bos = file
        .metadata
        .get("tokenizer.ggml.bos_token_id")
        .and_then(Meta::as_u64)
        .and_then(|id| Some((id, tokens.get(id as usize)?.clone())));
    let with_bos = |inner: Value| -> Value {
        let Some((id, text)) = bos
            .clone()
            .filter(|_| flag("tokenizer.ggml.add_bos_token") == Some(true))
        else {
            return inner;
        };
        let template = json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": text, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {text.clone(): {"id": text, "ids": [id], "tokens": [text]}}});
        if inner.is_null() {
            template
        } else {
            json!({"type": "Sequence", "processors": [inner, template]})
        }
    };
    match model {
        "gpt2" => {
            let merges = strings("tokenizer.ggml.merges")?;
            let vocab: serde_json::Map<String, Value> = tokens
                .iter()
                .enumerate()
                .map(|(i, t)| (t.clone(), Value::from(i)))
                .collect();
            let pre = file
                .metadata
                .get("tokenizer.ggml.pre")
                .and_then(Meta::as_str)
                .unwrap_or("default");
            // An unknown split would tokenize every text differently: refused, not guessed.
            let pre_tokenizer = PRE_TOKENIZERS
                .iter()
                .find(|(name, _)| *name == pre)
                .map(|(_, rebuild)| rebuild())
                .ok_or_else(|| {
                    let known: Vec<&str> = PRE_TOKENIZERS.iter().map(|p| p.0).collect();
                    bad(format!(
                        "metadata `tokenizer.ggml.pre` is \"{pre}\", a pre-tokenizer distillery cannot rebuild (it knows {}); give the model as a Hugging Face checkpoint with its tokenizer.json",
                        known.join(", ")
                    ))
                })?;
            Ok(json!({
                "version": "1.0",
                "truncation": null,
                "padding": null,
                "added_tokens": added,
                "normalizer": null,
                "pre_tokenizer": pre_tokenizer,
                "post_processor": with_bos(json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})),
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                          "vocab": vocab, "merges": merges}
            }))
        }
        "llama" => {
            // SentencePiece-style BPE over scores, with byte fallback, as tokenizers' Llama conversion.
            let scores: Vec<f64> = match file.metadata.get("tokenizer.ggml.scores") {
                Some(Meta::Array(a)) => a.iter().map(|m| m.as_f64().unwrap_or(0.0)).collect(),
                _ => return Err(bad("metadata `tokenizer.ggml.scores` is missing".into())),
            };
            let vocab: serde_json::Map<String, Value> = tokens
                .iter()
                .enumerate()
                .map(|(i, t)| (t.clone(), Value::from(i)))
                .collect();
            // Merges ranked by the score of the merged piece, as SentencePiece's BPE does.
            let index: std::collections::HashMap<&str, usize> = tokens
                .iter()
                .enumerate()
                .map(|(i, t)| (t.as_str(), i))
                .collect();
            let mut merges: Vec<(f64, usize, String)> = Vec::new();
            for (id, piece) in tokens.iter().enumerate() {
                if types.get(id) != Some(&1) {
                    continue;
                }
                let chars: Vec<(usize, char)> = piece.char_indices().collect();
                for k in 1..chars.len() {
                    let (l, r) = piece.split_at(chars[k].0);
                    if index.contains_key(l) && index.contains_key(r) {
                        let score = scores.get(id).copied().unwrap_or(f64::NEG_INFINITY);
                        merges.push((score, id, format!("{l} {r}")));
                    }
                }
            }
            merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let unk = file
                .metadata
                .get("tokenizer.ggml.unknown_token_id")
                .and_then(Meta::as_u64)
                .unwrap_or(0) as usize;
            Ok(json!({
                "version": "1.0",
                "truncation": null,
                "padding": null,
                "added_tokens": added,
                "normalizer": if add_space_prefix {
                    json!({"type": "Sequence", "normalizers": [
                        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]})
                } else {
                    json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
                },
                "pre_tokenizer": null,
                "post_processor": with_bos(Value::Null),
                "decoder": {"type": "Sequence", "decoders": [
                    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
                    {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
                "model": {"type": "BPE", "dropout": null, "unk_token": tokens.get(unk), "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                          "vocab": vocab, "merges": merges.into_iter().map(|m| m.2).collect::<Vec<_>>()}
            }))
        }
        other => Err(bad(format!(
            "metadata `tokenizer.ggml.model` is \"{other}\"; distillery rebuilds \"gpt2\" (BPE) and \"llama\" (SentencePiece) tokenizers"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: reshape(heads, 2, d/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let (heads, d, cols) = (2, 4, 3);
        let orig: Vec<f32> = (0..heads * d * cols).map(|x| x as f32).collect();
        let mut permuted = vec![0f32; orig.len()];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..d / 2 {
                    let src = h * d + j * (d / 2) + i;
                    let dst = h * d + i * 2 + j;
                    permuted[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&orig[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_eq!(unpermute_rows(&permuted, heads, cols), orig);
        assert_eq!(permute_rows(&orig, heads, cols), permuted);
    }
}
