//! Training through the binary on a tiny model: a run killed with SIGKILL resumes from its scratch
//! checkpoint and ends bit-identical to an uninterrupted run; a blow-up stops cleanly.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Env, stderr, text};

fn setup(env: &Env) {
    common::tiny_model_and_text(env);
}

const RECIPE: &str = r#"
[recipe]
seed = 3

[sources.base]
kind = "model"
path = "model"

[sources.text]
kind = "dataset"
files = "data/train.txt"

[steps.tuned]
op = "train"
inputs = { model = "sources.base", data = "sources.text" }
params = { tokens = 8192, seq_len = 32, micro_batch = 2, global_batch = 4, warmup_steps = 2, lr = 1e-3, checkpoint_every = 1, val_sequences = 4 }
"#;

/// Distillation with the fused KL, a cross-entropy share and an intermediate-state loss, whose
/// learned projection must survive the kill too.
const DISTILL_RECIPE: &str = r#"
[recipe]
seed = 3

[sources.base]
kind = "model"
path = "model"

[sources.text]
kind = "dataset"
files = "data/train.txt"

[steps.tuned]
op = "distill"
inputs = { student = "sources.base", teacher = "sources.base", data = "sources.text" }
params = { tokens = 8192, seq_len = 32, micro_batch = 2, global_batch = 4, warmup_steps = 2, lr = 1e-3, checkpoint_every = 1, val_sequences = 4, ce_weight = 0.5, hidden_pairs = [[0, 1]], hidden_weight = 0.5 }
"#;

/// `show --json` of the step `tuned`.
fn shown(env: &Env, cache: &Path) -> serde_json::Value {
    common::show_json(env, cache, "tuned")
}

/// The blake3 of the written model file, from the step's manifest.
fn model_hash(shown: &serde_json::Value) -> String {
    let files = shown["manifest"]["files"].as_array().unwrap();
    files
        .iter()
        .find(|f| f["path"] == "model.safetensors")
        .unwrap()["blake3"]
        .as_str()
        .unwrap()
        .to_string()
}

fn output_hash(env: &Env, cache: &Path) -> String {
    model_hash(&shown(env, cache))
}

