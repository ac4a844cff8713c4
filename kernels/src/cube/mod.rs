//! The CubeCL kernels (CUDA, wgpu) and [`KernelBackend`](crate::KernelBackend) for the Cube
//! backends. Each kernel has a plain tensor-op reference beside it in the parent module, and the
//! tests in `kernels/tests/cube.rs` compare the two on wgpu (lavapipe in CI).

mod attention;
mod importance;
mod kl;

use burn_cubecl::element::BoolElement;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeRuntime, FloatElement, IntElement};

use crate::KernelBackend;
use crate::attention::AttentionSpec;
use crate::kl::KlDirection;

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> KernelBackend
    for CubeBackend<R, F, I, BT>
{
    fn importance_accumulate(acc: CubeTensor<R>, activation: CubeTensor<R>) -> CubeTensor<R> {
        importance::accumulate::<R, F>(acc, activation)
    }

    fn kl_rows(
        teacher: CubeTensor<R>,
        student: CubeTensor<R>,
        temperature: f32,
        direction: KlDirection,
        grad_scale: f32,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        kl::rows::<R, F>(teacher, student, temperature, direction, grad_scale)
    }

    fn attention_forward(
        q: CubeTensor<R>,
        k: CubeTensor<R>,
        v: CubeTensor<R>,
        spec: AttentionSpec,
        _with_lse: bool,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        if attention_by_blocks() {
            return crate::backend::attention_forward_by_blocks::<Self>(q, k, v, spec);
        }
        attention::forward::<R, F>(q, k, v, spec)
    }

    fn attention_backward(
        q: CubeTensor<R>,
        k: CubeTensor<R>,
        v: CubeTensor<R>,
        out: CubeTensor<R>,
        lse: CubeTensor<R>,
        dout: CubeTensor<R>,
        spec: AttentionSpec,
    ) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
        if attention_by_blocks() {
            return crate::backend::attention_backward_by_blocks::<Self>(
                q, k, v, out, lse, dout, spec,
            );
        }
        attention::backward::<R, F>(q, k, v, out, lse, dout, spec)
    }
}

/// `DISTILLERY_CUBE_ATTENTION=blocks` trains with the tensor-op attention by query blocks (the
/// backend's matmuls) instead of the attention kernels: the same bounded memory, for a device
/// where the matmuls outrun the kernels' one unit per row (`--bench cube` measures both).
/// `kernels` (or unset) is the default; any other value is refused rather than ignored.
fn attention_by_blocks() -> bool {
    match std::env::var("DISTILLERY_CUBE_ATTENTION").as_deref() {
        Err(_) | Ok("kernels") => false,
        Ok("blocks") => true,
        Ok(other) => panic!(
            "DISTILLERY_CUBE_ATTENTION={other:?} is not understood: set \"kernels\" (the default) or \"blocks\""
        ),
    }
}

/// An uninitialized output `[shape]` laid out densely, row after row, as the kernels index it.
/// burn's `empty_device` takes the runtime's "optimized" layout, which on CUDA pads each row
/// to an alignment (a pitched layout: [7, 1000] f32 rows 1024 apart); a kernel writing
/// `row * width + i` into it put every row but the first where readers do not look (the CUDA
/// run of `kl_kernel_equals_the_reference_loss_and_gradient` caught it; wgpu never pads).
pub(crate) fn empty_dense<R: burn_cubecl::CubeRuntime, F: burn_cubecl::FloatElement>(
    client: cubecl::client::ComputeClient<R>,
    device: R::Device,
    shape: burn::tensor::Shape,
) -> burn_cubecl::tensor::CubeTensor<R> {
    burn_cubecl::ops::numeric::empty_device_contiguous_dtype(client, device, shape, F::dtype())
}
