//! Distillation loss: per-token forward KL(teacher ‖ student) on softmax(logits / T), averaged over
//! tokens, and its gradient with respect to the student logits. Also reverse KL and a top-k
//! restricted forward KL.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{ElementConversion, Tensor, TensorPrimitive};

use crate::KernelBackend;
use crate::fused::{ROW_LANES, exp_f32, filled, lane_blocks_2x2, max_f32, wide, zeroed};

/// Reference in plain tensor ops (differentiable under autodiff):
/// `teacher, student: [tokens, vocab]` → scalar mean KL.
pub fn forward_kl_reference<B: Backend>(
    teacher: Tensor<B, 2>,
    student: Tensor<B, 2>,
    temperature: f64,
) -> Tensor<B, 1> {
    let [n, _] = teacher.dims();
    let t = teacher / temperature;
    let s = student / temperature;
    let log_pt = log_softmax(t.clone(), 1);
    let pt = softmax(t, 1);
    let log_ps = log_softmax(s, 1);
    (pt * (log_pt - log_ps)).sum() / n as f64
}

/// Which KL the distillation loss is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KlDirection {
    /// KL(teacher ‖ student): mass-covering, the method's default.
    Forward,
    /// KL(student ‖ teacher): mode-seeking.
    Reverse,
}

/// The reference of either direction.
pub fn kl_reference<B: Backend>(
    teacher: Tensor<B, 2>,
    student: Tensor<B, 2>,
    temperature: f64,
    direction: KlDirection,
) -> Tensor<B, 1> {
    match direction {
        KlDirection::Forward => forward_kl_reference(teacher, student, temperature),
        // KL(student ‖ teacher) is the forward formula with the roles swapped.
        KlDirection::Reverse => forward_kl_reference(student, teacher, temperature),
    }
}

/// Forward KL restricted to the teacher's `k` most likely tokens per row: the teacher's
/// distribution renormalized over them, against the student's full log-softmax at the same
/// tokens. Differentiable; `[tokens, vocab]` → scalar mean over tokens.
pub fn topk_kl_reference<B: Backend>(
    teacher: Tensor<B, 2>,
    student: Tensor<B, 2>,
    temperature: f64,
    k: usize,
) -> Tensor<B, 1> {
    let v = teacher.dims()[1];
    let (top, index) = teacher.topk_with_indices(k.clamp(1, v), 1); // [n, k]
    topk_kl_given(top, index, student, temperature)
}

/// The top-k forward KL of [`topk_kl_reference`] from the teacher's top entries alone:
/// `teacher_top [n, k]` (its logits at those ids, or log-probabilities, which differ from them
/// by a constant per row), `index [n, k]` (their ids) and `student [n, vocab]` logits → the mean
/// over rows of `Σ_j p_j (log p_j − log q_{index_j})`, `p = softmax(teacher_top / T)` over the
/// k and `q = softmax(student / T)` over the vocabulary, `[1]`. A cached teacher
/// (`teacher_logits`) gives the same loss as the live one.
pub fn topk_kl_given<B: Backend>(
    teacher_top: Tensor<B, 2>,
    index: Tensor<B, 2, burn::tensor::Int>,
    student: Tensor<B, 2>,
    temperature: f64,
) -> Tensor<B, 1> {
    let n = teacher_top.dims()[0];
    let log_pt = log_softmax(teacher_top / temperature, 1);
    let pt = log_pt.clone().exp();
    let log_ps = log_softmax(student / temperature, 1).gather(1, index);
    (pt * (log_pt - log_ps)).sum() / n as f64
}

