"""Folding analysis: where a per-input-channel scale of each linear can be folded, derived from the graph.

SmoothQuant, AWQ, OS+ and rotations rewrite ``y = x W`` as ``y = (x / s)(s W)``: ``s`` multiplies the
linear's input columns and ``1 / s`` must be absorbed by whatever *produced* ``x``. This module finds, for
every linear-like site (``qpass.graph.linear_sites``), the producer that can absorb it, with no
per-architecture table:

  * a per-channel parameter multiply ``mul(g, x)`` with ``g`` a 1-D parameter (HF RMSNorm ends in
    ``weight * normalized``; reported as ``rmsnorm`` when an ``rsqrt`` feeds ``x``),
  * ``aten.layer_norm`` with an affine weight (and bias),
  * a previous linear's output rows (and bias): v_proj -> o_proj through attention (grouped-query heads
    included), up_proj -> down_proj through ``silu(gate) * up``, fc1 -> fc2 through ReLU, the v rows of a
    fused qkv (GPT-2 Conv1D, Phi3, GPT-NeoX) or the up rows of a fused gate_up (Phi3).

How: starting at each candidate producer, a *channel-id tensor* (producer channel index at every element,
on concrete example sizes) is pushed forward through ops that commute with a positive per-channel scale:
layout ops (view/reshape/transpose/permute/expand/slice/split/chunk/...), casts, dropout, clone, ReLU, a
product or quotient with one scaled operand (``silu(gate) * up``; multiplying by a scalar), and the value
operand of ``scaled_dot_product_attention``. Every other use is a *sink*: the producer channels reaching
it cannot be rescaled (a residual add, GELU, RoPE, the q/k operands of attention, a qpass quantizer, the
graph output). The linears reached form one group; the id tensor at each linear's input gives its
``channel_map`` (input column -> producer channel), so a grouped-query v_proj -> o_proj group maps every
o_proj column of a repeated head onto the same v channel, and a scale defined per producer channel is
constant across the repeat by construction. A group is valid when no consumed producer channel reaches a
sink and no parameter it would change is shared (tied embeddings). Linears left without a group get a
reason ("input comes from a residual add (add_6)").

Applying a scale is layout-aware (``fold_scales``): ``LinearSite.in_axis`` / ``out_axis`` index the
*stored* parameter, so GPT-2's Conv1D weights ([in, out]) are handled like nn.Linear's ([out, in]).
"""
from __future__ import annotations

import heapq
import operator
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from . import patterns as P
from .graph import LinearSite, is_quantizer, linear_sites, module_path, param_of

aten = torch.ops.aten

# Op sets are qpass.patterns': layout ops are re-run on the id tensor, SCALE_COMMUTING ops pass ids through.
_LAYOUT = P.LAYOUT
_IDENTITY = P.SCALE_COMMUTING
_MUL = {aten.mul.Tensor, aten.mul.Scalar}
_DIV = {aten.div.Tensor, aten.div.Scalar}
_SDPA = P.SDPA
_MATMULS = P.MATMULS   # eager attention: probs @ v mixes tokens only
_SHAPE_ONLY = P.SHAPE_ONLY
_RESHAPES = {aten.view.default, aten._unsafe_view.default}   # run as reshape (ids may be non-contiguous)
_CASTS = P.CASTS
_LAYER_NORMS = {aten.layer_norm.default}


@dataclass(frozen=True)
class Producer:
    """A node whose output channels can absorb ``1 / s``: its `params` are (get_attr node, axis of the
    stored tensor that indexes the output channel)."""

    node: Node
    kind: str                                  # "rmsnorm" | "channel_scale" | "layer_norm" | "linear"
    params: tuple[tuple[Node, int], ...]
    channels: int
    path: str


@dataclass(frozen=True)
class Consumer:
    site: LinearSite
    channel_map: torch.Tensor                  # long [in_features]: producer channel of each input column


