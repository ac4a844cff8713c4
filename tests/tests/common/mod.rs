//! Helpers: a scratch directory with its own cache and execution counter, and the test binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_distillery-test");

pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn cache(&self) -> PathBuf {
        self.path("cache")
    }

    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .current_dir(self.dir.path())
            .env("DISTILLERY_CACHE", self.cache())
            .env("DISTILLERY_TEST_COUNTER", self.path("counter.txt"))
            // No user config (`[executor]` defaults) reaches the tests.
            .env("XDG_CONFIG_HOME", self.path("config-home"))
            .env_remove("DISTILLERY_CONFIG")
            .env_remove("RUST_BACKTRACE");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs and insists on success.
    pub fn ok(&self, args: &[&str]) -> Output {
        let out = self.run(args);
        assert!(out.status.success(), "{args:?} failed:\n{}", text(&out));
        out
    }

    /// Executions per step so far (from the counter file), and resets it.
    pub fn executions(&self) -> Vec<String> {
        let p = self.path("counter.txt");
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        let _ = std::fs::remove_file(&p);
        let mut v: Vec<String> = text.lines().map(String::from).collect();
        v.sort();
        v
    }
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

pub fn entries(cache: &Path) -> usize {
    std::fs::read_dir(cache.join("entries"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A checked-in test file under tests/golden.
pub fn golden(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("golden")
        .join(rel)
}

/// A tiny model (tests/golden/llama-gqa-tied-f32) with a character tokenizer in `model/`, and
/// `data/train.txt` to train on.
/// `show r.toml STEP --json` against `cache`, which must succeed.
pub fn show_json(env: &Env, cache: &Path, step: &str) -> serde_json::Value {
    let out = env
        .command(&["show", "r.toml", step, "--json"])
        .env("DISTILLERY_CACHE", cache)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Recipe lines (a seed, `sources.base` and `sources.text`) for what [`tiny_model_and_text`]
/// writes.
pub const TINY_SOURCES: &str = r#"
[recipe]
seed = 3

[sources.base]
kind = "model"
path = "model"

[sources.text]
kind = "dataset"
files = "data/train.txt"
"#;

pub fn tiny_model_and_text(env: &Env) {
    let model = env.path("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::copy(golden("llama-gqa-tied-f32").join(f), model.join(f)).unwrap();
    }
    std::fs::copy(golden("char-tokenizer.json"), model.join("tokenizer.json")).unwrap();
    let mut text = String::new();
    for i in 0..300 {
        text.push_str(&format!(
            "Line {i}: the quick brown fox jumps over the lazy dog, {} times.\n",
            i * 7 % 13
        ));
    }
    env.write("data/train.txt", &text);
}
