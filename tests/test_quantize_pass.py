import pytest
import torch
from torch import nn

import qpass
from qpass import IntFormat, PerChannel, PerGroup, PerTensor, PerToken, QSpec, Recipe
from qpass.graph import META_QUANT, linear_sites, op_counts
from qpass.passes import ObserverConfig, QuantizeConfig
from qpass.primitives import choose_qparams
from qpass.primitives import quant as Q
from tests import toy

FQ = "qpass.fake_quantize.default"
FQD = "qpass.fake_quantize_dynamic.default"
W8 = QSpec(IntFormat(8), PerChannel(0))
A8 = QSpec(IntFormat(8), PerToken(), dynamic=True)


def w8a8(**kw):
    return Recipe([QuantizeConfig(weights=W8, activations=A8, **kw)])


def test_fires_on_mlp_with_one_quantizer_per_weight_and_input():
    m, x = toy.TinyMLP(), toy.mlp_input()
    gm = qpass.capture(m, (x,))
    qm = qpass.apply(gm, w8a8())
    counts = op_counts(qm.graph_module)
    assert counts[FQ] == 2 and counts[FQD] == 2
    assert qm.report["quantize"].stats == {"linears": 2, "weights_quantized": 2, "inputs_quantized": 2,
                                           "skipped": 0}
    for site in linear_sites(qm.graph_module):
        assert str(site.node.args[1].target) == FQ                 # weight goes through its quantizer
        assert str(site.node.args[0].target) == FQD                # and so does the input
        assert site.node.args[0].meta[META_QUANT]["role"] == "input"


def test_decoder_layer_gets_a_quantizer_per_consumer():
    gm = qpass.capture(toy.TinyDecoderLayer(), (toy.seq_input(),))
    before = op_counts(gm)
    qm = qpass.apply(gm, w8a8())
    counts = op_counts(qm.graph_module)
    assert counts[FQ] == 7 and counts[FQD] == 7          # q/k/v share an input but each has its own quantizer
    assert counts["aten.linear.default"] == before["aten.linear.default"]


def test_nothing_to_match_leaves_the_graph_alone():
    class NoLinear(nn.Module):
        def forward(self, x):
            return torch.relu(x) + 1

    gm = qpass.capture(NoLinear(), (toy.mlp_input(),))
    code = gm.code
    qm = qpass.apply(gm, w8a8())
    assert qm.report["quantize"].stats["linears"] == 0
    assert qm.report["quantize"].nodes_added == 0
    assert qm.graph_module.code == code


def test_no_quantizers_configured_is_a_no_op():
    gm = qpass.capture(toy.TinyMLP(), (toy.mlp_input(),))
    qm = qpass.apply(gm, Recipe([QuantizeConfig(weights=None, activations=None)]))
    assert FQ not in op_counts(qm.graph_module)
    x = toy.mlp_input(batch=5)
    torch.testing.assert_close(qm(x), gm(x), rtol=0, atol=0)


def test_weight_quantizer_equals_the_primitive():
    m, x = toy.TinyMLP(), toy.mlp_input()
    qm = qpass.apply(qpass.capture(m, (x,)), Recipe([QuantizeConfig(weights=QSpec(IntFormat(4), PerGroup(8)))]))
    w = m.fc1.weight.detach()
    scale, zp = choose_qparams(w, QSpec(IntFormat(4), PerGroup(8)))
    w_hat = Q.fake_quantize(w, scale, zp, (1, 8), "int4")
    h = torch.relu(torch.nn.functional.linear(x, w_hat, m.fc1.bias))
    w2 = m.fc2.weight.detach()
    s2, z2 = choose_qparams(w2, QSpec(IntFormat(4), PerGroup(8)))
    ref = torch.nn.functional.linear(h, Q.fake_quantize(w2, s2, z2, (1, 8), "int4"), m.fc2.bias)
    torch.testing.assert_close(qm(x), ref, rtol=0, atol=1e-6)


