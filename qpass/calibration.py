"""Calibration: normalize user data, run it through a graph, and collect statistics on chosen nodes.

``observe`` runs the calibration set through the graph ONCE per call, with temporary observer modules
attached to the requested nodes (all statistics a pass asks for are collected in that one run), then
removes them, leaving the graph as it was.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node
from tqdm.auto import tqdm

from .errors import CalibrationError

log = logging.getLogger("qpass.calibration")


class CalibrationSet:
    """A list of positional-input tuples, made from an iterable of token-id tensors ([seq] or
    [batch, seq]), dicts with ``input_ids``, or tuples of positional inputs (non-HF graphs)."""

    def __init__(self, data: Iterable[Any]):
        if isinstance(data, (torch.Tensor, Mapping, str, bytes)):
            raise CalibrationError(f"calib_data must be an iterable of samples, got one {type(data).__name__}",
                                   fix="wrap it in a list: calib_data=[input_ids]")
        self.samples: list[tuple] = [self._one(i, item) for i, item in enumerate(data)]

    def __len__(self) -> int:
        return len(self.samples)

    @staticmethod
    def _one(i: int, item: Any) -> tuple:
        if isinstance(item, torch.Tensor):
            return (item.unsqueeze(0) if item.dim() == 1 and not item.is_floating_point() else item,)
        if isinstance(item, Mapping):
            if "input_ids" not in item:
                raise CalibrationError(f"calib_data[{i}] is a dict without 'input_ids' (keys: {sorted(item)})",
                                       fix="give {'input_ids': LongTensor[batch, seq]} or plain tensors")
            mask = item.get("attention_mask")
            extra = set(item) - {"input_ids", "attention_mask"}
            if extra or (mask is not None and not bool(torch.all(torch.as_tensor(mask) == 1))):
                raise CalibrationError(
                    f"calib_data[{i}] has {sorted(extra) or 'a padding attention_mask'}: the captured graph "
                    "takes input_ids only", fix="calibrate on unpadded sequences (one per sample, or equal lengths)")
            return CalibrationSet._one(i, torch.as_tensor(item["input_ids"]))
        if isinstance(item, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in item):
            return tuple(item)
        raise CalibrationError(f"calib_data[{i}] is a {type(item).__name__}; expected a tensor, a dict with "
                               "'input_ids', or a tuple of tensors")


def logits_of(out: Any) -> torch.Tensor:
    """The main output of a graph call: `.logits` of an HF output, the tensor itself, or the first item."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise CalibrationError(f"cannot find the output tensor in a {type(out).__name__}")


@torch.no_grad()
def run_graph(gm: GraphModule, sample: tuple) -> torch.Tensor:
    return logits_of(gm(*sample))


class _Tap(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], None]):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        self.fn(x.detach())
        return x


def observe(gm: GraphModule, nodes: Mapping[Any, Node], make: Callable[[Any, Node], Any],
            calib: CalibrationSet, *, desc: str = "calibrating", progress: bool = True) -> dict[Any, Any]:
    """Attach ``make(key, node)`` observers (objects with ``update(tensor)``) to `nodes`, run every
    calibration sample once, detach them; return {key: observer}."""
    observers = {key: make(key, node) for key, node in nodes.items()}
    taps = []
    try:
        for i, (key, node) in enumerate(nodes.items()):
            name = f"_qpass_tap_{i}"
            gm.add_submodule(name, _Tap(observers[key].update))
            with gm.graph.inserting_after(node):
                taps.append((name, gm.graph.call_module(name, (node,))))
        gm.recompile()
        for sample in tqdm(calib.samples, desc=desc, disable=not progress, leave=False):
            run_graph(gm, sample)
    finally:
        for name, tap in taps:
            gm.graph.erase_node(tap)
            gm.delete_submodule(name)
        gm.recompile()
    log.info("%s: %d samples, %d observed nodes", desc, len(calib), len(nodes))
    return observers
