"""raymodule.BucketingModule against MXNet's own BucketingModule on the same bucketed batches."""

from __future__ import annotations

import inspect
import json
import os
import signal
import warnings

import mxnet as mx
import numpy as np
import pytest
import stepfaults
from conftest import Interrupted, interrupt_at, max_relative_diff

import raymodule
import raymodule.module
from raymodule import storage

VOCAB, EMBED, HIDDEN = 30, 8, 12
BUCKETS = [4, 6, 8]
CONTEXTS = [mx.cpu(0), mx.cpu(1)]


def lstm_sym_gen(seq_len):
    """MXNet's bucketing LSTM language model: the same parameters for every length."""
    data = mx.sym.Variable("data")
    label = mx.sym.Variable("softmax_label")
    embed = mx.sym.Embedding(data, input_dim=VOCAB, output_dim=EMBED, name="embed")
    cell = mx.rnn.LSTMCell(num_hidden=HIDDEN, prefix="lstm_")
    cell.reset()
    outputs, _ = cell.unroll(seq_len, inputs=embed, merge_outputs=True)
    pred = mx.sym.FullyConnected(mx.sym.Reshape(outputs, shape=(-1, HIDDEN)), num_hidden=VOCAB,
                                 name="pred")  # fmt: skip
    out = mx.sym.SoftmaxOutput(pred, mx.sym.Reshape(label, shape=(-1,)), name="softmax")
    return out, ("data",), ("softmax_label",)


def batches(keys, batch_size=8, seed=0):
    """Bucketed batches in the order of ``keys``, as mx.rnn.BucketSentenceIter makes them."""
    rng = np.random.RandomState(seed)
    out = []
    for key in keys:
        data = mx.nd.array(rng.randint(1, VOCAB, (batch_size, key)))
        label = mx.nd.array(rng.randint(1, VOCAB, (batch_size, key)))
        out.append(
            mx.io.DataBatch(
                [data],
                [label],
                pad=0,
                bucket_key=key,
                provide_data=[mx.io.DataDesc("data", data.shape)],
                provide_label=[mx.io.DataDesc("softmax_label", label.shape)],
            )  # fmt: skip
        )
    return out


class ListIter(mx.io.DataIter):
    """Fixed bucketed batches, in order, every epoch."""

    def __init__(self, items):
        super().__init__(items[0].data[0].shape[0])
        self.items, self.cursor = items, 0
        self.default_bucket_key = max(BUCKETS)
        self.provide_data = [mx.io.DataDesc("data", (self.batch_size, self.default_bucket_key))]
        self.provide_label = [
            mx.io.DataDesc("softmax_label", (self.batch_size, self.default_bucket_key))
        ]

    def reset(self):
        self.cursor = 0

    def next(self):
        if self.cursor == len(self.items):
            raise StopIteration
        self.cursor += 1
        return self.items[self.cursor - 1]


SGD = {"learning_rate": 0.1, "momentum": 0.9, "wd": 1e-4}
KEYS = [8, 4, 6, 4, 8, 6, 6, 4, 8, 4]


def test_every_public_name_of_mxnet_bucketing_module_exists_with_its_signature():
    native, ours = mx.mod.BucketingModule, raymodule.BucketingModule
    assert inspect.signature(ours.__init__) == inspect.signature(native.__init__)
    names = {n for n in dir(native) if not n.startswith("_")}
    assert not names - {n for n in dir(ours) if not n.startswith("_")}
    extra = {"fit": ["run"], "save_checkpoint": ["save_optimizer_states"]}
    for name in sorted(names):
        theirs = inspect.getattr_static(native, name)
        if isinstance(theirs, property) or not callable(getattr(native, name)):
            continue
        mine = inspect.signature(getattr(ours, name))
        added = extra.get(name, [])
        if added:
            assert list(mine.parameters)[-len(added) :] == added, name
            mine = mine.replace(parameters=list(mine.parameters.values())[: -len(added)])
        assert mine == inspect.signature(getattr(native, name)), name


