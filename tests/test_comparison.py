"""The one comparison table: `tools/eval.py --table MANIFEST --out DOC.md` (qpass/cli/eval.py's table section).

Fast: toy models written with save_hf_dir (char tokenizer), short texts, windows of 16 tokens, 2-row manifests.
"""
import json
import os
import pathlib
import shutil

import pytest

from qpass.cli import main
from qpass.cli import eval as cli_eval
from tests import toy

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
        "of a wife. However little known the feelings or views of such a man may be on his first entering a "
        "neighbourhood, this truth is so well fixed in the minds of the surrounding families.\n")
W4 = "version: 1\npasses:\n  - quantize: {weights: {bits: 4, granularity: per_channel, symmetric: true}}\n"
KV4 = ("version: 1\npasses:\n  - kv_cache: {keys: {bits: 4, granularity: per_token, dynamic: true}, "
       "values: {bits: 4, granularity: per_token, dynamic: true}}\n")
FAILS = "version: 1\npasses:\n  - quantize: {weights: {bits: 4}, targets: ['model.nothing.*']}\n"
MANIFEST = ("version: 1\nrows:\n  - {family: weight-only PTQ, method: RTN W4, recipe: w4.yaml}\n"
            "  - {family: KV cache, method: KV4, recipe: kv4.yaml, paper: arXiv:0000.00000}\n")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two toy model directories (llama, opt), each with its own texts named in qpass_data.json."""
    base = tmp_path_factory.mktemp("models")
    out = {}
    for family in ("llama", "opt"):
        d = base / family
        toy.save_hf_dir(d, family)
        (d / "eval.txt").write_text(TEXT)
        (d / "calib.txt").write_text(TEXT * 2)
        (d / "qpass_data.json").write_text(json.dumps({"eval": "eval.txt", "calib": "calib.txt"}))
        out[family] = str(d)
    return out


@pytest.fixture
def work(tmp_path, models):
    """A manifest of two rows, its recipes, and a copy of the llama model (free to change)."""
    (tmp_path / "w4.yaml").write_text(W4)
    (tmp_path / "kv4.yaml").write_text(KV4)
    (tmp_path / "comparison.yaml").write_text(MANIFEST)
    shutil.copytree(models["llama"], tmp_path / "llama")
    return tmp_path


@pytest.fixture(autouse=True)
def fixed_code(monkeypatch):
    """The sources digest as of the test's start: other work on qpass/ or passes/ while the tests run must not
    change the rows' keys between two runs of one test (a real change of it is tested separately)."""
    state = cli_eval.code_state()
    monkeypatch.setattr(cli_eval, "code_state", lambda: dict(state))
    return state


@pytest.fixture
def calls(monkeypatch):
    """Counts of the FP reference and of the recipes the table evaluates."""
    seen = {"reference": 0, "recipes": []}
    reference, recipe = cli_eval.TableScorer.reference, cli_eval.TableScorer.recipe

    def count_reference(self):
        seen["reference"] += 1
        return reference(self)

    def count_recipe(self, path):
        seen["recipes"].append(os.path.basename(path))
        return recipe(self, path)

    monkeypatch.setattr(cli_eval.TableScorer, "reference", count_reference)
    monkeypatch.setattr(cli_eval.TableScorer, "recipe", count_recipe)
    return seen


def table(work, *extra, models=None, manifest="comparison.yaml", out="comparison.md"):
    argv = ["eval", "--table", str(work / manifest), "--out", str(work / out), "--window", "16",
            "--calib-samples", "2", "--no-progress"]
    for m in models or [str(work / "llama")]:
        argv += ["--model", m]
    return main([*argv, *extra])


def model_tables(doc: str) -> dict[str, list[list[str]]]:
    """{model heading: table rows as cells (header first)} of a rendered doc."""
    out, current = {}, None
    for line in doc.splitlines():
        if line.startswith("## "):
            current = line[3:]
        elif line.startswith("| ") and current is not None and current != "Methods":
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            out.setdefault(current, []).append(cells)
    return out


# ------------------------------------------------------------------------------------------- the manifest

