"""The quantizer IR (qpass.quantizer, qpass.primitives.formats): the view, QuantMeta, the format registry, side
channels, and a new format with a side channel added by this file alone (lowered by torch, refused by ONNX)."""
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qpass
from qpass import IntFormat, PerChannel, PerGroup, PerHead, QSpec, Recipe
from qpass.graph import linear_sites, param_of
from qpass.primitives.spec import BUILTIN_KINDS
from qpass.passes import KvCacheConfig, QuantizeConfig
from qpass.primitives import formats as F
from qpass.primitives import ops
from qpass.primitives import quant as Q
from qpass.quantizer import (FloatColumns, QuantMeta, Quantizer, ScaleQuant, SideChannels, SparseValues,
                             insert_quantizer, quantizers)
from tests import toy
from tests.primitives.strategies import data, shapes_and_blocks

# ------------------------------------------------------------------------------ the view over pass nodes


def _pass_graphs():
    mlp = toy.TinyMLP(d=16, hidden=24)
    x = toy.mlp_input(d=16)
    calib = [(toy.mlp_input(d=16, seed=s),) for s in range(2)]
    w4 = QSpec(IntFormat(4), PerGroup(8), symmetric=False)
    yield qpass.apply(mlp, Recipe([QuantizeConfig(weights=w4, activations=QSpec(IntFormat(8), PerChannel(-1)))]),
                      calib_data=calib, example_inputs=(x,), progress=False).graph_module
    a8 = QSpec(IntFormat(8), qpass.PerToken(), dynamic=True)
    kv = KvCacheConfig(keys=QSpec(IntFormat(4), PerChannel(-1)), values=QSpec(IntFormat(4), PerHead(per_token=True),
                                                                               dynamic=True))
    calib_ids = [toy.token_ids(seed=s) for s in range(2)]
    yield qpass.apply(toy.captured("llama")[1], Recipe([QuantizeConfig(activations=a8), kv]),
                      calib_data=calib_ids, progress=False).graph_module


def test_the_view_round_trips_every_node_the_passes_create():
    roles = set()
    for gm in _pass_graphs():
        qs = quantizers(gm)
        assert qs and all(isinstance(q.meta, QuantMeta) for q in qs)
        for q in qs:
            n = q.node
            if q.dynamic:
                assert n.args == (q.x, list(q.block), q.fmt_name, q.symmetric) and q.scale is None
            else:
                assert n.args == (q.x, q.scale, q.zero_point, list(q.block), q.fmt_name)
                assert q.symmetric == (q.zero_point is None) == q.meta.spec.symmetric
            assert q.fmt == q.meta.spec.format and q.dynamic == q.meta.spec.dynamic and not q.side_channels
            assert Quantizer.of(n) == q
            meta = QuantMeta.from_dict(json.loads(json.dumps(q.meta.to_dict())))
            assert meta == q.meta
            assert q.meta["role"] == q.role and q.meta.get("nothing", 1) == 1     # dict-style readers
            roles.add(q.role)
        assert {q.node for q in quantizers(gm, role="weight")} == \
            {s.weight_use for s in linear_sites(gm) if Quantizer.of(s.weight_use)}
    assert roles == {"weight", "input", "key", "value"}


def test_quant_meta_round_trips_with_every_field():
    spec = QSpec(F.get_format("codebook3"), PerGroup(16))
    m = QuantMeta("weight", "linear_3", "model.layers.0.mlp.up_proj", spec, block_size=(1, 16),
                  position="attention_input", side=("outliers", "float_columns"))
    d = m.to_dict()
    assert json.loads(json.dumps(d)) == d and QuantMeta.from_dict(d) == m
    assert "position" not in QuantMeta("input", "s", "p", QSpec()).to_dict()

# --------------------------------------------------------------------------------------- format registry


def _spec_for(name):
    fmt = F.get_format(name)
    return QSpec(fmt, PerChannel(0), symmetric=True)


def _table(scale_shape, bits, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.rand(*scale_shape, 2 ** bits, generator=g) * 2 - 1, dim=-1).values


