"""The docs are true and stand alone.

* Their code runs: every ```python block of docs/migration.md and docs/api.md, in order, as one
  script against the installed package (the blocks build on each other, as a reader would paste
  them), and the package version agrees with pyproject.toml.
* Every repository path they cite exists, and no tracked file points outside the repository.
* The layers maskattn replaces are named after their model or paper everywhere (ABMIL, CLAM, JiT,
  ...), never by an internal nickname: "seed" only ever means a random seed.
* README opens with the install-and-benchmark and install-and-test commands, and the test command
  is the one CI runs; install instructions work from a clone (maskattn is on no package index) and
  name only extras that pyproject.toml defines.
* docs/design.md covers every op registered in csrc/.
"""

import pathlib
import re
import subprocess

import pytest
import torch

import maskattn

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(name):
    path = ROOT / "docs" / name
    if not path.exists():  # e.g. tests copied without the docs
        pytest.skip(f"{path} not found")
    return BLOCK.findall(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", ["migration.md", "api.md"])
def test_python_blocks_of_the_docs_run(name):
    blocks = python_blocks(name)
    if name == "migration.md":
        assert len(blocks) >= 10, "every layer replaced has a before and an after block"
    ns = {"__name__": f"docs_{name.replace('.', '_')}"}
    torch.manual_seed(0)
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"docs/{name}:block{i}", "exec"), ns)
        except Exception as e:  # name the block that failed
            raise AssertionError(f"docs/{name} python block {i} failed: {type(e).__name__}: {e}\n{code}") from e


def test_version_agrees_with_pyproject():
    py = ROOT / "pyproject.toml"
    if not py.exists():
        pytest.skip("pyproject.toml not found")
    m = re.search(r'^version\s*=\s*"([^"]+)"', py.read_text(), re.M)
    assert m, "no version in pyproject.toml"
    assert maskattn.__version__ == m.group(1)
    from importlib.metadata import version

    assert version("maskattn") == maskattn.__version__


# ---------------------------------------------------------------- the files of the repository

# What a build, a test run or a benchmark may leave in a checkout that has no git metadata (an
# unpacked sdist): never part of the sources.
_UNTRACKED_DIRS = {".git", "build", "dist", "__pycache__", ".hypothesis", ".pytest_cache", ".ruff_cache", "out"}


