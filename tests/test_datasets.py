"""raymodule.data.ArrayDataset and DatasetIter: the documented order, NDArrayIter's batches,
and fit over them equal to one native MXNet device."""

from __future__ import annotations

import collections
import json
import os
import pickle
import signal

import mxnet as mx
import numpy as np
import pytest
import ray
from conftest import Interrupted, dataset, interrupt_at, max_relative_diff, mlp

import raymodule
from raymodule.data import ArrayDataset, DatasetIter, NDArrayIterRows, rows_of

SGD = {"learning_rate": 0.1, "momentum": 0.9, "wd": 1e-4}


def read(it) -> list[tuple]:
    """One pass: each batch's data and label arrays as numpy, its pad and its index."""
    return [
        ([a.asnumpy() for a in b.data], [a.asnumpy() for a in b.label], b.pad, b.index) for b in it
    ]


def test_pass_k_visits_the_documented_permutation():
    n, size = 23, 5
    x = np.arange(n, dtype="float32")[:, None] * np.ones((1, 3), "float32")
    it = DatasetIter(ArrayDataset(x, np.arange(n)), size, shuffle=True, seed=11)
    for k in range(3):  # pass k: the reset() calls so far
        order = np.random.default_rng([11, k]).permutation(n)
        batches = read(it)
        assert len(batches) == 5
        for b, (data, label, pad, index) in enumerate(batches):
            expected = order[np.arange(b * size, (b + 1) * size) % n]  # pad: from the start
            np.testing.assert_array_equal(index, expected)
            np.testing.assert_array_equal(label[0], expected)
            np.testing.assert_array_equal(data[0][:, 0], expected)
            assert pad == (2 if b == 4 else 0)
        it.reset()
    assert it.epoch == 3
    it.begin_pass(1)  # as after one reset()
    np.testing.assert_array_equal(
        read(it)[0][3], np.random.default_rng([11, 1]).permutation(n)[:size]
    )
    # no shuffle: 0..n-1 in every pass
    plain = DatasetIter(ArrayDataset(x), size, last_batch_handle="discard")
    for _ in range(2):
        np.testing.assert_array_equal(
            np.concatenate([index for _, _, _, index in read(plain)]), np.arange(20)
        )
        plain.reset()


def test_order_depends_on_seed_and_pass_only():
    x, _ = dataset(n=40)

    def order(seed, draws_between=0):
        it = DatasetIter(ArrayDataset(x), 8, shuffle=True, seed=seed)
        it.reset()  # pass 1
        np.random.rand(draws_between)  # the caller's streams do not move the order
        mx.random.seed(draws_between)
        return np.concatenate([index for _, _, _, index in read(it)])

    assert (order(5) == order(5, draws_between=17)).all()
    assert not (order(5) == order(6)).all()
    np.testing.assert_array_equal(order(5), np.random.default_rng([5, 1]).permutation(40))


@pytest.mark.parametrize("handle", ["pad", "discard", "roll_over"])
@pytest.mark.parametrize("size", [1, 4, 7, 10], ids=lambda s: f"batch{s}")
def test_unshuffled_batches_are_ndarrayiters(handle, size):
    x = np.arange(30, dtype="int64").reshape(10, 3)  # NDArrayIter makes numpy float32
    y = np.arange(10, dtype="int32")
    native = mx.io.NDArrayIter(x, y, size, last_batch_handle=handle)
    ours = DatasetIter(ArrayDataset(x, y), size, last_batch_handle=handle)
    assert ours.provide_data == native.provide_data
    assert ours.provide_label == native.provide_label
    for _ in range(4):  # roll_over carries samples from pass to pass
        expected, actual = read(native), read(ours)
        assert len(actual) == len(expected)
        for (ed, el, ep, _), (ad, al, ap, _) in zip(expected, actual):
            for e, a in zip(ed + el, ad + al):
                assert a.dtype == e.dtype
                np.testing.assert_array_equal(a, e)
            assert ap == ep
        native.reset()
        ours.reset()


