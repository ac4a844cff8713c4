//! The model: config.json, the Burn decoder (greedy decoding with a KV cache too), checkpoint IO (Hugging Face safetensors, GGUF) and
//! tokenizers.

pub mod arch;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod decoder;
pub mod fast;
pub mod generate;
pub mod gguf;
pub mod recompute;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

pub use checkpoint::{LoadedModel, load_model, save_checkpoint};
pub use config::ModelConfig;
pub use decoder::{Decoder, HookPoint, HookSet, Hooks, NoHooks};
pub use weights::{DType, Weights};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot {what} `{}`: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("`{}`: {why}", path.display())]
    Config { path: PathBuf, why: String },
    #[error("checkpoint `{}`: {why}", path.display())]
    Checkpoint { path: PathBuf, why: String },
    #[error("GGUF file `{}`: {why}", path.display())]
    Gguf { path: PathBuf, why: String },
    #[error("tokenizer `{}`: {why}", path.display())]
    Tokenizer { path: PathBuf, why: String },
}

impl ModelError {
    pub fn io(path: &Path, what: &'static str, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    }
}

impl From<ModelError> for crate::OpError {
    fn from(e: ModelError) -> Self {
        crate::OpError::Failed(e.to_string())
    }
}
