"""Elastic training's parts on their own: the pure policies, and the membership machinery
(controller, worker group, recovery in the client) against light stand-in workers on the
session's real Ray. The whole of it under real faults is tests/test_elastic.py."""

from __future__ import annotations

import os
import sys
import tempfile
import time

import mxnet as mx
import pytest
import ray

from raymodule import policy
from raymodule.errors import WorkerLostError
from raymodule.policy import Action, Limits, Loss
from raymodule.workerset import StepsFailed, WorkerSet


# -- policies ----------------------------------------------------------------------------------
def test_outside_a_run_a_loss_fails_and_says_how_to_go_on():
    decision = policy.on_loss(Limits(3, elastic=False), Loss(2, 1, 0, True))
    assert decision.action is Action.FAIL
    assert "RunConfig" in decision.reason


@pytest.mark.parametrize(
    "limits, loss, action",
    [
        (Limits(3, min_workers=2), Loss(2, 1, 0, False), Action.CONTINUE),
        (Limits(3, min_workers=None), Loss(2, 1, 0, False), Action.WAIT),  # floor: every context
        (Limits(3, min_workers=3), Loss(2, 1, 0, False), Action.WAIT),
        (Limits(3, min_workers=1), Loss(1, 2, 0, False), Action.CONTINUE),
        (Limits(3, min_workers=1, max_failures=3), Loss(2, 1, 3, False), Action.FAIL),
        (Limits(3, min_workers=1, max_failures=3), Loss(1, 2, 1, False), Action.CONTINUE),
        (Limits(3, min_workers=1, max_failures=-1), Loss(2, 1, 99, False), Action.CONTINUE),
        (Limits(3, min_workers=1), Loss(0, 3, 0, True), Action.RESTART),
        (Limits(3, min_workers=1), Loss(0, 3, 0, False), Action.FAIL),
        (Limits(2, min_workers=5), Loss(2, 0, 0, False), Action.CONTINUE),  # floor <= contexts
    ],
)
def test_on_loss(limits, loss, action):
    assert policy.on_loss(limits, loss).action is action


def test_a_lost_node_counts_once_per_worker_it_held():
    limits = Limits(4, min_workers=1, max_failures=2)
    assert (
        policy.on_loss(limits, Loss(survivors=2, lost=2, lost_before=0, has_checkpoint=True)).action
        is Action.CONTINUE
    )
    decision = policy.on_loss(limits, Loss(survivors=1, lost=2, lost_before=1, has_checkpoint=True))
    assert decision.action is Action.FAIL
    assert "3 workers lost" in decision.reason and "max_failures=2" in decision.reason


def test_after_wait_names_the_floor_and_what_to_change():
    assert policy.after_wait(Limits(3, min_workers=2), 2, 5.0).action is Action.CONTINUE
    decision = policy.after_wait(Limits(3, min_workers=3), 2, 5.0)
    assert decision.action is Action.FAIL
    assert "min_workers=3" in decision.reason and "RAYMODULE_MIN_WORKERS_WAIT_S" in decision.reason
    assert "3 contexts" in policy.after_wait(Limits(3), 1, 5.0).reason


@pytest.mark.parametrize(
    "configured, live, ready, admitted", [(3, 2, 1, 1), (3, 2, 2, 1), (3, 3, 1, 0), (4, 1, 2, 2)]
)
def test_to_admit(configured, live, ready, admitted):
    assert policy.to_admit(configured, live, ready) == admitted


# -- membership against stand-in workers ------------------------------------------------------
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
NEVER_UP = os.path.join(tempfile.gettempdir(), f"raymodule-never-up-{os.getpid()}")


class StandIn:
    """A worker with the membership calls of raymodule's, and a step counter instead of a
    model; ``restore`` takes a peer's counter as the real one takes its parameters."""

    def __init__(self, device, bucket_bytes):
        if os.path.exists(NEVER_UP):  # a replacement that never comes up
            time.sleep(3600)
        self.count, self.group, self.restored = 0, None, 0

    def hang(self):
        time.sleep(3600)

    def describe(self):
        return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def rendezvous_address(self):
        return "127.0.0.1:0"

    def leave(self):
        self.group = None

    def join(self, world, rank, address, backend, timeout_s, generation):
        self.group = (world, rank, generation)

    def applied(self):
        return self.count

    def set_count(self, count):
        self.count = count

    def snapshot(self, mid, expected=None):
        return {"applied": self.count} if expected in (None, self.count) else None

    def restore(self, mid, snapshot):
        self.count = snapshot["applied"]
        self.restored += 1

    def state(self):
        return {"group": self.group, "count": self.count, "restored": self.restored}


