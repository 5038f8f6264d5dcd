"""Bad input fails on the client, early, with an error that names the argument."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import mxnet as mx
import pytest
from conftest import dataset, mlp

import raymodule

TWO = [mx.cpu(0), mx.cpu(1)]


def test_data_name_not_in_symbol_suggests_names():
    with pytest.raises(ValueError, match="Did you mean one of"):
        raymodule.Module(mlp(), data_names=["images"], context=TWO)


def test_explicit_label_name_not_in_symbol_raises():
    with pytest.raises(ValueError, match="label_names=\\['target'\\]"):
        raymodule.Module(mlp(), label_names=["target"], context=TWO)


def test_default_label_name_missing_only_warns_as_in_mxnet():
    net = mx.sym.FullyConnected(mx.sym.Variable("data"), num_hidden=4, name="fc")
    with pytest.warns(UserWarning, match="softmax_label"):
        raymodule.Module(net, context=TWO)


@pytest.mark.parametrize(
    "weights, message",
    [
        ([1], "has 1 entries; expected one per context \\(2\\)"),
        ([1, 0], "every weight must be a number > 0"),
        ([1, -2], "every weight must be a number > 0"),
    ],
)
def test_bad_work_load_list(weights, message):
    with pytest.raises(ValueError, match=message):
        raymodule.Module(mlp(), context=TWO, work_load_list=weights)


def test_compression_is_refused_not_ignored():
    with pytest.raises(NotImplementedError, match="compression_params"):
        raymodule.Module(mlp(), context=TWO, compression_params={"type": "2bit", "threshold": 1})


@pytest.fixture(scope="module")
def bound():
    mod = raymodule.Module(mlp(), context=TWO)
    mod.bind([("data", (8, 20))], [("softmax_label", (8,))])
    mod.init_params()
    yield mod
    mod.close()


@pytest.mark.parametrize(
    "kvstore, message",
    [
        ("dist_async", "asynchronous updates are not supported"),
        ("horovod", "kvstore='horovod' is not supported; use one of 'local'"),
        (123, "kvstore=123 is not supported"),
    ],
)
def test_unsupported_kvstore(bound, kvstore, message):
    with pytest.raises(ValueError, match=message):
        bound.init_optimizer(kvstore=kvstore, force_init=True)


def test_kvstore_object_is_refused_with_the_supported_names(bound):
    with pytest.raises(ValueError, match="pass a kvstore name instead.*'dist_sync'"):
        bound.init_optimizer(kvstore=mx.kv.create("local"), force_init=True)


def test_unknown_optimizer(bound):
    with pytest.raises(ValueError, match="optimizer='sgdd' is not a registered"):
        bound.init_optimizer(optimizer="sgdd", force_init=True)


def test_shape_that_does_not_fit_the_parameters(bound):
    x, y = dataset(n=8, shape=(21,))
    with pytest.raises(ValueError, match="fc0_weight of shape \\(32, 21\\).*\\(32, 20\\)"):
        bound.forward(mx.io.DataBatch([mx.nd.array(x)], [mx.nd.array(y)]))


def test_shape_that_the_symbol_cannot_take(bound):
    with pytest.raises(ValueError, match="input shapes .* do not fit the symbol"):
        bound.reshape([("data", (8, 20, 3, 3, 3))], [("softmax_label", (8, 5))])


def test_batch_smaller_than_the_number_of_workers(bound):
    x, y = dataset(n=1)
    with pytest.raises(ValueError, match="a batch of 1 samples cannot be split over 2 workers"):
        bound.forward(mx.io.DataBatch([mx.nd.array(x)], [mx.nd.array(y)]))
    with pytest.raises(ValueError, match="cannot be split over 2 workers"):
        raymodule.Module(mlp(), context=TWO).bind([("data", (1, 20))], [("softmax_label", (1,))])


def test_module_still_works_after_bad_input(bound):
    x, y = dataset(n=8)
    bound.forward(mx.io.DataBatch([mx.nd.array(x)], [mx.nd.array(y)]), is_train=False)
    assert bound.get_outputs()[0].shape == (8, 10)


def test_call_order_errors_are_assertion_errors_as_in_mxnet():
    mod = raymodule.Module(mlp(), context=TWO)
    with pytest.raises(AssertionError, match="call bind"):
        mod.forward(mx.io.DataBatch([mx.nd.zeros((2, 20))]))
    with pytest.raises(raymodule.CallOrderError):
        mod.init_optimizer()


def test_more_workers_than_a_connected_cluster_has_fail_after_the_timeout(monkeypatch):
    monkeypatch.setenv("RAYMODULE_PLACEMENT_TIMEOUT_S", "2")
    mod = raymodule.Module(mlp(), context=raymodule.workers(3, cpus=2))
    with pytest.raises(raymodule.PlacementError, match="cannot place 3 workers.*within 2 s"):
        mod.bind([("data", (6, 20))], [("softmax_label", (6,))])


def test_more_workers_than_a_local_ray_has_fail_at_once():
    """A Ray that raymodule starts itself cannot grow: say so at once, not after a wait."""
    script = textwrap.dedent("""
        import time, mxnet as mx, raymodule
        net = mx.sym.FullyConnected(mx.sym.Variable("data"), num_hidden=2, name="fc")
        mod = raymodule.Module(net, label_names=None, context=raymodule.workers(64))
        start = time.monotonic()
        try:
            mod.bind([("data", (64, 3))])
        except raymodule.PlacementError as err:
            print("PLACEMENT", round(time.monotonic() - start, 1), err)
    """)
    env = dict(os.environ, RAYMODULE_PLACEMENT_TIMEOUT_S="600")
    env.pop("RAY_ADDRESS", None)
    with tempfile.TemporaryDirectory(prefix="rmp-", dir="/tmp") as short:  # Ray's socket paths
        env["RAY_TMPDIR"] = short
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240
        )
    line = next((x for x in out.stdout.splitlines() if x.startswith("PLACEMENT")), None)
    assert line is not None, out.stdout + out.stderr
    waited = float(line.split()[1])
    assert waited < 60  # no 600 s wait: it fails once Ray has started
    assert "64 workers" in line and "this local Ray has" in line