@dataclass(frozen=True)
class FoldGroup:
    producer: Producer
    consumers: tuple[Consumer, ...]

    @property
    def name(self) -> str:
        return self.producer.path or self.producer.node.name

    @property
    def consumed(self) -> torch.Tensor:
        """Bool mask over producer channels read by at least one consumer (others keep scale 1)."""
        mask = torch.zeros(self.producer.channels, dtype=torch.bool)
        for c in self.consumers:
            mask[c.channel_map] = True
        return mask

    def __str__(self) -> str:
        names = ", ".join(c.site.path or c.site.node.name for c in self.consumers)
        return f"{self.name} ({self.producer.kind}) -> {names}"


@dataclass
class FoldingAnalysis:
    groups: list[FoldGroup] = field(default_factory=list)
    unfoldable: dict[str, str] = field(default_factory=dict)    # linear path -> why it has no folding point

    def lines(self) -> list[str]:
        return [str(g) for g in self.groups] + [f"{k}: {v}" for k, v in self.unfoldable.items()]


# ------------------------------------------------------------------------------------------ analysis


def analyze(gm: GraphModule) -> FoldingAnalysis:
    """Folding groups of every linear-like site of `gm`, and the reason for each linear without one."""
    sites = linear_sites(gm)
    by_node = {s.node: s for s in sites}
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    producers: dict[Node, Producer] = {}
    reasons: dict[Node, str] = {}
    for site in sites:
        found = _find_producer(gm, site.input, by_node)
        if isinstance(found, str):
            reasons[site.node] = found
        else:
            producers.setdefault(found.node, found)
    result, claimed, storages = FoldingAnalysis(), set(), P.storage_twins(gm)
    for prod in sorted(producers.values(), key=lambda p: pos[p.node]):
        group = _group(gm, prod, by_node, pos, storages)
        if isinstance(group, str):
            for site in _sites_reading(gm, prod, by_node, pos):
                reasons.setdefault(site.node, group)
            continue
        if any(c.site.node in claimed for c in group.consumers):
            for c in group.consumers:
                reasons.setdefault(c.site.node, f"also reached from {group.name}; folded into one producer only")
            continue
        claimed.update(c.site.node for c in group.consumers)
        result.groups.append(group)
    for site in sites:
        if site.node not in claimed:
            key = site.path or site.node.name
            key = f"{key} ({site.node.name})" if key in result.unfoldable else key   # a module called twice
            result.unfoldable[key] = reasons.get(site.node, "no producer reaches its input through "
                                                            "channel-preserving ops")
    return result


def _find_producer(gm: GraphModule, n: Node, by_node: dict) -> Producer | str:
    """Walk up from a linear's input through channel-preserving ops to a producer, or say why not."""
    for _ in range(10_000):
        prod = producer_at(gm, n, by_node)
        if isinstance(prod, Producer):
            return prod
        if isinstance(prod, str):
            return prod
        if is_quantizer(n):
            return f"input passes through a qpass quantizer ({n.name}); fold scales before quantizing"
        if n.op == "placeholder":
            return f"input comes from the graph input {n.name}"
        if n.op != "call_function":
            return f"input comes from {n.op} {n.target}"
        if n.target in _LAYOUT or n.target in _IDENTITY:
            n = n.args[0]
            continue
        if n.target is _SDPA:
            n = n.args[2] if len(n.args) > 2 else n.kwargs["value"]
            continue
        if n.target in _MATMULS:
            n = n.args[1]
            continue
        if n.target in _MUL or n.target in _DIV:
            tensors = [a for a in n.args[:2] if isinstance(a, Node) and _is_tensor(a)]
            if n.target in _DIV:
                tensors = tensors[:1] if tensors and tensors[0] is n.args[0] else []
            found = [_find_producer(gm, a, by_node) for a in tensors]
            ok = [f for f in found if isinstance(f, Producer)]
            if len(ok) == 1:
                return ok[0]
            if len(ok) > 1:
                return f"input is a product ({n.name}) of two tensors that both have producers"
            return found[-1] if found else _sink_reason(n)
        return _sink_reason(n)
    return "input path too long"


def _sink_reason(n: Node) -> str:
    op = _op_name(n)
    tensors = [a for a in n.all_input_nodes if _is_tensor(a)]
    if n.target in (aten.add.Tensor, aten.add_.Tensor) and len(tensors) == 2:
        return f"input comes from a residual add ({n.name})"
    return f"input passes through {op} ({n.name}), which is not channel-preserving"


