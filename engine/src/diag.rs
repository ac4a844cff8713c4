//! Diagnostics that point into the recipe: `file:line:column`, the line itself, a caret, and what
//! to do about it. Spans come from the TOML parser; `--set` overrides are sources of their own.

use std::fmt::Write as _;
use std::ops::Range;
use std::path::PathBuf;

/// Where a piece of recipe text came from.
#[derive(Clone, Debug)]
pub enum Origin {
    File(PathBuf),
    /// The n-th (1-based) `--set` argument.
    Override(usize),
}

/// One text a span can point into.
#[derive(Clone, Debug)]
pub struct SourceText {
    pub origin: Origin,
    pub text: String,
}

/// All texts of one recipe: the file first, then each `--set`.
#[derive(Clone, Debug, Default)]
pub struct SourceMap {
    pub texts: Vec<SourceText>,
}

/// A byte range in one of the texts of a [`SourceMap`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    pub source: usize,
    pub range: Range<usize>,
}

/// A resolved position, 1-based, columns in characters.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Location {
    pub file: String,
    pub line: usize,
    pub column: usize,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

impl SourceMap {
    pub fn add(&mut self, origin: Origin, text: String) -> usize {
        self.texts.push(SourceText { origin, text });
        self.texts.len() - 1
    }

    fn origin_name(&self, source: usize) -> String {
        match &self.texts[source].origin {
            Origin::File(p) => p.display().to_string(),
            Origin::Override(n) => format!("--set #{n}"),
        }
    }

    pub fn locate(&self, span: &Span) -> Location {
        let text = &self.texts[span.source].text;
        let start = span.range.start.min(text.len());
        let before = &text[..start];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
        let column = text[line_start..start].chars().count() + 1;
        Location {
            file: self.origin_name(span.source),
            line,
            column,
        }
    }

    /// The line of the span, and the caret underline under it.
    fn excerpt(&self, span: &Span) -> (usize, String, String) {
        let text = &self.texts[span.source].text;
        let loc = self.locate(span);
        let start = span.range.start.min(text.len());
        let line_start = text[..start].rfind('\n').map(|i| i + 1).unwrap_or(0);
        let line_end = text[start..]
            .find('\n')
            .map(|i| start + i)
            .unwrap_or(text.len());
        let line = text[line_start..line_end]
            .trim_end_matches('\r')
            .to_string();
        let end = span.range.end.clamp(start, line_end);
        let width = text[start..end].chars().count().max(1);
        let caret = format!("{}{}", " ".repeat(loc.column - 1), "^".repeat(width));
        (loc.line, line, caret)
    }
}

/// A message for the person at the terminal.
#[derive(Clone, Debug)]
pub struct Diagnostic {
    pub message: String,
    pub span: Option<Span>,
    /// "did you mean ...", "expected ..."
    pub help: Option<String>,
    /// A warning: said, but the command goes on.
    pub warning: bool,
}

impl Diagnostic {
    pub fn new(message: impl Into<String>, span: Option<Span>) -> Self {
        Diagnostic {
            message: message.into(),
            span,
            help: None,
            warning: false,
        }
    }

    /// The same message as a warning.
    pub fn as_warning(mut self) -> Self {
        self.warning = true;
        self
    }

    pub fn at(span: &Span, message: impl Into<String>) -> Self {
        Self::new(message, Some(span.clone()))
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub fn maybe_help(self, help: Option<String>) -> Self {
        match help {
            Some(h) => self.help(h),
            None => self,
        }
    }

    pub fn location(&self, sources: &SourceMap) -> Option<Location> {
        self.span.as_ref().map(|s| sources.locate(s))
    }

    /// rustc-style rendering.
    pub fn render(&self, sources: &SourceMap) -> String {
        let level = if self.warning { "warning" } else { "error" };
        let mut out = format!("{level}: {}\n", self.message);
        if let Some(span) = &self.span {
            let loc = sources.locate(span);
            let (line_no, line, caret) = sources.excerpt(span);
            let gutter = " ".repeat(line_no.to_string().len());
            let _ = writeln!(out, "{gutter}--> {loc}");
            let _ = writeln!(out, "{gutter} |");
            let _ = writeln!(out, "{line_no} | {line}");
            let _ = writeln!(out, "{gutter} | {caret}");
        }
        if let Some(help) = &self.help {
            let _ = writeln!(out, "  = help: {help}");
        }
        out
    }

    pub fn to_json(&self, sources: &SourceMap) -> serde_json::Value {
        serde_json::json!({
            "message": self.message,
            "level": if self.warning { "warning" } else { "error" },
            "location": self.location(sources),
            "help": self.help,
        })
    }
}

/// The closest candidate to `word`, if it is close enough to be a likely typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    closest(word, candidates).map(|c| format!("did you mean `{c}`?"))
}

/// The candidate closest to `word`, when close enough to be a typo of it.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_lines_and_columns_in_characters() {
        let mut map = SourceMap::default();
        let src = map.add(Origin::File("r.toml".into()), "a = 1\nbé = \"x\"\n".into());
        let at = "a = 1\nbé = ".len();
        let loc = map.locate(&Span {
            source: src,
            range: at..at + 3,
        });
        assert_eq!(
            loc,
            Location {
                file: "r.toml".into(),
                line: 2,
                column: 6
            }
        );
        let d = Diagnostic::at(
            &Span {
                source: src,
                range: at..at + 3,
            },
            "bad",
        )
        .help("fix it");
        let r = d.render(&map);
        assert!(r.contains("--> r.toml:2:6"), "{r}");
        assert!(r.contains("2 | bé = \"x\""), "{r}");
        assert!(r.contains("  |      ^^^"), "{r}");
    }

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(
            did_you_mean("hiden_size", ["hidden_size", "seed"]).unwrap(),
            "did you mean `hidden_size`?"
        );
        assert!(did_you_mean("zzz", ["hidden_size"]).is_none());
    }
}
