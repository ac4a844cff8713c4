//! The `prune` op (Minitron §2): slices a checkpoint along hidden, ffn, head, KV-group and depth
//! axes by importance, streaming tensor by tensor from the input checkpoint into the output one.
//! Every tensor that shares an axis uses the same index list; names stay Hugging Face's.

use std::path::Path;

use crate::data::SplitMix;
use crate::model::arch::{Axis, Role};
use crate::model::checkpoint::{SaveOptions, load_config};
use crate::model::config::ModelConfig;
use crate::model::weights::{DType, Weights};
use crate::op::{
    Artifact, ArtifactKind, Op, OpContext, OpError, OpSignature, ParamSpec, ParamType, ParamValue,
    Params, Port, Problem,
};
use crate::runtime;
use crate::score::ImportanceScores;

/// What to prune to. `None` keeps an axis.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PruneTarget {
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    /// Keep this many layers, by block importance.
    pub num_layers: Option<usize>,
    /// Drop these layers (0-indexed).
    pub drop_layers: Vec<usize>,
}

impl PruneTarget {
    pub fn from_params(p: &Params) -> Result<PruneTarget, OpError> {
        let opt = |n: &str| -> Result<Option<usize>, OpError> {
            Ok(p.opt_int(n)?.map(|v| v.max(0) as usize))
        };
        Ok(PruneTarget {
            hidden_size: opt("hidden_size")?,
            intermediate_size: opt("intermediate_size")?,
            num_attention_heads: opt("num_attention_heads")?,
            num_key_value_heads: opt("num_key_value_heads")?,
            num_layers: opt("num_layers")?,
            drop_layers: p
                .int_list("drop_layers")?
                .unwrap_or_default()
                .into_iter()
                .map(|v| v.max(0) as usize)
                .collect(),
        })
    }

