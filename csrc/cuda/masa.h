// MaSA CUDA kernels: raw-pointer launchers (no torch headers, so nvcc can compile the .cu
// without torch's generated c10/cuda headers; masa_torch.cpp binds them to tensors).
//
// One launch computes one grid-attention pass over Z = B * heads * R independent problems,
// each over the N = Y * X tokens of a Y x X grid, with logits
//   scale * q_i . k_j + log_gamma[head] * (|y_i - y_j| + |x_i - x_j|).
// The passes and the stride mapping are masa_geometry.h's (Axis::full, w, h). Every tensor
// is addressed through element strides mapped onto (b, head, r, y, x, feature), so permuted
// inputs and the H pass over the W pass's output are read in place.
#pragma once

#include <cstdint>

#include "../common/masa_geometry.h"

namespace vitattn_cuda {

namespace masa = vitattn::masa;

enum DType : int { kF16 = 0, kBF16 = 1, kF32 = 2 };

// element strides mapped onto (b, head, r, y, x[, feature]) by masa::map_strides
using Strides6 = masa::Strides6;
using Strides5 = masa::Strides5;

struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;               // dtype like q
  float* lse;              // fp32, layout sl
  const float* log_gamma;  // (heads,)
  Strides6 sq, sk, sv, so;
  Strides5 sl;
  int Z, R, heads, N, X, d, dv;
  float scale;
  int dtype;  // DType of q, k, v, out
};

struct BwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* dout;
  const float* lse;    // layout sl
  const float* delta;  // rowsum(dout * out), layout sl
  const float* log_gamma;
  void* dq_out;  // dtype like q, layouts sdq / sdk / sdv
  void* dk_out;
  void* dv_out;
  float* dlg;  // Z * bwd_dlg_parts(params) partial sums of dL/dlog_gamma, problem-major
  Strides6 sq, sk, sv, sdo, sdq, sdk, sdv;
  Strides5 sl;
  int Z, R, heads, N, X, d, dv;
  float scale;
  int dtype;
};

// Largest head dim (d and dv) the kernels take.
constexpr int kMaxHeadDim = 256;
// Problems of at most this many tokens may use the on-chip kernels (one thread block
// holds the whole problem in shared memory); longer ones use the flash-style kernels.
constexpr int kRowMaxTokens = 128;

// 0 on success, else a cudaError_t value (see error_string). `stream` is a cudaStream_t.
int fwd(const FwdParams& p, void* stream);
int bwd(const BwdParams& p, void* stream);
// How many dlog_gamma partial sums bwd writes per problem (size p.dlg as Z * this).
int bwd_dlg_parts(const BwdParams& p);
// "onchip" or "flash": the kernel family fwd/bwd would use for these sizes on the current device.
const char* kernel_family(int N, int d, int dv, bool backward);
const char* error_string(int err);

}  // namespace vitattn_cuda
