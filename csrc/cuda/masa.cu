// MaSA CUDA kernels (fp16 / bf16 / fp32 inputs, fp32 compute and statistics).
//
// Two families, both warp-per-row with warp-shuffle softmax reductions:
//
// * on-chip ("row") kernels, for problems of N <= kRowMaxTokens tokens (the rows and
//   columns of the decomposed form): one thread block loads the problem's q, k, v (and dO)
//   into shared memory once; each warp owns query rows (and, in backward, key rows), lanes
//   own keys, the softmax is two warp reductions, and nothing but the results goes back to
//   global memory.
// * flash kernels, for any N: a block owns a tile of query rows (forward, dq) or key rows
//   (dk/dv) and streams 32-token tiles of the other side through shared memory with the
//   online softmax; per-row accumulators live in registers (RPW rows x U features per lane).
//
// The decay log(gamma) * (|dy| + |dx|) is computed from token indices; no N x N tensor.
// Backward recomputes probabilities from the saved log-sum-exp. dlog_gamma is reduced
// deterministically: per-warp partials summed in a fixed order per block, block partials
// summed by the caller.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math_constants.h>

#include "masa.h"

namespace vitattn_cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kTile = 32;        // tokens per streamed tile: one per lane
constexpr int kFlashWarps = 4;   // warps per flash block
constexpr int kRowMaxWarps = 8;  // warps per on-chip block

// ---------------------------------------------------------------- element access

template <typename T>
__device__ __forceinline__ float ld(const T* p);
template <>
__device__ __forceinline__ float ld<float>(const float* p) { return __ldg(p); }
template <>
__device__ __forceinline__ float ld<__half>(const __half* p) { return __half2float(__ldg(p)); }
template <>
__device__ __forceinline__ float ld<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(__ldg(p));
}

