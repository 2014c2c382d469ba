"""Mixture-of-experts structure, found from the graph: stacked expert weights and routers.

transformers 5 stores a MoE block's experts as 3-D parameters ``[experts, out, in]`` (or ``[experts, in, out]``)
and applies them with a grouped matmul over tokens sorted by expert (``transformers::grouped_mm_fallback``,
``aten._grouped_mm``), a batched matmul over the experts' gathered weights (``index`` then ``bmm`` /
``matmul``) or a linear on one expert's slice (``select`` / ``index`` then ``linear``). No architecture is
named here: an *expert site* is any 3-D parameter whose first axis is kept (or indexed) through layout ops up to
a contraction whose operand axes are known (below), which tells which parameter axis holds the input features.
Per-expert quantizer blocks are then 1 along the expert axis. A *router* is a linear whose output reaches a
top-k selection through element-wise ops (softmax, casts): it picks experts and is left float by default.

    ExpertSite   node (the contraction), weight (get_attr of the [E, a, b] parameter), weight_use (what the
                 contraction consumes), input, in_axis (1 or 2: the parameter axis of input features), path
                 (module path of the experts module), key (``<path>.<parameter>``, how plans and globs name it)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from .graph import META_PREFIX, is_quantizer, linear_sites, module_path
from .patterns import SOFTMAX

aten = torch.ops.aten

# contraction ops and how they contract their weight operand (argument index, operand axis of input features)
_MATMULS = {aten.bmm.default: (1, -2), aten.matmul.default: (1, -2), aten.mm.default: (1, -2),
            aten.linear.default: (1, -1), aten.baddbmm.default: (2, -2)}
for _name in ("_grouped_mm", "grouped_mm"):
    if hasattr(aten, _name):
        _MATMULS[getattr(aten, _name).default] = (1, -2)
# layout ops a stacked weight passes through on its way to the contraction
_LAYOUT = {aten.transpose.int, aten.permute.default, aten.contiguous.default, aten.to.dtype, aten.alias.default,
           aten.clone.default, aten.index.Tensor, aten.select.int, aten._to_copy.default, aten.to.dtype_layout}
_ELEMENTWISE = {*SOFTMAX, aten.to.dtype, aten._to_copy.default, aten.sigmoid.default,
                aten.float.default if hasattr(aten, "float") else aten.to.dtype, aten.reshape.default,
                aten.view.default, aten.div.Tensor, aten.add.Tensor, aten.log_softmax.int}


def _contraction(target) -> tuple[int, int] | None:
    if target in _MATMULS:
        return _MATMULS[target]
    name = str(getattr(target, "_schema", "") and target._schema.name)
    if "grouped_mm" in name:                      # transformers::grouped_mm_fallback(input, weight[E,in,out], offs)
        return 1, -2
    return None


@dataclass(frozen=True)
class ExpertSite:
    node: Node
    weight: Node
    weight_use: Node
    input: Node
    in_axis: int
    path: str
    key: str
    experts: int


def _axes_through(n: Node, axes: list[int | None]) -> list[int | None] | None:
    """How layout op `n` maps its input's axes (entries: parameter axis or None) to its output's; None when
    the op is not a layout op that keeps the expert axis meaningful."""
    t, a = n.target, n.args
    if t is aten.transpose.int:
        i, j = (d % len(axes) for d in a[1:3])
        out = list(axes)
        out[i], out[j] = out[j], out[i]
        return out
    if t is aten.permute.default:
        return [axes[d % len(axes)] for d in a[1]]
    if t is aten.select.int:
        d = a[1] % len(axes)
        return axes[:d] + axes[d + 1:] if d == 0 else None
    if t is aten.index.Tensor:
        idx = a[1]
        if len(idx) != 1 or idx[0] is None or not isinstance(idx[0], Node):
            return None
        k = idx[0].meta.get("val")
        extra = [None] * (k.dim() - 1) if isinstance(k, torch.Tensor) else []
        return extra + list(axes)                  # indexing the expert axis: gathered experts lead
    if t in _LAYOUT:
        return list(axes)
    return None


def expert_sites(gm: GraphModule) -> list[ExpertSite]:
    """Every contraction whose weight is a stacked 3-D parameter (experts first), in graph order."""
    prefix = gm.meta.get(META_PREFIX, "")
    sites = []
    for w in gm.graph.nodes:
        if w.op != "get_attr":
            continue
        val = w.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() != 3 or not _is_param(gm, w.target):
            continue
        frontier = [(w, [0, 1, 2])]
        while frontier:
            n, axes = frontier.pop()
            for user in n.users:
                if user.op != "call_function":
                    continue
                c = _contraction(user.target)
                if c is not None and len(user.args) > c[0] and user.args[c[0]] is n:
                    in_axis = axes[c[1] % len(axes)]
                    if in_axis in (1, 2):
                        leaf = w.target[len(prefix):] if w.target.startswith(prefix) else w.target
                        sites.append(ExpertSite(user, w, n, user.args[0], in_axis, module_path(gm, user), leaf,
                                                int(val.shape[0])))
                    continue
                if is_quantizer(user) and user.args[0] is n:     # a weight quantizer already inserted
                    frontier.append((user, axes))
                    continue
                nxt = _axes_through(user, axes) if user.args and user.args[0] is n else None
                if nxt is not None and (0 in nxt or user.target is aten.select.int):
                    frontier.append((user, nxt))
    return sites


def weight_quantizer(site: ExpertSite) -> Node | None:
    """The weight quantizer on the stacked parameter of `site` (inserted by quantize), or None."""
    return next((u for u in site.weight.users if is_quantizer(u) and u.args[0] is site.weight), None)


def token_split(site: ExpertSite) -> Node | None:
    """The node holding the per-expert token boundaries of a grouped matmul (its ``offs`` argument: cumulative
    token counts, the input rows sorted by expert), or None for contractions without one (bmm over gathered
    weights)."""
    c = site.node.target
    if c in _MATMULS and "grouped_mm" not in str(c):
        return None
    offs = site.node.args[2] if len(site.node.args) > 2 else site.node.kwargs.get("offs")
    return offs if isinstance(offs, Node) else None


class ExpertHessians:
    """Per-expert input Hessians of one grouped matmul: fed the sorted input rows and the offsets of each
    calibration run (in either order), it splits the rows by expert. ``parts()`` gives the two observers to
    attach (input, offsets); ``accs[e]`` the expert's HessianAccumulator (``tokens`` = rows it received)."""

    def __init__(self, experts: int) -> None:
        from .primitives.gptq import HessianAccumulator

        self.accs = [HessianAccumulator() for _ in range(experts)]
        self._x: torch.Tensor | None = None
        self._offs: torch.Tensor | None = None

    def _flush(self) -> None:
        if self._x is None or self._offs is None:
            return
        start = 0
        for e, end in enumerate(self._offs.tolist()):
            if end > start:
                self.accs[e].update(self._x[start:end])
            start = end
        self._x = self._offs = None

    def parts(self):
        me = self

        class _X:
            def update(self, x):
                me._x = x.detach()
                me._flush()

        class _Offs:
            def update(self, offs):
                me._offs = offs.detach()
                me._flush()

        return _X(), _Offs()


def _is_param(gm: GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def routers(gm: GraphModule) -> list[str]:
    """Module paths of linears whose output reaches a top-k selection through element-wise ops (a MoE router)."""
    out = []
    for s in linear_sites(gm):
        frontier, seen = [s.node], set()
        while frontier:
            n = frontier.pop()
            if n in seen:
                continue
            seen.add(n)
            for u in n.users:
                if u.op == "call_function" and u.target is aten.topk.default:
                    out.append(s.path)
                    frontier = []
                    break
                if u.op == "call_function" and u.target in _ELEMENTWISE:
                    frontier.append(u)
    return out


def weight_block(canonical: tuple[int, int], in_axis: int) -> tuple[int, int, int]:
    """Block of a per-expert weight quantizer on the [E, a, b] parameter from a canonical [out, in] block."""
    return (1, canonical[0], canonical[1]) if in_axis == 2 else (1, canonical[1], canonical[0])


__all__ = ["ExpertSite", "ExpertHessians", "expert_sites", "routers", "token_split", "weight_block",
           "weight_quantizer"]
