"""Our own CPU kernels, in C: compiled on first use with the system C compiler, loaded with ctypes.

    csrc/q4avx2.c     int4 x fp32 linear layer (AVX2 + FMA, OpenMP over output rows) on the ``q4`` layout
                      (packing.py); exact up to fp32 summation order. See the file's header for the math.
                      Also ``q4_linear_a8``: the same layer with the input rounded to int8 first, in blocks of
                      128 columns (or of the weight group where it is 64, 32 or 16 wide: ``a8_block``), integer
                      dot products on the codes (the approximate, bandwidth-bound decode path),
                      and ``q4_linear_i8``: the same integer path on a W4A8 layer's own int8 input codes (exact).
                      Also ``i8_linear``: int8 x int8 -> int32 W8A8 linear (exact integer sums, then the fp32
                      scales), on the module's int8 [N, K] weights; see its comment in the same file.
                      And three small fp32 ops of the decode step, each one call in place of several torch ops
                      (at 256-wide layers the ops' dispatch costs far more than their arithmetic), bit for bit
                      torch's results: :func:`token_quant` (per-token symmetric int input quantization, codes
                      or fake-quant values), :func:`rms_norm` (HF LlamaRMSNorm in fp32, up to the summation
                      order of the mean) and :func:`rope` (x * cos + rotate_half(x) * sin).
                      And the store / load of PackedKVCache's common formats (dynamic symmetric int4 / int8,
                      a scale per token and head or per token): :func:`kv_store`, :func:`kv_load`, one call each in place
                      of ~25 torch ops per cache access, storing the bytes the torch path stores.
                      And ``q4_dequant``: rows of the q4 layout dequantized to fp32 (bit for bit the fake-quant
                      values), the tile step of kernels.py's ``q4deq`` prefill kernel.
                      And ``w8_linear``: weight-only int8 (per-channel, symmetric or not) x fp32 input, the
                      W8A16 decode GEMV (kernels.py ``w8avx2``; exact up to fp32 rounding order).
                      And ``lut_linear``: the codebook (table lookup) linear layer on CodebookLinear's stored
                      b-bit codes (1..4 bits, dense or bit planes) and fp32 tables with the scale folded in,
                      plus its sparse side channel; exact up to fp32 summation order (:func:`lut_linear`).

Build: ``$CC`` (default ``cc``) ``-O3 -mavx2 -mfma -fopenmp -shared -fPIC`` (without ``-fopenmp`` if that
fails: one thread) into ``$XDG_CACHE_HOME/qpass/kernels/q4avx2-<hash>.so`` (``~/.cache`` by default; a
per-user temporary folder if that is not writable), where the hash covers the source, the command and the
machine type, so an edited source or another ``$CC`` builds anew. The library is written under a temporary
name and renamed, so concurrent processes never load a half-written file. It is then checked once against
a small reference product before it is used. With torch's Linux wheels the library's ``libgomp.so.1`` is
the one torch already loaded (same soname), so there is one OpenMP runtime and one thread pool.

Torch ops: each kernel is also registered as ``torch.ops.qpass_native.<name>`` (token_quant, rms_norm, rope,
kv_store (mutates its codes / scales arguments), kv_load, q4_linear, i8_linear, lut_linear; schemas in SCHEMAS) with a fake
kernel, so graphs can hold them as op nodes and be traced or exported (the decode runtime's fused RMSNorm and
RoPE are such nodes: runtime.py). The CPU kernel is the C library where it is loaded (native_on) and a torch
composition of the same semantics otherwise, so the ops exist and run without a compiler too. How they are
defined, what a call costs and why the build stays ctypes: OPS_NOTE (below).

Optional by design: where the CPU lacks AVX2/FMA (as torch sees it), there is no compiler, the build or the
check fails, or ``QPASS_NO_NATIVE=1`` is set, :func:`q4` returns None (logged once) and the backend works as
without it (int4 weights use the int4pack or dense layouts and torch's kernels). The op wrappers
(:func:`token_quant`, :func:`rms_norm`, :func:`rope`, :func:`kv_store`, :func:`kv_load`) assume the library
is there: callers check :func:`available` first (once, when they bind) and keep their torch path otherwise.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger("qpass.backends.torch_packed")

ENV_DISABLE = "QPASS_NO_NATIVE"
SOURCE = Path(__file__).with_name("csrc") / "q4avx2.c"
FLAGS = ("-O3", "-mavx2", "-mfma", "-shared", "-fPIC")
OPENMP = ("-fopenmp",)
ABI_VERSION = 11
ISAS = ("AVX2", "AVX512")           # torch's CPU capabilities that imply AVX2 + FMA
_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
         ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
_I8_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
_P, _I = ctypes.c_void_p, ctypes.c_int64
_TQ_ARGS = [_P, _I, _I, ctypes.c_int, ctypes.c_int, _P, _P, _P]          # token_quant
_RMS_ARGS = [_P, _I, _I, _P, ctypes.c_float, _P]                          # rms_norm_f32
_ROPE_ARGS = [_P, _I, _I, _I, _I, _I, _I, _I, _P, _P, _P]                 # rope_f32
_KVS_ARGS = [_P, _I, _I, _I, _I, _I, _I, _I, _P, _I, ctypes.c_int, ctypes.c_int, _P, _P]   # kv_store
_KVL_ARGS = [_P, _P, _I, _I, _I, _I, ctypes.c_int, _I, _P]                 # kv_load
_LUT_ARGS = [_P, _I, _I, _P, _I, ctypes.c_int, ctypes.c_int, _P, _I, _I, _I, _I, _P, _P, _P, _P, _P,
             ctypes.c_int]                                                  # lut_linear
_ATT_ARGS = [_P, _I, _I, _I, _I, _I, _I, _I, _P, _I, _I, _I, _I, _I, _P, _I, _I, _I, _I, _P, _I, _I, _I,
             ctypes.c_float, _P, ctypes.c_int]                              # attention_f32

_lock = threading.Lock()
_state: dict = {}                   # {"lib": Q4Library | None, "why": str}: one build attempt per process


class Q4Library:
    """The loaded library: ``linear(...)`` is ``q4_linear`` (see csrc/q4avx2.c), ``linear_a8`` its int8-input
    variant ``q4_linear_a8`` (same arguments), ``path`` forces a code path, ``dequant`` is ``q4_dequant``,
    ``w8_linear``, ``i8_linear``, ``token_quant``, ``rms_norm`` (``rms_norm_f32``), ``rope`` (``rope_f32``), ``kv_store``,
    ``kv_load``, ``lut_linear`` and ``attention`` (``attention_f32``) the others."""

    def __init__(self, path: str):
        self.file = path
        lib = ctypes.CDLL(path)
        lib.q4_abi_version.restype = ctypes.c_int
        if lib.q4_abi_version() != ABI_VERSION:
            raise OSError(f"{path} has ABI version {lib.q4_abi_version()}, expected {ABI_VERSION}")
        self.linear = lib.q4_linear
        self.linear.restype, self.linear.argtypes = ctypes.c_int, _ARGS
        self.path = lib.q4_linear_path
        self.linear_a8 = lib.q4_linear_a8
        self.linear_a8.restype, self.linear_a8.argtypes = ctypes.c_int, _ARGS
        self.linear_i8 = lib.q4_linear_i8                    # W4A8 on int8 input codes (exact)
        self.linear_i8.restype = ctypes.c_int
        self.linear_i8.argtypes = [_P, _P, _I, _I, _I, _P, _I, _P, _P, _I, _P, _P, ctypes.c_int]
        self.a8_isa = lib.q4_linear_a8_isa                   # tests: force AVX2 (0), AVX-VNNI (1), AVX512-VNNI on
                                                             # 256-bit (2) or 512-bit registers (3)
        self.a8_isa.restype, self.a8_isa.argtypes = ctypes.c_int, [ctypes.c_int, *_ARGS]
        lib.q4_a8_block.restype, lib.q4_a8_block.argtypes = _I, [_I]
        self.a8_block = lib.q4_a8_block                      # a8_block(group): the input block of q4_linear_a8
        lib.q4_a8_isas.restype = ctypes.c_int
        self.a8_isas = lib.q4_a8_isas()                      # bit i: isa i runs here
        self.path.restype, self.path.argtypes = ctypes.c_int, [ctypes.c_int, *_ARGS]
        self.dequant = lib.q4_dequant                        # rows of the q4 layout -> fp32 (kernels.py q4deq)
        self.dequant.restype = ctypes.c_int
        self.dequant.argtypes = [_P, _I, _I, _P, _P, _I, _I, _I, _I, _P, _I, ctypes.c_int]
        self.w8_linear = lib.w8_linear                       # W8A16: int8 weights x fp32 input (kernels.py w8avx2)
        self.w8_linear.restype = ctypes.c_int
        self.w8_linear.argtypes = [_P, _I, _I, _P, _I, _P, _P, _P, _P, ctypes.c_int]
        self.w8_linear_a8 = lib.w8_linear_a8                 # W8A16 on int8-rounded input blocks (kernels.py q8a8)
        self.w8_linear_a8.restype, self.w8_linear_a8.argtypes = ctypes.c_int, self.w8_linear.argtypes
        self.i8_linear = lib.i8_linear
        self.i8_linear.restype, self.i8_linear.argtypes = ctypes.c_int, _I8_ARGS
        self.i8_isa = lib.i8_linear_isa                      # tests: force vpmaddwd (0) or AVX512-VNNI (1)
        self.i8_isa.restype, self.i8_isa.argtypes = ctypes.c_int, [ctypes.c_int, *_I8_ARGS]
        self.i8_linear_ws = lib.i8_linear_ws                 # the same with the weight rows' code sums (colsum)
        self.i8_linear_ws.restype, self.i8_linear_ws.argtypes = ctypes.c_int, [*_I8_ARGS, _P]
        self.tape_run = lib.tape_run                         # a native segment's program (segments.py)
        self.tape_run.restype, self.tape_run.argtypes = ctypes.c_int, [_P, _I, _P, _I, ctypes.c_int, _P]
        lib.q4_vnni512.restype = ctypes.c_int
        self.vnni512 = bool(lib.q4_vnni512())               # the 512-bit VNNI kernels run (i8 isa 1, w8_linear_a8)
        for name, fn, args in (("token_quant", "token_quant", _TQ_ARGS), ("rms_norm", "rms_norm_f32", _RMS_ARGS),
                               ("rope", "rope_f32", _ROPE_ARGS), ("kv_store", "kv_store", _KVS_ARGS),
                               ("kv_load", "kv_load", _KVL_ARGS), ("lut_linear", "lut_linear", _LUT_ARGS),
                               ("attention", "attention_f32", _ATT_ARGS)):
            f = getattr(lib, fn)
            f.restype, f.argtypes = ctypes.c_int, args
            setattr(self, name, f)
        self._lib = lib


def disabled() -> str | None:
    """Why the native kernels are off regardless of the build (None: they are not)."""
    if os.environ.get(ENV_DISABLE, "") not in ("", "0"):
        return f"{ENV_DISABLE}={os.environ[ENV_DISABLE]}"
    isa = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() not in ("x86_64", "amd64") or isa not in ISAS:
        return f"the CPU has no AVX2/FMA as torch sees it ({platform.machine()}, {isa})"
    return None


def q4() -> Q4Library | None:
    """The q4 kernel library, building it on first use; None where it cannot be had (see module doc)."""
    if disabled() is not None:
        return None
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"], _state["why"] = _build_and_load()
                if _state["lib"] is None:
                    log.info("native int4 kernel unavailable, using torch's kernels: %s", _state["why"])
                else:
                    log.debug("native int4 kernel: %s", _state["lib"].file)
    return _state["lib"]


def available() -> bool:
    return q4() is not None


def status() -> str:
    """One line for reports: the library in use, or why there is none."""
    why = disabled()
    if why is None:
        lib = q4()
        return f"q4avx2 built ({os.path.basename(lib.file)})" if lib else f"q4avx2 unavailable: {_state['why']}"
    return f"q4avx2 off: {why}"


def reset() -> None:
    """Forget the loaded library (tests: rebuild with another compiler or cache folder)."""
    with _lock:
        _state.clear()


# ------------------------------------------------------------------------------------------ small ops
# One ctypes call each; the library must be there (callers check available() when they bind). Kept short:
# they run thousands of times a second, so a call is a few checks, torch.empty and the C call.

_QRANGE = {b: (-(1 << (b - 1)), (1 << (b - 1)) - 1) for b in range(2, 9)}     # symmetric int codes


def _lib() -> Q4Library:
    lib = _state.get("lib")
    if lib is None:
        lib = q4()
        if lib is None:
            raise RuntimeError(f"native kernels unavailable: {status()}")
    return lib


def token_quant(x: torch.Tensor, bits: int, *, codes: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int quantization of x [..., K] (computed on x.float()) with `bits` (2..8):

        s = max(max_k |x| / qmax, SCALE_FLOOR),   q = clamp(round_half_even(x / s), qmin, qmax)

    (qmin, qmax = -2^(b-1), 2^(b-1) - 1). Returns (int8 codes q [M, K] if `codes` else the fake-quant values
    q * s, fp32 of x's shape; scales s fp32 [M]), M = x.numel() / K. Bit for bit ``Q.token_scale`` then
    ``(x / s).round_().clamp_(qmin, qmax)`` (codes, as ``PackedLinear.input_codes``) and ``.mul_(s)``
    (``Q.fake_quantize_dynamic(x, [1, ..., -1], f"int{bits}", True)``) on finite tokens; a token holding inf or
    NaN gets s = NaN, codes 0 and values NaN (fake_quantize_dynamic's all-NaN token)."""
    if x.dtype is not torch.float32:
        x = x.float()
    if not x.is_contiguous():
        x = x.contiguous()
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    try:
        lo, hi = _QRANGE[bits]
    except KeyError:
        raise ValueError(f"token_quant takes 2..8 bits, not {bits}") from None
    scales = torch.empty(m, dtype=torch.float32)
    if codes:
        out = torch.empty(m, k, dtype=torch.int8)
        cp, fp = out.data_ptr(), None
    else:
        out = torch.empty_like(x)                        # x is contiguous fp32 here (2x cheaper than by shape)
        cp, fp = None, out.data_ptr()
    if m and _lib().token_quant(x.data_ptr(), m, k, lo, hi, cp, fp, scales.data_ptr()):
        raise RuntimeError(f"token_quant failed for a {m}x{k} input, {bits} bits")
    return out, scales


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm in fp32 over the last dim of x [..., D] (fp32), weight fp32 [D]:

        out = weight * (x * r),   r = 1 / sqrt(mean(x^2) + eps)   (eps rounded to fp32, as torch does)

    Returns a contiguous fp32 tensor of x's shape. Equal to ``weight * (x * torch.rsqrt(x.pow(2).mean(-1,
    keepdim=True) + eps))`` up to the summation order of the mean (the sum of squares is accumulated in double
    and the mean rounded to fp32 once): bit for bit where torch's fp32 sum is exact."""
    if x.dtype is not torch.float32 or weight.dtype is not torch.float32:
        raise TypeError(f"rms_norm takes fp32 tensors, not {x.dtype} / {weight.dtype}")
    d = x.shape[-1]
    if weight.numel() != d:
        raise ValueError(f"rms_norm: weight of {weight.numel()} values for rows of {d}")
    if not x.is_contiguous():
        x = x.contiguous()
    if not weight.is_contiguous():
        weight = weight.contiguous()
    out = torch.empty_like(x)
    if x.numel() and _lib().rms_norm(x.data_ptr(), x.numel() // d, d, weight.data_ptr(), eps, out.data_ptr()):
        raise RuntimeError(f"rms_norm failed for rows of {d}")
    return out


def _rope_table(c: torch.Tensor, b: int, t: int, d: int) -> torch.Tensor:
    """cos/sin [b or 1, 1, t, d] or [b or 1, t, d] -> contiguous fp32 [b, t, d]."""
    if c.dtype is not torch.float32:
        raise TypeError(f"rope takes fp32 cos/sin, not {c.dtype}")
    if c.dim() == 4:
        if c.shape[1] != 1:
            raise ValueError(f"rope: cos/sin of shape {tuple(c.shape)}, expected [B, 1, T, D] or [B, T, D]")
        c = c.squeeze(1)
    if c.shape != (b, t, d):
        c = c.expand(b, t, d)                       # raises on a shape that does not broadcast
    return c if c.is_contiguous() else c.contiguous()


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x fp32 [B, H, T, D] (any strides; a last dim that is not contiguous is copied):

        out = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

    cos/sin fp32 [B, 1, T, D] or [B, T, D] (batch 1 broadcasts). Bit for bit torch's expression (no fused
    multiply-add). Returns [B, H, T, D] as the transpose(1, 2) view of a contiguous [B, T, H, D] buffer."""
    if x.dtype is not torch.float32:
        raise TypeError(f"rope takes fp32 tensors, not {x.dtype}")
    b, h, t, d = x.shape
    if d % 2:
        raise ValueError(f"rope needs an even head dim, not {d}")
    if x.stride(3) != 1:
        x = x.contiguous()
    # contiguous [B, 1, T, D] / [B, T, D] tables already have the memory of [B, T, D]: used as they are (a
    # view op costs ~1.5 us, as much as the C call)
    shape = cos.shape
    if not (cos.dtype is sin.dtype is torch.float32 and sin.shape == shape and cos.is_contiguous()
            and sin.is_contiguous() and (shape == (b, 1, t, d) or shape == (b, t, d))):
        cos, sin = _rope_table(cos, b, t, d), _rope_table(sin, b, t, d)
    out = torch.empty_strided((b, h, t, d), (t * h * d, d, h * d, 1), dtype=torch.float32)   # [B, T, H, D] memory
    sb, sh, st, _ = x.stride()
    if out.numel() and _lib().rope(x.data_ptr(), b, h, t, d, sb, sh, st, cos.data_ptr(), sin.data_ptr(),
                                   out.data_ptr()):
        raise RuntimeError(f"rope failed for x of shape {tuple(x.shape)}")
    return out


def kv_store(k: torch.Tensor, pos: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bits: int) -> None:
    """Quantize the rows of k fp32 [B, H, T, D] (any strides; a last dim that is not contiguous is copied) and
    write them at slots pos int64 [T] of a low-bit cache, in place: codes uint8 [B, H, max_len, W] and scales
    fp32 [B, H, max_len, 1] (contiguous: PackedKVCache's ``codes`` / ``scale`` buffers), or [B, 1, max_len, 1]
    for one scale per token over all heads (block [1, -1, 1, -1]; told apart by the size). Per row (per token
    over all heads when shared), as :func:`token_quant`:

        s = max(max |k| / qmax, SCALE_FLOOR),   q = clamp(round_half_even(k / s), qmin, qmax)

    bits 8: W = D, the int8 q as a byte; bits 4: W = D / 2 (D even), u = q + 8 two per byte, the first in the
    low nibble (packing.pack_dense). A row holding inf/NaN gets q = 0 and scale NaN (a NaN in it) or inf (as
    torch's absmax / qmax). IndexError (nothing written) for a position outside [0, max_len)."""
    if k.dtype is not torch.float32:
        raise TypeError(f"kv_store takes fp32 rows, not {k.dtype}")
    if k.stride(-1) != 1:
        k = k.contiguous()
    if pos.dtype is not torch.int64 or not pos.is_contiguous():
        pos = pos.to(torch.int64).contiguous()
    b, h, t, d = k.shape
    cb, ch, max_len, w = codes.shape
    if (cb != b or ch != h or pos.numel() != t or w != (d >> 1 if bits == 4 else d) or codes.dtype is not torch.uint8
            or scales.dtype is not torch.float32 or scales.numel() not in (b * h * max_len, b * max_len)
            or not codes.is_contiguous() or not scales.is_contiguous()):
        raise ValueError(f"kv_store: rows {tuple(k.shape)} at {tuple(pos.shape)} positions do not fit a {bits}-bit "
                         f"cache of codes {tuple(codes.shape)} {codes.dtype}, scales {tuple(scales.shape)} "
                         f"{scales.dtype} (both contiguous)")
    sb, sh, st, _ = k.stride()
    shared = int(scales.numel() != b * h * max_len)
    rc = _lib().kv_store(k.data_ptr(), b, h, t, d, sb, sh, st, pos.data_ptr(), max_len, bits, shared,
                         codes.data_ptr(), scales.data_ptr())
    if rc:
        if rc == -1:
            raise IndexError(f"kv_store: positions {pos.tolist()} outside the cache's {max_len} slots [0, {max_len})")
        raise ValueError(f"kv_store failed (rc={rc}) for rows {tuple(k.shape)}, {bits} bits")


def kv_load(codes: torch.Tensor, scales: torch.Tensor, n: int | None, bits: int,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The first n slots (all of them: n None or >= max_len) of a cache written by :func:`kv_store`,
    dequantized: [B, H, n, D] contiguous = q * s (one fp32 multiply, bit for bit torch's int8 codes times the
    fp32 scales), cast to `dtype` when that is not fp32."""
    b, h, max_len, w = codes.shape
    d = w << 1 if bits == 4 else w
    if n is None or n > max_len:
        n = max_len
    elif n < 0:
        raise ValueError(f"kv_load: {n} slots")
    if not (codes.dtype is torch.uint8 and scales.dtype is torch.float32 and codes.is_contiguous()
            and scales.is_contiguous() and scales.numel() in (b * h * max_len, b * max_len)):
        raise ValueError(f"kv_load: codes {tuple(codes.shape)} {codes.dtype} and scales {tuple(scales.shape)} "
                         f"{scales.dtype} are not a contiguous {bits}-bit cache")
    out = torch.empty(b, h, n, d)
    per = 1 if scales.numel() == b * h * max_len else h             # heads sharing a scale
    if out.numel() and _lib().kv_load(codes.data_ptr(), scales.data_ptr(), b * h, max_len, n, d, bits, per,
                                      out.data_ptr()):
        raise ValueError(f"kv_load failed for codes {tuple(codes.shape)}, {bits} bits")
    return out if dtype is torch.float32 else out.to(dtype)



LUT_LAYOUTS = {"dense": 0, "dense3": 0, "bitplanes": 1}


def lut_weight(qweight: torch.Tensor, table: torch.Tensor, bits: int, layout: str, k: int, bn: int, bk: int
               ) -> torch.Tensor:
    """The fp32 [N, K] weight :func:`lut_linear` multiplies by (no sparse values): the torch decode of its
    arguments, for tests and the fallback. table fp32 [Sn, Sk, W], W >= 2^bits."""
    from .packing import unpack_bitplanes, unpack_dense, unpack_dense3

    u = unpack_dense(qweight, bits, k) if layout == "dense" else unpack_dense3(qweight, k) if layout == "dense3" \
        else unpack_bitplanes(qweight, bits, k)
    n = u.shape[0]
    sn, sk, w = table.shape
    rows = (torch.arange(n) // bn).clamp(max=sn - 1)
    cols = (torch.arange(k) // bk).clamp(max=sk - 1)
    return table.reshape(-1)[((rows[:, None] * sk + cols[None, :]) * w + u.long()).reshape(-1)].view(n, k)


def lut_linear(x: torch.Tensor, qweight: torch.Tensor, table: torch.Tensor, bits: int, layout: str, k: int,
               bn: int, bk: int, rowptr: torch.Tensor | None = None, index: torch.Tensor | None = None,
               value: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """out [..., N] = x [..., K] (fp32) times the codebook weight (csrc/q4avx2.c lut_linear):

        W[n, k] = table[min(n // bn, Sn - 1), min(k // bk, Sk - 1), code[n, k]],   W.flat[index] += value

    codes as CodebookLinear stores them (``layout`` 'dense' for 1, 2, 4 bits: [N, ceil(K bits / 8)];
    'dense3' for 3 bits: [N, 3 ceil(K / 8)]; 'bitplanes' for 1..4 bits: [bits, N, ceil(K / 8)]), table fp32 contiguous [Sn, Sk, W] (W = 8 for bits <= 3,
    16 for 4), bk a multiple of 8 when Sk > 1 (>= K for one group). The sparse side channel: index int32
    sorted flat indices into [N, K], value fp32, rowptr int64 [N + 1] (where each row's entries start), or
    None. bias fp32 [N] or None. Exact up to fp32 summation order."""
    if x.dtype is not torch.float32 or x.shape[-1] != k:
        raise ValueError(f"lut_linear: x {tuple(x.shape)} {x.dtype}, expected fp32 [..., {k}]")
    if not x.is_contiguous():
        x = x.contiguous()
    n = qweight.shape[-2] if layout == "bitplanes" else qweight.shape[0]
    sn, sk, _ = table.shape
    out = torch.empty(*x.shape[:-1], n)
    m = x.numel() // k
    ptr = [t.data_ptr() if t is not None else None for t in (rowptr, index, value, bias)]
    if _lib().lut_linear(x.data_ptr(), m, k, qweight.data_ptr(), n, LUT_LAYOUTS[layout], bits, table.data_ptr(),
                         sn, sk, bn, bk, *ptr, out.data_ptr(), torch.get_num_threads()):
        raise RuntimeError(f"lut_linear failed for a {m}x{k} input, {n}x{k} weights, {bits} bits {layout}, table "
                           f"{tuple(table.shape)}, block ({bn}, {bk})")
    return out


ATTENTION_MAX_T = 8     # query rows per call up to which attention() runs the native kernel (decode); longer (prefill):
#                         torch's scaled_dot_product_attention, whose blocked flash kernel is the faster one there


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    """``scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)`` for fp32 q [B, Hq,
    T, D], k [B, Hkv, N, D], v [B, Hkv, N, Dv] (Hq a multiple of Hkv; any strides, e.g. a slice of a static
    cache) and an additive fp32 mask broadcastable to [B, Hq, T, N] or None. Up to ATTENTION_MAX_T query rows
    the native kernel (csrc: attention_f32; equal up to fp32 rounding, a row with every key masked is NaN);
    otherwise, or for what the kernel does not take (other dtypes, a boolean mask, no keys), torch's op.
    Returns a contiguous [B, Hq, T, Dv] tensor."""
    b, hq, t, d = q.shape
    hkv, n, dv = k.shape[1], k.shape[2], v.shape[-1]
    if (t > ATTENTION_MAX_T or n == 0 or hq % hkv or k.shape[0] != b or v.shape[:3] != k.shape[:3]
            or k.shape[-1] != d or not (q.dtype is k.dtype is v.dtype is torch.float32)
            or (mask is not None and mask.dtype is not torch.float32)):
        return _attention_torch(q, k, v, mask, scale)
    q, k, v = (x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous() for x in (q, k, v))
    if mask is not None:
        mask = mask.expand(b, hq, t, n)                 # broadcast dims get stride 0; raises where it cannot
        if mask.stride(-1) != 1 and n > 1:
            mask = mask.contiguous()
        mp, (msb, msh, mst, _) = mask.data_ptr(), mask.stride()
    else:
        mp, msb, msh, mst = None, 0, 0, 0
    out = torch.empty(b, hq, t, dv)
    if _lib().attention(q.data_ptr(), b, hq, t, d, *q.stride()[:3], k.data_ptr(), hkv, n, *k.stride()[:3],
                        v.data_ptr(), dv, *v.stride()[:3], mp, msb, msh, mst, scale, out.data_ptr(),
                        torch.get_num_threads()):
        raise RuntimeError(f"attention failed for q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    return out


# ------------------------------------------------------------------------------------------ torch ops
# Every kernel above is also an operator of the ``qpass_native`` namespace (torch.ops.qpass_native.<name>), so a
# graph holds it as an op node (traceable, exportable, printable) rather than as an opaque Python function. See
# OPS_NOTE for why torch.library.Library (define + a CPU impl) rather than torch.library.custom_op.

NAMESPACE = "qpass_native"
SCHEMAS = {
    "token_quant": "token_quant(Tensor x, int bits, bool codes) -> (Tensor, Tensor)",
    "rms_norm": "rms_norm(Tensor x, Tensor weight, float eps) -> Tensor",
    "rope": "rope(Tensor x, Tensor cos, Tensor sin) -> Tensor",
    "kv_store": "kv_store(Tensor k, Tensor pos, Tensor(a!) codes, Tensor(b!) scales, int bits) -> ()",
    "kv_load": "kv_load(Tensor codes, Tensor scales, SymInt? n, int bits, ScalarType? dtype=None) -> Tensor",
    "q4_linear": "q4_linear(Tensor x, Tensor qweight, Tensor scale, Tensor? zero, Tensor? bias, int group) -> Tensor",
    "i8_linear": "i8_linear(Tensor a, Tensor a_scale, Tensor w, Tensor w_scale, Tensor? bias) -> Tensor",
    "lut_linear": "lut_linear(Tensor x, Tensor qweight, Tensor table, int bits, str layout, int k, int bn, int bk, "
                  "Tensor? rowptr, Tensor? index, Tensor? value, Tensor? bias) -> Tensor",
    "attention": "attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor",
}
OPS_NOTE = """\
NOTE (measured on the dev machine, 2 cores shared with other jobs, torch 2.13, fp32, under torch.no_grad, best
of 5-7 x 20000 calls; per call):
  define route, rms_norm [1, 1, 256]: wrapper native.rms_norm 2.0 us; torch.library.custom_op 7.9 us (4.8 us
  under inference_mode: its Python autograd layer runs on every call); torch.library.Library define + a Python
  CPU impl 3.4 us; a C++ TORCH_LIBRARY op (cpp_extension) calling at::empty_like 2.0 us against 0.7 us for
  torch.empty_like. The ~1.3-1.5 us is the cost of any call through torch.ops from Python (aten.mul.Tensor via
  its OpOverload: 2.4 us, torch.mul 1.0 us), so a C++ kernel would not remove it. Hence Library + register_fake.
  These ops (wrapper -> op): token_quant [1, 1, 256] 2.7 -> 4.4 us, rms_norm 2.1 -> 3.7, rope [1, 4, 1, 64]
  3.2 -> 4.5, kv_store 2.8 -> 4.5, kv_load 2.5 -> 4.3 (+1.4 to +1.8 us).
  Decode step of the bundled model (models/tiny-llama, 6 layers, 256 wide, 1 thread, thread CPU time, W4A16,
  exact kernels), its 25 fused rms_norm / rope nodes as ops vs as wrapper calls: 1.10 vs 1.04 ms and 1.29 vs
  1.22 ms (medians of two runs): ~+50-70 us a step, ~5%. runtime.freeze(direct_ops=True) gives that back (the
  graph then holds the wrappers). On models of real size the step is milliseconds of arithmetic and this is noise.
The modules that bind a kernel once (PackedLinear's q4avx2 / i8avx2 runners and their token_quant,
PackedKVCache's kv_store / kv_load) keep calling the wrappers directly: they are module internals (call_module /
forward nodes in the graph), and the op would only add the dispatch.
The build stays the ctypes one: torch.utils.cpp_extension.load built a minimal TORCH_LIBRARY op in 6.7 s cold
here, but it needs ninja (not a torch dependency; absent from the venv, found here only as /usr/bin/ninja),
compiles every source as C++ (csrc/q4avx2.c does not compile as C++: aligned_alloc's void * conversions), and
ties the library to torch's C++ ABI (a rebuild per torch version, and a failure mode the ctypes build, which needs
only a C compiler, does not have), for no gain in call cost (above)."""


def native_on() -> bool:
    """Whether the ops run the C library (else their torch fallback): it is loaded, or it loads now (not
    with ``QPASS_NO_NATIVE`` set, see q4()). Once loaded it stays in use, as for the wrappers above: callers
    that honour a later ``QPASS_NO_NATIVE`` decide with available() when they bind."""
    return _state.get("lib") is not None or q4() is not None


def _token_quant_torch(x: torch.Tensor, bits: int, codes: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """token_quant's semantics in torch ops (its fallback): a token holding inf/NaN gets scale NaN, codes 0."""
    from qpass.primitives import quant as Q

    try:
        lo, hi = _QRANGE[bits]
    except KeyError:
        raise ValueError(f"token_quant takes 2..8 bits, not {bits}") from None
    x = x.float()
    k = x.shape[-1]
    if x.numel() == 0:                                   # the shapes token_quant gives an empty input
        m = x.numel() // k if k else 0
        return (torch.empty(m, k, dtype=torch.int8) if codes else torch.empty_like(x)), torch.empty(m)
    x2 = x.reshape(-1, k)
    s = x2.abs().amax(-1, keepdim=True).div_(hi).clamp_(min=Q.SCALE_FLOOR)
    s = s.masked_fill(~torch.isfinite(x2).all(-1, keepdim=True), float("nan"))
    q = (x2 / s).round_().clamp_(lo, hi)
    out = q.nan_to_num_(0.0).to(torch.int8) if codes else q.mul_(s).reshape(x.shape).contiguous()
    return out, s.reshape(-1).contiguous()


def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype is not torch.float32 or weight.dtype is not torch.float32:
        raise TypeError(f"rms_norm takes fp32 tensors, not {x.dtype} / {weight.dtype}")
    if weight.numel() != x.shape[-1]:
        raise ValueError(f"rms_norm: weight of {weight.numel()} values for rows of {x.shape[-1]}")
    return (weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))).contiguous()


def _rope_out(x: torch.Tensor) -> torch.Tensor:
    b, h, t, d = x.shape
    return x.new_empty_strided((b, h, t, d), (t * h * d, d, h * d, 1), dtype=torch.float32)


def _rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if x.dtype is not torch.float32:
        raise TypeError(f"rope takes fp32 tensors, not {x.dtype}")
    b, h, t, d = x.shape
    if d % 2:
        raise ValueError(f"rope needs an even head dim, not {d}")
    cos, sin = _rope_table(cos, b, t, d)[:, None], _rope_table(sin, b, t, d)[:, None]
    return _rope_out(x).copy_(x * cos + torch.cat((-x[..., d // 2:], x[..., :d // 2]), -1) * sin)


def _kv_store_torch(k: torch.Tensor, pos: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bits: int) -> None:
    """kv_store's semantics in torch ops (PackedKVCache's torch path, as the self-check states it)."""
    from qpass.primitives import quant as Q

    if k.dtype is not torch.float32:
        raise TypeError(f"kv_store takes fp32 rows, not {k.dtype}")
    b, h, t, d = k.shape
    max_len = codes.shape[2]
    shared = scales.numel() != b * h * max_len
    pos = pos.to(torch.int64)
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= max_len):
        raise IndexError(f"kv_store: positions {pos.tolist()} outside the cache's {max_len} slots [0, {max_len})")
    lo, hi = _QRANGE[bits]
    s = k.abs().amax((1, 3) if shared else -1, keepdim=True).div_(hi).clamp_(min=Q.SCALE_FLOOR)
    q = (k / s).round_().clamp_(lo, hi).nan_to_num_(0.0).to(torch.int8)
    u = (q.to(torch.int16) + 8).to(torch.uint8) if bits == 4 else q.view(torch.uint8)
    codes[:, :, pos] = u[..., 0::2] | (u[..., 1::2] << 4) if bits == 4 else u
    scales.view(b, 1 if shared else h, max_len, 1)[:, :, pos] = s


def _kv_load_torch(codes: torch.Tensor, scales: torch.Tensor, n: int | None, bits: int,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    b, h, max_len, w = codes.shape
    d = w << 1 if bits == 4 else w
    n = max_len if n is None or n > max_len else n
    if n < 0:
        raise ValueError(f"kv_load: {n} slots")
    c = codes[:, :, :n]
    q = c.view(torch.int8) if bits == 8 else torch.stack([c & 15, c >> 4], -1).view(b, h, n, d).to(torch.int8) - 8
    shared = scales.numel() != b * h * max_len
    out = (q * scales.view(b, 1 if shared else h, max_len, 1)[:, :, :n]).contiguous()
    return out if dtype in (None, torch.float32) else out.to(dtype)


def _q4_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
               bias: torch.Tensor | None, group: int) -> torch.Tensor:
    """out [..., N] = x [..., k16] (fp32) times the q4-layout weights (csrc/q4avx2.c q4_linear: scale fp32
    [N, k16 / group], zero uint8 of that shape or None for symmetric codes, bias fp32 [N] or None)."""
    n, k16 = qweight.shape[0], qweight.shape[1] * 2
    if x.dtype is not torch.float32 or x.shape[-1] != k16:
        raise ValueError(f"q4_linear: x {tuple(x.shape)} {x.dtype}, expected fp32 [..., {k16}]")
    if not x.is_contiguous():
        x = x.contiguous()
    out = torch.empty(*x.shape[:-1], n)
    m = x.numel() // k16
    if _lib().linear(x.data_ptr(), m, k16, qweight.data_ptr(), n, scale.data_ptr(),
                     zero.data_ptr() if zero is not None else None, group,
                     bias.data_ptr() if bias is not None else None, out.data_ptr(), torch.get_num_threads()):
        raise RuntimeError(f"q4_linear failed for a {m}x{k16} input and {n}x{k16} weights")
    return out


def _q4_linear_torch(x, qweight, scale, zero, bias, group):
    from .packing import from_q4

    n, k16 = qweight.shape[0], qweight.shape[1] * 2
    u = from_q4(qweight, n, k16).float().view(n, k16 // group, group)
    z = zero.float().unsqueeze(-1) if zero is not None else 8.0
    w = ((u - z) * scale.unsqueeze(-1)).view(n, k16)
    return torch.nn.functional.linear(x.float(), w, bias)


def _i8_check(a, a_scale, w, w_scale):
    if not (a.dtype is w.dtype is torch.int8 and a.dim() == w.dim() == 2 and a.shape[1] == w.shape[1]
            and a_scale.dtype is w_scale.dtype is torch.float32 and a_scale.numel() == a.shape[0]
            and w_scale.numel() == w.shape[0]):
        raise ValueError(f"i8_linear: a {tuple(a.shape)} {a.dtype}, a_scale {tuple(a_scale.shape)}, w "
                         f"{tuple(w.shape)} {w.dtype}, w_scale {tuple(w_scale.shape)}: expected int8 [M, K], fp32 "
                         f"[M], int8 [N, K], fp32 [N]")


def _i8_linear(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """out [M, N] = (a [M, K] int8 @ w [N, K]^T int8, exact int32) * a_scale [M] * w_scale [N] (+ bias),
    each fp32 step rounded as torch rounds it (csrc/q4avx2.c i8_linear)."""
    _i8_check(a, a_scale, w, w_scale)
    a, w = a.contiguous(), w.contiguous()
    a_scale, w_scale = a_scale.contiguous(), w_scale.contiguous()
    out = torch.empty(a.shape[0], w.shape[0])
    if _lib().i8_linear(a.data_ptr(), a.shape[0], a.shape[1], w.data_ptr(), w.shape[0], a_scale.data_ptr(),
                        w_scale.data_ptr(), bias.contiguous().data_ptr() if bias is not None else None,
                        out.data_ptr(), torch.get_num_threads()):
        raise RuntimeError(f"i8_linear failed for a {tuple(a.shape)} input and {tuple(w.shape)} weights")
    return out


def _i8_linear_torch(a, a_scale, w, w_scale, bias):
    _i8_check(a, a_scale, w, w_scale)
    y = (a.long() @ w.long().t()).float().mul_(a_scale.reshape(-1, 1)).mul_(w_scale.reshape(-1))
    return y if bias is None else y.add_(bias)


def _lut_linear_torch(x, qweight, table, bits, layout, k, bn, bk, rowptr=None, index=None, value=None, bias=None):
    w = lut_weight(qweight, table, bits, layout, k, bn, bk)
    if index is not None:
        w = w.reshape(-1).index_add(0, index.long(), value.float()).view(w.shape)
    return torch.nn.functional.linear(x.float(), w, bias)


def _attention_torch(q, k, v, mask, scale):
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                           enable_gqa=q.shape[1] != k.shape[1])
    return out if out.is_contiguous() else out.contiguous()


def _fake_attention(q, k, v, mask, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=torch.float32)


def _fake_lut_linear(x, qweight, table, bits, layout, k, bn, bk, rowptr=None, index=None, value=None, bias=None):
    n = qweight.shape[-2] if layout == "bitplanes" else qweight.shape[0]
    return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)


def _dispatch(fast, slow):
    """The CPU kernel of an op: the C library where it is on now (native_on), else the torch fallback."""
    state = _state

    def impl(*args):
        if state.get("lib") is not None or q4() is not None:
            return fast(*args)
        return slow(*args)
    impl.__name__ = getattr(fast, "__name__", "impl")
    return impl


def _fake_token_quant(x, bits, codes):
    k = x.shape[-1]
    m = x.numel() // k if k != 0 else 0
    out = x.new_empty((m, k), dtype=torch.int8) if codes else x.new_empty(x.shape, dtype=torch.float32)
    return out, x.new_empty((m,), dtype=torch.float32)


def _fake_kv_load(codes, scales, n, bits, dtype=None):
    b, h, max_len, w = codes.shape
    n = max_len if n is None else torch.sym_min(n, max_len)
    return codes.new_empty((b, h, n, w * 2 if bits == 4 else w), dtype=dtype or torch.float32)


_IMPLS = {
    "token_quant": (lambda x, bits, codes: token_quant(x, bits, codes=codes), _token_quant_torch, _fake_token_quant),
    "rms_norm": (rms_norm, _rms_norm_torch, lambda x, weight, eps: x.new_empty(x.shape, dtype=torch.float32)),
    "rope": (rope, _rope_torch, lambda x, cos, sin: _rope_out(x)),
    "kv_store": (kv_store, _kv_store_torch, lambda k, pos, codes, scales, bits: None),
    "kv_load": (lambda c, s, n, bits, dtype=None: kv_load(c, s, n, bits, dtype or torch.float32), _kv_load_torch,
                _fake_kv_load),
    "q4_linear": (_q4_linear, _q4_linear_torch,
                  lambda x, qw, s, z, b, g: x.new_empty((*x.shape[:-1], qw.shape[0]), dtype=torch.float32)),
    "i8_linear": (_i8_linear, _i8_linear_torch,
                  lambda a, sa, w, ws, b: a.new_empty((a.shape[0], w.shape[0]), dtype=torch.float32)),
    "lut_linear": (lut_linear, _lut_linear_torch, _fake_lut_linear),
    "attention": (attention, _attention_torch, _fake_attention),
}


def _register() -> torch.library.Library | None:
    """Define the ops once per process (a reloaded module finds them defined and keeps the first kernels)."""
    try:
        getattr(torch.ops, NAMESPACE).rms_norm
        return None
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library(NAMESPACE, "DEF")
    for name, schema in SCHEMAS.items():
        fast, slow, fake = _IMPLS[name]
        lib.define(schema)
        lib.impl(name, _dispatch(fast, slow), "CPU")
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=lib)
    return lib


_LIBRARY = _register()                 # kept alive: the registrations last as long as this object
ops = getattr(torch.ops, NAMESPACE)    # ops.rms_norm.default etc.


def compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or "cc")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qpass" / "kernels"


def _writable_dir() -> Path:
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    for d in (cache_dir(), Path(tempfile.gettempdir()) / f"qpass-kernels-{user}"):
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    raise OSError(f"no writable folder for compiled kernels (tried {cache_dir()})")


def _build_and_load() -> tuple[Q4Library | None, str]:
    try:
        src = SOURCE.read_bytes()
    except OSError as e:
        return None, f"source missing ({e})"
    errors = []
    for extra in (OPENMP, ()):
        cmd = [*compiler(), *FLAGS, *extra]
        try:
            lib = _load_or_build(cmd, library_path(cmd, src))
            _self_check(lib)
            return lib, ""
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            errors.append(f"{' '.join(cmd)}: {str(e).strip()[-500:]}")
    return None, "; ".join(errors)


def library_path(cmd: list[str], src: bytes) -> Path:
    """Where the library built from `src` by `cmd` is cached (the name hashes both and the machine type)."""
    key = hashlib.sha256(src + "\0".join([*cmd, platform.machine()]).encode()).hexdigest()[:16]
    return _writable_dir() / f"q4avx2-{key}.so"


def _load_or_build(cmd: list[str], path: Path) -> Q4Library:
    if path.is_file():
        try:
            return Q4Library(str(path))
        except OSError as e:                     # e.g. truncated by a full disk: build it again
            log.debug("cached kernel %s unusable (%s), rebuilding", path, e)
    _compile(cmd, path)
    return Q4Library(str(path))


def _compile(cmd: list[str], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp.so", dir=path.parent)
    os.close(fd)
    try:
        proc = subprocess.run([*cmd, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise OSError(f"exit {proc.returncode}: {proc.stderr}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _self_check(lib: Q4Library) -> None:
    """A small product on both code paths against float math: a miscompiled library is never used."""
    from .packing import to_q4

    g = torch.Generator().manual_seed(0)
    n, k, group = 7, 64, 32
    u = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    s = torch.randn(n, k // group, generator=g)
    z = torch.randint(0, 16, (n, k // group), dtype=torch.uint8, generator=g)
    x = torch.randn(5, k, generator=g)
    w = (u.float().view(n, -1, group) - z.float().unsqueeze(-1)).mul(s.unsqueeze(-1)).view(n, k)
    ref = x @ w.t()
    qw = to_q4(u)
    for path in (0, 1):
        for m in (1, 5):
            out = torch.empty(m, n)
            rc = lib.path(path, x.data_ptr(), m, k, qw.data_ptr(), n, s.data_ptr(), z.data_ptr(), group, None,
                          out.data_ptr(), 1)
            if rc != 0 or not torch.allclose(out, ref[:m], rtol=1e-4, atol=1e-4):
                raise ValueError(f"self-check failed (path {path}, M={m}, rc={rc})")
    deq = torch.full((3, k + 1), 7.0)                        # q4_dequant: rows 4..6 (the partial block), 50 columns
    rc = lib.dequant(qw.data_ptr(), n, k, s.data_ptr(), z.data_ptr(), group, 4, 7, 50, deq.data_ptr(), k + 1, 1)
    if rc != 0 or not (torch.equal(deq[:, :50], w[4:7, :50]) and (deq[:, 50:] == 7.0).all()):
        raise ValueError(f"self-check failed (q4_dequant, rc={rc})")
    k = 45                                                   # i8_linear: a 16-column tail, codes at -128
    a = torch.randint(-128, 128, (3, k), dtype=torch.int8, generator=g)
    w8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    a[0, 0], w8[0, 0] = -128, -128
    sa, ws = torch.rand(3, generator=g), torch.rand(n, generator=g)
    ref = (a.long() @ w8.long().t()).float() * sa[:, None] * ws
    out = torch.empty(3, n)
    rc = lib.i8_linear(a.data_ptr(), 3, k, w8.data_ptr(), n, sa.data_ptr(), ws.data_ptr(), None, out.data_ptr(), 1)
    if rc != 0 or not torch.allclose(out, ref, rtol=1e-6, atol=0):
        raise ValueError(f"self-check failed (i8_linear, rc={rc})")
    for zc in (None, torch.randint(-128, 128, (n,), dtype=torch.int32, generator=g)):   # w8_linear, K tail of 13
        x = torch.randn(3, k, generator=g)
        ref = x @ ((w8.int() - (zc[:, None] if zc is not None else 0)).float() * ws[:, None]).t()
        out = torch.empty(3, n)
        rc = lib.w8_linear(x.data_ptr(), 3, k, w8.data_ptr(), n, ws.data_ptr(),
                           zc.data_ptr() if zc is not None else None, None, out.data_ptr(), 1)
        if rc != 0 or not torch.allclose(out, ref, rtol=1e-4, atol=1e-4):
            raise ValueError(f"self-check failed (w8_linear, rc={rc})")
    _self_check_lut(lib, g)
    _self_check_ops(lib, g)


def _self_check_lut(lib: Q4Library, g: torch.Generator) -> None:
    """lut_linear on every (layout, bits), per-row and per-group tables, a K % 8 tail and sparse values,
    against the torch decode + matmul."""
    from .packing import pack_bitplanes, pack_dense, pack_dense3

    n, k = 5, 45
    x = torch.randn(3, k, generator=g)
    for layout, bits in (("dense", 1), ("dense", 2), ("dense", 4), ("dense3", 3), ("bitplanes", 3)):
        u = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=g)
        qw = pack_dense(u, bits) if layout == "dense" else pack_dense3(u) if layout == "dense3" else \
            pack_bitplanes(u, bits)
        for sk, bk in ((1, k), (3, 16)):
            table = torch.randn(n, sk, 16 if bits == 4 else 8, generator=g)
            index = torch.tensor([3, 50, 51, 4 * k + 44], dtype=torch.int32)
            value = torch.randn(4, generator=g)
            rowptr = torch.searchsorted(index, torch.arange(n + 1, dtype=torch.int32) * k).long()
            w = lut_weight(qw, table, bits, layout, k, 1, bk).reshape(-1).index_add(0, index.long(), value)
            ref = x @ w.view(n, k).t()
            out = torch.empty(3, n)
            rc = lib.lut_linear(x.data_ptr(), 3, k, qw.data_ptr(), n, LUT_LAYOUTS[layout], bits, table.data_ptr(),
                                n, sk, 1, bk, rowptr.data_ptr(), index.data_ptr(), value.data_ptr(), None,
                                out.data_ptr(), 1)
            if rc != 0 or not torch.allclose(out, ref, rtol=1e-4, atol=1e-4):
                raise ValueError(f"self-check failed (lut_linear {layout} {bits} bits, {sk} groups, rc={rc})")


def _self_check_ops(lib: Q4Library, g: torch.Generator) -> None:
    """token_quant, rms_norm and rope against their torch compositions, bit for bit (rms_norm on small
    integers, whose sums of squares are exact in fp32): 45 columns, so the 8-wide loops and the masked tails
    both run."""
    k = 45
    x = torch.randn(4, k, generator=g) * torch.tensor([[1e-3], [1.0], [30.0], [0.0]])
    x[1, :10] = torch.arange(10) + 0.5                      # ties at 8 bits: s = 127 / 127 = 1 in row 1
    x[1, 10] = 127.0
    for bits in (4, 8):
        lo, hi = _QRANGE[bits]
        s = x.abs().amax(-1, keepdim=True).div_(hi).clamp_(min=1e-12)
        q = (x / s).round_().clamp_(lo, hi)
        codes, fq, sc = torch.empty(4, k, dtype=torch.int8), torch.empty(4, k), torch.empty(4)
        rc = lib.token_quant(x.data_ptr(), 4, k, lo, hi, codes.data_ptr(), fq.data_ptr(), sc.data_ptr())
        if rc != 0 or not (torch.equal(codes, q.to(torch.int8)) and torch.equal(fq, q * s)
                           and torch.equal(sc, s.view(-1))):
            raise ValueError(f"self-check failed (token_quant, {bits} bits, rc={rc})")
    x = torch.randint(-8, 9, (3, k), generator=g).float()
    w = torch.randn(k, generator=g)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    out = torch.empty(3, k)
    rc = lib.rms_norm(x.data_ptr(), 3, k, w.data_ptr(), 1e-6, out.data_ptr())
    if rc != 0 or not torch.equal(out, ref):
        raise ValueError(f"self-check failed (rms_norm, rc={rc})")
    b, h, t, d = 2, 3, 4, 20                                 # half = 10: one 8-wide step and a scalar tail
    x = torch.randn(b, t, h, d, generator=g).transpose(1, 2)
    cos, sin = torch.randn(b, t, d, generator=g), torch.randn(b, t, d, generator=g)
    ref = x * cos[:, None] + torch.cat((-x[..., d // 2:], x[..., :d // 2]), -1) * sin[:, None]
    out = torch.empty(b, t, h, d)
    rc = lib.rope(x.data_ptr(), b, h, t, d, *x.stride()[:3], cos.data_ptr(), sin.data_ptr(), out.data_ptr())
    if rc != 0 or not torch.equal(out.transpose(1, 2), ref):
        raise ValueError(f"self-check failed (rope, rc={rc})")
    _self_check_kv(lib, g)


def _self_check_kv(lib: Q4Library, g: torch.Generator) -> None:
    """kv_store then kv_load against the torch formulas (PackedKVCache's torch path), bit for bit: rows of 22
    columns (the 16- and 8-wide loops and their tails), a transposed input, two positions of 5 slots, a row of
    exact .5 ties and one holding inf."""
    b, h, t, d, slots = 2, 3, 2, 22, 5
    x = (torch.randn(b, t, h, d, generator=g) * torch.rand(b, t, h, 1, generator=g) * 10).transpose(1, 2)
    x[0, 1, 0] = 0.25 * (torch.arange(d) % 14 - 7 + 0.5)                   # s = 7 * 0.25 / 7: ties at 4 bits
    x[0, 1, 0, 0] = 1.75
    x[1, 2, 1, 3] = float("inf")
    pos = torch.tensor([3, 1])
    for bits, shared in ((4, 0), (8, 0), (4, 1), (8, 1)):        # shared: one scale per token over all heads
        lo, hi = _QRANGE[bits]
        s = x.abs().amax((1, 3) if shared else -1, keepdim=True).div_(hi).clamp_(min=1e-12)
        q = (x / s).round_().clamp_(lo, hi).nan_to_num_(0.0).to(torch.int8)     # the inf row: codes 0
        width = d // 2 if bits == 4 else d
        codes = torch.zeros(b, h, slots, width, dtype=torch.uint8)
        scales = torch.zeros(b, 1 if shared else h, slots, 1)
        ref_codes, ref_scales = codes.clone(), scales.clone()
        u = (q.to(torch.int16) + 8).to(torch.uint8) if bits == 4 else q.view(torch.uint8)
        ref_codes[:, :, pos] = u[..., 0::2] | (u[..., 1::2] << 4) if bits == 4 else u
        ref_scales[:, :, pos] = s
        rc = lib.kv_store(x.data_ptr(), b, h, t, d, *x.stride()[:3], pos.data_ptr(), slots, bits, shared,
                          codes.data_ptr(), scales.data_ptr())
        out = torch.empty(b, h, 4, d)
        rc2 = lib.kv_load(codes.data_ptr(), scales.data_ptr(), b * h, slots, 4, d, bits, h if shared else 1,
                          out.data_ptr())
        c = ref_codes[:, :, :4]
        ref_q = c.view(torch.int8) if bits == 8 else \
            torch.stack([c & 15, c >> 4], -1).view(b, h, 4, d).to(torch.int8) - 8
        ref_out = ref_q * ref_scales[:, :, :4]
        if rc != 0 or rc2 != 0 or not (torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
                                      and torch.equal(out.nan_to_num(7.0), ref_out.nan_to_num(7.0))
                                      and out[1, 2, 1].isnan().all()):
            raise ValueError(f"self-check failed (kv_store / kv_load, {bits} bits, shared {shared}, rc={rc}, {rc2})")
