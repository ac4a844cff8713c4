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

It writes tests/golden/lm-eval/fewshot-generation.json too: mc.jsonl 2-shot (examples drawn by the
harness's seeded sampler from the same split) and gen.jsonl, a GSM8K-shaped `generate_until` task
1-shot with GSM8K's stop strings, filters and exact_match settings (12 tokens at most, so that the
left-truncated prompt fits the 64-token context).

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


MC_FEWSHOT = MC.replace("task: distillery_mc", "task: distillery_mc_fewshot") + """fewshot_split: test
num_fewshot: 2
"""

GENERATION = rf"""task: distillery_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA}/gen.jsonl
test_split: test
fewshot_split: test
num_fewshot: 1
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until:
    - "Question:"
    - "</s>"
    - "<|im_end|>"
  do_sample: false
  temperature: 0.0
  max_gen_toks: 12
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: false
    regexes_to_ignore:
      - ","
      - "\\$"
      - "(?s).*#### "
      - "\\.$"
filter_list:
  - name: "strict-match"
    filter:
      - function: "regex"
        regex_pattern: "#### (\\-?[0-9\\.\\,]+)"
      - function: "take_first"
  - name: "flexible-extract"
    filter:
      - function: "regex"
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
      - function: "take_first"
"""


def fewshot_golden(model):
    """Few-shot multiple choice (2-shot, examples from the same split) and 1-shot generation, as
    lm_eval 0.4 runs them: every context it built, every log-likelihood, every generation and
    what each filter extracted; written to fewshot-generation.json."""
    with tempfile.TemporaryDirectory() as tasks:
        for task_file, text in (("mcf.yaml", MC_FEWSHOT), ("gen.yaml", GENERATION)):
            with open(os.path.join(tasks, task_file), "w") as f:
                f.write(text)
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={model},dtype=float32",
            tasks=["distillery_mc_fewshot", "distillery_gen"],
            task_manager=TaskManager(include_path=tasks),
            batch_size=1,
            device="cpu",
            log_samples=True,
        )
    mc = out["results"]["distillery_mc_fewshot"]
    gen = out["results"]["distillery_gen"]
    samples = out["samples"]
    by_filter = {}
    for s in samples["distillery_gen"]:
        by_filter.setdefault(s["filter"], []).append(s)
    first = next(iter(by_filter.values()))
    numbers = {
        "lm_eval_version": lm_eval.__version__,
        "multiple_choice": {
            "acc": mc["acc,none"],
            "acc_norm": mc["acc_norm,none"],
            "contexts": [s["arguments"][0][0] for s in samples["distillery_mc_fewshot"]],
            "loglikelihoods": [[r[0][0] for r in s["resps"]] for s in samples["distillery_mc_fewshot"]],
        },
        "generation": {
            "contexts": [s["arguments"][0][0] for s in first],
            "responses": [s["resps"][0][0] for s in first],
            "exact_match": {f: gen[f"exact_match,{f}"] for f in by_filter},
            "extracted": {f: [s["filtered_resps"][0] for s in ss] for f, ss in by_filter.items()},
        },
    }
    with open(os.path.join(DATA, "fewshot-generation.json"), "w") as f:
        json.dump(numbers, f, indent=1)
    print(json.dumps(numbers, indent=1))


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
    fewshot_golden(MODEL)
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
