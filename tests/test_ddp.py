"""DistributedDataParallel on CPU: two gloo processes joined the way torchrun joins them."""

import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_train import _one_thread  # noqa: F401  autouse: one torch thread per process here too

from vpdetect.train.data import CropDataset, TrainingVolume
from vpdetect.train.loop import DistInfo, TrainConfig, Trainer, init_distributed


def _volume() -> TrainingVolume:
    rng = np.random.default_rng(0)
    targets = np.zeros((16, 16, 16), np.int16)
    targets[4:9, 4:9, 4:9] = 1
    targets[9:14, 8:13, 2:7] = 1
    volume = (targets + rng.normal(0, 0.3, targets.shape)).astype(np.float32)
    return TrainingVolume(
        name="t", volume=volume, mean=float(volume.mean()), std=float(volume.std()), targets=targets,
        centres_zyx=np.array([[6, 6, 6], [11, 10, 4]]), centre_classes=np.array([1, 1]),
    )


def _config(batch_size: int) -> TrainConfig:
    return TrainConfig(width=2, depth=3, max_dilation=2, crop_size=8, batch_size=batch_size, epochs=1,
                       steps_per_epoch=1, lr=1e-2, val_crops=4, seed=5, class_names=["background", "particle"])


def _worker(rank: int, world: int, port: int, result_dir: str) -> None:
    import os

    # The environment torchrun gives each process.
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    assert (info.rank, info.world) == (rank, world)
    volume = _volume()
    trainer = Trainer(_config(batch_size=2), CropDataset([volume], 8, seed=5),
                      CropDataset([volume], 8, seed=5, augment=False, stream=1), "cpu", info)
    initial = torch.cat([p.detach().flatten() for p in trainer.model.parameters()]).clone()
    loss = trainer.train_epoch()
    metrics = trainer.validate()
    weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    torch.save({"initial": initial, "weights": weights, "loss": loss, "metrics": metrics},
               f"{result_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    if not dist.is_gloo_available():
        pytest.skip("torch.distributed without gloo")
    out = tmp_path_factory.mktemp("ddp")
    # fork: the children need not re-import torch and the test module (seconds each).
    mp.start_processes(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="fork")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_both_ranks_hold_identical_weights_after_a_step(ddp_results):
    a, b = ddp_results
    assert torch.equal(a["initial"], b["initial"])
    assert torch.equal(a["weights"], b["weights"])
    assert not torch.equal(a["weights"], a["initial"])
    # Logged numbers are all-reduced, so every rank reports the same.
    assert a["loss"] == b["loss"]
    assert a["metrics"] == b["metrics"]


def test_ddp_step_equals_one_process_on_the_union_of_the_shards(ddp_results):
    # Rank r takes crops r, r+2, ...; DDP averages the two ranks' gradients, which is the
    # gradient of the mean loss over all four crops: one process with batch 4 must agree.
    volume = _volume()
    single = Trainer(_config(batch_size=4), CropDataset([volume], 8, seed=5),
                     CropDataset([volume], 8, seed=5, augment=False, stream=1), "cpu", DistInfo())
    single.train_epoch()
    weights = torch.cat([p.detach().flatten() for p in single.model.parameters()])
    assert torch.allclose(weights, ddp_results[0]["weights"], atol=1e-6, rtol=1e-5)
    assert single.validate() == pytest.approx(ddp_results[0]["metrics"], rel=1e-5)
