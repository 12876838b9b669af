// Depthwise 2-d convolution on channels-last activations, CPU kernels (compiled once per
// instruction set, see isa.h). Channels are the vector dimension: every output pixel is a
// few vectors of channels, each the sum over the kh x kw taps of an input vector times a
// weight vector, so nothing is transposed and the taps that fall in the zero padding are
// skipped rather than read.
//   * forward (and the input gradient, which is the same loop with mirrored taps): one
//     task per output row (b, oh); a chunk of kChunk vectors of channels is carried across
//     the row in registers.
//   * weight and bias gradients: the rows are split into a fixed number of groups that
//     depends on the shape only; each group sums its rows in order into its own partial,
//     and the partials are added in group order, so no result depends on the thread count.
#include "depthwise_conv.h"

#include <ATen/cpu/vec/vec.h>
#include <c10/core/CPUAllocator.h>

#include "common/parallel.h"

namespace vitattn::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

constexpr int64_t kChunk = 4;       // vectors of channels accumulated in registers at once
constexpr int64_t kMaxGroups = 16;  // weight-gradient partials: enough to share among threads
constexpr int64_t kWeightBytes = 16 * 1024;  // the forward's weights of one channel block (half of L1)

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Output pixel (oh, ow), channels [c0, c0 + NV * W) with NV full vectors.
template <typename T, int NV>
inline void conv_pixel_chunk(const DwConvArgs& a, const T* xpix, const T* w, const T* bias, T* ypix, int64_t i_lo,
                             int64_t i_hi, int64_t j_lo, int64_t j_hi, int64_t c0) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  Vec acc[NV];
  for (int u = 0; u < NV; ++u) acc[u] = bias ? Vec::loadu(bias + c0 + u * W) : Vec(T(0));
  for (int64_t i = i_lo; i < i_hi; ++i) {
    const T* xr = xpix + i * a.x.sh + c0;
    const T* wr = w + i * a.kw * a.C + c0;
    for (int64_t j = j_lo; j < j_hi; ++j) {
      for (int u = 0; u < NV; ++u)
        acc[u] = at::vec::fmadd(Vec::loadu(xr + j * a.x.sw + u * W), Vec::loadu(wr + j * a.C + u * W), acc[u]);
    }
  }
  for (int u = 0; u < NV; ++u) acc[u].store(ypix + c0 + u * W);
}

// The same for the last n < W channels from c0 (partial vector loads and stores).
template <typename T>
inline void conv_pixel_tail(const DwConvArgs& a, const T* xpix, const T* w, const T* bias, T* ypix, int64_t i_lo,
                            int64_t i_hi, int64_t j_lo, int64_t j_hi, int64_t c0, int64_t n) {
  using Vec = Vectorized<T>;
  Vec acc = bias ? Vec::loadu(bias + c0, n) : Vec(T(0));
  for (int64_t i = i_lo; i < i_hi; ++i) {
    const T* xr = xpix + i * a.x.sh + c0;
    const T* wr = w + i * a.kw * a.C + c0;
    for (int64_t j = j_lo; j < j_hi; ++j)
      acc = at::vec::fmadd(Vec::loadu(xr + j * a.x.sw, n), Vec::loadu(wr + j * a.C, n), acc);
  }
  acc.store(ypix + c0, n);
}

// Every channel of output pixel ow (taps clipped to the image): the general path.
template <typename T>
inline void conv_pixel(const DwConvArgs& a, const T* xrow, const T* w, const T* bias, T* yrow, int64_t i_lo,
                       int64_t i_hi, int64_t ow, int64_t cb, int64_t ce) {
  constexpr int64_t W = Vectorized<T>::size();
  const int64_t j_lo = max64(0, a.pw - ow), j_hi = min64(a.kw, a.W + a.pw - ow);
  const T* xpix = xrow + ow * a.x.sw;
  T* ypix = yrow + ow * a.C;
  int64_t c0 = cb;
  for (; c0 + kChunk * W <= ce; c0 += kChunk * W)
    conv_pixel_chunk<T, kChunk>(a, xpix, w, bias, ypix, i_lo, i_hi, j_lo, j_hi, c0);
  for (; c0 + W <= ce; c0 += W) conv_pixel_chunk<T, 1>(a, xpix, w, bias, ypix, i_lo, i_hi, j_lo, j_hi, c0);
  if (c0 < ce) conv_pixel_tail<T>(a, xpix, w, bias, ypix, i_lo, i_hi, j_lo, j_hi, c0, ce - c0);
}

