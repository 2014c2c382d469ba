"""Decode speed at real size: a synthetic ~0.5 B-parameter Llama, every backend row in one process.

    python tools/bench_size.py [--size 0.5b|small] [--threads 1] [--repeats 3] [--prompt 64] [--new-tokens 64]
                               [--rows ROW,ROW...] [--no-onnx] [--out docs/benchmarks.md] [--work DIR]

Model (--size 0.5b): LlamaConfig(hidden 2048, intermediate 5632, 8 layers, 16 heads / 4 KV heads, vocab 32000,
untied lm_head), random weights from a fixed seed (0): 0.49 B parameters, 1.97 GB in fp32. --size small: hidden
128, 2 layers, vocab 512 (a smoke run of every code path in seconds).

Rows (ROW names for --rows):
  eager        FP32 eager: transformers' own forward with its dynamic KV cache (the baseline of every ratio)
  graph        FP32 graph: qpass's static-cache decode loop (capture_decode + runtime passes), nothing quantized
  w4a16_g128, w4a16_g128_lmhead8, w4a16_g128_lmhead4, w8a16, w8a8, w4a8_kv4
               recipes/<ROW>.yaml lowered to packed torch kernels (kernels measured per shape: 'auto')
  ort_fp32     the FP32 model exported by qpass's ONNX lowering, in onnxruntime
  ort_w4       recipes/w4a16_g128.yaml lowered to ONNX (DequantizeLinear + MatMul -> MatMulNBits, accuracy level
               as lowering records it: 4 by default), in onnxruntime
  ort_nbits    onnxruntime's own MatMulNBitsQuantizer (block 128, symmetric, accuracy level 4, lm_head excluded)
               on torch.onnx's FP32 export: the same capture lowered with attention="torch" (torch.onnx's own
               translation of scaled_dot_product_attention, as a plain torch.onnx.export has it), i.e. what a user
               gets from an FP32 export and onnxruntime's quantizer (when onnxruntime.quantization imports)
  ort_nbits_qpass  the same quantizer on ort_fp32's model (qpass's FP32 lowering, grouped attention): the same
               graph as ort_w4 but for the quantizer's own scales, so a tie by construction (reported for that)
Default: all rows (the ort_* rows only with onnxruntime installed and without --no-onnx). ONNX models are cached
in --work (default .cache/bench-size/<size>), one directory per recipe and attention option, and reused when
present: delete it after changing the lowering otherwise. Each ONNX row runs in --onnx-sessions sessions (default
2; every session every round, all in the medians): one session's weights sit where its allocation put them, and
sessions of the same model differ by up to ~8% in decode speed on this machine.

Each row: prefill ms (one step over a PROMPT-token prompt, empty cache), decode tokens/s (NEW greedy one-token
steps after it), both x FP32 eager; bytes read per decode token (every weight the step reads: all tensors of the
model but the embedding table, of which one row is read, plus the K/V cache written so far at the mean decode
position) and the fraction of the bandwidth limit: bytes per token x tokens/s over the memory-read bandwidth
measured in the same process (sum of a 512 MB tensor at the same thread count). Packed rows also time their
linear modules alone (called back to back on one token, in the step's order: "linears ms / token" and their
fraction of the read bandwidth), and the rest of the step (decode time minus that): where a row's gap to the
bandwidth limit is, kernels or everything else. Timings are medians of REPEATS
rounds after a warm-up round, the rows run in turn in each round (load from other processes spreads over all).
The table goes between the <!-- BEGIN bench-size --> and <!-- END bench-size --> lines of --out (tools/bench.py
keeps that section when it rewrites the file); without --out only stdout.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import platform
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

SIZES = {
    "0.5b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000),
    "small": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512),
}
TORCH_RECIPES = ("w4a16_g128", "w4a16_g128_lmhead8", "w4a16_g128_lmhead4", "w8a16", "w8a8", "w4a8_kv4")
ROWS = ("eager", "graph", *TORCH_RECIPES, "ort_fp32", "ort_w4", "ort_nbits", "ort_nbits_qpass")
LABELS = {"eager": "FP32 eager (transformers)", "graph": "FP32 graph (qpass decode loop)",
          "w4a16_g128": "W4A16 g128 packed", "w4a16_g128_lmhead8": "W4A16 g128 + lm_head int8 packed",
          "w4a16_g128_lmhead4": "W4A16 g128 + lm_head int4 packed", "w8a16": "W8A16 packed",
          "w8a8": "W8A8 packed", "w4a8_kv4": "W4A8KV4 packed", "ort_fp32": "FP32 ONNX (onnxruntime)",
          "ort_w4": "qpass W4A16 g128 ONNX (MatMulNBits)",
          "ort_nbits": "ORT MatMulNBitsQuantizer g128 (torch.onnx FP32 export)",
          "ort_nbits_qpass": "ORT MatMulNBitsQuantizer g128 (qpass FP32 ONNX)"}
SECTION = "bench-size"


def synthetic_llama(size: str, seed: int = 0):
    import torch
    import transformers

    cfg = transformers.LlamaConfig(**SIZES[size], max_position_embeddings=2048, tie_word_embeddings=False,
                                   rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    with torch.no_grad():
        model = transformers.LlamaForCausalLM(cfg).eval()
    return model


def read_bandwidth(mb: int, repeats: int, clock=time.perf_counter) -> float:
    """Memory-read bandwidth (GB/s) of this process at the current thread count: sum of an `mb` MB tensor."""
    import torch

    x = torch.randn(mb * (1 << 20) // 4)
    x.sum()
    times = []
    for _ in range(max(5, repeats)):
        t0 = clock()
        x.sum()
        times.append(clock() - t0)
    return x.numel() * 4 / statistics.median(times) / 1e9


def _tensor_bytes(tensors, skip_ptrs=frozenset()) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() in seen or t.data_ptr() in skip_ptrs:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _embedding_ptrs(gm) -> set[int]:
    """data_ptr of every tensor that only an embedding lookup reads in `gm` (one row per token, not the table)."""
    import torch

    from qpass.graph import param_of

    ptrs = set()
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.aten.embedding.default and n.args[0].op == "get_attr" \
                and len(n.args[0].users) == 1:
            ptrs.add(param_of(gm, n.args[0]).data_ptr())
    return ptrs


def graph_bytes_per_token(gm) -> int:
    """Bytes of the tensors a decode step of `gm` (a main, cache-free graph) reads: all but embedding tables."""
    return _tensor_bytes(list(gm.parameters()) + list(gm.buffers()), _embedding_ptrs(gm))


def onnx_bytes_per_token(path: str) -> int:
    """Bytes of an ONNX model's initializers but the tables only a Gather reads (the embedding)."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    readers = {}
    for n in model.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    total = 0
    for init in model.graph.initializer:
        if init.name in gathered and readers.get(init.name) == 1 and len(init.dims) == 2:
            continue
        bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(
            init.data_type, 8 * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize)
        total += math.ceil(math.prod(init.dims) * bits / 8)
    return total


