"""`python tools/export.py ...` is `qpass export ...`: export a saved qpass model to compressed-tensors
(transformers, vLLM).

The code and the options are in qpass/cli/export.py (`--help` lists them); this file only runs it under its
own name, so the checkout and the installed command behave the same.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    try:
        from qpass.cli import tool
    except KeyboardInterrupt:                 # Ctrl-C while torch is being imported
        print("export.py: interrupted", file=sys.stderr)
        return 130
    return tool("export", argv, prog="export.py")


if __name__ == "__main__":
    sys.exit(main())
