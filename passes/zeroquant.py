"""ZeroQuant's layer-by-layer knowledge distillation (LKD; Yao et al. 2022), on the qpass.blockwise engine.

Matches   every decoder block holding a weight quantizer (inserted by an earlier ``quantize`` pass: ZeroQuant's
          fine-grained group-wise weights and token-wise dynamic activations are that pass's ``per_group`` weights
          and ``per_token`` activations), linears selected by targets/ignore
Changes   trains every float parameter the block reads (the selected linears' weights and biases, norm weights)
          except quantizer tensors (scales and zero points stay as the quantize pass chose them), through the live
          quantizers (straight-through estimator, masked where the static weight grid clips), against the float
          block's outputs (MSE), one block at a time; inputs: the float model's (the paper's LKD: student and
          teacher layer k see the teacher's layer k-1 output; ``feed: quantized`` trains on the outputs of the
          already distilled blocks instead); Adam, best step kept, the block left as it was when that is better
          on held-out calibration samples (``holdout``). Baked: the trained values are the parameters; no node added
Requires  calibration data (the block-by-block sweep; any text: LKD needs no original training data)
Preserves graph structure
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch.fx import GraphModule, Node

from qpass.analyses import STRUCTURE
from qpass.blockwise import TRAIN_DOCS, BlockMethod, BlockState, BlockwiseConfig, summarize, train_blocks
from qpass.graph import LinearSite, is_quantizer, param_of
from qpass.pass_infra import Context, Pass, PassResult
from qpass.plan import Plan
from qpass.quantizer import Quantizer

from .signround import trainable_weight_sites


@dataclass(frozen=True)
class ZeroQuantConfig(BlockwiseConfig):
    name: ClassVar[str] = "zeroquant"
    field_docs: ClassVar[dict] = {**TRAIN_DOCS, "norms": "also train the norm weights (and any other float parameter "
                                  "the block reads besides the linears' weights and biases)"}

    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 4
    optimizer: Literal["signsgd", "adam", "adamw"] = "adam"
    feed: Literal["quantized", "float"] = "float"         # LKD: the teacher's layer k-1 output
    norms: bool = True


class _BlockWeights(BlockState):
    def __init__(self, gm: GraphModule, attrs: list[Node], lr: float):
        self.attrs = attrs
        self.values = [param_of(gm, a).detach().clone().float().requires_grad_(True) for a in attrs]
        self.groups = [{"params": self.values, "lr": lr}]
        self._gm = gm

    def overrides(self) -> dict[Node, torch.Tensor]:
        return {a: v.to(param_of(self._gm, a).dtype) for a, v in zip(self.attrs, self.values)}

    @torch.no_grad()
    def bake(self, gm: GraphModule) -> dict:
        changed = 0.0
        for a, v in zip(self.attrs, self.values):
            p = param_of(gm, a)
            changed = max(changed, float((v.to(p.dtype) - p).abs().max()))
            p.copy_(v.to(p.dtype))
        return {"tensors": len(self.attrs), "max_change": changed}


@dataclass
class _Lkd(BlockMethod):
    sites: list[LinearSite]
    norms: bool
    lr: float

    def setup(self, gm: GraphModule, step, nodes: list[Node]) -> BlockState | None:
        mine = [s for s in self.sites if step.contains(s.node)]
        if not mine:
            return None
        attrs = {s.weight: None for s in mine}
        attrs.update({s.bias: None for s in mine if s.bias is not None and s.bias.op == "get_attr"})
        if self.norms:
            for n in nodes:
                if n.op == "get_attr" or is_quantizer(n):
                    continue
                for a in n.all_input_nodes:
                    if a.op == "get_attr" and _float_param(gm, a):
                        attrs.setdefault(a, None)
        attrs = {a: None for a in attrs if not _quantizer_tensor(a)}
        return _BlockWeights(gm, list(attrs), self.lr)


def _float_param(gm: GraphModule, a: Node) -> bool:
    try:
        t = param_of(gm, a)
    except (AttributeError, KeyError, TypeError):
        return False
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 1


def _quantizer_tensor(a: Node) -> bool:
    """Read only by quantizers as something other than their input (a scale, zero point, table...)."""
    users = list(a.users)
    return bool(users) and all(is_quantizer(u) and Quantizer(u).x is not a for u in users)


@dataclass(frozen=True)
class ZeroQuant(Pass):
    """Layer-by-layer knowledge distillation: train all weights of one block at a time against the float block."""

    config: ZeroQuantConfig = ZeroQuantConfig()
    name: ClassVar[str] = "zeroquant"
    needs_calibration: ClassVar[bool] = True
    preserves: ClassVar = STRUCTURE          # changes parameter values only

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        cfg = self.config
        todo, near = trainable_weight_sites(gm, ctx, cfg, self.name, clip=False)
        if not todo:
            return PassResult(modified=False, stats={"blocks": 0, "linears": 0}, near_misses=near)
        results = train_blocks(gm, ctx, _Lkd(todo, cfg.norms, cfg.lr), cfg, who=self.name)
        stats = {"linears": len(todo), **summarize(results)}
        plan = Plan(self.name, decisions={"linears": sorted(s.path or s.node.name for s in todo),
                                          "blocks": {r.block: r.kept for r in results}})
        return PassResult(modified=True, stats=stats, near_misses=near, plan=plan)


__all__ = ["ZeroQuant", "ZeroQuantConfig"]
