//! The `evaluate` op: perplexity (rolling windows, token and word), multiple-choice accuracy
//! (acc and acc_norm), generation with exact match, zero- or few-shot, parameter counts,
//! forward throughput and peak memory, as a JSON report; every convention lm-evaluation-harness
//! 0.4's.

pub mod fewshot;
pub mod generation;
pub mod loglik;

use std::path::Path;
use std::time::Instant;

use serde_json::{Value, json};

use crate::data::tokenized_with_counts;
use crate::model::decoder::{Compute, Decoder};
use crate::op::{
    Artifact, ArtifactKind, Op, OpContext, OpError, OpSignature, ParamSpec, ParamType, ParamValue,
    Params, Port, Problem,
};
use crate::runtime::{self, Backend as B};
use loglik::{Window, rolling_windows, score_windows};

pub const REPORT_FILE: &str = "report.json";

/// lm-evaluation-harness's GSM8K task (`gsm8k.yaml`): prompt, stop strings and the regexes its
/// `exact_match` ignores.
pub const GSM8K_DOC_TO_TEXT: &str = "Question: {{question}}\nAnswer:";
pub const GSM8K_UNTIL: [&str; 3] = ["Question:", "</s>", "<|im_end|>"];
pub const GSM8K_IGNORE: [&str; 4] = [",", "\\$", "(?s).*#### ", "\\.$"];

pub struct Evaluate;

/// One multiple-choice item.
#[derive(Clone, Debug)]
pub struct Choice {
    pub context: String,
    pub choices: Vec<String>,
    pub gold: usize,
    /// The document as read, for the few-shot sampler's "not the document itself" test (the
    /// harness compares whole documents).
    pub raw: Value,
}

/// Reads multiple-choice items: JSONL lines `{context, choices, gold}` (the harness's common
/// spellings also: `query`, `ctx` or `question` for the context, `endings` for the choices,
/// `label` for the 0-based gold index; taken as they are, without a task's own preprocessing),
/// or a pair of text files named `*correct*` and
/// `*wrong*` whose lines are whole texts (HellaSwag pairs): the context is their common prefix
/// up to a word boundary. Choices are scored after the target delimiter, as the harness does.
pub fn read_choices(artifact: &Artifact) -> Result<Vec<Choice>, OpError> {
    let mut items = Vec::new();
    let correct = artifact.files.iter().find(|f| {
        f.file_name()
            .is_some_and(|n| n.to_string_lossy().contains("correct"))
    });
    let wrong = artifact.files.iter().find(|f| {
        f.file_name()
            .is_some_and(|n| n.to_string_lossy().contains("wrong"))
    });
    if let (Some(c), Some(w)) = (correct, wrong) {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| OpError::io(p, "read", e));
        let (c, w) = (read(c)?, read(w)?);
        for (a, b) in c.lines().zip(w.lines()) {
            let mut cut = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
            while cut > 0 && (!a.is_char_boundary(cut) || !a[..cut].ends_with(' ')) {
                cut -= 1;
            }
            // The word boundary's space becomes the target delimiter.
            let context = a[..cut].trim_end().to_string();
            let choices = vec![
                a[cut..].trim_start().to_string(),
                b[cut..].trim_start().to_string(),
            ];
            items.push(Choice {
                raw: json!({"context": context, "choices": choices, "gold": 0}),
                context,
                choices,
                gold: 0,
            });
        }
        return Ok(items);
    }
    for path in &artifact.files {
        let text = std::fs::read_to_string(path).map_err(|e| OpError::io(path, "read", e))?;
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let at = || format!("{}:{}", path.display(), i + 1);
            let v: Value = serde_json::from_str(line)
                .map_err(|e| OpError::Invalid(format!("{}: not JSON: {e}", at())))?;
            let field = |names: &[&str]| names.iter().map(|n| &v[*n]).find(|x| !x.is_null());
            let context = field(&["context", "query", "ctx", "question"])
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    OpError::Invalid(format!(
                        "{}: no string `context` (or `query`, `ctx`, `question`)",
                        at()
                    ))
                })?;
            let choices: Vec<String> = field(&["choices", "endings"])
                .and_then(Value::as_array)
                .ok_or_else(|| {
                    OpError::Invalid(format!("{}: no array `choices` (or `endings`)", at()))
                })?
                .iter()
                .map(|c| {
                    c.as_str().map(String::from).ok_or_else(|| {
                        OpError::Invalid(format!("{}: a choice is not a string", at()))
                    })
                })
                .collect::<Result<_, _>>()?;
            let gold = field(&["gold", "label"])
                .and_then(|g| g.as_u64().or_else(|| g.as_str()?.trim().parse().ok()))
                .ok_or_else(|| {
                    OpError::Invalid(format!(
                        "{}: no integer `gold` (or `label`): the 0-based index of the right choice",
                        at()
                    ))
                })? as usize;
            if gold >= choices.len() {
                return Err(OpError::Invalid(format!(
                    "{}: gold {gold} but {} choices",
                    at(),
                    choices.len()
                )));
            }
            items.push(Choice {
                context: context.to_string(),
                choices,
                gold,
                raw: v.clone(),
            });
        }
    }
    Ok(items)
}

