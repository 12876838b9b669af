// Sinkhorn / optimal-transport CPU backend: the arguments the torch side (sinkhorn.cpp)
// hands to the kernels (sinkhorn_kernels.cpp, one copy per instruction set, see isa.h).
#pragma once

#include <cstdint>

#include "isa.h"

namespace vitattn::cpu {

// storage dtype of the dense scores, plan and their gradients (the math runs in T)
enum class SinkhornIo : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

// sinkhorn on dense scores: Z problems of n x m. T is the accumulation dtype.
template <typename T>
struct SinkhornArgs {
  int64_t Z = 0, n = 0, m = 0, iters = 0;
  T eps = 1;
  SinkhornIo io = SinkhornIo::F32;
  const void* S = nullptr;   // (Z, n, m) contiguous, dtype io
  const T* la = nullptr;     // (Z, n) contiguous: log row marginals
  const T* lb = nullptr;     // (Z, m) contiguous: log column marginals
  T* G = nullptr;            // (Z, iters, m): column potentials after every iteration
  void* P = nullptr;         // forward: the plan (Z, n, m), dtype io
  const void* dP = nullptr;  // backward: (Z, n, m), dtype io
  void* dS = nullptr;        // backward: (Z, n, m), dtype io
  T* dla = nullptr;          // backward: (Z, n)
  T* dlb = nullptr;          // backward: (Z, m)
};

// ot_aggregate / ot_attention: B x heads problems; scores x . ref^T (times the filter).
// Tensors given with strides have a contiguous last dim; strides count elements.
template <typename T>
struct OtArgs {
  int64_t B = 0, heads = 0, n = 0, m = 0, d = 0, dv = 0, iters = 0;
  T eps = 1;
  bool attention = false;
  const T* x = nullptr;      // (B, heads, n, d), strides sx
  int64_t sx[3] = {0, 0, 0};
  const T* ref = nullptr;    // (heads, m, d), strides sref
  int64_t sref[2] = {0, 0};
  const T* v = nullptr;      // (B, heads, n, dv), strides sv
  int64_t sv[3] = {0, 0, 0};
  const T* filt = nullptr;   // (n, m) contiguous, or null
  T* G = nullptr;            // (B, heads, iters, m) contiguous: forward output, backward input
  T* zeta = nullptr;         // (B, heads, m, dv) contiguous: T^T v (attention; forward output, backward input)
  T* out = nullptr;          // forward: (B, heads, n or m, dv) contiguous
  const T* dout = nullptr;   // backward: (B, heads, n or m, dv), strides sdout
  int64_t sdout[3] = {0, 0, 0};
  T* dx = nullptr;           // backward: (B, heads, n, d) contiguous
  T* dvalue = nullptr;       // backward: gradient of v, (B, heads, n, dv) contiguous
  T* dref = nullptr;         // backward: (heads, m, d) contiguous
};

}  // namespace vitattn::cpu

VITATTN_CPU_DECLARE(void, sinkhorn_fwd_f32, (const ::vitattn::cpu::SinkhornArgs<float>&))
VITATTN_CPU_DECLARE(void, sinkhorn_fwd_f64, (const ::vitattn::cpu::SinkhornArgs<double>&))
VITATTN_CPU_DECLARE(void, sinkhorn_bwd_f32, (const ::vitattn::cpu::SinkhornArgs<float>&))
VITATTN_CPU_DECLARE(void, sinkhorn_bwd_f64, (const ::vitattn::cpu::SinkhornArgs<double>&))
VITATTN_CPU_DECLARE(void, ot_fwd_f32, (const ::vitattn::cpu::OtArgs<float>&))
VITATTN_CPU_DECLARE(void, ot_fwd_f64, (const ::vitattn::cpu::OtArgs<double>&))
VITATTN_CPU_DECLARE(void, ot_bwd_f32, (const ::vitattn::cpu::OtArgs<float>&))
VITATTN_CPU_DECLARE(void, ot_bwd_f64, (const ::vitattn::cpu::OtArgs<double>&))
