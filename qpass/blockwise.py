"""Block-wise reconstruction: train a few tensors of one decoder block at a time against the float block.

OmniQuant, SignRound, ZeroQuant's LKD and Norm Tweaking share one mechanism, which lives here once; each
method is a small pass that says what is trainable (a :class:`BlockMethod`). For every block of the graph
(``qpass.block_sweep``: stem, ``model.layers.0`` .. ``model.layers.<n-1>``, tail):

* **teacher**: the float block (every qpass quantizer the identity) on the float model's inputs of that
  block; its outputs (the values later segments read: the residual stream) are the targets;
* **student**: the block as the graph now is (the recipe's quantizers live, straight-through estimator),
  with the method's trainable tensors substituted for graph values (:meth:`BlockState.overrides`: a node ->
  a differentiable tensor, e.g. a weight quantizer's output computed from learned rounding offsets). Its
  inputs are the float ones (``feed: float``) or the outputs of the blocks before it as already trained and
  baked (``feed: quantized``);
* **loss**: the method's (:meth:`BlockState.loss`), MSE of the block outputs by default, on a random batch
  of calibration samples per step (``torch.Generator`` seeded with ``seed``: deterministic), or, with
  ``epochs``, ``epochs`` passes over the training samples, each in a fresh seeded order (OmniQuant's loop).
  ``aug_loss`` (OmniQuant's ``--aug_loss``, off by default) adds a second target: the float block (quantizers
  off, the teacher's weights) run on the *student's* inputs, computed once per block before training; the loss
  is then loss(student, teacher) + loss(student, that target), for the training steps and for the best-step /
  start-or-trained choice alike (with ``feed: float``, and on the first block, the two targets are the same and
  the loss is doubled);
* **optimiser**: ``signsgd`` (p -= lr * sign(grad), SignRound), ``adam`` or ``adamw`` (weight decay 0,
  OmniQuant); ``schedule: linear`` decays the learning rate to 0 over the steps (AutoRound);
* **held-out split** (``holdout``, default 0.25): a fraction of the calibration samples (drawn with the seed,
  the same for every block) is never trained on; the best step and the start-or-trained choice below are
  made on their loss, every ``holdout_every`` steps and after the last (a deviation from the papers, which
  train and select on every sample: on small calibration sets the training loss keeps falling while held-out
  text gets worse). ``holdout: 0``: the papers' way, below with "the calibration set" for "held-out";
* **best step**: without held-out samples, the loss of each step is that of the parameters before its update
  (on its batch); the parameters of the lowest one are kept. Then the loss of that best state and of the
  initial state (the method's "do nothing": RTN, the PTQ start) on the held-out samples (or on the full
  calibration set) are compared and the better one is kept, so a block is never worse than where it started
  on the samples it is judged on (``train_blocks(block_guard=False)`` skips that choice: Norm Tweaking's
  ``guard: none``);
* **baking** (:meth:`BlockState.bake`): every learned quantity is written into ordinary graph parameters in
  place (rounded weights, quantizer scales and zero points, norm weights): no node is added, so the result
  saves, loads (through plans) and lowers like any qpass graph, and streams from disk (``apply_from_disk``:
  the sweep holds one block's weights; changes are written back in place).

Peak memory: one block's parameters and autograd graph for one sample (samples of a batch are back-propagated
one at a time, gradients accumulated), plus the carried boundary values of every calibration sample (twice
with ``feed: quantized``: float and student streams) and one block's float outputs per sample.

A graph without ``<prefix>.<int>`` blocks (a hand-built toy) is one segment, trained as one block against the
graph outputs.
"""
from __future__ import annotations

import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch.fx import GraphModule, Node
from tqdm.auto import tqdm

from .errors import RecipeError
from .graph import is_quantizer
from .quantizer import Quantizer

if TYPE_CHECKING:
    from .block_sweep import Step, Sweep
    from .calibration import CalibrationSet
    from .pass_infra import Context

log = logging.getLogger("qpass.blockwise")

Optimizer = Literal["signsgd", "adam", "adamw"]

