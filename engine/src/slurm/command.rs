//! Slurm's own commands (`sbatch`, `scontrol`, `sacct`, `scancel`), run as a user would run them:
//! whatever `SLURM_CONF` and `PATH` say.

use std::path::Path;
use std::process::{Command, Output};

use super::job::JobInfo;

/// A Slurm command that could not be run or said no.
#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    #[error("cannot run `{command}` ({source}); is Slurm installed here and on PATH?")]
    Missing {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("`{command}` printed `{stdout}`, not a job id")]
    NoJobId { command: String, stdout: String },
}

fn run(program: &str, args: &[&str]) -> Result<Output, SlurmError> {
    use std::os::unix::process::CommandExt;
    let command = format!("{program} {}", args.join(" "));
    Command::new(program)
        .args(args)
        // Its own process group: Ctrl-C at the terminal reaches the executor, which cancels its
        // jobs, and not an sbatch mid-submission (whose job id would be lost).
        .process_group(0)
        .output()
        .map_err(|source| SlurmError::Missing {
            command: command.clone(),
            source,
        })
}

fn checked(program: &str, args: &[&str]) -> Result<String, SlurmError> {
    let out = run(program, args)?;
    if !out.status.success() {
        return Err(SlurmError::Failed {
            command: format!("{program} {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Submits a batch script; returns the job id.
///
/// # Errors
/// `sbatch` missing, refusing the job (an unknown partition, a limit), or printing no id.
pub fn sbatch(script: &Path, extra: &[String]) -> Result<String, SlurmError> {
    let script = script.to_string_lossy();
    let mut args: Vec<&str> = vec!["--parsable"];
    args.extend(extra.iter().map(String::as_str));
    args.push(&script);
    let stdout = checked("sbatch", &args)?;
    // `--parsable` prints `id` or `id;cluster`.
    let id = stdout.split(';').next().unwrap_or("").trim().to_string();
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit() || b == b'_') {
        return Err(SlurmError::NoJobId {
            command: format!("sbatch {}", args.join(" ")),
            stdout,
        });
    }
    Ok(id)
}

/// What Slurm says about a job: the controller while it remembers the job (`MinJobAge`), else
/// accounting (`sacct`) where a cluster has it. `None` when neither knows it.
///
/// # Errors
/// `scontrol` missing or failing for a reason other than a forgotten job.
pub fn job_info(id: &str) -> Result<Option<JobInfo>, SlurmError> {
    let out = run("scontrol", &["show", "job", "--oneliner", id])?;
    if out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(info) = text.lines().find_map(JobInfo::from_scontrol) {
            return Ok(Some(info));
        }
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !stderr.contains("Invalid job id") {
            return Err(SlurmError::Failed {
                command: format!("scontrol show job --oneliner {id}"),
                status: out.status.to_string(),
                stderr: stderr.trim().to_string(),
            });
        }
    }
    // Forgotten by the controller: accounting, if the cluster keeps it.
    let Ok(out) = run(
        "sacct",
        &[
            "--jobs",
            id,
            "--allocations",
            "--noheader",
            "--parsable2",
            "--format=State,ExitCode,Reason,NodeList",
        ],
    ) else {
        return Ok(None);
    };
    Ok(out
        .status
        .success()
        .then(|| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find_map(JobInfo::from_sacct)
        })
        .flatten())
}

/// Cancels these jobs (and only these).
///
/// # Errors
/// `scancel` missing or failing.
pub fn scancel(ids: &[String]) -> Result<(), SlurmError> {
    if ids.is_empty() {
        return Ok(());
    }
    let args: Vec<&str> = ids.iter().map(String::as_str).collect();
    checked("scancel", &args).map(|_| ())
}
