//! The engine as a user drives it: cached reruns, explained plans, interrupted and concurrent runs.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Env, entries, stderr, text};

const FOUR: &str = r#"
[recipe]
name = "four"
description = "four steps, the last one joins two others"
seed = 1

# a comment
[steps.a]
op = "emit"
params = { text = "a", lr = 1e-4 }

[steps.b]
op = "emit"
params = { text = "b", tokens = "2K" }

[steps.c]
op = "join"
inputs = { left = "steps.a" }

[steps.d]
op = "join"
inputs = { left = "steps.b", right = "steps.c" }
"#;

#[test]
fn cached_rerun_is_a_no_op_and_changes_rerun_exactly_what_depends_on_them() {
    let env = Env::new();
    env.write("r.toml", FOUR);
    env.ok(&["run", "r.toml"]);
    assert_eq!(env.executions(), ["a", "b", "c", "d"]);
    assert_eq!(entries(&env.cache()), 4);

    let t = Instant::now();
    let out = env.ok(&["run", "r.toml"]);
    let took = t.elapsed();
    assert!(env.executions().is_empty(), "{}", text(&out));
    eprintln!(
        "no-op rerun of a cached 4-step recipe: {:.1} ms",
        took.as_secs_f64() * 1e3
    );
    assert!(took < Duration::from_secs(1), "no-op rerun took {took:?}");

    // One param: that step and its dependents, and plan names the param.
    let plan = env.ok(&["plan", "r.toml", "--set", "steps.a.params.lr=2e-4"]);
    let plan = text(&plan);
    assert!(plan.contains("param `a.lr` changed 1e-4 → 2e-4"), "{plan}");
    assert!(
        plan.contains("input `left` changed (`steps.a` changed)"),
        "{plan}"
    );
    env.ok(&["run", "r.toml", "--set", "steps.a.params.lr=2e-4"]);
    assert_eq!(env.executions(), ["a", "c", "d"]);
    // The previous results are still there: going back costs nothing.
    env.ok(&["run", "r.toml"]);
    assert!(env.executions().is_empty());
    assert_eq!(entries(&env.cache()), 7);

    // Cosmetic changes: description, comments, step order, resources, equal-meaning spellings.
    let cosmetic = r#"
[recipe]
name = "four"
description = "reworded"
seed = 1

[steps.d]  # moved first
op = "join"
inputs = { right = "steps.c", left = "steps.b" }
resources = { threads = 1, memory = "1GB" }

[steps.c]
op = "join"
inputs = { left = "steps.a" }
params = { sep = "+" }   # the default, spelled out

[steps.b]
op = "emit"
params = { tokens = 2000, text = "b" }

[steps.a]
op = "emit"
params = { lr = 0.0001, text = "a", mode = "fast" }
resources = { threads = 2 }
"#;
    env.write("r.toml", cosmetic);
    let out = env.ok(&["run", "r.toml"]);
    assert!(env.executions().is_empty(), "{}", text(&out));
}

#[test]
fn a_recipe_whose_steps_came_from_another_recipes_cache_explains_its_next_change() {
    let env = Env::new();
    env.write("first.toml", FOUR);
    env.ok(&["run", "first.toml"]);
    // Same steps under another name: everything is cached, nothing runs.
    env.write(
        "second.toml",
        &FOUR.replace("name = \"four\"", "name = \"second\""),
    );
    env.executions();
    env.ok(&["run", "second.toml"]);
    assert!(env.executions().is_empty());
    // Its next change is explained against what it found, not called new.
    let plan = text(&env.ok(&["plan", "second.toml", "--set", "steps.a.params.lr=3e-4"]));
    assert!(plan.contains("param `a.lr` changed 1e-4 → 3e-4"), "{plan}");
}

