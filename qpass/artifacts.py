"""Saved model directories (artefacts): what ``QuantizedModel.save`` and ``qpass.apply_from_disk`` write and
``qpass.load`` reads.

    qm.save("out/m")                 # or qpass.apply_from_disk(hf_dir, recipe, "out/m", calib_data=...)
    qm2 = qpass.load("out/m")        # the same graph, bit for bit; qpass.artifacts.read("out/m") only checks

A directory (format 3) holds no pickle and no serialized graph:

    recipe.yaml                       the recipe (``Recipe.to_yaml``): what was asked, for people and tools
    plans.json                        what each pass decided (``qpass.plan``): what loading applies
    config.json                       the Hugging Face config the model is rebuilt from (HF models only)
    model.safetensors                 every parameter and buffer of the quantized graph; apply_from_disk writes
      or model-0000i-of-0000n.safetensors + model.safetensors.index.json    shards and their index instead
    qpass.json                        format, versions, source facts (class, dtype, example input shapes), the
                                      report without timings, and the size and SHA-256 of every file above

Sealed. ``qpass.json["files"]`` lists every file loading reads, with its size and SHA-256, and ``seal`` is the
SHA-256 of qpass.json's own load-relevant part (format, source, files; a lowered model's backend and kernel
policy too). ``read`` checks all of it before
anything is built: a recipe.yaml edited by hand (bits 8 -> 4), a truncated shard or a garbled qpass.json raise
an ``ArtifactError`` naming the file, never a raw parser error or silently different logits. This guards
against damage and edits, not against forgery: anyone can recompute the digests.

NOTE: full digests rather than size + header digest. A header digest would miss a changed or flipped tensor
value, which is exactly the silent damage this exists to catch, and loading reads every byte of every tensor
file anyway. SHA-256 ran at 0.8-1.3 GB/s per core on a busy 2-core build machine (SHA-NI), and the files are
hashed in parallel threads (hashlib releases the GIL): for a 14 GB fp16 7B model in shards that is seconds, next
to rebuilding, capturing and replaying the recipe on it. On the bundled tiny-llama (W8A8, 12.7 MB) the check takes 9-25 ms of a 1.5-3.7 s
``qpass.load``. Sizes are compared first, so a truncated file fails before anything is hashed.

Deterministic. The same graph gives the same bytes: safetensors orders tensors by dtype and name, and its
header is rewritten here in sorted key order (the library writes the metadata map in hash order, different on
every call); JSON is written in a fixed key order; timings are not saved (they stay in ``qm.report`` in
memory). So the same recipe, data and seed give identical directories, and the digests identify a result.

A model lowered to packed torch kernels (``PackedModel.save``, backends/torch_packed/model.py) is saved the same
way and with these helpers, plus its backend and kernel policy; its measured kernel plan is outside the seal.

Loading rebuilds the model from config.json (other modules are passed in as ``model=``), captures it the same
way, applies the saved plans (``qpass.plan.apply_plans``: the quantizers each pass inserted, with placeholder
tensors of the recorded shapes; no pass runs and no data is needed, so a searched alpha or any other
data-dependent decision loads as it was made) and loads the tensors, checking each one's name, shape and dtype
against the rebuilt graph.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn
from torch.fx import GraphModule

from . import staging
from .capture import capture, default_example_inputs
from .errors import ArtifactError, RecipeError
from .pass_infra import Report
from .plan import Plan, apply_plans, plans_from_json, plans_to_json
from .recipe import Recipe
from .version import __version__

if TYPE_CHECKING:
    from ._api import QuantizedModel

ARTIFACT_FORMAT = 3          # 2: files digested and sealed, HF config only in config.json; 3: plans.json
META, RECIPE, CONFIG, PLANS = "qpass.json", "recipe.yaml", "config.json", "plans.json"
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"   # one file, or shards and their index
TENSOR_METADATA = {"format": "qpass", "qpass_version": __version__}
# The part of qpass.json that loading depends on; a key a directory lacks is left out of the seal (backend and
# kernels, the kernel policy, are a lowered model's: backends/torch_packed/model.py)
SEALED = ("format", "backend", "kernels", "source", "files")
_AGAIN = "save the model again (qm.save or pm.save), or quantize it again"
# Keys config.json gets so that no other loader takes a qpass directory for a plain checkpoint of the float model
# (its tensors keep the float model's names beside *_weight_scale ones). transformers refuses a
# `transformers_weights` file that is not *.safetensors with a ValueError that quotes the value (the message the
# user sees); vLLM and others refuse the unknown quant_method. `read` drops them again.
NOT_A_CHECKPOINT = {
    "transformers_weights": "qpass artefact: load it with qpass.load(directory), or export it with `qpass export "
                            "--format compressed-tensors` for transformers and vLLM",
    "quantization_config": {"quant_method": "qpass", "load_with": "qpass.load(directory)",
                            "export_with": "qpass export DIR --format compressed-tensors --out OUT"},
}


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike, prefix: str = ".qpass-save-") -> Iterator[str]:
    """Yield a temporary directory beside `directory`; on success it becomes `directory` (which must not
    exist or be empty), on any failure it is removed: no partial output is ever left behind. The temporary
    directory is named after this process, so one left by a killed run is removed by the next (see
    qpass.staging); the result gets the permissions of a plain mkdir (the umask applies)."""
    directory = os.fspath(directory)
    if os.path.isdir(directory) and os.listdir(directory):
        raise ArtifactError(f"{directory!r} exists and is not empty", fix="choose a new directory")
    parent = os.path.dirname(os.path.abspath(directory))
    staging.clean_stale(parent)
    tmp = staging.make_dir(parent, prefix.removeprefix(staging.PREFIX).rstrip("-"))
    try:
        yield tmp
        staging.publish(tmp)
        if os.path.isdir(directory):
            os.rmdir(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------ writing


def save(qm: QuantizedModel, directory: str | os.PathLike) -> None:
    """``qm.save(directory)``: the single-file layout (created; an existing non-empty directory is an error).
    Nothing is left behind if writing fails."""
    with atomic_directory(directory) as tmp:
        save_module(qm.graph_module, os.path.join(tmp, SINGLE))
        write_description(tmp, qm.recipe, qm.source, qm.report, plans=qm.plans)


def save_module(module: nn.Module, path: str, metadata: dict[str, str] = TENSOR_METADATA) -> None:
    """Every parameter and buffer of `module` (shared tensors once, as ``safetensors.torch.save_model``
    does), in canonical bytes."""
    safetensors.torch.save_model(module, path, metadata=dict(metadata))   # NOTE: save_model adds to the dict
    _canonical_header(path)


def write_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] = TENSOR_METADATA):
    """``safetensors.torch.save_file`` in canonical bytes: the same tensors always give the same file."""
    safetensors.torch.save_file(tensors, path, metadata=dict(metadata))
    _canonical_header(path)


def _canonical_header(path: str) -> None:
    """Rewrite a safetensors header with sorted keys. The data order is already canonical (safetensors sorts
    tensors by dtype, then name); the header's metadata map is written in hash order."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        text = json.dumps(json.loads(f.read(n)), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)              # the data starts 8-byte aligned, as safetensors writes it
        if len(text) == n:
            f.seek(8)
            f.write(text)
            return
        data = f.read()
        f.seek(0)
        f.write(len(text).to_bytes(8, "little") + text + data)
        f.truncate()


