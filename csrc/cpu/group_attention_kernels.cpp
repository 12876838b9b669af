// SReT group / permuted attention, CPU kernels (compiled once per instruction set, see isa.h).
//
// Z = B * heads * groups independent problems of n tokens. Token i of group g is the original
// token perm[g * n + i]: it is gathered through perm when q, k, v (dout, out) are packed into
// the task's buffers and scattered through perm when results are stored, so no permuted copy
// of any tensor is made. Everything runs in the accumulation type A (double for double,
// float otherwise; fp16/bf16 are converted on load and rounded on store).
//
// Forward, per task (a group, or a chunk of its query blocks when there are few groups):
//   pack K^T (d x np) and V (n x dvp) of the group once, then per block of BM queries:
//   S = scale (q K^T) by the register-tiled GEMM (scale in its epilogue), per row the max and
//   exp-with-sum (one vectorised loop each over the L1-resident row), out = (P V) / rowsum
//   (the division in the GEMM's epilogue), lse = max + log(rowsum). Groups larger than one
//   key block (kKvMax) use the online softmax over key blocks (O rescaled when a block raises
//   a row's max). Without a permutation, inputs already in the compute type are read in place.
// Backward, per task (a whole group, so dk and dv are summed in a fixed order without
//   atomics), over key blocks that keep the working set in L2: P = exp(S - lse) recomputed
//   (S bitwise as in the forward); dV += P^T dO; dP = dO V^T; dS = P (dP - delta) with
//   delta = rowsum(dO * out); dQ += dS K; dK += dS^T q; dq and dk times scale when stored.
// Tasks write disjoint outputs and every result row is computed by the same operations in the
// same order however the tasks are split, so results are bitwise independent of the thread
// count.
#include "group_attention.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "common/parallel.h"
#include "common/row_softmax.h"
#include "common/tile_gemm.h"
#include "common/workspace.h"

namespace vitattn::cpu::CPU_CAPABILITY {
namespace {

constexpr int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }
constexpr int64_t round_up(int64_t x, int64_t m) { return ceil_div(x, m) * m; }

// Tile sizes. A block of up to kQBlock queries against a whole group of up to kKvMax keys keeps
// the logits tile (48 x 392 fp32 = 74 KiB at SReT's largest group) and the packed K^T and V
// in L2; larger groups go through key blocks of kKvBlock (a multiple of every vector width).
template <typename A>
struct Tiles {
  static constexpr int64_t kQBlock = 64;  // at most; the blocks of a group are balanced
  static constexpr int64_t kKvMax = sizeof(A) == 4 ? 512 : 256;
  static constexpr int64_t kKvBlock = sizeof(A) == 4 ? 256 : 128;
  // The backward keeps q, dout and the dq accumulator of the whole group resident and streams
  // key blocks of at most kBwdKvBlock (the key-side packs, accumulators and two tiles), so its
  // working set stays within L2 (about 370 KiB at SReT-S's 392-token groups).
  static constexpr int64_t kBwdKvBlock = sizeof(A) == 4 ? 128 : 64;
};

struct Geometry {
  int64_t b, h, g;
};

inline Geometry problem(const GroupAttentionArgs& a, int64_t z) {
  return {z / (a.heads * a.groups), (z / a.groups) % a.heads, z % a.groups};
}

// original index of token i of group g
inline int64_t token(const GroupAttentionArgs& a, int64_t g, int64_t i) {
  const int64_t t = g * a.n + i;
  return a.perm != nullptr ? a.perm[t] : t;
}

// position of group g's first token in the original order when there is no permutation
inline int64_t g_row(const GroupAttentionArgs& a, int64_t g, int64_t i) { return g * a.n + i; }

template <typename S>
inline const S* row_ptr(const GroupTensor& t, int64_t b, int64_t h, int64_t tok) {
  return static_cast<const S*>(t.data) + b * t.sb + h * t.sh + tok * t.sn;
}

// x[0:count] = 0 (a loop here rather than a std:: algorithm: no std:: template instantiated
// per instruction set, where the linker could keep a wider build's copy)
template <typename A>
inline void zero_fill(A* x, int64_t count) {
  for (int64_t i = 0; i < count; ++i) x[i] = A(0);
}

// Software prefetch of the rows of group z (inputs to L2 for reading, outputs for writing),
// issued one group ahead: the gathered rows (scattered under a permutation, and a fresh 4 KiB
// page every few rows otherwise) then arrive while the current group computes.
template <typename S>
inline void prefetch_rows(const GroupAttentionArgs& a, const GroupTensor& t, int64_t z, int64_t len) {
  if (t.data == nullptr || len == 0) return;
  const Geometry p = problem(a, z);
  const int64_t bytes = ((len - 1) * t.sf + 1) * static_cast<int64_t>(sizeof(S));
  for (int64_t i = 0; i < a.n; ++i) {
    const char* row = reinterpret_cast<const char*>(row_ptr<S>(t, p.b, p.h, token(a, p.g, i)));
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off, 0, 2);
  }
}

