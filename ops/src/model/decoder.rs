//! One decoder on Burn for every family of [`crate::model::arch`], generic over the backend:
//! `h = x + attn(norm(x)); h + mlp(norm(h))` (or Gemma's sandwich, each sublayer's output normed
//! again), with RoPE (whole or partial heads, one or two frequency sets), grouped-query attention
//! (biases, q/k norms, soft-caps, per-layer windows), a gated or plain MLP and an explicit head_dim.
//! Linear weights are held transposed (contiguous `[in, out]`) so a projection is one matmul;
//! loading and saving translate from and to Hugging Face's `[out, in]` through the family's tensor
//! table, splitting and re-packing Phi-3's fused projections.

use super::generate::KvCache;
use std::collections::HashMap;

use burn::module::{Module, Param};
use burn::tensor::activation::{gelu, relu, silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Int, Tensor, TensorData};

use crate::model::ModelError;
use crate::model::arch::{Activation, NormKind, Role, TensorSpec};
use crate::model::config::{ModelConfig, RopeScaling};
use crate::model::fast;
use crate::model::weights::Weights;
use distillery_kernels::training::NormSpec;

/// Where a forward pass can hand an activation to a hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HookPoint {
    /// A block's input `[batch, seq, hidden]`.
    BlockInput,
    /// Output of `input_layernorm` `[batch, seq, hidden]`.
    AttnNorm,
    /// Attention output before `o_proj`: concatenated heads `[batch, seq, heads * head_dim]`.
    AttnContext,
    /// Output of `post_attention_layernorm` `[batch, seq, hidden]`.
    MlpNorm,
    /// Input of `down_proj`: `silu(gate) * up` `[batch, seq, ffn]`.
    MlpIntermediate,
    /// A block's output `[batch, seq, hidden]`.
    BlockOutput,
}

impl HookPoint {
    pub const ALL: [HookPoint; 6] = [
        HookPoint::BlockInput,
        HookPoint::AttnNorm,
        HookPoint::AttnContext,
        HookPoint::MlpNorm,
        HookPoint::MlpIntermediate,
        HookPoint::BlockOutput,
    ];

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// Receives activations during a forward. `wants` is asked first, so nothing is produced for
/// points nobody asked for; tensors are handed by reference (no copy).
pub trait Hooks<B: Backend> {
    fn wants(&self) -> HookSet;
    fn activation(&mut self, layer: usize, point: HookPoint, tensor: &Tensor<B, 3>);
}

/// A set of hook points.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HookSet(u8);

impl HookSet {
    pub const NONE: HookSet = HookSet(0);

    pub fn of(points: &[HookPoint]) -> HookSet {
        HookSet(points.iter().fold(0, |acc, p| acc | p.bit()))
    }

    pub fn contains(self, p: HookPoint) -> bool {
        self.0 & p.bit() != 0
    }
}

/// No hooks.
pub struct NoHooks;

impl<B: Backend> Hooks<B> for NoHooks {
    fn wants(&self) -> HookSet {
        HookSet::NONE
    }
    fn activation(&mut self, _: usize, _: HookPoint, _: &Tensor<B, 3>) {}
}

/// A norm over the last dimension: RMSNorm (`x / sqrt(mean(x²) + eps) * (offset + w)`, offset 0
/// for Llama, 1 for Gemma) or Nemotron's LayerNorm1p (`layer_norm(x, w + 1, b, eps)`).
#[derive(Module, Debug)]
pub struct Norm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// Added to the stored weight before scaling.
    pub offset: f32,
    /// Mean-centred (LayerNorm) instead of RMS.
    pub centred: bool,
}

impl<B: Backend> Norm<B> {
    fn scale(&self) -> Tensor<B, 1> {
        if self.offset == 0.0 {
            self.weight.val()
        } else {
            self.weight.val().add_scalar(self.offset)
        }
    }

    /// `[batch, seq, d] -> [batch, seq, d]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let scale = self.scale();
        let spec = NormSpec {
            eps: self.eps as f32,
            centred: self.centred,
        };
        if self.centred {
            let y = match fast::trained_norm(x, &scale, spec) {
                Ok(y) => y,
                Err(x) => {
                    let mean = x.clone().mean_dim(2);
                    let x = x - mean;
                    let var = x.clone().powf_scalar(2.0).mean_dim(2);
                    x * (var + self.eps).sqrt().recip() * scale.unsqueeze_dims::<3>(&[0, 1])
                }
            };
            return match &self.bias {
                Some(b) => y + b.val().unsqueeze_dims::<3>(&[0, 1]),
                None => y,
            };
        }
        let x = match fast::rms_norm(x, &scale, self.eps)
            .or_else(|x| fast::trained_norm(x, &scale, spec))
        {
            Ok(y) => return y,
            Err(x) => x,
        };
        let var = x.clone().powf_scalar(2.0).mean_dim(2);
        let x = x * (var + self.eps).sqrt().recip();
        x * scale.unsqueeze_dims::<3>(&[0, 1])
    }

    /// The residual add before a norm: `(h, norm(h))` with `h = x + delta`, in one pass on the
    /// CPU fast path.
    pub fn forward_residual(
        &self,
        x: Tensor<B, 3>,
        delta: Tensor<B, 3>,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        if !self.centred {
            match fast::add_rms_norm(x, delta, &self.scale(), self.eps) {
                Ok(pair) => return pair,
                Err((x, delta)) => {
                    let h = x + delta;
                    return (h.clone(), self.forward(h));
                }
            }
        }
        let h = x + delta;
        (h.clone(), self.forward(h))
    }
}

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `[hidden, heads * head_dim]`
    pub q_proj: Param<Tensor<B, 2>>,
    /// `[hidden, kv_heads * head_dim]`
    pub k_proj: Param<Tensor<B, 2>>,
    pub v_proj: Param<Tensor<B, 2>>,
    /// `[heads * head_dim, hidden]`
    pub o_proj: Param<Tensor<B, 2>>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub sliding_window: Option<usize>,
    /// `[heads * head_dim]`, `[kv_heads * head_dim]` twice, `[hidden]` (Qwen2, `attention_bias`).
    pub q_bias: Option<Param<Tensor<B, 1>>>,
    pub k_bias: Option<Param<Tensor<B, 1>>>,
    pub v_bias: Option<Param<Tensor<B, 1>>>,
    pub o_bias: Option<Param<Tensor<B, 1>>>,
    /// Per-head norms over head_dim before RoPE (Qwen3, Gemma 3).
    pub q_norm: Option<Norm<B>>,
    pub k_norm: Option<Norm<B>>,
    /// The scores' scale (`head_dim^-0.5`, or Gemma's `query_pre_attn_scalar^-0.5`).
    pub scale: f64,
    /// Gemma 2's `tanh(scores / cap) * cap`.
    pub softcap: Option<f64>,
    /// Whether this layer rotates by the local RoPE set (Gemma 3's sliding layers).
    pub local_rope: bool,
}

/// The dtype matmuls run in. Weights (the f32 master copy when training), norms, softmax, the
/// residual stream and every hooked activation stay f32; `Bf16` casts both operands of each matmul
/// to bf16 and the product back to f32, as PyTorch's autocast does. Gradients flow back through
/// the casts, so the optimizer sees f32 gradients of f32 weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compute {
    #[default]
    F32,
    Bf16,
}

