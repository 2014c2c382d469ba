"""What differs between the transformers 5.x releases qpass supports, in one place.

transformers 5.25 renamed the KV-cache argument and output of every causal LM from ``past_key_values`` to
``cache`` (the old name still works until 5.40 but warns with a FutureWarning on every call). Callers that
run an eager HF model with a cache pass it through :func:`cache_kwargs` and read it back with
:func:`output_cache`, so the same code runs warning-free on 5.0–5.24 and on 5.25+.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn


@functools.lru_cache(maxsize=None)
def _cache_arg(forward_type: type) -> str:
    params = inspect.signature(forward_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``: whichever `model.forward` takes."""
    return {_cache_arg(type(model)): cache}


def output_cache(out: Any) -> Any:
    """The cache a model output carries (``out.cache`` on transformers >= 5.25, else ``out.past_key_values``)."""
    keys = out.keys() if hasattr(out, "keys") else ()
    return out["cache"] if "cache" in keys else out.past_key_values


__all__ = ["cache_kwargs", "output_cache"]
