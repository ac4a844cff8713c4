//! The `score` op (Minitron §1): importance per axis from calibration statistics.
//! Neurons: sqrt(acc) of the down_proj input per layer. Heads: L2 over head_dim of sqrt(acc) of the
//! o_proj input. Hidden channels: sum over every hooked norm of sqrt(acc). KV groups: sum of their
//! heads. Layers: block importance, sum over batches of (1 - mean cos(block input, output)).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use crate::model::config::ModelConfig;
use crate::op::{ArtifactKind, Op, OpContext, OpError, OpSignature, Port};
use crate::stats::{SCORES_FILE, SCORES_META, StatKind, Stats, read_vectors, write_vectors};

/// Importance per pruning axis. Higher means keep.
#[derive(Clone, Debug, PartialEq)]
pub struct ImportanceScores {
    pub config: ModelConfig,
    /// Per layer `[ffn]`.
    pub neurons: Vec<Vec<f32>>,
    /// Per layer `[heads]`.
    pub heads: Vec<Vec<f32>>,
    /// Per layer `[kv_heads]`.
    pub kv_groups: Vec<Vec<f32>>,
    /// `[hidden]`
    pub hidden: Vec<f32>,
    /// `[layers]`
    pub layers: Vec<f32>,
}

impl ImportanceScores {
    /// Applies the formulas to accumulated statistics.
    pub fn from_stats(stats: &Stats) -> Result<ImportanceScores, OpError> {
        let c = &stats.config;
        let mut neurons = Vec::new();
        let mut heads = Vec::new();
        let mut kv_groups = Vec::new();
        let mut hidden = vec![0f64; c.hidden_size];
        for l in 0..c.num_hidden_layers {
            neurons.push(
                stats
                    .get(l, StatKind::MlpIntermediate)?
                    .iter()
                    .map(|a| a.sqrt())
                    .collect(),
            );
            let ctx = stats.get(l, StatKind::AttnContext)?;
            let per_head: Vec<f32> = ctx
                .chunks(c.head_dim)
                .map(|h| {
                    h.iter()
                        .map(|a| a.sqrt() as f64)
                        .map(|x| x * x)
                        .sum::<f64>()
                        .sqrt() as f32
                })
                .collect();
            let per_group = c.num_attention_heads / c.num_key_value_heads;
            kv_groups.push(per_head.chunks(per_group).map(|g| g.iter().sum()).collect());
            heads.push(per_head);
            for kind in [StatKind::AttnNorm, StatKind::MlpNorm] {
                for (h, a) in hidden.iter_mut().zip(stats.get(l, kind)?) {
                    *h += a.sqrt() as f64;
                }
            }
        }
        Ok(ImportanceScores {
            config: c.clone(),
            neurons,
            heads,
            kv_groups,
            hidden: hidden.into_iter().map(|x| x as f32).collect(),
            layers: stats.block_distance.iter().map(|&x| x as f32).collect(),
        })
    }

    pub fn write(&self, dir: &Path) -> Result<(), OpError> {
        let mut v = BTreeMap::new();
        for l in 0..self.neurons.len() {
            v.insert(format!("neurons.{l}"), self.neurons[l].clone());
            v.insert(format!("heads.{l}"), self.heads[l].clone());
            v.insert(format!("kv_groups.{l}"), self.kv_groups[l].clone());
        }
        v.insert("hidden".into(), self.hidden.clone());
        v.insert("layers".into(), self.layers.clone());
        write_vectors(&dir.join(SCORES_FILE), &v)?;
        let p = dir.join(SCORES_META);
        std::fs::write(
            &p,
            serde_json::to_string_pretty(&serde_json::json!({"config": self.config.to_json()}))
                .unwrap(),
        )
        .map_err(|e| OpError::io(&p, "write", e))?;
        let p = dir.join("summary.txt");
        std::fs::write(&p, self.summary()).map_err(|e| OpError::io(&p, "write", e))?;
        let p = dir.join("layers.svg");
        std::fs::write(
            &p,
            bar_chart_svg("block importance per layer", &self.layers),
        )
        .map_err(|e| OpError::io(&p, "write", e))?;
        let p = dir.join("neurons.svg");
        std::fs::write(
            &p,
            heatmap_svg(
                "neuron importance (rows: layers, columns: neurons by rank)",
                &self.neurons,
            ),
        )
        .map_err(|e| OpError::io(&p, "write", e))
    }