def test_ndarray_inputs_keep_their_dtype_and_pad_tiles_as_ndarrayiter():
    x = mx.nd.array(np.arange(6).reshape(3, 2), dtype="float64")
    native = mx.io.NDArrayIter(x, None, 8)  # a batch larger than the data: tiled
    ours = DatasetIter(ArrayDataset(x), 8)
    assert ours.provide_label == [] and ours.provide_data == native.provide_data
    [(ed, _, ep, _)] = read(native)
    [(ad, al, ap, _)] = read(ours)
    assert ad[0].dtype == np.float64 and al == [] and ap == ep == 5
    np.testing.assert_array_equal(ad[0], ed[0])


def test_dicts_name_the_inputs_as_ndarrayiter():
    data = {"b_img": np.ones((9, 2, 3)), "a_vec": np.arange(9.0)}
    label = {"score": np.arange(9.0), "cls": np.zeros(9)}
    native = mx.io.NDArrayIter(data, label, 4, last_batch_handle="pad")
    ours = DatasetIter(ArrayDataset(data, label), 4, data_name="unused", label_name="unused")
    assert [d.name for d in ours.provide_data] == ["a_vec", "b_img"]
    assert ours.provide_data == native.provide_data
    assert ours.provide_label == native.provide_label
    for (ed, el, ep, _), (ad, al, ap, _) in zip(read(native), read(ours)):
        for e, a in zip(ed + el, ad + al):
            np.testing.assert_array_equal(a, e)
        assert ap == ep


def rows_read(rows: NDArrayIterRows) -> list[tuple]:
    """One pass of ``rows`` as ``fit`` reads it: indices, then the callbacks' batches."""
    batches = []
    while True:
        try:
            index, pad = rows.next_indices()
        except StopIteration:
            return batches
        b = rows.batch_of(index, pad)
        batches.append(([a.asnumpy() for a in b.data], [a.asnumpy() for a in b.label], pad))


@pytest.mark.parametrize("shuffle", [False, True], ids=["in-order", "shuffled"])
@pytest.mark.parametrize(
    "handle, n, size",
    [  # NDArrayIter itself fails with roll_over and a batch larger than the data
        (handle, n, size)
        for handle in ("pad", "discard", "roll_over")
        for n, size in ((48, 16), (50, 16), (37, 5), (10, 16))
        if handle != "roll_over" or n >= size
    ],
)
def test_an_ndarrayiter_as_rows_gives_its_batches_and_draws_as_it(handle, shuffle, n, size):
    """fit reads a plain NDArrayIter as rows (the workers read them): the same batches
    pass after pass, numpy's global RNG drawn from as the iterator draws, and the iterator
    left as reading it would (order, position, a roll_over's kept batch)."""
    x = np.arange(n * 3, dtype="int64").reshape(n, 3)  # NDArrayIter makes numpy float32
    y = {"b": np.arange(n, dtype="int32"), "a": np.arange(n) * 2.0}
    made = []
    for read_pass in (read, None):
        np.random.seed(7)
        it = mx.io.NDArrayIter(x, y, size, shuffle=shuffle, last_batch_handle=handle)
        rows = rows_of(it)
        assert isinstance(rows, NDArrayIterRows) and rows.provide_data == it.provide_data
        assert rows.provide_label == it.provide_label
        passes = []
        for _ in range(6):  # roll_over: 37 rows in 5s keep none after the fifth pass
            one = read_pass(it) if read_pass else rows_read(rows)
            passes.append([(d, lab, pad) for d, lab, pad, *_ in one])
            (it if read_pass else rows).reset()
        made.append((passes, np.random.random(), it))
    (expected, expected_draw, native), (actual, actual_draw, source) = made
    for e_pass, a_pass in zip(expected, actual, strict=True):
        for (ed, el, ep), (ad, al, ap) in zip(e_pass, a_pass, strict=True):
            for e, a in zip(ed + el, ad + al, strict=True):
                assert a.dtype == e.dtype
                np.testing.assert_array_equal(a, e)
            assert ap == ep
    assert actual_draw == expected_draw
    assert source.cursor == native.cursor
    np.testing.assert_array_equal(source.data[0][1].asnumpy(), native.data[0][1].asnumpy())
    assert (source._cache_data is None) == (native._cache_data is None)
    if native._cache_data is not None:
        np.testing.assert_array_equal(
            source._cache_data[0].asnumpy(), native._cache_data[0].asnumpy()
        )


