//! The `teacher_logits` op: the frozen teacher runs once over a dataset's packed sequences and
//! keeps, per token, its `top_k` most likely next tokens with their log-probabilities and the
//! log of the probability mass of all the others. `distill` reads this artifact (its
//! `teacher_logits` input) in place of a live teacher: no teacher in memory while the student
//! trains, and a rerun with another learning rate or loss reuses it instead of recomputing it.
//!
//! Layout of the output directory:
//! - `teacher_logits.json`: `top_k`, `seq_len`, `vocab_size`, `sequences` and `shards`
//!   (`{file, sequences}` in order);
//! - `logits-00001-of-0000N.safetensors`, each holding, for its `n` sequences:
//!   - `input_ids` U32 `[n, seq_len - 1]`: the tokens the teacher read (the inputs a training
//!     step feeds, all but each sequence's last token; `distill` matches its sequences on these);
//!   - `top_indices` U32 `[n, seq_len - 1, top_k]`, most likely first (ties: lower id first);
//!   - `top_log_probs` F32 `[n, seq_len - 1, top_k]`: `log softmax(logits)` at those ids, at
//!     temperature 1 (`log softmax(lp / T)` over the k is the top-k distribution at any `T`);
//!   - `rest_log_mass` F32 `[n, seq_len - 1]`: `log Σ_{other ids} softmax(logits)`, `-inf` when
//!     `top_k` covers the vocabulary.
//!
//! The sequences are packed as the training ops pack them (same `seq_len`, the recipe's seed),
//! validation sequences first.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::tensor::Tensor;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::data::{pack, tokenized};
use crate::model::decoder::{Compute, Decoder, NoHooks, tokens_tensor};
use crate::op::{
    ArtifactKind, Op, OpContext, OpError, OpSignature, ParamSpec, ParamType, ParamValue, Params,
    Port, Problem,
};
use crate::runtime::{self, Backend as B};

pub struct TeacherLogits;

/// The artifact's index file.
pub const META: &str = "teacher_logits.json";

/// Bytes of top-k entries per shard file the op writes.
pub const SHARD_BYTES: usize = 256 << 20;

/// Sequences per shard file of about `shard_bytes` of entries (at least one).
fn sequences_per_shard(rows: usize, top_k: usize, shard_bytes: usize) -> usize {
    (shard_bytes / (rows.max(1) * (8 * top_k + 8))).max(1)
}

/// The `top_k` largest entries of one row of logits `[vocab]` as (ids, log-probabilities), most
/// likely first (ties: lower id first), and the log of the softmax mass of the other ids
/// (`-inf` when there are none). Normalizers in f64. `None` when the row is not finite.
pub fn top_k_log_probs(row: &[f32], top_k: usize) -> Option<(Vec<u32>, Vec<f32>, f32)> {
    let v = row.len();
    let k = top_k.clamp(1, v);
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    if !lse.is_finite() || row.iter().any(|x| x.is_nan()) {
        return None;
    }
    let mut order: Vec<u32> = (0..v as u32).collect();
    let before = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    if k < v {
        order.select_nth_unstable_by(k - 1, before);
    }
    let (top, rest) = order.split_at_mut(k);
    top.sort_unstable_by(before);
    let log_probs = top
        .iter()
        .map(|&i| (row[i as usize] as f64 - lse) as f32)
        .collect();
    // Summed over the others directly (not 1 − Σ top): no cancellation when the top holds
    // nearly all the mass.
    let rest_sum: f64 = rest
        .iter()
        .map(|&i| (row[i as usize] as f64 - max).exp())
        .sum();
    let rest_log_mass = if rest.is_empty() {
        f32::NEG_INFINITY
    } else {
        (max + rest_sum.ln() - lse) as f32
    };
    Some((top.to_vec(), log_probs, rest_log_mass))
}

/// One shard's worth of sequences being collected.
#[derive(Default)]
struct ShardBuffer {
    input_ids: Vec<u32>,
    top_indices: Vec<u32>,
    top_log_probs: Vec<f32>,
    rest_log_mass: Vec<f32>,
    sequences: usize,
}

fn le_bytes<T: Copy>(values: &[T], to: impl Fn(T) -> [u8; 4]) -> Vec<u8> {
    values.iter().flat_map(|&x| to(x)).collect()
}

