"""Rewrite a fake-quantized graph into packed modules (the graph is modified in place).

Matches   QuantLinear (patterns.py): W -> [t] -> weight fq -> [t] -> linear/addmm/mm/matmul(x_fq?, ·)
Changes   the pattern -> ``call_module PackedLinear(x)`` (one node; the input quantizer moves inside);
          the float weight, its scale/zero-point buffers and the quantizer nodes are removed, so the
          lowered model holds only codes + scales. The module replaces the weight's own container
          (``model.model.layers.0.self_attn.q_proj``) when nothing else lives there, so state-dict names
          read like the model's (``...q_proj.qweight``).
          KvWrite (decode graphs): ``index_copy_(cache, 2, pos, kv_fq(k))`` -> ``call_module
          PackedKVCache(k, pos)``; the float cache buffer is removed.
simplify  (after lowering) export's ``_assert_tensor_metadata`` nodes and casts to the dtype a tensor
          already has are removed, and attention over repeated K/V heads (qpass.patterns.repeated_kv) takes
          the grouped heads directly (``enable_gqa``: same kernel, same result bit for bit, no copy of every cache per step).
          The rotate pass's online Hadamards (``qpass.hadamard``) call the mixed-radix fast Walsh-Hadamard
          transform (``qpass.primitives.hadamard.hadamard_transform``) directly, without custom-op dispatch.
          A decode step of a small model is mostly per-op overhead: on the bundled model (1 thread) the
          checks and casts took ~7% of a W4 decode step, the K/V repeats ~40 us per attention call, and
          removing both made it ~20% faster (7.2 -> 5.7 ms per token).
          A weight quantizer with a registered format PackedLinear does not pack (a learned codebook) or
          side channels becomes ``ExtLinear`` (ext.py: codes + tables + side channels, dequantize + matmul);
          a learned codebook (``formats.Codebook``, per channel or per group, optionally with sparse values)
          becomes ``CodebookLinear`` (codebook.py: b-bit packed codes + tables, decoded by a table lookup).
Refuses   any other quantizer that is not a K/V quantizer, and any part patterns.SUPPORTS does not declare:
          UnsupportedOpError (node, module, the unsupported part, fix).

Why modules rather than ``torch.library`` ops: which kernel runs depends on the number of rows at run
time (a plan measured per machine), and the int4 weights sit in a CPU-specific layout that must be
converted to a portable one on save and back on load. A module holds both naturally (state-dict hooks
and a `plan` attribute); an op would need the plan serialized into its arguments and a global registry for
the layout conversion. The lowered graph still has one node per linear.
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from torch.fx import GraphModule, Node

from qpass.errors import UnsupportedOpError
from qpass.graph import META_ORIGIN, describe
from qpass.patterns import attend_grouped, repeated_kv
from qpass.primitives import hadamard as HD
from qpass.primitives import quant as Q
from qpass.primitives.formats import Codebook
from qpass.primitives.spec import BUILTIN_KINDS
from qpass.quantizer import Quantizer, quantizers, refuse

from .codebook import CodebookLinear
from .embedding import PackedEmbedding
from .ext import ExtLinear
from .experts import lower_expert_weights
from .kv import PackedKVCache
from .linear import ActFormat, PackedLinear, WeightFormat, _normalize_block, choose_layout
from .patterns import KV_ROLES, QuantLinear, check_supported, kv_writes, quant_linears, unsupported_quantizers

aten = torch.ops.aten
log = logging.getLogger("qpass.backends.torch_packed")
ORIGIN = "torch_packed"


def _attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _parent(gm: nn.Module, target: str) -> tuple[nn.Module, str]:
    parent, _, name = target.rpartition(".")
    return (gm.get_submodule(parent) if parent else gm), name


def _delete_attr(gm: nn.Module, target: str) -> None:
    mod, name = _parent(gm, target)
    for store in (mod._parameters, mod._buffers, mod._modules):
        if name in store:
            del store[name]
            return
    if hasattr(mod, name):
        delattr(mod, name)


def _tensor(gm: GraphModule, node: Node | None, where: str) -> torch.Tensor | None:
    if node is None:
        return None
    if not isinstance(node, Node) or node.op != "get_attr":
        raise UnsupportedOpError(f"{where} is computed in the graph ({node}), not a stored tensor",
                                 fix="quantize with scales stored as buffers or parameters (quantize / qat passes)")
    return _attr(gm, node.target).detach()


def _act_format(gm: GraphModule, fq: Node) -> tuple[ActFormat, torch.Tensor | None, torch.Tensor | None]:
    q = Quantizer(fq)
    t = q.side_channels.threshold_columns
    if t is not None and t.axis not in (-1, len(q.block) - 1):
        raise refuse(gm, q, "torch_packed", f"threshold columns along axis {t.axis} (the input features, the "
                     "last axis, only)", fix="keep the float features along the last axis (llm_int8 does)")
    if q.dynamic:
        return ActFormat(q.fmt_name, q.block, q.symmetric, True, q.clip_ratio,
                         None if t is None else t.threshold), None, None
    scale, zp = _tensor(gm, q.scale, "the input scale"), _tensor(gm, q.zero_point, "the input zero point")
    return ActFormat(q.fmt_name, q.block, zp is None, False), scale, zp


def _weight_qparams(gm: GraphModule, m: QuantLinear, w: torch.Tensor):
    """(scale, zero_point, block, fmt) of the weight quantizer, laid out like `w` as the quantizer sees it."""
    q = Quantizer(m.weight_fq)
    block, fmt = list(q.block), q.fmt_name
    if q.dynamic:   # weights are constant: the dynamic scales are fixed
        scale, zp = Q.dynamic_qparams(w, block, fmt, q.symmetric)
        return scale, (zp.round().to(torch.int32) if zp is not None else None), block, fmt
    return _tensor(gm, q.scale, "the weight scale"), _tensor(gm, q.zero_point, "the weight zero point"), block, fmt


def _apply_transposes(w: torch.Tensor, nodes) -> torch.Tensor:
    for n in nodes:
        w = w.permute(*n.args[1]) if n.target is aten.permute.default else \
            w.transpose(*n.args[1:3]) if n.target is aten.transpose.int else w.t()
    return w


def build_linear(gm: GraphModule, m: QuantLinear, name: str, *, empty: bool) -> PackedLinear:
    """The PackedLinear of one pattern (empty: structure only, for a saved model whose tensors are loaded
    afterwards)."""
    site = m.site
    if site.node.target is aten.addmm.default and (site.node.kwargs.get("beta", 1) != 1
                                                   or site.node.kwargs.get("alpha", 1) != 1):
        raise UnsupportedOpError("addmm with beta/alpha != 1", describe(gm, site.node),
                                 fix="report the model; qpass lowers plain linear/addmm/mm/matmul")
    act, a_scale, a_zero = _act_format(gm, m.input_fq) if m.input_fq is not None else (None, None, None)
    bias = _tensor(gm, site.bias, "the bias")
    w = _apply_transposes(_attr(gm, site.weight.target).detach(), m.pre_fq)
    if _codebook(m):
        return _codebook_linear(gm, m, w, name, bias=bias, act=act, act_scale=a_scale, act_zero=a_zero)
    if _generic(m):
        return _ext_linear(gm, m, w, name, bias=bias, act=act, act_scale=a_scale, act_zero=a_zero)
    scale, zp, block, fmt = _weight_qparams(gm, m, w)
    if m.fq_in_axis == 0:              # the quantizer sees [in, out]: canonical is [out, in]
        w, scale, block = w.t(), scale.t(), block[::-1]
        zp = zp.t() if zp is not None else None
    n, k = w.shape
    if empty:
        bn, bk = _normalize_block(block, n, k)
        wf = WeightFormat(fmt, zp is None, n, k, bn, bk, choose_layout(fmt, n, k, bn, bk))
        mod = PackedLinear(wf, act, has_bias=bias is not None, act_zero=a_zero is not None, name=name,
                           act_qparam_shapes=tuple(a_scale.shape) if a_scale is not None else None)
    else:
        mod = PackedLinear.from_weight(w, scale, zp, block, fmt, bias=bias, act=act, act_scale=a_scale,
                                       act_zero=a_zero, name=name)
    val = m.x.meta.get("val")
    mod.in_rank = val.dim() if isinstance(val, torch.Tensor) else 2
    return mod


def _generic(m: QuantLinear) -> bool:
    """A weight quantizer with a registered (non-packed) format, a table or side channels: ExtLinear's route."""
    q = Quantizer(m.weight_fq)
    qi = Quantizer(m.input_fq) if m.input_fq is not None else None
    side_in = qi is not None and (set(qi.side_channels.names) - {"threshold_columns"}   # static LLM.int8(), olive
                                  or qi.fmt.kind not in BUILTIN_KINDS)
    return q.codebook is not None or bool(q.side_channels) or q.fmt.kind not in BUILTIN_KINDS or side_in


