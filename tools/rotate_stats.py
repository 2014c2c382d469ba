"""Activation statistics at every linear input before and after the rotate pass (QuaRot's sanity check).

    python tools/rotate_stats.py MODEL_DIR [MODEL_DIR ...] [--calib TEXT] [--window 256] [--samples 8]
                                 [--online/--no-online] [--doc docs/results_rotate.md]

For each linear (lm_head included) the calibration windows are run once through the FP graph and once through
the graph after ``rotate`` (``kind: hadamard, seed: 0``; with ``online: true, heads: true`` unless --no-online),
and the input the linear reads is summarised:

  max/median   max_j |X_j| / median_j |X_j| over the per-channel absmax (the outlier ratio per-token quantizers
               suffer from),
  kurtosis     E[(x - mean)^4] / var^2 over all elements of the input (3 for a Gaussian; outlier-heavy
               activations are far above it).

With --doc the tables replace the part of that file between ``<!-- rotate-stats:begin -->`` and
``<!-- rotate-stats:end -->`` (the rest of the file is left alone); without it they are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import qpass  # noqa: E402
from qpass import Recipe  # noqa: E402
from qpass.calibration import CalibrationSet, observe  # noqa: E402
from qpass.graph import linear_sites  # noqa: E402
from qpass.passes import RotateConfig  # noqa: E402
from qpass.plan import occurrences  # noqa: E402
from qpass.tables import markdown  # noqa: E402

BEGIN, END = "<!-- rotate-stats:begin -->", "<!-- rotate-stats:end -->"


class InputMoments:
    """Per-channel absmax and the first four moments of every element of a linear's input."""

    def __init__(self):
        self.absmax, self.n, self.s = None, 0, torch.zeros(4, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        a = x.abs().amax(0)
        self.absmax = a if self.absmax is None else torch.maximum(self.absmax, a)
        self.n += x.numel()
        self.s += torch.stack([x.sum(), (x ** 2).sum(), (x ** 3).sum(), (x ** 4).sum()])

    def ratio(self) -> float:
        return float(self.absmax.max() / self.absmax.median().clamp_min(1e-12))

    def kurtosis(self) -> float:
        m1, m2, m3, m4 = (self.s / self.n).tolist()
        var = m2 - m1 * m1
        return (m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1 ** 4) / max(var * var, 1e-30)


def linear_inputs(gm, calib: CalibrationSet) -> dict[tuple[str, int], InputMoments]:
    sites = linear_sites(gm)
    paths = [s.path or s.node.name for s in sites]
    nodes = {(p, at): s.input for s, p, at in zip(sites, paths, occurrences(paths))}
    return observe(gm, nodes, lambda k, n: InputMoments(), calib, progress=False)


def model_table(model_dir: str, calib_path: str | None, window: int, samples: int, online: bool) -> str:
    import transformers

    if calib_path is None:
        with open(os.path.join(model_dir, "qpass_data.json")) as f:
            calib_path = os.path.join(ROOT, json.load(f)["calib"])
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with open(calib_path, encoding="utf-8") as f:
        ids = torch.tensor(tok(f.read())["input_ids"], dtype=torch.long)
    windows = [w.unsqueeze(0) for w in ids.split(window) if w.numel() == window][:samples]
    calib = CalibrationSet(windows)
    gm = qpass.capture(model)
    before = linear_inputs(gm, calib)
    cfg = RotateConfig(kind="hadamard", seed=0, online=online, heads=online)
    after = linear_inputs(qpass.apply(gm, Recipe([cfg]), progress=False).graph_module, calib)
    rows, sums = [], [0.0] * 4
    for key, b in before.items():
        a = after[key]
        vals = [b.ratio(), a.ratio(), b.kurtosis(), a.kurtosis()]
        sums = [s + v for s, v in zip(sums, vals)]
        rows.append([key[0] + (f" ({key[1]})" if key[1] else "")] + [f"{v:.1f}" for v in vals])
    rows.append(["**mean over linears**"] + [f"**{s / len(before):.1f}**" for s in sums])
    head = (f"### {os.path.basename(os.path.normpath(model_dir))}\n\n"
            f"calibration: {os.path.relpath(calib_path, ROOT)}, {len(windows)} windows of {window} tokens; rotate "
            f"kind hadamard, seed 0, online {str(online).lower()}, heads {str(online).lower()}\n\n")
    return head + markdown(["linear input", "max/median before", "max/median after", "kurtosis before",
                            "kurtosis after"], rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dirs", nargs="+")
    ap.add_argument("--calib", dest="calib_path")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--online", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--doc", help="Markdown file whose rotate-stats section is replaced")
    args = ap.parse_args(argv)
    tables = [model_table(m, args.calib_path, args.window, args.samples, args.online) for m in args.model_dirs]
    cmd = "python tools/rotate_stats.py " + " ".join(argv if argv is not None else sys.argv[1:])
    body = f"```\n{cmd}\n```\n\n" + "\n\n".join(tables)
    if args.doc is None:
        print(body)
        return 0
    with open(args.doc, encoding="utf-8") as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        print(f"{args.doc} has no {BEGIN} ... {END} section", file=sys.stderr)
        return 1
    pre, rest = text.split(BEGIN, 1)
    post = rest.split(END, 1)[1]
    with open(args.doc, "w", encoding="utf-8") as f:
        f.write(f"{pre}{BEGIN}\n{body}\n{END}{post}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
