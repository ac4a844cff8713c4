//! Chat data: conversations (`[{role, content}]`) rendered by the model's own chat template
//! (Jinja, as transformers' `apply_chat_template` renders it: minijinja with trim_blocks and
//! lstrip_blocks, loop controls, `raise_exception`, Python's string methods), and which bytes of
//! the text are the assistant's: the loss mask of chat training.
//!
//! A template that marks the assistant's text with transformers' `{% generation %}` blocks gives
//! exactly the bytes transformers' `return_assistant_tokens_mask` counts. Without marks, an
//! assistant turn's bytes are found by rendering the conversation up to the turn with the
//! generation prompt (where the assistant's text starts) and up to and including it (where it
//! ends), each a prefix of the whole conversation's text: the turn's own closing marks count (a
//! ChatML `<|im_end|>` and the newline after it). A template that renders earlier turns
//! differently once later ones follow cannot be masked this way, and says so.

use std::ops::Range;

use minijinja::{Environment, Error, ErrorKind, Value as JinjaValue};
use serde_json::Value;

use super::LoadedModel;
use crate::op::OpError;

/// A checkpoint's chat template, ready to render.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The tokenizer's special tokens by name (`bos_token`, `eos_token`, `pad_token`, ...), as
    /// transformers passes its `special_tokens_map` to the template.
    special_tokens: serde_json::Map<String, Value>,
    /// Whether the template marks the assistant's text with `{% generation %}` blocks.
    marked: bool,
}

/// What a `{% generation %}` block's text is wrapped in when spans are wanted: Unicode
/// noncharacters, which no text holds.
const GENERATION_START: char = '\u{FDD0}';
const GENERATION_END: char = '\u{FDD1}';

/// Where a template comes from: `chat_template.jinja` (transformers 5 saves it there), else
/// tokenizer_config.json's `chat_template` (a string, or named templates: the `default` one).
/// `None` when the checkpoint has none; `Some(Err)` says why one could not be read.
pub fn template_source(model: &LoadedModel) -> Option<Result<String, String>> {
    let dir_file = |name: &str| {
        model
            .tokenizer_files
            .iter()
            .find(|f| f.file_name().is_some_and(|n| n == name))
            .cloned()
    };
    if let Some(p) = dir_file("chat_template.jinja") {
        return Some(std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display())));
    }
    let config: Option<Value> = model.tokenizer_config.clone().or_else(|| {
        let p = dir_file("tokenizer_config.json")?;
        serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
    });
    match config?.get("chat_template")? {
        Value::String(s) => Some(Ok(s.clone())),
        Value::Array(named) => named
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(|t| Ok(t.to_string())),
        _ => None,
    }
}

/// The special tokens a template may name, as transformers passes its `special_tokens_map`:
/// `bos_token`, `eos_token`, `unk_token`, `sep_token`, `pad_token`, `cls_token`, `mask_token`,
/// those the tokenizer has.
pub fn special_tokens(model: &LoadedModel) -> serde_json::Map<String, Value> {
    [
        "bos_token",
        "eos_token",
        "unk_token",
        "sep_token",
        "pad_token",
        "cls_token",
        "mask_token",
    ]
    .into_iter()
    .filter_map(|k| Some((k.to_string(), Value::String(model.special_token(k)?))))
    .collect()
}

fn raise_exception(message: String) -> Result<JinjaValue, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// The body of a `{% generation %}` block: as is, or between the two marks when the render
/// asks for spans (`__generation_marks`).
fn generation(state: &minijinja::State, body: String) -> String {
    if state
        .lookup("__generation_marks")
        .is_some_and(|v| v.is_true())
    {
        format!("{GENERATION_START}{body}{GENERATION_END}")
    } else {
        body
    }
}

/// transformers' `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=indent)` (its
/// separators `", "` and `": "`, keys in their order), not Jinja's HTML-escaping one.
fn tojson(value: JinjaValue, kwargs: minijinja::value::Kwargs) -> Result<JinjaValue, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let v: Value = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    python_json(&v, indent, 0, &mut out);
    Ok(JinjaValue::from_safe_string(out))
}

