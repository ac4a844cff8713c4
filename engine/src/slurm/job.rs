//! One step as one Slurm job: its batch script, and the job's state as Slurm reports it.

use std::path::PathBuf;

use super::settings::slurm_time;

/// A job's state, from Slurm's `JobState` names (squeue's long forms).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    Pending,
    Running,
    Completed,
    Failed,
    /// By `scancel` (a user or an administrator).
    Cancelled,
    /// Ended by its time limit.
    TimedOut,
    NodeFailure,
    Preempted,
    OutOfMemory,
}

impl JobState {
    /// `COMPLETED`, `CANCELLED by 0`, `RUNNING`, ... Unknown names count as running: Slurm
    /// has transient states (`STAGE_OUT`, `SIGNALING`, `RESIZING`) that end in one of the above.
    pub fn from_slurm(text: &str) -> JobState {
        let word = text.split_whitespace().next().unwrap_or("");
        match word.trim_end_matches('+') {
            "PENDING" | "CONFIGURING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED"
            | "RESV_DEL_HOLD" | "SUSPENDED" | "STOPPED" => JobState::Pending,
            "COMPLETED" => JobState::Completed,
            "FAILED" | "DEADLINE" | "SPECIAL_EXIT" | "REVOKED" => JobState::Failed,
            "CANCELLED" => JobState::Cancelled,
            "TIMEOUT" => JobState::TimedOut,
            // A node that failed to boot is the node's failure, not the step's.
            "NODE_FAIL" | "BOOT_FAIL" => JobState::NodeFailure,
            "PREEMPTED" => JobState::Preempted,
            "OUT_OF_MEMORY" => JobState::OutOfMemory,
            _ => JobState::Running,
        }
    }

    pub fn is_finished(self) -> bool {
        !matches!(self, JobState::Pending | JobState::Running)
    }

    /// Ended by something other than the step itself: the job is submitted again and the
    /// step resumes from its scratch checkpoint.
    pub fn is_requeueable(self) -> bool {
        matches!(
            self,
            JobState::TimedOut | JobState::NodeFailure | JobState::Preempted
        )
    }

    /// The name in progress lines and `--json` events.
    pub fn name(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::TimedOut => "timed out",
            JobState::NodeFailure => "node failure",
            JobState::Preempted => "preempted",
            JobState::OutOfMemory => "out of memory",
        }
    }
}

/// What Slurm says about a job.
#[derive(Clone, Debug, PartialEq)]
pub struct JobInfo {
    pub state: JobState,
    /// Why it is pending, or why it ended (`Reason=`), when Slurm gives one.
    pub reason: Option<String>,
    /// `ExitCode=3:0`: the batch script's exit status and the signal that ended it.
    pub exit_code: Option<String>,
    pub nodes: Option<String>,
}

impl JobInfo {
    /// From `scontrol show job --oneliner`: `Key=Value` pairs separated by spaces (a value may
    /// hold spaces: words without `=` belong to the value before them).
    pub fn from_scontrol(line: &str) -> Option<JobInfo> {
        let mut fields: Vec<(&str, String)> = Vec::new();
        for word in line.split_whitespace() {
            match word.split_once('=') {
                Some((k, v))
                    if !k.is_empty()
                        && k.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"/:_".contains(&b)) =>
                {
                    fields.push((k, v.to_string()))
                }
                _ => {
                    if let Some((_, v)) = fields.last_mut() {
                        v.push(' ');
                        v.push_str(word);
                    }
                }
            }
        }
        let get = |key: &str| {
            fields
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.clone())
                .filter(|v| !v.is_empty() && v != "None" && v != "(null)")
        };
        Some(JobInfo {
            state: JobState::from_slurm(&get("JobState")?),
            reason: get("Reason"),
            exit_code: get("ExitCode"),
            nodes: get("NodeList"),
        })
    }

    /// From `sacct --parsable2 --noheader --allocations --format=State,ExitCode,Reason,NodeList`
    /// (for jobs the controller has forgotten, where accounting is on).
    pub fn from_sacct(line: &str) -> Option<JobInfo> {
        let mut parts = line.trim().split('|');
        let state = JobState::from_slurm(parts.next().filter(|s| !s.is_empty())?);
        let opt = |s: Option<&str>| {
            s.filter(|s| !s.is_empty() && *s != "None")
                .map(String::from)
        };
        Some(JobInfo {
            state,
            exit_code: opt(parts.next()),
            reason: opt(parts.next()),
            nodes: opt(parts.next()),
        })
    }
}

