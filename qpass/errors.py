"""Every exception qpass raises.

Messages have three parts a user can act on: what happened, where (a recipe path, a node and module
name, a source line) and how to fix it.

    QpassError ─┬─ RecipeError          message starts with the recipe path, e.g. passes[0].quantize.weights.bits
                ├─ CaptureError         torch.export could not trace the model
                ├─ TargetNotFoundError  a module-path glob matched nothing; lists the closest names
                ├─ QuantizationError    bad tensors or specs given to the numeric primitives
                ├─ CalibrationError     calibration data missing, malformed or not usable
                ├─ PassError            "<pass> failed after [...]"; chains the cause
                ├─ UnsupportedOpError   a backend cannot lower a node
                └─ ArtifactError        a saved model directory cannot be loaded as saved: a file missing, damaged
                                        or edited (size, SHA-256 or seal mismatch; names the file), an old
                                        format or another version, or tensors that do not fit the rebuilt graph
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class QpassError(Exception):
    """Base class of every error qpass raises on purpose."""


def _fix(fix: str | None) -> str:
    return f"\n  fix: {fix}" if fix else ""


class RecipeError(QpassError, ValueError):
    """A recipe is malformed. `path` is where in the recipe (``passes[0].quantize.weights.bits``)."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.reason = message
        super().__init__(f"{path}: {message}" if path else message)


class CaptureError(QpassError):
    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message + _fix(fix))


class TargetNotFoundError(QpassError):
    def __init__(self, where: str, pattern: str, candidates: Iterable[str]):
        self.where = where        # the recipe path of the glob, e.g. passes[0].quantize.targets[1]
        names = sorted(set(candidates))
        close = suggest(pattern, names, n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        sample = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
        super().__init__(
            f"{where}: pattern {pattern!r} matches no module{hint}\n"
            f"  known module paths: {sample or '(none)'}"
            + _fix("use a glob over the module paths above, e.g. 'model.layers.*.mlp.*'")
        )


class QuantizationError(QpassError, ValueError):
    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message + _fix(fix))


class CalibrationError(QpassError):
    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message + _fix(fix))


class PassError(QpassError):
    def __init__(self, pass_name: str, before: list[str], cause: BaseException):
        self.pass_name = pass_name
        self.before = list(before)
        super().__init__(f"{pass_name} failed after {self.before}: {type(cause).__name__}: {cause}")


class UnsupportedOpError(QpassError):
    def __init__(self, message: str, where: str = "", fix: str | None = None):
        super().__init__(message + (f"\n  at {where}" if where else "") + _fix(fix))


class ArtifactError(QpassError):
    """A saved model directory (qpass.artifacts, PackedModel.save) cannot be loaded as it was saved: a file is
    missing, damaged or edited (its size, SHA-256 or the qpass.json seal does not match), it has an old format,
    or its tensors do not fit the graph rebuilt from its recipe. The message names the file and ends with a fix."""

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message + _fix(fix))


def suggest(word: str, choices: Iterable[str], n: int = 1) -> list[str]:
    """Closest spellings of `word` among `choices` (for did-you-mean hints)."""
    return difflib.get_close_matches(str(word), list(choices), n=n, cutoff=0.5)