template <typename T>
__device__ __forceinline__ void st(T* p, float v);
template <>
__device__ __forceinline__ void st<float>(float* p, float v) { *p = v; }
template <>
__device__ __forceinline__ void st<__half>(__half* p, float v) { *p = __float2half_rn(v); }
template <>
__device__ __forceinline__ void st<__nv_bfloat16>(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// problem z -> (batch, head, r) and token offsets: the shared geometry (masa_geometry.h)
__device__ __forceinline__ masa::Problem decode(int z, int R, int heads) { return masa::problem_of<int>(z, R, heads); }

__device__ __forceinline__ long long base6(const Strides6& s, const masa::Problem& p) {
  return masa::problem_offset(s, p);
}
__device__ __forceinline__ long long tok6(const Strides6& s, int n, int X) { return masa::token_offset(s, n, X); }
__device__ __forceinline__ long long off5(const Strides5& s, const masa::Problem& p, int n, int X) {
  return masa::problem_offset(s, p) + masa::token_offset(s, n, X);
}

__device__ __forceinline__ float manhattan(int i, int j, int X) {
  return (float)(abs(i / X - j / X) + abs(i % X - j % X));
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

__device__ __forceinline__ float dot(const float* a, const float* b, int n) {
  float acc = 0.f;
  for (int f = 0; f < n; ++f) acc = fmaf(a[f], b[f], acc);
  return acc;
}

// rows [n0, n0 + rows) of a problem's (N x F) operand -> smem (rows x ld), zero past N
template <typename T>
__device__ __forceinline__ void load_rows(float* dst, int ldd, const T* src, const Strides6& s, int n0, int rows,
                                          int F, int N, int X) {
  for (int idx = threadIdx.x; idx < rows * F; idx += blockDim.x) {
    const int r = idx / F, f = idx % F, n = n0 + r;
    dst[r * ldd + f] = n < N ? ld<T>(src + tok6(s, n, X) + (long long)f * s.f) : 0.f;
  }
}

// ---------------------------------------------------------------- on-chip kernels

// smem: Q (L x d), K (L x d+1: lanes read different keys, the pad spreads banks), V (L x dv),
// per-warp probabilities (warps x L).
template <typename T>
__global__ void __launch_bounds__(kRowMaxWarps * 32) row_fwd_kernel(FwdParams p) {
  extern __shared__ float smem[];
  const int L = p.N, d = p.d, dv = p.dv, X = p.X, ldk = d + 1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
  float* Qs = smem;
  float* Ks = Qs + L * d;
  float* Vs = Ks + L * ldk;
  float* P = Vs + L * dv + warp * L;
  const int z = blockIdx.x;
  const masa::Problem pr = decode(z, p.R, p.heads);
  const T* q = static_cast<const T*>(p.q) + base6(p.sq, pr);
  const T* k = static_cast<const T*>(p.k) + base6(p.sk, pr);
  const T* v = static_cast<const T*>(p.v) + base6(p.sv, pr);
  T* out = static_cast<T*>(p.out) + base6(p.so, pr);
  load_rows<T>(Qs, d, q, p.sq, 0, L, d, L, X);
  load_rows<T>(Ks, ldk, k, p.sk, 0, L, d, L, X);
  load_rows<T>(Vs, dv, v, p.sv, 0, L, dv, L, X);
  __syncthreads();
  const float lg = p.log_gamma[pr.h];
  for (int i = warp; i < L; i += nw) {  // warp-uniform loop: shuffles see the full warp
    float s[kRowMaxTokens / 32];
    float mx = -CUDART_INF_F;
#pragma unroll
    for (int t = 0; t < kRowMaxTokens / 32; ++t) {
      const int j = lane + 32 * t;
      s[t] = -CUDART_INF_F;
      if (j < L) s[t] = dot(Qs + i * d, Ks + j * ldk, d) * p.scale + lg * manhattan(i, j, X);
      mx = fmaxf(mx, s[t]);
    }
    mx = warp_max(mx);  // finite: key 0 always exists
    float sum = 0.f;
#pragma unroll
    for (int t = 0; t < kRowMaxTokens / 32; ++t) {
      const int j = lane + 32 * t;
      if (j < L) {
        const float e = expf(s[t] - mx);
        P[j] = e;
        sum += e;
      }
    }
    sum = warp_sum(sum);
    __syncwarp();
    const float inv = 1.f / sum;
    for (int f = lane; f < dv; f += 32) {
      float acc = 0.f;
      for (int j = 0; j < L; ++j) acc = fmaf(P[j], Vs[j * dv + f], acc);
      st<T>(out + tok6(p.so, i, X) + (long long)f * p.so.f, acc * inv);
    }
    if (lane == 0) p.lse[off5(p.sl, pr, i, X)] = mx + logf(sum);
    __syncwarp();  // P is rewritten by the warp's next row
  }
}

// smem: Q, K (L x d+1), V, dO (L x dv+1), lse, delta (L), per-warp P and dS (warps x 2L),
// per-warp dlog_gamma partials (warps).
// Phase A (warp per query row i, lanes over keys j): dS_ij, dQ_i = scale * sum_j dS_ij K_j,
// dlog_gamma. Phase B (warp per key row j, lanes over queries i): recompute P_ij and dS_ij,
// dV_j = sum_i P_ij dO_i, dK_j = scale * sum_i dS_ij Q_i. No L x L buffer.
template <typename T>
__global__ void __launch_bounds__(kRowMaxWarps * 32) row_bwd_kernel(BwdParams p) {
  extern __shared__ float smem[];
  const int L = p.N, d = p.d, dv = p.dv, X = p.X, ldq = d + 1, ldv = dv + 1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
  float* Qs = smem;
  float* Ks = Qs + L * ldq;
  float* Vs = Ks + L * ldq;
  float* dOs = Vs + L * ldv;
  float* lse_s = dOs + L * ldv;
  float* delta_s = lse_s + L;
  float* Wp = delta_s + L + warp * 2 * L;
  float* Wds = Wp + L;
  float* red = delta_s + L + nw * 2 * L;
  const int z = blockIdx.x;
  const masa::Problem pr = decode(z, p.R, p.heads);
  const T* q = static_cast<const T*>(p.q) + base6(p.sq, pr);
  const T* k = static_cast<const T*>(p.k) + base6(p.sk, pr);
  const T* v = static_cast<const T*>(p.v) + base6(p.sv, pr);
  const T* dout = static_cast<const T*>(p.dout) + base6(p.sdo, pr);
  T* dq = static_cast<T*>(p.dq_out) + base6(p.sdq, pr);
  T* dk = static_cast<T*>(p.dk_out) + base6(p.sdk, pr);
  T* dvp = static_cast<T*>(p.dv_out) + base6(p.sdv, pr);
  load_rows<T>(Qs, ldq, q, p.sq, 0, L, d, L, X);
  load_rows<T>(Ks, ldq, k, p.sk, 0, L, d, L, X);
  load_rows<T>(Vs, ldv, v, p.sv, 0, L, dv, L, X);
  load_rows<T>(dOs, ldv, dout, p.sdo, 0, L, dv, L, X);
  for (int n = threadIdx.x; n < L; n += blockDim.x) {
    lse_s[n] = p.lse[off5(p.sl, pr, n, X)];
    delta_s[n] = p.delta[off5(p.sl, pr, n, X)];
  }
  __syncthreads();
  const float lg = p.log_gamma[pr.h];
  float g = 0.f;  // this lane's share of dL/dlog_gamma

  for (int i = warp; i < L; i += nw) {
#pragma unroll
    for (int t = 0; t < kRowMaxTokens / 32; ++t) {
      const int j = lane + 32 * t;
      if (j < L) {
        const float dist = manhattan(i, j, X);
        const float pij = expf(dot(Qs + i * ldq, Ks + j * ldq, d) * p.scale + lg * dist - lse_s[i]);
        const float ds = pij * (dot(dOs + i * ldv, Vs + j * ldv, dv) - delta_s[i]);
        g = fmaf(ds, dist, g);
        Wds[j] = ds;
      }
    }
    __syncwarp();
    for (int f = lane; f < d; f += 32) {
      float acc = 0.f;
      for (int j = 0; j < L; ++j) acc = fmaf(Wds[j], Ks[j * ldq + f], acc);
      st<T>(dq + tok6(p.sdq, i, X) + (long long)f * p.sdq.f, acc * p.scale);
    }
    __syncwarp();
  }

  for (int j = warp; j < L; j += nw) {
#pragma unroll
    for (int t = 0; t < kRowMaxTokens / 32; ++t) {
      const int i = lane + 32 * t;
      if (i < L) {
        const float pij =
            expf(dot(Qs + i * ldq, Ks + j * ldq, d) * p.scale + lg * manhattan(i, j, X) - lse_s[i]);
        Wp[i] = pij;
        Wds[i] = pij * (dot(dOs + i * ldv, Vs + j * ldv, dv) - delta_s[i]);
      }
    }
    __syncwarp();
    for (int f = lane; f < dv; f += 32) {
      float acc = 0.f;
      for (int i = 0; i < L; ++i) acc = fmaf(Wp[i], dOs[i * ldv + f], acc);
      st<T>(dvp + tok6(p.sdv, j, X) + (long long)f * p.sdv.f, acc);
    }
    for (int f = lane; f < d; f += 32) {
      float acc = 0.f;
      for (int i = 0; i < L; ++i) acc = fmaf(Wds[i], Qs[i * ldq + f], acc);
      st<T>(dk + tok6(p.sdk, j, X) + (long long)f * p.sdk.f, acc * p.scale);
    }
    __syncwarp();
  }

  g = warp_sum(g);
  if (lane == 0) red[warp] = g;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < nw; ++w) total += red[w];
    p.dlg[z] = total;
  }
}

