//! Fused kernels for the hot loops of distillery (importance accumulation, distillation loss),
//! each beside a reference built from plain Burn tensor ops that every backend runs and tests
//! compare against. Knows nothing of recipes or models.

pub mod importance;
pub mod kl;