template <typename S>
inline void prefetch_output_rows(const GroupAttentionArgs& a, void* out, int64_t z, int64_t len) {
  const Geometry p = problem(a, z);
  const int64_t base = (p.b * a.heads + p.h) * a.N;
  const int64_t bytes = len * static_cast<int64_t>(sizeof(S));
  for (int64_t i = 0; i < a.n; ++i) {
    const char* row = reinterpret_cast<const char*>(static_cast<S*>(out) + (base + token(a, p.g, i)) * len);
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off, 1, 2);
  }
}

// dst[c] = A(src[c * sf]) * mul for c < len
template <typename S, typename A>
inline void load_row(A* dst, const S* src, int64_t sf, int64_t len, A mul) {
  if (sf == 1) {
    for (int64_t c = 0; c < len; ++c) dst[c] = static_cast<A>(src[c]) * mul;
  } else {
    for (int64_t c = 0; c < len; ++c) dst[c] = static_cast<A>(src[c * sf]) * mul;
  }
}

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols: 8 x 8 blocks through
// registers (at::vec::transpose_mxn), scalar at the edges. Both sides are L1-resident packs.
template <typename A>
inline void transpose_pack(const A* src, int64_t ld_src, int64_t rows, int64_t cols, A* dst, int64_t ld_dst) {
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8) {
    int64_t c = 0;
    for (; c + 8 <= cols; c += 8)
      at::vec::transpose_mxn<A, 8, 8>(src + r * ld_src + c, ld_src, dst + c * ld_dst + r, ld_dst);
    for (; c < cols; ++c)
      for (int64_t i = r; i < r + 8; ++i) dst[c * ld_dst + i] = src[i * ld_src + c];
  }
  for (; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
}

template <typename S, typename A>
inline void store_row(S* dst, const A* src, int64_t len, A mul) {
  for (int64_t c = 0; c < len; ++c) dst[c] = static_cast<S>(src[c] * mul);
}

// sum of x[c] * y[c] over c < len (a multiple of the vector width; zero padded), lanes
// summed in a fixed order
template <typename A>
inline A dot_padded(const A* x, const A* y, int64_t len) {
  using Vec = at::vec::Vectorized<A>;
  Vec acc(A(0));
  for (int64_t c = 0; c < len; c += Vec::size()) acc = at::vec::fmadd(Vec::loadu(x + c), Vec::loadu(y + c), acc);
  return reduce_lanes<A>(acc, [](auto& u, auto& w) { return u + w; });
}

// x[i] = log(x[i]) for i < count (vectorised; x has room for whole vectors: a BM-long buffer
// is padded by the scratch allocator's 64-byte rounding only, so the tail goes lane by lane)
template <typename A>
inline void log_rows(A* x, int64_t count) {
  using Vec = at::vec::Vectorized<A>;
  int64_t i = 0;
  for (; i + Vec::size() <= count; i += Vec::size()) Vec::loadu(x + i).log().store(x + i);
  for (; i < count; ++i) x[i] = std::log(x[i]);
}

template <typename A>
inline void scale_row(A* x, int64_t len_padded, A mul) {
  using Vec = at::vec::Vectorized<A>;
  const Vec m(mul);
  for (int64_t c = 0; c < len_padded; c += Vec::size()) (Vec::loadu(x + c) * m).store(x + c);
}

