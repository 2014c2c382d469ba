"""``PackedEmbedding``: an embedding lookup that reads the packed codes of the linear it is tied to.

A quantize pass with ``tied_embedding: shared`` makes the lookup of a tied table read the tied linear's weight
quantizer (``embedding(fake_quantize(W, ...), ids)``). Lowered, the table is the linear's ``PackedLinear``:
this module gathers the rows ``ids`` of its codes and of its per-row / per-group scales and dequantizes only
those rows (``PackedLinear.gather``), so the model holds one integer copy of the table and no float one.

It owns no tensors: the linear is held as a plain attribute (not a submodule), so the state dict, the saved
files and ``weight_bytes`` count the codes once, under the linear's names.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .linear import PackedLinear


class PackedEmbedding(nn.Module):
    """``embedding(dequantized W, ids)`` with W the packed weight of `linear` (its name: `source`)."""

    def __init__(self, linear: PackedLinear, source: str, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.__dict__["linear"] = linear          # NOTE: not registered: its tensors are the linear's, saved once
        self.source, self.dtype = source, dtype

    def forward(self, ids: Tensor) -> Tensor:
        y = self.linear.gather(ids)
        return y if y.dtype == self.dtype else y.to(self.dtype)

    def extra_repr(self) -> str:
        return f"rows of {self.source} ({self.linear.wf.n} x {self.linear.wf.k}, {self.linear.wf.describe()})"
