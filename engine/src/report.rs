//! Run events and their two renderings: indicatif bars for a terminal (plain lines otherwise)
//! and NDJSON for machines (`--json`).

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

/// Something that happened during a run.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Plan {
        plan: serde_json::Value,
    },
    Hashing {
        source: String,
        done: u64,
        total: u64,
    },
    StepStarted {
        step: String,
        op: String,
        key: String,
    },
    StepWaiting {
        step: String,
        holder: String,
    },
    Progress {
        step: String,
        label: String,
        done: u64,
        total: u64,
        unit: String,
        /// The op's latest figures (`"loss 2.31, 840 tokens/s"`), when it gives any.
        #[serde(skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    Note {
        step: String,
        message: String,
    },
    /// A step submitted as a batch job (`--executor slurm`); `attempt` is 1 for the first
    /// submission, 2 for the first resubmission after a time limit, preemption or node failure.
    JobSubmitted {
        step: String,
        job_id: String,
        log: String,
        attempt: u32,
    },
    /// A step's job changed state: pending, running, completed, failed, cancelled, timed out,
    /// node failure, preempted, out of memory.
    JobState {
        step: String,
        job_id: String,
        state: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        nodes: Option<String>,
    },
    StepFinished {
        step: String,
        key: String,
        seconds: f64,
        outcome: String,
    },
    StepFailed {
        step: String,
        error: String,
    },
    RunFinished {
        ran: usize,
        cached: usize,
        failed: usize,
        seconds: f64,
    },
}

pub trait Reporter: Send + Sync {
    fn event(&self, event: Event);
}

/// NDJSON on stdout (or stderr); progress throttled to a few lines a second per step.
pub struct JsonReporter {
    last: Mutex<HashMap<String, Instant>>,
    stderr: bool,
}

impl JsonReporter {
    pub fn new() -> Self {
        JsonReporter {
            last: Mutex::new(HashMap::new()),
            stderr: false,
        }
    }

    /// Events on stderr: for commands whose stdout is one JSON document (`plan --json`).
    pub fn on_stderr() -> Self {
        JsonReporter {
            stderr: true,
            ..Self::new()
        }
    }
}

impl Default for JsonReporter {
    fn default() -> Self {
        Self::new()
    }
}

