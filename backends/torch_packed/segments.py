"""Native segments: runs of a decode graph's kernels replayed by one C call (``tape_run``, csrc/q4avx2.c).

After the runtime passes (runtime.py) a decode step of a Llama-like model is mostly native kernels already:
the packed linears, RMSNorm, RoPE, the cache writes and attention. What is left between them is the graph's
own machinery: one Python call, a ctypes call and a tensor allocation per kernel, the view ops between them,
the small elementwise ops (the residual add, SiLU, the gate product) through torch's dispatcher, and a
prologue of ~40-60 tiny ops (positions, the causal mask, the rotary tables, per-layer cache indices). At 0.5 B
parameters that was 3.3-4.3 ms of a ~20 ms step at 1 thread (the "rest" column of tools/bench_size.py's table
before this pass, in git history: 86f5483), serial at any thread count: the weight stream evicts the code and data it runs on, so each of those ops cost 2-3x its hot cost.
This pass removes it for the steps that repeat: one token at a time.

``native_segments(gm)`` (a graph pass, run last by ``optimize_decode``):

1. marks the nodes a tape can run: the fused native ops (rms_norm, rope, attention), ``silu``, ``index_copy_``
   into a cache, the forward of a PackedLinear or PackedKVCache, view ops, and the small ops of GENERIC on
   fp32 / int64 / bool tensors (arithmetic and comparisons with broadcasting, casts, ``copy_`` / ``add_``,
   cos / sin, ``arange``, ``cat``, ``embedding``, runtime.additive_mask);
2. moves every other node that depends on none of them above the first marked node, unless that would move a
   write across a read or write of the same tensor (checked on the ops' schemas; an op without one stays);
3. replaces each run of marked nodes by one call of a :class:`Segment`, which holds the run as a small
   GraphModule (its *fallback*) and, once compiled, a tape.

A segment compiles itself from two consecutive calls that differ only in one int input (the number of
written cache slots, ``n_keys``) and in the tensor dims that equal it: it replays the run's ops on
placeholder buffers twice, once per call's sizes, and turns each op into a tape instruction (the kernel it
calls, the data pointers as (slot, offset) and its sizes; a size that differs between the two replays and
equals the int input becomes "the call's n"). Every intermediate gets its own preallocated buffer (one whose
size follows n: allocated at n's bound, the cache length); an output that leaves through the graph's output
is allocated per call. A call whose inputs do not have the compiled sizes (a prefill, another batch) runs
the fallback, as does every call of a segment whose run holds something the tape cannot express (an odd
stride, a kernel without a native form, a size that follows n with no cache to bound it: ``Segment.why``).
``Segment.profile`` times each instruction.

What a tape computes is what the ops compute: the same kernels with the same arguments, so bit for bit,
except SiLU (a polynomial exp, within a few ulp of torch's) and cos / sin (libm's, within an ulp of torch's).
Scratch A/B at 0.5 B (W4A16 g128 + lm_head int4, one process): 19.84 -> 15.76 ms per token at 1 thread,
13.10 -> 9.31 ms at 2 (docs/benchmarks.md, bench-size, for the tool's table).
"""
from __future__ import annotations

import ctypes
import logging
import operator
import os
import struct
import warnings

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from . import native
from .kernels import bucket
from .kv import PackedKVCache
from .linear import PackedLinear

log = logging.getLogger("qpass.backends.torch_packed")
aten = torch.ops.aten

T_Q4, T_Q4I8, T_W8, T_I8, T_RMS, T_ROPE, T_ATT, T_ADD, T_MUL, T_SILU, T_SILU_MUL, T_ROWCOPY, T_KVSTORE, T_COPY, \
    T_KVLOAD, T_FQ, T_EW, T_ARANGE, T_GATHER = range(1, 20)
EW_COPY, EW_ADD, EW_SUB, EW_MUL, EW_DIV, EW_LE, EW_LT, EW_GE, EW_GT, EW_EQ, EW_NE, EW_COS, EW_SIN, EW_NEG, EW_MASK, \
    EW_NOT = range(16)
DTYPES = {torch.float32: 0, torch.int64: 1, torch.bool: 2}     # what T_EW reads and writes
DYN = -(1 << 62)                      # TAPE_DYN: the call's n
ENV_OFF = "QPASS_NATIVE_SEGMENTS"     # "0": decode graphs keep their nodes (no segments)

VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
         aten.unsqueeze.default, aten.squeeze.dim, aten.alias.default, aten.slice.Tensor, aten.expand.default,
         aten.permute.default, aten.select.int, aten.t.default}
ELEMENTWISE = {aten.add.Tensor: T_ADD, aten.mul.Tensor: T_MUL}
PURE_FUNCTIONS = {operator.getitem}   # call_function targets without a schema known to read only their args
# the step's prologue and any other small op: T_EW (elementwise, broadcast, fp32 / int64 / bool), T_ARANGE, T_GATHER
GENERIC = {aten.add.Tensor: EW_ADD, aten.add.Scalar: EW_ADD, aten.sub.Tensor: EW_SUB, aten.sub.Scalar: EW_SUB,
           aten.mul.Tensor: EW_MUL, aten.mul.Scalar: EW_MUL, aten.div.Tensor: EW_DIV, aten.div.Scalar: EW_DIV,
           aten.le.Tensor: EW_LE, aten.le.Scalar: EW_LE, aten.lt.Tensor: EW_LT, aten.lt.Scalar: EW_LT,
           aten.ge.Tensor: EW_GE, aten.ge.Scalar: EW_GE, aten.gt.Tensor: EW_GT, aten.gt.Scalar: EW_GT,
           aten.eq.Tensor: EW_EQ, aten.eq.Scalar: EW_EQ, aten.ne.Tensor: EW_NE, aten.ne.Scalar: EW_NE,
           aten.cos.default: EW_COS, aten.sin.default: EW_SIN, aten.neg.default: EW_NEG,
           aten.logical_not.default: EW_NOT, aten.copy_.default: EW_COPY, aten.add_.Tensor: EW_ADD,
           aten.to.dtype: EW_COPY, aten.to.dtype_layout: EW_COPY, aten.to.device: EW_COPY,
           aten._to_copy.default: EW_COPY, aten.clone.default: EW_COPY, aten.arange.default: None,
           aten.arange.start: None, aten.cat.default: None, aten.embedding.default: None}
SMALL = set(DTYPES)
TO = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.clone.default}


