//! The distillation loss at a large vocabulary: the fused KL (`kl_loss`, the host loop on the
//! CPU) against the autodiff reference, forward and backward, side by side in one run. Prints
//! wall time and peak heap above the two logit tensors, measured by a counting allocator.
//! `cargo bench -p distillery-kernels --bench kl` (`TOKENS`, `VOCAB` override the shape).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use burn::backend::{Autodiff, Flex};
use burn::tensor::{Distribution, Tensor};
use distillery_kernels::KlDirection;
use distillery_kernels::kl::{kl_loss, kl_reference};

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

type A = Autodiff<Flex>;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (seconds, peak heap bytes above the start, sum of |gradient|) of one forward and backward.
fn measure(run: impl FnOnce() -> Tensor<Flex, 2>) -> (f64, usize, f32) {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let t = Instant::now();
    let grad = run();
    let (secs, peak) = (
        t.elapsed().as_secs_f64(),
        PEAK.load(Ordering::Relaxed) - base,
    );
    (secs, peak, grad.abs().sum().into_scalar())
}

fn main() {
    let (tokens, vocab) = (env("TOKENS", 256), env("VOCAB", 131072));
    let device = Default::default();
    let t = Tensor::<Flex, 2>::random([tokens, vocab], Distribution::Normal(0.0, 3.0), &device);
    let s = Tensor::<Flex, 2>::random([tokens, vocab], Distribution::Normal(0.0, 3.0), &device);
    let logits_mib = (tokens * vocab * 4) as f64 / (1 << 20) as f64;
    println!(
        "forward KL, {tokens} tokens x vocab {vocab} (one logit tensor: {logits_mib:.0} MiB), forward + backward"
    );

    let rows = [
        (
            "reference (autodiff)",
            measure(|| {
                let s = Tensor::<A, 2>::from_inner(s.clone()).require_grad();
                let loss = kl_reference(
                    Tensor::from_inner(t.clone()),
                    s.clone(),
                    1.0,
                    KlDirection::Forward,
                );
                let grads = loss.backward();
                s.grad(&grads).unwrap()
            }),
        ),
        (
            "fused (kl_loss)",
            measure(|| {
                let s = Tensor::<A, 2>::from_inner(s.clone()).require_grad();
                let loss = kl_loss(t.clone(), s.clone(), 1.0, KlDirection::Forward);
                let grads = loss.backward();
                s.grad(&grads).unwrap()
            }),
        ),
    ];
    println!(
        "{:<22} {:>9} {:>14} {:>14}",
        "", "seconds", "peak MiB", "peak/logits"
    );
    for (name, (secs, peak, _)) in &rows {
        let mib = *peak as f64 / (1 << 20) as f64;
        println!(
            "{name:<22} {secs:>9.3} {mib:>14.0} {:>14.1}",
            mib / logits_mib
        );
    }
    let (r, f) = (&rows[0].1, &rows[1].1);
    println!(
        "fused / reference: time {:.2}x, peak memory {:.2}x (|grad| sums {:.6} vs {:.6})",
        f.0 / r.0,
        f.1 as f64 / r.1 as f64,
        f.2,
        r.2
    );
}
