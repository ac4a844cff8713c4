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
/// possible (`max_len` inputs), the first one seeded with `prefix` (EOS).
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
