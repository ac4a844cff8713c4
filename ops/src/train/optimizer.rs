//! AdamW with decoupled weight decay, its state, and one optimizer step (clip, update).

use super::*;

/// AdamW state: first and second moments per parameter, flattened, in visiting order.
pub struct AdamState {
    pub step: usize,
    pub m: Vec<Tensor<B, 1>>,
    pub v: Vec<Tensor<B, 1>>,
}

pub(super) struct AdamStep<'a> {
    grads: &'a mut burn::optim::GradientsParams,
    state: &'a mut AdamState,
    cfg: &'a TrainConfig,
    lr: f64,
    scale: f64,
    index: usize,
}

impl ModuleMapper<TB> for AdamStep<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<TB, D>>) -> Param<Tensor<TB, D>> {
        let (id, tensor, mapper) = param.consume();
        let i = self.index;
        self.index += 1;
        let Some(g) = self.grads.remove::<B, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let dims = g.dims();
        let n: usize = dims.iter().product();
        let g = g.reshape([n]) * self.scale;
        let p = tensor.inner().reshape([n]);
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        if self.state.m.len() <= i {
            self.state.m.push(Tensor::zeros([n], &g.device()));
            self.state.v.push(Tensor::zeros([n], &g.device()));
        }
        let m = self.state.m[i].clone() * b1 + g.clone() * (1.0 - b1);
        let v = self.state.v[i].clone() * b2 + g.powf_scalar(2.0) * (1.0 - b2);
        let t = self.state.step as i32 + 1;
        let mhat = m.clone() / (1.0 - b1.powi(t));
        let vhat = v.clone() / (1.0 - b2.powi(t));
        let update = mhat / (vhat.sqrt() + self.cfg.eps) + p.clone() * self.cfg.weight_decay;
        let p = p - update * self.lr;
        self.state.m[i] = m;
        self.state.v[i] = v;
        let p: Tensor<B, D> = p.reshape(dims);
        Param::from_mapped_value(id, Tensor::from_inner(p).require_grad(), mapper)
    }
}

/// What one optimizer step did.
pub struct StepOutcome {
    pub student: Student<TB>,
    /// The loss summed over micro-batches (each scaled by 1 / micro-batches): the batch's mean.
    pub loss: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens predicted in the step.
    pub tokens: u64,
}

/// One optimizer step: loss and gradients over the micro-batches (`[micro_batch]` sequences
/// each, accumulated), clipping by the global norm, then AdamW at `lr`.
pub fn optimizer_step(
    student: Student<TB>,
    state: &mut AdamState,
    objective: &dyn Objective,
    micro_batches: &[Packed],
    cfg: &TrainConfig,
    lr: f64,
    device: &Device,
) -> Result<StepOutcome, NonFinite> {
    let accum = micro_batches.len();
    let mut grads_acc: Option<burn::optim::GradientsParams> = None;
    let mut loss_sum = 0.0;
    let mut tokens = 0u64;
    // Chat data: each micro-batch's mean over its marked targets weighs by their count, so the
    // step's loss is the mean over the global batch's marked targets whatever micro_batch is.
    let marked: Vec<usize> = micro_batches.iter().map(Packed::trained_targets).collect();
    let all_marked: usize = marked.iter().sum();
    for (batch, &count) in micro_batches.iter().zip(&marked) {
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
        let value = loss
            .clone()
            .into_data()
            .convert::<f64>()
            .to_vec::<f64>()
            .unwrap()[0];
        if !value.is_finite() {
            return Err(NonFinite {
                what: "loss",
                param: None,
                cause: objective.non_finite_cause(&input, batch.tokens.len(), device),
            });
        }
        loss_sum += value;
        let grads = burn::optim::GradientsParams::from_grads(loss.backward(), &student);
        grads_acc = Some(match grads_acc {
            None => grads,
            Some(acc) => add_grads(acc, grads, &student),
        });
        tokens += batch.tokens.iter().map(|s| s.len() as u64 - 1).sum::<u64>();
    }
    let Some(mut grads) = grads_acc else {
        // A global batch of chat data with no assistant token: no update, nothing learned.
        return Ok(StepOutcome {
            student,
            loss: 0.0,
            grad_norm: 0.0,
            tokens,
        });
    };
    let mut norms = GradNorms {
        grads: &grads,
        sq: Vec::new(),
    };
    student.visit(&mut norms);
    if let Some(i) = norms.sq.iter().position(|x| !x.is_finite()) {
        return Err(NonFinite {
            what: "gradient",
            param: Some(i),
            cause: None,
        });
    }
    let norm = norms.sq.iter().sum::<f64>().sqrt();
    let scale = if cfg.clip > 0.0 && norm > cfg.clip {
        cfg.clip / norm
    } else {
        1.0
    };
    let mut mapper = AdamStep {
        grads: &mut grads,
        state,
        cfg,
        lr,
        scale,
        index: 0,
    };
    let student = student.map(&mut mapper);
    state.step += 1;
    Ok(StepOutcome {
        student,
        loss: loss_sum,
        grad_norm: norm,
        tokens,
    })
}
