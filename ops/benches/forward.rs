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
    let reps = support::env_usize("REPS", 3);
    let batches: Vec<usize> = std::env::var("BATCHES")
        .unwrap_or_else(|_| "1,8".into())
        .split(',')
        .map(|b| {
            b.trim()
                .parse()
                .expect("BATCHES is a comma-separated list of batch sizes")
        })
        .collect();
    // UNFUSED=0 skips Flex's own path (the middle column), e.g. under a profiler.
    let with_unfused = support::env_usize("UNFUSED", 1) != 0;
    let m = load_model(&gguf).unwrap();
    let device = runtime::device();
    let decoder = Decoder::<B>::load(&m.config, &m.weights, &device).unwrap();
    // Rounds of ours (both CPU paths) then PyTorch, the best of each kept: this machine is shared,
    // and one run of either side can land in a slow minute.
    let rounds = support::env_usize("ROUNDS", 3);
    let mut best = vec![[0f64; 3]; batches.len()]; // fused, unfused, pytorch
    let mut round_ratios = vec![Vec::new(); batches.len()];
    for _ in 0..rounds {
        runtime::with_threads(threads, || {
            for (bi, &b) in batches.iter().enumerate() {
                let ids: Vec<u32> = (0..b * seq).map(|i| (i * 7919 % 49152) as u32).collect();
                for (i, fused) in [true, false].into_iter().enumerate() {
                    if !fused && !with_unfused {
                        continue;
                    }
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
                    let rate = (b * seq * reps) as f64 / t.elapsed().as_secs_f64();
                    best[bi][i] = best[bi][i].max(rate);
                    if fused {
                        round_ratios[bi].push(rate);
                    }
                }
                fast::set_enabled(true);
            }
        });
        let torch = support::torch(
            "torch_forward.py",
            &[
                gguf.to_string_lossy().into_owned(),
                threads.to_string(),
                seq.to_string(),
                batches
                    .iter()
                    .map(|b| b.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                reps.to_string(),
            ],
        );
        for (bi, &b) in batches.iter().enumerate() {
            match torch.as_ref().and_then(|v| v[b.to_string()].as_f64()) {
                Some(t) => {
                    best[bi][2] = best[bi][2].max(t);
                    let fused = round_ratios[bi].pop().unwrap_or(0.0);
                    round_ratios[bi].push(fused / t);
                }
                None => round_ratios[bi].clear(),
            }
        }
    }
    println!(
        "SmolLM2-135M forward, seq {seq}, {threads} threads, {}, best of {rounds} rounds",
        runtime::BACKEND_NAME
    );
    println!(
        "{:<8} {:>12} {:>12} {:>12} {:>14} {:>14} {:>22}",
        "batch",
        "fused t/s",
        "unfused t/s",
        "pytorch t/s",
        "fused/unfused",
        "fused/pytorch",
        "per round min/med/max"
    );
    for (bi, &b) in batches.iter().enumerate() {
        let [fused, unfused, torch] = best[bi];
        let has_torch = torch > 0.0;
        println!(
            "{:<8} {:>12.0} {:>12} {:>12} {:>14} {:>14} {:>22}",
            b,
            fused,
            if with_unfused {
                format!("{unfused:.0}")
            } else {
                "-".into()
            },
            if has_torch {
                format!("{torch:.0}")
            } else {
                "-".into()
            },
            if with_unfused {
                format!("{:.2}", fused / unfused)
            } else {
                "-".into()
            },
            if has_torch {
                format!("{:.2}", fused / torch)
            } else {
                "-".into()
            },
            support::min_median_max(&round_ratios[bi])
        );
    }
}
