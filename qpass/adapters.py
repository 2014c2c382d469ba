"""LoRA adapters of a quantized model in the PEFT layout, which ``peft`` loads onto the float base model.

    qpass.adapters.save_peft(qm, "out/adapter")     # adapter_config.json + adapter_model.safetensors
    # then, with peft:  PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "out/adapter")

The adapters are those a ``lora`` pass inserted (``graph_module.meta["qpass_lora"]``: module path -> the names
of A, B and the scaling alpha / rank). Tensors are stored under PEFT's keys,
``base_model.model.<module path>.lora_A.weight`` ([r, in]) and ``...lora_B.weight`` ([out, r]); the config
names every adapted module by its full path (PEFT matches a target by its name), with ``rank_pattern`` /
``alpha_pattern`` when ranks differ between modules, and ``fan_in_fan_out`` for bases whose linears store
their weight [in, out] (GPT-2's Conv1D). PEFT applies the adapters to the float base: with a quantized base
the logits differ from qpass's by the base's quantization (the adapters are the same); with a float base
they are the same.

Written atomically (nothing is left behind on failure); no pickle.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch

from .artifacts import atomic_directory, write_safetensors
from .errors import ArtifactError
from .graph import linear_sites

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
META_LORA = "qpass_lora"     # graph_module.meta key the lora pass fills


def adapters(gm) -> Mapping[str, tuple[str, str, float]]:
    """{module path: (A parameter name, B parameter name, scaling)} of `gm`'s LoRA adapters."""
    return dict(gm.meta.get(META_LORA, {}))


def save_peft(qm, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> None:
    """Write the adapters of `qm` (a QuantizedModel whose recipe has a lora pass) in the PEFT layout."""
    gm = qm.graph_module
    ads = adapters(gm)
    if not ads:
        raise ArtifactError("this model has no LoRA adapters", fix="put a lora pass in the recipe (before qat with "
                            "trainable: lora) and apply it")
    tensors, ranks, alphas = {}, {}, {}
    for path, (a, b, scaling) in sorted(ads.items()):
        wa, wb = gm.get_parameter(a).detach(), gm.get_parameter(b).detach()
        tensors[f"base_model.model.{path}.lora_A.weight"] = wa.contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = wb.contiguous()
        ranks[path] = int(wa.shape[0])
        alphas[path] = float(scaling * wa.shape[0])
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    flipped = {s.path for s in linear_sites(gm) if s.path in ads and s.in_axis == 0}
    if flipped and len(flipped) != len(ads):
        raise ArtifactError("adapters sit on linears of both weight layouts ([out, in] and [in, out])",
                            fix="PEFT has one fan_in_fan_out flag per adapter: adapt one kind of linear")
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
           "target_modules": sorted(ads), "bias": "none", "fan_in_fan_out": bool(flipped), "inference_mode": True,
           "init_lora_weights": True, "modules_to_save": None, "use_rslora": False,
           "rank_pattern": {p: k for p, k in ranks.items() if k != r},
           "alpha_pattern": {p: k for p, k in alphas.items() if k != alpha},
           "base_model_name_or_path": base_model_name_or_path
           or (qm.source.get("hf_config") or {}).get("_name_or_path") or None}
    with atomic_directory(directory) as tmp:
        write_safetensors(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), {"format": "pt"})
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")


def adapter_state(gm) -> dict[str, torch.Tensor]:
    """The adapters as PEFT's state dict (keys as ``save_peft`` writes them)."""
    out = {}
    for path, (a, b, _) in sorted(adapters(gm).items()):
        out[f"base_model.model.{path}.lora_A.weight"] = gm.get_parameter(a).detach()
        out[f"base_model.model.{path}.lora_B.weight"] = gm.get_parameter(b).detach()
    return out


__all__ = ["save_peft", "adapters", "adapter_state", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]
