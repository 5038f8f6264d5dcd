"""Run folders read without trust, checkpoints deleted only when they do not verify, secrets
kept out of messages and reprs, commits that are durable and finite: checkpoint files written
and read through the library's own functions on real local storage (the end-to-end cases are
in test_checkpoint.py and test_cli.py)."""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import mxnet as mx
import pytest
import ray
from conftest import dataset, mlp, wait_until

import raymodule.tune
from raymodule import CheckpointError, RunConfig, checkpoint, storage
from raymodule.checkpoint import Snapshot, continuity, optimizer_state
from raymodule.constants import Settings
from raymodule.lease import Lease, LeaseLost
from raymodule.run import Run

REPO = Path(__file__).resolve().parent.parent
STATIC = {"world_size": 1, "work_load_list": [1]}


def snapshot(tmp_path, value: float = 1.0) -> Snapshot:
    """A worker's snapshot as the writer gets it: MXNet's ``.params`` bytes and the optimizer."""
    path = tmp_path / "snapshot.params"
    mx.nd.save(str(path), {"arg:w": mx.nd.full((2, 3), value), "aux:m": mx.nd.zeros((3,))})
    return Snapshot(path.read_bytes(), b"", {"type": "SGD"})


def info(step: int, epoch: int = 1) -> dict:
    return {
        "files": {"model-symbol.json": b"{}"},
        "epoch": epoch,
        "batch": 0,
        "global_step": step,
        "world_size": 1,
        "work_load_list": [1],
    }


def committed(tmp_path, step: int = 12, name: str = "r") -> storage.Folder:
    """A run folder holding one committed checkpoint at ``step``."""
    run = storage.Folder(str(tmp_path / name))
    checkpoint.write(run, snapshot(tmp_path), info(step), keep=5)
    return run


def edit_manifest(run: storage.Folder, name: str, change) -> None:
    manifest = json.loads(run.read(f"{name}/manifest.json"))
    run.write(f"{name}/manifest.json", json.dumps(change(manifest)).encode())


def listed(path: Path) -> dict:
    """Every file under ``path`` with its size, as a user would see it."""
    return {
        str(p.relative_to(path)): p.lstat().st_size for p in sorted(path.rglob("*")) if p.is_file()
    }


# -- readers trust nothing in a run folder ---------------------------------------------------
@pytest.mark.parametrize(
    "name", ["../../outside.txt", "/etc/hostname", "a//b", "./x", "a\\..\\..\\b", "", "x/"]
)
def test_manifest_names_that_are_not_plain_are_rejected_naming_them(tmp_path, name):
    run = committed(tmp_path)
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not the run's")
    entry = {"size": outside.stat().st_size, "sha256": hashlib.sha256(b"not the run's").hexdigest()}
    edit_manifest(run, "ckpt-0000000012", lambda m: {**m, "files": {**m["files"], name: entry}})
    with pytest.raises(CheckpointError) as err:
        checkpoint.read(run, "ckpt-0000000012")
    assert f"it names the file {name!r}, which is not a plain name" in str(err.value)


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda m: {**m, "files": list(m["files"])}, "'files' is a list, not an object"),
        (
            lambda m: {**m, "files": {**m["files"], "model-symbol.json": "x"}},
            "the entry of 'model-symbol.json' is a str, not an object",
        ),
        (
            lambda m: {**m, "files": {"model-symbol.json": {"size": "2", "sha256": "0" * 64}}},
            "the size of 'model-symbol.json' is '2'",
        ),
        (lambda m: [m], "it holds a list, not an object"),
        (lambda m: {**m, "epoch": None}, "'epoch' is None"),
    ],
)
def test_malformed_manifests_are_rejected_in_words_and_the_one_before_is_used(
    tmp_path, change, problem
):
    run = committed(tmp_path, step=6)
    checkpoint.write(run, snapshot(tmp_path), info(12), keep=5)
    edit_manifest(run, "ckpt-0000000012", change)
    with pytest.raises(CheckpointError, match="ckpt-0000000012/manifest.json is not a valid"):
        checkpoint.read(run, "ckpt-0000000012")
    found, rejected = checkpoint.survey(run)
    assert found.name == "ckpt-0000000006"
    assert [name for name, _ in rejected] == ["ckpt-0000000012"] and problem in rejected[0][1]


def test_a_manifest_nested_too_deep_for_json_is_rejected_and_the_one_before_is_used(tmp_path):
    """Within the size a manifest may have, JSON nested deeper than Python parses: a
    rejected checkpoint like any other, not a RecursionError out of the reader (which ended
    the background writer's thread when its tidying met one)."""
    run = committed(tmp_path, step=6)
    checkpoint.write(run, snapshot(tmp_path), info(12), keep=5)
    run.write("ckpt-0000000012/manifest.json", b"[" * 200_000 + b"]" * 200_000)
    with pytest.raises(CheckpointError, match="ckpt-0000000012/manifest.json is not a valid"):
        checkpoint.read(run, "ckpt-0000000012")
    found, rejected = checkpoint.survey(run)
    assert found.name == "ckpt-0000000006" and [n for n, _ in rejected] == ["ckpt-0000000012"]


def _optimizer_json_a_list(run: storage.Folder, name: str) -> None:
    data = b"[1, 2]"
    run.write(f"{name}/optimizer.json", data)
    entry = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    edit_manifest(run, name, lambda m: {**m, "files": {**m["files"], "optimizer.json": entry}})


@pytest.mark.parametrize(
    "damage, problem",
    [
        (
            lambda run, name: edit_manifest(
                run,
                name,
                lambda m: {
                    **m,
                    "files": {k: v for k, v in m["files"].items() if k != "optimizer.nd"},
                },
            ),
            "manifest.json does not list optimizer.nd",
        ),
        (
            lambda run, name: edit_manifest(
                run,
                name,
                lambda m: {
                    **m,
                    "files": {k: v for k, v in m["files"].items() if not k.endswith(".params")},
                },
            ),
            "manifest.json does not list model-0001.params",
        ),
        (_optimizer_json_a_list, "optimizer.json holds a list, not an object"),
    ],
)
def test_a_checkpoint_without_what_a_resume_reads_is_rejected_and_the_one_before_is_used(
    tmp_path, damage, problem
):
    """A manifest whose files all verify but that leaves out a file a resume reads, or an
    ``optimizer.json`` that is no object: rejected when read, not a KeyError or TypeError in
    the resume that chose it."""
    run = committed(tmp_path, step=6)
    checkpoint.write(run, snapshot(tmp_path), info(12), keep=5)
    damage(run, "ckpt-0000000012")
    with pytest.raises(CheckpointError, match=problem):
        checkpoint.read(run, "ckpt-0000000012")
    found, rejected = checkpoint.survey(run)
    assert found.name == "ckpt-0000000006" and [n for n, _ in rejected] == ["ckpt-0000000012"]


