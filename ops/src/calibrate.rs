//! The `calibrate` op (Minitron §1): forward passes only, accumulating per-channel activation
//! statistics in f32. Per activation `A [batch, seq, d]` and batch: `acc[d] += sum_b (mean_s |A|)^2`.
//! Hooks: the input of down_proj and of o_proj per layer, every input/post-attention norm output,
//! and block inputs/outputs for block importance. No activation outlives its layer.

use std::collections::BTreeMap;

use burn::tensor::Tensor;
use distillery_kernels::importance::accumulate;

use crate::data::{pack, tokenized};
use crate::model::decoder::{Compute, Decoder, HookPoint, HookSet, Hooks, tokens_tensor};
use crate::op::{
    ArtifactKind, Op, OpContext, OpError, OpSignature, ParamSpec, ParamType, ParamValue, Params,
    Port, Problem,
};
use crate::runtime::{self, Backend as B};
use crate::stats::{StatKind, Stats};

pub struct Calibrate;

/// Accumulators per (layer, statistic), kept on the device.
struct Accumulate {
    acc: BTreeMap<(usize, StatKind), Tensor<B, 1>>,
    /// Sum over batches of (1 - mean cos(block input, block output)) per layer.
    block: Vec<f64>,
    pending_input: Option<Tensor<B, 3>>,
}

impl Hooks<B> for Accumulate {
    fn wants(&self) -> HookSet {
        HookSet::of(&HookPoint::ALL)
    }

    fn activation(&mut self, layer: usize, point: HookPoint, t: &Tensor<B, 3>) {
        let kind = match point {
            HookPoint::BlockInput => {
                self.pending_input = Some(t.clone());
                return;
            }
            HookPoint::BlockOutput => {
                let input = self
                    .pending_input
                    .take()
                    .expect("block input precedes its output");
                let dot = (input.clone() * t.clone()).sum_dim(2);
                let norms = (input.powf_scalar(2.0).sum_dim(2)
                    * t.clone().powf_scalar(2.0).sum_dim(2))
                .sqrt();
                let cos = dot / (norms + 1e-12);
                let mean_cos = cos.mean().into_data().to_vec::<f32>().unwrap()[0] as f64;
                self.block[layer] += 1.0 - mean_cos;
                return;
            }
            HookPoint::AttnNorm => StatKind::AttnNorm,
            HookPoint::AttnContext => StatKind::AttnContext,
            HookPoint::MlpNorm => StatKind::MlpNorm,
            HookPoint::MlpIntermediate => StatKind::MlpIntermediate,
        };
        let d = t.dims()[2];
        let acc = self
            .acc
            .remove(&(layer, kind))
            .unwrap_or_else(|| Tensor::zeros([d], &t.device()));
        self.acc.insert((layer, kind), accumulate(acc, t.clone()));
    }
}

impl Op for Calibrate {
    fn signature(&self) -> OpSignature {
        OpSignature {
            name: "calibrate",
            // 3: the fused CPU forward (rounds differently from the tensor ops). 4: the fused CPU
            // attention. 5: its key product reads transposed keys. 6: Gemma's embedding scale
            // rounded to bf16 under bf16 compute, as transformers does.
            version: 6,
            doc: "accumulate activation statistics for importance estimation (forward only)",
            inputs: vec![
                Port::new("model", ArtifactKind::Model, "the model to calibrate"),
                Port::new("data", ArtifactKind::Dataset, "calibration texts"),
            ],
            output: ArtifactKind::Stats,
            params: vec![
                ParamSpec::with_default(
                    "samples",
                    ParamType::Int,
                    ParamValue::Int(1024),
                    "calibration sequences",
                ),
                ParamSpec::with_default(
                    "seq_len",
                    ParamType::Int,
                    ParamValue::Int(4096),
                    "tokens per sequence",
                ),
                ParamSpec::with_default(
                    "batch",
                    ParamType::Int,
                    ParamValue::Int(1),
                    "sequences per forward pass",
                ),
                ParamSpec::with_default(
                    "compute",
                    ParamType::Choice(&Compute::NAMES),
                    ParamValue::Str("float32".into()),
                    "dtype the matmuls run in (bfloat16 also stores the matrices in bf16); statistics accumulate in f32",
                ),
            ],
        }
    }

