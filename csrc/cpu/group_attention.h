// SReT group / permuted attention, C++ CPU backend: the kernel interface shared by the
// torch-facing group_attention.cpp (compiled once) and group_attention_kernels.cpp
// (compiled once per instruction set, see isa.h).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "isa.h"

namespace vitattn::cpu {

// A (B, heads, N, features) tensor: data pointer and strides in elements.
struct GroupTensor {
  const void* data = nullptr;
  int64_t sb = 0, sh = 0, sn = 0, sf = 0;
};

// One call over Z = B * heads * groups problems of n = N / groups tokens. Token i of group g
// is the original token perm[g * n + i] (perm == nullptr: g * n + i). Outputs are
// contiguous and in the original token order.
struct GroupAttentionArgs {
  int64_t B = 0, heads = 0, N = 0, groups = 0, n = 0, d = 0, dv = 0;
  c10::ScalarType dtype = c10::ScalarType::Float;  // of q, k, v (and dout, out)
  double scale = 1.0;
  const int64_t* perm = nullptr;
  GroupTensor q, k, v;
  // forward outputs: out (B, heads, N, dv) in dtype, lse (B, heads, N) in the accumulation
  // type (double for double, float otherwise)
  void* out = nullptr;
  void* lse = nullptr;
  // backward inputs (dout, the forward's out; lse_in's feature stride is unused) and outputs
  GroupTensor dout, out_in, lse_in;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv_out = nullptr;
};

}  // namespace vitattn::cpu

// false: a dtype the kernels do not support (the caller checks dtypes first)
VITATTN_CPU_DECLARE(bool, group_attention_fwd_kernel, (const ::vitattn::cpu::GroupAttentionArgs&))
VITATTN_CPU_DECLARE(bool, group_attention_bwd_kernel, (const ::vitattn::cpu::GroupAttentionArgs&))
