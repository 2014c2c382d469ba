"""Training memory of the QAT family at size: LoRA on a float base vs QLoRA (NF4 + double quantization) with the
base fake-quantized in float vs held as packed codes (qat's `base`), and PEQA both ways.

    python tools/bench_qlora.py [--size 0.5b] [--steps 2] [--seq-len 64] [--batch 2] [--rank 16]
                                [--out docs/benchmarks.md]

Each row runs in its own process on the same synthetic Llama (tools/bench_size.py's model, random weights, seed 0):
`qpass.apply(model, recipe)` with a qat pass of a few steps on token windows of the bundled tiny model's calibration
text (tokenized with its tokenizer; ids fit the synthetic vocabulary). Measured: the peak resident memory of the
process while qat trains (qat's `peak_rss_training`: the FP teacher, the graph module, the optimizer state and the
activations; Linux's VmHWM, reset when training starts), the whole apply's peak, the base's bytes, seconds per step.
The table goes between the <!-- BEGIN bench-qlora --> and <!-- END bench-qlora --> lines of --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
SECTION = "bench-qlora"
NF4_DQ = {"quantize": {"weights": {"format": "nf4", "granularity": "per_group", "group_size": 64},
                       "double_quant": {"format": "int8", "block": 256}, "ignore": ["lm_head"]}}
INT4 = {"quantize": {"weights": {"bits": 4, "granularity": "per_channel", "symmetric": False},
                     "ignore": ["lm_head"]}}
ROWS = {  # name -> (label, passes before qat, qat settings)
    "lora_fp32": ("LoRA, fp32 base", lambda r: [{"lora": {"rank": r, "ignore": ["lm_head"]}}], {"trainable": "lora"}),
    "qlora_float": ("QLoRA NF4+DQ, base fake-quantized (float)",
                    lambda r: [NF4_DQ, {"lora": {"rank": r, "ignore": ["lm_head"]}}],
                    {"trainable": "lora", "base": "float"}),
    "qlora_packed": ("QLoRA NF4+DQ, base packed (default)",
                     lambda r: [NF4_DQ, {"lora": {"rank": r, "ignore": ["lm_head"]}}],
                     {"trainable": "lora", "base": "packed"}),
    "peqa_float": ("PEQA int4, base fake-quantized (float)", lambda r: [INT4], {"trainable": "scales",
                                                                                "base": "float"}),
    "peqa_packed": ("PEQA int4, base packed (default)", lambda r: [INT4], {"trainable": "scales", "base": "packed"}),
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="0.5b", help="tools/bench_size.py's model size (0.5b, small)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--out", help="write the table into this Markdown file's bench-qlora section")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    bad = [r for r in args.rows.split(",") if r not in ROWS]
    if bad:
        ap.error(f"unknown row(s) {bad}; choose from {', '.join(ROWS)}")
    return args


def child(args) -> dict:
    """One row, in this process: apply the recipe and report qat's stats and the apply's peak."""
    import torch

    import qpass
    from bench_size import synthetic_llama
    from qpass.memory import PeakRss

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    _, passes, qat = ROWS[args.child]
    data = json.load(open(os.path.join(ROOT, "models", "tiny-llama", "qpass_data.json")))["calib"]
    model = synthetic_llama(args.size)
    recipe = {"version": 1, "passes": [*passes(args.rank), {"qat": {
        "data": os.path.join(ROOT, data), "tokenizer": os.path.join(ROOT, "models", "tiny-llama"),
        "samples": args.batch * args.steps, "seq_len": args.seq_len, "steps": args.steps, "batch_size": args.batch,
        "lr": 1e-4, "loss": "ce", "held_out": 0, "cache_dir": None, "seed": 0, **qat}}]}
    t0 = time.perf_counter()
    with PeakRss() as peak:
        qm = qpass.apply(model, recipe, progress=False)
    st = qm.report["qat"].stats
    return {"peak_training": st["peak_rss_training"], "peak_apply": peak.bytes, "base": st["base"],
            "base_bytes": st["base_bytes"], "train_seconds": st["seconds"], "steps": args.steps,
            "apply_seconds": time.perf_counter() - t0,
            "params": sum(p.numel() for p in model.parameters())}


def _gb(b) -> str:
    return "–" if b is None else f"{b / 1e9:.2f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    from qpass.tables import markdown, replace_section

    t_start = time.perf_counter()
    load0 = os.getloadavg()
    results = {}
    for name in args.rows.split(","):
        print(f"[bench_qlora] {name} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--size", args.size, "--steps",
               str(args.steps), "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--rank", str(args.rank)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            sys.stderr.write(out.stderr[-3000:])
            print(f"[bench_qlora] {name} failed (exit {out.returncode})", file=sys.stderr)
            return 1
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    body = []
    for name, r in results.items():
        base = r["base_bytes"]
        body.append([ROWS[name][0], _gb(r["peak_training"]), _gb(r["peak_apply"]),
                     "–" if not base else f"{base['float'] / 1e9:.2f} → {base['packed'] / 1e9:.2f}",
                     f"{r['train_seconds'] / r['steps']:.1f}"])
    params = next(iter(results.values()))["params"]
    cmd = "python tools/bench_qlora.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load1 = os.getloadavg()
    text = "\n".join([
        f"Generated by `{cmd.strip()}` on {datetime.date.today().isoformat()} in {time.perf_counter() - t_start:.0f} "
        "s (do not edit by hand; rerun the command).", "",
        f"Model: tools/bench_size.py's synthetic Llama {args.size} ({params / 1e9:.3f} B parameters, fp32); qat "
        f"{args.steps} steps of batch {args.batch} x {args.seq_len} tokens, loss ce, rank {args.rank} adapters on "
        f"every linear but lm_head (LoRA rows); one process per row. Load average {load0[0]:.1f} at start, "
        f"{load1[0]:.1f} at end on {os.cpu_count()} cores.", "",
        markdown(["row", "peak RSS while training (GB)", "peak RSS of the whole apply (GB)",
                  "frozen base, float → held (GB)", "s / step"], body, "lrrrr", spaced_rule=True), "",
        "Peak RSS while training: the process's high-water mark from the first training step to the last (the FP "
        "teacher qpass.apply keeps, the graph module, the optimizer state, the activations). The whole apply's peak "
        "also covers capture and the quantize pass, which hold the float copy of the weights before qat packs them. "
        "base packed: the frozen quantized weights are held as their codes (4-bit: two a byte) and decoded on the fly "
        "(qpass.qat.packed_base), and autograd keeps a reference instead of each decoded weight.",
    ])
    print(text)
    if args.out:
        replace_section(args.out, SECTION, text)
        print(f"[bench_qlora] wrote the {SECTION} section of {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
