//! The cache's promise, through the real binary: a key names exactly what produced an output
//! (the seed where it is used, source contents and never their paths), and no command loses a
//! result or hangs on a closed pipe.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Env, entries, stderr, text};

/// `plan --json`, insisting that stdout is one JSON document.
fn plan_json(env: &Env, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["plan", "--json"];
    all.extend_from_slice(args);
    let out = env.ok(&all);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "plan --json printed more than one JSON document ({e}):\n{}",
            text(&out)
        )
    })
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect()
}

/// Every step's key, status and reasons.
fn plan(env: &Env, args: &[&str]) -> BTreeMap<String, (String, String, Vec<String>)> {
    let v = plan_json(env, args);
    let field = |s: &serde_json::Value, k: &str| s[k].as_str().unwrap().to_string();
    v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let row = (field(s, "key"), field(s, "status"), strings(&s["reasons"]));
            (field(s, "step"), row)
        })
        .collect()
}

/// Every source's key.
fn source_keys(env: &Env, recipe: &str) -> BTreeMap<String, String> {
    let v = plan_json(env, &[recipe]);
    let field = |s: &serde_json::Value, k: &str| s[k].as_str().unwrap().to_string();
    v["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (field(s, "name"), field(s, "key")))
        .collect()
}

const SEEDED: &str = r#"
[recipe]
seed = 42

[steps.plain]
op = "emit"

[steps.drawn]
op = "draw"
"#;

#[test]
fn the_seed_keys_exactly_the_steps_that_use_it() {
    let env = Env::new();
    env.write("r.toml", SEEDED);
    env.ok(&["run", "r.toml"]);
    let before = plan(&env, &["r.toml"]);
    let after = plan(&env, &["r.toml", "--set", "recipe.seed=7"]);
    assert_eq!(
        before["plain"].0, after["plain"].0,
        "emit does not use the seed"
    );
    assert_eq!(after["plain"].1, "cached");
    assert_ne!(before["drawn"].0, after["drawn"].0, "draw uses the seed");
    assert_eq!(after["drawn"].1, "run");
    assert_eq!(after["drawn"].2, ["recipe seed changed 42 → 7"]);
    // A lock written for seed 42 does not pass for seed 7.
    env.ok(&["lock", "r.toml"]);
    let out = env.run(&["run", "r.toml", "--locked", "--set", "recipe.seed=7"]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    env.ok(&["run", "r.toml", "--set", "recipe.seed=7"]);
    let show = text(&env.ok(&["show", "r.toml", "drawn", "--set", "recipe.seed=7"]));
    assert!(show.contains("seed 7"), "{show}");
    // The shipped ops say which of them use it: `prune` only for its random baseline.
    let registry = distillery_tests::registry();
    let uses = |op: &str, params: &[(&str, &str)]| {
        let p = distillery_ops::Params(
            params
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        distillery_ops::ParamValue::Str(v.to_string()),
                    )
                })
                .collect(),
        );
        registry.get(op).unwrap().uses_seed(&p)
    };
    for op in ["calibrate", "train", "distill", "search", "depth_scan"] {
        assert!(uses(op, &[]), "{op} shuffles data from the seed");
    }
    for op in ["score", "evaluate", "tokenize", "compare"] {
        assert!(!uses(op, &[]), "{op} does not use the seed");
    }
    assert!(uses("prune", &[("method", "random")]));
    assert!(!uses("prune", &[("method", "magnitude")]));
    assert!(!uses("prune", &[("method", "importance")]));
}

