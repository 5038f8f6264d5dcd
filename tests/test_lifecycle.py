"""Workers are released, and a lost worker is one clear error, never a hang."""

from __future__ import annotations

import gc
import os
import signal
import sys
import time

import mxnet as mx
import pytest
import ray
from conftest import dataset, mlp

import raymodule


def wait_for_cpus(expected: float, timeout: float = 30) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        free = ray.available_resources().get("CPU", 0)
        if free >= expected:
            return free
        time.sleep(0.2)
    return ray.available_resources().get("CPU", 0)


def bound_module(n=2):
    mod = raymodule.Module(mlp(), context=[mx.cpu(i) for i in range(n)])
    mod.bind([("data", (8, 20))], [("softmax_label", (8,))])
    mod.init_params()
    return mod


def test_close_and_with_release_the_workers():
    total = ray.cluster_resources()["CPU"]
    with bound_module(3) as mod:
        assert len(mod.workers.handles) == 3
        assert ray.available_resources().get("CPU", 0) <= total - 3
    assert wait_for_cpus(total) == total
    mod.close()  # closing twice is fine


def test_garbage_collected_modules_release_their_workers():
    total = ray.cluster_resources()["CPU"]
    for _ in range(3):  # more CPUs in all than the cluster has: each must be released
        mod = bound_module(3)
        del mod
        gc.collect()
    assert wait_for_cpus(total) == total


