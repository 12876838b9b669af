// Sinkhorn / optimal-transport CPU backend, torch side: argument checks, dtype and layout
// handling (fp16/bf16 inputs computed in fp32; strided inputs used in place when their last
// dim is contiguous), output allocation, the run-time instruction-set choice, and the
// registration of the ops torch.ops.vitattn_C.sinkhorn_{,ot_}cpu_{fwd,bwd}. The work
// itself is in sinkhorn_kernels.cpp; the contracts are those of the sinkhorn backends
// (vitattn/ops/sinkhorn/backends.py):
//   sk_fwd(S (Z, n, m), la (Z, n), lb (Z, m), eps, iters) -> (plan, G (Z, iters, m))
//   sk_bwd(dP, S, la, lb, G, eps) -> (dS, dla, dlb)
//   ot_fwd(x, ref, v, filt, eps, iters, attention) -> (out, zeta, G)
//   ot_bwd(dout, x, ref, v, filt, zeta, G, eps, attention) -> (dx, dref, dv)
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "sinkhorn.h"
#include "torch_args.h"

namespace vitattn {
namespace {

using at::Tensor;
using cpu::OtArgs;
using cpu::SinkhornArgs;
using cpu::SinkhornIo;

void check_floating(const char* fn, const char* name, const Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got device ", t.device());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, fn, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", dt);
}

void check_eps_iters(const char* fn, double eps, int64_t iters) {
  TORCH_CHECK(std::isfinite(eps) && eps > 0, fn, ": eps must be a positive finite number, got ", eps);
  TORCH_CHECK(iters >= 1, fn, ": iters must be at least 1, got ", iters);
}

// t in dtype `dt` with its own sizes, (Z, ...) contiguous
Tensor contiguous_as(const Tensor& t, at::ScalarType dt) { return t.to(dt).contiguous(); }

// t in dtype `dt` with a contiguous last dim (other strides kept when already so)
Tensor last_dim_contiguous(const Tensor& t, at::ScalarType dt) {
  Tensor r = t.to(dt);
  if (r.size(-1) > 1 && r.stride(-1) != 1) r = r.contiguous();
  return r;
}

SinkhornIo io_of(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return SinkhornIo::F64;
    case at::kHalf: return SinkhornIo::F16;
    case at::kBFloat16: return SinkhornIo::BF16;
    default: return SinkhornIo::F32;
  }
}

// la (Z, n), lb (Z, m): the log marginals in the accumulation dtype
void check_marginals(const char* fn, const Tensor& S, const Tensor& la, const Tensor& lb) {
  const int64_t Z = S.size(0), n = S.size(1), m = S.size(2);
  TORCH_CHECK(la.device().is_cpu() && lb.device().is_cpu(), fn, ": la and lb must be CPU tensors");
  TORCH_CHECK(la.dim() == 2 && la.size(0) == Z && la.size(1) == n, fn, ": la must have shape (", Z, ", ", n,
              "), got ", la.sizes());
  TORCH_CHECK(lb.dim() == 2 && lb.size(0) == Z && lb.size(1) == m, fn, ": lb must have shape (", Z, ", ", m,
              "), got ", lb.sizes());
  TORCH_CHECK(la.is_floating_point() && lb.is_floating_point(), fn, ": la and lb must be floating point");
}

void check_scores(const char* fn, const char* name, const Tensor& S) {
  check_floating(fn, name, S);
  TORCH_CHECK(S.dim() == 3, fn, ": ", name, " must be 3-D (Z, n, m), got shape ", S.sizes());
  TORCH_CHECK(S.size(1) >= 1 && S.size(2) >= 1, fn, ": ", name, " must have n >= 1 and m >= 1, got shape ",
              S.sizes());
}

// ---------------------------------------------------------------- sinkhorn

template <typename T>
SinkhornArgs<T> sk_args(const Tensor& S, const Tensor& la, const Tensor& lb, const Tensor& G, double eps) {
  SinkhornArgs<T> a;
  a.Z = S.size(0);
  a.n = S.size(1);
  a.m = S.size(2);
  a.iters = G.size(1);
  a.eps = static_cast<T>(eps);
  a.io = io_of(S.scalar_type());
  a.S = S.data_ptr();
  a.la = la.data_ptr<T>();
  a.lb = lb.data_ptr<T>();
  a.G = G.data_ptr<T>();
  return a;
}