def write_description(directory: str, recipe: Recipe, source: dict, report: Report | None,
                      extra: dict | None = None, *, plans: Sequence[Plan]) -> None:
    """recipe.yaml, plans.json, config.json (Hugging Face models) and qpass.json, which seals them and the
    tensor files already in `directory` (``model.safetensors``, or the index and every shard it names).
    `report`: None leaves it out. `extra`: more qpass.json entries, after source (a lowered model's backend,
    kernel policy and description); those named in SEALED are sealed."""
    with open(os.path.join(directory, RECIPE), "w") as f:
        f.write(recipe.to_yaml())
    with open(os.path.join(directory, PLANS), "w") as f:
        json.dump(plans_to_json(plans), f, indent=1, sort_keys=True)
        f.write("\n")
    files = [RECIPE, PLANS, *_written_weights(directory)]
    if source.get("hf_config") is not None:   # without the path it was read from: the same model, the same bytes
        config = {k: v for k, v in source["hf_config"].items() if k != "_name_or_path"} | NOT_A_CHECKPOINT
        with open(os.path.join(directory, CONFIG), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        files.append(CONFIG)
    extra = _jsonable(extra or {})
    sealed = _jsonable({"format": ARTIFACT_FORMAT, "source": {k: v for k, v in source.items() if k != "hf_config"},
                        "files": {name: file_digest(os.path.join(directory, name)) for name in sorted(files)},
                        **{k: v for k, v in extra.items() if k in SEALED}})
    meta = {"format": ARTIFACT_FORMAT, "qpass_version": __version__, "torch_version": torch.__version__,
            **_transformers_version(), "source": sealed["source"], **extra}
    if report is not None:
        meta["report"] = _jsonable([{k: v for k, v in row.items() if k != "seconds"} for row in report.to_dict()])
    meta.update(files=sealed["files"], seal=seal(sealed))
    with open(os.path.join(directory, META), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


def _written_weights(directory: str) -> list[str]:
    return [INDEX, *_shards(directory)] if os.path.isfile(os.path.join(directory, INDEX)) else [SINGLE]


def file_digest(path: str) -> dict:
    """{"bytes": size, "sha256": hex digest} of a file (read in chunks)."""
    with open(path, "rb") as f:
        return {"bytes": os.fstat(f.fileno()).st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def seal(meta: dict) -> str:
    """The SHA-256 of the SEALED entries of a qpass.json object (those it has)."""
    return hashlib.sha256(json.dumps({k: meta[k] for k in SEALED if k in meta}, sort_keys=True,
                                     separators=(",", ":")).encode()).hexdigest()


# ------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class Artifact:
    """A checked artefact directory: every digest matched. `source` is as ``QuantizedModel.source`` (the HF
    config read from config.json); `weights` are the tensor files, in loading order."""

    directory: str
    meta: dict
    recipe: Recipe
    source: dict
    weights: tuple[str, ...]
    plans: tuple[Plan, ...] = ()


def read(directory: str | os.PathLike) -> Artifact:
    """Check an artefact directory before anything is built: qpass.json parses, has this format and its seal
    matches, and every file it lists has the recorded size and SHA-256; then parse the recipe and config.
    Anything wrong raises ArtifactError naming the file and what to do."""
    directory = os.fspath(directory)
    meta = _read_meta(directory)
    _check_files(directory, meta["files"])
    recipe_path = os.path.join(directory, RECIPE)
    try:
        recipe = Recipe.from_yaml(recipe_path)
    except (RecipeError, ValueError) as e:     # digest matched: written by a qpass whose recipes this one refuses
        raise ArtifactError(f"{recipe_path!r} does not load with qpass {__version__} (saved by "
                            f"{meta.get('qpass_version')}): {e}",
                            fix=f"load it with qpass {meta.get('qpass_version')}, or quantize again") from e
    source = dict(meta["source"])
    source["hf_config"] = read_json(directory, CONFIG) if CONFIG in meta["files"] else None
    if source["hf_config"] is not None and not isinstance(source["hf_config"], dict):
        raise ArtifactError(f"{os.path.join(directory, CONFIG)!r} is not a JSON object", fix=_AGAIN)
    if source["hf_config"] is not None:
        source["hf_config"] = {k: v for k, v in source["hf_config"].items() if k not in NOT_A_CHECKPOINT}
    if PLANS not in meta["files"]:
        raise ArtifactError(f"{directory!r} lists no {PLANS} in {META}", fix=_AGAIN)
    plans = plans_from_json(read_json(directory, PLANS), os.path.join(directory, PLANS))
    return Artifact(directory, meta, recipe, source, _weights(directory, meta["files"]), tuple(plans))


def _read_meta(directory: str) -> dict:
    """qpass.json, checked: a JSON object of this format with the sealed keys, and its seal matches."""
    if not os.path.isfile(os.path.join(directory, META)):
        found = set(os.listdir(directory)) if os.path.isdir(directory) else set()
        missing = [f for f in (RECIPE, META) if f not in found] + ([] if {SINGLE, INDEX} & found else
                                                                   [f"{SINGLE} or {INDEX}"])
        raise ArtifactError(f"{directory!r} is not a qpass model directory (missing {missing})",
                            fix="pass a directory written by QuantizedModel.save or qpass.apply_from_disk")
    path = os.path.join(directory, META)
    meta = read_json(directory, META)
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt == 1:
        raise ArtifactError(f"{directory!r} has artefact format 1 (qpass {meta.get('qpass_version')}), which records "
                            f"no digests of its files; this qpass reads format {ARTIFACT_FORMAT}",
                            fix="quantize the model again and save it with this qpass, or load it with qpass "
                                f"{meta.get('qpass_version')}")
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path!r} is not a JSON object", fix=_AGAIN)
    if fmt != ARTIFACT_FORMAT:
        raise ArtifactError(f"{path!r} has artefact format {fmt!r} (qpass {meta.get('qpass_version')}); this qpass "
                            f"reads format {ARTIFACT_FORMAT}", fix=f"load it with the qpass version that wrote it, "
                            f"or {_AGAIN}")
    bad = [k for k, t in (("source", dict), ("files", dict), ("seal", str)) if not isinstance(meta.get(k), t)]
    bad += [f"files[{n!r}]" for n, d in (meta["files"] if "files" not in bad else {}).items()
            if not (isinstance(d, dict) and isinstance(d.get("bytes"), int) and isinstance(d.get("sha256"), str))]
    if bad:
        raise ArtifactError(f"{path!r} lacks or has malformed {bad}", fix=_AGAIN)
    if meta["seal"] != seal(meta):
        raise ArtifactError(f"{path!r} was edited after saving: its seal does not match its sealed entries "
                            f"{[k for k in SEALED if k in meta]}", fix=f"undo the edit, or {_AGAIN}")
    return meta


def _check_files(directory: str, files: dict) -> None:
    """Every listed file is there with its recorded size (all checked first: cheap), then its SHA-256."""
    fix = (f"copy the file again from where it was saved, or {_AGAIN}; to change the recipe, apply the new "
           "recipe to the model and save the result")
    paths = {name: os.path.join(directory, name) for name in files}
    for name, path in paths.items():
        if os.path.basename(name) != name or not os.path.isfile(path):
            raise ArtifactError(f"{path!r} is missing (qpass.json lists it)",
                                fix=f"copy the whole directory, or {_AGAIN}")
        size = os.path.getsize(path)
        if size != files[name]["bytes"]:
            raise ArtifactError(f"{path!r} was changed after saving: it is {size} bytes, saved as "
                                f"{files[name]['bytes']} (cut short, edited or replaced)", fix=fix)
    with ThreadPoolExecutor(max(1, min(8, len(paths), os.cpu_count() or 1))) as pool:
        digests = dict(zip(paths, pool.map(lambda p: file_digest(p)["sha256"], paths.values())))
    for name, path in paths.items():
        if digests[name] != files[name]["sha256"]:
            raise ArtifactError(f"{path!r} was changed after saving: its SHA-256 does not match qpass.json, so it "
                                "would load as a different model than the one saved", fix=fix)


def read_json(directory: str, name: str, fix: str = _AGAIN) -> Any:
    """The JSON value in file `name` of `directory`; an unreadable or undecodable file is an ArtifactError
    naming it, with `fix`."""
    path = os.path.join(directory, name)
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (ValueError, OSError) as e:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ArtifactError(f"{path!r} is not readable JSON ({type(e).__name__}: {e})", fix=fix) from None


def _weights(directory: str, files: dict) -> tuple[str, ...]:
    """The tensor files of a checked artefact: model.safetensors, or the shards its (checked) index names."""
    if INDEX not in files:
        if SINGLE not in files:
            raise ArtifactError(f"{os.path.join(directory, META)!r} lists neither {SINGLE} nor {INDEX}", fix=_AGAIN)
        return (SINGLE,)
    shards = _shards(directory)
    unlisted = [s for s in shards if s not in files]
    if unlisted:
        raise ArtifactError(f"{os.path.join(directory, INDEX)!r} names shards that qpass.json does not list: "
                            f"{unlisted[:3]}", fix=_AGAIN)
    return shards


def _shards(directory: str) -> tuple[str, ...]:
    """The shard files model.safetensors.index.json names, sorted."""
    index = read_json(directory, INDEX)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ArtifactError(f"{os.path.join(directory, INDEX)!r} has no weight_map of tensor name -> shard file",
                            fix=_AGAIN)
    return tuple(sorted(set(weight_map.values())))


# ------------------------------------------------------------------------------ loading


def load(directory: str | os.PathLike, model: nn.Module | None = None) -> QuantizedModel:
    """``qpass.load``: a directory written by ``QuantizedModel.save`` or ``qpass.apply_from_disk``, checked
    first (``read``). Hugging Face models are rebuilt from config.json; other modules need `model` (an
    instance of the same architecture, any weights)."""
    from ._api import QuantizedModel   # NOTE: _api imports this module

    art = read(directory)
    if art.meta.get("backend") is not None:
        raise ArtifactError(f"{art.directory!r} holds a model lowered to the {art.meta['backend']} backend, not a "
                            "fake-quant one", fix="load a torch one with qpass.backends.torch_packed.load")
    gm = rebuild(art, model, loader="qpass.load")
    load_tensors(gm, art.directory, art.weights)
    return QuantizedModel(gm, art.recipe, Report(), art.source, plans=art.plans)


def rebuild(art: "Artifact", model: nn.Module | None = None, *, loader: str) -> GraphModule:
    """The graph a checked artefact was saved from, without its tensors: `model` (or, for Hugging Face models,
    the architecture from config.json) captured as it was, with the saved plans applied (no pass runs).
    `loader` names the function the user called, for the error's fix."""
    source = art.source
    if model is None:
        if source.get("hf_config") is None:
            raise ArtifactError(f"{art.directory!r} holds a {source.get('model_class')} that is not a Hugging Face "
                                "model", fix=f"pass model=<an instance of that class> to {loader}")
        model = model_from_config(source["hf_config"], source_dtype(source), where=os.path.join(art.directory, CONFIG))
    gm = capture(model, example_inputs(source, model))
    del model
    apply_plans(gm, art.plans)
    return gm


def load_tensors(gm: GraphModule, directory: str, files: Sequence[str]) -> None:
    """Load the tensor files into gm, one at a time. Each stored tensor must be a tensor of gm with its shape
    and dtype, and every tensor of gm must be stored (a tied or aliased one through its twin)."""
    expected = gm.state_dict(keep_vars=True)
    done, unexpected = set(), []
    for name in files:
        path = os.path.join(directory, name)
        part = _read_safetensors(path)
        for key, t in part.items():
            want = expected.get(key)
            if want is None:
                unexpected.append(key)
            elif t.shape != want.shape or t.dtype != want.dtype:
                raise ArtifactError(f"{path!r}: {key} is {_describe(t)}; the graph rebuilt from the recipe and "
                                    f"config expects {_describe(want)}", fix=f"the file does not belong to this "
                                    f"recipe and config; {_AGAIN}")
        with torch.no_grad():
            gm.load_state_dict({k: v for k, v in part.items() if k in expected}, strict=False)
        done |= {_alias(expected[k]) for k in part if k in expected}
        del part
    missing = [k for k, v in expected.items() if _alias(v) not in done]
    if missing or unexpected:
        where = os.path.join(directory, files[0]) if len(files) == 1 else f"the shards in {directory!r}"
        raise ArtifactError(f"{where} does not match the rebuilt graph (missing {sorted(missing)[:5]}, unexpected "
                            f"{sorted(unexpected)[:5]})", fix="load with the same model class/config and qpass "
                            "version that saved it")


def load_shards(gm: GraphModule, directory: str) -> None:
    """Load the shards of an ``apply_from_disk`` artefact into gm (no digest check: ``read`` does that)."""
    load_tensors(gm, directory, _shards(directory))


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path!r} is not a readable safetensors file ({e})", fix=_AGAIN) from None


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"


def _alias(t: torch.Tensor) -> tuple:
    """Tensors that share memory are stored once (safetensors' save_model keeps one name)."""
    if t.numel() == 0:
        return (id(t),)
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)