/// The standard error of a mean of `n` 0/1 outcomes with `k` ones, as lm-evaluation-harness's
/// `mean_stderr` computes it (sample standard deviation, n − 1, over √n); `None` for n < 2.
pub fn mean_stderr(k: usize, n: usize) -> Option<f64> {
    if n < 2 {
        return None;
    }
    let (k, n) = (k as f64, n as f64);
    let mean = k / n;
    let var = (k * (1.0 - mean).powi(2) + (n - k) * mean.powi(2)) / (n - 1.0);
    Some((var / n).sqrt())
}

fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

impl Op for Evaluate {
    fn signature(&self) -> OpSignature {
        OpSignature {
            name: "evaluate",
            // 3: the fused CPU forward. 4: the fused CPU attention. 5: its key product reads
            // transposed keys (other rounding where a row block has a single row).
            // 6: lm-evaluation-harness conventions: BOS prefix, target delimiter, context/
            // continuation split, words, bytes, standard errors; non-finite results refused.
            // 7: the tokenizer's own special tokens (a post-processor's BOS) as the harness adds
            // them; an empty context's continuation starting with the prefix token; Gemma's
            // embedding scale rounded to bf16 under bf16 compute; a checkpoint with tokenizer.json
            // but no tokenizer_config.json takes its BOS from config.json, as its exports do.
            // 8: under max_tokens, words and bytes of the documents scored only.
            // 9: a post-processor's BOS not scored again after the prefix token in rolling windows.
            // 10: few-shot contexts and generation tasks; num_fewshot in the report.
            version: 10,
            doc: "perplexity, multiple-choice accuracy, parameters and throughput of a model",
            inputs: vec![
                Port::new("model", ArtifactKind::Model, "the model to evaluate"),
                Port::optional(
                    "data",
                    ArtifactKind::Dataset,
                    "texts for perplexity (documents scored whole)",
                ),
                Port::optional(
                    "tasks",
                    ArtifactKind::Dataset,
                    "multiple choice: JSONL {context, choices, gold} or correct/wrong line pairs",
                ),
                Port::optional(
                    "generate",
                    ArtifactKind::Dataset,
                    "generation: JSONL documents (GSM8K's {question, answer} by default) for doc_to_text/doc_to_target",
                ),
                Port::optional(
                    "fewshot",
                    ArtifactKind::Dataset,
                    "few-shot examples in the task's own shape (default: the task's file, the document itself left out)",
                ),
            ],
            output: ArtifactKind::Report,
            params: vec![
                ParamSpec::with_default(
                    "window",
                    ParamType::Int,
                    ParamValue::Int(512),
                    "tokens per perplexity window (capped by the model's context)",
                ),
                ParamSpec::with_default(
                    "batch",
                    ParamType::Int,
                    ParamValue::Int(4),
                    "windows per forward pass",
                ),
                ParamSpec::with_default(
                    "max_tokens",
                    ParamType::Int,
                    ParamValue::Int(0),
                    "score at most this many tokens of the data (0: all)",
                ),
                ParamSpec::with_default(
                    "max_items",
                    ParamType::Int,
                    ParamValue::Int(0),
                    "score at most this many multiple-choice items (0: all)",
                ),
                ParamSpec::with_default(
                    "target_delimiter",
                    ParamType::Str,
                    ParamValue::Str(" ".into()),
                    "put between a multiple-choice context and each choice (lm-evaluation-harness's target_delimiter)",
                ),
                ParamSpec::with_default(
                    "num_fewshot",
                    ParamType::Int,
                    ParamValue::Int(0),
                    "examples put before each multiple-choice or generation document",
                ),
                ParamSpec::with_default(
                    "fewshot_seed",
                    ParamType::Int,
                    ParamValue::Int(1234),
                    "seed of the few-shot sampler (lm-evaluation-harness's fewshot_random_seed)",
                ),
                ParamSpec::with_default(
                    "fewshot_sampler",
                    ParamType::Choice(&fewshot::Sampler::NAMES),
                    ParamValue::Str("default".into()),
                    "default: drawn at random as the harness draws them; first_n: the first ones",
                ),
                ParamSpec::with_default(
                    "fewshot_delimiter",
                    ParamType::Str,
                    ParamValue::Str("\n\n".into()),
                    "after each few-shot example",
                ),
                ParamSpec::with_default(
                    "description",
                    ParamType::Str,
                    ParamValue::Str(String::new()),
                    "text put first in every context, verbatim (end it with the separator you want)",
                ),
                ParamSpec::with_default(
                    "doc_to_text",
                    ParamType::Str,
                    ParamValue::Str(GSM8K_DOC_TO_TEXT.into()),
                    "generation prompt: a Jinja template over a document's fields",
                ),
                ParamSpec::with_default(
                    "doc_to_target",
                    ParamType::Str,
                    ParamValue::Str("{{answer}}".into()),
                    "generation reference (and few-shot answer): a Jinja template",
                ),
                ParamSpec::with_default(
                    "until",
                    ParamType::StrList,
                    ParamValue::List(
                        GSM8K_UNTIL
                            .iter()
                            .map(|s| ParamValue::Str(s.to_string()))
                            .collect(),
                    ),
                    "stop strings: a generation ends at the first (the tokenizer's EOS always ends it)",
                ),
                ParamSpec::with_default(
                    "max_gen_toks",
                    ParamType::Int,
                    ParamValue::Int(256),
                    "tokens generated at most per document",
                ),
                ParamSpec::with_default(
                    "strict_match_regex",
                    ParamType::Str,
                    ParamValue::Str(generation::STRICT_MATCH.into()),
                    "the strict-match filter: the answer is its first match's group",
                ),
                ParamSpec::with_default(
                    "flexible_extract_regex",
                    ParamType::Str,
                    ParamValue::Str(generation::FLEXIBLE_EXTRACT.into()),
                    "the flexible-extract filter: the answer is its last match",
                ),
                ParamSpec::with_default(
                    "regexes_to_ignore",
                    ParamType::StrList,
                    ParamValue::List(
                        GSM8K_IGNORE
                            .iter()
                            .map(|s| ParamValue::Str(s.to_string()))
                            .collect(),
                    ),
                    "removed from answer and reference before exact_match compares them",
                ),
                ParamSpec::with_default(
                    "ignore_case",
                    ParamType::Bool,
                    ParamValue::Bool(true),
                    "exact_match compares lowercased",
                ),
                ParamSpec::with_default(
                    "compute",
                    ParamType::Choice(&Compute::NAMES),
                    ParamValue::Str("float32".into()),
                    "dtype the matmuls run in (bfloat16 also stores the matrices in bf16)",
                ),
            ],
        }
    }

