import json
import logging
import os
import stat
from pathlib import Path

import pytest

from vpdetect import __version__
from vpdetect.cli import batch
from vpdetect.cli.batch import (
    LogSettings,
    expand_inputs,
    file_sha256,
    is_complete,
    parse_devices,
    parse_shard,
    plan_outputs,
    provenance_record,
    report,
    run_batch,
    select_shard,
    sidecar_path,
)
from vpdetect.errors import VPDetectError


def write_inputs(folder: Path, names) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / name
        path.write_text(f"content of {name}\n")
        paths.append(path)
    return paths


def copy_task(source: Path, output: Path, device: str) -> dict:
    """A stand-in command: fails on inputs named bad*, crashes on crash*, else copies."""
    if source.name.startswith("bad"):
        raise VPDetectError("tomogram contains NaN or infinite values")
    if source.name.startswith("crash"):
        raise ZeroDivisionError("division by zero")
    from vpdetect.io.atomic import write_text_atomic

    write_text_atomic(output, source.read_text().upper())
    return {"device": device, "characters": len(source.read_text())}


def test_expand_inputs_sorts_dedupes_and_expands_globs(tmp_path):
    write_inputs(tmp_path, ["b.mrc", "a.mrc", "c.rec", "notes.txt"])
    found = expand_inputs([str(tmp_path / "*.mrc"), str(tmp_path / "c.rec"), str(tmp_path / "a.mrc")])
    assert [p.name for p in found] == ["a.mrc", "b.mrc", "c.rec"]
    # A missing plain path is kept so that its own task reports it.
    assert [p.name for p in expand_inputs([str(tmp_path / "missing.mrc")])] == ["missing.mrc"]
    with pytest.raises(VPDetectError, match="no files match"):
        expand_inputs([str(tmp_path / "*.map")])


