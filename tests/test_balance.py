"""``work_load_list="auto"``: the controller moves work from a slower worker to a faster one,
and the model is the one plain MXNet trains on the same batches."""

from __future__ import annotations

import sys
import time

import mxnet as mx
import pytest
import ray.cloudpickle
from conftest import dataset, max_relative_diff, mlp

import raymodule
import raymodule.module
from raymodule.controller.balance import Balancer
from raymodule.controller.policy import rebalanced
from raymodule.handle import ControllerHandle
from raymodule.worker import ModuleWorker


@pytest.mark.parametrize(
    "weights, seconds, expected",
    [
        ([1, 1], [1.0, 1.0], None),  # as fast: nothing moves
        ([1, 1], [1.0, 1.04], None),  # within the hysteresis
        ([1, 1], [1.0, 2.0], [1.25, 0.75]),  # toward 2:1, at most 25 % at once
        ([1.25, 0.75], [1.0, 2.0], [4 / 3, 2 / 3]),  # there: the times per step are equal
        ([4 / 3, 2 / 3], [1.0, 2.0], None),  # balanced: stays
        ([1, 1, 1], [1.0, 1.0, 3.0], [1.1538, 1.1538, 0.6923]),  # the mean stays 1
        ([1, 1], [0.0, 1.0], None),  # no time measured
        ([1], [5.0], None),  # alone
    ],
)
def test_rebalanced_moves_work_toward_the_faster_worker_bounded_and_with_hysteresis(
    weights, seconds, expected
):
    moved = rebalanced(weights, seconds)
    if expected is None:
        assert moved is None
    else:
        assert moved == pytest.approx(expected, abs=1e-4)


def test_the_balancer_adjusts_once_every_n_steps_measured_by_every_member():
    balancer = Balancer(every=2)
    halves = [slice(0, 4), slice(4, 8)]
    balancer.record([0, 1], [1.0, 2.0], [halves])
    assert balancer.adjust([0, 1]) is None  # one step tallied of two
    balancer.record([0, 1], [1.0, 2.0], [halves])
    change = balancer.adjust([0, 1])
    assert change["weights"] == {0: 1.25, 1: 0.75}
    assert balancer.work_load(3) == [1.0, 1.0, 1.0]  # proposed, not yet taken
    balancer.accept(change)
    assert balancer.work_load(3) == [1.25, 0.75, 1.0]  # a slot never measured keeps 1
    balancer.record([0, 2], [1.0, 2.0], [halves, halves])
    assert balancer.adjust([0, 1]) is None  # slot 1 not measured: no change, a new tally


# the controller and workers cannot import this test module: its worker class goes by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class SlowWorker(ModuleWorker):
    """A real worker that, once told, also sleeps a fixed time per sample of its share of each
    step, after its forward pass: a slower machine, deterministically."""

    _slow = 0.0

    def set_slow(self, seconds_per_sample: float) -> None:
        self._slow = seconds_per_sample

    def _load(self, mid, batch, is_train):
        loaded = super()._load(mid, batch, is_train)
        if self._slow and is_train:
            time.sleep(self._slow * batch.data[0].shape[0])
        return loaded


def test_auto_work_load_moves_work_off_a_slow_worker_and_trains_the_same_model(monkeypatch):
    monkeypatch.setenv("RAYMODULE_BALANCE_EVERY_STEPS", "4")
    monkeypatch.setattr(
        raymodule.module,
        "ControllerHandle",
        lambda contexts, **kw: ControllerHandle(contexts, SlowWorker, **kw),
    )
    x, y = dataset(n=32 * 12)
    params = {}
    for cls in (mx.mod.Module, raymodule.Module):
        mx.random.seed(0)
        if cls is raymodule.Module:
            mod = cls(mlp(), context=[mx.cpu(0), mx.cpu(1)], work_load_list="auto")
            it = mx.io.NDArrayIter(x, y, batch_size=32)
            mod.bind(it.provide_data, it.provide_label)
            mod.workers.call("set_slow", 0.001, ranks=[1])
        else:
            mod = cls(mlp(), context=mx.cpu())
        mod.fit(
            mx.io.NDArrayIter(x, y, batch_size=32),
            num_epoch=3,
            optimizer_params={"learning_rate": 0.1, "momentum": 0.9},
            initializer=mx.init.Xavier(),
        )
        params[cls] = {**mod.get_params()[0], **mod.get_params()[1]}
        if cls is raymodule.Module:
            work_load = mod.workers.work_load
            shares = [cut.stop - cut.start for cut in mod._slices]
            mod.close()
    assert work_load[1] < 0.8 * work_load[0], work_load  # the slow one got less work
    assert shares[1] < shares[0] and sum(shares) == 32, shares
    assert max_relative_diff(params[mx.mod.Module], params[raymodule.Module]) <= 1e-5
