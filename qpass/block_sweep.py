"""Block-by-block calibration: run calibration data through a graph one decoder block at a time.

GPTQ and AWQ calibrate a model block by block: capture the inputs of block i, collect statistics on block
i only, change block i, then compute block i's outputs (from the changed block, or from the float block)
as the inputs of block i + 1. Peak memory holds one block's activations per sample, the values that cross
a block boundary (hidden states, rotary tables, masks) for every sample, and one block's statistics.

Blocks come from the graph, not from per-architecture tables: the module paths of the nodes
(``nn_module_stack``) are scanned for ``<prefix>.<integer>`` components (``model.layers.3``,
``transformer.h.3``, ``model.decoder.layers.3``); the prefix whose indexed modules cover the most nodes is
the block list. The graph (in topological order) is cut before block 0 and after the last node of each
block, giving segments ``stem`` (embeddings, masks, rotary tables), ``<prefix>.0`` .. ``<prefix>.<n-1>`` and
``tail`` (final norm, LM head). A graph without such paths is one segment, ``graph``.

Execution is an FX interpreter over one segment at a time: ``get_attr`` nodes are read when used (so a pass
changing parameters in place is seen at once), values are freed after their last use, and only the values
used by later segments are kept per sample. ``feed="float"`` runs every qpass quantizer as the identity
(the float model); ``feed="quantized"`` runs the graph as it is, except the quantizers a caller asks to
bypass while it observes (GPTQ: the weights of the block not quantized yet, as in the reference where a
layer is float until it is quantized).

    for step in Sweep(gm, calib, feed="quantized"):          # stem, model.layers.0, ..., tail
        todo = [s for s in sites if step.contains(s.node)]
        if todo:
            stats = step.observe({s.input.name: s.input for s in todo}, lambda key, node: Obs())
            ...change the weights of `todo`...
        # next iteration: this segment is run again (changed) to feed the next one

With ``feed="float"`` the next segment gets the outputs of this segment's first observation (taken before
the caller changed anything).

Weights on disk (``qpass.apply_from_disk``, ``qpass.streaming``): given a ``store``, the sweep loads the
parameters a segment reads (its ``get_attr`` inputs) before the segment runs and releases them after its
outputs are computed: changed ones go to a scratch file, the others back to disk. Peak memory then holds one
segment's weights (the stem's embeddings, one block, or the tail's head), its activations and the carried
values, not the whole model. ``observe_by_block`` is ``qpass.calibration.observe`` done this way, for passes
that calibrate on the graph as it is (static activation scales, SmoothQuant).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch.fx import GraphModule, Interpreter, Node
from tqdm.auto import tqdm

from .calibration import CalibrationSet
from .errors import CalibrationError
from .graph import is_quantizer, module_path
from .quantizer import Quantizer

if TYPE_CHECKING:
    from .streaming import WeightStore

log = logging.getLogger("qpass.block_sweep")

Feed = Literal["quantized", "float"]


@dataclass(frozen=True)
class Block:
    """One repeated module (a decoder layer): its path and its first and last node in graph order."""

    index: int
    path: str
    first: Node
    last: Node


def find_blocks(gm: GraphModule) -> list[Block]:
    """The decoder blocks of `gm`, in execution order (empty when no ``<prefix>.<int>`` module list is found).
    Blocks whose nodes interleave in the graph order are merged into one."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    cover: dict[str, dict[int, int]] = {}
    paths = {}
    for n in nodes:
        parts = module_path(gm, n).split(".")
        paths[n] = parts
        for k, part in enumerate(parts):
            if k and part.isdigit():
                per = cover.setdefault(".".join(parts[:k]), {})
                per[int(part)] = per.get(int(part), 0) + 1
    if not cover:
        return []
    prefix = max(cover, key=lambda p: (sum(cover[p].values()), len(cover[p]), -len(p)))
    depth = len(prefix.split("."))
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    spans: dict[int, list[Node]] = {}
    for n in nodes:
        parts = paths[n]
        if len(parts) > depth and ".".join(parts[:depth]) == prefix and parts[depth].isdigit():
            spans.setdefault(int(parts[depth]), []).append(n)
    ranges = sorted(((pos[ns[0]], pos[ns[-1]], i) for i, ns in spans.items()))
    merged: list[list] = []
    for lo, hi, i in ranges:
        if merged and lo <= merged[-1][1]:
            log.warning("blocks %s and %s.%d interleave in the graph; calibrating them together",
                        merged[-1][2], prefix, i)
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi, f"{prefix}.{i}"])
    order = list(gm.graph.nodes)
    return [Block(k, name, order[lo], order[hi]) for k, (lo, hi, name) in enumerate(merged)]


