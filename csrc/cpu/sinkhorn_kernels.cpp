// Sinkhorn / optimal-transport CPU kernels (compiled once per instruction set, see isa.h).
//
// Every problem (one (batch, head) pair, or one leading index of a scores tensor) runs the
// fixed-count loop of the reference from zero potentials:
//     f_t = log a - LSE_j(K + g_{t-1}),   g_t = log b - LSE_i(K + f_t),   K = S / eps,
// and returns exp(K + f_T + g_T); the backward is the exact gradient of those unrolled
// iterations. Both run in the stabilised scaling form instead of the log domain:
//
// Forward. M = exp(K + alpha 1^T + 1 beta^T) is held in a workspace, with alpha, beta
// "absorbed" log potentials, and the iterations run on the scalings u = exp(f - alpha),
// v = exp(g - beta): a row update is r = M v, f = log a + alpha - log r; a column update is
// c = M^T u, g = log b + beta - log c, two matrix-vector products (one pass over M, the
// row update of row i feeding its column contribution at once) instead of 2 n m
// exponentials. Absorption is per row and per column: whenever |log u_i| (|log v_j|)
// exceeds tau, alpha_i (beta_j) takes the potential, the scaling returns to 1 and that row
// (column) of M is recomputed from K. Exactness: exp() flushes results below the smallest
// normal number to 0, so an entry of M is either accurate or tiny; with every scaling
// below e^tau, the mass such entries lose in r_i is below m * tiny * e^tau. A product whose
// value is not at least 16/ulp times that bound (or is not finite) is not trusted: that
// row's (column's) potential is recomputed exactly in the log domain, as the reference
// does, and absorbed. With |K| ~ 1e4 (eps = 1e-3) that is every row and column in every
// iteration: the loop then degrades to the log domain, never to a wrong answer.
//
// Backward. Recompute f_T exactly and M = C_T = exp(K + f_T + g_T - log b) (the last
// column-softmax, entries in [0, 1]). Every intermediate softmax of the unrolled loop is M
// rescaled by row and column factors:
//     C_t = diag(exp(f_t - f_T)) M diag(exp(g_t - g_T)),
//     R_t = diag(1 / r_t) M diag(q_t),   q_t = exp(g_{t-1} - g_T + log b),   r_t = M q_t,
// and f_t = log a + f_T - log r_t. The reverse sweep of the loop (see
// vitattn/torch_backend/sinkhorn.py) then needs per iteration one pass over M with two dot
// products and one axpy per row, and the gradient of K collapses to
//     dK = W - M o (A B^T),   A (n x 2T), B (m x 2T) the stacked factors,
// one GEMM. The factors are trusted when, per iteration, the largest row factor times the
// largest column factor stays below e^Bnd with Bnd = log(ulp / (16 max(n, m) tiny)): then
// the contributions lost to flushed entries of M are below ulp / 16 of the result's scale.
// Otherwise (tiny eps, potentials far from their final values) the problem reruns the
// backward in the log domain, two exponentials per entry per iteration.
//
// Layout and determinism: rows are processed in fixed blocks of kBlockRows; every column
// reduction (column sums, T^T v, dS^T x) is one partial per block, summed in block order.
// Blocks run on one thread per problem, or in parallel (at::parallel_for) when there are
// fewer problems than threads; both give bitwise the same result. GEMMs run inside
// the thread that owns the block (common/tile_gemm.h), in a fixed order.
#include "sinkhorn.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/parallel.h"
#include "common/tile_gemm.h"
#include "common/vec_ops.h"

namespace vitattn::cpu::CPU_CAPABILITY {
namespace {

using namespace vec_ops;

constexpr int64_t kBlockRows = 128;

// absorption threshold on |log u|, |log v|
template <typename T>
constexpr T kTau = sizeof(T) == 4 ? T(16) : T(64);

int64_t round_up(int64_t x, int64_t k) { return (x + k - 1) / k * k; }

// ---------------------------------------------------------------- workspace

// Carves 64-byte aligned buffers out of one allocation (counts the bytes when base is null).
struct Carver {
  char* base = nullptr;
  size_t off = 0;
  template <typename U>
  U* take(int64_t count) {
    U* p = base ? reinterpret_cast<U*>(base + off) : nullptr;
    off += static_cast<size_t>(round_up(std::max<int64_t>(count, 1) * static_cast<int64_t>(sizeof(U)), 64));
    return p;
  }
};

struct Dims {
  int64_t n = 0, m = 0, ld = 0, iters = 0, nblk = 0;
  int64_t mL = 0;         // m rounded up to the vector width: the GEMM width of an n x m tile
  int64_t d = 0, dv = 0;  // feature dims (ot), 0 for sinkhorn
  int64_t dp = 0, dvp = 0, fp = 0;  // d, dv rounded up to the vector width; fp = max(dp, dvp)
  bool backward = false;
  int64_t rows0(int64_t b) const { return b * kBlockRows; }
  int64_t rows1(int64_t b) const { return std::min(n, (b + 1) * kBlockRows); }
};

// One problem's working set.
template <typename T>
struct Slot {
  T *K, *M;                         // n x ld
  T *alpha, *f, *u, *la;            // n
  T *beta, *g, *v, *lb, *c, *cmax;  // m
  unsigned char* bad;               // m
  T* part;                          // nblk x ld: per-block column partials
  T* part2;                         // nblk x ld
  // ot: GEMM operands padded to whole vectors (common/tile_gemm.h), padding zeroed
  T* agg;                           // nblk x m x fp: per-block T^T v, T^T dout, dS^T x
  T* zeta;                          // m x dvp: T^T v (backward: dzeta)
  T* zeta2;                         // m x dvp (backward: dout of ot_aggregate)
  T* refT;                          // d x ld: ref^T / eps
  T* refP;                          // m x dp: ref (backward)
  T *zetaT, *dzetaT;                // dv x ld: (n/m) zeta^T (or dout^T), dzeta^T (backward)
  T *A, *Bf;                        // n x 2T, 2T x ld (backward factors)
  T *roww, *dla;                    // n (backward)
  T *colw, *dg, *dlb, *q, *yd;      // m (backward)
  T* F;                             // iters x n (backward in the log domain)
  T* scratch;                       // nscratch x (2 x kBlockRows x ld + 2 x kBlockRows x fp)
  int64_t nscratch = 1;
};

template <typename T>
Slot<T> carve(Carver& cv, const Dims& D, int64_t nscratch) {
  Slot<T> s;
  const int64_t n = D.n, m = D.m, ld = D.ld, T2 = 2 * D.iters;
  s.K = cv.take<T>(n * ld);
  s.M = cv.take<T>(n * ld);
  s.alpha = cv.take<T>(n);
  s.f = cv.take<T>(n);
  s.u = cv.take<T>(n);
  s.la = cv.take<T>(n);
  s.beta = cv.take<T>(m);
  s.g = cv.take<T>(m);
  s.v = cv.take<T>(m);
  s.lb = cv.take<T>(m);
  s.c = cv.take<T>(m);
  s.cmax = cv.take<T>(m);
  s.bad = cv.take<unsigned char>(m);
  s.part = cv.take<T>(D.nblk * ld);
  s.part2 = cv.take<T>(D.nblk * ld);
  const bool ot = D.fp > 0;
  s.agg = ot ? cv.take<T>(D.nblk * m * D.fp) : nullptr;
  s.zeta = ot ? cv.take<T>(m * D.dvp) : nullptr;
  s.zeta2 = ot && D.backward ? cv.take<T>(m * D.dvp) : nullptr;
  s.refT = ot ? cv.take<T>(D.d * ld) : nullptr;
  s.refP = ot && D.backward ? cv.take<T>(m * D.dp) : nullptr;
  s.zetaT = ot && D.backward ? cv.take<T>(D.dv * ld) : nullptr;
  s.dzetaT = ot && D.backward ? cv.take<T>(D.dv * ld) : nullptr;
  if (D.backward) {
    s.A = cv.take<T>(n * T2);
    s.Bf = cv.take<T>(T2 * ld);
    s.roww = cv.take<T>(n);
    s.dla = cv.take<T>(n);
    s.colw = cv.take<T>(m);
    s.dg = cv.take<T>(m);
    s.dlb = cv.take<T>(m);
    s.q = cv.take<T>(m);
    s.yd = cv.take<T>(m);
    s.F = cv.take<T>(D.iters * n);
  } else {
    s.A = s.Bf = s.roww = s.dla = s.colw = s.dg = s.dlb = s.q = s.yd = s.F = nullptr;
  }
  s.scratch = cv.take<T>(nscratch * kBlockRows * 2 * (ld + D.fp));
  s.nscratch = nscratch;
  return s;
}

// Workspaces for Z problems: one per thread when problems run in parallel, or one (with a
// scratch tile per thread) when the row blocks of each problem do.
template <typename T>
struct Workspace {
  c10::DataPtr mem;
  std::vector<Slot<T>> slots;
  bool rows_parallel = false;

