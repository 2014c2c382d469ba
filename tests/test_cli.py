"""The `qpass` command (qpass/cli/): checks before the model loads, one-line errors, staging folders (stale
ones removed, the umask honoured), console script = tools/*.py, Ctrl-C."""
import importlib.metadata
import importlib.util
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import tomllib

import pytest

import qpass.cli
from qpass import staging
from qpass.cli import lower as lower_cmd
from tests import toy

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEXT = "the cat sat on the mat and the dog sat on the log. " * 6


def tool_module(name: str):
    spec = importlib.util.spec_from_file_location(f"qpass_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def qpass_cmd(capsys, *argv):
    code = qpass.cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str, name: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith(f"{name}:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    (d / "text.txt").write_text(TEXT)
    return toy.save_hf_dir(d / "llama")


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything loads a model: the checks must come first."""
    import transformers

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(lower_cmd, "load_model", refuse)


# ------------------------------------------------------------------ checks before the model loads

@pytest.mark.parametrize("case", ["recipe_typo", "recipe_missing", "recipe_binary", "calib_missing", "out_is_file",
                                  "no_model_dir"])
def test_lower_checks_recipe_and_paths_before_loading_the_model(tmp_path, capsys, no_model_load, case):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    recipe, out, extra = ROOT / "recipes/w8a8.yaml", tmp_path / "out", []
    if case == "recipe_typo":
        recipe = tmp_path / "r.yaml"
        recipe.write_text("version: 1\npasses:\n  - quantize: {weights: {bitz: 4}}\n")
        expect = "did you mean 'bits'"
    elif case == "recipe_missing":
        recipe, expect = tmp_path / "nope.yaml", "nope.yaml"
    elif case == "recipe_binary":
        recipe = tmp_path / "r.yaml"
        recipe.write_bytes(bytes(range(256)) * 4)
        expect = "r.yaml"
    elif case == "calib_missing":
        extra, expect = ["--calib", tmp_path / "none.txt"], "calibration file"
    elif case == "out_is_file":
        out.write_text("x")
        expect = "not a directory"
    else:
        model, expect = tmp_path / "absent", "does not exist"
    t0 = time.perf_counter()
    code, _, err = qpass_cmd(capsys, "lower", model, "--recipe", recipe, "--out", out, "--backend", "torch", *extra)
    assert code == 1 and expect in error_line(err, "qpass lower"), err
    assert time.perf_counter() - t0 < 5
    assert "Traceback" not in err


def test_eval_checks_recipes_first_and_needs_no_calibration_without_one(model_dir, tmp_path, capsys, monkeypatch):
    text = pathlib.Path(model_dir).parent / "text.txt"
    with monkeypatch.context() as mp:
        import transformers

        mp.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                   lambda *a, **k: pytest.fail("model loaded before the recipe was read"))
        code, _, err = qpass_cmd(capsys, "eval", model_dir, "--recipe", tmp_path / "missing.yaml", "--eval", text)
        assert code == 1 and "missing.yaml" in error_line(err, "qpass eval") and "Traceback" not in err
        with pytest.raises(SystemExit) as e:       # a recipe needs calibration text: usage error, exit 2
            qpass_cmd(capsys, "eval", model_dir, "--recipe", ROOT / "recipes/w8a8.yaml", "--eval", text)
        assert e.value.code == 2 and "--calib" in capsys.readouterr().err
    md = tmp_path / "table.md"
    code, out, err = qpass_cmd(capsys, "eval", model_dir, "--eval", text, "--window", 32, "--no-progress",
                               "--markdown", md)
    assert code == 0, err
    assert "| FP32 |" in out and "includes lm_head" in out
    assert md.read_text().startswith("| recipe | perplexity")


# ------------------------------------------------------------------ staging folders

def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_clean_stale_removes_only_folders_of_dead_processes_on_this_host(tmp_path):
    host = staging._host()
    dead = tmp_path / f".qpass-lower-{dead_pid()}@{host}-abc"
    mine = pathlib.Path(staging.make_dir(tmp_path, "lower"))
    parent_alive = tmp_path / f".qpass-save-{os.getppid()}@{host}-def"
    elsewhere = tmp_path / f".qpass-lower-{dead_pid()}@{host}x-ghi"   # another host: never judged from here
    fresh_unowned, old_unowned = tmp_path / ".qpass-save-k3j2", tmp_path / ".qpass-onnx-x9z8"
    user = tmp_path / "results"
    for d in (dead, parent_alive, elsewhere, fresh_unowned, old_unowned, user):
        d.mkdir()
        (d / "f.bin").write_bytes(b"x")
    two_days = time.time() - 2 * 86400
    os.utime(old_unowned, (two_days, two_days))
    assert sorted(staging.clean_stale(tmp_path)) == sorted([str(dead), str(old_unowned)])
    assert {p.name for p in tmp_path.iterdir()} == {mine.name, parent_alive.name, elsewhere.name,
                                                    fresh_unowned.name, user.name}
    assert mine.name.startswith(f".qpass-lower-{os.getpid()}@")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="the ONNX export is the long step")
def test_a_killed_lower_leaves_a_staging_folder_that_the_next_run_removes(model_dir, tmp_path):
    """SIGKILL while lowering (after quantizing): the staging folder stays; clean_stale removes it."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools/lower.py"), model_dir, "--recipe",
                             ROOT / "recipes/w8a8.yaml", "--out", tmp_path / "out"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not [p for p in tmp_path.iterdir() if p.name.startswith(".qpass-lower-")]:
            assert proc.poll() is None and time.time() < deadline, "lower.py ended before staging"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".qpass-")]
    assert len(left) == 1 and f"-{proc.pid}@" in left[0].name
    assert staging.clean_stale(tmp_path) == [str(left[0])]
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_lower_output_honours_the_umask_and_removes_stale_staging(model_dir, tmp_path, capsys):
    stale = tmp_path / f".qpass-lower-{dead_pid()}@{staging._host()}-zz"
    stale.mkdir()
    out = tmp_path / "out"
    old = os.umask(0o027)
    try:
        code, stdout, err = qpass_cmd(capsys, "lower", model_dir, "--recipe", ROOT / "recipes/w8a16.yaml",
                                      "--out", out, "--backend", "torch", "--torch-kernels", "reference")
    finally:
        os.umask(old)
    assert code == 0, err
    assert f"removed {stale}" in stdout and not stale.exists()
    assert (out.stat().st_mode & 0o777) == 0o750
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o640
    assert "packing weights" in err                    # progress of a silent step, on stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_publish_gives_mkdir_permissions(tmp_path):
    d = pathlib.Path(staging.make_dir(tmp_path, "save"))
    (d / "sub").mkdir(mode=0o700)
    assert d.stat().st_mode & 0o777 == 0o700                # mkdtemp
    old = os.umask(0o022)
    try:
        staging.publish(d)
    finally:
        os.umask(old)
    assert d.stat().st_mode & 0o777 == 0o755 and (d / "sub").stat().st_mode & 0o777 == 0o755


