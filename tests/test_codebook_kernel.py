"""The native codebook kernel (csrc/q4avx2.c ``lut_linear``, native.lut_linear, kernel ``lutavx2``) against the
torch decode of the same codes and tables, and its wiring into CodebookLinear (kernels.tune's measured choice,
the reference fallback, QPASS_NO_NATIVE=1, save / load).

Exactness (what is asserted): the kernel's weights are the reference decode's values exactly (the table is looked
up, never recomputed), so outputs differ from decode + fp32 matmul only by summation order (and a sparse value
entering as v * x rather than into the weight): within 1e-5 of max |output| here.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qpass
from qpass.backends import torch_packed as tp
from qpass.backends.torch_packed import codebook as C
from qpass.backends.torch_packed import kernels, native
from qpass.backends.torch_packed import packing as P

NATIVE = native.available()
needs_native = pytest.mark.skipif(not NATIVE, reason=f"native kernels not available here: {native.status()}")
LAYOUTS = [("dense", 1), ("dense", 2), ("dense3", 3), ("dense", 4), ("bitplanes", 1), ("bitplanes", 2),
           ("bitplanes", 3), ("bitplanes", 4)]


def close(out, ref, tol=1e-5):
    scale = max(ref.abs().max().item(), 1.0)
    assert out.shape == ref.shape and (out - ref).abs().max().item() <= tol * scale, (out - ref).abs().max()


def pack(u, layout, bits):
    return P.pack_dense(u, bits) if layout == "dense" else P.pack_dense3(u) if layout == "dense3" else \
        P.pack_bitplanes(u, bits)


def case(g, layout, bits, n, k, sn, sk, bk, nnz):
    u = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=g)
    table = torch.randn(sn, sk, 16 if bits == 4 else 8, generator=g)
    index = torch.randperm(n * k, generator=g)[:nnz].sort().values.to(torch.int32)
    value = torch.randn(nnz, generator=g)
    rowptr = torch.searchsorted(index, torch.arange(n + 1, dtype=torch.int64) * k)
    return pack(u, layout, bits), table, index, value, rowptr


# ------------------------------------------------------------------------------------------- packing


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 5), st.integers(1, 70))
def test_dense3_round_trips_at_three_bits_per_code(seed, n, k):
    u = torch.randint(0, 8, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    q = P.pack_dense3(u)
    assert q.shape == (n, 3 * -(-k // 8)) == C.packed_shape(3, n, k) and q.dtype == torch.uint8
    assert torch.equal(P.unpack_dense3(q, k), u)
    word = int(q[0, 0]) | int(q[0, 1]) << 8 | int(q[0, 2]) << 16 if k >= 8 else None     # code i at bits 3i
    if word is not None:
        assert [(word >> (3 * i)) & 7 for i in range(8)] == u[0, :8].tolist()


def test_old_bit_plane_codes_load_into_dense3():
    g = torch.Generator().manual_seed(0)
    u = torch.randint(0, 8, (6, 20), dtype=torch.uint8, generator=g)
    kw = dict(fmt="codebook3", block=[1, -1], scale=torch.rand(6, 1), codebook=torch.randn(6, 1, 8), outliers=None,
              bias=None)
    mod = C.CodebookLinear(codes=u, **kw)
    state = {**mod.state_dict(), "qweight": P.pack_bitplanes(u, 3)}     # as a qpass before dense3 saved it
    other = C.CodebookLinear(codes=torch.zeros_like(u), **kw)
    other.load_state_dict(state)
    assert torch.equal(other.codes(), u) and torch.equal(other.qweight, mod.qweight)


# -------------------------------------------------------------------------------------------- kernel


@needs_native
@pytest.mark.parametrize("layout,bits", LAYOUTS)
@pytest.mark.parametrize("n,k,sn,sk,bn,bk", [(7, 45, 7, 1, 1, 45), (5, 200, 5, 13, 1, 16), (9, 64, 3, 2, 3, 32),
                                             (4, 1031, 1, 1, 4, 1031), (3, 1040, 3, 9, 1, 128)],
                         ids=["per_row_odd_k", "groups16_tail", "row_blocks", "per_tensor", "groups128"])
def test_lut_linear_is_the_decode_and_matmul(layout, bits, n, k, sn, sk, bn, bk):
    g = torch.Generator().manual_seed(bits * 1000 + k)
    qw, table, index, value, rowptr = case(g, layout, bits, n, k, sn, sk, bk, nnz=6)
    w = native.lut_weight(qw, table, bits, layout, k, bn, bk)
    bias = torch.randn(n, generator=g)
    for m in (1, 2, 5, 8, 9, 17):
        x = torch.randn(m, k, generator=g)
        close(native.lut_linear(x, qw, table, bits, layout, k, bn, bk, bias=bias), x @ w.t() + bias)
        ws = w.reshape(-1).index_add(0, index.long(), value).view(n, k)
        close(native.lut_linear(x, qw, table, bits, layout, k, bn, bk, rowptr, index, value), x @ ws.t())
    x = torch.randn(2, 3, k, generator=g)                                    # leading dims
    close(native.lut_linear(x, qw, table, bits, layout, k, bn, bk), x @ w.t())


@needs_native
def test_lut_linear_refuses_bad_arguments():
    qw, table, *_ = case(torch.Generator().manual_seed(0), "dense", 4, 4, 40, 4, 5, 8, 0)
    with pytest.raises(RuntimeError, match="lut_linear failed"):         # groups of 12 columns: not whole chunks
        native.lut_linear(torch.randn(1, 40), qw, table, 4, "dense", 40, 1, 12)
    with pytest.raises(RuntimeError, match="lut_linear failed"):
        native.lut_linear(torch.randn(1, 40), qw, table, 5, "bitplanes", 40, 1, 8)   # 5 bits: 32 entries
    with pytest.raises(ValueError, match="expected fp32"):
        native.lut_linear(torch.randn(1, 40).double(), qw, table, 4, "dense", 40, 1, 8)


# -------------------------------------------------------------------------------------- CodebookLinear


def module(bits, n, k, group=None, nnz=0, seed=0, bias=True, half=True):
    g = torch.Generator().manual_seed(seed)
    sk = 1 if group is None else -(-k // group)
    dt = torch.float16 if half else torch.float32
    idx = torch.randperm(n * k, generator=g)[:nnz]                    # unsorted: the module sorts them
    return C.CodebookLinear(fmt=f"codebook{bits}", block=[1, -1 if group is None else group],
                            codes=torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=g),
                            scale=(torch.rand(n, sk, generator=g) + 0.5).to(dt),
                            codebook=torch.randn(n, sk, 1 << bits, generator=g).to(dt),
                            outliers=(idx, torch.randn(nnz, generator=g).to(dt)) if nnz else None,
                            bias=torch.randn(n, generator=g) if bias else None)


def force(mod, kernel):
    mod.plan = dict.fromkeys(tp.BUCKETS, kernel)


@needs_native
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group,nnz", [(None, 0), (None, 9), (16, 0), (8, 5)], ids=["row", "row_sparse", "g16", "g8_sparse"])
def test_module_native_kernel_matches_the_reference(bits, group, nnz):
    mod = module(bits, 37, 72, group, nnz, seed=bits)
    assert "lutavx2" in kernels.candidates(mod) and kernels.candidates(mod, "exact") == ["dequant", "lutavx2"]
    for m in (1, 4, 8, 20):
        x = torch.randn(2, m, 72)
        ref = mod.reference(x)
        force(mod, "lutavx2")
        out = mod(x)
        force(mod, "dequant")
        assert torch.equal(mod(x), ref)
        close(out, ref)


@needs_native
def test_module_native_kernel_with_an_input_quantizer_and_half_inputs():
    mod = module(4, 16, 64, 32, 3)
    mod.act = tp.ActFormat("int8", (1, -1), True, True)
    x = torch.randn(3, 64)
    ref = mod.reference(x)
    force(mod, "lutavx2")
    close(mod(x), ref)
    y = mod(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == (3, 16)


def test_kernels_that_do_not_apply_fall_back_to_the_reference(monkeypatch):
    wide = module(5, 8, 32)                                          # 5 bits: no native route
    assert kernels.candidates(wide) == ["dequant"]
    force(wide, "lutavx2")
    x = torch.randn(2, 32)
    assert torch.equal(wide(x), wide.reference(x))
    odd = module(3, 8, 36, group=12)                                 # groups of 12 columns
    assert not odd.native_applies()
    monkeypatch.setenv(native.ENV_DISABLE, "1")                      # as QPASS_NO_NATIVE=1
    monkeypatch.delitem(native._state, "lib", raising=False)
    mod = module(3, 8, 32)
    assert kernels.candidates(mod) == ["dequant"]
    force(mod, "lutavx2")                                            # a plan saved where the library was
    assert set(mod._runners.values()) == {mod.reference}
    assert torch.equal(mod(x), mod.reference(x))
    assert kernels.tune([mod], "auto")[0].choice == "dequant"


@needs_native
def test_tune_measures_the_codebook_kernels_per_shape_and_bucket():
    a, b = module(3, 64, 128, seed=1), module(3, 64, 128, seed=2)
    records = kernels.tune([a, b], "auto", repeats=2, cache=False)
    assert len(records) == len(tp.BUCKETS) and all(r.modules == ["", ""] for r in records)
    assert all(set(r.times_ms) == {"dequant", "lutavx2"} for r in records)
    assert a.plan == b.plan and set(a.plan) == set(tp.BUCKETS)
    kernels.tune([a], "reference")
    assert set(a.plan.values()) == {"dequant"}
    kernels.tune([a], "lutavx2")
    assert set(a.plan.values()) == {"lutavx2"}
    kernels.tune([a], "q4avx2")                                      # names a kernel that does not apply: fallback
    assert set(a.plan.values()) == {"dequant"}


@needs_native
@pytest.mark.parametrize("family,bits,group,outliers", [("llama", 3, None, 5), ("gpt2", 4, 16, 3)])
def test_lowered_model_on_the_native_kernel_matches_fake_quant_and_reloads(family, bits, group, outliers, tmp_path):
    from tests.test_codebook_lowering import _llm, codebook_quantize
    qm, ids = _llm(family)
    codebook_quantize(qm, bits, group, outliers)
    ref = qm(ids).logits
    pm = qpass.lower(qm, "torch", kernels="lutavx2")
    cbs = pm.codebooks()
    assert cbs and all(set(m.plan.values()) == {"lutavx2"} for m in cbs.values())
    assert set(cbs) <= set(pm.plan())
    torch.testing.assert_close(pm(ids).logits, ref, rtol=0, atol=5e-5)
    auto = qpass.lower(qm, "torch")                                  # measured: a plan for every codebook linear
    assert all(set(m.plan) == set(tp.BUCKETS) for m in auto.codebooks().values())
    torch.testing.assert_close(auto(ids).logits, ref, rtol=0, atol=5e-5)


@needs_native
def test_a_saved_measured_plan_covers_the_codebook_linears(tmp_path):
    import json

    from tests.test_squeezellm import _apply
    _, qm = _apply("llama", outliers=0.01)
    ids = torch.randint(0, 64, (1, 8))
    pm = qpass.lower(qm, "torch")
    assert pm.codebooks() and set(pm.codebooks()) <= set(pm.plan())
    pm.save(tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "kernels.json").read_text())["plan"]
    assert set(pm.codebooks()) <= set(saved)
    back = tp.load(tmp_path / "p")                                   # same machine: the saved plan is reused
    assert back.plan() == pm.plan()
    assert torch.equal(back(ids).logits, pm(ids).logits)
    forced = tp.load(tmp_path / "p", kernels="lutavx2")
    assert all(set(m.plan.values()) == {"lutavx2"} for m in forced.codebooks().values())
    torch.testing.assert_close(forced(ids).logits, qm(ids).logits, rtol=0, atol=5e-5)


# ---------------------------------------------------------------------------------------------------- BCQ


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.booleans())
def test_bcq_tables_factor_back_into_their_alphas(seed, q, offset):
    from qpass.primitives import bcq
    g = torch.Generator().manual_seed(seed)
    alpha = (torch.rand(5, 3, q, generator=g) * torch.tensor([0.5 ** i for i in range(q)]) + 1e-3).half()
    z = (torch.randn(5, 3, generator=g) * 0.1).half() if offset else None
    table = bcq.table(alpha.float(), None if z is None else z.float())
    a2, z2 = C.bcq_factors(table, q, offset)
    assert torch.equal(a2, alpha) and (z2 is None) == (z is None) and (z is None or torch.equal(z2, z))
    assert torch.equal(bcq.table(a2.float(), None if z2 is None else z2.float()), table)


def test_bcq_linears_store_alphas_not_tables_and_reload(tmp_path):
    from tests.test_bcq import IDS, _bcq
    from tests import toy
    qm = qpass.apply(toy.hf_model("llama"), _bcq(offset=True), progress=False)
    pm = qpass.lower(qm, "torch", kernels="reference")
    mods = pm.codebooks()
    assert mods and all(m.fmt == "bcq3z" for m in mods.values())
    for m in mods.values():                          # 3 bits per weight (K padded to 8) + 4 fp16 values per group
        assert set(m.state_dict()) == {"qweight", "bcq_alpha", "bcq_z"}
        assert m.weight_bytes() * 8 == m.n * -(-m.k // 8) * 8 * 3 + m.bcq_alpha.shape[:2].numel() * 4 * 16
    assert torch.equal(pm(IDS).logits, qm(IDS).logits)          # the rebuilt tables are the graph's, bit for bit
    pm.save(tmp_path / "p")
    back = tp.load(tmp_path / "p")
    assert torch.equal(back(IDS).logits, pm(IDS).logits)