def test_only_a_plain_dense_ndarrayiter_is_read_as_rows():
    x, y = np.zeros((20, 3), "float32"), np.zeros(20, "float32")

    class Augmented(mx.io.NDArrayIter):  # may give other batches than its arrays' rows
        pass

    sparse = mx.nd.array(x).tostype("csr")
    assert rows_of(mx.io.NDArrayIter(x, y, 4)) is not None
    assert rows_of(Augmented(x, y, 4)) is None
    assert rows_of(mx.io.NDArrayIter(sparse, y, 4, last_batch_handle="discard")) is None
    assert rows_of(mx.io.NDArrayIter(x.reshape(4, 5, 3), None, 2, layout="TNC")) is None
    assert rows_of(DatasetIter(ArrayDataset(x, y), 4)) is None
    assert rows_of(mx.io.NDArrayIter(x, np.zeros(25), 4)) is None  # MXNet takes longer labels
    kept = mx.io.NDArrayIter(x, y, 8, last_batch_handle="roll_over")
    read(kept)  # keeps its last 4 samples for the next pass
    assert rows_of(kept) is None
    kept.reset()
    assert rows_of(kept) is None
    read(kept)  # 4 kept + 20 = 3 batches: none kept
    assert rows_of(kept) is not None
    read_through = mx.io.NDArrayIter(x, y, 8, last_batch_handle="discard")
    read(read_through)  # keeps its last 4 samples, which discard never uses
    assert rows_of(read_through) is not None


def test_rows_whose_ndarrayiter_was_shuffled_elsewhere_refuse_to_guess_its_order():
    it = mx.io.NDArrayIter(np.zeros((20, 3)), None, 4, shuffle=True)
    rows = rows_of(it)
    rows.reset()
    it.reset()  # as a callback might: a permutation the rows never see
    with pytest.raises(RuntimeError, match="shuffled outside fit"):
        rows.reset()


def test_names_default_to_mxnets():
    it = DatasetIter(ArrayDataset(np.zeros((4, 2)), np.zeros(4)), 2, data_name="x", label_name="y")
    assert [d.name for d in it.provide_data] == ["x"]
    assert [d.name for d in it.provide_label] == ["y"]


def test_bad_input_is_refused_in_words():
    with pytest.raises(ValueError, match=r"disagree in length: data has 5, label has 4"):
        ArrayDataset(np.zeros((5, 2)), np.zeros(4))
    with pytest.raises(ValueError, match=r"data\['a'\] has 5, data\['b'\] has 6"):
        ArrayDataset({"a": np.zeros(5), "b": np.zeros(6)})
    with pytest.raises(ValueError, match="no samples"):
        ArrayDataset(np.zeros((0, 3)))
    with pytest.raises(TypeError, match="data is a list"):
        ArrayDataset([1, 2, 3])
    ds = ArrayDataset(np.zeros((5, 2)))
    for size in (0, -3):
        with pytest.raises(ValueError, match=f"batch_size={size} must be >= 1"):
            DatasetIter(ds, size)
    with pytest.raises(ValueError, match="batch_size=2.5 must be an int"):
        DatasetIter(ds, 2.5)
    with pytest.raises(ValueError, match="last_batch_handle='keep' must be one of 'pad'"):
        DatasetIter(ds, 2, last_batch_handle="keep")
    # samples that do not fit the symbol (3x3 images into a 5x5 convolution): said in the
    # client, before any worker binds
    images = DatasetIter(ArrayDataset(np.zeros((8, 1, 3, 3)), np.zeros(8)), 4)
    conv = mx.sym.Convolution(mx.sym.var("data"), kernel=(5, 5), num_filter=2)
    net = mx.sym.SoftmaxOutput(mx.sym.FullyConnected(conv, num_hidden=2), name="softmax")
    with raymodule.Module(net, context=[mx.cpu(0), mx.cpu(1)]) as mod:
        with pytest.raises(ValueError, match=r"\(4, 1, 3, 3\).*do not fit the symbol"):
            mod.fit(images, num_epoch=1)
        assert mod.workers is None


