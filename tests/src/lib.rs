//! Test-only ops and helpers for the end-to-end tests. The ops are tiny and observable: each run
//! appends its step name to `$DISTILLERY_TEST_COUNTER`, so tests can count executions across
//! processes. None of this ships in the `distillery` binary.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use distillery_ops::{
    ArtifactKind, Op, OpContext, OpError, OpRegistry, OpSignature, ParamSpec, ParamType,
    ParamValue, Params, Port, Problem,
};

/// Appends a line to `$DISTILLERY_TEST_COUNTER`, when set.
fn count_line(line: &str) {
    if let Ok(path) = std::env::var("DISTILLERY_TEST_COUNTER") {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        // One `write` of the whole line: `writeln!` on a `File` writes the text and the newline
        // separately, and two jobs appending at once (Slurm runs them side by side) interleave.
        f.write_all(format!("{line}\n").as_bytes()).unwrap();
    }
}

fn count(ctx: &OpContext) {
    count_line(ctx.step);
}

fn common(ctx: &OpContext) -> Result<(), OpError> {
    count(ctx);
    let sleep = ctx.params.int("sleep_ms")?;
    if sleep > 0 && std::env::var_os("DISTILLERY_TEST_NO_SLEEP").is_none() {
        // Write half the output first, so a kill leaves a partial directory behind.
        std::fs::write(ctx.out_dir.join("partial.txt"), b"half")
            .map_err(|e| OpError::io(&ctx.out_dir, "write", e))?;
        ctx.progress.phase("sleeping", sleep as u64, "ms");
        std::thread::sleep(Duration::from_millis(sleep as u64));
        ctx.progress.set(sleep as u64);
    }
    if ctx.params.bool("fail")? {
        return Err(OpError::Failed("asked to fail".into()));
    }
    Ok(())
}

fn shared_params() -> Vec<ParamSpec> {
    vec![
        ParamSpec::with_default(
            "sleep_ms",
            ParamType::Int,
            ParamValue::Int(0),
            "sleep this long mid-write",
        ),
        ParamSpec::with_default(
            "fail",
            ParamType::Bool,
            ParamValue::Bool(false),
            "fail after sleeping",
        ),
    ]
}

/// `emit`: no inputs, writes its `text` param.
pub struct Emit;

impl Op for Emit {
    fn signature(&self) -> OpSignature {
        let mut params = vec![
            ParamSpec::with_default(
                "text",
                ParamType::Str,
                ParamValue::Str("x".into()),
                "what to write",
            ),
            ParamSpec::with_default("lr", ParamType::Float, ParamValue::Float(1e-4), "a float"),
            ParamSpec::with_default(
                "tokens",
                ParamType::Int,
                ParamValue::Int(1000),
                "an integer",
            ),
            ParamSpec::with_default(
                "mode",
                ParamType::Choice(&["fast", "slow"]),
                ParamValue::Str("fast".into()),
                "a choice",
            ),
            ParamSpec::optional("layers", ParamType::IntList, "a list"),
            ParamSpec::optional("hidden_size", ParamType::Int, "an optional integer"),
        ];
        params.extend(shared_params());
        OpSignature {
            name: "emit",
            version: 1,
            doc: "write a text (test op)",
            inputs: vec![],
            output: ArtifactKind::Report,
            params,
        }
    }

    fn check(&self, params: &Params) -> Vec<Problem> {
        match params.opt_int("hidden_size") {
            Ok(Some(h)) if h % 2 == 1 => vec![Problem {
                param: Some("hidden_size".into()),
                message: format!("hidden_size must be even, got {h}"),
            }],
            _ => vec![],
        }
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        common(ctx)?;
        let text = format!(
            "{}|{}|{}",
            ctx.params.str("text")?,
            ctx.params.float("lr")?,
            ctx.params.int("tokens")?
        );
        std::fs::write(ctx.out_dir.join("out.txt"), text)
            .map_err(|e| OpError::io(&ctx.out_dir, "write", e))?;
        let _ = std::fs::remove_file(ctx.out_dir.join("partial.txt"));
        Ok(())
    }

    fn summarize(&self, out_dir: &Path) -> Option<String> {
        std::fs::read_to_string(out_dir.join("out.txt"))
            .ok()
            .map(|t| format!("text: {t}"))
    }
}

/// `join`: concatenates the outputs of `left` and optional `right`.
pub struct Join;

impl Op for Join {
    fn signature(&self) -> OpSignature {
        let mut params = vec![ParamSpec::with_default(
            "sep",
            ParamType::Str,
            ParamValue::Str("+".into()),
            "separator",
        )];
        params.extend(shared_params());
        OpSignature {
            name: "join",
            version: 1,
            doc: "concatenate two reports (test op)",
            inputs: vec![
                Port::new("left", ArtifactKind::Report, "first"),
                Port::optional("right", ArtifactKind::Report, "second"),
            ],
            output: ArtifactKind::Report,
            params,
        }
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        common(ctx)?;
        let read = |port: &str| -> Result<String, OpError> {
            match ctx.inputs.get(port) {
                Some(a) => std::fs::read_to_string(a.path.join("out.txt"))
                    .map_err(|e| OpError::io(&a.path, "read", e)),
                None => Ok(String::new()),
            }
        };
        let text = format!(
            "({}{}{})",
            read("left")?,
            ctx.params.str("sep")?,
            read("right")?
        );
        std::fs::write(ctx.out_dir.join("out.txt"), text)
            .map_err(|e| OpError::io(&ctx.out_dir, "write", e))?;
        let _ = std::fs::remove_file(ctx.out_dir.join("partial.txt"));
        Ok(())
    }
}

