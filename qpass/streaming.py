"""Streaming mode: run a recipe on a model whose weights stay on disk (``qpass.apply_from_disk``).

A Hugging Face model directory (``config.json`` + ``model.safetensors`` or sharded ``model-*.safetensors``
with ``model.safetensors.index.json``) becomes a graph without its weights:

  * ``skeleton_parameters`` / ``fake_parameters``: the model is built from its config with every parameter
    on the meta device (no memory, no random init; buffers such as rotary ``inv_freq`` are computed by the
    modules' own ``__init__``), then given fake CPU parameters so ``torch.export`` traces exactly the graph
    it traces for the real model (meta parameters would bake ``device='meta'`` into the graph).
  * ``WeightStore``: after capture, every parameter of the graph is an ``OnDisk`` stand-in (right shape and
    dtype, one element of memory, and a storage of its own: the tie checks of gptq and of the folding
    analysis compare storage pointers, and every meta tensor reports pointer 0; any computation raises).
    ``store.loaded(names)`` reads those parameters from the safetensors files (or from a scratch file, once
    a pass has changed them), and on exit writes the changed ones to scratch and puts the stand-ins back.
    Tied parameters are one stored tensor.

Passes reach the store through ``Context.loaded(names)`` (a no-op in memory); ``qpass.block_sweep.Sweep``
loads each segment's parameters while the segment is calibrated. ``write_shards`` writes the result one
segment at a time, in canonical bytes (``qpass.artifacts``, which also reads it back: ``load_shards``). A change is seen through the parameter's version counter: passes change weights in
place (``copy_``, ``mul_``), never by assigning ``.data`` or a new parameter.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import reduce

import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn
from torch.fx import GraphModule

from .artifacts import INDEX, SINGLE, load_shards, write_safetensors
from .errors import ArtifactError, RecipeError


# ------------------------------------------------------------------------------ reading a checkpoint


class Checkpoint:
    """Which safetensors file of a Hugging Face model directory holds each tensor (nothing is read yet)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        index, single = os.path.join(self.directory, INDEX), os.path.join(self.directory, SINGLE)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map", {})
            self.files = {k: os.path.join(self.directory, v) for k, v in weight_map.items()}
        elif os.path.isfile(single):
            with safe_open(single, "pt") as f:
                self.files = dict.fromkeys(f.keys(), single)
        else:
            found = sorted(os.listdir(self.directory)) if os.path.isdir(self.directory) else []
            raise ArtifactError(f"{self.directory!r} has no {SINGLE} or {INDEX} (found: {found[:8] or 'nothing'})",
                                fix="save the model with save_pretrained(dir) (safetensors by default), or load it "
                                    "with transformers and use qpass.apply in memory")
        absent = sorted({f for f in self.files.values() if not os.path.isfile(f)})
        if absent:
            raise ArtifactError(f"{INDEX} in {self.directory!r} lists shards that do not exist: {absent[:3]}",
                                fix="copy the missing shards, or save the model again with save_pretrained")

    def names_for(self, model: nn.Module) -> dict[str, "str | Merged"]:
        """{model state name: checkpoint key}, through the renamings transformers applies when it loads this
        architecture (GPT-NeoX ``embed_out`` -> ``lm_head``; a base-model prefix added or dropped). A tensor
        transformers builds from several stored ones (MoE experts stored one by one, loaded as one stacked
        ``[experts, ...]`` parameter) maps to a :class:`Merged`, read with transformers' own conversion ops."""
        names = {n: True for n, _ in model.named_parameters(remove_duplicate=False)}
        names.update({n: True for n, _ in model.named_buffers()})
        rename, converter_of = _renamer(model, names)
        out, merged, parts = {}, [], {}
        for key in self.files:
            name, merge = rename(key)
            if merge is None:
                if name in names:
                    out[name] = key
                continue
            conv, index = converter_of(merge), _expert_index(key, merge)
            if conv is None or index is None or name not in names:
                merged.append(key)
                continue
            parts.setdefault(name, (conv, {}))[1].setdefault(merge, []).append((index, self.files[key], key))
        for name, (conv, by_pattern) in parts.items():
            out[name] = Merged(conv, {p: [(f, k) for _, f, k in sorted(v)] for p, v in by_pattern.items()},
                               getattr(model, "config", None), name)
        if merged:
            raise ArtifactError(f"transformers merges or reshapes some tensors of this checkpoint when it loads "
                                f"them (e.g. {merged[:3]}); qpass reads tensors one by one as stored",
                                fix="load the model with transformers and use qpass.apply in memory, or save it "
                                    "with save_pretrained in the current layout first")
        ties: dict[int, list[str]] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            ties.setdefault(id(p), []).append(n)
        _check_covered([group for group in ties.values() if not any(n in out for n in group)])
        return out

    def load_buffers(self, model: nn.Module, names: Mapping[str, str]) -> None:
        """Copy the persistent buffers the checkpoint holds into `model` (small: norms' running stats,
        position ids); the others keep the values the modules computed. `names`: ``names_for(model)``."""
        held = {n: names[n] for n, _ in model.named_buffers() if n in names}
        for name, value in read_tensors({n: (self.files[k], k) for n, k in held.items()}).items():
            buf = model.get_buffer(name)
            with torch.no_grad():
                buf.copy_(value.to(buf.dtype))


