//! The `compare` op: evaluation reports side by side, as JSON and a table.

use std::path::Path;

use serde_json::{Value, json};

use crate::evaluate::REPORT_FILE;
use crate::op::{
    ArtifactKind, Op, OpContext, OpError, OpSignature, ParamSpec, ParamType, Params, Port, Problem,
};

pub struct Compare;

const PORTS: [&str; 6] = ["r1", "r2", "r3", "r4", "r5", "r6"];

impl Op for Compare {
    fn signature(&self) -> OpSignature {
        OpSignature {
            name: "compare",
            version: 2,
            doc: "put evaluation reports side by side",
            inputs: PORTS
                .iter()
                .map(|p| Port::optional(p, ArtifactKind::Report, "an evaluate report"))
                .collect(),
            output: ArtifactKind::Report,
            params: vec![ParamSpec::required(
                "labels",
                ParamType::StrList,
                "one label per wired report, in port order r1, r2, ...",
            )],
        }
    }

    fn check(&self, params: &Params) -> Vec<Problem> {
        match params.get("labels") {
            Some(crate::op::ParamValue::List(l)) if l.len() > PORTS.len() => {
                vec![Problem {
                    param: Some("labels".into()),
                    message: format!("at most {} reports", PORTS.len()),
                }]
            }
            _ => Vec::new(),
        }
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        let labels: Vec<String> = match ctx.params.get("labels") {
            Some(crate::op::ParamValue::List(l)) => l
                .iter()
                .map(|v| v.to_string().trim_matches('"').to_string())
                .collect(),
            _ => Vec::new(),
        };
        let mut rows = Vec::new();
        for (i, port) in PORTS.iter().enumerate() {
            let Some(a) = ctx.inputs.get(*port) else {
                continue;
            };
            let p = a.path.join(REPORT_FILE);
            let r: Value = serde_json::from_str(
                &std::fs::read_to_string(&p).map_err(|e| OpError::io(&p, "read", e))?,
            )
            .map_err(|e| OpError::Invalid(format!("{}: {e}", p.display())))?;
            rows.push(json!({"label": labels.get(i).cloned().unwrap_or_else(|| port.to_string()), "report": r}));
        }
        let table = render(&rows);
        let p = ctx.out_dir.join("comparison.json");
        std::fs::write(&p, serde_json::to_string_pretty(&rows).unwrap())
            .map_err(|e| OpError::io(&p, "write", e))?;
        let p = ctx.out_dir.join("comparison.txt");
        std::fs::write(&p, table).map_err(|e| OpError::io(&p, "write", e))
    }

    fn summarize(&self, out_dir: &Path) -> Option<String> {
        std::fs::read_to_string(out_dir.join("comparison.txt")).ok()
    }
}

fn render(rows: &[Value]) -> String {
    // The label column fits the longest label.
    let w = rows
        .iter()
        .filter_map(|r| r["label"].as_str().map(|l| l.chars().count()))
        .max()
        .unwrap_or(0)
        .max(14);
    let mut out = format!(
        "{:<w$} {:>11} {:>10} {:>10} {:>14} {:>10}\n",
        "model", "parameters", "token ppl", "word ppl", "pair acc", "tokens/s"
    );
    for r in rows {
        let rep = &r["report"];
        let f = |v: &Value, d: usize| {
            v.as_f64()
                .map(|x| format!("{x:.d$}"))
                .unwrap_or_else(|| "-".into())
        };
        let acc = match rep.get("multiple_choice") {
            Some(mc) => format!("{} ({}/{})", f(&mc["acc"], 3), mc["correct"], mc["items"]),
            None => "-".into(),
        };
        out.push_str(&format!(
            "{:<w$} {:>10.1}M {:>10} {:>10} {:>14} {:>10}\n",
            r["label"].as_str().unwrap_or("?"),
            rep["model"]["parameters"].as_f64().unwrap_or(0.0) / 1e6,
            f(&rep["perplexity"]["token_perplexity"], 2),
            f(&rep["perplexity"]["word_perplexity"], 1),
            acc,
            f(&rep["throughput"]["tokens_per_second"], 0),
        ));
    }
    out
}
