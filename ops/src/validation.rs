//! Held-out sequences and the mean next-token loss on them: how `search` and `depth_scan` rank
//! their candidates (pruned shapes, removed layers) without training them.

use crate::data::{pack, tokenized};
use crate::model::checkpoint::LoadedModel;
use crate::model::decoder::{Decoder, tokens_tensor};
use crate::op::{OpContext, OpError, ParamSpec, ParamType, ParamValue};
use crate::runtime::{self, Backend as B};
use crate::train::cross_entropy;

/// The parameters of [`sequences`]: `samples` and `seq_len`.
pub fn params() -> [ParamSpec; 2] {
    [
        ParamSpec::with_default(
            "samples",
            ParamType::Int,
            ParamValue::Int(8),
            "validation sequences each candidate is scored on",
        ),
        ParamSpec::with_default(
            "seq_len",
            ParamType::Int,
            ParamValue::Int(256),
            "tokens per validation sequence",
        ),
    ]
}

/// Mean next-token loss of `decoder` over `seqs`, one sequence at a time.
pub fn mean_lm_loss(decoder: &Decoder<B>, seqs: &[Vec<u32>]) -> f64 {
    let device = runtime::device();
    let total: f64 = seqs
        .iter()
        .map(|s| {
            let logits = decoder.forward(tokens_tensor::<B>(&s[..s.len() - 1], 1, &device));
            cross_entropy(logits, &s[1..], None)
                .into_data()
                .convert::<f64>()
                .to_vec::<f64>()
                .unwrap()[0]
        })
        .sum();
    total / seqs.len().max(1) as f64
}

/// The held-out sequences an op scores candidates on: the `data` input tokenized with the
/// model's tokenizer, packed into `seq_len`-token sequences from the recipe seed, the first
/// `samples` of them.
pub fn sequences(ctx: &OpContext, model: &LoadedModel) -> Result<Vec<Vec<u32>>, OpError> {
    let c = &model.config;
    let tok = runtime::tokenizer(model)?;
    let data = tokenized(ctx.input("data")?, &tok)?;
    let mut seqs = pack(
        &data,
        ctx.params.usize("seq_len")?.min(c.max_position_embeddings),
        c.eos_id().unwrap_or(0),
        ctx.seed()?,
    )?;
    seqs.truncate(ctx.params.usize("samples")?);
    Ok(seqs)
}
