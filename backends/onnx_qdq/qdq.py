"""Q/DQ for quantizers that are not part of a lowered linear: K/V caches, activation-only quantizers, inputs of
linears without a fused form. Mixed into ``patterns._Rewriter`` (uses its ``gm``, ``opts``, ``report``,
``call`` and ``buffer``).

    static scales   qdq(x, scale, zp, axis, 0, bits, signed): per tensor (0-d scale) or per axis (1-D); scales
                    over several axes: those axes moved last and flattened into one (Transpose + Reshape);
                    2 to 8 bits (below 8 and not 4: INT8 / UINT8 codes clipped to the format's range)
    dynamic scales  qdq_dynamic(x, block, bits, symmetric): per block of the last axis (per token: the whole
                    axis); blocks over several axes (per token across K/V heads) flattened the same way
    fp8 formats     the same layouts with qdq_fp8 / qdq_fp8_dynamic (float8 Q/DQ; symmetric, no zero point)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from qpass.errors import UnsupportedOpError
from qpass.graph import describe
from qpass.primitives.quant import parse_format
from qpass.quantizer import Quantizer

from . import ops

aten = torch.ops.aten


@dataclass
class Lowered:
    """One row of the lowering report."""

    path: str
    form: str
    note: str = ""


@dataclass
class LoweringReport:
    rows: list[Lowered] = field(default_factory=list)
    grouped_attention: int = 0          # SDPA calls made to read the K/V heads in place (LowerOptions.attention)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.form] = out.get(r.form, 0) + 1
        return out

    def __str__(self) -> str:
        lines = [f"  {n:4d} x {form}" for form, n in sorted(self.counts().items())]
        notes = sorted({r.note for r in self.rows if r.note})
        return "\n".join(lines + [f"  note: {n}" for n in notes])


def fmt_of(n: Node) -> str:
    return Quantizer(n).fmt_name


FP8_FORMATS = {"fp8_e4m3": False, "fp8_e5m2": True}     # format -> e5m2 flag of qdq_fp8 (ONNX FLOAT8E4M3FN / E5M2)


def check_int(gm: GraphModule, n: Node, fp8: bool = False) -> int:
    """The code width of quantizer `n`'s int format; `fp8`: FP8 formats pass too (8). Anything else raises."""
    f = parse_format(fmt_of(n))
    if f.kind != "int" and not (fp8 and f.name in FP8_FORMATS):
        what = "integer, or float8 for activations" if fp8 else "integer"
        raise UnsupportedOpError(
            f"onnx_qdq cannot lower {n.target.name()} with {f.name} codes (ONNX Q/DQ here are {what})",
            where=describe(gm, n),
            fix="use the torch backend (qpass.lower(qm, 'torch')), or an int format for this target "
                "(ignore it in the recipe to keep it in float)")
    return f.bits


def is_fp8(n: Node) -> bool:
    return fmt_of(n) in FP8_FORMATS


