//! Data-parallel steps: one process per rank, all running `distillery rank` on the same context
//! file. The ranks are started here (local ranks on this machine), or by Slurm's `srun` inside the
//! step's job. The step fails as soon as one rank does, naming it and its host, and the others are
//! stopped; only the first rank's output is committed, by the caller.

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use distillery_ops::{Artifact, ArtifactKind, OpContext, ParamValue, Params};
use serde_json::{Value, json};

/// Who starts the ranks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Launcher {
    /// Child processes of this one, on this machine.
    #[default]
    Local,
    /// `srun`, inside a Slurm job that holds the ranks' tasks.
    Srun,
}

/// What every rank needs to run the op: the step's context, written once by the launcher.
pub struct RankContext {
    pub op: String,
    pub step: String,
    pub params: Params,
    pub inputs: BTreeMap<String, Artifact>,
    pub seed: Option<u64>,
    pub threads: usize,
    /// The first rank's output directory (the partial entry the launcher commits).
    pub out_dir: PathBuf,
    pub scratch_dir: PathBuf,
    pub provenance: Value,
}

fn param_of(v: &Value) -> Option<ParamValue> {
    Some(match v {
        Value::Bool(b) => ParamValue::Bool(*b),
        Value::Number(n) if n.is_i64() => ParamValue::Int(n.as_i64()?),
        Value::Number(n) => ParamValue::Float(n.as_f64()?),
        Value::String(s) => ParamValue::Str(s.clone()),
        Value::Array(a) => ParamValue::List(a.iter().map(param_of).collect::<Option<_>>()?),
        _ => return None,
    })
}

impl RankContext {
    pub fn to_json(&self) -> Value {
        let inputs: serde_json::Map<String, Value> = self
            .inputs
            .iter()
            .map(|(port, a)| {
                (
                    port.clone(),
                    json!({"kind": ArtifactKind::name(a.kind), "path": a.path, "files": a.files,
                           "options": a.options}),
                )
            })
            .collect();
        json!({
            "op": self.op, "step": self.step, "params": self.params.to_json(),
            "inputs": inputs, "seed": self.seed, "threads": self.threads,
            "out_dir": self.out_dir, "scratch_dir": self.scratch_dir,
            "provenance": self.provenance,
        })
    }

    pub fn from_json(v: &Value) -> Option<RankContext> {
        let path = |v: &Value| v.as_str().map(PathBuf::from);
        let params = v["params"]
            .as_object()?
            .iter()
            .map(|(k, v)| Some((k.clone(), param_of(v)?)))
            .collect::<Option<BTreeMap<_, _>>>()?;
        let inputs = v["inputs"]
            .as_object()?
            .iter()
            .map(|(port, a)| {
                Some((
                    port.clone(),
                    Artifact {
                        kind: ArtifactKind::parse(a["kind"].as_str()?)?,
                        path: path(&a["path"])?,
                        files: a["files"]
                            .as_array()?
                            .iter()
                            .map(path)
                            .collect::<Option<_>>()?,
                        options: serde_json::from_value(a["options"].clone()).ok()?,
                    },
                ))
            })
            .collect::<Option<BTreeMap<_, _>>>()?;
        Some(RankContext {
            op: v["op"].as_str()?.into(),
            step: v["step"].as_str()?.into(),
            params: Params(params),
            inputs,
            seed: v["seed"].as_u64(),
            threads: v["threads"].as_u64()? as usize,
            out_dir: path(&v["out_dir"])?,
            scratch_dir: path(&v["scratch_dir"])?,
            provenance: v["provenance"].clone(),
        })
    }

    /// The context of one step's run, from the in-process one the executor built.
    pub fn of(op: &str, ctx: &OpContext) -> RankContext {
        RankContext {
            op: op.into(),
            step: ctx.step.into(),
            params: ctx.params.clone(),
            inputs: ctx.inputs.clone(),
            seed: ctx.seed,
            threads: ctx.threads,
            out_dir: ctx.out_dir.clone(),
            scratch_dir: ctx.scratch_dir.clone(),
            provenance: ctx.provenance.clone(),
        }
    }
}

