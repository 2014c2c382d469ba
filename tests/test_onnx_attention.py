"""ONNX attention over grouped K/V heads (LowerOptions.attention "grouped"): qpass.patterns.repeated_kv with
symbolic sizes, group_attention on a captured decoder step, and translations.sdpa against torch's own
scaled_dot_product_attention in onnxruntime (GQA, masks of every layout, the fully masked row, fallbacks)."""
import collections
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qpass import patterns as P
from qpass.errors import UnsupportedOpError
from tests import toy

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from qpass.backends.onnx_qdq import capture, patterns, translations  # noqa: E402

SDPA = torch.ops.aten.scaled_dot_product_attention.default


class Attend(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw
        self.eval()

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.kw)


def export(mod, args, path, table):
    dyn = torch.export.Dim.DYNAMIC                  # the key length; the query length stays fixed
    shapes = [{}, {2: dyn}, {2: dyn}] + ([{args[3].dim() - 1: dyn}] if len(args) == 4 else [])
    torch.onnx.export(mod, args, path, dynamo=True, dynamic_shapes=shapes, custom_translation_table=table,
                      opset_version=21, optimize=True, verbose=False)
    return onnx.load(path)


def run(path, args):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return torch.from_numpy(sess.run(None, {n: a.numpy() for n, a in zip(names, args)})[0])


def qkv(hq=8, hk=2, lq=3, lk=7, e=16, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, hq, lq, e, generator=g), torch.randn(batch, hk, lk, e, generator=g),
            torch.randn(batch, hk, lk, e, generator=g))


def bool_mask(shape, seed=1, blocked_row=True):
    m = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.3
    m[..., 0] = True
    if blocked_row:
        m[(0,) * (m.dim() - 2) + (1,)] = False         # one query row that sees nothing (left padding)
    return m


