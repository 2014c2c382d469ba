"""BCQ (LUT-GEMM's binary-coding quantization): the fit (qpass.primitives.bcq), the pass (passes/bcq.py), its
bit accounting, save/load and lowering."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qpass
from qpass.errors import QuantizationError
from qpass.eval import weight_bytes
from qpass.primitives import bcq as B
from qpass.primitives import formats as F
from qpass.primitives import quant as Q
from qpass.quantizer import quantizers
from tests import toy

IDS = toy.token_ids(batch=2, t=9, seed=5)


def _bcq(**kw):
    return {"passes": [{"bcq": {"bits": 3, "group_size": 16, "ignore": ["lm_head"], **kw}}]}


def _groups(n=6, g=32, seed=0):
    return torch.randn(n, g, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ primitive


def test_table_is_every_signed_sum_in_code_order():
    alpha, z = torch.tensor([[1.0, 0.25, 4.0]]), torch.tensor([0.5])
    t = B.table(alpha, z)
    assert t.shape == (1, 8)
    for c in range(8):
        want = 0.5 + sum(a * (1 if c >> i & 1 else -1) for i, a in enumerate([1.0, 0.25, 4.0]))
        assert float(t[0, c]) == want
    assert torch.equal(B.decode(B.encode(t, alpha, z), alpha, z), t)          # the entries are their own codes


@settings(max_examples=40, deadline=None)
@given(q=st.integers(1, 4), offset=st.booleans(), seed=st.integers(0, 50), g=st.sampled_from([1, 7, 32, 128]),
       iters=st.integers(0, 6))
def test_greedy_then_alternating_never_increases_the_error(q, offset, seed, g, iters):
    w = _groups(5, g, seed) * (1 + seed % 3) + (seed % 5 - 2)
    a, z, c = B.greedy(w, q, offset)
    e0 = B.group_error(w, a, z, c)
    prev = e0
    fit = None
    for _ in range(iters):      # one round at a time: never up, group by group
        fit = B.refine(w, a, z, c, 1)
        assert torch.all(fit.error <= prev)
        a, z, c, prev = fit.alpha, fit.z, fit.codes, fit.error
    full = B.bcq_fit(w, q, offset=offset, iterations=iters, storage_dtype=None)
    assert torch.all(full.error <= e0 * (1 + 1e-6) + 1e-7) and torch.all(full.error <= prev * (1 + 1e-6) + 1e-7)
    # the codes are the nearest entries of the table: what the codebook quantizer computes
    fq = F.fake_quantize_ext(w, torch.ones(w.shape[0], 1), None, [1, -1], B.format_name(q, offset),
                             codebook=full.table.unsqueeze(1))
    assert torch.allclose(((w - fq) ** 2).sum(-1), full.error, rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(q=st.integers(1, 4), offset=st.booleans(), seed=st.integers(0, 100))
def test_a_weight_that_is_a_bcq_sum_is_represented_exactly(q, offset, seed):
    """Every group holds each of the 2^q sign combinations equally often (balanced), α's dominate in turn
    (α_i > Σ_{j>i} α_j): greedy finds the planes and α's, the refinement keeps them."""
    gen = torch.Generator().manual_seed(seed)
    alpha = (2.0 ** -torch.arange(q).float()) * (0.5 + torch.rand(4, 1, generator=gen))   # dyadic-like: dominant
    alpha = alpha.to(torch.float16).float()
    z = (torch.randn(4, generator=gen) if offset else torch.zeros(4)).to(torch.float16).float()
    codes = torch.stack([torch.randperm(2 ** q * 4, generator=gen) % 2 ** q for _ in range(4)])
    w = B.decode(codes, alpha, z if offset else None)
    fit = B.bcq_fit(w, q, offset=offset)
    assert torch.equal(B.decode(fit.codes, fit.alpha, fit.z), w)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_a_uniform_int_grid_converts_to_bcq_with_offset_exactly(bits, symmetric):
    """methods.md §14 (d): INT-q with a zero point is BCQ(q) plus an offset, and the int code is the BCQ code."""
    w = _groups(8, 64, seed=bits)
    spec = qpass.QSpec(qpass.IntFormat(bits), qpass.PerGroup(16), symmetric=symmetric)
    s, zp = Q.choose_qparams(w, spec)
    block = [1, 16]
    codes = Q.quantize(w, s, zp, block, f"int{bits}")
    deq = Q.dequantize(codes, s, zp, block, f"int{bits}")
    alpha, z = B.from_uniform(s, zp, bits)
    ucodes = codes.long() + (0 if not symmetric else 2 ** (bits - 1))
    got = B.decode(ucodes.reshape(8, 4, 16), alpha, z).reshape(8, 64)
    torch.testing.assert_close(got, deq, rtol=0, atol=1e-6)


