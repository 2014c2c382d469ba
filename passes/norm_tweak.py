"""Norm Tweaking (Li et al., AAAI 2024): after any PTQ pass, tune only the norm weights of each block.

Matches   every norm of a decoder block that the folding analysis finds as a producer (RMSNorm's weight, LayerNorm's
          weight and bias, a per-channel multiply), in blocks holding quantized linears selected by targets/ignore
Changes   only those norm parameters, block by block (qpass.blockwise), so that the quantized block's outputs match
          the float block's in distribution: the paper's channel-wise loss, per output channel c the distance
          |mu_f(c) - mu_q(c)| + |sigma_f(c) - sigma_q(c)| of the mean and standard deviation over tokens, averaged
          over channels and samples. The float block is the float model's (``qpass.apply``'s model, so a PTQ pass
          before, e.g. GPTQ, that overwrote the graph's float weights does not change the teacher) on the float
          model's inputs; the student is the block as quantized, on the outputs of the blocks before it as already
          tweaked. Data: text the float model generates itself (LLM-QAT's generator, qpass.qat.datagen: random
          start tokens, a few greedy tokens, then sampled), or the calibration set (``data: calibration``).
          Adam; the best step kept, the block left as it was when that is better on held-out samples
          (``guard: block``). Then (``guard: model``, the default) the whole quantized model with the tuned norms
          is compared with the same model with the norms it started from, and the tuned norms are kept only when
          they score better (stats ``guard``): by the next-token loss on the calibration text where the recipe
          has calibration data (windows the tuning did not train on: all of them with generated data), else by
          KL(FP || Q) against the float model on the held-out generated sequences. Baked: the tuned norm weights
          are the parameters; no node added
Requires  the float model (``qpass.apply``; not ``apply_from_disk``, which has no float model in memory)
Preserves graph structure

Deviation (``guard``): the paper keeps whatever the tuning gives. Its loss is a per-block channel statistic, and a
block that matches the float block's channel means and deviations better can still move the model's next-token
distribution away from the float model's (on the bundled models GPTQ + Norm Tweaking was slightly worse than GPTQ
in 3 of 6 cells with the per-block guard alone), so "do nothing" is a candidate at the level the result is judged
on: the model's output, scored as perplexity scores it (the next-token loss on real text) where there is real
text, since a lower KL to the float model on generated text did not always mean a lower perplexity (GPTQ +
Norm Tweaking W2 on tiny-llama: KL lower, perplexity 0.1 higher, docs/results_blockwise.md). ``guard: block`` is
the per-block choice alone, ``guard: none`` the paper.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn
from torch.fx import GraphModule, Node

from qpass.analyses import STRUCTURE
from qpass.blockwise import TRAIN_DOCS, BlockMethod, BlockState, BlockwiseConfig, split_holdout, summarize, train_blocks
from qpass.calibration import CalibrationSet, logits_of, run_graph
from qpass.errors import CalibrationError, RecipeError
from qpass.folding import Producer, producer_at
from qpass.graph import is_quantizer, param_of
from qpass.pass_infra import Context, Pass, PassResult
from qpass.plan import Plan
from qpass.quantizer import Quantizer

from .signround import trainable_weight_sites

NORM_KINDS = ("rmsnorm", "layer_norm", "channel_scale")
GUARDS = ("model", "block", "none")

log = logging.getLogger("qpass.norm_tweak")


@dataclass(frozen=True)
class NormTweakConfig(BlockwiseConfig):
    name: ClassVar[str] = "norm_tweak"
    field_docs: ClassVar[dict] = {**TRAIN_DOCS,
                                  "data": "`generated`: text the float model writes itself (LLM-QAT's generator); "
                                          "`calibration`: the calibration set",
                                  "samples": "generated sequences (data: generated)",
                                  "seq_len": "tokens per generated sequence",
                                  "loss": "`distribution`: the paper's per-channel mean/std distance; `mse`",
                                  "guard": "`model`: as `block`, then the tuned norms are kept only if the whole "
                                           "quantized model scores better with them than with the norms it started "
                                           "from: next-token loss on the calibration text where there is one (the "
                                           "windows the tuning did not train on), else KL(FP||Q) on the held-out "
                                           "generated sequences; `block`: each block keeps its start when its loss "
                                           "on the held-out sequences is not lower; `none`: every block keeps its "
                                           "best step (the paper)"}

    steps: int = 50
    lr: float = 1e-3
    batch_size: int = 4
    optimizer: Literal["signsgd", "adam", "adamw"] = "adam"
    feed: Literal["quantized", "float"] = "quantized"
    data: Literal["generated", "calibration"] = "generated"
    samples: int = 32
    seq_len: int = 128
    loss: Literal["distribution", "mse"] = "distribution"
    guard: Literal["model", "block", "none"] = "model"

    def __post_init__(self):
        super().__post_init__()
        if self.guard not in GUARDS:
            raise RecipeError("guard", f"must be model (the whole model's score on held-out data decides), block "
                                       f"(each block's held-out loss) or none (the paper: keep the tuning), got "
                                       f"{self.guard!r}")
        if not 1 <= self.samples <= 100_000:
            raise RecipeError("samples", f"must be a number of sequences >= 1, got {self.samples}")
        if not 8 <= self.seq_len <= 1 << 16:
            raise RecipeError("seq_len", f"must be in [8, 65536], got {self.seq_len}")


def distribution_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over channels of |mean_q - mean_f| + |std_q - std_f| over the tokens of each output."""
    total = 0.0
    for s, t in zip(student, teacher):
        s, t = s.float().reshape(-1, s.shape[-1]), t.float().reshape(-1, t.shape[-1])
        total = total + ((s.mean(0) - t.mean(0)).abs() + (s.std(0) - t.std(0)).abs()).mean()
    return total


