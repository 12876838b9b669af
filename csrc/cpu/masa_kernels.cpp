// MaSA CPU kernels (forward and backward, full and decomposed), compiled once per
// instruction set (isa.h): at::vec::Vectorized has the width of the CPU_CAPABILITY build.
//
// One attention problem (a row, a column or the whole grid, masa_geometry.h) is computed
// flash-style on packed tiles, after PyTorch's CPU flash attention: a task gathers the
// problem's keys and values from their strided tensors into small buffers of the compute
// type T (fp32, or fp64 for fp64 inputs), keys transposed; then per block of BM queries
// and BN keys a register-blocked micro-kernel forms the logits S = (scale q) k^T, its
// epilogue adds the decay log(gamma) * (|dy| + |dx|) from the token coordinates (no N x N
// tensor, no mask tensor), and the softmax is online over key blocks (one block when the
// problem has at most kMaxKeys tokens, as every row and column and the 7x7..28x28 grids
// do). Backward recomputes the probabilities from the saved log-sum-exp, one problem per
// task, so dk/dv/dlog_gamma are summed in a fixed order without atomics.
//
// The decomposed form runs per (batch, head) task: the pass along W over every row writes
// v_mid, and the pass along H reads it back right away (the (H, W, dv) slab of one head
// is still in cache). Its backward accumulates dq and dk of the two passes in the task.
//
// Nothing here instantiates std:: containers or other out-of-line templates shared with
// the other instruction-set copies of this file: the linker keeps one copy of such a
// function, which could then be the AVX-512 one on an AVX2 machine.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "masa_kernels.h"

namespace vitattn::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using masa::Axis;

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

template <typename T>
constexpr int kLanes = Vectorized<T>::size();
// Register tile of the micro-kernel: kMR rows x kNV vectors of accumulators. 16 vector
// registers (AVX2, and the 32-byte DEFAULT build) hold 6 x 2 accumulators, 2 vectors of B
// and a broadcast; AVX-512 has 32 registers.
template <typename T>
constexpr int kMR = kLanes<T> * sizeof(T) >= 64 ? 8 : 6;
constexpr int kNV = 2;
// Keys per block: one block (no online rescaling) up to this many tokens. The BM x BN
// logits tile stays in L2 (64 x 512 fp32 = 128 KiB).
constexpr int64_t kMaxKeys = 512;
// Queries per block: the whole problem up to kWholeQueries tokens, else kQueryBlock.
constexpr int64_t kWholeQueries = 128;
constexpr int64_t kQueryBlock = 64;

template <typename T>
constexpr T kInf = std::numeric_limits<T>::infinity();

template <typename T>
inline Vectorized<T> vexp(const Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return x.exp_u20();  // ~20 ulp: far below the fp32 tolerance of a softmax
  } else {
    return x.exp();  // fp64 is the accuracy path (gradcheck): Sleef's 1-ulp exp
  }
}

template <typename T>
inline T hsum(const Vectorized<T>& x) {
  T buf[kLanes<T>];
  x.store(buf);
  T s = 0;
  for (int i = 0; i < kLanes<T>; ++i) s += buf[i];
  return s;
}

// Across-lane reductions through shuffles (at::vec; a store and a scalar loop for fp64 and
// the baseline build): the forward's per-row softmax takes one of each per row.
template <typename T>
inline T vsum_all(const Vectorized<T>& x) {
  return at::vec::vec_reduce_all<T>([](const Vectorized<T>& a, const Vectorized<T>& b) { return a + b; }, x);
}

template <typename T>
inline T vmax_all(const Vectorized<T>& x) {
  return at::vec::vec_reduce_all<T>(
      [](const Vectorized<T>& a, const Vectorized<T>& b) { return at::vec::maximum(a, b); }, x);
}

// ---------------------------------------------------------------- tile GEMM

// The register tile rows [i, i + MR) x columns [j, j + NV * L) of A (rows x K, element
// (r, p) at A[r * a_rs + p * a_cs]) times B (K x cols, row stride ldb), handed to the
// epilogue, which stores it (and may add the decay, exponentiate, reduce ...).
template <typename T, int MR, int NV, class Epi>
inline void micro_tile(int64_t K, const T* A, int64_t a_rs, int64_t a_cs, const T* B, int64_t ldb, Epi& epi,
                       int64_t i, int64_t j) {
  using V = Vectorized<T>;
  constexpr int L = kLanes<T>;
  V c[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = V(T(0));
  for (int64_t p = 0; p < K; ++p) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = V::loadu(B + p * ldb + v * L);
    const T* ap = A + p * a_cs;
    for (int r = 0; r < MR; ++r) {
      const V a(ap[r * a_rs]);
      for (int v = 0; v < NV; ++v) c[r][v] = at::vec::fmadd(a, b[v], c[r][v]);
    }
  }
  epi.template tile<MR, NV>(c, i, j);
}

template <typename T, int NV, int R, class Epi>
inline void tail_rows(int64_t rows, int64_t K, const T* A, int64_t a_rs, int64_t a_cs, const T* B, int64_t ldb,
                      Epi& epi, int64_t i, int64_t j) {
  if constexpr (R > 0) {
    if (rows == R) {
      micro_tile<T, R, NV>(K, A, a_rs, a_cs, B, ldb, epi, i, j);
      return;
    }
    tail_rows<T, NV, R - 1>(rows, K, A, a_rs, a_cs, B, ldb, epi, i, j);
  }
}

template <typename T, int NV, class Epi>
inline void gemm_panel(int64_t M, int64_t K, const T* A, int64_t a_rs, int64_t a_cs, const T* B, int64_t ldb,
                       Epi& epi, int64_t j) {
  constexpr int MR = kMR<T>;
  int64_t i = 0;
  for (; i + MR <= M; i += MR) micro_tile<T, MR, NV>(K, A + i * a_rs, a_rs, a_cs, B, ldb, epi, i, j);
  if (i < M) tail_rows<T, NV, MR - 1>(M - i, K, A + i * a_rs, a_rs, a_cs, B, ldb, epi, i, j);
}

// (M x cols) = A (M x K) * B (K x cols), tile by tile into epi; cols is a multiple of the
// vector width (every B operand is padded to it). Each element is one fixed-order chain
// of FMAs over p: the result does not depend on how rows are grouped into tiles.
template <typename T, class Epi>
void gemm(int64_t M, int64_t cols, int64_t K, const T* A, int64_t a_rs, int64_t a_cs, const T* B, int64_t ldb,
          Epi& epi) {
  constexpr int L = kLanes<T>;
  int64_t j = 0;
  for (; j + kNV * L <= cols; j += kNV * L) gemm_panel<T, kNV>(M, K, A, a_rs, a_cs, B + j, ldb, epi, j);
  for (; j < cols; j += L) gemm_panel<T, 1>(M, K, A, a_rs, a_cs, B + j, ldb, epi, j);
}

// C (row stride ldc) = or += the product.
template <typename T>
struct StoreC {
  T* C;
  int64_t ldc;
  bool accumulate;
  template <int MR, int NV>
  inline void tile(Vectorized<T> (&c)[MR][NV], int64_t i, int64_t j) {
    constexpr int L = kLanes<T>;
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) {
        T* p = C + (i + r) * ldc + j + v * L;
        Vectorized<T> x = c[r][v];
        if (accumulate) x = x + Vectorized<T>::loadu(p);
        x.store(p);
      }
  }
};

