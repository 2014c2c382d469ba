"""The registry of quantization formats, and the reference numerics of side channels.

One entry per format name. Each entry gives the format's ``name``, ``bits``, ``kind``, code range
(``qrange``), the dtype of its codes and ``encode`` / ``decode`` between values in code units (``x / scale``)
and codes::

    codec("nf4").encode(y, None, None)        # -> uint8 indices into NF4_VALUES
    get_format("codebook4")                   # the format object a QSpec holds
    register_format(MyFormat())               # a new format: its name then works everywhere formats do

Built in:
  * ``int2``..``int8``, ``fp8_e4m3``, ``fp8_e5m2``, ``fp4_e2m1``, ``nf4``: the formats of ``spec.py``, whose
    numerics are those of ``quant.py``, wrapped here unchanged (the plain ``qpass::fake_quantize`` ops run them).
  * ``codebook2``..``codebook8`` (:class:`Codebook`): learned codebooks, one table of ``2^b`` values per block
    of the scale (per channel: one table per output row; per group: one per row and group), in code units
    (value = table[code] * scale). The table is a tensor ``[*scale_shape, 2^b]`` the quantizer node carries.

A format outside ``BUILTIN_KINDS`` (any registered one) runs through ``qpass::fake_quantize_ext`` and the
``*_ext`` functions below; the plain ops refuse it.

Side channels of a weight quantizer (all optional; the reference semantics, implemented once here):
  * **second-level scales** ``scale_q = (scale_scale, scale_block, scale_fmt[, scale_zero_point])``: the stored
    scale is itself quantized; the effective scale is ``fake_quantize(scale, scale_scale, scale_zero_point,
    scale_block, scale_fmt)`` (symmetric without the zero point, QLoRA's; asymmetric min-max with it, SpQR's).
  * **sparse values** ``outliers = (index, value)``: int64 flat (COO) indices into the tensor and float values
    *added* after dequantization (an outlier's residual ``x - x_hat`` makes it exact; CSR converts to this).
  * **float columns** ``float_columns = (index, axis)``: slices along ``axis`` (a weight's input columns) kept
    in float: they take the input's own values (fake-quant) or stored values (``dequantize_ext``), last.

    x_hat = dequantize(codes, effective scale) ; x_hat.flat[index] += value ; x_hat[..., cols] = x[..., cols]

so ``fake_quantize_ext(x, ...) == dequantize_ext(quantize_ext(x, ...), ..., float_values=x[cols])`` bit for bit.

Dynamic quantizers (scales computed from ``x`` at run time, per-token activations) take one side channel,
float columns (LLM.int8()'s mixed-precision decomposition: outlier feature dimensions stay in float), given
either as a fixed set ``float_columns = (index, axis)`` or found in every call, ``threshold = (t, axis)``:
the slices along ``axis`` whose largest magnitude over every other axis (all tokens of the call) reaches t
(``threshold_columns``; bitsandbytes' rule, |x| >= t)::

    x_hat = fake_quantize_dynamic(x with the float columns zeroed) ; x_hat[..., cols] = x[..., cols]

so the scales come from the other columns only (an outlier never widens its token's grid), as
``fake_quantize_dynamic_ext`` computes it.
Never imports torch.fx.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch
from torch import Tensor

from qpass.errors import QuantizationError
from qpass.primitives import quant
from qpass.primitives.spec import BUILTIN_KINDS, FLOAT_MAX, REGISTERED

BlockSize = Sequence[int]


class FormatCodec:
    """What a format is: ``name``, ``bits``, ``kind``, ``table_size`` (entries of a learned table per block,
    0 for none), and its numerics. Subclass it (as a frozen dataclass) to add a format; see :class:`Codebook`.

    ``encode(y, zero_point, table)``: codes of ``y`` (values in code units, i.e. ``x / scale``); ``zero_point``
    is broadcast to ``y`` or None, ``table`` is ``[*y.shape, table_size]`` (broadcastable) or None.
    ``decode(codes, zero_point, table, dtype)``: values in code units, in ``dtype``."""

    name: str
    bits: int
    kind: ClassVar[str] = "custom"
    table_size: ClassVar[int] = 0
    stores_scale: ClassVar[bool] = True      # False: the scale is a constant, not stored (bit accounting)

    @property
    def table_values(self) -> int:
        """fp16 values stored per block for its table (bit accounting; a derived table stores fewer)."""
        return self.table_size

    def qrange(self, symmetric: bool) -> tuple[float, float]:
        raise NotImplementedError

    def codes_dtype(self, symmetric: bool) -> torch.dtype:
        return torch.uint8

    def encode(self, y: Tensor, zero_point: Tensor | None, table: Tensor | None) -> Tensor:
        raise NotImplementedError

    def decode(self, codes: Tensor, zero_point: Tensor | None, table: Tensor | None, dtype: torch.dtype) -> Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class _Builtin(FormatCodec):
    """A format of spec.py with quant.py's numerics (unchanged)."""

    format: object

    @property
    def name(self) -> str:
        return self.format.name

    @property
    def bits(self) -> int:
        return self.format.bits

    @property
    def kind(self) -> str:
        return self.format.kind

    def qrange(self, symmetric: bool):
        return quant.qrange(self.name, symmetric)

    def codes_dtype(self, symmetric: bool) -> torch.dtype:
        return quant.codes_dtype(self.name, symmetric)

    def encode(self, y, zero_point, table):
        return quant._encode(y, zero_point, self.name)

    def decode(self, codes, zero_point, table, dtype):
        return quant._decode(codes, zero_point, self.name, dtype)


