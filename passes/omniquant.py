"""OmniQuant's Learnable Weight Clipping (Shao et al. 2024), block by block on the qpass.blockwise engine.

Matches   every linear whose weight goes through a static int ``qpass.fake_quantize`` weight quantizer (inserted by
          an earlier ``quantize`` pass) fed by the weight parameter itself, selected by targets/ignore
Changes   LWC: per scale block of each weight (per output channel, or per group) clip factors gamma = sigmoid(a) on
          the max and beta = sigmoid(b) on the min the quantizer's scale and zero point are computed from
          (h = (gamma max - beta min) / (2^N - 1), z = -round(beta min / h); symmetric grids: h = max(gamma max,
          -beta min) / qmax); a = b = 4 at the start (the reference's init), weights frozen. Trained block by block
          (qpass.blockwise) against the float block's outputs (MSE) with AdamW (weight decay 0), the recipe's
          activation quantizers live; the best step kept, and the block left as it was when that is better on
          the calibration set. Baked: the quantizer's scale / zero-point buffers become the learned ones and the
          weight parameter its dequantized value under them (clipped and rounded; the quantizer maps it to
          itself); no node added
          NOT done here: LET (the learnable per-channel scales and shifts at folding points and the q/k scale);
          for weight+activation recipes run smoothquant (LET's initialisation) before quantize, as
          recipes/omniquant_w4a4.yaml does: its scales are then fixed, not learned
Requires  calibration data (the block-by-block sweep)
Preserves graph structure
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch.fx import GraphModule

from qpass.analyses import STRUCTURE
from qpass.blockwise import TRAIN_DOCS, BlockwiseConfig, summarize, train_blocks
from qpass.errors import RecipeError
from qpass.pass_infra import Context, Pass, PassResult
from qpass.plan import Plan

from .signround import WeightRounding, trainable_weight_sites


@dataclass(frozen=True)
class OmniQuantConfig(BlockwiseConfig):
    name: ClassVar[str] = "omniquant"
    field_docs: ClassVar[dict] = {**TRAIN_DOCS, "lwc": "learnable weight clipping (the only part implemented: "
                                  "false leaves nothing to train)",
                                  "init_logit": "start of the clip logits: gamma = beta = sigmoid(init_logit)"}

    steps: int = 200
    lr: float = 0.01                    # the reference README's --lwc_lr (the paper's text says 5e-3)
    batch_size: int = 4
    optimizer: Literal["signsgd", "adam", "adamw"] = "adamw"
    feed: Literal["quantized", "float"] = "quantized"
    lwc: bool = True
    init_logit: float = 4.0

    def __post_init__(self):
        super().__post_init__()
        if not -20.0 <= self.init_logit <= 20.0:
            raise RecipeError("init_logit", f"must be in [-20, 20] (reference: 4), got {self.init_logit}")


@dataclass(frozen=True)
class OmniQuant(Pass):
    """Learn per-channel / per-group weight clipping (OmniQuant's LWC) block by block."""

    config: OmniQuantConfig = OmniQuantConfig()
    name: ClassVar[str] = "omniquant"
    needs_calibration: ClassVar[bool] = True
    preserves: ClassVar = STRUCTURE          # changes weights and qparam buffers only

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        cfg = self.config
        if not cfg.lwc:
            return PassResult(modified=False, stats={"blocks": 0, "linears": 0},
                              near_misses=["lwc: false: nothing to train (LET is not implemented)"])
        todo, near = trainable_weight_sites(gm, ctx, cfg, self.name, clip=True)
        if not todo:
            return PassResult(modified=False, stats={"blocks": 0, "linears": 0}, near_misses=near)
        method = WeightRounding(todo, rounding=False, clip="sigmoid", lr=cfg.lr, init_logit=cfg.init_logit)
        results = train_blocks(gm, ctx, method, cfg, who=self.name)
        stats = {"linears": len(todo), **summarize(results)}
        plan = Plan(self.name, decisions={"linears": sorted(s.path or s.node.name for s in todo),
                                          "blocks": {r.block: r.kept for r in results}})
        return PassResult(modified=True, stats=stats, near_misses=near, plan=plan)


__all__ = ["OmniQuant", "OmniQuantConfig"]
