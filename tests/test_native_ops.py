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
* ``attention``: torch's scaled_dot_product_attention within rtol 1e-5 (a polynomial exp, another summation
  order), GQA, strided K/V, masks; torch's op itself past ATTENTION_MAX_T query rows or for a boolean mask.
* i8avx2 (W8A8) and q4avx2 / dequant (W4A8) module outputs: bit for bit the previous path's outputs on finite
  inputs (the same kernel fed by the torch quantizer), and within the existing bounds of int_mm / dequant.
* the ``qpass_native`` torch ops (end of file): every kernel registered with its schema and a fake kernel,
  ``torch.library.opcheck`` passes, the ops equal the wrappers bit for bit and their torch fallbacks (bit for
  bit but rms_norm, q4_linear and lut_linear: summation order), a lowered decode graph holds rms_norm / rope op nodes and
  gives the logits the wrapper calls gave, and without the library (QPASS_NO_NATIVE=1) the ops run their torch
  fallback and the decode graph keeps the aten ops.
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

NATIVE = native.available()


def without_library(fn):
    """Marks a test that runs where the library is not available too (the others skip there)."""
    fn.without_library = True
    return fn


@pytest.fixture(autouse=True)
def needs_library(request):
    if not NATIVE and not getattr(request.function, "without_library", False):
        pytest.skip(f"native kernels not available here: {native.status()}")

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


# ------------------------------------------------------------------------------------------- attention


def sdpa(q, k, v, mask, scale):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                            enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("b,hq,hkv", [(1, 4, 4), (1, 16, 4), (2, 6, 3), (1, 40, 2)])
@pytest.mark.parametrize("t", [1, 3, native.ATTENTION_MAX_T])
@pytest.mark.parametrize("n,d,dv", [(1, 64, 64), (37, 12, 20), (130, 128, 128), (9, 8, 72)])
def test_attention_is_torch_sdpa_up_to_rounding(b, hq, hkv, t, n, d, dv):
    """GQA or not, n and head dims that are not multiples of 8 (tails), K/V as slices of a longer cache, q a
    transposed view, masks: none, [1, 1, T, N], per batch and head [B, Hq, T, N]."""
    g = torch.Generator().manual_seed(b * 1000 + hq * 10 + t + n)
    q = torch.randn(b, t, hq, d, generator=g).transpose(1, 2)
    kc, vc = torch.randn(b, hkv, n + 5, d, generator=g), torch.randn(b, hkv, n + 5, dv, generator=g)
    k, v = kc[:, :, :n], vc[:, :, :n]
    causal = torch.zeros(1, 1, t, n)
    for i in range(t):                                   # query i sits at position n - t + i: the later keys masked
        causal[0, 0, i, n - t + i + 1:] = float("-inf")
    full = torch.randn(b, hq, t, n, generator=g)
    for mask in (None, causal if n >= t else None, full):
        out = native.attention(q, k, v, mask, 0.2)
        ref = sdpa(q, k, v, mask, 0.2)
        assert out.shape == (b, hq, t, dv) and out.is_contiguous()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_attention_edges():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 2, 16, generator=g), torch.randn(1, 2, 5, 16, generator=g), torch.randn(1, 2, 5, 16)
    mask = torch.zeros(1, 1, 2, 5)
    mask[0, 0, 1] = float("-inf")                        # the second query row sees no key: NaN, as softmax makes it
    out = native.attention(q, k, v, mask, 0.25)
    assert out[:, :, 1].isnan().all() and out[:, :, 0].isfinite().all()
    torch.testing.assert_close(out[:, :, 0], sdpa(q, k, v, mask, 0.25)[:, :, 0], rtol=1e-5, atol=1e-5)
    # past ATTENTION_MAX_T query rows (prefill), a boolean mask or another dtype: torch's op itself, bit for bit
    long_q = torch.randn(1, 4, native.ATTENTION_MAX_T + 1, 16, generator=g)
    assert torch.equal(native.attention(long_q, k, v, None, 0.25), sdpa(long_q, k, v, None, 0.25))
    bmask = torch.ones(1, 1, 2, 5, dtype=torch.bool)
    assert torch.equal(native.attention(q, k, v, bmask, 0.25), sdpa(q, k, v, bmask, 0.25))
    assert native.attention(q.double(), k.double(), v.double(), None, 0.25).dtype == torch.float64
    # extreme scores stay finite (the exp is clamped and the max subtracted)
    big = native.attention(q * 1e4, k, v, None, 1.0)
    torch.testing.assert_close(big, sdpa(q * 1e4, k, v, None, 1.0), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError):
        native.attention(q, torch.randn(1, 3, 5, 16), torch.randn(1, 3, 5, 16), None, 0.25)   # 4 heads on 3


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


