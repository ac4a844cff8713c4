"""By-hand check that transformers loads a checkpoint distillery wrote and agrees on its logits.
    python tests/golden/check_export.py CHECKPOINT_DIR OUT.safetensors
then
    DISTILLERY_CHECK_MODEL=CHECKPOINT_DIR DISTILLERY_CHECK_LOGITS=OUT.safetensors \
        cargo test -p distillery-ops --test export_parity -- --nocapture
"""
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

path, out = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager").eval()
text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer"
ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
with torch.no_grad():
    logits = model(ids).logits.float().contiguous()
save_file({"input_ids": ids.to(torch.int64), "logits": logits}, out)
print("transformers loaded", type(model).__name__, "logits", tuple(logits.shape))
