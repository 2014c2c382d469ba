"""Speed and memory of lowered models, as ratios against baselines measured in the same run.

    python tools/bench.py [--quick] [--out docs/benchmarks.md] [--threads N] [--linear-threads 1,2]
                          [--model models/tiny-llama] [--repeats 5] [--onnx] [--codebook-only]

Sections (each a table in the report):
  machine       CPU, ISA torch dispatches to, threads, whether the native int4 kernel built, load average
                before and after (other jobs share the CPU)
  bandwidth     memory-copy and memory-read bandwidth of this process: the limit a batch-1 GEMV chases
  linears       one 4096x4096 and one 4096x11008 (in x out) linear at M = 1, 8, 128, at each thread count of
                --linear-threads (default: 1 and all cores): fp32 F.linear vs every packed kernel that
                applies (W4 g128, W8 per channel, W8A8 per token; W4 also in the int4pack layout when the
                native q4 layout is the one lowering picks, so both int4 kernels are compared); ms, x fp32
                (fp32 at the same thread count), weight bytes and the weight bandwidth each achieves
                (bytes / time) next to the copy bandwidth
  model         the bundled model (models/tiny-llama; a tiny random Llama if absent): FP32 eager
                (transformers, KV cache) and FP32 graph (the same qpass decode loop, nothing quantized) vs
                each lowered recipe: prefill and batch-1 decode tokens/s, weight bytes of the linear layers,
                KV-cache bytes, greedy agreement with the fake-quant model, and the kernel plan measured
  memory        peak RSS of this process
  codebook      learned-codebook linears (CodebookLinear: SqueezeLLM per-row tables, BCQ-style per-group tables,
                sparse values) on the same shapes at M = 1 and 8: fp32 F.linear, W4 g128 on the native int4
                kernel, and each codebook variant on the native lookup kernel (lutavx2) and the reference decode
                + matmul (dequant); written between its marker lines, so ``--codebook-only`` can rerun it alone
  (--model-only runs only this section, with --recipes picking its presets, and prints it: e.g. the cost of the
  rotate pass's online Hadamards, w4a8_kv4.yaml vs rotate_w4a8_kv4.yaml)
  real size     tools/bench_size.py's section (a 0.5 B synthetic Llama, every backend row in one process): that
                script writes it between its marker lines; this one keeps it as it is when it rewrites the file
Timings are medians of REPEATS rounds after a warm-up; the variants of a table run interleaved in each round
(so load from other processes spreads over all rows). --quick: small shapes and a tiny random model (a
smoke run, < 30 s). The report (default docs/benchmarks.md) is written only by this script.

Adding rows: MODEL_PROVIDERS maps a name to ``fn(ctx) -> list[row]`` with rows shaped like the torch ones
(variant, backend, prefill_tok_s, decode_tok_s, bytes, ...); ratios are computed against the FP32 eager row of
the same run. ``--onnx`` adds tools/bench_onnx.py's rows (onnxruntime) when it is installed.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import os
import platform
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import qpass  # noqa: E402
from qpass.backends import torch_packed as tp  # noqa: E402
from qpass.hf import cache_kwargs  # noqa: E402
from qpass.primitives import bcq  # noqa: E402
from qpass.primitives import quant as Q  # noqa: E402
from qpass.primitives.spec import IntFormat, PerChannel, PerGroup, QSpec  # noqa: E402
from qpass.tables import markdown, write_atomic  # noqa: E402

BUNDLED = os.path.join(ROOT, "models", "tiny-llama")
FULL = dict(shapes=[(4096, 4096), (4096, 11008)], ms=(1, 8, 128), prompt=128, new=64, copy_mb=512,
            recipes=["w4a16_g128.yaml", "w8a16.yaml", "w8a8.yaml", "w4a8_kv4.yaml", "rotate_w4a8_kv4.yaml"])
QUICK = dict(shapes=[(256, 256)], ms=(1, 8, 128), prompt=16, new=8, copy_mb=32, recipes=["w4a8_kv4.yaml"])


class Ctx:
    def __init__(self, args):
        self.args, self.quick = args, args.quick
        self.cfg = QUICK if args.quick else FULL
        if getattr(args, "recipes", None):
            self.cfg = dict(self.cfg, recipes=[r.strip() for r in args.recipes.split(",") if r.strip()])
        self.repeats = args.repeats or (2 if args.quick else 5)
        self.copy_gbs = self.read_gbs = None
        cores = os.cpu_count() or 1
        self.linear_threads = [int(t) for t in args.linear_threads.split(",")] if args.linear_threads else \
            [torch.get_num_threads()] if args.quick else sorted({1, cores})
        self.notes: list[str] = []
        self.cpu_clock = bool(getattr(args, "cpu_clock", False))

    def clock(self, threads: int):
        """The clock of one measurement: the calling thread's CPU time with --cpu-clock where one thread runs
        the work (other jobs on the machine then do not count), else wall time."""
        return time.thread_time if self.cpu_clock and threads == 1 else time.perf_counter


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def table(head: list[str], rows: list[list], align: str | None = None) -> str:
    """This report's tables: qpass.tables.markdown, first column left, the rest right unless `align` says."""
    return markdown(head, rows, align or "l" + "r" * (len(head) - 1), spaced_rule=True)