class Sweep:
    """Iterate over the segments of `gm` (see the module docstring), carrying every calibration sample's
    boundary values from one segment to the next. ``blocks=False``: one segment, the whole graph. With a
    `store` (weights on disk), each segment's parameters are in memory only during its step."""

    def __init__(self, gm: GraphModule, calib: CalibrationSet, *, blocks: bool = True, feed: Feed = "quantized",
                 progress: bool = True, desc: str = "calibrating", store: WeightStore | None = None):
        if feed not in ("quantized", "float"):
            raise ValueError(f"feed must be 'quantized' or 'float', got {feed!r}")
        self.gm, self.calib, self.feed, self.progress, self.desc = gm, calib, feed, progress, desc
        self.store = store
        found = find_blocks(gm) if blocks else []
        self.blocks = found
        self.carried_bytes: list[int] = []   # tensor bytes kept for all samples after each segment but the last
        self.names = (["stem"] + [b.path for b in found] + ["tail"]) if found else ["graph"]
        # segment k ends with anchor k: the node before block 0 (stem), then each block's last node
        self._anchors = ([found[0].first.prev] + [b.last for b in found]) if found else []
        self._interp = Interpreter(gm, garbage_collect_values=False)

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator["Step"]:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        envs = []
        for sample in self.calib.samples:
            flat = self.gm.graph._codegen.process_inputs(*sample)
            if len(flat) != len(placeholders):
                raise CalibrationError(f"a calibration sample has {len(flat)} inputs, the graph takes "
                                       f"{len(placeholders)}", fix="give samples shaped like the example inputs")
            envs.append(dict(zip(placeholders, flat)))
        bar = tqdm(total=len(self.names), desc=self.desc, disable=not self.progress, leave=False)
        try:
            for k, name in enumerate(self.names):
                # NOTE: a caller that breaks out of the loop must close the iterator (contextlib.closing):
                # the with-block then writes back what the segment changed, and a failure to do so raises
                # there; left to the garbage collector, such an exception would be printed and ignored
                with self.store.loaded(self.attrs(k)) if self.store is not None else contextlib.nullcontext():
                    step = Step(self, k, name, envs)
                    yield step
                    bar.update(1)
                    if k + 1 < len(self.names):
                        envs = step._outputs()
                        self.carried_bytes.append(_nbytes(envs))
                    step._release()
        finally:
            bar.close()

    def attrs(self, k: int) -> list[str]:
        """The get_attr targets segment k reads (what must be in memory to run it), in graph order."""
        nodes, _ = self._segment(k)
        return list(dict.fromkeys(a.target for n in nodes if n.op != "get_attr"
                                  for a in n.all_input_nodes if a.op == "get_attr"))

    # -- segment bookkeeping (recomputed on the current graph: passes may change it between steps)
    def _segment(self, k: int) -> tuple[list[Node], dict[Node, int]]:
        order = list(self.gm.graph.nodes)
        pos = {n: i for i, n in enumerate(order)}
        lo = pos[self._anchors[k - 1]] + 1 if k > 0 else 0
        hi = pos[self._anchors[k]] + 1 if k < len(self._anchors) else len(order)
        return [n for n in order[lo:hi] if n.op != "output"], pos

    def _run(self, nodes: list[Node], pos: dict, env: dict, live_out: set, taps: Mapping[Node, list],
             identity: Callable[[Node], bool]) -> dict:
        """Run `nodes` on a copy of `env` (boundary values); feed tapped values to their observers; return
        the values in `live_out`."""
        env = dict(env)
        self._interp.env = env
        for n, observers in taps.items():
            if n in env:
                for obs in observers:
                    obs.update(env[n])
        last_use = {}
        for n in nodes:
            for a in n.all_input_nodes:
                last_use[a] = pos[n]
        for n in nodes:
            if n.op in ("placeholder", "get_attr"):
                continue
            for a in n.all_input_nodes:
                if a not in env:
                    if a.op != "get_attr":
                        raise CalibrationError(f"{n.name} needs {a.name}, which no earlier segment kept: the graph "
                                               "changed in the middle of a block-by-block sweep")
                    env[a] = self._interp.fetch_attr(a.target)
            env[n] = env[Quantizer(n).x] if identity(n) else self._interp.run_node(n)
            for obs in taps.get(n, ()):
                obs.update(env[n])
            for a in n.all_input_nodes:
                if last_use.get(a) == pos[n] and a not in live_out:
                    env.pop(a, None)
            if not n.users and n not in live_out:
                env.pop(n, None)
        return {n: env[n] for n in live_out if n in env}


