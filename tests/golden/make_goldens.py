"""Builds tiny random Llama/Mistral checkpoints with transformers and records their logits.

Run by hand (never in CI) in a venv with torch and transformers:
    python tests/golden/make_goldens.py
It writes tests/golden/<name>/ (a Hugging Face checkpoint) and tests/golden/<name>/golden.safetensors
(input_ids [2, 12] int64, logits [2, 12, vocab] float32). The Rust tests compare distillery's logits
against these: max |Δlogit| ≤ 1e-4.
"""
import json
import os
import shutil

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))

CASES = [
    # GQA, explicit head_dim != hidden/heads, tied embeddings, f32 on disk.
    dict(name="llama-gqa-tied-f32", cls="llama", dtype=torch.float32, shard=None,
         cfg=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=24, vocab_size=128, tie_word_embeddings=True,
                  rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=128)),
    # Untied head, bf16 on disk, Llama 3.1 rope scaling, sharded with an index.
    dict(name="llama3-untied-bf16-sharded", cls="llama", dtype=torch.bfloat16, shard="40KB",
         cfg=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=3, head_dim=16, vocab_size=160, tie_word_embeddings=False,
                  rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=64,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                    high_freq_factor=4.0, original_max_position_embeddings=16))),
    # Mistral with a sliding window shorter than the input, MQA, f16 on disk.
    dict(name="mistral-window-f16", cls="mistral", dtype=torch.float16, shard=None,
         cfg=dict(hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=12, vocab_size=96, tie_word_embeddings=False,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=64, sliding_window=5)),
]


def main():
    torch.manual_seed(0)
    for case in CASES:
        out = os.path.join(HERE, case["name"])
        shutil.rmtree(out, ignore_errors=True)
        if case["cls"] == "llama":
            config = LlamaConfig(**case["cfg"], attn_implementation="eager")
            model = LlamaForCausalLM(config)
        else:
            config = MistralConfig(**case["cfg"], attn_implementation="eager")
            model = MistralForCausalLM(config)
        # Random init is tiny (std 0.02); widen it so logits differ meaningfully.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                else:
                    p.copy_(0.2 * torch.randn_like(p))
        model = model.to(case["dtype"])
        kwargs = dict(safe_serialization=True)
        if case["shard"]:
            kwargs["max_shard_size"] = case["shard"]
        model.save_pretrained(out, **kwargs)
        # Reference logits: the checkpoint as transformers loads it, computed in float32 (converting the
        # model in memory instead would also round its RoPE buffer to the storage dtype).
        cls = LlamaForCausalLM if case["cls"] == "llama" else MistralForCausalLM
        ref = cls.from_pretrained(out, torch_dtype=torch.float32, attn_implementation="eager").eval()
        ids = torch.randint(0, case["cfg"]["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits = ref(ids).logits.float().contiguous()
        save_file({"input_ids": ids.to(torch.int64), "logits": logits}, os.path.join(out, "golden.safetensors"))
        print(case["name"], "logits", tuple(logits.shape), "files", sorted(os.listdir(out)))


if __name__ == "__main__" and not os.environ.get("ONLY_IMPORTANCE"):
    main()
    importance_goldens()


def importance_goldens():
    """Minitron importance of llama-gqa-tied-f32 on its golden input_ids (one batch of 2), computed
    independently with forward hooks: tests/golden/llama-gqa-tied-f32/importance.safetensors."""
    from safetensors.torch import load_file
    out = os.path.join(HERE, "llama-gqa-tied-f32")
    model = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32, attn_implementation="eager").eval()
    ids = load_file(os.path.join(out, "golden.safetensors"))["input_ids"]
    cfg = model.config
    acts = {}

    def keep(name, use_input):
        def hook(mod, inp, outp):
            acts[name] = (inp[0] if use_input else outp).detach().float()
        return hook

    hooks = []
    for l, layer in enumerate(model.model.layers):
        hooks.append(layer.mlp.down_proj.register_forward_hook(keep(f"mlp.{l}", True)))
        hooks.append(layer.self_attn.o_proj.register_forward_hook(keep(f"attn.{l}", True)))
        hooks.append(layer.input_layernorm.register_forward_hook(keep(f"in_norm.{l}", False)))
        hooks.append(layer.post_attention_layernorm.register_forward_hook(keep(f"post_norm.{l}", False)))
        hooks.append(layer.register_forward_hook(
            lambda mod, inp, outp, l=l: acts.__setitem__(f"block.{l}", (inp[0].detach(), outp[0].detach()))))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()

    def acc(a):  # [b, s, d] -> [d]: sum over batch of (mean over seq of |a|)^2
        return (a.abs().mean(1) ** 2).sum(0)

    result = {}
    hidden = torch.zeros(cfg.hidden_size)
    for l in range(cfg.num_hidden_layers):
        result[f"neurons.{l}"] = acc(acts[f"mlp.{l}"]).sqrt()
        heads = acc(acts[f"attn.{l}"]).sqrt().reshape(cfg.num_attention_heads, cfg.head_dim).norm(dim=1)
        result[f"heads.{l}"] = heads
        result[f"kv_groups.{l}"] = heads.reshape(cfg.num_key_value_heads, -1).sum(1)
        hidden += acc(acts[f"in_norm.{l}"]).sqrt() + acc(acts[f"post_norm.{l}"]).sqrt()
        x, y = acts[f"block.{l}"]
        result.setdefault("layers", []).append(1 - torch.nn.functional.cosine_similarity(x, y, dim=-1).mean())
    result["hidden"] = hidden
    result["layers"] = torch.stack(result["layers"])
    save_file({k: v.contiguous().float() for k, v in result.items()}, os.path.join(out, "importance.safetensors"))
    print("importance goldens", sorted(result))


if __name__ == "__main__" and os.environ.get("ONLY_IMPORTANCE"):
    importance_goldens()
