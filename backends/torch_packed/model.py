"""``PackedModel``: the lowered graph plus what it needs to generate, save and load.

Saved directories (no pickle): ``model.safetensors`` (packed codes, scales, zero points and the float
tensors the recipe left alone), ``recipe.yaml``, ``qpass.json`` (versions, backend, kernel policy and the
kernel plan measured on the machine that saved it), ``config.json`` for Hugging Face models. Loading
captures the architecture again, replays the recipe in restoring mode (structure only), lowers it in
restoring mode (empty packed buffers of the right shapes) and loads the tensors: nothing is re-quantized.
The kernel plan is reused when the loading machine matches the saving one, and measured again otherwise.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import warnings
from collections.abc import Mapping

import safetensors.torch
import torch
from torch import nn
from torch.fx import GraphModule

from qpass._api import (
    _example_inputs,
    _float_dtype,
    _jsonable,
    _model_from_config,
    _source_dtype,
    _transformers_version,
    atomic_directory,
    run_recipe,
)
from qpass.capture import capture, capture_decode
from qpass.errors import ArtifactError
from qpass.graph import META_CAPTURE
from qpass.pass_infra import Context
from qpass.recipe import Recipe
from qpass.version import __version__

from . import native
from .kernels import BUCKETS, TuneRecord, tune
from .kv import PackedKVCache
from .linear import PackedLinear
from .lower import lower_kv_cache, lower_linears, simplify
from .runtime import optimize_decode

BACKEND = "torch"
ARTIFACT_FORMAT = 1
_FILES = ("model.safetensors", "recipe.yaml", "qpass.json")


def machine() -> dict:
    """What a kernel plan depends on: the same dict means the same plan is still the right one."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"torch": torch.__version__, "isa": torch.backends.cpu.get_cpu_capability(), "cpu": cpu,
            "threads": torch.get_num_threads(), "native": native.available()}


class PackedModel(nn.Module):
    """A lowered model: ``pm(input_ids).logits``, ``pm.generate(...)``, ``pm.save(dir)``."""

    def __init__(self, graph_module: GraphModule, recipe: Recipe, source: dict, *, kernels="auto",
                 records: list[TuneRecord] | None = None):
        super().__init__()
        self.graph_module = graph_module
        self.recipe, self.source, self.kernels = recipe, source, kernels
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
        """Bytes held for the weights of lowered linears vs the same weights in fp32."""
        mods = self.linears().values()
        return {"packed": sum(m.weight_bytes() for m in mods), "fp32": sum(4 * m.wf.n * m.wf.k for m in mods),
                "linears": len(mods)}

    def kv_cache_bytes(self, max_cache_len: int, batch_size: int = 1) -> dict[str, int]:
        """Bytes of the decode graph's K/V caches: low-bit ones vs the float caches they replace."""
        gm = self.decode_graph(max_cache_len, batch_size)
        kv = [m for m in gm.modules() if isinstance(m, PackedKVCache)]
        floats = [b for n, b in gm.named_buffers() if "_cache_" in n]
        return {"packed": sum(m.nbytes() for m in kv), "fp32": sum(m.float_nbytes() for m in kv)
                + sum(b.numel() * b.element_size() for b in floats), "float_caches": len(floats),
                "packed_caches": len(kv)}

    def plan(self) -> dict[str, dict[int, str]]:
        return {n: dict(m.plan) for n, m in self.linears().items()}

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
                model = _model_from_config(self.source["hf_config"], _float_dtype(self.graph_module))
                gm = capture_decode(model, max_cache_len=max_cache_len, batch_size=batch_size)
            run_recipe(gm, self.recipe, Context(None, restoring=True, progress=False))
            _share_tensors(gm, self.graph_module)
            lower_linears(gm, shared=self.linears())
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
        """Write the lowered model to `directory` (created; an existing non-empty one is an error). Nothing
        is left behind if writing fails."""
        with atomic_directory(directory) as tmp:
            safetensors.torch.save_model(self.graph_module, os.path.join(tmp, "model.safetensors"),
                                         metadata={"format": "qpass", "backend": BACKEND, "qpass_version": __version__})
            with open(os.path.join(tmp, "recipe.yaml"), "w") as f:
                f.write(self.recipe.to_yaml())
            meta = {"format": ARTIFACT_FORMAT, "backend": BACKEND, "qpass_version": __version__,
                    "torch_version": torch.__version__, **_transformers_version(), "source": self.source,
                    "kernels": self.kernels if isinstance(self.kernels, str) else
                    {str(k): v for k, v in self.kernels.items()},
                    "machine": machine(), "plan": {n: {str(b): k for b, k in p.items()} for n, p in self.plan().items()},
                    "linears": {n: {"format": m.wf.describe(), "layout": m.wf.layout, "shape": [m.wf.n, m.wf.k],
                                    "input": m.act.describe() if m.act else None} for n, m in self.linears().items()},
                    "tuning": [r.to_dict() for r in self.records]}
            with open(os.path.join(tmp, "qpass.json"), "w") as f:
                json.dump(_jsonable(meta), f, indent=2)
            if self.source.get("hf_config") is not None:
                with open(os.path.join(tmp, "config.json"), "w") as f:
                    json.dump(self.source["hf_config"], f, indent=2)

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
    records = tune(list(mods.values()), kernels, repeats=repeats)
    return PackedModel(gm, qm.recipe, qm.source, kernels=kernels, records=records)


