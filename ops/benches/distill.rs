//! Distillation throughput on the CPU, side by side with PyTorch: one optimizer step is the
//! teacher's forward (no graph), the student's forward and backward through the forward KL, global
//! norm clipping and AdamW. Teacher and student are both SmolLM2-135M (the GGUF's dequantized
//! weights), same thread count, batch and sequence length on both sides.
//! `cargo bench -p distillery-ops --bench distill` (needs the GGUF in the cache's downloads; the
//! PyTorch column needs `DISTILLERY_TORCH_PYTHON` pointing at a python with torch and transformers).

mod support;

use std::time::Instant;

use distillery_kernels::KlDirection;
use distillery_ops::distill::Kd;
use distillery_ops::model::checkpoint::load_model;
use distillery_ops::model::decoder::Decoder;
use distillery_ops::runtime::{self, Backend as B, TrainBackend as TB};
use distillery_ops::train::{AdamState, Recompute, Student, TrainConfig, optimizer_step};

fn main() {
    runtime::tune_allocator();
    let Some(gguf) = support::smollm2() else {
        return;
    };
    let threads = support::threads();
    let (batch, seq, steps) = (
        support::env_usize("BATCH", 4),
        support::env_usize("SEQ", 128),
        support::env_usize("STEPS", 3),
    );
    let cfg = TrainConfig {
        tokens: (batch * seq * (steps + 1)) as u64,
        seq_len: seq,
        micro_batch: batch,
        global_batch: batch,
        lr: 1e-4,
        min_lr: 1e-5,
        warmup_steps: 0,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        clip: 1.0,
        checkpoint_every: 0,
        val_every: 0,
        val_sequences: 0,
        compute: Default::default(),
        precision: Default::default(),
        recompute: Recompute::Off,
    };
    let m = load_model(&gguf).unwrap();
    let device = runtime::device();
    let ours = runtime::with_threads(threads, || {
        let teacher = Decoder::<B>::load(&m.config, &m.weights, &device).unwrap();
        let mut student =
            Student::plain(Decoder::<TB>::load(&m.config, &m.weights, &device).unwrap());
        let kd = Kd::new(teacher, 1.0, KlDirection::Forward, 0, 0.0);
        let mut state = AdamState {
            step: 0,
            m: Vec::new(),
            v: Vec::new(),
        };
        let vocab = m.config.vocab_size;
        let batches = |k: usize| {
            vec![
                (0..batch)
                    .map(|b| {
                        (0..seq + 1)
                            .map(|i| ((k * 131 + b * 7 + i) * 7919 % vocab) as u32)
                            .collect()
                    })
                    .collect::<Vec<Vec<u32>>>()
                    .into(),
            ]
        };
        let mut run = |k: usize, student: Student<TB>| {
            let lr = cfg.lr_at(k);
            let solo = distillery_ops::parallel::Solo::new();
            match optimizer_step(
                student,
                &mut state,
                &kd,
                &batches(k),
                &cfg,
                lr,
                &solo,
                &device,
            ) {
                Ok(o) => o,
                Err(_) => panic!("the step failed at step {k}"),
            }
        };
        // One step outside the clock: the first allocates the optimizer state.
        student = run(0, student).student;
        let t = Instant::now();
        for k in 1..=steps {
            student = run(k, student).student;
        }
        (batch * seq * steps) as f64 / t.elapsed().as_secs_f64()
    });
    let torch = support::torch(
        "torch_distill.py",
        &[
            gguf.to_string_lossy().into_owned(),
            threads.to_string(),
            batch.to_string(),
            seq.to_string(),
            steps.to_string(),
        ],
    )
    .and_then(|v| v["tokens_per_second"].as_f64());
    println!(
        "SmolLM2-135M -> SmolLM2-135M distillation step (teacher fwd + student fwd/bwd + AdamW), batch {batch} x seq {seq}, {threads} threads, {}",
        runtime::BACKEND_NAME
    );
    println!(
        "{:<16} {:>16} {:>8}",
        "distillery t/s", "pytorch t/s", "ratio"
    );
    println!(
        "{:<16.0} {:>16} {:>8}",
        ours,
        torch.map_or("-".into(), |x| format!("{x:.0}")),
        torch.map_or("-".into(), |x| format!("{:.2}", ours / x))
    );
}
