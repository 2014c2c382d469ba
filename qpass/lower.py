"""``qpass.lower(qm, backend, ...)``: hand a QuantizedModel to a backend by name (one table, no scanning)."""
from __future__ import annotations

import importlib

from .errors import UnsupportedOpError, suggest

# backend name -> module with `lower(qm, **options)`
BACKENDS = {"torch": "qpass.backends.torch_packed", "onnx": "qpass.backends.onnx_qdq"}


def lower(qm, backend: str, *args, **options):
    """Lower a QuantizedModel: ``lower(qm, "torch")`` -> packed torch model; ``lower(qm, "onnx", out_dir)``."""
    if backend not in BACKENDS:
        close = suggest(backend, BACKENDS)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnsupportedOpError(f"unknown backend {backend!r}{hint}", fix=f"use one of {sorted(BACKENDS)}")
    try:
        module = importlib.import_module(BACKENDS[backend])
    except ImportError as e:
        raise UnsupportedOpError(f"backend {backend!r} is not available: {e}",
                                 fix="install its extras (pip install 'qpass[onnx]' for onnx)") from e
    return module.lower(qm, *args, **options)