    /// Problems with this target for a model of `config`, each naming its parameter.
    pub fn problems(&self, c: &ModelConfig) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut bad = |param: &str, message: String| {
            out.push(Problem {
                param: Some(param.into()),
                message,
            })
        };
        let axes = [
            ("hidden_size", self.hidden_size, c.hidden_size),
            (
                "intermediate_size",
                self.intermediate_size,
                c.intermediate_size,
            ),
            (
                "num_attention_heads",
                self.num_attention_heads,
                c.num_attention_heads,
            ),
            (
                "num_key_value_heads",
                self.num_key_value_heads,
                c.num_key_value_heads,
            ),
            ("num_layers", self.num_layers, c.num_hidden_layers),
        ];
        for (name, target, original) in axes {
            match target {
                Some(0) => bad(name, format!("{name} must be at least 1")),
                Some(t) if t > original => bad(
                    name,
                    format!(
                        "{name} {t} is larger than the model's {original}; pruning only shrinks"
                    ),
                ),
                _ => {}
            }
        }
        // The shape the target derives (KV groups alone take their query heads with them).
        let derived = self.apply_to(c);
        let (kv, heads) = (derived.num_key_value_heads, derived.num_attention_heads);
        let per_group = c.num_attention_heads / c.num_key_value_heads.max(1);
        let param = if self.num_attention_heads.is_some() {
            "num_attention_heads"
        } else {
            "num_key_value_heads"
        };
        if kv > 0 && heads > 0 && heads % kv != 0 {
            bad(
                param,
                format!(
                    "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}: every KV group keeps the same number of heads (try {} or {} heads)",
                    (heads / kv).max(1) * kv,
                    (heads / kv + 1).min(per_group) * kv
                ),
            );
        } else if kv > 0 && heads / kv > per_group {
            bad(
                param,
                format!(
                    "num_attention_heads {heads} over num_key_value_heads {kv} asks for {} query heads per KV group, but each group has only {per_group}: keep at most {} heads, or more KV groups",
                    heads / kv,
                    per_group * kv
                ),
            );
        }
        if let Some(&l) = self.drop_layers.iter().find(|&&l| l >= c.num_hidden_layers) {
            bad(
                "drop_layers",
                format!(
                    "layer {l} does not exist (the model has layers 0..{})",
                    c.num_hidden_layers - 1
                ),
            );
        }
        let mut dropped = self.drop_layers.clone();
        dropped.sort();
        dropped.dedup();
        if dropped.len() >= c.num_hidden_layers {
            bad("drop_layers", "dropping every layer leaves no model".into());
        }
        if self.num_layers.is_some() && !self.drop_layers.is_empty() {
            bad(
                "num_layers",
                "give either num_layers or drop_layers, not both".into(),
            );
        }
        out
    }

    /// The config after pruning.
    pub fn apply_to(&self, c: &ModelConfig) -> ModelConfig {
        let mut n = c.clone();
        if let Some(h) = self.hidden_size {
            n.hidden_size = h;
        }
        if let Some(f) = self.intermediate_size {
            n.intermediate_size = f;
        }
        if let Some(kv) = self.num_key_value_heads {
            // Dropping KV groups drops their query heads unless a head count is given.
            n.num_key_value_heads = kv;
            n.num_attention_heads = c.num_attention_heads / c.num_key_value_heads * kv;
        }
        if let Some(h) = self.num_attention_heads {
            n.num_attention_heads = h;
        }
        let mut dropped = self.drop_layers.clone();
        dropped.sort();
        dropped.dedup();
        n.num_hidden_layers = self
            .num_layers
            .unwrap_or(c.num_hidden_layers.saturating_sub(dropped.len()));
        if self.num_layers.is_none() {
            let kept: Vec<usize> = (0..c.num_hidden_layers)
                .filter(|l| !dropped.contains(l))
                .collect();
            n.layer_types = c.keep_layers(&kept).layer_types;
        } else if let Some(kinds) = &c.layer_types {
            // Which layers survive is decided by the scores (`PrunePlan`); until then the
            // per-layer kinds are known only when they are all alike.
            n.layer_types = kinds
                .iter()
                .all(|k| *k == kinds[0])
                .then(|| vec![kinds[0].clone(); n.num_hidden_layers]);
        }
        n
    }

    /// A plan-time caution, not a shape problem (so `search` keeps such targets): which layers
    /// `num_layers` keeps is decided by the scores, and for families whose windows transformers
    /// 4.x derives from the layer index the kept layers must alternate; `prune` checks them once
    /// chosen (an error under `strict_shapes`).
    pub fn depth_caution(&self, c: &ModelConfig) -> Option<(&'static str, String)> {
        let n = self.num_layers?;
        (c.family.windows_by_index_in_4x && n < c.num_hidden_layers).then(|| ("num_layers", format!(
            "num_layers keeps the layers the scores rank highest, and transformers 4.x alternates {}'s windows by layer index (even layers sliding), ignoring layer_types: unless the kept layers alternate, the export computes another model there (checked when the layers are chosen); to be sure, give drop_layers in pairs",
            c.architecture()
        )))
    }

    /// Why transformers would not load the pruned shape, or load a different model, as
    /// `(param, message)` pairs naming the rule and the nearest sizes it loads; empty when the
    /// export loads everywhere distillery promises (transformers 4.46+ and 5.x):
    /// - transformers 5 refuses a `hidden_size` that is not a multiple of `num_attention_heads`,
    ///   even with an explicit `head_dim`;
    /// - the 4.x classes of some families derive `head_dim = hidden_size / num_attention_heads`
    ///   and ignore the field ([`Family::head_dim_derived_in_4x`]);
    /// - 4.x alternates Gemma 2's windows by layer index and ignores `layer_types`, so dropped
    ///   layers must keep the alternation ([`Family::windows_by_index_in_4x`]).
    pub fn loadability_problems(&self, c: &ModelConfig) -> Vec<(&'static str, String)> {
        let n = self.apply_to(c);
        let (h, heads) = (n.hidden_size, n.num_attention_heads);
        let mut out = Vec::new();
        if heads > 0 && h % heads != 0 {
            let below = h / heads * heads;
            let above = (below + heads).min(c.hidden_size);
            let sizes = if above > h && above % heads == 0 && below > 0 {
                format!("{below} or {above}")
            } else {
                below.to_string()
            };
            out.push(("hidden_size", format!(
                "hidden_size {h} is not a multiple of num_attention_heads {heads}: transformers 5 refuses to load such a config (even with an explicit head_dim); the nearest loadable hidden_size is {sizes}"
            )));
        } else if c.family.head_dim_derived_in_4x && heads * n.head_dim != h {
            out.push(("hidden_size", format!(
                "hidden_size {h} with {heads} heads of head_dim {}: transformers 4.x's {} ignores head_dim and derives {h} / {heads}, so the export loads in transformers 5 only; keep hidden_size = num_attention_heads × head_dim = {}",
                n.head_dim,
                c.architecture(),
                heads * n.head_dim
            )));
        }
        if !self.drop_layers.is_empty()
            && let Some(message) = broken_window_alternation(c, &n)
        {
            out.push(("drop_layers", format!(
                "after dropping layers {:?}, {message}; drop layers in pairs to keep the alternation",
                self.drop_layers
            )));
        }
        out
    }
}