impl Compute {
    /// Recipe names, as in checkpoint dtypes.
    pub const NAMES: [&'static str; 2] = ["float32", "bfloat16"];

    pub fn from_name(name: &str) -> Option<Compute> {
        match name {
            "float32" => Some(Compute::F32),
            "bfloat16" => Some(Compute::Bf16),
            _ => None,
        }
    }

    pub fn dtype(self) -> FloatDType {
        match self {
            Compute::F32 => FloatDType::F32,
            Compute::Bf16 => FloatDType::BF16,
        }
    }
}

/// `a @ b` in the compute dtype, the product in f32 (casts are no-ops in f32). On the CPU fast
/// path an f32 product goes straight to the `gemm` crate ([`fast::matmul`]).
fn matmul<B: Backend, const D: usize>(
    a: Tensor<B, D>,
    b: Tensor<B, D>,
    c: Compute,
) -> Tensor<B, D> {
    let (a, b) = match c {
        Compute::F32 => match fast::matmul(a, b).or_else(|(a, b)| fast::trained_matmul(a, b)) {
            Ok(product) => return product,
            Err(operands) => operands,
        },
        Compute::Bf16 => (a, b),
    };
    a.cast(c.dtype())
        .matmul(b.cast(c.dtype()))
        .cast(FloatDType::F32)
}

/// `x [batch, seq, in] @ w [in, out]` as one 2-D matmul (a broadcast 3-D matmul is much slower
/// on the CPU backends).
fn linear<B: Backend>(x: Tensor<B, 3>, w: &Param<Tensor<B, 2>>, c: Compute) -> Tensor<B, 3> {
    let [b, s, i] = x.dims();
    let w = w.val();
    let o = w.dims()[1];
    matmul(x.reshape([b * s, i]), w, c).reshape([b, s, o])
}

/// [`linear`] plus an optional bias `[out]`.
fn linear_bias<B: Backend>(
    x: Tensor<B, 3>,
    w: &Param<Tensor<B, 2>>,
    bias: &Option<Param<Tensor<B, 1>>>,
    c: Compute,
) -> Tensor<B, 3> {
    let y = linear(x, w, c);
    match bias {
        Some(b) => y + b.val().unsqueeze_dims::<3>(&[0, 1]),
        None => y,
    }
}

/// `tanh(x / cap) * cap` (Gemma 2's soft-capping of attention scores and logits).
fn softcap<B: Backend, const D: usize>(x: Tensor<B, D>, cap: f64) -> Tensor<B, D> {
    x.div_scalar(cap).tanh().mul_scalar(cap)
}

/// Largest causal bias materialized to the scores' full shape (elements, 256 MiB of f32); past it
/// the bias stays `[1, 1, seq * rep, seq]` and broadcasts.
const MATERIALIZED_BIAS_LIMIT: usize = 1 << 26;

/// Largest RoPE table materialized over the batch (elements, 64 MiB of f32).
const MATERIALIZED_ROPE_LIMIT: usize = 1 << 24;

/// Rotary embeddings for one forward, built once and shared by every layer. Hugging Face's
/// `rotate_half` convention (pairs (i, i + d/2)): `x * cos + rotate_half(x) * sin`, with
/// `rotate_half` as a matmul by a signed permutation (exact in f32), which keeps every step
/// contiguous; slicing and concatenating halves went through strided copies.
#[derive(Clone, Debug)]
pub struct Rope<B: Backend> {
    /// `[seq, rotary_dim]` row-major, for the fused host loop; `[batch, seq, rotary_dim]` when
    /// each row has its own positions (`per_row`: left-padded generation).
    cos: Vec<f32>,
    sin: Vec<f32>,
    rot_dim: usize,
    per_row: bool,
    /// The tables as tensors for the tensor-op path; None on the fast path (Flex), which reads
    /// `cos`/`sin` directly.
    tensors: Option<RopeTensors<B>>,
}

#[derive(Clone, Debug)]
struct RopeTensors<B: Backend> {
    /// `[batch, seq, heads, head_dim]`, for the queries. Materialized over the batch: Flex's
    /// broadcasting binary ops take a strided path many times slower than same-shape ones.
    cos_q: Tensor<B, 4>,
    sin_q: Tensor<B, 4>,
    /// `[batch, seq, kv_heads, head_dim]`, for the keys.
    cos_k: Tensor<B, 4>,
    sin_k: Tensor<B, 4>,
    /// `[head_dim, head_dim]`: `x @ rotate = rotate_half(x)`.
    rotate: Tensor<B, 2>,
}

impl<B: Backend> Rope<B> {
    /// `inv_freq [head_dim / 2]`; angles in f32 like transformers (position × inv_freq in f32).
    fn new(
        inv_freq: &[f32],
        batch: usize,
        seq: usize,
        heads: usize,
        kv_heads: usize,
        device: &B::Device,
    ) -> Self {
        let (cos, sin) = Self::tables(inv_freq, 0..seq);
        let tensors = (!fast::is_flex::<B>()).then(|| {
            RopeTensors::new(
                &cos,
                &sin,
                2 * inv_freq.len(),
                batch,
                seq,
                heads,
                kv_heads,
                device,
            )
        });
        Rope {
            cos,
            sin,
            rot_dim: 2 * inv_freq.len(),
            per_row: false,
            tensors,
        }
    }

    /// Tables for explicit positions, `positions [batch, seq]` row-major (a left-padded row's
    /// tokens count from its first real token, as transformers' `position_ids` do).
    pub(crate) fn at_positions(
        inv_freq: &[f32],
        positions: &[usize],
        batch: usize,
        heads: usize,
        kv_heads: usize,
        device: &B::Device,
    ) -> Self {
        let (cos, sin) = Self::tables(inv_freq, positions.iter().copied());
        let mut rope = Rope {
            cos,
            sin,
            rot_dim: 2 * inv_freq.len(),
            per_row: true,
            tensors: None,
        };
        if !fast::is_flex::<B>() {
            rope.tensors = Some(rope.row_tables(
                batch,
                positions.len() / batch.max(1),
                heads,
                kv_heads,
                device,
            ));
        }
        rope
    }

    /// cos and sin `[positions, rotary_dim]`, angles in f32 like transformers (position ×
    /// inv_freq in f32), each half repeated.
    fn tables(inv_freq: &[f32], positions: impl Iterator<Item = usize>) -> (Vec<f32>, Vec<f32>) {
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for pos in positions {
            let angles: Vec<f32> = inv_freq.iter().map(|f| pos as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        (cos, sin)
    }

    /// The tensor-op tables for `[batch, seq]`, `heads` query and `kv_heads` key heads.
    fn row_tables(
        &self,
        batch: usize,
        seq: usize,
        heads: usize,
        kv_heads: usize,
        device: &B::Device,
    ) -> RopeTensors<B> {
        if !self.per_row {
            return RopeTensors::new(
                &self.cos,
                &self.sin,
                self.rot_dim,
                batch,
                seq,
                heads,
                kv_heads,
                device,
            );
        }
        let t = RopeTensors::new(
            &self.cos,
            &self.sin,
            self.rot_dim,
            1,
            batch * seq,
            heads,
            kv_heads,
            device,
        );
        let d = self.rot_dim;
        RopeTensors {
            cos_q: t.cos_q.reshape([batch, seq, heads, d]),
            sin_q: t.sin_q.reshape([batch, seq, heads, d]),
            cos_k: t.cos_k.reshape([batch, seq, kv_heads, d]),
            sin_k: t.sin_k.reshape([batch, seq, kv_heads, d]),
            rotate: t.rotate,
        }
    }

    /// `x [batch, seq, n, head_dim]` with `n` the query (`keys` false) or KV head count. With a
    /// partial rotary factor only the first `rotary_dim` dimensions of each head rotate (pairs
    /// (i, i + rotary_dim / 2)), the rest pass through, as transformers' Nemotron and Phi-3 do.
    fn apply(&self, x: Tensor<B, 4>, keys: bool) -> Tensor<B, 4> {
        let [b, s, n, d] = x.dims();
        let r = self.rot_dim;
        if s == 0 || r == d {
            return self.apply_whole(x, keys);
        }
        let rot = x.clone().slice([0..b, 0..s, 0..n, 0..r]);
        let pass = x.slice([0..b, 0..s, 0..n, r..d]);
        Tensor::cat(vec![self.apply_whole(rot, keys), pass], 3)
    }

    fn apply_whole(&self, x: Tensor<B, 4>, keys: bool) -> Tensor<B, 4> {
        let x = match fast::rope(x, &self.cos, &self.sin)
            .or_else(|x| fast::trained_rope(x, &self.cos, &self.sin))
        {
            Ok(y) => return y,
            Err(x) => x,
        };
        let [b, s, n, d] = x.dims();
        let built;
        let t = match &self.tensors {
            Some(t) => t,
            None => {
                built = self.row_tables(b, s, n, n, &x.device());
                &built
            }
        };
        let rotated = x
            .clone()
            .reshape([b * s * n, d])
            .matmul(t.rotate.clone())
            .reshape([b, s, n, d]);
        let (cos, sin) = if keys {
            (&t.cos_k, &t.sin_k)
        } else {
            (&t.cos_q, &t.sin_q)
        };
        x * cos.clone() + rotated * sin.clone()
    }
}

impl<B: Backend> RopeTensors<B> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cos: &[f32],
        sin: &[f32],
        d: usize,
        batch: usize,
        seq: usize,
        heads: usize,
        kv_heads: usize,
        device: &B::Device,
    ) -> Self {
        let half = d / 2;
        let table = |v: &[f32], n: usize| -> Tensor<B, 4> {
            let mut t = Vec::with_capacity(seq * n * d);
            for row in v.chunks(d) {
                for _ in 0..n {
                    t.extend_from_slice(row);
                }
            }
            // Past the limit (large batches of long sequences) the table broadcasts instead.
            let copies = if batch * t.len() <= MATERIALIZED_ROPE_LIMIT {
                batch
            } else {
                1
            };
            let t = t.repeat(copies);
            Tensor::from_data(TensorData::new(t, [copies, seq, n, d]), device)
        };
        let mut rotate = vec![0f32; d * d];
        for o in 0..half {
            rotate[(o + half) * d + o] = -1.0;
            rotate[o * d + o + half] = 1.0;
        }
        RopeTensors {
            cos_q: table(cos, heads),
            sin_q: table(sin, heads),
            cos_k: table(cos, kv_heads),
            sin_k: table(sin, kv_heads),
            rotate: Tensor::from_data(TensorData::new(rotate, [d, d]), device),
        }
    }
}

impl<B: Backend> Attention<B> {
    /// `x: [batch, seq, hidden]`; `bias(window)` gives the additive mask `[batch, kv_heads, seq *
    /// rep, seq]` or one broadcastable to it (0 where attention is allowed, -inf where not; `rep`
    /// query heads per KV group, rows ordered (position, head)), built only when a path needs it.
    /// Returns the context before o_proj `[batch, seq, heads * head_dim]` and the output
    /// `[batch, seq, hidden]`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        bias: &dyn Fn(Option<usize>) -> Tensor<B, 4>,
        c: Compute,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let [b, s, _] = x.dims();
        let (q, k, v) = self.project(x, rope, c);
        let (window, scale) = (self.sliding_window, self.scale as f32);
        let fused = match (c, self.softcap) {
            // The fused CPU forward multiplies in f32 and does not cap; training's attention
            // (any backend) caps. Under bf16 compute, training takes its attention too (its scores
            // in f32 from the f32 projections: no [seq, seq] tensors kept for the backward),
            // while inference keeps the tensor ops, which multiply in bf16 as transformers does.
            // A GPU build's frozen forward at a long sequence takes the attention kernel.
            (Compute::F32, None) => fast::causal_attention(q, k, v, window, scale)
                .or_else(|(q, k, v)| fast::trained_attention(q, k, v, window, scale, None))
                .or_else(|(q, k, v)| fast::long_attention(q, k, v, window, scale, None)),
            (_, cap) => {
                let cap = cap.map(|c| c as f32);
                fast::trained_attention(q, k, v, window, scale, cap)
                    .or_else(|(q, k, v)| fast::long_attention(q, k, v, window, scale, cap))
            }
        };
        let context = match fused {
            Ok(context) => context.reshape([b, s, self.n_heads * self.head_dim]),
            Err((q, k, v)) => self.attend(q, k, v, &bias(self.sliding_window), c),
        };
        let out = linear_bias(context.clone(), &self.o_proj, &self.o_bias, c);
        (context, out)
    }

