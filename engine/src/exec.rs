//! Runs the steps a plan marks to run: topological, in parallel where the declared resources allow,
//! each under its key's lock, into a partial directory that is committed only on success.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use distillery_cache::{CacheError, CommitInfo, Pin, Store};
use distillery_ops::{Artifact, OpContext, OpRegistry};

use crate::plan::{Plan, PlannedStep, Status, StepRecord, write_record};
use crate::recipe::{Recipe, Ref};
use crate::report::{Event, Reporter, StepProgress};

pub const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");

pub struct RunOptions {
    /// Threads the whole run may use; a step takes `resources.threads` of them (all by default).
    pub jobs: usize,
    pub lock_timeout: Duration,
    /// Who starts the ranks of a step with `resources.tasks > 1`.
    pub launcher: crate::launch::Launcher,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("step `{step}` failed: {message}")]
    StepFailed { step: String, message: String },
    #[error("step `{step}`: {source}")]
    LockTimeout {
        step: String,
        #[source]
        source: CacheError,
    },
    /// The executor could not do its job (Slurm missing, a script could not be written).
    #[error("{message}")]
    Executor { message: String },
    /// The scheduler refused a job as asked (a partition, an account, a resource it lacks).
    #[error("Slurm refused the job: {message}")]
    SubmissionRefused { message: String },
    #[error(
        "the cache directory {dir} is not usable from the compute nodes: {why}\n  = help: put the cache on a filesystem the nodes share (--cache-dir or DISTILLERY_CACHE), and this binary too"
    )]
    CacheNotShared {
        dir: std::path::PathBuf,
        why: String,
    },
    #[error("interrupted; cancelled the jobs this run submitted: {}", if cancelled.is_empty() { "none were running".to_string() } else { cancelled.join(", ") })]
    Interrupted { cancelled: Vec<String> },
    #[error("step `{step}`: {source}")]
    Cache {
        step: String,
        #[source]
        source: CacheError,
    },
}

#[derive(Debug, Default)]
pub struct RunSummary {
    pub ran: Vec<String>,
    pub cached: Vec<String>,
    pub seconds: f64,
}

enum Outcome {
    Ran,
    /// Another process committed it while we waited for the lock.
    CachedMeanwhile,
}

