"""Non-uniform per-channel lookup tables weighted by the Fisher information, plus dense-and-sparse (SqueezeLLM).

Matches   every selected linear-like node (qpass.graph.linear_sites) whose weight is not quantized yet
Changes   W -> qpass.fake_quantize_ext(W, scale, None, per channel, 'codebook<b>', table[, outliers]): one table of
          2^b values per output row from a k-means weighted by F = mean over calibration sequences of the squared
          gradient of the LM loss (the diagonal Fisher information), qpass.primitives.squeezellm
          dense-and-sparse: the `outliers` fraction of largest-magnitude weights of each linear and the `sensitive`
          fraction of largest-F weights among the rest are left out of the k-means and kept exact (fp16 residuals,
          the sparse side channel)
Requires  calibration data of token ids (the LM loss needs next tokens); one forward and backward pass per
          calibration sequence through the whole graph (gradients of the selected weights only)
Preserves nothing (adds nodes and buffers)

Deviations from the paper and its code (SqueezeAILab/SqueezeLLM), and why:
* The sparse set is chosen per linear (a fraction of its elements), where the reference picks a global magnitude
  threshold per layer type; both keep the stated fraction of the weights.
* k-means runs Lloyd's iterations from two deterministic starts (weighted quantiles, and the uniform int grid of
  the same width) and keeps the better per row, where the reference runs scikit-learn's k-means++ (random
  starts). Deterministic, and never worse in the weighted objective than the uniform grid.
* Tables and scales are fp16 (the packed kernels store them so); a table is kept in code units of a row scale
  (the row's absmax), so the same ``codebook<b>`` format serves every pass that learns tables.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import GraphModule
from torch.nn import functional as F

from qpass.analyses import LinearSites
from qpass.calibration import logits_of
from qpass.errors import CalibrationError, RecipeError
from qpass.graph import LinearSite, choose_linears, linear_sites, param_of, site_key
from qpass.pass_infra import Context, Pass, PassResult
from qpass.plan import Plan, SiteIndex, build
from qpass.primitives import squeezellm as S
from qpass.primitives.formats import get_format
from qpass.primitives.spec import PerChannel, QSpec
from qpass.quantizer import QuantMeta, SideChannels, SparseValues, insert_quantizer


@dataclass(frozen=True)
class SqueezeLlmConfig:
    name: ClassVar[str] = "squeezellm"
    field_docs: ClassVar[dict] = {
        "bits": "bits per code: a table of 2^bits values per output channel (2..8)",
        "outliers": "fraction of each linear's weights kept in float by magnitude (paper: 0.004 with sensitive 0.0005)",
        "sensitive": "fraction of each linear's weights kept in float by Fisher sensitivity (paper: 0.0005)",
        "iters": "Lloyd's iterations of the weighted k-means (per start)",
        "max_samples": "calibration sequences used for the Fisher information (default: all)",
        "targets": "module-path globs to quantize",
        "ignore": "module-path globs to leave in float (a bare name matches as a suffix: lm_head)",
    }

    bits: int = 3
    outliers: float = 0.0
    sensitive: float = 0.0
    iters: int = 50
    max_samples: int | None = None
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        if not (isinstance(self.bits, int) and 2 <= self.bits <= 8):
            raise RecipeError("bits", f"must be an integer in [2, 8], got {self.bits!r}")
        for key in ("outliers", "sensitive"):
            v = getattr(self, key)
            if not 0.0 <= v <= 0.1:
                raise RecipeError(key, f"must be a fraction in [0, 0.1] (the paper keeps 0.0005 to 0.0045), got {v}")
        if not 1 <= self.iters <= 1000:
            raise RecipeError("iters", f"must be in [1, 1000], got {self.iters}")
        if self.max_samples is not None and self.max_samples < 1:
            raise RecipeError("max_samples", f"must be >= 1, got {self.max_samples}")
        if not self.targets:
            raise RecipeError("targets", "must list at least one module-path glob (e.g. ['*'])")


@dataclass(frozen=True)
class SqueezeLlm(Pass):
    """Fisher-weighted k-means tables per output channel, dense-and-sparse (SqueezeLLM)."""

    config: SqueezeLlmConfig = SqueezeLlmConfig()
    name: ClassVar[str] = "squeezellm"
    needs_calibration: ClassVar[bool] = True

    def streaming_refusal(self) -> str | None:
        return "the Fisher information needs gradients of the whole model in memory"

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        cfg = self.config
        sites = ctx.get(LinearSites(), gm)
        todo, near, at = choose_linears(gm, sites, cfg.targets, cfg.ignore, "squeezellm")
        if not todo:
            return PassResult(modified=False, stats={"linears": 0}, near_misses=near)
        fisher, n = _fisher(gm, ctx, todo, cfg.max_samples)
        spec = QSpec(get_format(f"codebook{cfg.bits}"), PerChannel(0))
        items, sparse, err = [], 0, 0.0
        for s in todo:
            w = _canonical(param_of(gm, s.weight).detach(), s)
            r = S.squeezellm_quantize(w, _canonical(fisher[s.weight.target], s), cfg.bits, outliers=cfg.outliers,
                                      sensitive=cfg.sensitive, iters=cfg.iters)
            scale, table, index, block = r.scale, r.table, r.index, [1, -1]
            if s.use_in_axis == 0:                       # the quantizer sees [in, out]
                k = w.shape[1]
                scale, table, block = scale.t().contiguous(), table.transpose(0, 1).contiguous(), [-1, 1]
                index = ((index % k) * w.shape[0] + index // k).contiguous()
            tensors = {"scale": scale, "codebook": table, "outlier_index": index if index.numel() else None,
                       "outlier_value": r.value if index.numel() else None}
            items.append((QuantMeta("weight", "", site_key(s), spec), block, tensors, at[s.node]))
            sparse, err = sparse + index.numel(), err + r.weighted_error
        decisions = {"bits": cfg.bits, "outliers": cfg.outliers, "sensitive": cfg.sensitive, "iters": cfg.iters,
                     "fisher_samples": n, "kmeans_starts": ["weighted_quantiles", "uniform_grid"]}
        plan = build(self.name, items, decisions=decisions)
        self.apply(gm, plan)
        stats = {"linears": len(todo), "sparse_values": sparse, "fisher_samples": n, "weighted_error": err}
        return PassResult(modified=True, stats=stats, near_misses=near, plan=plan)

    @classmethod
    def apply(cls, gm: GraphModule, plan: Plan) -> None:
        """Insert the plan's codebook weight quantizers (with their sparse values where recorded)."""
        sites = linear_sites(gm)
        index = SiteIndex(sites)
        for qp, t in zip(plan.quantizers, plan.tensors()):
            site = index.quantized(qp)
            side = SideChannels(outliers=SparseValues(t["outlier_index"], t["outlier_value"])) \
                if "outlier_index" in t else SideChannels()
            meta = dataclasses.replace(qp.meta, site=site.node.name, path=site.path)
            q = insert_quantizer(gm, site.node, site.weight_use, meta, block=list(qp.block), scale=t["scale"],
                                 codebook=t["codebook"], side=side, name=f"{site.weight.target}_scale",
                                 origin="squeezellm")
            site.node.replace_input_with(site.weight_use, q.node)


