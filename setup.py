"""Build script: packages vitattn with kernels/ shipped as vitattn.kernels, plus the
compiled extension vitattn._C (csrc/) built with torch.utils.cpp_extension and ninja.

- The C++ CPU kernels are always built; the CUDA kernels (csrc/cuda/*.cu) too when the
  installed torch has CUDA and nvcc is found.
- VITATTN_NO_EXT=1 skips the extension (the torch and Triton backends still work and
  ``python -m vitattn.info`` says why "cpu" / "cuda" are absent).
- VITATTN_CUDA_ARCHS picks the GPU architectures, ";"- or ","-separated, default
  "sm_80;sm_90" (sm_90a etc. accepted).

Build against the torch already installed: ``pip install --no-build-isolation -e .``.
"""

import glob
import os
import re
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env():
    """vitattn/_env.py, loaded by path: it parses every VITATTN_* variable, and vitattn itself
    (or torch) may not be importable yet."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_vitattn_env", os.path.join(ROOT, "vitattn", "_env.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cuda_arch_list(spec: str) -> str:
    """'sm_80;sm_90a' -> '8.0;9.0a' (the TORCH_CUDA_ARCH_LIST spelling torch expects)."""
    out = []
    for item in spec.replace(",", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        m = re.fullmatch(r"sm_(\d+)(\d)([a-z]?)", item)
        if m is None:
            raise SystemExit(f"VITATTN_CUDA_ARCHS: expected entries like sm_80 or sm_90a, got {item!r}")
        out.append(f"{m.group(1)}.{m.group(2)}{m.group(3)}")
    if not out:
        raise SystemExit("VITATTN_CUDA_ARCHS is empty")
    return ";".join(out)


def _extensions():
    """([Extension], cmdclass) for vitattn._C, or ([], {}) when it is not to be built."""
    env = _env()
    if env.flag("VITATTN_NO_EXT"):
        print("vitattn: VITATTN_NO_EXT is set, not building vitattn._C", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError as exc:  # e.g. an isolated build environment without torch
        print(f"vitattn: torch is not importable ({exc}); not building vitattn._C. "
              "Install with `pip install --no-build-isolation -e .`", file=sys.stderr)
        return [], {}

    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)
    # csrc/cpu/*_kernels.cpp are compiled once per instruction set (MultiIsaBuildExtension);
    # the other sources once
    sources = [s for s in rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
               if not s.endswith("_kernels.cpp")] + ["csrc/bindings.cpp"]
    cxx = ["-O3", "-g0", "-std=c++20", "-Wno-psabi"]
    if _multi_isa():
        cxx.append("-DVITATTN_CPU_MULTI_ISA")
    ldflags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is OpenMP code inlined from the headers: without -fopenmp it runs
        # serially. The libgomp.so.1 that torch already loaded serves it (same soname).
        cxx.append("-fopenmp")
        ldflags.append("-fopenmp")
    nvcc = None
    if torch.version.cuda is not None and ce.CUDA_HOME is not None:
        cand = os.path.join(ce.CUDA_HOME, "bin", "nvcc")
        nvcc = cand if os.path.exists(cand) else None
    if nvcc is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = _cuda_arch_list(env.text("VITATTN_CUDA_ARCHS"))
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
        ext = ce.CUDAExtension(
            "vitattn._C", sources,
            define_macros=[("VITATTN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
            extra_link_args=ldflags,
        )
    else:
        why = "torch has no CUDA" if torch.version.cuda is None else "nvcc was not found (CUDA_HOME)"
        print(f"vitattn: building vitattn._C with the CPU kernels only ({why})", file=sys.stderr)
        ext = ce.CppExtension("vitattn._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=ldflags)
    return [ext], {"build_ext": _multi_isa_build_ext(ce.BuildExtension).with_options(use_ninja=True)}


def _multi_isa() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64") and sys.platform != "win32"


# CPU_CAPABILITY spelled as PyTorch spells it, with the flags PyTorch uses for that build
_ISA_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    # not -mavx512bf16: AVX-512 CPUs without it exist; a kernel that uses vdpbf16ps marks
    # that function with __attribute__((target("avx512bf16"))) and checks
    # cpu_has_avx512_bf16() (csrc/cpu/isa.h) before calling it
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def _multi_isa_build_ext(base):
    """base (torch's BuildExtension) that compiles every csrc/cpu/*_kernels.cpp once per
    instruction set (see csrc/cpu/isa.h) into its own build folder and links all copies."""

    class MultiIsaBuildExtension(base):
        def build_extension(self, ext):
            kernels = sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*_kernels.cpp")))
            kernels = [os.path.relpath(k, ROOT) for k in kernels]
            isas = list(_ISA_FLAGS) if _multi_isa() else ["DEFAULT"]
            cxx = list(ext.extra_compile_args["cxx"]) if isinstance(ext.extra_compile_args, dict) \
                else list(ext.extra_compile_args)
            objects = []
            for isa in isas:
                flags = cxx + _ISA_FLAGS[isa] + [f"-DCPU_CAPABILITY={isa}", f"-DCPU_CAPABILITY_{isa}"]
                post = {"cxx": flags, "nvcc": []} if isinstance(ext.extra_compile_args, dict) else flags
                objects += self.compiler.compile(
                    kernels, output_dir=os.path.join(self.build_temp, isa.lower()),
                    macros=ext.define_macros, include_dirs=ext.include_dirs, debug=self.debug,
                    extra_postargs=post, depends=ext.depends)
            ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extension(ext)

    return MultiIsaBuildExtension


ext_modules, cmdclass = _extensions()

setup(
    # kernels/ and benchmarks/ live at the top of the repository and ship inside the package,
    # so that `python -m vitattn.bench` works from an installed (non-editable) vitattn too
    packages=find_packages(include=["vitattn", "vitattn.*"]) + ["vitattn.kernels", "vitattn.benchmarks"],
    package_dir={"vitattn.kernels": "kernels", "vitattn.benchmarks": "benchmarks"},
    # the measurements "auto" ranks the backends by (vitattn/_dispatch.py)
    package_data={f"vitattn.ops.{op}": ["measured.json"] for op in ("masa", "sinkhorn", "group_attention", "dynamixer",
                                                                   "depthwise_conv")},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