# ------------------------------------------------------------------------------- low-bit K/V cache
# PackedKVCache's common formats (dynamic symmetric int4 / int8, block [1, 1, 1, -1] or [1, -1, 1, -1], fp32 rows) go through
# native.kv_store / kv_load; asserted: the same `codes` and `scale` bytes as its torch path and the same
# outputs, bit for bit (sign of zeros included); non-finite rows NaN; bad positions an IndexError, nothing
# written; every other format (and bf16 rows, QPASS_NO_NATIVE) on the torch path.

KV_BLOCK = [1, 1, 1, -1]


def torch_path_cache(monkeypatch, *args, **kwargs) -> tp.PackedKVCache:
    """A PackedKVCache on its torch path: the library looks unavailable when it decides (its first call)."""
    cache = tp.PackedKVCache(*args, **kwargs)
    with monkeypatch.context() as mp:
        mp.setattr(native, "available", lambda: False)
        assert cache._native_ready() is False
    cache._native = False
    return cache


def spy_kv(monkeypatch) -> list:
    calls, store, load = [], native.kv_store, native.kv_load
    monkeypatch.setattr(native, "kv_store", lambda *a: calls.append("store") or store(*a))
    monkeypatch.setattr(native, "kv_load", lambda *a: calls.append("load") or load(*a))
    return calls


def kv_rows(g: torch.Generator, b: int, h: int, t: int, d: int) -> torch.Tensor:
    """[b, h, t, d] as a transposed view of [b, t, h, d] (what k_proj(x).view(...).transpose(1, 2) gives): rows
    at magnitudes from below the scale floor to 1e30, one of exact .5 ties at 4 bits, one all zero."""
    mags = torch.tensor([1e-30, 1e-7, 1e-3, 1.0, 30.0, 1e30])
    x = torch.randn(b, t, h, d, generator=g) * mags[torch.randint(0, len(mags), (b, t, h, 1), generator=g)]
    if t > 1:
        x[0, 0, 0] = 0.25 * (torch.arange(d) % 14 - 7 + 0.5)        # s = 1.75 / 7 = 0.25: x / s = j + 0.5
        x[0, 0, 0, 0] = 1.75
        x[-1, 1, -1] = 0.0
    return x.transpose(1, 2)


def assert_same_cache(a: tp.PackedKVCache, b: tp.PackedKVCache) -> None:
    assert a.codes.dtype == b.codes.dtype == torch.uint8 and a.codes.shape == b.codes.shape
    assert a.scale.dtype == b.scale.dtype == torch.float32 and a.scale.shape == b.scale.shape
    assert torch.equal(a.codes, b.codes) and torch.equal(bits_of(a.scale), bits_of(b.scale))
    assert a.nbytes() == b.nbytes()
    assert {k: (v.shape, v.dtype) for k, v in a.state_dict().items()} == \
        {k: (v.shape, v.dtype) for k, v in b.state_dict().items()}


