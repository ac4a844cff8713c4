//! Optimizer precision: the dtype the trained matrices (the main params) and their gradients are
//! held in, and the dtype of the AdamW moments (the names of Megatron-core's precision-aware
//! optimizer: `main_params_dtype`, and `exp_avg_dtype` / `exp_avg_sq_dtype` as one
//! `moments_dtype`).
//!
//! In float32 (the default) a parameter costs 16 bytes: weights, gradients and two moments in f32.
//! With `main_params_dtype = "bfloat16"` every matrix (embedding, projections, head) and the
//! gradient backward gives it are bf16, 2 + 2 bytes; vectors (norm weights, biases) stay f32, a
//! negligible share that norms are sensitive to. A step of several micro-batches sums their
//! gradients in `main_grads_dtype`: f32 by default (4 more bytes while summing), or bf16, where
//! each addition rounds to nearest and a steady component smaller than 2⁻⁸ of the running sum is
//! lost (after a few hundred micro-batches). With `moments_dtype = "bfloat16"` the moments take
//! 2 + 2 bytes instead of 4 + 4. The update itself is computed in f32 from the stored values.
//!
//! **Rounding.** A bf16 weight keeps 8 significant bits: an update below half its spacing
//! (`|w|·2⁻⁸`, e.g. `lr · 1 = 1e-4` on a weight of 0.05) rounds back to the old value under
//! round-to-nearest and training stalls. Every bf16 value written by the update is therefore
//! rounded **stochastically** (Gupta et al. 2015, "Deep learning with limited numerical
//! precision"; Zamirai et al. 2020 for bf16 training): up with probability equal to the
//! fraction of the spacing it passed, so the stored weight equals the f32 update in expectation
//! and small updates accumulate. Chosen over compensated (Kahan) summation because Kahan needs
//! a compensation buffer per parameter (+2 bytes, which is what this mode exists to save),
//! while stochastic rounding needs no state. Its noise is a fixed function of (optimizer step,
//! parameter, element, buffer) ([`noise`]), not of a generator's state, so reruns and resumes
//! from a checkpoint are bit-identical and any number of data-parallel ranks rounds every
//! element the same way.
//!
//! The bf16 update runs as a host loop over each piece of the parameters, on every thread, in
//! chunks (so the host holds one chunk's copies at a time); the float32 mode keeps its tensor-op
//! update.

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{DType as TensorDType, FloatDType, Tensor, TensorData};
use half::bf16;
use rayon::prelude::*;

use crate::counter_rng;
use crate::model::decoder::Decoder;
use crate::op::{OpError, ParamSpec, ParamType, ParamValue, Params, Problem};
use crate::runtime::{Backend as B, Device, TrainBackend as TB};

/// The dtype of a piece of training state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StateDType {
    #[default]
    F32,
    Bf16,
}

impl StateDType {
    /// Recipe names, as in checkpoint dtypes.
    pub const NAMES: [&'static str; 2] = ["float32", "bfloat16"];

    fn from_name(name: &str) -> Option<StateDType> {
        match name {
            "float32" => Some(StateDType::F32),
            "bfloat16" => Some(StateDType::Bf16),
            _ => None,
        }
    }

    /// Bytes per element.
    pub fn bytes(self) -> f64 {
        match self {
            StateDType::F32 => 4.0,
            StateDType::Bf16 => 2.0,
        }
    }

    pub fn tensor_dtype(self) -> TensorDType {
        match self {
            StateDType::F32 => TensorDType::F32,
            StateDType::Bf16 => TensorDType::BF16,
        }
    }
}

/// The dtypes of the main params (matrices and the gradients backward gives them), of the
/// gradients summed over a step's micro-batches, and of the AdamW moments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Precision {
    pub main_params: StateDType,
    /// Where a step sums several micro-batches' gradients: f32 (bf16 gradients are added into an
    /// f32 sum) or bf16 (summed in bf16, rounded to nearest at each addition).
    pub main_grads: StateDType,
    pub moments: StateDType,
}