    fn check(&self, params: &Params) -> Vec<Problem> {
        params.require_positive(&["samples", "seq_len", "batch"])
    }

    fn estimate(
        &self,
        p: &Params,
        inputs: &BTreeMap<String, crate::op::Estimate>,
    ) -> Option<crate::op::Estimate> {
        let c = crate::estimate::input_config(inputs, "model")?;
        let params = c.parameter_count().0 as f64;
        let tokens = (p.int("samples").ok()? * p.int("seq_len").ok()?) as f64;
        let bytes = crate::estimate::infer_bytes_per_param(p);
        Some(crate::op::Estimate {
            flops: 2.0 * params * tokens,
            memory_bytes: bytes * params,
            basis: format!("2·P·T forward only; {bytes} bytes/param"),
            ..Default::default()
        })
    }

    /// Always: the calibration samples are drawn by shuffling packed sequences from the seed.
    fn uses_seed(&self, _params: &Params) -> bool {
        true
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        runtime::with_threads(ctx.threads, || calibrate(ctx))
    }

    fn summarize(&self, out_dir: &std::path::Path) -> Option<String> {
        std::fs::read_to_string(out_dir.join(crate::stats::STATS_META)).ok()
    }
}

fn calibrate(ctx: &OpContext) -> Result<(), OpError> {
    let device = runtime::device();
    let model = runtime::open_model(ctx.input("model")?)?;
    let tok = runtime::tokenizer(&model)?;
    let compute = runtime::compute(&ctx.params)?;
    let decoder = Decoder::<B>::load(&model.config, &model.weights, &device)?
        .with_compute(compute)
        .store_matrices_in_compute_dtype();
    let samples = ctx.params.usize("samples")?;
    let seq_len = ctx
        .params
        .usize("seq_len")?
        .min(model.config.max_position_embeddings);
    let batch = ctx.params.usize("batch")?;
    let data = tokenized(ctx.input("data")?, &tok)?;
    let eos = model.config.eos_id().unwrap_or(0);
    let mut seqs = pack(&data, seq_len, eos, ctx.seed()?)?;
    if seqs.len() < samples {
        ctx.progress.note(&format!("the data has {} sequences of {seq_len} tokens; using all of them (asked for {samples})", seqs.len()));
    }
    seqs.truncate(samples);
    ctx.progress
        .phase("calibrating", seqs.len() as u64, "sequences");
    let stats = calibrate_sequences(&decoder, &model.config, &seqs, batch, &mut |done| {
        ctx.progress.set(done as u64)
    });
    stats.write(&ctx.out_dir)
}

/// Runs the model over `seqs` (equal lengths) in batches, accumulating every statistic.
pub fn calibrate_sequences(
    decoder: &Decoder<B>,
    config: &crate::model::ModelConfig,
    seqs: &[Vec<u32>],
    batch: usize,
    progress: &mut dyn FnMut(usize),
) -> Stats {
    let device = runtime::device();
    let mut hooks = Accumulate {
        acc: BTreeMap::new(),
        block: vec![0.0; config.num_hidden_layers],
        pending_input: None,
    };
    let mut done = 0;
    for chunk in seqs.chunks(batch.max(1)) {
        let ids: Vec<u32> = chunk.concat();
        // lm_head is not needed: hidden() stops before it.
        let _ = decoder.hidden(tokens_tensor::<B>(&ids, chunk.len(), &device), &mut hooks);
        done += chunk.len();
        progress(done);
    }
    let mut stats = Stats::new(config.clone(), seqs.len(), seqs.first().map_or(0, Vec::len));
    for ((layer, kind), t) in hooks.acc {
        stats.insert(layer, kind, t.into_data().to_vec::<f32>().unwrap());
    }
    stats.block_distance = hooks.block;
    stats
}
