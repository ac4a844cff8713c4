"""By-hand check of `distillery export --format gguf` against transformers' own GGUF loader.

Run by hand (never in CI) in a venv with torch, transformers>=5 and gguf, after `cargo build`:
    python tests/golden/check_gguf_export.py [path/to/distillery]
For each family model of tests/golden (with the byte-level tokenizer of gguf-tokenizer/), it
prunes the MLP width through a recipe, exports the pruned step as Hugging Face safetensors and
as GGUF (f32, f16, q8_0), then loads the HF export with transformers and each GGUF file with
`from_pretrained(dir, gguf_file=...)` and prints max |Δlogit| against the HF export. It also
reads every GGUF file with gguf-py's GGUFReader (an independent parser) and checks the
provenance keys. transformers' GGUF loader does not read every key llama.cpp does (Phi-3's window,
Gemma's soft-caps and query scale come from its config defaults), so families whose tiny models
use non-default values there are reported, not failed.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BIN = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "debug", "distillery")
# Config patches: what llama.cpp cannot run (Qwen windows, Gemma's query scale and pattern), and
# what transformers' GGUF loader does not read (llama3 rope_freqs, Gemma 2's soft-caps) set to
# the values it assumes.
CASES = {
    "llama3-untied-bf16-sharded": {"rope_scaling": None},
    "family-qwen2": {"use_sliding_window": False, "layer_types": None},
    "family-qwen3": {},
    "family-gemma2": {"query_pre_attn_scalar": 12, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "family-gemma3_text": {"layer_types": ["sliding_attention"] * 3},
    "family-phi3": {},
    "family-nemotron": {},
}
RECIPE = """
[sources.m]
kind = "model"
path = "model"

[steps.pruned]
op = "prune"
inputs = { model = "sources.m" }
params = { method = "magnitude", intermediate_size = FFN }
"""


def run(*args, cwd):
    subprocess.run([BIN, *args], cwd=cwd, check=True, capture_output=True)


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def main():
    ids = [1, 5, 9, 23, 40, 77, 3, 101, 150, 12, 64, 2]
    for name, patch in CASES.items():
        with tempfile.TemporaryDirectory() as work:
            model = os.path.join(work, "model")
            shutil.copytree(os.path.join(HERE, name), model)
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(os.path.join(HERE, "gguf-tokenizer", f), model)
            cfg_path = os.path.join(model, "config.json")
            cfg = json.load(open(cfg_path))
            for k, v in patch.items():
                if v is None:
                    cfg.pop(k, None)
                else:
                    cfg[k] = v
            json.dump(cfg, open(cfg_path, "w"))
            with open(os.path.join(work, "r.toml"), "w") as f:
                # The MLP narrower: transformers' GGUF loader derives head_dim from hidden / heads
                # for most families, so the hidden size keeps its relation to the heads.
                f.write(RECIPE.replace("FFN", str(cfg["intermediate_size"] // 2)))
            env = dict(os.environ, DISTILLERY_CACHE=os.path.join(work, "cache"))
            subprocess.run([BIN, "run", "r.toml"], cwd=work, check=True, capture_output=True, env=env)
            hf = os.path.join(work, "hf")
            subprocess.run([BIN, "export", "r.toml", "pruned", "--to", hf, "--copy"], cwd=work, check=True, capture_output=True, env=env)
            hf_model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
            ref = logits(hf_model, ids)
            ref_state = hf_model.state_dict()
            out = []
            for quant in ("f32", "f16", "q8_0"):
                gdir = os.path.join(work, f"gguf-{quant}")
                os.makedirs(gdir)
                file = os.path.join(gdir, "model.gguf")
                subprocess.run([BIN, "export", "r.toml", "pruned", "--to", file, "--format", "gguf", "--quant", quant],
                               cwd=work, check=True, capture_output=True, env=env)
                reader = GGUFReader(file)
                keys = {f for f in reader.fields}
                assert "distillery.key" in keys and "tokenizer.ggml.tokens" in keys, keys
                try:
                    m = AutoModelForCausalLM.from_pretrained(gdir, gguf_file="model.gguf", dtype=torch.float32)
                    got = logits(m, ids)
                    state = m.state_dict()
                    weights = max((state[k] - v).abs().max().item() for k, v in ref_state.items())
                    differs = {k: (m.config.to_dict().get(k), v) for k, v in hf_model.config.to_dict().items()
                               if k in ("query_pre_attn_scalar", "head_dim", "partial_rotary_factor", "sliding_window")
                               and m.config.to_dict().get(k) != v}
                    note = f" (config read differently: {differs})" if differs else ""
                    out.append(f"{quant} logits {np.abs(got - ref).max():.2e}, weights {weights:.2e}{note}")
                except Exception as e:  # noqa: BLE001 - reported per case
                    out.append(f"{quant} transformers refused: {type(e).__name__}: {str(e)[:120]}")
            print(f"{name}: GGUF through transformers' loader vs the HF export, max |Δ|: " + "; ".join(out))


if __name__ == "__main__":
    main()