@pytest.mark.parametrize("text, words", [
    ("version: 1\nrows:\n  - {family: A, method: M, recipe: w4.yaml, famly: B}\n",
     ["rows[0] ('M')", "unknown key 'famly'", "allowed: family, method, recipe, paper, notes"]),
    ("version: 1\nrows:\n  - {family: A, method: M, recipe: w4.yaml}\n  - {family: A, method: Gone, recipe: no.yaml}\n",
     ["rows[1] ('Gone')", "recipe file 'no.yaml' does not exist"]),
    ("version: 1\nrows:\n  - {family: A, recipe: w4.yaml}\n", ["rows[0]", "'method' is missing"]),
    ("version: 1\nrows:\n  - {family: A, method: M, recipe: w4.yaml}\n  - {family: B, method: N, recipe: w4.yaml}\n",
     ["rows[1] ('N')", "already rows[0]"]),
    ("version: 1\nrows:\n  - {family: A, method: M, recipe: bad.yaml}\n",
     ["rows[0] ('M')", "bad recipe", "bits"]),
    ("version: 1\nrow:\n  - {family: A, method: M, recipe: w4.yaml}\n", ["unknown key 'row'"]),
    ("version: 1\nrows: []\n", ["'rows' must be a non-empty list"]),
])
def test_manifest_errors_name_the_row(work, calls, capsys, text, words):
    (work / "bad.yaml").write_text("version: 1\npasses:\n  - quantize: {weights: {bits: 99}}\n")
    (work / "m.yaml").write_text(text)
    assert table(work, manifest="m.yaml") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "m.yaml" in err, err
    for w in words:
        assert w in err, err
    assert not (work / "comparison.md").exists() and not (work / "comparison.json").exists()
    assert calls["reference"] == 0 and calls["recipes"] == []


def test_the_repository_manifest_lists_every_preset():
    rows, unlisted = cli_eval.read_manifest(str(ROOT / "docs" / "comparison.yaml"))
    assert unlisted == [], f"add a row to docs/comparison.yaml (or exclude) for {unlisted}"
    assert {"weight-only PTQ", "weight+activation PTQ", "KV cache", "QAT"} <= {r.family for r in rows}


# ------------------------------------------------------------------------- evaluation, cache, rendering

def test_table_renders_fp_first_and_caches_rows(work, calls, capsys):
    assert table(work) == 0
    assert calls == {"reference": 1, "recipes": ["w4.yaml", "kv4.yaml"]}
    doc = (work / "comparison.md").read_text()
    tabs = model_tables(doc)
    assert list(tabs) == [str(work / "llama")]
    head, *body = tabs[str(work / "llama")]
    assert head == cli_eval.TABLE_HEAD
    assert head[:4] == ["family", "method", "recipe", "bits/weight, all linears"]
    assert [r[1] for r in body] == ["FP32", "RTN W4", "KV4"]          # FP first, then the manifest's order
    fp, w4, kv = body
    assert fp[3] == "32.00" and fp[4] == "–" and fp[6] == "0.000" and fp[8] == "100.00%"
    assert float(w4[3]) < 32 and float(w4[4]) == pytest.approx(float(w4[3]))      # lm_head is quantized too here
    assert float(w4[6]) == pytest.approx(float(w4[5]) - float(fp[5]), abs=2e-3)
    assert kv[3] == "32.00" and kv[4] == "–"                           # KV only: weights stay float
    for line in ("Versions: qpass", "torch", "transformers", "Machine:", "--table", "`--skip-family QAT`"):
        assert line in doc
    assert "<!-- BEGIN comparison -->" in doc and "<!-- END comparison -->" in doc
    cache = json.loads((work / "comparison.json").read_text())
    rows = cache["models"][str(work / "llama")]["rows"]
    assert set(rows) == {"FP32", str(work / "w4.yaml"), str(work / "kv4.yaml")}
    assert {"model", "recipe", "settings", "sources", "eval", "calib", "torch"} <= set(rows["FP32"]["key_parts"])

    # the same command again: nothing is evaluated, the doc is rendered again from the cache, unchanged
    assert table(work) == 0
    assert calls["reference"] == 1 and len(calls["recipes"]) == 2
    assert (work / "comparison.md").read_text() == doc

    # a changed recipe file: that row alone (and the FP reference it needs)
    (work / "kv4.yaml").write_text(KV4.replace("bits: 4", "bits: 8"))
    assert table(work) == 0
    assert calls["reference"] == 2 and calls["recipes"][2:] == ["kv4.yaml"]

    # different eval settings change every key; --force evaluates every row
    assert table(work, "--force") == 0
    assert calls["reference"] == 3 and calls["recipes"][3:] == ["w4.yaml", "kv4.yaml"]
    assert table(work, "--max-eval-tokens", "100") == 0
    assert calls["reference"] == 4 and calls["recipes"][5:] == ["w4.yaml", "kv4.yaml"]


def test_prose_around_the_generated_section_is_kept(work, calls):
    (work / "comparison.md").write_text("# Mine\n\nintro\n\n<!-- BEGIN comparison -->\nold\n<!-- END comparison -->\n"
                                        "\nafter\n")
    assert table(work) == 0
    doc = (work / "comparison.md").read_text()
    assert doc.startswith("# Mine\n\nintro\n\n<!-- BEGIN comparison -->\n") and doc.endswith("\nafter\n")
    assert "old" not in doc and "| FP32 |" in doc