# ------------------------------------------------------------------------------ rebuilding the model


def model_from_config(cfg: dict, dtype: torch.dtype | None = None, where: str = "the model config") -> nn.Module:
    """The architecture of `cfg` with fresh weights, built in `dtype` the way ``from_pretrained(dtype=...)``
    builds it (default: float32; buffers computed in float32, like rotary frequencies, stay float32).
    `where` names the config in errors (a config.json path)."""
    import transformers

    try:
        config = transformers.AutoConfig.for_model(**cfg)
        with torch.device("cpu"):
            model = transformers.AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype else {}))
    except (ValueError, KeyError, TypeError) as e:
        reason = str(e).split(". Should contain")[0][:300]   # transformers lists every known model type
        raise ArtifactError(f"{where}: transformers {transformers.__version__} cannot build a causal LM from it "
                            f"(model_type {cfg.get('model_type')!r}): {type(e).__name__}: {reason}",
                            fix="use the transformers version the model was saved with (qpass.json names it), or "
                                "a config.json of a causal LM this version knows") from e
    return model.eval()


def float_dtype(module: nn.Module) -> torch.dtype | None:
    """The floating dtype holding most of a module's parameter values (None: no floating parameters)."""
    counts: dict[torch.dtype, int] = {}
    for p in module.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else None


def source_dtype(source: dict) -> torch.dtype | None:
    """The floating dtype the model was quantized in (None where it was not recorded)."""
    name = source.get("dtype")
    return getattr(torch, name) if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype) \
        else None


def example_inputs(source: dict, model: nn.Module):
    """The example inputs a model was captured with (recorded shapes, zeros), or the HF default."""
    spec = source.get("example_inputs")
    if spec is None:
        return default_example_inputs(model) if getattr(model, "config", None) is not None else None
    return tuple(torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"])) for s in spec)


def _transformers_version() -> dict:
    try:
        import transformers
        return {"transformers_version": transformers.__version__}
    except ImportError:  # pragma: no cover - transformers is a dependency
        return {}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


__all__ = ["ARTIFACT_FORMAT", "SEALED", "Artifact", "atomic_directory", "example_inputs", "file_digest", "float_dtype",
           "load",
           "load_shards", "load_tensors", "model_from_config", "read", "read_json", "save", "save_module", "seal",
           "source_dtype", "write_description", "write_safetensors"]
