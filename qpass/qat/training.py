"""Distillation training of a fake-quantized graph (LLM-QAT §2.3): the student is the quantized graph, the
teacher the full-precision model; loss = KL(p_teacher || p_student) over the vocabulary at every position
(optionally mixed with next-token cross-entropy). AdamW, cosine schedule (no warm-up by default), gradient
accumulation and clipping, checkpoint + resume, and under torchrun DistributedDataParallel (``parallel: ddp``,
every rank holds the whole model) or FSDP2 (``parallel: fsdp``: ``torch.distributed.fsdp.fully_shard`` over the
whole student, every parameter sharded across the ranks, gathered per forward and backward, gradients
reduce-scattered; at the end the trained parameters are gathered back into a plain, unsharded graph module).

Determinism: the order of training sequences is a seeded permutation; rank r of w takes rows
[r::w] of every global batch, so one process and N processes see the same global batches.

Best step: with held-out sequences (``held``), the loss on them (the training loss without the
intermediate-output term, no gradient, every rank on all of them) is measured before the first step and every
``eval_every`` steps and at the end; with ``keep_best`` the trainable tensors of the best point are restored at
the end, so training never hands back a model that scores worse on held-out data than the one it started
from. The snapshot is a copy of the trainable tensors (with ``trainable: all``, of the model's float weights).
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..calibration import logits_of

log = logging.getLogger("qpass.qat.training")


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor | None = None,
                 ce_weight: float = 0.0) -> torch.Tensor:
    """Mean over positions of KL(p_T || p_S) (same gradient as the paper's soft cross-entropy), plus
    `ce_weight` x next-token cross-entropy on `targets` when given. Logits are [batch, seq, vocab]."""
    s = F.log_softmax(student_logits.float(), dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, -2)
    loss = F.kl_div(s, t, log_target=True, reduction="batchmean")
    if ce_weight and targets is not None:
        ce = F.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten())
        loss = (1 - ce_weight) * loss + ce_weight * ce
    return loss


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 1000
    batch_size: int = 8            # global batch (sequences per optimizer step, all ranks together)
    grad_accum: int = 1            # micro-batches per step (batch_size must divide by grad_accum * world)
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    ce_weight: float = 0.0
    feature_weight: float = 0.0    # x the intermediate-output loss (qpass.qat.distill), when features are given
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    eval_every: int = 0            # held-out evaluation every this many steps (0: steps // 10, at least 1)
    keep_best: bool = True         # restore the trainable tensors of the best held-out point at the end
    parallel: str = "ddp"          # under torchrun: ddp (replicated) or fsdp (FSDP2, sharded parameters)


def cosine_lr(step: int, s: TrainSettings) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine from 1 to min_lr_ratio."""
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    t = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def world() -> tuple[int, int]:
    """(rank, world size); under torchrun (WORLD_SIZE > 1) the process group is started here if needed
    (gloo on CPU, nccl when CUDA is available)."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def batch_rows(step: int, micro: int, n_data: int, s: TrainSettings, rank: int, size: int) -> torch.Tensor:
    """Row indices of this rank's micro-batch `micro` at optimizer step `step` (seeded epoch order)."""
    per_micro = s.batch_size // s.grad_accum
    start = step * s.batch_size + micro * per_micro
    epoch = start // n_data
    order = torch.randperm(n_data, generator=torch.Generator().manual_seed(s.seed + epoch))
    idx = torch.arange(start, start + per_micro) % n_data
    return order[idx][rank::size]


class Fsdp:
    """FSDP2 over a whole module for the length of a training run: ``fully_shard(module)`` (one group: the
    captured graph has no per-layer submodules that run on their own), then :meth:`close` gathers every parameter
    back (a collective: every rank calls it) and removes FSDP's class and hooks, so the module is the plain
    graph module it was, holding the trained values. `params` are the sharded (DTensor) counterparts of the
    trainable parameters, in their order."""

    def __init__(self, module: nn.Module, trainable: list[nn.Parameter], size: int):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        names = {id(p): n for n, p in module.named_parameters()}
        missing = [i for i, p in enumerate(trainable) if id(p) not in names]
        if missing:
            raise ValueError(f"parallel: fsdp shards the module's parameters; {len(missing)} trainable tensors "
                             "are not parameters of it")
        self.module, self.names = module, [names[id(p)] for p in trainable]
        self._cls = type(module)
        self._hooks = {a: set(getattr(module, a)) for a in _HOOK_DICTS}
        mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (size,))
        fully_shard(module, mesh=mesh)
        now = dict(module.named_parameters())
        self.params = [now[n] for n in self.names]

    def close(self) -> None:
        m = self.module
        plain = {id(p): nn.Parameter(p.full_tensor().detach().clone(), requires_grad=p.requires_grad)
                 for p in m.parameters()}
        for a, before in self._hooks.items():
            hooks = getattr(m, a)
            for k in [k for k in hooks if k not in before]:
                del hooks[k]
        m.__class__ = self._cls
        for sub in m.modules():                     # every owner of a tied parameter gets the same new one
            for leaf, p in list(sub._parameters.items()):
                if p is not None and id(p) in plain:
                    sub._parameters[leaf] = plain[id(p)]


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective: every rank calls it), or `t`."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`full` sharded as `ref` is when `ref` is a DTensor of the same global shape, else `full`."""
    if hasattr(ref, "device_mesh") and tuple(full.shape) == tuple(ref.shape):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, ref.device_mesh, ref.placements)
    return full


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
               "_backward_pre_hooks", "_backward_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


