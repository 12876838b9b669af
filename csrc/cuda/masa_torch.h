// Torch-facing entry points of the MaSA CUDA backend (masa_torch.cpp; CUDA builds only).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>

namespace vitattn {

// The whole op, registered as torch.ops.vitattn_C.masa_cuda_fwd / masa_cuda_bwd: the
// contract of masa_cpu_fwd_op / masa_cpu_bwd_op (csrc/cpu/masa.h) for CUDA tensors of
// dtype float16, bfloat16 or float32; lse and dlog_gamma are float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masa_cuda_fwd_op(const at::Tensor& q, const at::Tensor& k,
                                                                            const at::Tensor& v,
                                                                            const at::Tensor& log_gamma, double scale,
                                                                            bool decomposed);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masa_cuda_bwd_op(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& log_gamma, const at::Tensor& out, const at::Tensor& v_mid, const at::Tensor& lse_w,
    const at::Tensor& lse_h, double scale, bool decomposed);

// One pass (axis 0 = full, 1 = w, 2 = h) -> (out, lse), and its gradients: the pybind
// entries vitattn/_extension.py calls until the per-op backends call the whole op.
std::tuple<at::Tensor, at::Tensor> masa_cuda_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const at::Tensor& log_gamma, double scale, int64_t axis);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masa_cuda_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& log_gamma, double scale, int64_t axis);

// "onchip" or "flash": the kernel family a pass over these sizes uses on the current device.
std::string masa_cuda_kernel_family(int64_t N, int64_t d, int64_t dv, bool backward);

}  // namespace vitattn
