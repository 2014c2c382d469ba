"""Suite-wide settings: one intra-op thread per test process (pytest-xdist runs one process per core;
more threads oversubscribe the cores and make tiny-model tests many times slower)."""
import torch

torch.set_num_threads(1)