// x stored at p, bypassing the caches (no read of the line first) where the build has
// streaming stores and p is vector-aligned: for outputs written once, in whole lines.
template <typename T>
inline void store_stream(T* p, const Vectorized<T>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    if (reinterpret_cast<uintptr_t>(p) % 64 == 0) return _mm512_stream_ps(p, x);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    if (reinterpret_cast<uintptr_t>(p) % 32 == 0) return _mm256_stream_ps(p, x);
  }
#endif
  x.store(p);
}

// Orders this thread's streaming stores before what follows (the end of a task).
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// C (row stride ldc) = mul * the product (+ the same element of src, row stride lds, with
// accumulate: src is C itself or the partial sums of an earlier pass): write_rows'
// arithmetic, straight from the registers into the output's tokens; streamed with stream.
template <typename T>
struct StoreScaled {
  T* C;
  int64_t ldc;
  T mul;
  bool accumulate;
  const T* src;
  int64_t lds;
  bool stream;
  template <int MR, int NV>
  inline void tile(Vectorized<T> (&c)[MR][NV], int64_t i, int64_t j) {
    constexpr int L = kLanes<T>;
    const Vectorized<T> m(mul);
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) {
        T* p = C + (i + r) * ldc + j + v * L;
        Vectorized<T> x = c[r][v] * m;
        if (accumulate) x = x + Vectorized<T>::loadu(src + (i + r) * lds + j + v * L);
        if (stream)
          store_stream(p, x);
        else
          x.store(p);
      }
  }
};

// Exact backward, dP = dO v^T: the softmax's normalisation P = E * inv (E = exp(s - max) in
// place, inv = 1 / rowsum(E) per block row) applied to the tile's probabilities, dP stored,
// and rowsum(P * dP) accumulated per lane in acc (M x L), columns in ascending order: the
// separate passes' arithmetic, one pass fewer over the tile each.
template <typename T>
struct DProbsEpi {
  T* P;
  T* dP;
  int64_t ld;
  const T* inv;  // block rows
  T* acc;        // M x L
  template <int MR, int NV>
  inline void tile(Vectorized<T> (&c)[MR][NV], int64_t i, int64_t j) {
    using V = Vectorized<T>;
    constexpr int L = kLanes<T>;
    for (int r = 0; r < MR; ++r) {
      const V f(inv[i + r]);
      V a = V::loadu(acc + (i + r) * L);
      for (int v = 0; v < NV; ++v) {
        const int64_t off = (i + r) * ld + j + v * L;
        const V p = V::loadu(P + off) * f;
        p.store(P + off);
        c[r][v].store(dP + off);
        a = at::vec::fmadd(p, c[r][v], a);
      }
      a.store(acc + (i + r) * L);
    }
  }
};

// ---------------------------------------------------------------- decay

// Token coordinates of one problem (row y, column x), padded tokens at 0.
template <typename T>
struct Coords {
  const T* y;
  const T* x;
};

// |y_q - y_k| + |x_q - x_k| for one query against L keys. kGrid is false for rows and
// columns (Y = 1: every y is 0).
template <typename T, bool kGrid>
inline Vectorized<T> distance(const Vectorized<T>& qy, const Vectorized<T>& qx, const Vectorized<T>& ky,
                              const Vectorized<T>& kx) {
  Vectorized<T> d = (qx - kx).abs();
  if constexpr (kGrid) d = d + (qy - ky).abs();
  return d;
}

// Lanes at and past n (padded keys) replaced by `fill`.
template <typename T>
inline Vectorized<T> keep_first(const Vectorized<T>& x, int64_t n, T fill) {
  return Vectorized<T>::set(Vectorized<T>(fill), x, n);
}

// Forward logits: S = q k^T + lg * distance, -inf on padded keys, and the running
// per-row maximum as one vector per row (reduced across lanes once per block).
template <typename T, bool kGrid>
struct ScoresEpi {
  T* S;
  int64_t lds;
  Coords<T> qc, kc;  // query coordinates (block rows), key coordinates (block columns)
  int64_t nvalid;
  T lg;
  T* rowmax;  // M x L
  template <int MR, int NV>
  inline void tile(Vectorized<T> (&c)[MR][NV], int64_t i, int64_t j) {
    using V = Vectorized<T>;
    constexpr int L = kLanes<T>;
    V ky[NV], kx[NV];
    for (int v = 0; v < NV; ++v) {
      ky[v] = kGrid ? V::loadu(kc.y + j + v * L) : V(T(0));
      kx[v] = V::loadu(kc.x + j + v * L);
    }
    const V vlg(lg);
    for (int r = 0; r < MR; ++r) {
      const V qy(kGrid ? qc.y[i + r] : T(0)), qx(qc.x[i + r]);
      V m = V::loadu(rowmax + (i + r) * L);
      for (int v = 0; v < NV; ++v) {
        const int64_t col = j + v * L;
        V s = at::vec::fmadd(vlg, distance<T, kGrid>(qy, qx, ky[v], kx[v]), c[r][v]);
        if (col + L > nvalid) s = keep_first(s, nvalid - col, -kInf<T>);
        s.store(S + (i + r) * lds + col);
        m = at::vec::maximum(m, s);
      }
      m.store(rowmax + (i + r) * L);
    }
  }
};

// Backward probabilities: P = exp(q k^T + lg * distance - lse), 0 on padded keys.
template <typename T, bool kGrid>
struct ProbsEpi {
  T* P;
  int64_t ldp;
  Coords<T> qc, kc;
  int64_t nvalid;
  T lg;
  const T* lse;  // block rows
  template <int MR, int NV>
  inline void tile(Vectorized<T> (&c)[MR][NV], int64_t i, int64_t j) {
    using V = Vectorized<T>;
    constexpr int L = kLanes<T>;
    V ky[NV], kx[NV];
    for (int v = 0; v < NV; ++v) {
      ky[v] = kGrid ? V::loadu(kc.y + j + v * L) : V(T(0));
      kx[v] = V::loadu(kc.x + j + v * L);
    }
    const V vlg(lg);
    for (int r = 0; r < MR; ++r) {
      const V qy(kGrid ? qc.y[i + r] : T(0)), qx(qc.x[i + r]), l(lse[i + r]);
      for (int v = 0; v < NV; ++v) {
        const int64_t col = j + v * L;
        V p = vexp(at::vec::fmadd(vlg, distance<T, kGrid>(qy, qx, ky[v], kx[v]), c[r][v]) - l);
        if (col + L > nvalid) p = keep_first(p, nvalid - col, T(0));
        p.store(P + (i + r) * ldp + col);
      }
    }
  }
};

