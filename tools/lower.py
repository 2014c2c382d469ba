"""Quantize a Hugging Face model directory with a recipe and lower it: an ONNX (onnxruntime / optimum) or
packed-torch directory.

    python tools/lower.py MODEL_DIR --recipe R.yaml --out OUT_DIR [--calib TEXT_FILE] [--backend onnx|torch]
                          [--calib-samples N] [--seq-len L] [--force] [--torch-kernels auto|exact|reference]

Calibration (when --calib is given): the text is tokenized with the model's tokenizer and cut into N windows
of L tokens; the tokens after them (up to L) are held out to measure parity: max / mean |Δ logits| of the
lowered model against the fake-quant model it came from. Without --calib the parity slice is seeded random
tokens. Everything is written to a temporary directory beside OUT_DIR and renamed at the end, so a failed
or interrupted run leaves no partial OUT_DIR. Errors are one line on stderr with exit code 1 (2: usage).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MIN_HELD_OUT = 16   # tokens


class CliError(Exception):
    """A one-line reason for the user; main() prints it and exits 1."""


def one_line(e: BaseException) -> str:
    text = " ".join(part.strip() for part in str(e).strip().splitlines() if part.strip())
    return text or type(e).__name__


def parse(argv):
    ap = argparse.ArgumentParser(prog="lower.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", help="Hugging Face model directory (config.json + weights [+ tokenizer])")
    ap.add_argument("--recipe", required=True, help="recipe YAML")
    ap.add_argument("--out", required=True, help="output directory (must not exist or be empty, unless --force)")
    ap.add_argument("--calib", help="calibration text file (needs a tokenizer in MODEL_DIR)")
    ap.add_argument("--backend", choices=("onnx", "torch"), default="onnx")
    ap.add_argument("--calib-samples", type=int, default=16, help="calibration windows (default 16)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    ap.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    ap.add_argument("--torch-kernels", choices=("auto", "exact", "reference"), default="auto",
                    help="torch backend: measure kernels per shape on this machine (auto), only exact kernels, "
                         "or the dequantize reference (nothing measured)")
    args = ap.parse_args(argv)
    if args.calib_samples < 1 or args.seq_len < 2:
        ap.error("--calib-samples must be >= 1 and --seq-len >= 2")
    return args


def check_out(out: str, force: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise CliError(f"--out {out!r} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise CliError(f"--out {out!r} exists and is not empty (use --force to replace it)")


def load_model(model_dir: str):
    import torch
    import transformers

    if not os.path.isdir(model_dir):
        raise CliError(f"model directory {model_dir!r} does not exist")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise CliError(f"{model_dir!r} is not a Hugging Face model directory (no config.json)")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    except Exception as e:  # noqa: BLE001 - reported as one line
        raise CliError(f"cannot load a causal LM from {model_dir!r}: {one_line(e)}") from e
    return model


def load_tokenizer(model_dir: str):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - reported as one line
        raise CliError(f"--calib needs the model's tokenizer, and {model_dir!r} has none usable: {one_line(e)}") from e


def calibration(args, model):
    """(calibration windows or None, held-out token ids [1, T])."""
    import torch

    if args.calib is None:
        vocab = int(model.config.vocab_size)
        held = torch.randint(0, vocab, (1, min(args.seq_len, 64)), generator=torch.Generator().manual_seed(0))
        return None, held
    if not os.path.isfile(args.calib):
        raise CliError(f"calibration file {args.calib!r} does not exist")
    tok = load_tokenizer(args.model_dir)
    with open(args.calib, encoding="utf-8") as f:
        ids = tok(f.read(), return_tensors="pt").input_ids[0]
    need = args.calib_samples * args.seq_len
    if ids.numel() < need + MIN_HELD_OUT:
        raise CliError(f"calibration file {args.calib!r} is too short: {ids.numel()} tokens, need "
                       f"{need + MIN_HELD_OUT} ({args.calib_samples} windows of {args.seq_len} + "
                       f"{MIN_HELD_OUT} held out); give more text or lower --calib-samples / --seq-len")
    windows = [w.unsqueeze(0) for w in ids[:need].split(args.seq_len)]
    return windows, ids[need: need + args.seq_len].unsqueeze(0)


def lower_into(qm, backend: str, out: str, model_dir: str, say, torch_kernels: str = "auto"):
    """Lower into `out` (a fresh directory); return a callable input_ids -> logits of the lowered model."""
    import qpass
    from qpass.calibration import logits_of

    if backend == "onnx":
        from qpass.backends import onnx_qdq

        qpass.lower(qm, "onnx", out, tokenizer_dir=model_dir, progress=say)
        sess = onnx_qdq.session(out)
        return lambda ids: onnx_qdq.logits(sess, ids)
    say(f"packing weights (torch backend, kernels: {torch_kernels})")
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
    """Move `staged` to `out`, replacing an existing `out` only once the new one is complete."""
    old = None
    if os.path.isdir(out):
        old = tempfile.mkdtemp(prefix=".qpass-old-", dir=os.path.dirname(staged))
        os.rmdir(old)
        os.replace(out, old)
    os.replace(staged, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def run(args) -> int:
    import qpass

    say = lambda msg: print(msg, flush=True)  # noqa: E731
    out = os.path.abspath(args.out)
    check_out(out, args.force)
    model = load_model(args.model_dir)
    try:
        recipe = qpass.Recipe.from_yaml(args.recipe)
    except qpass.RecipeError as e:
        raise CliError(f"bad recipe {args.recipe!r}: {one_line(e)}") from e
    calib, held = calibration(args, model)
    say(f"model {args.model_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters), recipe "
        f"{args.recipe}, {len(calib) if calib else 0} calibration windows")
    t0 = time.perf_counter()
    qm = qpass.apply(model, recipe, calib_data=calib, progress=True)
    say(f"quantized in {time.perf_counter() - t0:.1f}s:\n{qm.report}")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".qpass-lower-", dir=parent)
    try:
        staged = os.path.join(stage, "out")
        t0 = time.perf_counter()
        lowered = lower_into(qm, args.backend, staged, args.model_dir, say, args.torch_kernels)
        say(f"lowered ({args.backend}) in {time.perf_counter() - t0:.1f}s")
        fig = parity(qm, lowered, held)
        meta_path = os.path.join(staged, "qpass.json")
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            meta["parity"] = fig
            with open(meta_path, "w") as f:
                json.dump(meta, f, indent=2)
        install(staged, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    say(f"parity vs fake-quant on {fig['tokens']} held-out tokens: max |Δlogit| {fig['max_abs_logit_diff']:.3g}, "
        f"mean {fig['mean_abs_logit_diff']:.3g}, top-1 agreement {100 * fig['top1_agreement']:.1f}%")
    say(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    args = parse(argv)
    import qpass

    try:
        return run(args)
    except KeyboardInterrupt:
        print("lower.py: interrupted; nothing was written to --out", file=sys.stderr)
        return 130
    except (CliError, qpass.QpassError) as e:
        print(f"lower.py: error: {one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
