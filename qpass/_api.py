"""``qpass.apply(model, recipe, calib_data)`` -> QuantizedModel; ``QuantizedModel.save`` / ``qpass.load``;
``qpass.apply_from_disk(model_dir, recipe, out_dir, calib_data)`` for models that do not fit in memory.

What a saved directory holds, how it is sealed with digests and how it is loaded is in ``qpass.artifacts``.
"""
from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule

from . import artifacts
from .artifacts import (  # NOTE: backends/ import these aliases from here until they use qpass.artifacts (#14)
    _jsonable as _jsonable,
    _transformers_version as _transformers_version,
    atomic_directory as atomic_directory,
    example_inputs as _example_inputs,
    model_from_config as _model_from_config,
    source_dtype as _source_dtype,
)
from .artifacts import float_dtype as _float_dtype
from .calibration import CalibrationSet
from .capture import capture, capture_decode
from .errors import ArtifactError, RecipeError
from .graph import META_CAPTURE, META_PREFIX
from .pass_infra import Context, Pipeline, Report
from .plan import Plan, apply_plans
from .recipe import Recipe, as_recipe, make_passes


class QuantizedModel(nn.Module):
    """A quantized graph plus the recipe that made it and the plans its passes recorded (``qpass.plan``: what
    saving stores and loading applies). Called like the model: ``qm(input_ids).logits``."""

    def __init__(self, graph_module: GraphModule, recipe: Recipe, report: Report, source: dict, *,
                 plans: Sequence[Plan] | None = None):
        super().__init__()
        self.graph_module = graph_module
        self.recipe = recipe
        self.report = report
        self.plans: tuple[Plan, ...] = tuple(plans if plans is not None else report.plans)
        self.source = source   # {"hf_config": dict | None, "model_class": str, "example_inputs": [...]}

    def forward(self, *args, **kwargs):
        if kwargs:
            if set(kwargs) - {"input_ids"}:
                raise TypeError(f"QuantizedModel takes input_ids only, got {sorted(kwargs)}")
            args = (kwargs["input_ids"], *args)
        return self.graph_module(*args)

    def decode_graph(self, max_cache_len: int, batch_size: int = 1) -> GraphModule:
        """The same quantized model as a prefill/decode step with a static KV cache (Hugging Face models):
        ``step(input_ids, cache_position) -> logits``. Built by capturing the decode step, applying this
        model's plans to it (no pass runs) and loading this model's tensors; cached per (batch size, cache length)."""
        key = (batch_size, max_cache_len)
        cache = self.__dict__.setdefault("_decoders", {})
        if key not in cache:
            if self.source.get("hf_config") is None:
                raise ArtifactError(f"generation needs a Hugging Face causal LM; this is a {self.source.get('model_class')}")
            model = _model_from_config(self.source["hf_config"], _float_dtype(self.graph_module))
            gm = capture_decode(model, max_cache_len=max_cache_len, batch_size=batch_size)
            apply_plans(gm, self.plans)
            missing, unexpected = gm.load_state_dict(self.graph_module.state_dict(), strict=False)
            if unexpected or [k for k in missing if "_cache_" not in k and "cumulative_length" not in k]:
                raise ArtifactError(f"the decode graph does not match the quantized graph (missing {missing[:5]}, "
                                    f"unexpected {unexpected[:5]})", fix="report this as a qpass bug")
            cache[key] = gm
        return cache[key]

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, *, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, seed: int | None = None,
                 max_cache_len: int | None = None) -> torch.Tensor:
        """Greedy (or sampled) generation with an incremental KV cache; returns prompt + new tokens."""
        from .generate import generate_cached

        return generate_cached(self.decode_graph, input_ids, max_new_tokens, do_sample=do_sample,
                               temperature=temperature, top_k=top_k, seed=seed, max_cache_len=max_cache_len)

    def save(self, directory: str | os.PathLike) -> None:
        """Write the model to `directory` (created; an existing non-empty one is an error), sealed and in
        canonical bytes (``qpass.artifacts``). Nothing is left behind if writing fails."""
        artifacts.save(self, directory)


def apply(model: nn.Module, recipe: Recipe | Mapping | str | os.PathLike, calib_data: Iterable | None = None,
          *, example_inputs: tuple | None = None, progress: bool = True) -> QuantizedModel:
    """Capture `model` (a copy: the original is not modified) and run the recipe's passes over it.

    `recipe`: a Recipe, a dict, or a YAML path. `calib_data`: token-id tensors ([seq] or [batch, seq]) or
    dicts with 'input_ids' (tuples of tensors for non-HF modules); needed by passes that calibrate.
    """
    recipe = as_recipe(recipe)
    calib = CalibrationSet(calib_data) if calib_data is not None else None
    if isinstance(model, QuantizedModel):   # continue from a quantized model: run only the new passes
        gm, source = copy.deepcopy(model.graph_module), model.source
        report = run_recipe(gm, recipe, Context(calib, progress=progress))
        full = Recipe(model.recipe.passes + recipe.passes, verify=recipe.verify)
        return QuantizedModel(gm, full, Report(model.report.rows + report.rows, model.plans + tuple(report.plans)),
                              source)
    source = _source(model, example_inputs)
    gm = copy.deepcopy(model) if isinstance(model, GraphModule) else capture(copy.deepcopy(model), example_inputs)
    report = run_recipe(gm, recipe, Context(calib, progress=progress, teacher=model))
    return QuantizedModel(gm, recipe, report, source)