// Backward logit gradients: dS = P * (dO v^T - delta), and sum(dS * distance) (the
// gradient of log_gamma) accumulated per lane.
template <typename T, bool kGrid>
struct DScoresEpi {
  const T* P;
  T* dS;
  int64_t ld;
  Coords<T> qc, kc;
  const T* delta;  // block rows
  Vectorized<T> dlg;
  template <int MR, int NV>
  inline void tile(Vectorized<T> (&c)[MR][NV], int64_t i, int64_t j) {
    using V = Vectorized<T>;
    constexpr int L = kLanes<T>;
    V ky[NV], kx[NV];
    for (int v = 0; v < NV; ++v) {
      ky[v] = kGrid ? V::loadu(kc.y + j + v * L) : V(T(0));
      kx[v] = V::loadu(kc.x + j + v * L);
    }
    V g = dlg;
    for (int r = 0; r < MR; ++r) {
      const V qy(kGrid ? qc.y[i + r] : T(0)), qx(qc.x[i + r]), dl(delta[i + r]);
      for (int v = 0; v < NV; ++v) {
        const int64_t off = (i + r) * ld + j + v * L;
        const V ds = V::loadu(P + off) * (c[r][v] - dl);
        ds.store(dS + off);
        g = at::vec::fmadd(ds, distance<T, kGrid>(qy, qx, ky[v], kx[v]), g);
      }
    }
    dlg = g;
  }
};

// The softmax of each of the M rows (cols wide, -inf on padded keys) of S, with the row
// maxima the scores epilogue left in rowmax, as the forward forms it: E = exp(s - max) in
// place and inv[i] = 1 / rowsum(E); the multiplication by inv is DProbsEpi's.
template <typename T>
void softmax_exp_rows(T* S, int64_t ld, int64_t M, int64_t cols, const T* rowmax, T* inv) {
  using V = Vectorized<T>;
  constexpr int L = kLanes<T>;
  for (int64_t i = 0; i < M; ++i) {
    T* srow = S + i * ld;
    const V vm(vmax_all(V::loadu(rowmax + i * L)));
    V acc(T(0));
    for (int64_t j = 0; j < cols; j += L) {
      const V p = vexp(V::loadu(srow + j) - vm);
      acc = acc + p;
      p.store(srow + j);
    }
    inv[i] = T(1) / vsum_all(acc);
  }
}

// dS = P * (dP - delta) in place of dP for rows [0, M) of a tile, with delta = rowsum(P * dP)
// from its per-lane sums in acc (M x L); returns sum(dS * distance) (the gradient of log_gamma).
template <typename T, bool kGrid>
T ds_from_dp_acc(const T* P, T* dS, int64_t ld, int64_t M, int64_t cols, Coords<T> qc, Coords<T> kc,
                 const T* acc) {
  using V = Vectorized<T>;
  constexpr int L = kLanes<T>;
  V g(T(0));
  for (int64_t i = 0; i < M; ++i) {
    const T* p = P + i * ld;
    T* ds = dS + i * ld;
    const V vdl(hsum(V::loadu(acc + i * L))), qy(kGrid ? qc.y[i] : T(0)), qx(qc.x[i]);
    for (int64_t j = 0; j < cols; j += L) {
      const V x = V::loadu(p + j) * (V::loadu(ds + j) - vdl);
      x.store(ds + j);
      g = at::vec::fmadd(x, distance<T, kGrid>(qy, qx, kGrid ? V::loadu(kc.y + j) : V(T(0)), V::loadu(kc.x + j)), g);
    }
  }
  return hsum(g);
}

// ---------------------------------------------------------------- strided tokens

// One problem's tokens in a (B, heads, H, W, F) tensor: token n at grid position
// (n / X, n % X), feature f at stride sf.
template <typename S>
struct View {
  S* p;
  int64_t sy, sx, sf, X;
  // fn(i, pointer to token n0 + i) for the tokens [n0, n1), walking the grid without a
  // division per token
  template <class Fn>
  inline void each(int64_t n0, int64_t n1, Fn&& fn) const {
    int64_t x = n0 % X;
    S* row = p + (n0 / X) * sy;
    for (int64_t n = n0; n < n1; ++n) {
      fn(n - n0, row + x * sx);
      if (++x == X) {
        x = 0;
        row += sy;
      }
    }
  }
};

template <typename S>
View<S> view_of(const MasaTensor& t, Axis axis, const masa::Problem& pb, int64_t X) {
  const masa::Strides6 s = masa::map_strides(axis, t.stride);
  return {static_cast<S*>(t.data) + masa::problem_offset(s, pb), s.y, s.x, s.f, X};
}

template <typename S>
View<S> lse_view_of(const MasaTensor& t, Axis axis, const masa::Problem& pb, int64_t X) {
  const masa::Strides5 s = masa::map_strides4(axis, t.stride);
  return {static_cast<S*>(t.data) + masa::problem_offset(s, pb), s.y, s.x, 0, X};
}

// A (1, 1, H, W, ld) scratch slab seen as a tensor (per-(batch, head) accumulators).
inline MasaTensor slab(void* data, int64_t W, int64_t ld) {
  MasaTensor t;
  t.data = data;
  t.stride[0] = 0;
  t.stride[1] = 0;
  t.stride[2] = W * ld;
  t.stride[3] = ld;
  t.stride[4] = 1;
  return t;
}

template <typename S>
constexpr bool kReduced = std::is_same_v<S, c10::Half> || std::is_same_v<S, c10::BFloat16>;

// d[f] = mul * s[f * sf] for f < F, zero for F <= f < ld.
template <typename S, typename T>
inline void load_row(const S* s, int64_t sf, int64_t F, T* d, int64_t ld, T mul) {
  using V = Vectorized<T>;
  constexpr int L = kLanes<T>;
  int64_t f = 0;
  if (sf == 1) {
    if constexpr (std::is_same_v<S, T>) {
      for (; f + L <= F; f += L) (V::loadu(s + f) * V(mul)).store(d + f);
    } else if constexpr (kReduced<S>) {
      for (; f + L <= F; f += L) {
        V x;
        at::vec::load_to_float<S>(s + f, x);
        (x * V(mul)).store(d + f);
      }
    }
  }
  for (; f < F; ++f) d[f] = static_cast<T>(s[f * sf]) * mul;
  for (; f < ld; ++f) d[f] = T(0);
}

// dst rows [0, rows) (row stride ld) = mul * tokens [n0, n0 + rows) of src.
template <typename S, typename T>
void pack_rows(const View<S>& src, int64_t n0, int64_t rows, int64_t F, T* dst, int64_t ld, T mul) {
  src.each(n0, n0 + rows, [&](int64_t n, const S* s) { load_row(s, src.sf, F, dst + n * ld, ld, mul); });
}