def test_the_dataset_goes_to_the_object_store_once_and_travels_as_its_reference():
    x, y = dataset(n=50)
    ds = ArrayDataset(x, y)
    assert len(ds) == 50
    assert ds._ref is None  # plain use puts nothing
    local = pickle.loads(pickle.dumps(ds))  # before ref(): the arrays travel
    np.testing.assert_array_equal(local.take(np.array([3, 1]))[0][0], x[[3, 1]])
    ref = ds.ref()
    assert ds.ref() is ref
    assert len(pickle.dumps(ds)) < 2000  # after: only the reference

    @ray.remote
    def rows(dataset, indices):
        data, label = dataset.take(indices)
        return data[0], label[0], not dataset.data[0].flags.writeable  # read in place

    data, label, zero_copy = ray.get(rows.remote(ds, np.array([7, 2, 7])))
    np.testing.assert_array_equal(data, x[[7, 2, 7]])
    np.testing.assert_array_equal(label, y[[7, 2, 7]])
    assert zero_copy


def test_rows_put_their_copy_of_the_arrays_once_then_read_the_stores():
    x, y = dataset(n=50)
    rows = rows_of(mx.io.NDArrayIter(x, y, 10))
    ref = rows.dataset.ref()
    assert rows.dataset.ref() is ref and rows.dataset._data is None  # the copy is dropped
    data, label = rows.dataset.take(np.array([4, 1]))
    np.testing.assert_array_equal(data[0], x[[4, 1]])
    np.testing.assert_array_equal(label[0], y[[4, 1]])
    assert not rows.dataset.data[0].flags.writeable  # the store's, read in place


def test_fit_on_two_workers_equals_one_native_device():
    x, y = dataset(n=100)
    ds = ArrayDataset(x, y)
    symbol = mlp()

    def fit(mod):
        it = DatasetIter(ds, 16, shuffle=True, seed=4)  # 100 = 6 * 16 + 4: the last one pads
        metric = mx.metric.Accuracy()
        mx.random.seed(3)
        mod.fit(
            it,
            eval_metric=metric,
            num_epoch=2,
            optimizer="sgd",
            optimizer_params=SGD,
            initializer=mx.init.Xavier(),
        )
        assert it.epoch == 2  # fit reset it once per epoch
        predicted = mod.predict(DatasetIter(ds, 16)).asnumpy()
        return mod.get_params()[0], metric.get(), predicted

    native_params, native_metric, native_pred = fit(mx.mod.Module(symbol))
    with raymodule.Module(symbol, context=[mx.cpu(0), mx.cpu(1)]) as mod:
        ray_params, ray_metric, ray_pred = fit(mod)
    assert max_relative_diff(native_params, ray_params) < 1e-5
    assert ray_metric == native_metric
    assert ray_pred.shape == (100, 10)  # the pad dropped
    np.testing.assert_allclose(ray_pred, native_pred, rtol=1e-4, atol=1e-6)
    # the shuffled order mattered: the unshuffled fit trains another model
    with raymodule.Module(symbol, context=[mx.cpu(0), mx.cpu(1)]) as mod:
        mx.random.seed(3)
        mod.fit(
            DatasetIter(ds, 16),
            num_epoch=2,
            optimizer="sgd",
            optimizer_params=SGD,
            initializer=mx.init.Xavier(),
        )
        assert max_relative_diff(native_params, mod.get_params()[0]) > 1e-3


