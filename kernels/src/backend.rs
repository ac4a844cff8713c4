//! The backend extension through which ops reach the fused kernels.

use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, FloatTensorOps, IntTensor};
use burn::tensor::{Tensor, TensorData, TensorPrimitive};

use crate::adamw::{AdamW, adamw_host, adamw_reference, sum_squares_host, sum_squares_reference};
use crate::attention::{self, AttentionSpec};
use crate::cross_entropy::{cross_entropy_rows_host, cross_entropy_rows_reference};
use crate::fused::{AttentionShape, GluActivation};
use crate::importance::{accumulate_host, accumulate_reference};
use crate::kl::{KlDirection, kl_rows_host};
use crate::training::{self, NormSpec};

/// A backend that runs distillery's fused kernels.
pub trait KernelBackend: Backend {
    /// `acc [d]` plus `sum_b (mean_s |activation[b, s, :]|)^2` for `activation [batch, seq, d]`.
    fn importance_accumulate(
        acc: FloatTensor<Self>,
        activation: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// Per-row KL between `softmax(teacher / T)` and `softmax(student / T)` (direction chosen),
    /// both `[rows, vocab]`: returns the row losses `[rows]` and `grad_scale` times the gradient
    /// of each row's loss with respect to the student logits, `[rows, vocab]`.
    fn kl_rows(
        teacher: FloatTensor<Self>,
        student: FloatTensor<Self>,
        temperature: f32,
        direction: KlDirection,
        grad_scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// Causal attention ([`attention`]): `q [batch, seq, heads, head_dim]`, `k`/`v` `[batch,
    /// seq, kv_heads, head_dim]` → the context (q's shape) and, with `with_lse`, the rows'
    /// log-sum-exp `[batch, heads, seq]` for the backward (anything otherwise).
    fn attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        spec: AttentionSpec,
        with_lse: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let _ = with_lse;
        attention_forward_by_blocks::<Self>(q, k, v, spec)
    }

    /// The gradients of q, k and v from the forward's inputs, context, log-sum-exp and the
    /// context's gradient `dout`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        spec: AttentionSpec,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        attention_backward_by_blocks::<Self>(q, k, v, out, lse, dout, spec)
    }

    /// One AdamW update of a parameter `p`, its gradient `g` and moments `m`, `v` (each `[n]`,
    /// f32): the new `(p, m, v)` ([`adamw`](crate::adamw)).
    fn adamw(
        p: FloatTensor<Self>,
        g: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        h: &AdamW,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        adamw_by_tensor_ops::<Self>(p, g, m, v, h)
    }

    /// `Σ x²` over `x [n]`, as f64: a gradient's squared norm for clipping.
    fn sum_squares(x: FloatTensor<Self>) -> f64 {
        sum_squares_reference::<Self>(float(x))
    }

    /// Per-row next-token cross-entropy of `logits [rows, vocab]` against `targets [rows]`:
    /// the row losses `[rows]` and `grad_scale` times each row loss's gradient `[rows, vocab]`.
    fn cross_entropy_rows(
        logits: FloatTensor<Self>,
        targets: &[i64],
        grad_scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (losses, grad) =
            cross_entropy_rows_reference::<Self>(float(logits), targets, grad_scale);
        (
            losses.into_primitive().tensor(),
            grad.into_primitive().tensor(),
        )
    }

    /// `a [m, k] · b [k, n]` (either may be a transposed view) → `[m, n]`.
    fn matmul(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(a, b)
    }

    /// The norm of `x [rows, d]` by `w [d]` ([`training::norm`]).
    fn norm(x: FloatTensor<Self>, w: FloatTensor<Self>, spec: NormSpec) -> FloatTensor<Self> {
        training::norm_reference::<Self>(float(x), float(w), spec)
            .into_primitive()
            .tensor()
    }

