// AVX2 + FMA build of the MaSA CPU kernels, chosen at run time when the CPU has them
// (masa.cpp). Only this file is compiled for AVX2, so the extension still loads and
// runs (baseline kernels) on CPUs without it.
#include <cmath>
#include <cstdint>

#include "masa_kernels.h"

#if defined(VITATTN_CPU_HAVE_AVX2)
// Headers come first: the target switch must only apply to the kernels below.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#define VITATTN_NS avx2
#include "masa_kernels.inc"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