TRAIN_DOCS = {
    "steps": "optimiser steps per block (0: no training, the start is kept); not with epochs",
    "epochs": "passes over the training samples per block, each in a fresh seeded order, in batches of batch_size "
              "(OmniQuant's budget: steps = epochs x ceil(training samples / batch_size)); 0: use steps",
    "lr": "learning rate (signsgd: the step size)",
    "batch_size": "calibration samples per step (sampled with the seed; each sample back-propagated alone)",
    "optimizer": "signsgd (p -= lr * sign(grad)), adam or adamw (weight decay 0)",
    "schedule": "learning-rate schedule over the steps: constant, or linear (decays to 0, as AutoRound)",
    "seed": "seed of the batch sampling (the run is deterministic for a seed)",
    "feed": "student inputs of block i: `quantized` (outputs of blocks 0..i-1 as trained and baked) or `float` "
            "(the float model's, the same as the teacher's)",
    "aug_loss": "add a second target to the loss: the float block (quantizers off) on the student's inputs (with "
                "feed: quantized, the outputs of the blocks already quantized), as OmniQuant's --aug_loss; the loss "
                "becomes loss(student, float block on float inputs) + loss(student, float block on student inputs)",
    "keep_best": "keep the parameters of the step with the lowest loss (false: those after the last step); either "
                 "way the start is kept when it has the lower full calibration loss",
    "holdout": "fraction of the calibration samples held out of training (the same split for every block, drawn "
               "with the seed): the best step and the start-or-trained choice are made on their loss, not on the "
               "training loss (0: train and select on every sample, as the papers do)",
    "holdout_every": "with holdout: evaluate the held-out loss every this many steps (and after the last one)",
    "targets": "module-path globs of the linears the method trains (norms: of the blocks holding them)",
    "ignore": "module-path globs to leave alone",
}


@dataclass(frozen=True)
class BlockwiseConfig:
    """The engine's settings; the config of every block-wise pass extends it (its own defaults)."""

    name: ClassVar[str] = "blockwise"
    steps: int = 200
    epochs: int = 0
    lr: float = 0.005
    batch_size: int = 8
    optimizer: Optimizer = "adam"
    schedule: Literal["constant", "linear"] = "constant"
    seed: int = 0
    feed: Literal["quantized", "float"] = "quantized"
    aug_loss: bool = False
    keep_best: bool = True
    holdout: float = 0.25
    holdout_every: int = 10
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        if not 0 <= self.steps <= 1_000_000:
            raise RecipeError("steps", f"must be an integer in [0, 1000000] (SignRound: 200), got {self.steps}")
        if not 0 <= self.epochs <= 100_000:
            raise RecipeError("epochs", f"must be an integer in [0, 100000] (OmniQuant: 20, W2: 40; 0: use steps), "
                                        f"got {self.epochs}")
        if not 0.0 < self.lr < 10.0:
            raise RecipeError("lr", f"must be in (0, 10), got {self.lr}")
        if not 1 <= self.batch_size <= 1 << 16:
            raise RecipeError("batch_size", f"must be a number of samples >= 1, got {self.batch_size}")
        if self.optimizer not in ("signsgd", "adam", "adamw"):
            raise RecipeError("optimizer", f"must be signsgd, adam or adamw, got {self.optimizer!r}")
        if self.schedule not in ("constant", "linear"):
            raise RecipeError("schedule", f"must be constant or linear, got {self.schedule!r}")
        if self.feed not in ("quantized", "float"):
            raise RecipeError("feed", f"must be quantized or float, got {self.feed!r}")
        if not 0.0 <= self.holdout < 1.0:
            raise RecipeError("holdout", f"must be a fraction in [0, 1) (0: no held-out samples), got {self.holdout}")
        if not isinstance(self.aug_loss, bool):
            raise RecipeError("aug_loss", f"must be true or false, got {self.aug_loss!r}")
        if not 1 <= self.holdout_every <= 1_000_000:
            raise RecipeError("holdout_every", f"must be a number of steps >= 1, got {self.holdout_every}")
        if not self.targets:
            raise RecipeError("targets", "must list at least one module-path glob (e.g. ['*'])")