def test_fit_on_two_workers_equals_native_bucketing_on_one_device():
    train = batches(KEYS)
    mx.random.seed(0)
    native = mx.mod.BucketingModule(lstm_sym_gen, default_bucket_key=8)
    native.fit(ListIter(train), num_epoch=2, optimizer_params=SGD, kvstore="local")
    mx.random.seed(0)
    with raymodule.BucketingModule(lstm_sym_gen, 8, context=CONTEXTS) as mod:
        mod.fit(ListIter(train), num_epoch=2, optimizer_params=SGD)
        assert sorted(mod._buckets) == BUCKETS
        assert max_relative_diff(native.get_params()[0], mod.get_params()[0]) <= 1e-5
        score = dict(mod.score(ListIter(train), mx.metric.Perplexity(None)))
        expected = dict(native.score(ListIter(train), mx.metric.Perplexity(None)))
        assert score["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)


def two_layer_sym_gen(seq_len):
    """The default (longest) bucket has a layer the others lack: those steps leave it alone."""
    embed = mx.sym.Embedding(mx.sym.Variable("data"), input_dim=VOCAB, output_dim=EMBED,
                             name="embed")  # fmt: skip
    net = mx.sym.FullyConnected(mx.sym.mean(embed, axis=1), num_hidden=VOCAB, name="out")
    if seq_len == max(BUCKETS):  # last, so the shared optimizer's indices agree (as MXNet needs)
        net = mx.sym.FullyConnected(mx.sym.tanh(net), num_hidden=VOCAB, name="extra")
    return mx.sym.SoftmaxOutput(net, name="softmax"), ("data",), ("softmax_label",)


def label_batches(keys):
    items = batches(keys)
    for b in items:  # one label per sample
        b.label = [b.label[0][:, 0]]
        b.provide_label = [mx.io.DataDesc("softmax_label", b.label[0].shape)]
    return items


@pytest.mark.parametrize("grad_req", ["write", "add"])
def test_step_by_step_with_unused_parameters_and_grad_req(grad_req):
    train = label_batches(KEYS)
    shapes = ([("data", (8, 8))], [("softmax_label", (8,))])

    def run(mod):
        mx.random.seed(1)
        mod.bind(*shapes, grad_req=grad_req)
        mod.init_params(initializer=mx.init.Xavier())
        mod.init_optimizer(optimizer_params=SGD)
        for batch in train:
            mod.forward(batch, is_train=True)
            mod.backward()
            mod.update()
        return mod.get_params()[0]

    native = mx.mod.BucketingModule(two_layer_sym_gen, 8)
    stale = {k: v.copy() for k, v in run(native).items()}
    # MXNet 1.9.1 reads parameters through the current bucket, so the ones it lacks come back
    # stale; the default bucket's executors hold the values
    default = native._buckets[8]
    default._params_dirty = True
    expected = default.get_params()[0]
    assert max_relative_diff(expected, stale) > 1e-3  # KEYS end on a bucket without "extra"
    with raymodule.BucketingModule(two_layer_sym_gen, 8, context=CONTEXTS) as mod:
        assert max_relative_diff(expected, run(mod)) <= 1e-5


def test_bad_buckets_fail_on_the_client_in_words():
    def sym_gen(key):
        if key == 99:
            raise KeyError("no such length")
        if key == 5:
            return two_layer_sym_gen(4)[0], ("data",), ("other_label",)
        return two_layer_sym_gen(key)

    with raymodule.BucketingModule(sym_gen, 8, context=CONTEXTS) as mod:
        mod.bind([("data", (8, 8))], [("softmax_label", (8,))])
        mod.init_params()
        mod.init_optimizer(optimizer_params=SGD)
        with pytest.raises(ValueError, match=r"sym_gen\(99\) failed: KeyError: 'no such length'"):
            mod.forward(_keyed(99))
        with pytest.raises(ValueError, match=r"bucket 5: sym_gen gives label names \['other"):
            mod.forward(_keyed(5))
        wrong = _keyed(7)
        wrong.provide_label = [mx.io.DataDesc("softmax_label", (5,))]
        wrong.label = [mx.nd.zeros((5,))]
        with pytest.raises(ValueError, match=r"bucket 7: input shapes .* do not fit the symbol"):
            mod.forward(wrong)
        mod.forward(_keyed(6), is_train=True)  # the module still works


def _keyed(key):
    (batch,) = label_batches([4])
    batch.bucket_key = key
    return batch


def test_a_default_bucket_that_is_not_the_largest_gets_a_warning():
    with raymodule.BucketingModule(lstm_sym_gen, 4, context=[mx.cpu(0)]) as mod:
        mod.bind([("data", (8, 4))], [("softmax_label", (8, 4))])
        mod.init_params()
        larger = r"bucket 8 has larger inputs.*make the largest key \(8\) the default_bucket_key"
        with pytest.warns(UserWarning, match=larger):
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # scipy via MXNet
            mod.forward(batches([8])[0], is_train=False)


def test_int_key_checkpoints_are_mxnet_bucketing_checkpoints(tmp_path):
    train = batches(KEYS)
    mx.random.seed(0)
    with raymodule.BucketingModule(lstm_sym_gen, 8, context=CONTEXTS) as mod:
        mod.fit(ListIter(train), num_epoch=1, optimizer_params=SGD)
        mod.save_checkpoint(str(tmp_path / "lm"), 1)
        params = mod.get_params()[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "lm-0001.params", "lm-4-symbol.json", "lm-6-symbol.json", "lm-8-symbol.json",
        "lm.buckets", "lm.buckets.json",
    ]  # fmt: skip
    native = mx.mod.BucketingModule.load(str(tmp_path / "lm"), 1, lstm_sym_gen, 8)
    native.bind(ListIter(train).provide_data, ListIter(train).provide_label, for_training=False)
    assert max_relative_diff(params, native.get_params()[0]) == 0.0
    assert sorted(native._buckets) == BUCKETS


def keyed_sym_gen(key):
    """String and tuple keys, which MXNet's own checkpoints cannot name."""
    length = {"short": 4, "long": 8}[key] if isinstance(key, str) else key[0]
    return two_layer_sym_gen(length)


def test_string_and_tuple_keys_and_optimizer_states_round_trip_through_s3(s3, tmp_path):
    keys = ["long", (4, "x"), "short", (4, "x"), "long"]
    train = label_batches([8, 4, 4, 4, 8])
    for batch, key in zip(train, keys):
        batch.bucket_key = key
    prefix = s3.uri(f"{tmp_path.name}/lm")
    shapes = ([("data", (8, 8))], [("softmax_label", (8,))])

    def steps(mod, items):
        for batch in items:
            mod.forward(batch, is_train=True)
            mod.backward()
            mod.update()
        return mod.get_params()[0]

    mx.random.seed(2)
    with raymodule.BucketingModule(keyed_sym_gen, "long", context=CONTEXTS) as mod:
        mod.bind(*shapes)
        mod.init_params()
        mod.init_optimizer(optimizer_params=SGD)
        steps(mod, train[:3])
        mod.save_checkpoint(prefix, 3, save_optimizer_states=True)
        expected = steps(mod, train[3:])
    assert not storage.Folder(s3.uri(tmp_path.name)).exists("lm.buckets")  # not int keys
    mod = raymodule.BucketingModule.load(
        prefix, 3, keyed_sym_gen, "long", load_optimizer_states=True, context=CONTEXTS
    )
    with mod:
        assert sorted(map(str, mod._buckets)) == sorted(map(str, ["long", (4, "x"), "short"]))
        mod.bind(*shapes)
        mod.init_optimizer(optimizer_params=SGD)
        assert max_relative_diff(expected, steps(mod, train[3:])) <= 1e-5


def test_a_bucketing_run_resumes_mid_epoch_as_if_never_interrupted(tmp_path):
    train = batches(KEYS)
    config = raymodule.RunConfig(name="lm", storage=str(tmp_path), checkpoint_every=3)

    def fit(run=None, **extra):
        mx.random.seed(0)
        with raymodule.BucketingModule(lstm_sym_gen, 8, context=CONTEXTS) as mod:
            mod.fit(ListIter(train), num_epoch=2, optimizer_params=SGD, run=run, **extra)
            return mod.get_params()[0]

    expected = fit()
    with pytest.raises(Interrupted):  # once a checkpoint inside epoch 1 is committed
        fit(config, batch_end_callback=interrupt_at(1, 5, config.location))
    ckpt = raymodule.latest_checkpoint(config.location)
    assert ckpt.epoch == 1 and ckpt.batch > 0
    assert {"model-8-symbol.json", "model.buckets", "model.buckets.json"} <= set(ckpt.files)
    assert max_relative_diff(expected, fit(config)) <= 1e-5


def test_load_dict_and_predict_match_native():
    train = batches(KEYS)
    mx.random.seed(0)
    native = mx.mod.BucketingModule(lstm_sym_gen, default_bucket_key=8)
    native.fit(ListIter(train), num_epoch=1, optimizer_params=SGD, kvstore="local")
    args, auxs = native.get_params()
    symbols = {key: lstm_sym_gen(key)[0] for key in BUCKETS}
    loaded = raymodule.BucketingModule.load_dict(
        symbols, lstm_sym_gen, 8, args, auxs, context=CONTEXTS
    )
    with loaded:
        loaded.bind(ListIter(train).provide_data, ListIter(train).provide_label, for_training=False)
        assert max_relative_diff(args, loaded.get_params()[0]) == 0.0
        ours = loaded.predict(ListIter(train), merge_batches=False)
    expected = native.predict(ListIter(train), merge_batches=False)
    for a, b in zip(expected, ours):
        np.testing.assert_allclose(a[0].asnumpy(), b[0].asnumpy(), rtol=1e-5, atol=1e-7)


def test_a_bucketing_run_that_loses_every_worker_restarts_and_ends_as_native(tmp_path, monkeypatch):
    """Every worker dies at step 7 of a run of three buckets: fit closes the modules of every
    bucket and restarts them from the latest checkpoint, and the run ends with MXNet's
    parameters. Before, closing the buckets other than the default asked the lost workers to
    drop them, which raised the loss again and ended fit."""
    train = batches(KEYS)
    mx.random.seed(0)
    native = mx.mod.BucketingModule(lstm_sym_gen, default_bucket_key=8)
    native.fit(ListIter(train), num_epoch=2, optimizer_params=SGD, kvstore="local")
    marks = tmp_path / "faults"
    marks.mkdir()
    workers = stepfaults.worker_class({(7, None): "die"}, marks)
    monkeypatch.setattr(raymodule.module, "ControllerHandle", stepfaults.with_workers(workers))
    config = raymodule.RunConfig(name="lm", storage=str(tmp_path), checkpoint_every=2)
    mx.random.seed(0)
    with raymodule.BucketingModule(lstm_sym_gen, 8, context=CONTEXTS) as mod:
        mod.fit(ListIter(train), num_epoch=2, optimizer_params=SGD, run=config)
        assert max_relative_diff(native.get_params()[0], mod.get_params()[0]) <= 1e-4
    assert stepfaults.fired(marks, 7, 0) and stepfaults.fired(marks, 7, 1)
    lines = (tmp_path / "lm" / "metrics.jsonl").read_text().splitlines()
    changes = [e["change"] for e in map(json.loads, lines) if e.get("event") == "membership"]
    assert changes == ["restarted"], changes


def test_a_bucketing_run_that_loses_a_worker_ends_as_native(tmp_path):
    """A worker SIGKILLed mid-epoch: every bucket is split again over the survivors (and the
    replacement when it joins) and the run ends with MXNet's parameters."""
    train = batches(KEYS * 2, batch_size=12)
    mx.random.seed(0)
    native = mx.mod.BucketingModule(lstm_sym_gen, default_bucket_key=8)
    native.fit(ListIter(train), num_epoch=2, optimizer_params=SGD, kvstore="local")
    fired = []

    def kill(param):
        if (param.epoch, param.nbatch) == (0, 3) and not fired:
            fired.append(True)
            os.kill(param.locals["self"].workers.nodes[1]["pid"], signal.SIGKILL)

    mx.random.seed(0)
    contexts = [mx.cpu(i) for i in range(3)]
    with raymodule.BucketingModule(lstm_sym_gen, 8, context=contexts) as mod:
        mod.fit(
            ListIter(train),
            num_epoch=2,
            optimizer_params=SGD,
            batch_end_callback=kill,
            run=raymodule.RunConfig(name="lm", storage=str(tmp_path), min_workers=2),
        )
        assert fired == [True]
        assert max_relative_diff(native.get_params()[0], mod.get_params()[0]) <= 1e-4
    lines = (tmp_path / "lm" / "metrics.jsonl").read_text().splitlines()
    events = [e for e in map(json.loads, lines) if e.get("event") == "membership"]
    assert events[0]["world_size"] == 2 and events[0]["lost"] == ["slot 1"]
