//! Data-parallel training through the real launcher (`distillery run` starting local ranks, each a
//! process meeting the others through burn-collective on loopback): W ranks end where one rank
//! accumulating the same global batch ends; each holds 1/W of the optimizer state; a rank killed
//! with SIGKILL fails the step at once, naming it, and the rerun resumes to the same bytes.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Env, text};

/// Six micro-batches per step: 1, 2 and 3 ranks split them evenly.
fn recipe(tasks: usize, extra: &str) -> String {
    recipe_for("train", tasks, extra)
}

/// The same with `op` (`train`, or `distill` from the model into itself with a CE share).
fn recipe_for(op: &str, tasks: usize, extra: &str) -> String {
    let (inputs, extra) = match op {
        "train" => (r#"model = "sources.base""#, extra.to_string()),
        _ => (
            r#"student = "sources.base", teacher = "sources.base""#,
            format!(", ce_weight = 0.5{extra}"),
        ),
    };
    format!(
        r#"{}
[steps.tuned]
op = "{op}"
inputs = {{ {inputs}, data = "sources.text" }}
params = {{ tokens = 2304, seq_len = 32, micro_batch = 1, global_batch = 6, warmup_steps = 2, lr = 1e-3, val_sequences = 4{extra} }}
resources = {{ tasks = {tasks} }}
"#,
        common::TINY_SOURCES
    )
}

/// `show --json` of the step `tuned`.
fn shown(env: &Env, cache: &Path) -> serde_json::Value {
    common::show_json(env, cache, "tuned")
}

/// The step's output directory, from `show --json`.
fn out_dir(shown: &serde_json::Value) -> PathBuf {
    PathBuf::from(shown["path"].as_str().expect("an output path"))
}

fn weights(dir: &Path) -> BTreeMap<String, Vec<f32>> {
    distillery_ops::stats::read_vectors(&dir.join("model.safetensors")).unwrap()
}

fn train_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("train.json")).unwrap()).unwrap()
}

fn run_with(env: &Env, op: &str, tasks: usize, cache: &Path) -> PathBuf {
    env.write("r.toml", &recipe_for(op, tasks, ""));
    let out = env
        .command(&["run", "r.toml"])
        .env("DISTILLERY_CACHE", cache)
        .output()
        .unwrap();
    assert!(out.status.success(), "tasks = {tasks}:\n{}", text(&out));
    out_dir(&shown(env, cache))
}

#[test]
fn two_and_three_ranks_end_where_one_rank_accumulating_ends() {
    ranks_match_one_rank("train");
}

#[test]
fn two_and_three_distilling_ranks_end_where_one_rank_accumulating_ends() {
    ranks_match_one_rank("distill");
}

fn ranks_match_one_rank(op: &str) {
    let env = Env::new();
    common::tiny_model_and_text(&env);
    let one = run_with(&env, op, 1, &env.path("cache-1"));
    let reference = weights(&one);
    let one_bytes = train_json(&one)["optimizer_state_bytes_per_rank"][0]
        .as_u64()
        .unwrap();
    for tasks in [2, 3] {
        let dir = run_with(&env, op, tasks, &env.path(&format!("cache-{tasks}")));
        let got = weights(&dir);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            reference.keys().collect::<Vec<_>>()
        );
        // Relative difference per tensor, ‖a − b‖₂ / ‖a‖₂: gradients summed in another order
        // differ in the last bits, and Adam's normalization lets that move a few near-zero
        // elements by more than their share (the largest elementwise difference is printed too).
        let (mut worst, mut worst_element) = (0f64, 0f64);
        for (name, want) in &reference {
            let have = &got[name];
            let (mut diff, mut norm, mut scale, mut max) = (0f64, 0f64, 0f64, 0f64);
            for (a, b) in want.iter().zip(have) {
                let (a, b) = (*a as f64, *b as f64);
                diff += (a - b) * (a - b);
                norm += a * a;
                scale = scale.max(a.abs());
                max = max.max((a - b).abs());
            }
            worst = worst.max((diff / norm.max(1e-30)).sqrt());
            worst_element = worst_element.max(max / scale.max(1e-30));
        }
        eprintln!(
            "{op}, {tasks} ranks vs 1: largest per-tensor relative difference {worst:.2e}, largest element difference {worst_element:.2e} of its tensor's largest value"
        );
        assert!(
            worst <= 1e-6,
            "{tasks} ranks differ from one rank by {worst:e} relative"
        );
        assert!(
            reference != got || tasks == 2,
            "the sums' order should differ somewhere with {tasks} ranks"
        );
        // Measured by each rank: the moments it holds, 1/W of one rank's (to a shard's padding).
        let t = train_json(&dir);
        assert_eq!(t["ranks"], tasks as u64);
        let per_rank: Vec<u64> = t["optimizer_state_bytes_per_rank"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap())
            .collect();
        assert_eq!(per_rank.len(), tasks);
        assert_eq!(per_rank.iter().sum::<u64>(), one_bytes);
        let share = one_bytes.div_ceil(tasks as u64);
        for b in &per_rank {
            assert!(
                b.abs_diff(share) <= 8 * tasks as u64,
                "{per_rank:?} is not 1/{tasks} of {one_bytes}"
            );
        }
    }
}