# ------------------------------------------------------------------------------------------ machine


def machine(ctx: Ctx) -> dict:
    info = tp.machine()
    return {"cpu": info["cpu"], "isa": info["isa"], "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "load": os.getloadavg(),
            "native": tp.native.status()}


def bandwidth(ctx: Ctx) -> str:
    n = ctx.cfg["copy_mb"] * (1 << 20) // 4
    src, dst = torch.randn(n), torch.empty(n)
    res = tp.measure({"copy": lambda: dst.copy_(src), "read": lambda: src.sum()}, repeats=ctx.repeats, prune=None,
                     clock=ctx.clock(torch.get_num_threads()))
    nbytes = 4 * n
    ctx.copy_gbs = 2 * nbytes / res["copy"][0] / 1e9           # read + write
    ctx.read_gbs = nbytes / res["read"][0] / 1e9
    return table(["measure", "buffer", "time (ms)", "bandwidth"],
                 [["memory copy (read + write)", f"{nbytes >> 20} MB", f"{res['copy'][0] * 1e3:.2f}",
                   f"{ctx.copy_gbs:.2f} GB/s"],
                  ["memory read (sum)", f"{nbytes >> 20} MB", f"{res['read'][0] * 1e3:.2f}", f"{ctx.read_gbs:.2f} GB/s"]])


# ------------------------------------------------------------------------------------------ linears


def packed_linears(w: torch.Tensor) -> dict[str, tuple[str, tp.PackedLinear, bool]]:
    """{row prefix: (format label, module, chosen by lowering)}: the modules lowering builds, plus W4 in the
    int4pack layout when lowering picks another one (int4pack's kernel is then never a candidate)."""
    s4, _ = Q.choose_qparams(w, QSpec(IntFormat(4), PerGroup(128)), block_size=(1, 128))
    s8, _ = Q.choose_qparams(w, QSpec(IntFormat(8), PerChannel(0)), block_size=(1, -1))
    act = tp.ActFormat("int8", (1, -1), True, True)
    w4 = tp.PackedLinear.from_weight(w, s4, None, (1, 128), "int4")
    mods = {"W4 g128": ("W4 g128", w4, True)}
    if w4.wf.layout != "int4pack" and tp.packing.int4pack_supported() and w4.wf.int4pack_group:
        mods["W4 g128 [int4pack layout]"] = ("W4 g128", tp.PackedLinear.from_weight(
            w, s4, None, (1, 128), "int4", layout="int4pack"), False)
    mods["W8"] = ("W8", tp.PackedLinear.from_weight(w, s8, None, (1, -1), "int8"), True)
    mods["W8A8"] = ("W8A8", tp.PackedLinear.from_weight(w, s8, None, (1, -1), "int8", act=act), True)
    return mods


# Copies of each weight the linear and codebook tables cycle through, in multiples of the L3: twice the cache is
# already never served from it, and each variant holds its copies at once (at 4x, a 480 MB-L3 machine needed more
# than 24 GB for the codebook table and was killed).
WORKING_SET_L3 = 2


def l3_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        return int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]]
    except (OSError, ValueError, KeyError):
        return 32 << 20


def rotating(items: list):
    """A call that cycles through `items` (copies of one weight), so the working set exceeds the cache."""
    it = itertools.cycle(items)
    return lambda *a: next(it)(*a)


def linears(ctx: Ctx) -> tuple[str, list[dict]]:
    rows, out = [], []
    threads = torch.get_num_threads()
    for t in ctx.linear_threads:
        torch.set_num_threads(t)
        rows += _linears(ctx, t)
    torch.set_num_threads(threads)
    body = [[r["shape"], r["threads"], r["M"], r["variant"] + (" (chosen)" if r["chosen"] else ""),
             ("≥ " if r["pruned"] else "") + f"{r['ms']:.3f}", f"{r['speedup']:.2f}x", f"{r['bytes'] / 1e6:.1f} MB",
             f"{r['gbs']:.2f} GB/s", f"{100 * r['gbs'] / ctx.read_gbs:.0f}%"] for r in rows]
    out.append(table(["in x out", "threads", "M", "kernel", "ms", "x fp32", "weight bytes", "weight bandwidth",
                      "of read bw"], body, "lllllrrrr"))
    out.append("\n" + ctx.notes_linear + " x fp32: against F.linear at the same thread count and M, measured "
               "interleaved with the kernels of its row group. (chosen): the kernel the per-shape measurement "
               "of lowering would pick among those of the layout lowering uses.")
    return "\n".join(out), rows


