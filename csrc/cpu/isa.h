// Run-time choice of the CPU kernels' instruction set.
//
// Every csrc/cpu/*_kernels.cpp file is compiled three times by setup.py, once per
// instruction set, like PyTorch's own kernels: with CPU_CAPABILITY defined to DEFAULT,
// AVX2 (-mavx2 -mfma -mf16c) and AVX512 (-mavx512f/bw/vl/dq -mfma -mf16c, plus
// -mavx512bf16 when the compiler knows it). at::vec::Vectorized<T> then has the width of
// that instruction set, and everything the file defines must live in
//   namespace vitattn::cpu::CPU_CAPABILITY { ... }
// so the three copies do not collide. Callers (the torch-facing <op>.cpp files, compiled
// once) declare each entry point in the three namespaces with VITATTN_CPU_DECLARE and call
// the one matching cpu_isa() with VITATTN_CPU_DISPATCH. On machines other than x86-64 only
// the DEFAULT copy is built.
#pragma once

#include <cstdint>

namespace vitattn::cpu {

enum class Isa : int { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };

// The instruction set the kernels run with: PyTorch's own choice for this CPU
// (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY), capped at what this
// build of vitattn._C contains.
Isa cpu_isa();
const char* isa_name(Isa isa);
// Whether the AVX512 build may use the AVX512-BF16 instructions (vdpbf16ps) on this CPU.
bool cpu_has_avx512_bf16();

}  // namespace vitattn::cpu

#if defined(VITATTN_CPU_MULTI_ISA)
// VITATTN_CPU_DECLARE(void, fwd_f32, (const Args<float>&, int64_t, int64_t));
#define VITATTN_CPU_DECLARE(RET, NAME, ARGS)     \
  namespace vitattn::cpu::DEFAULT { RET NAME ARGS; } \
  namespace vitattn::cpu::AVX2 { RET NAME ARGS; }    \
  namespace vitattn::cpu::AVX512 { RET NAME ARGS; }
// return VITATTN_CPU_DISPATCH(fwd_f32, args, begin, end);
#define VITATTN_CPU_DISPATCH(NAME, ...)                                            \
  (::vitattn::cpu::cpu_isa() == ::vitattn::cpu::Isa::AVX512                        \
       ? ::vitattn::cpu::AVX512::NAME(__VA_ARGS__)                                  \
       : ::vitattn::cpu::cpu_isa() == ::vitattn::cpu::Isa::AVX2                     \
             ? ::vitattn::cpu::AVX2::NAME(__VA_ARGS__)                              \
             : ::vitattn::cpu::DEFAULT::NAME(__VA_ARGS__))
#else
#define VITATTN_CPU_DECLARE(RET, NAME, ARGS) \
  namespace vitattn::cpu::DEFAULT { RET NAME ARGS; }
#define VITATTN_CPU_DISPATCH(NAME, ...) (::vitattn::cpu::DEFAULT::NAME(__VA_ARGS__))
#endif
