"""``QpassORTModelForCausalLM``: optimum's ``ORTModelForCausalLM`` interface over a lowered directory, in qpass's
own environment (transformers 5).

optimum-onnx (0.1.0, the newest release, and its main branch as of April 2026) requires transformers < 4.58, and
it does not import on transformers 5 even when installed without its pins (``ImportError: cannot import name
'_CAN_RECORD_REGISTRY' from 'transformers.utils.generic'``). This class covers the part of it that runs a
decoder directory written by ``qpass.lower(qm, "onnx", dir)``:

    from qpass.backends.onnx_qdq import QpassORTModelForCausalLM
    model = QpassORTModelForCausalLM.from_pretrained("out/w4")
    out = model.generate(**tok(["a prompt", "another"], return_tensors="pt", padding=True), max_new_tokens=32)
    logits = model(input_ids).logits

``generate`` is transformers' own ``GenerationMixin.generate`` (greedy, sampling, top-k/top-p, beam search,
stopping criteria, streamers; left-padded batches through ``attention_mask``); ``forward`` takes and returns the
KV cache as a transformers ``Cache`` (``DynamicCache``) or as optimum's legacy tuple of ``(key, value)`` pairs.
The session applies the configuration recorded at lowering time (see ``runtime.session``), as
``onnx_qdq.generate`` does; optimum itself does not read it.

Not covered: exporting from PyTorch (``export=True``: lower with qpass), IO binding, the hub, models other than
decoder-only causal LMs. GenerationMixin is written for ``PreTrainedModel``; the few members it reads besides
``forward`` are provided here (``config``, ``generation_config``, ``device``, ``dtype``, ``main_input_name``,
``can_generate``, ``is_remote_code``, ``get_experts_implementation``), checked by tests/test_ort_model.py on the
pinned transformers.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, DynamicCache, GenerationConfig, GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from qpass.errors import ArtifactError

from .lower import verify
from .runtime import model_path, session

# transformers 5.25 renamed the cache argument and output field from past_key_values to cache (qpass/hf.py)
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class QpassORTModelForCausalLM(GenerationMixin):
    """A qpass ONNX decoder (past_key_values in, present out) run by onnxruntime, with transformers' generate()."""

    main_input_name = "input_ids"
    _is_stateful = False
    _supports_cache_class = True

    def __init__(self, sess, config, generation_config: GenerationConfig | None = None, *, use_cache: bool = True,
                 model_dir: str | None = None):
        self.session = sess
        self.config = config
        self.generation_config = generation_config or GenerationConfig.from_model_config(config)
        self.use_cache = use_cache
        self.model_dir = model_dir
        inputs = {i.name: i for i in sess.get_inputs()}
        self.input_names = list(inputs)
        self.output_names = [o.name for o in sess.get_outputs()]
        self.past_names = [n for n in self.input_names if n.startswith("past_key_values.")]
        if not self.past_names or "attention_mask" not in inputs or "logits" not in self.output_names:
            raise ArtifactError("this ONNX model is not a decoder with past_key_values inputs and present outputs",
                                fix="lower a Hugging Face causal LM with qpass.lower(qm, 'onnx', dir) (decoder=True)")
        self.num_layers = len(self.past_names) // 2
        first = inputs[self.past_names[0]]
        self.kv_heads, self.head_dim = first.shape[1], first.shape[3]
        self.kv_dtype = _NP_DTYPES.get(first.type, np.float32)
        self.device = torch.device("cpu")
        self.dtype = torch.from_numpy(np.zeros(0, self.kv_dtype)).dtype

    # ------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, model_id: "str | Path", *, file_name: str = "model.onnx", subfolder: str = "",
                        use_cache: bool = True, use_io_binding: bool | None = None, export: bool = False,
                        provider: str = "CPUExecutionProvider", providers: list | None = None,
                        provider_options: dict | None = None, session_options=None,
                        config=None, threads: int | None = None, **kwargs) -> "QpassORTModelForCausalLM":
        """Load a directory written by ``qpass.lower(qm, "onnx", dir)`` (optimum's keyword arguments where they
        apply). The recorded session configuration is applied to `session_options`. The files qpass.json seals
        are checked first (``lower.verify``): a damaged or edited one is an ArtifactError naming it."""
        if export:
            raise ArtifactError("export=True is not supported: QpassORTModelForCausalLM runs a directory qpass "
                                "lowered", fix="qpass.lower(qpass.apply(model, recipe), 'onnx', dir), or "
                                "QpassOnnxQuantizer.from_pretrained(model).quantize(save_dir=dir, recipe=...)")
        if use_io_binding:
            raise ArtifactError("use_io_binding=True is not supported (inputs and outputs go through numpy)",
                                fix="leave use_io_binding unset or False")
        if kwargs:
            raise TypeError(f"unsupported arguments: {', '.join(sorted(kwargs))}")
        directory = Path(model_id) / subfolder
        file = directory / file_name
        if not directory.is_dir() or not file.is_file():
            raise ArtifactError(f"{os.fspath(file)!r} does not exist",
                                fix="pass a local directory written by qpass.lower(qm, 'onnx', dir) (no hub download)")
        verify(directory)
        if config is None:
            try:
                config = AutoConfig.from_pretrained(directory)
            except (OSError, ValueError) as e:
                raise ArtifactError(f"cannot read {os.fspath(directory / 'config.json')!r}: "
                                    f"{str(e).splitlines()[0]}") from e
        try:
            gen = GenerationConfig.from_pretrained(directory)
        except OSError:               # no generation_config.json: derive it from config.json
            gen = GenerationConfig.from_model_config(config)
        sess = session(model_path(file), threads=threads, session_options=session_options,
                       providers=providers or [provider], provider_options=provider_options and [provider_options])
        return cls(sess, config, gen, use_cache=use_cache, model_dir=os.fspath(directory))

    # ---------------------------------------------------------------------------------------- step
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, past_key_values=None,
                use_cache: bool | None = None, return_dict: bool = True, output_attentions: bool = False,
                output_hidden_states: bool = False) -> CausalLMOutputWithPast:
        """One decoder step: logits of every input token and the grown cache. `cache` (or `past_key_values`)
        is a transformers ``Cache`` or a tuple of ``(key, value)`` per layer; the output cache has the same
        kind (a ``DynamicCache`` when none was given and use_cache is on)."""
        if output_attentions or output_hidden_states:
            raise ValueError("the ONNX decoder returns logits and the KV cache only (no attentions or hidden states)")
        use_cache = self.use_cache if use_cache is None else use_cache
        past_in = cache if cache is not None else past_key_values
        input_ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
        batch, t = input_ids.shape
        past = self._past_arrays(past_in, batch)
        past_len = next(iter(past.values())).shape[2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_len + t, dtype=torch.long)
        if attention_mask.shape != (batch, past_len + t):
            raise ValueError(f"attention_mask has shape {list(attention_mask.shape)}; with {past_len} cached and "
                             f"{t} new tokens it must be [{batch}, {past_len + t}]")
        if position_ids is None:     # left padding: positions count the real tokens only (optimum's rule)
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)[:, -t:]
        feeds = {"input_ids": input_ids.cpu().numpy().astype(np.int64),
                 "attention_mask": attention_mask.cpu().numpy().astype(np.int64),
                 "position_ids": position_ids.cpu().numpy().astype(np.int64), **past}
        outs = dict(zip(self.output_names, self.session.run(None, {k: v for k, v in feeds.items()
                                                                   if k in self.input_names})))
        logits = torch.from_numpy(outs["logits"])
        new_cache = None
        if use_cache:
            pairs = [(torch.from_numpy(outs[f"present.{i}.key"]), torch.from_numpy(outs[f"present.{i}.value"]))
                     for i in range(self.num_layers)]
            # a fresh full-length cache each step: a cache built from the config (sliding-window layers) would
            # drop entries the graph's own mask expects
            new_cache = tuple(pairs) if isinstance(past_in, (tuple, list)) else DynamicCache(ddp_cache_data=pairs)
        out = CausalLMOutputWithPast(logits=logits, **{_CACHE_FIELD: new_cache})
        return out if return_dict else out.to_tuple()

    def _past_arrays(self, past, batch: int) -> dict[str, np.ndarray]:
        length = 0 if past is None else (past.get_seq_length() if hasattr(past, "get_seq_length") else
                                         (past[0][0].shape[2] if len(past) else 0))
        if length == 0:
            empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
            return {n: empty for n in self.past_names}
        if hasattr(past, "layers"):
            pairs = [(layer.keys, layer.values) for layer in past.layers]
        else:
            pairs = list(past)
        if len(pairs) != self.num_layers:
            raise ValueError(f"the cache has {len(pairs)} layers; the model has {self.num_layers}")
        arrays = {}
        for i, (k, v) in enumerate(pairs):
            arrays[f"past_key_values.{i}.key"] = k.detach().cpu().numpy().astype(self.kv_dtype, copy=False)
            arrays[f"past_key_values.{i}.value"] = v.detach().cpu().numpy().astype(self.kv_dtype, copy=False)
        return arrays

    # ------------------------------------------------- what GenerationMixin reads from a PreTrainedModel
    @classmethod
    def can_generate(cls) -> bool:
        return True

    @classmethod
    def is_remote_code(cls) -> bool:
        return False

    def get_experts_implementation(self) -> dict:
        return {}                  # no mixture-of-experts kernels to switch

    def to(self, device):
        if torch.device(device).type != "cpu":
            raise ValueError("the onnxruntime session decides the device (providers=...); tensors stay on the CPU")
        return self

    def eval(self):
        return self

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.model_dir!r}, layers={self.num_layers}, "
                f"providers={self.session.get_providers()})")