/// `run r.toml` into `cache`, which must succeed.
fn run_into(env: &Env, cache: &Path) {
    let out = env
        .command(&["run", "r.toml"])
        .env("DISTILLERY_CACHE", cache)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn killed_training_resumes_bit_identical() {
    kill_and_resume(RECIPE);
}

#[test]
fn killed_distillation_with_a_learned_projection_resumes_bit_identical() {
    kill_and_resume(DISTILL_RECIPE);
}

fn kill_and_resume(recipe: &str) {
    let env = Env::new();
    setup(&env);
    env.write("r.toml", recipe);
    let clean = env.path("cache-clean");
    run_into(&env, &clean);
    let expected = output_hash(&env, &clean);

    // Kill at a step that depends on the clock: somewhere after the first checkpoint.
    let cache = env.path("cache-killed");
    let mut child = env
        .command(&["run", "r.toml"])
        .env("DISTILLERY_CACHE", &cache)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let kill_after = 1 + (std::process::id() as u64 % 4);
    let t = Instant::now();
    let step = loop {
        let state = std::fs::read_dir(cache.join("scratch")).ok().and_then(|d| {
            d.filter_map(Result::ok)
                .find_map(|e| std::fs::read_to_string(e.path().join("checkpoint/state.json")).ok())
        });
        if let Some(s) = state {
            let v: serde_json::Value = serde_json::from_str(&s).unwrap_or_default();
            let step = v["step"].as_u64().unwrap_or(0);
            if step >= kill_after {
                break step;
            }
        }
        if child.try_wait().unwrap().is_some() {
            panic!("training finished before it could be killed");
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    eprintln!("killed after the checkpoint of step {step}");
    assert_eq!(common::entries(&cache), 0);
    let out = env
        .command(&["run", "r.toml"])
        .env("DISTILLERY_CACHE", &cache)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stderr(&out).contains("resuming from the checkpoint at step"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        output_hash(&env, &cache),
        expected,
        "resumed weights differ from the uninterrupted run"
    );
}

/// bf16 main params and moments with stochastic rounding: the rounding noise is a function of
/// position, so a killed run still resumes to the same bytes.
#[test]
fn killed_bf16_state_training_resumes_bit_identical() {
    kill_and_resume(&RECIPE.replace(
        "checkpoint_every = 1,",
        "checkpoint_every = 1, main_params_dtype = \"bfloat16\", moments_dtype = \"bfloat16\",",
    ));
}

/// The optimizer precision modes side by side on one distillation: bf16 main params (with f32
/// or bf16 moments) reach the f32 run's validation loss within a few percent, the moments take
/// the bytes their dtype says, and a bf16 run is another result than the f32 one.
#[test]
fn bf16_optimizer_state_distills_like_f32_in_less_memory() {
    let env = Env::new();
    setup(&env);
    let run = |main: &str, grads: &str, moments: &str| {
        let recipe = DISTILL_RECIPE.replace(
            "checkpoint_every = 1,",
            &format!(
                "checkpoint_every = 100, main_params_dtype = \"{main}\", main_grads_dtype = \"{grads}\", moments_dtype = \"{moments}\","
            ),
        );
        env.write("r.toml", &recipe);
        let cache = env.path(&format!("{main}-{grads}-{moments}"));
        run_into(&env, &cache);
        trained(&env, &cache)
    };
    let (f32_run, _, f32_hash) = run("float32", "float32", "float32");
    let state = |r: &serde_json::Value| r["optimizer_state_bytes_per_rank"][0].as_u64().unwrap();
    let val = |r: &serde_json::Value| r["final_val_loss"].as_f64().unwrap();
    let mut hashes = vec![f32_hash];
    for (grads, moments) in [
        ("float32", "float32"),
        ("float32", "bfloat16"),
        ("bfloat16", "bfloat16"),
    ] {
        let (run, config, hash) = run("bfloat16", grads, moments);
        assert!(
            !hashes.contains(&hash),
            "{grads} grads, {moments} moments changed nothing"
        );
        hashes.push(hash);
        let (a, b) = (val(&f32_run), val(&run));
        eprintln!(
            "validation loss: f32 state {a:.4}, bf16 main params, {grads} grad sums, {moments} moments {b:.4}"
        );
        assert!(
            (a - b).abs() < 0.05 * a,
            "validation loss f32 {a} vs bf16 {b}"
        );
        let ratio = if moments == "bfloat16" { 2 } else { 1 };
        assert_eq!(state(&run) * ratio, state(&f32_run), "moments' bytes");
        // Written in the source's dtype (float32), bf16 values exactly.
        assert_eq!(config["dtype"], "float32");
    }
    // bf16 sums of f32 gradients are refused where the recipe says so.
    let out = env.run(&[
        "plan",
        "r.toml",
        "--set",
        "steps.tuned.params.main_params_dtype=\"float32\"",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("main_grads_dtype = \"bfloat16\" sums bf16 gradients"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_blow_up_stops_the_step_and_commits_nothing() {
    let env = Env::new();
    setup(&env);
    env.write("r.toml", RECIPE);
    let out = env.run(&[
        "run",
        "r.toml",
        "--set",
        "steps.tuned.params.lr=1e30",
        "--set",
        "steps.tuned.params.clip=0.0",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains("non-finite") && err.contains("at step"),
        "{err}"
    );
    assert!(err.contains("nothing was committed"), "{err}");
    assert_eq!(common::entries(&env.cache()), 0);
}

/// The step's train.json and config.json, and the model file's hash.
fn trained(env: &Env, cache: &Path) -> (serde_json::Value, serde_json::Value, String) {
    let v = shown(env, cache);
    let dir = Path::new(v["path"].as_str().unwrap());
    let read = |f: &str| serde_json::from_str(&std::fs::read_to_string(dir.join(f)).unwrap());
    (
        read("train.json").unwrap(),
        read("config.json").unwrap(),
        model_hash(&v),
    )
}

#[test]
fn bf16_compute_distills_like_f32_with_f32_master_weights() {
    let env = Env::new();
    setup(&env);
    let run = |compute: &str| {
        let recipe = DISTILL_RECIPE.replace(
            "checkpoint_every = 1,",
            &format!("checkpoint_every = 100, compute = \"{compute}\","),
        );
        env.write("r.toml", &recipe);
        let cache = env.path(compute);
        run_into(&env, &cache);
        trained(&env, &cache)
    };
    let (f32_run, _, f32_hash) = run("float32");
    let (bf16_run, bf16_config, bf16_hash) = run("bfloat16");
    assert_ne!(f32_hash, bf16_hash, "bf16 compute changed nothing");
    let (a, b) = (
        f32_run["final_val_loss"].as_f64().unwrap(),
        bf16_run["final_val_loss"].as_f64().unwrap(),
    );
    eprintln!("validation loss: f32 compute {a:.4}, bf16 compute {b:.4}");
    assert!(
        (a - b).abs() < 0.05 * a,
        "validation loss f32 {a} vs bf16 {b}"
    );
    // The written checkpoint holds the f32 master weights (the source's dtype), not bf16 copies.
    assert_eq!(bf16_config["dtype"], "float32");
}

const CHAT_TEMPLATE: &str = "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'Q: ' + m['content'] + '\\n' }}{% else %}{{ 'A: ' }}{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}{{ '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}";

/// Chat data end to end: conversations rendered by the model's chat template, the loss on the
/// assistant's tokens (a character tokenizer: each answer is its characters plus EOS, counted
/// here independently of the template), trained and distilled; a conversation without an answer
/// and a model without a template are refused naming the line and the fix.
#[test]
fn chat_data_trains_on_the_assistants_tokens() {
    let env = Env::new();
    setup(&env);
    env.write(
        "model/tokenizer_config.json",
        &serde_json::json!({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
            "eos_token": "</s>", "chat_template": CHAT_TEMPLATE})
        .to_string(),
    );
    let mut lines = String::new();
    let mut answer_tokens = 0;
    for i in 0..60 {
        let answer = format!("{} plus {} is {}.", i, i % 7, i + i % 7);
        answer_tokens += answer.chars().count() + 1;
        lines.push_str(
            &serde_json::json!({"messages": [
                {"role": "user", "content": format!("what is {} plus {}?", i, i % 7)},
                {"role": "assistant", "content": answer},
            ]})
            .to_string(),
        );
        lines.push('\n');
    }
    env.write("data/chat.jsonl", &lines);
    env.write(
        "r.toml",
        r#"
[recipe]
seed = 3

[sources.base]
kind = "model"
path = "model"

[sources.chat]
kind = "dataset"
files = "data/chat.jsonl"
format = "chat"

[steps.tokens]
op = "tokenize"
inputs = { model = "sources.base", data = "sources.chat" }

[steps.tuned]
op = "train"
inputs = { model = "sources.base", data = "steps.tokens" }
params = { tokens = 2048, seq_len = 32, micro_batch = 2, global_batch = 4, lr = 1e-3, val_sequences = 4 }

[steps.distilled]
op = "distill"
inputs = { student = "steps.tuned", teacher = "sources.base", data = "sources.chat" }
params = { tokens = 2048, seq_len = 32, micro_batch = 2, global_batch = 4, lr = 1e-3, val_sequences = 4, ce_weight = 0.5 }
"#,
    );
    let out = env.ok(&["run", "r.toml"]);
    let log = text(&out);
    assert!(log.contains("the loss counts"), "{log}");
    let shown: serde_json::Value =
        serde_json::from_slice(&env.ok(&["show", "r.toml", "tokens", "--json"]).stdout).unwrap();
    let dir = std::path::PathBuf::from(shown["path"].as_str().unwrap());
    let mask = std::fs::read(dir.join("trained.u8")).unwrap();
    assert_eq!(mask.iter().filter(|&&m| m == 1).count(), answer_tokens);

    // A conversation with no answer; a model with no template.
    env.write(
        "data/bad.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
    );
    let bad = std::fs::read_to_string(env.path("r.toml"))
        .unwrap()
        .replace("data/chat.jsonl", "data/bad.jsonl");
    env.write("bad.toml", &bad);
    let out = env.run(&["run", "bad.toml", "--until", "tokens"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        stderr(&out).contains("bad.jsonl:1") && stderr(&out).contains("no assistant message"),
        "{}",
        stderr(&out)
    );
    env.write(
        "model/tokenizer_config.json",
        r#"{"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}"#,
    );
    let out = env.run(&["run", "r.toml", "--until", "tokens"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(stderr(&out).contains("chat template"), "{}", stderr(&out));
}

/// A tuned teacher, its top-k log-probabilities cached by `teacher_logits`, and the base model
/// distilled from the live teacher and from the cache side by side.
fn cached_teacher_recipe() -> String {
    format!("{}{CACHED_TEACHER_STEPS}", common::TINY_SOURCES)
}

const CACHED_TEACHER_STEPS: &str = r#"
[steps.teacher]
op = "train"
inputs = { model = "sources.base", data = "sources.text" }
params = { tokens = 2048, seq_len = 32, micro_batch = 4, global_batch = 4, lr = 3e-3, val_sequences = 4 }

[steps.cached]
op = "teacher_logits"
inputs = { teacher = "steps.teacher", data = "sources.text" }
params = { top_k = 8, seq_len = 32, batch = 3, loss_chunk = 50 }

[steps.live]
op = "distill"
inputs = { student = "sources.base", teacher = "steps.teacher", data = "sources.text" }
params = { tokens = 4096, seq_len = 32, micro_batch = 2, global_batch = 4, lr = 1e-3, val_sequences = 4, val_every = 4, top_k = 8, temperature = 2.0, ce_weight = 0.3 }

[steps.tuned]
op = "distill"
inputs = { student = "sources.base", teacher_logits = "steps.cached", data = "sources.text" }
params = { tokens = 4096, seq_len = 32, micro_batch = 2, global_batch = 4, lr = 1e-3, val_sequences = 4, val_every = 4, top_k = 8, temperature = 2.0, ce_weight = 0.3 }
"#;

/// Distilling from cached teacher logits follows the live teacher's top-k distillation (same
/// losses to rounding, same weights to rounding); another learning rate reuses the cache; a
/// cache that does not fit the distillation is refused before anything runs.
#[test]
fn cached_teacher_logits_distill_as_the_live_teacher_and_are_reused() {
    let env = Env::new();
    setup(&env);
    env.write("r.toml", &cached_teacher_recipe());
    let cache = env.cache();
    run_into(&env, &cache);
    let step = |name: &str| {
        let v = common::show_json(&env, &cache, name);
        std::path::PathBuf::from(v["path"].as_str().unwrap())
    };
    let losses = |name: &str| -> Vec<f64> {
        std::fs::read_to_string(step(name).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .flat_map(|m| [m["loss"].as_f64(), m["val_loss"].as_f64()])
            .flatten()
            .collect()
    };
    let (live, cached) = (losses("live"), losses("tuned"));
    eprintln!("losses, live teacher: {live:?}\nlosses, cached logits: {cached:?}");
    assert_eq!(live.len(), cached.len());
    assert!(live.len() >= 8, "{live:?}");
    for (a, b) in live.iter().zip(&cached) {
        assert!(
            (a - b).abs() <= 1e-4 * a.abs(),
            "losses {live:?} vs {cached:?}"
        );
    }
    let read = |name: &str| {
        distillery_ops::stats::read_vectors(&step(name).join("model.safetensors")).unwrap()
    };
    let (a, b) = (read("live"), read("tuned"));
    let base =
        distillery_ops::stats::read_vectors(&env.path("model").join("model.safetensors")).unwrap();
    let mut moved = false;
    for (name, x) in &a {
        let y = &b[name];
        let diff: f64 = x.iter().zip(y).map(|(p, q)| ((p - q) as f64).powi(2)).sum();
        let norm: f64 = x.iter().map(|p| (*p as f64).powi(2)).sum();
        assert!(
            (diff / norm.max(1e-30)).sqrt() <= 1e-4,
            "{name}: the cached teacher's student differs"
        );
        moved |= x != &base[name];
    }
    assert!(moved);
    // Another learning rate: only the distillation runs again, from the same cache.
    let plan = env.ok(&[
        "plan",
        "--json",
        "r.toml",
        "--set",
        "steps.tuned.params.lr=5e-4",
    ]);
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    let status = |s: &str| {
        plan["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["step"] == s)
            .unwrap()["status"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(status("cached"), "cached", "{plan}");
    assert_eq!(status("teacher"), "cached", "{plan}");
    assert_ne!(status("tuned"), "cached", "{plan}");
    // A top_k beyond the cache, or another seq_len, is refused when the recipe loads (cache
    // built or not), with the fix.
    let out = env.run(&["plan", "r.toml", "--set", "steps.tuned.params.top_k=9"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("top_k 9 is more than step `cached` caches (8)"),
        "{}",
        text(&out)
    );
    let out = env.run(&["plan", "r.toml", "--set", "steps.tuned.params.seq_len=16"]);
    assert!(
        text(&out).contains("set the same seq_len in both steps"),
        "{}",
        text(&out)
    );
    // Both inputs, or top_k = 0 with a cache, are recipe errors.
    let both = cached_teacher_recipe().replace(
        "teacher_logits = \"steps.cached\",",
        "teacher_logits = \"steps.cached\", teacher = \"steps.teacher\",",
    );
    env.write("both.toml", &both);
    let out = env.run(&["plan", "both.toml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("not both"), "{}", text(&out));
    let out = env.run(&["plan", "r.toml", "--set", "steps.tuned.params.top_k=0"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("set top_k"), "{}", text(&out));
    let out = env.run(&[
        "plan",
        "r.toml",
        "--set",
        "steps.tuned.params.loss=\"reverse_kl\"",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("the reverse KL needs the teacher's whole distribution")
            && !text(&out).contains("set top_k = 0"),
        "{}",
        text(&out)
    );
}
