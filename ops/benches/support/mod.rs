//! What the SmolLM2 benchmarks share: the model (or a skip), knobs from the environment, and the
//! PyTorch side run through `DISTILLERY_TORCH_PYTHON`.
// Each bench uses part of it.
#![allow(dead_code)]

#[path = "../../../tests/support/demo_files.rs"]
mod demo_files;

use std::path::PathBuf;

// As the `distillery` binary allocates.
#[global_allocator]
static ALLOCATOR: distillery_ops::runtime::HugePageAlloc = distillery_ops::runtime::HugePageAlloc;

/// The SmolLM2 GGUF from the cache's downloads, or None after saying why the bench is skipped.
pub fn smollm2() -> Option<PathBuf> {
    demo_files::smollm2_gguf()
        .map_err(|e| eprintln!("skipped: {e}"))
        .ok()
}

/// A count from the environment, else `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `THREADS`, else every core.
pub fn threads() -> usize {
    env_usize(
        "THREADS",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    )
}

/// The last line of `benches/SCRIPT ARGS...` run by `DISTILLERY_TORCH_PYTHON`, as JSON; None
/// when that variable is unset or the script fails.
pub fn torch(script: &str, args: &[String]) -> Option<serde_json::Value> {
    let py = std::env::var("DISTILLERY_TORCH_PYTHON").ok()?;
    let script = format!("{}/../benches/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(py)
        .arg(script)
        .args(args)
        .output()
        .ok()?;
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()?
        .to_string();
    serde_json::from_str(&line).ok()
}

/// Per-round ratios as `min/median/max`, `-` when there are none.
pub fn min_median_max(ratios: &[f64]) -> String {
    let mut sorted = ratios.to_vec();
    sorted.sort_by(f64::total_cmp);
    match (sorted.first(), sorted.last()) {
        (Some(lo), Some(hi)) => format!("{lo:.2}/{:.2}/{hi:.2}", sorted[sorted.len() / 2]),
        _ => "-".into(),
    }
}
