//! Where ops compute: the backend (Flex on the CPU by default), its device, the thread budget,
//! and opening model inputs with their tokenizer.

use crate::model::ModelError;
use crate::model::checkpoint::{LoadedModel, load_model};
use crate::model::tokenizer::Tokenizer;
use crate::op::{Artifact, OpError};

/// The backend ops compute on. Flex measured 1.1–2x NdArray on this model's matmuls
/// (`cargo bench -p distillery-ops --bench cpu_backends`).
pub type Backend = burn::backend::Flex;
/// The same with autodiff, for training.
pub type TrainBackend = burn::backend::Autodiff<Backend>;
pub const BACKEND_NAME: &str = "flex (CPU)";

pub fn device() -> burn::backend::flex::FlexDevice {
    Default::default()
}

/// Runs `f` on a pool of `threads` threads (Flex parallelizes through rayon).
pub fn with_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    match rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
    {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}

/// Opens a model input (a checkpoint directory or a GGUF file).
pub fn open_model(artifact: &Artifact) -> Result<LoadedModel, OpError> {
    Ok(load_model(&artifact.path)?)
}

/// The model's tokenizer.
pub fn tokenizer(model: &LoadedModel) -> Result<Tokenizer, OpError> {
    let json = model.tokenizer_json.as_deref().ok_or_else(|| {
        OpError::from(ModelError::Tokenizer {
            path: model.path.clone(),
            why: "the model has no tokenizer.json (and is not a GGUF file with tokenizer metadata)"
                .into(),
        })
    })?;
    Ok(Tokenizer::from_json(json, &model.path)?)
}
