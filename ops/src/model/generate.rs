//! Greedy decoding with a key/value cache: a batch of prompts, left-padded as transformers pads
//! them for `generate` (each row's positions counted from its first real token, pad keys
//! masked), then one token per row per step against the cached keys and values.

use std::cell::RefCell;
use std::collections::HashMap;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use super::decoder::{Decoder, attends, tokens_tensor};

/// Each layer's rotated keys and its values so far, `[batch, positions, kv_heads, head_dim]`.
pub struct KvCache<B: Backend> {
    pub(crate) layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
}

impl<B: Backend> Default for KvCache<B> {
    fn default() -> Self {
        KvCache { layers: Vec::new() }
    }
}

/// The additive mask `[batch, kv_heads, seq * rep, start + seq]` of queries at indices
/// `start..start + seq` of left-padded rows (`pad[row]` pad tokens first) over every key so far:
/// causal, within `window` where the layer slides, never a pad key. A pad query sees only itself,
/// so that no row of the softmax is empty (its output is never read).
pub fn decoding_mask(
    pad: &[usize],
    kv_heads: usize,
    rep: usize,
    start: usize,
    seq: usize,
    window: Option<usize>,
) -> Vec<f32> {
    let keys = start + seq;
    let mut out = Vec::with_capacity(pad.len() * kv_heads * seq * rep * keys);
    for &p in pad {
        let mut rows = Vec::with_capacity(seq * rep * keys);
        for i in 0..seq {
            let q = start + i;
            let row: Vec<f32> = (0..keys)
                .map(|j| {
                    let seen = if q < p {
                        j == q
                    } else {
                        j >= p && attends(q, j, window)
                    };
                    if seen { 0.0 } else { f32::NEG_INFINITY }
                })
                .collect();
            for _ in 0..rep {
                rows.extend_from_slice(&row);
            }
        }
        for _ in 0..kv_heads {
            out.extend_from_slice(&rows);
        }
    }
    out
}

/// Greedy continuations of `prompts` (non-empty token lists), decoded together: at most
/// `max_new` tokens each; a row stops early once `finished(row, continuation)` says so (an EOS
/// token, a stop string): it rides along in the batch until every row is done, but nothing more
/// is added to its result.
/// Ties in the argmax go to the lowest token id, as `torch.argmax` does.
///
/// # Errors
/// [`NonFiniteLogits`] when a row's logits hold a NaN or an infinity: no token can be chosen.
///
/// # Panics
/// When a prompt is empty.
pub fn greedy<B: Backend>(
    decoder: &Decoder<B>,
    prompts: &[Vec<u32>],
    max_new: usize,
    finished: &mut dyn FnMut(usize, &[u32]) -> bool,
    device: &B::Device,
) -> Result<Vec<Vec<u32>>, NonFiniteLogits> {
    let batch = prompts.len();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); batch];
    if batch == 0 || max_new == 0 {
        return Ok(out);
    }
    assert!(prompts.iter().all(|p| !p.is_empty()), "empty prompt");
    let (heads, kv_heads) = decoder.head_counts();
    let rep = heads / kv_heads;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let pad: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
    let mut cache = KvCache::default();
    let mut done = vec![false; batch];
    // The prompt, then one token a step.
    let mut step_tokens: Vec<u32> = Vec::with_capacity(batch * longest);
    let mut positions = Vec::with_capacity(batch * longest);
    for (p, prompt) in pad.iter().zip(prompts) {
        step_tokens.extend(std::iter::repeat_n(prompt[0], *p));
        step_tokens.extend_from_slice(prompt);
        positions.extend(std::iter::repeat_n(0, *p));
        positions.extend(0..prompt.len());
    }
    let mut start = 0;
    for step in 0..max_new {
        let seq = step_tokens.len() / batch;
        let masks = RefCell::new(HashMap::new());
        let bias = |window: Option<usize>| {
            masks
                .borrow_mut()
                .entry(window)
                .or_insert_with(|| {
                    let m = decoding_mask(&pad, kv_heads, rep, start, seq, window);
                    Tensor::<B, 4>::from_data(
                        TensorData::new(m, [batch, kv_heads, seq * rep, start + seq]),
                        device,
                    )
                })
                .clone()
        };
        let hidden = decoder.hidden_cached(
            tokens_tensor::<B>(&step_tokens, batch, device),
            &positions,
            &mut cache,
            &bias,
        );
        let [_, _, h] = hidden.dims();
        let last = hidden.slice([0..batch, seq - 1..seq, 0..h]);
        let logits = decoder
            .logits_of(last)
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32 logits");
        let vocab = logits.len() / batch;
        step_tokens.clear();
        positions.clear();
        for (row, l) in logits.chunks(vocab).enumerate() {
            if !done[row] && l.iter().any(|x| !x.is_finite()) {
                return Err(NonFiniteLogits { row, step });
            }
            let next = argmax(l);
            if !done[row] {
                out[row].push(next);
                done[row] = finished(row, &out[row]);
            }
            step_tokens.push(next);
            positions.push(prompts[row].len() + step);
        }
        start += seq;
        if done.iter().all(|&d| d) {
            break;
        }
    }
    Ok(out)
}

