"""PyTorch side of `cargo bench -p distillery-ops --bench distill`: the same training step on
the same GGUF model, thread count, batch and sequence length, then global-norm clipping at 1.0
and AdamW with betas (0.9, 0.95), weight decay 0.1. KIND `distill` (the default): the teacher's
forward without a graph, the student's forward and backward through the forward KL averaged over
tokens; `train`: the model's forward and backward through next-token cross-entropy. Prints one
JSON line.
    python benches/torch_distill.py GGUF THREADS BATCH SEQ STEPS [KIND]
"""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

gguf, threads, batch, seq, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
kind = sys.argv[6] if len(sys.argv) > 6 else "distill"
assert kind in ("distill", "train"), f"unknown KIND {kind}"
torch.set_num_threads(threads)
d, f = os.path.split(os.path.abspath(gguf))


def load():
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    m.lm_head.weight = m.model.embed_tokens.weight
    return m


teacher = load().eval() if kind == "distill" else None
student = load().train()
opt = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
vocab = student.config.vocab_size


def step(k):
    ids = torch.tensor([[((k * 131 + b * 7 + i) * 7919) % vocab for i in range(seq + 1)] for b in range(batch)])
    inputs = ids[:, :-1]
    s = student(inputs).logits.reshape(-1, vocab)
    if kind == "distill":
        with torch.no_grad():
            t = teacher(inputs).logits.reshape(-1, vocab)
        loss = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum") / s.shape[0]
    else:
        loss = F.cross_entropy(s, ids[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    return loss.item()


step(0)
t0 = time.perf_counter()
for k in range(1, steps + 1):
    step(k)
print(json.dumps({"tokens_per_second": batch * seq * steps / (time.perf_counter() - t0)}))
