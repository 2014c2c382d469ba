"""The quantizer IR: a typed view over quantizer nodes, one metadata type, and how passes insert and find them.

A quantizer is one node of a ``qpass::`` fake-quant op (``qpass.primitives.ops``)::

    fake_quantize(x, scale, zero_point, block, fmt)                 static scales (get_attr buffers)
    fake_quantize_dynamic(x, block, fmt, symmetric[, clip_ratio])   scales computed from x at run time
    fake_quantize_ext(x, scale, zero_point, block, fmt, codebook,   registered formats (learned codebooks)
                      outlier_index, outlier_value, float_columns,  and side channels on a weight quantizer;
                      float_axis, scale_scale, scale_block, scale_fmt,  scale None: dynamic (symmetric) with
                      scale_zero_point=None, float_threshold=None)  float columns, fixed or found per call
                                                                    by a threshold (LLM.int8() inputs)

with ``node.meta[META_QUANT]`` a :class:`QuantMeta` (what it quantizes: role, site, module path, spec, ...).
Nobody reads these arguments by position: :class:`Quantizer` names them::

    q = Quantizer.of(node)              # None for any other node
    q.x, q.scale, q.zero_point, q.block, q.fmt, q.symmetric, q.dynamic, q.clip_ratio, q.meta.role, q.side_channels
    quantizers(gm, role="weight")       # every weight quantizer, in graph order
    insert_quantizer(gm, before, x, meta, block=..., scale=..., zero_point=..., name=..., origin="quantize")

Formats come from the registry (``qpass.primitives.formats``: int, fp8, fp4, nf4, learned codebooks and any
registered one). Side channels (:class:`SideChannels`: sparse values, float columns, second-level scales) are
extra arguments of ``fake_quantize_ext``; their reference numerics live in ``formats``. A backend declares
what it lowers as a table of :class:`Support` per role and refuses the rest with :func:`refuse`, which names
the node, the module path and the unsupported part.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch.fx import GraphModule, Node

from .errors import UnsupportedOpError
from .graph import META_QUANT, add_tensor, describe, get_attr, insert_call, is_quantizer
from .primitives import ops
from .primitives import spec as S
from .primitives.formats import get_format
from .primitives.spec import BUILTIN_KINDS, QSpec

ROLES = ("weight", "input", "key", "value")
T = TypeVar("T")   # Node in a graph view, Tensor when inserting

# ---------------------------------------------------------------------------------------------- meta

_GRANULARITIES = {"per_tensor": S.PerTensor, "per_channel": S.PerChannel, "per_group": S.PerGroup,
                  "per_token": S.PerToken, "per_head": S.PerHead}


def spec_to_dict(spec: QSpec) -> dict:
    """QSpec -> JSON-able dict (any registered format, by name)."""
    g = spec.granularity
    name = next(k for k, v in _GRANULARITIES.items() if type(g) is v)
    return {"format": spec.format.name, "granularity": {"kind": name, **dataclasses.asdict(g)},
            "symmetric": spec.symmetric, "dynamic": spec.dynamic, "full_range": spec.full_range,
            **({"scale_pow2": True} if spec.scale_pow2 else {}),
            **({"clip_ratio": spec.clip_ratio} if spec.clip_ratio != 1.0 else {})}


def spec_from_dict(d: Mapping) -> QSpec:
    g = dict(d["granularity"])
    gran = _GRANULARITIES[g.pop("kind")](**g)
    return QSpec(get_format(d["format"]), gran, symmetric=d["symmetric"], dynamic=d["dynamic"],
                 full_range=d.get("full_range", False), scale_pow2=d.get("scale_pow2", False),
                 clip_ratio=float(d.get("clip_ratio", 1.0)))


@dataclass(frozen=True)
class QuantMeta:
    """What a quantizer quantizes (``node.meta[META_QUANT]``).

    role      'weight' | 'input' | 'key' | 'value' (ROLES; other roles are allowed for new passes)
    site      name of the node it serves (the linear; the attention for K/V)
    path      module path of that node (``model.layers.0.self_attn``)
    spec      the QSpec it implements
    block_size, position   kv_cache: the block on the K/V tensor; where it sits (pre_rope, attention_input,
                           cache_write)
    side      names of the side channels it carries ('outliers', 'float_columns', 'scale_q',
              'threshold_columns')

    Read-only mapping access (``meta["role"]``, ``meta.get("path")``) is kept for dict-style readers: the
    keys are the fields that are set."""

    role: str
    site: str
    path: str
    spec: QSpec
    block_size: tuple[int, ...] | None = None
    position: str | None = None
    side: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"role": self.role, "site": self.site, "path": self.path,
                             "spec": spec_to_dict(self.spec)}
        if self.block_size is not None:
            d["block_size"] = list(self.block_size)
        if self.position is not None:
            d["position"] = self.position
        if self.side:
            d["side"] = list(self.side)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "QuantMeta":
        bs = d.get("block_size")
        return cls(d["role"], d["site"], d["path"], spec_from_dict(d["spec"]),
                   None if bs is None else tuple(bs), d.get("position"), tuple(d.get("side", ())))

    # -- read-only mapping view (dict-style readers)
    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) not in (None, ())]

    def __getitem__(self, key: str):
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def get(self, key: str, default=None):
        return self[key] if key in self else default


# ------------------------------------------------------------------------------------- side channels


@dataclass(frozen=True)
class SparseValues(Generic[T]):
    """Float values added after dequantization at int64 flat (COO) indices of the quantized tensor."""

    index: T
    value: T


@dataclass(frozen=True)
class FloatColumns(Generic[T]):
    """Slices along `axis` (a weight's input columns) kept in float."""

    index: T
    axis: int = -1


@dataclass(frozen=True)
class ThresholdColumns:
    """Slices along `axis` (an input's features) kept in float where their largest magnitude over every other
    axis of the current tensor reaches `threshold`: the set is found in every call, not stored (LLM.int8()'s
    outlier feature dimensions, ``formats.threshold_columns``). Dynamic quantizers only."""

    threshold: float
    axis: int = -1


@dataclass(frozen=True)
class ScaleQuant(Generic[T]):
    """Second-level scales: the scale is fake-quantized with `scale` (its own scale), `block`, `fmt` and, when
    given, `zero_point` (asymmetric min-max second level, SpQR's; without it symmetric, QLoRA's)."""

    scale: T
    block: tuple[int, ...]
    fmt: str
    zero_point: T | None = None


@dataclass(frozen=True)
class SideChannels(Generic[T]):
    """The optional side channels of a quantizer: nodes in a graph view, tensors when inserting. A dynamic
    quantizer takes float columns only: a fixed set (`float_columns`) or one found per call (`threshold_columns`)."""

    outliers: SparseValues[T] | None = None
    float_columns: FloatColumns[T] | None = None
    scale_q: ScaleQuant[T] | None = None
    threshold_columns: ThresholdColumns | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n in ("outliers", "float_columns", "scale_q", "threshold_columns")
                     if getattr(self, n) is not None)

    def __bool__(self) -> bool:
        return bool(self.names)


