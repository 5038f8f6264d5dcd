"""Elastic training's parts on their own: the pure policies, and the membership machinery
(controller, worker group, recovery in the client) against light stand-in workers on the
session's real Ray. The whole of it under real faults is tests/test_elastic.py."""

from __future__ import annotations

import contextlib
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
    decision = policy.on_loss(Limits(3, elastic=False), Loss(2, 1, 0))
    assert decision.action is Action.FAIL
    assert "RunConfig" in decision.reason


@pytest.mark.parametrize(
    "limits, loss, action",
    [
        (Limits(3, min_workers=2), Loss(2, 1, 0), Action.CONTINUE),
        (Limits(3, min_workers=None), Loss(2, 1, 0), Action.WAIT),  # floor: every context
        (Limits(3, min_workers=3), Loss(2, 1, 0), Action.WAIT),
        (Limits(3, min_workers=1), Loss(1, 2, 0), Action.CONTINUE),
        (Limits(3, min_workers=1, max_failures=3), Loss(2, 1, 3), Action.FAIL),
        (Limits(3, min_workers=1, max_failures=3), Loss(1, 2, 2), Action.CONTINUE),
        (Limits(3, min_workers=1, max_failures=0), Loss(2, 1, 0), Action.FAIL),
        (Limits(3, min_workers=1, max_failures=-1), Loss(2, 1, 99), Action.CONTINUE),
        (Limits(3, min_workers=1), Loss(0, 3, 0), Action.RESTART),  # storage is fit's to read
        (Limits(3, min_workers=1, max_failures=1), Loss(0, 3, 1), Action.FAIL),
        (Limits(2, min_workers=5), Loss(2, 0, 0), Action.CONTINUE),  # floor <= contexts
        # the group broke with nobody lost: re-formed up to max_reforms times in a row
        (Limits(3, max_reforms=2), Loss(3, 0, 0, broken_in_a_row=1), Action.CONTINUE),
        (Limits(3, max_reforms=2), Loss(3, 0, 0, broken_in_a_row=2), Action.CONTINUE),
        (Limits(3, max_reforms=2), Loss(3, 0, 0, broken_in_a_row=3), Action.EVICT),
        (Limits(3, max_reforms=0), Loss(3, 0, 9, broken_in_a_row=1), Action.EVICT),
        # ... and that is no failure: max_failures is not passed by it
        (Limits(3, max_failures=0), Loss(3, 0, 0, broken_in_a_row=1), Action.CONTINUE),
    ],
)
def test_on_loss(limits, loss, action):
    assert policy.on_loss(limits, loss).action is action


def test_max_failures_counts_failure_events_not_workers():
    """A lost node that ran 4 workers is one failure, not four."""
    limits = Limits(8, min_workers=1, max_failures=2)
    assert policy.on_loss(limits, Loss(survivors=4, lost=4, failures_before=0)).action is (
        Action.CONTINUE
    )
    assert policy.on_loss(limits, Loss(survivors=2, lost=2, failures_before=1)).action is (
        Action.CONTINUE
    )
    decision = policy.on_loss(limits, Loss(survivors=1, lost=1, failures_before=2))
    assert decision.action is Action.FAIL
    assert "3 failures" in decision.reason and "max_failures=2" in decision.reason


def test_evicting_says_why():
    decision = policy.on_loss(Limits(3, max_reforms=1), Loss(3, 0, 0, broken_in_a_row=2))
    assert "RAYMODULE_MAX_REFORMS=1" in decision.reason and "slowest" in decision.reason


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


@contextlib.contextmanager
def replacements_never_start():
    """Replacements started meanwhile never come up, so none joins a recovery early."""
    open(NEVER_UP, "w").close()
    try:
        yield
    finally:
        os.remove(NEVER_UP)


class StandIn:
    """A worker with the membership calls of raymodule's, and a step counter instead of a
    model; ``restore`` takes a peer's counter as the real one takes its parameters."""

    def __init__(self, device, bucket_bytes):
        if os.path.exists(NEVER_UP):  # a replacement that never comes up
            time.sleep(3600)
        self.count, self.group, self.restored, self.generation = 0, None, 0, 0
        self.fault = None  # (method, "die" | "hang"): what this worker does when next called

    def set_fault(self, method, how):
        self.fault = (method, how)

    def _maybe_fail(self, method):
        if self.fault is not None and self.fault[0] == method:
            if self.fault[1] == "die":
                os._exit(1)
            time.sleep(3600)

    def steps(self, kind, mids, batches, generation):
        self._maybe_fail("steps")
        return [], 0.0

    def get_params(self, mid):
        self._maybe_fail("get_params")
        return self.count

    def describe(self):
        return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def rendezvous_address(self):
        return "127.0.0.1:0"

    def leave(self, generation=None):
        self._maybe_fail("leave")
        self.group = None

    def join(self, world, rank, address, backend, timeout_s, generation):
        self.group = (world, rank, generation)

    def applied(self):
        self._maybe_fail("applied")
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


def kill(handle) -> None:
    """Kills a worker and waits until Ray says it is dead (ray.kill only asks for it: a call
    made right after may still run)."""
    ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            ray.get(handle.describe.remote(), timeout=10)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return
        time.sleep(0.05)
    raise AssertionError("the killed worker still answers")