def repo_files():
    """The repository's text files: git's tracked files, or every source file of an unpacked sdist."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60)
        paths = [ROOT / p for p in out.stdout.decode().split("\0") if p]
    except (OSError, subprocess.SubprocessError):
        paths = [p for p in ROOT.rglob("*") if p.is_file() and not (_UNTRACKED_DIRS & set(p.relative_to(ROOT).parts))]
    files = {}
    for p in paths:
        try:
            data = p.read_bytes()
        except OSError:  # listed by git but deleted in the work tree
            continue
        if b"\0" in data:
            continue  # binary
        try:
            files[p.relative_to(ROOT).as_posix()] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    if len(files) < 20:
        pytest.skip(f"{ROOT} does not look like a maskattn checkout")
    return files


@pytest.fixture(scope="module")
def files():
    return repo_files()


def _hits(files, pattern):
    out = []
    for name, text in sorted(files.items()):
        for i, line in enumerate(text.splitlines(), 1):
            if pattern.search(line):
                out.append(f"{name}:{i}: {line.strip()}")
    return out


# Spelled in pieces so that this file does not match its own patterns.
_SHARED = "shared" + "/"
_OUTSIDE = re.compile("|".join(re.escape(s) for s in (_SHARED, "/" + "work/", "/" + "home/")))


def test_no_path_outside_the_repository(files):
    hits = _hits(files, _OUTSIDE)
    assert not hits, "paths outside the repository (say it in the repo's own words):\n" + "\n".join(hits)


_W = "se" + "ed"
# The word used as the name of a layer maskattn replaces (the examples below spell it @@). Random
# seeds (manual_seed, keyword arguments, a fixed one, "@@ + epoch") stay legal; what is caught: a
# numbered note or the notes' folder, a possessive, the word as the subject of a sentence, benchmark
# labels (@@ eager / compiled / layer) and identifiers built on it (matches_@@_..., @@_loss).
_LAYER_NICKNAME = re.compile(
    "|".join(
        [
            rf"\b{_W}s?[ _-]?0\d\d\b",
            rf"\b{_W}s/",
            rf"\b{_W}'s\b",
            rf"\b{_W}s'",
            rf"\b(?:the|a|each|every|five|this|that|these|our) {_W}s?\b(?!\s*(?:=|\+|value|argument|of\b|for\b|to\b|is\b|must\b))",
            rf"\b{_W}[ _](?:layers?|eager|compiled|checkpoints?|models?|modules?|aggregator|recipe|attention|loss|like|purifier|math|bug|mode|shape|call[ _]pattern)\b",
            rf"(?:matches|against|parity_with|vs|than)_{_W}",
        ]
    ),
    re.I,
)


def test_layer_nickname_pattern_tells_a_random_seed_from_a_layer():
    nick = [
        "the @@'s attention_conv weights",
        "@@ 004: attention_conv",
        "@@s 001/002: masked_fill",
        "notes in @@s/",
        "| @@ eager | 3.2 |",
        "parity with the @@ layer",
        "def test_matches_@@_where_@@_is_defined():",
        "def @@_loss(pred, clean, mask):",
        "check_against_@@(q, k, v)",
        "The @@ divides a sum over C x pixels",
        "a @@ checkpoint loads",
    ]
    legal = [
        "torch.manual_@@(0)",
        "g = torch.Generator().manual_@@(@@)",
        "def make(B, N, D, @@=0):",
        "sampler = BagBatchSampler(sizes, 100, @@=0)",
        "order from ``@@ + epoch``",
        "@@: the base of the per-epoch generator; every rank must use the same.",
        "Fixed @@ and bounded examples keep CI fast",
        "HYPOTHESIS_PROFILE=long: random @@",
        "assert e0 != list(c)  # another @@",
        "st_@@ = st.integers(0, 2**16)",
        "B, N, D, K, dtype, @@, device = case",
        "the @@ of the generator",
        "raise ValueError(f'BagBatchSampler: @@ must be an int, got {@@!r}')",
    ]
    for line in nick:
        assert _LAYER_NICKNAME.search(line.replace("@@", _W)), line
    for line in legal:
        assert not _LAYER_NICKNAME.search(line.replace("@@", _W)), line


def test_layers_are_named_after_their_model_or_paper(files):
    hits = _hits(files, _LAYER_NICKNAME)
    assert not hits, (
        "name the layer or paper (ABMIL / CLAM attention pooling, JiT's attention, the Transformer "
        "key-padding mask, ...) instead:\n" + "\n".join(hits)
    )


# ---------------------------------------------------------------- paths the docs cite

_TOP = ("csrc", "python", "tests", "docs", "benchmarks", "examples", ".ci", "cmake")
# A path-like token starting at a top-level folder of the repository and not inside a longer path
# (torch/csrc/... is torch's, not ours). Placeholders (<op>, *, {a,b}) are kept in the token so
# that they can be recognised and skipped.
_PATH = re.compile(r"(?<![\w./~-])((?:" + "|".join(re.escape(t) for t in _TOP) + r")/[\w./<>*{},-]*)")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_PLACEHOLDER = re.compile(r"[<>*{}]")


def doc_files():
    docs = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
    docs = [d for d in docs if d.exists()]
    if not docs:
        pytest.skip("no docs in this copy")
    return docs


def cited_paths(text: str, base: pathlib.Path):
    """(path as written, resolved path) of every repository path a Markdown text cites: link
    targets (relative to ``base``, the file's folder) and path-like tokens (relative to the
    repository root)."""
    out = []
    for target in _LINK.findall(text):
        target = target.split("#", 1)[0]
        if not target or re.match(r"^[a-z]+:", target):  # an anchor on the same page, a URL
            continue
        out.append((target, (base / target).resolve()))
    for token in _PATH.findall(text):
        token = token.rstrip(".,")
        if _PLACEHOLDER.search(token):
            continue
        out.append((token, ROOT / token))
    return out


def test_cited_path_extraction():
    text = (
        "See [api](api.md#conventions), [home](https://example.org/x), [top](#build), "
        "`csrc/common/stable.h`, `tests/reference_<op>.py`, tests/test_properties_*.py, "
        "torch/csrc/stable/ops.h and docs/nothing_here.md."
    )
    got = cited_paths(text, ROOT / "docs")
    assert [w for w, _ in got] == ["api.md", "csrc/common/stable.h", "docs/nothing_here.md"]
    assert got[0][1] == (ROOT / "docs" / "api.md").resolve()
    assert not got[2][1].exists()  # what the test below reports


def test_every_path_the_docs_cite_exists():
    if not (ROOT / "csrc").is_dir():  # the packaging check runs the tests beside a copy of docs/ alone
        pytest.skip("docs copied without the source tree they cite")
    missing = []
    for doc in doc_files():
        for written, resolved in cited_paths(doc.read_text(encoding="utf-8"), doc.parent):
            if not resolved.exists():
                missing.append(f"{doc.relative_to(ROOT)}: {written}")
    assert not missing, "paths cited in the docs that do not exist:\n" + "\n".join(missing)


# ---------------------------------------------------------------- README's commands and CI


def _readme():
    path = ROOT / "README.md"
    if not path.exists():
        pytest.skip("README.md not found")
    return path.read_text(encoding="utf-8")


def _first_bash_commands(text, n):
    blocks = re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)
    assert len(blocks) >= n, f"README has {len(blocks)} bash blocks, expected at least {n}"
    return [b.strip() for b in blocks[:n]]


def _pip_names(command):
    """Package names of every `pip install` in a `&&` chain (local paths and options left out)."""
    names = set()
    for part in command.split("&&"):
        words = part.split()
        if words[:2] != ["pip", "install"]:
            continue
        for w in words[2:]:
            # local paths (".", a built wheel "dist/x.whl") are not package names
            if not w.startswith("-") and not w.startswith(".") and "/" not in w and not w.endswith(".whl"):
                names.add(re.split(r"[<>=!~\[]", w, maxsplit=1)[0].lower())
    return names


def _requirement_names(pyproject, key):
    m = re.search(rf"^{key}\s*=\s*\[(.*?)\]", pyproject, re.S | re.M)
    assert m, f"no {key} in pyproject.toml"
    return {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0].lower() for r in re.findall(r'"([^"]+)"', m.group(1))}


def test_readme_opens_with_the_bench_and_test_commands():
    text = _readme()
    first_section = text.split("\n## ", 1)[0]
    bench, tests = _first_bash_commands(first_section, 2)
    for cmd in (bench, tests):
        assert "\n" not in cmd, f"one command, one line: {cmd!r}"
        # maskattn itself from the clone: installed from source, or built into a wheel that is installed
        from_source = "pip install --no-build-isolation ." in cmd
        from_wheel = re.search(
            r"pip wheel --no-build-isolation .*-w (\S+) \..*&& pip install \1/maskattn-\S*\.whl", cmd
        )
        assert from_source or from_wheel, cmd
    assert bench.endswith("python -m maskattn.bench"), bench
    assert re.search(r"python -m pytest\b.*\btests$", tests), tests
    # A fresh machine has nothing: both commands install what the build (no isolation) and the
    # package need, and the test command what the tests import.
    py = (ROOT / "pyproject.toml").read_text()
    build = _requirement_names(py, "requires")
    runtime = _requirement_names(py, "dependencies")
    test_extra = _requirement_names(py, "test")
    assert build | runtime <= _pip_names(bench), (build | runtime) - _pip_names(bench)
    assert build | runtime | test_extra <= _pip_names(tests), (build | runtime | test_extra) - _pip_names(tests)


def test_readme_test_command_is_the_one_ci_runs():
    ci = ROOT / ".ci" / "run"
    if not ci.exists():  # the sdist leaves CI out
        pytest.skip(".ci/run not found")
    bench, tests = _first_bash_commands(_readme().split("\n## ", 1)[0], 2)
    script = ci.read_text(encoding="utf-8")
    runs = [
        line.split(" || ", 1)[0].strip()
        for line in script.splitlines()
        if line.startswith("pip install") and "python -m pytest" in line
    ]
    assert runs == [tests], f"CI runs {runs}, README says {tests!r}"
    assert re.search(r"^python -m maskattn\.bench\b", script, re.M), "CI does not run the benchmark"
    # the bench command installs what the test command installs, less the test-only packages
    py = (ROOT / "pyproject.toml").read_text()
    assert _pip_names(bench) == _pip_names(tests) - _requirement_names(py, "test")


# maskattn is on no package index: installing it by name (with or without extras) cannot work;
# extras are installed from a clone as ".[plot]". Examples below spell the command in pieces so
# that this file does not match.
_FROM_INDEX = re.compile(r"""pip install(?:\s+-[-\w]+(?:=\S+)?)*\s+['"]?maskattn(?![-\w/.])""")
_EXTRA = re.compile(r"""pip install[^`\n]*?['"]?\.\[([\w,-]+)\]""")


def test_install_instructions_work_from_a_clone(files):
    pip = "pip" + " install"
    assert _FROM_INDEX.search(f"see {pip} maskattn[plot]")
    assert _FROM_INDEX.search(f"{pip} -q 'maskattn[face-bench]'")
    assert not _FROM_INDEX.search(f"{pip} --no-deps dist/maskattn-0.1.0.whl")
    assert _EXTRA.findall('pip install --no-build-isolation ".[plot]" and') == ["plot"]
    hits = _hits(files, _FROM_INDEX)
    assert not hits, 'maskattn is installed from a clone (pip install --no-build-isolation ".[plot]"):\n' + "\n".join(
        hits
    )
    extras = set(re.findall(r"^([\w-]+)\s*=", _optional_dependencies(), re.M))
    assert {"plot", "face-bench"} <= extras
    named = {(f, e) for f, text in files.items() for group in _EXTRA.findall(text) for e in group.split(",")}
    unknown = sorted(f"{f}: .[{e}]" for f, e in named if e not in extras)
    assert not unknown, f"extras not in pyproject.toml's optional-dependencies {sorted(extras)}: {unknown}"


def _optional_dependencies():
    py = (ROOT / "pyproject.toml").read_text()
    m = re.search(r"^\[project\.optional-dependencies\]\n(.*?)^\[", py, re.S | re.M)
    assert m, "no [project.optional-dependencies] in pyproject.toml"
    return m.group(1)


# ---------------------------------------------------------------- docs/design.md and the ops


def registered_ops():
    names = []
    for src in sorted((ROOT / "csrc").rglob("*.cpp")):
        names += re.findall(r"\bm\.def\(\s*\"(\w+)\(", src.read_text(encoding="utf-8"))
    return names


def test_design_lists_every_registered_op():
    design = ROOT / "docs" / "design.md"
    if not design.exists() or not (ROOT / "csrc").exists():
        pytest.skip("docs/design.md or csrc/ not found")
    names = registered_ops()
    # the parse itself: every op the installed maskattn registers is found (backward ops included)
    loaded = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("maskattn::")}
    assert "_masked_softmax_backward" in loaded
    assert loaded <= set(names), f"registered but not found by the parse: {loaded - set(names)}"
    text = design.read_text(encoding="utf-8")
    missing = [n for n in names if f"`{n}`" not in text]
    assert not missing, f"ops registered in csrc/ but not in docs/design.md: {missing}"
