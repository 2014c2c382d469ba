"""Learn the rotations on the quantized network (SpinQuant's R1 and R2, Liu et al. 2024).

Matches   the residual stream of ``qpass.rotation.residual_stream_rotation`` on the quantized graph (activation
          quantizers on the stream followed through), after ``rotate`` has folded its norms and rotated it by Q;
          with ``r2``, every attention whose V comes from one linear (v_proj) and whose output reaches one linear
          (o_proj) through layout ops, KV / activation quantizers, repeat_kv and rotate's online Hadamard only
Changes   the stream's rotation R = Q U: U [d, d] orthogonal, start I (R starts at rotate's randomized Hadamard),
          learned with Cayley SGD on the Stiefel manifold to minimise the next-token cross-entropy of the
          *quantized* graph on the calibration samples, every weight frozen. While learning, the graph runs with
          ``torch.func.functional_call`` on its stream parameters as functions of U: readers ``W U``, writers
          ``Uᵀ W`` (biases ``b U``), embedding tables ``E U`` (the stored layout of each parameter respected), the
          activation and KV quantizers live (straight-through gradients); with ``weights: live`` the weight
          quantizers too, their min-max scales recomputed from ``W(U)`` at every step, with ``weights: float``
          they are the identity while learning (SpinQuant's recipe when GPTQ rounds the weights afterwards:
          learn on W16A4KV4, then GPTQ). Update (SpinQuant's SGDG, momentum 0, the exact Cayley transform in
          place of its 5 fixed-point iterations): G = dL/dU averaged over a batch, W = ½(G Uᵀ − U Gᵀ) (skew);
          with a LayerNorm on the stream W <- P W P, P = I − 11ᵀ/d, so U keeps fixing the all-ones vector (the
          LayerNorm's mean subtraction still commutes, as rotate's mean-preserving Q does); step
          τ = min(lr_t, 1 / ‖W‖₁) (SGDG's cap), ``U <- (I + τ/2 W)⁻¹ (I − τ/2 W) U``; lr_t cosine from ``lr`` to
          0 over ``steps`` (the paper's HF-Trainer schedule). Batches: ``batch_size`` samples per step, epochs of
          the calibration samples in seeded random orders (deterministic for a seed).
          R2 (``r2``): per attention one U2 [head_dim, head_dim] (start I: on top of rotate's per-head H D), the
          same for every head: v_proj's rows per head ``U2ᵀ W_h`` (bias ``b_h U2``), o_proj's columns
          ``W Aᵀ blockdiag(U2) A`` with A the online Hadamard on o_proj's input (``had(x) = x A``; I without
          one), learned by the same Cayley steps (no all-ones constraint inside a head).
          Baked: U (and the U2s) are multiplied into the parameters (float64, as rotate does) and every weight
          quantizer on the stream gets its scale (and zero point) again from its rotated weight, the way it
          was chosen (min-max, or the clipping search of ``quantize: {weight_clip: true}``); no node is added,
          so the result saves, loads and lowers like any rotated graph. The float function is unchanged.
Requires  calibration data (token ids: the loss is next-token cross-entropy); ``rotate`` before (the stream's
          norms folded) and at least one quantizer on the stream's linears (``quantize``, and ``kv_cache``
          before it to learn with the KV cache quantized); weight quantizers still with their RTN scales, so
          before ``gptq`` / ``awq`` and the like. The online Hadamards (R3 on Q/K, R4 before the writers) stay as
          rotate made them, as in SpinQuant
Preserves nothing it is asked for (weights change)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch.fx import GraphModule, Node
from tqdm.auto import tqdm

from qpass.calibration import logits_of
from qpass.errors import CalibrationError, QuantizationError, RecipeError, UnsupportedOpError
from qpass import patterns as P
from qpass.graph import LinearSite, is_quantizer, linear_sites, module_path, param_of
from qpass.pass_infra import Context, Pass, PassResult
from qpass.plan import Plan
from qpass.primitives.gptq import clipped_qparams
from qpass.primitives.hadamard import HADAMARD
from qpass.primitives.quant import choose_qparams
from qpass.quantizer import Quantizer, role_of
from qpass.rotation import Stream, residual_stream_rotation

from . import rotate as R

aten = torch.ops.aten
WEIGHTS = ("live", "float")


@dataclass(frozen=True)
class SpinQuantConfig:
    name: ClassVar[str] = "spinquant"
    field_docs: ClassVar[dict] = {
        "steps": "Cayley SGD steps (SpinQuant: 100)",
        "lr": "learning rate at the first step, decayed to 0 by a cosine (SpinQuant: 1.5); the step is also capped at "
              "1 / ‖W‖₁ (SGDG)",
        "batch_size": "calibration samples per step (SpinQuant: 8 = 8 GPUs x 1); epochs of the samples in seeded "
                      "random orders",
        "seed": "seed of the sample order (the run is deterministic for a seed)",
        "weights": "live: the weight quantizers quantize W(U) while learning (scales recomputed every step); float: "
                   "weights unquantized while learning (SpinQuant's setting when GPTQ follows: W16A4KV4)",
        "r2": "also learn R2: one head_dim x head_dim rotation per attention, on V's heads (v_proj rows) and the "
              "matching columns of o_proj (through its online Hadamard, if rotate put one there)",
    }

    steps: int = 100
    lr: float = 1.5
    batch_size: int = 8
    seed: int = 0
    weights: Literal["live", "float"] = "live"
    r2: bool = True

    def __post_init__(self):
        if not 0 <= self.steps <= 100_000:
            raise RecipeError("steps", f"must be an integer in [0, 100000] (SpinQuant: 100), got {self.steps}")
        if not 0.0 < self.lr <= 100.0:
            raise RecipeError("lr", f"must be in (0, 100] (SpinQuant: 1.5), got {self.lr}")
        if not 1 <= self.batch_size <= 1 << 16:
            raise RecipeError("batch_size", f"must be a number of samples >= 1, got {self.batch_size}")
        if not 0 <= self.seed < 2 ** 63:
            raise RecipeError("seed", f"must be a non-negative integer, got {self.seed}")
        if self.weights not in WEIGHTS:
            raise RecipeError("weights", f"must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")


# ------------------------------------------------------------------------------ what U acts on


@dataclass(frozen=True)
class _Param:
    """One stream parameter (get_attr target) and how U acts on it: `side` "right" (value @ U) or "left"
    (Uᵀ @ value), in its stored layout."""

    target: str
    side: str


@dataclass(frozen=True)
class _WeightQ:
    """A static weight quantizer on a stream linear: its node, the site, and how its scale was chosen."""

    q: Quantizer
    site: LinearSite
    mode: str                      # "minmax" | "clipped"


def stream_params(stream: Stream) -> list[_Param]:
    """Readers ``W_c U`` ([out, in] canonical; stored [in, out]: ``Uᵀ W``), writers ``Uᵀ W_c`` and their biases
    ``b U``, embedding tables ``E U``; each parameter once."""
    out: dict[str, _Param] = {}

    def put(target: str, side: str, who: str) -> None:
        old = out.get(target)
        if old is not None and old.side != side:
            raise UnsupportedOpError(f"spinquant: parameter {target} is both read and written on the residual "
                                     f"stream ({who})", fix="leave spinquant out of the recipe for this model")
        out[target] = _Param(target, side)

    for r in stream.readers:
        put(r.weight.target, "right" if r.in_axis == 1 else "left", r.path)
    for w in stream.writers:
        put(w.weight.target, "left" if w.in_axis == 1 else "right", w.path)
        if w.bias is not None:
            put(w.bias.target, "right", w.path)
    for t in stream.tables:
        put(t.args[0].target, "right", t.name)
    return list(out.values())


def _act(value: torch.Tensor, side: str, u: torch.Tensor) -> torch.Tensor:
    if value.dim() == 1:
        return value @ u
    return value @ u if side == "right" else u.T @ value


def _quantizer_input(q: Quantizer, site: LinearSite, w: torch.Tensor) -> torch.Tensor:
    """The value the weight quantizer `q` quantizes when the weight parameter holds `w` (the parameter itself or
    one layout op of it: the transpose the mm family consumes)."""
    if q.x is site.weight:
        return w
    x = q.x
    return x.target(w, *x.args[1:], **x.kwargs)


def _qparams(x: torch.Tensor, q: Quantizer, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    spec = q.meta.spec
    if mode == "clipped":
        return clipped_qparams(x, spec, q.block)
    return choose_qparams(x, spec, block_size=q.block)


# ------------------------------------------------------------------------------------- R2 (per head)

_HEAD_PATH = P.RESHAPES | P.TRANSPOSES | P.CASTS | frozenset({
    aten.unsqueeze.default, aten.expand.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
    aten.detach.default})


@dataclass(frozen=True)
class _Heads:
    """R2 of one attention: V's producer `v` (its output channels in heads of `dim`), the linear `o` that reads the
    attention output (its input columns in heads of `dim`), and `mix` [in, in] (float64), the transform between
    them: the online Hadamard rotate put on o's input (``had(x) = x mix``), or the identity."""

    name: str
    v: LinearSite
    o: LinearSite
    dim: int
    mix: torch.Tensor


