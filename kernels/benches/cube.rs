//! The CubeCL kernels against their tensor-op references on the Cube backend, side by side in one
//! run: importance accumulation, the distillation loss forward + backward, and causal attention
//! forward + backward (the kernels against the tensor-op blocks). CUDA with `--features cuda`,
//! else wgpu. `cargo bench -p distillery-kernels --features cuda --bench cube` (`TOKENS`,
//! `VOCAB`, `REPS`, `ATTN_SEQ` override the defaults; on lavapipe use small ones).

use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::{Distribution, Tensor};
use distillery_kernels::KlDirection;
use distillery_kernels::attention::{
    AttentionSpec, backward_reference, causal_attention, forward_reference,
};
use distillery_kernels::fused::AttentionShape;
use distillery_kernels::importance::{accumulate, accumulate_reference};
use distillery_kernels::kl::{kl_loss, kl_reference};

#[cfg(feature = "cuda")]
type W = burn::backend::Cuda<f32, i32>;
#[cfg(not(feature = "cuda"))]
type W = burn::backend::Wgpu<f32, i32, u32>;
type A = Autodiff<W>;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Mean seconds per call of `f` (whose result is read back, so the device has finished).
fn time(reps: usize, mut f: impl FnMut() -> f32) -> f64 {
    f(); // compile and warm up
    let t = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(f());
    }
    t.elapsed().as_secs_f64() / reps as f64
}

fn main() {
    let (tokens, vocab, reps) = (env("TOKENS", 4096), env("VOCAB", 131072), env("REPS", 10));
    let device = Default::default();
    println!(
        "{} kernels vs references, {reps} reps",
        if cfg!(feature = "cuda") {
            "cuda"
        } else {
            "wgpu"
        }
    );

    // Importance: an MLP intermediate of Mistral-NeMo's width, [batch 4, seq, 14336].
    let seq = (tokens / 4).max(1);
    let act = Tensor::<W, 3>::random([4, seq, 14336], Distribution::Normal(0.0, 1.0), &device);
    let acc = Tensor::<W, 1>::zeros([14336], &device);
    let fused = time(reps, || {
        accumulate(acc.clone(), act.clone()).sum().into_scalar()
    });
    let reference = time(reps, || {
        accumulate_reference(acc.clone(), act.clone())
            .sum()
            .into_scalar()
    });
    let gb = (4 * seq * 14336 * 4) as f64 / 1e9;
    println!(
        "importance [4, {seq}, 14336]: fused {:.3} ms ({:.1} GB/s), reference {:.3} ms: {:.2}x",
        fused * 1e3,
        gb / fused,
        reference * 1e3,
        reference / fused
    );
    drop(act);

    let t = Tensor::<W, 2>::random([tokens, vocab], Distribution::Normal(0.0, 3.0), &device);
    let s = Tensor::<W, 2>::random([tokens, vocab], Distribution::Normal(0.0, 3.0), &device);
    let run = |fused: bool| {
        let s = Tensor::<A, 2>::from_inner(s.clone()).require_grad();
        let loss = if fused {
            kl_loss(t.clone(), s.clone(), 1.0, KlDirection::Forward)
        } else {
            kl_reference(
                Tensor::from_inner(t.clone()),
                s.clone(),
                1.0,
                KlDirection::Forward,
            )
        };
        let grads = loss.backward();
        s.grad(&grads).unwrap().sum().into_scalar()
    };
    let fused = time(reps, || run(true));
    let reference = time(reps, || run(false));
    println!(
        "forward KL [{tokens}, {vocab}] forward + backward: fused {:.3} ms, reference {:.3} ms: {:.2}x",
        fused * 1e3,
        reference * 1e3,
        reference / fused
    );
    drop((t, s));

    // Attention at Llama-3.1-8B's heads: 32 query heads, 8 KV heads of 128, one sequence.
    let seq = env("ATTN_SEQ", 2048);
    let spec = AttentionSpec {
        shape: AttentionShape {
            batch: 1,
            seq,
            heads: 32,
            kv_heads: 8,
            head_dim: 128,
            window: None,
        },
        scale: 128f32.powf(-0.5),
        softcap: None,
    };
    let q = Tensor::<W, 4>::random([1, seq, 32, 128], Distribution::Normal(0.0, 1.0), &device);
    let k = Tensor::<W, 4>::random([1, seq, 8, 128], Distribution::Normal(0.0, 1.0), &device);
    let v = Tensor::<W, 4>::random([1, seq, 8, 128], Distribution::Normal(0.0, 1.0), &device);
    let dout = Tensor::<W, 4>::random([1, seq, 32, 128], Distribution::Normal(0.0, 1.0), &device);
    let kernels = time(reps, || {
        let (q, k, v) = (
            Tensor::<A, 4>::from_inner(q.clone()).require_grad(),
            Tensor::<A, 4>::from_inner(k.clone()).require_grad(),
            Tensor::<A, 4>::from_inner(v.clone()).require_grad(),
        );
        let out = causal_attention(q.clone(), k, v, spec);
        let grads = (out * Tensor::from_inner(dout.clone())).sum().backward();
        q.grad(&grads).unwrap().sum().into_scalar()
    });
    let reference = time(reps, || {
        let (out, lse) = forward_reference(q.clone(), k.clone(), v.clone(), spec);
        let (dq, _, _) = backward_reference(
            q.clone(),
            k.clone(),
            v.clone(),
            out,
            lse,
            dout.clone(),
            spec,
        );
        dq.sum().into_scalar()
    });
    // The forward multiplies 2·seq²·heads·head_dim (two products over the visible half), the
    // backward 2.5 times that.
    let flops = 3.5 * 2.0 * (seq * seq) as f64 * 32.0 * 128.0;
    println!(
        "causal attention [1, {seq}, 32/8 heads, 128] forward + backward: kernels {:.3} ms ({:.1} TFLOP/s), tensor-op blocks {:.3} ms: {:.2}x",
        kernels * 1e3,
        flops / kernels / 1e12,
        reference * 1e3,
        reference / kernels
    );
}
