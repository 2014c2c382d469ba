"""Plans: what a pass decided, recorded so that it can be applied again without data and without the pass.

A pass runs in two steps. *Deciding* reads the graph, its config and data (calibration statistics, searches,
training) and produces a :class:`Plan`; *applying* the plan to a graph is a separate, data-free step::

    result = pass_.run(gm, ctx)            # decide, then apply: result.plan
    apply_plans(gm2, [result.plan, ...])   # the same structure on another capture of the same model

A plan is plain data (``to_dict`` / ``from_dict``, JSON). It holds

* ``quantizers``: every quantizer the pass inserted, as a :class:`QuantizerPlan`: where (the module path of the
  linear or attention it serves, which occurrence of that path, the role), what (a ``QuantMeta``: spec, block,
  side channels) and the shape and dtype of each of its tensors (scale, zero point, codebook, outlier indices,
  ...), so that a data-dependent structure (OWQ's weak columns, SpQR's outlier count, MoFQ's per-layer format)
  is rebuilt exactly;
* ``learnable``: module paths of weight quantizers whose scales are parameters (QAT's learnable scales);
* ``decisions``: the pass's other decisions, JSON: what apply needs (kv_cache's K position) and, for passes
  that only change parameter values (smoothquant, awq, gptq), what was decided (the searched alpha of each
  group, the linears re-rounded) for the record; their values live in the state dict.

Values are not in the JSON. On the fresh run the pass hands its tensors to its own ``apply`` (``values``, by
quantizer index); when a saved model is loaded, apply creates placeholders of the recorded shapes and the saved
tensors are loaded over them. Plans are stored in the artefact (``plans.json``, sealed) and re-applied by
``qpass.load``, the decode graph and the ONNX decoder-step capture: loading never runs a pass.

Where a plan names a site by module path: a capture of the same model (the prefill graph, the static-cache
decode step, the dynamic-cache ONNX step) has the same module paths and the same linears in the same order,
so ``(path, occurrence)`` finds the same linear in each; a path the graph lacks is a :class:`PlanError`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule

from .errors import ArtifactError
from .graph import occurrences, site_key
from .quantizer import QuantMeta

PLAN_VERSION = 1


class PlanError(ArtifactError):
    """A plan that does not fit the graph it is applied to (or does not parse)."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor a plan creates (its value comes from the pass or the saved state dict).
    `same_as`: (quantizer index, tensor name) of an earlier tensor of the plan this one *is* (q, k and v
    reading one input share its static scale: one tensor under several names, saved once)."""

    shape: tuple[int, ...]
    dtype: str
    same_as: tuple[int, str] | None = None

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorSpec":
        return cls(tuple(int(d) for d in t.shape), str(t.dtype).removeprefix("torch."))

    def empty(self) -> torch.Tensor:
        """A placeholder: ones for floating tensors (a scale of 1 is valid), zeros otherwise."""
        dtype = getattr(torch, self.dtype)
        return torch.ones(self.shape, dtype=dtype) if dtype.is_floating_point else torch.zeros(self.shape, dtype=dtype)


@dataclass(frozen=True)
class QuantizerPlan:
    """One quantizer a pass inserts. `meta.path` (with `at`, the occurrence of that path among the pass's sites
    in graph order) says where, `meta.role` which tensor, `block` the block size it was inserted with and
    `tensors` the shape and dtype of each tensor argument by name ('scale', 'zero_point', 'codebook',
    'outlier_index', ...; none for a dynamic quantizer)."""

    meta: QuantMeta
    block: tuple[int, ...]
    tensors: Mapping[str, TensorSpec] = field(default_factory=dict)
    at: int = 0

    @property
    def key(self) -> tuple[str, int, str]:
        return self.meta.path, self.at, self.meta.role

    def to_dict(self) -> dict:
        d = {"meta": self.meta.to_dict(), "block": list(self.block), "at": self.at,
             "tensors": {k: {"shape": list(v.shape), "dtype": v.dtype,
                             **({"same_as": list(v.same_as)} if v.same_as else {})}
                         for k, v in sorted(self.tensors.items())}}
        d["meta"].pop("site", None)     # a node name of the graph it was decided on: not meaningful elsewhere
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "QuantizerPlan":
        meta = QuantMeta.from_dict({"site": "", **d["meta"]})
        tensors = {k: TensorSpec(tuple(v["shape"]), v["dtype"], (int(v["same_as"][0]), str(v["same_as"][1]))
                                 if v.get("same_as") else None) for k, v in d.get("tensors", {}).items()}
        return cls(meta, tuple(d["block"]), tensors, int(d.get("at", 0)))


@dataclass(frozen=True)
class Plan:
    """What one pass decided (see the module doc). `values`: the fresh run's tensors by quantizer index,
    {index: {tensor name: tensor}}; never serialised (a saved model's state dict holds them)."""

    pass_name: str
    quantizers: tuple[QuantizerPlan, ...] = ()
    learnable: tuple[str, ...] = ()
    decisions: Mapping[str, Any] = field(default_factory=dict)
    values: Mapping[int, Mapping[str, torch.Tensor]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def structural(self) -> bool:
        """Whether applying it changes the graph (else the pass changed parameter values only)."""
        return bool(self.quantizers or self.learnable)

    def tensors(self) -> list[dict[str, torch.Tensor]]:
        """Each quantizer's tensors: the fresh run's values, or placeholders of the recorded shapes (one
        placeholder for tensors recorded as the same tensor)."""
        out: list[dict[str, torch.Tensor]] = []
        for i, qp in enumerate(self.quantizers):
            given, mine = self.values.get(i, {}), {}
            for k, spec in qp.tensors.items():
                if k in given:
                    mine[k] = given[k]
                elif spec.same_as is not None:
                    j, name = spec.same_as
                    if not (0 <= j < i and name in out[j]):
                        raise PlanError(f"quantizer {i} of the {self.pass_name} plan shares tensor {name!r} of "
                                        f"quantizer {j}, which it does not have", fix="quantize again and save")
                    mine[k] = out[j][name]
                else:
                    mine[k] = spec.empty()
            out.append(mine)
        return out

    def without_values(self) -> "Plan":
        return dataclasses.replace(self, values={})

    def to_dict(self) -> dict:
        from .artifacts import _jsonable   # NOTE: artifacts imports the API, which imports this module

        return {"pass": self.pass_name, "version": PLAN_VERSION,
                "quantizers": [q.to_dict() for q in self.quantizers], "learnable": list(self.learnable),
                "decisions": _jsonable(dict(self.decisions))}

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "the plan") -> "Plan":
        try:
            if d.get("version") != PLAN_VERSION:
                raise PlanError(f"{where} has plan version {d.get('version')!r}; this qpass reads version "
                                f"{PLAN_VERSION}", fix="load it with the qpass version that wrote it, or quantize again")
            return cls(str(d["pass"]), tuple(QuantizerPlan.from_dict(q) for q in d.get("quantizers", ())),
                       tuple(d.get("learnable", ())), dict(d.get("decisions", {})))
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlanError(f"{where} does not parse as a qpass plan: {type(e).__name__}: {e}",
                            fix="quantize again and save; plans are written by qpass, not by hand") from e


def build(pass_name: str, items: Sequence[tuple[QuantMeta, Sequence[int], Mapping[str, torch.Tensor | None], int]],
          **fields) -> Plan:
    """The plan of a pass that inserts quantizers `items` = [(meta, block, {tensor name: tensor or None}, at)]
    with these values (None entries are left out; a tensor object given twice is recorded as shared)."""
    seen: dict[int, tuple[int, str]] = {}
    records, values = [], {}
    for i, (meta, block, tensors, at) in enumerate(items):
        specs = {}
        for k, t in tensors.items():
            if t is None:
                continue
            specs[k] = dataclasses.replace(TensorSpec.of(t), same_as=seen.get(id(t)))
            seen.setdefault(id(t), (i, k))
        records.append(QuantizerPlan(dataclasses.replace(meta, site=""), tuple(int(b) for b in block), specs, at))
        values[i] = {k: t for k, t in tensors.items() if t is not None}
    return Plan(pass_name, tuple(records), values=values, **fields)


class SiteIndex:
    """A graph's linears as plans name them: (site_key, occurrence in graph order) -> site."""

    def __init__(self, sites: Sequence, key=site_key):
        self.count = len(sites)
        keys = [key(s) for s in sites]
        self._by = {(k, at): s for s, k, at in zip(sites, keys, occurrences(keys))}

    def get(self, path: str, at: int):
        return self._by.get((path, at))

    def quantized(self, qp: QuantizerPlan):
        """The linear whose weight or input quantizer `qp` plans; a clear PlanError where this graph has none."""
        site = self.get(qp.meta.path, qp.at)
        if site is None:
            raise PlanError(f"the plan quantizes linear {qp.meta.path!r} (occurrence {qp.at}), which this graph "
                            f"does not have ({self.count} linears)",
                            fix="apply plans to a capture of the model they were made on")
        return site


def apply_plans(gm: GraphModule, plans: Sequence[Plan]) -> None:
    """Apply `plans` in order to `gm` (a fresh capture of the model they were decided on): the quantized
    graph's structure with placeholder tensors, ready for its saved tensors. Runs no pass and needs no data."""
    from .recipe import pass_class   # NOTE: the pass table lives in qpass.passes, imported late

    for i, plan in enumerate(plans):
        cls = pass_class(plan.pass_name, where=f"plans[{i}]")
        try:
            cls.apply(gm, plan)
        except PlanError as e:
            e.args = (f"plans[{i}] ({plan.pass_name}): {e}",) + e.args[1:]
            raise
        gm.graph.lint()
    gm.recompile()


def plans_to_json(plans: Sequence[Plan]) -> list[dict]:
    return [p.to_dict() for p in plans]


def plans_from_json(data: Any, where: str) -> list[Plan]:
    if not isinstance(data, list):
        raise PlanError(f"{where} is not a list of plans", fix="quantize again and save")
    return [Plan.from_dict(d, f"{where}[{i}]") if isinstance(d, dict) else _not_a_plan(where, i)
            for i, d in enumerate(data)]


def _not_a_plan(where: str, i: int):
    raise PlanError(f"{where}[{i}] is not a JSON object", fix="quantize again and save")


__all__ = ["Plan", "QuantizerPlan", "TensorSpec", "PlanError", "PLAN_VERSION", "build", "occurrences", "SiteIndex",
           "apply_plans", "plans_to_json", "plans_from_json"]