def test_parse_shard_from_option_and_slurm():
    assert parse_shard("2/5", environ={}) == (2, 5)
    assert parse_shard(None, environ={}) == (0, 1)
    assert parse_shard(None, environ={"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}) == (3, 4)
    # Arrays numbered from 1 (--array=1-4) still give shards 0..3.
    env = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}
    assert parse_shard(None, environ=env) == (3, 4)
    # The option wins over the environment.
    assert parse_shard("0/2", environ=env) == (0, 2)
    for bad in ("3/3", "x/2", "1", "-1/2", "1/0"):
        with pytest.raises(VPDetectError, match="shard"):
            parse_shard(bad, environ={})


@pytest.mark.parametrize("n_items,n_shards", [(0, 3), (1, 4), (7, 3), (10, 10), (11, 4)])
def test_every_input_lands_in_exactly_one_shard(n_items, n_shards):
    items = [f"t{i:02d}.mrc" for i in range(n_items)]
    parts = [select_shard(items, i, n_shards) for i in range(n_shards)]
    flat = [item for part in parts for item in part]
    assert sorted(flat) == items and len(flat) == len(set(flat))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_plan_outputs(tmp_path):
    inputs = [tmp_path / "x" / "TS_01.mrc", tmp_path / "x" / "TS_02.rec"]
    outputs = plan_outputs(inputs, None, tmp_path / "out", ".star")
    assert outputs == [tmp_path / "out" / "TS_01.star", tmp_path / "out" / "TS_02.star"]
    assert (tmp_path / "out").is_dir()
    assert plan_outputs(inputs[:1], tmp_path / "one.csv", None, ".star") == [tmp_path / "one.csv"]
    with pytest.raises(VPDetectError, match="one file"):
        plan_outputs(inputs, tmp_path / "one.csv", None, ".star")
    with pytest.raises(VPDetectError, match="both write"):
        plan_outputs([tmp_path / "a" / "TS.mrc", tmp_path / "b" / "TS.mrc"], None, tmp_path, ".star")


def test_run_batch_isolates_failures_writes_sidecars_and_resumes(tmp_path):
    inputs = write_inputs(tmp_path / "in", ["a.mrc", "bad.mrc", "c.mrc", "crash.mrc"])
    inputs.insert(1, tmp_path / "in" / "gone.mrc")
    outputs = plan_outputs(inputs, None, tmp_path / "out", ".txt")
    base = provenance_record("copy", {"threshold": 0.5, "where": tmp_path}, {})
    outcomes = run_batch(inputs, outputs, copy_task, device="cpu", base_record=base)
    assert [o.status for o in outcomes] == ["done", "failed", "failed", "done", "failed"]
    assert "file not found" in outcomes[1].message
    assert "NaN" in outcomes[2].message and outcomes[2].user_error
    assert "ZeroDivisionError" in outcomes[4].message and not outcomes[4].user_error
    # Failed inputs leave nothing behind.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt", "a.txt.json", "c.txt", "c.txt.json"]
    record = json.loads(sidecar_path(outputs[0]).read_text())
    assert record["vpdetect_version"] == __version__
    assert record["command"] == "copy"
    assert record["parameters"] == {"threshold": 0.5, "where": str(tmp_path)}
    assert record["input"]["sha256"] == file_sha256(inputs[0])
    assert record["input"]["path"] == str(inputs[0].resolve())
    assert record["result"] == {"device": "cpu", "characters": len("content of a.mrc\n")}
    assert report(outcomes, "copy") == 1  # an unexpected error is not the user's

    # Rerun after fixing the bad input: complete outputs are skipped, the rest redone.
    (tmp_path / "in" / "bad.mrc").unlink()
    outputs[0].write_text("kept")  # proves a skipped output is not rewritten
    again = run_batch(inputs[:2] + inputs[3:4], outputs[:2] + outputs[3:4], copy_task, base_record=base)
    assert [o.status for o in again] == ["skipped", "failed", "skipped"]
    assert outputs[0].read_text() == "kept"
    assert report(again, "copy") == 2
    redone = run_batch(inputs[:1], outputs[:1], copy_task, overwrite=True, base_record=base)
    assert redone[0].status == "done" and outputs[0].read_text() == "CONTENT OF A.MRC\n"


def test_output_without_sidecar_is_incomplete_and_redone(tmp_path):
    (source,) = write_inputs(tmp_path, ["a.mrc"])
    output = tmp_path / "a.out"
    output.write_text("half a run")
    assert not is_complete(output)
    (outcome,) = run_batch([source], [output], copy_task)
    assert outcome.status == "done" and is_complete(output)
    assert report([outcome], "copy") == 0


def test_file_sha256_streams(tmp_path):
    import hashlib

    data = bytes(range(256)) * 5000
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f", chunk=1000) == hashlib.sha256(data).hexdigest()


def test_devices_on_a_cpu_only_machine_say_so(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parse_devices(None) is None
    with pytest.raises(VPDetectError, match="no CUDA device.*CPU-only"):
        parse_devices("0,1")
    with pytest.raises(VPDetectError, match="GPU numbers"):
        parse_devices("a,b")


def test_worker_processes_share_the_inputs(tmp_path):
    # Two spawned workers (on the CPU here) take alternate inputs; every input is done once.
    inputs = write_inputs(tmp_path / "in", ["a.mrc", "b.mrc", "bad.mrc", "d.mrc"])
    outputs = plan_outputs(inputs, None, tmp_path / "out", ".txt")
    outcomes = run_batch(inputs, outputs, copy_task, devices=["cpu", "cpu:0"],
                         base_record={"command": "copy"}, log_settings=LogSettings(quiet=True))
    assert [o.status for o in outcomes] == ["done", "done", "failed", "done"]
    devices = [json.loads(sidecar_path(o).read_text())["device"] for o in outputs if is_complete(o)]
    assert devices == ["cpu", "cpu:0", "cpu:0"]


def test_logging_levels_and_log_file(tmp_path, capsys):
    log_file = tmp_path / "run.log"
    batch.setup_logging(LogSettings(quiet=True, log_file=str(log_file)))
    logger = logging.getLogger("vpdetect.test")
    logger.info("hidden on screen")
    logger.warning("shown everywhere")
    text = log_file.read_text()
    assert "hidden on screen" in text and "shown everywhere" in text
    err = capsys.readouterr().err
    assert "shown everywhere" in err and "hidden on screen" not in err
    with pytest.raises(VPDetectError, match="log file folder"):
        batch.setup_logging(LogSettings(log_file=str(tmp_path / "nope" / "x.log")))
    batch.setup_logging(LogSettings())


# --------------------------------------------------------------------------- shards and resume, end to end


class CountingTask:
    """copy_task that records which inputs it ran on (in this process)."""

    def __init__(self):
        self.seen: list[str] = []

    def __call__(self, source: Path, output: Path, device: str) -> dict:
        self.seen.append(source.name)
        return copy_task(source, output, device)


def run_copy(inputs, out: Path, task, **kwargs):
    batch.run_command_batch(
        "copy", inputs, task, output=None, output_dir=out, suffix=".txt", parameters={}, models={},
        log_settings=LogSettings(quiet=True), **kwargs,
    )


@pytest.mark.parametrize("n_shards", [1, 2, 3, 4])
@pytest.mark.parametrize("n_inputs", range(10))
def test_shards_of_a_glob_process_every_input_exactly_once(tmp_path, n_shards, n_inputs):
    names = [f"TS_{i:02d}.mrc" for i in range(n_inputs)]
    write_inputs(tmp_path / "in", names)
    task = CountingTask()
    pattern = str(tmp_path / "in" / "TS_*.mrc")
    for index in range(n_shards):
        if n_inputs:
            run_copy([pattern], tmp_path / "out", task, shard=f"{index}/{n_shards}")
        else:  # nothing matches: a clear error, no work
            with pytest.raises(VPDetectError, match="no files match"):
                run_copy([pattern], tmp_path / "out", task, shard=f"{index}/{n_shards}")
    assert sorted(task.seen) == names  # once each, across all shards
    if n_inputs:
        assert sorted(p.name for p in (tmp_path / "out").glob("*.txt")) == [n.replace(".mrc", ".txt") for n in names]


@pytest.mark.parametrize("n_shards", [1, 2, 3, 4])
def test_slurm_array_variables_pick_the_shard(tmp_path, monkeypatch, n_shards):
    names = [f"TS_{i:02d}.mrc" for i in range(7)]
    inputs = write_inputs(tmp_path / "in", names)
    task = CountingTask()
    for task_id in range(n_shards):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task_id))
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", str(n_shards))
        before = len(task.seen)
        run_copy([str(p) for p in reversed(inputs)], tmp_path / "out", task)  # order given does not matter
        # the task-th round-robin part of the sorted list
        assert task.seen[before:] == names[task_id::n_shards]
    assert sorted(task.seen) == names
    # --shard wins over the environment
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    assert parse_shard("1/2") == (1, 2)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    assert parse_shard(None) == (0, 1)


