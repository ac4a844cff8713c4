//! Causal grouped-query attention with its own backward as CubeCL kernels, the contract of
//! [`crate::attention`]: the forward keeps the context and each row's log-sum-exp, never a
//! `[seq, seq]` tensor; the backward rebuilds the probabilities from q, k, v and that
//! log-sum-exp.
//!
//! One unit per row, three launches, no shared memory and no atomics (wgpu has no float atomics),
//! so the results are deterministic:
//! - forward: a unit per query row `(batch, head, position)` walks the keys it sees with an online
//!   softmax (FlashAttention's running max and sum), its query and accumulator in local arrays of
//!   `head_dim`;
//! - query gradient: a unit per query row, which also writes `D_i = do_i · o_i` for the next
//!   launch;
//! - key and value gradients: a unit per key row `(batch, kv head, position)` walks the queries
//!   of its group's heads that see it (FlashAttention-2's key-major backward).
//!
//! Tensors: q, the context and their gradients `[batch, seq, heads, head_dim]`, k and v and their
//! gradients `[batch, seq, kv_heads, head_dim]`, the log-sum-exp and `D` `[batch, heads, seq]`.

use super::empty_dense;
use burn::tensor::{Shape, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeRuntime, FloatElement};
use cubecl::prelude::*;
use cubecl::{CubeCount, CubeDim};

use crate::attention::AttentionSpec;

/// Units per cube.
const UNITS: u32 = 64;
/// Cubes per grid column: grids are at most 65535 cubes along an axis.
const GRID_X: usize = 32768;

/// The score of a raw product `q · k`: scaled, and capped as Gemma 2 caps (`cap · tanh(z /
/// cap)`) when `capped`.
#[cube]
fn score<F: Float>(dot: F, scale: F, cap: F, #[comptime] capped: bool) -> F {
    let z = dot * scale;
    if comptime!(capped) {
        cap * F::tanh(z / cap)
    } else {
        z
    }
}

/// `d loss / d (q · k)` from `d loss / d s` at the score `s`.
#[cube]
fn dot_grad<F: Float>(ds: F, s: F, scale: F, cap: F, #[comptime] capped: bool) -> F {
    if comptime!(capped) {
        let t = s / cap;
        ds * (F::new(1.0) - t * t) * scale
    } else {
        ds * scale
    }
}

/// The first key position `p` sees: itself and `window - 1` before it (0: no window).
#[cube]
fn first_visible(p: usize, window: u32) -> usize {
    let w = window as usize;
    let mut first = 0;
    if w > 0 && p + 1 > w {
        first = p + 1 - w;
    }
    first
}

/// This unit's row among `rows`, over a grid of [`grid`].
#[cube]
fn row_index() -> usize {
    (CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize) * CUBE_DIM_X as usize
        + UNIT_POS_X as usize
}

#[cube(launch)]
fn forward_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &mut Tensor<F>,
    lse: &mut Tensor<F>,
    scale: f32,
    cap: f32,
    window: u32,
    #[comptime] head_dim: usize,
    #[comptime] capped: bool,
) {
    let batch = q.shape(0);
    let seq = q.shape(1);
    let heads = q.shape(2);
    let kv_heads = k.shape(2);
    let row = row_index();
    if row >= batch * heads * seq {
        terminate!();
    }
    let p = row % seq;
    let h = (row / seq) % heads;
    let b = row / (seq * heads);
    let g = h / (heads / kv_heads);
    let (scale, cap) = (F::cast_from(scale), F::cast_from(cap));
    let qo = ((b * seq + p) * heads + h) * head_dim;
    let mut qv = Array::<F>::new(head_dim);
    let mut acc = Array::<F>::new(head_dim);
    for d in 0..head_dim {
        qv[d] = q[qo + d];
        acc[d] = F::new(0.0);
    }
    let first = first_visible(p, window);
    // A finite sentinel: WGSL has no -inf literal.
    let mut m = F::new(-1.0e30);
    let mut z = F::new(0.0);
    for j in first..p + 1 {
        let ko = ((b * seq + j) * kv_heads + g) * head_dim;
        let mut dot = F::new(0.0);
        for d in 0..head_dim {
            dot += qv[d] * k[ko + d];
        }
        let s = score::<F>(dot, scale, cap, capped);
        if s > m {
            let c = F::exp(m - s);
            z = z * c + F::new(1.0);
            for d in 0..head_dim {
                acc[d] = acc[d] * c + v[ko + d];
            }
            m = s;
        } else {
            let e = F::exp(s - m);
            z += e;
            for d in 0..head_dim {
                acc[d] += e * v[ko + d];
            }
        }
    }
    for d in 0..head_dim {
        out[qo + d] = acc[d] / z;
    }
    lse[(b * heads + h) * seq + p] = m + F::ln(z);
}

