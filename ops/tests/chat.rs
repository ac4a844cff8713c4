//! Chat data against transformers 5 (tests/golden/make_chat_goldens.py → tests/golden/chat):
//! rendered text, token ids and the assistant mask of three templates written as checkpoints ship
//! them (ChatML, Llama 3's, Gemma's), with transformers' `{% generation %}` marks and without.

use std::path::PathBuf;

use distillery_ops::model::chat::{ChatTemplate, assistant_mask};
use distillery_ops::model::tokenizer::Tokenizer;
use serde_json::Value;

fn golden() -> (PathBuf, Value) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/chat");
    let g =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    (dir, g)
}

fn tokenizer(dir: &std::path::Path) -> Tokenizer {
    Tokenizer::from_json(
        &std::fs::read_to_string(dir.join("tokenizer.json")).unwrap(),
        dir,
    )
    .unwrap()
}

fn specials() -> serde_json::Map<String, Value> {
    serde_json::json!({"bos_token": "<s>", "eos_token": "</s>"})
        .as_object()
        .unwrap()
        .clone()
}

/// The mask transformers computed (`return_assistant_tokens_mask`).
fn transformers_mask(case: &Value) -> Vec<bool> {
    case["assistant_mask"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_u64() == Some(1))
        .collect()
}

fn messages(case: &Value) -> Vec<Value> {
    case["messages"].as_array().unwrap().clone()
}

/// The tokens a mask marks, as text, for readable failures.
fn marked(tok: &Tokenizer, ids: &[u32], mask: &[bool]) -> String {
    let kept: Vec<u32> = ids
        .iter()
        .zip(mask)
        .filter(|(_, m)| **m)
        .map(|(i, _)| *i)
        .collect();
    tok.decode(&kept)
}

#[test]
fn templates_render_tokenize_and_mask_as_transformers_does() {
    let (dir, g) = golden();
    let tok = tokenizer(&dir);
    for (name, t) in g["templates"].as_object().unwrap() {
        let template = ChatTemplate::new(t["template"].as_str().unwrap(), specials())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        for case in t["cases"].as_array().unwrap() {
            let msgs = messages(case);
            assert_eq!(
                template.render(&msgs, false).unwrap(),
                case["text"],
                "{name}: text"
            );
            assert_eq!(
                template.render(&msgs[..1], true).unwrap(),
                case["prompt"],
                "{name}: with the generation prompt"
            );
            let (text, spans) = template.render_with_assistant_spans(&msgs).unwrap();
            assert_eq!(text, case["text"].as_str().unwrap());
            let (ids, offsets) = tok.encode_with_offsets(&text).unwrap();
            let want_ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            assert_eq!(ids, want_ids, "{name}: token ids");
            let mask = assistant_mask(&offsets, &spans);
            let want = transformers_mask(case);
            assert_eq!(
                marked(&tok, &ids, &mask),
                marked(&tok, &ids, &want),
                "{name}: the assistant's tokens"
            );
            assert_eq!(mask, want, "{name}: mask");
        }
    }
}

/// Without `{% generation %}` marks, a turn runs from the generation prompt to where the next
/// turn starts: transformers' marked tokens, plus only the layout the template writes inside the
/// same turn around the marked text (ChatML's newlines).
#[test]
fn unmarked_templates_mask_each_whole_assistant_turn() {
    let (dir, g) = golden();
    let tok = tokenizer(&dir);
    let unmark = fancy_regex::Regex::new(r"\{%-?\s*(end)?generation\s*-?%\}").unwrap();
    for (name, t) in g["templates"].as_object().unwrap() {
        // The marks become a block tag that does nothing, so the layout renders the same.
        let source = unmark
            .replace_all(
                t["template"].as_str().unwrap(),
                |c: &fancy_regex::Captures| {
                    if c.get(1).is_some() {
                        "{% endif %}"
                    } else {
                        "{% if true %}"
                    }
                    .to_string()
                },
            )
            .into_owned();
        let template = ChatTemplate::new(&source, specials()).unwrap();
        for case in t["cases"].as_array().unwrap() {
            let (text, spans) = template
                .render_with_assistant_spans(&messages(case))
                .unwrap();
            assert_eq!(text, case["text"].as_str().unwrap(), "{name}: text");
            let (ids, offsets) = tok.encode_with_offsets(&text).unwrap();
            let mask = assistant_mask(&offsets, &spans);
            let want = transformers_mask(case);
            for (i, (m, w)) in mask.iter().zip(&want).enumerate() {
                // ChatML's layout newlines inside the assistant's turn, outside the marks.
                let layout =
                    name.starts_with("chatml") && tok.decode(&ids[i..=i]).trim().is_empty();
                assert!(
                    *m == *w || (*m && layout),
                    "{name} token {i} {:?}: {m} vs {w}",
                    tok.decode(&ids[i..=i])
                );
            }
        }
    }
}

#[test]
fn a_template_that_raises_fails_with_its_own_message() {
    let (_, g) = golden();
    let t = &g["templates"]["gemma"];
    let template = ChatTemplate::new(t["template"].as_str().unwrap(), specials()).unwrap();
    let err = template
        .render(
            &[serde_json::json!({"role": "system", "content": "x"})],
            false,
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(g["gemma_system_error"].as_str().unwrap()),
        "{err}"
    );
}
