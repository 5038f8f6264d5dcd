"""raymodule.Module is a drop-in for mx.mod.Module: same names, signatures and results."""

from __future__ import annotations

import gc
import inspect
import logging
import re
import time
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
import ray
from conftest import ClientIter, dataset, max_relative_diff, mlp

import raymodule

# shared/seed/module-reference.txt, the MXNet reference page the API follows, copied here
REFERENCE = Path(__file__).resolve().parent / "data" / "module-reference.txt"
SGD = {"learning_rate": 0.1, "momentum": 0.9}


def public_names(cls) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_")}


def test_every_public_name_of_mxnet_module_exists_with_the_same_signature():
    native, ours = mx.mod.Module, raymodule.Module
    missing = public_names(native) - public_names(ours)
    assert not missing
    for name in sorted(public_names(native)):
        theirs, mine = inspect.getattr_static(native, name), inspect.getattr_static(ours, name)
        assert type(theirs) is type(mine), name  # property stays property, staticmethod static
        if callable(getattr(native, name)) and not isinstance(theirs, property):
            mine = inspect.signature(getattr(ours, name))
            if name == "fit":  # MXNet's parameters, in order, then raymodule's run=
                assert list(mine.parameters)[-1] == "run"
                assert mine.parameters["run"].default is None
                mine = mine.replace(parameters=list(mine.parameters.values())[:-1])
            assert mine == inspect.signature(getattr(native, name)), name
    assert inspect.signature(ours.__init__) == inspect.signature(native.__init__)


def test_names_of_the_reference_page_exist():
    text = REFERENCE.read_text()
    # members are listed as "def\xa0name" and "\xa0name" (a non-breaking space)
    names = set(re.findall(r"^def\xa0(\w+)", text, re.M))
    names |= set(re.findall(r"^\xa0(\w+)\s*$", text, re.M))
    assert len(names) > 40, "the reference page should list names"
    module = raymodule.Module(mlp())
    for name in sorted(n for n in names if not n.startswith("_") or n == "__init__"):
        assert hasattr(raymodule.Module, name) or name in vars(module), name


def bind_pair(symbol, batch, contexts=2, **bind_args):
    """A native module and a raymodule one with the same initial parameters."""
    shapes = ([("data", (batch, 20))], [("softmax_label", (batch,))])
    native = mx.mod.Module(symbol)
    native.bind(*shapes, **bind_args)
    mx.random.seed(11)
    native.init_params(mx.init.Xavier())
    ours = raymodule.Module(symbol, context=[mx.cpu(i) for i in range(contexts)])
    ours.bind(*shapes, **bind_args)
    ours.init_params(arg_params=native.get_params()[0], aux_params=native.get_params()[1])
    return native, ours


@pytest.fixture(scope="module")
def pair():
    native, ours = bind_pair(mlp(), 24, inputs_need_grad=True)
    yield native, ours
    ours.close()


def test_shapes_and_names(pair):
    native, ours = pair
    for attr in (
        "data_names",
        "label_names",
        "output_names",
        "data_shapes",
        "label_shapes",
        "output_shapes",
        "binded",
        "for_training",
        "inputs_need_grad",
        "params_initialized",
    ):
        assert getattr(ours, attr) == getattr(native, attr), attr
    assert ours.symbol.tojson() == native.symbol.tojson()


def test_outputs_and_input_grads_merged_and_per_worker(pair):
    native, ours = pair
    x, y = dataset(n=24)
    db = mx.io.DataBatch([mx.nd.array(x)], [mx.nd.array(y)])
    for mod in pair:
        mod.forward_backward(db)
    np.testing.assert_allclose(
        ours.get_outputs()[0].asnumpy(), native.get_outputs()[0].asnumpy(), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        ours.get_input_grads()[0].asnumpy(),
        native.get_input_grads()[0].asnumpy(),
        rtol=1e-4,
        atol=1e-7,
    )
    per_worker = ours.get_outputs(merge_multi_context=False)
    assert [o.shape for o in per_worker[0]] == [(12, 10), (12, 10)]
    grads = ours.get_input_grads(merge_multi_context=False)
    assert [g.shape for g in grads[0]] == [(12, 20), (12, 20)]
    assert isinstance(per_worker[0][0], mx.nd.NDArray)


