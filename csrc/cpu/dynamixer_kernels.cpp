// DynaMixer dynamic mixing, CPU kernels (compiled once per instruction set, see isa.h).
//
// The rows are processed in blocks of rows_blk rows (P = rows_blk * S problems, see
// dynamixer_kernels.h for the math), each block on one thread, everything in cache:
//   1. per row: x packed, R = x Wc^T + bc (written out for the backward);
//   2. the block's R (P, L*d) times the packed generate weight: logits Z (P, Np) in one
//      GEMM, a buffer of about kBlockBytes (L2-sized), never an (L, L) tensor per row in memory;
//   3. per problem: softmax over i, then y = P^T x on register tiles, 1/sum in the GEMM's epilogue.
// The backward recomputes Z from the saved R the same way (bitwise the forward's logits),
// forms dZ in place, then dR = dZ Wg for the block in one GEMM, dx = P dy + dR Wc per row,
// and adds dZ^T R, dR^T x and the bias gradients to partials owned by the block's group.
//
// Layouts (A = accumulation type, W = its vector width):
//   * problem p's logits at Z[p * Np + i * Lv + j], j padded to Lv = round_up(L, W): the
//     softmax over i runs on whole vectors along j; pad columns carry zero weights and bias
//     and never reach an output (their dP is zero, so their dZ is zero).
//   * a row's x, y, dy, dx as (L, XS = S * CSv), segment s at column s * CSv (CSv = C/S
//     padded to W with zeros), rows XL apart; dy also transposed per segment, (S, CSv, Lv).
//   * weights packed once per call into the padded orders, B operands in panels
//     (tile_gemm.h): compress (XS, SDv) and its transpose (SDv, XS); generate (LD, NZ) for
//     Z = R Wg^T and (NZ, LDv) for dR = dZ Wg, columns n = i * Lv + j.
// The backward recomputes Z bitwise (same packed operands, same GEMM) and the softmax from
// it, max and sum included, so its P equals the forward's exactly, even where |Z| ~ 1e4 and
// exp(Z - lse) with an fp32 log-sum-exp would be off by 1e-4; the lse the forward writes
// (the op's statistic) is not needed by the backward.
// Determinism: the blocks form a fixed number of groups that depends on the shape only;
// a group sums its blocks in order into its own weight-gradient partials, and the partials
// are added in group order. No result depends on the thread count or the schedule.
#include "dynamixer_kernels.h"

#include <ATen/cpu/vec/vec.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <array>
#include <type_traits>

#include "common/parallel.h"
#include "common/row_softmax.h"
#include "common/tile_gemm.h"
#include "common/workspace.h"

namespace vitattn::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// logits block of one task: fits in L2 next to the weights' panels
constexpr int64_t kBlockBytes = 128 * 1024;
// upper bound on the weight-gradient partials (groups of blocks) of the backward: enough
// groups to share among threads, few enough that zeroing and summing them stays cheap
constexpr int64_t kMaxGroups = 8;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Buffers of one call (packed weights, gradient partials), from PyTorch's CPU allocator.
template <typename A>
class CallBuffer {
 public:
  explicit CallBuffer(int64_t n)
      : mem_(c10::GetCPUAllocator()->allocate(sizeof(A) * static_cast<size_t>(n > 0 ? n : 1))) {}
  A* get() const { return static_cast<A*>(mem_.get()); }

 private:
  c10::DataPtr mem_;
};

template <typename A>
void fill(A* p, int64_t n, A v) {
  for (int64_t k = 0; k < n; ++k) p[k] = v;
}

template <typename A>
struct Plan {
  static constexpr int64_t W = Vectorized<A>::size();
  int64_t rows, N1, N2, L, Lv, C, S, CS, CSv, XS, XL, d, LD, LDv, RB, SD, SDv, NZ, Np;
  int64_t pz, pr, pc, px;  // panel widths: generate (Z, dR), compress (R, dx)
  int64_t rows_blk, nblocks;

