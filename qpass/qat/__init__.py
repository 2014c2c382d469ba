"""Quantization-aware training, apart from the graph core: data generation by the float model (``datagen``),
the distillation trainer (``training``) and intermediate-output taps (``distill``). The ``qat`` pass
(``qpass.passes.qat``) drives them; nothing in the graph core imports this package."""
