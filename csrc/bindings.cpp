// Python bindings of vitattn._C (pybind11). The MaSA CPU kernels are always built; the
// CUDA ones when setup.py found a CUDA torch and nvcc (it then defines VITATTN_WITH_CUDA).
#include <torch/extension.h>

#include "cpu/isa.h"
#if defined(VITATTN_WITH_CUDA)
#include "cuda/masa_torch.h"
#endif

namespace py = pybind11;

VITATTN_CPU_DECLARE(int64_t, float_lanes, ())
VITATTN_CPU_DECLARE(double, fma_peak_gflops, (double))

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vitattn compiled kernels (C++ CPU and CUDA)";
  // the kernels never touch Python objects: let other threads run meanwhile
  [[maybe_unused]] const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def(
      "cpu_isa",
      [] {
        const auto isa = vitattn::cpu::cpu_isa();
        return std::string(vitattn::cpu::isa_name(isa)) + " (" +
               std::to_string(VITATTN_CPU_DISPATCH(float_lanes)) + " fp32 lanes" +
               (vitattn::cpu::cpu_has_avx512_bf16() ? ", avx512-bf16" : "") + ")";
      },
      "instruction set the CPU kernels run with on this machine (csrc/cpu/isa.h)");
  m.def(
      "cpu_fma_peak_gflops",
      [](double seconds) {
        if (!(seconds > 0.0 && seconds <= 10.0)) {
          throw std::invalid_argument("cpu_fma_peak_gflops: seconds must be in (0, 10], got " +
                                      std::to_string(seconds));
        }
        return VITATTN_CPU_DISPATCH(fma_peak_gflops, seconds);
      },
      "fp32 GFLOP/s of independent fused multiply-adds on the calling thread, with the instruction "
      "set of cpu_isa(): one core's compute limit as the kernels can reach it",
      py::arg("seconds") = 0.2, nogil);
#if defined(VITATTN_WITH_CUDA)
  m.attr("with_cuda") = true;
  m.def("masa_cuda_fwd", &vitattn::masa_cuda_fwd, "MaSA grid-attention pass, forward (CUDA)", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("log_gamma"), py::arg("scale"), py::arg("axis"), nogil);
  m.def("masa_cuda_bwd", &vitattn::masa_cuda_bwd, "MaSA grid-attention pass, backward (CUDA)", py::arg("dout"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("log_gamma"),
        py::arg("scale"), py::arg("axis"), nogil);
  m.def("masa_cuda_kernel_family", &vitattn::masa_cuda_kernel_family,
        "\"onchip\" or \"flash\": the CUDA kernels a pass over N tokens uses on the current device", py::arg("N"),
        py::arg("d"), py::arg("dv"), py::arg("backward"));
#else
  m.attr("with_cuda") = false;
#endif
}
