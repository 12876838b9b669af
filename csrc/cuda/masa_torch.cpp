// MaSA CUDA backend, torch side: checks, output allocation, the stride mapping of each pass
// (masa_geometry.h, shared with the CPU backend and the kernels) and the launches on the
// current stream. Compiled by the host compiler (it includes torch's CUDA headers;
// masa.cu does not).
//
// Whole-op entry points, registered as torch.ops.vitattn_C.masa_cuda_fwd / masa_cuda_bwd
// with the contract of the CPU backend (csrc/cpu/masa.h); the decomposed form runs its two
// passes here. The one-pass functions stay bound through pybind for vitattn/_extension.py.
#include "masa_torch.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "masa.h"

namespace vitattn {
namespace {

using at::Tensor;
using masa::Axis;

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return vitattn_cuda::kF16;
    case at::kBFloat16: return vitattn_cuda::kBF16;
    case at::kFloat: return vitattn_cuda::kF32;
    default: TORCH_CHECK(false, "masa_cuda: q must be float16, bfloat16 or float32, got ", t);
  }
  return -1;
}

Axis axis_of(const char* fn, int64_t axis) {
  TORCH_CHECK(axis >= 0 && axis <= 2, fn, ": axis must be 0 (full), 1 (w) or 2 (h), got ", axis);
  return static_cast<Axis>(axis);
}

vitattn_cuda::Strides6 strides6(const Tensor& t, Axis axis) { return masa::map_strides(axis, t.strides().data()); }
vitattn_cuda::Strides5 strides5(const Tensor& t, Axis axis) { return masa::map_strides4(axis, t.strides().data()); }

void check_inputs(const char* fn, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& log_gamma) {
  TORCH_CHECK(q.dim() == 5 && k.dim() == 5 && v.dim() == 5, fn, ": q, k and v must be 5-D (B, heads, H, W, d)");
  TORCH_CHECK(q.is_cuda() && k.device() == q.device() && v.device() == q.device() &&
                  log_gamma.device() == q.device(),
              fn, ": every tensor must be on the same CUDA device");
  TORCH_CHECK(k.sizes() == q.sizes(), fn, ": k must have q's shape ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.sizes().slice(0, 4) == q.sizes().slice(0, 4), fn, ": v must have shape ", q.sizes().slice(0, 4),
              " + (dv,), got ", v.sizes());
  TORCH_CHECK(q.numel() > 0 && v.numel() > 0, fn, ": empty inputs are not supported");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), fn,
              ": q, k and v must share a dtype");
  TORCH_CHECK(q.size(4) <= vitattn_cuda::kMaxHeadDim && v.size(4) <= vitattn_cuda::kMaxHeadDim, fn,
              ": head dims up to ", vitattn_cuda::kMaxHeadDim, " are supported, got d=", q.size(4), ", dv=", v.size(4));
  TORCH_CHECK(log_gamma.dim() == 1 && log_gamma.size(0) == q.size(1), fn, ": log_gamma must have shape (heads,) = (",
              q.size(1), ",), got ", log_gamma.sizes());
  const int64_t R = std::max(q.size(2), q.size(3));
  TORCH_CHECK(q.size(0) * q.size(1) * R < (int64_t{1} << 31) && q.size(2) * q.size(3) < (int64_t{1} << 20), fn,
              ": too many problems or tokens");
}

void check_like(const char* fn, const char* name, const Tensor& t, at::IntArrayRef shape, const Tensor& q,
                at::ScalarType dtype) {
  TORCH_CHECK(t.device() == q.device(), fn, ": ", name, " must be on q's device");
  TORCH_CHECK(t.sizes() == shape, fn, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, fn, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

void* stream_ptr() { return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()); }

// One pass (inputs checked by the caller): out (contiguous, q's dtype) and lse (fp32).
std::tuple<Tensor, Tensor> pass_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lg, double scale,
                                    Axis axis) {
  const masa::Pass ps = masa::pass_of(axis, q.size(2), q.size(3));
  Tensor out = at::empty({q.size(0), q.size(1), q.size(2), q.size(3), v.size(4)}, q.options());
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options().dtype(at::kFloat));
  vitattn_cuda::FwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.log_gamma = lg.data_ptr<float>();
  p.sq = strides6(q, axis);
  p.sk = strides6(k, axis);
  p.sv = strides6(v, axis);
  p.so = strides6(out, axis);
  p.sl = strides5(lse, axis);
  p.Z = static_cast<int>(q.size(0) * q.size(1) * ps.R);
  p.R = static_cast<int>(ps.R);
  p.heads = static_cast<int>(q.size(1));
  p.N = static_cast<int>(ps.N());
  p.X = static_cast<int>(ps.X);
  p.d = static_cast<int>(q.size(4));
  p.dv = static_cast<int>(v.size(4));
  p.scale = static_cast<float>(scale);
  p.dtype = dtype_code(q.scalar_type());
  const int err = vitattn_cuda::fwd(p, stream_ptr());
  TORCH_CHECK(err == 0, "masa_cuda_fwd: kernel launch failed: ", vitattn_cuda::error_string(err));
  return {out, lse};
}

