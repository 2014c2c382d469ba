"""`make demo`: quantize the bundled model with a recipe, show what the passes changed, compare FP vs quantized,
and plot perplexity against bits per weight for the preset recipes.

    qpass demo [--recipe recipes/w8a8.yaml] [--model models/tiny-llama] [--out out/demo]

Uses the bundled trained model (models/tiny-llama) and its held-out text when present; otherwise a small
random Llama (then only the logit differences mean anything, not the perplexities). To stay short it scores
the first --max-eval-tokens held-out tokens, so its FP32 perplexity is not the one over the whole held-out
text that models/README.md reports (`qpass eval models/tiny-llama` gives that one).
"""
from __future__ import annotations

import logging
import os
import time

from ._common import data_files, default_path, display, load_model, load_tokenizer, note, read_recipe, say, token_ids
from .eval import BITS_NOTE

HELP = "quantize the bundled tiny model, show the report and an FP-vs-quantized table and plot"
PRESETS = ["w8a8.yaml", "w4a16_g128.yaml", "w4a16.yaml", "w3a16_g64.yaml"]


def add_arguments(ap) -> None:
    ap.add_argument("--model", default=default_path("models", "tiny-llama"), metavar="MODEL_DIR",
                    help="Hugging Face model directory with a tokenizer and qpass_data.json (default: the bundled "
                         "models/tiny-llama; a random tiny Llama when it is absent)")
    ap.add_argument("--recipe", default=default_path("recipes", "w8a8.yaml"), metavar="R.yaml",
                    help="recipe to apply and report on (default recipes/w8a8.yaml)")
    ap.add_argument("--out", default=os.path.join("out", "demo"), metavar="DIR",
                    help="where the plot goes (default out/demo)")
    ap.add_argument("--window", type=int, default=256, metavar="T", help="tokens per window (default 256)")
    ap.add_argument("--max-eval-tokens", type=int, default=4096, metavar="N",
                    help="score the first N held-out tokens (default 4096; the whole text takes ~10x longer)")


def load(path: str | None):
    """(model, eval ids, calib ids, description)."""
    import torch
    import transformers

    files = data_files(path) if path and os.path.isfile(os.path.join(path, "config.json")) else {}
    if {"eval", "calib"} <= set(files):
        tok = load_tokenizer(path, "the demo")
        return (load_model(path), token_ids(tok, files["eval"]), token_ids(tok, files["calib"]),
                f"{display(path)} (held-out {display(files['eval'])})")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    ids = torch.randint(0, 512, (6144,), generator=torch.Generator().manual_seed(0))
    return (transformers.AutoModelForCausalLM.from_config(cfg).eval(), ids[:2048], ids[2048:],
            "random tiny Llama (no bundled model found; perplexities are meaningless)")


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    fp = rows[0]
    ax.axhline(fp["perplexity"], color="gray", linestyle="--", label=f"FP32 ({fp['perplexity']:.2f})")
    for r in rows[1:]:
        ax.scatter(r["bits_per_weight"], r["perplexity"], s=36)
        ax.annotate(r["name"].removesuffix(".yaml"), (r["bits_per_weight"], r["perplexity"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("bits per weight, all linear layers incl. lm_head (codes + fp16 scales)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args, say=say) -> int:
    import torch

    import qpass
    from qpass.eval import evaluate, markdown

    recipe = read_recipe(args.recipe)
    presets = [p for p in (default_path("recipes", name) for name in PRESETS) if os.path.isfile(p)]
    if os.path.abspath(args.recipe) not in map(os.path.abspath, presets):
        presets.insert(0, args.recipe)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    note("loading the model and its text")
    model, eval_ids, calib_ids, what = load(args.model)
    total = eval_ids.numel()
    eval_ids = eval_ids[: args.max_eval_tokens]
    calib = [w.unsqueeze(0) for w in calib_ids.split(args.window) if w.numel() == args.window][:16]
    say(f"model: {what}; {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")

    say(f"\nrecipe {display(args.recipe)}:\n{recipe.to_yaml()}")
    t0 = time.perf_counter()
    qm = qpass.apply(model, recipe, calib_data=calib)
    say(f"applied in {time.perf_counter() - t0:.1f}s; what each pass changed:\n{qm.report}\n")

    note(f"evaluating FP32 and {len(presets)} recipes ({', '.join(map(os.path.basename, presets))}) "
         f"on {eval_ids.numel()} tokens")
    rows = evaluate(model, presets, eval_ids, calib_ids, window=args.window, calib_samples=16, progress=True)
    say(f"FP vs quantized over {eval_ids.numel()} held-out tokens (windows of {args.window}):")
    say(markdown(rows))
    say(BITS_NOTE)
    if eval_ids.numel() < total:
        say(f"Perplexities are over the first {eval_ids.numel()} of the {total} held-out tokens, to keep the demo "
            f"short, so FP32 differs from the whole-text figure in models/README.md; "
            f"`qpass eval {display(args.model)}` scores all of them.")
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "perplexity_vs_bits.png")
    plot(rows, png, f"qpass presets on {what.split(' (')[0]}")
    say(f"\nplot: {os.path.relpath(png, os.getcwd())}")
    return 0
