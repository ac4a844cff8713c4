//! The `search` op (Minitron §3): enumerate candidate shapes under a parameter budget on a grid,
//! with exact parameter counts from the config; keep the top-k largest under budget; score each by
//! validation LM loss right after pruning (in memory, from the same importance scores); report the
//! ranking and the winner, which a `prune` step takes through its `target` input.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};

use crate::model::config::ModelConfig;
use crate::model::decoder::Decoder;
use crate::model::weights::Weights;
use crate::op::{
    ArtifactKind, Op, OpContext, OpError, OpSignature, ParamSpec, ParamType, ParamValue, Params,
    Port, Problem,
};
use crate::prune::{PrunePlan, PruneTarget, prune_tensor};
use crate::runtime::{self, Backend as B};
use crate::score::ImportanceScores;
use crate::validation;

pub const SEARCH_FILE: &str = "search.json";

/// Every grid shape within the reductions allowed, under `budget` parameters, largest first.
/// With `loadable_only`, only shapes transformers 4.46+ and 5.x load as the same model
/// ([`PruneTarget::loadability_problems`]).
#[allow(clippy::too_many_arguments)]
pub fn candidates(
    c: &ModelConfig,
    budget: u64,
    hidden_step: usize,
    ffn_step: usize,
    layer_step: usize,
    max_width: f64,
    max_depth: f64,
    loadable_only: bool,
) -> Vec<(PruneTarget, u64)> {
    let grid = |full: usize, step: usize, max_cut: f64| -> Vec<usize> {
        let min = ((full as f64) * (1.0 - max_cut)).ceil() as usize;
        let mut v: Vec<usize> = (1..=full / step.max(1))
            .map(|k| k * step)
            .filter(|&x| x >= min && x <= full)
            .collect();
        if !v.contains(&full) {
            v.push(full);
        }
        v
    };
    let per_group = c.num_attention_heads / c.num_key_value_heads;
    let heads: Vec<usize> = (1..=per_group)
        .map(|g| g * c.num_key_value_heads)
        .filter(|&h| h as f64 >= c.num_attention_heads as f64 * (1.0 - max_width))
        .collect();
    let mut out = Vec::new();
    for layers in grid(c.num_hidden_layers, layer_step, max_depth) {
        for &hidden in &grid(c.hidden_size, hidden_step, max_width) {
            for &ffn in &grid(c.intermediate_size, ffn_step, max_width) {
                for &h in &heads {
                    let t = PruneTarget {
                        hidden_size: Some(hidden),
                        intermediate_size: Some(ffn),
                        num_attention_heads: Some(h),
                        num_layers: Some(layers),
                        ..Default::default()
                    };
                    if loadable_only && !t.loadability_problems(c).is_empty() {
                        continue;
                    }
                    let p = t.apply_to(c).parameter_count().0;
                    if p <= budget {
                        out.push((t, p));
                    }
                }
            }
        }
    }
    out.sort_by(|a, b| b.1.cmp(&a.1));
    out
}

fn target_json(t: &PruneTarget) -> Value {
    json!({
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_attention_heads": t.num_attention_heads,
        "num_layers": t.num_layers,
    })
}

/// The winning target of a search report.
pub fn read_winner(dir: &Path) -> Result<PruneTarget, OpError> {
    let p = dir.join(SEARCH_FILE);
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(&p).map_err(|e| OpError::io(&p, "read", e))?)
            .map_err(|e| OpError::Invalid(format!("{}: {e}", p.display())))?;
    let w = &v["winner"]["target"];
    let get = |k: &str| w[k].as_u64().map(|x| x as usize);
    Ok(PruneTarget {
        hidden_size: get("hidden_size"),
        intermediate_size: get("intermediate_size"),
        num_attention_heads: get("num_attention_heads"),
        num_layers: get("num_layers"),
        ..Default::default()
    })
}

pub struct Search;