impl Precision {
    /// The parameters naming a precision, for every training op.
    pub fn params() -> Vec<ParamSpec> {
        vec![
            ParamSpec::with_default(
                "main_params_dtype",
                ParamType::Choice(&StateDType::NAMES),
                ParamValue::Str("float32".into()),
                "dtype of the trained matrices and their gradients (bfloat16: 2 + 2 bytes a parameter instead of 4 + 4, updates rounded stochastically; norms and biases stay float32)",
            ),
            ParamSpec::with_default(
                "main_grads_dtype",
                ParamType::Choice(&StateDType::NAMES),
                ParamValue::Str("float32".into()),
                "dtype a step's micro-batch gradients are summed in (float32: an f32 sum, 4 bytes a parameter; bfloat16: 2 bytes, each addition rounded to nearest, so with many micro-batches small steady components are lost; needs main_params_dtype = \"bfloat16\")",
            ),
            ParamSpec::with_default(
                "moments_dtype",
                ParamType::Choice(&StateDType::NAMES),
                ParamValue::Str("float32".into()),
                "dtype of the AdamW moments (bfloat16: 4 bytes a parameter instead of 8, rounded stochastically)",
            ),
        ]
    }

    pub fn from_params(p: &Params) -> Result<Precision, OpError> {
        let read = |name: &str| -> Result<StateDType, OpError> {
            let v = p.str(name)?;
            StateDType::from_name(v).ok_or_else(|| {
                OpError::Invalid(format!(
                    "{name} = {v:?}: expected \"float32\" or \"bfloat16\""
                ))
            })
        };
        Ok(Precision {
            main_params: read("main_params_dtype")?,
            main_grads: read("main_grads_dtype")?,
            moments: read("moments_dtype")?,
        })
    }

    /// Settings that do not go together: bf16 gradient sums of f32 gradients.
    pub fn check(p: &Params) -> Vec<Problem> {
        if p.str("main_grads_dtype").is_ok_and(|d| d == "bfloat16")
            && p.str("main_params_dtype").is_ok_and(|d| d != "bfloat16")
        {
            return vec![Problem {
                param: Some("main_grads_dtype".into()),
                message: "main_grads_dtype = \"bfloat16\" sums bf16 gradients, which only main_params_dtype = \"bfloat16\" gives: set both, or leave main_grads_dtype at \"float32\"".into(),
            }];
        }
        Vec::new()
    }

    /// Whether micro-batch gradients are summed in f32 (cast up from the backward's dtype).
    pub fn sums_grads_in_f32(self) -> bool {
        self.main_grads == StateDType::F32
    }

    /// Whether the update writes any bf16 value (and so runs the rounding host loop).
    pub fn rounds(self) -> bool {
        self.main_params == StateDType::Bf16 || self.moments == StateDType::Bf16
    }

    /// Bytes per parameter of training state: weights, gradients and both moments (what
    /// `plan --estimate` counts; vectors kept in f32 are neglected). When a step `accumulates`
    /// several micro-batches and bf16 gradients are summed in f32, the f32 sum and the latest
    /// micro-batch's bf16 gradients are both held.
    pub fn bytes_per_param(self, accumulates: bool) -> f64 {
        self.main_params.bytes() + self.grad_bytes(accumulates) + self.moment_bytes_per_param()
    }

    fn grad_bytes(self, accumulates: bool) -> f64 {
        match (self.main_params, self.main_grads) {
            (StateDType::Bf16, StateDType::F32) if accumulates => 4.0 + 2.0,
            (params, _) => params.bytes(),
        }
    }

    /// Of those, the two AdamW moments: what data-parallel ranks shard.
    pub fn moment_bytes_per_param(self) -> f64 {
        2.0 * self.moments.bytes()
    }

    /// "12 bytes/param (bf16 weights, bf16 grads summed in f32, bf16 Adam moments)", for an
    /// estimate's basis.
    pub fn describe(self, accumulates: bool) -> String {
        let name = |d: StateDType| match d {
            StateDType::F32 => "f32",
            StateDType::Bf16 => "bf16",
        };
        let grads = match (self.main_params, self.main_grads) {
            (StateDType::Bf16, StateDType::F32) if accumulates => "bf16 grads summed in f32",
            (StateDType::Bf16, _) => "bf16 grads",
            _ => "f32 grads",
        };
        format!(
            "{} bytes/param ({} weights, {grads}, {} Adam moments)",
            self.bytes_per_param(accumulates),
            name(self.main_params),
            name(self.moments)
        )
    }
}

