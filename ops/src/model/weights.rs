//! Named tensors of a checkpoint, read one at a time: memory-mapped safetensors (single or sharded,
//! validated before use) or tensors decoded from a GGUF file. Hugging Face names throughout.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::model::ModelError;
use crate::model::config::ModelConfig;

/// Element types distillery reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }

    /// The `dtype` (formerly `torch_dtype`) name of config.json.
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }

    pub fn from_torch_name(s: &str) -> Option<DType> {
        match s {
            "float32" => Some(DType::F32),
            "float16" => Some(DType::F16),
            "bfloat16" => Some(DType::BF16),
            _ => None,
        }
    }
}

/// Converts raw little-endian bytes of `dtype` to f32.
pub fn bytes_to_f32(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}

/// Converts f32 values to little-endian bytes of `dtype` (round to nearest even).
pub fn f32_to_bytes(dtype: DType, values: &[f32]) -> Vec<u8> {
    match dtype {
        DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        DType::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
    }
}

/// One tensor in a checkpoint.
#[derive(Clone, Debug)]
pub struct TensorMeta {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorMeta {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

struct Located {
    file: usize,
    meta: TensorMeta,
    start: usize,
    end: usize,
}

enum Backing {
    Safetensors {
        files: Vec<(PathBuf, Mmap, usize)>,
        tensors: BTreeMap<String, Located>,
    },
    Memory(BTreeMap<String, (Vec<usize>, Vec<f32>)>),
}

/// A model's tensors, by name.
pub struct Weights {
    backing: Backing,
    /// Where they came from, for messages.
    pub origin: PathBuf,
}

const MAX_HEADER: u64 = 100 * 1024 * 1024;

fn st_dtype(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

impl Weights {
    /// Tensors held in memory (a decoded GGUF file).
    pub fn from_memory(
        origin: PathBuf,
        tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    ) -> Weights {
        Weights {
            backing: Backing::Memory(tensors),
            origin,
        }
    }

    /// Opens the safetensors of a Hugging Face checkpoint directory: `model.safetensors`, or the
    /// shards listed in `model.safetensors.index.json`. Headers are validated before anything is read.
    pub fn open_safetensors_dir(dir: &Path) -> Result<Weights, ModelError> {
        let index = dir.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if index.is_file() {
            let text =
                std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, "read", e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Checkpoint {
                    path: index.clone(),
                    why: format!("not valid JSON: {e}"),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Checkpoint {
                    path: index.clone(),
                    why: "no `weight_map` object".into(),
                })?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(String::from))
                .collect();
            names.sort();
            names.dedup();
            names
        } else if dir.join("model.safetensors").is_file() {
            vec!["model.safetensors".into()]
        } else {
            return Err(ModelError::Checkpoint {
                path: dir.to_path_buf(),
                why: "no model.safetensors and no model.safetensors.index.json".into(),
            });
        };
        let mut files = Vec::new();
        let mut tensors = BTreeMap::new();
        for (i, name) in shard_names.iter().enumerate() {
            if name.contains('/') || name.contains("..") {
                return Err(ModelError::Checkpoint {
                    path: index.clone(),
                    why: format!("shard name `{name}` leaves the directory"),
                });
            }
            let path = dir.join(name);
            let file = File::open(&path).map_err(|e| ModelError::io(&path, "open", e))?;
            // SAFETY: the map is read-only; a checkpoint rewritten underneath us is the user's race.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, "map", e))?;
            let bad = |why: String| ModelError::Checkpoint {
                path: path.clone(),
                why,
            };
            if mmap.len() < 8 {
                return Err(bad(format!(
                    "{} bytes is too short for a safetensors file (truncated?)",
                    mmap.len()
                )));
            }
            let header_len = u64::from_le_bytes(mmap[..8].try_into().unwrap());
            if header_len > MAX_HEADER {
                return Err(bad(format!(
                    "header length {header_len} is larger than 100 MB: not a safetensors file"
                )));
            }
            if 8 + header_len > mmap.len() as u64 {
                return Err(bad(format!(
                    "header length {header_len} runs past the end of the file ({} bytes): truncated?",
                    mmap.len()
                )));
            }
            let (header_size, meta) =
                SafeTensors::read_metadata(&mmap).map_err(|e| bad(describe_st_error(e)))?;
            let data_start = 8 + header_size;
            let data_len = mmap.len() - data_start;
            if meta.data_len() > data_len {
                return Err(bad(format!(
                    "tensors need {} bytes of data but the file has {data_len}: truncated?",
                    meta.data_len()
                )));
            }
            for (tname, info) in meta.tensors() {
                let dtype = st_dtype(info.dtype).ok_or_else(|| {
                    bad(format!(
                        "tensor `{tname}` has dtype {:?}; distillery reads F32, F16 and BF16",
                        info.dtype
                    ))
                })?;
                let (s, e) = info.data_offsets;
                let meta = TensorMeta {
                    dtype,
                    shape: info.shape.clone(),
                };
                if e - s != meta.numel() * dtype.size() {
                    return Err(bad(format!(
                        "tensor `{tname}`: {} bytes for shape {:?}",
                        e - s,
                        meta.shape
                    )));
                }
                if tensors.contains_key(&tname) {
                    return Err(bad(format!("tensor `{tname}` appears in two shards")));
                }
                tensors.insert(
                    tname,
                    Located {
                        file: i,
                        meta,
                        start: data_start + s,
                        end: data_start + e,
                    },
                );
            }
            files.push((path, mmap, data_start));
        }
        Ok(Weights {
            backing: Backing::Safetensors { files, tensors },
            origin: dir.to_path_buf(),
        })
    }

    pub fn names(&self) -> Vec<String> {
        match &self.backing {
            Backing::Safetensors { tensors, .. } => tensors.keys().cloned().collect(),
            Backing::Memory(m) => m.keys().cloned().collect(),
        }
    }

    pub fn meta(&self, name: &str) -> Option<TensorMeta> {
        match &self.backing {
            Backing::Safetensors { tensors, .. } => tensors.get(name).map(|l| l.meta.clone()),
            Backing::Memory(m) => m.get(name).map(|(s, _)| TensorMeta {
                dtype: DType::F32,
                shape: s.clone(),
            }),
        }
    }

    /// The tensor's bytes as stored (for bit-exact copies), when memory-mapped.
    pub fn raw(&self, name: &str) -> Option<(TensorMeta, &[u8])> {
        match &self.backing {
            Backing::Safetensors { files, tensors } => {
                let l = tensors.get(name)?;
                Some((l.meta.clone(), &files[l.file].1[l.start..l.end]))
            }
            Backing::Memory(_) => None,
        }
    }

    /// The tensor as f32, with its shape.
    pub fn f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
        let missing = || ModelError::Checkpoint {
            path: self.origin.clone(),
            why: format!("tensor `{name}` is missing"),
        };
        match &self.backing {
            Backing::Safetensors { .. } => {
                let (meta, bytes) = self.raw(name).ok_or_else(missing)?;
                Ok((meta.shape.clone(), bytes_to_f32(meta.dtype, bytes)))
            }
            Backing::Memory(m) => m.get(name).cloned().ok_or_else(missing),
        }
    }