def test_exported_from_the_package():
    assert raymodule.ArrayDataset is ArrayDataset and raymodule.DatasetIter is DatasetIter
    assert issubclass(DatasetIter, mx.io.DataIter)


def test_steps_sent_again_slice_the_same_indices():
    """A dataset's steps carry indices: a new split only re-slices them (no parts to copy)."""
    from raymodule.controller import chunks

    x, y = dataset(n=30)
    ds = ArrayDataset(x, y)
    ds.ref()
    index = np.array([9, 3, 27, 4, 0, 11])
    spec = {"serials": [0], "mids": [1], "sizes": [6], "slices": [[(0, 2), (2, 4), (4, 6)]]}
    spec.update(dataset=ds, indices=[index], labels=[True])
    for weights, cuts in [([1, 1, 1], [2, 4, 6]), ([1, 1], [3, 6]), ([1, 2], [2, 6])]:
        steps = chunks.steps_of(spec)
        args = chunks.worker_args(steps, [weights], 60.0)
        assert chunks.reads(list(range(len(weights))), args) == {r: [] for r in range(len(weights))}
        start = 0
        for (parts, plan), stop in zip(args, cuts):
            assert plan is None
            sent = pickle.loads(pickle.dumps(parts))  # as a worker receives it: the reference
            assert sent.dataset._data is None
            (batch,) = sent.batches()
            np.testing.assert_array_equal(batch.data[0], x[index[start:stop]])
            np.testing.assert_array_equal(batch.label[0], y[index[start:stop]])
            start = stop


class PutCounter:
    """Every ``ray.put`` of the test process during a ``with``: what was put, its size."""

    def __init__(self, monkeypatch):
        self.objects: list = []
        self.bytes = 0
        original = ray.put

        def counted(value, *args, **kwargs):
            self.objects.append(value)
            self.bytes += len(pickle.dumps(value))
            return original(value, *args, **kwargs)

        monkeypatch.setattr(ray, "put", counted)


class ActorCalls:
    """Every actor-method call the test process makes, counted by (actor class, method) as
    Ray submits it."""

    def __init__(self, monkeypatch):
        self.counts: collections.Counter = collections.Counter()
        submit = ray.actor.ActorMethod._remote

        def counted(method, *args, **kwargs):
            actor = method._actor._ray_actor_creation_function_descriptor.class_name
            self.counts[(actor, method._method_name)] += 1
            return submit(method, *args, **kwargs)

        monkeypatch.setattr(ray.actor.ActorMethod, "_remote", counted)

    def take(self) -> collections.Counter:
        counts, self.counts = self.counts, collections.Counter()
        return counts


@pytest.mark.filterwarnings("ignore:Parameters already initialized")
def test_a_dataset_epoch_is_one_controller_call_and_none_to_a_worker(monkeypatch):
    """The controller runs a DatasetIter's steps from one plan an epoch: the client calls no
    worker during fit, and the controller as often for 200 steps an epoch as for 50."""
    symbol = mlp()
    calls = ActorCalls(monkeypatch)
    made = {}
    with raymodule.Module(symbol, context=[mx.cpu(0), mx.cpu(1)]) as mod:
        for n in (160, 400, 1600):  # bound by the first fit; then 50 and 200 steps an epoch
            train = DatasetIter(ArrayDataset(*dataset(n=n)), 8, shuffle=True)
            train.dataset.ref()  # its one transfer
            calls.take()
            mod.fit(train, num_epoch=2, optimizer_params=SGD, initializer=mx.init.Xavier())
            made[n] = calls.take()
    assert made[400] == made[1600], made
    assert not [call for call in made[400] if call[0] != "Controller"], made[400]
    assert made[400][("Controller", "run")] == 2, made[400]  # one plan an epoch
    # the only call waited for: the plan waits for the calls posted before it itself
    assert ("Controller", "sync") not in made[400], made[400]
    # an epoch: its metric, its plan and its end (neither read); and the run's limits once
    assert sum(made[400].values()) <= 7, made[400]


