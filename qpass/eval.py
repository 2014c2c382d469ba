"""Evaluation: perplexity over non-overlapping windows, and FP-vs-quantized agreement.

Windowing (fixed, deterministic): the token stream is cut into consecutive windows of `window` tokens;
each window is scored on its own (no context carried over), predicting tokens 1..n-1 of the window from
their prefix. The last, shorter window is kept when it has at least 2 tokens. Perplexity is
``exp(total NLL / number of predicted tokens)``, so every window weighs by the tokens it predicts.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from . import tables
from .memory import PeakRss
from .calibration import logits_of
from .primitives.formats import get_format


def windows(ids: Sequence[int] | torch.Tensor, window: int) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows of `window` tokens; a last partial window of >= 2 tokens."""
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    out = [ids[i:i + window] for i in range(0, ids.numel(), window)]
    return [w for w in out if w.numel() >= 2]


@dataclass
class Perplexity:
    perplexity: float
    nll: float          # total negative log-likelihood (nats)
    tokens: int         # predicted tokens

    def __float__(self):
        return self.perplexity


@torch.no_grad()
def perplexity(model: Callable, ids, window: int = 256, *, progress: bool = False) -> Perplexity:
    """Perplexity of `model` (anything called as model(input_ids) returning logits or `.logits`)."""
    total, count = 0.0, 0
    for w in tqdm(windows(ids, window), desc="perplexity", disable=not progress, leave=False):
        logits = logits_of(model(w.unsqueeze(0)))[0, :-1].float()
        total += float(F.cross_entropy(logits, w[1:], reduction="sum"))
        count += w.numel() - 1
    if count == 0:
        raise ValueError("no tokens to score: the text is shorter than 2 tokens")
    return Perplexity(math.exp(total / count), total, count)


@torch.no_grad()
def compare(reference: Callable, candidate: Callable, ids, window: int = 256) -> dict:
    """Mean KL(reference || candidate) per token, top-1 agreement and max |Δlogits| over the windows."""
    kl, agree, n, max_diff = 0.0, 0, 0, 0.0
    for w in windows(ids, window):
        a = logits_of(reference(w.unsqueeze(0)))[0].float()
        b = logits_of(candidate(w.unsqueeze(0)))[0].float()
        la, lb = F.log_softmax(a, -1), F.log_softmax(b, -1)
        kl += float((la.exp() * (la - lb)).sum())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += w.numel()
        max_diff = max(max_diff, float((a - b).abs().max()))
    return {"kl": kl / n, "top1_agreement": agree / n, "max_abs_logit_diff": max_diff, "tokens": n}


def weight_bytes(model) -> dict:
    """Storage of the linear-layer weights as a packed backend holds them: quantized weights at their
    format's bits (codes packed), one fp16 scale per block and zero points at the code width; unquantized
    weights at their dtype's size, LoRC branches (passes/lorc.py) at theirs. `model`: a QuantizedModel, a captured
    GraphModule or an HF model."""
    from torch.fx import GraphModule

    from .capture import capture
    from .graph import linear_sites, param_of
    from .quantizer import Quantizer

    gm = getattr(model, "graph_module", model)
    if not isinstance(gm, GraphModule):
        gm = capture(model)
    total, numel, q_total, q_numel = 0.0, 0, 0.0, 0
    for site in linear_sites(gm):
        w = param_of(gm, site.weight)
        numel += w.numel()
        fq = Quantizer.of(site.weight_use)
        if fq is None:
            total += w.numel() * w.element_size()
            continue
        size = quantizer_bytes(gm, fq, w.numel())
        total, q_total, q_numel = total + size, q_total + size, q_numel + w.numel()
    # MoE experts (qpass.experts): each stacked [experts, out, in] weight counts like the linears it stands for
    from .experts import expert_sites
    from .experts import weight_quantizer as expert_weight_quantizer

    for site in expert_sites(gm):
        w = param_of(gm, site.weight)
        numel += w.numel()
        fq = Quantizer.of(expert_weight_quantizer(site))
        if fq is None:
            total += w.numel() * w.element_size()
            continue
        size = quantizer_bytes(gm, fq, w.numel())
        total, q_total, q_numel = total + size, q_total + size, q_numel + w.numel()
    # LoRC's low-rank branches (passes/lorc.py): stored beside the quantized weights they compensate, at their
    # dtype's width, so they count in both totals (over the same weights)
    for names in gm.meta.get("qpass_lorc", {}).values():
        size = sum(_tensor(gm, n).numel() * _tensor(gm, n).element_size() for n in names)
        total, q_total = total + size, q_total + size
    # bits_per_weight: over every linear (a float lm_head counts at its dtype's width);
    # quantized_bits_per_weight: over the quantized linears only (None when none is)
    return {"linear_weight_bytes": int(round(total)), "linear_weights": numel,
            "bits_per_weight": 8 * total / max(numel, 1),
            "quantized_bits_per_weight": 8 * q_total / q_numel if q_numel else None}


