//! The fused KL: one cube per token row. Its units stride over the vocabulary once to get both
//! log-normalizers with an online max and sum (merged across the cube in shared memory), then once
//! more for the loss and the gradient, written straight into `grad`; the reverse direction needs
//! the row loss inside its gradient and so reads the row a third time. Nothing of size
//! `[rows, vocab]` is allocated but the gradient itself.

use super::empty_dense;
use burn::tensor::{Shape, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeRuntime, FloatElement};
use cubecl::prelude::*;
use cubecl::{CubeCount, CubeDim};

use crate::kl::KlDirection;

/// Units per row (a power of two, for the tree reductions).
const UNITS: u32 = 256;
/// Rows per grid column: grids are at most 65535 cubes along an axis.
const GRID_X: usize = 32768;

/// Merges `(max, sum of exp(x - max))` pairs across the cube; every unit returns the total
/// `log sum exp`. `m` and `z` are scratch shared memory, one slot per unit.
#[cube]
fn cube_log_sum_exp<F: Float>(
    max: F,
    sum: F,
    m: &mut SharedMemory<F>,
    z: &mut SharedMemory<F>,
) -> F {
    let u = UNIT_POS_X as usize;
    m[u] = max;
    z[u] = sum;
    sync_cube();
    // A runtime counter (the cube's width is `units`): comptime values cannot be reassigned.
    let mut offset = CUBE_DIM_X as usize / 2;
    while offset > 0 {
        if u < offset {
            let (m1, z1) = (m[u], z[u]);
            let (m2, z2) = (m[u + offset], z[u + offset]);
            let mm = F::max(m1, m2);
            m[u] = mm;
            z[u] = z1 * F::exp(m1 - mm) + z2 * F::exp(m2 - mm);
        }
        sync_cube();
        offset /= 2;
    }
    let lse = m[0] + F::ln(z[0]);
    sync_cube();
    lse
}

/// Sum across the cube; every unit returns the total.
#[cube]
fn cube_sum<F: Float>(value: F, s: &mut SharedMemory<F>) -> F {
    let u = UNIT_POS_X as usize;
    s[u] = value;
    sync_cube();
    // A runtime counter (the cube's width is `units`): comptime values cannot be reassigned.
    let mut offset = CUBE_DIM_X as usize / 2;
    while offset > 0 {
        if u < offset {
            let other = s[u + offset];
            s[u] += other;
        }
        sync_cube();
        offset /= 2;
    }
    let total = s[0];
    sync_cube();
    total
}

#[cube(launch)]
fn kl_rows_kernel<F: Float>(
    teacher: &Tensor<F>,  // [rows, vocab]
    student: &Tensor<F>,  // [rows, vocab]
    loss: &mut Tensor<F>, // [rows]
    grad: &mut Tensor<F>, // [rows, vocab]
    inv_temperature: f32,
    grad_scale: f32,
    #[comptime] reverse: bool,
    #[comptime] units: u32,
) {
    let rows = teacher.shape(0);
    let vocab = teacher.shape(1);
    let row = CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize;
    // The whole cube leaves together (before any barrier), so no unit waits on a missing one.
    if row >= rows {
        terminate!();
    }
    let base = row * vocab;
    let u = UNIT_POS_X as usize;
    let step = units as usize;
    let inv_temperature = F::cast_from(inv_temperature);

    // A finite sentinel: WGSL has no -inf literal.
    let lowest = F::new(-1.0e30);
    let (mut mt, mut zt, mut ms, mut zs) = (lowest, F::new(0.0), lowest, F::new(0.0));
    let mut i = u;
    while i < vocab {
        let a = teacher[base + i] * inv_temperature;
        let b = student[base + i] * inv_temperature;
        if a > mt {
            zt = zt * F::exp(mt - a) + F::new(1.0);
            mt = a;
        } else {
            zt += F::exp(a - mt);
        }
        if b > ms {
            zs = zs * F::exp(ms - b) + F::new(1.0);
            ms = b;
        } else {
            zs += F::exp(b - ms);
        }
        i += step;
    }
    let mut m = SharedMemory::<F>::new(units as usize);
    let mut z = SharedMemory::<F>::new(units as usize);
    let lse_t = cube_log_sum_exp::<F>(mt, zt, &mut m, &mut z);
    let lse_s = cube_log_sum_exp::<F>(ms, zs, &mut m, &mut z);
    let scale = F::cast_from(grad_scale) * inv_temperature;

    let mut part = F::new(0.0);
    let mut i = u;
    while i < vocab {
        let lpt = teacher[base + i] * inv_temperature - lse_t;
        let lps = student[base + i] * inv_temperature - lse_s;
        if comptime!(reverse) {
            part += F::exp(lps) * (lps - lpt);
        } else {
            let pt = F::exp(lpt);
            part += pt * (lpt - lps);
            // d/dz_s of sum pt (log pt - log ps) = ps - pt; times 1/T for z = s/T.
            grad[base + i] = (F::exp(lps) - pt) * scale;
        }
        i += step;
    }
    let total = cube_sum::<F>(part, &mut m);
    if comptime!(reverse) {
        // d/dz_j of sum ps (log ps - log pt) = ps_j (log ps_j - log pt_j - row loss).
        let mut i = u;
        while i < vocab {
            let lpt = teacher[base + i] * inv_temperature - lse_t;
            let lps = student[base + i] * inv_temperature - lse_s;
            grad[base + i] = F::exp(lps) * (lps - lpt - total) * scale;
            i += step;
        }
    }
    if u == 0 {
        loss[row] = total;
    }
}

pub(super) fn rows<R: CubeRuntime, F: FloatElement>(
    teacher: CubeTensor<R>,
    student: CubeTensor<R>,
    temperature: f32,
    direction: KlDirection,
    grad_scale: f32,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let teacher = into_contiguous(teacher);
    let student = into_contiguous(student);
    let [rows, vocab] = teacher.shape().dims::<2>();
    assert_eq!(
        student.shape().dims::<2>(),
        [rows, vocab],
        "teacher and student logits differ in shape"
    );
    let client = teacher.client.clone();
    let device = teacher.device.clone();
    let loss = empty_dense::<R, F>(client.clone(), device.clone(), Shape::new([rows]));
    let grad = empty_dense::<R, F>(client.clone(), device, Shape::new([rows, vocab]));
    let (x, y) = (rows.min(GRID_X), rows.div_ceil(GRID_X));
    kl_rows_kernel::launch::<F, R>(
        &client,
        CubeCount::Static(x.max(1) as u32, y.max(1) as u32, 1),
        CubeDim::new_1d(UNITS),
        teacher.into_tensor_arg(),
        student.into_tensor_arg(),
        loss.clone().into_tensor_arg(),
        grad.clone().into_tensor_arg(),
        1.0 / temperature,
        grad_scale,
        direction == KlDirection::Reverse,
        UNITS,
    );
    (loss, grad)
}
