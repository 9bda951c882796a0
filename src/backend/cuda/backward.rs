//! Backward (training) ops of the CUDA backend. Kernels: kernels/conv_bwd.cu and the backward
//! families in kernels/norm.cu and kernels/attention.cu; CPU twins: the `*_backward` methods of
//! `backend::cpu::Cpu`.
use super::Cuda;
use crate::backend::Grads3;
use crate::error::Result;
use crate::tensor::Tensor;

pub(super) fn linear_backward(
    _b: &Cuda,
    _x: &Tensor<Cuda>,
    _w: &Tensor<Cuda>,
    _dy: &Tensor<Cuda>,
) -> Result<Grads3<Cuda>> {
    Cuda::not_on_cuda("linear backward")
}

pub(super) fn nin_backward(
    _b: &Cuda,
    _x: &Tensor<Cuda>,
    _w: &Tensor<Cuda>,
    _dy: &Tensor<Cuda>,
) -> Result<Grads3<Cuda>> {
    Cuda::not_on_cuda("nin backward")
}

pub(super) fn conv2d_backward(
    _b: &Cuda,
    _x: &Tensor<Cuda>,
    _w: &Tensor<Cuda>,
    _dy: &Tensor<Cuda>,
    _stride: usize,
    _pad: usize,
) -> Result<Grads3<Cuda>> {
    Cuda::not_on_cuda("conv2d backward")
}

#[allow(clippy::too_many_arguments)]
pub(super) fn group_norm_backward(
    _b: &Cuda,
    _x: &Tensor<Cuda>,
    _gamma: &Tensor<Cuda>,
    _beta: &Tensor<Cuda>,
    _dy: &Tensor<Cuda>,
    _groups: usize,
    _eps: f64,
    _silu: bool,
) -> Result<Grads3<Cuda>> {
    Cuda::not_on_cuda("group_norm backward")
}

pub(super) fn attention_backward(
    _b: &Cuda,
    _q: &Tensor<Cuda>,
    _k: &Tensor<Cuda>,
    _v: &Tensor<Cuda>,
    _dy: &Tensor<Cuda>,
) -> Result<(Tensor<Cuda>, Tensor<Cuda>, Tensor<Cuda>)> {
    Cuda::not_on_cuda("attention backward")
}
