//! `plan --estimate`: each step's output shape, parameters, FLOPs, resident memory and GPU-hours,
//! from configs alone (no weights, no hashing), and whether the one device a step runs on can hold
//! it.

use std::collections::BTreeMap;

use distillery_ops::{Artifact, Estimate, OpRegistry};

use crate::graph::StepGraph;
use crate::plan::expand_path;
use crate::recipe::{Recipe, Ref, SourceSpec};

/// A GPU model: dense bf16 peak and memory.
#[derive(Clone, Copy, Debug)]
pub struct Gpu {
    pub name: &'static str,
    pub bf16_flops: f64,
    pub memory_bytes: f64,
}

pub const GPUS: [Gpu; 3] = [
    Gpu {
        name: "h100",
        bf16_flops: 989e12,
        memory_bytes: 80e9,
    },
    Gpu {
        name: "h200",
        bf16_flops: 989e12,
        memory_bytes: 141e9,
    },
    Gpu {
        name: "a100",
        bf16_flops: 312e12,
        memory_bytes: 80e9,
    },
];

pub fn gpu(name: &str) -> Option<Gpu> {
    GPUS.iter()
        .copied()
        .find(|g| g.name.eq_ignore_ascii_case(name))
}

pub struct StepEstimate {
    pub step: String,
    pub op: String,
    pub estimate: Option<Estimate>,
    /// GPUs declared for the step (resources.gpus), if any: said when the step cannot use them.
    pub gpus: Option<usize>,
    /// Data-parallel ranks (resources.tasks), one device each.
    pub tasks: usize,
}

pub fn estimate(recipe: &Recipe, graph: &StepGraph, registry: &OpRegistry) -> Vec<StepEstimate> {
    let base = recipe.dir();
    let sources: Vec<Option<Estimate>> = recipe
        .sources
        .iter()
        .map(|s| match &s.spec {
            SourceSpec::Model { path, .. } => {
                let p = expand_path(path, &base).ok()?;
                registry.describe_source(&Artifact::dir(s.kind, p))
            }
            SourceSpec::Dataset { .. } => Some(Estimate::default()),
        })
        .collect();
    let mut outputs: Vec<Option<Estimate>> = vec![None; recipe.steps.len()];
    let mut out = Vec::new();
    for &i in &graph.order {
        let step = &recipe.steps[i];
        let mut inputs = BTreeMap::new();
        for input in &step.inputs {
            let e = match input.target {
                Ref::Source(j) => sources[j].clone(),
                Ref::Step(j) => outputs[j].clone(),
            };
            if let Some(e) = e {
                inputs.insert(input.port.clone(), e);
            }
        }
        let op = registry.get(&step.op).expect("validated op");
        let e = op.estimate(&step.params, &inputs).or_else(|| {
            // Ops that do not transform a model pass its shape through for their dependents.
            (op.signature().output == distillery_ops::ArtifactKind::Model)
                .then(|| inputs.values().find(|e| e.config.is_some()).cloned())
                .flatten()
        });
        outputs[i] = e.clone();
        out.push(StepEstimate {
            step: step.name.clone(),
            op: step.op.clone(),
            estimate: e,
            gpus: step.resources.gpus,
            tasks: step.resources.tasks.unwrap_or(1),
        });
    }
    out
}

fn si(x: f64) -> String {
    let units = [
        (1e18, "E"),
        (1e15, "P"),
        (1e12, "T"),
        (1e9, "G"),
        (1e6, "M"),
        (1e3, "K"),
    ];
    for (scale, u) in units {
        if x >= scale {
            return format!("{:.2}{u}", x / scale);
        }
    }
    format!("{x:.0}")
}