// tile_gemm over N columns (a multiple of the vector width) split into a part of whole
// three-vector chunks and a part of two-vector chunks, so that no column chunk runs as the
// one-vector (8 x 1) tile, which needs a load per multiply-add (56 = 24 + 16 + 16 rather
// than 24 + 24 + 8). Every element is still one multiply-add chain over k ascending, so the
// results are those of a single call.
template <typename A>
inline void tile_gemm_split(TileGemm<A> g) {
  constexpr int64_t L = at::vec::Vectorized<A>::size();
  const int64_t nv = g.N / L;
  int64_t tri = nv / 3;
  if (nv % 3 == 1 && tri > 0) --tri;  // 3t + 1 vectors = 3 (t - 1) + 2 + 2
  const int64_t n3 = tri * 3 * L;
  if (n3 == 0 || n3 == g.N) {
    tile_gemm<A>(g);
    return;
  }
  TileGemm<A> h = g;
  h.N = n3;
  tile_gemm<A>(h);
  h.N = g.N - n3;
  h.B = g.B + n3;
  h.C = g.C + n3;
  if (g.bias != nullptr) h.bias = g.bias + n3;
  tile_gemm<A>(h);
}

// ---------------------------------------------------------------- forward

template <typename S, typename A>
void fwd_impl(const GroupAttentionArgs& a) {
  constexpr int64_t L = at::vec::Vectorized<A>::size();
  using T = Tiles<A>;
  const int64_t n = a.n, d = a.d, dv = a.dv;
  const int64_t kv_block = n <= T::kKvMax ? n : T::kKvBlock;
  const int64_t nkvb = ceil_div(n, kv_block);
  const int64_t np = round_up(n, L);          // leading dimension of K^T
  const int64_t bw = round_up(kv_block, L);   // width of the logits tile
  const int64_t dvp = round_up(dv, L);
  const int64_t nqb = ceil_div(n, T::kQBlock);
  const int64_t BM = ceil_div(n, nqb);
  const int64_t Z = a.B * a.heads * a.groups;
  // With few groups, split each one's query blocks over several tasks (each repacks K, V).
  const int64_t nthreads = std::max(1, at::get_num_threads());
  int64_t per_part = nqb;
  if (Z < 4 * nthreads) per_part = ceil_div(nqb, std::min(nqb, ceil_div(4 * nthreads, Z)));
  const int64_t parts = ceil_div(nqb, per_part);
  const A scale = static_cast<A>(a.scale);
  S* out = static_cast<S*>(a.out);
  A* lse = static_cast<A*>(a.lse);

  // Without a permutation and with inputs already in the compute type, q is read in place as
  // the logits GEMM's A operand (any strides), k is transposed straight from its rows, and
  // where dv is a whole number of vectors v is read in place as P.V's B operand and one key
  // block's output is written by that GEMM's epilogue (scaled by 1 / rowsum) straight into out.
  constexpr bool same_type = std::is_same_v<S, A>;
  const bool in_place = same_type && a.perm == nullptr;
  const bool v_in_place = in_place && a.v.sf == 1 && dv % L == 0;
  const bool out_in_place = v_in_place && nkvb == 1;
  const bool k_rows = in_place && a.k.sf == 1;

  parallel_tasks(Z * parts, [&](int64_t begin, int64_t end) {
    auto [KT, V, Kr, Qs, Sb, O, m, l, scales] =
        thread_buffers<A, 9>({d * np, n * dvp, n * d, BM * d, BM * bw, BM * dvp, BM, BM, BM});
    // padding columns of K^T and V stay zero: every group has the same n
    zero_fill(KT, d * np);
    zero_fill(V, n * dvp);
    for (int64_t i = 0; i < BM; ++i) scales[i] = scale;
    int64_t packed = -1;
    const A* Vg = V;  // the group's V rows (the pack, or v itself)
    int64_t ldv = dvp;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t z = task / parts, part = task % parts;
      const Geometry p = problem(a, z);
      if (z != packed) {
        if (z + 1 < Z) {
          prefetch_rows<S>(a, a.q, z + 1, d);
          prefetch_rows<S>(a, a.k, z + 1, d);
          prefetch_rows<S>(a, a.v, z + 1, dv);
          prefetch_output_rows<S>(a, a.out, z + 1, dv);
        }
        if (k_rows) {
          transpose_pack(reinterpret_cast<const A*>(row_ptr<S>(a.k, p.b, p.h, token(a, p.g, 0))), a.k.sn, n, d,
                         KT, np);
        } else {
          for (int64_t j = 0; j < n; ++j)
            load_row(Kr + j * d, row_ptr<S>(a.k, p.b, p.h, token(a, p.g, j)), a.k.sf, d, A(1));
          transpose_pack(Kr, d, n, d, KT, np);
        }
        if (v_in_place) {
          Vg = reinterpret_cast<const A*>(row_ptr<S>(a.v, p.b, p.h, token(a, p.g, 0)));
          ldv = a.v.sn;
        } else {
          for (int64_t j = 0; j < n; ++j)
            load_row(V + j * dvp, row_ptr<S>(a.v, p.b, p.h, token(a, p.g, j)), a.v.sf, dv, A(1));
        }
        packed = z;
      }
      const int64_t row_base = (p.b * a.heads + p.h) * a.N;
      for (int64_t qb = part * per_part; qb < std::min(nqb, (part + 1) * per_part); ++qb) {
        const int64_t r0 = qb * BM, rows = std::min(BM, n - r0);
        // S = scale (q k^T): the scale applied in the GEMM's epilogue
        const A* Qa = Qs;
        int64_t q_rs = d, q_cs = 1;
        if (in_place) {
          Qa = reinterpret_cast<const A*>(row_ptr<S>(a.q, p.b, p.h, token(a, p.g, r0)));
          q_rs = a.q.sn, q_cs = a.q.sf;
        } else {
          for (int64_t i = 0; i < rows; ++i)
            load_row(Qs + i * d, row_ptr<S>(a.q, p.b, p.h, token(a, p.g, r0 + i)), a.q.sf, d, A(1));
        }
        for (int64_t j = 0; j < nkvb; ++j) {
          const int64_t c0 = j * kv_block, bn = std::min(kv_block, n - c0);
          tile_gemm_split<A>({.M = rows, .N = round_up(bn, L), .K = d, .A = Qa, .a_rs = q_rs, .a_cs = q_cs, .B = KT + c0,
                        .ldb = np, .C = Sb, .ldc = bw, .accumulate = false, .row_scale = scales});
          for (int64_t i = 0; i < rows; ++i) {
            A* s = Sb + i * bw;
            const A mx = row_max(s, bn);
            if (j == 0) {
              m[i] = mx;
              l[i] = exp_shift_sum(s, bn, mx);
            } else {
              const A mnew = std::max(m[i], mx);
              const A alpha = std::exp(m[i] - mnew);
              l[i] = l[i] * alpha + exp_shift_sum(s, bn, mnew);
              m[i] = mnew;
              scale_row(O + i * dvp, dvp, alpha);
            }
          }
          if (j + 1 < nkvb) {
            tile_gemm<A>({.M = rows, .N = dvp, .K = bn, .A = Sb, .a_rs = bw, .a_cs = 1, .B = Vg + c0 * ldv,
                          .ldb = ldv, .C = O, .ldc = dvp, .accumulate = j > 0});
          } else {
            // the last key block: out = O / rowsum (1 / rowsum kept in l)
            for (int64_t i = 0; i < rows; ++i) l[i] = A(1) / l[i];
            if (out_in_place) {
              tile_gemm<A>({.M = rows, .N = dv, .K = bn, .A = Sb, .a_rs = bw, .a_cs = 1, .B = Vg + c0 * ldv,
                            .ldb = ldv, .C = reinterpret_cast<A*>(out) + (row_base + g_row(a, p.g, r0)) * dv,
                            .ldc = dv, .accumulate = false, .row_scale = l});
            } else {
              tile_gemm<A>({.M = rows, .N = dvp, .K = bn, .A = Sb, .a_rs = bw, .a_cs = 1, .B = Vg + c0 * ldv,
                            .ldb = ldv, .C = O, .ldc = dvp, .accumulate = j > 0, .row_scale = l});
              for (int64_t i = 0; i < rows; ++i)
                store_row(out + (row_base + token(a, p.g, r0 + i)) * dv, O + i * dvp, dv, A(1));
            }
          }
        }
        // lse = max + log(rowsum) = max - log(1 / rowsum), vectorised over the block's rows
        log_rows(l, rows);
        for (int64_t i = 0; i < rows; ++i) lse[row_base + token(a, p.g, r0 + i)] = m[i] - l[i];
      }
    }
  });
}

