// Depthwise 2-d convolution on channels-last (B, H, W, C) activations, stride 1, C++ CPU
// backend: the kernel interface shared by the torch-facing depthwise_conv.cpp (compiled
// once) and depthwise_conv_kernels.cpp (compiled once per instruction set, see isa.h).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "isa.h"

namespace vitattn::cpu {

// A (B, rows, cols, C) tensor with unit channel stride: data pointer and the other strides.
struct NhwcTensor {
  const void* data = nullptr;
  int64_t sb = 0, sh = 0, sw = 0;
};

// y[b, oh, ow, c] = bias[c] + sum_{i < kh, j < kw} x[b, oh - ph + i, ow - pw + j, c] * w[i * kw + j, c]
// over the taps that land inside x (zero padding). The same loop with the taps mirrored and
// padding (kh - 1 - ph, kw - 1 - pw) is the gradient with respect to x.
struct DwConvArgs {
  c10::ScalarType dtype = c10::ScalarType::Float;  // of every tensor (float or double)
  int64_t B = 0, C = 0, kh = 0, kw = 0;
  int64_t H = 0, W = 0, ph = 0, pw = 0;  // the input's size and padding
  int64_t Ho = 0, Wo = 0;                // the output's size (H + 2 ph - kh + 1, ...)
  NhwcTensor x;
  const void* w = nullptr;     // (kh * kw, C) contiguous: taps outer, channels inner
  const void* bias = nullptr;  // (C,) or nullptr
  void* y = nullptr;           // (B, Ho, Wo, C) contiguous
  // weight gradient: dw = sum over positions of dy * x at each tap, with dy (B, Ho, Wo, C)
  // read through `x`'s role swapped: x is the forward input, dy the output's gradient
  NhwcTensor dy;
  void* dw = nullptr;  // (kh * kw, C) contiguous
  void* db = nullptr;  // (C,) or nullptr
};

}  // namespace vitattn::cpu

// false: a dtype the kernels do not support (the caller checks dtypes first)
VITATTN_CPU_DECLARE(bool, dwconv_fwd_kernel, (const ::vitattn::cpu::DwConvArgs&))
VITATTN_CPU_DECLARE(bool, dwconv_weight_grad_kernel, (const ::vitattn::cpu::DwConvArgs&))
