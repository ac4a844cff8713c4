//! Logit parity with transformers on tiny random checkpoints (tests/golden, made by
//! make_goldens.py), and checkpoint round trips.

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::Tensor;
use distillery_ops::model::checkpoint::{SaveOptions, load_model};
use distillery_ops::model::decoder::{Decoder, tokens_tensor};
use distillery_ops::model::weights::{DType, bytes_to_f32};

type B = Flex;

fn golden_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/golden")
        .join(name)
}

fn golden(dir: &Path) -> (Vec<u32>, Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(dir.join("golden.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids = st.tensor("input_ids").unwrap();
    let ids: Vec<u32> = ids
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    let logits = st.tensor("logits").unwrap();
    (
        ids,
        logits.shape().to_vec(),
        bytes_to_f32(DType::F32, logits.data()),
    )
}

fn logits_of(model_dir: &Path, ids: &[u32], batch: usize) -> Vec<f32> {
    let device = Default::default();
    let m = load_model(model_dir).unwrap();
    let decoder = Decoder::<B>::load(&m.config, &m.weights, &device).unwrap();
    let out: Tensor<B, 3> = decoder.forward(tokens_tensor::<B>(ids, batch, &device));
    out.into_data().to_vec::<f32>().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Saved by transformers 4.46 (make_goldens.py) and by 5.x (make_goldens_v5.py: `rope_parameters`,
/// `dtype`; make_goldens_families.py: one per family of the architecture table), which must give
/// the same model.
const CASES: [&str; 12] = [
    "llama-gqa-tied-f32",
    "llama3-untied-bf16-sharded",
    "mistral-window-f16",
    "v5-llama3-rope-parameters",
    "v5-llama-linear",
    "v5-llama-bos-chartok",
    "family-qwen2",
    "family-qwen3",
    "family-gemma2",
    "family-gemma3_text",
    "family-phi3",
    "family-nemotron",
];

#[test]
fn logits_match_transformers() {
    let mut bad = Vec::new();
    for name in CASES {
        let dir = golden_dir(name);
        let (ids, shape, expected) = golden(&dir);
        let got = logits_of(&dir, &ids, shape[0]);
        let diff = max_abs_diff(&got, &expected);
        eprintln!("{name}: max |Δlogit| = {diff:.2e}");
        if diff > 1e-4 {
            bad.push(format!("{name}: max |Δlogit| = {diff}"));
        }
    }
    assert!(bad.is_empty(), "{bad:?}");
}

#[test]
fn save_then_load_is_bit_identical_with_the_same_config() {
    for name in CASES {
        let dir = golden_dir(name);
        let m = load_model(&dir).unwrap();
        let dtype = m.weights.dominant_dtype();
        let out = tempfile::tempdir().unwrap();
        let provenance = serde_json::json!({"test": name});
        let opts = SaveOptions {
            dtype,
            // Small shards force an index on every case.
            shard_bytes: 30_000,
            tokenizer_json: None,
            tokenizer_files: &m.tokenizer_files,
            generation_config: m.generation_config.as_ref(),
            tokenizer_config: None,
            provenance: &provenance,
        };
        distillery_ops::model::save_checkpoint(out.path(), &m.config, &opts, |n| {
            Ok(m.weights.f32(n)?.1)
        })
        .unwrap();
        assert!(out.path().join("model.safetensors.index.json").is_file());
        let back = load_model(out.path()).unwrap();
        // Written in the legacy layout 4.46 reads, and stamped so, whoever saved the source.
        let (mut a, mut b) = (back.config.clone(), m.config.clone());
        assert_eq!(
            a.extra.remove("transformers_version"),
            Some("4.46.3".into())
        );
        b.extra.remove("transformers_version");
        assert_eq!(a, b, "{name}: config changed");
        for t in m.weights.names() {
            let (meta_a, raw_a) = m.weights.raw(&t).unwrap();
            let (meta_b, raw_b) = back.weights.raw(&t).unwrap();
            assert_eq!(meta_a.shape, meta_b.shape);
            assert_eq!(meta_a.dtype, meta_b.dtype);
            assert!(raw_a == raw_b, "{name}: tensor {t} changed");
        }
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["head_dim"], m.config.head_dim);
        assert_eq!(cfg["dtype"], dtype.torch_name());
        assert_eq!(
            cfg["torch_dtype"], cfg["dtype"],
            "both spellings, one value"
        );
    }
}

#[test]
fn configs_written_back_have_one_rope_and_one_dtype() {
    for name in CASES {
        let m = load_model(&golden_dir(name)).unwrap();
        let cfg = m.config.to_json();
        assert!(cfg.get("rope_parameters").is_none(), "{name}: {cfg}");
        assert!(cfg.get("torch_dtype") == cfg.get("dtype"), "{name}: {cfg}");
        assert!(cfg["rope_theta"].is_number(), "{name}: {cfg}");
    }
    // A 5.x config's rope_parameters arrive as the legacy keys with the same values.
    let m = load_model(&golden_dir("v5-llama3-rope-parameters")).unwrap();
    let cfg = m.config.to_json();
    assert_eq!(cfg["rope_theta"], 500000.0);
    assert_eq!(cfg["rope_scaling"]["rope_type"], "llama3");
    assert_eq!(cfg["rope_scaling"]["original_max_position_embeddings"], 16);
}

/// tests/golden/gguf-quants/blocks.safetensors (make_gguf_quant_goldens.py).
fn quant_goldens() -> Vec<u8> {
    std::fs::read(golden_dir("gguf-quants").join("blocks.safetensors")).unwrap()
}

/// Every GGUF tensor type, dequantized bit for bit as the `gguf` Python package's reference
/// dequantizers do (tests/golden/make_gguf_quant_goldens.py: random blocks with sane scales).
#[test]
fn gguf_dequantization_matches_gguf_py_bit_for_bit() {
    use distillery_ops::model::gguf::quants::{GgmlType, dequantize};
    let bytes = quant_goldens();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut checked = Vec::new();
    for &ty in GgmlType::ALL {
        if ty == GgmlType::F32 {
            continue; // a plain copy
        }
        let blocks = st
            .tensor(&format!("{}.blocks", ty.name()))
            .unwrap_or_else(|_| panic!("no golden for {}", ty.name()));
        let want: Vec<f32> = st
            .tensor(&format!("{}.values", ty.name()))
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let got = dequantize(ty, blocks.data());
        assert_eq!(got.len(), want.len(), "{}", ty.name());
        let wrong: Vec<(usize, f32, f32)> = got
            .iter()
            .zip(&want)
            .enumerate()
            .filter(|(_, (g, w))| g.to_bits() != w.to_bits())
            .map(|(i, (g, w))| (i, *g, *w))
            .take(5)
            .collect();
        assert!(
            wrong.is_empty(),
            "{}: (index, ours, gguf-py) {wrong:?}",
            ty.name()
        );
        checked.push(ty.name());
    }
    assert_eq!(checked.len(), GgmlType::ALL.len() - 1);
}

/// A family model with the 160-token byte-level tokenizer (tests/golden/gguf-tokenizer), in a
/// temporary directory: the source of a GGUF export.
fn with_gguf_tokenizer(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(golden_dir(name)).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(golden_dir("gguf-tokenizer").join(f), dir.path().join(f)).unwrap();
    }
    dir
}

/// Every family out to GGUF and back: llama.cpp's names, permutation, norm offsets and metadata
/// undone by distillery's reader give transformers' logits again (f32), the same tokenizer, and
/// quantized exports stay close to them.
#[test]
fn gguf_exports_of_every_family_read_back_as_the_same_model() {
    use distillery_ops::model::gguf::writer::{GgufQuant, export_model};
    // A Llama (its 160-token vocabulary fits the GGUF test tokenizer) and every other family.
    let cases = CASES
        .into_iter()
        .filter(|c| *c == "llama3-untied-bf16-sharded" || c.starts_with("family-"));
    let text = "The quick brown fox jumps over the lazy dog.";
    let mut bad = Vec::new();
    for name in cases {
        let src = with_gguf_tokenizer(name);
        let (ids, shape, _) = golden(&golden_dir(name));
        // What llama.cpp cannot run is refused by name; the test then exports the nearest model
        // it can (Qwen2 and Phi-3 without windows, Gemma 2's query scale from head_dim, Gemma 3's
        // pattern).
        let refused: Option<(&str, fn(&mut serde_json::Value))> = match name {
            "family-qwen2" => Some(("runs Qwen2ForCausalLM without windows", |c| {
                c["use_sliding_window"] = false.into();
                c.as_object_mut().unwrap().remove("layer_types");
            })),
            "family-gemma2" => Some(("llama.cpp derives 12", |c| {
                c["query_pre_attn_scalar"] = c["head_dim"].clone();
            })),
            // Sliding, sliding, full: llama.cpp's Gemma 3 makes every sixth layer full.
            "family-gemma3_text" => Some(("derives Gemma3ForCausalLM's sliding layers", |c| {
                c["layer_types"] = serde_json::json!([
                    "sliding_attention",
                    "sliding_attention",
                    "sliding_attention"
                ]);
            })),
            // llama.cpp disables Phi-3's window ("Phi SWA is currently disabled").
            "family-phi3" => Some(("runs Phi3ForCausalLM without windows", |c| {
                c["sliding_window"] = serde_json::Value::Null;
            })),
            _ => None,
        };
        if let Some((why, patch)) = refused {
            let file = src.path().join("refused.gguf");
            let err = export_model(src.path(), &file, GgufQuant::F32, name, &[]).unwrap_err();
            assert!(err.to_string().contains(why), "{name}: {err}");
            let path = src.path().join("config.json");
            let mut c: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            patch(&mut c);
            std::fs::write(&path, c.to_string()).unwrap();
        }
        // The source as distillery computes it (equal to transformers: logits_match_transformers).
        let expected = logits_of(src.path(), &ids, shape[0]);
        let out = tempfile::tempdir().unwrap();
        let mut rms = Vec::new();
        for quant in [GgufQuant::F32, GgufQuant::Q8_0, GgufQuant::Q4_K_M] {
            let file = out.path().join("model.gguf");
            let provenance = [("key".to_string(), "abc".to_string())];
            export_model(src.path(), &file, quant, name, &provenance).unwrap();
            let back = load_model(&file).unwrap();
            let orig = load_model(src.path()).unwrap();
            assert_eq!(
                back.config.family.architecture,
                orig.config.family.architecture
            );
            assert_eq!(
                back.config.tensor_shapes(),
                orig.config.tensor_shapes(),
                "{name}"
            );
            let got = logits_of(&file, &ids, shape[0]);
            let diff = max_abs_diff(&got, &expected);
            if quant == GgufQuant::F32 {
                eprintln!("{name}: GGUF f32 max |Δlogit| = {diff:.2e}");
                if diff > 1e-4 {
                    bad.push(format!("{name}: f32 GGUF max |Δlogit| = {diff}"));
                }
                let tok = |m: &distillery_ops::model::checkpoint::LoadedModel| {
                    let t = distillery_ops::model::tokenizer::Tokenizer::from_json(
                        m.tokenizer_json.as_deref().unwrap(),
                        &m.path,
                    )
                    .unwrap();
                    t.encode(text).unwrap()
                };
                assert_eq!(tok(&back), tok(&orig), "{name}: tokenizer");
                assert_eq!(back.special_token("bos_token").as_deref(), Some("<s>"));
            } else {
                let scale = expected.iter().map(|v| v * v).sum::<f32>() / expected.len() as f32;
                let err = got
                    .iter()
                    .zip(&expected)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f32>()
                    / expected.len() as f32;
                rms.push(format!("{quant:?} {:.2e}", (err / scale).sqrt()));
            }
        }
        eprintln!("{name}: relative RMS logit error {}", rms.join(", "));
    }
    assert!(bad.is_empty(), "{bad:?}");

    // A tokenizer that puts BOS before every text keeps doing so through GGUF
    // (`tokenizer.ggml.add_bos_token`, back as a post-processor).
    let src = with_gguf_tokenizer("family-qwen3");
    let path = src.path().join("tokenizer_config.json");
    let mut tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    tc["add_bos_token"] = true.into();
    std::fs::write(&path, tc.to_string()).unwrap();
    let file = src.path().join("bos.gguf");
    export_model(src.path(), &file, GgufQuant::F32, "bos", &[]).unwrap();
    let back = load_model(&file).unwrap();
    let tok = distillery_ops::model::tokenizer::Tokenizer::from_json(
        back.tokenizer_json.as_deref().unwrap(),
        &back.path,
    )
    .unwrap();
    assert_eq!(tok.special_affixes().unwrap(), (vec![1], vec![]));
}

/// Q8_0, Q5_0 and Q5_1 blocks as llama.cpp's reference quantizers write them (through gguf-py's).
#[test]
fn gguf_quantization_matches_gguf_py_bit_for_bit() {
    use distillery_ops::model::gguf::quants::{GgmlType, quantize};
    let bytes = quant_goldens();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for ty in [GgmlType::Q8_0, GgmlType::Q5_0, GgmlType::Q5_1] {
        let x = bytes_to_f32(
            DType::F32,
            st.tensor(&format!("{}.quantize_input", ty.name()))
                .unwrap()
                .data(),
        );
        let want = st.tensor(&format!("{}.quantized", ty.name())).unwrap();
        assert_eq!(quantize(ty, &x).unwrap(), want.data(), "{}", ty.name());
    }
}
