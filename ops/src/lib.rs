//! The model and every op that touches tensors: Llama/Mistral decoders on Burn, checkpoint IO,
//! tokenizers and datasets, and the pipeline's ops (calibrate, score, prune, train, distill, evaluate).

pub mod evaluate;
pub mod model;
pub mod op;

pub use op::{
    Artifact, ArtifactKind, NoProgress, Op, OpContext, OpError, OpRegistry, OpSignature,
    ParamDefault, ParamSpec, ParamType, ParamValue, Params, Port, Problem, Progress,
};

/// Every op distillery ships.
pub fn builtin() -> OpRegistry {
    OpRegistry::new()
}
