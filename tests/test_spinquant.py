"""spinquant: the residual stream's rotation learned by Cayley SGD on the quantized network (SpinQuant's R1)."""
import copy

import pytest
import torch
from torch.nn import functional as F

import qpass
from qpass.errors import QpassError
from qpass.graph import is_quantizer
from qpass.passes.spinquant import SpinQuantConfig
from qpass.quantizer import Quantizer
from qpass.rotation import residual_stream_rotation
from tests import toy

W4 = {"bits": 4, "granularity": "per_channel", "symmetric": True}
A4 = {"bits": 4, "granularity": "per_token", "dynamic": True}
W8 = {"bits": 8, "granularity": "per_channel", "symmetric": True}
A8 = {"bits": 8, "granularity": "per_token", "dynamic": True}
KV4 = {"keys": {"bits": 4, "granularity": "per_head", "dynamic": True},
       "values": {"bits": 4, "granularity": "per_head", "dynamic": True}}
KV8 = {"keys": {"bits": 8, "granularity": "per_head", "dynamic": True},
       "values": {"bits": 8, "granularity": "per_head", "dynamic": True}}
CALIB = [toy.token_ids(batch=1, t=12, seed=s) for s in range(4)]


def _recipe(spin: dict, w=W4, a=A4, kv=KV4, online=True):
    return {"passes": [{"rotate": {"seed": 1, "online": online, "heads": online}},
                       {"quantize": {"weights": w, "activations": a, "ignore": ["lm_head"]}}, {"kv_cache": kv},
                       {"spinquant": spin}]}


def _model(family):
    """A toy with an outlier channel in the residual stream (as trained LMs have), so quantization costs loss, and
    non-trivial norm weights and biases (HF initialises 1 and 0), which rotate folds."""
    model = toy.hf_model(family)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 3] *= 30
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def _float(gm):
    """A copy of `gm` with every quantizer the identity (its users read its input)."""
    gm = copy.deepcopy(gm)
    for n in [n for n in gm.graph.nodes if is_quantizer(n)]:
        n.replace_all_uses_with(Quantizer(n).x)
        gm.graph.erase_node(n)
    gm.recompile()
    return gm


def _calib_loss(gm, samples=CALIB):
    with torch.no_grad():
        losses = [F.cross_entropy(gm(x).logits[0, :-1], x[0, 1:]) for x in samples]
    return float(sum(losses) / len(losses))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_learns_an_orthogonal_rotation_that_lowers_the_loss_and_keeps_the_float_function(family):
    model = _model(family)
    ids = toy.token_ids(batch=2, t=9, seed=5)
    ref = model(ids).logits
    qm = qpass.apply(model, _recipe({"steps": 20, "batch_size": 4, "weights": "live"}), calib_data=CALIB,
                     progress=False)
    st = qm.report["spinquant"].stats
    assert st["orthogonality_error"] < 1e-5 and st["distance_from_start"] > 1e-3
    assert st["r2_learned"] == 2 and st["r2_distance_from_start"] > 1e-4          # one R2 per attention
    assert not qm.report["spinquant"].near_misses
    assert st["mean_preserving"] == (family == "opt")
    assert st["params_rotated"] >= 8 and st["weight_quantizers_rescaled"] == (12 if family == "opt" else 14)
    assert st["calib_loss_end"] < st["calib_loss_start"]                          # the training loss went down
    # the baked graph is the graph the last loss was computed on (U multiplied in, weight scales chosen again)
    assert _calib_loss(qm.graph_module) == pytest.approx(st["calib_loss_end"], rel=1e-5)
    # with the quantizers removed it computes the float model's function
    torch.testing.assert_close(_float(qm.graph_module)(ids).logits, ref, rtol=1e-4, atol=1e-4)
    # and it differs from rotate's graph only by the learned rotation: same nodes
    base = qpass.apply(model, {"passes": _recipe({})["passes"][:3]}, calib_data=CALIB, progress=False)
    assert [n.format_node() for n in base.graph_module.graph.nodes] == \
        [n.format_node() for n in qm.graph_module.graph.nodes]
    assert _calib_loss(base.graph_module) == pytest.approx(st["calib_loss_start"], rel=1e-5)


def test_float_weights_while_learning_then_gptq_and_the_run_is_deterministic():
    model = _model("llama")
    rec = _recipe({"steps": 6, "batch_size": 2, "weights": "float", "seed": 3})
    rec["passes"].append({"gptq": {}})
    a = qpass.apply(model, rec, calib_data=CALIB, progress=False)
    b = qpass.apply(model, rec, calib_data=CALIB, progress=False)
    sa, sb = a.graph_module.state_dict(), b.graph_module.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    st = a.report["spinquant"].stats
    assert st["steps"] == 6 and st["orthogonality_error"] < 1e-5
    plan = next(p for p in a.plans if p.pass_name == "spinquant")
    assert plan.decisions["weights"] == "float" and not plan.structural
    other = qpass.apply(model, {"passes": rec["passes"][:3] + [{"spinquant": {"steps": 6, "batch_size": 2,
                                                                              "weights": "float", "seed": 4}}]},
                        calib_data=CALIB, progress=False)
    assert other.report["spinquant"].stats["loss_by_tenth"] != st["loss_by_tenth"]        # another sample order