@pytest.mark.parametrize("block", [KV_BLOCK, [1, -1, 1, -1]], ids=["per_head", "per_token"])
@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("h", [1, 4])
@pytest.mark.parametrize("d", [8, 32])
def test_kv_cache_native_path_stores_and_returns_what_the_torch_path_does(fmt, b, h, d, block, monkeypatch):
    g = torch.Generator().manual_seed(1000 * b + 100 * h + d + len(fmt))
    shape = (b, h, 16, d)
    ref = torch_path_cache(monkeypatch, shape, fmt, block, True)
    cache = tp.PackedKVCache(shape, fmt, block, True)
    calls = spy_kv(monkeypatch)
    k = kv_rows(g, b, h, 5, d)                                             # prefill
    for n_keys in (None, 5):
        pos = torch.arange(5)
        out, want = cache(k, pos, n_keys), ref(k, pos, n_keys)
        assert out.shape == want.shape == (b, h, 16 if n_keys is None else 5, d) and out.dtype == torch.float32
        assert torch.equal(bits_of(out), bits_of(want))
        assert_same_cache(cache, ref)
    assert calls == ["store", "load"] * 2                                  # the native path ran, twice
    for p in range(5, 12):                                                 # decode steps, one row each
        k = kv_rows(g, b, h, 1, d) if p % 2 else torch.randn(b, h, 1, d, generator=g)
        pos = torch.tensor([p])
        n_keys = None if p % 3 == 0 else p + 1
        out, want = cache(k, pos, n_keys), ref(k, pos, n_keys)
        assert torch.equal(bits_of(out), bits_of(want)), p
        assert_same_cache(cache, ref)
        # what attention sees at the written slots: the fake-quant values of the rows
        assert torch.equal(out[:, :, p:p + 1], Q.fake_quantize_dynamic(k, block, fmt, True))
    assert len(calls) == 2 * (2 + 7)
    assert torch.equal(cache.dequantize(), ref.dequantize()) and torch.equal(cache.dequantize(7), ref.dequantize(7))
    # rewriting slots (a prefix again, positions out of order) and n_keys past the end
    k, pos = kv_rows(g, b, h, 3, d), torch.tensor([4, 0, 2])
    assert torch.equal(bits_of(cache(k, pos, 64)), bits_of(ref(k, pos, 64)))
    assert_same_cache(cache, ref)


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_kv_cache_native_path_non_finite_rows(fmt, monkeypatch):
    g = torch.Generator().manual_seed(7)
    shape = (2, 3, 8, 32)
    ref = torch_path_cache(monkeypatch, shape, fmt, KV_BLOCK, True)
    cache = tp.PackedKVCache(shape, fmt, KV_BLOCK, True)
    k = torch.randn(2, 3, 4, 32, generator=g)
    cache(k, torch.arange(4))
    ref(k, torch.arange(4))
    k = torch.randn(2, 3, 2, 32, generator=g)
    k[1, 2, 0, 5] = float("inf")
    k[0, 1, 1, 31] = float("nan")
    k[0, 0, 1, :] = -float("inf")
    pos = torch.tensor([5, 2])                                             # overwrites slot 2
    out, want = cache(k, pos), ref(k, pos)
    bad = torch.zeros(2, 3, 8, dtype=torch.bool)
    bad[1, 2, 5] = bad[0, 1, 2] = bad[0, 0, 2] = True
    assert out[bad].isnan().all() and not out[~bad].isnan().any()
    assert torch.equal(bits_of(out[~bad]), bits_of(want[~bad]))
    # the scale torch gives such a row (absmax / qmax): NaN when it holds a NaN, else inf; codes q = 0
    assert cache.scale[1, 2, 5].isinf().all() and cache.scale[0, 0, 2].isinf().all() and cache.scale[0, 1, 2].isnan()
    assert torch.equal(cache.scale[~bad], ref.scale[~bad])
    assert torch.equal(cache.scale[bad].isnan(), ref.scale[bad].isnan())
    zero = 0x88 if fmt == "int4" else 0
    assert (cache.codes[bad] == zero).all() and torch.equal(cache.codes[~bad], ref.codes[~bad])
    k = torch.randn(2, 3, 1, 32, generator=g)                              # the slot written again: finite
    out, want = cache(k, torch.tensor([2])), ref(k, torch.tensor([2]))
    assert out[:, :, 2].isfinite().all() and torch.equal(out[:, :, 2], want[:, :, 2])


