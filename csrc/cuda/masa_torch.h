// Torch-facing entry points of the MaSA CUDA backend (masa_torch.cpp; CUDA builds only).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>

namespace vitattn {

// Same contract as masa_cpu_fwd / masa_cpu_bwd (csrc/cpu/masa.h) for CUDA tensors of
// dtype float16, bfloat16 or float32; lse is float32.
std::tuple<at::Tensor, at::Tensor> masa_cuda_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const at::Tensor& log_gamma, double scale, int64_t axis);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masa_cuda_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& log_gamma, double scale, int64_t axis);

// "onchip" or "flash": the kernel family a pass over these sizes uses on the current device.
std::string masa_cuda_kernel_family(int64_t N, int64_t d, int64_t dv, bool backward);

}  // namespace vitattn