// ---------------------------------------------------------------- flash kernels

// rows per warp for U accumulators per row per lane: at most ~64 accumulator registers
template <int U>
struct Rpw {
  static constexpr int value = U >= 8 ? 4 : 8;
};

// grid (Z, query blocks of kFlashWarps * RPW rows). smem: Q block (BM x d), K tile
// (32 x d+1), V tile (32 x dv). Lane j of a warp scores key n0 + j against the warp's row,
// then the 32 probabilities are broadcast by shuffles into the row's output accumulators
// (lane owns features lane + 32 u).
template <typename T, int U>
__global__ void __launch_bounds__(kFlashWarps * 32) flash_fwd_kernel(FwdParams p) {
  constexpr int RPW = Rpw<U>::value, BM = kFlashWarps * RPW;
  extern __shared__ float smem[];
  const int N = p.N, d = p.d, dv = p.dv, X = p.X, ldk = d + 1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* Qs = smem;
  float* Ks = Qs + BM * d;
  float* Vs = Ks + kTile * ldk;
  const int z = blockIdx.x, m0 = blockIdx.y * BM;
  const masa::Problem pr = decode(z, p.R, p.heads);
  const T* q = static_cast<const T*>(p.q) + base6(p.sq, pr);
  const T* k = static_cast<const T*>(p.k) + base6(p.sk, pr);
  const T* v = static_cast<const T*>(p.v) + base6(p.sv, pr);
  load_rows<T>(Qs, d, q, p.sq, m0, BM, d, N, X);
  const float lg = p.log_gamma[pr.h];

  float m[RPW], l[RPW], acc[RPW][U];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    m[r] = -CUDART_INF_F;
    l[r] = 0.f;
#pragma unroll
    for (int u = 0; u < U; ++u) acc[r][u] = 0.f;
  }

  for (int n0 = 0; n0 < N; n0 += kTile) {
    __syncthreads();  // previous tile fully consumed (and Q stored, on the first pass)
    load_rows<T>(Ks, ldk, k, p.sk, n0, kTile, d, N, X);
    load_rows<T>(Vs, dv, v, p.sv, n0, kTile, dv, N, X);
    __syncthreads();
    const int j = n0 + lane;
    const bool jvalid = j < N;
    const int nt = min(kTile, N - n0);
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      const int row = warp * RPW + r, i = m0 + row;
      if (i < N) {  // warp-uniform
        float s = -CUDART_INF_F;
        if (jvalid) s = dot(Qs + row * d, Ks + lane * ldk, d) * p.scale + lg * manhattan(i, j, X);
        const float mn = fmaxf(m[r], warp_max(s));  // finite: lane 0's key is valid
        const float alpha = expf(m[r] - mn);         // 0 on the first tile
        const float pj = jvalid ? expf(s - mn) : 0.f;
        l[r] = l[r] * alpha + warp_sum(pj);
        m[r] = mn;
#pragma unroll
        for (int u = 0; u < U; ++u) acc[r][u] *= alpha;
        for (int jj = 0; jj < nt; ++jj) {
          const float pb = __shfl_sync(kFull, pj, jj);
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int f = lane + 32 * u;
            if (f < dv) acc[r][u] = fmaf(pb, Vs[jj * dv + f], acc[r][u]);
          }
        }
      }
    }
  }

  T* out = static_cast<T*>(p.out) + base6(p.so, pr);
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int i = m0 + warp * RPW + r;
    if (i < N) {
      const float inv = 1.f / l[r];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int f = lane + 32 * u;
        if (f < dv) st<T>(out + tok6(p.so, i, X) + (long long)f * p.so.f, acc[r][u] * inv);
      }
      if (lane == 0) p.lse[off5(p.sl, pr, i, X)] = m[r] + logf(l[r]);
    }
  }
}

