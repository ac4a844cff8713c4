//! The whole method on a tiny model through the binary: tokenize, correct, calibrate, score,
//! prune, distill, evaluate, compare. Then the demo's rerun scenario: a changed distillation LR
//! reruns only distillation and what depends on it, and `plan` says why.

mod common;

use common::{Env, stderr, text};

fn setup(env: &Env) {
    common::tiny_model_and_text(env);
    env.write(
        "data/val.txt",
        "A held-out line about a lazy fox and a quick dog.\nAnother one, 42 times.\n",
    );
    env.write(
        "tasks/mc.jsonl",
        "{\"context\": \"The quick brown\", \"choices\": [\" fox\", \" zebra\"], \"gold\": 0}\n{\"context\": \"over the lazy\", \"choices\": [\" cat\", \" dog\"], \"gold\": 1}\n",
    );
}

const RECIPE: &str = r#"
[recipe]
name = "tiny-minitron"
seed = 5

[sources.teacher]
kind = "model"
path = "model"

[sources.text]
kind = "dataset"
files = "data/train.txt"

[sources.heldout]
kind = "dataset"
files = "data/val.txt"

[sources.tasks]
kind = "dataset"
files = "tasks/*.jsonl"

[steps.tokens]
op = "tokenize"
inputs = { model = "sources.teacher", data = "sources.text" }

[steps.corrected]
op = "train"
inputs = { model = "sources.teacher", data = "steps.tokens" }
params = { tokens = 256, seq_len = 32, micro_batch = 2, global_batch = 4, warmup_steps = 1, val_sequences = 2 }

[steps.stats]
op = "calibrate"
inputs = { model = "steps.corrected", data = "steps.tokens" }
params = { samples = 8, seq_len = 32, batch = 4 }

[steps.scores]
op = "score"
inputs = { stats = "steps.stats" }

[steps.pruned]
op = "prune"
inputs = { model = "steps.corrected", scores = "steps.scores" }
params = { hidden_size = 48, intermediate_size = 64, num_attention_heads = 2 }

[steps.search]
op = "search"
inputs = { model = "steps.corrected", scores = "steps.scores", data = "steps.tokens" }
params = { parameter_budget = "60K", hidden_step = 16, ffn_step = 32, layer_step = 1, max_depth_reduction = 0.5, top_k = 4, samples = 2, seq_len = 32 }

[steps.searched]
op = "prune"
inputs = { model = "steps.corrected", scores = "steps.scores", target = "steps.search" }

[steps.distilled]
op = "distill"
inputs = { student = "steps.pruned", teacher = "steps.corrected", data = "steps.tokens" }
params = { tokens = 512, seq_len = 32, micro_batch = 2, global_batch = 4, lr = 1e-3, warmup_steps = 1, val_sequences = 2 }

[steps.eval_pruned]
op = "evaluate"
inputs = { model = "steps.pruned", data = "sources.heldout", tasks = "sources.tasks" }
params = { window = 32 }

[steps.eval_distilled]
op = "evaluate"
inputs = { model = "steps.distilled", data = "sources.heldout", tasks = "sources.tasks" }
params = { window = 32 }

[steps.table]
op = "compare"
inputs = { r1 = "steps.eval_pruned", r2 = "steps.eval_distilled" }
params = { labels = ["pruned", "distilled"] }
"#;

