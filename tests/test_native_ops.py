"""The native library's small fp32 ops (backends/torch_packed/native.py, csrc/q4avx2.c) against the torch
compositions they replace, and the kernels that use them against their previous (torch quantizer) path.

Exactness (what is asserted):
* ``token_quant``: bit for bit (codes, fake-quant values incl. the sign of zeros, scales) ``Q.token_scale`` then
  ``(x / s).round_().clamp_(qmin, qmax)`` and ``Q.fake_quantize_dynamic(x, [1, -1], fmt, True)`` on finite tokens,
  int2..int8; a token holding inf/NaN: scale NaN, codes 0, values all NaN (the reference's values are all NaN too).
* ``rms_norm``: within RMS_ULPS x eps32 x |reference| per element of the HF fp32 composition (the mean's sum
  is taken in double, torch's in fp32; 2.8 is the worst measured, d up to 11008), bit for bit where torch's sum
  is exact (small integers).
* ``rope``: bit for bit ``x * cos + cat(-x2, x1) * sin``, contiguous or transposed-view inputs.
* i8avx2 (W8A8) and q4avx2 / dequant (W4A8) module outputs: bit for bit the previous path's outputs on finite
  inputs (the same kernel fed by the torch quantizer), and within the existing bounds of int_mm / dequant.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qpass.backends import torch_packed as tp
from qpass.backends.torch_packed import kernels, native
from qpass.primitives import quant as Q
from qpass.primitives.spec import PerTensor, QSpec, format_from_name

if not native.available():
    pytest.skip(f"native kernels not available here: {native.status()}", allow_module_level=True)

RMS_ULPS = 4.0
EPS32 = torch.finfo(torch.float32).eps


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def force(mod, kernel):
    mod.plan = dict.fromkeys(tp.BUCKETS, kernel)


# ------------------------------------------------------------------------------------------ token_quant


def token_rows(g: torch.Generator, m: int, k: int, bits: int) -> torch.Tensor:
    """m random rows of k values at magnitudes from 1e-30 (below the scale floor) to 1e30, then (where there
    is room) special rows: all zero, exact .5 ties with zeros of both signs, an inf, a -inf, a NaN."""
    qmax = 2 ** (bits - 1) - 1
    mags = torch.tensor([1e-30, 1e-12, 1e-7, 1e-3, 1.0, 30.0, 1e6, 1e30])
    x = torch.randn(m, k, generator=g) * mags[torch.randint(0, len(mags), (m, 1), generator=g)]
    x *= torch.rand(m, 1, generator=g) + 0.5
    specials = []
    s = 2.0 ** -3                                             # ties: x / s = j + 0.5 exactly, s = amax / qmax
    ties = s * (torch.arange(k, dtype=torch.float32) % (2 * qmax) - qmax + 0.5)          # |x / s| < qmax
    ties[0] = s * qmax
    if k > 2:
        ties[1], ties[2] = 0.0, -0.0
    specials += [torch.zeros(k), ties]
    for v in (float("inf"), -float("inf"), float("nan")):
        r = torch.randn(k, generator=g)
        r[int(torch.randint(0, k, (1,), generator=g))] = v
        specials.append(r)
    for i, r in zip(torch.randperm(m, generator=g).tolist(), specials):
        x[i] = r
    return x


def check_token_quant(x: torch.Tensor, bits: int) -> None:
    fmt = f"int{bits}"
    lo, hi = Q.qrange(fmt, True)
    k = x.shape[-1]
    finite = torch.isfinite(x).all(-1).reshape(-1)
    ref_s = Q.token_scale(x, fmt)
    ref_codes = (x / ref_s).round_().clamp_(lo, hi).reshape(-1, k)
    ref_fq = Q.fake_quantize_dynamic(x, [1] * (x.dim() - 1) + [-1], fmt, True)
    codes, s = native.token_quant(x, bits, codes=True)
    fq, s2 = native.token_quant(x, bits, codes=False)
    assert codes.dtype == torch.int8 and codes.shape == (x.numel() // k, k) and fq.shape == x.shape
    assert s.dtype == fq.dtype == torch.float32 and s.shape == (x.numel() // k,)
    assert torch.equal(bits_of(s), bits_of(s2))
    assert torch.equal(bits_of(s[finite]), bits_of(ref_s.reshape(-1)[finite]))
    assert torch.equal(codes[finite], ref_codes[finite].to(torch.int8))
    fq2, ref2 = fq.reshape(-1, k), ref_fq.reshape(-1, k)
    assert torch.equal(bits_of(fq2[finite]), bits_of(ref2[finite]))
    assert s[~finite].isnan().all() and fq2[~finite].isnan().all() and ref2[~finite].isnan().all()
    assert (codes[~finite] == 0).all()


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 12), st.sampled_from([1, 3, 7, 8, 9, 16, 45, 256, 257]),
       st.sampled_from([2, 3, 4, 5, 8]))
def test_token_quant_is_the_torch_quantizer_bit_for_bit(seed, m, k, bits):
    g = torch.Generator().manual_seed(seed)
    check_token_quant(token_rows(g, m, k, bits), bits)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_token_quant_special_rows_leading_dims_and_layouts(bits):
    g = torch.Generator().manual_seed(bits)
    x = token_rows(g, 6, 45, bits)
    check_token_quant(x, bits)
    check_token_quant(x.reshape(2, 3, 45), bits)                           # leading dims: fq keeps x's shape
    check_token_quant(torch.randn(45, 6, generator=g).t(), bits)           # not contiguous
    # every tie: row amax = qmax * s (s a power of two), x / s = j + 0.5 for j = -qmax .. qmax - 1
    qmax = 2 ** (bits - 1) - 1
    j = torch.arange(-qmax, qmax, dtype=torch.float32)
    x = torch.cat([torch.tensor([qmax * 0.25]), 0.25 * (j + 0.5)])[None]
    check_token_quant(x, bits)
    codes, s = native.token_quant(x, bits, codes=True)
    even = torch.where((j % 2) == 0, j, j + 1)                             # half to even
    assert s.item() == 0.25 and torch.equal(codes[0, 1:], even.to(torch.int8))
    # a bf16 input is quantized as x.float() (what PackedLinear.input_codes does)
    xb = torch.randn(3, 40, generator=g).to(torch.bfloat16)
    codes, s = native.token_quant(xb, bits, codes=True)
    ref_s = Q.token_scale(xb.float(), f"int{bits}")
    assert torch.equal(s, ref_s.reshape(-1))
    assert torch.equal(codes, (xb.float() / ref_s).round_().clamp_(*Q.qrange(f"int{bits}", True)).to(torch.int8))


def test_token_quant_empty_input():
    for codes in (True, False):
        out, s = native.token_quant(torch.randn(0, 16), 8, codes=codes)
        assert out.shape == (0, 16) and s.shape == (0,)


# --------------------------------------------------------------------------------------------- rms_norm


def rms_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm in fp32."""
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("d", [1, 7, 8, 64, 256, 1000, 4096])
def test_rms_norm_matches_the_torch_composition(d):
    g = torch.Generator().manual_seed(d)
    worst = 0.0
    for scale in (1e-3, 1.0, 1e3):
        for m in (1, 3, 17):
            x = torch.randn(m, d, generator=g) * scale * (torch.rand(m, 1, generator=g) + 0.1)
            w = torch.randn(d, generator=g)
            for eps in (1e-6, 1e-5):
                out, ref = native.rms_norm(x, w, eps), rms_ref(x, w, eps)
                assert out.shape == ref.shape and out.is_contiguous()
                ulps = ((out - ref).abs() / (ref.abs() * EPS32)).nan_to_num(0.0)     # 0 / 0: both exactly 0
                worst = max(worst, float(ulps.max()))
    assert worst <= RMS_ULPS, worst


