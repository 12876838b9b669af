// MaSA CPU kernels: arguments shared by the torch side (masa.cpp, compiled once) and the
// kernels (masa_kernels.cpp, compiled once per instruction set, see isa.h). Plain C++.
//
// The kernels read every input through its strides (any layout, no packing by the caller)
// and write outputs through theirs. Work is split into tasks; masa.cpp runs the tasks on
// at::parallel_for's threads, each thread with its own scratch slot. A task writes only its
// own outputs (no atomics, no shared accumulator), so results do not depend on the threads.
#pragma once

#include <cstdint>

#include "../common/masa_geometry.h"

namespace vitattn::cpu {

// dtype of q, k, v, dout and of the outputs out, v_mid, dq, dk, dv. Compute is in fp32
// (fp64 for f64): fp16 / bf16 values are converted on load and rounded on store.
enum class MasaDtype : int { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

// What one call computes:
//   full        the full form over the H x W grid (one pass, Axis::full)
//   decomposed  the w pass then the h pass, fused per (batch, head): the w pass's result
//               v_mid is read back by the h pass while it is still in cache
enum class MasaMode : int { full = 0, decomposed = 1 };

// A (B, heads, H, W, F) tensor (or (B, heads, H, W) for a log-sum-exp: stride[4] unused).
struct MasaTensor {
  void* data = nullptr;
  int64_t stride[5] = {0, 0, 0, 0, 0};
};

struct MasaArgs {
  MasaDtype dtype = MasaDtype::f32;
  MasaMode mode = MasaMode::full;
  int64_t B = 0, heads = 0, H = 0, W = 0, d = 0, dv = 0;
  double scale = 1.0;
  const void* log_gamma = nullptr;  // (heads,) contiguous, fp32 (fp64 for f64)
  // inputs: q, k (d features), v (dv features); backward also dout and the forward's
  // results: out, lse (full form: the grid's; decomposed: out and lse_h) and, decomposed
  // only, v_mid and lse_w
  MasaTensor q, k, v, dout;
  // forward outputs (backward inputs): out, lse as above; decomposed: v_mid, lse_w too.
  // lse tensors are fp32 (fp64 for f64)
  MasaTensor out, lse, v_mid, lse_w;
  // backward outputs: grad_q, grad_k (d features), grad_v (dv features);
  // dlog_gamma_parts gets one fp64 partial sum per task, reduced by the caller in task order
  MasaTensor grad_q, grad_k, grad_v;
  void* dlog_gamma_parts = nullptr;
  // forward, full form: each problem's queries are split into this many tasks (>= 1); the
  // result does not depend on it
  int64_t query_splits = 1;
  // scratch: slot s (one per thread) starts at scratch + s * scratch_slot_bytes
  void* scratch = nullptr;
  int64_t scratch_slot_bytes = 0;
};

// How a call is split: `tasks` tasks, each needing `scratch_bytes` of scratch.
struct MasaPlan {
  int64_t tasks = 0;
  int64_t scratch_bytes = 0;
};

}  // namespace vitattn::cpu
