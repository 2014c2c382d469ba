"""Architecture rules that keep the core small and the layers apart."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_primitives_never_import_fx():
    for f in (ROOT / "qpass" / "primitives").glob("*.py"):
        bad = {m for m in imports(f) if m.startswith("torch.fx") or m.startswith("qpass.graph")}
        assert not bad, f"{f.name} imports {bad}: numerics must not depend on graphs"


# qpass/cli/ is the `qpass` command: an application over the library, like tools/ (it lowers through the
# backends and prints its results), installed inside the package so that `pip install` gives the command.
CLI = ROOT / "qpass" / "cli"


def library(folder: str) -> list[pathlib.Path]:
    return [f for f in (ROOT / folder).rglob("*.py") if CLI not in f.parents]


def test_core_has_no_algorithms_or_backends():
    for f in library("qpass"):
        bad = {m for m in imports(f) if m.startswith(("passes", "backends", "qpass.backends"))}
        assert not bad, f"{f} imports {bad}"


def test_no_print_in_library_code():
    for folder in ("qpass", "passes", "backends"):
        for f in library(folder):
            calls = [n for n in ast.walk(ast.parse(f.read_text()))
                     if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"]
            assert not calls, f"{f} prints: use logging ('qpass.*')"
