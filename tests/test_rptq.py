"""rptq (RPTQ): channels clustered by calibration (min, max), reordered (folded), one static scale per cluster."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qpass
from qpass.errors import RecipeError, TargetNotFoundError
from qpass.primitives import fake_quantize, qparams_from_minmax
from qpass.primitives.rptq import cluster_order, cluster_ranges, kmeans
from qpass.primitives.spec import IntFormat, PerChannel, QSpec
from qpass.quantizer import quantizers
from tests import toy

CALIB = [toy.token_ids(seed=s, t=16) for s in range(3)]
A4 = {"bits": 4, "granularity": "per_channel", "axis": -1, "symmetric": False}
W4 = {"bits": 4, "granularity": "per_channel", "symmetric": True}
ATEN = torch.ops.aten


def recipe(**opts):
    return {"passes": [{"rptq": {"clusters": 4, "activations": A4, "ignore": ["lm_head"], **opts}}]}


def _strip(gm):
    """The graph with every quantizer replaced by its input (what the reorder alone computes)."""
    for q in quantizers(gm):
        q.node.replace_all_uses_with(q.x)
        gm.graph.erase_node(q.node)
    gm.recompile()
    return gm


def _runs(v: torch.Tensor) -> int:
    return 1 + int((v[1:] != v[:-1]).sum())


@pytest.mark.parametrize("family, groups, gathers", [("llama", 8, 4), ("opt", 8, 4)])
def test_fires_reorders_and_preserves_the_function_before_quantizers(family, groups, gathers):
    model = toy.hf_model(family)
    ids = toy.token_ids(batch=2, t=9, seed=11)
    ref = model(ids).logits
    qm = qpass.apply(model, recipe(), calib_data=CALIB, progress=False)
    stats = qm.report["rptq"].stats
    # llama, per layer: norm -> q/k/v, v -> o (per head), norm -> gate/up, silu(gate) * up -> down (gate and up
    # rows reordered alike); opt, per layer: ln -> q/k/v, v -> out_proj, ln -> fc1, fc1 -> relu -> fc2
    assert stats["groups_reordered"] == groups and stats["linears_per_tensor"] == 0
    gm = qm.graph_module
    assert sum(n.target is ATEN.index_select.default for n in gm.graph.nodes) == gathers   # one per norm group
    assert len(quantizers(gm, role="input")) == stats["linears_clustered"]
    torch.testing.assert_close(_strip(gm)(ids).logits, ref, rtol=1e-4, atol=1e-5)


def test_scales_are_per_cluster_and_contiguous_after_the_reorder():
    qm = qpass.apply(toy.hf_model("opt"), recipe(), calib_data=CALIB, progress=False)
    for q in quantizers(qm.graph_module, role="input"):
        s = getattr(qm.graph_module, q.scale.target).flatten()
        z = getattr(qm.graph_module, q.zero_point.target).flatten()
        assert s.unique().numel() <= 4
        if q.path.endswith(("q_proj", "fc1", "fc2")):         # reordered as a whole: one run per cluster
            assert _runs(s) == s.unique().numel() and _runs(z) <= _runs(s)


def test_per_cluster_a4_beats_per_tensor_a4_and_one_cluster_is_per_tensor():
    ids = toy.token_ids(batch=2, t=12, seed=5)
    ref = toy.hf_model("opt")(ids).logits
    per_t = {"bits": 4, "granularity": "per_tensor", "symmetric": False}
    base = qpass.apply(toy.hf_model("opt"), {"passes": [{"quantize": {"weights": None, "activations": per_t,
                                                                       "ignore": ["lm_head"]}}]},
                       calib_data=CALIB, progress=False)
    one = qpass.apply(toy.hf_model("opt"), recipe(clusters=1), calib_data=CALIB, progress=False)
    many = qpass.apply(toy.hf_model("opt"), recipe(clusters=8), calib_data=CALIB, progress=False)
    err = {k: float((m(ids).logits - ref).pow(2).mean()) for k, m in (("base", base), ("one", one), ("many", many))}
    assert err["one"] == pytest.approx(err["base"], rel=1e-3)
    assert err["many"] < err["base"]


@pytest.mark.parametrize("mode, clustered, per_tensor, float_", [("per_tensor", 6, 4, 0), ("clusters", 10, 0, 0),
                                                                 ("float", 6, 0, 4)])
def test_unreordered_linears(mode, clustered, per_tensor, float_):
    opt = toy.hf_model("opt")           # k_proj ignored: q_proj and v_proj share its group, which is not reordered
    qm = qpass.apply(opt, recipe(unreordered=mode, ignore=["lm_head", "*.k_proj"]), calib_data=CALIB, progress=False)
    stats = qm.report["rptq"].stats
    assert (stats["linears_clustered"], stats["linears_per_tensor"], stats["linears_float"]) == \
        (clustered, per_tensor, float_)
    assert any("excluded by targets/ignore" in m for m in qm.report["rptq"].near_misses)
    assert len(quantizers(qm.graph_module)) == clustered + per_tensor


def test_no_op_and_errors():
    qm = qpass.apply(toy.hf_model("opt"), recipe(ignore=["*"]), calib_data=CALIB, progress=False)
    assert qm.report["rptq"].stats["groups_reordered"] == 0 and not quantizers(qm.graph_module)
    with pytest.raises(RecipeError, match="static"):
        qpass.Recipe.from_dict(recipe(activations={"bits": 4, "granularity": "per_token", "dynamic": True}))
    with pytest.raises(RecipeError, match="clusters"):
        qpass.Recipe.from_dict(recipe(clusters=0))
    with pytest.raises(RecipeError, match="per_channel"):
        qpass.Recipe.from_dict(recipe(activations={"bits": 4, "granularity": "per_group", "group_size": 4}))
    with pytest.raises(RecipeError, match="unreordered"):
        qpass.Recipe.from_dict(recipe(unreordered="gather"))
    with pytest.raises(TargetNotFoundError):
        qpass.apply(toy.hf_model("opt"), recipe(targets=["model.nothing.*"]), calib_data=CALIB, progress=False)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_lowers_to_torch_and_onnx_with_parity_and_reloads(family, tmp_path):
    rec = recipe()
    rec["passes"].append({"quantize": {"weights": W4, "ignore": ["lm_head"]}})
    qm = qpass.apply(toy.hf_model(family), rec, calib_data=CALIB, progress=False)
    ids = toy.token_ids(batch=2, t=9, seed=4)
    pm = qpass.lower(qm, "torch", kernels="exact")
    torch.testing.assert_close(pm(ids).logits, qm(ids).logits, rtol=1e-5, atol=1e-5)
    if family == "llama":               # the decode capture gets the gathers too (OPT's decode step does not export)
        prompt = toy.token_ids(1, 5)
        assert torch.equal(pm.generate(prompt, max_new_tokens=4), qm.generate(prompt, max_new_tokens=4))
    qm.save(tmp_path / "saved")
    assert torch.equal(qpass.load(tmp_path / "saved")(ids).logits, qm(ids).logits)
    pytest.importorskip("onnxruntime")
    from qpass.backends import onnx_qdq

    qpass.lower(qm, "onnx", tmp_path / "m")
    got = onnx_qdq.logits(onnx_qdq.session(str(tmp_path / "m")), ids[:1])
    torch.testing.assert_close(got.float(), qm(ids[:1]).logits.float(), rtol=0, atol=5e-3)


def test_w6a6_per_cluster_lowers_to_onnx_with_parity(tmp_path):
    """Per-cluster asymmetric int6 inputs: UINT8 Q, Clip to [0, 63], (q - zp) * scale per channel (docs/onnx.md)."""
    pytest.importorskip("onnxruntime")
    from qpass.backends import onnx_qdq

    rec = recipe(activations={**A4, "bits": 6})
    rec["passes"].append({"quantize": {"weights": {**W4, "bits": 6}, "ignore": ["lm_head"]}})
    qm = qpass.apply(toy.hf_model("opt"), rec, calib_data=CALIB, progress=False)
    qpass.lower(qm, "onnx", tmp_path / "m", fused_accuracy_level=0)
    ids = toy.token_ids(batch=1, t=9, seed=4)
    got = onnx_qdq.logits(onnx_qdq.session(str(tmp_path / "m")), ids)
    torch.testing.assert_close(got.float(), qm(ids).logits.float(), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ primitives

points = st.lists(st.tuples(st.floats(-50, 0, width=32), st.floats(0, 50, width=32)), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(points, st.integers(1, 12), st.integers(0, 3))
def test_kmeans_labels_cover_every_cluster_and_are_exact_when_k_covers_the_points(pts, k, seed):
    x = torch.tensor(pts, dtype=torch.float64)
    labels = kmeans(x, k, seed)
    distinct = torch.unique(x, dim=0).shape[0]
    assert labels.shape == (len(pts),)
    assert set(labels.tolist()) == set(range(min(k, distinct)))
    assert torch.equal(labels, kmeans(x, k, seed))                     # seeded: deterministic
    if k >= distinct:                                                  # every distinct point its own cluster
        assert torch.unique(labels).numel() == distinct
        for lab in labels.unique():
            assert torch.unique(x[labels == lab], dim=0).shape[0] == 1


@settings(max_examples=60, deadline=None)
@given(points, st.integers(1, 6), st.integers(1, 4))
def test_cluster_order_is_a_permutation_inside_blocks_with_contiguous_clusters(pts, k, nblocks):
    x = torch.tensor(pts, dtype=torch.float64)
    n = x.shape[0]
    labels = kmeans(x, k, 0)
    blocks = [torch.arange(n)[i::nblocks] for i in range(min(nblocks, n))]
    perm = cluster_order(x[:, 0], x[:, 1], labels, blocks)
    assert torch.equal(perm.sort().values, torch.arange(n))
    for b in blocks:
        assert set(perm[b].tolist()) == set(b.tolist())               # nothing leaves its block
        seq = labels[perm[b]]
        assert _runs(seq) == seq.unique().numel()                     # each cluster contiguous in the block


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 24), st.integers(0, 5))
def test_one_cluster_is_per_tensor_and_one_per_channel_is_per_channel(c, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, c, generator=gen, dtype=torch.float64) * torch.rand(c, generator=gen, dtype=torch.float64) * 5
    lo, hi = x.amin(0), x.amax(0)
    spec = QSpec(IntFormat(4), PerChannel(-1), symmetric=False)

    def err(labels):
        s, z = qparams_from_minmax(*(t.float() for t in cluster_ranges(lo, hi, labels)), spec)
        y = fake_quantize(x.float(), s[labels].reshape(1, c), z[labels].reshape(1, c), [-1, 1], "int4")
        return float((y - x.float()).pow(2).sum())

    ones = torch.zeros(c, dtype=torch.long)
    s_t, z_t = qparams_from_minmax(lo.min().float().reshape(1, 1), hi.max().float().reshape(1, 1), spec)
    per_tensor = float((fake_quantize(x.float(), s_t, z_t, [-1, -1], "int4") - x.float()).pow(2).sum())
    assert err(ones) == pytest.approx(per_tensor, rel=1e-6)
    assert err(torch.arange(c)) <= err(ones) * (1 + 1e-6)
    assert err(kmeans(torch.stack([lo, hi], 1), c, seed)) == pytest.approx(err(torch.arange(c)), rel=1e-6)
