"""The quip pass (incoherence processing: two-sided randomized Hadamards per linear, online on input and output):
the float function is kept, incoherence drops on a weight with outliers, plans re-apply, it lowers to both
backends, and gptq after it is LDLQ on the transformed Hessian."""
import pytest
import torch

import qpass
from qpass import Recipe
from qpass.errors import QpassError
from qpass.graph import linear_sites
from qpass.passes.quip import QuipConfig, incoherence
from qpass.primitives import hadamard as H
from tests import toy
from tests.test_rotate import _fresh

W4G = {"bits": 4, "granularity": "per_group", "group_size": 16, "symmetric": True}


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "phi3", "gpt_neox"])
def test_quip_keeps_outputs(family):
    gm, ids, ref = _fresh(family)
    res = qpass.apply(gm, Recipe([QuipConfig(seed=1)]))
    torch.testing.assert_close(res(ids).logits, ref, rtol=1e-4, atol=1e-4)
    n = res.report["quip"].stats["linears"]
    assert n == len(linear_sites(res.graph_module)) - 1                 # all but lm_head
    hads = [x for x in res.graph_module.graph.nodes if x.op == "call_function" and x.target is H.HADAMARD]
    assert len(hads) == 2 * n


def test_incoherence_drops_on_a_weight_with_outliers():
    gm, ids, ref = _fresh("llama")
    with torch.no_grad():
        w = next(p for k, p in gm.named_parameters() if k.endswith("layers.0.mlp.down_proj.weight"))
        w[3, 5] = 40 * w.abs().max()
    before = incoherence(w)
    res = qpass.apply(gm, Recipe([QuipConfig(seed=0, targets=("model.layers.0.mlp.down_proj",), ignore=())]))
    after = incoherence(dict(res.graph_module.named_parameters())["model.model.layers.0.mlp.down_proj.weight"])
    assert after < before / 3


def test_plan_reapplies_and_lowers_to_both_backends(tmp_path):
    rec = {"passes": [{"quip": {"seed": 2}}, {"quantize": {"weights": W4G, "ignore": ["lm_head"]}}, {"gptq": {}}]}
    calib = [toy.token_ids(seed=s) for s in range(3)]
    qm = qpass.apply(toy.hf_model("llama"), rec, calib_data=calib, progress=False)
    assert qm.report["gptq"].stats                                       # LDLQ = GPTQ on the rotated inputs
    qm.save(tmp_path / "m")
    ids = toy.token_ids(batch=2, t=9, seed=4)
    assert torch.equal(qpass.load(tmp_path / "m")(ids).logits, qm(ids).logits)
    pm = qpass.lower(qm, "torch", kernels="exact")
    torch.testing.assert_close(pm(ids).logits, qm(ids).logits, rtol=1e-4, atol=1e-4)
    pytest.importorskip("onnxruntime")
    from qpass.backends import onnx_qdq

    qpass.lower(qm, "onnx", tmp_path / "o", accuracy_level=0)
    got = onnx_qdq.logits(onnx_qdq.session(str(tmp_path / "o")), ids[:1])
    torch.testing.assert_close(got.float(), qm(ids[:1]).logits.float(), rtol=0, atol=5e-3)


def test_quip_after_quantize_is_refused():
    gm, _, _ = _fresh("llama")
    with pytest.raises(QpassError, match="(?s)already quantized.*before quantize"):
        qpass.apply(gm, {"passes": [{"quantize": {"weights": W4G, "ignore": ["lm_head"]}}, {"quip": {}}]},
                    progress=False)
