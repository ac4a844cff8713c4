//! The CPU decoder's fast path. When the backend is Flex itself (a forward without autodiff:
//! evaluate, calibrate, the teacher in distill, validation) and matmuls run in f32, RMSNorm (with
//! the residual add before it), SwiGLU, RoPE and the whole causal attention run as the fused host
//! loops of `distillery_kernels::fused` instead of chains of tensor ops with a temporary per step,
//! and matmuls call the `gemm` crate into outputs of their own. Under the training backend
//! (autodiff over the runtime's backend) in f32, the products, the norms (RMSNorm, LayerNorm),
//! SwiGLU and GeGLU, RoPE, the attention and the cross-entropy are `distillery_kernels`' autodiff
//! ops with backward passes of their own (`trained_*`; RoPE on the CPU only), which the CPU runs
//! as host loops and every other backend as tensor ops (the attention: CubeCL kernels); the
//! attention's keeps no `[seq, seq]` tensor per head for the backward. Everything else, and
//! everything with the fast path off (`DISTILLERY_UNFUSED=1`), takes the tensor-op path, the
//! reference the tests hold these to.

use std::any::{Any, TypeId};
use std::sync::atomic::{AtomicU8, Ordering};

use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Int, Tensor, TensorData, TensorPrimitive};
use distillery_kernels::fused::GluActivation;
use distillery_kernels::training::NormSpec;

type FlexPrimitive = FloatTensor<Flex>;

/// Off with `DISTILLERY_UNFUSED=1` or [`set_enabled`]: benchmarks time both paths in one run.
static ENABLED: AtomicU8 = AtomicU8::new(UNSET);
const UNSET: u8 = 2;

/// Turns the fast path on or off for the whole process.
pub fn set_enabled(on: bool) {
    ENABLED.store(on as u8, Ordering::Relaxed);
}

pub(crate) fn enabled() -> bool {
    match ENABLED.load(Ordering::Relaxed) {
        UNSET => {
            let on = std::env::var("DISTILLERY_UNFUSED").map_or(true, |v| v.is_empty() || v == "0");
            set_enabled(on);
            on
        }
        v => v == 1,
    }
}

/// Whether `B` is Flex without autodiff and the fast path is on.
pub fn is_flex<B: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<Flex>() && enabled()
}

/// `value` as the type it is known to be (`B`'s primitive as Flex's or back, with `B` = Flex).
fn same_type<From: 'static, To: 'static>(value: From) -> To {
    let any: Box<dyn Any> = Box::new(value);
    *any.downcast::<To>().expect("checked by is_flex")
}

/// The Flex primitive inside a `Tensor<B, D>` with `B` = Flex.
fn primitive<B: Backend, const D: usize>(t: Tensor<B, D>) -> FlexPrimitive {
    same_type(t.into_primitive().tensor())
}

/// Runs `f` on the f32 values of `t`, read in place when contiguous.
fn with_values<R>(t: &FlexPrimitive, f: impl FnOnce(&[f32]) -> R) -> R {
    match t.as_slice::<f32>() {
        Some(values) => f(values),
        None => {
            let copy = Tensor::<Flex, 1>::from_primitive(TensorPrimitive::Float(t.clone()))
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .expect("f32 data");
            f(&copy)
        }
    }
}

/// A `Tensor<B, D>` (with `B` = Flex) holding `values`.
fn tensor<B: Backend, const D: usize>(values: Vec<f32>, shape: [usize; D]) -> Tensor<B, D> {
    let t = Tensor::<Flex, D>::from_data(TensorData::new(values, shape), &Default::default());
    let primitive: FloatTensor<B> = same_type(t.into_primitive().tensor());
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

fn f32_flex<B: Backend, const D: usize>(t: &Tensor<B, D>) -> bool {
    is_flex::<B>() && t.dtype() == DType::F32
}

/// `x [batch, seq, d]` normalized by `w [d]`; `Err(x)` back when the fast path does not apply.
pub fn rms_norm<B: Backend>(
    x: Tensor<B, 3>,
    w: &Tensor<B, 1>,
    eps: f64,
) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
    if !f32_flex(&x) || !f32_flex(w) {
        return Err(x);
    }
    let shape = x.dims();
    let (x, w) = (primitive(x), primitive(w.clone()));
    let out = with_values(&x, |x| {
        with_values(&w, |w| {
            distillery_kernels::fused::rms_norm(x, w, eps as f32)
        })
    });
    Ok(tensor(out, shape))
}