def test_save_publishes_with_the_umask_and_removes_stale_staging(tmp_path):
    import qpass

    stale = tmp_path / f".qpass-save-{dead_pid()}@{staging._host()}-zz"
    stale.mkdir()
    qm = qpass.apply(toy.hf_model("llama"), ROOT / "recipes/w8a16.yaml", progress=False)
    old = os.umask(0o027)
    try:
        qm.save(tmp_path / "saved")
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]
    assert (tmp_path / "saved").stat().st_mode & 0o777 == 0o750
    assert {(p.stat().st_mode & 0o777) for p in (tmp_path / "saved").iterdir()} == {0o640}


# ------------------------------------------------------------------ console script = tools/*.py

def test_console_script_and_tools_run_the_same_code(monkeypatch, capsys):
    with open(ROOT / "pyproject.toml", "rb") as f:
        target = tomllib.load(f)["project"]["scripts"]["qpass"]
    assert importlib.metadata.EntryPoint("qpass", target, "console_scripts").load() is qpass.cli.main
    for name in qpass.cli.COMMANDS:
        calls = []
        module = qpass.cli._module(name)
        monkeypatch.setattr(module, "run", lambda args, calls=calls: calls.append(vars(args)) or 0)
        argv = {"lower": ["m", "--recipe", "r.yaml", "--out", "o"], "qat": ["m", "--recipe", "r.yaml", "--out", "o"],
                "eval": ["m", "--recipe", "r.yaml"], "demo": ["--recipe", "r.yaml"], "export": ["d", "--out", "o"]}[name]
        assert tool_module(name).main(argv) == 0
        assert qpass.cli.main([name, *argv]) == 0
        assert len(calls) == 2 and calls[0] == {k: v for k, v in calls[1].items() if k != "command"}