NO_SIDE = SideChannels()

# ---------------------------------------------------------------------------------------------- view

_STATIC, _DYNAMIC, _EXT = ops.fake_quantize, ops.fake_quantize_dynamic, ops.fake_quantize_ext


@dataclass(frozen=True)
class Quantizer:
    """A named view over one quantizer node (see the module doc). Properties read the node; nothing is cached."""

    node: Node

    @classmethod
    def of(cls, node) -> "Quantizer | None":
        return cls(node) if is_quantizer(node) else None

    @property
    def op(self) -> str:
        """'fake_quantize' | 'fake_quantize_dynamic' | 'fake_quantize_ext' (for messages)."""
        return self.node.target.name().split("::")[-1]

    @property
    def x(self) -> Node:
        return self.node.args[0]

    @property
    def _dyn_op(self) -> bool:     # argument positions are those of fake_quantize_dynamic
        return self.node.target is _DYNAMIC

    @property
    def dynamic(self) -> bool:
        """Scales computed from x at run time (fake_quantize_dynamic, or fake_quantize_ext without a scale)."""
        return self._dyn_op or (self.node.target is _EXT and self.node.args[1] is None)

    @property
    def scale(self) -> Node | None:
        return None if self._dyn_op else self.node.args[1]

    @property
    def zero_point(self) -> Node | None:
        return None if self._dyn_op else self.node.args[2]

    @property
    def block(self) -> tuple[int, ...]:
        return tuple(self.node.args[1] if self._dyn_op else self.node.args[3])

    @property
    def fmt_name(self) -> str:
        return self.node.args[2] if self._dyn_op else self.node.args[4]

    @property
    def fmt(self):
        """The format object (IntFormat(4), FloatFormat('fp8_e4m3'), LutFormat(), Codebook(4), ...)."""
        return get_format(self.fmt_name)

    @property
    def symmetric(self) -> bool:
        return bool(self.node.args[3]) if self._dyn_op else self.zero_point is None

    @property
    def clip_ratio(self) -> float:
        """The dynamic scale's clipping ratio (``fake_quantize_dynamic``'s fifth argument; 1.0: min-max)."""
        if not self._dyn_op:
            return 1.0
        a = self.node.args
        return float(a[4] if len(a) > 4 else self.node.kwargs.get("clip_ratio", 1.0))

    @property
    def codebook(self) -> Node | None:
        """The learned table of a codebook format (ext op only)."""
        return self.node.args[5] if self.node.target is _EXT else None

    @property
    def side_channels(self) -> SideChannels[Node]:
        if self.node.target is not _EXT:
            return NO_SIDE
        a = self.node.args
        thr = a[14] if len(a) > 14 else self.node.kwargs.get("float_threshold")
        return SideChannels(
            SparseValues(a[6], a[7]) if a[6] is not None else None,
            FloatColumns(a[8], a[9]) if a[8] is not None else None,
            ScaleQuant(a[10], tuple(a[11]), a[12], a[13] if len(a) > 13 else None) if a[10] is not None else None,
            ThresholdColumns(float(thr), a[9]) if thr is not None else None)

    @property
    def meta(self) -> QuantMeta | None:
        """What this quantizer quantizes; None for a node no pass inserted (built by hand)."""
        m = self.node.meta.get(META_QUANT)
        return m if isinstance(m, QuantMeta) else None

    @property
    def role(self) -> str:
        return self.meta.role if self.meta is not None else ""

    @property
    def path(self) -> str:
        return self.meta.path if self.meta is not None else ""

    @property
    def granularity(self) -> str:
        """'per_tensor' | 'per_channel' | 'per_group' from the block (what backends declare)."""
        if any(b > 1 for b in self.block):
            return "per_group"
        return "per_tensor" if all(b == -1 for b in self.block) else "per_channel"

    def args_on(self, x: Node) -> tuple:
        """This quantizer's arguments on another input (the same op, scales and format)."""
        return (x, *self.node.args[1:])

    def static_args(self) -> tuple[Node, Node | None, tuple[int, ...], str]:
        """(scale, zero_point, block, fmt name) of a static quantizer."""
        return self.scale, self.zero_point, self.block, self.fmt_name