// Gradients of one pass: dq, dk, dv (contiguous, q's dtype) and dlog_gamma (heads,) fp32.
std::tuple<Tensor, Tensor, Tensor, Tensor> pass_bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                    const Tensor& v, const Tensor& out, const Tensor& lse,
                                                    const Tensor& lg, double scale, Axis axis) {
  const masa::Pass ps = masa::pass_of(axis, q.size(2), q.size(3));
  // delta_i = rowsum(dO_i * O_i) in fp32, laid out like lse (both contiguous: one Strides5)
  Tensor delta = (dout.to(at::kFloat) * out.to(at::kFloat)).sum(-1).contiguous();
  Tensor lse_c = lse.to(at::kFloat).contiguous();
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  vitattn_cuda::BwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.dout = dout.data_ptr();
  p.lse = lse_c.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.log_gamma = lg.data_ptr<float>();
  p.dq_out = dq.data_ptr();
  p.dk_out = dk.data_ptr();
  p.dv_out = dv.data_ptr();
  p.sq = strides6(q, axis);
  p.sk = strides6(k, axis);
  p.sv = strides6(v, axis);
  p.sdo = strides6(dout, axis);
  p.sdq = strides6(dq, axis);
  p.sdk = strides6(dk, axis);
  p.sdv = strides6(dv, axis);
  p.sl = strides5(lse_c, axis);
  p.Z = static_cast<int>(q.size(0) * q.size(1) * ps.R);
  p.R = static_cast<int>(ps.R);
  p.heads = static_cast<int>(q.size(1));
  p.N = static_cast<int>(ps.N());
  p.X = static_cast<int>(ps.X);
  p.d = static_cast<int>(q.size(4));
  p.dv = static_cast<int>(v.size(4));
  p.scale = static_cast<float>(scale);
  p.dtype = dtype_code(q.scalar_type());
  const int parts = vitattn_cuda::bwd_dlg_parts(p);
  Tensor dlg_parts = at::empty({q.size(0) * q.size(1) * ps.R * parts}, q.options().dtype(at::kFloat));
  p.dlg = dlg_parts.data_ptr<float>();
  const int err = vitattn_cuda::bwd(p, stream_ptr());
  TORCH_CHECK(err == 0, "masa_cuda_bwd: kernel launch failed: ", vitattn_cuda::error_string(err));
  // block partials summed in a fixed order: deterministic
  Tensor dlg = dlg_parts.view({q.size(0), q.size(1), ps.R * parts}).sum(at::IntArrayRef{0, 2});
  return {dq, dk, dv, dlg};
}