class Trainer:
    """Trains the float parameters in `params` of `student` against `teacher` on `data` [n, seq]."""

    def __init__(self, student: nn.Module, teacher: Callable, data: torch.Tensor, params: list[nn.Parameter],
                 settings: TrainSettings, *, progress: bool = True, features: tuple[dict, dict] | None = None,
                 held: torch.Tensor | None = None):
        """`features`: (student, teacher) dicts {name: tensor} that the two forwards fill (qpass.qat.distill's
        feature_taps); their loss, x ``settings.feature_weight``, is added to the logit loss. `held`: held-out
        sequences [m, seq] scored for the best step (see the module doc); None: no held-out scoring."""
        self.rank, self.size = world()
        s = settings
        if s.batch_size % (s.grad_accum * self.size):
            raise ValueError(f"batch_size {s.batch_size} must be divisible by grad_accum ({s.grad_accum}) x "
                             f"world size ({self.size})")
        self.student, self.teacher, self.data, self.s = student, teacher, data, s
        self.params = params
        self.model = student
        self.fsdp: Fsdp | None = None
        if s.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be ddp or fsdp, got {s.parallel!r}")
        if self.size > 1 and s.parallel == "fsdp":
            self.fsdp = Fsdp(student, params, self.size)
            self.params = params = self.fsdp.params
        elif self.size > 1:
            self.model = nn.parallel.DistributedDataParallel(student, find_unused_parameters=False)
        self.opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda i: cosine_lr(i, s))
        self.step, self.progress, self.history = 0, progress, []
        self.features = features
        self.held = held if held is not None and len(held) else None
        self.evals: list[tuple[int, float]] = []      # (step, held-out loss)
        self.best: tuple[int, float] | None = None
        self._best_params: list[torch.Tensor] | None = None

    @property
    def eval_every(self) -> int:
        return self.s.eval_every or max(1, self.s.steps // 10)

    @torch.no_grad()
    def held_out_loss(self) -> float:
        """Mean training loss (logits only) on the held-out sequences, in batches of the micro-batch size. (The
        student is an exported graph: it has no train/eval mode to switch; its dropout is what it was traced with.)"""
        per = max(1, self.s.batch_size // self.s.grad_accum)
        total, n = 0.0, 0
        for i in range(0, len(self.held), per):
            ids = self.held[i:i + per]
            t = logits_of(self.teacher(ids))
            total += float(distill_loss(logits_of(self.student(ids)), t, ids, self.s.ce_weight)) * len(ids)
            n += len(ids)
        return total / n

    def _score(self) -> float:
        loss = self.held_out_loss()
        self.evals.append((self.step, loss))
        if self.best is None or loss < self.best[1]:
            self.best = (self.step, loss)
            if self.s.keep_best:
                self._best_params = [p.detach().clone() for p in self.params]
        return loss

    def micro_loss(self, rows: torch.Tensor) -> torch.Tensor:
        ids = self.data[rows]
        with torch.no_grad():
            t = logits_of(self.teacher(ids))
        loss = distill_loss(logits_of(self.model(ids)), t, ids, self.s.ce_weight)
        if self.features is not None and self.s.feature_weight:
            from .distill import feature_loss

            loss = loss + self.s.feature_weight * feature_loss(*self.features)
        return loss

    def train_step(self) -> float:
        """One optimizer step over the global batch; returns the global mean loss."""
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(self.s.grad_accum):
            loss = self.micro_loss(batch_rows(self.step, micro, len(self.data), self.s, self.rank, self.size))
            (loss / self.s.grad_accum).backward()
            total += float(loss.detach()) / self.s.grad_accum
        if self.size > 1:
            t = torch.tensor([total])
            dist.all_reduce(t)
            total = float(t) / self.size
        if self.s.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.s.grad_clip)
        self.opt.step()
        self.sched.step()
        self.step += 1
        self.history.append(total)
        return total

    def fit(self) -> list[float]:
        bar = tqdm(total=self.s.steps, initial=self.step, desc="QAT", disable=not self.progress or self.rank != 0)
        if self.held is not None and not any(s == self.step for s, _ in self.evals):
            self._score()                       # the starting point (step 0, or the resumed step)
        while self.step < self.s.steps:
            loss = self.train_step()
            post = {"loss": f"{loss:.4f}", "lr": f"{self.sched.get_last_lr()[0]:.2e}"}
            if self.held is not None and (self.step % self.eval_every == 0 or self.step == self.s.steps):
                post["held_out"] = f"{self._score():.4f}"
            bar.set_postfix(**post)
            bar.update(1)
            if self.s.checkpoint_dir and self.s.checkpoint_every and self.step % self.s.checkpoint_every == 0:
                self.save_checkpoint(self.s.checkpoint_dir)
        bar.close()
        if self.s.keep_best and self._best_params is not None and self.best[0] != self.step:
            with torch.no_grad():
                for p, b in zip(self.params, self._best_params):
                    p.copy_(b)
            log.info("QAT: kept step %d (held-out loss %.5f) over the last step", *self.best)
        self._best_params = None
        self.close()
        return self.history

    def close(self) -> None:
        """Under FSDP: gather the parameters back into a plain module (every rank; idempotent)."""
        if self.fsdp is not None:
            self.fsdp.close()
            self.fsdp = None

    # -- checkpoints: safetensors for tensors, JSON for the rest; no pickle
    def save_checkpoint(self, directory: str) -> None:
        # under FSDP every rank gathers the shards (collectives), rank 0 writes
        tensors = {f"param.{i}": _full(p.detach()) for i, p in enumerate(self.params)}
        opt = self.opt.state_dict()
        for i, st in opt["state"].items():
            for k, v in st.items():
                tensors[f"opt.{i}.{k}"] = _full(v) if isinstance(v, torch.Tensor) else torch.tensor(v)
        if self._best_params is not None:
            tensors.update({f"best.{i}": _full(b) for i, b in enumerate(self._best_params)})
        if self.rank != 0:
            return
        os.makedirs(directory, exist_ok=True)
        meta = {"step": self.step, "history": self.history, "param_groups": opt["param_groups"],
                "scheduler": self.sched.state_dict(), "n_params": len(self.params),
                "evals": self.evals, "best": self.best}
        tmp = os.path.join(directory, ".checkpoint.tmp")
        safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        with open(os.path.join(directory, "trainer.json.tmp"), "w") as f:
            json.dump(meta, f)
        os.replace(tmp, os.path.join(directory, "checkpoint.safetensors"))
        os.replace(os.path.join(directory, "trainer.json.tmp"), os.path.join(directory, "trainer.json"))

    def load_checkpoint(self, directory: str) -> bool:
        path = os.path.join(directory, "checkpoint.safetensors")
        if not os.path.isfile(path):
            return False
        tensors = safetensors.torch.load_file(path)
        with open(os.path.join(directory, "trainer.json")) as f:
            meta = json.load(f)
        if meta["n_params"] != len(self.params):
            raise ValueError(f"checkpoint in {directory} has {meta['n_params']} trainable tensors, this run "
                             f"has {len(self.params)}: it belongs to another recipe")
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(_like(tensors[f"param.{i}"], p))
        state: dict = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = _like(v, self.params[int(i)])
        self.opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.sched.load_state_dict(meta["scheduler"])
        self.step, self.history = meta["step"], meta["history"]
        self.evals = [tuple(e) for e in meta.get("evals", [])]
        self.best = tuple(meta["best"]) if meta.get("best") else None
        if self.best is not None and "best.0" in tensors:
            self._best_params = [_like(tensors[f"best.{i}"], p) for i, p in enumerate(self.params)]
        return True