/// `h = x + delta` and RMSNorm(`h`) by `w` in one pass, both `[batch, seq, d]`; `Err` hands `x`
/// and `delta` back.
#[allow(clippy::type_complexity)]
pub fn add_rms_norm<B: Backend>(
    x: Tensor<B, 3>,
    delta: Tensor<B, 3>,
    w: &Tensor<B, 1>,
    eps: f64,
) -> Result<(Tensor<B, 3>, Tensor<B, 3>), (Tensor<B, 3>, Tensor<B, 3>)> {
    if !f32_flex(&x) || !f32_flex(&delta) || !f32_flex(w) || x.dims() != delta.dims() {
        return Err((x, delta));
    }
    let shape = x.dims();
    let (x, delta, w) = (primitive(x), primitive(delta), primitive(w.clone()));
    let (h, out) = with_values(&x, |x| {
        with_values(&delta, |delta| {
            with_values(&w, |w| {
                distillery_kernels::fused::add_rms_norm(x, delta, w, eps as f32)
            })
        })
    });
    Ok((tensor(h, shape), tensor(out, shape)))
}

/// `silu(gate) * up`, both `[batch, seq, ffn]`; `Err` hands both back.
#[allow(clippy::type_complexity)]
pub fn swiglu<B: Backend>(
    gate: Tensor<B, 3>,
    up: Tensor<B, 3>,
) -> Result<Tensor<B, 3>, (Tensor<B, 3>, Tensor<B, 3>)> {
    if !f32_flex(&gate) || !f32_flex(&up) {
        return Err((gate, up));
    }
    let shape = gate.dims();
    let (g, u) = (primitive(gate), primitive(up));
    let out = with_values(&g, |g| {
        with_values(&u, |u| {
            distillery_kernels::fused::glu(g, u, GluActivation::Silu)
        })
    });
    Ok(tensor(out, shape))
}

/// RoPE on `x [batch, seq, heads, head_dim]` with `cos`/`sin` tables `[seq, head_dim]`.
pub fn rope<B: Backend>(
    x: Tensor<B, 4>,
    cos: &[f32],
    sin: &[f32],
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    if !f32_flex(&x) {
        return Err(x);
    }
    let shape = x.dims();
    let [_, _, heads, d] = shape;
    let x = primitive(x);
    let out = with_values(&x, |x| {
        distillery_kernels::fused::rope(x, cos, sin, heads, d)
    });
    Ok(tensor(out, shape))
}

/// `softmax(scores * scale + bias)` over the last dimension: `scores [batch, groups, rows, cols]`,
/// `bias` `[1, 1, rows, cols]` or `scores`' shape.
pub fn attention_probs<B: Backend>(
    scores: Tensor<B, 4>,
    scale: f32,
    bias: &Tensor<B, 4>,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    if !f32_flex(&scores) || !f32_flex(bias) {
        return Err(scores);
    }
    let shape = scores.dims();
    let (x, b) = (primitive(scores), primitive(bias.clone()));
    let out = with_values(&x, |x| {
        with_values(&b, |b| {
            distillery_kernels::fused::softmax_scaled_biased(x, scale, b, shape[3])
        })
    });
    Ok(tensor(out, shape))
}

/// Causal attention on `q [batch, seq, heads, head_dim]` (after RoPE) and `k`/`v` `[batch, seq,
/// kv_heads, head_dim]` with `distillery_kernels::fused::causal_attention`: the context `[batch,
/// seq, heads, head_dim]`; `Err` hands all three back.
#[allow(clippy::type_complexity)]
pub fn causal_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    window: Option<usize>,
    scale: f32,
) -> Result<Tensor<B, 4>, (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>)> {
    if !f32_flex(&q) || !f32_flex(&k) || !f32_flex(&v) {
        return Err((q, k, v));
    }
    let shape = q.dims();
    let [batch, seq, heads, head_dim] = shape;
    let kv_heads = k.dims()[2];
    let attention = distillery_kernels::fused::AttentionShape {
        batch,
        seq,
        heads,
        kv_heads,
        head_dim,
        window,
    };
    let (q, k, v) = (primitive(q), primitive(k), primitive(v));
    let out = with_values(&q, |q| {
        with_values(&k, |k| {
            with_values(&v, |v| {
                distillery_kernels::fused::causal_attention(q, k, v, attention, scale)
            })
        })
    });
    Ok(tensor(out, shape))
}

