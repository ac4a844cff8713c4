//! The `distillery` command line. Library code returns data and typed errors; this module is the
//! only place that prints and picks exit codes.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use distillery_cache::{SourceHasher, Store};
use distillery_ops::{OpRegistry, ParamDefault};

use crate::exec::{RunError, RunOptions, execute};
use crate::graph::{StepGraph, to_dot, to_mermaid};
use crate::lockfile::LockFile;
use crate::plan::{Plan, Selection, Status, make_plan, resolve_sources};
use crate::recipe::{self, Recipe, RecipeErrors};
use crate::report::{Event, HumanReporter, JsonReporter, Reporter};

mod inspect;
mod outputs;
mod run;
mod store;

/// Exit codes, distinct per kind of failure.
pub mod exit {
    /// Something outside the recipe went wrong (I/O, a corrupt cache).
    pub const OTHER: u8 = 1;
    /// The recipe or the command line is wrong.
    pub const USER: u8 = 2;
    /// A step failed while running.
    pub const STEP_FAILED: u8 = 3;
    /// Waited too long for another run's lock.
    pub const LOCK_TIMEOUT: u8 = 4;
    /// `--locked` and the recipe or a source no longer matches its lock file.
    pub const LOCK_MISMATCH: u8 = 5;
    /// `cache verify` found corrupt entries.
    pub const CORRUPT: u8 = 6;
    /// Ctrl-C or SIGTERM ended a Slurm run (its jobs cancelled): 128 + SIGINT, as a shell says.
    pub const INTERRUPTED: u8 = 130;
}