@pytest.mark.timeout(60)  # a FIFO opened for reading waits for a writer: the old hang
def test_files_that_are_no_regular_files_in_the_folder_are_never_opened(tmp_path):
    run = committed(tmp_path)
    ckpt = tmp_path / "r" / "ckpt-0000000012"
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"{}")  # what model-symbol.json holds: the hashes match
    for make in (os.mkfifo, lambda path: os.symlink(secret, path)):
        (ckpt / "model-symbol.json").unlink()
        make(ckpt / "model-symbol.json")
        with pytest.raises(
            CheckpointError, match="model-symbol.json is not read: .*(regular|link)"
        ):
            checkpoint.read(run, "ckpt-0000000012")

    # a checkpoint folder that is a link out of the run is not read either
    elsewhere = committed(tmp_path, name="elsewhere")
    os.symlink(tmp_path / "elsewhere" / "ckpt-0000000012", tmp_path / "r" / "ckpt-0000000020")
    with pytest.raises(
        CheckpointError, match="ckpt-0000000020/manifest.json is not read: .*not inside"
    ):
        checkpoint.read(run, "ckpt-0000000020")
    assert checkpoint.latest(elsewhere).name == "ckpt-0000000012"

    # a device, and a file larger than its reader allows, are refused before a byte is read
    os.symlink("/dev/zero", tmp_path / "r" / "zero")
    os.mknod(tmp_path / "r" / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null
    for name in ("zero", "null"):
        with pytest.raises(storage.Refused, match=f"{name}' is (a symbolic link|not a regular)"):
            run.read(name, limit=10)
    with pytest.raises(storage.TooLarge, match="latest' holds 15 bytes, more than the 2 allowed"):
        run.read("latest", limit=2)


def test_the_latest_pointer_must_name_a_checkpoint_folder(tmp_path, monkeypatch):
    committed(tmp_path, name="other")  # epoch 1, at the epoch's end: what a report waits for
    run = storage.Folder(str(tmp_path / "r"))
    run.write("latest", b"../other/ckpt-0000000012")
    monkeypatch.setattr(raymodule.tune.reports, "COMMIT_WAIT_S", 0.3)
    assert raymodule.tune.reports._await_epoch_checkpoint(run, 1) is None


def test_a_tune_restore_from_a_crafted_checkpoint_writes_nothing(tmp_path):
    from ray import tune

    source = committed(tmp_path, name="a/b/trial")
    data = b"escaped"
    (tmp_path / "a" / "escaped").write_bytes(data)
    entry = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    name = "../../../escaped"  # from the checkpoint: a/escaped; from the adopting run: ./escaped
    edit_manifest(source, "ckpt-0000000012", lambda m: {**m, "files": {**m["files"], name: entry}})
    restore = tune.Checkpoint.from_directory(str(tmp_path / "a/b/trial/ckpt-0000000012"))
    run = RunConfig(name="adopter", storage=str(tmp_path / "runs"))
    with pytest.raises(
        CheckpointError, match="not a raymodule run checkpoint .*'../../../escaped'"
    ):
        raymodule.tune.runs._adopt(restore, run)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "escaped").exists()
    with pytest.raises(CheckpointError, match="not writing '../x' into"):
        raymodule.tune.reports._write(str(tmp_path / "local"), "../x", b"")
    assert not (tmp_path / "x").exists()


def test_a_resumed_run_skips_metrics_lines_that_are_no_objects(tmp_path):
    run = committed(tmp_path, step=12)  # epoch 1 done
    lines = ['{"epoch": 0, "train": {}}', "[1, 2]", "5", '"x"', '{"epoch": 1, "train": {}}']
    run.write("metrics.jsonl", "\n".join(lines).encode())
    config = RunConfig(name="r", storage=str(tmp_path))
    with Run(config, Settings.from_env(), STATIC) as resumed:
        assert resumed.resume_from.name == "ckpt-0000000012"
        resumed.record_epoch({"epoch": 1, "train": {}})
    epochs = [json.loads(line)["epoch"] for line in run.read("metrics.jsonl").splitlines()]
    assert epochs == [0, 1]


# -- delete only what does not verify --------------------------------------------------------
def test_a_newer_checkpoint_that_verifies_is_kept_one_that_does_not_is_deleted(tmp_path, caplog):
    run = committed(tmp_path, step=20)
    checkpoint.write(run, snapshot(tmp_path), info(30), keep=5)
    broken = "ckpt-0000000030/model-0001.params"
    run.write(broken, run.read(broken)[:-1])
    verified = {}  # the writer's, over its commits
    with caplog.at_level(logging.WARNING, logger="raymodule"):
        for step in (10, 11):  # went on from before them
            checkpoint.write(run, snapshot(tmp_path), info(step), keep=5, verified=verified)
    assert run.folders() == ["ckpt-0000000010", "ckpt-0000000011", "ckpt-0000000020"]
    assert caplog.text.count("not deleting ckpt-0000000020, which is newer and verifies") == 1

    # a Tune trial continuing from another trial's checkpoint gives up its own later ones
    checkpoint.write(run, snapshot(tmp_path), info(5), keep=5, drop_newer=True)
    assert run.folders() == ["ckpt-0000000005"]


def test_keep_reads_an_older_checkpoint_once_and_again_after_a_storage_error(
    tmp_path, monkeypatch, caplog
):
    """A writer's tidying (keep=4) reads each older checkpoint it did not commit once, to
    count only those that verify; its own commits are not read again. One that cannot be read
    (the storage failed) counts as nothing that time and is read at the next commit."""
    run = storage.Folder(str(tmp_path / "r"))
    for step in (10, 20, 30):  # another writer's
        checkpoint.write(run, snapshot(tmp_path), info(step), keep=5)
    read, reads, failing = storage.Folder.read, [], {"ckpt-0000000020"}

    def read_or_fail(self, name, *args, **kwargs):
        folder = name.split("/")[0]
        reads.append(folder)
        if folder in failing:
            raise OSError(f"{name}: connection reset")
        return read(self, name, *args, **kwargs)

    monkeypatch.setattr(storage.Folder, "read", read_or_fail)
    verified = {}  # the writer's, over its commits

    def commit(step):
        reads.clear()
        with caplog.at_level(logging.WARNING, logger="raymodule.checkpoint"):
            checkpoint.write(run, snapshot(tmp_path), info(step), keep=4, verified=verified)
        return sorted(set(reads)), run.folders()

    ckpts = [f"ckpt-{step:010d}" for step in (10, 20, 30, 40, 50, 60)]
    # 20 cannot be read: 30 and 10 count, and nothing is old enough to go
    assert commit(40) == (ckpts[:3], ckpts[:4])
    assert "ckpt-0000000020 could not be read, so it does not count toward keep=4" in caplog.text
    failing.clear()
    assert commit(50) == ([ckpts[1]], ckpts[1:5])  # 20 read now: 40, 30, 20 count; 10 goes
    assert commit(60) == ([], ckpts[2:])  # nothing read: 50, 40, 30 count; 20 goes