    /// The norm's `(dx [rows, d], dw [d])` from its input, weight and output gradient `dy`.
    fn norm_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        spec: NormSpec,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (dx, dw) =
            training::norm_backward_reference::<Self>(float(x), float(w), float(dy), spec);
        (dx.into_primitive().tensor(), dw.into_primitive().tensor())
    }

    /// `act(gate) ⊙ up`, both `[rows, ffn]` ([`training::glu`]).
    fn glu(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        act: GluActivation,
    ) -> FloatTensor<Self> {
        training::glu_reference::<Self>(float(gate), float(up), act)
            .into_primitive()
            .tensor()
    }

    /// The gated activation's `(d gate, d up)` from its inputs and output gradient `dy`.
    fn glu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        act: GluActivation,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (dg, du) =
            training::glu_backward_reference::<Self>(float(gate), float(up), float(dy), act);
        (dg.into_primitive().tensor(), du.into_primitive().tensor())
    }

    /// The embedding lookup's gradient ([`training::embedding`]): the rows `dy [n, d]` added at
    /// `ids [n]` into `base [vocab, d]`, the gradient registered so far (zeros where `None`).
    fn embedding_backward_into(
        base: Option<FloatTensor<Self>>,
        vocab: usize,
        ids: IntTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        training::embedding_backward_reference::<Self>(base, vocab, ids, dy)
    }

    /// RoPE of `x [rows, heads, d]` by tables `[positions, d]` ([`training::rope`]).
    fn rope(x: FloatTensor<Self>, cos: &[f32], sin: &[f32]) -> FloatTensor<Self> {
        training::rope_reference::<Self>(float(x), cos, sin)
            .into_primitive()
            .tensor()
    }
}

/// `a [.., m, k] · b [.., k, n]` on Flex in f32 by [`crate::fused::gemm_f32`] (the `gemm`
/// crate, the kernel Flex itself calls, threaded by blocks of the larger output dimension) into an
/// output of its own, reading both operands in place whatever their strides: Flex's matmul output
/// goes through a zeroed byte buffer that Burn then copies to realign, a second allocation and a
/// pass over memory per product (400 MiB for batch-8 SmolLM2 logits), and its threading splits the
/// rows. `None` where it does not apply (another dtype, broadcast batch dimensions).
pub fn flex_matmul(a: &FloatTensor<Flex>, b: &FloatTensor<Flex>) -> Option<FloatTensor<Flex>> {
    use burn::tensor::DType;
    let (da, db) = (a.layout().shape().to_vec(), b.layout().shape().to_vec());
    let rank = da.len();
    if a.dtype() != DType::F32
        || b.dtype() != DType::F32
        || rank < 2
        || db.len() != rank
        || da[..rank - 2] != db[..rank - 2]
        || da[rank - 1] != db[rank - 2]
    {
        return None;
    }
    let (sa, oa, ta) = (
        a.storage::<f32>(),
        a.layout().start_offset(),
        a.layout().strides(),
    );
    let (sb, ob, tb) = (
        b.storage::<f32>(),
        b.layout().start_offset(),
        b.layout().strides(),
    );
    let (m, k, n) = (da[rank - 2], da[rank - 1], db[rank - 1]);
    let batch: usize = da[..rank - 2].iter().product();
    let len = batch * m * n;
    // Not zeroed first, since gemm writes every element: zeroing was a memset of every product's
    // output.
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let base = out.as_mut_ptr();
    for i in (0..batch).filter(|_| m * n > 0) {
        // This batch index's element offset in each operand, from its strides.
        let (mut rest, mut at_a, mut at_b) = (i, oa as isize, ob as isize);
        for d in (0..rank - 2).rev() {
            let idx = (rest % da[d]) as isize;
            rest /= da[d];
            at_a += idx * ta[d];
            at_b += idx * tb[d];
        }
        // SAFETY: Flex's layouts describe views inside their storage, so every element
        // `at + i * rows + j * cols` of these m × k and k × n views lies in `sa` / `sb`; the
        // destination is this batch's m × n row-major block of `out`'s capacity, which gemm
        // writes without reading.
        unsafe {
            crate::fused::gemm_f32(
                [m, n, k],
                (base.add(i * m * n), n as isize),
                (sa.as_ptr().offset(at_a), ta[rank - 2], ta[rank - 1]),
                (sb.as_ptr().offset(at_b), tb[rank - 2], tb[rank - 1]),
                true,
            );
        }
    }
    // SAFETY: the loop above wrote all `len` elements (none when m · n = 0).
    unsafe { out.set_len(len) };
    let mut shape = da;
    shape[rank - 1] = n;
    let flat = flex_tensor(out, [len]);
    Some(Flex::float_reshape(flat, burn::tensor::Shape::from(shape)))
}

