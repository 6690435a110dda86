"""The cluster scripts in examples/, run with plain bash and the Slurm array variables set by hand."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_robustness import tiny_model

from vpdetect.io.mrc import write_mrc

ROOT = Path(__file__).resolve().parents[1]
VPDETECT = Path(sys.executable).with_name("vpdetect")
# The tests set the Slurm variables they need; none may leak in from a real job running them.
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


@pytest.fixture
def picking(tmp_path):
    rng = np.random.default_rng(11)
    tomos = tmp_path / "tomos"
    tomos.mkdir()
    for name in ("TS_02", "TS_01"):
        write_mrc(tomos / f"{name}.mrc", rng.normal(size=(20, 20, 20)).astype(np.float32), voxel_size=10.0)
    env = dict(
        CLEAN_ENV,
        VPDETECT=str(VPDETECT),
        LOCALIZER=str(tiny_model(tmp_path / "localizer.pt", "localizer", 2)),
        CLASSIFIER=str(tiny_model(tmp_path / "classifier.pt", "classifier", 3)),
        DEVICE="cpu",
        PICK_ARGS="--tile 16 --min-size 2",
        SLURM_ARRAY_TASK_COUNT="2",
        OMP_NUM_THREADS="1",
    )
    return tmp_path, tomos, env


def run_script(env, *args, task: int):
    return subprocess.run(
        ["bash", str(ROOT / "examples" / "slurm_pick.sh"), *map(str, args)],
        env=dict(env, SLURM_ARRAY_TASK_ID=str(task)), capture_output=True, text=True, timeout=300,
    )


@pytest.mark.skipif(not VPDETECT.exists() or shutil.which("bash") is None, reason="needs bash and vpdetect")
def test_slurm_pick_script_takes_its_shard_and_resumes(picking):
    tmp_path, tomos, env = picking
    out = tmp_path / "picks"
    first = run_script(env, tomos / "*.mrc", out, task=0)
    assert first.returncode == 0, first.stderr
    # Task 0 of 2 takes the first of the sorted tomograms only.
    assert sorted(p.name for p in out.glob("TS_*")) == ["TS_01.star", "TS_01.star.json"]
    record = json.loads((out / "TS_01.star.json").read_text())
    assert record["command"] == "pick" and set(record["models"]) == {"localizer", "classifier"}
    assert record["parameters"]["tile"] == 16 and record["device"] == "cpu"
    assert (out / "logs" / "pick_0.log").is_file()

    # The same task again (a resubmitted array): nothing left to do for it.
    again = run_script(env, tomos / "*.mrc", out, task=0)
    assert again.returncode == 0, again.stderr
    assert "skipped" in again.stderr and json.loads((out / "TS_01.star.json").read_text()) == record

    # Task 1 reads a list file instead of a glob and does the other tomogram.
    listing = tmp_path / "tomograms.txt"
    listing.write_text(f"# two tomograms\n{tomos / 'TS_02.mrc'}\n\n{tomos / 'TS_01.mrc'}\n")
    second = run_script(env, listing, out, task=1)
    assert second.returncode == 0, second.stderr
    assert sorted(p.name for p in out.glob("TS_*")) == [
        "TS_01.star", "TS_01.star.json", "TS_02.star", "TS_02.star.json",
    ]


def test_slurm_pick_script_refuses_to_run_outside_an_array(picking):
    tmp_path, tomos, env = picking
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    done = subprocess.run(
        ["bash", str(ROOT / "examples" / "slurm_pick.sh"), str(tomos / "*.mrc"), str(tmp_path / "o")],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode != 0 and "SLURM_ARRAY_TASK_ID" in done.stderr
    assert not (tmp_path / "o").exists()


def train_option_names() -> set[str]:
    import typer.main

    import vpdetect.cli  # noqa: F401  registers the commands
    from vpdetect.cli.app import app

    command = typer.main.get_command(app).commands["train"]
    return {name for param in command.params for name in param.opts if name.startswith("--")}


def dry_run_train_ddp(tmp_path, **env) -> list[str]:
    data = tmp_path / "sim"
    for k in range(3):
        (data / f"model_{k}").mkdir(parents=True)
    done = subprocess.run(
        ["bash", str(ROOT / "examples" / "train_ddp.sh")],
        env=dict(CLEAN_ENV, DATA_DIR=str(data), OUT=str(tmp_path / "m" / "loc.pt"), DRY_RUN="1", **env),
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "m").exists()  # a dry run writes nothing
    return shlex.split(done.stdout)


def test_train_ddp_script_builds_a_valid_vpdetect_train_command(tmp_path):
    words = dry_run_train_ddp(tmp_path, GPUS="2", RESUME="1", TRAIN_ARGS="--classes a,b --threads 4")
    assert words[0] == "torchrun" and words[words.index("--nproc-per-node") + 1] == "2"
    assert words[words.index("--no-python") + 1] == "vpdetect"
    train = words[words.index("--no-python") + 2 :]
    assert train[0] == "train" and train[1] == "localizer"
    # every option the script passes exists in `vpdetect train`
    assert {w for w in train if w.startswith("--")} <= train_option_names()
    # the last folder validates, the others train
    assert [train[i + 1].rsplit("/", 1)[-1] for i, w in enumerate(train) if w in ("--data", "--val")] == [
        "model_0", "model_1", "model_2",
    ]
    assert train[train.index("--val") + 1].endswith("model_2")
    assert train[-5:] == ["--classes", "a,b", "--threads", "4", "--resume"]


def test_train_ddp_script_under_slurm_starts_one_torchrun_per_node(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "scontrol"  # `scontrol show hostnames LIST` prints one node a line
    fake.write_text("#!/usr/bin/env bash\nprintf 'gpu07\\ngpu08\\n'\n")
    fake.chmod(0o755)
    words = dry_run_train_ddp(
        tmp_path, SLURM_JOB_ID="4242", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu[07-08]",
        SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="32", PATH=f"{bin_dir}:{CLEAN_ENV['PATH']}",
    )
    assert words[:7] == ["srun", "--nodes", "2", "--ntasks-per-node", "1", "--cpus-per-task", "32"]
    assert words[7] == "torchrun"
    flags = dict(zip(words[8:18:2], words[9:19:2], strict=False))
    assert flags["--nnodes"] == "2" and flags["--nproc-per-node"] == "4"
    assert words[words.index("--rdzv-endpoint") + 1] == "gpu07:29500"
    assert words[words.index("--rdzv-id") + 1] == "4242"
