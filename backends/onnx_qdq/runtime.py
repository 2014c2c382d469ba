"""Run a lowered directory with onnxruntime: ``session(dir)``, ``generate(session_or_dir, input_ids, n)``.

``session`` applies the session configuration recorded at lowering time (``qpass.session_config`` in the
model's metadata: the accuracy level of onnxruntime's DequantizeLinear+MatMul -> MatMulNBits fusion, 4 by
default, 0 when lowered for exactness, in which case a W4A16 graph computes what the fake-quant graph computed);
``config`` overrides it per session. ``generate`` feeds the optimum-style decoder
(past_key_values in, present out) one step at a time through ``qpass.generate.generate``, the same loop as
``QuantizedModel.generate``: greedy by default, sampling with temperature / top-k.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from qpass.errors import ArtifactError
from qpass.generate import generate as _generate

from .lower import SESSION_CONFIG_KEY


def model_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    return os.path.join(path, "model.onnx") if os.path.isdir(path) else path


def session(path: str | os.PathLike, *, threads: int | None = None, config: dict | None = None,
            optimized_model_path: str | None = None, session_options=None, providers=None, provider_options=None):
    """An ``onnxruntime.InferenceSession`` (CPU unless `providers` names others) for a lowered directory or
    .onnx file. `config` entries override the recorded session configuration, which is added to
    `session_options` (an ``onnxruntime.SessionOptions``, optional) when given."""
    import onnx
    import onnxruntime as ort

    file = model_path(path)
    if not os.path.isfile(file):
        raise ArtifactError(f"{file!r} does not exist", fix="pass a directory written by qpass.lower(qm, 'onnx', dir)")
    meta = {p.key: p.value for p in onnx.load(file, load_external_data=False).metadata_props}
    entries = {**json.loads(meta.get(SESSION_CONFIG_KEY, "{}")), **(config or {})}
    so = session_options if session_options is not None else ort.SessionOptions()
    for key, value in entries.items():
        so.add_session_config_entry(key, str(value))
    if threads:
        so.intra_op_num_threads = threads
    if optimized_model_path:
        so.optimized_model_filepath = optimized_model_path
    return ort.InferenceSession(file, so, providers=providers or ["CPUExecutionProvider"],
                                provider_options=provider_options)


class DecoderRunner:
    """Holds the KV cache between calls: ``runner(input_ids, cache_position) -> logits`` (torch tensors)."""

    def __init__(self, sess):
        self.sess = sess
        self.past_names = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
        self.out_names = [o.name for o in sess.get_outputs()]
        shapes = {i.name: i.shape for i in sess.get_inputs()}
        if not self.past_names or "attention_mask" not in shapes:
            raise ArtifactError("this ONNX model has no past_key_values inputs (not a decoder with a KV cache)",
                                fix="lower a Hugging Face model with decoder=True (the default)")
        self.kv_heads, self.head_dim = shapes[self.past_names[0]][1], shapes[self.past_names[0]][3]
        self.past: dict[str, np.ndarray] = {}

    def reset(self, batch: int) -> None:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        self.past = {n: empty for n in self.past_names}

    def __call__(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        batch, t = input_ids.shape
        start = int(cache_position[0])
        if start == 0:
            self.reset(batch)
        feeds = {"input_ids": input_ids.numpy().astype(np.int64),
                 "attention_mask": np.ones((batch, start + t), dtype=np.int64),
                 "position_ids": np.broadcast_to(np.arange(start, start + t, dtype=np.int64), (batch, t)).copy(),
                 **self.past}
        outs = dict(zip(self.out_names, self.sess.run(None, feeds)))
        self.past = {n: outs[n.replace("past_key_values.", "present.")] for n in self.past_names}
        return torch.from_numpy(outs["logits"])


def generate(session_or_dir, input_ids: torch.Tensor, max_new_tokens: int = 32, *, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, seed: int | None = None,
             eos_token_id: int | None = None) -> torch.Tensor:
    """Greedy (or sampled) generation with onnxruntime; returns prompt + new tokens, [batch, T + new]."""
    sess = session(session_or_dir) if isinstance(session_or_dir, (str, os.PathLike)) else session_or_dir
    input_ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    return _generate(DecoderRunner(sess), input_ids, max_new_tokens, do_sample=do_sample, temperature=temperature,
                     top_k=top_k, seed=seed, eos_token_id=eos_token_id)


def logits(session_or_dir, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of a whole sequence (prefill with an empty cache, or the plain graph's only output)."""
    sess = session(session_or_dir) if isinstance(session_or_dir, (str, os.PathLike)) else session_or_dir
    input_ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    names = [i.name for i in sess.get_inputs()]
    if "attention_mask" not in names:
        return torch.from_numpy(sess.run(None, {names[0]: input_ids.numpy().astype(np.int64)})[0])
    return DecoderRunner(sess)(input_ids, torch.arange(input_ids.shape[1]))