def quantizers(gm: GraphModule, role: str | None = None) -> list[Quantizer]:
    """Every quantizer of `gm` in graph order (only those of `role` when given)."""
    qs = [Quantizer(n) for n in gm.graph.nodes if is_quantizer(n)]
    return [q for q in qs if q.role == role] if role is not None else qs


def role_of(n) -> str:
    """The role of quantizer node `n` ('' for another node or one without metadata)."""
    q = Quantizer.of(n)
    return q.role if q is not None else ""


# ------------------------------------------------------------------------------------------- insert


def insert_quantizer(gm: GraphModule, before: Node, x: Node, meta: QuantMeta, *, block, origin: str,
                     scale: torch.Tensor | Node | None = None, zero_point: torch.Tensor | Node | None = None,
                     name: str | None = None, codebook: torch.Tensor | None = None,
                     side: SideChannels[torch.Tensor] = NO_SIDE, **node_meta) -> Quantizer:
    """Insert a quantizer of `x` before `before` and return its view. Users are not rewired (the caller
    decides: one consumer or all).

    scale None: dynamic (``fake_quantize_dynamic``, meta.spec.dynamic; with float columns, fixed or found per call
    by a threshold, the only side channels a dynamic quantizer takes, ``fake_quantize_ext`` without a scale,
    symmetric only). Else static (no threshold columns): tensors are registered
    as buffers named `name` (the scale) and ``name.replace('scale', 'zero_point')`` (get_attr nodes are
    used as they are). A codebook or side channels make it ``fake_quantize_ext`` (buffers ``<name>_codebook``,
    ``<name>_outlier_index``, ...). `node_meta` overrides the meta copied from `before` (nn_module_stack)."""
    spec, fmt = meta.spec, meta.spec.format.name
    if scale is None:
        if not spec.dynamic or codebook is not None or (side and (side.names not in (("float_columns",),
                                                                                     ("threshold_columns",))
                                                                  or not spec.symmetric)):
            raise ValueError("a quantizer without a scale is dynamic (spec.dynamic) and has no table; its only "
                             "side channel is float columns (fixed or by threshold), with symmetric scales")
        if side:
            if spec.clip_ratio != 1.0:
                raise ValueError("clip_ratio is not supported with float columns (fake_quantize_ext)")
            c, t = side.float_columns, side.threshold_columns
            if c is not None:
                args = (x, None, None, list(block), fmt, None, None, None,
                        get_attr(gm, before, add_tensor(gm, f"{name}_float_columns", c.index)), c.axis, None, [], "")
            else:
                args = (x, None, None, list(block), fmt, None, None, None, None, t.axis, None, [], "", None,
                        float(t.threshold))
            fq = insert_call(gm, before, _EXT, args, origin, val_like=x, **node_meta)
            fq.meta[META_QUANT] = dataclasses.replace(meta, side=side.names)
            return Quantizer(fq)
        clip = (spec.clip_ratio,) if spec.clip_ratio != 1.0 else ()    # 1.0: the four-argument node, as before
        fq = insert_call(gm, before, _DYNAMIC, (x, list(block), fmt, spec.symmetric, *clip), origin, val_like=x,
                         **node_meta)
        fq.meta[META_QUANT] = meta
        return Quantizer(fq)

    def attr(value, suffix: str, stem_name: str | None = None):
        if value is None or isinstance(value, Node):
            return value
        return get_attr(gm, before, add_tensor(gm, stem_name or f"{name}_{suffix}", value))

    if side.threshold_columns is not None:
        raise ValueError("threshold columns (found per call) need a dynamic quantizer (scale None)")
    s_node = attr(scale, "", name)
    z_node = attr(zero_point, "", name.replace("scale", "zero_point") if name else None)
    ext = codebook is not None or bool(side) or get_format(fmt).kind not in BUILTIN_KINDS
    if not ext:
        fq = insert_call(gm, before, _STATIC, (x, s_node, z_node, list(block), fmt), origin, val_like=x,
                         **node_meta)
    else:
        o, c, sq = side.outliers, side.float_columns, side.scale_q
        args = (x, s_node, z_node, list(block), fmt, attr(codebook, "codebook"),
                attr(o and o.index, "outlier_index"), attr(o and o.value, "outlier_value"),
                attr(c and c.index, "float_columns"), c.axis if c else -1,
                attr(sq and sq.scale, "scale_scale"), list(sq.block) if sq else [], sq.fmt if sq else "")
        if sq is not None and sq.zero_point is not None:
            args += (attr(sq.zero_point, "scale_zero_point"),)
        fq = insert_call(gm, before, _EXT, args, origin, val_like=x, **node_meta)
        if side.names != meta.side:
            meta = dataclasses.replace(meta, side=side.names)
    fq.meta[META_QUANT] = meta
    return Quantizer(fq)


