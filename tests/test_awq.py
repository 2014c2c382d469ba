import re

import pytest
import torch

import qpass
from qpass import IntFormat, PerChannel, PerGroup, QSpec, Recipe
from qpass.graph import op_counts
from qpass.passes import AwqConfig, GptqConfig, QuantizeConfig
from qpass.primitives.awq import awq_scales, clip_search, fake_quantize_weight, output_error, scale_search
from tests import toy

W3G8 = QSpec(IntFormat(3), PerGroup(8), symmetric=False)
# every weight grid the no-worse-than-RTN guarantees are checked on: asymmetric and symmetric, groups and rows
GRIDS = {"asym_g8": W3G8, "sym_g8": QSpec(IntFormat(3), PerGroup(8)),
         "asym_channel": QSpec(IntFormat(3), PerChannel(0), symmetric=False), "sym_channel": QSpec(IntFormat(3))}


@pytest.fixture(scope="module")
def llama():
    return toy.captured("llama")


def calib(n=4, t=16):
    return [toy.token_ids(batch=1, t=t, seed=s) for s in range(n)]


def quantize(spec=W3G8):
    return QuantizeConfig(weights=spec, ignore=("lm_head",))


# ------------------------------------------------------------------------------------------ numerics


def test_scales_are_normalized_and_alpha_zero_is_one():
    x = torch.tensor([0.5, 2.0, 8.0, 0.0])
    assert torch.equal(awq_scales(x, 0.0), torch.ones(4, dtype=torch.float64))
    s = awq_scales(x, 0.5, used=torch.tensor([True, True, True, False]))
    assert float(s[:3].max() * s[:3].min()) == pytest.approx(1.0) and s[3] == 1


def test_scale_search_protects_salient_channels():
    x = toy.correlated_input(512, 32, outliers=2, seed=3)
    w = torch.randn(24, 32, generator=torch.Generator().manual_seed(4))
    gram = x.double().T @ x.double()
    alpha, s, losses = scale_search([gram], [w], [torch.arange(32)], x.abs().mean(0), W3G8, grid=20)
    assert len(losses) == 20 and min(losses) == losses[int(round(alpha * 20))]
    sc = s.float()
    direct = ((x @ w.T - (x / sc) @ fake_quantize_weight(w * sc, W3G8).T).double() ** 2).sum()
    assert float(direct) == pytest.approx(min(losses), rel=1e-4)     # Gram form == explicit outputs
    assert alpha > 0 and min(losses) < 0.9 * losses[0]          # losses[0]: alpha = 0, plain RTN
    assert s[:2].min() > s[2:].max()                            # the large-activation channels scale up


def test_clip_search_never_increases_the_group_error():
    x = toy.correlated_input(256, 32, seed=5)
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(6))
    w[0, 3] = 8.0                                               # an outlier weight worth clipping
    for spec in (W3G8, QSpec(IntFormat(4), PerChannel(0))):
        clipped, ratio = clip_search(w, x.double().T @ x.double(), spec)
        assert ratio.min() >= 0.55 - 1e-6 and ratio.max() <= 1.0
        err = lambda v: float(((x @ (w - fake_quantize_weight(v, spec)).T) ** 2).sum())
        assert err(clipped) <= err(w) and (clipped.abs() <= w.abs()).all()
    assert ratio[0].item() < 1.0


def _row_errors(w, q, gram):
    d = (w - q).double()
    return ((d @ gram) * d).sum(-1)


