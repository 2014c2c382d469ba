import pytest
import torch
from torch import nn
from torch.nn import functional as F

import qpass
from qpass import Recipe
from qpass.folding import analyze, fold_scales
from qpass.passes import QuantizeConfig
from tests import toy

L0 = "model.layers.0."
# layer-0 groups (producer -> consumers, by module-path suffix) and layer-0/head linears without a folding
# point (-> a word of the reason), per family: derived from the graph, never from a table in qpass.
EXPECTED = {
    "llama": ({"input_layernorm": ["q_proj", "k_proj", "v_proj"], "v_proj": ["o_proj"],
               "post_attention_layernorm": ["gate_proj", "up_proj"], "up_proj": ["down_proj"],
               "model.norm": ["lm_head"]}, {}),
    "llama_tied": ({"input_layernorm": ["q_proj", "k_proj", "v_proj"], "v_proj": ["o_proj"],
                    "post_attention_layernorm": ["gate_proj", "up_proj"], "up_proj": ["down_proj"]},
                   {"lm_head": "tied"}),
    "opt": ({"self_attn_layer_norm": ["q_proj", "k_proj", "v_proj"], "v_proj": ["out_proj"],
             "final_layer_norm": ["fc1"], "fc1": ["fc2"]}, {"lm_head": "tied"}),
    "gpt2": ({"ln_1": ["c_attn"], "attn.c_attn": ["attn.c_proj"], "ln_2": ["c_fc"]},
             {"transformer.h.0.mlp.c_proj": "pow", "lm_head": "tied"}),
    "phi3": ({"input_layernorm": ["qkv_proj"], "qkv_proj": ["o_proj"], "post_attention_layernorm": ["gate_up_proj"],
              "gate_up_proj": ["down_proj"], "model.norm": ["lm_head"]}, {}),
    "gpt_neox": ({"input_layernorm": ["query_key_value"], "query_key_value": ["dense"],
                  "post_attention_layernorm": ["dense_h_to_4h"], "final_layer_norm": ["lm_head"]},
                 {"gpt_neox.layers.0.mlp.dense_4h_to_h": "gelu"}),
}
EXPECTED["mistral"] = EXPECTED["qwen2"] = EXPECTED["llama"]


def _layer0(name: str) -> bool:
    return ".0." in name or ".h.0." in name or name.count(".") <= 1


@pytest.mark.parametrize("family", toy.FAMILIES + toy.FUSED_FAMILIES)
def test_groups_are_found_from_the_graph(family):
    groups, unfoldable = EXPECTED[family]
    a = analyze(toy.captured(family)[1])
    found = {g.name: [c.site.path for c in g.consumers] for g in a.groups if _layer0(g.name)}
    assert len(found) == len(groups), a.lines()
    for prod, cons in groups.items():
        (name,) = [n for n in found if n.endswith(prod)]
        assert [p.rsplit(".", 1)[-1] for p in found[name]] == [c.rsplit(".", 1)[-1] for c in cons]
    assert {k: v for k, v in a.unfoldable.items() if _layer0(k)}.keys() == unfoldable.keys()
    for path, word in unfoldable.items():
        assert word in a.unfoldable[path]
    assert len(a.groups) == 2 * (len(groups) - ("lm_head" in str(groups))) + ("lm_head" in str(groups))


