"""Pass infrastructure: Pass, PassResult, Context (calibration data + cached analyses), Pipeline, Report.

A pass is a frozen object holding its typed config, with one method ``run(gm, ctx) -> PassResult``. It
reads the graph, its config and ``ctx``; writes only ``gm``; records what it did in ``PassResult.stats``.
The pipeline runs passes in order, lints after each, drops cached analyses a pass does not declare it
preserves, adds a report row (stats, node delta, time, optional verify difference) and wraps failures
in ``PassError("<pass> failed after [...]")``.
"""
from __future__ import annotations

import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch.fx import GraphModule

from .calibration import CalibrationSet, run_graph
from .errors import PassError, QpassError, RecipeError, TargetNotFoundError

if TYPE_CHECKING:
    from .offload import WeightStore

log = logging.getLogger("qpass.pipeline")


@dataclass
class PassResult:
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    # matches that failed a check: "model.layers.0.mlp.down_proj: in_features 704 % 128 != 0" etc.
    near_misses: list[str] = field(default_factory=list)


class Pass(ABC):
    """Subclasses are frozen dataclasses with a `config` field and `name` = the recipe kind."""

    name: ClassVar[str]
    preserves: ClassVar[tuple[str, ...]] = ()   # analysis keys still valid after this pass
    needs_calibration: ClassVar[bool] = False

    @abstractmethod
    def run(self, gm: GraphModule, ctx: "Context") -> PassResult: ...

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
    """What passes share: calibration data, cached analyses, whether we are *restoring* a saved model
    (then passes rebuild structure only; numbers come from the saved state dict), and in streaming mode the
    store the weights are on (passes read weights inside ``ctx.loaded(names)``)."""

    def __init__(self, calib: CalibrationSet | None = None, *, restoring: bool = False,
                 progress: bool = True, teacher=None, store: WeightStore | None = None):
        self.calib = calib
        self.restoring = restoring
        self.progress = progress
        self.teacher = teacher      # the unmodified full-precision model (QAT distills from it)
        self.store = store          # None: every parameter is in memory
        self.upcoming: tuple = ()   # configs of the passes after the running one (AWQ reads quantize's spec)
        self._cache: dict[Any, Any] = {}

    def get(self, key: Any, compute: Callable[[], Any]) -> Any:
        """A cached analysis (e.g. activation statistics), computed on first use."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def loaded(self, names: Iterable[str]) -> AbstractContextManager:
        """Parameters `names` (get_attr targets) hold their values inside the with-block: read from disk in
        streaming mode and written back if changed; a no-op when the model is in memory."""
        return self.store.loaded(names) if self.store is not None else contextlib.nullcontext()

    def invalidate(self, keep: Iterable[Any] = ()) -> None:
        keep = set(keep)
        self._cache = {k: v for k, v in self._cache.items() if (k[0] if isinstance(k, tuple) else k) in keep}

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

    def __init__(self, rows: list[ReportRow] | None = None):
        self.rows = rows or []

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
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row) for row in body]
        for r in self.rows:
            lines += [f"  {r.name}: skipped {m}" for m in r.near_misses[:20]]
            if len(r.near_misses) > 20:
                lines.append(f"  {r.name}: ... {len(r.near_misses) - 20} more")
        return "\n".join(lines)


class Pipeline:
    def __init__(self, passes: list[Pass], *, verify: bool = False, verify_samples: int = 2):
        self.passes = passes
        self.verify = verify
        self.verify_samples = verify_samples

    def run(self, gm: GraphModule, ctx: Context) -> Report:
        """Run the passes in order. Pass i is item ``passes[i]`` of the recipe: errors name it that way."""
        if not ctx.restoring:
            if ctx.calib is not None:      # bad samples fail here, not as an IndexError inside a pass
                ctx.calib.check(gm)
            for i, p in enumerate(self.passes):
                with _located(i, p, None):
                    p.preflight(gm, ctx)
        report, done = Report(), []
        verify_inputs = self._verify_inputs(ctx)
        ref = self._outputs(gm, verify_inputs)
        for i, p in enumerate(self.passes):
            ctx.upcoming = tuple(getattr(q, "config", None) for q in self.passes[i + 1:])
            before = set(gm.graph.nodes)
            t0 = time.perf_counter()
            with _located(i, p, done):
                result = p.run(gm, ctx)
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
            done.append(p.name)
        return report

    def _verify_inputs(self, ctx: Context):
        if not self.verify or ctx.restoring or ctx.calib is None:
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