/// `json.dumps` layout: `[a, b]` and `{"k": v}` on one line, or one item a line under `indent`.
fn python_json(v: &Value, indent: Option<usize>, depth: usize, out: &mut String) {
    let (open, between, close) = match indent {
        None => (String::new(), ", ".to_string(), String::new()),
        Some(n) => (
            format!("\n{}", " ".repeat(n * (depth + 1))),
            format!(",\n{}", " ".repeat(n * (depth + 1))),
            format!("\n{}", " ".repeat(n * depth)),
        ),
    };
    match v {
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            out.push_str(&open);
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&between);
                }
                python_json(x, indent, depth + 1, out);
            }
            out.push_str(&close);
            out.push(']');
        }
        Value::Object(map) if !map.is_empty() => {
            out.push('{');
            out.push_str(&open);
            for (i, (k, x)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(&between);
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                python_json(x, indent, depth + 1, out);
            }
            out.push_str(&close);
            out.push('}');
        }
        // Scalars and empty containers as serde_json writes them (strings unescaped past ASCII,
        // as ensure_ascii=False writes them).
        other => out.push_str(&other.to_string()),
    }
}

impl ChatTemplate {
    /// A template from its Jinja source, with the tokenizer's special tokens by name
    /// (`{"bos_token": "<s>", ...}`).
    pub fn new(
        source: &str,
        special_tokens: serde_json::Map<String, Value>,
    ) -> Result<ChatTemplate, Error> {
        // transformers' environment: trim_blocks, lstrip_blocks, loop controls (a feature of
        // this build), raise_exception, its tojson. `strftime_now` is left undefined so that
        // training data does not depend on the day it is rendered (Llama 3.1's template falls
        // back to its own date then); a template that calls it anyway fails naming it.
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_filter("__generation", generation);
        // transformers' `{% generation %}` blocks (a Jinja extension of its own) become filter
        // blocks: still block tags, so trim_blocks and lstrip_blocks treat them alike.
        let marks = fancy_regex::Regex::new(r"\{%(-?)\s*(end)?generation\s*(-?)%\}")
            .expect("a valid regex");
        let marked = marks.is_match(source).unwrap_or(false);
        let source = marks
            .replace_all(source, |c: &fancy_regex::Captures| {
                let tag = if c.get(2).is_some() {
                    "endfilter"
                } else {
                    "filter __generation"
                };
                format!("{{%{} {tag} {}%}}", &c[1], &c[3])
            })
            .into_owned();
        env.add_template_owned("chat", source)?;
        Ok(ChatTemplate {
            env,
            special_tokens,
            marked,
        })
    }

    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    pub fn render(&self, messages: &[Value], add_generation_prompt: bool) -> Result<String, Error> {
        self.render_marking(messages, add_generation_prompt, false)
    }

    fn render_marking(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        marks: bool,
    ) -> Result<String, Error> {
        let mut ctx = self.special_tokens.clone();
        ctx.insert("messages".into(), Value::Array(messages.to_vec()));
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        ctx.insert("__generation_marks".into(), marks.into());
        self.env.get_template("chat")?.render(Value::Object(ctx))
    }

    /// The spans between `{% generation %}` marks, and the text without them.
    fn marked_spans(&self, messages: &[Value]) -> Result<(String, Vec<Range<usize>>), String> {
        let raw = self
            .render_marking(messages, false, true)
            .map_err(|e| e.to_string())?;
        let (mut text, mut spans, mut open) = (String::with_capacity(raw.len()), Vec::new(), None);
        for c in raw.chars() {
            if c == GENERATION_START {
                open = Some(text.len());
            } else if c == GENERATION_END {
                if let Some(start) = open.take() {
                    spans.push(start..text.len());
                }
            } else {
                text.push(c);
            }
        }
        Ok((text, spans))
    }

