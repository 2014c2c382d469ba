"""ONNX QDQ backend (qpass.backends.onnx_qdq): a QuantizedModel -> onnxruntime-ready ONNX.

    qpass.lower(qm, "onnx", "out/")            # model.onnx (+ data), config.json, recipe.yaml, qpass.json
    from qpass.backends import onnx_qdq
    onnx_qdq.generate("out/", input_ids, 32)  # incremental decoding with onnxruntime (past_key_values)

Integer weights are real INT4/INT8 initializers behind DequantizeLinear (opset 21, ``block_size`` for groups);
onnxruntime fuses them into com.microsoft.MatMulNBits; W8A8 with per-token activations becomes
MatMulIntegerToFloat; W4A8 is emitted as MatMulNBits with accuracy_level 4. See docs/onnx.md.
``QpassORTModelForCausalLM.from_pretrained(dir)`` offers optimum's ORTModelForCausalLM interface with
transformers' generate() (imported on first use: it needs transformers).
"""
from .lower import OnnxArtifact as OnnxArtifact
from .lower import lower as lower
from .optimum import QpassOnnxQuantizer as QpassOnnxQuantizer
from .patterns import LowerOptions as LowerOptions
from .runtime import generate as generate
from .runtime import logits as logits
from .runtime import session as session


def __getattr__(name: str):
    if name == "QpassORTModelForCausalLM":
        from .modeling import QpassORTModelForCausalLM

        return QpassORTModelForCausalLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
