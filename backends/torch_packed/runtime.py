"""Passes that make a lowered decode graph cheap to run one token at a time (``PackedModel.decode_graph``).

A decode step of a small model is mostly fixed per-op cost, not arithmetic: on the bundled model (6 layers,
256 wide) a step is a few hundred aten calls, one packed-module call per linear and K/V cache, and a chain
of ``nn.Module.__getattr__`` lookups per parameter and module, against a few microseconds of arithmetic per
linear. These passes cut that fixed cost (tools/bench.py reports decode with them on and off); each keeps
the step's function up to float summation order (bit for bit where stated):

prefix_attention  Attention reads the whole static cache (max_cache_len slots) and masks the unwritten
                  ones. Keys at positions >= n = max(cache_position) + 1 are in the future of every query of
                  the step, so any causal mask hides them: K, V and the mask are cut to their first n slots
                  (slice views) and a low-bit cache (PackedKVCache) dequantizes only those n slots instead of
                  all of them. The masked slots only ever added exact zeros to the softmax; what changes is
                  the attention kernel's vectorized summation over a shorter row (~1e-7 differences). A
                  boolean mask is turned into the additive float mask once per step rather than inside
                  every attention call (the same values attention makes of it).
                  Decode graphs are captured for causal LMs only (capture_decode), where this holds.
fuse_rms_norm     ``w * (x * rsqrt(mean(x^2, -1) + eps))`` (6 aten calls) -> one ``torch.ops.qpass_native.
                  rms_norm`` op node, the native kernel (csrc: the sum of squares in double; differs from
                  torch's float sum in the last bits of the mean only).
fuse_rope         ``x * cos + cat(-x2, x1) * sin`` (7 aten calls) -> one ``torch.ops.qpass_native.rope`` op
                  node, bit for bit.
fuse_attention    ``scaled_dot_product_attention(q, k, v, float mask, scale=, enable_gqa=)`` -> one
                  ``torch.ops.qpass_native.attention`` op node: for up to native.ATTENTION_MAX_T query rows (a
                  decode step) the native kernel, which scores each key row once for all the query heads that
                  share it (GQA) with independent FMA chains over 8 keys, where torch's flash kernel is blocked
                  for long query runs; longer calls (prefill) still run torch's op. Up to fp32 rounding (a
                  polynomial exp; rtol 1e-5).
freeze            The step's calling convention without the pytree (de)flattening and export's input guard;
                  parameters, buffers and packed modules read from flat attributes (one dict lookup instead of
                  a chain of ``__getattr__``); packed modules called through ``forward`` (no hook dispatch);
                  export's grad-mode regions (``wrap_with_set_grad_enabled``, HF's rotary tables) called as
                  plain functions under ``torch.set_grad_enabled``.
                  The frozen graph is a runner: it keeps its module tree (state_dict, named_modules work) but
                  is not meant to be edited, copied or moved afterwards (PackedModel rebuilds it instead).

native_segments  (segments.py, last) Every run of the step's kernels and the view / elementwise ops between
                  them becomes one call of a Segment, which after two decode calls replays the run as one C
                  call (a "tape": no Python, dispatch or allocation between kernels, the step's prologue of
                  position / mask / rotary ops included; a scratch A/B at 0.5 B in segments.py's doc: 1.26x
                  at 1 thread, 1.41x at 2; the tool's table: docs/benchmarks.md bench-size). Other sizes
                  (prefill) run the run's own nodes. Bit for bit but SiLU and cos / sin (within a few ulp).
                  QPASS_NATIVE_SEGMENTS=0 keeps the nodes in the graph.

fuse_* need the native library (native.py) and fp32 tensors; elsewhere the graph keeps the aten ops. The
fused nodes are torch operators (native.py registers the ``qpass_native`` namespace, with fake kernels), so
the graph stays traceable and prints them by name; each op call costs ~1.5 us of dispatch more than calling
the wrapper (native.OPS_NOTE), ~35 us of a bundled-model decode step. The other native kernels (token_quant,
q4 / i8 linear, kv_store / kv_load) are ops too but run inside PackedLinear / PackedKVCache, which call the
wrappers directly: those stay ``forward`` calls of the modules in the graph.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node
from torch.fx.graph import CodeGen

from qpass.graph import META_CAPTURE
from qpass.patterns import SDPA as _SDPA

from . import native
from .kv import PackedKVCache
from .embedding import PackedEmbedding
from .linear import PackedLinear

aten = torch.ops.aten
META_RUNTIME = "qpass_runtime"            # gm.meta key: what optimize_decode changed


def optimize_decode(gm: GraphModule, *, native_ops: bool = True, direct_ops: bool = False) -> dict[str, int]:
    """All passes, in order; returns (and records in ``gm.meta[META_RUNTIME]``) how many sites each changed.
    direct_ops: freeze calls the fused qpass_native ops' wrappers instead of the ops (see freeze)."""
    stats = {"prefix_attention": prefix_attention(gm)}
    if native_ops and native.available():
        stats["rms_norm"] = fuse_rms_norm(gm)
        stats["rope"] = fuse_rope(gm)
        stats["attention"] = fuse_attention(gm)
    stats.update(freeze(gm, direct_ops=direct_ops))
    if native_ops:                                  # QPASS_NATIVE_SEGMENTS=0: off (segments.py)
        from .segments import native_segments
        stats.update(native_segments(gm))
    gm.meta[META_RUNTIME] = stats
    return stats