def head_pairs(gm: GraphModule, near: list[str]) -> list[_Heads]:
    """Every attention whose V comes from one linear and whose output goes to one linear through layout ops only
    (a KV quantizer, repeat_kv; an online Hadamard and an activation quantizer on o's input); others: `near`."""
    sites = {s.node: s for s in linear_sites(gm)}
    by_input: dict[Node, LinearSite] = {}
    for s in sites.values():
        by_input.setdefault(s.input, s)
    out = []
    for site in P.attention_sites(gm):
        name = module_path(gm, site.node) or site.node.name
        val = site.value.meta.get("val") if isinstance(site.value, Node) else None
        if not isinstance(val, torch.Tensor) or val.dim() != 4:
            near.append(f"{name}: no R2 (V is not a [batch, heads, seq, head_dim] tensor)")
            continue
        dim = int(val.shape[-1])
        v = _back_to_linear(site.value, sites)
        o, mix = _forward_to_linear(gm, site.node, by_input)
        why = None
        if v is None or o is None:
            why = "V does not come from one linear" if v is None else "the attention output does not reach one linear"
        elif v.weight is o.weight or param_of(gm, v.weight).shape[v.out_axis] % dim or \
                param_of(gm, o.weight).shape[o.in_axis] % dim:
            why = "the linears' channels are not whole heads"
        if why:
            near.append(f"{name}: no R2 ({why} through layout ops only)")
            continue
        out.append(_Heads(name, v, o, dim, mix))
    return out


