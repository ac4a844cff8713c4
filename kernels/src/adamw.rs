//! AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019, algorithm 2)
//! on one parameter's flat f32 buffers, with the global-norm clipping factor folded into the
//! gradient read, and the squared norm that clipping needs. The tensor-op version
//! ([`adamw_reference`]) runs on every backend; the CPU's ([`adamw_host`]) reads each of the
//! four buffers once and writes each of the three results once, where the tensor ops make a
//! temporary and a pass over memory per step (ten of them).

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

/// One AdamW update's hyperparameters. With `g' = g · grad_scale`:
/// `m ← β₁m + (1−β₁)g'`, `v ← β₂v + (1−β₂)g'²`,
/// `p ← p − lr · ((m / (1−β₁ᵗ)) / (√(v / (1−β₂ᵗ)) + ε) + λp)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// The global-norm clipping factor (1 when the norm is under the threshold).
    pub grad_scale: f64,
    /// The 1-based step `t` of the bias corrections.
    pub step: i32,
}

/// The f32 constants of one update, each rounded once from its f64 expression, as a tensor op
/// with an f64 scalar rounds it: the reference and the host loop share them, so they agree to
/// the bit.
#[derive(Clone, Copy)]
struct Constants {
    scale: f32,
    b1: f32,
    one_minus_b1: f32,
    b2: f32,
    one_minus_b2: f32,
    c1: f32,
    c2: f32,
    eps: f32,
    wd: f32,
    lr: f32,
}

impl AdamW {
    fn constants(&self) -> Constants {
        Constants {
            scale: self.grad_scale as f32,
            b1: self.beta1 as f32,
            one_minus_b1: (1.0 - self.beta1) as f32,
            b2: self.beta2 as f32,
            one_minus_b2: (1.0 - self.beta2) as f32,
            c1: (1.0 - self.beta1.powi(self.step)) as f32,
            c2: (1.0 - self.beta2.powi(self.step)) as f32,
            eps: self.eps as f32,
            wd: self.weight_decay as f32,
            lr: self.lr as f32,
        }
    }
}

/// AdamW on `p`, `g`, `m`, `v` (each `[n]`) in tensor ops: the new `(p, m, v)`. The reference
/// the fused versions are held to, and the path of backends without one.
pub fn adamw_reference<B: Backend>(
    p: Tensor<B, 1>,
    g: Tensor<B, 1>,
    m: Tensor<B, 1>,
    v: Tensor<B, 1>,
    h: &AdamW,
) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>) {
    let c = h.constants();
    let g = g * c.scale;
    let m = m * c.b1 + g.clone() * c.one_minus_b1;
    let v = v * c.b2 + g.clone() * g * c.one_minus_b2;
    let update = (m.clone() / c.c1) / ((v.clone() / c.c2).sqrt() + c.eps) + p.clone() * c.wd;
    (p - update * c.lr, m, v)
}

/// Elements per parallel task of the host loops: large enough to amortize a task, small enough
/// that two threads share the work evenly; fixed, so sums do not depend on the thread count.
const CHUNK: usize = 1 << 16;

/// [`adamw_reference`] as one pass over f32 slices of equal length, on every rayon thread: the
/// moments `m` and `v` are updated in place and the new `p` returned, the same bits as the
/// reference.
pub fn adamw_host(p: &[f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: &AdamW) -> Vec<f32> {
    let n = p.len();
    assert!(
        g.len() == n && m.len() == n && v.len() == n,
        "adamw_host: buffers of {n}, {}, {} and {} elements",
        g.len(),
        m.len(),
        v.len()
    );
    let c = h.constants();
    let mut po: Vec<f32> = Vec::with_capacity(n);
    po.spare_capacity_mut()
        .par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(chunk, ((po, m), v))| {
            let at = chunk * CHUNK;
            let (p, g) = (&p[at..at + po.len()], &g[at..at + po.len()]);
            crate::fused::wide(
                #[inline(always)]
                || {
                    for ((po, (m, v)), (&p, &g)) in
                        po.iter_mut().zip(m.iter_mut().zip(v)).zip(p.iter().zip(g))
                    {
                        let g = g * c.scale;
                        let mi = *m * c.b1 + g * c.one_minus_b1;
                        let vi = *v * c.b2 + g * g * c.one_minus_b2;
                        let update = (mi / c.c1) / ((vi / c.c2).sqrt() + c.eps) + p * c.wd;
                        po.write(p - update * c.lr);
                        *m = mi;
                        *v = vi;
                    }
                },
            )
        });
    // SAFETY: the chunks cover all `n` elements of the spare capacity, each written once.
    unsafe { po.set_len(n) };
    po
}

/// `Σ x²` in f64, by fixed chunks summed in order: the same value on any thread count.
pub fn sum_squares_host(x: &[f32]) -> f64 {
    let partial: Vec<f64> = x
        .par_chunks(CHUNK)
        .map(|c| crate::fused::wide(|| crate::fused::sum_f64(c, |v| v * v)))
        .collect();
    partial.iter().sum()
}

/// `Σ x²` of `x [n]` in tensor ops, summed in f32 by the backend; the host version sums in f64.
pub fn sum_squares_reference<B: Backend>(x: Tensor<B, 1>) -> f64 {
    let sum: TensorData = (x.clone() * x).sum().into_data();
    sum.convert::<f64>()
        .to_vec::<f64>()
        .expect("f64 after convert")[0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    fn values(t: Tensor<Flex, 1>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    #[test]
    fn the_fused_update_gives_the_reference_bits() {
        let device = Default::default();
        // Odd length: a partial last chunk.
        let n = 3 * CHUNK + 17;
        let t = |lo: f64, hi: f64| {
            Tensor::<Flex, 1>::random([n], Distribution::Uniform(lo, hi), &device)
        };
        let (p, g, m, v) = (t(-1.0, 1.0), t(-0.1, 0.1), t(-0.01, 0.01), t(0.0, 1e-4));
        for h in [
            AdamW {
                lr: 3e-4,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                grad_scale: 0.37,
                step: 1,
            },
            AdamW {
                lr: 1e-2,
                beta1: 0.8,
                beta2: 0.999,
                eps: 1e-6,
                weight_decay: 0.0,
                grad_scale: 1.0,
                step: 250,
            },
        ] {
            let (rp, rm, rv) = adamw_reference(p.clone(), g.clone(), m.clone(), v.clone(), &h);
            let (mut hm, mut hv) = (values(m.clone()), values(v.clone()));
            let hp = adamw_host(&values(p.clone()), &values(g.clone()), &mut hm, &mut hv, &h);
            assert_eq!(hp, values(rp));
            assert_eq!(hm, values(rm));
            assert_eq!(hv, values(rv));
            // And it moved: the test would pass on a copy otherwise.
            assert_ne!(hp, values(p.clone()));
        }
    }

    #[test]
    fn squared_norms_match_the_reference_and_do_not_depend_on_threads() {
        let device = Default::default();
        let x = Tensor::<Flex, 1>::random([5 * CHUNK + 3], Distribution::Default, &device);
        let host = values(x.clone());
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| sum_squares_host(&host));
        let three = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap()
            .install(|| sum_squares_host(&host));
        assert_eq!(one.to_bits(), three.to_bits());
        let exact: f64 = host.iter().map(|&v| v as f64 * v as f64).sum();
        assert!((one - exact).abs() <= 1e-12 * exact, "{one} vs {exact}");
        let reference = sum_squares_reference(x);
        assert!(
            (one - reference).abs() <= 1e-5 * exact,
            "{one} vs {reference}"
        );
    }
}
