//! The `export_gguf` op: a model as one llama.cpp GGUF file (`model.gguf`), quantized as asked,
//! with the recipe's provenance in its metadata. Its output is a model like any other: evaluate
//! or compare it in the same recipe.

use std::path::Path;

use crate::model::gguf::writer::{GgufQuant, describe, export_model, requantization_warning};
use crate::op::{
    ArtifactKind, Op, OpContext, OpError, OpSignature, ParamSpec, ParamType, ParamValue, Port,
};

pub struct ExportGguf;

/// The file an `export_gguf` output holds.
pub const GGUF_FILE: &str = "model.gguf";

impl Op for ExportGguf {
    fn signature(&self) -> OpSignature {
        OpSignature {
            name: "export_gguf",
            // 2: llama-quantize's choice for a tied embedding (Q6_K) and a fused qkv; Q/K biases
            // permuted for Llama; the vocabulary padded; add_bos_token and add_space_prefix.
            // 3: general.name "<recipe> <step>". 4: the chat template from chat_template.jinja
            // (transformers 5) or a named template list too.
            version: 4,
            doc: "a model as one llama.cpp GGUF file (names, metadata, tokenizer; quantized)",
            inputs: vec![Port::new(
                "model",
                ArtifactKind::Model,
                "the model to export",
            )],
            output: ArtifactKind::Model,
            params: vec![ParamSpec::with_default(
                "quant",
                ParamType::Choice(&GgufQuant::NAMES),
                ParamValue::Str("f16".into()),
                "llama-quantize's name of the mix: f32, f16, q8_0, q4_k_m, q5_k_m, q6_k",
            )],
        }
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        let model = ctx.input("model")?;
        let quant = GgufQuant::from_name(ctx.params.str("quant")?).expect("a checked choice");
        let provenance: Vec<(String, String)> = ctx
            .provenance
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            v.as_str().map_or_else(|| v.to_string(), String::from),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        // `general.name`: "<recipe> <step>", as `distillery export --format gguf` names it.
        let field = |k: &str| ctx.provenance.get(k).and_then(|s| s.as_str());
        let name = match (field("recipe"), field("step")) {
            (Some(r), Some(s)) => format!("{r} {s}"),
            (_, s) => s.unwrap_or("model").to_string(),
        };
        if let Some(warning) = requantization_warning(&model.path) {
            ctx.progress.note(&format!("warning: {warning}"));
        }
        ctx.progress.phase("writing", 1, "file");
        let report = export_model(
            &model.path,
            &ctx.out_dir.join(GGUF_FILE),
            quant,
            &name,
            &provenance,
        )?;
        ctx.progress.note(&describe(&report));
        Ok(())
    }

    fn summarize(&self, out_dir: &Path) -> Option<String> {
        let bytes = std::fs::metadata(out_dir.join(GGUF_FILE)).ok()?.len();
        Some(format!("{GGUF_FILE}, {:.1} MB", bytes as f64 / 1e6))
    }
}