class Holder:
    """The modules' side of a membership change, as a module holding state does it."""

    _id = 7

    def __init__(self):
        self.rejoined = []

    def _rejoin(self, new_ranks):
        self.rejoined.append(list(new_ranks))

    def _holds_state(self):
        return True

    def _install_optimizer(self, ranks):
        pass


@pytest.fixture
def stand_ins(monkeypatch):
    monkeypatch.setenv("RAYMODULE_COLLECTIVE_TIMEOUT_S", "2")
    monkeypatch.setenv("RAYMODULE_MIN_WORKERS_WAIT_S", "2")
    workers = WorkerSet([mx.cpu(i) for i in range(3)], worker_class=StandIn)
    holder = Holder()
    workers.modules[holder._id] = holder
    events = []
    workers.on_membership = events.append
    yield workers, holder, events
    workers.close()


def fail_step(workers, rank):
    """Kills the worker of ``rank`` and returns the failure a step then raises."""
    ray.kill(workers.handles[rank], no_restart=True)
    with pytest.raises(StepsFailed) as failed:
        workers.get(workers.submit("applied"), "train_step")
    return failed.value


def test_a_lost_worker_is_removed_and_survivors_agree_on_the_last_step(stand_ins):
    workers, holder, events = stand_ins
    workers.limits = Limits(3, min_workers=2, max_failures=1)
    assert workers.generation == 1 and workers.slots == [0, 1, 2]
    # a failed step may leave one survivor a step ahead of another: the furthest one counts
    for rank, count in enumerate([5, 5, 6]):
        workers.call("set_count", count, ranks=[rank])
    failure = fail_step(workers, 1)
    assert list(failure.lost) == [1] and "ActorDiedError" in failure.lost[1]

    committed = workers.recover(failure, outstanding=[])
    assert committed == 6
    assert workers.slots == [0, 2] and workers.generation == 2 and workers.world_size == 2
    states = workers.call("state")
    assert [s["group"] for s in states] == [(2, 0, 2), (2, 1, 2)]
    assert [s["count"] for s in states] == [6, 6]
    assert [s["restored"] for s in states] == [1, 0]  # only the one behind was restored
    assert holder.rejoined == [[]]  # split again, no new worker
    assert events[-1]["world_size"] == 2 and events[-1]["lost"] == ["slot 1"]
    assert workers.pending == [1]  # its replacement is starting

    # the replacement comes up (its bundle is free again) and joins at a step boundary
    assert ray.get(workers.controller.ready.remote(60.0)) == [1]
    drained = []
    workers._next_poll = 0.0
    assert workers.grow(drain=lambda: drained.append(True))
    assert drained == [True]
    assert workers.slots == [0, 1, 2] and workers.generation == 3
    states = workers.call("state")
    assert [s["group"] for s in states] == [(3, r, 3) for r in range(3)]
    assert [s["count"] for s in states] == [6, 6, 6]
    assert holder.rejoined[-1] == [1]
    assert events[-1]["change"] == "grown" and events[-1]["world_size"] == 3

    # a second loss is more than max_failures=1: a clear error, and the set says so afterwards
    failure = fail_step(workers, 0)
    with pytest.raises(WorkerLostError, match="max_failures=1"):
        workers.recover(failure, outstanding=[])
    with pytest.raises(WorkerLostError):
        workers.submit("applied")


def test_below_the_floor_training_waits_then_fails_in_words(stand_ins):
    workers, _, _ = stand_ins
    workers.limits = Limits(3, min_workers=3, max_failures=-1)
    open(NEVER_UP, "w").close()
    try:
        failure = fail_step(workers, 2)
        with pytest.raises(WorkerLostError, match=r"worker 2 .* was lost.*min_workers=3"):
            workers.recover(failure, outstanding=[])
    finally:
        os.remove(NEVER_UP)


def test_a_silent_worker_is_lost_after_the_collective_timeout(stand_ins):
    workers, _, events = stand_ins
    workers.limits = Limits(3, min_workers=1)
    # the group broke; ranks 0 and 2 answer, rank 1 stays busy (alive, silent)
    outstanding = [workers.submit("applied", ranks=[0])[0], workers.handles[1].hang.remote()]
    outstanding.append(workers.submit("applied", ranks=[2])[0])
    failure = StepsFailed("train_step", {}, "GroupBrokenError: timed out")
    workers.recover(failure, outstanding=[outstanding])
    assert 1 not in workers.slots and workers.world_size in (2, 3)
    assert events[0]["lost"] == ["slot 1"] and "silent" in events[0]["why"]