/// The kernels' description of an attention of queries `[batch, seq, heads, head_dim]` over
/// `kv_heads` key/value heads.
fn attention_spec(
    [batch, seq, heads, head_dim]: [usize; 4],
    kv_heads: usize,
    window: Option<usize>,
    scale: f32,
    softcap: Option<f32>,
) -> distillery_kernels::attention::AttentionSpec {
    distillery_kernels::attention::AttentionSpec {
        shape: distillery_kernels::fused::AttentionShape {
            batch,
            seq,
            heads,
            kv_heads,
            head_dim,
            window,
        },
        scale,
        softcap,
    }
}

/// Causal attention without a graph on a GPU build's backend (CUDA, wgpu), through its attention
/// kernel, when the tensor-op attention's score matrices `[batch, heads, seq, seq]` would pass
/// 1 GiB per layer (a frozen teacher's forward at a long sequence): the kernel keeps none.
/// Shorter sequences keep the tensor ops, which multiply in the compute dtype as transformers
/// does; the kernel computes its scores in f32. `Err` hands q, k, v back where it does not apply
/// (the CPU, which has its own fused forward, the training backend, short sequences).
#[allow(clippy::type_complexity)]
pub fn long_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    window: Option<usize>,
    scale: f32,
    softcap: Option<f32>,
) -> Result<Tensor<B, 4>, (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>)> {
    type Runtime = crate::runtime::Backend;
    let [batch, seq, heads, _] = q.dims();
    let scores = (batch * heads) as f64 * (seq * seq) as f64 * 4.0;
    let f32s = [&q, &k, &v].iter().all(|t| t.dtype() == DType::F32);
    if !cfg!(any(feature = "cuda", feature = "wgpu"))
        || TypeId::of::<B>() != TypeId::of::<Runtime>()
        || scores <= (1u64 << 30) as f64
        || !f32s
        || !enabled()
    {
        return Err((q, k, v));
    }
    let spec = attention_spec(q.dims(), k.dims()[2], window, scale, softcap);
    let prim = |t: Tensor<B, 4>| -> FloatTensor<Runtime> { same_type(t.into_primitive().tensor()) };
    let (out, _) = <Runtime as distillery_kernels::KernelBackend>::attention_forward(
        prim(q),
        prim(k),
        prim(v),
        spec,
        false,
    );
    Ok(Tensor::from_primitive(TensorPrimitive::Float(same_type(
        out,
    ))))
}

/// Causal attention under the training backend (autodiff over the runtime's backend) in f32:
/// `distillery_kernels::attention::causal_attention`, whose backward recomputes the
/// probabilities from q, k, v and the saved log-sum-exp. `q [batch, seq, heads, head_dim]`
/// (after RoPE), `k`/`v` `[batch, seq, kv_heads, head_dim]` → the context `[batch, seq, heads,
/// head_dim]`; `Err` hands all three back for another backend or dtype, or with the fast path
/// off (`DISTILLERY_UNFUSED=1`).
#[allow(clippy::type_complexity)]
pub fn trained_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    window: Option<usize>,
    scale: f32,
    softcap: Option<f32>,
) -> Result<Tensor<B, 4>, (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>)> {
    if !f32_train::<B>(&[q.dtype(), k.dtype(), v.dtype()]) {
        return Err((q, k, v));
    }
    let spec = attention_spec(q.dims(), k.dims()[2], window, scale, softcap);
    let cast = |t: Tensor<B, 4>| -> Tensor<Train, 4> { same_type(t) };
    let out = distillery_kernels::attention::causal_attention(cast(q), cast(k), cast(v), spec);
    Ok(same_type(out))
}

/// `a [.., m, k] @ b [.., k, n]` in f32 by [`distillery_kernels::flex_matmul`] (the `gemm`
/// crate by blocks of the larger output dimension, into an output of its own). `Err` hands both
/// back where it does not apply (another backend or dtype, broadcast batch dimensions).
#[allow(clippy::type_complexity)]
pub fn matmul<B: Backend, const D: usize>(
    a: Tensor<B, D>,
    b: Tensor<B, D>,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
    if !f32_flex(&a) || !f32_flex(&b) {
        return Err((a, b));
    }
    let (pa, pb) = (primitive(a.clone()), primitive(b.clone()));
    match distillery_kernels::flex_matmul(&pa, &pb) {
        Some(out) => Ok(Tensor::from_primitive(TensorPrimitive::Float(same_type(
            out,
        )))),
        None => Err((a, b)),
    }
}

