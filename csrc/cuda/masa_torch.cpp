// MaSA CUDA backend, torch side: checks, output allocation, stride mapping onto the
// kernels' (b, head, r, y, x, feature) addressing and the launch on the current stream.
// Compiled by the host compiler (it includes torch's CUDA headers; masa.cu does not).
#include "masa_torch.h"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "masa.h"

namespace vitattn {
namespace {

using at::Tensor;

struct Geo {
  int64_t B, heads, H, W, R, N, X;
};

Geo geometry(const Tensor& q, int64_t axis) {
  Geo g{q.size(0), q.size(1), q.size(2), q.size(3), 1, 0, 0};
  if (axis == 0) {
    g.R = 1, g.N = g.H * g.W, g.X = g.W;
  } else if (axis == 1) {
    g.R = g.H, g.N = g.W, g.X = g.W;
  } else {
    g.R = g.W, g.N = g.H, g.X = g.H;
  }
  return g;
}

// t's strides mapped onto (b, head, r, y, x[, feature]) for the pass's axis
vitattn_cuda::Strides6 strides6(const Tensor& t, int64_t axis) {
  const auto s = t.strides();
  if (axis == 0) return {s[0], s[1], 0, s[2], s[3], s[4]};
  if (axis == 1) return {s[0], s[1], s[2], 0, s[3], s[4]};
  return {s[0], s[1], s[3], 0, s[2], s[4]};
}

vitattn_cuda::Strides5 strides5(const Tensor& t, int64_t axis) {
  const auto s = t.strides();
  if (axis == 0) return {s[0], s[1], 0, s[2], s[3]};
  if (axis == 1) return {s[0], s[1], s[2], 0, s[3]};
  return {s[0], s[1], s[3], 0, s[2]};
}

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return vitattn_cuda::kF16;
    case at::kBFloat16: return vitattn_cuda::kBF16;
    case at::kFloat: return vitattn_cuda::kF32;
    default: TORCH_CHECK(false, "masa_cuda: q must be float16, bfloat16 or float32, got ", t);
  }
  return -1;
}

void check_inputs(const char* fn, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& log_gamma,
                  int64_t axis) {
  TORCH_CHECK(axis >= 0 && axis <= 2, fn, ": axis must be 0 (full), 1 (w) or 2 (h), got ", axis);
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
  const Geo g = geometry(q, axis);
  TORCH_CHECK(g.B * g.heads * g.R < (int64_t{1} << 31) && g.N < (int64_t{1} << 20), fn, ": too many problems or tokens");
}

void* stream_ptr() { return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()); }

}  // namespace

std::tuple<Tensor, Tensor> masa_cuda_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& log_gamma,
                                         double scale, int64_t axis) {
  check_inputs("masa_cuda_fwd", q, k, v, log_gamma, axis);
  const c10::cuda::CUDAGuard guard(q.device());
  const Geo g = geometry(q, axis);
  Tensor out = at::empty({g.B, g.heads, g.H, g.W, v.size(4)}, q.options());
  Tensor lse = at::empty({g.B, g.heads, g.H, g.W}, q.options().dtype(at::kFloat));
  Tensor lg = log_gamma.to(at::kFloat).contiguous();
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
  p.Z = static_cast<int>(g.B * g.heads * g.R);
  p.R = static_cast<int>(g.R);
  p.heads = static_cast<int>(g.heads);
  p.N = static_cast<int>(g.N);
  p.X = static_cast<int>(g.X);
  p.d = static_cast<int>(q.size(4));
  p.dv = static_cast<int>(v.size(4));
  p.scale = static_cast<float>(scale);
  p.dtype = dtype_code(q.scalar_type());
  const int err = vitattn_cuda::fwd(p, stream_ptr());
  TORCH_CHECK(err == 0, "masa_cuda_fwd: kernel launch failed: ", vitattn_cuda::error_string(err));
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> masa_cuda_bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                         const Tensor& v, const Tensor& out, const Tensor& lse,
                                                         const Tensor& log_gamma, double scale, int64_t axis) {
  check_inputs("masa_cuda_bwd", q, k, v, log_gamma, axis);
  TORCH_CHECK(dout.sizes() == v.sizes() && out.sizes() == v.sizes(), "masa_cuda_bwd: dout and out must have v's shape ",
              v.sizes(), ", got ", dout.sizes(), " and ", out.sizes());
  TORCH_CHECK(dout.scalar_type() == q.scalar_type(), "masa_cuda_bwd: dout must have q's dtype");
  TORCH_CHECK(lse.sizes() == q.sizes().slice(0, 4), "masa_cuda_bwd: lse must have shape ", q.sizes().slice(0, 4),
              ", got ", lse.sizes());
  TORCH_CHECK(dout.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
              "masa_cuda_bwd: every tensor must be on q's device");
  const c10::cuda::CUDAGuard guard(q.device());
  const Geo g = geometry(q, axis);
  // delta_i = rowsum(dO_i * O_i) in fp32, laid out like lse (both contiguous: one Strides5)
  Tensor delta = (dout.to(at::kFloat) * out.to(at::kFloat)).sum(-1).contiguous();
  Tensor lse_c = lse.to(at::kFloat).contiguous();
  Tensor lg = log_gamma.to(at::kFloat).contiguous();
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
  p.Z = static_cast<int>(g.B * g.heads * g.R);
  p.R = static_cast<int>(g.R);
  p.heads = static_cast<int>(g.heads);
  p.N = static_cast<int>(g.N);
  p.X = static_cast<int>(g.X);
  p.d = static_cast<int>(q.size(4));
  p.dv = static_cast<int>(v.size(4));
  p.scale = static_cast<float>(scale);
  p.dtype = dtype_code(q.scalar_type());
  const int parts = vitattn_cuda::bwd_dlg_parts(p);
  Tensor dlg_parts = at::empty({g.B * g.heads * g.R * parts}, q.options().dtype(at::kFloat));
  p.dlg = dlg_parts.data_ptr<float>();
  const int err = vitattn_cuda::bwd(p, stream_ptr());
  TORCH_CHECK(err == 0, "masa_cuda_bwd: kernel launch failed: ", vitattn_cuda::error_string(err));
  // block partials summed in a fixed order: deterministic
  Tensor dlg = dlg_parts.view({g.B, g.heads, g.R * parts}).sum(at::IntArrayRef{0, 2});
  return {dq, dk, dv, dlg};
}

std::string masa_cuda_kernel_family(int64_t N, int64_t d, int64_t dv, bool backward) {
  return vitattn_cuda::kernel_family(static_cast<int>(N), static_cast<int>(d), static_cast<int>(dv), backward);
}

}  // namespace vitattn