@pytest.mark.parametrize("d", [1, 5, 8, 45, 64, 256])
def test_rms_norm_is_exact_where_the_sum_is(d):
    """Small integers: squares and their sums are exact in fp32 (|sum| <= 64 d < 2^24), so the only roundings
    are the ones both sides share (mean, + eps, sqrt, 1 /, two multiplies)."""
    g = torch.Generator().manual_seed(d)
    x = torch.randint(-8, 9, (2, 3, d), generator=g).float()
    x[0, 0] = 0.0                                                        # r = 1 / sqrt(eps)
    w = torch.randn(d, generator=g)
    assert torch.equal(bits_of(native.rms_norm(x, w, 1e-6)), bits_of(rms_ref(x, w, 1e-6)))
    xt = x.transpose(0, 1)                                               # not contiguous
    out = native.rms_norm(xt, w, 1e-5)
    assert out.shape == xt.shape and out.is_contiguous() and torch.equal(out, rms_ref(xt, w, 1e-5))


def test_rms_norm_non_finite_rows_and_errors():
    x = torch.randn(3, 32)
    x[1, 4], x[2, 0] = float("inf"), float("nan")
    w = torch.randn(32)
    out, ref = native.rms_norm(x, w, 1e-6), rms_ref(x, w, 1e-6)
    assert torch.equal(out[0], ref[0]) or float(((out[0] - ref[0]).abs() / (ref[0].abs() * EPS32)).max()) <= RMS_ULPS
    # an inf: r = 0, so NaN at the inf and signed zeros elsewhere; a NaN: all NaN (both sides alike)
    assert torch.equal(bits_of(out[1:].nan_to_num(7.0)), bits_of(ref[1:].nan_to_num(7.0)))
    assert out[1, 4].isnan() and (out[1, 5:] == 0).all() and out[2].isnan().all()
    with pytest.raises(ValueError):
        native.rms_norm(x, torch.randn(31), 1e-6)
    with pytest.raises(TypeError):
        native.rms_norm(x.double(), w, 1e-6)