std::tuple<Tensor, Tensor> sinkhorn_cpu_fwd(const Tensor& S_in, const Tensor& la_in, const Tensor& lb_in,
                                            double eps, int64_t iters) {
  constexpr const char* fn = "sinkhorn_cpu_fwd";
  check_scores(fn, "S", S_in);
  check_marginals(fn, S_in, la_in, lb_in);
  check_eps_iters(fn, eps, iters);
  const auto acc = acc_dtype(S_in.scalar_type());
  const int64_t Z = S_in.size(0), m = S_in.size(2);
  Tensor S = S_in.contiguous();
  Tensor P = at::empty(S.sizes(), S.options());
  Tensor G = at::empty({Z, iters, m}, S.options().dtype(acc));
  if (Z == 0) return {P, G};
  Tensor la = contiguous_as(la_in, acc), lb = contiguous_as(lb_in, acc);
  if (acc == at::kDouble) {
    auto a = sk_args<double>(S, la, lb, G, eps);
    a.P = P.data_ptr();
    VITATTN_CPU_DISPATCH(sinkhorn_fwd_f64, a);
  } else {
    auto a = sk_args<float>(S, la, lb, G, eps);
    a.P = P.data_ptr();
    VITATTN_CPU_DISPATCH(sinkhorn_fwd_f32, a);
  }
  return {P, G};
}

std::tuple<Tensor, Tensor, Tensor> sinkhorn_cpu_bwd(const Tensor& dP_in, const Tensor& S_in, const Tensor& la_in,
                                                    const Tensor& lb_in, const Tensor& G_in, double eps) {
  constexpr const char* fn = "sinkhorn_cpu_bwd";
  check_scores(fn, "S", S_in);
  check_marginals(fn, S_in, la_in, lb_in);
  TORCH_CHECK(dP_in.sizes() == S_in.sizes(), fn, ": dP must have the shape of S ", S_in.sizes(), ", got ",
              dP_in.sizes());
  check_floating(fn, "dP", dP_in);
  const int64_t Z = S_in.size(0), n = S_in.size(1), m = S_in.size(2);
  TORCH_CHECK(G_in.dim() == 3 && G_in.size(0) == Z && G_in.size(1) >= 1 && G_in.size(2) == m, fn,
              ": G must have shape (", Z, ", iters, ", m, "), got ", G_in.sizes());
  check_eps_iters(fn, eps, G_in.size(1));
  const auto acc = acc_dtype(S_in.scalar_type());
  Tensor S = S_in.contiguous();
  Tensor dP = dP_in.to(S.scalar_type()).contiguous();
  Tensor dS = at::empty(S.sizes(), S.options());
  Tensor dla = at::empty({Z, n}, S.options().dtype(acc));
  Tensor dlb = at::empty({Z, m}, S.options().dtype(acc));
  if (Z == 0) return {dS, dla, dlb};
  Tensor la = contiguous_as(la_in, acc), lb = contiguous_as(lb_in, acc), G = contiguous_as(G_in, acc);
  if (acc == at::kDouble) {
    auto a = sk_args<double>(S, la, lb, G, eps);
    a.dP = dP.data_ptr();
    a.dS = dS.data_ptr();
    a.dla = dla.data_ptr<double>();
    a.dlb = dlb.data_ptr<double>();
    VITATTN_CPU_DISPATCH(sinkhorn_bwd_f64, a);
  } else {
    auto a = sk_args<float>(S, la, lb, G, eps);
    a.dP = dP.data_ptr();
    a.dS = dS.data_ptr();
    a.dla = dla.data_ptr<float>();
    a.dlb = dlb.data_ptr<float>();
    VITATTN_CPU_DISPATCH(sinkhorn_bwd_f32, a);
  }
  return {dS, dla, dlb};
}

// ---------------------------------------------------------------- ot_aggregate / ot_attention

struct OtInputs {
  Tensor x, ref, v, filt;
  int64_t B, heads, n, m, d, dv;
  at::ScalarType dtype, acc;
};

