// DynaMixer dynamic mixing (compress included), CPU backend, torch side: argument checks
// and the call into the kernels of the instruction set in use (dynamixer_kernels.cpp, isa.h).
// Registered as
//   vitattn_C::dynamixer_cpu_fwd(x, compress_weight, compress_bias, generate_weight,
//       generate_bias, segments, y!, r!) -> lse
//   vitattn_C::dynamixer_cpu_bwd(dy, x, r, compress_weight, generate_weight, generate_bias,
//       segments, need_compress_bias, dx!) -> (dcompress_weight, dcompress_bias,
//       dgenerate_weight, dgenerate_bias)
// x, dy (N0, N1, N2, L, C) and r (N0, N1, N2, L, S*d) with any strides; the outputs y, r
// (forward) and dx (backward) are allocated by the caller, who decides their layout, with
// x's dtype. lse (N0, N1, N2, S, L) contiguous and the weight gradients are in the
// accumulation dtype (fp64 for fp64, fp32 otherwise); a bias gradient is an empty (0,)
// tensor when that bias is absent (or, for the compress bias, not needed). The backward
// recomputes the softmax from r and does not need lse.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "dynamixer_kernels.h"
#include "torch_args.h"

namespace vitattn {
namespace {

using at::Tensor;
using cpu::DmMatrix;
using cpu::DmView;
using cpu::DynaMixerArgs;

constexpr const char* kFwd = "dynamixer_cpu_fwd";
constexpr const char* kBwd = "dynamixer_cpu_bwd";

void check_shape(const char* fn, const char* name, const Tensor& t, at::IntArrayRef want, const char* what) {
  TORCH_CHECK_VALUE(t.sizes() == want, fn, ": ", name, " must have shape ", want, " (", what, "), got ",
                    t.sizes());
}

void check_output(const char* fn, const char* name, const Tensor& t, const Tensor& x, int64_t last) {
  check_tensor(fn, name, t, 5, x.scalar_type());
  check_shape(fn, name, t, {x.size(0), x.size(1), x.size(2), x.size(3), last}, "an output the caller allocates");
  TORCH_CHECK_VALUE(t.numel() == 0 || t.is_non_overlapping_and_dense(), fn, ": ", name,
                    " must not overlap itself, got strides ", t.strides());
}

DmView view5(const Tensor& t) {
  DmView v;
  v.data = t.data_ptr();
  for (int k = 0; k < 5; ++k) v.stride[k] = t.stride(k);
  return v;
}

DmMatrix matrix(const Tensor& t) {
  DmMatrix m;
  m.data = t.data_ptr();
  for (int k = 0; k < t.dim(); ++k) m.stride[k] = t.stride(k);
  return m;
}

// Checks shared by forward and backward: x, the weights, segments. Fills geometry and weights.
DynaMixerArgs common_args(const char* fn, const Tensor& x, const Tensor& wc, const std::optional<Tensor>& bc,
                          const Tensor& wg, const std::optional<Tensor>& bg, int64_t segments) {
  TORCH_CHECK_VALUE(x.defined(), fn, ": x is undefined");
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, fn,
                   ": x must be float32, float64, float16 or bfloat16, got ", dt);
  check_tensor(fn, "x", x, 5, dt);
  TORCH_CHECK_VALUE(segments > 0, fn, ": segments must be positive, got ", segments);
  const int64_t L = x.size(3), C = x.size(4), S = segments;
  TORCH_CHECK_VALUE(C % S == 0, fn, ": the channel count C=", C, " (last dim of x) must be divisible by segments=",
                    S);
  check_tensor(fn, "compress_weight", wc, 2, dt);
  const int64_t SD = wc.size(0);
  TORCH_CHECK_VALUE(SD > 0 && SD % S == 0 && wc.size(1) == C, fn,
                    ": compress_weight must have shape (segments*d, C) = (", S, "*d, ", C, "), got ", wc.sizes());
  const int64_t d = SD / S;
  check_tensor(fn, "generate_weight", wg, 2, dt);
  check_shape(fn, "generate_weight", wg, {L * L, L * d}, "(L*L, L*d)");
  DynaMixerArgs a;
  a.dtype = dt;
  a.N0 = x.size(0), a.N1 = x.size(1), a.N2 = x.size(2), a.L = L, a.C = C, a.S = S, a.d = d;
  a.x = view5(x);
  a.wc = matrix(wc);
  a.wg = matrix(wg);
  if (bc.has_value() && bc->defined()) {
    check_tensor(fn, "compress_bias", *bc, 1, dt);
    check_shape(fn, "compress_bias", *bc, {SD}, "(segments*d,)");
    a.bc = matrix(*bc);
  }
  if (bg.has_value() && bg->defined()) {
    check_tensor(fn, "generate_bias", *bg, 1, dt);
    check_shape(fn, "generate_bias", *bg, {L * L}, "(L*L,)");
    a.bg = matrix(*bg);
  }
  return a;
}

Tensor dynamixer_cpu_fwd(const Tensor& x, const Tensor& compress_weight, const std::optional<Tensor>& compress_bias,
                         const Tensor& generate_weight, const std::optional<Tensor>& generate_bias, int64_t segments,
                         const Tensor& y, const Tensor& r) {
  DynaMixerArgs a = common_args(kFwd, x, compress_weight, compress_bias, generate_weight, generate_bias, segments);
  check_output(kFwd, "y", y, x, a.C);
  check_output(kFwd, "r", r, x, a.S * a.d);
  Tensor lse = at::empty({a.N0, a.N1, a.N2, a.S, a.L}, x.options().dtype(acc_dtype(a.dtype)));
  a.y = view5(y);
  a.r = view5(r);
  a.lse = lse.data_ptr();
  VITATTN_CPU_DISPATCH(dynamixer_fwd_kernel, a);
  return lse;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dynamixer_cpu_bwd(
    const Tensor& dy, const Tensor& x, const Tensor& r, const Tensor& compress_weight, const Tensor& generate_weight,
    const std::optional<Tensor>& generate_bias, int64_t segments, bool need_compress_bias, const Tensor& dx) {
  DynaMixerArgs a = common_args(kBwd, x, compress_weight, std::nullopt, generate_weight, generate_bias, segments);
  check_tensor(kBwd, "dy", dy, 5, a.dtype);
  check_shape(kBwd, "dy", dy, x.sizes(), "that of x");
  check_tensor(kBwd, "r", r, 5, a.dtype);
  check_shape(kBwd, "r", r, {a.N0, a.N1, a.N2, a.L, a.S * a.d}, "the compressed x of the forward");
  check_output(kBwd, "dx", dx, x, a.C);
  const auto opts = x.options().dtype(acc_dtype(a.dtype));
  Tensor dwc = at::empty({a.S * a.d, a.C}, opts);
  Tensor dbc = at::empty({need_compress_bias ? a.S * a.d : 0}, opts);
  Tensor dwg = at::empty({a.L * a.L, a.L * a.d}, opts);
  Tensor dbg = at::empty({a.bg.data != nullptr ? a.L * a.L : 0}, opts);
  a.dy = view5(dy);
  a.r = view5(r);
  a.dx = view5(dx);
  a.dwc = dwc.data_ptr();
  a.dbc = need_compress_bias ? dbc.data_ptr() : nullptr;
  a.dwg = dwg.data_ptr();
  a.dbg = a.bg.data != nullptr ? dbg.data_ptr() : nullptr;
  VITATTN_CPU_DISPATCH(dynamixer_bwd_kernel, a);
  return {dwc, dbc, dwg, dbg};
}

}  // namespace
}  // namespace vitattn

TORCH_LIBRARY_FRAGMENT(vitattn_C, m) {
  m.def("dynamixer_cpu_fwd(Tensor x, Tensor compress_weight, Tensor? compress_bias, Tensor generate_weight, "
        "Tensor? generate_bias, int segments, Tensor(a!) y, Tensor(b!) r) -> Tensor");
  m.def("dynamixer_cpu_bwd(Tensor dy, Tensor x, Tensor r, Tensor compress_weight, Tensor generate_weight, "
        "Tensor? generate_bias, int segments, bool need_compress_bias, Tensor(a!) dx) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vitattn_C, CPU, m) {
  m.impl("dynamixer_cpu_fwd", &vitattn::dynamixer_cpu_fwd);
  m.impl("dynamixer_cpu_bwd", &vitattn::dynamixer_cpu_bwd);
}
