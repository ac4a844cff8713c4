//! The backend extension through which ops reach the fused kernels.

use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};

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
}

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn host_f32(t: FloatTensor<Flex>) -> Vec<f32> {
    float::<Flex, 2>(t)
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
                t_copy = host_f32(teacher);
                &t_copy
            }
        };
        let s = match student.as_slice::<f32>() {
            Some(s) => s,
            None => {
                s_copy = host_f32(student);
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
}
