//! The training step's products on the CPU, [`gemm_f32`] (split by the larger output dimension,
//! a vocabulary-sized column-major `a` through transposed chunks) against the `gemm` crate's own
//! threading on the same operands, side by side: SmolLM2-135M's shapes at `TOKENS` tokens (512),
//! each in the layout the step multiplies it in. Rounds interleave the two; each row prints the
//! best GFLOP/s of each and the per-round ratio as min / median / max.
//! `cargo bench -p distillery-kernels --bench gemm` (`TOKENS`, `ROUNDS` (5), `THREADS` (2)).

use std::time::Instant;

use distillery_kernels::fused::gemm_f32;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One product's operands: `a [m, k]` (stored `[k, m]` when `a_t`), `b [k, n]` (stored `[n, k]`
/// when `b_t`).
struct Case {
    name: &'static str,
    m: usize,
    n: usize,
    k: usize,
    a_t: bool,
    b_t: bool,
}

impl Case {
    /// Best seconds of three runs of `product(dst, a, b)` after one untimed.
    fn time(&self, a: &[f32], b: &[f32], dst: &mut [f32], ours: bool) -> f64 {
        let (m, n, k) = (self.m, self.n, self.k);
        let (a_rs, a_cs) = if self.a_t {
            (1, m as isize)
        } else {
            (k as isize, 1)
        };
        let (b_rs, b_cs) = if self.b_t {
            (1, k as isize)
        } else {
            (n as isize, 1)
        };
        let mut run = || unsafe {
            // SAFETY: a holds m × k and b k × n through these strides, dst is m × n.
            if ours {
                gemm_f32(
                    [m, n, k],
                    (dst.as_mut_ptr(), n as isize),
                    (a.as_ptr(), a_rs, a_cs),
                    (b.as_ptr(), b_rs, b_cs),
                    true,
                )
            } else {
                gemm::gemm(
                    m,
                    n,
                    k,
                    dst.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    a_cs,
                    a_rs,
                    b.as_ptr(),
                    b_cs,
                    b_rs,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                )
            }
        };
        run();
        (0..3)
            .map(|_| {
                let t = Instant::now();
                run();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    }
}

fn main() {
    let t = env("TOKENS", 512);
    let rounds = env("ROUNDS", 5);
    let threads = env("THREADS", 2);
    let (h, i, kv, v) = (576, 1536, 192, 49152);
    #[rustfmt::skip]
    let cases = [
        Case { name: "q_proj", m: t, n: h, k: h, a_t: false, b_t: false },
        Case { name: "k_proj", m: t, n: kv, k: h, a_t: false, b_t: false },
        Case { name: "up_proj", m: t, n: i, k: h, a_t: false, b_t: false },
        Case { name: "down_proj", m: t, n: h, k: i, a_t: false, b_t: false },
        Case { name: "lm_head", m: t, n: v, k: h, a_t: false, b_t: true },
        Case { name: "d input up_proj", m: t, n: h, k: i, a_t: false, b_t: true },
        Case { name: "d input down_proj", m: t, n: i, k: h, a_t: false, b_t: true },
        Case { name: "d input lm_head", m: t, n: h, k: v, a_t: false, b_t: false },
        Case { name: "d weight q_proj", m: h, n: h, k: t, a_t: true, b_t: false },
        Case { name: "d weight k_proj", m: h, n: kv, k: t, a_t: true, b_t: false },
        Case { name: "d weight up_proj", m: h, n: i, k: t, a_t: true, b_t: false },
        Case { name: "d weight down_proj", m: i, n: h, k: t, a_t: true, b_t: false },
        Case { name: "d embedding (tied)", m: v, n: h, k: t, a_t: true, b_t: false },
    ];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a thread pool");
    println!(
        "SmolLM2-135M training products at {t} tokens, {threads} threads, GFLOP/s (best of {rounds} interleaved rounds)"
    );
    println!(
        "{:<20} {:>6} {:>6} {:>6} {:>7} {:>12} {:>10} {:>20}",
        "product", "m", "n", "k", "layout", "gemm_f32", "crate", "per round min/med/max"
    );
    for case in &cases {
        let a: Vec<f32> = (0..case.m * case.k)
            .map(|j| ((j * 7919 % 1013) as f32) / 1013.0 - 0.5)
            .collect();
        let b: Vec<f32> = (0..case.k * case.n)
            .map(|j| ((j * 104_729 % 997) as f32) / 997.0 - 0.5)
            .collect();
        let mut dst = vec![0f32; case.m * case.n];
        let flops = 2.0 * (case.m * case.n * case.k) as f64;
        let (mut best, mut ratios) = ([0f64; 2], Vec::new());
        pool.install(|| {
            for _ in 0..rounds {
                let ours = flops / case.time(&a, &b, &mut dst, true) / 1e9;
                let crate_own = flops / case.time(&a, &b, &mut dst, false) / 1e9;
                best = [best[0].max(ours), best[1].max(crate_own)];
                ratios.push(ours / crate_own);
            }
        });
        ratios.sort_by(f64::total_cmp);
        let layout = format!(
            "{}{}",
            if case.a_t { "T" } else { "N" },
            if case.b_t { "T" } else { "N" }
        );
        println!(
            "{:<20} {:>6} {:>6} {:>6} {:>7} {:>12.0} {:>10.0} {:>20}",
            case.name,
            case.m,
            case.n,
            case.k,
            layout,
            best[0],
            best[1],
            format!(
                "{:.2}/{:.2}/{:.2}",
                ratios[0],
                ratios[ratios.len() / 2],
                ratios[ratios.len() - 1]
            )
        );
    }
}
