//! Commands that write a recipe's results elsewhere: `export` (a directory, a GGUF file, a bundle) and `lock`.

use super::*;

#[derive(Args, Debug)]
pub(super) struct ExportArgs {
    #[command(flatten)]
    pub(super) recipe: RecipeArgs,
    /// Steps to export (with --to: exactly one)
    #[arg(required = true)]
    pub(super) steps: Vec<String>,
    /// Directory to write the output into (with --format gguf: the .gguf file)
    #[arg(long, required_unless_present = "bundle", conflicts_with = "bundle")]
    pub(super) to: Option<PathBuf>,
    /// Write a bundle (recipe, lock, outputs) that `cache import` takes on another machine
    #[arg(long)]
    pub(super) bundle: Option<PathBuf>,
    /// Replace a previous export in the --to directory (atomically) instead of refusing
    #[arg(long, requires = "to")]
    pub(super) replace: bool,
    /// Write editable copies instead of read-only hard links into the cache
    #[arg(long, requires = "to")]
    pub(super) copy: bool,
    /// `hf` (the step's files as they are) or `gguf` (one llama.cpp file at --to; a model step)
    #[arg(long, default_value = "hf", value_parser = ["hf", "gguf"], requires = "to")]
    pub(super) format: String,
    /// GGUF quantization (llama-quantize's names)
    /// [default: f16]
    #[arg(long, ignore_case = true, value_parser = distillery_ops::model::gguf::writer::GgufQuant::NAMES)]
    pub(super) quant: Option<String>,
}

#[derive(Args, Debug)]
pub(super) struct LockArgs {
    #[command(flatten)]
    pub(super) recipe: RecipeArgs,
}

pub(super) fn export(
    cli: &Cli,
    a: &ExportArgs,
    registry: &OpRegistry,
    reporter: &dyn Reporter,
) -> Result<(), Failure> {
    let ExportArgs {
        recipe: args,
        steps,
        to,
        bundle,
        replace,
        copy,
        format,
        quant,
    } = a;
    let (recipe, store, plan) = planned(cli, args, registry, reporter)?;
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

pub(super) fn lock(
    cli: &Cli,
    a: &LockArgs,
    registry: &OpRegistry,
    reporter: &dyn Reporter,
) -> Result<(), Failure> {
    let LockArgs { recipe: args } = a;
    let (recipe, store, plan) = planned(cli, args, registry, reporter)?;
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