/// The estimate as a table, with GPU-hours at `mfu` on `gpu` and a fit check per step.
pub fn render(recipe: &Recipe, rows: &[StepEstimate], gpu: Gpu, mfu: f64) -> String {
    let mut out = format!(
        "estimate for `{}` on {} (bf16 peak {:.0} TFLOP/s, {:.0} GB) at {:.0}% MFU\n",
        recipe.name,
        gpu.name.to_uppercase(),
        gpu.bf16_flops / 1e12,
        gpu.memory_bytes / 1e9,
        mfu * 100.0
    );
    out.push_str(&format!(
        "  {:<16} {:<10} {:<40} {:>9} {:>10} {:>10} {:>10}\n",
        "step", "op", "output shape", "params", "FLOPs", "memory", "GPU-hours"
    ));
    let mut total_hours = 0.0;
    let mut notes = Vec::new();
    for r in rows {
        let Some(e) = &r.estimate else {
            out.push_str(&format!(
                "  {:<16} {:<10} (no estimate: inputs unknown)\n",
                r.step, r.op
            ));
            continue;
        };
        let shape = e
            .config
            .as_ref()
            .map(|c| {
                format!(
                    "L{} h{} ffn{} {}h/{}kv d{}",
                    c["num_hidden_layers"],
                    c["hidden_size"],
                    c["intermediate_size"],
                    c["num_attention_heads"],
                    c["num_key_value_heads"],
                    c["head_dim"]
                )
            })
            .unwrap_or_else(|| "-".into());
        let hours = e.flops / (gpu.bf16_flops * mfu) / 3600.0;
        total_hours += hours;
        out.push_str(&format!(
            "  {:<16} {:<10} {:<40} {:>9} {:>10} {:>9}B {:>10.1}\n",
            r.step,
            r.op,
            shape,
            e.parameters
                .map(|p| si(p as f64))
                .unwrap_or_else(|| "-".into()),
            if e.flops > 0.0 {
                si(e.flops)
            } else {
                "-".into()
            },
            si(e.memory_bytes),
            hours
        ));
        if e.memory_bytes > 0.0 {
            // A rank holds everything but its 1/W share of the optimizer state; GPUs beyond the
            // ranks idle, and the ranks share the GPU-hours.
            let w = r.tasks.max(1) as f64;
            let per_device = e.memory_bytes - e.optimizer_state_bytes * (1.0 - 1.0 / w);
            let fits = per_device <= gpu.memory_bytes;
            let idle = match r.gpus {
                Some(n) if n > r.tasks => format!(
                    "; it declares resources.gpus = {n}, but runs {} process(es), each on one device, so {} would idle (resources.tasks = {n} runs it data-parallel)",
                    r.tasks,
                    n - r.tasks
                ),
                _ => String::new(),
            };
            let on = if r.tasks > 1 {
                format!(
                    "each of {} {}s (optimizer state sharded {}-way)",
                    r.tasks,
                    gpu.name.to_uppercase(),
                    r.tasks
                )
            } else {
                format!("one {}", gpu.name.to_uppercase())
            };
            let wall = hours / w;
            let activations = if e.activation_bytes > 0.0 {
                format!(", {}B of it activations", si(e.activation_bytes))
            } else {
                String::new()
            };
            if fits {
                notes.push(format!(
                    "  step `{}` fits on {on} ({}B per device{}): about {:.1} hours wall-clock ({:.1} days){idle}",
                    r.step,
                    si(per_device),
                    activations,
                    wall,
                    wall / 24.0
                ));
            } else {
                notes.push(format!(
                    "  ! step `{}` does not fit: {}B per device on {on} (> {:.0} GB{}); more data-parallel ranks (resources.tasks) shard only the optimizer state ({}B){}{idle}",
                    r.step,
                    si(per_device),
                    gpu.memory_bytes / 1e9,
                    activations,
                    si(e.optimizer_state_bytes),
                    if e.shrink_memory.is_empty() {
                        String::new()
                    } else {
                        format!("; {}", e.shrink_memory)
                    },
                ));
            }
        }
    }
    out.push_str(&format!("  total: {total_hours:.0} GPU-hours\n"));
    for n in notes {
        out.push_str(&n);
        out.push('\n');
    }
    out.push_str("  (training memory: per parameter 4 + 4 bytes of weights and grads, 2 + 2 with main_params_dtype = \"bfloat16\", and 8 bytes of Adam moments, 4 with moments_dtype = \"bfloat16\"; frozen models 2 bytes/param with compute = \"bfloat16\", else 4, none with cached teacher logits; activations at the recipe's micro_batch and seq_len, with recompute and loss_chunk as set)\n");
    out
}
