//! The Slurm executor: each step a plan marks to run becomes one batch job running
//! `distillery run-step` on a compute node, submitted once the steps it needs are in the cache.
//! Independent steps are in the queue at once; cached steps are never submitted. The cache, the
//! recipe with its sources and this binary must be on a filesystem the nodes share: a probe job
//! checks the cache and the binary before anything else is submitted (a source a node sees
//! differently gives its step another key there, which `run-step` refuses).
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

use crate::exec::{RunError, RunSummary, begin_run, end_run, inputs_done, settled};
use crate::plan::{Plan, PlannedStep, Reason, Status};
use crate::recipe::Recipe;
use crate::report::{Event, Reporter};
use command::{SlurmError, job_info, sbatch, scancel};
use job::{JobInfo, JobSpec, JobState};
use settings::ExecutorSettings;

/// Resubmissions of a job ended by its time limit, a preemption or a node failure, by default.
pub const DEFAULT_MAX_REQUEUE: u32 = 2;

/// How long a finished job's output may take to show here.
const VISIBILITY_GRACE: Duration = Duration::from_secs(30);

/// Polls in a row that a job may go unanswered (Slurm erring, or not knowing it) before its
/// step counts as failed.
const UNANSWERED_POLLS: u32 = 5;

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

/// Steps to run whose `resources` ask for more GPUs than they can use: a process drives one
/// device, and a step runs `resources.tasks` processes (one unless it is data-parallel), so
/// `gpus = 8` without `tasks = 8` would hold seven GPUs idle. One line per step, empty when all
/// fit.
pub fn oversized_steps(recipe: &Recipe, plan: &Plan) -> Vec<String> {
    plan.steps
        .iter()
        .filter(|p| p.status == Status::Run)
        .filter_map(|p| {
            let r = &recipe.steps[p.index].resources;
            let (gpus, tasks) = (r.gpus?, r.tasks.unwrap_or(1));
            (gpus > tasks).then(|| {
                format!(
                    "step `{}` ({}) declares resources.gpus = {gpus}, but runs {tasks} process(es), each on one device",
                    p.name, p.op
                )
            })
        })
        .collect()
}

/// A recipe or step name as a file name and a job name: `[A-Za-z0-9_-]` kept, the rest `_`
/// (a quoted TOML key may hold `/`; `scontrol` prints `Key=Value` pairs split at spaces).
fn safe_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() { "_".into() } else { s }
}

/// Where a run's job scripts and logs go: beside the cache, which the nodes share.
fn log_dir(store: &Store, recipe: &Recipe) -> PathBuf {
    store
        .root()
        .join("logs")
        .join("slurm")
        .join(safe_name(&recipe.name))
}

/// A log path for `sbatch --output`, `%j` standing for the job id: Slurm expands `%` patterns,
/// so a literal `%` in the directory is written `%%`.
fn output_pattern(dir: &Path, file: &str) -> PathBuf {
    PathBuf::from(dir.to_string_lossy().replace('%', "%%")).join(file)
}

/// Where `cache probe TOKEN` writes (on a node) and the executor looks (here).
pub fn probe_path(store: &Store, token: &str) -> PathBuf {
    store.state_dir().join("probes").join(token)
}