def test_rerun_skips_complete_redoes_killed_and_overwrite_redoes_all(tmp_path):
    inputs = write_inputs(tmp_path / "in", ["a.mrc", "b.mrc", "c.mrc", "d.mrc"])
    out = tmp_path / "out"
    first = CountingTask()
    run_copy([str(p) for p in inputs], out, first)
    assert first.seen == ["a.mrc", "b.mrc", "c.mrc", "d.mrc"]

    # Simulate a job killed at three moments: b while writing its table (a hidden temporary
    # file, no table), c after the table but before its sidecar, d before anything.
    (out / "b.txt").unlink()
    (out / "b.txt.json").unlink()
    (out / ".b.k1ll3d_x.tmp.txt").write_text("half a tab")
    (out / "c.txt.json").unlink()
    (out / "d.txt").unlink()
    (out / "d.txt.json").unlink()
    (out / ".d.txt.zz9_abcd.tmp.json").write_text("{")
    a_record = sidecar_path(out / "a.txt").read_text()

    again = CountingTask()
    run_copy([str(p) for p in inputs], out, again)
    assert again.seen == ["b.mrc", "c.mrc", "d.mrc"]  # a is complete and skipped
    assert sidecar_path(out / "a.txt").read_text() == a_record
    assert all(is_complete(out / f"{n}.txt") for n in "abcd")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # debris cleared

    third = CountingTask()
    run_copy([str(p) for p in inputs], out, third)
    assert third.seen == []  # everything complete: nothing to do
    forced = CountingTask()
    run_copy([str(p) for p in inputs], out, forced, overwrite=True)
    assert forced.seen == ["a.mrc", "b.mrc", "c.mrc", "d.mrc"]


