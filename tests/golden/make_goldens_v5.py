"""Tiny random checkpoints saved by transformers 5.x (configs as 5.x writes them: `rope_parameters`,
`dtype`, `layer_types`), with their logits, and an evaluation golden on one of them.

Run by hand (never in CI) in a venv with torch and transformers>=5:
    python tests/golden/make_goldens_v5.py
It writes tests/golden/<name>/ (the checkpoint, golden.safetensors with input_ids [2, 12] int64 and
logits [2, 12, vocab] float32, as make_goldens.py does). The Rust tests compare distillery's logits
against these (max |Δlogit| ≤ 1e-4) and check that configs read from 5.x round-trip.

The `v5-llama-bos-chartok` case also gets the char tokenizer of tests/golden/char-tokenizer.json, a
tokenizer_config.json with a BOS distinct from the EOS (as Llama tokenizers have), and
eval-golden.json: rolling log-likelihoods of tests/golden/eval-text.txt computed independently here
with lm-evaluation-harness 0.4's windowing (prefix token = the tokenizer's BOS), for the
evaluate op's test.
"""
import json
import os
import shutil

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

assert int(transformers.__version__.split(".")[0]) >= 5, transformers.__version__
HERE = os.path.dirname(os.path.abspath(__file__))

CASES = [
    # What a Llama-3.1-style checkpoint fine-tuned with current HF tools looks like: theta and
    # llama3 scaling inside rope_parameters, no top-level rope_theta.
    dict(name="v5-llama3-rope-parameters", dtype=torch.float32,
         cfg=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=16, vocab_size=160, tie_word_embeddings=False,
                  rms_norm_eps=1e-5, max_position_embeddings=64,
                  rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=16))),
    # Linear position interpolation, theta inside rope_parameters.
    dict(name="v5-llama-linear", dtype=torch.bfloat16,
         cfg=dict(hidden_size=40, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=10, vocab_size=96, tie_word_embeddings=True,
                  rms_norm_eps=1e-6, max_position_embeddings=64,
                  rope_parameters=dict(rope_type="linear", rope_theta=20000.0, factor=2.0))),
    # The evaluation golden's model: default rope with a non-default theta, char tokenizer.
    dict(name="v5-llama-bos-chartok", dtype=torch.float32, tokenizer=True,
         cfg=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, vocab_size=None, tie_word_embeddings=False,
                  rms_norm_eps=1e-5, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                  rope_parameters=dict(rope_type="default", rope_theta=50000.0))),
]


def rolling_loglik(model, ids, prefix, max_len):
    """lm-evaluation-harness 0.4 `get_rolling_token_windows(context_len=1)` + `make_disjoint_window`,
    summed: every token predicted once, each window as long as `max_len` allows."""
    stream = [prefix] + ids
    total, pred = 0.0, 1
    while pred < len(stream):
        end = min(pred + max_len, len(stream))
        start = max(0, end - max_len - 1)
        inp, tgt = stream[start:end - 1], stream[start + 1:end]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([inp])).logits.float(), -1)[0]
        total += float(lp[torch.arange(len(tgt)), torch.tensor(tgt)][-(end - pred):].sum())
        pred = end
    return total


def main():
    torch.manual_seed(0)
    char_tok = json.load(open(os.path.join(HERE, "char-tokenizer.json")))
    for case in CASES:
        out = os.path.join(HERE, case["name"])
        shutil.rmtree(out, ignore_errors=True)
        cfg = dict(case["cfg"])
        if cfg["vocab_size"] is None:
            cfg["vocab_size"] = len(char_tok["model"]["vocab"])
        model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="eager"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                else:
                    p.copy_(0.2 * torch.randn_like(p))
        model = model.to(case["dtype"])
        model.save_pretrained(out, safe_serialization=True)
        saved = json.load(open(os.path.join(out, "config.json")))
        assert "rope_parameters" in saved and "rope_theta" not in saved, saved
        ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
        ids = torch.randint(0, cfg["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits = ref(ids).logits.float().contiguous()
        save_file({"input_ids": ids.to(torch.int64), "logits": logits}, os.path.join(out, "golden.safetensors"))
        if case.get("tokenizer"):
            shutil.copy(os.path.join(HERE, "char-tokenizer.json"), os.path.join(out, "tokenizer.json"))
            vocab = char_tok["model"]["vocab"]
            inv = {v: k for k, v in vocab.items()}
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": inv[1], "eos_token": inv[2]},
                      open(os.path.join(out, "tokenizer_config.json"), "w"))
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
            text = open(os.path.join(HERE, "eval-text.txt")).read()
            enc = tok.encode(text, add_special_tokens=False).ids
            golden = {
                "text": "eval-text.txt",
                "tokens": len(enc),
                "bos_prefix_window_64": rolling_loglik(ref, enc, 1, 64),
                "bos_prefix_window_16": rolling_loglik(ref, enc, 1, 16),
                "eos_prefix_window_64": rolling_loglik(ref, enc, 2, 64),
            }
            json.dump(golden, open(os.path.join(out, "eval-golden.json"), "w"), indent=1)
            print(golden)
        print(case["name"], "logits", tuple(logits.shape), "files", sorted(os.listdir(out)))


if __name__ == "__main__":
    main()
