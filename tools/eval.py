"""Evaluate FP vs quantized: perplexity, KL(FP||Q) per token, top-1 agreement, weight bytes.

    python tools/eval.py MODEL_DIR [--recipe R.yaml ...] [--calib TEXT] [--eval TEXT] [--json OUT.json]
                         [--window 256] [--calib-samples 32] [--max-eval-tokens N] [--markdown OUT.md]

Deterministic: fixed seed, fixed non-overlapping windows (see qpass.eval). Without --eval/--calib the
files named in MODEL_DIR/qpass_data.json are used (the bundled models have one). Every recipe is applied
to the same FP model with the same calibration windows (consecutive --window-token windows of the
calibration text).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import qpass  # noqa: E402
from qpass.eval import evaluate, markdown  # noqa: E402


def data_files(model_dir: str, eval_path: str | None, calib_path: str | None) -> tuple[str, str]:
    pointer = os.path.join(model_dir, "qpass_data.json")
    named = {}
    if os.path.isfile(pointer):
        with open(pointer) as f:
            named = {k: os.path.join(ROOT, v) for k, v in json.load(f).items()}
    eval_path, calib_path = eval_path or named.get("eval"), calib_path or named.get("calib")
    if not eval_path or not calib_path:
        raise SystemExit(f"error: give --eval and --calib (no qpass_data.json in {model_dir})")
    for p in (eval_path, calib_path):
        if not os.path.isfile(p):
            raise SystemExit(f"error: text file {p} does not exist")
    return eval_path, calib_path


def tokens(tok, path: str) -> torch.Tensor:
    with open(path, encoding="utf-8") as f:
        return torch.tensor(tok(f.read())["input_ids"], dtype=torch.long)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--recipe", action="append", default=[], help="recipe YAML (repeatable)")
    ap.add_argument("--eval", dest="eval_path")
    ap.add_argument("--calib", dest="calib_path")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--max-eval-tokens", type=int, default=None)
    ap.add_argument("--json", dest="json_path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)

    import transformers

    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        raise SystemExit(f"error: {args.model_dir} is not a Hugging Face model directory (no config.json)")
    eval_path, calib_path = data_files(args.model_dir, args.eval_path, args.calib_path)
    tok = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    eval_ids, calib_ids = tokens(tok, eval_path), tokens(tok, calib_path)
    if args.max_eval_tokens:
        eval_ids = eval_ids[: args.max_eval_tokens]
    rows = evaluate(model, args.recipe, eval_ids, calib_ids, window=args.window,
                    calib_samples=args.calib_samples, progress=not args.no_progress)
    print(f"model {args.model_dir}; eval {os.path.relpath(eval_path, ROOT)} ({eval_ids.numel()} tokens, windows of "
          f"{args.window}); calib {os.path.relpath(calib_path, ROOT)} ({args.calib_samples} windows)")
    print(markdown(rows))
    if args.json_path:
        out = {"model": args.model_dir, "eval": os.path.relpath(eval_path, ROOT), "eval_tokens": eval_ids.numel(),
               "calib": os.path.relpath(calib_path, ROOT), "window": args.window,
               "calib_samples": args.calib_samples, "rows": rows, "command": " ".join(sys.argv)}
        tmp = args.json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=2)
        os.replace(tmp, args.json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
