"""Run a recipe with a `qat` pass (LLM-QAT) on a Hugging Face model directory and save the result.

    qpass qat MODEL_DIR --recipe recipes/llm_qat_w4a8kv4.yaml --out OUT_DIR [--calib TEXT]
    torchrun --nproc_per_node=2 tools/qat.py MODEL_DIR --recipe R.yaml --out OUT_DIR     # DDP (gloo on CPU)

Every rank runs the same recipe; training is data-parallel over the global batch; rank 0 writes OUT_DIR.
The qat pass's `parallel` option picks DDP (default: every rank holds the model) or FSDP2 (`parallel: fsdp`:
parameters sharded across the ranks while training, gathered back at the end); both give one process's loss.
The recipe and the paths are checked before the model is loaded.
"""
from __future__ import annotations

import logging
import os

from .. import staging
from ._common import (CliError, check_model_dir, check_text_file, load_model, load_tokenizer, read_recipe, say,
                      token_ids)

HELP = "run a recipe with a qat pass (LLM-QAT distillation) and save the quantized model"


def add_arguments(ap) -> None:
    ap.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face model directory")
    ap.add_argument("--recipe", required=True, metavar="R.yaml", help="recipe YAML (with a qat pass)")
    ap.add_argument("--out", required=True, metavar="OUT_DIR",
                    help="where the quantized model is saved (must not exist or be empty)")
    ap.add_argument("--calib", metavar="TEXT", help="text file for calibration (static scales, SmoothQuant)")
    ap.add_argument("--calib-samples", type=int, default=32, metavar="N", help="calibration windows (default 32)")
    ap.add_argument("--seq-len", type=int, default=256, metavar="L",
                    help="tokens per calibration window (default 256)")


def run(args, say=say) -> int:
    import qpass
    from qpass.qat.training import world

    out = os.path.abspath(args.out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise CliError(f"--out {args.out!r} exists and is not an empty directory")
    check_model_dir(args.model_dir)
    if args.calib:
        check_text_file(args.calib, "calibration file")
    recipe = read_recipe(args.recipe)
    logging.basicConfig(level=logging.WARNING)
    rank, _ = world()
    model = load_model(args.model_dir)
    calib = None
    if args.calib:
        ids = token_ids(load_tokenizer(args.model_dir, "--calib"), args.calib)
        calib = [w.unsqueeze(0) for w in ids.split(args.seq_len) if w.numel() == args.seq_len][: args.calib_samples]
    qm = qpass.apply(model, recipe, calib_data=calib, progress=rank == 0)
    if rank == 0:
        say(str(qm.report))
        for path in staging.clean_stale(os.path.dirname(out)):
            say(f"removed {path}, left by a run that was killed")
        qm.save(out)
        staging.publish(out)
        say(f"saved {args.out}")
    return 0
