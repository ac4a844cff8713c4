//! The Slurm executor against a real Slurm: `scripts/slurm-loopback.sh start` (which `.ci/run`
//! runs) starts a one-host cluster. Without one these tests say so and pass, unless
//! `DISTILLERY_REQUIRE_SLURM=1` (CI). The settings checks at the end need no cluster.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Whether a Slurm controller answers; panics when CI requires one.
fn slurm_up() -> bool {
    // A node that can take jobs: idle, or busy with other tests' jobs (mixed, allocated,
    // completing). Asked a few times: a loaded controller may not answer at once.
    let usable = || {
        Command::new("timeout")
            .args(["10", "sinfo", "--noheader", "--format=%t"])
            .output()
            .is_ok_and(|o| {
                o.status.success()
                    && String::from_utf8_lossy(&o.stdout).lines().any(|l| {
                        ["idle", "mix", "alloc", "comp", "plnd"]
                            .iter()
                            .any(|s| l.trim_end_matches(['~', '#', '!', '%', '@']) == *s)
                    })
            })
    };
    let up = (0..3).any(|attempt| {
        if attempt > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        usable()
    });
    if !up {
        assert!(
            std::env::var("DISTILLERY_REQUIRE_SLURM").as_deref() != Ok("1"),
            "DISTILLERY_REQUIRE_SLURM=1 but no Slurm node answers (scripts/slurm-loopback.sh start)"
        );
        eprintln!("skipped: no Slurm cluster here (scripts/slurm-loopback.sh start brings one up)");
    }
    up
}

/// `distillery ... --executor slurm` with states read twice a second.
fn slurm_command(env: &Env, args: &[&str]) -> Command {
    let mut c = env.command(args);
    c.env("DISTILLERY_SLURM_POLL", "0.5");
    c
}

/// `distillery run r.toml --executor slurm EXTRA...`, to its end.
fn slurm_run(env: &Env, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["run", "r.toml", "--executor", "slurm"];
    args.extend_from_slice(extra);
    slurm_command(env, &args).output().unwrap()
}

