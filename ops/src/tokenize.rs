//! The `tokenize` op: a dataset tokenized once with a model's tokenizer, cached as a dataset
//! artifact that every op taking a dataset reads directly.

use crate::data::tokenized;
use crate::op::{ArtifactKind, Op, OpContext, OpError, OpSignature, Port};
use crate::runtime;

pub struct Tokenize;

impl Op for Tokenize {
    fn signature(&self) -> OpSignature {
        OpSignature {
            name: "tokenize",
            // 2: words counted as lm-evaluation-harness does; UTF-8 bytes recorded.
            version: 2,
            doc: "tokenize a dataset once with a model's tokenizer",
            inputs: vec![
                Port::new("model", ArtifactKind::Model, "whose tokenizer to use"),
                Port::new("data", ArtifactKind::Dataset, "text files or JSONL"),
            ],
            output: ArtifactKind::Dataset,
            params: vec![],
        }
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        let model = runtime::open_model(ctx.input("model")?)?;
        let tok = runtime::tokenizer(&model)?;
        let data = ctx.input("data")?;
        ctx.progress
            .phase("tokenizing", data.files.len() as u64, "files");
        let ds = tokenized(data, &tok)?;
        ctx.progress.set(data.files.len() as u64);
        ctx.progress.note(&format!(
            "{} documents, {} tokens",
            ds.docs.len(),
            ds.total_tokens()
        ));
        ds.write(&ctx.out_dir)
    }

    fn summarize(&self, out_dir: &std::path::Path) -> Option<String> {
        std::fs::read_to_string(out_dir.join(crate::data::INDEX_FILE))
            .ok()
            .and_then(|t| {
                let v: serde_json::Value = serde_json::from_str(&t).ok()?;
                Some(format!(
                    "{} documents, {} tokens, {} words",
                    v["docs"].as_array()?.len(),
                    v["tokens"],
                    v["words"]
                ))
            })
    }
}
