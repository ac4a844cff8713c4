//! The `evaluate` op: perplexity, multiple-choice accuracy, parameter counts and throughput.

pub mod loglik;
