"""ONNX rows of the benchmark: qpass's ONNX graphs vs the FP32 ONNX of the same model and vs onnxruntime's own
``MatMulNBitsQuantizer`` applied to that FP32 ONNX, all in onnxruntime (CPU).

    python tools/bench_onnx.py [--model models/tiny-llama] [--eval data/austen/eval.txt] [--threads 1]
                               [--prompt 128] [--new-tokens 64] [--repeats 5] [--eval-tokens 0 (all)]
                               [--levels 0,4]
    python tools/bench_onnx.py --parity [--eval-tokens 4096] [--levels 0,4] [--recipe R.yaml ...]
                               # ORT logits and perplexity vs the fake-quant model (default recipes: w8a8,
                               # w4a16_g128, w4a8_kv4; --recipe: any presets in recipes/, e.g. W+A rows)

--levels: the ``session.qdq_matmulnbits_accuracy_level`` values of the W4A16 rows (onnxruntime's
DequantizeLinear+MatMul -> MatMulNBits fusion; 0/1: fp32 math, 4: int8 activations inside the kernel). With
more than one level, a second table compares each level's perplexity with the first level's on the same
windows: the difference and its 95% interval over the windows (paired), the noise the decision is read against.

Rows: prefill tokens/s (one step over a PROMPT-token prompt, empty cache), decode tokens/s (NEW one-token
steps after that prompt, growing cache); over EVAL-TOKENS held-out tokens (windows of 256): perplexity, and
KL(FP32 ‖ variant) per token and top-1 agreement against the FP32 ONNX row.
Every variant runs through the same feed loop (``onnx_qdq.runtime.DecoderRunner``); timings are medians
over REPEATS rounds that visit the variants in turn, so load from other processes spreads over all rows.
``onnx_rows(...)`` returns the rows for tools/bench.py.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WINDOW = 256                   # tokens per held-out window (perplexity, KL, parity)
PARITY_EVAL_TOKENS = 4096      # --parity without --eval-tokens: 16 windows (docs/onnx.md's table)


def build(model, work: str, levels=(0, 4)) -> dict[str, tuple[str, dict]]:
    """{row name: (model directory or file, session config)}."""
    import qpass

    def ours(recipe: str) -> str:
        out = os.path.join(work, os.path.basename(recipe)[:-5])
        if not os.path.isfile(os.path.join(out, "model.onnx")):
            shutil.rmtree(out, ignore_errors=True)
            qpass.lower(qpass.apply(model, os.path.join(ROOT, "recipes", recipe), progress=False), "onnx", out)
        return out

    fp32 = ours("w16.yaml")
    rows = {"FP32 (ONNX, same exporter)": (fp32, {})}
    w4, w4_full = ours("w4a16_g128.yaml"), ours("w4a16_g128_full_range.yaml")
    for level in levels:
        acc = {"session.qdq_matmulnbits_accuracy_level": str(level)}
        rows[f"qpass W4A16 g128, acc {level}"] = (w4, acc)
        rows[f"qpass W4A16 g128 full_range, acc {level}"] = (w4_full, acc)
        rows[f"ORT MatMulNBitsQuantizer g128 sym, acc {level}"] = (ort_quantized(fp32, work, level), {})
    rows["qpass W8A8 (per-token)"] = (ours("w8a8.yaml"), {})
    rows["qpass W4A8KV4 (MatMulNBits acc 4)"] = (ours("w4a8_kv4.yaml"), {})
    return rows


def ort_quantized(fp32_dir: str, work: str, level: int, name: str | None = None) -> str:
    """onnxruntime's MatMulNBitsQuantizer (RTN, block 128, symmetric) on the FP32 ONNX, lm_head excluded (as
    in qpass's recipes); written to `work`/`name` (default ort_nbits_acc<level>.onnx) unless it is there."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # per-node INFO

    out = os.path.join(work, name or f"ort_nbits_acc{level}.onnx")
    if os.path.isfile(out):
        return out
    model = onnx.load(os.path.join(fp32_dir, "model.onnx"))
    lm_head = [n.name for n in model.graph.node if "logits" in n.output]
    cfg = DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True, accuracy_level=level)
    q = MatMulNBitsQuantizer(model, block_size=128, is_symmetric=True, accuracy_level=level,
                             nodes_to_exclude=lm_head, algo_config=cfg)
    q.process()
    q.model.save_model_to_file(out, use_external_data_format=False)
    return out