#[test]
fn a_moved_dataset_or_renamed_gguf_keeps_its_keys() {
    let env = Env::new();
    env.write("one/data/a.txt", "first document");
    env.write("one/data/sub/b.txt", "second document");
    env.write("one/model.gguf", "not really a model, only bytes");
    let recipe = |dir: &str, gguf: &str| {
        format!(
            r#"
[sources.text]
kind = "dataset"
files = ["{dir}/data/**/*.txt"]

[sources.teacher]
kind = "model"
path = "{dir}/{gguf}"

[steps.look]
op = "inspect"
inputs = {{ model = "sources.teacher", data = "sources.text" }}
"#
        )
    };
    env.write("r1.toml", &recipe("one", "model.gguf"));
    let first = source_keys(&env, "r1.toml");
    // The same files somewhere else, deeper, the GGUF renamed.
    env.write("elsewhere/deep/data/a.txt", "first document");
    env.write("elsewhere/deep/data/sub/b.txt", "second document");
    env.write(
        "elsewhere/deep/renamed.gguf",
        "not really a model, only bytes",
    );
    env.write("r2.toml", &recipe("elsewhere/deep", "renamed.gguf"));
    assert_eq!(source_keys(&env, "r2.toml"), first);
    assert_eq!(
        plan(&env, &["r1.toml"])["look"].0,
        plan(&env, &["r2.toml"])["look"].0
    );
    // Several patterns in unrelated trees: each file is named from its own pattern's root.
    env.write("far/away/notes.txt", "third document");
    env.write("near/notes.txt", "third document");
    let two = |a: &str, b: &str| {
        format!(
            "[sources.text]\nkind = \"dataset\"\nfiles = [\"{a}/data/**/*.txt\", \"{b}/*.txt\"]\n\n[steps.e]\nop = \"emit\"\n"
        )
    };
    env.write("r3.toml", &two("one", "far/away"));
    env.write("r4.toml", &two("elsewhere/deep", "near"));
    assert_eq!(source_keys(&env, "r3.toml"), source_keys(&env, "r4.toml"));
    // Names inside the set still count: a renamed file is another dataset.
    std::fs::rename(
        env.path("elsewhere/deep/data/sub/b.txt"),
        env.path("elsewhere/deep/data/sub/c.txt"),
    )
    .unwrap();
    assert_ne!(source_keys(&env, "r2.toml")["text"], first["text"]);
}

