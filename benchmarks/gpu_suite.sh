#!/usr/bin/env bash
# One call on a GPU machine: build from source, run the CUDA tests, run the benchmarks, and print a
# short table last. Usage (repo root): bash benchmarks/gpu_suite.sh [--quick]
# Results land in $OUT (when set, as on the device tool) or benchmarks/out/.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
quick=${1:-}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"

echo "== build"
t0=$(date +%s)
MASKATTN_CUDA=ON MASKATTN_CUDA_ARCHS=${MASKATTN_CUDA_ARCHS:-90} CMAKE_BUILD_PARALLEL_LEVEL=16 \
  pip install --no-build-isolation --no-deps -q . > "$out/build.log" 2>&1 || { tail -60 "$out/build.log"; exit 1; }
echo "built in $(( $(date +%s) - t0 )) s"
python -c "import maskattn; print(maskattn.build_info()); assert maskattn.cuda_available()"

echo "== tests (CUDA included)"
python -m pytest -q -x tests -p no:cacheprovider 2>&1 | tee "$out/tests.log" | tail -15
test_rc=${PIPESTATUS[0]}

# SANITIZE=1: compute-sanitizer memcheck and racecheck over the CUDA tests (the tests whose id has
# "cuda": test_cuda_* and the device-parametrised [cuda] cases; torch.compile ones are left out, as
# Triton compilation under the sanitizer takes far too long and checks Triton, not our kernels).
#  - PYTORCH_NO_CUDA_MEMORY_CACHING=1: every tensor gets its own cudaMalloc, so an access past the
#    end of a tensor is out of bounds for memcheck instead of landing in the caching allocator's pool.
#  - --target-processes all: also check any child process (the default checks the root process only).
#  - --error-exitcode 9: exit code 9 when the tool reports anything, whatever pytest returns, so a
#    sanitizer report (rc 9) is told apart from a failing test (rc 1); the ERROR SUMMARY line is kept.
san_rows=()
if [ "${SANITIZE:-0}" = "1" ]; then
  if command -v compute-sanitizer >/dev/null; then
    echo "== compute-sanitizer memcheck / racecheck over the CUDA tests"
    for tool in memcheck racecheck; do
      t0=$(date +%s)
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $tool --target-processes all --error-exitcode 9 \
        python -m pytest -q -x tests -p no:cacheprovider -k "cuda and not compile" \
        > "$out/sanitize_$tool.log" 2>&1
      rc=$?
      summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$out/sanitize_$tool.log" | tail -1)
      passed=$(grep -E "[0-9]+ (passed|failed)" "$out/sanitize_$tool.log" | tail -1)
      row="$tool: rc=$rc (0 clean, 9 sanitizer report, else test failure) | ${summary:-no summary line} | ${passed:-no pytest summary} | $(( $(date +%s) - t0 )) s"
      echo "$row"; san_rows+=("$row")
      tail -3 "$out/sanitize_$tool.log"
    done
  else
    san_rows+=("compute-sanitizer: not found on PATH, sanitizer runs skipped")
  fi
fi

echo "== benchmarks (progress in $out/bench_progress.log, full report in $out/bench.log)"
args=(--device cuda --json "$out/bench.json" --markdown "$out/bench.md")
[ "$quick" = "--quick" ] && args+=(--quick)
python -c "import matplotlib" 2>/dev/null && args+=(--plot "$out/bench_speedup.png")
python -m maskattn.bench "${args[@]}" > "$out/bench.log" 2> "$out/bench_progress.log"
bench_rc=$?
[ "$bench_rc" -ne 0 ] && tail -30 "$out/bench_progress.log"
# The short table: the report's closing block (the summary, one verdict per layer replaced).
sed -n '/^Summary: /,$p' "$out/bench.log"
echo "bench rc=$bench_rc"
echo "tests rc=$test_rc"
for row in ${san_rows[@]+"${san_rows[@]}"}; do echo "sanitize $row"; done
