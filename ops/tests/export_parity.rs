//! By hand (see tests/golden/check_export.py): distillery's logits of a checkpoint it wrote against
//! transformers' logits of the same checkpoint. Skips unless both environment variables are set.

use burn::backend::Flex;
use burn::tensor::Tensor;
use distillery_ops::model::checkpoint::load_model;
use distillery_ops::model::decoder::{Decoder, tokens_tensor};
use distillery_ops::model::weights::{DType, bytes_to_f32};

#[test]
fn exported_checkpoint_matches_transformers() {
    let (Ok(model), Ok(logits)) = (
        std::env::var("DISTILLERY_CHECK_MODEL"),
        std::env::var("DISTILLERY_CHECK_LOGITS"),
    ) else {
        eprintln!(
            "SKIPPED: set DISTILLERY_CHECK_MODEL and DISTILLERY_CHECK_LOGITS (tests/golden/check_export.py)"
        );
        return;
    };
    let bytes = std::fs::read(&logits).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids: Vec<u32> = st
        .tensor("input_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    let want = bytes_to_f32(DType::F32, st.tensor("logits").unwrap().data());
    let m = load_model(std::path::Path::new(&model)).unwrap();
    let d = Decoder::<Flex>::load(&m.config, &m.weights, &Default::default()).unwrap();
    let got: Tensor<Flex, 3> = d.forward(tokens_tensor::<Flex>(&ids, 1, &Default::default()));
    let got = got.into_data().to_vec::<f32>().unwrap();
    let diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
    eprintln!(
        "{model}: {} logits, max |Δlogit| = {diff:.2e}, max |logit| = {scale:.1}",
        got.len()
    );
    // f32 sums in another order through every layer: judged relative to the logits' scale.
    assert!(diff <= 1e-4 * scale, "max |Δlogit| = {diff}");
}
