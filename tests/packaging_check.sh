#!/usr/bin/env bash
# Packaging check: what a user installing from an sdist gets; not part of the default pytest run, it takes minutes.
#   1. python -m build --no-isolation: an sdist and a wheel, with the python that runs this script
#      (it needs torch, build, scikit-build-core, pybind11, ninja, cmake; PYTHON=... to pick one);
#   2. the sdist holds what a build needs (csrc, CMakeLists.txt, python/, LICENSE, README, CHANGELOG,
#      pyproject) and nothing huge or built (no build/, no .so, under 2 MB); the wheel holds the
#      compiled extension and the package;
#   3. a FRESH venv gets torch==2.13.0 and the build tools, the sdist is installed into it with
#      --no-build-isolation, and the test suite runs against it from a directory outside the source
#      tree (so `import maskattn` can only find the installed copy).
# Usage: bash tests/packaging_check.sh        (KEEP=1 keeps the work directory)
#   SDIST_ONLY=1 skips the wheel build (one compile instead of two: what CI runs);
#   TESTS="tests/test_docs.py ..." runs those tests instead of the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
PY=${PYTHON:-python3}
work=$(mktemp -d /tmp/maskattn-pkg.XXXXXX)
if [ "${KEEP:-0}" != 1 ]; then trap 'rm -rf "$work"' EXIT; fi
start=$(date +%s)
lap() { echo "   ($(( $(date +%s) - start )) s)"; }

build_args=(--no-isolation)
[ "${SDIST_ONLY:-0}" = 1 ] && build_args+=(--sdist)
echo "== 1. python -m build ${build_args[*]}"
# Run from the work dir: in the source root, python -m build would import the build/ folder.
(cd "$work" && CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-1} "$PY" -m build "${build_args[@]}" --outdir "$work/dist" "$root") > "$work/build.log" 2>&1 \
  || { tail -60 "$work/build.log"; echo "packaging: build failed"; exit 1; }
sdist=$(ls "$work"/dist/maskattn-*.tar.gz)
wheel=$(ls "$work"/dist/maskattn-*.whl 2>/dev/null || true)
echo "   $(basename "$sdist") $(du -k "$sdist" | cut -f1) KiB${wheel:+, $(basename "$wheel") $(du -k "$wheel" | cut -f1) KiB}"
lap

echo "== 2. contents"
"$PY" - "$sdist" ${wheel:+"$wheel"} <<'PY'
import re, sys, tarfile, zipfile, os
sdist, wheel = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
with tarfile.open(sdist) as t:
    members = t.getmembers()
names = [m.name.split("/", 1)[1] for m in members if "/" in m.name]
need = ["CMakeLists.txt", "pyproject.toml", "LICENSE", "README.md", "CHANGELOG.md", "python/maskattn/__init__.py",
        "python/maskattn/_build_info.py.in", "csrc/module.cpp", "csrc/common/stable.h"]
missing = [n for n in need if n not in names]
for sub in ("csrc/cpu/", "csrc/cuda/", "python/maskattn/_ops/", "python/maskattn/nn/"):
    if not any(n.startswith(sub) for n in names):
        missing.append(sub)
bad = [n for n in names if n.startswith(("build/", "dist/", ".ci/")) or "__pycache__" in n
       or n.endswith((".so", ".o", ".pyc", ".whl", ".png"))]
big = [(m.name, m.size) for m in members if m.size > 1_000_000]
size = os.path.getsize(sdist)
print(f"   sdist: {len(names)} files, {size / 1024:.0f} KiB")
assert not missing, f"sdist lacks {missing}"
assert not bad, f"sdist holds build outputs / junk: {bad[:10]}"
assert not big and size < 2_000_000, f"sdist too big: {size} bytes, large members {big}"
if wheel is None:
    sys.exit(0)
with zipfile.ZipFile(wheel) as z:
    wn = z.namelist()
assert any(re.match(r"maskattn/_C\..*\.so$", n) for n in wn), "wheel lacks the compiled maskattn/_C extension"
assert "maskattn/nn/__init__.py" in wn and "maskattn/_build_info.py" in wn, "wheel lacks package files"
assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in wn), "wheel lacks LICENSE"
print(f"   wheel: {len(wn)} files, extension and LICENSE present")
PY
lap

echo "== 3. fresh venv, torch==2.13.0, install the sdist, run the tests from outside the source tree"
python3 -m venv "$work/fresh"
"$work/fresh/bin/pip" install -q torch==2.13.0 ninja cmake scikit-build-core pybind11 numpy pytest hypothesis expecttest \
  > "$work/pip.log" 2>&1 || { tail -30 "$work/pip.log"; echo "packaging: installing torch into the fresh venv failed"; exit 1; }
lap
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-1} "$work/fresh/bin/pip" install -q --no-build-isolation "$sdist" \
  > "$work/install.log" 2>&1 || { tail -60 "$work/install.log"; echo "packaging: installing the sdist failed"; exit 1; }
lap
mkdir "$work/run"
cp -r "$root/tests" "$root/docs" "$root/pyproject.toml" "$work/run/"  # docs: tests/test_docs.py runs their code
cd "$work/run"
"$work/fresh/bin/python" - "$root/pyproject.toml" <<'PY'
import sys, tomllib, maskattn
want = tomllib.load(open(sys.argv[1], "rb"))["project"]["version"]
assert maskattn.__version__ == want, (maskattn.__version__, want)
assert "site-packages" in maskattn.__file__, maskattn.__file__
print(f"   maskattn {maskattn.__version__} from {maskattn.__file__}; build_info {maskattn.build_info()}")
PY
"$work/fresh/bin/python" -m pytest -q -p no:cacheprovider ${TESTS:-tests} ${PYTEST_ARGS:-}
lap
echo "packaging: all good in $(( $(date +%s) - start )) s"
