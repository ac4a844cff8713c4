//! Executor settings: which executor runs a recipe's steps and, for Slurm, the partition, account,
//! default time limit and extra `sbatch` flags. They come from three places, the first one that
//! says wins: the command line, the recipe's `[executor]` table, the user's config file
//! (`$XDG_CONFIG_HOME/distillery/config.toml`, `[executor]`). None of them is part of a key.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where a recipe's steps run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    /// In this process, in parallel where the declared resources allow.
    Local,
    /// One Slurm job per step that must run.
    Slurm,
}

impl ExecutorKind {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "local" => Some(Self::Local),
            "slurm" => Some(Self::Slurm),
            _ => None,
        }
    }
}

/// The `[executor]` table, every field optional; [`ExecutorSettings::or`] layers them.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutorSettings {
    pub kind: Option<ExecutorKind>,
    /// `sbatch --partition`
    pub partition: Option<String>,
    /// `sbatch --account`
    pub account: Option<String>,
    /// The time limit of a step's job when its `resources.time` says none, in seconds.
    #[serde(default, deserialize_with = "de_time")]
    pub time: Option<u64>,
    /// More `sbatch` flags, one argument each (`["--qos=high", "--constraint=h100"]`).
    /// Layers add up (the user config's first, the command line's last: sbatch takes the last
    /// of a repeated flag).
    pub sbatch_args: Option<Vec<String>>,
    /// How many times a job ended by its time limit, preemption or a node failure is
    /// resubmitted (it resumes from its step's scratch checkpoint). 2 when unset.
    pub max_requeue: Option<u32>,
}

fn de_time<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let text = String::deserialize(d)?;
    parse_time(&text).map(Some).ok_or_else(|| {
        serde::de::Error::custom(format!("`{text}` is not a time limit; {TIME_HELP}"))
    })
}

/// How to write a time limit, for error messages.
pub const TIME_HELP: &str = "write it as Slurm does (\"90\" minutes, \"4:00:00\", \"1-12:00:00\") or as \"90m\", \"4h\", \"2d\"";

impl ExecutorSettings {
    /// Fields of `self`, and where `self` has none, those of `base`.
    pub fn or(self, base: ExecutorSettings) -> ExecutorSettings {
        ExecutorSettings {
            kind: self.kind.or(base.kind),
            partition: self.partition.or(base.partition),
            account: self.account.or(base.account),
            time: self.time.or(base.time),
            sbatch_args: match (base.sbatch_args, self.sbatch_args) {
                (Some(mut b), Some(s)) => {
                    b.extend(s);
                    Some(b)
                }
                (b, s) => s.or(b),
            },
            max_requeue: self.max_requeue.or(base.max_requeue),
        }
    }
}

/// `sbatch` flags the executor sets itself: a user's would break what it relies on (the log it
/// shows, one job per attempt, a job id on stdout).
const OWN_SBATCH_FLAGS: &[(&str, &str)] = &[
    ("--output", "-o"),
    ("--error", "-e"),
    ("--open-mode", ""),
    ("--array", "-a"),
    ("--wait", "-W"),
    ("--requeue", ""),
    ("--no-requeue", ""),
    ("--parsable", ""),
    ("--ntasks", "-n"),
    ("--nodes", "-N"),
    ("--cpus-per-task", "-c"),
    ("--job-name", "-J"),
    ("--chdir", "-D"),
    ("--wrap", ""),
];

/// Refuses extra `sbatch` flags that the executor sets itself.
///
/// # Errors
/// The first such flag, named, with why.
pub fn check_sbatch_args(args: &[String]) -> Result<(), String> {
    for arg in args {
        let name = arg.split('=').next().unwrap_or(arg);
        let own = OWN_SBATCH_FLAGS.iter().find(|(long, short)| {
            name == *long
                || (!short.is_empty()
                    && (name == *short || (name.starts_with(short) && !name.starts_with("--"))))
        });
        if let Some((long, _)) = own {
            return Err(format!(
                "sbatch flag `{arg}` (from --sbatch-arg, or sbatch_args in the recipe's or the user config's [executor]): distillery sets {long} itself (each step is one job of one task, named distillery:RECIPE:STEP, its threads from resources.threads, its log in the cache's logs/slurm, resubmitted by distillery)"
            ));
        }
    }
    Ok(())
}

/// The user's config file: `$XDG_CONFIG_HOME/distillery/config.toml`, else
/// `~/.config/distillery/config.toml`; `DISTILLERY_CONFIG` names another one.
pub fn user_config_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DISTILLERY_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".config")))?;
    Some(base.join("distillery").join("config.toml"))
}

/// A user config file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    pub path: PathBuf,
    pub message: String,
}