    /// One step of incremental decoding: `x [batch, seq, hidden]` are the new positions, `cache`
    /// this layer's keys and values of the positions before them (extended here), `bias` the
    /// mask `[batch, kv_heads, seq * rep, cached + seq]` of the new queries over every key.
    /// Returns the output `[batch, seq, hidden]`.
    pub fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        cache: &mut Option<(Tensor<B, 4>, Tensor<B, 4>)>,
        bias: &Tensor<B, 4>,
        c: Compute,
    ) -> Tensor<B, 3> {
        let (q, k, v) = self.project(x, rope, c);
        let (k, v) = match cache.take() {
            Some((ck, cv)) => (Tensor::cat(vec![ck, k], 1), Tensor::cat(vec![cv, v], 1)),
            None => (k, v),
        };
        *cache = Some((k.clone(), v.clone()));
        let context = self.attend(q, k, v, bias, c);
        linear_bias(context, &self.o_proj, &self.o_bias, c)
    }

    /// Queries `[batch, seq, heads, head_dim]` and keys and values `[batch, seq, kv_heads,
    /// head_dim]`, the queries and keys normed per head (where the family does) and rotated.
    fn project(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        c: Compute,
    ) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let [b, s, _] = x.dims();
        let (h, kvh, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        // q/k norms run per head over head_dim, before RoPE.
        let head_norm = |t: Tensor<B, 4>, norm: &Option<Norm<B>>| match norm {
            Some(norm) => {
                let [b, s, n, d] = t.dims();
                norm.forward(t.reshape([b, s * n, d])).reshape([b, s, n, d])
            }
            None => t,
        };
        // RoPE in the projections' own layout [batch, seq, heads, head_dim].
        let q = head_norm(
            linear_bias(x.clone(), &self.q_proj, &self.q_bias, c).reshape([b, s, h, d]),
            &self.q_norm,
        );
        let k = head_norm(
            linear_bias(x.clone(), &self.k_proj, &self.k_bias, c).reshape([b, s, kvh, d]),
            &self.k_norm,
        );
        let (q, k) = (rope.apply(q, false), rope.apply(k, true));
        let v = linear_bias(x, &self.v_proj, &self.v_bias, c).reshape([b, s, kvh, d]);
        (q, k, v)
    }

    /// Attention by tensor ops: `q [batch, seq, heads, head_dim]`, `k`/`v` `[batch, keys,
    /// kv_heads, head_dim]`, `bias` as in [`Self::forward`] over `keys` columns; the context
    /// `[batch, seq, heads * head_dim]`.
    fn attend(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        bias: &Tensor<B, 4>,
        c: Compute,
    ) -> Tensor<B, 3> {
        let [b, s, h, d] = q.dims();
        let kvh = self.n_kv_heads;
        let rep = h / kvh;
        // Scaled by multiplying, as transformers does (`head_dim ** -0.5`).
        let scale = self.scale;
        let v = v.swap_dims(1, 2); // [b, kvh, keys, d]
        // Grouped-query attention: the `rep` query heads of a KV group are stacked with the
        // positions, rows (position, head), so each group is one matmul against its K and V (no
        // copies of K/V) and one transpose of [seq, group] blocks gets there.
        let q = q
            .reshape([b, s, kvh, rep * d])
            .swap_dims(1, 2)
            .reshape([b, kvh, s * rep, d]);
        let k_t = k.swap_dims(1, 2).swap_dims(2, 3); // [b, kvh, d, keys]
        let scores = matmul(q, k_t, c);
        let probs = match self.softcap {
            // Gemma 2: scaled, capped, then masked (as its eager attention does).
            Some(cap) => {
                let capped = softcap(scores * scale, cap);
                match fast::attention_probs(capped, 1.0, bias) {
                    Ok(probs) => probs,
                    Err(capped) => softmax(capped + bias.clone(), 3),
                }
            }
            None => match fast::attention_probs(scores, scale as f32, bias) {
                Ok(probs) => probs,
                Err(scores) => softmax(scores * scale + bias.clone(), 3),
            },
        };
        matmul(probs, v, c) // [b, kvh, s * rep, d]
            .reshape([b, kvh, s, rep * d])
            .swap_dims(1, 2)
            .reshape([b, s, h * d])
    }
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `[hidden, ffn]`; `None` in a plain MLP (Nemotron).
    pub gate_proj: Option<Param<Tensor<B, 2>>>,
    pub up_proj: Param<Tensor<B, 2>>,
    /// `[ffn, hidden]`
    pub down_proj: Param<Tensor<B, 2>>,
    /// `[ffn]`, `[ffn]`, `[hidden]` (`mlp_bias`).
    pub gate_bias: Option<Param<Tensor<B, 1>>>,
    pub up_bias: Option<Param<Tensor<B, 1>>>,
    pub down_bias: Option<Param<Tensor<B, 1>>>,
    #[module(skip)]
    pub act: Activation,
}

/// `act(x)` elementwise, as transformers' `ACT2FN` computes it.
fn activate<B: Backend>(x: Tensor<B, 3>, act: Activation) -> Tensor<B, 3> {
    match act {
        Activation::Silu => silu(x),
        Activation::Gelu => gelu(x),
        // `0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))` (PyTorch's
        // `gelu(approximate="tanh")`).
        Activation::GeluTanh => {
            let inner = (x.clone() + x.clone().powf_scalar(3.0).mul_scalar(0.044715))
                .mul_scalar((2.0 / std::f64::consts::PI).sqrt());
            x.mul_scalar(0.5) * (inner.tanh().add_scalar(1.0))
        }
        Activation::Relu2 => relu(x).powf_scalar(2.0),
    }
}

impl<B: Backend> Mlp<B> {
    /// `[batch, seq, hidden] -> ([batch, seq, ffn] intermediate, [batch, seq, hidden])`
    pub fn forward(&self, x: Tensor<B, 3>, c: Compute) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let inter = match &self.gate_proj {
            Some(gate_proj) => {
                let gate = linear_bias(x.clone(), gate_proj, &self.gate_bias, c);
                let up = linear_bias(x, &self.up_proj, &self.up_bias, c);
                // The inference path fuses SwiGLU; training fuses SwiGLU and the tanh GeGLU.
                let fused = match self.act {
                    Activation::Silu => fast::swiglu(gate, up),
                    _ => Err((gate, up)),
                };
                match fused.or_else(|(gate, up)| match self.act.glu() {
                    Some(glu) => fast::trained_glu(gate, up, glu),
                    None => Err((gate, up)),
                }) {
                    Ok(inter) => inter,
                    Err((gate, up)) => activate(gate, self.act) * up,
                }
            }
            None => activate(linear_bias(x, &self.up_proj, &self.up_bias, c), self.act),
        };
        let out = linear_bias(inter.clone(), &self.down_proj, &self.down_bias, c);
        (inter, out)
    }
}

