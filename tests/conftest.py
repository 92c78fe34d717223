import pytest


@pytest.fixture
def one_thread():
    """One intra-op thread: bit-reproducible CPU kernels between a test and the subprocesses it
    starts, and two pytest-xdist workers sharing two cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
