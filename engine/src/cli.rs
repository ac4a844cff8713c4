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
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Plan, then execute the steps that are not cached, in topological order
    Run {
        #[command(flatten)]
        recipe: RecipeArgs,
        #[command(flatten)]
        select: SelectArgs,
        /// Show the plan and stop
        #[arg(long)]
        dry_run: bool,
        /// Refuse to run when a source or step key differs from RECIPE.lock
        #[arg(long)]
        locked: bool,
        /// Threads for the whole run [default: all cores]
        #[arg(long, short)]
        jobs: Option<usize>,
        /// Seconds to wait for another run holding a step's lock
        #[arg(long, default_value_t = 6 * 3600)]
        lock_timeout: u64,
    },
    /// For every step: cached or to run, and why, with its cache key
    Plan {
        #[command(flatten)]
        recipe: RecipeArgs,
        #[command(flatten)]
        select: SelectArgs,
        /// Estimate shapes, parameters, FLOPs, memory and GPU-hours from configs alone (no weights needed)
        #[arg(long)]
        estimate: bool,
        /// GPU for --estimate: h100, h200 or a100
        #[arg(long, default_value = "h100")]
        gpu: String,
        /// Model FLOPs utilization assumed by --estimate
        #[arg(long, default_value_t = 0.4)]
        mfu: f64,
    },
    /// Print the step graph
    Dag {
        #[command(flatten)]
        recipe: RecipeArgs,
        /// Graphviz output
        #[arg(long, conflicts_with = "mermaid")]
        dot: bool,
        /// Mermaid output
        #[arg(long)]
        mermaid: bool,
    },
    /// Output path, manifest and metrics of a step
    Show {
        #[command(flatten)]
        recipe: RecipeArgs,
        step: String,
    },
    /// Materialize a step's output into a directory (hard links, never a second copy)
    Export {
        #[command(flatten)]
        recipe: RecipeArgs,
        /// Steps to export (with --to: exactly one)
        #[arg(required = true)]
        steps: Vec<String>,
        /// Directory to write the output into (with --format gguf: the .gguf file)
        #[arg(long, required_unless_present = "bundle", conflicts_with = "bundle")]
        to: Option<PathBuf>,
        /// Write a bundle (recipe, lock, outputs) that `cache import` takes on another machine
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Replace a previous export in the --to directory (atomically) instead of refusing
        #[arg(long, requires = "to")]
        replace: bool,
        /// Write editable copies instead of read-only hard links into the cache
        #[arg(long, requires = "to")]
        copy: bool,
        /// `hf` (the step's files as they are) or `gguf` (one llama.cpp file at --to; a model step)
        #[arg(long, default_value = "hf", value_parser = ["hf", "gguf"], requires = "to")]
        format: String,
        /// GGUF quantization (llama-quantize's names)
        /// [default: f16]
        #[arg(long, ignore_case = true, value_parser = distillery_ops::model::gguf::writer::GgufQuant::NAMES)]
        quant: Option<String>,
    },
    /// Write RECIPE.lock: source hashes, step keys, output hashes
    Lock {
        #[command(flatten)]
        recipe: RecipeArgs,
    },
    /// Remove cache entries that no lock file, recipe or pin reaches
    Gc {
        #[arg(long)]
        dry_run: bool,
        /// Only remove (oldest first) until the cache is at most this size, e.g. 200GB
        #[arg(long)]
        max_size: Option<String>,
    },
    /// Inspect and maintain the cache
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// List the ops, or describe one: ports, output, parameters and defaults
    Ops { name: Option<String> },
}

#[derive(Subcommand, Debug)]
enum CacheCommand {
    /// Re-hash every entry and report corrupt ones
    Verify,
    /// Bytes per entry
    Stats,
    /// Import a bundle written by `export --bundle`, verified by hashes
    Import { bundle: PathBuf },
    /// Print the cache directory
    Dir,
    /// List what gc keeps: each pin (a lock file, a recipe's last run), its keys, whether its file exists
    Pins,
    /// Release pins: those of the given recipe or lock files, or with --missing those whose file is gone
    Unpin {
        /// Recipe or lock files whose pins to release
        files: Vec<PathBuf>,
        /// Release every pin whose recipe or lock file no longer exists
        #[arg(long)]
        missing: bool,
        /// Say what would be released, release nothing
        #[arg(long)]
        dry_run: bool,
    },
}