def _check_covered(missing: list[list[str]]) -> None:
    """`missing`: the names of each parameter (tied: several) the checkpoint has no tensor for."""
    if missing:
        raise ArtifactError(f"the checkpoint has no tensor for {len(missing)} parameters of the model built from "
                            f"config.json, e.g. {[names[0] for names in missing[:5]]}",
                            fix="check that config.json belongs to these weights (tensor names must match the "
                                "model's state_dict), or load the model with transformers and use qpass.apply")


def _renamer(model: nn.Module, names: dict[str, bool]):
    """key -> (model name, the converter pattern when transformers would merge or reshape that tensor, else
    None): transformers' own loading rules for this architecture (identity on versions without them)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # pragma: no cover - transformers < 5: checkpoint names are the model's
        return (lambda key: (key, None)), (lambda pattern: None)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    prefix = getattr(model, "base_model_prefix", None)

    def converter_of(pattern: str):
        return next((c for c in converters if pattern in getattr(c, "source_patterns", ())
                     and hasattr(c, "operations")), None)

    return (lambda key: rename_source_key(key, renamings, converters, prefix, names)), converter_of


def _expert_index(key: str, pattern: str) -> int | None:
    """The number a converter pattern's ``*`` stands for in `key` (``.experts.*.w1.weight`` in
    ``...experts.3.w1.weight`` -> 3); None when the pattern has no single ``*`` there."""
    import re

    if pattern.count("*") != 1:
        return None
    m = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
    return int(m.group(1)) if m else None


@dataclass(frozen=True, eq=False)
class Merged:
    """A model tensor transformers builds from several checkpoint tensors: `parts` {source pattern: [(file, key)]
    in expert order}, merged by the converter's own operations (stack per pattern, then concatenate)."""

    converter: object
    parts: dict
    config: object
    name: str

    def read(self) -> torch.Tensor:
        tensors = {p: list(read_tensors({f"{i}": fk for i, fk in enumerate(v)}).values())
                   for p, v in self.parts.items()}
        conv = self.converter
        for op in conv.operations:
            tensors = op.convert(tensors, source_patterns=list(conv.source_patterns),
                                 target_patterns=list(conv.target_patterns), full_layer_name=self.name, model=None,
                                 config=self.config, missing_keys=None)
        (value,) = tensors.values()
        return value


def read_tensors(where: Mapping[str, tuple[str, str]]) -> dict[str, torch.Tensor]:
    """{name: tensor} for {name: (file, key)}, one open per file."""
    by_file: dict[str, list[str]] = {}
    for name, (path, _) in where.items():
        by_file.setdefault(path, []).append(name)
    out = {}
    for path, names in by_file.items():
        with safe_open(path, "pt") as f:
            for name in names:
                out[name] = f.get_tensor(where[name][1])
    return out