  Plan(const DynaMixerArgs& a, bool backward)
      : rows(a.N0 * a.N1 * a.N2), N1(a.N1), N2(a.N2), L(a.L), C(a.C), S(a.S), d(a.d) {
    Lv = round_up(max64(L, 1), W);
    CS = C / S;
    CSv = round_up(CS, W);
    XS = S * CSv;
    LD = L * d;
    LDv = round_up(max64(LD, 1), W);
    SD = S * d;
    SDv = round_up(SD, W);
    NZ = L * Lv;
    // row strides of the buffers whose rows a GEMM walks: never a multiple of 512 bytes, so
    // consecutive rows do not pile up in a few L1 sets (L = 32: a logits row is 4 KiB)
    Np = padded_ld(NZ);
    XL = padded_ld(XS);
    RB = padded_ld(LDv);
    pz = tile_gemm_panel_width<A>(NZ);
    pr = tile_gemm_panel_width<A>(LDv);
    pc = tile_gemm_panel_width<A>(SDv);
    px = tile_gemm_panel_width<A>(max64(XS, W));
    // The backward reads and writes its dWg partial (NZ, RB) once per block: where that leaves
    // L2 (large L*d), blocks of more problems pay for it (measured faster at L=32, d=8).
    int64_t block_bytes = kBlockBytes;
    if (backward) block_bytes *= min64(4, max64(1, NZ * RB * int64_t(sizeof(A)) / (256 * 1024)));
    rows_blk = min64(max64(rows, 1), max64(1, block_bytes / (S * Np * int64_t(sizeof(A)))));
    nblocks = (rows + rows_blk - 1) / rows_blk;
  }

  static int64_t padded_ld(int64_t n) { return (n * int64_t(sizeof(A))) % 512 == 0 ? n + W : n; }

  // element offset of row q in a 5-D operand with leading strides s
  int64_t row_offset(const int64_t* s, int64_t q) const {
    const int64_t n2 = q % N2, t = q / N2;
    return (t / N1) * s[0] + (t % N1) * s[1] + n2 * s[2];
  }
};

template <typename T, typename A>
inline void load_run(const T* src, int64_t stride, A* dst, int64_t n) {
  if (stride == 1)
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<A>(src[i]);
  else
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<A>(src[i * stride]);
}

template <typename T, typename A>
inline void store_run(const A* src, T* dst, int64_t stride, int64_t n) {
  if (stride == 1)
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  else
    for (int64_t i = 0; i < n; ++i) dst[i * stride] = static_cast<T>(src[i]);
}

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols, in 8 x 8 blocks
// (at::vec's register transpose where the build has one)
template <typename A>
void transpose(const A* src, int64_t ld_src, A* dst, int64_t ld_dst, int64_t rows, int64_t cols) {
  int64_t r0 = 0;
  for (; r0 + 8 <= rows; r0 += 8) {
    int64_t c0 = 0;
    for (; c0 + 8 <= cols; c0 += 8)
      at::vec::transpose_mxn<A, 8, 8>(src + r0 * ld_src + c0, ld_src, dst + c0 * ld_dst + r0, ld_dst);
    for (; c0 < cols; ++c0)
      for (int64_t r = r0; r < r0 + 8; ++r) dst[c0 * ld_dst + r] = src[r * ld_src + c0];
  }
  for (; r0 < rows; ++r0)
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r0] = src[r0 * ld_src + c];
}

// row q of an x-like operand (L, C) -> buf (L, XS); the pad columns of buf are left as they are
template <typename T, typename A>
void pack_row(const Plan<A>& g, const DmView& v, int64_t q, A* buf) {
  const T* base = static_cast<const T*>(v.data) + g.row_offset(v.stride, q);
  const int64_t sl = v.stride[3], sc = v.stride[4];
  for (int64_t i = 0; i < g.L; ++i) {
    if (g.CS == g.CSv) {
      load_run(base + i * sl, sc, buf + i * g.XL, g.C);
    } else {
      for (int64_t s = 0; s < g.S; ++s) load_run(base + i * sl + s * g.CS * sc, sc, buf + i * g.XL + s * g.CSv, g.CS);
    }
  }
}

template <typename T, typename A>
void unpack_row(const Plan<A>& g, const A* buf, const DmView& v, int64_t q) {
  T* base = static_cast<T*>(v.data) + g.row_offset(v.stride, q);
  const int64_t sl = v.stride[3], sc = v.stride[4];
  for (int64_t i = 0; i < g.L; ++i) {
    if (g.CS == g.CSv) {
      store_run(buf + i * g.XL, base + i * sl, sc, g.C);
    } else {
      for (int64_t s = 0; s < g.S; ++s) store_run(buf + i * g.XL + s * g.CSv, base + i * sl + s * g.CS * sc, sc, g.CS);
    }
  }
}

