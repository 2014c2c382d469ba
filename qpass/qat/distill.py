"""Intermediate-output distillation: the same named module outputs taken from the student graph and the
teacher module at every training forward.

A module's output in the graph is the last node traced inside the module (its ``nn_module_stack`` path, or a
descendant's) whose value is used outside it: for a decoder layer, the final residual add. The student side is
a temporary tap node after that node (removed when training ends, so the pass adds no nodes); the teacher side
is a forward hook on ``teacher.get_submodule(path)`` (first element of a tuple output). Both keep the tensor of
the current forward; the student's keeps its autograd graph.

Which modules: globs of module paths, or ``blocks``: every decoder block the graph's block analysis finds
(``qpass.block_sweep.find_blocks``: the repeated ``<prefix>.<i>`` modules, ``model.layers.*`` on Llama,
``model.decoder.layers.*`` on OPT), so a recipe needs no architecture's module names.

The loss per module is the normalized squared error ``mean((s - t)^2) / mean(t^2)`` (scale-free, so layers with
large activations do not dominate), averaged over the modules.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.fx import GraphModule, Node

from qpass.errors import RecipeError, TargetNotFoundError
from qpass.graph import module_path


BLOCKS = "blocks"        # the pattern that means every decoder block, whatever the architecture names them


def module_outputs(gm: GraphModule, patterns: Sequence[str], where: str) -> dict[str, Node]:
    """{module path: its output node} for the modules matched by `patterns`. A glob matches module paths with
    as many dotted components as itself (``model.layers.*`` is every decoder layer, not their children);
    ``blocks`` (BLOCKS) is every decoder block the graph's block analysis finds."""
    order = [n for n in gm.graph.nodes if n.op == "call_function"]
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    members: dict[str, list[Node]] = {}
    for n in order:
        parts = module_path(gm, n).split(".")
        for k in range(1, len(parts) + 1):
            if parts[0]:
                members.setdefault(".".join(parts[:k]), []).append(n)
    out: dict[str, Node] = {}
    for i, pat in enumerate(patterns):
        if pat == BLOCKS:
            from qpass.block_sweep import find_blocks

            hits = [b.path for b in find_blocks(gm) if b.path in members]
            if not hits:
                raise RecipeError(f"{where}[{i}]", "blocks: the graph has no decoder blocks (no repeated "
                                  "'<prefix>.<int>' modules); name the modules with globs of their paths")
        else:
            depth = pat.count(".")
            hits = sorted((p for p in members if p.count(".") == depth and fnmatch.fnmatchcase(p, pat)),
                          key=lambda p: pos[members[p][0]])
        if not hits:
            raise TargetNotFoundError(f"{where}[{i}]", pat, sorted(members))
        for path in hits:
            inside = set(members[path])
            leaving = [n for n in members[path] if any(u not in inside for u in n.users)]
            if not leaving:
                raise RecipeError(f"{where}[{i}]", f"module {path!r} has no output in the graph to distill")
            out[path] = max(leaving, key=pos.__getitem__)
    return out


class _Keep(nn.Module):
    def __init__(self, store: dict, key: str):
        super().__init__()
        self.store, self.key = store, key

    def forward(self, x):
        self.store[self.key] = x
        return x


@contextmanager
def feature_taps(gm: GraphModule, teacher: nn.Module, outputs: dict[str, Node]) -> Iterator[tuple[dict, dict]]:
    """Yield (student features, teacher features): dicts {path: tensor} refreshed by every forward of `gm`
    and of `teacher` while the context is open."""
    student: dict[str, torch.Tensor] = {}
    teach: dict[str, torch.Tensor] = {}
    if not outputs:            # nothing to tap: leave the graph (and its compiled code) alone
        yield student, teach
        return
    taps, hooks = [], []
    try:
        for i, (path, node) in enumerate(outputs.items()):
            try:
                mod = teacher.get_submodule(path)
            except AttributeError:
                raise RecipeError("qat.intermediate", f"the teacher has no module {path!r}; name modules as the "
                                  "student graph shows them (qpass.describe)") from None
            hooks.append(mod.register_forward_hook(
                lambda m, a, o, path=path: teach.__setitem__(path, o[0] if isinstance(o, (tuple, list)) else o)))
            name = f"_qpass_feature_{i}"
            gm.add_submodule(name, _Keep(student, path))
            with gm.graph.inserting_after(node):
                taps.append((name, gm.graph.call_module(name, (node,))))
        gm.recompile()
        yield student, teach
    finally:
        for h in hooks:
            h.remove()
        for name, tap in taps:
            gm.graph.erase_node(tap)
            gm.delete_submodule(name)
        gm.recompile()


def feature_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over modules of ``mean((s - t)^2) / mean(t^2)``."""
    losses = []
    for path, t in teacher.items():
        s = student[path]
        t = t.detach().to(s.dtype)
        losses.append((s - t).pow(2).mean() / t.pow(2).mean().clamp(min=1e-12))
    return torch.stack(losses).mean()


__all__ = ["BLOCKS", "feature_loss", "feature_taps", "module_outputs"]
