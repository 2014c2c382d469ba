"""A frozen, quantized base held as codes while adapters or scales train (QLoRA's storage, PEQA's frozen integers).

With fake quantization the base of a QLoRA or PEQA run costs as much as a float model, twice over: the float weight
the quantizer reads (4 bytes a weight) and, for every linear, the dequantized weight autograd saves for the
backward pass (4 more). `PackedBase` removes both while it is active:

- every frozen weight that only a static weight quantizer reads is replaced by the quantizer's codes
  (``quantize_ext``: int, fp, nf4 or codebook codes; two 4-bit codes a byte) and the quantizer node by a node that
  decodes them (``dequantize_ext`` with the same scale, zero point, table and second-level scales: the same values,
  bit for bit, as the fake-quantized float weight);
- a saved-tensor hook keeps autograd from storing the decoded weight: it saves a reference and decodes again in
  the backward pass (as bitsandbytes' 4-bit linear does).

The scales stay what they are: a trainable scale (PEQA) gets its gradient through the decode, with the integer codes
frozen, which is PEQA's own formulation (W = s · (W_int − z), W_int fixed). On exit the weight parameter is given
the decoded values (the projection of the original weight onto its grid, which the quantizer maps to the same codes)
and the graph is restored: the model computes what it computed during training. The original float weight is not
kept (keeping it is what costs the memory); a later ``lora_merge`` therefore merges into the quantized base, as
QLoRA's merge does.

Skipped, with the reason in `skipped`: a weight that trains, a dynamic quantizer, a weight read by anything else, a
quantizer with float columns (they need the float weight's own values).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule, Node

from ..primitives.formats import codec, dequantize_ext, quantize_ext
from ..quantizer import Quantizer, quantizers

__all__ = ["PackedBase", "pack_nibbles", "unpack_nibbles"]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes a byte (flattened; an odd count gets a zero nibble). Signed codes are stored offset by 8."""
    u = codes.reshape(-1).to(torch.int16)
    if codes.dtype == torch.int8:
        u = u + 8
    if u.numel() % 2:
        u = torch.cat([u, u.new_zeros(1)])
    u = u.to(torch.uint8)
    return u[0::2] | (u[1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The codes `pack_nibbles` stored, in `shape` and `dtype` (int8: signed, uint8: unsigned)."""
    u = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(-1)[: shape.numel()]
    if dtype == torch.int8:
        return (u.to(torch.int16) - 8).to(torch.int8).reshape(shape)
    return u.to(dtype).reshape(shape)


@dataclass
class _Entry:
    node: Node
    target: str                      # the weight parameter
    old_target: object
    old_args: tuple
    old_kwargs: dict
    codes: str                       # buffer holding the (packed) codes
    shape: torch.Size
    codes_dtype: torch.dtype
    nibbles: bool
    dtype: torch.dtype
    block: list
    fmt: str


class PackedBase:
    """Context manager: frozen weight-quantized weights of `gm` held as codes during training (see module doc).

    trainable: the parameters that will train (their weights are left alone). `bytes_before`/`bytes_after`: the
    weights' float bytes and the codes' bytes; `packed`: the weight targets held as codes; `skipped`: target ->
    reason. enabled=False: a no-op (nothing packed)."""

    def __init__(self, gm: GraphModule, trainable: list[nn.Parameter], *, enabled: bool = True):
        self.gm, self.enabled = gm, enabled
        self._trainable = {id(p) for p in trainable}
        self.entries: list[_Entry] = []
        self.skipped: dict[str, str] = {}
        self.bytes_before = self.bytes_after = 0
        self._outputs: dict[int, tuple[weakref.ref, int]] = {}
        self.refs_saved = 0              # decoded weights autograd would have kept, saved as references
        self._hooks = None

    @property
    def packed(self) -> list[str]:
        return [e.target for e in self.entries]

    # ------------------------------------------------------------------------------------------------- enter
    def __enter__(self) -> "PackedBase":
        gm = self.gm
        if not self.enabled:
            return self
        users: dict[str, int] = {}
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                users[n.target] = users.get(n.target, 0) + len(n.users)
        for q in quantizers(gm, role="weight"):
            why = self._reason(q, users)
            target = q.x.target if q.x.op == "get_attr" else str(q.x)
            if why:
                self.skipped[target] = why
                continue
            self._pack(q)
        if self.entries:
            gm.graph.lint()
            gm.recompile()
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack_saved, self._unpack_saved)
            self._hooks.__enter__()
        return self

    def _reason(self, q: Quantizer, users: dict[str, int]) -> str | None:
        if q.dynamic:
            return "its quantizer computes scales at run time"
        if q.x.op != "get_attr":
            return "the quantizer does not read a parameter directly"
        p = self._attr(q.x.target)
        if not isinstance(p, nn.Parameter):
            return "not a parameter"
        if id(p) in self._trainable or p.requires_grad:
            return "it trains"
        if users.get(q.x.target, 0) != 1:
            return "something besides its quantizer reads it"
        if q.side_channels.float_columns is not None:
            return "its quantizer keeps float columns (they need the float weight)"
        return None

    def _attr(self, target: str):
        obj = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def _qargs(self, node: Node) -> dict:
        """The quantizer's tensors and settings, as `quantize_ext`/`dequantize_ext` keywords (nodes as values)."""
        q = Quantizer(node)
        side = q.side_channels
        return {"scale": q.scale, "zero_point": q.zero_point, "block": list(q.block), "fmt": q.fmt_name,
                "codebook": q.codebook,
                "outliers": None if side.outliers is None else (side.outliers.index, side.outliers.value),
                "scale_q": None if side.scale_q is None else (side.scale_q.scale, list(side.scale_q.block),
                                                              side.scale_q.fmt, side.scale_q.zero_point)}

    def _value(self, v):
        if isinstance(v, Node):
            return self._attr(v.target) if v.op == "get_attr" else None
        if isinstance(v, tuple):
            return tuple(self._value(x) for x in v)
        return v

    def _pack(self, q: Quantizer) -> None:
        gm, node = self.gm, q.node
        args = self._qargs(node)
        if any(isinstance(v, Node) and v.op != "get_attr" for v in _flat(args.values())):
            self.skipped[q.x.target] = "its scales are computed in the graph"
            return
        vals = {k: self._value(v) for k, v in args.items()}
        p = self._attr(q.x.target)
        with torch.no_grad():
            codes = quantize_ext(p.detach(), vals["scale"], vals["zero_point"], vals["block"], vals["fmt"],
                                 codebook=vals["codebook"], scale_q=vals["scale_q"])
        nibbles = codec(vals["fmt"]).bits <= 4 and codes.dtype in (torch.int8, torch.uint8)
        stored = pack_nibbles(codes) if nibbles else codes
        name = f"_qpass_packed_{len(self.entries)}"
        gm.register_buffer(name, stored, persistent=False)
        e = _Entry(node, q.x.target, node.target, node.args, dict(node.kwargs), name, codes.shape, codes.dtype,
                   nibbles, p.dtype, list(vals["block"]), vals["fmt"])
        self.bytes_before += p.numel() * p.element_size()
        self.bytes_after += stored.numel() * stored.element_size()
        with gm.graph.inserting_before(node):
            codes_node = gm.graph.get_attr(name)
        node.target = self._decode_fn(len(self.entries))
        node.args = (codes_node, args["scale"], args["zero_point"], args["codebook"], args["outliers"],
                     args["scale_q"])
        node.kwargs = {}
        x_node = e.old_args[0]
        self.entries.append(e)
        # the float weight goes: nothing else holds it (the graph module owns its parameters)
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        x_node.meta.setdefault("qpass_packed", True)

    def _decode_fn(self, i: int):
        packed_base = self

        def qpass_decode_packed(codes, scale, zero_point, codebook, outliers, scale_q):
            return packed_base._decode(i, codes, scale, zero_point, codebook, outliers, scale_q)

        return qpass_decode_packed

    def _decode(self, i: int, codes, scale, zero_point, codebook, outliers, scale_q, *, record: bool = True):
        e = self.entries[i]
        c = unpack_nibbles(codes, e.shape, e.codes_dtype) if e.nibbles else codes
        out = dequantize_ext(c, scale, zero_point, e.block, e.fmt, e.dtype, codebook=codebook,
                             outliers=outliers, scale_q=scale_q)
        if record and not out.requires_grad:      # a trainable scale: autograd needs its own saved tensors
            self._outputs[out.untyped_storage().data_ptr()] = (weakref.ref(out), i)
        return out

    # ------------------------------------------------------------------------------- autograd's saved tensors
    def _pack_saved(self, t: torch.Tensor):
        hit = self._outputs.get(t.untyped_storage().data_ptr()) if t.layout == torch.strided else None
        if hit is not None:
            ref, i = hit
            out = ref()
            if out is not None and out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
                self.refs_saved += 1
                return ("qpass_packed", i, t.size(), t.stride(), t.storage_offset())
        return t

    def _unpack_saved(self, packed):
        if isinstance(packed, tuple) and len(packed) == 5 and packed[0] == "qpass_packed":
            _, i, size, stride, offset = packed
            e = self.entries[i]
            vals = {k: self._value(v) for k, v in self._qargs_of(e).items()}
            out = self._decode(i, self._attr(e.codes), vals["scale"], vals["zero_point"], vals["codebook"],
                               vals["outliers"], vals["scale_q"], record=False)
            return out.as_strided(size, stride, offset)
        return packed

    def _qargs_of(self, e: _Entry) -> dict:
        a = e.node.args
        return {"scale": a[1], "zero_point": a[2], "codebook": a[3], "outliers": a[4], "scale_q": a[5]}

    # -------------------------------------------------------------------------------------------------- exit
    def __exit__(self, *exc) -> bool:
        if self._hooks is not None:
            self._hooks.__exit__(*exc)
            self._hooks = None
        gm = self.gm
        for i, e in enumerate(self.entries):
            vals = {k: self._value(v) for k, v in self._qargs_of(e).items()}
            with torch.no_grad():
                w = self._decode(i, self._attr(e.codes), vals["scale"], vals["zero_point"], vals["codebook"],
                                 vals["outliers"], vals["scale_q"], record=False)
            p = self._attr(e.target)
            p.data = w.detach().clone()
            codes_node = e.node.args[0]
            e.node.target, e.node.args, e.node.kwargs = e.old_target, e.old_args, e.old_kwargs
            gm.graph.erase_node(codes_node)
            del gm._buffers[e.codes]
            e.old_args[0].meta.pop("qpass_packed", None)
        self._outputs.clear()
        if self.entries:
            gm.graph.lint()
            gm.recompile()
        return False


def _flat(values):
    for v in values:
        if isinstance(v, tuple):
            yield from _flat(v)
        else:
            yield v
