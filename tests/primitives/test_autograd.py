"""Gradients: STE for x, LSQ for the scale, identity for the dynamic op."""
import math

import torch

from qpass.primitives import ops, quant
from qpass.primitives.spec import QSpec


def test_ste_gradient_is_the_in_range_mask():
    x = torch.tensor([[0.1, -0.4, 0.85, 0.9, -1.3], [5.0, -0.2, 0.05, -9.0, -2.1]], requires_grad=True)
    scale = torch.tensor([[0.25], [0.5]])  # int3: codes -4..3, i.e. [-1.0, 0.75] and [-2.0, 1.5]
    ops.fake_quantize(x, scale, None, [1, -1], "int3").sum().backward()
    # 0.85 / 0.25 = 3.4 rounds to code 3 (not clipped: gradient 1); 0.9 / 0.25 = 3.6 rounds to 4 (clipped)
    expected = torch.tensor([[1.0, 1, 1, 0, 0], [0, 1, 1, 0, 1]])
    assert torch.equal(x.grad, expected)


def test_ste_asymmetric_and_float_formats():
    x = torch.tensor([-3.0, -0.5, 0.0, 1.0, 4.0], requires_grad=True)
    zp = torch.tensor([2], dtype=torch.int32)  # int2 asym with scale 1: codes 0..3 cover [-2, 1]
    ops.fake_quantize(x, torch.tensor([1.0]), zp, [-1], "int2").sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    x.grad = None
    scale = torch.tensor([0.5], requires_grad=True)
    ops.fake_quantize(x, scale, None, [-1], "fp4_e2m1").sum().backward()  # range [-3, 3]
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert scale.grad is None  # non-int formats: no scale gradient


def test_lsq_scale_gradient_hand_computed():
    x = torch.tensor([0.3, -0.7, 2.0, 5.0])
    scale = torch.tensor([0.5], requires_grad=True)
    # int4 symmetric: x/s = [0.6, -1.4, 4, 10] -> round [1, -1, 4] and 10 clipped to qmax 7
    ops.fake_quantize(x, scale, None, [-1], "int4").sum().backward()
    want = ((1 - 0.6) + (-1 + 1.4) + 0.0 + 7) / math.sqrt(4 * 7)
    assert math.isclose(scale.grad.item(), want, rel_tol=1e-6)


def test_lsq_scale_gradient_asymmetric_hand_computed():
    x = torch.tensor([0.3, -3.0, 9.0])
    scale, zp = torch.tensor([1.0], requires_grad=True), torch.tensor([2.0])
    # int3 asym: codes 0..7, z = 2 -> range [-2, 5]; x/s = [0.3, -3, 9]: round(0.3)-0.3, qmin-z, qmax-z
    grad_out = torch.tensor([1.0, 2.0, 3.0])
    ops.fake_quantize(x, scale, zp, [-1], "int3").backward(grad_out)
    want = (1 * (0 - 0.3) + 2 * (0 - 2) + 3 * (7 - 2)) / math.sqrt(3 * 7)
    assert math.isclose(scale.grad.item(), want, rel_tol=1e-6)


def test_lsq_gradient_sums_per_block_with_partial_group():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, generator=g)
    scale = (torch.rand(2, 3, generator=g) * 0.1 + 0.05).requires_grad_()
    gout = torch.randn(2, 7, generator=g)
    ops.fake_quantize(x, scale, None, [1, 3], "int4").backward(gout)
    want = torch.zeros(2, 3)
    for i in range(2):
        for j in range(7):
            s = scale[i, j // 3].item()
            y = x[i, j].item() / s
            q = round(y)
            d = q - y if -8 <= q <= 7 else min(max(q, -8), 7)
            want[i, j // 3] += gout[i, j] * d
    torch.testing.assert_close(scale.grad, want / math.sqrt((14 / 6) * 7), rtol=1e-5, atol=1e-6)


def test_dynamic_gradient_is_identity():
    x = torch.randn(2, 3, 8, requires_grad=True)
    gout = torch.randn(2, 3, 8)
    ops.fake_quantize_dynamic(x * 1.0, [1, 1, -1], "int4", False).backward(gout)
    assert torch.equal(x.grad, gout)


def test_gradient_dtype_follows_inputs():
    x = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    scale, _ = quant.choose_qparams(x.detach(), QSpec())
    scale.requires_grad_()
    ops.fake_quantize(x, scale, None, [1, -1], "int8").sum().backward()
    assert x.grad.dtype == torch.bfloat16 and scale.grad.dtype == torch.float32
