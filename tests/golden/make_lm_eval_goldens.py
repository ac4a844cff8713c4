"""lm-evaluation-harness itself on tests/golden/v5-llama-bos-chartok: the numbers distillery's
`evaluate` must reproduce (tests/tests/evaluation.rs).

Run by hand (never in CI) in a venv with torch, transformers>=5 and lm_eval 0.4.x (PyPI `lm_eval`):
    python tests/golden/make_lm_eval_goldens.py
It writes tests/golden/lm-eval/golden.json from two local tasks (`dataset_path: json`):
  - mc.jsonl, multiple choice in the harness's own shape (`query` without a trailing space,
    `choices` without a leading space, `label`): acc, acc_norm, their standard errors, and every
    choice's log-likelihood;
  - docs.jsonl, `loglikelihood_rolling` over whole documents: word_perplexity, byte_perplexity,
    bits_per_byte and each document's log-likelihood.
The model's context (max_position_embeddings) is 64 tokens, so the documents span several windows.

It also writes tests/golden/lm-eval/golden-bos-template.json (and tokenizer-bos-template.json): the
same model with a tokenizer.json
whose post-processor adds BOS (`TemplateProcessing`, as Gemma's and Llama 3's do). The harness then
encodes every context and every rolling document with that BOS (its `tok_encode` keeps the
tokenizer's default `add_special_tokens=True`), so the rolling score includes log p(BOS | BOS)
(lm-eval issue #3333). distillery takes only the multiple-choice numbers from that golden: its
rolling windows do not score the duplicate BOS, and match golden.json's rolling numbers instead.
"""
import json
import os
import shutil
import tempfile

import lm_eval
from lm_eval.tasks import TaskManager

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "v5-llama-bos-chartok")
DATA = os.path.join(HERE, "lm-eval")

MC = f"""task: distillery_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""

ROLLING = f"""task: distillery_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA}/docs.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def with_bos_template(model, into):
    """A copy of `model` whose tokenizer.json post-processor prepends BOS."""
    shutil.copytree(model, into, dirs_exist_ok=True)
    path = os.path.join(into, "tokenizer.json")
    with open(path) as f:
        tok = json.load(f)
    bos = next(t for t in tok["added_tokens"] if t["content"] == "<s>")
    tok["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": "<s>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": "<s>", "type_id": 1}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [bos["id"]], "tokens": ["<s>"]}},
    }
    with open(path, "w") as f:
        json.dump(tok, f)
    return into


def main():
    golden("golden.json", MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        golden("golden-bos-template.json", with_bos_template(MODEL, tmp))
        shutil.copy(os.path.join(tmp, "tokenizer.json"), os.path.join(DATA, "tokenizer-bos-template.json"))


def golden(name, model):
    with tempfile.TemporaryDirectory() as tasks:
        for task_file, text in (("mc.yaml", MC), ("rolling.yaml", ROLLING)):
            with open(os.path.join(tasks, task_file), "w") as f:
                f.write(text)
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={model},dtype=float32",
            tasks=["distillery_mc", "distillery_rolling"],
            task_manager=TaskManager(include_path=tasks),
            batch_size=1,
            device="cpu",
            log_samples=True,
        )
    mc = out["results"]["distillery_mc"]
    rolling = out["results"]["distillery_rolling"]
    samples = out["samples"]
    numbers = {
        "lm_eval_version": lm_eval.__version__,
        "multiple_choice": {
            "acc": mc["acc,none"],
            "acc_stderr": mc["acc_stderr,none"],
            "acc_norm": mc["acc_norm,none"],
            "acc_norm_stderr": mc["acc_norm_stderr,none"],
            "loglikelihoods": [[r[0][0] for r in s["resps"]] for s in samples["distillery_mc"]],
        },
        "rolling": {
            "word_perplexity": rolling["word_perplexity,none"],
            "byte_perplexity": rolling["byte_perplexity,none"],
            "bits_per_byte": rolling["bits_per_byte,none"],
            "loglikelihoods": [s["resps"][0][0] for s in samples["distillery_rolling"]],
        },
    }
    with open(os.path.join(DATA, name), "w") as f:
        json.dump(numbers, f, indent=1)
    print(json.dumps(numbers, indent=1))


if __name__ == "__main__":
    main()