class BlockState(ABC):
    """What a method trains in one block. `groups`: torch optimiser parameter groups (``{"params": [...]}``,
    optionally with their own ``lr``)."""

    groups: list[dict]

    @abstractmethod
    def overrides(self) -> dict[Node, torch.Tensor]:
        """Graph values the student uses instead of computing them: {node: differentiable tensor}."""

    def project(self) -> None:
        """Called after every optimiser step (clamp offsets into their range, ...)."""

    def loss(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        """Default: mean squared error of the block outputs (summed over outputs)."""
        return sum(torch.nn.functional.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher))

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for g in self.groups for p in g["params"]]

    def restore(self, snap: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip((p for g in self.groups for p in g["params"]), snap):
                p.copy_(v)

    @abstractmethod
    def bake(self, gm: GraphModule) -> dict:
        """Write the learned values into the graph's parameters in place; return a JSON record for the plan."""


class BlockMethod(ABC):
    """A block-wise method: makes the :class:`BlockState` of a block (None: nothing to train there)."""

    @abstractmethod
    def setup(self, gm: GraphModule, step: "Step", nodes: list[Node]) -> BlockState | None: ...


@dataclass
class BlockResult:
    """What training one block did (losses: mean over the samples the choice was made on)."""

    block: str
    loss_start: float
    loss_best: float
    kept: str                 # "trained" | "start" (the start had the lower full calibration loss)
    best_step: int
    steps: int
    seconds: float
    record: dict
    selected_on: str = "calibration"  # "held-out": losses on the held-out samples (holdout > 0)

    def to_dict(self) -> dict:
        return {"loss_start": self.loss_start, "loss_best": self.loss_best, "kept": self.kept,
                "best_step": self.best_step, "steps": self.steps, "seconds": round(self.seconds, 3),
                "selected_on": self.selected_on}


def train_blocks(gm: GraphModule, ctx: "Context", method: BlockMethod, cfg: BlockwiseConfig, *,
                 who: str, teacher: Callable[[str], torch.Tensor | None] | None = None,
                 calib: "CalibrationSet | None" = None, block_guard: bool = True) -> list[BlockResult]:
    """Train and bake `method` block by block (see the module doc). Returns one result per trained block.

    `teacher`: the float value of a graph parameter by get_attr target (None: the graph's own), for passes that
    run after another pass changed the float weights (Norm Tweaking after GPTQ): the teacher stream then runs
    every block with those values. `calib`: samples to train on instead of the context's calibration set.
    `block_guard`: keep a block's start when its loss is not lower than the best step's (the default); False: the
    best step is baked whatever its loss against the start (Norm Tweaking's ``guard: none``, the paper's way)."""
    from .block_sweep import Sweep

    if calib is None:
        sweep = ctx.sweep(gm, who=who, feed="float", desc=who)
    else:
        sweep = Sweep(gm, calib, feed="float", progress=ctx.progress, desc=who, store=ctx.store)
    results: list[BlockResult] = []
    student: list[dict] | None = None      # the student stream (feed: quantized), None until the first block
    progress = ctx.progress
    with contextlib.closing(iter(sweep)) as steps:   # NOTE: closed now, not by the GC: see Sweep
        for step in steps:
            if step.name in ("stem", "tail"):
                continue
            nodes, pos = sweep._segment(step.index)
            live = step._live_out(nodes, pos)
            outputs = [n for n in nodes if n in live and _is_float(n)] or _graph_outputs(nodes)
            state = method.setup(gm, step, nodes)
            over: dict = {}
            if teacher is None:
                step.observe({}, lambda k, n: None)         # float outputs of the block, kept as the targets
            else:                                           # the teacher's values in place of the graph's
                over = {a: v for a in dict.fromkeys(a for n in nodes for a in n.all_input_nodes
                                                    if a.op == "get_attr")
                        if (v := teacher(a.target)) is not None}
                keys = list(live)
                with torch.no_grad():
                    step._pending = [dict(zip(keys, _forward(sweep, nodes, env, keys, over, float_=True)))
                                     for env in step._envs]
            # NOTE: step._pending holds {node: value} per sample for the next segment; for the last (only)
            # segment nothing is carried, so the targets are computed here
            targets = step._pending if step._pending is not None and outputs and all(
                o in step._pending[0] for o in outputs) else _run_all(sweep, nodes, step._envs, outputs,
                                                                      float_=True)
            if isinstance(targets[0], dict):
                targets = [[t[o] for o in outputs] for t in targets]
            inputs = step._envs if cfg.feed == "float" or student is None else student
            aug = None
            if state is not None and cfg.aug_loss:       # the float block on the student's inputs (aug_loss)
                if inputs is step._envs:
                    aug = targets
                else:
                    with torch.no_grad():
                        aug = [_forward(sweep, nodes, env, outputs, over, float_=True) for env in inputs]
            if state is not None:
                results.append(_train(sweep, step, nodes, inputs, outputs, targets, state, cfg, gm, progress,
                                      block_guard, aug))
            if cfg.feed == "quantized" and step.index + 1 < len(sweep.names):
                with torch.no_grad():
                    student = [sweep._run(nodes, pos, env, live, {}, lambda n: False) for env in inputs]
    return results


def split_holdout(n: int, cfg: BlockwiseConfig) -> tuple[list[int], list[int]]:
    """(training, held-out) sample indices: round(holdout * n) samples drawn with the seed (the same for every
    block), at least one left on each side; no held-out samples when holdout is 0 or n < 2."""
    k = min(int(round(cfg.holdout * n)), n - 1) if n >= 2 else 0
    if k <= 0:
        return list(range(n)), []
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 7919 + 17)).tolist()
    return sorted(perm[k:]), sorted(perm[:k])