def test_kv_cache_native_path_rejects_positions_outside_the_cache(monkeypatch):
    g = torch.Generator().manual_seed(8)
    for fmt in ("int4", "int8"):
        cache = tp.PackedKVCache((1, 2, 8, 16), fmt, KV_BLOCK, True)
        cache(torch.randn(1, 2, 3, 16, generator=g), torch.arange(3))
        assert cache._native is True
        codes, scale = cache.codes.clone(), cache.scale.clone()
        for pos in ([8], [-1], [3, 4, 100], [2**40]):
            k = torch.randn(1, 2, len(pos), 16, generator=g)
            with pytest.raises(IndexError, match="outside the cache's 8 slots"):
                cache(k, torch.tensor(pos))
            assert torch.equal(cache.codes, codes) and torch.equal(cache.scale, scale)    # nothing written
    with pytest.raises(ValueError):                                        # rows that do not fit the cache
        native.kv_store(torch.randn(1, 2, 1, 8), torch.tensor([0]), cache.codes, cache.scale, 8)
    with pytest.raises(ValueError):
        native.kv_store(torch.randn(1, 2, 2, 16), torch.tensor([0]), cache.codes, cache.scale, 8)
    with pytest.raises(TypeError):
        native.kv_store(torch.randn(1, 2, 1, 16).double(), torch.tensor([0]), cache.codes, cache.scale, 8)
    with pytest.raises(ValueError):
        native.kv_load(cache.codes, cache.scale, -1, 8)


def test_kv_cache_native_wrappers_take_any_strides_and_int32_positions():
    g = torch.Generator().manual_seed(9)
    for bits, fmt in ((4, "int4"), (8, "int8")):
        a = tp.PackedKVCache((2, 3, 6, 10), fmt, KV_BLOCK, True)
        b = tp.PackedKVCache((2, 3, 6, 10), fmt, KV_BLOCK, True)
        k = torch.randn(2, 3, 4, 20, generator=g)[..., ::2]                # last dim strided: copied
        native.kv_store(k, torch.tensor([5, 0, 3, 1], dtype=torch.int32), a.codes, a.scale, bits)
        native.kv_store(k.contiguous(), torch.tensor([5, 0, 3, 1]), b.codes, b.scale, bits)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
        out = native.kv_load(a.codes, a.scale, 4, bits, torch.bfloat16)
        assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 4, 10)
        assert torch.equal(out, a.dequantize(4).to(torch.bfloat16))
        assert native.kv_load(a.codes, a.scale, 0, bits).shape == (2, 3, 0, 10)