// dst (F x ld) = the problem's N tokens transposed, zero in columns N <= n < ld.
// fp32 (ld a multiple of 8): 8 tokens x 8 features at a time through a small buffer and
// at::vec's register transpose; an element-by-element scatter (stride ld) cost as much as
// the short lines' GEMMs.
template <typename S, typename T>
void pack_transposed(const View<S>& src, int64_t N, int64_t F, T* dst, int64_t ld) {
  if constexpr (std::is_same_v<T, float>) {
    if (ld % 8 == 0) {
      alignas(64) T tile[8 * 8];
      const S* tok[8];
      for (int64_t n0 = 0; n0 < ld; n0 += 8) {
        const int64_t cnt = imax(0, imin(8, N - n0));
        if (cnt > 0) src.each(n0, n0 + cnt, [&](int64_t i, const S* s) { tok[i] = s; });
        // 8 tokens equally spaced (a row or column, or a contiguous grid): straight from the tensor
        const int64_t step = cnt == 8 ? tok[1] - tok[0] : 0;
        const bool direct = std::is_same_v<S, T> && src.sf == 1 && cnt == 8 && tok[7] - tok[0] == 7 * step;
        for (int64_t f0 = 0; f0 < F; f0 += 8) {
          const int64_t fw = imin(8, F - f0);
          if (direct && fw == 8) {
            at::vec::transpose_mxn<T, 8, 8>(reinterpret_cast<const T*>(tok[0]) + f0, step, dst + f0 * ld + n0, ld);
            continue;
          }
          for (int64_t i = 0; i < 8; ++i) {
            T* t = tile + i * 8;
            if (i >= cnt) {
              for (int f = 0; f < 8; ++f) t[f] = T(0);
            } else if (std::is_same_v<S, T> && src.sf == 1 && fw == 8) {
              // one 32-byte store where the vectors are 8 wide: the transpose's loads forward from it
              if constexpr (kLanes<T> == 8)
                Vectorized<T>::loadu(reinterpret_cast<const T*>(tok[i]) + f0).store(t);
              else
                std::memcpy(t, tok[i] + f0, 8 * sizeof(T));
            } else {
              const S* s = tok[i] + f0 * src.sf;
              int f = 0;
              for (; f < fw; ++f) t[f] = static_cast<T>(s[f * src.sf]);
              for (; f < 8; ++f) t[f] = T(0);
            }
          }
          if (fw == 8) {
            at::vec::transpose_mxn<T, 8, 8>(tile, 8, dst + f0 * ld + n0, ld);
          } else {
            for (int64_t f = 0; f < fw; ++f)
              for (int i = 0; i < 8; ++i) dst[(f0 + f) * ld + n0 + i] = tile[i * 8 + f];
          }
        }
      }
      return;
    }
  }
  src.each(0, N, [&](int64_t n, const S* s) {
    for (int64_t f = 0; f < F; ++f) dst[f * ld + n] = static_cast<T>(s[f * src.sf]);
  });
  for (int64_t f = 0; f < F; ++f)
    for (int64_t n = N; n < ld; ++n) dst[f * ld + n] = T(0);
}

// tokens [n0, n0 + rows) of dst = (or +=) mul * src rows (row stride ld), converted to D.
template <typename D, typename T>
void write_rows(const View<D>& dst, int64_t n0, int64_t rows, int64_t F, const T* src, int64_t ld, T mul,
                bool add) {
  using V = Vectorized<T>;
  constexpr int L = kLanes<T>;
  dst.each(n0, n0 + rows, [&](int64_t n, D* d) {
    const T* s = src + n * ld;
    int64_t f = 0;
    if constexpr (std::is_same_v<D, T>) {
      if (dst.sf == 1) {
        for (; f + L <= F; f += L) {
          V x = V::loadu(s + f) * V(mul);
          if (add) x = x + V::loadu(d + f);
          x.store(d + f);
        }
      }
    }
    for (; f < F; ++f) {
      T x = s[f] * mul;
      if (add) x += static_cast<T>(d[f * dst.sf]);
      d[f * dst.sf] = static_cast<D>(x);
    }
  });
}

template <typename T>
void fill_coords(T* y, T* x, int64_t N, int64_t X, int64_t Np) {
  int64_t r = 0, c = 0;
  for (int64_t n = 0; n < N; ++n) {
    y[n] = static_cast<T>(r);
    x[n] = static_cast<T>(c);
    if (++c == X) {
      c = 0;
      ++r;
    }
  }
  for (int64_t n = N; n < Np; ++n) y[n] = x[n] = T(0);
}

// ---------------------------------------------------------------- blocking and scratch

struct Blocking {
  int64_t N, Np, BM, BN, nkb;
  Blocking(int64_t n, int L) : N(n) {
    Np = round_up(n, L);
    BM = n <= kWholeQueries ? n : kQueryBlock;
    BN = round_up(ceil_div(n, ceil_div(n, kMaxKeys)), L);  // even blocks, none mostly padding
    nkb = ceil_div(n, BN);
  }
  int64_t j0(int64_t jb) const { return jb * BN; }
  int64_t nvalid(int64_t jb) const { return imin(BN, N - jb * BN); }
};

// Bump allocator over one scratch slot; with base == nullptr it only measures.
struct Arena {
  char* base;
  int64_t used = 0;
  template <typename T>
  T* take(int64_t n) {
    const int64_t off = round_up(used, 64);
    used = off + n * static_cast<int64_t>(sizeof(T));
    return base ? reinterpret_cast<T*>(base + off) : nullptr;
  }
};

template <typename T>
struct FwdBuf {
  int64_t N, d, dv, Np, dp, dvp;
  Blocking bk;
  T *ky, *kx, *kt, *v, *q, *s, *rowmax, *o, *m, *l;
  FwdBuf(Arena& a, int64_t N_, int64_t d_, int64_t dv_)
      : N(N_), d(d_), dv(dv_), bk(N_, kLanes<T>) {
    constexpr int L = kLanes<T>;
    Np = bk.Np;
    dp = round_up(d, L);
    dvp = round_up(dv, L);
    ky = a.take<T>(Np);
    kx = a.take<T>(Np);
    kt = a.take<T>(d * Np);
    v = a.take<T>(N * dvp);
    q = a.take<T>(bk.BM * dp);
    s = a.take<T>(bk.BM * bk.BN);
    rowmax = a.take<T>(bk.BM * L);
    o = a.take<T>(bk.BM * dvp);
    m = a.take<T>(bk.BM);
    l = a.take<T>(bk.BM);
  }
};

template <typename T>
struct BwdBuf {
  int64_t N, d, dv, Np, dp, dvp;
  Blocking bk;
  T *ky, *kx, *q, *k, *kt, *vt, *dout, *lse, *delta, *p, *ds, *rowmax, *gq, *gk, *gv;
  BwdBuf(Arena& a, int64_t N_, int64_t d_, int64_t dv_)
      : N(N_), d(d_), dv(dv_), bk(N_, kLanes<T>) {
    constexpr int L = kLanes<T>;
    Np = bk.Np;
    dp = round_up(d, L);
    dvp = round_up(dv, L);
    ky = a.take<T>(Np);
    kx = a.take<T>(Np);
    q = a.take<T>(N * dp);
    k = a.take<T>(N * dp);
    kt = a.take<T>(d * Np);
    vt = a.take<T>(dv * Np);
    dout = a.take<T>(N * dvp);
    lse = a.take<T>(N);
    delta = a.take<T>(N);
    p = a.take<T>(bk.BM * bk.BN);
    ds = a.take<T>(bk.BM * bk.BN);
    rowmax = a.take<T>(bk.BM * L);
    gq = a.take<T>(N * dp);
    gk = a.take<T>(N * dp);
    gv = a.take<T>(N * dvp);
  }
};

