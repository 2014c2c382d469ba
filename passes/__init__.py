"""qpass passes: one pass per file; the recipe name of each is the key of PASSES.

The repository folder ``passes/`` is installed as the package ``qpass.passes``.
"""
from .awq import Awq, AwqConfig
from .bcq import Bcq, BcqConfig
from .fptq import Fptq, FptqConfig
from .gptq import Gptq, GptqConfig
from .mofq import Mofq, MofqConfig
from .lora import Lora, LoraConfig, LoraMerge, LoraMergeConfig
from .lorc import Lorc, LorcConfig
from .qat import Qat, QatConfig
from .kv_cache import KvCache, KvCacheConfig
from .llm_int8 import LlmInt8, LlmInt8Config
from .norm_tweak import NormTweak, NormTweakConfig
from .omniquant import OmniQuant, OmniQuantConfig
from .os_plus import OsPlus, OsPlusConfig
from .olive import Olive, OliveConfig
from .owq import Owq, OwqConfig
from .quip import Quip, QuipConfig
from .rotate import Rotate, RotateConfig
from .rptq import Rptq, RptqConfig
from .quantease import QuantEase, QuantEaseConfig
from .quantize import ObserverConfig, Quantize, QuantizeConfig
from .signround import SignRound, SignRoundConfig
from .squeezellm import SqueezeLlm, SqueezeLlmConfig
from .zeroquant import ZeroQuant, ZeroQuantConfig
from .smoothquant import SmoothQuant, SmoothQuantConfig
from .spqr import Spqr, SpqrConfig
from .spinquant import SpinQuant, SpinQuantConfig

# The one literal table of passes: recipe name -> (config class, pass class). No scanning.
PASSES = {
    "quantize": (QuantizeConfig, Quantize),
    "qat": (QatConfig, Qat),
    "smoothquant": (SmoothQuantConfig, SmoothQuant),
    "kv_cache": (KvCacheConfig, KvCache),
    "awq": (AwqConfig, Awq),
    "gptq": (GptqConfig, Gptq),
    "lora": (LoraConfig, Lora),
    "lora_merge": (LoraMergeConfig, LoraMerge),
    "owq": (OwqConfig, Owq),
    "llm_int8": (LlmInt8Config, LlmInt8),
    "os_plus": (OsPlusConfig, OsPlus),
    "rotate": (RotateConfig, Rotate),
    "spinquant": (SpinQuantConfig, SpinQuant),
    "quip": (QuipConfig, Quip),
    "quantease": (QuantEaseConfig, QuantEase),
    "lorc": (LorcConfig, Lorc),
    "signround": (SignRoundConfig, SignRound),
    "omniquant": (OmniQuantConfig, OmniQuant),
    "zeroquant": (ZeroQuantConfig, ZeroQuant),
    "norm_tweak": (NormTweakConfig, NormTweak),
    "squeezellm": (SqueezeLlmConfig, SqueezeLlm),
    "spqr": (SpqrConfig, Spqr),
    "bcq": (BcqConfig, Bcq),
    "rptq": (RptqConfig, Rptq),
    "fptq": (FptqConfig, Fptq),
    "mofq": (MofqConfig, Mofq),
    "olive": (OliveConfig, Olive),
}


def make_pass(config):
    """The pass object for a config instance."""
    return PASSES[type(config).name][1](config)


__all__ = ["PASSES", "make_pass", "Quantize", "QuantizeConfig", "ObserverConfig", "SmoothQuant", "SmoothQuantConfig",
           "Qat", "QatConfig", "KvCache", "KvCacheConfig", "Awq", "AwqConfig", "Gptq", "GptqConfig",
           "Lora", "LoraConfig", "LoraMerge", "LoraMergeConfig",
           "SignRound", "SignRoundConfig", "OmniQuant", "OmniQuantConfig", "ZeroQuant", "ZeroQuantConfig",
           "NormTweak", "NormTweakConfig",
           "OsPlus", "OsPlusConfig", "Rotate", "RotateConfig", "SpinQuant", "SpinQuantConfig", "Quip", "QuipConfig", "Owq", "OwqConfig", "LlmInt8", "LlmInt8Config",
           "QuantEase", "QuantEaseConfig", "Lorc", "LorcConfig",
           "SqueezeLlm", "SqueezeLlmConfig", "Spqr", "SpqrConfig", "Bcq", "BcqConfig", "Rptq", "RptqConfig", "Fptq", "FptqConfig", "Mofq", "MofqConfig", "Olive", "OliveConfig"]