/// A model that rotates part of each head in a family whose transformers 4.46 class rotates whole
/// heads (Phi-3: `partial_rotary_factor` came in 4.49): its export computes another model there.
/// A plan-time caution about the model, not the shape, so `search` is not affected.
pub fn partial_rotary_caution(c: &ModelConfig) -> Option<(&'static str, String)> {
    (c.family.partial_rotary && !c.family.partial_rotary_in_446 && c.partial_rotary_factor < 1.0)
        .then(|| ("partial_rotary_factor", format!(
            "partial_rotary_factor is {}, but transformers 4.46's {} rotates whole heads (the factor is read from 4.49): the export gives these logits in transformers 4.49+ and 5.x only",
            c.partial_rotary_factor,
            c.architecture()
        )))
}

/// Where `pruned` breaks the sliding/full alternation that transformers 4.x assumes for families
/// whose windows it derives from the layer index ([`Family::windows_by_index_in_4x`]): a
/// sentence naming the first layer out of step, or `None` when the layers alternate (or the
/// family reads `layer_types`).
pub fn broken_window_alternation(original: &ModelConfig, pruned: &ModelConfig) -> Option<String> {
    if !original.family.windows_by_index_in_4x {
        return None;
    }
    let kinds = pruned.layer_types.as_ref()?;
    let i = kinds
        .iter()
        .enumerate()
        .position(|(i, k)| (k == "sliding_attention") != (i % 2 == 0))?;
    Some(format!(
        "layer {i} is \"{}\": transformers 4.x alternates {}'s windows by layer index (even layers sliding) and ignores layer_types, so the export computes another model there",
        kinds[i],
        original.architecture()
    ))
}

/// Which channels, heads and layers survive, as index lists into the original model.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PrunePlan {
    pub hidden: Vec<usize>,
    /// Original layer index of each kept layer, in order.
    pub layers: Vec<usize>,
    /// Per kept layer: ffn neurons kept.
    pub neurons: Vec<Vec<usize>>,
    /// Per kept layer: query heads kept (original head indices).
    pub heads: Vec<Vec<usize>>,
    /// Per kept layer: KV groups kept.
    pub kv_groups: Vec<Vec<usize>>,
}

/// Indices of the `k` largest values, most important first (ties by index).
fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

