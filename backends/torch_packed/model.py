"""``PackedModel``: the lowered graph plus what it needs to generate, save and load.

Saved directories are artefacts of format 3 (``qpass.artifacts``: no pickle, sealed, deterministic):

    model.safetensors   packed codes (canonical layout, whatever layout this machine's kernels use), scales,
                        zero points and the float tensors the recipe left alone
    recipe.yaml         the recipe;  config.json: the Hugging Face config (HF models only)
    qpass.json          format, versions, source facts, backend "torch", the kernel policy ("kernels"), the
                        linears (format, shape, input quantizer), the size and SHA-256 of the files above and
                        a seal over format, backend, kernel policy, source and files; with a policy that fixes
                        the kernels ('reference', a kernel name, {bucket: kernel}) also the plan it gave here
    kernels.json        only with a measured policy ('auto', 'exact'): the plan measured on the saving machine,
                        that machine (``machine()``) and the timings. Outside the digests and the seal.

``load`` checks the digests and the seal first (``qpass.artifacts.read``): an edited recipe, a damaged file or
an edited qpass.json is an ArtifactError naming the file. It then captures the architecture again, applies the
saved plans (``qpass.plan``: structure only, no pass runs), lowers it with empty packed buffers of the right
shapes and loads the tensors: nothing is re-quantized.

Kernels. Which kernel runs a linear is a property of the machine, not of the model: the same weights and
recipe give the same files everywhere, and loading decides the kernels for the loading machine. A fixed
policy is resolved again (a kernel that does not apply there, such as q4avx2 without a C compiler, falls back
to dequant; the plan in qpass.json is what it gave on the saving machine, for reading). A measured plan is
reused only when kernels.json's machine (CPU model, ISA, threads, torch and qpass versions, native kernels
built) and policy equal the loading ones; otherwise the kernels are measured again. NOTE: measurements are
noisy, so a measured plan is not reproducible even on one machine; keeping it out of the sealed files keeps
two lowerings of the same model byte-identical where it matters (everything loading reads), and deleting
kernels.json only makes loading measure again.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import platform
import warnings
from collections.abc import Mapping

import safetensors.torch  # noqa: F401  NOTE: save_module writes through it; tests patch it as tp.model.safetensors
import torch
from torch import nn
from torch.fx import GraphModule

from qpass import artifacts
from qpass.plan import Plan, apply_plans
from qpass.artifacts import (
    META,
    SINGLE,
    TENSOR_METADATA,
    atomic_directory,
    float_dtype,
    load_tensors,
    model_from_config,
    read_json,
    save_module,
    write_description,
)
from qpass.capture import capture_decode
from qpass.errors import ArtifactError
from qpass.graph import META_CAPTURE
from qpass.recipe import Recipe
from qpass.version import __version__

from . import hugepages, native
from .kernels import BUCKETS, KERNELS, TuneRecord, tune
from .kv import PackedKVCache
from .linear import PackedLinear
from .codebook import CodebookLinear
from .ext import ExtLinear
from .lower import lower_kv_cache, lower_linears, simplify
from .runtime import optimize_decode

log = logging.getLogger("qpass.backends.torch_packed")

BACKEND = "torch"
TUNING = "kernels.json"            # the measured kernel plan of the saving machine (not digested)
MEASURED = ("auto", "exact")       # the policies whose plan is measured (kernels.tune)
_RETUNE = f"delete {TUNING}: loading then measures the kernels on this machine"


def machine() -> dict:
    """What a kernel plan depends on: the same dict means the same plan is still the right one (qpass's
    version too: its kernels change between versions)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"torch": torch.__version__, "isa": torch.backends.cpu.get_cpu_capability(), "cpu": cpu,
            "threads": torch.get_num_threads(), "native": native.available(), "qpass": __version__}


