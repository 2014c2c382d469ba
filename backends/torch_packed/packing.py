"""Bit packing of quantization codes: pure tensor functions, no graphs and no modules.

Codes here are *storage codes*: unsigned integers ``u`` in ``[0, 2^bits)`` laid out ``[N, K]`` (output rows,
input columns). Four layouts:

* ``dense``     bits in {1, 2, 4}: ``8 // bits`` codes per byte along K, the first code in the lowest bits
                (int4: two codes per byte, low nibble = even column). ``[N, ceil(K * bits / 8)]`` uint8.
* ``dense3``    3 bits: 8 codes in 3 bytes along K (a little-endian 24-bit word, code i at bits 3i .. 3i + 2),
                ``[N, 3 * ceil(K / 8)]`` uint8: exactly 3 bits per code, and 8 codes are one shift apart (the
                codebook kernel, csrc/q4avx2.c ``lut_linear``, decodes them with one load and one shift).
* ``bitplanes`` any bits in 1..8: plane ``j`` holds bit ``j`` of every code, 8 codes per byte along K
                (first code in bit 0). ``[bits, N, ceil(K / 8)]`` uint8; exactly ``bits`` bits per code, so
                3-, 5-, 6- and 7-bit codes waste nothing.
* ``int4pack``  the layout ``aten._convert_weight_to_int4pack_for_cpu`` produces for the running CPU
                (it depends on the vector ISA torch dispatches to: blocks of 64 output rows on AVX512, 32 on
                AVX2). :func:`to_int4pack` calls that op; :func:`from_int4pack` is its inverse, written
                from the kernel's packing loop and checked once per process by :func:`int4pack_supported`
                (a probe round trip), so a layout this module does not know is never used.
* ``q4``        int4 for our own kernel (csrc/q4avx2.c): K a multiple of 16, rows in blocks of 4 (the last
                block holds the N % 4 remaining rows). Block b starts at byte ``4b * K/2``; in it, the
                16-column chunk c of row r is the 8 bytes at ``(c * R + r) * 8`` (R rows in the block), byte j
                holding column ``16c + j`` in its low nibble and ``16c + 8 + j`` in its high nibble: an 8-byte
                load widened to 8 lanes gives 8 + 8 columns without shuffles, and a block is one sequential
                stream. ``[N, K/2]`` uint8 (the row index is nominal: bytes are interleaved within blocks).
"""
from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

log = logging.getLogger("qpass.backends.torch_packed")
aten = torch.ops.aten

DENSE_BITS = (1, 2, 4)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _pad_cols(u: Tensor, multiple: int) -> Tensor:
    extra = _ceil(u.shape[-1], multiple) * multiple - u.shape[-1]
    return torch.nn.functional.pad(u, (0, extra)) if extra else u


# ------------------------------------------------------------------------------------------ dense


def pack_dense(u: Tensor, bits: int) -> Tensor:
    """[N, K] codes < 2^bits -> [N, ceil(K*bits/8)] uint8, 8 // bits codes per byte (first in the low bits)."""
    per = 8 // bits
    v = _pad_cols(u.to(torch.uint8), per)
    v = v.view(v.shape[0], -1, per)
    out = v[..., 0].clone(memory_format=torch.contiguous_format)
    for i in range(1, per):
        out |= v[..., i] << (i * bits)
    return out


def unpack_dense(packed: Tensor, bits: int, k: int) -> Tensor:
    """Inverse of :func:`pack_dense`: [N, k] uint8 codes."""
    per, mask = 8 // bits, (1 << bits) - 1
    if bits == 4:                                   # the common case: two vectorized passes, no broadcast
        u = torch.stack([packed & 15, packed >> 4], -1)
    else:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        u = (packed.unsqueeze(-1) >> shifts) & mask
    u = u.reshape(packed.shape[0], per * packed.shape[1])
    return u[:, :k] if u.shape[1] != k else u


def pack_dense3(u: Tensor) -> Tensor:
    """[N, K] codes < 8 -> [N, 3 * ceil(K / 8)] uint8: 8 codes per 3 bytes, code i of a group at bits 3i."""
    v = _pad_cols(u.to(torch.int32), 8)
    v = v.view(v.shape[0], -1, 8)
    word = (v << (3 * torch.arange(8, dtype=torch.int32, device=u.device))).sum(-1)
    return torch.stack([(word >> s) & 255 for s in (0, 8, 16)], -1).to(torch.uint8).reshape(u.shape[0], -1)


def unpack_dense3(packed: Tensor, k: int) -> Tensor:
    """Inverse of :func:`pack_dense3`: [N, k] uint8 codes."""
    b = packed.view(packed.shape[0], -1, 3).to(torch.int32)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    u = (word.unsqueeze(-1) >> (3 * torch.arange(8, dtype=torch.int32, device=packed.device))) & 7
    return u.to(torch.uint8).reshape(packed.shape[0], -1)[:, :k]


# -------------------------------------------------------------------------------------- bitplanes