    /// The conversation's text and the byte ranges of its assistant turns (the template's own
    /// end-of-turn marks included where it puts them inside the turn). Errors say which message
    /// cannot be placed.
    pub fn render_with_assistant_spans(
        &self,
        messages: &[Value],
    ) -> Result<(String, Vec<Range<usize>>), String> {
        if self.marked {
            return self.marked_spans(messages);
        }
        let whole = self.render(messages, false).map_err(|e| e.to_string())?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m["role"] != "assistant" {
                continue;
            }
            let before = self
                .render(&messages[..i], true)
                .map_err(|e| format!("message {}: {e}", i + 1))?;
            let through = self
                .render(&messages[..=i], false)
                .map_err(|e| format!("message {}: {e}", i + 1))?;
            if !through.starts_with(&before) || !whole.starts_with(&through) {
                return Err(format!(
                    "message {} (assistant): the template renders the conversation up to it differently once later turns follow, so its tokens cannot be told apart; use a template that renders turns independently",
                    i + 1
                ));
            }
            spans.push(before.len()..through.len());
        }
        Ok((whole, spans))
    }
}

/// Which tokens are the assistant's: a token counts when its byte range (`offsets`, as the
/// tokenizer reports them on the rendered text) overlaps an assistant span.
pub fn assistant_mask(offsets: &[(usize, usize)], spans: &[Range<usize>]) -> Vec<bool> {
    offsets
        .iter()
        .map(|&(start, end)| spans.iter().any(|s| start < s.end && end > s.start))
        .collect()
}

/// The messages of one conversation: `field` of a JSONL line, a list of `{role, content}`
/// objects with string roles; `at` names the line in errors.
pub fn messages(line: &Value, field: &str, at: &dyn Fn() -> String) -> Result<Vec<Value>, OpError> {
    let list = line.get(field).and_then(Value::as_array).ok_or_else(|| {
        OpError::Invalid(format!(
            "{}: no list `{field}` of {{\"role\", \"content\"}} messages; set `field` in the dataset source to the name holding them",
            at()
        ))
    })?;
    for (i, m) in list.iter().enumerate() {
        if !m["role"].is_string() || m.get("content").is_none() {
            return Err(OpError::Invalid(format!(
                "{}: message {} has no string `role` or no `content`",
                at(),
                i + 1
            )));
        }
    }
    if !list.iter().any(|m| m["role"] == "assistant") {
        return Err(OpError::Invalid(format!(
            "{}: the conversation has no assistant message: nothing to train on",
            at()
        )));
    }
    Ok(list.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn assistant_turns_are_found_by_prefix_rendering() {
        let t = ChatTemplate::new(CHATML, Default::default()).unwrap();
        let msgs = vec![
            json!({"role": "user", "content": "Hi"}),
            json!({"role": "assistant", "content": "Hello!"}),
            json!({"role": "user", "content": "2+2?"}),
            json!({"role": "assistant", "content": "4"}),
        ];
        let (text, spans) = t.render_with_assistant_spans(&msgs).unwrap();
        let turns: Vec<&str> = spans.iter().map(|s| &text[s.clone()]).collect();
        assert_eq!(turns, vec!["Hello!<|im_end|>\n", "4<|im_end|>\n"]);
        let mask = assistant_mask(&[(0, 3), (40, 44), (44, 46)], &[(41..50)]);
        assert_eq!(mask, vec![false, true, true]);
    }

    #[test]
    fn a_template_that_raises_or_rewrites_history_says_so() {
        let raising = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with the user') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}";
        let t = ChatTemplate::new(raising, Default::default()).unwrap();
        let err = t
            .render(&[json!({"role": "assistant", "content": "x"})], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("must start with the user"), "{err}");
        // Only the last assistant turn is shown in full: earlier ones change once more follow.
        let rewriting = "{% for m in messages %}{% if loop.last or m['role'] != 'assistant' %}{{ m['content'] }}{% else %}[...]{% endif %}{% endfor %}";
        let t = ChatTemplate::new(rewriting, Default::default()).unwrap();
        let msgs = vec![
            json!({"role": "user", "content": "a"}),
            json!({"role": "assistant", "content": "b"}),
            json!({"role": "user", "content": "c"}),
            json!({"role": "assistant", "content": "d"}),
        ];
        let err = t.render_with_assistant_spans(&msgs).unwrap_err();
        assert!(err.contains("message 2"), "{err}");
    }
}