def test_help_runs_from_the_installed_command(tmp_path):
    script = pathlib.Path(sys.executable).parent / "qpass"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "qpass.cli"]
    top = subprocess.run([*cmd, "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert top.returncode == 0 and all(c in top.stdout for c in ("lower", "eval", "demo", "qat"))
    sub = subprocess.run([sys.executable, "-m", "qpass.cli", "lower", "--help"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert sub.returncode == 0 and "usage: qpass lower" in sub.stdout and "--torch-kernels" in sub.stdout


def test_every_option_has_help_and_every_usage_option_exists():
    _, parsers = qpass.cli.build_parser()
    for name, ap in parsers.items():
        for action in ap._actions:
            assert action.help, f"qpass {name} {action.option_strings or action.dest}: no help text"
        known = {s for a in ap._actions for s in a.option_strings}
        usage = ap.description.split("\n\n")[1]        # the usage block of the module docstring
        for word in usage.replace("[", " ").replace("]", " ").split():
            if word.startswith("--") and "=" not in word:          # (--nproc_per_node=2 is torchrun's)
                assert word in known, f"qpass {name}: its docstring names {word}"


def test_no_command_prints_usage(capsys):
    assert qpass.cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


# ------------------------------------------------------------------ Ctrl-C

@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name != "posix", reason="POSIX signals")
def test_ctrl_c_while_importing_exits_130_with_one_line(model_dir, tmp_path):
    """SIGINT while torch is being imported (lines from -X importtime show it has started), deep into it: a
    KeyboardInterrupt raised there used to be swallowed by torch submodules (the command ran on and exited 0) or
    to leave a half-imported torch (AttributeError); the CLI now holds SIGINT until torch has loaded."""
    proc = subprocess.Popen([sys.executable, "-X", "importtime", str(ROOT / "tools/lower.py"), model_dir,
                             "--recipe", str(ROOT / "recipes/w8a8.yaml"), "--out", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, torch_lines = [], 0
    for line in proc.stderr:
        seen.append(line)
        torch_lines += bool(re.search(r"\|\s+torch\.", line))    # a torch submodule: torch's import is under way
        if torch_lines == 300:
            break
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    errors = [ln for ln in (seen + rest.splitlines()) if not ln.startswith("import time:")]
    assert proc.returncode == 130, "".join(errors)
    assert len(errors) == 1 and re.fullmatch(r"lower\.py: interrupted(; nothing was written to --out)?",
                                             errors[0].strip()), errors
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name != "posix", reason="POSIX signals")
def test_ctrl_c_in_the_console_script_while_importing_exits_130_with_one_line(model_dir, tmp_path):
    """The installed `qpass` script runs `from qpass.cli import main` before main's handler exists: importing
    qpass must not import torch, so SIGINT while torch loads is caught by main (exit 130, one line)."""
    script = "import sys\nfrom qpass.cli import main\nif __name__ == '__main__':\n    sys.exit(main())\n"
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-c", script, "lower", model_dir,
                             "--recipe", str(ROOT / "recipes/w8a8.yaml"), "--out", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if re.search(r"\|\s+torch\.", line):          # a torch submodule: torch's import is under way
            break
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    errors = [ln for ln in (seen + rest.splitlines()) if not ln.startswith("import time:")]
    assert proc.returncode == 130, "".join(errors)
    assert len(errors) == 1 and re.fullmatch(r"qpass( lower)?: interrupted.*", errors[0].strip()), errors
    assert "Traceback" not in "".join(errors)
    assert not (tmp_path / "out").exists()


def test_import_qpass_is_cheap_and_keeps_its_names():
    """`import qpass` loads no torch; the public names load together on first use, as an eager import had them,
    and importing the submodules qpass.capture / qpass.lower leaves qpass.capture / qpass.lower the functions."""
    code = """if True:
        import ast, sys
        import qpass
        assert "torch" not in sys.modules, "import qpass imported torch"
        import qpass.cli, qpass.tables, qpass.version
        assert "torch" not in sys.modules, "import qpass.cli imported torch"
        import qpass.capture, qpass.lower
        from qpass import Recipe, apply, capture, lower
        assert callable(qpass.capture) and qpass.capture.__name__ == "capture" and capture is qpass.capture
        assert callable(qpass.lower) and qpass.lower.__module__ == "qpass.lower" and lower is qpass.lower
        assert qpass.apply is apply and qpass.Recipe is Recipe and qpass.load.__module__ == "qpass.artifacts"
        assert qpass.artifacts.__name__ == "qpass.artifacts" and qpass.primitives.__name__ == "qpass.primitives"
        tree = ast.parse(open(qpass.__file__).read())
        static = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1
                  for a in n.names}
        assert static == set(qpass._EXPORTS) | {"__version__"}, static ^ (set(qpass._EXPORTS) | {"__version__"})
        assert set(qpass._EXPORTS) <= set(dir(qpass))
        for name in qpass._EXPORTS:
            getattr(qpass, name)
        try:
            qpass.no_such_name
        except AttributeError as e:
            assert "no_such_name" in str(e)
        else:
            raise AssertionError("qpass.no_such_name")
        print("ok")
    """
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


# ------------------------------------------------------------------ tools/bench_onnx.py options

def test_bench_onnx_parity_has_a_default_and_refuses_too_few_eval_tokens(capsys):
    bench_onnx = tool_module("bench_onnx")
    assert bench_onnx.parse_args(["--parity"]).eval_tokens == bench_onnx.PARITY_EVAL_TOKENS == 4096
    assert bench_onnx.parse_args([]).eval_tokens == 0                    # timings: all held-out tokens
    assert bench_onnx.parse_args(["--parity", "--eval-tokens", "0"]).eval_tokens == 0
    assert bench_onnx.parse_args(["--parity", "--eval-tokens", "512"]).eval_tokens == 512
    for argv in (["--parity", "--eval-tokens", "100"], ["--eval-tokens", "-1"]):
        with pytest.raises(SystemExit) as e:
            bench_onnx.parse_args(argv)
        assert e.value.code == 2
        assert "--eval-tokens" in capsys.readouterr().err


# ------------------------------------------------------------------ README

@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "models/tiny-llama/config.json").exists(), reason="bundled model absent")
def test_readme_quick_start_runs_as_written(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```python\n") + len("```python\n")
    code = readme[start:readme.index("```", start)]
    assert code.count('"out/w8a8"') == 2
    monkeypatch.chdir(ROOT)                                  # it is run from the repository root
    scope = {}
    exec(compile(code.replace('"out/w8a8"', repr(str(tmp_path / "w8a8"))), "README.md", "exec"), scope)
    assert scope["logits"].shape == (1, 64, scope["model"].config.vocab_size)
    assert scope["qm2"] is not None


def test_readme_links_resolve_in_a_clone():
    for path in ("README.md", "docs/methods.md"):
        text = (ROOT / path).read_text()
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if "://" not in target:
                assert (ROOT / path).parent.joinpath(target).exists(), f"{path} links to missing {target}"
    assert "../shared" not in (ROOT / "README.md").read_text()            # nothing outside the clone