def _codebook(m: QuantLinear) -> bool:
    """A learned codebook (formats.Codebook) with static scales, no zero point and at most sparse values as side
    channel: CodebookLinear's route (packed b-bit codes + tables, codebook.py). Anything else generic: ExtLinear."""
    q = Quantizer(m.weight_fq)
    side_in = m.input_fq is not None and bool(Quantizer(m.input_fq).side_channels)
    return (isinstance(q.fmt, Codebook) and q.codebook is not None and not q.dynamic and q.zero_point is None
            and set(q.side_channels.names) <= {"outliers"} and len(q.block) == 2 and not side_in)


def _codebook_linear(gm: GraphModule, m: QuantLinear, w: torch.Tensor, name: str, **kw) -> CodebookLinear:
    q = Quantizer(m.weight_fq)
    o = q.side_channels.outliers
    return CodebookLinear.from_weight(
        w, scale=_tensor(gm, q.scale, "the weight scale"), block=list(q.block), fmt=q.fmt_name,
        codebook=_tensor(gm, q.codebook, "the codebook"), in_axis=m.fq_in_axis, name=name,
        outliers=(_tensor(gm, o.index, "the outlier index"), _tensor(gm, o.value, "the outlier values")) if o else None,
        **kw)


def _ext_linear(gm: GraphModule, m: QuantLinear, w: torch.Tensor, name: str, **kw) -> ExtLinear:
    """The generic dequantize-then-matmul module of a quantizer `_generic` accepts (its tensors as the graph
    holds them: a loaded model gets the placeholders' shapes, loaded afterwards)."""
    q = Quantizer(m.weight_fq)
    side = q.side_channels
    t = lambda n, what: _tensor(gm, n, what)   # noqa: E731
    o, c, sq = side.outliers, side.float_columns, side.scale_q
    ic = Quantizer(m.input_fq).side_channels.float_columns if m.input_fq is not None else None
    return ExtLinear.from_weight(
        w, scale=t(q.scale, "the weight scale"), zero_point=t(q.zero_point, "the weight zero point"),
        block=list(q.block), fmt=q.fmt_name, codebook=t(q.codebook, "the codebook"),
        outliers=(t(o.index, "the outlier index"), t(o.value, "the outlier values")) if o else None,
        float_columns=(t(c.index, "the float columns"), c.axis) if c else None,
        scale_q=(t(sq.scale, "the second-level scale"), sq.block, sq.fmt,
                 t(sq.zero_point, "the second-level zero point")) if sq else None,
        act_float_columns=(t(ic.index, "the input float columns"), ic.axis) if ic else None,
        transpose=m.fq_in_axis == 0, name=name, **kw)


