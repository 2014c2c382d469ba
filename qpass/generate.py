"""Token generation over a step function with a KV cache: ``step(input_ids, cache_position) -> logits``.

One loop serves the fake-quant decode graph, the packed torch backend and anything else that exposes a
prefill/decode step. Greedy by default; sampling with temperature and top-k; ``greedy_steps`` takes the
first N new tokens greedily and samples the rest (LLM-QAT's data generation scheme).
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def next_token(logits: torch.Tensor, *, sample: bool, temperature: float, top_k: int | None,
               generator: torch.Generator | None) -> torch.Tensor:
    """[batch, vocab] logits -> [batch, 1] token ids."""
    if not sample:
        return logits.argmax(-1, keepdim=True)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], input_ids: torch.Tensor,
             max_new_tokens: int, *, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             greedy_steps: int = 0, seed: int | None = None, eos_token_id: int | None = None) -> torch.Tensor:
    """Prefill `input_ids` [batch, T] in one step, then decode one token at a time; returns
    [batch, T + new] (stops early when every row has produced `eos_token_id`)."""
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    t = input_ids.shape[1]
    logits = step(input_ids, torch.arange(t))
    out, done = [input_ids], torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for i in range(max_new_tokens):
        tok = next_token(logits[:, -1], sample=do_sample and i >= greedy_steps, temperature=temperature,
                         top_k=top_k, generator=generator)
        out.append(tok)
        if eos_token_id is not None:
            done |= tok[:, 0] == eos_token_id
            if bool(done.all()):
                break
        if i + 1 < max_new_tokens:
            logits = step(tok, torch.tensor([t + i]))
    return torch.cat(out, dim=1)


def generate_cached(decode_graph: Callable[[int, int], Callable], input_ids: torch.Tensor, max_new_tokens: int,
                    *, max_cache_len: int | None = None, **kwargs) -> torch.Tensor:
    """`generate` over a static-cache step graph ``decode_graph(max_cache_len, batch_size)`` (called as
    ``step(input_ids=..., cache_position=...)``), with a cache length rounded up to a multiple of 64."""
    input_ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    need = input_ids.shape[1] + max_new_tokens
    step = decode_graph(max_cache_len or max(64, -(-need // 64) * 64), input_ids.shape[0])
    return generate(lambda ids, pos: step(input_ids=ids, cache_position=pos), input_ids, max_new_tokens, **kwargs)
