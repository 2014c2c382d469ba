"""Packed PyTorch kernels backend (``qpass.backends.torch_packed``): ``qpass.lower(qm, "torch")``.

Turns a fake-quantized graph into one that really holds low-bit weights (and, in decode graphs, a
low-bit KV cache) and runs the fastest kernel it has (torch's, or its own C kernel) per shape and batch size
on this machine:

    pm = qpass.lower(qm, "torch")            # or backends.torch_packed.lower(qm, kernels="exact")
    pm(input_ids).logits; pm.generate(prompt, 32); pm.save("out/"); load("out/")

Files: packing.py (bit packing, CPU int4pack and q4 layouts), linear.py (PackedLinear), kernels.py (kernel
table, measurement, plans), native.py (builds and loads our own C kernels, csrc/: the AVX2 int4 kernel and
the codebook lookup kernel), codebook.py (CodebookLinear: learned codebooks), ext.py (ExtLinear),
kv.py (PackedKVCache), patterns.py (what is lowered), lower.py (graph rewrite), model.py (PackedModel:
generate, save, load).
"""
from . import native
from .codebook import CodebookLinear
from .kernels import BUCKETS, KERNELS, TuneRecord, measure, tune
from .kv import PackedKVCache
from .linear import ActFormat, PackedLinear, WeightFormat
from .model import PackedModel, load, lower, machine

__all__ = ["lower", "load", "PackedModel", "PackedLinear", "PackedKVCache", "WeightFormat", "ActFormat", "CodebookLinear",
           "KERNELS", "BUCKETS", "TuneRecord", "measure", "tune", "machine"]