class Row:
    def __init__(self, key: str, step, backend: str, weight_bytes: int, kv_bytes_per_pos: float, linears=None):
        self.key, self.step, self.backend = key, step, backend
        self.weight_bytes, self.kv_bytes_per_pos = weight_bytes, kv_bytes_per_pos
        self.prefill: list[float] = []
        self.decode: list[float] = []
        self.linears = linears or []            # [(linear, one-token input)] in graph order (packed rows)
        self.linear_bytes = sum(_tensor_bytes(_linear_tensors(m)) for m, _ in self.linears)
        self.linear_pass: list[float] = []      # seconds per pass over self.linears


def packed_linears(gm) -> list:
    """The linear layers of a lowered graph in the order a step calls them, each as (callable, one-token fp32
    input of its width): the PackedLinear modules, and the linears left in float (``aten.linear`` on a weight
    parameter: lm_head where a recipe ignores it), so that the pass reads every weight byte a decode step reads."""
    import torch

    from qpass.backends.torch_packed.linear import PackedLinear
    from qpass.graph import param_of

    g = torch.Generator().manual_seed(0)
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(m := gm.get_submodule(n.target), PackedLinear):
            out.append((m, torch.randn(1, 1, m.wf.k, generator=g)))
        elif (n.op == "call_function" and n.target is torch.ops.aten.linear.default and len(n.args) >= 2
              and getattr(n.args[1], "op", None) == "get_attr"):
            w = param_of(gm, n.args[1])
            b = param_of(gm, n.args[2]) if len(n.args) > 2 and getattr(n.args[2], "op", None) == "get_attr" else None
            out.append((_FloatLinear(w, b), torch.randn(1, 1, w.shape[1], generator=g)))
    return out


