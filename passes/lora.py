"""Insert LoRA branches beside selected linears (Hu et al., LoRA, ICLR 2022; the adapters of QLoRA).

Matches   every linear-like site (``qpass.graph.linear_sites``) selected by targets/ignore, whatever its weight
          and input quantizers
Changes   y = linear(x, W) -> y + (alpha / rank) * linear(linear(x, A), B)
            A [rank, in]  initialised as PEFT does (kaiming-uniform, a = sqrt(5)), seeded
            B [out, rank] zeros, so the function is unchanged at step 0 (the paper's initialisation)
          x is the linear's *float* input: where an input quantizer feeds the linear, the branch reads what
          that quantizer reads (QLoRA computes the adapters in 16-bit beside the 4-bit base)
          A and B are parameters; ``trainable: lora`` in the qat pass trains only them
Requires  nothing (no data)
Preserves nothing (adds nodes and parameters)

The adapter linears are marked (``META_ORIGIN = "lora"``) and are not linear sites: a later quantize pass does
not quantize them. Adapter parameters are listed in ``gm.meta["qpass_lora"]`` ({module path: (A name, B name,
scaling)}), which the qat pass reads for ``trainable: lora`` and ``qpass.adapters.save_peft`` writes in the
PEFT layout.

NOTE: dropout on the adapter input (PEFT's lora_dropout) is not supported: an exported graph has no train and
eval modes, so a dropout node would also drop at inference. ``dropout`` must be 0; it is refused otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import GraphModule

from qpass.adapters import META_LORA
from qpass.analyses import LinearSites
from qpass.errors import RecipeError
from qpass.graph import META_ORIGIN, LinearSite, add_tensor, get_attr, insert_call, linear_sites, select, site_key
from qpass.pass_infra import Context, Pass, PassResult
from qpass.plan import Plan, PlanError, SiteIndex, occurrences
from qpass.quantizer import Quantizer

aten = torch.ops.aten


@dataclass(frozen=True)
class LoraConfig:
    name: ClassVar[str] = "lora"
    field_docs: ClassVar[dict] = {
        "rank": "rank r of each adapter (A is [r, in], B is [out, r])",
        "alpha": "scaling numerator: the branch is multiplied by alpha / rank",
        "dropout": "dropout on the adapter input; must be 0 (exported graphs have no train/eval mode)",
        "targets": "module-path globs of the linears that get an adapter (QLoRA: every linear)",
        "ignore": "module-path globs left without an adapter (a bare name matches as a suffix: lm_head)",
        "seed": "seed of A's initialisation",
    }

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ("lm_head",)
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.rank <= 1 << 16:
            raise RecipeError("rank", f"must be an integer in [1, 65536], got {self.rank}")
        if not 0 < self.alpha < float("inf"):
            raise RecipeError("alpha", f"must be a positive number, got {self.alpha}")
        if self.dropout != 0:
            raise RecipeError("dropout", "must be 0: an exported graph has no train/eval mode, so adapter dropout "
                              "would also drop at inference")
        if not self.targets:
            raise RecipeError("targets", "must list at least one module-path glob (e.g. ['*'])")
        if not 0 <= self.seed < 2**63:
            raise RecipeError("seed", f"must be in [0, 2**63), got {self.seed}")


@dataclass(frozen=True)
class Lora(Pass):
    """Add zero-initialised low-rank adapters beside the selected linears (function unchanged)."""

    config: LoraConfig = LoraConfig()
    name: ClassVar[str] = "lora"
    changes_weights: ClassVar[bool] = True

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        cfg = self.config
        sites = ctx.get(LinearSites(), gm)
        chosen = select([s.path for s in sites], cfg.targets, cfg.ignore, "lora")
        at = dict(zip((s.node for s in sites), occurrences(site_key(s) for s in sites)))
        done = set(gm.meta.get(META_LORA, {}))
        todo = [s for s in sites if s.path in chosen]
        near = [f"{s.path or s.node.name}: excluded by targets/ignore" for s in sites if s.path not in chosen]
        again = [site_key(s) for s in todo if site_key(s) in done]
        if again:
            raise RecipeError("lora.targets", f"{again[0]} already has an adapter from an earlier lora pass; use "
                              "targets/ignore so that each linear gets one adapter")
        g = torch.Generator().manual_seed(cfg.seed)
        adapters, values = [], {}
        for i, s in enumerate(todo):
            n_out, n_in = _out_in(gm, s)
            a = torch.empty(cfg.rank, n_in)
            _kaiming_uniform(a, g)
            values[i] = {"A": a, "B": torch.zeros(n_out, cfg.rank)}
            adapters.append({"path": site_key(s), "at": at[s.node], "rank": cfg.rank, "alpha": cfg.alpha,
                             "in": n_in, "out": n_out})
        plan = Plan(self.name, decisions={"adapters": adapters}, values=values)
        self.apply(gm, plan)
        stats = {"adapters": len(adapters), "rank": cfg.rank,
                 "adapter_params": sum(a["rank"] * (a["in"] + a["out"]) for a in adapters)}
        return PassResult(modified=bool(adapters), stats=stats, near_misses=near, plan=plan)

    @classmethod
    def apply(cls, gm: GraphModule, plan: Plan) -> None:
        """Insert the plan's adapters (A, B from the plan's values, else zeros of the recorded shapes)."""
        registry = dict(gm.meta.get(META_LORA, {}))
        for ad, site, a, b in planned_branches(gm, plan, "adapters", "an adapter"):
            registry[ad["path"]] = _insert(gm, site, a, b, ad["alpha"] / ad["rank"])
        gm.meta[META_LORA] = registry


@dataclass(frozen=True)
class LoraMergeConfig:
    name: ClassVar[str] = "lora_merge"
    field_docs: ClassVar[dict] = {
        "requantize": "recompute each merged weight's quantizer scales (min-max, its own spec and block) from the "
                      "merged weight; false keeps the trained scales",
    }

    requantize: bool = True


@dataclass(frozen=True)
class LoraMerge(Pass):
    """Fold every LoRA adapter into its base weight (W += alpha / r * B A) and remove the branch; a quantized
    weight is re-quantized per its quantizer's spec (new min-max scales), so the model lowers like any other."""

    config: LoraMergeConfig = LoraMergeConfig()
    name: ClassVar[str] = "lora_merge"

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        registry = dict(gm.meta.get(META_LORA, {}))
        sites = {site_key(s): s for s in linear_sites(gm)}
        merged, requantized = [], 0
        for path, (a, b, scaling) in registry.items():
            site = sites.get(path)
            if site is None:
                raise PlanError(f"adapter {path!r} has no linear in this graph", fix="report this as a qpass bug")
            with ctx.loaded([site.weight.target]):
                w = gm.get_parameter(site.weight.target)
                delta = scaling * (gm.get_parameter(b).detach() @ gm.get_parameter(a).detach())   # [out, in]
                with torch.no_grad():
                    w.add_(delta if site.in_axis == 1 else delta.t())
                q = Quantizer.of(site.weight_use)
                if self.config.requantize and q is not None and not q.dynamic and q.role == "weight":
                    _requantize(gm, site, q)
                    requantized += 1
            merged.append(path)
        plan = Plan(self.name, decisions={"merged": merged})
        self.apply(gm, plan)
        return PassResult(modified=bool(merged), stats={"merged": len(merged), "requantized": requantized},
                          plan=plan)

    @classmethod
    def apply(cls, gm: GraphModule, plan: Plan) -> None:
        """Remove the branches of the merged adapters (the merged weights and scales are parameter values)."""
        registry = dict(gm.meta.get(META_LORA, {}))
        for path in plan.decisions.get("merged", []):
            if path not in registry:
                raise PlanError(f"the plan merges adapter {path!r}, which this graph does not have",
                                fix="apply the lora pass's plan first")
            _remove(gm, *registry.pop(path)[:2])
        gm.meta[META_LORA] = registry


