// Register-tiled GEMM for small and medium CPU tiles, vectorised with at::vec.
//
//   C (M x N) = [bias +] A (M x K) * B (K x N)     or, with accumulate, C += A * B;
//   then, with row_scale, row i of C multiplied by row_scale[i].
//
// A is read by scalar broadcasts through any two strides (a_rs between rows, a_cs between
// k), so A^T, a strided slice or a padded buffer are all read in place. B is read by
// vectors along n, row-major with row stride ldb, in panels of panel_w columns stored
// panel_stride elements apart: a plain row-major B is a single panel (panel_w = 0 means N);
// a B packed panel by panel (each K x panel_w block contiguous, see tile_gemm_panel_width)
// keeps a panel's rows in a few cache lines, which matters when ldb is a large power of
// two (4 KiB aliasing in L1). N must be a multiple of the vector width (callers pad); M and
// K are arbitrary.
//
// Each tile keeps MR x NV vector accumulators in registers (4 x 3, 6 x 2 or 8 x 1 vectors:
// 12 or fewer of the 16 AVX2 registers), so one B load feeds MR fused multiply-adds. K is
// split into blocks of KC so a B panel block stays in L1 across the row tiles. The
// summation order over k is fixed (k ascending), whatever the shapes or the caller's threads.
//
// Include only from csrc/cpu/*_kernels.cpp (compiled once per instruction set, see isa.h).
#pragma once

#ifndef CPU_CAPABILITY
#error "common/tile_gemm.h belongs in a *_kernels.cpp file (CPU_CAPABILITY is not defined)"
#endif

#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace vitattn::cpu::CPU_CAPABILITY {

template <typename T>
struct TileGemm {
  int64_t M = 0, N = 0, K = 0;
  const T* A = nullptr;
  int64_t a_rs = 0, a_cs = 0;
  const T* B = nullptr;
  int64_t ldb = 0, panel_w = 0, panel_stride = 0;
  T* C = nullptr;
  int64_t ldc = 0;
  bool accumulate = false;
  const T* bias = nullptr;       // (N,): initial value of every row (ignored with accumulate)
  const T* row_scale = nullptr;  // (M,): applied to the finished rows
};

namespace tile_gemm_detail {

// init: 0 zeros, 1 the current C, 2 the bias row; scale: row factors applied at the store, or null
template <typename T, int MR, int NV>
inline void tile(int64_t K, const T* A, int64_t a_rs, int64_t a_cs, const T* B, int64_t ldb, T* C, int64_t ldc,
                 int init, const T* bias, const T* scale) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  // fully unrolled (GCC does not always do it unasked): the accumulators must stay in registers
  Vec c[MR][NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const Vec b0 = init == 2 ? Vec::loadu(bias + v * W) : Vec(T(0));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) c[r][v] = init == 1 ? Vec::loadu(C + r * ldc + v * W) : b0;
  }
  for (int64_t k = 0; k < K; ++k) {
    Vec b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = Vec::loadu(B + k * ldb + v * W);
    const T* a = A + k * a_cs;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const Vec ar(a[r * a_rs]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[r][v] = at::vec::fmadd(ar, b[v], c[r][v]);
    }
  }
  if (scale != nullptr) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const Vec f(scale[r]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[r][v] = c[r][v] * f;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) c[r][v].store(C + r * ldc + v * W);
}

// One tile of R <= 8 rows (R known only at run time).
template <typename T, int MR, int NV>
inline void short_tile(int64_t R, int64_t K, const T* A, int64_t a_rs, int64_t a_cs, const T* B, int64_t ldb, T* C,
                       int64_t ldc, int init, const T* bias, const T* scale) {
  switch (R) {
#define VITATTN_TILE_REST(R) \
  case R: tile<T, (R <= MR ? R : 1), NV>(K, A, a_rs, a_cs, B, ldb, C, ldc, init, bias, scale); break;
    VITATTN_TILE_REST(8)
    VITATTN_TILE_REST(7)
    VITATTN_TILE_REST(6)
    VITATTN_TILE_REST(5)
    VITATTN_TILE_REST(4)
    VITATTN_TILE_REST(3)
    VITATTN_TILE_REST(2)
    VITATTN_TILE_REST(1)
#undef VITATTN_TILE_REST
    default: break;
  }
}

