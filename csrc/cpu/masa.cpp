// MaSA CPU backend, torch side: argument checks, packing of the (possibly strided,
// half-precision) inputs into padded problem-major buffers of the compute type, the
// parallel task loop (at::parallel_for over problems x query or key blocks) and the
// run-time choice between the AVX2 and baseline kernel builds. The O(N^2) work lives in
// masa_kernels.inc; everything here is O(N) in memory and time.
#include "masa.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>

#include "masa_kernels.h"

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

// buf (Z, Np, fp) seen as the (B, heads, H, W, f) tensor it packs.
Tensor region(const Tensor& buf, const Geo& g, int64_t f, int64_t axis) {
  Tensor r = buf.view({g.B, g.heads, g.R, buf.size(1), buf.size(2)}).narrow(3, 0, g.N).narrow(4, 0, f);
  if (axis == 0) return r.select(2, 0).view({g.B, g.heads, g.H, g.W, f});
  if (axis == 1) return r;
  return r.transpose(2, 3);
}

// t (B, heads, H, W, f) -> (Z, Np, fp) in dtype, zero padded, times `mul`.
Tensor pack(const Tensor& t, const Geo& g, int64_t axis, int64_t Np, int64_t fp, at::ScalarType dtype,
            double mul = 1.0) {
  const int64_t f = t.size(4);
  auto opts = t.options().dtype(dtype);
  const int64_t Z = g.B * g.heads * g.R;
  Tensor buf = (Np != g.N || fp != f) ? at::zeros({Z, Np, fp}, opts) : at::empty({Z, Np, fp}, opts);
  region(buf, g, f, axis).copy_(t);
  if (mul != 1.0) buf.mul_(mul);
  return buf;
}

// (Z, Np, >= f) -> (Z, nblk, f, BN): per key block, features major (the K^T / V^T operand).
Tensor blocked_transpose(const Tensor& buf, int64_t f, int64_t nblk, int64_t BN) {
  return buf.narrow(2, 0, f).view({buf.size(0), nblk, BN, f}).transpose(2, 3).contiguous();
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Runs fn(begin, end) over [0, ntasks) on at::parallel_for's threads, handing out small
// chunks from a shared counter: a thread that is descheduled (shared machines) or meets
// the short last query block does not hold the others back, as a static split would.
// Tasks write disjoint outputs, so the result does not depend on the schedule.
template <typename Fn>
void run_tasks(int64_t ntasks, const Fn& fn) {
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunk = std::max<int64_t>(1, ntasks / (nthreads * 8));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t b = next.fetch_add(chunk);
      if (b >= ntasks) break;
      fn(b, std::min(ntasks, b + chunk));
    }
  });
}