def nearest(y: Tensor, table: Tensor) -> Tensor:
    """Index of the nearest entry of `table` ([*y.shape, T], broadcastable) for each element; ties -> lower.
    The same int64 indices as ``(y.unsqueeze(-1) - table).abs().argmin(-1)``, computed as a running minimum
    over the T entries (no [*y.shape, T] distance tensor; a strict ``<`` keeps the lower index on ties, a NaN
    ``y`` gets 0 as argmin gives it). A table with a non-finite entry takes the argmin itself (argmin ranks a
    NaN distance first)."""
    t = table.shape[-1]
    if t == 1 or t > _RUNNING_MAX or not bool(torch.isfinite(table).all()):
        return (y.unsqueeze(-1) - table).abs().argmin(-1)
    with torch.no_grad():
        shape = torch.broadcast_shapes(y.shape, table.shape[:-1])
        best = (y - table[..., 0]).abs().expand(shape).contiguous()
        d = torch.empty_like(best)
        less = torch.empty(shape, dtype=torch.bool, device=y.device)
        code = torch.zeros(shape, dtype=torch.uint8, device=y.device)
        for i in range(1, t):
            torch.sub(y, table[..., i], out=d).abs_()
            torch.lt(d, best, out=less)
            torch.minimum(best, d, out=best)          # = where(less, d, best): no NaN among finite entries
            code.add_(less.view(torch.uint8) * (i - code))    # = where(less, i, code), mod 256 (faster)
    return code.long()


_RUNNING_MAX = 256


@dataclass(frozen=True)
class Codebook(FormatCodec):
    """A learned codebook of ``2^bits`` values per block (per channel or per group), in code units. Codes are
    uint8 indices; the nearest entry wins (ties: the lower index). Symmetric only (no zero point); min-max
    scales map the block's absmax to 1, so tables learned in [-1, 1] (as nf4's) fit the default scales."""

    bits: int
    kind: ClassVar[str] = "codebook"

    def __post_init__(self):
        if not (isinstance(self.bits, int) and 1 <= self.bits <= 8):
            raise ValueError(f"codebooks have 1..8 bits, got {self.bits!r}")

    @property
    def name(self) -> str:
        return f"codebook{self.bits}"

    @property
    def table_size(self) -> int:
        return 2 ** self.bits

    def qrange(self, symmetric: bool):
        return -1.0, 1.0

    def encode(self, y, zero_point, table):
        return nearest(y, table).to(torch.uint8)

    def decode(self, codes, zero_point, table, dtype):
        table = table.to(dtype).expand(*codes.shape, table.shape[-1])
        return torch.gather(table, -1, codes.long().unsqueeze(-1)).squeeze(-1)


# ------------------------------------------------------------------------------------------ registry