void check_bwd(const char* fn, const Tensor& dout, const Tensor& q, const Tensor& v, const Tensor& out,
               const Tensor& lse, const char* lse_name) {
  check_like(fn, "dout", dout, v.sizes(), q, q.scalar_type());
  check_like(fn, "out", out, v.sizes(), q, q.scalar_type());
  check_like(fn, lse_name, lse, q.sizes().slice(0, 4), q, at::kFloat);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> masa_cuda_fwd_op(const Tensor& q, const Tensor& k, const Tensor& v,
                                                            const Tensor& log_gamma, double scale, bool decomposed) {
  check_inputs("masa_cuda_fwd", q, k, v, log_gamma);
  const c10::cuda::CUDAGuard guard(q.device());
  const Tensor lg = log_gamma.to(at::kFloat).contiguous();
  if (!decomposed) {
    auto [out, lse] = pass_fwd(q, k, v, lg, scale, Axis::full);
    return {out, at::empty({0}, out.options()), lse, at::empty({0}, lse.options())};
  }
  auto [v_mid, lse_w] = pass_fwd(q, k, v, lg, scale, Axis::w);
  auto [out, lse_h] = pass_fwd(q, k, v_mid, lg, scale, Axis::h);
  return {out, v_mid, lse_w, lse_h};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> masa_cuda_bwd_op(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                            const Tensor& v, const Tensor& log_gamma,
                                                            const Tensor& out, const Tensor& v_mid,
                                                            const Tensor& lse_w, const Tensor& lse_h, double scale,
                                                            bool decomposed) {
  const char* fn = "masa_cuda_bwd";
  check_inputs(fn, q, k, v, log_gamma);
  const c10::cuda::CUDAGuard guard(q.device());
  const Tensor lg = log_gamma.to(at::kFloat).contiguous();
  if (!decomposed) {
    check_bwd(fn, dout, q, v, out, lse_w, "lse_w");
    return pass_bwd(dout, q, k, v, out, lse_w, lg, scale, Axis::full);
  }
  check_bwd(fn, dout, q, v, out, lse_h, "lse_h");
  check_like(fn, "v_mid", v_mid, v.sizes(), q, q.scalar_type());
  check_like(fn, "lse_w", lse_w, q.sizes().slice(0, 4), q, at::kFloat);
  // the pass along H (last in the forward) first: its dv is the W pass's dout
  auto [dq_h, dk_h, dv_mid, dlg_h] = pass_bwd(dout, q, k, v_mid, out, lse_h, lg, scale, Axis::h);
  auto [dq_w, dk_w, dv, dlg_w] = pass_bwd(dv_mid, q, k, v, v_mid, lse_w, lg, scale, Axis::w);
  // the two passes' dq and dk summed in fp32, rounded once
  Tensor dq = q.scalar_type() == at::kFloat ? dq_h.add_(dq_w) : (dq_h.to(at::kFloat) + dq_w.to(at::kFloat)).to(q.scalar_type());
  Tensor dk = k.scalar_type() == at::kFloat ? dk_h.add_(dk_w) : (dk_h.to(at::kFloat) + dk_w.to(at::kFloat)).to(k.scalar_type());
  return {dq, dk, dv, dlg_h + dlg_w};
}

std::tuple<Tensor, Tensor> masa_cuda_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& log_gamma,
                                         double scale, int64_t axis) {
  const char* fn = "masa_cuda_fwd";
  const Axis ax = axis_of(fn, axis);
  check_inputs(fn, q, k, v, log_gamma);
  const c10::cuda::CUDAGuard guard(q.device());
  return pass_fwd(q, k, v, log_gamma.to(at::kFloat).contiguous(), scale, ax);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> masa_cuda_bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                         const Tensor& v, const Tensor& out, const Tensor& lse,
                                                         const Tensor& log_gamma, double scale, int64_t axis) {
  const char* fn = "masa_cuda_bwd";
  const Axis ax = axis_of(fn, axis);
  check_inputs(fn, q, k, v, log_gamma);
  check_bwd(fn, dout, q, v, out, lse, "lse");
  const c10::cuda::CUDAGuard guard(q.device());
  return pass_bwd(dout, q, k, v, out, lse, log_gamma.to(at::kFloat).contiguous(), scale, ax);
}

std::string masa_cuda_kernel_family(int64_t N, int64_t d, int64_t dv, bool backward) {
  return vitattn_cuda::kernel_family(static_cast<int>(N), static_cast<int>(d), static_cast<int>(dv), backward);
}

}  // namespace vitattn

TORCH_LIBRARY_FRAGMENT(vitattn_C, m) {
  m.def(
      "masa_cuda_fwd(Tensor q, Tensor k, Tensor v, Tensor log_gamma, float scale, bool decomposed) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "masa_cuda_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor log_gamma, Tensor out, Tensor v_mid, "
      "Tensor lse_w, Tensor lse_h, float scale, bool decomposed) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vitattn_C, CUDA, m) {
  m.impl("masa_cuda_fwd", &vitattn::masa_cuda_fwd_op);
  m.impl("masa_cuda_bwd", &vitattn::masa_cuda_bwd_op);
}
