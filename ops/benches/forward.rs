//! Forward throughput of SmolLM2-135M on the CPU, side by side with PyTorch (transformers on the
//! same dequantized GGUF weights, same thread count, sequence length and batches).
//! `cargo bench -p distillery-ops --bench forward` (needs the GGUF in the cache's downloads; the
//! PyTorch column needs `DISTILLERY_TORCH_PYTHON` pointing at a python with torch and transformers).

mod support;

use std::time::Instant;

use distillery_ops::model::checkpoint::load_model;
use distillery_ops::model::decoder::{Decoder, tokens_tensor};
use distillery_ops::model::fast;
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
    // Both CPU paths side by side: the fused host loops and the plain tensor ops.
    let mut ours = Vec::new();
    runtime::with_threads(threads, || {
        for &b in &batches {
            let ids: Vec<u32> = (0..b * seq).map(|i| (i * 7919 % 49152) as u32).collect();
            let mut rate = [0f64; 2];
            for (i, fused) in [true, false].into_iter().enumerate() {
                fast::set_enabled(fused);
                let _ = decoder
                    .forward(tokens_tensor::<B>(&ids, b, &device))
                    .into_data();
                let t = Instant::now();
                for _ in 0..reps {
                    let _ = decoder
                        .forward(tokens_tensor::<B>(&ids, b, &device))
                        .into_data();
                }
                rate[i] = (b * seq * reps) as f64 / t.elapsed().as_secs_f64();
            }
            fast::set_enabled(true);
            ours.push(rate);
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
        "{:<8} {:>12} {:>12} {:>12} {:>14} {:>14}",
        "batch", "fused t/s", "unfused t/s", "pytorch t/s", "fused/unfused", "fused/pytorch"
    );
    for (i, &b) in batches.iter().enumerate() {
        let t = torch.as_ref().and_then(|v| v[b.to_string()].as_f64());
        let [fused, unfused] = ours[i];
        println!(
            "{:<8} {:>12.0} {:>12.0} {:>12} {:>14.2} {:>14}",
            b,
            fused,
            unfused,
            t.map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into()),
            fused / unfused,
            t.map(|x| format!("{:.2}", fused / x))
                .unwrap_or_else(|| "-".into())
        );
    }
}