/// The last `lines` lines of a job's log (empty when it has none yet), from at most its last
/// 64 KiB.
pub fn log_tail(log: &Path, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut bytes = Vec::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 << 10)));
        let _ = f.read_to_end(&mut bytes);
    }
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A log's tail indented under an error message.
fn quoted_tail(log: &Path) -> String {
    let tail = log_tail(log, 20);
    if tail.is_empty() {
        " (the log is empty)".to_string()
    } else {
        format!(
            "; its log ends:\n{}",
            tail.lines()
                .map(|l| format!("    | {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    }
}

/// Waits up to `grace` for `seen()`: a file a node wrote may take a while to show here on a
/// network filesystem that cached its absence (NFS keeps negative lookups up to `acdirmax`).
fn appears_within(grace: Duration, seen: impl Fn() -> bool) -> bool {
    let end = Instant::now() + grace;
    loop {
        if seen() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The current job of a step.
struct Attempt {
    job: String,
    log: PathBuf,
    /// The state and pending reason last reported (`None` before the first poll).
    reported: Option<(JobState, Option<String>)>,
    state: JobState,
    attempt: u32,
    submitted: Instant,
    /// Polls in a row in which Slurm erred or knew nothing of the job, and what it said last.
    unanswered: u32,
    last_problem: String,
}

/// What a run knows of one step across its jobs.
#[derive(Default)]
struct StepJobs {
    /// When a poll first saw one of its jobs run.
    running_since: Option<Instant>,
    /// Whether `step_started` was reported (once per step, not per job).
    started: bool,
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
        // `--force` recomputes from nothing once; a resubmission resumes what that job began.
        if p.reasons.contains(&Reason::Forced) {
            command.push(
                if attempt == 1 {
                    "--force"
                } else {
                    "--force-resume"
                }
                .into(),
            );
        }
        for s in &self.overrides {
            command.extend(["--set".into(), s.clone()]);
        }
        let tasks = r.tasks.unwrap_or(1);
        if tasks > 1 {
            command.extend(["--launcher".into(), "srun".into()]);
        }
        JobSpec {
            name: format!(
                "distillery:{}:{}",
                safe_name(&recipe.name),
                safe_name(&p.name)
            ),
            log: output_pattern(
                &log_dir(store, recipe),
                &format!("{}-%j.log", safe_name(&p.name)),
            ),
            workdir: std::env::current_dir().unwrap_or_else(|_| recipe.dir()),
            cpus: r.threads,
            gpus: r.gpus,
            memory: r.memory,
            tasks,
            nodes: r.nodes.unwrap_or(1),
            time: r.time.or(self.settings.time),
            partition: self.settings.partition.clone(),
            account: self.settings.account.clone(),
            command,
        }
    }

    /// Writes the job's script to `script_path` and submits it; returns the job id and its log.
    fn submit(&self, spec: &JobSpec, script_path: &Path) -> Result<(String, PathBuf), RunError> {
        std::fs::create_dir_all(script_path.parent().expect("a file in the log directory"))
            .and_then(|()| std::fs::write(script_path, spec.script()))
            .map_err(|e| RunError::Executor {
                message: format!("cannot write the job script {}: {e}", script_path.display()),
            })?;
        let job = sbatch(script_path, &self.extra_args()).map_err(|e| match e {
            SlurmError::Missing { .. } => RunError::Executor {
                message: format!(
                    "{e}\n  = help: --executor local runs the steps here; `kind = \"slurm\"` may come from the recipe's [executor] or {}",
                    settings::user_config_path()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "the user config".into())
                ),
            },
            // Slurm said no to what was asked: the settings' or the resources' fault.
            e => RunError::SubmissionRefused {
                message: format!(
                    "{e}\n  = help: check --partition, --account, --time, --sbatch-arg and the steps' resources (the recipe's or the user config's [executor] may set them)"
                ),
            },
        })?;
        let log = spec
            .log
            .to_string_lossy()
            .replace("%j", &job)
            .replace("%%", "%");
        Ok((job, PathBuf::from(log)))
    }

    /// Sleeps `d`, waking early when interrupted.
    fn pause(&self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end && !self.interrupted.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100).min(end - Instant::now()));
        }
    }

    fn interrupted(&self) -> bool {
        self.interrupted.load(Ordering::Relaxed)
    }

    /// Cancels `jobs` after an interrupt; the error says which were cancelled, or which may still
    /// be running when `scancel` failed.
    fn cancel_interrupted(&self, jobs: Vec<String>) -> RunError {
        match scancel(&jobs) {
            Ok(()) => RunError::Interrupted { cancelled: jobs },
            Err(e) => RunError::Interrupted {
                cancelled: vec![format!(
                    "none: {e}; jobs {} may still run (scancel them)",
                    jobs.join(", ")
                )],
            },
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
            log: output_pattern(&dir, &format!("{token}.log")),
            workdir: std::env::current_dir().unwrap_or_else(|_| dir.clone()),
            cpus: None,
            gpus: None,
            memory: None,
            tasks: 1,
            nodes: 1,
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
        let script = dir.join(format!("{token}.sbatch"));
        let (job, log) = self.submit(&spec, &script).inspect_err(|_| {
            let _ = std::fs::remove_file(&script);
        })?;
        reporter.event(Event::Note {
            step: "slurm".into(),
            message: format!(
                "job {job} checks that the compute nodes see the cache {}",
                store.root().display()
            ),
        });
        let mut unanswered = 0;
        let info = loop {
            if self.interrupted() {
                return Err(self.cancel_interrupted(vec![job]));
            }
            match job_info(&job) {
                Ok(Some(i)) if i.state.is_finished() => break Some(i),
                Ok(Some(_)) => unanswered = 0,
                Ok(None) | Err(_) if unanswered + 1 >= UNANSWERED_POLLS => break None,
                Ok(None) | Err(_) => unanswered += 1,
            }
            self.pause(self.poll);
        };
        let answer = probe_path(store, &token);
        let completed = info
            .as_ref()
            .is_some_and(|i| i.state == JobState::Completed);
        let seen = completed && appears_within(VISIBILITY_GRACE, || answer.exists());
        let _ = std::fs::remove_file(&answer);
        let _ = std::fs::remove_file(&script);
        if seen {
            let _ = std::fs::remove_file(&log);
            return Ok(());
        }
        let tail = quoted_tail(&log);
        match info {
            // It ran to the end and wrote where it was told, but not where this host looks.
            Some(i) if completed => Err(RunError::CacheNotShared {
                dir: store.root().to_path_buf(),
                why: format!(
                    "probe job {job} completed on {} but left no file in it as seen from here, log {}{tail}",
                    i.nodes.as_deref().unwrap_or("its node"),
                    log.display()
                ),
            }),
            // Slurm could not even open the log in a directory this host created there.
            Some(i) if i.state == JobState::Failed && !log.exists() => {
                Err(RunError::CacheNotShared {
                    dir: store.root().to_path_buf(),
                    why: format!(
                        "probe job {job} failed on {} without writing its log {} (the directory exists here)",
                        i.nodes.as_deref().unwrap_or("its node"),
                        log.display()
                    ),
                })
            }
            Some(i) => Err(RunError::Executor {
                message: format!(
                    "probe job {job}, which checks that the nodes share the cache, ended {}{}; log {}{tail}",
                    i.state.name(),
                    i.exit_code
                        .map(|c| format!(" (exit code {c})"))
                        .unwrap_or_default(),
                    log.display()
                ),
            }),
            None => Err(RunError::Executor {
                message: format!(
                    "Slurm lost track of probe job {job}; log {}{tail}",
                    log.display()
                ),
            }),
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
        let mut summary = begin_run(recipe, plan, store);
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
        end_run(
            recipe,
            plan,
            store,
            reporter,
            &mut summary,
            start,
            result.is_err(),
        );
        result.map(|()| summary)
    }

    /// Submits step `p`'s `attempt`-th job; a refusal is reported as the step's failure.
    fn submit_step(
        &self,
        recipe: &Recipe,
        store: &Store,
        p: &PlannedStep,
        attempt: u32,
        reporter: &dyn Reporter,
    ) -> Result<Attempt, RunError> {
        let spec = self.spec(recipe, store, p, attempt);
        // One script per key: runs of one recipe with other overrides do not overwrite it.
        let script =
            log_dir(store, recipe).join(format!("{}-{}.sbatch", safe_name(&p.name), p.key.short()));
        match self.submit(&spec, &script) {
            Ok((job, log)) => {
                reporter.event(Event::JobSubmitted {
                    step: p.name.clone(),
                    job_id: job.clone(),
                    log: log.display().to_string(),
                    attempt,
                });
                Ok(Attempt {
                    job,
                    log,
                    reported: None,
                    state: JobState::Pending,
                    attempt,
                    submitted: Instant::now(),
                    unanswered: 0,
                    last_problem: String::new(),
                })
            }
            Err(e) => {
                let e = match e {
                    RunError::SubmissionRefused { message } => RunError::SubmissionRefused {
                        message: format!("step `{}`: {message}", p.name),
                    },
                    e => RunError::StepFailed {
                        step: p.name.clone(),
                        message: format!("its job could not be submitted: {e}"),
                    },
                };
                reporter.event(Event::StepFailed {
                    step: p.name.clone(),
                    error: e.to_string(),
                });
                Err(e)
            }
        }
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
        let mut done = settled(plan);
        let mut submitted: BTreeSet<usize> = BTreeSet::new();
        let mut active: BTreeMap<usize, Attempt> = BTreeMap::new();
        let mut steps: BTreeMap<usize, StepJobs> = BTreeMap::new();
        let mut failure: Option<RunError> = None;
        // Steps another process holds the lock of, said once.
        let mut waiting: BTreeSet<usize> = BTreeSet::new();
        loop {
            if self.interrupted() {
                let ids: Vec<String> = active.values().map(|a| a.job.clone()).collect();
                for (i, a) in &active {
                    reporter.event(Event::StepFailed {
                        step: by_index[i].name.clone(),
                        error: format!("interrupted: job {} cancelled", a.job),
                    });
                }
                return Err(self.cancel_interrupted(ids));
            }
            if failure.is_none() {
                for p in to_run {
                    if submitted.contains(&p.index) || !inputs_done(recipe, p.index, &done) {
                        continue;
                    }
                    // Another run at work on the same key: no job that would hold an
                    // allocation while it waits for the lock. Its result is used once there.
                    let recompute = p
                        .reasons
                        .iter()
                        .any(|r| matches!(r, Reason::Forced | Reason::EntryModified { .. }));
                    if !recompute && store.contains(&p.key) {
                        submitted.insert(p.index);
                        done.insert(p.index);
                        summary.cached.push(p.name.clone());
                        reporter.event(Event::StepFinished {
                            step: p.name.clone(),
                            key: p.key.to_hex(),
                            seconds: 0.0,
                            outcome: "computed by another run".into(),
                        });
                        continue;
                    }
                    if let Err(distillery_cache::CacheError::LockTimeout { holder, .. }) =
                        store.lock(&p.key, Duration::ZERO, &mut |_| {})
                    {
                        if waiting.insert(p.index) {
                            reporter.event(Event::StepWaiting {
                                step: p.name.clone(),
                                holder,
                            });
                        }
                        continue;
                    }
                    submitted.insert(p.index);
                    match self.submit_step(recipe, store, p, 1, reporter) {
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
            if failure.is_some() {
                // As a local run starts nothing after a failure: jobs still waiting in the
                // queue are cancelled; running ones finish.
                let pending: Vec<usize> = active
                    .iter()
                    .filter(|(_, a)| a.state == JobState::Pending)
                    .map(|(i, _)| *i)
                    .collect();
                let ids: Vec<String> = pending.iter().map(|i| active[i].job.clone()).collect();
                if !ids.is_empty() && scancel(&ids).is_ok() {
                    for i in pending {
                        let a = active.remove(&i).expect("active");
                        reporter.event(Event::StepFailed {
                            step: by_index[&i].name.clone(),
                            error: format!(
                                "job {} cancelled while pending: another step failed",
                                a.job
                            ),
                        });
                    }
                }
            }
            let blocked = waiting.iter().any(|i| !submitted.contains(i));
            if active.is_empty() && (!blocked || failure.is_some()) {
                break;
            }
            self.pause(self.poll);
            if self.interrupted() {
                continue;
            }
            let indices: Vec<usize> = active.keys().copied().collect();
            for i in indices {
                let p = by_index[&i];
                let a = active.get_mut(&i).expect("active");
                let info = match job_info(&a.job) {
                    Ok(Some(info)) => info,
                    answer => {
                        a.unanswered += 1;
                        a.last_problem = match answer {
                            Err(e) => e.to_string(),
                            _ => "neither scontrol nor sacct knows it".into(),
                        };
                        if a.unanswered >= UNANSWERED_POLLS {
                            let a = active.remove(&i).expect("active");
                            let _ = scancel(std::slice::from_ref(&a.job));
                            step_failed(
                                reporter,
                                &mut failure,
                                p,
                                format!(
                                    "lost track of job {} ({} polls in a row: {}); cancelled it, log {}\n  = help: `scontrol show job {}` or `sacct -j {}` says what became of it; rerun to resume from its checkpoint",
                                    a.job,
                                    UNANSWERED_POLLS,
                                    a.last_problem,
                                    a.log.display(),
                                    a.job,
                                    a.job
                                ),
                            );
                        }
                        continue;
                    }
                };
                a.unanswered = 0;
                let step_jobs = steps.entry(i).or_default();
                // Reported on the first poll and on every change of state or of the pending
                // reason: a job that waits (`Priority`, `Resources`) or never can run
                // (`PartitionConfig`, `ReqNodeNotAvail`) says so.
                let reason = info
                    .reason
                    .clone()
                    .filter(|_| info.state != JobState::Running);
                let now = (info.state, reason.clone());
                if a.reported.as_ref() != Some(&now) {
                    a.reported = Some(now);
                    a.state = info.state;
                    if info.state == JobState::Running && step_jobs.running_since.is_none() {
                        step_jobs.running_since = Some(Instant::now());
                    }
                    // As a local run says a step started: when its first job runs (or ends
                    // before a poll saw it run).
                    if info.state != JobState::Pending && !step_jobs.started {
                        step_jobs.started = true;
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
                        reason,
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
                let seconds = step_jobs
                    .running_since
                    .unwrap_or(a.submitted)
                    .elapsed()
                    .as_secs_f64();
                match self.finished(recipe, store, p, a, &info, seconds, reporter, &mut failure) {
                    AfterJob::Ran => {
                        done.insert(i);
                        summary.ran.push(p.name.clone());
                    }
                    AfterJob::Resubmitted(next) => {
                        active.insert(i, next);
                    }
                    AfterJob::Failed => {}
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// What follows a step's job ending: the step done, the job resubmitted, or the step failed
    /// (then `failure` holds the run's first failure).
    #[allow(clippy::too_many_arguments)]
    fn finished(
        &self,
        recipe: &Recipe,
        store: &Store,
        p: &PlannedStep,
        a: Attempt,
        info: &JobInfo,
        seconds: f64,
        reporter: &dyn Reporter,
        failure: &mut Option<RunError>,
    ) -> AfterJob {
        let exit = info
            .exit_code
            .as_deref()
            .map(|c| format!(", exit code {c}"))
            .unwrap_or_default();
        let state = info.state;
        if state == JobState::Completed
            && appears_within(VISIBILITY_GRACE, || store.contains(&p.key))
        {
            reporter.event(Event::StepFinished {
                step: p.name.clone(),
                key: p.key.to_hex(),
                seconds,
                outcome: format!("ran as job {}", a.job),
            });
            return AfterJob::Ran;
        }
        let resubmissions = a.attempt - 1;
        if state.is_requeueable() && resubmissions < self.max_requeue() && failure.is_none() {
            reporter.event(Event::Note {
                step: p.name.clone(),
                message: format!(
                    "job {} {}{exit}; submitting it again (resubmission {} of at most {}), it resumes from its checkpoint",
                    a.job,
                    state.name(),
                    resubmissions + 1,
                    self.max_requeue()
                ),
            });
            return match self.submit_step(recipe, store, p, a.attempt + 1, reporter) {
                Ok(next) => AfterJob::Resubmitted(next),
                Err(e) => {
                    failure.get_or_insert(e);
                    AfterJob::Failed
                }
            };
        }
        let what = if state == JobState::Completed {
            "completed but committed nothing".to_string()
        } else if state.is_requeueable() && failure.is_none() {
            let times = match self.max_requeue() {
                0 => "(resubmissions are off: max_requeue = 0)".to_string(),
                1 => "after its one resubmission".to_string(),
                n => format!("after {n} resubmissions"),
            };
            format!("{} {times}", state.name())
        } else {
            state.name().to_string()
        };
        step_failed(
            reporter,
            failure,
            p,
            format!(
                "job {} {what}{exit}, log {}{}",
                a.job,
                a.log.display(),
                quoted_tail(&a.log)
            ),
        );
        AfterJob::Failed
    }
}

/// What became of a step whose job ended.
enum AfterJob {
    Ran,
    Resubmitted(Attempt),
    Failed,
}

/// Reports step `p` failed and keeps the run's first failure.
fn step_failed(
    reporter: &dyn Reporter,
    failure: &mut Option<RunError>,
    p: &PlannedStep,
    message: String,
) {
    let e = RunError::StepFailed {
        step: p.name.clone(),
        message,
    };
    reporter.event(Event::StepFailed {
        step: p.name.clone(),
        error: e.to_string(),
    });
    failure.get_or_insert(e);
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