/// The per-row KL and its gradient on host memory, rows in parallel (rayon), without
/// materializing any `[tokens, vocab]` probabilities: per token, one pass for both rows' maxima,
/// one for `e^((x − max)/T)` of both (the project's vectorized f32 exponential, within 2 ulp of
/// libm) and their sums in f64, and one or two more for the loss, with every log-probability
/// difference summed into it in f64 (at low temperatures the loss is a difference of large
/// terms; the reverse direction keeps them in f32 for its gradient pass), and
/// `grad_scale * d loss_row / d student_logits`. Returns (row losses, gradient
/// `[tokens * vocab]`).
pub fn kl_rows_host(
    teacher: &[f32],
    student: &[f32],
    vocab: usize,
    temperature: f32,
    direction: KlDirection,
    grad_scale: f32,
) -> (Vec<f64>, Vec<f32>) {
    use rayon::prelude::*;
    assert_eq!(teacher.len(), student.len());
    assert_eq!(teacher.len() % vocab, 0);
    let rows = teacher.len() / vocab;
    let mut losses = vec![0f64; rows];
    // SAFETY: every row of the gradient is zeroed by the task that fills it.
    let grad = unsafe {
        filled(student.len(), |grad| {
            grad.par_chunks_mut(vocab)
                .zip(losses.par_iter_mut())
                .zip(teacher.par_chunks(vocab).zip(student.par_chunks(vocab)))
                .for_each_init(
                    || vec![0f32; vocab],
                    |pt, ((g, loss), (t, s))| {
                        let g = zeroed(g);
                        *loss = wide(
                            #[inline(always)]
                            || kl_row(t, s, temperature, direction, grad_scale, pt, g),
                        )
                    },
                )
        })
    };
    (losses, grad)
}

/// One row of [`kl_rows_host`]: its loss, and its gradient into `g`; `pt` is scratch of the
/// row's length.
#[inline(always)]
fn kl_row(
    t: &[f32],
    s: &[f32],
    temperature: f32,
    direction: KlDirection,
    grad_scale: f32,
    pt: &mut [f32],
    g: &mut [f32],
) -> f64 {
    let inv_t = 1.0 / temperature as f64;
    let inv_t32 = inv_t as f32;
    let (mt, ms) = (max_f32(t), max_f32(s));
    // Unnormalized probabilities: the teacher's into `pt`, the student's into `g`.
    let (mut zt, mut zs) = ([0f64; ROW_LANES], [0f64; ROW_LANES]);
    lane_blocks_2x2(pt, g, t, s, |l, et, es, t, s| {
        *et = exp_f32((t - mt) * inv_t32);
        *es = exp_f32((s - ms) * inv_t32);
        zt[l] += *et as f64;
        zs[l] += *es as f64;
    });
    let (zt, zs) = (zt.iter().sum::<f64>(), zs.iter().sum::<f64>());
    // log pt_j − log ps_j = (t_j − s_j)/T − shift.
    let lse_t = mt as f64 * inv_t + zt.ln();
    let lse_s = ms as f64 * inv_t + zs.ln();
    let shift = lse_t - lse_s;
    let (inv_zt, inv_zs) = (1.0 / zt, 1.0 / zs);
    let scale = grad_scale as f64 * inv_t;
    let mut acc = [0f64; ROW_LANES];
    match direction {
        KlDirection::Forward => {
            lane_blocks_2x2(pt, g, t, s, |l, pt, g, t, s| {
                let p = *pt as f64 * inv_zt;
                let q = *g as f64 * inv_zs;
                acc[l] += p * ((t as f64 - s as f64) * inv_t - shift);
                // d/dz_s of Σ pt (log pt − log ps) = (ps − pt), times 1/T for z = s/T.
                *g = ((q - p) * scale) as f32;
            });
            acc.iter().sum()
        }
        KlDirection::Reverse => {
            lane_blocks_2x2(pt, g, t, s, |l, pt, g, t, s| {
                let q = *g as f64 * inv_zs;
                // log ps − log pt, kept for the gradient pass.
                let d = (s as f64 - t as f64) * inv_t + shift;
                acc[l] += q * d;
                *pt = d as f32;
            });
            let row: f64 = acc.iter().sum();
            // d/dz_j of Σ ps (log ps − log pt) = ps_j (log ps_j − log pt_j − row).
            for (d, g) in pt.iter().zip(g.iter_mut()) {
                let q = *g as f64 * inv_zs;
                *g = (q * (*d as f64 - row) * scale) as f32;
            }
            row
        }
    }
}

