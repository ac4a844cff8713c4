//! Training throughput on the CPU, side by side with PyTorch, for the two steps distillery
//! trains with: the distillation step (the teacher's forward without a graph, the student's
//! forward and backward through the forward KL) and the teacher-correction step (the model's
//! forward and backward through next-token cross-entropy), each followed by global-norm
//! clipping and AdamW. Teacher and student are both SmolLM2-135M (the GGUF's dequantized
//! weights), the same thread count, batch and sequence length on both sides.
//!
//! Rounds interleave the two sides (every shape of ours, then every shape of PyTorch's), so a
//! slow minute on this shared machine lands on both; each round's ratio is printed as min /
//! median / max, beside the best rate of each side.
//!
//! `cargo bench -p distillery-ops --bench distill` (needs the GGUF in the cache's downloads; the
//! PyTorch column needs `DISTILLERY_TORCH_PYTHON` pointing at a python with torch and
//! transformers). Knobs: `SHAPES` (`4x128,1x512`: batch × sequence), `STEPS` timed per shape
//! (3, after one untimed), `ROUNDS` (3), `KINDS` (`distill,train`), `THREADS`.

mod support;

use std::time::Instant;

use distillery_kernels::KlDirection;
use distillery_ops::distill::Kd;
use distillery_ops::model::checkpoint::load_model;
use distillery_ops::model::decoder::Decoder;
use distillery_ops::runtime::{self, Backend as B, TrainBackend as TB};
use distillery_ops::train::{
    AdamState, CrossEntropy, Objective, Recompute, Student, TrainConfig, optimizer_step,
};

fn main() {
    runtime::tune_allocator();
    let Some(gguf) = support::smollm2() else {
        return;
    };
    let threads = support::threads();
    let steps = support::env_usize("STEPS", 3);
    let rounds = support::env_usize("ROUNDS", 3);
    let shapes: Vec<(usize, usize)> = std::env::var("SHAPES")
        .unwrap_or_else(|_| "4x128,1x512".into())
        .split(',')
        .map(|s| {
            let (b, q) = s
                .trim()
                .split_once('x')
                .expect("SHAPES is a comma-separated list of BATCHxSEQ");
            (
                b.parse().expect("a batch size"),
                q.parse().expect("a sequence length"),
            )
        })
        .collect();
    let kinds: Vec<String> = std::env::var("KINDS")
        .unwrap_or_else(|_| "distill,train".into())
        .split(',')
        .map(|k| k.trim().to_string())
        .collect();
    let m = load_model(&gguf).unwrap();
    let device = runtime::device();
    // rows: (kind, shape) → best t/s of ours, of PyTorch, and each round's ratio.
    let rows: Vec<(String, (usize, usize))> = kinds
        .iter()
        .flat_map(|k| shapes.iter().map(move |&s| (k.clone(), s)))
        .collect();
    let mut best = vec![[0f64; 2]; rows.len()];
    let mut ratios = vec![Vec::new(); rows.len()];
    for _ in 0..rounds {
        let ours: Vec<f64> = runtime::with_threads(threads, || {
            rows.iter()
                .map(|(kind, (batch, seq))| {
                    let teacher = Decoder::<B>::load(&m.config, &m.weights, &device).unwrap();
                    let objective: Box<dyn Objective> = match kind.as_str() {
                        "distill" => Box::new(Kd::new(teacher, 1.0, KlDirection::Forward, 0, 0.0)),
                        "train" => Box::new(CrossEntropy { chunk: 0 }),
                        other => panic!("KINDS: unknown step kind {other:?} (distill, train)"),
                    };
                    let student = Student::plain(
                        Decoder::<TB>::load(&m.config, &m.weights, &device).unwrap(),
                    );
                    let shape = (*batch, *seq, m.config.vocab_size);
                    steps_per_second(student, objective.as_ref(), shape, steps, &device)
                        * (batch * seq) as f64
                })
                .collect()
        });
        let torch: Vec<Option<f64>> = rows
            .iter()
            .map(|(kind, (batch, seq))| {
                support::torch(
                    "torch_distill.py",
                    &[
                        gguf.to_string_lossy().into_owned(),
                        threads.to_string(),
                        batch.to_string(),
                        seq.to_string(),
                        steps.to_string(),
                        kind.clone(),
                    ],
                )
                .and_then(|v| v["tokens_per_second"].as_f64())
            })
            .collect();
        for (i, (o, t)) in ours.iter().zip(&torch).enumerate() {
            best[i][0] = best[i][0].max(*o);
            if let Some(t) = t {
                best[i][1] = best[i][1].max(*t);
                ratios[i].push(o / t);
            }
        }
    }
    println!(
        "SmolLM2-135M training steps (+ clipping and AdamW), {threads} threads, {}, {steps} steps per shape, best of {rounds} interleaved rounds",
        runtime::BACKEND_NAME
    );
    println!(
        "{:<9} {:<8} {:>15} {:>12} {:>12} {:>24}",
        "step", "shape", "distillery t/s", "pytorch t/s", "best ratio", "per round min/med/max"
    );
    for (i, (kind, (batch, seq))) in rows.iter().enumerate() {
        let [ours, torch] = best[i];
        let has_torch = torch > 0.0;
        println!(
            "{:<9} {:<8} {:>15.0} {:>12} {:>12} {:>24}",
            kind,
            format!("{batch}x{seq}"),
            ours,
            if has_torch {
                format!("{torch:.0}")
            } else {
                "-".into()
            },
            if has_torch {
                format!("{:.2}", ours / torch)
            } else {
                "-".into()
            },
            support::min_median_max(&ratios[i])
        );
    }
}

/// Optimizer steps per second of `objective` on `student` over `steps` batches of `batch`
/// sequences of `seq` tokens below `vocab`, after one untimed step (the first allocates the
/// optimizer state).
fn steps_per_second(
    mut student: Student<TB>,
    objective: &dyn Objective,
    (batch, seq, vocab): (usize, usize, usize),
    steps: usize,
    device: &runtime::Device,
) -> f64 {
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
    let mut state = AdamState::new();
    // The same token ids as the PyTorch script's.
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
    let solo = distillery_ops::parallel::Solo::new();
    let mut run = |k: usize, student: Student<TB>| match optimizer_step(
        student,
        &mut state,
        objective,
        &batches(k),
        &cfg,
        cfg.lr_at(k),
        &solo,
        device,
    ) {
        Ok(o) => o.student,
        Err(_) => panic!("the step failed at step {k}"),
    };
    student = run(0, student);
    let t = Instant::now();
    for k in 1..=steps {
        student = run(k, student);
    }
    steps as f64 / t.elapsed().as_secs_f64()
}
