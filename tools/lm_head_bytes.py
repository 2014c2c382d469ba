"""Stored bytes and weight bytes read per decode token of lowered models (docs/results_lm_head.md's storage table).

    python tools/lm_head_bytes.py MODEL_DIR --recipe R.yaml [--recipe ...] [--no-onnx] [--work DIR]

For each recipe (weight-only recipes: no calibration data is used), the model is quantized and lowered:

  torch   ``tp.lower(qm, kernels="reference")``; stored = bytes of the lowered graph's parameters and buffers (each
          storage once); read per token = the same without tensors that only an embedding lookup reads (one row
          per token), as tools/bench_size.py counts (``graph_bytes_per_token``). A tied table shared with lm_head
          (quantize's ``tied_embedding: shared``) is lm_head's packed codes: read in full by lm_head.
  onnx    ``qpass.lower(qm, "onnx", ...)``; stored = bytes of model.onnx's initializers (INT4 at 4 bits); read per
          token = the same without tables only a Gather reads (``bench_size.onnx_bytes_per_token``).

Prints a Markdown table (one row per recipe) with the command line that wrote it.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))


def onnx_stored_bytes(path: str) -> int:
    """Bytes of an ONNX model's initializers (INT4 / UINT4 at 4 bits per element)."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(
            init.data_type, 8 * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize)
        total += math.ceil(math.prod(init.dims) * bits / 8)
    return total


def measure(model_dir: str, recipe: str, onnx: bool, work: str) -> dict:
    import torch
    import transformers

    import qpass
    from bench_size import _tensor_bytes, graph_bytes_per_token, onnx_bytes_per_token
    from qpass.backends import torch_packed as tp

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    qm = qpass.apply(model, recipe, progress=False)
    gm = tp.lower(qm, kernels="reference").graph_module
    row = {"torch_stored": _tensor_bytes(list(gm.parameters()) + list(gm.buffers())),
           "torch_read": graph_bytes_per_token(gm)}
    if onnx:
        out = os.path.join(work, os.path.splitext(os.path.basename(recipe))[0])
        shutil.rmtree(out, ignore_errors=True)
        art = qpass.lower(qm, "onnx", out)
        row.update(onnx_stored=onnx_stored_bytes(art.model_path), onnx_read=onnx_bytes_per_token(art.model_path))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--recipe", action="append", required=True)
    ap.add_argument("--no-onnx", action="store_true", help="torch rows only")
    ap.add_argument("--work", default=None, help="where the ONNX models go (default: a temporary directory)")
    args = ap.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="qpass-lm-head-bytes-")
    cols = ["torch stored", "torch read per token"] + ([] if args.no_onnx else ["onnx stored", "onnx read per token"])
    print(f"`python tools/lm_head_bytes.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n")
    print("| recipe | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for recipe in args.recipe:
        r = measure(args.model_dir, recipe, not args.no_onnx, work)
        vals = [r["torch_stored"], r["torch_read"]] + ([] if args.no_onnx else [r["onnx_stored"], r["onnx_read"]])
        print(f"| {os.path.basename(recipe)} | " + " | ".join(f"{v:,}" for v in vals) + " |", flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