def test_update_metric_on_the_client_matches_native(pair):
    native, ours = pair
    x, y = dataset(n=24, seed=5)
    db = mx.io.DataBatch([mx.nd.array(x)], [mx.nd.array(y)])
    results = []
    for mod in pair:
        mod.forward(db, is_train=False)
        metric = mx.metric.create(["acc", "ce"])
        mod.update_metric(metric, db.label)
        results.append(metric.get())
    assert results[0][0] == results[1][0]
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)


def test_forward_reshapes_for_a_smaller_batch(pair):
    native, ours = pair
    x, y = dataset(n=10, seed=2)
    for mod in pair:
        mod.forward(mx.io.DataBatch([mx.nd.array(x)], [mx.nd.array(y)]), is_train=False)
    np.testing.assert_allclose(
        ours.get_outputs()[0].asnumpy(), native.get_outputs()[0].asnumpy(), rtol=1e-5, atol=1e-7
    )
    assert ours.data_shapes[0].shape == (10, 20)


def test_non_counter_metric_merges_like_mxnet_with_several_devices():
    """F1 keeps its own state: raymodule updates it once per worker slice, as MXNet does
    once per device, so it equals MXNet with two contexts."""
    x, y = dataset(n=64, classes=2)
    symbol = mlp(classes=2)
    scores = []
    for cls, ctxs in (
        (mx.mod.Module, [mx.cpu(0), mx.cpu(1)]),
        (raymodule.Module, [mx.cpu(0), mx.cpu(1)]),
    ):
        mx.random.seed(5)
        mod = cls(symbol, context=ctxs)
        it = mx.io.NDArrayIter(x, y, batch_size=16)
        mod.fit(
            it, eval_metric="f1", num_epoch=1, optimizer_params=SGD, initializer=mx.init.Xavier()
        )
        scores.append(mod.score(it, ["f1", "acc"]))
        if cls is raymodule.Module:
            mod.close()
    assert scores[0][1] == scores[1][1]
    assert scores[0][0][1] == pytest.approx(scores[1][0][1], rel=1e-6)


def test_callbacks_run_in_the_client_in_order_with_mxnet_arguments():
    x, y = dataset(n=80)
    train = mx.io.NDArrayIter(x, y, batch_size=16)
    val = mx.io.NDArrayIter(x[:32], y[:32], batch_size=16)
    seen = []
    starts = {}

    def on_batch(param):
        assert isinstance(param, mx.model.BatchEndParam)
        assert param.locals["self"] is mod
        assert isinstance(param.locals["data_batch"], mx.io.DataBatch)
        rows = slice(16 * param.nbatch, 16 * (param.nbatch + 1))  # read when asked for
        np.testing.assert_array_equal(param.locals["data_batch"].data[0].asnumpy(), x[rows])
        np.testing.assert_array_equal(param.locals["data_batch"].label[0].asnumpy(), y[rows])
        # the epoch's start, as in MXNet's fit loop: one per epoch, before its batches end
        assert starts.setdefault(param.epoch, param.locals["tic"]) == param.locals["tic"]
        assert param.locals["tic"] <= time.time()
        seen.append(("batch", param.epoch, param.nbatch, param.eval_metric.get()[1]))

    def on_epoch(epoch, symbol, arg_params, aux_params):
        assert symbol is mod.symbol and "fc0_weight" in arg_params
        seen.append(("epoch", epoch))

    def on_eval_end(param):
        seen.append(("eval_end", param.epoch, param.nbatch))

    def on_eval_batch(param):
        seen.append(("eval_batch", param.epoch, param.nbatch))

    with raymodule.Module(mlp(), context=[mx.cpu(0), mx.cpu(1)]) as mod:
        mod.fit(
            train,
            eval_data=val,
            num_epoch=2,
            optimizer_params=SGD,
            batch_end_callback=[on_batch, mx.callback.Speedometer(16, 2)],
            epoch_end_callback=on_epoch,
            eval_end_callback=on_eval_end,
            eval_batch_end_callback=on_eval_batch,
        )
    expected = []
    for epoch in range(2):
        expected += [("batch", epoch, n) for n in range(5)]
        expected += [("epoch", epoch)]
        expected += [("eval_batch", epoch, n) for n in range(2)] + [("eval_end", epoch, 2)]
    assert [s[:3] if s[0] == "batch" else s for s in seen] == expected
    # the metric a callback sees already counts its own batch
    accuracies = [s[3] for s in seen if s[0] == "batch" and s[1] == 0]
    assert all(0.0 <= a <= 1.0 for a in accuracies)
    assert starts[0] < starts[1]