impl ShardBuffer {
    fn write(&self, path: &Path, rows: usize, top_k: usize) -> Result<(), OpError> {
        let n = self.sequences;
        let ids = le_bytes(&self.input_ids, u32::to_le_bytes);
        let idx = le_bytes(&self.top_indices, u32::to_le_bytes);
        let lp = le_bytes(&self.top_log_probs, f32::to_le_bytes);
        let rest = le_bytes(&self.rest_log_mass, f32::to_le_bytes);
        fn view(dtype: Dtype, shape: Vec<usize>, data: &[u8]) -> Result<TensorView<'_>, OpError> {
            TensorView::new(dtype, shape, data)
                .map_err(|e| OpError::Failed(format!("teacher logits shard: {e}")))
        }
        let tensors = [
            ("input_ids", view(Dtype::U32, vec![n, rows], &ids)?),
            ("top_indices", view(Dtype::U32, vec![n, rows, top_k], &idx)?),
            (
                "top_log_probs",
                view(Dtype::F32, vec![n, rows, top_k], &lp)?,
            ),
            ("rest_log_mass", view(Dtype::F32, vec![n, rows], &rest)?),
        ];
        safetensors::serialize_to_file(tensors, None, path)
            .map_err(|e| OpError::Failed(format!("writing {}: {e}", path.display())))
    }
}

/// A `teacher_logits` artifact opened for reading: shards memory-mapped, sequences found by
/// their input tokens.
pub struct CachedLogits {
    pub top_k: usize,
    pub seq_len: usize,
    pub vocab_size: usize,
    /// Entries per sequence: `seq_len - 1`.
    rows: usize,
    shards: Vec<Shard>,
    /// A hash of a sequence's input tokens → the (shard, sequence within it) with that hash; the
    /// tokens themselves are compared in the mapped `input_ids`, not held in memory.
    index: HashMap<u64, Vec<(usize, usize)>>,
}

struct Shard {
    map: memmap2::Mmap,
    /// Byte offsets of `input_ids`, `top_indices` and `top_log_probs` in the file.
    ids_at: usize,
    indices_at: usize,
    log_probs_at: usize,
}

fn tokens_hash(tokens: impl Iterator<Item = u32>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for t in tokens {
        t.hash(&mut h);
    }
    h.finish()
}

fn u32s(bytes: &[u8]) -> impl Iterator<Item = u32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The top-k entries of a run of sequences, one row per token, for the loss.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TopKRows {
    /// `[rows * top_k]` token ids.
    pub indices: Vec<i64>,
    /// `[rows * top_k]` log-probabilities at temperature 1.
    pub log_probs: Vec<f32>,
}

fn read_meta(dir: &Path) -> Result<serde_json::Value, OpError> {
    let path = dir.join(META);
    let text = std::fs::read_to_string(&path).map_err(|e| OpError::io(&path, "read", e))?;
    serde_json::from_str(&text).map_err(|e| {
        OpError::Invalid(format!(
            "{}: not a teacher_logits index ({e}); recompute the teacher_logits step",
            path.display()
        ))
    })
}

/// `top_k`, `seq_len` and `vocab_size` of a `teacher_logits` artifact, from its index alone.
pub fn describe(dir: &Path) -> Result<(usize, usize, usize), OpError> {
    let meta = read_meta(dir)?;
    let field = |name: &str| {
        meta[name].as_u64().map(|x| x as usize).ok_or_else(|| {
            OpError::Invalid(format!("{}: `{name}` is missing", dir.join(META).display()))
        })
    };
    Ok((field("top_k")?, field("seq_len")?, field("vocab_size")?))
}