def _train(sweep: "Sweep", step: "Step", nodes: list[Node], inputs: list[dict], outputs: list[Node],
           targets: list[list[torch.Tensor]], state: BlockState, cfg: BlockwiseConfig, gm: GraphModule,
           progress: bool, block_guard: bool = True,
           aug: list[list[torch.Tensor]] | None = None) -> BlockResult:
    t0 = time.perf_counter()
    train, held = split_holdout(len(inputs), cfg)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step.index)
    opt = _optimizer(state.groups, cfg)

    def sample_loss(over: dict, i: int) -> torch.Tensor:
        out = _forward(sweep, nodes, inputs[i], outputs, over)
        loss = state.loss(out, targets[i])
        return loss if aug is None else loss + state.loss(out, aug[i])     # aug_loss: OmniQuant's second term

    def full_loss(over: dict, idx: list[int]) -> float:
        with torch.no_grad():
            return sum(float(sample_loss(over, i)) for i in idx) / len(idx)

    pick = held or train                     # the samples the best state is chosen on
    loss_start = full_loss({}, pick)         # the block as it is: the method's "do nothing"
    best, best_step, best_loss = None, -1, float("inf")

    def consider(t: int, loss: float) -> None:
        nonlocal best, best_step, best_loss
        if loss < best_loss:
            best, best_step, best_loss = state.snapshot(), t, loss

    batches = _batches(train, cfg, gen)
    n_steps = len(batches) if cfg.epochs else cfg.steps
    bar = tqdm(range(n_steps), desc=f"{step.name}", disable=not progress, leave=False)
    for t in bar:
        if held and cfg.keep_best and t % cfg.holdout_every == 0:
            consider(t, full_loss(state.overrides(), held))          # the parameters before step t
        batch = batches[t] if cfg.epochs else [train[j] for j in torch.randperm(len(train), generator=gen)[
            : min(cfg.batch_size, len(train))]]
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for i in batch:
            loss = sample_loss(state.overrides(), i) / len(batch)
            loss.backward()
            total += float(loss.detach())
        if not held and cfg.keep_best:
            consider(t, total)
        if cfg.schedule == "linear":
            for g, g0 in zip(opt.param_groups, state.groups):
                g["lr"] = g0.get("lr", cfg.lr) * (1.0 - t / n_steps)
        opt.step()
        state.project()
        bar.set_postfix(loss=f"{total:.3g}")
    bar.close()
    if held and cfg.keep_best and n_steps:
        consider(n_steps, full_loss(state.overrides(), held))        # after the last step
    if best is not None:
        state.restore(best)
    else:
        best_step = n_steps - 1 if not held else n_steps
    loss_best = full_loss(state.overrides(), pick) if n_steps else float("inf")
    if n_steps and (loss_best < loss_start or not block_guard):
        kept, record = "trained", state.bake(gm)
    else:                                    # the start is better on the selection samples: the graph is left as is
        kept, record = "start", {}
    res = BlockResult(step.name, loss_start, loss_best if kept == "trained" else loss_start, kept, best_step, n_steps,
                      time.perf_counter() - t0, record, "held-out" if held else "calibration")
    log.info("%s: %s loss %.4g -> %.4g (%s, best step %d)", step.name, res.selected_on, loss_start, res.loss_best,
             kept, best_step)
    return res


