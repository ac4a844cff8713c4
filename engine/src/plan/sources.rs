//! Sources: their files found and their content keys computed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use distillery_cache::{CacheKey, Canon, SourceHasher, Store};
use distillery_ops::{Artifact, ArtifactKind};

use crate::diag::Diagnostic;
use crate::recipe::{DatasetFormat, Recipe, SourceSpec};

/// A source with its files found and its content key computed.
#[derive(Clone, Debug)]
pub struct ResolvedSource {
    pub name: String,
    /// False for an optional source whose files are missing.
    pub present: bool,
    pub key: CacheKey,
    pub artifact: Artifact,
    pub files: Vec<(String, PathBuf)>,
}

/// Expands `${VAR}` and a leading `~/`, then resolves against the recipe's directory.
pub fn expand_path(raw: &str, base: &Path) -> Result<PathBuf, String> {
    let mut out = String::new();
    let mut rest = raw;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}') else {
            return Err(format!("unclosed `${{` in `{raw}`"));
        };
        let var = &rest[start + 2..start + end];
        match std::env::var(var) {
            Ok(v) if !v.is_empty() => out.push_str(&v),
            _ if var == "DISTILLERY_CACHE" => {
                out.push_str(&Store::default_root().to_string_lossy())
            }
            _ => return Err(format!("environment variable `{var}` is not set")),
        }
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    if let Some(tail) = out.strip_prefix("~/")
        && let Some(home) = std::env::var_os("HOME")
    {
        out = Path::new(&home).join(tail).to_string_lossy().to_string();
    }
    let p = PathBuf::from(out);
    Ok(if p.is_absolute() { p } else { base.join(p) })
}