#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    /// The attention's input norm (`input_layernorm`).
    pub attn_norm: Norm<B>,
    pub self_attn: Attention<B>,
    /// The MLP's input norm (`post_attention_layernorm`; Gemma's `pre_feedforward_layernorm`).
    pub mlp_norm: Norm<B>,
    pub mlp: Mlp<B>,
    /// Gemma's norms of each sublayer's output, before the residual add.
    pub post_attn_norm: Option<Norm<B>>,
    pub post_mlp_norm: Option<Norm<B>>,
}

#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    /// `[vocab, hidden]`
    pub embed_tokens: Param<Tensor<B, 2>>,
    pub layers: Vec<Block<B>>,
    pub norm: Norm<B>,
    /// `[hidden, vocab]`; None when tied to the embedding.
    pub lm_head: Option<Param<Tensor<B, 2>>>,
    /// RoPE inverse frequencies `[rotary_dim / 2]`, already scaled (linear, llama3).
    pub inv_freq: Vec<f32>,
    /// The dtype matmuls run in (f32 unless [`Decoder::with_compute`] says otherwise).
    #[module(skip)]
    pub compute: Compute,
    /// What the family adds around the blocks: embedding scale, final soft-cap, local RoPE.
    #[module(skip)]
    pub extras: DecoderExtras,
}

/// The parts of a forward that are not parameters and not per block.
#[derive(Clone, Debug, Default)]
pub struct DecoderExtras {
    /// Gemma's √hidden on the embeddings.
    pub embed_scale: Option<f32>,
    /// Gemma 2's `final_logit_softcapping`.
    pub final_softcap: Option<f64>,
    /// Gemma 3's sliding layers' inverse frequencies `[rotary_dim / 2]`.
    pub inv_freq_local: Option<Vec<f32>>,
    /// Recompute each block's activations in the backward instead of keeping them
    /// ([`super::recompute`]): training only, f32 compute.
    pub recompute: bool,
}

/// RoPE inverse frequencies `[rotary_dim / 2]` for base `theta`, with linear or Llama 3.1 scaling
/// where configured. Rounded the way transformers computes them (the exponent in f32, the power
/// rounded to f32, then the reciprocal and the scaling in f32): an ulp of difference here grows
/// with the position into logit differences of 1e-4 at a few hundred tokens.
pub fn rope_inv_freq(rotary_dim: usize, theta: f64, scaling: Option<&RopeScaling>) -> Vec<f32> {
    let d = rotary_dim;
    let mut inv: Vec<f32> = (0..d / 2)
        .map(|i| {
            let x = (2 * i) as f32 / d as f32;
            1.0f32 / (theta.powf(x as f64) as f32)
        })
        .collect();
    apply_rope_scaling(&mut inv, scaling);
    inv
}

/// Scales RoPE inverse frequencies `[head_dim / 2]` in place (in f32, as transformers does).
pub fn apply_rope_scaling(inv: &mut [f32], scaling: Option<&RopeScaling>) {
    match scaling {
        None => {}
        Some(RopeScaling::Linear { factor }) => {
            for f in inv.iter_mut() {
                *f /= *factor as f32;
            }
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => llama3_scale(
            inv,
            *factor as f32,
            *low_freq_factor as f32,
            *high_freq_factor as f32,
            *original_max_position_embeddings as f32,
        ),
    }
}

/// Llama 3.1's scaling of inverse frequencies (transformers' `_compute_llama3_parameters`).
fn llama3_scale(inv: &mut [f32], factor: f32, low: f32, high: f32, old: f32) {
    let low_wavelen = old / low;
    let high_wavelen = old / high;
    for f in inv.iter_mut() {
        let wavelen = 2.0 * std::f32::consts::PI / *f;
        if wavelen > low_wavelen {
            *f /= factor;
        } else if wavelen >= high_wavelen {
            let smooth = (old / wavelen - low) / (high - low);
            *f = (1.0 - smooth) * *f / factor + smooth * *f;
        }
    }
}

/// A checkpoint tensor by name as f32, with its shape.
fn read(w: &Weights, name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
    w.f32(name)
}

/// A matrix parameter from Hugging Face's `[out, in]` rows (`transpose`: held as `[in, out]`).
fn matrix<B: Backend>(
    data: Vec<f32>,
    rows: usize,
    cols: usize,
    transpose: bool,
    device: &B::Device,
) -> Param<Tensor<B, 2>> {
    // Transposed on the host into a contiguous `[in, out]`, not kept as a strided view of the
    // checkpoint's `[out, in]`: the CPU gemm packs weights by reading along their rows instead of
    // gathering across them (SmolLM2 forward, batch 1: about 640 → 700 tokens/s).
    let t = if transpose {
        TensorData::new(
            distillery_kernels::fused::transposed(&data, rows, cols),
            [cols, rows],
        )
    } else {
        TensorData::new(data, [rows, cols])
    };
    Param::from_tensor(Tensor::<B, 2>::from_data(t, device))
}

fn vector<B: Backend>(data: Vec<f32>, device: &B::Device) -> Param<Tensor<B, 1>> {
    let n = data.len();
    Param::from_tensor(Tensor::<B, 1>::from_data(
        TensorData::new(data, [n]),
        device,
    ))
}

/// The checkpoint's tensors by (layer, role), named by the family's table.
struct ByRole<'a> {
    weights: &'a Weights,
    names: HashMap<(Option<usize>, Role), String>,
}

impl ByRole<'_> {
    fn name(&self, layer: Option<usize>, role: Role) -> Option<&str> {
        self.names.get(&(layer, role)).map(String::as_str)
    }

    fn vector<B: Backend>(
        &self,
        layer: Option<usize>,
        role: Role,
        device: &B::Device,
    ) -> Result<Option<Param<Tensor<B, 1>>>, ModelError> {
        self.name(layer, role)
            .map(|n| Ok(vector(read(self.weights, n)?.1, device)))
            .transpose()
    }

    /// A matrix held as `[in, out]`; `None` when the table has no such tensor.
    fn matrix<B: Backend>(
        &self,
        layer: Option<usize>,
        role: Role,
        device: &B::Device,
    ) -> Result<Option<Param<Tensor<B, 2>>>, ModelError> {
        self.name(layer, role)
            .map(|n| {
                let (shape, data) = read(self.weights, n)?;
                Ok(matrix(data, shape[0], shape[1], true, device))
            })
            .transpose()
    }

    /// The row blocks of a packed matrix (Phi-3's qkv_proj, gate_up_proj), each held `[in, out]`.
    fn packed<B: Backend>(
        &self,
        layer: usize,
        role: Role,
        parts: &[usize],
        device: &B::Device,
    ) -> Result<Option<Vec<Param<Tensor<B, 2>>>>, ModelError> {
        let Some(n) = self.name(Some(layer), role) else {
            return Ok(None);
        };
        let (shape, data) = read(self.weights, n)?;
        let cols = shape[1];
        let mut start = 0;
        let mut out = Vec::with_capacity(parts.len());
        for &rows in parts {
            let block = data[start * cols..(start + rows) * cols].to_vec();
            out.push(matrix(block, rows, cols, true, device));
            start += rows;
        }
        Ok(Some(out))
    }

    fn require<T>(&self, t: Option<T>, layer: Option<usize>, role: Role) -> Result<T, ModelError> {
        t.ok_or_else(|| ModelError::Checkpoint {
            path: self.weights.origin.clone(),
            why: format!(
                "the family's table has no {role:?} tensor{}",
                layer.map(|l| format!(" in layer {l}")).unwrap_or_default()
            ),
        })
    }
}

/// One whole block on the residual stream `x [batch, seq, hidden]`: attention and MLP with
/// their residual adds, no hooks; the unit [`super::recompute`] reruns. `bias` as in
/// [`Attention::forward`].
pub(crate) fn block_forward<B: Backend>(
    block: &Block<B>,
    x: Tensor<B, 3>,
    rope: &Rope<B>,
    bias: &dyn Fn(Option<usize>) -> Tensor<B, 4>,
    c: Compute,
) -> Tensor<B, 3> {
    let normed = block.attn_norm.forward(x.clone());
    let (_, attn) = block.self_attn.forward(normed, rope, bias, c);
    let attn = match &block.post_attn_norm {
        Some(norm) => norm.forward(attn),
        None => attn,
    };
    let (h, normed) = block.mlp_norm.forward_residual(x, attn);
    let (_, mlp) = block.mlp.forward(normed, c);
    let mlp = match &block.post_mlp_norm {
        Some(norm) => norm.forward(mlp),
        None => mlp,
    };
    h + mlp
}