#[cube(launch)]
fn query_grad_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &Tensor<F>,
    lse: &Tensor<F>,
    dout: &Tensor<F>,
    dq: &mut Tensor<F>,
    delta: &mut Tensor<F>,
    scale: f32,
    cap: f32,
    window: u32,
    #[comptime] head_dim: usize,
    #[comptime] capped: bool,
) {
    let batch = q.shape(0);
    let seq = q.shape(1);
    let heads = q.shape(2);
    let kv_heads = k.shape(2);
    let row = row_index();
    if row >= batch * heads * seq {
        terminate!();
    }
    let p = row % seq;
    let h = (row / seq) % heads;
    let b = row / (seq * heads);
    let g = h / (heads / kv_heads);
    let (scale, cap) = (F::cast_from(scale), F::cast_from(cap));
    let qo = ((b * seq + p) * heads + h) * head_dim;
    let stat = (b * heads + h) * seq + p;
    let mut qv = Array::<F>::new(head_dim);
    let mut dov = Array::<F>::new(head_dim);
    let mut acc = Array::<F>::new(head_dim);
    let mut big_d = F::new(0.0);
    for d in 0..head_dim {
        qv[d] = q[qo + d];
        dov[d] = dout[qo + d];
        acc[d] = F::new(0.0);
        big_d += dov[d] * out[qo + d];
    }
    delta[stat] = big_d;
    let row_lse = lse[stat];
    let first = first_visible(p, window);
    for j in first..p + 1 {
        let ko = ((b * seq + j) * kv_heads + g) * head_dim;
        let mut dot = F::new(0.0);
        let mut dp = F::new(0.0);
        for d in 0..head_dim {
            dot += qv[d] * k[ko + d];
            dp += dov[d] * v[ko + d];
        }
        let s = score::<F>(dot, scale, cap, capped);
        let prob = F::exp(s - row_lse);
        let dz = dot_grad::<F>(prob * (dp - big_d), s, scale, cap, capped);
        for d in 0..head_dim {
            acc[d] += dz * k[ko + d];
        }
    }
    for d in 0..head_dim {
        dq[qo + d] = acc[d];
    }
}

#[cube(launch)]
fn key_value_grad_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    lse: &Tensor<F>,
    delta: &Tensor<F>,
    dout: &Tensor<F>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    scale: f32,
    cap: f32,
    window: u32,
    #[comptime] head_dim: usize,
    #[comptime] capped: bool,
) {
    let batch = q.shape(0);
    let seq = q.shape(1);
    let heads = q.shape(2);
    let kv_heads = k.shape(2);
    let row = row_index();
    if row >= batch * kv_heads * seq {
        terminate!();
    }
    let j = row % seq;
    let g = (row / seq) % kv_heads;
    let b = row / (seq * kv_heads);
    let rep = heads / kv_heads;
    let (scale, cap) = (F::cast_from(scale), F::cast_from(cap));
    let ko = ((b * seq + j) * kv_heads + g) * head_dim;
    let mut kv = Array::<F>::new(head_dim);
    let mut vv = Array::<F>::new(head_dim);
    let mut dk_acc = Array::<F>::new(head_dim);
    let mut dv_acc = Array::<F>::new(head_dim);
    for d in 0..head_dim {
        kv[d] = k[ko + d];
        vv[d] = v[ko + d];
        dk_acc[d] = F::new(0.0);
        dv_acc[d] = F::new(0.0);
    }
    // The queries that see key j: j itself up to the window's end.
    let w = window as usize;
    let mut last = seq;
    if w > 0 && j + w < seq {
        last = j + w;
    }
    for r in 0..rep {
        let h = g * rep + r;
        for i in j..last {
            let qo = ((b * seq + i) * heads + h) * head_dim;
            let stat = (b * heads + h) * seq + i;
            let mut dot = F::new(0.0);
            let mut dp = F::new(0.0);
            for d in 0..head_dim {
                dot += q[qo + d] * kv[d];
                dp += dout[qo + d] * vv[d];
            }
            let s = score::<F>(dot, scale, cap, capped);
            let prob = F::exp(s - lse[stat]);
            let dz = dot_grad::<F>(prob * (dp - delta[stat]), s, scale, cap, capped);
            for d in 0..head_dim {
                dv_acc[d] += prob * dout[qo + d];
                dk_acc[d] += dz * q[qo + d];
            }
        }
    }
    for d in 0..head_dim {
        dk[ko + d] = dk_acc[d];
        dv[ko + d] = dv_acc[d];
    }
}