# ------------------------------------------------------------------------------------ helpers


def _val(n) -> torch.Tensor | None:
    v = n.meta.get("val") if isinstance(n, Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _fp32(*nodes) -> bool:
    return all((v := _val(n)) is not None and v.dtype == torch.float32 and v.device.type == "cpu" for n in nodes)


def _is(n, target) -> bool:
    return isinstance(n, Node) and n.op == "call_function" and n.target is target


def _only_user(n: Node, user: Node) -> bool:
    return len(n.users) == 1 and user in n.users


def _erase_dead(gm: GraphModule, nodes) -> None:
    for n in nodes:
        if isinstance(n, Node) and n.graph is gm.graph and not n.users:
            gm.graph.erase_node(n)


# ---------------------------------------------------------------------------------- attention


def n_keys(cache_position: torch.Tensor) -> int:
    """Cache slots a step can attend to: one past the latest position it writes."""
    return int(cache_position.max()) + 1


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where `mask` allows attending, -inf elsewhere: what scaled_dot_product_attention turns a boolean
    mask into (``convert_boolean_attn_mask``), so passing this instead gives the same result bit for bit."""
    return torch.where(mask.logical_not(), float("-inf"), 0.0).to(dtype)


n_keys._qpass_pure = additive_mask._qpass_pure = True      # read only their arguments (segments.py may move them)
additive_mask._qpass_mask = True                            # segments.py: T_EW's mask op


def prefix_attention(gm: GraphModule) -> int:
    """Cut attention to the written prefix of the static cache (see the module doc). Returns sites changed."""
    info = gm.meta.get(META_CAPTURE, {})
    max_len = info.get("max_cache_len")
    pos = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "cache_position"), None)
    if not info.get("decode") or max_len is None or pos is None:
        return 0
    sites = []
    for n in gm.graph.nodes:
        if not _is(n, _SDPA) or len(n.args) < 4 or not isinstance(n.args[3], Node) or n.kwargs.get("is_causal"):
            continue
        k, v, mask = n.args[1], n.args[2], n.args[3]
        mv = _val(mask)
        if mv is None or mv.shape[-1] != max_len or not all(_cache_sized(t, max_len, gm) for t in (k, v)):
            continue
        sites.append(n)
    if not sites:
        return 0
    with gm.graph.inserting_after(pos):
        count = gm.graph.call_function(n_keys, (pos,))
    cut: dict[Node, Node] = {}

    def prefix(t: Node, dim: int) -> Node:
        if t not in cut:
            if t.op == "call_module" and isinstance(gm.get_submodule(t.target), PackedKVCache):
                t.args = (*t.args[:2], count)             # dequantizes only the first `count` slots
                cut[t] = t
            else:
                with gm.graph.inserting_after(t):
                    cut[t] = gm.graph.call_function(aten.slice.Tensor, (t, dim, 0, count))
        return cut[t]

    additive: dict[Node, Node] = {}

    def float_mask(mask: Node, q: Node) -> Node:
        """The cut boolean mask as the additive float mask attention converts it to on every call, made once."""
        cut_mask, qv = prefix(mask, -1), _val(q)
        if _val(mask).dtype != torch.bool or qv is None:
            return cut_mask
        if mask not in additive:
            with gm.graph.inserting_after(cut_mask):
                additive[mask] = gm.graph.call_function(additive_mask, (cut_mask, qv.dtype))
        return additive[mask]

    for n in sites:
        q, k, v, mask, *rest = n.args
        n.args = (q, prefix(k, 2), prefix(v, 2), float_mask(mask, q), *rest)
    gm.graph.lint()
    gm.recompile()
    return len(sites)


def _cache_sized(t, max_len: int, gm: GraphModule) -> bool:
    if isinstance(t, Node) and t.op == "call_module":
        mod = gm.get_submodule(t.target)
        return isinstance(mod, PackedKVCache) and mod.shape[2] == max_len
    v = _val(t)
    return v is not None and v.dim() == 4 and v.shape[2] == max_len


attention = native.ops.attention.default     # (q, k, v, mask, scale) -> native.attention; the fused nodes' target


def fuse_attention(gm: GraphModule) -> int:
    """Every fp32 ``scaled_dot_product_attention`` without dropout or is_causal, whose mask is None or a float
    one, and whose heads group (enable_gqa, or as many K/V heads as query heads) -> attention. Returns sites."""
    return _fuse(gm, attention, lambda n: (args, []) if (args := _match_attention(n)) is not None else None)


def _source_val(n) -> torch.Tensor | None:
    """The node's traced value, or (for a prefix_attention slice, made after tracing) its input's."""
    v = _val(n)
    if v is None and _is(n, aten.slice.Tensor):
        v = _val(n.args[0])
    return v


def _match_attention(n: Node):
    if not _is(n, _SDPA) or not 3 <= len(n.args) <= 6:
        return None
    q, k, v, mask, dropout, causal = (*n.args, None, 0.0, False)[:6]
    kw = dict(n.kwargs)
    if dropout or causal or kw.pop("dropout_p", 0.0) or kw.pop("is_causal", False):
        return None
    scale, gqa = kw.pop("scale", None), kw.pop("enable_gqa", False)
    vals = [_source_val(t) for t in (q, k, v)]
    if kw or any(t is None or t.dtype != torch.float32 or t.dim() != 4 or t.device.type != "cpu" for t in vals):
        return None
    hq, hkv = vals[0].shape[1], vals[1].shape[1]
    if not (hq == hkv or (gqa and hkv and hq % hkv == 0)):
        return None
    if mask is not None:
        if _is(mask, additive_mask):
            float_mask = mask.args[1] == torch.float32
        else:
            float_mask = (mv := _source_val(mask)) is not None and mv.dtype == torch.float32
        if not float_mask:
            return None
    if scale is None:
        scale = vals[0].shape[-1] ** -0.5
    return (q, k, v, mask, float(scale))


# ------------------------------------------------------------------------------------- RMSNorm


rms_norm = native.ops.rms_norm.default       # (x, weight, eps) -> native.rms_norm; the fused nodes' target


def fuse_rms_norm(gm: GraphModule) -> int:
    """``mul(w, mul(x, rsqrt(add(mean(pow(x, 2), [-1], True), eps))))`` (either operand order) -> rms_norm."""
    return _fuse(gm, rms_norm, lambda n: _match_rms_norm(gm, n))


def _fuse(gm: GraphModule, fn, match) -> int:
    """Replace every node n where ``match(n)`` gives (args, nodes that die with n) by ``fn(*args)``."""
    count = 0
    for n in list(gm.graph.nodes):
        m = match(n)
        if m is None:
            continue
        args, dead = m
        with gm.graph.inserting_before(n):
            new = gm.graph.call_function(fn, args)
        new.meta["val"] = n.meta.get("val")
        n.replace_all_uses_with(new)
        _erase_dead(gm, [n, *dead])
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def _match_rms_norm(gm: GraphModule, n: Node):
    if not _is(n, aten.mul.Tensor) or len(n.args) != 2:
        return None
    for w, inner in (n.args, n.args[::-1]):
        if not (isinstance(w, Node) and w.op == "get_attr" and _is(inner, aten.mul.Tensor) and _only_user(inner, n)):
            continue
        x, r = inner.args if _is(inner.args[1], aten.rsqrt.default) else inner.args[::-1]
        if not (_is(r, aten.rsqrt.default) and _only_user(r, inner)):
            continue
        add = r.args[0]
        if not (_is(add, aten.add.Tensor) and _only_user(add, r) and isinstance(add.args[1], float)):
            continue
        mean = add.args[0]
        if not (_is(mean, aten.mean.dim) and _only_user(mean, add) and list(mean.args[1]) in ([-1],)
                and (mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False))
                and mean.kwargs.get("dtype") is None):
            continue
        p = mean.args[0]
        if not (_is(p, aten.pow.Tensor_Scalar) and _only_user(p, mean) and p.args[0] is x and p.args[1] == 2):
            continue
        weight = getattr_path(gm, w.target)
        xv = _val(x)
        if not (_fp32(x, n) and isinstance(weight, torch.Tensor) and weight.dtype == torch.float32
                and weight.dim() == 1 and xv.shape[-1] == weight.shape[0]):
            continue
        return (x, w, float(add.args[1])), [inner, r, add, mean, p]
    return None


def getattr_path(gm: GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------------------- RoPE


rope = native.ops.rope.default               # (x, cos, sin) -> native.rope; the fused nodes' target


def fuse_rope(gm: GraphModule) -> int:
    """``add(mul(x, cos), mul(cat([neg(slice(x, -1, d/2, end)), slice(x, -1, 0, d/2)], -1), sin))`` -> rope."""
    return _fuse(gm, rope, _match_rope)


def _last(dim, rank: int) -> bool:
    return dim == -1 or dim == rank - 1


def _match_rope(n: Node):
    if not _is(n, aten.add.Tensor) or len(n.args) != 2:
        return None
    for a, b in (n.args, n.args[::-1]):
        if not (_is(a, aten.mul.Tensor) and _is(b, aten.mul.Tensor) and _only_user(a, n) and _only_user(b, n)):
            continue
        for cat, sin in (b.args, b.args[::-1]):
            if not (_is(cat, aten.cat.default) and _only_user(cat, b)):
                continue
            parts = cat.args[0]
            dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
            if len(parts) != 2 or not _is(parts[0], aten.neg.default) or not _is(parts[1], aten.slice.Tensor):
                continue
            neg, lo = parts
            hi = neg.args[0]
            if not (_is(hi, aten.slice.Tensor) and _only_user(neg, cat) and _only_user(hi, neg)
                    and _only_user(lo, cat)):
                continue
            x = lo.args[0]
            if hi.args[0] is not x or x not in a.args:
                continue
            cos = a.args[1] if a.args[0] is x else a.args[0]
            xv = _val(x)
            if xv is None or xv.dim() != 4 or not _fp32(x, cos, sin, n) or not _last(dim, 4):
                continue
            d = xv.shape[-1]
            if not (isinstance(d, int) and d % 2 == 0 and _slice(lo, 0, d // 2, d) and _slice(hi, d // 2, None, d)):
                continue
            cv, sv = _val(cos), _val(sin)
            if not (cv.dim() == 4 and cv.shape[1] == 1 and cv.shape[-1] == d and tuple(cv.shape) == tuple(sv.shape)):
                continue
            return (x, cos, sin), [a, b, cat, neg, hi, lo]
    return None


def _slice(n: Node, start: int, end: int | None, d: int) -> bool:
    """n is x[..., start:end] along the last of 4 dims (end None: to the end)."""
    a = list(n.args) + [None] * (5 - len(n.args))
    dim, s, e, step = (0 if a[1] is None else a[1]), (a[2] or 0), a[3], (1 if a[4] is None else a[4])
    e = d if e is None or e >= d else e
    return _last(dim, 4) and step == 1 and s == start and e == (d if end is None else end)


# -------------------------------------------------------------------------------------- freeze

_WRAP_GRAD = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)


def grad_mode_call(enabled: bool, fn, *args):
    """What export's ``wrap_with_set_grad_enabled`` region does (HF computes the rotary tables in one, once per
    step), without the higher-order op's Python dispatch (pytree flattening and a dynamo frame per call)."""
    with torch.set_grad_enabled(enabled):
        return fn(*args)