def _placement(gm: GraphModule, m: QuantLinear, taken: set[str]) -> tuple[str, bool]:
    """Where the module goes: the weight's container when only this site's weight and bias live there."""
    container, _, _ = m.site.weight.target.rpartition(".")
    mine = {m.site.weight.target} | ({m.site.bias.target} if m.site.bias is not None else set())
    try:
        mod = gm.get_submodule(container) if container else None
    except AttributeError:
        mod = None
    if mod is not None and container not in taken and not mod._modules and type(mod) not in (PackedLinear, ExtLinear):
        local = {f"{container}.{k}" for k in (*mod._parameters, *mod._buffers)}
        others = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith(container + ".")
                  and n is not m.site.weight and n is not m.site.bias]
        shared_weight = any(u not in m.chain for u in m.site.weight.users)   # e.g. tied with an embedding
        if local <= mine and not others and not shared_weight:
            return container, True
    base = "qpass_packed." + (m.site.path or m.site.node.name).replace(".", "_")
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name, False


def lower_linears(gm: GraphModule, *, shared: dict[str, PackedLinear] | None = None,
                  empty: bool = False) -> dict[str, PackedLinear]:
    """Replace every QuantLinear with a PackedLinear. `shared`: modules to reuse by name (decode graphs
    share the packed weights of the main graph). Returns {module name: PackedLinear} (ExtLinear modules,
    the generic route, are in the graph but not in the dict: they have no kernel plan)."""
    lower_expert_weights(gm, empty=empty)     # stacked MoE expert weights: codes + scales (experts.py)
    patterns = [p for p in quant_linears(gm) if p.weight_fq is not None]
    handled = {p.weight_fq for p in patterns} | {p.input_fq for p in patterns if p.input_fq is not None}
    unsupported_quantizers(gm, handled | {p.input_fq for p in quant_linears(gm) if p.input_fq is not None})
    for q in quantizers(gm):
        if q.node in handled:
            check_supported(gm, q.node)
    mods, taken, dropped, tables = {}, set(), set(), set()
    for m in patterns:
        name, replace_container = _placement(gm, m, taken)
        taken.add(name)
        if shared is not None and _generic(m) and name not in shared:   # not a PackedLinear: built again
            mod = build_linear(gm, m, name, empty=empty)
        elif shared is not None:
            if name not in shared:
                raise UnsupportedOpError(f"no packed weights named {name!r} for this graph's linear",
                                         describe(gm, m.site.node), fix="report this as a qpass bug")
            mod = shared[name]
        else:
            mod = build_linear(gm, m, name, empty=empty)
        if isinstance(mod, PackedLinear):   # an ExtLinear has no kernels to plan: in the graph only
            mods[name] = mod
        tables |= _tied_lookups(gm, m, name, mod)
        dropped |= _rewrite(gm, m, name, mod, replace_container)
    used = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    for target in sorted(dropped - used):    # float weights, weight scales: nothing reads them any more
        try:
            parent, _ = _parent(gm, target)
        except AttributeError:
            continue
        if not isinstance(parent, (PackedLinear, ExtLinear)):  # else it lived in the container the module replaced
            _delete_attr(gm, target)
    for ptr in tables:                       # a shared tied table: its float tensor, under every name, goes
        _drop_aliases(gm, ptr)
    gm.graph.lint()
    gm.recompile()
    return mods


