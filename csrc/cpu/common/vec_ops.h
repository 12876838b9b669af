// Small vectorised row operations for the CPU kernel files (csrc/cpu/*_kernels.cpp).
//
// Include only from a *_kernels.cpp file: everything here lives in the per-instruction-set
// namespace vitattn::cpu::CPU_CAPABILITY (see csrc/cpu/isa.h), so at::vec::Vectorized<T>
// has that build's width. Every reduction runs in one fixed order (lane-wise accumulators,
// then one horizontal reduction), so a result depends only on the inputs and the build,
// never on threads. Tails shorter than a vector go through masked loads, not a scalar
// loop, so a column gets the same arithmetic wherever it sits in the row.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "row_softmax.h"  // vexp

namespace vitattn::cpu::CPU_CAPABILITY {
namespace vec_ops {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// exp of the kernels (row_softmax.h): ATen's fast fp32 exp_u20 (flushes results below
// FLT_MIN to 0, never to a subnormal) and the accurate fp64 exp
using ::vitattn::cpu::CPU_CAPABILITY::vexp;

template <typename T>
inline T hsum(const Vec<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, v);
}

template <typename T>
inline T hmax(const Vec<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return at::vec::maximum(a, b); }, v);
}

// sum_j a[j] * b[j]
template <typename T>
inline T dot(const T* a, const T* b, int64_t len) {
  constexpr int64_t L = Vec<T>::size();
  Vec<T> acc0(T(0)), acc1(T(0));
  int64_t j = 0;
  for (; j + 2 * L <= len; j += 2 * L) {
    acc0 = at::vec::fmadd(Vec<T>::loadu(a + j), Vec<T>::loadu(b + j), acc0);
    acc1 = at::vec::fmadd(Vec<T>::loadu(a + j + L), Vec<T>::loadu(b + j + L), acc1);
  }
  for (; j < len; j += L) {
    const int64_t k = std::min<int64_t>(L, len - j);
    acc0 = at::vec::fmadd(Vec<T>::loadu(a + j, k), Vec<T>::loadu(b + j, k), acc0);
  }
  return hsum<T>(acc0 + acc1);
}

// (sum_j a[j] * b[j], sum_j a[j] * c[j]) in one pass over a
template <typename T>
inline void dot2(const T* a, const T* b, const T* c, int64_t len, T& ab, T& ac) {
  constexpr int64_t L = Vec<T>::size();
  Vec<T> acc_b(T(0)), acc_c(T(0));
  for (int64_t j = 0; j < len; j += L) {
    const int64_t k = std::min<int64_t>(L, len - j);
    const Vec<T> va = Vec<T>::loadu(a + j, k);
    acc_b = at::vec::fmadd(va, Vec<T>::loadu(b + j, k), acc_b);
    acc_c = at::vec::fmadd(va, Vec<T>::loadu(c + j, k), acc_c);
  }
  ab = hsum<T>(acc_b);
  ac = hsum<T>(acc_c);
}

// y[j] += alpha * x[j]
template <typename T>
inline void axpy(T alpha, const T* x, T* y, int64_t len) {
  constexpr int64_t L = Vec<T>::size();
  const Vec<T> va(alpha);
  for (int64_t j = 0; j < len; j += L) {
    const int64_t k = std::min<int64_t>(L, len - j);
    at::vec::fmadd(va, Vec<T>::loadu(x + j, k), Vec<T>::loadu(y + j, k)).store(y + j, k);
  }
}

// y[j] += x[j]
template <typename T>
inline void add_to(const T* x, T* y, int64_t len) {
  constexpr int64_t L = Vec<T>::size();
  for (int64_t j = 0; j < len; j += L) {
    const int64_t k = std::min<int64_t>(L, len - j);
    (Vec<T>::loadu(y + j, k) + Vec<T>::loadu(x + j, k)).store(y + j, k);
  }
}

// max_j (a[j] + b[j])
template <typename T>
inline T max_of_sum(const T* a, const T* b, int64_t len) {
  constexpr int64_t L = Vec<T>::size();
  const Vec<T> ninf(-std::numeric_limits<T>::infinity());
  Vec<T> acc = ninf;
  for (int64_t j = 0; j < len; j += L) {
    const int64_t k = std::min<int64_t>(L, len - j);
    const Vec<T> s = Vec<T>::loadu(a + j, k) + Vec<T>::loadu(b + j, k);
    acc = at::vec::maximum(acc, k == L ? s : Vec<T>::set(ninf, s, k));
  }
  return hmax<T>(acc);
}

// out[j] = exp(a[j] + s + b[j]); returns sum_j out[j] (out may alias a)
template <typename T>
inline T exp_row(const T* a, T s, const T* b, T* out, int64_t len) {
  constexpr int64_t L = Vec<T>::size();
  const Vec<T> vs(s);
  Vec<T> acc(T(0));
  for (int64_t j = 0; j < len; j += L) {
    const int64_t k = std::min<int64_t>(L, len - j);
    const Vec<T> e = vexp(Vec<T>::loadu(a + j, k) + vs + Vec<T>::loadu(b + j, k));
    e.store(out + j, k);
    acc = acc + (k == L ? e : Vec<T>::set(Vec<T>(T(0)), e, k));
  }
  return hsum<T>(acc);
}

// log sum_j exp(a[j] + b[j]), computed as max + log sum exp(. - max)
template <typename T>
inline T logsumexp_of_sum(const T* a, const T* b, int64_t len) {
  constexpr int64_t L = Vec<T>::size();
  const T mx = max_of_sum(a, b, len);
  if (!(mx > -std::numeric_limits<T>::infinity())) return mx;
  const Vec<T> vm(-mx);
  Vec<T> acc(T(0));
  for (int64_t j = 0; j < len; j += L) {
    const int64_t k = std::min<int64_t>(L, len - j);
    const Vec<T> e = vexp(Vec<T>::loadu(a + j, k) + Vec<T>::loadu(b + j, k) + vm);
    acc = acc + (k == L ? e : Vec<T>::set(Vec<T>(T(0)), e, k));
  }
  return mx + std::log(hsum<T>(acc));
}

}  // namespace vec_ops
}  // namespace vitattn::cpu::CPU_CAPABILITY
