"""A 160-token byte-level BPE tokenizer (the GPT-2 scheme llama.cpp calls `gpt2`) for the tiny
family models of tests/golden, so GGUF exports of them carry a tokenizer llama.cpp can run.

Run by hand (never in CI) in a venv with `tokenizers`:
    python tests/golden/make_gguf_tokenizer.py
Writes tests/golden/gguf-tokenizer/{tokenizer.json,tokenizer_config.json}: <unk>, <s>, </s> as
ids 0-2 (the family goldens' bos 1 / eos 2), the byte-level characters of the training text, and
merges up to 160 tokens.
"""
import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "gguf-tokenizer")

text = open(os.path.join(HERE, "eval-text.txt")).read()
corpus = [text, "0123456789 ,.;:!?'\"()-\n", "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ"]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
tok.decoder = decoders.ByteLevel()
tok.post_processor = processors.ByteLevel(trim_offsets=False)
trainer = trainers.BpeTrainer(
    vocab_size=160,
    special_tokens=["<unk>", "<s>", "</s>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:0],
    show_progress=False,
)
tok.train_from_iterator(corpus, trainer)
assert tok.get_vocab_size() == 160, tok.get_vocab_size()
os.makedirs(OUT, exist_ok=True)
tok.save(os.path.join(OUT, "tokenizer.json"))
with open(os.path.join(OUT, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
               "unk_token": "<unk>", "add_bos_token": False,
               "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"}, f)
print(tok.encode("The quick brown fox.").tokens)
