//! Minitron on tiny models: importance against an independent implementation (transformers hooks),
//! identity pruning, real pruning loading back, and the published shapes from config alone.

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::Tensor;
use distillery_ops::calibrate::calibrate_sequences;
use distillery_ops::model::checkpoint::{SaveOptions, load_model};
use distillery_ops::model::config::ModelConfig;
use distillery_ops::model::decoder::{Decoder, tokens_tensor};
use distillery_ops::model::weights::{DType, bytes_to_f32};
use distillery_ops::prune::{PrunePlan, PruneTarget, prune_tensor};
use distillery_ops::score::ImportanceScores;

type B = Flex;

fn golden_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/golden")
        .join(name)
}

fn input_ids(dir: &Path) -> Vec<u32> {
    let bytes = std::fs::read(dir.join("golden.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor("input_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect()
}

fn scores_of(dir: &Path) -> ImportanceScores {
    let m = load_model(dir).unwrap();
    let decoder = Decoder::<B>::load(&m.config, &m.weights, &Default::default()).unwrap();
    let ids = input_ids(dir);
    let seqs: Vec<Vec<u32>> = ids.chunks(ids.len() / 2).map(<[u32]>::to_vec).collect();
    let stats = calibrate_sequences(&decoder, &m.config, &seqs, 2, &mut |_| {});
    ImportanceScores::from_stats(&stats).unwrap()
}

#[test]
fn importance_matches_an_independent_implementation() {
    let dir = golden_dir("llama-gqa-tied-f32");
    let scores = scores_of(&dir);
    let bytes = std::fs::read(dir.join("importance.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let check = |name: &str, got: &[f32]| {
        let want = bytes_to_f32(DType::F32, st.tensor(name).unwrap().data());
        assert_eq!(got.len(), want.len(), "{name}");
        for (g, w) in got.iter().zip(&want) {
            let rel = (g - w).abs() / w.abs().max(1e-6);
            assert!(rel <= 1e-5, "{name}: {g} vs {w} (relative error {rel:.2e})");
        }
    };
    for l in 0..2 {
        check(&format!("neurons.{l}"), &scores.neurons[l]);
        check(&format!("heads.{l}"), &scores.heads[l]);
        check(&format!("kv_groups.{l}"), &scores.kv_groups[l]);
    }
    check("hidden", &scores.hidden);
    check("layers", &scores.layers);
}

fn prune_and_load(
    dir: &Path,
    scores: &ImportanceScores,
    target: &PruneTarget,
    importance_order: bool,
) -> (ModelConfig, tempfile::TempDir) {
    let m = load_model(dir).unwrap();
    let plan = PrunePlan::new(scores, target, importance_order);
    let new = target.apply_to(&m.config);
    let out = tempfile::tempdir().unwrap();
    let provenance = serde_json::json!({});
    let opts = SaveOptions {
        dtype: DType::F32,
        shard_bytes: u64::MAX,
        tokenizer_json: None,
        tokenizer_files: &[],
        generation_config: None,
        tokenizer_config: None,
        provenance: &provenance,
    };
    distillery_ops::model::save_checkpoint(out.path(), &new, &opts, |n| {
        Ok(prune_tensor(&m.weights, &m.config, &plan, n).unwrap())
    })
    .unwrap();
    (new, out)
}

fn logits(dir: &Path, ids: &[u32]) -> Vec<f32> {
    let m = load_model(dir).unwrap();
    let d = Decoder::<B>::load(&m.config, &m.weights, &Default::default()).unwrap();
    let t: Tensor<B, 3> = d.forward(tokens_tensor::<B>(ids, 2, &Default::default()));
    t.into_data().to_vec::<f32>().unwrap()
}

#[test]
fn pruning_to_the_original_sizes_in_importance_order_is_the_identity() {
    for name in [
        "llama-gqa-tied-f32",
        "llama3-untied-bf16-sharded",
        "mistral-window-f16",
    ] {
        let dir = golden_dir(name);
        let scores = scores_of(&dir);
        let ids = input_ids(&dir);
        let a = logits(&dir, &ids);
        let scale = a.iter().fold(1f32, |m, x| m.max(x.abs()));
        // Importance order permutes channels (sums run in another order): equal up to rounding.
        let (new, out) = prune_and_load(&dir, &scores, &PruneTarget::default(), true);
        assert_eq!(new, load_model(&dir).unwrap().config);
        let b = logits(out.path(), &ids);
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "{name}: identity prune (importance order) max |Δlogit| {diff:.2e}, max |logit| {scale:.1}"
        );
        assert!(
            diff <= 1e-5 * scale,
            "{name}: identity prune changed logits by {diff}"
        );
        // Original order: the same model, bit for bit.
        let (_, out) = prune_and_load(&dir, &scores, &PruneTarget::default(), false);
        assert_eq!(a, logits(out.path(), &ids), "{name}");
    }
}

#[test]
fn pruned_models_load_with_their_new_shapes() {
    let dir = golden_dir("llama-gqa-tied-f32");
    let scores = scores_of(&dir);
    let target = PruneTarget {
        hidden_size: Some(40),
        intermediate_size: Some(64),
        num_attention_heads: Some(2),
        drop_layers: vec![1],
        ..Default::default()
    };
    let (new, out) = prune_and_load(&dir, &scores, &target, false);
    assert_eq!(
        (
            new.hidden_size,
            new.intermediate_size,
            new.num_attention_heads,
            new.num_key_value_heads
        ),
        (40, 64, 2, 2)
    );
    assert_eq!((new.num_hidden_layers, new.head_dim), (1, 24));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["head_dim"], 24);
    let l = logits(out.path(), &input_ids(&dir));
    assert!(l.iter().all(|x| x.is_finite()));
    // KV-group pruning keeps whole groups.
    let target = PruneTarget {
        num_key_value_heads: Some(1),
        ..Default::default()
    };
    let (new, out) = prune_and_load(&dir, &scores, &target, false);
    assert_eq!((new.num_attention_heads, new.num_key_value_heads), (2, 1));
    assert!(
        logits(out.path(), &input_ids(&dir))
            .iter()
            .all(|x| x.is_finite())
    );
}

#[test]
fn impossible_targets_are_refused_with_the_parameter_named() {
    let c = load_model(&golden_dir("llama-gqa-tied-f32"))
        .unwrap()
        .config;
    let problems = |t: PruneTarget| {
        t.problems(&c)
            .into_iter()
            .map(|p| (p.param.unwrap_or_default(), p.message))
            .collect::<Vec<_>>()
    };
    let p = problems(PruneTarget {
        num_attention_heads: Some(3),
        ..Default::default()
    });
    assert_eq!(p[0].0, "num_attention_heads");
    assert!(
        p[0].1.contains("not a multiple of num_key_value_heads 2"),
        "{p:?}"
    );
    let p = problems(PruneTarget {
        hidden_size: Some(65),
        ..Default::default()
    });
    assert!(p[0].1.contains("larger than the model's 64"), "{p:?}");
    let p = problems(PruneTarget {
        drop_layers: vec![0, 1],
        ..Default::default()
    });
    assert!(p[0].1.contains("dropping every layer"), "{p:?}");
    let p = problems(PruneTarget {
        drop_layers: vec![5],
        ..Default::default()
    });
    assert!(p[0].1.contains("layer 5 does not exist"), "{p:?}");
}

fn config(json: &str) -> ModelConfig {
    ModelConfig::from_json_str(json).unwrap()
}

#[test]
fn published_shapes_from_config_alone() {
    let nemo = config(
        r#"{"architectures":["MistralForCausalLM"],"hidden_size":5120,"intermediate_size":14336,"num_hidden_layers":40,
        "num_attention_heads":32,"num_key_value_heads":8,"head_dim":128,"vocab_size":131072,"tie_word_embeddings":false}"#,
    );
    let t = PruneTarget {
        hidden_size: Some(4096),
        intermediate_size: Some(11520),
        ..Default::default()
    };
    assert!(t.problems(&nemo).is_empty());
    let mn8b = t.apply_to(&nemo);
    assert_eq!(
        (
            mn8b.num_hidden_layers,
            mn8b.hidden_size,
            mn8b.intermediate_size,
            mn8b.num_attention_heads,
            mn8b.num_key_value_heads,
            mn8b.head_dim
        ),
        (40, 4096, 11520, 32, 8, 128)
    );
    let (p, _) = mn8b.parameter_count();
    eprintln!("MN-Minitron-8B: {p} parameters");
    assert!((p as f64 / 8.41e9 - 1.0).abs() < 0.005, "{p}");

    let llama = config(
        r#"{"architectures":["LlamaForCausalLM"],"hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,
        "num_attention_heads":32,"num_key_value_heads":8,"vocab_size":128256,"tie_word_embeddings":false,
        "rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#,
    );
    let width = PruneTarget {
        hidden_size: Some(3072),
        intermediate_size: Some(9216),
        ..Default::default()
    }
    .apply_to(&llama);
    let (p, _) = width.parameter_count();
    eprintln!("Llama-3.1-Minitron-4B-Width: {p} parameters");
    assert!((p as f64 / 4.5e9 - 1.0).abs() < 0.005, "{p}");
    let depth = PruneTarget {
        drop_layers: (15..=30).collect(),
        ..Default::default()
    };
    assert!(depth.problems(&llama).is_empty());
    let d = depth.apply_to(&llama);
    assert_eq!(d.num_hidden_layers, 16);
    eprintln!(
        "Llama-3.1-Minitron-4B-Depth: {} parameters",
        d.parameter_count().0
    );
}