class _Norms(BlockState):
    def __init__(self, gm: GraphModule, attrs: list[Node], lr: float, loss: str):
        self.attrs = attrs
        self.values = [param_of(gm, a).detach().clone().float().requires_grad_(True) for a in attrs]
        self.groups = [{"params": self.values, "lr": lr}]
        self._dtypes = [param_of(gm, a).dtype for a in attrs]
        self._loss = loss

    def overrides(self) -> dict[Node, torch.Tensor]:
        return {a: v.to(d) for a, v, d in zip(self.attrs, self.values, self._dtypes)}

    def loss(self, student, teacher) -> torch.Tensor:
        return distribution_loss(student, teacher) if self._loss == "distribution" else super().loss(student, teacher)

    @torch.no_grad()
    def bake(self, gm: GraphModule) -> dict:
        out = {}
        for a, v in zip(self.attrs, self.values):
            p = param_of(gm, a)
            out[str(a.target)] = float((v.to(p.dtype) - p).abs().max())
            p.copy_(v.to(p.dtype))
        return {"max_change": out}


@dataclass
class _Tweak(BlockMethod):
    norms: list[Node]
    lr: float
    loss: str

    def setup(self, gm: GraphModule, step, nodes: list[Node]) -> BlockState | None:
        used = {a for n in nodes for a in n.all_input_nodes}
        mine = [a for a in self.norms if a in used]
        return _Norms(gm, mine, self.lr, self.loss) if mine else None


@dataclass(frozen=True)
class NormTweak(Pass):
    """Tune only the norm weights of each block so the quantized block's outputs match the float block's."""

    config: NormTweakConfig = NormTweakConfig()
    name: ClassVar[str] = "norm_tweak"
    needs_calibration: ClassVar[bool] = False
    preserves: ClassVar = STRUCTURE

    def streaming_refusal(self) -> str | None:
        return "norm_tweak distils from the float model (and generates its data with it), which must be in memory"

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        cfg = self.config
        todo, near = trainable_weight_sites(gm, ctx, cfg, self.name, clip=False)
        norms: list[Node] = []
        for s in todo:
            p = _norm_before(gm, s.input)
            if p is not None and _block_of(p.path) == _block_of(s.path):
                norms += [n for n, _ in p.params if n not in norms]
        if not norms:
            near.append("no norm of a block with quantized linears found")
            return PassResult(modified=False, stats={"blocks": 0, "norm_params": 0}, near_misses=near)
        teacher = ctx.teacher
        if not isinstance(teacher, nn.Module):
            raise CalibrationError("norm_tweak distils from the float model and none is available",
                                   fix="run it through qpass.apply(model, recipe) (the model is the teacher)")
        lookup = _teacher_params(teacher)
        calib = self._data(teacher, ctx)
        start = [param_of(gm, n).detach().clone() for n in norms]
        results = train_blocks(gm, ctx, _Tweak(norms, cfg.lr, cfg.loss), cfg, who=self.name,
                               teacher=lambda target: lookup(target), calib=calib, block_guard=cfg.guard != "none")
        stats = {"norm_params": len(norms), **summarize(results)}
        decisions = {"norms": [str(n.target) for n in norms], "blocks": {r.block: r.kept for r in results},
                     "data": cfg.data, "guard": cfg.guard}
        if cfg.guard == "model":
            text = ctx.calib.samples if ctx.calib is not None and len(ctx.calib.samples) else None
            if text is not None and calib is None:          # data: calibration: the windows it did not train on
                _, held = split_holdout(len(text), cfg)
                text = [text[i] for i in held] or None
            samples = (calib if calib is not None else ctx.require_calibration(self.name)).samples
            stats["guard"] = model_guard(gm, teacher, norms, start, samples, cfg, text=text)
            decisions["kept"] = stats["guard"]["kept"]
        plan = Plan(self.name, decisions=decisions)
        return PassResult(modified=True, stats=stats, near_misses=near, plan=plan)

    def _data(self, teacher: nn.Module, ctx: Context) -> CalibrationSet | None:
        cfg = self.config
        if cfg.data == "calibration":
            ctx.require_calibration(self.name)
            return None
        from qpass.qat.datagen import GenerationSettings, generate_data

        if not hasattr(teacher, "config"):
            raise CalibrationError("norm_tweak data: generated needs a Hugging Face causal LM to write the text",
                                   fix="set data: calibration and give calib_data")
        ids = generate_data(teacher, GenerationSettings(samples=cfg.samples, seq_len=cfg.seq_len, seed=cfg.seed,
                                                        batch_size=min(32, cfg.samples)),
                            progress=ctx.progress)
        return CalibrationSet([ids[i:i + 1] for i in range(ids.shape[0])])