def test_a_checkpoint_of_the_same_step_that_verifies_is_never_replaced(tmp_path):
    run = committed(tmp_path, step=12)
    before = {name: run.read(name) for name in run.sizes()}
    with pytest.raises(CheckpointError, match="ckpt-0000000012 already holds a committed chec"):
        checkpoint.write(run, snapshot(tmp_path, 2.0), info(12), keep=5)  # a second writer
    assert {name: run.read(name) for name in run.sizes()} == before

    # one that does not verify (an interrupted or damaged write) is replaced
    params = "ckpt-0000000012/model-0001.params"
    run.write(params, run.read(params)[:-1])
    checkpoint.write(run, snapshot(tmp_path, 2.0), info(12), keep=5)
    replaced = checkpoint.read(run, "ckpt-0000000012")
    assert replaced.params_file() == snapshot(tmp_path, 2.0).params


def test_a_retry_of_a_checkpoint_whose_latest_failed_finishes_its_commit(tmp_path):
    """The manifest is written, then ``latest`` fails: the checkpoint is committed (a resume
    finds it by listing), nothing is deleted, and the attempt after it, told so, takes it as
    its own instead of refusing it as another writer's (which any other write still does)."""
    run = committed(tmp_path, step=6)
    latest = tmp_path / "r" / "latest"
    latest.unlink()
    latest.mkdir()  # a file cannot be renamed onto it: writing latest fails
    with pytest.raises(checkpoint.format.LatestNotWritten, match="cannot write"):
        checkpoint.write(run, snapshot(tmp_path, 2.0), info(12), keep=5)
    assert checkpoint.read(run, "ckpt-0000000012").params_file() == snapshot(tmp_path, 2.0).params
    latest.rmdir()
    with pytest.raises(CheckpointError, match="already holds a committed checkpoint"):
        checkpoint.write(run, snapshot(tmp_path, 2.0), info(12), keep=5)  # not told to finish
    files = {name: run.read(name) for name in run.sizes() if name.startswith("ckpt-0000000012")}
    assert checkpoint.write(run, snapshot(tmp_path, 2.0), info(12), keep=1, finish=True) == (
        "ckpt-0000000012"
    )
    assert run.read("latest") == b"ckpt-0000000012"
    assert checkpoint.checkpoint_names(run) == ["ckpt-0000000012"]  # tidied, keep=1
    assert {name: run.read(name) for name in run.sizes() if name != "latest"} == files


def test_the_writer_retries_a_checkpoint_whose_latest_failed_into_a_commit(
    tmp_path, monkeypatch, caplog
):
    """Through the background writer: its second attempt finishes the commit the first made,
    so the checkpoint counts as committed, not as failed."""
    monkeypatch.setenv("RAYMODULE_CHECKPOINT_ATTEMPTS", "2")
    monkeypatch.setenv("RAYMODULE_CHECKPOINT_BACKOFF_S", "0")
    run = committed(tmp_path, step=6)
    latest = tmp_path / "r" / "latest"
    latest.unlink()
    latest.mkdir()

    class MendLatest(logging.Handler):
        """Mends ``latest`` as the writer says its first attempt failed, in the writer's own
        thread: before the second attempt, however the threads are scheduled."""

        def emit(self, record):
            if "attempt 1 of 2 failed" in record.getMessage():
                latest.rmdir()

    writer_log = logging.getLogger("raymodule.checkpoint.writer")
    mend = MendLatest()
    writer_log.addHandler(mend)
    try:
        with caplog.at_level(logging.INFO, logger=writer_log.name):
            writer = checkpoint.CheckpointWriter(run, 2, Settings.from_env())
            writer.submit(ray.put(snapshot(tmp_path, 2.0)), info(12))
            writer.close()
    finally:
        writer_log.removeHandler(mend)
    assert "attempt 1 of 2 failed" in caplog.text
    assert [c["name"] for c in writer.take_committed()] == ["ckpt-0000000012"]
    assert writer.failures_in_row == 0
    assert run.read("latest") == b"ckpt-0000000012"


def test_other_processes_half_written_files_are_left_alone(tmp_path):
    run = committed(tmp_path, step=6)
    others = ["latest.part-4242-1", "metrics.jsonl.part-4243-7", "lease.json.part-1-2"]
    for name in others:  # another process's writes in progress (or a killed one's halves)
        run.write(name, b"half")
    checkpoint.write(run, snapshot(tmp_path), info(12), keep=1)
    assert run.folders() == ["ckpt-0000000012"]
    assert sorted(n for n in run.sizes() if ".part-" in n) == sorted(others)

    # a local write that fails once its half is written leaves no half of its own behind
    with pytest.raises(OSError, match="cannot write .*ckpt-0000000012.*IsADirectory"):
        run.write("ckpt-0000000012", b"over a folder")  # the rename fails
    assert sorted(n for n in run.sizes() if ".part-" in n) == sorted(others)


def test_a_fresh_start_keeps_the_metrics_lines_already_there(tmp_path):
    run = storage.Folder(str(tmp_path / "r"))
    run.write("metrics.jsonl", b'{"epoch": 0, "train": {"acc": 0.5}}\n')  # no checkpoint
    with Run(RunConfig(name="r", storage=str(tmp_path)), Settings.from_env(), STATIC) as fresh:
        assert fresh.resume_from is None
        fresh.record_epoch({"epoch": 0, "train": {"acc": 0.6}})
    lines = [json.loads(line) for line in run.read("metrics.jsonl").splitlines()]
    assert [line["train"]["acc"] for line in lines] == [0.5, 0.6]


def test_metrics_lines_a_failed_write_left_out_are_written_when_the_run_closes(tmp_path):
    """A write of ``metrics.jsonl`` that fails (here: a folder stands where the file goes, so
    the rename fails) is not lost when no line follows it: the run writes it again as it
    closes."""
    with Run(RunConfig(name="r", storage=str(tmp_path)), Settings.from_env(), STATIC) as run:
        os.makedirs(tmp_path / "r" / "metrics.jsonl")
        run.record_epoch({"epoch": 0, "train": {"acc": 0.6}})
        run._metrics.flush(60)  # the write failed: the file is a folder
        os.rmdir(tmp_path / "r" / "metrics.jsonl")
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0]


