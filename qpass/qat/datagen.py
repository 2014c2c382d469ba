"""Data-free training data (LLM-QAT §2.1): the full-precision model writes its own training text.

For each start token (all of the vocabulary, or a seeded random subset), and for each greedy length j in
``greedy_lengths`` (paper: 3, 4, 5), the sequence is the start token, then greedy (top-1) tokens up to total
length j, then sampled tokens (temperature 1, top-k 50) up to ``seq_len``. Sequences are generated in
batches with an incremental KV cache and cached to disk as safetensors (``ids`` [n, seq_len] int32 plus
the settings that made them); a cache made with the same settings is reused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass

import safetensors.torch
import torch
from tqdm.auto import tqdm

from ..errors import CalibrationError
from ..generate import generate
from ..hf import cache_kwargs

log = logging.getLogger("qpass.qat.datagen")


@dataclass(frozen=True)
class GenerationSettings:
    samples: int = 512
    seq_len: int = 256
    greedy_lengths: tuple[int, ...] = (3, 4, 5)
    temperature: float = 1.0
    top_k: int = 50
    batch_size: int = 32
    seed: int = 0

    def key(self, vocab: int, model_id: str) -> str:
        text = json.dumps({**asdict(self), "vocab": vocab, "model": model_id}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def hf_step(model):
    """A ``step(input_ids, cache_position) -> logits`` over an eager HF model with a DynamicCache (the
    cache is reset whenever a step starts again at position 0)."""
    from transformers import DynamicCache

    state = {}

    def step(ids, pos):
        if int(pos[0]) == 0:
            state["cache"] = DynamicCache(config=model.config)
        return model(input_ids=ids, **cache_kwargs(model, state["cache"]), use_cache=True).logits

    return step


def start_tokens(vocab: int, n: int, seed: int) -> torch.Tensor:
    """`n` distinct start tokens drawn from the vocabulary (all of it, in a seeded order, when n >= vocab)."""
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))
    return perm[: min(n, vocab)]


@torch.no_grad()
def generate_data(model, settings: GenerationSettings, *, cache_dir: str | None = None, model_id: str = "",
                  progress: bool = True) -> torch.Tensor:
    """[samples, seq_len] token ids written by `model` (an HF causal LM) itself."""
    vocab = int(model.config.vocab_size)
    path = None
    if cache_dir:
        path = os.path.join(cache_dir, f"generated-{settings.key(vocab, model_id)}.safetensors")
        if os.path.isfile(path):
            log.info("reusing generated data %s", path)
            return safetensors.torch.load_file(path)["ids"].long()
    per_start = len(settings.greedy_lengths)
    starts = start_tokens(vocab, -(-settings.samples // per_start), settings.seed)
    jobs = [(int(t), j) for t in starts for j in settings.greedy_lengths][: settings.samples]
    if len(jobs) < settings.samples:
        raise CalibrationError(f"asked for {settings.samples} generated samples but the vocabulary ({vocab}) "
                               f"x greedy lengths {settings.greedy_lengths} gives only {len(jobs)}",
                               fix="lower samples or add greedy lengths")
    step, out = hf_step(model.eval()), []
    bar = tqdm(total=len(jobs), desc="generating data (FP model)", disable=not progress, leave=False)
    for j in settings.greedy_lengths:   # same greedy length -> one batch shape
        group = [t for t, jj in jobs if jj == j]
        for b in range(0, len(group), settings.batch_size):
            chunk = torch.tensor(group[b:b + settings.batch_size]).unsqueeze(1)
            seq = generate(step, chunk, settings.seq_len - 1, do_sample=True, temperature=settings.temperature,
                           top_k=settings.top_k, greedy_steps=j - 1,
                           seed=settings.seed * 1_000_003 + j * 10_007 + b)
            out.append(seq)
            bar.update(len(chunk))
    bar.close()
    ids = torch.cat(out)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + ".tmp"
        safetensors.torch.save_file({"ids": ids.to(torch.int32)}, tmp,
                                    metadata={"settings": json.dumps(asdict(settings)), "model": model_id})
        os.replace(tmp, path)
    return ids


def text_data(tokenizer, path: str, samples: int, seq_len: int) -> torch.Tensor:
    """Real text alternative: consecutive `seq_len`-token windows of a text file."""
    if not os.path.isfile(path):
        raise CalibrationError(f"training text {path!r} does not exist", fix="give an existing text file path")
    with open(path, encoding="utf-8") as f:
        ids = torch.tensor(tokenizer(f.read())["input_ids"], dtype=torch.long)
    n = ids.numel() // seq_len
    if n == 0:
        raise CalibrationError(f"{path!r} has {ids.numel()} tokens, fewer than one window of {seq_len}",
                               fix="use a longer text or a shorter seq_len")
    return ids[: n * seq_len].view(n, seq_len)[:samples]