@settings(max_examples=60, deadline=None)
@given(st.data(), shapes_and_blocks(max_rank=3, max_dim=7), st.sampled_from(F.format_names()))
def test_every_registered_format_encodes_and_decodes(d, shape_block, name):
    shape, block = shape_block
    x = d.draw(data(shape))
    c = F.codec(name)
    assert c.name == name and c.bits == F.get_format(name).bits
    scale, _ = Q.choose_qparams(x, _spec_for(name), block_size=block)
    table = _table(scale.shape, c.bits, d.draw(st.integers(0, 99))) if c.table_size else None
    codes = F.quantize_ext(x, scale, None, block, name, codebook=table)
    assert codes.dtype == c.codes_dtype(True) and codes.shape == x.shape
    fq = F.fake_quantize_ext(x, scale, None, block, name, codebook=table)
    assert torch.equal(fq, F.dequantize_ext(codes, scale, None, block, name, x.dtype, codebook=table))
    assert torch.equal(F.fake_quantize_ext(fq, scale, None, block, name, codebook=table), fq)    # on the grid
    if table is None and c.kind in BUILTIN_KINDS:              # the built-in numerics, unchanged
        assert torch.equal(fq, Q.fake_quantize(x, scale, None, block, name))
    elif table is not None:                                    # the nearest entry of the block's own table
        s = Q.expand_to(scale, block, x.shape).expand(x.shape)
        entries = F._expand_table(table, block, x.shape).expand(*x.shape, table.shape[-1]) * s.unsqueeze(-1)
        best = (x.unsqueeze(-1) - entries).abs().amin(-1)
        assert ((x - fq).abs() <= best * (1 + 1e-5) + 1e-6 * s).all()
    lo, hi = c.qrange(True)
    assert lo < 0 < hi


def test_the_plain_ops_refuse_a_registered_format():
    x = torch.randn(4, 8)
    with pytest.raises(qpass.QuantizationError, match="codebook4 is a registered format"):
        Q.fake_quantize(x, torch.ones(4, 1), None, (1, -1), "codebook4")

# ------------------------------------------------------------------------------------------ side channels