    fn check(&self, params: &Params) -> Vec<Problem> {
        params.require_positive(&["window", "batch", "max_gen_toks"])
    }

    fn estimate(
        &self,
        p: &Params,
        inputs: &std::collections::BTreeMap<String, crate::op::Estimate>,
    ) -> Option<crate::op::Estimate> {
        let c = crate::estimate::input_config(inputs, "model")?;
        let params = c.parameter_count().0 as f64;
        let tokens = p.int("max_tokens").ok()? as f64;
        Some(crate::op::Estimate {
            flops: 2.0 * params * tokens,
            memory_bytes: crate::estimate::infer_bytes_per_param(p) * params,
            basis: if tokens > 0.0 {
                "2·P·T over max_tokens".into()
            } else {
                "2·P per evaluated token (max_tokens unset)".into()
            },
            ..Default::default()
        })
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        runtime::with_threads(ctx.threads, || self.evaluate(ctx))
    }

    fn summarize(&self, out_dir: &Path) -> Option<String> {
        std::fs::read_to_string(out_dir.join("report.txt")).ok()
    }
}

impl Evaluate {
    fn evaluate(&self, ctx: &OpContext) -> Result<(), OpError> {
        let device = runtime::device();
        let model = runtime::open_model(ctx.input("model")?)?;
        let tok = runtime::tokenizer(&model)?;
        ctx.progress.phase("loading", 1, "model");
        let compute = runtime::compute(&ctx.params)?;
        let decoder = Decoder::<B>::load(&model.config, &model.weights, &device)?
            .with_compute(compute)
            .store_matrices_in_compute_dtype();
        let (params_total, params_non_embed) = model.config.parameter_count();
        let mut report = json!({
            "model": {
                "path": model.path,
                "parameters": params_total,
                "non_embedding_parameters": params_non_embed,
                "layers": model.config.num_hidden_layers,
                "hidden_size": model.config.hidden_size,
                "intermediate_size": model.config.intermediate_size,
                "heads": model.config.num_attention_heads,
                "kv_heads": model.config.num_key_value_heads,
            }
        });
        let batch = ctx.params.usize("batch")?;
        let mut forward_tokens = 0usize;
        let mut forward_secs = 0f64;
        // The harness's prefix token: the tokenizer's BOS, else its EOS.
        let special = |key: &str| -> Result<Option<u32>, OpError> {
            match model.special_token(key) {
                None => Ok(None),
                Some(t) => tok.token_id(&t).map(Some).ok_or_else(|| {
                    OpError::Invalid(format!(
                        "the tokenizer's {key} {t:?} is not in its vocabulary; fix tokenizer_config.json"
                    ))
                }),
            }
        };
        let prefix = loglik::harness_prefix_token(
            special("bos_token")?,
            special("eos_token")?,
            model.config.eos_id(),
        )
        .ok_or_else(|| {
            OpError::Invalid(
                "the model has neither a BOS nor an EOS token (tokenizer_config.json, config.json): perplexity and empty contexts need one to start from".into(),
            )
        })?;
        let max_len = model.config.max_position_embeddings;
        let plain = |s: &str| tok.encode(s);
        let (before, after) = tok.special_affixes()?;
        let harness = loglik::HarnessTokens {
            plain: &plain,
            before,
            after,
            prefix,
            prefix_text: tok.decode(&[prefix]),
        };

        if let Some(data) = ctx.inputs.get("data") {
            let window = ctx
                .params
                .usize("window")?
                .min(model.config.max_position_embeddings);
            let (mut ds, counts) = tokenized_with_counts(data, &tok)?;
            // Rolling windows start from the prefix token, which stands for the tokenizer's BOS:
            // a post-processor's own leading BOS is not scored a second time. lm-evaluation-harness
            // 0.4.13 does score it (log p(BOS | BOS), its issue #3333); that is the one place
            // distillery departs from it. Other special tokens the tokenizer adds stay.
            for d in ds.docs.iter_mut() {
                if d.first() != Some(&prefix) {
                    *d = harness.wrap_after_prefix(std::mem::take(d));
                }
            }
            let max_tokens = ctx.params.usize("max_tokens")?;
            if max_tokens > 0 {
                // Whole documents until the budget, the last one cut: words and bytes are those
                // of the documents scored (the cut one in proportion to its kept tokens), so that
                // files past the budget change nothing. A tokenized dataset keeps only totals:
                // scaled by the kept share of all tokens.
                let total = ds.total_tokens().max(1);
                let mut left = max_tokens;
                let (mut words, mut bytes) = (0f64, 0f64);
                for (i, d) in ds.docs.iter_mut().enumerate() {
                    let len = d.len().max(1);
                    d.truncate(left);
                    left -= d.len();
                    if let Some(c) = &counts {
                        let kept = d.len() as f64 / len as f64;
                        words += c[i].0 as f64 * kept;
                        bytes += c[i].1 as f64 * kept;
                    }
                }
                if counts.is_none() {
                    let kept = ds.total_tokens() as f64 / total as f64;
                    words = ds.words as f64 * kept;
                    bytes = ds.bytes as f64 * kept;
                }
                ds.docs.retain(|d| !d.is_empty());
                ds.words = words.round() as usize;
                ds.bytes = bytes.round() as usize;
            }
            let mut windows: Vec<Window> = Vec::new();
            let mut doc_of = Vec::new();
            for (i, d) in ds.docs.iter().enumerate() {
                let w = rolling_windows(d, prefix, window);
                doc_of.extend(std::iter::repeat_n(i, w.len()));
                windows.extend(w);
            }
            ctx.progress
                .phase("perplexity", windows.len() as u64, "windows");
            let t = Instant::now();
            let scores = score_windows(&decoder, &windows, batch, &device, &mut |done| {
                ctx.progress.set(done as u64)
            });
            forward_secs += t.elapsed().as_secs_f64();
            forward_tokens += windows.iter().map(|w| w.input.len()).sum::<usize>();
            let ll: f64 = scores.iter().sum();
            let mut per_doc = vec![0f64; ds.docs.len()];
            for (s, &d) in scores.iter().zip(&doc_of) {
                per_doc[d] += s;
            }
            if !ll.is_finite() {
                return Err(OpError::Failed(format!(
                    "the log-likelihood of the data is {ll}: the model's logits are not finite (its weights passed the load check, so the forward overflowed; try compute = \"float32\")"
                )));
            }
            let n = ds.total_tokens();
            let per = |units: usize| (units > 0).then(|| (-ll / units as f64).exp());
            report["perplexity"] = json!({
                "documents": ds.docs.len(),
                "tokens": n,
                "words": ds.words,
                "bytes": (ds.bytes > 0).then_some(ds.bytes),
                "window": window,
                "windows": windows.len(),
                "prefix_token": prefix,
                "loglikelihood": ll,
                "document_loglikelihoods": per_doc,
                "token_perplexity": (-ll / n as f64).exp(),
                "word_perplexity": per(ds.words),
                "byte_perplexity": per(ds.bytes),
                "bits_per_byte": (ds.bytes > 0).then(|| -ll / ds.bytes as f64 / std::f64::consts::LN_2),
            });
        }

        let shots = Shots::from_params(&ctx.params)?;
        if ctx.inputs.contains_key("fewshot")
            && ctx.inputs.contains_key("tasks")
            && ctx.inputs.contains_key("generate")
        {
            return Err(OpError::Invalid(
                "`fewshot` examples are for one task: evaluate multiple choice and generation in separate steps when a `fewshot` input names the examples".into(),
            ));
        }
        if ctx.inputs.contains_key("fewshot") {
            let tasks = ctx.inputs.contains_key("tasks") || ctx.inputs.contains_key("generate");
            if shots.num == 0 || !tasks {
                return Err(OpError::Invalid(
                    "a `fewshot` input is wired but nothing uses it: set num_fewshot and wire `tasks` or `generate`, or remove it".into(),
                ));
            }
        }
        let max_items = ctx.params.usize("max_items")?;
        if let Some(tasks) = ctx.inputs.get("tasks") {
            let all = read_choices(tasks)?;
            let mut items = all.clone();
            if max_items > 0 {
                items.truncate(max_items);
            }
            if items.is_empty() {
                return Err(OpError::Invalid(
                    "the tasks input has no multiple-choice items".into(),
                ));
            }
            let pool = match ctx.inputs.get("fewshot") {
                Some(f) => read_choices(f)?,
                None => all,
            };
            let same_split = !ctx.inputs.contains_key("fewshot");
            let delimiter = ctx.params.str("target_delimiter")?.to_string();
            let mut draw = shots.draw();
            let contexts = items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let picked = draw
                        .examples(pool.len(), same_split, &|j| pool[j].raw == item.raw)
                        .map_err(|e| {
                            OpError::Invalid(format!("multiple-choice item {}: {e}", i + 1))
                        })?;
                    let examples: Vec<(&str, &str)> = picked
                        .iter()
                        .map(|&j| {
                            (
                                pool[j].context.as_str(),
                                pool[j].choices[pool[j].gold].as_str(),
                            )
                        })
                        .collect();
                    Ok(shots.context(&examples, &item.context, &delimiter))
                })
                .collect::<Result<Vec<String>, OpError>>()?;
            // Requests as the harness builds them: (context, delimiter + choice).
            let mut windows = Vec::new();
            let mut owner = Vec::new();
            for (i, (item, context)) in items.iter().zip(&contexts).enumerate() {
                for (c, choice) in item.choices.iter().enumerate() {
                    let w = harness.request(context, &format!("{delimiter}{choice}"), max_len)?;
                    if w.scored == 0 {
                        return Err(OpError::Invalid(format!(
                            "multiple-choice item {} choice {c} ({choice:?}) has no tokens to score",
                            i + 1
                        )));
                    }
                    windows.push(w);
                    owner.push((i, c));
                }
            }
            ctx.progress
                .phase("multiple choice", windows.len() as u64, "choices");
            let t = Instant::now();
            let scores = score_windows(&decoder, &windows, batch, &device, &mut |done| {
                ctx.progress.set(done as u64)
            });
            forward_secs += t.elapsed().as_secs_f64();
            forward_tokens += windows.iter().map(|w| w.input.len()).sum::<usize>();
            if let Some(((i, c), s)) = owner.iter().zip(&scores).find(|(_, s)| !s.is_finite()) {
                return Err(OpError::Failed(format!(
                    "the log-likelihood of multiple-choice item {} choice {c} is {s}: the model's logits are not finite",
                    i + 1
                )));
            }
            let mut best =
                vec![(f64::NEG_INFINITY, 0usize, f64::NEG_INFINITY, 0usize); items.len()];
            for ((i, c), s) in owner.iter().zip(&scores) {
                let norm = s / items[*i].choices[*c].chars().count().max(1) as f64;
                if *s > best[*i].0 {
                    best[*i].0 = *s;
                    best[*i].1 = *c;
                }
                if norm > best[*i].2 {
                    best[*i].2 = norm;
                    best[*i].3 = *c;
                }
            }
            let mut per_item: Vec<Vec<f64>> = vec![Vec::new(); items.len()];
            for ((i, _), s) in owner.iter().zip(&scores) {
                per_item[*i].push(*s);
            }
            let correct = best
                .iter()
                .zip(&items)
                .filter(|(b, it)| b.1 == it.gold)
                .count();
            let correct_norm = best
                .iter()
                .zip(&items)
                .filter(|(b, it)| b.3 == it.gold)
                .count();
            report["multiple_choice"] = json!({
                "items": items.len(),
                "correct": correct,
                "correct_norm": correct_norm,
                "acc": correct as f64 / items.len() as f64,
                "acc_stderr": mean_stderr(correct, items.len()),
                "acc_norm": correct_norm as f64 / items.len() as f64,
                "acc_norm_stderr": mean_stderr(correct_norm, items.len()),
                "target_delimiter": delimiter,
                "num_fewshot": shots.num,
                // Per item, each choice's log-likelihood (the harness's logged `resps`).
                "loglikelihoods": per_item,
                "contexts": (shots.num > 0).then_some(contexts),
            });
        }

        if let Some(docs) = ctx.inputs.get("generate") {
            let run = GenerationRun {
                ctx,
                shots: &shots,
                harness: &harness,
                model: &model,
                tok: &tok,
                decoder: &decoder,
            };
            report["generation"] = run.run(docs, &device)?;
        }
        if forward_tokens > 0 {
            report["throughput"] = json!({
                "forward_tokens": forward_tokens,
                "seconds": forward_secs,
                "tokens_per_second": forward_tokens as f64 / forward_secs.max(1e-9),
                "backend": runtime::BACKEND_NAME,
                "threads": ctx.threads,
            });
        }
        report["peak_rss_bytes"] = peak_rss_bytes().map(Value::from).unwrap_or(Value::Null);
        let text = render(&report);
        let write = |name: &str, body: String| {
            let p = ctx.out_dir.join(name);
            std::fs::write(&p, body).map_err(|e| OpError::io(&p, "write", e))
        };
        write(REPORT_FILE, serde_json::to_string_pretty(&report).unwrap())?;
        write("report.txt", text)?;
        Ok(())
    }
}