/// Finds each source's files and computes its content key.
pub fn resolve_sources(
    recipe: &Recipe,
    hasher: &SourceHasher,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<Vec<ResolvedSource>, Vec<Diagnostic>> {
    let base = recipe.dir();
    let mut out = Vec::new();
    let mut diags = Vec::new();
    for src in &recipe.sources {
        if src.optional && !source_exists(src, &base) {
            out.push(ResolvedSource {
                name: src.name.clone(),
                present: false,
                key: CacheKey::of_bytes(b"absent optional source"),
                artifact: Artifact::dir(src.kind, base.clone()),
                files: Vec::new(),
            });
            continue;
        }
        let (artifact, files, decl) = match &src.spec {
            SourceSpec::Model { path, span } => {
                let p = match expand_path(path, &base) {
                    Ok(p) => p,
                    Err(e) => {
                        diags.push(Diagnostic::at(span, e));
                        continue;
                    }
                };
                let files = if p.is_dir() {
                    // Names relative to the checkpoint directory; links (hub snapshots) followed.
                    match distillery_cache::sources::walk_source_files(&p) {
                        Ok(f) => f,
                        Err(e) => {
                            diags.push(
                                Diagnostic::at(span, format!("model source `{}`: {e}", src.name))
                                    .help("a model directory holds files (or links to files) only"),
                            );
                            continue;
                        }
                    }
                } else if p.is_file() {
                    // One file (a GGUF): its content and format count, not its name.
                    let ext = p
                        .extension()
                        .map(|e| e.to_string_lossy().to_ascii_lowercase())
                        .unwrap_or_default();
                    vec![(format!("model.{ext}"), p.clone())]
                } else {
                    diags.push(
                        Diagnostic::at(
                            span,
                            format!(
                                "model source `{}`: `{}` does not exist",
                                src.name,
                                p.display()
                            ),
                        )
                        .help("point path at a Hugging Face checkpoint directory or a .gguf file"),
                    );
                    continue;
                };
                let decl = Canon::Map([("kind".to_string(), Canon::Str("model".into()))].into());
                (Artifact::dir(ArtifactKind::Model, p), files, decl)
            }
            SourceSpec::Dataset {
                files: patterns,
                exclude,
                format,
            } => {
                // Path → its name in the key: relative to the directory its pattern starts
                // from, and with several patterns, the pattern's index in front.
                let mut found: BTreeMap<PathBuf, String> = BTreeMap::new();
                let mut failed = false;
                for (index, (pattern, span)) in patterns.iter().enumerate() {
                    let full = match expand_path(pattern, &base) {
                        Ok(p) => p,
                        Err(e) => {
                            diags.push(Diagnostic::at(span, e));
                            failed = true;
                            continue;
                        }
                    };
                    let matches: Vec<PathBuf> = match glob::glob(&full.to_string_lossy()) {
                        Ok(paths) => paths
                            .filter_map(Result::ok)
                            .filter(|p| p.is_file())
                            .collect(),
                        Err(e) => {
                            diags.push(Diagnostic::at(
                                span,
                                format!("invalid glob `{pattern}`: {e}"),
                            ));
                            failed = true;
                            continue;
                        }
                    };
                    let before_exclude = matches.len();
                    let matches: Vec<PathBuf> = matches
                        .into_iter()
                        .filter(|p| {
                            let name = p
                                .file_name()
                                .map(|n| n.to_string_lossy().to_string())
                                .unwrap_or_default();
                            !exclude.iter().any(|x| {
                                glob::Pattern::new(x)
                                    .is_ok_and(|pat| pat.matches(&name) || pat.matches_path(p))
                            })
                        })
                        .collect();
                    if matches.is_empty() && before_exclude > 0 {
                        diags.push(
                            Diagnostic::at(
                                span,
                                format!(
                                    "`{pattern}` matches {before_exclude} files, but `exclude` removed them all"
                                ),
                            )
                            .help("narrow `exclude` (its patterns match file names or whole paths)"),
                        );
                        failed = true;
                    } else if matches.is_empty() {
                        diags.push(
                            Diagnostic::at(
                                span,
                                format!(
                                    "`{pattern}` matches no files (looked for `{}`)",
                                    full.display()
                                ),
                            )
                            .help("check the path; relative globs start at the recipe's directory"),
                        );
                        failed = true;
                    }
                    let root = glob_root(&full);
                    for m in matches {
                        let rel: Vec<String> = m
                            .strip_prefix(&root)
                            .unwrap_or(&m)
                            .components()
                            .map(|c| c.as_os_str().to_string_lossy().to_string())
                            .collect();
                        let name = if patterns.len() > 1 {
                            format!("{index}/{}", rel.join("/"))
                        } else {
                            rel.join("/")
                        };
                        found.entry(m).or_insert(name);
                    }
                }
                if failed {
                    continue;
                }
                // Where the set lives (the checkout, the cache's downloads) is never part of the
                // key; the names inside it are.
                let files: Vec<PathBuf> = found.keys().cloned().collect();
                let named: Vec<(String, PathBuf)> =
                    found.into_iter().map(|(p, n)| (n, p)).collect();
                let mut options = BTreeMap::new();
                let mut decl = BTreeMap::new();
                decl.insert("kind".to_string(), Canon::Str("dataset".into()));
                match format {
                    DatasetFormat::Text => {
                        options.insert("format".to_string(), "text".to_string());
                        decl.insert("format".into(), Canon::Str("text".into()));
                    }
                    DatasetFormat::Jsonl { field } | DatasetFormat::Chat { field } => {
                        let name = match format {
                            DatasetFormat::Chat { .. } => "chat",
                            _ => "jsonl",
                        };
                        options.insert("format".to_string(), name.to_string());
                        options.insert("field".to_string(), field.clone());
                        decl.insert("format".into(), Canon::Str(name.into()));
                        decl.insert("field".into(), Canon::Str(field.clone()));
                    }
                }
                let artifact = Artifact {
                    kind: ArtifactKind::Dataset,
                    path: base.clone(),
                    files: files.clone(),
                    options,
                };
                (artifact, named, Canon::Map(decl))
            }
        };
        let name = src.name.clone();
        match hasher.key(&decl, &files, &mut |done, total| {
            progress(&name, done, total)
        }) {
            Ok(key) => out.push(ResolvedSource {
                name: src.name.clone(),
                present: true,
                key,
                artifact,
                files,
            }),
            Err(e) => diags.push(Diagnostic::at(
                &src.span,
                format!("cannot read source `{}`: {e}", src.name),
            )),
        }
    }
    if diags.is_empty() {
        Ok(out)
    } else {
        Err(diags)
    }
}

/// The directory a glob starts from: its leading components without a wildcard (for a pattern
/// without wildcards, the file's own directory).
fn glob_root(pattern: &Path) -> PathBuf {
    let root: PathBuf = pattern
        .components()
        .take_while(|c| !c.as_os_str().to_string_lossy().contains(['*', '?', '[']))
        .collect();
    match root.parent() {
        Some(dir) if root.is_file() => dir.to_path_buf(),
        _ => root,
    }
}

fn source_exists(src: &crate::recipe::SourceDecl, base: &Path) -> bool {
    match &src.spec {
        SourceSpec::Model { path, .. } => expand_path(path, base).is_ok_and(|p| p.exists()),
        SourceSpec::Dataset { files, .. } => files.iter().all(|(pattern, _)| {
            expand_path(pattern, base)
                .ok()
                .and_then(|p| glob::glob(&p.to_string_lossy()).ok())
                .is_some_and(|mut g| g.any(|e| e.is_ok_and(|p| p.is_file())))
        }),
    }
}
