// MaSA geometry, written once for every backend (C++ CPU kernels, the CUDA torch side and
// the CUDA kernels): which tokens form one attention problem, and where a problem's tokens
// sit in a strided tensor. Plain C++17, no torch headers, usable from .cu files.
//
// q, k (B, heads, H, W, d), v (B, heads, H, W, dv), lse (B, heads, H, W). A pass of MaSA
// solves B * heads * R independent problems; problem (b, head, r) attends over the N = Y * X
// tokens of a Y x X grid, token n at grid position (n / X, n % X), with logits
//   scale * q_i . k_j + log_gamma[head] * (|y_i - y_j| + |x_i - x_j|).
// The axis of a pass, spelled the same way in Python ("full" = None, "w", "h") and here:
//   Axis::full  the whole H x W grid:      R = 1, (Y, X) = (H, W)
//   Axis::w     along W inside every row:  R = H, (Y, X) = (1, W), r = the row
//   Axis::h     along H inside every column: R = W, (Y, X) = (1, H), r = the column
// The decomposed form is the w pass followed by the h pass over the w pass's output.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define VITATTN_HD __host__ __device__ __forceinline__
#else
#define VITATTN_HD inline
#endif

namespace vitattn::masa {

enum class Axis : int { full = 0, w = 1, h = 2 };

// Problems per (batch, head) and the grid of one problem.
struct Pass {
  int64_t R, Y, X;
  VITATTN_HD int64_t N() const { return Y * X; }
};

VITATTN_HD Pass pass_of(Axis axis, int64_t H, int64_t W) {
  if (axis == Axis::full) return {1, H, W};
  if (axis == Axis::w) return {H, 1, W};
  return {W, 1, H};
}

// Element strides of a (B, heads, H, W, F) tensor seen as (b, head, r, y, x, feature).
struct Strides6 {
  int64_t b, h, r, y, x, f;
};
// Element strides of a (B, heads, H, W) tensor (the log-sum-exp) seen as (b, head, r, y, x).
struct Strides5 {
  int64_t b, h, r, y, x;
};

// s: the tensor's strides in (B, heads, H, W, F) order.
VITATTN_HD Strides6 map_strides(Axis axis, const int64_t* s) {
  if (axis == Axis::full) return {s[0], s[1], 0, s[2], s[3], s[4]};
  if (axis == Axis::w) return {s[0], s[1], s[2], 0, s[3], s[4]};
  return {s[0], s[1], s[3], 0, s[2], s[4]};
}

// s: the tensor's strides in (B, heads, H, W) order.
VITATTN_HD Strides5 map_strides4(Axis axis, const int64_t* s) {
  if (axis == Axis::full) return {s[0], s[1], 0, s[2], s[3]};
  if (axis == Axis::w) return {s[0], s[1], s[2], 0, s[3]};
  return {s[0], s[1], s[3], 0, s[2]};
}

// Problem index z = (b * heads + head) * R + r, and back.
struct Problem {
  int64_t b, h, r;
};

template <typename I>
VITATTN_HD Problem problem_of(I z, I R, I heads) {
  const I bh = z / R;
  return {static_cast<int64_t>(bh / heads), static_cast<int64_t>(bh % heads), static_cast<int64_t>(z % R)};
}

template <typename S>
VITATTN_HD int64_t problem_offset(const S& s, const Problem& p) {
  return p.b * s.b + p.h * s.h + p.r * s.r;
}

// Offset of token n (grid position (n / X, n % X)) inside its problem.
template <typename S, typename I>
VITATTN_HD int64_t token_offset(const S& s, I n, I X) {
  return static_cast<int64_t>(n / X) * s.y + static_cast<int64_t>(n % X) * s.x;
}

}  // namespace vitattn::masa