def _linears(ctx: Ctx, threads: int) -> list[dict]:
    rows = []
    working_set = 0 if ctx.quick else WORKING_SET_L3 * l3_bytes()   # a decode step streams every layer
    ctx.notes_linear = (f"Each variant cycles through copies of its weight totalling at least {working_set >> 20} MB "
                        f"({WORKING_SET_L3}x the {l3_bytes() >> 20} MB L3), as consecutive layers do in a model, so "
                        "no variant runs from cache." if working_set else "--quick: one copy of each weight (runs from cache).")
    if ctx.cpu_clock:
        ctx.notes_linear += (" One-thread rows (and the bandwidth table) are timed by the thread's CPU time "
                             "(--cpu-clock: the machine was shared, and wall time would count the other jobs' turns).")
    for k, n in ctx.cfg["shapes"]:
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
        mods = packed_linears(w)
        copies = lambda nbytes: max(1, -(-working_set // nbytes))  # noqa: E731
        ws = [w] + [w.clone() for _ in range(copies(4 * w.numel()) - 1)]
        for m in ctx.cfg["ms"]:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
            fns = {"fp32": (rotating([lambda xx, wi=wi: F.linear(xx, wi) for wi in ws]), 4 * w.numel(), None, False)}
            for prefix, (label, mod, lowered) in mods.items():
                group = [mod] + [copy.deepcopy(mod) for _ in range(copies(mod.weight_bytes()) - 1)]
                kerns = tp.kernels.candidates(mod) if lowered else ["int4pack"]
                for kern in kerns:
                    name = f"{label} {kern}" + ("" if lowered else f" ({prefix[len(label) + 1:].strip('[]')})")
                    fns[name] = (rotating([tp.KERNELS[kern].bind(g) for g in group]), mod.weight_bytes(), label,
                                 lowered)
            fns = {name: ((lambda f=f: f(x)), b, lab, low) for name, (f, b, lab, low) in fns.items()}
            with torch.no_grad():
                res = tp.measure({name: f for name, (f, _, _, _) in fns.items()}, repeats=ctx.repeats,
                                 keep=("fp32",), clock=ctx.clock(threads))
            best = {}
            for name, (_, _, label, lowered) in fns.items():
                if label and lowered and (label not in best or res[name][0] < res[best[label]][0]):
                    best[label] = name
            for name, (_, nbytes, label, _) in fns.items():
                t, pruned = res[name]
                rows.append(dict(shape=f"{k}x{n}", threads=threads, M=m, variant=name, ms=t * 1e3, pruned=pruned,
                                 speedup=res["fp32"][0] / t, bytes=nbytes, gbs=nbytes / t / 1e9,
                                 chosen=best.get(label) == name))
    return rows


# ----------------------------------------------------------------------------------------- codebook

CODEBOOK_SECTION = "bench-codebook"      # this script's codebook table: --codebook-only rewrites it alone


def codebook_linears(w: torch.Tensor) -> dict[str, tp.CodebookLinear]:
    """{label: CodebookLinear} of w: 3- and 4-bit per-row tables (SqueezeLLM's format; 3-bit also with 0.5%
    sparse values, its dense-and-sparse; fp16 tables and scales, as the pass stores them), and BCQ q = 4 in
    groups of 128 columns (stored as its 4 fp16 α's per group, the 16-entry table derived). Codes, tables and
    α's are random: speed does not depend on them."""
    n, k = w.shape
    g = torch.Generator().manual_seed(2)
    out = {}
    for label, bits, group, sparse in (("CB3 per-row", 3, None, 0), ("CB3 per-row + 0.5% sparse", 3, None, 0.005),
                                       ("CB4 per-row", 4, None, 0), ("BCQ q=4 g128", 4, 128, 0)):
        sk = 1 if group is None else k // group
        codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=g)
        table = torch.randn(n, sk, 1 << bits, generator=g).half()
        fmt = f"codebook{bits}"
        if label.startswith("BCQ"):                   # BCQ's format: q α's per group stored, the table derived
            fmt, table = f"bcq{bits}", bcq.table(torch.rand(n, sk, bits, generator=g).half().float(), None)
        outliers = None
        if sparse:
            idx = torch.randperm(n * k, generator=g)[:int(sparse * n * k)].sort().values.to(torch.int32)
            outliers = (idx, torch.randn(idx.numel(), generator=g).half())
        out[label] = tp.CodebookLinear(fmt=fmt, block=[1, -1 if group is None else group], codes=codes,
                                       scale=torch.rand(n, sk, generator=g).half(), codebook=table, outliers=outliers,
                                       bias=None)
    return out


def codebook_rows(ctx: Ctx, threads: int) -> list[dict]:
    rows = []
    working_set = 0 if ctx.quick else WORKING_SET_L3 * l3_bytes()
    for k, n in ctx.cfg["shapes"]:
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
        copies = lambda nbytes: max(1, -(-working_set // nbytes))  # noqa: E731
        ws = [w] + [w.clone() for _ in range(copies(4 * w.numel()) - 1)]
        s4, _ = Q.choose_qparams(w, QSpec(IntFormat(4), PerGroup(128)), block_size=(1, 128))
        w4 = tp.PackedLinear.from_weight(w, s4, None, (1, 128), "int4")
        mods = {"W4 g128": (w4, [kn for kn in ("q4avx2",) if tp.KERNELS[kn].applies(w4)] or ["dequant"])}
        mods.update({label: (m, tp.kernels.candidates(m)) for label, m in codebook_linears(w).items()})
        for m in (1, 8):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
            fns = {"fp32 F.linear": (rotating([lambda xx, wi=wi: F.linear(xx, wi) for wi in ws]), 4 * w.numel())}
            for label, (mod, kerns) in mods.items():
                group = [mod] + [copy.deepcopy(mod) for _ in range(copies(mod.weight_bytes()) - 1)]
                for kern in kerns:
                    name = f"{label} {kern}" + (" (reference decode + matmul)" if kern == "dequant" else "")
                    fns[name] = (rotating([tp.KERNELS[kern].bind(gm) for gm in group]), mod.weight_bytes())
            with torch.no_grad():
                res = timed({name: (lambda f=f: f(x)) for name, (f, _) in fns.items()}, ctx.repeats)
            med0, best0 = res["fp32 F.linear"]
            for name, (_, nbytes) in fns.items():
                med, best = res[name]
                rows.append(dict(shape=f"{k}x{n}", threads=threads, M=m, variant=name, ms=med * 1e3, best=best * 1e3,
                                 speedup=med0 / med, best_speedup=best0 / best, bytes=nbytes))
    return rows


def timed(fns: dict, repeats: int, target_s: float = 0.02) -> dict[str, tuple[float, float]]:
    """{name: (median, min) seconds per call} over `repeats` interleaved rounds (each function runs about
    `target_s` per round, at least one call) after a warm-up call: the minimum is the run least disturbed by
    other jobs, the median the typical one."""
    calls = {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        calls[name] = max(1, round(target_s / max(time.perf_counter() - t0, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / calls[name])
    return {name: (statistics.median(ts), min(ts)) for name, ts in samples.items()}


def codebook_section(ctx: Ctx, cmd: str) -> str:
    t0, load0 = time.perf_counter(), os.getloadavg()
    rows, threads = [], torch.get_num_threads()
    for t in ctx.linear_threads:
        torch.set_num_threads(t)
        rows += codebook_rows(ctx, t)
    torch.set_num_threads(threads)
    load1 = os.getloadavg()
    body = [[r["shape"], r["threads"], r["M"], r["variant"], f"{r['ms']:.3f}", f"{r['speedup']:.2f}x",
             f"{r['best']:.3f}", f"{r['best_speedup']:.2f}x", f"{r['bytes'] / 1e6:.1f} MB"] for r in rows]
    head = (f"Generated by `{cmd}` on {datetime.date.today().isoformat()} in {time.perf_counter() - t0:.0f} s (do not "
            f"edit by hand; rerun the command). {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, native library: {tp.native.status()}. Load average {load0[0]:.1f} at start, "
            f"{load1[0]:.1f} at end: other jobs share this machine, so compare rows within one run (x fp32 is "
            f"against F.linear in the same run, thread count and M, measured interleaved in {ctx.repeats} rounds after "
            "a warm-up: the median round and the best, the one least disturbed by other jobs), not with other "
            "tables.")
    tail = ("lutavx2: csrc/q4avx2.c `lut_linear` on the stored codes (3-bit: 8 codes in 3 bytes; 4-bit: two a "
            "byte), the table (scale folded in, fp32) held in registers, one permute per 8 weights (two and a blend "
            "for 16 entries), fp32 FMA, sparse values added per row in the same pass. dequant: CodebookLinear's "
            "reference route (decode a tile of rows with torch ops, F.linear). W4 g128 q4avx2: the native int4 "
            "kernel on the same shape. Weight bytes: codes, fp16 tables and scales, sparse indices and values as "
            "stored (BCQ: its α's). " + (f"Each variant cycles through copies of its weight totalling at least "
                          f"{WORKING_SET_L3 * l3_bytes() >> 20} MB ({WORKING_SET_L3}x L3), so none runs from cache."
                          if not ctx.quick else "--quick: one copy of each weight."))
    return "\n".join([head, "", table(["in x out", "threads", "M", "kernel", "median ms", "x fp32", "best ms",
                                       "best x fp32", "weight bytes"], body, "lllllrrrr"), "", tail])


def codebook_block(ctx: Ctx, text: str | None) -> list[str]:
    """The codebook section with its marker lines: `text`, or what the previous file held there."""
    heading = "Learned-codebook linears (SqueezeLLM, BCQ): native lookup kernel vs reference decode"
    block = kept_section(ctx.args.out, CODEBOOK_SECTION, heading, "python tools/bench.py --codebook-only")
    return block if text is None else [*block[:3], text, *block[-2:]]


# -------------------------------------------------------------------------------------------- model


def load_model(ctx: Ctx):
    import transformers

    if not ctx.quick and os.path.isfile(os.path.join(ctx.args.model, "config.json")):
        model = transformers.AutoModelForCausalLM.from_pretrained(ctx.args.model, dtype=torch.float32).eval()
        return model, os.path.relpath(ctx.args.model, ROOT)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval(), "tiny random Llama (2 layers, hidden 128)"


class EagerStep:
    """transformers' own forward with its dynamic KV cache: the FP32 eager baseline."""

    def __init__(self, model):
        self.model, self.cache = model, None

    def __call__(self, ids, pos):
        from transformers import DynamicCache

        if int(pos[0]) == 0:
            self.cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, **cache_kwargs(self.model, self.cache), use_cache=True, cache_position=pos)
        return out.logits


def run_steps(step, prompt: torch.Tensor, new: int, clock=time.perf_counter) -> tuple[float, float, torch.Tensor]:
    """(prefill seconds, decode seconds for `new` greedy steps, generated sequence), by `clock`."""
    with torch.no_grad():
        t0 = clock()
        logits = step(prompt, torch.arange(prompt.shape[1]))
        t1 = clock()
        seq = [prompt]
        tok = logits[:, -1:].argmax(-1)
        for i in range(new):
            seq.append(tok)
            logits = step(tok, torch.tensor([prompt.shape[1] + i]))
            tok = logits[:, -1:].argmax(-1)
        t2 = clock()
    return t1 - t0, t2 - t1, torch.cat(seq, 1)


def torch_rows(ctx: Ctx) -> list[dict]:
    model, name = load_model(ctx)
    ctx.model_name = name
    p, new = ctx.cfg["prompt"], ctx.cfg["new"]
    length = -(-(p + new + 1) // 64) * 64
    prompt = torch.randint(0, model.config.vocab_size, (1, p), generator=torch.Generator().manual_seed(0))
    base = qpass.apply(model, os.path.join(ROOT, "recipes", "w16.yaml"), progress=False)
    template = qpass.capture_decode(model, max_cache_len=length)
    fp32_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    variants = {"FP32 eager (transformers)": dict(step=EagerStep(model), backend="torch eager", bytes=fp32_bytes)}
    fp_graph = tp.lower(base, kernels="reference")
    g = fp_graph.decode_graph(length, template=template, optimize=False)
    variants["FP32 graph, runtime passes off"] = dict(step=_graph_step(g), backend="torch graph", bytes=fp32_bytes)
    g = fp_graph.decode_graph(length, template=template)
    variants["FP32 graph (qpass decode loop)"] = dict(step=_graph_step(g), backend="torch graph", bytes=fp32_bytes)
    for rec in ctx.cfg["recipes"]:
        qm = qpass.apply(base, os.path.join(ROOT, "recipes", rec), progress=False)
        t0 = time.perf_counter()
        pm = tp.lower(qm, kernels="auto", repeats=ctx.repeats)
        lower_s = time.perf_counter() - t0
        g = pm.decode_graph(length, template=template)
        wb = pm.weight_bytes()
        kv = pm.kv_cache_bytes(length)
        variants[f"{rec[:-5]} packed (auto kernels)"] = dict(
            step=_graph_step(g), backend="torch packed", qm=qm, pm=pm, weight=wb, kv=kv, lower_s=lower_s,
            bytes=_graph_bytes(pm.graph_module) + kv["packed"])
        if rec == ctx.cfg["recipes"][0]:                  # what the runtime passes give on top of the kernels
            g = pm.decode_graph(length, template=template, optimize=False)
            variants[f"{rec[:-5]} packed, runtime passes off"] = dict(
                step=_graph_step(g), backend="torch packed", qm=qm, bytes=_graph_bytes(pm.graph_module))
    samples = {v: {"prefill": [], "decode": []} for v in variants}
    for r in range(ctx.repeats + 1):                       # round 0 is the warm-up
        for v, d in variants.items():
            tpre, tdec, seq = run_steps(d["step"], prompt, new)
            d["seq"] = seq
            if r:
                samples[v]["prefill"].append(tpre)
                samples[v]["decode"].append(tdec)
    rows = []
    for v, d in variants.items():
        row = dict(variant=v, backend=d["backend"], prefill_tok_s=p / statistics.median(samples[v]["prefill"]),
                   decode_tok_s=new / statistics.median(samples[v]["decode"]), bytes=d["bytes"])
        if "pm" in d:
            row.update(weight=d["weight"], kv=d["kv"], lower_s=d["lower_s"], plan=d["pm"].records)
        if "qm" in d:
            row["greedy"] = _greedy(d["qm"], d["seq"], p)
        rows.append(row)
    return rows


def _graph_step(gm):
    return lambda ids, pos: gm(input_ids=ids, cache_position=pos)


def _graph_bytes(gm) -> int:
    seen, total = set(), 0
    for t in list(gm.parameters()) + list(gm.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _greedy(qm, seq: torch.Tensor, p: int) -> str:
    """Teacher-force the fake-quant model on the lowered model's greedy tokens: steps where it agrees."""
    with torch.no_grad():
        logits = qm(seq).logits[0, p - 1: -1]
    chosen = seq[0, p:]
    agree = int((logits.argmax(-1) == chosen).sum())
    return f"{agree}/{chosen.numel()}"


MODEL_PROVIDERS = {"torch": torch_rows}


def onnx_provider(ctx: Ctx) -> list[dict]:
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import bench_onnx  # noqa: PLC0415 - optional (onnxruntime)

    rows = bench_onnx.onnx_rows(ctx.args.model, os.path.join(ROOT, "data", "austen", "eval.txt"),
                                threads=torch.get_num_threads(), prompt=ctx.cfg["prompt"], new_tokens=ctx.cfg["new"],
                                repeats=ctx.repeats)
    return [dict(r, backend="onnxruntime") for r in rows]


def model_section(ctx: Ctx) -> tuple[str, list[dict]]:
    rows = []
    for fn in MODEL_PROVIDERS.values():
        rows += fn(ctx)
    base = next(r for r in rows if r["variant"].startswith("FP32 eager"))
    graph = next((r for r in rows if r["variant"] == "FP32 graph (qpass decode loop)"), None)
    body = []
    for r in rows:
        w, kv = r.get("weight"), r.get("kv")
        same_loop = ratio(r["decode_tok_s"], graph["decode_tok_s"]) if graph and r["backend"].startswith("torch ") \
            and r is not base else "-"
        body.append([r["variant"], r["backend"], f"{r['prefill_tok_s']:.0f}", ratio(r["prefill_tok_s"], base["prefill_tok_s"]),
                     f"{r['decode_tok_s']:.1f}", ratio(r["decode_tok_s"], base["decode_tok_s"]), same_loop,
                     f"{r['bytes'] / 1e6:.2f} MB",
                     f"{w['packed'] / 1e6:.2f} MB ({w['packed'] / w['fp32']:.3f}x)" if w else "-",
                     f"{kv['packed'] / 1e3:.0f} kB ({kv['packed'] / kv['fp32']:.3f}x)" if kv and kv["packed_caches"] else "-",
                     r.get("greedy", "-")])
    head = ["variant", "runs on", "prefill tok/s", "x eager", "decode tok/s", "x eager", "x FP32 graph",
            "model bytes", "linear weight bytes (x fp32)", "KV cache (x fp32)", "greedy = fake-quant"]
    text = [table(head, body, "ll" + "r" * 9),
            "\nx eager: against transformers' own forward with its dynamic cache; x FP32 graph: against the same "
            "static-cache decode loop the lowered models run, with nothing quantized (like for like). Runtime "
            "passes (backends/torch_packed/runtime.py: attention over the written cache prefix only, fused "
            "RMSNorm and RoPE, the native decode-attention kernel, flat attribute access, and native segments: "
            "each run of kernels replayed by one C call once two decode steps showed its sizes) are on in every "
            "decode loop except the rows that say "
            "'runtime passes off'. Greedy = fake-quant: decode steps where the fake-quant model, fed the same "
            "tokens, picks the same next token."]
    plans = [(r["variant"], rec) for r in rows for rec in r.get("plan", [])]
    if plans:
        pbody = [[v, rec.key, rec.bucket, rec.choice, f"{rec.fp32_ms:.3f}" if rec.fp32_ms else "-",
                  ", ".join(f"{k} {t:.3f}" for k, t in rec.times_ms.items()) or "(one candidate)"] for v, rec in plans]
        text.append("\nKernel plan measured while lowering (ms per call; fp32 = F.linear of the same shape):\n")
        text.append(table(["variant", "linear (N x K, format)", "M", "chosen", "fp32", "candidates"], pbody, "llrlrl"))
    return "\n".join(text), rows


# -------------------------------------------------------------------------------------------- report


def notes(ctx: Ctx, lin: list[dict], mod: list[dict]) -> list[str]:
    out = []
    for shape, threads in sorted({(r["shape"], r["threads"]) for r in lin}):
        def best(prefix, m):
            rs = [r for r in lin if r["shape"] == shape and r["threads"] == threads and r["M"] == m
                  and r["variant"].startswith(prefix)]
            return max(rs, key=lambda r: r["speedup"]) if rs else None
        w4, w8a8, where = best("W4 g128", 1), best("W8A8", 128), f"{shape}, {threads} thread(s)"
        if w4:
            bound = "memory-bound" if w4["gbs"] > 0.5 * ctx.read_gbs else "compute-bound (far from the memory limit)"
            out.append(f"{where}, M = 1: best W4 g128 kernel ({w4['variant']}) runs at {w4['speedup']:.2f}x fp32 "
                       f"({'meets' if w4['speedup'] >= 3 else 'misses'} the 3x target); it streams "
                       f"{w4['gbs']:.2f} GB/s of weights against {ctx.read_gbs:.2f} GB/s memory read and "
                       f"{ctx.copy_gbs:.2f} GB/s memory copy (one thread): {bound}.")
        if w8a8:
            out.append(f"{where}, M = 128: best W8A8 kernel ({w8a8['variant']}) runs at {w8a8['speedup']:.2f}x fp32.")
    intmm = [r for r in lin if r["variant"].endswith("int_mm")]
    if intmm and all(r["speedup"] < 1 for r in intmm):
        out.append(f"`torch._int_mm` is slower than fp32 at every shape here ({ctx.isa} without VNNI int8 dot "
                   "products takes a slow path), so the measured plans never choose it on this machine.")
    base = next((r for r in mod if r["variant"].startswith("FP32 eager")), None)
    graph = next((r for r in mod if r["variant"] == "FP32 graph (qpass decode loop)"), None)
    off = next((r for r in mod if r["variant"] == "FP32 graph, runtime passes off"), None)
    if base and graph:
        out.append(f"With nothing quantized, the decode loop the lowered models run is "
                   f"{graph['decode_tok_s'] / base['decode_tok_s']:.2f}x the eager model's speed"
                   + (f" ({off['decode_tok_s'] / base['decode_tok_s']:.2f}x with the runtime passes off: the exported "
                      "graph alone, static cache attended in full)" if off else "")
                   + ". On a model this small a decode step is mostly fixed per-op cost, so the passes that remove "
                   "ops matter as much as the kernels; on wide layers the kernels dominate (linear table).")
    for r in mod:
        if base and "weight" in r:
            kernels = sorted({rec.choice for rec in r.get("plan", [])})
            out.append(f"{r['variant']}: decode {r['decode_tok_s'] / base['decode_tok_s']:.2f}x eager and "
                       + (f"{r['decode_tok_s'] / graph['decode_tok_s']:.2f}x the FP32 graph, " if graph else "")
                       + f"prefill {r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x eager; kernels {kernels}; "
                       f"lowering (incl. kernel measurement) took {r['lower_s']:.1f} s.")
    return out


SIZE_SECTION = "bench-size"     # written by tools/bench_size.py; kept as it is when this script rewrites the file
# Sections other tools write into the same file (name, heading, the command that writes it): this script keeps what
# the previous file held between their marker lines when it rewrites the file.
KEPT_SECTIONS = (
    (SIZE_SECTION, "Decode at real size: a 0.5 B synthetic Llama (tools/bench_size.py)",
     "python tools/bench_size.py --out docs/benchmarks.md"),
    ("kernel-accuracy", "Approximate kernels: what they cost in perplexity (tools/kernel_accuracy.py)",
     "python tools/kernel_accuracy.py"),
    ("bench-qlora", "Training memory of the QAT family at size (tools/bench_qlora.py)",
     "python tools/bench_qlora.py --out docs/benchmarks.md"),
)


def kept_section(out: str, name: str, heading: str, command: str) -> list[str]:
    """The heading and marker lines of another tool's section, with what the previous file held there."""
    from qpass.tables import markers

    begin, end = markers(name)
    body = [f"Not measured yet: run `{command}`."]
    try:
        with open(out, encoding="utf-8") as f:
            old = f.read().split("\n")
        i, j = old.index(begin), old.index(end)
        if i < j:
            body = old[i + 1: j]
    except (OSError, ValueError):
        pass
    return [f"## {heading}", "", begin, *body, end, ""]


# tools/bench_size.py's second table (--threads 2 --section bench-size-2t), kept right after its first one
SIZE_2T = ("bench-size-2t", "Decode at real size, 2 threads (tools/bench_size.py)",
           "python tools/bench_size.py --threads 2 --section bench-size-2t --out docs/benchmarks.md")


def real_size_section(out: str) -> list[str]:
    """tools/bench_size.py's sections, at 1 and at 2 threads (:func:`kept_section`)."""
    return kept_section(out, *KEPT_SECTIONS[0]) + kept_section(out, *SIZE_2T)


def render(ctx: Ctx, info: dict, sections: list[tuple[str, str]], cmd: str, elapsed: float, notes_: list[str]) -> str:
    load0, load1 = info["load"], os.getloadavg()
    lines = ["# Benchmarks", "",
             f"Generated by `{cmd}` on {datetime.date.today().isoformat()} in {elapsed:.0f} s; do not edit by hand "
             "(rerun the command).", "",
             f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} dispatching to {info['isa']}, "
             f"Python {info['python']}. Native int4 kernel: {info['native']}. **{info['threads']} thread(s)** for the "
             "model table (the linear table says its own)"
             + (" (other jobs were running: load average "
                f"{load0[0]:.1f} at start, {load1[0]:.1f} at end, on {info['cores']} cores)" if max(load0[0], load1[0]) > 0.5
                else "") + ".", "",
             "Every ratio compares rows measured in this run: medians of "
             f"{ctx.repeats} interleaved rounds after a warm-up. '≥' marks a kernel measured once and dropped because "
             "it was far slower than the best (it cannot be chosen).", ""]
    for title, body in sections:
        lines += [f"## {title}", "", body, ""]
    if notes_:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes_] + [""]
    lines += codebook_block(ctx, getattr(ctx, "codebook_text", None))
    lines += real_size_section(ctx.args.out)
    lines += ["Accuracy of the kernels (tests/test_torch_packed.py): `dequant`, `int_mm`, `i8avx2` and `q4avx2` compute the "
              "fake-quant graph's math in float32 (the same weight values; outputs within float summation order, "
              "≤ 1e-5 of max |output|); `int4pack`, `int8pack` and `int8pack_codes` round activations, scales and "
              "results to bf16 (max |Δ| ≤ 1% of max |output| per linear; 0.6% is the worst seen); `q4a8` and "
              "`q8a8` round the input to int8 in blocks of 128 columns, or of the weight group where it is narrower "
              "(≤ 1/254 of each block's largest input) and are otherwise exact, so greedy tokens can differ from the "
              "fake-quant model only at near-ties of its logits. Their cost in perplexity on the bundled models is "
              "the next section's table.", ""]
    for kept in KEPT_SECTIONS[1:]:
        lines += kept_section(ctx.args.out, *kept)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes and a tiny random model (smoke run)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    ap.add_argument("--threads", type=int, default=None, help="default: 1 if other jobs load the CPU, else all")
    ap.add_argument("--linear-threads", default=None, help="thread counts of the linear table, e.g. 1,2 "
                    "(default: 1 and all cores)")
    ap.add_argument("--model", default=BUNDLED)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--cpu-clock", action="store_true", help="time one-thread measurements (bandwidth, linears "
                    "at 1 thread) by the thread's CPU time, not wall time: on a machine shared with other jobs")
    ap.add_argument("--onnx", action="store_true", help="add onnxruntime rows (tools/bench_onnx.py)")
    ap.add_argument("--recipes", help="comma-separated presets (recipes/) of the model section, e.g. "
                    "w4a8_kv4.yaml,rotate_w4a8_kv4.yaml (default: the full list)")
    ap.add_argument("--codebook-only", action="store_true", help="run only the codebook section and write it "
                    "between its marker lines of --out (the rest of the file is kept)")
    ap.add_argument("--model-only", action="store_true", help="run only the model section and print it; the "
                    "report file is not written")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    threads = args.threads or (1 if os.getloadavg()[0] > 0.5 else os.cpu_count())
    torch.set_num_threads(threads)
    ctx = Ctx(args)
    if args.onnx:
        MODEL_PROVIDERS["onnx"] = onnx_provider
    info = machine(ctx)
    ctx.isa = info["isa"]
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.model_only:
        text, _ = model_section(ctx)
        cmd = "python tools/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
        print(f"`{cmd.strip()}`: {ctx.model_name}, batch 1, prompt {ctx.cfg['prompt']}, {ctx.cfg['new']} decode "
              f"steps, {threads} thread(s), {ctx.repeats} repeats\n\n{text}")
        return 0
    cmd = "python tools/bench.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    if args.codebook_only:
        from qpass.tables import replace_section

        text = codebook_section(ctx, cmd.strip())
        if os.path.isfile(args.out) and CODEBOOK_SECTION in open(args.out, encoding="utf-8").read():
            replace_section(args.out, CODEBOOK_SECTION, text)
        else:
            print(f"{args.out} has no {CODEBOOK_SECTION} section: printed only", file=sys.stderr)
        print(text)
        return 0
    say("bandwidth")
    sections = [("Memory bandwidth (this process, same run)", bandwidth(ctx))]
    say("linears")
    lin_text, lin_rows = linears(ctx)
    sections.append(("Single linear layers: packed kernels vs fp32 F.linear", lin_text))
    say("codebook")
    ctx.codebook_text = codebook_section(ctx, cmd.strip())
    say("model")
    mod_text, mod_rows = model_section(ctx)
    sections.append((f"Model: {ctx.model_name}, batch 1, prompt {ctx.cfg['prompt']}, {ctx.cfg['new']} decode steps",
                     mod_text))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sections.append(("Memory", f"Peak RSS of the benchmark process (everything above, Python and torch included): "
                               f"{rss:.0f} MB."))
    text = render(ctx, info, sections, cmd.strip(), time.perf_counter() - t_start, notes(ctx, lin_rows, mod_rows))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_atomic(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