/// The grid and cube for one unit per row of `rows`.
fn grid(rows: usize) -> (CubeCount, CubeDim) {
    let cubes = rows.div_ceil(UNITS as usize).max(1);
    let (x, y) = (cubes.min(GRID_X), cubes.div_ceil(GRID_X));
    (
        CubeCount::Static(x as u32, y as u32, 1),
        CubeDim::new_1d(UNITS),
    )
}

/// The spec's scalars as the kernels take them: scale, cap (1 when uncapped, unused) and window
/// (0: none).
fn scalars(spec: &AttentionSpec) -> (f32, f32, u32, bool) {
    (
        spec.scale,
        spec.softcap.unwrap_or(1.0),
        spec.shape.window.map_or(0, |w| w as u32),
        spec.softcap.is_some(),
    )
}

pub(super) fn forward<R: CubeRuntime, F: FloatElement>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    spec: AttentionSpec,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let (q, k, v) = (into_contiguous(q), into_contiguous(k), into_contiguous(v));
    let [batch, seq, heads, head_dim] = q.shape().dims::<4>();
    let client = q.client.clone();
    let device = q.device.clone();
    let out = empty_dense::<R, F>(client.clone(), device.clone(), q.shape());
    let lse = empty_dense::<R, F>(client.clone(), device, Shape::new([batch, heads, seq]));
    let (scale, cap, window, capped) = scalars(&spec);
    let (count, dim) = grid(batch * heads * seq);
    forward_kernel::launch::<F, R>(
        &client,
        count,
        dim,
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        scale,
        cap,
        window,
        head_dim,
        capped,
    );
    (out, lse)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn backward<R: CubeRuntime, F: FloatElement>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    out: CubeTensor<R>,
    lse: CubeTensor<R>,
    dout: CubeTensor<R>,
    spec: AttentionSpec,
) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
    let [q, k, v, out, lse, dout] = [q, k, v, out, lse, dout].map(into_contiguous);
    let [batch, seq, heads, head_dim] = q.shape().dims::<4>();
    let kv_heads = k.shape().dims::<4>()[2];
    let client = q.client.clone();
    let device = q.device.clone();
    let dq = empty_dense::<R, F>(client.clone(), device.clone(), q.shape());
    let dk = empty_dense::<R, F>(client.clone(), device.clone(), k.shape());
    let dv = empty_dense::<R, F>(client.clone(), device.clone(), k.shape());
    let delta = empty_dense::<R, F>(client.clone(), device, Shape::new([batch, heads, seq]));
    let (scale, cap, window, capped) = scalars(&spec);
    let (count, dim) = grid(batch * heads * seq);
    query_grad_kernel::launch::<F, R>(
        &client,
        count,
        dim,
        q.clone().into_tensor_arg(),
        k.clone().into_tensor_arg(),
        v.clone().into_tensor_arg(),
        out.into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        dout.clone().into_tensor_arg(),
        dq.clone().into_tensor_arg(),
        delta.clone().into_tensor_arg(),
        scale,
        cap,
        window,
        head_dim,
        capped,
    );
    let (count, dim) = grid(batch * kv_heads * seq);
    key_value_grad_kernel::launch::<F, R>(
        &client,
        count,
        dim,
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        lse.into_tensor_arg(),
        delta.into_tensor_arg(),
        dout.into_tensor_arg(),
        dk.clone().into_tensor_arg(),
        dv.clone().into_tensor_arg(),
        scale,
        cap,
        window,
        head_dim,
        capped,
    );
    (dq, dk, dv)
}
