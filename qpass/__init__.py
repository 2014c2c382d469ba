"""qpass: quantize LLMs the way a compiler optimizes programs.

    import qpass
    qm = qpass.apply(model, "recipes/w8a8.yaml", calib_data=[input_ids])
    print(qm.report); qm(input_ids).logits; qm.save("out/"); qpass.load("out/")
    qpass.apply_from_disk("hf_model_dir/", "recipes/gptq_w4a16_g128.yaml", "out/", calib_data=[input_ids])

Saved directories (layout, digests, ``read`` to check one, ``load``) are ``qpass.artifacts``.

Import names: the repository folders ``qpass/`` (core), ``passes/`` and ``backends/`` install as
``qpass``, ``qpass.passes`` and ``qpass.backends``.

Importing ``qpass`` is cheap: the names below load (all together, in this order, so the side effects are
those of an eager import) when one of them is first used. The ``qpass`` command can so catch Ctrl-C around
everything heavy (torch, transformers): the console script imports ``qpass.cli`` before any of its code runs.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from .version import __version__ as __version__

if TYPE_CHECKING:                               # what the names are, for type checkers and readers
    from . import artifacts as artifacts
    from . import primitives as primitives
    from ._api import QuantizedModel as QuantizedModel
    from ._api import StreamResult as StreamResult
    from ._api import apply as apply
    from ._api import apply_from_disk as apply_from_disk
    from .artifacts import load as load
    from .capture import capture as capture
    from .capture import capture_decode as capture_decode
    from .errors import (
        ArtifactError as ArtifactError,
        CalibrationError as CalibrationError,
        CaptureError as CaptureError,
        PassError as PassError,
        QpassError as QpassError,
        QuantizationError as QuantizationError,
        RecipeError as RecipeError,
        TargetNotFoundError as TargetNotFoundError,
        UnsupportedOpError as UnsupportedOpError,
    )
    from .primitives.spec import (
        FloatFormat as FloatFormat,
        IntFormat as IntFormat,
        LutFormat as LutFormat,
        PerChannel as PerChannel,
        PerGroup as PerGroup,
        PerHead as PerHead,
        PerTensor as PerTensor,
        PerToken as PerToken,
        QSpec as QSpec,
    )
    from .export import export as export
    from .lower import lower as lower
    from .recipe import Recipe as Recipe

# public name -> (submodule, its attribute; None: the submodule itself), in the order they load
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "artifacts": ("artifacts", None), "primitives": ("primitives", None),
    **{n: ("_api", n) for n in ("QuantizedModel", "StreamResult", "apply", "apply_from_disk")},
    "load": ("artifacts", "load"),
    "capture": ("capture", "capture"), "capture_decode": ("capture", "capture_decode"),
    **{n: ("errors", n) for n in ("ArtifactError", "CalibrationError", "CaptureError", "PassError", "QpassError",
                                  "QuantizationError", "RecipeError", "TargetNotFoundError", "UnsupportedOpError")},
    **{n: ("primitives.spec", n) for n in ("FloatFormat", "IntFormat", "LutFormat", "PerChannel", "PerGroup",
                                           "PerHead", "PerTensor", "PerToken", "QSpec")},
    "lower": ("lower", "lower"),
    "export": ("export", "export"),
    "Recipe": ("recipe", "Recipe"),
}
# functions named like the submodule they live in: importing the submodule must not replace them
_SHADOWED = {name for name, (module, attr) in _EXPORTS.items() if module == name and attr is not None}


def _load() -> None:
    namespace = globals()
    for name, (module, attr) in _EXPORTS.items():
        mod = importlib.import_module(f"{__name__}.{module}")
        namespace[name] = mod if attr is None else getattr(mod, attr)


def __getattr__(name: str):
    if name in _EXPORTS:
        _load()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return                  # the import system binding submodule qpass.capture / qpass.lower
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
