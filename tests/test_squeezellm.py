"""SqueezeLLM (passes/squeezellm.py, qpass/primitives/squeezellm.py): Fisher-weighted k-means tables per output
channel, dense-and-sparse; lowered to torch (CodebookLinear) and ONNX (Gather + MatMul) with parity."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qpass
from qpass.eval import weight_bytes
from qpass.graph import linear_sites
from qpass.primitives import formats as F
from qpass.primitives import quant as Q
from qpass.primitives import squeezellm as S
from qpass.primitives.spec import IntFormat, PerChannel, QSpec
from qpass.quantizer import quantizers
from tests import toy

CALIB = [toy.token_ids(batch=1, t=16, seed=s) for s in range(4)]


def recipe(**kw):
    return {"passes": [{"squeezellm": {"bits": 3, "iters": 10, "ignore": ["lm_head"], **kw}}]}


def _apply(family="llama", **kw):
    model = toy.hf_model(family)
    return model, qpass.apply(model, recipe(**kw), calib_data=CALIB, progress=False)


# ------------------------------------------------------------------------------------------- primitives


def _weighted_err(w, f, c):
    return S._objective(w.double(), f.double(), c.double())


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 4), st.integers(1, 5), st.integers(8, 40))
def test_weighted_kmeans_is_never_worse_than_the_uniform_grid_and_has_2_to_the_b_entries(seed, bits, n, k):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)
    f = torch.rand(n, k, generator=g) ** 4                       # skewed sensitivities
    c = S.weighted_kmeans(w, f, 2 ** bits, iters=20)
    assert c.shape == (n, 2 ** bits)
    uniform = S.uniform_init(w.double(), 2 ** bits)
    assert torch.all(_weighted_err(w, f, c) <= _weighted_err(w, f, uniform) + 1e-12)
    # the uniform start is int RTN's grid: with F = 1 the k-means MSE is at most RTN's (the paper's sanity check)
    ones = torch.ones_like(w)
    c1 = S.weighted_kmeans(w, ones, 2 ** bits, iters=20)
    spec = QSpec(IntFormat(bits), PerChannel(0))
    scale, _ = Q.choose_qparams(w, spec)
    rtn = Q.fake_quantize(w, scale, None, [1, -1], f"int{bits}")
    assert float(_weighted_err(w, ones, c1).sum()) <= float(((w - rtn).double() ** 2).sum()) + 1e-9


def test_weighted_objective_beats_unweighted_kmeans_on_its_own_objective():
    """The paper's check: the Fisher-weighted tables have a lower weighted error than plain k-means' tables."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 256, generator=g)
    f = torch.rand(16, 256, generator=g) ** 8
    weighted = _weighted_err(w, f, S.weighted_kmeans(w, f, 8)).sum()
    plain = _weighted_err(w, f, S.weighted_kmeans(w, torch.ones_like(w), 8)).sum()
    assert weighted < 0.9 * plain


def test_sparse_mask_takes_magnitude_outliers_then_sensitive_values():
    w = torch.zeros(4, 50)
    w[1, 3], w[2, 7] = 10.0, -9.0
    f = torch.zeros(4, 50)
    f[0, 0], f[1, 3] = 5.0, 9.0                  # (1, 3) is already an outlier: the next most sensitive is (0, 0)
    m = S.sparse_mask(w, f, outliers=2 / 200, sensitive=1 / 200)
    assert m.sum() == 3 and m[1, 3] and m[2, 7] and m[0, 0]


def test_squeezellm_quantize_is_exact_on_the_sparse_values_and_the_codes_hit_the_table():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 64, generator=g)
    w[3, 5] = 25.0
    r = S.squeezellm_quantize(w, torch.rand(8, 64, generator=g), 3, outliers=1 / 512, sensitive=2 / 512, iters=10)
    assert r.table.shape == (8, 1, 8) and r.table.dtype == r.scale.dtype == torch.float16
    assert r.index.numel() == 3 and 3 * 64 + 5 in r.index.tolist()
    wq = F.fake_quantize_ext(w, r.scale.float(), None, (1, -1), "codebook3", codebook=r.table.float(),
                             outliers=(r.index, r.value))
    flat = (wq - w).reshape(-1)
    assert torch.all(flat[r.index].abs() <= r.value.float().abs() * 2 ** -10 + 1e-7)   # fp16 residuals
    assert r.scale[3] < 5                                                    # the outlier left the row's range


# ------------------------------------------------------------------------------------------------- pass