def measure(rows: dict, ids, eval_ids, *, threads: int, prompt: int, new_tokens: int, repeats: int) -> list[dict]:
    import torch

    from qpass.backends.onnx_qdq import runtime
    from qpass.eval import windows

    runners = {name: runtime.DecoderRunner(runtime.session(path, threads=threads, config=cfg))
               for name, (path, cfg) in rows.items()}
    x = ids[:prompt].unsqueeze(0)
    times = {name: {"prefill": [], "decode": []} for name in rows}
    for _ in range(repeats):
        for name, run in runners.items():
            t0 = time.perf_counter()
            logits = run(x, torch.arange(prompt))
            t1 = time.perf_counter()
            tok = logits[:, -1:].argmax(-1)
            for i in range(new_tokens):
                tok = run(tok, torch.tensor([prompt + i]))[:, -1:].argmax(-1)
            t2 = time.perf_counter()
            times[name]["prefill"].append(prompt / (t1 - t0))
            times[name]["decode"].append(new_tokens / (t2 - t1))
    quality = _quality(runners, eval_ids)
    out = []
    for name in runners:
        path = rows[name][0]
        out.append({"variant": name, "prefill_tok_s": statistics.median(times[name]["prefill"]),
                    "decode_tok_s": statistics.median(times[name]["decode"]), **quality[name],
                    "bytes": _size(path)})
    return out


