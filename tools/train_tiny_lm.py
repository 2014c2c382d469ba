#!/usr/bin/env python3
"""Train qpass's bundled tiny language models (a real LM, so quantization error is meaningful).

Two models ship in the repository (see ``models/README.md``, the model card):

* ``models/tiny-llama`` — ``LlamaForCausalLM`` (RMSNorm, SwiGLU, RoPE, grouped-query attention,
  untied lm_head) trained on five Jane Austen novels; held out: *Persuasion*.
* ``models/tiny-opt``   — ``OPTForCausalLM`` (pre-LayerNorm with biases, learned positions, ReLU
  FFN, lm_head tied to the embedding as in real OPT) trained on Melville's *Moby-Dick*; held out:
  a contiguous block of chapters.

Data
----
Both texts are public domain (Project Gutenberg) and come from Debian packages, located or fetched
by ``tools/prepare_corpus.py`` (``apt-get update`` once; then the script uses the installed package
or runs ``apt-get download``): ``r-cran-janeaustenr`` 1.0.0-1 (corpus ``austen``) and
``r-cran-tokenizers`` 0.3.0-1 (corpus ``mobydick``).  ``data/<corpus>/eval.txt`` (held-out) and
``data/<corpus>/calib.txt`` (slice of the training split) are committed; ``train.txt`` is
regenerated on demand.

Pipeline (all deterministic; seed ``--seed``, default 0)
--------------------------------------------------------
1. Byte-level BPE tokenizer (``tokenizers``), trained on the TRAINING split only; special token
   ``<|endoftext|>`` (id 0, used as bos/eos/pad; never inserted into the training stream).
2. The training split is tokenized into one stream of ids (paragraphs joined by ``\\n``).
3. Batches: every epoch the stream is cut into windows of ``seq_len + 1`` tokens at a
   seeded random offset; windows are visited in a seeded random permutation.
4. AdamW (betas 0.9/0.95, weight decay on matrices only), linear warm-up then cosine decay to
   ``--min-lr-ratio`` x peak; gradient clipping at 1.0; fp32 on CPU, ``torch.set_num_threads``
   (default 1), ``torch.use_deterministic_algorithms(True)``.
5. Saved with ``save_pretrained`` in fp16 (``model.safetensors``) plus the tokenizer files.

Held-out perplexity (``heldout_perplexity``)
---------------------------------------------
eval.txt is tokenized as one string without special tokens; the ids are cut into consecutive
NON-overlapping windows of 256 tokens (the last window may be shorter).  Each window is scored
independently, from an empty context: the model predicts tokens 2..n of the window from the
preceding tokens of the same window, so a window of n tokens contributes n-1 predictions (the
first token of each window is not scored).  ppl = exp(sum of all NLLs / total number of
predictions) — i.e. every window, the short last one included, is weighted by its number of
predicted tokens.  The reported numbers use the shipped fp16 weights loaded back from disk and
evaluated in fp32.

Exact commands of the shipped models (CPU, 1 thread, seed 0; run from the repository root after
``apt-get update``; ``data/<corpus>/train.txt`` is generated on the fly if missing)::

    nice -n 10 .venv/bin/python tools/train_tiny_lm.py --arch llama --corpus austen \\
      --out models/tiny-llama --vocab-size 4096 --hidden 256 --layers 6 --heads 8 --kv-heads 2 \\
      --intermediate 704 --seq-len 256 --batch-size 8 --steps 1400 --warmup-steps 50 --lr 2e-3 \\
      --seed 0 --eval-every 100
    # -> 6,327,552 params, 2,867,200 tokens, 2,542 s; held-out ppl 87.13 (fp16 weights)

    nice -n 10 .venv/bin/python tools/train_tiny_lm.py --arch opt --corpus mobydick \\
      --out models/tiny-opt --vocab-size 4096 --hidden 192 --layers 4 --heads 6 \\
      --intermediate 768 --dropout 0.0 --seq-len 256 --batch-size 8 --steps 500 --warmup-steps 30 \\
      --lr 4e-3 --seed 0 --eval-every 100
    # -> 2,615,808 params, 1,024,000 tokens, 823 s; held-out ppl 257.92 (fp16 weights)

Licences: the texts are public domain (Project Gutenberg); the Debian/CRAN packages' code is MIT.
Same command, same torch version, same CPU kind -> bit-identical weights
(``tests/test_train_tiny_lm.py`` checks this on a tiny configuration).  Model card:
``models/README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

EOT = "<|endoftext|>"


def _set_threads(n: int) -> None:
    # Must happen before tokenizers/torch spin up their pools.
    os.environ.setdefault("RAYON_NUM_THREADS", str(n))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    os.environ.setdefault("MKL_NUM_THREADS", str(n))


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
def train_tokenizer(train_text: str, vocab_size: int):
    """Byte-level BPE trained on ``train_text``; returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = train_text.splitlines(keepends=True)
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=EOT,
        model_max_length=None,
    )
    return fast


