//! Importance accumulation (Minitron): for an activation `A [batch, seq, d]`,
//! `acc[d] += sum_b (mean_s |A[b, s, d]|)^2`.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};

use crate::KernelBackend;

/// The accumulation on the backend's kernel (see [`KernelBackend::importance_accumulate`]).
/// `acc: [d]`, `activation: [batch, seq, d]` → updated `acc`.
pub fn accumulate<B: KernelBackend>(acc: Tensor<B, 1>, activation: Tensor<B, 3>) -> Tensor<B, 1> {
    Tensor::from_primitive(TensorPrimitive::Float(B::importance_accumulate(
        acc.into_primitive().tensor(),
        activation.into_primitive().tensor(),
    )))
}

/// Reference: four tensor ops (abs, mean over seq, square, sum over batch) and their temporaries.
/// `acc: [d]`, `activation: [batch, seq, d]` → updated `acc`.
pub fn accumulate_reference<B: Backend>(
    acc: Tensor<B, 1>,
    activation: Tensor<B, 3>,
) -> Tensor<B, 1> {
    let [_, _, d] = activation.dims();
    let m = activation.abs().mean_dim(1); // [b, 1, d]
    acc + m.powf_scalar(2.0).sum_dim(0).reshape([d])
}

/// One pass over the activation, reducing per column in place: what the fused kernel computes,
/// written for the host so that CPU runs do not allocate the `[batch, seq, d]` temporaries.
/// `acc` and `activation` are row-major f32.
pub fn accumulate_host(acc: &mut [f32], activation: &[f32], batch: usize, seq: usize) {
    use rayon::prelude::*;
    let d = acc.len();
    assert_eq!(activation.len(), batch * seq * d);
    // Batch rows in parallel, each summing |A| over its sequence in f64; then the squares of the
    // means are added in batch order, so the result does not depend on the thread count.
    let squares: Vec<Vec<f64>> = activation
        .par_chunks(seq * d)
        .map(|rows| {
            let mut sums = vec![0f64; d];
            for row in rows.chunks_exact(d) {
                for (sum, x) in sums.iter_mut().zip(row) {
                    *sum += x.abs() as f64;
                }
            }
            sums.iter()
                .map(|s| {
                    let m = s / seq as f64;
                    m * m
                })
                .collect()
        })
        .collect();
    for sq in squares {
        for (a, m2) in acc.iter_mut().zip(sq) {
            *a += m2 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, TensorData};

    #[test]
    fn host_pass_equals_the_reference() {
        let device = Default::default();
        let (b, s, d) = (3, 7, 5);
        let act = Tensor::<Flex, 3>::random([b, s, d], Distribution::Normal(0.0, 2.0), &device);
        let acc0 = Tensor::<Flex, 1>::random([d], Distribution::Uniform(0.0, 1.0), &device);
        let reference = accumulate_reference(acc0.clone(), act.clone())
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let mut acc = acc0.into_data().to_vec::<f32>().unwrap();
        accumulate_host(&mut acc, &act.into_data().to_vec::<f32>().unwrap(), b, s);
        for (x, y) in acc.iter().zip(&reference) {
            assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{x} vs {y}");
        }
        let _ = TensorData::new(vec![0f32], [1]);
    }
}
