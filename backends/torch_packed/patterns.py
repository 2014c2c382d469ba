"""What the torch backend lowers, found in a fake-quantized graph.

QuantLinear   linear-like node (``linear`` / ``addmm`` / ``mm`` / ``matmul``, see ``qpass.graph.linear_sites``)
              whose weight is ``W -> [transposes] -> weight quantizer -> [transposes] -> matmul`` and whose
              input is optionally ``x -> input quantizer -> matmul``.
KvWrite       ``index_copy_(cache, 2, pos, kv_quantizer(k))`` in a static-cache decode graph: the K/V cache
              write the ``kv_cache`` pass quantized (QuantMeta role ``key`` / ``value``).
Every other quantizer is either a K/V quantizer outside a cache write (kept as fake-quant: it is the
no-cache graph's simulation of the stored cache) or something this backend cannot lower
(:func:`unsupported_quantizers` -> UnsupportedOpError naming node, module and a fix).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from qpass.errors import UnsupportedOpError
from qpass.graph import LinearSite, describe, is_quantizer, linear_sites
from qpass.primitives.spec import BUILTIN_KINDS
from qpass.quantizer import Quantizer, Support, quantizers, refuse, unsupported

aten = torch.ops.aten
KV_ROLES = ("key", "value")
_SIDE = frozenset({"outliers", "float_columns", "scale_q"})
# What this backend lowers, per quantizer role ('*': any other role). Weights: every registered format
# (int/fp8/fp4/nf4 packed; any other format or side channel by the generic dequantize-then-matmul route,
# ext.ExtLinear), per tensor, channel or group. Inputs and K/V: the built-in formats; inputs may keep float
# columns (LLM.int8()'s dynamic quantizer with outlier feature dimensions: a fixed set by ExtLinear, the set
# found per call by a threshold in PackedLinear's int8 kernels plus a float matmul), or OliVe's pair format
# (static scales; ExtLinear runs its encode/decode on the input: an emulation, as on the weight).
SUPPORTS = {"weight": Support(kinds=frozenset({"*"}), side=_SIDE),
            "input": Support(kinds=frozenset({*BUILTIN_KINDS, "olive"}),
                             side=frozenset({"float_columns", "threshold_columns"})),
            "*": Support()}


@dataclass(frozen=True)
class QuantLinear:
    site: LinearSite
    weight_fq: Node | None      # None: float weight (only the input is quantized)
    fq_in_axis: int             # input (contracted) axis of the tensor the weight quantizer sees
    pre_fq: tuple[Node, ...]    # transposes between the parameter and the weight quantizer, in order
    chain: tuple[Node, ...]     # every node between the parameter and the matmul
    input_fq: Node | None
    bias: Node | None           # a computed (non-parameter) bias, added after the packed op

    @property
    def x(self) -> Node:
        return Quantizer(self.input_fq).x if self.input_fq is not None else self.site.input


@dataclass(frozen=True)
class KvWrite:
    write: Node                 # index_copy_(cache, 2, pos, fq)
    cache: Node                 # get_attr of the float cache
    fq: Node
    role: str
    path: str


def quant_linears(gm: GraphModule) -> list[QuantLinear]:
    out = []
    for site in linear_sites(gm):
        n, axis, chain, fq, fq_axis = site.weight_use, site.use_in_axis, [], None, None
        while n is not site.weight:
            chain.append(n)
            if is_quantizer(n):
                if fq is not None:
                    raise UnsupportedOpError("the weight is fake-quantized twice", describe(gm, site.node),
                                             fix="quantize each weight once (one quantize/qat pass per target)")
                fq, fq_axis = n, axis
                n = Quantizer(n).x
            else:
                axis = 1 - axis
                n = n.args[0]                    # a transpose's input
        chain.reverse()
        pre = tuple(c for c in chain[: chain.index(fq)]) if fq is not None else ()
        input_fq = site.input if is_quantizer(site.input) else None
        if fq is None and input_fq is None:
            continue
        out.append(QuantLinear(site, fq, fq_axis if fq is not None else site.use_in_axis, pre, tuple(chain),
                               input_fq, _computed_bias(site)))
    return out


def _computed_bias(site: LinearSite) -> Node | None:
    node = site.node
    b = node.args[2] if node.target is aten.linear.default and len(node.args) > 2 else \
        node.args[0] if node.target is aten.addmm.default else None
    return b if isinstance(b, Node) and b is not site.bias else None


def kv_writes(gm: GraphModule) -> list[KvWrite]:
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is not aten.index_copy_.default:
            continue
        cache, dim, _, src = n.args
        q = Quantizer.of(src)
        if q is not None and q.role in KV_ROLES and cache.op == "get_attr" and dim == 2 and cache.meta["val"].dim() == 4:
            out.append(KvWrite(n, cache, src, q.role, q.path))
    return out


def check_supported(gm: GraphModule, fq: Node) -> None:
    """UnsupportedOpError naming the node, module path and part unless SUPPORTS covers quantizer `fq`."""
    q = Quantizer(fq)
    part = unsupported(q, SUPPORTS)
    if part is not None:
        raise refuse(gm, q, "torch_packed", part, fix="quantize this target with a format and side channels "
                     "the torch backend declares (backends.torch_packed.patterns.SUPPORTS), or ignore it")


def unsupported_quantizers(gm: GraphModule, handled: set[Node]) -> None:
    """Raise for the first quantizer that is neither lowered (`handled`) nor a K/V quantizer."""
    for q in quantizers(gm):
        n, role = q.node, q.role
        if n in handled or role in KV_ROLES:
            continue
        users = ", ".join(f"{u.name} ({u.target})" for u in n.users) or "nothing"
        raise UnsupportedOpError(
            f"torch_packed cannot lower qpass::{q.op} (role {role or 'unknown'}) feeding {users}: it packs "
            "quantizers on linear weights and inputs and on K/V cache writes only",
            where=describe(gm, n),
            fix="quantize only linear layers (quantize/qat passes) and the KV cache (kv_cache pass) for the "
                "torch backend, or run the fake-quant model itself (qm(...)) for this recipe")


