"""Tiny random checkpoints of every model family distillery reads besides Llama/Mistral (Qwen2,
Qwen3, Gemma 2, Gemma 3 text, Phi-3, Nemotron), built by transformers 5.x from `AutoConfig.for_model`
and saved with `save_pretrained`, with their logits.

Run by hand (never in CI) in a venv with torch and transformers>=5:
    python tests/golden/make_goldens_families.py
It writes tests/golden/family-<model_type>/ (the checkpoint, golden.safetensors with input_ids
[2, 12] int64 and logits [2, 12, vocab] float32), as make_goldens.py does. Each config turns on
the family's features at sizes where they change the logits: windows shorter than the 12 tokens,
soft-caps near the logits' range, per-layer-type RoPE, partial rotary, biases. The Rust tests
(ops/tests/golden.rs) compare distillery's logits against these and check identity pruning.
"""
import json
import os
import shutil

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

assert int(transformers.__version__.split(".")[0]) >= 5, transformers.__version__
HERE = os.path.dirname(os.path.abspath(__file__))

COMMON = dict(hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=6,
              num_key_value_heads=2, vocab_size=160, max_position_embeddings=64,
              bos_token_id=1, eos_token_id=2, pad_token_id=None)

CASES = [
    # Qwen2/2.5: q/k/v biases; a window on the layers from max_window_layers on.
    dict(model_type="qwen2", dtype=torch.float32,
         cfg=dict(tie_word_embeddings=False, rms_norm_eps=1e-6, use_sliding_window=True,
                  sliding_window=4, max_window_layers=1,
                  rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    # Qwen3: per-head q/k RMSNorm over head_dim, explicit head_dim, tied head (as 0.6B).
    dict(model_type="qwen3", dtype=torch.bfloat16,
         cfg=dict(head_dim=16, tie_word_embeddings=True, rms_norm_eps=1e-6,
                  rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    # Gemma 2: (1 + w) norms around each sublayer, GeGLU, √hidden embedding scale, attention and
    # final soft-caps, query_pre_attn_scalar, alternating windows.
    dict(model_type="gemma2", dtype=torch.float32,
         cfg=dict(head_dim=12, tie_word_embeddings=True, rms_norm_eps=1e-6, query_pre_attn_scalar=20,
                  attn_logit_softcapping=3.0, final_logit_softcapping=2.5, sliding_window=4,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    # Gemma 3 text: Gemma 2's block with q/k norms, no soft-caps, a local RoPE base on sliding
    # layers and linear scaling on full ones.
    dict(model_type="gemma3_text", dtype=torch.bfloat16,
         cfg=dict(head_dim=12, tie_word_embeddings=True, rms_norm_eps=1e-6, query_pre_attn_scalar=12,
                  sliding_window=4,
                  layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                  rope_parameters=dict(sliding_attention=dict(rope_type="default", rope_theta=10000.0),
                                       full_attention=dict(rope_type="linear", rope_theta=1000000.0,
                                                           factor=2.0)))),
    # Phi-3: fused qkv_proj and gate_up_proj, a window on every layer.
    dict(model_type="phi3", dtype=torch.float16,
         cfg=dict(tie_word_embeddings=False, rms_norm_eps=1e-5, sliding_window=5,
                  original_max_position_embeddings=64,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    # Nemotron-4 / Minitron: LayerNorm1p with biases, ungated relu² MLP, half-rotary heads.
    dict(model_type="nemotron", dtype=torch.bfloat16,
         cfg=dict(head_dim=16, tie_word_embeddings=False, norm_eps=1e-5,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                       partial_rotary_factor=0.5))),
]


def main():
    torch.manual_seed(0)
    for case in CASES:
        name = "family-" + case["model_type"]
        out = os.path.join(HERE, name)
        shutil.rmtree(out, ignore_errors=True)
        cfg = AutoConfig.for_model(case["model_type"], **{**COMMON, **case["cfg"]})
        cfg._attn_implementation = "eager"
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "norm" in pname and pname.endswith("weight"):
                    p.copy_(0.5 + 0.1 * torch.randn_like(p))
                else:
                    p.copy_(0.2 * torch.randn_like(p))
        model = model.to(case["dtype"])
        model.save_pretrained(out, safe_serialization=True)
        ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
        ids = torch.randint(0, COMMON["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits = ref(ids).logits.float().contiguous()
        save_file({"input_ids": ids.to(torch.int64), "logits": logits}, os.path.join(out, "golden.safetensors"))
        print(name, type(ref).__name__, "logits", tuple(logits.shape), "max |logit|", float(logits.abs().max()),
              "files", sorted(os.listdir(out)))


if __name__ == "__main__":
    main()
