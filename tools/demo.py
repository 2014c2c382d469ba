"""`make demo`: quantize the bundled model with a recipe, show what the passes changed, compare FP vs quantized,
and plot perplexity against bits per weight for the preset recipes.

    python tools/demo.py [--recipe recipes/w8a8.yaml] [--model models/tiny-llama] [--out out/demo]

Uses the bundled trained model (models/tiny-llama) and its held-out text when present; otherwise a small
random Llama (then only the logit differences mean anything, not the perplexities).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import qpass  # noqa: E402
from qpass.eval import evaluate, markdown  # noqa: E402

BUNDLED = os.path.join(ROOT, "models", "tiny-llama")
PRESETS = ["w8a8.yaml", "w4a16_g128.yaml", "w4a16.yaml", "w3a16_g64.yaml"]


def load(path: str | None):
    """(model, eval ids, calib ids, description)."""
    import transformers

    if path and os.path.isfile(os.path.join(path, "config.json")):
        tok = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with open(os.path.join(path, "qpass_data.json")) as f:
            files = json.load(f)
        ids = {k: torch.tensor(tok(open(os.path.join(ROOT, v), encoding="utf-8").read())["input_ids"])
               for k, v in files.items()}
        return model, ids["eval"], ids["calib"], f"{os.path.relpath(path, ROOT)} (held-out {files['eval']})"
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=BUNDLED)
    ap.add_argument("--recipe", default=os.path.join(ROOT, "recipes", "w8a8.yaml"))
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "demo"))
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--max-eval-tokens", type=int, default=4096)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    model, eval_ids, calib_ids, what = load(args.model)
    eval_ids = eval_ids[: args.max_eval_tokens]
    calib = [w.unsqueeze(0) for w in calib_ids.split(args.window) if w.numel() == args.window][:16]
    print(f"model: {what}; {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")

    recipe = qpass.Recipe.from_yaml(args.recipe)
    print(f"\nrecipe {os.path.relpath(args.recipe, ROOT)}:\n{recipe.to_yaml()}")
    t0 = time.perf_counter()
    qm = qpass.apply(model, recipe, calib_data=calib)
    print(f"applied in {time.perf_counter() - t0:.1f}s; what each pass changed:\n{qm.report}\n")

    presets = [os.path.join(ROOT, "recipes", p) for p in PRESETS]
    if os.path.abspath(args.recipe) not in presets:
        presets.insert(0, os.path.abspath(args.recipe))
    rows = evaluate(model, presets, eval_ids, calib_ids, window=args.window, calib_samples=16, progress=False)
    print(f"FP vs quantized over {eval_ids.numel()} held-out tokens (windows of {args.window}):")
    print(markdown(rows))
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "perplexity_vs_bits.png")
    plot(rows, png, f"qpass presets on {what.split(' (')[0]}")
    print(f"\nplot: {os.path.relpath(png, os.getcwd())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