/// Greedy decoding met logits that are not finite: in batch row `row`, at new token `step`.
#[derive(Debug, thiserror::Error)]
#[error("the logits of batch row {row} are not finite at generated token {step}")]
pub struct NonFiniteLogits {
    pub row: usize,
    pub step: usize,
}

/// The first index of the largest value (NaN never wins).
fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::checkpoint::load_model;
    use burn::backend::Flex;

    /// Greedy decoding without a cache: the whole sequence through the forward each step.
    fn uncached(decoder: &Decoder<Flex>, prompt: &[u32], max_new: usize) -> Vec<u32> {
        let mut seq = prompt.to_vec();
        for _ in 0..max_new {
            let logits = decoder.forward(tokens_tensor::<Flex>(&seq, 1, &Default::default()));
            let [_, s, v] = logits.dims();
            let last = logits
                .slice([0..1, s - 1..s, 0..v])
                .into_data()
                .into_vec::<f32>()
                .unwrap();
            seq.push(argmax(&last));
        }
        seq[prompt.len()..].to_vec()
    }

    /// Every family's golden model (sliding windows, soft-caps, local RoPE, partial rotary, q/k
    /// norms, biases): a left-padded batch decoded with the cache gives, row for row, the tokens
    /// that the full forward (itself checked against transformers) picks step by step; so does
    /// each prompt decoded alone, and a row stopped early keeps only its tokens.
    #[test]
    fn cached_greedy_decoding_matches_the_full_forward_in_every_family() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden");
        for name in [
            "llama-gqa-tied-f32",
            "mistral-window-f16",
            "family-gemma2",
            "family-gemma3_text",
            "family-phi3",
            "family-qwen2",
            "family-qwen3",
            "family-nemotron",
        ] {
            let m = load_model(&root.join(name)).unwrap();
            let device = Default::default();
            let decoder = Decoder::<Flex>::load(&m.config, &m.weights, &device).unwrap();
            let vocab = m.config.vocab_size as u32;
            let prompts: Vec<Vec<u32>> = [3usize, 11, 7]
                .iter()
                .enumerate()
                .map(|(r, &n)| {
                    (0..n as u32)
                        .map(|i| (i * 7 + r as u32 * 13 + 5) % vocab)
                        .collect()
                })
                .collect();
            let max_new = 9;
            let expected: Vec<Vec<u32>> = prompts
                .iter()
                .map(|p| uncached(&decoder, p, max_new))
                .collect();
            let batched = greedy(&decoder, &prompts, max_new, &mut |_, _| false, &device).unwrap();
            assert_eq!(batched, expected, "{name}: batched, left-padded");
            for (p, e) in prompts.iter().zip(&expected) {
                let alone = greedy(
                    &decoder,
                    std::slice::from_ref(p),
                    max_new,
                    &mut |_, _| false,
                    &device,
                )
                .unwrap();
                assert_eq!(&alone[0], e, "{name}: alone");
            }
            let stopped = greedy(
                &decoder,
                &prompts,
                max_new,
                &mut |row, c| row == 1 && c.len() == 2,
                &device,
            )
            .unwrap();
            assert_eq!(stopped[1], expected[1][..2], "{name}: stopped row");
            assert_eq!(stopped[0], expected[0], "{name}: others run on");
        }
    }

    /// Logits that overflow stop the decoding with the row and step, never a token picked from
    /// NaNs.
    #[test]
    fn non_finite_logits_are_an_error() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden");
        let m = load_model(&root.join("llama-gqa-tied-f32")).unwrap();
        let device = Default::default();
        let mut decoder = Decoder::<Flex>::load(&m.config, &m.weights, &device).unwrap();
        decoder.norm.weight = decoder.norm.weight.map(|w| w * 3e38);
        let err = greedy(
            &decoder,
            &[vec![1, 2, 3], vec![4]],
            4,
            &mut |_, _| false,
            &device,
        )
        .unwrap_err();
        assert_eq!(err.step, 0);
    }

    #[test]
    fn pad_keys_are_never_seen_and_windows_slide() {
        // One row with 2 pads, 3 queries from index 1, no window; rep 1, one KV head.
        let m = decoding_mask(&[2], 1, 1, 1, 3, None);
        let inf = f32::NEG_INFINITY;
        assert_eq!(
            m,
            vec![
                inf, 0.0, inf, inf, // a pad query sees itself only
                inf, inf, 0.0, inf, // the first real token
                inf, inf, 0.0, 0.0,
            ]
        );
        let w = decoding_mask(&[0], 1, 1, 3, 1, Some(2));
        assert_eq!(w, vec![inf, inf, 0.0, 0.0]);
    }
}
