"""Every name the command-line tools import from qpass or from each other exists (anywhere in the file,
function-level imports included): the tools are not installed and no other test runs most of them."""
from __future__ import annotations

import ast
import importlib
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOOLS = sorted((ROOT / "tools").glob("*.py"))


def _imports(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] in ("qpass", "tools"):
            yield node.module, [a.name for a in node.names], node.lineno


@pytest.mark.parametrize("path", TOOLS, ids=[p.name for p in TOOLS])
def test_tool_imports_resolve(path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    for module, names, line in _imports(path):
        mod = importlib.import_module(module)
        for name in names:
            assert name == "*" or hasattr(mod, name) or f"{module}.{name}" in sys.modules or \
                importlib.util.find_spec(f"{module}.{name}") is not None, \
                f"{path.name}:{line} imports {name!r} from {module}, which has no such name"
