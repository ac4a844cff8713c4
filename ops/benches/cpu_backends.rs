//! Burn CPU backends side by side on the shapes the model uses (f32 matmul), to choose the default.
//! `cargo bench -p distillery-ops --bench cpu_backends`

use std::time::Instant;

use burn::backend::{Flex, NdArray};
use burn::tensor::{Distribution, Tensor, backend::Backend};

fn time<B: Backend>(m: usize, k: usize, n: usize, reps: usize) -> f64 {
    let device = B::Device::default();
    let a = Tensor::<B, 2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
    let b = Tensor::<B, 2>::random([k, n], Distribution::Normal(0.0, 1.0), &device);
    let _ = a.clone().matmul(b.clone()).into_data();
    let t = Instant::now();
    for _ in 0..reps {
        let _ = a.clone().matmul(b.clone()).into_data();
    }
    let secs = t.elapsed().as_secs_f64() / reps as f64;
    2.0 * (m * k * n) as f64 / secs / 1e9
}

fn main() {
    println!(
        "{:<28} {:>12} {:>12} {:>8}",
        "matmul [m,k]x[k,n]", "flex GFLOP/s", "ndarray", "ratio"
    );
    for (m, k, n) in [
        (512, 576, 576),
        (512, 576, 1536),
        (512, 1536, 576),
        (4096, 576, 1536),
        (512, 576, 49152),
    ] {
        let reps = (2e9 / (2.0 * (m * k * n) as f64)).clamp(1.0, 50.0) as usize;
        let f = time::<Flex>(m, k, n, reps);
        let nd = time::<NdArray>(m, k, n, reps);
        println!(
            "{:<28} {:>12.1} {:>12.1} {:>8.2}",
            format!("[{m},{k}]x[{k},{n}]"),
            f,
            nd,
            f / nd
        );
    }
}