def _requantize(gm: GraphModule, site: LinearSite, q: Quantizer) -> None:
    from qpass.primitives import choose_qparams

    flip = q.x is not site.weight          # the quantizer reads W transposed (mm family)
    w = gm.get_parameter(site.weight.target).detach()
    spec = q.meta.spec if q.meta is not None else None
    if spec is None:
        return
    scale, zp = choose_qparams(w.t() if flip else w, spec, block_size=q.block)
    with torch.no_grad():
        _attr_tensor(gm, q.scale.target).copy_(scale)
        if q.zero_point is not None and zp is not None:
            _attr_tensor(gm, q.zero_point.target).copy_(zp)


def _attr_tensor(gm: GraphModule, target: str) -> torch.Tensor:
    return gm.get_parameter(target) if target in dict(gm.named_parameters()) else gm.get_buffer(target)


def _remove(gm: GraphModule, a_name: str, b_name: str) -> None:
    """Take out the branch reading A and B: add(y, mul(linear(linear(x, A), B), s)) -> y; delete A and B."""
    a_nodes = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == a_name]
    for a_node in a_nodes:
        h = next(iter(a_node.users))
        o = next(iter(h.users))
        s = next(iter(o.users))
        out = next(iter(s.users))
        y = out.args[0]
        out.replace_all_uses_with(y)
        b_node = o.args[1]
        for n in (out, s, o, h, b_node, a_node):
            gm.graph.erase_node(n)
    for name in (a_name, b_name):
        if name in gm._parameters:
            del gm._parameters[name]


