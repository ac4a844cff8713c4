//! The training step's operations with backward passes of their own, registered with Burn's
//! autodiff: the product `a · b`, the norms (RMSNorm, LayerNorm), the gated activations
//! (SwiGLU, GeGLU), RoPE and the embedding lookup. Each op's forward and backward are
//! [`KernelBackend`] methods, so a backend brings its own fused versions (the CPU's are the host
//! loops below: one pass over each input, the products through the `gemm` crate as
//! [`crate::fused::gemm_f32`] threads it) and every other backend runs the tensor-op versions here
//! (`*_reference`). Tests hold each against autodiff through plain tensor ops.
//!
//! Backward formulas, for `y = (x · r) ⊙ w` with `r = 1 / √(mean(x²) + ε)` (RMSNorm, Zhang &
//! Sennrich 2019): `dx = r (g − x̂ · mean(g ⊙ x̂))` with `g = dy ⊙ w`, `x̂ = x · r`, and
//! `dw = Σ_rows dy ⊙ x̂`; for LayerNorm (`x̂ = (x − μ) r`, `r = 1 / √(mean((x − μ)²) + ε)`),
//! `dx = r (g − mean(g) − x̂ · mean(g ⊙ x̂))`, the same `dw`. For `y = a σ(z(a)) ⊙ u` (SiLU:
//! `z(a) = a`; the tanh GELU: `z(a) = 2√(2/π)(a + 0.044715 a³)`) with `s = σ(z(a))`:
//! `du = dy ⊙ a s`, `da = dy ⊙ u ⊙ s (1 + a (1 − s) z'(a))`. RoPE is a rotation per pair, so its
//! backward is the rotation by the opposite angle: the same op with `−sin`.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Int, Tensor, TensorData, TensorMetadata, TensorPrimitive};
use rayon::prelude::*;

use crate::KernelBackend;
use crate::fused::{GluActivation, exp_f32, sum_f64, wide};

