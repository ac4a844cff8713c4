//! AdamW with decoupled weight decay, its state sharded over the data-parallel ranks (ZeRO-1), and
//! one optimizer step: gradients reduced over ranks, clipped by the global norm, then updated.
//!
//! The parameters, flattened in visiting order and concatenated, are cut into one contiguous shard
//! per rank ([`Shards`]). A rank keeps AdamW moments for its shard only, as one piece per parameter
//! the shard overlaps; with one rank every piece is a whole parameter. AdamW is elementwise, so
//! the update of an element does not depend on which rank computes it.

use std::ops::Range;

use burn::tensor::FloatDType;

use burn::tensor::TensorPrimitive;
use distillery_kernels::KernelBackend;

use crate::parallel::{Collective, CollectiveError, Shards};

use super::precision::{AdamStep, PiecePosition, adamw_rounded};
use super::*;

/// AdamW state for this rank's shard: first and second moments, one flat tensor per piece.
pub struct AdamState {
    pub step: usize,
    pub m: Vec<Tensor<B, 1>>,
    pub v: Vec<Tensor<B, 1>>,
}

impl AdamState {
    pub fn new() -> AdamState {
        AdamState {
            step: 0,
            m: Vec::new(),
            v: Vec::new(),
        }
    }

    /// Bytes the moments take in their dtype: this rank's optimizer state.
    pub fn bytes(&self) -> usize {
        self.m
            .iter()
            .chain(&self.v)
            .map(|t| t.dims()[0] * t.dtype().size())
            .sum()
    }
}

impl Default for AdamState {
    fn default() -> Self {
        AdamState::new()
    }
}

/// The part of parameter `param` (its elements `range`, flattened) inside a rank's shard.
#[derive(Clone, Debug, PartialEq)]
pub struct Piece {
    pub param: usize,
    pub range: Range<usize>,
    /// Whether the piece is the whole parameter.
    pub whole: bool,
}

/// The pieces of the flat parameter vector (parameters of `sizes` elements, in visiting order)
/// that fall in `shard`, in order.
pub fn pieces(sizes: &[usize], shard: Range<usize>) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut offset = 0;
    for (param, &n) in sizes.iter().enumerate() {
        let (lo, hi) = (shard.start.max(offset), shard.end.min(offset + n));
        if lo < hi {
            out.push(Piece {
                param,
                range: lo - offset..hi - offset,
                whole: hi - lo == n,
            });
        }
        offset += n;
    }
    out
}

/// Each parameter's id, shape, flattened value and flattened gradient (if it has one), in
/// visiting order.
struct Flat<'a> {
    grads: &'a mut Option<burn::optim::GradientsParams>,
    params: Vec<FlatParam>,
}

struct FlatParam {
    dims: Vec<usize>,
    value: Tensor<B, 1>,
    grad: Option<Tensor<B, 1>>,
}

impl ModuleVisitor<TB> for Flat<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<TB, D>>) {
        let value = param.val().inner();
        let dims = value.dims().to_vec();
        let n: usize = dims.iter().product();
        let grad = self
            .grads
            .as_mut()
            .and_then(|g| g.remove::<B, D>(param.id))
            .map(|g| g.reshape([n]));
        self.params.push(FlatParam {
            dims,
            value: value.reshape([n]),
            grad,
        });
    }
}

/// Replaces every parameter's value by `values[i]` (flat, any float dtype), in visiting order,
/// in the parameter's own dtype.
struct SetValues {
    values: std::vec::IntoIter<Tensor<B, 1>>,
}

impl ModuleMapper<TB> for SetValues {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<TB, D>>) -> Param<Tensor<TB, D>> {
        let (id, tensor, mapper) = param.consume();
        let dims = tensor.dims();
        let v = self.values.next().expect("a value per parameter");
        let v = if v.dtype() == tensor.dtype() {
            v
        } else {
            v.cast(tensor.dtype())
        };
        Param::from_mapped_value(
            id,
            Tensor::from_inner(v.reshape(dims)).require_grad(),
            mapper,
        )
    }
}

