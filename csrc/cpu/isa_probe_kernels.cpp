// A one-function kernel file: proves each instruction-set copy is built and chosen
// (vitattn._C.cpu_isa() reports the vector width the kernels really run with).
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace vitattn::cpu::CPU_CAPABILITY {

int64_t float_lanes() { return at::vec::Vectorized<float>::size(); }

}  // namespace vitattn::cpu::CPU_CAPABILITY