    /// Every tensor's values are finite. Errors: the first tensor (by name) holding a NaN or an
    /// infinity, with the element's flat index and value: a model read with one would turn every
    /// loss and metric computed from it into NaN far from the cause.
    pub fn check_finite(&self) -> Result<(), ModelError> {
        for name in self.names() {
            let (shape, values) = self.f32(&name)?;
            if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(ModelError::Checkpoint {
                    path: self.origin.clone(),
                    why: format!(
                        "tensor `{name}` {shape:?} holds {v} at flat index {i}: the weights are corrupt (a diverged training run or a bad conversion); distillery refuses to compute with them"
                    ),
                });
            }
        }
        Ok(())
    }

    /// The dtype most tensors are stored in (what a saved copy should use by default).
    pub fn dominant_dtype(&self) -> DType {
        match &self.backing {
            Backing::Safetensors { tensors, .. } => {
                let mut counts = [0usize; 3];
                for l in tensors.values() {
                    counts[l.meta.dtype as usize] += 1;
                }
                [DType::F32, DType::F16, DType::BF16][(0..3).max_by_key(|&i| counts[i]).unwrap()]
            }
            Backing::Memory(_) => DType::F32,
        }
    }

    /// Checks that every tensor the config implies is here with the shape it implies, and that
    /// nothing unexpected is.
    pub fn check_against(&self, config: &ModelConfig) -> Result<(), ModelError> {
        let bad = |why: String| ModelError::Checkpoint {
            path: self.origin.clone(),
            why,
        };
        let expected = config.tensor_shapes();
        for (name, shape) in &expected {
            match self.meta(name) {
                None => {
                    return Err(bad(format!(
                        "tensor `{name}` is missing (config.json implies shape {shape:?})"
                    )));
                }
                Some(m) if &m.shape != shape => {
                    return Err(bad(format!(
                        "tensor `{name}` has shape {:?} but config.json implies {shape:?}",
                        m.shape
                    )));
                }
                _ => {}
            }
        }
        let known: std::collections::HashSet<&str> =
            expected.iter().map(|(n, _)| n.as_str()).collect();
        for name in self.names() {
            // Tied checkpoints sometimes carry lm_head anyway; rotary caches are derived.
            let harmless = name.ends_with("rotary_emb.inv_freq")
                || (config.tie_word_embeddings && name == "lm_head.weight");
            if !known.contains(name.as_str()) && !harmless {
                return Err(bad(format!(
                    "unexpected tensor `{name}` (not part of a {} with this config)",
                    config.architecture()
                )));
            }
        }
        Ok(())
    }
}