/// `model` with its matrices (every parameter of two or more dimensions: embedding, projections,
/// head) held in the main params' dtype, as leaves that take their gradient in that dtype (the
/// forward casts each to the compute dtype where it is used). Vectors stay f32.
pub fn hold_main_params(model: Decoder<TB>, precision: Precision) -> Decoder<TB> {
    struct Hold(FloatDType);
    impl ModuleMapper<TB> for Hold {
        fn map_float<const D: usize>(
            &mut self,
            param: Param<Tensor<TB, D>>,
        ) -> Param<Tensor<TB, D>> {
            if D < 2 {
                return param;
            }
            let (id, tensor, mapper) = param.consume();
            let held = Tensor::from_inner(tensor.inner().cast(self.0)).require_grad();
            Param::from_mapped_value(id, held, mapper)
        }
    }
    match precision.main_params {
        StateDType::F32 => model,
        StateDType::Bf16 => model.map(&mut Hold(FloatDType::BF16)),
    }
}

/// 16 random bits for element `element` of parameter `param` at optimizer step `step`, buffer
/// `buffer` (0 weights, 1 first moment, 2 second moment): a counter-based draw, so each value
/// depends only on its position.
pub fn noise(step: u64, param: u64, element: u64, buffer: u64) -> u16 {
    noise_in(noise_stream(step, param, buffer), element)
}

/// The stream [`noise`] draws from for one (step, parameter, buffer).
fn noise_stream(step: u64, param: u64, buffer: u64) -> u64 {
    counter_rng::stream(&[step, param, buffer])
}

/// [`noise`] for element `element` of a stream from [`noise_stream`].
fn noise_in(stream: u64, element: u64) -> u16 {
    (counter_rng::bits(stream, element) >> 48) as u16
}

/// `x` rounded to bf16 stochastically with `noise` (uniform over `u16`): adding it below the 16
/// bits bf16 drops and truncating rounds away from zero with probability equal to the dropped
/// fraction, so the result's expectation is `x`. Values bf16 holds exactly come back unchanged;
/// NaN stays NaN.
pub fn round_bf16_stochastic(x: f32, noise: u16) -> bf16 {
    if x.is_nan() {
        return bf16::from_f32(x);
    }
    let bits = x.to_bits();
    // The sign bit is untouched: a magnitude at most f32::MAX plus under 2^16 stays below the
    // sign bit (it becomes infinity at most, as rounding up past bf16's largest value should).
    bf16::from_bits((bits.wrapping_add(noise as u32) >> 16) as u16)
}

/// AdamW's constants for one step: `scale` multiplies the gradient (clipping), `t` is the step
/// counted from 1.
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub scale: f64,
    pub t: i32,
}

/// Where a piece sits, for its rounding noise: optimizer step, parameter index and the first
/// element's index within the parameter.
#[derive(Clone, Copy, Debug)]
pub struct PiecePosition {
    pub step: u64,
    pub param: u64,
    pub offset: u64,
}

/// Elements read to the host at once.
const HOST_CHUNK: usize = 1 << 22;

