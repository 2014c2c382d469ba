"""`python tools/lower.py ...` is `qpass lower ...`: quantize a Hugging Face model with a recipe and lower
it (ONNX or packed torch).

The code and the options are in qpass/cli/lower.py (`--help` lists them); this file only runs it under its
own name, so the checkout and the installed command behave the same.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    try:
        from qpass.cli import tool
    except KeyboardInterrupt:                 # Ctrl-C while torch is being imported
        print("lower.py: interrupted", file=sys.stderr)
        return 130
    return tool("lower", argv, prog="lower.py")


if __name__ == "__main__":
    sys.exit(main())
