"""Run a recipe with a `qat` pass (LLM-QAT) on a Hugging Face model directory and save the result.

    python tools/qat.py MODEL_DIR --recipe recipes/llm_qat_w4a8kv4.yaml --out OUT_DIR [--calib TEXT]
    torchrun --nproc_per_node=2 tools/qat.py MODEL_DIR --recipe R.yaml --out OUT_DIR     # DDP (gloo on CPU)

Every rank runs the same recipe; training is data-parallel over the global batch; rank 0 writes OUT_DIR.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import qpass  # noqa: E402
from qpass.training import world  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--calib", help="text file for calibration (static scales, SmoothQuant)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import transformers

    rank, _ = world()
    try:
        recipe = qpass.Recipe.from_yaml(args.recipe)
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
        calib = None
        if args.calib:
            tok = transformers.AutoTokenizer.from_pretrained(args.model_dir)
            ids = torch.tensor(tok(open(args.calib, encoding="utf-8").read())["input_ids"])
            calib = [w.unsqueeze(0) for w in ids.split(args.seq_len) if w.numel() == args.seq_len]
            calib = calib[: args.calib_samples]
        qm = qpass.apply(model, recipe, calib_data=calib, progress=rank == 0)
    except (qpass.QpassError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        print(qm.report)
        qm.save(args.out)
        print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
