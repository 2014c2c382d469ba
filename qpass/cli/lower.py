"""Quantize a Hugging Face model directory with a recipe and lower it: an ONNX (onnxruntime / optimum) or
packed-torch directory.

    qpass lower MODEL_DIR --recipe R.yaml --out OUT_DIR [--calib TEXT_FILE] [--backend onnx|torch]
                [--calib-samples N] [--seq-len L] [--force] [--torch-kernels auto|exact|reference]
                [--accuracy-level 0..4] [--attention grouped|torch]

The recipe, the paths and the backend are checked before the model is loaded, so a typo costs no time.
Calibration (when --calib is given): the text is tokenized with the model's tokenizer and cut into N windows
of L tokens; the tokens after them (up to L) are held out to measure parity: max / mean |Δ logits| of the
lowered model against the fake-quant model it came from. Without --calib the parity slice is seeded random
tokens. Everything is written to a staging folder beside OUT_DIR and renamed at the end, so a failed or
interrupted run leaves no partial OUT_DIR; staging folders left by killed runs are removed by the next run.
OUT_DIR gets the permissions of a plain mkdir (0777 minus the umask). Errors are one line on stderr with exit
code 1 (2: usage, 130: interrupted).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time

from .. import staging
from ._common import (CliError, UsageError, check_model_dir, check_text_file, heartbeat, load_model, load_tokenizer,
                      read_recipe, token_ids)
from ._common import say as _say

HELP = "quantize a Hugging Face model with a recipe and lower it to ONNX or packed torch"
INTERRUPTED = "interrupted; nothing was written to --out"
MIN_HELD_OUT = 16   # tokens


def add_arguments(ap) -> None:
    ap.add_argument("model_dir", metavar="MODEL_DIR",
                    help="Hugging Face model directory (config.json + weights [+ tokenizer])")
    ap.add_argument("--recipe", required=True, metavar="R.yaml", help="recipe YAML (checked before loading)")
    ap.add_argument("--out", required=True, metavar="OUT_DIR",
                    help="output directory (must not exist or be empty, unless --force)")
    ap.add_argument("--calib", metavar="TEXT_FILE",
                    help="calibration text file (needs a tokenizer in MODEL_DIR); default: none, so static "
                         "scales cannot be calibrated and parity is measured on seeded random tokens")
    ap.add_argument("--backend", choices=("onnx", "torch"), default="onnx",
                    help="onnx: ONNX QDQ directory for onnxruntime / optimum (needs the [onnx] extras); "
                         "torch: packed PyTorch kernels (default: onnx)")
    ap.add_argument("--calib-samples", type=int, default=16, metavar="N",
                    help="calibration windows (default 16)")
    ap.add_argument("--seq-len", type=int, default=256, metavar="L",
                    help="tokens per calibration window (default 256)")
    ap.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    ap.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=None, metavar="N",
                    help="onnx backend: onnxruntime's MatMulNBits accuracy level for weight-only int4/int8 "
                         "linears, recorded in the model and qpass.json (default 4: int8 activations inside the "
                         "kernel, fast; 0: exact, the fake-quant model's numbers; docs/onnx.md)")
    ap.add_argument("--attention", choices=("grouped", "torch"), default=None,
                    help="onnx backend: how scaled_dot_product_attention is translated, recorded in qpass.json "
                         "(default grouped: K/V heads read in place, no repeated copies of the cache; torch: "
                         "torch.onnx's own translation; docs/onnx.md)")
    ap.add_argument("--torch-kernels", choices=("auto", "exact", "reference"), default="auto",
                    help="torch backend: measure kernels per shape on this machine (auto), only exact kernels, "
                         "or the dequantize reference (nothing measured)")


def check_args(args) -> None:
    """Everything that can be checked without the model, cheapest first."""
    if args.calib_samples < 1 or args.seq_len < 2:
        raise UsageError("--calib-samples must be >= 1 and --seq-len >= 2")
    if getattr(args, "accuracy_level", None) is not None and args.backend != "onnx":
        raise UsageError("--accuracy-level is an onnx backend option (onnxruntime's MatMulNBits)")
    if getattr(args, "attention", None) is not None and args.backend != "onnx":
        raise UsageError("--attention is an onnx backend option (the torch backend's runtime groups K/V heads "
                         "itself)")
    check_out(os.path.abspath(args.out), args.force)
    check_model_dir(args.model_dir)
    if args.calib is not None:
        check_text_file(args.calib, "calibration file")
    if args.backend == "onnx":
        missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise CliError(f"--backend onnx needs {', '.join(missing)}: pip install 'qpass[onnx]' "
                           f"(or use --backend torch)")


def check_out(out: str, force: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise CliError(f"--out {out!r} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise CliError(f"--out {out!r} exists and is not empty (use --force to replace it)")


def calibration(args, model):
    """(calibration windows or None, held-out token ids [1, T])."""
    import torch

    if args.calib is None:
        vocab = int(model.config.vocab_size)
        held = torch.randint(0, vocab, (1, min(args.seq_len, 64)), generator=torch.Generator().manual_seed(0))
        return None, held
    ids = token_ids(load_tokenizer(args.model_dir, "--calib"), args.calib)
    need = args.calib_samples * args.seq_len
    if ids.numel() < need + MIN_HELD_OUT:
        raise CliError(f"calibration file {args.calib!r} is too short: {ids.numel()} tokens, need "
                       f"{need + MIN_HELD_OUT} ({args.calib_samples} windows of {args.seq_len} + "
                       f"{MIN_HELD_OUT} held out); give more text or lower --calib-samples / --seq-len")
    windows = [w.unsqueeze(0) for w in ids[:need].split(args.seq_len)]
    return windows, ids[need: need + args.seq_len].unsqueeze(0)


def lower_into(qm, backend: str, out: str, model_dir: str, say, torch_kernels: str = "auto",
               accuracy_level: int | None = None, attention: str | None = None):
    """Lower into `out` (a fresh directory); return a callable input_ids -> logits of the lowered model."""
    import qpass
    from qpass.calibration import logits_of

    if backend == "onnx":
        from qpass.backends import onnx_qdq

        given = {k: v for k, v in (("fused_accuracy_level", accuracy_level), ("attention", attention)) if v is not None}
        with heartbeat("lowering to ONNX (the export takes minutes on large models)"):
            qpass.lower(qm, "onnx", out, tokenizer_dir=model_dir, progress=say, **given)
        sess = onnx_qdq.session(out)
        return lambda ids: onnx_qdq.logits(sess, ids)
    what = "measuring kernels per shape on this machine" if torch_kernels == "auto" else f"{torch_kernels} kernels"
    with heartbeat(f"packing weights (torch backend, {what})"):
        pm = qpass.lower(qm, "torch", kernels=torch_kernels)
    pm.save(out)
    from qpass.backends.onnx_qdq.lower import TOKENIZER_FILES

    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(model_dir, name)):
            shutil.copy2(os.path.join(model_dir, name), os.path.join(out, name))
    return lambda ids: logits_of(pm(ids))


def parity(qm, lowered, held) -> dict:
    import torch

    with torch.no_grad():
        ref = qm(held).logits.float()
        got = lowered(held).float()
    d = (got - ref).abs()
    return {"max_abs_logit_diff": float(d.max()), "mean_abs_logit_diff": float(d.mean()),
            "tokens": int(held.numel()), "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}


def install(staged: str, out: str) -> None:
    """Move `staged` to `out`, replacing an existing `out` only once the new one is complete; `out` gets the
    mode of a plain mkdir."""
    staging.publish(staged)
    old = None
    if os.path.isdir(out):
        old = os.path.join(os.path.dirname(staged), "old")
        os.replace(out, old)
    os.replace(staged, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def run(args, say=_say) -> int:
    import qpass

    out = os.path.abspath(args.out)
    check_args(args)
    recipe = read_recipe(args.recipe)
    parent = os.path.dirname(out)
    for path in staging.clean_stale(parent):
        say(f"removed {path}, left by a run that was killed")
    model = load_model(args.model_dir)
    calib, held = calibration(args, model)
    say(f"model {args.model_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters), recipe "
        f"{args.recipe}, {len(calib) if calib else 0} calibration windows")
    t0 = time.perf_counter()
    qm = qpass.apply(model, recipe, calib_data=calib, progress=True)
    say(f"quantized in {time.perf_counter() - t0:.1f}s:\n{qm.report}")
    stage = staging.make_dir(parent, "lower")
    try:
        staged = os.path.join(stage, "out")
        t0 = time.perf_counter()
        lowered = lower_into(qm, args.backend, staged, args.model_dir, say, args.torch_kernels,
                             getattr(args, "accuracy_level", None), getattr(args, "attention", None))
        say(f"lowered ({args.backend}) in {time.perf_counter() - t0:.1f}s")
        fig = parity(qm, lowered, held)
        meta_path = os.path.join(staged, "qpass.json")
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            meta["parity"] = fig
            meta["source_model"] = os.path.abspath(args.model_dir)     # tools/eval.py's FP reference
            with open(meta_path, "w") as f:
                json.dump(meta, f, indent=2)
        install(staged, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    say(f"parity vs fake-quant on {fig['tokens']} held-out tokens: max |Δlogit| {fig['max_abs_logit_diff']:.3g}, "
        f"mean {fig['mean_abs_logit_diff']:.3g}, top-1 agreement {100 * fig['top1_agreement']:.1f}%")
    say(f"wrote {out}")
    return 0