OtInputs ot_inputs(const char* fn, const Tensor& x, const Tensor& ref, const Tensor& v,
                   const std::optional<Tensor>& filt) {
  check_floating(fn, "x", x);
  check_floating(fn, "ref", ref);
  check_floating(fn, "v", v);
  TORCH_CHECK(x.dim() == 4, fn, ": x must be 4-D (B, heads, n, d), got shape ", x.sizes());
  TORCH_CHECK(ref.dim() == 3, fn, ": ref must be 3-D (heads, m, d), got shape ", ref.sizes());
  TORCH_CHECK(v.dim() == 4, fn, ": v must be 4-D (B, heads, n, dv), got shape ", v.sizes());
  TORCH_CHECK(ref.scalar_type() == x.scalar_type() && v.scalar_type() == x.scalar_type(), fn,
              ": x, ref and v must share a dtype, got ", x.scalar_type(), ", ", ref.scalar_type(), ", ",
              v.scalar_type());
  OtInputs in;
  in.B = x.size(0);
  in.heads = x.size(1);
  in.n = x.size(2);
  in.d = x.size(3);
  in.m = ref.size(1);
  in.dv = v.size(3);
  TORCH_CHECK(ref.size(0) == in.heads && ref.size(2) == in.d, fn, ": ref must have shape (", in.heads, ", m, ",
              in.d, "), got ", ref.sizes());
  TORCH_CHECK(v.size(0) == in.B && v.size(1) == in.heads && v.size(2) == in.n, fn, ": v must have shape (", in.B,
              ", ", in.heads, ", ", in.n, ", dv), got ", v.sizes());
  TORCH_CHECK(in.n >= 1 && in.m >= 1, fn, ": need at least one token and one reference, got n=", in.n,
              ", m=", in.m);
  in.dtype = x.scalar_type();
  in.acc = acc_dtype(in.dtype);
  in.x = last_dim_contiguous(x, in.acc);
  in.ref = last_dim_contiguous(ref, in.acc);
  in.v = last_dim_contiguous(v, in.acc);
  if (filt.has_value() && filt->defined()) {
    TORCH_CHECK(filt->device().is_cpu() && filt->is_floating_point(), fn,
                ": filt must be a floating-point CPU tensor");
    TORCH_CHECK(filt->dim() == 2 && filt->size(0) == in.n && filt->size(1) == in.m, fn, ": filt must have shape (",
                in.n, ", ", in.m, "), got ", filt->sizes());
    in.filt = contiguous_as(*filt, in.acc);
  }
  return in;
}

template <typename T>
OtArgs<T> ot_args(const OtInputs& in, double eps, int64_t iters, bool attention) {
  OtArgs<T> a;
  a.B = in.B;
  a.heads = in.heads;
  a.n = in.n;
  a.m = in.m;
  a.d = in.d;
  a.dv = in.dv;
  a.iters = iters;
  a.eps = static_cast<T>(eps);
  a.attention = attention;
  a.x = in.x.data_ptr<T>();
  a.ref = in.ref.data_ptr<T>();
  a.v = in.v.data_ptr<T>();
  for (int k = 0; k < 3; ++k) {
    a.sx[k] = in.x.stride(k);
    a.sv[k] = in.v.stride(k);
  }
  a.sref[0] = in.ref.stride(0);
  a.sref[1] = in.ref.stride(1);
  a.filt = in.filt.defined() ? in.filt.data_ptr<T>() : nullptr;
  return a;
}

std::tuple<Tensor, Tensor, Tensor> sinkhorn_ot_cpu_fwd(const Tensor& x, const Tensor& ref, const Tensor& v,
                                                       const std::optional<Tensor>& filt, double eps,
                                                       int64_t iters, bool attention) {
  constexpr const char* fn = "sinkhorn_ot_cpu_fwd";
  check_eps_iters(fn, eps, iters);
  const OtInputs in = ot_inputs(fn, x, ref, v, filt);
  auto opts = x.options().dtype(in.acc);
  Tensor out = at::empty({in.B, in.heads, attention ? in.n : in.m, in.dv}, opts);
  Tensor zeta = attention ? at::empty({in.B, in.heads, in.m, in.dv}, opts) : at::empty({0}, opts);
  Tensor G = at::empty({in.B, in.heads, iters, in.m}, opts);
  if (in.B * in.heads > 0) {
    if (in.acc == at::kDouble) {
      auto a = ot_args<double>(in, eps, iters, attention);
      a.out = out.data_ptr<double>();
      a.zeta = attention ? zeta.data_ptr<double>() : nullptr;
      a.G = G.data_ptr<double>();
      VITATTN_CPU_DISPATCH(ot_fwd_f64, a);
    } else {
      auto a = ot_args<float>(in, eps, iters, attention);
      a.out = out.data_ptr<float>();
      a.zeta = attention ? zeta.data_ptr<float>() : nullptr;
      a.G = G.data_ptr<float>();
      VITATTN_CPU_DISPATCH(ot_fwd_f32, a);
    }
  }
  return {out.to(in.dtype), zeta, G};
}