#[derive(Parser, Debug)]
#[command(
    name = "distillery",
    version,
    about = "Prune and distill large language models with cached, reproducible recipes"
)]
struct Cli {
    /// Cache directory [default: $XDG_CACHE_HOME/distillery or ~/.cache/distillery]
    #[arg(long, global = true, env = "DISTILLERY_CACHE")]
    cache_dir: Option<PathBuf>,
    /// Print NDJSON events (run) or JSON (plan, show) on stdout
    #[arg(long, global = true)]
    json: bool,
    /// Print only errors
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
struct RecipeArgs {
    /// The recipe file (TOML)
    recipe: PathBuf,
    /// Override a recipe value: --set steps.prune.params.hidden_size=4096 (repeatable, typed like TOML)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Args, Debug, Clone, Default)]
struct SelectArgs {
    /// Run only this step (its inputs must be cached)
    #[arg(long, value_name = "STEP")]
    only: Option<String>,
    /// Run this step and everything after it (its inputs must be cached)
    #[arg(long, value_name = "STEP")]
    from: Option<String>,
    /// Run this step and everything it needs, nothing after it
    #[arg(long, value_name = "STEP")]
    until: Option<String>,
    /// Rerun this step even if cached (repeatable)
    #[arg(long, value_name = "STEP")]
    force: Vec<String>,
}

impl SelectArgs {
    fn selection(&self) -> Selection {
        Selection {
            only: self.only.clone(),
            from: self.from.clone(),
            until: self.until.clone(),
            force: self.force.clone(),
            force_resume: Vec::new(),
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Plan, then execute the steps that are not cached, in topological order
    Run(run::RunArgs),
    /// Run one step of a recipe: what each job of `run --executor slurm` runs
    #[command(hide = true)]
    RunStep(run::RunStepArgs),
    /// Run one rank of a data-parallel step: what `run` and `run-step` start per rank
    #[command(hide = true)]
    Rank(run::RankArgs),
    /// For every step: cached or to run, and why, with its cache key
    Plan(inspect::PlanArgs),
    /// Print the step graph
    Dag(inspect::DagArgs),
    /// Output path, manifest and metrics of a step
    Show(inspect::ShowArgs),
    /// Materialize a step's output into a directory (hard links, never a second copy)
    Export(outputs::ExportArgs),
    /// Write RECIPE.lock: source hashes, step keys, output hashes
    Lock(outputs::LockArgs),
    /// Remove cache entries that no lock file, recipe or pin reaches
    Gc(store::GcArgs),
    /// Inspect and maintain the cache
    Cache(store::CacheArgs),
    /// List the ops, or describe one: ports, output, parameters and defaults
    Ops(inspect::OpsArgs),
}

/// A failure with its exit code, already worded for the terminal.
struct Failure {
    code: u8,
    text: String,
}

impl Failure {
    fn new(code: u8, text: impl Into<String>) -> Self {
        Failure {
            code,
            text: text.into(),
        }
    }
}

impl From<distillery_cache::CacheError> for Failure {
    fn from(e: distillery_cache::CacheError) -> Self {
        let code = match e {
            distillery_cache::CacheError::Exists { .. } => exit::USER,
            _ => exit::OTHER,
        };
        Failure::new(code, format!("error: {e}"))
    }
}

/// Ends the process as SIGPIPE would as soon as the reader of stdout or stderr (a pipe or
/// socket) goes away, not at the next write: a step may run for an hour without printing, and
/// `distillery run r.toml 2>&1 | head -1` must not wait for it. Nothing is committed by a killed
/// step; its scratch checkpoints stay for the next run.
fn watch_outputs() {
    fn is_stream(fd: i32) -> bool {
        // SAFETY: fstat on a descriptor number with a zeroed out-parameter.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            return false;
        }
        matches!(st.st_mode & libc::S_IFMT, libc::S_IFIFO | libc::S_IFSOCK)
    }
    let fds: Vec<i32> = [1, 2].into_iter().filter(|&fd| is_stream(fd)).collect();
    if fds.is_empty() {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("output-watch".into())
        .spawn(move || {
            loop {
                for &fd in &fds {
                    let mut p = libc::pollfd {
                        fd,
                        events: 0,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd, no wait. A write end reports POLLERR once
                    // its read end is closed.
                    let n = unsafe { libc::poll(&mut p, 1, 0) };
                    if n > 0 && p.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                        // SAFETY: default SIGPIPE disposition (set in main_with): ends the process.
                        unsafe {
                            libc::raise(libc::SIGPIPE);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
}

/// Entry point of the binary, with the ops it ships (tests pass their own as well).
pub fn main_with(registry: OpRegistry) -> ExitCode {
    // A closed stdout or stderr (`| head`) ends the process quietly, as for any Unix tool,
    // instead of a panic in println! or a progress thread dying while the main thread waits.
    // A running step is cut short: nothing is committed and its scratch checkpoints stay.
    // SAFETY: set before any thread is started; restores the default disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // `DISTILLERY_CACHE=` (set but empty) means "not set", not an empty --cache-dir.
    if std::env::var_os("DISTILLERY_CACHE").is_some_and(|v| v.is_empty()) {
        // SAFETY: as above, no other thread exists yet.
        unsafe { std::env::remove_var("DISTILLERY_CACHE") };
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USER } else { 0 });
        }
    };
    if let Some(dir) = &cli.cache_dir {
        // Recipes may name `${DISTILLERY_CACHE}`: it must mean the cache this run uses.
        // SAFETY: set before any thread is started.
        unsafe { std::env::set_var("DISTILLERY_CACHE", dir) };
    }
    watch_outputs();
    match dispatch(cli, &registry) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprint!("{}", f.text);
            if !f.text.ends_with('\n') {
                eprintln!();
            }
            ExitCode::from(f.code)
        }
    }
}

fn open_store(cli: &Cli) -> Result<Store, Failure> {
    let root = cli.cache_dir.clone().unwrap_or_else(Store::default_root);
    Ok(Store::open(root)?)
}

fn load(
    args: &RecipeArgs,
    registry: &OpRegistry,
    json: bool,
) -> Result<(Recipe, StepGraph), Failure> {
    let fail = |errs: RecipeErrors| {
        if json {
            let diags: Vec<_> = errs
                .diagnostics
                .iter()
                .map(|d| d.to_json(&errs.map))
                .collect();
            println!(
                "{}",
                serde_json::json!({"event": "recipe_error", "errors": diags})
            );
        }
        Failure::new(exit::USER, errs.render())
    };
    let recipe = recipe::load(&args.recipe, &args.set, registry).map_err(fail)?;
    let graph = StepGraph::build(&recipe).map_err(|d| {
        fail(RecipeErrors {
            diagnostics: vec![d],
            map: recipe.map.clone(),
        })
    })?;
    Ok((recipe, graph))
}

fn plan_for(
    recipe: &Recipe,
    graph: &StepGraph,
    registry: &OpRegistry,
    store: &Store,
    selection: &Selection,
    reporter: &dyn Reporter,
) -> Result<Plan, Failure> {
    let hasher = SourceHasher::new(store);
    let sources = resolve_sources(recipe, &hasher, &mut |source, done, total| {
        reporter.event(Event::Hashing {
            source: source.to_string(),
            done,
            total,
        })
    })
    .map_err(|diagnostics| {
        Failure::new(
            exit::USER,
            RecipeErrors {
                diagnostics,
                map: recipe.map.clone(),
            }
            .render(),
        )
    })?;
    let plan = make_plan(recipe, graph, registry, store, sources, selection).map_err(|d| {
        Failure::new(
            exit::USER,
            RecipeErrors {
                diagnostics: d,
                map: recipe.map.clone(),
            }
            .render(),
        )
    })?;
    // Warnings on stderr: stdout stays the command's output (JSON with --json).
    for w in &plan.warnings {
        eprint!("{}", w.render(&recipe.map));
    }
    Ok(plan)
}

/// Loads a recipe, opens the cache and plans every step: what `show`, `export` and `lock` start from.
fn planned(
    cli: &Cli,
    args: &RecipeArgs,
    registry: &OpRegistry,
    reporter: &dyn Reporter,
) -> Result<(Recipe, Store, Plan), Failure> {
    let (recipe, graph) = load(args, registry, cli.json)?;
    let store = open_store(cli)?;
    let plan = plan_for(
        &recipe,
        &graph,
        registry,
        &store,
        &Selection::default(),
        reporter,
    )?;
    Ok((recipe, store, plan))
}

fn reporter(cli: &Cli) -> Box<dyn Reporter> {
    if cli.json && matches!(cli.command, Command::Run(_) | Command::RunStep(_)) {
        Box::new(JsonReporter::new())
    } else if cli.json {
        // Other commands print one JSON document on stdout; their events (hashing) go aside.
        Box::new(JsonReporter::on_stderr())
    } else {
        Box::new(HumanReporter::new(cli.quiet))
    }
}

fn dispatch(cli: Cli, registry: &OpRegistry) -> Result<(), Failure> {
    let reporter = reporter(&cli);
    let reporter = reporter.as_ref();
    match &cli.command {
        Command::Run(a) => run::run(&cli, a, registry, reporter),
        Command::RunStep(a) => run::run_step(&cli, a, registry, reporter),
        Command::Rank(a) => run::rank(a, registry, reporter),
        Command::Plan(a) => inspect::plan(&cli, a, registry, reporter),
        Command::Dag(a) => inspect::dag(&cli, a, registry),
        Command::Show(a) => inspect::show(&cli, a, registry, reporter),
        Command::Export(a) => outputs::export(&cli, a, registry, reporter),
        Command::Lock(a) => outputs::lock(&cli, a, registry, reporter),
        Command::Gc(a) => store::gc(&cli, a),
        Command::Cache(a) => store::cache(&cli, a),
        Command::Ops(a) => inspect::ops(a, registry),
    }
}

fn find_step<'p>(
    recipe: &Recipe,
    plan: &'p Plan,
    step: &str,
) -> Result<&'p crate::plan::PlannedStep, Failure> {
    plan.step(step).ok_or_else(|| {
        let help = crate::diag::did_you_mean(step, recipe.steps.iter().map(|s| s.name.as_str()))
            .map(|h| format!("\n  = help: {h}"))
            .unwrap_or_default();
        Failure::new(
            exit::USER,
            format!("error: recipe `{}` has no step `{step}`{help}", recipe.name),
        )
    })
}

/// The plan as a table for people.
pub fn render_plan(recipe: &Recipe, plan: &Plan) -> String {
    let run = plan
        .steps
        .iter()
        .filter(|s| s.status == Status::Run)
        .count();
    let cached = plan
        .steps
        .iter()
        .filter(|s| s.status == Status::Cached)
        .count();
    let mut out = format!(
        "plan for `{}` ({}): {} steps, {run} to run, {cached} cached\n",
        recipe.name,
        recipe.path.display(),
        plan.steps.len()
    );
    let width = plan
        .steps
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    for s in &plan.steps {
        let status = match s.status {
            Status::Cached => "cached",
            Status::Run => "run",
            Status::Skipped => "skipped",
        };
        let why = s
            .reasons
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        out.push_str(&format!(
            "  {:<width$}  {:<8} {:<10} {}  {}\n",
            s.name,
            status,
            s.op,
            s.key.short(),
            why
        ));
    }
    out
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1000.0 && u < UNITS.len() - 1 {
        x /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
}
