"""What the torch backend's approximate kernels cost in perplexity on the bundled models.

    python tools/kernel_accuracy.py [--model models/tiny-llama ...] [--recipe w4a16_g128.yaml ...]
                                    [--kernels exact,q4a8,q8a8] [--eval-tokens N] [--out docs/benchmarks.md]

For each model and recipe (presets in recipes/, weight-only: no calibration), the fake-quant model and the model
lowered by the torch backend with each kernel policy in --kernels (a kernel name forces that kernel wherever it
applies and at every M bucket, so every token of every window goes through it; a kernel that applies to none of a
recipe's layers gets no row for it; 'exact' allows only the exact kernels) score the same held-out windows of 256 tokens (the text the model's qpass_data.json names for eval).
Rows: perplexity, its difference from the fake-quant model's with a 95% interval paired over windows, whether
that is within noise, KL(fake-quant ‖ lowered) per token and top-1 agreement with the fake-quant model. This is
the measurement behind the choice of approximate kernels under the default policy ('auto': the fastest measured
kernel, exact or not). The table goes between the <!-- BEGIN kernel-accuracy --> and <!-- END kernel-accuracy -->
lines of --out; the rest of the file is kept.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import qpass  # noqa: E402
from qpass.backends import torch_packed as tp  # noqa: E402
from qpass.cli._common import data_files, display, load_model, load_tokenizer, token_ids  # noqa: E402
from qpass.eval import windows  # noqa: E402
from qpass.tables import markdown, replace_section  # noqa: E402

WINDOW = 256
SECTION = "kernel-accuracy"
MODELS = [os.path.join(ROOT, "models", "tiny-llama"), os.path.join(ROOT, "models", "tiny-opt")]


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean per-window difference b - a (mean NLL per window) and its 95% half-width over the windows."""
    d = [y - x for x, y in zip(a, b)]
    if len(d) < 2:
        return (d[0] if d else 0.0), float("nan")
    return statistics.fmean(d), 1.96 * statistics.stdev(d) / math.sqrt(len(d))


def kernels_used(pm) -> list[str]:
    """Kernel names in the lowered model's plans (over modules and M buckets)."""
    names = set()
    for m in pm.graph_module.modules():
        if isinstance(m, tp.PackedLinear):
            names.update(m.plan.values())
    return sorted(names)


def score(runners: dict, wins: list) -> dict:
    acc = {n: {"nll": 0.0, "kl": 0.0, "agree": 0, "window_nll": []} for n in runners}
    tokens = 0
    with torch.no_grad():
        for w in wins:
            ref = None
            for name, run in runners.items():
                lp = F.log_softmax(run(w.unsqueeze(0))[0, :-1].float(), -1)
                ref = lp if ref is None else ref
                a = acc[name]
                nll = F.nll_loss(lp, w[1:], reduction="sum")
                a["window_nll"].append(float(nll) / (w.numel() - 1))
                a["nll"] += float(nll)
                a["kl"] += float((ref.exp() * (ref - lp)).sum())
                a["agree"] += int((lp.argmax(-1) == ref.argmax(-1)).sum())
            tokens += w.numel() - 1
    return {n: {"perplexity": math.exp(a["nll"] / tokens), "kl": a["kl"] / tokens, "top1": a["agree"] / tokens,
                "window_nll": a["window_nll"]} for n, a in acc.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", default=[], help="model directory (default: both bundled models)")
    ap.add_argument("--recipe", action="append", default=[], help="preset in recipes/ (default: w4a16_g128.yaml, "
                    "w4a16.yaml, w8a16.yaml)")
    ap.add_argument("--kernels", default="exact,q4a8,q8a8", help="comma-separated policies / kernel names")
    ap.add_argument("--eval-tokens", type=int, default=0, help="held-out tokens (0: the whole eval text)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    models = args.model or [m for m in MODELS if os.path.isdir(m)]
    recipes = args.recipe or ["w4a16_g128.yaml", "w4a16.yaml", "w8a16.yaml"]
    policies = [p.strip() for p in args.kernels.split(",") if p.strip()]
    t0 = time.perf_counter()
    sections = []
    for model_dir in models:
        named = data_files(model_dir)
        ids = token_ids(load_tokenizer(model_dir, "kernel_accuracy"), named["eval"])
        if args.eval_tokens:
            ids = ids[: args.eval_tokens]
        wins = windows(ids, WINDOW)
        model = load_model(model_dir)
        body = []
        for recipe in recipes:
            qm = qpass.apply(model, os.path.join(ROOT, "recipes", recipe), progress=False)
            runners = {"fake-quant": lambda x, qm=qm: qm(x).logits}
            used = {}
            for pol in policies:
                pm = tp.lower(qm, kernels=pol, repeats=1)
                if pol in tp.kernels.KERNELS and pol not in kernels_used(pm):
                    continue                                # applies to none of this recipe's layers
                used[pol] = kernels_used(pm)
                runners[pol] = lambda x, pm=pm: pm(x).logits
            res = score(runners, wins)
            base = res["fake-quant"]
            body.append([recipe, "fake-quant graph", "–", f"{base['perplexity']:.3f}", "–", "–", "–", "–", "–"])
            for pol in used:
                r = res[pol]
                m, hw = paired(base["window_nll"], r["window_nll"])
                body.append([recipe, pol, ", ".join(used[pol]), f"{r['perplexity']:.3f}",
                             f"{base['perplexity'] * math.expm1(m):+.4f}", f"±{base['perplexity'] * hw:.4f}",
                             "yes" if abs(m) <= hw else "no", f"{r['kl']:.6f}", f"{100 * r['top1']:.2f}%"])
            print(f"{display(model_dir)} {recipe}: " + ", ".join(f"{n} {v['perplexity']:.3f}" for n, v in res.items()),
                  flush=True)
        sections.append(f"### {display(model_dir)}\n\n{len(wins)} windows of {WINDOW} tokens of "
                        f"`{display(named['eval'])}` ({sum(w.numel() for w in wins):,} tokens).\n\n" + markdown(
                            ["recipe", "kernel policy", "kernels used", "perplexity", "Δ vs fake-quant",
                             "95% interval (paired, over windows)", "within noise", "KL(fake-quant ‖ lowered)/token",
                             "top-1 agreement"], body, "lllrrrlrr", spaced_rule=True))
    cmd = "python tools/kernel_accuracy.py " + " ".join(a if " " not in a else repr(a) for a in (argv or sys.argv[1:]))
    head = (f"Generated by `{cmd.strip()}` on {datetime.date.today().isoformat()} in "
            f"{time.perf_counter() - t0:.0f} s (do not edit by hand; rerun the command). torch {torch.__version__}, "
            f"native kernels: {tp.native.status()}. A kernel name forces that kernel at every M bucket wherever it "
            "applies (the rest use the dequant fallback); 'exact': exact kernels only, measured.")
    replace_section(args.out, SECTION, head + "\n\n" + "\n\n".join(sections))
    print(f"wrote {display(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