def fail_step(workers, rank):
    """Kills the worker of ``rank`` and returns the failure a step then raises."""
    kill(workers.handles[rank])
    with pytest.raises(StepsFailed) as failed:
        workers.get(workers.send_steps("train_step", [], [None] * workers.world_size), "steps")
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

    committed = workers.recover(failure)
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
        workers.recover(failure)
    with pytest.raises(WorkerLostError):
        workers.submit("applied")


def test_below_the_floor_training_waits_then_fails_in_words(stand_ins):
    workers, _, _ = stand_ins
    workers.limits = Limits(3, min_workers=3, max_failures=-1)
    with replacements_never_start():
        failure = fail_step(workers, 2)
        with pytest.raises(WorkerLostError, match=r"worker 2 .* was lost.*min_workers=3"):
            workers.recover(failure)


def test_a_silent_worker_is_lost_after_the_collective_timeout(stand_ins):
    workers, _, events = stand_ins
    workers.limits = Limits(3, min_workers=1)
    # the group broke; ranks 0 and 2 answer, rank 1 stays busy in its steps (alive, silent)
    workers.call("set_fault", "steps", "hang", ranks=[1])
    workers.send_steps("train_step", [], [None] * workers.world_size)
    with replacements_never_start():
        workers.recover(StepsFailed("steps", {}, "GroupBrokenError: timed out"))
    assert workers.slots == [0, 2]
    assert events[0]["lost"] == ["slot 1"] and "silent" in events[0]["why"]


def test_a_survivor_silent_while_the_group_re_forms_is_removed_within_the_bound(stand_ins):
    workers, _, events = stand_ins
    workers.limits = Limits(3, min_workers=1, max_failures=-1)
    workers.call("set_fault", "leave", "hang", ranks=[2])  # SIGSTOPped, as it were
    failure = fail_step(workers, 0)
    with replacements_never_start():
        workers.recover(failure)  # bounded: without the bound, pytest-timeout ends it
    assert workers.slots == [1]
    # one change, announced once: both slots, and why each went
    assert events[-1]["lost"] == ["slot 0", "slot 2"] and len(events) == 1
    assert "ActorDiedError" in events[-1]["why"] and "silent" in events[-1]["why"]
    assert workers.failures == 2  # the kill, then the silent survivor: two events


def test_a_worker_lost_while_replacements_join_leaves_them_set_up_as_new(stand_ins):
    """A survivor dies while a replacement is admitted: the replacement is still treated as
    a new worker (modules set up, state restored), not as a survivor in step."""
    workers, holder, events = stand_ins
    workers.limits = Limits(3, min_workers=1, max_failures=-1)
    workers.call("set_count", 4)
    workers.recover(fail_step(workers, 1))
    assert ray.get(workers.controller.ready.remote(60.0)) == [1]
    workers.call("set_fault", "applied", "die", ranks=[1])  # slot 2 dies at the admission
    workers._next_poll = 0.0
    with replacements_never_start():
        assert workers.grow(drain=lambda: None)
    assert workers.slots == [0, 1]
    states = workers.call("state")
    assert [s["count"] for s in states] == [4, 4]
    assert states[0]["restored"] == 0 and states[1]["restored"] > 0  # it took slot 0's state
    assert holder.rejoined[-1] == [1]  # and its modules were made: it is new
    assert events[-1]["lost"] == ["slot 2"]


def test_a_worker_lost_in_a_read_outside_the_step_loop_is_recovered_from(stand_ins):
    """e.g. the parameters read at an epoch's end: the run goes on, the read is asked again."""
    workers, _, events = stand_ins
    workers.limits = Limits(3, min_workers=1)
    workers.call("set_count", 9)
    kill(workers.handles[0])
    with replacements_never_start():
        assert workers.call("get_params", 7, ranks=[0]) == [9]
    assert workers.slots == [1, 2] and events[-1]["lost"] == ["slot 0"]


def test_a_group_that_keeps_breaking_with_nobody_lost_evicts_its_slowest_member(stand_ins):
    """No livelock: a member late by more than the collective timeout makes every rank report
    a broken group and none lost; after RAYMODULE_MAX_REFORMS re-formings its slowest goes."""
    workers, _, events = stand_ins
    workers.limits = Limits(3, min_workers=1, max_reforms=2)
    for _ in range(2):
        workers.recover(StepsFailed("steps", {}, "GroupBrokenError: timed out", slowest=2))
        assert workers.slots == [0, 1, 2] and workers.failures == 0
    with replacements_never_start():
        workers.recover(StepsFailed("steps", {}, "GroupBrokenError: timed out", slowest=2))
    assert workers.slots == [0, 1] and workers.failures == 1
    assert [e["change"] for e in events] == ["re-formed", "re-formed", "lost"]
    assert "evicted" in events[-1]["why"] and "RAYMODULE_MAX_REFORMS=2" in events[-1]["why"]


def test_a_successful_step_ends_a_run_of_re_formings(stand_ins):
    workers, _, _ = stand_ins
    workers.limits = Limits(3, min_workers=1, max_reforms=1)
    workers.recover(StepsFailed("steps", {}, "GroupBrokenError: timed out", slowest=2))
    workers.get(workers.send_steps("train_step", [], [None] * workers.world_size), "steps")
    workers.recover(StepsFailed("steps", {}, "GroupBrokenError: timed out", slowest=2))
    assert workers.slots == [0, 1, 2] and workers.broken_in_a_row == 1
