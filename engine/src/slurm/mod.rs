//! The Slurm executor: each step a plan marks to run becomes one batch job running
//! `distillery run-step` on a compute node, submitted once the steps it needs are in the cache.
//! Independent steps are in the queue at once; cached steps are never submitted. The cache (and
//! the recipe's sources) must be on a filesystem the nodes share: a probe job checks that before
//! anything else is submitted.
//!
//! Jobs are submitted as their inputs complete rather than chained with `--dependency=afterok`:
//! a job ended by its time limit, a preemption or a node failure is resubmitted as a new job (it
//! resumes from its step's scratch checkpoint), and dependents chained to the first job's id
//! would never start.

pub mod command;
pub mod job;
pub mod settings;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use distillery_cache::Store;

use crate::exec::{RunError, RunSummary, pin_last_run, record_cached};
use crate::plan::{Plan, PlannedStep, Status};
use crate::recipe::{Recipe, Ref};
use crate::report::{Event, Reporter};
use command::{SlurmError, job_info, sbatch, scancel};
use job::{JobSpec, JobState};
use settings::ExecutorSettings;

/// Resubmissions of a job ended by its time limit, a preemption or a node failure, by default.
pub const DEFAULT_MAX_REQUEUE: u32 = 2;

/// How a run goes through Slurm.
pub struct SlurmRun<'a> {
    pub settings: ExecutorSettings,
    /// The binary the jobs run: this one, which the compute nodes must see at the same path.
    pub exe: PathBuf,
    /// The recipe and its `--set` overrides as `run` got them: `run-step` loads the same recipe.
    pub recipe_file: PathBuf,
    pub overrides: Vec<String>,
    /// Seconds `run-step` waits for another run's lock.
    pub lock_timeout: u64,
    /// How often job states are read.
    pub poll: Duration,
    /// Set by SIGINT/SIGTERM: cancel the jobs this run submitted and stop.
    pub interrupted: &'a AtomicBool,
}

/// Where a run's job scripts and logs go: beside the cache, which the nodes share.
fn log_dir(store: &Store, recipe: &Recipe) -> PathBuf {
    let name: String = recipe
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    store.root().join("logs").join("slurm").join(name)
}

/// Where `cache probe TOKEN` writes (on a node) and the executor looks (here).
pub fn probe_path(store: &Store, token: &str) -> PathBuf {
    store.state_dir().join("probes").join(token)
}

