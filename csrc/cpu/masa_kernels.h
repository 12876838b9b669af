// MaSA CPU kernels: plain C++ (no torch headers), compiled once per instruction set.
//
// The torch side (masa.cpp) packs every problem into contiguous buffers of the compute
// type T (float for fp16/bf16/fp32 inputs, double for fp64) and calls the task ranges
// below from at::parallel_for. A problem z is one grid-attention instance over the
// N = Y * X tokens of a Y x X grid (full form: the H x W grid; decomposed: one row or
// column). The buffers, per problem z:
//   q    (Np, dp)          queries, pre-multiplied by scale, rows >= N and cols >= d zero
//   k    (Np, dp)          keys, row-major (backward dq pass)
//   kt   (nblk, d, BN)     keys transposed per key block (the S = Q K^T operand)
//   v    (Np, dvp)         values, row-major (forward)
//   vt   (nblk, dv, BN)    values transposed per key block (backward dP = dO V^T operand)
//   dout (Np, dvp), lse (Np), delta (Np)
// Np = nblk * BN, BN and the padded feature widths dp/dvp are multiples of the vector
// width, so the inner loops have no tails. The decay log(gamma) * (|dy| + |dx|) is
// computed from token coordinates on the fly: no N x N tensor exists, only BM x BN tiles.
#pragma once

#include <cstdint>

namespace vitattn_cpu {

template <typename T>
struct MasaArgs {
  // geometry
  int64_t Z = 0;      // problems (B * heads * R)
  int64_t R = 1;      // problems per (batch, head): log_gamma index is (z / R) % heads
  int64_t heads = 1;
  int64_t N = 0, X = 1;  // real tokens per problem and grid width (Y = N / X)
  int64_t Np = 0, BN = 0, nblk = 0;  // padded tokens, key block, number of key blocks
  int64_t BM = 0, nmblk = 0;         // query block and number of query blocks (over N)
  int64_t d = 0, dp = 0, dv = 0, dvp = 0;
  const T* log_gamma = nullptr;  // (heads,)
  const T* coord_y = nullptr;    // (Np,) token row, padded tokens get 0
  const T* coord_x = nullptr;    // (Np,) token column
  // inputs
  const T* q = nullptr;
  const T* k = nullptr;
  const T* kt = nullptr;
  const T* v = nullptr;
  const T* vt = nullptr;
  const T* dout = nullptr;
  const T* lse_in = nullptr;
  const T* delta = nullptr;
  T scale = 1;  // applied to dq (q is already scaled)
  // outputs (problem-major like the inputs)
  T* out = nullptr;     // (Z, Np, dvp)
  T* lse = nullptr;     // (Z, Np)
  T* dq = nullptr;      // (Z, Np, dp)
  T* dk = nullptr;      // (Z, Np, dp)
  T* dv_out = nullptr;  // (Z, Np, dvp)
  T* dlg = nullptr;     // (Z, nmblk) partial sums of dL/dlog_gamma, reduced by the caller
};

// Each function runs tasks [begin, end): forward and dq tasks are (z, query block),
// task = z * nmblk + block; dk/dv tasks are (z, key block), task = z * nblk + block.
#define VITATTN_CPU_DECLARE(NS)                                                   \
  namespace NS {                                                                  \
  void fwd_f32(const MasaArgs<float>& a, int64_t begin, int64_t end);             \
  void fwd_f64(const MasaArgs<double>& a, int64_t begin, int64_t end);            \
  void bwd_dkdv_f32(const MasaArgs<float>& a, int64_t begin, int64_t end);        \
  void bwd_dkdv_f64(const MasaArgs<double>& a, int64_t begin, int64_t end);       \
  void bwd_dq_f32(const MasaArgs<float>& a, int64_t begin, int64_t end);          \
  void bwd_dq_f64(const MasaArgs<double>& a, int64_t begin, int64_t end);         \
  }

VITATTN_CPU_DECLARE(base)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define VITATTN_CPU_HAVE_AVX2 1
VITATTN_CPU_DECLARE(avx2)
#endif

// Vector width (elements of T in one 32-byte vector): paddings must be multiples of it.
constexpr int64_t kVecBytes = 32;

}  // namespace vitattn_cpu
