//! The `depth_scan` op (Minitron §1, depth): the validation LM loss of the model with each single
//! layer removed, and with each contiguous block of `block_length` layers removed. Its winner (the
//! removal that hurts least) is a `target` a `prune` step can take, as `drop_layers`.

use std::path::Path;

use serde_json::{Value, json};

use crate::model::decoder::Decoder;
use crate::op::{
    ArtifactKind, Op, OpContext, OpError, OpSignature, ParamSpec, ParamType, ParamValue, Params,
    Port, Problem,
};
use crate::prune::PruneTarget;
use crate::runtime::{self, Backend as B};
use crate::validation;

pub const SCAN_FILE: &str = "depth_scan.json";

/// The layers a removal drops: `[start, start + length)`.
fn without(decoder: &Decoder<B>, start: usize, length: usize) -> Decoder<B> {
    let mut d = decoder.clone();
    d.layers.drain(start..start + length);
    d
}

/// The winning target of a depth scan report.
pub fn read_winner(dir: &Path) -> Result<PruneTarget, OpError> {
    let p = dir.join(SCAN_FILE);
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(&p).map_err(|e| OpError::io(&p, "read", e))?)
            .map_err(|e| OpError::Invalid(format!("{}: {e}", p.display())))?;
    let drop = v["winner"]["drop_layers"]
        .as_array()
        .ok_or_else(|| OpError::Invalid(format!("{}: no winner.drop_layers", p.display())))?;
    Ok(PruneTarget {
        drop_layers: drop
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as usize))
            .collect(),
        ..Default::default()
    })
}

pub struct DepthScan;

impl Op for DepthScan {
    fn signature(&self) -> OpSignature {
        use ParamValue::Int as I;
        OpSignature {
            name: "depth_scan",
            // 2: the fused CPU forward. 3: the fused CPU attention. 4: its key product reads
            // transposed keys.
            version: 4,
            doc: "validation loss with each layer, and each contiguous block of layers, removed",
            inputs: vec![
                Port::new("model", ArtifactKind::Model, "the model to scan"),
                Port::new("data", ArtifactKind::Dataset, "validation texts"),
            ],
            output: ArtifactKind::Report,
            params: vec![ParamSpec::with_default(
                "block_length",
                ParamType::Int,
                I(1),
                "also scan every contiguous block of this many layers (1: single layers only)",
            )]
            .into_iter()
            .chain(validation::params())
            .collect(),
        }
    }

    fn check(&self, p: &Params) -> Vec<Problem> {
        p.require_positive(&["block_length", "samples", "seq_len"])
    }

    fn plan_check(
        &self,
        p: &Params,
        inputs: &std::collections::BTreeMap<String, crate::op::Artifact>,
    ) -> Vec<Problem> {
        let (Some(m), Ok(len)) = (inputs.get("model"), p.usize("block_length")) else {
            return Vec::new();
        };
        match crate::model::checkpoint::load_config(&m.path) {
            Ok(c) if len >= c.num_hidden_layers => vec![Problem {
                param: Some("block_length".into()),
                message: format!(
                    "block_length {len} would remove all {} layers of the model, or more",
                    c.num_hidden_layers
                ),
            }],
            _ => Vec::new(),
        }
    }

    /// Always: the held-out sequences are packed and shuffled from the seed.
    fn uses_seed(&self, _params: &Params) -> bool {
        true
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        runtime::with_threads(ctx.threads, || scan(ctx))
    }

    fn summarize(&self, out_dir: &Path) -> Option<String> {
        std::fs::read_to_string(out_dir.join("depth_scan.txt")).ok()
    }
}

fn scan(ctx: &OpContext) -> Result<(), OpError> {
    let p = &ctx.params;
    let model = runtime::open_model(ctx.input("model")?)?;
    let c = model.config.clone();
    let layers = c.num_hidden_layers;
    let block = p.usize("block_length")?;
    if block >= layers {
        return Err(OpError::Invalid(format!(
            "block_length {block} would remove all {layers} layers of the model, or more"
        )));
    }
    let seqs = validation::sequences(ctx, &model)?;
    let decoder = Decoder::<B>::load(&c, &model.weights, &runtime::device())?;
    drop(model);

    let mut removals: Vec<(usize, usize)> = (0..layers).map(|l| (l, 1)).collect();
    if block > 1 {
        removals.extend((0..=layers - block).map(|s| (s, block)));
    }
    ctx.progress.phase(
        "scanning removals",
        removals.len() as u64 + 1,
        "evaluations",
    );
    let baseline = validation::mean_lm_loss(&decoder, &seqs);
    ctx.progress.set(1);
    let mut single = Vec::new();
    let mut blocks = Vec::new();
    for (i, &(start, length)) in removals.iter().enumerate() {
        let loss = validation::mean_lm_loss(&without(&decoder, start, length), &seqs);
        let row = json!({
            "drop_layers": (start..start + length).collect::<Vec<_>>(),
            "val_loss": loss,
            "delta": loss - baseline,
        });
        if length == 1 {
            single.push(row)
        } else {
            blocks.push(row)
        }
        ctx.progress.set(i as u64 + 2);
    }
    let best = |rows: &[Value]| -> Option<Value> {
        rows.iter()
            .min_by(|a, b| {
                a["val_loss"]
                    .as_f64()
                    .unwrap_or(f64::MAX)
                    .total_cmp(&b["val_loss"].as_f64().unwrap_or(f64::MAX))
            })
            .cloned()
    };
    // The removal asked for: a block when a block length is set, else one layer.
    let winner = if block > 1 {
        best(&blocks)
    } else {
        best(&single)
    }
    .expect("at least one removal");
    let report = json!({
        "sequences": seqs.len(),
        "baseline_val_loss": baseline,
        "layers": single,
        "blocks": blocks,
        "block_length": block,
        "winner": winner,
    });

    let mut text = format!(
        "validation loss {baseline:.4} with all {layers} layers ({} sequences)\nsingle layer removed (0-indexed):\n",
        seqs.len()
    );
    for r in &single {
        text.push_str(&format!(
            "  layer {:>3}  loss {:.4}  (+{:.4})\n",
            r["drop_layers"][0],
            r["val_loss"].as_f64().unwrap_or(f64::NAN),
            r["delta"].as_f64().unwrap_or(f64::NAN)
        ));
    }
    if block > 1 {
        text.push_str(&format!("blocks of {block} layers removed:\n"));
        for r in &blocks {
            let d = r["drop_layers"].as_array().cloned().unwrap_or_default();
            text.push_str(&format!(
                "  layers {:>3}-{:<3}  loss {:.4}  (+{:.4})\n",
                d.first().cloned().unwrap_or_default(),
                d.last().cloned().unwrap_or_default(),
                r["val_loss"].as_f64().unwrap_or(f64::NAN),
                r["delta"].as_f64().unwrap_or(f64::NAN)
            ));
        }
    }
    text.push_str(&format!(
        "winner: drop layers {} (loss {:.4})\n",
        winner["drop_layers"],
        winner["val_loss"].as_f64().unwrap_or(f64::NAN)
    ));
    let deltas: Vec<f32> = single
        .iter()
        .map(|r| r["delta"].as_f64().unwrap_or(0.0) as f32)
        .collect();
    ctx.write_output(SCAN_FILE, serde_json::to_string_pretty(&report).unwrap())?;
    ctx.write_output("depth_scan.txt", text)?;
    ctx.write_output(
        "depth_scan.svg",
        crate::score::bar_chart_svg("validation loss increase with each layer removed", &deltas),
    )
}
