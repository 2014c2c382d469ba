"""Per-window scores of recipes and paired bootstrap intervals of their differences (how much of a gap is noise).

    python tools/paired_windows.py MODEL_DIR --recipe NAME=R.yaml [--recipe ...] [--compare A:B ...]
                                   [--gap RTN:ROW] [--json OUT.json] [--window 256] [--calib-samples 32]
                                   [--max-eval-tokens N] [--bootstrap 5000]

Every recipe is applied to the same FP model with the same calibration windows as ``tools/eval.py --table`` (the
texts of MODEL_DIR/qpass_data.json, the first --calib-samples windows, seed 0 before each recipe) and scored on
the same eval windows; the summed NLL and KL(FP‖Q) of every window are kept (and written to --json; a --json file
that exists already is read first, so recipes can be added run by run). Then, for each --compare A:B, the
perplexity and KL differences A − B, with 95% intervals from a paired bootstrap over the eval windows (windows
resampled with replacement, the same resample for both rows); for each --gap RTN:ROW, the fraction of RTN's
perplexity gap to FP32 that ROW closes, with its interval. ``FP32`` names the unquantized model.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

FP = "FP32"


def window_scores(model_dir: str, recipes: list[tuple[str, str]], *, window: int = 256, calib_samples: int = 32,
                  max_eval_tokens: int | None = None, rows: dict | None = None) -> dict:
    """{name: {nll: [...], kl: [...], n_pred: [...], n_tok: [...]}} for FP32 and each (name, recipe path)."""
    import transformers
    from torch.nn import functional as F

    import qpass
    from qpass.calibration import logits_of
    from qpass.cli._common import data_files, token_ids
    from qpass.eval import windows

    named = data_files(model_dir)
    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eval_ids, calib_ids = token_ids(tok, named["eval"]), token_ids(tok, named["calib"])
    if max_eval_tokens:
        eval_ids = eval_ids[:max_eval_tokens]
    calib = [w.unsqueeze(0) for w in calib_ids.split(window) if w.numel() == window][:calib_samples]
    wins = windows(eval_ids, window)

    def logprobs(m):
        with torch.no_grad():
            return [F.log_softmax(logits_of(m(w.unsqueeze(0)))[0].float(), -1) for w in wins]

    ref = logprobs(model)
    counts = {"n_pred": [w.numel() - 1 for w in wins], "n_tok": [w.numel() for w in wins]}

    def scored(out):
        nll = [float(-o[:-1].gather(-1, w[1:, None]).sum()) for o, w in zip(out, wins)]
        kl = [float((r.exp() * (r - o)).sum()) for r, o in zip(ref, out)]
        return {"nll": nll, "kl": kl, **counts}

    rows = dict(rows or {})
    rows[FP] = scored(ref)
    for name, path in recipes:
        torch.manual_seed(0)
        rows[name] = scored(logprobs(qpass.apply(model, path, calib_data=calib, progress=False)))
    return rows


def _totals(row: dict, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(perplexity, KL per token), over the windows `idx` ([B, W] resamples) or all of them."""
    cols = {k: torch.tensor(row[k], dtype=torch.float64) for k in ("nll", "kl", "n_pred", "n_tok")}
    if idx is None:
        return (cols["nll"].sum() / cols["n_pred"].sum()).exp(), cols["kl"].sum() / cols["n_tok"].sum()
    return ((cols["nll"][idx].sum(1) / cols["n_pred"][idx].sum(1)).exp(),
            cols["kl"][idx].sum(1) / cols["n_tok"][idx].sum(1))


def _ci(x: torch.Tensor) -> tuple[float, float]:
    return float(torch.quantile(x, 0.025)), float(torch.quantile(x, 0.975))