# -- secrets never appear --------------------------------------------------------------------
def test_a_secret_in_a_uri_never_appears_in_errors_or_reprs(tmp_path):
    unparseable = "s3://b/my runs?access_key=AKIA9&secret_key=XYZ123%2Bq"
    for call in (lambda: storage.Folder(unparseable), lambda: storage.read_bytes(unparseable)):
        with pytest.raises(ValueError, match="is not a storage location") as err:
            call()
        assert "XYZ123" not in str(err.value) and "secret_key=***" in str(err.value)

    config = RunConfig(name="r", storage="s3://AKIA:PW@b/runs?secret_key=XYZ123&region=x")
    assert "XYZ123" not in repr(config) and "PW" not in repr(config)
    assert "secret_key=***" in repr(config) and "keep=2" in repr(config)
    run = committed(tmp_path)
    ckpt = checkpoint.read(run, "ckpt-0000000012")
    shown = repr(checkpoint.Checkpoint(config.location + "/ckpt-1", ckpt.manifest, ckpt.files))
    assert "XYZ123" not in shown and "epoch=1" in shown and "b'" not in shown


def test_the_sweep_job_refuses_keys_in_its_storage_uri():
    out = subprocess.run(
        [sys.executable, "jobs/sweep.py", "--storage", "s3://b/sweeps?secret_key=XYZ123"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "XYZ123" not in out.stdout + out.stderr
    assert "holds credentials (secret_key)" in out.stderr
    assert "AWS_SECRET_ACCESS_KEY" in out.stderr


# -- durable, finite commits -----------------------------------------------------------------
def test_parameters_that_are_not_finite_are_not_committed(tmp_path, monkeypatch):
    run = storage.Folder(str(tmp_path / "r"))
    with pytest.raises(CheckpointError, match="step 12 not committed: parameters arg:w are not"):
        checkpoint.write(run, snapshot(tmp_path, float("nan")), info(12), keep=2)
    assert not (tmp_path / "r").exists()

    monkeypatch.setenv("RAYMODULE_CHECKPOINT_FAILURES_TOLERATED", "0")
    writer = checkpoint.CheckpointWriter(run, 2, Settings.from_env())
    writer.submit(ray.put(snapshot(tmp_path, float("inf"))), info(12))
    with pytest.raises(CheckpointError, match="1 checkpoints in a row .*not finite"):
        writer.close()
    assert writer.failures_in_row == 1 and not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "weights",
    [
        mx.nd.sparse.row_sparse_array(([[1.0, float("nan")]], [1]), shape=(3, 2)),
        mx.nd.array([[1.0, float("inf")]], dtype="float16"),
    ],
    ids=["row_sparse", "float16"],
)
def test_a_parameter_not_finite_is_refused_whatever_its_storage_and_dtype(weights, tmp_path):
    """Dense parameters are read without MXNet, sparse ones by MXNet: both are checked."""
    path = tmp_path / "other.params"
    mx.nd.save(str(path), {"arg:w": weights, "aux:m": mx.nd.zeros((3,))})
    run = storage.Folder(str(tmp_path / "r"))
    with pytest.raises(CheckpointError, match="step 12 not committed: parameters arg:w are not"):
        checkpoint.write(run, Snapshot(path.read_bytes(), b"", {"type": "SGD"}), info(12), keep=2)
    assert not (tmp_path / "r").exists()


def test_a_process_that_writes_checkpoints_does_not_import_mxnet(tmp_path):
    """The task that writes a checkpoint's files reads the parameters without MXNet (seconds
    to import, and memory, on the worker's node), and records the same shapes."""
    snapshot(tmp_path)  # tmp_path / "snapshot.params"
    script = f"""
import pathlib, sys
from raymodule.checkpoint import Snapshot
from raymodule.checkpoint.format import stage_files
from raymodule.storage import Folder
params = pathlib.Path({str(tmp_path / "snapshot.params")!r}).read_bytes()
made = stage_files(Folder({str(tmp_path / "r")!r}), Snapshot(params, b"", None), {info(12)!r})
print(sorted(made["params"].items()), "mxnet" in sys.modules)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.split() == "[('arg:w', [2, 3]), ('aux:m', [3])] False".split()


def _gated():
    """``when_the_gate_opens(gate, copy)``: a worker's ``copy``, once the test opens ``gate``
    (at most 60 s: a test failing before it opens leaves no task spinning). Made here, nested,
    so that Ray ships it by value: tests/ is not on the workers' path."""

    def when_the_gate_opens(gate: str, copy: Snapshot) -> Snapshot:
        deadline = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        return copy

    return when_the_gate_opens


def test_checkpoints_skipped_while_one_is_written_are_warned_of_once_then_counted(tmp_path, caplog):
    """A run checkpointing faster than its storage commits skips checkpoints: the first skip
    is a warning saying what to change, the others are logged at INFO, and closing the writer
    says how many there were (one line each time would bury a progress bar)."""
    gate = tmp_path / "gate"
    writer = checkpoint.CheckpointWriter(
        storage.Folder(str(tmp_path / "r")), 2, Settings.from_env()
    )
    with caplog.at_level(logging.INFO, logger="raymodule.checkpoint.writer"):
        late = ray.remote(_gated()).remote(str(gate), snapshot(tmp_path))
        writer.submit(late, info(10))
        # until the writer took it up: it waits for it
        wait_until(lambda: writer._waiting is None, 60, "the writer to take up the checkpoint")
        for step in (20, 30, 40, 50):  # the first is still being written: all but one wait
            writer.submit(ray.put(snapshot(tmp_path)), info(step))
        gate.touch()
        writer.close()
    skips = [r for r in caplog.records if " skipped: the one before" in r.getMessage()]
    assert len(skips) == writer.skipped
    assert [r.levelno for r in skips] == [logging.WARNING] + [logging.INFO] * (len(skips) - 1)
    assert "a larger checkpoint_every takes fewer" in skips[0].getMessage()
    summary = [r for r in caplog.records if "skipped in all" in r.getMessage()]
    assert len(summary) == 1 and summary[0].levelno == logging.WARNING
    assert summary[0].getMessage().startswith(f"{len(skips)} checkpoints of ")
    run = storage.Folder(str(tmp_path / "r"))
    steps = [checkpoint.read(run, name).global_step for name in checkpoint.checkpoint_names(run)]
    assert steps == [10, 50] and len(skips) == 3


def test_a_checkpoint_superseded_by_one_whose_worker_was_lost_is_written_instead(tmp_path, caplog):
    """While the writer waits for one snapshot, a checkpoint is due, then another whose worker
    dies before it makes its copy (as when every worker is lost right after a SIGTERM asked for
    the checkpoint there): the one before it, whose copy was made, is written instead of
    neither."""
    gate = tmp_path / "gate"
    writer = checkpoint.CheckpointWriter(
        storage.Folder(str(tmp_path / "r")), 5, Settings.from_env()
    )
    gated = _gated()

    class Worker:
        def copy(self, gate: str, copy: Snapshot) -> Snapshot:
            return gated(gate, copy)

    worker = ray.remote(num_cpus=0)(Worker).remote()
    late = ray.remote(gated).remote(str(gate), snapshot(tmp_path))
    copies = [ray.put(snapshot(tmp_path, 2.0)), worker.copy.remote(str(gate) + "-never", b"")]
    with caplog.at_level(logging.INFO, logger="raymodule.checkpoint.writer"):
        writer.submit(late, info(10))  # the writer waits for it
        writer.submit(copies[0], info(20))
        writer.submit(copies[1], info(30))
        ray.kill(worker)
        gate.touch()
        writer.close()
    run = storage.Folder(str(tmp_path / "r"))
    names = checkpoint.checkpoint_names(run)  # 10: if taken up before 20 came
    assert names in (["ckpt-0000000010", "ckpt-0000000020"], ["ckpt-0000000020"]), names
    assert checkpoint.read(run, "ckpt-0000000020").params_file() == snapshot(tmp_path, 2.0).params
    instead = "step 30: writing the one at step 20 instead" in caplog.text
    # (only were 20 taken up between the submits of 20 and 30 would it be written as it came)
    assert instead or names == ["ckpt-0000000020"]
    assert writer.skipped == 2 - len(names)  # 20 was written after all (10 not, if not taken)


def test_settling_writes_a_snapshot_that_came_and_does_not_wait_for_one_that_did_not(tmp_path):
    """Before fit goes on from the latest checkpoint (every worker was lost), the writer
    settles: a snapshot its worker never delivers is not waited for, and the checkpoint after
    it, whose copy was made, is committed: the latest to go on from."""
    gate = tmp_path / "gate"
    run = storage.Folder(str(tmp_path / "r"))
    writer = checkpoint.CheckpointWriter(run, 5, Settings.from_env())
    late = ray.remote(_gated()).remote(str(gate), snapshot(tmp_path))
    writer.submit(late, info(10))  # its worker was lost: it would come only once the gate opens
    writer.submit(ray.put(snapshot(tmp_path, 2.0)), info(20))
    writer.settle()
    assert checkpoint.checkpoint_names(run) == ["ckpt-0000000020"]
    gate.touch()
    writer.close()


def test_files_and_folders_are_synced_before_the_manifest_and_the_manifest_before_latest(
    tmp_path, monkeypatch
):
    """The order of what reaches the disk, seen by watching the real calls."""
    events = []
    fsync, replace = os.fsync, os.replace

    def watched_fsync(fd):
        events.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def watched_replace(src, dst):
        events.append(("rename", str(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", watched_fsync)
    monkeypatch.setattr(os, "replace", watched_replace)
    committed(tmp_path)
    folder = str(tmp_path / "r" / "ckpt-0000000012")

    def at(kind, path):
        return events.index((kind, path))

    manifest = at("rename", f"{folder}/manifest.json")
    for name in ("model-symbol.json", "model-0001.params", "optimizer.nd", "optimizer.json"):
        synced = [i for i, (k, p) in enumerate(events) if k == "sync" and f"/{name}.part-" in p]
        assert synced and synced[0] < at("rename", f"{folder}/{name}") < manifest
    folder_synced = [i for i, e in enumerate(events) if e == ("sync", folder)]
    latest = at("rename", str(tmp_path / "r" / "latest"))
    assert folder_synced[0] < manifest  # the files' entries
    assert any(manifest < i < latest for i in folder_synced)  # the manifest's own entry
    assert ("sync", str(tmp_path / "r")) in events[latest:]  # and latest's
    assert not [p for p in listed(tmp_path / "r") if ".part-" in p]


# -- one owner per run -----------------------------------------------------------------------
OWNER = """
import sys
from raymodule import RunConfig
from raymodule.constants import Settings
from raymodule.run import Run

run = Run(RunConfig(name="r", storage=sys.argv[1]), Settings.from_env(), {"world_size": 1})
print("owned", flush=True)
sys.stdin.readline()
run.close()
print("closed", flush=True)
"""


def test_a_second_run_of_the_same_name_refuses_naming_the_owner(tmp_path):
    run = committed(tmp_path)
    config = RunConfig(name="r", storage=str(tmp_path))
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout.readline().strip() == "owned"
        with pytest.raises(CheckpointError) as err:
            Run(config, Settings.from_env(), STATIC)
        message = str(err.value)
        assert f"run 'r' at {run} is in use by another run (owner " in message
        assert f"on host {socket.gethostname()!r}, pid {owner.pid}" in message
        assert "RAYMODULE_LEASE_TTL_S=60" in message and "choose another name" in message
        assert checkpoint.latest(run).name == "ckpt-0000000012"  # what is there still verifies

        owner.stdin.write("\n")
        owner.stdin.flush()
        assert owner.stdout.readline().strip() == "closed"
    finally:
        owner.kill()
        owner.wait(timeout=60)
    with Run(config, Settings.from_env(), STATIC) as again:  # released: taken at once
        assert again.resume_from.name == "ckpt-0000000012"
    assert not run.exists("lease.json")


def test_a_lease_whose_owner_died_is_taken_over(tmp_path, monkeypatch, caplog):
    run = storage.Folder(str(tmp_path / "r"))
    config = RunConfig(name="r", storage=str(tmp_path))
    monkeypatch.setenv("RAYMODULE_LEASE_TTL_S", "30")
    elsewhere = {"owner": "0ld", "host": "elsewhere", "pid": 1, "heartbeat": time.time()}
    run.write("lease.json", json.dumps(elsewhere).encode())
    with pytest.raises(CheckpointError, match="owner 0ld on host 'elsewhere', pid 1; lease re"):
        Run(config, Settings.from_env(), STATIC)

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    for held, why in (
        (dict(elsewhere, heartbeat=time.time() - 31), "last renewed 31 s ago"),  # the TTL passed
        (dict(elsewhere, host=socket.gethostname(), pid=int(gone.stdout)), "process is gone"),
    ):
        run.write("lease.json", json.dumps(held).encode())
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="raymodule"):
            with Run(config, Settings.from_env(), STATIC) as taken:
                stored = json.loads(run.read("lease.json"))
                assert stored["owner"] == taken.lease.owner["owner"] and stored["ttl_s"] == 30
        assert "taking over from owner 0ld" in caplog.text and why in caplog.text


def test_a_run_that_lost_its_folder_stops_and_writes_nothing(tmp_path):
    owned = Run(RunConfig(name="r", storage=str(tmp_path)), Settings.from_env(), STATIC)
    run = owned.folder
    run.write("ckpt-0000000003/model-symbol.json", b"{}")  # the new owner's write in progress
    taker = {"owner": "other", "host": "elsewhere", "pid": 2, "heartbeat": time.time()}
    run.write("lease.json", json.dumps(taker).encode())
    files = {"model-symbol.json": b"{}"}
    owned.checkpoint(ray.put(snapshot(tmp_path)), files, epoch=1, batch=0, global_step=12)
    with pytest.raises(CheckpointError, match="no longer owns .*owner other on host 'elsewhere'"):
        owned.close()
    with pytest.raises(LeaseLost, match="stops without writing or deleting anything more"):
        owned.record_epoch({"epoch": 0})
    assert checkpoint.checkpoint_names(run) == ["ckpt-0000000003"]  # not tidied away
    assert not run.exists("metrics.jsonl")
    assert json.loads(run.read("lease.json"))["owner"] == "other"  # not deleted either


def test_a_checkpoint_given_up_when_its_storage_stalled_is_not_committed_later(
    s3, tmp_path, monkeypatch, caplog
):
    """A run that goes on from its latest checkpoint (every worker lost) first waits for the
    checkpoints handed over, at most RAYMODULE_CHECKPOINT_CLOSE_TIMEOUT_S. One still being
    written then, its S3 server stopped, is given up: when the server answers again, it is
    not committed, so no commit of the run it left follows the restart, and the restart's own
    checkpoint of that step is written. Before, the late one was committed, and the restart's
    failed: a checkpoint of that step already verified."""
    monkeypatch.setenv("RAYMODULE_CHECKPOINT_CLOSE_TIMEOUT_S", "3")
    monkeypatch.setenv("RAYMODULE_CHECKPOINT_BACKOFF_S", "0.5")
    files = {"model-symbol.json": b"{}"}
    config = RunConfig(name="stalled", storage=s3.uri("given-up"))
    caplog.set_level(logging.INFO, logger="raymodule.checkpoint.writer")
    with Run(config, Settings.from_env(), STATIC) as run:
        run.checkpoint(ray.put(snapshot(tmp_path)), files, epoch=1, batch=0, global_step=4)
        assert run.latest().global_step == 4
        os.killpg(s3.proc.pid, signal.SIGSTOP)
        try:
            later = ray.put(snapshot(tmp_path, 2.0))
            run.checkpoint(later, files, epoch=1, batch=0, global_step=8)
            run.writer.settle()  # as latest() does: 3 s, the server stopped
            assert "are given up: the run goes on from the latest one committed" in caplog.text
        finally:
            os.killpg(s3.proc.pid, signal.SIGCONT)
        ended = r"step 8 not committed|ckpt-0000000008 committed"
        wait_until(
            lambda: re.search(ended, caplog.text), 120, "step 8's end in the log", 0.1,
            seen=lambda: caplog.text[-3000:],
        )  # fmt: skip
        assert "checkpoint at step 8 not committed: the run gave up waiting for it" in caplog.text
        assert run.latest().global_step == 4
        again = ray.put(snapshot(tmp_path, 3.0))  # the restarted run's, at the same step
        run.checkpoint(again, files, epoch=1, batch=0, global_step=8)
        ckpt = run.latest()
        assert ckpt.global_step == 8
        assert ckpt.params_file() == bytes(ray.get(again).params)  # the restart's


def at_owner_check(n: int, then):
    """A write's ``check_owner`` that calls ``then()`` at its ``n``-th call (a write checks
    before its first write, before its commit, then before each delete)."""
    calls = 0

    def check() -> None:
        nonlocal calls
        calls += 1
        if calls == n:
            then()

    return check


@pytest.mark.parametrize("landing", ["before a delete", "after latest failed"])
def test_a_checkpoint_committed_as_the_run_gave_up_is_said_so_and_replaced_by_the_restarts(
    tmp_path, monkeypatch, caplog, landing
):
    """The give-up (settle() timed out) can land after a write's commit: its commit request
    was already on its way. Before a delete: the deletes after it stop. After `latest` failed
    to be written: the retry that would point it stops. Either way the log says what is in
    storage, committed (before, "not committed"), and the restarted run's own checkpoint of
    that step replaces it (before, it failed: a checkpoint of that step already verified).
    The give-up is made at an owner check, not on a clock."""
    monkeypatch.setenv("RAYMODULE_CHECKPOINT_BACKOFF_S", "0.1")
    run = storage.Folder(str(tmp_path / "r"))
    for step in (2, 4, 6):
        checkpoint.write(run, snapshot(tmp_path), info(step), keep=5)
    if landing == "after latest failed":
        run.delete("latest")
        (tmp_path / "r" / "latest").mkdir()  # cannot be written: LatestNotWritten, retried

    def give_up():  # as settle() does when its time is up
        with writer._cond:
            writer._give_up()

    # the third check: after those before the writes and before the commit
    writer = checkpoint.CheckpointWriter(
        run, 1, Settings.from_env(), check_owner=at_owner_check(3, give_up)
    )
    with caplog.at_level(logging.INFO, logger="raymodule.checkpoint.writer"):
        writer.submit(ray.put(snapshot(tmp_path, 2.0)), info(8))
        ended = r"step 8 not committed|0000000008 was committed"
        wait_until(
            lambda: re.search(ended, caplog.text), 60, "step 8's end in the log", 0.05,
            seen=lambda: caplog.text[-3000:],
        )  # fmt: skip
        assert "given up: the run goes on from the latest one committed" in caplog.text
        assert "step 8 not committed" not in caplog.text
        assert f"checkpoint {run}/ckpt-0000000008 was committed as the run gave up" in caplog.text
        assert writer.failures_in_row == 0  # not counted as a failure
        assert checkpoint.latest(run).global_step == 8
        if landing == "before a delete":  # the first delete (the newest older one) went
            assert run.folders() == [checkpoint.folder_name(s) for s in (2, 4, 8)]
        else:
            (tmp_path / "r" / "latest").rmdir()
        again = ray.put(snapshot(tmp_path, 3.0))  # the restarted run's, at the same step
        writer.submit(again, info(8))
        writer.close()
    assert "step 8 failed" not in caplog.text  # (its attempts that failed are retried)
    ckpt = checkpoint.latest(run)
    assert ckpt.global_step == 8 and ckpt.params_file() == bytes(ray.get(again).params)
    assert run.folders() == ["ckpt-0000000008"]  # keep=1: the others are deleted now


def test_a_lease_lost_after_the_commit_stops_the_run_saying_the_checkpoint_was_committed(
    tmp_path,
):
    """Another run takes the folder over between a write's commit and its deletes: the writer
    deletes nothing more and stops the run, as for any lost lease, and says the checkpoint
    itself was committed (`latest` names it)."""
    run = storage.Folder(str(tmp_path / "r"))
    for step in (2, 4):
        checkpoint.write(run, snapshot(tmp_path), info(step), keep=5)

    def taken_over():
        raise LeaseLost("the run no longer owns its folder: owner other")

    writer = checkpoint.CheckpointWriter(  # the third check: before the first delete
        run, 1, Settings.from_env(), check_owner=at_owner_check(3, taken_over)
    )
    writer.submit(ray.put(snapshot(tmp_path, 2.0)), info(8))
    said = re.escape(f"owner other ({run}/ckpt-0000000008 was committed before; no more")
    with pytest.raises(CheckpointError, match=said):
        writer.close()
    assert checkpoint.latest(run).global_step == 8
    assert run.folders() == [checkpoint.folder_name(s) for s in (2, 4, 8)]


def test_a_checkpoint_committed_before_its_owner_check_failed_says_so(tmp_path):
    """What check_owner raises before a delete, after the commit, names the checkpoint
    committed; before the first write or the commit, it names none."""
    for failing, committed in [(1, None), (2, None), (3, "ckpt-0000000004")]:
        run = storage.Folder(str(tmp_path / f"r{failing}"))
        checkpoint.write(run, snapshot(tmp_path), info(2), keep=5)

        def stop():
            raise CheckpointError("stop")

        check = at_owner_check(failing, stop)
        with pytest.raises(CheckpointError, match="stop") as raised:
            checkpoint.write(run, snapshot(tmp_path), info(4), keep=1, check_owner=check)
        assert getattr(raised.value, "committed", None) == committed
        assert checkpoint.latest(run).global_step == (4 if committed else 2)
        assert run.folders()[0] == "ckpt-0000000002"  # not deleted


def test_a_run_that_loses_its_folder_while_tidying_deletes_nothing_more(tmp_path):
    run = storage.Folder(str(tmp_path / "r"))
    for step in (2, 4, 6):
        checkpoint.write(run, snapshot(tmp_path), info(step), keep=5)
    run.write("ckpt-0000000003/model-symbol.json", b"{}")  # never committed
    lease = Lease(run, "r", ttl_s=60)
    lease.acquire()
    checks = []

    def another_run_takes_over_after_the_first_delete():
        checks.append(sorted(run.folders()))
        if len(checks) == 4:  # after the checks before the writes, the commit, 1st delete
            taker = {"owner": "other", "host": "elsewhere", "pid": 2, "heartbeat": time.time()}
            run.write("lease.json", json.dumps(taker).encode())
        lease.check()

    with pytest.raises(LeaseLost, match="owner other on host 'elsewhere'"):
        checkpoint.write(run, snapshot(tmp_path), info(8), keep=1,
                         check_owner=another_run_takes_over_after_the_first_delete)  # fmt: skip
    assert "ckpt-0000000003" in checks[2] and "ckpt-0000000003" not in checks[3]
    assert run.folders() == [checkpoint.folder_name(s) for s in (2, 4, 6, 8)]
    lease.release()
    assert json.loads(run.read("lease.json"))["owner"] == "other"


def test_a_check_after_the_lease_is_released_takes_nothing_back(tmp_path):
    """A checkpoint still being written when its run closed (the close timed out) checks the
    lease before its commit: it finds the run closed and writes nothing, not even the lease.
    Before, the check found no lease and wrote it anew, and a restart of the run under that
    name waited for it to age out (RAYMODULE_LEASE_TTL_S)."""
    run = storage.Folder(str(tmp_path / "r"))
    lease = Lease(run, "r", ttl_s=60)
    lease.acquire()
    lease.release()
    with pytest.raises(LeaseLost, match="was closed"):
        checkpoint.write(run, snapshot(tmp_path), info(4), keep=5, check_owner=lease.check)
    assert run.folders() == [] and not run.exists("lease.json")
    again = Lease(run, "r", ttl_s=60)
    again.acquire()  # at once
    again.release()


def test_a_lease_lost_by_storage_is_taken_again(tmp_path):
    with Run(RunConfig(name="r", storage=str(tmp_path)), Settings.from_env(), STATIC) as owned:
        owned.folder.delete("lease.json")  # an object store restarted without it
        owned.record_epoch({"epoch": 0})
        owned._metrics.flush(60)  # written from a thread of its own: its check takes it again
        stored = json.loads(owned.folder.read("lease.json"))
        assert stored["owner"] == owned.lease.owner["owner"]
        assert owned.folder.exists("metrics.jsonl")
    assert not owned.folder.exists("lease.json")


def test_a_lease_that_cannot_be_read_is_written_anew_only_while_no_one_else_can_own_it(
    tmp_path, caplog
):
    """A lease the storage cannot serve (here a symbolic link, which a Folder does not read) is
    written anew by a run that renewed it less than half a TTL ago: no other run can have taken
    it over. After renewals that failed for longer, another run may own it: the check fails as
    storage does, and nothing is written over the other run's lease. Before, every read error
    wrote the lease anew, taking it from whoever held it."""
    run = storage.Folder(str(tmp_path / "r"))
    path = tmp_path / "r" / "lease.json"
    other = {"owner": "other", "host": "elsewhere", "pid": 2, "heartbeat": time.time()}
    (tmp_path / "other.json").write_text(json.dumps(other))

    fresh = Lease(run, "r", ttl_s=60)
    fresh.acquire()
    path.unlink()
    path.symlink_to(tmp_path / "other.json")
    with caplog.at_level(logging.WARNING, logger="raymodule"):
        fresh.check()
    assert "its lease cannot be read" in caplog.text
    assert not path.is_symlink()  # written anew, over the link
    assert json.loads(run.read("lease.json"))["owner"] == fresh.owner["owner"]
    fresh.release()

    stale = Lease(run, "r", ttl_s=1)  # renewed every 0.25 s
    stale.acquire()
    (tmp_path / "folder").mkdir()
    swap(tmp_path / "folder", path)  # neither read nor written: the renewals fail
    time.sleep(0.6)  # longer than half the TTL since the last renewal that wrote
    (tmp_path / "link").symlink_to(tmp_path / "other.json")
    swap(tmp_path / "link", path)  # another run's, which this one cannot read
    with pytest.raises(OSError, match="another run may own .* so it is not written over"):
        stale.check()
    time.sleep(0.6)  # the renewals write nothing either
    assert path.is_symlink()
    os.replace(tmp_path / "other.json", path)  # readable again: the other run's
    with pytest.raises(LeaseLost, match="owner other on host 'elsewhere'"):
        stale.check()
    stale.release()
    assert json.loads(path.read_text())["owner"] == "other"


def swap(one: Path, other: Path) -> None:
    """Swaps two paths in one step (renameat2's RENAME_EXCHANGE): a lease's renewals never
    find neither there (and take the lease again)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, os.fsencode(one), -100, os.fsencode(other), 2) != 0:  # AT_FDCWD
        raise OSError(ctypes.get_errno(), f"renameat2 could not swap {one} and {other}")


# -- a resume continues the run it resumes ---------------------------------------------------
def fit(config, batch_size=8, n=96, hidden=(32, 16), num_epoch=2, batches=None, **fit_args):
    """One worker trains the MLP on ``n`` samples in batches of ``batch_size`` (``batches``
    a batch per epoch: through an iterator that does not say how many it gives)."""
    x, y = dataset(n=n)
    mx.random.seed(0)
    with raymodule.Module(mlp(hidden), context=[mx.cpu(0)]) as mod:
        train = mx.io.NDArrayIter(x, y, batch_size=batch_size)
        if batches is not None:
            train = mx.io.ResizeIter(train, batches)
        mod.fit(train, num_epoch=num_epoch, run=config, **fit_args)


def test_a_resume_with_another_symbol_optimizer_or_batch_size_fails_naming_what_differs(
    tmp_path,
):
    config = RunConfig(name="r", storage=str(tmp_path))
    fit(config, num_epoch=1)
    run = storage.Folder(config.location)
    manifest = checkpoint.latest(run).manifest
    assert manifest["batch_size"] == 8 and manifest["batches_per_epoch"] == 12
    assert manifest["params"]["arg:fc0_weight"] == [32, 20] and "arg:out_bias" in manifest["params"]
    before = {name: run.read(name) for name in run.sizes() if name != "lease.json"}

    for change, words in (
        ({"hidden": (32, 24)}, r"params differ \(shapes differ: arg:fc1_bias \(16,\) in the check"),
        ({"hidden": (32,)}, "the checkpoint's arg:fc1_bias, arg:fc1_weight are not in this fit"),
        ({"optimizer": "adam"}, "the checkpoint's optimizer is 'SGD', this fit's 'Adam'"),
        ({"batch_size": 16}, "the checkpoint's batch_size is 8, this fit's 16"),
        ({"n": 120}, "its epochs had 12 batches, an epoch of this fit's train_data has 15"),
    ):
        with pytest.raises(raymodule.ResumeMismatch, match=words) as err:
            fit(config, **change)
        assert "cannot resume from ckpt-0000000012" in str(err.value)
        assert "another RunConfig(name=...) (with resume='never'" in str(err.value)
        assert isinstance(err.value, ValueError)
    assert {name: run.read(name) for name in run.sizes() if name != "lease.json"} == before

    # the same symbol, optimizer and batch go on; a new learning rate is allowed
    fit(config, optimizer_params={"learning_rate": 0.5})
    assert checkpoint.latest(run).epoch == 2


def test_data_whose_epochs_are_of_another_length_fail_at_the_first_epochs_end(tmp_path):
    """An iterator that does not say how long its epochs are is checked when the first one
    ends, before that epoch's checkpoint."""
    config = RunConfig(name="r", storage=str(tmp_path))
    fit(config, num_epoch=1)
    with pytest.raises(raymodule.ResumeMismatch, match="had 12 batches, .* train_data has 10"):
        fit(config, batches=10)
    assert checkpoint.latest(storage.Folder(config.location)).name == "ckpt-0000000012"
    fit(config, batches=12)  # the same length goes on
    assert checkpoint.latest(storage.Folder(config.location)).epoch == 2


def test_a_manifest_that_records_no_such_fields_is_not_checked_for_them(tmp_path, caplog):
    run = committed(tmp_path)
    old = ("params", "batch_size", "batches_per_epoch")  # recorded since
    edit_manifest(run, "ckpt-0000000012", lambda m: {k: v for k, v in m.items() if k not in old})
    old = checkpoint.read(run, "ckpt-0000000012")
    with caplog.at_level(logging.DEBUG, logger="raymodule"):
        continuity.check(old, "r", params={"arg:x": [1]}, optimizer="SGD", batch_size=64)
    assert "records no params; not checked" in caplog.text
    assert "records no batch_size; not checked" in caplog.text
    with pytest.raises(raymodule.ResumeMismatch, match="optimizer is 'SGD', this fit's 'Adam'"):
        continuity.check(old, "r", params={"arg:x": [1]}, optimizer="Adam", batch_size=64)


def test_data_shorter_than_the_resume_position_fails_and_deletes_nothing(tmp_path):
    config = RunConfig(name="r", storage=str(tmp_path), checkpoint_every=4, keep=5)
    fit(config, num_epoch=1, batch_end_callback=lambda param: time.sleep(0.3))  # paced
    run = storage.Folder(config.location)
    run.delete_folder("ckpt-0000000012")  # the epoch's end gone: it resumes mid-epoch
    resume_from = checkpoint.latest(run)
    assert resume_from.epoch == 0 and resume_from.batch in (4, 8)
    before = {name: run.read(name) for name in run.sizes() if name != "lease.json"}

    with pytest.raises(raymodule.ResumeMismatch) as err:
        fit(config, n=24, num_epoch=1)  # 3 batches
    assert (
        f"resumes epoch 0 after batch {resume_from.batch}, but train_data gives only 3 batches"
        in str(err.value)
    )
    assert {name: run.read(name) for name in run.sizes() if name != "lease.json"} == before


def test_a_resume_takes_the_new_learning_rate_and_goes_on_with_the_schedule():
    def updater(learning_rate):
        schedule = mx.lr_scheduler.FactorScheduler(step=10, factor=0.5)
        return mx.optimizer.get_updater(
            mx.optimizer.SGD(learning_rate=learning_rate, lr_scheduler=schedule)
        )

    trained = updater(0.1)
    weight = mx.nd.ones((3,))
    for _ in range(25):
        trained(0, mx.nd.ones((3,)), weight)
    assert trained.optimizer.learning_rate == pytest.approx(0.1 * 0.5**2)
    arrays, description = optimizer_state.capture(trained)

    resumed = updater(0.2)  # a new fit (or a PBT trial) with a new learning rate
    optimizer_state.restore(resumed, arrays, json.loads(json.dumps(description)))
    assert resumed.optimizer.num_update == 25
    assert resumed.optimizer.learning_rate == pytest.approx(0.2 * 0.5**2)


def test_optimizer_states_for_other_parameters_are_refused_in_words():
    def updater(names):
        optimizer = mx.optimizer.SGD(momentum=0.9, param_idx2name=dict(enumerate(names)))
        return mx.optimizer.get_updater(optimizer)

    trained = updater(["fc0_weight", "fc1_weight"])
    weights = [mx.nd.ones((2, 3)), mx.nd.ones((3, 2))]
    trained([0, 1], [mx.nd.ones_like(w) for w in weights], weights)
    arrays, description = optimizer_state.capture(trained)
    reordered = updater(["fc1_weight", "fc0_weight"])  # a symbol built in another order
    with pytest.raises(raymodule.ResumeMismatch, match="#0: fc0_weight in the checkpoint, fc1_"):
        optimizer_state.restore(reordered, arrays, description)
    assert reordered.states == {}

    # a checkpoint from before the names were recorded: its indices must be this optimizer's
    del description["state_names"]
    with pytest.raises(raymodule.ResumeMismatch, match="#1: unnamed in the checkpoint, None"):
        optimizer_state.restore(updater(["fc0_weight"]), arrays, description)