impl Op for Search {
    fn signature(&self) -> OpSignature {
        use ParamValue::{Float, Int as I};
        OpSignature {
            name: "search",
            // 3: the fused CPU forward. 4: the fused CPU attention. 5: its key product reads
            // transposed keys.
            version: 5,
            doc: "rank candidate shapes under a parameter budget by validation loss right after pruning",
            inputs: vec![
                Port::new("model", ArtifactKind::Model, "the model to prune"),
                Port::new("scores", ArtifactKind::Scores, "its importance scores"),
                Port::new("data", ArtifactKind::Dataset, "validation texts"),
            ],
            output: ArtifactKind::Report,
            params: vec![
                ParamSpec::required(
                    "parameter_budget",
                    ParamType::Int,
                    "largest parameter count allowed (\"8.4B\")",
                ),
                ParamSpec::with_default(
                    "hidden_step",
                    ParamType::Int,
                    I(256),
                    "grid step of hidden_size",
                ),
                ParamSpec::with_default(
                    "ffn_step",
                    ParamType::Int,
                    I(512),
                    "grid step of intermediate_size",
                ),
                ParamSpec::with_default(
                    "layer_step",
                    ParamType::Int,
                    I(2),
                    "grid step of the layer count",
                ),
                ParamSpec::with_default(
                    "max_width_reduction",
                    ParamType::Float,
                    Float(0.4),
                    "largest fraction of a width axis removed",
                ),
                ParamSpec::with_default(
                    "max_depth_reduction",
                    ParamType::Float,
                    Float(0.2),
                    "largest fraction of layers removed",
                ),
                ParamSpec::with_default(
                    "loadable_only",
                    ParamType::Bool,
                    ParamValue::Bool(true),
                    "propose only shapes transformers 5 loads (hidden_size a multiple of num_attention_heads)",
                ),
                ParamSpec::with_default(
                    "top_k",
                    ParamType::Int,
                    I(10),
                    "largest candidates under budget to score",
                ),
            ]
            .into_iter()
            .chain(validation::params())
            .collect(),
        }
    }

    fn check(&self, p: &Params) -> Vec<Problem> {
        p.require_positive(&[
            "hidden_step",
            "ffn_step",
            "layer_step",
            "top_k",
            "samples",
            "seq_len",
            "parameter_budget",
        ])
    }

    /// Always: the held-out sequences are packed and shuffled from the seed.
    fn uses_seed(&self, _params: &Params) -> bool {
        true
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        runtime::with_threads(ctx.threads, || search(ctx))
    }

    fn summarize(&self, out_dir: &Path) -> Option<String> {
        std::fs::read_to_string(out_dir.join("search.txt")).ok()
    }
}

fn search(ctx: &OpContext) -> Result<(), OpError> {
    let p = &ctx.params;
    let model = runtime::open_model(ctx.input("model")?)?;
    let scores = ImportanceScores::read(&ctx.input("scores")?.path)?;
    let c = model.config.clone();
    let budget = p.int("parameter_budget")?.max(0) as u64;
    let all = candidates(
        &c,
        budget,
        p.usize("hidden_step")?,
        p.usize("ffn_step")?,
        p.usize("layer_step")?,
        p.float("max_width_reduction")?,
        p.float("max_depth_reduction")?,
        p.bool("loadable_only")?,
    );
    if all.is_empty() {
        return Err(OpError::Invalid(format!(
            "no grid shape fits {budget} parameters within the allowed reductions: raise the budget or the reductions, or use finer steps"
        )));
    }
    let top: Vec<_> = all.iter().take(p.usize("top_k")?).cloned().collect();
    let seqs = validation::sequences(ctx, &model)?;
    let device = runtime::device();
    ctx.progress
        .phase("scoring candidates", top.len() as u64, "candidates");
    let mut ranked = Vec::new();
    for (i, (target, params)) in top.iter().enumerate() {
        let plan = PrunePlan::new(&scores, target, true);
        let new = target.apply_to(&c);
        let mut tensors = BTreeMap::new();
        for (name, shape) in new.tensor_shapes() {
            tensors.insert(
                name.clone(),
                (shape, prune_tensor(&model.weights, &c, &plan, &name)?),
            );
        }
        let decoder = Decoder::<B>::load(
            &new,
            &Weights::from_memory(model.path.clone(), tensors),
            &device,
        )?;
        let loss = validation::mean_lm_loss(&decoder, &seqs);
        ranked.push(json!({"target": target_json(target), "parameters": params, "val_loss": loss}));
        ctx.progress.set((i + 1) as u64);
    }
    ranked.sort_by(|a, b| {
        a["val_loss"]
            .as_f64()
            .unwrap_or(f64::MAX)
            .total_cmp(&b["val_loss"].as_f64().unwrap_or(f64::MAX))
    });
    let report = json!({"budget": budget, "grid_candidates": all.len(), "ranking": ranked, "winner": ranked[0]});
    let mut text = format!(
        "{} grid shapes under {:.1}M parameters; the {} largest scored:\n",
        all.len(),
        budget as f64 / 1e6,
        ranked.len()
    );
    for r in &ranked {
        let t = &r["target"];
        text.push_str(&format!(
            "  L{} h{} ffn{} {}h  {:.1}M  val loss {:.4}\n",
            t["num_layers"],
            t["hidden_size"],
            t["intermediate_size"],
            t["num_attention_heads"],
            r["parameters"].as_f64().unwrap_or(0.0) / 1e6,
            r["val_loss"].as_f64().unwrap_or(f64::NAN)
        ));
    }
    ctx.write_output(SEARCH_FILE, serde_json::to_string_pretty(&report).unwrap())?;
    ctx.write_output("search.txt", text)
}