@pytest.mark.filterwarnings("ignore:Parameters already initialized")
def test_a_call_posted_before_a_plan_that_failed_fails_the_plan_before_any_step():
    """A plan waits for the calls posted before it (set_params, set_metric, ...) and raises
    the first error among them, as a sync would, before it sends a step; a loop with no
    batch to plan waits for them all the same."""
    train = DatasetIter(ArrayDataset(*dataset(n=160)), 8)
    with raymodule.Module(mlp(), context=[mx.cpu(0), mx.cpu(1)]) as mod:
        mod.bind(train.provide_data, train.provide_label)
        mod.init_params(mx.init.Xavier())
        mod.init_optimizer(optimizer_params=SGD)
        workers = mod._workers
        wrong = {"fc1_weight": np.zeros((3, 3), np.float32)}  # past Module's own checks
        workers.post("set_params", mod._id, wrong, {}, True, False)
        with pytest.raises(raymodule.RayModuleError, match="set_params"):
            mod.fit(train, num_epoch=1)
        workers.sync()  # the error was raised once: nothing is left to wait for
        assert workers.steps_sent == 0 and workers.call("applied") == [0, 0]
        assert workers.lost is None
        # with no batch to run, no plan waits: the client does
        workers.post("set_params", mod._id, wrong, {}, True, False)
        with pytest.raises(raymodule.RayModuleError, match="set_params"):
            mod.score(DatasetIter(ArrayDataset(*dataset(n=160)), 8), "acc", num_batch=0)


def test_breaking_out_of_iter_predict_stops_the_plan_and_the_module_goes_on():
    x, y = dataset(n=400)
    ds = ArrayDataset(x, y)
    with raymodule.Module(mlp(), context=[mx.cpu(0), mx.cpu(1)]) as mod:
        mod.bind(DatasetIter(ds, 8).provide_data, DatasetIter(ds, 8).provide_label)
        mod.init_params(mx.init.Xavier())
        outputs, nbatch, _ = next(iter(mod.iter_predict(DatasetIter(ds, 8))))
        first = outputs[0].asnumpy()  # the other 49 batches are never read
        predicted = mod.predict(DatasetIter(ds, 8)).asnumpy()
    assert nbatch == 0 and predicted.shape == (400, 10)
    np.testing.assert_allclose(first, predicted[:8], rtol=1e-6)