#[test]
fn a_hub_snapshot_of_links_keys_like_its_resolved_copy_and_dangling_links_are_named() {
    let env = Env::new();
    env.write("copy/config.json", "{\"a\": 1}");
    env.write("copy/model.safetensors", "weights");
    env.write("hub/blobs/1111", "{\"a\": 1}");
    env.write("hub/blobs/2222", "weights");
    std::fs::create_dir_all(env.path("hub/snapshots/rev")).unwrap();
    std::os::unix::fs::symlink(
        "../../blobs/1111",
        env.path("hub/snapshots/rev/config.json"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        "../../blobs/2222",
        env.path("hub/snapshots/rev/model.safetensors"),
    )
    .unwrap();
    let recipe = |path: &str| {
        format!(
            "[sources.m]\nkind = \"model\"\npath = \"{path}\"\n\n[steps.look]\nop = \"inspect\"\ninputs = {{ model = \"sources.m\" }}\n"
        )
    };
    env.write("copy.toml", &recipe("copy"));
    env.write("hub.toml", &recipe("hub/snapshots/rev"));
    assert_eq!(
        source_keys(&env, "hub.toml"),
        source_keys(&env, "copy.toml")
    );
    env.ok(&["run", "hub.toml"]);
    std::fs::remove_file(env.path("hub/blobs/2222")).unwrap();
    let out = env.run(&["plan", "hub.toml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains("model.safetensors")
            && err.contains("dangling symbolic link")
            && !err.contains("corrupt"),
        "{err}"
    );
}

/// Kills a run once its step has written into the scratch directory.
fn interrupt(env: &Env, args: &[&str]) {
    let mut child = env
        .command(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let scratch = env.cache().join("scratch");
    while !std::fs::read_dir(&scratch)
        .map(|d| {
            d.filter_map(Result::ok)
                .any(|e| e.path().join("checkpoint").exists())
        })
        .unwrap_or(false)
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the step never checkpointed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn force_recomputes_from_nothing_while_a_plain_rerun_resumes() {
    let env = Env::new();
    env.write(
        "r.toml",
        "[steps.drawn]\nop = \"draw\"\nparams = { sleep_ms = 30000 }\n",
    );
    interrupt(&env, &["run", "r.toml"]);
    let out = env
        .command(&["run", "r.toml"])
        .env("DISTILLERY_TEST_NO_SLEEP", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&env.ok(&["show", "r.toml", "drawn"])).contains("resumed true"));

    // --force on a cached step starts over, even with a checkpoint lying around.
    interrupt(&env, &["run", "r.toml", "--force", "drawn"]);
    let out = env
        .command(&["run", "r.toml", "--force", "drawn"])
        .env("DISTILLERY_TEST_NO_SLEEP", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let show = text(&env.ok(&["show", "r.toml", "drawn"]));
    assert!(show.contains("resumed false"), "{show}");
}

/// Every file under `dir` with its bytes: what "changes nothing" is checked against.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.insert(
                    format!("{}/", p.strip_prefix(base).unwrap().display()),
                    Vec::new(),
                );
                walk(base, &p, out);
            } else {
                out.insert(
                    p.strip_prefix(base).unwrap().display().to_string(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}

#[test]
fn gc_dry_run_changes_nothing_and_a_moved_recipe_keeps_its_pin() {
    let env = Env::new();
    env.write("r.toml", SEEDED);
    env.ok(&["run", "r.toml"]);
    env.ok(&["run", "r.toml", "--set", "recipe.seed=7"]);
    assert_eq!(entries(&env.cache()), 3);
    // The recipe goes away for a while (another git branch, say).
    std::fs::rename(env.path("r.toml"), env.path("away.toml")).unwrap();
    let before = snapshot(&env.cache());
    let dry = env.ok(&["gc", "--dry-run"]);
    assert_eq!(
        snapshot(&env.cache()),
        before,
        "gc --dry-run changed the cache"
    );
    assert!(
        text(&dry).contains("would remove 1 entries"),
        "{}",
        text(&dry)
    );
    assert!(
        stderr(&dry).contains("its file is gone"),
        "{}",
        stderr(&dry)
    );
    env.ok(&["gc"]);
    assert_eq!(
        entries(&env.cache()),
        2,
        "the last run's results stay pinned"
    );
    let pins = text(&env.ok(&["cache", "pins"]));
    assert!(pins.contains("(file gone)"), "{pins}");
    let dry = snapshot(&env.cache());
    env.ok(&["cache", "unpin", "--missing", "--dry-run"]);
    assert_eq!(snapshot(&env.cache()), dry);
    env.ok(&["cache", "unpin", "--missing"]);
    env.ok(&["gc"]);
    assert_eq!(entries(&env.cache()), 0);
}

fn make_writable(p: &Path) {
    let mut perms = std::fs::metadata(p).unwrap().permissions();
    perms.set_mode(0o644);
    std::fs::set_permissions(p, perms).unwrap();
}

#[test]
fn export_never_mixes_outputs_and_an_edited_export_is_not_trusted() {
    let env = Env::new();
    env.write("r.toml", SEEDED);
    env.ok(&["run", "r.toml"]);
    env.ok(&["export", "r.toml", "plain", "--to", "out"]);
    let out = env.run(&["export", "r.toml", "drawn", "--to", "out"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(stderr(&out).contains("is not empty") && stderr(&out).contains("--replace"));
    assert!(
        std::fs::read_to_string(env.path("out/out.txt"))
            .unwrap()
            .starts_with("x|")
    );
    env.ok(&["export", "r.toml", "drawn", "--to", "out", "--replace"]);
    assert!(
        std::fs::read_to_string(env.path("out/out.txt"))
            .unwrap()
            .starts_with("seed 42")
    );
    assert_eq!(
        std::fs::read_dir(env.path("out")).unwrap().count(),
        2,
        "out.txt and the marker"
    );
    // --replace never deletes a folder that is not an export.
    env.write("mine/notes.txt", "precious");
    let out = env.run(&["export", "r.toml", "drawn", "--to", "mine", "--replace"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(env.path("mine/notes.txt")).unwrap(),
        "precious"
    );
    // An empty directory (a mount point, say) is written in place.
    std::fs::create_dir(env.path("empty")).unwrap();
    env.ok(&["export", "r.toml", "drawn", "--to", "empty"]);
    assert!(env.path("empty/out.txt").is_file());
    // Hard links are read-only; --copy gives files to edit, apart from the cache.
    let exported = env.path("out/out.txt");
    assert_eq!(
        std::fs::metadata(&exported).unwrap().permissions().mode() & 0o222,
        0
    );
    env.ok(&["export", "r.toml", "drawn", "--to", "editable", "--copy"]);
    let copy = env.path("editable/out.txt");
    assert_ne!(
        std::fs::metadata(&copy).unwrap().permissions().mode() & 0o200,
        0
    );
    std::fs::write(&copy, "mine").unwrap();
    assert!(plan(&env, &["r.toml"])["drawn"].1 == "cached");
    // Editing the hard link anyway (root can) edits the entry: run notices and recomputes.
    make_writable(&exported);
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&exported, "seed 99 edited").unwrap();
    let p = plan(&env, &["r.toml"]);
    assert_eq!(p["drawn"].1, "run");
    assert!(
        p["drawn"].2[0].contains("edited in place"),
        "{:?}",
        p["drawn"]
    );
    assert_eq!(env.run(&["cache", "verify"]).status.code(), Some(6));
    env.ok(&["run", "r.toml"]);
    assert!(text(&env.ok(&["show", "r.toml", "drawn"])).contains("seed 42"));
    env.ok(&["cache", "verify"]);
}

#[test]
fn closed_pipes_end_every_command_promptly_and_quietly() {
    let env = Env::new();
    env.write("r.toml", "[steps.slow]\nop = \"emit\"\nparams = { sleep_ms = 30000 }\n\n[steps.quick]\nop = \"emit\"\nparams = { text = \"q\" }\n");
    env.ok(&["run", "r.toml", "--only", "quick"]);
    // `distillery run r.toml 2>&1 | head -1` while a step is running.
    for args in [
        &["run", "r.toml"][..],
        &["show", "r.toml", "quick"][..],
        &["plan", "r.toml"][..],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        let mut command = env.command(args);
        command.stdout(writer.try_clone().unwrap()).stderr(writer);
        let mut child = command.spawn().unwrap();
        drop(command); // the parent's copies of the write end
        let mut first = String::new();
        BufReader::new(reader).read_line(&mut first).unwrap();
        // `head -1` has its line and exits: the read end is closed.
        let t = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if t.elapsed() > Duration::from_secs(5) {
                child.kill().unwrap();
                panic!("{args:?} kept running with its output closed");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        use std::os::unix::process::ExitStatusExt;
        assert!(
            status.success() || status.signal() == Some(libc_sigpipe()),
            "{args:?}: {status:?}"
        );
    }
    assert_eq!(
        entries(&env.cache()),
        1,
        "the interrupted step committed nothing"
    );
}

fn libc_sigpipe() -> i32 {
    13
}

#[test]
fn plan_json_is_one_document_and_recipe_mistakes_say_what_they_are() {
    let env = Env::new();
    env.write("data/a.txt", "text");
    env.write(
        "r.toml",
        "[sources.text]\nkind = \"dataset\"\nfiles = \"data/*.txt\"\nexclude = [\"a.txt\"]\n\n[sources.m]\nkind = \"modle\"\npath = \"m\"\n\n[steps.look]\nop = \"inspect\"\ninputs = { model = \"sources.m\", data = \"sources.text\" }\n",
    );
    let out = env.run(&["plan", "r.toml"]);
    let err = stderr(&out);
    assert!(err.contains("unknown source kind `modle`"), "{err}");
    assert!(
        !err.contains("no source named"),
        "a typo in kind cascaded:\n{err}"
    );
    env.write(
        "r.toml",
        "[sources.text]\nkind = \"dataset\"\nfiles = \"data/*.txt\"\nexclude = [\"a.txt\"]\n\n[steps.e]\nop = \"emit\"\n",
    );
    let err = stderr(&env.run(&["plan", "r.toml"]));
    assert!(err.contains("`exclude` removed them all"), "{err}");
    // First use of a source hashes it: those events must not reach stdout with --json.
    env.write("data/b.txt", "more text");
    env.write(
        "r.toml",
        "[sources.text]\nkind = \"dataset\"\nfiles = \"data/*.txt\"\n\n[steps.e]\nop = \"emit\"\n",
    );
    plan(&env, &["r.toml"]);
    // DISTILLERY_CACHE set but empty means unset.
    let out = env
        .command(&["cache", "dir"])
        .env("DISTILLERY_CACHE", "")
        .env("HOME", env.path("home"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("home/.cache/distillery"));
}

#[test]
fn a_new_key_scheme_is_explained_as_such() {
    let env = Env::new();
    env.write("r.toml", SEEDED);
    env.ok(&["run", "r.toml"]);
    // Make the last run's records look like they came from the previous key scheme.
    let runs = env.cache().join("state/runs");
    for dir in std::fs::read_dir(&runs).unwrap() {
        for f in std::fs::read_dir(dir.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            let mut v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            v.as_object_mut().unwrap().remove("key_scheme");
            v["key"] = serde_json::Value::String("0".repeat(64));
            std::fs::write(&p, v.to_string()).unwrap();
        }
    }
    let entries_dir = env.cache().join("entries");
    std::fs::remove_dir_all(&entries_dir).unwrap();
    std::fs::create_dir(&entries_dir).unwrap();
    let p = plan(&env, &["r.toml"]);
    assert_eq!(
        p["plain"].2,
        ["cache key scheme changed 1 → 2 (a distillery update; every key moved)"]
    );
}