def test_squeezellm_fires_one_codebook_quantizer_per_linear():
    model, qm = _apply(outliers=0.01, sensitive=0.01)
    stats = qm.report["squeezellm"].stats
    n_lin = len([s for s in linear_sites(qm.graph_module) if s.path != "lm_head"])
    assert stats["linears"] == n_lin and stats["fisher_samples"] == 4 and stats["sparse_values"] > 0
    qs = quantizers(qm.graph_module, role="weight")
    assert len(qs) == n_lin
    for q in qs:
        assert q.fmt_name == "codebook3" and q.granularity == "per_channel" and q.side_channels.names == ("outliers",)
        assert qm.graph_module.get_buffer(q.codebook.target).shape[-1] == 8
    ids = toy.token_ids()
    err = (qm(ids).logits - model(ids).logits).abs().max()
    assert 0 < err < 1.0


def test_bits_per_weight_count_codes_tables_scales_and_sparse_values():
    _, qm = _apply(outliers=0.01, sensitive=0.0)
    gm = qm.graph_module
    numel = rows = table = nnz = 0
    for q in quantizers(gm, role="weight"):
        w = q.x.meta["val"]
        numel += w.numel()
        rows += gm.get_buffer(q.scale.target).numel()
        table += gm.get_buffer(q.codebook.target).numel()
        nnz += gm.get_buffer(q.side_channels.outliers.index.target).numel()
    expect = (3 * numel + 16 * rows + 16 * table + (16 + 32) * nnz) / numel
    assert nnz > 0 and weight_bytes(qm)["quantized_bits_per_weight"] == pytest.approx(expect)


def test_no_linear_selected_is_a_no_op_with_near_misses():
    model = toy.hf_model("llama")
    qm = qpass.apply(model, recipe(targets=["lm_head"], ignore=[]), calib_data=CALIB, progress=False)
    assert len(quantizers(qm.graph_module)) == 1          # lm_head only
    qm = qpass.apply(model, recipe(targets=["*"], ignore=["*"]), calib_data=CALIB, progress=False)
    assert not quantizers(qm.graph_module) and qm.report["squeezellm"].stats == {"linears": 0}


@pytest.mark.parametrize("bad,match", [({"bits": 9}, r"squeezellm\.bits"), ({"outliers": 0.5}, r"squeezellm\.outliers"),
                                       ({"iters": 0}, r"squeezellm\.iters")])
def test_bad_config_is_a_recipe_error_with_its_path(bad, match):
    with pytest.raises(qpass.RecipeError, match=match):
        qpass.Recipe.from_dict(recipe(**bad))


def test_errors_say_what_is_missing():
    model = toy.hf_model("llama")
    with pytest.raises(qpass.CalibrationError, match="squeezellm needs calibration data"):
        qpass.apply(model, recipe(), progress=False)
    with pytest.raises(qpass.QpassError, match="earlier pass"):
        qpass.apply(model, {"passes": [{"quantize": {"weights": {"bits": 4}, "ignore": ["lm_head"]}},
                                       *recipe()["passes"]]}, calib_data=CALIB, progress=False)
    mlp, x = toy.TinyMLP(d=16, hidden=24), toy.mlp_input(d=16)
    with pytest.raises(qpass.QpassError, match="token ids"):
        qpass.apply(mlp, recipe(ignore=[]), calib_data=[(x,)], example_inputs=(x,), progress=False)


# --------------------------------------------------------------------------------------------- backends


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_torch_lowering_is_exact_and_saves_and_loads(family, tmp_path):
    from qpass.backends.torch_packed.codebook import CodebookLinear
    _, qm = _apply(family, outliers=0.01, sensitive=0.005)
    ids = toy.token_ids()
    pm = qpass.lower(qm, "torch")
    assert len([m for m in pm.graph_module.modules() if isinstance(m, CodebookLinear)]) == \
        len(quantizers(qm.graph_module, role="weight"))
    torch.testing.assert_close(pm(ids).logits, qm(ids).logits, rtol=0, atol=2e-5)
    # the decode graph shares the main graph's CodebookLinear modules (its own quantizer tensors are placeholders)
    assert torch.equal(pm.generate(ids[:1], max_new_tokens=5), qm.generate(ids[:1], max_new_tokens=5))
    pm.save(tmp_path / "p")
    from qpass.backends import torch_packed
    back = torch_packed.load(tmp_path / "p")
    assert torch.equal(back(ids).logits, pm(ids).logits)
    qm.save(tmp_path / "q")
    assert torch.equal(qpass.load(tmp_path / "q")(ids).logits, qm(ids).logits)


def test_onnx_lowering_matches_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    _, qm = _apply("llama", outliers=0.01, sensitive=0.005)
    ids = toy.token_ids()
    art = qpass.lower(qm, "onnx", tmp_path / "m")                  # the decoder step: plans applied again
    assert all("codebook3 per_channel: Gather(table) + MatMul" in r.form for r in art.report.rows)
    from qpass.backends.onnx_qdq import runtime
    torch.testing.assert_close(runtime.logits(art.path, ids[:1]), qm(ids[:1]).logits, rtol=0, atol=3e-5)
