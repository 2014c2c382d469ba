"""The residual stream as a rotatable unit (QuaRot, SliceGPT): who writes it, who reads it, what normalises it.

``residual_stream_rotation(gm)`` follows the hidden state forward from the input embedding (the embedding that
reads the graph's token ids) and classifies every node it reaches, with no per-architecture table. A *stream*
value ``h`` is what becomes ``h Q`` once the model is rotated; the walk keeps it a stream value through

  * layout ops that keep the channel axis whole and last (checked on a channel-id tensor: reshapes of the token
    axes, slices of tokens, casts, dropout, clone, alias),
  * residual adds ``h + y``, where ``y`` is a *writer* (a linear's output, an embedding lookup such as OPT's and
    GPT-2's positions, or a sum of those: GPT-NeoX's parallel ``attn + mlp``), looking through casts, dropout and
    channel-keeping layout ops, each used only on that path,
  * the parts of a norm: ``pow(h, 2)`` reduced by ``mean``/``sum`` over channels is rotation-invariant (a
    per-token value, like anything computed from it alone, e.g. ``rsqrt(mean + eps)``); ``h * r`` with ``r``
    per-token is a stream value; ``g * h`` with ``g`` a per-channel parameter (an RMSNorm's weight) and
    ``h + b`` with ``b`` a per-channel parameter (its bias) are recorded as *norm weights* that must be folded
    into the readers first (they do not commute with Q); ``layer_norm(h)`` is recorded too: it also subtracts
    the per-token mean, which commutes with Q only when Q fixes the all-ones vector (``Q 1 = 1``),
  * *readers*: linears whose input is a stream value (q/k/v, gate/up, fc1, a fused qkv, lm_head).

Anything else that reaches a stream value (an activation, attention, a constant added to every channel, the
graph output) makes the stream unrotatable, and the reason names the node. Readers get ``W <- W Q``, writers
``W <- Qᵀ W`` (bias ``b <- Qᵀ b``) and embedding tables ``E <- E Q``; passes/rotate.py does that.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from . import patterns as P
from .folding import _concrete, _concrete_shape
from .graph import LinearSite, is_quantizer, linear_sites, module_path, param_of
from .quantizer import Quantizer, role_of

aten = torch.ops.aten

_PASS = P.CASTS | frozenset({aten.dropout.default, aten.to.device, aten.type_as.default, aten.clone.default,
                             aten.contiguous.default, aten.alias.default, aten.detach.default})
_RESHAPES = {aten.view.default, aten._unsafe_view.default}
_REDUCE = {aten.mean.dim, aten.sum.dim_IntList}
_SCALAR_OPS = {aten.mul.Scalar, aten.div.Scalar, aten.neg.default}


@dataclass
class Stream:
    """The residual stream of a graph: its width and the nodes and parameters a rotation changes."""

    start: Node
    dim: int
    readers: list[LinearSite] = field(default_factory=list)
    writers: list[LinearSite] = field(default_factory=list)
    tables: list[Node] = field(default_factory=list)           # aten.embedding nodes writing into the stream
    norm_weights: list[Node] = field(default_factory=list)     # mul(g, h) / add(h, b) / layer_norm with params
    layer_norms: list[Node] = field(default_factory=list)      # layer_norm nodes (mean subtraction)

    def lines(self) -> list[str]:
        return [f"width {self.dim}: {len(self.readers)} readers, {len(self.writers)} writers, "
                f"{len(self.tables)} embedding tables, {len(self.norm_weights)} norm weights, "
                f"{len(self.layer_norms)} layer norms"]


class _Blocked(Exception):
    pass


def residual_stream_rotation(gm: GraphModule, *, through_quantizers: bool = False) -> Stream | str:
    """The graph's residual stream (see the module doc), or the reason it cannot be rotated.

    ``through_quantizers``: an activation quantizer on a stream value (the input quantizer of a reader, inserted by
    ``quantize``) is followed as if it were the value itself, so the stream of an already quantized graph is found
    (passes/spinquant.py learns the rotation there, with the quantizers live). It does not commute with a rotation:
    the quantized graph is rotatable only by changing what it quantizes, which is the point of learning it."""
    try:
        return _Walk(gm, through_quantizers).run()
    except _Blocked as e:
        return str(e)


class _Walk:
    def __init__(self, gm: GraphModule, through_quantizers: bool = False):
        self.gm = gm
        self.through_quantizers = through_quantizers
        self.sites = {s.node: s for s in linear_sites(gm)}
        self.pos = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.state: dict[Node, str] = {}          # "R" stream value, "SQ" its square, "I" rotation-invariant
        self.heap: list = []
        self.seen: set[Node] = set()

    def run(self) -> Stream:
        nodes = list(self.gm.graph.nodes)
        start = next((n for n in nodes if P.is_call(n, aten.embedding.default) and _from_input(n.args[1])), None)
        if start is None:
            raise _Blocked("no input embedding (an aten.embedding reading the graph's token ids) starts a "
                           "residual stream")
        table = start.args[0]
        if not (isinstance(table, Node) and table.op == "get_attr"):
            raise _Blocked(f"the input embedding {start.name} does not read a parameter table")
        self.stream = Stream(start, int(param_of(self.gm, table).shape[-1]), tables=[start])
        self._mark(start, "R")
        while self.heap:
            _, _, n = heapq.heappop(self.heap)
            self._visit(n)
        if not self.stream.readers:
            raise _Blocked("the residual stream reaches no linear")
        return self.stream

    def _mark(self, n: Node, st: str) -> None:
        self.state[n] = st
        for u in n.users:
            if u not in self.seen:
                self.seen.add(u)
                heapq.heappush(self.heap, (self.pos[u], id(u), u))

    def _where(self, n: Node) -> str:
        path = module_path(self.gm, n)
        return f"{_op(n)} ({n.name}{', ' + path if path else ''})"

    def _block(self, n: Node, why: str):
        raise _Blocked(f"the residual stream reaches {self._where(n)}, {why}")

    def _visit(self, n: Node) -> None:
        ins = [a for a in n.all_input_nodes if a in self.state]
        states = {self.state[a] for a in ins}
        if n.op == "output":
            if states - {"I"}:
                raise _Blocked("the residual stream reaches the graph output (hidden states are returned): "
                               "the rotated model would return rotated hidden states")
            return
        if n.op != "call_function" or n.target in P.SHAPE_ONLY:
            return
        if states == {"I"}:
            self._mark(n, "I")
            return
        site = self.sites.get(n)
        if site is not None:
            if self.state.get(site.input) == "R" and len(ins) == 1:
                self.stream.readers.append(site)
                return
            self._block(n, "as a weight or bias of a linear, not its input")
        if states == {"SQ"}:
            if n.target in _REDUCE and len(ins) == 1 and _over_last(n):
                self._mark(n, "I")
                return
            self._block(n, "which uses the squared stream other than as a sum over channels")
        if "SQ" in states:
            self._block(n, "which mixes the squared stream with other values")
        self._visit_stream(n, ins)

    def _visit_stream(self, n: Node, ins: list[Node]) -> None:
        t = n.target
        rs = [a for a in ins if self.state[a] == "R"]
        x = rs[0]
        others = [a for a in n.args[:2] if a is not x]
        (o,) = others if len(others) == 1 else (None,)
        if (t in _PASS or t in _SCALAR_OPS) and len(ins) == 1 and n.args[0] is x:
            return self._mark(n, "R")
        if self.through_quantizers and is_quantizer(n) and len(ins) == 1 and role_of(n) == "input" and \
                Quantizer(n).x is x:
            return self._mark(n, "R")
        if t in P.LAYOUT:
            if len(ins) == 1 and n.args[0] is x and _keeps_channels(n, self.stream.dim):
                return self._mark(n, "R")
            self._block(n, "which does not keep the channel axis whole and last")
        if t is aten.pow.Tensor_Scalar and n.args[1] == 2:
            return self._mark(n, "SQ")
        if t is aten.mul.Tensor and len(n.args) == 2 and n.args[0] is n.args[1]:
            return self._mark(n, "SQ")
        if t in (aten.mul.Tensor, aten.div.Tensor) and len(rs) == 1 and (t is aten.mul.Tensor or n.args[0] is x):
            if _per_token(o, self.state):
                return self._mark(n, "R")
            if t is aten.mul.Tensor and len(ins) == 1 and self._channel_param(o):
                self.stream.norm_weights.append(n)
                return self._mark(n, "R")
        if t is aten.add.Tensor and len(n.args) == 2 and not n.kwargs and "I" not in {self.state[a] for a in ins}:
            if len(rs) == 2:
                return self._mark(n, "R")
            if isinstance(o, Node) and self._channel_param(o):
                self.stream.norm_weights.append(n)
                return self._mark(n, "R")
            if isinstance(o, Node):
                self._writers(o, n)
                return self._mark(n, "R")
            self._block(n, "which adds a constant to every channel")
        if t is aten.layer_norm.default and n.args[0] is x and len(ins) == 1:
            shape = n.args[1]
            if len(shape) != 1 or int(_concrete(shape[0])) != self.stream.dim:
                self._block(n, "a layer_norm over more than the channel axis")
            self.stream.layer_norms.append(n)
            if any(isinstance(a, Node) for a in n.args[2:4]) or n.kwargs.get("weight") is not None:
                self.stream.norm_weights.append(n)
            return self._mark(n, "R")
        self._block(n, "which does not commute with a rotation of the channels")

    def _channel_param(self, o) -> bool:
        """`o` is (a cast of) a 1-D floating parameter with one value per stream channel."""
        while P.is_call(o, P.CASTS):
            o = o.args[0]
        if not (isinstance(o, Node) and o.op == "get_attr"):
            return False
        p = param_of(self.gm, o)
        return p.dim() == 1 and p.is_floating_point() and p.shape[0] == self.stream.dim

    def _writers(self, o: Node, add: Node) -> None:
        """Record the writers whose sum is `o` (added to the stream at `add`), or block."""
        cur = o
        while True:
            users = [u for u in cur.users if not P.is_call(u, P.SHAPE_ONLY)]
            if len(users) != 1:
                self._block(add, f"whose operand {cur.name} is also used elsewhere ({len(users)} users)")
            if P.is_call(cur, _PASS) or P.is_call(cur, _SCALAR_OPS) or (
                    P.is_call(cur, P.LAYOUT) and _keeps_channels(cur, self.stream.dim)):
                cur = cur.args[0]
                continue
            break
        site = self.sites.get(cur)
        if site is not None:
            if _width(cur) != self.stream.dim:
                self._block(add, f"whose operand comes from {site.path} with {_width(cur)} outputs")
            self.stream.writers.append(site)
            return
        if P.is_call(cur, aten.embedding.default) and isinstance(cur.args[0], Node) and cur.args[0].op == "get_attr":
            self.stream.tables.append(cur)
            return
        if P.is_call(cur, aten.add.Tensor) and len(cur.args) == 2 and all(isinstance(a, Node) for a in cur.args):
            for a in cur.args:
                self._writers(a, add)
            return
        self._block(add, f"whose other operand comes from {self._where(cur)}, which is neither a linear nor an "
                         "embedding")


def _op(n: Node) -> str:
    t = n.target
    return t._schema.name.split("::")[-1] if hasattr(t, "_schema") else getattr(t, "__name__", str(t))


def _width(n: Node) -> int:
    v = n.meta.get("val")
    return int(_concrete(v.shape[-1])) if isinstance(v, torch.Tensor) and v.dim() else -1


def _from_input(n) -> bool:
    while P.is_call(n, P.LAYOUT):
        n = n.args[0]
    return isinstance(n, Node) and n.op == "placeholder"


def _over_last(n: Node) -> bool:
    dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    v = n.args[0].meta.get("val")
    if not isinstance(v, torch.Tensor) or dims is None:
        return False
    dims = [dims] if isinstance(dims, int) else list(dims)
    return len(dims) == 1 and dims[0] % v.dim() == v.dim() - 1


def _per_token(o, state: dict) -> bool:
    """A number, or a tensor with one value per token (last axis of size 1) that is not a stream value."""
    if isinstance(o, (int, float)):
        return True
    if not isinstance(o, Node) or state.get(o) in ("R", "SQ"):
        return False
    v = o.meta.get("val")
    return isinstance(v, torch.Tensor) and (v.dim() == 0 or _concrete(v.shape[-1]) == 1)


def _keeps_channels(n: Node, dim: int) -> bool:
    """Whether layout op `n` keeps every channel vector whole and on the last axis (on a channel-id tensor)."""
    src = n.args[0]
    v = src.meta.get("val") if isinstance(src, Node) else None
    if not isinstance(v, torch.Tensor) or v.dim() == 0 or _concrete(v.shape[-1]) != dim:
        return False
    ids = torch.arange(dim, dtype=torch.float64).expand(_concrete_shape(v)).clone()
    fn = aten.reshape.default if n.target in _RESHAPES else n.target
    try:
        out = fn(ids, *[_concrete(a) for a in n.args[1:]], **{k: _concrete(a) for k, a in n.kwargs.items()})
    except (RuntimeError, IndexError, TypeError, ValueError):
        return False
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    ref = torch.arange(dim, dtype=torch.float64)
    return all(isinstance(o, torch.Tensor) and o.dim() > 0 and o.shape[-1] == dim and bool((o == ref).all())
               for o in outs)


# ------------------------------------------------------------------------- online Hadamards on heads

_CACHE_WRITES = {aten.index_copy_.default, aten.index_copy.default}


def hadamard_node(gm: GraphModule, before: Node, x: Node, factor: torch.Tensor, near: Node | None = None,
                  signs: torch.Tensor | None = None) -> Node:
    """Insert ``qpass.hadamard(x, factor[, signs])`` before `before` (factor and signs buffers beside `near`'s
    tensor, else on the root module) and return it; its users are up to the caller."""
    from .folding import _attr, _new_param_target
    from .graph import add_tensor
    from .primitives.hadamard import HADAMARD

    value = factor.detach().float().contiguous()
    target = (_new_param_target(gm, near, "hadamard", value, buffer=True) if near is not None
              else add_tensor(gm, "rotate_hadamard", value))
    args = (x,)
    for t in (target,) + ((_new_param_target(gm, near, "hadamard_signs", signs.detach().float().contiguous(),
                                             buffer=True),) if signs is not None else ()):
        with gm.graph.inserting_before(before):
            f = gm.graph.get_attr(t)
        f.meta["val"] = _attr(gm, t)
        args += (f,)
    with gm.graph.inserting_before(before):
        h = gm.graph.call_function(HADAMARD, args)
    for key in ("nn_module_stack", "stack_trace", "val"):
        src = x.meta if key == "val" else before.meta
        if key in src:
            h.meta[key] = src[key]
    h.meta["qpass_origin"] = "rotate"
    return h


def _head_sites(gm: GraphModule) -> list[tuple[P.AttentionSite, str, int]]:
    sites = P.attention_sites(gm)
    keys = [module_path(gm, s.node) or s.node.name for s in sites]
    from .plan import occurrences

    return list(zip(sites, keys, occurrences(keys)))


def head_keys(gm: GraphModule, near: list[str]) -> list[tuple[str, int]]:
    """(module path, occurrence) of every attention whose Q and K can take an online Hadamard (others: `near`)."""
    out = []
    for site, key, at in _head_sites(gm):
        why = _key_point(site)
        if isinstance(why, str):
            near.append(f"{key}: no online Hadamard on Q/K ({why})")
        else:
            out.append((key, at))
    return out


def _key_point(site) -> tuple[Node, Node] | str:
    """(K tensor to rotate, the node that reads it on the way to attention), walking back through repeat_kv."""
    t, user = site.key, site.score_consumer if site.kind == "sdpa" else next(
        u for u in site.key.users if P.is_last_two_swap(u))
    while P.is_call(t, P.REPEAT_KV) and _rank(t.args[0]) >= 4:
        t, user = t.args[0], t
    if P.is_call(t, _CACHE_WRITES):
        return t.args[3], t
    if P.is_call(t, aten.cat.default):                       # dynamic cache: cat([past input, new])
        parts = t.args[0]
        new = [a for a in parts if not (isinstance(a, Node) and a.op == "placeholder")]
        if len(parts) == 2 and len(new) == 1:
            return new[0], t
    if not isinstance(t, Node) or t.op != "call_function" or _rank(t) != 4:
        return "K is not a computed [batch, heads, seq, head_dim] tensor"
    return t, user


def insert_heads(gm: GraphModule, keys: list[tuple]) -> None:
    """Online Hadamards of head_dim on Q (at attention) and on K (after RoPE, before repeat_kv / the cache)."""
    from .plan import PlanError
    from .primitives.hadamard import small_factor

    by_key = {(k, at): site for site, k, at in _head_sites(gm)}
    for key, at in keys:
        site = by_key.get((key, at))
        found = _key_point(site) if site is not None else "this graph has no such attention"
        if isinstance(found, str):
            raise PlanError(f"the rotate plan rotates the heads of attention {key!r} (occurrence {at}), but {found}",
                            fix="apply plans to a capture of the model they were made on")
        k, user = found
        dim = int(_concrete(k.meta["val"].shape[-1]))
        factor, _ = small_factor(dim)
        q, consumer = site.query, site.score_consumer
        hq = hadamard_node(gm, consumer, q, factor)
        consumer.replace_input_with(q, hq)
        hk = hadamard_node(gm, user, k, factor)
        if P.is_call(user, aten.cat.default):
            user.args = ([hk if a is k else a for a in user.args[0]],) + tuple(user.args[1:])
        else:
            user.replace_input_with(k, hk)


def rotate_values(gm: GraphModule, near: list[str], seed: int = 0) -> list[str]:
    """Rotate V per head offline: each linear producer whose channels reach linears only through layout ops and
    attention's value operand (v_proj -> o_proj, the v rows of a fused qkv) gets a block-diagonal ``H D`` of
    head_dim over the channels its consumers read (``folding.fold_rotation``; H the normalised Hadamard, D random
    signs per head from `seed`). The signs matter when the consumer (o_proj) also gets an online Hadamard T:
    ``blockdiag(H) T`` would cancel H inside every head (H H = I) and leave o_proj's input mixed across heads only;
    ``blockdiag(H D) T`` mixes within heads too (H D H is dense). The producers rotated."""
    from . import folding
    from .primitives.hadamard import small_factor, transform_matrix

    sites = P.attention_sites(gm)
    if not sites:
        return []
    dim = int(_concrete(sites[0].value.meta["val"].shape[-1]))
    t = transform_matrix(dim, small_factor(dim)[0])
    done = []
    for g in folding.analyze(gm).groups:
        if g.producer.kind != "linear" or folding.rotation_reason(g) is not None:
            continue
        idx = torch.nonzero(g.consumed).flatten()
        if idx.numel() % dim:
            near.append(f"{g.name}: values not rotated ({idx.numel()} channels read, not a multiple of {dim})")
            continue
        q = torch.eye(g.producer.channels, dtype=torch.float64)
        gen = torch.Generator().manual_seed(int(seed) + len(done))
        for b in idx.view(-1, dim):
            signs = torch.randint(0, 2, (dim,), generator=gen, dtype=torch.float64) * 2 - 1
            q[b.view(-1, 1), b.view(1, -1)] = t * signs.view(1, dim)
        why = folding.rotation_reason(g, q)
        if why:
            near.append(f"{g.name}: values not rotated ({why})")
            continue
        folding.fold_rotation(gm, g, q)
        done.append(g.name)
    return done


def _rank(n) -> int:
    v = n.meta.get("val") if isinstance(n, Node) else None
    return v.dim() if isinstance(v, torch.Tensor) else -1


__all__ = ["Stream", "residual_stream_rotation", "hadamard_node", "head_keys", "insert_heads", "rotate_values"]