impl CachedLogits {
    /// Opens the artifact in `dir`. Errors: a missing or malformed index or shard.
    pub fn open(dir: &Path) -> Result<CachedLogits, OpError> {
        let meta = read_meta(dir)?;
        let (top_k, seq_len, vocab_size) = describe(dir)?;
        if seq_len < 2 || top_k == 0 {
            return Err(OpError::Invalid(format!(
                "{}: seq_len {seq_len} and top_k {top_k} describe no entries; recompute the teacher_logits step",
                dir.join(META).display()
            )));
        }
        let rows = seq_len - 1;
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        let files = meta["shards"].as_array().cloned().unwrap_or_default();
        for (s, f) in files.iter().enumerate() {
            let path: PathBuf = dir.join(f["file"].as_str().unwrap_or_default());
            let bad = |why: String| {
                OpError::Invalid(format!(
                    "{}: {why}; recompute the teacher_logits step",
                    path.display()
                ))
            };
            let file = std::fs::File::open(&path).map_err(|e| OpError::io(&path, "open", e))?;
            // SAFETY: cache entries are committed once and never written again.
            let map =
                unsafe { memmap2::Mmap::map(&file) }.map_err(|e| OpError::io(&path, "map", e))?;
            let st = SafeTensors::deserialize(&map).map_err(|e| bad(e.to_string()))?;
            let tensor = |name: &str, dtype: Dtype, shape: &[usize]| {
                let t = st.tensor(name).map_err(|e| bad(e.to_string()))?;
                if t.dtype() != dtype || t.shape().get(1..) != Some(shape) {
                    return Err(bad(format!(
                        "`{name}` is {:?} {:?}, expected {dtype:?} [n, {shape:?}]",
                        t.dtype(),
                        t.shape()
                    )));
                }
                Ok((
                    t.shape()[0],
                    t.data().as_ptr() as usize - map.as_ptr() as usize,
                    t.data(),
                ))
            };
            let (n, ids_at, ids) = tensor("input_ids", Dtype::U32, &[rows])?;
            let (n_idx, indices_at, _) = tensor("top_indices", Dtype::U32, &[rows, top_k])?;
            let (n_lp, log_probs_at, _) = tensor("top_log_probs", Dtype::F32, &[rows, top_k])?;
            if n_idx != n || n_lp != n {
                return Err(bad("its tensors disagree on the sequence count".into()));
            }
            for (j, seq) in ids.chunks_exact(rows * 4).enumerate() {
                index
                    .entry(tokens_hash(u32s(seq)))
                    .or_insert_with(Vec::new)
                    .push((s, j));
            }
            drop(st);
            shards.push(Shard {
                map,
                ids_at,
                indices_at,
                log_probs_at,
            });
        }
        Ok(CachedLogits {
            top_k,
            seq_len,
            vocab_size,
            rows,
            shards,
            index,
        })
    }

    /// Where the artifact holds a sequence with these input tokens (`[seq_len - 1]`).
    fn find(&self, input: &[u32]) -> Option<(usize, usize)> {
        if input.len() != self.rows {
            return None;
        }
        let bytes = self.rows * 4;
        self.index
            .get(&tokens_hash(input.iter().copied()))?
            .iter()
            .copied()
            .find(|&(s, j)| {
                let shard = &self.shards[s];
                let at = shard.ids_at + j * bytes;
                u32s(&shard.map[at..at + bytes]).eq(input.iter().copied())
            })
    }

    /// Whether the artifact holds a sequence with these input tokens (`[seq_len - 1]`).
    pub fn covers(&self, input: &[u32]) -> bool {
        self.find(input).is_some()
    }

    /// The first `k` (1 ≤ k ≤ `top_k`) entries of every token of `input` (`[batch,
    /// seq_len - 1]`, flattened), in order. Errors: such a `k`, or a sequence the artifact does
    /// not hold.
    pub fn rows(&self, input: &[u32], k: usize) -> Result<TopKRows, String> {
        if !(1..=self.top_k).contains(&k) {
            return Err(format!(
                "top_k {k}: the cached teacher logits hold 1 to {} entries a token",
                self.top_k
            ));
        }
        let mut out = TopKRows::default();
        for seq in input.chunks(self.rows) {
            let (s, j) = self.find(seq).ok_or_else(|| {
                "a training sequence is not among the cached teacher logits".to_string()
            })?;
            let shard = &self.shards[s];
            let entries = self.rows * self.top_k;
            let read = |at: usize| &shard.map[at + j * entries * 4..at + (j + 1) * entries * 4];
            let (ids, lps) = (read(shard.indices_at), read(shard.log_probs_at));
            for r in 0..self.rows {
                let cell = r * self.top_k * 4..(r * self.top_k + k) * 4;
                out.indices
                    .extend(u32s(&ids[cell.clone()]).map(|i| i as i64));
                out.log_probs.extend(
                    lps[cell]
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                );
            }
        }
        Ok(out)
    }
}