/// What one optimizer step did.
pub struct StepOutcome {
    pub student: Student<TB>,
    /// The loss summed over micro-batches (each scaled by 1 / micro-batches): the batch's mean.
    pub loss: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens predicted in the step (on all ranks).
    pub tokens: u64,
}

/// Why a step stopped: a non-finite loss or gradient, or a collective that failed.
pub enum StepError {
    NonFinite(NonFinite),
    Collective(CollectiveError),
}

impl From<CollectiveError> for StepError {
    fn from(e: CollectiveError) -> Self {
        StepError::Collective(e)
    }
}

fn host(t: &Tensor<B, 1>) -> Vec<f32> {
    t.clone()
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 after convert")
}

/// One optimizer step over the global batch `micro_batches` (`[micro_batch]` sequences each):
/// this rank computes loss and gradients on its contiguous share of them (one rank: all),
/// the gradients are summed over ranks into each rank's shard, clipped by the global norm, then
/// AdamW at `lr` updates the shard and the shards are gathered back into every rank's model.
#[allow(clippy::too_many_arguments)]
pub fn optimizer_step(
    student: Student<TB>,
    state: &mut AdamState,
    objective: &dyn Objective,
    micro_batches: &[Packed],
    cfg: &TrainConfig,
    lr: f64,
    collective: &dyn Collective,
    device: &Device,
) -> Result<StepOutcome, StepError> {
    let ranks = collective.ranks().clone();
    let accum = micro_batches.len();
    let per_rank = accum / ranks.world;
    let mine = ranks.rank * per_rank..(ranks.rank + 1) * per_rank;
    let mut grads_acc: Option<burn::optim::GradientsParams> = None;
    // Chat data: each micro-batch's mean over its marked targets weighs by their count, so the
    // step's loss is the mean over the global batch's marked targets whatever micro_batch is.
    let marked: Vec<usize> = micro_batches.iter().map(Packed::trained_targets).collect();
    let all_marked: usize = marked.iter().sum();
    let tokens = micro_batches
        .iter()
        .flat_map(|b| b.tokens.iter().map(|s| s.len() as u64 - 1))
        .sum::<u64>();
    let mut losses = vec![0f32; per_rank];
    for (k, a) in mine.clone().enumerate() {
        let (batch, count) = (&micro_batches[a], marked[a]);
        let (input, targets, trained) = split(batch);
        if trained.is_some() && count == 0 {
            // Nothing to learn from here; the others carry the step.
            continue;
        }
        let loss = objective.loss(
            &student,
            &input,
            &targets,
            trained.as_deref(),
            batch.tokens.len(),
            device,
        );
        let loss = match trained {
            None => loss / accum as f64,
            Some(_) => loss * (count as f64 / all_marked as f64),
        };
        let value = loss.clone().into_data().to_vec::<f32>().unwrap()[0];
        if !value.is_finite() {
            return Err(StepError::NonFinite(NonFinite {
                what: "loss",
                param: None,
                cause: objective.non_finite_cause(&input, batch.tokens.len(), device),
            }));
        }
        losses[k] = value;
        let grads = burn::optim::GradientsParams::from_grads(loss.backward(), &student);
        grads_acc = Some(match grads_acc {
            None => grads,
            Some(acc) => add_grads(acc, grads, &student, cfg.precision.sums_grads_in_f32()),
        });
    }
    // Summed in micro-batch order whatever the world: the same number one rank would report.
    let loss_sum: f64 = collective
        .all_gather(&losses)?
        .iter()
        .map(|&l| l as f64)
        .sum();
    if micro_batches.iter().all(|b| b.trained.is_some()) && all_marked == 0 {
        // A global batch of chat data with no assistant token: no update, nothing learned.
        return Ok(StepOutcome {
            student,
            loss: 0.0,
            grad_norm: 0.0,
            tokens,
        });
    }

    let mut flat = Flat {
        grads: &mut grads_acc,
        params: Vec::new(),
    };
    student.visit(&mut flat);
    let params = flat.params;
    let sizes: Vec<usize> = params.iter().map(|p| p.dims.iter().product()).collect();
    let shards = Shards::new(sizes.iter().sum(), ranks.world);
    let shard = shards.range(ranks.rank);
    let pieces = pieces(&sizes, shard.clone());
    // Which parameters have a gradient on some rank (a rank whose micro-batches were all
    // skipped has none).
    let has: Vec<f32> = params
        .iter()
        .map(|p| if p.grad.is_some() { 1.0 } else { 0.0 })
        .collect();
    let has_grad: Vec<bool> = {
        let all = collective.all_gather(&has)?;
        (0..params.len())
            .map(|i| (0..ranks.world).any(|r| all[r * params.len() + i] > 0.0))
            .collect()
    };
    // This rank's pieces of the gradient summed over ranks.
    // Alone, nothing crosses a collective (a single rank over NCCL still does, to check it).
    let solo = collective.is_solo();
    let grad_pieces: Vec<Option<Tensor<B, 1>>> = if solo {
        // One rank: every piece is a whole parameter.
        pieces
            .iter()
            .map(|piece| params[piece.param].grad.clone())
            .collect()
    } else {
        let mut full = Vec::with_capacity(shards.n);
        for (p, &n) in params.iter().zip(&sizes) {
            match &p.grad {
                Some(g) => full.extend(host(g)),
                None => full.resize(full.len() + n, 0.0),
            }
        }
        let reduced = collective.reduce_scatter(&full, shards)?;
        drop(full);
        let mut at = 0;
        pieces
            .iter()
            .map(|piece| {
                let len = piece.range.len();
                let t = Tensor::<B, 1>::from_data(
                    TensorData::new(reduced[at..at + len].to_vec(), [len]),
                    device,
                );
                at += len;
                has_grad[piece.param].then_some(t)
            })
            .collect()
    };
    // Squared norms per parameter: this rank's part (a parameter is one piece at most on a
    // rank), then summed over ranks in rank order.
    let fused = crate::model::fast::enabled();
    let mut partial = vec![0f64; params.len()];
    for (piece, g) in pieces.iter().zip(&grad_pieces) {
        if let Some(g) = g {
            // Of f32 values whatever the gradient's dtype: in one pass summed in f64 where the
            // backend has one (the CPU), unless the fast path is off (summed in f32 then).
            let g = g.clone().cast(FloatDType::F32);
            partial[piece.param] = if fused {
                B::sum_squares(g.into_primitive().tensor())
            } else {
                distillery_kernels::adamw::sum_squares_reference(g)
            };
        }
    }
    let sq: Vec<f64> = if solo {
        partial
    } else {
        let partial: Vec<f32> = partial.iter().map(|&x| x as f32).collect();
        let all = collective.all_gather(&partial)?;
        (0..params.len())
            .map(|i| {
                (0..ranks.world)
                    .map(|r| all[r * params.len() + i] as f64)
                    .sum()
            })
            .collect()
    };
    if let Some(i) = sq.iter().position(|x| !x.is_finite()) {
        return Err(StepError::NonFinite(NonFinite {
            what: "gradient",
            param: Some(i),
            cause: None,
        }));
    }
    let norm = sq.iter().sum::<f64>().sqrt();
    let scale = if cfg.clip > 0.0 && norm > cfg.clip {
        cfg.clip / norm
    } else {
        1.0
    };

    // AdamW on this rank's pieces.
    let (b1, b2) = (cfg.beta1, cfg.beta2);
    let t = state.step as i32 + 1;
    let moments = cfg.precision.moments.tensor_dtype();
    let mut updated: Vec<Tensor<B, 1>> = Vec::with_capacity(pieces.len());
    for (k, (piece, g)) in pieces.iter().zip(grad_pieces).enumerate() {
        let value = &params[piece.param].value;
        let p = if piece.whole {
            value.clone()
        } else {
            value.clone().slice([piece.range.clone()])
        };
        if state.m.len() <= k {
            let zeros = || Tensor::zeros([piece.range.len()], (device, moments));
            state.m.push(zeros());
            state.v.push(zeros());
        }
        let Some(g) = g else {
            updated.push(p);
            continue;
        };
        if cfg.precision.rounds() {
            let h = AdamStep {
                lr,
                beta1: b1,
                beta2: b2,
                eps: cfg.eps,
                weight_decay: cfg.weight_decay,
                scale,
                t,
            };
            let at = PiecePosition {
                step: state.step as u64,
                param: piece.param as u64,
                offset: piece.range.start as u64,
            };
            let [p, m, v] = adamw_rounded(
                [p, g, state.m[k].clone(), state.v[k].clone()],
                &h,
                at,
                device,
            );
            updated.push(p);
            state.m[k] = m;
            state.v[k] = v;
            continue;
        }
        // One fused pass over the four buffers where the backend has one (the CPU), unless the
        // fast path is off.
        let h = distillery_kernels::adamw::AdamW {
            lr,
            beta1: b1,
            beta2: b2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
            grad_scale: scale,
            step: t,
        };
        let prim = |t: Tensor<B, 1>| t.into_primitive().tensor();
        // The moments are handed over, not shared, so a backend may update them in place.
        let take = |t: &mut Tensor<B, 1>| std::mem::replace(t, Tensor::empty([0], device));
        let (m, v) = (take(&mut state.m[k]), take(&mut state.v[k]));
        let (p, m, v) = if fused {
            let float = |t| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(t));
            let (p, m, v) = B::adamw(prim(p), prim(g), prim(m), prim(v), &h);
            (float(p), float(m), float(v))
        } else {
            distillery_kernels::adamw::adamw_reference(p, g, m, v, &h)
        };
        updated.push(p);
        state.m[k] = m;
        state.v[k] = v;
    }
    state.step += 1;

    // Every rank's model gets every shard.
    let values: Vec<Tensor<B, 1>> = if solo {
        updated
    } else {
        let mut mine = Vec::with_capacity(shard.len());
        for u in &updated {
            mine.extend(host(u));
        }
        let full = collective.gather_shards(&mine, shards)?;
        let mut at = 0;
        sizes
            .iter()
            .zip(&params)
            .map(|(&n, p)| {
                // In the parameter's dtype: no f32 copy of a bf16 model on the device (the
                // gathered values are that dtype's already, so the cast is exact).
                let t = Tensor::<B, 1>::from_data(
                    TensorData::new(full[at..at + n].to_vec(), [n]),
                    (device, p.value.dtype()),
                );
                at += n;
                t
            })
            .collect()
    };
    let student = student.map(&mut SetValues {
        values: values.into_iter(),
    });
    Ok(StepOutcome {
        student,
        loss: loss_sum,
        grad_norm: norm,
        tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cut_parameters_at_shard_edges() {
        // Parameters of 4, 2 and 5 elements: 11 in all.
        let sizes = [4, 2, 5];
        let whole = pieces(&sizes, 0..11);
        assert!(whole.iter().all(|p| p.whole));
        assert_eq!(whole.len(), 3);
        let s = Shards::new(11, 3); // shards of 4: [0,4) [4,8) [8,11)
        assert_eq!(
            pieces(&sizes, s.range(1)),
            vec![
                Piece {
                    param: 1,
                    range: 0..2,
                    whole: true
                },
                Piece {
                    param: 2,
                    range: 0..2,
                    whole: false
                }
            ]
        );
        assert_eq!(
            pieces(&sizes, s.range(2)),
            vec![Piece {
                param: 2,
                range: 2..5,
                whole: false
            }]
        );
    }
}
