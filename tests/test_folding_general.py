"""Shifts, permutations, rotations and norm-weight folds on the FoldGroups of qpass.folding: each checked to keep
the graph's outputs, refused by reason where it would not."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import qpass
from qpass import Recipe
from qpass.folding import (analyze, fold_norm_weight, fold_permutation, fold_rotation, fold_scales, fold_shifts,
                           permutation_reason, permute_columns, rotate_columns, rotation_reason, shift_compensation,
                           shift_reason)
from tests import toy

L0 = "model.layers.0."


def _fresh(family):
    """A copy of the captured tiny model, its norm weights and biases made non-trivial (HF initialises 1 and 0)."""
    gm = qpass.apply(toy.captured(family)[1], Recipe([])).graph_module
    gen = _gen(7)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    ids = toy.token_ids()
    return gm, ids, gm(ids).logits


def _groups(gm):
    return {g.name: g for g in analyze(gm).groups}


def _suffix(names, suffix):
    (name,) = [n for n in names if n.endswith(suffix)]
    return name


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _random_orthogonal(n, gen):
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _head_perm(channels, head_dim, gen):
    """A random permutation within each block of head_dim channels."""
    return torch.cat([torch.randperm(head_dim, generator=gen) + h * head_dim for h in range(channels // head_dim)])


def _head_rotation(channels, head_dim, gen):
    return torch.block_diag(*[_random_orthogonal(head_dim, gen) for _ in range(channels // head_dim)])


# kinds of group per family (by module-path suffix of the producer): which folds apply and why the others not
SHIFTABLE = {"llama": ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "model.norm"],
             "opt": ["self_attn_layer_norm", "self_attn.v_proj", "final_layer_norm"]}
NOT_SHIFTABLE = {"llama": {"mlp.up_proj": "mul"}, "opt": {"fc1": "relu"}}


# ------------------------------------------------------------------------------------------- shifts


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_shifts_keep_outputs(family):
    gm, ids, ref = _fresh(family)
    groups = _groups(gm)
    for suffix, word in NOT_SHIFTABLE[family].items():
        for name in [n for n in groups if n.endswith(suffix)]:
            why = shift_reason(groups[name])
            assert why and word in why and "shift" in why, why
    names = [n for n in groups if any(n.endswith(s) for s in SHIFTABLE[family])]
    assert len(names) == 2 * len(SHIFTABLE[family]) - ("model.norm" in SHIFTABLE[family])
    gen, before = _gen(), len(analyze(gm).groups)
    for name in names:
        g = _groups(gm)[name]                         # again: a fold may add nodes (bias adds, get_attrs)
        assert shift_reason(g) is None, name
        z = torch.randn(g.producer.channels, generator=gen, dtype=torch.float64) * g.consumed
        fold_shifts(gm, g, z)
    out = gm(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    if family == "llama":                             # bias-free: RMSNorm gained an add, every consumer a bias
        adds = [n for n in gm.graph.nodes if n.meta.get("qpass_origin") == "folding" and n.op == "call_function"]
        assert len(adds) == 2 * 2 + 1                 # input/post-attention norms of 2 layers, final norm
        biased = {s.path.rsplit(".", 1)[-1] for s in qpass.graph.linear_sites(gm) if s.bias is not None}
        assert biased == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "lm_head"}
    a = analyze(gm)                                   # the same groups, now with the biases as params
    assert len(a.groups) == before
    for name in names:
        assert len(_groups(gm)[name].producer.params) == 2
    gen = _gen(1)                                     # scales still fold after shifts (OS+: shift, then scale)
    for g in a.groups:
        s = torch.where(g.consumed, torch.rand(g.producer.channels, generator=gen, dtype=torch.float64) + 0.5, 1.0)
        fold_scales(gm, g, s)
    torch.testing.assert_close(gm(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_shift_on_fused_rows_and_unread_channels():
    gm, ids, ref = _fresh("phi3")
    g = _groups(gm)[L0 + "self_attn.qkv_proj"]        # only the v rows [48, 64) reach o_proj
    z = torch.zeros(g.producer.channels, dtype=torch.float64)
    z[0] = 1.0
    assert "no consumer reads" in shift_reason(g, z)
    with pytest.raises(ValueError, match="no consumer reads"):
        fold_shifts(gm, g, z)
    z = torch.randn(g.producer.channels, generator=_gen(), dtype=torch.float64) * g.consumed
    fold_shifts(gm, g, z)
    torch.testing.assert_close(gm(ids).logits, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ permutations


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_permutations_keep_outputs(family):
    gm, ids, ref = _fresh(family)
    groups, gen = _groups(gm), _gen()
    if family == "llama":
        for name in [n for n in groups if n.endswith("mlp.up_proj")]:
            assert "product with another tensor" in permutation_reason(groups[name])
    v = _suffix(groups, "layers.0.self_attn.v_proj")
    n = groups[v].producer.channels
    assert permutation_reason(groups[v]) is None
    assert "across attention heads" in permutation_reason(groups[v], torch.arange(n).roll(8))   # swaps heads
    names = [k for k, g in groups.items() if permutation_reason(g) is None]
    assert len(names) == len(groups) - (2 if family == "llama" else 0)      # up_proj x2 refused
    before = {k: [c.site.path for c in g.consumers] for k, g in groups.items()}
    for name in names:
        g = _groups(gm)[name]
        perm = _head_perm(g.producer.channels, 8, gen) if g.producer.kind == "linear" and "v_proj" in name \
            else torch.randperm(g.producer.channels, generator=gen)
        fold_permutation(gm, g, perm)
    torch.testing.assert_close(gm(ids).logits, ref, rtol=1e-4, atol=1e-4)
    after = {k: [c.site.path for c in g.consumers] for k, g in _groups(gm).items()}
    assert after == before                            # the gathers after the norms are seen through


# ------------------------------------------------------------------------------------------- rotations


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_rotations_keep_outputs(family):
    gm, ids, ref = _fresh(family)
    groups, gen = _groups(gm), _gen()
    v = _suffix(groups, "layers.0.self_attn.v_proj")
    n = groups[v].producer.channels
    assert "across attention heads" in rotation_reason(groups[v], _random_orthogonal(n, gen))
    assert "not orthogonal" in rotation_reason(groups[v], torch.eye(n) * 2)
    if family == "opt":
        assert "relu" in rotation_reason(_groups(gm)[_suffix(groups, "layers.0.fc1")])
    else:
        assert "mul" in rotation_reason(_groups(gm)[_suffix(groups, "layers.0.mlp.up_proj")])
    for name in [k for k in groups if k.endswith("v_proj")]:
        g = _groups(gm)[name]
        fold_rotation(gm, g, _head_rotation(g.producer.channels, 8, gen))
    torch.testing.assert_close(gm(ids).logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_norm_weights_fold_into_consumers(family):
    gm, ids, ref = _fresh(family)
    norms = [g for g in analyze(gm).groups if g.producer.kind != "linear"]
    for g in norms:
        assert "fold_norm_weight first" in rotation_reason(g) or "layer_norm" in rotation_reason(g)
    for g in norms:
        fold_norm_weight(gm, g)
    torch.testing.assert_close(gm(ids).logits, ref, rtol=1e-4, atol=1e-4)
    for g in analyze(gm).groups:
        if g.producer.kind == "linear":
            continue
        w = qpass.graph.param_of(gm, g.producer.params[0][0])
        assert torch.equal(w, torch.ones_like(w))
        if family == "llama":
            assert "residual stream" in rotation_reason(g)
        else:
            assert torch.equal(qpass.graph.param_of(gm, g.producer.params[1][0]), torch.zeros_like(w))
            assert "layer_norm" in rotation_reason(g)


def test_eager_attention_value_path():
    """softmax(q kᵀ) @ v as matmuls (llama_eager, grouped-query): shift, per-head permutation and rotation of v."""
    gm, ids, ref = _fresh("llama_eager")
    gen = _gen()
    for name in [n for n in _groups(gm) if n.endswith("v_proj")]:
        g = _groups(gm)[name]
        assert shift_reason(g) is permutation_reason(g) is rotation_reason(g) is None
        fold_shifts(gm, g, torch.randn(g.producer.channels, generator=gen, dtype=torch.float64))
        g = _groups(gm)[name]
        fold_permutation(gm, g, _head_perm(g.producer.channels, 8, gen))
        g = _groups(gm)[name]
        fold_rotation(gm, g, _head_rotation(g.producer.channels, 8, gen))
    torch.testing.assert_close(gm(ids).logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "phi3"])
def test_fused_qkv_and_conv1d_producers(family):
    """v rows of a fused qkv (GPT-2 Conv1D [in, out] via addmm; Phi3 [q | k | v] rows): every fold touches the
    consumed rows only, per head."""
    for fold in ("shift", "permute", "rotate"):
        gm, ids, ref = _fresh(family)
        gen = _gen()
        for name in [n for n in _groups(gm) if n.endswith(("attn.c_attn", "self_attn.qkv_proj"))]:
            g = _groups(gm)[name]
            n, idx = g.producer.channels, g.consumed.nonzero().flatten()
            assert idx.numel() == (32 if family == "gpt2" else 16)
            if fold == "shift":
                fold_shifts(gm, g, torch.randn(n, generator=gen, dtype=torch.float64) * g.consumed)
            elif fold == "permute":
                perm = torch.arange(n)
                perm[idx] = idx[_head_perm(idx.numel(), 8, gen)]
                fold_permutation(gm, g, perm)
            else:
                q = torch.eye(n, dtype=torch.float64)
                q[idx.view(-1, 1), idx.view(1, -1)] = _head_rotation(idx.numel(), 8, gen)
                fold_rotation(gm, g, q)
        torch.testing.assert_close(gm(ids).logits, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------- toy graphs


class Chain(nn.Module):
    """RMSNorm -> a, b (no biases); a -> c directly; c stored [in, out] and used as x @ W (matmul)."""

    def __init__(self, d=8, h=12):
        super().__init__()
        torch.manual_seed(0)
        self.norm = toy.RMSNorm(d)
        self.a, self.b = nn.Linear(d, h, bias=False), nn.Linear(d, d, bias=False)
        self.c = nn.Parameter(torch.randn(h, d) / h ** 0.5)

    def forward(self, x):
        h = self.norm(x)
        return (self.a(h) @ self.c) + self.b(h)


class ChainMM(Chain):
    """The same on 2-D inputs with an explicit ``torch.mm`` (an ``aten.mm`` site: a shift makes it ``addmm``)."""

    def forward(self, x):
        h = self.norm(x)
        return torch.mm(self.a(h), self.c) + self.b(h)


def _chain(cls=Chain):
    x = toy.seq_input(d=8, seed=5) if cls is Chain else torch.randn(6, 8, generator=_gen(5))
    gm = qpass.capture(cls(), (x,))
    return gm, x, gm(x)


@pytest.mark.parametrize("cls", [Chain, ChainMM])
def test_toy_chain_every_fold(cls):
    mm = torch.ops.aten.matmul.default if cls is Chain else torch.ops.aten.mm.default
    for fold in ("shift", "perm", "rotate"):
        gm, x, ref = _chain(cls)
        groups = _groups(gm)
        assert sorted(groups) == ["a", "norm"]
        a = groups["a"]
        assert [c.site.node.target for c in a.consumers] == [mm]
        assert a.consumers[0].site.in_axis == 0                           # c stored [in, out]
        gen = _gen(3)
        if fold == "shift":
            for name in ("norm", "a"):
                g = _groups(gm)[name]
                fold_shifts(gm, g, torch.randn(g.producer.channels, generator=gen, dtype=torch.float64))
            targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
            assert mm not in targets                  # matmul became linear(x, t(c), bias); mm became addmm
            assert (torch.ops.aten.addmm.default in targets) == (cls is ChainMM)
        elif fold == "perm":
            for name in ("norm", "a"):
                g = _groups(gm)[name]
                fold_permutation(gm, g, torch.randperm(g.producer.channels, generator=gen))
        else:
            assert "fold_norm_weight first" in rotation_reason(groups["norm"])
            fold_norm_weight(gm, groups["norm"])
            assert "residual stream" in rotation_reason(_groups(gm)["norm"])
            fold_rotation(gm, _groups(gm)["a"], _random_orthogonal(12, gen))
        torch.testing.assert_close(gm(x), ref, rtol=1e-4, atol=1e-5)
        assert sorted(_groups(gm)) == ["a", "norm"], fold


def test_shift_is_refused_across_relu_and_applies_to_layer_norm_without_bias():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.ln = nn.LayerNorm(8, bias=False)
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(self.ln(x))))

    gm = qpass.capture(M(), (toy.seq_input(d=8),))
    x = toy.seq_input(d=8, seed=5)
    ref = gm(x)
    groups = _groups(gm)
    assert "relu (relu)" in shift_reason(groups["fc1"])
    with pytest.raises(ValueError, match="relu"):
        fold_shifts(gm, groups["fc1"], torch.ones(16))
    assert permutation_reason(groups["fc1"]) is None                # relu is elementwise: permutations cross it
    fold_permutation(gm, groups["fc1"], torch.randperm(16, generator=_gen()))
    fold_shifts(gm, _groups(gm)["ln"], torch.randn(8, generator=_gen(), dtype=torch.float64))
    torch.testing.assert_close(gm(x), ref, rtol=1e-4, atol=1e-5)
    ln = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.layer_norm.default)
    assert ln.args[3] is not None                                    # the layer_norm gained a bias


def test_zero_shift_identity_permutation_and_identity_rotation_are_no_ops():
    gm, x, ref = _chain()
    code, state = gm.code, {k: v.clone() for k, v in gm.state_dict().items()}
    for g in analyze(gm).groups:
        fold_shifts(gm, g, torch.zeros(g.producer.channels))
        fold_permutation(gm, g, torch.arange(g.producer.channels))
        if g.producer.kind == "linear":
            fold_rotation(gm, g, torch.eye(g.producer.channels))
    assert gm.code == code
    assert all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())


def test_nothing_to_fold():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(F.gelu(x + 1))

    a = analyze(qpass.capture(M(), (toy.seq_input(d=8),)))
    assert a.groups == [] and "fc" in a.unfoldable


# -------------------------------------------------------------------------- properties of the primitives


@st.composite
def _layouts(draw):
    """(producer channels, channel_map, ctx) of a consumer after grouped-query attention: kv heads of head_dim
    channels, each read by `rep` query heads."""
    kv, rep, hd = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    q_head = torch.arange(kv * rep)
    cmap = ((q_head // rep).view(-1, 1) * hd + torch.arange(hd)).flatten()
    ctx = q_head.repeat_interleave(hd).double() + 1
    return kv * hd, cmap, ctx, hd


@settings(max_examples=40, deadline=None)
@given(_layouts(), st.integers(1, 5), st.integers(0, 2 ** 16))
def test_rotate_and_permute_columns_preserve_the_product(layout, out, seed):
    n, cmap, ctx, hd = layout
    gen = _gen(seed)
    x = torch.randn(3, n, generator=gen, dtype=torch.float64)     # producer output, per head the same mixing
    w = torch.randn(out, cmap.numel(), generator=gen, dtype=torch.float64)
    ref = x[:, cmap] @ w.T
    q = _head_rotation(n, hd, gen)
    torch.testing.assert_close((x @ q)[:, cmap] @ rotate_columns(w, cmap, ctx, q).T, ref)
    perm = _head_perm(n, hd, gen)
    torch.testing.assert_close(x[:, perm][:, cmap] @ w[:, permute_columns(cmap, ctx, perm)].T, ref)


@settings(max_examples=40, deadline=None)
@given(_layouts(), st.integers(1, 5), st.integers(2, 6), st.integers(0, 2 ** 16), st.booleans())
def test_shift_through_attention_values_is_compensated(layout, out, t, seed, causal):
    n, cmap, ctx, hd = layout
    gen = _gen(seed)
    v = torch.randn(t, n, generator=gen, dtype=torch.float64)
    scores = torch.randn(t, t, generator=gen, dtype=torch.float64)
    if causal:                                             # every row keeps its diagonal: no all-masked row
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    probs = scores.softmax(-1)
    z = torch.randn(n, generator=gen, dtype=torch.float64)
    w = torch.randn(out, cmap.numel(), generator=gen, dtype=torch.float64)
    b = torch.randn(out, generator=gen, dtype=torch.float64)
    ref = (probs @ v)[:, cmap] @ w.T + b
    shifted = (probs @ (v - z))[:, cmap] @ w.T + (b + shift_compensation(w, cmap, z))
    torch.testing.assert_close(shifted, ref)
