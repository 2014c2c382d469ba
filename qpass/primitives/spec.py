"""Quantization specs: what a quantizer produces (format) and which elements share a scale (granularity).

Pure data. Granularities turn into a *block size* for a concrete tensor shape: one entry per dimension,
the number of consecutive elements along that dimension that share one scale (``-1`` = the whole
dimension, so block sizes stay valid when batch and sequence dimensions are dynamic). The scale tensor has
the same rank as the input and ``ceil(size / block)`` entries per dimension, so a group size that does not
divide the channel count leaves a smaller last group instead of failing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

# ---------------------------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class IntFormat:
    """Uniform integer codes. Symmetric: [-2^(b-1), 2^(b-1)-1] with min-max scale = absmax / (2^(b-1)-1),
    so min-max scales never produce the most negative code (the grid is symmetric); a clipped scale
    (percentile, MSE, learned) can. Asymmetric: [0, 2^b - 1] with a zero point."""

    bits: int
    kind: ClassVar[str] = "int"

    def __post_init__(self):
        if not (isinstance(self.bits, int) and 2 <= self.bits <= 8):
            raise ValueError(f"integer formats have 2..8 bits, got {self.bits!r}")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def qrange(self, symmetric: bool) -> tuple[int, int]:
        if symmetric:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1


@dataclass(frozen=True)
class FloatFormat:
    """Low-precision float codes with a per-block scale that maps absmax to the format's largest value.
    ``fp8_e4m3`` (max 448), ``fp8_e5m2`` (max 57344), ``fp4_e2m1`` (max 6)."""

    name: str
    kind: ClassVar[str] = "float"

    def __post_init__(self):
        if self.name not in FLOAT_MAX:
            raise ValueError(f"unknown float format {self.name!r}; known: {sorted(FLOAT_MAX)}")

    @property
    def bits(self) -> int:
        return 4 if self.name == "fp4_e2m1" else 8

    @property
    def max(self) -> float:
        return FLOAT_MAX[self.name]


@dataclass(frozen=True)
class LutFormat:
    """A 16-entry codebook in [-1, 1] scaled by the block absmax (``nf4``, QLoRA's NormalFloat4)."""

    name: str = "nf4"
    kind: ClassVar[str] = "lut"

    def __post_init__(self):
        if self.name != "nf4":
            raise ValueError(f"unknown codebook format {self.name!r}; known: ['nf4']")

    @property
    def bits(self) -> int:
        return 4


Format = Union[IntFormat, FloatFormat, LutFormat]
FLOAT_MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0, "fp4_e2m1": 6.0}
BUILTIN_KINDS = ("int", "float", "lut")   # formats the plain qpass::fake_quantize ops run
# Formats added with qpass.primitives.formats.register_format (learned codebooks, formats a test defines):
# name -> format object (which carries its own encode/decode). Filled by that module, read here.
REGISTERED: dict = {}


def format_from_name(name: str) -> Format:
    """'int4' / 'int8' / 'fp8_e4m3' / 'fp8_e5m2' / 'fp4_e2m1' / 'nf4' (or a registered name) -> a format object."""
    if name.startswith("int") and name[3:].isdigit():
        return IntFormat(int(name[3:]))
    if name in FLOAT_MAX:
        return FloatFormat(name)
    if name == "nf4":
        return LutFormat()
    if name in REGISTERED:
        return REGISTERED[name]
    raise ValueError(f"unknown format {name!r}")


# ----------------------------------------------------------------------------------------- granularity


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""

    def block_size(self, shape) -> tuple[int, ...]:
        return tuple(-1 for _ in shape)


@dataclass(frozen=True)
class PerChannel:
    """One scale per index along `axis` (weights [out, in]: axis 0 = one scale per output row)."""

    axis: int = 0

    def block_size(self, shape) -> tuple[int, ...]:
        axis = _axis(self.axis, len(shape))
        return tuple(1 if d == axis else -1 for d in range(len(shape)))