// dq and dlog_gamma. grid (Z, query blocks). smem: Q block (BM x d), dO block (BM x dv),
// K tile (32 x d+1), V tile (32 x dv+1), per-warp dlog_gamma partials. U covers d.
template <typename T, int U>
__global__ void __launch_bounds__(kFlashWarps * 32) flash_bwd_dq_kernel(BwdParams p) {
  constexpr int RPW = Rpw<U>::value, BM = kFlashWarps * RPW;
  extern __shared__ float smem[];
  const int N = p.N, d = p.d, dv = p.dv, X = p.X, ldk = d + 1, ldv = dv + 1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* Qs = smem;
  float* dOs = Qs + BM * d;
  float* Ks = dOs + BM * dv;
  float* Vs = Ks + kTile * ldk;
  float* red = Vs + kTile * ldv;
  const int z = blockIdx.x, m0 = blockIdx.y * BM;
  const masa::Problem pr = decode(z, p.R, p.heads);
  const T* q = static_cast<const T*>(p.q) + base6(p.sq, pr);
  const T* k = static_cast<const T*>(p.k) + base6(p.sk, pr);
  const T* v = static_cast<const T*>(p.v) + base6(p.sv, pr);
  const T* dout = static_cast<const T*>(p.dout) + base6(p.sdo, pr);
  load_rows<T>(Qs, d, q, p.sq, m0, BM, d, N, X);
  load_rows<T>(dOs, dv, dout, p.sdo, m0, BM, dv, N, X);
  const float lg = p.log_gamma[pr.h];

  float lse[RPW], delta[RPW], dq[RPW][U];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int i = m0 + warp * RPW + r;
    lse[r] = i < N ? p.lse[off5(p.sl, pr, i, X)] : 0.f;
    delta[r] = i < N ? p.delta[off5(p.sl, pr, i, X)] : 0.f;
#pragma unroll
    for (int u = 0; u < U; ++u) dq[r][u] = 0.f;
  }
  float g = 0.f;

  for (int n0 = 0; n0 < N; n0 += kTile) {
    __syncthreads();
    load_rows<T>(Ks, ldk, k, p.sk, n0, kTile, d, N, X);
    load_rows<T>(Vs, ldv, v, p.sv, n0, kTile, dv, N, X);
    __syncthreads();
    const int j = n0 + lane;
    const bool jvalid = j < N;
    const int nt = min(kTile, N - n0);
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      const int row = warp * RPW + r, i = m0 + row;
      if (i < N) {
        float ds = 0.f;
        if (jvalid) {
          const float dist = manhattan(i, j, X);
          const float pij = expf(dot(Qs + row * d, Ks + lane * ldk, d) * p.scale + lg * dist - lse[r]);
          ds = pij * (dot(dOs + row * dv, Vs + lane * ldv, dv) - delta[r]);
          g = fmaf(ds, dist, g);
        }
        for (int jj = 0; jj < nt; ++jj) {
          const float db = __shfl_sync(kFull, ds, jj);
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int f = lane + 32 * u;
            if (f < d) dq[r][u] = fmaf(db, Ks[jj * ldk + f], dq[r][u]);
          }
        }
      }
    }
  }

  T* dqp = static_cast<T*>(p.dq_out) + base6(p.sdq, pr);
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int i = m0 + warp * RPW + r;
    if (i < N) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int f = lane + 32 * u;
        if (f < d) st<T>(dqp + tok6(p.sdq, i, X) + (long long)f * p.sdq.f, dq[r][u] * p.scale);
      }
    }
  }
  g = warp_sum(g);
  if (lane == 0) red[warp] = g;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < kFlashWarps; ++w) total += red[w];
    p.dlg[(long long)z * gridDim.y + blockIdx.y] = total;
  }
}