#[test]
fn the_method_end_to_end_and_a_changed_lr_reruns_only_what_follows() {
    let env = Env::new();
    setup(&env);
    env.write("r.toml", RECIPE);
    let out = env.run(&["run", "r.toml"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(common::entries(&env.cache()), 11);

    let table = text(&env.ok(&["show", "r.toml", "table"]));
    assert!(
        table.contains("pruned") && table.contains("distilled") && table.contains("token ppl"),
        "{table}"
    );
    let pruned = text(&env.ok(&["show", "r.toml", "pruned"]));
    assert!(
        pruned.contains("hidden 48, ffn 64, 2 heads / 2 kv, head_dim 24"),
        "{pruned}"
    );
    let search = text(&env.ok(&["show", "r.toml", "search"]));
    assert!(search.contains("the 4 largest scored"), "{search}");
    let searched: serde_json::Value =
        serde_json::from_slice(&env.ok(&["show", "r.toml", "searched", "--json"]).stdout).unwrap();
    let winner: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(searched["path"].as_str().unwrap()).join("prune_plan.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert!(
        winner["parameters_after"].as_u64().unwrap() <= 60_000,
        "{winner}"
    );
    let report: serde_json::Value = serde_json::from_slice(
        &env.ok(&["show", "r.toml", "eval_distilled", "--json"])
            .stdout,
    )
    .unwrap();
    assert_eq!(report["manifest"]["op"], "evaluate");

    // The exported model is a Hugging Face checkpoint with provenance.
    env.ok(&["export", "r.toml", "distilled", "--to", "exported"]);
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "distillery.json",
        "README.md",
    ] {
        assert!(env.path("exported").join(f).is_file(), "missing {f}");
    }
    let prov: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(env.path("exported/distillery.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(prov["step"], "distilled");
    assert_eq!(prov["recipe"], "tiny-minitron");

    // Change the distillation LR: plan names the param; only distilled, its eval and the table run.
    env.executions();
    let plan = text(&env.ok(&["plan", "r.toml", "--set", "steps.distilled.params.lr=2e-3"]));
    assert!(
        plan.contains("param `distilled.lr` changed 1e-3 → 2e-3"),
        "{plan}"
    );
    assert!(plan.contains("3 to run"), "{plan}");
    let out = env.run(&[
        "run",
        "r.toml",
        "--set",
        "steps.distilled.params.lr=2e-3",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ran: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "step_finished" && e["outcome"] == "ran")
        .map(|e| e["step"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ran, ["distilled", "eval_distilled", "table"]);
}

#[test]
fn depth_scan_ranks_removals_and_its_winner_drives_prune() {
    let env = Env::new();
    common::tiny_model_and_text(&env);
    // A three-layer model (sharded bf16), so that a block of two leaves one layer.
    let src = common::golden("llama3-untied-bf16-sharded");
    let model = env.path("deep");
    std::fs::create_dir_all(&model).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
    }
    std::fs::copy(
        common::golden("char-tokenizer.json"),
        model.join("tokenizer.json"),
    )
    .unwrap();
    env.write(
        "r.toml",
        r#"
[recipe]
name = "scan"

[sources.teacher]
kind = "model"
path = "deep"

[sources.text]
kind = "dataset"
files = "data/train.txt"

[steps.scan]
op = "depth_scan"
inputs = { model = "sources.teacher", data = "sources.text" }
params = { block_length = 2, samples = 2, seq_len = 32 }

[steps.shallow]
op = "prune"
inputs = { model = "sources.teacher", target = "steps.scan" }
"#,
    );
    let out = env.run(&["run", "r.toml"]);
    assert!(out.status.success(), "{}", text(&out));
    let shown: serde_json::Value =
        serde_json::from_slice(&env.ok(&["show", "r.toml", "scan", "--json"]).stdout).unwrap();
    let dir = std::path::PathBuf::from(shown["path"].as_str().unwrap());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("depth_scan.json")).unwrap())
            .unwrap();
    assert_eq!(report["layers"].as_array().unwrap().len(), 3, "{report}");
    let blocks = report["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 2, "{report}");
    let best = blocks
        .iter()
        .map(|b| b["val_loss"].as_f64().unwrap())
        .fold(f64::MAX, f64::min);
    assert_eq!(report["winner"]["val_loss"].as_f64().unwrap(), best);
    let baseline = report["baseline_val_loss"].as_f64().unwrap();
    assert!(baseline.is_finite() && baseline > 0.0, "{report}");
    for b in blocks {
        assert!(
            (b["delta"].as_f64().unwrap() - (b["val_loss"].as_f64().unwrap() - baseline)).abs()
                < 1e-9
        );
    }
    assert!(dir.join("depth_scan.svg").is_file());

    let shallow = text(&env.ok(&["show", "r.toml", "shallow"]));
    assert!(shallow.contains(": 1 layers, hidden 48"), "{shallow}");
    // The kept layer is the one the winning block leaves; channels stay in their order.
    let pruned: serde_json::Value =
        serde_json::from_slice(&env.ok(&["show", "r.toml", "shallow", "--json"]).stdout).unwrap();
    let plan: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(pruned["path"].as_str().unwrap()).join("prune_plan.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let dropped: Vec<u64> = report["winner"]["drop_layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    let kept: Vec<u64> = (0..3).filter(|l| !dropped.contains(l)).collect();
    assert_eq!(plan["plan"]["layers"], serde_json::json!(kept), "{plan}");
    assert_eq!(
        plan["plan"]["hidden"],
        serde_json::json!((0..48).collect::<Vec<u64>>())
    );
    let scan_text = text(&env.ok(&["show", "r.toml", "scan"]));
    assert!(
        scan_text.contains("blocks of 2 layers removed"),
        "{scan_text}"
    );
}

#[test]
fn a_shape_transformers_5_will_not_load_is_a_warning_or_with_strict_shapes_an_error() {
    let env = Env::new();
    common::tiny_model_and_text(&env);
    // 4 heads: hidden 42 is not a multiple of them (the model has hidden 64, head_dim 24).
    let recipe = |strict: bool| {
        format!(
            "[sources.teacher]\nkind = \"model\"\npath = \"model\"\n\n[steps.pruned]\nop = \"prune\"\ninputs = {{ model = \"sources.teacher\" }}\nparams = {{ method = \"magnitude\", hidden_size = 42, strict_shapes = {strict} }}\n"
        )
    };
    env.write("r.toml", &recipe(false));
    let out = env.ok(&["plan", "r.toml"]);
    let err = stderr(&out);
    assert!(
        err.contains(
            "warning: step `pruned`: hidden_size 42 is not a multiple of num_attention_heads 4"
        ) && err.contains("nearest loadable hidden_size is 40 or 44"),
        "{err}"
    );
    env.write("r.toml", &recipe(true));
    let out = env.run(&["plan", "r.toml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("error: step `pruned`: hidden_size 42"),
        "{}",
        stderr(&out)
    );
}

/// `init` from a directory holding only config.json (Gemma 2's family: norms as `1 + w`, so they
/// start at 0): the first layers with matrices drawn at the config's initializer_range, norms at
/// the identity, the byte-level tokenizer, the same bytes for the same seed and other bytes for
/// another; every op reads it (here evaluate and a training step).
#[test]
fn init_writes_a_random_model_of_a_config_alone() {
    let env = Env::new();
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::golden("family-gemma2/config.json")).unwrap(),
    )
    .unwrap();
    config["vocab_size"] = 300.into();
    config["initializer_range"] = 0.05.into();
    env.write("config/config.json", &config.to_string());
    let lines: String = (0..200)
        .map(|i| {
            format!(
                "Line {i}: a random model reads bytes, {} of them.\n",
                i * 7 % 13
            )
        })
        .collect();
    env.write("data/train.txt", &lines);
    env.write(
        "r.toml",
        r#"
[recipe]
seed = 11

[sources.config]
kind = "model"
path = "config"

[sources.text]
kind = "dataset"
files = "data/train.txt"

[steps.model]
op = "init"
inputs = { model = "sources.config" }
params = { num_layers = 2, dtype = "float32" }

[steps.eval]
op = "evaluate"
inputs = { model = "steps.model", data = "sources.text" }
params = { window = 64, max_tokens = 512 }

[steps.tuned]
op = "train"
inputs = { model = "steps.model", data = "sources.text" }
params = { tokens = 512, seq_len = 32, micro_batch = 2, global_batch = 4, val_sequences = 2, main_params_dtype = "bfloat16" }
"#,
    );
    env.ok(&["run", "r.toml"]);
    let dir = std::path::PathBuf::from(
        common::show_json(&env, &env.cache(), "model")["path"]
            .as_str()
            .unwrap(),
    );
    let m = distillery_ops::model::checkpoint::load_model(&dir).unwrap();
    assert_eq!(m.config.num_hidden_layers, 2);
    assert_eq!(m.config.vocab_size, 300);
    let (_, q) = m
        .weights
        .f32("model.layers.1.self_attn.q_proj.weight")
        .unwrap();
    let std = (q.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / q.len() as f64).sqrt();
    assert!((std - 0.05).abs() < 0.005, "q_proj std {std}");
    let (_, norm) = m
        .weights
        .f32("model.layers.0.input_layernorm.weight")
        .unwrap();
    assert!(
        norm.iter().all(|&w| w == 0.0),
        "Gemma's 1 + w norms start at w = 0"
    );
    let ids = distillery_ops::runtime::tokenizer(&m)
        .unwrap()
        .encode("Hé")
        .unwrap();
    assert_eq!(ids, [72, 0xC3, 0xA9]);
    let report = common::show_json(&env, &env.cache(), "eval");
    let dir = std::path::PathBuf::from(report["path"].as_str().unwrap());
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    // Near-uniform predictions over 300 tokens from small random weights.
    let ppl = r["perplexity"]["token_perplexity"].as_f64().unwrap();
    assert!((100.0..1000.0).contains(&ppl), "token perplexity {ppl}");
    // The seed draws the weights.
    let seed = |s: &str| format!("recipe.seed={s}");
    let (a, b, c) = (env.path("a"), env.path("b"), env.path("c"));
    let hash = |cache: &std::path::Path, s: &str| {
        let out = env
            .command(&["run", "r.toml", "--until", "model", "--set", &seed(s)])
            .env("DISTILLERY_CACHE", cache)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let out = env
            .command(&["show", "r.toml", "model", "--json", "--set", &seed(s)])
            .env("DISTILLERY_CACHE", cache)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        shown["manifest"]["files"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["path"] == "model.safetensors")
            .unwrap()["blake3"]
            .clone()
    };
    let (a, b, c) = (hash(&a, "11"), hash(&b, "11"), hash(&c, "12"));
    assert_eq!(a, b);
    assert_ne!(a, c);
}
