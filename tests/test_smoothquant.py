import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import qpass
from qpass import IntFormat, PerChannel, PerTensor, PerToken, QSpec, Recipe
from qpass.folding import analyze
from qpass.graph import op_counts
from qpass.passes import QuantizeConfig, SmoothQuantConfig
from qpass.passes.smoothquant import smoothing_scales
from tests import toy

CALIB = [toy.token_ids(seed=s) for s in range(3)]
GROUPS = {"llama": 9, "mistral": 9, "qwen2": 9, "llama_tied": 8, "opt": 8, "gpt2": 6, "phi3": 9, "gpt_neox": 7}


def rel(a, b):
    return float(((a - b).abs().max() / b.abs().max()).detach())


@pytest.mark.parametrize("family", toy.FAMILIES + toy.FUSED_FAMILIES)
def test_smoothing_preserves_outputs_and_structure(family):
    gm = toy.captured(family)[1]
    ids = toy.token_ids(batch=3, t=9, seed=11)
    ref = gm(ids).logits.detach()
    qm = qpass.apply(gm, Recipe([SmoothQuantConfig(alpha=0.5)], verify=True), calib_data=CALIB, progress=False)
    row = qm.report["smoothquant"]
    assert row.stats["groups_smoothed"] == GROUPS[family]
    assert row.nodes_added == row.nodes_removed == 0 and op_counts(qm.graph_module) == op_counts(gm)
    assert rel(qm(ids).logits.detach(), ref) <= 1e-4          # the function is kept ...
    assert row.verify["max_abs_diff"] <= 1e-4 * float(ref.abs().max())
    changed = {k for k, v in qm.graph_module.state_dict().items() if not torch.equal(v, gm.state_dict()[k])}
    touched = {n.target for g in analyze(gm).groups for n in
               [p for p, _ in g.producer.params] + [c.site.weight for c in g.consumers]
               if bool(gm.state_dict()[n.target].any())}    # zero-initialised biases stay zero
    assert changed == touched                                 # ... and only the groups' parameters changed
    assert len(row.near_misses) == row.stats["no_folding_point"]


def test_alpha_search_chooses_a_grid_value_per_group():
    gm = toy.captured("llama")[1]
    ids = toy.token_ids(batch=2, t=9, seed=11)
    cfg = SmoothQuantConfig(alpha="search", search_step=0.25, search_tokens=64)
    qm = qpass.apply(gm, Recipe([cfg]), calib_data=CALIB, progress=False)
    alphas = qm.report["smoothquant"].stats["alphas"]
    assert len(alphas) == 9 and set(alphas.values()) <= {None, 0.0, 0.25, 0.5, 0.75, 1.0}
    assert rel(qm(ids).logits.detach(), gm(ids).logits.detach()) <= 1e-4
    stats = qm.report["smoothquant"].stats
    assert stats["groups_smoothed"] == sum(a is not None for a in alphas.values())


def test_alpha_search_leaves_a_group_alone_when_no_grid_value_beats_no_smoothing(monkeypatch):
    """alpha = 0 is s = 1 / max|W|, not the identity: the search also scores s = 1 and keeps it when best."""
    from qpass.passes import smoothquant as sq

    gm = toy.captured("llama")[1]
    cfg = SmoothQuantConfig(alpha="search", search_step=0.5, search_tokens=32)
    # every grid value yields wildly uneven scales (1e3 and 1e-3 on alternate channels, which per-token and
    # per-channel quantizers cannot absorb): s = 1 must win in every group
    def uneven(x, w, alpha, floor, used=None):
        return torch.where(torch.arange(len(x)) % 2 == 0, 1e3, 1e-3).to(torch.float64)
    monkeypatch.setattr(sq, "smoothing_scales", uneven)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    qm = qpass.apply(gm, Recipe([cfg]), calib_data=CALIB, progress=False)
    stats = qm.report["smoothquant"].stats
    assert stats["groups_smoothed"] == 0 and set(stats["alphas"].values()) == {None}
    after = qm.graph_module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_smoothing_scales_formula():
    x = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w = torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = smoothing_scales(x, w, 0.5, 1e-5)
    torch.testing.assert_close(s, torch.tensor([2.0, 0.5, 1.0, 1.0], dtype=torch.float64))  # dead -> 1
    s = smoothing_scales(x, w, 1.0, 1e-5, used=torch.tensor([True, False, True, True]))
    torch.testing.assert_close(s, torch.tensor([4.0, 1.0, 1.0, 1.0], dtype=torch.float64))


