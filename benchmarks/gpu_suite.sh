#!/usr/bin/env bash
# The whole GPU story in one command, for a machine with a CUDA GPU and torch already installed:
# build the extension with CUDA, run every CUDA-marked test, run the GPU benchmarks, and write
# one report (benchmarks/results/gpu_suite_<date>.md). Usage: bash benchmarks/gpu_suite.sh [OUT]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu_suite_$(date +%Y%m%d_%H%M).md}
mkdir -p "$(dirname "$out")"
log=$(mktemp)
{
  echo "# GPU suite report"
  echo
  echo "- date: $(date -Iseconds)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo none)"
  echo "- torch: $(python -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)' 2>&1)"
  echo
  echo "## Build"
  echo '```'
  FORCE_CUDA=1 pip install -e . --no-build-isolation --no-deps >"$log" 2>&1
  echo "pip install exit code: $?"; tail -n 5 "$log"
  python -c 'import sparsekern; e = sparsekern.ops.native_extension(); print("cuda_compiled:", e.cuda_compiled, "cpu_isa:", e.cpu_isa())' 2>&1
  echo '```'
  echo
  echo "## CUDA tests (pytest -m cuda)"
  echo '```'
  python -m pytest -q -m cuda tests 2>&1 | tail -n 30
  echo '```'
  echo
  echo "## Whole test suite on the GPU machine"
  echo '```'
  python -m pytest -q -x tests 2>&1 | tail -n 15
  echo '```'
  for bench in benchmarks/bench_*_gpu.py; do
    [ -e "$bench" ] || continue
    echo
    echo "## $(basename "$bench")"
    echo '```'
    python "$bench" 2>&1 | tail -n 60
    echo '```'
  done
} | tee "$out"
rm -f "$log"
echo "report: $out"
