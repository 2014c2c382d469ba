"""The op sets and small structural matchers every pass and backend shares.

One place says which aten ops are a softmax, which only move elements, which commute with a positive
per-channel scale, what attention looks like and when a parameter is tied, so passes and backends cannot
disagree about them. Sets are ``frozenset`` of op overloads (``n.target in SOFTMAX``); matchers read
``node.meta['val']`` and arguments by schema name where the schema has one, never ``nn_module_stack``.

Op sets
  SOFTMAX            softmax.int, _softmax, _safe_softmax (what SDPA's math path decomposes into)
  SDPA               aten.scaled_dot_product_attention
  MATMULS            batched matmuls attention is made of (matmul, bmm); linear-like sites are qpass.graph's
  TRANSPOSES         t / transpose / permute / numpy_T: how a 2-D weight is consumed transposed
  RESHAPES           view / reshape / _unsafe_view
  LAYOUT             ops that only move elements (their other arguments are ints): reshapes, transposes,
                     (un)squeeze, expand, slice / split / chunk / narrow / select, clone, contiguous, alias,
                     detach, flatten / unflatten, getitem; re-running one on another tensor of the same shape
                     moves that tensor's elements the same way
  CASTS              dtype casts (to.dtype, to.dtype_layout, _to_copy)
  ACTIVATIONS        elementwise nonlinearities (relu, gelu, silu, sigmoid, tanh, ...)
  SCALE_COMMUTING    elementwise ops with f(s * x) = s * f(x) for a positive per-channel s: casts, device
                     moves, type_as, dropout, neg, relu (the positively homogeneous activations)
  PROBS_PASSTHROUGH  what HF eager attention puts between softmax and probs @ V (casts, type_as, dropout)
  REPEAT_KV          ops of transformers' ``repeat_kv`` (grouped K/V heads repeated for the query heads)
  SHAPE_ONLY         nodes that read a tensor's shape or metadata, not its values

Matchers
  attention_sites(gm)         SDPA and eager ``softmax(q @ kᵀ ...) @ v``: AttentionSite (node, q, k, v, scores)
  is_last_two_swap(n)         a transpose / permute of a tensor's last two axes
  weight_users(param)         users of a parameter, looking through transposes
  storage_twins(gm)           {tensor name: other names sharing its storage} (tied weights)
  unrepeat_kv(n)              t if n is ``reshape(expand(unsqueeze(t, 2)))`` repeating heads (sizes static or
                              provably equal symbols)
  repeated_kv(gm)             SDPA sites whose K / V are repeat_kv'd (RepeatedKv); attend_grouped(gm, site) has
                              SDPA read the K/V heads directly (enable_gqa)
  residual_stream(gm)         the residual adds ``h + f(h)`` of the hidden state, from the input embedding on
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten

SOFTMAX = frozenset({aten.softmax.int, aten._softmax.default, aten._safe_softmax.default})
SDPA = aten.scaled_dot_product_attention.default
MATMULS = frozenset({aten.matmul.default, aten.bmm.default})
TRANSPOSES = frozenset({aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default})
RESHAPES = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})
LAYOUT = RESHAPES | TRANSPOSES | frozenset({
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.expand.default, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten.slice.Tensor, aten.split.Tensor, aten.split_with_sizes.default,
    aten.chunk.default, aten.narrow.default, aten.flatten.using_ints, aten.unflatten.int, aten.select.int,
    aten.detach.default, operator.getitem,
})
CASTS = frozenset({aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default})
ACTIVATIONS = frozenset({
    aten.relu.default, aten.gelu.default, aten.silu.default, aten.sigmoid.default, aten.tanh.default,
    aten.leaky_relu.default, aten.hardtanh.default, aten.elu.default, aten.softplus.default, aten.mish.default,
})
POSITIVE_HOMOGENEOUS = frozenset({aten.relu.default})   # act(s * x) == s * act(x) for s > 0
SCALE_COMMUTING = CASTS | POSITIVE_HOMOGENEOUS | frozenset({
    aten.to.device, aten.type_as.default, aten.dropout.default, aten.neg.default,
})
PROBS_PASSTHROUGH = CASTS | frozenset({aten.dropout.default, aten.type_as.default})
REPEAT_KV = RESHAPES | frozenset({
    aten.expand.default, aten.unsqueeze.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
    aten.repeat_interleave.self_int,
})
SHAPE_ONLY = frozenset({aten._assert_tensor_metadata.default, aten.sym_size.int, aten.sym_numel.default,
                        aten.sym_stride.int, aten.sym_storage_offset.default})


def is_call(n, targets) -> bool:
    """`n` is a call_function node whose target is `targets` (one op) or in it (a set)."""
    if not (isinstance(n, Node) and n.op == "call_function"):
        return False
    return n.target in targets if isinstance(targets, (frozenset, set)) else n.target is targets


def arg(n: Node, index: int, name: str, default=None):
    """Argument `name` of a call, given positionally (at `index`) or by keyword."""
    if len(n.args) > index:
        return n.args[index]
    return n.kwargs.get(name, default)


# ------------------------------------------------------------------------------------------ attention


@dataclass(frozen=True)
class AttentionSite:
    """One attention: ``node`` is the SDPA call or, for eager attention, the ``probs @ v`` matmul (the node
    whose output is the attention result). `key` and `value` are as attention consumes them (K before the
    eager form's transpose); `scores` is the eager ``q @ kᵀ`` matmul (None for SDPA)."""

    node: Node
    query: Node
    key: Node
    value: Node
    softmax: Node | None = None
    scores: Node | None = None

    @property
    def kind(self) -> str:
        return "sdpa" if self.scores is None else "eager"

    @property
    def score_consumer(self) -> Node:
        """The node that computes attention scores from q and k (SDPA itself, or the q @ kᵀ matmul)."""
        return self.node if self.scores is None else self.scores

    @property
    def score_operands(self) -> tuple[Node, ...]:
        """What `score_consumer` reads to compute scores: (q, k) of SDPA; (q, kᵀ) of the eager matmul."""
        if self.scores is None:
            return (self.query, self.key)
        return tuple(a for a in self.scores.args[:2] if isinstance(a, Node))


def attention_sites(gm: GraphModule) -> list[AttentionSite]:
    """Every SDPA call and every eager attention ``softmax(q @ kᵀ ...) -> [casts, dropout] -> probs @ v`` whose
    kᵀ is a swap of K's last two axes, in graph order."""
    out = []
    for n in gm.graph.nodes:
        if is_call(n, SDPA):
            out.append(AttentionSite(n, arg(n, 0, "query"), arg(n, 1, "key"), arg(n, 2, "value")))
        elif is_call(n, SOFTMAX):
            pv, qk = _probs_matmul(n), _scores_matmul(n.args[0])
            kt = qk.args[1] if qk is not None else None
            if pv is None or not isinstance(kt, Node) or not is_last_two_swap(kt):
                continue
            out.append(AttentionSite(pv, qk.args[0], kt.args[0], pv.args[1], n, qk))
    return out


def _probs_matmul(softmax: Node) -> Node | None:
    """The matmul that takes the probabilities (through PROBS_PASSTHROUGH ops) as its left operand."""
    n = softmax
    while True:
        users = list(n.users)
        mm = [u for u in users if is_call(u, MATMULS) and u.args[0] is n]
        if mm:
            return mm[0]
        nxt = [u for u in users if is_call(u, PROBS_PASSTHROUGH)]
        if len(nxt) != 1:
            return None
        n = nxt[0]


def _scores_matmul(n, depth: int = 8) -> Node | None:
    """The matmul the softmax input comes from, following first tensor arguments (scale, mask add, casts)."""
    for _ in range(depth):
        if not isinstance(n, Node) or n.op != "call_function":
            return None
        if n.target in MATMULS:
            return n
        ins = [a for a in n.args if isinstance(a, Node)]
        if not ins:
            return None
        n = ins[0]
    return None


def is_last_two_swap(n) -> bool:
    """`n` transposes its input's last two axes (transpose(-2, -1) / permute(..., -1, -2))."""
    if is_call(n, aten.transpose.int):
        rank = n.args[0].meta["val"].dim()
        return sorted(d % rank for d in n.args[1:3]) == [rank - 2, rank - 1]
    if is_call(n, aten.permute.default):
        p = list(n.args[1])
        return p[:-2] == list(range(len(p) - 2)) and p[-2:] == [len(p) - 1, len(p) - 2]
    return False


def unrepeat_kv(n) -> Node | None:
    """t if n is ``reshape(expand(unsqueeze(t, 2), [b, h, g, l, d]), [b, h * g, l, d])`` (transformers'
    ``repeat_kv``) with no other users along the chain, else None. Sizes may be symbolic (a graph exported with
    dynamic batch / length): they must then be provably equal, without adding guards."""
    if not (is_call(n, {aten.reshape.default, aten.view.default}) and len(n.users) == 1):
        return None
    e = n.args[0]
    if not (is_call(e, aten.expand.default) and len(e.users) == 1):
        return None
    u = e.args[0]
    if not (is_call(u, aten.unsqueeze.default) and u.args[1] == 2 and len(u.users) == 1):
        return None
    t = u.args[0]
    src, mid, out = (_shape(x) for x in (t, e, n))
    if src is None or out is None or mid is None or len(src) != 4 or len(mid) != 5 or len(out) != 4:
        return None
    b, h, l, d = src
    ok = _same(mid, (b, h, mid[2], l, d)) and _same(out, (b, h * mid[2], l, d))
    return t if ok else None


def _shape(n) -> tuple | None:
    val = n.meta.get("val") if isinstance(n, Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _same(a: tuple, b: tuple) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return len(a) == len(b) and all(x == y if isinstance(x, int) and isinstance(y, int)
                                    else statically_known_true(x == y) for x, y in zip(a, b))


@dataclass(frozen=True)
class RepeatedKv:
    attention: Node             # scaled_dot_product_attention(q, rep(key), rep(value), ...)
    key: Node                   # [b, kv_heads, l, d] before the repeat
    value: Node


def repeated_kv(gm: GraphModule, *, static: bool = True) -> list[RepeatedKv]:
    """Every ``scaled_dot_product_attention(q, rep(k), rep(v), ...)`` (not already ``enable_gqa``) whose K and V
    are repeated by ``repeat_kv`` (:func:`unrepeat_kv`) from as many heads each; `static`: only where K and V have
    static shapes."""
    out = []
    for n in gm.graph.nodes:
        if not is_call(n, SDPA) or len(n.args) > 7 or len(n.args) < 3 or n.kwargs.get("enable_gqa", False):
            continue
        k, v = unrepeat_kv(n.args[1]), unrepeat_kv(n.args[2])
        ks, vs = (static_shape(k), static_shape(v)) if static else (_shape(k), _shape(v))
        if ks is not None and vs is not None and ks[1] == vs[1]:
            out.append(RepeatedKv(n, k, v))
    return out


def attend_grouped(gm: GraphModule, site: RepeatedKv) -> None:
    """SDPA of `site` reads the K/V heads as they are (``enable_gqa=True``: the same result, no repeated copy of
    K and V); the repeat chains left without users are erased."""
    a = site.attention
    dead = [a.args[1], a.args[2]]
    a.args = (a.args[0], site.key, site.value, *a.args[3:])
    a.kwargs = {**a.kwargs, "enable_gqa": True}
    for rep in dict.fromkeys(dead):         # reshape <- expand <- unsqueeze, each used only by the next
        for node in (rep, rep.args[0], rep.args[0].args[0]):
            if not node.users:
                gm.graph.erase_node(node)


def static_shape(n) -> tuple[int, ...] | None:
    """The example shape of `n` when every size is a plain int, else None."""
    val = n.meta.get("val") if isinstance(n, Node) else None
    if not isinstance(val, torch.Tensor) or not all(isinstance(s, int) for s in val.shape):
        return None
    return tuple(val.shape)


# ------------------------------------------------------------------------------------ residual stream


def residual_stream(gm: GraphModule) -> list[Node]:
    """The residual adds of the hidden state, in order. From the input embedding (the one that reads the
    graph's token ids; else the first floating-point graph input) each step takes the add that has the
    current hidden state h as one operand and another tensor as the other, with h's shape
    (``h + attn(norm(h))``, a parallel block's ``(mlp + attn) + h``, ``embeddings + positions``), looking
    through dropout, casts, clones and reshapes in between (when one is h's only such user). Empty when no
    add follows."""
    nodes = list(gm.graph.nodes)
    start = next((n for n in nodes if is_call(n, aten.embedding.default) and _from_input(n.args[1])), None)
    if start is None:
        start = next((n for n in nodes if n.op == "placeholder" and _is_float(n)), None)
    out, cur = [], start
    while cur is not None:
        nxt = None
        for u in cur.users:
            if is_call(u, {aten.add.Tensor}) and _residual(u, cur):
                nxt = u
                break
        if nxt is None:
            moved = [u for u in cur.users if is_call(u, _STREAM_MOVES)]
            cur = moved[0] if len(moved) == 1 else None
            continue
        out.append(nxt)
        cur = nxt
    return out


_STREAM_MOVES = PROBS_PASSTHROUGH | RESHAPES | frozenset({aten.clone.default})   # dropout, casts, OPT's flatten


def _residual(add: Node, h: Node) -> bool:
    a, b = add.args[:2]
    other = b if a is h else a if b is h else None
    return isinstance(other, Node) and isinstance(other.meta.get("val"), torch.Tensor) and _same_shape(add, h)


def _from_input(n) -> bool:
    """`n` is a graph input, moved by layout ops only (the token ids an input embedding reads)."""
    while is_call(n, LAYOUT):
        n = n.args[0]
    return isinstance(n, Node) and n.op == "placeholder"


def _is_float(n: Node) -> bool:
    v = n.meta.get("val")
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def _same_shape(a: Node, b: Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape


# --------------------------------------------------------------------------------------- tied weights


def weight_users(n: Node) -> list[Node]:
    """Users of a parameter's get_attr node, looking through transposes (how linear sites consume weights)."""
    out = []
    for u in n.users:
        if is_call(u, TRANSPOSES):
            out += weight_users(u)
        else:
            out.append(u)
    return out


def storage_twins(gm: GraphModule) -> dict[str, tuple[str, ...]]:
    """{name: the other names whose tensor shares its storage} over gm's parameters and buffers (every name
    of a tied parameter) and the tensors its get_attr nodes read. Only names with a twin are keys. Storages
    are told apart by (data pointer, device type); empty and meta tensors (pointer 0) are never twins."""
    named: dict[str, torch.Tensor] = dict(gm.named_parameters(remove_duplicate=False))
    named.update(gm.named_buffers(remove_duplicate=False))
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target not in named:
            t = _attr(gm, n.target)
            if isinstance(t, torch.Tensor):
                named[n.target] = t
    by_storage: dict = {}
    for name, t in named.items():
        key = _storage_key(t)
        if key is not None:
            by_storage.setdefault(key, []).append(name)
    return {name: tuple(x for x in names if x != name) for names in by_storage.values() if len(names) > 1
            for name in names}


def _storage_key(t: torch.Tensor):
    if t.device.type == "meta" or t.untyped_storage().nbytes() == 0:
        return None
    return (t.untyped_storage().data_ptr(), t.device.type)


def _attr(gm: GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


__all__ = ["SOFTMAX", "SDPA", "MATMULS", "TRANSPOSES", "RESHAPES", "LAYOUT", "CASTS", "ACTIVATIONS",
           "POSITIVE_HOMOGENEOUS", "SCALE_COMMUTING", "PROBS_PASSTHROUGH", "REPEAT_KV", "SHAPE_ONLY", "is_call",
           "arg", "AttentionSite", "attention_sites", "is_last_two_swap", "unrepeat_kv", "RepeatedKv",
           "repeated_kv", "attend_grouped", "static_shape",
           "residual_stream", "weight_users", "storage_twins"]
