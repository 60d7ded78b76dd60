#!/usr/bin/env bash
# The whole GPU story in one command, for a machine with a CUDA GPU and torch already installed:
# build the extension with CUDA, run every CUDA-marked test and the Triton tests on the GPU, the
# GPU benchmarks, then the whole suite; write one report plus the full logs beside it. Work that
# needs no GPU (compiling the benchmark's kernels ahead, the sm_90 code check) runs in the
# background meanwhile, on the machine's other cores.
#   Usage: bash benchmarks/gpu_suite.sh [OUT_DIR] [--quick]
# (default OUT_DIR benchmarks/results/gpu_suite_<date>; --quick: the short benchmark matrix).
# pip runs as `python -m pip`: a bare `pip` can belong to another interpreter (it did on the H100).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --quick ]; then set -- "" --quick; fi  # --quick alone: the default OUT_DIR
out=${1:-benchmarks/results/gpu_suite_$(date +%Y%m%d_%H%M)}
quick=${2:-}
mkdir -p "$out"
report="$out/report.md"
export PYTHONUNBUFFERED=1

section() {  # section TITLE LOGNAME CMD...: run CMD, keep its whole log, show its tail
  # (TAIL lines, default 40)
  local title=$1 name=$2 start=$SECONDS; shift 2
  echo; echo "## $title"; echo '```'
  "$@" >"$out/$name.log" 2>&1
  echo "exit code: $? ($((SECONDS - start)) s)"  # the seconds: what the next lease can budget
  # a crash (segfault) prints the test it died in under "Fatal Python error": show that first
  grep -A 25 "Fatal Python error" "$out/$name.log" | head -n 40
  tail -n "${TAIL:-40}" "$out/$name.log"
  echo '```'
}

waited_section() {  # waited_section TITLE LOGNAME PID: a background job's section, when done
  local title=$1 name=$2 pid=$3
  echo; echo "## $title"; echo '```'
  wait "$pid"
  echo "exit code: $? (done $SECONDS s into the suite)"
  tail -n "${TAIL:-40}" "$out/$name.log"
  echo '```'
}

{
  echo "# GPU suite report"
  echo
  echo "- date: $(date -Iseconds)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo none)"
  echo "- torch: $(python -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)' 2>&1)"
  echo "- triton: $(python -c 'import triton; print(triton.__version__)' 2>&1)"
  section "Build" build env FORCE_CUDA=1 python -m pip install -e . --no-build-isolation --no-deps
  python -c 'import sparsekern; e = sparsekern.ops.native_extension(); print("cuda_compiled:", e.cuda_compiled, "cpu_isa:", e.cpu_isa())' 2>&1
  # CPU-only work in the background while the GPU runs the tests: the benchmark's kernels
  # compiled ahead by parallel workers (its autotuner then loads them from Triton's cache), and
  # the kernels' code as this machine's triton compiles it (tile loads, registers; no timing)
  python benchmarks/triton_warm_cache.py $quick >"$out/warm_cache.log" 2>&1 &
  warm_pid=$!
  # (the code check in a cache of its own: the count of kernels the benchmark compiles below)
  codegen_cache=$(mktemp -d)
  TRITON_CACHE_DIR=$codegen_cache python benchmarks/triton_codegen.py --check \
    >"$out/triton_codegen.log" 2>&1 &
  codegen_pid=$!
  section "CUDA-marked tests" cuda_tests python -m pytest -q -rfE -m cuda tests
  section "Triton tests on the GPU" triton_tests python -m pytest -q -rfE tests/triton
  # the Triton benchmark first: on a short lease it is the number that matters most; the naive
  # CUDA C++ placeholder's benchmark (seconds per call at 50%) only without --quick
  TAIL=12 waited_section "Kernels compiled ahead (triton_warm_cache.py)" warm_cache "$warm_pid"
  cache=$(python -c 'import triton; print(triton.knobs.cache.dir)' 2>/dev/null ||
          echo "${TRITON_CACHE_DIR:-$HOME/.triton/cache}")
  cubins() { find "$cache" -name '*.cubin' 2>/dev/null | wc -l; }
  warmed=$(cubins)
  for name in bench_triton_gpu bench_linear_gpu; do
    args=(--json "$out/$name.json")
    if [ "$quick" = --quick ]; then
      [ "$name" = bench_linear_gpu ] && continue
      args+=(--quick)
    fi
    TAIL=300 section "$name" "$name" python "benchmarks/$name.py" "${args[@]}"
  done
  # a kernel the warm-up missed (another specialization than the GPU run's) is compiled here
  echo "kernels in Triton's cache: $warmed after the warm-up, $(cubins) after the benchmarks"
  waited_section "Triton code check (sm_90)" triton_codegen "$codegen_pid"
  rm -rf "$codegen_cache"
  # last, bounded: it has crashed on a GPU machine before, and it needs no GPU (SUITE_TIMEOUT
  # seconds, default 300; 150 with --quick, whose lease is short)
  if [ "$quick" = --quick ]; then suite_timeout=${SUITE_TIMEOUT:-150}; else
    suite_timeout=${SUITE_TIMEOUT:-300}; fi
  section "Whole test suite" all_tests timeout "$suite_timeout" python -X faulthandler \
    -m pytest -q -rfE tests
} | tee "$report"
echo "report: $report"