class Outliers(nn.Module):
    """LayerNorm -> two linears, where a few LayerNorm channels carry large activations (as in OPT)."""

    def __init__(self, d=64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(d, 4 * d)
        with torch.no_grad():
            self.norm.weight[:3] = 60.0

    def forward(self, x):
        h = self.norm(x)
        return self.fc1(h) + self.fc2(h)


def test_outlier_channels_move_into_the_weights_and_w8a8_error_drops():
    x = toy.seq_input(batch=4, t=16, d=64)
    gm = qpass.capture(Outliers(), (x,))
    ref = gm(x)
    static = QuantizeConfig(weights=QSpec(IntFormat(8), PerChannel(0)), activations=QSpec(IntFormat(8), PerTensor()))
    plain = qpass.apply(gm, Recipe([static]), calib_data=[(x,)], progress=False)
    sq = qpass.apply(gm, Recipe([SmoothQuantConfig(alpha=0.5), static]), calib_data=[(x,)], progress=False)
    err_plain, err_sq = rel(plain(x), ref), rel(sq(x), ref)
    assert err_sq < 0.5 * err_plain, (err_plain, err_sq)
    smoothed = qpass.apply(gm, Recipe([SmoothQuantConfig(alpha=0.5)]), calib_data=[(x,)], progress=False)
    g = smoothed.graph_module.get_parameter("norm.weight").detach().abs()
    assert float(g.max() / g.median()) < 0.2 * float(60.0 / gm.get_parameter("norm.weight").abs().median())


class NoFold(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return self.b(F.gelu(self.a(x)))


def test_nothing_to_fold_leaves_the_model_alone():
    x = toy.seq_input(d=8)
    gm = qpass.capture(NoFold(), (x,))
    qm = qpass.apply(gm, Recipe([SmoothQuantConfig()]), calib_data=[(x,)], progress=False)
    row = qm.report["smoothquant"]
    assert row.stats == {"groups_smoothed": 0, "linears_smoothed": 0, "no_folding_point": 2}
    assert any("gelu" in m for m in row.near_misses) and any("graph input" in m for m in row.near_misses)
    assert qm.graph_module.code == gm.code and all(torch.equal(v, gm.state_dict()[k])
                                                    for k, v in qm.graph_module.state_dict().items())


def test_after_quantize_it_says_why_nothing_was_smoothed():
    w8a8 = QuantizeConfig(activations=QSpec(IntFormat(8), PerToken(), dynamic=True))
    qm = qpass.apply(toy.captured("llama")[1], Recipe([w8a8, SmoothQuantConfig()]), calib_data=CALIB, progress=False)
    row = qm.report["smoothquant"]
    assert row.stats["groups_smoothed"] == 0 and all("quantiz" in m for m in row.near_misses)


def test_ignored_linears_skip_their_whole_group():
    qm = qpass.apply(toy.captured("llama")[1], Recipe([SmoothQuantConfig(ignore=("k_proj", "lm_head"))]),
                     calib_data=CALIB, progress=False)
    row = qm.report["smoothquant"]
    assert row.stats["groups_smoothed"] == 6                   # 2 q/k/v groups and the final norm skipped
    assert sum("excluded by targets/ignore" in m for m in row.near_misses) == 3


@pytest.mark.parametrize("options, path", [
    ({"alpha": 1.5}, "passes[0].smoothquant.alpha"),
    ({"alpha": "serch"}, "passes[0].smoothquant.alpha"),
    ({"search_step": 0}, "passes[0].smoothquant.search_step"),
    ({"weights": {"granularity": "per_token", "dynamic": True}}, "passes[0].smoothquant.weights"),
    ({"alhpa": 0.5}, "passes[0].smoothquant.alhpa"),
])
def test_bad_options_name_their_recipe_path(options, path):
    with pytest.raises(qpass.RecipeError, match="^" + re.escape(path)):
        Recipe.from_dict({"passes": [{"smoothquant": options}]})


def test_unknown_targets_and_missing_calibration_are_errors():
    gm = toy.captured("llama")[1]
    with pytest.raises(qpass.TargetNotFoundError, match=r"smoothquant\.ignore\[0\].*did you mean 'lm_head'"):
        qpass.apply(gm, Recipe([SmoothQuantConfig(ignore=("lm_haed",))]), calib_data=CALIB)
    with pytest.raises(qpass.CalibrationError, match="smoothquant needs calibration data"):
        qpass.apply(gm, Recipe([SmoothQuantConfig()]))


def test_preset_recipe_w8a8_smoothquant():
    gm = toy.captured("qwen2")[1]
    ids = toy.token_ids(batch=2, t=9, seed=11)
    qm = qpass.apply(gm, "recipes/w8a8_smoothquant.yaml", calib_data=CALIB, progress=False)
    assert [r.name for r in qm.report] == ["smoothquant", "quantize"]
    assert qm.report["smoothquant"].stats["groups_smoothed"] == 8      # lm_head ignored: final norm kept
    assert rel(qm(ids).logits.detach(), gm(ids).logits.detach()) < 0.05
