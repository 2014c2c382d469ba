"""``lower(qm, out_dir)``: a QuantizedModel -> an onnxruntime-ready ONNX directory.

Route: capture (decoder step with a growing KV cache, ``capture.py``) -> FX rewrite of the qpass quantizers
into ``qpass_onnx`` ops (``patterns.py``) -> ``torch.onnx.export(dynamo=True)`` with our translation table
(``translations.py``) and opset 21 -> onnx-ir post-passes (int4 initializers, I/O dimension names, metadata)
-> ``model.onnx`` (+ ``model.onnx_data`` over 2 GB), ``config.json``, tokenizer files, ``recipe.yaml``,
``qpass.json``. Everything is written into a temporary directory next to `out_dir` and renamed at the end.

qpass.json is sealed as a saved model's is (``qpass.artifacts``): ``files`` lists model.onnx (and model.onnx_data),
config.json and recipe.yaml with their size and SHA-256, ``seal`` is the SHA-256 of its format and that list.
``verify(dir)`` checks both before a session is built (``QpassORTModelForCausalLM.from_pretrained`` calls it);
the tokenizer files and qpass.json's other entries (versions, the lowering report, ``qpass lower``'s parity
figures) are outside the seal.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from qpass.artifacts import atomic_directory
from qpass.artifacts import file_digest, seal
from qpass.errors import ArtifactError, UnsupportedOpError
from qpass.version import __version__

from . import capture, patterns, side_channels
from .translations import ATTENTION_TABLE, TABLE

ONNX_NAMESPACES = ("aten", "prims", "qpass")   # ops torch.onnx or our translation table (TABLE) converts


def refuse_foreign_ops(gm) -> None:
    """UnsupportedOpError for the first node calling a custom op of another library (such as transformers'
    ``grouped_mm_fallback``, the MoE experts' grouped matmul), which torch.onnx has no translation for: named
    here before export instead of a ConversionError from inside torch.onnx."""
    from qpass.graph import describe

    for n in gm.graph.nodes:
        ns = getattr(n.target, "namespace", None) if n.op == "call_function" else None
        if ns is not None and ns not in ONNX_NAMESPACES and n.target not in TABLE:
            moe = " (mixture-of-experts experts)" if "grouped_mm" in str(n.target) else ""
            raise UnsupportedOpError(f"onnx_qdq cannot export {n.target}{moe}: torch.onnx has no translation for "
                                     f"this {ns}:: custom op", where=describe(gm, n),
                                     fix="use the torch backend (qpass.lower(qm, 'torch')) for this model")

log = logging.getLogger("qpass.onnx")
OPSET = 21
EXTERNAL_DATA_BYTES = 1_900_000_000      # protobuf's hard limit is 2 GiB; stay clear of it
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "generation_config.json",
                   "chat_template.jinja")
SESSION_CONFIG_KEY = "qpass.session_config"
META, FORMAT = "qpass.json", "qpass-onnx"
SEALED_FILES = ("model.onnx", "model.onnx_data", "config.json", "recipe.yaml")   # those a directory has
_AGAIN = "lower the model again (qpass.lower(qm, 'onnx', dir) or `qpass lower --backend onnx`)"


@dataclass
class OnnxArtifact:
    """What `lower` wrote: the directory, the per-linear lowering report and the I/O names."""

    path: str
    report: patterns.LoweringReport
    inputs: list[str]
    outputs: list[str]
    session_config: dict

    @property
    def model_path(self) -> str:
        return os.path.join(self.path, "model.onnx")


FUSED_ACCURACY_LEVEL = 4      # default session.qdq_matmulnbits_accuracy_level (measured: docs/onnx.md)
ACCURACY_LEVELS = {0: "exact: fp32 math on the dequantized weights, the fake-quant graph's numbers",
                   1: "fp32 math (measured: level 0's numbers bit for bit)",
                   2: "fp16 math where onnxruntime has a kernel for it (measured on an AVX-512 CPU: level 0's numbers)",
                   3: "bf16 math where onnxruntime has a kernel for it",
                   4: "int8 activations per block of K inside the kernel: fast; perplexity within noise of level 0 "
                      "on the bundled models (docs/onnx.md)"}


def describe_accuracy_level(level: int) -> str:
    """One line for a report: the weight-only MatMulNBits accuracy level and how to get the other one."""
    other = 0 if int(level) != 0 else FUSED_ACCURACY_LEVEL
    return (f"onnxruntime MatMulNBits accuracy level {level} for the weight-only linears: "
            f"{ACCURACY_LEVELS.get(int(level), '?')} (other choice: level {other}, "
            f"{'exact' if other == 0 else 'fast'}: `qpass lower --accuracy-level {other}` or "
            f"lower(..., fused_accuracy_level={other}))")


def lower(qm, out_dir: str | os.PathLike, *, w4a8: str = "matmulnbits", accuracy_level: int = 4,
          int8_weights: str = "u8", fused_accuracy_level: int = FUSED_ACCURACY_LEVEL, attention: str = "grouped",
          decoder: bool | None = None,
          external_data: bool | None = None, tokenizer_dir: str | os.PathLike | None = None,
          progress: Callable[[str], None] | None = None) -> OnnxArtifact:
    """Lower `qm` to ONNX in `out_dir` (created; an existing non-empty directory is an error).

    w4a8 / accuracy_level / int8_weights: see ``patterns.LowerOptions``. fused_accuracy_level: the
    ``session.qdq_matmulnbits_accuracy_level`` recorded for onnxruntime's DequantizeLinear+MatMul ->
    MatMulNBits fusion of weight-only linears (4, the default: int8 activations inside the kernel, fast, and
    onnxruntime's own default, so optimum runs the same; 0: exact w.r.t. the fake-quant graph, slower; the
    perplexity cost of 4 on the bundled models is within noise: docs/onnx.md). attention: "grouped" (default:
    attention over grouped K/V heads without repeated copies, ``translations.sdpa``) or "torch" (torch.onnx's
    own translation of scaled_dot_product_attention: K and V repeated per query head). decoder: export the KV-cache
    decoder step (default for Hugging Face models) or the plain graph. external_data: None = only above
    ~2 GB. tokenizer_dir: copy tokenizer / generation-config files from there.
    """
    say = progress or (lambda msg: log.info("%s", msg))
    if fused_accuracy_level not in ACCURACY_LEVELS or isinstance(fused_accuracy_level, bool):
        raise UnsupportedOpError(f"fused_accuracy_level must be one of 0..4, got {fused_accuracy_level!r}",
                                 fix="0: exact, 4: fast (the default)")
    opts = patterns.LowerOptions(w4a8=w4a8, accuracy_level=accuracy_level, int8_weights=int8_weights,
                                 fused_accuracy_level=fused_accuracy_level, attention=attention)
    out_dir = os.fspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ArtifactError(f"{out_dir!r} exists and is not empty", fix="choose a new directory")
    patterns.check_supported(qm.graph_module)
    refuse_foreign_ops(qm.graph_module)
    hf = qm.source.get("hf_config") is not None
    decoder = hf if decoder is None else decoder
    say("capturing the decoder step" if decoder else "preparing the graph")
    gm, args, shapes, inputs, outputs = _graph(qm, decoder)
    report = patterns.rewrite(gm.gm if isinstance(gm, _Logits) else gm, opts)   # HF graph without the decoder step
    say(f"lowered quantizers:\n{report}")
    if any(r.form.startswith("W") and "A16: DequantizeLinear + MatMul" in r.form for r in report.rows):
        say(describe_accuracy_level(fused_accuracy_level))
    if report.grouped_attention:
        say(f"attention over grouped K/V heads at {report.grouped_attention} SDPA call(s): K/V read in place, not "
            f"repeated per query head (other choice: `qpass lower --attention torch` or lower(..., "
            f"attention='torch'), torch.onnx's translation)")
    say("exporting to ONNX (torch.onnx, dynamo)")
    model = _export(gm, args, shapes, inputs, outputs, ATTENTION_TABLE if opts.attention == "grouped" else {})
    fold_int4_casts(model)
    session_config = {"session.qdq_matmulnbits_accuracy_level": str(fused_accuracy_level)}
    _annotate(model, qm, session_config, decoder)
    with atomic_directory(out_dir, prefix=".qpass-onnx-") as tmp:
        say("writing model.onnx, config, tokenizer, recipe and qpass.json")
        _save(model, tmp, external_data)
        _write_side_files(tmp, qm, report, inputs, outputs, session_config, opts, tokenizer_dir)
    return OnnxArtifact(out_dir, report, inputs, outputs, session_config)


# ------------------------------------------------------------------------------------------- graph


class _Logits(nn.Module):
    """The no-cache HF graph returns an output object: export its logits only."""

    def __init__(self, gm):
        super().__init__()
        self.gm = gm

    def forward(self, input_ids):
        return self.gm(input_ids).logits


def decoder_names(n_layers: int) -> tuple[list[str], list[str]]:
    kv = lambda stem: [f"{stem}.{i}.{t}" for i in range(n_layers) for t in ("key", "value")]  # noqa: E731
    return ["input_ids", "attention_mask", "position_ids", *kv("past_key_values")], ["logits", *kv("present")]


def _graph(qm, decoder: bool):
    if decoder:
        gm, args, shapes = capture.capture_step(qm)
        inputs, outputs = decoder_names(len(args[3]))
        return gm, args, shapes, inputs, outputs
    gm = copy.deepcopy(qm.graph_module)
    spec = qm.source.get("example_inputs")
    if qm.source.get("hf_config") is not None:
        vocab = int(qm.source["hf_config"]["vocab_size"])
        ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
        seq = {0: torch.export.Dim("batch_size", min=1), 1: torch.export.Dim("sequence_length", min=1)}
        wrapped = _Logits(gm)
        return wrapped, (ids,), ({"input_ids": seq},)[0], ["input_ids"], ["logits"]
    if spec is None:
        raise UnsupportedOpError("this QuantizedModel has no recorded example inputs to export with",
                                 fix="quantize it with qpass.apply(model, recipe, example_inputs=(x,))")
    args = tuple(torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"])) for s in spec)
    auto = torch.export.Dim.AUTO
    shapes = tuple({d: auto for d in range(a.dim())} for a in args)
    return gm, args, shapes, [f"input_{i}" for i in range(len(args))], ["output"]


def _export(gm, args, shapes, inputs, outputs, extra: dict):
    import warnings

    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)     # "torchvision is not installed" notes from the exporter's registry
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(gm, args, dynamo=True, dynamic_shapes=shapes, input_names=inputs,
                                        output_names=outputs, custom_translation_table={**TABLE, **extra,
                                                                          **side_channels.translation_table()},
                                        opset_version=OPSET,
                                        optimize=True, verbose=False)
    finally:
        quiet.setLevel(level)
    return program.model


# ------------------------------------------------------------------------------------- post-passes


def fold_int4_casts(model) -> int:
    """``Cast(int8 initializer, to=INT4/UINT4)`` -> an INT4/UINT4 initializer (packed two per byte on disk)."""
    import ml_dtypes
    import onnx_ir as ir

    targets = {ir.DataType.INT4: ml_dtypes.int4, ir.DataType.UINT4: ml_dtypes.uint4}
    graph, folded = model.graph, 0
    for node in list(graph):
        to = node.attributes.get("to")
        src = node.inputs[0] if node.op_type == "Cast" and node.inputs else None
        if src is None or to is None or ir.DataType(to.value) not in targets or not src.is_initializer():
            continue
        if len(src.uses()) != 1 or src.const_value is None:
            continue
        arr = src.const_value.numpy().astype(targets[ir.DataType(to.value)])
        name = src.name
        out = node.outputs[0]
        graph.remove(node, safe=False)
        graph.initializers.pop(name)
        new = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType(to.value)),
                       const_value=ir.tensor(arr, dtype=ir.DataType(to.value), name=name))
        graph.register_initializer(new)
        out.replace_all_uses_with(new)
        folded += 1
    return folded


def _annotate(model, qm, session_config: dict, decoder: bool) -> None:
    model.producer_name = "qpass"
    model.producer_version = __version__
    model.metadata_props["qpass.version"] = __version__
    model.metadata_props["qpass.recipe"] = qm.recipe.to_yaml()
    model.metadata_props[SESSION_CONFIG_KEY] = json.dumps(session_config)
    if decoder:
        _name_dims(model)


def _name_dims(model) -> None:
    """Dimension names of the optimum convention on the graph inputs and outputs."""
    import onnx_ir as ir

    names = {"input_ids": ("batch_size", "sequence_length"), "position_ids": ("batch_size", "sequence_length"),
             "attention_mask": ("batch_size", "total_sequence_length"),
             "logits": ("batch_size", "sequence_length", None)}
    for v in list(model.graph.inputs) + list(model.graph.outputs):
        dims = names.get(v.name)
        if v.name.startswith("past_key_values."):
            dims = ("batch_size", None, "past_sequence_length", None)
        elif v.name.startswith("present."):
            dims = ("batch_size", None, "total_sequence_length", None)
        if dims is None or v.shape is None:
            continue
        v.shape = ir.Shape([d if d is not None else old for d, old in zip(dims, v.shape)])


def _save(model, directory: str, external_data: bool | None) -> None:
    import onnx_ir as ir

    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    external = size > EXTERNAL_DATA_BYTES if external_data is None else external_data
    path = os.path.join(directory, "model.onnx")
    if external:
        ir.save(model, path, external_data="model.onnx_data", size_threshold_bytes=1024)
    else:
        ir.save(model, path)


def _write_side_files(directory: str, qm, report, inputs, outputs, session_config, opts, tokenizer_dir) -> None:
    import onnx
    import onnxruntime
    import onnxscript
    import transformers

    if qm.source.get("hf_config") is not None:
        cfg = dict(qm.source["hf_config"])
        cfg["use_cache"] = True
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
    with open(os.path.join(directory, "recipe.yaml"), "w") as f:
        f.write(qm.recipe.to_yaml())
    copied = []
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = os.path.join(os.fspath(tokenizer_dir), name)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(directory, name))
                copied.append(name)
    meta = {"format": "qpass-onnx", "qpass_version": __version__, "opset": OPSET,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                         "onnxscript": onnxscript.__version__},
            "inputs": inputs, "outputs": outputs, "session_config": session_config,
            "options": {"w4a8": opts.w4a8, "accuracy_level": opts.accuracy_level,
                        "int8_weights": opts.int8_weights, "attention": opts.attention,
                        "fused_accuracy_level": int(session_config["session.qdq_matmulnbits_accuracy_level"])},
            "lowering": [vars(r) for r in report.rows], "tokenizer_files": copied,
            "files": {name: file_digest(os.path.join(directory, name)) for name in SEALED_FILES
                      if os.path.isfile(os.path.join(directory, name))}}
    meta["seal"] = seal(meta)
    with open(os.path.join(directory, META), "w") as f:
        json.dump(meta, f, indent=2)


def verify(directory: str | os.PathLike) -> dict:
    """Check a directory written by ``lower`` before anything reads it: qpass.json is there and parses, its seal
    matches, and every file it lists has the recorded size and SHA-256. Returns qpass.json's object; anything
    wrong raises ArtifactError naming the file."""
    directory = os.fspath(directory)
    path = os.path.join(directory, META)
    if not os.path.isfile(path):
        raise ArtifactError(f"{directory!r} has no {META}: it was not written by qpass.lower(qm, 'onnx', dir)",
                            fix=f"pass a directory qpass lowered, or {_AGAIN}")
    try:
        with open(path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (ValueError, OSError) as e:
        raise ArtifactError(f"{path!r} is not readable JSON ({type(e).__name__}: {e})", fix=_AGAIN) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{path!r} is not the {META} of a lowered ONNX directory (format "
                            f"{meta.get('format') if isinstance(meta, dict) else None!r}, not {FORMAT!r})", fix=_AGAIN)
    files = meta.get("files")
    if "seal" not in meta and files is None:
        raise ArtifactError(f"{path!r} records no digests of the files (lowered by qpass {meta.get('qpass_version')}, "
                            "before lowered directories were sealed), so damage cannot be detected", fix=_AGAIN)
    if not isinstance(files, dict) or "model.onnx" not in files or not all(
            isinstance(d, dict) and isinstance(d.get("bytes"), int) and isinstance(d.get("sha256"), str)
            for d in files.values()):
        raise ArtifactError(f"{path!r} lacks or has a malformed 'files' list", fix=_AGAIN)
    if meta.get("seal") != seal(meta):
        raise ArtifactError(f"{path!r} was edited after lowering: its seal does not match its format and file list",
                            fix=f"undo the edit, or {_AGAIN}")
    fix = f"copy the file again from where it was lowered, or {_AGAIN}"
    for name, digest in files.items():
        file = os.path.join(directory, name)
        if os.path.basename(name) != name or not os.path.isfile(file):
            raise ArtifactError(f"{file!r} is missing ({META} lists it)", fix=f"copy the whole directory, or {_AGAIN}")
        if os.path.getsize(file) != digest["bytes"]:
            raise ArtifactError(f"{file!r} was changed after lowering: it is {os.path.getsize(file)} bytes, written "
                                f"as {digest['bytes']} (cut short, edited or replaced)", fix=fix)
    for name, digest in files.items():
        if file_digest(os.path.join(directory, name))["sha256"] != digest["sha256"]:
            raise ArtifactError(f"{os.path.join(directory, name)!r} was changed after lowering: its SHA-256 does not "
                                f"match {META}", fix=fix)
    return meta
