//! `distillery run`: plan, then execute what is not cached, here or as Slurm jobs; and
//! `distillery run-step`, the one step a Slurm job runs.

use super::*;
use crate::slurm::settings::{
    ExecutorKind, ExecutorSettings, TIME_HELP, parse_time, user_settings,
};
use crate::slurm::{INTERRUPTED, SlurmRun, catch_interrupts};

fn time_arg(s: &str) -> Result<u64, String> {
    parse_time(s).ok_or_else(|| format!("`{s}` is not a time limit; {TIME_HELP}"))
}

/// Where the steps run, and the Slurm settings on the command line.
#[derive(Args, Debug, Clone, Default)]
pub(super) struct ExecutorArgs {
    /// Where the steps run: here, or one Slurm job per step
    /// [default: `[executor] kind` of the recipe or the user config, else local]
    #[arg(long, value_parser = ["local", "slurm"])]
    executor: Option<String>,
    /// Slurm partition of the jobs [default: `[executor] partition`, else the cluster's]
    #[arg(long)]
    partition: Option<String>,
    /// Slurm account of the jobs [default: `[executor] account`]
    #[arg(long)]
    account: Option<String>,
    /// Time limit of a job whose step declares no `resources.time`, e.g. 4:00:00 or 90m
    /// [default: `[executor] time`, else the partition's]
    #[arg(long, value_parser = time_arg)]
    time: Option<u64>,
    /// One more sbatch flag (repeatable): --sbatch-arg=--qos=high
    #[arg(long = "sbatch-arg", value_name = "FLAG", allow_hyphen_values = true)]
    sbatch_args: Vec<String>,
    /// Resubmissions of a job ended by its time limit, preemption or a node failure [default: 2]
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=100))]
    max_requeue: Option<u32>,
}

impl ExecutorArgs {
    fn settings(&self) -> ExecutorSettings {
        ExecutorSettings {
            kind: self.executor.as_deref().and_then(ExecutorKind::parse),
            partition: self.partition.clone(),
            account: self.account.clone(),
            time: self.time,
            sbatch_args: (!self.sbatch_args.is_empty()).then(|| self.sbatch_args.clone()),
            max_requeue: self.max_requeue,
        }
    }

    /// The Slurm flags given, by name: an error with the local executor.
    fn slurm_flags(&self) -> Vec<&'static str> {
        [
            ("--partition", self.partition.is_some()),
            ("--account", self.account.is_some()),
            ("--time", self.time.is_some()),
            ("--sbatch-arg", !self.sbatch_args.is_empty()),
            ("--max-requeue", self.max_requeue.is_some()),
        ]
        .into_iter()
        .filter_map(|(f, given)| given.then_some(f))
        .collect()
    }
}

#[derive(Args, Debug)]
pub(super) struct RunArgs {
    #[command(flatten)]
    pub(super) recipe: RecipeArgs,
    #[command(flatten)]
    pub(super) select: SelectArgs,
    /// Show the plan and stop
    #[arg(long)]
    pub(super) dry_run: bool,
    /// Refuse to run when a source or step key differs from RECIPE.lock
    #[arg(long)]
    pub(super) locked: bool,
    /// Threads for the whole run [default: all cores]
    #[arg(long, short)]
    pub(super) jobs: Option<usize>,
    /// Seconds to wait for another run holding a step's lock
    #[arg(long, default_value_t = 6 * 3600)]
    pub(super) lock_timeout: u64,
    #[command(flatten)]
    pub(super) executor: ExecutorArgs,
}

