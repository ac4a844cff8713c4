//! The `stats` artifact (accumulated activation statistics) and the `scores` artifact (importance
//! per axis): f32 vectors in safetensors, with a JSON sidecar for what is not a tensor.

use std::collections::BTreeMap;
use std::path::Path;

use crate::model::config::ModelConfig;
use crate::model::weights::{DType, TensorMeta, bytes_to_f32, write_shards};
use crate::op::OpError;

pub const STATS_FILE: &str = "stats.safetensors";
pub const STATS_META: &str = "stats.json";
pub const SCORES_FILE: &str = "scores.safetensors";
pub const SCORES_META: &str = "scores.json";

/// Which activation a statistic accumulates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StatKind {
    /// Input of down_proj `[ffn]`.
    MlpIntermediate,
    /// Input of o_proj `[heads * head_dim]`.
    AttnContext,
    /// Output of input_layernorm `[hidden]`.
    AttnNorm,
    /// Output of post_attention_layernorm `[hidden]`.
    MlpNorm,
}

impl StatKind {
    pub const ALL: [StatKind; 4] = [
        StatKind::MlpIntermediate,
        StatKind::AttnContext,
        StatKind::AttnNorm,
        StatKind::MlpNorm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StatKind::MlpIntermediate => "mlp_intermediate",
            StatKind::AttnContext => "attn_context",
            StatKind::AttnNorm => "attn_norm",
            StatKind::MlpNorm => "mlp_norm",
        }
    }
}

/// Calibration statistics of a model.
pub struct Stats {
    pub config: ModelConfig,
    pub samples: usize,
    pub seq_len: usize,
    pub acc: BTreeMap<(usize, StatKind), Vec<f32>>,
    /// Per layer: sum over batches of (1 - mean cos(block input, output)).
    pub block_distance: Vec<f64>,
}

/// Writes named f32 vectors as one safetensors file.
pub fn write_vectors(path: &Path, vectors: &BTreeMap<String, Vec<f32>>) -> Result<(), OpError> {
    let dir = path.parent().unwrap();
    let tmp = tempdir_in(dir)?;
    let metas: Vec<(String, TensorMeta)> = vectors
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                TensorMeta {
                    dtype: DType::F32,
                    shape: vec![v.len()],
                },
            )
        })
        .collect();
    write_shards(&tmp, &metas, u64::MAX, |n| {
        Ok(vectors[n].iter().flat_map(|x| x.to_le_bytes()).collect())
    })?;
    std::fs::rename(tmp.join("model.safetensors"), path)
        .map_err(|e| OpError::io(path, "write", e))?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

fn tempdir_in(dir: &Path) -> Result<std::path::PathBuf, OpError> {
    let p = dir.join(format!(".tmp-{}", std::process::id()));
    std::fs::create_dir_all(&p).map_err(|e| OpError::io(&p, "create", e))?;
    Ok(p)
}

/// Reads every f32 vector of a safetensors file.
pub fn read_vectors(path: &Path) -> Result<BTreeMap<String, Vec<f32>>, OpError> {
    let bytes = std::fs::read(path).map_err(|e| OpError::io(path, "read", e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        OpError::Invalid(format!(
            "{}: not a valid safetensors file: {e}",
            path.display()
        ))
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(OpError::Invalid(format!(
                "{}: `{name}` is not f32",
                path.display()
            )));
        }
        out.insert(name, bytes_to_f32(DType::F32, view.data()));
    }
    Ok(out)
}

impl Stats {
    pub fn new(config: ModelConfig, samples: usize, seq_len: usize) -> Stats {
        let n = config.num_hidden_layers;
        Stats {
            config,
            samples,
            seq_len,
            acc: BTreeMap::new(),
            block_distance: vec![0.0; n],
        }
    }

    pub fn insert(&mut self, layer: usize, kind: StatKind, values: Vec<f32>) {
        self.acc.insert((layer, kind), values);
    }

    pub fn get(&self, layer: usize, kind: StatKind) -> Result<&[f32], OpError> {
        self.acc
            .get(&(layer, kind))
            .map(Vec::as_slice)
            .ok_or_else(|| OpError::Invalid(format!("stats lack `layers.{layer}.{}`", kind.name())))
    }

    pub fn write(&self, dir: &Path) -> Result<(), OpError> {
        let mut v: BTreeMap<String, Vec<f32>> = self
            .acc
            .iter()
            .map(|((l, k), x)| (format!("layers.{l}.{}", k.name()), x.clone()))
            .collect();
        v.insert(
            "block_distance".into(),
            self.block_distance.iter().map(|&x| x as f32).collect(),
        );
        write_vectors(&dir.join(STATS_FILE), &v)?;
        let meta = serde_json::json!({
            "samples": self.samples,
            "seq_len": self.seq_len,
            "tokens": self.samples * self.seq_len,
            "config": self.config.to_json(),
        });
        let p = dir.join(STATS_META);
        std::fs::write(&p, serde_json::to_string_pretty(&meta).unwrap())
            .map_err(|e| OpError::io(&p, "write", e))
    }

    pub fn read(dir: &Path) -> Result<Stats, OpError> {
        let p = dir.join(STATS_META);
        let text = std::fs::read_to_string(&p).map_err(|e| OpError::io(&p, "read", e))?;
        let meta: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| OpError::Invalid(format!("{}: {e}", p.display())))?;
        let config =
            ModelConfig::from_json_str(&meta["config"].to_string()).map_err(OpError::Invalid)?;
        let mut stats = Stats::new(
            config,
            meta["samples"].as_u64().unwrap_or(0) as usize,
            meta["seq_len"].as_u64().unwrap_or(0) as usize,
        );
        let vectors = read_vectors(&dir.join(STATS_FILE))?;
        for (name, v) in vectors {
            if name == "block_distance" {
                stats.block_distance = v.iter().map(|&x| x as f64).collect();
                continue;
            }
            let parts: Vec<&str> = name.splitn(3, '.').collect();
            if let [_, l, k] = parts.as_slice()
                && let (Ok(l), Some(kind)) = (
                    l.parse::<usize>(),
                    StatKind::ALL.into_iter().find(|x| x.name() == *k),
                )
            {
                stats.insert(l, kind, v);
            }
        }
        Ok(stats)
    }
}