// ---------------------------------------------------------------- backward

template <typename S, typename A>
void bwd_impl(const GroupAttentionArgs& a) {
  constexpr int64_t L = at::vec::Vectorized<A>::size();
  using T = Tiles<A>;
  const int64_t n = a.n, d = a.d, dv = a.dv;
  // balanced key blocks, each a multiple of the vector width (a tile's padding columns then
  // stay inside K^T's and V^T's np columns)
  const int64_t kv_block = n <= T::kBwdKvBlock ? n : round_up(ceil_div(n, ceil_div(n, T::kBwdKvBlock)), L);
  const int64_t nkvb = ceil_div(n, kv_block);
  const int64_t np = round_up(n, L);
  const int64_t bw = round_up(kv_block, L);
  const int64_t dp = round_up(d, L), dvp = round_up(dv, L);
  const int64_t BM = ceil_div(n, ceil_div(n, T::kQBlock));
  const int64_t Z = a.B * a.heads * a.groups;
  const A scale = static_cast<A>(a.scale);
  S* dq_out = static_cast<S*>(a.dq);
  S* dk_out = static_cast<S*>(a.dk);
  S* dv_out = static_cast<S*>(a.dv_out);

  parallel_tasks(Z, [&](int64_t begin, int64_t end) {
    // row-major packs with zero padding columns (B operands of the tile GEMM), transposed
    // packs of k and v, the per-token statistics, the gradient accumulators, two tiles
    auto [Qs, Kr, KT, VT, dO, lse_row, delta, dQ, dK, dV, P, dP, orow, Vr, scales] = thread_buffers<A, 15>(
        {n * dp, n * dp, d * np, dv * np, n * dvp, n, n, n * dp, n * dp, n * dvp, BM * bw, BM * bw, dvp, n * dv, BM});
    for (int64_t i = 0; i < BM; ++i) scales[i] = scale;
    // zero padding columns (finite values in the unused lanes of the tiles)
    zero_fill(KT, d * np);
    zero_fill(VT, dv * np);
    zero_fill(dO, n * dvp);
    zero_fill(orow, dvp);
    for (int64_t z = begin; z < end; ++z) {
      const Geometry p = problem(a, z);
      if (z + 1 < Z) {
        for (const GroupTensor* t : {&a.q, &a.k}) prefetch_rows<S>(a, *t, z + 1, d);
        for (const GroupTensor* t : {&a.v, &a.dout, &a.out_in}) prefetch_rows<S>(a, *t, z + 1, dv);
        prefetch_output_rows<S>(a, a.dq, z + 1, d);
        prefetch_output_rows<S>(a, a.dk, z + 1, d);
        prefetch_output_rows<S>(a, a.dv_out, z + 1, dv);
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t tok = token(a, p.g, i);
        load_row(Qs + i * dp, row_ptr<S>(a.q, p.b, p.h, tok), a.q.sf, d, A(1));
        const S* krow = row_ptr<S>(a.k, p.b, p.h, tok);
        load_row(Kr + i * dp, krow, a.k.sf, d, A(1));
        load_row(Vr + i * dv, row_ptr<S>(a.v, p.b, p.h, tok), a.v.sf, dv, A(1));
        A* dorow = dO + i * dvp;
        load_row(dorow, row_ptr<S>(a.dout, p.b, p.h, tok), a.dout.sf, dv, A(1));
        load_row(orow, row_ptr<S>(a.out_in, p.b, p.h, tok), a.out_in.sf, dv, A(1));
        delta[i] = dot_padded(dorow, orow, dvp);
        lse_row[i] = *(static_cast<const A*>(a.lse_in.data) + p.b * a.lse_in.sb + p.h * a.lse_in.sh + tok * a.lse_in.sn);
      }
      transpose_pack(Kr, dp, n, d, KT, np);
      transpose_pack(Vr, dv, n, dv, VT, np);
      for (int64_t j = 0; j < nkvb; ++j) {
        const int64_t c0 = j * kv_block, bn = std::min(kv_block, n - c0), bnp = round_up(bn, L);
        for (int64_t r0 = 0; r0 < n; r0 += BM) {
          const int64_t rows = std::min(BM, n - r0);
          // P = exp(S - lse)
          tile_gemm_split<A>({.M = rows, .N = bnp, .K = d, .A = Qs + r0 * dp, .a_rs = dp, .a_cs = 1, .B = KT + c0,
                        .ldb = np, .C = P, .ldc = bw, .accumulate = false, .row_scale = scales});
          for (int64_t i = 0; i < rows; ++i) exp_shift(P + i * bw, bn, lse_row[r0 + i]);
          // dV[c0:] += P^T dO[r0:]
          tile_gemm<A>({.M = bn, .N = dvp, .K = rows, .A = P, .a_rs = 1, .a_cs = bw, .B = dO + r0 * dvp,
                        .ldb = dvp, .C = dV + c0 * dvp, .ldc = dvp, .accumulate = r0 > 0});
          // dP = dO V^T, then dS = P (dP - delta) in place of P
          tile_gemm_split<A>({.M = rows, .N = bnp, .K = dv, .A = dO + r0 * dvp, .a_rs = dvp, .a_cs = 1, .B = VT + c0,
                        .ldb = np, .C = dP, .ldc = bw, .accumulate = false});
          for (int64_t i = 0; i < rows; ++i) {
            using Vec = at::vec::Vectorized<A>;
            A* pr = P + i * bw;
            const A* dpr = dP + i * bw;
            const Vec dl(delta[r0 + i]);
            for (int64_t c = 0; c < bnp; c += L) (Vec::loadu(pr + c) * (Vec::loadu(dpr + c) - dl)).store(pr + c);
          }
          // dQ[r0:] += dS K[c0:];  dK[c0:] += dS^T q[r0:]  (both times scale when stored)
          tile_gemm<A>({.M = rows, .N = dp, .K = bn, .A = P, .a_rs = bw, .a_cs = 1, .B = Kr + c0 * dp,
                        .ldb = dp, .C = dQ + r0 * dp, .ldc = dp, .accumulate = j > 0});
          tile_gemm<A>({.M = bn, .N = dp, .K = rows, .A = P, .a_rs = 1, .a_cs = bw, .B = Qs + r0 * dp,
                        .ldb = dp, .C = dK + c0 * dp, .ldc = dp, .accumulate = r0 > 0});
        }
      }
      const int64_t row_base = (p.b * a.heads + p.h) * a.N;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t row = row_base + token(a, p.g, i);
        store_row(dq_out + row * d, dQ + i * dp, d, scale);
        store_row(dk_out + row * d, dK + i * dp, d, scale);
        store_row(dv_out + row * dv, dV + i * dvp, dv, A(1));
      }
    }
  });
}

}  // namespace

bool group_attention_fwd_kernel(const GroupAttentionArgs& a) {
  switch (a.dtype) {
    case c10::ScalarType::Float: fwd_impl<float, float>(a); return true;
    case c10::ScalarType::Double: fwd_impl<double, double>(a); return true;
    case c10::ScalarType::Half: fwd_impl<c10::Half, float>(a); return true;
    case c10::ScalarType::BFloat16: fwd_impl<c10::BFloat16, float>(a); return true;
    default: return false;  // the caller reports it (no message formatting in per-ISA code)
  }
}

bool group_attention_bwd_kernel(const GroupAttentionArgs& a) {
  switch (a.dtype) {
    case c10::ScalarType::Float: bwd_impl<float, float>(a); return true;
    case c10::ScalarType::Double: bwd_impl<double, double>(a); return true;
    case c10::ScalarType::Half: bwd_impl<c10::Half, float>(a); return true;
    case c10::ScalarType::BFloat16: bwd_impl<c10::BFloat16, float>(a); return true;
    default: return false;
  }
}

}  // namespace vitattn::cpu::CPU_CAPABILITY
