// Torch-facing entry points of the MaSA CPU backend (implemented in masa.cpp).
//
// Registered as torch.ops.vitattn_C.masa_cpu_fwd / masa_cpu_bwd (the whole op, the
// backend contract of PLAN.md):
//   masa_cpu_fwd(q, k, v, log_gamma, scale, decomposed) -> (out, v_mid, lse_w, lse_h)
//   masa_cpu_bwd(dout, q, k, v, log_gamma, out, v_mid, lse_w, lse_h, scale, decomposed)
//       -> (dq, dk, dv, dlog_gamma)
// q, k (B, heads, H, W, d), v (B, heads, H, W, dv), any strides; log_gamma (heads,).
// Full form: v_mid and lse_h are empty (0,) tensors and lse_w is the full grid's lse.
// Outputs are contiguous in q's dtype; lse and dlog_gamma are fp32 (fp64 for fp64).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace vitattn {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masa_cpu_fwd_op(const at::Tensor& q, const at::Tensor& k,
                                                                           const at::Tensor& v,
                                                                           const at::Tensor& log_gamma, double scale,
                                                                           bool decomposed);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masa_cpu_bwd_op(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& log_gamma, const at::Tensor& out, const at::Tensor& v_mid, const at::Tensor& lse_w,
    const at::Tensor& lse_h, double scale, bool decomposed);

}  // namespace vitattn
