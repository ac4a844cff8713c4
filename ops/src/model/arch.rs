//! The model families distillery reads and writes, as data: one [`Family`] row per Hugging Face
//! architecture says how its decoder differs from Llama's (norm kind and offset, sandwich norms,
//! q/k norms, gated or plain MLP, packed projections, biases, attention windows, soft-caps,
//! embedding scale), and [`tensor_specs`] derives from it and a config every tensor of a
//! checkpoint: its Hugging Face name, its role in the decoder, and the axis each of its
//! dimensions runs along. Loading, saving, shape checks, parameter counts and pruning all iterate
//! that one list, so adding a family is adding a row (as mergekit's architecture manifests and
//! transformers' `base_model_tp_plan` describe a model's weights).

/// How a family's norms compute (`[.., d]` over the last dimension).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NormKind {
    /// `x / sqrt(mean(x²) + eps) * (offset + w)`: Llama's RMSNorm (offset 0) or Gemma's (offset 1,
    /// `Gemma2RMSNorm`: the checkpoint stores `w`, the model scales by `1 + w`).
    Rms { offset: f32 },
    /// Nemotron's `LayerNorm1p`: `layer_norm(x, weight + 1, bias, eps)`, mean-centred, with a bias.
    LayerNorm1p,
}

impl NormKind {
    /// Whether norm tensors have a `.bias` beside `.weight`.
    pub fn has_bias(self) -> bool {
        matches!(self, NormKind::LayerNorm1p)
    }

    /// The constant added to the stored weight before scaling.
    pub fn offset(self) -> f32 {
        match self {
            NormKind::Rms { offset } => offset,
            NormKind::LayerNorm1p => 1.0,
        }
    }
}

/// Which layers attend through a sliding window, as transformers runs each family.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum WindowRule {
    /// No layer, whatever `sliding_window` says (Llama ignores the field).
    Never,
    /// Every layer, by `sliding_window` when set (Mistral, Phi-3).
    Every,
    /// Per layer from `layer_types`; without it, the family's default pattern.
    LayerTypes(DefaultPattern),
}

/// The `layer_types` transformers derives when a config has none.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DefaultPattern {
    /// Qwen2/Qwen3: sliding from layer `max_window_layers` on, when `use_sliding_window`.
    QwenMaxWindowLayers,
    /// Gemma 2: even layers sliding, odd full.
    Alternating,
    /// Gemma 3: every `sliding_window_pattern`-th layer full (default 6), the rest sliding.
    EveryNthFull,
}

/// Which attention projections carry a bias.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AttentionBias {
    /// q, k and v always (Qwen2), o never.
    QkvAlways,
    /// q, k, v and o when `attention_bias` is true (Llama, Mistral's absent field is false).
    FromConfig,
    /// Never (Gemma's `attention_bias` must be false; Phi-3 has none).
    Never,
}

