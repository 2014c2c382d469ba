"""Learn the residual stream's rotation on the quantized network (SpinQuant's R1, Liu et al. 2024).

Matches   the residual stream of ``qpass.rotation.residual_stream_rotation`` on the quantized graph (activation
          quantizers on the stream followed through), after ``rotate`` has folded its norms and rotated it by Q
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
          Baked: U is multiplied into the stream's parameters (float64, as rotate does) and every weight
          quantizer on the stream gets its scale (and zero point) again from its rotated weight, the way it
          was chosen (min-max, or the clipping search of ``quantize: {weight_clip: true}``); no node is added,
          so the result saves, loads and lowers like any rotated graph. The float function is unchanged.
Requires  calibration data (token ids: the loss is next-token cross-entropy); ``rotate`` before (the stream's
          norms folded) and at least one quantizer on the stream's linears (``quantize``, and ``kv_cache``
          before it to learn with the KV cache quantized); weight quantizers still with their RTN scales, so
          before ``gptq`` / ``awq`` and the like. R2 (per attention head) and the online Hadamards R3/R4 stay as
          rotate made them (a deviation: SpinQuant learns R2 too)
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
from qpass.graph import LinearSite, is_quantizer, module_path, param_of
from qpass.pass_infra import Context, Pass, PassResult
from qpass.plan import Plan
from qpass.primitives.gptq import clipped_qparams
from qpass.primitives.quant import choose_qparams
from qpass.quantizer import Quantizer, role_of
from qpass.rotation import Stream, residual_stream_rotation

from . import rotate as R

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
    }

    steps: int = 100
    lr: float = 1.5
    batch_size: int = 8
    seed: int = 0
    weights: Literal["live", "float"] = "live"

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


# ------------------------------------------------------------------------------------------- pass


@dataclass(frozen=True)
class SpinQuant(Pass):
    """Learn the residual stream's rotation (R1) by Cayley SGD on the quantized network's loss, then bake it."""

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
        mean_preserving = bool(stream.layer_norms)
        start = time.perf_counter()
        u, history, calib_loss = _learn(gm, stream.dim, params, wqs, samples, cfg, mean_preserving,
                                        live_weights=cfg.weights == "live", progress=ctx.progress)
        err = float((u.T @ u - torch.eye(u.shape[0], dtype=u.dtype)).abs().max())
        if err > 1e-5:
            raise QuantizationError(f"spinquant: the learned rotation drifted off orthogonal (max |UᵀU - I| = "
                                    f"{err:.2e})", fix="report this as a qpass bug; lower lr meanwhile")
        _bake(gm, params, wqs, u)
        stats = {"dim": stream.dim, "params_rotated": len(params), "weight_quantizers_rescaled": len(wqs),
                 "steps": cfg.steps, "samples": len(samples), "mean_preserving": mean_preserving,
                 "loss_first": history[0] if history else None, "loss_last": history[-1] if history else None,
                 "loss_first10": _mean(history[:10]), "loss_last10": _mean(history[-10:]),
                 "loss_by_tenth": [round(_mean(c), 4) for c in _tenths(history)],
                 **calib_loss, "orthogonality_error": err,
                 "distance_from_start": float((u - torch.eye(u.shape[0], dtype=u.dtype)).norm()),
                 "seconds": round(time.perf_counter() - start, 2)}
        decisions = {"dim": stream.dim, "steps": cfg.steps, "lr": cfg.lr, "batch_size": cfg.batch_size,
                     "seed": cfg.seed, "weights": cfg.weights, "mean_preserving": mean_preserving,
                     "params": sorted(p.target for p in params)}
        return PassResult(modified=True, stats=stats, plan=Plan(self.name, decisions=decisions))

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


def _values(gm: GraphModule, params: list[_Param], u: torch.Tensor, bases: dict) -> dict[str, torch.Tensor]:
    return {p.target: _act(bases[p.target], p.side, u) for p in params}


def _learn(gm: GraphModule, d: int, params: list[_Param], wqs: list[_WeightQ], samples: list[torch.Tensor],
           cfg: SpinQuantConfig, mean_preserving: bool, *, live_weights: bool,
           progress: bool) -> tuple[torch.Tensor, list[float], dict]:
    """U (float64) after cfg.steps Cayley SGD steps, the batch loss of every step (before its update), and the
    mean loss over every calibration sample before and after learning."""
    u = torch.eye(d, dtype=torch.float64)
    history: list[float] = []
    capped = 0
    if cfg.steps == 0:
        return u, history, {}
    bases = {p.target: _tensor(gm, p.target).detach().float() for p in params}
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
            before = _mean([float(_loss(gm, params, wqs, bases, u.float(), ids, live_weights)) for ids in samples])
        bar = tqdm(range(cfg.steps), desc="spinquant", disable=not progress, leave=False)
        for step in bar:
            batch = order[step]
            uf = u.float().requires_grad_(True)
            total = 0.0
            for i in batch:
                loss = _loss(gm, params, wqs, bases, uf, samples[i], live_weights)
                (loss / len(batch)).backward()
                total += float(loss.detach()) / len(batch)
            history.append(total)
            g = uf.grad.double()
            w = 0.5 * (g @ u.T - u @ g.T)
            if mean_preserving:
                w = proj @ w @ proj
            lr_t = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
            norm1 = float(w.abs().sum(0).max())
            tau = min(lr_t, 1.0 / norm1) if norm1 > 0 else 0.0
            capped += tau < lr_t
            eye = torch.eye(d, dtype=torch.float64)
            u = torch.linalg.solve(eye + tau / 2 * w, (eye - tau / 2 * w) @ u)
            bar.set_postfix(loss=f"{total:.4f}")
        with torch.no_grad():
            after = _mean([float(_loss(gm, params, wqs, bases, u.float(), ids, live_weights)) for ids in samples])
    finally:
        for h in hooks:
            h()
        for name, p in gm.named_parameters():
            p.requires_grad_(saved[name])
    return u, history, {"calib_loss_start": before, "calib_loss_end": after, "steps_capped": capped}


def _loss(gm: GraphModule, params: list[_Param], wqs: list[_WeightQ], bases: dict, u: torch.Tensor,
          ids: torch.Tensor, live_weights: bool) -> torch.Tensor:
    """Next-token cross-entropy of the graph on `ids` with the stream's parameters rotated by `u`."""
    vals = _values(gm, params, u, bases)
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
def _bake(gm: GraphModule, params: list[_Param], wqs: list[_WeightQ], u: torch.Tensor) -> None:
    """Multiply U into the stream's parameters (float64) and choose the weight quantizers' scales again."""
    for p in params:
        t = _tensor(gm, p.target)
        t.copy_(_act(t.detach().double(), p.side, u).to(t.dtype))
    for wq in wqs:
        x = _quantizer_input(wq.q, wq.site, param_of(gm, wq.site.weight).detach())
        s, z = _qparams(x.float(), wq.q, wq.mode)
        scale = param_of(gm, wq.q.scale)
        scale.copy_(s.to(scale.dtype))
        if wq.q.zero_point is not None:
            zp = param_of(gm, wq.q.zero_point)
            zp.copy_(z.to(zp.dtype))


__all__ = ["SpinQuant", "SpinQuantConfig", "stream_params"]
