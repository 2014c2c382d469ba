"""Low-rank compensation of the weight quantization error (LoRC, ZeroQuant-V2, Yao et al. 2023).

Matches   every linear whose weight goes through a static weight quantizer (inserted by quantize, re-rounded by
          gptq / quantease / awq / ... or not), selected by targets/ignore
Changes   y = linear(x, W_hat) -> y + linear(linear(x, R), L) with E = W - W_hat ([out, in]) and its truncated SVD
          E ~ U_r S_r V_r^T:  L = U_r S_r^{1/2} [out, r],  R = S_r^{1/2} V_r^T [r, in]   (rank r = ``rank``, the
          paper: 8; at most min(out, in)). L and R are float parameters (``<module path>.lorc_L`` / ``lorc_R``);
          the branch is two ordinary linears (two MatMuls in ONNX), listed in ``gm.meta["qpass_lorc"]`` and counted
          by qpass.eval.weight_bytes
          x is the linear's float input (what an input quantizer feeding it reads), so the branch adds E x
          whatever the activation format (ZeroQuant-V2 is weight-only here; with quantized activations the base
          linear reads the quantized x, the branch the float one)
          W (the float weight): the parameter itself while the quantizer still reads it (RTN: quantize alone);
          after a pass re-rounded it in place (gptq, quantease: the parameter is then on the grid), the weight of
          the model given to qpass.apply (the float original), refused when it is not close to W_hat (an earlier
          pass changed the float weights, e.g. awq's scales) or not available (qpass.apply_from_disk)
Requires  nothing (no data)
Preserves nothing (adds nodes and parameters)

Eckart-Young: ||E - L R||_F^2 is the tail energy sum_{i > r} s_i^2 of E, decreasing in r and 0 at full rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import GraphModule, Node

from qpass.analyses import LinearSites
from qpass.errors import QuantizationError, RecipeError
from qpass.graph import LinearSite, describe, param_of, select, site_key
from qpass.pass_infra import Context, Pass, PassResult
from qpass.plan import Plan, occurrences
from qpass.quantizer import Quantizer

from .lora import insert_low_rank, planned_branches

META_LORC = "qpass_lorc"      # gm.meta: {module path: (R name, L name)}
_FAR = 0.5                    # ||W_teacher - W_hat|| / ||W_teacher|| above this: not the weight that was quantized


@dataclass(frozen=True)
class LorcConfig:
    name: ClassVar[str] = "lorc"
    field_docs: ClassVar[dict] = {
        "rank": "rank r of each compensation (L is [out, r], R is [r, in]; the paper: 8); at most min(out, in)",
        "targets": "module-path globs of quantized linears to compensate",
        "ignore": "module-path globs to leave without a branch",
    }

    rank: int = 8
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        if not 1 <= self.rank <= 1 << 16:
            raise RecipeError("rank", f"must be an integer in [1, 65536] (the paper: 8), got {self.rank}")
        if not self.targets:
            raise RecipeError("targets", "must list at least one module-path glob (e.g. ['*'])")


@dataclass(frozen=True)
class Lorc(Pass):
    """Add the rank-r SVD of each quantized weight's error as two skinny linears beside it (LoRC)."""

    config: LorcConfig = LorcConfig()
    name: ClassVar[str] = "lorc"

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        cfg = self.config
        sites = ctx.get(LinearSites(), gm)
        quantized = [s for s in sites if _static_weight_quantizer(s) is not None]
        if sites and not quantized:
            raise QuantizationError(
                f"lorc found no quantized weights among the {len(sites)} linears (e.g. {describe(gm, sites[0].node)})",
                fix="place lorc after the passes that quantize the weights ('- quantize: {weights: ...}', then "
                    "optionally '- gptq'): it compensates their error")
        chosen = select([s.path for s in quantized], cfg.targets, cfg.ignore, "lorc") if quantized else set()
        at = dict(zip((s.node for s in sites), occurrences(site_key(s) for s in sites)))
        done = set(gm.meta.get(META_LORC, {}))
        todo = [s for s in quantized if s.path in chosen]
        near = [f"{site_key(s)}: excluded by targets/ignore" for s in quantized if s.path not in chosen]
        again = [site_key(s) for s in todo if site_key(s) in done]
        if again:
            raise RecipeError("lorc.targets", f"{again[0]} already has a LoRC branch from an earlier lorc pass; use "
                              "targets/ignore so that each linear gets one")
        branches, values, errors, source = [], {}, {}, {"graph": 0, "model": 0}
        for i, s in enumerate(todo):
            with ctx.loaded([s.weight.target]):
                w_hat = _canonical(s, _evaluate(gm, s.weight_use)).double()
                w, where = _float_weight(gm, s, w_hat, ctx.teacher)
            source[where] += 1
            e = w.double() - w_hat
            u, sv, vh = torch.linalg.svd(e, full_matrices=False)
            r = min(cfg.rank, sv.numel())
            root = sv[:r].sqrt()
            # NOTE: contiguous, as a loaded state dict is (a strided L would take another matmul path)
            values[i] = {"L": (u[:, :r] * root).float().contiguous(),
                         "R": (root[:, None] * vh[:r]).float().contiguous()}
            total = float(sv.pow(2).sum())
            errors[site_key(s)] = float(sv[r:].pow(2).sum()) / total if total > 0 else 0.0
            branches.append({"path": site_key(s), "at": at[s.node], "rank": r, "in": e.shape[1], "out": e.shape[0]})
        plan = Plan(self.name, decisions={"branches": branches}, values=values)
        self.apply(gm, plan)
        params = sum(b["rank"] * (b["in"] + b["out"]) for b in branches)
        stats = {"branches": len(branches), "rank": cfg.rank, "added_params": params, "added_bytes_fp16": 2 * params,
                 "added_bytes_fp32": 4 * params, "float_weight_from": source,
                 "mean_error_left": sum(errors.values()) / len(errors) if errors else None, "error_left": errors}
        return PassResult(modified=bool(branches), stats=stats, near_misses=near, plan=plan)

    @classmethod
    def apply(cls, gm: GraphModule, plan: Plan) -> None:
        """Insert the plan's branches (L, R from the plan's values, else zeros of the recorded shapes)."""
        registry = dict(gm.meta.get(META_LORC, {}))
        for b, site, r, left in planned_branches(gm, plan, "branches", "a LoRC branch", names=("R", "L")):
            registry[b["path"]] = insert_low_rank(gm, site, r, left, scaling=None, names=("lorc_R", "lorc_L"),
                                                  origin="lorc", trainable=True)
        gm.meta[META_LORC] = registry


