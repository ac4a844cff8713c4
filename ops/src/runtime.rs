//! Where ops compute: the backend (Flex on the CPU by default), its device, the thread budget,
//! and opening model inputs with their tokenizer.

use crate::model::ModelError;
use crate::model::checkpoint::{LoadedModel, load_model};
use crate::model::tokenizer::Tokenizer;
use crate::op::{Artifact, OpError};

/// The backend ops compute on, chosen at build time. The CPU default is Flex: it measured
/// 1.1–2x NdArray on this model's matmuls (`cargo bench -p distillery-ops --bench cpu_backends`).
/// `--features cuda` computes on the first CUDA device, `--features wgpu` on the first wgpu
/// adapter; both run the CubeCL kernels of `distillery-kernels`. (Burn's `fusion` feature stays
/// off: these aliases are then plain `CubeBackend`s, which the kernels extend.)
#[cfg(feature = "cuda")]
pub type Backend = burn::backend::Cuda<f32, i32>;
#[cfg(feature = "cuda")]
pub const BACKEND_NAME: &str = "cuda";

#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
pub type Backend = burn::backend::Wgpu<f32, i32, u32>;
#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
pub const BACKEND_NAME: &str = "wgpu";

#[cfg(not(any(feature = "cuda", feature = "wgpu")))]
pub type Backend = burn::backend::Flex;
#[cfg(not(any(feature = "cuda", feature = "wgpu")))]
pub const BACKEND_NAME: &str = "flex (CPU)";

/// The same with autodiff, for training.
pub type TrainBackend = burn::backend::Autodiff<Backend>;

pub fn device() -> burn::tensor::Device<Backend> {
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