/// The batch script of one step's job.
#[derive(Clone, Debug)]
pub struct JobSpec {
    pub name: String,
    /// The job's log (`--output`; `%j` is the job id).
    pub log: PathBuf,
    pub workdir: PathBuf,
    /// CPUs of each task.
    pub cpus: Option<usize>,
    /// GPUs of the job; with several tasks, one per task.
    pub gpus: Option<usize>,
    /// Bytes, of each task.
    pub memory: Option<u64>,
    /// Tasks (data-parallel ranks), over `nodes` nodes. With more than one, the step's command
    /// runs once, on the first node, and starts the ranks with `srun` itself.
    pub tasks: usize,
    pub nodes: usize,
    /// Seconds.
    pub time: Option<u64>,
    pub partition: Option<String>,
    pub account: Option<String>,
    /// The step's command, run through `srun` inside the allocation.
    pub command: Vec<String>,
}

fn quote(s: &str) -> String {
    shlex::try_quote(s)
        .map(|q| q.into_owned())
        .unwrap_or_else(|_| format!("'{}'", s.replace('\0', "")))
}

impl JobSpec {
    /// The script `sbatch` takes: the allocation in `#SBATCH` lines, then `srun` of the step's
    /// command. Slurm's own requeue is off: the executor resubmits a job ended by its time
    /// limit, a preemption or a node failure, so that each attempt is one job it knows of.
    pub fn script(&self) -> String {
        let mut lines = vec!["#!/bin/sh".to_string()];
        let mut opt = |flag: &str, value: String| lines.push(format!("#SBATCH --{flag}={value}"));
        // Slurm splits #SBATCH lines at spaces: names and paths are quoted.
        opt("job-name", quote(&self.name));
        opt("output", quote(&self.log.to_string_lossy()));
        opt("open-mode", "append".into());
        opt("chdir", quote(&self.workdir.to_string_lossy()));
        let (tasks, nodes) = (self.tasks.max(1), self.nodes.max(1));
        opt("nodes", nodes.to_string());
        opt("ntasks", tasks.to_string());
        if let Some(c) = self.cpus {
            opt("cpus-per-task", c.to_string());
        }
        match self.gpus {
            Some(_) if tasks > 1 => opt("gpus-per-task", "1".into()),
            Some(g) => opt("gpus", g.to_string()),
            None => {}
        }
        if let Some(m) = self.memory {
            // --mem is per node.
            let per_node = m * tasks.div_ceil(nodes) as u64;
            opt("mem", format!("{}M", per_node.div_ceil(1 << 20)));
        }
        if let Some(t) = self.time {
            opt("time", slurm_time(t));
        }
        if let Some(p) = &self.partition {
            opt("partition", quote(p));
        }
        if let Some(a) = &self.account {
            opt("account", quote(a));
        }
        lines.push("#SBATCH --no-requeue".into());
        let argv: Vec<String> = self.command.iter().map(|a| quote(a)).collect();
        if tasks > 1 {
            lines.push(format!("exec {}", argv.join(" ")));
            return lines.join("\n") + "\n";
        }
        let mut srun = vec!["srun".to_string(), "--ntasks=1".into()];
        if let Some(c) = self.cpus {
            // srun does not take the allocation's cpus-per-task from the environment (Slurm ≥ 22.05).
            srun.push(format!("--cpus-per-task={c}"));
        }
        lines.push(format!("exec {} {}", srun.join(" "), argv.join(" ")));
        lines.join("\n") + "\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_from_slurm_names() {
        assert_eq!(JobState::from_slurm("CANCELLED by 0"), JobState::Cancelled);
        assert_eq!(JobState::from_slurm("COMPLETED"), JobState::Completed);
        assert_eq!(JobState::from_slurm("CANCELLED+"), JobState::Cancelled);
        assert_eq!(JobState::from_slurm("TIMEOUT"), JobState::TimedOut);
        assert_eq!(JobState::from_slurm("COMPLETING"), JobState::Running);
        assert_eq!(JobState::from_slurm("REQUEUED"), JobState::Pending);
        assert!(JobState::TimedOut.is_requeueable() && JobState::Preempted.is_requeueable());
        assert!(!JobState::Failed.is_requeueable() && !JobState::Cancelled.is_requeueable());
    }