/// One model family: everything about its forward that a config does not say.
#[derive(Debug, PartialEq)]
pub struct Family {
    /// `architectures[0]` in config.json.
    pub architecture: &'static str,
    pub model_type: &'static str,
    pub norm: NormKind,
    /// The config key of the norms' epsilon.
    pub eps_key: &'static str,
    /// Gemma's sandwich: each sublayer's output is normed again before the residual add
    /// (`post_attention_layernorm` after attention, `pre_`/`post_feedforward_layernorm` around the
    /// MLP). Otherwise `post_attention_layernorm` is the MLP's input norm.
    pub sandwich: bool,
    /// Per-head RMSNorm over head_dim on queries and keys before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// SwiGLU/GeGLU (`down(act(gate) * up)`) or a plain MLP (`down(act(up))`, Nemotron).
    pub gated_mlp: bool,
    /// Phi-3's fused `qkv_proj` and `gate_up_proj`.
    pub packed: bool,
    pub attention_bias: AttentionBias,
    /// Whether `mlp_bias` is read (Llama, Nemotron); elsewhere the MLP has no bias.
    pub mlp_bias_key: bool,
    /// The config key naming the activation, and its default.
    pub act_key: &'static str,
    pub default_act: &'static str,
    /// Gemma multiplies the embeddings by √hidden_size (rounded to the compute dtype).
    pub embed_scale: bool,
    /// Gemma 2: `attn_logit_softcapping` and `final_logit_softcapping`; Gemma 3: read, must be null.
    pub softcaps: bool,
    /// Gemma: attention scaled by `query_pre_attn_scalar^-0.5` instead of `head_dim^-0.5`.
    pub query_pre_attn_scalar: bool,
    /// Gemma 3: RoPE per layer type (`rope_parameters.{sliding,full}_attention`, or the legacy
    /// `rope_local_base_freq` for sliding layers with `rope_theta`/`rope_scaling` for full ones).
    pub rope_per_layer_type: bool,
    /// Whether `partial_rotary_factor` below 1 is run (Phi-3, Nemotron); the others rotate whole
    /// heads and transformers fails on anything else.
    pub partial_rotary: bool,
    /// Whether transformers 4.46's class reads `partial_rotary_factor` (Nemotron does; Phi-3's
    /// came in 4.49, so 4.46 rotates whole heads).
    pub partial_rotary_in_446: bool,
    /// transformers 4.x's class derives `head_dim = hidden_size / num_attention_heads` and
    /// ignores the field (Qwen2, Phi-3 in 4.46): a pruned hidden size must keep the product.
    pub head_dim_derived_in_4x: bool,
    /// transformers 4.x alternates windows by layer index and ignores `layer_types` (Gemma 2).
    pub windows_by_index_in_4x: bool,
    pub windows: WindowRule,
    pub default_rope_theta: f64,
    pub default_eps: f64,
    /// transformers' default `sliding_window` when the key is absent (an explicit null is none).
    pub default_sliding_window: Option<usize>,
    /// transformers' default `partial_rotary_factor` (Nemotron 0.5).
    pub default_partial_rotary: f64,
    /// transformers' default `head_dim` when the key is absent (Qwen3 128, Gemma 256); `None`:
    /// hidden_size / num_attention_heads.
    pub default_head_dim: Option<usize>,
    /// transformers' default soft-caps when the keys are absent (Gemma 2: 50 and 30).
    pub default_softcaps: (Option<f64>, Option<f64>),
    /// Whether linear/llama3 `rope_scaling` is accepted (Phi-3's config refuses them: it knows
    /// only longrope, which distillery refuses by name).
    pub rope_scaling: bool,
    /// llama.cpp's `general.architecture` for this family.
    pub gguf_arch: &'static str,
    /// Whether llama.cpp's converter interleaves the RoPE halves of q_proj/k_proj rows
    /// (`LlamaModel.permute`; only the Llama architecture does).
    pub gguf_permutes_qk: bool,
}

const LLAMA_LIKE: Family = Family {
    architecture: "LlamaForCausalLM",
    model_type: "llama",
    norm: NormKind::Rms { offset: 0.0 },
    eps_key: "rms_norm_eps",
    sandwich: false,
    qk_norm: false,
    gated_mlp: true,
    packed: false,
    attention_bias: AttentionBias::FromConfig,
    mlp_bias_key: true,
    act_key: "hidden_act",
    default_act: "silu",
    embed_scale: false,
    softcaps: false,
    query_pre_attn_scalar: false,
    rope_per_layer_type: false,
    partial_rotary: false,
    partial_rotary_in_446: true,
    head_dim_derived_in_4x: false,
    windows_by_index_in_4x: false,
    windows: WindowRule::Never,
    default_rope_theta: 10000.0,
    default_eps: 1e-6,
    default_sliding_window: None,
    default_partial_rotary: 1.0,
    default_head_dim: None,
    default_softcaps: (None, None),
    rope_scaling: true,
    gguf_arch: "llama",
    gguf_permutes_qk: true,
};

pub const LLAMA: Family = LLAMA_LIKE;

pub const MISTRAL: Family = Family {
    architecture: "MistralForCausalLM",
    model_type: "mistral",
    attention_bias: AttentionBias::Never,
    mlp_bias_key: false,
    windows: WindowRule::Every,
    default_sliding_window: Some(4096),
    ..LLAMA_LIKE
};