def dying_controller(deaths: int, marks):
    """A real controller class whose first ``deaths`` instances SIGKILL their own process as
    they come up (a marker file in ``marks`` counts them across processes)."""
    from raymodule.controller.actor import ACTOR_OPTIONS, Controller

    marks = str(marks)

    class DyingController(Controller):
        def __init__(self, *args, **kwargs):
            died = len(os.listdir(marks))
            if died < deaths:
                open(os.path.join(marks, f"died-{died}"), "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            super().__init__(*args, **kwargs)

    return ray.remote(**ACTOR_OPTIONS)(DyingController)


def controller_dying_in_start(marks):
    """A real controller class that SIGKILLs its own process in ``start`` once it has placed
    and started its workers, before it answers (writing its family's name in ``marks``)."""
    from raymodule.controller.actor import ACTOR_OPTIONS, Controller

    class DiesInStart(Controller):
        def start(self, start_with=None):
            self._group.start(self._backend, start_with)
            (marks / "family").write_text(self._group.family)
            os.kill(os.getpid(), signal.SIGKILL)

    return ray.remote(**ACTOR_OPTIONS)(DiesInStart)


def test_a_controller_lost_as_it_comes_up_is_replaced_once_and_a_second_loss_is_an_error(
    tmp_path, monkeypatch, caplog
):
    """A controller's process that dies before its first answer (a flake seen once in CI:
    "the actor is unavailable: connection refused") held nothing of the family: binding
    starts another one, with a warning. Dying twice is one clear error, and nothing is
    left holding CPUs."""
    import raymodule.handle

    total = ray.cluster_resources()["CPU"]
    once, twice = tmp_path / "once", tmp_path / "twice"
    once.mkdir()
    twice.mkdir()
    monkeypatch.setattr(raymodule.handle, "RemoteController", dying_controller(1, once))
    x, y = dataset(n=32)
    with caplog.at_level("WARNING", logger="raymodule.handle"):
        with raymodule.Module(mlp(), context=[mx.cpu(0), mx.cpu(1)]) as mod:
            mod.fit(mx.io.NDArrayIter(x, y, batch_size=8), num_epoch=1)
            assert mod.get_params()[0]
    assert os.listdir(once) == ["died-0"]
    said = [r.getMessage() for r in caplog.records if "came up" in r.getMessage()]
    assert len(said) == 1 and "starting another" in said[0]

    monkeypatch.setattr(raymodule.handle, "RemoteController", dying_controller(2, twice))
    with pytest.raises(raymodule.WorkerLostError, match="controller was lost as it came up"):
        bound_module(2)
    assert sorted(os.listdir(twice)) == ["died-0", "died-1"]
    assert wait_for_cpus(total) == total


def test_a_controller_lost_after_it_placed_its_workers_leaves_no_placement_group(
    tmp_path, monkeypatch
):
    """Ray does not remove the placement groups an actor made when the actor dies. A
    controller lost in ``start``, after it placed its workers and before it answered, never
    told the client which it made: they are named after the module family, and closing the
    failed start removes them by that name, so the CPUs they reserved are free again."""
    from ray.util.placement_group import placement_group_table

    import raymodule.handle

    total = ray.cluster_resources()["CPU"]
    monkeypatch.setattr(raymodule.handle, "RemoteController", controller_dying_in_start(tmp_path))
    with pytest.raises(raymodule.WorkerLostError, match="controller and its 0 workers were lost"):
        bound_module(2)
    family = (tmp_path / "family").read_text()
    made = [g for g in placement_group_table().values() if g["name"].startswith(f"{family}-")]
    assert [g["name"] for g in made] == [f"{family}-all"]
    assert all(g["state"] == "REMOVED" for g in made), made
    assert wait_for_cpus(total) == total


def test_ctrl_c_while_the_workers_wait_for_room_returns_at_once_and_releases_it(monkeypatch):
    """Ctrl-C (SIGINT) while a module's start waits for room it never gets (8 workers of a
    CPU each on 4): the client is back within seconds, and the controller and the placement
    group it made are gone. Before, the start was not closed on an interrupt at all, and then
    its polite shutdown call waited its 30 s behind the start the controller was still in."""
    import threading

    from ray.util.placement_group import placement_group_table

    # no start below every context; and should the interrupt not come, a PlacementError
    # ends the wait in a minute (the test then fails on it)
    monkeypatch.setenv("RAYMODULE_START_WAIT_S", "60")
    monkeypatch.setenv("RAYMODULE_PLACEMENT_TIMEOUT_S", "60")

    def waiting() -> list[dict]:
        return [
            g
            for g in placement_group_table().values()
            if g["name"].startswith("raymodule-") and g["state"] != "REMOVED"
        ]

    done = threading.Event()  # the test is over: no SIGINT after it, whatever happened

    def interrupt_once_it_waits():  # keyed to the wait, not to a time
        while not done.wait(0.01):
            if waiting() and not done.is_set():
                os.kill(os.getpid(), signal.SIGINT)
                return

    def live_controllers() -> set[str]:
        actors = ray._private.state.actors().values()
        return {
            a["ActorID"]
            for a in actors
            if a["ActorClassName"] == "Controller" and a["State"] != "DEAD"
        }

    before = live_controllers()
    total = ray.cluster_resources()["CPU"]
    interrupter = threading.Thread(target=interrupt_once_it_waits, daemon=True)
    # SIGINT as in a terminal: a process a shell without job control started in the
    # background (as CI may start pytest) ignores it, and Python then leaves it ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    tic = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            interrupter.start()
            bound_module(8)
    finally:
        done.set()
        interrupter.join(5)
        signal.signal(signal.SIGINT, previous)
    back_s = time.monotonic() - tic
    assert back_s < 20, f"back {back_s:.1f} s after the start began"  # a bound, not a timing
    assert waiting() == []
    assert live_controllers() <= before  # its own is dead
    assert wait_for_cpus(total) == total


def test_workers_load_torch_only_when_their_group_needs_the_network_and_never_sklearn():
    """torch (gloo) takes seconds of CPU to import: a module of one worker never loads it,
    nor do workers on one node, which sum their gradients in shared memory. MXNet would load
    scikit-learn (half a second) for an API the workers never use."""

    def loaded(worker):
        return sorted({"torch", "sklearn"} & set(sys.modules))

    x, y = dataset(n=32)
    with raymodule.Module(mlp(), context=mx.cpu()) as mod:
        mod.fit(mx.io.NDArrayIter(x, y, batch_size=8), num_epoch=1)
        assert ray.get(mod.workers.handles[0].__ray_call__.remote(loaded), timeout=60) == []
    with raymodule.Module(mlp(), context=[mx.cpu(0), mx.cpu(1)]) as mod:
        mod.fit(mx.io.NDArrayIter(x, y, batch_size=8), num_epoch=1)
        handles = mod.workers.handles
        assert ray.get([h.__ray_call__.remote(loaded) for h in handles], timeout=60) == [[], []]


def test_the_controller_never_imports_mxnet():
    """The controller relays the client's MXNet objects sealed and splits work without MXNet:
    importing it there took seconds of CPU while the workers started. Through every path a
    module takes: bind, fit from an NDArrayIter and from a DatasetIter (with a composite
    metric), score, predict, reshape, the intermediate API, get_params and the read-only
    views of MXNet's state; the objects still reach the workers and come back whole."""

    def imported(controller):
        return sorted({"mxnet", "raymodule.data.batches", "raymodule.views"} & set(sys.modules))

    x, y = dataset(n=64)
    with raymodule.Module(mlp(), context=[mx.cpu(0), mx.cpu(1)]) as mod:
        mod.bind([("data", (16, 20))], [("softmax_label", (16,))])
        controller = mod.workers.controller
        mod.fit(
            mx.io.NDArrayIter(x, y, batch_size=16),
            num_epoch=1,
            optimizer_params={"learning_rate": 0.1, "momentum": 0.9},
        )
        mod.fit(
            raymodule.DatasetIter(raymodule.ArrayDataset(x, y), batch_size=16),
            num_epoch=2,
            begin_epoch=1,
            eval_metric=mx.metric.create(["acc", "ce"]),
        )
        accuracy = dict(mod.score(mx.io.NDArrayIter(x, y, batch_size=16), "acc"))["accuracy"]
        assert 0.0 <= accuracy <= 1.0
        assert mod.predict(mx.io.NDArrayIter(x, y, batch_size=16)).shape == (64, 10)
        mod.reshape([("data", (8, 20))], [("softmax_label", (8,))])
        mod.forward(mx.io.DataBatch([mx.nd.array(x[:8])], [mx.nd.array(y[:8])]), is_train=True)
        mod.backward()
        mod.update()
        assert mod.get_outputs()[0].shape == (8, 10)
        assert set(mod.get_params()[0]) == set(mod._arg_params)
        assert len(mod._exec_group.grad_arrays) == len(mod._arg_params)
        assert mod._updater.states  # the optimizer's states, read through the controller
        assert ray.get(controller.__ray_call__.remote(imported), timeout=60) == []


def worker_pid(mod, rank):
    return ray.get(mod.workers.handles[rank].__ray_call__.remote(lambda self: os.getpid()))


def test_a_killed_worker_is_one_clear_error():
    mod = bound_module(2)
    os.kill(worker_pid(mod, 1), signal.SIGKILL)
    x, y = dataset(n=8)
    with pytest.raises(raymodule.WorkerLostError, match="worker 1 .* was lost"):
        mod.forward(mx.io.DataBatch([mx.nd.array(x)], [mx.nd.array(y)]))
        mod.get_outputs()
    with pytest.raises(raymodule.WorkerLostError):  # and stays an error
        mod.get_outputs()
    mod.close()


def test_a_worker_killed_during_fit_stops_fit_with_one_clear_error(monkeypatch):
    """The loss is found by the worker's death, not by waiting out a timeout: the collective
    timeout is longer than the test may run (pytest-timeout's bound)."""
    monkeypatch.setenv("RAYMODULE_COLLECTIVE_TIMEOUT_S", "3600")
    mod = raymodule.Module(mlp(), context=[mx.cpu(0), mx.cpu(1)])
    x, y = dataset(n=400)
    fired = []

    def kill_at_step_3(param):
        if param.nbatch == 3 and not fired:
            fired.append(True)
            os.kill(worker_pid(mod, 0), signal.SIGKILL)

    with pytest.raises(raymodule.WorkerLostError, match="lost"):
        mod.fit(
            mx.io.NDArrayIter(x, y, batch_size=8), num_epoch=5, batch_end_callback=kill_at_step_3
        )
    assert fired == [True]
    mod.close()
