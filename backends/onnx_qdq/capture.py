"""The graph the ONNX backend exports: the quantized model as a decoder step with a growing KV cache.

optimum-onnx's decoder convention (what ``ORTModelForCausalLM`` runs):
    inputs   input_ids [batch, seq], attention_mask [batch, past + seq], position_ids [batch, seq],
             past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim]     (past may be 0)
    outputs  logits [batch, seq, vocab], present.{i}.key / .value [batch, kv_heads, past + seq, head_dim]

qpass's own decode graph (``QuantizedModel.decode_graph``) keeps a *static* cache in buffers; this one takes
the cache as inputs and returns it grown, so it is captured here with transformers' ``DynamicCache`` built
from the flat past tensors inside the step. The quantized model's plans are applied to that capture
(``qpass.plan.apply_plans``: no pass runs) and its tensors are loaded, as ``decode_graph`` does: same quantizers, same numbers.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.fx import GraphModule

from qpass.plan import apply_plans
from qpass.capture import is_hf_causal_lm
from qpass.errors import ArtifactError, CaptureError
from qpass.graph import META_CAPTURE, META_PREFIX
from qpass.hf import cache_kwargs, output_cache

_WRAP = "model"   # same attribute name as qpass.capture's wrapper, so parameter names and paths match


class DecoderStep(nn.Module):
    """``(input_ids, attention_mask, position_ids, ((k, v), ...)) -> (logits, ((k', v'), ...))``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        setattr(self, _WRAP, model)

    def forward(self, input_ids, attention_mask, position_ids, past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(k, v) for k, v in past])
        model = getattr(self, _WRAP)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    **cache_kwargs(model, cache), use_cache=True)
        return out.logits, tuple((layer.keys, layer.values) for layer in output_cache(out).layers)


def kv_layout(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of an HF config."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, kv, head_dim


def example_inputs(config, batch: int = 2, seq: int = 3, past: int = 4) -> tuple:
    layers, kv, hd = kv_layout(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(config.vocab_size), (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kvs = tuple((torch.randn(batch, kv, past, hd, generator=g), torch.randn(batch, kv, past, hd, generator=g))
                for _ in range(layers))
    return ids, mask, pos, kvs


def dynamic_shapes(n_layers: int) -> tuple:
    batch = torch.export.Dim("batch_size", min=1, max=4096)
    seq = torch.export.Dim("sequence_length", min=1, max=65536)
    past = torch.export.Dim("past_sequence_length", min=0, max=65536)
    kv = {0: batch, 2: past}
    return ({0: batch, 1: seq}, {0: batch, 1: torch.export.Dim.DYNAMIC}, {0: batch, 1: seq},
            tuple((dict(kv), dict(kv)) for _ in range(n_layers)))


def model_from_config(hf_config: dict) -> nn.Module:
    import transformers

    config = transformers.AutoConfig.for_model(**hf_config)
    with torch.device("cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()


def capture_step(qm) -> tuple[GraphModule, tuple, tuple]:
    """The quantized model `qm` as a DecoderStep graph: (graph, example inputs, dynamic shapes)."""
    if qm.source.get("hf_config") is None:
        raise ArtifactError(f"a decoder with past_key_values needs a Hugging Face causal LM; this is a "
                            f"{qm.source.get('model_class')}")
    model = model_from_config(qm.source["hf_config"])
    if not is_hf_causal_lm(model):
        raise CaptureError(f"{type(model).__name__} is not a Hugging Face causal LM")
    args, shapes = example_inputs(model.config), dynamic_shapes(model.config.num_hidden_layers)
    gen = copy.deepcopy(getattr(model, "generation_config", None))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*requires gradient.*")
            ep = torch.export.export(DecoderStep(model).eval(), args, dynamic_shapes=shapes, strict=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the cause chained
        raise CaptureError(f"cannot capture {type(model).__name__} as a decoder step with a dynamic KV cache: "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                           fix="use qpass.lower(qm, 'torch'), or report the architecture") from e
    finally:
        if gen is not None:
            model.generation_config = gen
    gm = ep.module()
    gm.meta[META_PREFIX] = f"{_WRAP}."
    gm.meta[META_CAPTURE] = {"hf": True, "model_class": type(model).__name__, "n_inputs": 4, "decode": True,
                             "dynamic_cache": True}
    apply_plans(gm, qm.plans)
    missing, unexpected = gm.load_state_dict(qm.graph_module.state_dict(), strict=False)
    if unexpected or missing:
        raise ArtifactError(f"the decoder-step graph does not match the quantized graph (missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]})", fix="report this as a qpass bug")
    return gm, args, shapes
