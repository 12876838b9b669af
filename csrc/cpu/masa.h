// Torch-facing entry points of the MaSA CPU backend (implemented in masa.cpp).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>

namespace vitattn {

// axis: 0 = full form over the H x W grid, 1 = along W in every row, 2 = along H in every
// column. q, k (B, heads, H, W, d), v (B, heads, H, W, dv), any strides; log_gamma (heads,).
// Returns out (B, heads, H, W, dv) contiguous in q's dtype and lse (B, heads, H, W) in
// float32 (float64 for float64 inputs).
std::tuple<at::Tensor, at::Tensor> masa_cpu_fwd(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, const at::Tensor& log_gamma,
                                                double scale, int64_t axis);

// Gradients of one masa_cpu_fwd pass: dq, dk, dv (contiguous, input dtype) and
// dlog_gamma (heads,) in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masa_cpu_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& log_gamma, double scale,
    int64_t axis);

// "avx2" or "baseline": the kernel build this CPU runs.
std::string masa_cpu_isa();

}  // namespace vitattn
