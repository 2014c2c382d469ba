"""qpass: quantize LLMs the way a compiler optimizes programs.

    import qpass
    qm = qpass.apply(model, "recipes/w8a8.yaml", calib_data=[input_ids])
    print(qm.report); qm(input_ids).logits; qm.save("out/"); qpass.load("out/")
    qpass.apply_from_disk("hf_model_dir/", "recipes/gptq_w4a16_g128.yaml", "out/", calib_data=[input_ids])

Saved directories (layout, digests, ``read`` to check one, ``load``) are ``qpass.artifacts``.

Import names: the repository folders ``qpass/`` (core), ``passes/`` and ``backends/`` install as
``qpass``, ``qpass.passes`` and ``qpass.backends``.
"""
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
from .lower import lower as lower
from .recipe import Recipe as Recipe
from .version import __version__ as __version__