# ------------------------------------------------------------------------------------------ support


@dataclass(frozen=True)
class Support:
    """What a backend lowers for one role: format kinds (``'*'``: any registered), granularities, side
    channels. ``reason(q)`` says what is unsupported, or None."""

    kinds: frozenset[str] = frozenset(BUILTIN_KINDS)
    granularities: frozenset[str] = frozenset({"per_tensor", "per_channel", "per_group"})
    side: frozenset[str] = frozenset()
    dynamic: bool = True

    def reason(self, q: Quantizer) -> str | None:
        """Every unsupported part of `q` ('format toy3 (kind codebook); side channel outliers'), or None."""
        f, parts = q.fmt, []
        if "*" not in self.kinds and f.kind not in self.kinds:
            parts.append(f"format {f.name} (kind {f.kind})")
        if q.granularity not in self.granularities:
            parts.append(f"granularity {q.granularity} (block {q.block})")
        parts += [f"side channel {s}" for s in q.side_channels.names if s not in self.side]
        if q.dynamic and not self.dynamic:
            parts.append("dynamic scales")
        return "; ".join(parts) or None


def unsupported(q: Quantizer, table: Mapping[str, Support]) -> str | None:
    """Why a backend with support `table` ({role: Support}; key '*' for any other role) cannot lower `q`."""
    sup = table.get(q.role) or table.get("*")
    if sup is None:
        return f"role {q.role or 'unknown'}"
    return sup.reason(q)


def refuse(gm: GraphModule, q: Quantizer, backend: str, part: str, fix: str) -> UnsupportedOpError:
    """The error a backend raises for a quantizer it does not lower: names the node, module path and part."""
    where = describe(gm, q.node)
    if q.path and q.path not in where:
        where += f" (quantizes {q.path})"
    return UnsupportedOpError(f"{backend} cannot lower qpass::{q.op} (role {q.role or 'unknown'}): "
                              f"unsupported {part}", where=where, fix=fix)


__all__ = ["QuantMeta", "Quantizer", "SideChannels", "SparseValues", "FloatColumns", "ThresholdColumns",
           "ScaleQuant", "NO_SIDE",
           "Support", "quantizers", "insert_quantizer", "role_of", "unsupported", "refuse", "is_quantizer",
           "spec_to_dict", "spec_from_dict", "ROLES", "META_QUANT"]
