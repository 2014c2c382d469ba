"""Stacked MoE expert weights in the torch backend: stored as integer (or fp8) codes with their per-expert scales.

Matches   qpass::fake_quantize(W[E, a, b], scale, zero_point, block, fmt) on a stacked expert parameter
          (qpass.experts; inserted by the quantize pass), built-in formats without side channels
Changes   the quantizer node -> call_module(PackedExpertWeight) returning the dequantized weight; the float W
          and the scale buffers leave the graph. The grouped matmul that consumes the weight is unchanged, so
          the output equals the fake-quant model's bit for bit (dequantize(quantize(W)) == fake_quantize(W)).

Codes are one byte each (int8 / uint8 / float8): a quarter of float32, half of bf16; int4 and below are not
nibble-packed here, and there is no fused grouped int kernel: the weight is dequantized on every call.
Expert input (activation) quantizers are not lowered: the backend refuses them by name.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule

from qpass.experts import expert_sites
from qpass.experts import weight_quantizer as expert_weight_quantizer
from qpass.graph import META_ORIGIN
from qpass.primitives import quant as Q
from qpass.primitives.spec import BUILTIN_KINDS
from qpass.quantizer import Quantizer

ORIGIN = "torch_packed"


class PackedExpertWeight(nn.Module):
    """The codes of a stacked expert weight and their scales; ``forward()`` returns the dequantized weight."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, block,
                 fmt: str, dtype: torch.dtype):
        super().__init__()
        self.block, self.fmt, self.dtype = tuple(int(b) for b in block), fmt, dtype
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)

    def forward(self) -> torch.Tensor:
        return Q.dequantize(self.codes, self.scale, self.zero_point, self.block, self.fmt, out_dtype=self.dtype)

    def extra_repr(self) -> str:
        return f"experts={self.codes.shape[0]}, shape={tuple(self.codes.shape)}, fmt={self.fmt}, block={self.block}"


def _attr(gm: nn.Module, target: str):
    for part in target.split("."):
        gm = getattr(gm, part)
    return gm


def _delete(gm: nn.Module, target: str) -> None:
    *path, leaf = target.split(".")
    parent = gm
    for part in path:
        parent = getattr(parent, part)
    for store in (parent._parameters, parent._buffers):
        store.pop(leaf, None)


def lower_expert_weights(gm: GraphModule, *, empty: bool = False) -> list[str]:
    """Replace every supported expert weight quantizer by a PackedExpertWeight call; returns the modules'
    names. `empty`: structure only (codes left uninitialised; a saved state dict is loaded into them)."""
    names = []
    for site in expert_sites(gm):
        fq = expert_weight_quantizer(site)
        if fq is None or fq.target is not torch.ops.qpass.fake_quantize.default:
            continue
        q = Quantizer(fq)
        if q.fmt.kind not in BUILTIN_KINDS or q.side_channels or q.codebook is not None:
            continue
        w = _attr(gm, site.weight.target)
        scale = _attr(gm, q.scale.target)
        zp = _attr(gm, q.zero_point.target) if q.zero_point is not None else None
        dtype = Q.codes_dtype(q.fmt_name, zp is None)
        if empty:
            codes = torch.empty(w.shape, dtype=dtype)
        else:
            codes = Q.quantize(w.detach(), scale.detach(), None if zp is None else zp.detach(), q.block, q.fmt_name)
        mod = PackedExpertWeight(codes, scale.detach().clone(), None if zp is None else zp.detach().clone(),
                                 q.block, q.fmt_name, w.dtype)
        name = f"{site.weight.target}_packed"
        gm.add_submodule(name, mod)
        with gm.graph.inserting_before(fq):
            new = gm.graph.call_module(name, ())
        new.meta.update({k: fq.meta[k] for k in ("val", "nn_module_stack", "stack_trace") if k in fq.meta})
        new.meta[META_ORIGIN] = ORIGIN
        fq.replace_all_uses_with(new)
        args = [a for a in fq.args if isinstance(a, torch.fx.Node)]
        gm.graph.erase_node(fq)
        for a in args:
            if not a.users and a.op == "get_attr":
                target = a.target
                gm.graph.erase_node(a)
                if not any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
                    _delete(gm, target)
        names.append(name)
    if names:
        gm.graph.lint()
        gm.recompile()
    return names


__all__ = ["PackedExpertWeight", "lower_expert_weights"]