def producer_at(gm: GraphModule, n: Node, by_node: dict | None = None) -> Producer | str | None:
    """`n` as a producer: a Producer, a reason string (it is one, but cannot absorb a scale), or None."""
    if n.op != "call_function":
        return None
    val = n.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return None
    channels = val.shape[-1]
    path = module_path(gm, n)
    if n.target in _LAYER_NORMS:
        shape = n.args[1]
        weight = n.args[2] if len(n.args) > 2 else n.kwargs.get("weight")
        bias = n.args[3] if len(n.args) > 3 else n.kwargs.get("bias")
        if len(shape) != 1:
            return f"input comes from a layer_norm over {len(shape)} dims ({n.name})"
        if not (isinstance(weight, Node) and weight.op == "get_attr"):
            return f"input comes from a layer_norm without an affine weight ({n.name})"
        params = ((weight, 0),) + (((bias, 0),) if isinstance(bias, Node) and bias.op == "get_attr" else ())
        return Producer(n, "layer_norm", params, int(channels), path)
    if n.target is aten.mul.Tensor:
        for i, a in enumerate(n.args[:2]):
            g = _through_casts(a)
            if isinstance(g, Node) and g.op == "get_attr" and _is_param_vector(gm, g, channels):
                other = n.args[1 - i]
                kind = "rmsnorm" if _has_ancestor(other, aten.rsqrt.default, depth=6) else "channel_scale"
                return Producer(n, kind, ((g, 0),), int(channels), path)
        return None
    if by_node is not None and n in by_node:
        site = by_node[n]
        params = ((site.weight, site.out_axis),) + (((site.bias, 0),) if site.bias is not None else ())
        return Producer(n, "linear", params, int(channels), site.path)
    return None


def _group(gm: GraphModule, prod: Producer, by_node: dict, pos: dict, storages: dict) -> FoldGroup | str:
    """Push channel ids forward from `prod`; a FoldGroup, or the reason it cannot absorb a scale."""
    consumers, sinks = _propagate(gm, prod, by_node, pos)
    if not consumers:
        return f"{prod.path or prod.node.name} reaches no linear input through channel-preserving ops"
    used = torch.zeros(prod.channels, dtype=torch.bool)
    cons = []
    for site, ids in consumers:
        cmap = _channel_map(ids)
        if cmap is None:
            return (f"the channel axis is not preserved between {prod.node.name} and the input of "
                    f"{site.path or site.node.name}")
        used[cmap] = True
        cons.append(Consumer(site, cmap))
    for sink, ids in sinks:
        if used[ids].any():
            what = ("a residual add" if sink.op == "call_function" and sink.target in (aten.add.Tensor,)
                    else "the graph output" if sink.op == "output" else _op_name(sink))
            return (f"{prod.kind} {prod.path or prod.node.name} cannot absorb a scale: its output also reaches "
                    f"{what} ({sink.name}), which is not channel-preserving")
    why = _params_reason(gm, prod, cons, by_node, storages)
    return why or FoldGroup(prod, tuple(cons))


def _propagate(gm: GraphModule, prod: Producer, by_node: dict, pos: dict):
    """Forward id propagation: ([(site, ids at its input)], [(sink node, long ids reaching it)])."""
    shape = _concrete_shape(prod.node.meta["val"])
    ids = {prod.node: torch.arange(prod.channels, dtype=torch.float64).expand(shape).clone()}
    consumers, sinks = [], []
    heap, seen = [], set()

    def push_users(n):
        for u in n.users:
            if u not in seen:
                seen.add(u)
                heapq.heappush(heap, (pos[u], id(u), u))

    push_users(prod.node)
    while heap:
        _, _, n = heapq.heappop(heap)
        if n.op == "call_function" and n.target in _SHAPE_ONLY:
            continue
        site = by_node.get(n)
        if site is not None and site.input in ids and not _reaches(site, ids, exclude_input=True):
            consumers.append((site, ids[site.input]))
            continue
        out, blocked = _transfer(n, ids)
        sinks += [(n, _flat_ids(b)) for b in blocked]
        if out is not None:
            ids[n] = out
            push_users(n)
    return consumers, sinks