@contextlib.contextmanager
def skeleton_parameters() -> Iterator[None]:
    """Modules built in this block get meta parameters (no memory; their random init runs on meta, so
    costs nothing) and real buffers. A parameter already on meta is kept as is, so tying keeps one object.

    NOTE: this is what ``accelerate.init_empty_weights(include_buffers=False)`` does (it patches
    ``register_parameter`` the same way). accelerate is not a dependency of qpass or of transformers 5, and
    adding it (with psutil) for these lines is not worth it; if it becomes a dependency for other reasons,
    use it here."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def fake_parameters(model: nn.Module) -> nn.Module:
    """Replace every parameter with a fake CPU tensor of its shape (ties kept): torch.export then traces the
    graph it traces for the real model, with no memory for weights."""
    from torch._subclasses.fake_tensor import FakeTensorMode   # NOTE: what torch.export itself traces with

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
    for module in model.modules():
        for attr, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in fakes:
                with mode:
                    fake = torch.empty(p.shape, dtype=p.dtype, device="cpu")
                fakes[id(p)] = (p, nn.Parameter(fake, requires_grad=p.requires_grad))
            module._parameters[attr] = fakes[id(p)][1]
    return model


# ------------------------------------------------------------------------------ parameters on disk


class OnDisk(nn.Parameter):
    """Stands in for a parameter that is on disk: shape, dtype and a storage of its own (tie checks compare
    storage pointers), one element of memory. Anything that needs its values raises."""

    _NAMES = frozenset({"dim", "size", "numel", "nelement", "element_size", "is_floating_point", "is_complex",
                        "untyped_storage", "data_ptr", "stride", "__hash__", "is_contiguous"})
    _PROPS = frozenset({"shape", "dtype", "device", "ndim", "requires_grad", "is_leaf", "layout", "grad",
                        "_version", "is_meta", "is_cuda", "is_sparse", "is_quantized", "is_nested", "names"})

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        prop = getattr(getattr(func, "__self__", None), "__name__", None) if name == "__get__" else None
        if name in cls._NAMES or prop in cls._PROPS:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        held = next((a for a in args if isinstance(a, OnDisk)), None)
        what = getattr(held, "qpass_name", "a parameter")
        raise RecipeError("", f"{what} is on disk (qpass.apply_from_disk) and {getattr(func, '__name__', func)} "
                              "needs its values outside the block being calibrated; only passes that load weights "
                              "block by block can stream\n  fix: run this recipe with qpass.apply in memory")

    def __repr__(self) -> str:
        return f"OnDisk({getattr(self, 'qpass_name', '?')}, shape={tuple(self.shape)}, dtype={self.dtype})"


@dataclass(eq=False)
class _Entry:
    """One stored tensor (tied parameters share it): where its bytes are and which attributes hold it."""

    names: list[str]
    owners: list[tuple[nn.Module, str]]
    file: str
    key: str
    stand_in: OnDisk
    live: nn.Parameter | None = None
    refs: int = 0
    version: int = 0   # the live parameter's version counter when loaded: an in-place change bumps it

    @property
    def nbytes(self) -> int:
        return self.stand_in.numel() * self.stand_in.element_size()


@dataclass
class StoreStats:
    loads: int = 0             # tensors read from disk
    writes: int = 0            # changed tensors written to scratch
    resident_bytes: int = 0    # parameter bytes in memory now
    peak_bytes: int = 0        # most parameter bytes in memory at once
    peak_names: list[str] = field(default_factory=list)   # what was loaded at that moment


class WeightStore:
    """The parameters of `gm` on disk. `sources` maps each parameter name of the graph (ties: any one of
    them) to (safetensors file, key); `scratch` is a directory for tensors passes change."""

    def __init__(self, gm: GraphModule, sources: Mapping[str, tuple[str, str]], scratch: str):
        self.gm, self.scratch = gm, scratch
        self.stats = StoreStats()
        self._by_name: dict[str, _Entry] = {}
        self._scratch_refs: dict[str, int] = {}
        groups: dict[int, tuple[nn.Parameter, list, list]] = {}
        for mod_name, module in gm.named_modules(remove_duplicate=False):
            for attr, p in module._parameters.items():
                if p is not None:
                    g = groups.setdefault(id(p), (p, [], []))
                    g[1].append(f"{mod_name}.{attr}" if mod_name else attr)
                    g[2].append((module, attr))
        missing = []
        for p, names, owners in groups.values():
            src = next((sources[n] for n in names if n in sources), None)
            if src is None:
                missing.append(names)
                continue
            stand_in = OnDisk(torch.full((1,), float("nan"), dtype=p.dtype).expand(p.shape),
                              requires_grad=p.requires_grad)
            stand_in.qpass_name = names[0]
            entry = _Entry(sorted(set(names)), owners, src[0], src[1], stand_in)
            self._install(entry, stand_in)
            self._by_name.update(dict.fromkeys(names, entry))
        _check_covered(missing)
        os.makedirs(scratch, exist_ok=True)

    @property
    def nbytes(self) -> int:
        """Bytes of every stored parameter (ties counted once)."""
        return sum(e.nbytes for e in set(self._by_name.values()))

    @contextlib.contextmanager
    def loaded(self, names: Iterable[str]) -> Iterator[None]:
        """Parameters `names` (graph attribute names; others are ignored) hold their real values inside the
        block; nested blocks share them. On the way out, those no block holds any more are written to scratch
        if a pass changed them, and go back to disk."""
        entries = list(dict.fromkeys(self._by_name[n] for n in names if n in self._by_name))
        self._read([e for e in entries if e.refs == 0])
        for e in entries:
            e.refs += 1
        try:
            yield
        finally:
            for e in entries:
                e.refs -= 1
            self._release([e for e in entries if e.refs == 0])

    def _read(self, entries: list[_Entry]) -> None:
        if not entries:
            return
        values = read_tensors({e.names[0]: (e.file, e.key) for e in entries if not isinstance(e.key, Merged)})
        values.update({e.names[0]: e.key.read() for e in entries if isinstance(e.key, Merged)})
        for e in entries:
            t = values[e.names[0]]
            if t.shape != e.stand_in.shape:
                raise ArtifactError(f"{e.key} in {e.file!r} has shape {tuple(t.shape)}; the model built from "
                                    f"config.json expects {tuple(e.stand_in.shape)} for {e.names[0]}",
                                    fix="check that config.json belongs to these weights")
            live = nn.Parameter(t.to(e.stand_in.dtype), requires_grad=e.stand_in.requires_grad)
            self._install(e, live)
            e.live, e.version = live, live._version
            self.stats.loads += 1
            self.stats.resident_bytes += e.nbytes
        if self.stats.resident_bytes > self.stats.peak_bytes:
            self.stats.peak_bytes = self.stats.resident_bytes
            self.stats.peak_names = sorted(e.names[0] for e in set(self._by_name.values()) if e.live is not None)

    def _release(self, entries: list[_Entry]) -> None:
        for e in entries:
            for module, attr in e.owners:
                if module._parameters.get(attr) is not e.live:
                    raise RecipeError("", f"{e.names[0]} was replaced by a new tensor while loaded; in "
                                          "qpass.apply_from_disk passes must change parameters in place\n"
                                          "  fix: run this recipe with qpass.apply in memory")
        changed = [e for e in entries if e.live._version != e.version]
        if changed:
            path = os.path.join(self.scratch, f"{self.stats.writes:08d}.safetensors")
            safetensors.torch.save_file({e.names[0]: e.live.detach().contiguous() for e in changed}, path)
            self._scratch_refs[path] = len(changed)
            for e in changed:
                self._forget(e.file)
                e.file, e.key = path, e.names[0]
            self.stats.writes += len(changed)
        for e in entries:
            self._install(e, e.stand_in)
            e.live = None
            self.stats.resident_bytes -= e.nbytes

    def _forget(self, path: str) -> None:
        """Drop one reference to a scratch file; delete it when nothing points into it (checkpoint files are
        never touched)."""
        if path in self._scratch_refs:
            self._scratch_refs[path] -= 1
            if not self._scratch_refs[path]:
                del self._scratch_refs[path]
                os.remove(path)

    @staticmethod
    def _install(e: _Entry, value: nn.Parameter) -> None:
        for module, attr in e.owners:
            module._parameters[attr] = value


def checkpoint_sources(gm: GraphModule, ckpt: Checkpoint, names: Mapping[str, str],
                       prefix: str) -> dict[str, tuple[str, str]]:
    """{graph parameter name: (file, key)}: the graph's names are the model's behind the capture prefix;
    `names` maps the model's names to checkpoint keys (``Checkpoint.names_for``)."""
    out = {}
    for name, _ in gm.named_parameters(remove_duplicate=False):
        key = names.get(name[len(prefix):] if name.startswith(prefix) else name)
        if isinstance(key, Merged):
            out[name] = ("", key)
        elif key is not None:
            out[name] = (ckpt.files[key], key)
    return out