def _insert(gm: GraphModule, site: LinearSite, a: torch.Tensor, b: torch.Tensor, scaling: float):
    a_name, b_name = insert_low_rank(gm, site, a, b, scaling=scaling, names=("lora_A", "lora_B"), origin="lora",
                                     trainable=True)
    return a_name, b_name, scaling


def planned_branches(gm: GraphModule, plan: Plan, key: str, what: str, names: tuple[str, str] = ("A", "B")):
    """For each low-rank branch a plan records under ``decisions[key]`` ({path, at, rank, in, out}): the record, its
    linear site and its A [rank, in] and B [out, rank] (the plan's values under `names`, else zeros of those
    shapes). A linear the graph lacks is a PlanError naming `what` the plan adds."""
    sites = linear_sites(gm)
    index = SiteIndex(sites)
    for i, rec in enumerate(plan.decisions.get(key, [])):
        site = index.get(rec["path"], rec["at"])
        if site is None:
            raise PlanError(f"the plan adds {what} to linear {rec['path']!r} (occurrence {rec['at']}), which this "
                            "graph does not have", fix="apply plans to a capture of the model they were made on")
        given = plan.values.get(i, {})
        yield (rec, site, given.get(names[0], torch.zeros(rec["rank"], rec["in"])),
               given.get(names[1], torch.zeros(rec["out"], rec["rank"])))


def insert_low_rank(gm: GraphModule, site: LinearSite, a: torch.Tensor, b: torch.Tensor, *, scaling: float | None,
                    names: tuple[str, str], origin: str, trainable: bool) -> tuple[str, str]:
    """y = linear(x, W) -> y + scaling * linear(linear(x, A), B) beside `site` (no mul when `scaling` is None),
    x the linear's float input (what an input quantizer feeding it reads); A and B registered as
    ``<module path>.<names>`` (parameters when `trainable`, else buffers); the new nodes carry META_ORIGIN
    `origin`. Returns the names of A and B."""
    y = site.node
    x = site.input
    q = Quantizer.of(x)
    if q is not None and q.role == "input":           # the float input the quantizer reads
        x = q.x
    stem = (site.path or y.name)
    a_name = add_tensor(gm, f"{stem}.{names[0]}", a.clone(), trainable=trainable)
    b_name = add_tensor(gm, f"{stem}.{names[1]}", b.clone(), trainable=trainable)
    after = y.next
    a_node, b_node = get_attr(gm, after, a_name), get_attr(gm, after, b_name)
    h = insert_call(gm, after, aten.linear.default, (x, a_node), origin)
    o = insert_call(gm, after, aten.linear.default, (h, b_node), origin)
    s = insert_call(gm, after, aten.mul.Tensor, (o, scaling), origin) if scaling is not None else o
    out = insert_call(gm, after, aten.add.Tensor, (y, s), origin, val_like=y)
    y.replace_all_uses_with(out, delete_user_cb=lambda u: u is not out)
    for n, like in ((h, None), (o, y), (s, y)):
        if like is not None and "val" in like.meta:
            n.meta["val"] = like.meta["val"]
    return a_name, b_name


def _out_in(gm: GraphModule, s: LinearSite) -> tuple[int, int]:
    w = getattr(gm, s.weight.target) if hasattr(gm, s.weight.target) else gm.get_parameter(s.weight.target)
    n0, n1 = w.shape
    return (n1, n0) if s.in_axis == 0 else (n0, n1)


def _kaiming_uniform(t: torch.Tensor, g: torch.Generator) -> None:
    """torch.nn.init.kaiming_uniform_(t, a=sqrt(5)) (PEFT's init of lora_A), with an explicit generator."""
    fan_in = t.shape[1]
    gain = math.sqrt(2.0 / (1 + 5))
    bound = math.sqrt(3.0) * gain / math.sqrt(fan_in)
    with torch.no_grad():
        t.uniform_(-bound, bound, generator=g)



def adapter_parameters(gm: GraphModule) -> list[torch.nn.Parameter]:
    """The LoRA parameters of `gm` (A and B of every adapter), in insertion order."""
    return [gm.get_parameter(n) for a, b, _ in gm.meta.get(META_LORA, {}).values() for n in (a, b)]


__all__ = ["Lora", "LoraConfig", "LoraMerge", "LoraMergeConfig", "adapter_parameters", "insert_low_rank",
           "planned_branches", "META_LORA", "META_ORIGIN"]