def _reaches(site: LinearSite, ids: dict, exclude_input: bool) -> bool:
    others = [site.weight_use, site.bias]
    return any(o is not None and o in ids for o in others) or (not exclude_input and site.input in ids)


def _transfer(n: Node, ids: dict):
    """(ids of n's output or None, [ids blocked by n]) for one node with at least one scaled input."""
    reached = [a for a in n.all_input_nodes if a in ids]
    blocked = [ids[a] for a in reached if isinstance(ids[a], torch.Tensor)]
    if n.op != "call_function":
        return None, blocked
    t = n.target
    try:
        if t in _LAYOUT:
            if n.args[0] not in ids or len(reached) != 1:
                return None, blocked
            if t is operator.getitem:
                return ids[n.args[0]][n.args[1]], []
            fn = aten.reshape.default if t in _RESHAPES else t
            args = (ids[n.args[0]],) + tuple(_concrete(a) for a in n.args[1:])
            return fn(*args, **{k: _concrete(v) for k, v in n.kwargs.items()}), []
        if t in _IDENTITY:
            return (ids[n.args[0]], []) if n.args[0] in ids and len(reached) == 1 else (None, blocked)
        if t in _MUL or t in _DIV:
            x = n.args[0] if t in _DIV else next(a for a in n.args[:2] if a in ids)
            if len(reached) != 1 or x not in ids:
                return None, blocked
            return ids[x].expand(_concrete_shape(n.meta["val"])), []
        if t is _SDPA or t in _MATMULS:
            value = n.args[1] if t in _MATMULS else n.args[2] if len(n.args) > 2 else n.kwargs.get("value")
            rest = [ids[a] for a in reached if a is not value]
            if value not in ids:
                return None, rest
            v = ids[value]
            if not bool((v == v[..., :1, :]).all()):
                return None, blocked
            return v[..., :1, :].expand(_concrete_shape(n.meta["val"])), rest
    except (RuntimeError, IndexError, TypeError, ValueError):
        return None, blocked
    return None, blocked


def _channel_map(ids: torch.Tensor) -> torch.Tensor | None:
    """Producer channel per input column if the ids are the same for every token, else None."""
    flat = ids.reshape(-1, ids.shape[-1])
    if flat.shape[0] == 0 or not bool((flat == flat[:1]).all()):
        return None
    return flat[0].long()


def _flat_ids(t) -> torch.Tensor:
    if isinstance(t, (list, tuple)):
        return torch.cat([_flat_ids(x) for x in t]) if t else torch.zeros(0, dtype=torch.long)
    return t.flatten().long().unique()


def _sites_reading(gm: GraphModule, prod: Producer, by_node: dict, pos: dict) -> list[LinearSite]:
    consumers, _ = _propagate(gm, prod, by_node, pos)
    return [s for s, _ in consumers]


# ------------------------------------------------------------------------------------- shared params


def _params_reason(gm: GraphModule, prod: Producer, consumers: list[Consumer], by_node: dict,
                   storages: dict) -> str | None:
    """Why the group's parameters cannot be rescaled (already quantized, shared, tied), or None."""
    allowed: dict[Node, set[Node]] = {}
    for p, _ in prod.params:
        allowed.setdefault(p, set()).add(prod.node)
    if prod.kind == "linear":
        site = by_node[prod.node]
        if is_quantizer(site.weight_use):
            return f"{site.path}: weight is already quantized; fold scales before quantizing"
        allowed[site.weight] = {prod.node}
    for c in consumers:
        if is_quantizer(c.site.weight_use):
            return f"{c.site.path}: weight is already quantized; fold scales before quantizing"
        allowed.setdefault(c.site.weight, set()).add(c.site.node)
    for p, ok in allowed.items():
        bad = [u for u in P.weight_users(p) if u not in ok]
        name = p.target
        if bad:
            where = module_path(gm, bad[0]) or bad[0].name
            return (f"parameter {name} is also used by {_op_name(bad[0])} in {where} (shared or tied "
                    "weights); rescaling it would change that use too")
        twins = storages.get(p.target, ())
        if twins:
            return f"parameter {name} shares storage with {twins[0]} (tied); rescaling it would change both"
    return None


