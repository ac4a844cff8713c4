//! Next-token cross-entropy `−log softmax(logits)[target]` per row, with its gradient with
//! respect to the logits, `softmax(logits) − onehot(target)`, from one read of each row: the
//! loss of fine-tuning and teacher correction. The tensor-op version
//! ([`cross_entropy_rows_reference`]) runs on every backend; the CPU's ([`cross_entropy_rows_host`])
//! makes no `[rows, vocab]` temporary but the gradient, where log-softmax, gather and their
//! backward made one per step.

use burn::backend::Autodiff;
use burn::tensor::IndexingUpdateOp;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use rayon::prelude::*;

use crate::KernelBackend;
use crate::fused::{ROW_LANES, exp_f32, filled, lane_blocks_1x1, max_f32, wide, zeroed};

/// Per-row cross-entropy of `logits [rows, vocab]` against `targets [rows]` in tensor ops:
/// `(losses [rows], grad_scale · d loss_row / d logits [rows, vocab])`.
pub fn cross_entropy_rows_reference<B: Backend>(
    logits: Tensor<B, 2>,
    targets: &[i64],
    grad_scale: f32,
) -> (Tensor<B, 1>, Tensor<B, 2>) {
    let [rows, _] = logits.dims();
    let device = logits.device();
    let index =
        Tensor::<B, 2, Int>::from_data(TensorData::new(targets.to_vec(), [rows, 1]), &device);
    let losses = burn::tensor::activation::log_softmax(logits.clone(), 1)
        .gather(1, index.clone())
        .neg()
        .reshape([rows]);
    let grad = burn::tensor::activation::softmax(logits, 1)
        .mul_scalar(grad_scale)
        .scatter(
            1,
            index,
            Tensor::full([rows, 1], -grad_scale, &device),
            IndexingUpdateOp::Add,
        );
    (losses, grad)
}

/// Per-row cross-entropy on host memory, rows in parallel: each row's maximum, then
/// `e^(x − max)` (the project's vectorized f32 exponential) summed in f64, then the gradient
/// `grad_scale · (softmax − onehot)`. Returns (row losses, gradient `[rows · vocab]`).
pub fn cross_entropy_rows_host(
    logits: &[f32],
    targets: &[i64],
    vocab: usize,
    grad_scale: f32,
) -> (Vec<f64>, Vec<f32>) {
    assert!(
        vocab > 0 && logits.len() == targets.len() * vocab,
        "cross_entropy_rows_host: {} logits for {} targets of {vocab}",
        logits.len(),
        targets.len()
    );
    let mut losses = vec![0f64; targets.len()];
    // SAFETY: every row of the gradient is zeroed by the task that fills it.
    let grad = unsafe {
        filled(logits.len(), |grad| {
            grad.par_chunks_mut(vocab)
                .zip(losses.par_iter_mut())
                .zip(logits.par_chunks(vocab).zip(targets.par_iter()))
                .for_each(|((g, loss), (x, &target))| {
                    let g = zeroed(g);
                    let target = usize::try_from(target)
                        .ok()
                        .filter(|&t| t < vocab)
                        .unwrap_or_else(|| {
                            panic!("target {target} outside a vocabulary of {vocab}")
                        });
                    *loss = wide(
                        #[inline(always)]
                        || {
                            let max = max_f32(x);
                            let mut z = [0f64; ROW_LANES];
                            lane_blocks_1x1(g, x, |l, g, x| {
                                *g = exp_f32(x - max);
                                z[l] += *g as f64;
                            });
                            let z: f64 = z.iter().sum();
                            let scale = (grad_scale as f64 / z) as f32;
                            for g in g.iter_mut() {
                                *g *= scale;
                            }
                            g[target] -= grad_scale;
                            // −log softmax[target] = log z + max − x[target].
                            z.ln() + max as f64 - x[target] as f64
                        },
                    );
                })
        })
    };
    (losses, grad)
}

/// The mean cross-entropy of `logits [rows, vocab]` against `targets [rows]` through the
/// backend's fused rows, differentiable with respect to the logits: `[1]`. The backward scales
/// the stored gradient by the upstream one.
pub fn cross_entropy_loss<B: KernelBackend>(
    logits: Tensor<Autodiff<B>, 2>,
    targets: &[i64],
) -> Tensor<Autodiff<B>, 1> {
    let rows = targets.len();
    crate::kl::loss_with_stored_gradient(logits, |logits| {
        B::cross_entropy_rows(logits, targets, 1.0 / rows as f32)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    type A = Autodiff<Flex>;

    #[test]
    fn the_fused_loss_and_gradient_equal_autodiff_through_log_softmax() {
        // Odd sizes; large logits, where an unshifted exponential overflows.
        let (rows, vocab) = (37, 1003);
        let device = Default::default();
        let logits =
            Tensor::<Flex, 2>::random([rows, vocab], Distribution::Normal(0.0, 30.0), &device);
        let targets: Vec<i64> = (0..rows as i64).map(|i| i * 37 % vocab as i64).collect();
        let fused_in = Tensor::<A, 2>::from_inner(logits.clone()).require_grad();
        let fused = cross_entropy_loss(fused_in.clone(), &targets) * 3.0;
        let reference_in = Tensor::<A, 2>::from_inner(logits).require_grad();
        let index =
            Tensor::<A, 2, Int>::from_data(TensorData::new(targets.clone(), [rows, 1]), &device);
        let reference = burn::tensor::activation::log_softmax(reference_in.clone(), 1)
            .gather(1, index)
            .mean()
            .neg()
            * 3.0;
        let (got, want) = (
            fused.clone().into_scalar() as f64,
            reference.clone().into_scalar() as f64,
        );
        assert!((got - want).abs() <= 1e-5 * want.abs(), "{got} vs {want}");
        let (g, r) = (fused.backward(), reference.backward());
        let v = |t: &Tensor<A, 2>, g| t.grad(g).unwrap().into_data().to_vec::<f32>().unwrap();
        let (got, want) = (v(&fused_in, &g), v(&reference_in, &r));
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-5 * scale, "gradient max |Δ| {diff} of {scale}");
        // The tensor-op version (other backends' path) gives the same.
        let logits = fused_in.inner();
        let (losses, grad) = cross_entropy_rows_reference(logits.clone(), &targets, 1.0);
        let (host_losses, host_grad) = cross_entropy_rows_host(
            &logits.into_data().to_vec::<f32>().unwrap(),
            &targets,
            vocab,
            1.0,
        );
        let losses = losses.into_data().to_vec::<f32>().unwrap();
        for (a, b) in host_losses.iter().zip(&losses) {
            assert!((a - *b as f64).abs() <= 1e-4 * b.abs() as f64, "{a} vs {b}");
        }
        let grad = grad.into_data().to_vec::<f32>().unwrap();
        let diff = grad
            .iter()
            .zip(&host_grad)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-6, "reference gradient max |Δ| {diff}");
    }
}
