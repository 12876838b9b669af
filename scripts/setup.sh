#!/usr/bin/env bash
# Installs what vitattn needs on a fresh machine, then vitattn itself (editable, with its
# compiled extension when a compiler is present). Safe to run again: it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# torch is pinned to the CPU build on machines without a GPU; an unpinned torch pulls several
# GB of CUDA wheels. On a CUDA machine, install your CUDA torch first: it is kept.
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q "torch==2.13.0"
fi
need=()
$PY -c "import triton" 2>/dev/null || need+=("triton==3.9.0")
# wheel: pyproject's build requirement, which --no-build-isolation does not install (a fresh
# machine's setuptools 65 has no bdist_wheel of its own and the editable install fails without it)
# matplotlib: the main job's plots (pyproject's "bench" extra)
for m in wheel numpy pytest hypothesis ninja pybind11 matplotlib; do
  $PY -c "import $m" 2>/dev/null || need+=("$m")
done
# ONNX export (tests/test_onnx.py, benchmarks/bench_onnx.py, pyproject's "onnx" extra), pinned to
# the tested versions; none of them pulls torch
$PY -c "import onnx" 2>/dev/null || need+=("onnx==1.23.2")
$PY -c "import onnxscript" 2>/dev/null || need+=("onnxscript==0.7.2")
$PY -c "import onnxruntime" 2>/dev/null || need+=("onnxruntime==1.32.0")
if [ ${#need[@]} -gt 0 ]; then
  $PY -m pip install -q "${need[@]}"
fi
# --no-build-isolation: build against the torch installed above, never a freshly pulled one
# (checked from another folder, so that only an installed vitattn is found)
here=$(pwd)
if ! (cd / && $PY -c "import os, sys, vitattn.kernels; sys.exit(0 if os.path.samefile(os.path.dirname(vitattn.__file__), '$here/vitattn') else 1)") 2>/dev/null
then
  $PY -m pip install -q --no-build-isolation --no-deps -e .
fi
