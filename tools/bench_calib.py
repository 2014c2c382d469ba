"""Calibration cost of recipes: wall time and peak resident memory, one fresh process per recipe.

    python tools/bench_calib.py MODEL_DIR --recipe R.yaml [--recipe ...] [--set gptq.sequential=false ...]
                                [--stream] [--calib TEXT] [--window 256] [--calib-samples 32] [--json OUT.json]

Each recipe runs in its own Python process (so peak RSS is that recipe's): load the model and the
calibration windows (same windows as tools/eval.py), record the resident set size, run ``qpass.apply``, and
report its seconds, the RSS before it, the process's peak RSS (``ru_maxrss``) and the peak minus the RSS
before (what calibration added). ``--set PASS.KEY=VALUE`` overrides an option of every pass of that kind
(YAML value), e.g. ``--set gptq.sequential=false`` to compare with whole-model calibration.

``--stream`` runs ``qpass.apply_from_disk`` instead: the model is not loaded (the weights stay in MODEL_DIR's
safetensors), and the seconds include writing the quantized model to a temporary directory (removed after);
the table adds the most parameter bytes the weight store held at once.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def one(args) -> dict:
    import torch
    import transformers
    import yaml

    import qpass
    from qpass.cli._common import data_files, token_ids

    torch.manual_seed(args.seed)
    calib_path = args.calib_path or data_files(args.model_dir).get("calib")   # the eval text is not read
    tok = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    model = None if args.stream else \
        transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    ids = token_ids(tok, calib_path)
    calib = [w.unsqueeze(0) for w in ids.split(args.window) if w.numel() == args.window][: args.calib_samples]
    with open(args.recipe[0]) as f:
        recipe = yaml.safe_load(f)
    for item in args.set:
        key, value = item.split("=", 1)
        kind, opt = key.split(".", 1)
        for p in recipe["passes"]:
            if kind in p:
                p[kind] = dict(p[kind] or {}, **{opt: yaml.safe_load(value)})
    before = rss_mib()
    t0 = time.perf_counter()
    loaded = None
    if args.stream:
        with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.model_dir))) as tmp:
            res = qpass.apply_from_disk(args.model_dir, recipe, os.path.join(tmp, "out"), calib_data=calib,
                                        progress=False)
            loaded = res.peak_bytes / 2**20
    else:
        qpass.apply(model, recipe, calib_data=calib, progress=False)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"recipe": os.path.basename(args.recipe[0]), "set": args.set, "stream": args.stream, "seconds": seconds,
            "rss_before_mib": before, "peak_rss_mib": peak, "added_mib": peak - before,
            "weights_in_memory_mib": loaded, "calib_samples": len(calib), "window": args.window}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--recipe", action="append", default=[], required=True)
    ap.add_argument("--set", action="append", default=[], help="PASS.KEY=VALUE override (repeatable)")
    ap.add_argument("--calib", dest="calib_path")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stream", action="store_true", help="qpass.apply_from_disk: weights stay on disk")
    ap.add_argument("--json", dest="json_path")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args)))
        return 0
    rows = []
    for recipe in args.recipe:
        cmd = [sys.executable, os.path.abspath(__file__), args.model_dir, "--one", "--recipe", recipe,
               "--window", str(args.window), "--calib-samples", str(args.calib_samples), "--seed", str(args.seed)]
        cmd += [x for s in args.set for x in ("--set", s)] + (["--calib", args.calib_path] if args.calib_path else [])
        cmd += ["--stream"] if args.stream else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"error: {recipe} failed:\n{proc.stderr[-3000:]}")
        out = proc.stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    sets = f" (--set {', --set '.join(args.set)})" if args.set else ""
    mode = "streaming (qpass.apply_from_disk)" if args.stream else "in memory (qpass.apply)"
    print(f"model {args.model_dir}, {mode}; {rows[0]['calib_samples']} calibration windows of {args.window} "
          f"tokens{sets}")
    from qpass.tables import markdown

    head = ["recipe", "calibration s", "RSS before MiB", "peak RSS MiB", "added MiB"]
    body = [[r["recipe"], f"{r['seconds']:.1f}", f"{r['rss_before_mib']:.0f}", f"{r['peak_rss_mib']:.0f}",
             f"{r['added_mib']:.0f}"] + ([f"{r['weights_in_memory_mib']:.0f}"] if args.stream else []) for r in rows]
    print(markdown(head + (["weights in memory MiB"] if args.stream else []), body))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"model": args.model_dir, "set": args.set, "rows": rows, "command": " ".join(sys.argv)}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
