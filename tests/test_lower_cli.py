"""tools/lower.py: HF directory in, lowered directory out; atomic output; one-line errors."""
import importlib.util
import json
import os
import pathlib

import pytest

from qpass.cli import lower as lower_cmd
from tests import toy

pytest.importorskip("onnxruntime")
ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("qpass_tool_lower", ROOT / "tools" / "lower.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

TEXT = "the cat sat on the mat and the dog sat on the log. " * 6      # ~300 characters = tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    (d / "calib.txt").write_text(TEXT)
    return toy.save_hf_dir(d / "llama")


def lower(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("lower.py:")]
    assert len(lines) == 1, err
    return lines[0]


def leftovers(parent) -> list[str]:
    return [n for n in os.listdir(parent) if n.startswith(".qpass-")]


@pytest.fixture(scope="module")
def lowered(model_dir, tmp_path_factory):
    """tools/lower.py on the toy Llama: W4A8 (MatMulNBits) + int4 KV cache, calibrated from a text file."""
    out = tmp_path_factory.mktemp("lowered") / "w4a8kv4"
    calib = pathlib.Path(model_dir).parent / "calib.txt"
    with pytest.MonkeyPatch.context() as mp:
        lines = []
        mp.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
        code = cli.main([str(a) for a in (model_dir, "--recipe", ROOT / "recipes/w4a8_kv4.yaml", "--out", out,
                                          "--calib", calib, "--calib-samples", 4, "--seq-len", 32)])
    return code, "\n".join(lines), out


@pytest.mark.slow
def test_cli_lowers_with_calibration_and_prints_report_and_parity(lowered, model_dir):
    code, stdout, out = lowered
    assert code == 0
    for text in ("calibration windows", "W4A8: MatMulNBits", "exporting to ONNX", "parity vs fake-quant"):
        assert text in stdout
    assert {"model.onnx", "config.json", "recipe.yaml", "qpass.json", "tokenizer.json"} <= set(os.listdir(out))
    fig = json.load(open(out / "qpass.json"))["parity"]
    assert fig["max_abs_logit_diff"] < 1e-3 and fig["tokens"] == 32
    assert json.load(open(out / "qpass.json"))["source_model"] == os.path.abspath(model_dir)   # tools/eval.py's FP
    assert not leftovers(out.parent)


@pytest.mark.slow
def test_decoder_follows_optimum_and_generates_like_fake_quant(lowered, model_dir):
    import onnx
    import torch

    import qpass
    from qpass.backends import onnx_qdq

    _, _, out = lowered
    model = onnx.load(out / "model.onnx")
    assert [i.name for i in model.graph.input] == [
        "input_ids", "attention_mask", "position_ids", "past_key_values.0.key", "past_key_values.0.value",
        "past_key_values.1.key", "past_key_values.1.value"]
    assert [o.name for o in model.graph.output] == [
        "logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[3].type.tensor_type.shape.dim]
    assert dims == ["batch_size", 2, "past_sequence_length", 8]
    meta = json.load(open(out / "qpass.json"))
    assert {"torch", "transformers", "onnx", "onnxruntime", "onnxscript"} <= set(meta["versions"])
    assert json.load(open(out / "config.json"))["use_cache"] is True
    qm = qpass.apply(toy.hf_model("llama"), ROOT / "recipes/w4a8_kv4.yaml", progress=False)   # dynamic: no calib
    ids = toy.token_ids(2, 9)
    with torch.no_grad():
        greedy = ids
        for _ in range(8):                     # greedy without a cache, on the fake-quant graph
            greedy = torch.cat([greedy, qm(greedy).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(onnx_qdq.generate(out, ids, 8), greedy)   # incremental: past_key_values -> present


def test_force_replaces_an_existing_output_with_the_torch_backend(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    code, _, err = lower(capsys, model_dir, "--recipe", ROOT / "recipes/w8a8.yaml", "--out", out)
    assert code == 1 and "not empty" in error_line(err) and "--force" in error_line(err)
    code, stdout, _ = lower(capsys, model_dir, "--recipe", ROOT / "recipes/w4a16_g128.yaml", "--out", out,
                            "--backend", "torch", "--torch-kernels", "reference", "--force")
    assert code == 0 and "parity vs fake-quant" in stdout
    assert "model.safetensors" in os.listdir(out) and "old.txt" not in os.listdir(out)
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("case", ["missing_dir", "not_hf", "bad_recipe", "calib_missing", "calib_short"])
def test_clear_one_line_errors(model_dir, tmp_path, capsys, case):
    recipe, model, extra = ROOT / "recipes/w8a8.yaml", model_dir, []
    if case == "missing_dir":
        model, expect = tmp_path / "nope", "does not exist"
    elif case == "not_hf":
        (tmp_path / "plain").mkdir()
        (tmp_path / "plain" / "weights.bin").write_bytes(b"x")
        model, expect = tmp_path / "plain", "not a Hugging Face model directory"
    elif case == "bad_recipe":
        recipe = tmp_path / "r.yaml"
        recipe.write_text("version: 1\npasses:\n  - quantize: {wieghts: {bits: 4}}\n")
        expect = "passes[0].quantize.wieghts"
    elif case == "calib_missing":
        extra, expect = ["--calib", tmp_path / "none.txt"], "does not exist"
    else:
        (tmp_path / "short.txt").write_text("too short")
        extra, expect = ["--calib", tmp_path / "short.txt"], "too short"
    code, _, err = lower(capsys, model, "--recipe", recipe, "--out", tmp_path / "out", *extra)
    assert code == 1 and expect in error_line(err)
    assert not os.path.exists(tmp_path / "out") and not leftovers(tmp_path)


def test_unsupported_op_and_interrupt_leave_no_output(model_dir, tmp_path, capsys, monkeypatch):
    # FP4 activations have no ONNX QDQ form (nf4 / fp4 / fp8 weights do, as grid_matmul)
    fp4 = tmp_path / "fp4a.yaml"
    fp4.write_text("version: 1\npasses:\n  - quantize: {weights: {bits: 4, granularity: per_group, group_size: 16}, "
                   "activations: {format: fp4_e2m1, granularity: per_token, dynamic: true}, ignore: [lm_head]}\n")
    code, _, err = lower(capsys, model_dir, "--recipe", fp4, "--out", tmp_path / "out")
    assert code == 1 and "fp4_e2m1" in error_line(err) and "fix:" in error_line(err)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(lower_cmd, "lower_into", interrupted)
    code, _, err = lower(capsys, model_dir, "--recipe", ROOT / "recipes/w8a8.yaml", "--out", tmp_path / "out")
    assert code == 130 and "interrupted" in error_line(err)
    assert not os.path.exists(tmp_path / "out") and not leftovers(tmp_path)
