"""The docs' code runs: every ```python block of docs/migration.md, in order, as one script against
the installed package (the blocks build on each other, as a reader would paste them), and the
package version agrees with pyproject.toml."""

import pathlib
import re

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
        assert len(blocks) >= 10, "every seed layer has a before and an after block"
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
