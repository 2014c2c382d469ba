"""Suite-wide settings: one intra-op thread per test process (pytest-xdist runs one process per core;
more threads oversubscribe the cores and make tiny-model tests many times slower)."""
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts with one thread, whatever an earlier test in this process set."""
    torch.set_num_threads(1)
    yield