/// `inspect`: takes a model and a dataset, lists what it was given.
pub struct Inspect;

impl Op for Inspect {
    fn signature(&self) -> OpSignature {
        OpSignature {
            name: "inspect",
            version: 1,
            doc: "list a model's and a dataset's files (test op)",
            inputs: vec![
                Port::new("model", ArtifactKind::Model, "a model"),
                Port::optional("data", ArtifactKind::Dataset, "a dataset"),
            ],
            output: ArtifactKind::Report,
            params: shared_params(),
        }
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        common(ctx)?;
        let model = ctx.input("model")?;
        let mut text = format!(
            "model {}\n",
            model.path.file_name().unwrap().to_string_lossy()
        );
        if let Some(d) = ctx.inputs.get("data") {
            for f in &d.files {
                text.push_str(&format!(
                    "data {}\n",
                    f.file_name().unwrap().to_string_lossy()
                ));
            }
        }
        std::fs::write(ctx.out_dir.join("out.txt"), text)
            .map_err(|e| OpError::io(&ctx.out_dir, "write", e))
    }
}

/// `stats`: makes a `stats` artifact, to test wiring by kind.
pub struct MakeStats;

impl Op for MakeStats {
    fn signature(&self) -> OpSignature {
        OpSignature {
            name: "stats",
            version: 1,
            doc: "produce a stats artifact (test op)",
            inputs: vec![],
            output: ArtifactKind::Stats,
            params: shared_params(),
        }
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        common(ctx)?;
        std::fs::write(ctx.out_dir.join("stats.bin"), [1u8, 2, 3])
            .map_err(|e| OpError::io(&ctx.out_dir, "write", e))
    }
}

/// `draw`: uses the recipe seed; writes it, and whether its scratch directory held anything
/// when it started (what `--force` must clear).
pub struct Draw;

impl Op for Draw {
    fn signature(&self) -> OpSignature {
        OpSignature {
            name: "draw",
            version: 1,
            doc: "write the recipe seed (test op)",
            inputs: vec![],
            output: ArtifactKind::Report,
            params: shared_params(),
        }
    }

    fn uses_seed(&self, _params: &Params) -> bool {
        true
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        let resumed = std::fs::read_dir(&ctx.scratch_dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        std::fs::write(ctx.scratch_dir.join("checkpoint"), b"state")
            .map_err(|e| OpError::io(&ctx.scratch_dir, "write", e))?;
        common(ctx)?;
        std::fs::write(
            ctx.out_dir.join("out.txt"),
            format!("seed {} resumed {resumed}", ctx.seed()?),
        )
        .map_err(|e| OpError::io(&ctx.out_dir, "write", e))
    }

    fn summarize(&self, out_dir: &Path) -> Option<String> {
        std::fs::read_to_string(out_dir.join("out.txt")).ok()
    }
}

/// `tick`: counts to `seconds`, one a second, checkpointing the count in its scratch directory
/// and resuming from it: a long step that a time limit or a kill interrupts. Each start is
/// appended to the counter as `STEP@COUNT`.
pub struct Tick;

impl Op for Tick {
    fn signature(&self) -> OpSignature {
        OpSignature {
            name: "tick",
            version: 1,
            doc: "count seconds, resumably (test op)",
            inputs: vec![],
            output: ArtifactKind::Report,
            params: vec![ParamSpec::with_default(
                "seconds",
                ParamType::Int,
                ParamValue::Int(3),
                "how long to count",
            )],
        }
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        let total = ctx.params.int("seconds")?.max(0) as u64;
        let ckpt = ctx.scratch_dir.join("count");
        let from: u64 = std::fs::read_to_string(&ckpt)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        count_line(&format!("{}@{from}", ctx.step));
        ctx.progress.phase("ticking", total, "s");
        for i in from..total {
            std::thread::sleep(Duration::from_secs(1));
            let tmp = ctx.scratch_dir.join("count.tmp");
            std::fs::write(&tmp, (i + 1).to_string())
                .and_then(|()| std::fs::rename(&tmp, &ckpt))
                .map_err(|e| OpError::io(&ckpt, "write", e))?;
            ctx.progress.set(i + 1);
        }
        std::fs::write(
            ctx.out_dir.join("out.txt"),
            format!("counted to {total}, resumed at {from}"),
        )
        .map_err(|e| OpError::io(&ctx.out_dir, "write", e))
    }
}

/// The shipped ops plus the test ops.
pub fn registry() -> OpRegistry {
    let mut r = distillery_ops::builtin();
    r.register(Emit)
        .register(Join)
        .register(Inspect)
        .register(MakeStats)
        .register(Draw)
        .register(Tick);
    r
}
