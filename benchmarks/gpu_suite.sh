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

if [ "${SANITIZE:-0}" = "1" ] && command -v compute-sanitizer >/dev/null; then
  echo "== compute-sanitizer memcheck / racecheck over the CUDA tests"
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 9 python -m pytest -q -x tests -k cuda -p no:cacheprovider \
      > "$out/sanitize_$tool.log" 2>&1; echo "$tool rc=$?"; tail -3 "$out/sanitize_$tool.log"
  done
fi

echo "== benchmarks"
args=(--device cuda)
[ "$quick" = "--quick" ] && args+=(--quick --min-time 0.05)
python -m maskattn.bench "${args[@]}" 2>&1 | tee "$out/bench.log" | tail -80
echo "tests rc=$test_rc"