class PackedModel(nn.Module):
    """A lowered model: ``pm(input_ids).logits``, ``pm.generate(...)``, ``pm.save(dir)``."""

    def __init__(self, graph_module: GraphModule, recipe: Recipe, source: dict, *, kernels="auto",
                 records: list[TuneRecord] | None = None, plans: tuple[Plan, ...] = ()):
        super().__init__()
        self.graph_module = graph_module
        self.recipe, self.source, self.kernels = recipe, source, kernels
        self.plans = tuple(plans)      # the passes' plans (qpass.plan): the decode graph applies them
        self.records = records or []
        self._decoders: dict = {}

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        """Inference only (packed weights take no gradients): runs under ``torch.no_grad``."""
        if kwargs:
            if set(kwargs) - {"input_ids"}:
                raise TypeError(f"PackedModel takes input_ids only, got {sorted(kwargs)}")
            args = (kwargs["input_ids"], *args)
        return self.graph_module(*args)

    # -------------------------------------------------------------------------------- inspection
    def linears(self) -> dict[str, PackedLinear]:
        return {n: m for n, m in self.graph_module.named_modules() if isinstance(m, PackedLinear)}

    def weight_bytes(self) -> dict[str, int]:
        """Bytes held for the weights of lowered linears (packed int and codebook ones) vs the same weights in
        fp32."""
        mods, books = list(self.linears().values()), list(self.codebooks().values())
        return {"packed": sum(m.weight_bytes() for m in mods + books),
                "fp32": sum(4 * m.wf.n * m.wf.k for m in mods) + sum(4 * m.n * m.k for m in books),
                "linears": len(mods) + len(books), "codebook_linears": len(books)}

    def kv_cache_bytes(self, max_cache_len: int, batch_size: int = 1) -> dict[str, int]:
        """Bytes of the decode graph's K/V caches: low-bit ones vs the float caches they replace."""
        gm = self.decode_graph(max_cache_len, batch_size)
        kv = [m for m in gm.modules() if isinstance(m, PackedKVCache)]
        floats = [b for n, b in gm.named_buffers() if "_cache_" in n]
        return {"packed": sum(m.nbytes() for m in kv), "fp32": sum(m.float_nbytes() for m in kv)
                + sum(b.numel() * b.element_size() for b in floats), "float_caches": len(floats),
                "packed_caches": len(kv)}

    def codebooks(self) -> dict[str, CodebookLinear]:
        """The learned-codebook linears (codebook.py): kernels planned as the PackedLinears' are."""
        return _codebooks(self.graph_module)

    def plan(self) -> dict[str, dict[int, str]]:
        return {n: dict(m.plan) for n, m in {**self.linears(), **self.codebooks()}.items()}

    # -------------------------------------------------------------------------------- generation
    def decode_graph(self, max_cache_len: int, batch_size: int = 1, *, template: GraphModule | None = None,
                     optimize: bool = True) -> GraphModule:
        """The lowered prefill/decode step with a static KV cache (stored low-bit when the recipe quantizes
        it): ``step(input_ids, cache_position) -> logits``. Packed weights and every other tensor are shared
        with the main graph; cached per (batch size, cache length).

        template: an unmodified ``qpass.capture_decode`` graph of the same architecture, cache length and
        batch size, copied instead of capturing again (for lowering many recipes of one model).
        optimize: run the decode runtime passes (runtime.py: attention over the written cache prefix, fused
        RMSNorm/RoPE, flat attribute access); False keeps the lowered graph as it is (for comparisons)."""
        key = (batch_size, max_cache_len, optimize)
        if key not in self._decoders:
            if self.source.get("hf_config") is None:
                raise ArtifactError(f"generation needs a Hugging Face causal LM; this is a {self.source.get('model_class')}")
            if template is not None:
                info = template.meta.get(META_CAPTURE, {})
                if (info.get("max_cache_len"), info.get("batch_size")) != (max_cache_len, batch_size):
                    raise ArtifactError(f"the template decode graph was captured for cache length "
                                        f"{info.get('max_cache_len')} and batch {info.get('batch_size')}, not "
                                        f"{max_cache_len} and {batch_size}", fix="capture one with those sizes")
                gm = _copy_template(template)
            else:
                model = model_from_config(self.source["hf_config"], float_dtype(self.graph_module))
                gm = capture_decode(model, max_cache_len=max_cache_len, batch_size=batch_size)
            apply_plans(gm, self.plans)
            _share_tensors(gm, self.graph_module)
            # NOTE: the generic modules (ExtLinear, CodebookLinear) are shared too: the decode graph's own quantizer
            # tensors are the plans' placeholders (the lowered main graph no longer holds them to share)
            generic = {n: m for n, m in self.graph_module.named_modules() if isinstance(m, ExtLinear)}
            lower_linears(gm, shared={**self.linears(), **generic})
            lower_kv_cache(gm)
            simplify(gm)
            if optimize:
                optimize_decode(gm)
            self._decoders[key] = gm
        return self._decoders[key]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, *, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, seed: int | None = None,
                 max_cache_len: int | None = None) -> torch.Tensor:
        """Greedy (or sampled) generation with an incremental KV cache; returns prompt + new tokens. Without
        `max_cache_len`, a decode graph already built for this batch size that is long enough is reused
        (attention reads only the written prefix, so a longer cache costs memory, not time); else one is
        built with the cache rounded up to a multiple of 64."""
        from qpass.generate import generate_cached

        if max_cache_len is None:
            ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
            need = ids.shape[1] + max_new_tokens
            fits = [n for (b, n, opt) in self._decoders if b == ids.shape[0] and opt and n >= need]
            max_cache_len = min(fits, default=None)
        return generate_cached(self.decode_graph, input_ids, max_new_tokens, do_sample=do_sample,
                               temperature=temperature, top_k=top_k, seed=seed, max_cache_len=max_cache_len)

    def _apply(self, fn, recurse=True):
        self._decoders.clear()        # decode graphs hold the tensors they were built with: rebuild after a move
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------------------------------ saving
    def save(self, directory: str | os.PathLike) -> None:
        """Write the lowered model to `directory` (created; an existing non-empty one is an error): an artefact
        of format 3, sealed and byte-identical for the same model (the module docstring says what is where).
        Nothing is left behind if writing fails."""
        policy = _policy_json(self.kernels)
        measured = policy in MEASURED
        plan = {n: {str(b): k for b, k in sorted(p.items())} for n, p in self.plan().items()}
        linears = {n: {"format": m.wf.describe(), "shape": [m.wf.n, m.wf.k],
                       "input": m.act.describe() if m.act else None} for n, m in self.linears().items()}
        with atomic_directory(directory) as tmp:
            save_module(self.graph_module, os.path.join(tmp, SINGLE), {**TENSOR_METADATA, "backend": BACKEND})
            write_description(tmp, self.recipe, self.source, None, plans=self.plans, extra={
                "backend": BACKEND, "kernels": policy, "linears": linears, **({} if measured else {"plan": plan})})
            if measured:
                with open(os.path.join(tmp, TUNING), "w") as f:
                    json.dump({"machine": machine(), "kernels": policy, "plan": plan,
                               "tuning": [r.to_dict() for r in self.records]}, f, indent=2)
                    f.write("\n")

    @classmethod
    def load(cls, directory: str | os.PathLike, model: nn.Module | None = None, *, kernels=None) -> "PackedModel":
        return load(directory, model, kernels=kernels)

    def extra_repr(self) -> str:
        b = self.weight_bytes()
        ratio = b["packed"] / b["fp32"] if b["fp32"] else 0.0
        return f"linears={b['linears']}, weight bytes {b['packed']} ({ratio:.3f}x fp32), kernels={self.kernels!r}"