class _Resize(Exception):
    """A buffer's size follows the call's n: compile again with it allocated at n's bound."""


class Unsupported(Exception):
    """A run holds something the tape cannot express: the segment keeps its fallback (``Segment.why``)."""


def _native_targets() -> dict:
    """The fused native ops' targets (the op, or its wrapper under freeze's direct_ops) -> their kind."""
    from . import runtime
    return {runtime.rms_norm: "rms_norm", native.rms_norm: "rms_norm", runtime.rope: "rope", native.rope: "rope",
            runtime.attention: "attention", native.attention: "attention"}


# ------------------------------------------------------------------------------------------ the pass


def _fp32(n) -> bool:
    v = n.meta.get("val") if isinstance(n, Node) else None
    return isinstance(v, torch.Tensor) and v.dtype == torch.float32


def _small(n) -> bool:
    """A CPU tensor of a dtype T_EW handles (fp32, int64, bool); nodes without a recorded value count when
    they are lists of such (cat's inputs are checked one by one)."""
    v = n.meta.get("val") if isinstance(n, Node) else None
    if v is None and isinstance(n, Node) and "val" not in n.meta:
        return n.op in ("call_function", "get_attr", "placeholder")
    return isinstance(v, torch.Tensor) and v.dtype in SMALL and v.device.type == "cpu"


def _scalar(n) -> bool:
    v = n.meta.get("val") if isinstance(n, Node) else None
    return isinstance(v, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(v, bool)


def _holder(gm: GraphModule, n) -> object:
    return getattr(gm, n.target, None) if isinstance(n, Node) and n.op == "get_attr" else None


def _taped(gm: GraphModule, n: Node, targets: dict) -> bool:
    """Whether the tape has an instruction (or a view) for node n (decided on the graph; the sizes and strides
    are checked when the segment compiles)."""
    if n.op == "call_method" and n.target == "forward" and n.args:
        mod = _holder(gm, n.args[0])
        if isinstance(mod, PackedLinear):
            return mod.act is None or mod.act.threshold is None
        return isinstance(mod, PackedKVCache)
    if n.op != "call_function":
        return False
    if n.target in targets:
        return True
    if n.target in VIEWS:                       # sizes may be int nodes (the step's length, n_keys); nodes the
        return bool(n.args) and _small(n.args[0]) and (_small(n) or "val" not in n.meta)  # runtime passes add
                                                                                          # have no value
    if n.target in GENERIC or getattr(n.target, "_qpass_mask", False):
        return (_small(n) or "val" not in n.meta) and all(_small(a) or _scalar(a) for a in n.all_input_nodes)
    if n.target is aten.silu.default:
        return _fp32(n) and _fp32(n.args[0])
    if n.target is aten.index_copy_.default:
        return _fp32(n)
    return False


def _root(n):
    """The node whose tensor n may alias (through view / alias-returning ops), for write / read conflicts."""
    seen = 0
    while isinstance(n, Node) and n.op == "call_function" and seen < 1000:
        schema = getattr(n.target, "_schema", None)
        if schema is None or not schema.returns or schema.returns[0].alias_info is None or not n.args:
            break
        n, seen = n.args[0], seen + 1
    return n


def _effects(gm: GraphModule, n: Node) -> tuple[set, set] | None:
    """(roots read, roots written) of node n, or None where it cannot be told (it then stays in place)."""
    reads = {_root(a) for a in n.all_input_nodes}
    if n.op in ("get_attr", "placeholder"):
        return set(), set()
    if n.op == "call_method" and n.target == "forward" and n.args and isinstance(_holder(gm, n.args[0]),
                                                                                   (PackedLinear, PackedKVCache)):
        return reads, {n.args[0]} if isinstance(_holder(gm, n.args[0]), PackedKVCache) else set()
    if n.op != "call_function":
        return None
    schema = getattr(n.target, "_schema", None)
    if schema is None:
        if n.target in PURE_FUNCTIONS or getattr(n.target, "_qpass_pure", False):
            return reads, set()
        return None
    writes = set()
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            v = n.args[i] if i < len(n.args) else n.kwargs.get(arg.name)
            if isinstance(v, Node):
                writes.add(_root(v))
    return reads, writes


def native_segments(gm: GraphModule, *, min_ops: int = 2) -> dict[str, int]:
    """Hoist what the kernels do not depend on, then replace each run of tape-able nodes by a Segment call
    (see the module doc). Returns {"segments": count, "segment_nodes": nodes they hold, "hoisted": moved}."""
    stats = {"segments": 0, "segment_nodes": 0, "hoisted": 0}
    if not native.available() or os.environ.get(ENV_OFF, "1") == "0":
        return stats
    targets = _native_targets()
    graph = gm.graph
    nodes = list(graph.nodes)
    taped = {n for n in nodes if _taped(gm, n, targets)}
    first = next((n for n in nodes if n in taped), None)
    if first is None:
        return stats
    # 2. hoisting: a node after `first` that no taped node feeds goes above `first`, in order
    tainted, stuck = set(), set()
    seen_reads, seen_writes = set(), set()              # of the taped nodes passed so far
    for n in nodes[nodes.index(first):]:
        if n.op == "output":
            break
        if n in taped:
            eff = _effects(gm, n) or (set(), set())
            seen_reads |= eff[0]
            seen_writes |= eff[1]
            continue
        ins = n.all_input_nodes
        if any(a in taped or a in tainted for a in ins):
            tainted.add(n)
            continue
        eff = _effects(gm, n)
        if (any(a in stuck for a in ins) or eff is None or eff[1] & (seen_reads | seen_writes)
                or eff[0] & seen_writes):
            stuck.add(n)
            continue
        first.prepend(n)
        stats["hoisted"] += 1
    # 3. runs of taped nodes, in the new order
    runs, cur = [], []
    for n in graph.nodes:
        if n in taped:
            cur.append(n)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    output = next(n for n in graph.nodes if n.op == "output")
    for run in runs:
        if sum(1 for n in run if n.op == "call_method" or n.target not in VIEWS) < min_ops:
            continue
        _replace(gm, run, output, stats["segments"])
        stats["segments"] += 1
        stats["segment_nodes"] += len(run)
    if stats["segments"]:
        graph.lint()
        gm.recompile()
    return stats


def graph_nodes(gm: GraphModule):
    """The nodes of a decode graph, with those its segments hold in place of their call (for inspection)."""
    for n in gm.graph.nodes:
        seg = getattr(gm, n.target, None) if n.op == "get_attr" else None
        if isinstance(seg, Segment):
            yield from (m for m in seg.fallback.graph.nodes if m.op not in ("placeholder", "output"))
        elif not (n.op == "call_method" and n.target == "__call__") and not (
                n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], Node)
                and n.args[0].op == "call_method" and n.args[0].target == "__call__"):
            yield n