def test_fit_score_and_predict_send_indices_not_samples(monkeypatch):
    """With a DatasetIter the client puts the dataset once; each step carries indices."""
    x, y = dataset(n=600, shape=(50,))
    ds = ArrayDataset(x, y)
    ds.ref()  # the dataset's one transfer, before counting
    symbol = mlp()

    def fit(mod, it):
        mx.random.seed(3)
        mod.fit(
            it,
            eval_data=DatasetIter(ds, 40),
            eval_metric=mx.metric.create(["acc", "ce"]),
            num_epoch=2,
            optimizer="sgd",
            optimizer_params=SGD,
            initializer=mx.init.Xavier(),
        )
        return mod.get_params()[0]

    native = fit(mx.mod.Module(symbol), DatasetIter(ds, 30, shuffle=True, seed=1))
    with raymodule.Module(symbol, context=[mx.cpu(0), mx.cpu(1)]) as mod:
        mod.bind(DatasetIter(ds, 30).provide_data, DatasetIter(ds, 30).provide_label)
        puts = PutCounter(monkeypatch)
        params = fit(mod, DatasetIter(ds, 30, shuffle=True, seed=1))
        assert max_relative_diff(native, params) < 1e-5
        score = mod.score(DatasetIter(ds, 40), "acc")
        predicted = mod.predict(DatasetIter(ds, 40)).asnumpy()
        batches = [(o[0].asnumpy(), n, b) for o, n, b in mod.iter_predict(DatasetIter(ds, 256))]
    samples = x.nbytes + y.nbytes
    assert not any(isinstance(o, raymodule.data.Batch) for o in puts.objects)
    assert not any(
        isinstance(o, list) and any(isinstance(p, raymodule.data.Batch) for p in o)
        for o in puts.objects
    )
    # what was put: the initial parameters; far less than one pass over the samples
    assert puts.bytes < samples / 4, (puts.bytes, samples)
    assert score[0][0] == "accuracy" and score[0][1] > 0.1
    native_mod = mx.mod.Module(symbol)
    native_mod.bind(DatasetIter(ds, 40).provide_data, DatasetIter(ds, 40).provide_label)
    native_mod.set_params(params, {})
    np.testing.assert_allclose(
        predicted, native_mod.predict(DatasetIter(ds, 40)).asnumpy(), rtol=1e-4, atol=1e-6
    )
    # iter_predict: the outputs without the pad, the batch's indices and labels
    assert [(o.shape, n, b.pad) for o, n, b in batches] == [
        ((256, 10), 0, 0),
        ((256, 10), 1, 0),
        ((88, 10), 2, 168),  # 600 = 2 * 256 + 88
    ]
    np.testing.assert_allclose(
        np.concatenate([o for o, _, _ in batches]), predicted, rtol=1e-5, atol=1e-6
    )
    last = batches[-1][2]
    np.testing.assert_array_equal(last.label[0].asnumpy(), y[last.index].astype(np.float32))

    # the drop-in path: an NDArrayIter's arrays are put once, for every pass; another
    # DataIter's samples, with every pass
    reads = []  # batches whose arrays the client read: none, with no callback asking
    read_rows = raymodule.data.ndarrayiter._RowsBatch._read
    monkeypatch.setattr(
        raymodule.data.ndarrayiter._RowsBatch, "_read", lambda b: reads.append(1) or read_rows(b)
    )
    with raymodule.Module(symbol, context=[mx.cpu(0), mx.cpu(1)]) as mod:
        puts = PutCounter(monkeypatch)
        fit(mod, mx.io.NDArrayIter(x, y, 30))
        assert puts.bytes < 1.5 * samples and not reads
        puts = PutCounter(monkeypatch)
        fit(mod, mx.io.ResizeIter(mx.io.NDArrayIter(x, y, 30), 20))  # 20 batches: a pass
        assert puts.bytes > 2 * samples


def test_a_metric_on_the_client_gets_the_labels_of_the_indices():
    """F1 is not additive: the outputs come back, the client reads the labels of each worker's
    rows from its own dataset (no transfer), and the metric is MXNet's."""
    rng = np.random.RandomState(0)
    x = rng.uniform(-1, 1, (120, 20)).astype("float32")
    y = (x[:, 0] > 0).astype("float32")
    ds = ArrayDataset(x, y)
    symbol = mlp(classes=2)

    def fit(mod):
        mx.random.seed(3)
        f1 = mx.metric.F1(average="micro")
        mod.fit(
            DatasetIter(ds, 24, shuffle=True, seed=2),
            eval_metric=f1,
            num_epoch=2,
            optimizer="sgd",
            optimizer_params=SGD,
            initializer=mx.init.Xavier(),
        )
        return mod.get_params()[0], f1.get()

    native_params, native_f1 = fit(mx.mod.Module(symbol))
    with raymodule.Module(symbol, context=[mx.cpu(0), mx.cpu(1)]) as mod:
        ray_params, ray_f1 = fit(mod)
    assert max_relative_diff(native_params, ray_params) < 1e-5
    assert ray_f1[0] == native_f1[0] and ray_f1[1] == pytest.approx(native_f1[1], abs=1e-6)