def _single_user(n: Node) -> Node | None:
    users = [u for u in n.users if not P.is_call(u, P.SHAPE_ONLY)]
    return users[0] if len(users) == 1 else None


def _back_to_linear(n, sites: dict) -> LinearSite | None:
    for _ in range(64):
        if not isinstance(n, Node):
            return None
        if n in sites:
            return sites[n]
        if is_quantizer(n) and role_of(n) == "value" or P.is_call(n, _HEAD_PATH):
            prev = Quantizer(n).x if is_quantizer(n) else n.args[0]
            if not isinstance(prev, Node) or _single_user(prev) is not n:
                return None
            n = prev
            continue
        return None
    return None


def _forward_to_linear(gm: GraphModule, n: Node, by_input: dict) -> tuple[LinearSite | None, torch.Tensor | None]:
    mix = None
    for _ in range(64):
        if n in by_input:
            o = by_input[n]
            width = int(param_of(gm, o.weight).shape[o.in_axis])
            return o, (mix if mix is not None else torch.eye(width, dtype=torch.float64))
        u = _single_user(n)
        if u is None:
            return None, None
        if P.is_call(u, _HEAD_PATH) and u.args[0] is n:
            n = u
            continue
        if u.target is HADAMARD and u.args[0] is n and mix is None:
            width = int(n.meta["val"].shape[-1])
            fetch = [param_of(gm, a) if isinstance(a, Node) else a for a in u.args[1:]]
            mix = HADAMARD(torch.eye(width, dtype=torch.float64), *fetch).double()
            n = u
            continue
        if is_quantizer(u) and role_of(u) == "input" and Quantizer(u).x is n:
            n = u
            continue
        return None, None
    return None, None