/// Few-shot settings: how many examples, drawn how, joined how.
struct Shots {
    num: usize,
    seed: u64,
    sampler: fewshot::Sampler,
    delimiter: String,
    description: String,
}

impl Shots {
    fn from_params(p: &Params) -> Result<Shots, OpError> {
        let seed = p.int("fewshot_seed")?;
        Ok(Shots {
            num: p.usize("num_fewshot")?,
            seed: u64::try_from(seed).map_err(|_| {
                OpError::Invalid(format!(
                    "parameter `fewshot_seed` must not be negative (got {seed})"
                ))
            })?,
            sampler: fewshot::Sampler::from_name(p.str("fewshot_sampler")?)
                .expect("checked against the choices"),
            delimiter: p.str("fewshot_delimiter")?.to_string(),
            description: p.str("description")?.to_string(),
        })
    }

    /// A fresh sampler for one task (seeded once, drawn document after document).
    fn draw(&self) -> fewshot::FewshotDraw {
        fewshot::FewshotDraw::new(self.sampler, self.seed, self.num)
    }

    fn context(&self, examples: &[(&str, &str)], question: &str, target_delimiter: &str) -> String {
        fewshot::fewshot_context(
            &self.description,
            examples,
            question,
            target_delimiter,
            &self.delimiter,
        )
    }
}