/// Whether `B` is the training backend with the fast path on and every tensor `ts` is f32: the
/// training step's fused ops with their own backward ([`distillery_kernels::training`]) apply.
fn f32_train<B: Backend>(dtypes: &[DType]) -> bool {
    TypeId::of::<B>() == TypeId::of::<crate::runtime::TrainBackend>()
        && enabled()
        && dtypes.iter().all(|&d| d == DType::F32)
}

type Train = crate::runtime::TrainBackend;

/// `a [m, k] @ b [k, n]` under the training backend in f32, through
/// [`distillery_kernels::training::matmul`] (the backend's product for the forward and both
/// backward products); `Err` hands both back elsewhere.
#[allow(clippy::type_complexity)]
pub fn trained_matmul<B: Backend, const D: usize>(
    a: Tensor<B, D>,
    b: Tensor<B, D>,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
    if D != 2 || !f32_train::<B>(&[a.dtype(), b.dtype()]) {
        return Err((a, b));
    }
    let (da, db) = (a.dims(), b.dims());
    let a: Tensor<Train, 2> = same_type(a.reshape([da[0], da[1]]));
    let b: Tensor<Train, 2> = same_type(b.reshape([db[0], db[1]]));
    let out: Tensor<B, 2> = same_type(distillery_kernels::training::matmul(a, b));
    Ok(out.reshape(std::array::from_fn::<usize, D, _>(|i| {
        if i == 0 { da[0] } else { db[1] }
    })))
}

/// `a [m, k] @ bᵀ` with `b [n, k]` under the training backend in f32
/// ([`distillery_kernels::training::matmul_transposed`]: `b`'s gradient comes out in `b`'s
/// layout); `Err` hands both back elsewhere.
#[allow(clippy::type_complexity)]
pub fn trained_matmul_transposed<B: Backend>(
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 2>)> {
    if !f32_train::<B>(&[a.dtype(), b.dtype()]) {
        return Err((a, b));
    }
    let out = distillery_kernels::training::matmul_transposed::<crate::runtime::Backend>(
        same_type(a),
        same_type(b),
    );
    Ok(same_type(out))
}

/// The mean next-token cross-entropy of `logits [rows, vocab]` against `targets [rows]` under
/// the training backend in f32, `[1]`, through the backend's fused rows
/// ([`distillery_kernels::cross_entropy::cross_entropy_loss`]); `Err(logits)` back elsewhere.
pub fn trained_cross_entropy<B: Backend>(
    logits: Tensor<B, 2>,
    targets: &[i64],
) -> Result<Tensor<B, 1>, Tensor<B, 2>> {
    if !f32_train::<B>(&[logits.dtype()]) || targets.is_empty() {
        return Err(logits);
    }
    let loss = distillery_kernels::cross_entropy::cross_entropy_loss::<crate::runtime::Backend>(
        same_type(logits),
        targets,
    );
    Ok(same_type(loss))
}

/// The rows `ids [n]` of the embedding `weight [vocab, d]` → `[n, d]` under the training backend
/// in f32 ([`distillery_kernels::training::embedding`]: its gradient added into the tied head's
/// in place); `Err` hands both back elsewhere.
#[allow(clippy::type_complexity)]
pub fn trained_embedding<B: Backend>(
    weight: Tensor<B, 2>,
    ids: Tensor<B, 1, Int>,
) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 1, Int>)> {
    if !f32_train::<B>(&[weight.dtype()]) {
        return Err((weight, ids));
    }
    let rows = distillery_kernels::training::embedding::<crate::runtime::Backend>(
        same_type(weight),
        same_type(ids),
    );
    Ok(same_type(rows))
}

/// The norm ([`NormSpec`]: RMSNorm or LayerNorm without bias) of `x [batch, seq, d]` by
/// `w [d]` under the training backend in f32 ([`distillery_kernels::training::norm`]); `Err(x)`
/// back elsewhere.
pub fn trained_norm<B: Backend>(
    x: Tensor<B, 3>,
    w: &Tensor<B, 1>,
    spec: NormSpec,
) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
    if !f32_train::<B>(&[x.dtype(), w.dtype()]) {
        return Err(x);
    }
    let [b, s, d] = x.dims();
    let x: Tensor<Train, 2> = same_type(x.reshape([b * s, d]));
    let y = distillery_kernels::training::norm(x, same_type(w.clone()), spec);
    Ok(same_type::<_, Tensor<B, 2>>(y).reshape([b, s, d]))
}