def _tied_lookups(gm: GraphModule, m: QuantLinear, name: str, mod) -> set[int]:
    """Embedding lookups reading this linear's weight quantizer (quantize's ``tied_embedding: shared``) ->
    ``call_module PackedEmbedding(ids)`` on `mod`'s codes. Returns the storage of the float table (dropped
    afterwards: nothing reads it any more), or nothing when no lookup reads the quantizer."""
    lookups = [u for u in m.weight_fq.users if u.op == "call_function" and u.target is aten.embedding.default
               and u.args[0] is m.weight_fq]
    if not lookups:
        return set()
    if not isinstance(mod, PackedLinear) or m.pre_fq or m.fq_in_axis != 1:
        raise UnsupportedOpError(f"torch_packed gathers tied embedding rows from a packed int/fp8/fp4/nf4 weight read "
                                 f"as [vocab, hidden]; {name} is {type(mod).__name__} (quantizer on the weight "
                                 f"{'transposed' if m.fq_in_axis != 1 else 'as stored'})", describe(gm, lookups[0]),
                                 fix="quantize this linear without side channels or a learned table, or use "
                                     "tied_embedding: float")
    for i, e in enumerate(lookups):   # NOTE: padding_idx, scale_grad_by_freq and sparse change gradients only
        target = f"qpass_packed_embedding.{(m.site.path or m.site.node.name).replace('.', '_')}" + (f"_{i}" if i else "")
        val = e.meta.get("val")
        gm.add_submodule(target, PackedEmbedding(mod, name, val.dtype if isinstance(val, torch.Tensor) else torch.float32))
        with gm.graph.inserting_before(e):
            new = gm.graph.call_module(target, (e.args[1],))
        new.meta.update({k: e.meta[k] for k in ("val", "nn_module_stack", "stack_trace") if k in e.meta})
        new.meta[META_ORIGIN] = ORIGIN
        e.replace_all_uses_with(new)
        gm.graph.erase_node(e)
    ptr = _attr(gm, m.site.weight.target).untyped_storage().data_ptr()
    return {ptr} if ptr else set()                    # 0: a meta tensor, which stores nothing anyway


