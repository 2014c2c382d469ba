"""Pass infrastructure: Pass, PassResult, Context (calibration data + cached analyses), Pipeline, Report.

A pass is a frozen object holding its typed config, with ``run(gm, ctx) -> PassResult``: it decides (reads
the graph, its config and ``ctx``: data, analyses), records its decisions as a ``qpass.plan.Plan`` and applies
the plan with its classmethod ``apply(gm, plan)``, the data-free step that ``qpass.load`` and the other
captures of a saved model (decode graph, ONNX step) repeat without running the pass. It writes only ``gm``
and reports what it did in ``PassResult.stats``.
The pipeline runs passes in order, lints after each, drops cached analyses a pass does not declare it
preserves, adds a report row (stats, node delta, time, optional verify difference) and wraps failures
in ``PassError("<pass> failed after [...]")``.

Analyses (``qpass.analyses``: LinearSites, AttentionSites, FoldGroups, ResidualStream, Observed, ActAbsMax,
Hessians) are small frozen keys with ``compute(gm, ctx)``; ``ctx.get(key)`` computes one on first use and
caches it under the key (equal keys share a result). A pass lists in ``preserves`` the analysis *types*
still valid after it changed the graph; everything else is dropped. An analysis whose result depends on
weight values (``reads_weights``: calibration statistics) cannot be preserved by a pass that changes
weights (``changes_weights``): that is refused when the pass class is defined.

The context owns the calibration engine and the weight store: ``ctx.observe(nodes, make)`` and
``ctx.sweep(...)`` run calibration data in memory or, with the weights on disk, one segment at a time, and
``ctx.loaded(names)`` holds parameters in memory; a pass never asks which mode it runs in.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch.fx import GraphModule, Node

from . import tables
from .calibration import CalibrationSet, observe, run_graph
from .errors import PassError, QpassError, RecipeError, TargetNotFoundError
from .plan import Plan, PlanError

if TYPE_CHECKING:
    from .streaming import WeightStore

log = logging.getLogger("qpass.pipeline")


class Analysis(ABC):
    """A cached graph analysis: subclasses are frozen dataclasses (the cache key) with ``compute``."""

    reads_weights: ClassVar[bool] = False    # the result depends on parameter values, not only on structure

    @abstractmethod
    def compute(self, gm: GraphModule, ctx: "Context") -> Any: ...


@dataclass
class PassResult:
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    # matches that failed a check: "model.layers.0.mlp.down_proj: in_features 704 % 128 != 0" etc.
    near_misses: list[str] = field(default_factory=list)
    plan: Plan | None = None     # what it decided (every pass that changes the graph records one)


class Pass(ABC):
    """Subclasses are frozen dataclasses with a `config` field and `name` = the recipe kind."""

    name: ClassVar[str]
    preserves: ClassVar[tuple[type[Analysis], ...]] = ()   # analysis types still valid after this pass
    changes_weights: ClassVar[bool] = True                 # may change parameter values (the safe default)
    sees_later: ClassVar[tuple[type, ...]] = ()            # config types of later passes it reads (bind_later)
    needs_calibration: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for a in cls.__dict__.get("preserves", ()):
            if not (isinstance(a, type) and issubclass(a, Analysis)):
                raise TypeError(f"{cls.__name__}.preserves lists {a!r}: give Analysis types (qpass.analyses)")
            if a.reads_weights and cls.changes_weights:
                raise TypeError(f"{cls.__name__} changes weights, so it cannot preserve {a.__name__} (its result "
                                "depends on weight values)")

    @abstractmethod
    def run(self, gm: GraphModule, ctx: "Context") -> PassResult: ...

    @classmethod
    def apply(cls, gm: GraphModule, plan: Plan) -> None:
        """Apply a plan this pass recorded to `gm`, with no data (placeholders for tensors the plan does not
        carry). Default, for passes that change parameter values only: nothing to do in the graph."""
        if plan.structural:
            raise PlanError(f"{cls.__name__} has no apply step for a plan that changes the graph",
                            fix="report this as a qpass bug: the pass must implement apply")

    def bind_later(self, configs: list) -> "Pass":
        """This pass with the configs of the recipe's later passes it declares in ``sees_later`` (config types)
        in its ``later`` field (AWQ searches for the weight quantizer a later quantize pass applies). The
        dependency is declared on the class and visible on the pass object; nothing reaches passes through
        the context."""
        if not self.sees_later:
            return self
        return dataclasses.replace(self, later=tuple(c for c in configs if isinstance(c, self.sees_later)))

    def preflight(self, gm: GraphModule, ctx: "Context") -> None:
        """Refuse, before any pass of the pipeline runs, what this pass would only find out later (a missing
        data file, a sequence length the model cannot take), so a recipe fails in seconds and not after the
        passes before it. Raises a QpassError whose path is relative to the pass (``qat.data``); the
        pipeline adds ``passes[i].``. Default: nothing to check."""

    def streaming_refusal(self) -> str | None:
        """Why this pass cannot run with the weights on disk (``qpass.apply_from_disk``), or None. Checked
        before anything runs; a pass that reads an unloaded weight anyway fails at that read. Default: a
        block-by-block pass (a config with ``sequential``) refuses its whole-model mode."""
        if getattr(getattr(self, "config", None), "sequential", True) is False:
            return "sequential: false calibrates the whole model in one run, which needs every weight in memory"
        return None


class Context:
    """What passes share: calibration data, cached analyses (``get``), and the calibration engine and weight
    store (``observe``, ``sweep``, ``loaded``: in memory, or with the weights on disk in streaming mode, the
    same calls)."""

    def __init__(self, calib: CalibrationSet | None = None, *, progress: bool = True, teacher=None,
                 store: WeightStore | None = None):
        self.calib = calib
        self.progress = progress
        self.teacher = teacher      # the unmodified full-precision model (QAT distills from it)
        self.store = store          # None: every parameter is in memory
        self._cache: dict[Analysis, Any] = {}
        self._gm: GraphModule | None = None       # the graph the cached analyses describe
        self.computed: dict[type, int] = {}       # analysis type -> times computed (tests, debugging)

    def get(self, key: Analysis, gm: GraphModule | None = None) -> Any:
        """The result of analysis `key` on `gm` (default: the graph the pipeline runs on), computed on first use
        and cached until a pass that does not preserve its type changes the graph."""
        if not isinstance(key, Analysis):
            raise TypeError(f"ctx.get takes an Analysis (qpass.analyses), got {type(key).__name__}")
        gm = gm if gm is not None else self._gm
        if gm is None:
            raise ValueError("ctx.get needs the graph: pass gm (the pipeline sets it for its passes)")
        if gm is not self._gm:
            self._gm, self._cache = gm, {}
        if key not in self._cache:
            self.computed[type(key)] = self.computed.get(type(key), 0) + 1
            self._cache[key] = key.compute(gm, self)
        return self._cache[key]

    def bind(self, gm: GraphModule) -> None:
        """Analyses from now on describe `gm` (the pipeline calls this before its first pass)."""
        if gm is not self._gm:
            self._gm, self._cache = gm, {}

    def invalidate(self, keep: Iterable[type] = ()) -> None:
        """Drop every cached analysis whose type is not in `keep`."""
        keep = tuple(keep)
        self._cache = {k: v for k, v in self._cache.items() if isinstance(k, keep)}

    # -- the calibration engine and the weight store: the same calls in memory and streaming from disk
    def loaded(self, names: Iterable[str]) -> AbstractContextManager:
        """Parameters `names` (get_attr targets) hold their values inside the with-block: read from disk in
        streaming mode and written back if changed; a no-op when the model is in memory."""
        return self.store.loaded(names) if self.store is not None else contextlib.nullcontext()

    def observe(self, gm: GraphModule, nodes: Mapping[Any, Node], make: Callable[[Any, Node], Any], *,
                who: str, desc: str = "calibrating") -> dict[Any, Any]:
        """``make(key, node)`` observers on `nodes`, fed every calibration sample of the graph as it is:
        {key: observer}. One run over the whole graph in memory; with the weights on disk, one segment
        (stem, block, tail) at a time so that only its weights are loaded. `who` names the caller in the
        error raised when there is no calibration data."""
        from .block_sweep import observe_by_block

        calib = self.require_calibration(who)
        if self.store is None:
            return observe(gm, nodes, make, calib, desc=desc, progress=self.progress)
        return observe_by_block(gm, nodes, make, calib, store=self.store, desc=desc, progress=self.progress)

    def sweep(self, gm: GraphModule, *, who: str, blocks: bool = True, feed: str = "quantized",
              desc: str = "calibrating"):
        """A block-by-block ``qpass.block_sweep.Sweep`` over the calibration data (each segment's weights loaded
        for its step when they are on disk)."""
        from .block_sweep import Sweep

        return Sweep(gm, self.require_calibration(who), blocks=blocks, feed=feed, progress=self.progress,
                     desc=desc, store=self.store)

    def require_calibration(self, who: str) -> CalibrationSet:
        from .errors import CalibrationError

        if self.calib is None or len(self.calib) == 0:
            raise CalibrationError(f"{who} needs calibration data and none was given",
                                   fix="pass calib_data=[input_ids, ...] to qpass.apply (token-id tensors or "
                                       "dicts with 'input_ids'), or use dynamic activations")
        return self.calib


@dataclass
class ReportRow:
    name: str
    stats: dict
    nodes_added: int
    nodes_removed: int
    seconds: float
    near_misses: list[str] = field(default_factory=list)
    verify: dict | None = None   # {"max_abs_diff": .., "mean_abs_diff": ..} vs the previous stage


class Report:
    """One row per pass; ``report["quantize"].stats``; ``print(report)`` shows a table."""

    def __init__(self, rows: list[ReportRow] | None = None, plans: list[Plan] | None = None):
        self.rows = rows or []
        self.plans = list(plans or [])    # one per pass, in order (qpass.plan)

    def __getitem__(self, name: str) -> ReportRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no pass named {name!r} in this report (passes: {[r.name for r in self.rows]})")

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)

    def to_dict(self) -> list[dict]:
        return [vars(r).copy() for r in self.rows]

    def __str__(self) -> str:
        head = ["pass", "nodes +/-", "time", "verify max|Δ|", "stats"]
        body = []
        for r in self.rows:
            stats = ", ".join(f"{k}={v}" for k, v in r.stats.items() if not isinstance(v, (dict, list)))
            ver = f"{r.verify['max_abs_diff']:.3g}" if r.verify else "-"
            body.append([r.name, f"+{r.nodes_added}/-{r.nodes_removed}", f"{r.seconds:.2f}s", ver, stats])
        lines = tables.text(head, body).split("\n")
        for r in self.rows:
            lines += [f"  {r.name}: skipped {m}" for m in r.near_misses[:20]]
            if len(r.near_misses) > 20:
                lines.append(f"  {r.name}: ... {len(r.near_misses) - 20} more")
        return "\n".join(lines)


class Pipeline:
    def __init__(self, passes: list[Pass], *, verify: bool = False, verify_samples: int = 2):
        self.passes = [p.bind_later([getattr(q, "config", None) for q in passes[i + 1:]])
                       for i, p in enumerate(passes)]
        self.verify = verify
        self.verify_samples = verify_samples

    def run(self, gm: GraphModule, ctx: Context) -> Report:
        """Run the passes in order. Pass i is item ``passes[i]`` of the recipe: errors name it that way."""
        if ctx.calib is not None:      # bad samples fail here, not as an IndexError inside a pass
            ctx.calib.check(gm)
        for i, p in enumerate(self.passes):
            with _located(i, p, None):
                p.preflight(gm, ctx)
        ctx.bind(gm)
        report, done = Report(), []
        verify_inputs = self._verify_inputs(ctx)
        ref = self._outputs(gm, verify_inputs)
        for i, p in enumerate(self.passes):
            before = set(gm.graph.nodes)
            t0 = time.perf_counter()
            with _located(i, p, done):
                result = p.run(gm, ctx)
                if result.plan is None:
                    if result.modified:
                        raise PlanError(f"{p.name} changed the graph but recorded no plan, so a saved model "
                                        "could not be loaded", fix="report this as a qpass bug")
                    result.plan = Plan(p.name)
                gm.graph.lint()
                gm.recompile()
            seconds = time.perf_counter() - t0
            after = set(gm.graph.nodes)
            row = ReportRow(p.name, result.stats, len(after - before), len(before - after), seconds,
                            result.near_misses)
            if result.modified:
                ctx.invalidate(keep=p.preserves)
            if verify_inputs:
                out = self._outputs(gm, verify_inputs)
                row.verify = _diff(ref, out)
                ref = out
            log.info("%s: %s (%.2fs)", p.name, result.stats, seconds)
            report.rows.append(row)
            report.plans.append(result.plan.without_values())
            done.append(p.name)
        return report

    def _verify_inputs(self, ctx: Context):
        if not self.verify or ctx.calib is None:
            return []
        return ctx.calib.samples[: self.verify_samples]

    @staticmethod
    def _outputs(gm: GraphModule, inputs) -> list[torch.Tensor]:
        return [run_graph(gm, x) for x in inputs]


@contextlib.contextmanager
def _located(i: int, p: Pass, done: list[str] | None):
    """Errors of pass `p`, item i of the recipe, run after the passes `done` (None: its preflight check). A
    qpass error keeps its type, its recipe path gets the ``passes[i].`` prefix parse errors have
    (``passes[0].quantize.targets[0]``) and the message names the pipeline position; anything else becomes
    PassError("<pass> failed after [...]"), chained."""
    try:
        yield
    except PassError:
        raise
    except QpassError as e:
        _prefix_path(e, f"passes[{i}]", p.name)
        when = "checked before any pass ran" if done is None else f"after {done}"
        e.args = (f"{e}\n  in pass: passes[{i}].{p.name} ({when})",) + e.args[1:]
        raise
    except Exception as e:  # noqa: BLE001 - chained
        raise PassError(p.name, done or [], e) from e


def _prefix_path(e: QpassError, item: str, name: str) -> None:
    """Rewrite the recipe path an error starts with (RecipeError.path, TargetNotFoundError.where) from
    relative to the pass (``quantize.targets[0]``, ``seq_len`` or none) to the full ``passes[i].`` path."""
    attr = "path" if isinstance(e, RecipeError) else "where" if isinstance(e, TargetNotFoundError) else None
    if attr is None:
        return
    where = getattr(e, attr) or ""
    if where.startswith("passes["):
        return
    head = where.split(".", 1)[0].split("[", 1)[0]
    full = f"{item}.{where}" if head == name else f"{item}.{name}.{where}" if where else f"{item}.{name}"
    text = str(e)
    e.args = ((full + text[len(where):]) if where and text.startswith(where) else f"{full}: {text}",) + e.args[1:]
    setattr(e, attr, full)


def _diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict:
    d = [(x.float() - y.float()).abs() for x, y in zip(a, b)]
    return {"max_abs_diff": max(float(t.max()) for t in d),
            "mean_abs_diff": sum(float(t.mean()) for t in d) / len(d)}