/// Runs `run r.toml --executor slurm --json` until an event `at` accepts, then sends it SIGINT.
/// Returns that event, the exit code, stderr, and how long the run took to end after the signal.
fn interrupt_at(
    env: &Env,
    at: impl Fn(&serde_json::Value) -> bool,
) -> (serde_json::Value, Option<i32>, String, Duration) {
    let mut child = slurm_command(env, &["run", "r.toml", "--executor", "slurm", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let event = loop {
        let line = lines.next().expect("the run ended first").unwrap();
        let e: serde_json::Value = serde_json::from_str(&line).unwrap();
        if at(&e) {
            break e;
        }
    };
    let t0 = Instant::now();
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (event, status.code(), err, t0.elapsed())
}

fn events(out: &std::process::Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn of_kind<'e>(events: &'e [serde_json::Value], kind: &str) -> Vec<&'e serde_json::Value> {
    events.iter().filter(|e| e["event"] == kind).collect()
}

fn scontrol(job: &str) -> String {
    let out = Command::new("scontrol")
        .args(["show", "job", "--oneliner", job])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const THREE: &str = r#"
[recipe]
name = "slurmy"

[steps.a]
op = "emit"
params = { text = "a", sleep_ms = 1000 }

[steps.b]
op = "emit"
params = { text = "b" }

[steps.c]
op = "join"
inputs = { left = "steps.a", right = "steps.b" }
"#;

/// A step's name, key, and its files (relative path, bytes).
type StepOutput = (String, String, Vec<(String, Vec<u8>)>);

/// Each step's key and the bytes of its files, for comparing runs.
fn keys_and_outputs(env: &Env) -> Vec<StepOutput> {
    ["a", "b", "c"]
        .iter()
        .map(|step| {
            let out = env.ok(&["show", "r.toml", step, "--json"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let dir = std::path::PathBuf::from(v["path"].as_str().unwrap());
            let mut files: Vec<(String, Vec<u8>)> = v["manifest"]["files"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| {
                    let rel = f["path"].as_str().unwrap().to_string();
                    let bytes = std::fs::read(dir.join(&rel)).unwrap();
                    (rel, bytes)
                })
                .collect();
            files.sort();
            (
                step.to_string(),
                v["manifest"]["key"].as_str().unwrap().to_string(),
                files,
            )
        })
        .collect()
}

#[test]
fn every_step_runs_as_a_job_and_the_rerun_submits_nothing() {
    if !slurm_up() {
        return;
    }
    let env = Env::new();
    env.write("r.toml", THREE);
    let out = slurm_run(&env, &["--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let ev = events(&out);
    let mut submitted: Vec<(String, String)> = of_kind(&ev, "job_submitted")
        .iter()
        .map(|e| {
            (
                e["step"].as_str().unwrap().to_string(),
                e["job_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    submitted.sort();
    let steps: Vec<&str> = submitted.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(steps, ["a", "b", "c"], "{}", text(&out));
    for (step, job) in &submitted {
        let info = scontrol(job);
        assert!(
            info.contains(&format!("JobName=distillery:slurmy:{step} "))
                && info.contains("JobState=COMPLETED"),
            "job {job} of {step}: {info}"
        );
    }
    // The join waited for its inputs: submitted after both finished.
    let pos = |kind: &str, step: &str| {
        ev.iter()
            .position(|e| e["event"] == kind && e["step"] == step)
            .unwrap_or_else(|| panic!("no {kind} for {step}"))
    };
    assert!(pos("job_submitted", "c") > pos("step_finished", "a"));
    assert!(pos("job_submitted", "c") > pos("step_finished", "b"));
    assert_eq!(env.executions(), ["a", "b", "c"]);

    let again = slurm_run(&env, &["--json"]);
    assert!(again.status.success(), "{}", text(&again));
    let ev = events(&again);
    assert!(of_kind(&ev, "job_submitted").is_empty(), "{}", text(&again));
    let fin = of_kind(&ev, "run_finished")[0];
    assert_eq!(
        (fin["ran"].as_u64(), fin["cached"].as_u64()),
        (Some(0), Some(3))
    );
    assert!(env.executions().is_empty());
    // --force reaches the job: the cached step is computed again.
    let forced = slurm_run(&env, &["--force", "b"]);
    assert!(forced.status.success(), "{}", text(&forced));
    assert_eq!(env.executions(), ["b"]);

    // The same recipe run here gives the same keys and the same bytes.
    let local = Env::new();
    local.write("r.toml", THREE);
    local.ok(&["run", "r.toml", "--executor", "local"]);
    assert_eq!(keys_and_outputs(&env), keys_and_outputs(&local));
}

#[test]
fn a_failed_job_shows_its_exit_code_and_log_tail() {
    if !slurm_up() {
        return;
    }
    let env = Env::new();
    env.write("r.toml", THREE);
    let out = slurm_run(&env, &["--set", "steps.a.params.fail=true"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let err = stderr(&out);
    assert!(err.contains("failed, exit code 3:0, log "), "{err}");
    // The tail of the job's own log, where run-step said why.
    assert!(
        err.lines()
            .any(|l| l.trim_start().starts_with("| ") && l.contains("asked to fail")),
        "{err}"
    );
    assert!(!err.contains("submitted c:"), "{err}");
    let ran = env.executions();
    assert!(ran.contains(&"a".to_string()) && !ran.contains(&"c".to_string()));
    assert_eq!(
        std::fs::read_dir(env.cache().join("scratch"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn a_job_ended_by_its_time_limit_is_resubmitted_and_resumes() {
    if !slurm_up() {
        return;
    }
    let env = Env::new();
    // Slurm's smallest limit is a minute; its controller enforces limits every 30 s or so.
    env.write(
        "r.toml",
        r#"
[steps.t]
op = "tick"
params = { seconds = 100 }
resources = { time = "1m" }
"#,
    );
    let started = Instant::now();
    let out = slurm_run(&env, &["--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let ev = events(&out);
    let attempts: Vec<u64> = of_kind(&ev, "job_submitted")
        .iter()
        .map(|e| e["attempt"].as_u64().unwrap())
        .collect();
    assert_eq!(attempts, [1, 2], "{}", text(&out));
    assert!(
        of_kind(&ev, "job_state")
            .iter()
            .any(|e| e["state"] == "timed out"),
        "{}",
        text(&out)
    );
    // The second job started where the first one's checkpoint was, not from zero.
    let starts = env.executions();
    assert_eq!(starts.len(), 2, "{starts:?}");
    let resumed_at: u64 = starts
        .iter()
        .map(|s| s.trim_start_matches("t@").parse::<u64>().unwrap())
        .max()
        .unwrap();
    assert!(resumed_at >= 50, "{starts:?}");
    let shown = env.ok(&["show", "r.toml", "t", "--json"]);
    let dir: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    let counted = std::fs::read_to_string(
        std::path::Path::new(dir["path"].as_str().unwrap()).join("out.txt"),
    )
    .unwrap();
    assert_eq!(counted, format!("counted to 100, resumed at {resumed_at}"));
    eprintln!(
        "time limit and resubmission took {:.0}s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn ctrl_c_cancels_this_runs_jobs_and_only_those() {
    if !slurm_up() {
        return;
    }
    let env = Env::new();
    env.write(
        "r.toml",
        "[steps.slow]\nop = \"emit\"\nparams = { sleep_ms = 120000 }\n",
    );
    let other = Command::new("sbatch")
        .args([
            "--parsable",
            "--job-name=not-ours",
            "--output=/dev/null",
            "--wrap",
            "sleep 120",
        ])
        .output()
        .unwrap();
    let other = String::from_utf8_lossy(&other.stdout).trim().to_string();
    assert!(!other.is_empty());
    let (running, code, err, took) = interrupt_at(&env, |e| {
        e["event"] == "job_state" && e["state"] == "running"
    });
    let ours = running["job_id"].as_str().unwrap().to_string();
    assert_eq!(code, Some(130), "{err}");
    assert!(took < Duration::from_secs(30));
    assert!(
        err.contains(&format!("cancelled the jobs this run submitted: {ours}")),
        "{err}"
    );
    // Slurm takes a moment to record the cancellation.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !scontrol(&ours).contains("JobState=CANCELLED") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        scontrol(&ours).contains("JobState=CANCELLED"),
        "{}",
        scontrol(&ours)
    );
    let theirs = scontrol(&other);
    let _ = Command::new("scancel").arg(&other).status();
    assert!(
        theirs.contains("JobState=RUNNING") || theirs.contains("JobState=PENDING"),
        "{theirs}"
    );
    assert_eq!(entries(&env.cache()), 0);
}

#[test]
fn a_cache_the_nodes_do_not_share_is_refused_before_any_step_is_submitted() {
    if !slurm_up() {
        return;
    }
    // The run sees its own (empty) cache directory in a private mount namespace; the nodes see
    // the real one: what a cache on a node-local disk looks like.
    let private = Command::new("unshare")
        .args(["--mount", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !private {
        eprintln!("skipped: `unshare --mount` is not allowed here (it needs root)");
        return;
    }
    let env = Env::new();
    env.write("r.toml", THREE);
    std::fs::create_dir_all(env.cache()).unwrap();
    let cache = env.cache().to_string_lossy().into_owned();
    let script =
        format!("mount -t tmpfs none '{cache}' && exec '{BIN}' run r.toml --executor slurm --json");
    let out = Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .current_dir(env.path(""))
        .env("DISTILLERY_CACHE", env.cache())
        .env("DISTILLERY_TEST_COUNTER", env.path("counter.txt"))
        .env("DISTILLERY_SLURM_POLL", "0.5")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "the cache directory {cache} is not usable from the compute nodes"
        )) && (err.contains("left no file") || err.contains("without writing its log")),
        "{err}"
    );
    assert!(of_kind(&events(&out), "job_submitted").is_empty());
    assert!(env.executions().is_empty());
}

#[test]
fn executor_settings_are_checked() {
    let env = Env::new();
    env.write(
        "bad.toml",
        "[executor]\nkind = \"slurm\"\npartiton = \"gpu\"\n\n[steps.a]\nop = \"emit\"\nresources = { time = \"soon\" }\n",
    );
    let out = env.run(&["plan", "bad.toml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains("unknown key `partiton` in [executor]") && err.contains("partition"),
        "{err}"
    );
    assert!(err.contains("bad.toml:3:1"), "{err}");
    assert!(err.contains("`soon` is not a time limit"), "{err}");

    env.write("r.toml", "[steps.a]\nop = \"emit\"\n");
    let out = env.run(&["run", "r.toml", "--partition", "gpu"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("--partition applies to the Slurm executor"),
        "{}",
        stderr(&out)
    );

    // Every op is one process on one device: a job holding idle GPUs is refused, before Slurm.
    let out = env.run(&[
        "run",
        "r.toml",
        "--executor",
        "slurm",
        "--set",
        "steps.a.resources.gpus=4",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out)
            .contains("step `a` (emit) declares resources.gpus = 4, but runs 1 process(es), each on one device"),
        "{}",
        stderr(&out)
    );

    let config = env.write("config.toml", "[executor]\nqueue = \"gpu\"\n");
    let out = env
        .command(&["run", "r.toml"])
        .env("DISTILLERY_CONFIG", &config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains(&config.display().to_string()) && stderr(&out).contains("queue"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_job_that_cannot_start_says_why() {
    if !slurm_up() {
        return;
    }
    let env = Env::new();
    // More CPUs than the loopback node declares (16): Slurm keeps the job pending for good.
    env.write(
        "r.toml",
        "[steps.big]\nop = \"emit\"\nresources = { threads = 64 }\n",
    );
    let (state, code, err, _) =
        interrupt_at(&env, |e| e["event"] == "job_state" && e["step"] == "big");
    let _ = Command::new("scancel")
        .arg(state["job_id"].as_str().unwrap())
        .status();
    assert_eq!(code, Some(130), "{err}");
    let reason = state["reason"].as_str().map(String::from);
    // Slurm's word for it (PartitionConfig, or Resources on some versions), not silence.
    let reason = reason.expect("a pending job's reason");
    assert!(!reason.is_empty());
}

#[test]
fn a_job_slurm_refuses_is_the_settings_fault() {
    if !slurm_up() {
        return;
    }
    let env = Env::new();
    env.write("r.toml", THREE);
    let out = slurm_run(&env, &["--partition", "nope"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains("Slurm refused the job") && err.contains("Invalid partition"),
        "{err}"
    );
    assert!(err.contains("= help: check --partition"), "{err}");
    assert!(env.executions().is_empty());
}

/// A data-parallel step is one job of two tasks: `run-step` on the first node starts the ranks
/// with `srun`, they meet through burn-collective, and the result is the bytes two local ranks
/// give (same key: where the ranks run does not change it).
#[test]
fn a_two_rank_step_is_one_job_of_two_tasks_and_matches_local_ranks() {
    if !slurm_up() {
        return;
    }
    let env = Env::new();
    tiny_model_and_text(&env);
    env.write(
        "r.toml",
        &(TINY_SOURCES.replace("[recipe]\n", "[recipe]\nname = \"ranks\"\n")
            + r#"
[steps.tuned]
op = "train"
inputs = { model = "sources.base", data = "sources.text" }
params = { tokens = 1536, seq_len = 32, micro_batch = 1, global_batch = 4, warmup_steps = 2, lr = 1e-3, val_sequences = 4 }
resources = { tasks = 2, threads = 1 }
"#),
    );
    let out = slurm_run(&env, &["--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let ev = events(&out);
    let submitted = of_kind(&ev, "job_submitted");
    assert_eq!(submitted.len(), 1, "{}", text(&out));
    let job = submitted[0]["job_id"].as_str().unwrap().to_string();
    let info = scontrol(&job);
    if !info.is_empty() {
        assert!(
            info.contains("NumTasks=2") || info.contains("NumCPUs=2"),
            "{info}"
        );
    }
    let notes: Vec<String> = of_kind(&ev, "note")
        .iter()
        .map(|e| e["message"].as_str().unwrap_or_default().to_string())
        .collect();
    let shown = |cache: &std::path::Path| {
        let v = show_json(&env, cache, "tuned");
        // `entries/KEY/data`
        let dir = std::path::PathBuf::from(v["path"].as_str().unwrap());
        let key = dir
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        (key, dir)
    };
    let (key, dir) = shown(&env.cache());
    let log = std::fs::read_to_string(
        std::fs::read_dir(env.cache().join("logs/slurm/ranks"))
            .unwrap()
            .filter_map(Result::ok)
            .find(|e| e.file_name().to_string_lossy().ends_with(".log"))
            .unwrap()
            .path(),
    )
    .unwrap();
    assert!(
        log.contains("2 ranks on 1 node(s) through srun"),
        "{log}\n{notes:?}"
    );
    let train: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("train.json")).unwrap()).unwrap();
    assert_eq!(train["ranks"], 2);

    let local = env.path("cache-local");
    let out = env
        .command(&["run", "r.toml"])
        .env("DISTILLERY_CACHE", &local)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let (local_key, local_dir) = shown(&local);
    assert_eq!(key, local_key);
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        std::fs::read(local_dir.join("model.safetensors")).unwrap(),
        "srun ranks and local ranks wrote different weights"
    );
}
