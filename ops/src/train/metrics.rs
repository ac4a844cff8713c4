//! What training reports: validation loss, the loss curve, the non-finite stop's message and the
//! summary `show` prints.

use super::*;

/// Mean loss over held-out sequences (no gradients).
pub(super) fn validation_loss(
    objective: &dyn Objective,
    model: &Student<TB>,
    val: &Packed,
    micro: usize,
    device: &Device,
) -> f64 {
    if val.tokens.is_empty() {
        return f64::NAN;
    }
    let mut total = 0.0;
    let mut n = 0;
    for chunk in val.chunks(micro) {
        let (input, targets, trained) = split(&chunk);
        // Weighted by sequences, or by marked targets in chat data (none: no weight).
        let weight = match &trained {
            None => chunk.tokens.len(),
            Some(_) => chunk.trained_targets(),
        };
        if weight == 0 {
            continue;
        }
        let l = objective.loss(
            model,
            &input,
            &targets,
            trained.as_deref(),
            chunk.tokens.len(),
            device,
        );
        total += l.into_data().convert::<f64>().to_vec::<f64>().unwrap()[0] * weight as f64;
        n += weight;
    }
    if n == 0 {
        return f64::NAN;
    }
    total / n as f64
}

pub(super) fn nan_error(
    step: usize,
    what: &str,
    param: Option<&str>,
    cause: Option<String>,
    last: usize,
    ckpt: &Path,
) -> OpError {
    let at = param
        .map(|p| format!(" (first non-finite gradient: parameter `{p}`)"))
        .unwrap_or_default();
    let resume = if last > 0 {
        format!(
            "the last good checkpoint is step {last} in {}",
            ckpt.display()
        )
    } else {
        "no checkpoint was written yet".into()
    };
    let fix = match cause {
        // Not the student's learning: no learning rate helps.
        Some(cause) => cause,
        None => "lower lr or raise warmup_steps".into(),
    };
    OpError::Failed(format!(
        "non-finite {what} at step {}{at}; nothing was committed; {resume}; {fix}",
        step + 1
    ))
}

pub(super) fn loss_svg(title: &str, losses: &[f64]) -> String {
    let (w, h, pad) = (640.0, 320.0, 40.0);
    let finite: Vec<f64> = losses.iter().copied().filter(|x| x.is_finite()).collect();
    let (lo, hi) = finite
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    let span = (hi - lo).max(1e-9);
    let n = losses.len().max(2) as f64;
    let points: Vec<String> = losses
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .map(|(i, l)| {
            format!(
                "{:.1},{:.1}",
                pad + (w - 2.0 * pad) * i as f64 / (n - 1.0),
                h - pad - (h - 2.0 * pad) * (l - lo) / span
            )
        })
        .collect();
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\"><rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
         <text x=\"{pad}\" y=\"20\" font-family=\"sans-serif\" font-size=\"13\">{title} loss per step ({lo:.3} .. {hi:.3})</text>\
         <polyline fill=\"none\" stroke=\"#c0392b\" stroke-width=\"1.5\" points=\"{}\"/></svg>\n",
        points.join(" ")
    )
}

/// Reads the summary of a training output for `show`.
pub fn summarize(out_dir: &Path) -> Option<String> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("train.json")).ok()?).ok()?;
    let objective = v["objective"].as_str()?;
    // exp(loss) is a perplexity only for cross-entropy; of a KL it is a meaningless (often
    // overflowing) number (field case 15).
    let perplexity = match (objective, v["final_val_perplexity"].as_f64()) {
        ("cross_entropy", Some(p)) => format!(" (perplexity {p:.2})"),
        _ => String::new(),
    };
    Some(format!(
        "{objective} for {} steps ({} tokens): final loss {:.4}, validation loss {:.4}{perplexity}, {:.0} tokens/s",
        v["steps"],
        v["tokens"],
        v["final_loss"].as_f64().unwrap_or(f64::NAN),
        v["final_val_loss"].as_f64().unwrap_or(f64::NAN),
        v["tokens_per_second_this_run"].as_f64().unwrap_or(0.0)
    ))
}
