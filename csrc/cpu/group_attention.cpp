// SReT group / permuted attention, C++ CPU backend, torch side: argument checks, output
// allocation and the run-time choice of the kernel build (isa.h). The kernels
// (group_attention_kernels.cpp) read q, k, v through any strides and through perm, so nothing
// is copied or permuted here. Registered as torch.ops.vitattn_C.group_attention_cpu_fwd/_bwd.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "group_attention.h"
#include "torch_args.h"

namespace vitattn {
namespace {

using at::Tensor;
using cpu::GroupAttentionArgs;
using cpu::GroupTensor;

GroupTensor view_of(const Tensor& t) {
  GroupTensor g;
  g.data = t.data_ptr();
  g.sb = t.stride(0), g.sh = t.stride(1), g.sn = t.stride(2);
  g.sf = t.dim() > 3 ? t.stride(3) : 0;
  return g;
}

void check_floating(const char* fn, const char* name, const Tensor& t, int64_t dim) {
  TORCH_CHECK_VALUE(t.defined(), fn, ": ", name, " must be a defined tensor");
  TORCH_CHECK_VALUE(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.dim() == dim, fn, ": ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, fn, ": ", name,
                   " must be float16, bfloat16, float32 or float64, got ", s);
}

void check_same(const char* fn, const char* name, const Tensor& t, const Tensor& q) {
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), fn, ": ", name, " has dtype ", t.scalar_type(),
                   " but q has ", q.scalar_type(), "; they must match");
}

// perm: None, or an int64 CPU permutation of range(N) (checked: the kernels index with it).
// Returns the data pointer of a contiguous copy kept alive by `keep`.
const int64_t* check_perm(const char* fn, const std::optional<Tensor>& perm, int64_t N, Tensor& keep) {
  if (!perm.has_value() || !perm->defined()) return nullptr;
  const Tensor& p = *perm;
  TORCH_CHECK_TYPE(p.scalar_type() == at::kLong, fn, ": perm must be an int64 tensor, got ", p.scalar_type());
  TORCH_CHECK_VALUE(p.device().is_cpu(), fn, ": perm must be a CPU tensor, got device ", p.device());
  TORCH_CHECK_VALUE(p.dim() == 1 && p.size(0) == N, fn, ": perm must have shape (", N, ",) to match the ", N,
                    " tokens, got ", p.sizes());
  keep = p.contiguous();
  const int64_t* idx = keep.data_ptr<int64_t>();
  std::vector<char> seen(N, 0);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t t = idx[i];
    TORCH_CHECK_VALUE(t >= 0 && t < N && !seen[t], fn, ": perm must be a permutation of range(", N,
                      ") (every index exactly once); entry ", i, " is ", t);
    seen[t] = 1;
  }
  return idx;
}

GroupAttentionArgs make_args(const char* fn, const Tensor& q, const Tensor& k, const Tensor& v,
                             const std::optional<Tensor>& perm, int64_t groups, double scale, Tensor& perm_keep) {
  check_floating(fn, "q", q, 4);
  check_floating(fn, "k", k, 4);
  check_floating(fn, "v", v, 4);
  check_same(fn, "k", k, q);
  check_same(fn, "v", v, q);
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), fn, ": k must have q's shape (B, heads, N, d) ", q.sizes(), ", got ",
                    k.sizes());
  TORCH_CHECK_VALUE(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2), fn,
                    ": v must have shape (B, heads, N, dv) with q's (B, heads, N) ", q.sizes().slice(0, 3),
                    ", got ", v.sizes());
  TORCH_CHECK_VALUE(groups >= 1, fn, ": groups must be >= 1, got ", groups);
  const int64_t N = q.size(2);
  TORCH_CHECK_VALUE(N % groups == 0, fn, ": groups must divide the number of tokens N=", N, ", got groups=", groups);
  TORCH_CHECK_VALUE(std::isfinite(scale), fn, ": scale must be finite, got ", scale);
  GroupAttentionArgs a;
  a.B = q.size(0), a.heads = q.size(1), a.N = N, a.groups = groups, a.n = N / groups;
  a.d = q.size(3), a.dv = v.size(3);
  a.dtype = q.scalar_type();
  a.scale = scale;
  a.perm = check_perm(fn, perm, N, perm_keep);
  a.q = view_of(q), a.k = view_of(k), a.v = view_of(v);
  return a;
}

bool empty_problem(const GroupAttentionArgs& a) { return a.B == 0 || a.heads == 0 || a.N == 0; }

std::tuple<Tensor, Tensor> group_attention_cpu_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                   const std::optional<Tensor>& perm, int64_t groups, double scale) {
  const char* fn = "group_attention_cpu_fwd";
  Tensor perm_keep;
  GroupAttentionArgs a = make_args(fn, q, k, v, perm, groups, scale, perm_keep);
  Tensor out = at::empty({a.B, a.heads, a.N, a.dv}, q.options());
  Tensor lse = at::empty({a.B, a.heads, a.N}, q.options().dtype(acc_dtype(a.dtype)));
  if (empty_problem(a)) return {out, lse};
  a.out = out.data_ptr();
  a.lse = lse.data_ptr();
  TORCH_CHECK(VITATTN_CPU_DISPATCH(group_attention_fwd_kernel, a), fn, ": unsupported dtype ", a.dtype);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> group_attention_cpu_bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                           const Tensor& v, const Tensor& out, const Tensor& lse,
                                                           const std::optional<Tensor>& perm, int64_t groups,
                                                           double scale) {
  const char* fn = "group_attention_cpu_bwd";
  Tensor perm_keep;
  GroupAttentionArgs a = make_args(fn, q, k, v, perm, groups, scale, perm_keep);
  for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"dout", dout}, {"out", out}}) {
    check_floating(fn, name, t, 4);
    check_same(fn, name, t, q);
    TORCH_CHECK_VALUE(t.sizes() == v.sizes(), fn, ": ", name, " must have v's shape (B, heads, N, dv) ", v.sizes(),
                      ", got ", t.sizes());
  }
  TORCH_CHECK_VALUE(lse.defined() && lse.device().is_cpu(), fn, ": lse must be a CPU tensor");
  TORCH_CHECK_TYPE(lse.scalar_type() == acc_dtype(a.dtype), fn, ": lse must have dtype ", acc_dtype(a.dtype),
                   " for ", a.dtype, " inputs, got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == a.B && lse.size(1) == a.heads && lse.size(2) == a.N, fn,
                    ": lse must have shape (B, heads, N) = (", a.B, ", ", a.heads, ", ", a.N, "), got ", lse.sizes());
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  if (empty_problem(a)) return {dq, dk, dv};
  a.dout = view_of(dout), a.out_in = view_of(out), a.lse_in = view_of(lse);
  a.dq = dq.data_ptr(), a.dk = dk.data_ptr(), a.dv_out = dv.data_ptr();
  TORCH_CHECK(VITATTN_CPU_DISPATCH(group_attention_bwd_kernel, a), fn, ": unsupported dtype ", a.dtype);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace vitattn

TORCH_LIBRARY_FRAGMENT(vitattn_C, m) {
  m.def("group_attention_cpu_fwd(Tensor q, Tensor k, Tensor v, Tensor? perm, int groups, float scale) "
        "-> (Tensor, Tensor)");
  m.def("group_attention_cpu_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? perm, "
        "int groups, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vitattn_C, CPU, m) {
  m.impl("group_attention_cpu_fwd", &vitattn::group_attention_cpu_fwd);
  m.impl("group_attention_cpu_bwd", &vitattn::group_attention_cpu_bwd);
}
