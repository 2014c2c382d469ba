"""Recipes: typed config dataclasses are the truth, YAML is a serialization.

    version: 1
    passes:                                   # ordered; each item is {pass name: options}
      - quantize:
          weights:     {bits: 4, granularity: per_group, group_size: 128, symmetric: true}
          activations: {bits: 8, granularity: per_token, dynamic: true}
          ignore: [lm_head]

Every pass config is a frozen dataclass with a ``name`` class attribute; the table of passes lives in
``qpass.passes.PASSES``. The loader is strict: an unknown pass or key, a wrong type or an out-of-range
value raises :class:`RecipeError` whose message starts with the path (``passes[0].quantize.weights.bits``)
and says what is allowed. The schema reference (docs/recipes.md) is generated from the same dataclasses
by :func:`schema_markdown`.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import yaml

from .errors import RecipeError, suggest
from .primitives.spec import (
    FLOAT_MAX,
    FloatFormat,
    IntFormat,
    LutFormat,
    PerChannel,
    PerGroup,
    PerHead,
    PerTensor,
    PerToken,
    QSpec,
)

RECIPE_VERSION = 1

# ------------------------------------------------------------------------------------- QSpec <-> dict

FORMATS = ("int", *FLOAT_MAX, "nf4")
GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_token", "per_head")
_QSPEC_KEYS = ("bits", "format", "granularity", "group_size", "axis", "symmetric", "dynamic", "full_range",
               "scale_pow2", "clip_ratio")
QSPEC_KEYS = _QSPEC_KEYS
MAX_GROUP_SIZE = 1 << 16     # larger than any model's feature dimension; a bigger group is a typo


def qspec_from_dict(d: Any, path: str) -> QSpec:
    """``{bits: 4, granularity: per_group, group_size: 128}`` -> QSpec, strictly."""
    d = _expect_mapping(d, path)
    _check_keys(d, _QSPEC_KEYS, path)
    fmt_name = _typed(d.get("format", "int"), str, f"{path}.format")
    if fmt_name not in FORMATS:
        raise _choice_error(f"{path}.format", fmt_name, FORMATS)
    if fmt_name == "int":
        bits = _typed(d.get("bits", 8), int, f"{path}.bits")
        if not 2 <= bits <= 8:
            raise RecipeError(f"{path}.bits", f"must be an integer in [2, 8] for integer formats, got {bits}")
        fmt = IntFormat(bits)
    else:
        fmt = LutFormat() if fmt_name == "nf4" else FloatFormat(fmt_name)
        if "bits" in d and d["bits"] != fmt.bits:
            raise RecipeError(f"{path}.bits", f"{fmt_name} has {fmt.bits} bits, got {d['bits']!r}; drop 'bits'")
    symmetric = _typed(d.get("symmetric", True), bool, f"{path}.symmetric")
    dynamic = _typed(d.get("dynamic", False), bool, f"{path}.dynamic")
    if fmt.kind != "int" and not symmetric:
        raise RecipeError(f"{path}.symmetric", f"{fmt_name} is scaled by absmax and is symmetric only; set true")
    full_range = _typed(d.get("full_range", False), bool, f"{path}.full_range")
    if full_range and (fmt.kind != "int" or not symmetric or dynamic):
        raise RecipeError(f"{path}.full_range", "applies to symmetric integer quantizers with static scales "
                          "(weights, static activations); remove it or set symmetric: true, dynamic: false")
    scale_pow2 = _typed(d.get("scale_pow2", False), bool, f"{path}.scale_pow2")
    if scale_pow2 and (dynamic or full_range):
        raise RecipeError(f"{path}.scale_pow2", "applies to static scales (weights, static activations) without "
                          "full_range; remove it or set dynamic: false")
    clip_ratio = _clip_ratio(d, path, fmt, dynamic)
    gran = _granularity_from_dict(d, path, dynamic)
    return QSpec(format=fmt, granularity=gran, symmetric=symmetric, dynamic=dynamic, full_range=full_range,
                 scale_pow2=scale_pow2, clip_ratio=clip_ratio)


def _clip_ratio(d: Mapping, path: str, fmt, dynamic: bool) -> float:
    if "clip_ratio" not in d:
        return 1.0
    c = d["clip_ratio"]
    if isinstance(c, bool) or not isinstance(c, (int, float)):
        raise RecipeError(f"{path}.clip_ratio", f"must be a number in (0, 1], got {c!r}")
    if not 0.0 < c <= 1.0:
        raise RecipeError(f"{path}.clip_ratio", f"must be in (0, 1] (1.0: min-max; QuaRot uses 0.9 for activations, "
                          f"0.95 for the KV cache), got {c}")
    if c != 1.0 and (not dynamic or fmt.kind != "int"):
        raise RecipeError(f"{path}.clip_ratio", "applies to dynamic integer quantizers (dynamic: true, an int "
                          "format); static scales are clipped by the observer (percentile, mse)")
    return float(c)


def _granularity_from_dict(d: Mapping, path: str, dynamic: bool):
    name = _typed(d.get("granularity", "per_channel"), str, f"{path}.granularity")
    if name not in GRANULARITIES:
        raise _choice_error(f"{path}.granularity", name, GRANULARITIES)
    if "group_size" in d and name != "per_group":
        raise RecipeError(f"{path}.group_size", f"only valid with granularity: per_group (got {name})")
    if "axis" in d and name not in ("per_channel", "per_group"):
        raise RecipeError(f"{path}.axis", f"only valid with per_channel or per_group (got {name})")
    axis = _typed(d["axis"], int, f"{path}.axis") if "axis" in d else None
    if axis is not None and not -4 <= axis <= 3:
        raise RecipeError(f"{path}.axis", f"must be in [-4, 3] (weights are [out, in], activations [.., features], "
                          f"K/V [batch, heads, seq, head_dim]; -1 is the last axis), got {axis}")
    if name == "per_group":
        if "group_size" not in d:
            raise RecipeError(f"{path}.group_size", "required with granularity: per_group (e.g. 128)")
        g = _typed(d["group_size"], int, f"{path}.group_size")
        if g < 1:
            raise RecipeError(f"{path}.group_size", f"must be a positive integer (usual: 32, 64, 128), got {g}")
        if g > MAX_GROUP_SIZE:
            raise RecipeError(f"{path}.group_size", f"must be at most {MAX_GROUP_SIZE}, got {g}; for one scale per "
                              "whole row use granularity: per_channel")
        return PerGroup(g, -1 if axis is None else axis)
    if name == "per_token" and not dynamic:
        raise RecipeError(f"{path}.dynamic", "per_token scales are computed at run time; set dynamic: true")
    return {
        "per_tensor": lambda: PerTensor(),
        "per_channel": lambda: PerChannel(0 if axis is None else axis),
        "per_token": lambda: PerToken(),
        "per_head": lambda: PerHead(per_token=dynamic),
    }[name]()


def qspec_to_dict(spec: QSpec) -> dict:
    fmt, g = spec.format, spec.granularity
    d: dict[str, Any] = {"format": fmt.name if fmt.kind != "int" else "int"}
    if fmt.kind == "int":
        d["bits"] = fmt.bits
    name = {PerTensor: "per_tensor", PerChannel: "per_channel", PerGroup: "per_group",
            PerToken: "per_token", PerHead: "per_head"}[type(g)]
    d["granularity"] = name
    if isinstance(g, PerGroup):
        d["group_size"] = g.group_size
        if g.axis != -1:
            d["axis"] = g.axis
    if isinstance(g, PerChannel):
        d["axis"] = g.axis
    d["symmetric"] = spec.symmetric
    d["dynamic"] = spec.dynamic
    if spec.full_range:
        d["full_range"] = True
    if spec.scale_pow2:
        d["scale_pow2"] = True
    if spec.clip_ratio != 1.0:
        d["clip_ratio"] = spec.clip_ratio
    return d


# ------------------------------------------------------------------------------ generic config codec


class Codec:
    """How a non-builtin field type maps to and from YAML values (register in CODECS)."""

    def __init__(self, load, dump, doc: str):
        self.load, self.dump, self.doc = load, dump, doc


CODECS: dict[Any, Codec] = {
    QSpec: Codec(qspec_from_dict, qspec_to_dict,
                 "mapping: {format: int|fp8_e4m3|fp8_e5m2|fp4_e2m1|nf4, bits: 2..8, granularity: "
                 "per_tensor|per_channel|per_group|per_token|per_head, group_size: 1..65536, axis: -4..3, "
                 "symmetric, dynamic, "
                 "full_range (symmetric int, static: all 2^b codes, as onnxruntime's MLAS), "
                 "scale_pow2 (static: scales rounded up to powers of two, ZeroQuant-FP), "
                 "clip_ratio (dynamic int: (0, 1], each block's min/max times it before the scale, QuaRot)}"),
}


def config_from_dict(cls: type, data: Any, path: str):
    """Build dataclass `cls` from a mapping, strictly (unknown keys, wrong types -> RecipeError)."""
    data = {} if data is None else _expect_mapping(data, path)
    shorthand = getattr(cls, "expand_shorthand", None)        # a config's own sugar, e.g. kv_cache: {bits: 4}
    if shorthand is not None:
        data = shorthand(dict(data), path)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.init]
    _check_keys(data, names, path)
    kwargs = {k: _load_value(data[k], hints[k], f"{path}.{k}") for k in names if k in data}
    try:
        return cls(**kwargs)
    except RecipeError as e:  # config validation names its field relative to the config
        raise RecipeError(f"{path}.{e.path}" if e.path else path, e.reason) from None
    except (ValueError, TypeError) as e:
        raise RecipeError(path, str(e)) from None


def config_to_dict(obj) -> dict:
    hints = typing.get_type_hints(type(obj))
    return {f.name: _dump_value(getattr(obj, f.name), hints[f.name]) for f in fields(obj) if f.init}


def _load_value(value: Any, tp: Any, path: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _load_value(value, inner[0], path)
        raise TypeError(f"unsupported union type {tp} at {path}")
    if tp in CODECS:
        return CODECS[tp].load(value, path)
    if origin is Literal:
        if value not in args:
            raise _choice_error(path, value, args)
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise RecipeError(path, f"expected a list, got {_kind(value)} {value!r}")
        item = args[0]
        return tuple(_load_value(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        allowed = [m.value for m in tp]
        if value not in allowed:
            raise _choice_error(path, value, allowed)
        return tp(value)
    if dataclasses.is_dataclass(tp):
        return config_from_dict(tp, value, path)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(path, f"expected a number, got {_kind(value)} {value!r}")
        if not math.isfinite(value):
            raise RecipeError(path, f"expected a finite number, got {value!r}")
        return float(value)
    if tp in (int, bool, str):
        return _typed(value, tp, path)
    if tp is Any:
        return value
    raise TypeError(f"unsupported config field type {tp} at {path}")


def _dump_value(value: Any, tp: Any):
    if value is None:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _dump_value(value, inner[0])
    if tp in CODECS:
        return CODECS[tp].dump(value)
    if origin is tuple:
        return [_dump_value(v, args[0]) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value):
        return config_to_dict(value)
    return value


# ------------------------------------------------------------------------------------------- Recipe


@dataclass(frozen=True)
class Recipe:
    """An ordered list of pass configs. ``verify: true`` re-runs calibration inputs after every pass and
    reports the output difference each one introduced."""

    passes: tuple = ()
    verify: bool = False
    version: int = RECIPE_VERSION

    def __post_init__(self):
        object.__setattr__(self, "passes", tuple(self.passes))
        table = _pass_table()
        for i, cfg in enumerate(self.passes):
            name = getattr(type(cfg), "name", None)
            if name not in table or table[name][0] is not type(cfg):
                raise RecipeError(f"passes[{i}]", f"{type(cfg).__name__} is not a registered pass config")

    # -- construction
    @classmethod
    def from_dict(cls, data: Any) -> "Recipe":
        if data is None:
            raise RecipeError("", _EMPTY)
        data = _expect_mapping(data, "")
        _check_keys(data, ("version", "passes", "verify"), "", root=True)
        version = _typed(data.get("version", RECIPE_VERSION), int, "version")
        if version != RECIPE_VERSION:
            raise RecipeError("version", f"this qpass reads recipe version {RECIPE_VERSION}, got {version}")
        verify = _typed(data.get("verify", False), bool, "verify")
        if "passes" not in data:
            raise RecipeError("passes", "required: the ordered list of passes (e.g. 'passes: [{quantize: {weights: "
                              "{bits: 8}}}]'); write 'passes: []' for a recipe that deliberately changes nothing")
        items = data["passes"]
        if items is None:
            raise RecipeError("passes", "is empty (null): list at least one pass item '- <pass name>: {options}', "
                              "or write 'passes: []' for a recipe that deliberately changes nothing")
        if not isinstance(items, list):
            raise RecipeError("passes", f"expected a list of {{pass-name: options}} items, got {_kind(items)}")
        return cls(tuple(_pass_from_item(item, i) for i, item in enumerate(items)), verify=verify)

    @classmethod
    def from_str(cls, text: str) -> "Recipe":
        """Parse recipe YAML text (use :meth:`from_yaml` for a file: its errors name the file)."""
        if not isinstance(text, str):
            raise RecipeError("", f"Recipe.from_str takes YAML text (str), got {type(text).__name__}; "
                                  "use Recipe.from_yaml(path) for a file")
        return cls.from_dict(load_yaml(text))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "Recipe":
        name = os.fspath(path)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise RecipeError("", f"cannot read recipe file {name!r}: {e.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecipeError("", f"recipe file {name!r} is not UTF-8 text (byte {raw[e.start]:#04x} at offset "
                                  f"{e.start}): a recipe is a YAML text file; is this the right path?") from None
        nul = text.find("\x00")
        if nul >= 0:
            raise RecipeError("", f"recipe file {name!r} is a binary file (NUL byte at offset {nul}): a recipe is a "
                                  "YAML text file; is this the right path?")
        try:
            return cls.from_dict(load_yaml(text))
        except RecipeError as e:
            raise RecipeError(e.path, f"{e.reason} (in {name})") from None

    # -- serialization
    def to_dict(self) -> dict:
        out: dict[str, Any] = {"version": self.version}
        if self.verify:
            out["verify"] = True
        out["passes"] = [{type(c).name: config_to_dict(c)} for c in self.passes]
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=110)


def as_recipe(recipe: "Recipe | Mapping | str | os.PathLike") -> Recipe:
    """Accept a Recipe, a dict, or a path to a YAML file."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, (str, os.PathLike)):
        if not os.path.exists(recipe):
            raise RecipeError("", f"recipe file {os.fspath(recipe)!r} does not exist "
                                  "(pass a Recipe, a dict, or the path of a YAML file)")
        return Recipe.from_yaml(recipe)
    raise RecipeError("", f"expected a Recipe, a dict or a YAML path, got {type(recipe).__name__}")


