//! `distillery run`: plan, then execute what is not cached.

use super::*;

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
    } = a;
    let (recipe, graph) = load(args, registry, cli.json)?;
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
    if *dry_run {
        return Ok(());
    }
    let jobs = jobs.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let opts = RunOptions {
        jobs,
        lock_timeout: Duration::from_secs(*lock_timeout),
    };
    match execute(&recipe, &plan, registry, &store, reporter, &opts) {
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
        Err(e) => Err(Failure::new(exit::OTHER, format!("error: {e}"))),
    }
}
