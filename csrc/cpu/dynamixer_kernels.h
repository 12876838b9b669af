// DynaMixer dynamic mixing on the CPU: the arguments the torch-facing dynamixer.cpp hands
// to the kernels of dynamixer_kernels.cpp (one copy per instruction set, see isa.h).
//
// One row = the L tokens of x (N0, N1, N2, L, C) at fixed leading indices; one problem =
// (row, segment s): the C/S channels of segment s and R[row, :, s*d:(s+1)*d] read as the
// vector m = i*d + k of length L*d. The kernels run the whole op (compress included):
//   R = x Wc^T + bc                                            (per token, (L, S*d) per row)
//   Z[i, j] = sum_m R[m] Wg[i*L + j, m] + bg[i*L + j],  P[:, j] = softmax_i Z[:, j],
//   y[j, c] = sum_i P[i, j] x[i, c],  lse[j] = logsumexp_i Z[i, j].
// Backward recomputes P from the saved R and lse:
//   dP[i, j] = sum_c x[i, c] dy[j, c],  dZ = P (dP - sum_i P dP),
//   dR[m] = sum_n dZ[n] Wg[n, m],  dWg = sum dZ^T R,  dbg = sum dZ,
//   dx = P dy (per segment) + dR Wc,  dWc = sum dR^T x,  dbc = sum dR.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "isa.h"

namespace vitattn::cpu {

// A 5-D (N0, N1, N2, L, features) operand: data pointer and element strides.
struct DmView {
  void* data = nullptr;
  int64_t stride[5] = {0, 0, 0, 0, 0};
};

// A 1-D or 2-D operand (weights, biases): data pointer (null: absent) and element strides.
struct DmMatrix {
  void* data = nullptr;
  int64_t stride[2] = {0, 0};
};

struct DynaMixerArgs {
  c10::ScalarType dtype = c10::ScalarType::Float;  // of x, r, y, dy, dx and the four weights
  int64_t N0 = 0, N1 = 0, N2 = 0, L = 0, C = 0, S = 1, d = 1;  // rows = N0 * N1 * N2, C % S == 0
  DmView x;
  DmMatrix wc, bc, wg, bg;  // (S*d, C), (S*d,) or absent, (L*L, L*d), (L*L,) or absent
  DmView r;                 // (..., L, S*d): written by the forward, read by the backward
  void* lse = nullptr;      // (rows, S, L) contiguous, accumulation dtype: same
  DmView y;                 // forward output
  DmView dy, dx;            // backward: upstream gradient and input gradient
  // backward outputs, contiguous, accumulation dtype; dbc / dbg null when that bias is absent
  void* dwc = nullptr;
  void* dbc = nullptr;
  void* dwg = nullptr;
  void* dbg = nullptr;
};

}  // namespace vitattn::cpu

// y, r and lse from x and the weights.
VITATTN_CPU_DECLARE(void, dynamixer_fwd_kernel, (const ::vitattn::cpu::DynaMixerArgs& args))
// dx, dwc (dbc), dwg (dbg) from dy, x, r, lse and the weights.
VITATTN_CPU_DECLARE(void, dynamixer_bwd_kernel, (const ::vitattn::cpu::DynaMixerArgs& args))
