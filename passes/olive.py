"""OliVe (Guo et al., ISCA 2023): outlier-victim pair quantization of weights and activations, emulated.

Matches   linear(x, W[, b]), addmm(b, x, W'), mm(x, W'), matmul(x, W') with W a 2-D parameter (as ``quantize``),
          selected by targets/ignore, not already quantized
Changes   W -> qpass.fake_quantize_ext(W, scale, None, block, 'olive<b>')          (weights)
          x -> qpass.fake_quantize_ext(x, scale, None, (-1, ..), 'olive<b>')       (activations: static per-tensor)
          The format (qpass.primitives.olive) is b bits per value: normal values on the symmetric int<b> grid
          (without its most negative code), and in each adjacent pair (along the last axis) that holds an
          outlier, the other value (the victim) pruned to 0 and coded with that reserved code, the outlier coded
          as a b-bit abfloat (sign, 2 exponent bits, b-3 mantissa bits, exponent bias b-1: up to 96x the step at
          4 bits, 2016x at 8). The pairs are encoded on every call, so activation outliers are found per input.
          Scales: the paper's. The normal range is a multiple of max|mean +- 3 std| of each block (per output
          channel / group of the weight; the whole tensor for activations, from calibration rows), the multiple
          searched on a grid (min_ratio .. max_ratio) by the encoded MSE; plain min-max (no outliers) is one more
          candidate, so the search never does worse than the int grid alone on the data it sees.
Requires  calibration data when activations are quantized (static per-tensor scales)
Preserves nothing (adds nodes and buffers)

It is an emulation of a hardware format: the paper's decoder lives in a systolic array / tensor core; no CPU or
GPU kernel runs it. Bits: exactly b per value plus one fp16 scale per block (the pair marker is a reserved code,
not an extra bit). The torch backend lowers it by its generic route (uint8 codes + scales, decode + matmul; an
activation quantizer runs the same encode/decode on the input); ONNX refuses it by name (no standard op decodes
the pairs; a per-tensor 2^b-entry Gather cannot express the victim rule).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch.fx import GraphModule

from qpass.analyses import LinearSites, Observed
from qpass.errors import RecipeError
from qpass.graph import param_of, select, site_key
from qpass.pass_infra import Context, Pass, PassResult
from qpass.plan import Plan, build, occurrences
from qpass.primitives.formats import get_format
from qpass.primitives.olive import OliveObserver, search_scale
from qpass.primitives.spec import IntFormat, PerChannel, PerGroup, PerTensor, QSpec
from qpass.quantizer import QuantMeta

from .quantize import Quantize, _refuse_double_quantization, weight_block_size


@dataclass(frozen=True)
class OliveConfig:
    name: ClassVar[str] = "olive"
    field_docs: ClassVar[dict] = {
        "weights": "the normal-value grid of the weights ({bits: 4..8}, per_channel or per_group with an even "
                   "group size); outliers and victims as OliVe encodes them; null: weights stay float",
        "activations": "the normal-value grid of each linear's input ({bits: 4..8, granularity: per_tensor}, "
                       "static: scales from calibration); null: inputs stay float",
        "targets": "module-path globs to quantize",
        "ignore": "module-path globs to leave in float (a bare name matches as a suffix: lm_head)",
        "min_ratio": "smallest multiple of the 3-sigma bound tried as the normal range",
        "max_ratio": "largest multiple of the 3-sigma bound tried as the normal range",
        "grid": "multiples tried between min_ratio and max_ratio (plus min-max, always)",
        "max_rows": "calibration rows (tokens) kept per activation to search its scale on",
    }

    weights: QSpec | None = QSpec(IntFormat(4), PerChannel(0))
    activations: QSpec | None = None
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    min_ratio: float = 0.25
    max_ratio: float = 1.5
    grid: int = 26
    max_rows: int = 2048

    def __post_init__(self):
        for role, spec in (("weights", self.weights), ("activations", self.activations)):
            if spec is None:
                continue
            if spec.format.kind != "int" or not 4 <= spec.bits <= 8 or not spec.symmetric:
                raise RecipeError(role, "OliVe's normal values are a symmetric int grid of 4..8 bits "
                                  f"(bits: 4 or 8); got {spec.format.name}, symmetric={spec.symmetric}")
            if spec.dynamic or spec.full_range or spec.scale_pow2:
                raise RecipeError(role, "OliVe scales are static (searched on the 3-sigma range); remove dynamic, "
                                  "full_range and scale_pow2")
        w, a = self.weights, self.activations
        if w is not None:
            g = w.granularity
            if not isinstance(g, (PerChannel, PerGroup)) or g.axis not in (0, -1, 1):
                raise RecipeError("weights.granularity", "per_channel (axis 0) or per_group along the inputs")
            if isinstance(g, PerGroup) and g.group_size % 2:
                raise RecipeError("weights.group_size", f"must be even (pairs do not cross groups), got "
                                  f"{g.group_size}")
        if a is not None and not isinstance(a.granularity, PerTensor):
            raise RecipeError("activations.granularity", "OliVe activation scales are per_tensor (static); "
                              "set granularity: per_tensor")
        if w is None and a is None:
            raise RecipeError("weights", "nothing to quantize: give weights, activations or both")
        if not 0.0 < self.min_ratio <= self.max_ratio or self.max_ratio > 10.0:
            raise RecipeError("min_ratio", f"need 0 < min_ratio <= max_ratio <= 10, got {self.min_ratio}, "
                              f"{self.max_ratio}")
        if not 1 <= self.grid <= 1000:
            raise RecipeError("grid", f"must be in [1, 1000], got {self.grid}")
        if self.max_rows < 1:
            raise RecipeError("max_rows", f"must be positive, got {self.max_rows}")
        if not self.targets:
            raise RecipeError("targets", "must list at least one module-path glob (e.g. ['*'])")

    @property
    def ratios(self) -> tuple[float, ...]:
        return tuple(float(r) for r in torch.linspace(self.min_ratio, self.max_ratio, self.grid))


def olive_spec(spec: QSpec) -> QSpec:
    """The quantizer spec of an int<b> normal grid: format olive<b>, same granularity."""
    return replace(spec, format=get_format(f"olive{spec.bits}"))


@dataclass(frozen=True)
class Olive(Pass):
    """Insert OliVe outlier-victim pair quantizers (emulated) on weights and static per-tensor inputs."""

    config: OliveConfig = OliveConfig()
    name: ClassVar[str] = "olive"

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        cfg = self.config
        sites = list(ctx.get(LinearSites(), gm))
        chosen = select([site_key(s) for s in sites], cfg.targets, cfg.ignore, self.name)
        at = dict(zip((s.node for s in sites), occurrences(site_key(s) for s in sites)))
        todo = [s for s in sites if site_key(s) in chosen]
        skipped = [f"{site_key(s)}: excluded by targets/ignore" for s in sites if site_key(s) not in chosen]
        _refuse_double_quantization(gm, todo, cfg)
        acts = self._activation_scales(gm, ctx, todo)
        items, outliers = [], 0
        for site in todo:
            if cfg.weights is not None:
                spec = olive_spec(cfg.weights)
                block = weight_block_size(spec, use_in_axis=site.use_in_axis)
                with ctx.loaded([site.weight.target]):
                    w = param_of(gm, site.weight).detach()
                    w = w.t() if site.weight_use is not site.weight else w
                    scale = search_scale(w, block, spec.format.name, cfg.ratios)
                    outliers += _outlier_count(w, scale, block, spec)
                items.append((QuantMeta("weight", "", site_key(site), spec), block, {"scale": scale}, at[site.node]))
            if cfg.activations is not None:
                spec = olive_spec(cfg.activations)
                block = spec.block_size(site.input.meta["val"].shape)
                items.append((QuantMeta("input", "", site_key(site), spec), block,
                              {"scale": acts[site.input.name]}, at[site.node]))
        plan = build(self.name, items, decisions={"ratios": list(cfg.ratios)})
        self.apply(gm, plan)
        n_w = sum(s.weight.meta["val"].numel() for s in todo) if cfg.weights is not None else 0
        stats = {"linears": len(todo), "weights_quantized": len(todo) if cfg.weights else 0,
                 "inputs_quantized": len(todo) if cfg.activations else 0, "skipped": len(skipped),
                 "weight_outlier_pairs": outliers,
                 "weight_outlier_rate": round(outliers / n_w, 6) if n_w else 0.0}
        return PassResult(modified=bool(items), stats=stats, near_misses=skipped, plan=plan)

    @classmethod
    def apply(cls, gm: GraphModule, plan: Plan) -> None:
        """The quantize pass's apply: the plan's quantizers (format olive<b>) on the linears it names."""
        Quantize.apply(gm, plan)

    def _activation_scales(self, gm: GraphModule, ctx: Context, todo) -> dict:
        cfg = self.config
        if cfg.activations is None or not todo:
            return {}
        make = _MakeObserver(olive_spec(cfg.activations), cfg.ratios, cfg.max_rows)
        obs = ctx.get(Observed(tuple(dict.fromkeys(s.input.name for s in todo)), make,
                               who="olive with activations", desc="olive: observing linear inputs"), gm)
        return {k: o.qparams()[0] for k, o in obs.items()}


@dataclass(frozen=True)
class _MakeObserver:
    spec: QSpec
    ratios: tuple[float, ...]
    max_rows: int

    def __call__(self, name, node):
        return OliveObserver(self.spec, ratios=self.ratios, max_rows=self.max_rows)


def _outlier_count(w: torch.Tensor, scale: torch.Tensor, block, spec: QSpec) -> int:
    """Values of `w` coded as abfloat outliers (one per outlier pair) under `scale`."""
    from qpass.primitives.formats import quantize_ext

    fmt = spec.format
    codes = quantize_ext(w, scale, None, block, fmt.name).long()
    return int((codes == fmt.identifier).sum())


__all__ = ["Olive", "OliveConfig", "olive_spec"]