def test_kv_cache_other_formats_keep_the_torch_path(monkeypatch):
    g = torch.Generator().manual_seed(10)
    calls = spy_kv(monkeypatch)
    shape = (1, 2, 16, 8)
    others = [
        tp.PackedKVCache(shape, "int8", [-1, 1, -1, 1], True, scale=torch.rand(1, 2, 1, 8, generator=g) + 0.1),
        tp.PackedKVCache(shape, "int4", KV_BLOCK, False),                  # asymmetric
        tp.PackedKVCache(shape, "int8", KV_BLOCK, False),
        tp.PackedKVCache(shape, "int2", KV_BLOCK, True),
        tp.PackedKVCache(shape, "int4", [1, 1, 1, 4], True),               # groups along head_dim
        tp.PackedKVCache(shape, "fp8_e4m3", KV_BLOCK, True),
    ]
    for cache in others:
        k = torch.randn(1, 2, 5, 8, generator=g)
        out = cache(k, torch.arange(5))
        assert cache._native_bits is None and cache._native is False, cache
        if cache.dynamic:
            assert torch.equal(out[:, :, :5], Q.fake_quantize_dynamic(k, cache.block, cache.fmt, cache.symmetric))
    assert calls == []
    cache = tp.PackedKVCache(shape, "int4", KV_BLOCK, True, dtype=torch.bfloat16)   # bf16 rows: torch path
    kb = torch.randn(1, 2, 5, 8, generator=g).to(torch.bfloat16)
    out = cache(kb, torch.arange(5))
    assert cache._native is True and calls == [] and out.dtype == torch.bfloat16
    k = torch.randn(1, 2, 1, 8, generator=g)                               # fp32 rows: native, cast to bf16
    out = cache(k, torch.tensor([5]), 6)
    assert calls == ["store", "load"] and out.dtype == torch.bfloat16 and out.shape == (1, 2, 6, 8)
    monkeypatch.setenv(native.ENV_DISABLE, "1")                            # QPASS_NO_NATIVE: the torch path
    cache = tp.PackedKVCache(shape, "int4", KV_BLOCK, True)
    calls.clear()
    cache(torch.randn(1, 2, 5, 8, generator=g), torch.arange(5))
    assert cache._native is False and calls == []


def test_kv_cache_decides_again_after_to_and_copies(monkeypatch):
    import copy

    cache = tp.PackedKVCache((1, 2, 8, 8), "int8", KV_BLOCK, True)
    k = torch.randn(1, 2, 3, 8)
    out = cache(k, torch.arange(3))
    assert cache._native is True
    twin = copy.deepcopy(cache)
    assert twin._native is None and torch.equal(twin.dequantize(), out)
    cache.to(torch.float32)
    assert cache._native is None
    calls = spy_kv(monkeypatch)
    assert torch.equal(twin(k, torch.arange(3)), out) and calls == ["store", "load"]


# ------------------------------------------------------------------------------------ qpass_native ops
# native.py registers every kernel as torch.ops.qpass_native.<name> (torch.library.Library + register_fake).

OPS = torch.ops.qpass_native


def op_samples(seed: int = 0) -> dict[str, tuple]:
    """Valid arguments of each op (fresh tensors: kv_store writes into its cache)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 40, generator=g)
    q = torch.randn(2, 5, 4, 16, generator=g).transpose(1, 2)              # [B, H, T, D], a transposed view
    cos, sin = torch.randn(2, 1, 5, 16, generator=g), torch.randn(2, 1, 5, 16, generator=g)
    codes = torch.randint(0, 256, (2, 4, 8, 8), dtype=torch.uint8, generator=g)
    scales = torch.rand(2, 4, 8, 1, generator=g)
    w = torch.randn(24, 64, generator=g)
    scale, zp = Q.choose_qparams(w, QSpec(format_from_name("int4"), PerTensor()), block_size=(1, 32))
    lin = tp.PackedLinear.from_weight(w, scale, zp, (1, 32), "int4", layout="q4", bias=torch.randn(24, generator=g))
    a = torch.randint(-128, 128, (3, 45), dtype=torch.int8, generator=g)
    w8 = torch.randint(-128, 128, (7, 45), dtype=torch.int8, generator=g)
    return {
        "token_quant": (x.clone(), 4, True),
        "rms_norm": (x, torch.randn(40, generator=g), 1e-6),
        "rope": (q, cos, sin),
        "kv_store": (q[:, :, :2], torch.tensor([6, 1]), codes.clone(), scales.clone(), 4),
        "kv_load": (codes, scales, 5, 4, None),
        "q4_linear": (torch.randn(3, 64, generator=g), lin.qweight, lin.scale, lin.zero, lin.bias, 32),
        "i8_linear": (a, torch.rand(3, generator=g), w8, torch.rand(7, generator=g), torch.randn(7, generator=g)),
        "lut_linear": lut_sample(g),
        "attention": attention_sample(g),
    }


def attention_sample(g) -> tuple:
    """attention's arguments: 4 query heads on 2 K/V heads, 2 query rows, 9 of a 12-slot cache, an additive mask."""
    kc, vc = torch.randn(2, 2, 12, 16, generator=g), torch.randn(2, 2, 12, 16, generator=g)
    mask = torch.zeros(1, 1, 2, 9)
    mask[..., 0, 8] = float("-inf")
    return torch.randn(2, 4, 2, 16, generator=g), kc[:, :, :9], vc[:, :, :9], mask, 0.25