# ------------------------------------------------------------------------------------------- helpers


def _is_tensor(n) -> bool:
    return isinstance(n, Node) and isinstance(n.meta.get("val"), torch.Tensor)


def _through_casts(n):
    while isinstance(n, Node) and n.op == "call_function" and n.target in _CASTS:
        n = n.args[0]
    return n


def _is_param_vector(gm: GraphModule, n: Node, channels) -> bool:
    try:
        p = param_of(gm, n)
    except AttributeError:
        return False
    return isinstance(p, torch.Tensor) and p.dim() == 1 and p.is_floating_point() and p.shape[0] == channels


def _has_ancestor(n, target, depth: int) -> bool:
    frontier = [n] if isinstance(n, Node) else []
    for _ in range(depth):
        nxt = []
        for m in frontier:
            if m.op == "call_function" and m.target is target:
                return True
            nxt += m.all_input_nodes
        frontier = nxt
    return False


def _op_name(n: Node) -> str:
    if n.op == "output":
        return "the graph output"
    t = n.target
    name = getattr(t, "__name__", str(t))
    if hasattr(t, "_schema"):
        name = t._schema.name.split("::")[-1]
    return name


def _concrete(v):
    """Sym ints (and nodes holding them) -> their example values, recursively through lists."""
    if isinstance(v, Node):
        return _concrete(v.meta.get("val"))
    if isinstance(v, torch.SymInt):
        hint = v.node.hint
        return int(hint) if hint is not None else 2
    if isinstance(v, (list, tuple)):
        return type(v)(_concrete(x) for x in v)
    return v


def _concrete_shape(val: torch.Tensor) -> list[int]:
    return [_concrete(d) for d in val.shape]


# ------------------------------------------------------------------------------------- applying scales


def scale_param_(gm: GraphModule, node: Node, scale: torch.Tensor, axis: int) -> None:
    """Multiply the stored tensor of get_attr `node` by `scale` along `axis`, in place."""
    p = param_of(gm, node)
    shape = [1] * p.dim()
    shape[axis] = -1
    with torch.no_grad():
        p.mul_(scale.to(device=p.device, dtype=torch.float64).view(shape).to(p.dtype))


def fold_scales(gm: GraphModule, group: FoldGroup, s: torch.Tensor) -> None:
    """Fold ``1 / s`` into the producer and ``s`` into every consumer's input columns (``s`` is per
    producer channel, positive; channels no consumer reads must hold 1). The group's outputs are unchanged
    up to float rounding."""
    s = s.detach().double()
    for p, axis in group.producer.params:
        scale_param_(gm, p, 1.0 / s, axis)
    for c in group.consumers:
        scale_param_(gm, c.site.weight, s[c.channel_map], c.site.in_axis)


def to_channels(group: FoldGroup, per_input: list[torch.Tensor]) -> torch.Tensor:
    """Per-input-column statistics of each consumer ([in_features] each, non-negative) -> the max per
    producer channel (0 where no consumer reads a channel)."""
    out = torch.zeros(group.producer.channels, dtype=torch.float64)
    for c, v in zip(group.consumers, per_input):
        out.scatter_reduce_(0, c.channel_map, v.double(), reduce="amax")
    return out


def weight_absmax(gm: GraphModule, site: LinearSite) -> torch.Tensor:
    """max |W| over output channels, per input column ([in_features]) of the stored parameter."""
    w = param_of(gm, site.weight).detach().abs()
    return w.amax(dim=site.out_axis).double()


def canonical_weight(gm: GraphModule, site: LinearSite) -> torch.Tensor:
    """The weight as [out, in] whatever its stored layout (a view)."""
    w = param_of(gm, site.weight).detach()
    return w if site.in_axis == 1 else w.t()


__all__ = ["Producer", "Consumer", "FoldGroup", "FoldingAnalysis", "analyze", "producer_at", "fold_scales",
           "scale_param_", "to_channels", "weight_absmax", "canonical_weight"]
