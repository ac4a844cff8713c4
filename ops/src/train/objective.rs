//! What a training op minimizes: the [`Objective`] trait and plain next-token cross-entropy.

use super::*;
use crate::model::decoder::NoHooks;

/// What a training op optimizes.
pub trait Objective {
    /// Loss of the student on `[batch, seq]` inputs with `[batch, seq]` next-token targets,
    /// averaged over the targets `trained` marks (`[batch, seq]`; chat data's assistant tokens),
    /// or over all of them when it is `None`; computed on `device`, where the student lives.
    fn loss(
        &self,
        student: &Student<TB>,
        input: &[u32],
        targets: &[u32],
        trained: Option<&[bool]>,
        batch: usize,
        device: &Device,
    ) -> Tensor<TB, 1>;
    fn name(&self) -> &'static str;
    /// Asked only once the loss on `input` (`[batch, seq]`) came out non-finite: a cause outside
    /// the student (a frozen teacher whose forward overflows), said as what to do, or `None`.
    fn non_finite_cause(&self, _input: &[u32], _batch: usize, _device: &Device) -> Option<String> {
        None
    }
    /// Checks, before the first step, that the objective can serve every sequence the run will
    /// read (`inputs`: each sequence's input tokens, validation ones included); a cached
    /// teacher says which it lacks.
    fn check_sequences(&self, _inputs: &mut dyn Iterator<Item = &[u32]>) -> Result<(), OpError> {
        Ok(())
    }
    /// The learned projections this objective uses (`[student_hidden, teacher_hidden]`), in the
    /// order `loss` reads `student.projections`.
    fn projections(&self) -> Vec<ProjectionInit> {
        Vec::new()
    }
}

/// Plain next-token cross-entropy, through the output head `chunk` tokens at a time
/// ([`chunked_head_loss`]; 0: the whole micro-batch's logits at once).
pub struct CrossEntropy {
    pub chunk: usize,
}

/// Mean next-token cross-entropy of `logits [batch, seq, vocab]` against `targets [batch * seq]`
/// over the targets `trained` marks (all when `None`); 0, with no gradient, when it marks none.
pub fn cross_entropy<Bk: burn::tensor::backend::Backend>(
    logits: Tensor<Bk, 3>,
    targets: &[u32],
    trained: Option<&[bool]>,
) -> Tensor<Bk, 1> {
    let [b, s, v] = logits.dims();
    let logits = logits.reshape([b * s, v]);
    let kept = trained_targets(targets, trained);
    let Some(kept_logits) = trained_rows(logits.clone(), trained) else {
        // Zero, on the graph: backward gives zero gradients rather than none.
        return (logits.sum() * 0.0).reshape([1]);
    };
    cross_entropy_rows(kept_logits, &kept)
}

/// Mean cross-entropy of `logits [rows, vocab]` against `targets [rows]`, `[1]`.
pub fn cross_entropy_rows<Bk: burn::tensor::backend::Backend>(
    logits: Tensor<Bk, 2>,
    targets: &[i64],
) -> Tensor<Bk, 1> {
    let logits = match crate::model::fast::trained_cross_entropy(logits, targets) {
        Ok(loss) => return loss,
        Err(logits) => logits,
    };
    let n = targets.len();
    let t = Tensor::<Bk, 2, Int>::from_data(
        TensorData::new(targets.to_vec(), [n, 1]),
        &logits.device(),
    );
    log_softmax(logits, 1).gather(1, t).mean().neg()
}

/// The targets `trained` marks (all when `None`), as the gather indices of the loss.
pub fn trained_targets(targets: &[u32], trained: Option<&[bool]>) -> Vec<i64> {
    match trained {
        Some(mask) => targets
            .iter()
            .zip(mask)
            .filter(|(_, m)| **m)
            .map(|(&t, _)| t as i64)
            .collect(),
        None => targets.iter().map(|&x| x as i64).collect(),
    }
}

/// Whether `model`'s head runs chunked: a `chunk` is set (in either compute dtype).
pub fn chunks_head(chunk: usize) -> bool {
    chunk > 0
}

/// The rows `[tokens, width]` the loss counts: all (`trained` is `None`), or those it marks;
/// `None` when it marks none.
pub fn trained_rows<Bk: burn::tensor::backend::Backend>(
    rows: Tensor<Bk, 2>,
    trained: Option<&[bool]>,
) -> Option<Tensor<Bk, 2>> {
    let Some(mask) = trained else {
        return Some(rows);
    };
    let kept: Vec<i64> = mask
        .iter()
        .enumerate()
        .filter(|(_, m)| **m)
        .map(|(i, _)| i as i64)
        .collect();
    if kept.is_empty() {
        return None;
    }
    if kept.len() == mask.len() {
        return Some(rows);
    }
    let device = rows.device();
    let n = kept.len();
    Some(rows.select(
        0,
        Tensor::<Bk, 1, Int>::from_data(TensorData::new(kept, [n]), &device),
    ))
}

impl Objective for CrossEntropy {
    fn loss(
        &self,
        student: &Student<TB>,
        input: &[u32],
        targets: &[u32],
        trained: Option<&[bool]>,
        batch: usize,
        device: &Device,
    ) -> Tensor<TB, 1> {
        let tokens = tokens_tensor::<TB>(input, batch, device);
        if !chunks_head(self.chunk) {
            return cross_entropy(student.model.forward(tokens), targets, trained);
        }
        let hidden = student.model.hidden(tokens, &mut NoHooks);
        let [b, s, h] = hidden.dims();
        let Some(rows) = trained_rows(hidden.clone().reshape([b * s, h]), trained) else {
            return (hidden.sum() * 0.0).reshape([1]);
        };
        let kept = trained_targets(targets, trained);
        let n = kept.len();
        let (weight, softcap) = student.model.head();
        let compute = student.model.compute;
        chunked_head_loss(
            rows,
            weight,
            softcap,
            compute,
            self.chunk,
            1,
            &|range, logits| {
                let share = range.len() as f64 / n as f64;
                vec![cross_entropy_rows(logits[0].clone(), &kept[range]) * share]
            },
        )
    }
    fn name(&self) -> &'static str {
        "cross_entropy"
    }
}