fn describe_st_error(e: safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::InvalidOffset(t) => {
            format!("tensor `{t}` has offsets that overlap another tensor or leave a gap")
        }
        E::HeaderTooLarge => "header is larger than 100 MB".into(),
        E::HeaderTooSmall => "file is too short for a header (truncated?)".into(),
        E::InvalidHeaderLength => "header length runs past the end of the file (truncated?)".into(),
        E::InvalidHeaderDeserialization(err) => {
            format!("header is not understood (unknown dtype or malformed JSON): {err}")
        }
        E::MetadataIncompleteBuffer => {
            "tensor data runs past the end of the file (truncated?)".into()
        }
        other => format!("invalid safetensors file: {other}"),
    }
}

/// Writes safetensors shards of at most `shard_bytes` each, one tensor at a time, then the index.
/// `produce(name)` returns a tensor's bytes when its turn comes, so only one is in memory.
pub fn write_shards(
    dir: &Path,
    tensors: &[(String, TensorMeta)],
    shard_bytes: u64,
    mut produce: impl FnMut(&str) -> Result<Vec<u8>, ModelError>,
) -> Result<(), ModelError> {
    // Plan the shards by size, in the order given.
    let mut shards: Vec<Vec<&(String, TensorMeta)>> = vec![Vec::new()];
    let mut size = 0u64;
    for t in tensors {
        let bytes = (t.1.numel() * t.1.dtype.size()) as u64;
        if size > 0 && size + bytes > shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().unwrap().push(t);
        size += bytes;
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for (i, shard) in shards.iter().enumerate() {
        let file_name = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut offset = 0usize;
        for (name, meta) in shard.iter().map(|t| (&t.0, &t.1)) {
            let len = meta.numel() * meta.dtype.size();
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": meta.dtype.safetensors_name(), "shape": meta.shape, "data_offsets": [offset, offset + len]}),
            );
            offset += len;
            weight_map.insert(name.clone(), file_name.clone().into());
        }
        total += offset as u64;
        let mut header = serde_json::to_vec(&header).unwrap();
        // Pad the header with spaces so tensor data starts 8-byte aligned.
        while (8 + header.len()) % 8 != 0 {
            header.push(b' ');
        }
        let path = dir.join(&file_name);
        let file = File::create(&path).map_err(|e| ModelError::io(&path, "create", e))?;
        let mut w = BufWriter::with_capacity(1 << 22, file);
        let io = |e| ModelError::io(&path, "write", e);
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&header).map_err(io)?;
        for (name, meta) in shard.iter().map(|t| (&t.0, &t.1)) {
            let bytes = produce(name)?;
            if bytes.len() != meta.numel() * meta.dtype.size() {
                return Err(ModelError::Checkpoint {
                    path: path.clone(),
                    why: format!(
                        "tensor `{name}`: produced {} bytes for shape {:?}",
                        bytes.len(),
                        meta.shape
                    ),
                });
            }
            w.write_all(&bytes).map_err(io)?;
        }
        w.flush().map_err(io)?;
    }
    if n > 1 {
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.join("model.safetensors.index.json");
        std::fs::write(&path, serde_json::to_string_pretty(&index).unwrap())
            .map_err(|e| ModelError::io(&path, "write", e))?;
    }
    Ok(())
}