def test_a_failed_redo_keeps_the_earlier_result_and_a_failed_write_removes_it(tmp_path):
    (source,) = write_inputs(tmp_path, ["a.mrc"])
    output = tmp_path / "a.out"
    assert run_batch([source], [output], copy_task)[0].status == "done"
    record = sidecar_path(output).read_text()

    def fails_before_writing(src, out, device):
        raise VPDetectError("bad input")

    def fails_after_writing(src, out, device):
        copy_task(src, out, device)
        raise VPDetectError("late failure")

    assert run_batch([source], [output], fails_before_writing, overwrite=True)[0].status == "failed"
    assert is_complete(output) and sidecar_path(output).read_text() == record
    assert run_batch([source], [output], fails_after_writing, overwrite=True)[0].status == "failed"
    assert not output.exists() and not sidecar_path(output).exists()


def test_outputs_never_overwrite_inputs(tmp_path):
    inputs = write_inputs(tmp_path, ["t.txt"])
    with pytest.raises(VPDetectError, match="overwrite an input"):
        plan_outputs(inputs, None, tmp_path, "", naming=lambda p: p.name)
    with pytest.raises(VPDetectError, match="overwrite an input"):
        plan_outputs(inputs, None, None, "", naming=lambda p: p.name, beside_inputs=True)
    with pytest.raises(VPDetectError, match="overwrite an input"):
        plan_outputs(inputs, inputs[0], None, ".txt")
    named = plan_outputs(inputs, None, None, "", naming=lambda p: f"{p.stem}_classes{p.suffix}",
                         beside_inputs=True)
    assert named == [tmp_path / "t_classes.txt"]


def test_a_long_log_line_stays_one_line(capsys):
    batch.setup_logging(LogSettings())
    long_path = "/data/" + "x" * 300 + "/[tomo].mrc"
    logging.getLogger("vpdetect.test").error("%s: broken", long_path)
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert lines == [f"error: {long_path}: broken"]  # no fold at the console width, no markup


def test_worker_makes_its_gpu_the_current_device(tmp_path, monkeypatch):
    # A --devices worker binds its own GPU before running anything (else its CUDA context,
    # cuDNN workspace and plain-'cuda' allocations land on GPU 0).
    from vpdetect.cli import pool

    bound = []
    monkeypatch.setattr(pool, "bind_device", bound.append)
    inputs = write_inputs(tmp_path / "in", ["a.mrc"])
    outputs = plan_outputs(inputs, None, tmp_path / "out", ".txt")
    results = pool._worker(copy_task, [(str(inputs[0]), str(outputs[0]))], "cuda:1", {},
                           LogSettings(quiet=True))
    assert bound == ["cuda:1"] and results[0]["status"] == "done"


def test_bind_device_sets_only_an_indexed_cuda_device(monkeypatch):
    import torch

    from vpdetect.devices import bind_device

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    for device in ("cpu", "cuda:3", "cpu:0"):
        bind_device(device)
    assert calls == [torch.device("cuda:3")]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_outputs_get_the_permissions_the_umask_gives(tmp_path, umask, mode):
    from vpdetect.io.atomic import write_text_atomic
    from vpdetect.io.particles import ParticleTable, write_particles

    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "a.txt", "x\n")
        write_particles(tmp_path / "b.star", ParticleTable.from_arrays([[1, 2, 3]]))
        (tmp_path / "plain.txt").write_text("x\n")  # what any other new file gets
    finally:
        os.umask(old)
    for name in ("a.txt", "b.star", "plain.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