// ---------------------------------------------------------------- one problem, forward

// out and lse of queries [q0, q1) of one problem of N tokens on a grid X wide.
template <typename S, typename T, bool kGrid>
void problem_fwd(const FwdBuf<T>& b, int64_t X, T scale, T lg, const View<S>& q, const View<S>& k,
                 const View<S>& v, const View<S>& out, const View<T>& lse, int64_t q0, int64_t q1) {
  using V = Vectorized<T>;
  constexpr int L = kLanes<T>;
  const Blocking& bk = b.bk;
  const int64_t N = b.N, d = b.d, dv = b.dv, Np = b.Np, dp = b.dp, dvp = b.dvp;
  fill_coords(b.ky, b.kx, N, X, Np);
  pack_transposed(k, N, d, b.kt, Np);
  pack_rows(v, 0, N, dv, b.v, dvp, T(1));
  const Coords<T> all{b.ky, b.kx};
  for (int64_t i0 = q0; i0 < q1; i0 += bk.BM) {
    const int64_t M = imin(bk.BM, q1 - i0);
    pack_rows(q, i0, M, d, b.q, dp, scale);
    for (int64_t i = 0; i < M; ++i) {
      b.m[i] = -kInf<T>;
      b.l[i] = T(0);
    }
    for (int64_t jb = 0; jb < bk.nkb; ++jb) {
      const int64_t j0 = bk.j0(jb), nvalid = bk.nvalid(jb), cols = round_up(nvalid, L);
      for (int64_t i = 0; i < M; ++i) V(-kInf<T>).store(b.rowmax + i * L);
      ScoresEpi<T, kGrid> se{b.s, bk.BN, {all.y + i0, all.x + i0}, {all.y + j0, all.x + j0}, nvalid, lg, b.rowmax};
      gemm<T>(M, cols, d, b.q, dp, 1, b.kt + j0, Np, se);
      for (int64_t i = 0; i < M; ++i) {
        T* srow = b.s + i * bk.BN;
        const T m_old = b.m[i];
        const T bmax = vmax_all(V::loadu(b.rowmax + i * L));
        const T m_new = bmax > m_old ? bmax : m_old;
        const V vm(m_new);
        V acc(T(0));
        for (int64_t j = 0; j < cols; j += L) {
          const V p = vexp(V::loadu(srow + j) - vm);
          acc = acc + p;
          p.store(srow + j);
        }
        b.m[i] = m_new;
        if (jb == 0) {  // the first block: nothing to rescale (every row and column, most grids)
          b.l[i] = vsum_all(acc);
          continue;
        }
        const T alpha = std::exp(m_old - m_new);
        b.l[i] = b.l[i] * alpha + vsum_all(acc);
        if (alpha != T(1)) {
          T* orow = b.o + i * dvp;
          for (int64_t f = 0; f < dvp; f += L) (V::loadu(orow + f) * V(alpha)).store(orow + f);
        }
      }
      StoreC<T> oc{b.o, dvp, jb > 0};
      gemm<T>(M, dvp, nvalid, b.s, bk.BN, 1, b.v + j0 * dvp, dvp, oc);
    }
    // normalise by the row sum itself: lse ~ 1e4 carries an fp32 rounding error ~1e-3
    // that exp(-lse) would put into the output
    for (int64_t i = 0; i < M; ++i) {
      T* orow = b.o + i * dvp;
      const V inv(T(1) / b.l[i]);
      for (int64_t f = 0; f < dvp; f += L) (V::loadu(orow + f) * inv).store(orow + f);
    }
    // lse = m + log(l), a vector of rows at a time (into l, no longer needed)
    for (int64_t i = 0; i < M; i += L) {
      const int64_t n = imin(L, M - i);
      (V::loadu(b.m + i, n) + V::loadu(b.l + i, n).log()).store(b.l + i, n);
    }
    lse.each(i0, i0 + M, [&](int64_t i, T* p) { *p = b.l[i]; });
    write_rows(out, i0, M, dv, b.o, dvp, T(1), false);
  }
}

// ---------------------------------------------------------------- one problem, backward

// The tokens of a view equally spaced (v.sx apart), features contiguous.
template <typename S>
inline bool uniform(const View<S>& v, int64_t N) {
  return v.sf == 1 && (N <= v.X || v.sy == v.X * v.sx);
}

// A problem whose k and dout rows are read in place and whose gradients the GEMMs store
// straight into the outputs' tokens (dq = scale * dS K, dk = dS^T (scale q), each added to
// the output with add; dv written): fp32 / fp64 tensors with equally spaced tokens and
// contiguous features, d and dv multiples of the vector width, one query and one key block.
template <typename T>
struct BwdDirect {
  bool on = false, add = false, stream = false;
  T *dq = nullptr, *dk = nullptr, *dv = nullptr;
  int64_t ldq = 0, ldk = 0, ldv = 0;
  const T *aq = nullptr, *ak = nullptr;  // with add: what is added (dq / dk themselves, or slabs)
  int64_t ldaq = 0, ldak = 0;
};

