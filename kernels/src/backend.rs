//! The backend extension through which ops reach the fused kernels.

use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};

use crate::attention::{self, AttentionSpec};
use crate::fused::AttentionShape;
use crate::importance::{accumulate_host, accumulate_reference};
use crate::kl::{KlDirection, kl_rows_host};

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

/// The CPU: both kernels as host loops over the tensors' memory, read in place.
impl KernelBackend for Flex {
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
