//! The CubeCL kernels (CUDA, wgpu) and [`KernelBackend`](crate::KernelBackend) for the Cube
//! backends. Each kernel has a plain tensor-op reference beside it in the parent module, and the
//! tests in `kernels/tests/cube.rs` compare the two on wgpu (lavapipe in CI).

mod importance;
mod kl;

use burn_cubecl::element::BoolElement;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeRuntime, FloatElement, IntElement};

use crate::KernelBackend;
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
}