// Gradients of one problem into b.gq (unscaled: times scale on the way out), b.gk, b.gv, or
// with dir.on into the outputs; returns the problem's sum of dS * distance (dL / dlog_gamma).
template <typename SQ, typename SD, typename SO, typename T, bool kGrid>
double problem_bwd(const BwdBuf<T>& b, int64_t X, T scale, T lg, const View<SQ>& q, const View<SQ>& k,
                   const View<SQ>& v, const View<SD>& dout, const View<SO>& out, const View<T>& lse,
                   const BwdDirect<T>& dir) {
  using V = Vectorized<T>;
  constexpr int L = kLanes<T>;
  const Blocking& bk = b.bk;
  const int64_t N = b.N, d = b.d, dv = b.dv, Np = b.Np, dp = b.dp, dvp = b.dvp;
  fill_coords(b.ky, b.kx, N, X, Np);
  pack_rows(q, 0, N, d, b.q, dp, scale);
  const T* Kr = b.k;
  const T* dOr = b.dout;
  int64_t ldk = dp, ldo = dvp;
  bool packed = true;
  if constexpr (std::is_same_v<SQ, T> && std::is_same_v<SD, T>) {
    if (dir.on) {
      Kr = k.p;
      ldk = k.sx;
      dOr = dout.p;
      ldo = dout.sx;
      packed = false;
    }
  }
  if (packed) {
    pack_rows(k, 0, N, d, b.k, dp, T(1));
    pack_rows(dout, 0, N, dv, b.dout, dvp, T(1));
  }
  pack_transposed(k, N, d, b.kt, Np);
  pack_transposed(v, N, dv, b.vt, Np);
  // With the whole row in one key block (every row, column and grid up to kMaxKeys tokens)
  // the probabilities are recomputed exactly as the forward formed them (row max, sum,
  // normalisation) and delta = rowsum(P * dP) (= rowsum(dO * O), since O = P V). With
  // logits ~1e4, exp(s - lse) would carry lse's fp32 rounding (~1e-3) into every P, and an
  // fp16 / bf16 O its own rounding into delta; both then reach dq and dk times |k| and |q|.
  // Longer rows: flash-attention's P = exp(s - lse) and delta = rowsum(dO * O).
  const bool exact = bk.nkb == 1;
  if (!exact) {
    out.each(0, N, [&](int64_t n, const SO* o) {
      const T* g = b.dout + n * dvp;
      T acc = 0;
      for (int64_t f = 0; f < dv; ++f) acc += g[f] * static_cast<T>(o[f * out.sf]);
      b.delta[n] = acc;
    });
    lse.each(0, N, [&](int64_t n, const T* p) { b.lse[n] = *p; });
  }
  const Coords<T> all{b.ky, b.kx};
  double dlg = 0;
  for (int64_t i0 = 0; i0 < N; i0 += bk.BM) {
    const int64_t M = imin(bk.BM, N - i0);
    const T* Q = b.q + i0 * dp;
    const T* dO = dOr + i0 * ldo;
    for (int64_t jb = 0; jb < bk.nkb; ++jb) {
      const int64_t j0 = bk.j0(jb), nvalid = bk.nvalid(jb), cols = round_up(nvalid, L);
      const Coords<T> qc{all.y + i0, all.x + i0}, kc{all.y + j0, all.x + j0};
      if (exact) {
        for (int64_t i = 0; i < M; ++i) V(-kInf<T>).store(b.rowmax + i * L);
        ScoresEpi<T, kGrid> se{b.p, bk.BN, qc, kc, nvalid, lg, b.rowmax};
        gemm<T>(M, cols, d, Q, dp, 1, b.kt + j0, Np, se);
        softmax_exp_rows(b.p, bk.BN, M, cols, b.rowmax, b.lse);  // b.lse: 1 / rowsum (unused otherwise)
      } else {
        ProbsEpi<T, kGrid> pe{b.p, bk.BN, qc, kc, nvalid, lg, b.lse + i0};
        gemm<T>(M, cols, d, Q, dp, 1, b.kt + j0, Np, pe);
      }
      if (exact) {
        for (int64_t i = 0; i < M; ++i) V(T(0)).store(b.rowmax + i * L);  // rowsum(P * dP) per lane
        DProbsEpi<T> dpe{b.p, b.ds, bk.BN, b.lse, b.rowmax};
        gemm<T>(M, cols, dv, dO, ldo, 1, b.vt + j0, Np, dpe);
        dlg += static_cast<double>(ds_from_dp_acc<T, kGrid>(b.p, b.ds, bk.BN, M, cols, qc, kc, b.rowmax));
      } else {
        DScoresEpi<T, kGrid> de{b.p, b.ds, bk.BN, qc, kc, b.delta + i0, V(T(0))};
        gemm<T>(M, cols, dv, dO, ldo, 1, b.vt + j0, Np, de);
        dlg += static_cast<double>(hsum(de.dlg));
      }
      if (!packed) {  // one query block and one key block: i0 = j0 = 0
        StoreScaled<T> dvc{dir.dv, dir.ldv, T(1), false, nullptr, 0, dir.stream};
        gemm<T>(nvalid, dvp, M, b.p, 1, bk.BN, dO, ldo, dvc);  // dV = P^T dO
        StoreScaled<T> dkc{dir.dk, dir.ldk, T(1), dir.add, dir.ak, dir.ldak, dir.stream};
        gemm<T>(nvalid, dp, M, b.ds, 1, bk.BN, Q, dp, dkc);  // dK (+)= dS^T (scale q)
        StoreScaled<T> dqc{dir.dq, dir.ldq, scale, dir.add, dir.aq, dir.ldaq, dir.stream};
        gemm<T>(M, dp, nvalid, b.ds, bk.BN, 1, Kr, ldk, dqc);  // dQ (+)= scale dS K
        continue;
      }
      StoreC<T> dvc{b.gv + j0 * dvp, dvp, i0 > 0};
      gemm<T>(nvalid, dvp, M, b.p, 1, bk.BN, dO, ldo, dvc);  // dV += P^T dO
      StoreC<T> dkc{b.gk + j0 * dp, dp, i0 > 0};
      gemm<T>(nvalid, dp, M, b.ds, 1, bk.BN, Q, dp, dkc);  // dK += dS^T (scale q)
      StoreC<T> dqc{b.gq + i0 * dp, dp, jb > 0};
      gemm<T>(M, dp, nvalid, b.ds, bk.BN, 1, Kr + j0 * ldk, ldk, dqc);  // dQ += dS K
    }
  }
  return dlg;
}

// ---------------------------------------------------------------- tasks

template <typename T>
T log_gamma_of(const MasaArgs& a, int64_t h) {
  return static_cast<const T*>(a.log_gamma)[h];
}

int64_t fwd_splits(const MasaArgs& a, int L) {
  if (a.mode != MasaMode::full) return 1;
  const Blocking bk(a.H * a.W, L);
  return imax(1, imin(a.query_splits, ceil_div(a.H * a.W, bk.BM)));
}

template <typename T>
int64_t fwd_scratch(const MasaArgs& a) {
  Arena ar{nullptr};
  if (a.mode == MasaMode::full) {
    FwdBuf<T>(ar, a.H * a.W, a.d, a.dv);
    return ar.used;
  }
  Arena aw{nullptr}, ah{nullptr};
  FwdBuf<T>(aw, a.W, a.d, a.dv);
  FwdBuf<T>(ah, a.H, a.d, a.dv);
  return imax(aw.used, ah.used);
}

// One pass of the decomposed form (Axis::w or Axis::h) over every row or column of (b, head).
template <typename S, typename T>
void line_pass_fwd(Arena ar, const MasaArgs& a, Axis axis, int64_t b, int64_t h, const MasaTensor& vin,
                   const MasaTensor& out, const MasaTensor& lse) {
  const masa::Pass ps = masa::pass_of(axis, a.H, a.W);
  const FwdBuf<T> buf(ar, ps.N(), a.d, a.dv);
  const T lg = log_gamma_of<T>(a, h), scale = static_cast<T>(a.scale);
  for (int64_t r = 0; r < ps.R; ++r) {
    const masa::Problem pb{b, h, r};
    problem_fwd<S, T, false>(buf, ps.X, scale, lg, view_of<S>(a.q, axis, pb, ps.X), view_of<S>(a.k, axis, pb, ps.X),
                             view_of<S>(vin, axis, pb, ps.X), view_of<S>(out, axis, pb, ps.X),
                             lse_view_of<T>(lse, axis, pb, ps.X), 0, ps.N());
  }
}