// dk and dv. grid (Z, key blocks of kFlashWarps * RPW keys). smem: K block (BN x d), V block
// (BN x dv), Q tile (32 x d+1), dO tile (32 x dv+1), lse and delta of the tile. Lane i scores
// query n0 + i against the warp's key; U covers max(d, dv).
template <typename T, int U>
__global__ void __launch_bounds__(kFlashWarps * 32) flash_bwd_dkdv_kernel(BwdParams p) {
  constexpr int RPW = Rpw<U>::value, BN = kFlashWarps * RPW;
  extern __shared__ float smem[];
  const int N = p.N, d = p.d, dv = p.dv, X = p.X, ldq = d + 1, ldo = dv + 1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* Ks = smem;
  float* Vs = Ks + BN * d;
  float* Qs = Vs + BN * dv;
  float* dOs = Qs + kTile * ldq;
  float* lse_s = dOs + kTile * ldo;
  float* delta_s = lse_s + kTile;
  const int z = blockIdx.x, j0 = blockIdx.y * BN;
  const masa::Problem pr = decode(z, p.R, p.heads);
  const T* q = static_cast<const T*>(p.q) + base6(p.sq, pr);
  const T* k = static_cast<const T*>(p.k) + base6(p.sk, pr);
  const T* v = static_cast<const T*>(p.v) + base6(p.sv, pr);
  const T* dout = static_cast<const T*>(p.dout) + base6(p.sdo, pr);
  load_rows<T>(Ks, d, k, p.sk, j0, BN, d, N, X);
  load_rows<T>(Vs, dv, v, p.sv, j0, BN, dv, N, X);
  const float lg = p.log_gamma[pr.h];

  float dk[RPW][U], dvr[RPW][U];
#pragma unroll
  for (int r = 0; r < RPW; ++r)
#pragma unroll
    for (int u = 0; u < U; ++u) dk[r][u] = dvr[r][u] = 0.f;

  for (int n0 = 0; n0 < N; n0 += kTile) {
    __syncthreads();
    load_rows<T>(Qs, ldq, q, p.sq, n0, kTile, d, N, X);
    load_rows<T>(dOs, ldo, dout, p.sdo, n0, kTile, dv, N, X);
    for (int t = threadIdx.x; t < kTile; t += blockDim.x) {
      const int n = n0 + t;
      lse_s[t] = n < N ? p.lse[off5(p.sl, pr, n, X)] : 0.f;
      delta_s[t] = n < N ? p.delta[off5(p.sl, pr, n, X)] : 0.f;
    }
    __syncthreads();
    const int i = n0 + lane;
    const bool ivalid = i < N;
    const int nt = min(kTile, N - n0);
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      const int row = warp * RPW + r, j = j0 + row;
      if (j < N) {
        float pij = 0.f, ds = 0.f;
        if (ivalid) {
          pij = expf(dot(Qs + lane * ldq, Ks + row * d, d) * p.scale + lg * manhattan(i, j, X) - lse_s[lane]);
          ds = pij * (dot(dOs + lane * ldo, Vs + row * dv, dv) - delta_s[lane]);
        }
        for (int ii = 0; ii < nt; ++ii) {
          const float pb = __shfl_sync(kFull, pij, ii);
          const float db = __shfl_sync(kFull, ds, ii);
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int f = lane + 32 * u;
            if (f < dv) dvr[r][u] = fmaf(pb, dOs[ii * ldo + f], dvr[r][u]);
            if (f < d) dk[r][u] = fmaf(db, Qs[ii * ldq + f], dk[r][u]);
          }
        }
      }
    }
  }

  T* dkp = static_cast<T*>(p.dk_out) + base6(p.sdk, pr);
  T* dvp = static_cast<T*>(p.dv_out) + base6(p.sdv, pr);
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int j = j0 + warp * RPW + r;
    if (j < N) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int f = lane + 32 * u;
        if (f < d) st<T>(dkp + tok6(p.sdk, j, X) + (long long)f * p.sdk.f, dk[r][u] * p.scale);
        if (f < dv) st<T>(dvp + tok6(p.sdv, j, X) + (long long)f * p.sdv.f, dvr[r][u]);
      }
    }
  }
}