def test_an_epoch_end_callback_reads_the_epochs_parameters_as_mxnet_gives_them():
    """The parameters after an epoch's last step come with its last progress (no call at the
    epoch's end): the callback gets MXNet's values, every epoch. Parameters a batch callback
    sets after the last step, with or without reading them first, are those the epoch's
    callback reads, as in MXNet."""
    x, y = dataset(n=96)
    seen = {}
    for cls, ctxs in ((mx.mod.Module, mx.cpu()), (raymodule.Module, [mx.cpu(0), mx.cpu(1)])):
        mx.random.seed(3)
        train = mx.io.NDArrayIter(x, y, batch_size=16)
        mod = cls(mlp(), context=ctxs)
        mod.bind(train.provide_data, train.provide_label)
        mod.init_params(mx.init.Xavier())
        start = [{k: v.copy() for k, v in held.items()} for held in mod.get_params()]
        read, brought = [], []

        def on_batch(param, mod=mod, start=start, brought=brought):
            if param.nbatch < 5:
                return
            brought.append(getattr(getattr(mod, "_workers", None), "_params_at_end", None))
            if param.epoch == 0:  # after the epoch's last step: back to the start
                mod.set_params(*start)
            elif param.epoch == 1:
                arg, aux = mod.get_params()
                mod.set_params({k: v * 0.5 for k, v in arg.items()}, aux)

        def on_epoch(epoch, symbol, arg, aux, read=read):
            read.append({k: v.copy() for k, v in arg.items()})

        mod.fit(
            train,
            num_epoch=3,
            optimizer_params=SGD,
            batch_end_callback=on_batch,
            epoch_end_callback=on_epoch,
        )
        seen[cls] = read
        if cls is raymodule.Module:
            mod.close()
            assert all(held is not None for held in brought), brought
    native, ours = seen[mx.mod.Module], seen[raymodule.Module]
    assert max_relative_diff(start[0], ours[0]) == 0.0
    for epoch in range(3):
        assert max_relative_diff(native[epoch], ours[epoch]) <= 1e-5, epoch


def test_parameters_a_callback_sets_while_steps_run_ahead_are_those_the_epochs_end_reads(
    monkeypatch,
):
    """A batch callback trails the workers: parameters it sets early in an epoch reach them
    after the epoch's plan of steps, and the epoch's end reads those it set, not the
    parameters the plan brought (calls of 2 steps: the callback runs while the plan's later
    steps are still being sent)."""
    monkeypatch.setenv("RAYMODULE_STEPS_PER_CALL", "2")
    x, y = dataset(n=16 * 30)
    train = mx.io.NDArrayIter(x, y, batch_size=16)
    with raymodule.Module(mlp(), context=[mx.cpu(0), mx.cpu(1)]) as mod:
        mod.bind(train.provide_data, train.provide_label)
        mod.init_params(mx.init.Xavier())
        start = [{k: v.copy() for k, v in held.items()} for held in mod.get_params()]
        read = []
        mod.fit(
            train,
            num_epoch=1,
            optimizer_params=SGD,
            batch_end_callback=lambda param: param.nbatch == 5 and mod.set_params(*start),
            epoch_end_callback=lambda epoch, symbol, arg, aux: read.append(arg),
        )
        assert max_relative_diff(start[0], read[0]) == 0.0
        assert max_relative_diff(start[0], mod.get_params()[0]) == 0.0


