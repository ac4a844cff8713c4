//! Resumable checkpoints in the step's scratch directory (model, projections, AdamW state) and
//! the written output model.

use super::*;

pub(super) fn dtype_for(ctx: &OpContext, model: &LoadedModel) -> Result<DType, OpError> {
    Ok(match ctx.params.str("dtype")? {
        "same" => model.weights.dominant_dtype(),
        other => DType::from_torch_name(other).unwrap(),
    })
}

/// Writes a decoder as a checkpoint directory.
pub(super) fn save_decoder(
    dir: &Path,
    model: &Decoder<B>,
    config: &ModelConfig,
    dtype: DType,
    src: &LoadedModel,
    provenance: &serde_json::Value,
) -> Result<(), OpError> {
    let tensors = model.named_tensors(config);
    let map: std::collections::HashMap<String, Vec<f32>> =
        tensors.into_iter().map(|(n, _, v)| (n, v)).collect();
    let opts = SaveOptions {
        dtype,
        shard_bytes: 5_000_000_000,
        tokenizer_json: src.tokenizer_json.as_deref(),
        tokenizer_files: &src.tokenizer_files,
        generation_config: src.generation_config.as_ref(),
        tokenizer_config: src.tokenizer_config.as_ref(),
        provenance,
    };
    crate::model::save_checkpoint(dir, config, &opts, |n| {
        map.get(n)
            .cloned()
            .ok_or_else(|| crate::model::ModelError::Checkpoint {
                path: dir.to_path_buf(),
                why: format!("no tensor {n}"),
            })
    })?;
    Ok(())
}

/// The file holding this rank's optimizer shard: `optimizer.safetensors` for one rank,
/// `optimizer.rank-00001-of-00004.safetensors` for rank 1 of 4.
fn state_file(ranks: &Ranks) -> String {
    if ranks.world == 1 {
        "optimizer.safetensors".into()
    } else {
        format!(
            "optimizer.rank-{:05}-of-{:05}.safetensors",
            ranks.rank, ranks.world
        )
    }
}

pub(super) fn save_state(dir: &Path, state: &AdamState, ranks: &Ranks) -> Result<(), OpError> {
    let mut v = std::collections::BTreeMap::new();
    for (i, (m, s)) in state.m.iter().zip(&state.v).enumerate() {
        // As f32 whatever their dtype: bf16 moments come back exactly.
        let f32s = |t: &Tensor<B, 1>| t.clone().into_data().convert::<f32>().into_vec().unwrap();
        v.insert(format!("m.{i:05}"), f32s(m));
        v.insert(format!("v.{i:05}"), f32s(s));
    }
    write_vectors(&dir.join(state_file(ranks)), &v)
}

/// This rank's optimizer shard from a checkpoint written by `saved_world` ranks, its moments in
/// `precision`'s dtype: the same world is required (the shards' cut depends on it).
pub(super) fn load_state(
    dir: &Path,
    step: usize,
    saved_world: usize,
    ranks: &Ranks,
    precision: super::precision::Precision,
    device: &Device,
) -> Result<AdamState, OpError> {
    if saved_world != ranks.world {
        return Err(OpError::Invalid(format!(
            "the checkpoint in {} holds optimizer state sharded over {saved_world} ranks; this run has {}: run the step with tasks = {saved_world} to resume it, or `--force` it to start over",
            dir.display(),
            ranks.world
        )));
    }
    let v = read_vectors(&dir.join(state_file(ranks)))?;
    let mut state = AdamState {
        step,
        m: Vec::new(),
        v: Vec::new(),
    };
    for (k, x) in v {
        let t = Tensor::<B, 1>::from_data(
            TensorData::new(x.clone(), [x.len()]),
            (device, precision.moments.tensor_dtype()),
        );
        if k.starts_with("m.") {
            state.m.push(t);
        } else {
            state.v.push(t);
        }
    }
    Ok(state)
}

pub(super) fn save_projections(dir: &Path, student: &Student<TB>) -> Result<(), OpError> {
    let v: std::collections::BTreeMap<String, Vec<f32>> = student
        .projections
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                format!("p.{i:05}"),
                p.val().inner().into_data().to_vec::<f32>().unwrap(),
            )
        })
        .collect();
    write_vectors(&dir.join("projections.safetensors"), &v)
}

