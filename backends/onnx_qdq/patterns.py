"""FX rewrite: qpass fake-quant nodes -> the ``qpass_onnx`` ops of the form onnxruntime runs fast.

Matches   every linear-like site (``qpass.graph.linear_sites``) whose weight and/or input is fake-quantized,
          then every other qpass quantizer (KV cache, ...)
Changes   a table keyed by (weight kind, input kind) picks the lowering of each linear:
            int weights, float input           dq_matmul        -> DequantizeLinear + MatMul (MatMulNBits)
            int8 weights, per-token int8 input int8_dyn_matmul  -> MatMulInteger chain (MatMulIntegerToFloat)
            int<=4 weights, per-token int8     matmul_nbits     -> MatMulNBits, accuracy_level 4 (W4A8)
            int8 per-channel symmetric weights, int8_outlier_matmul -> LLM.int8(): features with max |x| >=
              per-token int8 input with threshold threshold in this call stay float (NonZero/Gather + MatMul),
              columns (llm_int8, dynamic)                  the rest as int8_dyn_matmul
            int weights, other input           qdq / qdq_dynamic on the input + dq_matmul (exact, unfused)
            int weights, fp8 input             qdq_fp8 / qdq_fp8_dynamic (float8 Q/DQ) + dq_matmul (exact, unfused)
          other quantizers become qdq (static scales) or qdq_dynamic (scales from the tensor), with
          permute/reshape around them when their blocks span several axes (per-token K/V across heads);
          a K/V quantizer on cat([past_key_values input, new]) moves onto `new` (``_Rewriter.past_cache``)
          learned codebook weights (formats.Codebook, per channel or per group, optionally with sparse values)
                                               codebook_matmul  -> Gather(table) [+ ScatterND] + MatMul
          fixed-grid float weights (fp4_e2m1, nf4, fp8; static scales, no side channels)
                                               grid_matmul      -> Gather(grid) * Gather(scale) + MatMul
Requires  integer formats, learned codebooks or fixed-grid float weights; fp8 for activations / KV (fp4 / nf4
          activations raise UnsupportedOpError naming the node)
Preserves the function: the rewritten graph runs in torch and equals the fake-quant graph up to float
          rounding (W4A8 MatMulNBits is checked at accuracy level 0 there; level 4 is onnxruntime's kernel)

Weights become integer buffers (codes laid out [K, N]); the float weights are dropped from the graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.fx import GraphModule, Node

from qpass.errors import UnsupportedOpError
from qpass.graph import LinearSite, add_tensor, describe, get_attr, is_quantizer, linear_sites, module_path, param_of
from qpass.patterns import TRANSPOSES, attend_grouped, repeated_kv
from qpass.primitives import hadamard
from qpass.primitives import ops as qops
from qpass.primitives import quantize as quantize_codes
from qpass.primitives import formats as F
from qpass.primitives.formats import Codebook
from qpass.primitives.spec import BUILTIN_KINDS
from qpass.quantizer import Quantizer, Support, quantizers, refuse, role_of, unsupported

from . import ops, side_channels
from .qdq import FP8_FORMATS, Lowered, LoweringReport, QdqRewrites, check_int, is_fp8

aten = torch.ops.aten
NBITS_BLOCKS = (16, 32, 64, 128, 256)   # block sizes onnxruntime's MatMulNBits kernels take


@dataclass(frozen=True)
class LowerOptions:
    """How quantized linears are lowered (see docs/onnx.md for the measurements behind the defaults).

    w4a8:         "matmulnbits": com.microsoft.MatMulNBits with accuracy_level (4: int8 activations inside the
                  kernel, per block of K), fast; "qdq": exact per-token Q/DQ + DequantizeLinear, unfused, slow.
    int8_weights: storage of int8 weights that meet int8 activations. "u8": codes + 128 with zero point 128
                  (exact on every x86 CPU: onnxruntime's U8U8 kernels); "s8": int8 codes (U8S8, fastest with
                  AVX-VNNI, but onnxruntime's AVX2 kernel saturates int16 pair sums, a large error on CPUs
                  without VNNI).
    """

    w4a8: Literal["matmulnbits", "qdq"] = "matmulnbits"
    accuracy_level: int = 4
    int8_weights: Literal["u8", "s8"] = "u8"
    fused_accuracy_level: int = 4     # the weight-only MatMulNBits level (lower.py's session config), also the
                                      # attribute of an explicit MatMulNBits a tied table shares (tied_embedding)
    attention: Literal["grouped", "torch"] = "grouped"   # "grouped": SDPA over grouped K/V heads without copies
                                      # (group_attention + translations.sdpa); "torch": torch.onnx's translation

    def __post_init__(self):
        if self.w4a8 not in ("matmulnbits", "qdq"):
            raise UnsupportedOpError(f"w4a8 must be 'matmulnbits' or 'qdq', got {self.w4a8!r}")
        if self.int8_weights not in ("u8", "s8"):
            raise UnsupportedOpError(f"int8_weights must be 'u8' or 's8', got {self.int8_weights!r}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise UnsupportedOpError(f"accuracy_level must be 0..4, got {self.accuracy_level!r}")
        if self.attention not in ("grouped", "torch"):
            raise UnsupportedOpError(f"attention must be 'grouped' or 'torch', got {self.attention!r}")
        if self.fused_accuracy_level not in (0, 1, 2, 3, 4):
            raise UnsupportedOpError(f"fused_accuracy_level must be 0..4, got {self.fused_accuracy_level!r}")


# --------------------------------------------------------------------------------------------- kinds


@dataclass(frozen=True)
class _Weight:
    """A fake-quantized weight as integer codes laid out [K, N] with its scale layout."""

    codes: torch.Tensor          # int8 (symmetric) or uint8 (asymmetric), [K, N]
    scale: torch.Tensor          # [ceil(K/block), N] (block > 0), [N] or 0-d (block == 0)
    zero_point: torch.Tensor | None
    block: int
    bits: int

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None


def _input_kind(gm: GraphModule, n: Node | None) -> str:
    if n is None:
        return "float"
    bits = check_int(gm, n, fp8=True)
    if is_fp8(n):
        return "fp8"
    q = Quantizer(n)
    if q.dynamic:
        block = q.block
        per_token = all(b == 1 for b in block[:-1]) and block[-1] == -1
        # a clipping ratio: the Q/DQ chain (qdq_dynamic), which has it; the fused int8 paths compute max|x| / 127
        return "token8" if per_token and q.symmetric and bits == 8 and q.clip_ratio == 1.0 else "other"
    return "static8" if bits == 8 and _is_per_tensor(gm, n) else "other"


def _is_per_tensor(gm: GraphModule, n: Node) -> bool:
    return getattr(gm, Quantizer(n).scale.target).numel() == 1


def _weight(gm: GraphModule, site: LinearSite, fq: Node) -> _Weight:
    bits = check_int(gm, fq)
    q = Quantizer(fq)
    w = param_of(gm, site.weight)
    w_use = w.detach().t() if _flips(q.x, site.weight) % 2 else w.detach()
    scale = getattr(gm, q.scale.target).detach()
    zp = getattr(gm, q.zero_point.target).detach() if q.zero_point is not None else None
    block = list(q.block)
    codes = quantize_codes(w_use, scale, zp, block, q.fmt_name)
    if site.use_in_axis == 1:                   # consumed [out, in]: lay out as [K, N]
        codes, scale = codes.t(), scale.t()
        zp = None if zp is None else zp.t()
        block = block[::-1]
    b_k, b_n = block
    if b_n == 1 and b_k > 0:                    # per group along K (possibly partial last group)
        lay = (scale.float().contiguous(), None if zp is None else zp.to(torch.uint8).contiguous(), b_k)
    elif b_n == 1 and b_k == -1:                # per output channel
        lay = (scale.reshape(-1).float(), None if zp is None else zp.reshape(-1).to(torch.uint8), 0)
    elif b_n == -1 and b_k == -1:               # per tensor
        lay = (scale.reshape(()).float(), None if zp is None else zp.reshape(()).to(torch.uint8), 0)
    else:
        raise UnsupportedOpError(f"onnx_qdq lowers per-tensor, per-channel (output) and per-group (input) "
                                 f"weight scales; this weight has block size {q.block}",
                                 where=describe(gm, site.node), fix="use the torch backend for this model")
    return _Weight(codes.contiguous(), lay[0], lay[1], lay[2], bits)


@dataclass(frozen=True)
class _CodebookWeight:
    """A learned-codebook weight for codebook_matmul, laid out [K, N] (see ops.codebook_weight)."""

    codes: torch.Tensor                 # uint8 [K, N]
    table: torch.Tensor                 # float32 [blocks * 2^b]: the tables with their scales folded in
    off_k: torch.Tensor                 # int32 [K, 1], off_n int32 [1, N]: the block of each element, times 2^b
    off_n: torch.Tensor
    outlier_index: torch.Tensor | None  # int64 [nnz, 1] flat indices into [K, N]
    outlier_value: torch.Tensor | None  # float32 [nnz]


def is_codebook(q: Quantizer) -> bool:
    """A learned codebook (formats.Codebook) with static scales, no zero point, at most sparse values."""
    return (isinstance(q.fmt, Codebook) and q.codebook is not None and not q.dynamic and q.zero_point is None
            and set(q.side_channels.names) <= {"outliers"} and len(q.block) == 2)


def _block_offsets(q: Quantizer, w_use: torch.Tensor, scale_shape, size: int, in_axis: int):
    """(off_k [K, 1], off_n [1, N]) int32: the flat index of each element's block in a [*scale_shape] layout
    (times `size`, the entries per block), laid out as the [K, N] MatMul weight (`in_axis`: the axis of `w_use`,
    the weight as the quantizer sees it, that is K)."""
    (a, b), (sa, sb) = w_use.shape, scale_shape
    ba, bb = (a if q.block[0] == -1 else q.block[0]), (b if q.block[1] == -1 else q.block[1])
    off_a = ((torch.arange(a) // ba).clamp(max=sa - 1) * sb * size).to(torch.int32)
    off_b = ((torch.arange(b) // bb).clamp(max=sb - 1) * size).to(torch.int32)
    if in_axis == 1:                                                      # the quantizer sees [N, K]
        return off_b.reshape(-1, 1).contiguous(), off_a.reshape(1, -1).contiguous()
    return off_a.reshape(-1, 1).contiguous(), off_b.reshape(1, -1).contiguous()


def _codebook_weight(gm: GraphModule, site: LinearSite, fq: Node) -> _CodebookWeight:
    q = Quantizer(fq)
    w = param_of(gm, site.weight).detach()
    w_use = w.t() if _flips(q.x, site.weight) % 2 else w                 # as the quantizer sees it: [A, B]
    scale, table = getattr(gm, q.scale.target).detach(), getattr(gm, q.codebook.target).detach()
    codes = F.quantize_ext(w_use, scale, None, list(q.block), q.fmt_name, codebook=table)
    dtype = torch.promote_types(w.dtype, torch.float32)                 # formats.dequantize_ext's arithmetic
    flat = (table.to(dtype) * scale.to(dtype).unsqueeze(-1)).reshape(-1).float()
    off_k, off_n = _block_offsets(q, w_use, scale.shape, table.shape[-1], site.use_in_axis)
    o = q.side_channels.outliers
    idx = val = None
    if o is not None:
        idx, val = getattr(gm, o.index.target).detach().long(), getattr(gm, o.value.target).detach().float()
    a, b = w_use.shape
    if site.use_in_axis == 1:                                             # the quantizer sees [N, K]
        codes = codes.t()
        if idx is not None:
            idx = (idx % b) * a + idx // b
    return _CodebookWeight(codes.to(torch.uint8).contiguous(), flat.contiguous(), off_k, off_n,
                           None if idx is None else idx.reshape(-1, 1).contiguous(), val)


def is_grid(q: Quantizer) -> bool:
    """A weight in a built-in float format with a fixed value grid (fp4_e2m1, nf4, fp8_e4m3 / e5m2): static
    scales, no zero point, no side channels, a 2-D block layout."""
    return (q.role == "weight" and q.fmt.kind in ("float", "lut") and q.codebook is None and not q.dynamic
            and q.zero_point is None and not q.side_channels and len(q.block) == 2)


def format_grid(fmt: str) -> torch.Tensor:
    """float32 value (in code units) of every code of a built-in float format, indexed by the code's bits as
    uint8: 16 entries for fp4_e2m1 / nf4, 256 for fp8 (the NaN patterns included: rounding never makes them)."""
    dtype = F.quant.codes_dtype(fmt, True)
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return torch.arange(256, dtype=torch.uint8).view(dtype).float()
    return F.quant._decode(torch.arange(16, dtype=torch.uint8), None, fmt, torch.float32)


@dataclass(frozen=True)
class _GridWeight:
    """A fixed-grid float weight for grid_matmul, laid out [K, N] (see ops.grid_weight)."""

    codes: torch.Tensor                 # uint8 [K, N] (fp8: the float8 bits)
    grid: torch.Tensor                  # float32 [2^bits]
    scale: torch.Tensor                 # float32 [blocks]
    off_k: torch.Tensor                 # int32 [K, 1], off_n int32 [1, N]: the block of each element
    off_n: torch.Tensor


def _grid_weight(gm: GraphModule, site: LinearSite, fq: Node) -> _GridWeight:
    q = Quantizer(fq)
    w = param_of(gm, site.weight).detach()
    w_use = w.t() if _flips(q.x, site.weight) % 2 else w                 # as the quantizer sees it: [A, B]
    scale = getattr(gm, q.scale.target).detach()
    if scale.dim() != 2:                                                  # per tensor: one block
        scale = scale.reshape(1, 1)
    codes = F.quantize_ext(w_use, scale, None, list(q.block), q.fmt_name)
    if codes.dtype != torch.uint8:                                        # fp8 codes: their bits
        codes = codes.view(torch.uint8)
    off_k, off_n = _block_offsets(q, w_use, scale.shape, 1, site.use_in_axis)
    if site.use_in_axis == 1:
        codes = codes.t()
    return _GridWeight(codes.contiguous(), format_grid(q.fmt_name), scale.float().reshape(-1).contiguous(),
                       off_k, off_n)


# ------------------------------------------------------------------------------------------ handlers


class _Rewriter(QdqRewrites):
    def __init__(self, gm: GraphModule, opts: LowerOptions):
        self.gm, self.opts, self.report = gm, opts, LoweringReport()
        self.weights: list[tuple[int, Node]] = []     # (report row, float weight node) of quantized weights

    def buffer(self, before: Node, name: str, value: torch.Tensor | None) -> Node | None:
        if value is None:
            return None
        return get_attr(self.gm, before, add_tensor(self.gm, name, value.contiguous()))

    def call(self, before: Node, op, args: tuple, like: Node | None = None) -> Node:
        with self.gm.graph.inserting_before(before):
            n = self.gm.graph.call_function(op, args)
        for key in ("nn_module_stack", "stack_trace"):
            if key in before.meta:
                n.meta[key] = before.meta[key]
        if like is not None and "val" in like.meta:
            n.meta["val"] = like.meta["val"]
        return n

    # -- linears
    def linear(self, site: LinearSite) -> None:
        wq = site.weight_use if is_quantizer(site.weight_use) else None
        xq = site.input if role_of(site.input) == "input" else None
        if wq is None and xq is None:
            return
        bias_arg = site.node.args[0] if site.node.target is aten.addmm.default else \
            (site.node.args[2] if len(site.node.args) > 2 else site.node.kwargs.get("bias"))
        if bias_arg is not None and site.bias is None:
            raise UnsupportedOpError("onnx_qdq lowers linears whose bias is a parameter; this one is computed",
                                     where=describe(self.gm, site.node), fix="use the torch backend")
        if xq is not None and Quantizer(xq).side_channels.threshold_columns is not None:
            return self._finish(site, wq, *self._int8_outliers(site, xq, wq))
        if wq is not None and is_codebook(Quantizer(wq)):
            x = self.standalone(xq, before=site.node, user=site.node) if xq is not None else site.input
            return self._finish(site, wq, *self._codebook(site, x, wq))
        if wq is not None and is_grid(Quantizer(wq)):
            if _tied_lookups(wq):
                raise UnsupportedOpError(f"onnx_qdq lowers {Quantizer(wq).fmt_name} weights of linears, not of a "
                                         "tied embedding table", where=describe(self.gm, site.node),
                                         fix="use an int format for the tied lm_head, or the torch backend")
            x = self.standalone(xq, before=site.node, user=site.node) if xq is not None else site.input
            return self._finish(site, wq, *self._grid(site, x, wq))
        side = wq is not None and bool(Quantizer(wq).side_channels)       # side_channels.py lowers those
        w = _weight(self.gm, site, wq) if wq is not None and not side else None
        kind = _input_kind(self.gm, xq)
        name = f"{site.weight.target}"
        fused = next((h for rule, h in FUSED if w is not None and rule(w, kind, self.opts)), None)
        lookups = _tied_lookups(wq) if wq is not None else []
        if lookups:
            new, form, note = self._tied(site, w, kind, name, lookups)
        elif fused is not None:
            new, form, note = getattr(self, fused)(site, Quantizer(xq).x, w, name)
        elif side:
            x = self.standalone(xq, before=site.node, user=site.node) if xq is not None else site.input
            new, form, note = side_channels.lower_linear(self, site, wq, x)
        else:
            x = self.standalone(xq, before=site.node, user=site.node) if xq is not None else site.input
            new, form, note = self._dq_matmul(site, x, w, name, kind)
        self._finish(site, wq, new, form, note)

    def _finish(self, site: LinearSite, wq: Node | None, new: Node, form: str, note: str) -> None:
        if "val" in site.node.meta:
            new.meta["val"] = site.node.meta["val"]
        site.node.replace_all_uses_with(new)
        self.gm.graph.erase_node(site.node)
        self.report.rows.append(Lowered(site.path or site.node.name, form, note))
        if wq is not None:
            self.weights.append((len(self.report.rows) - 1, site.weight))

    def _codebook(self, site: LinearSite, x: Node, fq: Node):
        """A learned codebook weight -> codebook_matmul (uint8 codes, flat table, offsets, sparse values)."""
        cb = _codebook_weight(self.gm, site, fq)
        name, b = f"{site.weight.target}", site.node
        node = self.call(b, ops.codebook_matmul, (
            x, self.buffer(b, f"{name}_codes", cb.codes), self.buffer(b, f"{name}_table", cb.table),
            self.buffer(b, f"{name}_off_k", cb.off_k), self.buffer(b, f"{name}_off_n", cb.off_n),
            self.buffer(b, f"{name}_outlier_index", cb.outlier_index),
            self.buffer(b, f"{name}_outlier_value", cb.outlier_value), site.bias))
        q = Quantizer(fq)
        sparse = f" + {cb.outlier_index.shape[0]} sparse values (ScatterND add)" if cb.outlier_index is not None else ""
        form = f"{q.fmt_name} {q.granularity}: Gather(table) + MatMul{sparse}"
        return node, form, "codebook weights: uint8 codes + tables, decoded by Gather; nothing fused (docs/onnx.md)"

    def _grid(self, site: LinearSite, x: Node, fq: Node):
        """A fixed-grid float weight (fp4_e2m1, nf4, fp8) -> grid_matmul (uint8 codes, grid, scales, offsets)."""
        g = _grid_weight(self.gm, site, fq)
        name, b = f"{site.weight.target}", site.node
        node = self.call(b, ops.grid_matmul, (
            x, self.buffer(b, f"{name}_codes", g.codes), self.buffer(b, f"{name}_grid", g.grid),
            self.buffer(b, f"{name}_scale", g.scale), self.buffer(b, f"{name}_off_k", g.off_k),
            self.buffer(b, f"{name}_off_n", g.off_n), site.bias))
        q = Quantizer(fq)
        form = f"{q.fmt_name} {q.granularity}: Gather(grid) * scale + MatMul"
        return node, form, "float-format weights: uint8 codes decoded by Gather from the format's grid; nothing fused"

    def _dq_matmul(self, site, x, w: _Weight | None, name: str, kind: str):
        if w is None:
            weight = site.weight_use if site.use_in_axis == 0 else self.call(site.node, aten.t.default,
                                                                             (site.weight_use,))
            mm = self.call(site.node, aten.matmul.default, (x, weight))
            out = mm if site.bias is None else self.call(site.node, aten.add.Tensor, (mm, site.bias))
            return out, "float MatMul, Q/DQ input", "activation-only quantizers run as Q/DQ (unfused)"
        codes, zp = w.codes, w.zero_point
        if kind == "static8" and w.bits == 8 and self.opts.int8_weights == "u8":
            codes, zp = _to_u8(codes, zp, w.scale)
        node = self.call(site.node, ops.dq_matmul, (
            x, self.buffer(site.node, f"{name}_codes", codes), self.buffer(site.node, f"{name}_dq_scale", w.scale),
            self.buffer(site.node, f"{name}_dq_zero_point", zp), w.block, w.bits, site.bias))
        gran = f"g{w.block}" if w.block else ("per-channel" if w.scale.dim() else "per-tensor")
        note = ""
        if w.block and w.block not in NBITS_BLOCKS:
            note = f"group size {w.block} is not one of {NBITS_BLOCKS}: DequantizeLinear + MatMul stay unfused"
        if kind == "static8":
            form = f"W{w.bits}A8 static: Q/DQ input + DQ weight ({gran})"
            if w.bits != 8:
                note = "int8 Q/DQ activations with sub-8-bit weights do not fuse in onnxruntime (exact, slow)"
        elif kind == "fp8":
            form = f"W{w.bits} + float8 Q/DQ input ({gran})"
            note = note or "FP8 activations as float8 QuantizeLinear/DequantizeLinear: exact, unfused"
        elif kind == "other":
            form = f"W{w.bits} + Q/DQ input ({gran})"
            note = note or "this activation quantizer has no fused onnxruntime kernel: Q/DQ, exact, unfused"
        else:
            form = f"W{w.bits}A16: DequantizeLinear + MatMul ({gran})"
        if kind == "token8" and w.bits <= 4:
            form, note = f"W{w.bits}A8: Q/DQ input + DQ weight ({gran})", "w4a8='qdq' (or asymmetric weights): exact, unfused"
        elif kind == "token8":
            note = "per-token int8 activations fuse with symmetric per-channel int8 weights only (exact, unfused)"
        return node, form, note

    def _tied(self, site, w: _Weight, kind: str, name: str, lookups: list[Node]):
        """A weight-only linear whose quantized weight embedding lookups also read (quantize's tied_embedding:
        shared): the linear is an explicit MatMulNBits (4 or 8 bits, accuracy level: fused_accuracy_level) whose
        uint8 bytes and scales the lookups gather (gather_nbits). No float copy of the table is left.
        NOTE: not DequantizeLinear + MatMul: onnxruntime (1.32) does not fuse that into MatMulNBits when the codes
        initializer has another reader, and would dequantize the whole table at every call."""
        where = describe(self.gm, site.node)
        if kind != "float":
            raise UnsupportedOpError("onnx_qdq shares a tied embedding table with a weight-only linear (float input); "
                                     "this one quantizes its input too", where=where,
                                     fix="quantize the tied lm_head's weights only, or use tied_embedding: float")
        if w.bits in (4, 8) and w.symmetric and (w.block in NBITS_BLOCKS or _nbits_block(w.block, w.codes.shape[0])):
            k = w.codes.shape[0]             # a block dividing K and the group: the table is not padded
            fit = [b for b in NBITS_BLOCKS if k % b == 0 and (w.block == 0 or w.block % b == 0)]
            new, _, _ = self._nbits(site, site.input, w, name, level=self.opts.fused_accuracy_level,
                                    block=max(fit, default=None))
            block = new.args[7]
            form, note = f"W{w.bits}A16: MatMulNBits(block {block}, accuracy_level {self.opts.fused_accuracy_level})", ""
            table = lambda ids, e: self.call(e, ops.gather_nbits, (ids, new.args[1], new.args[2], k, w.bits, block))  # noqa: E731
            how = "Gather of the MatMulNBits bytes and scales" + (", nibbles unpacked" if w.bits == 4 else "")
        else:
            raise UnsupportedOpError(f"onnx_qdq shares a tied embedding table with symmetric int8 or int4 weights in "
                                     f"MatMulNBits blocks {NBITS_BLOCKS} (or per channel); this one is {w.bits}-bit"
                                     f"{'' if w.symmetric else ' asymmetric'} with block {w.block}", where=where,
                                     fix="use symmetric int8 or int4 (group 16..256) for the tied lm_head, the torch "
                                         "backend, or tied_embedding: float")
        first = min(lookups, key=list(self.gm.graph.nodes).index)
        for a in new.args:                           # the initializers are read before the linear: move them up
            if isinstance(a, Node) and a.op == "get_attr":
                first.prepend(a)
        for e in lookups:
            g = table(e.args[1], e)
            g.meta.update({k: e.meta[k] for k in ("val", "nn_module_stack", "stack_trace") if k in e.meta})
            e.replace_all_uses_with(g)
            self.gm.graph.erase_node(e)
        readers = ", ".join(sorted({module_path(self.gm, e) or e.name for e in lookups}))
        text = f"tied table shared with {readers} ({how}): one integer copy, no float table"
        return new, form, "; ".join(x for x in (note, text) if x)

    def _int8_dynamic(self, site, x, w: _Weight, name: str):
        codes, w_zp = (w.codes, 0) if self.opts.int8_weights == "s8" else \
            ((w.codes.to(torch.int16) + 128).to(torch.uint8), 128)
        node = self.call(site.node, ops.int8_dyn_matmul, (
            x, self.buffer(site.node, f"{name}_codes", codes), self.buffer(site.node, f"{name}_dq_scale", w.scale),
            site.bias, w_zp))
        return node, f"W8A8 per-token: MatMulInteger ({self.opts.int8_weights} weights)", ""

    def _int8_outliers(self, site, xq: Node, wq: Node | None):
        """LLM.int8() with the outlier features found per call (an input quantizer with threshold columns) ->
        int8_outlier_matmul. Only on symmetric per-channel int8 weights and a per-token int8 input."""
        q, where = Quantizer(xq), describe(self.gm, site.node)
        t = q.side_channels.threshold_columns
        fix = "quantize this linear with llm_int8 (int8 per-row weights, per-token int8 inputs), or use the torch " \
              "backend (qpass.lower(qm, 'torch'))"
        wqq = Quantizer(wq) if wq is not None else None
        if wqq is None or wqq.side_channels or wqq.codebook is not None or wqq.fmt_name != "int8":
            raise UnsupportedOpError("onnx_qdq lowers per-call float features (threshold columns) in front of a "
                                     "plain int8 weight quantizer only; this linear's weight is "
                                     f"{'float' if wqq is None else wqq.fmt_name}", where=where, fix=fix)
        w = _weight(self.gm, site, wq)
        per_token = all(b == 1 for b in q.block[:-1]) and q.block[-1] == -1
        if not (w.symmetric and w.block == 0 and w.scale.dim() == 1) or not (per_token and q.symmetric
                                                                             and q.fmt_name == "int8"):
            raise UnsupportedOpError("onnx_qdq lowers per-call float features with symmetric per-channel int8 "
                                     "weights and a symmetric per-token int8 input only (LLM.int8())",
                                     where=where, fix=fix)
        if t.axis not in (-1, len(q.block) - 1):
            raise UnsupportedOpError(f"onnx_qdq lowers threshold columns along the last axis only, not {t.axis}",
                                     where=where, fix=fix)
        name = f"{site.weight.target}"
        codes, w_zp = (w.codes, 0) if self.opts.int8_weights == "s8" else \
            ((w.codes.to(torch.int16) + 128).to(torch.uint8), 128)
        node = self.call(site.node, ops.int8_outlier_matmul, (
            q.x, self.buffer(site.node, f"{name}_codes", codes), self.buffer(site.node, f"{name}_dq_scale", w.scale),
            site.bias, w_zp, float(t.threshold)))
        form = f"W8A8 per-token, float features where max |x| >= {t.threshold:g} per call: MatMulInteger + " \
               f"NonZero/Gather MatMul ({self.opts.int8_weights} weights)"
        return node, form, ("LLM.int8() decomposition: the outlier features are found in every call (ReduceMax, "
                            "NonZero); the int8 part fuses as W8A8 does, the float part is a small unfused MatMul")

    def _nbits(self, site, x, w: _Weight, name: str, level: int | None = None, block: int | None = None):
        k, n = w.codes.shape
        block = block or (w.block if w.block in NBITS_BLOCKS else _nbits_block(w.block, k))
        if block is None:
            return self._dq_matmul(site, x, w, name, "token8")  # no MatMulNBits block fits: exact Q/DQ form
        rows = -(-k // block)
        if w.block:                                  # per group: repeat each group's scale over its blocks
            idx = (torch.arange(rows) * block) // w.block
            scales = w.scale[idx]
        else:                                        # per channel / tensor: the same scale in every block
            scales = w.scale.reshape(1, -1).expand(rows, n) if w.scale.dim() else w.scale.expand(rows, n)
        bits = 8 if w.bits == 8 else 4
        unsigned = (w.codes.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8).t()   # [N, K], zero point 2^(b-1)
        packed = ops.pack_nbits(unsigned, block, bits)
        node = self.call(site.node, ops.matmul_nbits, (
            x, self.buffer(site.node, f"{name}_nbits", packed),
            self.buffer(site.node, f"{name}_scales", scales.t().contiguous()), site.bias, k, n, bits, block,
            self.opts.accuracy_level if level is None else level))
        return node, f"W{w.bits}A8: MatMulNBits(block {block}, accuracy_level {self.opts.accuracy_level})", \
            "W4A8 runs int8 activations per block of K inside MatMulNBits (not per token): see docs/onnx.md"



# (weight, input kind, options) -> the _Rewriter method of a fused form; anything else is _dq_matmul
FUSED = [
    (lambda w, kind, o: kind == "token8" and w.bits == 8 and w.symmetric and w.block == 0, "_int8_dynamic"),
    (lambda w, kind, o: kind == "token8" and w.bits <= 4 and w.symmetric and o.w4a8 == "matmulnbits", "_nbits"),
]


def _tied_lookups(wq: Node) -> list[Node]:
    """Embedding lookups reading weight quantizer `wq` itself (quantize's tied_embedding: shared)."""
    return [u for u in wq.users if u.op == "call_function" and u.target is aten.embedding.default and u.args[0] is wq]


def _nbits_block(group: int, k: int) -> int | None:
    """A MatMulNBits block that a per-group (`group` > 0) or per-channel (0) scale layout fits exactly."""
    if group == 0:
        return min(128, max(16, 1 << (k - 1).bit_length()))
    for b in sorted(NBITS_BLOCKS, reverse=True):
        if group % b == 0:
            return b
    return None


def _to_u8(codes: torch.Tensor, zp: torch.Tensor | None, scale: torch.Tensor):
    """Symmetric int8 codes -> uint8 codes + 128 with zero point 128 (the same values, exactly)."""
    if zp is not None:
        return codes, zp
    return (codes.to(torch.int16) + 128).to(torch.uint8), torch.full(scale.shape, 128, dtype=torch.uint8)


def _flips(n: Node, weight: Node) -> int:
    """Transposes between the stored weight and `n` (what the weight quantizer reads)."""
    count = 0
    while n is not weight:
        count, n = count + 1, n.args[0]
    return count


# What this backend lowers (qpass.quantizer.Support), for every role: integer formats (and fp8 for every role but
# weights: float8 Q/DQ); weights may carry
# second-level scales and sparse values (side_channels.py), or be learned codebooks (formats.Codebook) with
# sparse values (codebook_matmul: Gather + MatMul). Layouts are checked where they are lowered.
SUPPORTS = {"weight": Support(kinds=frozenset({"int", "codebook", "float", "lut"}),
                             side=side_channels.SIDE | frozenset({"outliers"})),    # float / lut: is_grid only
            "input": Support(kinds=frozenset({"int", "float"}), side=frozenset({"threshold_columns"})),
            "*": Support(kinds=frozenset({"int", "float"}))}      # float: fp8 only (checked in check_supported)


def check_supported(gm: GraphModule) -> None:
    """Raise UnsupportedOpError for the first quantizer SUPPORTS does not cover (before any export work):
    a built-in non-integer format with check_int's message, anything else naming every unsupported part."""
    for q in quantizers(gm):
        part = unsupported(q, SUPPORTS)
        if part is None and q.role == "weight" and q.fmt.kind in ("float", "lut"):
            if not is_grid(q):
                part = f"format {q.fmt_name} with a zero point, side channels, quantized scales or dynamic scales " \
                       f"(float-format weights lower as Gather from the format's grid with plain static scales)"
        elif part is None and q.fmt.kind == "float" and q.fmt_name not in FP8_FORMATS:
            part = f"format {q.fmt_name} (kind float: only fp8 formats lower, as float8 Q/DQ; opset 21 has no " \
                   f"{q.fmt_name} type)"
        elif part is None and q.side_channels and is_codebook(q) and q.side_channels.names != ("outliers",):
            part = "side channels other than sparse values on a codebook"
        elif part is None and q.side_channels and not is_codebook(q) and q.role != "input":
            part = side_channels.why_not(q)
        if part is None:
            continue
        if q.fmt.kind in BUILTIN_KINDS and not q.side_channels and q.codebook is None:
            check_int(gm, q.node, fp8=q.role != "weight")
        raise refuse(gm, q, "onnx_qdq", part, fix="use the torch backend (qpass.lower(qm, 'torch')), or an "
                     "int format without side channels for this target (ignore it in the recipe to keep it float)")


def rewrite(gm: GraphModule, opts: LowerOptions = LowerOptions()) -> LoweringReport:
    """Rewrite every qpass quantizer of `gm` in place (see the module docstring); drop the float weights
    and quantizer buffers nothing reads any more."""
    hadamards_to_matmul(gm)
    r = _Rewriter(gm, opts)
    for site in linear_sites(gm):
        r.linear(site)
    for n in list(gm.graph.nodes):
        if is_quantizer(n) and n.users and not r.past_cache(n):
            r.standalone(n)
    if opts.attention == "grouped":     # after the quantizers: a K/V quantizer on cat([past, new]) is matched with
        r.report.grouped_attention = group_attention(gm)     # its readers as they were
    _erase_dead(gm)
    _note_shared_weights(gm, r)
    gm.recompile()
    return r.report


def group_attention(gm: GraphModule) -> int:
    """SDPA over transformers' ``repeat_kv`` copies of K and V -> SDPA over the K/V heads themselves
    (``enable_gqa``), which ``translations.sdpa`` exports without copying them. Returns the count."""
    sites = repeated_kv(gm, static=False)
    for site in sites:
        attend_grouped(gm, site)
    return len(sites)


def hadamards_to_matmul(gm: GraphModule) -> int:
    """The rotate pass's online Hadamards (``qpass.hadamard(x, factor)``) as ``x @ T`` with T the dense transform
    (a float constant): one standard MatMul in ONNX, exact up to float rounding. The FWHT has no single ONNX op."""
    done = 0
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target is not hadamard.HADAMARD:
            continue
        x, factor, signs = (tuple(n.args) + (None,))[:3]
        size = int(n.meta["val"].shape[-1])
        t = hadamard.transform_matrix(size, param_of(gm, factor).detach().double())
        if signs is not None:
            t = param_of(gm, signs).detach().double().view(size, 1) * t
        t = t.float()
        name = add_tensor(gm, f"{factor.target}_dense", t)
        mat = get_attr(gm, n, name)
        with gm.graph.inserting_before(n):
            mm = gm.graph.call_function(aten.matmul.default, (x, mat))
        mm.meta.update({k: v for k, v in n.meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
        n.replace_all_uses_with(mm)
        gm.graph.erase_node(n)
        for a in (factor, signs):
            if a is not None and not a.users:
                gm.graph.erase_node(a)
        done += 1
    return done


def _note_shared_weights(gm: GraphModule, r: _Rewriter) -> None:
    """A quantized weight whose float tensor something else still reads (a tied lm_head / embedding): that
    reader keeps the float values (it is not quantized behind the recipe's back) and the model stores the float
    tensor as well as the linear's integer copy. Said in the linear's report row."""
    alive = set(gm.graph.nodes)
    for row, weight in r.weights:
        if weight not in alive or not weight.users:
            continue
        readers = sorted({f"{module_path(gm, u) or u.name} ({u.target.__name__ if callable(u.target) else u.target})"
                          for u in weight.users})
        lowered = r.report.rows[row]
        text = (f"weight shared with {', '.join(readers)} (tied), which keeps reading it in float: the float tensor "
                f"is stored too, beside this linear's integer copy")
        r.report.rows[row] = type(lowered)(lowered.path, lowered.form, "; ".join(x for x in (lowered.note, text) if x))


def _erase_dead(gm: GraphModule) -> None:
    """Erase quantizers, transposes and get_attrs left without users, then the tensors no node reads."""
    dead_ops = {qops.fake_quantize, qops.fake_quantize_dynamic, qops.fake_quantize_ext} | TRANSPOSES
    changed = True
    while changed:
        changed = False
        for n in reversed(list(gm.graph.nodes)):
            if not n.users and (n.op == "get_attr" or (n.op == "call_function" and n.target in dead_ops)):
                gm.graph.erase_node(n)
                changed = True
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            owner, _, leaf = name.rpartition(".")
            mod = gm.get_submodule(owner) if owner else gm
            if leaf in mod._parameters:
                del mod._parameters[leaf]
            elif leaf in mod._buffers:
                del mod._buffers[leaf]
