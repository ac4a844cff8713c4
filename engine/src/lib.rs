//! The orchestration half of distillery: recipes (TOML) become a validated step graph, a plan
//! that says what is cached and why the rest runs, and an execution into the content-addressed cache.
//! Knows nothing of tensors: ops come in through [`distillery_ops::OpRegistry`].

pub mod cli;
pub mod diag;
pub mod estimate;
pub mod exec;
pub mod graph;
pub mod launch;
pub mod lockfile;
pub mod plan;
pub mod recipe;
pub mod report;
pub mod slurm;
pub mod tree;

pub use cli::main_with;