def lut_sample(g) -> tuple:
    """lut_linear's arguments: 4-bit codes, tables per group of 16 columns, 3 sparse values, a bias."""
    from qpass.backends.torch_packed import packing as P
    u = torch.randint(0, 16, (6, 40), dtype=torch.uint8, generator=g)
    index = torch.tensor([3, 90, 239], dtype=torch.int32)
    rowptr = torch.searchsorted(index, torch.arange(7, dtype=torch.int64) * 40)
    return (torch.randn(2, 3, 40, generator=g), P.pack_dense(u, 4), torch.randn(6, 3, 16, generator=g), 4, "dense",
            40, 1, 16, rowptr, index, torch.randn(3, generator=g), torch.randn(6, generator=g))


def same(a, b) -> bool:
    """Equal bit for bit (NaNs included), tensors or tuples of them."""
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)) \
        if a.is_contiguous() and b.is_contiguous() else same(a.contiguous(), b.contiguous())


@without_library
def test_every_kernel_is_a_registered_op_with_a_fake_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert set(native.SCHEMAS) == {"token_quant", "rms_norm", "rope", "kv_store", "kv_load", "q4_linear", "i8_linear",
                                   "lut_linear", "attention"}
    for name, schema in native.SCHEMAS.items():
        op = getattr(OPS, name).default
        assert str(op._schema) == f"{native.NAMESPACE}::{schema}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU"), name
    mutable = {a.name for a in OPS.kv_store.default._schema.arguments if a.alias_info and a.alias_info.is_write}
    assert mutable == {"codes", "scales"}
    assert not any(getattr(OPS, n).default._schema.is_mutable for n in native.SCHEMAS if n != "kv_store")
    # the fake kernels: shapes, dtypes and strides of the real outputs (computed here with no data)
    real = {n: getattr(OPS, n).default(*a) for n, a in op_samples().items()} if NATIVE else None
    samples = op_samples()
    with FakeTensorMode() as mode:
        for name, args in samples.items():
            args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
            out = getattr(OPS, name).default(*args)
            if real is None:
                continue
            for f, r in zip(out if isinstance(out, tuple) else (out,), real[name] if isinstance(real[name], tuple)
                            else (real[name],)):
                assert f is None and r is None or (f.shape, f.dtype, f.stride()) == (r.shape, r.dtype, r.stride()), name


@pytest.mark.parametrize("name", list(native.SCHEMAS))
def test_opcheck(name):
    op = getattr(OPS, name).default
    torch.library.opcheck(op, op_samples()[name])