@dataclass(frozen=True)
class StreamResult:
    """What ``apply_from_disk`` did: the artefact directory (``qpass.load`` reads it), the report, and how
    many parameter bytes were in memory at most (``peak_bytes``, names in ``peak_names``) of ``param_bytes``."""

    directory: str
    report: Report
    peak_bytes: int
    param_bytes: int
    peak_names: tuple[str, ...] = ()


def apply_from_disk(model_dir: str | os.PathLike, recipe: Recipe | Mapping | str | os.PathLike,
                    out_dir: str | os.PathLike, calib_data: Iterable | None = None, *,
                    progress: bool = True) -> StreamResult:
    """Run the recipe on the Hugging Face model in `model_dir` (config.json + safetensors) without holding
    its weights: each pass loads the parameters it works on (one linear, or one block of a block-by-block
    sweep) and writes back what it changed; the result goes to `out_dir` shard by shard (created; nothing
    is left there if anything fails). Same numbers as ``qpass.apply(model, recipe, calib_data)`` with
    block-by-block calibration; passes that need the whole model at once (qat, ``sequential: false``) are
    refused before anything runs."""
    from .streaming import Checkpoint, write_shards
    from .block_sweep import segment_attrs

    recipe = as_recipe(recipe)
    passes = _streaming_passes(recipe)
    calib = CalibrationSet(calib_data) if calib_data is not None else None
    ckpt, cfg = Checkpoint(model_dir), _read_config(os.fspath(model_dir))
    with atomic_directory(out_dir) as tmp:
        gm, store, source = _capture_from_disk(ckpt, cfg, os.path.join(tmp, ".scratch"))
        report = Pipeline(passes).run(gm, Context(calib, progress=progress, store=store))
        write_shards(gm, store, tmp, segment_attrs(gm), artifacts.TENSOR_METADATA)
        shutil.rmtree(store.scratch)
        artifacts.write_description(tmp, recipe, source, report, plans=report.plans)
    return StreamResult(os.fspath(out_dir), report, store.stats.peak_bytes, store.nbytes,
                        tuple(store.stats.peak_names))


def _streaming_passes(recipe: Recipe) -> list:
    """The recipe's passes, or a RecipeError naming the first that needs the whole model in memory."""
    passes = make_passes(recipe)
    for i, p in enumerate(passes):
        why = p.streaming_refusal()
        if why:
            raise RecipeError(f"passes[{i}].{p.name}", f"{why}\n  fix: run this recipe with qpass.apply(model, "
                              "recipe) on a model loaded in memory")
    if recipe.verify:
        raise RecipeError("verify", "verify runs the whole model after every pass, which needs every weight in "
                          "memory\n  fix: set verify: false, or use qpass.apply in memory")
    return passes


def _capture_from_disk(ckpt, cfg: dict, scratch: str):
    """(graph, its WeightStore, source) for the model of `cfg` whose weights are in `ckpt`: built with meta
    parameters, captured through fake ones, every parameter then an OnDisk stand-in."""
    from .streaming import WeightStore, checkpoint_sources, fake_parameters, skeleton_parameters

    with skeleton_parameters():
        model = _model_from_config(cfg)
    names = ckpt.names_for(model)
    ckpt.load_buffers(model, names)
    gm = capture(fake_parameters(model))
    store = WeightStore(gm, checkpoint_sources(gm, ckpt, names, gm.meta.get(META_PREFIX, "")), scratch)
    return gm, store, {"hf_config": cfg, "model_class": type(model).__name__, "example_inputs": None}


def _read_config(model_dir: str) -> dict:
    import transformers

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ArtifactError(f"{model_dir!r} has no config.json", fix="pass a Hugging Face model directory "
                            "written by save_pretrained (config.json + safetensors)")
    return transformers.AutoConfig.from_pretrained(model_dir).to_dict()


def run_recipe(gm: GraphModule, recipe: Recipe, ctx: Context) -> Report:
    return Pipeline(make_passes(recipe), verify=recipe.verify).run(gm, ctx)


def _source(model: nn.Module, example_inputs) -> dict:
    if isinstance(model, GraphModule):
        info = model.meta.get(META_CAPTURE, {})
        return {"hf_config": None, "model_class": info.get("model_class", "GraphModule"),
                "example_inputs": _shapes(example_inputs)}
    cfg = getattr(model, "config", None)
    dtype = _float_dtype(model)
    return {"hf_config": cfg.to_dict() if hasattr(cfg, "to_dict") else None,
            "model_class": type(model).__name__, "example_inputs": _shapes(example_inputs),
            "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None}


def _shapes(example_inputs) -> list | None:
    if example_inputs is None:
        return None
    xs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    return [{"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")} for x in xs]
