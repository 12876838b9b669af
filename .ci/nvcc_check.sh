#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with nvcc for sm_80 and sm_90a (no GPU needed), failing on
# any error or warning, and print each kernel's registers, spills and shared memory
# (-Xptxas -v). The .cu files include no torch headers, so this runs on CPU-only machines.
#   .ci/nvcc_check.sh            (NVCC=/path/to/nvcc to pick the compiler)
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || true)}
if [[ -z "$NVCC" ]]; then
  echo "nvcc_check: nvcc not found (set NVCC or PATH)" >&2
  exit 1
fi
"$NVCC" --version | tail -n 2
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
shopt -s nullglob
files=(csrc/cuda/*.cu)
if (( ${#files[@]} == 0 )); then
  echo "nvcc_check: no csrc/cuda/*.cu files" >&2
  exit 1
fi
for arch in sm_80 sm_90a; do
  for f in "${files[@]}"; do
    log="$out/$(basename "$f").$arch.log"
    echo "== $f ($arch)"
    if ! "$NVCC" -std=c++17 -O3 -lineinfo -arch="$arch" -Xptxas -v -Werror all-warnings \
        -Icsrc -c "$f" -o "$out/$(basename "$f").$arch.o" > "$log" 2>&1; then
      cat "$log"
      echo "nvcc_check: FAILED compiling $f for $arch" >&2
      status=1
      continue
    fi
    # ptxas -v: one "Compiling entry function" line, then "Used N registers, ..." per kernel
    awk '/Compiling entry function/ { match($0, /_Z[A-Za-z0-9_]+/); name = substr($0, RSTART, RLENGTH) }
         /bytes spill stores/ { spill = $0 }
         /Used [0-9]+ registers/ { print "  " name; print "    " spill; print "    " $0 }' "$log" \
      | sed 's/ptxas info *: *//' | { if command -v c++filt > /dev/null; then c++filt; else cat; fi }
    if grep -Eq '[1-9][0-9]* bytes spill (stores|loads)' "$log"; then
      echo "  note: some kernels spill registers (see above)"
    fi
  done
done
if (( status == 0 )); then echo "nvcc_check: OK"; fi
exit $status