def _reaches_output(n: Node, output: Node) -> bool:
    """n's tensor (or a view of it) is returned by the graph: it must be a fresh tensor per call."""
    for u in n.users:
        if u is output:
            return True
        if u.op == "call_function" and getattr(u.target, "_schema", None) is not None:
            r = u.target._schema.returns
            if r and r[0].alias_info is not None and _reaches_output(u, output):
                return True
        elif u.op == "call_function" and u.target is operator.getitem and _reaches_output(u, output):
            return True
    return False


def _replace(gm: GraphModule, run: list[Node], output: Node, index: int) -> None:
    inside = set(run)
    inputs: list[Node] = []
    for n in run:
        for a in n.all_input_nodes:
            if a not in inside and a not in inputs:
                inputs.append(a)
    outs = [n for n in run if any(u not in inside for u in n.users)]
    sub = torch.fx.Graph()
    env = {a: sub.placeholder(f"in{i}") for i, a in enumerate(inputs)}
    for a, p in env.items():
        p.meta.update(a.meta)
    for n in run:
        env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(tuple(env[n] for n in outs))
    fallback = GraphModule(torch.nn.Module(), sub, class_name=f"NativeSegment{index}")
    seg = Segment(fallback, [a.op == "get_attr" for a in inputs], [_reaches_output(n, output) for n in outs],
                  name=f"segment {index} ({run[0].name} .. {run[-1].name}, {len(run)} nodes)")
    attr = f"_qpseg{index}"
    gm.__dict__[attr] = seg
    with gm.graph.inserting_before(run[0]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)      # a plain attribute (not a module or buffer), as freeze's
        holder = gm.graph.get_attr(attr)
        call = gm.graph.call_method("__call__", (holder, *inputs))
        for i, n in enumerate(outs):
            item = gm.graph.call_function(operator.getitem, (call, i))
            item.meta.update(n.meta)
            n.replace_all_uses_with(item)
    for n in reversed(run):
        gm.graph.erase_node(n)


# ------------------------------------------------------------------------------------------ segment


def _fbits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _signature(args) -> list:
    return [(tuple(a.shape), a.stride(), a.dtype) if isinstance(a, Tensor) else a if isinstance(a, (int, float))
            else type(a) for a in args]


class Segment:
    """A run of a decode graph's nodes: its fallback GraphModule, and a tape per sizes two calls showed (see
    the module doc); ``why``: why the last sizes tried were not taped."""

    MAX_TAPES = 4                                   # sizes taped at once (decode, chunked prefill, ...)
    MAX_FAILURES = 4                                # sizes found untapeable before it stops trying

    def __init__(self, fallback: GraphModule, persistent: list[bool], fresh: list[bool], name: str = ""):
        self.fallback, self.persistent, self.fresh, self.name = fallback, persistent, fresh, name
        self.tapes: list[_Tape] = []
        self.failed: dict[tuple, str] = {}          # the sizes of a pair of calls -> why they are not taped
        self.calls = {"tape": 0, "fallback": 0}
        self._seen = None                           # (args, signature) of the last call, while compiling

    @property
    def tape(self) -> "_Tape | None":
        """The first tape (the one for decode steps where they came first), or None."""
        return self.tapes[0] if self.tapes else None

    @property
    def why(self) -> str | None:
        """Why the last sizes that could have been taped were not (None: no such sizes yet)."""
        return next(reversed(self.failed.values()), None)

    def __call__(self, *args):
        for t in self.tapes:
            if t.accepts(args):
                self.calls["tape"] += 1
                return t.run(args)
        if self.tapes and not all(t.valid() for t in self.tapes):   # a kernel plan changed since: compile again
            self.tapes = [t for t in self.tapes if t.valid()]
        if len(self.tapes) < self.MAX_TAPES and len(self.failed) < self.MAX_FAILURES:
            self._observe(args)
        self.calls["fallback"] += 1
        return self.fallback(*args)

    def profile(self, fn, *, top: int | None = None) -> list[tuple[str, float]]:
        """Run fn() (e.g. a few decode steps) with the tape timing each instruction; returns (instruction,
        seconds summed over the calls), slowest first: where a native decode step spends its time."""
        t = self.tape
        if t is None:
            raise RuntimeError(f"{self.name} has no tape yet ({self.why or 'it compiles after two decode calls'})")
        times = torch.zeros(t.count, dtype=torch.float64)
        t.times = times.data_ptr()
        try:
            fn()
        finally:
            t.times = None
        rows = sorted(zip(t.names, times.tolist()), key=lambda r: -r[1])
        return rows[:top] if top else rows

    def _observe(self, args) -> None:
        sig = _signature(args)
        seen, self._seen = self._seen, (args, sig)
        if seen is None:
            return
        dyn = _dynamic_input(seen[1], sig)
        if dyn is False:
            log.debug("%s: not compiled yet, calls differ: %s", self.name,
                      [(i, x, y) for i, (x, y) in enumerate(zip(seen[1], sig)) if x != y][:4])
            return
        key = tuple(x if x == y else None for x, y in zip(seen[1], sig))
        if key in self.failed:
            return
        self._seen = None
        try:
            tape = _Tape.compile(self, seen[0], args, dyn)
        except Unsupported as e:
            self.failed[key] = str(e)
            self._seen = (args, sig)                # the next call may pair with this one
            log.debug("%s stays on its fallback for these sizes: %s", self.name, e)
            return
        self.tapes.append(tape)
        log.debug("%s: taped, %d instructions", self.name, tape.count)


def _dynamic_input(a: list, b: list):
    """The index of the one int input that differs between two calls' signatures (None: none differs); False
    where they differ otherwise (tensor sizes not explained by it, another int, a dtype)."""
    diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    ints = [i for i in diff if isinstance(a[i], int) and isinstance(b[i], int) and not isinstance(a[i], bool)]
    if len(ints) > 1 or len(a) != len(b):
        return False
    dyn = ints[0] if ints else None
    if dyn is not None and b[dyn] <= a[dyn]:       # decode steps grow n; a prefill then a decode shrink the length
        return False
    for i in diff:
        if i == dyn:
            continue
        x, y = a[i], b[i]
        if dyn is None or not (isinstance(x, tuple) and isinstance(y, tuple)) or x[2] != y[2] or len(x[0]) != len(y[0]):
            return False
        for sx, sy in zip((*x[0], *x[1]), (*y[0], *y[1])):      # sizes, then strides
            if sx != sy and not (sx == a[dyn] and sy == b[dyn]):
                return False
    return dyn