/// The distillation loss through the backend's fused kernel, differentiable with respect to the
/// student: `teacher [tokens, vocab]` (no graph), `student [tokens, vocab]` → scalar mean KL over
/// tokens. The backward pass scales the kernel's stored gradient by the upstream gradient: the
/// only `[tokens, vocab]` tensor kept for it.
pub fn kl_loss<B: KernelBackend>(
    teacher: Tensor<B, 2>,
    student: Tensor<Autodiff<B>, 2>,
    temperature: f64,
    direction: KlDirection,
) -> Tensor<Autodiff<B>, 1> {
    let [rows, _] = student.dims();
    loss_with_stored_gradient(student, |student| {
        B::kl_rows(
            teacher.into_primitive().tensor(),
            student,
            temperature as f32,
            direction,
            1.0 / rows as f32,
        )
    })
}

/// A scalar loss of `input [rows, cols]` whose fused kernel `rows_and_grad` gives each row's
/// loss `[rows]` and the gradient of their mean `[rows, cols]` in one pass: the mean `[1]`,
/// differentiable with respect to `input`, the backward scaling the stored gradient by the
/// upstream one (the only `[rows, cols]` tensor kept).
pub(crate) fn loss_with_stored_gradient<B: KernelBackend>(
    input: Tensor<Autodiff<B>, 2>,
    rows_and_grad: impl FnOnce(FloatTensor<B>) -> (FloatTensor<B>, FloatTensor<B>),
) -> Tensor<Autodiff<B>, 1> {
    #[derive(Debug)]
    struct StoredGradientBackward;

    impl<B: Backend> Backward<B, 1> for StoredGradientBackward {
        /// `d loss / d input`, `[rows, cols]`.
        type State = FloatTensor<B>;

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [parent] = ops.parents;
            let upstream = grads.consume::<B>(&ops.node);
            if let Some(node) = parent {
                let grad = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(ops.state));
                let upstream: f32 =
                    Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(upstream))
                        .into_scalar()
                        .elem();
                // A loss used as is (upstream 1) hands the stored gradient over without a copy.
                let grad = if upstream == 1.0 {
                    grad
                } else {
                    grad.mul_scalar(upstream)
                };
                grads.register::<B>(node.id, grad.into_primitive().tensor());
            }
        }
    }

    let [rows, _] = input.dims();
    let input = input.into_primitive().tensor();
    let run = |input| {
        let (losses, grad) = rows_and_grad(input);
        let mean = (Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(losses)).sum()
            / rows as f64)
            .into_primitive()
            .tensor();
        (mean, grad)
    };
    let out = match StoredGradientBackward
        .prepare::<NoCheckpointing>([input.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (mean, grad) = run(input.primitive);
            prep.finish(grad, mean)
        }
        OpsKind::UnTracked(prep) => prep.finish(run(input.primitive).0),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Distribution, TensorData};

    type A = Autodiff<Flex>;

    fn vec2(t: Tensor<Flex, 2>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    /// Loss and gradient of the autodiff reference.
    fn reference(
        t: &Tensor<Flex, 2>,
        s: &Tensor<Flex, 2>,
        temp: f64,
        dir: KlDirection,
    ) -> (f64, Vec<f32>) {
        let s_ad = Tensor::<A, 2>::from_inner(s.clone()).require_grad();
        let loss = kl_reference(
            Tensor::<A, 2>::from_inner(t.clone()),
            s_ad.clone(),
            temp,
            dir,
        );
        let grads = loss.backward();
        let grad = vec2(s_ad.grad(&grads).unwrap());
        (loss.into_data().to_vec::<f32>().unwrap()[0] as f64, grad)
    }

    fn logits(n: usize, v: usize) -> (Tensor<Flex, 2>, Tensor<Flex, 2>) {
        let device = Default::default();
        (
            Tensor::random([n, v], Distribution::Normal(0.0, 3.0), &device),
            Tensor::random([n, v], Distribution::Normal(0.0, 3.0), &device),
        )
    }

    #[test]
    fn host_rows_match_the_reference_loss_and_gradient() {
        let (n, v) = (6, 37);
        let (t, s) = logits(n, v);
        for dir in [KlDirection::Forward, KlDirection::Reverse] {
            for temp in [1.0f32, 2.0] {
                let (ref_loss, ref_grad) = reference(&t, &s, temp as f64, dir);
                let (rows, grad) = kl_rows_host(
                    &vec2(t.clone()),
                    &vec2(s.clone()),
                    v,
                    temp,
                    dir,
                    1.0 / n as f32,
                );
                let loss = rows.iter().sum::<f64>() / n as f64;
                assert!(
                    (loss - ref_loss).abs() < 1e-5 * ref_loss.abs().max(1.0),
                    "{dir:?} T={temp}: loss {loss} vs {ref_loss}"
                );
                for (a, b) in grad.iter().zip(&ref_grad) {
                    assert!((a - b).abs() < 1e-5, "{dir:?} T={temp}: grad {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn host_gradient_matches_finite_differences() {
        let (n, v) = (2, 5);
        let t: Vec<f32> = (0..n * v)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3)
            .collect();
        let s: Vec<f32> = (0..n * v)
            .map(|i| ((i * 5 % 13) as f32 - 6.0) * 0.25)
            .collect();
        for dir in [KlDirection::Forward, KlDirection::Reverse] {
            let loss = |s: &[f32]| kl_rows_host(&t, s, v, 1.5, dir, 1.0).0.iter().sum::<f64>();
            let (_, g) = kl_rows_host(&t, &s, v, 1.5, dir, 1.0);
            let h = 1e-3f32;
            for i in 0..n * v {
                let (mut up, mut down) = (s.clone(), s.clone());
                up[i] += h;
                down[i] -= h;
                let fd = (loss(&up) - loss(&down)) / (2.0 * h as f64);
                assert!(
                    (fd as f32 - g[i]).abs() < 1e-4,
                    "{dir:?} i={i}: fd {fd} vs {}",
                    g[i]
                );
            }
        }
    }

    #[test]
    fn fused_loss_under_autodiff_equals_the_reference_with_an_upstream_factor() {
        let (n, v) = (5, 41);
        let (t, s) = logits(n, v);
        for dir in [KlDirection::Forward, KlDirection::Reverse] {
            let s_ad = Tensor::<A, 2>::from_inner(s.clone()).require_grad();
            // The factor checks that the stored gradient is scaled by the upstream one.
            let loss = kl_loss::<Flex>(t.clone(), s_ad.clone(), 2.0, dir) * 3.0;
            let grads = loss.backward();
            let grad = vec2(s_ad.grad(&grads).unwrap());
            let (ref_loss, ref_grad) = reference(&t, &s, 2.0, dir);
            let loss = loss.into_data().to_vec::<f32>().unwrap()[0] as f64;
            assert!(
                (loss - 3.0 * ref_loss).abs() < 3e-5 * ref_loss.abs().max(1.0),
                "{loss} vs 3 × {ref_loss}"
            );
            for (a, b) in grad.iter().zip(&ref_grad) {
                assert!((a - 3.0 * b).abs() < 3e-5, "grad {a} vs 3 × {b}");
            }
        }
    }

    #[test]
    fn topk_with_every_token_is_the_forward_kl_and_fewer_tokens_renormalize() {
        let device = Default::default();
        let (n, v) = (4, 23);
        let (t, s) = logits(n, v);
        let full = forward_kl_reference(t.clone(), s.clone(), 1.0).into_scalar();
        let all = topk_kl_reference(t.clone(), s.clone(), 1.0, v).into_scalar();
        assert!(
            (full - all).abs() < 1e-5 * full.abs().max(1.0),
            "{full} vs {all}"
        );

        // One row by hand: teacher [2, 1, 0], student [0, 0, 0], k = 2.
        let t =
            Tensor::<Flex, 2>::from_data(TensorData::new(vec![2f32, 1.0, 0.0], [1, 3]), &device);
        let s =
            Tensor::<Flex, 2>::from_data(TensorData::new(vec![0f32, 0.0, 0.0], [1, 3]), &device);
        let got = topk_kl_reference(t, s, 1.0, 2).into_scalar() as f64;
        let (p0, p1) = (
            1.0 / (1.0 + (-1f64).exp()),
            (-1f64).exp() / (1.0 + (-1f64).exp()),
        );
        let lps = (1.0f64 / 3.0).ln();
        let want = p0 * (p0.ln() - lps) + p1 * (p1.ln() - lps);
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }
}