@settings(max_examples=40, deadline=None)
@given(st.data(), st.integers(2, 9), st.integers(2, 12), st.sampled_from(["int3", "int4", "nf4", "codebook2"]))
def test_side_channels_reference_semantics(d, rows, cols, name):
    x = d.draw(data((rows, cols)))
    block = (1, -1)
    scale, _ = Q.choose_qparams(x, _spec_for(name), block_size=block)
    table = _table(scale.shape, 2, 1) if F.codec(name).table_size else None
    base = F.fake_quantize_ext(x, scale, None, block, name, codebook=table)
    k = d.draw(st.integers(1, rows * cols))
    idx = (x - base).abs().reshape(-1).topk(k).indices                            # the worst elements
    out = F.fake_quantize_ext(x, scale, None, block, name, codebook=table,
                              outliers=(idx, (x - base).reshape(-1)[idx]))       # their residuals
    got, want, b = out.reshape(-1)[idx], x.reshape(-1)[idx], base.reshape(-1)[idx]   # base + (x - base): float
    assert ((got - want).abs() <= 1e-6 * (1 + want.abs() + b.abs())).all()          # rounding of both terms
    rest = torch.ones(rows * cols, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(out.reshape(-1)[rest], base.reshape(-1)[rest])
    cols_kept = torch.tensor(sorted(set(d.draw(st.lists(st.integers(0, cols - 1), min_size=1, max_size=cols)))))
    out = F.fake_quantize_ext(x, scale, None, block, name, codebook=table, float_columns=(cols_kept, 1))
    assert torch.equal(out[:, cols_kept], x[:, cols_kept])
    others = [j for j in range(cols) if j not in set(cols_kept.tolist())]
    assert torch.equal(out[:, others], base[:, others])
    s2 = scale.amax().reshape(1, 1) / 127                                          # scales as int8, per tensor
    out = F.fake_quantize_ext(x, scale, None, block, name, codebook=table, scale_q=(s2, (-1, -1), "int8"))
    eff = Q.fake_quantize(scale, s2, None, (-1, -1), "int8")
    assert torch.equal(out, F.fake_quantize_ext(x, eff, None, block, name, codebook=table))


def test_ext_op_runs_the_reference_and_exports():
    x, scale = torch.randn(4, 8), torch.rand(4, 1) + 0.5
    table, idx, val = _table((4, 1), 3, 0), torch.tensor([0, 9]), torch.tensor([1.0, -2.0])
    cols = torch.tensor([3])
    got = ops.fake_quantize_ext(x, scale, None, [1, -1], "codebook3", table, idx, val, cols, 1, None, [], "")
    want = F.fake_quantize_ext(x, scale, None, [1, -1], "codebook3", codebook=table, outliers=(idx, val),
                               float_columns=(cols, 1))
    assert torch.equal(got, want)

    class M(torch.nn.Module):
        def forward(self, x):
            return ops.fake_quantize_ext(x, scale, None, [1, -1], "codebook3", table, idx, val, cols, 1, None, [], "")

    ep = torch.export.export(M(), (x,), strict=False)
    assert any(n.target is ops.fake_quantize_ext for n in ep.graph.nodes)

# --------------------------------------- a new format with a side channel, defined by this test file alone


@dataclass(frozen=True)
class ToyCodebook(F.FormatCodec):
    """3-bit learned codebook per output channel (a table per row), symmetric, nearest entry."""

    bits: int = 3
    kind: ClassVar[str] = "toy_codebook"
    name: ClassVar[str] = "toy_cb3"
    table_size: ClassVar[int] = 8

    def qrange(self, symmetric):
        return -1.0, 1.0

    def encode(self, y, zero_point, table):
        return F.nearest(y, table).to(torch.uint8)

    def decode(self, codes, zero_point, table, dtype):
        table = table.to(dtype).expand(*codes.shape, table.shape[-1])
        return torch.gather(table, -1, codes.long().unsqueeze(-1)).squeeze(-1)


@pytest.fixture
def toy_format():
    fmt = F.register_format(ToyCodebook())
    yield fmt
    F.unregister_format(fmt.name)


def _codebook_outlier_model(fmt):
    """TinyMLP with every weight quantized by `fmt` (a per-row table from the row's quantiles) plus its 3
    largest errors as sparse values."""
    model = toy.TinyMLP(d=16, hidden=24)
    x = toy.mlp_input(d=16)
    qm = qpass.apply(model, Recipe([]), example_inputs=(x,), progress=False)
    gm = qm.graph_module
    for site in linear_sites(gm):
        w = param_of(gm, site.weight).detach()
        spec = QSpec(fmt, PerChannel(0))
        scale, _ = Q.choose_qparams(w, spec)
        table = torch.quantile(w / scale, torch.linspace(0, 1, 8), dim=1).t().unsqueeze(1).contiguous()
        base = F.fake_quantize_ext(w, scale, None, (1, -1), fmt.name, codebook=table)
        idx = (w - base).abs().reshape(-1).topk(3).indices
        side = SideChannels(outliers=SparseValues(idx, (w - base).reshape(-1)[idx]))
        q = insert_quantizer(gm, site.node, site.weight_use, QuantMeta("weight", site.node.name, site.path, spec),
                             block=(1, -1), scale=scale, codebook=table, side=side,
                             name=f"{site.weight.target}_scale", origin="test")
        site.node.replace_input_with(site.weight_use, q.node)
    gm.recompile()
    return qm, x


def test_a_new_format_with_sparse_values_lowers_to_torch_and_is_refused_by_onnx(toy_format, tmp_path):
    qm, x = _codebook_outlier_model(toy_format)
    qs = quantizers(qm.graph_module, role="weight")
    assert len(qs) == 2 and all(q.fmt is toy_format and q.side_channels.names == ("outliers",) for q in qs)
    assert all(q.meta.side == ("outliers",) and q.codebook is not None for q in qs)
    ref = qm(x)
    from qpass.backends.torch_packed.ext import ExtLinear
    pm = qpass.lower(qm, "torch")
    mods = [m for m in pm.graph_module.modules() if isinstance(m, ExtLinear)]
    assert len(mods) == 2 and not [n for n in pm.graph_module.graph.nodes if Quantizer.of(n)]
    torch.testing.assert_close(pm(x), ref, rtol=0, atol=1e-6)

    pytest.importorskip("onnxscript")
    from qpass.backends.onnx_qdq import patterns
    with pytest.raises(qpass.UnsupportedOpError,
                       match=r"(?s)onnx_qdq cannot lower .*format toy_cb3 \(kind toy_codebook\).*fc1.*"
                             r"fix: use the torch backend"):      # (sparse values alone lower: side_channels.py)
        patterns.check_supported(qm.graph_module)


def test_torch_refuses_what_it_does_not_declare_by_name():
    from qpass.backends.torch_packed.lower import lower_linears
    model = toy.TinyMLP(d=16, hidden=24)
    x = toy.mlp_input(d=16)
    gm = qpass.apply(model, Recipe([]), example_inputs=(x,), progress=False).graph_module
    site = linear_sites(gm)[0]
    spec = QSpec(F.get_format("codebook2"), qpass.PerTensor())
    q = insert_quantizer(gm, site.node, site.input, QuantMeta("input", site.node.name, site.path, spec),
                         block=(-1, -1), scale=torch.ones(1, 1), codebook=_table((1, 1), 2, 0),
                         side=SideChannels(float_columns=FloatColumns(torch.tensor([0]), -1),
                                           scale_q=ScaleQuant(torch.ones(1, 1), (-1, -1), "int8")),
                         name="fc1_input_scale", origin="test")
    site.node.replace_input_with(site.input, q.node)
    w = param_of(gm, site.weight).detach()
    s, _ = Q.choose_qparams(w, QSpec(IntFormat(8)))
    wq = insert_quantizer(gm, site.node, site.weight_use, QuantMeta("weight", site.node.name, site.path,
                                                                     QSpec(IntFormat(8))),
                          block=(1, -1), scale=s, name="fc1_w_scale", origin="test")
    site.node.replace_input_with(site.weight_use, wq.node)
    gm.recompile()
    with pytest.raises(qpass.UnsupportedOpError, match=r"(?s)torch_packed cannot lower qpass::fake_quantize_ext "
                       r"\(role input\): unsupported format codebook2 \(kind codebook\); side channel scale_q.*fc1"):
        lower_linears(gm)