impl Op for TeacherLogits {
    fn signature(&self) -> OpSignature {
        OpSignature {
            name: "teacher_logits",
            version: 1,
            doc: "run a frozen teacher once over the distillation data and keep its top-k log-probabilities for distill",
            inputs: vec![
                Port::new("teacher", ArtifactKind::Model, "the frozen teacher"),
                Port::new(
                    "data",
                    ArtifactKind::Dataset,
                    "the distillation texts (the same dataset distill reads)",
                ),
            ],
            output: ArtifactKind::Logits,
            params: vec![
                ParamSpec::with_default(
                    "top_k",
                    ParamType::Int,
                    ParamValue::Int(64),
                    "most likely tokens kept per position (distill's top_k may use fewer)",
                ),
                ParamSpec::with_default(
                    "seq_len",
                    ParamType::Int,
                    ParamValue::Int(512),
                    "tokens per packed sequence: distill's seq_len (both default to 512)",
                ),
                ParamSpec::with_default(
                    "sequences",
                    ParamType::Int,
                    ParamValue::Int(0),
                    "packed sequences to cover, validation ones first (0: all the data packs into)",
                ),
                ParamSpec::with_default(
                    "batch",
                    ParamType::Int,
                    ParamValue::Int(1),
                    "sequences per forward pass",
                ),
                ParamSpec::with_default(
                    "loss_chunk",
                    ParamType::Int,
                    ParamValue::Int(256),
                    "tokens per chunk of the output head: the logits [tokens, vocab] exist one chunk at a time",
                ),
                ParamSpec::with_default(
                    "compute",
                    ParamType::Choice(&Compute::NAMES),
                    ParamValue::Str("float32".into()),
                    "dtype the teacher's matmuls run in: distill's compute",
                ),
            ],
        }
    }

    fn check(&self, p: &Params) -> Vec<Problem> {
        let mut out = p.require_positive(&["top_k", "batch", "loss_chunk"]);
        if p.int("seq_len").is_ok_and(|s| s < 2) {
            out.push(Problem {
                param: Some("seq_len".into()),
                message: "seq_len must be at least 2 (one input and one target)".into(),
            });
        }
        if p.int("sequences").is_ok_and(|s| s < 0) {
            out.push(Problem {
                param: Some("sequences".into()),
                message: "sequences must be 0 (all) or a positive count".into(),
            });
        }
        out
    }

    fn plan_check(
        &self,
        p: &Params,
        inputs: &BTreeMap<String, crate::op::Artifact>,
    ) -> Vec<Problem> {
        let Some(t) = inputs.get("teacher") else {
            return Vec::new();
        };
        let Ok(c) = crate::model::checkpoint::load_config(&t.path) else {
            return Vec::new();
        };
        match p.int("top_k") {
            Ok(k) if k as usize > c.vocab_size => vec![Problem {
                param: Some("top_k".into()),
                message: format!(
                    "top_k {k} is more than the teacher's vocabulary ({})",
                    c.vocab_size
                ),
            }],
            _ => Vec::new(),
        }
    }

    fn estimate(
        &self,
        p: &Params,
        inputs: &BTreeMap<String, crate::op::Estimate>,
    ) -> Option<crate::op::Estimate> {
        // An unknown teacher still gives an estimate, empty: distill then knows it holds none.
        let Some(c) = crate::estimate::input_config(inputs, "teacher") else {
            return Some(crate::op::Estimate::default());
        };
        let params = c.parameter_count().0 as f64;
        let seq = p.int("seq_len").ok()? as f64;
        let tokens = p.int("sequences").ok()? as f64 * seq;
        let bytes = crate::estimate::infer_bytes_per_param(p);
        let rows = p.int("batch").ok()? as usize * p.int("seq_len").ok()? as usize;
        let transient = crate::estimate::one_block_bytes(&c, rows)
            + crate::estimate::head_activation_bytes(&c, rows, p.usize("loss_chunk").ok()?, 0);
        Some(crate::op::Estimate {
            flops: 2.0 * params * tokens,
            memory_bytes: bytes * params + transient,
            activation_bytes: transient,
            basis: format!(
                "2·P·T forward only (T: sequences × seq_len; 0 sequences: the whole dataset, not counted); {bytes} bytes/param"
            ),
            ..Default::default()
        })
    }

    /// With `sequences` set: the first ones in the seeded order the training ops use. All of
    /// them (0) are the same set whatever the seed.
    fn uses_seed(&self, params: &Params) -> bool {
        params.int("sequences").is_ok_and(|n| n != 0)
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        runtime::with_threads(ctx.threads, || teacher_logits(ctx))
    }

