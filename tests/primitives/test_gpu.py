"""The same numerics on CUDA (skipped without a GPU)."""
import pytest
import torch

from qpass.primitives import OBSERVERS, ops, quant
from qpass.primitives.spec import PerGroup, QSpec, format_from_name

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("fmt,symmetric", [("int4", True), ("int8", False), ("fp8_e4m3", True),
                                           ("fp4_e2m1", True), ("nf4", True)])
def test_cuda_matches_cpu(fmt, symmetric):
    x = torch.randn(6, 70, generator=torch.Generator().manual_seed(0))
    spec = QSpec(format_from_name(fmt), PerGroup(32), symmetric=symmetric)
    scale, zp = quant.choose_qparams(x, spec)
    block = quant.spec_args(spec, x.shape)[0]
    cuda = [t.cuda() if t is not None else None for t in (x, scale, zp)]
    assert torch.equal(ops.fake_quantize(*cuda, block, fmt).cpu(), ops.fake_quantize(x, scale, zp, block, fmt))
    assert torch.equal(ops.quantize(*cuda, block, fmt).cpu(), ops.quantize(x, scale, zp, block, fmt))
    for name, cls in OBSERVERS.items():
        obs = cls(spec)
        obs.update(cuda[0])
        got, _ = obs.qparams()
        assert got.device.type == "cuda" and got.shape == scale.shape
        if name == "minmax":
            assert torch.equal(got.cpu(), scale)