/// One rank forced through a collective library takes the sharded path (reduce-scatter,
/// gathered shards) that one rank alone skips: the same training to within rounding (the
/// squared norms cross the collective as f32).
#[test]
fn one_rank_through_the_collective_matches_one_rank_alone() {
    let env = Env::new();
    common::tiny_model_and_text(&env);
    let alone = weights(&run_with(&env, "train", 1, &env.path("cache-alone")));
    env.write("r.toml", &recipe(1, ""));
    let cache = env.path("cache-collective");
    let out = env
        .command(&["run", "r.toml"])
        .env("DISTILLERY_CACHE", &cache)
        .env("DISTILLERY_COLLECTIVE", "websocket")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let through = weights(&out_dir(&shown(&env, &cache)));
    for (name, want) in &alone {
        let (mut diff, mut norm) = (0f64, 0f64);
        for (a, b) in want.iter().zip(&through[name]) {
            diff += ((a - b) as f64).powi(2);
            norm += (*a as f64).powi(2);
        }
        let rel = (diff / norm.max(1e-30)).sqrt();
        assert!(rel <= 1e-6, "{name}: {rel:e}");
    }
}

/// The step of the last checkpoint a run into `cache` wrote (0 before the first).
fn checkpoint_step(cache: &Path) -> u64 {
    std::fs::read_dir(cache.join("scratch"))
        .ok()
        .and_then(|d| {
            d.filter_map(Result::ok)
                .find_map(|e| std::fs::read_to_string(e.path().join("checkpoint/state.json")).ok())
        })
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v["step"].as_u64())
        .unwrap_or(0)
}

