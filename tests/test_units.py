"""Pure pieces: bucket planning, batch splitting, settings, metric routing, core shares."""

from __future__ import annotations

import mxnet as mx
import numpy as np
import pytest
import ray
from mxnet.executor_manager import _split_input_slice

from raymodule import data, metrics, ndfile
from raymodule import sealed as sealed_module
from raymodule.constants import Settings
from raymodule.controller.chunks import steps_per_call
from raymodule.sealed import Sealed, seal_objects
from raymodule.worker.collective import plan_buckets
from raymodule.worker.cores import share


@pytest.mark.parametrize(
    "index, count, cores, expected",
    [
        (0, 2, {0, 1}, {0}),
        (1, 2, {0, 1}, {1}),
        (2, 3, {4, 5, 7}, {7}),  # the cores it may use, in order, whatever their numbers
        (0, 1, {0, 1}, {0, 1}),  # a group of one: all of them
        (0, 2, {0, 1, 2, 3}, {0, 1, 2, 3}),  # fewer workers than cores: the kernel places them
        (1, 4, {0, 1}, {0, 1}),  # more workers than cores: they share them anyway
    ],
)
def test_a_nodes_workers_get_a_core_each_only_when_they_are_as_many_as_the_cores(
    index, count, cores, expected
):
    assert share(index, count, cores) == expected


def test_buckets_fill_up_to_the_limit_and_keep_order():
    assert plan_buckets([4, 4, 4, 4], 8) == [[0, 1], [2, 3]]
    assert plan_buckets([4, 20, 4], 8) == [[0], [1], [2]]  # an oversized array stands alone
    assert plan_buckets([1, 2, 3], 100) == [[0, 1, 2]]
    assert plan_buckets([], 8) == []


def test_split_is_mxnets_and_weighted():
    assert data.split_slices(8, [1, 1]) == [slice(0, 4), slice(4, 8)]
    assert data.split_slices(8, [1, 1, 2]) == [slice(0, 2), slice(2, 4), slice(4, 8)]
    with pytest.raises(ValueError, match="a batch of 2 samples cannot be split over 3"):
        data.split_slices(2, [1, 1, 1])
    # the controller's copy of MXNet's rule gives what MXNet's own gives, or fails as it does
    rng = np.random.default_rng(0)
    for batch_size in (1, 2, 3, 7, 8, 64, 127, 128, 1000):
        for n in (1, 2, 3, 4, 7):
            for weights in ([1] * n, list(rng.uniform(0.1, 3, n)), list(range(1, n + 1))):
                try:
                    expected = _split_input_slice(batch_size, weights)
                except ValueError:
                    with pytest.raises(ValueError, match="cannot be split"):
                        data.split_slices(batch_size, weights)
                    continue
                assert data.split_slices(batch_size, weights) == expected


def test_sealed_objects_are_opened_where_they_are_used_and_plain_data_travels_as_it_is(
    monkeypatch,
):
    metric, symbol, ref = mx.metric.create("acc"), mx.sym.Variable("x"), ray.put(1)
    args = (3, "name", [symbol], {"a": np.ones(2), "m": metric}, ref, np.float32, (None, 1.5))
    sealed = seal_objects(args)
    assert sealed[:2] == (3, "name") and sealed[4] is ref and sealed[5] is np.float32
    assert isinstance(sealed[2][0], Sealed) and isinstance(sealed[3]["m"], Sealed)
    assert sealed[3]["a"] is args[3]["a"] and sealed[6] == (None, 1.5)
    # a process that opens them (a worker; the client, reading a reply) gets the objects
    opened = ray.get(ray.put(sealed))
    assert opened[2][0].name == "x" and opened[3]["m"].name == "accuracy"
    assert ray.get(opened[4]) == 1
    # the controller's process keeps them sealed, and relays them as they came
    monkeypatch.setattr(sealed_module, "_keep", True)
    kept = ray.get(ray.put(sealed))
    monkeypatch.setattr(sealed_module, "_keep", False)
    assert isinstance(kept[2][0], Sealed) and isinstance(kept[3]["m"], Sealed)
    relayed = ray.get(ray.put(kept))
    assert relayed[2][0].name == "x" and relayed[3]["m"].name == "accuracy"


def test_batch_slices_follow_each_inputs_batch_axis():
    batch = data.Batch([np.arange(12).reshape(3, 4)], [np.arange(4)], [1], [0])
    x, y = batch.worker_slice(slice(1, 3))
    np.testing.assert_array_equal(x[0], np.arange(12).reshape(3, 4)[:, 1:3])
    np.testing.assert_array_equal(y[0], [1, 2])


