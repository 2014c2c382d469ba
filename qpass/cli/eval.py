"""Evaluate FP vs quantized: perplexity, KL(FP||Q) per token, top-1 agreement, weight bytes.

    qpass eval MODEL_DIR [--recipe R.yaml ...] [--eval TEXT] [--calib TEXT] [--json OUT.json] [--markdown OUT.md]
               [--window 256] [--calib-samples 32] [--max-eval-tokens N] [--seed 0] [--no-progress]

Deterministic: fixed seed, fixed non-overlapping windows (see qpass.eval). Without --eval/--calib the files
named in MODEL_DIR/qpass_data.json are used (the bundled models have one). Every recipe is applied to the same
FP model with the same calibration windows (consecutive --window-token windows of the calibration text).
Without a recipe only the FP model is scored, and no calibration text is needed. Recipes and files are
checked before the model is loaded.
"""
from __future__ import annotations

import json
import logging
import sys

from ..tables import write_atomic
from ._common import (CliError, UsageError, check_model_dir, check_text_file, data_files, display, load_model,
                      load_tokenizer, note, read_recipe, say, token_ids)

HELP = "perplexity, KL and top-1 agreement of FP vs quantized, and weight bytes"
BITS_NOTE = ("bits/weight: stored bits (codes, fp16 scales, zero points) per weight. 'all linears' includes lm_head: "
             "one the recipe leaves in float (`ignore: [lm_head]`) counts at 32 bits; 'quantized linears' counts only "
             "the quantized ones.")


def add_arguments(ap) -> None:
    ap.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face model directory with a tokenizer")
    ap.add_argument("--recipe", action="append", default=[], metavar="R.yaml",
                    help="recipe YAML to compare against FP (repeatable; none: score the FP model only)")
    ap.add_argument("--eval", dest="eval_path", metavar="TEXT",
                    help="held-out text to score (default: 'eval' in MODEL_DIR/qpass_data.json)")
    ap.add_argument("--calib", dest="calib_path", metavar="TEXT",
                    help="calibration text, needed with --recipe (default: 'calib' in MODEL_DIR/qpass_data.json)")
    ap.add_argument("--window", type=int, default=256, metavar="T",
                    help="tokens per evaluation and calibration window (default 256)")
    ap.add_argument("--calib-samples", type=int, default=32, metavar="N", help="calibration windows (default 32)")
    ap.add_argument("--max-eval-tokens", type=int, default=None, metavar="N",
                    help="score only the first N tokens of the held-out text (default: all of it)")
    ap.add_argument("--json", dest="json_path", metavar="OUT.json", help="also write the rows as JSON")
    ap.add_argument("--markdown", dest="markdown_path", metavar="OUT.md", help="also write the table as Markdown")
    ap.add_argument("--seed", type=int, default=0, help="torch seed (default 0)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


def resolve_files(args) -> tuple[str, str | None]:
    named = data_files(args.model_dir)
    eval_path = args.eval_path or named.get("eval")
    calib_path = args.calib_path or named.get("calib")
    if not eval_path:
        raise UsageError(f"give --eval TEXT (no qpass_data.json in {args.model_dir} names one)")
    check_text_file(eval_path, "evaluation text")
    if args.recipe and not calib_path:
        raise UsageError(f"--recipe needs calibration text: give --calib TEXT (no qpass_data.json in "
                         f"{args.model_dir} names one)")
    if calib_path and args.recipe:
        check_text_file(calib_path, "calibration text")
    return eval_path, calib_path if args.recipe else None


def run(args, say=say) -> int:
    import torch

    from qpass.eval import evaluate, markdown

    if args.window < 2 or args.calib_samples < 1:
        raise UsageError("--window must be >= 2 and --calib-samples >= 1")
    check_model_dir(args.model_dir)
    for path in args.recipe:
        read_recipe(path)
    eval_path, calib_path = resolve_files(args)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)
    tok = load_tokenizer(args.model_dir, "qpass eval")
    eval_ids = token_ids(tok, eval_path)
    calib_ids = token_ids(tok, calib_path) if calib_path else torch.zeros(0, dtype=torch.long)
    if args.max_eval_tokens:
        eval_ids = eval_ids[: args.max_eval_tokens]
    model = load_model(args.model_dir)
    if not args.no_progress:
        note(f"scoring FP32 and {len(args.recipe)} recipe(s) on {eval_ids.numel()} tokens")
    try:
        rows = evaluate(model, args.recipe, eval_ids, calib_ids, window=args.window,
                        calib_samples=args.calib_samples, progress=not args.no_progress)
    except ValueError as e:           # e.g. a text shorter than one window
        raise CliError(str(e)) from e
    calib_text = f"; calib {display(calib_path)} ({args.calib_samples} windows)" if calib_path else ""
    say(f"model {args.model_dir}; eval {display(eval_path)} ({eval_ids.numel()} tokens, windows of "
        f"{args.window}){calib_text}")
    table = markdown(rows)
    say(table)
    say(BITS_NOTE)
    if args.markdown_path:
        write_atomic(args.markdown_path, f"{table}\n\n{BITS_NOTE}\n")
    if args.json_path:
        out = {"model": args.model_dir, "eval": display(eval_path), "eval_tokens": eval_ids.numel(),
               "calib": display(calib_path) if calib_path else None, "window": args.window,
               "calib_samples": args.calib_samples, "rows": rows, "command": " ".join(sys.argv)}
        write_atomic(args.json_path, json.dumps(out, indent=2))
    return 0