def compare(rows: dict, pairs: list[tuple[str, str]], gaps: list[tuple[str, str]], n_boot: int = 5000,
            seed: int = 0) -> list[dict]:
    """Differences A − B (perplexity, KL) and gap fractions with 95% paired-bootstrap intervals."""
    n_win = len(rows[FP]["nll"])
    idx = torch.randint(0, n_win, (n_boot, n_win), generator=torch.Generator().manual_seed(seed))
    out = []
    for a, b in pairs:
        (pa, ka), (pb, kb) = _totals(rows[a]), _totals(rows[b])
        (ba, bka), (bb, bkb) = _totals(rows[a], idx), _totals(rows[b], idx)
        out.append({"a": a, "b": b, "ppl": float(pa - pb), "ppl_ci": _ci(ba - bb), "kl": float(ka - kb),
                    "kl_ci": _ci(bka - bkb)})
    for base, row in gaps:
        (pf, _), (pr, _), (pq, _) = _totals(rows[FP]), _totals(rows[base]), _totals(rows[row])
        (bf, _), (br, _), (bq, _) = _totals(rows[FP], idx), _totals(rows[base], idx), _totals(rows[row], idx)
        out.append({"gap_of": base, "closed_by": row, "fraction": float((pr - pq) / (pr - pf)),
                    "fraction_ci": _ci((br - bq) / (br - bf))})
    return out


def _pair(text: str, what: str) -> tuple[str, str]:
    a, sep, b = text.partition(":")
    if not sep or not a or not b:
        raise SystemExit(f"{what} {text!r}: expected A:B")
    return a, b


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--recipe", action="append", default=[], metavar="NAME=R.yaml")
    ap.add_argument("--compare", action="append", default=[], metavar="A:B")
    ap.add_argument("--gap", action="append", default=[], metavar="RTN:ROW")
    ap.add_argument("--json", dest="json_path")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--max-eval-tokens", type=int)
    ap.add_argument("--bootstrap", type=int, default=5000)
    args = ap.parse_args(argv)
    recipes = []
    for r in args.recipe:
        name, sep, path = r.partition("=")
        if not sep or not os.path.isfile(path):
            raise SystemExit(f"--recipe {r!r}: expected NAME=R.yaml with an existing file")
        recipes.append((name, path))
    old = {}
    if args.json_path and os.path.exists(args.json_path):
        with open(args.json_path, encoding="utf-8") as f:
            old = json.load(f)["rows"]
    rows = window_scores(args.model_dir, recipes, window=args.window, calib_samples=args.calib_samples,
                         max_eval_tokens=args.max_eval_tokens, rows=old)
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump({"model": args.model_dir, "window": args.window, "calib_samples": args.calib_samples,
                       "rows": rows}, f)
    print(f"{args.model_dir}: {len(rows[FP]['nll'])} eval windows of {args.window}")
    for name, row in rows.items():
        p, k = _totals(row)
        print(f"  {name}: perplexity {float(p):.3f}, KL {float(k):.5f}")
    pairs = [_pair(c, "--compare") for c in args.compare]
    gaps = [_pair(g, "--gap") for g in args.gap]
    for name in {n for p in pairs + gaps for n in p} - set(rows):
        raise SystemExit(f"{name!r} is not a scored row ({', '.join(rows)})")
    for r in compare(rows, pairs, gaps, args.bootstrap):
        if "a" in r:
            print(f"  {r['a']} − {r['b']}: perplexity {r['ppl']:+.3f} [95% CI {r['ppl_ci'][0]:+.3f}, "
                  f"{r['ppl_ci'][1]:+.3f}], KL {r['kl']:+.5f} [{r['kl_ci'][0]:+.5f}, {r['kl_ci'][1]:+.5f}]")
        else:
            print(f"  {r['closed_by']} closes {100 * r['fraction']:.0f}% of {r['gap_of']}'s perplexity gap to FP32 "
                  f"[95% CI {100 * r['fraction_ci'][0]:.0f}%, {100 * r['fraction_ci'][1]:.0f}%]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