def register_format(fmt: FormatCodec) -> FormatCodec:
    """Add `fmt` under ``fmt.name`` (a name of a built-in format, or another object under a taken name, is
    refused). Returns `fmt`. Its name then parses everywhere a format name does (QSpec, the ops)."""
    name = fmt.name
    if _builtin_name(name):
        raise ValueError(f"{name!r} is a built-in format")
    if REGISTERED.get(name, fmt) != fmt:
        raise ValueError(f"format {name!r} is already registered as {REGISTERED[name]!r}")
    for attr in ("bits", "kind", "encode", "decode", "qrange"):
        if not hasattr(fmt, attr):
            raise TypeError(f"a format needs {attr!r} (see qpass.primitives.formats.FormatCodec)")
    REGISTERED[name] = fmt
    quant.parse_format.cache_clear()
    return fmt


def unregister_format(name: str) -> None:
    """Remove a registered format (tests that register a toy format clean up with this)."""
    REGISTERED.pop(name, None)
    quant.parse_format.cache_clear()


def _builtin_name(name: str) -> bool:
    return (name.startswith("int") and name[3:].isdigit()) or name in FLOAT_MAX or name == "nf4"


def get_format(name: str):
    """Format name -> the format object a QSpec holds (QuantizationError for an unknown name)."""
    return quant.parse_format(name)


@lru_cache(maxsize=None)
def _builtin(name: str) -> _Builtin:
    return _Builtin(quant.parse_format(name))


def codec(fmt) -> FormatCodec:
    """The encode/decode of a format (an object or a name)."""
    name = fmt if isinstance(fmt, str) else fmt.name
    f = quant.parse_format(name)
    return _builtin(name) if f.kind in BUILTIN_KINDS else f


def format_names() -> list[str]:
    """Every name the registry knows (built-in integer widths listed individually)."""
    return [f"int{b}" for b in range(2, 9)] + [*FLOAT_MAX, "nf4"] + sorted(REGISTERED)


for _b in range(2, 9):
    register_format(Codebook(_b))

# ------------------------------------------------------------------------------------- side channels


def _expand_table(table: Tensor, block: BlockSize, shape) -> Tensor:
    """A per-block table [*scale_shape, T] -> [*shape (broadcastable), T]."""
    cols = [quant.expand_to(table[..., i], block, shape) for i in range(table.shape[-1])]
    return torch.stack(cols, -1)


# Codebook formats run per block: ``quant.blocks`` lays a tensor out as [*scale_shape, K] (the K elements of each
# block; a partial last block padded with copies of its own elements), so a block's table [*scale_shape, 1, T]
# and scale [*scale_shape, 1] broadcast against its elements without expanding them to the tensor's shape. The
# arithmetic per element is the same (x / scale, the nearest entry, entry * scale): the same values, bit for bit.


def _encode_blocks(c: FormatCodec, x: Tensor, s: Tensor, zero_point: Tensor | None, block_size: BlockSize,
                   codebook: Tensor, dtype: torch.dtype) -> Tensor:
    """Codes of `x` per block: [*scale_shape, K] (`s`: the effective scale)."""
    y = quant.blocks(x.to(dtype), block_size) / s.to(dtype).unsqueeze(-1)
    z = None if zero_point is None else zero_point.to(dtype).unsqueeze(-1)
    return c.encode(y, z, codebook.to(dtype).unsqueeze(-2))


def _decode_blocks(c: FormatCodec, codes: Tensor, s: Tensor, zero_point: Tensor | None, block_size: BlockSize,
                   codebook: Tensor, dtype: torch.dtype) -> Tensor:
    """Values (x units, `dtype`) of per-block codes [*scale_shape, K]."""
    if type(c).decode is Codebook.decode:      # the table entry of each code: one gather from the block's table
        v = torch.gather(codebook.to(dtype), -1, codes.long())
    else:
        z = None if zero_point is None else zero_point.to(dtype).unsqueeze(-1)
        v = c.decode(codes, z, codebook.unsqueeze(-2), dtype)
    return v * s.to(dtype).unsqueeze(-1)