def _batches(train: list[int], cfg: BlockwiseConfig, gen: torch.Generator) -> list[list[int]]:
    """With `epochs`: every epoch a seeded permutation of the training samples cut into batches of batch_size (the
    last one smaller), as OmniQuant's loop. Without: [] (each step draws its own batch)."""
    out = []
    for _ in range(cfg.epochs):
        order = [train[j] for j in torch.randperm(len(train), generator=gen).tolist()]
        out += [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    return out


class _SignSGD(torch.optim.Optimizer):
    """p -= lr * sign(grad) (SignRound)."""

    def __init__(self, groups, lr: float):
        super().__init__(groups, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-g["lr"])


def _optimizer(groups: list[dict], cfg: BlockwiseConfig) -> torch.optim.Optimizer:
    groups = [dict(g) for g in groups]
    if cfg.optimizer == "signsgd":
        return _SignSGD(groups, cfg.lr)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)
    return torch.optim.Adam(groups, lr=cfg.lr)


def _forward(sweep: "Sweep", nodes: list[Node], env: dict, outputs: list[Node],
             overrides: dict[Node, torch.Tensor], float_: bool = False) -> list[torch.Tensor]:
    """Run the segment's `nodes` on boundary values `env` with `overrides` in place of computed values
    (autograd on, graph parameters detached: only the overrides get gradients). `float_`: every quantizer is
    the identity (the teacher)."""
    env = dict(env)
    env.update(overrides)
    interp = sweep._interp
    interp.env = env
    for n in nodes:
        if n.op in ("placeholder", "get_attr") or n in overrides:
            continue
        for a in n.all_input_nodes:
            if a not in env:
                env[a] = interp.fetch_attr(a.target).detach()
        env[n] = env[Quantizer(n).x] if float_ and is_quantizer(n) else interp.run_node(n)
    return [env[o] for o in outputs]


def _run_all(sweep, nodes, envs, outputs, float_: bool) -> list[list[torch.Tensor]]:
    with torch.no_grad():
        return [_forward(sweep, nodes, env, outputs, {}, float_=float_) for env in envs]


def _graph_outputs(nodes: list[Node]) -> list[Node]:
    """The tensors the graph's output node returns (a graph that is one segment)."""
    if not nodes:
        return []
    out = next(n for n in nodes[-1].graph.nodes if n.op == "output")
    flat: list[Node] = []

    def walk(a):
        if isinstance(a, Node):
            if _is_float(a):
                flat.append(a)
        elif isinstance(a, (list, tuple)):
            for b in a:
                walk(b)
        elif isinstance(a, dict):
            for b in a.values():
                walk(b)

    walk(out.args)
    return list(dict.fromkeys(flat))


def _is_float(n: Node) -> bool:
    v = n.meta.get("val")
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def summarize(results: list[BlockResult]) -> dict[str, Any]:
    """The stats block-wise passes report."""
    if not results:
        return {"blocks": 0}
    ratios = [r.loss_best / r.loss_start for r in results if r.loss_start > 0]
    return {"blocks": len(results), "kept_start": sum(r.kept == "start" for r in results),
            "mean_loss_ratio": sum(ratios) / len(ratios) if ratios else 1.0,
            "seconds": round(sum(r.seconds for r in results), 2),
            "per_block": {r.block: r.to_dict() for r in results}}


__all__ = ["BlockwiseConfig", "BlockState", "BlockMethod", "BlockResult", "TRAIN_DOCS", "train_blocks", "split_holdout",
           "ste_round", "summarize"]