def test_ops_are_the_wrappers_bit_for_bit():
    s = op_samples()
    x, bits, codes = s["token_quant"]
    assert same(OPS.token_quant(x, bits, codes), native.token_quant(x, bits, codes=codes))
    assert same(OPS.token_quant(x, 8, False), native.token_quant(x, 8, codes=False))
    assert same(OPS.rms_norm(*s["rms_norm"]), native.rms_norm(*s["rms_norm"]))
    out, ref = OPS.rope(*s["rope"]), native.rope(*s["rope"])
    assert out.stride() == ref.stride() and same(out, ref)
    k, pos, c1, s1, bits = s["kv_store"]
    c2, s2 = c1.clone(), s1.clone()
    assert OPS.kv_store(k, pos, c1, s1, bits) is None
    native.kv_store(k, pos, c2, s2, bits)
    assert same(c1, c2) and same(s1, s2)
    for n, dtype in ((5, None), (None, torch.bfloat16), (100, torch.float32)):
        assert same(OPS.kv_load(c1, s1, n, bits, dtype), native.kv_load(c1, s1, n, bits, dtype or torch.float32))
    # the linears: the module's bound kernels make the same C call on the same tensors
    w = torch.randn(24, 64)
    scale, zp = Q.choose_qparams(w, QSpec(format_from_name("int4"), PerTensor()), block_size=(1, 32))
    lin = tp.PackedLinear.from_weight(w, scale, zp, (1, 32), "int4", layout="q4", bias=torch.randn(24))
    xs = torch.randn(5, 64)
    assert same(OPS.q4_linear(xs, lin.qweight, lin.scale, lin.zero, lin.bias, 32),
                kernels.KERNELS["q4avx2"].run(lin, xs))
    scale, zp = Q.choose_qparams(w, QSpec(format_from_name("int8"), PerTensor()), block_size=(1, -1))
    lin8 = tp.PackedLinear.from_weight(w, scale, zp, (1, -1), "int8", bias=torch.randn(24),
                                       act=tp.ActFormat("int8", (1, -1), True, True))
    a, sa = native.token_quant(xs, 8, codes=True)
    assert same(OPS.i8_linear(a, sa, lin8.qweight, lin8.row_scale, lin8.bias), kernels.KERNELS["i8avx2"].run(lin8, xs))
    args = s["lut_linear"]
    assert same(OPS.lut_linear(*args), native.lut_linear(*args))
    assert same(OPS.attention(*s["attention"]), native.attention(*s["attention"]))


def without_native(monkeypatch) -> None:
    """As in a process started with QPASS_NO_NATIVE=1: the library disabled and not loaded."""
    monkeypatch.setenv(native.ENV_DISABLE, "1")
    monkeypatch.delitem(native._state, "lib", raising=False)
    assert not native.available() and not native.native_on()


@without_library
def test_without_the_library_the_ops_run_their_torch_fallback(monkeypatch):
    """Fallback semantics (and, where the library is there, equality with it: bit for bit but rms_norm, whose
    mean is summed in another order, q4_linear and lut_linear, matmuls in another order)."""
    s = op_samples(1)
    s["token_quant"][0][0, 1, 3] = float("inf")                               # a non-finite token
    ran = {}
    if NATIVE:
        for name, args in op_samples(1).items():
            if name == "token_quant":
                args[0][0, 1, 3] = float("inf")
            ran[name] = (getattr(OPS, name).default(*args), args)
    without_native(monkeypatch)
    for name, args in s.items():
        out = getattr(OPS, name).default(*args)
        if name == "kv_store":
            out = args[2:4]                                                   # what it wrote
            if NATIVE:
                ran[name] = (ran[name][1][2:4], None)
        if not NATIVE:
            continue
        ref = ran[name][0]
        if name in ("rms_norm", "q4_linear", "lut_linear", "attention"):
            assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5), name
        else:
            assert same(out, ref), name
    # and against the torch references the module docstring states
    x = s["token_quant"][0]
    codes, sc = OPS.token_quant(x, 4, True)
    assert sc[1].isnan() and (codes[1] == 0).all() and OPS.token_quant(x, 4, False)[0][0, 1].isnan().all()
    fin = torch.ones(6, dtype=torch.bool)
    fin[1] = False
    assert torch.equal(OPS.token_quant(x, 4, False)[0].reshape(6, -1)[fin],
                       Q.fake_quantize_dynamic(x, [1, 1, -1], "int4", True).reshape(6, -1)[fin])
    assert torch.equal(OPS.rms_norm(*s["rms_norm"]), rms_ref(*s["rms_norm"]))
    assert torch.equal(OPS.rope(*s["rope"]), rope_ref(*s["rope"]))
    a, sa, w8, ws, b = s["i8_linear"]
    assert torch.equal(OPS.i8_linear(a, sa, w8, ws, b), (a.double() @ w8.double().t()).float() * sa[:, None] * ws + b)
    with pytest.raises(IndexError):
        OPS.kv_store(*s["kv_store"][:1], torch.tensor([8]), *s["kv_store"][2:])