/// The `[executor]` table of the user's config file; empty settings when there is no file.
///
/// # Errors
/// `DISTILLERY_CONFIG` naming a missing file; a file that exists but cannot be read, is not TOML, has keys other than `[executor]`, or an
/// `[executor]` with unknown or mistyped fields.
pub fn user_settings() -> Result<ExecutorSettings, ConfigError> {
    let Some(path) = user_config_path() else {
        return Ok(ExecutorSettings::default());
    };
    let named = std::env::var_os("DISTILLERY_CONFIG").is_some_and(|p| !p.is_empty());
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        // The default file is optional; one named by DISTILLERY_CONFIG is meant to be there.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !named => {
            return Ok(ExecutorSettings::default());
        }
        Err(e) => {
            return Err(ConfigError {
                path,
                message: format!("cannot read it: {e}"),
            });
        }
    };
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct UserConfig {
        #[serde(default)]
        executor: ExecutorSettings,
    }
    toml::from_str::<UserConfig>(&text)
        .map(|c| c.executor)
        .map_err(|e| ConfigError {
            path,
            message: e.to_string(),
        })
}

/// A time limit in seconds, from Slurm's forms (`MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`,
/// `D-HH:MM:SS`) or a number with a unit (`90s`, `90m`, `4h`, `2d`). `None` for anything else
/// and for zero.
pub fn parse_time(text: &str) -> Option<u64> {
    let t = text.trim();
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let secs = if let Some((unit_at, unit)) = t
        .char_indices()
        .last()
        .filter(|(_, c)| c.is_ascii_alphabetic())
    {
        let n = num(&t[..unit_at])?;
        n.checked_mul(match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return None,
        })?
    } else if let Some((days, rest)) = t.split_once('-') {
        let parts: Vec<u64> = rest.split(':').map(num).collect::<Option<_>>()?;
        let (h, m, s) = match parts.as_slice() {
            [h] => (*h, 0, 0),
            [h, m] => (*h, *m, 0),
            [h, m, s] => (*h, *m, *s),
            _ => return None,
        };
        // After a day count, hours are below 24; minutes and seconds always below 60.
        if h >= 24 || m >= 60 || s >= 60 {
            return None;
        }
        seconds(num(days)?, h, m, s)?
    } else {
        let parts: Vec<u64> = t.split(':').map(num).collect::<Option<_>>()?;
        match parts.as_slice() {
            [m] => seconds(0, 0, *m, 0)?,
            [m, s] if *s < 60 => seconds(0, 0, *m, *s)?,
            [h, m, s] if *m < 60 && *s < 60 => seconds(0, *h, *m, *s)?,
            _ => return None,
        }
    };
    (secs > 0).then_some(secs)
}

/// `d` days + `h` hours + `m` minutes + `s` seconds, `None` on overflow.
fn seconds(d: u64, h: u64, m: u64, s: u64) -> Option<u64> {
    d.checked_mul(86400)?
        .checked_add(h.checked_mul(3600)?)?
        .checked_add(m.checked_mul(60)?)?
        .checked_add(s)
}

/// Seconds as `sbatch --time` takes them: `D-HH:MM:SS` (Slurm rounds up to whole minutes).
pub fn slurm_time(secs: u64) -> String {
    format!(
        "{}-{:02}:{:02}:{:02}",
        secs / 86400,
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_limits_in_slurm_and_unit_forms() {
        for (text, secs) in [
            ("90", 5400),
            ("1:30", 90),
            ("4:00:00", 14400),
            ("1-12", 129600),
            ("1-12:30", 131400),
            ("1-00:00:05", 86405),
            ("90s", 90),
            ("90m", 5400),
            ("4h", 14400),
            ("2d", 172800),
        ] {
            assert_eq!(parse_time(text), Some(secs), "{text}");
        }
        for bad in [
            "25:99:00",
            "1:75",
            "1-24:00",
            "",
            "0",
            "4x",
            "1:2:3:4",
            "-5",
            "a-1",
            "1.5h",
            "h",
            "99999999999999999999d",
            "213503982334602d",
        ] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
        assert_eq!(slurm_time(131405), "1-12:30:05");
        assert_eq!(parse_time(&slurm_time(131405)), Some(131405));
    }

    #[test]
    fn command_line_over_recipe_over_user_config() {
        let user = ExecutorSettings {
            partition: Some("user".into()),
            account: Some("acct".into()),
            ..Default::default()
        };
        let recipe = ExecutorSettings {
            partition: Some("recipe".into()),
            time: Some(60),
            ..Default::default()
        };
        let cli = ExecutorSettings {
            time: Some(120),
            ..Default::default()
        };
        let s = cli.or(recipe).or(user);
        let layered = ExecutorSettings {
            sbatch_args: Some(vec!["--qos=high".into()]),
            ..Default::default()
        }
        .or(ExecutorSettings {
            sbatch_args: Some(vec!["--constraint=h100".into()]),
            ..Default::default()
        });
        assert_eq!(
            layered.sbatch_args.unwrap(),
            ["--constraint=h100", "--qos=high"]
        );
        assert!(check_sbatch_args(&["--qos=high".into(), "--constraint=h100".into()]).is_ok());
        for own in [
            "--job-name=x",
            "-c4",
            "--chdir=/tmp",
            "--wrap=true",
            "--output=x.log",
            "-o",
            "-ox.log",
            "--array=1-3",
            "--wait",
            "--requeue",
            "-N2",
        ] {
            assert!(check_sbatch_args(&[own.into()]).is_err(), "{own}");
        }
        assert_eq!(s.partition.as_deref(), Some("recipe"));
        assert_eq!(s.account.as_deref(), Some("acct"));
        assert_eq!(s.time, Some(120));
    }
}