grad_mode_call._qpass_pure = True


def freeze(gm: GraphModule, *, direct_ops: bool = False) -> dict[str, int]:
    """Cheap calling convention and attribute access (see the module doc). Returns counts.
    direct_ops: the fused rms_norm / rope op nodes call native.rms_norm / native.rope directly, without the
    op dispatch (~2 us a call, ~50 us of a bundled-model decode step: native.OPS_NOTE); the graph then holds
    Python functions there instead of ops. Off by default: the decode graph keeps its ops."""
    stats = {"guards": 0, "flat_attributes": 0, "direct_calls": 0, "grad_mode_calls": 0}
    direct = {rms_norm: native.rms_norm, rope: native.rope, attention: native.attention} if direct_ops else {}
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and n.target == "_guards_fn" and not n.users:
            gm.graph.erase_node(n)
            stats["guards"] += 1
        elif n.op == "call_function" and n.target is _WRAP_GRAD:
            n.target = grad_mode_call
            stats["grad_mode_calls"] += 1
        elif n.op == "call_function" and n.target in direct:
            n.target = direct[n.target]
            stats["direct_ops"] = stats.get("direct_ops", 0) + 1
    aliases: dict[int, str] = {}

    def alias(obj) -> str:
        if id(obj) not in aliases:
            name = f"_qp{len(aliases)}"
            gm.__dict__[name] = obj                 # a plain attribute: read without nn.Module.__getattr__
            aliases[id(obj)] = name
        return aliases[id(obj)]

    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and "." in n.target:
            n.target = alias(getattr_path(gm, n.target))
            stats["flat_attributes"] += 1
        elif n.op == "call_module":
            mod = gm.get_submodule(n.target)
            if isinstance(mod, (PackedLinear, PackedKVCache, PackedEmbedding)):
                with gm.graph.inserting_before(n):
                    holder = gm.graph.get_attr(alias(mod))
                    call = gm.graph.call_method("forward", (holder, *n.args), dict(n.kwargs))
                call.meta.update(n.meta)
                n.replace_all_uses_with(call)
                gm.graph.erase_node(n)
                stats["direct_calls"] += 1
    out_spec = getattr(gm, "_out_spec", None)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    flat = output.args[0]
    if out_spec is not None and out_spec.is_leaf() and isinstance(flat, (tuple, list)) and len(flat) == 1:
        gm.graph._codegen = CodeGen()               # forward(self, input_ids, cache_position) -> logits
        output.args = (flat[0],)
        stats["plain_call"] = 1
        if getattr(gm, "validate_inputs", False):   # export's pre-hook matching the call to the pytree spec
            gm.validate_inputs = False              # (~100 us a cold step): the spec is gone with the codegen
            stats["input_check"] = 0
    gm.recompile()
    return stats


__all__ = ["optimize_decode", "prefix_attention", "fuse_rms_norm", "fuse_rope", "fuse_attention", "freeze",
           "n_keys", "rms_norm", "rope", "attention"]