impl<B: Backend> Decoder<B> {
    /// Builds the decoder from checkpoint tensors (already checked against `config`).
    pub fn load(
        config: &ModelConfig,
        weights: &Weights,
        device: &B::Device,
    ) -> Result<Decoder<B>, ModelError> {
        let t = ByRole {
            weights,
            names: config
                .tensor_specs()
                .into_iter()
                .map(|s| ((s.layer, s.role), s.name))
                .collect(),
        };
        let kind = config.family.norm;
        let norm = |layer: Option<usize>,
                    w: Role,
                    b: Option<Role>|
         -> Result<Option<Norm<B>>, ModelError> {
            let Some(weight) = t.vector(layer, w, device)? else {
                return Ok(None);
            };
            Ok(Some(Norm {
                weight,
                eps: config.norm_eps,
                bias: match b {
                    Some(b) => t.vector(layer, b, device)?,
                    None => None,
                },
                offset: kind.offset(),
                centred: kind == NormKind::LayerNorm1p,
            }))
        };
        // Per-head norms are always RMS (Qwen3's Qwen3RMSNorm, Gemma 3's offset one).
        let head_norm = |layer: usize, role: Role| -> Result<Option<Norm<B>>, ModelError> {
            Ok(t.vector(Some(layer), role, device)?.map(|weight| Norm {
                weight,
                eps: config.norm_eps,
                bias: None,
                offset: kind.offset(),
                centred: false,
            }))
        };
        let (h, kvh, d) = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        );
        let scale = config.query_pre_attn_scalar.unwrap_or(d as f64).powf(-0.5);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let at = Some(l);
            let (q_proj, k_proj, v_proj) =
                match t.packed::<B>(l, Role::Qkv, &[h * d, kvh * d, kvh * d], device)? {
                    Some(mut p) => {
                        let v = p.pop().unwrap();
                        let k = p.pop().unwrap();
                        (p.pop().unwrap(), k, v)
                    }
                    None => (
                        t.require(t.matrix(at, Role::Q, device)?, at, Role::Q)?,
                        t.require(t.matrix(at, Role::K, device)?, at, Role::K)?,
                        t.require(t.matrix(at, Role::V, device)?, at, Role::V)?,
                    ),
                };
            let ffn = config.intermediate_size;
            let (gate_proj, up_proj) = match t.packed::<B>(l, Role::GateUp, &[ffn, ffn], device)? {
                Some(mut p) => {
                    let up = p.pop().unwrap();
                    (Some(p.pop().unwrap()), up)
                }
                None => (
                    t.matrix(at, Role::Gate, device)?,
                    t.require(t.matrix(at, Role::Up, device)?, at, Role::Up)?,
                ),
            };
            layers.push(Block {
                attn_norm: t.require(
                    norm(at, Role::AttnNorm, Some(Role::AttnNormBias))?,
                    at,
                    Role::AttnNorm,
                )?,
                self_attn: Attention {
                    q_proj,
                    k_proj,
                    v_proj,
                    o_proj: t.require(t.matrix(at, Role::O, device)?, at, Role::O)?,
                    n_heads: h,
                    n_kv_heads: kvh,
                    head_dim: d,
                    sliding_window: config.window_of(l),
                    q_bias: t.vector(at, Role::QBias, device)?,
                    k_bias: t.vector(at, Role::KBias, device)?,
                    v_bias: t.vector(at, Role::VBias, device)?,
                    o_bias: t.vector(at, Role::OBias, device)?,
                    q_norm: head_norm(l, Role::QNorm)?,
                    k_norm: head_norm(l, Role::KNorm)?,
                    scale,
                    softcap: config.attn_logit_softcapping,
                    local_rope: config.uses_local_rope(l),
                },
                mlp_norm: t.require(
                    norm(at, Role::MlpNorm, Some(Role::MlpNormBias))?,
                    at,
                    Role::MlpNorm,
                )?,
                mlp: Mlp {
                    gate_proj,
                    up_proj,
                    down_proj: t.require(t.matrix(at, Role::Down, device)?, at, Role::Down)?,
                    gate_bias: t.vector(at, Role::GateBias, device)?,
                    up_bias: t.vector(at, Role::UpBias, device)?,
                    down_bias: t.vector(at, Role::DownBias, device)?,
                    act: config.hidden_act,
                },
                post_attn_norm: norm(at, Role::PostAttnNorm, None)?,
                post_mlp_norm: norm(at, Role::PostMlpNorm, None)?,
            });
        }
        let (shape, embed) = read(weights, "model.embed_tokens.weight")?;
        let rotary = config.rotary_dim();
        Ok(Decoder {
            embed_tokens: matrix(embed, shape[0], shape[1], false, device),
            layers,
            norm: t.require(
                norm(None, Role::FinalNorm, Some(Role::FinalNormBias))?,
                None,
                Role::FinalNorm,
            )?,
            lm_head: t.matrix(None, Role::Head, device)?,
            inv_freq: rope_inv_freq(rotary, config.rope_theta, config.rope_scaling.as_ref()),
            compute: Compute::F32,
            extras: DecoderExtras {
                // transformers: `torch.tensor(hidden_size ** 0.5, dtype=hidden.dtype)`.
                embed_scale: config
                    .family
                    .embed_scale
                    .then(|| (config.hidden_size as f64).sqrt() as f32),
                final_softcap: config.final_logit_softcapping,
                inv_freq_local: config
                    .rope_local
                    .as_ref()
                    .map(|r| rope_inv_freq(rotary, r.theta, r.scaling.as_ref())),
                recompute: false,
            },
        })
    }

    /// Recomputes each block's activations in the backward pass instead of keeping them
    /// (training under f32 compute; elsewhere the blocks run as usual).
    pub fn with_recompute(mut self, on: bool) -> Self {
        self.extras.recompute = on;
        self
    }

    /// Runs the matmuls in `compute` from now on.
    pub fn with_compute(mut self, compute: Compute) -> Self {
        self.compute = compute;
        self
    }

    /// Stores the matrices (projections, embedding, head) in the compute dtype, for a frozen model:
    /// a bf16 teacher holds 2 bytes per parameter instead of 4. Norm weights and biases stay f32.
    pub fn store_matrices_in_compute_dtype(self) -> Self {
        let dt = self.compute.dtype();
        let cast = |p: Param<Tensor<B, 2>>| p.map(|t| t.cast(dt));
        Decoder {
            embed_tokens: cast(self.embed_tokens),
            layers: self
                .layers
                .into_iter()
                .map(|b| Block {
                    self_attn: Attention {
                        q_proj: cast(b.self_attn.q_proj),
                        k_proj: cast(b.self_attn.k_proj),
                        v_proj: cast(b.self_attn.v_proj),
                        o_proj: cast(b.self_attn.o_proj),
                        ..b.self_attn
                    },
                    mlp: Mlp {
                        gate_proj: b.mlp.gate_proj.map(cast),
                        up_proj: cast(b.mlp.up_proj),
                        down_proj: cast(b.mlp.down_proj),
                        ..b.mlp
                    },
                    ..b
                })
                .collect(),
            lm_head: self.lm_head.map(cast),
            ..self
        }
    }

    /// The tensor of `spec` in Hugging Face layout, as f32: `(shape, values)`.
    fn tensor_of(&self, spec: &TensorSpec) -> (Vec<usize>, Vec<f32>) {
        fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
            t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
        }
        // Held `[in, out]`: back to `[out, in]` rows; packed matrices stack their parts' rows.
        let rows = |parts: &[&Param<Tensor<B, 2>>]| {
            let mut shape = vec![0, 0];
            let mut out = Vec::new();
            for p in parts {
                let t = p.val().transpose();
                let [r, c] = t.dims();
                shape = vec![shape[0] + r, c];
                out.extend(values(t));
            }
            (shape, out)
        };
        let vec1 = |p: &Param<Tensor<B, 1>>| (p.val().dims().to_vec(), values(p.val()));
        // The decoder was built from a config of this table: every role it names is held.
        macro_rules! missing {
            () => {
                || panic!("{} is not held by this decoder", spec.name)
            };
        }
        let block = spec.layer.map(|l| &self.layers[l]);
        let b = || block.unwrap();
        let opt1 =
            |p: &Option<Param<Tensor<B, 1>>>| p.as_ref().map(vec1).unwrap_or_else(missing!());
        let norm_w = |n: &Option<Norm<B>>| {
            n.as_ref()
                .map(|n| vec1(&n.weight))
                .unwrap_or_else(missing!())
        };
        match spec.role {
            Role::Embed => {
                let t = self.embed_tokens.val();
                (t.dims().to_vec(), values(t))
            }
            Role::Head => rows(&[self.lm_head.as_ref().unwrap_or_else(missing!())]),
            Role::FinalNorm => vec1(&self.norm.weight),
            Role::FinalNormBias => opt1(&self.norm.bias),
            Role::AttnNorm => vec1(&b().attn_norm.weight),
            Role::AttnNormBias => opt1(&b().attn_norm.bias),
            Role::MlpNorm => vec1(&b().mlp_norm.weight),
            Role::MlpNormBias => opt1(&b().mlp_norm.bias),
            Role::PostAttnNorm => norm_w(&b().post_attn_norm),
            Role::PostMlpNorm => norm_w(&b().post_mlp_norm),
            Role::Q => rows(&[&b().self_attn.q_proj]),
            Role::K => rows(&[&b().self_attn.k_proj]),
            Role::V => rows(&[&b().self_attn.v_proj]),
            Role::O => rows(&[&b().self_attn.o_proj]),
            Role::Qkv => {
                let a = &b().self_attn;
                rows(&[&a.q_proj, &a.k_proj, &a.v_proj])
            }
            Role::QBias => opt1(&b().self_attn.q_bias),
            Role::KBias => opt1(&b().self_attn.k_bias),
            Role::VBias => opt1(&b().self_attn.v_bias),
            Role::OBias => opt1(&b().self_attn.o_bias),
            Role::QNorm => norm_w(&b().self_attn.q_norm),
            Role::KNorm => norm_w(&b().self_attn.k_norm),
            Role::Gate => rows(&[b().mlp.gate_proj.as_ref().unwrap_or_else(missing!())]),
            Role::Up => rows(&[&b().mlp.up_proj]),
            Role::GateUp => rows(&[
                b().mlp.gate_proj.as_ref().unwrap_or_else(missing!()),
                &b().mlp.up_proj,
            ]),
            Role::Down => rows(&[&b().mlp.down_proj]),
            Role::GateBias => opt1(&b().mlp.gate_bias),
            Role::UpBias => opt1(&b().mlp.up_bias),
            Role::DownBias => opt1(&b().mlp.down_bias),
        }
    }

    /// Every tensor of `config`'s table (a config of this decoder's shape) under its Hugging Face
    /// name and layout, as f32 (for saving).
    pub fn named_tensors(&self, config: &ModelConfig) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        config
            .tensor_specs()
            .iter()
            .map(|spec| {
                let (shape, values) = self.tensor_of(spec);
                (spec.name.clone(), shape, values)
            })
            .collect()
    }

    /// The additive attention mask `[batch, kv_heads, seq * rep, seq]` for `rep` query heads
    /// stacked per KV group (rows ordered (position, head)): -inf above the diagonal and outside
    /// the sliding `window`, else 0. Built once per forward and window and shared by the layers;
    /// materialized to the scores' shape where the tensor-op softmax adds it (Flex's broadcasting
    /// adds are slow), repeating over batch and groups where the fused CPU softmax reads it.
    fn causal_bias(
        &self,
        batch: usize,
        seq: usize,
        window: Option<usize>,
        device: &B::Device,
    ) -> Tensor<B, 4> {
        // The fused softmax reads a bias that repeats over batch and groups.
        let limit = if fast::is_flex::<B>() {
            0
        } else {
            MATERIALIZED_BIAS_LIMIT
        };
        self.causal_bias_up_to(batch, seq, window, limit, device)
    }

    fn causal_bias_up_to(
        &self,
        batch: usize,
        seq: usize,
        window: Option<usize>,
        limit: usize,
        device: &B::Device,
    ) -> Tensor<B, 4> {
        let Some(attn) = self.layers.first().map(|b| &b.self_attn) else {
            return Tensor::zeros([batch, 1, seq, seq], device);
        };
        let rep = attn.n_heads / attn.n_kv_heads;
        let mut bias = Vec::with_capacity(rep * seq * seq);
        for i in 0..seq {
            let row: Vec<f32> = (0..seq)
                .map(|j| {
                    if attends(i, j, window) {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
                .collect();
            for _ in 0..rep {
                bias.extend_from_slice(&row);
            }
        }
        let groups = batch * attn.n_kv_heads;
        if groups * bias.len() > limit {
            // Long sequences: a second scores-sized tensor would cost more than the strided add.
            return Tensor::from_data(TensorData::new(bias, [1, 1, seq * rep, seq]), device);
        }
        let bias = bias.repeat(groups);
        Tensor::from_data(
            TensorData::new(bias, [batch, attn.n_kv_heads, seq * rep, seq]),
            device,
        )
    }

    /// Hidden states after the final norm: `tokens [batch, seq] -> [batch, seq, hidden]`.
    pub fn hidden(&self, tokens: Tensor<B, 2, Int>, hooks: &mut dyn Hooks<B>) -> Tensor<B, 3> {
        let [b, s] = tokens.dims();
        let device = tokens.device();
        let x = self.embed(tokens);
        let (heads, kv_heads) = self.head_counts();
        let (rope, local_rope) = self.ropes(|f| Rope::new(f, b, s, heads, kv_heads, &device));
        // Built on first use, once per forward and window: the fused CPU attention needs none.
        let biases = std::cell::RefCell::new(HashMap::new());
        let bias = |window: Option<usize>| {
            biases
                .borrow_mut()
                .entry(window)
                .or_insert_with(|| self.causal_bias(b, s, window, &device))
                .clone()
        };
        let mut attend = |_: usize, attn: &Attention<B>, normed, rope: &Rope<B>| {
            let (context, out) = attn.forward(normed, rope, &bias, self.compute);
            (Some(context), out)
        };
        self.blocks(x, &rope, local_rope.as_ref(), &mut attend, hooks)
    }

    /// The RoPE tables and, where the family has a local set (Gemma 3), the local ones, each
    /// built by `make` from its inverse frequencies.
    fn ropes(&self, make: impl Fn(&[f32]) -> Rope<B>) -> (Rope<B>, Option<Rope<B>>) {
        (
            make(&self.inv_freq),
            self.extras.inv_freq_local.as_deref().map(&make),
        )
    }

    /// Query and KV head counts (of the first block; 1 and 1 without blocks).
    pub fn head_counts(&self) -> (usize, usize) {
        match self.layers.first() {
            Some(block) => (block.self_attn.n_heads, block.self_attn.n_kv_heads),
            None => (1, 1),
        }
    }

    /// Hidden states after the final norm for new positions of a [`KvCache`]d sequence:
    /// `tokens [batch, seq]` at `positions [batch, seq]` (row-major), `bias(window)` the mask of
    /// these queries over every cached and new key (`[batch, kv_heads, seq * rep, cached +
    /// seq]`). The cache gains the new keys and values.
    pub fn hidden_cached(
        &self,
        tokens: Tensor<B, 2, Int>,
        positions: &[usize],
        cache: &mut KvCache<B>,
        bias: &dyn Fn(Option<usize>) -> Tensor<B, 4>,
    ) -> Tensor<B, 3> {
        let [b, _] = tokens.dims();
        let device = tokens.device();
        let x = self.embed(tokens);
        let (heads, kv_heads) = self.head_counts();
        let (rope, local_rope) =
            self.ropes(|f| Rope::at_positions(f, positions, b, heads, kv_heads, &device));
        if cache.layers.len() != self.layers.len() {
            cache.layers = (0..self.layers.len()).map(|_| None).collect();
        }
        let mut attend = |l: usize, attn: &Attention<B>, normed, rope: &Rope<B>| {
            let bias = bias(attn.sliding_window);
            let out = attn.forward_cached(normed, rope, &mut cache.layers[l], &bias, self.compute);
            (None, out)
        };
        self.blocks(x, &rope, local_rope.as_ref(), &mut attend, &mut NoHooks)
    }

    /// `tokens [batch, seq]` → the residual stream's start `[batch, seq, hidden]` in f32 (scaled
    /// where the family scales its embeddings).
    fn embed(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, s] = tokens.dims();
        let hidden = self.embed_tokens.val().dims()[1];
        let ids = tokens.reshape([b * s]);
        let rows = fast::trained_embedding(self.embed_tokens.val(), ids)
            .unwrap_or_else(|(weight, ids)| weight.select(0, ids));
        let mut x = rows.reshape([b, s, hidden]).cast(FloatDType::F32);
        if let Some(scale) = self.extras.embed_scale {
            // Gemma multiplies by `torch.tensor(hidden_size ** 0.5, dtype=hidden_states.dtype)`:
            // rounded to bf16 in a bf16 model (√3584 = 59.87 becomes 59.75).
            let scale = match self.compute {
                Compute::F32 => scale,
                Compute::Bf16 => half::bf16::from_f32(scale).to_f32(),
            };
            x = x.mul_scalar(scale);
        }
        x
    }

    /// The blocks and the final norm over the residual stream `x [batch, seq, hidden]`; each
    /// block's attention is `attend(layer, attention, normed input, rope)`, which returns the
    /// context before o_proj (where it has one, for the hooks) and the output.
    fn blocks(
        &self,
        mut x: Tensor<B, 3>,
        rope: &Rope<B>,
        local_rope: Option<&Rope<B>>,
        attend: &mut dyn FnMut(
            usize,
            &Attention<B>,
            Tensor<B, 3>,
            &Rope<B>,
        ) -> (Option<Tensor<B, 3>>, Tensor<B, 3>),
        hooks: &mut dyn Hooks<B>,
    ) -> Tensor<B, 3> {
        let want = hooks.wants();
        // Recomputed blocks keep only their input: the hooks inside a block have nothing to
        // read.
        let recompute = self.extras.recompute
            && !(want.contains(HookPoint::AttnNorm)
                || want.contains(HookPoint::AttnContext)
                || want.contains(HookPoint::MlpNorm)
                || want.contains(HookPoint::MlpIntermediate));
        // Each block's MLP output is added to the residual stream by the next norm (the next
        // block's input norm, or the final one), fused with it on the CPU fast path.
        let mut mlp_out: Option<Tensor<B, 3>> = None;
        for (l, block) in self.layers.iter().enumerate() {
            let rope = match (local_rope, block.self_attn.local_rope) {
                (Some(local), true) => local,
                _ => rope,
            };
            if recompute {
                if let Some(mlp) = mlp_out.take() {
                    x = x + mlp;
                }
                if l > 0 && want.contains(HookPoint::BlockOutput) {
                    hooks.activation(l - 1, HookPoint::BlockOutput, &x);
                }
                if want.contains(HookPoint::BlockInput) {
                    hooks.activation(l, HookPoint::BlockInput, &x);
                }
                match super::recompute::checkpointed_block(block, x, rope, self.compute) {
                    Ok(out) => {
                        x = out;
                        continue;
                    }
                    // Not the training backend: this block as usual (its hooks said above).
                    Err(back) => x = back,
                }
            }
            let normed;
            (x, normed) = match mlp_out.take() {
                Some(mlp) => block.attn_norm.forward_residual(x, mlp),
                None => {
                    let normed = block.attn_norm.forward(x.clone());
                    (x, normed)
                }
            };
            if !recompute {
                if l > 0 && want.contains(HookPoint::BlockOutput) {
                    hooks.activation(l - 1, HookPoint::BlockOutput, &x);
                }
                if want.contains(HookPoint::BlockInput) {
                    hooks.activation(l, HookPoint::BlockInput, &x);
                }
            }
            if want.contains(HookPoint::AttnNorm) {
                hooks.activation(l, HookPoint::AttnNorm, &normed);
            }
            let (context, attn) = attend(l, &block.self_attn, normed, rope);
            if let Some(context) = context
                && want.contains(HookPoint::AttnContext)
            {
                hooks.activation(l, HookPoint::AttnContext, &context);
            }
            let attn = match &block.post_attn_norm {
                Some(norm) => norm.forward(attn),
                None => attn,
            };
            let (h, normed) = block.mlp_norm.forward_residual(x, attn);
            if want.contains(HookPoint::MlpNorm) {
                hooks.activation(l, HookPoint::MlpNorm, &normed);
            }
            let (inter, mlp) = block.mlp.forward(normed, self.compute);
            if want.contains(HookPoint::MlpIntermediate) {
                hooks.activation(l, HookPoint::MlpIntermediate, &inter);
            }
            drop(inter);
            x = h;
            mlp_out = Some(match &block.post_mlp_norm {
                Some(norm) => norm.forward(mlp),
                None => mlp,
            });
        }
        match mlp_out {
            Some(mlp) => {
                let (x, normed) = self.norm.forward_residual(x, mlp);
                if want.contains(HookPoint::BlockOutput) {
                    hooks.activation(self.layers.len() - 1, HookPoint::BlockOutput, &x);
                }
                normed
            }
            None => {
                if recompute && want.contains(HookPoint::BlockOutput) && !self.layers.is_empty() {
                    hooks.activation(self.layers.len() - 1, HookPoint::BlockOutput, &x);
                }
                self.norm.forward(x)
            }
        }
    }

    /// Projects hidden states to logits: `[batch, seq, hidden] -> [batch, seq, vocab]` (soft-capped
    /// where the family caps them).
    pub fn logits_of(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let logits = match &self.lm_head {
            Some(w) => linear(hidden, w, self.compute),
            None => {
                let [b, s, h] = hidden.dims();
                let e = self.embed_tokens.val();
                let v = e.dims()[0];
                let rows = hidden.reshape([b * s, h]);
                let logits = match self.compute {
                    Compute::F32 => fast::trained_matmul_transposed(rows, e)
                        .unwrap_or_else(|(rows, e)| matmul(rows, e.transpose(), self.compute)),
                    Compute::Bf16 => matmul(rows, e.transpose(), self.compute),
                };
                logits.reshape([b, s, v])
            }
        };
        match self.extras.final_softcap {
            Some(cap) => softcap(logits, cap),
            None => logits,
        }
    }

    /// The output head as one f32 matrix `[hidden, vocab]` (the tied embedding, transposed, where
    /// the family ties it; cast where it is held in bf16) and the logits' soft-cap (Gemma 2),
    /// what [`Self::logits_of`] applies.
    pub fn head(&self) -> (Tensor<B, 2>, Option<f64>) {
        let w = match &self.lm_head {
            Some(w) => w.val(),
            None => self.embed_tokens.val().transpose(),
        };
        (w.cast(FloatDType::F32), self.extras.final_softcap)
    }

    /// `tokens [batch, seq] -> logits [batch, seq, vocab]`
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.logits_of(self.hidden(tokens, &mut NoHooks))
    }

    pub fn forward_with_hooks(
        &self,
        tokens: Tensor<B, 2, Int>,
        hooks: &mut dyn Hooks<B>,
    ) -> Tensor<B, 3> {
        self.logits_of(self.hidden(tokens, hooks))
    }
}