def test_best_init_is_never_worse_than_the_min_max_grid_or_greedy():
    w = _groups(32, 128, seed=3)
    for q in (2, 3, 4):
        greedy = B.bcq_fit(w, q, storage_dtype=None)
        best = B.bcq_fit(w, q, init="best", storage_dtype=None)
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        s = (hi - lo) / (2 ** q - 1)
        rtn = torch.round((w - lo) / s) * s + lo                            # min-max grid, unrounded zero point
        assert torch.all(best.error <= greedy.error + 1e-6)
        assert torch.all(best.error <= ((w - rtn) ** 2).sum(-1) * (1 + 1e-5) + 1e-6)


def test_row_chunks_give_the_same_fit(monkeypatch):
    w = _groups(50, 40, seed=2)
    tab, fit = B.bcq_weight(w, 3, 16)
    monkeypatch.setattr(B, "_CHUNK", 1000)              # a few rows at a time
    tab2, fit2 = B.bcq_weight(w, 3, 16)
    assert torch.equal(tab, tab2) and torch.equal(fit.codes, fit2.codes) and torch.equal(fit.error, fit2.error)


def test_partial_last_group_and_fp16_storage():
    w = _groups(4, 40, seed=1)
    tab, fit = B.bcq_weight(w, 3, 16)
    assert tab.shape == (4, 3, 8) and fit.codes.shape == (4, 40)
    assert torch.equal(fit.alpha, fit.alpha.half().float()) and torch.equal(fit.z, fit.z.half().float())
    fq = F.fake_quantize_ext(w, torch.ones(4, 3), None, [1, 16], "bcq3z", codebook=tab)
    err = ((w - fq) ** 2)
    got = torch.cat([err[:, :32].reshape(4, 2, 16).sum(-1), err[:, 32:].sum(-1, keepdim=True)], 1)
    torch.testing.assert_close(got, fit.error)
    with pytest.raises(ValueError, match="1..8 planes"):
        B.bcq_fit(w, 9)
    with pytest.raises(ValueError, match="needs the offset"):
        B.bcq_fit(w, 3, offset=False, init="best")


def test_formats_are_codebooks_that_store_alphas_not_tables():
    f = F.get_format("bcq3z")
    assert f.kind == "codebook" and f.bits == 3 and f.table_size == 8 and f.table_values == 4 and not f.stores_scale
    assert F.get_format("bcq2").table_values == 2 and F.get_format("codebook3").table_values == 8
    assert F.get_format("codebook3").stores_scale


# ------------------------------------------------------------------------------------------- the pass


@pytest.mark.parametrize("offset", [True, False])
def test_bcq_fires_counts_the_true_bits_and_lowers_to_torch(offset):
    model = toy.hf_model("llama")
    qm = qpass.apply(model, _bcq(offset=offset), progress=False)
    stats = qm.report["bcq"].stats
    qs = quantizers(qm.graph_module, role="weight")
    assert stats["linears"] == len(qs) == 14 and stats["format"] == ("bcq3z" if offset else "bcq3")
    assert 0 < stats["relative_weight_error"] < 0.1
    assert all(q.op == "fake_quantize_ext" and q.codebook is not None and q.fmt.name == stats["format"] for q in qs)
    # bits: 3 per weight, plus 3 α's (and z) per group of 16 at fp16; no scales, no 2^q-entry tables
    wb = weight_bytes(qm)
    numel = sum(q.x.meta["val"].numel() for q in qs)
    groups = sum(torch.Size(Q.scale_shape(q.x.meta["val"].shape, q.block)).numel() for q in qs)   # partial ones too
    per_group = 3 + offset
    assert wb["quantized_bits_per_weight"] == pytest.approx((3 * numel + 16 * per_group * groups) / numel)
    assert wb["linear_weight_bytes"] == pytest.approx(
        weight_bytes(model)["linear_weight_bytes"] - 4 * numel + numel * 3 / 8 + groups * per_group * 2, abs=1)
    ref = qm(IDS).logits.detach()
    assert not torch.allclose(ref, model(IDS).logits)
    torch.testing.assert_close(qpass.lower(qm, "torch")(IDS).logits, ref, rtol=0, atol=1e-4)