    fn summarize(&self, out_dir: &Path) -> Option<String> {
        let meta = read_meta(out_dir).ok()?;
        Some(format!(
            "top {} log-probabilities of {} sequences of {} tokens",
            meta["top_k"], meta["sequences"], meta["seq_len"]
        ))
    }
}

fn teacher_logits(ctx: &OpContext) -> Result<(), OpError> {
    let device = runtime::device_for(&ctx.ranks);
    let model = runtime::open_model(ctx.input("teacher")?)?;
    let tok = runtime::tokenizer(&model)?;
    let compute = runtime::compute(&ctx.params)?;
    let decoder = Decoder::<B>::load(&model.config, &model.weights, &device)?
        .with_compute(compute)
        .store_matrices_in_compute_dtype();
    let vocab = model.config.vocab_size;
    let top_k = ctx.params.usize("top_k")?.min(vocab);
    // As the training ops cut them.
    let seq_len = ctx
        .params
        .usize("seq_len")?
        .min(model.config.max_position_embeddings);
    let batch = ctx.params.usize("batch")?;
    let chunk = ctx.params.usize("loss_chunk")?;
    let data = tokenized(ctx.input("data")?, &tok)?;
    let eos = model.config.eos_id().unwrap_or(0);
    // All sequences: the same set whatever the seed (distill finds them by their tokens), so a
    // seed sweep reuses one cache. A subset is the first of the seeded order, as training reads.
    let sequences = ctx.params.usize("sequences")?;
    let seed = if sequences == 0 { 0 } else { ctx.seed()? };
    let mut seqs = pack(&data, seq_len, eos, seed)?;
    match sequences {
        0 => {}
        n if n > seqs.len() => ctx.progress.note(&format!(
            "the data packs into {} sequences of {seq_len} tokens; covering all of them (asked for {n})",
            seqs.len()
        )),
        n => seqs.truncate(n),
    }
    drop(model);
    ctx.progress
        .phase("teacher logits", seqs.len() as u64, "sequences");
    write_teacher_logits(
        &decoder,
        &seqs,
        TopKSettings {
            top_k,
            batch,
            chunk,
            shard_bytes: SHARD_BYTES,
        },
        &ctx.out_dir,
        &mut |done| ctx.progress.set(done as u64),
    )
}

/// How `teacher_logits` runs: entries kept per token, sequences per forward, tokens per chunk
/// of the output head, bytes of entries per shard file ([`SHARD_BYTES`]).
#[derive(Clone, Copy, Debug)]
pub struct TopKSettings {
    pub top_k: usize,
    pub batch: usize,
    pub chunk: usize,
    pub shard_bytes: usize,
}