// B (K, N) packed in panels of pw columns: element (k, n) at (n / pw) * K * pw + k * pw + n % pw
template <typename A, typename F>
void pack_panels(int64_t K, int64_t N, int64_t pw, A* dst, const F& value) {
  for (int64_t n = 0; n < N; ++n) {
    A* col = dst + (n / pw) * K * pw + n % pw;
    for (int64_t k = 0; k < K; ++k) col[k * pw] = value(k, n);
  }
}

// Every weight in the kernels' padded orders (see the file comment).
template <typename A>
struct Packed {
  CallBuffer<A> wz, bz, wr, wc, bc, wct;
  Packed(const Plan<A>& g, bool backward)
      : wz(round_up(g.NZ, g.pz) * g.LD),
        bz(g.NZ),
        wr(backward ? round_up(g.LDv, g.pr) * g.NZ : 0),
        wc(round_up(g.SDv, g.pc) * g.XS),
        bc(g.SDv),
        wct(backward ? round_up(g.XS, g.px) * g.SDv : 0) {}
};

template <typename T, typename A>
void pack_weights(const Plan<A>& g, const DynaMixerArgs& a, Packed<A>& p, bool backward) {
  const T* wg = static_cast<const T*>(a.wg.data);
  const T* bg = static_cast<const T*>(a.bg.data);
  const T* wc = static_cast<const T*>(a.wc.data);
  const T* bc = static_cast<const T*>(a.bc.data);
  const int64_t g0 = a.wg.stride[0], g1 = a.wg.stride[1], c0 = a.wc.stride[0], c1 = a.wc.stride[1];
  const int64_t L = g.L, Lv = g.Lv;
  // generate weight at padded column n = i * Lv + j and input m (zero on pads)
  auto gen = [&](int64_t n, int64_t m) -> A {
    const int64_t i = n / Lv, j = n % Lv;
    return j < L && m < g.LD ? static_cast<A>(wg[(i * L + j) * g0 + m * g1]) : A(0);
  };
  // compress weight at output m and padded channel column s * CSv + c
  auto com = [&](int64_t m, int64_t col) -> A {
    const int64_t s = col / g.CSv, c = col % g.CSv;
    return m < g.SD && c < g.CS ? static_cast<A>(wc[m * c0 + (s * g.CS + c) * c1]) : A(0);
  };
  // the generate packs are the big ones (L^3 d): one task per panel
  const int64_t nz_panels = (g.NZ + g.pz - 1) / g.pz;
  const int64_t nr_panels = backward ? (g.LDv + g.pr - 1) / g.pr : 0;
  parallel_tasks(nz_panels + nr_panels, [&](TaskQueue& tasks) {
    for (int64_t t; (t = tasks.next()) >= 0;) {
      if (t < nz_panels) {
        const int64_t n0 = t * g.pz, w = min64(g.pz, g.NZ - n0);
        A* dst = p.wz.get() + t * g.LD * g.pz;
        for (int64_t m = 0; m < g.LD; ++m)
          for (int64_t c = 0; c < w; ++c) dst[m * g.pz + c] = gen(n0 + c, m);
      } else {
        const int64_t m0 = (t - nz_panels) * g.pr, w = min64(g.pr, g.LDv - m0);
        A* dst = p.wr.get() + (t - nz_panels) * g.NZ * g.pr;
        for (int64_t n = 0; n < g.NZ; ++n)
          for (int64_t c = 0; c < w; ++c) dst[n * g.pr + c] = gen(n, m0 + c);
      }
    }
  });
  for (int64_t n = 0; n < g.NZ; ++n) {
    const int64_t i = n / Lv, j = n % Lv;
    p.bz.get()[n] = j < L && bg != nullptr ? static_cast<A>(bg[(i * L + j) * a.bg.stride[0]]) : A(0);
  }
  pack_panels<A>(g.XS, g.SDv, g.pc, p.wc.get(), [&](int64_t k, int64_t m) { return com(m, k); });
  for (int64_t m = 0; m < g.SDv; ++m)
    p.bc.get()[m] = m < g.SD && bc != nullptr ? static_cast<A>(bc[m * a.bc.stride[0]]) : A(0);
  if (backward) pack_panels<A>(g.SDv, g.XS, g.px, p.wct.get(), [&](int64_t m, int64_t col) { return com(m, col); });
}

