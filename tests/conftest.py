import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _few_threads():
    # Keep the suite predictable on small CI machines.
    torch.set_num_threads(2)
    yield


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