pub const QWEN2: Family = Family {
    architecture: "Qwen2ForCausalLM",
    model_type: "qwen2",
    attention_bias: AttentionBias::QkvAlways,
    head_dim_derived_in_4x: true,
    mlp_bias_key: false,
    windows: WindowRule::LayerTypes(DefaultPattern::QwenMaxWindowLayers),
    gguf_arch: "qwen2",
    gguf_permutes_qk: false,
    ..LLAMA_LIKE
};

pub const QWEN3: Family = Family {
    architecture: "Qwen3ForCausalLM",
    model_type: "qwen3",
    qk_norm: true,
    mlp_bias_key: false,
    windows: WindowRule::LayerTypes(DefaultPattern::QwenMaxWindowLayers),
    default_head_dim: Some(128),
    gguf_arch: "qwen3",
    gguf_permutes_qk: false,
    ..LLAMA_LIKE
};

pub const GEMMA2: Family = Family {
    architecture: "Gemma2ForCausalLM",
    model_type: "gemma2",
    norm: NormKind::Rms { offset: 1.0 },
    sandwich: true,
    attention_bias: AttentionBias::Never,
    mlp_bias_key: false,
    act_key: "hidden_activation",
    default_act: "gelu_pytorch_tanh",
    embed_scale: true,
    softcaps: true,
    query_pre_attn_scalar: true,
    windows_by_index_in_4x: true,
    windows: WindowRule::LayerTypes(DefaultPattern::Alternating),
    default_sliding_window: Some(4096),
    default_head_dim: Some(256),
    default_softcaps: (Some(50.0), Some(30.0)),
    gguf_arch: "gemma2",
    gguf_permutes_qk: false,
    ..LLAMA_LIKE
};

pub const GEMMA3: Family = Family {
    architecture: "Gemma3ForCausalLM",
    model_type: "gemma3_text",
    qk_norm: true,
    rope_per_layer_type: true,
    // Gemma 3 came with transformers 4.50, which reads layer_types' predecessor pattern; 4.46
    // has no Gemma 3 at all.
    windows_by_index_in_4x: false,
    windows: WindowRule::LayerTypes(DefaultPattern::EveryNthFull),
    // The full-attention layers' base; the sliding ones default to 10000.
    default_rope_theta: 1_000_000.0,
    default_softcaps: (None, None),
    gguf_arch: "gemma3",
    ..GEMMA2
};

pub const PHI3: Family = Family {
    architecture: "Phi3ForCausalLM",
    model_type: "phi3",
    packed: true,
    partial_rotary: true,
    partial_rotary_in_446: false,
    head_dim_derived_in_4x: true,
    attention_bias: AttentionBias::Never,
    mlp_bias_key: false,
    windows: WindowRule::Every,
    default_eps: 1e-5,
    rope_scaling: false,
    gguf_arch: "phi3",
    gguf_permutes_qk: false,
    ..LLAMA_LIKE
};

pub const NEMOTRON: Family = Family {
    architecture: "NemotronForCausalLM",
    model_type: "nemotron",
    norm: NormKind::LayerNorm1p,
    eps_key: "norm_eps",
    gated_mlp: false,
    partial_rotary: true,
    default_act: "relu2",
    default_eps: 1e-5,
    default_partial_rotary: 0.5,
    gguf_arch: "nemotron",
    gguf_permutes_qk: false,
    ..LLAMA_LIKE
};

/// Every family, in the order error messages list them.
pub static FAMILIES: [&Family; 8] = [
    &LLAMA, &MISTRAL, &QWEN2, &QWEN3, &GEMMA2, &GEMMA3, &PHI3, &NEMOTRON,
];