def test_gpt2_conv1d_groups_run_along_the_input_features():
    model = toy.hf_model("gpt2")
    spec = QSpec(IntFormat(4), PerGroup(8))
    qm = qpass.apply(model, Recipe([QuantizeConfig(weights=spec, targets=("transformer.h.0.attn.c_attn",))]))
    (fq,) = [n for n in qm.graph_module.graph.nodes if str(n.target) == FQ]
    w = model.transformer.h[0].attn.c_attn.weight.detach()      # [in=32, out=96]
    assert list(fq.args[3]) == [8, 1]                           # groups of 8 along dim 0 (input features)
    scale = qm.graph_module.get_buffer(fq.args[1].target)
    assert scale.shape == (4, 96)
    ref_scale, _ = choose_qparams(w.t().contiguous(), spec)    # canonical [out, in] layout
    torch.testing.assert_close(scale, ref_scale.t())


def test_partial_last_group_is_supported():
    model = toy.hf_model("llama")          # intermediate 44: down_proj groups of 32 leave a group of 12
    qm = qpass.apply(model, Recipe([QuantizeConfig(weights=QSpec(IntFormat(4), PerGroup(32)))]))
    ids = toy.token_ids()
    assert torch.isfinite(qm(ids).logits).all()
    fq = next(n for n in qm.graph_module.graph.nodes
              if str(n.target) == FQ and n.meta[META_QUANT]["path"] == "model.layers.0.mlp.down_proj")
    assert qm.graph_module.get_buffer(fq.args[1].target).shape == (32, 2)


def test_ignore_and_targets_select_by_module_path():
    model = toy.hf_model("llama")
    qm = qpass.apply(model, w8a8(ignore=("lm_head",)))
    paths = {n.meta[META_QUANT]["path"] for n in qm.graph_module.graph.nodes if META_QUANT in n.meta}
    assert "lm_head" not in paths and "model.layers.1.mlp.up_proj" in paths
    assert qm.report["quantize"].stats["skipped"] == 1
    assert any("lm_head" in m for m in qm.report["quantize"].near_misses)
    qm = qpass.apply(model, w8a8(targets=("model.layers.0.*",)))
    assert qm.report["quantize"].stats["linears"] == 7


def test_glob_that_matches_nothing_is_an_error_with_suggestions():
    with pytest.raises(qpass.TargetNotFoundError, match=r"quantize\.ignore\[0\].*did you mean 'lm_head'"):
        qpass.apply(toy.hf_model("llama"), w8a8(ignore=("lm_haed",)))


def test_static_activations_need_calibration_data():
    rec = Recipe([QuantizeConfig(weights=W8, activations=QSpec(IntFormat(8), PerTensor()))])
    with pytest.raises(qpass.CalibrationError, match="calib_data"):
        qpass.apply(toy.hf_model("llama"), rec)


@pytest.mark.parametrize("kind", ["minmax", "moving_average", "percentile", "mse"])
def test_static_activations_from_observers(kind):
    model = toy.hf_model("llama")
    rec = Recipe([QuantizeConfig(weights=W8, activations=QSpec(IntFormat(8), PerTensor()),
                                 observer=ObserverConfig(kind=kind))])
    calib = [toy.token_ids(seed=s) for s in range(4)]
    qm = qpass.apply(model, rec, calib_data=calib)
    gm = qm.graph_module
    assert not [n for n in gm.graph.nodes if "_qpass_tap" in str(n.target)]     # calibration taps are gone
    assert not [name for name, _ in gm.named_children() if name.startswith("_qpass_tap")]
    scales = [gm.get_buffer(n.args[1].target) for n in gm.graph.nodes
              if str(n.target) == FQ and n.meta[META_QUANT]["role"] == "input"]
    assert len(scales) == 15 and all(s.numel() == 1 and float(s) > 0 for s in scales)
    ids = toy.token_ids(batch=3, t=9, seed=11)
    ref, out = model(ids).logits, qm(ids).logits
    assert (out - ref).abs().mean() / ref.abs().mean() < 0.1


def test_minmax_static_scale_matches_the_calibration_absmax():
    m, x = toy.TinyMLP(), toy.mlp_input(batch=6)
    rec = Recipe([QuantizeConfig(weights=None, activations=QSpec(IntFormat(8), PerTensor()))])
    qm = qpass.apply(qpass.capture(m, (x,)), rec, calib_data=[(x[:3],), (x[3:],)])
    first = next(n for n in qm.graph_module.graph.nodes if str(n.target) == FQ)
    scale = qm.graph_module.get_buffer(first.args[1].target)
    torch.testing.assert_close(scale.flatten(), (x.abs().max() / 127).reshape(1))


