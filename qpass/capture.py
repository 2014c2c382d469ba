"""Capture: a model -> an aten-level ``torch.fx.GraphModule`` via ``torch.export.export(strict=False)``.

Hugging Face causal LMs are exported through a one-line wrapper so the graph is called like the model with
positional token ids (``gm(input_ids)`` returns the model's output object, with ``.logits``), with
``use_cache=False`` baked in and dynamic batch and sequence dimensions. The wrapper's attribute prefix is
recorded in ``gm.meta[META_PREFIX]`` so module paths read like the model's own
(``model.layers.0.self_attn.k_proj``, ``lm_head``).
"""
from __future__ import annotations

import copy
import logging
import os
import traceback

import torch
from torch import nn
from torch.fx import GraphModule

from .errors import CaptureError
from .graph import META_CAPTURE, META_PREFIX

log = logging.getLogger("qpass.capture")
_WRAP = "model"  # attribute under which the HF model sits in the wrapper; stripped from module paths


class _CausalLM(nn.Module):
    """Fixes the call convention for export: positional token ids, no KV cache."""

    def __init__(self, model: nn.Module):
        super().__init__()
        setattr(self, _WRAP, model)

    def forward(self, input_ids):
        return getattr(self, _WRAP)(input_ids=input_ids, use_cache=False)


