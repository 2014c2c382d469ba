"""`python tools/demo.py ...` is `qpass demo ...` (what `make demo` runs): the bundled model, a
recipe, its report, an FP-vs-quantized table and a plot.

The code and the options are in qpass/cli/demo.py (`--help` lists them); this file only runs it under its
own name, so the checkout and the installed command behave the same.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    try:
        from qpass.cli import tool
    except KeyboardInterrupt:                 # Ctrl-C while torch is being imported
        print("demo.py: interrupted", file=sys.stderr)
        return 130
    return tool("demo", argv, prog="demo.py")


if __name__ == "__main__":
    sys.exit(main())