#[test]
fn search_grid_respects_budget_and_reductions() {
    let nemo = config(
        r#"{"architectures":["MistralForCausalLM"],"hidden_size":5120,"intermediate_size":14336,"num_hidden_layers":40,
        "num_attention_heads":32,"num_key_value_heads":8,"head_dim":128,"vocab_size":131072,"tie_word_embeddings":false}"#,
    );
    let c = distillery_ops::search::candidates(&nemo, 8_500_000_000, 256, 512, 2, 0.4, 0.2, true);
    assert!(!c.is_empty());
    assert!(c.windows(2).all(|w| w[0].1 >= w[1].1), "largest first");
    for (t, p) in &c {
        assert!(*p <= 8_500_000_000);
        assert_eq!(t.apply_to(&nemo).parameter_count().0, *p);
        assert!(t.hidden_size.unwrap() >= 3072 && t.num_layers.unwrap() >= 32);
        assert_eq!(t.num_attention_heads.unwrap() % 8, 0);
        assert_eq!(
            t.hidden_size.unwrap() % t.num_attention_heads.unwrap(),
            0,
            "loadable"
        );
    }
    let any =
        distillery_ops::search::candidates(&nemo, 8_500_000_000, 256, 512, 2, 0.4, 0.2, false);
    assert!(
        any.len() > c.len(),
        "unloadable shapes are left out by default"
    );
    // Next to MN-Minitron-8B's shape (ffn 11520 is between two 512-steps): hidden 4096, 40 layers.
    assert!(c.iter().any(|(t, _)| t.hidden_size == Some(4096)
        && t.num_layers == Some(40)
        && matches!(t.intermediate_size, Some(11264) | Some(11776))));
}