def test_settings_come_from_the_environment_and_are_checked(monkeypatch):
    assert Settings.from_env() == Settings()
    monkeypatch.setenv("RAYMODULE_STEPS_PER_CALL", "8")
    monkeypatch.setenv("RAYMODULE_COLLECTIVE_TIMEOUT_S", "2.5")
    assert Settings.from_env().steps_per_call == 8
    assert Settings.from_env().collective_timeout_s == 2.5
    monkeypatch.setenv("RAYMODULE_STEPS_PER_CALL", "many")
    with pytest.raises(ValueError, match="RAYMODULE_STEPS_PER_CALL='many' must be an integer"):
        Settings.from_env()
    monkeypatch.setenv("RAYMODULE_STEPS_PER_CALL", "0")
    with pytest.raises(ValueError, match="must be > 0"):
        Settings.from_env()


def test_a_call_carries_about_call_s_of_steps_within_its_bounds():
    settings = Settings(steps_per_call=32, call_s=0.2)
    assert steps_per_call(settings, None) == 4  # no step timed yet
    assert steps_per_call(settings, 0.01) == 20
    assert steps_per_call(settings, 0.001) == 32  # fast steps: at most RAYMODULE_STEPS_PER_CALL
    assert steps_per_call(settings, 3.0) == 1  # a step longer than a call: one a call
    assert steps_per_call(Settings(steps_per_call=2, call_s=0.2), None) == 2


def test_counter_metrics_run_on_workers_others_on_the_client():
    assert metrics.runs_on_workers(mx.metric.create(["acc", "ce", "mse"]))
    assert not metrics.runs_on_workers(mx.metric.create(["acc", "f1"]))
    total = mx.metric.Accuracy()
    part = mx.metric.Accuracy()
    part.update([mx.nd.array([0, 1])], [mx.nd.array([[1, 0], [1, 0]])])
    metrics.add_counters(total, metrics.counters(part))
    metrics.add_counters(total, metrics.counters(part))
    assert total.get() == ("accuracy", 0.5) and total.num_inst == 4


@pytest.mark.parametrize(
    "arrays",
    [
        {
            "arg:w": mx.nd.array(np.arange(12).reshape(3, 4)),
            "aux:m": mx.nd.ones(5, dtype="float16"),
        },
        {"ids": mx.nd.array([1, 2], dtype="int64"), "é": mx.nd.ones((1,))},
        {
            "rows": mx.nd.sparse.row_sparse_array((np.ones((1, 3)), [1]), shape=(4, 3)),
            "csr": mx.nd.sparse.csr_matrix(np.eye(3)),
        },
        [mx.nd.ones((2, 2)), mx.nd.zeros((3,))],
        mx.nd.ones((7,)),
        {},
    ],
    ids=["dense", "int64-unicode", "sparse", "list", "one", "empty"],
)
def test_nd_bytes_are_the_bytes_mx_nd_save_writes(arrays, tmp_path):
    path = str(tmp_path / "saved")
    mx.nd.save(path, arrays)
    with open(path, "rb") as source:
        saved = source.read()
    assert data.nd_bytes(arrays) == saved
    buffer = data.nd_buffer(arrays)
    assert buffer.dtype == np.uint8 and buffer.tobytes() == saved


def _saved(arrays, tmp_path) -> bytes:
    path = str(tmp_path / "saved")
    mx.nd.save(path, arrays)
    with open(path, "rb") as source:
        return source.read()


def test_ndfile_reads_dense_arrays_as_mxnet_does(tmp_path):
    """What ``mx.nd.load_frombuffer`` gives (names, shapes, dtypes, values), from ``bytes`` and
    from a numpy buffer, with a float64 after an odd count of float32 (not 8-byte aligned in
    the file) and an array with a 0 dimension."""
    arrays = {
        "arg:w": mx.nd.array(np.arange(12).reshape(3, 4)),
        "a": mx.nd.array([1.5, 2, 3]),
        "b": mx.nd.array([0.1, float("nan")], dtype="float64"),
        "aux:m": mx.nd.array([1, float("inf")], dtype="float16"),
        "ids": mx.nd.array([1, 2], dtype="int64"),
        "n": mx.nd.array([-7], dtype="int32"),
        "é": mx.nd.array([[[-1]]], dtype="int8"),
        "u": mx.nd.array([255], dtype="uint8"),
        "t": mx.nd.array([1, 0], dtype="bool"),
        "e": mx.nd.array(np.zeros((2, 0, 3))),
    }
    saved = _saved(arrays, tmp_path)
    expected = mx.nd.load_frombuffer(saved)
    for buffer in (saved, data.nd_buffer(arrays)):
        read = ndfile.dense_arrays(buffer)
        assert list(read) == list(expected)
        for name, array in expected.items():
            array = array.asnumpy()
            assert read[name].dtype == array.dtype and read[name].shape == array.shape, name
            np.testing.assert_array_equal(read[name], array)
    assert ndfile.dense_arrays(_saved({}, tmp_path)) == {}  # MXNet gives [] (no names)