@pytest.mark.parametrize("iterator", [mx.io.NDArrayIter, ClientIter], ids=["plan", "client"])
def test_a_callbacks_score_and_predict_leave_fits_steps_and_metric_as_they_were(
    monkeypatch, iterator
):
    """A batch callback that scores with another metric and predicts while fit's steps are in
    flight (chunks of 2 steps; an epoch of two plans when fit reads the rows itself): fit's
    metric is the one it is without them, over every batch once. The callback's steps once
    read fit's steps in flight as their own (a KeyError), and fit's later plans updated the
    callback's metric on the workers."""
    monkeypatch.setenv("RAYMODULE_STEPS_PER_CALL", "2")
    x, y = dataset(n=4 * 300)
    small = mx.io.NDArrayIter(x[:16], y[:16], batch_size=4)
    native = mx.mod.Module(mlp(), context=mx.cpu())
    native.bind([("data", (4, 20))], [("softmax_label", (4,))])
    native.init_params(mx.init.Xavier())
    start = native.get_params()
    counted = []
    for scoring in (False, True):
        metric = mx.metric.create("acc")
        with raymodule.Module(mlp(), context=[mx.cpu(0), mx.cpu(1)]) as mod:

            def callback(param, mod=mod, scoring=scoring):
                if scoring and param.nbatch in (5, 260):
                    assert mod.score(small, "mse")[0][0] == "mse"
                    assert mod.predict(small).shape == (16, 10)

            mod.fit(
                iterator(x, y, batch_size=4),
                num_epoch=1,
                eval_metric=metric,
                arg_params=start[0],
                aux_params=start[1],
                optimizer_params=SGD,
                batch_end_callback=callback,
            )
        counted.append((metric.num_inst, metric.sum_metric))
    assert counted[0][0] == 4 * 300
    assert counted[1] == counted[0]


def test_checkpoints_are_mxnet_checkpoints(tmp_path):
    x, y = dataset(n=48)
    it = mx.io.NDArrayIter(x, y, batch_size=24)
    prefix = str(tmp_path / "model")
    with raymodule.Module(mlp(), context=[mx.cpu(0), mx.cpu(1)]) as mod:
        mod.fit(it, num_epoch=1, optimizer_params=SGD)
        mod.save_checkpoint(prefix, 1, save_optimizer_states=True)
        expected = mod.predict(it).asnumpy()
        ours = mod.get_params()[0]
    native = mx.mod.Module.load(prefix, 1, load_optimizer_states=True)
    native.bind(it.provide_data, it.provide_label)
    native.init_optimizer(optimizer_params=SGD)
    assert max_relative_diff(ours, native.get_params()[0]) == 0.0
    np.testing.assert_allclose(native.predict(it).asnumpy(), expected, rtol=1e-6)

    # and back: raymodule continues a native checkpoint exactly as MXNet does
    results = []
    for cls in (mx.mod.Module, raymodule.Module):
        mod = cls.load(
            prefix,
            1,
            load_optimizer_states=True,
            context=[mx.cpu(0), mx.cpu(1)] if cls is raymodule.Module else mx.cpu(),
        )
        it.reset()
        mod.fit(it, num_epoch=2, begin_epoch=1, optimizer_params=SGD)
        results.append(mod.get_params()[0])
        if cls is raymodule.Module:
            mod.close()
    assert max_relative_diff(results[0], results[1]) < 1e-5


def test_save_and_load_params_and_optimizer_states(tmp_path):
    native, ours = bind_pair(mlp(), 24)
    try:
        ours.init_optimizer(optimizer="adam")
        x, y = dataset(n=24)
        ours.forward_backward(mx.io.DataBatch([mx.nd.array(x)], [mx.nd.array(y)]))
        ours.update()
        ours.save_params(str(tmp_path / "p.params"))
        ours.save_optimizer_states(str(tmp_path / "o.states"))
        before = {k: v.copy() for k, v in ours.get_params()[0].items()}
        ours.init_params(mx.init.Zero(), force_init=True)
        assert float(ours.get_params()[0]["fc0_weight"].abs().sum().asscalar()) == 0.0
        ours.load_params(str(tmp_path / "p.params"))
        ours.load_optimizer_states(str(tmp_path / "o.states"))
        assert max_relative_diff(before, ours.get_params()[0]) == 0.0
        native.init_optimizer(optimizer="adam")
        native.load_optimizer_states(str(tmp_path / "o.states"))  # MXNet reads our file
    finally:
        ours.close()