impl PrunePlan {
    /// `keep_importance_order`: kept channels in importance order (the reference) or original order.
    pub fn new(
        scores: &ImportanceScores,
        target: &PruneTarget,
        keep_importance_order: bool,
    ) -> PrunePlan {
        let c = &scores.config;
        let new = target.apply_to(c);
        let order = |mut v: Vec<usize>| {
            if !keep_importance_order {
                v.sort();
            }
            v
        };
        let layers: Vec<usize> = if let Some(n) = target.num_layers {
            let mut keep = top_k(&scores.layers, n);
            keep.sort();
            keep
        } else {
            (0..c.num_hidden_layers)
                .filter(|l| !target.drop_layers.contains(l))
                .collect()
        };
        let hidden = order(top_k(&scores.hidden, new.hidden_size));
        let per_group_old = c.num_attention_heads / c.num_key_value_heads;
        let per_group_new = new.num_attention_heads / new.num_key_value_heads;
        let mut neurons = Vec::new();
        let mut heads = Vec::new();
        let mut kv_groups = Vec::new();
        for &l in &layers {
            neurons.push(order(top_k(&scores.neurons[l], new.intermediate_size)));
            // KV groups by importance (kept in original order: K/V rows move as whole groups).
            let mut groups = top_k(&scores.kv_groups[l], new.num_key_value_heads);
            groups.sort();
            let mut kept_heads = Vec::new();
            for &g in &groups {
                let members: Vec<f32> = (0..per_group_old)
                    .map(|i| scores.heads[l][g * per_group_old + i])
                    .collect();
                let mut best = top_k(&members, per_group_new);
                if !keep_importance_order {
                    best.sort();
                }
                kept_heads.extend(best.into_iter().map(|i| g * per_group_old + i));
            }
            heads.push(kept_heads);
            kv_groups.push(groups);
        }
        PrunePlan {
            hidden,
            layers,
            neurons,
            heads,
            kv_groups,
        }
    }
}

/// Gathers `rows` and `cols` of a row-major `[r, c]` matrix.
fn gather(w: &[f32], cols_total: usize, rows: &[usize], cols: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * cols.len());
    for &r in rows {
        let row = &w[r * cols_total..(r + 1) * cols_total];
        out.extend(cols.iter().map(|&c| row[c]));
    }
    out
}

/// Rows of whole heads: head h covers rows h*d .. (h+1)*d.
fn head_rows(heads: &[usize], d: usize) -> Vec<usize> {
    heads.iter().flat_map(|&h| h * d..(h + 1) * d).collect()
}

/// The kept indices along `axis` of old layer `l`'s tensors (`l` in the new model's numbering
/// for per-layer axes), from the plan: one generic gather for every family's table.
fn kept_along(axis: Axis, old: &ModelConfig, plan: &PrunePlan, new_l: Option<usize>) -> Vec<usize> {
    let d = old.head_dim;
    let all = |n: usize| (0..n).collect::<Vec<_>>();
    let layer = || new_l.expect("a per-layer axis outside a layer");
    match axis {
        Axis::Vocab => all(old.vocab_size),
        Axis::Hidden => plan.hidden.clone(),
        Axis::HeadDim => all(d),
        Axis::Ffn => plan.neurons[layer()].clone(),
        Axis::QHeads => head_rows(&plan.heads[layer()], d),
        Axis::KvHeads => head_rows(&plan.kv_groups[layer()], d),
        Axis::PackedQkv => {
            let (q, kv) = (old.num_attention_heads * d, old.num_key_value_heads * d);
            let kept_kv = head_rows(&plan.kv_groups[layer()], d);
            let mut rows = head_rows(&plan.heads[layer()], d);
            rows.extend(kept_kv.iter().map(|r| q + r));
            rows.extend(kept_kv.iter().map(|r| q + kv + r));
            rows
        }
        Axis::PackedGateUp => {
            let n = &plan.neurons[layer()];
            n.iter()
                .copied()
                .chain(n.iter().map(|i| old.intermediate_size + i))
                .collect()
        }
    }
}