def _rows_by_head(c: torch.Tensor, u2: torch.Tensor, dim: int) -> torch.Tensor:
    """[out, in] canonical weight with its rows in heads of `dim`: each head's rows h -> u2ᵀ h."""
    out, inp = c.shape
    return torch.einsum("ji,hjk->hik", u2, c.reshape(out // dim, dim, inp)).reshape(out, inp)


def r2_values(h: _Heads, vals: dict, u2: torch.Tensor) -> dict[str, torch.Tensor]:
    """v's weight and bias and o's weight with R2 = u2 applied (on the values in `vals`, stored layouts)."""
    out = {}
    v, o = h.v, h.o
    w = vals[v.weight.target]
    c = w if v.in_axis == 1 else w.T
    c = _rows_by_head(c, u2, h.dim)
    out[v.weight.target] = c if v.in_axis == 1 else c.T
    if v.bias is not None:
        b = vals[v.bias.target]
        out[v.bias.target] = (b.reshape(-1, h.dim) @ u2).reshape(-1)
    w = vals[o.weight.target]
    c = w if o.in_axis == 1 else w.T
    k = c.shape[1] // h.dim
    mix = h.mix.to(u2.dtype)
    c = c @ (mix.T @ torch.block_diag(*([u2] * k)) @ mix)
    out[o.weight.target] = c if o.in_axis == 1 else c.T
    return out


def _r2_targets(heads: list[_Heads]) -> list[str]:
    ts = []
    for h in heads:
        ts += [h.v.weight.target, h.o.weight.target] + ([h.v.bias.target] if h.v.bias is not None else [])
    return ts


# ------------------------------------------------------------------------------------------- pass


@dataclass(frozen=True)
class SpinQuant(Pass):
    """Learn SpinQuant's rotations (R1 on the residual stream, R2 per attention) by Cayley SGD on the quantized
    network's loss, then bake them into the weights."""

    config: SpinQuantConfig = SpinQuantConfig()
    name: ClassVar[str] = "spinquant"
    needs_calibration: ClassVar[bool] = True
    preserves: ClassVar = ()

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        cfg = self.config
        calib = ctx.require_calibration(self.name)
        stream = _stream(gm)
        _check_rotated(gm, stream)
        wqs = _weight_quantizers(gm, stream)
        if not any(is_quantizer(n) for n in gm.graph.nodes):
            raise QuantizationError("spinquant found no quantizer in the graph: the float loss does not depend on "
                                    "the rotation, there is nothing to learn",
                                    fix="place '- quantize: {...}' (and '- kv_cache: {...}') between rotate and "
                                        "spinquant in the recipe")
        samples = [_token_ids(s, i) for i, s in enumerate(calib.samples)]
        params = stream_params(stream)
        near: list[str] = []
        heads = head_pairs(gm, near) if cfg.r2 else []
        mean_preserving = bool(stream.layer_norms)
        start = time.perf_counter()
        u, u2s, history, calib_loss = _learn(gm, stream.dim, params, heads, wqs, samples, cfg, mean_preserving,
                                             live_weights=cfg.weights == "live", progress=ctx.progress)
        err = max(float((m.T @ m - torch.eye(m.shape[0], dtype=m.dtype)).abs().max()) for m in [u, *u2s])
        if err > 1e-5:
            raise QuantizationError(f"spinquant: a learned rotation drifted off orthogonal (max |UᵀU - I| = "
                                    f"{err:.2e})", fix="report this as a qpass bug; lower lr meanwhile")
        _bake(gm, params, heads, wqs, u, u2s)
        stats = {"dim": stream.dim, "params_rotated": len(params), "weight_quantizers_rescaled": len(wqs),
                 "steps": cfg.steps, "samples": len(samples), "mean_preserving": mean_preserving,
                 "loss_first": history[0] if history else None, "loss_last": history[-1] if history else None,
                 "loss_first10": _mean(history[:10]), "loss_last10": _mean(history[-10:]),
                 "loss_by_tenth": [round(_mean(c), 4) for c in _tenths(history)],
                 **calib_loss, "orthogonality_error": err,
                 "distance_from_start": float((u - torch.eye(u.shape[0], dtype=u.dtype)).norm()),
                 "r2_learned": len(heads), "r2_distance_from_start": _mean([float((m - torch.eye(
                     m.shape[0], dtype=m.dtype)).norm()) for m in u2s]),
                 "seconds": round(time.perf_counter() - start, 2)}
        decisions = {"dim": stream.dim, "steps": cfg.steps, "lr": cfg.lr, "batch_size": cfg.batch_size,
                     "seed": cfg.seed, "weights": cfg.weights, "mean_preserving": mean_preserving,
                     "params": sorted(p.target for p in params), "r2": [h.name for h in heads]}
        return PassResult(modified=True, stats=stats, near_misses=near, plan=Plan(self.name, decisions=decisions))

    def streaming_refusal(self) -> str | None:
        return "spinquant back-propagates through the whole quantized model, which needs every weight in memory"


def _tensor(gm: GraphModule, target: str) -> torch.Tensor:
    try:
        return gm.get_parameter(target)
    except AttributeError:
        return gm.get_buffer(target)


def _tenths(xs: list[float]) -> list[list[float]]:
    """`xs` in (up to) ten consecutive chunks."""
    n = len(xs)
    cuts = sorted({round(i * n / 10) for i in range(11)})
    return [xs[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _stream(gm: GraphModule) -> Stream:
    s = residual_stream_rotation(gm, through_quantizers=True)
    if isinstance(s, str):
        raise UnsupportedOpError(f"spinquant cannot rotate the residual stream: {s}",
                                 fix="leave spinquant (and rotate) out of the recipe for this model")
    return s


def _check_rotated(gm: GraphModule, stream: Stream) -> None:
    """rotate ran before: every norm weight on the stream is folded (the identity), no reader shares a table."""
    for n in stream.norm_weights:
        if not R._neutral(gm, n):
            raise QuantizationError(f"spinquant: the norm {n.name} ({module_path(gm, n) or 'the residual stream'}) "
                                    "still has its weight: spinquant learns on top of rotate's folded, rotated stream",
                                    fix="put '- rotate: {kind: hadamard, seed: 0}' first in the recipe (before "
                                        "quantize)")
    tables = {t.args[0].target for t in stream.tables}
    for r in stream.readers:
        if r.weight.target in tables:
            raise QuantizationError(f"spinquant: {r.path} reads the embedding table (tied weights): rotate unties "
                                    "them", fix="put '- rotate: {...}' first in the recipe")


def _weight_quantizers(gm: GraphModule, stream: Stream) -> list[_WeightQ]:
    """The static weight quantizers of the stream's readers and writers, with the way their scales were chosen
    (checked: min-max or the clipping search on the weight as it is; anything else means a pass after quantize
    changed weights or scales, and rotating them now would undo its work)."""
    out, seen = [], set()
    tables = {t.args[0].target for t in stream.tables}
    for site in stream.readers + stream.writers:
        for u in site.weight.users:
            if is_quantizer(u) and u is not site.weight_use and role_of(u) != "weight":
                raise UnsupportedOpError(f"spinquant: the weight of {site.path} is read by another quantizer "
                                         f"({u.name})", fix="leave spinquant out of this recipe")
        if site.weight.target in tables or not is_quantizer(site.weight_use) or site.weight_use in seen:
            continue
        seen.add(site.weight_use)
        q = Quantizer(site.weight_use)
        where = site.path or site.node.name
        if q.dynamic or q.op != "fake_quantize" or q.meta is None:
            raise UnsupportedOpError(f"spinquant: the weight quantizer of {where} is a {q.op}, not a static "
                                     "fake_quantize of the quantize pass", fix="quantize the weights with quantize")
        w = param_of(gm, site.weight).detach()
        x = _quantizer_input(q, site, w)
        scale = param_of(gm, q.scale).detach()
        zp = param_of(gm, q.zero_point).detach() if q.zero_point is not None else None
        mode = None
        for m in ("minmax", "clipped"):
            s, z = _qparams(x.float(), q, m)
            if torch.allclose(s.to(scale), scale, rtol=1e-5, atol=0) and (zp is None or torch.equal(z.to(zp), zp)):
                mode = m
                break
        if mode is None:
            raise QuantizationError(f"spinquant: the weight quantizer of {where} has scales that neither min-max nor "
                                    "the clipping search give for its weight: a pass after quantize (gptq, awq, ...) "
                                    "changed them, and rotating the weights now would undo that pass",
                                    fix="put spinquant right after quantize / kv_cache and before gptq")
        out.append(_WeightQ(q, site, mode))
    return out


def _token_ids(sample: tuple, i: int) -> torch.Tensor:
    ids = sample[0] if sample else None
    if not (isinstance(ids, torch.Tensor) and not ids.is_floating_point() and ids.dim() == 2 and ids.shape[1] >= 2):
        raise CalibrationError(f"calib_data[{i}] is not a [batch, seq >= 2] tensor of token ids: spinquant's loss is "
                               "next-token cross-entropy", fix="calibrate on token-id sequences of 2 tokens or more")
    return ids


# --------------------------------------------------------------------------------------- learning


def _values(params: list[_Param], heads: list[_Heads], u: torch.Tensor, u2s: list[torch.Tensor],
            bases: dict) -> dict[str, torch.Tensor]:
    """The stream's parameters with R1's U applied, then V / o_proj with each R2 (the two act on different axes
    of a weight, so the order does not matter)."""
    vals = {p.target: _act(bases[p.target], p.side, u) for p in params}
    for h, u2 in zip(heads, u2s):
        vals.update(r2_values(h, {**bases, **vals}, u2))
    return vals


def _learn(gm: GraphModule, d: int, params: list[_Param], heads: list[_Heads], wqs: list[_WeightQ],
           samples: list[torch.Tensor], cfg: SpinQuantConfig, mean_preserving: bool, *, live_weights: bool,
           progress: bool) -> tuple[torch.Tensor, list[torch.Tensor], list[float], dict]:
    """U (R1's update, float64) and one U2 per attention of `heads` after cfg.steps Cayley SGD steps, the batch
    loss of every step (before its update), and the mean loss over every calibration sample before and after."""
    u = torch.eye(d, dtype=torch.float64)
    u2s = [torch.eye(h.dim, dtype=torch.float64) for h in heads]
    history: list[float] = []
    capped = 0
    if cfg.steps == 0:
        return u, u2s, history, {}
    bases = {t: _tensor(gm, t).detach().float() for t in [p.target for p in params] + _r2_targets(heads)}
    ones = torch.full((d, 1), 1.0 / math.sqrt(d), dtype=torch.float64)
    proj = torch.eye(d, dtype=torch.float64) - ones @ ones.T
    order = _order(len(samples), cfg)
    identity = {} if live_weights else {wq.q.node: wq for wq in wqs}
    saved = {name: p.requires_grad for name, p in gm.named_parameters()}
    for p in gm.parameters():
        p.requires_grad_(False)
    hooks = _identity_weight_quantizers(gm, identity)
    try:
        with torch.no_grad():
            before = _mean([float(_loss(gm, params, heads, wqs, bases, u.float(), [m.float() for m in u2s], ids,
                                        live_weights)) for ids in samples])
        bar = tqdm(range(cfg.steps), desc="spinquant", disable=not progress, leave=False)
        for step in bar:
            batch = order[step]
            uf = u.float().requires_grad_(True)
            u2f = [m.float().requires_grad_(True) for m in u2s]
            total = 0.0
            for i in batch:
                loss = _loss(gm, params, heads, wqs, bases, uf, u2f, samples[i], live_weights)
                (loss / len(batch)).backward()
                total += float(loss.detach()) / len(batch)
            history.append(total)
            lr_t = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
            u, was_capped = _cayley(u, uf.grad, lr_t, proj if mean_preserving else None)
            capped += was_capped
            u2s = [_cayley(m, mf.grad, lr_t, None)[0] for m, mf in zip(u2s, u2f)]
            bar.set_postfix(loss=f"{total:.4f}")
        with torch.no_grad():
            after = _mean([float(_loss(gm, params, heads, wqs, bases, u.float(), [m.float() for m in u2s], ids,
                                       live_weights)) for ids in samples])
    finally:
        for h in hooks:
            h()
        for name, p in gm.named_parameters():
            p.requires_grad_(saved[name])
    return u, u2s, history, {"calib_loss_start": before, "calib_loss_end": after, "steps_capped": capped}


def _cayley(u: torch.Tensor, grad: torch.Tensor | None, lr: float,
            proj: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """One SGDG step (momentum 0) on the Stiefel manifold: W = ½(G Uᵀ − U Gᵀ) (in the complement of the ones
    vector with `proj`), τ = min(lr, 1/‖W‖₁), U <- (I + τ/2 W)⁻¹ (I − τ/2 W) U; and whether the cap bound."""
    if grad is None:
        return u, False
    g = grad.double()
    w = 0.5 * (g @ u.T - u @ g.T)
    if proj is not None:
        w = proj @ w @ proj
    norm1 = float(w.abs().sum(0).max())
    tau = min(lr, 1.0 / norm1) if norm1 > 0 else 0.0
    eye = torch.eye(u.shape[0], dtype=torch.float64)
    return torch.linalg.solve(eye + tau / 2 * w, (eye - tau / 2 * w) @ u), tau < lr


def _loss(gm: GraphModule, params: list[_Param], heads: list[_Heads], wqs: list[_WeightQ], bases: dict,
          u: torch.Tensor, u2s: list[torch.Tensor], ids: torch.Tensor, live_weights: bool) -> torch.Tensor:
    """Next-token cross-entropy of the graph on `ids` with the stream's parameters rotated by `u` and each
    attention's V / o_proj by its R2 in `u2s`."""
    vals = _values(params, heads, u, u2s, bases)
    if live_weights:
        vals.update(_scales(wqs, vals))
    logits = logits_of(torch.func.functional_call(gm, vals, (ids,), strict=False))
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             ids[:, 1:].reshape(-1))


def _order(n: int, cfg: SpinQuantConfig) -> list[list[int]]:
    """Sample indices of every step: consecutive batches of epochs in seeded random orders."""
    gen = torch.Generator().manual_seed(int(cfg.seed))
    flat: list[int] = []
    need = cfg.steps * min(cfg.batch_size, n)
    while len(flat) < need:
        flat += torch.randperm(n, generator=gen).tolist()
    b = min(cfg.batch_size, n)
    return [flat[i * b:(i + 1) * b] for i in range(cfg.steps)]


def _scales(wqs: list[_WeightQ], vals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weight quantizers' scales (and zero points) recomputed from the rotated weights (no gradient through
    them: the quantizer's straight-through estimator carries the weight's)."""
    out = {}
    for wq in wqs:
        w = vals.get(wq.site.weight.target)
        if w is None:
            continue
        x = _quantizer_input(wq.q, wq.site, w.detach())
        s, z = _qparams(x, wq.q, wq.mode)
        out[wq.q.scale.target] = s
        if wq.q.zero_point is not None:
            out[wq.q.zero_point.target] = z
    return out


def _identity_weight_quantizers(gm: GraphModule, nodes: dict[Node, _WeightQ]) -> list:
    """Make the weight quantizers in `nodes` the identity while learning (``weights: float``): each is replaced
    by its input in the graph, and the returned undo callables put it back."""
    undo = []
    for n in nodes:
        x = Quantizer(n).x
        users = list(n.users)
        for user in users:
            user.replace_input_with(n, x)

        def back(n=n, x=x, users=users):
            for user in users:
                user.replace_input_with(x, n)
        undo.append(back)
    if nodes:
        gm.recompile()
        undo.append(gm.recompile)
    return undo


@torch.no_grad()
def _bake(gm: GraphModule, params: list[_Param], heads: list[_Heads], wqs: list[_WeightQ], u: torch.Tensor,
          u2s: list[torch.Tensor]) -> None:
    """Multiply U and the U2s into the parameters (float64) and choose the weight quantizers' scales again."""
    moved = [(h, m) for h, m in zip(heads, u2s) if not torch.equal(m, torch.eye(h.dim, dtype=m.dtype))]
    heads, u2s = [h for h, _ in moved], [m for _, m in moved]
    targets = [p.target for p in params] + _r2_targets(heads)
    bases = {t: _tensor(gm, t).detach().double() for t in targets}
    vals = _values(params, heads, u, u2s, bases)
    for t, v in vals.items():
        p = _tensor(gm, t)
        p.copy_(v.to(p.dtype))
    for wq in wqs:
        x = _quantizer_input(wq.q, wq.site, param_of(gm, wq.site.weight).detach())
        s, z = _qparams(x.float(), wq.q, wq.mode)
        scale = param_of(gm, wq.q.scale)
        scale.copy_(s.to(scale.dtype))
        if wq.q.zero_point is not None:
            zp = param_of(gm, wq.q.zero_point)
            zp.copy_(z.to(zp.dtype))


__all__ = ["SpinQuant", "SpinQuantConfig", "stream_params"]