def _copy_graph(gm: GraphModule) -> GraphModule:
    memo = {id(t): t for t in list(gm.parameters()) + list(gm.buffers())}
    return _deepcopy(gm, memo)


def load(directory: str | os.PathLike, model: nn.Module | None = None, *, kernels=None) -> PackedModel:
    """Load a directory written by ``PackedModel.save``. Hugging Face models are rebuilt from config.json;
    other modules need `model` (an instance of the same architecture, any weights). `kernels` overrides
    the saved kernel policy."""
    directory = os.fspath(directory)
    missing = [f for f in _FILES if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        raise ArtifactError(f"{directory!r} is not a qpass model directory (missing {missing})",
                            fix="pass a directory written by PackedModel.save")
    with open(os.path.join(directory, "qpass.json")) as f:
        meta = json.load(f)
    if meta.get("backend") != BACKEND:
        raise ArtifactError(f"{directory!r} holds a {meta.get('backend') or 'fake-quant'} model, not a lowered "
                            "torch one", fix="load it with qpass.load (fake-quant) and lower it again")
    if meta.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{directory!r} has artefact format {meta.get('format')}, this qpass reads "
                            f"{ARTIFACT_FORMAT}", fix="load it with the qpass version that wrote it")
    recipe = Recipe.from_yaml(os.path.join(directory, "recipe.yaml"))
    source = meta["source"]
    if model is None:
        if source.get("hf_config") is None:
            raise ArtifactError(f"{directory!r} holds a {source.get('model_class')} that is not a Hugging Face "
                                "model", fix="pass model=<an instance of that class> to load")
        model = _model_from_config(source["hf_config"], _source_dtype(source))
    gm = capture(model, _example_inputs(source, model))
    del model
    run_recipe(gm, recipe, Context(None, restoring=True, progress=False))
    mods = lower_linears(gm, restoring=True)
    simplify(gm)
    path = os.path.join(directory, "model.safetensors")
    miss, unexpected = safetensors.torch.load_model(gm, path, strict=False)
    if miss or unexpected:
        raise ArtifactError(f"{path!r} does not match the rebuilt graph (missing {sorted(miss)[:5]}, "
                            f"unexpected {sorted(unexpected)[:5]})",
                            fix="load with the same model class/config and qpass version that saved it")
    policy = kernels if kernels is not None else meta.get("kernels", "auto")
    policy = {int(k): v for k, v in policy.items()} if isinstance(policy, dict) else policy
    saved = meta.get("plan", {})
    if kernels is None and meta.get("machine") == machine() and set(saved) == set(mods):
        for name, mod in mods.items():
            mod.plan = {int(b): k for b, k in saved[name].items()}
        records = [TuneRecord(**{k: v for k, v in r.items() if k not in ("M",)}, bucket=r["M"])
                   for r in meta.get("tuning", [])]
    else:
        records = tune(list(mods.values()), policy)
    for mod in mods.values():
        mod.plan = {b: mod.plan.get(b, "dequant") for b in BUCKETS}
    return PackedModel(gm, recipe, source, kernels=policy, records=records)