/// `act(gate) * up`, both `[batch, seq, ffn]`, under the training backend in f32
/// ([`distillery_kernels::training::glu`]); `Err` hands both back elsewhere.
#[allow(clippy::type_complexity)]
pub fn trained_glu<B: Backend>(
    gate: Tensor<B, 3>,
    up: Tensor<B, 3>,
    act: GluActivation,
) -> Result<Tensor<B, 3>, (Tensor<B, 3>, Tensor<B, 3>)> {
    if !f32_train::<B>(&[gate.dtype(), up.dtype()]) {
        return Err((gate, up));
    }
    let [b, s, f] = gate.dims();
    let flat = |t: Tensor<B, 3>| -> Tensor<Train, 2> { same_type(t.reshape([b * s, f])) };
    let y = distillery_kernels::training::glu(flat(gate), flat(up), act);
    Ok(same_type::<_, Tensor<B, 2>>(y).reshape([b, s, f]))
}

/// RoPE on `x [batch, seq, heads, head_dim]` with tables `[seq, head_dim]` under the CPU's
/// training backend in f32 ([`distillery_kernels::training::rope`]); `Err(x)` back elsewhere.
pub fn trained_rope<B: Backend>(
    x: Tensor<B, 4>,
    cos: &[f32],
    sin: &[f32],
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    // The CPU only: elsewhere the tensor-op RoPE reads tables the forward built once for every
    // layer, where the op's default would upload and broadcast them per call.
    if !f32_train::<B>(&[x.dtype()])
        || TypeId::of::<crate::runtime::Backend>() != TypeId::of::<Flex>()
    {
        return Err(x);
    }
    let [b, s, h, d] = x.dims();
    let flat: Tensor<Train, 3> = same_type(x.reshape([b * s, h, d]));
    let y = distillery_kernels::training::rope(flat, cos, sin);
    Ok(same_type::<_, Tensor<B, 3>>(y).reshape([b, s, h, d]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    #[test]
    fn matmul_equals_flexs_own_on_transposed_permuted_and_batched_views() {
        if !enabled() {
            return;
        }
        let device = Default::default();
        let a = Tensor::<Flex, 4>::random([2, 3, 5, 7], Distribution::Default, &device);
        // A view with every stride changed: [2, 3, 7, 4] from a [3, 4, 2, 7] tensor.
        let b = Tensor::<Flex, 4>::random([3, 4, 2, 7], Distribution::Default, &device)
            .permute([2, 0, 3, 1]);
        let want = a.clone().matmul(b.clone()).into_data();
        let got = matmul(a, b).ok().unwrap().into_data();
        assert_eq!(got.shape, want.shape);
        // The same gemm call on the same views: the same bits.
        assert_eq!(
            got.as_slice::<f32>().unwrap(),
            want.as_slice::<f32>().unwrap()
        );
        // Transposed 2-D weights, as the decoder holds them, past the threading threshold.
        let x = Tensor::<Flex, 2>::random([200, 192], Distribution::Default, &device);
        let w = Tensor::<Flex, 2>::random([300, 192], Distribution::Default, &device).transpose();
        let want = x.clone().matmul(w.clone()).into_data();
        let got = matmul(x, w).ok().unwrap().into_data();
        assert_eq!(
            got.as_slice::<f32>().unwrap(),
            want.as_slice::<f32>().unwrap()
        );
    }

    #[test]
    fn matmul_over_an_empty_inner_dimension_is_zeros() {
        if !enabled() {
            return;
        }
        // The output is never zeroed up front: gemm must write it even with nothing to sum.
        let device = Default::default();
        let a = Tensor::<Flex, 2>::zeros([3, 0], &device);
        let b = Tensor::<Flex, 2>::zeros([0, 4], &device);
        let got = matmul(a, b).ok().unwrap().into_data();
        assert_eq!(got.as_slice::<f32>().unwrap(), &[0f32; 12]);
    }

    #[test]
    fn matmul_hands_back_what_it_does_not_take() {
        let device = Default::default();
        let a = Tensor::<Flex, 3>::random([2, 3, 4], Distribution::Default, &device);
        let b = Tensor::<Flex, 3>::random([1, 4, 5], Distribution::Default, &device);
        // Broadcast batch dimensions stay with Flex.
        assert!(matmul(a, b).is_err());
    }
}
