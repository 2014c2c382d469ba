"""Worker for tests/test_qat.py: one QAT step under torchrun (gloo); rank 0 writes loss and gradients."""
import os
import sys

import safetensors.torch
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.test_qat import one_step  # noqa: E402

if __name__ == "__main__":
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    loss, grads = one_step()
    if dist.get_rank() == 0:
        safetensors.torch.save_file({"loss": torch.tensor([loss]), **grads}, sys.argv[1])
    dist.destroy_process_group()