@dataclass(frozen=True)
class PerGroup:
    """Groups of `group_size` consecutive elements along `axis` (default: the last, i.e. a weight's input
    dim), one scale per group and per index of every other dimension. The last group may be partial."""

    group_size: int
    axis: int = -1

    def __post_init__(self):
        if not (isinstance(self.group_size, int) and self.group_size >= 1):
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")

    def block_size(self, shape) -> tuple[int, ...]:
        axis = _axis(self.axis, len(shape))
        return tuple(self.group_size if d == axis else 1 for d in range(len(shape)))


@dataclass(frozen=True)
class PerToken:
    """One scale per token: everything but the last (hidden) dimension indexes tokens."""

    def block_size(self, shape) -> tuple[int, ...]:
        return tuple(1 for _ in shape[:-1]) + (-1,)


@dataclass(frozen=True)
class PerHead:
    """For attention tensors [batch, heads, seq, head_dim]: one scale per head (static over tokens) when
    `per_token` is False, or one per (token, head) when True."""

    per_token: bool = False
    head_axis: int = 1

    def block_size(self, shape) -> tuple[int, ...]:
        if len(shape) != 4:
            raise ValueError(f"per_head expects a [batch, heads, seq, head_dim] tensor, got rank {len(shape)}")
        if self.per_token:
            return (1, 1, 1, -1)
        head_axis = _axis(self.head_axis, 4)
        return tuple(1 if d == head_axis else -1 for d in range(4))


Granularity = Union[PerTensor, PerChannel, PerGroup, PerToken, PerHead]


def _axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a rank-{ndim} tensor")
    return axis % ndim


# ------------------------------------------------------------------------------------------------ spec


@dataclass(frozen=True)
class QSpec:
    """One quantizer: format + granularity + symmetry + whether scales are computed at run time.

    ``full_range`` (symmetric integer, static scales only): use all 2^b codes. The block's value of largest
    magnitude maps exactly to the most negative code -2^(b-1), so its scale carries that value's sign
    (scale = v / -2^(b-1)): int4 gets 16 levels of max|w| / 8 instead of 15 of max|w| / 7. This is
    onnxruntime's MLAS / ``MatMulNBitsQuantizer`` symmetric scheme; the codes and the dequantization
    (code * scale) are unchanged, so every backend runs it as is.

    ``scale_pow2`` (static scales only): every scale is rounded *up* to a power of two (ZeroQuant-FP's
    constraint: an FP4 weight times its scale is then an exponent shift, exactly representable in FP8 E4M3
    within its exponent range). Rounding up never clips more than min-max does; it costs at most one bit
    of resolution. Codes, dequantization and the quantizer ops are unchanged (the scale is a tensor), so
    every backend runs it as is.

    ``clip_ratio`` (dynamic integer quantizers only; default 1.0 = min-max): each block's min and max are
    multiplied by it before the scale is computed at run time, so the largest values saturate (QuaRot clips
    per-token activations at 0.9 and the KV cache at 0.95). Part of the quantizer node
    (``fake_quantize_dynamic(..., clip_ratio)``), so every backend computes the same scales."""

    format: Format = IntFormat(8)
    granularity: Granularity = PerChannel(0)
    symmetric: bool = True
    dynamic: bool = False
    full_range: bool = False
    scale_pow2: bool = False
    clip_ratio: float = 1.0

    def __post_init__(self):
        if self.format.kind != "int" and not self.symmetric:
            raise ValueError(f"{self.format.name} is symmetric only (scale by absmax); set symmetric: true")
        if self.full_range and (self.format.kind != "int" or not self.symmetric or self.dynamic):
            raise ValueError("full_range applies to symmetric integer quantizers with static scales only")
        if self.scale_pow2 and (self.dynamic or self.full_range):
            raise ValueError("scale_pow2 applies to static scales (weights, static activations) without full_range")
        if not (isinstance(self.clip_ratio, (int, float)) and 0.0 < self.clip_ratio <= 1.0):
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio!r}")
        if self.clip_ratio != 1.0 and (not self.dynamic or self.format.kind != "int"):
            raise ValueError("clip_ratio applies to dynamic integer quantizers (scales computed at run time); "
                             "static scales come from observers (percentile, mse)")

    def block_size(self, shape) -> tuple[int, ...]:
        return self.granularity.block_size(tuple(shape))

    @property
    def bits(self) -> int:
        return self.format.bits