def test_without_online_hadamards_and_without_r2():
    """R2 where o_proj has no online Hadamard (residual-only rotate) keeps the float function; r2: false learns R1
    only."""
    model = _model("opt")
    ids = toy.token_ids(batch=2, t=9, seed=5)
    ref = model(ids).logits
    qm = qpass.apply(model, _recipe({"steps": 5, "batch_size": 2}, online=False), calib_data=CALIB, progress=False)
    assert qm.report["spinquant"].stats["r2_learned"] == 2
    torch.testing.assert_close(_float(qm.graph_module)(ids).logits, ref, rtol=1e-4, atol=1e-4)
    qm = qpass.apply(model, _recipe({"steps": 5, "batch_size": 2, "r2": False}), calib_data=CALIB, progress=False)
    assert qm.report["spinquant"].stats["r2_learned"] == 0 and qm.plans[-1].decisions["r2"] == []


def test_zero_steps_keeps_rotate_s_graph():
    model = _model("opt")
    ids = toy.token_ids(batch=1, t=9, seed=2)
    base = qpass.apply(model, {"passes": _recipe({})["passes"][:3]}, progress=False)
    qm = qpass.apply(model, _recipe({"steps": 0}), calib_data=CALIB, progress=False)
    torch.testing.assert_close(qm(ids).logits, base(ids).logits, rtol=0, atol=1e-5)
    assert qm.report["spinquant"].stats["distance_from_start"] == 0


def test_saves_loads_and_lowers_to_torch_and_onnx_with_parity(tmp_path):
    qm = qpass.apply(_model("llama"), _recipe({"steps": 4, "batch_size": 2}, w=W8, a=A8, kv=KV8), calib_data=CALIB,
                     progress=False)
    ids = toy.token_ids(batch=2, t=12, seed=5)
    qm.save(tmp_path / "saved")
    assert torch.equal(qpass.load(tmp_path / "saved")(ids).logits, qm(ids).logits)
    pm = qpass.lower(qm, "torch", kernels="exact")
    torch.testing.assert_close(pm(ids).logits, qm(ids).logits, rtol=1e-5, atol=1e-5)
    prompt = toy.token_ids(1, 5)
    assert torch.equal(pm.generate(prompt, max_new_tokens=4), qm.generate(prompt, max_new_tokens=4))
    pytest.importorskip("onnxruntime")
    import onnx

    from qpass.backends import onnx_qdq

    qpass.lower(qm, "onnx", tmp_path / "m")
    one = toy.token_ids(batch=1, t=9, seed=4)
    got = onnx_qdq.logits(onnx_qdq.session(str(tmp_path / "m")), one)
    torch.testing.assert_close(got.float(), qm(one).logits.float(), rtol=0, atol=5e-3)
    model = onnx.load(str(tmp_path / "m" / "model.onnx"), load_external_data=False)
    assert not [n for n in model.graph.node if n.domain not in ("", "com.microsoft")]


def test_the_stream_is_found_through_activation_quantizers():
    qm = qpass.apply(_model("llama"), {"passes": _recipe({})["passes"][:3]}, progress=False)
    assert isinstance(residual_stream_rotation(qm.graph_module), str)          # the plain walk stops at them
    stream = residual_stream_rotation(qm.graph_module, through_quantizers=True)
    assert len(stream.readers) == 11 and len(stream.writers) == 4


# ------------------------------------------------------------------------------------------ refusals


def test_refusals_say_what_and_how_to_fix():
    model = _model("llama")
    with pytest.raises(QpassError, match="calibration data"):
        qpass.apply(model, _recipe({"steps": 1}), progress=False)
    quant = {"quantize": {"weights": W4, "activations": A4, "ignore": ["lm_head"]}}
    with pytest.raises(QpassError, match="rotate") as e:                  # no rotate: norms not folded
        qpass.apply(model, {"passes": [quant, {"spinquant": {"steps": 1}}]}, calib_data=CALIB, progress=False)
    assert "before quantize" in str(e.value)
    with pytest.raises(QpassError, match="no quantizer"):
        qpass.apply(model, {"passes": [{"rotate": {}}, {"spinquant": {"steps": 1}}]}, calib_data=CALIB,
                    progress=False)
    clip = {**W4, "granularity": "per_group", "group_size": 16}
    with pytest.raises(QpassError, match="before gptq"):                   # gptq changed the scales first
        qpass.apply(model, {"passes": [{"rotate": {}}, {"quantize": {"weights": clip, "ignore": ["lm_head"]}},
                                       {"gptq": {"clip": True}}, {"spinquant": {"steps": 1}}]},
                    calib_data=CALIB, progress=False)
    with pytest.raises(QpassError, match="token ids"):
        qpass.apply(model, _recipe({"steps": 1}), calib_data=[toy.token_ids(batch=1, t=1)], progress=False)
    for bad in ({"lr": 0}, {"steps": -1}, {"batch_size": 0}, {"weights": "int4"}):
        with pytest.raises(QpassError):
            SpinQuantConfig(**bad)
