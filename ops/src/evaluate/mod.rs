//! The `evaluate` op: perplexity (rolling windows, token and word), multiple-choice accuracy
//! (acc and acc_norm), parameter counts, forward throughput and peak memory, as a JSON report.

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

pub struct Evaluate;

/// One multiple-choice item.
#[derive(Clone, Debug)]
pub struct Choice {
    pub context: String,
    pub choices: Vec<String>,
    pub gold: usize,
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
            items.push(Choice {
                context,
                choices: vec![
                    a[cut..].trim_start().to_string(),
                    b[cut..].trim_start().to_string(),
                ],
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
            version: 9,
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
                    "compute",
                    ParamType::Choice(&Compute::NAMES),
                    ParamValue::Str("float32".into()),
                    "dtype the matmuls run in (bfloat16 also stores the matrices in bf16)",
                ),
            ],
        }
    }

    fn check(&self, params: &Params) -> Vec<Problem> {
        params.require_positive(&["window", "batch"])
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

        if let Some(tasks) = ctx.inputs.get("tasks") {
            let mut items = read_choices(tasks)?;
            let max_items = ctx.params.usize("max_items")?;
            if max_items > 0 {
                items.truncate(max_items);
            }
            if items.is_empty() {
                return Err(OpError::Invalid(
                    "the tasks input has no multiple-choice items".into(),
                ));
            }
            // Requests as the harness builds them: (context, delimiter + choice).
            let delimiter = ctx.params.str("target_delimiter")?.to_string();
            let mut windows = Vec::new();
            let mut owner = Vec::new();
            for (i, item) in items.iter().enumerate() {
                for (c, choice) in item.choices.iter().enumerate() {
                    let w =
                        harness.request(&item.context, &format!("{delimiter}{choice}"), max_len)?;
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
                // Per item, each choice's log-likelihood (the harness's logged `resps`).
                "loglikelihoods": per_item,
            });
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