class _FloatLinear:
    """A float linear of the graph as the pass calls it: F.linear on the graph's own weight (and bias)."""

    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias

    def __call__(self, x):
        from torch.nn import functional as F

        return F.linear(x, self.weight, self.bias)

    def tensors(self) -> list:
        return [t for t in (self.weight, self.bias) if t is not None]


def _linear_tensors(m) -> list:
    return m.tensors() if isinstance(m, _FloatLinear) else list(m.parameters()) + list(m.buffers())


def build_torch_rows(model, want: list[str], length: int, repeats: int, say) -> dict[str, Row]:
    import qpass
    from bench import EagerStep, _graph_step
    from qpass.backends import torch_packed as tp

    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    fp32_kv = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 4          # bytes per position
    emb = model.get_input_embeddings().weight
    fp32_bytes = _tensor_bytes(list(model.parameters()) + list(model.buffers()), {emb.data_ptr()})
    rows = {}
    if "eager" in want:
        rows["eager"] = Row("eager", EagerStep(model), "torch eager", fp32_bytes, fp32_kv)
    if not set(want) & {"graph", *TORCH_RECIPES}:
        return rows
    t0 = time.perf_counter()
    base = qpass.apply(model, os.path.join(ROOT, "recipes", "w16.yaml"), progress=False)
    template = qpass.capture_decode(model, max_cache_len=length)
    say(f"captured the model and its decode step in {time.perf_counter() - t0:.0f} s")
    if "graph" in want:
        g = tp.lower(base, kernels="reference").decode_graph(length, template=template)
        rows["graph"] = Row("graph", _graph_step(g), "torch graph", fp32_bytes, fp32_kv)
    for rec in TORCH_RECIPES:
        if rec not in want:
            continue
        t0 = time.perf_counter()
        qm = qpass.apply(base, os.path.join(ROOT, "recipes", rec + ".yaml"), progress=False)
        pm = tp.lower(qm, kernels="auto", repeats=max(2, min(repeats, 3)))
        g = pm.decode_graph(length, template=template)
        kv = pm.kv_cache_bytes(length)
        per_pos = kv["packed"] / length if kv["packed_caches"] else fp32_kv
        rows[rec] = Row(rec, _graph_step(g), "torch packed", graph_bytes_per_token(pm.graph_module), per_pos,
                        packed_linears(pm.graph_module))
        del qm
        gc.collect()
        say(f"{rec}: quantized, lowered (kernels measured) and decode graph built in {time.perf_counter() - t0:.0f} s")
    del base, template
    gc.collect()
    return rows


def build_onnx_rows(model, want: list[str], work: str, threads: int, say, sessions: int = 2) -> dict[str, Row]:
    import qpass
    from qpass.backends.onnx_qdq import runtime

    c = model.config
    fp32_kv = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    os.makedirs(work, exist_ok=True)

    def lowered(recipe: str, attention: str = "grouped") -> str:
        out = os.path.join(work, f"{recipe}.{attention}")
        if not os.path.isfile(os.path.join(out, "model.onnx")):
            import shutil

            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            qpass.lower(qpass.apply(model, os.path.join(ROOT, "recipes", recipe + ".yaml"), progress=False),
                        "onnx", out, attention=attention)
            say(f"ONNX {recipe} (attention {attention}): lowered in {time.perf_counter() - t0:.0f} s")
            gc.collect()
        return os.path.join(out, "model.onnx")

    paths = {}
    if set(want) & {"ort_fp32", "ort_nbits_qpass"}:
        paths["ort_fp32"] = lowered("w16")
    if "ort_w4" in want:
        paths["ort_w4"] = lowered("w4a16_g128")
    for key, attention in (("ort_nbits", "torch"), ("ort_nbits_qpass", "grouped")):
        if key not in want:
            continue
        try:
            import bench_onnx

            fp32 = lowered("w16", attention)
            t0 = time.perf_counter()
            paths[key] = bench_onnx.ort_quantized(os.path.dirname(fp32), work, 4, f"ort_nbits_acc4.{attention}.onnx")
            say(f"MatMulNBitsQuantizer on the {attention}-attention FP32 export: {time.perf_counter() - t0:.0f} s")
        except ImportError as e:
            say(f"{key} skipped: {e}")
    rows = {}
    for key in ("ort_fp32", "ort_w4", "ort_nbits", "ort_nbits_qpass"):
        if key in want and key in paths:
            runs = [runtime.DecoderRunner(runtime.session(paths[key], threads=threads)) for _ in range(sessions)]
            rows[key] = Row(key, runs, "onnxruntime", onnx_bytes_per_token(paths[key]), fp32_kv)
    return rows