/// The model families of the architecture table, one golden each (make_goldens_families.py).
const FAMILIES: [&str; 6] = [
    "family-qwen2",
    "family-qwen3",
    "family-gemma2",
    "family-gemma3_text",
    "family-phi3",
    "family-nemotron",
];

/// Width and depth pruning checked against an independent construction in every family: removing
/// MLP neurons, query heads, KV groups (with their heads) and whole layers computes what the
/// original model computes with those units' outputs zeroed (their `down_proj` columns, their
/// `o_proj` columns, or a layer's `o_proj` and `down_proj` with any biases: a pre-norm or sandwich
/// block whose sublayers output zero is the identity). This exercises the table's axes for packed
/// projections (Phi-3), biases (Qwen2), q/k norms (Qwen3, Gemma 3), sandwich norms, LayerNorm1p and
/// partial RoPE without trusting the slicer.
#[test]
fn pruning_equals_zeroing_what_it_removes_in_every_family() {
    use distillery_ops::model::arch::Role;
    use distillery_ops::model::weights::Weights;
    for name in FAMILIES {
        let dir = golden_dir(name);
        let m = load_model(&dir).unwrap();
        let c = &m.config;
        let scores = scores_of(&dir);
        let target = PruneTarget {
            intermediate_size: Some(c.intermediate_size * 2 / 3),
            num_key_value_heads: Some(c.num_key_value_heads - 1),
            drop_layers: vec![1],
            ..Default::default()
        };
        assert!(target.problems(c).is_empty(), "{name}");
        let plan = PrunePlan::new(&scores, &target, false);
        let (new, out) = prune_and_load(&dir, &scores, &target, false);
        assert_eq!(new.num_hidden_layers, c.num_hidden_layers - 1);
        let ids = input_ids(&dir);
        let pruned = logits(out.path(), &ids);

        let mut tensors = std::collections::BTreeMap::new();
        for n in m.weights.names() {
            tensors.insert(n.clone(), m.weights.f32(&n).unwrap());
        }
        let d = c.head_dim;
        for spec in c.tensor_specs() {
            let Some(l) = spec.layer else { continue };
            let kept = plan.layers.iter().position(|&k| k == l);
            let (shape, w) = tensors.get_mut(&spec.name).unwrap();
            let keep_cols: Option<Vec<usize>> = match (spec.role, kept) {
                (Role::O | Role::OBias | Role::Down | Role::DownBias, None) => Some(vec![]),
                (Role::Down, Some(k)) => Some(plan.neurons[k].clone()),
                (Role::O, Some(k)) => Some(
                    plan.heads[k]
                        .iter()
                        .flat_map(|&h| h * d..(h + 1) * d)
                        .collect(),
                ),
                _ => None,
            };
            let Some(keep) = keep_cols else { continue };
            let cols = if shape.len() == 2 { shape[1] } else { 1 };
            for (i, x) in w.iter_mut().enumerate() {
                if shape.len() == 1 || !keep.contains(&(i % cols)) {
                    *x = 0.0;
                }
            }
        }
        let zeroed = Weights::from_memory(dir.clone(), tensors);
        let reference: Vec<f32> = Decoder::<B>::load(c, &zeroed, &Default::default())
            .unwrap()
            .forward(tokens_tensor::<B>(&ids, 2, &Default::default()))
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let scale = reference.iter().fold(1f32, |m, x| m.max(x.abs()));
        let diff = pruned
            .iter()
            .zip(&reference)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        eprintln!("{name}: pruned vs zeroed max |Δlogit| {diff:.2e}");
        assert!(diff <= 1e-5 * scale, "{name}: max |Δlogit| {diff}");
    }
}

