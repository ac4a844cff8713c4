//! The model and every op that touches tensors: Llama/Mistral decoders on Burn, checkpoint IO,
//! tokenizers and datasets, and the pipeline's ops (calibrate, score, depth_scan, prune, search, train, distill, teacher_logits, evaluate, and init for random-weight models).

pub mod calibrate;
pub mod compare;
pub mod counter_rng;
pub mod data;
pub mod depth_scan;
pub mod distill;
pub mod estimate;
pub mod evaluate;
pub mod export_gguf;
pub mod init;
pub mod model;
pub mod op;
pub mod parallel;
pub mod prune;
pub mod runtime;
pub mod score;
pub mod search;
pub mod stats;
pub mod teacher_logits;
pub mod tokenize;
pub mod train;
pub mod validation;

pub use op::{
    Artifact, ArtifactKind, Estimate, NoProgress, Op, OpContext, OpError, OpRegistry, OpSignature,
    ParamDefault, ParamSpec, ParamType, ParamValue, Params, Port, Problem, Producer, Progress,
};

/// Every op distillery ships.
pub fn builtin() -> OpRegistry {
    let mut r = OpRegistry::new();
    r.register(tokenize::Tokenize)
        .register(evaluate::Evaluate)
        .register(calibrate::Calibrate)
        .register(score::Score)
        .register(prune::Prune)
        .register(train::Train)
        .register(distill::Distill)
        .register(teacher_logits::TeacherLogits)
        .register(compare::Compare)
        .register(export_gguf::ExportGguf)
        .register(search::Search)
        .register(depth_scan::DepthScan)
        .register(init::Init)
        .set_source_describer(estimate::describe_source);
    r
}
