//! Forward throughput of SmolLM2-135M on the CPU, side by side with PyTorch (transformers on the
//! same dequantized GGUF weights, same thread count, sequence length and batches).
//! `cargo bench -p distillery-ops --bench forward` (needs the GGUF in the cache's downloads; the
//! PyTorch column needs `DISTILLERY_TORCH_PYTHON` pointing at a python with torch and transformers).

#[path = "../../tests/support/demo_files.rs"]
mod demo_files;

use std::time::Instant;

use distillery_ops::model::checkpoint::load_model;
use distillery_ops::model::decoder::{Decoder, tokens_tensor};
use distillery_ops::runtime::{self, Backend as B};

fn main() {
    runtime::tune_allocator();
    let gguf = match demo_files::smollm2_gguf() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("skipped: {e}");
            return;
        }
    };
    let threads: usize = std::env::var("THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
    let seq = 256;
    let reps = 3;
    let batches = [1usize, 8];
    let m = load_model(&gguf).unwrap();
    let device = runtime::device();
    let decoder = Decoder::<B>::load(&m.config, &m.weights, &device).unwrap();
    let mut ours = Vec::new();
    runtime::with_threads(threads, || {
        for &b in &batches {
            let ids: Vec<u32> = (0..b * seq).map(|i| (i * 7919 % 49152) as u32).collect();
            let _ = decoder
                .forward(tokens_tensor::<B>(&ids, b, &device))
                .into_data();
            let t = Instant::now();
            for _ in 0..reps {
                let _ = decoder
                    .forward(tokens_tensor::<B>(&ids, b, &device))
                    .into_data();
            }
            ours.push((b * seq * reps) as f64 / t.elapsed().as_secs_f64());
        }
    });
    let torch: Option<serde_json::Value> =
        std::env::var("DISTILLERY_TORCH_PYTHON")
            .ok()
            .and_then(|py| {
                let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../benches/torch_forward.py");
                let out = std::process::Command::new(py)
                    .args([
                        script,
                        gguf.to_str().unwrap(),
                        &threads.to_string(),
                        &seq.to_string(),
                        "1,8",
                        &reps.to_string(),
                    ])
                    .output()
                    .ok()?;
                let line = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .last()?
                    .to_string();
                serde_json::from_str(&line).ok()
            });
    println!(
        "SmolLM2-135M forward, seq {seq}, {threads} threads, {}",
        runtime::BACKEND_NAME
    );
    println!(
        "{:<8} {:>14} {:>14} {:>8}",
        "batch", "distillery t/s", "pytorch t/s", "ratio"
    );
    for (i, &b) in batches.iter().enumerate() {
        let t = torch.as_ref().and_then(|v| v[b.to_string()].as_f64());
        println!(
            "{:<8} {:>14.0} {:>14} {:>8}",
            b,
            ours[i],
            t.map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into()),
            t.map(|x| format!("{:.2}", ours[i] / x))
                .unwrap_or_else(|| "-".into())
        );
    }
}