/// AdamW on one piece whose weights `p`, moments `m`, `v` (each `[n]`, f32 or bf16) and gradient
/// `g` (`[n]`, any float dtype) may be bf16: computed in f32 in the same order as the f32 tensor
/// path, every value written back in its own dtype, bf16 ones rounded with [`noise`] at `at`.
/// Returns the new `(p, m, v)`.
pub fn adamw_rounded(
    [p, g, m, v]: [Tensor<B, 1>; 4],
    h: &AdamStep,
    at: PiecePosition,
    device: &Device,
) -> [Tensor<B, 1>; 3] {
    let n = p.dims()[0];
    let dtypes = [p.dtype(), m.dtype(), v.dtype()];
    let mut out: [Stored; 3] = dtypes.map(|d| Stored::with_capacity(d, n));
    let (b1, b2) = (h.beta1 as f32, h.beta2 as f32);
    let (c1, c2) = (
        (1.0 - h.beta1.powi(h.t)) as f32,
        (1.0 - h.beta2.powi(h.t)) as f32,
    );
    let (lr, eps, wd, scale) = (
        h.lr as f32,
        h.eps as f32,
        h.weight_decay as f32,
        h.scale as f32,
    );
    let host = |t: &Tensor<B, 1>, r: std::ops::Range<usize>| -> Vec<f32> {
        t.clone()
            .slice([r])
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32 after convert")
    };
    // One stream per buffer of this piece (as [`noise`] draws them).
    let keys: [u64; 3] = [0, 1, 2].map(|b| noise_stream(at.step, at.param, b));
    let bf16s = dtypes.map(|d| d == TensorDType::BF16);
    for start in (0..n).step_by(HOST_CHUNK) {
        let r = start..(start + HOST_CHUNK).min(n);
        let (pc, gc, mc, vc) = (
            host(&p, r.clone()),
            host(&g, r.clone()),
            host(&m, r.clone()),
            host(&v, r.clone()),
        );
        // On every thread: each element's values, bf16 ones already rounded (so the same bits
        // whatever the thread count, the noise being a function of the position).
        let rounded: Vec<[f32; 3]> = (0..r.len())
            .into_par_iter()
            .map(|i| {
                let g = gc[i] * scale;
                let mi = mc[i] * b1 + g * (1.0 - b1);
                let vi = vc[i] * b2 + g * g * (1.0 - b2);
                let update = (mi / c1) / ((vi / c2).sqrt() + eps) + pc[i] * wd;
                let pi = pc[i] - update * lr;
                let e = at.offset + (start + i) as u64;
                let mut values = [pi, mi, vi];
                for (buffer, x) in values.iter_mut().enumerate() {
                    if bf16s[buffer] {
                        *x = round_bf16_stochastic(*x, noise_in(keys[buffer], e)).to_f32();
                    }
                }
                values
            })
            .collect();
        for values in rounded {
            for (o, x) in out.iter_mut().zip(values) {
                o.push(x);
            }
        }
    }
    out.map(|o| o.tensor(device))
}

/// Values on their way back to a tensor of their dtype.
enum Stored {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

impl Stored {
    fn with_capacity(dtype: TensorDType, n: usize) -> Stored {
        match dtype {
            TensorDType::BF16 => Stored::Bf16(Vec::with_capacity(n)),
            _ => Stored::F32(Vec::with_capacity(n)),
        }
    }

    /// Appends `x`, which for a bf16 buffer is a bf16 value already (converted exactly).
    fn push(&mut self, x: f32) {
        match self {
            Stored::F32(v) => v.push(x),
            Stored::Bf16(v) => v.push(bf16::from_f32(x)),
        }
    }