/// The projections: from a checkpoint directory when given, else their starting weights.
pub(super) fn projections(
    inits: &[ProjectionInit],
    checkpoint: Option<&Path>,
    device: &Device,
) -> Result<Vec<Param<Tensor<TB, 2>>>, OpError> {
    let saved = match checkpoint {
        Some(dir) => Some(read_vectors(&dir.join("projections.safetensors"))?),
        None => None,
    };
    inits
        .iter()
        .enumerate()
        .map(|(i, init)| {
            let [r, c] = init.shape;
            let w = match &saved {
                Some(v) => v
                    .get(&format!("p.{i:05}"))
                    .filter(|w| w.len() == r * c)
                    .cloned()
                    .ok_or_else(|| {
                        OpError::Invalid(format!(
                            "the checkpoint has no projection {i} of shape [{r}, {c}]"
                        ))
                    })?,
                None => init.weights.clone(),
            };
            Ok(Param::from_tensor(
                Tensor::<TB, 2>::from_data(TensorData::new(w, [r, c]), device).require_grad(),
            ))
        })
        .collect()
}

/// Writes the resumable checkpoint: every rank its optimizer shard, the first rank the model,
/// projections and `state.json` (step, key, world, metrics). Collective: every rank calls it.
#[allow(clippy::too_many_arguments)]
pub(super) fn write_checkpoint(
    ckpt: &Path,
    student: &Student<TB>,
    state: &AdamState,
    config: &ModelConfig,
    src: &LoadedModel,
    step: usize,
    key: &str,
    metrics: &[serde_json::Value],
    collective: &dyn Collective,
) -> Result<(), OpError> {
    let ranks = collective.ranks();
    // Written beside, then swapped in: a kill mid-write leaves the previous checkpoint intact.
    let tmp = ckpt.with_extension("tmp");
    if ranks.is_first() {
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| OpError::io(&tmp, "create", e))?;
    }
    collective.barrier().map_err(collective_error)?;
    save_state(&tmp, state, ranks)?;
    collective.barrier().map_err(collective_error)?;
    if !ranks.is_first() {
        // The first rank writes the model and installs the checkpoint: no time limit for that
        // (a 12B model on a shared filesystem can take longer than a collective may wait).
        return after_first_alone(collective, ranks);
    }
    save_decoder(
        &tmp,
        &student.model.valid(),
        config,
        DType::F32,
        src,
        &json!({"checkpoint_step": step}),
    )?;
    save_projections(&tmp, student)?;
    let s = json!({"step": step, "key": key, "world": ranks.world, "metrics": metrics});
    let p = tmp.join("state.json");
    std::fs::write(&p, s.to_string()).map_err(|e| OpError::io(&p, "write", e))?;
    let old = ckpt.with_extension("old");
    let _ = std::fs::remove_dir_all(&old);
    if ckpt.exists() {
        std::fs::rename(ckpt, &old).map_err(|e| OpError::io(ckpt, "move aside", e))?;
    }
    std::fs::rename(&tmp, ckpt).map_err(|e| OpError::io(ckpt, "install", e))?;
    let _ = std::fs::remove_dir_all(&old);
    after_first_alone(collective, ranks)
}

/// The meeting after the first rank worked alone (a checkpoint, a validation): the others wait
/// for it with no time limit, the first, whose peers are already waiting, with the collective's
/// own, so that a peer that hung meanwhile is named instead of waited for forever.
pub(super) fn after_first_alone(
    collective: &dyn crate::parallel::Collective,
    ranks: &crate::parallel::Ranks,
) -> Result<(), OpError> {
    if ranks.is_first() {
        collective.barrier()
    } else {
        collective.wait_for_all()
    }
    .map_err(collective_error)
}

/// A collective's failure as the op's.
pub(super) fn collective_error(e: crate::parallel::CollectiveError) -> OpError {
    OpError::Collective(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Optimizer shards are cut by the world size: a checkpoint of another world is refused with
    /// what to do, and one of the same world loads this rank's shard.
    #[test]
    fn a_checkpoint_of_another_world_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let device = crate::runtime::device();
        let rank = |rank, world| Ranks {
            rank,
            world,
            local_rank: rank,
            session: String::new(),
        };
        let state = AdamState {
            step: 3,
            m: vec![Tensor::from_data(
                TensorData::new(vec![1f32, 2.0], [2]),
                &device,
            )],
            v: vec![Tensor::from_data(
                TensorData::new(vec![3f32, 4.0], [2]),
                &device,
            )],
        };
        save_state(dir.path(), &state, &rank(1, 2)).unwrap();
        assert!(
            dir.path()
                .join("optimizer.rank-00001-of-00002.safetensors")
                .is_file()
        );
        let err = load_state(dir.path(), 3, 2, &rank(1, 3), Default::default(), &device)
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("sharded over 2 ranks; this run has 3") && err.contains("tasks = 2"),
            "{err}"
        );
        let back = load_state(dir.path(), 3, 2, &rank(1, 2), Default::default(), &device).unwrap();
        assert_eq!(
            back.m[0].clone().into_data().to_vec::<f32>().unwrap(),
            [1.0, 2.0]
        );
        assert_eq!(
            back.v[0].clone().into_data().to_vec::<f32>().unwrap(),
            [3.0, 4.0]
        );
    }
}