/// Streams the pruned tensors of `weights` (a model of `old`) into a checkpoint of `new`: the
/// tensor `name` of the new checkpoint, gathered from its source by the axes of the family's
/// table.
pub fn prune_tensor(
    weights: &Weights,
    old: &ModelConfig,
    plan: &PrunePlan,
    name: &str,
) -> Result<Vec<f32>, OpError> {
    // New layer n is old layer plan.layers[n]: same role, same table row.
    let (new_l, src) = match name
        .strip_prefix("model.layers.")
        .and_then(|r| r.split_once('.'))
        .and_then(|(n, part)| Some((n.parse::<usize>().ok()?, part)))
    {
        Some((n, part)) => (Some(n), format!("model.layers.{}.{part}", plan.layers[n])),
        None => (None, name.to_string()),
    };
    let spec = old
        .tensor_specs()
        .into_iter()
        .find(|s| s.name == src)
        .ok_or_else(|| {
            OpError::Invalid(format!(
                "tensor {name} is not part of a {} (its source {src} is not in the table)",
                old.architecture()
            ))
        })?;
    let (shape, w) = weights.f32(&src)?;
    Ok(match spec.axes[..] {
        [rows] => kept_along(rows, old, plan, new_l)
            .into_iter()
            .map(|i| w[i])
            .collect(),
        [rows, cols] => gather(
            &w,
            shape[1],
            &kept_along(rows, old, plan, new_l),
            &kept_along(cols, old, plan, new_l),
        ),
        _ => {
            return Err(OpError::Invalid(format!(
                "tensor {name} has {} axes in the table",
                spec.axes.len()
            )));
        }
    })
}

/// Scores that ignore activations: L2 norms of weights (`magnitude`) or noise (`random`), for
/// comparing against importance-based pruning.
pub fn baseline_scores(
    weights: &Weights,
    c: &ModelConfig,
    method: &str,
    seed: u64,
) -> Result<ImportanceScores, OpError> {
    let n = c.num_hidden_layers;
    let mut rng = SplitMix(seed);
    let mut rand = |k: usize| {
        (0..k)
            .map(|_| (rng.next_u64() >> 11) as f32 / (1u64 << 53) as f32)
            .collect::<Vec<f32>>()
    };
    if method == "random" {
        let per_group = c.num_attention_heads / c.num_key_value_heads;
        let heads: Vec<Vec<f32>> = (0..n).map(|_| rand(c.num_attention_heads)).collect();
        return Ok(ImportanceScores {
            config: c.clone(),
            neurons: (0..n).map(|_| rand(c.intermediate_size)).collect(),
            kv_groups: heads
                .iter()
                .map(|h| h.chunks(per_group).map(|g| g.iter().sum()).collect())
                .collect(),
            heads,
            hidden: rand(c.hidden_size),
            layers: rand(n),
        });
    }
    let row_norms = |w: &[f32], cols: usize| -> Vec<f32> {
        w.chunks(cols)
            .map(|r| r.iter().map(|x| x * x).sum::<f32>().sqrt())
            .collect()
    };
    let (_, emb) = weights.f32("model.embed_tokens.weight")?;
    let mut hidden = vec![0f32; c.hidden_size];
    for row in emb.chunks(c.hidden_size) {
        for (h, x) in hidden.iter_mut().zip(row) {
            *h += x * x;
        }
    }
    // The rows of the up projection and of the queries, by role: Phi-3 packs them with others.
    let specs = c.tensor_specs();
    let rows_of = |l: usize, plain: Role, packed: Role, skip: usize, take: usize| {
        let spec = specs
            .iter()
            .find(|s| s.layer == Some(l) && (s.role == plain || s.role == packed))
            .ok_or_else(|| OpError::Invalid(format!("layer {l} has no {plain:?} tensor")))?;
        let (_, w) = weights.f32(&spec.name)?;
        let skip = if spec.role == packed { skip } else { 0 };
        Ok::<_, OpError>(w[skip * c.hidden_size..(skip + take) * c.hidden_size].to_vec())
    };
    let mut neurons = Vec::new();
    let mut heads = Vec::new();
    let mut kv_groups = Vec::new();
    for l in 0..n {
        let f = c.intermediate_size;
        let up = rows_of(l, Role::Up, Role::GateUp, f, f)?;
        neurons.push(row_norms(&up, c.hidden_size));
        let q = rows_of(l, Role::Q, Role::Qkv, 0, c.num_attention_heads * c.head_dim)?;
        let per_head: Vec<f32> = q
            .chunks(c.head_dim * c.hidden_size)
            .map(|h| h.iter().map(|x| x * x).sum::<f32>().sqrt())
            .collect();
        let per_group = c.num_attention_heads / c.num_key_value_heads;
        kv_groups.push(per_head.chunks(per_group).map(|g| g.iter().sum()).collect());
        heads.push(per_head);
    }
    Ok(ImportanceScores {
        config: c.clone(),
        neurons,
        heads,
        kv_groups,
        hidden: hidden.into_iter().map(f32::sqrt).collect(),
        layers: vec![1.0; n],
    })
}

