//! Log-likelihoods by lm-evaluation-harness conventions: rolling windows for perplexity, summed
//! continuation log-probabilities for multiple choice.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::model::decoder::{Decoder, tokens_tensor};

/// One scoring request: the model reads `input` and is scored on predicting `targets[i]` after
/// `input[..=i]`, for the last `scored` positions only.
#[derive(Clone, Debug)]
pub struct Window {
    pub input: Vec<u32>,
    pub targets: Vec<u32>,
    pub scored: usize,
}

/// The harness's rolling windows over a document: disjoint predictions, each window as long as
/// possible (`max_len` inputs), the first one seeded with `prefix` (see [`harness_prefix_token`]).
pub fn rolling_windows(tokens: &[u32], prefix: u32, max_len: usize) -> Vec<Window> {
    let mut stream = Vec::with_capacity(tokens.len() + 1);
    stream.push(prefix);
    stream.extend_from_slice(tokens);
    let mut out = Vec::new();
    let mut pos = 1;
    while pos < stream.len() {
        let end = (pos + max_len).min(stream.len());
        let start = end.saturating_sub(max_len + 1);
        let window = &stream[start..end];
        out.push(Window {
            input: window[..window.len() - 1].to_vec(),
            targets: window[1..].to_vec(),
            scored: end - pos,
        });
        pos = end;
    }
    out
}

/// The token lm-evaluation-harness 0.4 puts before a document or an empty context
/// (`HFLM.prefix_token_id`): the tokenizer's BOS when it has one, else its EOS. `bos` and `eos`
/// are the tokenizer's special tokens as ids (from tokenizer_config.json), `config_eos` the
/// model config's EOS as a last resort; `None` when there is none at all.
pub fn harness_prefix_token(
    bos: Option<u32>,
    eos: Option<u32>,
    config_eos: Option<u32>,
) -> Option<u32> {
    bos.or(eos).or(config_eos)
}

/// Tokenization as lm-evaluation-harness 0.4's `HFLM.tok_encode` does it: the tokenizer's own
/// special tokens around the text (its default `add_special_tokens=True`: Gemma's and Llama 3's
/// post-processors add BOS), unless the text already starts with the prefix token's text.
pub struct HarnessTokens<'a, E> {
    /// Tokens of a text without special tokens.
    pub plain: &'a dyn Fn(&str) -> Result<Vec<u32>, E>,
    /// What the tokenizer's post-processor puts before and after a text.
    pub before: Vec<u32>,
    pub after: Vec<u32>,
    /// The harness's prefix token (see [`harness_prefix_token`]) and its text.
    pub prefix: u32,
    pub prefix_text: String,
}

impl<E> HarnessTokens<'_, E> {
    /// `tok_encode(text)`: special tokens added as the tokenizer adds them.
    pub fn tok_encode(&self, text: &str) -> Result<Vec<u32>, E> {
        let plain = (self.plain)(text)?;
        if !self.prefix_text.is_empty() && text.starts_with(&self.prefix_text) {
            return Ok(plain);
        }
        Ok(self.wrap(plain))
    }

    /// Already-tokenized text with the tokenizer's special tokens around it.
    pub fn wrap(&self, plain: Vec<u32>) -> Vec<u32> {
        if self.before.is_empty() && self.after.is_empty() {
            return plain;
        }
        let mut out = self.before.clone();
        out.extend(plain);
        out.extend_from_slice(&self.after);
        out
    }

    /// A document for rolling windows: [`Self::wrap`] without a leading prefix token, which the
    /// windows already start from (no BOS scored after BOS, unlike lm-evaluation-harness#3333).
    pub fn wrap_after_prefix(&self, plain: Vec<u32>) -> Vec<u32> {
        let mut out = self.wrap(plain);
        if self.before.first() == Some(&self.prefix) {
            out.remove(0);
        }
        out
    }

    /// One `loglikelihood` request encoded as `HFLM.loglikelihood` and `_encode_pair` do:
    /// trailing whitespace of the context moves to the continuation; the continuation's tokens
    /// are those of `tok_encode(context + continuation)` past `tok_encode(context)`; an empty
    /// context becomes the prefix token (or the continuation's first token when that is the
    /// prefix token), the continuation then tokenized without special tokens; the stream is cut
    /// to its last `max_len + 1` tokens.
    pub fn request(&self, context: &str, continuation: &str, max_len: usize) -> Result<Window, E> {
        // The harness tests for an empty context before `_encode_pair` trims: a context of
        // spaces gets no prefix token.
        let (context_ids, continuation_ids) = if context.is_empty() {
            let c = (self.plain)(continuation)?;
            if c.first() == Some(&self.prefix) {
                (c[..1].to_vec(), c[1..].to_vec())
            } else {
                (vec![self.prefix], c)
            }
        } else {
            // Python's `str.rstrip()`: Unicode whitespace plus the separators U+001C..U+001F,
            // which Rust's `char::is_whitespace` leaves.
            let trimmed = context.trim_end_matches(|c: char| {
                c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
            });
            let continuation = format!("{}{continuation}", &context[trimmed.len()..]);
            let whole = self.tok_encode(&format!("{trimmed}{continuation}"))?;
            let context_ids = self.tok_encode(trimmed)?;
            let cut = context_ids.len().min(whole.len());
            (context_ids, whole[cut..].to_vec())
        };
        let mut stream = context_ids;
        let scored = continuation_ids.len();
        stream.extend(continuation_ids);
        let start = stream.len().saturating_sub(max_len + 1);
        let s = &stream[start..];
        Ok(Window {
            input: s[..s.len().saturating_sub(1)].to_vec(),
            targets: s[1.min(s.len())..].to_vec(),
            scored: scored.min(s.len().saturating_sub(1)),
        })
    }
}