def _unblocks(t: Tensor, block_size: BlockSize, shape) -> Tensor:
    """Inverse of ``quant.blocks``: [*scale_shape, K] -> `shape` (the padding of partial blocks cut)."""
    rank, nbs, bbs = len(shape), [], []
    for n, b in zip(shape, block_size):
        bb = n if b == -1 else max(1, min(b, n))
        nbs.append(-(-n // bb))
        bbs.append(bb)
    t = t.reshape(*nbs, *bbs).permute([j for i in range(rank) for j in (i, rank + i)])
    t = t.reshape([nb * bb for nb, bb in zip(nbs, bbs)])
    for i, n in enumerate(shape):
        if t.shape[i] != n:
            t = t.narrow(i, 0, n)
    return t.contiguous()


def _check_table(fmt: FormatCodec, table: Tensor | None, scale: Tensor, where: str) -> None:
    want = fmt.table_size
    if want and (table is None or tuple(table.shape) != (*scale.shape, want)):
        got = None if table is None else tuple(table.shape)
        raise QuantizationError(f"{where}: {fmt.name} needs a table of shape {(*scale.shape, want)}, got {got}",
                                fix="give one table of 2^bits values per block of the scale")
    if not want and table is not None:
        raise QuantizationError(f"{where}: {fmt.name} takes no table", fix="pass codebook=None")


def effective_scale(scale: Tensor, scale_q: tuple | None) -> Tensor:
    """The scale a quantizer uses: `scale` itself, or its second-level fake-quantization."""
    if scale_q is None:
        return scale
    s2, block2, fmt2, *z2 = scale_q
    return quant.fake_quantize(scale, s2, z2[0] if z2 else None, list(block2), fmt2).to(scale.dtype)


def quantize_ext(x: Tensor, scale: Tensor, zero_point: Tensor | None, block_size: BlockSize, fmt: str, *,
                 codebook: Tensor | None = None, scale_q: tuple | None = None) -> Tensor:
    """Codes of `x` for any registered format (a learned table per block for codebook formats)."""
    c = codec(fmt)
    s = effective_scale(scale, scale_q)
    if c.kind in BUILTIN_KINDS:
        _check_table(c, codebook, s, "quantize_ext")
        return quant.quantize(x, s, zero_point, block_size, fmt)
    quant.check_block_size(x.shape, block_size)
    _check_table(c, codebook, s, "quantize_ext")
    dtype = quant._compute_dtype(x.dtype)
    if codebook is not None and x.numel():
        return _unblocks(_encode_blocks(c, x, s, zero_point, block_size, codebook, dtype), block_size, x.shape)
    y, z, _ = quant._code_units(x, s, zero_point, block_size, dtype)
    return c.encode(y, z, None)


def dequantize_ext(codes: Tensor, scale: Tensor, zero_point: Tensor | None, block_size: BlockSize, fmt: str,
                   out_dtype: torch.dtype = torch.float32, *, codebook: Tensor | None = None,
                   outliers: tuple | None = None, float_columns: tuple | None = None,
                   scale_q: tuple | None = None) -> Tensor:
    """Values of `codes` plus the side channels (see the module doc). `float_columns`: (index, axis, values)."""
    c = codec(fmt)
    s = effective_scale(scale, scale_q)
    if c.kind in BUILTIN_KINDS and codebook is None:
        out = quant.dequantize(codes, s, zero_point, block_size, fmt, out_dtype)
    else:
        _check_table(c, codebook, s, "dequantize_ext")
        dtype = quant._compute_dtype(out_dtype)
        if codebook is not None and codes.numel():
            cb = quant.blocks(codes, block_size)
            out = _unblocks(_decode_blocks(c, cb, s, zero_point, block_size, codebook, dtype), block_size,
                            codes.shape).to(out_dtype)
        else:
            se = quant.expand_to(s.to(dtype), block_size, codes.shape)
            z = None if zero_point is None else quant.expand_to(zero_point.to(dtype), block_size, codes.shape)
            out = (c.decode(codes, z, None, dtype) * se).to(out_dtype)
    return apply_side(out, outliers, float_columns)


def apply_side(out: Tensor, outliers: tuple | None, float_columns: tuple | None) -> Tensor:
    """Add the sparse values, then put the float columns (index, axis, values) back."""
    if outliers is not None:
        index, value = outliers
        out = out.reshape(-1).index_add(0, index.long(), value.to(out.dtype)).reshape(out.shape)
    if float_columns is not None:
        index, axis, values = float_columns
        out = out.index_copy(axis % out.dim(), index.long(), values.to(out.dtype))
    return out


def fake_quantize_ext(x: Tensor, scale: Tensor, zero_point: Tensor | None, block_size: BlockSize, fmt: str, *,
                      codebook: Tensor | None = None, outliers: tuple | None = None,
                      float_columns: tuple | None = None, scale_q: tuple | None = None) -> Tensor:
    """dequantize_ext(quantize_ext(x)) with x's own values in the float columns. `float_columns`: (index, axis).
    A format with a ``roundtrip(y)`` method (values in code units -> decoded values, no codes: olive) takes it
    when there is no table, zero point or side channel: the same values, without building codes."""
    c = codec(fmt)
    if hasattr(c, "roundtrip") and codebook is None and zero_point is None and outliers is None \
            and float_columns is None and scale_q is None:
        quant.check_block_size(x.shape, block_size)
        y, _, s = quant._code_units(x, scale, None, block_size, quant._compute_dtype(x.dtype))
        return (c.roundtrip(y) * s).to(x.dtype)
    cols = None
    if float_columns is not None:
        index, axis = float_columns
        cols = (index, axis, x.index_select(axis % x.dim(), index.long()))
    if codebook is not None and c.kind not in BUILTIN_KINDS and x.numel():    # codes and values per block
        quant.check_block_size(x.shape, block_size)
        s = effective_scale(scale, scale_q)
        _check_table(c, codebook, s, "fake_quantize_ext")
        dtype = quant._compute_dtype(x.dtype)
        codes = _encode_blocks(c, x, s, zero_point, block_size, codebook, dtype)
        out = _decode_blocks(c, codes, s, zero_point, block_size, codebook, dtype)
        return apply_side(_unblocks(out, block_size, x.shape).to(x.dtype), outliers, cols)
    codes = quantize_ext(x, scale, zero_point, block_size, fmt, codebook=codebook, scale_q=scale_q)
    return dequantize_ext(codes, scale, zero_point, block_size, fmt, x.dtype, codebook=codebook,
                          outliers=outliers, float_columns=cols, scale_q=scale_q)


def threshold_columns(x: Tensor, threshold: float, axis: int = -1) -> Tensor:
    """Bool mask over ``x.shape[axis]``: the slices whose largest magnitude over every other axis reaches
    `threshold` (LLM.int8()'s outlier feature dimensions of this call; bitsandbytes counts |x| >= threshold)."""
    axis = axis % x.dim()
    dims = [d for d in range(x.dim()) if d != axis]
    a = x.abs()
    return (a.amax(dims) if dims else a) >= threshold


def fake_quantize_dynamic_ext(x: Tensor, block_size: BlockSize, fmt: str, symmetric: bool, *,
                              float_columns: tuple | None = None, threshold: tuple | None = None) -> Tensor:
    """fake_quantize_dynamic of `x` with the float columns zeroed (so they do not set the scales), then those
    columns put back with x's own values (see the module doc). `float_columns`: (index, axis), a fixed set;
    `threshold`: (t, axis), the set found in `x` itself (``threshold_columns``). At most one of the two."""
    if float_columns is not None and threshold is not None:
        raise QuantizationError("a dynamic quantizer takes fixed float columns or a threshold, not both")
    if threshold is not None:
        t, axis = threshold
        axis = axis % x.dim()
        shape = [1] * x.dim()
        shape[axis] = -1
        m = threshold_columns(x, t, axis).reshape(shape)
        out = quant.fake_quantize_dynamic(x.masked_fill(m, 0.0), block_size, fmt, symmetric)
        return torch.where(m, x, out)
    if float_columns is None:
        return quant.fake_quantize_dynamic(x, block_size, fmt, symmetric)
    index, axis = float_columns
    axis, index = axis % x.dim(), index.long()
    out = quant.fake_quantize_dynamic(x.index_fill(axis, index, 0.0), block_size, fmt, symmetric)
    return out.index_copy(axis, index, x.index_select(axis, index))


__all__ = ["FormatCodec", "Codebook", "register_format", "unregister_format", "get_format", "codec",
           "format_names", "quantize_ext", "dequantize_ext", "fake_quantize_ext", "fake_quantize_dynamic_ext",
           "threshold_columns",
           "effective_scale", "apply_side", "nearest"]