def _pass_from_item(item: Any, i: int):
    path = f"passes[{i}]"
    table = _pass_table()
    if isinstance(item, str):  # "- quantize" with no options
        item = {item: None}
    if not isinstance(item, Mapping) or len(item) != 1:
        raise RecipeError(path, "each pass is a mapping with exactly one key, the pass name "
                                f"(e.g. '- quantize: {{...}}'); got {item!r}")
    (name, options), = item.items()
    if name not in table:
        raise _choice_error(path, name, sorted(table), what="unknown pass")
    return config_from_dict(table[name][0], options, f"{path}.{name}")


def _pass_table() -> dict:
    from qpass.passes import PASSES  # the one literal table; imported late (passes import this module)

    return PASSES


def make_passes(recipe: "Recipe") -> list:
    """The pass objects of a recipe's configs, in order."""
    table = _pass_table()
    return [table[type(c).name][1](c) for c in recipe.passes]


def pass_class(name: str, where: str = "the plan"):
    """The pass class of recipe name `name` (a plan's ``pass``), or an ArtifactError naming `where`."""
    from .errors import ArtifactError

    table = _pass_table()
    if name not in table:
        raise ArtifactError(f"{where} names the pass {name!r}, which this qpass does not have (passes: "
                            f"{sorted(table)})", fix="load it with the qpass version that wrote it")
    return table[name][1]