def test_model_restriction_and_models_from_the_cache(work, models, calls):
    opt = str(work / "opt")
    shutil.copytree(models["opt"], opt)
    assert table(work, models=[opt]) == 0
    assert calls["reference"] == 1 and len(calls["recipes"]) == 2
    assert list(model_tables((work / "comparison.md").read_text())) == [opt]
    # then llama alone: opt is not evaluated again, and its cached table stays in the doc
    assert table(work, models=[str(work / "llama")]) == 0
    assert calls["reference"] == 2 and len(calls["recipes"]) == 4
    tabs = model_tables((work / "comparison.md").read_text())
    assert list(tabs) == [str(work / "llama"), opt]
    assert [r[1] for r in tabs[opt][1:]] == ["FP32", "RTN W4", "KV4"]
    # a model whose files changed since: its cached rows show, marked as stale, until it is run again
    (pathlib.Path(opt) / "eval.txt").write_text(TEXT + TEXT)
    assert table(work, models=[str(work / "llama")]) == 0
    doc = (work / "comparison.md").read_text()
    assert [r[1] for r in model_tables(doc)[opt][1:]] == ["FP32 †", "RTN W4 †", "KV4 †"]
    assert "† a row from an earlier run" in doc and calls["reference"] == 2


def test_skip_family(work, calls):
    assert table(work, "--skip-family", "KV cache") == 0
    assert calls["recipes"] == ["w4.yaml"]
    body = model_tables((work / "comparison.md").read_text())[str(work / "llama")][1:]
    assert body[2][1] == "KV4" and body[2][5] == "not evaluated"
    assert table(work) == 0                              # the skipped row is evaluated on the next full run
    assert calls["recipes"] == ["w4.yaml", "kv4.yaml"]


def test_a_failing_row_is_an_error_cell(work, calls, capsys):
    (work / "kv4.yaml").write_text(FAILS)
    assert table(work) == 0
    body = model_tables((work / "comparison.md").read_text())[str(work / "llama")][1:]
    assert [r[1] for r in body] == ["FP32", "RTN W4", "KV4"]
    assert body[1][5] != "–" and float(body[1][5]) > 0                    # the other rows are there
    # apply time (a number; 0.0 s is possible: the toy row applies in well under 0.05 s once its capture is
    # cached, see tests/conftest.py) and peak RSS
    assert float(body[1][9]) >= 0 and (body[1][10] == "–" or float(body[1][10]) > 0)
    assert body[2][5].startswith("error: TargetNotFoundError: ") and "model.nothing.*" in body[2][5]
    assert body[2][3:5] + body[2][6:] == ["–"] * 7
    # a failed row is tried again on the next run (its cause may be gone), the others come from the cache
    assert table(work) == 0
    assert calls["recipes"] == ["w4.yaml", "kv4.yaml", "kv4.yaml"]


def test_strict_stops_without_writing(work, calls, capsys):
    (work / "kv4.yaml").write_text(FAILS)
    assert table(work, "--strict") == 1
    err = capsys.readouterr().err
    assert "kv4.yaml (KV4) failed: " in err and "model.nothing.*" in err
    assert not (work / "comparison.md").exists()