/// [`adamw_reference`] on primitives.
fn adamw_by_tensor_ops<B: Backend>(
    p: FloatTensor<B>,
    g: FloatTensor<B>,
    m: FloatTensor<B>,
    v: FloatTensor<B>,
    h: &AdamW,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let (p, m, v) = adamw_reference::<B>(float(p), float(g), float(m), float(v), h);
    (
        p.into_primitive().tensor(),
        m.into_primitive().tensor(),
        v.into_primitive().tensor(),
    )
}

/// [`attention::forward_reference`] on primitives: the tensor-op attention by query blocks.
pub(crate) fn attention_forward_by_blocks<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    spec: AttentionSpec,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (out, lse) = attention::forward_reference::<B>(float(q), float(k), float(v), spec);
    (out.into_primitive().tensor(), lse.into_primitive().tensor())
}

/// [`attention::backward_reference`] on primitives.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward_by_blocks<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    dout: FloatTensor<B>,
    spec: AttentionSpec,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let (dq, dk, dv) = attention::backward_reference::<B>(
        float(q),
        float(k),
        float(v),
        float(out),
        float(lse),
        float(dout),
        spec,
    );
    (
        dq.into_primitive().tensor(),
        dk.into_primitive().tensor(),
        dv.into_primitive().tensor(),
    )
}

/// `t`'s f32 values, read in place when contiguous f32, else copied.
fn with_host<const D: usize, R>(t: &FloatTensor<Flex>, f: impl FnOnce(&[f32]) -> R) -> R {
    match t.as_slice::<f32>() {
        Some(values) => f(values),
        None => f(&host_f32::<D>(t.clone())),
    }
}

/// `t [n]` (f32) as a tensor that alone owns exactly its `n` contiguous values, so that
/// `try_storage_mut` gives them: `t` itself when it is, else a copy.
fn owned_f32(t: FloatTensor<Flex>, n: usize) -> FloatTensor<Flex> {
    let whole = t.layout().contiguous_offsets() == Some((0, n)) && t.storage::<f32>().len() == n;
    if whole && t.is_unique() {
        t
    } else {
        flex_tensor(host_f32::<1>(t), [n])
    }
}

fn all_f32(ts: &[&FloatTensor<Flex>]) -> bool {
    ts.iter().all(|t| t.dtype() == burn::tensor::DType::F32)
}

fn flex_tensor<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> FloatTensor<Flex> {
    Tensor::<Flex, D>::from_data(TensorData::new(values, shape), &Default::default())
        .into_primitive()
        .tensor()
}

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn host_f32<const D: usize>(t: FloatTensor<Flex>) -> Vec<f32> {
    float::<Flex, D>(t)
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 data")
}

/// The CPU: every kernel as a host loop over the tensors' memory, read in place.
impl KernelBackend for Flex {
    fn adamw(
        p: FloatTensor<Self>,
        g: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        h: &AdamW,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let f32s = [&p, &g, &m, &v]
            .iter()
            .all(|t| t.dtype() == burn::tensor::DType::F32);
        if !f32s {
            return adamw_by_tensor_ops::<Self>(p, g, m, v, h);
        }
        let n = p.layout().shape().dims::<1>()[0];
        // The moments are updated in place where this is their only reference (the optimizer
        // hands them over), else copied once.
        let (mut m, mut v) = (owned_f32(m, n), owned_f32(v, n));
        let p = with_host::<1, _>(&p, |p| {
            with_host::<1, _>(&g, |g| {
                let m = m.try_storage_mut::<f32>().expect("owned above");
                let v = v.try_storage_mut::<f32>().expect("owned above");
                adamw_host(p, g, m, v, h)
            })
        });
        (flex_tensor(p, [n]), m, v)
    }

    fn sum_squares(x: FloatTensor<Self>) -> f64 {
        if x.dtype() != burn::tensor::DType::F32 {
            return sum_squares_reference::<Self>(float(x));
        }
        with_host::<1, _>(&x, sum_squares_host)
    }