/// Runs `decoder` over `seqs` (`[n][seq_len]`, equal lengths) and writes the artifact described
/// in the module's documentation into `dir`; `progress` gets the sequences done.
pub fn write_teacher_logits(
    decoder: &Decoder<B>,
    seqs: &[Vec<u32>],
    settings: TopKSettings,
    dir: &Path,
    progress: &mut dyn FnMut(usize),
) -> Result<(), OpError> {
    let TopKSettings {
        top_k,
        batch,
        chunk,
        shard_bytes,
    } = settings;
    let embed = decoder.embed_tokens.val(); // [vocab, hidden]
    let (vocab, device) = (embed.dims()[0], embed.device());
    let top_k = top_k.min(vocab);
    let seq_len = seqs.first().map_or(0, Vec::len);
    let rows = seq_len - 1;
    let per_shard = sequences_per_shard(rows, top_k, shard_bytes);
    let n_shards = seqs.len().div_ceil(per_shard);
    let mut shards = Vec::new();
    for (s, shard_seqs) in seqs.chunks(per_shard).enumerate() {
        let mut buf = ShardBuffer::default();
        for group in shard_seqs.chunks(batch.max(1)) {
            let ids: Vec<u32> = group
                .iter()
                .flat_map(|q| q[..rows].iter().copied())
                .collect();
            let hidden =
                decoder.hidden(tokens_tensor::<B>(&ids, group.len(), &device), &mut NoHooks);
            let h = hidden.dims()[2];
            let hidden = hidden.reshape([group.len() * rows, h]);
            for start in (0..group.len() * rows).step_by(chunk.max(1)) {
                let end = (start + chunk.max(1)).min(group.len() * rows);
                let logits: Tensor<B, 2> = decoder
                    .logits_of(hidden.clone().slice(start..end).unsqueeze::<3>())
                    .reshape([end - start, vocab]);
                let host = logits
                    .into_data()
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .map_err(|e| OpError::Failed(format!("teacher logits: {e:?}")))?;
                let tops: Vec<Option<(Vec<u32>, Vec<f32>, f32)>> = host
                    .par_chunks(vocab)
                    .map(|row| top_k_log_probs(row, top_k))
                    .collect();
                for (r, top) in tops.into_iter().enumerate() {
                    let (idx, lp, rest) = top.ok_or_else(|| {
                        let seq = s * per_shard + buf.sequences + (start + r) / rows;
                        OpError::Failed(format!(
                            "the teacher's logits are not finite at token {} of packed sequence {seq}: its forward overflowed; run it in float32 (compute = \"float32\") or check the teacher checkpoint",
                            (start + r) % rows
                        ))
                    })?;
                    buf.top_indices.extend(idx);
                    buf.top_log_probs.extend(lp);
                    buf.rest_log_mass.push(rest);
                }
            }
            buf.input_ids.extend(ids);
            buf.sequences += group.len();
            progress(s * per_shard + buf.sequences);
        }
        let file = format!("logits-{:05}-of-{:05}.safetensors", s + 1, n_shards);
        buf.write(&dir.join(&file), rows, top_k)?;
        shards.push(serde_json::json!({"file": file, "sequences": buf.sequences}));
    }
    let meta = serde_json::json!({
        "top_k": top_k,
        "seq_len": seq_len,
        "vocab_size": vocab,
        "sequences": seqs.len(),
        "shards": shards,
    });
    let path = dir.join(META);
    std::fs::write(&path, serde_json::to_vec_pretty(&meta).unwrap())
        .map_err(|e| OpError::io(&path, "write", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kept ids are the k largest (ties to the lower id), their log-probabilities and the
    /// rest's log-mass are those of the full softmax, computed independently in f64.
    #[test]
    fn top_k_keeps_the_largest_and_the_rest_of_the_mass() {
        let row: Vec<f32> = (0..50)
            .map(|i| ((i * 37 % 50) as f32 * 0.31).sin() * 6.0)
            .chain([5.5, 5.5])
            .collect();
        let lse = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        for k in [1, 4, 17, 52] {
            let (ids, lps, rest) = top_k_log_probs(&row, k).unwrap();
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let want: Vec<u32> = order[..k].iter().map(|&i| i as u32).collect();
            assert_eq!(ids, want, "k {k}");
            for (&i, &lp) in ids.iter().zip(&lps) {
                assert!((lp as f64 - (row[i as usize] as f64 - lse)).abs() < 1e-6);
            }
            let rest_want: f64 = order[k..]
                .iter()
                .map(|&i| (row[i] as f64 - lse).exp())
                .sum::<f64>()
                .ln();
            if k == row.len() {
                assert_eq!(rest, f32::NEG_INFINITY);
            } else {
                assert!(
                    (rest as f64 - rest_want).abs() < 1e-5,
                    "k {k}: {rest} vs {rest_want}"
                );
            }
            // All the mass: top and rest together.
            let total = lps.iter().map(|&x| (x as f64).exp()).sum::<f64>() + (rest as f64).exp();
            assert!((total - 1.0).abs() < 1e-5, "k {k}: {total}");
        }
        assert!(top_k_log_probs(&[1.0, f32::NAN], 1).is_none());
        assert!(top_k_log_probs(&[1.0, f32::INFINITY], 1).is_none());
    }

    /// A corrupt or foreign file is refused with its path and what to do.
    #[test]
    fn a_malformed_artifact_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let err = CachedLogits::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains(META), "{err}");
        std::fs::write(
            dir.path().join(META),
            r#"{"top_k": 2, "seq_len": 3, "vocab_size": 5, "sequences": 1, "shards": [{"file": "logits-00001-of-00001.safetensors", "sequences": 1}]}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("logits-00001-of-00001.safetensors"),
            b"garbage",
        )
        .unwrap();
        let err = CachedLogits::open(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("logits-00001-of-00001.safetensors") && err.contains("recompute"),
            "{err}"
        );
    }
}