def measure(rows: dict[str, Row], vocab: int, prompt: int, new: int, repeats: int, say, clock=time.perf_counter
            ) -> None:
    import torch

    from bench import run_steps

    ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(0))
    for r in range(repeats + 1):                         # round 0: warm-up
        for row in rows.values():
            for step in row.step if isinstance(row.step, list) else [row.step]:   # an ONNX row: every session
                tpre, tdec, _ = run_steps(step, ids, new, clock)
                if r:
                    row.prefill.append(tpre)
                    row.decode.append(tdec)
            if row.linears:                              # the step's linears alone, back to back, 8 passes
                with torch.no_grad():
                    t0 = clock()
                    for _ in range(8):
                        for m, x in row.linears:
                            m(x)
                    if r:
                        row.linear_pass.append((clock() - t0) / 8)
        say(f"round {r}/{repeats} done" + (" (warm-up)" if not r else ""))


def _mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 10e6 else f"{n / 1e6:.2f} MB"


def table(rows: dict[str, Row], prompt: int, new: int, read_gbs: float) -> str:
    from qpass.tables import markdown

    base = rows.get("eager")
    pre0 = statistics.median(base.prefill) if base else None
    dec0 = new / statistics.median(base.decode) if base else None
    body = []
    for key, row in rows.items():
        pre = statistics.median(row.prefill)
        dec = new / statistics.median(row.decode)
        per_tok = row.weight_bytes + row.kv_bytes_per_pos * (prompt + new / 2)
        lin = statistics.median(row.linear_pass) if row.linear_pass else None
        body.append([LABELS[key], row.backend, f"{pre * 1e3:.0f}", f"{pre0 / pre:.2f}x" if pre0 else "-",
                     f"{dec:.2f}", f"{dec / dec0:.2f}x" if dec0 else "-", _mb(per_tok),
                     f"{dec * per_tok / 1e9:.2f} GB/s", f"{100 * dec * per_tok / 1e9 / read_gbs:.0f}%",
                     f"{read_gbs / (per_tok / 1e9):.1f}",
                     f"{lin * 1e3:.2f}" if lin else "-",
                     f"{100 * row.linear_bytes / lin / 1e9 / read_gbs:.0f}%" if lin else "-",
                     f"{(1 / dec - lin) * 1e3:.2f}" if lin else "-"])
    return markdown(["variant", "runs on", "prefill ms", "prefill x eager", "decode tok/s", "decode x eager",
                     "bytes read / token", "achieved", "of read bw", "bw-limit tok/s", "linears ms / token",
                     "linears of read bw", "rest ms / token"], body, "llrrrrrrrrrrr", spaced_rule=True)


