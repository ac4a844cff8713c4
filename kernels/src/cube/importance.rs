//! Importance accumulation in two launches: a partial pass, one cube per (32 channels, batch
//! row), whose 32 × LANES units stride over the sequence and reduce in shared memory to
//! `(mean_s |A|)^2` per (batch row, channel); then a pass per channel that sums the batch rows
//! into the accumulator. No `[batch, seq, d]` temporary, no float atomics (wgpu lacks them).

use super::empty_dense;
use burn::tensor::{Shape, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeRuntime, FloatElement};
use cubecl::prelude::*;
use cubecl::{CubeCount, CubeDim};

/// Channels per cube (one warp's worth of consecutive addresses: coalesced reads).
const CHANNELS: u32 = 32;
/// Units per channel striding over the sequence (a power of two, for the tree reduction).
const LANES: u32 = 8;

/// `activation [batch, seq, d]` → `partial [batch, d] = (mean_s |A[b, s, c]|)^2`.
#[cube(launch)]
fn partial_kernel<F: Float>(
    activation: &Tensor<F>,
    partial: &mut Tensor<F>,
    #[comptime] lanes: u32,
) {
    let seq = activation.shape(1);
    let d = activation.shape(2);
    let x = UNIT_POS_X as usize;
    let lane = UNIT_POS_Y as usize;
    let c = CUBE_POS_X as usize * CUBE_DIM_X as usize + x;
    let b = CUBE_POS_Y as usize;

    let mut sum = F::new(0.0);
    if c < d {
        let mut t = lane;
        while t < seq {
            sum += F::abs(activation[(b * seq + t) * d + c]);
            t += lanes as usize;
        }
    }
    let width = CUBE_DIM_X as usize;
    let mut shared = SharedMemory::<F>::new((32 * lanes) as usize);
    shared[lane * width + x] = sum;
    sync_cube();
    // A runtime counter (CUBE_DIM_Y is `lanes`): comptime values cannot be reassigned.
    let mut offset = CUBE_DIM_Y as usize / 2;
    while offset > 0 {
        if lane < offset {
            let other = shared[(lane + offset) * width + x];
            shared[lane * width + x] += other;
        }
        sync_cube();
        offset /= 2;
    }
    if lane == 0 && c < d {
        let m = shared[x] / F::cast_from(seq as u32);
        partial[b * d + c] = m * m;
    }
}

/// `out[c] = acc[c] + sum_b partial[b, c]`.
#[cube(launch)]
fn sum_kernel<F: Float>(acc: &Tensor<F>, partial: &Tensor<F>, out: &mut Tensor<F>) {
    let c = ABSOLUTE_POS;
    let d = acc.len();
    if c >= d {
        terminate!();
    }
    let batch = partial.shape(0);
    let mut total = F::new(0.0);
    for b in 0..batch {
        total += partial[b * d + c];
    }
    out[c] = acc[c] + total;
}

pub(super) fn accumulate<R: CubeRuntime, F: FloatElement>(
    acc: CubeTensor<R>,
    activation: CubeTensor<R>,
) -> CubeTensor<R> {
    let acc = into_contiguous(acc);
    let activation = into_contiguous(activation);
    let [batch, _, d] = activation.shape().dims::<3>();
    assert_eq!(
        acc.shape().dims::<1>(),
        [d],
        "accumulator and activation disagree on d"
    );
    let client = activation.client.clone();
    let device = activation.device.clone();

    let partial = empty_dense::<R, F>(client.clone(), device.clone(), Shape::new([batch, d]));
    partial_kernel::launch::<F, R>(
        &client,
        CubeCount::Static(d.div_ceil(CHANNELS as usize) as u32, batch as u32, 1),
        CubeDim::new_2d(CHANNELS, LANES),
        activation.into_tensor_arg(),
        partial.clone().into_tensor_arg(),
        LANES,
    );

    let out = empty_dense::<R, F>(client.clone(), device, Shape::new([d]));
    let cube = 256u32;
    sum_kernel::launch::<F, R>(
        &client,
        CubeCount::Static(d.div_ceil(cube as usize) as u32, 1, 1),
        CubeDim::new_1d(cube),
        acc.into_tensor_arg(),
        partial.into_tensor_arg(),
        out.clone().into_tensor_arg(),
    );
    out
}