pub struct Prune;

const METHODS: &[&str] = &["importance", "magnitude", "random"];
const DTYPES: &[&str] = &["same", "float32", "bfloat16", "float16"];

impl Op for Prune {
    fn signature(&self) -> OpSignature {
        OpSignature {
            name: "prune",
            // 2: writes tokenizer_config.json. 3: config.json from the family table (attention_bias,
            // mlp_bias, the family's activation key written explicitly). 4: chat_template.jinja
            // (transformers 5's chat template) copied with the tokenizer.
            version: 4,
            doc: "slice a model along width and depth by importance (Minitron)",
            inputs: vec![
                Port::new("model", ArtifactKind::Model, "the model to prune"),
                Port::optional(
                    "scores",
                    ArtifactKind::Scores,
                    "importance scores of that model (required for method = \"importance\")",
                ),
                Port::optional(
                    "target",
                    ArtifactKind::Report,
                    "a search or depth_scan report: its winner sets the axes the parameters leave unset",
                ),
            ],
            output: ArtifactKind::Model,
            params: vec![
                ParamSpec::optional("hidden_size", ParamType::Int, "embedding channels to keep"),
                ParamSpec::optional(
                    "intermediate_size",
                    ParamType::Int,
                    "MLP neurons to keep per layer",
                ),
                ParamSpec::optional(
                    "num_attention_heads",
                    ParamType::Int,
                    "query heads to keep per layer (a multiple of the KV heads)",
                ),
                ParamSpec::optional(
                    "num_key_value_heads",
                    ParamType::Int,
                    "KV groups to keep per layer",
                ),
                ParamSpec::optional(
                    "num_layers",
                    ParamType::Int,
                    "layers to keep, by block importance",
                ),
                ParamSpec::optional(
                    "drop_layers",
                    ParamType::IntList,
                    "layers to drop, 0-indexed",
                ),
                ParamSpec::with_default(
                    "method",
                    ParamType::Choice(METHODS),
                    ParamValue::Str("importance".into()),
                    "how to rank: activation importance, or the magnitude/random baselines",
                ),
                ParamSpec::with_default(
                    "order",
                    ParamType::Choice(&["importance", "original"]),
                    ParamValue::Str("importance".into()),
                    "kept channels in importance order (the reference) or original order",
                ),
                ParamSpec::with_default(
                    "dtype",
                    ParamType::Choice(DTYPES),
                    ParamValue::Str("same".into()),
                    "dtype of the written checkpoint",
                ),
                ParamSpec::with_default(
                    "shard_size",
                    ParamType::Int,
                    ParamValue::Int(5_000_000_000),
                    "bytes per safetensors shard",
                ),
                ParamSpec::with_default(
                    "strict_shapes",
                    ParamType::Bool,
                    ParamValue::Bool(false),
                    "refuse (instead of warning about) a shape transformers 5 will not load: hidden_size not a multiple of num_attention_heads",
                ),
            ],
        }
    }

    fn check(&self, params: &Params) -> Vec<Problem> {
        let mut p = Vec::new();
        let Ok(t) = PruneTarget::from_params(params) else {
            return p;
        };
        if let (Some(h), Some(kv)) = (t.num_attention_heads, t.num_key_value_heads)
            && kv > 0
            && h % kv != 0
        {
            p.push(Problem {
                param: Some("num_attention_heads".into()),
                message: format!(
                    "num_attention_heads {h} is not a multiple of num_key_value_heads {kv}"
                ),
            });
        }
        if t.num_layers.is_some() && !t.drop_layers.is_empty() {
            p.push(Problem {
                param: Some("num_layers".into()),
                message: "give either num_layers or drop_layers, not both".into(),
            });
        }
        p
    }

