"""Calibration: normalize user data, run it through a graph, and collect statistics on chosen nodes.

``observe`` runs the calibration set through the graph ONCE per call, with temporary observer modules
attached to the requested nodes (all statistics a pass asks for are collected in that one run), then
removes them, leaving the graph as it was.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node
from tqdm.auto import tqdm

from .errors import CalibrationError
from .graph import META_CAPTURE, module_path
from .patterns import LAYOUT

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

    def check(self, gm: GraphModule) -> None:
        """Refuse, before any pass runs, samples the graph cannot take (see :func:`check_inputs`)."""
        check_inputs(self.samples, gm)

    @staticmethod
    def _one(i: int, item: Any) -> tuple:
        if isinstance(item, torch.Tensor):
            if item.numel() == 0:
                raise CalibrationError(f"calib_data[{i}] is empty (shape {list(item.shape)})",
                                       fix="drop empty samples; each needs at least one token")
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
        if isinstance(item, (tuple, list)) and item and all(isinstance(t, torch.Tensor) for t in item):
            return tuple(item)
        raise CalibrationError(f"calib_data[{i}] is a {type(item).__name__}; expected a tensor, a dict with "
                               "'input_ids', or a tuple of tensors")


@dataclass(frozen=True)
class GraphInput:
    """One input of a captured graph: what it accepts, read from the graph itself (so it holds for any model,
    Hugging Face or not, in memory or on disk)."""

    name: str
    dtype: torch.dtype
    sizes: tuple[tuple[int, int | None], ...]   # (min, max) size per dimension; max None: unbounded
    vocab_size: int | None = None                # rows of the embedding this input indexes (token ids)
    embedding: str = ""                          # that embedding's module path


def graph_inputs(gm: GraphModule) -> list[GraphInput]:
    """The graph's inputs (placeholders) with their dtypes, the size range of every dimension (torch.export's
    dynamic-shape ranges: for a Hugging Face graph the sequence length is at most max_position_embeddings) and,
    for token ids, the number of rows of the embedding they index. Empty for a graph whose placeholders carry
    no example values (torch.fx.symbolic_trace): nothing is known about its inputs."""
    ranges = getattr(gm, "range_constraints", None) or {}
    out = []
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):   # not from torch.export (symbolic_trace): nothing is known
            return []
        sizes = tuple(_size_range(d, ranges) for d in val.shape)
        vocab, path = _embedding_of(gm, node)
        out.append(GraphInput(node.name, val.dtype, sizes, vocab, path))
    return out


def sequence_limit(gm: GraphModule) -> tuple[int | None, str]:
    """(most tokens per sequence the graph takes, why) for a graph called with [batch, seq] token ids; the
    limit is None when there is none or the graph takes something else."""
    inputs = graph_inputs(gm)
    if len(inputs) != 1 or len(inputs[0].sizes) != 2 or inputs[0].vocab_size is None:
        return None, ""
    why = gm.meta.get(META_CAPTURE, {}).get("seq_note") or "its max_position_embeddings"
    return inputs[0].sizes[1][1], why


def _size_range(d, ranges) -> tuple[int, int | None]:
    if not isinstance(d, torch.SymInt):
        return int(d), int(d)
    expr = d.node.expr
    rng = ranges.get(expr) or d.node.shape_env.var_to_range.get(expr)
    if rng is None:
        return 1, None
    lower = int(rng.lower) if expr in ranges else 1   # the shape env's own lower bound is 2 (0/1 specialization)
    try:
        return lower, int(rng.upper)
    except (TypeError, ValueError, OverflowError):    # unbounded
        return lower, None


_INDEX_VIEWS = LAYOUT   # token ids moved, never changed


def _embedding_of(gm: GraphModule, placeholder: Node) -> tuple[int | None, str]:
    """(rows, module path) of the first embedding whose indices are `placeholder` (through views only)."""
    todo, seen = [placeholder], set()
    while todo:
        n = todo.pop(0)
        for user in n.users:
            if user in seen:
                continue
            seen.add(user)
            if user.target is torch.ops.aten.embedding.default and len(user.args) > 1 and user.args[1] is n:
                w = user.args[0]
                val = w.meta.get("val") if isinstance(w, Node) else None
                shape = val.shape if isinstance(val, torch.Tensor) else getattr(_attr(gm, w), "shape", None)
                return (int(shape[0]) if shape else None), module_path(gm, user)
            if user.target in _INDEX_VIEWS and user.args and user.args[0] is n:
                todo.append(user)
    return None, ""


def _attr(gm: GraphModule, node: Any):
    if not isinstance(node, Node) or node.op != "get_attr":
        return None
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part, None)
    return obj


def check_inputs(samples: list[tuple], gm: GraphModule, *, label: str = "calib_data[{i}]") -> None:
    """Raise CalibrationError naming the sample (`label` formatted with its index) and the limit for the first
    sample the graph cannot take: wrong number of tensors, rank or dtype, a size outside what the graph
    accepts (sequence longer than the model's positions, a batch too large) or a token id outside the
    vocabulary (negative, or >= the embedding's rows)."""
    inputs = graph_inputs(gm)
    if not inputs:
        return
    hf = gm.meta.get(META_CAPTURE, {}).get("hf", False)
    why = sequence_limit(gm)[1]
    for i, sample in enumerate(samples):
        where = label.format(i=i)
        if len(sample) != len(inputs):
            raise CalibrationError(f"{where} has {len(sample)} tensor(s); the graph takes {len(inputs)} "
                                   f"({', '.join(x.name for x in inputs)})",
                                   fix="give one tensor per graph input, as the model was captured")
        for x, spec in zip(sample, inputs):
            what = where if len(inputs) == 1 else f"{where} ({spec.name})"
            _check_tensor(x, spec, what, hf, why)


def _check_tensor(x: torch.Tensor, spec: GraphInput, what: str, hf: bool, why: str) -> None:
    ids = not spec.dtype.is_floating_point and spec.dtype is not torch.bool
    if ids and (x.is_floating_point() or x.is_complex() or x.dtype is torch.bool):
        raise CalibrationError(f"{what} is a {_dtype(x)} tensor; the model takes integer token ids ({spec.name})",
                               fix="tokenize the text: calib_data holds token ids (torch.long), not embeddings "
                                   "or probabilities")
    if not ids and x.dtype != spec.dtype:
        raise CalibrationError(f"{what} is a {_dtype(x)} tensor; the graph takes {_dtype(spec)} ({spec.name})",
                               fix=f"convert it with .to(torch.{_dtype(spec)})")
    if x.dim() != len(spec.sizes):
        shape = "[batch, seq]" if hf else f"{len(spec.sizes)} dimensions"
        raise CalibrationError(f"{what} has shape {list(x.shape)}; the graph takes {shape} ({spec.name})",
                               fix="give [seq] or [batch, seq] token-id tensors" if hf else None)
    for d, (n, (lo, hi)) in enumerate(zip(x.shape, spec.sizes)):
        if lo <= n and (hi is None or n <= hi):
            continue
        if hf and d == 1 and n > 0:
            raise CalibrationError(f"{what} has {n} tokens; the model takes at most {hi} tokens ({why})",
                                   fix=f"cut it into windows of at most {hi} tokens")
        if hf and d == 0:
            raise CalibrationError(f"{what} has a batch of {n}; the graph takes at most {hi}",
                                   fix="split it into smaller batches")
        allowed = f"exactly {lo}" if lo == hi else f"{lo}..{'' if hi is None else hi}"
        raise CalibrationError(f"{what} has size {n} in dimension {d}; the graph takes {allowed} ({spec.name})")
    if ids and spec.vocab_size is not None:
        bad = (x < 0) | (x >= spec.vocab_size)
        if bool(bad.any()):
            pos = [int(j) for j in bad.nonzero()[0]]
            value = int(x[tuple(pos)])
            why = "is negative" if value < 0 else "is not in the vocabulary"
            raise CalibrationError(
                f"{what} has token id {value} at {pos}, which {why}: the model's vocabulary has {spec.vocab_size} "
                f"tokens, ids 0..{spec.vocab_size - 1} (rows of {spec.embedding or 'the input embedding'})",
                fix="tokenize with the model's own tokenizer")


def _dtype(x) -> str:
    return str(x.dtype).removeprefix("torch.")


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