    fn cross_entropy_rows(
        logits: FloatTensor<Self>,
        targets: &[i64],
        grad_scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !all_f32(&[&logits]) {
            let (losses, grad) =
                cross_entropy_rows_reference::<Self>(float(logits), targets, grad_scale);
            return (
                losses.into_primitive().tensor(),
                grad.into_primitive().tensor(),
            );
        }
        let shape = logits.layout().shape().dims::<2>();
        let (losses, grad) = with_host::<2, _>(&logits, |x| {
            cross_entropy_rows_host(x, targets, shape[1], grad_scale)
        });
        let losses: Vec<f32> = losses.into_iter().map(|l| l as f32).collect();
        (flex_tensor(losses, [shape[0]]), flex_tensor(grad, shape))
    }

    fn matmul(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        flex_matmul(&a, &b).unwrap_or_else(|| Self::float_matmul(a, b))
    }

    fn norm(x: FloatTensor<Self>, w: FloatTensor<Self>, spec: NormSpec) -> FloatTensor<Self> {
        if !all_f32(&[&x, &w]) {
            return training::norm_reference::<Self>(float(x), float(w), spec)
                .into_primitive()
                .tensor();
        }
        let shape = x.layout().shape().dims::<2>();
        let y = with_host::<2, _>(&x, |x| {
            with_host::<1, _>(&w, |w| training::norm_host(x, w, spec))
        });
        flex_tensor(y, shape)
    }