/// Log-probabilities of each target: `[batch, seq]` inputs of equal length.
pub fn target_logprobs<B: Backend>(
    decoder: &Decoder<B>,
    windows: &[&Window],
    device: &B::Device,
) -> Vec<Vec<f32>> {
    let batch = windows.len();
    let seq = windows[0].input.len();
    let ids: Vec<u32> = windows
        .iter()
        .flat_map(|w| w.input.iter().copied())
        .collect();
    let logits = decoder.forward(tokens_tensor::<B>(&ids, batch, device));
    let logp = log_softmax(logits, 2);
    let targets: Vec<i64> = windows
        .iter()
        .flat_map(|w| w.targets.iter().map(|&t| t as i64))
        .collect();
    let targets = Tensor::<B, 3, Int>::from_data(TensorData::new(targets, [batch, seq, 1]), device);
    let picked = logp.gather(2, targets).reshape([batch, seq]);
    let flat = picked.into_data().convert::<f32>().to_vec::<f32>().unwrap();
    flat.chunks(seq).map(|c| c.to_vec()).collect()
}

/// Sum of scored log-probabilities over windows, batching windows of equal length.
/// `progress(done)` is told how many windows are finished.
pub fn score_windows<B: Backend>(
    decoder: &Decoder<B>,
    windows: &[Window],
    batch: usize,
    device: &B::Device,
    progress: &mut dyn FnMut(usize),
) -> Vec<f64> {
    let mut results = vec![0f64; windows.len()];
    // Group by input length so each batch is rectangular; order within a group is kept.
    let mut by_len: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for (i, w) in windows.iter().enumerate() {
        by_len.entry(w.input.len()).or_default().push(i);
    }
    let mut done = 0;
    for (_, idx) in by_len {
        for chunk in idx.chunks(batch.max(1)) {
            let ws: Vec<&Window> = chunk.iter().map(|&i| &windows[i]).collect();
            let lps = target_logprobs(decoder, &ws, device);
            for (&i, lp) in chunk.iter().zip(lps) {
                let w = &windows[i];
                // Summed in f64 in a fixed order: reproducible.
                results[i] = lp[lp.len() - w.scored..].iter().map(|&x| x as f64).sum();
            }
            done += chunk.len();
            progress(done);
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chars(s: &str) -> Result<Vec<u32>, std::convert::Infallible> {
        Ok(s.chars().map(|c| c as u32).collect())
    }

    /// `_encode_pair`: trailing whitespace as Python's `rstrip()` sees it (the U+001C..U+001F
    /// separators included) moves to the continuation; specials wrap every `tok_encode`; an empty
    /// context is the prefix token.
    #[test]
    fn requests_split_as_the_harness_splits_them() {
        let h = HarnessTokens {
            plain: &chars,
            before: vec![1],
            after: vec![],
            prefix: 1,
            prefix_text: "<s>".into(),
        };
        let w = h.request("ab \u{1f}", "c", 100).unwrap();
        assert_eq!(w.scored, 3, "' ', U+001F and 'c' are scored");
        assert_eq!(w.input, vec![1, 'a' as u32, 'b' as u32, ' ' as u32, 0x1f]);
        let w = h.request("", "xy", 100).unwrap();
        assert_eq!((w.input, w.scored), (vec![1, 'x' as u32], 2));
        // A text that starts with the prefix token's text gets no second one.
        assert_eq!(h.tok_encode("<s>a").unwrap()[0], '<' as u32);
    }
}