def _tensor(gm, target: str):
    """A buffer or a parameter (QAT's learnable scales are parameters)."""
    try:
        return gm.get_buffer(target)
    except AttributeError:
        return gm.get_parameter(target)


def quantizer_bytes(gm, fq, numel: int) -> float:
    """Bytes of one weight quantizer's storage for a weight of `numel` elements, packed: codes at the format's
    bits (every element, as the OWQ and SpQR kernels store the dense low-bit matrix), one fp16 scale per block
    (or, with second-level scales, the scales at their format's bits plus their fp16 scales and 16-bit zero
    points), zero points at the code width, a learned table at fp16 per stored value (``fmt.table_values`` per
    block: 2^b for a codebook, the q α's and z for BCQ, whose scale is the constant 1 and not stored), and side
    channels: sparse values at fp16 plus an int32 flat index each, float columns at fp16 per element plus an int32
    index per column."""
    buf = lambda n: _tensor(gm, n.target) if n is not None else None   # noqa: E731
    bits = fq.meta.spec.bits
    scales = buf(fq.scale).numel()
    side = fq.side_channels
    scale_bits = 16 if side.scale_q is None else get_format(side.scale_q.fmt).bits
    if not getattr(fq.fmt, "stores_scale", True):    # a constant scale (BCQ: α and z are the table's storage)
        scale_bits = 0
    size = numel * bits / 8 + scales * scale_bits / 8 + (scales * bits / 8 if fq.zero_point is not None else 0)
    if side.scale_q is not None:
        size += 2 * buf(side.scale_q.scale).numel()
        if side.scale_q.zero_point is not None:
            size += 2 * buf(side.scale_q.zero_point).numel()
    if fq.codebook is not None:
        size += 2 * scales * getattr(fq.fmt, "table_values", fq.fmt.table_size)   # fp16 per stored table value
    if side.outliers is not None:
        size += 6 * buf(side.outliers.index).numel()
    if side.float_columns is not None:
        cols = buf(side.float_columns.index).numel()
        rows = numel // fq.x.meta["val"].shape[side.float_columns.axis]      # elements per column
        size += cols * (2 * rows + 4)
    return size


def evaluate(model, recipes: list, eval_ids, calib_ids, *, window: int = 256, calib_samples: int = 32,
             progress: bool = True) -> list[dict]:
    """One row for FP and one per recipe (a path, dict or Recipe), all on the same eval windows and the
    same calibration windows (consecutive full `window`-token windows of `calib_ids`). The FP logits are
    computed once; each quantized model runs each window once (perplexity, KL and top-1 together)."""
    from ._api import apply

    calib = [w.unsqueeze(0) for w in calib_ids.split(window) if w.numel() == window][:calib_samples]
    wins = windows(eval_ids, window)
    ref = _log_probs(model, wins, "FP32 reference", progress)
    rows = [{"name": "FP32", **_scores(ref, ref, wins), **weight_bytes(model), "seconds": 0.0}]
    for path in recipes:
        name = os.path.basename(path) if isinstance(path, (str, os.PathLike)) else f"recipe {len(rows)}"
        t0 = time.perf_counter()
        with PeakRss() as peak:
            qm = apply(model, path, calib_data=calib, progress=progress)
        seconds = time.perf_counter() - t0
        out = _log_probs(qm, wins, f"evaluating {name}", progress)
        rows.append({"name": name, "recipe": str(path), **_scores(ref, out, wins), **weight_bytes(qm),
                     "seconds": seconds, "peak_rss": peak.bytes})
    return rows


