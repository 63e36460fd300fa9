#!/usr/bin/env bash
# Build the CPU extension with AddressSanitizer + UndefinedBehaviorSanitizer into a throw-away venv
# and run the op tests under them. Any report fails the run. Usage: bash tests/sanitize.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv --system-site-packages "$work/venv"
. "$work/venv/bin/activate"
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q pytest hypothesis expecttest numpy ninja cmake scikit-build-core pybind11
flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1"
MASKATTN_CUDA=OFF pip install -q --no-build-isolation --no-deps --force-reinstall \
  --config-settings=build-dir=build/sanitize \
  --config-settings=cmake.define.CMAKE_CXX_FLAGS="$flags" \
  --config-settings=cmake.define.CMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" .
# Python itself is not instrumented: preload the runtimes; leaks of the interpreter are not ours.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
cd "$work"
python -m pytest -q -x -p no:cacheprovider "$OLDPWD/tests" -k "not distributed and not ecosystem" "$@"
echo "sanitize: no reports"
