//! Gradients between backward and the update: accumulation over micro-batches and the
//! per-parameter squared norms that global-norm clipping and the non-finite check read.

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

/// Squared norm of each parameter's gradient, in visiting order.
pub(super) struct GradNorms<'a> {
    pub(super) grads: &'a burn::optim::GradientsParams,
    pub(super) sq: Vec<f64>,
}

impl ModuleVisitor<TB> for GradNorms<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<TB, D>>) {
        let s = match self.grads.get::<B, D>(param.id) {
            Some(g) => g
                .powf_scalar(2.0)
                .sum()
                .into_data()
                .convert::<f64>()
                .to_vec::<f64>()
                .unwrap()[0],
            None => 0.0,
        };
        self.sq.push(s);
    }
}

pub(super) fn add_grads(
    mut acc: burn::optim::GradientsParams,
    mut more: burn::optim::GradientsParams,
    model: &Student<TB>,
) -> burn::optim::GradientsParams {
    struct Add<'a> {
        acc: &'a mut burn::optim::GradientsParams,
        more: &'a mut burn::optim::GradientsParams,
    }
    impl ModuleVisitor<TB> for Add<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<TB, D>>) {
            if let Some(g) = self.more.remove::<B, D>(param.id) {
                let sum = match self.acc.remove::<B, D>(param.id) {
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