impl Reporter for JsonReporter {
    fn event(&self, event: Event) {
        if let Event::Progress {
            step, done, total, ..
        } = &event
        {
            let mut last = self.last.lock().unwrap();
            let now = Instant::now();
            let due = last
                .get(step)
                .is_none_or(|t| now.duration_since(*t) > Duration::from_millis(250));
            if !due && done < total {
                return;
            }
            last.insert(step.clone(), now);
        }
        let line = serde_json::to_string(&event).unwrap();
        let mut out: Box<dyn Write> = if self.stderr {
            Box::new(std::io::stderr().lock())
        } else {
            Box::new(std::io::stdout().lock())
        };
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// Bars on a terminal; on anything else (a Slurm log, `| tee`), plain lines: one per step start
/// and end, and progress every `DISTILLERY_PROGRESS_INTERVAL` seconds (30 by default) per step.
pub struct HumanReporter {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
    /// Per step, the phase its log lines are about.
    plain: Mutex<HashMap<String, PlainPhase>>,
    interval: Duration,
    tty: bool,
    quiet: bool,
}

/// A phase as the log lines see it.
struct PlainPhase {
    label: String,
    /// When and at how much work done the phase was first seen (a resumed step starts past 0).
    since: Instant,
    done_at_start: u64,
    last_line: Option<Instant>,
}

/// `1h02m`, `3m05s`, `42s`: an ETA for a log line.
fn short_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

impl HumanReporter {
    pub fn new(quiet: bool) -> Self {
        let tty = std::io::stderr().is_terminal();
        let multi = MultiProgress::with_draw_target(if tty && !quiet {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        let interval = std::env::var("DISTILLERY_PROGRESS_INTERVAL")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
            .map(Duration::from_secs_f64)
            .unwrap_or(Duration::from_secs(30));
        HumanReporter {
            multi,
            bars: Mutex::new(HashMap::new()),
            plain: Mutex::new(HashMap::new()),
            interval,
            tty,
            quiet,
        }
    }

    fn line(&self, text: String) {
        if self.quiet {
            return;
        }
        if self.tty {
            let _ = self.multi.println(text);
        } else {
            eprintln!("{text}");
        }
    }

    fn bar(&self, id: &str, make: impl FnOnce() -> ProgressBar) -> ProgressBar {
        let mut bars = self.bars.lock().unwrap();
        bars.entry(id.to_string())
            .or_insert_with(|| self.multi.add(make()))
            .clone()
    }

    /// A progress line for a log, at most every `interval` per step (and at a phase's end):
    /// `step: label done/total unit (rate unit/s, eta 3m05s) detail`.
    fn plain_progress(
        &self,
        step: &str,
        label: &str,
        done: u64,
        total: u64,
        unit: &str,
        detail: Option<&str>,
    ) {
        if self.quiet {
            return;
        }
        let now = Instant::now();
        let mut plain = self.plain.lock().unwrap();
        let fresh = || PlainPhase {
            label: label.to_string(),
            since: now,
            done_at_start: done,
            last_line: None,
        };
        let phase = plain.entry(step.to_string()).or_insert_with(fresh);
        if phase.label != label {
            *phase = fresh();
        }
        let due = phase
            .last_line
            .is_none_or(|t| now.duration_since(t) >= self.interval);
        let last_of_phase = total > 0 && done >= total;
        if done <= phase.done_at_start || !(due || last_of_phase) {
            return;
        }
        phase.last_line = Some(now);
        let secs = now.duration_since(phase.since).as_secs_f64().max(1e-9);
        let rate = (done - phase.done_at_start) as f64 / secs;
        let eta = if rate > 0.0 && total > done {
            format!(", eta {}", short_duration((total - done) as f64 / rate))
        } else {
            String::new()
        };
        let detail = detail.map(|d| format!(" {d}")).unwrap_or_default();
        drop(plain);
        self.line(format!(
            "{:>14} {step}: {label} {done}/{total} {unit} ({rate:.2} {unit}/s{eta}){detail}",
            "progress"
        ));
    }

    fn finish_bar(&self, id: &str) {
        if let Some(bar) = self.bars.lock().unwrap().remove(id) {
            bar.finish_and_clear();
            self.multi.remove(&bar);
        }
    }
}

fn style(unit: &str) -> ProgressStyle {
    ProgressStyle::with_template(&format!(
        "{{prefix:>14.bold}} {{msg:<18}} [{{bar:30}}] {{human_pos}}/{{human_len}} {unit} {{per_sec}} eta {{eta}}"
    ))
    .unwrap()
    .progress_chars("=> ")
}

impl Reporter for HumanReporter {
    fn event(&self, event: Event) {
        match event {
            Event::Plan { .. } => {}
            Event::Hashing {
                source,
                done,
                total,
            } => {
                let id = format!("hash:{source}");
                let bar = self.bar(&id, || {
                    let b = ProgressBar::new(total);
                    b.set_style(
                        ProgressStyle::with_template("{prefix:>14.bold} hashing [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
                            .unwrap()
                            .progress_chars("=> "),
                    );
                    b.set_prefix(source.clone());
                    b
                });
                bar.set_position(done);
                if done >= total {
                    self.finish_bar(&id);
                }
            }
            Event::StepStarted { step, op, key } => {
                self.line(format!("{:>14} {step} ({op}) {}", "running", &key[..12]));
            }
            Event::StepWaiting { step, holder } => {
                self.line(format!(
                    "{:>14} {step}: another run holds its lock ({holder})",
                    "waiting"
                ));
            }
            Event::Progress {
                step,
                label,
                done,
                total,
                unit,
                detail,
            } => {
                if !self.tty {
                    self.plain_progress(&step, &label, done, total, &unit, detail.as_deref());
                    return;
                }
                let bar = self.bar(&step, || {
                    let b = ProgressBar::new(total);
                    b.set_prefix(step.clone());
                    b
                });
                if bar.length() != Some(total) || bar.message() != label {
                    bar.set_style(style(&unit));
                    bar.set_length(total);
                    bar.set_message(label);
                    bar.reset();
                }
                bar.set_position(done);
            }
            Event::Note { step, message } => self.line(format!("{:>14} {step}: {message}", "note")),
            Event::JobSubmitted {
                step,
                job_id,
                log,
                attempt,
            } => {
                let again = if attempt > 1 {
                    format!(", attempt {attempt}")
                } else {
                    String::new()
                };
                self.line(format!(
                    "{:>14} {step}: job {job_id}{again}, log {log}",
                    "submitted"
                ));
            }
            Event::JobState {
                step,
                job_id,
                state,
                reason,
                nodes,
            } => {
                let on = nodes.map(|n| format!(" on {n}")).unwrap_or_default();
                let why = reason.map(|r| format!(" ({r})")).unwrap_or_default();
                self.line(format!(
                    "{:>14} {step}: job {job_id} {state}{on}{why}",
                    "job"
                ));
            }
            Event::StepFinished {
                step,
                key,
                seconds,
                outcome,
            } => {
                self.finish_bar(&step);
                self.line(format!(
                    "{:>14} {step} in {seconds:.2}s ({outcome}) {}",
                    "finished",
                    &key[..12]
                ));
            }
            Event::StepFailed { step, error } => {
                self.finish_bar(&step);
                self.line(format!("{:>14} {step}: {error}", "FAILED"));
            }
            Event::RunFinished {
                ran,
                cached,
                failed,
                seconds,
            } => {
                self.line(format!(
                    "{ran} ran, {cached} cached, {failed} failed in {seconds:.2}s"
                ));
            }
        }
    }
}

/// The op-facing side of progress for one step.
pub struct StepProgress<'a> {
    pub step: String,
    pub reporter: &'a dyn Reporter,
    state: Mutex<(String, u64, String)>,
}

impl<'a> StepProgress<'a> {
    pub fn new(step: &str, reporter: &'a dyn Reporter) -> Self {
        StepProgress {
            step: step.to_string(),
            reporter,
            state: Mutex::new((String::new(), 0, String::new())),
        }
    }

    fn progress(&self, done: u64, detail: Option<String>) {
        let (label, total, unit) = self.state.lock().unwrap().clone();
        self.reporter.event(Event::Progress {
            step: self.step.clone(),
            label,
            done,
            total,
            unit,
            detail,
        });
    }
}

impl distillery_ops::Progress for StepProgress<'_> {
    fn phase(&self, label: &str, total: u64, unit: &str) {
        *self.state.lock().unwrap() = (label.to_string(), total, unit.to_string());
        self.set(0);
    }

    fn set(&self, done: u64) {
        self.progress(done, None);
    }

    fn set_with(&self, done: u64, detail: &str) {
        self.progress(done, Some(detail.to_string()));
    }

    fn note(&self, message: &str) {
        self.reporter.event(Event::Note {
            step: self.step.clone(),
            message: message.to_string(),
        });
    }
}