    #[test]
    fn scontrol_oneliner() {
        let line = "JobId=7 JobName=distillery train UserId=root(0) JobState=TIMEOUT Reason=TimeLimit Dependency=(null) ExitCode=0:15 NodeList=node[1-2] Command=/a b/c.sh";
        let info = JobInfo::from_scontrol(line).unwrap();
        assert_eq!(info.state, JobState::TimedOut);
        assert_eq!(info.reason.as_deref(), Some("TimeLimit"));
        assert_eq!(info.exit_code.as_deref(), Some("0:15"));
        assert_eq!(info.nodes.as_deref(), Some("node[1-2]"));
        let info = JobInfo::from_sacct("FAILED|3:0|None|localhost").unwrap();
        assert_eq!(info.state, JobState::Failed);
        assert_eq!(info.exit_code.as_deref(), Some("3:0"));
        assert_eq!(info.reason, None);
    }

    #[test]
    fn script_holds_the_allocation_and_quotes_the_command() {
        let spec = JobSpec {
            name: "distillery demo/train".into(),
            log: "/shared/logs/train-%j.log".into(),
            workdir: "/shared/work dir".into(),
            cpus: Some(8),
            gpus: Some(4),
            memory: Some(80 << 30),
            time: Some(5400),
            partition: Some("gpu".into()),
            account: None,
            tasks: 1,
            nodes: 1,
            command: vec![
                "/opt/distillery".into(),
                "run-step".into(),
                "a b.toml".into(),
            ],
        };
        let s = spec.script();
        for line in [
            "#SBATCH --job-name='distillery demo/train'",
            "#SBATCH --chdir='/shared/work dir'",
            "#SBATCH --cpus-per-task=8",
            "#SBATCH --gpus=4",
            "#SBATCH --mem=81920M",
            "#SBATCH --time=0-01:30:00",
            "#SBATCH --partition=gpu",
            "exec srun --ntasks=1 --cpus-per-task=8 /opt/distillery run-step 'a b.toml'",
        ] {
            assert!(s.lines().any(|l| l == line), "{line} missing from\n{s}");
        }
        assert!(!s.contains("--account"));

        // Data-parallel: the tasks in the allocation, one GPU each; the command starts them.
        let ranks = JobSpec {
            tasks: 8,
            nodes: 2,
            gpus: Some(8),
            command: vec![
                "/opt/distillery".into(),
                "run-step".into(),
                "--launcher".into(),
                "srun".into(),
            ],
            ..spec
        };
        let s = ranks.script();
        for line in [
            "#SBATCH --nodes=2",
            "#SBATCH --ntasks=8",
            "#SBATCH --gpus-per-task=1",
            "#SBATCH --mem=327680M",
            "exec /opt/distillery run-step --launcher srun",
        ] {
            assert!(s.lines().any(|l| l == line), "{line} missing from\n{s}");
        }
        assert!(!s.contains("--gpus=") && !s.contains("srun --ntasks"));
    }
}
