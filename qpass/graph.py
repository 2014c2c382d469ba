"""FX helpers shared by passes and backends: module paths, linear-like sites, node insertion.

Linear-like nodes are found structurally, never by module type:
  * ``aten.linear(x, W[, b])``                     W: [out, in]
  * ``aten.addmm(b, x, W')`` / ``aten.mm(x, W')``  (GPT-2 Conv1D: W' = W itself, stored [in, out])
  * ``aten.matmul(x, W')``                         (Falcon, Gemma2 heads)
where W' is a parameter reached from a ``get_attr`` directly or through ``t``/``transpose``/``permute``/
``numpy_T``. Each site knows which axis of the *stored parameter* is the input (contracted) axis, so a
quantizer can be laid out on the parameter as it is stored.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.fx import GraphModule, Node

from .errors import QuantizationError, TargetNotFoundError
from .patterns import TRANSPOSES
from .primitives import ops as qops

aten = torch.ops.aten

META_PREFIX = "qpass_prefix"      # gm.meta: wrapper prefix stripped from module paths
META_CAPTURE = "qpass_capture"    # gm.meta: how the graph was captured
META_ORIGIN = "qpass_origin"      # node.meta: which pass inserted the node
ADAPTER_ORIGINS = ("lora", "lorc")   # origins of low-rank branches beside a linear (not linear sites themselves)
META_QUANT = "qpass_quant"        # node.meta: what a quantizer node quantizes (qpass.quantizer.QuantMeta)

_TRANSPOSES = TRANSPOSES
QUANTIZERS = {qops.fake_quantize, qops.fake_quantize_dynamic, qops.fake_quantize_ext}   # see qpass.quantizer


def is_quantizer(n) -> bool:
    return isinstance(n, Node) and n.op == "call_function" and n.target in QUANTIZERS


@dataclass(frozen=True)
class LinearSite:
    """One linear-like node. `weight` is the get_attr node of the stored parameter; `in_axis` is the
    parameter's input (contracted) axis and `out_axis` its output axis."""

    node: Node
    weight: Node
    weight_use: Node          # the node that feeds the matmul (== weight, or a transpose of it)
    input: Node
    bias: Node | None
    in_axis: int
    path: str

    @property
    def out_axis(self) -> int:
        return 1 - self.in_axis

    @property
    def use_in_axis(self) -> int:
        """Input axis of the weight *as consumed*: linear takes [out, in], the mm family [in, out]."""
        return 1 if self.node.target is aten.linear.default else 0


def module_path(gm: GraphModule, node: Node) -> str:
    """Qualified name of the innermost module a node came from (``model.layers.0.mlp.down_proj``)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    name = list(stack.values())[-1][0]
    prefix = gm.meta.get(META_PREFIX, "")
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


def source_line(node: Node) -> str:
    """The innermost model-code frame of the node's stack trace (torch's own frames skipped)."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
    lines = [ln for ln in lines if "/torch/" not in ln] or lines
    return lines[-1] if lines else ""


def describe(gm: GraphModule, node: Node) -> str:
    """'node linear_3 (model.layers.0.mlp.down_proj; File "modeling_llama.py", line 212)' for messages."""
    bits = [p for p in (module_path(gm, node), source_line(node)) if p]
    return f"node {node.name}" + (f" ({'; '.join(bits)})" if bits else "")


def param_of(gm: GraphModule, node: Node) -> torch.Tensor:
    return gm.get_parameter(node.target) if _is_param(gm, node.target) else gm.get_buffer(node.target)