class Step:
    """One segment of a Sweep: `name` is 'stem', a block path, 'tail' or 'graph'."""

    def __init__(self, sweep: Sweep, index: int, name: str, envs: list[dict]):
        self.sweep, self.index, self.name = sweep, index, name
        self._envs = envs
        self._pending: list[dict] | None = None
        nodes, _ = sweep._segment(index)
        self._node_set = set(nodes)

    def contains(self, node: Node) -> bool:
        return node in self._node_set

    @torch.no_grad()
    def observe(self, nodes: Mapping[Any, Node], make: Callable[[Any, Node], Any], *,
                bypass: frozenset | set = frozenset()) -> dict[Any, Any]:
        """Attach ``make(key, node)`` observers (objects with ``update(tensor)``) to `nodes` (in this segment
        or kept from an earlier one), run this segment once per calibration sample, return {key: observer}.
        Quantizer nodes in `bypass` run as the identity (``feed='float'``: every quantizer does)."""
        nodes_now, pos = self.sweep._segment(self.index)
        self._node_set = set(nodes_now)
        observers = {key: make(key, node) for key, node in nodes.items()}
        taps: dict[Node, list] = {}
        for key, node in nodes.items():
            if node not in self._node_set and self._envs and node not in self._envs[0]:
                raise CalibrationError(f"cannot observe {node.name} in segment {self.name}: it is computed in a "
                                       "later segment or was not kept", fix="observe it in its own segment")
            taps.setdefault(node, []).append(observers[key])
        live_out = self._live_out(nodes_now, pos)
        keep = self.sweep.feed == "float" and self._pending is None
        if not keep:   # nothing to carry from this run: stop after the last observed node
            last = max((pos[n] for n in taps if n in self._node_set), default=-1)
            nodes_now, live_out = [n for n in nodes_now if pos[n] <= last], set()
        identity = self._identity(bypass)
        outs = []
        desc = f"{self.sweep.desc} {self.name}"
        for env in tqdm(self._envs, desc=desc, disable=not self.sweep.progress, leave=False):
            out = self.sweep._run(nodes_now, pos, env, live_out, taps, identity)
            if keep:
                outs.append(out)
        if keep:
            self._pending = outs
        return observers

    def _identity(self, bypass) -> Callable[[Node], bool]:
        if self.sweep.feed == "float":
            return is_quantizer
        bypass = set(bypass)
        return lambda n: n in bypass

    def _live_out(self, nodes: list[Node], pos: dict) -> set:
        if self.index + 1 >= len(self.sweep.names) or not nodes:
            return set()
        end = pos[nodes[-1]]
        live = set()
        for n, i in pos.items():
            if i <= end and n.op != "get_attr" and any(pos[u] > end for u in n.users):
                live.add(n)
        return live

    @torch.no_grad()
    def _outputs(self) -> list[dict]:
        """Boundary values for the next segment: kept from the first observation (float feed) or computed
        by running this segment as the graph now is."""
        if self._pending is not None:
            return self._pending
        nodes, pos = self.sweep._segment(self.index)
        live_out = self._live_out(nodes, pos)
        identity = self._identity(())
        return [self.sweep._run(nodes, pos, env, live_out, {}, identity) for env in self._envs]

    def _release(self) -> None:
        self._envs, self._pending = [], None


def observe_by_block(gm: GraphModule, nodes: Mapping[Any, Node], make: Callable[[Any, Node], Any],
                     calib: CalibrationSet, *, store: WeightStore | None = None, desc: str = "calibrating",
                     progress: bool = True) -> dict[Any, Any]:
    """``qpass.calibration.observe`` one segment at a time (the graph as it is, every observer fed the same
    values): with a `store`, only one segment's weights are in memory."""
    out: dict[Any, Any] = {}
    left = dict(nodes)
    with contextlib.closing(iter(Sweep(gm, calib, progress=progress, desc=desc, store=store))) as steps:
        for step in steps:
            mine = {k: n for k, n in left.items() if step.contains(n)}
            if mine:
                out.update(step.observe(mine, make))
                left = {k: n for k, n in left.items() if k not in mine}
            if not left:
                break
    return {k: out[k] for k in nodes}


def segment_attrs(gm: GraphModule) -> list[list[str]]:
    """The get_attr targets of each segment (stem, blocks, tail), as a Sweep would load them."""
    sweep = Sweep(gm, CalibrationSet([]), progress=False)
    return [sweep.attrs(k) for k in range(len(sweep))]


def _nbytes(envs: list[dict]) -> int:
    seen, total = set(), 0
    for env in envs:
        for v in env.values():
            if isinstance(v, torch.Tensor) and id(v) not in seen:
                seen.add(id(v))
                total += v.numel() * v.element_size()
    return total


__all__ = ["Block", "find_blocks", "Sweep", "Step", "observe_by_block", "segment_attrs"]