pub(super) fn run(
    cli: &Cli,
    a: &RunArgs,
    registry: &OpRegistry,
    reporter: &dyn Reporter,
) -> Result<(), Failure> {
    let RunArgs {
        recipe: args,
        select,
        dry_run,
        locked,
        jobs,
        lock_timeout,
        executor,
    } = a;
    let (recipe, graph) = load(args, registry, cli.json)?;
    let settings = executor
        .settings()
        .or(recipe.executor.clone())
        .or(user_settings().map_err(|e| Failure::new(exit::USER, format!("error: {e}")))?);
    let kind = settings.kind.unwrap_or(ExecutorKind::Local);
    if kind == ExecutorKind::Local && !executor.slurm_flags().is_empty() {
        return Err(Failure::new(
            exit::USER,
            format!(
                "error: {} {} to the Slurm executor, and this run is local\n  = help: add --executor slurm (or `kind = \"slurm\"` in `[executor]`)",
                executor.slurm_flags().join(", "),
                if executor.slurm_flags().len() == 1 {
                    "applies"
                } else {
                    "apply"
                }
            ),
        ));
    }
    let store = open_store(cli)?;
    let plan = plan_for(
        &recipe,
        &graph,
        registry,
        &store,
        &select.selection(),
        reporter,
    )?;
    if *locked {
        let lock = LockFile::read(&recipe.lock_path())
            .map_err(|e| Failure::new(exit::LOCK_MISMATCH, format!("error: {e}")))?;
        let problems = lock.mismatches(&plan);
        if !problems.is_empty() {
            return Err(Failure::new(
                exit::LOCK_MISMATCH,
                format!(
                    "error: --locked, but the recipe no longer matches `{}`:\n{}\n  = help: rerun `distillery lock` if the change is intended\n",
                    recipe.lock_path().display(),
                    problems
                        .iter()
                        .map(|p| format!("  - {p}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
            ));
        }
    }
    if cli.json {
        reporter.event(Event::Plan {
            plan: plan.to_json(),
        });
    } else if !cli.quiet {
        eprint!("{}", render_plan(&recipe, &plan));
    }
    if kind == ExecutorKind::Slurm {
        check_slurm_run(*jobs, &settings, &recipe, &plan)?;
    }
    if *dry_run {
        return Ok(());
    }
    let result = match kind {
        ExecutorKind::Local => {
            let opts = RunOptions {
                jobs: jobs.unwrap_or_else(all_cores),
                lock_timeout: Duration::from_secs(*lock_timeout),
                launcher: crate::launch::Launcher::Local,
            };
            execute(&recipe, &plan, registry, &store, reporter, &opts)
        }
        ExecutorKind::Slurm => {
            catch_interrupts();
            let exe = std::env::current_exe().map_err(|e| {
                Failure::new(
                    exit::OTHER,
                    format!("error: cannot find this binary's path: {e}"),
                )
            })?;
            let slurm = SlurmRun {
                settings,
                exe,
                recipe_file: std::fs::canonicalize(&recipe.path).unwrap_or(recipe.path.clone()),
                overrides: args.set.clone(),
                lock_timeout: *lock_timeout,
                poll: Duration::from_secs_f64(
                    std::env::var("DISTILLERY_SLURM_POLL")
                        .ok()
                        .and_then(|v| v.parse::<f64>().ok())
                        .filter(|v| v.is_finite() && *v > 0.0)
                        .unwrap_or(10.0),
                ),
                interrupted: &INTERRUPTED,
            };
            slurm.execute(&recipe, &plan, &store, reporter)
        }
    };
    run_failure(result)
}

/// The CPUs Slurm gave this job on this node: `SLURM_CPUS_PER_TASK` when the job asked per
/// task, else the first count of `SLURM_JOB_CPUS_PER_NODE` (`"4"` or `"4(x2)"`). Without
/// cgroups or CPU binding a process sees every core of the node, not its allocation.
fn slurm_cpus() -> Option<usize> {
    let var = |name: &str| std::env::var(name).ok();
    var("SLURM_CPUS_PER_TASK")
        .and_then(|v| v.trim().parse().ok())
        .or_else(|| {
            var("SLURM_JOB_CPUS_PER_NODE").and_then(|v| {
                v.split(|c: char| !c.is_ascii_digit())
                    .next()
                    .and_then(|n| n.parse().ok())
            })
        })
        .filter(|&n: &usize| n > 0)
}

/// What the Slurm executor refuses before submitting anything (a `--dry-run` too).
fn check_slurm_run(
    jobs: Option<usize>,
    settings: &ExecutorSettings,
    recipe: &Recipe,
    plan: &Plan,
) -> Result<(), Failure> {
    if jobs.is_some() {
        return Err(Failure::new(
            exit::USER,
            "error: --jobs sets the threads of a local run; a Slurm job's threads are its step's resources.threads (its --cpus-per-task)\n  = help: declare resources.threads on the steps, or run with --executor local",
        ));
    }
    if let Err(e) = crate::slurm::settings::check_sbatch_args(
        settings.sbatch_args.as_deref().unwrap_or_default(),
    ) {
        return Err(Failure::new(exit::USER, format!("error: {e}")));
    }
    let oversized = crate::slurm::oversized_steps(recipe, plan);
    if !oversized.is_empty() {
        return Err(Failure::new(
            exit::USER,
            format!(
                "error: a job would hold GPUs no process uses:\n{}\n  = help: give a data-parallel step (train, distill) as many tasks as GPUs (--set steps.STEP.resources.tasks=8), or set resources.gpus to 1 (--set steps.STEP.resources.gpus=1)",
                oversized
                    .iter()
                    .map(|l| format!("  - {l}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        ));
    }
    Ok(())
}

fn all_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// A run's error as the terminal sees it, with its exit code.
fn run_failure<T>(result: Result<T, RunError>) -> Result<(), Failure> {
    match result {
        Ok(_) => Ok(()),
        Err(e @ RunError::LockTimeout { .. }) => {
            Err(Failure::new(exit::LOCK_TIMEOUT, format!("error: {e}")))
        }
        Err(e @ RunError::StepFailed { .. }) => Err(Failure::new(
            exit::STEP_FAILED,
            format!(
                "error: {e}\n  = note: nothing was committed for this step; fix the cause and rerun: finished steps stay cached\n"
            ),
        )),
        Err(e @ RunError::SubmissionRefused { .. }) => {
            Err(Failure::new(exit::USER, format!("error: {e}")))
        }
        Err(e @ RunError::Interrupted { .. }) => {
            Err(Failure::new(exit::INTERRUPTED, format!("error: {e}")))
        }
        Err(e) => Err(Failure::new(exit::OTHER, format!("error: {e}"))),
    }
}

/// `run-step`: what one Slurm job runs.
#[derive(Args, Debug)]
pub(super) struct RunStepArgs {
    #[command(flatten)]
    pub(super) recipe: RecipeArgs,
    /// The step to run
    #[arg(long)]
    step: String,
    /// The key the step had when its job was submitted: a recipe or source changed since is
    /// refused, not computed under another key
    #[arg(long)]
    key: String,
    /// Threads [default: the job's CPUs as Slurm says (SLURM_CPUS_PER_TASK,
    /// SLURM_JOB_CPUS_PER_NODE), else all cores]
    #[arg(long, short)]
    jobs: Option<usize>,
    /// Seconds to wait for another run holding the step's lock
    #[arg(long, default_value_t = 6 * 3600)]
    lock_timeout: u64,
    /// Recompute the step even if cached, discarding its checkpoints (`run --force`)
    #[arg(long, conflicts_with = "force_resume")]
    force: bool,
    /// Recompute the step even if cached, resuming from its checkpoints (a resubmitted job of
    /// a forced step)
    #[arg(long)]
    force_resume: bool,
    /// Who starts a data-parallel step's ranks: `srun` inside the job's allocation, or this
    /// process
    #[arg(long, default_value = "local", value_parser = ["local", "srun"])]
    launcher: String,
}

pub(super) fn run_step(
    cli: &Cli,
    a: &RunStepArgs,
    registry: &OpRegistry,
    reporter: &dyn Reporter,
) -> Result<(), Failure> {
    let (recipe, graph) = load(&a.recipe, registry, cli.json)?;
    let store = open_store(cli)?;
    let selection = Selection {
        only: Some(a.step.clone()),
        force: if a.force {
            vec![a.step.clone()]
        } else {
            Vec::new()
        },
        force_resume: if a.force_resume {
            vec![a.step.clone()]
        } else {
            Vec::new()
        },
        ..Default::default()
    };
    let plan = plan_for(&recipe, &graph, registry, &store, &selection, reporter)?;
    let p = find_step(&recipe, &plan, &a.step)?;
    if p.key.to_hex() != a.key {
        return Err(Failure::new(
            exit::USER,
            format!(
                "error: step `{}` now has key {}, but this job was submitted for {}: the recipe, an override or a source changed since, or this node ({}) sees a source or an environment variable the submitting host saw differently\n  = help: rerun `distillery run` to submit the step as it is now; `distillery plan` on this node shows what it sees",
                a.step,
                p.key.short(),
                &a.key[..a.key.len().min(12)],
                distillery_cache::store::hostname()
            ),
        ));
    }
    let opts = RunOptions {
        jobs: a.jobs.or_else(slurm_cpus).unwrap_or_else(all_cores),
        lock_timeout: Duration::from_secs(a.lock_timeout),
        launcher: match a.launcher.as_str() {
            "srun" => crate::launch::Launcher::Srun,
            _ => crate::launch::Launcher::Local,
        },
    };
    run_failure(execute(&recipe, &plan, registry, &store, reporter, &opts))
}

/// The CPUs this process may run on (its affinity mask), if the system says.
fn allowed_cpus() -> Option<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        (libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0)
            .then(|| libc::CPU_COUNT(&set) as usize)
    }
}

/// `rank`: one rank of a data-parallel step, started by `run` (local ranks) or by `srun`.
#[derive(Args, Debug)]
pub(super) struct RankArgs {
    /// The step's context, written by the launcher
    #[arg(long)]
    context: std::path::PathBuf,
}

pub(super) fn rank(
    a: &RankArgs,
    registry: &OpRegistry,
    reporter: &dyn Reporter,
) -> Result<(), Failure> {
    use crate::launch::{RankContext, ranks_from_env};
    let text = std::fs::read_to_string(&a.context)
        .map_err(|e| Failure::new(exit::OTHER, format!("error: {}: {e}", a.context.display())))?;
    let ctx = serde_json::from_str(&text)
        .ok()
        .as_ref()
        .and_then(RankContext::from_json)
        .ok_or_else(|| {
            Failure::new(
                exit::OTHER,
                format!("error: {}: not a rank context", a.context.display()),
            )
        })?;
    let ranks = ranks_from_env().ok_or_else(|| {
        Failure::new(
            exit::USER,
            "error: `rank` runs as one of a step's ranks: DISTILLERY_RANK and DISTILLERY_WORLD_SIZE (or Slurm's SLURM_PROCID and SLURM_NTASKS) say which; `distillery run` sets them",
        )
    })?;
    let op = registry.get(&ctx.op).ok_or_else(|| {
        Failure::new(
            exit::USER,
            format!("error: this build has no op `{}`", ctx.op),
        )
    })?;
    // Only the first rank's output is committed; the others write theirs aside.
    let out_dir = if ranks.is_first() {
        ctx.out_dir.clone()
    } else {
        let d = ctx
            .scratch_dir
            .join("parallel")
            .join(&ranks.session)
            .join(format!("rank-{}-out", ranks.rank));
        std::fs::create_dir_all(&d)
            .map_err(|e| Failure::new(exit::OTHER, format!("error: {}: {e}", d.display())))?;
        d
    };
    let progress = crate::report::StepProgress::new(&ctx.step, reporter);
    let (rank, world) = (ranks.rank, ranks.world);
    // No more threads than CPUs this process may run on (srun binds each task to its own).
    let threads = ctx.threads.min(allowed_cpus().unwrap_or(usize::MAX)).max(1);
    let op_ctx = distillery_ops::OpContext {
        step: &ctx.step,
        inputs: ctx.inputs.clone(),
        params: ctx.params.clone(),
        out_dir,
        scratch_dir: ctx.scratch_dir.clone(),
        seed: ctx.seed,
        threads,
        ranks,
        progress: &progress,
        provenance: ctx.provenance.clone(),
    };
    op.run(&op_ctx).map_err(|e| {
        let code = match e {
            distillery_ops::OpError::Collective(_) => {
                distillery_ops::parallel::PEERS_LOST_EXIT as u8
            }
            _ => exit::STEP_FAILED,
        };
        Failure::new(
            code,
            format!("error: rank {rank} of {world}: step `{}`: {e}", ctx.step),
        )
    })
}