// Z (nprob, Np) = rb (nprob, LD) Wg^T + bg
template <typename A>
inline void generate(const Plan<A>& g, const Packed<A>& p, bool has_bias, int64_t nprob, const A* rb, A* z) {
  tile_gemm<A>({.M = nprob, .N = g.NZ, .K = g.LD, .A = rb, .a_rs = g.RB, .a_cs = 1, .B = p.wz.get(), .ldb = g.pz,
                .panel_w = g.pz, .panel_stride = g.LD * g.pz, .C = z, .ldc = g.Np,
                .bias = has_bias ? p.bz.get() : nullptr});
}

// E = exp(Z - m) in place for one problem's logits zp (L, Lv), m the column maxima;
// 1 / sum_i E in inv (Lv,) and, if lse is not null, m + log(sum_i E) in lse (Lv,).
template <typename A>
inline void softmax_columns(int64_t L, int64_t Lv, A* zp, A* inv, A* lse) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  for (int64_t j = 0; j < Lv; j += W) {
    A* zj = zp + j;
    Vec mx = Vec::loadu(zj);
    for (int64_t i = 1; i < L; ++i) mx = at::vec::maximum(mx, Vec::loadu(zj + i * Lv));
    Vec sum(A(0));
    for (int64_t i = 0; i < L; ++i) {
      const Vec e = vexp(Vec::loadu(zj + i * Lv) - mx);
      e.store(zj + i * Lv);
      sum = sum + e;
    }
    (Vec(A(1)) / sum).store(inv + j);
    if (lse != nullptr) (mx + sum.log()).store(lse + j);
  }
}

// ---------------------------------------------------------------- forward

template <typename T>
void fwd(const DynaMixerArgs& a) {
  using A = typename AccOf<T>::type;
  const Plan<A> g(a, false);
  if (g.rows == 0 || g.L == 0) return;
  Packed<A> pk(g, false);
  pack_weights<T, A>(g, a, pk, false);
  const bool has_bg = a.bg.data != nullptr, has_bc = a.bc.data != nullptr;
  const bool y_direct = std::is_same_v<T, A> && a.y.stride[4] == 1 && g.CS == g.CSv;
  A* lse_out = static_cast<A*>(a.lse);

  parallel_tasks(g.nblocks, [&](TaskQueue& tasks) {
    const int64_t L = g.L, Lv = g.Lv, XS = g.XS, XL = g.XL, S = g.S;
    const int64_t P = g.rows_blk * S;
    auto [xblk, rblk, rb, z, yr, inv, lse] =
        thread_buffers<A, 7>({g.rows_blk * L * XL, g.rows_blk * L * g.SDv, P * g.RB, P * g.Np, L * XL, Lv, Lv});
    fill(xblk, g.rows_blk * L * XL, A(0));  // pad columns stay zero
    fill(rb, P * g.RB, A(0));
    for (int64_t b; (b = tasks.next()) >= 0;) {
      const int64_t q0 = b * g.rows_blk, nrows = min64(g.rows_blk, g.rows - q0);
      // compress, the block's tokens in one GEMM; R rounded to the storage type: the
      // backward reads it back from r
      for (int64_t q = 0; q < nrows; ++q) pack_row<T, A>(g, a.x, q0 + q, xblk + q * L * XL);
      tile_gemm<A>({.M = nrows * L, .N = g.SDv, .K = XS, .A = xblk, .a_rs = XL, .a_cs = 1, .B = pk.wc.get(),
                    .ldb = g.pc, .panel_w = g.pc, .panel_stride = XS * g.pc, .C = rblk, .ldc = g.SDv,
                    .bias = has_bc ? pk.bc.get() : nullptr});
      const int64_t d = g.d, sr3 = a.r.stride[3], sr4 = a.r.stride[4];
      for (int64_t q = 0; q < nrows; ++q) {
        T* rout = static_cast<T*>(a.r.data) + g.row_offset(a.r.stride, q0 + q);
        for (int64_t i = 0; i < L; ++i) {
          const A* rrow = rblk + (q * L + i) * g.SDv;
          for (int64_t s = 0; s < S; ++s) {
            for (int64_t k = 0; k < d; ++k) {
              const T v = static_cast<T>(rrow[s * d + k]);
              rout[i * sr3 + (s * d + k) * sr4] = v;
              rb[(q * S + s) * g.RB + i * d + k] = static_cast<A>(v);
            }
          }
        }
      }
      generate(g, pk, has_bg, nrows * S, rb, z);
      for (int64_t q = 0; q < nrows; ++q) {
        const A* xq = xblk + q * L * XL;
        // where y holds the accumulation type with contiguous, unpadded segments, the mix
        // GEMM stores into y itself (its epilogue applies 1/sum): no copy pass over y
        A* yq = yr;
        int64_t ldy = XL;
        if constexpr (std::is_same_v<T, A>) {
          if (y_direct) yq = static_cast<A*>(a.y.data) + g.row_offset(a.y.stride, q0 + q), ldy = a.y.stride[3];
        }
        for (int64_t s = 0; s < S; ++s) {
          A* zp = z + (q * S + s) * g.Np;
          softmax_columns(L, Lv, zp, inv, lse);
          // y[j, :] = (sum_i E[i, j] x[i, :]) / sum_i E[i, j]
          tile_gemm<A>({.M = L, .N = g.CSv, .K = L, .A = zp, .a_rs = 1, .a_cs = Lv, .B = xq + s * g.CSv, .ldb = XL,
                        .C = yq + s * g.CSv, .ldc = ldy, .row_scale = inv});
          A* so = lse_out + ((q0 + q) * S + s) * L;
          for (int64_t j = 0; j < L; ++j) so[j] = lse[j];
        }
        if (yq == yr) unpack_row<T, A>(g, yr, a.y, q0 + q);
      }
    }
  });
}