/// `export --format gguf`: the step's model as one llama.cpp file, its provenance in the metadata.
fn export_gguf(
    recipe: &Recipe,
    step: &str,
    kind: distillery_ops::ArtifactKind,
    entry: &distillery_cache::Entry,
    to: &std::path::Path,
    quant: &str,
    replace: bool,
) -> Result<(), Failure> {
    use distillery_ops::model::gguf::writer::{GgufQuant, export_model};
    if kind != distillery_ops::ArtifactKind::Model {
        return Err(Failure::new(
            exit::USER,
            format!(
                "error: step `{step}` produces a {}, not a model; GGUF holds models",
                kind.name()
            ),
        ));
    }
    if to.is_dir() {
        return Err(Failure::new(
            exit::USER,
            format!(
                "error: {} is a directory; give the path of the .gguf file to write",
                to.display()
            ),
        ));
    }
    if let Some(parent) = to
        .parent()
        .filter(|p| !p.as_os_str().is_empty() && !p.is_dir())
    {
        return Err(Failure::new(
            exit::USER,
            format!(
                "error: {} does not exist; create it first",
                parent.display()
            ),
        ));
    }
    if to.exists() && !replace {
        return Err(Failure::new(
            exit::USER,
            format!(
                "error: {} exists; pass --replace to overwrite it",
                to.display()
            ),
        ));
    }
    let quant = GgufQuant::from_name(quant).expect("clap checked the name");
    if let Some(warning) =
        distillery_ops::model::gguf::writer::requantization_warning(&entry.data_dir())
    {
        eprintln!("warning: step `{step}`: {warning}");
    }
    let provenance = [
        ("recipe".to_string(), recipe.name.clone()),
        ("step".to_string(), step.to_string()),
        ("key".to_string(), entry.manifest.key.to_string()),
    ];
    let report = export_model(
        &entry.data_dir(),
        to,
        quant,
        &format!("{} {step}", recipe.name),
        &provenance,
    )
    .map_err(|e| Failure::new(exit::USER, format!("error: {e}")))?;
    println!("{}", to.display());
    eprintln!("{}", distillery_ops::model::gguf::writer::describe(&report));
    Ok(())
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
    if cli.json && matches!(cli.command, Command::Run { .. }) {
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
    match &cli.command {
        Command::Run {
            recipe: args,
            select,
            dry_run,
            locked,
            jobs,
            lock_timeout,
        } => {
            let (recipe, graph) = load(args, registry, cli.json)?;
            let store = open_store(&cli)?;
            let plan = plan_for(
                &recipe,
                &graph,
                registry,
                &store,
                &select.selection(),
                reporter.as_ref(),
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
            match execute(&recipe, &plan, registry, &store, reporter.as_ref(), &opts) {
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
        Command::Plan {
            recipe: args,
            select,
            estimate,
            gpu,
            mfu,
        } => {
            let (recipe, graph) = load(args, registry, cli.json)?;
            if *estimate {
                let g = crate::estimate::gpu(gpu).ok_or_else(|| {
                    Failure::new(
                        exit::USER,
                        format!("error: unknown GPU `{gpu}`; known: h100, h200, a100"),
                    )
                })?;
                let rows = crate::estimate::estimate(&recipe, &graph, registry);
                if cli.json {
                    let v: Vec<_> = rows
                        .iter()
                        .map(|r| serde_json::json!({"step": r.step, "op": r.op, "estimate": r.estimate, "gpus": r.gpus}))
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&v).unwrap());
                } else {
                    print!("{}", crate::estimate::render(&recipe, &rows, g, *mfu));
                }
                return Ok(());
            }
            let store = open_store(&cli)?;
            let plan = plan_for(
                &recipe,
                &graph,
                registry,
                &store,
                &select.selection(),
                reporter.as_ref(),
            )?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&plan.to_json()).unwrap());
            } else {
                print!("{}", render_plan(&recipe, &plan));
            }
            Ok(())
        }
        Command::Dag {
            recipe: args,
            dot,
            mermaid,
        } => {
            let (recipe, graph) = load(args, registry, cli.json)?;
            if *dot {
                print!("{}", to_dot(&recipe));
            } else if *mermaid {
                print!("{}", to_mermaid(&recipe));
            } else {
                for &i in &graph.order {
                    let s = &recipe.steps[i];
                    let ins: Vec<String> = s
                        .inputs
                        .iter()
                        .map(|i| format!("{}={}", i.port, i.written))
                        .collect();
                    println!(
                        "{} ({}) <- {}",
                        s.name,
                        s.op,
                        if ins.is_empty() {
                            "-".into()
                        } else {
                            ins.join(", ")
                        }
                    );
                }
            }
            Ok(())
        }
        Command::Show { recipe: args, step } => {
            let (recipe, store, plan) = planned(&cli, args, registry, reporter.as_ref())?;
            let p = find_step(&recipe, &plan, step)?;
            let entry = store.get(&p.key)?.ok_or_else(|| {
                Failure::new(exit::USER, format!("error: step `{step}` has not been computed with its current key {}\n  = help: `distillery run {}` computes it", p.key.short(), args.recipe.display()))
            })?;
            let op = registry.get(&p.op).expect("validated op");
            let summary = op.summarize(&entry.data_dir());
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "step": p.name, "path": entry.data_dir(), "manifest": entry.manifest, "summary": summary,
                    }))
                    .unwrap()
                );
            } else {
                let m = &entry.manifest;
                println!("step      {} ({} v{})", p.name, m.op, m.op_version);
                println!("key       {}", m.key);
                println!("output    {}", entry.data_dir().display());
                if let Some(d) = m.duration() {
                    println!("took      {:.2}s on {}", d.as_secs_f64(), m.host);
                }
                println!("params    {}", m.params);
                for (port, key) in &m.inputs {
                    println!("input     {port} = {}", key.short());
                }
                println!("files     {} ({} bytes)", m.files.len(), m.total_size());
                for f in &m.files {
                    println!(
                        "          {} {} {}",
                        &f.blake3[..12],
                        human_bytes(f.size),
                        f.path
                    );
                }
                if let Some(s) = summary {
                    println!("\n{s}");
                }
            }
            Ok(())
        }
        Command::Export {
            recipe: args,
            steps,
            to,
            bundle,
            replace,
            copy,
            format,
            quant,
        } => {
            let (recipe, store, plan) = planned(&cli, args, registry, reporter.as_ref())?;
            let mut keys = Vec::new();
            let mut kinds = Vec::new();
            for step in steps {
                let p = find_step(&recipe, &plan, step)?;
                kinds.push(p.kind);
                if !store.contains(&p.key) {
                    return Err(Failure::new(
                        exit::USER,
                        format!("error: step `{step}` is not computed yet; run the recipe first"),
                    ));
                }
                keys.push(p.key);
            }
            if let Some(dir) = to {
                if keys.len() != 1 {
                    return Err(Failure::new(
                        exit::USER,
                        "error: --to takes exactly one step; use --bundle for several",
                    ));
                }
                let entry = store.get(&keys[0])?.expect("checked above");
                if format != "gguf" && quant.is_some() {
                    return Err(Failure::new(
                        exit::USER,
                        "error: --quant applies to --format gguf; a Hugging Face export keeps the step's files as they are",
                    ));
                }
                if format == "gguf" && *copy {
                    return Err(Failure::new(
                        exit::USER,
                        "error: --copy applies to --format hf; a GGUF export is always a new file",
                    ));
                }
                if format == "gguf" {
                    let quant = quant.as_deref().unwrap_or("f16");
                    return export_gguf(&recipe, &steps[0], kinds[0], &entry, dir, quant, *replace);
                }
                distillery_cache::export_entry(
                    &entry,
                    dir,
                    distillery_cache::ExportMode {
                        replace: *replace,
                        copy: *copy,
                    },
                )?;
                println!("{}", dir.display());
                if !*copy && !cli.quiet {
                    eprintln!(
                        "note: the files are read-only hard links into the cache (no second copy); pass --copy for files to edit"
                    );
                }
            } else if let Some(dir) = bundle {
                let lock = LockFile::from_plan(&recipe, &plan, &store);
                let recipe_text = std::fs::read_to_string(&recipe.path).unwrap_or_default();
                let extra = serde_json::json!({
                    "recipe_name": recipe.name,
                    "recipe": recipe_text,
                    "overrides": args.set,
                    "lock": toml::to_string_pretty(&lock).unwrap_or_default(),
                    "steps": steps,
                });
                store.export_bundle(&keys, dir, extra)?;
                std::fs::write(dir.join("recipe.toml"), &recipe_text).ok();
                let _ = lock.write(&dir.join("recipe.lock"));
                println!("{}", dir.display());
            }
            Ok(())
        }
        Command::Lock { recipe: args } => {
            let (recipe, store, plan) = planned(&cli, args, registry, reporter.as_ref())?;
            let lock = LockFile::from_plan(&recipe, &plan, &store);
            let path = recipe.lock_path();
            lock.write(&path)
                .map_err(|e| Failure::new(exit::OTHER, format!("error: {e}")))?;
            let abs = std::fs::canonicalize(&path).unwrap_or(path.clone());
            let keys: BTreeSet<_> = lock.steps.values().map(|s| s.key).collect();
            store.pin(
                &format!("lock:{}", abs.display()),
                &distillery_cache::Pin {
                    name: format!("lock file {}", abs.display()),
                    lock_file: Some(abs),
                    keys,
                },
            )?;
            println!("wrote {}", path.display());
            Ok(())
        }
        Command::Gc { dry_run, max_size } => {
            let store = open_store(&cli)?;
            let max = match max_size {
                Some(s) => Some(recipe::parse_bytes(s).ok_or_else(|| {
                    Failure::new(
                        exit::USER,
                        format!(
                            "error: `{s}` is not a size\n  = help: write e.g. --max-size 200GB"
                        ),
                    )
                })?),
                None => None,
            };
            let report = store.gc(&BTreeSet::new(), max, *dry_run)?;
            let orphaned: Vec<_> = store
                .pins()?
                .into_iter()
                .filter(distillery_cache::Pin::file_gone)
                .collect();
            if !orphaned.is_empty() && !cli.quiet {
                // On stderr: stdout stays the report (and JSON with --json).
                for pin in &orphaned {
                    eprintln!(
                        "note: kept {} entries of {} (its file is gone; `distillery cache unpin --missing` releases them)",
                        pin.keys.len(),
                        pin.name
                    );
                }
            }
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&report).unwrap());
            } else {
                let verb = if *dry_run { "would remove" } else { "removed" };
                for (key, step, size) in &report.removed {
                    println!("{verb} {} {:>10} {step}", key.short(), human_bytes(*size));
                }
                println!(
                    "{verb} {} entries, {} freed; {} entries kept, {} remain",
                    report.removed.len(),
                    human_bytes(report.freed_bytes),
                    report.kept,
                    human_bytes(report.remaining_bytes)
                );
            }
            Ok(())
        }
        Command::Cache { command } => {
            let store = open_store(&cli)?;
            match command {
                CacheCommand::Dir => println!("{}", store.root().display()),
                CacheCommand::Pins => {
                    let pins = store.pins()?;
                    if cli.json {
                        let v: Vec<_> = pins
                            .iter()
                            .map(|p| {
                                serde_json::json!({
                                    "name": p.name, "file": p.lock_file,
                                    "file_gone": p.file_gone(),
                                    "keys": p.keys,
                                })
                            })
                            .collect();
                        println!("{}", serde_json::to_string_pretty(&v).unwrap());
                    } else {
                        for p in &pins {
                            let gone = p.file_gone();
                            println!(
                                "{:>4} entries  {}{}",
                                p.keys.len(),
                                p.name,
                                if gone { " (file gone)" } else { "" }
                            );
                        }
                    }
                }
                CacheCommand::Unpin {
                    files,
                    missing,
                    dry_run,
                } => {
                    if files.is_empty() && !missing {
                        return Err(Failure::new(
                            exit::USER,
                            "error: name the recipe or lock files whose pins to release, or pass --missing\n",
                        ));
                    }
                    let wanted: Vec<PathBuf> = files
                        .iter()
                        .map(|f| {
                            std::fs::canonicalize(f).unwrap_or_else(|_| {
                                std::env::current_dir()
                                    .map(|d| d.join(f))
                                    .unwrap_or(f.clone())
                            })
                        })
                        .collect();
                    let removed = store.unpin(
                        &|p| {
                            (*missing && p.file_gone())
                                || p.lock_file.as_ref().is_some_and(|f| wanted.contains(f))
                        },
                        *dry_run,
                    )?;
                    let verb = if *dry_run {
                        "would release"
                    } else {
                        "released"
                    };
                    for p in &removed {
                        println!("{verb} {} ({} entries)", p.name, p.keys.len());
                    }
                    println!("{verb} {} pins", removed.len());
                }
                CacheCommand::Verify => {
                    let mut n = 0;
                    let problems = store.verify(&mut |_| n += 1)?;
                    if cli.json {
                        println!("{}", serde_json::to_string_pretty(&problems).unwrap());
                    }
                    if problems.is_empty() {
                        if !cli.json {
                            println!("{n} entries verified, all intact");
                        }
                    } else {
                        let list: Vec<String> = problems
                            .iter()
                            .map(|p| {
                                format!(
                                    "  {} {}: {}",
                                    &p.key[..12.min(p.key.len())],
                                    p.path,
                                    p.problem
                                )
                            })
                            .collect();
                        return Err(Failure::new(
                            exit::CORRUPT,
                            format!(
                                "error: {} problems in {n} entries:\n{}\n  = help: `distillery gc` cannot repair entries; remove them with `--force` reruns of their steps\n",
                                problems.len(),
                                list.join("\n")
                            ),
                        ));
                    }
                }
                CacheCommand::Stats => {
                    let rows = distillery_cache::maintain::sizes(&store)?;
                    let total: u64 = rows.iter().map(|r| r.3).sum();
                    if cli.json {
                        let v: Vec<_> = rows.iter().map(|(k, s, o, b)| serde_json::json!({"key": k, "step": s, "op": o, "bytes": b})).collect();
                        println!("{}", serde_json::to_string_pretty(&v).unwrap());
                    } else {
                        for (key, step, op, bytes) in &rows {
                            println!("{} {:>10} {step} ({op})", key.short(), human_bytes(*bytes));
                        }
                        println!(
                            "{} entries, {} in {}",
                            rows.len(),
                            human_bytes(total),
                            store.root().display()
                        );
                    }
                }
                CacheCommand::Import { bundle } => {
                    let keys = store.import_bundle(bundle)?;
                    println!("imported {} entries from {}", keys.len(), bundle.display());
                }
            }
            Ok(())
        }
        Command::Ops { name } => {
            match name {
                None => {
                    for (name, op) in registry.iter() {
                        let sig = op.signature();
                        println!(
                            "{name:<12} v{:<3} -> {:<8} {}",
                            sig.version,
                            sig.output.name(),
                            sig.doc
                        );
                    }
                }
                Some(name) => {
                    let op = registry.get(name).ok_or_else(|| {
                        Failure::new(
                            exit::USER,
                            format!("error: unknown op `{name}`; `distillery ops` lists them"),
                        )
                    })?;
                    let sig = op.signature();
                    println!(
                        "{} (version {}): {}\n\ninputs:",
                        sig.name, sig.version, sig.doc
                    );
                    for p in &sig.inputs {
                        println!(
                            "  {:<16} {:<8}{} {}",
                            p.name,
                            p.kind.name(),
                            if p.optional { " (optional)" } else { "" },
                            p.doc
                        );
                    }
                    println!("output: {}\n\nparams:", sig.output);
                    for p in &sig.params {
                        let default = match &p.default {
                            ParamDefault::Required => "required".to_string(),
                            ParamDefault::Optional => "optional".to_string(),
                            ParamDefault::Value(v) => format!("= {v}"),
                        };
                        println!("  {:<22} {:<14} {}", p.name, default, p.doc);
                    }
                }
            }
            Ok(())
        }
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
