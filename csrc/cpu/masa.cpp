// MaSA CPU backend, torch side: argument checks, output allocation, one scratch slot per
// thread, and the task loop over the kernels of the instruction set in use (masa_kernels.cpp).
// Inputs are handed over with their strides: nothing is copied or packed here.
#include "masa.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "isa.h"
#include "masa_kernels.h"
#include "torch_args.h"

VITATTN_CPU_DECLARE(vitattn::cpu::MasaPlan, masa_fwd_plan, (const vitattn::cpu::MasaArgs&))
VITATTN_CPU_DECLARE(void, masa_fwd_run, (const vitattn::cpu::MasaArgs&, int64_t, int64_t, int64_t))
VITATTN_CPU_DECLARE(vitattn::cpu::MasaPlan, masa_bwd_plan, (const vitattn::cpu::MasaArgs&))
VITATTN_CPU_DECLARE(void, masa_bwd_run, (const vitattn::cpu::MasaArgs&, int64_t, int64_t, int64_t))

namespace vitattn {
namespace {

using at::Tensor;
using cpu::MasaArgs;
using cpu::MasaMode;

cpu::MasaTensor arg(const Tensor& t) {
  cpu::MasaTensor m;
  m.data = t.numel() > 0 ? t.data_ptr() : nullptr;
  for (int64_t i = 0; i < t.dim() && i < 5; ++i) m.stride[i] = t.stride(i);
  return m;
}

void check_inputs(const char* fn, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& log_gamma) {
  TORCH_CHECK(q.dim() == 5 && k.dim() == 5 && v.dim() == 5, fn,
              ": q, k and v must be 5-D (B, heads, H, W, d), got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && log_gamma.device().is_cpu(), fn,
              ": every tensor must be on the CPU");
  TORCH_CHECK(k.sizes() == q.sizes(), fn, ": k must have q's shape ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.sizes().slice(0, 4) == q.sizes().slice(0, 4), fn, ": v must have shape ", q.sizes().slice(0, 4),
              " + (dv,), got ", v.sizes());
  TORCH_CHECK(q.numel() > 0 && v.numel() > 0, fn, ": empty inputs are not supported");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, fn,
              ": q must be float16, bfloat16, float32 or float64, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, fn, ": q, k and v must share a dtype, got ", dt, ", ",
              k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK(log_gamma.dim() == 1 && log_gamma.size(0) == q.size(1), fn, ": log_gamma must have shape (heads,) = (",
              q.size(1), ",), got ", log_gamma.sizes());
  TORCH_CHECK(log_gamma.is_floating_point(), fn, ": log_gamma must be a floating tensor, got ",
              log_gamma.scalar_type());
}

void check_like(const char* fn, const char* name, const Tensor& t, at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be on the CPU");
  TORCH_CHECK(t.sizes() == shape, fn, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, fn, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

cpu::MasaDtype dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return cpu::MasaDtype::f64;
    case at::kHalf: return cpu::MasaDtype::f16;
    case at::kBFloat16: return cpu::MasaDtype::bf16;
    default: return cpu::MasaDtype::f32;
  }
}

MasaArgs base_args(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lg, double scale, MasaMode mode) {
  MasaArgs a;
  a.dtype = dtype_of(q.scalar_type());
  a.mode = mode;
  a.B = q.size(0);
  a.heads = q.size(1);
  a.H = q.size(2);
  a.W = q.size(3);
  a.d = q.size(4);
  a.dv = v.size(4);
  a.scale = scale;
  a.log_gamma = lg.data_ptr();
  a.q = arg(q);
  a.k = arg(k);
  a.v = arg(v);
  return a;
}

// Runs the call's tasks on at::parallel_for's threads, one scratch slot per thread. The
// tasks are handed out from a shared counter, so a thread that is descheduled (shared
// machines) does not hold the others back; every task writes only its own outputs, so the
// result does not depend on which thread ran it.
void run(MasaArgs& a, bool backward) {
  const cpu::MasaPlan plan =
      backward ? VITATTN_CPU_DISPATCH(masa_bwd_plan, a) : VITATTN_CPU_DISPATCH(masa_fwd_plan, a);
  const int64_t tasks = plan.tasks;
  const int64_t slots = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  const int64_t slot_bytes = (plan.scratch_bytes + 63) / 64 * 64;
  Tensor scratch = at::empty({slots * slot_bytes + 64}, at::TensorOptions().dtype(at::kByte));
  const auto addr = reinterpret_cast<uintptr_t>(scratch.data_ptr());
  a.scratch = reinterpret_cast<void*>((addr + 63) / 64 * 64);
  a.scratch_slot_bytes = slot_bytes;
  const auto body = [&](int64_t slot, int64_t begin, int64_t end) {
    if (backward)
      VITATTN_CPU_DISPATCH(masa_bwd_run, a, slot, begin, end);
    else
      VITATTN_CPU_DISPATCH(masa_fwd_run, a, slot, begin, end);
  };
  if (slots == 1) {
    body(0, 0, tasks);
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, tasks / (slots * 4));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, slots, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t slot = s0; slot < s1; ++slot) {
      for (;;) {
        const int64_t begin = next.fetch_add(chunk);
        if (begin >= tasks) break;
        body(slot, begin, std::min(tasks, begin + chunk));
      }
    }
  });
}

