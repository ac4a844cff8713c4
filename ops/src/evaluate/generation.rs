//! Generation tasks as lm-evaluation-harness 0.4 runs `generate_until`: the prompt and the
//! reference rendered from each JSONL document by Jinja templates (`doc_to_text`,
//! `doc_to_target`, the harness's own syntax, rendered by minijinja), greedy continuations cut at
//! the first stop string, then each filter's regex extraction and `exact_match` against the
//! reference (its `regexes_to_ignore` and `ignore_case`), as the harness's GSM8K task scores.

use fancy_regex::Regex;
use minijinja::{Environment, UndefinedBehavior};
use serde_json::Value;

use crate::op::{Artifact, OpError};

/// One generation document: its fields and where it was read (`file:line`, for errors).
pub struct Doc {
    pub fields: Value,
    pub at: String,
}

/// One JSONL document per line, each a JSON object (the fields the templates name).
pub fn read_docs(artifact: &Artifact) -> Result<Vec<Doc>, OpError> {
    let mut docs = Vec::new();
    for path in &artifact.files {
        let text = std::fs::read_to_string(path).map_err(|e| OpError::io(path, "read", e))?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = format!("{}:{}", path.display(), i + 1);
            let v: Value = serde_json::from_str(line)
                .map_err(|e| OpError::Invalid(format!("{at}: not JSON: {e}")))?;
            if !v.is_object() {
                return Err(OpError::Invalid(format!(
                    "{at}: a generation document must be a JSON object such as {{\"question\": ..., \"answer\": ...}}"
                )));
            }
            docs.push(Doc { fields: v, at });
        }
    }
    Ok(docs)
}

/// The harness's `regex_replace` filter: Python's `re.sub(pattern, repl, string, count)`.
fn regex_replace(
    value: String,
    pattern: String,
    repl: String,
    count: Option<usize>,
) -> Result<String, minijinja::Error> {
    let re = Regex::new(&pattern).map_err(|e| {
        minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("regex_replace: {pattern:?}: {e}"),
        )
    })?;
    // Python's `\1` group references become `${1}`.
    let repl = Regex::new(r"\\(\d+)")
        .expect("a valid regex")
        .replace_all(&repl, "$${${1}}")
        .into_owned();
    Ok(match count {
        Some(n) if n > 0 => re.replacen(&value, n, repl.as_str()).into_owned(),
        _ => re.replace_all(&value, repl.as_str()).into_owned(),
    })
}

/// Renders `doc_to_text`/`doc_to_target` templates over documents; a field a template names
/// and a document lacks is an error (the harness's Jinja is strict too).
pub struct Templates {
    env: Environment<'static>,
}