def _reference_clip(w, gram, spec, grid=20, max_shrink=0.5):
    """The reference's (and the old qpass's) clip: per (row, group), the clamp [-m, m] minimising that
    group's own error d_g G_gg d_g^T, cross-group terms dropped."""
    g = spec.granularity.group_size
    rows, n = w.shape
    wg, amax = w.reshape(rows, n // g, g), w.reshape(rows, n // g, g).abs().amax(-1, keepdim=True)
    blocks = torch.stack([gram[j * g:(j + 1) * g, j * g:(j + 1) * g] for j in range(n // g)])
    best, best_m = torch.full(amax.shape[:2], float("inf"), dtype=torch.float64), amax.clone()
    for i in range(int(max_shrink * grid)):
        m = amax * (1 - i / grid)
        d = (wg - fake_quantize_weight(wg.clamp(-m, m).reshape(rows, n), spec).reshape(wg.shape)).double()
        err = torch.einsum("rng,ngh,rnh->rn", d, blocks, d)
        better = err < best
        best, best_m = torch.where(better, err, best), torch.where(better[..., None], m, best_m)
    return wg.clamp(-best_m, best_m).reshape(rows, n)


def _offset_case(g, seed=0):
    """Inputs with a common offset on every channel (LayerNorm bias, ReLU outputs): clamping moves values
    toward zero, so the clip errors of a row's groups share a sign and add up across groups."""
    gen = torch.Generator().manual_seed(seed)
    x = 0.05 * torch.randn(256, 2 * g, generator=gen) + 1.0
    return torch.randn(512, 2 * g, generator=gen), x.double().T @ x.double()


@pytest.mark.parametrize("name", ["asym_g8", "sym_g8"])
def test_per_group_clip_was_worse_than_rtn_and_the_row_objective_never_is(name):
    spec = GRIDS[name]
    w, gram = _offset_case(8)
    rtn = _row_errors(w, fake_quantize_weight(w, spec), gram)
    old = _row_errors(w, fake_quantize_weight(_reference_clip(w, gram, spec), spec), gram)
    worse = old > rtn * (1 + 1e-9)
    assert worse.sum() > 20 and float((old / rtn).max()) > 10     # the old choice: many rows far worse
    w = w[worse]                                                   # a linear made of those rows
    rtn = _row_errors(w, fake_quantize_weight(w, spec), gram)
    assert old[worse].sum() > 2 * rtn.sum()                        # old AWQ clip: worse than RTN on its data
    clipped, kept = clip_search(w, gram, spec)
    new = _row_errors(w, fake_quantize_weight(clipped, spec), gram)
    assert (new <= rtn * (1 + 1e-12)).all() and new.sum() < rtn.sum()
    assert kept.min() < 1.0                                         # it still clips where that helps


@pytest.mark.parametrize("name", list(GRIDS))
@pytest.mark.parametrize("in_features", [32, 44])                # 44 = 5 groups of 8 and a partial one
def test_scale_then_clip_is_never_worse_than_rtn_per_group(name, in_features):
    spec = GRIDS[name]
    for seed in range(3):
        x = toy.correlated_input(384, in_features, outliers=2, seed=seed) + 0.5      # outliers and an offset
        gram = x.double().T @ x.double()
        gen = torch.Generator().manual_seed(seed + 10)
        ws = [torch.randn(24, in_features, generator=gen), torch.randn(16, in_features, generator=gen)]
        maps = [torch.arange(in_features)] * 2
        alpha, s, losses = scale_search([gram, gram], ws, maps, x.abs().mean(0), spec)
        rtn = sum(output_error(w - fake_quantize_weight(w, spec), gram) for w in ws)
        assert losses[0] == pytest.approx(rtn, rel=1e-12) and min(losses) <= losses[0]
        inv = (1.0 / s).float()
        scaled_gram = gram * (1.0 / s)[:, None] * (1.0 / s)[None, :]          # the folded linears read x / s
        awq = 0.0
        for w in ws:
            ws_ = w * s.float()
            clipped, _ = clip_search(ws_, scaled_gram, spec)
            awq += output_error(w - fake_quantize_weight(clipped, spec) * inv, gram)
        assert awq <= rtn * (1 + 1e-9)


def test_identity_wins_a_tie():
    """A weight the grid holds exactly: every alpha and every clip ties (or loses) with doing nothing."""
    spec = QSpec(IntFormat(4), PerGroup(8), symmetric=False)
    w = torch.randint(0, 16, (8, 16)).float() * 0.125 - 1.0
    w[:, 0::8], w[:, 1::8] = -1.0, 0.875                            # every group spans the whole grid
    x = toy.correlated_input(64, 16, seed=1)
    gram = x.double().T @ x.double()
    assert output_error(w - fake_quantize_weight(w, spec), gram) == 0
    alpha, s, _ = scale_search([gram], [w], [torch.arange(16)], x.abs().mean(0), spec)
    assert alpha == 0.0 and torch.equal(s, torch.ones(16, dtype=torch.float64))
    clipped, kept = clip_search(w, gram, spec)
    assert torch.equal(clipped, w) and torch.equal(kept, torch.ones_like(kept))


# ------------------------------------------------------------------------------------------- the pass


class _NormHeads(torch.nn.Module):
    """LayerNorm (a large bias: every channel offset) -> two linears whose outputs are the graph outputs,
    so one folding group's output error is read straight off the outputs."""

    def __init__(self, d=48):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.norm = torch.nn.LayerNorm(d)
        self.a, self.b = torch.nn.Linear(d, 40), torch.nn.Linear(d, 24)
        with torch.no_grad():
            self.norm.weight.copy_(1.0 + torch.rand(d, generator=g) * 4.0)
            self.norm.weight[:2] = 30.0                               # salient channels
            self.norm.bias.copy_(1.0 + torch.rand(d, generator=g))
            for lin in (self.a, self.b):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g))

    def forward(self, x):
        h = self.norm(x)
        return self.a(h), self.b(h)


@pytest.mark.parametrize("name", list(GRIDS))
def test_awq_is_never_worse_than_rtn_on_its_calibration_data(name):
    spec = GRIDS[name]
    model = _NormHeads().eval()
    data = [(torch.randn(2, 32, 48, generator=torch.Generator().manual_seed(s)),) for s in range(4)]
    gm = qpass.capture(model, data[0])
    rtn = qpass.apply(gm, Recipe([QuantizeConfig(weights=spec)]))
    awq = qpass.apply(gm, Recipe([AwqConfig(), QuantizeConfig(weights=spec)]), calib_data=data, progress=False)
    stats = awq.report["awq"].stats
    assert stats["groups_scaled"] == 1 and stats["linears_clipped"] == 2
    assert all(v <= 1.0 for v in stats["clip_loss_vs_unclipped"].values())

    def error(qm):
        with torch.no_grad():
            return sum(float((q - f).double().pow(2).sum()) for x, in data for q, f in zip(qm(x), model(x)))
    assert error(awq) <= error(rtn) * (1 + 1e-6)


def test_clip_auto_is_off_before_gptq_and_on_before_rtn(llama):
    _, gm = llama
    rtn = qpass.apply(gm, Recipe([AwqConfig(), quantize()]), calib_data=calib(), progress=False).report["awq"]
    assert rtn.stats["linears_clipped"] > 0
    gptq = qpass.apply(gm, Recipe([AwqConfig(), quantize(), GptqConfig()]), calib_data=calib(), progress=False)
    row = gptq.report["awq"]
    assert row.stats["linears_clipped"] == 0 and row.stats["groups_scaled"] == rtn.stats["groups_scaled"]
    assert any("clip search off (clip: auto): a gptq pass follows" in m for m in row.near_misses)
    forced = qpass.apply(gm, Recipe([AwqConfig(clip=True), quantize(), GptqConfig()]), calib_data=calib(),
                         progress=False)
    assert forced.report["awq"].stats["linears_clipped"] == rtn.stats["linears_clipped"]


def test_each_linear_is_searched_for_the_quantizer_applied_to_it(llama, monkeypatch):
    """Two quantize passes with different grids: each linear's clip (and scale) search uses its own."""
    import qpass.passes.awq as awq_pass
    seen = {}
    real = awq_pass.clip_search

    def spy(w, gram, spec, **kw):
        seen.setdefault(tuple(w.shape), set()).add(spec)
        return real(w, gram, spec, **kw)
    monkeypatch.setattr(awq_pass, "clip_search", spy)
    attn, mlp = W3G8, QSpec(IntFormat(4), PerChannel(0), symmetric=False)
    rec = Recipe([AwqConfig(), QuantizeConfig(weights=attn, targets=("*self_attn*",)),
                  QuantizeConfig(weights=mlp, targets=("*mlp*",))])
    qm = qpass.apply(llama[1], rec, calib_data=calib(), progress=False)
    assert seen[(32, 44)] == {mlp} and seen[(16, 32)] == {attn}          # down_proj; v_proj (2 kv heads of 8)
    assert "lm_head" not in qm.report["awq"].stats["mean_clip_ratio"]   # no quantize pass selects it


# ------------------------------------------------------------------------------------------- the pass (older)


def test_scaling_alone_preserves_the_function(llama):
    model, gm = llama
    qm = qpass.apply(gm, Recipe([AwqConfig(weights=W3G8, clip=False)]), calib_data=calib(), progress=False)
    stats = qm.report["awq"].stats
    # per block norm->qkv, v->o, norm->gate/up, up->down; and model.norm->lm_head (no quantize pass to ignore it)
    assert stats["groups_scaled"] == 9 and stats["linears_clipped"] == 0
    assert any(a > 0 for a in stats["alphas"].values())
    assert op_counts(qm.graph_module) == op_counts(gm)
    ids = toy.token_ids(batch=2, t=12, seed=8)
    ref = model(ids).logits
    torch.testing.assert_close(qm(ids).logits, ref, rtol=1e-4, atol=1e-5)


def test_alpha_zero_without_clipping_is_rtn_bit_for_bit(llama):
    _, gm = llama
    rtn = qpass.apply(gm, Recipe([quantize()]))
    qm = qpass.apply(gm, Recipe([AwqConfig(grid=1, clip=False), quantize()]), calib_data=calib(), progress=False)
    ids = toy.token_ids(batch=2, t=12, seed=8)
    assert torch.equal(qm(ids).logits, rtn(ids).logits)


def test_awq_takes_the_following_quantize_spec_and_beats_rtn(llama):
    model, gm = llama
    qm = qpass.apply(gm, Recipe([AwqConfig(), quantize()]), calib_data=calib(8, 24), progress=False)
    stats = qm.report["awq"].stats
    assert all(v <= 1.0 for v in stats["loss_vs_rtn"].values())           # alpha = 0 is on the grid
    assert all(v <= 1.0 for v in stats["clip_loss_vs_unclipped"].values())  # no clip is a candidate
    clipped = set(stats["mean_clip_ratio"])
    assert "model.layers.0.self_attn.v_proj" in clipped and "model.layers.0.mlp.down_proj" in clipped
    assert not any(p.endswith(("q_proj", "k_proj")) for p in clipped)    # they feed attention scores
    assert "lm_head" not in clipped                                        # quantize ignores it
    assert any("model.norm" in m for m in qm.report["awq"].near_misses)
    rtn = qpass.apply(gm, Recipe([quantize()]))
    ids = toy.token_ids(batch=2, t=16, seed=8)
    ref = model(ids).logits
    assert (qm(ids).logits - ref).pow(2).mean() < (rtn(ids).logits - ref).pow(2).mean()


def test_gpt2_fused_qkv_is_scaled_and_not_clipped():
    qm = qpass.apply(toy.captured("gpt2")[1], Recipe([AwqConfig(), quantize(QSpec(IntFormat(4), PerGroup(16)))]),
                     calib_data=calib(), progress=False)
    stats = qm.report["awq"].stats
    assert "transformer.h.0.ln_1" in stats["alphas"]
    assert "transformer.h.0.attn.c_attn" not in stats["mean_clip_ratio"]
    assert "transformer.h.0.mlp.c_proj" in stats["mean_clip_ratio"]


def test_awq_then_gptq_round_trips_bit_exactly(tmp_path):
    model = toy.hf_model("llama")
    rec = Recipe([AwqConfig(), quantize(), GptqConfig(act_order=True)])
    qm = qpass.apply(model, rec, calib_data=calib(), progress=False)
    assert qm.report["gptq"].stats["linears"] == 14
    qm.save(tmp_path / "m")
    back = qpass.load(tmp_path / "m")
    ids = toy.token_ids(batch=2, t=10, seed=9)
    assert torch.equal(back(ids).logits, qm(ids).logits)


def test_without_a_weight_spec_is_a_recipe_error(llama):
    with pytest.raises(qpass.RecipeError, match=r"awq\.weights: no weight spec.*'- quantize"):
        qpass.apply(llama[1], Recipe([AwqConfig()]), calib_data=calib())


def test_nothing_to_match_is_a_no_op():
    class NoLinear(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x) + 1

    gm = qpass.capture(NoLinear(), (toy.mlp_input(),))
    qm = qpass.apply(gm, Recipe([AwqConfig(weights=W3G8)]), calib_data=[(toy.mlp_input(),)])
    assert qm.report["awq"].stats == {"groups_scaled": 0, "linears_clipped": 0}


@pytest.mark.parametrize("options,path", [({"grid": 0}, "passes[0].awq.grid"),
                                          ({"max_shrink": 1.0}, "passes[0].awq.max_shrink"),
                                          ({"weights": {"granularity": "per_token", "dynamic": True}},
                                           "passes[0].awq.weights"),
                                          ({"clip": 1}, "passes[0].awq.clip"),
                                          ({"clip_grd": 10}, "passes[0].awq.clip_grd")])
def test_bad_config_is_a_recipe_error_with_its_path(options, path):
    with pytest.raises(qpass.RecipeError, match="^" + re.escape(path)):
        Recipe.from_dict({"passes": [{"awq": options}, {"quantize": {"weights": {"bits": 4}}}]})


def test_tied_weights_are_not_clipped():
    qm = qpass.apply(toy.captured("llama_tied")[1], Recipe([AwqConfig(), QuantizeConfig(weights=W3G8)]),
                     calib_data=calib(), progress=False)
    row = qm.report["awq"]
    clipped = row.stats["mean_clip_ratio"]
    assert "lm_head" not in clipped and "model.layers.1.mlp.down_proj" in clipped
    assert any(m.startswith("lm_head: not clipped") and "tied" in m for m in row.near_misses)
