"""Check that optimum-onnx loads a qpass ONNX directory and generates the same tokens as qpass's own loop.

optimum-onnx pins transformers < 4.58 (0.1.0, the newest release, and its main branch in April 2026) and does
not import on transformers 5, while qpass needs transformers 5, so the check runs in a separate virtual
environment (created on first use under .cache/optimum-venv with torch, onnx and onnxruntime at qpass's pins;
CI does not run this). In qpass's own environment, ``QpassORTModelForCausalLM`` offers the same interface
(tests/test_ort_model.py); this tool checks both against qpass's loop:

    python tools/check_optimum.py ONNX_DIR [--prompt TEXT] [--new-tokens N] [--venv DIR]
    python tools/check_optimum.py --model models/tiny-llama --recipe recipes/w4a16_g128.yaml --out OUT_DIR

1. here (qpass's environment): greedy tokens from ``qpass.backends.onnx_qdq.generate`` over onnxruntime
   (lowering MODEL with RECIPE into OUT_DIR first when --model is given), and from
   ``QpassORTModelForCausalLM.from_pretrained(ONNX_DIR).generate(..., do_sample=False)``;
2. there (optimum's environment): ``ORTModelForCausalLM.from_pretrained(ONNX_DIR).generate(...,
   do_sample=False)`` with the same prompt ids; exit 0 when all three are equal.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VENV = os.path.join(ROOT, ".cache", "optimum-venv")
REQUIREMENTS = ["optimum-onnx[onnxruntime]", "transformers<5"]


def ensure_venv(venv: str) -> str:
    py = os.path.join(venv, "bin", "python")
    stamp = os.path.join(venv, ".qpass-optimum-installed")
    if not os.path.isfile(stamp):
        print(f"creating {venv} with {' '.join(REQUIREMENTS)} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        # qpass's pins for torch (the CPU wheel: no CUDA download), onnx and onnxruntime; not its transformers pin,
        # which optimum-onnx refuses
        pins = [f"{name}=={v}" for name, v in _pins().items() if name in ("torch", "onnx", "onnxruntime")]
        subprocess.run([py, "-m", "pip", "install", "-q", *(pins or ["torch"]), *REQUIREMENTS], check=True)
        open(stamp, "w").close()
    return py


def _pins() -> dict[str, str]:
    path = os.path.join(ROOT, "constraints.txt")
    if not os.path.isfile(path):
        return {}
    lines = (ln.split("#")[0].strip() for ln in open(path))
    return dict(ln.split("==", 1) for ln in lines if "==" in ln)


def ours(onnx_dir: str, ids: list[list[int]], new_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    """(onnx_qdq.generate's tokens, QpassORTModelForCausalLM.generate's tokens), greedy."""
    sys.path.insert(0, ROOT)
    import torch

    from qpass.backends import onnx_qdq

    x = torch.tensor(ids)
    loop = onnx_qdq.generate(onnx_dir, x, new_tokens).tolist()
    model = onnx_qdq.QpassORTModelForCausalLM.from_pretrained(onnx_dir)
    hf = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                        do_sample=False).tolist()
    return loop, hf


def prompt_ids(onnx_dir: str, prompt: str) -> list[list[int]]:
    import transformers

    if os.path.isfile(os.path.join(onnx_dir, "tokenizer.json")) or os.path.isfile(
            os.path.join(onnx_dir, "tokenizer_config.json")):
        return [transformers.AutoTokenizer.from_pretrained(onnx_dir)(prompt).input_ids]
    vocab = json.load(open(os.path.join(onnx_dir, "config.json")))["vocab_size"]
    return [[(7 * i + 3) % vocab for i in range(12)]]


def child(onnx_dir: str, payload: str) -> int:
    """Runs in optimum's environment: no qpass import (it needs transformers 5)."""
    from importlib.metadata import version

    import torch
    import transformers
    from optimum.onnxruntime import ORTModelForCausalLM

    job = json.loads(payload)
    model = ORTModelForCausalLM.from_pretrained(onnx_dir, use_cache=True, use_io_binding=False)
    ids = torch.tensor(job["ids"])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=job["new_tokens"],
                         min_new_tokens=job["new_tokens"], do_sample=False)
    got = out.tolist()
    same = got == job["expected"]
    print(json.dumps({"optimum-onnx": version("optimum-onnx"), "optimum": version("optimum"),
                      "transformers": transformers.__version__, "onnxruntime": version("onnxruntime"),
                      "equal": same, "optimum_tokens": got, "qpass_tokens": job["expected"]}))
    return 0 if same else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx_dir", nargs="?", help="a directory written by qpass.lower(qm, 'onnx', dir)")
    ap.add_argument("--model", help="HF model directory to quantize and lower first (with --recipe, --out)")
    ap.add_argument("--recipe")
    ap.add_argument("--out")
    ap.add_argument("--prompt", default="It is a truth universally acknowledged, that")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--venv", default=DEFAULT_VENV)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        return child(args.onnx_dir, args.child)
    onnx_dir = args.onnx_dir
    if args.model:
        if not (args.recipe and args.out):
            ap.error("--model needs --recipe and --out")
        sys.path.insert(0, ROOT)
        from qpass.backends.onnx_qdq import QpassOnnxQuantizer

        QpassOnnxQuantizer.from_pretrained(args.model).quantize(save_dir=args.out, recipe=args.recipe)
        onnx_dir = args.out
    if not onnx_dir:
        ap.error("give ONNX_DIR or --model/--recipe/--out")
    ids = prompt_ids(onnx_dir, args.prompt)
    expected, ort_model = ours(onnx_dir, ids, args.new_tokens)
    print("QpassORTModelForCausalLM.generate() == onnx_qdq.generate():", "yes" if ort_model == expected else "NO")
    py = ensure_venv(args.venv)
    payload = json.dumps({"ids": ids, "new_tokens": args.new_tokens, "expected": expected})
    run = subprocess.run([py, os.path.abspath(__file__), os.path.abspath(onnx_dir), "--child", payload],
                         capture_output=True, text=True)
    sys.stderr.write(run.stderr[-4000:])
    print(run.stdout.strip())
    print("optimum-onnx generate() == qpass onnx_qdq.generate():", "yes" if run.returncode == 0 else "NO")
    return run.returncode or int(ort_model != expected)


if __name__ == "__main__":
    sys.exit(main())