def native_fit(ds, epochs=2, size=16):
    mx.random.seed(3)
    mod = mx.mod.Module(mlp())
    mod.fit(
        DatasetIter(ds, size, shuffle=True, seed=9),
        num_epoch=epochs,
        optimizer="sgd",
        optimizer_params=SGD,
        initializer=mx.init.Xavier(),
    )
    return mod.get_params()[0]


def kill_at(at, ranks, fired):
    """A batch_end_callback that SIGKILLs the workers of ``ranks`` once, at ``at`` (epoch,
    batch). Where the workers stand then does not matter: every run must end as MXNet's."""

    def kill(param):
        if (param.epoch, param.nbatch) == at and not fired:
            fired.append(True)
            for rank in ranks:
                os.kill(param.locals["self"].workers.nodes[rank]["pid"], signal.SIGKILL)

    return kill


@pytest.mark.parametrize("lost", [[1], [0, 1, 2]], ids=["one-of-three", "every-worker"])
def test_a_run_that_loses_workers_trains_the_same_global_batches(lost, tmp_path):
    """One worker lost: the survivors re-slice the same indices. Every worker lost: fit
    restarts from its checkpoint, and the epoch it resumes visits that epoch's order, not the
    next pass's."""
    x, y = dataset(n=160)
    ds = ArrayDataset(x, y)
    expected = native_fit(ds)
    fired = []
    mx.random.seed(3)
    with raymodule.Module(mlp(), context=[mx.cpu(i) for i in range(3)]) as mod:
        mod.fit(
            DatasetIter(ds, 16, shuffle=True, seed=9),
            num_epoch=2,
            optimizer="sgd",
            optimizer_params=SGD,
            initializer=mx.init.Xavier(),
            batch_end_callback=kill_at((1, 3), lost, fired),
            run=raymodule.RunConfig(
                name="r", storage=str(tmp_path), checkpoint_every=2, min_workers=1
            ),
        )
        assert fired == [True]
        assert max_relative_diff(expected, mod.get_params()[0]) <= 1e-5
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    events = [e for e in map(json.loads, lines) if e.get("event") == "membership"]
    assert events, "no worker was lost"
    if len(lost) == 3:
        assert events[0]["change"] == "restarted"


def test_a_run_resumed_on_another_number_of_workers_trains_the_same_global_batches(tmp_path):
    """Interrupted mid-epoch on 2 workers, resumed on 3 from its checkpoint: the resumed epoch
    goes on in that epoch's order from the checkpoint's batch, each batch split three ways,
    and the run ends as one native device trained it."""
    x, y = dataset(n=160)
    ds = ArrayDataset(x, y)
    expected = native_fit(ds)
    run = raymodule.RunConfig(name="r", storage=str(tmp_path), checkpoint_every=2)

    def fit(workers, **fit_args):
        mx.random.seed(3)
        with raymodule.Module(mlp(), context=[mx.cpu(i) for i in range(workers)]) as mod:
            mod.fit(
                DatasetIter(ds, 16, shuffle=True, seed=9),
                num_epoch=2,
                optimizer="sgd",
                optimizer_params=SGD,
                initializer=mx.init.Xavier(),
                run=run,
                **fit_args,
            )
            return mod.get_params()[0]

    with pytest.raises(Interrupted):
        fit(2, batch_end_callback=interrupt_at(1, 6, str(tmp_path / "r")))
    ckpt = raymodule.latest_checkpoint(str(tmp_path / "r"))
    assert ckpt.epoch == 1 and ckpt.batch > 0 and ckpt.manifest["world_size"] == 2
    trained = []
    resumed = fit(3, batch_end_callback=lambda p: trained.append((p.epoch, p.nbatch)))
    assert trained[0] == (1, ckpt.batch) and trained[-1] == (1, 9)
    assert max_relative_diff(expected, resumed) <= 1e-5