template <typename T>
void fwd(const DwConvArgs& a) {
  constexpr int64_t W = Vectorized<T>::size();
  const T* x = static_cast<const T*>(a.x.data);
  const T* w = static_cast<const T*>(a.w);
  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
  // Pixels outer, channels inner: each input pixel is read whole and in order (the
  // prefetchers follow), while the weights of a channel block stay in L1. Wide layers
  // (C * taps beyond kWeightBytes) are cut into channel blocks that each sweep the row.
  // (Register blocking over runs of output pixels, sharing each input vector among the
  // taps that use it, was measured on Zen 3: faster for 5x5 kernels on 14x14 and 28x28
  // maps, slower for 3x3 and at 56x56, where these kernels already run near the memory
  // bandwidth; it is not used.)
  const int64_t cblk = max64(kChunk * W, kWeightBytes / int64_t(sizeof(T) * a.kh * a.kw) / (kChunk * W) * (kChunk * W));
  parallel_tasks(a.B * a.Ho, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / a.Ho, oh = r % a.Ho;
      const int64_t i_lo = max64(0, a.ph - oh), i_hi = min64(a.kh, a.H + a.ph - oh);
      // x at tap (0, 0) of output pixel (oh, 0); taps outside x are never formed
      const T* xrow = x + b * a.x.sb + (oh - a.ph) * a.x.sh - a.pw * a.x.sw;
      T* yrow = y + r * a.Wo * a.C;
      for (int64_t cb = 0; cb < a.C; cb += cblk) {
        const int64_t ce = min64(a.C, cb + cblk);
        for (int64_t ow = 0; ow < a.Wo; ++ow) conv_pixel<T>(a, xrow, w, bias, yrow, i_lo, i_hi, ow, cb, ce);
      }
    }
  });
}

// Adds, for output row (b, oh) and channels [c0, c0 + n), sum_ow dy * x at every tap to
// part[tap * C + c] and (db) sum_ow dy to part[kh * kw * C + c]. n <= W * NV; partial
// vectors (n not a multiple of W) use counted loads and stores.
template <typename T, int NV>
inline void weight_grad_row_chunk(const DwConvArgs& a, const T* xrow0, const T* dyrow, T* part, int64_t oh,
                                  int64_t c0, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  int64_t cnt[NV];
  for (int u = 0; u < NV; ++u) cnt[u] = min64(W, max64(0, n - u * W));
  auto add_to = [&](T* dst, const Vec* acc) {
    for (int u = 0; u < NV; ++u)
      if (cnt[u] > 0) (Vec::loadu(dst + u * W, cnt[u]) + acc[u]).store(dst + u * W, cnt[u]);
  };
  const bool full = n == NV * W;
  if (a.db != nullptr) {
    Vec acc[NV];
    for (int u = 0; u < NV; ++u) acc[u] = Vec(T(0));
    for (int64_t ow = 0; ow < a.Wo; ++ow) {
      const T* g = dyrow + ow * a.dy.sw + c0;
      for (int u = 0; u < NV; ++u) acc[u] = acc[u] + (full ? Vec::loadu(g + u * W) : Vec::loadu(g + u * W, cnt[u]));
    }
    add_to(part + a.kh * a.kw * a.C + c0, acc);
  }
  const int64_t i_lo = max64(0, a.ph - oh), i_hi = min64(a.kh, a.H + a.ph - oh);
  for (int64_t i = i_lo; i < i_hi; ++i) {
    const T* xr = xrow0 + (oh - a.ph + i) * a.x.sh + c0;
    for (int64_t j = 0; j < a.kw; ++j) {
      // input column iw = ow - pw + j must lie in [0, W)
      const int64_t ow_lo = max64(0, a.pw - j), ow_hi = min64(a.Wo, a.W + a.pw - j);
      Vec acc[NV];
      for (int u = 0; u < NV; ++u) acc[u] = Vec(T(0));
      for (int64_t ow = ow_lo; ow < ow_hi; ++ow) {
        const T* g = dyrow + ow * a.dy.sw;
        const T* xv = xr + (ow - a.pw + j) * a.x.sw;
        if (full) {
          for (int u = 0; u < NV; ++u)
            acc[u] = at::vec::fmadd(Vec::loadu(g + c0 + u * W), Vec::loadu(xv + u * W), acc[u]);
        } else {
          for (int u = 0; u < NV; ++u)
            if (cnt[u] > 0)
              acc[u] = at::vec::fmadd(Vec::loadu(g + c0 + u * W, cnt[u]), Vec::loadu(xv + u * W, cnt[u]), acc[u]);
        }
      }
      add_to(part + (i * a.kw + j) * a.C + c0, acc);
    }
  }
}

