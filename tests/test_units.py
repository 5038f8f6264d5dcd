"""Pure pieces: bucket planning, batch splitting, settings, metric routing."""

from __future__ import annotations

from types import SimpleNamespace

import mxnet as mx
import numpy as np
import pytest

from raymodule import data, metrics
from raymodule.constants import Settings
from raymodule.steps import steps_per_call
from raymodule.worker.collective import plan_buckets


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
    handle = SimpleNamespace(settings=settings, step_s=None)
    assert steps_per_call(handle) == 4  # no step timed yet
    handle.step_s = 0.01
    assert steps_per_call(handle) == 20
    handle.step_s = 0.001  # fast steps: at most RAYMODULE_STEPS_PER_CALL
    assert steps_per_call(handle) == 32
    handle.step_s = 3.0  # a step longer than a call: one a call
    assert steps_per_call(handle) == 1
    handle.settings = Settings(steps_per_call=2, call_s=0.2)
    handle.step_s = None
    assert steps_per_call(handle) == 2


def test_counter_metrics_run_on_workers_others_on_the_client():
    assert metrics.runs_on_workers(mx.metric.create(["acc", "ce", "mse"]))
    assert not metrics.runs_on_workers(mx.metric.create(["acc", "f1"]))
    total = mx.metric.Accuracy()
    part = mx.metric.Accuracy()
    part.update([mx.nd.array([0, 1])], [mx.nd.array([[1, 0], [1, 0]])])
    metrics.add_counters(total, metrics.counters(part))
    metrics.add_counters(total, metrics.counters(part))
    assert total.get() == ("accuracy", 0.5) and total.num_inst == 4