/// Executes the plan's `Run` steps.
pub fn execute(
    recipe: &Recipe,
    plan: &Plan,
    registry: &OpRegistry,
    store: &Store,
    reporter: &dyn Reporter,
    opts: &RunOptions,
) -> Result<RunSummary, RunError> {
    let start = Instant::now();
    if let Ok(swept) = store.sweep_partials() {
        for dir in swept {
            reporter.event(Event::Note {
                step: "cache".into(),
                message: format!(
                    "removed the partial output of an interrupted run: {}",
                    dir.display()
                ),
            });
        }
    }
    let by_index: BTreeMap<usize, &PlannedStep> = plan.steps.iter().map(|p| (p.index, p)).collect();
    let to_run: Vec<&PlannedStep> = plan
        .steps
        .iter()
        .filter(|p| p.status == Status::Run)
        .collect();
    let mut summary = begin_run(recipe, plan, store);
    let jobs = opts.jobs.max(1);
    let need = |p: &PlannedStep| {
        recipe.steps[p.index]
            .resources
            .threads
            .unwrap_or(jobs)
            .clamp(1, jobs)
    };
    let devices = |p: &PlannedStep| recipe.steps[p.index].resources.devices.clone();

    let mut done = settled(plan);
    let mut started: BTreeSet<usize> = BTreeSet::new();
    let mut failure: Option<RunError> = None;
    let (tx, rx) = mpsc::channel::<(usize, Result<Outcome, RunError>, f64)>();

    std::thread::scope(|scope| {
        let mut free = jobs;
        let mut busy_devices: BTreeSet<String> = BTreeSet::new();
        let mut running = 0usize;
        loop {
            if failure.is_none() {
                for p in &to_run {
                    if started.contains(&p.index) {
                        continue;
                    }
                    let deps_done = inputs_done(recipe, p.index, &done);
                    let threads = need(p);
                    let devs = devices(p);
                    if !deps_done || threads > free || devs.iter().any(|d| busy_devices.contains(d))
                    {
                        continue;
                    }
                    free -= threads;
                    busy_devices.extend(devs);
                    started.insert(p.index);
                    running += 1;
                    let tx = tx.clone();
                    let step: &PlannedStep = p;
                    let by_index = &by_index;
                    scope.spawn(move || {
                        let t0 = Instant::now();
                        let r = run_step(
                            recipe, plan, by_index, step, registry, store, reporter, opts, threads,
                        );
                        let _ = tx.send((step.index, r, t0.elapsed().as_secs_f64()));
                    });
                }
            }
            if running == 0 {
                break;
            }
            let (i, result, seconds) = rx.recv().expect("a running step always reports");
            running -= 1;
            let p = by_index[&i];
            free += need(p);
            for d in devices(p) {
                busy_devices.remove(&d);
            }
            match result {
                Ok(outcome) => {
                    done.insert(i);
                    let outcome = match outcome {
                        Outcome::Ran => {
                            summary.ran.push(p.name.clone());
                            "ran"
                        }
                        Outcome::CachedMeanwhile => {
                            summary.cached.push(p.name.clone());
                            "computed by another run"
                        }
                    };
                    reporter.event(Event::StepFinished {
                        step: p.name.clone(),
                        key: p.key.to_hex(),
                        seconds,
                        outcome: outcome.into(),
                    });
                }
                Err(e) => {
                    reporter.event(Event::StepFailed {
                        step: p.name.clone(),
                        error: e.to_string(),
                    });
                    failure.get_or_insert(e);
                }
            }
        }
    });
    end_run(
        recipe,
        plan,
        store,
        reporter,
        &mut summary,
        start,
        failure.is_some(),
    );
    match failure {
        Some(e) => Err(e),
        None => Ok(summary),
    }
}

/// The steps a run does not compute (cached, or not selected): what the steps it runs may read
/// from the start.
pub(crate) fn settled(plan: &Plan) -> BTreeSet<usize> {
    plan.steps
        .iter()
        .filter(|p| p.status != Status::Run)
        .map(|p| p.index)
        .collect()
}

/// Whether every step that step `i` reads from is in `done`.
pub(crate) fn inputs_done(recipe: &Recipe, i: usize, done: &BTreeSet<usize>) -> bool {
    recipe.steps[i].inputs.iter().all(|inp| match inp.target {
        Ref::Step(j) => done.contains(&j),
        Ref::Source(_) => true,
    })
}

/// What every executor does last: the run's time, the recipe's pin on what it produced, and the
/// `run_finished` event.
pub(crate) fn end_run(
    recipe: &Recipe,
    plan: &Plan,
    store: &Store,
    reporter: &dyn Reporter,
    summary: &mut RunSummary,
    start: Instant,
    failed: bool,
) {
    summary.seconds = start.elapsed().as_secs_f64();
    pin_last_run(recipe, plan, store);
    reporter.event(Event::RunFinished {
        ran: summary.ran.len(),
        cached: summary.cached.len(),
        failed: usize::from(failed),
        seconds: summary.seconds,
    });
}

/// What every executor does first: the steps found in the cache count as this recipe's last
/// run of them too (the entry may have come from another recipe), so that the next plan explains
/// changes against them; the summary starts with them as cached.
pub(crate) fn begin_run(recipe: &Recipe, plan: &Plan, store: &Store) -> RunSummary {
    let cached: Vec<&PlannedStep> = plan
        .steps
        .iter()
        .filter(|p| p.status == Status::Cached)
        .collect();
    for p in &cached {
        write_record(store, recipe, &p.name, &record_of(recipe, p));
    }
    RunSummary {
        cached: cached.iter().map(|p| p.name.clone()).collect(),
        ..Default::default()
    }
}

