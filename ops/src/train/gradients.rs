//! Gradients between backward and the update: accumulation over micro-batches, parameter names
//! for messages, and what a non-finite value reports.

use super::*;

/// Per-parameter names (module paths) in visiting order.
pub(super) struct Names {
    pub(super) path: Vec<String>,
    pub(super) names: Vec<String>,
}

impl<Bk: burn::tensor::backend::Backend> ModuleVisitor<Bk> for Names {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, _: &Param<Tensor<Bk, D>>) {
        self.names.push(self.path.join("."));
    }
}

/// `acc + more`, per parameter: in f32 with `in_f32` (bf16 gradients cast up, the sum kept in
/// f32), else in the gradients' own dtype.
pub(super) fn add_grads(
    mut acc: burn::optim::GradientsParams,
    mut more: burn::optim::GradientsParams,
    model: &Student<TB>,
    in_f32: bool,
) -> burn::optim::GradientsParams {
    struct Add<'a> {
        acc: &'a mut burn::optim::GradientsParams,
        more: &'a mut burn::optim::GradientsParams,
        in_f32: bool,
    }
    impl ModuleVisitor<TB> for Add<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<TB, D>>) {
            if let Some(g) = self.more.remove::<B, D>(param.id) {
                let sum = match self.acc.remove::<B, D>(param.id) {
                    Some(a) if self.in_f32 => {
                        a.cast(burn::tensor::FloatDType::F32)
                            + g.cast(burn::tensor::FloatDType::F32)
                    }
                    Some(a) => a + g,
                    None => g,
                };
                self.acc.register::<B, D>(param.id, sum);
            }
        }
    }
    model.visit(&mut Add {
        acc: &mut acc,
        more: &mut more,
        in_f32,
    });
    acc
}

/// A loss or gradient that is NaN or infinite; `param` indexes the module's parameters in
/// visiting order.
pub struct NonFinite {
    pub what: &'static str,
    pub param: Option<usize>,
    /// What the objective found wrong besides the student (a frozen teacher's logits).
    pub cause: Option<String>,
}
