"""By-hand check that every family's pruned export loads in transformers 5.x and 4.46+ with the
logits distillery computes. For each tests/golden/family-* checkpoint: a recipe prunes it (by
weight magnitude: hidden, ffn, one KV group, one layer) and `distillery export` writes it; then
transformers 5.x (this venv) and, where the family exists there, transformers 4.46 (PYTHONPATH
given by T446, default /work/t446) load the export and compute logits on the golden's input_ids,
and ops/tests/export_parity.rs compares distillery's own logits with them.

It also commits the check for CI: tests/golden/family-*/export-target.json (the prune target) and
export-logits.safetensors (input_ids and transformers 5.x's f32 logits of the export), which
ops/tests/prune.rs reproduces without Python.

    DISTILLERY=target/debug/distillery python tests/golden/check_families_export.py
"""
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DISTILLERY = os.environ.get("DISTILLERY", os.path.join(ROOT, "target/debug/distillery"))
T446 = os.environ.get("T446", "/work/t446")
# Families transformers 4.46 has (Qwen3 came in 4.51, Gemma 3 in 4.50). Qwen2 is left out: the
# golden has sliding layers (from max_window_layers), and 4.46's eager Qwen2 windows every layer
# by `sliding_window` whatever `use_sliding_window` says (it logs "Sliding Window Attention is
# enabled but not implemented for `eager`"), so 4.46 computes another model than 5.x for the source
# checkpoint itself. Qwen2 exports without sliding layers load in 4.46 like the Llama ones.
IN_446 = {"gemma2", "phi3", "nemotron"}

LOGITS = r'''
import sys, torch, transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
path, golden, out = sys.argv[1:4]
ids = load_file(golden)["input_ids"]
t = {"input_ids": ids}
for dtype, name in ((torch.float32, "logits"), (torch.float64, "logits_f64")):
    m = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, attn_implementation="eager").eval()
    with torch.no_grad():
        t[name] = m(ids).logits.contiguous()
save_file(t, out)
print("  transformers", transformers.__version__, type(m).__name__, tuple(t["logits"].shape))
'''


def main():
    failures = []
    for fam in sorted(d for d in os.listdir(HERE) if d.startswith("family-")):
        model_type = fam[len("family-"):]
        src = os.path.join(HERE, fam)
        cfg = json.load(open(os.path.join(src, "config.json")))
        work = tempfile.mkdtemp(prefix=fam + "-")
        # Shapes every promised transformers loads as the same model (see
        # PruneTarget::loadability_problems): one KV group, with its heads, is dropped; Qwen2 and
        # Phi-3 in 4.x derive head_dim from hidden_size; Gemma 2 in 4.x alternates windows by index.
        heads = cfg["num_attention_heads"] // cfg["num_key_value_heads"] * (cfg["num_key_value_heads"] - 1)
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        hidden = heads * head_dim if model_type in ("qwen2", "phi3") else cfg["hidden_size"] - heads * 2
        drop = 2 if model_type == "gemma2" else 1
        recipe = os.path.join(work, "recipe.toml")
        open(recipe, "w").write(f'''
[recipe]
name = "{fam}-export-check"
seed = 1

[sources.model]
kind = "model"
path = "{src}"

[steps.pruned]
op = "prune"
inputs = {{ model = "sources.model" }}
params = {{ method = "magnitude", hidden_size = {hidden}, intermediate_size = {cfg["intermediate_size"] // 2}, num_key_value_heads = 1, drop_layers = [{drop}], dtype = "float32" }}
''')
        json.dump({"hidden_size": hidden, "intermediate_size": cfg["intermediate_size"] // 2,
                   "num_key_value_heads": 1, "drop_layers": [drop]},
                  open(os.path.join(src, "export-target.json"), "w"))
        env = dict(os.environ, DISTILLERY_CACHE=os.path.join(work, "cache"))
        subprocess.run([DISTILLERY, "run", recipe], check=True, env=env, stdout=subprocess.DEVNULL)
        out = os.path.join(work, "export")
        subprocess.run([DISTILLERY, "export", recipe, "pruned", "--to", out], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        print(fam)
        pythons = [("5.x", {})]
        if model_type in IN_446:
            pythons.append(("4.46", {"PYTHONPATH": T446}))
        for label, extra in pythons:
            logits = os.path.join(work, f"logits-{label}.safetensors")
            r = subprocess.run([sys.executable, "-c", LOGITS, out, os.path.join(src, "golden.safetensors"), logits],
                               env=dict(os.environ, **extra), capture_output=True, text=True)
            if r.returncode != 0:
                failures.append(f"{fam} ({label}): transformers failed: {r.stderr.strip().splitlines()[-1]}")
                print(r.stderr[-2000:])
                continue
            print(r.stdout.rstrip())
            if label == "5.x":
                from safetensors.torch import load_file, save_file
                t = load_file(logits)
                save_file({"input_ids": t["input_ids"], "logits": t["logits"].float().contiguous()},
                          os.path.join(src, "export-logits.safetensors"))
            t = subprocess.run(["cargo", "test", "-q", "-p", "distillery-ops", "--test", "export_parity", "--",
                                "--nocapture"], cwd=ROOT, capture_output=True, text=True,
                               env=dict(os.environ, DISTILLERY_CHECK_MODEL=out, DISTILLERY_CHECK_LOGITS=logits))
            lines = [l for l in (t.stdout + t.stderr).splitlines() if "|Δ" in l or "max" in l.lower()]
            print("  " + "\n  ".join(lines[:4]))
            if t.returncode != 0:
                failures.append(f"{fam} ({label}): distillery disagrees")
    print("FAILURES:" if failures else "all families: exports load and agree", *failures, sep="\n")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