def _share_tensors(dst: GraphModule, src: GraphModule) -> None:
    """Point dst's parameters/buffers at src's tensors of the same name (no copies). A tensor of another dtype
    (a float32 rotary buffer of a model cast to bf16 with ``.to``) gets src's values copied in instead; one
    of another shape means the graphs are not of the same model: ArtifactError."""
    state = src.state_dict(keep_vars=True)
    for store in ("_parameters", "_buffers"):
        for mod_name, mod in dst.named_modules():
            if isinstance(mod, (PackedLinear, PackedKVCache)):
                continue
            for k, t in list(getattr(mod, store).items()):
                name = f"{mod_name}.{k}" if mod_name else k
                other = state.get(name)
                if t is None or other is None:
                    continue
                if other.shape != t.shape:
                    raise ArtifactError(f"the decode graph's {name} is {tuple(t.shape)}, the lowered model's "
                                        f"{tuple(other.shape)}", fix="report this as a qpass bug")
                if other.dtype == t.dtype:
                    getattr(mod, store)[k] = other
                else:
                    with torch.no_grad():
                        t.copy_(other)


def _copy_template(gm: GraphModule) -> GraphModule:
    """Deep copy of a raw decode graph: parameters are shared (they are replaced or shared with the main
    graph anyway); cache buffers and constants are cloned, keeping tensors that alias one another aliased."""
    memo: dict[int, torch.Tensor] = {id(p): p for p in gm.parameters()}
    clones: dict[tuple, torch.Tensor] = {}
    tensors = [t for m in gm.modules() for t in vars(m).values() if isinstance(t, torch.Tensor)]
    tensors += [t for m in gm.modules() for t in m._buffers.values() if t is not None]
    for t in tensors:
        if id(t) not in memo:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            memo[id(t)] = clones.setdefault(key, t.detach().clone())
    return _deepcopy(gm, memo)