def test_ndfile_leaves_to_mxnet_what_it_does_not_read(tmp_path):
    """Sparse arrays, a list, arrays saved under NumPy shape semantics (MXNet loads them only
    there), a NUL in a name (MXNet's names end there), a dtype MXNet cannot load, and broken
    or hostile bytes: None, never an exception."""
    dense = _saved({"w": mx.nd.ones((2, 2))}, tmp_path)
    assert ndfile.dense_arrays(dense) is not None
    for what in (
        {"rows": mx.nd.sparse.row_sparse_array((np.ones((1, 3)), [1]), shape=(4, 3))},
        {"csr": mx.nd.sparse.csr_matrix(np.eye(3))},
        [mx.nd.ones((2, 2))],
    ):
        assert ndfile.dense_arrays(_saved(what, tmp_path)) is None, what
    assert ndfile.dense_arrays(data.nd_bytes({"a\0b": mx.nd.ones(1)})) is None  # as written
    with mx.util.np_shape(True):
        assert ndfile.dense_arrays(_saved({"w": mx.nd.ones((2, 2))}, tmp_path)) is None
    header = 24 + 12  # the list's head, then the array's magic, storage type and dimensions
    dims, flag = slice(header, header + 16), slice(header + 16 + 8, header + 16 + 12)

    def changed(where: slice, value: bytes) -> bytes:
        return dense[: where.start] + value + dense[where.stop :]

    for broken in (
        dense[:-1],
        dense + b"\0",
        dense[:20],
        b"",
        b"\0" * 24,
        changed(flag, (8).to_bytes(4, "little")),  # int16: MXNet 1.9.1 refuses it
        changed(dims, np.array([0, 2**62], "<i8").tobytes()),  # empty, too big for numpy
        changed(dims, np.array([-1, 4], "<i8").tobytes()),
        changed(dims, np.array([2**31, 2**31], "<i8").tobytes()),
        changed(slice(16, 24), (2**64 - 1).to_bytes(8, "little")),  # the count of arrays
    ):
        assert ndfile.dense_arrays(broken) is None, broken
    rng = np.random.default_rng(0)
    for _ in range(2000):  # any byte changed, any length cut: a dict or None
        mutated = bytearray(dense[: rng.integers(len(dense) + 1)])
        if mutated:
            mutated[rng.integers(len(mutated))] = rng.integers(256)
        ndfile.dense_arrays(bytes(mutated))


def test_nd_buffer_copies_each_arrays_data_anew_after_a_header_made_once(tmp_path):
    """The header MXNet makes for an array's shape, dtype and device is made once; the data
    is copied at every call. Arrays of one shape on two devices, a float64 after an odd count
    of float32 (its data not 8-byte aligned in the buffer) and an int8 one (pickled by
    MXNet)."""
    arrays = {
        "a": mx.nd.array(np.arange(3), dtype="float32"),
        "b": mx.nd.array([0.1, 0.2], dtype="float64"),
        "c": mx.nd.ones((2, 3), ctx=mx.cpu(0)),
        "d": mx.nd.ones((2, 3), ctx=mx.cpu(1)),
        "f": mx.nd.array([1, -2], dtype="int8"),
    }
    path = str(tmp_path / "saved")
    for step in range(3):
        mx.nd.save(path, arrays)
        with open(path, "rb") as source:
            assert data.nd_buffer(arrays).tobytes() == source.read(), step
        for name in "abcd":
            arrays[name] += 1.5


def test_nd_bytes_refuses_what_mx_nd_save_refuses():
    for bad in ({"w": np.ones(2)}, {1: mx.nd.ones(2)}, (mx.nd.ones(2),), None):
        with pytest.raises(TypeError, match="what mx.nd.save takes"):
            data.nd_bytes(bad)


def test_ndarray_view_shares_memory_and_copies_what_it_cannot_view():
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    view = data.ndarray_view(rows)
    assert not rows.flags.writeable  # nothing may write under MXNet's feet
    np.testing.assert_array_equal(view.asnumpy(), rows)
    assert view.dtype == np.float32 and view.shape == (3, 4)
    # an array it cannot view is copied, in its own dtype
    for other in (rows.T, np.zeros((0, 4), np.float32), np.arange(4, dtype=np.int8)):
        copied = data.ndarray_view(other)
        assert copied.dtype == other.dtype
        np.testing.assert_array_equal(copied.asnumpy(), other)


def test_copy_into_writes_the_target_in_place():
    target = mx.nd.zeros((2, 3))
    data.copy_into(target, np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(target.asnumpy(), np.arange(6).reshape(2, 3))
    data.copy_into(target, np.ones((2, 3), dtype=np.float64))  # another dtype: assigned
    np.testing.assert_array_equal(target.asnumpy(), np.ones((2, 3)))