// ---------------------------------------------------------------- launch helpers

int units(int f) { return f <= 32 ? 1 : f <= 64 ? 2 : f <= 128 ? 4 : 8; }

int rows_per_warp(int U) { return U >= 8 ? 4 : 8; }

size_t row_fwd_smem(int L, int d, int dv, int nw) {
  return sizeof(float) * ((size_t)L * d + (size_t)L * (d + 1) + (size_t)L * dv + (size_t)nw * L);
}
size_t row_bwd_smem(int L, int d, int dv, int nw) {
  return sizeof(float) *
         (2 * (size_t)L * (d + 1) + 2 * (size_t)L * (dv + 1) + 2 * (size_t)L + 2 * (size_t)nw * L + nw);
}
size_t flash_fwd_smem(int BM, int d, int dv) {
  return sizeof(float) * ((size_t)BM * d + (size_t)kTile * (d + 1) + (size_t)kTile * dv);
}
size_t flash_dq_smem(int BM, int d, int dv) {
  return sizeof(float) * ((size_t)BM * d + (size_t)BM * dv + (size_t)kTile * (d + 1) + (size_t)kTile * (dv + 1) +
                          kFlashWarps);
}
size_t flash_dkdv_smem(int BN, int d, int dv) {
  return sizeof(float) * ((size_t)BN * d + (size_t)BN * dv + (size_t)kTile * (d + 1) + (size_t)kTile * (dv + 1) +
                          2 * kTile);
}

int row_warps(int L) {
  const int w = (L + 7) / 8;  // about 8 rows per warp
  return w < 2 ? 2 : (w > kRowMaxWarps ? kRowMaxWarps : w);
}

size_t smem_optin_limit() {
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 48 * 1024;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) return 48 * 1024;
  return (size_t)v;
}

bool use_row(int N, int d, int dv, bool backward) {
  if (N > kRowMaxTokens) return false;
  const int nw = row_warps(N);
  const size_t need = backward ? row_bwd_smem(N, d, dv, nw) : row_fwd_smem(N, d, dv, nw);
  return need <= smem_optin_limit();
}

// Opt a kernel into more than 48 KiB of dynamic shared memory when it needs it.
template <typename K>
cudaError_t prepare(K kernel, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
}

template <typename T, int U>
cudaError_t launch_flash_fwd(const FwdParams& p, cudaStream_t s) {
  const int BM = kFlashWarps * Rpw<U>::value;
  const size_t smem = flash_fwd_smem(BM, p.d, p.dv);
  cudaError_t e = prepare(flash_fwd_kernel<T, U>, smem);
  if (e != cudaSuccess) return e;
  dim3 grid(p.Z, (p.N + BM - 1) / BM);
  flash_fwd_kernel<T, U><<<grid, kFlashWarps * 32, smem, s>>>(p);
  return cudaGetLastError();
}