def _deepcopy(gm: GraphModule, memo: dict) -> GraphModule:
    with warnings.catch_warnings():     # torch's own pytree spec copy warns about its deprecated LeafSpec
        warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated", category=FutureWarning)
        return copy.deepcopy(gm, memo)


def lower(qm, *, kernels: str | Mapping = "auto", repeats: int = 5) -> PackedModel:
    """Lower a QuantizedModel to packed kernels.

    kernels: 'auto' (measure every applicable kernel per shape and M bucket on this machine, keep the
    fastest; the exact dequant fallback is always a candidate), 'exact' (only kernels with the fake-quant
    graph's math: dequant, int_mm), 'reference' (dequant everywhere, nothing measured), a kernel name, or
    {M bucket: kernel name} (buckets: 1, 8, 128). The QuantizedModel is not modified; tensors the recipe
    left in float (embeddings, norms, an ignored lm_head) are shared with it, not copied."""
    gm = _copy_graph(qm.graph_module)
    mods = lower_linears(gm)
    simplify(gm)
    mods = {**mods, **_codebooks(gm)}      # learned codebooks: their kernel (lutavx2 or the reference) measured too
    hugepages.place(gm)                    # large packed weights on 2 MB pages (hugepages.py), before measuring
    records = tune(list(mods.values()), kernels, repeats=repeats)
    return PackedModel(gm, qm.recipe, qm.source, kernels=kernels, records=records, plans=qm.plans)


def _codebooks(gm: GraphModule) -> dict[str, CodebookLinear]:
    return {n: m for n, m in gm.named_modules() if isinstance(m, CodebookLinear)}


def _copy_graph(gm: GraphModule) -> GraphModule:
    memo = {id(t): t for t in list(gm.parameters()) + list(gm.buffers())}
    return _deepcopy(gm, memo)


def load(directory: str | os.PathLike, model: nn.Module | None = None, *, kernels=None) -> PackedModel:
    """Load a directory written by ``PackedModel.save``, checked first (``qpass.artifacts.read``). Hugging Face
    models are rebuilt from config.json; other modules need `model` (an instance of the same architecture, any
    weights). `kernels` overrides the saved kernel policy; without it a measured plan in kernels.json is
    reused if it was measured on a machine like this one (``machine()``), else the kernels are measured again."""
    directory = os.fspath(directory)
    _refuse_format_1(directory)
    art = artifacts.read(directory)
    if art.meta.get("backend") != BACKEND:
        raise ArtifactError(f"{directory!r} holds a {art.meta.get('backend') or 'fake-quant'} model, not a lowered "
                            "torch one", fix="load it with qpass.load (fake-quant) and lower it again")
    source = art.source
    gm = artifacts.rebuild(art, model, loader="qpass.backends.torch_packed.load")
    del model
    mods = lower_linears(gm, empty=True)
    simplify(gm)
    load_tensors(gm, directory, art.weights)
    hugepages.place(gm)
    mods = {**mods, **_codebooks(gm)}
    policy = _policy(art.meta.get("kernels"), os.path.join(directory, META)) if kernels is None else _policy(kernels)
    saved = _measured_plan(directory, policy, mods) if kernels is None and policy in MEASURED else None
    if saved is not None:
        plans, records = saved
        for name, mod in mods.items():
            mod.plan = plans[name]
    else:
        records = tune(list(mods.values()), policy)
    for mod in mods.values():
        mod.plan = {b: mod.plan.get(b, "dequant") for b in BUCKETS}
    return PackedModel(gm, art.recipe, source, kernels=policy, records=records, plans=art.plans)