def _rewrite(gm: GraphModule, m: QuantLinear, name: str, mod: PackedLinear, replace_container: bool) -> set[str]:
    """Swap the pattern for the module call; return the targets of the get_attr nodes it erased."""
    site = m.site
    if replace_container:
        parent, attr = _parent(gm, name)
        setattr(parent, attr, mod)
    else:
        gm.add_submodule(name, mod)
    with gm.graph.inserting_before(site.node):
        new = gm.graph.call_module(name, (m.x,))
        out = gm.graph.call_function(aten.add.Tensor, (new, m.bias)) if m.bias is not None else new
    for node in {new, out}:
        node.meta.update({k: site.node.meta[k] for k in ("val", "nn_module_stack", "stack_trace") if k in site.node.meta})
        node.meta[META_ORIGIN] = ORIGIN
    site.node.replace_all_uses_with(out)
    fq_args = [n for fq in (m.weight_fq, m.input_fq) if fq is not None for n in _tensor_args(fq)]
    dead = [site.node, *reversed(m.chain), site.weight, m.input_fq, site.bias, *fq_args]
    erased = set()
    for n in dead:
        if isinstance(n, Node) and n.op != "placeholder" and not n.users and n.graph is gm.graph:
            if n.op == "get_attr":
                erased.add(n.target)
            gm.graph.erase_node(n)
    return erased


def _tensor_args(fq: Node) -> list[Node]:
    """The get_attr nodes a quantizer reads (scale, zero point, table, side channels), dropped with it."""
    q = Quantizer(fq)
    o, c, sq = q.side_channels.outliers, q.side_channels.float_columns, q.side_channels.scale_q
    parts = [q.scale, q.zero_point, q.codebook, o and o.index, o and o.value, c and c.index, sq and sq.scale]
    return [p for p in parts if isinstance(p, Node)]