// ---------------------------------------------------------------- backward

template <typename T>
void bwd(const DynaMixerArgs& a) {
  using A = typename AccOf<T>::type;
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  const Plan<A> g(a, true);
  const bool has_bg = a.bg.data != nullptr, has_bc = a.bc.data != nullptr;
  A* dwg = static_cast<A*>(a.dwg);
  A* dbg = static_cast<A*>(a.dbg);
  A* dwc = static_cast<A*>(a.dwc);
  A* dbc = static_cast<A*>(a.dbc);
  if (g.rows == 0 || g.L == 0) {
    fill(dwg, g.L * g.L * g.LD, A(0));
    fill(dwc, g.SD * g.C, A(0));
    if (dbg != nullptr) fill(dbg, g.L * g.L, A(0));
    if (dbc != nullptr) fill(dbc, g.SD, A(0));
    return;
  }
  Packed<A> pk(g, true);
  pack_weights<T, A>(g, a, pk, true);

  // fixed groups of consecutive blocks, each with its own partials of
  // dWg (NZ, LDv; row stride RB), dbg (NZ), dWc (SD, XS; row stride XL), dbc (SDv)
  const int64_t per_group = (g.nblocks + kMaxGroups - 1) / kMaxGroups;
  const int64_t ngroups = (g.nblocks + per_group - 1) / per_group;
  const int64_t o_dbg = g.NZ * g.RB, o_dwc = o_dbg + g.NZ, o_dbc = o_dwc + g.SD * g.XL, part = o_dbc + g.SDv;
  CallBuffer<A> partials(ngroups * part);

  parallel_tasks(ngroups, [&](TaskQueue& tasks) {
    const int64_t L = g.L, Lv = g.Lv, XS = g.XS, XL = g.XL, S = g.S, CSv = g.CSv, d = g.d;
    const int64_t sr3 = a.r.stride[3], sr4 = a.r.stride[4];
    const int64_t P = g.rows_blk * S;
    auto [xblk, dxblk, rb, z, drb, drt, dyr, dyt, dp, inv] = thread_buffers<A, 10>(
        {g.rows_blk * L * XL, g.rows_blk * L * XL, P * g.RB, P * g.Np, P * g.RB, g.rows_blk * L * g.SDv, L * XL,
         S * CSv * Lv, L * Lv, Lv});
    fill(xblk, g.rows_blk * L * XL, A(0));  // pad columns and rows stay zero
    fill(rb, P * g.RB, A(0));
    fill(drt, g.rows_blk * L * g.SDv, A(0));
    fill(dyr, L * XL, A(0));
    fill(dyt, S * CSv * Lv, A(0));
    for (int64_t grp; (grp = tasks.next()) >= 0;) {
      A* part_dwg = partials.get() + grp * part;
      A* part_dbg = part_dwg + o_dbg;
      A* part_dwc = part_dwg + o_dwc;
      A* part_dbc = part_dwg + o_dbc;
      fill(part_dwg, part, A(0));
      const int64_t b_end = min64(g.nblocks, (grp + 1) * per_group);
      for (int64_t b = grp * per_group; b < b_end; ++b) {
        const int64_t q0 = b * g.rows_blk, nrows = min64(g.rows_blk, g.rows - q0), nprob = nrows * S;
        for (int64_t q = 0; q < nrows; ++q) {  // the saved R, problem-major
          const T* rin = static_cast<const T*>(a.r.data) + g.row_offset(a.r.stride, q0 + q);
          for (int64_t i = 0; i < L; ++i)
            for (int64_t s = 0; s < S; ++s)
              for (int64_t k = 0; k < d; ++k)
                rb[(q * S + s) * g.RB + i * d + k] = static_cast<A>(rin[i * sr3 + (s * d + k) * sr4]);
        }
        generate(g, pk, has_bg, nprob, rb, z);
        for (int64_t q = 0; q < nrows; ++q) {
          A* xq = xblk + q * L * XL;
          A* dxq = dxblk + q * L * XL;
          pack_row<T, A>(g, a.x, q0 + q, xq);
          pack_row<T, A>(g, a.dy, q0 + q, dyr);
          transpose(dyr, XL, dyt, Lv, L, XS);  // dy^T: (XS, Lv), segment s at row s * CSv
          for (int64_t s = 0; s < S; ++s) {
            A* zp = z + (q * S + s) * g.Np;
            // P exactly as in the forward
            softmax_columns<A>(L, Lv, zp, inv, nullptr);
            for (int64_t j = 0; j < Lv; j += W) {
              const Vec f = Vec::loadu(inv + j);
              for (int64_t i = 0; i < L; ++i) (Vec::loadu(zp + i * Lv + j) * f).store(zp + i * Lv + j);
            }
            // dP = x dy^T (L, Lv); dx (mix part) = P dy
            tile_gemm<A>({.M = L, .N = Lv, .K = g.CS, .A = xq + s * CSv, .a_rs = XL, .a_cs = 1,
                          .B = dyt + s * CSv * Lv, .ldb = Lv, .C = dp, .ldc = Lv});
            tile_gemm<A>({.M = L, .N = CSv, .K = L, .A = zp, .a_rs = Lv, .a_cs = 1, .B = dyr + s * CSv,
                          .ldb = XL, .C = dxq + s * CSv, .ldc = XL});
            // dZ = P (dP - sum_i P dP), in place; dbg += dZ
            for (int64_t j = 0; j < Lv; j += W) {
              Vec delta(A(0));
              for (int64_t i = 0; i < L; ++i)
                delta = at::vec::fmadd(Vec::loadu(zp + i * Lv + j), Vec::loadu(dp + i * Lv + j), delta);
              for (int64_t i = 0; i < L; ++i) {
                A* zi = zp + i * Lv + j;
                const Vec dz = Vec::loadu(zi) * (Vec::loadu(dp + i * Lv + j) - delta);
                dz.store(zi);
                A* bi = part_dbg + i * Lv + j;
                (Vec::loadu(bi) + dz).store(bi);
              }
            }
          }
        }
        // dR = dZ Wg (nprob, LDv); dWg += dZ^T R
        tile_gemm<A>({.M = nprob, .N = g.LDv, .K = g.NZ, .A = z, .a_rs = g.Np, .a_cs = 1, .B = pk.wr.get(),
                      .ldb = g.pr, .panel_w = g.pr, .panel_stride = g.NZ * g.pr, .C = drb, .ldc = g.RB});
        tile_gemm<A>({.M = g.NZ, .N = g.LDv, .K = nprob, .A = z, .a_rs = 1, .a_cs = g.Np, .B = rb,
                      .ldb = g.RB, .C = part_dwg, .ldc = g.RB, .accumulate = true});
        // the compress backward for the block's tokens: dR token-major (nrows * L, SDv);
        // dx += dR Wc; dWc += dR^T x; dbc += sum of dR
        const int64_t ntok = nrows * L;
        for (int64_t q = 0; q < nrows; ++q)
          for (int64_t i = 0; i < L; ++i)
            for (int64_t s = 0; s < S; ++s)
              for (int64_t k = 0; k < d; ++k)
                drt[(q * L + i) * g.SDv + s * d + k] = drb[(q * S + s) * g.RB + i * d + k];
        tile_gemm<A>({.M = ntok, .N = XS, .K = g.SD, .A = drt, .a_rs = g.SDv, .a_cs = 1, .B = pk.wct.get(),
                      .ldb = g.px, .panel_w = g.px, .panel_stride = g.SDv * g.px, .C = dxblk, .ldc = XL,
                      .accumulate = true});
        for (int64_t q = 0; q < nrows; ++q) unpack_row<T, A>(g, dxblk + q * L * XL, a.dx, q0 + q);
        tile_gemm<A>({.M = g.SD, .N = XS, .K = ntok, .A = drt, .a_rs = 1, .a_cs = g.SDv, .B = xblk, .ldb = XL,
                      .C = part_dwc, .ldc = XL, .accumulate = true});
        for (int64_t m = 0; m < g.SDv; m += W) {
          Vec acc = Vec::loadu(part_dbc + m);
          for (int64_t t = 0; t < ntok; ++t) acc = acc + Vec::loadu(drt + t * g.SDv + m);
          acc.store(part_dbc + m);
        }
      }
    }
  });

  // partials summed in group order, element by element (any thread split gives the same bits)
  const A* parts = partials.get();
  auto sum_groups = [&](int64_t off) {
    A acc = parts[off];
    for (int64_t grp = 1; grp < ngroups; ++grp) acc += parts[grp * part + off];
    return acc;
  };
  parallel_tasks(g.L, [&](TaskQueue& tasks) {
    for (int64_t i; (i = tasks.next()) >= 0;) {
      for (int64_t j = 0; j < g.L; ++j) {
        const int64_t n = i * g.Lv + j;
        A* out = dwg + (i * g.L + j) * g.LD;
        for (int64_t m = 0; m < g.LD; m += W) {
          Vec acc = Vec::loadu(parts + n * g.RB + m);
          for (int64_t grp = 1; grp < ngroups; ++grp) acc = acc + Vec::loadu(parts + grp * part + n * g.RB + m);
          acc.store(out + m, min64(W, g.LD - m));
        }
        if (dbg != nullptr) dbg[i * g.L + j] = sum_groups(o_dbg + n);
      }
    }
  });
  for (int64_t m = 0; m < g.SD; ++m) {
    for (int64_t ch = 0; ch < g.C; ++ch) dwc[m * g.C + ch] = sum_groups(o_dwc + m * g.XL + (ch / g.CS) * g.CSv + ch % g.CS);
    if (dbc != nullptr) dbc[m] = sum_groups(o_dbc + m);
  }
}

}  // namespace

void dynamixer_fwd_kernel(const DynaMixerArgs& args) {
  switch (args.dtype) {
    case c10::ScalarType::Float: return fwd<float>(args);
    case c10::ScalarType::Double: return fwd<double>(args);
    case c10::ScalarType::Half: return fwd<c10::Half>(args);
    case c10::ScalarType::BFloat16: return fwd<c10::BFloat16>(args);
    default: return;  // the torch side admits these four only
  }
}

void dynamixer_bwd_kernel(const DynaMixerArgs& args) {
  switch (args.dtype) {
    case c10::ScalarType::Float: return bwd<float>(args);
    case c10::ScalarType::Double: return bwd<double>(args);
    case c10::ScalarType::Half: return bwd<c10::Half>(args);
    case c10::ScalarType::BFloat16: return bwd<c10::BFloat16>(args);
    default: return;
  }
}

}  // namespace vitattn::cpu::CPU_CAPABILITY