    fn norm_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        spec: NormSpec,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !all_f32(&[&x, &w, &dy]) {
            let (dx, dw) =
                training::norm_backward_reference::<Self>(float(x), float(w), float(dy), spec);
            return (dx.into_primitive().tensor(), dw.into_primitive().tensor());
        }
        let shape = x.layout().shape().dims::<2>();
        let (dx, dw) = with_host::<2, _>(&x, |x| {
            with_host::<1, _>(&w, |w| {
                with_host::<2, _>(&dy, |dy| training::norm_backward_host(x, w, dy, spec))
            })
        });
        (flex_tensor(dx, shape), flex_tensor(dw, [shape[1]]))
    }

    fn glu(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        act: GluActivation,
    ) -> FloatTensor<Self> {
        if !all_f32(&[&gate, &up]) {
            return training::glu_reference::<Self>(float(gate), float(up), act)
                .into_primitive()
                .tensor();
        }
        let shape = gate.layout().shape().dims::<2>();
        let y = with_host::<2, _>(&gate, |g| {
            with_host::<2, _>(&up, |u| crate::fused::glu(g, u, act))
        });
        flex_tensor(y, shape)
    }

    fn glu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        act: GluActivation,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !all_f32(&[&gate, &up, &dy]) {
            let (dg, du) =
                training::glu_backward_reference::<Self>(float(gate), float(up), float(dy), act);
            return (dg.into_primitive().tensor(), du.into_primitive().tensor());
        }
        let shape = gate.layout().shape().dims::<2>();
        let (dg, du) = with_host::<2, _>(&gate, |g| {
            with_host::<2, _>(&up, |u| {
                with_host::<2, _>(&dy, |dy| training::glu_backward_host(g, u, dy, act))
            })
        });
        (flex_tensor(dg, shape), flex_tensor(du, shape))
    }

    fn embedding_backward_into(
        base: Option<FloatTensor<Self>>,
        vocab: usize,
        ids: IntTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        if !all_f32(&[&dy]) || base.as_ref().is_some_and(|b| !all_f32(&[b])) {
            return training::embedding_backward_reference::<Self>(base, vocab, ids, dy);
        }
        let [_, d] = dy.layout().shape().dims::<2>();
        let ids: Vec<i64> = Tensor::<Self, 1, burn::tensor::Int>::from_primitive(ids)
            .into_data()
            .convert::<i64>()
            .into_vec::<i64>()
            .expect("i64 after convert");
        // The registered gradient is added into in place where this is its only reference (the
        // head's fresh product), else copied once.
        let mut out = match base {
            Some(base) => owned_f32(Self::float_reshape(base, [vocab * d].into()), vocab * d),
            None => flex_tensor(vec![0f32; vocab * d], [vocab * d]),
        };
        with_host::<2, _>(&dy, |dy| {
            let out = out.try_storage_mut::<f32>().expect("owned above");
            training::embedding_backward_host(out, d, &ids, dy)
        });
        Self::float_reshape(out, [vocab, d].into())
    }

    fn rope(x: FloatTensor<Self>, cos: &[f32], sin: &[f32]) -> FloatTensor<Self> {
        if !all_f32(&[&x]) {
            return training::rope_reference::<Self>(float(x), cos, sin)
                .into_primitive()
                .tensor();
        }
        let shape = x.layout().shape().dims::<3>();
        let y = with_host::<3, _>(&x, |x| crate::fused::rope(x, cos, sin, shape[1], shape[2]));
        flex_tensor(y, shape)
    }

    fn importance_accumulate(
        acc: FloatTensor<Self>,
        activation: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let [batch, seq, _] = activation.layout().shape().dims::<3>();
        let (Some(a), Some(acc_in)) = (activation.as_slice::<f32>(), acc.as_slice::<f32>()) else {
            // Not contiguous f32: the reference handles any layout.
            return accumulate_reference(float::<Self, 1>(acc), float::<Self, 3>(activation))
                .into_primitive()
                .tensor();
        };
        let mut out = acc_in.to_vec();
        accumulate_host(&mut out, a, batch, seq);
        let d = out.len();
        Tensor::<Self, 1>::from_data(TensorData::new(out, [d]), &Default::default())
            .into_primitive()
            .tensor()
    }

    fn kl_rows(
        teacher: FloatTensor<Self>,
        student: FloatTensor<Self>,
        temperature: f32,
        direction: KlDirection,
        grad_scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let [rows, vocab] = teacher.layout().shape().dims::<2>();
        let device = Default::default();
        // Read the logits in place when they are contiguous f32, as they are out of the lm_head.
        let (t_copy, s_copy);
        let t = match teacher.as_slice::<f32>() {
            Some(t) => t,
            None => {
                t_copy = host_f32::<2>(teacher);
                &t_copy
            }
        };
        let s = match student.as_slice::<f32>() {
            Some(s) => s,
            None => {
                s_copy = host_f32::<2>(student);
                &s_copy
            }
        };
        let (losses, grad) = kl_rows_host(t, s, vocab, temperature, direction, grad_scale);
        let losses: Vec<f32> = losses.into_iter().map(|l| l as f32).collect();
        (
            Tensor::<Self, 1>::from_data(TensorData::new(losses, [rows]), &device)
                .into_primitive()
                .tensor(),
            Tensor::<Self, 2>::from_data(TensorData::new(grad, [rows, vocab]), &device)
                .into_primitive()
                .tensor(),
        )
    }

    fn attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        spec: AttentionSpec,
        with_lse: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let shape = q.layout().shape().dims::<4>();
        let AttentionShape {
            batch, seq, heads, ..
        } = spec.shape;
        let (out, lse) = with_host::<4, _>(&q, |q| {
            with_host::<4, _>(&k, |k| {
                with_host::<4, _>(&v, |v| attention::forward_host(q, k, v, spec, with_lse))
            })
        });
        let lse_shape = if with_lse {
            [batch, heads, seq]
        } else {
            [0, heads, seq]
        };
        (flex_tensor(out, shape), flex_tensor(lse, lse_shape))
    }

    fn attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        spec: AttentionSpec,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (q_shape, kv_shape) = (
            q.layout().shape().dims::<4>(),
            k.layout().shape().dims::<4>(),
        );
        let (dq, dk, dv) = with_host::<4, _>(&q, |q| {
            with_host::<4, _>(&k, |k| {
                with_host::<4, _>(&v, |v| {
                    with_host::<4, _>(&out, |out| {
                        with_host::<3, _>(&lse, |lse| {
                            with_host::<4, _>(&dout, |dout| {
                                attention::backward_host(q, k, v, out, lse, dout, spec)
                            })
                        })
                    })
                })
            })
        });
        (
            flex_tensor(dq, q_shape),
            flex_tensor(dk, kv_shape),
            flex_tensor(dv, kv_shape),
        )
    }
}
