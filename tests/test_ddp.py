"""DistributedDataParallel on CPU: two gloo processes joined the way torchrun joins them."""

import socket
import time

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


# --------------------------------------------------------------------------- stop decisions


def _stop_worker(rank: int, world: int, port: int, result_dir: str) -> None:
    import os
    import types

    from vpdetect.errors import VPDetectError
    from vpdetect.train import loop
    from vpdetect.train.loop import fit, shutdown_distributed

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    # A clock of our own (this is a forked child): rank 0 passes its deadline exactly after
    # epoch 1, rank 1 never does, however loaded the machine is.
    now = [0.0]
    loop.time = types.SimpleNamespace(monotonic=lambda: now[0])
    info = init_distributed("cpu")
    volume = _volume()
    config = _config(batch_size=1)
    config.epochs, config.val_crops = 3, 0
    trainer = Trainer(config, CropDataset([volume], 8, seed=5), None, "cpu", info)

    def slow_end(record, improved):
        if rank == 0:
            now[0] += 10.0

    status = fit(trainer, on_epoch_end=slow_end, time_limit_s=1.0 if rank == 0 else 1000.0)
    result = {"status": status, "epoch": trainer.epoch}
    # A diverged loss on rank 1 only: both ranks must stop with the error.
    trainer.alpha = torch.tensor([float("nan")] * 2) if rank == 1 else None
    try:
        trainer.train_epoch()
        result["diverged"] = ""
    except VPDetectError as exc:
        result["diverged"] = str(exc)
    shutdown_distributed(info, finished=False)
    result["left_group"] = not dist.is_initialized()
    torch.save(result, f"{result_dir}/stop{rank}.pt")


def test_ranks_stop_together_on_the_time_limit_and_on_divergence(tmp_path):
    if not dist.is_gloo_available():
        pytest.skip("torch.distributed without gloo")
    # spawn, not fork: a child forked from a suite process whose OpenMP threads are running can
    # deadlock before it reaches the collective (seen as a "hang" in the full suite only).
    context = mp.start_processes(_stop_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:  # a hang: one rank waits in a collective alone
            for process in context.processes:
                process.kill()
            pytest.fail("distributed ranks did not stop together (hang)")
    results = [torch.load(tmp_path / f"stop{r}.pt", weights_only=True) for r in range(2)]
    assert [(r["status"], r["epoch"]) for r in results] == [("time limit", 1)] * 2
    assert "rank 1" in results[1]["diverged"] and "another process" in results[0]["diverged"]
    assert all(r["left_group"] for r in results)


@pytest.mark.parametrize(
    "spec, local_rank, cuda, gpus, expected",
    [
        ("auto", 1, True, 2, ("cuda:1", "nccl")),
        ("cuda", 1, True, 2, ("cuda:1", "nccl")),  # each process its own GPU
        ("auto", 1, False, 0, ("cpu", "gloo")),
        ("cpu", 0, True, 2, ("cpu", "gloo")),
    ],
)
def test_device_of_a_torchrun_process(spec, local_rank, cuda, gpus, expected):
    from vpdetect.train.loop import distributed_device

    assert distributed_device(spec, local_rank, cuda, gpus) == expected


def test_torchrun_refuses_one_gpu_for_every_rank_and_ranks_without_a_gpu():
    from vpdetect.errors import VPDetectError
    from vpdetect.train.loop import distributed_device

    with pytest.raises(VPDetectError, match="every process on one GPU"):
        distributed_device("cuda:0", 1, True, 2)  # was: gloo, all ranks on GPU 0
    with pytest.raises(VPDetectError, match="LOCAL_RANK 2 has no GPU"):
        distributed_device("cuda", 2, True, 2)
    with pytest.raises(VPDetectError, match="CUDA is not available"):
        distributed_device("cuda", 0, False, 0)
