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


@pytest.fixture(autouse=True)
def _not_a_slurm_array_task(monkeypatch):
    # Batch commands take their shard from these; a test suite run inside an array job
    # must not see only part of its inputs.
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(name, raising=False)