def test_grouped_query_heads_share_one_v_channel():
    a = analyze(toy.captured("llama")[1])      # 4 query heads, 2 kv heads, head_dim 8
    (g,) = [g for g in a.groups if g.name == L0 + "self_attn.v_proj"]
    cmap = g.consumers[0].channel_map
    expect = torch.arange(32).view(4, 8) - 8 * (torch.arange(4) - torch.arange(4) // 2).view(4, 1)
    assert torch.equal(cmap, expect.flatten())            # q heads 0,1 -> kv head 0; 2,3 -> kv head 1
    assert bool(g.consumed.all())


def test_fused_projections_map_to_their_rows():
    phi = analyze(toy.captured("phi3")[1])
    v_o = next(g for g in phi.groups if g.name == L0 + "self_attn.qkv_proj").consumers[0].channel_map
    assert v_o.min() == 48 and v_o.max() == 63                 # v rows of [q 32 | k 16 | v 16]
    up = next(g for g in phi.groups if g.name == L0 + "mlp.gate_up_proj")
    assert torch.equal(up.consumers[0].channel_map, torch.arange(48, 96))    # up half of [gate | up]
    assert int(up.consumed.sum()) == 48                        # gate rows keep scale 1
    neox = analyze(toy.captured("gpt_neox")[1])                   # per head [q 8 | k 8 | v 8] interleaved
    cmap = next(g for g in neox.groups if g.name.endswith("layers.0.attention.query_key_value")).consumers[0]
    assert torch.equal(cmap.channel_map, (torch.arange(4).view(4, 1) * 24 + 16 + torch.arange(8)).flatten())
    gpt2 = analyze(toy.captured("gpt2")[1])                       # Conv1D, split(32) of [q | k | v]
    c = next(g for g in gpt2.groups if g.name == "transformer.h.0.attn.c_attn")
    assert torch.equal(c.consumers[0].channel_map, torch.arange(64, 96))
    assert c.producer.params[0][1] == 1 and c.consumers[0].site.in_axis == 0   # [in, out] storage


class Unfoldable(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h = x + self.a(x)                   # a: graph input; b: residual add
        return self.c(F.gelu(self.b(h)))    # c: GELU


def test_every_linear_without_a_folding_point_gets_a_reason():
    gm = qpass.capture(Unfoldable(), (toy.seq_input(d=8),))
    a = analyze(gm)
    assert a.groups == []
    assert "graph input" in a.unfoldable["a"]
    assert "residual add" in a.unfoldable["b"]
    assert "gelu" in a.unfoldable["c"]


class SharedWeight(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        torch.manual_seed(0)
        self.g = nn.Parameter(torch.rand(d) + 0.5)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return self.fc(self.g * x) + self.fc(x)      # fc's weight is read by two linear nodes


def test_shared_parameters_are_refused_with_a_reason():
    a = analyze(qpass.capture(SharedWeight(), (toy.seq_input(d=8),)))
    assert a.groups == []
    assert any("also used by" in why for why in a.unfoldable.values())


def test_quantizers_are_not_crossed():
    qm = qpass.apply(toy.captured("llama")[1], Recipe([QuantizeConfig(activations=qpass.QSpec(
        qpass.IntFormat(8), qpass.PerToken(), dynamic=True))]))
    a = analyze(qm.graph_module)
    assert a.groups == [] and all("quantiz" in why for why in a.unfoldable.values())


def test_eager_attention_folds_v_into_o():
    a = analyze(toy.captured("llama_eager")[1])
    assert any(g.name == L0 + "self_attn.v_proj" for g in a.groups) and not a.unfoldable


def test_fold_scales_keeps_outputs_for_every_group_kind():
    for family in ("gpt2", "gpt_neox"):       # Conv1D [in, out] weights; LayerNorm bias; interleaved qkv
        gm = qpass.apply(toy.captured(family)[1], Recipe([])).graph_module
        ids = toy.token_ids()
        ref = gm(ids).logits
        before = {k: v.clone() for k, v in gm.state_dict().items()}
        gen = torch.Generator().manual_seed(0)
        for g in analyze(gm).groups:
            s = torch.where(g.consumed, torch.rand(g.producer.channels, generator=gen, dtype=torch.float64) * 4
                            + 0.25, torch.ones(g.producer.channels, dtype=torch.float64))
            fold_scales(gm, g, s)
        changed = [k for k, v in gm.state_dict().items() if not torch.equal(v, before[k])]
        assert any("layernorm" in k or "ln_" in k for k in changed) and any("c_proj" in k or "dense" in k
                                                                           for k in changed)
        torch.testing.assert_close(gm(ids).logits, ref, rtol=1e-4, atol=1e-5)