def encode(tokenizer, text: str) -> list[int]:
    """Ids of ``text`` (no special tokens).  Paragraph-wise encoding == whole-string encoding
    for byte-level BPE because the pre-tokenizer splits before every newline run."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
def build_config(args, vocab_size: int, eot_id: int):
    from transformers import LlamaConfig, OPTConfig

    if args.arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            hidden_act="silu",
            max_position_embeddings=args.max_positions,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False,
            attention_dropout=0.0,
            initializer_range=0.02,
            bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id,
        )
    if args.arch == "opt":
        return OPTConfig(
            vocab_size=vocab_size,
            hidden_size=args.hidden,
            ffn_dim=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            max_position_embeddings=args.max_positions,
            word_embed_proj_dim=args.hidden,
            do_layer_norm_before=True,
            activation_function="relu",
            dropout=args.dropout,
            attention_dropout=0.0,
            enable_bias=True,
            tie_word_embeddings=True,
            init_std=0.02,
            bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id,
        )
    raise ValueError(args.arch)


def build_model(config):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                             dtype=torch.float32)
    return model


def count_params(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
def heldout_nll(model, ids, window: int = 256, batch_size: int = 8, max_windows: int | None = None):
    """Sum of NLL and number of predicted tokens over non-overlapping ``window``-token windows.

    See the module docstring for the exact definition.  ``max_windows`` limits the evaluation to
    the first windows (used for the cheap periodic logging during training)."""
    import torch
    import torch.nn.functional as F

    ids = torch.as_tensor(ids, dtype=torch.long)
    chunks = list(torch.split(ids, window))
    if max_windows is not None:
        chunks = chunks[:max_windows]
    total_nll, total_n = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(chunks), batch_size):
            group = chunks[i : i + batch_size]
            full = [c for c in group if len(c) == window]
            rest = [c for c in group if len(c) != window]
            batches = ([torch.stack(full)] if full else []) + [c[None] for c in rest]
            for x in batches:
                if x.shape[1] < 2:
                    continue
                logits = model(input_ids=x).logits.float()
                nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                      x[:, 1:].reshape(-1), reduction="sum")
                total_nll += float(nll)
                total_n += x[:, 1:].numel()
    if was_training:
        model.train()
    return total_nll, total_n


def heldout_perplexity(model, tokenizer, text: str, window: int = 256) -> dict:
    ids = encode(tokenizer, text)
    nll, n = heldout_nll(model, ids, window)
    return {"ppl": math.exp(nll / n), "loss": nll / n, "eval_tokens": len(ids),
            "predicted_tokens": n, "windows": math.ceil(len(ids) / window), "window": window}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def lr_at(step: int, total: int, warmup: int, peak: float, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class WindowSampler:
    """Deterministic stream of (seq_len+1)-token windows: per epoch a seeded random offset,
    then all full windows in a seeded random permutation."""

    def __init__(self, ids, seq_len: int, seed: int):
        import torch

        self.ids = torch.as_tensor(ids, dtype=torch.long)
        self.L = seq_len + 1
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self._queue = []

    def _refill(self):
        import torch

        offset = int(torch.randint(0, self.L, (1,), generator=self.gen))
        n = (len(self.ids) - offset) // self.L
        starts = offset + torch.arange(n) * self.L
        perm = torch.randperm(n, generator=self.gen)
        self._queue = starts[perm].tolist()
        self.epoch += 1

    def next_batch(self, batch_size: int):
        import torch

        rows = []
        for _ in range(batch_size):
            if not self._queue:
                self._refill()
            s = self._queue.pop()
            rows.append(self.ids[s : s + self.L])
        return torch.stack(rows)


def load_corpus(args):
    train_file = Path(args.train_file) if args.train_file else REPO / "data" / args.corpus / "train.txt"
    eval_file = Path(args.eval_file) if args.eval_file else REPO / "data" / args.corpus / "eval.txt"
    if not train_file.exists() and not args.train_file:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from prepare_corpus import prepare

        print(f"[train] {train_file} missing: running prepare_corpus {args.corpus}", flush=True)
        prepare(args.corpus)
    return train_file.read_text(encoding="utf-8"), eval_file.read_text(encoding="utf-8")


def train(args) -> dict:
    """Run the whole pipeline; restores torch's thread count / determinism flag afterwards so
    that an in-process call (tests) leaves the interpreter as it found it."""
    _set_threads(args.threads)
    import torch

    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(args)
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)


def _train(args) -> dict:
    import torch
    from tqdm import tqdm

    torch.manual_seed(args.seed)

    t0 = time.time()
    train_text, eval_text = load_corpus(args)
    tokenizer = train_tokenizer(train_text, args.vocab_size)
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    train_ids = encode(tokenizer, train_text)
    eval_ids = encode(tokenizer, eval_text)
    t_tok = time.time() - t0
    print(f"[train] tokenizer: vocab {len(tokenizer)}; train tokens {len(train_ids):,}; "
          f"eval tokens {len(eval_ids):,}; {t_tok:.1f}s", flush=True)

    tokenizer.model_max_length = args.max_positions
    config = build_config(args, len(tokenizer), eot_id)
    torch.manual_seed(args.seed)
    model = build_model(config)
    model.train()
    n_params = count_params(model)
    print(f"[train] {type(model).__name__}: {n_params:,} parameters", flush=True)

    tokens_per_step = args.batch_size * args.seq_len
    if args.steps:
        total_steps = args.steps
    elif args.max_tokens:
        total_steps = max(1, args.max_tokens // tokens_per_step)
    else:
        raise SystemExit("give --steps or --max-tokens")
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, int(0.03 * total_steps))

    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, foreach=False,
    )
    sampler = WindowSampler(train_ids, args.seq_len, args.seed)
    eval_window = min(args.eval_window, args.max_positions)
    log = []
    t_train = time.time()
    pbar = tqdm(range(total_steps), desc="train", mininterval=args.progress_interval,
                file=sys.stdout, dynamic_ncols=False, ncols=100)
    ema = None
    for step in pbar:
        lr = lr_at(step, total_steps, warmup, args.lr, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = sampler.next_batch(args.batch_size)
        out = model(input_ids=batch[:, :-1], labels=None)
        loss = torch.nn.functional.cross_entropy(
            out.logits.reshape(-1, out.logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        lv = loss.item()
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        pbar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.2e}", ep=sampler.epoch, refresh=False)
        last = step == total_steps - 1
        if (args.eval_every and (step + 1) % args.eval_every == 0) or last:
            nll, n = heldout_nll(model, eval_ids, eval_window,
                                 max_windows=None if last else args.eval_windows)
            rec = {"step": step + 1, "tokens": (step + 1) * tokens_per_step,
                   "train_loss_ema": round(ema, 4), "eval_loss": round(nll / n, 4),
                   "eval_ppl": round(math.exp(nll / n), 3), "lr": lr, "grad_norm": round(float(gnorm), 3),
                   "epoch": sampler.epoch, "elapsed_s": round(time.time() - t_train, 1),
                   "eval_windows": "all" if last else args.eval_windows}
            log.append(rec)
            tqdm.write(f"[eval] step {rec['step']} tokens {rec['tokens']:,} train {ema:.4f} "
                       f"held-out {rec['eval_loss']:.4f} (ppl {rec['eval_ppl']:.2f}) "
                       f"epoch {sampler.epoch} {rec['elapsed_s']}s", file=sys.stdout)
            sys.stdout.flush()
    pbar.close()
    train_s = time.time() - t_train

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.half()
    model.config.use_cache = True
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)

    # Reload the shipped fp16 weights and evaluate in fp32.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    re_model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    re_tok = AutoTokenizer.from_pretrained(out_dir)
    final = heldout_perplexity(re_model, re_tok, eval_text, window=eval_window)
    summary = {
        "arch": type(model).__name__,
        "parameters": n_params,
        "vocab_size": len(tokenizer),
        "train_tokens_available": len(train_ids),
        "steps": total_steps,
        "tokens_per_step": tokens_per_step,
        "tokens_seen": total_steps * tokens_per_step,
        "epochs": round(total_steps * tokens_per_step / len(train_ids), 3),
        "train_wall_s": round(train_s, 1),
        "tokens_per_s": round(total_steps * tokens_per_step / train_s, 1),
        "heldout_fp16": final,
        "torch": torch.__version__,
    }
    if not args.train_file and not args.eval_file:
        # Pointer used by qpass's tools (tools/eval.py, ...) to find the model's data.
        (out_dir / "qpass_data.json").write_text(json.dumps(
            {"eval": f"data/{args.corpus}/eval.txt", "calib": f"data/{args.corpus}/calib.txt"}) + "\n")
    cli = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (out_dir / "training_args.json").write_text(json.dumps(cli, indent=2) + "\n")
    (out_dir / "training_log.json").write_text(
        json.dumps({"summary": summary, "log": log}, indent=2) + "\n")
    print(f"[train] done: {json.dumps(summary)}", flush=True)
    return summary


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Train a tiny Llama/OPT causal LM (see docstring).")
    ap.add_argument("--arch", choices=["llama", "opt"], default="llama")
    ap.add_argument("--corpus", default="austen", help="data/<corpus>/{train,eval}.txt")
    ap.add_argument("--train-file", default=None, help="override the training text")
    ap.add_argument("--eval-file", default=None, help="override the held-out text")
    ap.add_argument("--out", required=True, help="output directory (HF format)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2, help="llama only (GQA)")
    ap.add_argument("--intermediate", type=int, default=704, help="MLP/FFN width")
    ap.add_argument("--max-positions", type=int, default=None,
                    help="max_position_embeddings (default: llama 2048 (RoPE), opt = --seq-len)")
    ap.add_argument("--dropout", type=float, default=0.0, help="opt only")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="token budget; steps = max_tokens // (batch_size * seq_len)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=None, help="default: 3%% of steps")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-window", type=int, default=256,
                    help="held-out window length (clipped to --max-positions)")
    ap.add_argument("--eval-windows", type=int, default=64,
                    help="windows used by the periodic (not the final) held-out evaluation")
    ap.add_argument("--progress-interval", type=float, default=30.0, help="tqdm mininterval (s)")
    args = ap.parse_args(argv)
    if args.max_positions is None:
        args.max_positions = 2048 if args.arch == "llama" else args.seq_len
    return args


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
