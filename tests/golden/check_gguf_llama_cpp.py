"""By-hand check that llama.cpp loads a GGUF file and gets distillery's perplexity on it.

Run by hand, never in CI, in a venv with numpy and llama-cpp-python (which builds llama.cpp):
    python tests/golden/check_gguf_llama_cpp.py MODEL.gguf TEXT.txt [--window 256]
        [--distillery path/to/distillery] [--threads N] [--f32-kv] [--tolerance 1e-3]

It scores TEXT.txt (the whole file as one document) twice:
  * with llama.cpp (through llama-cpp-python): llama.cpp's own tokenizer, then
    lm-evaluation-harness's loglikelihood_rolling: the stream [prefix] + tokens, where prefix is
    the model's BOS (its EOS if it has none), cut into disjoint windows of `window` predicted
    tokens, each window reading the `window` tokens before its predictions (the first one starts
    with the prefix); log-softmax in float64; token perplexity = exp(-sum / len(tokens));
  * with distillery: a temporary recipe (source model = the GGUF file, an `evaluate` step with the
    same window) run in a temporary cache; its report.json gives perplexity.token_perplexity,
    perplexity.tokens and perplexity.prefix_token.
It prints both perplexities, their relative difference, both token counts and prefix tokens and
whether they agree (distillery adds the tokens the tokenizer's post-processor puts around a text,
as the harness does; llama.cpp's tokenize(add_bos=False) does not, so such a model shows a count
that differs by one: reported, not hidden). Exit status 0 when the counts and prefixes agree and the
perplexities are within --tolerance (relative), 1 otherwise.

Expect about 1e-7 on an f32 file with --f32-kv. llama.cpp's CPU arithmetic rounds elsewhere:
its default KV cache is f16 (~1e-4 on tiny models), F16 matmuls round activations to f16, and
quantized matmuls (Q8_0, Q4_K, ...) quantize activations to 8 bits, which moved a 67M model's
perplexity by 0.6-0.9% where llama.cpp on the same weights dequantized to f32 agreed to 1e-6.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from llama_cpp import Llama

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DEFAULT_BIN = os.path.join(ROOT, "target", "release", "distillery")

RECIPE = """
[sources.m]
kind = "model"
path = {model}

[sources.text]
kind = "dataset"
files = {text}

[steps.ppl]
op = "evaluate"
inputs = {{ model = "sources.m", data = "sources.text" }}
params = {{ window = {window} }}
"""


def log_softmax(logits):
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def llama_cpp_perplexity(model, text, window, threads, f32_kv=False):
    kv = {"type_k": 0, "type_v": 0} if f32_kv else {}  # GGML_TYPE_F32; llama.cpp's default is F16
    llm = Llama(model_path=model, n_ctx=window + 1, n_batch=window + 1, logits_all=True,
                verbose=False, n_threads=threads, **kv)
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    bos, eos = llm.token_bos(), llm.token_eos()
    prefix = bos if bos is not None and bos >= 0 else eos
    stream = [prefix] + list(tokens)
    ll = 0.0
    windows = 0
    pos = 1  # first stream position not yet predicted
    while pos < len(stream):
        end = min(pos + window, len(stream))  # predict stream[pos:end]
        start = max(0, end - window - 1)
        inp = stream[start:end - 1]  # at most `window` tokens, ending just before the last target
        llm.reset()
        llm.eval(inp)
        logits = np.array(llm.scores[:len(inp)], dtype=np.float64)
        lp = log_softmax(logits)
        for p in range(pos, end):
            ll += lp[p - 1 - start, stream[p]]
        windows += 1
        pos = end
    n = len(tokens)
    return {
        "tokens": n,
        "prefix_token": prefix,
        "bos": bos,
        "eos": eos,
        "windows": windows,
        "loglikelihood": ll,
        "token_perplexity": float(np.exp(-ll / n)),
        "first_tokens": list(tokens[:12]),
    }


def distillery_perplexity(binary, model, text, window):
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, DISTILLERY_CACHE=os.path.join(tmp, "cache"))
        recipe = os.path.join(tmp, "r.toml")
        with open(recipe, "w") as f:
            f.write(RECIPE.format(model=json.dumps(os.path.abspath(model)),
                                  text=json.dumps(os.path.abspath(text)), window=window))
        subprocess.run([binary, "-q", "run", recipe], cwd=tmp, env=env, check=True)
        out = subprocess.run([binary, "show", recipe, "ppl", "--json"], cwd=tmp, env=env,
                             check=True, capture_output=True, text=True).stdout
        path = json.loads(out)["path"]
        name = "report.json"
        if not os.path.exists(os.path.join(path, name)):
            jsons = sorted(f for f in os.listdir(path) if f.endswith(".json"))
            if not jsons:
                sys.exit(f"no report.json in {path}: {sorted(os.listdir(path))}")
            name = jsons[0]
        with open(os.path.join(path, name)) as f:
            return json.load(f)["perplexity"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--distillery", default=DEFAULT_BIN)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tolerance", type=float, default=1e-3)
    ap.add_argument("--f32-kv", action="store_true",
                    help="llama.cpp's KV cache in f32 (its default f16 rounds K and V)")
    a = ap.parse_args()
    with open(a.text, encoding="utf-8", newline="") as f:  # bytes as they are: no \r\n -> \n
        text = f.read()

    t = time.time()
    ref = llama_cpp_perplexity(a.model, text, a.window, a.threads, a.f32_kv)
    t_ref = time.time() - t
    t = time.time()
    ours = distillery_perplexity(a.distillery, a.model, a.text, a.window)
    t_ours = time.time() - t

    p_ref, p_ours = ref["token_perplexity"], ours["token_perplexity"]
    rel = abs(p_ours - p_ref) / p_ref
    tokens_eq = ref["tokens"] == ours["tokens"]
    prefix_eq = ref["prefix_token"] == ours["prefix_token"]
    print(f"model  {a.model}")
    print(f"text   {a.text} ({len(text)} characters), window {a.window},"
          f" llama.cpp KV cache {'f32' if a.f32_kv else 'f16 (default)'}")
    print(f"llama.cpp  token perplexity {p_ref:.6f}  tokens {ref['tokens']}  prefix {ref['prefix_token']}"
          f" (bos {ref['bos']}, eos {ref['eos']})  windows {ref['windows']}  [{t_ref:.1f} s]")
    print(f"distillery token perplexity {p_ours:.6f}  tokens {ours['tokens']}  prefix {ours['prefix_token']}"
          f"  windows {ours.get('windows')}  documents {ours.get('documents')}  [{t_ours:.1f} s]")
    print(f"relative difference {rel:.3e}")
    print(f"tokens equal: {tokens_eq}" + ("" if tokens_eq else
          f" (llama.cpp {ref['tokens']}, distillery {ours['tokens']}; llama.cpp's first tokens {ref['first_tokens']})"))
    print(f"prefix equal: {prefix_eq}")
    ok = tokens_eq and prefix_eq and rel <= a.tolerance
    print("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
