//! Distillation loss: per-token forward KL(teacher ‖ student) on softmax(logits / T), averaged over
//! tokens, and its gradient with respect to the student logits.

use burn::tensor::Tensor;
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::backend::Backend;

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

/// Reverse KL(student ‖ teacher), same shapes.
pub fn reverse_kl_reference<B: Backend>(
    teacher: Tensor<B, 2>,
    student: Tensor<B, 2>,
    temperature: f64,
) -> Tensor<B, 1> {
    let [n, _] = teacher.dims();
    let t = teacher / temperature;
    let s = student / temperature;
    let log_ps = log_softmax(s.clone(), 1);
    let ps = softmax(s, 1);
    (ps * (log_ps - log_softmax(t, 1))).sum() / n as f64
}

/// Chunked forward KL on host rows: for each token reads both logit rows once, computes both
/// log-softmaxes with an online max and sum, the loss and `d loss / d student_logits`, without
/// materializing `[tokens, vocab]` probabilities. Returns (mean loss, gradient `[tokens * vocab]`).
pub fn forward_kl_fused_host(
    teacher: &[f32],
    student: &[f32],
    vocab: usize,
    temperature: f32,
) -> (f64, Vec<f32>) {
    let n = teacher.len() / vocab;
    let mut grad = vec![0f32; student.len()];
    let mut loss = 0f64;
    for r in 0..n {
        let t = &teacher[r * vocab..(r + 1) * vocab];
        let s = &student[r * vocab..(r + 1) * vocab];
        // Online max and sum of exp in one pass each.
        let (mut mt, mut zt, mut ms, mut zs) = (f32::NEG_INFINITY, 0f64, f32::NEG_INFINITY, 0f64);
        for (&a, &b) in t.iter().zip(s) {
            let (a, b) = (a / temperature, b / temperature);
            if a > mt {
                zt = zt * ((mt - a) as f64).exp() + 1.0;
                mt = a;
            } else {
                zt += ((a - mt) as f64).exp();
            }
            if b > ms {
                zs = zs * ((ms - b) as f64).exp() + 1.0;
                ms = b;
            } else {
                zs += ((b - ms) as f64).exp();
            }
        }
        let (lzt, lzs) = (zt.ln(), zs.ln());
        let g = &mut grad[r * vocab..(r + 1) * vocab];
        let mut row = 0f64;
        for ((&a, &b), gi) in t.iter().zip(s).zip(g.iter_mut()) {
            let log_pt = (a / temperature - mt) as f64 - lzt;
            let log_ps = (b / temperature - ms) as f64 - lzs;
            let pt = log_pt.exp();
            row += pt * (log_pt - log_ps);
            // d/ds of sum pt (log pt - log ps) = (ps - pt) / T, averaged over tokens.
            *gi = ((log_ps.exp() - pt) / (temperature as f64 * n as f64)) as f32;
        }
        loss += row;
    }
    (loss / n as f64, grad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::Distribution;

    type A = Autodiff<Flex>;

    #[test]
    fn fused_host_matches_the_reference_loss_and_gradient() {
        let device = Default::default();
        let (n, v) = (6, 37);
        let t = Tensor::<Flex, 2>::random([n, v], Distribution::Normal(0.0, 3.0), &device);
        let s = Tensor::<Flex, 2>::random([n, v], Distribution::Normal(0.0, 3.0), &device);
        for temp in [1.0f32, 2.0] {
            let s_ad = Tensor::<A, 2>::from_inner(s.clone()).require_grad();
            let loss = forward_kl_reference(
                Tensor::<A, 2>::from_inner(t.clone()),
                s_ad.clone(),
                temp as f64,
            );
            let grads = loss.backward();
            let ref_grad = s_ad
                .grad(&grads)
                .unwrap()
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            let ref_loss = loss.into_data().to_vec::<f32>().unwrap()[0] as f64;
            let (fl, fg) = forward_kl_fused_host(
                &t.clone().into_data().to_vec::<f32>().unwrap(),
                &s.clone().into_data().to_vec::<f32>().unwrap(),
                v,
                temp,
            );
            assert!(
                (fl - ref_loss).abs() < 1e-5 * ref_loss.abs().max(1.0),
                "loss {fl} vs {ref_loss}"
            );
            for (a, b) in fg.iter().zip(&ref_grad) {
                assert!((a - b).abs() < 1e-5, "grad {a} vs {b}");
            }
        }
    }

    #[test]
    fn fused_gradient_matches_finite_differences() {
        let (n, v) = (2, 5);
        let t: Vec<f32> = (0..n * v)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3)
            .collect();
        let s: Vec<f32> = (0..n * v)
            .map(|i| ((i * 5 % 13) as f32 - 6.0) * 0.25)
            .collect();
        let (_, g) = forward_kl_fused_host(&t, &s, v, 1.0);
        let h = 1e-3f32;
        for i in 0..n * v {
            let mut up = s.clone();
            up[i] += h;
            let mut down = s.clone();
            down[i] -= h;
            let fd = (forward_kl_fused_host(&t, &up, v, 1.0).0
                - forward_kl_fused_host(&t, &down, v, 1.0).0)
                / (2.0 * h as f64);
            assert!(
                (fd as f32 - g[i]).abs() < 1e-3,
                "i={i}: fd {fd} vs {}",
                g[i]
            );
        }
    }
}