/// Whether the query at `query` sees the key at `key`: causal, and within `window` positions
/// where the layer slides (transformers' `q - k < window`).
pub fn attends(query: usize, key: usize, window: Option<usize>) -> bool {
    key <= query && !window.is_some_and(|w| query >= key + w)
}

/// Token ids as a `[batch, seq]` int tensor.
pub fn tokens_tensor<B: Backend>(
    ids: &[u32],
    batch: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let data: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(data, [batch, ids.len() / batch]), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::checkpoint::load_model;
    use burn::backend::Flex;

    fn golden(name: &str) -> crate::model::checkpoint::LoadedModel {
        load_model(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/golden")
                .join(name),
        )
        .unwrap()
    }

    /// Max |a - b| and max |b|.
    fn max_diff(a: &[f32], b: &[f32]) -> (f32, f32) {
        a.iter().zip(b).fold((0f32, 0f32), |(d, m), (x, y)| {
            (d.max((x - y).abs()), m.max(y.abs()))
        })
    }

    #[test]
    fn bf16_compute_and_stored_bf16_matrices_stay_near_f32() {
        let m = golden("llama-gqa-tied-f32");
        let device = Default::default();
        let ids: Vec<u32> = (0..24).map(|i| (i * 7 % 50) as u32).collect();
        let logits = |d: &Decoder<Flex>| {
            d.forward(tokens_tensor::<Flex>(&ids, 2, &device))
                .into_data()
                .to_vec::<f32>()
                .unwrap()
        };
        let f32_model = Decoder::<Flex>::load(&m.config, &m.weights, &device).unwrap();
        let exact = logits(&f32_model);
        let bf16 = f32_model.with_compute(Compute::Bf16);
        let mixed = logits(&bf16);
        let (diff, scale) = max_diff(&mixed, &exact);
        // bf16 keeps 8 bits of mantissa: products are off by parts in 1e3, never by parts in 10.
        assert!(
            diff > 1e-6,
            "bf16 compute gave f32 logits: the casts did nothing"
        );
        assert!(
            diff < 0.05 * scale,
            "max |Δ| {diff} against max |logit| {scale}"
        );
        let stored = bf16.store_matrices_in_compute_dtype();
        assert_eq!(
            stored.layers[0].mlp.up_proj.val().dtype(),
            burn::tensor::DType::BF16
        );
        assert_eq!(
            stored.layers[0].attn_norm.weight.val().dtype(),
            burn::tensor::DType::F32
        );
        // Stored bf16 matrices round once what bf16 compute rounds at every matmul; only the
        // embedding rows entering the residual stream differ (rounded here, f32 there).
        let (diff, _) = max_diff(&logits(&stored), &exact);
        assert!(
            diff < 0.05 * scale,
            "stored: max |Δ| {diff} against max |logit| {scale}"
        );
    }

    /// Autodiff over Flex with a checkpointing strategy: neither Flex nor the training backend,
    /// so every op takes the tensor-op path, the reference of the fused ones.
    type Reference = burn::backend::Autodiff<
        Flex,
        burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing,
    >;

    /// The training step's fused ops with their own backward (the product, RMSNorm and
    /// LayerNorm, SwiGLU and GeGLU, RoPE, the attention: `distillery_kernels::training` and
    /// `::attention`) against autodiff through the tensor-op path, in the logits and in every
    /// parameter's gradient.
    #[test]
    fn training_ops_equal_the_tensor_op_path_in_logits_and_every_gradient() {
        type T = crate::runtime::TrainBackend;
        use burn::module::ModuleVisitor;
        use burn::tensor::backend::AutodiffBackend;

        /// Every parameter's gradient, in visiting order.
        struct Collect<'a, A: AutodiffBackend> {
            grads: &'a A::Gradients,
            out: Vec<Vec<f32>>,
        }
        impl<A: AutodiffBackend> ModuleVisitor<A> for Collect<'_, A> {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<A, D>>) {
                let g = p
                    .val()
                    .grad(self.grads)
                    .expect("every parameter has a gradient");
                self.out
                    .push(g.into_data().convert::<f32>().to_vec::<f32>().unwrap());
            }
        }

        // GQA with tied embeddings; a sliding window; Gemma 2's capped scores, offset norms and
        // local layers, GeGLU; Qwen 3's q/k norms; Phi-3's partial rotary factor and fused
        // projections; Nemotron's LayerNorm1p (with bias) and squared-ReLU MLP.
        for name in [
            "llama-gqa-tied-f32",
            "mistral-window-f16",
            "family-gemma2",
            "family-qwen3",
            "family-phi3",
            "family-nemotron",
        ] {
            let m = golden(name);
            let device = Default::default();
            // 2 sequences of 37: odd row counts for every op.
            let ids: Vec<u32> = (0..74).map(|i| (i * 11 % 60) as u32).collect();
            fn run<A: AutodiffBackend>(
                m: &crate::model::checkpoint::LoadedModel,
                ids: &[u32],
                device: &A::Device,
            ) -> (Vec<f32>, Vec<Vec<f32>>) {
                let d = Decoder::<A>::load(&m.config, &m.weights, device).unwrap();
                let logits = d.forward(tokens_tensor::<A>(ids, 2, device));
                let grads = (logits.clone() * logits.clone().detach().sin())
                    .sum()
                    .backward();
                let mut collect = Collect::<A> {
                    grads: &grads,
                    out: Vec::new(),
                };
                d.visit(&mut collect);
                let values = logits.into_data().convert::<f32>().to_vec::<f32>().unwrap();
                (values, collect.out)
            }
            let (logits, grads) = run::<T>(&m, &ids, &device);
            let (want, want_grads) = run::<Reference>(&m, &ids, &device);
            let (diff, scale) = max_diff(&logits, &want);
            assert!(
                diff <= 1e-5 * scale.max(1.0),
                "{name}: logits max |Δ| {diff}"
            );
            assert_eq!(grads.len(), want_grads.len());
            for (i, (got, want)) in grads.iter().zip(&want_grads).enumerate() {
                let (diff, scale) = max_diff(got, want);
                assert!(
                    diff <= 1e-5 * scale,
                    "{name}: parameter {i}'s gradient max |Δ| {diff} of {scale}"
                );
            }
        }
    }

    /// Recomputing each block in the backward gives the gradients of keeping its activations:
    /// the same operations, so the same bits where the gradient contributions to the residual
    /// stream are summed in the same order (Llama, Phi-3), within 1e-6 where they are not
    /// (Gemma 2's extra norms, Qwen 3's q/k norms: about 3e-7 measured).
    #[test]
    fn recomputed_blocks_give_the_same_gradients() {
        type T = crate::runtime::TrainBackend;
        use crate::train::precision::{Precision, StateDType, hold_main_params};
        let bf16_held = Precision {
            main_params: StateDType::Bf16,
            ..Precision::default()
        };
        // f32; bf16 compute; bf16 compute with the matrices held in bf16 (their gradients too).
        let settings = [
            (Compute::F32, Precision::default()),
            (Compute::Bf16, Precision::default()),
            (Compute::Bf16, bf16_held),
        ];
        for name in [
            "llama-gqa-tied-f32",
            "family-gemma2",
            "family-qwen3",
            "family-phi3",
            "family-nemotron",
        ] {
            for (compute, precision) in settings {
                let m = golden(name);
                let device = Default::default();
                let ids: Vec<u32> = (0..40).map(|i| (i * 7 % 50) as u32).collect();
                let run = |recompute: bool| {
                    let d = Decoder::<T>::load(&m.config, &m.weights, &device)
                        .unwrap()
                        .with_compute(compute)
                        .with_recompute(recompute);
                    let d = hold_main_params(d, precision);
                    let mut hooks = BlockOutputsProbe(HashMap::new());
                    let logits =
                        d.forward_with_hooks(tokens_tensor::<T>(&ids, 2, &device), &mut hooks);
                    // The hooked block outputs stay on the graph, as the hidden-state loss uses
                    // them.
                    let hooked = hooks
                        .0
                        .values()
                        .map(|t| t.clone().powf_scalar(2.0).mean())
                        .fold(Tensor::<T, 1>::zeros([1], &device), |a, b| a + b);
                    let loss = (logits.clone() * logits.clone().detach().cos()).sum() + hooked;
                    let grads = loss.backward();
                    fn v<const D: usize>(t: Tensor<crate::runtime::Backend, D>) -> Vec<f32> {
                        t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
                    }
                    let mut out = vec![v(logits.inner())];
                    for block in [&d.layers[0], d.layers.last().unwrap()] {
                        out.push(v(block.self_attn.q_proj.grad(&grads).unwrap()));
                        out.push(v(block.mlp.down_proj.grad(&grads).unwrap()));
                        out.push(v(block.attn_norm.weight.grad(&grads).unwrap()));
                    }
                    out.push(v(d.embed_tokens.grad(&grads).unwrap()));
                    out
                };
                let (recomputed, kept) = (run(true), run(false));
                for (i, (got, want)) in recomputed.iter().zip(&kept).enumerate() {
                    let (diff, scale) = max_diff(got, want);
                    assert!(
                        diff <= 1e-6 * scale,
                        "{name} {compute:?} {precision:?} tensor {i}: max |Δ| {diff} of {scale}"
                    );
                }
            }
        }
    }

    /// Collects every block's output.
    struct BlockOutputsProbe(HashMap<usize, Tensor<crate::runtime::TrainBackend, 3>>);

    impl Hooks<crate::runtime::TrainBackend> for BlockOutputsProbe {
        fn wants(&self) -> HookSet {
            HookSet::of(&[HookPoint::BlockOutput])
        }
        fn activation(
            &mut self,
            layer: usize,
            _: HookPoint,
            t: &Tensor<crate::runtime::TrainBackend, 3>,
        ) {
            self.0.insert(layer, t.clone());
        }
    }

    #[test]
    fn the_fused_cpu_path_equals_the_tensor_op_path() {
        type A = Reference;
        for name in [
            "llama-gqa-tied-f32",
            "mistral-window-f16",
            "llama3-untied-bf16-sharded",
        ] {
            let m = golden(name);
            let device = Default::default();
            let ids: Vec<u32> = (0..40).map(|i| (i * 11 % 60) as u32).collect();
            let fused = Decoder::<Flex>::load(&m.config, &m.weights, &device)
                .unwrap()
                .forward(tokens_tensor::<Flex>(&ids, 2, &device))
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            let reference = Decoder::<A>::load(&m.config, &m.weights, &device)
                .unwrap()
                .forward(tokens_tensor::<A>(&ids, 2, &device))
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            let (diff, scale) = max_diff(&fused, &reference);
            assert!(diff <= 1e-5 * scale.max(1.0), "{name}: max |Δ| {diff}");
        }
    }

    #[test]
    fn bf16_compute_trains_f32_weights_with_f32_gradients_near_the_f32_ones() {
        use burn::backend::Autodiff;
        type A = Autodiff<Flex>;
        let m = golden("llama-gqa-tied-f32");
        let device = Default::default();
        let ids: Vec<u32> = (0..16).map(|i| (i * 5 % 40) as u32).collect();
        let grad = |c: Compute| {
            let d = Decoder::<A>::load(&m.config, &m.weights, &device)
                .unwrap()
                .with_compute(c);
            let loss = d
                .forward(tokens_tensor::<A>(&ids, 2, &device))
                .powf_scalar(2.0)
                .mean();
            let grads = loss.backward();
            let g = d.layers[0]
                .mlp
                .gate_proj
                .as_ref()
                .unwrap()
                .val()
                .grad(&grads)
                .unwrap();
            assert_eq!(g.dtype(), burn::tensor::DType::F32);
            g.into_data().to_vec::<f32>().unwrap()
        };
        let (exact, mixed) = (grad(Compute::F32), grad(Compute::Bf16));
        let (diff, scale) = max_diff(&mixed, &exact);
        assert!(
            diff > 0.0 && diff < 0.05 * scale,
            "max |Δ| {diff} against {scale}"
        );
    }

    #[test]
    fn the_broadcast_causal_bias_equals_the_materialized_one() {
        let m = load_model(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/golden/mistral-window-f16"),
        )
        .unwrap();
        let device = Default::default();
        let d = Decoder::<Flex>::load(&m.config, &m.weights, &device).unwrap();
        let w = d.layers[0].self_attn.sliding_window;
        assert!(w.is_some());
        let full = d.causal_bias_up_to(2, 9, w, usize::MAX, &device);
        let small = d.causal_bias_up_to(2, 9, w, 0, &device);
        assert_eq!(small.dims()[..2], [1, 1]);
        let shape = full.dims();
        assert_eq!(
            small.expand(shape).into_data().to_vec::<f32>().unwrap(),
            full.into_data().to_vec::<f32>().unwrap()
        );
    }
}
