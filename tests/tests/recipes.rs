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
    // Too few GPUs: said so, with what would fit.
    let out = env.ok(&[
        "plan",
        "--estimate",
        &recipe("mistral-nemo-12b-to-8b.toml"),
        "--set",
        "steps.distilled.resources.gpus=1",
    ]);
    let t = text(&out);
    assert!(
        t.contains("step `distilled` does not fit") && t.contains("needs at least 2 GPUs"),
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