template <typename S, typename T>
void fwd_tasks(const MasaArgs& a, int64_t slot, int64_t begin, int64_t end) {
  const int64_t splits = fwd_splits(a, kLanes<T>);
  for (int64_t task = begin; task < end; ++task) {
    Arena ar{static_cast<char*>(a.scratch) + slot * a.scratch_slot_bytes};
    if (a.mode == MasaMode::full) {
      const int64_t z = task / splits, part = task % splits;
      const int64_t b = z / a.heads, h = z % a.heads, N = a.H * a.W;
      const FwdBuf<T> buf(ar, N, a.d, a.dv);
      const int64_t chunk = round_up(ceil_div(N, splits), buf.bk.BM);
      const int64_t q0 = part * chunk, q1 = imin(N, q0 + chunk);
      if (q0 >= q1) continue;
      const masa::Problem pb{b, h, 0};
      const T lg = log_gamma_of<T>(a, h), scale = static_cast<T>(a.scale);
      problem_fwd<S, T, true>(buf, a.W, scale, lg, view_of<S>(a.q, Axis::full, pb, a.W),
                              view_of<S>(a.k, Axis::full, pb, a.W), view_of<S>(a.v, Axis::full, pb, a.W),
                              view_of<S>(a.out, Axis::full, pb, a.W), lse_view_of<T>(a.lse, Axis::full, pb, a.W),
                              q0, q1);
      continue;
    }
    // decomposed: along W into v_mid, then along H over v_mid while this head's slab is in cache
    const int64_t b = task / a.heads, h = task % a.heads;
    line_pass_fwd<S, T>(ar, a, Axis::w, b, h, a.v, a.v_mid, a.lse_w);
    line_pass_fwd<S, T>(ar, a, Axis::h, b, h, a.v_mid, a.out, a.lse);
  }
}

// Backward scratch: per-problem buffers, plus for the decomposed form the (H, W) slabs of
// the dq / dk accumulators (the H pass's parts; fp32 / fp64 outputs serve as their own
// where the W pass is not direct) and of dv_mid.
template <typename S, typename T>
struct BwdSlabs {
  T *dq, *dk, *dv_mid;
  int64_t dp, dvp;
  BwdSlabs(Arena& ar, const MasaArgs& a) {
    constexpr int L = kLanes<T>;
    dp = round_up(a.d, L);
    dvp = round_up(a.dv, L);
    dq = dk = dv_mid = nullptr;
    if (a.mode != MasaMode::decomposed) return;
    dq = ar.take<T>(a.H * a.W * dp);
    dk = ar.take<T>(a.H * a.W * dp);
    dv_mid = ar.take<T>(a.H * a.W * dvp);
  }
};

template <typename S, typename T>
int64_t bwd_scratch(const MasaArgs& a) {
  Arena ar{nullptr};
  BwdSlabs<S, T>(ar, a);
  const int64_t base = ar.used;
  if (a.mode == MasaMode::full) {
    BwdBuf<T>(ar, a.H * a.W, a.d, a.dv);
    return ar.used;
  }
  Arena aw{nullptr, base}, ah{nullptr, base};
  BwdBuf<T>(aw, a.W, a.d, a.dv);
  BwdBuf<T>(ah, a.H, a.d, a.dv);
  return imax(aw.used, ah.used);
}

// Where one pass's gradients go: dq, dk, dv of each problem are written (or added) to
// these tensors, seen along the pass's axis.
// With from_slab (direct problems only, see bwd_direct) dq and dk are written as this pass's
// part plus add_q / add_k, the earlier pass's parts in (H, W) slabs of type T; with stream
// the outputs are written with streaming stores (written once, never read back here).
struct BwdTargets {
  MasaTensor dq, dk, dv;
  bool add_dq_dk;
  MasaTensor add_q{}, add_k{};
  bool from_slab = false, stream = false;
};

// Whether a pass's problems take problem_bwd's direct path (BwdDirect).
template <typename SQ, typename SD, typename DQ, typename DV, typename T>
bool bwd_direct(const MasaArgs& a, Axis axis, int64_t b, int64_t h, const MasaTensor& dout, const BwdTargets& tg) {
  if constexpr (std::is_same_v<SQ, T> && std::is_same_v<SD, T> && std::is_same_v<DQ, T> && std::is_same_v<DV, T>) {
    constexpr int L = kLanes<T>;
    const masa::Pass ps = masa::pass_of(axis, a.H, a.W);
    const int64_t X = ps.X, N = ps.N();
    const Blocking bk(N, L);
    const masa::Problem p0{b, h, 0};
    return bk.nkb == 1 && bk.BM == N && a.d % L == 0 && a.dv % L == 0 &&
           uniform(view_of<SQ>(a.k, axis, p0, X), N) && uniform(view_of<SD>(dout, axis, p0, X), N) &&
           uniform(view_of<DQ>(tg.dq, axis, p0, X), N) && uniform(view_of<DQ>(tg.dk, axis, p0, X), N) &&
           uniform(view_of<DV>(tg.dv, axis, p0, X), N);
  } else {
    return false;
  }
}

// Streaming stores only where every register-tile row fills whole 64-byte lines.
template <typename T>
bool whole_lines(const MasaTensor& t, Axis axis, int64_t F) {
  const masa::Strides6 s = masa::map_strides(axis, t.stride);
  return std::is_same_v<T, float> && (F * sizeof(T)) % 64 == 0 && (s.x * sizeof(T)) % 64 == 0 &&
         (s.y * sizeof(T)) % 64 == 0 && (t.stride[0] * sizeof(T)) % 64 == 0 && (t.stride[1] * sizeof(T)) % 64 == 0 &&
         reinterpret_cast<uintptr_t>(t.data) % 64 == 0;
}

template <typename SQ, typename SD, typename SO, typename DQ, typename DV, typename T>
double line_pass_bwd(Arena ar, const MasaArgs& a, Axis axis, int64_t b, int64_t h, const MasaTensor& vin,
                     const MasaTensor& dout, const MasaTensor& out, const MasaTensor& lse, const BwdTargets& tg) {
  const masa::Pass ps = masa::pass_of(axis, a.H, a.W);
  const BwdBuf<T> buf(ar, ps.N(), a.d, a.dv);
  const T lg = log_gamma_of<T>(a, h), scale = static_cast<T>(a.scale);
  const int64_t X = ps.X, N = ps.N();
  BwdDirect<T> dir;
  dir.on = bwd_direct<SQ, SD, DQ, DV, T>(a, axis, b, h, dout, tg);
  dir.add = tg.add_dq_dk;
  dir.stream = dir.on && tg.stream && whole_lines<T>(tg.dq, axis, a.d) && whole_lines<T>(tg.dk, axis, a.d) &&
               whole_lines<T>(tg.dv, axis, a.dv);
  double dlg = 0;
  for (int64_t r = 0; r < ps.R; ++r) {
    const masa::Problem pb{b, h, r};
    if constexpr (std::is_same_v<DQ, T> && std::is_same_v<DV, T>) {
      if (dir.on) {
        const View<DQ> tq = view_of<DQ>(tg.dq, axis, pb, X), tk = view_of<DQ>(tg.dk, axis, pb, X);
        const View<DV> tv = view_of<DV>(tg.dv, axis, pb, X);
        dir.dq = tq.p, dir.ldq = tq.sx;
        dir.dk = tk.p, dir.ldk = tk.sx;
        dir.dv = tv.p, dir.ldv = tv.sx;
        dir.aq = tq.p, dir.ldaq = tq.sx;
        dir.ak = tk.p, dir.ldak = tk.sx;
        if (tg.from_slab) {
          const View<T> sq = view_of<T>(tg.add_q, axis, pb, X), sk = view_of<T>(tg.add_k, axis, pb, X);
          dir.aq = sq.p, dir.ldaq = sq.sx;
          dir.ak = sk.p, dir.ldak = sk.sx;
        }
      }
    }
    if (axis == Axis::full) {
      dlg += problem_bwd<SQ, SD, SO, T, true>(buf, X, scale, lg, view_of<SQ>(a.q, axis, pb, X),
                                              view_of<SQ>(a.k, axis, pb, X), view_of<SQ>(vin, axis, pb, X),
                                              view_of<SD>(dout, axis, pb, X), view_of<SO>(out, axis, pb, X),
                                              lse_view_of<T>(lse, axis, pb, X), dir);
    } else {
      dlg += problem_bwd<SQ, SD, SO, T, false>(buf, X, scale, lg, view_of<SQ>(a.q, axis, pb, X),
                                               view_of<SQ>(a.k, axis, pb, X), view_of<SQ>(vin, axis, pb, X),
                                               view_of<SD>(dout, axis, pb, X), view_of<SO>(out, axis, pb, X),
                                               lse_view_of<T>(lse, axis, pb, X), dir);
    }
    if (dir.on) continue;
    write_rows(view_of<DQ>(tg.dq, axis, pb, X), 0, N, a.d, buf.gq, buf.dp, scale, tg.add_dq_dk);
    write_rows(view_of<DQ>(tg.dk, axis, pb, X), 0, N, a.d, buf.gk, buf.dp, T(1), tg.add_dq_dk);
    write_rows(view_of<DV>(tg.dv, axis, pb, X), 0, N, a.dv, buf.gv, buf.dvp, T(1), false);
  }
  return dlg;
}

