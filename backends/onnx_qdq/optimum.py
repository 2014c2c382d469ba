"""An optimum-style quantizer: ``QpassOnnxQuantizer.from_pretrained(model).quantize(save_dir=..., recipe=...)``.

It implements the interface of ``optimum.quantization_base.OptimumQuantizer`` (``from_pretrained(model_or_path,
file_name=None)`` and ``quantize(save_dir, file_prefix=None, **kwargs)``) without importing optimum: optimum's
ONNX Runtime package pins transformers < 5 and qpass runs on transformers 5. The directory it writes is the
one ``ORTModelForCausalLM.from_pretrained(save_dir)`` loads (``model.onnx`` with past_key_values inputs and
present outputs, ``config.json``, tokenizer files), plus ``recipe.yaml`` and ``qpass.json``.

    from qpass.backends.onnx_qdq import QpassOnnxQuantizer
    q = QpassOnnxQuantizer.from_pretrained("models/tiny-llama")
    q.quantize(save_dir="out/tiny-w4", recipe="recipes/w4a16_g128.yaml")
    # elsewhere, with optimum-onnx: ORTModelForCausalLM.from_pretrained("out/tiny-w4").generate(...)
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from qpass.errors import ArtifactError


class QpassOnnxQuantizer:
    """Quantize a Hugging Face causal LM with a qpass recipe and write an onnxruntime / optimum directory."""

    def __init__(self, model: nn.Module, model_dir: str | None = None):
        self.model = model
        self.model_dir = model_dir
        self.quantized = None       # the QuantizedModel of the last quantize() call (fake-quant reference)

    @classmethod
    def from_pretrained(cls, model_or_path: "str | Path | nn.Module", file_name: str | None = None,
                        **kwargs) -> "QpassOnnxQuantizer":
        """A Hugging Face model directory (or hub name, loaded with transformers) or a loaded model.
        `file_name` is accepted for interface compatibility (qpass starts from the PyTorch weights)."""
        if isinstance(model_or_path, nn.Module):
            return cls(model_or_path.eval(), getattr(model_or_path, "name_or_path", None))
        import transformers

        path = os.fspath(model_or_path)
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
        except (OSError, ValueError) as e:
            raise ArtifactError(f"cannot load a Hugging Face causal LM from {path!r}: {str(e).splitlines()[0]}",
                                fix="pass a directory with config.json and weights (save_pretrained)") from e
        return cls(model.eval(), path if os.path.isdir(path) else None)

    def quantize(self, save_dir: "str | Path", file_prefix: str | None = None, *, recipe,
                 calib_data: Iterable | None = None, **lower_options) -> Path:
        """Run `recipe` (a Recipe, dict or YAML path) with `calib_data` (token-id tensors, or strings when the
        model directory has a tokenizer) and lower to ONNX in `save_dir`. `file_prefix` must be None or
        "model" (optimum's decoder loader looks for model.onnx). Returns the directory."""
        import qpass

        if file_prefix not in (None, "model"):
            raise ArtifactError(f"file_prefix {file_prefix!r} is not supported: the decoder is written as model.onnx")
        calib = None if calib_data is None else [self._tokens(x) for x in calib_data]
        qm = qpass.apply(self.model, recipe, calib_data=calib, progress=lower_options.pop("progress_bar", True))
        self.quantized = qm
        lower_options.setdefault("tokenizer_dir", self.model_dir)
        qpass.lower(qm, "onnx", save_dir, **lower_options)
        return Path(save_dir)

    def _tokens(self, x):
        if not isinstance(x, str):
            return x
        if self.model_dir is None:
            raise ArtifactError("calibration texts need a tokenizer, and this model has no directory to load it from",
                                fix="pass token-id tensors as calib_data")
        import transformers

        tok = self.__dict__.get("_tok") or transformers.AutoTokenizer.from_pretrained(self.model_dir)
        self.__dict__["_tok"] = tok
        return tok(x, return_tensors="pt").input_ids
