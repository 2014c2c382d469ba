"""Worker for tests/test_qat.py: one QAT step under torchrun (gloo), DDP or FSDP2 (argv[2]); rank 0 writes the loss,
the gradients and the parameters after the step (gathered back into a plain module)."""
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
    parallel = sys.argv[2] if len(sys.argv) > 2 else "ddp"
    loss, grads, after = one_step(parallel=parallel)
    for p in after.values():
        assert type(p) is torch.Tensor, f"{parallel}: a parameter is still {type(p).__name__} after close"
    if dist.get_rank() == 0:
        safetensors.torch.save_file({"loss": torch.tensor([loss]), **{f"grad.{k}": v for k, v in grads.items()},
                                     **{f"after.{k}": v for k, v in after.items()}}, sys.argv[1])
    dist.destroy_process_group()
