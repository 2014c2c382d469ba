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

Other function-preserving folds on the same groups (each ``*_reason(group[, value])`` says why not, or None;
each ``fold_*`` raises ValueError with that reason). Each re-runs the channel-id propagation with its own
set of ops that commute with it, plus a head context: at attention's value operand every head mixes tokens
with its own probabilities, so each consumer column is known as (head, producer channel).

  * shifts (OS+, OmniQuant LET), ``fold_shifts(gm, group, z)``: ``x' = x - z`` at the producer (its bias -= z),
    every consumer's bias += ``W z[channel_map]``. Crosses layout ops, casts, eval-mode dropout and attention's
    value operand (probability rows sum to 1, so ``P (v - z) = P v - z``; assumes no fully masked query row,
    true of causal masks); not ReLU, products (``silu(gate) * up``), scalar multiplies or q/k. A producer or
    consumer without a bias gets one: a LayerNorm's bias argument, a bias argument of ``aten.linear``,
    ``mm`` -> ``addmm``, ``matmul`` -> ``linear``, and ``add(weight * normalized, b)`` after an RMSNorm (which
    ``analyze`` then reads as one producer with params g and b, so scales still fold after shifts).
  * permutations (RPTQ), ``fold_permutation(gm, group, perm)``: new channel i = old ``perm[i]``; consumer
    columns reordered per head. Crosses everything scales cross but products with another tensor; at
    attention a channel must stay in its head (grouped-query heads: within head_dim of each kv head). A linear
    producer's rows are reordered; a norm computes each channel from the same input channel, so it gets a
    gather ``index_select(x, -1, perm)`` after it (``analyze`` sees through it).
  * rotations (QuaRot/QuIP-style), ``fold_rotation(gm, group, Q)``: ``x' = x Q`` at a *linear* producer (rows
    ``Qᵀ W``, bias ``Qᵀ b``), consumers ``W[:, head cols] @ Q[head block]``. Q orthogonal, the identity on
    channels no consumer reads, block-diagonal per attention head; the path linear and channel-uniform
    (layout ops, casts, scalar multiplies, attention's value operand). Norm producers are refused: a norm with
    a weight does not commute with Q, and a weightless RMSNorm does (``rms(xQ) = rms(x)``) only if its input,
    the residual stream, is rotated, which is not a fold at one group: ``qpass.rotation`` finds the whole stream
    and the ``rotate`` pass (passes/rotate.py) rotates it.
  * ``fold_norm_weight(gm, group)``: a norm's weight (and bias) moved into its consumers (``W *= g``,
    ``b += W beta``); the norm keeps weight 1 (and bias 0) on the consumed channels.