def lower_kv_cache(gm: GraphModule) -> dict[str, PackedKVCache]:
    """Replace quantized K/V cache writes with low-bit caches (decode graphs). Returns {name: module}."""
    mods = {}
    for w in kv_writes(gm):
        cache = _attr(gm, w.cache.target)
        fq, q = w.fq, Quantizer(w.fq)
        check_supported(gm, fq)
        if q.dynamic:
            mod = PackedKVCache(cache.shape, q.fmt_name, list(q.block), q.symmetric, dtype=cache.dtype,
                                clip_ratio=q.clip_ratio)
        else:
            zp = _tensor(gm, q.zero_point, "the K/V zero point")
            mod = PackedKVCache(cache.shape, q.fmt_name, list(q.block), zp is None,
                                scale=_tensor(gm, q.scale, "the K/V scale"), zero_point=zp, dtype=cache.dtype)
        name = "qpass_kv." + f"{w.path or w.write.name}_{w.role}".replace(".", "_")
        mod.name = name
        gm.add_submodule(name, mod)
        with gm.graph.inserting_before(w.write):
            new = gm.graph.call_module(name, (q.x, w.write.args[2]))
        new.meta.update({k: w.write.meta[k] for k in ("val", "nn_module_stack", "stack_trace") if k in w.write.meta})
        new.meta[META_ORIGIN] = ORIGIN
        w.write.replace_all_uses_with(new)
        ptr = cache.untyped_storage().data_ptr()
        for n in (w.write, fq, w.cache, *_tensor_args(fq)):
            if isinstance(n, Node) and not n.users:
                gm.graph.erase_node(n)
        _drop_aliases(gm, ptr)
        mods[name] = mod
    kept = [q.node.name for q in quantizers(gm) if q.role in KV_ROLES]
    if kept:
        log.info("K/V quantizers %s are not at a cache write (e.g. keys quantized before RoPE): they stay "
                 "fake-quant and those caches stay float", kept)
    gm.graph.lint()
    gm.recompile()
    return mods


def _drop_aliases(gm: GraphModule, ptr: int) -> None:
    """Remove every attribute holding the float cache storage (the buffer and its lifted alias)."""
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and not n.users and _storage(gm, n.target) == ptr:
            gm.graph.erase_node(n)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    names = [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    names += [n for n, _ in gm.named_parameters(remove_duplicate=False)]      # a tied table (tied_embedding: shared)
    names += [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    for mod_name, mod in gm.named_modules():
        names += [f"{mod_name}.{k}" if mod_name else k for k, v in vars(mod).items() if isinstance(v, torch.Tensor)]
    for name in set(names):
        if name not in used and _storage(gm, name) == ptr:
            _delete_attr(gm, name)


def _storage(gm: GraphModule, name: str) -> int | None:
    try:
        t = _attr(gm, name)
    except AttributeError:
        return None
    return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else None



def simplify(gm: GraphModule) -> dict[str, int]:
    """Remove per-step overhead the lowered graph does not need (see the module doc). Returns counts."""
    stats = {"checks": 0, "casts": 0, "gqa_attention": 0, "hadamards": 0}
    for n in list(gm.graph.nodes):
        if n.op != "call_function":
            continue
        if n.target is aten._assert_tensor_metadata.default and not n.users:
            gm.graph.erase_node(n)
            stats["checks"] += 1
        elif n.target is aten.to.dtype and _same_dtype_cast(n):
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
            stats["casts"] += 1
        elif n.target is HD.HADAMARD:             # the rotate pass's online Hadamard: the mixed-radix FWHT, called
            n.target = HD.hadamard_transform      # directly (no custom-op dispatch per step)
            stats["hadamards"] += 1
    for m in repeated_kv(gm):
        attend_grouped(gm, m)
        stats["gqa_attention"] += 1
    if any(stats.values()):
        gm.graph.lint()
        gm.recompile()
    return stats


def _same_dtype_cast(n: Node) -> bool:
    """aten::to.dtype(self, dtype, non_blocking=False, copy=False, memory_format=None) that returns self."""
    src, dtype = n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs.get("dtype")
    copy = n.args[3] if len(n.args) > 3 else n.kwargs.get("copy", False)
    fmt = n.args[4] if len(n.args) > 4 else n.kwargs.get("memory_format")
    val = src.meta.get("val") if isinstance(src, Node) else None
    return isinstance(val, torch.Tensor) and val.dtype == dtype and not copy and fmt in (None, torch.preserve_format)
