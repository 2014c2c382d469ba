"""Binary-coding quantization of the weights (BCQ, LUT-GEMM: Park et al., ICLR 2024).

Matches   every selected linear-like node (qpass.graph.linear_sites) whose weight is not quantized yet
Changes   W -> qpass.fake_quantize_ext(W, 1, None, block, 'bcq<q>[z]', codebook=table): per group of
          `group_size` input columns (-1: per output channel) W ≈ Σ_{i=1..q} α_i b_i (+ z), b_i ∈ {−1, +1}, a
          codebook of the 2^q signed sums per group (qpass.primitives.bcq: codes = the q sign bits; the scale is
          the constant 1). Fit per group (qpass.primitives.bcq.bcq_fit): greedy (b_i = sign of the residual,
          α_i = its mean |.|), then `iterations` rounds of alternating refinement (least squares α, z given B;
          B given α, z by exhaustive search over the 2^q combinations); α and z stored in fp16
Requires  nothing (no calibration: the fit is on the weights, RTN-style, as the paper)
Preserves nothing (adds nodes and buffers)

Bits per weight (qpass.eval): q per weight plus q α's (and z) per group at fp16, e.g. q = 3, g = 128 with
offset: 3 + 4·16/128 = 3.5.

Deviations from the paper, and why:
* The offset z ("extended BCQ", which can hold a uniform INT-q grid exactly) is on by default; `offset: false`
  gives the plain form.
* `init: best` (not the paper; default greedy) also starts the refinement from the group's min-max INT-q grid
  converted to BCQ exactly and keeps, per group, the start whose refined error is lower: a group is then
  never worse (in squared weight error) than RTN's asymmetric min-max grid at the same q.
* No error feedback (GPTQ-style): the paper fits each weight group on its own.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch.fx import GraphModule

from qpass.analyses import LinearSites
from qpass.errors import RecipeError
from qpass.graph import choose_linears, linear_sites, param_of, site_key
from qpass.pass_infra import Context, Pass, PassResult
from qpass.plan import Plan, SiteIndex, build
from qpass.primitives import bcq as B
from qpass.primitives.formats import get_format
from qpass.primitives.spec import PerChannel, PerGroup, QSpec
from qpass.quantizer import QuantMeta, insert_quantizer

from .quantize import weight_block_size


@dataclass(frozen=True)
class BcqConfig:
    name: ClassVar[str] = "bcq"
    field_docs: ClassVar[dict] = {
        "bits": "q, the number of binary planes (bits per weight before α's and z), 1..8 (the paper: 2..4)",
        "group_size": "input columns per group sharing α's (and z); -1: one group per output channel",
        "offset": "a per-group offset z (extended BCQ; represents uniform INT-q grids exactly)",
        "iterations": "rounds of alternating refinement after the greedy fit (0: greedy only)",
        "init": "greedy (the paper) or best: also start from the min-max INT-q grid, keep the lower-error fit",
        "targets": "module-path globs to quantize",
        "ignore": "module-path globs to leave in float (a bare name matches as a suffix: lm_head)",
    }

    bits: int = 3
    group_size: int = 128
    offset: bool = True
    iterations: int = 15
    init: Literal["greedy", "best"] = "greedy"
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        if not (isinstance(self.bits, int) and 1 <= self.bits <= 8):
            raise RecipeError("bits", f"BCQ has 1..8 binary planes (the paper uses 2..4), got {self.bits!r}")
        if not (self.group_size == -1 or self.group_size >= 1):
            raise RecipeError("group_size", f"must be >= 1, or -1 for one group per output channel, got "
                              f"{self.group_size}")
        if not 0 <= self.iterations <= 1000:
            raise RecipeError("iterations", f"must be in [0, 1000], got {self.iterations}")
        if self.init not in ("greedy", "best"):
            raise RecipeError("init", f"must be greedy or best, got {self.init!r}")
        if self.init == "best" and not self.offset:
            raise RecipeError("init", "best also starts from the min-max INT-q grid, which needs offset: true")
        if not self.targets:
            raise RecipeError("targets", "must list at least one module-path glob (e.g. ['*'])")

    @property
    def spec(self) -> QSpec:
        gran = PerChannel(0) if self.group_size == -1 else PerGroup(self.group_size)
        return QSpec(get_format(B.format_name(self.bits, self.offset)), gran)


@dataclass(frozen=True)
class Bcq(Pass):
    """Per-group binary-coding quantization of every selected linear's weight (LUT-GEMM's format)."""

    config: BcqConfig = BcqConfig()
    name: ClassVar[str] = "bcq"

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        cfg = self.config
        sites = ctx.get(LinearSites(), gm)
        todo, near, at = choose_linears(gm, sites, cfg.targets, cfg.ignore, "bcq")
        if not todo:
            return PassResult(modified=False, stats={"linears": 0}, near_misses=near)
        items, err, norm = [], 0.0, 0.0
        for s in todo:
            with ctx.loaded([s.weight.target]):
                w = param_of(gm, s.weight).detach()
                w = (w if s.in_axis == 1 else w.t()).float()
                tab, fit = B.bcq_weight(w, cfg.bits, cfg.group_size, offset=cfg.offset, iterations=cfg.iterations,
                                        init=cfg.init)
            err, norm = err + float(fit.error.sum()), norm + float(w.pow(2).sum())
            scale = torch.ones(tab.shape[:-1])
            if s.use_in_axis == 0:                     # the weight as the matmul consumes it is [in, out]
                scale, tab = scale.t().contiguous(), tab.transpose(0, 1).contiguous()
            items.append((QuantMeta("weight", "", site_key(s), cfg.spec), weight_block_size(cfg.spec, s.use_in_axis),
                          {"scale": scale, "codebook": tab}, at[s.node]))
        plan = build(self.name, items, decisions={"bits": cfg.bits, "group_size": cfg.group_size,
                                                  "offset": cfg.offset, "iterations": cfg.iterations,
                                                  "init": cfg.init})
        self.apply(gm, plan)
        stats = {"linears": len(todo), "format": cfg.spec.format.name,
                 "relative_weight_error": err / max(norm, 1e-30)}
        return PassResult(modified=True, stats=stats, near_misses=near, plan=plan)

    @classmethod
    def apply(cls, gm: GraphModule, plan: Plan) -> None:
        """Insert the plan's BCQ weight quantizers (a codebook quantizer per linear, table per group)."""
        sites = linear_sites(gm)
        index = SiteIndex(sites)
        for qp, t in zip(plan.quantizers, plan.tensors()):
            site = index.quantized(qp)
            meta = dataclasses.replace(qp.meta, site=site.node.name, path=site.path)
            q = insert_quantizer(gm, site.node, site.weight_use, meta, block=list(qp.block), scale=t["scale"],
                                 codebook=t["codebook"], name=f"{site.weight.target}_scale", origin="bcq")
            site.node.replace_input_with(site.weight_use, q.node)



__all__ = ["Bcq", "BcqConfig"]
