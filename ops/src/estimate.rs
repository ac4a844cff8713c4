//! Cost estimates from configs alone: parameter counts, FLOPs (2·P·T forward, 6·P·T training) and
//! resident memory, so a recipe for a 12B teacher can be planned with only config.json present.

use std::collections::BTreeMap;

use crate::model::checkpoint::load_config;
use crate::model::config::ModelConfig;
use crate::op::{Artifact, ArtifactKind, Estimate};

/// A model source: its config and parameter count.
pub fn describe_source(artifact: &Artifact) -> Option<Estimate> {
    if artifact.kind != ArtifactKind::Model {
        return None;
    }
    let config = load_config(&artifact.path).ok()?;
    Some(model_estimate(&config))
}

pub fn model_estimate(config: &ModelConfig) -> Estimate {
    Estimate {
        config: Some(config.to_json()),
        parameters: Some(config.parameter_count().0),
        ..Default::default()
    }
}

/// The config of a model input's estimate.
pub fn input_config(inputs: &BTreeMap<String, Estimate>, port: &str) -> Option<ModelConfig> {
    let cfg = inputs.get(port)?.config.as_ref()?;
    ModelConfig::from_json_str(&cfg.to_string()).ok()
}

/// Bytes per parameter to train: f32 weights (4) and gradients (4) and Adam moments (8); bf16
/// compute casts each matrix transiently. Activations come on top and depend on micro batch and
/// sequence.
pub const TRAIN_BYTES_PER_PARAM: f64 = 16.0;
/// Of those, the AdamW moments (two f32 per parameter): what data-parallel ranks shard.
pub const OPTIMIZER_BYTES_PER_PARAM: f64 = 8.0;

/// Bytes per parameter of a frozen model in the `compute` parameter's dtype (matrices stored in it).
pub fn infer_bytes_per_param(p: &crate::op::Params) -> f64 {
    match p.str("compute") {
        Ok("bfloat16") => 2.0,
        _ => 4.0,
    }
}