/// One `generate_until` task over JSONL documents.
struct GenerationRun<'a> {
    ctx: &'a OpContext<'a>,
    shots: &'a Shots,
    harness: &'a loglik::HarnessTokens<'a, crate::model::ModelError>,
    model: &'a crate::model::LoadedModel,
    tok: &'a crate::model::tokenizer::Tokenizer,
    decoder: &'a Decoder<B>,
}

impl GenerationRun<'_> {
    fn run(&self, input: &Artifact, device: &burn::tensor::Device<B>) -> Result<Value, OpError> {
        let p = &self.ctx.params;
        let all = generation::read_docs(input)?;
        let max_items = p.usize("max_items")?;
        let docs = match max_items {
            0 => &all[..],
            n => &all[..n.min(all.len())],
        };
        if docs.is_empty() {
            return Err(OpError::Invalid(
                "the generate input has no documents".into(),
            ));
        }
        let own_pool;
        let (pool, same_split) = match self.ctx.inputs.get("fewshot") {
            Some(f) => {
                own_pool = generation::read_docs(f)?;
                (&own_pool[..], false)
            }
            None => (&all[..], true),
        };
        let templates = generation::Templates::new(&[
            ("doc_to_text", p.str("doc_to_text")?.to_string()),
            ("doc_to_target", p.str("doc_to_target")?.to_string()),
        ])?;
        let delimiter = p.str("target_delimiter")?;
        let max_gen = p.usize("max_gen_toks")?;
        let max_len = self.model.config.max_position_embeddings;
        if max_gen >= max_len {
            return Err(OpError::Invalid(format!(
                "parameter `max_gen_toks` = {max_gen} leaves no room for a prompt in the model's {max_len}-token context; lower it"
            )));
        }
        // Contexts as the harness builds them, then its `tok_encode`, cut to the last
        // `max_length - max_gen_toks` tokens.
        let mut draw = self.shots.draw();
        let mut prompts = Vec::with_capacity(docs.len());
        let mut references = Vec::with_capacity(docs.len());
        // The harness's request order: longest (untruncated) context first, then by context.
        let mut order_key = Vec::with_capacity(docs.len());
        for doc in docs {
            let at = || doc.at.clone();
            let picked = draw
                .examples(pool.len(), same_split, &|j| pool[j].fields == doc.fields)
                .map_err(|e| OpError::Invalid(format!("{}: {e}", at())))?;
            let mut examples = Vec::with_capacity(picked.len());
            for j in picked {
                let at = || pool[j].at.clone();
                examples.push((
                    templates.render("doc_to_text", &pool[j].fields, &at)?,
                    templates.render("doc_to_target", &pool[j].fields, &at)?,
                ));
            }
            let examples: Vec<(&str, &str)> = examples
                .iter()
                .map(|(q, a)| (q.as_str(), a.as_str()))
                .collect();
            let question = templates.render("doc_to_text", &doc.fields, &at)?;
            references.push(templates.render("doc_to_target", &doc.fields, &at)?);
            let context = self.shots.context(&examples, &question, delimiter);
            let mut ids = self.harness.tok_encode(&context)?;
            order_key.push((std::cmp::Reverse(ids.len()), context));
            if ids.is_empty() {
                ids.push(self.harness.prefix);
            }
            let keep = max_len - max_gen;
            if ids.len() > keep {
                ids.drain(..ids.len() - keep);
            }
            prompts.push(ids);
        }
        // The stop strings, the tokenizer's EOS text among them (as the harness adds it); EOS
        // ids end a generation as transformers' `generate` ends it.
        let mut until: Vec<String> = p.str_list("until")?;
        // generation_config.json's EOS ids where it names them (Llama 3 instruct ends turns
        // with <|eot_id|> there), else config.json's: those `generate` stops at.
        let from_generation = crate::model::config::token_ids(
            self.model
                .generation_config
                .as_ref()
                .and_then(|g| g.get("eos_token_id")),
        );
        let mut eos_ids = if from_generation.is_empty() {
            self.model.config.eos_ids()
        } else {
            from_generation
        };
        if let Some(eos) = self.model.special_token("eos_token") {
            if let Some(id) = self.tok.token_id(&eos) {
                eos_ids.push(id);
            }
            if !until.contains(&eos) {
                until.push(eos);
            }
        }
        let batch = p.usize("batch")?;
        // Longest first, as the harness orders requests: similar lengths share a batch.
        let mut order: Vec<usize> = (0..prompts.len()).collect();
        order.sort_by(|&a, &b| order_key[a].cmp(&order_key[b]));
        let mut continuations: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
        self.ctx
            .progress
            .phase("generation", prompts.len() as u64, "documents");
        let started = Instant::now();
        let mut done = 0;
        for chunk in order.chunks(batch.max(1)) {
            let batch_prompts: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
            let outs = crate::model::generate::greedy(
                self.decoder,
                &batch_prompts,
                max_gen,
                &mut |_, c: &[u32]| {
                    c.last().is_some_and(|t| eos_ids.contains(t)) || {
                        let text = self.tok.decode(c);
                        until
                            .iter()
                            .any(|u| !u.is_empty() && text.contains(u.as_str()))
                    }
                },
                device,
            )
            .map_err(|e| {
                OpError::Failed(format!(
                    "generating for {}: {e}; the model's forward overflowed (its weights passed the load check): try compute = \"float32\"",
                    docs[chunk[e.row]].at
                ))
            })?;
            for (&i, out) in chunk.iter().zip(outs) {
                continuations[i] = out;
            }
            done += chunk.len();
            self.ctx.progress.set(done as u64);
        }
        let secs = started.elapsed().as_secs_f64();
        let generated: usize = continuations.iter().map(Vec::len).sum();
        let responses: Vec<String> = continuations
            .iter()
            .map(|c| generation::cut_at_stop(&self.tok.decode_text(c), &until))
            .collect();
        let ignore =
            generation::compile_all(&p.str_list("regexes_to_ignore")?, "regexes_to_ignore")?;
        let ignore_case = p.bool("ignore_case")?;
        let filters = [
            generation::RegexFilter::new(
                "strict-match",
                p.str("strict_match_regex")?,
                0,
                "strict_match_regex",
            )?,
            generation::RegexFilter::new(
                "flexible-extract",
                p.str("flexible_extract_regex")?,
                -1,
                "flexible_extract_regex",
            )?,
        ];
        let mut exact = serde_json::Map::new();
        let mut stderr = serde_json::Map::new();
        let mut extracted = serde_json::Map::new();
        for f in &filters {
            let answers: Vec<String> = responses.iter().map(|r| f.apply(r)).collect();
            let hits = answers
                .iter()
                .zip(&references)
                .filter(|(a, r)| generation::exact_match(a, r, &ignore, ignore_case))
                .count();
            exact.insert(f.name.clone(), json!(hits as f64 / docs.len() as f64));
            stderr.insert(f.name.clone(), json!(mean_stderr(hits, docs.len())));
            extracted.insert(f.name.clone(), json!(answers));
        }
        Ok(json!({
            "items": docs.len(),
            "num_fewshot": self.shots.num,
            "exact_match": exact,
            "exact_match_stderr": stderr,
            "until": until,
            "max_gen_toks": max_gen,
            "generated_tokens": generated,
            "seconds": secs,
            "tokens_per_second": generated as f64 / secs.max(1e-9),
            "responses": responses,
            "extracted": extracted,
            "contexts_tokens": prompts.iter().map(Vec::len).collect::<Vec<_>>(),
        }))
    }
}