    fn plan_check(
        &self,
        params: &Params,
        inputs: &std::collections::BTreeMap<String, Artifact>,
    ) -> Vec<Problem> {
        let Some(model) = inputs.get("model") else {
            return Vec::new();
        };
        let Ok(config) = load_config(&model.path) else {
            return Vec::new();
        };
        match PruneTarget::from_params(params) {
            Ok(t) => {
                let mut problems = t.problems(&config);
                if params.bool("strict_shapes").unwrap_or(false) {
                    problems.extend(t.loadability_problems(&config).into_iter().map(
                        |(param, message)| Problem {
                            param: Some(param.into()),
                            message,
                        },
                    ));
                }
                problems
            }
            Err(e) => vec![Problem {
                param: None,
                message: e.to_string(),
            }],
        }
    }

    fn plan_warnings(
        &self,
        params: &Params,
        inputs: &std::collections::BTreeMap<String, Artifact>,
    ) -> Vec<Problem> {
        if params.bool("strict_shapes").unwrap_or(false) {
            return Vec::new(); // an error then, from plan_check
        }
        let (Some(model), Ok(t)) = (inputs.get("model"), PruneTarget::from_params(params)) else {
            return Vec::new();
        };
        let Ok(config) = load_config(&model.path) else {
            return Vec::new();
        };
        if !t.problems(&config).is_empty() {
            return Vec::new();
        }
        t.loadability_problems(&config)
            .into_iter()
            .chain(t.depth_caution(&config))
            .chain(partial_rotary_caution(&config))
            .map(|(param, message)| Problem {
                param: Some(param.into()),
                message: format!("{message} (set strict_shapes = true to make this an error)"),
            })
            .collect()
    }

    fn estimate(
        &self,
        params: &Params,
        inputs: &std::collections::BTreeMap<String, crate::op::Estimate>,
    ) -> Option<crate::op::Estimate> {
        let c = crate::estimate::input_config(inputs, "model")?;
        let t = PruneTarget::from_params(params).ok()?;
        let mut e = crate::estimate::model_estimate(&t.apply_to(&c));
        e.basis = "streamed tensor by tensor: one tensor resident at a time".into();
        Some(e)
    }