std::tuple<Tensor, Tensor, Tensor> sinkhorn_ot_cpu_bwd(const Tensor& dout_in, const Tensor& x, const Tensor& ref,
                                                       const Tensor& v, const std::optional<Tensor>& filt,
                                                       const Tensor& zeta_in, const Tensor& G_in, double eps,
                                                       bool attention) {
  constexpr const char* fn = "sinkhorn_ot_cpu_bwd";
  const OtInputs in = ot_inputs(fn, x, ref, v, filt);
  TORCH_CHECK(G_in.dim() == 4 && G_in.size(0) == in.B && G_in.size(1) == in.heads && G_in.size(2) >= 1 &&
                  G_in.size(3) == in.m,
              fn, ": G must have shape (", in.B, ", ", in.heads, ", iters, ", in.m, "), got ", G_in.sizes());
  const int64_t iters = G_in.size(2);
  check_eps_iters(fn, eps, iters);
  const int64_t rows = attention ? in.n : in.m;
  TORCH_CHECK(dout_in.dim() == 4 && dout_in.size(0) == in.B && dout_in.size(1) == in.heads &&
                  dout_in.size(2) == rows && dout_in.size(3) == in.dv,
              fn, ": dout must have shape (", in.B, ", ", in.heads, ", ", rows, ", ", in.dv, "), got ",
              dout_in.sizes());
  check_floating(fn, "dout", dout_in);
  if (attention)
    TORCH_CHECK(zeta_in.dim() == 4 && zeta_in.size(0) == in.B && zeta_in.size(1) == in.heads &&
                    zeta_in.size(2) == in.m && zeta_in.size(3) == in.dv,
                fn, ": zeta must have shape (", in.B, ", ", in.heads, ", ", in.m, ", ", in.dv, "), got ",
                zeta_in.sizes());
  auto opts = x.options().dtype(in.acc);
  Tensor dx = at::empty({in.B, in.heads, in.n, in.d}, opts);
  Tensor dv = at::empty({in.B, in.heads, in.n, in.dv}, opts);
  Tensor dref = in.B > 0 ? at::empty({in.heads, in.m, in.d}, opts) : at::zeros({in.heads, in.m, in.d}, opts);
  if (in.B * in.heads > 0) {
    Tensor dout = last_dim_contiguous(dout_in, in.acc);
    Tensor zeta = attention ? contiguous_as(zeta_in, in.acc) : Tensor();
    Tensor G = contiguous_as(G_in, in.acc);
    auto run = [&](auto tag) {
      using T = decltype(tag);
      auto a = ot_args<T>(in, eps, iters, attention);
      a.G = G.data_ptr<T>();
      a.zeta = attention ? zeta.data_ptr<T>() : nullptr;
      a.dout = dout.data_ptr<T>();
      for (int k = 0; k < 3; ++k) a.sdout[k] = dout.stride(k);
      a.dx = dx.data_ptr<T>();
      a.dvalue = dv.data_ptr<T>();
      a.dref = dref.data_ptr<T>();
      if constexpr (std::is_same_v<T, double>)
        VITATTN_CPU_DISPATCH(ot_bwd_f64, a);
      else
        VITATTN_CPU_DISPATCH(ot_bwd_f32, a);
    };
    if (in.acc == at::kDouble)
      run(double());
    else
      run(float());
  }
  return {dx.to(in.dtype), dref.to(in.dtype), dv.to(in.dtype)};
}

}  // namespace
}  // namespace vitattn

TORCH_LIBRARY_FRAGMENT(vitattn_C, m) {
  m.def("sinkhorn_cpu_fwd(Tensor S, Tensor la, Tensor lb, float eps, int iters) -> (Tensor, Tensor)");
  m.def("sinkhorn_cpu_bwd(Tensor dP, Tensor S, Tensor la, Tensor lb, Tensor G, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("sinkhorn_ot_cpu_fwd(Tensor x, Tensor ref, Tensor v, Tensor? filt, float eps, int iters, bool attention) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("sinkhorn_ot_cpu_bwd(Tensor dout, Tensor x, Tensor ref, Tensor v, Tensor? filt, Tensor zeta, Tensor G, "
        "float eps, bool attention) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vitattn_C, CPU, m) {
  m.impl("sinkhorn_cpu_fwd", &vitattn::sinkhorn_cpu_fwd);
  m.impl("sinkhorn_cpu_bwd", &vitattn::sinkhorn_cpu_bwd);
  m.impl("sinkhorn_ot_cpu_fwd", &vitattn::sinkhorn_ot_cpu_fwd);
  m.impl("sinkhorn_ot_cpu_bwd", &vitattn::sinkhorn_ot_cpu_bwd);
}