# ------------------------------------------------------------------------------ writing the result


def write_shards(gm: GraphModule, store: WeightStore, directory: str, segments: list[list[str]],
                 metadata: dict[str, str]) -> dict:
    """Write gm's state dict as ``model-0000i-of-0000n.safetensors`` (one file per segment: each tensor goes
    with the first segment that reads it, tensors no node reads go last) and ``model.safetensors.index.json``;
    only one segment's parameters are in memory at a time. Tied names are written once. The same graph and
    values give the same bytes (canonical safetensors headers, sorted index)."""
    state = gm.state_dict(keep_vars=True)          # stand-ins stay stand-ins (keep_vars: no detach)
    seen_ids, chunks = set(), []
    for attrs in segments + [list(state)]:
        chunk = []
        for key in attrs:
            if key in state and id(state[key]) not in seen_ids:
                seen_ids.add(id(state[key]))
                chunk.append(key)
        if chunk:
            chunks.append(chunk)
    weight_map, total = {}, 0
    for i, chunk in enumerate(chunks):
        name = f"model-{i + 1:05d}-of-{len(chunks):05d}.safetensors"
        with store.loaded(chunk):
            tensors = {k: _attr(gm, k).detach().contiguous() for k in chunk}
            write_safetensors(tensors, os.path.join(directory, name), metadata)
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
        weight_map.update(dict.fromkeys(chunk, name))
    index = {"metadata": {**metadata, "total_size": str(total)}, "weight_map": weight_map}
    with open(os.path.join(directory, INDEX), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return index


def _attr(gm: GraphModule, target: str) -> torch.Tensor:
    return reduce(getattr, target.split("."), gm)


__all__ = ["Checkpoint", "WeightStore", "OnDisk", "StoreStats", "skeleton_parameters", "fake_parameters",
           "checkpoint_sources", "write_shards", "load_shards", "read_tensors"]
