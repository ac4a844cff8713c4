//! The shipped recipes: they validate, and the published ones plan from config.json alone.

mod common;

use std::path::Path;

use common::{Env, text};

fn recipe(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../recipes")
        .join(name)
        .to_string_lossy()
        .to_string()
}

#[test]
fn published_recipes_estimate_from_configs_alone() {
    let env = Env::new();
    let out = env.ok(&["plan", "--estimate", &recipe("mistral-nemo-12b-to-8b.toml")]);
    let t = text(&out);
    assert!(
        t.contains("L40 h4096 ffn11520 32h/8kv d128") && t.contains("8.41G"),
        "{t}"
    );
    let out = env.ok(&[
        "plan",
        "--estimate",
        &recipe("llama-3.1-8b-to-4b-width.toml"),
        "--gpu",
        "h200",
    ]);
    let t = text(&out);
    assert!(
        t.contains("L32 h3072 ffn9216 32h/8kv d128") && t.contains("4.51G") && t.contains("H200"),
        "{t}"
    );
    let out = env.ok(&[
        "plan",
        "--estimate",
        &recipe("llama-3.1-8b-to-4b-depth.toml"),
    ]);
    let t = text(&out);
    assert!(t.contains("L16 h4096 ffn14336"), "{t}");
    // The Nemotron-4 15B recipes: Minitron-8B and 4B parameter counts from config alone, and
    // Minitron-8B's hidden 4096 over 48 heads is warned about, not refused (NVIDIA's release).
    for (name, shape, params) in [
        (
            "nemotron-4-15b-to-minitron-8b.toml",
            "L32 h4096 ffn16384 48h/8kv d128",
            "8.27G",
        ),
        (
            "nemotron-4-15b-to-minitron-4b.toml",
            "L32 h3072 ffn9216 24h/8kv d128",
            "4.19G",
        ),
        (
            "qwen3-8b-to-6b-width.toml",
            "L36 h3584 ffn9728 32h/8kv d128",
            "6.18G",
        ),
    ] {
        let out = env.ok(&["plan", "--estimate", &recipe(name)]);
        let t = text(&out);
        assert!(t.contains(shape) && t.contains(params), "{name}: {t}");
    }
    // Any existing file stands in for the corpus: plan only keys it.
    let corpus = format!(
        "sources.corpus.files={}",
        common::golden("eval-text.txt").display()
    );
    let out = env.ok(&[
        "plan",
        &recipe("nemotron-4-15b-to-minitron-8b.toml"),
        "--set",
        &corpus,
    ]);
    let t = format!("{}{}", text(&out), common::stderr(&out));
    assert!(
        t.contains("warning") && t.contains("not a multiple of num_attention_heads 48"),
        "{t}"
    );
    // Memory per device: 128 data-parallel ranks shard only the optimizer state (ZeRO-1); the
    // student's bf16 weights and gradients and the bf16 teacher stay on every device.
    let out = env.ok(&["plan", "--estimate", &recipe("mistral-nemo-12b-to-8b.toml")]);
    let t = text(&out);
    assert!(
        t.contains("step `distilled` fits on each of 128 H100s (optimizer state sharded 128-way)"),
        "{t}"
    );
    // With the settings the recipes name, one device is enough: Llama-3.1-8B -> 4B at sequence
    // 8192 on one H100, Mistral-NeMo-12B -> 8B on one H200 (and not on one H100, which the
    // estimate says with what would shrink it).
    let one = [
        "--set",
        "steps.distilled.resources.tasks=1",
        "--set",
        "steps.distilled.resources.nodes=1",
        "--set",
        "steps.distilled.resources.gpus=1",
    ];
    for (name, gpu, fits) in [
        ("llama-3.1-8b-to-4b-width.toml", "h100", true),
        ("mistral-nemo-12b-to-8b.toml", "h200", true),
        ("mistral-nemo-12b-to-8b.toml", "h100", false),
    ] {
        let r = recipe(name);
        let mut args = vec!["plan", "--estimate", &r, "--gpu", gpu];
        args.extend(one);
        let t = text(&env.ok(&args));
        let want = if fits {
            format!("step `distilled` fits on one {}", gpu.to_uppercase())
        } else {
            "step `distilled` does not fit".to_string()
        };
        assert!(t.contains(&want), "{name} on {gpu}: {t}");
        if !fits {
            assert!(t.contains("what shrinks it: a teacher_logits step"), "{t}");
        }
    }
    assert!(!t.contains("would idle"), "{t}");
    // With one task the declared GPUs would idle, and the estimate says so.
    let out = env.ok(&[
        "plan",
        "--estimate",
        &recipe("mistral-nemo-12b-to-8b.toml"),
        "--set",
        "steps.distilled.resources.tasks=1",
        "--set",
        "steps.distilled.resources.nodes=1",
    ]);
    let t = text(&out);
    assert!(
        t.contains("but runs 1 process(es), each on one device, so 127 would idle"),
        "{t}"
    );
}

#[test]
fn the_demo_recipe_validates() {
    let env = Env::new();
    let out = env.ok(&["dag", &recipe("smollm2-demo.toml")]);
    let t = text(&out);
    assert!(t.contains("distilled (distill) <- student=steps.pruned, teacher=steps.corrected, data=steps.tokens"), "{t}");
}