class _Tape:
    """A compiled segment: the program, its slots and what a call must look like to use it."""

    @classmethod
    def compile(cls, seg: Segment, args_a, args_b, dyn: int | None) -> "_Tape":
        builder = _Builder(seg, dyn)
        for _ in range(8):                                # each round finds buffers whose size follows n
            try:
                builder.arena.clear()
                builder.n_prev = builder.n_now = None
                prog_a = builder.emit(args_a)
                builder.n_prev = args_a[dyn] if dyn is not None else None
                outs_a = builder.outputs
                prog_b = builder.emit(args_b)
                break
            except _Resize:
                continue
        else:
            raise Unsupported("sizes that follow n could not be settled")
        if len(prog_a) != len(prog_b):
            raise Unsupported("the run's instructions differ between two calls")
        for x, y in zip(outs_a, builder.outputs):
            if x[0] == "view" and x != y:
                raise Unsupported("an output view of an input changes between calls")
            if x[0] == "fixed" and not (y[0] == "fixed" and x[1].data_ptr() == y[1].data_ptr()
                                        and x[1].shape == y[1].shape and x[1].stride() == y[1].stride()):
                raise Unsupported("an output view changes between calls")
        prog = []
        na, nb = (args_a[dyn], args_b[dyn]) if dyn is not None else (None, None)
        for x, y in zip(prog_a, prog_b):
            if x == y:
                prog.append(x)
            elif dyn is not None and x == na and y == nb:
                prog.append(DYN)
            else:
                raise Unsupported("a size or offset changes between calls in a way the tape cannot follow")
        if DYN in prog and builder.dyn_max is None:
            raise Unsupported("a size follows the call's n, but no cache bounds it")
        return cls(seg, builder, prog, args_a, args_b, dyn)

    def __init__(self, seg: Segment, b: "_Builder", prog: list[int], args_a, args, dyn: int | None):
        self.seg, self.count, self.dyn, self.dyn_max = seg, b.count, dyn, b.dyn_max
        self.prog = torch.tensor(prog, dtype=torch.int64)
        self._prog = (self.prog.data_ptr(), len(prog))
        self.arena, self.scratch = b.arena, b.scratch        # keep the buffers alive
        self.slots = (ctypes.c_void_p * len(b.slots))(*b.slots)
        self._slots = ctypes.addressof(self.slots)
        self.tensor_args = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
        self.n_args = len(args)
        self.checks = []                                   # (arg, shape or shape template, stride, dtype) / value
        sa, sb = _signature(args_a), _signature(args)
        for i in range(len(args)):
            if seg.persistent[i] or i == dyn:
                continue
            if isinstance(args[i], Tensor):
                shape, stride, dtype = sb[i]
                if sa[i] != sb[i]:                         # sizes / strides that follow n: templates (None: n)
                    shape = tuple(None if x != y else y for x, y in zip(sa[i][0], shape))
                    stride = tuple(None if x != y else y for x, y in zip(sa[i][1], stride))
                self.checks.append((i, shape, stride, dtype))
            else:
                self.checks.append((i, sb[i], None, None))
        self.modules = list(b.modules.values())            # (module, its runners when compiled)
        # inputs that share memory (views of one tensor): the tape addresses the later ones from the first
        first: dict[int, int] = {}
        self.shared = []
        for i in self.tensor_args:
            sp = args[i].untyped_storage().data_ptr()
            if sp in first:
                self.shared.append((first[sp], i, args[i].data_ptr() - args[first[sp]].data_ptr()))
            else:
                first[sp] = i
        # per output: ("arg", i) | ("fixed", buffer view) | ("fresh", (shape, stride, dtype), slot) |
        # ("dyn", full buffer, dims that follow n) | ("view", i, (shape, stride, offset from input i))
        self.outputs = b.outputs
        self.fresh = [(o[1], o[2]) for o in b.outputs if o[0] == "fresh"]
        if any(o[0] == "dyn" for o in b.outputs) and dyn is None:
            raise Unsupported("an output's size follows n, but no input gives n")
        self.call = native.q4().tape_run
        self.times = None                                  # profile(): a float64 tensor's address
        self.names = b.names                               # per instruction: op and node
        self.threads = torch.get_num_threads

    def valid(self) -> bool:
        return all(m._runners is r for m, r in self.modules)

    def accepts(self, args) -> bool:
        if len(args) != self.n_args:
            return False
        n = args[self.dyn] if self.dyn is not None else None
        if n is not None and (type(n) is not int or n < 1 or n > self.dyn_max):
            return False
        for i, j, diff in self.shared:
            a, b = args[i], args[j]
            if (b.data_ptr() - a.data_ptr() != diff
                    or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()):
                return False
        for i, shape, stride, dtype in self.checks:
            a = args[i]
            if dtype is None:
                if a != shape or type(a) is not type(shape):
                    return False
            elif type(a) is not Tensor or a.dtype != dtype:
                return False
            elif None not in shape and None not in stride:
                if a.shape != shape or a.stride() != stride:
                    return False
            elif (tuple(a.shape) != tuple(n if x is None else x for x in shape)
                  or a.stride() != tuple(n if x is None else x for x in stride)):
                return False
        return self.valid()

    def run(self, args):
        slots = self.slots
        for i in self.tensor_args:
            slots[i] = args[i].data_ptr()
        fresh = []
        for (shape, stride, dtype), slot in self.fresh:
            t = torch.empty_strided(shape, stride, dtype=dtype)
            slots[slot] = t.data_ptr()
            fresh.append(t)
        rc = self.call(self._prog[0], self._prog[1], self._slots, args[self.dyn] if self.dyn is not None else 0,
                       self.threads(), self.times)
        if rc:
            raise RuntimeError(f"{self.seg.name}: the native tape failed at instruction {rc - 1} (a position outside "
                               "the cache, or out of memory)")
        out, f = [], iter(fresh)
        for kind, v, *rest in self.outputs:
            if kind == "dyn":
                n = args[self.dyn]
                out.append(v[tuple(slice(0, n) if d else slice(None) for d in rest[0])])
            elif kind == "view":
                a = args[v]
                shape, stride, offset = rest[0]
                out.append(a.as_strided(shape, stride, a.storage_offset() + offset))
            else:
                out.append(args[v] if kind == "arg" else v if kind == "fixed" else next(f))
        return tuple(out)


