"""torch.library ops: export with dynamic batch/seq, re-export, opcheck, single registration."""
import ast
import importlib.util
import pathlib

import pytest
import torch

import qpass.primitives as qp
from qpass.errors import QuantizationError
from qpass.primitives import ops, quant

B, T = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=512)
DYN = ({0: B, 1: T},)
H = 12


class Static(torch.nn.Module):
    """Static per-channel int8 activation quantizer, then a per-group weight fake-quant on a 704-wide dim."""

    def __init__(self, fmt, symmetric):
        super().__init__()
        x = torch.randn(8, 16, H)
        spec = qp.QSpec(qp.format_from_name(fmt), qp.PerChannel(-1), symmetric=symmetric)
        self.fmt, self.block = fmt, quant.spec_args(spec, x.shape)[0]
        scale, zp = quant.choose_qparams(x, spec)
        self.register_buffer("scale", scale)
        self.register_buffer("zp", zp)

    def forward(self, x):
        codes = ops.quantize(x, self.scale, self.zp, self.block, self.fmt)
        y = ops.dequantize(codes, self.scale, self.zp, self.block, self.fmt, torch.bfloat16)
        return y.float() + ops.fake_quantize(x, self.scale, self.zp, self.block, self.fmt)


class Dynamic(torch.nn.Module):
    def __init__(self, fmt, symmetric):
        super().__init__()
        self.fmt, self.symmetric = fmt, symmetric

    def forward(self, x):
        return ops.fake_quantize_dynamic(x, [1, 1, -1], self.fmt, self.symmetric) * 2


def _targets(gm):
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("module", [Static("int8", True), Static("int4", False), Static("fp8_e4m3", True),
                                    Static("nf4", True), Dynamic("int8", True), Dynamic("int4", False),
                                    Dynamic("fp4_e2m1", True)], ids=lambda m: f"{type(m).__name__}-{m.fmt}")
def test_export_dynamic_shapes_and_reexport(module):
    ep = torch.export.export(module, (torch.randn(2, 5, H),), dynamic_shapes=DYN, strict=False)
    wanted = {ops.quantize, ops.dequantize, ops.fake_quantize} if isinstance(module, Static) \
        else {ops.fake_quantize_dynamic}
    assert wanted <= _targets(ep.graph_module)
    ep2 = torch.export.export(ep.module(), (torch.randn(3, 7, H),), dynamic_shapes=DYN, strict=False)
    assert wanted <= _targets(ep2.graph_module)
    x = torch.randn(4, 9, H)
    assert torch.equal(ep2.module()(x), module(x))
    assert torch.equal(ep.module()(x), module(x))


def _cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, generator=g)
    sym, _ = quant.choose_qparams(x, qp.QSpec(qp.IntFormat(4), qp.PerGroup(4)))
    asym, zp = quant.choose_qparams(x, qp.QSpec(qp.IntFormat(8), qp.PerToken(), symmetric=False))
    fp8, _ = quant.choose_qparams(x, qp.QSpec(qp.FloatFormat("fp8_e4m3"), qp.PerChannel(1)))
    return [(x, sym, None, [1, 4], "int4"), (x, asym, zp, [1, -1], "int8"), (x, fp8, None, [-1, 1], "fp8_e4m3"),
            (x, sym * 7 / 6, None, [1, 4], "fp4_e2m1"), (x, sym * 7, None, [1, 4], "nf4")]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[-1])
def test_opcheck(case):
    x, scale, zp, block, fmt = case
    # opcheck's schema test multiplies outputs, which float8 tensors do not support on CPU
    utils = ["test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"]
    utils += [] if fmt.startswith("fp8") else ["test_schema"]
    torch.library.opcheck(ops.quantize, (x, scale, zp, block, fmt), test_utils=utils)
    codes = ops.quantize(x, scale, zp, block, fmt)
    torch.library.opcheck(ops.dequantize, (codes, scale, zp, block, fmt, torch.float32), test_utils=utils)
    xg, sg = x.clone().requires_grad_(), scale.clone().requires_grad_()
    torch.library.opcheck(ops.fake_quantize, (xg, sg, zp, block, fmt))
    torch.library.opcheck(ops.fake_quantize_dynamic, (xg, block, fmt, zp is None))


def test_ops_match_the_python_functions():
    for x, scale, zp, block, fmt in _cases():
        codes = ops.quantize(x, scale, zp, block, fmt)
        assert torch.equal(codes, quant.quantize(x, scale, zp, block, fmt))
        assert torch.equal(ops.dequantize(codes, scale, zp, block, fmt, torch.float32),
                           quant.dequantize(codes, scale, zp, block, fmt))
        assert torch.equal(ops.fake_quantize(x, scale, zp, block, fmt), quant.fake_quantize(x, scale, zp, block, fmt))


def test_fake_kernel_checks_static_arguments():
    class Bad(torch.nn.Module):
        def forward(self, x):
            return ops.fake_quantize_dynamic(x, [1, -1], "int8", True)  # rank 2 block for a rank 3 input

    with pytest.raises(QuantizationError, match="block size"):
        torch.export.export(Bad(), (torch.randn(2, 3, 4),), strict=False)


def test_handles_and_single_registration():
    assert ops.fake_quantize is torch.ops.qpass.fake_quantize.default
    spec = importlib.util.spec_from_file_location("qpass_ops_again", ops.__file__)
    again = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(again)  # would raise "already defined" if it registered twice
    assert again.quantize is ops.quantize


def test_primitives_never_import_fx():
    for path in pathlib.Path(ops.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith("torch.fx") for n in names), path