#[test]
fn plan_explains_rewiring_and_forcing_and_json_events_are_ndjson() {
    let env = Env::new();
    env.write("r.toml", FOUR);
    env.ok(&["run", "r.toml"]);
    env.executions();
    let plan = text(&env.ok(&["plan", "r.toml", "--set", "steps.c.inputs.left=steps.b"]));
    assert!(
        plan.contains("input `left` rewired steps.a → steps.b"),
        "{plan}"
    );
    let plan = text(&env.ok(&["plan", "r.toml", "--force", "b"]));
    assert!(plan.contains("forced"), "{plan}");

    let out = env.ok(&["run", "r.toml", "--force", "c", "--json"]);
    assert_eq!(env.executions(), ["c"]);
    let events: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every stdout line is JSON"))
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"plan"));
    assert!(kinds.contains(&"step_started"));
    assert!(kinds.contains(&"step_finished"));
    assert_eq!(kinds.last(), Some(&"run_finished"));
    let fin = events
        .iter()
        .find(|e| e["event"] == "step_finished")
        .unwrap();
    assert_eq!(fin["step"], "c");
    assert_eq!(fin["key"].as_str().unwrap().len(), 64);
}

#[test]
fn selection_flags() {
    let env = Env::new();
    env.write("r.toml", FOUR);
    env.ok(&["run", "r.toml", "--until", "c"]);
    assert_eq!(env.executions(), ["a", "c"]);
    env.ok(&["run", "r.toml", "--only", "b"]);
    assert_eq!(env.executions(), ["b"]);
    env.ok(&["run", "r.toml", "--from", "d"]);
    assert_eq!(env.executions(), ["d"]);
    // --only on a step whose input is not computed is refused with a pointer.
    let out = env.run(&[
        "run",
        "r.toml",
        "--only",
        "c",
        "--set",
        "steps.a.params.text=z",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("needs `steps.a`, which is not in the cache"),
        "{}",
        stderr(&out)
    );
    let out = env.run(&["run", "r.toml", "--only", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no step `nope`"), "{}", stderr(&out));
}

#[test]
fn a_failing_step_commits_nothing_and_exits_3() {
    let env = Env::new();
    env.write("r.toml", FOUR);
    let out = env.run(&["run", "r.toml", "--set", "steps.c.params.fail=true"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        stderr(&out).contains("step `c` failed: asked to fail"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("panicked"));
    // a and b were committed (and maybe nothing else); d never started.
    let ran = env.executions();
    assert!(
        ran.contains(&"c".to_string()) && !ran.contains(&"d".to_string()),
        "{ran:?}"
    );
    assert_eq!(entries(&env.cache()), ran.len() - 1);
    assert_eq!(
        std::fs::read_dir(env.cache().join("partial"))
            .unwrap()
            .count(),
        0
    );
    // A step that failed before checkpointing leaves no empty scratch directory behind.
    assert_eq!(
        std::fs::read_dir(env.cache().join("scratch"))
            .unwrap()
            .count(),
        0
    );
    env.ok(&["run", "r.toml"]);
    assert_eq!(env.executions(), ["c", "d"]);
}

#[test]
fn sigkill_mid_write_leaves_no_entry_and_the_rerun_succeeds() {
    let env = Env::new();
    env.write(
        "r.toml",
        r#"
[steps.slow]
op = "emit"
params = { sleep_ms = 30000 }
"#,
    );
    let mut child = env.command(&["run", "r.toml"]).spawn().unwrap();
    // Wait until the step has written half its output.
    let partial = env.cache().join("partial");
    let t = Instant::now();
    loop {
        let half = std::fs::read_dir(&partial)
            .map(|d| {
                d.filter_map(Result::ok)
                    .any(|e| e.path().join("data/partial.txt").exists())
            })
            .unwrap_or(false);
        if half {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the step never started writing"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(entries(&env.cache()), 0, "a killed step left an entry");
    let plan = text(&env.ok(&["plan", "r.toml"]));
    assert!(plan.contains("1 to run"), "{plan}");
    // The same step (same key) again, this time without the sleep.
    let out = env
        .command(&["run", "r.toml"])
        .env("DISTILLERY_TEST_NO_SLEEP", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(entries(&env.cache()), 1);
    // The stale partial directory and the dead lock were cleaned up, with a message each.
    assert!(
        stderr(&out).contains("removed the partial output of an interrupted run"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("took over the lock of a process that died holding it"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read_dir(&partial).unwrap().count(), 0);
}

#[test]
fn two_concurrent_runs_execute_the_shared_step_once() {
    let env = Env::new();
    env.write(
        "r.toml",
        r#"
[steps.shared]
op = "emit"
params = { sleep_ms = 1500 }

[steps.after]
op = "join"
inputs = { left = "steps.shared" }
"#,
    );
    let spawn = || {
        env.command(&["run", "r.toml"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let a = spawn();
    std::thread::sleep(Duration::from_millis(200));
    let b = spawn();
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{}", text(&a));
    assert!(b.status.success(), "{}", text(&b));
    assert_eq!(
        env.executions(),
        ["after", "shared"],
        "{}\n{}",
        text(&a),
        text(&b)
    );
    let both = format!("{}{}", text(&a), text(&b));
    assert!(both.contains("another run holds its lock"), "{both}");
    assert!(both.contains("computed by another run"), "{both}");
}

#[test]
fn lock_timeout_has_its_own_exit_code() {
    let env = Env::new();
    env.write(
        "r.toml",
        "[steps.s]\nop = \"emit\"\nparams = { sleep_ms = 3000 }\n",
    );
    let mut a = env.command(&["run", "r.toml"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let b = env.run(&["run", "r.toml", "--lock-timeout", "0"]);
    assert_eq!(b.status.code(), Some(4), "{}", text(&b));
    assert!(stderr(&b).contains("timed out"), "{}", stderr(&b));
    assert!(a.wait().unwrap().success());
}

#[test]
fn lock_then_locked_run_and_source_changes() {
    let env = Env::new();
    env.write("model/config.json", "{\"hidden_size\": 8}");
    env.write("model/model.safetensors", "weights");
    env.write("data/a.txt", "hello");
    env.write("data/b.txt", "world");
    env.write(
        "r.toml",
        r#"
[sources.teacher]
kind = "model"
path = "model"

[sources.text]
kind = "dataset"
files = "data/*.txt"

[steps.look]
op = "inspect"
inputs = { model = "sources.teacher", data = "sources.text" }
"#,
    );
    let out = env.run(&["run", "r.toml", "--locked"]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(stderr(&out).contains("distillery lock"), "{}", stderr(&out));
    env.ok(&["lock", "r.toml"]);
    let lock = std::fs::read_to_string(env.path("r.lock")).unwrap();
    assert!(
        lock.contains("[sources.teacher]") && lock.contains("[steps.look]"),
        "{lock}"
    );
    env.ok(&["run", "r.toml", "--locked"]);
    assert_eq!(env.executions(), ["look"]);
    let out = std::fs::read_to_string(
        std::fs::read_dir(env.cache().join("entries"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
            .join("data/out.txt"),
    )
    .unwrap();
    assert_eq!(out, "model model\ndata a.txt\ndata b.txt\n");

    // A source file changes: plan says so, --locked refuses.
    env.write("data/b.txt", "world!");
    let plan = text(&env.ok(&["plan", "r.toml"]));
    assert!(
        plan.contains("input `data` changed (the content of `sources.text` changed)"),
        "{plan}"
    );
    let out = env.run(&["run", "r.toml", "--locked"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(
        stderr(&out).contains("source `text` no longer matches the lock"),
        "{}",
        stderr(&out)
    );
    // Touching a file without changing it changes nothing.
    env.write("data/b.txt", "world");
    env.ok(&["run", "r.toml", "--locked"]);
    assert!(env.executions().is_empty());
}

#[test]
fn show_export_gc_verify_and_bundles() {
    let env = Env::new();
    env.write("r.toml", FOUR);
    env.ok(&["run", "r.toml"]);
    let show = text(&env.ok(&["show", "r.toml", "d"]));
    assert!(
        show.contains("input     right = ") && show.contains("out.txt"),
        "{show}"
    );
    let show_a = text(&env.ok(&["show", "r.toml", "a"]));
    assert!(show_a.contains("text: a|0.0001|1000"), "{show_a}");
    let json: serde_json::Value =
        serde_json::from_slice(&env.ok(&["show", "r.toml", "a", "--json"]).stdout).unwrap();
    assert_eq!(json["manifest"]["op"], "emit");

    env.ok(&["export", "r.toml", "d", "--to", "out"]);
    assert_eq!(
        std::fs::read_to_string(env.path("out/out.txt")).unwrap(),
        "(b|0.0001|2000+(a|0.0001|1000+))"
    );

    // An outdated result is collected; the current ones are kept while the recipe exists.
    env.ok(&["run", "r.toml", "--set", "steps.a.params.text=old"]);
    env.ok(&["run", "r.toml"]);
    let gc = text(&env.ok(&["gc", "--dry-run"]));
    assert!(gc.contains("would remove 3 entries"), "{gc}");
    assert_eq!(entries(&env.cache()), 7);
    env.ok(&["gc"]);
    assert_eq!(entries(&env.cache()), 4);
    env.executions();
    env.ok(&["run", "r.toml"]);
    assert!(env.executions().is_empty());

    assert!(text(&env.ok(&["cache", "verify"])).contains("4 entries verified"));
    let stats = text(&env.ok(&["cache", "stats"]));
    assert!(stats.contains("4 entries"), "{stats}");

    // A bundle moves results to another cache without rerunning them.
    env.ok(&["export", "r.toml", "a", "b", "c", "d", "--bundle", "bundle"]);
    let other = env.path("cache2");
    let out = env
        .command(&["cache", "import", "bundle"])
        .env("DISTILLERY_CACHE", &other)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = env
        .command(&["run", "r.toml"])
        .env("DISTILLERY_CACHE", &other)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        env.executions().is_empty(),
        "imported results were recomputed"
    );

    // Tampering is caught by verify, with its own exit code.
    let entry = std::fs::read_dir(env.cache().join("entries"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(entry.join("data/out.txt"), "tampered").unwrap();
    let out = env.run(&["cache", "verify"]);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    assert!(stderr(&out).contains("content changed"));
}

#[test]
fn dag_renders_dot_and_mermaid() {
    let env = Env::new();
    env.write("r.toml", FOUR);
    let dot = text(&env.ok(&["dag", "r.toml", "--dot"]));
    assert!(
        dot.contains("\"steps.c\" -> \"steps.d\" [label=\"right\"]"),
        "{dot}"
    );
    let mermaid = text(&env.ok(&["dag", "r.toml", "--mermaid"]));
    assert!(mermaid.contains("steps_b -->|left| steps_d"), "{mermaid}");
    let plain = text(&env.ok(&["dag", "r.toml"]));
    assert!(
        plain.contains("d (join) <- left=steps.b, right=steps.c"),
        "{plain}"
    );
}

#[test]
fn progress_goes_into_a_log_as_plain_lines() {
    let env = Env::new();
    env.write(
        "r.toml",
        "[steps.slow]\nop = \"emit\"\nparams = { sleep_ms = 20 }\n",
    );
    // stderr is a pipe here, as in a Slurm log or `| tee`: no bars, lines.
    let out = env
        .command(&["run", "r.toml"])
        .env("DISTILLERY_PROGRESS_INTERVAL", "0")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.lines()
            .any(|l| l.contains("progress slow: sleeping 20/20 ms (")),
        "{err}"
    );
}