CASES = {
    "gqa_bool_mask": (dict(enable_gqa=True), lambda q, k: bool_mask((q.shape[0], 1, q.shape[2], k.shape[2]))),
    "gqa_float_mask_per_head": (dict(enable_gqa=True),
                                lambda q, k: torch.randn(q.shape[0], q.shape[1], q.shape[2], k.shape[2])),
    "gqa_rank2_mask": (dict(enable_gqa=True, scale=0.3), lambda q, k: torch.randn(q.shape[2], k.shape[2])),
    "gqa_rank3_mask_per_head": (dict(enable_gqa=True), lambda q, k: torch.randn(q.shape[1], q.shape[2], k.shape[2])),
    "gqa_no_mask": (dict(enable_gqa=True), None),
    "mha_bool_mask": (dict(), lambda q, k: bool_mask((q.shape[0], 1, q.shape[2], k.shape[2]))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_matches_torch_in_onnxruntime_without_copies_of_kv(case, tmp_path):
    kw, make_mask = CASES[case]
    hk = 8 if case.startswith("mha") else 2
    q, k, v = qkv(hk=hk)
    args = (q, k, v) + ((make_mask(q, k),) if make_mask else ())
    ref = Attend(**kw)(*args)
    model = export(Attend(**kw), args, tmp_path / "a.onnx", translations.ATTENTION_TABLE)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["Expand"] == 0 and ops["MatMul"] == 2          # no repeated K/V; one MatMul each side
    transposes = [n for n in model.graph.node if n.op_type == "Transpose"]
    assert [list(a.ints) for n in transposes for a in n.attribute] == [[0, 1, 3, 2]] * 2   # Qᵀ and (K Qᵀ)ᵀ
    assert all("k" not in n.input for n in transposes)        # K is read in place
    got = run(tmp_path / "a.onnx", args)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    if case == "gqa_bool_mask":                               # the blocked row: zeros, as torch's safe softmax
        assert torch.equal(ref[0, :, 1], torch.zeros_like(ref[0, :, 1]))
    k2, v2 = qkv(hk=hk, lk=11, seed=5)[1:]                    # another key length through the same graph
    args2 = (q, k2, v2) + ((make_mask(q, k2),) if make_mask else ())
    torch.testing.assert_close(run(tmp_path / "a.onnx", args2), Attend(**kw)(*args2), atol=2e-5, rtol=1e-5)


def test_onnxruntime_keeps_reading_k_in_place(tmp_path):
    q, k, v = qkv()
    mask = bool_mask((2, 1, 3, 7))
    export(Attend(enable_gqa=True), (q, k, v, mask), tmp_path / "a.onnx", translations.ATTENTION_TABLE)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(tmp_path / "a.onnx"), so, providers=["CPUExecutionProvider"])
    nodes = onnx.load(tmp_path / "opt.onnx").graph.node
    readers = [n.op_type for n in nodes if "k" in n.input and n.op_type != "Shape"]
    assert readers in (["MatMul"], ["FusedMatMul"]) and not any(n.op_type == "Expand" for n in nodes)
    # (a Transpose of K, which onnxruntime's transpose optimizer pushes up through a blocked K quantizer, fails at
    # run time in onnxruntime 1.32: tests/test_kv_cache.py::test_onnx_lowers_asymmetric_kv_with_zero_points_and_parity)


@pytest.mark.parametrize("kw", [dict(is_causal=True), dict(enable_gqa=True, dropout_p=0.0, is_causal=True)],
                         ids=["causal_mha", "causal_gqa"])
def test_what_sdpa_does_not_take_goes_to_torch_onnx_translation(kw, tmp_path):
    q, k, v = qkv(hk=8 if "enable_gqa" not in kw else 2, lq=7)
    model = export(Attend(**kw), (q, k, v), tmp_path / "a.onnx", translations.ATTENTION_TABLE)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["Trilu"] + ops["Range"] + ops["LessOrEqual"] + ops["Where"] > 0     # torch.onnx's causal mask
    torch.testing.assert_close(run(tmp_path / "a.onnx", (q, k, v)), Attend(**kw)(q, k, v), atol=2e-5, rtol=1e-5)


def test_repeated_kv_is_found_with_symbolic_sizes_in_a_decoder_step():
    import qpass

    qm = qpass.apply(toy.hf_model("llama"), "recipes/w16.yaml", progress=False)
    gm, _, _ = capture.capture_step(qm)
    assert P.repeated_kv(gm) == []                            # batch and length are symbols: not static
    sites = P.repeated_kv(gm, static=False)
    assert len(sites) == 2                                    # one per layer
    before = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_function")
    assert patterns.group_attention(gm) == 2
    gm.graph.lint()
    after = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_function")
    aten = torch.ops.aten
    assert before[aten.expand.default] - after[aten.expand.default] == 4          # K and V, two layers
    assert all(n.kwargs.get("enable_gqa") for n in gm.graph.nodes if n.target is SDPA)
    assert patterns.group_attention(gm) == 0                  # nothing left to match


def test_group_attention_does_nothing_without_grouped_heads():
    import qpass

    qm = qpass.apply(toy.hf_model("opt"), "recipes/w16.yaml", progress=False)
    gm, _, _ = capture.capture_step(qm)
    nodes = len(gm.graph.nodes)
    assert patterns.group_attention(gm) == 0 and len(gm.graph.nodes) == nodes


def test_bad_attention_option_is_refused():
    with pytest.raises(UnsupportedOpError, match="attention must be 'grouped' or 'torch'"):
        patterns.LowerOptions(attention="flash")


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_lowered_decoder_matches_hf_and_the_torch_translation_with_left_padding(family, tmp_path):
    import qpass
    from qpass.backends.onnx_qdq import runtime

    model = toy.hf_model(family)
    qm = qpass.apply(model, "recipes/w16.yaml", progress=False)        # float: the HF model is the reference
    out = {}
    for attention in ("grouped", "torch"):
        d = tmp_path / attention
        said = []
        qpass.lower(qm, "onnx", d, attention=attention, progress=said.append)
        assert json.load(open(d / "qpass.json"))["options"]["attention"] == attention
        told = [s for s in said if s.startswith("attention over grouped K/V heads")]
        grouped = attention == "grouped" and family == "llama"
        assert len(told) == grouped, said
        if grouped:                                           # one per layer, and the way back named
            assert f"at {model.config.num_hidden_layers} SDPA call(s)" in told[0] and "--attention torch" in told[0]
        graph = onnx.load(d / "model.onnx").graph
        out[attention] = collections.Counter(n.op_type for n in graph.node)
        sess = runtime.session(d)
        ids = toy.token_ids(2, 6)
        mask = torch.ones(2, 6, dtype=torch.long)
        mask[0, :2] = 0                                       # left padding in row 0
        names = [i.name for i in sess.get_inputs()]
        kv = {n: np.zeros((2, i.shape[1], 0, i.shape[3]), np.float32) for n, i in
              zip(names, sess.get_inputs()) if n.startswith("past_key_values.")}
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                       "position_ids": pos.numpy(), **kv})[0]
        out[attention + "_logits"] = torch.from_numpy(logits)
    assert not torch.isnan(out["grouped_logits"]).any()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(out["grouped_logits"][mask.bool()], ref[mask.bool()], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["grouped_logits"][mask.bool()], out["torch_logits"][mask.bool()],
                               atol=1e-4, rtol=1e-4)
    if family == "llama":                                     # grouped heads: K/V no longer repeated
        assert out["torch"]["Expand"] - out["grouped"]["Expand"] == 4
