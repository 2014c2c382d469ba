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


# The one place core reaches the passes: the recipe loader's lookup of the literal PASSES table (a late import:
# passes import the core). Everything else in core gets pass classes through qpass.recipe.
PASS_TABLE = ROOT / "qpass" / "recipe.py"


def test_core_has_no_algorithms_or_backends():
    for f in library("qpass"):
        bad = {m for m in imports(f) if m.startswith(("passes", "backends", "qpass.backends", "qpass.passes"))}
        if f == PASS_TABLE:
            bad -= {"qpass.passes"}
        assert not bad, f"{f} imports {bad}"


def test_backends_use_only_the_public_core_api():
    """Backends import qpass's public modules, never private names (``qpass._api``, ``_helpers``)."""
    for f in library("backends"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qpass"):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                assert not node.module.split(".")[-1].startswith("_") or node.module == "qpass.__init__", \
                    f"{f} imports the private module {node.module}"
                assert not private, f"{f} imports private names {private} from {node.module}"


def test_no_print_in_library_code():
    for folder in ("qpass", "passes", "backends"):
        for f in library(folder):
            calls = [n for n in ast.walk(ast.parse(f.read_text()))
                     if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"]
            assert not calls, f"{f} prints: use logging ('qpass.*')"


def test_the_graph_core_does_not_import_the_qat_package():
    """QAT's data generation, trainer and taps (qpass/qat/) stay apart: only the qat pass and the CLI use them."""
    qat = ROOT / "qpass" / "qat"
    for f in library("qpass"):
        if qat in f.parents:
            continue
        bad = {m for m in imports(f) if m.startswith("qpass.qat") or m in (".qat", "qat")}
        assert not bad, f"{f} imports {bad}"