@torch.no_grad()
def model_guard(gm: GraphModule, teacher: nn.Module, norms: list[Node], start: list[torch.Tensor],
                samples: list[tuple], cfg: NormTweakConfig, text: list[tuple] | None = None) -> dict:
    """Keep the tuned norm weights only if the quantized model scores better with them than with the `start`
    values; else write the start back. The score: with `text` (real calibration windows the tuning did not train
    on), the next-token loss on them (what perplexity measures); without, KL(FP || Q) per token against the float
    model on the held-out `samples` (the engine's split; every sample when there is none), the generated
    sequences. Returns {"kept": "tuned" | "start", "metric": "nll" | "kl", "tuned", "start", "samples",
    "selected_on"}."""
    if text:
        xs, metric, where = text, "nll", "calibration text"

        def score() -> float:
            return _nll(xs, [run_graph(gm, x) for x in xs])
    else:
        _, held = split_holdout(len(samples), cfg)
        xs, metric = [samples[i] for i in (held or range(len(samples)))], "kl"
        where = "held-out" if held else "all samples"
        ref = [torch.log_softmax(logits_of(teacher(*x)).float(), -1) for x in xs]

        def score() -> float:
            return _kl(ref, [run_graph(gm, x) for x in xs])
    params = [param_of(gm, n) for n in norms]
    tuned = [p.detach().clone() for p in params]
    s_tuned = score()
    for p, v in zip(params, start):
        p.copy_(v)
    s_start = score()
    kept = "tuned" if s_tuned < s_start else "start"
    if kept == "tuned":
        for p, v in zip(params, tuned):
            p.copy_(v)
    log.info("norm_tweak guard: %s on %d sequences (%s): tuned %.6g, start %.6g: kept the %s norms", metric,
             len(xs), where, s_tuned, s_start, kept)
    return {"kept": kept, "metric": metric, "tuned": s_tuned, "start": s_start, "samples": len(xs),
            "selected_on": where}


def _nll(xs: list[tuple], outputs: list[torch.Tensor]) -> float:
    """Mean next-token negative log-likelihood of the windows' own tokens (x[0]: input_ids [1, T])."""
    total, n = 0.0, 0
    for x, out in zip(xs, outputs):
        logp = torch.log_softmax(logits_of(out).float()[:, :-1], -1)
        tgt = x[0][:, 1:]
        total, n = total - float(logp.gather(-1, tgt.unsqueeze(-1)).sum()), n + tgt.numel()
    return total / max(n, 1)


def _kl(ref_logp: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """Mean over positions of KL(P || Q), P = exp(ref_logp), Q = softmax(output)."""
    total, n = 0.0, 0
    for p, q in zip(ref_logp, outputs):
        kl = (p.exp() * (p - torch.log_softmax(logits_of(q).float(), -1))).sum(-1)
        total, n = total + float(kl.sum()), n + kl.numel()
    return total / max(n, 1)


def _norm_before(gm: GraphModule, n: Node, depth: int = 6) -> Producer | None:
    """The norm that produces a linear's input `n`, through its input quantizer, casts and layout ops."""
    for _ in range(depth):
        if is_quantizer(n):
            n = Quantizer(n).x
            continue
        p = producer_at(gm, n)
        if isinstance(p, Producer):
            return p if p.kind in NORM_KINDS else None
        ins = [a for a in n.all_input_nodes if a.op == "call_function"] if n.op == "call_function" else []
        if len(ins) != 1:
            return None
        n = ins[0]
    return None


def _block_of(path: str) -> str:
    """The `<prefix>.<int>` head of a module path (the block), or the path."""
    parts = path.split(".")
    for k in range(len(parts) - 1, 0, -1):
        if parts[k].isdigit():
            return ".".join(parts[:k + 1])
    return path


def _teacher_params(teacher: nn.Module):
    """get_attr target -> the teacher's tensor of that name (the graph's names may carry a prefix)."""
    table = {**dict(teacher.named_buffers()), **dict(teacher.named_parameters())}

    def lookup(target: str):
        parts = str(target).split(".")
        for k in range(len(parts)):
            t = table.get(".".join(parts[k:]))
            if t is not None:
                return t.detach()
        return None

    return lookup


__all__ = ["NormTweak", "NormTweakConfig", "distribution_loss", "model_guard"]