/// A readable table of a report.
pub fn render(r: &Value) -> String {
    let mut out = String::new();
    let m = &r["model"];
    out.push_str(&format!(
        "parameters          {:.1}M ({:.1}M without embeddings)\nshape               {} layers, hidden {}, ffn {}, {} heads / {} kv\n",
        m["parameters"].as_f64().unwrap_or(0.0) / 1e6,
        m["non_embedding_parameters"].as_f64().unwrap_or(0.0) / 1e6,
        m["layers"], m["hidden_size"], m["intermediate_size"], m["heads"], m["kv_heads"]
    ));
    if let Some(p) = r.get("perplexity") {
        out.push_str(&format!(
            "perplexity          {:.3} per token, {:.3} per word ({} tokens, {} documents, window {})\n",
            p["token_perplexity"].as_f64().unwrap_or(f64::NAN),
            p["word_perplexity"].as_f64().unwrap_or(f64::NAN),
            p["tokens"], p["documents"], p["window"]
        ));
        if let Some(bpb) = p["bits_per_byte"].as_f64() {
            out.push_str(&format!(
                "                    {:.4} per byte, {bpb:.4} bits per byte\n",
                p["byte_perplexity"].as_f64().unwrap_or(f64::NAN)
            ));
        }
    }
    if let Some(mc) = r.get("multiple_choice") {
        out.push_str(&format!(
            "multiple choice     acc {:.4} ± {:.4} ({}/{}), acc_norm {:.4} ± {:.4} ({}/{})\n",
            mc["acc"].as_f64().unwrap_or(0.0),
            mc["acc_stderr"].as_f64().unwrap_or(f64::NAN),
            mc["correct"],
            mc["items"],
            mc["acc_norm"].as_f64().unwrap_or(0.0),
            mc["acc_norm_stderr"].as_f64().unwrap_or(f64::NAN),
            mc["correct_norm"],
            mc["items"]
        ));
    }
    if let Some(g) = r.get("generation") {
        let em = |f: &str| g["exact_match"][f].as_f64().unwrap_or(f64::NAN);
        let se = |f: &str| g["exact_match_stderr"][f].as_f64().unwrap_or(f64::NAN);
        out.push_str(&format!(
            "generation          exact_match {:.4} ± {:.4} strict-match, {:.4} ± {:.4} flexible-extract ({} documents, {}-shot, {:.1} tokens/s)\n",
            em("strict-match"),
            se("strict-match"),
            em("flexible-extract"),
            se("flexible-extract"),
            g["items"],
            g["num_fewshot"],
            g["tokens_per_second"].as_f64().unwrap_or(0.0)
        ));
    }
    if let Some(t) = r.get("throughput") {
        out.push_str(&format!(
            "throughput          {:.0} tokens/s forward ({}, {} threads)\n",
            t["tokens_per_second"].as_f64().unwrap_or(0.0),
            t["backend"].as_str().unwrap_or("?"),
            t["threads"]
        ));
    }
    if let Some(b) = r["peak_rss_bytes"].as_f64() {
        out.push_str(&format!(
            "peak memory         {:.0} MB (process)\n",
            b / 1e6
        ));
    }
    out
}
