"""Large packed weights on transparent huge pages (Linux).

A decode step streams every weight once, hundreds of MB at model size. On 4 KB pages that is tens of thousands
of pages per token: each one a TLB miss for the kernel, and the stream evicts every other translation, so the
graph's own small ops (norms, RoPE, attention, the interpreter) then miss the TLB as well. Backed by 2 MB pages,
the same stream touches a few hundred. Measured on the 0.5 B synthetic Llama of tools/bench_size.py, W4A16 +
lm_head int4, one thread, one process alternating the same weights on 4 KB and 2 MB pages (scratch A/B, medians
of 7): 19.27 -> 18.73 ms per token (-2.8%). llama.cpp gets the same effect from mmap'ing its model file.

``place(root)`` moves the buffers of the packed modules (PackedLinear, CodebookLinear) of at least
``MIN_BYTES`` into anonymous mappings advised ``MADV_HUGEPAGE`` (2 MB aligned) and rebinds their kernels; the
values are copied bit for bit. Where the kernel has transparent huge pages set to ``never``, off Linux, or with
``QPASS_HUGE_PAGES=0`` in the environment it does nothing (``available()``). Tensors the lowered model shares
with the QuantizedModel (an lm_head left in float, embeddings) are not moved: moving them would copy them.
The mappings are ordinary CPU tensors (torch.frombuffer): saving, moving to another device and copying work as
for any tensor; the memory is returned when the last tensor viewing it goes. Cost: each moved tensor may hold up
to one huge page more than its size (the kernel backs the last, partial 2 MB of the mapping with a whole page),
so at most 2 MB per moved tensor of at least 2 MB; each gets its own mapping so that no two tensors share storage
(safetensors refuses to save tensors that do).
"""
from __future__ import annotations

import mmap
import os
import sys

import torch
from torch import nn

HUGE = 2 << 20                    # the x86-64 huge page size: mappings are aligned to it
MIN_BYTES = HUGE                  # tensors smaller than one huge page stay where they are
ENV = "QPASS_HUGE_PAGES"          # "0": never move


def available() -> bool:
    """Transparent huge pages can back an advised mapping here (Linux, THP not 'never', not switched off)."""
    if os.environ.get(ENV, "1") == "0" or sys.platform != "linux" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def to_huge(t: torch.Tensor) -> torch.Tensor:
    """A copy of contiguous CPU tensor `t` in a 2 MB-aligned anonymous mapping advised MADV_HUGEPAGE (the kernel
    backs it with huge pages as it is first written, where it has them free)."""
    n = t.numel() * t.element_size()
    mm = mmap.mmap(-1, n + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mm.madvise(mmap.MADV_HUGEPAGE)
    base = torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr()
    out = torch.frombuffer(mm, dtype=torch.uint8, count=n, offset=(-base) % HUGE)   # keeps `mm` alive
    out = out.view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def place(root: nn.Module) -> int:
    """Move the large buffers of the packed modules under `root` onto huge pages (see the module doc); returns
    the bytes moved (0 where not ``available()``)."""
    if not available():
        return 0
    from .codebook import CodebookLinear
    from .linear import PackedLinear

    moved = 0
    for mod in root.modules():
        if not isinstance(mod, (PackedLinear, CodebookLinear)):
            continue
        changed = False
        for name, t in list(mod._buffers.items()):
            if (t is None or t.device.type != "cpu" or not t.is_contiguous() or t.requires_grad
                    or t.numel() * t.element_size() < MIN_BYTES):
                continue
            mod._buffers[name] = to_huge(t)
            moved += t.numel() * t.element_size()
            changed = True
        if changed and getattr(mod, "_runners", None):
            mod._bind()                    # the bound kernels hold the old tensors' pointers
    return moved


__all__ = ["available", "to_huge", "place", "HUGE", "MIN_BYTES", "ENV"]