template <typename T>
void weight_grad(const DwConvArgs& a) {
  constexpr int64_t W = Vectorized<T>::size();
  const T* x = static_cast<const T*>(a.x.data);
  const T* dy = static_cast<const T*>(a.dy.data);
  const int64_t rows = a.B * a.Ho, taps = a.kh * a.kw;
  const int64_t groups = max64(1, min64(kMaxGroups, rows));
  const int64_t plen = (taps + 1) * a.C;  // the taps, then the bias
  c10::DataPtr mem = c10::GetCPUAllocator()->allocate(sizeof(T) * static_cast<size_t>(groups * plen));
  T* parts = static_cast<T*>(mem.get());
  parallel_tasks(groups, [&](int64_t gbegin, int64_t gend) {
    for (int64_t g = gbegin; g < gend; ++g) {
      T* part = parts + g * plen;
      for (int64_t k = 0; k < plen; ++k) part[k] = T(0);
      const int64_t r_lo = g * rows / groups, r_hi = (g + 1) * rows / groups;
      for (int64_t r = r_lo; r < r_hi; ++r) {
        const int64_t b = r / a.Ho, oh = r % a.Ho;
        const T* xrow0 = x + b * a.x.sb;
        const T* dyrow = dy + b * a.dy.sb + oh * a.dy.sh;
        int64_t c0 = 0;
        for (; c0 + kChunk * W <= a.C; c0 += kChunk * W)
          weight_grad_row_chunk<T, kChunk>(a, xrow0, dyrow, part, oh, c0, kChunk * W);
        for (; c0 < a.C; c0 += W) weight_grad_row_chunk<T, 1>(a, xrow0, dyrow, part, oh, c0, min64(W, a.C - c0));
      }
    }
  }, 1);
  T* dw = static_cast<T*>(a.dw);
  T* db = static_cast<T*>(a.db);
  for (int64_t k = 0; k < taps * a.C; ++k) {
    T s = parts[k];
    for (int64_t g = 1; g < groups; ++g) s += parts[g * plen + k];
    dw[k] = s;
  }
  if (db != nullptr) {
    for (int64_t c = 0; c < a.C; ++c) {
      T s = parts[taps * a.C + c];
      for (int64_t g = 1; g < groups; ++g) s += parts[g * plen + taps * a.C + c];
      db[c] = s;
    }
  }
}

}  // namespace

bool dwconv_fwd_kernel(const DwConvArgs& a) {
  if (a.dtype == c10::ScalarType::Float) return fwd<float>(a), true;
  if (a.dtype == c10::ScalarType::Double) return fwd<double>(a), true;
  return false;
}

bool dwconv_weight_grad_kernel(const DwConvArgs& a) {
  if (a.dtype == c10::ScalarType::Float) return weight_grad<float>(a), true;
  if (a.dtype == c10::ScalarType::Double) return weight_grad<double>(a), true;
  return false;
}

}  // namespace vitattn::cpu::CPU_CAPABILITY
