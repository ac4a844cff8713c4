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
            // 3: every metric present (acc_norm, bits per byte, exact_match), differences from
            // the first report.
            version: 3,
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

/// The metrics a table can show: header, path into a report, decimals.
const METRICS: [(&str, &[&str], usize); 8] = [
    ("token ppl", &["perplexity", "token_perplexity"], 2),
    ("word ppl", &["perplexity", "word_perplexity"], 1),
    ("bits/byte", &["perplexity", "bits_per_byte"], 4),
    ("acc", &["multiple_choice", "acc"], 4),
    ("acc_norm", &["multiple_choice", "acc_norm"], 4),
    (
        "em strict",
        &["generation", "exact_match", "strict-match"],
        4,
    ),
    (
        "em flexible",
        &["generation", "exact_match", "flexible-extract"],
        4,
    ),
    ("tokens/s", &["throughput", "tokens_per_second"], 0),
];

fn metric<'a>(report: &'a Value, path: &[&str]) -> Option<f64> {
    path.iter()
        .try_fold(report, |v, k| v.get(*k))
        .and_then(Value::as_f64)
}

/// Every metric any report has, one column each; rows after the first show their difference
/// from the first (`Δ`), the reference the others are compared with.
fn render(rows: &[Value]) -> String {
    // The label column fits the longest label.
    let w = rows
        .iter()
        .filter_map(|r| r["label"].as_str().map(|l| l.chars().count()))
        .max()
        .unwrap_or(0)
        .max(14);
    let shown: Vec<_> = METRICS
        .iter()
        .filter(|(_, path, _)| rows.iter().any(|r| metric(&r["report"], path).is_some()))
        .collect();
    let cell = |r: &Value, path: &[&str], d: usize| -> String {
        let Some(x) = metric(&r["report"], path) else {
            return "-".into();
        };
        match rows
            .first()
            .and_then(|first| metric(&first["report"], path))
        {
            Some(base) if !std::ptr::eq(r, &rows[0]) => format!("{x:.d$} ({:+.d$})", x - base),
            _ => format!("{x:.d$}"),
        }
    };
    let widths: Vec<usize> = shown
        .iter()
        .map(|(name, path, d)| {
            rows.iter()
                .map(|r| cell(r, path, *d).chars().count())
                .chain([name.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = format!("{:<w$} {:>11}", "model", "parameters");
    for ((name, _, _), cw) in shown.iter().zip(&widths) {
        out.push_str(&format!(" {name:>cw$}"));
    }
    out.push('\n');
    for r in rows {
        out.push_str(&format!(
            "{:<w$} {:>10.1}M",
            r["label"].as_str().unwrap_or("?"),
            r["report"]["model"]["parameters"].as_f64().unwrap_or(0.0) / 1e6,
        ));
        for ((_, path, d), cw) in shown.iter().zip(&widths) {
            out.push_str(&format!(" {:>cw$}", cell(r, path, *d)));
        }
        out.push('\n');
    }
    if rows.len() > 1 {
        out.push_str(&format!(
            "(in parentheses: the difference from {})\n",
            rows[0]["label"].as_str().unwrap_or("the first")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_present_is_shown_with_its_difference_from_the_first() {
        let rows = vec![
            json!({"label": "teacher", "report": {"model": {"parameters": 2e6},
                "perplexity": {"token_perplexity": 10.0},
                "multiple_choice": {"acc": 0.5, "acc_norm": 0.75}}}),
            json!({"label": "student", "report": {"model": {"parameters": 1e6},
                "perplexity": {"token_perplexity": 12.5},
                "multiple_choice": {"acc": 0.25, "acc_norm": 0.5},
                "generation": {"exact_match": {"strict-match": 0.125, "flexible-extract": 0.25}}}}),
        ];
        let t = render(&rows);
        for want in [
            "acc_norm",
            "em strict",
            "12.50 (+2.50)",
            "0.2500 (-0.2500)",
            "0.1250",
            "difference from teacher",
        ] {
            assert!(t.contains(want), "{want:?} in\n{t}");
        }
        assert!(!t.contains("tokens/s"), "no report has throughput:\n{t}");
    }
}
