// Probes of the instruction-set copy the kernels run with: its vector width
// (vitattn._C.cpu_isa()) and the fp32 FMA throughput one thread reaches with it
// (vitattn._C.cpu_fma_peak_gflops()), the compute limit the benchmarks divide by.
#include <ATen/cpu/vec/vec.h>

#include <chrono>
#include <cstdint>

namespace vitattn::cpu::CPU_CAPABILITY {

int64_t float_lanes() { return at::vec::Vectorized<float>::size(); }

// FLOP/s of dependent-free fused multiply-adds on the calling thread: kChains independent
// accumulators hide the FMA latency (4-5 cycles) behind two issue ports, so the loop runs at
// the core's fp32 FMA issue rate. The values shrink towards a fixed point, never overflow.
double fma_peak_gflops(double seconds) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int kChains = 12;
  constexpr int64_t kInner = 1 << 14;
  Vec acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = Vec(0.5f + 0.01f * i);
  const Vec mul(0.999f), add(1e-3f);
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  int64_t rounds = 0;
  double elapsed = 0.0;
  do {
    for (int64_t it = 0; it < kInner; ++it) {
#pragma GCC unroll 12
      for (int i = 0; i < kChains; ++i) acc[i] = at::vec::fmadd(acc[i], mul, add);
    }
    ++rounds;
    elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  } while (elapsed < seconds);
  // keep the chains live so the compiler cannot drop them
  Vec sum = acc[0];
  for (int i = 1; i < kChains; ++i) sum = sum + acc[i];
  float lanes[Vec::size()];
  sum.store(lanes);
  volatile float sink = lanes[0];
  (void)sink;
  const double flops = 2.0 * Vec::size() * kChains * static_cast<double>(kInner) * rounds;
  return flops / elapsed * 1e-9;
}

}  // namespace vitattn::cpu::CPU_CAPABILITY
