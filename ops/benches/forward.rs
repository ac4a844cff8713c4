//! Forward throughput of SmolLM2-135M on the CPU, side by side with PyTorch (transformers on the
//! same dequantized GGUF weights, same thread count, sequence length and batches).
//! `cargo bench -p distillery-ops --bench forward` (needs the GGUF in the cache's downloads; the
//! PyTorch column needs `DISTILLERY_TORCH_PYTHON` pointing at a python with torch and transformers).

mod support;

use std::time::Instant;

use distillery_ops::model::checkpoint::load_model;
use distillery_ops::model::decoder::{Decoder, tokens_tensor};
use distillery_ops::runtime::{self, Backend as B};

fn main() {
    runtime::tune_allocator();
    let Some(gguf) = support::smollm2() else {
        return;
    };
    let threads = support::threads();
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
    let torch = support::torch(
        "torch_forward.py",
        &[
            gguf.to_string_lossy().into_owned(),
            threads.to_string(),
            seq.to_string(),
            "1,8".into(),
            reps.to_string(),
        ],
    );
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