template <typename S, typename T>
void bwd_tasks(const MasaArgs& a, int64_t slot, int64_t begin, int64_t end) {
  double* parts = static_cast<double*>(a.dlog_gamma_parts);
  for (int64_t task = begin; task < end; ++task) {
    Arena ar{static_cast<char*>(a.scratch) + slot * a.scratch_slot_bytes};
    const int64_t b = task / a.heads, h = task % a.heads;
    if (a.mode == MasaMode::full) {
      BwdTargets tg{a.grad_q, a.grad_k, a.grad_v, false};
      tg.stream = true;
      parts[task] = line_pass_bwd<S, S, S, S, S, T>(ar, a, Axis::full, b, h, a.v, a.dout, a.out, a.lse, tg);
      continue;
    }
    const BwdSlabs<S, T> sl(ar, a);
    // this head's accumulators where the W pass is not direct: the outputs themselves when
    // they have the compute type
    MasaTensor dq_acc = a.grad_q, dk_acc = a.grad_k;
    const masa::Problem pb0{b, h, 0};
    if constexpr (!std::is_same_v<S, T>) {
      dq_acc = slab(sl.dq, a.W, sl.dp);
      dk_acc = slab(sl.dk, a.W, sl.dp);
    }
    const MasaTensor dv_mid = slab(sl.dv_mid, a.W, sl.dvp);
    // the pass along H (last in the forward) first: its dv is dv_mid, the dout of the W pass
    double dlg;
    // fp32 / fp64 with the pass along W direct: the H pass's dq / dk parts go to the slabs
    // (in cache) and the W pass writes the outputs once, streamed (no read of their lines)
    BwdTargets tw{a.grad_q, a.grad_k, a.grad_v, true, slab(sl.dq, a.W, sl.dp), slab(sl.dk, a.W, sl.dp), true, true};
    if (std::is_same_v<S, T> && bwd_direct<S, T, T, S, T>(a, Axis::w, b, h, dv_mid, tw)) {
      const BwdTargets th{tw.add_q, tw.add_k, dv_mid, false};
      dlg = line_pass_bwd<S, S, S, T, T, T>(ar, a, Axis::h, b, h, a.v_mid, a.dout, a.out, a.lse, th);
      dlg += line_pass_bwd<S, T, S, T, S, T>(ar, a, Axis::w, b, h, a.v, dv_mid, a.v_mid, a.lse_w, tw);
    } else if constexpr (std::is_same_v<S, T>) {
      const BwdTargets th{a.grad_q, a.grad_k, dv_mid, false};
      dlg = line_pass_bwd<S, S, S, T, T, T>(ar, a, Axis::h, b, h, a.v_mid, a.dout, a.out, a.lse, th);
      const BwdTargets tw{a.grad_q, a.grad_k, a.grad_v, true};
      dlg += line_pass_bwd<S, T, S, T, S, T>(ar, a, Axis::w, b, h, a.v, dv_mid, a.v_mid, a.lse_w, tw);
    } else {
      // slabs hold one head: address them as batch 0, head 0 (their b/h strides are 0)
      const BwdTargets th{dq_acc, dk_acc, dv_mid, false};
      dlg = line_pass_bwd<S, S, S, T, T, T>(ar, a, Axis::h, b, h, a.v_mid, a.dout, a.out, a.lse, th);
      const BwdTargets tw{dq_acc, dk_acc, a.grad_v, true};
      dlg += line_pass_bwd<S, T, S, T, S, T>(ar, a, Axis::w, b, h, a.v, dv_mid, a.v_mid, a.lse_w, tw);
      const int64_t N = a.H * a.W;
      write_rows(view_of<S>(a.grad_q, Axis::full, pb0, a.W), 0, N, a.d, sl.dq, sl.dp, T(1), false);
      write_rows(view_of<S>(a.grad_k, Axis::full, pb0, a.W), 0, N, a.d, sl.dk, sl.dp, T(1), false);
    }
    parts[task] = dlg;
  }
  stream_fence();
}

template <typename Fn>
void by_dtype(MasaDtype dt, const Fn& fn) {
  switch (dt) {
    case MasaDtype::f64: fn(double{}, double{}); break;
    case MasaDtype::f16: fn(c10::Half{}, float{}); break;
    case MasaDtype::bf16: fn(c10::BFloat16{}, float{}); break;
    default: fn(float{}, float{}); break;
  }
}

}  // namespace

MasaPlan masa_fwd_plan(const MasaArgs& a) {
  MasaPlan p;
  by_dtype(a.dtype, [&](auto, auto t) {
    using T = decltype(t);
    p.tasks = a.B * a.heads * fwd_splits(a, kLanes<T>);
    p.scratch_bytes = fwd_scratch<T>(a);
  });
  return p;
}

void masa_fwd_run(const MasaArgs& a, int64_t slot, int64_t begin, int64_t end) {
  by_dtype(a.dtype, [&](auto s, auto t) { fwd_tasks<decltype(s), decltype(t)>(a, slot, begin, end); });
}

MasaPlan masa_bwd_plan(const MasaArgs& a) {
  MasaPlan p;
  by_dtype(a.dtype, [&](auto s, auto t) {
    p.tasks = a.B * a.heads;
    p.scratch_bytes = bwd_scratch<decltype(s), decltype(t)>(a);
  });
  return p;
}

void masa_bwd_run(const MasaArgs& a, int64_t slot, int64_t begin, int64_t end) {
  by_dtype(a.dtype, [&](auto s, auto t) { bwd_tasks<decltype(s), decltype(t)>(a, slot, begin, end); });
}

}  // namespace vitattn::cpu::CPU_CAPABILITY