/// Pruning to the original sizes keeps every family's checkpoint bit for bit (same order).
#[test]
fn identity_pruning_keeps_every_family_bit_for_bit() {
    for name in FAMILIES {
        let dir = golden_dir(name);
        let m = load_model(&dir).unwrap();
        let scores = scores_of(&dir);
        let plan = PrunePlan::new(&scores, &PruneTarget::default(), false);
        for (n, _) in m.config.tensor_shapes() {
            let got = prune_tensor(&m.weights, &m.config, &plan, &n).unwrap();
            assert!(got == m.weights.f32(&n).unwrap().1, "{name}: {n} changed");
        }
    }
}

/// The by-hand export check of every family, kept in CI (check_families_export.py wrote the
/// target and transformers 5.x's logits of the export): pruning by weight magnitude along every
/// axis (hidden, ffn, a KV group with its heads, a layer), saving and loading gives transformers'
/// logits of the same export.
#[test]
fn pruned_exports_of_every_family_give_transformers_logits() {
    use distillery_ops::prune::baseline_scores;
    for name in FAMILIES {
        let dir = golden_dir(name);
        let t: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("export-target.json")).unwrap())
                .unwrap();
        let n = |k: &str| t[k].as_u64().map(|v| v as usize);
        let target = PruneTarget {
            hidden_size: n("hidden_size"),
            intermediate_size: n("intermediate_size"),
            num_key_value_heads: n("num_key_value_heads"),
            drop_layers: t["drop_layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect(),
            ..Default::default()
        };
        let m = load_model(&dir).unwrap();
        assert!(target.loadability_problems(&m.config).is_empty(), "{name}");
        let scores = baseline_scores(&m.weights, &m.config, "magnitude", 0).unwrap();
        let (_, out) = prune_and_load(&dir, &scores, &target, true);
        let bytes = std::fs::read(dir.join("export-logits.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let ids: Vec<u32> = st
            .tensor("input_ids")
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
            .collect();
        let want = bytes_to_f32(DType::F32, st.tensor("logits").unwrap().data());
        let got = logits(out.path(), &ids);
        let diff = got
            .iter()
            .zip(&want)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        eprintln!("{name}: pruned export vs transformers max |Δlogit| {diff:.2e}");
        assert!(diff <= 1e-4, "{name}: max |Δlogit| {diff}");
    }
}

/// transformers 4.x derives Gemma 2's windows from the layer index (even layers sliding) and
/// ignores `layer_types`: depth pruning must keep the alternation or say that it breaks it.
#[test]
fn gemma2_depth_pruning_keeps_the_sliding_alternation_or_says_so() {
    use distillery_ops::prune::broken_window_alternation;
    let read = |name: &str| {
        ModelConfig::from_json_str(
            &std::fs::read_to_string(golden_dir(name).join("config.json")).unwrap(),
        )
        .unwrap()
    };
    let gemma2 = read("family-gemma2"); // sliding, full, sliding
    let drop = |layers: Vec<usize>| PruneTarget {
        drop_layers: layers,
        ..Default::default()
    };
    let problems = drop(vec![0]).loadability_problems(&gemma2);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].0, "drop_layers");
    assert!(
        problems[0].1.contains("layer 0 is \"full_attention\""),
        "{}",
        problems[0].1
    );
    assert!(drop(vec![2]).loadability_problems(&gemma2).is_empty());
    // Layers chosen by score: a warning at plan time, the check itself once they are known.
    let by_score = PruneTarget {
        num_layers: Some(2),
        ..Default::default()
    };
    assert!(
        by_score.loadability_problems(&gemma2).is_empty(),
        "not a shape problem: search keeps it"
    );
    assert_eq!(by_score.depth_caution(&gemma2).unwrap().0, "num_layers");
    let full_depth = PruneTarget {
        num_layers: Some(3),
        ..Default::default()
    };
    assert!(full_depth.depth_caution(&gemma2).is_none());
    assert!(broken_window_alternation(&gemma2, &gemma2.keep_layers(&[1, 2])).is_some());
    assert!(broken_window_alternation(&gemma2, &gemma2.keep_layers(&[0, 1])).is_none());
    // Gemma 3 reads layer_types in every version: nothing to warn about.
    let gemma3 = read("family-gemma3_text");
    assert!(broken_window_alternation(&gemma3, &gemma3.keep_layers(&[1, 2])).is_none());
    assert!(by_score.depth_caution(&gemma3).is_none());
}

/// Phi-3 rotating part of each head (Phi-4-mini's 0.75) gets a plan-time caution for transformers
/// 4.46, whose Phi3 rotates whole heads; Nemotron's partial rotary is read by 4.46 and needs none.
#[test]
fn partial_rotary_is_cautioned_where_transformers_4_46_ignores_it() {
    use distillery_ops::prune::partial_rotary_caution;
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(golden_dir(name).join("config.json")).unwrap(),
        )
        .unwrap()
    };
    let config = |v: serde_json::Value| ModelConfig::from_json_str(&v.to_string()).unwrap();
    let mut phi3 = read("family-phi3");
    assert!(partial_rotary_caution(&config(phi3.clone())).is_none());
    phi3["rope_parameters"]["partial_rotary_factor"] = 0.75.into();
    let (_, why) = partial_rotary_caution(&config(phi3)).unwrap();
    assert!(why.contains("4.49"), "{why}");
    assert!(partial_rotary_caution(&config(read("family-nemotron"))).is_none());
}
