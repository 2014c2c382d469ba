"""`python tools/eval.py ...` is `qpass eval ...`: FP vs quantized: perplexity, KL, top-1 agreement, weight bytes.

`python tools/eval.py --table docs/comparison.yaml --out docs/comparison.md` writes the one comparison table
(every method of the manifest on both bundled models; rows cached in docs/comparison.json).
`python tools/eval.py OUT_DIR` scores a lowered ONNX directory (tools/lower.py --backend onnx) in onnxruntime
beside the float model it was lowered from (docs/onnx.md, "Evaluating a lowered model").

The code and the options are in qpass/cli/eval.py (`--help` lists them); this file only runs it under its
own name, so the checkout and the installed command behave the same.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    try:
        from qpass.cli import tool
    except KeyboardInterrupt:                 # Ctrl-C while torch is being imported
        print("eval.py: interrupted", file=sys.stderr)
        return 130
    return tool("eval", argv, prog="eval.py")


if __name__ == "__main__":
    sys.exit(main())