def pack_bitplanes(u: Tensor, bits: int) -> Tensor:
    """[N, K] codes < 2^bits -> [bits, N, ceil(K/8)] uint8 bit planes."""
    v = _pad_cols(u.to(torch.uint8), 8)
    v = v.view(v.shape[0], -1, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=u.device))
    planes = [(((v >> j) & 1).to(torch.int32) * weights).sum(-1).to(torch.uint8) for j in range(bits)]
    return torch.stack(planes)


def unpack_bitplanes(planes: Tensor, bits: int, k: int) -> Tensor:
    """Inverse of :func:`pack_bitplanes`: [N, k] uint8 codes."""
    shifts = torch.arange(8, dtype=torch.uint8, device=planes.device)
    u = None
    for j in range(bits):
        b = ((planes[j].unsqueeze(-1) >> shifts) & 1) << j
        u = b if u is None else u | b
    return u.reshape(planes.shape[1], -1)[:, :k]


# --------------------------------------------------------------------------------------- int4pack

INT4PACK_GROUPS = (32, 64, 128, 256)


def _int4pack_block() -> tuple[int, bool]:
    """(rows per block, 'split' packing of full blocks) for the ISA torch dispatches to on this CPU.
    From aten/src/ATen/native/cpu/int4mm_kernel.cpp: BLOCK_N = 4 float vectors; full blocks on AVX512 /
    AVX2 pair row j with row j + BLOCK_N/2 in one byte, partial blocks (and the default ISA) pair rows
    2j and 2j+1."""
    cap = torch.backends.cpu.get_cpu_capability()
    if cap == "AVX512":
        return 64, True
    if cap == "AVX2":
        return 32, True
    return 32, False


def to_int4pack(u: Tensor) -> Tensor:
    """[N, K] 4-bit codes (N % 16 == 0, K even) -> the CPU int4pack layout (an [N, K/2] uint8 tensor)."""
    return aten._convert_weight_to_int4pack_for_cpu(u.to(torch.int32).contiguous(), 1)


def from_int4pack(packed: Tensor, n: int, k: int) -> Tensor:
    """Inverse of :func:`to_int4pack` for this CPU: [n, k] uint8 codes."""
    block, split = _int4pack_block()
    flat = packed.reshape(-1)
    full, rem = divmod(n, block)
    parts = []
    if full:
        b = flat[: full * k * block // 2].view(full, k, block // 2)
        lo, hi = b & 15, b >> 4
        rows = torch.cat([lo, hi], -1) if split else torch.stack([lo, hi], -1).view(full, k, block)
        parts.append(rows.permute(0, 2, 1).reshape(full * block, k))
    if rem:
        b = flat[full * k * block // 2:].view(k, rem // 2)
        parts.append(torch.stack([b & 15, b >> 4], -1).view(k, rem).t())
    return torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()


def int4pack_rows() -> int:
    """Rows per block of this CPU's int4pack layout (a slice of whole blocks unpacks on its own)."""
    return _int4pack_block()[0]


@functools.lru_cache(maxsize=None)
def int4pack_supported() -> bool:
    """True when the int4pack kernels run here and :func:`from_int4pack` inverts the layout exactly."""
    try:
        block, _ = _int4pack_block()
        n, k = block + 16, 64        # one full block and one partial block
        u = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        ok = torch.equal(from_int4pack(to_int4pack(u), n, k), u)
    except (RuntimeError, NotImplementedError) as e:   # op missing on this build / device
        log.info("int4pack kernels unavailable: %s", e)
        return False
    if not ok:
        log.warning("the int4pack weight layout of this CPU (%s) is not the one qpass knows; int4 weights "
                    "use the generic kernel", torch.backends.cpu.get_cpu_capability())
    return ok


# --------------------------------------------------------------------------------------------- q4

Q4_BLOCK = 4


def to_q4(u: Tensor) -> Tensor:
    """[N, K] 4-bit codes (K % 16 == 0) -> the q4 layout, [N, K/2] uint8."""
    n, k = u.shape
    c, full = k // 16, n // Q4_BLOCK * Q4_BLOCK
    b = u.to(torch.uint8).reshape(n, c, 2, 8)
    b = b[:, :, 0] | (b[:, :, 1] << 4)                                   # [N, chunks, 8]
    parts = [b[:full].view(full // Q4_BLOCK, Q4_BLOCK, c, 8).transpose(1, 2).reshape(-1)]
    if full < n:
        parts.append(b[full:].transpose(0, 1).reshape(-1))
    return torch.cat(parts).view(n, k // 2)


def from_q4(packed: Tensor, n: int, k: int) -> Tensor:
    """Inverse of :func:`to_q4` for ``n`` rows starting at a block boundary: [n, k] uint8 codes."""
    c, full = k // 16, n // Q4_BLOCK * Q4_BLOCK
    flat = packed.reshape(-1)
    parts = [flat[: full * k // 2].view(full // Q4_BLOCK, c, Q4_BLOCK, 8).transpose(1, 2).reshape(full, c, 8)]
    if full < n:
        parts.append(flat[full * k // 2:].view(c, n - full, 8).transpose(0, 1))
    b = torch.cat(parts) if len(parts) > 1 else parts[0]
    return torch.stack([b & 15, b >> 4], 2).reshape(n, k)