class _Builder:
    """Replays a segment's nodes on its arguments and buffers, emitting instructions (``emit``)."""

    def __init__(self, seg: Segment, dyn: int | None):
        self.seg, self.dyn = seg, dyn
        self.graph = seg.fallback.graph
        self.arena: dict[Node, Tensor] = {}             # node -> its buffer (the same across replays)
        self.scratch: dict[tuple, Tensor] = {}
        self.modules: dict[int, tuple] = {}
        self.targets = _native_targets()
        self.dyn_max = None
        self.dyn_dims: dict[Node, set[int]] = {}           # buffers whose dims follow n
        self.n_prev = self.n_now = None

    # slots: the args first (set per call), then fresh outputs, then fixed pointers (buffers, weights)
    def emit(self, args) -> list[int]:
        self.slots = [0] * len(args)
        self.fixed: dict[int, int] = {}                   # storage pointer -> slot
        self.bases = {}                                   # storage pointer -> (slot, base data pointer)
        self.prog: list[int] = []
        self.count = 0
        self.outputs = []
        self.silu: dict[Node, int] = {}                   # silu node -> index of its instruction
        self.dyn_views: dict[Node, tuple] = {}            # node -> (its full buffer, which dims follow n)
        self.names: list[str] = []                        # per instruction (profile)
        self.current = ""
        env: dict[Node, object] = {}
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        for i, (p, a) in enumerate(zip(placeholders, args)):
            env[p] = a
            if isinstance(a, Tensor):
                self.bases.setdefault(a.untyped_storage().data_ptr(), (i, a.data_ptr()))
            if i == self.dyn:
                self.dyn_node, self.n_now = p, a
        out_node = next(n for n in self.graph.nodes if n.op == "output")
        fresh_nodes = {n for n, f in zip(out_node.args[0], self.seg.fresh) if f}
        self.fresh_nodes = fresh_nodes
        self.fresh_slots: dict[Node, int] = {}
        for n in self.graph.nodes:
            if n.op in ("placeholder", "output"):
                continue
            self.current = n.name
            env[n] = self.node(n, env)
        for n in out_node.args[0]:
            v = env[n]
            arg = next((i for i, a in enumerate(args) if a is v), None)
            if arg is not None:
                self.outputs.append(("arg", arg))
            elif n in self.fresh_slots:
                self.outputs.append(("fresh", (tuple(v.shape), v.stride(), v.dtype), self.fresh_slots[n]))
            elif isinstance(v, Tensor) and n in self.dyn_views and \
                    v.untyped_storage().data_ptr() == self.dyn_views[n][0].untyped_storage().data_ptr():
                self.outputs.append(("dyn", *self.dyn_views[n]))     # its first n along those dims, per call
            elif isinstance(v, Tensor) and self._is_buffer(v):
                self.outputs.append(("fixed", v))
            elif isinstance(v, Tensor) and (i := self._input_of(v, args)) is not None:
                a = args[i]                               # a view of an input: made again per call
                self.outputs.append(("view", i, (tuple(v.shape), v.stride(), v.storage_offset() - a.storage_offset())))
            else:
                raise Unsupported(f"output {n.name} is neither an input nor one of the segment's buffers")
        return self.prog

    @staticmethod
    def _input_of(t: Tensor, args) -> int | None:
        sp = t.untyped_storage().data_ptr()
        return next((i for i, a in enumerate(args) if isinstance(a, Tensor) and a.untyped_storage().data_ptr() == sp
                     and a.dtype == t.dtype), None)

    def _is_buffer(self, t: Tensor) -> bool:
        """t is one of the segment's buffers or a view of one (the same in every call: checked by compile)."""
        return any(t.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() for b in self.arena.values())

    # -- operands
    def buffer(self, n: Node, shape, stride=None, dtype=torch.float32) -> Tensor:
        """n's output buffer: allocated on the first replay, the same tensor on the second. A buffer whose size
        follows the call's n is allocated at the bound of n and returned as the view of the first n."""
        shape = tuple(shape)
        dims = self.dyn_dims.get(n)
        if dims is not None:
            full = self.arena.get(n)
            if full is None:
                if self.dyn_max is None or stride is not None:
                    raise Unsupported(f"{n.name}: a buffer whose size follows n, with no bound on n")
                full = self.arena[n] = torch.empty(
                    tuple(self.dyn_max if i in dims else s for i, s in enumerate(shape)), dtype=dtype)
            self._own(full)
            self.dyn_views[n] = (full, tuple(i in dims for i in range(full.dim())))
            return full[tuple(slice(0, s) for s in shape)]
        t = self.arena.get(n)
        if t is None or tuple(t.shape) != tuple(shape) or (stride is not None and t.stride() != tuple(stride)):
            if t is not None:
                diff = {i for i, (x, y) in enumerate(zip(t.shape, shape)) if x != y}
                if (self.dyn is None or len(t.shape) != len(shape) or not diff
                        or n in self.fresh_nodes or not all(t.shape[i] == self.n_prev and shape[i] == self.n_now
                                                            for i in diff)):
                    raise Unsupported(f"{n.name}: its output size changes between calls")
                self.dyn_dims[n] = diff
                raise _Resize()
            t = torch.empty_strided(tuple(shape), tuple(stride), dtype=dtype) if stride is not None else \
                torch.empty(tuple(shape), dtype=dtype)
            self.arena[n] = t
        if n in self.fresh_nodes and n not in self.fresh_slots:
            self.fresh_slots[n] = self._new_slot(None)
            self.bases[t.untyped_storage().data_ptr()] = (self.fresh_slots[n], t.data_ptr())
        self._own(t)
        return t

    def _own(self, t: Tensor) -> None:
        """t's memory is the segment's (a buffer): a fixed slot."""
        sp = t.untyped_storage().data_ptr()
        if sp not in self.bases:
            self.bases[sp] = (self._new_slot(sp), sp)

    def scratch_buffer(self, key, shape, dtype) -> Tensor:
        t = self.scratch.get(key)
        if t is None:
            t = self.scratch[key] = torch.empty(shape, dtype=dtype)
        self._own(t)
        return t

    def _new_slot(self, ptr) -> int:
        self.slots.append(ptr or 0)
        return len(self.slots) - 1

    def ref(self, t) -> list[int]:
        """A pointer operand: (slot, byte offset) of tensor t (or a raw fixed data pointer; None -> NULL)."""
        if t is None:
            return [-1, 0]
        if isinstance(t, int):
            if t not in self.fixed:
                self.fixed[t] = self._new_slot(t)
            return [self.fixed[t], 0]
        sp = t.untyped_storage().data_ptr()
        if sp not in self.bases:       # e.g. a copy an op made while compiling: nothing writes it per call
            raise Unsupported(f"{self.current}: reads memory that is neither an input nor one of the segment's "
                              "buffers")
        slot, base = self.bases[sp]
        return [slot, t.data_ptr() - base]

    def ins(self, op: int, *fields) -> int:
        self.names.append(f"{_OP_NAMES.get(op, op)} {self.current}")
        words = []
        for f in fields:
            if isinstance(f, list):
                words.extend(f)
            elif isinstance(f, float):
                words.append(_fbits(f))
            else:
                words.append(int(f))
        self.prog.extend([op, len(words), *words])
        self.count += 1
        return len(self.prog) - len(words) - 2

    # -- nodes
    def node(self, n: Node, env: dict):
        args = torch.fx.node.map_arg(n.args, lambda a: env[a])
        kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: env[a])
        if n.op == "call_method":
            mod = args[0]
            if isinstance(mod, PackedLinear):
                return self.linear(n, mod, args[1])
            if isinstance(mod, PackedKVCache):
                return self.kv_cache(n, mod, *args[1:], **kwargs)
            raise Unsupported(f"{n.name}: {type(mod).__name__}.forward")
        t = n.target
        if t in VIEWS:
            v = t(*args, **kwargs)
            x = args[0]
            if isinstance(v, Tensor) and v.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
                # a reshape that copies (a non-contiguous input): copy into a contiguous buffer, then view it
                buf = self.buffer(n, x.shape, dtype=x.dtype)
                self.ew(n, EW_COPY, x, None, buf)
                v = t(buf, *args[1:], **kwargs)
                if v.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr():
                    raise Unsupported(f"{n.name}: {t} copies even a contiguous input")
            if t is aten.slice.Tensor and len(n.args) > 3 and n.args[3] is getattr(self, "dyn_node", None):
                base = args[0]
                dim = args[1] if len(args) > 1 else 0
                size = base.shape[dim]
                self.dyn_max = size if self.dyn_max is None else min(self.dyn_max, size)
            return v
        kind = self.targets.get(t)
        if kind == "rms_norm":
            return self.rms_norm(n, *args)
        if kind == "rope":
            return self.rope(n, *args)
        if kind == "attention":
            return self.attention(n, *args, **kwargs)
        if t in ELEMENTWISE and not kwargs and len(args) == 2 and all(
                isinstance(a, Tensor) and a.dtype == torch.float32 and a.is_contiguous() for a in args) \
                and args[0].shape == args[1].shape:
            return self.elementwise(n, ELEMENTWISE[t], *args)
        if t is aten.silu.default:
            return self.silu_(n, *args)
        if t is aten.index_copy_.default:
            return self.index_copy(n, *args)
        if t in GENERIC or getattr(t, "_qpass_mask", False):
            return self.generic(n, t, args, kwargs)
        raise Unsupported(f"{n.name}: {t}")

    # -- the small ops: T_EW, T_ARANGE, T_GATHER
    def ew(self, n, op: int, a, b, out: Tensor) -> None:
        """out = op(a, b) with a, b broadcast to out (b None: unary; a number: T_EW's scalar)."""
        if out.dim() > 4:
            raise Unsupported(f"{n.name}: more than 4 dims")
        try:
            av = a.expand(out.shape)
            bv = b.expand(out.shape) if isinstance(b, Tensor) else None
        except RuntimeError as e:
            raise Unsupported(f"{n.name}: operands do not broadcast to the output ({e})") from None
        if any(t is not None and t.dtype not in DTYPES for t in (av, bv, out)):
            raise Unsupported(f"{n.name}: a dtype T_EW does not take")
        if b is not None and not isinstance(b, (Tensor, int, float)):
            raise Unsupported(f"{n.name}: operand {b!r}")

        def four(t):
            pad = 4 - t.dim()
            return [1] * pad + list(t.shape), [0] * pad + [st if sz > 1 else 0 for st, sz in zip(t.stride(), t.shape)]
        size, so = four(out)
        _, sa = four(av)
        sb = four(bv)[1] if bv is not None else [0] * 4
        scalar = float(b) if b is not None and not isinstance(b, Tensor) else 0.0
        self.ins(T_EW, op, DTYPES[av.dtype], DTYPES[bv.dtype] if bv is not None else 0, DTYPES[out.dtype], *size,
                 self.ref(av), *sa, self.ref(bv), *sb, scalar, self.ref(out), *so)

    def generic(self, n, t, args, kwargs):
        if t in (aten.arange.default, aten.arange.start):
            start, end = (0, args[0]) if t is aten.arange.default else (args[0], args[1])
            dtype = kwargs.get("dtype") or (torch.int64 if all(isinstance(v, int) for v in (start, end))
                                            else torch.float32)
            if not (isinstance(start, int) and isinstance(end, int)) or dtype not in (torch.int64, torch.float32):
                raise Unsupported(f"{n.name}: arange of non-int bounds or dtype {dtype}")
            out = self.buffer(n, (max(end - start, 0),), dtype=dtype)
            self.ins(T_ARANGE, self.ref(out), DTYPES[dtype], start, out.numel())
            return out
        if t is aten.embedding.default:
            w, ids = args[0], args[1]
            if not (w.dtype == torch.float32 and w.dim() == 2 and w.stride(1) == 1 and ids.dtype == torch.int64
                    and ids.is_contiguous()):
                raise Unsupported(f"{n.name}: embedding of {w.dtype} rows by {ids.dtype} ids")
            out = self.buffer(n, (*ids.shape, w.shape[1]))
            self.ins(T_GATHER, self.ref(out), self.ref(w), self.ref(ids), ids.numel(), w.shape[1], w.shape[0],
                     w.stride(0))
            return out
        if t in TO:                                       # the dtype it asks for; the same: the input itself
            x = args[0]
            dtype = (args[1] if t is aten.to.dtype and len(args) > 1 else args[2] if t is aten.to.device
                     and len(args) > 2 else None) or kwargs.get("dtype") or x.dtype
            device = args[1] if t is aten.to.device else kwargs.get("device")
            if device is not None and torch.device(device).type != "cpu":
                raise Unsupported(f"{n.name}: a copy to {device}")
            if dtype == x.dtype and t in (aten.to.dtype, aten.to.dtype_layout, aten.to.device) and not kwargs.get(
                    "copy", False) and not (len(args) > 3 and args[3]):
                return x
            out = self.buffer(n, x.shape, dtype=dtype)
            self.ew(n, EW_COPY, x, None, out)
            return out
        meta = torch.fx.node.map_aggregate(
            (args, kwargs), lambda a: torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
            if isinstance(a, Tensor) else a)
        try:
            res = t(*meta[0], **meta[1])
        except Exception as e:                            # noqa: BLE001 (any op's own error: not taped)
            raise Unsupported(f"{n.name}: {t} on these arguments ({e})") from None
        if not isinstance(res, Tensor):
            raise Unsupported(f"{n.name}: {t} returns {type(res).__name__}")
        if t is aten.cat.default:
            parts = args[0]
            dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % res.dim()
            out = self.buffer(n, res.shape, dtype=res.dtype)
            at = 0
            for part in parts:
                self.ew(n, EW_COPY, part, None, out.narrow(dim, at, part.shape[dim]))
                at += part.shape[dim]
            return out
        if t in (aten.copy_.default, aten.add_.Tensor):
            if kwargs.get("alpha", 1) != 1 or len(args) > 2 and t is aten.copy_.default and args[2]:
                raise Unsupported(f"{n.name}: {t} with options")
            self.ew(n, GENERIC[t], args[1] if t is aten.copy_.default else args[0],
                    None if t is aten.copy_.default else args[1], args[0])
            return args[0]
        if res is meta[0][0]:                             # to() that changes nothing: the input itself
            return args[0]
        if kwargs.get("alpha", 1) != 1:
            raise Unsupported(f"{n.name}: {t} with alpha")
        out = self.buffer(n, res.shape, dtype=res.dtype)
        op = EW_MASK if getattr(t, "_qpass_mask", False) else GENERIC[t]
        unary = op in (EW_COPY, EW_COS, EW_SIN, EW_NEG, EW_MASK, EW_NOT)
        self.ew(n, op, args[0], None if unary else args[1], out)
        return out

    @staticmethod
    def _f32c(n: Node, *ts) -> None:
        for t in ts:
            if not (isinstance(t, Tensor) and t.dtype == torch.float32 and t.is_contiguous()):
                raise Unsupported(f"{n.name}: an input that is not a contiguous fp32 tensor")

    def rms_norm(self, n, x, w, eps):
        self._f32c(n, x, w)
        d = x.shape[-1]
        if w.numel() != d:
            raise Unsupported(f"{n.name}: weight size")
        out = self.buffer(n, x.shape)
        self.ins(T_RMS, self.ref(x), x.numel() // d, d, self.ref(w), float(eps), self.ref(out))
        return out

    def rope(self, n, x, cos, sin):
        if x.dim() != 4 or x.dtype != torch.float32 or x.stride(3) != 1:
            raise Unsupported(f"{n.name}: rope input layout")
        b, h, t, d = x.shape
        ok = (b, 1, t, d), (b, t, d)
        if not (cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous()
                and tuple(cos.shape) in ok and tuple(sin.shape) == tuple(cos.shape)):
            raise Unsupported(f"{n.name}: rope tables")
        out = self.buffer(n, (b, h, t, d), (t * h * d, d, h * d, 1))
        sb, sh, st, _ = x.stride()
        self.ins(T_ROPE, self.ref(x), b, h, t, d, sb, sh, st, self.ref(cos), self.ref(sin), self.ref(out))
        return out

    def attention(self, n, q, k, v, mask, scale):
        b, hq, t, d = q.shape
        hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
        if (t > native.ATTENTION_MAX_T or nk == 0 or hq % hkv or k.shape[0] != b or v.shape[:3] != k.shape[:3]
                or k.shape[-1] != d or not (q.dtype == k.dtype == v.dtype == torch.float32)
                or any(x.stride(-1) != 1 and x.shape[-1] != 1 for x in (q, k, v))):
            raise Unsupported(f"{n.name}: attention shapes or layout")
        if mask is not None:
            if mask.dtype != torch.float32:
                raise Unsupported(f"{n.name}: a mask that is not fp32")
            mask = mask.expand(b, hq, t, nk)
            if mask.stride(-1) != 1 and nk > 1:
                raise Unsupported(f"{n.name}: mask layout")
            ms = [s if size > 1 else 0 for s, size in zip(mask.stride()[:3], mask.shape[:3])]
        else:
            ms = [0, 0, 0]
        out = self.buffer(n, (b, hq, t, dv))
        self.ins(T_ATT, self.ref(q), b, hq, t, d, *q.stride()[:3], self.ref(k), hkv, nk, *k.stride()[:3],
                 self.ref(v), dv, *v.stride()[:3], self.ref(mask), *ms, float(scale), self.ref(out))
        return out

    def elementwise(self, n, op, a, b):
        """add / mul of two contiguous fp32 tensors of one shape (node() checks that; else T_EW)."""
        out = self.buffer(n, a.shape)
        if op == T_MUL:
            for x, y in ((n.args[0], b), (n.args[1], a)):
                i = self.silu.get(x)
                if i is not None and len(x.users) == 1 and x not in self.fresh_nodes:
                    # silu(x) * y: one silu_mul here (y may come after the silu) instead of silu then mul
                    src = self.prog[i + 2:i + 4]
                    del self.names[_ordinal(self.prog, i)]
                    del self.prog[i:i + 7]
                    self.count -= 1
                    for j, at in self.silu.items():           # the instructions after it moved by 7 words
                        if at > i:
                            self.silu[j] = at - 7
                    del self.silu[x]
                    self.ins(T_SILU_MUL, src, self.ref(y), self.ref(out), a.numel())
                    return out
        self.ins(op, self.ref(a), self.ref(b), self.ref(out), a.numel())
        return out

    def silu_(self, n, a):
        self._f32c(n, a)
        out = self.buffer(n, a.shape)
        i = self.ins(T_SILU, self.ref(a), self.ref(out), a.numel())
        self.silu[n] = i
        return out

    def index_copy(self, n, dst, dim, index, src):
        if not (dst.dim() == src.dim() == 4 and dim in (2, -2) and dst.dtype == src.dtype == torch.float32
                and index.dtype == torch.int64 and index.is_contiguous() and index.dim() == 1
                and index.numel() == src.shape[2] and dst.shape[:2] == src.shape[:2]
                and dst.shape[3] == src.shape[3] and dst.stride(3) == 1 and src.stride(3) == 1):
            raise Unsupported(f"{n.name}: index_copy_ other than rows of a [B, H, L, D] cache")
        b, h, t, d = src.shape
        self.ins(T_ROWCOPY, self.ref(dst), self.ref(src), self.ref(index), b, h, t, d, *dst.stride()[:3],
                 dst.shape[2], *src.stride()[:3])
        return dst

    def linear(self, n, mod: PackedLinear, x):
        k = mod.wf.k
        if not (isinstance(x, Tensor) and x.dtype == torch.float32 and x.is_contiguous() and x.numel() % k == 0):
            raise Unsupported(f"{n.name}: a linear input that is not contiguous fp32 rows")
        m = x.numel() // k
        runners = mod._runners
        run = runners.get(bucket(m))
        call = getattr(run, "native", None)
        if call is None:
            raise Unsupported(f"{n.name}: the kernel chosen at M = {m} ({mod.plan.get(bucket(m))}) has no native "
                              "form")
        self.modules[id(mod)] = (mod, runners)
        a = call.args
        out = self.buffer(n, (*x.shape[:-1], call.n))
        if call.kind in ("q4", "w8") and a["bits"]:    # the input fake-quantized per token first (W4A8 / W8A8 on
            lo, hi = native._QRANGE[a["bits"]]          # a float kernel)
            fq = self.scratch_buffer(("fq", m, k), (m, k), torch.float32)
            sa = self.scratch_buffer(("scales", m), (m,), torch.float32)
            self.ins(T_FQ, self.ref(x), m, k, lo, hi, self.ref(fq), self.ref(sa))
            x = fq
        if call.kind == "q4":
            if a["k16"] != k:            # whole groups: the rows copied into a zero-padded buffer
                xp = self.scratch_buffer(("pad", m, a["k16"]), (m, a["k16"]), torch.float32).zero_()
                for r in range(m):
                    self.ins(T_COPY, self.ref(xp[r]), self.ref(x.view(m, k)[r]), 4 * k)
                x = xp
            self.ins(T_Q4, self.ref(x), m, a["k16"], self.ref(a["w"]), call.n, self.ref(a["s"]), self.ref(a["z"]),
                     a["group"], self.ref(a["bias"]), self.ref(out), a["a8"])
        elif call.kind == "q4i8":
            lo, hi = native._QRANGE[a["bits"]]
            codes = self.scratch_buffer(("codes", m, k), (m, k), torch.int8)
            sa = self.scratch_buffer(("scales", m), (m,), torch.float32)
            self.ins(T_Q4I8, self.ref(x), m, k, a["k16"], self.ref(a["w"]), call.n, self.ref(a["s"]),
                     self.ref(a["z"]), a["group"], self.ref(a["bias"]), self.ref(out), lo, hi, self.ref(codes),
                     self.ref(sa))
        elif call.kind == "w8":
            self.ins(T_W8, self.ref(x), m, k, self.ref(a["w"]), call.n, self.ref(a["ws"]), self.ref(a["zc"]),
                     self.ref(a["bias"]), self.ref(out), a["a8"])
        elif call.kind == "i8":
            lo, hi = native._QRANGE[a["bits"]]
            codes = self.scratch_buffer(("codes", m, k), (m, k), torch.int8)
            sa = self.scratch_buffer(("scales", m), (m,), torch.float32)
            self.ins(T_I8, self.ref(x), m, k, self.ref(a["w"]), call.n, self.ref(a["ws"]), self.ref(a["bias"]),
                     self.ref(out), self.ref(a["wsum"]), lo, hi, self.ref(codes), self.ref(sa))
        else:
            raise Unsupported(f"{n.name}: kernel family {call.kind}")
        return out

    def kv_cache(self, n, mod: PackedKVCache, k, pos, n_keys=None):
        buf = mod._buffers
        codes, scales, bits = buf.get("codes"), buf.get("scale"), mod._native_bits
        if not (mod._native and isinstance(k, Tensor) and k.dtype == torch.float32 and k.dim() == 4
                and k.stride(3) == 1 and mod.dtype == torch.float32 and isinstance(pos, Tensor)
                and pos.dtype == torch.int64 and pos.is_contiguous() and pos.dim() == 1):
            raise Unsupported(f"{n.name}: a KV cache off its native store / load")
        b, h, t, d = k.shape
        cb, ch, max_len, w = codes.shape
        if (cb, ch) != (b, h) or pos.numel() != t or not (codes.is_contiguous() and scales.is_contiguous()):
            raise Unsupported(f"{n.name}: cache layout")
        shared = int(scales.numel() != b * h * max_len)
        self._own(codes)                                  # the module's own buffers: fixed for the graph's life
        self._own(scales)
        self.ins(T_KVSTORE, self.ref(k), b, h, t, d, *k.stride()[:3], self.ref(pos), max_len, bits, shared,
                 self.ref(codes), self.ref(scales))
        nk = max_len if n_keys is None else min(int(n_keys), max_len)
        out = self.buffer(n, (b, h, max_len, d))
        self.ins(T_KVLOAD, self.ref(codes), self.ref(scales), b * h, max_len, nk, d, bits, h if shared else 1,
                 self.ref(out))
        if n_keys is not None and len(n.args) > 3 and n.args[3] is getattr(self, "dyn_node", None):
            self.dyn_max = max_len if self.dyn_max is None else min(self.dyn_max, max_len)
            self.dyn_views[n] = (out, (False, False, True, False))
        return out[:, :, :nk]


def _ordinal(prog: list[int], at: int) -> int:
    """The index of the instruction that starts at word `at`."""
    pc = k = 0
    while pc < at:
        pc, k = pc + 2 + prog[pc + 1], k + 1
    return k


_OP_NAMES = {v: k[2:].lower() for k, v in dict(globals()).items() if k.startswith("T_") and isinstance(v, int)}


__all__ = ["native_segments", "graph_nodes", "Segment", "Unsupported"]