def test_shared_module_and_borrowed_optimizer_share_workers_and_parameters():
    x, y = dataset(n=24)
    with raymodule.Module(mlp(), context=[mx.cpu(0), mx.cpu(1)]) as first:
        first.bind([("data", (24, 20))], [("softmax_label", (24,))])
        first.init_params(mx.init.Xavier())
        first.init_optimizer(optimizer_params=SGD)
        second = raymodule.Module(mlp(), context=[mx.cpu(0), mx.cpu(1)])
        second.bind([("data", (12, 20))], [("softmax_label", (12,))], shared_module=first)
        assert second.workers is first.workers and second.optimizer_initialized
        first.forward_backward(mx.io.DataBatch([mx.nd.array(x)], [mx.nd.array(y)]))
        first.update()
        second.forward(mx.io.DataBatch([mx.nd.array(x[:12])]), is_train=False)
        first.forward(mx.io.DataBatch([mx.nd.array(x)]), is_train=False)
        np.testing.assert_allclose(
            second.get_outputs()[0].asnumpy(), first.get_outputs()[0].asnumpy()[:12], rtol=1e-5
        )
        # an update through the second module changes the first's parameters too
        before = first.get_params()[0]["out_weight"].copy()
        second.forward_backward(mx.io.DataBatch([mx.nd.array(x[:12])], [mx.nd.array(y[:12])]))
        second.update()
        assert not np.allclose(first.get_params()[0]["out_weight"].asnumpy(), before.asnumpy())
        second.close()
        assert not first.workers.closed


def test_install_monitor_collects_every_workers_statistics():
    x, y = dataset(n=24)
    db = mx.io.DataBatch([mx.nd.array(x)], [mx.nd.array(y)])
    counts = []
    for cls, ctxs in ((mx.mod.Module, mx.cpu()), (raymodule.Module, [mx.cpu(0), mx.cpu(1)])):
        mod = cls(mlp(), context=ctxs)
        mod.bind([("data", (24, 20))], [("softmax_label", (24,))])
        mod.init_params()
        mon = mx.monitor.Monitor(1, pattern=".*weight")
        mod.install_monitor(mon)
        mon.tic()
        mod.forward(db)
        rows = mon.toc()
        counts.append(len(rows))
        assert rows and all(len(r) == 3 for r in rows)
        if cls is raymodule.Module:
            mod.close()
    assert counts[1] == 2 * counts[0]


def test_states_are_set_and_read_per_worker():
    data, state = mx.sym.Variable("data"), mx.sym.Variable("state")
    symbol = mx.sym.elemwise_add(data, state, name="sum")
    with raymodule.Module(
        symbol, label_names=None, state_names=["state"], context=[mx.cpu(0), mx.cpu(1)]
    ) as mod:
        mod.bind([("data", (4, 3))], None, for_training=False)
        mod.init_params()
        mod.set_states(value=2.0)
        mod.forward(mx.io.DataBatch([mx.nd.ones((4, 3))]))
        np.testing.assert_array_equal(mod.get_outputs()[0].asnumpy(), np.full((4, 3), 3.0))
        # one state array per worker, each the shape of that worker's slice
        mod.set_states(states=[[mx.nd.zeros((2, 3)), mx.nd.ones((2, 3)) * 5]])
        mod.forward(mx.io.DataBatch([mx.nd.ones((4, 3))]))
        np.testing.assert_array_equal(mod.get_outputs()[0].asnumpy()[:, 0], [1, 1, 6, 6])
        per_worker = mod.get_states(merge_multi_context=False)
        assert [s.asnumpy().sum() for s in per_worker[0]] == [0.0, 30.0]
        assert mod.get_states()[0].shape == (4, 3)


def test_group2ctxs_places_subgraphs_inside_each_worker():
    with mx.AttrScope(ctx_group="stage1"):
        data = mx.sym.Variable("data")
        net = mx.sym.FullyConnected(data, num_hidden=8, name="fc0")
        net = mx.sym.Activation(net, act_type="relu")
    with mx.AttrScope(ctx_group="stage2"):
        net = mx.sym.SoftmaxOutput(
            mx.sym.FullyConnected(net, num_hidden=4, name="fc1"), name="softmax"
        )
    group2ctxs = {"stage1": mx.cpu(1), "stage2": mx.cpu(2)}
    x, y = dataset(n=32, classes=4)
    params = []
    for cls, ctxs in ((mx.mod.Module, mx.cpu()), (raymodule.Module, [mx.cpu(0), mx.cpu(1)])):
        mx.random.seed(2)
        mod = cls(net, context=ctxs, group2ctxs=group2ctxs)
        mod.fit(
            mx.io.NDArrayIter(x, y, batch_size=16),
            num_epoch=2,
            optimizer_params=SGD,
            initializer=mx.init.Xavier(),
        )
        params.append(mod.get_params()[0])
        if cls is raymodule.Module:
            mod.close()
    assert max_relative_diff(params[0], params[1]) < 1e-5


