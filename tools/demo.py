"""`make demo`: quantize a model with a recipe, show what the passes changed and how close it stays to FP.

Uses the bundled trained model (models/tiny-llama) and its held-out text when present; otherwise a small
random Llama config (then only logit differences are meaningful, not perplexity).

    python tools/demo.py [--recipe recipes/w8a8.yaml] [--model models/tiny-llama]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import qpass  # noqa: E402
from qpass.eval import compare, perplexity  # noqa: E402

BUNDLED = os.path.join(ROOT, "models", "tiny-llama")
PRESETS = ["w16.yaml", "w8a16.yaml", "w8a8.yaml", "w8a8_static.yaml", "w4a16_g128.yaml"]


def load_model(path: str | None):
    import transformers

    if path and os.path.isdir(path):
        tok = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return model, tok
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval(), None


def texts(model_dir: str, tok):
    """Held-out and calibration token ids named by the model card's data files, if any."""
    data = os.path.join(model_dir or "", "qpass_data.txt")
    if tok is None or not os.path.isfile(data):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 512, (4096,), generator=g)
        return ids[:2048], ids[2048:]
    with open(data) as f:
        paths = dict(line.strip().split("=", 1) for line in f if "=" in line)
    read = lambda key: tok(open(os.path.join(ROOT, paths[key]), encoding="utf-8").read(),
                           return_tensors="pt").input_ids[0]
    return read("eval"), read("calib")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=BUNDLED if os.path.isdir(BUNDLED) else None)
    ap.add_argument("--recipe", default=os.path.join(ROOT, "recipes", "w8a8.yaml"))
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--max-eval-tokens", type=int, default=16384)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    model, tok = load_model(args.model)
    eval_ids, calib_ids = texts(args.model, tok)
    eval_ids = eval_ids[: args.max_eval_tokens]
    calib = [w.unsqueeze(0) for w in calib_ids[: 16 * args.window].split(args.window)]
    name = args.model or "random tiny Llama (no bundled model found)"
    print(f"model: {name}  ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters)")

    recipe = qpass.Recipe.from_yaml(args.recipe)
    print(f"\nrecipe {os.path.relpath(args.recipe, ROOT)}:\n{recipe.to_yaml()}")
    t0 = time.perf_counter()
    qm = qpass.apply(model, recipe, calib_data=calib)
    print(f"applied in {time.perf_counter() - t0:.1f}s; what each pass changed:\n{qm.report}\n")

    fp_ppl = perplexity(model, eval_ids, args.window)
    rows = [("FP32", f"{fp_ppl.perplexity:.3f}", "-", "-")]
    for preset in PRESETS:
        path = os.path.join(ROOT, "recipes", preset)
        q = qm if os.path.abspath(path) == os.path.abspath(args.recipe) else qpass.apply(
            model, path, calib_data=calib, progress=False)
        c = compare(model, q, eval_ids, args.window)
        rows.append((preset, f"{perplexity(q, eval_ids, args.window).perplexity:.3f}", f"{c['kl']:.5f}",
                     f"{100 * c['top1_agreement']:.2f}%"))
    what = "held-out perplexity" if tok is not None else "perplexity on random tokens (random model)"
    print(f"{what} over {eval_ids.numel()} tokens, windows of {args.window}:")
    head = ("recipe", "perplexity", "KL(FP||Q)/token", "top-1 agreement")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    for r in [head, tuple("-" * w for w in widths)] + rows:
        print("  ".join(s.ljust(w) for s, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
