"""Incoherence processing per linear (QuIP, Chee et al. 2023; QuIP#'s randomized Hadamard form).

Matches   every selected linear-like site (``qpass.graph.linear_sites``; default: all but lm_head)
Changes   y = x Wᵀ + b becomes y = had_out(x' W'ᵀ + b'),  x' = had_in(x):
            had_in(x)  = (x ⊙ s_in) T_in     = x A      (A = S_in T_in,  n_in  x n_in,  orthogonal)
            had_out(y) = (y ⊙ s_out) T_out   = y C      (C = S_out T_out, n_out x n_out, orthogonal)
            W' = C W A,  b' = b Cᵀ
          T the normalised Hadamard transform of the size (``qpass.primitives.hadamard``: Sylvester x Paley,
          a seeded random orthogonal small factor otherwise), s seeded random signs: two ``qpass.hadamard`` nodes
          per linear. The float function is unchanged; W' is incoherent (its max |entry| drops) and so is the
          Hessian a later ``gptq`` pass collects at the linear's input, ``A ᵀ H A``: gptq after quip is QuIP's LDLQ
          with the transformed Hessian (the paper proves LDLQ equals OPTQ/GPTQ). Put ``quantize`` (the W2/W3 grid)
          and ``gptq`` after it.
Requires  nothing (no calibration); run it before any quantizer
Preserves nothing (adds nodes)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import GraphModule

from qpass import folding
from qpass import rotation
from qpass.errors import RecipeError, UnsupportedOpError
from qpass.graph import is_quantizer, linear_sites, param_of, select
from qpass.pass_infra import Context, Pass, PassResult
from qpass.plan import Plan, PlanError, occurrences
from qpass.primitives import hadamard as H


@dataclass(frozen=True)
class QuipConfig:
    name: ClassVar[str] = "quip"
    field_docs: ClassVar[dict] = {
        "seed": "seed of the random signs (recorded in the plan)",
        "targets": "module-path globs of the linears to process",
        "ignore": "module-path globs of linears to leave alone (a bare name matches as a suffix: lm_head)",
    }

    seed: int = 0
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ("lm_head",)

    def __post_init__(self):
        if not 0 <= self.seed < 2 ** 62:
            raise RecipeError("seed", f"must be a non-negative integer, got {self.seed}")
        if not self.targets:
            raise RecipeError("targets", "must list at least one module-path glob (e.g. ['*'])")


@dataclass(frozen=True)
class Quip(Pass):
    """Two-sided randomized Hadamard incoherence processing of every selected linear (QuIP)."""

    config: QuipConfig = QuipConfig()
    name: ClassVar[str] = "quip"

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        cfg = self.config
        sites, keys = _keys(gm)
        chosen = select([k[0] for k in keys], cfg.targets, cfg.ignore, "quip") if keys else set()
        todo = [k for k in keys if k[0] in chosen]
        for site, key in zip(sites, keys):
            if key in todo and is_quantizer(site.weight_use):
                raise UnsupportedOpError(f"quip: {key[0]} is already quantized", fix="put quip before quantize/gptq")
        mu = _transform(gm, todo, cfg.seed, compensate=True)
        stats = {"linears": len(todo), "mu_before": round(mu[0], 3), "mu_after": round(mu[1], 3)}
        plan = Plan(self.name, decisions={"seed": cfg.seed, "linears": [list(k) for k in todo]})
        return PassResult(modified=bool(todo), stats=stats, plan=plan)

    def streaming_refusal(self) -> str | None:
        return "quip rewrites every selected weight in one step, which needs every weight in memory"

    @classmethod
    def apply(cls, gm: GraphModule, plan: Plan) -> None:
        """Insert the transforms again (the transformed weights and biases are in the state dict)."""
        _transform(gm, [tuple(k) for k in plan.decisions.get("linears", ())], int(plan.decisions.get("seed", 0)),
                   compensate=False)


def _keys(gm: GraphModule):
    sites = linear_sites(gm)
    paths = [s.path or s.node.name for s in sites]
    return sites, list(zip(paths, occurrences(paths)))


def incoherence(w: torch.Tensor) -> float:
    """QuIP's mu of a weight: max |W_ij| sqrt(m n) / ||W||_F (1 when every entry has the same magnitude)."""
    w = w.detach().double()
    return float(w.abs().max() * (w.numel() ** 0.5) / w.norm().clamp_min(1e-30))


def _transform(gm: GraphModule, todo: list[tuple], seed: int, compensate: bool) -> tuple[float, float]:
    sites, keys = _keys(gm)
    by_key = dict(zip(keys, sites))
    mus = [0.0, 0.0]
    for i, key in enumerate(todo):
        site = by_key.get(key)
        if site is None:
            raise PlanError(f"the quip plan transforms linear {key[0]!r} (occurrence {key[1]}), which this graph does "
                            "not have", fix="apply plans to a capture of the model they were made on")
        n_out, n_in = (param_of(gm, site.weight).shape[a] for a in (site.out_axis, site.in_axis))
        f_in, f_out = H.small_factor(n_in, seed)[0], H.small_factor(n_out, seed)[0]
        s_in, s_out = H.random_signs(n_in, 2 * (seed + i) + 1), H.random_signs(n_out, 2 * (seed + i) + 2)
        if compensate:
            a = s_in.view(-1, 1) * H.transform_matrix(n_in, f_in)
            c = s_out.view(-1, 1) * H.transform_matrix(n_out, f_out)
            w = folding.canonical_weight(gm, site).double()
            mus[0] = max(mus[0], incoherence(w))
            w2 = c @ w @ a
            mus[1] = max(mus[1], incoherence(w2))
            folding._set_canonical(gm, site, w2)
            if site.bias is not None:
                b = param_of(gm, site.bias)
                with torch.no_grad():
                    b.copy_((b.detach().double() @ c.T).to(b))
        x_in = rotation.hadamard_node(gm, site.node, site.input, f_in, near=site.weight, signs=s_in)
        site.node.replace_input_with(site.input, x_in)
        users = list(site.node.users)
        y_out = rotation.hadamard_node(gm, site.node.next, site.node, f_out, near=site.weight, signs=s_out)
        for u in users:
            u.replace_input_with(site.node, y_out)
    gm.graph.lint()
    gm.recompile()
    return mus[0], mus[1]


__all__ = ["Quip", "QuipConfig", "incoherence"]