Folds that add nodes leave ``FoldGroup`` objects of the old graph stale: analyze again before the next fold.
"""
from __future__ import annotations

import heapq
import operator
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from . import patterns as P
from .graph import META_ORIGIN, LinearSite, is_quantizer, linear_sites, module_path, param_of

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
_ORIGIN = "folding"                    # META_ORIGIN of the nodes the general folds insert


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
        if n.target in _LAYOUT or n.target in _IDENTITY or _is_fold_gather(n):
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
    if n.target is aten.add.Tensor and not n.kwargs and len(n.args) == 2:
        return _biased_producer(gm, n, int(channels), path)
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
        if t in _LAYOUT or _is_fold_gather(n):
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
    owners = {prod.node}
    if prod.node.target is aten.add.Tensor:           # add(mul(g, x), b): g is read by the multiply
        owners |= {a for a in prod.node.args if isinstance(a, Node) and a.target is aten.mul.Tensor}
    for p, _ in prod.params:
        allowed.setdefault(p, set()).update(owners)
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


def _biased_producer(gm: GraphModule, n: Node, channels: int, path: str) -> Producer | None:
    """``add(mul(g, x), b)`` with `b` a 1-D parameter (a bias added to an RMSNorm, e.g. by ``fold_shifts``) and
    the multiply used only here: one producer whose params are g and b."""
    for i, a in enumerate(n.args):
        b, other = _through_casts(a), n.args[1 - i]
        if not (isinstance(b, Node) and b.op == "get_attr" and _is_param_vector(gm, b, channels)):
            continue
        if not (isinstance(other, Node) and other.target is aten.mul.Tensor and len(other.users) == 1):
            return None
        inner = producer_at(gm, other)
        if isinstance(inner, Producer) and inner.kind in ("rmsnorm", "channel_scale"):
            return Producer(n, inner.kind, inner.params + ((b, 0),), channels, path)
        return None
    return None


def _is_fold_gather(n) -> bool:
    """A channel gather inserted by ``fold_permutation`` (a layout op: it only moves channels)."""
    return (isinstance(n, Node) and n.op == "call_function" and n.target is aten.index_select.default
            and n.meta.get(META_ORIGIN) == _ORIGIN)


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


# ------------------------------------------------------------ shifts, permutations, rotations, norm weights

# Which ops each fold crosses (on top of layout ops and eval-mode dropout). A shift needs f(x - z) = f(x) - z,
# a rotation f(xQ) = f(x)Q (both: linear maps acting the same on every channel), a permutation only that f
# acts on each element alone (any elementwise op), and a product/quotient only by a scalar (not for shifts).
_MODES = {"shift": "a per-channel shift", "permute": "a channel permutation",
          "rotate": "an orthogonal channel transform"}
_AFFINE = P.CASTS | {aten.to.device, aten.type_as.default}
_UNARY = {"shift": _AFFINE, "rotate": _AFFINE | {aten.neg.default}, "permute": P.SCALE_COMMUTING | P.ACTIVATIONS}


@dataclass(frozen=True)
class _Reach:
    """One consumer as a fold sees it: `ctx` tells its input columns' attention heads apart (0: no head),
    so columns (ctx, channel) are one-to-one with what they read."""

    site: LinearSite
    channel_map: torch.Tensor
    ctx: torch.Tensor


def _flow(gm: GraphModule, prod: Producer, mode: str):
    """Push (channel id, head context) tensors forward from `prod` through the ops that commute with `mode`:
    ([_Reach], [(node, producer channels reaching it, what it is)])."""
    sites = {s.node: s for s in linear_sites(gm)}
    attn = {a.node: a for a in P.attention_sites(gm)}
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    shape = _concrete_shape(prod.node.meta["val"])
    ids = {prod.node: (torch.arange(prod.channels, dtype=torch.float64).expand(shape).clone(),
                       torch.zeros(shape, dtype=torch.float64))}
    reached, blocked, heap, seen = [], [], [], set()

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
        site = sites.get(n)
        if site is not None and site.input in ids and not _reaches(site, ids, exclude_input=True):
            a, c = ids[site.input]
            cmap, ctx = _channel_map(a), _channel_map(c)
            if cmap is None or ctx is None:
                blocked.append((n, _flat_ids(a), f"{site.path or n.name}, whose input mixes channels and tokens"))
            else:
                reached.append(_Reach(site, cmap, ctx))
            continue
        out, stopped = _flow_step(n, ids, mode, attn)
        blocked += [(n, chans, why) for chans, why in stopped]
        if out is not None:
            ids[n] = out
            push_users(n)
    return reached, blocked


def _flow_step(n: Node, ids: dict, mode: str, attn: dict):
    """(n's (ids, ctx) or None, [(producer channels stopped at n, what n is)])."""
    reached = [a for a in n.all_input_nodes if a in ids]
    name = "the graph output" if n.op == "output" else f"{_op_name(n)} ({n.name})"

    def stop(why=name, nodes=reached):
        return [(_flat_ids(ids[a][0]), why) for a in nodes]

    if n.op != "call_function":
        return None, stop()
    t, x = n.target, (n.args[0] if n.args else None)
    single = len(reached) == 1 and x in ids
    try:
        if t in _LAYOUT or _is_fold_gather(n):
            if not single:
                return None, stop()
            a, c = ids[x]
            if t is operator.getitem:
                return (a[n.args[1]], c[n.args[1]]), []
            fn = aten.reshape.default if t in _RESHAPES else t
            rest, kw = tuple(_concrete(v) for v in n.args[1:]), {k: _concrete(v) for k, v in n.kwargs.items()}
            return (fn(a, *rest, **kw), fn(c, *rest, **kw)), []
        if t is aten.dropout.default and single and not P.arg(n, 2, "train", True):
            return ids[x], []
        if t in _UNARY[mode]:
            return (ids[x], []) if single else (None, stop())
        if (t in _MUL or t in _DIV) and mode != "shift":
            mine = [a for a in n.args[:2] if a in ids]
            other = [a for a in n.args[:2] if a not in ids]
            if len(reached) == 1 and len(mine) == 1 and (t in _MUL or n.args[0] in ids) and other and \
                    (not isinstance(other[0], Node) or _numel(other[0]) == 1):
                out = _concrete_shape(n.meta["val"])
                a, c = ids[mine[0]]
                return (a.expand(out), c.expand(out)), []
            return None, stop(f"a product with another tensor ({n.name})")
        site = attn.get(n)
        if site is not None and site.value in ids:
            others = stop(f"the query/key of attention ({n.name})", [a for a in reached if a is not site.value])
            if mode == "shift" and _attention_dropout(site):
                return None, stop(f"attention with dropout ({n.name})")
            a, c = ids[site.value]
            out = _concrete_shape(n.meta["val"])
            if not (bool((a == a[..., :1, :]).all()) and bool((c == c[..., :1, :]).all())):
                return None, stop(f"attention ({n.name}) whose value mixes channels and tokens")
            a, c = a[..., :1, :].expand(out), c[..., :1, :].expand(out)
            if mode != "shift":        # each head mixes tokens with its own weights: a transform stays per head
                if len(out) < 4:
                    return None, stop(f"attention ({n.name}) over [batch * heads] tensors (heads unknown)")
                k = 1
                for d in out[1:-2]:
                    k *= d
                head = torch.arange(1, k + 1, dtype=torch.float64).view([1, *out[1:-2], 1, 1]).expand(out)
                c = c * (k + 1) + head
            return (a, c), others
    except (RuntimeError, IndexError, TypeError, ValueError):
        return None, stop()
    return None, stop()


def _attention_dropout(site: P.AttentionSite) -> bool:
    """Dropout on the probabilities (their rows no longer sum to 1)."""
    if site.kind == "sdpa":
        return float(P.arg(site.node, 4, "dropout_p", 0.0) or 0.0) != 0.0
    n = site.node.args[0]
    while isinstance(n, Node) and n is not site.softmax and P.is_call(n, P.PROBS_PASSTHROUGH):
        if n.target is aten.dropout.default and P.arg(n, 2, "train", True) and P.arg(n, 1, "p", 0.0):
            return True
        n = n.args[0]
    return False


def _numel(n: Node) -> int:
    val = n.meta.get("val")
    return val.numel() if isinstance(val, torch.Tensor) else 1


def _gm(group: FoldGroup) -> GraphModule:
    return group.producer.node.graph.owning_module


def _structure_reason(group: FoldGroup, mode: str) -> tuple[str | None, list[_Reach]]:
    """Why `mode` cannot fold at `group` whatever its values, or (None, the consumers with head contexts)."""
    gm, prod = _gm(group), group.producer
    live = set(gm.graph.nodes)
    if prod.node not in live or any(c.site.node not in live or c.site.weight not in live for c in group.consumers):
        return "the group's nodes are no longer in the graph (analyze again after a fold that adds nodes)", []
    reached, blocked = _flow(gm, prod, mode)
    consumed, word = group.consumed, _MODES[mode]
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    for _, chans, why in sorted(blocked, key=lambda b: pos[b[0]]):
        if chans.numel() and bool(consumed[chans.clamp(0, prod.channels - 1)].any()):
            return f"{group.name}: its output reaches {why}, which does not commute with {word}", []
    mine = {c.site.node for c in group.consumers}
    by_node = {r.site.node: r for r in reached}
    for r in reached:
        if r.site.node not in mine and bool(consumed[r.channel_map].any()):
            return f"{group.name}: its output also reaches {r.site.path or r.site.node.name}, outside the group", []
    out = []
    for c in group.consumers:
        r = by_node.get(c.site.node)
        if r is None or not torch.equal(r.channel_map, c.channel_map):
            return f"{group.name}: {c.site.path or c.site.node.name} is not reached through ops that commute " \
                   f"with {word}", []
        out.append(r)
    if mode == "shift":
        for site in [c.site for c in group.consumers] + ([_site(gm, prod)] if prod.kind == "linear" else []):
            b = P.arg(site.node, 0, "bias") if site.node.target is aten.addmm.default else \
                P.arg(site.node, 2, "bias") if site.node.target is aten.linear.default else None
            if isinstance(b, Node) and site.bias is None:
                return f"{site.path or site.node.name}: its bias is computed ({b.name}), not a parameter", []
            if site.bias is not None and set(P.weight_users(site.bias)) != {site.node}:
                return f"{site.path or site.node.name}: its bias is also used elsewhere (shared)", []
    else:
        for r in out:
            if not _one_to_one(r):
                return (f"{r.site.path or r.site.node.name} reads a producer channel of {group.name} twice in one "
                        "head (its columns are not one-to-one with the channels)"), []
    return None, out


def _site(gm: GraphModule, prod: Producer) -> LinearSite:
    return next(s for s in linear_sites(gm) if s.node is prod.node)


def _one_to_one(r: _Reach) -> bool:
    key = r.ctx * (int(r.channel_map.max()) + 1) + r.channel_map.double()
    return key.unique().numel() == key.numel()


def _heads(r: _Reach):
    """[(columns, producer channels they read)] per head context of a consumer."""
    out = []
    for h in r.ctx.unique():
        cols = (r.ctx == h).nonzero().flatten()
        out.append((cols, r.channel_map[cols]))
    return out


# ------------------------------------------------------------------------------------------- shifts


def shift_reason(group: FoldGroup, z: torch.Tensor | None = None) -> str | None:
    """Why ``fold_shifts`` cannot fold a shift at `group` (None: it can). A shift crosses layout ops, casts,
    eval-mode dropout and the value operand of attention (each row of softmax probabilities sums to 1), not
    ReLU, a product (``silu(gate) * up``), a scalar multiply, or the query/key of attention. With `z`, also
    checks its values: zero on the channels no consumer reads."""
    why, _ = _structure_reason(group, "shift")
    if why is None and z is not None:
        why = _vector_reason(group, z, "z", 0.0)
    return why


def fold_shifts(gm: GraphModule, group: FoldGroup, z: torch.Tensor) -> None:
    """``x' = x - z`` at the producer (its bias -= z: a LayerNorm's or linear's bias, added where there is none,
    e.g. after an RMSNorm's ``weight * normalized``), compensated by every consumer's bias (b += W z[map],
    added where there is none). `z` is per producer channel, zero where no consumer reads. The graph may gain
    nodes (a bias add, get_attr): analyze again before folding at other groups."""
    why = shift_reason(group, z)
    if why:
        raise ValueError(f"cannot fold a shift: {why}")
    z = z.detach().double().cpu()
    if not bool(z.any()):
        return
    deltas = [(c.site, shift_compensation(canonical_weight(gm, c.site), c.channel_map, z)) for c in group.consumers]
    for site, delta in deltas:
        _add_to_bias(gm, site, delta)
    prod = group.producer
    if prod.kind == "linear":
        _add_to_bias(gm, _site(gm, prod), -z)
    elif prod.kind == "layer_norm" or prod.node.target is aten.add.Tensor:
        b = prod.params[-1][0] if len(prod.params) > 1 else None
        if b is None:
            b = _param_node(gm, prod.node, prod.params[0][0], "bias", -z)
            args = list(prod.node.args) + [None] * (4 - len(prod.node.args))
            prod.node.args = tuple(args[:3] + [b] + args[4:])
            prod.node.kwargs = {k: v for k, v in prod.node.kwargs.items() if k != "bias"}
        else:
            _add_(gm, b, -z)
    else:                                   # weight * normalized: add a bias after it
        b = _param_node(gm, prod.node, prod.params[0][0], "bias", -z, after=True)
        with gm.graph.inserting_after(b):
            add = gm.graph.call_function(aten.add.Tensor, (prod.node, b))
        _stamp(add, prod.node)
        prod.node.replace_all_uses_with(add, delete_user_cb=lambda u: u is not add)
    _finish(gm)


def shift_compensation(w: torch.Tensor, channel_map: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``W z[map]`` ([out]): what a consumer's bias gains when its producer's channels lose `z` (`w` [out, in])."""
    return w.double() @ z.double()[channel_map]


# ------------------------------------------------------------------------------------------ permutations


def permutation_reason(group: FoldGroup, perm: torch.Tensor | None = None) -> str | None:
    """Why ``fold_permutation`` cannot reorder the producer channels of `group` (None: it can). A permutation
    crosses layout ops and elementwise ops (ReLU), a product only with a scalar (not ``silu(gate) * up``), and
    attention's value operand only within each head (a grouped-query v -> o group is permuted within head_dim
    of each kv head; `perm` moving a channel to another head is refused). With `perm`, checks it too: a
    permutation of the producer channels that fixes every channel no consumer reads."""
    why, reach = _structure_reason(group, "permute")
    if why is None and perm is not None:
        why = _perm_reason(group, reach, perm)
    return why


def permutation_blocks(group: FoldGroup) -> list[torch.Tensor]:
    """The sets of consumed producer channels a permutation may move among themselves (RPTQ orders channels
    inside each): one set of all consumed channels, or, where a consumer reads them through attention, one per
    head (each head's channels stay in that head). Raises ValueError with ``permutation_reason`` if none can."""
    why, reach = _structure_reason(group, "permute")
    if why:
        raise ValueError(f"cannot fold a permutation: {why}")
    n, consumed = group.producer.channels, group.consumed
    label = torch.zeros(n, dtype=torch.long)            # channels with the same label share every head set
    for r in reach:
        for i, (_, chans) in enumerate(_heads(r)):
            label[chans] = label[chans] * (len(r.ctx.unique()) + 1) + i + 1
    return [(consumed & (label == v)).nonzero().flatten() for v in label[consumed].unique()]


def _perm_reason(group: FoldGroup, reach: list[_Reach], perm: torch.Tensor) -> str | None:
    n = group.producer.channels
    perm = perm.long().cpu()
    if perm.shape != (n,) or not torch.equal(perm.sort().values, torch.arange(n)):
        return f"perm is not a permutation of the {n} producer channels"
    return _blocks_reason(group, reach, ("perm", perm), "perm")


def fold_permutation(gm: GraphModule, group: FoldGroup, perm: torch.Tensor) -> None:
    """Reorder the producer's output channels (new channel i = old channel ``perm[i]``) and every consumer's
    input columns to match. A linear producer's rows (and bias) are reordered in place; any other producer
    (a norm) gets a channel gather ``index_select(x, -1, perm)`` after it, which ``analyze`` sees through
    (a norm's output is computed per channel of its input, so only a gather can reorder it)."""
    why, reach = _structure_reason(group, "permute")
    why = why or _perm_reason(group, reach, perm)
    if why:
        raise ValueError(f"cannot fold a permutation: {why}")
    perm = perm.long().cpu()
    if torch.equal(perm, torch.arange(group.producer.channels)):
        return
    for r in reach:
        w = param_of(gm, r.site.weight)
        with torch.no_grad():
            w.copy_(w.index_select(r.site.in_axis, permute_columns(r.channel_map, r.ctx, perm).to(w.device)))
    prod = group.producer
    if prod.kind == "linear":
        for p, axis in prod.params:
            t = param_of(gm, p)
            with torch.no_grad():
                t.copy_(t.index_select(axis, perm.to(t.device)))
    else:
        target = _new_param_target(gm, prod.params[0][0], "channel_perm", perm.to(param_of(gm, prod.params[0][0])
                                                                                     .device), buffer=True)
        with gm.graph.inserting_after(prod.node):
            idx = gm.graph.get_attr(target)
        idx.meta["val"] = _attr(gm, target)
        with gm.graph.inserting_after(idx):
            sel = gm.graph.call_function(aten.index_select.default, (prod.node, -1, idx))
        _stamp(sel, prod.node)
        prod.node.replace_all_uses_with(sel, delete_user_cb=lambda u: u is not sel)
    _finish(gm)


def permute_columns(channel_map: torch.Tensor, ctx: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Source column of each input column of a consumer once its producer's channels are reordered by `perm`:
    column j, reading channel c in head h, must take the column reading ``perm[c]`` in head h."""
    key = ctx.double() * (int(channel_map.max()) + 1)
    lookup = {(float(k), int(c)): j for j, (k, c) in enumerate(zip(key.tolist(), channel_map.tolist()))}
    return torch.tensor([lookup[(k, int(perm[c]))] for k, c in zip(key.tolist(), channel_map.tolist())],
                        dtype=torch.long)


# ------------------------------------------------------------------------------------------- rotations


def rotation_reason(group: FoldGroup, q: torch.Tensor | None = None) -> str | None:
    """Why ``fold_rotation`` cannot fold an orthogonal ``x' = x Q`` at `group` (None: it can). The producer must
    be a linear (its rows absorb Qᵀ) and the path to the consumers purely linear and the same on every channel:
    layout ops, casts, eval-mode dropout, scalar multiplies, and attention's value operand with Q
    block-diagonal per head. With `q`, checks it too: [channels, channels], orthogonal, the identity on the
    channels no consumer reads and block-diagonal over each consumer's heads."""
    prod = group.producer
    if prod.kind != "linear":
        w = param_of(_gm(group), prod.params[0][0]).detach()
        consumed = group.consumed
        if prod.kind in ("rmsnorm", "channel_scale") and (len(prod.params) > 1 or not bool(
                (w[consumed] == 1).all())):
            return (f"{group.name}: the {prod.kind} still has a per-channel weight (or bias), which does not "
                    "commute with Q; fold_norm_weight first")
        if prod.kind == "rmsnorm":
            return (f"{group.name}: a weightless RMSNorm commutes with Q (rms(xQ) = rms(x)), so Q has to be "
                    "applied to its input, the residual stream every layer reads: not a fold at one group (use "
                    "the rotate pass)")
        if prod.kind == "layer_norm":
            return f"{group.name}: a layer_norm (mean subtraction, per-channel weight) does not commute with Q"
        return f"{group.name}: a {prod.kind} producer computes each channel from the same input channel alone"
    why, reach = _structure_reason(group, "rotate")
    if why is None and q is not None:
        why = _rotation_q_reason(group, reach, q)
    return why


def _rotation_q_reason(group: FoldGroup, reach: list[_Reach], q: torch.Tensor) -> str | None:
    n = group.producer.channels
    if q.shape != (n, n):
        return f"Q must be [{n}, {n}], got {list(q.shape)}"
    q = q.detach().double().cpu()
    if not torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-4):
        return "Q is not orthogonal (Q Qᵀ != I)"
    return _blocks_reason(group, reach, q, "Q")


def fold_rotation(gm: GraphModule, group: FoldGroup, q: torch.Tensor) -> None:
    """``x' = x Q`` at a linear producer (rows: W ← Qᵀ W, b ← Qᵀ b) and ``W ← W Q`` per head block of every
    consumer (layout-aware: Conv1D [in, out] weights too). Q is orthogonal, so outputs are unchanged up to
    float rounding."""
    why = rotation_reason(group, q)
    if why:
        raise ValueError(f"cannot fold a rotation: {why}")
    _, reach = _structure_reason(group, "rotate")
    q = q.detach().double().cpu()
    if torch.equal(q, torch.eye(group.producer.channels, dtype=torch.float64)):
        return
    for r in reach:
        _set_canonical(gm, r.site, rotate_columns(canonical_weight(gm, r.site), r.channel_map, r.ctx, q))
    site = _site(gm, group.producer)
    _set_canonical(gm, site, q.T @ canonical_weight(gm, site).double())
    if site.bias is not None:
        b = param_of(gm, site.bias)
        with torch.no_grad():
            b.copy_((q.T @ b.detach().double().cpu()).to(b))


def rotate_columns(w: torch.Tensor, channel_map: torch.Tensor, ctx: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A consumer's [out, in] weight once its producer's channels become ``x Q``: per head context, the columns
    reading channels C (in column order) become ``W[:, cols] Q[C][:, C]``."""
    out = w.double().clone()
    for cols, chans in _heads(_Reach(None, channel_map, ctx)):
        out[:, cols] = w.double()[:, cols] @ q.double()[chans][:, chans]
    return out


def _blocks_reason(group: FoldGroup, reach: list[_Reach], q, what: str) -> str | None:
    """`q` (a dense Q, or ("perm", perm)) must keep the unread channels in place and each consumer head's
    channels among themselves."""
    n, consumed = group.producer.channels, group.consumed
    if isinstance(q, tuple):
        perm = q[1]
        ident = torch.arange(n)
        if not torch.equal(perm[~consumed], ident[~consumed]):
            return f"{what} moves channels that no consumer reads (they keep their place)"
        for r in reach:
            for _, chans in _heads(r):
                inside = torch.zeros(n, dtype=torch.bool)
                inside[chans] = True
                if not bool(inside[perm[chans]].all()):
                    return (f"{what} moves channels of {r.site.path or r.site.node.name} across attention heads "
                            "(permute within each head)")
        return None
    tol = 1e-6 * max(1.0, float(q.abs().max()))
    if not torch.allclose(q[~consumed][:, ~consumed], torch.eye(int((~consumed).sum()), dtype=q.dtype)) or \
            bool((q[~consumed][:, consumed].abs() > tol).any() or (q[consumed][:, ~consumed].abs() > tol).any()):
        return f"{what} is not the identity on the channels no consumer reads"
    for r in reach:
        for _, chans in _heads(r):
            inside = torch.zeros(n, dtype=torch.bool)
            inside[chans] = True
            rest = consumed & ~inside
            if bool((q[chans][:, rest].abs() > tol).any() or (q[rest][:, chans].abs() > tol).any()):
                return (f"{what} mixes channels of {r.site.path or r.site.node.name} across attention heads "
                        "(use a block-diagonal Q, one block per head)")
    return None


# ------------------------------------------------------------------------------------------ norm weights


def fold_norm_weight(gm: GraphModule, group: FoldGroup) -> None:
    """Move a norm's per-channel weight g (and bias β) into its consumers: ``W[:, j] *= g[map j]``,
    ``b += W β[map]`` (a bias is added where there is none), then g = 1 and β = 0 on the consumed channels.
    Afterwards an RMSNorm is ``x / rms(x)``, which commutes with any orthogonal Q."""
    prod = group.producer
    if prod.kind == "linear":
        raise ValueError(f"cannot fold a norm weight: {group.name} is a linear, not a norm")
    if prod.node not in set(gm.graph.nodes):
        raise ValueError("cannot fold a norm weight: the group's nodes are no longer in the graph")
    consumed = group.consumed
    g = param_of(gm, prod.params[0][0]).detach().double().cpu()
    beta = param_of(gm, prod.params[1][0]).detach().double().cpu() if len(prod.params) > 1 else None
    plan = []
    for c in group.consumers:
        w = canonical_weight(gm, c.site).double()
        delta = shift_compensation(w, c.channel_map, beta) if beta is not None and bool(beta[consumed].any()) \
            else None
        plan.append((c, delta))
    for c, delta in plan:
        if delta is not None:
            _add_to_bias(gm, c.site, delta)
        scale_param_(gm, c.site.weight, g[c.channel_map], c.site.in_axis)
    keep = torch.where(consumed, torch.ones_like(g), g)
    _set_(gm, prod.params[0][0], keep)
    if beta is not None:
        _set_(gm, prod.params[1][0], torch.where(consumed, torch.zeros_like(beta), beta))
    _finish(gm)


def _vector_reason(group: FoldGroup, v: torch.Tensor, what: str, neutral: float) -> str | None:
    n = group.producer.channels
    if v.shape != (n,):
        return f"{what} must have one value per producer channel ({n}), got {list(v.shape)}"
    if not bool(torch.isfinite(v).all()):
        return f"{what} has non-finite values"
    if bool((v.detach().cpu()[~group.consumed] != neutral).any()):
        return f"{what} must be {neutral:g} on the channels no consumer reads"
    return None


# -------------------------------------------------------------------------------------- graph edits


def _attr(gm: GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _new_param_target(gm: GraphModule, near: Node, leaf: str, value: torch.Tensor, buffer: bool = False) -> str:
    """Register `value` next to the tensor of get_attr `near` (same submodule) under a free name; its target."""
    owner_path = near.target.rpartition(".")[0]
    owner = gm.get_submodule(owner_path) if owner_path else gm
    name, i = leaf, 0
    while hasattr(owner, name) and not (name in owner._parameters and owner._parameters[name] is None):
        i += 1
        name = f"{leaf}_{i}"
    if buffer:
        owner.register_buffer(name, value)
    else:
        ref = param_of(gm, near)
        owner.register_parameter(name, torch.nn.Parameter(value, requires_grad=ref.requires_grad))
    return f"{owner_path}.{name}" if owner_path else name


def _param_node(gm: GraphModule, where: Node, near: Node, leaf: str, value: torch.Tensor,
                after: bool = False) -> Node:
    """A new parameter like `near` (dtype, device) holding `value`, read by a get_attr inserted before `where`
    (after it with `after`)."""
    ref = param_of(gm, near)
    target = _new_param_target(gm, near, leaf, value.detach().to(device=ref.device, dtype=ref.dtype).clone())
    with gm.graph.inserting_after(where) if after else gm.graph.inserting_before(where):
        n = gm.graph.get_attr(target)
    n.meta["val"] = _attr(gm, target)
    n.meta[META_ORIGIN] = _ORIGIN
    return n


def _stamp(new: Node, like: Node) -> None:
    for key in ("nn_module_stack", "stack_trace", "val"):
        if key in like.meta:
            new.meta[key] = like.meta[key]
    new.meta[META_ORIGIN] = _ORIGIN


def _add_(gm: GraphModule, node: Node, delta: torch.Tensor) -> None:
    p = param_of(gm, node)
    with torch.no_grad():
        p.copy_((p.detach().double().cpu() + delta.double()).to(p))


def _set_(gm: GraphModule, node: Node, value: torch.Tensor) -> None:
    p = param_of(gm, node)
    with torch.no_grad():
        p.copy_(value.to(p))


def _set_canonical(gm: GraphModule, site: LinearSite, w: torch.Tensor) -> None:
    """Store an [out, in] weight into the site's parameter, whatever its layout."""
    _set_(gm, site.weight, w if site.in_axis == 1 else w.t())


def add_zero_bias(gm: GraphModule, kind: str, target) -> None:
    """Give a bias-free producer a zero bias that later folds (shifts) can write into; the function is unchanged.

    kind "linear": target is a LinearSite (mm/matmul become addmm/linear); "layer_norm": target is a
    layer_norm node without a bias (one is passed in); any other kind (an RMS norm's output): an
    ``add(target, bias)`` node is inserted after it and takes over its users."""
    if kind == "linear":
        out = param_of(gm, target.weight).shape[target.out_axis]
        _add_to_bias(gm, target, torch.zeros(out, dtype=torch.float64))
        return
    g = producer_at(gm, target).params[0][0]
    zeros = torch.zeros(param_of(gm, g).shape[0], dtype=torch.float64)
    if kind == "layer_norm":
        b = _param_node(gm, target, g, "bias", zeros)
        args = list(target.args) + [None] * (4 - len(target.args))
        target.args = tuple(args[:3] + [b] + args[4:])
        target.kwargs = {k: v for k, v in target.kwargs.items() if k != "bias"}
        return
    b = _param_node(gm, target, g, "bias", zeros, after=True)
    with gm.graph.inserting_after(b):
        add = gm.graph.call_function(aten.add.Tensor, (target, b))
    _stamp(add, target)
    target.replace_all_uses_with(add, delete_user_cb=lambda u: u is not add)


def _add_to_bias(gm: GraphModule, site: LinearSite, delta: torch.Tensor) -> None:
    """bias += delta ([out]); a linear without a bias gets one (mm becomes addmm, matmul becomes linear)."""
    if site.bias is not None:
        _add_(gm, site.bias, delta)
        return
    n = site.node
    b = _param_node(gm, n, site.weight, "bias", delta)
    if n.target is aten.linear.default:
        n.args = (n.args[0], n.args[1], b)
        n.kwargs = {k: v for k, v in n.kwargs.items() if k != "bias"}
        return
    if n.target is aten.mm.default:
        new_op, args = aten.addmm.default, (b, n.args[0], n.args[1])
    else:                                            # matmul(x, W'): linear(x, W [out, in], b)
        w = site.weight
        if site.in_axis == 0:                        # stored [in, out]
            with gm.graph.inserting_before(n):
                w = gm.graph.call_function(aten.t.default, (site.weight,))
            _stamp(w, n)
            w.meta["val"] = site.weight.meta.get("val").t() if isinstance(site.weight.meta.get("val"),
                                                                          torch.Tensor) else None
        new_op, args = aten.linear.default, (n.args[0], w, b)
    with gm.graph.inserting_before(n):
        new = gm.graph.call_function(new_op, args)
    _stamp(new, n)
    n.replace_all_uses_with(new)
    gm.graph.erase_node(n)


def _finish(gm: GraphModule) -> None:
    gm.graph.lint()
    gm.recompile()


__all__ = ["Producer", "Consumer", "FoldGroup", "FoldingAnalysis", "analyze", "producer_at", "fold_scales",
           "scale_param_", "to_channels", "weight_absmax", "canonical_weight", "shift_reason", "fold_shifts",
           "shift_compensation", "permutation_reason", "permutation_blocks", "fold_permutation", "permute_columns", "rotation_reason",
           "fold_rotation", "rotate_columns", "fold_norm_weight"]
