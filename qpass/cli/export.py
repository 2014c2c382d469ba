"""Export a saved qpass model (a directory written by ``qm.save`` or ``qpass.apply_from_disk``) to a format
other tools read.

    qpass export QPASS_DIR --format compressed-tensors --out OUT_DIR [--tokenizer HF_DIR]

compressed-tensors: config.json with a compressed-tensors ``quantization_config`` and model.safetensors in its
packed layout, which transformers loads quantized (``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` with the
``compressed-tensors`` package installed: ``pip install "qpass[export]"``) and vLLM serves. What the format
cannot express (nf4, codebooks, side channels, dynamic KV-cache quantizers, ...) is refused by name before
anything is written; see docs/export.md. Errors are one line on stderr with exit code 1 (2: usage).
"""
from __future__ import annotations

import os

from ._common import CliError, say

HELP = "export a saved qpass model to compressed-tensors (transformers, vLLM)"
INTERRUPTED = "interrupted; nothing was written to --out"


def add_arguments(ap) -> None:
    ap.add_argument("qpass_dir", metavar="QPASS_DIR", help="directory written by qm.save or qpass.apply_from_disk")
    ap.add_argument("--format", choices=("compressed-tensors",), default="compressed-tensors",
                    help="output format (default and only one so far: compressed-tensors)")
    ap.add_argument("--out", required=True, metavar="OUT_DIR", help="output directory (must not exist or be empty)")
    ap.add_argument("--tokenizer", metavar="HF_DIR",
                    help="copy the tokenizer files of this directory (e.g. the model qpass quantized)")


def run(args) -> int:
    if not os.path.isdir(args.qpass_dir):
        raise CliError(f"{args.qpass_dir!r} is not a directory")
    if args.tokenizer is not None and not os.path.isdir(args.tokenizer):
        raise CliError(f"--tokenizer {args.tokenizer!r} is not a directory")
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise CliError(f"--out {args.out!r} exists and is not empty")
    import qpass
    from qpass.export import export

    qm = qpass.load(args.qpass_dir)
    result = export(qm, args.out, args.format, tokenizer_dir=args.tokenizer)
    for name, g in result.groups.items():
        a = g["input_activations"]
        w = g["weights"]
        say(f"{name}: {g['format']}, weights {w['type']}{w['num_bits']} {w['strategy']}"
            f"{'' if w['group_size'] is None else ' ' + str(w['group_size'])}"
            f"{'' if w['symmetric'] else ' asymmetric'}"
            f"{'' if a is None else ', activations %s%d %s' % (a['type'], a['num_bits'], a['strategy'])}"
            f" ({len(g['targets']) if g['targets'] != ['Linear'] else len(result.quantized)} linears)")
    say(f"left float: {len(result.ignored)} linears {result.ignored[:4]}{' ...' if len(result.ignored) > 4 else ''}")
    for n in result.notes:
        say(f"note: {n}")
    say(f"wrote {args.out}")
    return 0
