//! Activation recomputation per decoder block (gradient checkpointing, Chen et al. 2016,
//! "Training Deep Nets with Sublinear Memory Cost"): under the training backend a block runs
//! without an autodiff graph and keeps only its input; its backward reruns the block's forward
//! on a graph of its own from that input and the block's weights, backpropagates the output's
//! gradient through it, and hands the input's and the weights' gradients to the outer graph.
//! Memory for activations: one residual stream `[batch, seq, hidden]` per block plus one
//! block's intermediates, for one more forward of the blocks per step.

use std::any::Any;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use super::decoder::{Block, Compute, Rope, block_forward};
use crate::runtime::{Backend as B, TrainBackend as TB};

/// `block` applied to the residual stream `x [batch, seq, hidden]` (attention and MLP with their
/// residual adds), recomputed in the backward instead of kept: under the training backend, in
/// `compute` both times. `Err(x)` hands the input back where it does not apply (another
/// backend, or the fast paths off with `DISTILLERY_UNFUSED=1`: the tensor-op attention needs the
/// mask this path does not build), for the caller's ordinary path.
pub fn checkpointed_block<Bk: Backend>(
    block: &Block<Bk>,
    x: Tensor<Bk, 3>,
    rope: &Rope<Bk>,
    compute: Compute,
) -> Result<Tensor<Bk, 3>, Tensor<Bk, 3>> {
    let (Some(block), Some(rope)) = (
        (block as &dyn Any).downcast_ref::<Block<TB>>(),
        (rope as &dyn Any).downcast_ref::<Rope<TB>>(),
    ) else {
        return Err(x);
    };
    if !super::fast::enabled() {
        return Err(x);
    }
    let x: Tensor<TB, 3> = cast(x);
    checkpoint(block, x, rope.clone(), compute)
        .map(cast)
        .map_err(cast)
}

/// `value` as the type it is known to be (checked by the caller's downcasts).
fn cast<From: 'static, To: 'static>(value: From) -> To {
    let any: Box<dyn Any> = Box::new(value);
    *any.downcast::<To>().expect("the training backend")
}

/// What the backward reruns: the block's weights and input (no graph), its RoPE tables and the
/// compute dtype.
#[derive(Clone, Debug)]
struct Saved {
    block: Block<B>,
    x: FloatTensor<B>,
    rope: Rope<TB>,
    compute: Compute,
}

#[derive(Debug)]
struct BlockBackward;

impl<const N: usize> Backward<B, N> for BlockBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let upstream = grads.consume::<B>(&ops.node);
        let Saved {
            block,
            x,
            rope,
            compute,
        } = ops.state;
        // A graph of its own: fresh leaves for the input and the weights (those that train).
        let local = Block::<TB>::from_inner(block);
        let x = Tensor::<TB, 3>::from_inner(float(x)).require_grad();
        let out = block_forward(&local, x.clone(), &rope, &no_mask, compute);
        let local_grads = (out * Tensor::<TB, 3>::from_inner(float(upstream)))
            .sum()
            .backward();
        let mut found = vec![x.grad(&local_grads).map(|g| g.into_primitive().tensor())];
        let mut visitor = ParamGrads {
            grads: &local_grads,
            out: &mut found,
        };
        local.visit(&mut visitor);
        for (parent, grad) in ops.parents.into_iter().zip(found) {
            if let (Some(node), Some(grad)) = (parent, grad) {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

fn float<const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// The training attention builds no mask (it computes causality and windows itself), and
/// [`checkpointed_block`] runs only where it applies (the training backend, fast paths on).
fn no_mask(_: Option<usize>) -> Tensor<TB, 4> {
    unreachable!("the training attention takes no mask")
}

/// The gradients of a block's float parameters, in visiting order.
struct ParamGrads<'a> {
    grads: &'a Gradients,
    out: &'a mut Vec<Option<FloatTensor<B>>>,
}

impl ModuleVisitor<TB> for ParamGrads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<TB, D>>) {
        let grad = param.val().grad(self.grads);
        self.out.push(grad.map(|g| g.into_primitive().tensor()));
    }
}

/// A block's float parameters as the training backend's primitives (their graph nodes), in
/// visiting order.
struct ParamNodes(Vec<FloatTensor<TB>>);

impl ModuleVisitor<TB> for ParamNodes {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<TB, D>>) {
        self.0.push(param.val().into_primitive().tensor());
    }
}

/// The most parents one recomputed block may have: its input and up to 39 parameters (a block
/// with biases everywhere, four norms with biases and q/k norms has 26).
const MAX_PARENTS: usize = 40;

fn checkpoint(
    block: &Block<TB>,
    x: Tensor<TB, 3>,
    rope: Rope<TB>,
    compute: Compute,
) -> Result<Tensor<TB, 3>, Tensor<TB, 3>> {
    let mut params = ParamNodes(Vec::new());
    block.visit(&mut params);
    if params.0.len() + 1 > MAX_PARENTS {
        return Err(x);
    }
    let x = x.into_primitive().tensor();
    let mut parents = vec![x.clone()];
    parents.extend(params.0);
    // The forward without a graph: the weights as constants.
    let weights = block.valid();
    let frozen = Block::<TB>::from_inner(weights.clone().no_grad());
    let out = block_forward(
        &frozen,
        Tensor::<TB, 3>::from_inner(float(x.primitive.clone())),
        &rope,
        &no_mask,
        compute,
    )
    .inner()
    .into_primitive()
    .tensor();
    let saved = Saved {
        block: weights,
        x: x.primitive,
        rope,
        compute,
    };
    macro_rules! with_parents {
        ($($n:literal)*) => {
            match parents.len() {
                $($n => finish::<$n>(&parents, saved, out),)*
                n => unreachable!("{n} parents, checked against MAX_PARENTS"),
            }
        };
    }
    let out = with_parents!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40);
    Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
}

/// The block's output `out` on the outer graph, with `parents` (input, then parameters) as
/// the recomputation's parents.
fn finish<const N: usize>(
    parents: &[FloatTensor<TB>],
    saved: Saved,
    out: FloatTensor<B>,
) -> FloatTensor<TB> {
    let nodes: [_; N] = std::array::from_fn(|i| parents[i].node.clone());
    match BlockBackward
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(saved, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}
