//! Calibration overhead: tokens/s of the hidden-state forward with all statistics accumulated
//! against the same forward without hooks, side by side (SmolLM2-135M, 8 x 256 tokens).
//! `cargo bench -p distillery-ops --bench calibrate`

mod support;

use std::time::Instant;

use distillery_ops::calibrate::calibrate_sequences;
use distillery_ops::model::checkpoint::load_model;
use distillery_ops::model::decoder::{Decoder, NoHooks, tokens_tensor};
use distillery_ops::runtime::{self, Backend as B};

fn main() {
    runtime::tune_allocator();
    let Some(gguf) = support::smollm2() else {
        return;
    };
    let m = load_model(&gguf).unwrap();
    let device = runtime::device();
    let decoder = Decoder::<B>::load(&m.config, &m.weights, &device).unwrap();
    let (n, seq, batch) = (8usize, 256usize, 4usize);
    let seqs: Vec<Vec<u32>> = (0..n)
        .map(|s| {
            (0..seq)
                .map(|i| ((s * 131 + i * 7919) % 49152) as u32)
                .collect()
        })
        .collect();
    let plain = || {
        for chunk in seqs.chunks(batch) {
            let ids: Vec<u32> = chunk.concat();
            let _ = decoder
                .hidden(tokens_tensor::<B>(&ids, chunk.len(), &device), &mut NoHooks)
                .into_data();
        }
    };
    plain();
    let mut t_plain = f64::MAX;
    let mut t_stats = f64::MAX;
    // Interleaved, best of REPS (7) each: the machine is shared and noisy.
    let reps = support::env_usize("REPS", 7);
    for _ in 0..reps {
        let t = Instant::now();
        plain();
        t_plain = t_plain.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let _ = calibrate_sequences(&decoder, &m.config, &seqs, batch, &mut |_| {});
        t_stats = t_stats.min(t.elapsed().as_secs_f64());
    }
    let tokens = (n * seq) as f64;
    println!(
        "calibration on SmolLM2-135M, {n} x {seq} tokens, batch {batch}, {}",
        runtime::BACKEND_NAME
    );
    println!("plain forward      {:>8.0} tokens/s", tokens / t_plain);
    println!("with statistics    {:>8.0} tokens/s", tokens / t_stats);
    println!(
        "overhead           {:>8.1} %",
        (t_stats / t_plain - 1.0) * 100.0
    );
}