/// Processes of this test binary that are rank `rank` of a step whose cache is `cache` (from
/// their command line and environment).
fn rank_pids(cache: &Path, rank: usize) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        if args.first() != Some(&common::BIN.as_bytes())
            || !args.contains(&&b"rank"[..])
            || !args
                .iter()
                .any(|a| a.starts_with(cache.to_string_lossy().as_bytes()))
        {
            continue;
        }
        let environ = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let want = format!("DISTILLERY_RANK={rank}");
        if environ.split(|b| *b == 0).any(|v| v == want.as_bytes()) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn a_killed_rank_fails_the_step_at_once_and_the_rerun_resumes_to_the_same_bytes() {
    let env = Env::new();
    common::tiny_model_and_text(&env);
    let extra = ", checkpoint_every = 1";
    env.write("r.toml", &recipe(2, extra));
    let clean = env.path("cache-clean");
    let out = env
        .command(&["run", "r.toml"])
        .env("DISTILLERY_CACHE", &clean)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let expected = weights(&out_dir(&shown(&env, &clean)));

    let cache = env.path("cache-killed");
    let child = env
        .command(&["run", "r.toml"])
        .env("DISTILLERY_CACHE", &cache)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let at_step = loop {
        let step = checkpoint_step(&cache);
        if step >= 2 {
            break step;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let pids = rank_pids(&cache, 1);
    assert_eq!(pids.len(), 1, "one rank 1 running");
    let killed = Instant::now();
    // SAFETY: a plain kill(2) of a child process of ours.
    unsafe { libc_kill(pids[0] as i32, 9) };
    let out = child.wait_with_output().unwrap();
    let took = killed.elapsed();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(3), "{said}");
    assert!(took < Duration::from_secs(60), "took {took:?}");
    assert!(
        said.contains("rank 1 of 2") && said.contains("killed by signal 9"),
        "{said}"
    );
    assert!(rank_pids(&cache, 0).is_empty(), "rank 0 was left running");
    // Nothing committed.
    let show = env
        .command(&["show", "r.toml", "tuned"])
        .env("DISTILLERY_CACHE", &cache)
        .output()
        .unwrap();
    assert!(!show.status.success(), "{}", text(&show));

    let out = env
        .command(&["run", "r.toml"])
        .env("DISTILLERY_CACHE", &cache)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let resumed = out_dir(&shown(&env, &cache));
    assert!(
        train_json(&resumed)["resumed_at"].as_u64().unwrap() >= at_step,
        "killed after step {at_step}, resumed at {}",
        train_json(&resumed)["resumed_at"]
    );
    assert!(
        weights(&resumed) == expected,
        "the resumed run's weights differ from the uninterrupted run's"
    );
}

/// A rank that stops answering (SIGSTOP) fails the step once the others' collective timeout
/// passes, naming it.
#[test]
fn a_hung_rank_fails_the_step_after_the_collective_timeout_naming_it() {
    let env = Env::new();
    common::tiny_model_and_text(&env);
    env.write(
        "r.toml",
        &recipe(2, ", checkpoint_every = 1").replace("tokens = 2304", "tokens = 20000"),
    );
    let cache = env.cache();
    let child = env
        .command(&["run", "r.toml"])
        .env("DISTILLERY_COLLECTIVE_TIMEOUT", "3")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let pid = loop {
        if checkpoint_step(&cache) > 0
            && let Some(pid) = rank_pids(&cache, 1).first()
        {
            break *pid;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let stopped = Instant::now();
    // SAFETY: a plain kill(2) of a child process of ours.
    unsafe { libc_kill(pid as i32, 19) };
    let out = child.wait_with_output().unwrap();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(3), "{said}");
    assert!(
        stopped.elapsed() < Duration::from_secs(30),
        "{:?}",
        stopped.elapsed()
    );
    assert!(
        said.contains("rank 1 of 2 (on ") && said.contains("stopped answering"),
        "{said}"
    );
    assert!(
        rank_pids(&cache, 1).is_empty(),
        "the hung rank was left behind"
    );
}

/// An op that runs as one process refuses several tasks, where the recipe says it; the key
/// names the world; several GPUs must be one per task.
#[test]
fn tasks_are_checked_and_enter_the_key() {
    let env = Env::new();
    common::tiny_model_and_text(&env);
    let stats = r#"
[steps.stats]
op = "calibrate"
inputs = { model = "sources.base", data = "sources.text" }
resources = { tasks = 2 }
"#;
    env.write("r.toml", &format!("{}{stats}", common::TINY_SOURCES));
    let out = env.run(&["plan", "r.toml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("r.toml:16:23") && said.contains("op `calibrate` runs as one process"),
        "{said}"
    );
    assert!(said.contains("train") && said.contains("distill"), "{said}");

    env.write(
        "r.toml",
        &recipe(2, "").replace("tasks = 2", "tasks = 2, gpus = 4"),
    );
    let out = env.run(&["plan", "r.toml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("4 GPUs for 2 tasks"), "{}", text(&out));

    let key = |tasks: usize| {
        env.write("r.toml", &recipe(tasks, ""));
        let out = env.ok(&["plan", "r.toml", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["steps"][0]["key"].as_str().unwrap().to_string()
    };
    let (one, two, three) = (key(1), key(2), key(3));
    assert!(one != two && two != three && one != three);
    // One task is the key a recipe without `tasks` has.
    env.write(
        "r.toml",
        &recipe(1, "").replace("resources = { tasks = 1 }", ""),
    );
    let out = env.ok(&["plan", "r.toml", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["steps"][0]["key"].as_str().unwrap(), one);
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
