"""Evaluation: perplexity over non-overlapping windows, and FP-vs-quantized agreement.

Windowing (fixed, deterministic): the token stream is cut into consecutive windows of `window` tokens;
each window is scored on its own (no context carried over), predicting tokens 1..n-1 of the window from
their prefix. The last, shorter window is kept when it has at least 2 tokens. Perplexity is
``exp(total NLL / number of predicted tokens)``, so every window weighs by the tokens it predicts.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from .calibration import logits_of


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
