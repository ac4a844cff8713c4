//! The learning-rate schedule: how many optimizer steps a token budget makes, and the rate at
//! each (linear warmup, then cosine decay to `min_lr`).

use super::*;

impl TrainConfig {
    pub fn steps(&self) -> usize {
        let per_step = (self.seq_len * self.global_batch) as u64;
        self.tokens.div_ceil(per_step.max(1)).max(1) as usize
    }

    /// Linear warmup to the peak, then cosine decay to `min_lr` at the last step.
    pub fn lr_at(&self, step: usize) -> f64 {
        let total = self.steps();
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
        let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
        self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
    }
}
