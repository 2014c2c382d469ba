"""lm_head quantization (recipes/w4a16_g128_lmhead{8,4}.yaml and a g32 lm_head): both backends lower it with
parity, and a tied lm_head (tie_word_embeddings) quantizes the linear only: the embedding lookup keeps the float
weight, and the ONNX lowering report says the float tensor is stored beside the integer copy.
Also the ONNX MatMulNBits accuracy level: 4 by default, 0 one option away, recorded and reported."""
import json
import pathlib

import pytest
import torch

import qpass
from tests import toy

ROOT = pathlib.Path(__file__).resolve().parent.parent
LMHEAD_G32 = {"version": 1, "passes": [
    {"quantize": {"weights": {"bits": 4, "granularity": "per_group", "group_size": 128, "symmetric": True},
                  "ignore": ["lm_head"]}},
    {"quantize": {"weights": {"bits": 4, "granularity": "per_group", "group_size": 16, "symmetric": True},
                  "targets": ["lm_head"]}}]}
RECIPES = {"lmhead8": ROOT / "recipes" / "w4a16_g128_lmhead8.yaml", "lmhead4": ROOT / "recipes" /
           "w4a16_g128_lmhead4.yaml", "lmhead4_g16": LMHEAD_G32}


def _lm_head_quantized(qm) -> bool:
    return any(s.path == "lm_head" or s.path.endswith(".lm_head") for s in _quantized_sites(qm))


def _quantized_sites(qm):
    from qpass.graph import is_quantizer, linear_sites

    return [s for s in linear_sites(qm.graph_module) if is_quantizer(s.weight_use)]


def _embedding_weight_is_float(qm) -> bool:
    """The embedding op reads the float parameter directly (no quantizer between)."""
    from qpass.graph import is_quantizer

    embeds = [n for n in qm.graph_module.graph.nodes if n.op == "call_function" and "embedding" in str(n.target)]
    assert embeds
    return all(not is_quantizer(n.args[0]) and n.args[0].op in ("get_attr", "placeholder") for n in embeds)


@pytest.fixture(scope="module", params=["llama", "llama_tied"])
def family(request):
    return request.param


@pytest.mark.parametrize("name", list(RECIPES))
def test_lm_head_is_quantized_and_the_embedding_lookup_stays_float(family, name):
    model = toy.hf_model(family)
    qm = qpass.apply(model, RECIPES[name], progress=False)
    assert _lm_head_quantized(qm) and len(_quantized_sites(qm)) == 15        # 2 layers x 7 + lm_head
    assert _embedding_weight_is_float(qm)
    ids = toy.token_ids(2, 9)
    emb = model.get_input_embeddings()
    with torch.no_grad():                              # the tied weight itself is untouched
        assert torch.equal(emb(ids), toy.hf_model(family).get_input_embeddings()(ids))
        assert not torch.equal(qm(ids).logits, model(ids).logits)


@pytest.mark.parametrize("name", ["lmhead8", "lmhead4_g16"])
def test_quantized_lm_head_lowers_to_torch_packed_with_parity(family, name, tmp_path):
    from qpass.backends import torch_packed as tp

    qm = qpass.apply(toy.hf_model(family), RECIPES[name], progress=False)
    pm = qpass.lower(qm, "torch", kernels="exact")
    ids = toy.token_ids(2, 9)
    with torch.no_grad():
        ref = qm(ids).logits
        torch.testing.assert_close(pm(ids).logits, ref, atol=1e-4, rtol=1e-4)
        assert pm.weight_bytes()["linears"] == 15
        pm.save(tmp_path / "p")
        torch.testing.assert_close(tp.load(tmp_path / "p")(ids).logits, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["lmhead8", "lmhead4_g16"])