template <typename T, int U>
cudaError_t launch_flash_bwd(const BwdParams& p, cudaStream_t s) {
  const int BM = kFlashWarps * Rpw<U>::value;
  size_t smem = flash_dkdv_smem(BM, p.d, p.dv);
  cudaError_t e = prepare(flash_bwd_dkdv_kernel<T, U>, smem);
  if (e != cudaSuccess) return e;
  dim3 grid(p.Z, (p.N + BM - 1) / BM);
  flash_bwd_dkdv_kernel<T, U><<<grid, kFlashWarps * 32, smem, s>>>(p);
  if ((e = cudaGetLastError()) != cudaSuccess) return e;
  smem = flash_dq_smem(BM, p.d, p.dv);
  if ((e = prepare(flash_bwd_dq_kernel<T, U>, smem)) != cudaSuccess) return e;
  flash_bwd_dq_kernel<T, U><<<grid, kFlashWarps * 32, smem, s>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t fwd_typed(const FwdParams& p, cudaStream_t s) {
  if (use_row(p.N, p.d, p.dv, false)) {
    const int nw = row_warps(p.N);
    const size_t smem = row_fwd_smem(p.N, p.d, p.dv, nw);
    cudaError_t e = prepare(row_fwd_kernel<T>, smem);
    if (e != cudaSuccess) return e;
    row_fwd_kernel<T><<<p.Z, nw * 32, smem, s>>>(p);
    return cudaGetLastError();
  }
  switch (units(p.dv)) {
    case 1: return launch_flash_fwd<T, 1>(p, s);
    case 2: return launch_flash_fwd<T, 2>(p, s);
    case 4: return launch_flash_fwd<T, 4>(p, s);
    default: return launch_flash_fwd<T, 8>(p, s);
  }
}

template <typename T>
cudaError_t bwd_typed(const BwdParams& p, cudaStream_t s) {
  if (use_row(p.N, p.d, p.dv, true)) {
    const int nw = row_warps(p.N);
    const size_t smem = row_bwd_smem(p.N, p.d, p.dv, nw);
    cudaError_t e = prepare(row_bwd_kernel<T>, smem);
    if (e != cudaSuccess) return e;
    row_bwd_kernel<T><<<p.Z, nw * 32, smem, s>>>(p);
    return cudaGetLastError();
  }
  // one U for both flash kernels so they share the block size (and the dlg partial count)
  switch (units(p.d > p.dv ? p.d : p.dv)) {
    case 1: return launch_flash_bwd<T, 1>(p, s);
    case 2: return launch_flash_bwd<T, 2>(p, s);
    case 4: return launch_flash_bwd<T, 4>(p, s);
    default: return launch_flash_bwd<T, 8>(p, s);
  }
}

bool valid_sizes(int Z, int N, int X, int d, int dv) {
  // query / key blocks (>= 16 rows) go on grid.y, limited to 65535
  return Z > 0 && N > 0 && X > 0 && N % X == 0 && d > 0 && dv > 0 && d <= kMaxHeadDim && dv <= kMaxHeadDim &&
         (N + 15) / 16 <= 65535;
}

}  // namespace

int fwd(const FwdParams& p, void* stream) {
  if (!valid_sizes(p.Z, p.N, p.X, p.d, p.dv)) return (int)cudaErrorInvalidValue;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case kF16: return (int)fwd_typed<__half>(p, s);
    case kBF16: return (int)fwd_typed<__nv_bfloat16>(p, s);
    case kF32: return (int)fwd_typed<float>(p, s);
    default: return (int)cudaErrorInvalidValue;
  }
}

int bwd(const BwdParams& p, void* stream) {
  if (!valid_sizes(p.Z, p.N, p.X, p.d, p.dv)) return (int)cudaErrorInvalidValue;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case kF16: return (int)bwd_typed<__half>(p, s);
    case kBF16: return (int)bwd_typed<__nv_bfloat16>(p, s);
    case kF32: return (int)bwd_typed<float>(p, s);
    default: return (int)cudaErrorInvalidValue;
  }
}

int bwd_dlg_parts(const BwdParams& p) {
  if (use_row(p.N, p.d, p.dv, true)) return 1;
  const int BM = kFlashWarps * rows_per_warp(units(p.d > p.dv ? p.d : p.dv));
  return (p.N + BM - 1) / BM;
}

const char* kernel_family(int N, int d, int dv, bool backward) {
  return use_row(N, d, dv, backward) ? "onchip" : "flash";
}

const char* error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // namespace vitattn_cuda