def is_hf_causal_lm(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return cfg is not None and hasattr(cfg, "vocab_size") and hasattr(model, "get_output_embeddings")


def default_example_inputs(model: nn.Module, batch: int = 2, seq: int = 8) -> tuple[torch.Tensor]:
    """Random token ids from the model's vocabulary (sizes > 1: export specializes on 0 and 1)."""
    vocab = int(model.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    return (torch.randint(0, vocab, (batch, seq), generator=g).to(device),)


def capture(model: nn.Module, example_inputs: tuple | None = None, *, dynamic_shapes=None) -> GraphModule:
    """Export `model` to an aten-level GraphModule with dynamic batch (and sequence) dimensions.

    For HF causal LMs `example_inputs` defaults to random token ids; the result is called as
    ``gm(input_ids)``. Other modules need `example_inputs`; by default dim 0 of every tensor input is
    dynamic (batch), and dim 1 too for integer [batch, seq] inputs and rank >= 3 inputs (sequence).
    Pass `dynamic_shapes` (torch.export's format) to override.

    The sequence length ranges up to the config's maximum positions (``max_position_embeddings``,
    ``n_positions``, ``max_seq_len``, ...). When export refuses that range because the model's code treats the
    longest sequence separately (MPT slices its ALiBi table with ``table[max(0, N - seq):]``, a no-op at
    seq == N), the capture is retried once with one position less and ``gm.meta["qpass_capture"]["seq_note"]``
    says so; a model whose code fixes the length raises a CaptureError naming the guards.
    """
    if isinstance(model, GraphModule) and META_CAPTURE in model.meta:
        return model
    hf = is_hf_causal_lm(model)
    if example_inputs is None:
        if not hf:
            raise CaptureError(f"{type(model).__name__} is not a Hugging Face causal LM, so qpass cannot make "
                               "example inputs for it", fix="pass example_inputs=(tensor, ...)")
        example_inputs = default_example_inputs(model)
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    root = _CausalLM(model) if hf else model
    default_shapes = dynamic_shapes is None
    max_seq = max_positions(model)
    if default_shapes:
        dynamic_shapes = _default_dynamic_shapes(example_inputs, hf, model, max_seq)
    was_training = model.training
    model.eval()
    note = None
    try:
        try:
            ep = torch.export.export(root, example_inputs, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as e:  # noqa: BLE001 - retried once below, else re-raised as CaptureError
            if not (default_shapes and _seq_constraint_violated(e) and max_seq > 2):
                raise
            # A position table of max_seq rows sliced with table[max(0, max_seq - seq):] (MPT's ALiBi bias)
            # is a no-op slice at seq == max_seq and a real one below it: two graphs, and export refuses a
            # range that holds both. One position less keeps one graph for every shorter sequence.
            log.info("capture %s: %s; retrying with seq <= %d", type(model).__name__,
                     str(e).strip().splitlines()[0], max_seq - 1)
            try:
                ep = torch.export.export(root, example_inputs, dynamic_shapes=_default_dynamic_shapes(
                    example_inputs, hf, model, max_seq - 1), strict=False)
            except Exception:  # noqa: BLE001 - the first failure is the one to report
                raise _seq_capture_error(model, e, max_seq) from e
            note = (f"sequences of at most {max_seq - 1} tokens: the model's code specialises a sequence of "
                    f"exactly {max_seq} (its maximum positions) into a separate graph")
            log.warning("captured %s for %s", type(model).__name__, note)
    except CaptureError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised as CaptureError with the cause chained
        raise _capture_error(model, e) from e
    finally:
        model.train(was_training)
    gm = ep.module()
    gm.meta[META_PREFIX] = f"{_WRAP}." if hf else ""
    gm.meta[META_CAPTURE] = {"hf": hf, "model_class": type(model).__name__,
                             "n_inputs": len(example_inputs)}
    if note:
        gm.meta[META_CAPTURE]["seq_note"] = note
    log.info("captured %s: %d nodes", type(model).__name__, len(gm.graph.nodes))
    return gm


# the names Hugging Face configs give their maximum sequence length (GPT-2's n_positions is also mapped to
# max_position_embeddings; MPT has max_seq_len only, ChatGLM seq_length)
_MAX_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx",
                      "max_sequence_length")


def max_positions(model: nn.Module, default: int = 4096) -> int:
    """The longest sequence the model's config allows (`default` when it names none)."""
    cfg = getattr(model, "config", None)
    for key in _MAX_POSITION_KEYS:
        value = getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def _default_dynamic_shapes(example_inputs: tuple, hf: bool, model: nn.Module, max_seq: int | None = None):
    max_seq = max_positions(model) if max_seq is None else max_seq
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=max(2, max_seq))
    if hf:
        return {"input_ids": {0: batch, 1: seq}}
    specs = []
    for x in example_inputs:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            specs.append(None)
            continue
        dims = {0: batch}
        if x.dim() >= 3 or (x.dim() == 2 and not x.is_floating_point()):
            dims[1] = seq
        specs.append(dims)
    return tuple(specs)


def _capture_error(model: nn.Module, e: Exception) -> CaptureError:
    reason = "\n    ".join(str(e).strip().splitlines()[:6]) or type(e).__name__
    where = _user_frame(e)
    return CaptureError(
        f"cannot capture {type(model).__name__} with torch.export (strict=False)\n"
        f"  reason: {type(e).__name__}: {reason}\n  at: {where}",
        fix="make the flagged code export-friendly (no data-dependent Python control flow or .item() on "
            "tensors), or pass example_inputs/dynamic_shapes that match how the model is called")


def _seq_constraint_violated(e: BaseException) -> bool:
    """torch.export refused the dynamic sequence range: the model's code added a guard on it."""
    text = str(e)
    return "Constraints violated" in text and "seq" in text.split("!")[0]


def _seq_capture_error(model: nn.Module, e: Exception, max_seq: int) -> CaptureError:
    lines = str(e).splitlines()
    guards = [ln.strip(" -").split(". If you")[0] for ln in lines if ln.startswith("  - ")][:3]
    if "Suggested fixes:" in lines:    # torch's own suggestion, e.g. "seq = 8" (a constant length)
        fixes = [ln.strip() for ln in lines[lines.index("Suggested fixes:") + 1:] if ln.startswith("  ")][:2]
        guards.append("torch suggests: " + "; ".join(fixes))
    return CaptureError(
        f"cannot capture {type(model).__name__} with a dynamic sequence length: its code fixes or bounds the "
        f"sequence length by guards torch.export cannot keep for every length up to {max_seq} (also tried "
        f"{max_seq - 1})\n  reason: " + ("\n    ".join(guards) or str(e).splitlines()[0]),
        fix="pass dynamic_shapes with the range the model supports (torch.export.Dim('seq', min=..., max=...)), "
            "or example_inputs of the calibration length with dynamic_shapes={'input_ids': {0: "
            "torch.export.Dim('batch')}} for a fixed sequence length")


def _user_frame(e: BaseException) -> str:
    """The innermost traceback frame outside torch and qpass: the model's own line that failed."""
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.dirname(os.path.abspath(__file__))
    best = None
    for fr in traceback.extract_tb(e.__traceback__):
        if not fr.filename.startswith((torch_dir, here)) and "<" not in fr.filename:
            best = fr
    if best is None:
        return "(no model source line in the traceback)"
    return f"{best.filename}:{best.lineno} in {best.name}: {(best.line or '').strip()}"


def _export_decode(wrapper_cls, model: nn.Module, batch_size: int, max_cache_len: int) -> GraphModule:
    import warnings

    root = wrapper_cls(model, batch_size=batch_size, max_cache_len=max_cache_len)
    root.qpass_max_cache_len = max_cache_len
    seq = torch.export.Dim("seq", min=1, max=max(2, max_cache_len - 1))
    ids = torch.zeros((batch_size, 4), dtype=torch.long, device=next(model.parameters()).device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*requires gradient.*")   # cache tensors, not params
        ep = torch.export.export(root, (), {"input_ids": ids, "cache_position": torch.arange(4)},
                                 dynamic_shapes={"input_ids": {1: seq}, "cache_position": {0: seq}},
                                 strict=False)
        return ep.module()


def _explicit_positions_wrapper(base):
    """`base` (transformers' static-cache export wrapper) calling the model with position_ids = cache_position and
    an all-ones padding mask over the whole static cache (future positions are masked by the causal mask)."""

    class ExplicitPositions(base):
        def forward(self, input_ids=None, inputs_embeds=None, cache_position=None):
            for layer in self.static_cache.layers:
                layer.cumulative_length.copy_(cache_position[0])
            b = (input_ids if input_ids is not None else inputs_embeds).shape[0]
            outs = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds,
                              attention_mask=torch.ones(b, self.qpass_max_cache_len, dtype=torch.long,
                                                        device=cache_position.device),
                              position_ids=cache_position.unsqueeze(0).expand(b, -1), cache=self.static_cache,
                              use_cache=True)
            return outs.logits if hasattr(outs, "logits") else outs.last_hidden_state

    return ExplicitPositions


def _data_dependent(e: BaseException) -> bool:
    text = "".join(traceback.format_exception_only(type(e), e)) + repr(e.__cause__ or "")
    return any(k in text for k in ("aten.item", "data-dependent", "DataDependent", "GuardOnDataDependent"))


def _takes(model: nn.Module, *names: str) -> bool:
    import inspect

    params = inspect.signature(model.forward).parameters
    return all(n in params for n in names) or any(p.kind is p.VAR_KEYWORD for p in params.values())


def capture_decode(model: nn.Module, *, max_cache_len: int, batch_size: int = 1) -> GraphModule:
    """Export an HF causal LM's step with a static KV cache: ``gm(input_ids, cache_position) -> logits``.

    One graph serves prefill (``input_ids`` [batch, T], ``cache_position`` = arange(p, p + T)) and decode
    (T = 1); the cache lives in the graph's buffers ``key_cache_{i}`` / ``value_cache_{i}`` ([batch,
    kv_heads, max_cache_len, head_dim]) and is written with ``index_copy_`` at ``cache_position``.
    Positions past the current one are masked, so a new generation simply starts again at position 0.
    The batch size is fixed at export time (static cache).
    """
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    if not is_hf_causal_lm(model):
        raise CaptureError(f"{type(model).__name__} is not a Hugging Face causal LM; decode graphs need one")
    gen = copy.deepcopy(model.generation_config)
    model.generation_config.use_cache = True
    model.generation_config.cache_implementation = "static"
    was_training = model.training
    model.eval()
    explicit = False
    try:
        try:
            gm = _export_decode(TorchExportableModuleWithStaticCache, model, batch_size, max_cache_len)
        except Exception as e:  # noqa: BLE001 - retried with explicit positions, else re-raised below
            if not (_data_dependent(e) and _takes(model, "position_ids", "attention_mask")):
                raise
            # models that derive positions from the cache length in Python (OPT: position_ids[:, past:]) trace a
            # data-dependent slice; given positions (= cache_position) and an all-ones padding mask they do not
            log.info("decode capture of %s: positions derived from the cache length are data-dependent; "
                     "retrying with explicit position_ids and attention mask (%s)", type(model).__name__, e)
            gm = _export_decode(_explicit_positions_wrapper(TorchExportableModuleWithStaticCache), model,
                                batch_size, max_cache_len)
            explicit = True
    except CaptureError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised as CaptureError with the cause chained
        raise _capture_error(model, e) from e
    finally:
        model.generation_config = gen
        model.train(was_training)
    gm.meta[META_PREFIX] = f"{_WRAP}."
    gm.meta[META_CAPTURE] = {"hf": True, "model_class": type(model).__name__, "n_inputs": 2, "decode": True,
                             "max_cache_len": max_cache_len, "batch_size": batch_size, "explicit_positions": explicit}
    return gm
