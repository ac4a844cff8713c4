//! The Llama/Mistral decoder on Burn, generic over the backend:
//! `h = x + attn(norm(x)); h + mlp(norm(h))`, with RoPE, grouped-query attention, SwiGLU and an
//! explicit head_dim. Linear weights are held transposed (contiguous `[in, out]`) so a projection
//! is one matmul; loading and saving translate from and to Hugging Face's `[out, in]`.

use burn::module::{Module, Param};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Int, Tensor, TensorData};

use crate::model::ModelError;
use crate::model::config::{ModelConfig, RopeScaling};
use crate::model::fast;
use crate::model::weights::Weights;

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

#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// `[batch, seq, d] -> [batch, seq, d]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = match fast::rms_norm(x, &self.weight.val(), self.eps) {
            Ok(y) => return y,
            Err(x) => x,
        };
        let var = x.clone().powf_scalar(2.0).mean_dim(2);
        let x = x * (var + self.eps).sqrt().recip();
        x * self.weight.val().unsqueeze_dims::<3>(&[0, 1])
    }

    /// The residual add before a norm: `(h, norm(h))` with `h = x + delta`, in one pass on the
    /// CPU fast path.
    pub fn forward_residual(
        &self,
        x: Tensor<B, 3>,
        delta: Tensor<B, 3>,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        match fast::add_rms_norm(x, delta, &self.weight.val(), self.eps) {
            Ok(pair) => pair,
            Err((x, delta)) => {
                let h = x + delta;
                (h.clone(), self.forward(h))
            }
        }
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
        Compute::F32 => match fast::matmul(a, b) {
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

/// Largest causal bias materialized to the scores' full shape (elements, 256 MiB of f32); past it
/// the bias stays `[1, 1, seq * rep, seq]` and broadcasts.
const MATERIALIZED_BIAS_LIMIT: usize = 1 << 26;

/// Largest RoPE table materialized over the batch (elements, 64 MiB of f32).
const MATERIALIZED_ROPE_LIMIT: usize = 1 << 24;

/// Rotary embeddings for one forward, built once and shared by every layer. Hugging Face's
/// `rotate_half` convention (pairs (i, i + d/2)): `x * cos + rotate_half(x) * sin`, with
/// `rotate_half` as a matmul by a signed permutation (exact in f32), which keeps every step
/// contiguous; slicing and concatenating halves went through strided copies.
pub struct Rope<B: Backend> {
    /// `[seq, head_dim]` row-major, for the fused host loop.
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// The tables as tensors for the tensor-op path; None on the fast path (Flex), which reads
    /// `cos`/`sin` directly.
    tensors: Option<RopeTensors<B>>,
}

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
        let half = inv_freq.len();
        let d = 2 * half;
        let (mut cos, mut sin) = (Vec::with_capacity(seq * d), Vec::with_capacity(seq * d));
        for pos in 0..seq {
            let angles: Vec<f32> = inv_freq.iter().map(|f| pos as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        let tensors = (!fast::is_flex::<B>())
            .then(|| RopeTensors::new(&cos, &sin, d, batch, seq, heads, kv_heads, device));
        Rope { cos, sin, tensors }
    }

    /// `x [batch, seq, n, head_dim]` with `n` the query (`keys` false) or KV head count.
    fn apply(&self, x: Tensor<B, 4>, keys: bool) -> Tensor<B, 4> {
        let x = match fast::rope(x, &self.cos, &self.sin) {
            Ok(y) => return y,
            Err(x) => x,
        };
        let [b, s, n, d] = x.dims();
        let built;
        let t = match &self.tensors {
            Some(t) => t,
            None => {
                built = RopeTensors::new(&self.cos, &self.sin, d, b, s, n, n, &x.device());
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
    /// `x: [batch, seq, hidden]`; `bias()` gives the additive mask `[batch, kv_heads, seq * rep,
    /// seq]` or one broadcastable to it (0 where attention is allowed, -inf where not; `rep` query
    /// heads per KV group, rows ordered (position, head)), built only when a path needs it. Returns
    /// the context before o_proj `[batch, seq, heads * head_dim]` and the output
    /// `[batch, seq, hidden]`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        bias: &dyn Fn() -> Tensor<B, 4>,
        c: Compute,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let [b, s, _] = x.dims();
        let (h, kvh, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let rep = h / kvh;
        // RoPE in the projections' own layout [batch, seq, heads, head_dim].
        let q = rope.apply(
            linear(x.clone(), &self.q_proj, c).reshape([b, s, h, d]),
            false,
        );
        let k = rope.apply(
            linear(x.clone(), &self.k_proj, c).reshape([b, s, kvh, d]),
            true,
        );
        let v = linear(x, &self.v_proj, c).reshape([b, s, kvh, d]);
        // Scaled by multiplying, as transformers does (`head_dim ** -0.5`).
        let scale = (d as f64).powf(-0.5);
        let fused = match c {
            // The fused CPU attention multiplies in f32; bf16 compute keeps the tensor ops.
            Compute::F32 => fast::causal_attention(q, k, v, self.sliding_window, scale as f32),
            Compute::Bf16 => Err((q, k, v)),
        };
        let context = match fused {
            Ok(context) => context.reshape([b, s, h * d]),
            Err((q, k, v)) => {
                let v = v.swap_dims(1, 2); // [b, kvh, s, d]
                // Grouped-query attention: the `rep` query heads of a KV group are stacked with
                // the positions, rows (position, head), so each group is one matmul against its
                // K and V (no copies of K/V) and one transpose of [seq, group] blocks gets there.
                let q =
                    q.reshape([b, s, kvh, rep * d])
                        .swap_dims(1, 2)
                        .reshape([b, kvh, s * rep, d]);
                let k_t = k.swap_dims(1, 2).swap_dims(2, 3); // [b, kvh, d, s]
                let scores = matmul(q, k_t, c);
                let bias = bias();
                let probs = match fast::attention_probs(scores, scale as f32, &bias) {
                    Ok(probs) => probs,
                    Err(scores) => softmax(scores * scale + bias, 3),
                };
                matmul(probs, v, c) // [b, kvh, s * rep, d]
                    .reshape([b, kvh, s, rep * d])
                    .swap_dims(1, 2)
                    .reshape([b, s, h * d])
            }
        };
        let out = linear(context.clone(), &self.o_proj, c);
        (context, out)
    }
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `[hidden, ffn]`
    pub gate_proj: Param<Tensor<B, 2>>,
    pub up_proj: Param<Tensor<B, 2>>,
    /// `[ffn, hidden]`
    pub down_proj: Param<Tensor<B, 2>>,
}

impl<B: Backend> Mlp<B> {
    /// `[batch, seq, hidden] -> ([batch, seq, ffn] intermediate, [batch, seq, hidden])`
    pub fn forward(&self, x: Tensor<B, 3>, c: Compute) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let gate = linear(x.clone(), &self.gate_proj, c);
        let inter = match fast::swiglu(gate, linear(x, &self.up_proj, c)) {
            Ok(inter) => inter,
            Err((gate, up)) => silu(gate) * up,
        };
        let out = linear(inter.clone(), &self.down_proj, c);
        (inter, out)
    }
}

#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Attention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: Mlp<B>,
}

#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    /// `[vocab, hidden]`
    pub embed_tokens: Param<Tensor<B, 2>>,
    pub layers: Vec<Block<B>>,
    pub norm: RmsNorm<B>,
    /// `[hidden, vocab]`; None when tied to the embedding.
    pub lm_head: Option<Param<Tensor<B, 2>>>,
    /// RoPE inverse frequencies `[head_dim / 2]`, already scaled (llama3).
    pub inv_freq: Vec<f32>,
    /// The dtype matmuls run in (f32 unless [`Decoder::with_compute`] says otherwise).
    #[module(skip)]
    pub compute: Compute,
}

/// RoPE inverse frequencies `[head_dim / 2]`, with linear or Llama 3.1 scaling where configured. Rounded the way
/// transformers computes them (the exponent in f32, the power rounded to f32, then the
/// reciprocal and the scaling in f32): an ulp of difference here grows with the position into
/// logit differences of 1e-4 at a few hundred tokens.
pub fn rope_inv_freq(config: &ModelConfig) -> Vec<f32> {
    let d = config.head_dim;
    let mut inv: Vec<f32> = (0..d / 2)
        .map(|i| {
            let x = (2 * i) as f32 / d as f32;
            1.0f32 / (config.rope_theta.powf(x as f64) as f32)
        })
        .collect();
    apply_rope_scaling(&mut inv, config.rope_scaling.as_ref());
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

fn param2<B: Backend>(
    w: &Weights,
    name: &str,
    transpose: bool,
    device: &B::Device,
) -> Result<Param<Tensor<B, 2>>, ModelError> {
    let (shape, data) = w.f32(name)?;
    let (rows, cols) = (shape[0], shape[1]);
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
    Ok(Param::from_tensor(Tensor::<B, 2>::from_data(t, device)))
}

fn param1<B: Backend>(
    w: &Weights,
    name: &str,
    device: &B::Device,
) -> Result<Param<Tensor<B, 1>>, ModelError> {
    let (shape, data) = w.f32(name)?;
    Ok(Param::from_tensor(Tensor::<B, 1>::from_data(
        TensorData::new(data, [shape[0]]),
        device,
    )))
}

impl<B: Backend> Decoder<B> {
    /// Builds the decoder from checkpoint tensors (already checked against `config`).
    pub fn load(
        config: &ModelConfig,
        weights: &Weights,
        device: &B::Device,
    ) -> Result<Decoder<B>, ModelError> {
        let eps = config.rms_norm_eps;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}");
            layers.push(Block {
                input_layernorm: RmsNorm {
                    weight: param1(weights, &format!("{p}.input_layernorm.weight"), device)?,
                    eps,
                },
                self_attn: Attention {
                    q_proj: param2(
                        weights,
                        &format!("{p}.self_attn.q_proj.weight"),
                        true,
                        device,
                    )?,
                    k_proj: param2(
                        weights,
                        &format!("{p}.self_attn.k_proj.weight"),
                        true,
                        device,
                    )?,
                    v_proj: param2(
                        weights,
                        &format!("{p}.self_attn.v_proj.weight"),
                        true,
                        device,
                    )?,
                    o_proj: param2(
                        weights,
                        &format!("{p}.self_attn.o_proj.weight"),
                        true,
                        device,
                    )?,
                    n_heads: config.num_attention_heads,
                    n_kv_heads: config.num_key_value_heads,
                    head_dim: config.head_dim,
                    sliding_window: config.window_of(l),
                },
                post_attention_layernorm: RmsNorm {
                    weight: param1(
                        weights,
                        &format!("{p}.post_attention_layernorm.weight"),
                        device,
                    )?,
                    eps,
                },
                mlp: Mlp {
                    gate_proj: param2(weights, &format!("{p}.mlp.gate_proj.weight"), true, device)?,
                    up_proj: param2(weights, &format!("{p}.mlp.up_proj.weight"), true, device)?,
                    down_proj: param2(weights, &format!("{p}.mlp.down_proj.weight"), true, device)?,
                },
            });
        }
        Ok(Decoder {
            embed_tokens: param2(weights, "model.embed_tokens.weight", false, device)?,
            layers,
            norm: RmsNorm {
                weight: param1(weights, "model.norm.weight", device)?,
                eps,
            },
            lm_head: if config.tie_word_embeddings {
                None
            } else {
                Some(param2(weights, "lm_head.weight", true, device)?)
            },
            inv_freq: rope_inv_freq(config),
            compute: Compute::F32,
        })
    }

    /// Runs the matmuls in `compute` from now on.
    pub fn with_compute(mut self, compute: Compute) -> Self {
        self.compute = compute;
        self
    }

    /// Stores the matrices (projections, embedding, head) in the compute dtype, for a frozen model:
    /// a bf16 teacher holds 2 bytes per parameter instead of 4. Norm weights stay f32.
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
                        gate_proj: cast(b.mlp.gate_proj),
                        up_proj: cast(b.mlp.up_proj),
                        down_proj: cast(b.mlp.down_proj),
                    },
                    ..b
                })
                .collect(),
            lm_head: self.lm_head.map(cast),
            ..self
        }
    }

    /// Every tensor under its Hugging Face name and layout, as f32 (for saving).
    pub fn named_tensors(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut out = Vec::new();
        let mut push2 = |name: String, p: &Param<Tensor<B, 2>>, transpose: bool| {
            let t = if transpose {
                p.val().transpose()
            } else {
                p.val()
            };
            let shape = t.dims().to_vec();
            out.push((
                name,
                shape,
                t.into_data().convert::<f32>().to_vec::<f32>().unwrap(),
            ));
        };
        push2(
            "model.embed_tokens.weight".into(),
            &self.embed_tokens,
            false,
        );
        for (l, b) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            push2(
                format!("{p}.self_attn.q_proj.weight"),
                &b.self_attn.q_proj,
                true,
            );
            push2(
                format!("{p}.self_attn.k_proj.weight"),
                &b.self_attn.k_proj,
                true,
            );
            push2(
                format!("{p}.self_attn.v_proj.weight"),
                &b.self_attn.v_proj,
                true,
            );
            push2(
                format!("{p}.self_attn.o_proj.weight"),
                &b.self_attn.o_proj,
                true,
            );
            push2(format!("{p}.mlp.gate_proj.weight"), &b.mlp.gate_proj, true);
            push2(format!("{p}.mlp.up_proj.weight"), &b.mlp.up_proj, true);
            push2(format!("{p}.mlp.down_proj.weight"), &b.mlp.down_proj, true);
        }
        if let Some(head) = &self.lm_head {
            push2("lm_head.weight".into(), head, true);
        }
        let mut push1 = |name: String, p: &Param<Tensor<B, 1>>| {
            let t = p.val();
            out.push((
                name,
                t.dims().to_vec(),
                t.into_data().convert::<f32>().to_vec::<f32>().unwrap(),
            ));
        };
        for (l, b) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            push1(
                format!("{p}.input_layernorm.weight"),
                &b.input_layernorm.weight,
            );
            push1(
                format!("{p}.post_attention_layernorm.weight"),
                &b.post_attention_layernorm.weight,
            );
        }
        push1("model.norm.weight".into(), &self.norm.weight);
        out
    }

    /// The additive attention mask `[batch, kv_heads, seq * rep, seq]` for `rep` query heads
    /// stacked per KV group (rows ordered (position, head)): -inf above the diagonal and outside
    /// Mistral's sliding window, else 0. Built once per forward and shared by every layer;
    /// materialized to the scores' shape where the tensor-op softmax adds it (Flex's broadcasting
    /// adds are slow), repeating over batch and groups where the fused CPU softmax reads it.
    fn causal_bias(&self, batch: usize, seq: usize, device: &B::Device) -> Tensor<B, 4> {
        // The fused softmax reads a bias that repeats over batch and groups.
        let limit = if fast::is_flex::<B>() {
            0
        } else {
            MATERIALIZED_BIAS_LIMIT
        };
        self.causal_bias_up_to(batch, seq, limit, device)
    }

    fn causal_bias_up_to(
        &self,
        batch: usize,
        seq: usize,
        limit: usize,
        device: &B::Device,
    ) -> Tensor<B, 4> {
        let Some(attn) = self.layers.first().map(|b| &b.self_attn) else {
            return Tensor::zeros([batch, 1, seq, seq], device);
        };
        let rep = attn.n_heads / attn.n_kv_heads;
        let window = attn.sliding_window;
        let mut bias = Vec::with_capacity(rep * seq * seq);
        for i in 0..seq {
            let row: Vec<f32> = (0..seq)
                .map(|j| {
                    let hidden = j > i || window.is_some_and(|w| i >= j + w);
                    if hidden { f32::NEG_INFINITY } else { 0.0 }
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
        let want = hooks.wants();
        let hidden = self.embed_tokens.val().dims()[1];
        let mut x = self
            .embed_tokens
            .val()
            .select(0, tokens.reshape([b * s]))
            .reshape([b, s, hidden])
            .cast(FloatDType::F32);
        let rope = match self.layers.first() {
            Some(block) => {
                let a = &block.self_attn;
                Rope::new(&self.inv_freq, b, s, a.n_heads, a.n_kv_heads, &device)
            }
            None => Rope::new(&self.inv_freq, b, s, 1, 1, &device),
        };
        // Built on first use, once per forward: the fused CPU attention needs none.
        let bias_cell = std::cell::OnceCell::new();
        let bias = || {
            bias_cell
                .get_or_init(|| self.causal_bias(b, s, &device))
                .clone()
        };
        // Each block's MLP output is added to the residual stream by the next norm (the next
        // block's input norm, or the final one), fused with it on the CPU fast path.
        let mut mlp_out: Option<Tensor<B, 3>> = None;
        for (l, block) in self.layers.iter().enumerate() {
            let normed;
            (x, normed) = match mlp_out.take() {
                Some(mlp) => block.input_layernorm.forward_residual(x, mlp),
                None => {
                    let normed = block.input_layernorm.forward(x.clone());
                    (x, normed)
                }
            };
            if l > 0 && want.contains(HookPoint::BlockOutput) {
                hooks.activation(l - 1, HookPoint::BlockOutput, &x);
            }
            if want.contains(HookPoint::BlockInput) {
                hooks.activation(l, HookPoint::BlockInput, &x);
            }
            if want.contains(HookPoint::AttnNorm) {
                hooks.activation(l, HookPoint::AttnNorm, &normed);
            }
            let (context, attn) = block.self_attn.forward(normed, &rope, &bias, self.compute);
            if want.contains(HookPoint::AttnContext) {
                hooks.activation(l, HookPoint::AttnContext, &context);
            }
            drop(context);
            let (h, normed) = block.post_attention_layernorm.forward_residual(x, attn);
            if want.contains(HookPoint::MlpNorm) {
                hooks.activation(l, HookPoint::MlpNorm, &normed);
            }
            let (inter, mlp) = block.mlp.forward(normed, self.compute);
            if want.contains(HookPoint::MlpIntermediate) {
                hooks.activation(l, HookPoint::MlpIntermediate, &inter);
            }
            drop(inter);
            x = h;
            mlp_out = Some(mlp);
        }
        match mlp_out {
            Some(mlp) => {
                let (x, normed) = self.norm.forward_residual(x, mlp);
                if want.contains(HookPoint::BlockOutput) {
                    hooks.activation(self.layers.len() - 1, HookPoint::BlockOutput, &x);
                }
                normed
            }
            None => self.norm.forward(x),
        }
    }

    /// Projects hidden states to logits: `[batch, seq, hidden] -> [batch, seq, vocab]`.
    pub fn logits_of(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(w) => linear(hidden, w, self.compute),
            None => {
                let [b, s, h] = hidden.dims();
                let e = self.embed_tokens.val();
                let v = e.dims()[0];
                matmul(hidden.reshape([b * s, h]), e.transpose(), self.compute).reshape([b, s, v])
            }
        }
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
            stored.layers[0].input_layernorm.weight.val().dtype(),
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

    #[test]
    fn the_fused_cpu_path_equals_the_tensor_op_path() {
        use burn::backend::Autodiff;
        // Autodiff<Flex> is not Flex: it takes the tensor-op path, the reference here.
        type A = Autodiff<Flex>;
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
            let g = d.layers[0].mlp.gate_proj.val().grad(&grads).unwrap();
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
        let full = d.causal_bias_up_to(2, 9, usize::MAX, &device);
        let small = d.causal_bias_up_to(2, 9, 0, &device);
        assert_eq!(small.dims()[..2], [1, 1]);
        let shape = full.dims();
        assert_eq!(
            small.expand(shape).into_data().to_vec::<f32>().unwrap(),
            full.into_data().to_vec::<f32>().unwrap()
        );
    }
}