# ------------------------------------------------------------------------------------------------- rope


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    return x * cos + torch.cat((-x[..., d // 2:], x[..., :d // 2]), -1) * sin


@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("d", [32, 64, 20])
def test_rope_is_the_torch_expression_bit_for_bit(b, t, d):
    g = torch.Generator().manual_seed(100 * b + 10 * t + d)
    h = 4
    cos4, sin4 = torch.randn(b, 1, t, d, generator=g), torch.randn(b, 1, t, d, generator=g)
    inputs = {
        "contiguous": torch.randn(b, h, t, d, generator=g),
        "transposed": torch.randn(b, t, h, d, generator=g).transpose(1, 2),      # q_proj(x).view(b, t, h, d)
        "sliced": torch.randn(b, t, 3 * h * d, generator=g)[..., h * d:2 * h * d].view(b, t, h, d).transpose(1, 2),
        "last dim strided": torch.randn(b, h, t, 2 * d, generator=g)[..., ::2],
    }
    for name, x in inputs.items():
        ref = rope_ref(x, cos4, sin4)
        for cos, sin in ((cos4, sin4), (cos4[:, 0], sin4[:, 0])):              # [B, 1, T, D] or [B, T, D]
            out = native.rope(x, cos, sin)
            assert out.shape == (b, h, t, d) and out.transpose(1, 2).is_contiguous(), name
            assert torch.equal(bits_of(out), bits_of(ref)), name
    if b == 2:                                                                 # one table for the batch
        x = inputs["transposed"]
        assert torch.equal(native.rope(x, cos4[:1], sin4[:1]), rope_ref(x, cos4[:1], sin4[:1]))


def test_rope_errors():
    x = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError):
        native.rope(torch.randn(1, 2, 3, 7), torch.randn(1, 3, 7), torch.randn(1, 3, 7))   # odd head dim
    with pytest.raises(ValueError):
        native.rope(x, torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))                   # [B, H, T, D] table
    with pytest.raises(RuntimeError):
        native.rope(x, torch.randn(1, 4, 8), torch.randn(1, 4, 8))                         # wrong T
    with pytest.raises(TypeError):
        native.rope(x.double(), torch.randn(1, 3, 8), torch.randn(1, 3, 8))


# -------------------------------------------------------------------------------- kernels that use them


def previous_path(mod, kernel: str, monkeypatch) -> object:
    """`kernel` bound for `mod` as before token_quant: the torch input quantizer."""
    with monkeypatch.context() as mp:
        mp.setattr(kernels, "_native_act_bits", lambda m: None)
        return kernels.KERNELS[kernel].bind(mod)


def spy_token_quant(monkeypatch) -> list:
    calls, real = [], native.token_quant
    monkeypatch.setattr(native, "token_quant", lambda x, bits, *, codes: calls.append((bits, codes)) or
                        real(x, bits, codes=codes))
    return calls


def inputs(g: torch.Generator, m: int, k: int) -> torch.Tensor:
    return torch.randn(2, m, k, generator=g) * (torch.rand(2, m, 1, generator=g) * 10 + 1e-3)


@pytest.mark.parametrize("act", ["int8", "int4"])
@pytest.mark.parametrize("n,k,bias", [(37, 200, True), (6, 45, False), (64, 256, True)])
def test_i8avx2_outputs_are_unchanged(act, n, k, bias, monkeypatch):
    g = torch.Generator().manual_seed(n + k)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    scale, zp = Q.choose_qparams(w, QSpec(format_from_name("int8"), PerTensor()), block_size=(1, -1))
    mod = tp.PackedLinear.from_weight(w, scale, zp, (1, -1), "int8", bias=b if bias else None,
                                      act=tp.ActFormat(act, (1, 1, -1), True, True))
    assert "i8avx2" in kernels.candidates(mod, "exact") and kernels._native_act_bits(mod) == int(act[3:])
    before = previous_path(mod, "i8avx2", monkeypatch)
    calls = spy_token_quant(monkeypatch)
    force(mod, "i8avx2")
    assert calls == []
    for m in (1, 5, 17):
        x = inputs(g, m, k)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = mod(x)
            assert out.shape == (2, m, n) and torch.equal(out, before(x)), (m, threads)
        force(mod, "int_mm")
        ref = mod(x)
        force(mod, "i8avx2")
        assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-6
    assert calls and calls[0] == (int(act[3:]), True)
    x = inputs(g, 4, k)                                   # a token holding inf: that output row is all NaN
    x[1, 2, 3] = float("inf")
    out, ref = mod(x), before(x)
    assert out[1, 2].isnan().all()
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[1, 2] = False
    assert torch.equal(out[keep], ref[keep])


@pytest.mark.parametrize("act", ["int8", "int4"])
@pytest.mark.parametrize("n,k,block", [(37, 200, (1, 32)), (64, 256, (1, -1)), (24, 128, (1, 64))])
def test_w4a8_q4avx2_and_dequant_outputs_are_unchanged(act, n, k, block, monkeypatch):
    g = torch.Generator().manual_seed(n + k)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    scale, zp = Q.choose_qparams(w, QSpec(format_from_name("int4"), PerTensor()), block_size=block)
    mod = tp.PackedLinear.from_weight(w, scale, zp, block, "int4", bias=b,
                                      act=tp.ActFormat(act, (1, 1, -1), True, True))
    wfq = Q.fake_quantize(w, scale, zp, block, "int4")
    assert mod.wf.layout == "q4" and kernels._native_act_bits(mod) == int(act[3:])
    before = {name: previous_path(mod, name, monkeypatch) for name in ("q4avx2", "dequant")}
    calls = spy_token_quant(monkeypatch)
    for m in (1, 3, 8):
        x = inputs(g, m, k)
        ref = torch.nn.functional.linear(Q.fake_quantize_dynamic(x, [1, 1, -1], act, True), wfq, b)
        for name in ("q4avx2", "dequant"):
            force(mod, name)
            out = mod(x)
            assert torch.equal(out.reshape(-1, n), before[name](x).reshape(-1, n)), (name, m)
            assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5, (name, m)
    assert calls and all(c == (int(act[3:]), False) for c in calls)
    x = inputs(g, 3, k)
    x[0, 1, 0] = float("nan")                             # a token holding NaN: that output row is all NaN
    for name in ("q4avx2", "dequant"):
        force(mod, name)
        out, prev = mod(x), before[name](x).reshape(2, 3, n)
        assert out[0, 1].isnan().all() and prev[0, 1].isnan().all()
        assert torch.equal(out[1], prev[1]) and torch.equal(out[0, ::2], prev[0, ::2])
    calls.clear()
    force(mod, "q4avx2")                                  # bf16 graphs keep the torch quantizer
    xb = x[1:].to(torch.bfloat16)
    assert torch.equal(mod(xb), before["q4avx2"](xb).to(torch.bfloat16)) and calls == []


def test_without_the_library_the_torch_quantizer_is_bound(monkeypatch):
    w = torch.randn(16, 64)
    scale, zp = Q.choose_qparams(w, QSpec(format_from_name("int8"), PerTensor()), block_size=(1, -1))
    mod = tp.PackedLinear.from_weight(w, scale, zp, (1, -1), "int8", act=tp.ActFormat("int8", (1, 1, -1), True, True))
    assert kernels._native_act_bits(mod) == 8
    static = tp.PackedLinear.from_weight(w, scale, zp, (1, -1), "int8", act_scale=torch.ones(1, 1, 1),
                                         act=tp.ActFormat("int8", (-1, -1, -1), True, False))
    assert kernels._native_act_bits(static) is None                       # not the fast quantizer
    monkeypatch.setenv(native.ENV_DISABLE, "1")
    assert kernels._native_act_bits(mod) is None
    calls = spy_token_quant(monkeypatch)
    force(mod, "dequant")
    x = torch.randn(3, 64)
    assert torch.equal(mod(x), torch.nn.functional.linear(mod.input_fake_quant(x), mod.dequantize())) and calls == []