def _quality(runners: dict, eval_ids) -> dict[str, dict]:
    """Perplexity of every variant over non-overlapping 256-token windows of `eval_ids`, and its mean
    KL(first variant ‖ variant) per token and top-1 agreement with the first variant (the FP32 model)."""
    import torch
    import torch.nn.functional as F

    from qpass.eval import windows

    names = list(runners)
    acc = {name: {"nll": 0.0, "kl": 0.0, "agree": 0, "window_nll": []} for name in names}
    n = 0
    for w in windows(eval_ids, WINDOW):
        ref = None
        for name in names:
            lp = F.log_softmax(runners[name](w.unsqueeze(0), torch.arange(w.numel()))[0, :-1].float(), -1)
            ref = lp if ref is None else ref
            a = acc[name]
            a["window_nll"].append(float(F.nll_loss(lp, w[1:], reduction="mean")))
            a["nll"] += float(F.nll_loss(lp, w[1:], reduction="sum"))
            a["kl"] += float((ref.exp() * (ref - lp)).sum())
            a["agree"] += int((lp.argmax(-1) == ref.argmax(-1)).sum())
        n += w.numel() - 1
    return {name: {"perplexity": math.exp(a["nll"] / n), "kl": a["kl"] / n, "top1": a["agree"] / n,
                   "window_nll": a["window_nll"]} for name, a in acc.items()}


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean per-window difference b - a of mean NLL over the same windows, and its 95% half-width
    (1.96 standard errors over the windows)."""
    d = [y - x for x, y in zip(a, b)]
    if len(d) < 2:
        return (d[0] if d else 0.0), float("nan")
    return statistics.fmean(d), 1.96 * statistics.stdev(d) / math.sqrt(len(d))


def level_table(rows: list[dict], levels) -> str:
    """Each accuracy level against the first of `levels`, per W4 row family (same windows, paired): Δ perplexity
    (exp of the mean per-window NLL difference, times the first level's perplexity) with its 95% interval; the
    first level's own distance from FP32 for scale."""
    from qpass.tables import markdown

    by = {r["variant"]: r for r in rows}
    fp = rows[0]
    body = []
    for fam in ("qpass W4A16 g128", "qpass W4A16 g128 full_range", "ORT MatMulNBitsQuantizer g128 sym"):
        base = by.get(f"{fam}, acc {levels[0]}")
        if base is None:
            continue
        q, qw = paired(fp["window_nll"], base["window_nll"])
        body.append([f"{fam}, acc {levels[0]} vs FP32", f"{base['perplexity']:.3f}",
                     f"{fp['perplexity'] * math.expm1(q):+.3f}", f"±{fp['perplexity'] * qw:.3f}", "-"])
        for lv in levels[1:]:
            r = by.get(f"{fam}, acc {lv}")
            if r is None:
                continue
            m, hw = paired(base["window_nll"], r["window_nll"])
            body.append([f"{fam}, acc {lv} vs acc {levels[0]}", f"{r['perplexity']:.3f}",
                         f"{base['perplexity'] * math.expm1(m):+.3f}", f"±{base['perplexity'] * hw:.3f}",
                         "yes" if abs(m) <= hw else "no"])
    return markdown(["comparison", "perplexity", "Δ perplexity", "95% interval (paired, over windows)",
                     "within noise"], body, "lrrrl")


def _size(path: str) -> int:
    files = [os.path.join(path, f) for f in os.listdir(path) if f.startswith("model.onnx")] \
        if os.path.isdir(path) else [path]
    return sum(os.path.getsize(f) for f in files)


def onnx_rows(model_dir: str, eval_file: str, *, threads: int = 1, prompt: int = 128, new_tokens: int = 64,
              repeats: int = 5, eval_tokens: int = 4096, work: str | None = None,
              levels=(0, 4)) -> list[dict]:
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with open(eval_file, encoding="utf-8") as f:
        ids = tok(f.read(), return_tensors="pt").input_ids[0]
    work = work or os.path.join(ROOT, ".cache", "bench-onnx", os.path.basename(os.path.normpath(model_dir)))
    os.makedirs(work, exist_ok=True)
    rows = build(model, work, levels)
    return measure(rows, ids, ids[:eval_tokens] if eval_tokens else ids, threads=threads, prompt=prompt, new_tokens=new_tokens,
                   repeats=repeats)


def parity_rows(model_dir: str, eval_file: str, calib_file: str, recipes: list[str], *, windows_n: int = 4,
                eval_tokens: int = 4096, levels=(0, 4)) -> list[dict]:
    """ORT logits vs the fake-quant QuantizedModel per recipe (calibrated on 16 x 256 tokens of calib_file):
    max / mean |Δlogit| over `windows_n` held-out windows of 256, perplexity of both over `eval_tokens` (0: all).
    Weight-only (a16) recipes run once per accuracy level of `levels` (the MatMulNBits fusion's), the others
    with the level recorded at lowering."""
    import torch
    import transformers

    import qpass
    from qpass.backends import onnx_qdq
    from qpass.eval import perplexity, windows

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    read = lambda f: tok(open(f, encoding="utf-8").read(), return_tensors="pt").input_ids[0]  # noqa: E731
    calib_ids, eval_ids = read(calib_file), read(eval_file)
    eval_ids = eval_ids[:eval_tokens] if eval_tokens else eval_ids
    if eval_ids.numel() < WINDOW:
        raise ValueError(f"{eval_file}: {eval_ids.numel()} tokens to score, fewer than one window of {WINDOW}")
    calib = [w.unsqueeze(0) for w in calib_ids[: 16 * 256].split(256)]
    work = os.path.join(ROOT, ".cache", "bench-onnx", "parity")
    rows = []
    with torch.no_grad():
        for rec in recipes:
            qm = qpass.apply(model, os.path.join(ROOT, "recipes", rec), calib_data=calib, progress=False)
            out = os.path.join(work, rec[:-5])
            shutil.rmtree(out, ignore_errors=True)
            qpass.lower(qm, "onnx", out)
            runs = {"": {}} if "a16" not in rec else {f" (accuracy {lv})": {
                "session.qdq_matmulnbits_accuracy_level": str(lv)} for lv in levels}
            for suffix, cfg in runs.items():
                sess = onnx_qdq.session(out, config=cfg)
                ort_logits = lambda x, sess=sess: onnx_qdq.logits(sess, x)  # noqa: E731
                d = [(ort_logits(w.unsqueeze(0)) - qm(w.unsqueeze(0)).logits).abs()
                     for w in windows(eval_ids, WINDOW)[:windows_n]]
                rows.append({"recipe": rec + suffix, "max": max(float(x.max()) for x in d),
                             "mean": sum(float(x.mean()) for x in d) / len(d),
                             "ppl_ort": perplexity(ort_logits, eval_ids, WINDOW).perplexity,
                             "ppl_fq": perplexity(qm, eval_ids, WINDOW).perplexity})
    return rows


def compare_codes(ours_dir: str, ort_file: str) -> dict:
    """Decode the INT4 weights of a qpass W4 ONNX (DequantizeLinear initializers) and of an ORT
    MatMulNBitsQuantizer model (MatMulNBits B/scales), pair the linears in graph order, count differing codes
    and scales."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    ours, ort = onnx.load(os.path.join(ours_dir, "model.onnx")), onnx.load(ort_file)
    ui, oi = {i.name: i for i in ours.graph.initializer}, {i.name: i for i in ort.graph.initializer}
    dqs = [n for n in ours.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in ui
           and ui[n.input[0]].data_type == onnx.TensorProto.INT4]
    nbits = [n for n in ort.graph.node if n.op_type == "MatMulNBits"]
    if len(dqs) != len(nbits):
        raise SystemExit(f"{len(dqs)} int4 DequantizeLinear vs {len(nbits)} MatMulNBits: not the same layers")
    total = codes_differ = scales_differ = 0
    for dq, nb in zip(dqs, nbits):
        k, n = (a.i for a in nb.attribute if a.name in ("K", "N"))
        b = numpy_helper.to_array(oi[nb.input[1]])
        theirs = np.stack([b & 0xF, b >> 4], -1).reshape(n, -1)[:, :k].astype(np.int32) - 8
        their_s = numpy_helper.to_array(oi[nb.input[2]]).reshape(n, -1)
        mine = numpy_helper.to_array(ui[dq.input[0]]).astype(np.int32)
        my_s = numpy_helper.to_array(ui[dq.input[1]])
        if {a.name: a.i for a in dq.attribute}.get("axis", 1) == 0:      # [K, N] blocked along K
            mine, my_s = mine.T, my_s.T
        total += theirs.size
        codes_differ += int((theirs != mine).sum())
        scales_differ += int((their_s != my_s).sum())
    return {"linears": len(dqs), "codes": total, "codes_differ": codes_differ, "scales_differ": scales_differ}


def table(rows: list[dict]) -> str:
    from qpass.tables import markdown

    base = rows[0]                                   # FP32 ONNX of the same exporter
    head = ["variant", "prefill tok/s", "x FP32", "decode tok/s", "x FP32", "perplexity", "KL(FP‖Q)/token",
            "top-1 = FP", "model bytes"]
    body = [[r["variant"], f"{r['prefill_tok_s']:.0f}", f"{r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x",
             f"{r['decode_tok_s']:.1f}", f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x", f"{r['perplexity']:.3f}",
             f"{r['kl']:.5f}", f"{100 * r['top1']:.2f}%", f"{r['bytes'] / 1e6:.1f} MB"] for r in rows]
    return markdown(head, body, "l" + "r" * 8)


def parity_table(rows: list[dict]) -> str:
    from qpass.tables import markdown

    return markdown(["recipe", "max |Δlogit|", "mean |Δlogit|", "perplexity ORT", "perplexity fake-quant"],
                    [[r["recipe"], f"{r['max']:.3g}", f"{r['mean']:.3g}", f"{r['ppl_ort']:.3f}", f"{r['ppl_fq']:.3f}"]
                     for r in rows], "lrrrr")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "tiny-llama"))
    ap.add_argument("--eval", default=os.path.join(ROOT, "data", "austen", "eval.txt"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--eval-tokens", type=int, default=None,
                    help=f"held-out tokens for the quality columns, 0: all (default: all; with --parity "
                         f"{PARITY_EVAL_TOKENS}); at least one window of {WINDOW}")
    ap.add_argument("--parity", action="store_true", help="print the parity table instead of timings")
    ap.add_argument("--codes", action="store_true", help="after the table: compare the INT4 codes and scales of "
                    "qpass's full_range W4 g128 graph with MatMulNBitsQuantizer's")
    ap.add_argument("--calib", default=os.path.join(ROOT, "data", "austen", "calib.txt"))
    ap.add_argument("--recipe", action="append", default=[], metavar="R.yaml",
                    help="with --parity: a preset of recipes/ to lower and compare (repeatable; default: w8a8.yaml, "
                         "w4a16_g128.yaml, w4a8_kv4.yaml)")
    ap.add_argument("--levels", default="0,4", help="accuracy levels of the W4A16 rows, comma-separated, the "
                    "reference first (default 0,4; each of 0..4)")
    args = ap.parse_args(argv)
    raw = args.levels
    try:
        args.levels = tuple(int(v) for v in raw.split(","))
    except ValueError:
        args.levels = ()
    if not args.levels or any(v not in (0, 1, 2, 3, 4) for v in args.levels) or len(set(args.levels)) != len(args.levels):
        ap.error(f"--levels {raw}: give distinct accuracy levels 0..4, comma-separated, the reference first (e.g. 0,4)")
    if args.eval_tokens is None:
        args.eval_tokens = PARITY_EVAL_TOKENS if args.parity else 0
    if args.eval_tokens and not args.eval_tokens >= WINDOW:
        ap.error(f"--eval-tokens {args.eval_tokens}: give 0 (all) or at least one window ({WINDOW} tokens)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import onnxruntime

    if args.parity:
        recipes = [os.path.basename(r) for r in args.recipe] or ["w8a8.yaml", "w4a16_g128.yaml", "w4a8_kv4.yaml"]
        missing = [r for r in recipes if not os.path.isfile(os.path.join(ROOT, "recipes", r))]
        if missing:
            raise SystemExit(f"bench_onnx.py: --recipe {missing[0]} is not a preset in recipes/")
        rows = parity_rows(args.model, args.eval, args.calib, recipes, eval_tokens=args.eval_tokens,
                           levels=args.levels)
        print(parity_table(rows))
        return 0

    rows = onnx_rows(args.model, args.eval, threads=args.threads, prompt=args.prompt, new_tokens=args.new_tokens,
                     repeats=args.repeats, eval_tokens=args.eval_tokens, levels=args.levels)
    print(f"onnxruntime {onnxruntime.__version__}, CPU, {args.threads} thread(s), prompt {args.prompt}, "
          f"{args.new_tokens} decode steps, median of {args.repeats}; quality over "
          f"{args.eval_tokens or 'all'} held-out tokens of {os.path.relpath(args.eval, ROOT)}")
    print(table(rows))
    if len(args.levels) > 1:
        print(f"\nAccuracy levels of the W4A16 rows against level {args.levels[0]}, over the same "
              f"{WINDOW}-token windows (within noise: the difference is inside its own 95% interval)\n")
        print(level_table(rows, args.levels))
    if args.codes:
        work = os.path.join(ROOT, ".cache", "bench-onnx", os.path.basename(os.path.normpath(args.model)))
        print(compare_codes(os.path.join(work, "w4a16_g128_full_range"), os.path.join(work, "ort_nbits_acc0.onnx")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