    pub fn read(dir: &Path) -> Result<ImportanceScores, OpError> {
        let p = dir.join(SCORES_META);
        let text = std::fs::read_to_string(&p).map_err(|e| OpError::io(&p, "read", e))?;
        let meta: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| OpError::Invalid(format!("{}: {e}", p.display())))?;
        let config =
            ModelConfig::from_json_str(&meta["config"].to_string()).map_err(OpError::Invalid)?;
        let mut v = read_vectors(&dir.join(SCORES_FILE))?;
        let mut take = |k: String| {
            v.remove(&k)
                .ok_or_else(|| OpError::Invalid(format!("scores lack `{k}`")))
        };
        let n = config.num_hidden_layers;
        Ok(ImportanceScores {
            neurons: (0..n)
                .map(|l| take(format!("neurons.{l}")))
                .collect::<Result<_, _>>()?,
            heads: (0..n)
                .map(|l| take(format!("heads.{l}")))
                .collect::<Result<_, _>>()?,
            kv_groups: (0..n)
                .map(|l| take(format!("kv_groups.{l}")))
                .collect::<Result<_, _>>()?,
            hidden: take("hidden".into())?,
            layers: take("layers".into())?,
            config,
        })
    }

    /// Most and least important per axis, for people.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let top = |v: &[f32], k: usize, most: bool| -> String {
            let mut idx: Vec<usize> = (0..v.len()).collect();
            idx.sort_by(|&a, &b| {
                if most {
                    v[b].total_cmp(&v[a])
                } else {
                    v[a].total_cmp(&v[b])
                }
            });
            idx.iter()
                .take(k)
                .map(|&i| format!("{i} ({:.3})", v[i]))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "layers (block importance): most {}; least {}",
            top(&self.layers, 5, true),
            top(&self.layers, 5, false)
        );
        let _ = writeln!(
            out,
            "hidden channels: most {}; least {}",
            top(&self.hidden, 5, true),
            top(&self.hidden, 5, false)
        );
        for l in 0..self.neurons.len() {
            let _ = writeln!(
                out,
                "layer {l:>3}: heads most {} least {}; neurons mean {:.4}",
                top(&self.heads[l], 2, true),
                top(&self.heads[l], 2, false),
                self.neurons[l].iter().sum::<f32>() / self.neurons[l].len().max(1) as f32
            );
        }
        out
    }
}

pub(crate) fn bar_chart_svg(title: &str, values: &[f32]) -> String {
    let (w, h, pad) = (640.0, 240.0, 30.0);
    let max = values.iter().cloned().fold(f32::MIN, f32::max).max(1e-12);
    let bw = (w - 2.0 * pad) / values.len().max(1) as f32;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\"><rect width=\"100%\" height=\"100%\" fill=\"white\"/><text x=\"{pad}\" y=\"18\" font-family=\"sans-serif\" font-size=\"13\">{title}</text>"
    );
    for (i, v) in values.iter().enumerate() {
        let bh = (h - 2.0 * pad) * (v / max).max(0.0);
        let _ = write!(
            s,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#4878a8\"><title>layer {i}: {v:.4}</title></rect>",
            pad + i as f32 * bw + 1.0,
            h - pad - bh,
            (bw - 2.0).max(1.0),
            bh
        );
    }
    s.push_str("</svg>\n");
    s
}

fn heatmap_svg(title: &str, rows: &[Vec<f32>]) -> String {
    let cols = 128usize;
    let (cw, ch, top) = (4.0, 8.0, 24.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\"><rect width=\"100%\" height=\"100%\" fill=\"white\"/><text x=\"4\" y=\"16\" font-family=\"sans-serif\" font-size=\"12\">{title}</text>",
        cols as f32 * cw + 8.0,
        rows.len() as f32 * ch + top + 4.0
    );
    let max = rows
        .iter()
        .flatten()
        .cloned()
        .fold(f32::MIN, f32::max)
        .max(1e-12);
    for (r, row) in rows.iter().enumerate() {
        let mut sorted = row.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        // Bucket the ranked neurons into `cols` cells.
        for c in 0..cols {
            let lo = c * sorted.len() / cols;
            let hi = ((c + 1) * sorted.len() / cols)
                .max(lo + 1)
                .min(sorted.len());
            if lo >= sorted.len() {
                break;
            }
            let v = sorted[lo..hi].iter().sum::<f32>() / (hi - lo) as f32 / max;
            let shade = (255.0 * (1.0 - v.clamp(0.0, 1.0))) as u8;
            let _ = write!(
                s,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{cw}\" height=\"{ch}\" fill=\"rgb({shade},{shade},255)\"/>",
                4.0 + c as f32 * cw,
                top + r as f32 * ch
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

pub struct Score;

impl Op for Score {
    fn signature(&self) -> OpSignature {
        OpSignature {
            name: "score",
            version: 1,
            doc: "importance of neurons, heads, KV groups, hidden channels and layers from calibration stats",
            inputs: vec![Port::new(
                "stats",
                ArtifactKind::Stats,
                "from a calibrate step",
            )],
            output: ArtifactKind::Scores,
            params: vec![],
        }
    }

    fn estimate(
        &self,
        _: &crate::op::Params,
        _: &BTreeMap<String, crate::op::Estimate>,
    ) -> Option<crate::op::Estimate> {
        Some(crate::op::Estimate {
            basis: "a few vector operations per layer".into(),
            ..Default::default()
        })
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        let stats = Stats::read(&ctx.input("stats")?.path)?;
        ImportanceScores::from_stats(&stats)?.write(&ctx.out_dir)
    }

    fn summarize(&self, out_dir: &Path) -> Option<String> {
        std::fs::read_to_string(out_dir.join("summary.txt")).ok()
    }
}