/// What this recipe last produced is what gc keeps while the recipe file exists.
fn pin_last_run(recipe: &Recipe, plan: &Plan, store: &Store) {
    let abs = std::fs::canonicalize(&recipe.path).unwrap_or_else(|_| recipe.path.clone());
    let keys = plan
        .steps
        .iter()
        .filter(|p| store.contains(&p.key))
        .map(|p| p.key)
        .collect();
    let _ = store.pin(
        &format!("recipe:{}", abs.display()),
        &Pin {
            name: format!("last run of {}", abs.display()),
            lock_file: Some(abs),
            keys,
        },
    );
}

/// What `plan` compares the next run of this step against.
fn record_of(recipe: &Recipe, p: &PlannedStep) -> StepRecord {
    let step = &recipe.steps[p.index];
    StepRecord {
        key: p.key,
        op: p.op.clone(),
        op_version: p.op_version,
        params: step.params.to_json(),
        inputs: step
            .inputs
            .iter()
            .filter_map(|i| Some((i.port.clone(), (i.written.clone(), *p.inputs.get(&i.port)?))))
            .collect(),
        seed: p.seed,
        key_scheme: distillery_cache::KEY_SCHEME_VERSION,
    }
}

#[allow(clippy::too_many_arguments)]
fn run_step(
    recipe: &Recipe,
    plan: &Plan,
    by_index: &BTreeMap<usize, &PlannedStep>,
    p: &PlannedStep,
    registry: &OpRegistry,
    store: &Store,
    reporter: &dyn Reporter,
    opts: &RunOptions,
    threads: usize,
) -> Result<Outcome, RunError> {
    let step = &recipe.steps[p.index];
    let cache_err = |source: CacheError| match source {
        CacheError::LockTimeout { .. } => RunError::LockTimeout {
            step: p.name.clone(),
            source,
        },
        source => RunError::Cache {
            step: p.name.clone(),
            source,
        },
    };
    let forced = p.reasons.contains(&crate::plan::Reason::Forced);
    // An entry edited in place is recomputed and replaced, like a forced one.
    let replace = p.reasons.iter().any(|r| {
        matches!(
            r,
            crate::plan::Reason::Forced
                | crate::plan::Reason::ForcedResumed
                | crate::plan::Reason::EntryModified { .. }
        )
    });
    let lock = store
        .lock(&p.key, opts.lock_timeout, &mut |holder| {
            reporter.event(Event::StepWaiting {
                step: p.name.clone(),
                holder: holder.to_string(),
            })
        })
        .map_err(cache_err)?;
    if let Some(dead) = &lock.broken_from {
        reporter.event(Event::Note {
            step: p.name.clone(),
            message: format!("took over the lock of a process that died holding it ({dead})"),
        });
    }
    let record = record_of(recipe, p);
    if !replace && store.contains(&p.key) {
        write_record(store, recipe, &p.name, &record);
        return Ok(Outcome::CachedMeanwhile);
    }
    reporter.event(Event::StepStarted {
        step: p.name.clone(),
        op: p.op.clone(),
        key: p.key.to_hex(),
    });
    let mut inputs = BTreeMap::new();
    for input in &step.inputs {
        let artifact = match input.target {
            Ref::Source(j) if !plan.sources[j].present => continue,
            Ref::Source(j) => plan.sources[j].artifact.clone(),
            Ref::Step(j) => {
                let dep = by_index[&j];
                let entry = store.get(&dep.key).map_err(cache_err)?.ok_or_else(|| {
                    RunError::StepFailed {
                        step: p.name.clone(),
                        message: format!(
                            "input `{}` ({}) vanished from the cache",
                            input.port, input.written
                        ),
                    }
                })?;
                Artifact::dir(dep.kind, entry.data_dir())
            }
        };
        inputs.insert(input.port.clone(), artifact);
    }
    let partial = store.begin(&p.key).map_err(cache_err)?;
    if forced {
        // `--force` recomputes from nothing: checkpoints a killed run left would be resumed.
        store.clear_scratch(&p.key).map_err(cache_err)?;
    }
    let scratch_dir = store.scratch_dir(&p.key).map_err(cache_err)?;
    let progress = StepProgress::new(&p.name, reporter);
    let ctx = OpContext {
        step: &p.name,
        inputs,
        params: step.params.clone(),
        out_dir: partial.data_dir(),
        scratch_dir,
        seed: p.seed,
        threads,
        ranks: distillery_ops::parallel::Ranks::solo(),
        progress: &progress,
        provenance: serde_json::json!({
            "recipe": recipe.name,
            "recipe_file": recipe.path.file_name().map(|f| f.to_string_lossy().to_string()),
            "step": p.name,
            "op": p.op,
            "op_version": p.op_version,
            "key": p.key.to_hex(),
            "params": step.params.to_json(),
            "seed": p.seed,
            "inputs": p.inputs.iter().map(|(k, v)| (k.clone(), v.to_hex())).collect::<BTreeMap<_, _>>(),
            "tool_version": TOOL_VERSION,
        }),
    };
    let started = SystemTime::now();
    let op = registry.get(&p.op).expect("validated op");
    let tasks = step.resources.tasks.unwrap_or(1);
    if tasks > 1 {
        // Data-parallel: the ranks are processes; the first one writes `partial`.
        let mut context = crate::launch::RankContext::of(&p.op, &ctx);
        if opts.launcher == crate::launch::Launcher::Local {
            // Local ranks share this machine's threads; under srun each task has its own CPUs.
            context.threads = (threads / tasks).max(1);
        }
        let launched = crate::launch::run_ranks(
            &context,
            tasks,
            step.resources.nodes.unwrap_or(1),
            opts.launcher,
            &|message| {
                reporter.event(Event::Note {
                    step: p.name.clone(),
                    message: message.to_string(),
                })
            },
        );
        if let Err(message) = launched {
            store.remove_empty_scratch(&p.key);
            return Err(RunError::StepFailed {
                step: p.name.clone(),
                message,
            });
        }
        return commit(store, recipe, p, partial, started, replace, &record, lock);
    }
    let result = catch_unwind(AssertUnwindSafe(|| op.run(&ctx)));
    if !matches!(result, Ok(Ok(()))) {
        store.remove_empty_scratch(&p.key);
    }
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(RunError::StepFailed {
                step: p.name.clone(),
                message: e.to_string(),
            });
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            return Err(RunError::StepFailed {
                step: p.name.clone(),
                message: format!(
                    "op `{}` panicked (a bug in distillery, please report it): {msg}",
                    p.op
                ),
            });
        }
    }
    commit(store, recipe, p, partial, started, replace, &record, lock)
}

/// Commits a step's finished output and records it.
#[allow(clippy::too_many_arguments)]
fn commit(
    store: &Store,
    recipe: &Recipe,
    p: &PlannedStep,
    partial: distillery_cache::Partial,
    started: SystemTime,
    replace: bool,
    record: &StepRecord,
    lock: distillery_cache::KeyLock,
) -> Result<Outcome, RunError> {
    let step = &recipe.steps[p.index];
    let cache_err = |source: CacheError| RunError::Cache {
        step: p.name.clone(),
        source,
    };
    let info = CommitInfo {
        op: p.op.clone(),
        op_version: p.op_version,
        step: p.name.clone(),
        params: step.params.to_json(),
        inputs: p.inputs.clone(),
        tool_version: TOOL_VERSION.to_string(),
        started: Some(started),
    };
    if replace {
        partial.commit_replacing(info)
    } else {
        partial.commit(info)
    }
    .map_err(cache_err)?;
    write_record(store, recipe, &p.name, record);
    drop(lock);
    Ok(Outcome::Ran)
}
