// Depthwise 2-d convolution on channels-last (B, H, W, C) activations, stride 1, C++ CPU
// backend, torch side: argument checks, weight packing, output allocation and the call into
// the kernels of the instruction set in use (depthwise_conv_kernels.cpp, isa.h).
// Registered as
//   vitattn_C::depthwise_conv_cpu_fwd(x, weight, bias, ph, pw) -> y
//   vitattn_C::depthwise_conv_cpu_bwd(dy, x, weight, ph, pw, need_x, need_weight, need_bias)
//       -> (dx, dweight, dbias)
// x (B, H, W, C) and dy (B, Ho, Wo, C) with any strides (a copy is made where channels are
// not contiguous), weight (C, 1, kh, kw), bias (C,); float32 or float64, all one dtype.
// y and dx are contiguous; a gradient not asked for is an empty (0,) tensor.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "depthwise_conv.h"
#include "torch_args.h"

namespace vitattn {
namespace {

using at::Tensor;
using cpu::DwConvArgs;
using cpu::NhwcTensor;

constexpr const char* kFwd = "depthwise_conv_cpu_fwd";
constexpr const char* kBwd = "depthwise_conv_cpu_bwd";

// channels must be contiguous for the kernels' vector loads; the other strides are free
Tensor unit_channel_stride(const Tensor& t) { return t.size(3) <= 1 || t.stride(3) == 1 ? t : t.contiguous(); }

NhwcTensor view_of(const Tensor& t) {
  NhwcTensor v;
  v.data = t.data_ptr();
  v.sb = t.stride(0), v.sh = t.stride(1), v.sw = t.stride(2);
  return v;
}

// x, weight, padding: fills the geometry of the forward convolution.
DwConvArgs common_args(const char* fn, const Tensor& x, const Tensor& weight, int64_t ph, int64_t pw) {
  TORCH_CHECK_VALUE(x.defined(), fn, ": x is undefined");
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble, fn, ": x must be float32 or float64, got ", dt);
  check_tensor(fn, "x", x, 4, dt);
  check_tensor(fn, "weight", weight, 4, dt);
  const int64_t C = x.size(3);
  TORCH_CHECK_VALUE(weight.size(0) == C && weight.size(1) == 1 && weight.size(2) > 0 && weight.size(3) > 0, fn,
                    ": weight must have shape (C, 1, kh, kw) with C=", C, " (last dim of x), got ", weight.sizes());
  TORCH_CHECK_VALUE(ph >= 0 && pw >= 0, fn, ": padding must be >= 0, got (", ph, ", ", pw, ")");
  DwConvArgs a;
  a.dtype = dt;
  a.B = x.size(0), a.H = x.size(1), a.W = x.size(2), a.C = C;
  a.kh = weight.size(2), a.kw = weight.size(3), a.ph = ph, a.pw = pw;
  a.Ho = a.H + 2 * ph - a.kh + 1, a.Wo = a.W + 2 * pw - a.kw + 1;
  TORCH_CHECK_VALUE(a.Ho > 0 && a.Wo > 0, fn, ": the output would be empty: x of size ", a.H, "x", a.W,
                    " with padding (", ph, ", ", pw, ") is smaller than the ", a.kh, "x", a.kw, " kernel");
  return a;
}

// (C, 1, kh, kw) -> (kh * kw, C) contiguous; mirrored taps for the input gradient
Tensor pack_weight(const Tensor& weight, bool mirrored) {
  Tensor w = mirrored ? weight.flip({2, 3}) : weight;
  return w.reshape({weight.size(0), weight.size(2) * weight.size(3)}).t().contiguous();
}

Tensor depthwise_conv_cpu_fwd(const Tensor& x_in, const Tensor& weight, const std::optional<Tensor>& bias,
                              int64_t ph, int64_t pw) {
  DwConvArgs a = common_args(kFwd, x_in, weight, ph, pw);
  const Tensor x = unit_channel_stride(x_in);
  Tensor b;
  if (bias.has_value() && bias->defined()) {
    check_tensor(kFwd, "bias", *bias, 1, a.dtype);
    TORCH_CHECK_VALUE(bias->size(0) == a.C, kFwd, ": bias must have shape (", a.C, ",), got ", bias->sizes());
    b = bias->contiguous();
    a.bias = b.data_ptr();
  }
  Tensor w = pack_weight(weight, false);
  Tensor y = at::empty({a.B, a.Ho, a.Wo, a.C}, x.options());
  if (y.numel() == 0) return y;
  a.x = view_of(x);
  a.w = w.data_ptr();
  a.y = y.data_ptr();
  VITATTN_CPU_DISPATCH(dwconv_fwd_kernel, a);
  return y;
}

std::tuple<Tensor, Tensor, Tensor> depthwise_conv_cpu_bwd(const Tensor& dy_in, const Tensor& x_in,
                                                          const Tensor& weight, int64_t ph, int64_t pw, bool need_x,
                                                          bool need_weight, bool need_bias) {
  DwConvArgs a = common_args(kBwd, x_in, weight, ph, pw);
  check_tensor(kBwd, "dy", dy_in, 4, a.dtype);
  TORCH_CHECK_VALUE(dy_in.sizes() == at::IntArrayRef({a.B, a.Ho, a.Wo, a.C}), kBwd, ": dy must have shape (", a.B,
                    ", ", a.Ho, ", ", a.Wo, ", ", a.C, ") (that of the output), got ", dy_in.sizes());
  const Tensor x = unit_channel_stride(x_in), dy = unit_channel_stride(dy_in);
  const auto opts = x.options();
  Tensor dx = need_x ? at::empty({a.B, a.H, a.W, a.C}, opts) : at::empty({0}, opts);
  Tensor dw = need_weight ? at::empty({a.kh * a.kw, a.C}, opts) : at::empty({0}, opts);
  Tensor db = need_bias ? at::empty({a.C}, opts) : at::empty({0}, opts);
  const bool empty = x.numel() == 0;
  if (empty) {
    dx.zero_(), dw.zero_(), db.zero_();
  }
  if (need_x && !empty) {
    // the input gradient is the convolution of dy with the mirrored kernel, padding k - 1 - p
    DwConvArgs t = a;
    Tensor wm = pack_weight(weight, true);
    t.H = a.Ho, t.W = a.Wo, t.ph = a.kh - 1 - ph, t.pw = a.kw - 1 - pw, t.Ho = a.H, t.Wo = a.W;
    t.x = view_of(dy);
    t.w = wm.data_ptr();
    t.bias = nullptr;
    t.y = dx.data_ptr();
    VITATTN_CPU_DISPATCH(dwconv_fwd_kernel, t);
  }
  if ((need_weight || need_bias) && !empty) {
    Tensor dw_buf = need_weight ? dw : at::empty({a.kh * a.kw, a.C}, opts);
    a.x = view_of(x);
    a.dy = view_of(dy);
    a.dw = dw_buf.data_ptr();
    a.db = need_bias ? db.data_ptr() : nullptr;
    VITATTN_CPU_DISPATCH(dwconv_weight_grad_kernel, a);
  }
  if (need_weight) dw = dw.t().reshape({a.C, 1, a.kh, a.kw});
  return {dx, dw, db};
}

}  // namespace
}  // namespace vitattn

TORCH_LIBRARY_FRAGMENT(vitattn_C, m) {
  m.def("depthwise_conv_cpu_fwd(Tensor x, Tensor weight, Tensor? bias, int ph, int pw) -> Tensor");
  m.def("depthwise_conv_cpu_bwd(Tensor dy, Tensor x, Tensor weight, int ph, int pw, bool need_x, "
        "bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vitattn_C, CPU, m) {
  m.impl("depthwise_conv_cpu_fwd", &vitattn::depthwise_conv_cpu_fwd);
  m.impl("depthwise_conv_cpu_bwd", &vitattn::depthwise_conv_cpu_bwd);
}