class QdqRewrites:
    """Rewrites of standalone quantizers (see the module docstring)."""

    def past_cache(self, fq: Node) -> bool:
        """fq(cat([past, new], seq)) with scales that do not span the sequence -> cat([past, fq(new)]).

        The past cache is a graph input that holds this graph's own quantized output of earlier steps (the
        optimum decoder loop feeds `present` back as `past_key_values`), and re-quantizing a quantized tensor
        gives it back (to a float ulp): so only the new tokens are quantized, not the whole cache every step.
        """
        q = Quantizer(fq)
        cat = q.x
        if not (isinstance(cat, Node) and cat.target is aten.cat.default and len(cat.args) > 1):
            return False
        rank = cat.meta["val"].dim()
        dim = cat.args[1] % rank
        past, new = cat.args[0] if len(cat.args[0]) == 2 else (None, None)
        if past is None or not _graph_input(past) or len(cat.users) != 1:
            return False
        if q.dynamic:
            spans = q.block[dim] != 1
        else:
            spans = getattr(self.gm, q.scale.target).shape[dim] != 1
        if spans:
            return False
        with self.gm.graph.inserting_before(cat):
            fq_new = self.gm.graph.call_function(fq.target, q.args_on(new))
        fq_new.meta = {**fq.meta, "val": new.meta["val"]}
        cat.replace_input_with(new, fq_new)
        fq.replace_all_uses_with(cat)
        self.standalone(fq_new)
        return True

    def standalone(self, fq: Node, before: Node | None = None, user: Node | None = None) -> Node:
        """Replace quantizer `fq` by Q/DQ (for all its users, or only `user`); returns the new node."""
        check_int(self.gm, fq, fp8=Quantizer(fq).role != "weight")
        q = Quantizer(fq)
        if q.side_channels:                   # Q/DQ would drop them: never silently
            raise UnsupportedOpError(f"onnx_qdq cannot lower the side channels {list(q.side_channels.names)} of a "
                                     f"qpass::{q.op} as a standalone Q/DQ", where=describe(self.gm, fq),
                                     fix="use the torch backend (qpass.lower(qm, 'torch'))")
        before = before or fq
        x = q.x
        shape = list(x.meta["val"].shape)
        if q.dynamic:
            new = self._dynamic(before, fq, x, shape)
        else:
            new = self._static(before, fq, x, shape)
        if user is not None:
            user.replace_input_with(fq, new)
        else:
            fq.replace_all_uses_with(new)
            self.report.rows.append(Lowered(f"{q.path or fq.name} ({q.role or '?'})",
                                            f"Q/DQ {q.fmt_name} {'dynamic' if q.dynamic else 'static'}"))
        return new

    def _dynamic(self, before: Node, fq: Node, x: Node, shape: list) -> Node:
        q = Quantizer(fq)
        block, symmetric, bits = q.block, q.symmetric, q.fmt.bits
        rank = len(shape)
        reduced = [d for d in range(rank) if block[d] == -1 and not _is_one(shape[d])]
        grouped = [d for d in range(rank) if block[d] > 1]

        def dyn(y: Node, size: int, like: Node | None = None) -> Node:
            if is_fp8(fq):
                if q.clip_ratio != 1.0:
                    raise UnsupportedOpError(f"onnx_qdq lowers a clipping ratio on dynamic integer scales only, got "
                                             f"{q.fmt_name} with clip_ratio {q.clip_ratio}",
                                             where=describe(self.gm, fq),
                                             fix="use clip_ratio: 1.0 for float8 activations, or an int format")
                return self.call(before, ops.qdq_fp8_dynamic, (y, size, FP8_FORMATS[q.fmt_name]), like=like)
            clip = (q.clip_ratio,) if q.clip_ratio != 1.0 else ()
            return self.call(before, ops.qdq_dynamic, (y, size, bits, symmetric, *clip), like=like)
        if not grouped and len(reduced) == sum(not _is_one(s) for s in shape):   # one scale for the tensor
            return dyn(x, 0, like=x)
        if grouped:
            g = grouped[0]
            if len(grouped) > 1 or reduced or g != rank - 1 or not _known(shape[g]) or shape[g] % block[g]:
                raise _layout_error(self.gm, fq, block, shape)
            return dyn(x, block[g], like=x)
        if not all(_known(shape[d]) for d in reduced):
            raise _layout_error(self.gm, fq, block, shape)
        if reduced == [rank - 1]:                                                # per token
            return dyn(x, shape[-1], like=x)
        size = math.prod(shape[d] for d in reduced)
        return self._around(before, x, reduced, lambda y: dyn(y, size))

    def _static(self, before: Node, fq: Node, x: Node, shape: list) -> Node:
        q = Quantizer(fq)
        scale = getattr(self.gm, q.scale.target).detach().float()
        zp = getattr(self.gm, q.zero_point.target).detach() if q.zero_point is not None else None
        bits = q.fmt.bits
        if any(b > 1 for b in q.block):
            raise _layout_error(self.gm, fq, q.block, shape)
        if is_fp8(fq):
            return self._static_fp8(before, fq, x, shape, scale)
        kept = [d for d in range(len(shape)) if scale.shape[d] > 1]
        signed = zp is None
        if signed and bits == 8 and self.opts.int8_weights == "u8":   # int8 codes as uint8 + 128: exact
            zp, signed = torch.full(scale.shape, 128, dtype=torch.uint8), False
        zp = None if zp is None else zp.to(torch.uint8)
        name = f"{q.path or fq.name}_qdq"
        if not kept:
            s = self.buffer(before, f"{name}_scale", scale.reshape(()))
            z = self.buffer(before, f"{name}_zero_point", None if zp is None else zp.reshape(()))
            return self.call(before, ops.qdq, (x, s, z, 0, 0, bits, signed), like=x)
        flat_scale = scale.permute(*[d for d in range(len(shape)) if d not in kept], *kept).reshape(-1)
        flat_zp = None if zp is None else zp.permute(*[d for d in range(len(shape)) if d not in kept],
                                                     *kept).reshape(-1)
        s = self.buffer(before, f"{name}_scale", flat_scale)
        z = self.buffer(before, f"{name}_zero_point", flat_zp)
        if len(kept) == 1:
            return self.call(before, ops.qdq, (x, s, z, kept[0], 0, bits, signed), like=x)
        return self._around(before, x, kept, lambda y: self.call(before, ops.qdq, (y, s, z, -1, 0, bits, signed)))

    def _static_fp8(self, before: Node, fq: Node, x: Node, shape: list, scale: torch.Tensor) -> Node:
        """Static fp8 scales: float8 QuantizeLinear -> DequantizeLinear, per tensor or per axis."""
        q = Quantizer(fq)
        e5m2 = FP8_FORMATS[q.fmt_name]
        kept = [d for d in range(len(shape)) if scale.shape[d] > 1]
        name = f"{q.path or fq.name}_qdq"
        if not kept:
            s = self.buffer(before, f"{name}_scale", scale.reshape(()))
            return self.call(before, ops.qdq_fp8, (x, s, 0, e5m2), like=x)
        flat = scale.permute(*[d for d in range(len(shape)) if d not in kept], *kept).reshape(-1)
        s = self.buffer(before, f"{name}_scale", flat)
        if len(kept) == 1:
            return self.call(before, ops.qdq_fp8, (x, s, kept[0], e5m2), like=x)
        return self._around(before, x, kept, lambda y: self.call(before, ops.qdq_fp8, (y, s, -1, e5m2)))

    def _around(self, before: Node, x: Node, last: list[int], body) -> Node:
        """Move dims `last` to the end and flatten them into one axis, apply `body`, restore the layout."""
        rank = x.meta["val"].dim()
        perm = [d for d in range(rank) if d not in last] + last
        inv = [perm.index(d) for d in range(rank)]
        size = math.prod(int(x.meta["val"].shape[d]) for d in last)
        t = self.call(before, aten.permute.default, (x, perm))
        lead = [self.call(before, aten.sym_size.int, (x, d)) if not _known(x.meta["val"].shape[d])
                else int(x.meta["val"].shape[d]) for d in perm[: rank - len(last)]]
        full = lead + [int(x.meta["val"].shape[d]) for d in last]
        flat = self.call(before, aten.reshape.default, (t, lead + [size]))
        y = body(flat)
        back = self.call(before, aten.reshape.default, (y, full))
        return self.call(before, aten.permute.default, (back, inv), like=x)


def _graph_input(n: Node) -> bool:
    """A graph input, possibly behind DynamicCache's cat([empty, past]) on construction."""
    if n.op == "placeholder":
        return True
    if n.op == "call_function" and n.target is aten.cat.default:
        parts = n.args[0]
        empty = [p for p in parts if "val" in p.meta and p.meta["val"].numel() == 0]
        return len(parts) - len(empty) == 1 and all(_graph_input(p) for p in parts if p not in empty)
    return False


def _is_one(d) -> bool:
    return isinstance(d, int) and d == 1


def _known(d) -> bool:
    return isinstance(d, int)


def _layout_error(gm: GraphModule, fq: Node, block, shape) -> UnsupportedOpError:
    return UnsupportedOpError(
        f"onnx_qdq cannot express block size {tuple(block)} on a tensor of shape {tuple(str(s) for s in shape)} "
        "as Q/DQ (blocks must span whole static axes, or divide the last axis)",
        where=describe(gm, fq), fix="use the torch backend, or a per-token / per-tensor granularity here")