# ------------------------------------------------------------------------------------------- YAML

_EMPTY = ("the recipe is empty: list its passes, e.g. 'passes: [{quantize: {weights: {bits: 8}}}]'; write "
          "'passes: []' for a recipe that deliberately changes nothing")


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping with the same key twice is an error (PyYAML keeps the last
    one silently: `weights: {bits: 8, bits: 3}` would quantize to 3 bits). Merge keys (`<<: *base`) may still
    be overridden, as YAML intends."""

    paths: dict[int, str]

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    duplicate = key in seen
                except TypeError:     # an unhashable key: the base class reports it
                    continue
                if duplicate:
                    where = self.paths.get(id(node), "")
                    raise RecipeError(f"{where}.{key}" if where else str(key),
                                      f"duplicate key (line {line}; first at line {seen[key]}): YAML would keep "
                                      "only the last one silently; remove one of them")
                seen[key] = line
        return super().construct_mapping(node, deep)


def _node_paths(root) -> dict[int, str]:
    """id(mapping node) -> its recipe path (passes[0].quantize.weights), for error messages."""
    paths: dict[int, str] = {}
    todo = [(root, "")]
    while todo:
        node, path = todo.pop()
        if id(node) in paths:     # an alias: already walked (and no exponential walk over nested aliases)
            continue
        paths[id(node)] = path
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    todo.append((v, f"{path}.{k.value}" if path else k.value))
        elif isinstance(node, yaml.SequenceNode):
            todo += [(v, f"{path}[{i}]") for i, v in enumerate(node.value)]
    return paths


def _mark(mark) -> str:
    return f"at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def load_yaml(text: str) -> Any:
    """Parse YAML text strictly (duplicate keys refused); errors are RecipeErrors with the line and column."""
    loader = None
    try:
        loader = _StrictLoader(text)
        node = loader.get_single_node()
        if node is None:              # empty or comment-only text
            raise RecipeError("", _EMPTY)
        loader.paths = _node_paths(node)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        raise RecipeError("", f"not valid YAML {_mark(e.problem_mark)}: {e.problem}"
                          + (f" ({e.context} {_mark(e.context_mark)})" if e.context else "")) from None
    except yaml.reader.ReaderError as e:     # a character YAML does not allow
        char = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
        raise RecipeError("", f"not valid YAML: character {char} at offset {e.position}: {e.reason}") from None
    except yaml.YAMLError as e:
        raise RecipeError("", f"not valid YAML: {e}") from None
    finally:
        if loader is not None:
            loader.dispose()


# ----------------------------------------------------------------------------------------- helpers


def _expect_mapping(d: Any, path: str) -> Mapping:
    if not isinstance(d, Mapping):
        raise RecipeError(path, f"expected a mapping, got {_kind(d)} {d!r}")
    return d


def _check_keys(d: Mapping, allowed, path: str, root: bool = False):
    for k in d:
        if k not in allowed:
            close = suggest(str(k), allowed)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            sub = f"{path}.{k}" if path else str(k)
            raise RecipeError(sub, f"unknown key{hint} (allowed: {', '.join(allowed)})")


def _typed(value: Any, tp: type, path: str):
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if not ok:
        raise RecipeError(path, f"expected {tp.__name__}, got {_kind(value)} {value!r}")
    return value


def _kind(v: Any) -> str:
    return {dict: "mapping", list: "list", str: "string", bool: "bool", int: "int", float: "float",
            type(None): "null"}.get(type(v), type(v).__name__)


def _choice_error(path: str, value: Any, allowed, what: str = "invalid value") -> RecipeError:
    allowed = [str(a) for a in allowed]
    close = suggest(str(value), allowed)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return RecipeError(path, f"{what} {value!r}{hint} (allowed: {', '.join(allowed)})")


def schema_markdown() -> str:
    """The recipe reference, generated from the pass config dataclasses (docs/recipes.md)."""
    lines = ["# Recipe reference", "", "Generated by `python tools/gen_recipe_docs.py` from the config "
             "dataclasses; do not edit by hand.", "",
             "```yaml", "version: 1          # optional", "verify: false       # optional: report the "
             "output change of every pass", "passes:             # required, ordered",
             "  - <pass name>: {<options>}", "```", "",
             "Loading is strict: every problem is a `RecipeError` whose message starts with the recipe path "
             "(`passes[0].quantize.weights.group_size`) and, for a file, ends with the file name.", "",
             "- `passes` is required. An empty file, `{}`, `null` or a recipe without `passes` is refused; a "
             "recipe that deliberately changes nothing says so with `passes: []` (`recipes/w16.yaml`).",
             "- A key given twice in one mapping (`weights: {bits: 8, bits: 3}`, two `passes:`) is refused with "
             "both line numbers (plain YAML keeps the last one silently). Overriding a merged key (`<<: *base`) "
             "is allowed.",
             "- Unknown keys and pass names, wrong types, non-finite numbers (`.nan`, `.inf`) and values out of "
             "range are refused; the message says what is allowed.",
             "- Options that depend on the model (module-path globs, a qat data file, `seq_len` against the "
             "model's positions) are checked when the recipe is applied, before any pass runs where possible; "
             "their errors carry the same `passes[i].` path.", ""]
    for name, (cfg_cls, pass_cls) in _pass_table().items():
        lines += [f"## `{name}`", "", (pass_cls.__doc__ or "").strip().split("\n\n")[0], "",
                  "| option | type | default | meaning |", "|---|---|---|---|"]
        hints = typing.get_type_hints(cfg_cls)
        docs = getattr(cfg_cls, "field_docs", {})
        for f in fields(cfg_cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
            shown = _dump_value(default, hints[f.name]) if default != "required" else default
            lines.append(f"| `{f.name}` | {_type_doc(hints[f.name])} | `{shown}` | {docs.get(f.name, '')} |")
        sugar = getattr(cfg_cls, "expand_shorthand", None)
        if sugar is not None and sugar.__doc__:
            lines += ["", "Shorthand: " + " ".join(sugar.__doc__.split())]
        lines.append("")
    return "\n".join(lines)


def _type_doc(tp) -> str:
    if tp in CODECS:
        return CODECS[tp].doc
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_doc(a) for a in args if a is not type(None)) + " or null"
    if origin is Literal:
        return " \\| ".join(str(a) for a in args)
    if origin is tuple:
        return f"list of {_type_doc(args[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping: {" + ", ".join(f.name for f in fields(tp)) + "}"
    return getattr(tp, "__name__", str(tp))


__all__ = ["Recipe", "as_recipe", "config_from_dict", "config_to_dict", "qspec_from_dict", "qspec_to_dict",
           "schema_markdown", "CODECS", "Codec"]