/// Registers each of `$grads` for its parent in `$ops` where that parent is tracked.
macro_rules! register {
    ($ops:expr, $grads:expr, [$($grad:expr),+]) => {
        for (parent, grad) in $ops.parents.into_iter().zip([$($grad),+]) {
            if let Some(node) = parent {
                $grads.register::<B>(node.id, grad);
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// The product

/// `a [m, k] · b [k, n]` → `[m, n]`, differentiable in both through [`KernelBackend::matmul`]:
/// `da = dc · bᵀ`, `db = aᵀ · dc` (the transposes are views).
pub fn matmul<B: KernelBackend>(
    a: Tensor<Autodiff<B>, 2>,
    b: Tensor<Autodiff<B>, 2>,
) -> Tensor<Autodiff<B>, 2> {
    product(a, b, false)
}

/// `a [m, k] · bᵀ` with `b [n, k]` → `[m, n]` (a tied output head reads the embedding this
/// way), differentiable in both; `db = dcᵀ · a` comes out `[n, k]` like `b`, where
/// differentiating [`matmul`] of a transposed view gives a transposed gradient every later
/// elementwise op reads by strides.
pub fn matmul_transposed<B: KernelBackend>(
    a: Tensor<Autodiff<B>, 2>,
    b: Tensor<Autodiff<B>, 2>,
) -> Tensor<Autodiff<B>, 2> {
    product(a, b, true)
}

fn product<B: KernelBackend>(
    a: Tensor<Autodiff<B>, 2>,
    b: Tensor<Autodiff<B>, 2>,
    transposed: bool,
) -> Tensor<Autodiff<B>, 2> {
    #[derive(Debug)]
    struct ProductBackward;

    /// Each operand kept where the other's gradient needs it, and whether `b` is read transposed.
    type State<B> = (Option<FloatTensor<B>>, Option<FloatTensor<B>>, bool);

    impl<B: KernelBackend> Backward<B, 2> for ProductBackward {
        type State = State<B>;

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let dc = grads.consume::<B>(&ops.node);
            let (a, b, transposed) = ops.state;
            let [pa, pb] = ops.parents;
            if let (Some(node), Some(b)) = (pa, b) {
                let b = if transposed { b } else { B::float_transpose(b) };
                grads.register::<B>(node.id, B::matmul(dc.clone(), b));
            }
            if let (Some(node), Some(a)) = (pb, a) {
                let db = if transposed {
                    B::matmul(B::float_transpose(dc), a)
                } else {
                    B::matmul(B::float_transpose(a), dc)
                };
                grads.register::<B>(node.id, db);
            }
        }
    }

    let (a, b) = (a.into_primitive().tensor(), b.into_primitive().tensor());
    let (a_tracked, b_tracked) = (a.is_tracked(), b.is_tracked());
    let forward = |a: FloatTensor<B>, b: FloatTensor<B>| {
        B::matmul(a, if transposed { B::float_transpose(b) } else { b })
    };
    let nodes = [a.node.clone(), b.node.clone()];
    let out = match ProductBackward
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let out = forward(a.primitive.clone(), b.primitive.clone());
            // Each side's gradient needs the other operand only.
            let keep_b = a_tracked.then_some(b.primitive);
            let keep_a = b_tracked.then_some(a.primitive);
            prep.finish((keep_a, keep_b, transposed), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(a.primitive, b.primitive)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

// ---------------------------------------------------------------------------------------------
// Norms: RMSNorm and LayerNorm

/// Which norm over the last dimension, and its `ε`: RMSNorm (`x · r ⊙ w`,
/// `r = 1 / √(mean(x²) + ε)`) or, `centred`, LayerNorm without bias (`(x − μ) · r ⊙ w`,
/// `r = 1 / √(mean((x − μ)²) + ε)`; Nemotron's LayerNorm1p adds its `1` to `w` and its bias
/// outside).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NormSpec {
    pub eps: f32,
    pub centred: bool,
}

/// The norm of `x [rows, d]` by `w [d]` ([`NormSpec`]), differentiable in both.
pub fn norm<B: KernelBackend>(
    x: Tensor<Autodiff<B>, 2>,
    w: Tensor<Autodiff<B>, 1>,
    spec: NormSpec,
) -> Tensor<Autodiff<B>, 2> {
    #[derive(Debug)]
    struct NormBackward(NormSpec);

    impl<B: KernelBackend> Backward<B, 2> for NormBackward {
        type State = (FloatTensor<B>, FloatTensor<B>);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let dy = grads.consume::<B>(&ops.node);
            let (x, w) = ops.state;
            let (dx, dw) = B::norm_backward(x, w, dy, self.0);
            register!(ops, grads, [dx, dw]);
        }
    }

    let (x, w) = (x.into_primitive().tensor(), w.into_primitive().tensor());
    let nodes = [x.node.clone(), w.node.clone()];
    let out = match NormBackward(spec)
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let y = B::norm(x.primitive.clone(), w.primitive.clone(), spec);
            prep.finish((x.primitive, w.primitive), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(B::norm(x.primitive, w.primitive, spec)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// `x − mean(x)` per row where the norm is centred, else `x`.
fn centred<B: Backend>(x: Tensor<B, 2>, spec: NormSpec) -> Tensor<B, 2> {
    if spec.centred {
        let mean = x.clone().mean_dim(1);
        x - mean
    } else {
        x
    }
}

/// The norm's forward in tensor ops, `x [rows, d]`, `w [d]`.
pub fn norm_reference<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 1>,
    spec: NormSpec,
) -> Tensor<B, 2> {
    let x = centred(x, spec);
    let var = x.clone().powf_scalar(2.0).mean_dim(1);
    (x * (var + spec.eps).sqrt().recip()) * w.unsqueeze_dim::<2>(0)
}

/// The norm's backward in tensor ops: `(dx [rows, d], dw [d])`.
pub fn norm_backward_reference<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 1>,
    dy: Tensor<B, 2>,
    spec: NormSpec,
) -> (Tensor<B, 2>, Tensor<B, 1>) {
    let d = x.dims()[1];
    let x = centred(x, spec);
    let r = (x.clone().powf_scalar(2.0).mean_dim(1) + spec.eps)
        .sqrt()
        .recip();
    let xhat = x * r.clone();
    let dw = (dy.clone() * xhat.clone()).sum_dim(0).reshape([d]);
    // `g − mean(g)` for LayerNorm: the mean's own gradient.
    let g = centred(dy * w.unsqueeze_dim::<2>(0), spec);
    let mean = (g.clone() * xhat.clone()).mean_dim(1);
    ((g - xhat * mean) * r, dw)
}

/// `1 / √(mean(x²) + ε)` of one row, as [`crate::fused::rms_norm`] computes it (the squares
/// summed in f64, the mean rounded to f32).
#[inline(always)]
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let var = (sum_f64(x, |v| v * v) / x.len() as f64) as f32;
    1.0 / (var + eps).sqrt()
}

/// A row's mean (summed in f64) and `1 / √(mean((x − μ)²) + ε)`, the squares summed in f64.
#[inline(always)]
fn mean_and_inv_std(x: &[f32], eps: f32) -> (f32, f32) {
    let mean = sum_f64(x, |v| v) / x.len() as f64;
    let var = (sum_f64(x, |v| (v - mean) * (v - mean)) / x.len() as f64) as f32;
    (mean as f32, 1.0 / (var + eps).sqrt())
}

/// The norm's forward on the host: `x [rows, d]`, `w [d]` → `[rows, d]`. RMSNorm is the
/// inference path's loop ([`crate::fused::rms_norm`]).
pub fn norm_host(x: &[f32], w: &[f32], spec: NormSpec) -> Vec<f32> {
    if !spec.centred {
        return crate::fused::rms_norm(x, w, spec.eps);
    }
    let d = w.len();
    assert!(d > 0 && x.len().is_multiple_of(d), "whole rows of {d}");
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(d * ROWS_PER_PARTIAL)
        .zip(x.par_chunks(d * ROWS_PER_PARTIAL))
        .for_each(|(y, x)| {
            wide(
                #[inline(always)]
                || {
                    for (y, x) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                        let (mean, r) = mean_and_inv_std(x, spec.eps);
                        for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                            *y = ((x - mean) * r) * w;
                        }
                    }
                },
            )
        });
    y
}

/// Rows per task of the backward's weight-gradient partial sums: fixed, so `dw` is summed in
/// the same order on any thread count.
const ROWS_PER_PARTIAL: usize = 32;

/// The norm's backward on the host: `x`, `dy` `[rows, d]`, `w [d]` → `(dx, dw)`. With
/// `x̂ = (x − μ) r` and `g = dy ⊙ w`: `dx = r (g − mean(g) − x̂ · mean(g ⊙ x̂))` (no `mean(g)`
/// for RMSNorm, where `μ = 0`) and `dw = Σ_rows dy ⊙ x̂`.
pub fn norm_backward_host(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    spec: NormSpec,
) -> (Vec<f32>, Vec<f32>) {
    if spec.centred {
        norm_backward_rows::<true>(x, w, dy, spec.eps)
    } else {
        norm_backward_rows::<false>(x, w, dy, spec.eps)
    }
}

fn norm_backward_rows<const CENTRED: bool>(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    assert!(
        d > 0 && x.len().is_multiple_of(d) && dy.len() == x.len(),
        "whole rows of {d}"
    );
    let mut dx = vec![0f32; x.len()];
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(d * ROWS_PER_PARTIAL)
        .zip(x.par_chunks(d * ROWS_PER_PARTIAL))
        .zip(dy.par_chunks(d * ROWS_PER_PARTIAL))
        .map(|((dx, x), dy)| {
            wide(
                #[inline(always)]
                || {
                    let mut dw = vec![0f32; d];
                    for ((dx, x), dy) in dx
                        .chunks_exact_mut(d)
                        .zip(x.chunks_exact(d))
                        .zip(dy.chunks_exact(d))
                    {
                        let (mu, r) = if CENTRED {
                            mean_and_inv_std(x, eps)
                        } else {
                            (0.0, inv_rms(x, eps))
                        };
                        let mut dot = [0f64; 8];
                        let mut sum_g = [0f64; 8];
                        let mut add = |l: usize, x: f32, dy: f32, w: f32| {
                            let xhat = if CENTRED { (x - mu) * r } else { x * r };
                            dot[l] += ((dy * w) * xhat) as f64;
                            if CENTRED {
                                sum_g[l] += (dy * w) as f64;
                            }
                        };
                        // Blocks of 8 through fixed-size arrays, then the tail: with the lane
                        // as `j % 8` over the whole row, the loop compiled to scalar code.
                        let ((xb, xt), (db, dt), (wb, wt)) =
                            (x.as_chunks::<8>(), dy.as_chunks::<8>(), w.as_chunks::<8>());
                        for ((x, dy), w) in xb.iter().zip(db).zip(wb) {
                            for l in 0..8 {
                                add(l, x[l], dy[l], w[l]);
                            }
                        }
                        for (l, ((&x, &dy), &w)) in xt.iter().zip(dt).zip(wt).enumerate() {
                            add(l, x, dy, w);
                        }
                        let mean = (dot.iter().sum::<f64>() / d as f64) as f32;
                        let mean_g = (sum_g.iter().sum::<f64>() / d as f64) as f32;
                        for ((((dx, &x), &dy), &w), dw) in
                            dx.iter_mut().zip(x).zip(dy).zip(w).zip(dw.iter_mut())
                        {
                            if CENTRED {
                                let xhat = (x - mu) * r;
                                *dx = r * (dy * w - mean_g - xhat * mean);
                                *dw += dy * xhat;
                            } else {
                                let xhat = x * r;
                                *dx = r * (dy * w - xhat * mean);
                                *dw += dy * xhat;
                            }
                        }
                    }
                    dw
                },
            )
        })
        .collect();
    let mut dw = vec![0f32; d];
    for p in partials {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
    (dx, dw)
}

// ---------------------------------------------------------------------------------------------
// Gated activations (SwiGLU, GeGLU)

/// `act(gate) ⊙ up`, both `[rows, ffn]`, differentiable in both ([`GluActivation`]).
pub fn glu<B: KernelBackend>(
    gate: Tensor<Autodiff<B>, 2>,
    up: Tensor<Autodiff<B>, 2>,
    act: GluActivation,
) -> Tensor<Autodiff<B>, 2> {
    #[derive(Debug)]
    struct GluBackward(GluActivation);

    impl<B: KernelBackend> Backward<B, 2> for GluBackward {
        type State = (FloatTensor<B>, FloatTensor<B>);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let dy = grads.consume::<B>(&ops.node);
            let (g, u) = ops.state;
            let (dg, du) = B::glu_backward(g, u, dy, self.0);
            register!(ops, grads, [dg, du]);
        }
    }

    let (g, u) = (gate.into_primitive().tensor(), up.into_primitive().tensor());
    let nodes = [g.node.clone(), u.node.clone()];
    let out = match GluBackward(act)
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let y = B::glu(g.primitive.clone(), u.primitive.clone(), act);
            prep.finish((g.primitive, u.primitive), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(B::glu(g.primitive, u.primitive, act)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// The gated activation's forward in tensor ops, each activation as transformers writes it.
pub fn glu_reference<B: Backend>(
    gate: Tensor<B, 2>,
    up: Tensor<B, 2>,
    act: GluActivation,
) -> Tensor<B, 2> {
    match act {
        GluActivation::Silu => burn::tensor::activation::silu(gate) * up,
        GluActivation::GeluTanh => {
            let inner = (gate.clone() + gate.clone().powf_scalar(3.0).mul_scalar(0.044715))
                .mul_scalar((2.0 / std::f64::consts::PI).sqrt());
            gate.mul_scalar(0.5) * inner.tanh().add_scalar(1.0) * up
        }
    }
}

/// The gated activation's backward in tensor ops: `(d gate, d up)`. For the tanh GELU, with
/// `t = tanh(u)`: `act'(a) = ½(1 + t) + ½ a (1 − t²) u'(a)`.
pub fn glu_backward_reference<B: Backend>(
    gate: Tensor<B, 2>,
    up: Tensor<B, 2>,
    dy: Tensor<B, 2>,
    act: GluActivation,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    match act {
        // As the SwiGLU op had it, so the backends that run this keep their bits.
        GluActivation::Silu => {
            let s = burn::tensor::activation::sigmoid(gate.clone());
            let d_up = dy.clone() * burn::tensor::activation::silu(gate.clone());
            let ds = (s.clone().neg() + 1.0) * gate + 1.0;
            (dy * up * s * ds, d_up)
        }
        GluActivation::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let a2 = gate.clone().powf_scalar(2.0);
            let t = (gate.clone() * (a2.clone().mul_scalar(0.044715) + 1.0))
                .mul_scalar(c)
                .tanh();
            // u'(a), u = √(2/π)(a + 0.044715 a³).
            let du_da = (a2.mul_scalar(3.0 * 0.044715) + 1.0).mul_scalar(c);
            let value = gate.clone().mul_scalar(0.5) * t.clone().add_scalar(1.0);
            let slope = t.clone().add_scalar(1.0).mul_scalar(0.5)
                + gate.mul_scalar(0.5) * (t.clone() * t).neg().add_scalar(1.0) * du_da;
            (dy.clone() * up * slope, dy * value)
        }
    }
}

/// Elements per task of the elementwise host loops.
const ELEMENTS_PER_TASK: usize = 1 << 14;

/// The gated activation's backward on the host: `gate`, `up`, `dy` `[n]` → `(d gate, d up)`.
/// With `s = σ(z(a))` (see [`GluActivation`]): `d up = dy · a s` and
/// `d gate = dy · u · s (1 + a (1 − s) z'(a))`.
pub fn glu_backward_host(
    gate: &[f32],
    up: &[f32],
    dy: &[f32],
    act: GluActivation,
) -> (Vec<f32>, Vec<f32>) {
    // One loop per activation, so each vectorizes with its `z` inlined.
    match act {
        GluActivation::Silu => glu_backward_with(gate, up, dy, |a| a, |_| 1.0),
        GluActivation::GeluTanh => glu_backward_with(
            gate,
            up,
            dy,
            crate::fused::gelu_tanh_z,
            crate::fused::gelu_tanh_dz,
        ),
    }
}

fn glu_backward_with(
    gate: &[f32],
    up: &[f32],
    dy: &[f32],
    z: impl Fn(f32) -> f32 + Copy + Sync,
    dz: impl Fn(f32) -> f32 + Copy + Sync,
) -> (Vec<f32>, Vec<f32>) {
    assert!(
        gate.len() == up.len() && up.len() == dy.len(),
        "gate, up and dy lengths"
    );
    let (mut dg, mut du) = (vec![0f32; gate.len()], vec![0f32; gate.len()]);
    dg.par_chunks_mut(ELEMENTS_PER_TASK)
        .zip(du.par_chunks_mut(ELEMENTS_PER_TASK))
        .zip(
            gate.par_chunks(ELEMENTS_PER_TASK)
                .zip(up.par_chunks(ELEMENTS_PER_TASK))
                .zip(dy.par_chunks(ELEMENTS_PER_TASK)),
        )
        .for_each(|((dg, du), ((g, u), dy))| {
            wide(
                #[inline(always)]
                || {
                    for ((dg, du), ((&g, &u), &dy)) in
                        dg.iter_mut().zip(du).zip(g.iter().zip(u).zip(dy))
                    {
                        let s = 1.0 / (1.0 + exp_f32(-z(g)));
                        *du = dy * (g * s);
                        *dg = dy * u * s * (1.0 + g * (1.0 - s) * dz(g));
                    }
                },
            )
        });
    (dg, du)
}

// ---------------------------------------------------------------------------------------------
// The embedding lookup

/// The rows `ids [n]` of `weight [vocab, d]` → `[n, d]`, differentiable in `weight` through
/// [`KernelBackend::embedding_backward_into`], which adds the rows' gradients into the gradient
/// registered so far for `weight`: a tied output head's, where the head reads the weight directly
/// (autodiff runs steps deepest first, and the lookup is as shallow as the weight's other reads).
/// Autodiff's own lookup builds a dense `[vocab, d]` of zeros with the rows instead, then sums it
/// with the head's. Either order gives the same sum; only the in-place saving needs this one.
pub fn embedding<B: KernelBackend>(
    weight: Tensor<Autodiff<B>, 2>,
    ids: Tensor<Autodiff<B>, 1, Int>,
) -> Tensor<Autodiff<B>, 2> {
    #[derive(Debug)]
    struct EmbeddingBackward;

    impl<B: KernelBackend> Backward<B, 1> for EmbeddingBackward {
        /// The ids, and the vocabulary (the weight's rows).
        type State = (IntTensor<B>, usize);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let dy = grads.consume::<B>(&ops.node);
            let (ids, vocab) = ops.state;
            let [parent] = ops.parents;
            if let Some(node) = parent {
                let base = grads.take::<B>(node.id);
                grads.register::<B>(node.id, B::embedding_backward_into(base, vocab, ids, dy));
            }
        }
    }

    let vocab = weight.dims()[0];
    let weight = weight.into_primitive().tensor();
    let ids = ids.into_primitive();
    let out = match EmbeddingBackward
        .prepare::<NoCheckpointing>([weight.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let rows = B::float_select(weight.primitive, 0, ids.clone());
            prep.finish((ids, vocab), rows)
        }
        OpsKind::UnTracked(prep) => prep.finish(B::float_select(weight.primitive, 0, ids)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// [`KernelBackend::embedding_backward_into`] in tensor ops, autodiff's own way: the rows
/// `dy [n, d]` added into a `[vocab, d]` of zeros at `ids` in order, then `base` (where given)
/// added to that.
pub fn embedding_backward_reference<B: Backend>(
    base: Option<FloatTensor<B>>,
    vocab: usize,
    ids: IntTensor<B>,
    dy: FloatTensor<B>,
) -> FloatTensor<B> {
    let d = dy.shape()[1];
    let zeros = B::float_zeros([vocab, d].into(), &B::float_device(&dy), dy.dtype().into());
    let rows = B::float_select_add(zeros, 0, ids, dy);
    match base {
        Some(base) => B::float_add(rows, base),
        None => rows,
    }
}

/// [`embedding_backward_reference`] on the host, in place in `out [vocab, d]` (the registered
/// gradient, or zeros): per id, its rows of `dy [n, d]` summed from zero in their order, then
/// added to its row of `out`, the very sums and order of the reference, so the same bits (but for
/// a `-0.0` in a row no id reads, which the reference's `0 + out` turns to `+0.0`: a product's
/// gradient never holds one).
///
/// # Panics
/// Where the lengths are not `vocab × d` and `n × d`, or an id is not below `vocab`.
pub fn embedding_backward_host(out: &mut [f32], d: usize, ids: &[i64], dy: &[f32]) {
    assert!(
        d > 0 && out.len().is_multiple_of(d) && dy.len() == ids.len() * d,
        "embedding: gradient of {} and rows of {} for {} ids of width {d}",
        out.len(),
        dy.len(),
        ids.len()
    );
    let vocab = out.len() / d;
    // Positions grouped by id, each group in its order (a stable sort).
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&j| ids[j]);
    let mut acc = vec![0f32; d];
    for group in order.chunk_by(|&x, &y| ids[x] == ids[y]) {
        let id = ids[group[0]];
        assert!(
            (0..vocab as i64).contains(&id),
            "embedding: token id {id} is outside the vocabulary of {vocab}"
        );
        acc.fill(0.0);
        for &j in group {
            for (a, &g) in acc.iter_mut().zip(&dy[j * d..(j + 1) * d]) {
                *a += g;
            }
        }
        let row = &mut out[id as usize * d..(id as usize + 1) * d];
        for (o, &a) in row.iter_mut().zip(&acc) {
            *o += a;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE

/// Rotary embedding (Hugging Face's `rotate_half` pairs `(i, i + d/2)`) of `x [rows, heads, d]`
/// by `cos`/`sin` tables `[positions, d]` (each half repeated; row `i` takes table row
/// `i % positions`), differentiable in `x`.
pub fn rope<B: KernelBackend>(
    x: Tensor<Autodiff<B>, 3>,
    cos: &[f32],
    sin: &[f32],
) -> Tensor<Autodiff<B>, 3> {
    #[derive(Debug)]
    struct RopeBackward;

    impl<B: KernelBackend> Backward<B, 1> for RopeBackward {
        type State = (std::sync::Arc<[f32]>, std::sync::Arc<[f32]>);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let dy = grads.consume::<B>(&ops.node);
            let (cos, neg_sin) = ops.state;
            register!(ops, grads, [B::rope(dy, &cos, &neg_sin)]);
        }
    }

    let x = x.into_primitive().tensor();
    let nodes = [x.node.clone()];
    let out = match RopeBackward
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let y = B::rope(x.primitive, cos, sin);
            let neg_sin: std::sync::Arc<[f32]> = sin.iter().map(|s| -s).collect();
            prep.finish((cos.into(), neg_sin), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(B::rope(x.primitive, cos, sin)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// RoPE in tensor ops, `x [rows, heads, d]`, tables `[positions, d]` with `rows` a multiple of
/// `positions`.
pub fn rope_reference<B: Backend>(x: Tensor<B, 3>, cos: &[f32], sin: &[f32]) -> Tensor<B, 3> {
    let [rows, heads, d] = x.dims();
    let positions = cos.len() / d;
    let device = x.device();
    let table = |t: &[f32]| {
        Tensor::<B, 2>::from_data(TensorData::new(t.to_vec(), [positions, d]), &device)
            .reshape([1, positions, 1, d])
            .repeat_dim(0, rows / positions)
            .repeat_dim(2, heads)
            .reshape([rows, heads, d])
    };
    let half = d / 2;
    let rotated = Tensor::cat(
        vec![
            x.clone().slice([0..rows, 0..heads, half..d]).neg(),
            x.clone().slice([0..rows, 0..heads, 0..half]),
        ],
        2,
    );
    x * table(cos) + rotated * table(sin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    type A = Autodiff<Flex>;

    fn values<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
    }

    /// The largest difference relative to the largest magnitude of `want`.
    fn rel(got: &[f32], want: &[f32]) -> f32 {
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
        got.iter()
            .zip(want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale
    }

    fn random<const D: usize>(shape: [usize; D], seed: u64) -> Tensor<Flex, D> {
        Flex::seed(&Default::default(), seed);
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
    }

    /// `f`'s output and the gradients of `Σ output ⊙ weights` with respect to `inputs`, through
    /// autodiff on Flex.
    fn grads<const D: usize, const O: usize>(
        inputs: &[Tensor<Flex, D>],
        f: impl Fn(Vec<Tensor<A, D>>) -> Tensor<A, O>,
        weights: &Tensor<Flex, O>,
    ) -> (Vec<f32>, Vec<Vec<f32>>) {
        let tracked: Vec<Tensor<A, D>> = inputs
            .iter()
            .map(|t| Tensor::from_inner(t.clone()).require_grad())
            .collect();
        let out = f(tracked.clone());
        let y = values(out.clone().inner());
        let g = (out * Tensor::from_inner(weights.clone())).sum().backward();
        let gs = tracked
            .iter()
            .map(|t| values(t.grad(&g).expect("a gradient")))
            .collect();
        (y, gs)
    }

    #[test]
    fn the_product_and_its_gradients_equal_autodiffs() {
        // Odd sizes on both sides of the threading threshold, and a transposed operand (the
        // tied head reads the embedding that way).
        for (m, k, n) in [(7, 5, 3), (213, 97, 301), (300, 200, 193)] {
            let (a, b) = (random([m, k], 1), random([k, n], 2));
            let bt = random([n, k], 3);
            let w = random([m, n], 4);
            let (y, g) = grads(
                &[a.clone(), b.clone()],
                |t| matmul(t[0].clone(), t[1].clone()),
                &w,
            );
            let (yr, gr) = grads(&[a.clone(), b], |t| t[0].clone().matmul(t[1].clone()), &w);
            assert!(rel(&y, &yr) <= 1e-5, "{m}x{k}x{n} product");
            for (g, gr) in g.iter().zip(&gr) {
                assert!(rel(g, gr) <= 1e-5, "{m}x{k}x{n} gradient {}", rel(g, gr));
            }
            let (_, gr) = grads(
                &[a.clone(), bt.clone()],
                |t| t[0].clone().matmul(t[1].clone().transpose()),
                &w,
            );
            let (_, g) = grads(
                &[a.clone(), bt.clone()],
                |t| matmul(t[0].clone(), t[1].clone().transpose()),
                &w,
            );
            for (g, gr) in g.iter().zip(&gr) {
                assert!(rel(g, gr) <= 1e-5, "{m}x{k}x{n} of a view: {}", rel(g, gr));
            }
            let (_, g) = grads(
                &[a, bt],
                |t| matmul_transposed(t[0].clone(), t[1].clone()),
                &w,
            );
            for (g, gr) in g.iter().zip(&gr) {
                assert!(rel(g, gr) <= 1e-5, "{m}x{k}x{n} transposed: {}", rel(g, gr));
            }
        }
    }

    #[test]
    fn norms_and_their_gradients_equal_autodiffs() {
        for centred in [false, true] {
            let spec = NormSpec { eps: 1e-5, centred };
            for (rows, d) in [(1, 5), (37, 24), (70, 576)] {
                // An offset, so LayerNorm's mean matters.
                let x = random([rows, d], 5) * 3.0 + 0.7;
                let w = random([d], 6).unsqueeze_dim::<2>(0);
                let wt = random([rows, d], 7);
                let f =
                    |t: Vec<Tensor<A, 2>>| norm(t[0].clone(), t[1].clone().squeeze_dim(0), spec);
                let r = |t: Vec<Tensor<A, 2>>| {
                    norm_reference(t[0].clone(), t[1].clone().squeeze_dim(0), spec)
                };
                let (y, g) = grads(&[x.clone(), w.clone()], f, &wt);
                let (yr, gr) = grads(&[x.clone(), w.clone()], r, &wt);
                let at = format!("{spec:?} {rows}x{d}");
                assert!(rel(&y, &yr) <= 1e-6, "{at}: {}", rel(&y, &yr));
                // The fused backward (Flex's host loop) and the tensor-op one other backends run.
                let (dx, dw) = norm_backward_reference(x, w.squeeze_dim(0), wt, spec);
                let reference = [(values(dx), &gr[0]), (values(dw), &gr[1])];
                for (g, gr) in g
                    .iter()
                    .zip(&gr)
                    .chain(reference.iter().map(|(g, gr)| (g, *gr)))
                {
                    assert!(rel(g, gr) <= 1e-5, "{at}: {}", rel(g, gr));
                }
            }
        }
    }

    /// The lookup's gradient added into a tied head's gives autodiff's own bits: per id, its
    /// rows summed from zero in order, then the head's added. Ids repeat (one 11 times), some
    /// rows are never read, and the lookup runs alone and under a head.
    #[test]
    fn the_embedding_gradient_equals_autodiffs_bit_for_bit() {
        let (vocab, d, rows) = (37, 24, 19);
        let ids: Vec<i64> = (0..50)
            .map(|j: i64| if j % 5 == 0 { 3 } else { (j * 7) % 31 })
            .collect();
        let n = ids.len();
        let weight = random([vocab, d], 11) * 0.1;
        let hidden = random([rows, d], 12);
        let (w_rows, w_head) = (random([n, d], 13), random([rows, vocab], 14));
        let device = Default::default();
        for tied in [false, true] {
            let gradient = |fused: bool| {
                let w = Tensor::<A, 2>::from_inner(weight.clone()).require_grad();
                let ids_t =
                    Tensor::<A, 1, Int>::from_data(TensorData::new(ids.clone(), [n]), &device);
                let looked_up = if fused {
                    embedding(w.clone(), ids_t)
                } else {
                    w.clone().select(0, ids_t)
                };
                let mut loss = (looked_up.clone() * Tensor::from_inner(w_rows.clone())).sum();
                if tied {
                    // The head as the decoder's tied head multiplies: its gradient comes out in
                    // the weight's layout, a fresh tensor the lookup then adds into in place.
                    let logits =
                        matmul_transposed(Tensor::<A, 2>::from_inner(hidden.clone()), w.clone());
                    loss = loss + (logits * Tensor::from_inner(w_head.clone())).sum();
                }
                let grads = loss.backward();
                (
                    values(looked_up.inner()),
                    values(w.grad(&grads).expect("a gradient")),
                )
            };
            let ((y, g), (yr, gr)) = (gradient(true), gradient(false));
            assert_eq!(y, yr, "the lookup (tied head: {tied})");
            let same = g.iter().zip(&gr).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "the weight's gradient (tied head: {tied}) differs from autodiff's"
            );
        }
        // The tensor-op version (what the other backends run) against the host one.
        let ids_t = || {
            Tensor::<Flex, 1, Int>::from_data(TensorData::new(ids.clone(), [n]), &device)
                .into_primitive()
        };
        let prim = |t: &Tensor<Flex, 2>| t.clone().into_primitive().tensor();
        for with_base in [false, true] {
            // A base of its own for each, so the host adds into it in place.
            let base = || with_base.then(|| random([vocab, d], 15).into_primitive().tensor());
            let reference =
                embedding_backward_reference::<Flex>(base(), vocab, ids_t(), prim(&w_rows));
            let host = Flex::embedding_backward_into(base(), vocab, ids_t(), prim(&w_rows));
            let (r, h) = (
                values(Tensor::<Flex, 2>::from_primitive(TensorPrimitive::Float(
                    reference,
                ))),
                values(Tensor::<Flex, 2>::from_primitive(TensorPrimitive::Float(
                    host,
                ))),
            );
            let same = r.iter().zip(&h).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "tensor ops and host differ (base: {with_base})");
        }
    }

    /// A row whose mean is a hundred times its spread (a residual stream with a massive
    /// activation): LayerNorm's host forward against the definition in f64, within what f32
    /// inputs of that size allow.
    #[test]
    fn layer_norm_of_rows_with_a_large_mean_matches_the_definition() {
        let d = 96;
        let x: Vec<f32> = (0..3 * d)
            .map(|i| 100.0 + ((i * 7919 % 193) as f32 / 96.0 - 1.0))
            .collect();
        let w: Vec<f32> = (0..d).map(|j| 0.5 + j as f32 / d as f32).collect();
        let spec = NormSpec {
            eps: 1e-5,
            centred: true,
        };
        let got = norm_host(&x, &w, spec);
        for (row, got) in x.chunks(d).zip(got.chunks(d)) {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
            let r = 1.0 / (var + 1e-5).sqrt();
            for ((&v, &g), &w) in row.iter().zip(got).zip(&w) {
                let want = (v as f64 - mean) * r * w as f64;
                assert!((g as f64 - want).abs() <= 2e-5, "{g} against {want}");
            }
        }
    }

    #[test]
    fn gated_activations_and_their_gradients_equal_autodiffs() {
        // Gates to about ±13: the tanh GELU's tails (σ of large |z|, `exp_f32`'s overflow)
        // included.
        let (gate, up) = (random([37, 45], 8) * 4.0, random([37, 45], 9));
        let w = random([37, 45], 10);
        for act in [GluActivation::Silu, GluActivation::GeluTanh] {
            let (y, g) = grads(
                &[gate.clone(), up.clone()],
                |t| glu(t[0].clone(), t[1].clone(), act),
                &w,
            );
            let (yr, gr) = grads(
                &[gate.clone(), up.clone()],
                |t| glu_reference(t[0].clone(), t[1].clone(), act),
                &w,
            );
            assert!(rel(&y, &yr) <= 1e-6, "{act:?}: {}", rel(&y, &yr));
            // The fused backward (Flex's host loop) and the tensor-op one other backends run.
            let (dg, du) = glu_backward_reference(gate.clone(), up.clone(), w.clone(), act);
            for (g, gr) in g
                .iter()
                .zip(&gr)
                .chain([(&values(dg), &gr[0]), (&values(du), &gr[1])])
            {
                assert!(rel(g, gr) <= 1e-5, "{act:?}: {}", rel(g, gr));
            }
        }
    }

    #[test]
    fn rope_and_its_gradient_equal_autodiffs() {
        // 2 sequences of 5 positions, 3 heads of 6.
        let (positions, heads, d) = (5, 3, 6);
        let mut cos = Vec::new();
        let mut sin = Vec::new();
        for p in 0..positions {
            let angles: Vec<f32> = (0..d / 2)
                .map(|i| p as f32 * 0.3f32.powi(i as i32))
                .collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        let x = random([2 * positions, heads, d], 11);
        let w = random([2 * positions, heads, d], 12);
        let (y, g) = grads(
            std::slice::from_ref(&x),
            |t| rope(t[0].clone(), &cos, &sin),
            &w,
        );
        let (yr, gr) = grads(&[x], |t| rope_reference(t[0].clone(), &cos, &sin), &w);
        assert!(rel(&y, &yr) <= 1e-6);
        assert!(rel(&g[0], &gr[0]) <= 1e-5, "{}", rel(&g[0], &gr[0]));
    }
}
