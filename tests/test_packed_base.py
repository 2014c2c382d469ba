"""qpass.qat.packed_base: frozen quantized weights held as codes while adapters or scales train."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qpass
from qpass.passes.lora import adapter_parameters
from qpass.primitives.formats import quantize_ext
from qpass.qat.packed_base import PackedBase, pack_nibbles, unpack_nibbles
from qpass.quantizer import quantizers
from tests import toy

NF4_DQ = {"quantize": {"weights": {"format": "nf4", "granularity": "per_group", "group_size": 16},
                       "double_quant": {"format": "int8", "block": 4}, "ignore": ["lm_head"]}}
INT4_ASYM = {"quantize": {"weights": {"bits": 4, "granularity": "per_channel", "symmetric": False},
                          "ignore": ["lm_head"]}}
INT4_SYM = {"quantize": {"weights": {"bits": 4, "granularity": "per_group", "group_size": 16},
                         "ignore": ["lm_head"]}}
W8A8 = {"quantize": {"weights": {"bits": 8, "granularity": "per_channel"},
                     "activations": {"bits": 8, "granularity": "per_token", "dynamic": True}, "ignore": ["lm_head"]}}


@pytest.fixture(scope="module")
def model():
    return toy.hf_model("llama")


def _frozen(qm):
    for p in qm.graph_module.parameters():
        p.requires_grad_(False)
    return qm


@given(st.lists(st.integers(0, 15), min_size=1, max_size=41), st.booleans())
@settings(max_examples=60, deadline=None)
def test_nibbles_round_trip(values, signed):
    codes = torch.tensor(values, dtype=torch.uint8)
    if signed:
        codes = (codes.to(torch.int16) - 8).to(torch.int8)
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (len(values) + 1) // 2
    assert torch.equal(unpack_nibbles(packed, codes.shape, codes.dtype), codes)


@pytest.mark.parametrize("recipe", [NF4_DQ, INT4_ASYM, INT4_SYM, W8A8], ids=["nf4_dq", "int4_asym", "int4_g16",
                                                                            "w8a8"])
def test_codes_compute_what_the_fake_quantized_weights_compute_bit_for_bit(model, recipe):
    qm = _frozen(qpass.apply(model, {"passes": [recipe]}, progress=False))
    ids = toy.token_ids(2, 11, seed=3)
    ref = qm(ids).logits
    n = len(quantizers(qm.graph_module, role="weight"))
    with PackedBase(qm.graph_module, []) as pb:
        inside = qm(ids).logits
        assert len(pb.packed) == n and not pb.skipped
        assert all(qm.graph_module.get_parameter(t).numel() == 0 for t in pb.packed)     # the float weight is gone
        bits = 8 if recipe is W8A8 else 4
        assert pb.bytes_after == pytest.approx(pb.bytes_before * bits / 32, rel=0.01)
    assert torch.equal(inside, ref)
    assert torch.equal(qm(ids).logits, ref)                        # restored: the graph computes the same
    before = {t: qm.graph_module.get_parameter(t).clone() for t in pb.packed}
    with PackedBase(qm.graph_module, []):                          # the weights sit on their grid: a second
        pass                                                       # round trip gives them back bit for bit
    assert all(torch.equal(qm.graph_module.get_parameter(t), w) for t, w in before.items())


def test_nothing_is_packed_when_the_weights_train_or_when_disabled(model):
    qm = qpass.apply(model, {"passes": [INT4_SYM]}, progress=False)
    gm = qm.graph_module
    params = [gm.get_parameter(q.x.target) for q in quantizers(gm, role="weight")]
    for p in gm.parameters():
        p.requires_grad_(False)
    with PackedBase(gm, params) as pb:
        assert not pb.packed and set(pb.skipped.values()) == {"it trains"}
    with PackedBase(gm, [], enabled=False) as pb:
        assert not pb.packed and not pb.skipped
    assert all(p.numel() > 0 for p in params)


def test_adapter_gradients_are_unchanged_and_no_decoded_weight_is_kept_for_backward(model):
    qm = qpass.apply(model, {"passes": [NF4_DQ, {"lora": {"rank": 4, "seed": 2}}]}, progress=False)
    gm = qm.graph_module
    adapters = adapter_parameters(gm)
    with torch.no_grad():
        for p in adapters:
            p.add_(0.05 * torch.randn_like(p))
    for p in gm.parameters():
        p.requires_grad_(False)
    for p in adapters:
        p.requires_grad_(True)
    ids = toy.token_ids(2, 11, seed=5)

    def grads():
        for p in adapters:
            p.grad = None
        qm(ids).logits.square().mean().backward()
        return [p.grad.clone() for p in adapters]

    ref = grads()
    with PackedBase(gm, adapters) as pb:
        got = grads()
        assert pb.refs_saved >= len(pb.packed) // 2       # linears whose input needs a gradient saved a reference
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_peqa_trains_the_scales_with_the_integer_codes_frozen(model):
    qm = qpass.apply(model, {"passes": [INT4_ASYM, {"qat": {"samples": 8, "seq_len": 12, "steps": 3, "batch_size": 4,
                                                             "lr": 1e-2, "cache_dir": None, "trainable": "scales",
                                                             "held_out": 0, "keep_best": False}}]}, progress=False)
    start = _frozen(qpass.apply(model, {"passes": [INT4_ASYM]}, progress=False))
    assert qm.report["qat"].stats["base"] == "packed"
    moved = 0
    for q, q0 in zip(quantizers(qm.graph_module, role="weight"), quantizers(start.graph_module, role="weight")):
        g, g0 = qm.graph_module, start.graph_module
        s, s0 = g.get_parameter(q.scale.target), g0.get_buffer(q0.scale.target)
        moved += not torch.equal(s, s0)
        args = lambda gm_, q_: (gm_.get_buffer(q_.zero_point.target), list(q_.block), q_.fmt_name)
        codes = quantize_ext(g.get_parameter(q.x.target).detach(), s.detach(), *args(g, q))
        codes0 = quantize_ext(g0.get_parameter(q0.x.target), s0, *args(g0, q0))
        assert torch.equal(codes, codes0)                  # PEQA: W = s (W_int - z) with W_int fixed
    assert moved > 0


def test_base_float_keeps_the_float_weights(model):
    qat = {"qat": {"samples": 8, "seq_len": 12, "steps": 2, "batch_size": 4, "lr": 1e-3, "cache_dir": None,
                   "trainable": "lora", "held_out": 0, "base": "float"}}
    qm = qpass.apply(model, {"passes": [INT4_SYM, {"lora": {"rank": 2}}, qat]}, progress=False)
    start = qpass.apply(model, {"passes": [INT4_SYM]}, progress=False)
    assert qm.report["qat"].stats["base"] == "float"
    for q in quantizers(start.graph_module, role="weight"):
        assert torch.equal(qm.graph_module.get_parameter(q.x.target), start.graph_module.get_parameter(q.x.target))