def test_stacked_quantize_passes_see_through_quantizers_and_refuse_doubles():
    model = toy.hf_model("llama")
    qm = qpass.apply(model, Recipe([QuantizeConfig(weights=W8), QuantizeConfig(weights=None, activations=A8)]))
    counts = op_counts(qm.graph_module)
    assert counts[FQ] == 15 and counts[FQD] == 15
    with pytest.raises(qpass.QuantizationError, match=r"(?s)weights of node .*already quantized.*fix: set weights: null"):
        qpass.apply(model, Recipe([QuantizeConfig(weights=W8), QuantizeConfig(weights=W8)]))


# -- double quantization of the weight scales (QLoRA)

NF4_DQ = {"quantize": {"weights": {"format": "nf4", "granularity": "per_group", "group_size": 16},
                       "ignore": ["lm_head"], "double_quant": {"format": "int8", "block": 256}}}


def test_double_quant_quantizes_the_scales_saves_loads_and_lowers_to_torch(tmp_path):
    import qpass
    from qpass.eval import weight_bytes
    from qpass.quantizer import quantizers
    from tests import toy

    model = toy.hf_model("llama")
    qm = qpass.apply(model, {"passes": [NF4_DQ]}, progress=False)
    plain = qpass.apply(model, {"passes": [{"quantize": {k: v for k, v in NF4_DQ["quantize"].items()
                                                         if k != "double_quant"}}]}, progress=False)
    qs = quantizers(qm.graph_module, role="weight")
    assert qs and all(q.side_channels.names == ("scale_q",) and q.side_channels.scale_q.fmt == "int8" for q in qs)
    gm = qm.graph_module
    for q in qs:   # the effective scales are on the int8 grid of their second-level scales
        s = gm.get_buffer(q.scale.target)
        s2 = gm.get_buffer(q.side_channels.scale_q.scale.target)
        rows, cols = q.side_channels.scale_q.block
        eff = torch.ops.qpass.fake_quantize(s, s2, None, [rows, cols], "int8")
        assert torch.allclose(eff / s2.repeat_interleave(rows, 0)[: s.shape[0]].repeat_interleave(cols, 1)[:, : s.shape[1]],
                              (eff / s2.repeat_interleave(rows, 0)[: s.shape[0]].repeat_interleave(cols, 1)[:, : s.shape[1]]).round(),
                              atol=1e-4)
    assert weight_bytes(gm)["quantized_bits_per_weight"] < weight_bytes(plain.graph_module)["quantized_bits_per_weight"]
    ids = toy.token_ids(2, 9, seed=4)
    ref = model(ids).logits
    assert (qm(ids).logits - ref).abs().max() < 3 * (plain(ids).logits - ref).abs().max()   # scales barely move
    qm.save(tmp_path / "m")
    assert torch.equal(qpass.load(tmp_path / "m")(ids).logits, qm(ids).logits)
    torch.testing.assert_close(qpass.lower(qm, "torch", kernels="exact")(ids).logits, qm(ids).logits,
                               atol=1e-5, rtol=1e-5)


def test_double_quant_errors_and_the_onnx_refusal(tmp_path):
    import qpass
    from tests import toy

    with pytest.raises(qpass.RecipeError, match=r"double_quant\.format"):
        qpass.Recipe.from_dict({"passes": [{"quantize": {"double_quant": {"format": "nf4"}}}]})
    with pytest.raises(qpass.RecipeError, match=r"double_quant"):
        qpass.Recipe.from_dict({"passes": [{"quantize": {"weights": {"bits": 8, "granularity": "per_tensor"},
                                                         "double_quant": {}}}]})
    pytest.importorskip("onnxruntime")
    qm = qpass.apply(toy.hf_model("llama"), {"passes": [NF4_DQ]}, progress=False)
    with pytest.raises(qpass.UnsupportedOpError, match="scale_q|nf4"):
        qpass.lower(qm, "onnx", tmp_path / "onnx")