bool use_avx2() {
#if defined(VITATTN_CPU_HAVE_AVX2)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

template <typename T>
struct Kernels {
  void (*fwd)(const vitattn_cpu::MasaArgs<T>&, int64_t, int64_t);
  void (*dkdv)(const vitattn_cpu::MasaArgs<T>&, int64_t, int64_t);
  void (*dq)(const vitattn_cpu::MasaArgs<T>&, int64_t, int64_t);
};

template <typename T>
Kernels<T> kernels();

template <>
Kernels<float> kernels<float>() {
#if defined(VITATTN_CPU_HAVE_AVX2)
  if (use_avx2())
    return {vitattn_cpu::avx2::fwd_f32, vitattn_cpu::avx2::bwd_dkdv_f32, vitattn_cpu::avx2::bwd_dq_f32};
#endif
  return {vitattn_cpu::base::fwd_f32, vitattn_cpu::base::bwd_dkdv_f32, vitattn_cpu::base::bwd_dq_f32};
}

template <>
Kernels<double> kernels<double>() {
#if defined(VITATTN_CPU_HAVE_AVX2)
  if (use_avx2())
    return {vitattn_cpu::avx2::fwd_f64, vitattn_cpu::avx2::bwd_dkdv_f64, vitattn_cpu::avx2::bwd_dq_f64};
#endif
  return {vitattn_cpu::base::fwd_f64, vitattn_cpu::base::bwd_dkdv_f64, vitattn_cpu::base::bwd_dq_f64};
}

// Tile sizes: BM queries x BN keys per tile. A 64 x 128 fp32 logits tile (32 KiB) plus the
// q/k/v slices stays in L2 while the two small GEMMs and the exp pass run over it.
template <typename T>
void plan(vitattn_cpu::MasaArgs<T>& a, const Geo& g, int64_t d, int64_t dv) {
  const int64_t L = vitattn_cpu::kVecBytes / static_cast<int64_t>(sizeof(T));
  const int64_t bn_max = sizeof(T) == 4 ? 128 : 64;
  a.Z = g.B * g.heads * g.R;
  a.R = g.R;
  a.heads = g.heads;
  a.N = g.N;
  a.X = g.X;
  a.nblk = (g.N + bn_max - 1) / bn_max;
  // spread the keys evenly over the blocks so the last one is not mostly padding
  a.BN = round_up((g.N + a.nblk - 1) / a.nblk, L);
  a.Np = a.nblk * a.BN;
  a.BM = 64;
  a.nmblk = (g.N + a.BM - 1) / a.BM;
  a.d = d;
  a.dv = dv;
  a.dp = round_up(d, L);
  a.dvp = round_up(dv, L);
}

Tensor coords(const Geo& g, int64_t Np, at::ScalarType dtype, bool row) {
  // token n < N sits at (n / X, n % X); padded tokens get 0 (their logits are masked)
  Tensor n = at::arange(g.N, at::TensorOptions().dtype(at::kLong));
  Tensor c = row ? at::floor_divide(n, g.X) : at::remainder(n, g.X);
  Tensor out = at::zeros({Np}, at::TensorOptions().dtype(dtype));
  out.narrow(0, 0, g.N).copy_(c);
  return out;
}

void check_inputs(const char* fn, const Tensor& q, const Tensor& k, const Tensor& v,
                  const Tensor& log_gamma, int64_t axis) {
  TORCH_CHECK(axis >= 0 && axis <= 2, fn, ": axis must be 0 (full), 1 (w) or 2 (h), got ", axis);
  TORCH_CHECK(q.dim() == 5 && k.dim() == 5 && v.dim() == 5, fn,
              ": q, k and v must be 5-D (B, heads, H, W, d), got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() &&
                  log_gamma.device().is_cpu(),
              fn, ": every tensor must be on the CPU");
  TORCH_CHECK(k.sizes() == q.sizes(), fn, ": k must have q's shape ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.sizes().slice(0, 4) == q.sizes().slice(0, 4), fn, ": v must have shape ",
              q.sizes().slice(0, 4), " + (dv,), got ", v.sizes());
  TORCH_CHECK(q.numel() > 0 && v.numel() > 0, fn, ": empty inputs are not supported");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, fn,
              ": q must be float16, bfloat16, float32 or float64, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, fn, ": q, k and v must share a dtype");
  TORCH_CHECK(log_gamma.dim() == 1 && log_gamma.size(0) == q.size(1), fn,
              ": log_gamma must have shape (heads,) = (", q.size(1), ",), got ", log_gamma.sizes());
}

template <typename T>
std::tuple<Tensor, Tensor> fwd_typed(const Tensor& q, const Tensor& k, const Tensor& v,
                                     const Tensor& log_gamma, double scale, int64_t axis,
                                     at::ScalarType acc) {
  const Geo g = geometry(q, axis);
  vitattn_cpu::MasaArgs<T> a;
  plan<T>(a, g, q.size(4), v.size(4));
  Tensor qb = pack(q, g, axis, a.Np, a.dp, acc, scale);
  Tensor kb = pack(k, g, axis, a.Np, a.d, acc);
  Tensor kt = blocked_transpose(kb, a.d, a.nblk, a.BN);
  Tensor vb = pack(v, g, axis, a.Np, a.dvp, acc);
  Tensor lg = log_gamma.to(acc).contiguous();
  Tensor cy = coords(g, a.Np, acc, true), cx = coords(g, a.Np, acc, false);
  Tensor ob = at::empty({a.Z, a.Np, a.dvp}, qb.options());
  Tensor lb = at::empty({a.Z, a.Np, 1}, qb.options());
  a.q = qb.data_ptr<T>();
  a.kt = kt.data_ptr<T>();
  a.v = vb.data_ptr<T>();
  a.log_gamma = lg.data_ptr<T>();
  a.coord_y = cy.data_ptr<T>();
  a.coord_x = cx.data_ptr<T>();
  a.out = ob.data_ptr<T>();
  a.lse = lb.data_ptr<T>();
  const auto fn = kernels<T>().fwd;
  run_tasks(a.Z * a.nmblk, [&](int64_t b, int64_t e) { fn(a, b, e); });
  Tensor out = at::empty({g.B, g.heads, g.H, g.W, v.size(4)}, q.options());
  out.copy_(region(ob, g, v.size(4), axis));
  Tensor lse = at::empty({g.B, g.heads, g.H, g.W}, qb.options());
  lse.copy_(region(lb, g, 1, axis).select(4, 0));
  return {out, lse};
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> bwd_typed(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                     const Tensor& v, const Tensor& out, const Tensor& lse,
                                                     const Tensor& log_gamma, double scale, int64_t axis,
                                                     at::ScalarType acc) {
  const Geo g = geometry(q, axis);
  const int64_t d = q.size(4), dv = v.size(4);
  vitattn_cpu::MasaArgs<T> a;
  plan<T>(a, g, d, dv);
  // delta_i = rowsum(dO_i * O_i), as in flash-attention backward
  Tensor delta = (dout.to(acc) * out.to(acc)).sum(-1, /*keepdim=*/true);
  Tensor qb = pack(q, g, axis, a.Np, a.dp, acc, scale);
  Tensor kb = pack(k, g, axis, a.Np, a.dp, acc);
  Tensor kt = blocked_transpose(kb, d, a.nblk, a.BN);
  Tensor vt = blocked_transpose(pack(v, g, axis, a.Np, dv, acc), dv, a.nblk, a.BN);
  Tensor dob = pack(dout, g, axis, a.Np, a.dvp, acc);
  Tensor lseb = pack(lse.unsqueeze(-1), g, axis, a.Np, 1, acc);
  Tensor deltab = pack(delta, g, axis, a.Np, 1, acc);
  Tensor lg = log_gamma.to(acc).contiguous();
  Tensor cy = coords(g, a.Np, acc, true), cx = coords(g, a.Np, acc, false);
  Tensor dqb = at::empty({a.Z, a.Np, a.dp}, qb.options());
  Tensor dkb = at::empty({a.Z, a.Np, a.dp}, qb.options());
  Tensor dvb = at::empty({a.Z, a.Np, a.dvp}, qb.options());
  Tensor dlgb = at::empty({a.Z, a.nmblk}, qb.options());
  a.q = qb.data_ptr<T>();
  a.k = kb.data_ptr<T>();
  a.kt = kt.data_ptr<T>();
  a.vt = vt.data_ptr<T>();
  a.dout = dob.data_ptr<T>();
  a.lse_in = lseb.data_ptr<T>();
  a.delta = deltab.data_ptr<T>();
  a.log_gamma = lg.data_ptr<T>();
  a.coord_y = cy.data_ptr<T>();
  a.coord_x = cx.data_ptr<T>();
  a.scale = static_cast<T>(scale);
  a.dq = dqb.data_ptr<T>();
  a.dk = dkb.data_ptr<T>();
  a.dv_out = dvb.data_ptr<T>();
  a.dlg = dlgb.data_ptr<T>();
  const Kernels<T> ks = kernels<T>();
  run_tasks(a.Z * a.nblk, [&](int64_t b, int64_t e) { ks.dkdv(a, b, e); });
  run_tasks(a.Z * a.nmblk, [&](int64_t b, int64_t e) { ks.dq(a, b, e); });
  Tensor dq = at::empty(q.sizes(), q.options());
  dq.copy_(region(dqb, g, d, axis));
  Tensor dk = at::empty(k.sizes(), k.options());
  dk.copy_(region(dkb, g, d, axis));
  Tensor dvt = at::empty(v.sizes(), v.options());
  dvt.copy_(region(dvb, g, dv, axis));
  // per-task partial sums reduced in a fixed order: deterministic
  Tensor dlg = dlgb.view({g.B, g.heads, g.R * a.nmblk}).sum(at::IntArrayRef{0, 2});
  return {dq, dk, dvt, dlg};
}

}  // namespace

std::tuple<Tensor, Tensor> masa_cpu_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                        const Tensor& log_gamma, double scale, int64_t axis) {
  check_inputs("masa_cpu_fwd", q, k, v, log_gamma, axis);
  if (q.scalar_type() == at::kDouble) return fwd_typed<double>(q, k, v, log_gamma, scale, axis, at::kDouble);
  return fwd_typed<float>(q, k, v, log_gamma, scale, axis, at::kFloat);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> masa_cpu_bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                        const Tensor& v, const Tensor& out, const Tensor& lse,
                                                        const Tensor& log_gamma, double scale, int64_t axis) {
  check_inputs("masa_cpu_bwd", q, k, v, log_gamma, axis);
  TORCH_CHECK(dout.sizes() == v.sizes() && out.sizes() == v.sizes(), "masa_cpu_bwd: dout and out must have v's shape ",
              v.sizes(), ", got ", dout.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.sizes() == q.sizes().slice(0, 4), "masa_cpu_bwd: lse must have shape ", q.sizes().slice(0, 4),
              ", got ", lse.sizes());
  TORCH_CHECK(dout.device().is_cpu() && out.device().is_cpu() && lse.device().is_cpu(),
              "masa_cpu_bwd: every tensor must be on the CPU");
  if (q.scalar_type() == at::kDouble)
    return bwd_typed<double>(dout, q, k, v, out, lse, log_gamma, scale, axis, at::kDouble);
  return bwd_typed<float>(dout, q, k, v, out, lse, log_gamma, scale, axis, at::kFloat);
}

std::string masa_cpu_isa() { return use_avx2() ? "avx2" : "baseline"; }

}  // namespace vitattn
