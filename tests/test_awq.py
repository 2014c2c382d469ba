import re

import pytest
import torch

import qpass
from qpass import IntFormat, PerChannel, PerGroup, QSpec, Recipe
from qpass.graph import op_counts
from qpass.passes import AwqConfig, GptqConfig, QuantizeConfig
from qpass.primitives.awq import awq_scales, clip_search, fake_quantize_weight, scale_search
from tests import toy

W3G8 = QSpec(IntFormat(3), PerGroup(8), symmetric=False)


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


# ------------------------------------------------------------------------------------------- the pass


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