impl Templates {
    /// `templates` as (parameter name, Jinja source); errors name the parameter.
    pub fn new(templates: &[(&'static str, String)]) -> Result<Templates, OpError> {
        // lm-evaluation-harness's environment: strict undefined, trailing newlines kept, its
        // `regex_replace` filter; Python's string methods (`.split`, `.strip`) as its YAMLs use.
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_keep_trailing_newline(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("regex_replace", regex_replace);
        for (name, source) in templates {
            env.add_template_owned(*name, source.clone()).map_err(|e| {
                OpError::Invalid(format!("parameter `{name}`: not a Jinja template: {e}"))
            })?;
        }
        Ok(Templates { env })
    }

    /// The template named by parameter `name` over `doc`; `at` names the document in errors.
    pub fn render(
        &self,
        name: &str,
        doc: &Value,
        at: &dyn Fn() -> String,
    ) -> Result<String, OpError> {
        let t = self
            .env
            .get_template(name)
            .map_err(|e| OpError::Invalid(format!("parameter `{name}`: {e}")))?;
        t.render(doc).map_err(|e| {
            // Name the fields the template uses that this document lacks.
            let mut missing: Vec<String> = t
                .undeclared_variables(false)
                .into_iter()
                .filter(|v| doc.get(v).is_none())
                .collect();
            missing.sort();
            let has: Vec<&String> = doc.as_object().map(|o| o.keys().collect()).unwrap_or_default();
            let why = if missing.is_empty() {
                e.to_string()
            } else {
                format!("it names {missing:?}, which the document lacks (it has {has:?})")
            };
            OpError::Invalid(format!(
                "{}: parameter `{name}` cannot be rendered over this document: {why}; set `{name}` to the fields your documents have",
                at()
            ))
        })
    }
}

/// The generation cut at the first occurrence of any stop string, as the harness's
/// `postprocess_generated_text` cuts it (each non-empty term in turn).
pub fn cut_at_stop(generation: &str, until: &[String]) -> String {
    let mut s = generation;
    for term in until.iter().filter(|t| !t.is_empty()) {
        if let Some(at) = s.find(term.as_str()) {
            s = &s[..at];
        }
    }
    s.to_string()
}

/// The harness's `regex` filter: every match (`findall`), the one at `group_select` (negative
/// from the end), its first non-empty group where the pattern has groups, stripped; `fallback`
/// when nothing matches.
pub struct RegexFilter {
    pub name: String,
    regex: Regex,
    group_select: isize,
    fallback: String,
}

/// The harness's GSM8K filters: `strict-match` (the number after `#### `) and
/// `flexible-extract` (the last number anywhere).
pub const STRICT_MATCH: &str = r"#### (\-?[0-9\.\,]+)";
pub const FLEXIBLE_EXTRACT: &str = r"(-?[$0-9.,]{2,})|(-?[0-9]+)";

impl RegexFilter {
    /// Errors name `param` when `pattern` is not a regex `fancy-regex` reads (Python's `re`
    /// syntax, look-around and backreferences included, less a few rarities).
    pub fn new(
        name: &str,
        pattern: &str,
        group_select: isize,
        param: &str,
    ) -> Result<Self, OpError> {
        let regex = Regex::new(pattern).map_err(|e| {
            OpError::Invalid(format!(
                "parameter `{param}`: {pattern:?} is not a supported regex: {e}"
            ))
        })?;
        Ok(RegexFilter {
            name: name.to_string(),
            regex,
            group_select,
            fallback: "[invalid]".into(),
        })
    }

    pub fn apply(&self, response: &str) -> String {
        // Python's findall: the whole match without groups, else the groups (empty where a
        // group did not take part).
        let matches: Vec<Vec<String>> = self
            .regex
            .captures_iter(response)
            .filter_map(Result::ok)
            .map(|c| {
                if c.len() == 1 {
                    vec![c[0].to_string()]
                } else {
                    (1..c.len())
                        .map(|g| c.get(g).map_or(String::new(), |m| m.as_str().to_string()))
                        .collect()
                }
            })
            .collect();
        let n = matches.len() as isize;
        let at = if self.group_select < 0 {
            n + self.group_select
        } else {
            self.group_select
        };
        if n == 0 || at < 0 || at >= n {
            // Python raises IndexError past the end; no match at all is the fallback.
            return self.fallback.clone();
        }
        match matches[at as usize].iter().find(|g| !g.is_empty()) {
            Some(g) => g.trim().to_string(),
            None if matches[at as usize].len() == 1 => String::new(),
            None => self.fallback.clone(),
        }
    }
}

/// `exact_match` as the harness computes it (`exact_match_hf_evaluate`): every regex in
/// `ignore` removed from both strings in turn, then both lowercased under `ignore_case`.
pub fn exact_match(prediction: &str, reference: &str, ignore: &[Regex], ignore_case: bool) -> bool {
    let clean = |s: &str| {
        let mut s = s.to_string();
        for r in ignore {
            s = r.replace_all(&s, "").into_owned();
        }
        if ignore_case { s.to_lowercase() } else { s }
    };
    clean(prediction) == clean(reference)
}

/// The regexes of `regexes_to_ignore`, compiled; errors name the parameter.
pub fn compile_all(patterns: &[String], param: &str) -> Result<Vec<Regex>, OpError> {
    patterns
        .iter()
        .map(|p| {
            Regex::new(p).map_err(|e| {
                OpError::Invalid(format!(
                    "parameter `{param}`: {p:?} is not a supported regex: {e}"
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm8k_answers_are_extracted_and_matched_as_the_harness_does() {
        let strict = RegexFilter::new("strict-match", STRICT_MATCH, 0, "x").unwrap();
        let flexible = RegexFilter::new("flexible-extract", FLEXIBLE_EXTRACT, -1, "x").unwrap();
        let response = " She pays $1,200 in 3 months.\n#### 1,200\n\nQ";
        assert_eq!(strict.apply(response), "1,200");
        assert_eq!(flexible.apply(response), "1,200");
        assert_eq!(strict.apply("no answer"), "[invalid]");
        assert_eq!(flexible.apply("it is 7"), "7");
        let ignore = compile_all(
            &[
                ",".into(),
                "\\$".into(),
                "(?s).*#### ".into(),
                "\\.$".into(),
            ],
            "regexes_to_ignore",
        )
        .unwrap();
        let reference = "Natalia sold 48/2 = 24 clips.\n#### 1200";
        assert!(exact_match("1,200", reference, &ignore, true));
        assert!(exact_match("$1200.", reference, &ignore, true));
        assert!(!exact_match("120", reference, &ignore, true));
        assert_eq!(
            cut_at_stop("a Question: b</s>", &["Question:".into(), "</s>".into()]),
            "a "
        );
        assert_eq!(
            cut_at_stop("x</s>y Question:", &["Question:".into(), "</s>".into()]),
            "x"
        );
    }

    #[test]
    fn templates_render_the_harness_syntax_and_name_missing_fields() {
        // gsm8k-cot-llama.yaml's shapes: a trailing newline kept, Python's string methods.
        let t = Templates::new(&[
            ("nl", "Q: {{question}}\n".into()),
            ("target", "{{answer.split('####')[-1].strip()}}".into()),
            (
                "re",
                "{{answer | regex_replace('#### (\\\\d+)', 'is \\\\1')}}".into(),
            ),
        ])
        .unwrap();
        let doc = serde_json::json!({"question": "2+2?", "answer": "so #### 4"});
        assert_eq!(t.render("nl", &doc, &|| "d".into()).unwrap(), "Q: 2+2?\n");
        assert_eq!(t.render("target", &doc, &|| "d".into()).unwrap(), "4");
        assert_eq!(t.render("re", &doc, &|| "d".into()).unwrap(), "so is 4");
        let t =
            Templates::new(&[("doc_to_text", "Question: {{question}}\nAnswer:".into())]).unwrap();
        let doc = serde_json::json!({"question": "2+2?", "answer": "#### 4"});
        assert_eq!(
            t.render("doc_to_text", &doc, &|| "d".into()).unwrap(),
            "Question: 2+2?\nAnswer:"
        );
        let err = t
            .render("doc_to_text", &serde_json::json!({"q": 1}), &|| {
                "docs.jsonl:3".into()
            })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("docs.jsonl:3") && err.contains("doc_to_text"),
            "{err}"
        );
    }
}
