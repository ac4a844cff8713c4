//! The `distill` op (Minitron §4): the pruned student learns the frozen teacher's next-token
//! distribution. Loss per token: forward KL(teacher ‖ student) on softmax(logits / T) (or reverse
//! KL), averaged over tokens; optionally plus cross-entropy on the data with the KD term rescaled to
//! its magnitude. Teacher and student must share the vocabulary.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::Tensor;
use distillery_kernels::KlDirection;
use distillery_kernels::kl::{kl_loss, topk_kl_reference};

use crate::model::checkpoint::load_config;
use crate::model::decoder::{Decoder, tokens_tensor};
use crate::op::{
    Artifact, ArtifactKind, Op, OpContext, OpError, OpSignature, ParamSpec, ParamType, ParamValue,
    Params, Port, Problem,
};
use crate::runtime::{self, Backend as B, TrainBackend as TB};
use crate::train::{self, Objective, cross_entropy};

pub struct Distill;

/// The distillation objective: the frozen teacher and how its logits are matched.
pub struct Kd {
    teacher: Decoder<B>,
    temperature: f64,
    direction: KlDirection,
    /// Restrict the forward KL to the teacher's `top_k` tokens (0: the whole vocabulary).
    top_k: usize,
    ce_weight: f64,
}

impl Kd {
    /// Forward or reverse KL at `temperature`, optionally restricted to the teacher's `top_k`
    /// tokens (0: whole vocabulary), mixed with data cross-entropy at `ce_weight` (0: pure KD).
    pub fn new(
        teacher: Decoder<B>,
        temperature: f64,
        direction: KlDirection,
        top_k: usize,
        ce_weight: f64,
    ) -> Kd {
        Kd {
            teacher,
            temperature,
            direction,
            top_k,
            ce_weight,
        }
    }
}

impl Objective for Kd {
    fn loss(
        &self,
        student: &Decoder<TB>,
        input: &[u32],
        targets: &[u32],
        batch: usize,
    ) -> Tensor<TB, 1> {
        let device = runtime::device();
        // The teacher runs without an autodiff graph.
        let t_logits = self
            .teacher
            .forward(tokens_tensor::<B>(input, batch, &device));
        let s_logits = student.forward(tokens_tensor::<TB>(input, batch, &device));
        let [b, s, v] = s_logits.dims();
        let t = t_logits.reshape([b * s, v]);
        let st = s_logits.clone().reshape([b * s, v]);
        let kd = if self.top_k > 0 {
            topk_kl_reference(Tensor::from_inner(t), st, self.temperature, self.top_k)
        } else {
            // The fused kernel: loss and gradient in one pass, no [tokens, vocab] temporaries.
            kl_loss(t, st, self.temperature, self.direction)
        };
        if self.ce_weight > 0.0 {
            let ce = cross_entropy(s_logits, targets);
            // KD rescaled to the CE's magnitude (a constant factor: no gradient through the ratio).
            let ratio = ce.clone().detach() / (kd.clone().detach() + 1e-12);
            ce * self.ce_weight + kd * ratio * (1.0 - self.ce_weight)
        } else {
            kd
        }
    }

    fn name(&self) -> &'static str {
        "distillation"
    }
}

impl Op for Distill {
    fn signature(&self) -> OpSignature {
        let mut params = train::params();
        params.extend([
            ParamSpec::with_default(
                "loss",
                ParamType::Choice(&["forward_kl", "reverse_kl"]),
                ParamValue::Str("forward_kl".into()),
                "KL direction",
            ),
            ParamSpec::with_default(
                "top_k",
                ParamType::Int,
                ParamValue::Int(0),
                "restrict the forward KL to the teacher's k most likely tokens, renormalized; 0: whole vocabulary",
            ),
            ParamSpec::with_default(
                "temperature",
                ParamType::Float,
                ParamValue::Float(1.0),
                "softmax temperature of both distributions",
            ),
            ParamSpec::with_default(
                "ce_weight",
                ParamType::Float,
                ParamValue::Float(0.0),
                "weight of data cross-entropy (KD rescaled to its magnitude); 0: pure KD",
            ),
        ]);
        OpSignature {
            name: "distill",
            version: 2,
            doc: "knowledge distillation from a frozen teacher into a (pruned) student",
            inputs: vec![
                Port::new(
                    "student",
                    ArtifactKind::Model,
                    "the model to train (e.g. a pruned teacher)",
                ),
                Port::new("teacher", ArtifactKind::Model, "the frozen teacher"),
                Port::new(
                    "data",
                    ArtifactKind::Dataset,
                    "distillation texts (held-out sequences for validation)",
                ),
            ],
            output: ArtifactKind::Model,
            params,
        }
    }