def targets(rows: dict[str, Row], prompt: int, new: int, read_gbs: float) -> list[str]:
    """Issue 21's targets, read off this run's rows (ratios of one run; '-' where a row was not measured)."""
    dec = {k: new / statistics.median(r.decode) for k, r in rows.items()}
    pre = {k: statistics.median(r.prefill) for k, r in rows.items()}
    frac = {k: dec[k] * (r.weight_bytes + r.kv_bytes_per_pos * (prompt + new / 2)) / 1e9 / read_gbs
            for k, r in rows.items()}
    out = []

    def ratio(a, b, good, what):
        if a in dec and b in dec:
            x = dec[a] / dec[b]
            out.append(f"{what}: {x:.2f}x ({'meets' if x >= good else 'misses'} >= {good:g}x)")

    ratio("w4a16_g128_lmhead4", "eager", 5, "W4A16 with lm_head in int4, decode vs FP32 eager")
    ratio("w4a16_g128", "eager", 3, "W4A16 with lm_head in fp32, decode vs FP32 eager")
    ratio("ort_w4", "ort_nbits", 1, "qpass ONNX W4 decode vs onnxruntime's MatMulNBitsQuantizer model (of "
          "torch.onnx's FP32 export)")
    if "ort_w4" in dec and "ort_nbits_qpass" in dec:
        out.append(f"qpass ONNX W4 decode vs the same quantizer on qpass's own FP32 ONNX (the same graph, a tie by "
                   f"construction): {dec['ort_w4'] / dec['ort_nbits_qpass']:.2f}x")
    if "w8a8" in pre and "eager" in pre:
        x = pre["eager"] / pre["w8a8"]
        out.append(f"W8A8 packed prefill vs FP32 eager: {x:.2f}x ({'meets' if x > 1 else 'misses'} > 1x)")
    packed = [k for k, r in rows.items() if r.backend == "torch packed"]
    if packed:
        low = [f"{LABELS[k]} {100 * frac[k]:.0f}%" for k in packed if frac[k] < 0.8]
        out.append("packed decode rows at >= 80% of their bandwidth limit: "
                   + ("all" if not low else f"{len(packed) - len(low)} of {len(packed)} (below: {', '.join(low)})"))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=tuple(SIZES), default="0.5b")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rows", default=None, help=f"comma-separated subset of {', '.join(ROWS)} (default: all)")
    ap.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime rows")
    ap.add_argument("--out", default=None, help="Markdown file with a bench-size section to write the table into")
    ap.add_argument("--section", default=SECTION, help=f"the section of --out (default {SECTION}; e.g. "
                    f"{SECTION}-2t for a second table at another thread count)")
    ap.add_argument("--work", default=None, help="cache of the ONNX models (default .cache/bench-size/SIZE)")
    ap.add_argument("--onnx-sessions", type=int, default=2, metavar="N",
                    help="onnxruntime sessions per ONNX row, all timed every round (default 2)")
    ap.add_argument("--cpu-clock", action="store_true", help="time by this thread's CPU time instead of wall time "
                    "(with --threads 1 only: every row then runs on the calling thread; on a machine shared with other "
                    "jobs, whose turns wall time would count)")
    ap.add_argument("--bandwidth-mb", type=int, default=None, help="buffer of the read-bandwidth measurement "
                    "(default 512; 32 with --size small)")
    args = ap.parse_args(argv)
    want = args.rows.split(",") if args.rows else list(ROWS)
    bad = [r for r in want if r not in ROWS]
    if bad:
        ap.error(f"--rows: unknown {', '.join(bad)} (choose from {', '.join(ROWS)})")
    if args.no_onnx:
        want = [r for r in want if not r.startswith("ort_")]
    elif any(r.startswith("ort_") for r in want):
        import importlib.util

        if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None:
            want = [r for r in want if not r.startswith("ort_")]
    if min(args.threads, args.repeats, args.prompt, args.new_tokens, args.onnx_sessions) < 1:
        ap.error("--threads, --repeats, --prompt, --new-tokens and --onnx-sessions must be >= 1")
    if args.cpu_clock and args.threads != 1:
        ap.error("--cpu-clock times the calling thread only: use it with --threads 1")
    args.want = want
    args.bandwidth_mb = args.bandwidth_mb or (32 if args.size == "small" else 512)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from qpass.backends import torch_packed as tp
    from qpass.tables import check_section, replace_section

    if args.out:                     # before minutes of measuring: the section must be there to be written
        try:
            check_section(args.out, args.section)
        except (OSError, ValueError) as e:
            raise SystemExit(f"bench_size: --out: {e}")

    say = lambda m: print(f"[bench_size] {m}", file=sys.stderr, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    model = synthetic_llama(args.size)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"synthetic Llama {args.size}: {n_params / 1e9:.3f} B parameters; rows {', '.join(args.want)}")
    length = -(-(args.prompt + args.new_tokens + 1) // 64) * 64
    rows = build_torch_rows(model, args.want, length, args.repeats, say)
    rows.update(build_onnx_rows(model, args.want, args.work or os.path.join(ROOT, ".cache", "bench-size", args.size),
                                args.threads, say, args.onnx_sessions))
    rows = {k: rows[k] for k in ROWS if k in rows}
    clock = time.thread_time if args.cpu_clock else time.perf_counter
    read_gbs = read_bandwidth(args.bandwidth_mb, args.repeats, clock)
    say(f"memory read bandwidth {read_gbs:.2f} GB/s; measuring")
    measure(rows, model.config.vocab_size, args.prompt, args.new_tokens, args.repeats, say, clock)
    read_gbs2 = read_bandwidth(args.bandwidth_mb, args.repeats, clock)
    read = max(read_gbs, read_gbs2)
    load1 = os.getloadavg()
    info = tp.machine()
    cmd = "python tools/bench_size.py " + " ".join(argv if argv is not None else sys.argv[1:])
    c = model.config
    onnx_note = ""
    if any(k.startswith("ort_") for k in rows):
        import onnxruntime

        onnx_note = f", onnxruntime {onnxruntime.__version__}"
    text = "\n".join([
        f"Generated by `{cmd.strip()}` on {datetime.date.today().isoformat()} in {time.perf_counter() - t_start:.0f} s "
        "(do not edit by hand; rerun the command).", "",
        f"Model: synthetic Llama, {n_params / 1e9:.3f} B parameters (hidden {c.hidden_size}, intermediate "
        f"{c.intermediate_size}, {c.num_hidden_layers} layers, {c.num_attention_heads}/{c.num_key_value_heads} heads, "
        f"vocab {c.vocab_size}, lm_head untied, random weights, seed 0); batch 1, prompt {args.prompt}, "
        f"{args.new_tokens} greedy decode steps; {args.threads} thread(s); medians of {args.repeats} rounds after "
        f"a warm-up, the rows interleaved in each round"
        + (f" (ONNX rows: {args.onnx_sessions} onnxruntime sessions each, every session in every round)"
           if any(k.startswith("ort_") for k in rows) else "")
        + ("; timed by the calling thread's CPU time (--cpu-clock), not wall time: every row runs on that one thread, "
           "and the turns of other jobs on the shared machine do not count" if args.cpu_clock else "") + ".", "",
        f"Machine: {info['cpu']}, {os.cpu_count()} cores, torch {torch.__version__} ({info['isa']}){onnx_note}, "
        f"Python {platform.python_version()}; native kernels: {tp.native.status()}. Load average "
        f"{load0[0]:.1f} at start, {load1[0]:.1f} at end on {os.cpu_count()} cores"
        + (" (the machine was shared with other jobs: read the ratios, not the absolute numbers)"
           if max(load0[0], load1[0]) > 0.5 else "") + ".", "",
        f"Memory-read bandwidth (sum of a {args.bandwidth_mb} MB fp32 tensor, {args.threads} thread(s), before and "
        f"after the rows): {read_gbs:.2f} and {read_gbs2:.2f} GB/s; the larger, {read:.2f} GB/s, is the limit "
        "below. Peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024:.1f} GB.", "",
        table(rows, args.prompt, args.new_tokens, read), "",
        *[f"- {t}" for t in targets(rows, args.prompt, args.new_tokens, read)], "",
        "Bytes read / token: every tensor a decode step reads (all weights but the embedding table, of which one "
        "row is read, plus the K/V cache written so far at the mean decode position; packed K/V caches at their "
        "packed size). Achieved: bytes read / token x decode tokens/s; of read bw: that over the measured read "
        "bandwidth; bw-limit tok/s: the decode speed at which the step would take exactly the read bandwidth. "
        "Linears (packed rows): the step's linear layers (its packed modules, and F.linear for a layer left in "
        "float, e.g. an fp32 lm_head) called back to back on a one-token input, in the order the step calls them, "
        "8 passes per round (the same weight bytes in the same order as a step reads "
        "them), and their bytes (the modules' tensors) over that time; rest: decode ms per token "
        "minus that, i.e. attention, norms, RoPE, the K/V cache, argmax and the per-op cost of running the graph, "
        "and whatever the same linears lose inside a step against back to back (caches and prefetchers the rest "
        "of the step disturbs). The linears here are called one by one from Python, while a decode step runs "
        "them inside native segments (backends/torch_packed/segments.py: one C call for a run of kernels), "
        "without the per-call Python, allocation and ctypes cost: a rest near or below zero means the step's "
        "own calls beat that by as much as everything else in the step costs.",
    ])
    print(text)
    if args.out:
        replace_section(args.out, args.section, text)
        say(f"wrote the {args.section} section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
