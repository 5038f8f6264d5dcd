"""Checkpoint files by local path or URI, through raymodule's one storage layer."""

from __future__ import annotations

import pickle

import mxnet as mx
import numpy as np
import pytest
from conftest import dataset, max_relative_diff, mlp
from s3server import BUCKET

import raymodule
from raymodule import storage


def test_suffixes_go_on_the_path_never_into_the_query():
    assert storage.with_suffix("/runs/model", "-0001.params") == "/runs/model-0001.params"
    uri = "s3://bucket/runs/model?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.with_suffix(uri, "-symbol.json") == (
        "s3://bucket/runs/model-symbol.json?endpoint_override=127.0.0.1:9000&scheme=http"
    )


def test_printed_uris_hide_credentials():
    uri = "s3://AKIA:SECRET@bucket/runs?access_key=AKIA&secret_key=SECRET&region=us-east-1"
    shown = storage.redact(uri)
    assert "SECRET" not in shown and "AKIA" not in shown
    assert "bucket/runs" in shown and "region=us-east-1" in shown


def test_bytes_round_trip_on_a_path_and_a_file_uri(tmp_path):
    storage.write_bytes(str(tmp_path / "a" / "b.bin"), b"local")
    assert storage.read_bytes(str(tmp_path / "a" / "b.bin")) == b"local"
    uri = f"file://{tmp_path}/c/d.bin"
    storage.write_bytes(uri, b"uri")
    assert (tmp_path / "c" / "d.bin").read_bytes() == b"uri"
    assert storage.read_bytes(uri) == b"uri"


def test_bad_locations_fail_in_words(tmp_path):
    with pytest.raises(ValueError, match="'foo://bucket/x' is not a storage location"):
        storage.read_bytes("foo://bucket/x")
    with pytest.raises(FileNotFoundError, match="no file at .*missing.params"):
        storage.read_bytes(str(tmp_path / "missing.params"))


@pytest.mark.parametrize("where", ["file", "s3"])
def test_checkpoint_by_uri_is_read_by_plain_mxnet_and_by_raymodule(where, tmp_path, request):
    x, y = dataset(n=48)
    it = mx.io.NDArrayIter(x, y, batch_size=24)
    sgd = {"learning_rate": 0.1, "momentum": 0.9}
    prefix = (
        f"file://{tmp_path}/ckpt/model"
        if where == "file"
        else request.getfixturevalue("s3").uri(f"{tmp_path.name}/model")
    )
    with raymodule.Module(mlp(), context=[mx.cpu(0)]) as mod:
        mod.fit(it, num_epoch=1, optimizer_params=sgd)
        mod.save_checkpoint(prefix, 2, save_optimizer_states=True)
        expected = mod.predict(it).asnumpy()
        params = mod.get_params()[0]

    # exactly MXNet's files, which plain MXNet loads from a local copy
    local = tmp_path / "copy"
    local.mkdir()
    for suffix in ("-symbol.json", "-0002.params", "-0002.states"):
        (local / f"model{suffix}").write_bytes(
            storage.read_bytes(storage.with_suffix(prefix, suffix))
        )
    native = mx.mod.Module.load(str(local / "model"), 2, load_optimizer_states=True)
    native.bind(it.provide_data, it.provide_label)
    native.init_optimizer(optimizer_params=sgd)
    assert max_relative_diff(params, native.get_params()[0]) == 0.0
    np.testing.assert_allclose(native.predict(it).asnumpy(), expected, rtol=1e-6)

    with raymodule.Module.load(prefix, 2, load_optimizer_states=True, context=[mx.cpu(0)]) as mod:
        mod.bind(it.provide_data, it.provide_label)
        mod.init_optimizer(optimizer_params=sgd)
        np.testing.assert_allclose(mod.predict(it).asnumpy(), expected, rtol=1e-6)


def test_wrong_keys_and_missing_files_on_s3_fail_in_words(s3, monkeypatch):
    with pytest.raises(FileNotFoundError, match=f"no file at 's3://{BUCKET}/none"):
        storage.read_bytes(s3.uri("none-0001.params"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(OSError, match=f"cannot write 's3://{BUCKET}/denied") as err:
        storage.write_bytes(s3.uri("denied.bin"), b"x")
    assert "wrong-secret" not in str(err.value)


def test_a_folder_travels_as_its_location_and_a_process_resolves_it_once(monkeypatch):
    """A checkpoint's writer task gets the run's folder anew each time: it is pickled as its
    location, and a process makes the filesystem of a URI once (the AWS SDK spends about
    11 ms of CPU making an S3 one), and again when the storage settings in its environment
    change (other keys are not answered with the old ones)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "travels-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "travels-secret")
    uri = "s3://bucket/runs?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"
    folder = storage.Folder(uri)
    data = pickle.dumps(folder)
    assert b"S3FileSystem" not in data and b"travels-secret" not in data
    copy = pickle.loads(data)
    assert copy.location == folder.location and copy._fs is folder._fs
    assert storage.Folder(uri)._fs is folder._fs
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "other-secret")
    assert storage.Folder(uri)._fs is not folder._fs


def test_a_folder_loaded_elsewhere_keeps_the_s3_region_it_resolved(monkeypatch):
    """An S3 URI that names no region gets one where the Folder is made (pyarrow asks the
    bucket, or takes the environment's); where it is loaded, that region is used, not asked
    for again."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    folder = storage.Folder("s3://bucket/runs?endpoint_override=127.0.0.1:9&scheme=http")
    assert folder._fs.region == "eu-west-3"
    data = pickle.dumps(folder)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")  # another process's environment
    loaded = pickle.loads(data)
    assert loaded._fs.region == "eu-west-3" and loaded.location == folder.location
    assert storage.Folder(folder.location)._fs.region == "ap-south-1"


def test_a_checkpoint_on_s3_writes_each_file_in_one_request(s3, tmp_path):
    """Each file a checkpoint writes is one PutObject, not a multipart upload's three
    requests (raymodule opens S3 with ``allow_delayed_open``); counted by the server."""
    from raymodule.checkpoint import Snapshot, write
    from raymodule.data import nd_bytes
    from raymodule.lease import Lease

    run = storage.Folder(s3.uri(f"{tmp_path.name}/run"))
    lease = Lease(run, "run", ttl_s=600)
    lease.acquire()
    try:
        weights = nd_bytes({"arg:w": mx.nd.ones((64, 32))})
        files = {"model-symbol.json": mlp().tojson().encode()}
        counted = []
        for step in (10, 20, 30):
            before = s3.requests()
            snapshot = Snapshot(weights, nd_bytes({"0": mx.nd.zeros((64, 32))}), {"type": "sgd"})
            position = {"epoch": 0, "batch": step, "global_step": step}
            info = dict(position, files=files, world_size=1, work_load_list=None)
            name = write(run, snapshot, info, keep=2, check_owner=lease.check)
            assert name == f"ckpt-{step:010d}"
            after = s3.requests()
            counted.append({kind: after[kind] - before.get(kind, 0) for kind in after})
    finally:
        lease.release()
    for requests in counted:
        assert requests.get("POST", 0) == 0, requests  # no multipart upload
    # symbol, parameters, optimizer state and its description, manifest, latest: 6 PUTs,
    # and one more when the oldest checkpoint is deleted (pyarrow keeps the folder's marker)
    assert [requests["PUT"] for requests in counted] == [6, 6, 7]
    assert raymodule.latest_checkpoint(run.location).global_step == 30
