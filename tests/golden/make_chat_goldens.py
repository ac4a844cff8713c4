"""transformers' own chat-template rendering and assistant masks: what distillery's chat data must
reproduce (ops/tests/chat.rs).

Run by hand (never in CI) in a venv with transformers>=5:
    python tests/golden/make_chat_goldens.py
It writes tests/golden/chat/: tokenizer.json (the character-level tokenizer of
v5-llama-bos-chartok plus ChatML's and Gemma's turn tokens as added special tokens),
tokenizer_config.json, and golden.json: for three templates written as the public checkpoints ship
them (ChatML as SmolLM2 and Qwen2.5 use it, Llama 3's, Gemma's with its raise_exception checks and
`| trim`), each conversation's text from `apply_chat_template(tokenize=False)` with and without the
generation prompt, its token ids, and the assistant mask that transformers computes itself
(`return_assistant_tokens_mask=True`) from the same template with `{% generation %}` marks.
"""
import json
import os
import shutil

from transformers import AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "chat")

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set header = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' %}"
    "{% if loop.index0 == 0 %}{% set header = bos_token + header %}{% endif %}{{ header }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{% if role == 'model' %}{% generation %}{{ message['content'] | trim + '<end_of_turn>\\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<end_of_turn>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

# The generation marks on their own indented lines (trim_blocks and lstrip_blocks apply to them),
# `tojson` with an indent over a message's extra fields in their order, non-ASCII kept.
CHATML_BLOCKS = """{% for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\\n' }}
    {% if message['role'] == 'assistant' %}
        {% generation %}
        {{- message['content'] + '<|im_end|>' }}
        {% endgeneration %}
    {% else %}
        {{- message['content'] }}
        {% if message['meta'] is defined %}{{ message['meta'] | tojson(indent=2) }}{% endif %}
        {{- '<|im_end|>' }}
    {% endif %}
    {{- '\\n' }}
{% endfor %}
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"""

CONVERSATIONS = [
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."},
    ],
    [
        {"role": "user", "content": "Tools?", "meta": {"zeta": 1, "alpha": ["é", True, None]}},
        {"role": "assistant", "content": "None."},
    ],
    [
        {"role": "user", "content": "  Name a colour. "},
        {"role": "assistant", "content": "Blue!"},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": " Red, maybe.\n"},
    ],
]

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<start_of_turn>", "<end_of_turn>"]


def main():
    os.makedirs(OUT, exist_ok=True)
    src = os.path.join(HERE, "v5-llama-bos-chartok", "tokenizer.json")
    with open(src) as f:
        tok = json.load(f)
    next_id = max(t["id"] for t in tok["added_tokens"]) + 1
    next_id = max(next_id, max(tok["model"]["vocab"].values()) + 1)
    for s in SPECIALS:
        tok["added_tokens"].append({"id": next_id, "content": s, "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": True})
        next_id += 1
    with open(os.path.join(OUT, "tokenizer.json"), "w") as f:
        json.dump(tok, f)
    with open(os.path.join(OUT, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}, f)
    t = AutoTokenizer.from_pretrained(OUT)
    golden = {"templates": {}}
    for name, template in (("chatml", CHATML), ("llama3", LLAMA3), ("gemma", GEMMA),
                           ("chatml_blocks", CHATML_BLOCKS)):
        cases = []
        for conv in CONVERSATIONS:
            text = t.apply_chat_template(conv, chat_template=template, tokenize=False)
            prompt = t.apply_chat_template(conv[:1], chat_template=template, tokenize=False,
                                           add_generation_prompt=True)
            out = t.apply_chat_template(conv, chat_template=template, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
            ids = out["input_ids"]
            assert ids == t(text, add_special_tokens=False)["input_ids"]
            cases.append({"messages": conv, "text": text, "prompt": prompt, "ids": ids,
                          "assistant_mask": out["assistant_masks"]})
        golden["templates"][name] = {"template": template, "cases": cases}
    try:
        t.apply_chat_template([{"role": "system", "content": "x"}], chat_template=GEMMA, tokenize=False)
    except Exception as e:  # transformers raises TemplateError with the template's message
        golden["gemma_system_error"] = str(e)
    import transformers
    golden["transformers_version"] = transformers.__version__
    with open(os.path.join(OUT, "golden.json"), "w") as f:
        json.dump(golden, f, indent=1)
    print(json.dumps(golden, indent=1)[:3000])


if __name__ == "__main__":
    main()
