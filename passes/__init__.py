"""qpass passes: one pass per file; the recipe name of each is the key of PASSES.

The repository folder ``passes/`` is installed as the package ``qpass.passes``.
"""
from .quantize import ObserverConfig, Quantize, QuantizeConfig

# The one literal table of passes: recipe name -> (config class, pass class). No scanning.
PASSES = {
    "quantize": (QuantizeConfig, Quantize),
}


def make_pass(config):
    """The pass object for a config instance."""
    return PASSES[type(config).name][1](config)


__all__ = ["PASSES", "make_pass", "Quantize", "QuantizeConfig", "ObserverConfig"]
