//! Commands on the cache itself: `gc` and `cache ...`.

use super::*;

#[derive(Subcommand, Debug)]
pub(super) enum CacheCommand {
    /// Re-hash every entry and report corrupt ones
    Verify,
    /// Bytes per entry
    Stats,
    /// Import a bundle written by `export --bundle`, verified by hashes
    Import { bundle: PathBuf },
    /// Print the cache directory
    Dir,
    /// Write a file into the cache naming this host: the Slurm executor's check that the
    /// compute nodes share the cache
    #[command(hide = true)]
    Probe { token: String },
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

#[derive(Args, Debug)]
pub(super) struct GcArgs {
    #[arg(long)]
    pub(super) dry_run: bool,
    /// Only remove (oldest first) until the cache is at most this size, e.g. 200GB
    #[arg(long)]
    pub(super) max_size: Option<String>,
}

#[derive(Args, Debug)]
pub(super) struct CacheArgs {
    #[command(subcommand)]
    pub(super) command: CacheCommand,
}

pub(super) fn gc(cli: &Cli, a: &GcArgs) -> Result<(), Failure> {
    let GcArgs { dry_run, max_size } = a;
    let store = open_store(cli)?;
    let max = match max_size {
        Some(s) => Some(recipe::parse_bytes(s).ok_or_else(|| {
            Failure::new(
                exit::USER,
                format!("error: `{s}` is not a size\n  = help: write e.g. --max-size 200GB"),
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

pub(super) fn cache(cli: &Cli, a: &CacheArgs) -> Result<(), Failure> {
    let CacheArgs { command } = a;
    let store = open_store(cli)?;
    match command {
        CacheCommand::Dir => println!("{}", store.root().display()),
        CacheCommand::Probe { token } => {
            let path = crate::slurm::probe_path(&store, token);
            let host = distillery_cache::store::hostname();
            std::fs::create_dir_all(path.parent().expect("a file in a directory"))
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    distillery_cache::store::write_atomic(&path, host.as_bytes())
                        .map_err(|e| e.to_string())
                })
                .map_err(|e| {
                    Failure::new(
                        exit::OTHER,
                        format!("error: {} on {host}: {e}", path.display()),
                    )
                })?;
            println!("{host} wrote {}", path.display());
        }
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