def evaluate_lowered(lowered: Callable, eval_ids, *, reference: Callable | None = None, window: int = 256,
                     name: str = "lowered", progress: bool = True) -> list[dict]:
    """Rows for a model that is only run, not built here (a lowered ONNX model in onnxruntime: anything called as
    lowered(input_ids) returning logits or `.logits`), on the windows `evaluate` uses: the FP32 row when
    `reference` (the float model it was lowered from) is given, then the lowered model's, with KL(FP‖Q) and top-1
    agreement against the reference. Without a reference only the perplexity is scored (kl and top1_agreement
    None). Weight bytes are counted on qpass graphs only, so the lowered row has none."""
    wins = windows(eval_ids, window)
    out = _log_probs(lowered, wins, f"evaluating {name}", progress)
    if reference is None:
        return [{"name": name, **_scores(out, out, wins), "kl": None, "top1_agreement": None}]
    ref = _log_probs(reference, wins, "FP32 reference", progress)
    if ref[0].shape != out[0].shape:
        raise ValueError(f"the lowered model gives logits of shape {tuple(out[0].shape)} on a window, the reference "
                         f"{tuple(ref[0].shape)}: not the model it was lowered from")
    return [{"name": "FP32", **_scores(ref, ref, wins), **weight_bytes(reference), "seconds": 0.0},
            {"name": name, **_scores(ref, out, wins)}]


@torch.no_grad()
def _log_probs(model: Callable, wins: list[torch.Tensor], desc: str, progress: bool) -> list[torch.Tensor]:
    """The model's log-probabilities on each eval window (one call per window, fp32)."""
    return [F.log_softmax(logits_of(model(w.unsqueeze(0)))[0].float(), -1)
            for w in tqdm(wins, desc=desc, disable=not progress, leave=False)]


def _scores(ref: list[torch.Tensor], out: list[torch.Tensor], wins: list[torch.Tensor]) -> dict:
    """Perplexity of `out` and its agreement with `ref` (lists of per-window log-probabilities)."""
    nll, n_pred, kl, agree, n = 0.0, 0, 0.0, 0, 0
    for r, o, w in zip(ref, out, wins):
        nll += float(-o[:-1].gather(-1, w[1:, None]).sum())
        n_pred += w.numel() - 1
        kl += float((r.exp() * (r - o)).sum())
        agree += int((r.argmax(-1) == o.argmax(-1)).sum())
        n += w.numel()
    return {"perplexity": math.exp(nll / n_pred), "kl": kl / n, "top1_agreement": agree / n}


def markdown(rows: list[dict]) -> str:
    """The results table. Rows from `evaluate` also get the time `apply` took and the process's peak resident
    memory while it ran (the FP model and its reference log-probabilities included: compare rows, not absolutes)."""
    # all linears: lm_head included, a float one (ignore: [lm_head]) at its dtype's width
    head = ["recipe", "perplexity", "KL(FP‖Q)/token", "top-1 agreement", "linear weight bytes",
            "bits/weight, all linears", "bits/weight, quantized linears"]
    timed = any("peak_rss" in r for r in rows)
    if timed:
        head += ["apply time (s)", "peak RSS while applying (GB)"]
    body = []

    def cell(r: dict, key: str, fmt: str) -> str:      # "–": not measured (a lowered model's weight bytes, ...)
        return "–" if r.get(key) is None else format(r[key], fmt)
    for r in rows:
        top1 = r.get("top1_agreement")
        line = [r["name"], f"{r['perplexity']:.3f}", cell(r, "kl", ".5f"),
                "–" if top1 is None else f"{100 * top1:.2f}%", cell(r, "linear_weight_bytes", ","),
                cell(r, "bits_per_weight", ".2f"), cell(r, "quantized_bits_per_weight", ".2f")]
        if timed:
            peak = r.get("peak_rss")
            line += ["–" if "peak_rss" not in r else f"{r['seconds']:.1f}",
                     "–" if peak is None else f"{peak / 1e9:.2f}"]
        body.append(line)
    return tables.markdown(head, body)