/// The last `lines` lines of a job's log (empty when it has none yet).
pub fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read(log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// One job of a step.
struct Attempt {
    job: String,
    log: PathBuf,
    state: JobState,
    attempt: u32,
    running_since: Option<Instant>,
    /// Whether `step_started` was reported.
    started: bool,
    submitted: Instant,
    /// Polls in a row in which Slurm knew nothing of the job.
    unknown: u32,
}

impl SlurmRun<'_> {
    fn max_requeue(&self) -> u32 {
        self.settings.max_requeue.unwrap_or(DEFAULT_MAX_REQUEUE)
    }

    fn extra_args(&self) -> Vec<String> {
        self.settings.sbatch_args.clone().unwrap_or_default()
    }

    /// The job of step `p`, its `attempt`-th (1 for the first).
    fn spec(&self, recipe: &Recipe, store: &Store, p: &PlannedStep, attempt: u32) -> JobSpec {
        let step = &recipe.steps[p.index];
        let r = &step.resources;
        let mut command = vec![
            self.exe.to_string_lossy().into_owned(),
            "--cache-dir".into(),
            store.root().to_string_lossy().into_owned(),
            "run-step".into(),
            self.recipe_file.to_string_lossy().into_owned(),
            "--step".into(),
            p.name.clone(),
            "--key".into(),
            p.key.to_hex(),
            "--lock-timeout".into(),
            self.lock_timeout.to_string(),
        ];
        if let Some(t) = r.threads {
            command.extend(["--jobs".into(), t.to_string()]);
        }
        // `--force` recomputes from nothing once; a resubmission resumes what that run began.
        if attempt == 1 && p.reasons.contains(&crate::plan::Reason::Forced) {
            command.push("--force".into());
        }
        for s in &self.overrides {
            command.extend(["--set".into(), s.clone()]);
        }
        JobSpec {
            name: format!("distillery:{}:{}", recipe.name, p.name),
            log: log_dir(store, recipe).join(format!("{}-%j.log", p.name)),
            workdir: std::env::current_dir().unwrap_or_else(|_| recipe.dir()),
            cpus: r.threads,
            gpus: r.gpus,
            memory: r.memory,
            time: r.time.or(self.settings.time),
            partition: self.settings.partition.clone(),
            account: self.settings.account.clone(),
            command,
        }
    }

    fn submit(&self, spec: &JobSpec, script_path: &Path) -> Result<String, RunError> {
        std::fs::create_dir_all(script_path.parent().expect("a file in the log directory"))
            .and_then(|()| std::fs::write(script_path, spec.script()))
            .map_err(|e| RunError::Executor {
                message: format!("cannot write the job script {}: {e}", script_path.display()),
            })?;
        Ok(sbatch(script_path, &self.extra_args(), false)?)
    }

    /// Sleeps `d`, waking early when interrupted.
    fn pause(&self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end && !self.interrupted.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100).min(end - Instant::now()));
        }
    }

    /// Runs a one-minute job that writes a file into the cache and checks, from here, that it
    /// arrived: the nodes see the cache at the same path and may write into it, and they can run
    /// this binary.
    fn probe(&self, store: &Store, reporter: &dyn Reporter) -> Result<(), RunError> {
        let token = format!(
            "{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        let dir = store.root().join("logs").join("slurm").join("probe");
        let spec = JobSpec {
            name: "distillery:probe".into(),
            log: dir.join(format!("{token}.log")),
            workdir: std::env::current_dir().unwrap_or_else(|_| dir.clone()),
            cpus: None,
            gpus: None,
            memory: None,
            time: Some(60),
            partition: self.settings.partition.clone(),
            account: self.settings.account.clone(),
            command: vec![
                self.exe.to_string_lossy().into_owned(),
                "--cache-dir".into(),
                store.root().to_string_lossy().into_owned(),
                "cache".into(),
                "probe".into(),
                token.clone(),
            ],
        };
        let job = self.submit(&spec, &dir.join(format!("{token}.sbatch")))?;
        reporter.event(Event::Note {
            step: "slurm".into(),
            message: format!(
                "job {job} checks that the compute nodes see the cache {}",
                store.root().display()
            ),
        });
        let info = loop {
            if self.interrupted.load(Ordering::Relaxed) {
                let _ = scancel(std::slice::from_ref(&job));
                return Err(RunError::Interrupted {
                    cancelled: vec![job],
                });
            }
            match job_info(&job)? {
                Some(i) if i.state.is_finished() => break Some(i),
                None => break None,
                _ => self.pause(self.poll),
            }
        };
        let answer = probe_path(store, &token);
        let seen = std::fs::read_to_string(&answer).ok();
        let _ = std::fs::remove_file(&answer);
        let _ = std::fs::remove_file(dir.join(format!("{token}.sbatch")));
        match (seen, info) {
            (Some(_), Some(i)) if i.state == JobState::Completed => {
                let _ = std::fs::remove_file(&spec.log);
                Ok(())
            }
            (seen, info) => {
                let how = match info {
                    Some(i) => format!(
                        "it ended {}{}",
                        i.state.name(),
                        i.exit_code
                            .map(|c| format!(" (exit code {c})"))
                            .unwrap_or_default()
                    ),
                    None => "Slurm lost track of it".into(),
                };
                let why = if seen.is_some() {
                    format!("probe job {job} wrote into the cache, but {how}")
                } else {
                    format!(
                        "probe job {job} ({how}) left no file in {} as seen from here",
                        store.root().display()
                    )
                };
                let tail = log_tail(&spec.log, 10);
                Err(RunError::CacheNotShared {
                    dir: store.root().to_path_buf(),
                    why: if tail.is_empty() {
                        format!("{why}; it wrote no log at {}", spec.log.display())
                    } else {
                        format!("{why}; its log {}:\n{tail}", spec.log.display())
                    },
                })
            }
        }
    }

    /// Executes the plan's `Run` steps as Slurm jobs and waits for them.
    ///
    /// # Errors
    /// Slurm refusing a job, the cache not shared with the nodes, a step's job failing (after
    /// its resubmissions), or an interrupt (the jobs this run submitted are cancelled).
    pub fn execute(
        &self,
        recipe: &Recipe,
        plan: &Plan,
        store: &Store,
        reporter: &dyn Reporter,
    ) -> Result<RunSummary, RunError> {
        let start = Instant::now();
        record_cached(recipe, plan, store);
        let mut summary = RunSummary {
            cached: plan
                .steps
                .iter()
                .filter(|p| p.status == Status::Cached)
                .map(|p| p.name.clone())
                .collect(),
            ..Default::default()
        };
        let to_run: Vec<&PlannedStep> = plan
            .steps
            .iter()
            .filter(|p| p.status == Status::Run)
            .collect();
        let result = if to_run.is_empty() {
            Ok(())
        } else {
            self.probe(store, reporter)
                .and_then(|()| self.run_jobs(recipe, plan, &to_run, store, reporter, &mut summary))
        };
        summary.seconds = start.elapsed().as_secs_f64();
        pin_last_run(recipe, plan, store);
        reporter.event(Event::RunFinished {
            ran: summary.ran.len(),
            cached: summary.cached.len(),
            failed: usize::from(result.is_err()),
            seconds: summary.seconds,
        });
        result.map(|()| summary)
    }

    fn run_jobs(
        &self,
        recipe: &Recipe,
        plan: &Plan,
        to_run: &[&PlannedStep],
        store: &Store,
        reporter: &dyn Reporter,
        summary: &mut RunSummary,
    ) -> Result<(), RunError> {
        let by_index: BTreeMap<usize, &PlannedStep> =
            plan.steps.iter().map(|p| (p.index, p)).collect();
        let mut done: BTreeSet<usize> = plan
            .steps
            .iter()
            .filter(|p| p.status != Status::Run)
            .map(|p| p.index)
            .collect();
        let mut started: BTreeSet<usize> = BTreeSet::new();
        let mut active: BTreeMap<usize, Attempt> = BTreeMap::new();
        let mut failure: Option<RunError> = None;
        let submit = |p: &PlannedStep, attempt: u32| -> Result<Attempt, RunError> {
            let spec = self.spec(recipe, store, p, attempt);
            let script = log_dir(store, recipe).join(format!("{}.sbatch", p.name));
            let job = self.submit(&spec, &script)?;
            let log = PathBuf::from(spec.log.to_string_lossy().replace("%j", &job));
            reporter.event(Event::JobSubmitted {
                step: p.name.clone(),
                job_id: job.clone(),
                log: log.display().to_string(),
                attempt,
            });
            Ok(Attempt {
                job,
                log,
                state: JobState::Pending,
                attempt,
                running_since: None,
                started: false,
                submitted: Instant::now(),
                unknown: 0,
            })
        };
        loop {
            if self.interrupted.load(Ordering::Relaxed) {
                let ids: Vec<String> = active.values().map(|a| a.job.clone()).collect();
                let cancel = scancel(&ids);
                for (i, a) in &active {
                    reporter.event(Event::StepFailed {
                        step: by_index[i].name.clone(),
                        error: format!("interrupted: job {} cancelled", a.job),
                    });
                }
                cancel?;
                return Err(RunError::Interrupted { cancelled: ids });
            }
            if failure.is_none() {
                for p in to_run {
                    let ready = recipe.steps[p.index]
                        .inputs
                        .iter()
                        .all(|inp| match inp.target {
                            Ref::Step(j) => done.contains(&j),
                            Ref::Source(_) => true,
                        });
                    if started.contains(&p.index) || !ready {
                        continue;
                    }
                    started.insert(p.index);
                    match submit(p, 1) {
                        Ok(a) => {
                            active.insert(p.index, a);
                        }
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                }
            }
            if active.is_empty() {
                break;
            }
            self.pause(self.poll);
            if self.interrupted.load(Ordering::Relaxed) {
                continue;
            }
            let indices: Vec<usize> = active.keys().copied().collect();
            for i in indices {
                let p = by_index[&i];
                let a = active.get_mut(&i).expect("active");
                let Some(info) = job_info(&a.job)? else {
                    a.unknown += 1;
                    if a.unknown >= 3 {
                        let a = active.remove(&i).expect("active");
                        let e = RunError::StepFailed {
                            step: p.name.clone(),
                            message: format!(
                                "Slurm no longer knows job {} (purged from the controller, and no accounting); its log: {}",
                                a.job,
                                a.log.display()
                            ),
                        };
                        reporter.event(Event::StepFailed {
                            step: p.name.clone(),
                            error: e.to_string(),
                        });
                        failure.get_or_insert(e);
                    }
                    continue;
                };
                a.unknown = 0;
                if info.state != a.state {
                    a.state = info.state;
                    // As a local run says a step started: when its job first runs (or ends
                    // before a poll saw it run).
                    if info.state == JobState::Running && a.running_since.is_none() {
                        a.running_since = Some(Instant::now());
                    }
                    if info.state != JobState::Pending && !a.started {
                        a.started = true;
                        reporter.event(Event::StepStarted {
                            step: p.name.clone(),
                            op: p.op.clone(),
                            key: p.key.to_hex(),
                        });
                    }
                    reporter.event(Event::JobState {
                        step: p.name.clone(),
                        job_id: a.job.clone(),
                        state: info.state.name().into(),
                        reason: info
                            .reason
                            .clone()
                            .filter(|_| info.state != JobState::Running),
                        nodes: info
                            .nodes
                            .clone()
                            .filter(|_| info.state == JobState::Running),
                    });
                }
                if !info.state.is_finished() {
                    continue;
                }
                let a = active.remove(&i).expect("active");
                let seconds = a
                    .running_since
                    .unwrap_or(a.submitted)
                    .elapsed()
                    .as_secs_f64();
                let exit = info
                    .exit_code
                    .as_deref()
                    .map(|c| format!(", exit code {c}"))
                    .unwrap_or_default();
                match info.state {
                    JobState::Completed if store.contains(&p.key) => {
                        done.insert(i);
                        summary.ran.push(p.name.clone());
                        reporter.event(Event::StepFinished {
                            step: p.name.clone(),
                            key: p.key.to_hex(),
                            seconds,
                            outcome: format!("ran as job {}", a.job),
                        });
                    }
                    state if state.is_requeueable() && a.attempt <= self.max_requeue() => {
                        reporter.event(Event::Note {
                            step: p.name.clone(),
                            message: format!(
                                "job {} {}{exit}; submitting it again ({} of {} resubmissions), it resumes from its checkpoint",
                                a.job,
                                state.name(),
                                a.attempt,
                                self.max_requeue()
                            ),
                        });
                        match submit(p, a.attempt + 1) {
                            Ok(next) => {
                                active.insert(i, next);
                            }
                            Err(e) => {
                                failure.get_or_insert(e);
                            }
                        }
                    }
                    state => {
                        let what = if state == JobState::Completed {
                            "completed but committed nothing".to_string()
                        } else if state.is_requeueable() {
                            format!(
                                "{} again after {} resubmissions",
                                state.name(),
                                self.max_requeue()
                            )
                        } else {
                            state.name().to_string()
                        };
                        let tail = log_tail(&a.log, 20);
                        let tail = if tail.is_empty() {
                            " (the log is empty)".to_string()
                        } else {
                            format!(
                                "; its log ends:\n{}",
                                tail.lines()
                                    .map(|l| format!("    | {l}"))
                                    .collect::<Vec<_>>()
                                    .join("\n")
                            )
                        };
                        let e = RunError::StepFailed {
                            step: p.name.clone(),
                            message: format!(
                                "job {} {what}{exit}, log {}{tail}",
                                a.job,
                                a.log.display()
                            ),
                        };
                        reporter.event(Event::StepFailed {
                            step: p.name.clone(),
                            error: e.to_string(),
                        });
                        failure.get_or_insert(e);
                    }
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl From<SlurmError> for RunError {
    fn from(e: SlurmError) -> Self {
        RunError::Executor {
            message: e.to_string(),
        }
    }
}

/// Set by the SIGINT/SIGTERM handler [`catch_interrupts`] installs.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C (and SIGTERM) set [`INTERRUPTED`] instead of ending the process, so that the
/// executor cancels the jobs it submitted before it exits.
pub fn catch_interrupts() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_interrupt as *const () as libc::sighandler_t,
        );
    }
}
