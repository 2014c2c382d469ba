"""Packed PyTorch kernels backend (qpass.backends.torch_packed)."""
