"""Per-channel activation outliers at every linear input: max / median of the per-channel absmax.

    python tools/act_outliers.py MODEL_DIR [--calib TEXT] [--window 256] [--samples 16] [--alpha 0.5]

For each folding group's input (qpass.folding: norm -> q/k/v, norm -> gate/up, v -> o, up -> down) the
calibration windows are run once and the per-channel absmax is collected; the table shows the outlier ratio
max_j |X_j| / median_j |X_j| before and after SmoothQuant with the given alpha, and the largest channels.
SmoothQuant helps when this ratio is large (LLMs >= 6.7B show ratios in the hundreds); when it is small,
per-token int8 activations are already close to lossless and there is little left to migrate.
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
from qpass.folding import analyze  # noqa: E402
from qpass.passes import SmoothQuantConfig  # noqa: E402
from qpass.passes.smoothquant import InputStats  # noqa: E402
from qpass.tables import markdown  # noqa: E402



def calib_text(model_dir: str, path: str | None) -> str:
    if path is None:
        with open(os.path.join(model_dir, "qpass_data.json")) as f:
            path = os.path.join(ROOT, json.load(f)["calib"])
    return path


def ratios(gm, calib: CalibrationSet) -> dict[str, torch.Tensor]:
    groups = analyze(gm).groups
    nodes = {g.name: g.consumers[0].site.input for g in groups}
    stats = observe(gm, nodes, lambda k, n: InputStats(0), calib, progress=False)
    return {k: v.absmax for k, v in stats.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--calib", dest="calib_path")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=0.5)
    args = ap.parse_args(argv)

    import transformers

    calib_path = calib_text(args.model_dir, args.calib_path)
    tok = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    with open(calib_path, encoding="utf-8") as f:
        ids = torch.tensor(tok(f.read())["input_ids"], dtype=torch.long)
    windows = [w.unsqueeze(0) for w in ids.split(args.window) if w.numel() == args.window][: args.samples]
    calib = CalibrationSet(windows)
    gm = qpass.capture(model)
    before = ratios(gm, calib)
    sq = qpass.apply(gm, Recipe([SmoothQuantConfig(alpha=args.alpha, ignore=("lm_head",))]), calib_data=windows,
                     progress=False).graph_module
    after = ratios(sq, calib)
    print(f"model {args.model_dir}; calib {os.path.relpath(calib_path, ROOT)} ({len(windows)} windows of "
          f"{args.window}); SmoothQuant alpha {args.alpha}")
    body = []
    for name, a in before.items():
        top = torch.topk(a, 3)
        tops = ", ".join(f"{int(i)} ({float(v):.2f})" for v, i in zip(top.values, top.indices))
        b = after.get(name)
        shown = f"{float(b.max() / b.median()):.1f}" if b is not None else "-"
        body.append([name, f"{float(a.max() / a.median()):.1f}", shown, tops])
    print(markdown(["linear input (group)", "max/median channel absmax", "after SmoothQuant",
                    "top channels (absmax)"], body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
