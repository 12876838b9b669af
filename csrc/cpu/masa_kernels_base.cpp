// Baseline build of the MaSA CPU kernels (the compiler's default instruction set).
#include <cmath>
#include <cstdint>

#include "masa_kernels.h"

#define VITATTN_NS base
#include "masa_kernels.inc"
