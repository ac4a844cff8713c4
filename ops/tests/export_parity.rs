//! By hand (see tests/golden/check_export.py): distillery's logits of a checkpoint it wrote against
//! transformers' logits of the same checkpoint. Skips unless both environment variables are set.

use burn::backend::Flex;
use burn::tensor::Tensor;
use distillery_ops::model::checkpoint::load_model;
use distillery_ops::model::decoder::{Decoder, tokens_tensor};

/// Max and root-mean-square of `a - b`.
fn diff(a: &[f64], b: &[f64]) -> (f64, f64) {
    let (max, sq) = a.iter().zip(b).fold((0f64, 0f64), |(m, s), (x, y)| {
        let d = (x - y).abs();
        (m.max(d), s + d * d)
    });
    (max, (sq / a.len() as f64).sqrt())
}

fn floats(st: &safetensors::SafeTensors, name: &str) -> Option<Vec<f64>> {
    let t = st.tensor(name).ok()?;
    Some(match t.dtype() {
        safetensors::Dtype::F64 => t
            .data()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        other => panic!("{name}: dtype {other:?}"),
    })
}

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
    let ids_view = st.tensor("input_ids").unwrap();
    let batch = if ids_view.shape().len() == 2 {
        ids_view.shape()[0]
    } else {
        1
    };
    let ids: Vec<u32> = ids_view
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    let torch32 = floats(&st, "logits").unwrap();
    let m = load_model(std::path::Path::new(&model)).unwrap();
    let d = Decoder::<Flex>::load(&m.config, &m.weights, &Default::default()).unwrap();
    let got: Tensor<Flex, 3> = d.forward(tokens_tensor::<Flex>(&ids, batch, &Default::default()));
    let ours: Vec<f64> = got
        .into_data()
        .to_vec::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    let (max, rms) = diff(&ours, &torch32);
    eprintln!(
        "{model}: {} logits ({batch} × {} tokens)\n  distillery vs transformers f32: max |Δ| {max:.2e}, rms {rms:.2e}",
        ours.len(),
        ids.len() / batch
    );
    if max <= 1e-4 {
        return;
    }
    // Past 1e-4, judge both f32 implementations against transformers in f64: on models with
    // massive activations (SmolLM2's residual stream reaches 1e4) f32 sums in any other order
    // differ by that much, and transformers' own f32 logits are as far from the exact ones.
    let exact = floats(&st, "logits_f64").expect(
        "max |Δ| > 1e-4 and no logits_f64 to tell rounding from a bug: rerun check_export.py",
    );
    let (ours_max, ours_rms) = diff(&ours, &exact);
    let (torch_max, torch_rms) = diff(&torch32, &exact);
    eprintln!(
        "  against transformers f64: distillery max {ours_max:.2e} rms {ours_rms:.2e}, transformers f32 max {torch_max:.2e} rms {torch_rms:.2e}"
    );
    assert!(
        ours_max <= 2.0 * torch_max.max(1e-4) && ours_rms <= 2.0 * torch_rms,
        "distillery's f32 logits are further from the f64 reference than transformers' f32 ones"
    );
}