    fn check(&self, p: &Params) -> Vec<Problem> {
        let mut out = train::check(p);
        if p.float("temperature").is_ok_and(|t| t <= 0.0) {
            out.push(Problem {
                param: Some("temperature".into()),
                message: "temperature must be positive".into(),
            });
        }
        if p.int("top_k").is_ok_and(|k| k < 0) {
            out.push(Problem {
                param: Some("top_k".into()),
                message: "top_k must be 0 (whole vocabulary) or a positive token count".into(),
            });
        }
        if p.int("top_k").is_ok_and(|k| k > 0) && p.str("loss").is_ok_and(|l| l == "reverse_kl") {
            out.push(Problem {
                param: Some("top_k".into()),
                message: "top_k restricts the forward KL; with loss = \"reverse_kl\" set top_k = 0"
                    .into(),
            });
        }
        if p.float("ce_weight")
            .is_ok_and(|w| !(0.0..=1.0).contains(&w))
        {
            out.push(Problem {
                param: Some("ce_weight".into()),
                message: "ce_weight must be in [0, 1]".into(),
            });
        }
        out
    }

    fn plan_check(&self, _: &Params, inputs: &BTreeMap<String, Artifact>) -> Vec<Problem> {
        let (Some(s), Some(t)) = (inputs.get("student"), inputs.get("teacher")) else {
            return Vec::new();
        };
        match (load_config(&s.path), load_config(&t.path)) {
            (Ok(s), Ok(t)) if s.vocab_size != t.vocab_size => vec![Problem {
                param: None,
                message: format!(
                    "student vocabulary ({}) differs from the teacher's ({}): distillation needs one vocabulary",
                    s.vocab_size, t.vocab_size
                ),
            }],
            _ => Vec::new(),
        }
    }

    fn estimate(
        &self,
        p: &Params,
        inputs: &BTreeMap<String, crate::op::Estimate>,
    ) -> Option<crate::op::Estimate> {
        let s = crate::estimate::input_config(inputs, "student")?;
        let t = crate::estimate::input_config(inputs, "teacher")?;
        let (ps, pt) = (s.parameter_count().0 as f64, t.parameter_count().0 as f64);
        let tokens = p.int("tokens").ok()? as f64;
        let mut e = crate::estimate::model_estimate(&s);
        e.flops = 2.0 * pt * tokens + 6.0 * ps * tokens;
        e.memory_bytes = crate::estimate::TRAIN_BYTES_PER_PARAM * ps
            + crate::estimate::INFER_BYTES_PER_PARAM * pt;
        e.basis =
            "2·P_teacher·T + 6·P_student·T; student 16 bytes/param, bf16 teacher 2 bytes/param"
                .into();
        Some(e)
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        runtime::with_threads(ctx.threads, || {
            let teacher_model = runtime::open_model(ctx.input("teacher")?)?;
            let student_cfg = load_config(&ctx.input("student")?.path)?;
            if student_cfg.vocab_size != teacher_model.config.vocab_size {
                return Err(OpError::Invalid(
                    "student and teacher vocabularies differ".into(),
                ));
            }
            let teacher = Decoder::<B>::load(
                &teacher_model.config,
                &teacher_model.weights,
                &runtime::device(),
            )?;
            drop(teacher_model);
            let kd = Kd {
                teacher,
                temperature: ctx.params.float("temperature")?,
                direction: if ctx.params.str("loss")? == "reverse_kl" {
                    KlDirection::Reverse
                } else {
                    KlDirection::Forward
                },
                top_k: ctx.params.int("top_k")? as usize,
                ce_weight: ctx.params.float("ce_weight")?,
            };
            train::run(ctx, &kd, "student")
        })
    }

    fn summarize(&self, out_dir: &Path) -> Option<String> {
        train::summarize(out_dir)
    }
}
