//! Commands that look without computing: `plan`, `dag`, `show`, `ops`.

use super::*;

#[derive(Args, Debug)]
pub(super) struct PlanArgs {
    #[command(flatten)]
    pub(super) recipe: RecipeArgs,
    #[command(flatten)]
    pub(super) select: SelectArgs,
    /// Estimate shapes, parameters, FLOPs, memory and GPU-hours from configs alone (no weights needed)
    #[arg(long)]
    pub(super) estimate: bool,
    /// GPU for --estimate: h100, h200 or a100
    #[arg(long, default_value = "h100")]
    pub(super) gpu: String,
    /// Model FLOPs utilization assumed by --estimate
    #[arg(long, default_value_t = 0.4)]
    pub(super) mfu: f64,
}

#[derive(Args, Debug)]
pub(super) struct DagArgs {
    #[command(flatten)]
    pub(super) recipe: RecipeArgs,
    /// Graphviz output
    #[arg(long, conflicts_with = "mermaid")]
    pub(super) dot: bool,
    /// Mermaid output
    #[arg(long)]
    pub(super) mermaid: bool,
}

#[derive(Args, Debug)]
pub(super) struct ShowArgs {
    #[command(flatten)]
    pub(super) recipe: RecipeArgs,
    pub(super) step: String,
}

#[derive(Args, Debug)]
pub(super) struct OpsArgs {
    pub(super) name: Option<String>,
}

pub(super) fn plan(
    cli: &Cli,
    a: &PlanArgs,
    registry: &OpRegistry,
    reporter: &dyn Reporter,
) -> Result<(), Failure> {
    let PlanArgs {
        recipe: args,
        select,
        estimate,
        gpu,
        mfu,
    } = a;
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
    let store = open_store(cli)?;
    let plan = plan_for(
        &recipe,
        &graph,
        registry,
        &store,
        &select.selection(),
        reporter,
    )?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&plan.to_json()).unwrap());
    } else {
        print!("{}", render_plan(&recipe, &plan));
    }
    Ok(())
}

pub(super) fn dag(cli: &Cli, a: &DagArgs, registry: &OpRegistry) -> Result<(), Failure> {
    let DagArgs {
        recipe: args,
        dot,
        mermaid,
    } = a;
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

pub(super) fn show(
    cli: &Cli,
    a: &ShowArgs,
    registry: &OpRegistry,
    reporter: &dyn Reporter,
) -> Result<(), Failure> {
    let ShowArgs { recipe: args, step } = a;
    let (recipe, store, plan) = planned(cli, args, registry, reporter)?;
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

pub(super) fn ops(a: &OpsArgs, registry: &OpRegistry) -> Result<(), Failure> {
    let OpsArgs { name } = a;
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
