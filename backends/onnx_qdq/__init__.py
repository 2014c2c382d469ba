"""ONNX QDQ backend (qpass.backends.onnx_qdq)."""