/// The last `n` lines of a log, for a failure message.
fn tail(path: &Path, n: usize) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let mut text = String::new();
    let _ = f.read_to_string(&mut text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => "ended".into(),
    }
}

/// Runs the step's `tasks` ranks to completion. Rank logs go in the session's directory
/// (`SCRATCH/parallel/SESSION/rank-R.log`). Returns the failure, worded, when a rank fails: the
/// first to fail is named with its host, exit and log tail, and the others are stopped.
pub fn run_ranks(
    ctx: &RankContext,
    tasks: usize,
    nodes: usize,
    launcher: Launcher,
    on_started: &dyn Fn(&str),
) -> Result<(), String> {
    let session = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let dir = ctx.scratch_dir.join("parallel").join(&session);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let context = dir.join("context.json");
    std::fs::write(&context, ctx.to_json().to_string())
        .map_err(|e| format!("{}: {e}", context.display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("this executable's path: {e}"))?;
    let result = match launcher {
        Launcher::Local if nodes > 1 => Err(format!(
            "resources.nodes = {nodes}: the local executor runs every rank on this machine; run it with --executor slurm, or set nodes = 1"
        )),
        Launcher::Local => local(&exe, &context, &session, &dir, tasks, on_started),
        Launcher::Srun => srun(&exe, &context, &session, &dir, tasks, nodes, on_started),
    };
    if result.is_ok() {
        // The session's rendezvous files and logs served their purpose; a failed one stays for
        // reading.
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn rank_log(dir: &Path, rank: usize) -> PathBuf {
    dir.join(format!("rank-{rank}.log"))
}

fn local(
    exe: &Path,
    context: &Path,
    session: &str,
    dir: &Path,
    tasks: usize,
    on_started: &dyn Fn(&str),
) -> Result<(), String> {
    let host = distillery_cache::store::hostname();
    let mut children: Vec<Child> = Vec::new();
    let stop = |children: &mut Vec<Child>| {
        for c in children.iter_mut() {
            let _ = c.kill();
        }
        for c in children.iter_mut() {
            let _ = c.wait();
        }
    };
    for rank in 0..tasks {
        let log = rank_log(dir, rank);
        let out = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let mut cmd = Command::new(exe);
        if cfg!(feature = "cuda") {
            // One GPU per rank: the rank-th of those this process may use.
            let visible: Vec<String> = std::env::var("CUDA_VISIBLE_DEVICES")
                .ok()
                .filter(|v| !v.trim().is_empty())
                .map(|v| v.split(',').map(|d| d.trim().to_string()).collect())
                .unwrap_or_else(|| (0..tasks).map(|d| d.to_string()).collect());
            let Some(gpu) = visible.get(rank) else {
                stop(&mut children);
                return Err(format!(
                    "{tasks} ranks, one GPU each, but CUDA_VISIBLE_DEVICES names {}: use as many tasks as GPUs",
                    visible.len()
                ));
            };
            cmd.env("CUDA_VISIBLE_DEVICES", gpu);
        }
        cmd.arg("rank")
            .arg("--context")
            .arg(context)
            .env("DISTILLERY_RANK", rank.to_string())
            .env("DISTILLERY_WORLD_SIZE", tasks.to_string())
            .env("DISTILLERY_LOCAL_RANK", rank.to_string())
            .env("DISTILLERY_RANK_SESSION", session)
            .env("DISTILLERY_COLLECTIVE_HOST", "127.0.0.1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: prctl is async-signal-safe; a rank dies with the thread that launched it, so a
        // killed `distillery run` leaves no rank behind.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(c) => {
                on_started(&format!(
                    "rank {rank} of {tasks}: pid {} on {host}, log {}",
                    c.id(),
                    log.display()
                ));
                children.push(c);
            }
            Err(e) => {
                stop(&mut children);
                return Err(format!("could not start rank {rank}: {e}"));
            }
        }
    }
    let mut done = vec![false; tasks];
    loop {
        for rank in 0..tasks {
            if done[rank] {
                continue;
            }
            match children[rank].try_wait() {
                Ok(Some(status)) if status.success() => done[rank] = true,
                Ok(Some(status)) => {
                    let (failed, running) = settle(&mut children, rank, status);
                    stop(&mut children);
                    let lost = distillery_ops::parallel::PEERS_LOST_EXIT;
                    if !running.is_empty() && failed.iter().all(|(_, s)| s.code() == Some(lost)) {
                        // The ranks that ended gave up waiting for the ones still running.
                        let hung: Vec<String> = running.iter().map(|r| r.to_string()).collect();
                        return Err(format!(
                            "rank {} of {tasks} (on {host}) stopped answering: rank {rank} waited longer than its collective timeout (DISTILLERY_COLLECTIVE_TIMEOUT) for it; stopped all ranks. Rank {rank}'s log ({}) ends:\n{}",
                            hung.join(", "),
                            rank_log(dir, rank).display(),
                            tail(&rank_log(dir, rank), 5)
                        ));
                    }
                    let (culprit, status) = culprit(&failed);
                    return Err(format!(
                        "rank {culprit} of {tasks} (pid {}, on {host}) {}; stopped the other ranks. Its log ({}) ends:\n{}",
                        children[culprit].id(),
                        describe(status),
                        rank_log(dir, culprit).display(),
                        tail(&rank_log(dir, culprit), 15)
                    ));
                }
                Ok(None) => {}
                Err(e) => {
                    stop(&mut children);
                    return Err(format!("waiting for rank {rank}: {e}"));
                }
            }
        }
        if done.iter().all(|d| *d) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The ranks that failed once rank `first` did, and those still running: the others get 3 s to
/// end on their own (those that lost their peers because of it do), so that the cause is among
/// them.
fn settle(
    children: &mut [Child],
    first: usize,
    status: ExitStatus,
) -> (Vec<(usize, ExitStatus)>, Vec<usize>) {
    let mut failed = vec![(first, status)];
    let t0 = Instant::now();
    loop {
        let mut running = Vec::new();
        for (rank, c) in children.iter_mut().enumerate() {
            if failed.iter().any(|(r, _)| *r == rank) {
                continue;
            }
            match c.try_wait() {
                Ok(Some(s)) if !s.success() => failed.push((rank, s)),
                Ok(None) => running.push(rank),
                _ => {}
            }
        }
        if running.is_empty() || t0.elapsed() > Duration::from_secs(3) {
            return (failed, running);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Which failed rank caused the others to fail: one killed by a signal, else one that failed on
/// its own (not by losing its peers), else the first seen.
fn culprit(failed: &[(usize, ExitStatus)]) -> (usize, ExitStatus) {
    use std::os::unix::process::ExitStatusExt;
    let lost = distillery_ops::parallel::PEERS_LOST_EXIT;
    failed
        .iter()
        .filter(|(_, s)| s.signal().is_some())
        .chain(
            failed
                .iter()
                .filter(|(_, s)| s.code().is_some_and(|c| c != lost)),
        )
        .chain(failed.iter())
        .next()
        .copied()
        .expect("a failed rank")
}

fn srun(
    exe: &Path,
    context: &Path,
    session: &str,
    dir: &Path,
    tasks: usize,
    nodes: usize,
    on_started: &dyn Fn(&str),
) -> Result<(), String> {
    let mut cmd = Command::new("srun");
    cmd.arg(format!("--ntasks={tasks}"))
        .arg(format!("--nodes={nodes}"))
        // One rank dying ends the others at once instead of leaving them waiting for it.
        .arg("--kill-on-bad-exit=1")
        .arg(format!("--output={}", dir.join("rank-%t.log").display()));
    if let Ok(c) = std::env::var("SLURM_CPUS_PER_TASK") {
        // srun does not take the allocation's cpus-per-task from the environment (Slurm ≥ 22.05).
        cmd.arg(format!("--cpus-per-task={c}"));
    }
    cmd.arg(exe)
        .arg("rank")
        .arg("--context")
        .arg(context)
        .env("DISTILLERY_RANK_SESSION", session)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("could not run srun: {e}"))?;
    on_started(&format!(
        "{tasks} ranks on {nodes} node(s) through srun (job {}), logs {}",
        std::env::var("SLURM_JOB_ID").unwrap_or_default(),
        dir.join("rank-R.log").display()
    ));
    let mut said = Vec::new();
    if let Some(err) = child.stderr.take() {
        for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("{line}");
            said.push(line);
        }
    }
    let status = child.wait().map_err(|e| format!("waiting for srun: {e}"))?;
    if status.success() {
        return Ok(());
    }
    // srun says which task failed first: `srun: error: HOST: task 1: Killed`.
    let culprit = said.iter().find_map(|l| {
        let rest = l.strip_prefix("srun: error: ")?;
        let (host, rest) = rest.split_once(": task ")?;
        let (task, what) = rest.split_once(": ")?;
        let rank: usize = task.split(['-', ',']).next()?.trim().parse().ok()?;
        Some((rank, host.to_string(), what.to_string()))
    });
    let lost = format!(
        "Exited with exit code {}",
        distillery_ops::parallel::PEERS_LOST_EXIT
    );
    Err(match culprit {
        Some((rank, host, what)) if what.trim() == lost => format!(
            "rank {rank} of {tasks} (on {host}) gave up waiting for the other ranks in a collective, after {:.0} s: another rank hung or died without srun noticing; srun stopped them all. The ranks' logs are {}",
            t0.elapsed().as_secs_f64(),
            dir.join("rank-R.log").display()
        ),
        Some((rank, host, what)) => format!(
            "rank {rank} of {tasks} (on {host}): {what}, after {:.0} s; srun stopped the other ranks. Its log ({}) ends:\n{}",
            t0.elapsed().as_secs_f64(),
            dir.join(format!("rank-{rank}.log")).display(),
            tail(&dir.join(format!("rank-{rank}.log")), 15)
        ),
        None => format!(
            "srun {}; it said:\n{}",
            describe(status),
            said.iter()
                .rev()
                .take(15)
                .rev()
                .map(|l| format!("    {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        ),
    })
}

/// This process's rank, from the local launcher's variables or Slurm's (`SLURM_PROCID`,
/// `SLURM_NTASKS`, `SLURM_LOCALID`); `None` when neither says.
pub fn ranks_from_env() -> Option<distillery_ops::parallel::Ranks> {
    let var = |n: &str| std::env::var(n).ok().and_then(|v| v.parse::<usize>().ok());
    let (rank, world, local) = match (var("DISTILLERY_RANK"), var("DISTILLERY_WORLD_SIZE")) {
        (Some(r), Some(w)) => (r, w, var("DISTILLERY_LOCAL_RANK").unwrap_or(r)),
        _ => (
            var("SLURM_PROCID")?,
            var("SLURM_NTASKS")?,
            var("SLURM_LOCALID").unwrap_or(0),
        ),
    };
    Some(distillery_ops::parallel::Ranks {
        rank,
        world,
        local_rank: local,
        session: std::env::var("DISTILLERY_RANK_SESSION").unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_survives_its_file() {
        let mut params = BTreeMap::new();
        params.insert("lr".to_string(), ParamValue::Float(1e-4));
        params.insert("steps".to_string(), ParamValue::Int(3));
        params.insert(
            "layers".to_string(),
            ParamValue::List(vec![ParamValue::Str("a".into()), ParamValue::Bool(true)]),
        );
        params.insert("whole".to_string(), ParamValue::Float(2.0));
        let mut inputs = BTreeMap::new();
        inputs.insert(
            "model".to_string(),
            Artifact::dir(ArtifactKind::Model, PathBuf::from("/c/m")),
        );
        let ctx = RankContext {
            op: "train".into(),
            step: "fit".into(),
            params: Params(params),
            inputs,
            seed: Some(7),
            threads: 2,
            out_dir: "/o".into(),
            scratch_dir: "/s".into(),
            provenance: json!({"key": "abc"}),
        };
        let back = RankContext::from_json(&ctx.to_json()).unwrap();
        assert_eq!(back.params, ctx.params);
        assert_eq!(back.inputs["model"].path, PathBuf::from("/c/m"));
        assert_eq!(back.inputs["model"].kind, ArtifactKind::Model);
        assert_eq!(back.seed, Some(7));
        assert_eq!(back.provenance, ctx.provenance);
    }
}
