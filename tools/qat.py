"""`python tools/qat.py ...` is `qpass qat ...`: run a recipe with a qat pass (LLM-QAT) and save the
result; works under torchrun.

The code and the options are in qpass/cli/qat.py (`--help` lists them); this file only runs it under its
own name, so the checkout and the installed command behave the same.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    try:
        from qpass.cli import tool
    except KeyboardInterrupt:                 # Ctrl-C while torch is being imported
        print("qat.py: interrupted", file=sys.stderr)
        return 130
    return tool("qat", argv, prog="qat.py")


if __name__ == "__main__":
    sys.exit(main())
