"""Run checkpoints: layout, verification, keep, resume, and bad input, on disk and on real S3."""

from __future__ import annotations

import json
import logging
import os
import time

import mxnet as mx
import numpy as np
import pytest
import ray
import stepfaults
from conftest import Interrupted, dataset, interrupt_at, max_relative_diff, mlp, wait_until
from ray.experimental import internal_kv

import raymodule
import raymodule.checkpoint
import raymodule.module
import raymodule.run
from raymodule import CheckpointError, RunConfig, latest_checkpoint, storage
from raymodule.checkpoint import optimizer_state
from raymodule.controller import plans
from raymodule.data import ArrayDataset, DatasetIter
from raymodule.sealed import seal

X, Y = dataset(n=96)
CONTEXTS = [mx.cpu(0), mx.cpu(1)]


def batches(batch_size=8):
    """A shuffling iterator made as a fresh process makes it: the same seed, the same order."""
    np.random.seed(3)
    return mx.io.NDArrayIter(X, Y, batch_size=batch_size, shuffle=True)


def optimizer_params():
    return {
        "learning_rate": 0.1,
        "momentum": 0.9,
        "wd": 1e-4,
        "lr_scheduler": mx.lr_scheduler.FactorScheduler(step=5, factor=0.8),
    }


def train(run=None, num_epoch=3, **fit_args):
    """Trains the MLP from seed 0 on 2 workers; returns the final parameters."""
    mx.random.seed(0)
    with raymodule.Module(mlp(), context=CONTEXTS) as mod:
        mod.fit(batches(), num_epoch=num_epoch, optimizer_params=optimizer_params(), run=run,
                **fit_args)  # fmt: skip
        return mod.get_params()[0]


@pytest.fixture(params=["file", "s3"])
def storage_uri(request, tmp_path):
    if request.param == "file":
        return f"file://{tmp_path}/runs"
    return request.getfixturevalue("s3").uri(f"{tmp_path.name}/runs")


@pytest.fixture(scope="module")
def uninterrupted():
    return train()