def test_init_best_is_never_worse_than_greedy_on_a_model():
    """init best keeps, per group, the lower-error of two refined starts, one of them the paper's greedy."""
    model = toy.hf_model("llama")
    bcq = qpass.apply(model, _bcq(bits=3, init="best"), progress=False).report["bcq"].stats
    greedy = qpass.apply(model, _bcq(bits=3), progress=False).report["bcq"].stats
    assert bcq["relative_weight_error"] <= greedy["relative_weight_error"] * (1 + 1e-4)


def test_on_the_mm_family_the_table_follows_the_transposed_weight():
    """GPT-2's Conv1D weight is stored [in, out]: groups run along axis 0 of the quantizer's input."""
    model = toy.hf_model("gpt2")
    qm = qpass.apply(model, _bcq(), progress=False)
    qs = quantizers(qm.graph_module, role="weight")
    assert qs and all(q.block[0] == 16 for q in qs)
    torch.testing.assert_close(qpass.lower(qm, "torch")(IDS).logits, qm(IDS).logits, rtol=0, atol=1e-4)


def test_save_load_is_exact(tmp_path):
    qm = qpass.apply(toy.hf_model("llama"), _bcq(bits=2, group_size=-1), progress=False)
    qm.save(tmp_path / "m")
    torch.testing.assert_close(qpass.load(tmp_path / "m")(IDS).logits, qm(IDS).logits, rtol=0, atol=0)


def test_onnx_parity():
    pytest.importorskip("onnxruntime")
    from qpass.backends.onnx_qdq import patterns
    qm = qpass.apply(toy.hf_model("llama"), _bcq(), progress=False)
    try:
        patterns.check_supported(qm.graph_module)
    except qpass.UnsupportedOpError as e:
        pytest.skip(f"the ONNX backend does not lower per-group codebooks yet (the squeezellm helper's codebook "
                    f"lowering): {str(e).splitlines()[0]}")
    import tempfile

    from qpass.backends import onnx_qdq
    with tempfile.TemporaryDirectory() as d:
        art = qpass.lower(qm, "onnx", d + "/onnx", fused_accuracy_level=0)
        torch.testing.assert_close(onnx_qdq.logits(art.path, IDS), qm(IDS).logits.detach(), atol=1e-4, rtol=1e-4)


def test_bcq_does_nothing_when_its_targets_are_all_ignored_and_errors_clearly():
    model = toy.hf_model("llama")
    qm = qpass.apply(model, _bcq(ignore=["*"]), progress=False)
    assert not quantizers(qm.graph_module) and qm.report["bcq"].stats["linears"] == 0
    with pytest.raises(qpass.TargetNotFoundError, match="q_prj"):
        qpass.apply(model, _bcq(targets=["*.q_prj"]), progress=False)
    bad = [({"bits": 0}, "passes\\[0\\].bcq.bits: BCQ has 1..8"), ({"bits": 9}, "bits"),
           ({"group_size": 0}, "group_size: must be >= 1, or -1"), ({"iterations": -1}, "iterations"),
           ({"init": "kmeans"}, "init"), ({"init": "best", "offset": False}, "init: best .*offset: true")]
    for cfg, msg in bad:
        with pytest.raises(qpass.RecipeError, match=msg):
            qpass.Recipe.from_dict({"passes": [{"bcq": cfg}]})
    with pytest.raises(QuantizationError, match="(?s)already quantized.*fix"):
        qpass.apply(model, {"passes": [{"quantize": {"weights": {"bits": 4}}}, {"bcq": {}}]}, progress=False)