def test_worker_contexts_carry_resources():
    ctxs = raymodule.workers(3, cpus=2)
    assert [c.device_id for c in ctxs] == [0, 1, 2]
    assert all(isinstance(c, mx.Context) and c.cpus == 2 and c.gpus == 0 for c in ctxs)
    assert raymodule.workers(1, gpus=1)[0].device_type == "gpu"
    from raymodule.context import resources_of

    assert resources_of(ctxs[0]) == {"CPU": 2}
    assert resources_of(mx.cpu(5)) == {"CPU": 1}
    assert resources_of(mx.gpu(1)) == {"GPU": 1}


def test_worker_contexts_beyond_n_are_optional_up_to_max_workers():
    from raymodule.context import floor_of

    ctxs = raymodule.workers(2, cpus=1, max_workers=4)
    assert [c.optional for c in ctxs] == [False, False, True, True]
    assert floor_of(ctxs) == 2 and floor_of(raymodule.workers(3)) is None
    assert floor_of([mx.cpu(0), mx.cpu(1)]) is None
    assert "optional=True" in repr(ctxs[3])
    for bad in (1, 1.5, "3"):
        with pytest.raises(ValueError, match="max_workers"):
            raymodule.workers(2, max_workers=bad)


def test_a_module_starts_with_the_workers_that_fit_and_removes_the_others_requests(monkeypatch):
    """Six contexts, one needed, on the session's Ray of 4 CPUs (some held by other tests'
    modules): after RAYMODULE_START_WAIT_S the workers are placed one by one, training starts
    with those that fit, and closing the module removes the placement groups still asking for
    a CPU."""
    from ray.util.placement_group import placement_group_table

    monkeypatch.setenv("RAYMODULE_START_WAIT_S", "1")
    gc.collect()  # modules other tests dropped release their CPUs now, not while we start
    cpus = int(ray.cluster_resources()["CPU"])
    assert 1 <= ray.available_resources().get("CPU", 0) and cpus < 6
    x, y = dataset(n=48)
    mod = raymodule.Module(mlp(), context=raymodule.workers(1, max_workers=6))
    mod.fit(mx.io.NDArrayIter(x, y, batch_size=12), num_epoch=1, optimizer_params=SGD)
    membership = mod.workers.membership
    # as many as were free when they were placed (not a count taken before: other tests'
    # workers may still be leaving), the others pending
    assert 1 <= mod.world_size <= cpus and len(membership.pending) == 6 - mod.world_size
    assert sorted(membership.slots + membership.pending) == list(range(6))
    family = mod.workers.family
    named = {f"{family}-slot{slot}" for slot in range(6)}
    groups = [k for k, g in placement_group_table().items() if g["name"] in named]
    assert len(groups) == 6
    mod.close()
    table = placement_group_table()
    assert all(table[g]["state"] == "REMOVED" for g in groups), [table[g] for g in groups]


def test_logger_is_used(caplog):
    x, y = dataset(n=32)
    logger = logging.getLogger("raymodule-test")
    with caplog.at_level(logging.INFO, logger="raymodule-test"):
        with raymodule.Module(mlp(), logger=logger, context=[mx.cpu(0)]) as mod:
            mod.fit(mx.io.NDArrayIter(x, y, batch_size=16), num_epoch=1, optimizer_params=SGD)
    assert any("Epoch[0] Train-accuracy" in r.message for r in caplog.records)


def test_force_rebind_keeps_the_trained_parameters():
    x, y = dataset(n=24)
    with raymodule.Module(mlp(), context=[mx.cpu(0), mx.cpu(1)]) as mod:
        mod.bind([("data", (24, 20))], [("softmax_label", (24,))])
        mod.init_params(mx.init.Xavier())
        mod.init_optimizer(optimizer_params=SGD)
        mod.forward_backward(mx.io.DataBatch([mx.nd.array(x)], [mx.nd.array(y)]))
        mod.update()  # the workers' parameters are now newer than the host copy
        trained = mod.workers.call("get_params", mod._id, ranks=[0])[0][0]
        mod.bind([("data", (12, 20))], [("softmax_label", (12,))], force_rebind=True)
        rebound = mod.workers.call("get_params", mod._id, ranks=[0])[0][0]
        for name, value in trained.items():
            np.testing.assert_array_equal(rebound[name], value)