def _fisher(gm: GraphModule, ctx: Context, todo: list[LinearSite], max_samples: int | None):
    """{weight target: mean squared gradient of the LM loss} over the calibration sequences, and their count."""
    calib = ctx.require_calibration("squeezellm")
    samples = calib.samples[:max_samples] if max_samples else calib.samples
    params = {s.weight.target: param_of(gm, s.weight) for s in todo}
    was = {id(p): p.requires_grad for p in gm.parameters()}
    acc = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    try:
        for p in gm.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            for i, sample in enumerate(samples):
                ids = sample[0]
                if ids.is_floating_point() or ids.dim() != 2 or ids.shape[1] < 2:
                    raise CalibrationError(f"calib_data[{i}] is not a [batch, seq >= 2] tensor of token ids: "
                                           "squeezellm's Fisher information needs the LM loss (next-token targets)",
                                           fix="calibrate on token-id sequences of at least 2 tokens")
                logits = logits_of(gm(*sample))
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                for k, g in zip(params, grads):
                    if g is not None:
                        acc[k] += g.detach().float() ** 2
    finally:
        for p in gm.parameters():
            p.requires_grad_(was.get(id(p), False))
    return {k: v / len(samples) for k, v in acc.items()}, len(samples)


def _canonical(t: torch.Tensor, s: LinearSite) -> torch.Tensor:
    """The weight (or its Fisher) as [out, in]."""
    return t if s.in_axis == 1 else t.t()



__all__ = ["SqueezeLlm", "SqueezeLlmConfig"]