def _static_weight_quantizer(site: LinearSite) -> Node | None:
    q = Quantizer.of(site.weight_use)
    return q.node if q is not None and q.role == "weight" and not q.dynamic else None


def _evaluate(gm: GraphModule, node: Node) -> torch.Tensor:
    """The value of `node` (a weight quantizer and the transposes and parameters it reads), computed."""
    if node.op == "get_attr":
        return param_of(gm, node).detach()
    args = [_evaluate(gm, a) if isinstance(a, Node) else a for a in node.args]
    with torch.no_grad():
        return node.target(*args, **node.kwargs)


def _canonical(site: LinearSite, t: torch.Tensor) -> torch.Tensor:
    """A tensor laid out like the weight at the linear (`weight_use`) as [out, in]."""
    return t if site.use_in_axis == 1 else t.t()


def _float_weight(gm: GraphModule, site: LinearSite, w_hat: torch.Tensor, teacher) -> tuple[torch.Tensor, str]:
    """The float weight W that was quantized to `w_hat` ([out, in]) and where it came from ('graph' or 'model')."""
    param = param_of(gm, site.weight).detach()
    w = param if site.in_axis == 1 else param.t()
    if not torch.equal(w.double(), w_hat):
        return w, "graph"                         # the quantizer still reads the float weight
    original = _teacher_weight(teacher, site.weight.target, param.shape)
    if original is None:
        raise QuantizationError(
            f"the weight of {site.path or site.node.name} was re-rounded in place (it is on its quantizer's grid) and "
            "its float values are not available", fix="run lorc in the same qpass.apply(model, recipe) call as the "
            "passes that quantize the weights (it reads the float weights of the model given to apply); "
            "qpass.apply_from_disk cannot run lorc after gptq / quantease")
    w = original if site.in_axis == 1 else original.t()
    far = float((w.double() - w_hat).norm() / w.double().norm().clamp_min(1e-30))
    if far > _FAR:
        raise QuantizationError(
            f"the float weight of {site.path} in the model given to apply is {far:.2f} of its norm away from the "
            "quantized weight: an earlier pass changed the float weights (e.g. awq or smoothquant scales) before "
            "they were re-rounded", fix="use lorc with passes that keep the float weights (quantize, gptq, "
            "quantease), or put lorc right after quantize (before any re-rounding)")
    return w, "model"


def _teacher_weight(teacher, target: str, shape) -> torch.Tensor | None:
    """The parameter of the original model behind get_attr `target` (the capture prefixes its module path)."""
    if teacher is None or not hasattr(teacher, "named_parameters"):
        return None
    params = dict(teacher.named_parameters())
    parts = target.split(".")
    for k in range(len(parts)):
        p = params.get(".".join(parts[k:]))
        if p is not None and tuple(p.shape) == tuple(shape):
            return p.detach()
    return None



__all__ = ["Lorc", "LorcConfig", "META_LORC"]
