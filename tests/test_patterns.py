"""qpass.patterns: the shared op sets and matchers fire on toy graphs and real captures, and only there."""
import ast
import pathlib

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import qpass
from qpass import patterns as P
from tests import toy

aten = torch.ops.aten
ROOT = pathlib.Path(__file__).resolve().parent.parent


def targets(gm) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


class EagerAttention(nn.Module):
    """softmax(q @ kᵀ * scale) @ v, as HF's eager attention writes it (cast and dropout between)."""

    def __init__(self, d: int = 16, heads: int = 2, transpose_k: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.transpose_k = heads, transpose_k
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        kt = k.transpose(2, 3) if self.transpose_k else k.permute(0, 1, 3, 2).contiguous().view(b, self.heads, -1, t)
        probs = F.softmax(q @ kt * 0.5, dim=-1, dtype=torch.float32).to(q.dtype)
        return (F.dropout(probs, 0.0, False) @ v).transpose(1, 2).reshape(b, t, d)


class SoftmaxHead(nn.Module):
    """A softmax over a linear's output (a classifier): no attention."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return F.softmax(self.fc(x), dim=-1) @ self.fc.weight


# ------------------------------------------------------------------------------------------ op sets


def test_op_sets_are_frozen_sets_of_ops_and_nest():
    for name in ("SOFTMAX", "MATMULS", "TRANSPOSES", "RESHAPES", "LAYOUT", "CASTS", "ACTIVATIONS",
                 "POSITIVE_HOMOGENEOUS", "SCALE_COMMUTING", "PROBS_PASSTHROUGH", "REPEAT_KV", "SHAPE_ONLY"):
        ops = getattr(P, name)
        assert isinstance(ops, frozenset) and ops, name
    assert P.RESHAPES | P.TRANSPOSES <= P.LAYOUT
    assert P.POSITIVE_HOMOGENEOUS <= P.ACTIVATIONS and P.POSITIVE_HOMOGENEOUS <= P.SCALE_COMMUTING
    assert P.CASTS <= P.SCALE_COMMUTING and P.CASTS <= P.PROBS_PASSTHROUGH
    assert not (P.LAYOUT & P.SCALE_COMMUTING)              # moved (re-run on ids) vs passed through, never both
    assert aten._safe_softmax.default in P.SOFTMAX          # SDPA's math path decomposes into it


@pytest.mark.parametrize("family", toy.FAMILIES + toy.FUSED_FAMILIES + ("llama_eager",))
def test_op_sets_fire_on_real_captures(family):
    t = targets(toy.captured(family)[1])
    assert (P.SDPA in t) != bool(t & P.SOFTMAX)             # attention is SDPA, or eager with a softmax
    assert t & P.LAYOUT and t & P.TRANSPOSES and t & P.RESHAPES
    assert t & P.ACTIVATIONS                                # silu / relu / gelu / tanh (gelu_new)
    assert t & P.CASTS or family == "gpt2"                  # RMSNorm / LayerNorm upcasts
    if family == "llama_eager":
        assert t & P.MATMULS


def test_op_sets_fire_on_toy_graphs():
    dec = targets(qpass.capture(toy.TinyDecoderLayer(), (toy.seq_input(),)))
    assert P.SDPA in dec and dec & P.TRANSPOSES and aten.silu.default in dec & P.ACTIVATIONS
    mlp = targets(qpass.capture(toy.TinyMLP(), (toy.mlp_input(),)))
    assert mlp & P.POSITIVE_HOMOGENEOUS and not mlp & P.SOFTMAX and P.SDPA not in mlp


PENDING: set = set()   # modules not yet on the shared matchers (none)


def test_no_other_module_spells_the_shared_ops():
    """Softmax, SDPA and numpy_T are named in qpass.patterns only: every pass and backend uses its sets."""
    shared = {"softmax", "_softmax", "_safe_softmax", "scaled_dot_product_attention", "numpy_T"}
    for folder in ("qpass", "passes", "backends"):
        for f in (ROOT / folder).rglob("*.py"):
            if f.name == "patterns.py" and f.parent.name == "qpass" or f.relative_to(ROOT) in PENDING:
                continue
            for n in ast.walk(ast.parse(f.read_text())):
                if isinstance(n, ast.Attribute) and n.attr in shared and getattr(n.value, "id", None) == "aten":
                    pytest.fail(f"{f.relative_to(ROOT)}:{n.lineno} names aten.{n.attr}: use qpass.patterns")


# ---------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("family", toy.FAMILIES + toy.FUSED_FAMILIES + ("llama_eager", "mpt"))
def test_attention_sites_on_real_captures(family):
    sites = P.attention_sites(toy.captured(family)[1])
    assert len(sites) == 2                                  # one per layer
    for s in sites:                                         # MPT: eager, ALiBi added to the scores
        assert s.kind == ("eager" if family in ("llama_eager", "mpt") else "sdpa")
        assert s.key.meta["val"].dim() == 4 and s.value.meta["val"].dim() == 4
        assert s.score_consumer is (s.scores if s.kind == "eager" else s.node)
        if s.kind == "eager":
            assert s.softmax.target in P.SOFTMAX and s.node.args[1] is s.value
            assert P.is_last_two_swap(s.score_operands[1]) and s.score_operands[1].args[0] is s.key


def test_attention_sites_on_toy_graphs():
    (sdpa,) = P.attention_sites(qpass.capture(toy.TinyDecoderLayer(), (toy.seq_input(),)))
    assert sdpa.kind == "sdpa" and sdpa.score_operands == (sdpa.query, sdpa.key)
    gm = qpass.capture(EagerAttention(), (toy.seq_input(),))
    (eager,) = P.attention_sites(gm)
    assert eager.kind == "eager" and eager.node.target in P.MATMULS
    assert eager.softmax.target in P.SOFTMAX and eager.scores.target in P.MATMULS


def test_attention_sites_no_match():
    assert P.attention_sites(qpass.capture(toy.TinyMLP(), (toy.mlp_input(),))) == []
    assert P.attention_sites(qpass.capture(SoftmaxHead(), (toy.seq_input(),))) == []   # no q @ kᵀ
    # K consumed without a swap of its last two axes: not recognisable as q @ kᵀ
    assert P.attention_sites(qpass.capture(EagerAttention(transpose_k=False), (toy.seq_input(),))) == []


def test_is_last_two_swap():
    class Swaps(nn.Module):
        def forward(self, x):
            return x.transpose(-2, -1), x.transpose(1, 2), x.permute(0, 1, 3, 2), x.permute(0, 2, 1, 3)

    gm = qpass.capture(Swaps(), (torch.randn(2, 3, 4, 5),))
    swaps = [n for n in gm.graph.nodes if n.target in P.TRANSPOSES]
    assert [P.is_last_two_swap(n) for n in swaps] == [True, False, True, False]


def test_unrepeat_kv_finds_grouped_heads():
    # 4 query heads, 2 kv heads: repeat_kv in the graph; static shapes in a decode step
    gm = qpass.capture_decode(toy.hf_model("llama"), max_cache_len=16)
    assert len(P.attention_sites(gm)) == 2
    for s in P.attention_sites(gm):
        k = P.unrepeat_kv(s.key)
        assert k is not None and P.static_shape(k)[1] == 2 and P.static_shape(s.key)[1] == 4
    (sdpa,) = P.attention_sites(qpass.capture(toy.TinyDecoderLayer(), (toy.seq_input(),)))
    assert P.unrepeat_kv(sdpa.key) is None                  # no repeat
    assert P.unrepeat_kv(None) is None


# ------------------------------------------------------------------------------------- tied weights


@pytest.mark.parametrize("family,tied", [("llama_tied", True), ("opt", True), ("gpt2", True), ("llama", False),
                                         ("phi3", False)])
def test_tied_weights(family, tied):
    gm = toy.captured(family)[1]
    twins = P.storage_twins(gm)
    head = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.endswith("lm_head.weight")]
    assert bool(twins) == tied
    if tied:
        ((name, others),) = [(k, v) for k, v in twins.items() if k.endswith("lm_head.weight")]
        assert len(others) == 1 and others[0].endswith(("embed_tokens.weight", "wte.weight"))
        assert twins[others[0]] == (name,)
        if head:      # one get_attr for both uses: the embedding and the head read it
            users = {u.target for u in P.weight_users(head[0])}
            assert aten.embedding.default in users and users - {aten.embedding.default}
    else:
        assert len(P.weight_users(head[0])) == 1


def test_storage_twins_ignore_empty_and_meta_tensors():
    gm = qpass.capture(toy.TinyMLP(), (toy.mlp_input(),))
    assert P.storage_twins(gm) == {}
    gm.register_buffer("alias", gm.get_parameter("fc1.weight").detach()[:2])     # a view: same storage
    gm.register_buffer("e1", torch.zeros(0))
    gm.register_buffer("e2", torch.zeros(0))
    gm.register_buffer("m1", torch.zeros(3, device="meta"))
    gm.register_buffer("m2", torch.zeros(3, device="meta"))
    assert P.storage_twins(gm) == {"fc1.weight": ("alias",), "alias": ("fc1.weight",)}


def test_weight_users_look_through_transposes():
    gm = toy.captured("gpt2")[1]                            # Conv1D: addmm(b, x, W) and the head's t(W)
    head = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.endswith("wte.weight")]
    users = P.weight_users(head[0]) if head else []
    assert not any(u.target in P.TRANSPOSES for u in users)


# ------------------------------------------------------------------------------------ residual stream

# residual adds per 2-layer model: two per layer (attention, MLP), one per layer for GPT-NeoX's parallel block,
# plus the position-embedding add of OPT and GPT-2
STREAM = {"llama": 4, "mistral": 4, "qwen2": 4, "llama_tied": 4, "phi3": 4, "llama_eager": 4, "gpt_neox": 2,
          "opt": 5, "gpt2": 5}


@pytest.mark.parametrize("family", sorted(STREAM))
def test_residual_stream_on_real_captures(family):
    gm = toy.captured(family)[1]
    adds = P.residual_stream(gm)
    assert len(adds) == STREAM[family]
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    assert all(a.target is aten.add.Tensor for a in adds) and [pos[a] for a in adds] == sorted(pos[a] for a in adds)


def test_residual_stream_on_toy_graphs():
    gm = qpass.capture(toy.TinyDecoderLayer(), (toy.seq_input(),))
    adds = P.residual_stream(gm)                           # x + attn(...), then + mlp(...)
    assert len(adds) == 2 and adds[0] in adds[1].args
    assert P.residual_stream(qpass.capture(toy.TinyMLP(), (toy.mlp_input(),))) == []     # no residual