@pytest.mark.parametrize("argv, words", [
    (["eval", "--table", "x.yaml"], "--table needs --out"),
    (["eval", "models/tiny-llama", "--table", "x.yaml", "--out", "o.md"], "MODEL_DIR do not go with it"),
    (["eval", "models/tiny-llama", "--force"], "--force only go with --table"),
    (["eval"], "give MODEL_DIR"),
])
def test_usage_errors(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_unknown_family_to_skip(work, calls, capsys):
    with pytest.raises(SystemExit) as e:
        table(work, "--skip-family", "QAT")
    assert e.value.code == 2 and "families are weight-only PTQ, KV cache" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- rows from other tables

W4_ONLY = "version: 1\nrows:\n  - {family: weight-only PTQ, method: RTN W4, recipe: w4.yaml}\n"


def _age(cache_path: pathlib.Path, rid: str, commit: str = "0" * 40) -> None:
    """Make one cached row look computed by an earlier code version (another sources digest and commit)."""
    cache = json.loads(cache_path.read_text())
    for entry in cache["models"].values():
        row = entry["rows"][rid]
        row["key_parts"]["sources"] = "an-earlier-digest"
        row["key"] = "not-the-current-key"
        row["run"]["commit"] = commit
    cache_path.write_text(json.dumps(cache))


def test_import_takes_rows_of_the_same_inputs_and_missing_evaluates_the_rest(work, calls, capsys):
    (work / "family.yaml").write_text(W4_ONLY)
    assert table(work, manifest="family.yaml", out="family.md") == 0
    assert calls["recipes"] == ["w4.yaml"]
    fam = model_tables((work / "family.md").read_text())[str(work / "llama")]
    # the comparison table takes the family's W4 row and evaluates only the KV4 row it lacks
    assert table(work, "--import", str(work / "family.json"), "--missing") == 0
    assert calls["recipes"] == ["w4.yaml", "kv4.yaml"]
    assert "family.json: 2 row(s) taken" in capsys.readouterr().err         # FP32 and RTN W4
    body = model_tables((work / "comparison.md").read_text())[str(work / "llama")]
    assert body[2][:9] == fam[2][:9] and body[2][1] == "RTN W4"                # same numbers, current: no mark
    rows = json.loads((work / "comparison.json").read_text())["models"][str(work / "llama")]["rows"]
    assert rows[str(work / "w4.yaml")]["run"]["imported_from"].endswith("family.json")


def test_import_marks_rows_of_an_earlier_code_version_and_missing_keeps_them(work, calls):
    (work / "family.yaml").write_text(W4_ONLY)
    assert table(work, manifest="family.yaml", out="family.md") == 0
    _age(work / "family.json", str(work / "w4.yaml"))
    assert table(work, "--import", str(work / "family.json"), "--missing") == 0
    assert calls["recipes"] == ["w4.yaml", "kv4.yaml"]
    doc = (work / "comparison.md").read_text()
    assert [r[1] for r in model_tables(doc)[str(work / "llama")][1:]] == ["FP32", "RTN W4 ‡", "KV4"]
    assert "‡ a row computed from the same model, recipe file" in doc and "† a row" not in doc
    # without --missing the aged row is evaluated again, and the import does not bring the older one back
    assert table(work, "--import", str(work / "family.json")) == 0
    assert calls["recipes"] == ["w4.yaml", "kv4.yaml", "w4.yaml"]
    assert [r[1] for r in model_tables((work / "comparison.md").read_text())[str(work / "llama")][1:]] == [
        "FP32", "RTN W4", "KV4"]


def test_import_skips_rows_of_another_recipe_file(work, calls, capsys):
    (work / "family.yaml").write_text(W4_ONLY)
    assert table(work, manifest="family.yaml", out="family.md") == 0
    (work / "w4.yaml").write_text(W4.replace("bits: 4", "bits: 3"))     # the family's row is of the old file now
    assert table(work, "--import", str(work / "family.json"), "--missing") == 0
    assert "family.json: 1 row(s) taken" in capsys.readouterr().err          # FP32 alone
    assert calls["recipes"] == ["w4.yaml", "w4.yaml", "kv4.yaml"]


def test_import_and_missing_usage_errors(work, calls, capsys):
    with pytest.raises(SystemExit) as e:
        table(work, "--force", "--missing")
    assert e.value.code == 2 and "--force and --missing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        table(work, "--import", str(work / "comparison.json"))
    assert e.value.code == 2 and "this table's own cache" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["eval", "models/tiny-llama", "--missing"])
    assert e.value.code == 2 and "--missing only go with --table" in capsys.readouterr().err


def test_import_from_git_history_and_a_missing_file(work, calls, capsys, monkeypatch):
    import subprocess

    (work / "family.yaml").write_text(W4_ONLY)
    assert table(work, manifest="family.yaml", out="family.md") == 0
    subprocess.run(["git", "init", "-q", str(work)], check=True)
    subprocess.run(["git", "-C", str(work), "add", "family.json"], check=True)
    subprocess.run(["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"],
                   check=True)
    (work / "family.json").unlink()                                   # only the commit has it now
    monkeypatch.setattr(cli_eval, "CHECKOUT", str(work))
    assert table(work, "--import", "HEAD:family.json", "--missing") == 0
    assert "HEAD:family.json: 2 row(s) taken" in capsys.readouterr().err
    assert calls["recipes"] == ["w4.yaml", "kv4.yaml"]
    rows = json.loads((work / "comparison.json").read_text())["models"][str(work / "llama")]["rows"]
    assert rows[str(work / "w4.yaml")]["run"]["imported_from"] == "HEAD:family.json"
    for spec, words in (("HEAD:nothing.json", "git has no nothing.json at HEAD"),
                        (str(work / "none.json"), "no such file")):
        assert table(work, "--import", spec) == 1
        assert words in capsys.readouterr().err


def test_missing_evaluates_rows_of_a_changed_recipe_file_but_not_of_an_earlier_code_version(work, calls):
    assert table(work) == 0
    _age(work / "comparison.json", str(work / "kv4.yaml"))                   # KV4: same file, earlier code
    (work / "w4.yaml").write_text(W4.replace("bits: 4", "bits: 3"))           # RTN W4: its file changed
    assert table(work, "--missing") == 0
    assert calls["recipes"] == ["w4.yaml", "kv4.yaml", "w4.yaml"]
    doc = (work / "comparison.md").read_text()
    assert [r[1] for r in model_tables(doc)[str(work / "llama")][1:]] == ["FP32", "RTN W4", "KV4 ‡"]