@without_library
def test_ops_trace_and_export():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(16))

        def forward(self, x, cos, sin):
            h = OPS.rms_norm(x, self.w, 1e-6)                                  # [B, H, T, D]
            return OPS.token_quant(OPS.rope(h, cos, sin), 8, False)[0]

    args = (torch.randn(1, 2, 3, 16), torch.randn(1, 1, 3, 16), torch.randn(1, 1, 3, 16))
    ep = torch.export.export(Block(), args)
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets[:3] == ["qpass_native.rms_norm.default", "qpass_native.rope.default",
                           "qpass_native.token_quant.default"]
    assert all(t == "<built-in function getitem>" for t in targets[3:])
    if NATIVE:
        m = Block()
        ep = torch.export.export(m, args)
        assert torch.equal(ep.module()(*args), m(*args))
    gm = torch.fx.symbolic_trace(lambda x, w: OPS.rms_norm(x, w, 1e-5))
    assert "torch.ops.qpass_native.rms_norm" in gm.code


def _decode_setup(kv=None):
    import qpass
    from tests import toy

    model = toy.hf_model("llama")
    recipe = {"passes": [{"quantize": {"weights": {"bits": 4, "granularity": "per_group", "group_size": 16},
                                       "ignore": ["lm_head"]}}]
              + ([{"kv_cache": {"keys": kv, "values": kv}}] if kv else [])}
    pm = qpass.lower(qpass.apply(model, recipe, progress=False), "torch", kernels="exact")
    ids = toy.token_ids(1, 9)
    steps = [(ids[:, :6], torch.arange(6))] + [(ids[:, i:i + 1], torch.tensor([i])) for i in range(6, 9)]
    return pm, steps


def test_a_lowered_decode_graph_holds_the_ops_and_keeps_its_logits(monkeypatch):
    monkeypatch.setenv("QPASS_NATIVE_SEGMENTS", "0")      # the ops as graph nodes (test_segments: inside segments)
    pm, steps = _decode_setup({"bits": 4, "granularity": "per_token", "dynamic": True})
    gm = pm.decode_graph(64)
    count = lambda t: sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is t)   # noqa: E731
    assert count(OPS.rms_norm.default) == 5 and count(OPS.rope.default) == 4
    text = str(gm.graph)
    assert "qpass_native.rms_norm.default" in text and "qpass_native.rope.default" in text
    assert "torch.ops.qpass_native.rms_norm.default(" in gm.code
    with torch.no_grad():
        logits = [gm(input_ids=ids, cache_position=pos) for ids, pos in steps]
    # the same graph calling the Python wrappers (what it held before the ops; freeze's direct_ops): the same
    # logits, bit for bit
    from qpass.backends.torch_packed import runtime

    assert count(OPS.attention.default) == 2
    assert runtime.freeze(gm, direct_ops=True)["direct_ops"] == 11
    assert not any(str(n.target).startswith("qpass_native") for n in gm.graph.nodes)
    assert sum(1 for n in gm.graph.nodes if n.target is native.rms_norm) == 5
    with torch.no_grad():
        again = [gm(input_ids=ids, cache_position=pos) for ids, pos in steps]
    assert all(torch.equal(a, b) for a, b in zip(logits, again))


@without_library
def test_without_the_library_the_decode_graph_keeps_the_aten_ops(monkeypatch):
    without_native(monkeypatch)
    pm, steps = _decode_setup()
    gm = pm.decode_graph(64)
    assert not any(str(n.target).startswith("qpass_native") for n in gm.graph.nodes)
    assert not {"rms_norm", "rope", "attention"} & set(gm.meta["qpass_runtime"])
    with torch.no_grad():
        assert all(gm(input_ids=ids, cache_position=pos).isfinite().all() for ids, pos in steps)