def test_quantized_lm_head_lowers_to_onnx_with_parity_and_a_tied_weight_is_reported(family, name, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from qpass.backends import onnx_qdq

    qm = qpass.apply(toy.hf_model(family), RECIPES[name], progress=False)
    art = qpass.lower(qm, "onnx", tmp_path / "m", fused_accuracy_level=0)      # exact: parity to float order
    rows = {r.path: r for r in art.report.rows}
    head = next(r for p, r in rows.items() if p.endswith("lm_head"))
    assert head.form.startswith("W8A16" if name == "lmhead8" else "W4A16"), head
    tied = "tied" in head.note
    assert tied == (family == "llama_tied"), head.note
    assert sum("tied" in r.note for r in rows.values()) == int(tied)
    ids = toy.token_ids(1, 9, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(onnx_qdq.logits(onnx_qdq.session(art.path), ids), qm(ids).logits,
                                   atol=1e-4, rtol=1e-4)


def test_onnx_accuracy_level_defaults_to_4_and_is_recorded(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    from qpass.backends import onnx_qdq
    from qpass.backends.onnx_qdq.lower import FUSED_ACCURACY_LEVEL, SESSION_CONFIG_KEY, verify

    assert FUSED_ACCURACY_LEVEL == 4
    qm = qpass.apply(toy.hf_model("llama"), ROOT / "recipes" / "w4a16_g128.yaml", progress=False)
    said = []
    fast = qpass.lower(qm, "onnx", tmp_path / "fast", progress=said.append)
    exact = qpass.lower(qm, "onnx", tmp_path / "exact", fused_accuracy_level=0)
    for art, level in ((fast, 4), (exact, 0)):
        meta = json.load(open(pathlib.Path(art.path) / "qpass.json"))
        assert meta["options"]["fused_accuracy_level"] == level
        assert meta["session_config"] == {"session.qdq_matmulnbits_accuracy_level": str(level)}
        props = {p.key: p.value for p in onnx.load(art.model_path, load_external_data=False).metadata_props}
        assert json.loads(props[SESSION_CONFIG_KEY]) == meta["session_config"]
        verify(art.path)                                       # still sealed
    assert any("accuracy level 4" in s and "--accuracy-level 0" in s for s in said), said
    ids = toy.token_ids(1, 9, seed=4)
    with torch.no_grad():
        ref = qm(ids).logits
        got0 = onnx_qdq.logits(onnx_qdq.session(exact.path), ids)
        got4 = onnx_qdq.logits(onnx_qdq.session(fast.path), ids)
    torch.testing.assert_close(got0, ref, atol=1e-4, rtol=1e-4)
    assert float((got4 - ref).abs().max()) < 0.05 * float(ref.abs().max())      # int8 activations: close
    with pytest.raises(qpass.UnsupportedOpError, match="fused_accuracy_level"):
        qpass.lower(qm, "onnx", tmp_path / "bad", fused_accuracy_level=7)


def test_lower_cli_accuracy_level_option(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import importlib.util

    spec = importlib.util.spec_from_file_location("qpass_tool_lower_lmh", ROOT / "tools" / "lower.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    src = toy.save_hf_dir(tmp_path / "llama")
    code = cli.main([src, "--recipe", str(ROOT / "recipes" / "w4a16_g128.yaml"), "--out", str(tmp_path / "o"),
                     "--accuracy-level", "0", "--attention", "torch"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "MatMulNBits accuracy level 0" in out and "--accuracy-level 4" in out
    assert "attention over grouped K/V heads" not in out          # --attention torch: torch.onnx's translation
    meta = json.load(open(tmp_path / "o" / "qpass.json"))
    assert meta["options"]["fused_accuracy_level"] == 0 and meta["parity"]["max_abs_logit_diff"] < 1e-3
    assert meta["options"]["attention"] == "torch"
    with pytest.raises(SystemExit) as e:
        cli.main([src, "--recipe", str(ROOT / "recipes" / "w4a16_g128.yaml"), "--out", str(tmp_path / "t"),
                  "--backend", "torch", "--accuracy-level", "0"])
    assert e.value.code == 2 and "--accuracy-level is an onnx backend option" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main([src, "--recipe", str(ROOT / "recipes" / "w4a16_g128.yaml"), "--out", str(tmp_path / "t"),
                  "--backend", "torch", "--attention", "grouped"])
    assert e.value.code == 2 and "--attention is an onnx backend option" in capsys.readouterr().err
