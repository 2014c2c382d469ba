"""Per-layer calibration errors of GPTQ, QuantEase and AWQ recipes, from the passes' reports.

    python tools/layer_errors.py MODEL_DIR --recipe R.yaml [--recipe ...] [--calib TEXT] [--window 256]
                                 [--calib-samples 32] [--json OUT.json]

For a recipe with ``gptq``: every re-rounded linear's ``||WX - W_hat X||^2`` summed over the calibration
tokens, for GPTQ and for round-to-nearest with the same quantizer and inputs, and their ratio. For a recipe
with ``quantease``: the same error for QuantEase, GPTQ and RTN on the same inputs (each linear's Hessian as the
pass saw it), and QuantEase / GPTQ (at or below 1 on every layer when started from GPTQ). For a recipe
with ``awq``: every folding group's chosen alpha and its scale-search loss relative to alpha = 0 (RTN), and
the mean clip ratio of every clipped linear. Calibration windows are the ones tools/eval.py uses.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import qpass  # noqa: E402
from qpass.cli._common import data_files, token_ids  # noqa: E402
from qpass.tables import markdown  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--recipe", action="append", default=[], required=True)
    ap.add_argument("--calib", dest="calib_path")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args(argv)
    import transformers

    torch.manual_seed(0)
    calib_path = args.calib_path or data_files(args.model_dir).get("calib")   # the eval text is not read
    tok = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    ids = token_ids(tok, calib_path)
    calib = [w.unsqueeze(0) for w in ids.split(args.window) if w.numel() == args.window][: args.calib_samples]
    out = {}
    for recipe in args.recipe:
        qm = qpass.apply(model, recipe, calib_data=calib, progress=False)
        name = os.path.basename(recipe)
        out[name] = {row.name: row.stats for row in qm.report if row.name in ("gptq", "quantease", "awq")}
        print(f"\n{args.model_dir} {name} ({len(calib)} calibration windows of {args.window} tokens)")
        gptq = out[name].get("gptq")
        if gptq:
            print(markdown(["linear", "GPTQ ‖WX−ŴX‖²", "RTN ‖WX−ŴX‖²", "ratio"],
                           [[path, f"{e['gptq']:.4g}", f"{e['rtn']:.4g}", f"{e['ratio']:.3f}"]
                            for path, e in gptq["errors"].items()]))
            print(f"mean ratio {gptq['mean_error_ratio']:.3f}; {gptq['improved']}/{gptq['linears']} below RTN")
        qe = out[name].get("quantease")
        if qe:
            print(markdown(["linear", "QuantEase ‖WX−ŴX‖²", "GPTQ ‖WX−ŴX‖²", "RTN ‖WX−ŴX‖²", "QuantEase / GPTQ"],
                           [[path, f"{e['quantease']:.4g}", f"{e['gptq']:.4g}", f"{e['rtn']:.4g}",
                             f"{e['ratio_vs_gptq']:.3f}"] for path, e in qe["errors"].items()]))
            worst = max(e["ratio_vs_gptq"] for e in qe["errors"].values())
            print(f"mean QuantEase/GPTQ {qe['mean_ratio_vs_gptq']:.3f}, worst {worst:.3f}; "
                  f"{qe['at_or_below_gptq']}/{qe['linears']} at or below GPTQ")
        awq = out[name].get("awq")
        if awq:
            print(markdown(["group", "alpha", "loss / RTN loss"],
                           [[g, f"{a:.2f}", f"{awq['loss_vs_rtn'][g]:.3f}"] for g, a in awq["alphas"].items()]))
            clips = awq["mean_clip_ratio"]
            if clips:
                print(f"clip: {len(clips)} linears, mean ratio {sum(clips.values()) / len(clips):.3f}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"model": args.model_dir, "recipes": out, "command": " ".join(sys.argv)}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
