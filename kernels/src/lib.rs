//! Fused kernels for the hot loops of distillery (importance accumulation, the distillation and
//! cross-entropy losses, the attention, the training step's products, norms, activations, RoPE
//! and AdamW), each beside a reference built from plain Burn tensor ops that every backend runs
//! and tests compare against. Knows nothing of recipes or models.
//!
//! [`KernelBackend`] is the seam: Flex (CPU) runs host loops, the Cube backends (CUDA, wgpu) run
//! the CubeCL kernels of [`cube`] (feature `cube`, on with `cuda` or `wgpu`) where there are
//! some, and the tensor-op references elsewhere.

pub mod adamw;
pub mod attention;
mod backend;
pub mod cross_entropy;
#[cfg(feature = "cube")]
pub mod cube;
pub mod fused;
pub mod importance;
pub mod kl;
pub mod training;

pub use backend::{KernelBackend, flex_matmul};
pub use kl::KlDirection;