def test_resumed_mid_epoch_the_run_ends_as_if_never_interrupted(storage_uri, uninterrupted):
    config = RunConfig(name="cut", storage=storage_uri, checkpoint_every=4)
    run = storage.Folder(storage_uri).child("cut")
    with pytest.raises(Interrupted):
        train(config, batch_end_callback=interrupt_at(1, 6, run.location))
    ckpt = latest_checkpoint(run.location)
    assert ckpt.epoch == 1 and ckpt.batch > 0, (
        "the interruption should leave a mid-epoch checkpoint"
    )

    trained = []
    resumed = train(config, batch_end_callback=lambda p: trained.append((p.epoch, p.nbatch)))
    assert max_relative_diff(uninterrupted, resumed) <= 1e-5
    # none trained twice or missed: epoch 1 goes on after the checkpoint's batch
    assert trained[0] == (1, ckpt.batch) and trained[-1] == (2, 11)
    assert len(trained) == (12 - ckpt.batch) + 12

    # the layout DESIGN.md gives, with keep=2 and the pointer naming the newest (a checkpoint
    # due while the one before is still being written may be skipped)
    names = run.folders()
    assert len(names) == 2 and names[-1] == "ckpt-0000000036"
    assert run.read("latest").decode() == "ckpt-0000000036"
    manifest = json.loads(run.read("ckpt-0000000036/manifest.json"))
    assert sorted(manifest["files"]) == [
        "model-0003.params", "model-symbol.json", "optimizer.json", "optimizer.nd",
    ]  # fmt: skip
    assert (manifest["epoch"], manifest["batch"], manifest["global_step"]) == (3, 0, 36)
    assert manifest["world_size"] == 2 and manifest["work_load_list"] == [1, 1]
    assert manifest["optimizer"]["type"] == "SGD" and manifest["optimizer"]["num_update"] == 36
    assert {"mxnet", "ray", "pyarrow", "numpy", "python"} <= set(manifest["versions"])
    epochs = [json.loads(line) for line in run.read("metrics.jsonl").decode().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert epochs[1]["resumed_at_batch"] == ckpt.batch and epochs[2]["world_size"] == 2


def test_every_snapshot_a_plan_takes_is_there_when_its_reply_is_read_late():
    """The controller runs a plan of 60 steps with a checkpoint at every batch while the
    client reads nothing, then a plan of `score` (as a batch_end_callback may); then every
    snapshot the first plan's replies hand over can be read. Taken from the plan's streamed
    replies, about 1 in 20 such references (each above Ray's 100 KB) was freed by Ray while
    the client held it (ray-project/ray#58080), and a checkpoint failed."""
    ds = ArrayDataset(*dataset(n=480))
    train = DatasetIter(ds, 8)
    with raymodule.Module(mlp(hidden=(256, 256)), context=CONTEXTS) as mod:
        mod.bind(train.provide_data, train.provide_label)
        mod.init_params(mx.init.Xavier())
        mod.init_optimizer(optimizer_params={"learning_rate": 0.01, "momentum": 0.9})
        ds.key()
        batches = range(60)
        progress = mod._workers.run(
            "train_step",
            {
                "serials": list(batches),
                "mids": [mod._id] * 60,
                "sizes": [8] * 60,
                "labels": [True] * 60,
                "dataset": seal(ds),
                "indices": [np.arange(8 * b, 8 * b + 8) for b in batches],
                "positions": list(batches),
                "depth": 2,
                "snapshot": mod._snapshot_id,
                "checkpoint_every": 1,
                "first_batch": 0,
            },
        )
        # the plan runs to its end: the controller holds none of its snapshots in its steps
        ray.get(progress._stream.completed(), timeout=120)
        mod.score(DatasetIter(ds, 8), "acc")  # a plan of its own, run after the first
        taken = [reply["checkpoint"] for reply in progress if reply.get("checkpoint")]
        assert [steps for _, steps, _ in taken] == list(range(1, 60))
        for _, steps, snapshot in taken:
            assert snapshot is not None, f"the snapshot after {steps} steps was let go"
            assert ray.get(snapshot, timeout=60).applied == steps


def test_a_checkpoint_refused_as_a_plan_is_read_stops_the_plan(tmp_path, monkeypatch):
    """fit raises when the checkpoint writer refuses a checkpoint (too many failed in a row)
    as the client reads a plan's replies: the controller stops the plan at its next chunk
    boundary, the steps it sent finished, instead of running the rest of the epoch unseen.
    The refusal is chosen here (the second checkpoint): the real storage faults of
    test_checkpoint_faults cannot choose which checkpoint fails. Workers that reach step 8
    wait there until the client asked the plan to stop (at most 20 s), so the plan cannot
    have ended before fit raised, however slow the client is."""
    monkeypatch.setenv("RAYMODULE_STEPS_PER_CALL", "1")  # the epoch's 24 steps in 24 calls
    monkeypatch.setenv("RAYMODULE_PIPELINE_DEPTH", "1")
    handed, write = [], raymodule.run.Run.checkpoint

    def refuse_the_second(run, snapshot, files, **position):
        handed.append(position["batch"])
        if len(handed) == 2:
            raise CheckpointError("storage refused it")
        write(run, snapshot, files, **position)

    def stop_flags():
        return set(internal_kv._internal_kv_list("", namespace=plans._NAMESPACE))

    flags_before = stop_flags()

    def until_stop_asked():
        wait_until(lambda: stop_flags() - flags_before, 20, "the controller to ask for a stop")

    monkeypatch.setattr(raymodule.run.Run, "checkpoint", refuse_the_second)
    cls = stepfaults.worker_class({(8, None): ("gate", "hold")}, marks=tmp_path)
    monkeypatch.setattr(raymodule.module, "ControllerHandle", stepfaults.with_workers(cls))
    run = RunConfig(name="refused", storage=str(tmp_path / "runs"), checkpoint_every=2)
    with stepfaults.Gates(tmp_path, {"hold": until_stop_asked}) as gates:
        with raymodule.Module(mlp(), context=CONTEXTS) as mod:
            with pytest.raises(CheckpointError, match="storage refused it"):
                mod.fit(batches(batch_size=4), num_epoch=2, optimizer_params={}, run=run)
            steps = mod._workers.steps_sent
            mod.get_params()  # answered after whatever the controller still ran
            assert mod._workers.steps_sent == steps
    assert handed == [2, 4] and not gates.errors
    # the reply with the checkpoint at batch 4 came after step 4 was sent; the controller
    # sends at most steps 8 and 9 before step 8 waits at the gate for the stop
    assert 5 <= steps <= 10, steps


def test_a_run_checkpoint_is_read_by_plain_mxnet(tmp_path):
    params = train(RunConfig(name="r", storage=str(tmp_path), checkpoint_every=5), num_epoch=1)
    ckpt = latest_checkpoint(str(tmp_path / "r"))
    assert (ckpt.epoch, ckpt.batch, ckpt.global_step) == (1, 0, 12)
    assert ckpt.prefix == f"{tmp_path}/r/ckpt-0000000012/model"
    native = mx.mod.Module.load(ckpt.prefix, ckpt.epoch)
    native.bind([("data", (8, 20))], [("softmax_label", (8,))], for_training=False)
    assert max_relative_diff(params, native.get_params()[0]) == 0.0


def _break_file(run, name: str, how: str) -> None:
    data = bytearray(run.read(name))
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01
    run.write(name, bytes(data))


def test_corrupt_checkpoints_are_rejected_naming_the_file(storage_uri, caplog):
    config = RunConfig(name="c", storage=storage_uri, checkpoint_every=2, keep=3)
    # paced so that the writer keeps up and commits at least three (a checkpoint due while the
    # one before is still being written is skipped, and S3 writes on a busy machine are slow)
    train(config, num_epoch=1, batch_end_callback=lambda param: time.sleep(0.5))
    run = storage.Folder(storage_uri).child("c")
    names = run.folders()
    assert len(names) == 3 and names[-1] == "ckpt-0000000012"
    _break_file(run, "ckpt-0000000012/model-0001.params", "truncate")
    _break_file(run, f"{names[1]}/optimizer.nd", "flip")

    with caplog.at_level(logging.WARNING, logger="raymodule"):
        ckpt = latest_checkpoint(run.location)
    assert ckpt.name == names[0]
    assert "ckpt-0000000012/model-0001.params has" in caplog.text and "truncated" in caplog.text
    assert f"{names[1]}/optimizer.nd does not match the sha256" in caplog.text

    # a resumed run goes on from the checkpoint that verifies and ends as an uninterrupted one
    resumed = train(config, num_epoch=1)
    assert max_relative_diff(train(num_epoch=1), resumed) <= 1e-5


def test_a_checkpoint_in_a_folder_named_for_another_step_is_not_used(tmp_path, caplog):
    """A committed checkpoint copied by hand into a newer step's folder verifies file by file,
    but the newest checkpoint is found by the folder's name: it is rejected, saying so, and the
    run resumes from the newest one whose step is its name's."""
    config = RunConfig(name="r", storage=str(tmp_path), checkpoint_every=6)
    train(config, num_epoch=1)
    run = storage.Folder(str(tmp_path)).child("r")
    for name in run.sizes("ckpt-0000000006"):
        run.write(f"ckpt-0000000020/{name}", run.read(f"ckpt-0000000006/{name}"))
    with caplog.at_level(logging.WARNING, logger="raymodule"):
        assert latest_checkpoint(run.location).name == "ckpt-0000000012"
    assert "ckpt-0000000020/manifest.json is of step 6, not the step its folder" in caplog.text


def test_leftovers_are_cleaned_up_after_the_next_commit(tmp_path):
    run = storage.Folder(str(tmp_path / "r"))
    run.write("ckpt-0000000001/model-symbol.json", b"{}")  # an interrupted write
    run.write("ckpt-0000009999/model-symbol.json", b"{}")  # from a run that went further
    train(RunConfig(name="r", storage=str(tmp_path), keep=1), num_epoch=1)
    assert run.folders() == ["ckpt-0000000012"]
    assert not [n for n in run.sizes() if ".part-" in n]


def test_keep_counts_only_checkpoints_that_verify(tmp_path, caplog):
    """keep=3 keeps three checkpoints a run can go on from: one of them altered does not
    count, and is left for readers to skip in words (before, the oldest good one went)."""
    config = RunConfig(name="r", storage=str(tmp_path), keep=3)
    for epochs in (1, 2, 3):  # a fit each: its checkpoint committed before the next is due
        train(config, num_epoch=epochs)
    run = storage.Folder(str(tmp_path / "r"))
    assert run.folders() == ["ckpt-0000000012", "ckpt-0000000024", "ckpt-0000000036"]
    [params] = [n for n in run.sizes() if n.startswith("ckpt-0000000024/") and ".params" in n]
    _break_file(run, params, "flip")

    with caplog.at_level(logging.WARNING, logger="raymodule.checkpoint"):
        train(config, num_epoch=4)  # resumes from step 36 and commits step 48

    def verifies(name):
        try:
            return raymodule.checkpoint.read(run, name) is not None
        except CheckpointError:
            return False

    assert [n for n in run.folders() if verifies(n)] == [
        "ckpt-0000000012",
        "ckpt-0000000036",
        "ckpt-0000000048",
    ]
    assert run.folders() == ["ckpt-0000000012", "ckpt-0000000024", "ckpt-0000000036",
                             "ckpt-0000000048"]  # fmt: skip
    assert "ckpt-0000000024 does not verify, so it does not count toward keep=3" in caplog.text


def test_resume_rules(tmp_path):
    config = RunConfig(name="r", storage=str(tmp_path))
    with pytest.raises(CheckpointError, match="resume='must' but run 'r' at .* has no committed"):
        train(RunConfig(name="r", storage=str(tmp_path), resume="must"), num_epoch=1)
    done = train(config, num_epoch=1)
    with pytest.raises(CheckpointError, match="run 'r' already exists at .*resume='never'"):
        train(RunConfig(name="r", storage=str(tmp_path), resume="never"), num_epoch=1)
    # a finished run resumed with the same num_epoch has nothing left to train
    assert max_relative_diff(done, train(config, num_epoch=1)) == 0.0
    # an unnamed run gets a fresh name and never resumes another
    train(RunConfig(storage=str(tmp_path)), num_epoch=1)
    assert len(os.listdir(tmp_path)) == 2


def test_a_fit_that_fails_before_training_leaves_its_run_free_for_the_next(tmp_path):
    """A metric MXNet does not know fails fit before training, and the run's folder is not
    held by it: no lease is left, and the same name trains. Before, the run took its lease
    first and a thread renewed it for as long as the process lived: a fit of that name in
    any other process was refused as 'in use' (this process's next fit takes it over)."""
    config = RunConfig(name="r", storage=str(tmp_path))
    with pytest.raises(AssertionError, match="no-such-metric is not registered"):
        train(config, num_epoch=1, eval_metric="no-such-metric")
    assert not (tmp_path / "r" / "lease.json").exists()
    train(config, num_epoch=1)
    assert latest_checkpoint(config.location).epoch == 1


@pytest.mark.parametrize(
    "field, value, rule",
    [
        ("keep", 0, "keep=0.*>= 1"),
        ("checkpoint_every", -1, "checkpoint_every=-1.*>= 0"),
        ("resume", "yes", "resume='yes'.*one of 'auto', 'never', 'must'"),
        ("name", "a/b", "name='a/b'.*no '/'"),
        ("max_failures", -2, "max_failures=-2"),
        ("min_workers", 0, "min_workers=0"),
    ],
)
def test_bad_run_config_is_rejected_naming_the_field(field, value, rule):
    with pytest.raises(ValueError, match=rf"RunConfig\({rule}"):
        RunConfig(**{field: value})


def test_unusable_storage_fails_before_training_naming_uri_and_cause(s3, monkeypatch, tmp_path):
    def fit_on(storage_uri):
        with raymodule.Module(mlp(), context=CONTEXTS) as mod:
            mod.fit(batches(), num_epoch=1, run=RunConfig(name="r", storage=storage_uri))

    with pytest.raises(ValueError, match="'foo://bucket/runs' is not a storage location"):
        fit_on("foo://bucket/runs")
    missing = s3.uri("x").replace("raymodule-test", "no-such-bucket")
    with pytest.raises(CheckpointError, match="no-such-bucket.*Bucket 'no-such-bucket' not found"):
        fit_on(missing)
    creating = missing.replace("?", "?allow_bucket_creation=true&")
    fit_on(creating)
    assert latest_checkpoint(storage.Folder(creating).child("r").location).epoch == 1
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-key")
    with pytest.raises(
        CheckpointError, match="cannot use the run folder s3://raymodule-test"
    ) as err:
        fit_on(s3.uri("denied"))
    assert "wrong-secret-key" not in str(err.value)


def test_optimizer_state_survives_json_and_ndarrays_exactly():
    """Adam's (mean, var) tuples, SGD's momentum and a MultiFactor schedule, through the
    pickle-free format, then trained on: the same updates as the original updater."""
    rng = np.random.RandomState(0)
    weights = [mx.nd.array(rng.randn(4, 3)), mx.nd.array(rng.randn(3))]
    for make in (
        lambda: mx.optimizer.Adam(learning_rate=0.01),
        lambda: mx.optimizer.SGD(
            momentum=0.9,
            lr_scheduler=mx.lr_scheduler.MultiFactorScheduler(step=[2, 4], factor=0.5),
        ),
    ):
        original = mx.optimizer.get_updater(make())
        for _ in range(3):
            original([0, 1], [mx.nd.ones_like(w) for w in weights], weights)
        arrays, description = optimizer_state.capture(original)
        description = json.loads(json.dumps(description))
        copy = mx.optimizer.get_updater(make())
        optimizer_state.restore(copy, {k: v.copy() for k, v in arrays.items()}, description)
        mirrored = [w.copy() for w in weights]
        for _ in range(3):
            grads = [mx.nd.ones_like(w) * 0.3 for w in weights]
            original([0, 1], grads, weights)
            copy([0, 1], [g.copy() for g in grads], mirrored)
        for a, b in zip(weights, mirrored):
            np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())


def test_auto_never_starts_over_checkpoints_that_do_not_verify(tmp_path):
    config = RunConfig(name="r", storage=str(tmp_path), checkpoint_every=6)
    train(config, num_epoch=1)
    run = storage.Folder(str(tmp_path)).child("r")
    names = run.folders()
    assert names == ["ckpt-0000000006", "ckpt-0000000012"]
    _break_file(run, f"{names[0]}/optimizer.nd", "flip")
    _break_file(run, f"{names[1]}/model-0001.params", "truncate")
    before = {name: run.read(name) for name in run.sizes()}

    with pytest.raises(CheckpointError) as err:
        train(config, num_epoch=1)
    message = str(err.value)
    assert "holds 2 committed checkpoints and none verifies" in message
    assert f"{names[0]}/optimizer.nd does not match the sha256" in message
    assert f"{names[1]}/model-0001.params has" in message
    assert "resume='never' with a new name, or delete the run's folder by hand" in message
    assert {name: run.read(name) for name in run.sizes()} == before  # metrics.jsonl too
