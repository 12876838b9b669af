// Vectorised row passes of a softmax over a cache-resident row of logits (compute type T):
// the row maximum, and exp(x - shift) written in place together with its sum, each one
// loop with a masked tail. float uses ATen's exp_u20 (the fast exponential PyTorch's own
// CPU flash attention uses); double uses the full-precision exp.
//
// Include only from *_kernels.cpp files (compiled once per instruction set).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#ifndef CPU_CAPABILITY
#error "row_softmax.h is for the per-instruction-set kernel files (*_kernels.cpp)"
#endif

namespace vitattn::cpu::CPU_CAPABILITY {

template <typename T>
inline at::vec::Vectorized<T> vexp(const at::vec::Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// Lanes reduced in a fixed order (deterministic), by ATen's shuffle tree.
template <typename T, typename Op>
inline T reduce_lanes(const at::vec::Vectorized<T>& v, Op op) {
  return at::vec::vec_reduce_all<T>(op, v);
}

// The row passes below read and write whole vectors: x must be readable and writable up to
// round_up(n, Vectorized<T>::size()) (the padding columns of a tile) and hold finite values
// there; lanes at or beyond n are left out of the max and the sum, and overwritten.

template <typename T>
inline T row_max(const T* x, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t L = Vec::size();
  const Vec lowest(-std::numeric_limits<T>::infinity());
  Vec m0 = lowest, m1 = lowest;
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    m0 = at::vec::maximum(m0, Vec::loadu(x + i));
    m1 = at::vec::maximum(m1, Vec::loadu(x + i + L));
  }
  for (; i + L <= n; i += L) m0 = at::vec::maximum(m0, Vec::loadu(x + i));
  if (i < n) m1 = at::vec::maximum(m1, Vec::set(lowest, Vec::loadu(x + i), n - i));
  return reduce_lanes<T>(at::vec::maximum(m0, m1), [](auto& a, auto& b) { return at::vec::maximum(a, b); });
}

// x[i] = exp(x[i] - shift) for i < n; returns the sum of the new values.
template <typename T>
inline T exp_shift_sum(T* x, int64_t n, T shift) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t L = Vec::size();
  const Vec s(shift);
  Vec acc0(T(0)), acc1(T(0));
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    const Vec e0 = vexp(Vec::loadu(x + i) - s);
    const Vec e1 = vexp(Vec::loadu(x + i + L) - s);
    e0.store(x + i);
    e1.store(x + i + L);
    acc0 = acc0 + e0;
    acc1 = acc1 + e1;
  }
  for (; i + L <= n; i += L) {
    const Vec e = vexp(Vec::loadu(x + i) - s);
    e.store(x + i);
    acc0 = acc0 + e;
  }
  if (i < n) {
    const Vec e = vexp(Vec::loadu(x + i) - s);
    e.store(x + i);
    acc1 = acc1 + Vec::set(Vec(T(0)), e, n - i);
  }
  return reduce_lanes<T>(acc0 + acc1, [](auto& a, auto& b) { return a + b; });
}

// x[i] = exp(x[i] - shift) for i < n (probabilities from stored log-sum-exp statistics).
template <typename T>
inline void exp_shift(T* x, int64_t n, T shift) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t L = Vec::size();
  const Vec s(shift);
  for (int64_t i = 0; i < n; i += L) vexp(Vec::loadu(x + i) - s).store(x + i);
}

}  // namespace vitattn::cpu::CPU_CAPABILITY