  Workspace(int64_t Z, const Dims& D) {
    // called from inside someone's parallel region: at::parallel_for runs inline there
    const int64_t nt = at::in_parallel_region() ? 1 : std::max<int64_t>(1, at::get_num_threads());
    rows_parallel = Z < nt && D.nblk > 1;
    const int64_t nslots = rows_parallel ? 1 : std::min(nt, Z);
    const int64_t nscratch = rows_parallel ? nt : 1;
    Carver count;
    carve<T>(count, D, nscratch);
    const size_t bytes = count.off;
    mem = c10::GetCPUAllocator()->allocate(bytes * static_cast<size_t>(nslots));
    // torch.use_deterministic_algorithms(True) fills fresh tensors with NaN: the workspace too,
    // so that a read of anything never written shows in the results (tests rely on it)
    if (at::globalContext().deterministicAlgorithms() && at::globalContext().deterministicFillUninitializedMemory())
      std::fill_n(static_cast<T*>(mem.get()), bytes * static_cast<size_t>(nslots) / sizeof(T),
                  std::numeric_limits<T>::quiet_NaN());
    for (int64_t k = 0; k < nslots; ++k) {
      Carver cv{static_cast<char*>(mem.get()) + static_cast<size_t>(k) * bytes};
      slots.push_back(carve<T>(cv, D, nscratch));
    }
  }

  // fn(z, slot, rows_parallel) for every problem z
  template <typename Fn>
  void run(int64_t Z, const Fn& fn) {
    if (rows_parallel || slots.size() == 1) {
      for (int64_t z = 0; z < Z; ++z) fn(z, slots[0], rows_parallel);
      return;
    }
    parallel_tasks(Z, [&](int64_t b, int64_t e) {
      const int64_t tid = at::get_thread_num();
      TORCH_INTERNAL_ASSERT(tid >= 0 && tid < static_cast<int64_t>(slots.size()));
      for (int64_t z = b; z < e; ++z) fn(z, slots[tid], false);
    });
  }
};

// One problem in one slot: block loops and per-problem vectors.
template <typename T>
struct Ctx {
  const Dims& D;
  Slot<T>& s;
  bool par;  // blocks in parallel
  T eps;

  template <typename Fn>
  void blocks(const Fn& fn) const {
    if (par && D.nblk > 1) {
      parallel_tasks(
          D.nblk, [&](int64_t b, int64_t e) {
            for (int64_t k = b; k < e; ++k) fn(k);
          },
          1);
    } else {
      for (int64_t k = 0; k < D.nblk; ++k) fn(k);
    }
  }
  int64_t tid() const { return par ? at::get_thread_num() : 0; }
  // this thread's scratch: tiles 0, 1 of kBlockRows x ld, tiles 2, 3 of kBlockRows x fp
  T* tile(int64_t which) const {
    T* base = s.scratch + tid() * kBlockRows * 2 * (D.ld + D.fp);
    return which < 2 ? base + which * kBlockRows * D.ld : base + 2 * kBlockRows * D.ld + (which - 2) * kBlockRows * D.fp;
  }