impl Family {
    pub fn by_architecture(name: &str) -> Option<&'static Family> {
        FAMILIES.iter().copied().find(|f| f.architecture == name)
    }

    pub fn by_model_type(name: &str) -> Option<&'static Family> {
        FAMILIES.iter().copied().find(|f| f.model_type == name)
    }

    /// "LlamaForCausalLM, MistralForCausalLM, ..." for messages.
    pub fn supported() -> String {
        FAMILIES
            .iter()
            .map(|f| f.architecture)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The MLP's activation, from `hidden_act` / `hidden_activation` (transformers' `ACT2FN` names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(x)` ("silu", "swish").
    Silu,
    /// The tanh approximation of GELU ("gelu_pytorch_tanh", "gelu_new", "gelu_fast" differ only in
    /// how the constant is written; distillery accepts "gelu_pytorch_tanh" and "gelu_new").
    GeluTanh,
    /// Exact GELU with erf ("gelu").
    Gelu,
    /// `relu(x)²` ("relu2", Nemotron).
    Relu2,
}

impl Activation {
    pub fn from_name(name: &str) -> Option<Activation> {
        Some(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_new" => Activation::GeluTanh,
            "gelu" => Activation::Gelu,
            "relu2" => Activation::Relu2,
            _ => return None,
        })
    }

    /// This activation as the gate of a fused gated MLP, where the training op has one.
    pub fn glu(self) -> Option<distillery_kernels::fused::GluActivation> {
        use distillery_kernels::fused::GluActivation;
        match self {
            Activation::Silu => Some(GluActivation::Silu),
            Activation::GeluTanh => Some(GluActivation::GeluTanh),
            Activation::Gelu | Activation::Relu2 => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
            Activation::Gelu => "gelu",
            Activation::Relu2 => "relu2",
        }
    }
}

/// What a tensor is to the decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Embed,
    Head,
    FinalNorm,
    FinalNormBias,
    /// The attention's input norm (`input_layernorm`).
    AttnNorm,
    AttnNormBias,
    /// The MLP's input norm (`post_attention_layernorm`, or Gemma's `pre_feedforward_layernorm`).
    MlpNorm,
    MlpNormBias,
    /// Gemma's norm of the attention output (`post_attention_layernorm`).
    PostAttnNorm,
    /// Gemma's norm of the MLP output (`post_feedforward_layernorm`).
    PostMlpNorm,
    Q,
    K,
    V,
    O,
    QBias,
    KBias,
    VBias,
    OBias,
    QNorm,
    KNorm,
    /// Phi-3's `qkv_proj`: q heads, then k groups, then v groups, along the rows.
    Qkv,
    Gate,
    Up,
    Down,
    /// Phi-3's `gate_up_proj`: gate rows, then up rows.
    GateUp,
    GateBias,
    UpBias,
    DownBias,
}

impl Role {
    /// llama.cpp's tensor name for this role (gguf-py `TENSOR_NAMES`, the same in every family:
    /// Gemma's `pre_feedforward_layernorm` and Llama's `post_attention_layernorm` are both
    /// `ffn_norm`, Phi-3's fused projections are `attn_qkv` and `ffn_up`).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Role::Embed => "token_embd.weight",
            Role::Head => "output.weight",
            Role::FinalNorm => "output_norm.weight",
            Role::FinalNormBias => "output_norm.bias",
            Role::AttnNorm => "attn_norm.weight",
            Role::AttnNormBias => "attn_norm.bias",
            Role::MlpNorm => "ffn_norm.weight",
            Role::MlpNormBias => "ffn_norm.bias",
            Role::PostAttnNorm => "post_attention_norm.weight",
            Role::PostMlpNorm => "post_ffw_norm.weight",
            Role::Q => "attn_q.weight",
            Role::K => "attn_k.weight",
            Role::V => "attn_v.weight",
            Role::O => "attn_output.weight",
            Role::QBias => "attn_q.bias",
            Role::KBias => "attn_k.bias",
            Role::VBias => "attn_v.bias",
            Role::OBias => "attn_output.bias",
            Role::QNorm => "attn_q_norm.weight",
            Role::KNorm => "attn_k_norm.weight",
            Role::Qkv => "attn_qkv.weight",
            Role::Gate => "ffn_gate.weight",
            Role::Up | Role::GateUp => "ffn_up.weight",
            Role::Down => "ffn_down.weight",
            Role::GateBias => "ffn_gate.bias",
            Role::UpBias => "ffn_up.bias",
            Role::DownBias => "ffn_down.bias",
        }
    }

    /// A norm's scale (not its bias): llama.cpp stores `offset + w` for families whose norm adds
    /// an offset (Gemma, Nemotron), so that ggml's plain norm multiplies by the right factor.
    pub fn is_norm_scale(self) -> bool {
        matches!(
            self,
            Role::FinalNorm
                | Role::AttnNorm
                | Role::MlpNorm
                | Role::PostAttnNorm
                | Role::PostMlpNorm
                | Role::QNorm
                | Role::KNorm
        )
    }
}

impl TensorSpec {
    /// The tensor's GGUF name (`blk.3.attn_q.weight`, `token_embd.weight`).
    pub fn gguf_name(&self) -> String {
        match self.layer {
            Some(l) => format!("blk.{l}.{}", self.role.gguf_name()),
            None => self.role.gguf_name().to_string(),
        }
    }
}

/// What one dimension of a tensor indexes, so a pruner knows which kept indices apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    /// Vocabulary rows, never pruned.
    Vocab,
    /// Residual-stream channels (one index per hidden channel).
    Hidden,
    /// MLP neurons of the block.
    Ffn,
    /// Whole query heads, head_dim indices each.
    QHeads,
    /// Whole KV groups, head_dim indices each.
    KvHeads,
    /// Within one head (q/k norms): kept whole.
    HeadDim,
    /// Phi-3's qkv rows: `QHeads`, `KvHeads`, `KvHeads` concatenated.
    PackedQkv,
    /// Phi-3's gate_up rows: `Ffn` twice.
    PackedGateUp,
}

/// One tensor of a checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    /// The Hugging Face name (`model.layers.3.self_attn.q_proj.weight`).
    pub name: String,
    /// The block it belongs to; `None` for embedding, final norm and head.
    pub layer: Option<usize>,
    pub role: Role,
    /// What each dimension indexes, in Hugging Face layout (`[out, in]` for matrices).
    pub axes: Vec<Axis>,
}

/// The features of one config that decide which tensors exist.
#[derive(Clone, Copy, Debug)]
pub struct TensorFeatures {
    pub layers: usize,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
}

/// Every tensor of a checkpoint of `family` with `features`, in a stable order (embedding,
/// blocks in order, final norm, head).
pub fn tensor_specs(family: &Family, f: TensorFeatures) -> Vec<TensorSpec> {
    use Axis::*;
    let mut out = vec![TensorSpec {
        name: "model.embed_tokens.weight".into(),
        layer: None,
        role: Role::Embed,
        axes: vec![Vocab, Hidden],
    }];
    let norm_bias = family.norm.has_bias();
    for l in 0..f.layers {
        let mut push = |suffix: &str, role: Role, axes: &[Axis]| {
            out.push(TensorSpec {
                name: format!("model.layers.{l}.{suffix}"),
                layer: Some(l),
                role,
                axes: axes.to_vec(),
            })
        };
        push("input_layernorm.weight", Role::AttnNorm, &[Hidden]);
        if norm_bias {
            push("input_layernorm.bias", Role::AttnNormBias, &[Hidden]);
        }
        if family.packed {
            push("self_attn.qkv_proj.weight", Role::Qkv, &[PackedQkv, Hidden]);
        } else {
            push("self_attn.q_proj.weight", Role::Q, &[QHeads, Hidden]);
            push("self_attn.k_proj.weight", Role::K, &[KvHeads, Hidden]);
            push("self_attn.v_proj.weight", Role::V, &[KvHeads, Hidden]);
        }
        if f.qkv_bias {
            push("self_attn.q_proj.bias", Role::QBias, &[QHeads]);
            push("self_attn.k_proj.bias", Role::KBias, &[KvHeads]);
            push("self_attn.v_proj.bias", Role::VBias, &[KvHeads]);
        }
        push("self_attn.o_proj.weight", Role::O, &[Hidden, QHeads]);
        if f.o_bias {
            push("self_attn.o_proj.bias", Role::OBias, &[Hidden]);
        }
        if family.qk_norm {
            push("self_attn.q_norm.weight", Role::QNorm, &[HeadDim]);
            push("self_attn.k_norm.weight", Role::KNorm, &[HeadDim]);
        }
        if family.sandwich {
            push(
                "post_attention_layernorm.weight",
                Role::PostAttnNorm,
                &[Hidden],
            );
            push("pre_feedforward_layernorm.weight", Role::MlpNorm, &[Hidden]);
            push(
                "post_feedforward_layernorm.weight",
                Role::PostMlpNorm,
                &[Hidden],
            );
        } else {
            push("post_attention_layernorm.weight", Role::MlpNorm, &[Hidden]);
            if norm_bias {
                push(
                    "post_attention_layernorm.bias",
                    Role::MlpNormBias,
                    &[Hidden],
                );
            }
        }
        if family.packed {
            push(
                "mlp.gate_up_proj.weight",
                Role::GateUp,
                &[PackedGateUp, Hidden],
            );
        } else {
            if family.gated_mlp {
                push("mlp.gate_proj.weight", Role::Gate, &[Ffn, Hidden]);
            }
            push("mlp.up_proj.weight", Role::Up, &[Ffn, Hidden]);
        }
        push("mlp.down_proj.weight", Role::Down, &[Hidden, Ffn]);
        if f.mlp_bias {
            if family.gated_mlp {
                push("mlp.gate_proj.bias", Role::GateBias, &[Ffn]);
            }
            push("mlp.up_proj.bias", Role::UpBias, &[Ffn]);
            push("mlp.down_proj.bias", Role::DownBias, &[Hidden]);
        }
    }
    out.push(TensorSpec {
        name: "model.norm.weight".into(),
        layer: None,
        role: Role::FinalNorm,
        axes: vec![Hidden],
    });
    if norm_bias {
        out.push(TensorSpec {
            name: "model.norm.bias".into(),
            layer: None,
            role: Role::FinalNormBias,
            axes: vec![Hidden],
        });
    }
    if !f.tie_word_embeddings {
        out.push(TensorSpec {
            name: "lm_head.weight".into(),
            layer: None,
            role: Role::Head,
            axes: vec![Vocab, Hidden],
        });
    }
    out
}

/// The sizes of the axes for one config: `[Vocab, Hidden, Ffn, QHeads, KvHeads, HeadDim]` in
/// indices (heads count head_dim indices each).
#[derive(Clone, Copy, Debug)]
pub struct AxisSizes {
    pub vocab: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AxisSizes {
    pub fn len(&self, axis: Axis) -> usize {
        match axis {
            Axis::Vocab => self.vocab,
            Axis::Hidden => self.hidden,
            Axis::Ffn => self.ffn,
            Axis::QHeads => self.heads * self.head_dim,
            Axis::KvHeads => self.kv_heads * self.head_dim,
            Axis::HeadDim => self.head_dim,
            Axis::PackedQkv => (self.heads + 2 * self.kv_heads) * self.head_dim,
            Axis::PackedGateUp => 2 * self.ffn,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(f: &Family, feat: TensorFeatures) -> Vec<String> {
        tensor_specs(f, feat)
            .into_iter()
            .filter(|s| s.layer.is_none_or(|l| l == 0))
            .map(|s| s.name)
            .collect()
    }

    const ONE: TensorFeatures = TensorFeatures {
        layers: 1,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        tie_word_embeddings: true,
    };

    #[test]
    fn llama_has_the_nine_block_tensors_transformers_names() {
        assert_eq!(
            names(&LLAMA, ONE),
            [
                "model.embed_tokens.weight",
                "model.layers.0.input_layernorm.weight",
                "model.layers.0.self_attn.q_proj.weight",
                "model.layers.0.self_attn.k_proj.weight",
                "model.layers.0.self_attn.v_proj.weight",
                "model.layers.0.self_attn.o_proj.weight",
                "model.layers.0.post_attention_layernorm.weight",
                "model.layers.0.mlp.gate_proj.weight",
                "model.layers.0.mlp.up_proj.weight",
                "model.layers.0.mlp.down_proj.weight",
                "model.norm.weight",
            ]
        );
    }

    #[test]
    fn every_role_appears_once_per_block() {
        for f in FAMILIES {
            let specs = tensor_specs(
                f,
                TensorFeatures {
                    layers: 2,
                    qkv_bias: true,
                    o_bias: true,
                    mlp_bias: true,
                    tie_word_embeddings: false,
                },
            );
            let mut seen = std::collections::HashSet::new();
            for s in &specs {
                assert!(seen.insert((s.layer, s.role)), "{}: {s:?}", f.architecture);
            }
            let names: std::collections::HashSet<_> = specs.iter().map(|s| &s.name).collect();
            assert_eq!(names.len(), specs.len(), "{}", f.architecture);
        }
    }
}