// All M rows of one column chunk of NV vectors: full MR-row tiles, then the rest. A short
// rest is merged with the last full tile and the two are split evenly (49 rows in 6-row
// tiles: 7 x 6, 4, 3 rather than 8 x 6, 1): a tile of one or two rows cannot hide the FMA
// latency and costs nearly as much as a full one.
template <typename T, int MR, int NV>
inline void rows(int64_t M, int64_t K, const T* A, int64_t a_rs, int64_t a_cs, const T* B, int64_t ldb, T* C,
                 int64_t ldc, int init, const T* bias, const T* scale) {
  constexpr int64_t W = at::vec::Vectorized<T>::size();
  const int64_t rem = M % MR;
  const int64_t full_end = (rem != 0 && M > MR) ? M - rem - MR : M - rem;
  int64_t i = 0;
  for (; i < full_end; i += MR) {
    if (init == 1 && i + 2 * MR <= M) {
      // the next tile's C rows: when C is large (a weight-gradient partial) they come from
      // L3, and without this the tile would wait for them before its first multiply-add
      for (int r = 0; r < MR; ++r) {
        const T* nxt = C + (i + MR + r) * ldc;
        __builtin_prefetch(nxt, 1);
        __builtin_prefetch(nxt + NV * W - 1, 1);
      }
    }
    tile<T, MR, NV>(K, A + i * a_rs, a_rs, a_cs, B, ldb, C + i * ldc, ldc, init, bias,
                    scale != nullptr ? scale + i : nullptr);
  }
  int64_t left = M - i;  // 0 .. 2 * MR - 1 rows
  if (left > MR) {
    const int64_t first = (left + 1) / 2;
    short_tile<T, MR, NV>(first, K, A + i * a_rs, a_rs, a_cs, B, ldb, C + i * ldc, ldc, init, bias,
                          scale != nullptr ? scale + i : nullptr);
    i += first;
    left -= first;
  }
  if (left > 0)
    short_tile<T, MR, NV>(left, K, A + i * a_rs, a_rs, a_cs, B, ldb, C + i * ldc, ldc, init, bias,
                          scale != nullptr ? scale + i : nullptr);
}

}  // namespace tile_gemm_detail

// Panel width (a multiple of the vector width) for packing a B with N columns: three or
// two vectors, whichever leaves no partial panel (three when neither does).
template <typename T>
inline int64_t tile_gemm_panel_width(int64_t N) {
  constexpr int64_t W = at::vec::Vectorized<T>::size();
  return (N % (3 * W) != 0 && N % (2 * W) == 0) ? 2 * W : 3 * W;
}

template <typename T>
void tile_gemm(const TileGemm<T>& g) {
  using namespace tile_gemm_detail;
  constexpr int64_t W = at::vec::Vectorized<T>::size();
  constexpr int64_t KC = 256;
  if (g.M <= 0 || g.N <= 0) return;
  const int64_t panel_w = g.panel_w > 0 ? g.panel_w : g.N;
  const int64_t K = g.K > 0 ? g.K : 0;
  for (int64_t k0 = 0; k0 < K || (k0 == 0 && K == 0); k0 += KC) {
    const int64_t kc = K - k0 < KC ? K - k0 : KC;
    const int init = (g.accumulate || k0 > 0) ? 1 : (g.bias != nullptr ? 2 : 0);
    const bool last = k0 + KC >= K;
    const T* scale = last ? g.row_scale : nullptr;
    const T* Ak = g.A + k0 * g.a_cs;
    for (int64_t n0 = 0; n0 < g.N; n0 += panel_w) {
      const int64_t w = g.N - n0 < panel_w ? g.N - n0 : panel_w;
      const T* Bp = g.B + (n0 / panel_w) * g.panel_stride + k0 * g.ldb;
      // chunks of three vectors, or of two where that splits the panel evenly and three does not
      const bool pairs = w % (3 * W) != 0 && w % (2 * W) == 0;
      for (int64_t c0 = 0; c0 < w;) {
        const int64_t left = w - c0;
        T* Cc = g.C + n0 + c0;
        const T* bias = g.bias != nullptr ? g.bias + n0 + c0 : nullptr;
        if (left >= 3 * W && !pairs) {
          rows<T, 4, 3>(g.M, kc, Ak, g.a_rs, g.a_cs, Bp + c0, g.ldb, Cc, g.ldc, init, bias, scale);
          c0 += 3 * W;
        } else if (left >= 2 * W) {
          rows<T, 6, 2>(g.M, kc, Ak, g.a_rs, g.a_cs, Bp + c0, g.ldb, Cc, g.ldc, init, bias, scale);
          c0 += 2 * W;
        } else {
          rows<T, 8, 1>(g.M, kc, Ak, g.a_rs, g.a_cs, Bp + c0, g.ldb, Cc, g.ldc, init, bias, scale);
          c0 += W;
        }
      }
    }
  }
}

// The same with positional arguments, for a plain row-major B (one panel) and no bias or
// row scale: C (M x N) (+)= A . B with A(r, k) = A[r * a_rs + k * a_cs].
template <typename T>
inline void tile_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_rs, int64_t a_cs, const T* B,
                      int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  TileGemm<T> g;
  g.M = M, g.N = N, g.K = K;
  g.A = A, g.a_rs = a_rs, g.a_cs = a_cs;
  g.B = B, g.ldb = ldb;
  g.C = C, g.ldc = ldc;
  g.accumulate = accumulate;
  tile_gemm(g);
}

}  // namespace vitattn::cpu::CPU_CAPABILITY