    /// Only the `random` baseline draws from the seed; importance and magnitude are deterministic.
    fn uses_seed(&self, params: &Params) -> bool {
        params.str("method").is_ok_and(|m| m == "random")
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        let model_in = ctx.input("model")?;
        // Checked before any tensor is read.
        let config = load_config(&model_in.path)?;
        let mut target = PruneTarget::from_params(&ctx.params)?;
        if let Some(report) = ctx.inputs.get("target") {
            // A search report sets widths and a layer count; a depth scan, the layers to drop.
            let w = if report.path.join(crate::depth_scan::SCAN_FILE).is_file() {
                crate::depth_scan::read_winner(&report.path)?
            } else {
                crate::search::read_winner(&report.path)?
            };
            target.hidden_size = target.hidden_size.or(w.hidden_size);
            target.intermediate_size = target.intermediate_size.or(w.intermediate_size);
            target.num_attention_heads = target.num_attention_heads.or(w.num_attention_heads);
            if target.drop_layers.is_empty() {
                target.num_layers = target.num_layers.or(w.num_layers);
            }
            if target.drop_layers.is_empty() && target.num_layers.is_none() {
                target.drop_layers = w.drop_layers;
            }
        }
        if let Some(p) = target.problems(&config).first() {
            return Err(OpError::Invalid(p.message.clone()));
        }
        let model = runtime::open_model(model_in)?;
        let method = ctx.params.str("method")?;
        // Dropping listed layers ranks nothing: no scores needed, channels stay in order.
        let shaped = target.apply_to(&config);
        let depth_only = !target.drop_layers.is_empty()
            && (shaped.hidden_size, shaped.intermediate_size)
                == (config.hidden_size, config.intermediate_size)
            && (shaped.num_attention_heads, shaped.num_key_value_heads)
                == (config.num_attention_heads, config.num_key_value_heads);
        let scores = match (method, ctx.inputs.get("scores")) {
            ("importance", Some(s)) => ImportanceScores::read(&s.path)?,
            ("importance", None) if depth_only => {
                baseline_scores(&model.weights, &config, "magnitude", 0)?
            }
            ("importance", None) => {
                return Err(OpError::Invalid(
                    "method \"importance\" needs a `scores` input (only a pure drop_layers target does without)".into(),
                ));
            }
            (m, _) => {
                // Only the random baseline draws from the seed (see `uses_seed`).
                let seed = if m == "random" { ctx.seed()? } else { 0 };
                baseline_scores(&model.weights, &config, m, seed)?
            }
        };
        if scores.config.hidden_size != config.hidden_size
            || scores.config.num_hidden_layers != config.num_hidden_layers
        {
            return Err(OpError::Invalid(
                "the scores were computed for a model of another shape".into(),
            ));
        }
        let importance_order = ctx.params.str("order")? == "importance" && !depth_only;
        let plan = PrunePlan::new(&scores, &target, importance_order);
        let mut new = target.apply_to(&config);
        // Per-layer lists follow the layers the plan kept.
        new.layer_types = config.keep_layers(&plan.layers).layer_types;
        let mut warnings = Vec::new();
        if target.num_layers.is_some()
            && let Some(message) = broken_window_alternation(&config, &new)
        {
            let message = format!("keeping layers {:?}, {message}", plan.layers);
            if ctx.params.bool("strict_shapes")? {
                return Err(OpError::Invalid(format!(
                    "{message} (strict_shapes = true; give drop_layers in pairs instead)"
                )));
            }
            ctx.progress.note(&format!("warning: {message}"));
            warnings.push(message);
        }
        let dtype = match ctx.params.str("dtype")? {
            "same" => model.weights.dominant_dtype(),
            other => DType::from_torch_name(other).unwrap(),
        };
        let names = new.tensor_shapes();
        ctx.progress.phase("slicing", names.len() as u64, "tensors");
        let mut done = 0;
        let opts = SaveOptions {
            dtype,
            shard_bytes: ctx.params.int("shard_size")?.max(1) as u64,
            tokenizer_json: model.tokenizer_json.as_deref(),
            tokenizer_files: &model.tokenizer_files,
            generation_config: model.generation_config.as_ref(),
            tokenizer_config: model.tokenizer_config.as_ref(),
            provenance: &ctx.provenance,
        };
        crate::model::save_checkpoint(&ctx.out_dir, &new, &opts, |name| {
            let t = prune_tensor(&model.weights, &config, &plan, name).map_err(|e| {
                crate::model::ModelError::Checkpoint {
                    path: model.path.clone(),
                    why: e.to_string(),
                }
            })?;
            done += 1;
            ctx.progress.set(done);
            Ok(t)
        })?;
        let (before, _) = config.parameter_count();
        let (after, _) = new.parameter_count();
        let summary = serde_json::json!({
            "method": method,
            "parameters_before": before,
            "parameters_after": after,
            "config": new.to_json(),
            "plan": plan,
            "warnings": warnings,
        });
        let p = ctx.out_dir.join("prune_plan.json");
        std::fs::write(&p, serde_json::to_string(&summary).unwrap())
            .map_err(|e| OpError::io(&p, "write", e))?;
        ctx.progress.note(&format!(
            "{:.1}M → {:.1}M parameters",
            before as f64 / 1e6,
            after as f64 / 1e6
        ));
        Ok(())
    }

    fn summarize(&self, out_dir: &Path) -> Option<String> {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out_dir.join("prune_plan.json")).ok()?)
                .ok()?;
        let c = &v["config"];
        Some(format!(
            "pruned ({}) {:.1}M → {:.1}M parameters: {} layers, hidden {}, ffn {}, {} heads / {} kv, head_dim {}",
            v["method"].as_str().unwrap_or("?"),
            v["parameters_before"].as_f64()? / 1e6,
            v["parameters_after"].as_f64()? / 1e6,
            c["num_hidden_layers"],
            c["hidden_size"],
            c["intermediate_size"],
            c["num_attention_heads"],
            c["num_key_value_heads"],
            c["head_dim"]
        ))
    }
}
