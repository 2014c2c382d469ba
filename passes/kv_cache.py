"""Quantize the keys and values attention consumes (KV-cache quantization, LLM-QAT / KIVI style).

Matches   ``scaled_dot_product_attention(q, k, v)`` and eager attention ``softmax(q @ kᵀ ...) @ v``
          (``qpass.patterns.attention_sites``); K and V are walked back through repeat_kv
          (``patterns.REPEAT_KV``: unsqueeze/expand/reshape) to the kv-head tensor
          [batch, kv_heads, seq, head_dim]: after RoPE for K (``k_position: post_rope``, what a cache
          stores) or before it (``pre_rope``, LLM-QAT's k_proj output). In a static-cache decode graph
          (``qpass.capture_decode``) the kv-head tensor is the cache buffer, so the quantizer goes on the
          tensor written into it (``index_copy_(cache, 2, pos, k)``): a backend can store it low-bit.
Changes   k -> qpass.fake_quantize_dynamic(k, block, fmt, symmetric[, clip_ratio])  (scales per token / head / group)
            or qpass.fake_quantize(k, scale, zero_point, block, fmt)      (static, calibrated per head or
                                                                           per channel; KIVI keys)
          block on [batch, kv_heads, seq, head_dim]:
            per_token (1, -1, 1, -1)  one scale per token across heads (LLM-QAT)
            per_head  dynamic (1, 1, 1, -1) per token and head;  static (-1, 1, -1, -1) per head
            per_channel (axis -1) static (-1, 1, -1, 1);  dynamic (1, 1, -1, 1) over the sequence (KIVI;
                      not causal, so refused on decode graphs)
            per_group (1, 1, 1, g) per token and head, groups of g channels (g >= head_dim: one group per
                      head, block (1, 1, 1, -1); otherwise head_dim must be a multiple of g);
            per_tensor (-1, -1, -1, -1)
          symmetric: false gives each block a zero point: the range [c * min(min, 0), c * max(max, 0)], c the
          clip_ratio (QuaRot's KV quantizer: asymmetric, groups of 128 along head_dim, c = 0.95)
Requires  calibration data for static scales (one run for all of them)
Preserves nothing (adds nodes and buffers). Differentiable: straight-through gradients for QAT.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch.fx import GraphModule, Node

from qpass import patterns as P
from qpass.analyses import AttentionSites
from qpass.errors import QuantizationError, RecipeError
from qpass.graph import (
    is_quantizer,
    linear_sites,
    module_path,
    select,
)
from qpass.pass_infra import Context, Pass, PassResult
from qpass.plan import Plan, PlanError, build, occurrences
from qpass.quantizer import QuantMeta, insert_quantizer
from qpass.recipe import QSPEC_KEYS
from qpass.primitives import quant as Q
from qpass.primitives.spec import Granularity, IntFormat, PerChannel, PerGroup, PerHead, PerTensor, PerToken, QSpec

aten = torch.ops.aten

_MOVES = P.LAYOUT | P.CASTS        # K on its way from k_proj to RoPE: values moved or cast, never mixed
_CACHE_WRITES = {aten.index_copy_.default, aten.index_copy.default}


def kv_block(g: Granularity, dynamic: bool, head_dim: int | None = None) -> tuple[int, int, int, int]:
    """Block size of a K/V quantizer on [batch, kv_heads, seq, head_dim] (see the module docstring); with
    `head_dim` known, a group as wide as the head or wider is the head (QuaRot's groups of 128 on narrower heads)."""
    if isinstance(g, PerTensor):
        return (-1, -1, -1, -1)
    if isinstance(g, PerToken):
        return (1, -1, 1, -1)
    if isinstance(g, PerHead):
        return (1, 1, 1, -1) if g.per_token else (1, 1, -1, -1) if dynamic else (-1, 1, -1, -1)
    if isinstance(g, PerChannel):
        return (1, 1, -1, 1) if dynamic else (-1, 1, -1, 1)
    if head_dim is not None and g.group_size >= head_dim:
        return (1, 1, 1, -1)
    return (1, 1, 1, g.group_size)


def _check_spec(spec: QSpec | None, field: str) -> None:
    if spec is None:
        return
    g = spec.granularity
    if isinstance(g, (PerChannel, PerGroup)) and g.axis not in (-1, 3):
        raise RecipeError(f"{field}.axis", "K/V channels are the last axis (head_dim): use axis: -1")
    per_token = isinstance(g, (PerToken, PerGroup)) or (isinstance(g, PerHead) and g.per_token)
    if per_token and not spec.dynamic:
        raise RecipeError(f"{field}.dynamic", "per-token scales are computed at run time; set dynamic: true")


@dataclass(frozen=True)
class KvCacheConfig:
    name: ClassVar[str] = "kv_cache"
    field_docs: ClassVar[dict] = {
        "keys": "K quantizer (null: keep K in float): per_token (dynamic), per_head (dynamic: per token and "
                "head; static: per head), per_channel with axis -1 (static: KIVI keys), per_group (dynamic: per "
                "token and head in groups of group_size channels; group_size >= head_dim: one group per head), "
                "per_tensor; symmetric: false adds a zero point per block (QuaRot: per_group 128, clip_ratio 0.95)",
        "values": "V quantizer (null: keep V in float); same granularities as keys",
        "k_position": "quantize K after RoPE (what a cache stores) or before it (LLM-QAT: the k_proj output)",
        "targets": "module-path globs of the attention modules to quantize (e.g. model.layers.*.self_attn)",
        "ignore": "module-path globs of attention modules to leave in float",
    }

    keys: QSpec | None = QSpec(IntFormat(8), PerToken(), dynamic=True)
    values: QSpec | None = QSpec(IntFormat(8), PerToken(), dynamic=True)
    k_position: Literal["post_rope", "pre_rope"] = "post_rope"
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()

    @staticmethod
    def expand_shorthand(data: dict, path: str) -> dict:
        """``kv_cache: {bits: 4, granularity: per_token}`` (one spec for K and V, as LLM-QAT writes it) ->
        ``keys`` and ``values`` both set to it; per-token scales are dynamic unless `dynamic` says otherwise."""
        spec = {k: data.pop(k) for k in QSPEC_KEYS if k in data}
        if not spec:
            return data
        both = [k for k in ("keys", "values") if k in data]
        if both:
            raise RecipeError(f"{path}.{both[0]}", f"give either one spec for K and V ({', '.join(spec)} at the "
                              "top level) or keys/values, not both")
        if spec.get("granularity") == "per_token":
            spec.setdefault("dynamic", True)
        return {**data, "keys": spec, "values": dict(spec)}

    def __post_init__(self):
        if self.keys is None and self.values is None:
            raise RecipeError("keys", "nothing to quantize: set keys or values (or drop this pass)")
        _check_spec(self.keys, "keys")
        _check_spec(self.values, "values")
        if self.k_position not in ("post_rope", "pre_rope"):
            raise RecipeError("k_position", f"must be post_rope or pre_rope, got {self.k_position!r}")
        if not self.targets:
            raise RecipeError("targets", "must list at least one module-path glob (e.g. ['*'])")


@dataclass(frozen=True)
class _Point:
    """Where one K or V quantizer goes: `src` is quantized for `user` (None: for every use of src)."""

    attn: Node
    role: str                      # "key" | "value"
    src: Node
    user: Node | None              # the cache write whose source is src, or None
    position: str                  # "attention_input" | "pre_rope" | "cache_write"
    path: str


@dataclass(frozen=True)
class KvCache(Pass):
    """Fake-quantize K and V where attention consumes them (or where a static cache is written)."""

    config: KvCacheConfig = KvCacheConfig()
    name: ClassVar[str] = "kv_cache"

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        cfg = self.config
        sites = ctx.get(AttentionSites(), gm)
        chosen = select([module_path(gm, s.node) for s in sites], cfg.targets, cfg.ignore, "kv_cache")
        points, near = [], []
        for attn, k, v in ((s.node, s.key, s.value) for s in sites):
            path = module_path(gm, attn)
            if path not in chosen:
                near.append(f"{path or attn.name}: excluded by targets/ignore")
                continue
            for role, spec, t in (("key", cfg.keys, k), ("value", cfg.values, v)):
                if spec is None:
                    continue
                found = _find_point(gm, attn, role, t, role == "key" and cfg.k_position == "pre_rope")
                if isinstance(found, str):
                    near.append(f"{path}: {found}")
                elif any(q.src is found.src and q.user is found.user for q in points):
                    near.append(f"{path}: {role} {found.src.name} is shared with another attention; quantized once")
                else:
                    points.append(found)
        specs = {"key": cfg.keys, "value": cfg.values}
        _refuse_sequence_scales_at_cache_writes(gm, points, specs)
        _refuse_partial_groups(points, specs)
        qparams = self._static_qparams(gm, ctx, points, specs)
        keys = [module_path(gm, s.node) or s.node.name for s in sites]
        at = dict(zip((s.node for s in sites), occurrences(keys)))
        items = []
        for p in points:
            spec = specs[p.role]
            scale, zp = (None, None) if spec.dynamic else qparams[p]
            block = kv_block(spec.granularity, spec.dynamic, _head_dim(p.src))
            items.append((QuantMeta(p.role, "", p.path or p.attn.name, spec, block_size=block, position=p.position),
                          block, {"scale": scale, "zero_point": zp}, at[p.attn]))
        plan = build(self.name, items, decisions={"k_position": cfg.k_position})
        self.apply(gm, plan)
        stats = {"attention_sites": len(sites), "keys_quantized": sum(p.role == "key" for p in points),
                 "values_quantized": sum(p.role == "value" for p in points),
                 "cache_writes": sum(p.position == "cache_write" for p in points)}
        return PassResult(modified=bool(points), stats=stats, near_misses=near, plan=plan)

    @classmethod
    def apply(cls, gm: GraphModule, plan: Plan) -> None:
        """Quantize K / V of the attentions the plan names (module path and occurrence), found again in this
        graph: where attention consumes them, or where a static cache is written (decode graphs)."""
        sites = P.attention_sites(gm)
        keys = [module_path(gm, s.node) or s.node.name for s in sites]
        by_key = {(k, at): s for s, k, at in zip(sites, keys, occurrences(keys))}
        pre_rope = plan.decisions.get("k_position") == "pre_rope"
        points = []
        for qp in plan.quantizers:
            site = by_key.get((qp.meta.path, qp.at))
            if site is None:
                raise PlanError(f"the plan quantizes the {qp.meta.role}s of attention {qp.meta.path!r} (occurrence "
                                f"{qp.at}), which this graph does not have ({len(sites)} attention sites)",
                                fix="apply plans to a capture of the model they were made on")
            t = site.key if qp.meta.role == "key" else site.value
            found = _find_point(gm, site.node, qp.meta.role, t, qp.meta.role == "key" and pre_rope)
            if isinstance(found, str):
                raise PlanError(f"the plan quantizes the {qp.meta.role}s of {qp.meta.path!r}, but in this graph "
                                f"{found}", fix="report this as a qpass bug")
            points.append(found)
        _refuse_sequence_scales_at_cache_writes(gm, points, {qp.meta.role: qp.meta.spec for qp in plan.quantizers})
        for p, qp, t in zip(points, plan.quantizers, plan.tensors()):
            before = p.user if p.user is not None else p.src.next
            node_meta = {k: p.src.meta[k] for k in ("nn_module_stack", "stack_trace") if k in p.src.meta}
            meta = dataclasses.replace(qp.meta, site=p.attn.name, path=p.path, position=p.position)
            fq = insert_quantizer(gm, before, p.src, meta, block=list(qp.block), scale=t.get("scale"),
                                  zero_point=t.get("zero_point"), name=f"{p.path or p.attn.name}.{p.role[0]}_scale",
                                  origin="kv_cache", **node_meta).node
            if p.user is not None:
                p.user.replace_input_with(p.src, fq)
            else:
                p.src.replace_all_uses_with(fq, delete_user_cb=lambda u, fq=fq: u is not fq)

    def _static_qparams(self, gm: GraphModule, ctx: Context, points: list[_Point], specs: dict) -> dict:
        static = [p for p in points if not specs[p.role].dynamic]
        if not static:
            return {}
        obs = ctx.observe(gm, {p: p.src for p in static}, lambda p, n: BlockMinMax(specs[p.role]),
                          who="kv_cache with static (per_head / per_channel) scales", desc="kv_cache: observing K/V")
        return {p: o.qparams() for p, o in obs.items()}


class BlockMinMax:
    """Running min/max per block of a [batch, kv_heads, seq, head_dim] tensor (static K/V scales)."""

    def __init__(self, spec: QSpec):
        self.spec, self.block = spec, kv_block(spec.granularity, False)
        self.mn = self.mx = None

    def update(self, x: torch.Tensor) -> None:
        mn, mx = Q.block_minmax(x.float(), self.block)
        self.mn = mn if self.mn is None else torch.minimum(self.mn, mn)
        self.mx = mx if self.mx is None else torch.maximum(self.mx, mx)

    def qparams(self):
        return Q.qparams_from_minmax(self.mn, self.mx, self.spec)


def _refuse_sequence_scales_at_cache_writes(gm: GraphModule, points: list[_Point], specs: dict) -> None:
    for p in points:
        spec = specs[p.role]
        if p.position == "cache_write" and spec.dynamic and kv_block(spec.granularity, True)[2] == -1:
            raise QuantizationError(
                f"{p.role}s of {p.path} are written to a static cache a few tokens at a time, so dynamic "
                f"{type(spec.granularity).__name__} scales over the sequence cannot be computed there",
                fix=f"use static (calibrated) scales for {p.role}s (dynamic: false), or per_token / per_head "
                    "dynamic scales")


def _refuse_partial_groups(points: list[_Point], specs: dict) -> None:
    for p in points:
        g, d = specs[p.role].granularity, _head_dim(p.src)
        if isinstance(g, PerGroup) and d is not None and g.group_size < d and d % g.group_size:
            fits = [n for n in range(d // 2, 0, -1) if d % n == 0][:2]
            raise QuantizationError(
                f"{p.role}s of {p.path or p.attn.name} have head_dim {d}, which is not a multiple of group_size "
                f"{g.group_size}: a group would straddle two heads' channels or be cut short",
                fix=f"use a group_size that divides {d} (e.g. {' or '.join(map(str, fits))}), or one of {d} or more "
                    "for one group per head (QuaRot's 128 on heads up to 128 wide)")


def _head_dim(n: Node) -> int | None:
    v = n.meta.get("val")
    d = v.shape[-1] if isinstance(v, torch.Tensor) and v.dim() == 4 else None
    return d if isinstance(d, int) else None


# ------------------------------------------------------------------------------------- finding K and V


def _find_point(gm: GraphModule, attn: Node, role: str, t: Node, pre_rope: bool) -> _Point | str:
    """The kv-head tensor feeding attention (through repeat_kv), or a cache write's source."""
    path = module_path(gm, attn)
    while isinstance(t, Node) and t.op == "call_function" and t.target in P.REPEAT_KV and _rank(t.args[0]) >= 4:
        t = t.args[0]
    if not isinstance(t, Node):
        return f"{role} is not a tensor node"
    if is_quantizer(t) or (t.target in _CACHE_WRITES and is_quantizer(t.args[3])):
        raise QuantizationError(f"{role}s of {path or attn.name} are already quantized by an earlier pass",
                                fix="keep one kv_cache pass per recipe, or use targets/ignore to split them")
    where = "attention_input"
    if t.op == "call_function" and t.target in _CACHE_WRITES:
        write, t, where = t, t.args[3], "cache_write"
    elif t.op != "call_function":
        return f"{role} comes from {t.op} {t.target}, not from a computed tensor or a cache write"
    else:
        write = None
    if _rank(t) != 4:
        return f"{role} tensor {t.name} has rank {_rank(t)}, expected [batch, kv_heads, seq, head_dim]"
    if pre_rope:
        pre = _pre_rope(gm, t)
        if isinstance(pre, str):
            return pre
        if pre is not t:
            return _Point(attn, role, pre, None, "pre_rope", path)
    return _Point(attn, role, t, write, where, path)


def _pre_rope(gm: GraphModule, post: Node) -> Node | str:
    """K before RoPE: from the linear that produces K, follow layout ops while they form a single chain
    towards `post`; stop where the chain fans out into the rotation (or reaches `post`: no RoPE)."""
    if post.target in _MOVES:
        return post
    sources = {s.node for s in linear_sites(gm)}
    anc, stack, found = {post}, [post], set()
    while stack:
        for a in stack.pop().all_input_nodes:
            if a in anc:
                continue
            anc.add(a)
            if a in sources:
                found.add(a)
            elif a.op == "call_function":
                stack.append(a)
    if len(found) != 1:
        return f"cannot find the K projection before RoPE of {post.name} ({len(found)} linears feed it)"
    n = found.pop()
    while n is not post:
        inside = [u for u in n.users if u in anc]
        if len(inside) != 1 or inside[0].target not in _MOVES:
            break
        n = inside[0]
    if _rank(n) != 4 or list(n.meta["val"].shape) != list(post.meta["val"].shape):
        return (f"K before RoPE ({n.name}, shape {tuple(n.meta['val'].shape)}) is not laid out like the "
                f"attention input {tuple(post.meta['val'].shape)} [batch, kv_heads, seq, head_dim]; use "
                "k_position: post_rope")
    return n


def _rank(n) -> int:
    v = n.meta.get("val") if isinstance(n, Node) else None
    return v.dim() if isinstance(v, torch.Tensor) else -1


__all__ = ["KvCache", "KvCacheConfig", "kv_block"]