  // dst (len) = sum over blocks of src[b * stride ...], in block order
  void sum_blocks(const T* src, int64_t stride, T* dst, int64_t len) const {
    std::memcpy(dst, src, sizeof(T) * len);
    for (int64_t b = 1; b < D.nblk; ++b) add_to(src + b * stride, dst, len);
  }
};

// ---------------------------------------------------------------- small row helpers

// sum_j x[j]
template <typename T>
T reduce_sum(const T* x, int64_t len) {
  constexpr int64_t L = Vec<T>::size();
  Vec<T> acc(T(0));
  for (int64_t j = 0; j < len; j += L) acc = acc + Vec<T>::loadu(x + j, std::min<int64_t>(L, len - j));
  return hsum<T>(acc);
}

// out[k] = sum_j M[k * ld + j] v[j] for k < cnt (rows of M), four rows per pass over v
template <typename T>
inline void dots(const T* M, int64_t ld, int64_t cnt, const T* v, int64_t len, T* out) {
  constexpr int64_t L = Vec<T>::size();
  int64_t k = 0;
  for (; k + 4 <= cnt; k += 4) {
    const T *m0 = M + k * ld, *m1 = m0 + ld, *m2 = m1 + ld, *m3 = m2 + ld;
    Vec<T> a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
    for (int64_t j = 0; j < len; j += L) {
      const int64_t c = std::min<int64_t>(L, len - j);
      const Vec<T> vv = Vec<T>::loadu(v + j, c);
      a0 = at::vec::fmadd(Vec<T>::loadu(m0 + j, c), vv, a0);
      a1 = at::vec::fmadd(Vec<T>::loadu(m1 + j, c), vv, a1);
      a2 = at::vec::fmadd(Vec<T>::loadu(m2 + j, c), vv, a2);
      a3 = at::vec::fmadd(Vec<T>::loadu(m3 + j, c), vv, a3);
    }
    out[k] = hsum<T>(a0);
    out[k + 1] = hsum<T>(a1);
    out[k + 2] = hsum<T>(a2);
    out[k + 3] = hsum<T>(a3);
  }
  for (; k < cnt; ++k) {
    const T* mk = M + k * ld;
    Vec<T> a0(T(0));
    for (int64_t j = 0; j < len; j += L) {
      const int64_t c = std::min<int64_t>(L, len - j);
      a0 = at::vec::fmadd(Vec<T>::loadu(mk + j, c), Vec<T>::loadu(v + j, c), a0);
    }
    out[k] = hsum<T>(a0);
  }
}

// out_b[k] = sum_j M[k * ld + j] b[j], out_c[k] = sum_j M[k * ld + j] c[j] for k < cnt
template <typename T>
inline void dots2(const T* M, int64_t ld, int64_t cnt, const T* b, const T* c, int64_t len, T* out_b, T* out_c) {
  constexpr int64_t L = Vec<T>::size();
  int64_t k = 0;
  for (; k + 4 <= cnt; k += 4) {
    const T *m0 = M + k * ld, *m1 = m0 + ld, *m2 = m1 + ld, *m3 = m2 + ld;
    Vec<T> b0(T(0)), b1(T(0)), b2(T(0)), b3(T(0)), c0(T(0)), c1(T(0)), c2(T(0)), c3(T(0));
    for (int64_t j = 0; j < len; j += L) {
      const int64_t w = std::min<int64_t>(L, len - j);
      const Vec<T> vb = Vec<T>::loadu(b + j, w), vc = Vec<T>::loadu(c + j, w);
      const Vec<T> x0 = Vec<T>::loadu(m0 + j, w), x1 = Vec<T>::loadu(m1 + j, w);
      const Vec<T> x2 = Vec<T>::loadu(m2 + j, w), x3 = Vec<T>::loadu(m3 + j, w);
      b0 = at::vec::fmadd(x0, vb, b0);
      c0 = at::vec::fmadd(x0, vc, c0);
      b1 = at::vec::fmadd(x1, vb, b1);
      c1 = at::vec::fmadd(x1, vc, c1);
      b2 = at::vec::fmadd(x2, vb, b2);
      c2 = at::vec::fmadd(x2, vc, c2);
      b3 = at::vec::fmadd(x3, vb, b3);
      c3 = at::vec::fmadd(x3, vc, c3);
    }
    out_b[k] = hsum<T>(b0), out_b[k + 1] = hsum<T>(b1), out_b[k + 2] = hsum<T>(b2), out_b[k + 3] = hsum<T>(b3);
    out_c[k] = hsum<T>(c0), out_c[k + 1] = hsum<T>(c1), out_c[k + 2] = hsum<T>(c2), out_c[k + 3] = hsum<T>(c3);
  }
  for (; k < cnt; ++k) {
    dots(M + k * ld, ld, 1, b, len, out_b + k);
    dots(M + k * ld, ld, 1, c, len, out_c + k);
  }
}

// y[j] += sum_k a[k] M[k * ld + j] over k < cnt, k in order (the same rounding as one axpy
// per row), loading and storing y once per four rows
template <typename T>
inline void axpys(const T* a, const T* M, int64_t ld, int64_t cnt, T* y, int64_t len) {
  constexpr int64_t L = Vec<T>::size();
  int64_t k = 0;
  for (; k + 4 <= cnt; k += 4) {
    const T *m0 = M + k * ld, *m1 = m0 + ld, *m2 = m1 + ld, *m3 = m2 + ld;
    const Vec<T> s0(a[k]), s1(a[k + 1]), s2(a[k + 2]), s3(a[k + 3]);
    for (int64_t j = 0; j < len; j += L) {
      const int64_t c = std::min<int64_t>(L, len - j);
      Vec<T> acc = Vec<T>::loadu(y + j, c);
      acc = at::vec::fmadd(s0, Vec<T>::loadu(m0 + j, c), acc);
      acc = at::vec::fmadd(s1, Vec<T>::loadu(m1 + j, c), acc);
      acc = at::vec::fmadd(s2, Vec<T>::loadu(m2 + j, c), acc);
      acc = at::vec::fmadd(s3, Vec<T>::loadu(m3 + j, c), acc);
      acc.store(y + j, c);
    }
  }
  for (; k < cnt; ++k) axpy(a[k], M + k * ld, y, len);
}

// acc[j] = max(acc[j], k[j] + s)
template <typename T>
inline void max_into(T* acc, const T* k, T s, int64_t len) {
  constexpr int64_t L = Vec<T>::size();
  const Vec<T> vs(s);
  for (int64_t j = 0; j < len; j += L) {
    const int64_t c = std::min<int64_t>(L, len - j);
    at::vec::maximum(Vec<T>::loadu(acc + j, c), Vec<T>::loadu(k + j, c) + vs).store(acc + j, c);
  }
}

// acc[j] += exp(k[j] + s - mx[j])
template <typename T>
inline void exp_sum_into(T* acc, const T* k, T s, const T* mx, int64_t len) {
  constexpr int64_t L = Vec<T>::size();
  const Vec<T> vs(s);
  for (int64_t j = 0; j < len; j += L) {
    const int64_t c = std::min<int64_t>(L, len - j);
    const Vec<T> e = vexp(Vec<T>::loadu(k + j, c) + vs - Vec<T>::loadu(mx + j, c));
    (Vec<T>::loadu(acc + j, c) + e).store(acc + j, c);
  }
}

// x[j] *= y[j]
template <typename T>
inline void mul_into(T* x, const T* y, int64_t len) {
  constexpr int64_t L = Vec<T>::size();
  for (int64_t j = 0; j < len; j += L) {
    const int64_t c = std::min<int64_t>(L, len - j);
    (Vec<T>::loadu(x + j, c) * Vec<T>::loadu(y + j, c)).store(x + j, c);
  }
}

// x[j] *= s
template <typename T>
inline void scale_into(T* x, T s, int64_t len) {
  constexpr int64_t L = Vec<T>::size();
  const Vec<T> vs(s);
  for (int64_t j = 0; j < len; j += L) {
    const int64_t c = std::min<int64_t>(L, len - j);
    (Vec<T>::loadu(x + j, c) * vs).store(x + j, c);
  }
}

// Log-domain reverse step on one row: with e_j = exp(k[j] + s + beta[j]),
// dk[j] -= e_j w[j]; returns sum_j e_j w[j].
template <typename T>
inline T exp_dot_sub(const T* k, T s, const T* beta, const T* w, T* dk, int64_t len) {
  constexpr int64_t L = Vec<T>::size();
  const Vec<T> vs(s);
  Vec<T> acc(T(0));
  for (int64_t j = 0; j < len; j += L) {
    const int64_t c = std::min<int64_t>(L, len - j);
    const Vec<T> e = vexp(Vec<T>::loadu(k + j, c) + vs + Vec<T>::loadu(beta + j, c));
    const Vec<T> ew = e * Vec<T>::loadu(w + j, c);  // masked lanes: w loads as 0
    (Vec<T>::loadu(dk + j, c) - ew).store(dk + j, c);
    acc = acc + ew;
  }
  return hsum<T>(acc);
}

// With e_j = exp((k[j] + beta[j]) + s): dk[j] -= e_j w; h[j] += e_j w.
template <typename T>
inline void exp_axpy_sub(const T* k, T s, const T* beta, T w, T* dk, T* h, int64_t len) {
  constexpr int64_t L = Vec<T>::size();
  const Vec<T> vs(s), vw(w);
  for (int64_t j = 0; j < len; j += L) {
    const int64_t c = std::min<int64_t>(L, len - j);
    const Vec<T> ew = vexp(Vec<T>::loadu(k + j, c) + Vec<T>::loadu(beta + j, c) + vs) * vw;
    (Vec<T>::loadu(dk + j, c) - ew).store(dk + j, c);
    (Vec<T>::loadu(h + j, c) + ew).store(h + j, c);
  }
}

template <typename IO, typename T>
inline void load_scaled(const IO* src, T* dst, T scale, int64_t len) {
  for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<T>(src[j]) * scale;
}

template <typename T, typename IO>
inline void store_scaled(const T* src, IO* dst, T scale, int64_t len) {
  for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<IO>(src[j] * scale);
}

template <typename T>
inline T thresholds_bound(int64_t n, int64_t m) {
  // log(ulp / (16 max(n, m) tiny)): see the backward note at the top
  const T tiny = std::numeric_limits<T>::min(), ulp = std::numeric_limits<T>::epsilon();
  return std::log(ulp / (T(16) * T(std::max(n, m)) * tiny));
}

// ---------------------------------------------------------------- forward iterations

// g_j = lb_j - LSE_i(K_ij + f_i) for every column j with bad[j], in the log domain.
template <typename T>
void exact_columns(const Ctx<T>& C) {
  Slot<T>& s = C.s;
  const int64_t m = C.D.m, ld = C.D.ld;
  const T ninf = -std::numeric_limits<T>::infinity();
  C.blocks([&](int64_t b) {
    T* pm = s.part + b * ld;
    std::fill(pm, pm + m, ninf);
    for (int64_t i = C.D.rows0(b); i < C.D.rows1(b); ++i) max_into(pm, s.K + i * ld, s.f[i], m);
  });
  std::copy(s.part, s.part + m, s.cmax);
  for (int64_t b = 1; b < C.D.nblk; ++b)
    for (int64_t j = 0; j < m; ++j) s.cmax[j] = std::max(s.cmax[j], s.part[b * ld + j]);
  C.blocks([&](int64_t b) {
    T* ps = s.part2 + b * ld;
    std::fill(ps, ps + m, T(0));
    for (int64_t i = C.D.rows0(b); i < C.D.rows1(b); ++i) exp_sum_into(ps, s.K + i * ld, s.f[i], s.cmax, m);
  });
  C.sum_blocks(s.part2, ld, s.c, m);
  for (int64_t j = 0; j < m; ++j)
    if (s.bad[j]) s.g[j] = s.lb[j] - (s.cmax[j] + std::log(s.c[j]));
}

// Runs the iterations on K (s.K) with log marginals s.la, s.lb; writes G (iters x m) and
// leaves f_T in s.f and g_T in s.g.
template <typename T>
void iterate(const Ctx<T>& C, T* G) {
  Slot<T>& s = C.s;
  const Dims& D = C.D;
  const int64_t n = D.n, m = D.m, ld = D.ld;
  const T tau = kTau<T>;
  const T tiny = std::numeric_limits<T>::min(), big = std::numeric_limits<T>::max();
  const T ulp = std::numeric_limits<T>::epsilon();
  const T lo_row = T(m) * tiny * std::exp(tau) * T(16) / ulp;
  const T lo_col = T(n) * tiny * std::exp(tau) * T(16) / ulp;
  std::fill(s.beta, s.beta + m, T(0));
  std::fill(s.g, s.g + m, T(0));
  std::fill(s.v, s.v + m, T(1));
  bool refresh = true;  // recompute M from K before the next use (start, column absorption)
  for (int64_t t = 0; t < D.iters; ++t) {
    const bool first = t == 0;
    C.blocks([&](int64_t b) {
      T* cp = s.part + b * ld;
      std::fill(cp, cp + m, T(0));
      // rows in groups of one vector: their logs and exps in one vector call each
      constexpr int64_t GL = Vec<T>::size();
      alignas(64) T r[GL], lr[GL], u[GL];
      for (int64_t i0 = D.rows0(b); i0 < D.rows1(b); i0 += GL) {
        const int64_t cnt = std::min<int64_t>(GL, D.rows1(b) - i0);
        for (int64_t k = 0; k < cnt; ++k) {
          const int64_t i = i0 + k;
          const T* Ki = s.K + i * ld;
          // first row update: alpha_i = -max_j K_ij, so r_i = sum_j exp(K_ij - max) in [1, m]
          if (first) s.alpha[i] = -max_of_sum(Ki, s.beta, m);
          if (refresh) exp_row(Ki, s.alpha[i], s.beta, s.M + i * ld, m);
        }
        dots(s.M + i0 * ld, ld, cnt, s.v, m, r);
        for (int64_t k = cnt; k < GL; ++k) r[k] = T(1);
        Vec<T>::loadu(r).log().store(lr);
        // f = log a + alpha - log r, and log u = f - alpha taken from the rounded f, so that
        // u scales M exactly as f says (at |K| ~ 1e4, f and log a - log r differ by ulp(f))
        for (int64_t k = 0; k < GL; ++k) {
          if (k < cnt) {
            const int64_t i = i0 + k;
            s.f[i] = (s.la[i] + s.alpha[i]) - lr[k];
            u[k] = s.f[i] - s.alpha[i];
          } else {
            u[k] = T(0);
          }
        }
        Vec<T>::loadu(u).exp().store(u);
        for (int64_t k = 0; k < cnt; ++k) {
          const int64_t i = i0 + k;
          const T* Ki = s.K + i * ld;
          if (r[k] >= lo_row && r[k] <= big) {
            if (std::abs(s.f[i] - s.alpha[i]) <= tau) {
              s.u[i] = u[k];
              continue;
            }
          } else {
            s.f[i] = s.la[i] - logsumexp_of_sum(Ki, s.g, m);  // not trusted: exact, log domain
          }
          s.alpha[i] = s.f[i];  // absorb
          exp_row(Ki, s.f[i], s.beta, s.M + i * ld, m);
          s.u[i] = T(1);
        }
        axpys(s.u + i0, s.M + i0 * ld, ld, cnt, cp, m);
      }
    });
    C.sum_blocks(s.part, ld, s.c, m);
    bool any_bad = false;
    for (int64_t j = 0; j < m; ++j) {
      const T c = s.c[j];
      s.bad[j] = !(c >= lo_col && c <= big);
      if (s.bad[j]) {
        any_bad = true;
      } else {
        s.g[j] = s.lb[j] + s.beta[j] - std::log(c);
      }
    }
    if (any_bad) exact_columns(C);
    refresh = false;
    for (int64_t j = 0; j < m; ++j) {
      const T lv = s.g[j] - s.beta[j];
      if (s.bad[j] || std::abs(lv) > tau) {
        s.beta[j] = s.g[j];
        s.v[j] = T(1);
        refresh = true;
      } else {
        s.v[j] = std::exp(lv);
      }
    }
    std::copy(s.g, s.g + m, G + t * m);
  }
}

// ---------------------------------------------------------------- backward

// f_T (exact, log domain) into s.f and M = C_T = exp(K + f_T + g_T - lb) into s.M.
template <typename T>
void backward_start(const Ctx<T>& C, const T* G) {
  Slot<T>& s = C.s;
  const Dims& D = C.D;
  const int64_t m = D.m, ld = D.ld, iters = D.iters;
  const T* gT = G + (iters - 1) * m;
  // g_{T-1} (zeros before the first iteration) in s.g; g_T - lb in s.beta
  if (iters >= 2)
    std::copy(G + (iters - 2) * m, G + (iters - 1) * m, s.g);
  else
    std::fill(s.g, s.g + m, T(0));
  for (int64_t j = 0; j < m; ++j) s.beta[j] = gT[j] - s.lb[j];
  C.blocks([&](int64_t b) {
    for (int64_t i = D.rows0(b); i < D.rows1(b); ++i) {
      const T* Ki = s.K + i * ld;
      s.f[i] = s.la[i] - logsumexp_of_sum(Ki, s.g, m);
      exp_row(Ki, s.f[i], s.beta, s.M + i * ld, m);
    }
  });
}

// Reverse sweep in the scaling form (see the top). Needs s.M = C_T, s.f = f_T, W in s.K,
// s.roww = row sums of W, s.colw = column sums of W. On success fills s.A, s.Bf, s.dla,
// s.dlb and returns true; returns false when the factors leave the trusted range.
template <typename T>
bool reverse_scaled(const Ctx<T>& C, const T* G) {
  Slot<T>& s = C.s;
  const Dims& D = C.D;
  const int64_t m = D.m, ld = D.ld, iters = D.iters, T2 = 2 * iters;
  const T bound = thresholds_bound<T>(D.n, D.m);
  const T big = std::numeric_limits<T>::max();
  const T* gT = G + (iters - 1) * m;
  std::copy(s.colw, s.colw + m, s.dg);
  std::fill(s.dla, s.dla + D.n, T(0));
  std::fill(s.dlb, s.dlb + m, T(0));
  for (int64_t r = 0; r < T2; ++r) std::fill(s.Bf + r * ld + m, s.Bf + r * ld + D.mL, T(0));
  std::vector<unsigned char> fail(static_cast<size_t>(D.nblk));
  for (int64_t k = 0; k < iters; ++k) {
    const int64_t t = iters - k;  // 1-based iteration being reversed
    const T* gt = G + (t - 1) * m;
    const T* gp = t >= 2 ? G + (t - 2) * m : nullptr;
    T ly_max = 0, lq_max = 0;
    for (int64_t j = 0; j < m; ++j) {
      const T ly = gt[j] - gT[j];
      const T lq = (gp ? gp[j] : T(0)) - gT[j] + s.lb[j];
      ly_max = std::max(ly_max, ly);
      lq_max = std::max(lq_max, lq);
      s.yd[j] = std::exp(ly) * s.dg[j];
      s.q[j] = std::exp(lq);
      s.dlb[j] += s.dg[j];
      s.Bf[(2 * k) * ld + j] = s.yd[j];
      s.Bf[(2 * k + 1) * ld + j] = s.q[j];
    }
    if (!(ly_max <= bound && lq_max <= bound)) return false;
    std::fill(fail.begin(), fail.end(), 0);
    C.blocks([&](int64_t b) {
      T* hp = s.part + b * ld;
      if (t > 1) std::fill(hp, hp + m, T(0));
      constexpr int64_t GL = Vec<T>::size();
      alignas(64) T r[GL], tmp[GL], lr[GL], x[GL], p[GL], pd[GL];
      for (int64_t i0 = D.rows0(b); i0 < D.rows1(b); i0 += GL) {
        const int64_t cnt = std::min<int64_t>(GL, D.rows1(b) - i0);
        // r_t = M q_t (k > 0; at t = T, f_T is known: x = 1, p = 1 / a) and M (y o dg)
        if (k == 0) {
          dots(s.M + i0 * ld, ld, cnt, s.yd, m, tmp);
          for (int64_t c = 0; c < GL; ++c) {
            x[c] = T(0);                                // log x
            p[c] = c < cnt ? -s.la[i0 + c] : T(0);      // log p
          }
        } else {
          dots2(s.M + i0 * ld, ld, cnt, s.q, s.yd, m, r, tmp);
          for (int64_t c = 0; c < cnt; ++c)
            if (!(r[c] > T(0) && r[c] <= big)) {
              fail[b] = 1;
              return;
            }
          for (int64_t c = cnt; c < GL; ++c) r[c] = T(1);
          Vec<T>::loadu(r).log().store(lr);
          for (int64_t c = 0; c < GL; ++c) {
            x[c] = (c < cnt ? s.la[i0 + c] : T(0)) - lr[c];
            p[c] = -lr[c];
          }
        }
        for (int64_t c = 0; c < cnt; ++c)
          if (!(x[c] + ly_max <= bound && p[c] + lq_max <= bound)) {
            fail[b] = 1;
            return;
          }
        Vec<T>::loadu(x).exp().store(x);
        Vec<T>::loadu(p).exp().store(p);
        for (int64_t c = 0; c < cnt; ++c) {
          const int64_t i = i0 + c;
          const T dfi = (k == 0 ? s.roww[i] : T(0)) - x[c] * tmp[c];
          s.dla[i] += dfi;
          pd[c] = p[c] * dfi;
          s.A[i * T2 + 2 * k] = x[c];
          s.A[i * T2 + 2 * k + 1] = pd[c];
        }
        if (t > 1) axpys(pd, s.M + i0 * ld, ld, cnt, hp, m);
      }
    });
    for (auto fb : fail)
      if (fb) return false;
    if (t > 1) {
      C.sum_blocks(s.part, ld, s.c, m);
      for (int64_t j = 0; j < m; ++j) s.dg[j] = -s.q[j] * s.c[j];
    }
  }
  return true;
}

// dK = W - M o (A B^T) on the rows of block b, in place of W (s.K).
template <typename T>
void scaled_dk_block(const Ctx<T>& C, int64_t b) {
  Slot<T>& s = C.s;
  const Dims& D = C.D;
  const int64_t i0 = D.rows0(b), rows = D.rows1(b) - i0, m = D.m, ld = D.ld, T2 = 2 * D.iters;
  T* L = C.tile(0);
  tile_gemm<T>(rows, D.mL, T2, s.A + i0 * T2, T2, 1, s.Bf, ld, L, ld, false);
  for (int64_t r = 0; r < rows; ++r) {
    T* Wi = s.K + (i0 + r) * ld;
    const T* Mi = s.M + (i0 + r) * ld;
    const T* Li = L + r * ld;
    constexpr int64_t VL = Vec<T>::size();
    for (int64_t j = 0; j < m; j += VL) {
      const int64_t c = std::min<int64_t>(VL, m - j);
      (Vec<T>::loadu(Wi + j, c) - Vec<T>::loadu(Mi + j, c) * Vec<T>::loadu(Li + j, c)).store(Wi + j, c);
    }
  }
}

// Reverse sweep in the log domain: needs K in s.M (recomputed by the caller), W in s.K,
// s.roww, s.colw. Leaves dK in s.K, fills s.dla, s.dlb.
template <typename T>
void reverse_logdomain(const Ctx<T>& C, const T* G) {
  Slot<T>& s = C.s;
  const Dims& D = C.D;
  const int64_t n = D.n, m = D.m, ld = D.ld, iters = D.iters;
  const T* K = s.M;
  // f_t for every iteration, exactly as the forward computed them
  for (int64_t t = 1; t <= iters; ++t) {
    if (t >= 2)
      std::copy(G + (t - 2) * m, G + (t - 1) * m, s.g);
    else
      std::fill(s.g, s.g + m, T(0));
    T* Ft = s.F + (t - 1) * n;
    C.blocks([&](int64_t b) {
      for (int64_t i = D.rows0(b); i < D.rows1(b); ++i) Ft[i] = s.la[i] - logsumexp_of_sum(K + i * ld, s.g, m);
    });
  }
  std::copy(s.colw, s.colw + m, s.dg);
  std::fill(s.dla, s.dla + n, T(0));
  std::fill(s.dlb, s.dlb + m, T(0));
  for (int64_t t = iters; t >= 1; --t) {
    const T* gt = G + (t - 1) * m;
    for (int64_t j = 0; j < m; ++j) {
      s.dlb[j] += s.dg[j];
      s.beta[j] = gt[j] - s.lb[j];                  // C_t column shift
      s.g[j] = t >= 2 ? G[(t - 2) * m + j] : T(0);  // R_t column shift: g_{t-1}
    }
    const T* Ft = s.F + (t - 1) * n;
    C.blocks([&](int64_t b) {
      T* hp = s.part + b * ld;
      if (t > 1) std::fill(hp, hp + m, T(0));
      for (int64_t i = D.rows0(b); i < D.rows1(b); ++i) {
        const T* Ki = K + i * ld;
        T* dKi = s.K + i * ld;
        // C_t = exp(K + f_t + g_t - lb): dK -= C_t o dg, df_t = [t == T] rowsum W - C_t dg
        const T tmp = exp_dot_sub(Ki, Ft[i], s.beta, s.dg, dKi, m);
        const T dfi = (t == iters ? s.roww[i] : T(0)) - tmp;
        s.dla[i] += dfi;
        // R_t = exp(K + g_{t-1} + f_t - la): dK -= R_t o df, dg_{t-1} = -R_t^T df
        if (t > 1) {
          exp_axpy_sub(Ki, Ft[i] - s.la[i], s.g, dfi, dKi, hp, m);
        } else {
          T* scratch = C.tile(1);  // h is not needed after the first iteration
          std::fill(scratch, scratch + m, T(0));
          exp_axpy_sub(Ki, Ft[i] - s.la[i], s.g, dfi, dKi, scratch, m);
        }
      }
    });
    if (t > 1) {
      C.sum_blocks(s.part, ld, s.c, m);
      for (int64_t j = 0; j < m; ++j) s.dg[j] = -s.c[j];
    }
  }
}

// Row sums of W (s.K) into s.roww and column sums (block partials in order) into s.colw.
template <typename T>
void w_sums_block(const Ctx<T>& C, int64_t b) {
  Slot<T>& s = C.s;
  const int64_t m = C.D.m, ld = C.D.ld;
  T* cp = s.part + b * ld;
  std::fill(cp, cp + m, T(0));
  for (int64_t i = C.D.rows0(b); i < C.D.rows1(b); ++i) {
    const T* Wi = s.K + i * ld;
    s.roww[i] = reduce_sum(Wi, m);
    add_to(Wi, cp, m);
  }
}

// ---------------------------------------------------------------- sinkhorn (dense scores)

template <typename T>
Dims make_dims(int64_t n, int64_t m, int64_t iters, int64_t d, int64_t dv, bool ot, bool backward) {
  Dims D;
  D.n = n;
  D.m = m;
  D.ld = round_up(m, 64 / static_cast<int64_t>(sizeof(T)));  // rows start 64-byte aligned
  D.iters = iters;
  D.nblk = (n + kBlockRows - 1) / kBlockRows;
  const int64_t L = Vec<T>::size();
  D.mL = round_up(m, L);
  D.d = d;
  D.dv = dv;
  D.dp = d ? round_up(d, L) : 0;
  D.dvp = dv ? round_up(dv, L) : 0;
  D.fp = ot ? std::max({D.dp, D.dvp, L}) : 0;
  D.backward = backward;
  return D;
}

// K = S / eps into dst
template <typename T, typename IO>
void load_k(const Ctx<T>& C, const IO* S, T* dst) {
  const T eps = C.eps;
  C.blocks([&](int64_t b) {
    for (int64_t i = C.D.rows0(b); i < C.D.rows1(b); ++i) {
      const IO* Si = S + i * C.D.m;
      T* Ki = dst + i * C.D.ld;
      for (int64_t j = 0; j < C.D.m; ++j) Ki[j] = static_cast<T>(Si[j]) / eps;
    }
  });
}

template <typename T, typename IO>
void sinkhorn_fwd_impl(const SinkhornArgs<T>& a) {
  const Dims D = make_dims<T>(a.n, a.m, a.iters, 0, 0, false, false);
  const int64_t n = a.n, m = a.m, ld = D.ld;
  Workspace<T> ws(a.Z, D);
  const IO* S = static_cast<const IO*>(a.S);
  IO* P = static_cast<IO*>(a.P);
  ws.run(a.Z, [&](int64_t z, Slot<T>& s, bool par) {
    const Ctx<T> C{D, s, par, a.eps};
    std::copy(a.la + z * n, a.la + (z + 1) * n, s.la);
    std::copy(a.lb + z * m, a.lb + (z + 1) * m, s.lb);
    load_k(C, S + z * n * m, s.K);
    iterate(C, a.G + z * a.iters * m);
    C.blocks([&](int64_t b) {
      for (int64_t i = D.rows0(b); i < D.rows1(b); ++i) {
        IO* Pi = P + (z * n + i) * m;
        if constexpr (std::is_same_v<IO, T>) {
          exp_row(s.K + i * ld, s.f[i], s.g, Pi, m);
        } else {
          exp_row(s.K + i * ld, s.f[i], s.g, s.M + i * ld, m);
          store_scaled(s.M + i * ld, Pi, T(1), m);
        }
      }
    });
  });
}

template <typename T, typename IO>
void sinkhorn_bwd_impl(const SinkhornArgs<T>& a) {
  const Dims D = make_dims<T>(a.n, a.m, a.iters, 0, 0, false, true);
  const int64_t n = a.n, m = a.m, ld = D.ld;
  Workspace<T> ws(a.Z, D);
  const IO* S = static_cast<const IO*>(a.S);
  const IO* dP = static_cast<const IO*>(a.dP);
  IO* dS = static_cast<IO*>(a.dS);
  ws.run(a.Z, [&](int64_t z, Slot<T>& s, bool par) {
    const Ctx<T> C{D, s, par, a.eps};
    const T* G = a.G + z * a.iters * m;
    std::copy(a.la + z * n, a.la + (z + 1) * n, s.la);
    std::copy(a.lb + z * m, a.lb + (z + 1) * m, s.lb);
    load_k(C, S + z * n * m, s.K);
    backward_start(C, G);
    // W = dP o P in place of K, with P = M o b: the same rounding as the C_T = M the
    // reverse sweep subtracts (in the saturated regime dK is W minus nearly all of it)
    for (int64_t j = 0; j < m; ++j) s.v[j] = std::exp(s.lb[j]);
    C.blocks([&](int64_t b) {
      for (int64_t i = D.rows0(b); i < D.rows1(b); ++i) {
        T* Wi = s.K + i * ld;
        const IO* dPi = dP + (z * n + i) * m;
        const T* Mi = s.M + i * ld;
        for (int64_t j = 0; j < m; ++j) Wi[j] = static_cast<T>(dPi[j]) * (Mi[j] * s.v[j]);
      }
      w_sums_block(C, b);
    });
    C.sum_blocks(s.part, ld, s.colw, m);
    const T inv_eps = T(1) / a.eps;
    auto store = [&](int64_t b) {
      for (int64_t i = D.rows0(b); i < D.rows1(b); ++i)
        store_scaled(s.K + i * ld, dS + (z * n + i) * m, inv_eps, m);
    };
    if (reverse_scaled(C, G)) {
      C.blocks([&](int64_t b) {
        scaled_dk_block(C, b);
        store(b);
      });
    } else {
      load_k(C, S + z * n * m, s.M);
      reverse_logdomain(C, G);
      C.blocks(store);
    }
    std::copy(s.dla, s.dla + n, a.dla + z * n);
    std::copy(s.dlb, s.dlb + m, a.dlb + z * m);
  });
}

// ---------------------------------------------------------------- ot_aggregate / ot_attention

template <typename T>
struct OtProblem {
  const T *x, *ref, *v, *dout;
  int64_t z;
};

template <typename T>
OtProblem<T> ot_problem(const OtArgs<T>& a, int64_t z) {
  const int64_t b = z / a.heads, h = z % a.heads;
  return {a.x + b * a.sx[0] + h * a.sx[1], a.ref + h * a.sref[0], a.v + b * a.sv[0] + h * a.sv[1],
          a.dout ? a.dout + b * a.sdout[0] + h * a.sdout[1] : nullptr, z};
}

// dst (cols x ld) = scale * src^T, src rows x cols with row stride lds; columns rows..ld-1 zeroed
template <typename T>
inline void transpose_padded(const T* src, int64_t lds, int64_t rows, int64_t cols, T scale, T* dst, int64_t ld) {
  for (int64_t k = 0; k < cols; ++k) {
    T* d = dst + k * ld;
    for (int64_t i = 0; i < rows; ++i) d[i] = src[i * lds + k] * scale;
    std::fill(d + rows, d + ld, T(0));
  }
}

// dst (rows x ldd) = src (rows x cols, row stride lds) with columns cols..ldd-1 zeroed
template <typename T>
inline void copy_padded(const T* src, int64_t lds, int64_t rows, int64_t cols, T* dst, int64_t ldd) {
  for (int64_t i = 0; i < rows; ++i) {
    std::memcpy(dst + i * ldd, src + i * lds, sizeof(T) * cols);
    std::fill(dst + i * ldd + cols, dst + (i + 1) * ldd, T(0));
  }
}

// dst (rows x cols, row stride ldd) = scale * src (rows x lds)
template <typename T>
inline void copy_out(const T* src, int64_t lds, int64_t rows, int64_t cols, T scale, T* dst, int64_t ldd) {
  for (int64_t i = 0; i < rows; ++i) {
    std::memcpy(dst + i * ldd, src + i * lds, sizeof(T) * cols);
    if (scale != T(1)) scale_into(dst + i * ldd, scale, cols);
  }
}

// K = (x ref^T / eps) o filt into dst (the padding columns up to mL hold 0 o filt = 0)
template <typename T>
void ot_scores(const Ctx<T>& C, const OtArgs<T>& a, const OtProblem<T>& p, T* dst) {
  const Dims& D = C.D;
  transpose_padded(p.ref, a.sref[1], D.m, D.d, T(1) / a.eps, C.s.refT, D.ld);
  C.blocks([&](int64_t b) {
    const int64_t i0 = D.rows0(b), rows = D.rows1(b) - i0;
    tile_gemm<T>(rows, D.mL, D.d, p.x + i0 * a.sx[2], a.sx[2], 1, C.s.refT, D.ld, dst + i0 * D.ld, D.ld, false);
    if (a.filt)
      for (int64_t i = i0; i < i0 + rows; ++i) mul_into(dst + i * D.ld, a.filt + i * D.m, D.m);
  });
}

// OTKE's marginals: every row m/n, every column 1
template <typename T>
void ot_marginals(const Dims& D, Slot<T>& s) {
  std::fill(s.la, s.la + D.n, std::log(T(D.m) / T(D.n)));
  std::fill(s.lb, s.lb + D.m, T(0));
}

// The rows of block b of the filtered plan T = P o filt (P in s.M): s.M itself without a
// filter, else scratch tile `which`.
template <typename T>
const T* plan_tile(const Ctx<T>& C, const OtArgs<T>& a, int64_t b, int which) {
  const Dims& D = C.D;
  const int64_t i0 = D.rows0(b);
  if (!a.filt) return C.s.M + i0 * D.ld;
  T* tile = C.tile(which);
  for (int64_t i = i0; i < D.rows1(b); ++i) {
    T* dst = tile + (i - i0) * D.ld;
    std::memcpy(dst, C.s.M + i * D.ld, sizeof(T) * D.m);
    mul_into(dst, a.filt + i * D.m, D.m);
  }
  return tile;
}

// agg_b (m x w) = T_b^T Y_b for the rows of block b, Y (rows x cols, row stride ldy) packed
// into scratch tile 2 with zero padding to w columns
template <typename T>
void plan_t_times(const Ctx<T>& C, int64_t b, const T* Tb, const T* Y, int64_t ldy, int64_t cols, int64_t w,
                  T* agg_b) {
  const Dims& D = C.D;
  const int64_t i0 = D.rows0(b), rows = D.rows1(b) - i0;
  T* Yp = C.tile(2);
  copy_padded(Y + i0 * ldy, ldy, rows, cols, Yp, w);
  tile_gemm<T>(D.m, w, rows, Tb, 1, D.ld, Yp, w, agg_b, w, false);
}

template <typename T>
void ot_fwd_impl(const OtArgs<T>& a) {
  const Dims D = make_dims<T>(a.n, a.m, a.iters, a.d, a.dv, true, false);
  const int64_t n = a.n, m = a.m, dv = a.dv, dvp = D.dvp, ld = D.ld, Z = a.B * a.heads;
  const T c = T(n) / T(m);
  Workspace<T> ws(Z, D);
  ws.run(Z, [&](int64_t z, Slot<T>& s, bool par) {
    const Ctx<T> C{D, s, par, a.eps};
    const OtProblem<T> p = ot_problem(a, z);
    ot_marginals(D, s);
    ot_scores(C, a, p, s.K);
    iterate(C, a.G + z * a.iters * m);
    // T = exp(K + f + g) o filt in s.M; per block T^T v
    C.blocks([&](int64_t b) {
      for (int64_t i = D.rows0(b); i < D.rows1(b); ++i) {
        T* Mi = s.M + i * ld;
        exp_row(s.K + i * ld, s.f[i], s.g, Mi, m);
        if (a.filt) mul_into(Mi, a.filt + i * m, m);
      }
      plan_t_times(C, b, s.M + D.rows0(b) * ld, p.v, a.sv[2], dv, dvp, s.agg + b * m * dvp);
    });
    C.sum_blocks(s.agg, m * dvp, s.zeta, m * dvp);
    if (!a.attention) {
      copy_out(s.zeta, dvp, m, dv, T(1), a.out + z * m * dv, dv);
      return;
    }
    copy_out(s.zeta, dvp, m, dv, T(1), a.zeta + z * m * dv, dv);
    // out = (n / m) T zeta
    C.blocks([&](int64_t b) {
      const int64_t i0 = D.rows0(b), rows = D.rows1(b) - i0;
      T* O = C.tile(3);
      tile_gemm<T>(rows, dvp, m, s.M + i0 * ld, ld, 1, s.zeta, dvp, O, dvp, false);
      copy_out(O, dvp, rows, dv, c, a.out + (z * n + i0) * dv, dv);
    });
  });
}

template <typename T>
void ot_bwd_impl(const OtArgs<T>& a) {
  const Dims D = make_dims<T>(a.n, a.m, a.iters, a.d, a.dv, true, true);
  const int64_t n = a.n, m = a.m, d = a.d, dv = a.dv, dp = D.dp, dvp = D.dvp, ld = D.ld, Z = a.B * a.heads;
  const T c = T(n) / T(m);
  Workspace<T> ws(Z, D);
  c10::DataPtr dref_mem = c10::GetCPUAllocator()->allocate(sizeof(T) * static_cast<size_t>(std::max<int64_t>(1, Z * m * dp)));
  T* dref_z = static_cast<T*>(dref_mem.get());
  ws.run(Z, [&](int64_t z, Slot<T>& s, bool par) {
    const Ctx<T> C{D, s, par, a.eps};
    const OtProblem<T> p = ot_problem(a, z);
    const T* G = a.G + z * a.iters * m;
    const int64_t sd = a.sdout[2];
    ot_marginals(D, s);
    ot_scores(C, a, p, s.K);
    backward_start(C, G);  // s.M = P (column marginals 1)
    copy_padded(p.ref, a.sref[1], m, d, s.refP, dp);
    // B operands of the plan-gradient GEMMs, (dv x ld) transposed and padded:
    //   attention: out = c T zeta, zeta = T^T v -> dzeta = c T^T dout,
    //              dT = c dout zeta^T + v dzeta^T, dv = T dzeta;
    //   aggregate: out = T^T v -> dT = v dout^T, dv = T dout.
    const T* dv_rhs;  // (m x dvp): dzeta or dout
    if (a.attention) {
      C.blocks([&](int64_t b) { plan_t_times(C, b, plan_tile(C, a, b, 0), p.dout, sd, dv, dvp, s.agg + b * m * dvp); });
      C.sum_blocks(s.agg, m * dvp, s.zeta, m * dvp);
      scale_into(s.zeta, c, m * dvp);  // dzeta
      transpose_padded(a.zeta + z * m * dv, dv, m, dv, c, s.zetaT, ld);
      transpose_padded(s.zeta, dvp, m, dv, T(1), s.dzetaT, ld);
      dv_rhs = s.zeta;
    } else {
      transpose_padded(p.dout, sd, m, dv, T(1), s.zetaT, ld);
      copy_padded(p.dout, sd, m, dv, s.zeta2, dvp);
      dv_rhs = s.zeta2;
    }
    C.blocks([&](int64_t b) {
      const int64_t i0 = D.rows0(b), rows = D.rows1(b) - i0;
      const T* Tb = plan_tile(C, a, b, 0);
      T* dT = C.tile(1);
      T* O = C.tile(3);
      tile_gemm<T>(rows, dvp, m, Tb, ld, 1, dv_rhs, dvp, O, dvp, false);
      copy_out(O, dvp, rows, dv, T(1), a.dvalue + (z * n + i0) * dv, dv);
      if (a.attention) {
        tile_gemm<T>(rows, D.mL, dv, p.dout + i0 * sd, sd, 1, s.zetaT, ld, dT, ld, false);
        tile_gemm<T>(rows, D.mL, dv, p.v + i0 * a.sv[2], a.sv[2], 1, s.dzetaT, ld, dT, ld, true);
      } else {
        tile_gemm<T>(rows, D.mL, dv, p.v + i0 * a.sv[2], a.sv[2], 1, s.zetaT, ld, dT, ld, false);
      }
      // W = (dT o filt) o P in place of K
      for (int64_t i = i0; i < i0 + rows; ++i) {
        T* Wi = s.K + i * ld;
        std::memcpy(Wi, dT + (i - i0) * ld, sizeof(T) * m);
        if (a.filt) mul_into(Wi, a.filt + i * m, m);
        mul_into(Wi, s.M + i * ld, m);
      }
      w_sums_block(C, b);
    });
    C.sum_blocks(s.part, ld, s.colw, m);
    // dS = dK o filt / eps; dx = dS ref; per block dS^T x
    auto finish = [&](int64_t b) {
      const int64_t i0 = D.rows0(b), rows = D.rows1(b) - i0;
      for (int64_t i = i0; i < i0 + rows; ++i) {
        T* dSi = s.K + i * ld;
        if (a.filt) mul_into(dSi, a.filt + i * m, m);
        scale_into(dSi, T(1) / a.eps, m);
      }
      T* O = C.tile(3);
      tile_gemm<T>(rows, dp, m, s.K + i0 * ld, ld, 1, s.refP, dp, O, dp, false);
      copy_out(O, dp, rows, d, T(1), a.dx + (z * n + i0) * d, d);
      plan_t_times(C, b, s.K + i0 * ld, p.x, a.sx[2], d, dp, s.agg + b * m * dp);
    };
    if (reverse_scaled(C, G)) {
      C.blocks([&](int64_t b) {
        scaled_dk_block(C, b);
        finish(b);
      });
    } else {
      ot_scores(C, a, p, s.M);
      reverse_logdomain(C, G);
      C.blocks(finish);
    }
    C.sum_blocks(s.agg, m * dp, dref_z + z * m * dp, m * dp);
  });
  // dref[h] = sum over the batch, in batch order
  for (int64_t h = 0; h < a.heads; ++h) {
    T* dst = a.dref + h * m * d;
    for (int64_t j = 0; j < m; ++j) {
      std::memcpy(dst + j * d, dref_z + (h * m + j) * dp, sizeof(T) * d);
      for (int64_t b = 1; b < a.B; ++b) add_to(dref_z + ((b * a.heads + h) * m + j) * dp, dst + j * d, d);
    }
  }
}

}  // namespace

// ---------------------------------------------------------------- entry points

void sinkhorn_fwd_f32(const SinkhornArgs<float>& a) {
  switch (a.io) {
    case SinkhornIo::F16: return sinkhorn_fwd_impl<float, c10::Half>(a);
    case SinkhornIo::BF16: return sinkhorn_fwd_impl<float, c10::BFloat16>(a);
    default: return sinkhorn_fwd_impl<float, float>(a);
  }
}
void sinkhorn_fwd_f64(const SinkhornArgs<double>& a) { sinkhorn_fwd_impl<double, double>(a); }
void sinkhorn_bwd_f32(const SinkhornArgs<float>& a) {
  switch (a.io) {
    case SinkhornIo::F16: return sinkhorn_bwd_impl<float, c10::Half>(a);
    case SinkhornIo::BF16: return sinkhorn_bwd_impl<float, c10::BFloat16>(a);
    default: return sinkhorn_bwd_impl<float, float>(a);
  }
}
void sinkhorn_bwd_f64(const SinkhornArgs<double>& a) { sinkhorn_bwd_impl<double, double>(a); }
void ot_fwd_f32(const OtArgs<float>& a) { ot_fwd_impl(a); }
void ot_fwd_f64(const OtArgs<double>& a) { ot_fwd_impl(a); }
void ot_bwd_f32(const OtArgs<float>& a) { ot_bwd_impl(a); }
void ot_bwd_f64(const OtArgs<double>& a) { ot_bwd_impl(a); }

}  // namespace vitattn::cpu::CPU_CAPABILITY
