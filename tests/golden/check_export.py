"""By-hand check that transformers loads a checkpoint distillery wrote and agrees on its logits.
    python tests/golden/check_export.py CHECKPOINT_DIR OUT.safetensors [WINDOWS] [SEQ]
then
    DISTILLERY_CHECK_MODEL=CHECKPOINT_DIR DISTILLERY_CHECK_LOGITS=OUT.safetensors \
        cargo test -p distillery-ops --test export_parity -- --nocapture

The inputs are WINDOWS (default 1) disjoint windows of SEQ tokens of WikiText-2's test text, or
a fixed Hamlet line when ../shared is absent. transformers' logits are computed twice: in f32 (the
comparison the issue asks for) and in f64, the exact reference both f32 implementations are judged
against; on models with massive activations transformers' own f32 logits are 1e-4 away from it.
"""
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

path, out = sys.argv[1], sys.argv[2]
windows = int(sys.argv[3]) if len(sys.argv) > 3 else 1
seq = int(sys.argv[4]) if len(sys.argv) > 4 else 256
tok = AutoTokenizer.from_pretrained(path)
wikitext = os.path.join(os.path.dirname(__file__), "../../../shared/data/wikitext-2/test.txt")
if os.path.exists(wikitext):
    ids = tok(open(wikitext).read()[: 8000 * windows], add_special_tokens=False)["input_ids"]
    ids = torch.tensor(ids[: windows * seq]).reshape(windows, seq)
else:
    text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer"
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
tensors = {"input_ids": ids.to(torch.int64)}
for dtype, name in ((torch.float32, "logits"), (torch.float64, "logits_f64")):
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, attn_implementation="eager").eval()
    with torch.no_grad():
        tensors[name] = model(ids).logits.contiguous()
err = (tensors["logits"].double() - tensors["logits_f64"]).abs().max().item()
save_file(tensors, out)
print("transformers loaded", type(model).__name__, "logits", tuple(tensors["logits"].shape),
      f"f32 vs f64 max |Δ| {err:.2e}")