    fn tensor(self, device: &Device) -> Tensor<B, 1> {
        match self {
            Stored::F32(v) => {
                let n = v.len();
                Tensor::from_data(TensorData::new(v, [n]), (device, TensorDType::F32))
            }
            Stored::Bf16(v) => {
                let n = v.len();
                Tensor::from_data(TensorData::new(v, [n]), (device, TensorDType::BF16))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stochastic_rounding_is_exact_on_bf16_values_and_unbiased_between_them() {
        // Values bf16 holds come back whatever the noise.
        for x in [
            0.0f32,
            -0.0,
            1.0,
            -2.5,
            0.0078125,
            f32::INFINITY,
            -f32::INFINITY,
        ] {
            for n in [0u16, 1, 0x7FFF, 0xFFFF] {
                assert_eq!(round_bf16_stochastic(x, n).to_f32().to_bits(), x.to_bits());
            }
        }
        assert!(round_bf16_stochastic(f32::NAN, 0xFFFF).is_nan());
        // 1 + 0.3 ulp (bf16's spacing at 1 is 2^-7): up 30% of the time, to 1 or 1 + ulp only.
        let ulp = 2f32.powi(-7);
        for x in [
            1.0 + 0.3 * ulp,
            -(1.0 + 0.3 * ulp),
            3.0e-3 + 0.77 * 2f32.powi(-16),
        ] {
            let n = 1 << 16;
            let mean: f64 = (0..n)
                .map(|i| round_bf16_stochastic(x, noise(7, 3, i, 0)).to_f32() as f64)
                .sum::<f64>()
                / n as f64;
            // The bf16 neighbours toward and away from zero.
            let toward = (x.to_bits() >> 16) as u16;
            let spacing = (bf16::from_bits(toward + 1).to_f32() as f64
                - bf16::from_bits(toward).to_f32() as f64)
                .abs();
            assert!(
                (mean - x as f64).abs() < 0.01 * spacing,
                "x {x}: mean {mean}, spacing {spacing}"
            );
        }
    }

    #[test]
    fn noise_depends_on_every_coordinate_only() {
        assert_eq!(noise(1, 2, 3, 0), noise(1, 2, 3, 0));
        let base = noise(1, 2, 3, 0);
        let others = [
            noise(2, 2, 3, 0),
            noise(1, 3, 3, 0),
            noise(1, 2, 4, 0),
            noise(1, 2, 3, 1),
        ];
        assert!(others.iter().all(|&o| o != base), "{base} {others:?}");
    }

    /// The rounded update is the same bits on one thread and on several.
    #[test]
    fn the_rounded_update_does_not_depend_on_the_thread_count() {
        let device = crate::runtime::device();
        let n = 10_000;
        let t = |f: &dyn Fn(usize) -> f32, d: TensorDType| {
            let x: Vec<f32> = (0..n).map(f).collect();
            Tensor::<B, 1>::from_data(TensorData::new(x, [n]), (&device, d))
        };
        let h = AdamStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            scale: 0.5,
            t: 3,
        };
        let at = PiecePosition {
            step: 2,
            param: 5,
            offset: 100,
        };
        let run = |threads: usize| {
            crate::runtime::with_threads(threads, || {
                let bf = TensorDType::BF16;
                let out = adamw_rounded(
                    [
                        t(&|i| (i as f32 * 0.37).sin(), bf),
                        t(&|i| (i as f32 * 0.11).cos() * 1e-3, bf),
                        t(&|i| (i as f32 * 0.05).sin() * 1e-4, bf),
                        t(&|i| 1e-7 * (1.0 + (i % 7) as f32), TensorDType::F32),
                    ],
                    &h,
                    at,
                    &device,
                );
                out.map(|x| x.into_data().convert::<f32>().into_vec::<f32>().unwrap())
            })
        };
        assert_eq!(run(1), run(2));
    }

    /// AdamW steps of 1e-4 on weights of 1.0 (bf16's spacing there is 2⁻⁷, its half 39 times
    /// the step): round to nearest would keep 1.0 forever; the stochastically rounded bf16
    /// weights follow the f32 ones on average.
    #[test]
    fn small_updates_are_not_lost_in_bf16() {
        let device = crate::runtime::device();
        let n = 4096;
        let t = |x: f32, d: TensorDType| {
            Tensor::<B, 1>::from_data(TensorData::new(vec![x; n], [n]), (&device, d))
        };
        let bf = TensorDType::BF16;
        let f = TensorDType::F32;
        let (mut p, mut m, mut v) = (t(1.0, bf), t(0.0, bf), t(0.0, f));
        let (mut pf, mut mf, mut vf) = (t(1.0, f), t(0.0, f), t(0.0, f));
        for step in 1..=100 {
            let h = AdamStep {
                lr: 1e-4,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.0,
                scale: 1.0,
                t: step,
            };
            let at = PiecePosition {
                step: step as u64,
                param: 0,
                offset: 0,
            };
            // A gradient of -1 everywhere: every step moves each weight up by lr.
            [p, m, v] = adamw_rounded([p, t(-1.0, bf), m, v], &h, at, &device);
            [pf, mf, vf] = adamw_rounded([pf, t(-1.0, f), mf, vf], &h, at, &device);
        }
        assert_eq!(p.dtype(), bf);
        assert_eq!(m.dtype(), bf);
        assert_eq!(v.dtype(), f);
        let mean = |t: Tensor<B, 1>| {
            let x = t.into_data().convert::<f32>().into_vec::<f32>().unwrap();
            x.iter().map(|&a| a as f64).sum::<f64>() / x.len() as f64
        };
        let exact = mean(pf);
        assert!((exact - 1.01).abs() < 1e-4, "f32: {exact}");
        let rounded = mean(p);
        // Each weight ends within a spacing or two of 1.01: the mean's standard error over 4096
        // weights is below 1e-4.
        assert!(
            (rounded - exact).abs() < 5e-4,
            "bf16 weights averaged {rounded}, f32 {exact}"
        );
        let _ = (mf, vf);
    }
}
