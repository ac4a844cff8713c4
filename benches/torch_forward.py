"""PyTorch side of `cargo bench -p distillery-ops --bench forward`: the same GGUF model, the same
thread count, sequence length and batches; prints one JSON line of tokens/s per batch size.
    python benches/torch_forward.py GGUF THREADS SEQ BATCH[,BATCH...] REPS
"""
import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM

gguf, threads, seq, batches, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
torch.set_num_threads(threads)
d, f = os.path.split(os.path.abspath(gguf))
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
model.lm_head.weight = model.model.embed_tokens.weight
out = {}
for b in [int(x) for x in batches.split(",")]:
    ids = torch.randint(0, model.config.vocab_size, (b, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
        t = time.perf_counter()
        for _ in range(reps):
            model(ids).logits.sum().item()
        out[b] = b * seq * reps / (time.perf_counter() - t)
print(json.dumps(out))
