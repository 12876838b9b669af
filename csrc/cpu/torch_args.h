// Helpers of the torch-facing csrc/cpu/<op>.cpp files (compiled once, not per instruction set):
// the accumulation dtype and the argument check they share. Errors name the op and the
// argument; a wrong dtype is a TypeError in Python, anything else a ValueError.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace vitattn {

// the dtype the kernels accumulate in and return statistics / weight gradients in
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// t: a defined CPU tensor of ndim dims and the dtype of the op's main input x
inline void check_tensor(const char* fn, const char* name, const at::Tensor& t, int64_t ndim, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.defined(), fn, ": ", name, " is undefined");
  TORCH_CHECK_VALUE(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.dim() == ndim, fn, ": ", name, " must have ", ndim, " dims, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, fn, ": ", name, " must have dtype ", dtype, " (that of x), got ",
                   t.scalar_type());
}

}  // namespace vitattn
