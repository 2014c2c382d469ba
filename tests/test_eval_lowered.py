"""tools/eval.py on a lowered ONNX directory (tools/lower.py --backend onnx): scored in onnxruntime on the eval
windows, beside the float model it was lowered from; one-line errors for what it cannot score."""
import json
import pathlib
import shutil

import pytest

import qpass
import qpass.cli
from qpass.cli._common import load_model, load_tokenizer, token_ids
from qpass.eval import compare, perplexity
from tests import toy

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
ROOT = pathlib.Path(__file__).resolve().parent.parent
TEXT = "the cat sat on the mat and the dog sat on the log. " * 6      # ~300 characters = tokens


def qpass_cmd(capsys, *argv):
    code = qpass.cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("qpass eval:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """The toy Llama as a Hugging Face directory, its W8A8 fake-quant model (per-token: no calibration) and that
    model lowered to ONNX, with the source model in qpass.json as tools/lower.py records it
    (tests/test_lower_cli.py checks the recording)."""
    base = tmp_path_factory.mktemp("eval_lowered")
    (base / "text.txt").write_text(TEXT)
    src = toy.save_hf_dir(base / "llama")
    model = load_model(src)
    qm = qpass.apply(model, ROOT / "recipes/w8a8.yaml", progress=False)
    out = base / "w8a8"
    qpass.lower(qm, "onnx", out, tokenizer_dir=src)
    meta = json.loads((out / "qpass.json").read_text())
    (out / "qpass.json").write_text(json.dumps({**meta, "source_model": src}))
    return pathlib.Path(src), out, base / "text.txt", model, qm


def test_scores_the_lowered_model_beside_its_float_model(dirs, capsys, tmp_path):
    src, lowered, text, model, qm = dirs
    js = tmp_path / "rows.json"
    code, out, err = qpass_cmd(capsys, "eval", lowered, "--eval", text, "--window", 32, "--max-eval-tokens", 160,
                               "--no-progress", "--json", js)
    assert code == 0, err
    fp_row, onnx_row = json.loads(js.read_text())["rows"]
    assert fp_row["name"] == "FP32" and onnx_row["name"] == "ONNX w8a8 (onnxruntime)"
    assert f"FP model {src}" in out and "| ONNX w8a8 (onnxruntime) |" in out
    # the fake-quant model on the same windows: the lowered model scores what it scores (int8 rounding aside)
    ids = token_ids(load_tokenizer(str(src), "test"), str(text))[:160]
    fq = compare(model, qm, ids, 32)
    assert onnx_row["perplexity"] == pytest.approx(perplexity(qm, ids, 32).perplexity, rel=1e-3)
    assert onnx_row["kl"] == pytest.approx(fq["kl"], rel=0.05, abs=1e-6) and onnx_row["kl"] > 0
    assert onnx_row["top1_agreement"] == pytest.approx(fq["top1_agreement"], abs=0.02)
    assert fp_row["perplexity"] == pytest.approx(perplexity(model, ids, 32).perplexity, rel=1e-6)
    assert fp_row["kl"] == 0 and fp_row["top1_agreement"] == 1


def test_fp_model_option_and_perplexity_only_without_one(dirs, capsys, tmp_path):
    src, lowered, text, _, _ = dirs
    moved = tmp_path / "moved"
    shutil.copytree(lowered, moved)
    meta = json.loads((moved / "qpass.json").read_text())
    meta["source_model"] = str(tmp_path / "gone")                   # outside the seal (as parity is)
    (moved / "qpass.json").write_text(json.dumps(meta))
    code, out, err = qpass_cmd(capsys, "eval", moved, "--eval", text, "--window", 32, "--max-eval-tokens", 64,
                               "--no-progress")
    assert code == 0, err
    assert "is not there: perplexity only" in err and "| FP32 |" not in out
    row = next(ln for ln in out.splitlines() if ln.startswith("| ONNX moved"))
    assert row.split("|")[3].strip() == "–"                          # no KL without a float model
    code, out, err = qpass_cmd(capsys, "eval", moved, "--fp-model", src, "--eval", text, "--window", 32,
                               "--max-eval-tokens", 64, "--no-progress")
    assert code == 0 and "| FP32 |" in out, err


def test_clear_errors(dirs, capsys, tmp_path):
    src, lowered, text, _, _ = dirs
    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "notes.txt").write_text("x")
    code, _, err = qpass_cmd(capsys, "eval", neither, "--eval", text)
    assert code == 1 and "neither a Hugging Face model directory" in error_line(err)
    with pytest.raises(SystemExit) as e:                             # usage errors: exit 2
        qpass_cmd(capsys, "eval", lowered, "--recipe", ROOT / "recipes/w8a8.yaml", "--eval", text)
    assert e.value.code == 2 and "already quantized" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        qpass_cmd(capsys, "eval", src, "--fp-model", src, "--eval", text)
    assert e.value.code == 2 and "--fp-model goes with a lowered ONNX" in capsys.readouterr().err
    damaged = tmp_path / "damaged"
    shutil.copytree(lowered, damaged)
    (damaged / "model.onnx").write_bytes((damaged / "model.onnx").read_bytes()[:-10])
    code, _, err = qpass_cmd(capsys, "eval", damaged, "--eval", text)
    assert code == 1 and "model.onnx" in error_line(err) and "Traceback" not in err