def _is_param(gm: GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def _weight_source(gm: GraphModule, n: Node) -> tuple[Node, bool] | None:
    """Follow n back through transposes (and quantizers already inserted) to a get_attr parameter;
    return (get_attr, transposed?)."""
    flips = 0
    while n.op == "call_function" and (n.target in _TRANSPOSES or n.target in QUANTIZERS):
        if n.target in QUANTIZERS:
            n = n.args[0]
            continue
        if n.target is aten.permute.default and list(n.args[1]) not in ([1, 0], [-1, -2]):
            return None
        if n.target is aten.transpose.int and sorted(a % 2 for a in n.args[1:3]) != [0, 1]:
            return None
        flips += 1
        n = n.args[0]
    if n.op != "get_attr" or not _is_param(gm, n.target) or param_of(gm, n).dim() != 2:
        return None
    return n, flips % 2 == 1


def linear_sites(gm: GraphModule) -> list[LinearSite]:
    """Every linear-like node whose weight is a 2-D parameter, in graph order."""
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.meta.get(META_ORIGIN) in ADAPTER_ORIGINS:   # not model linears
            continue
        if node.target is aten.linear.default:
            x, w = node.args[0], node.args[1]
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            src = _weight_source(gm, w)
            in_axis = None if src is None else (0 if src[1] else 1)  # linear contracts W's last axis
        elif node.target in (aten.mm.default, aten.matmul.default, aten.addmm.default):
            if node.target is aten.addmm.default:
                bias, x, w = node.args[0], node.args[1], node.args[2]
            else:
                bias, (x, w) = None, node.args[:2]
            src = _weight_source(gm, w) if isinstance(w, Node) else None
            in_axis = None if src is None else (1 if src[1] else 0)  # mm contracts W''s first axis
        else:
            continue
        if src is None or not isinstance(x, Node):
            continue
        bias = bias if isinstance(bias, Node) and bias.op == "get_attr" else None
        sites.append(LinearSite(node, src[0], w, x, bias, in_axis, module_path(gm, node)))
    return sites


def site_key(site) -> str:
    """How plans and reports name a linear: its module path (a hand-built graph without module paths: the node
    name); a stacked expert weight (experts.ExpertSite): its ``<experts module>.<parameter>`` key."""
    key = getattr(site, "key", None)
    return key if key is not None else (site.path or site.node.name)


def occurrences(keys) -> list[int]:
    """For keys in graph order, the occurrence index of each (0 for the first time a path is seen)."""
    seen: dict[str, int] = {}
    out = []
    for k in keys:
        out.append(seen.get(k, 0))
        seen[k] = out[-1] + 1
    return out


class Chosen(NamedTuple):
    """The linears a pass will quantize: `todo` in graph order, `near` the near-miss lines of the ones its
    targets/ignore left out, `at` each site node's occurrence index (plans name a linear by key and occurrence)."""

    todo: list[LinearSite]
    near: list[str]
    at: dict[Node, int]


def choose_linears(gm: GraphModule, sites: list[LinearSite], include: tuple[str, ...], ignore: tuple[str, ...],
                   who: str, *, inputs: bool = False) -> Chosen:
    """The run preamble of a pass that quantizes linears it finds itself: `select` by targets/ignore (errors on
    globs that match nothing), the near-miss list, and a clear error where an earlier pass already quantized a
    chosen linear's weight (with `inputs`, its input too: the pass quantizes both)."""
    chosen = select([s.path for s in sites], include, ignore, who)
    at = dict(zip((s.node for s in sites), occurrences(site_key(s) for s in sites)))
    todo = [s for s in sites if s.path in chosen]
    near = [f"{site_key(s)}: excluded by targets/ignore" for s in sites if s.path not in chosen]
    for s in todo:
        if is_quantizer(s.weight_use) or (inputs and is_quantizer(s.input)):
            what = describe(gm, s.node) if inputs else f"the weight of {describe(gm, s.node)}"
            raise QuantizationError(f"{what} is already quantized by an earlier pass",
                                    fix=f"use {who} instead of that pass for this linear, or ignore it here")
    return Chosen(todo, near, at)


def select(paths: list[str], include: tuple[str, ...], ignore: tuple[str, ...], where: str) -> set[str]:
    """Module paths matched by any `include` glob and no `ignore` glob. A glob that matches nothing is an
    error listing close names (a typo must not silently quantize everything)."""
    uniq = sorted(set(paths))
    for kind, globs in (("targets", include), ("ignore", ignore)):
        for i, pat in enumerate(globs):
            if pat != "*" and not any(_match(p, pat) for p in uniq):
                raise TargetNotFoundError(f"{where}.{kind}[{i}]", pat, uniq)
    return {p for p in uniq if any(_match(p, g) for g in include) and not any(_match(p, g) for g in ignore)}


def _match(path: str, pattern: str) -> bool:
    """fnmatch on the dotted path; a bare name also matches as a path suffix ('lm_head', 'down_proj')."""
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, f"*.{pattern}")


def add_tensor(gm: GraphModule, name: str, value: torch.Tensor, *, trainable: bool = False) -> str:
    """Register `value` on gm as a buffer (or parameter) under a unique dotted-free name; return it."""
    base, i = name.replace(".", "_"), 0
    target = base
    while hasattr(gm, target):
        i += 1
        target = f"{base}_{i}"
    if trainable:
        gm.register_parameter(target, torch.nn.Parameter(value))
    else:
        gm.register_buffer(target, value)
    return target


def insert_call(gm: GraphModule, before: Node, op, args: tuple, origin: str, val_like: Node | None = None,
                **meta) -> Node:
    """Insert ``op(*args)`` before `before`, stamping META_ORIGIN (and meta['val'] copied from
    `val_like` for shape-preserving ops such as fake-quantizers)."""
    with gm.graph.inserting_before(before):
        new = gm.graph.call_function(op, args)
    new.meta[META_ORIGIN] = origin
    for key in ("nn_module_stack", "stack_trace"):
        if key in before.meta:
            new.meta[key] = before.meta[key]
    if val_like is not None and "val" in val_like.meta:
        new.meta["val"] = val_like.meta["val"]
    new.meta.update(meta)
    return new


def get_attr(gm: GraphModule, before: Node, target: str) -> Node:
    with gm.graph.inserting_before(before):
        n = gm.graph.get_attr(target)
    n.meta["val"] = getattr(gm, target)
    return n


def op_counts(gm: GraphModule) -> dict[str, int]:
    """{op name: count} over call_function nodes (for tests and the report)."""
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function":
            key = str(n.target)
            counts[key] = counts.get(key, 0) + 1
    return counts