def _policy_json(policy: str | Mapping) -> str | dict:
    """A kernel policy as saved: a name, or {bucket: kernel} in bucket order (the same policy, the same bytes)."""
    return policy if isinstance(policy, str) else {str(b): k for b, k in sorted((int(b), k) for b, k in policy.items())}


def _policy(policy, where: str | None = None) -> str | dict:
    """A kernel policy with int buckets. A saved one (`where`: its qpass.json) must name kernels this qpass has;
    a given one is checked by ``tune`` (ValueError)."""
    named = isinstance(policy, str) and policy in (*MEASURED, "reference", *KERNELS)
    mapped = isinstance(policy, Mapping) and all(str(b).isdigit() and k in KERNELS for b, k in policy.items())
    if where is not None and not (named or mapped):
        raise ArtifactError(f"{where!r}: kernel policy {policy!r} names kernels this qpass ({__version__}) does "
                            f"not have (known: {sorted(KERNELS)})", fix="pass kernels='auto' (or another policy) "
                            "to load")
    return {int(b): k for b, k in policy.items()} if isinstance(policy, Mapping) else policy


def _measured_plan(directory: str, policy: str, mods: dict[str, PackedLinear]
                   ) -> tuple[dict[str, dict[int, str]], list[TuneRecord]] | None:
    """The plan in kernels.json, if it was measured under `policy` on a machine like this one; None if there
    is none or it is another machine's. A malformed one is an ArtifactError naming it."""
    path = os.path.join(directory, TUNING)
    if not os.path.isfile(path):
        log.info("%s has no %s: measuring the kernels on this machine", directory, TUNING)
        return None
    data = read_json(directory, TUNING, fix=_RETUNE)
    try:
        if set(mods) - set(data["plan"]):         # e.g. codebook linears, planned since qpass measures them
            log.info("%s has no plan for %s: measuring the kernels again", path, sorted(set(mods) - set(data["plan"]))[:3])
            return None
        if data["machine"] != machine() or data["kernels"] != policy:
            log.info("%s was measured on another machine or policy (%s, %s): measuring the kernels again", path,
                     data["machine"], data["kernels"])
            return None
        plans = {name: {int(b): k for b, k in data["plan"][name].items()} for name in mods}
        records = [TuneRecord(**{k: v for k, v in r.items() if k != "M"}, bucket=r["M"]) for r in data["tuning"]]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{path!r} is not a kernel plan of this model ({type(e).__name__}: {e})",
                            fix=_RETUNE) from None
    wrong = [f"{n}[{b}]: {k}" for n, p in plans.items() for b, k in p.items()
             if b not in BUCKETS or k not in KERNELS or not KERNELS[k].applies(mods[n])]
    if wrong or set(data["plan"]) != set(mods):
        raise ArtifactError(f"{path!r} is not a kernel plan of this model (kernels that do not apply here: "
                            f"{wrong[:3]}; linears {sorted(set(data['plan']) ^ set(mods))[:3]} differ)", fix=_RETUNE)
    return plans, records


def _refuse_format_1(directory: str) -> None:
    """A directory saved by a qpass before sealed artefacts: no digests, and this machine's kernel timings
    inside qpass.json."""
    if not os.path.isfile(os.path.join(directory, META)):
        return                                  # artifacts.read says what is missing
    meta = read_json(directory, META)
    if isinstance(meta, dict) and meta.get("format") == 1 and meta.get("backend") == BACKEND:
        version = meta.get("qpass_version")
        raise ArtifactError(f"{directory!r} holds a lowered torch model in artefact format 1 (qpass {version}), "
                            "which records no digests of its files; this qpass reads format "
                            f"{artifacts.ARTIFACT_FORMAT}", fix="lower the quantized model again and save it with "
                            f"this qpass (qpass.lower(qm, 'torch').save(dir)), or load it with qpass {version}")