Tensor empty_lse(const Tensor& q) {
  return at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options().dtype(acc_dtype(q.scalar_type())));
}

Tensor out_like_v(const Tensor& q, const Tensor& v) {
  return at::empty({q.size(0), q.size(1), q.size(2), q.size(3), v.size(4)}, q.options());
}

// Full form: queries split so that every thread has a few tasks even for a few problems.
int64_t query_splits(const Tensor& q) {
  const int64_t problems = q.size(0) * q.size(1);
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  return problems >= want ? 1 : (want + problems - 1) / problems;
}

// dlog_gamma (heads,) from one partial sum per (batch, head) task, summed over the batch
// in a fixed order (deterministic).
Tensor reduce_dlog_gamma(const Tensor& parts, int64_t B, int64_t heads, at::ScalarType acc) {
  const double* p = parts.data_ptr<double>();
  Tensor out = at::empty({heads}, parts.options());
  double* o = out.data_ptr<double>();
  for (int64_t h = 0; h < heads; ++h) {
    double s = 0;
    for (int64_t b = 0; b < B; ++b) s += p[b * heads + h];
    o[h] = s;
  }
  return out.to(acc);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> masa_cpu_fwd_op(const Tensor& q, const Tensor& k, const Tensor& v,
                                                           const Tensor& log_gamma, double scale, bool decomposed) {
  const char* fn = "masa_cpu_fwd";
  check_inputs(fn, q, k, v, log_gamma);
  const Tensor lg = log_gamma.to(acc_dtype(q.scalar_type())).contiguous();
  MasaArgs a = base_args(q, k, v, lg, scale, decomposed ? MasaMode::decomposed : MasaMode::full);
  Tensor out = out_like_v(q, v);
  Tensor lse = empty_lse(q);
  Tensor v_mid, lse_w;
  if (decomposed) {
    v_mid = out_like_v(q, v);
    lse_w = empty_lse(q);
    a.v_mid = arg(v_mid);
    a.lse_w = arg(lse_w);
  } else {
    a.query_splits = query_splits(q);
  }
  a.out = arg(out);
  a.lse = arg(lse);
  run(a, /*backward=*/false);
  if (decomposed) return {out, v_mid, lse_w, lse};
  return {out, at::empty({0}, q.options()), lse, at::empty({0}, lse.options())};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> masa_cpu_bwd_op(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                           const Tensor& v, const Tensor& log_gamma, const Tensor& out,
                                                           const Tensor& v_mid, const Tensor& lse_w,
                                                           const Tensor& lse_h, double scale, bool decomposed) {
  const char* fn = "masa_cpu_bwd";
  const MasaMode mode = decomposed ? MasaMode::decomposed : MasaMode::full;
  // the lse of the pass that produced out: the grid's (full) or the H pass's (decomposed)
  const Tensor& lse = decomposed ? lse_h : lse_w;
  check_inputs(fn, q, k, v, log_gamma);
  const auto acc = acc_dtype(q.scalar_type());
  const auto lse_shape = q.sizes().slice(0, 4);
  check_like(fn, "dout", dout, v.sizes(), q.scalar_type());
  check_like(fn, "out", out, v.sizes(), q.scalar_type());
  check_like(fn, decomposed ? "lse_h" : "lse_w", lse, lse_shape, acc);
  if (mode == MasaMode::decomposed) {
    check_like(fn, "v_mid", v_mid, v.sizes(), q.scalar_type());
    check_like(fn, "lse_w", lse_w, lse_shape, acc);
  }
  const Tensor lg = log_gamma.to(acc).contiguous();
  MasaArgs a = base_args(q, k, v, lg, scale, mode);
  a.dout = arg(dout);
  a.out = arg(out);
  a.lse = arg(lse);
  if (mode == MasaMode::decomposed) {
    a.v_mid = arg(v_mid);
    a.lse_w = arg(lse_w);
  }
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  Tensor parts = at::empty({a.B * a.heads}, q.options().dtype(at::kDouble));
  a.grad_q = arg(dq);
  a.grad_k = arg(dk);
  a.grad_v = arg(dv);
  a.dlog_gamma_parts = parts.data_ptr();
  run(a, /*backward=*/true);
  return {dq, dk, dv, reduce_dlog_gamma(parts, a.B, a.heads, acc)};
}

}  // namespace vitattn

TORCH_LIBRARY_FRAGMENT(vitattn_C, m) {
  m.def(
      "masa_cpu_fwd(Tensor q, Tensor k, Tensor v, Tensor log_gamma, float scale, bool decomposed) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "masa_cpu_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor log_gamma, Tensor out, Tensor v_mid, "
      "Tensor lse_w, Tensor lse_h, float scale, bool decomposed) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vitattn_C, CPU, m) {
  m.impl("masa_cpu_fwd", &vitattn::masa_cpu_fwd_op);
  m.impl("masa_cpu_bwd", &vitattn::masa_cpu_bwd_op);
}
