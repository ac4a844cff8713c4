//! The output head and the loss, a chunk of tokens at a time (the fused linear + loss of Liger
//! Kernel, Hsu et al. 2024, §3.3): the student's logits `[tokens, vocab]` are computed, turned
//! into the loss terms and their gradients, and freed one chunk of `chunk` tokens at a time, so
//! that the head's memory no longer grows with tokens × vocabulary. The gradients with respect
//! to the hidden states and the head's weight are accumulated during the forward and scaled by
//! the terms' upstream gradients in the backward.
//!
//! Each chunk's terms are computed on a graph of their own from the chunk's logits (the same
//! loss functions as the unchunked path: the fused KL kernel, top-k KL, cross-entropy), so a
//! chunked loss equals the unchunked one up to the order of the sums over chunks.

use std::ops::Range;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{ElementConversion, FloatDType, Tensor, TensorPrimitive};

use crate::model::decoder::Compute;
use crate::runtime::{Backend as B, TrainBackend as TB};

/// The loss terms of one chunk: given the rows `range` of the loss's tokens and their logits
/// `[rows, vocab]` once per term (each on a graph of its own, soft-capped where the family
/// caps), term `i`'s contribution from leaf `i`, a scalar `[1]` already weighted as the caller
/// sums chunks (a mean over all tokens: the chunk's mean times its share of the tokens).
pub type ChunkTerms<'a> = dyn Fn(Range<usize>, &[Tensor<TB, 2>]) -> Vec<Tensor<TB, 1>> + 'a;

/// `hidden [tokens, hidden]` (the final norm's output, the rows the loss counts) through the
/// head `weight [hidden, vocab]` (soft-capped by `softcap` where set) into `terms` loss terms,
/// `chunk` tokens at a time, the head's products in `compute` (bf16 operands and an f32
/// result under bf16, as the unchunked head and its autocast backward multiply). Returns the terms summed over chunks, `[terms]`, differentiable
/// with respect to `hidden` and `weight`. Memory beyond the inputs: one chunk's logits and its
/// terms' temporaries, plus one gradient of `hidden` and one of `weight` per term.
pub fn chunked_head_loss(
    hidden: Tensor<TB, 2>,
    weight: Tensor<TB, 2>,
    softcap: Option<f64>,
    compute: Compute,
    chunk: usize,
    terms: usize,
    chunk_terms: &ChunkTerms<'_>,
) -> Tensor<TB, 1> {
    #[derive(Debug)]
    struct HeadBackward;

    /// Per term: `d term / d hidden` `[tokens, hidden]` and `d term / d weight` `[hidden, vocab]`.
    #[derive(Clone, Debug)]
    struct TermGrads {
        hidden: Vec<FloatTensor<B>>,
        weight: Vec<FloatTensor<B>>,
    }

    impl Backward<B, 2> for HeadBackward {
        type State = TermGrads;

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let upstream = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(
                grads.consume::<B>(&ops.node),
            ));
            let upstream: Vec<f32> = upstream.into_data().convert::<f32>().to_vec().unwrap();
            let combine = |parts: Vec<FloatTensor<B>>| {
                parts
                    .into_iter()
                    .zip(&upstream)
                    .map(|(g, &u)| {
                        let g = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(g));
                        // A term used as is (upstream 1) adds its gradient without a product.
                        if u == 1.0 { g } else { g.mul_scalar(u) }
                    })
                    .reduce(|a, b| a + b)
                    .expect("at least one term")
                    .into_primitive()
                    .tensor()
            };
            let [hidden_node, weight_node] = ops.parents;
            let TermGrads { hidden, weight } = ops.state;
            if let Some(node) = hidden_node {
                grads.register::<B>(node.id, combine(hidden));
            }
            if let Some(node) = weight_node {
                grads.register::<B>(node.id, combine(weight));
            }
        }
    }

    let [rows, _] = hidden.dims();
    let chunk = chunk.max(1);
    let (h_inner, w_inner) = (hidden.clone().inner(), weight.clone().inner());
    let device = h_inner.device();
    let mut values = vec![0f64; terms];
    let mut d_hidden: Vec<Vec<Tensor<B, 2>>> = vec![Vec::new(); terms];
    let mut d_weight: Vec<Option<Tensor<B, 2>>> = vec![None; terms];
    for start in (0..rows).step_by(chunk) {
        let range = start..(start + chunk).min(rows);
        let h = h_inner.clone().slice(range.clone());
        let raw = product(h.clone(), w_inner.clone(), compute);
        // One leaf per term, so that each term's backward is its own.
        let leaves: Vec<Tensor<TB, 2>> = (0..terms)
            .map(|_| Tensor::<TB, 2>::from_inner(raw.clone()).require_grad())
            .collect();
        drop(raw);
        let logits: Vec<Tensor<TB, 2>> = leaves
            .iter()
            .map(|leaf| match softcap {
                Some(cap) => (leaf.clone() / cap).tanh() * cap,
                None => leaf.clone(),
            })
            .collect();
        let out = chunk_terms(range, &logits);
        assert_eq!(out.len(), terms, "one value per term");
        for (i, (term, leaf)) in out.into_iter().zip(&leaves).enumerate() {
            let value: f32 = term.clone().inner().into_scalar().elem();
            values[i] += value as f64;
            let grads = term.backward();
            let Some(g) = leaf.grad(&grads) else { continue };
            d_hidden[i].push(product(g.clone(), w_inner.clone().transpose(), compute));
            let dw = product(h.clone().transpose(), g, compute);
            d_weight[i] = Some(match d_weight[i].take() {
                Some(acc) => acc + dw,
                None => dw,
            });
        }
    }
    let [width, vocab] = weight.dims();
    let state = TermGrads {
        hidden: d_hidden
            .into_iter()
            .map(|parts| match parts.is_empty() {
                true => Tensor::<B, 2>::zeros([rows, width], &device),
                false => Tensor::cat(parts, 0),
            })
            .map(|t| t.into_primitive().tensor())
            .collect(),
        weight: d_weight
            .into_iter()
            .map(|w| w.unwrap_or_else(|| Tensor::zeros([width, vocab], &device)))
            .map(|t| t.into_primitive().tensor())
            .collect(),
    };
    let values: Vec<f32> = values.into_iter().map(|v| v as f32).collect();
    let values = Tensor::<B, 1>::from_floats(values.as_slice(), &device)
        .into_primitive()
        .tensor();
    let (hidden, weight) = (
        hidden.into_primitive().tensor(),
        weight.into_primitive().tensor(),
    );
    let out = match HeadBackward
        .prepare::<NoCheckpointing>([hidden.node.clone(), weight.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(state, values),
        OpsKind::UnTracked(prep) => prep.finish(values),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// `a @ b` in `compute`, the product in f32; in f32 on the CPU through the forward's gemm path.
fn product(a: Tensor<B, 2>, b: Tensor<B, 2>, compute: Compute) -> Tensor<B, 2> {
    match compute {
        Compute::F32 => crate::model::fast::matmul(a, b).unwrap_or_else(|(a, b)| a.matmul(b)),
        Compute::Bf16 => a
            .cast(FloatDType::BF16)
            .matmul(b.cast(FloatDType::BF16))
            .cast(FloatDType::F32),
    }
}
