"""Elastic training's parts on their own: the pure policies, and the controller (membership,
steps in flight, recovery, the journal that sets up replacements) against light stand-in
workers on the session's real Ray, with no module. The whole of it under real faults is
tests/test_elastic.py."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

import mxnet as mx
import numpy as np
import pytest
import ray
from conftest import wait_until

from raymodule.checkpoint import Snapshot
from raymodule.constants import Settings
from raymodule.controller import Controller, EveryWorkerLost, State, StepsFailed, chunks, policy
from raymodule.controller.plans import StopFlag, stop_asked
from raymodule.controller.policy import Action, Limits, Loss
from raymodule.data import Batch, split_slices
from raymodule.errors import GroupBrokenError, WorkerError, WorkerLostError
from raymodule.worker.actor import assemble
from raymodule.worker.cores import cores_name


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
        # in a Ray Dataset's pass the streams cannot be re-split: from the latest checkpoint
        (Limits(3, min_workers=1), Loss(2, 1, 0, mid_pass=True), Action.RESTART),
        (Limits(3, min_workers=1), Loss(3, 0, 0, broken_in_a_row=1, mid_pass=True), Action.RESTART),
        (Limits(3, min_workers=1, max_failures=0), Loss(2, 1, 0, mid_pass=True), Action.FAIL),
        (Limits(3, elastic=False), Loss(2, 1, 0, mid_pass=True), Action.FAIL),
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


def test_leaving_in_a_ray_datasets_pass_restarts_saying_why():
    assert policy.on_leave(Limits(3, min_workers=1), 2).action is Action.CONTINUE
    decision = policy.on_leave(Limits(3, min_workers=1), 2, mid_pass=True)
    assert decision.action is Action.RESTART and "Ray Dataset" in decision.reason
    assert "Ray Dataset" in policy.on_loss(Limits(3), Loss(2, 1, 0, mid_pass=True)).reason


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


def _share(shapes, work_load: list, index: int) -> int:
    """The samples of the global batch the worker at ``index`` binds to."""
    share = split_slices(shapes[0][0].shape[0], work_load)[index]
    return share.stop - share.start


def _refuse_to_load():
    raise RuntimeError("this answer cannot be loaded here")


class Unloadable:
    """An answer the caller cannot load: ``ray.get`` of it raises a RaySystemError, a RayError
    that is neither an actor's death nor the task's own error (as an ObjectLostError is, for an
    answer lost with its node's object store)."""

    def __reduce__(self):
        return (_refuse_to_load, ())


class StandIn:
    """A worker with the membership calls of raymodule's, and a step counter instead of a
    model; ``restore`` takes a peer's counter as the real one takes its parameters. It notes
    the module calls the controller's journal replays."""

    def __init__(self, device, bucket_bytes, shm_allreduce, pin_cores, split_update):
        if os.path.exists(NEVER_UP):  # a replacement that never comes up
            time.sleep(3600)
        self.count, self.group, self.restored, self.generation = 0, None, 0, 0
        self.calls = []  # the module calls it received: (method, batch rows)
        self.reads = []  # the parts it read steps sent again from (their object ids)
        self.down = False  # told to shut down (as SIGTERM tells a real one)
        # (method, "die" | "hang" | "raise" | "broken"): what this worker does when next called
        # ("raise": an error of its own, once; "broken": its group broke, once; "unloadable",
        # for "steps" only: it runs them, once, and answers with an Unloadable); with "late-"
        # first ("late-broken"), it does so LATE_S seconds into the call; with "-left"
        # ("raise-left", "broken-left"), it left its group then: every later step fails on the
        # broken group until it joins a new one, as a real worker's does
        self.fault = None
        self.left = False
        self.params_at = []  # its step count each time its parameters were set

    def set_fault(self, method, how):
        self.fault = (method, how)

    def _maybe_fail(self, method):
        if self.fault is not None and self.fault[0] == method and self.fault[1] != "unloadable":
            if self.fault[1].startswith("late-"):  # held first (at a gate, in a long step)
                time.sleep(LATE_S)
                self.fault = (method, self.fault[1].removeprefix("late-"))
            if self.fault[1] == "die":
                os._exit(1)
            if self.fault[1].removesuffix("-left") in ("raise", "broken"):
                how, self.fault = self.fault[1], None
                self.left = how.endswith("-left")
                how = how.removesuffix("-left")
                if how == "broken":
                    raise GroupBrokenError("the group broke")
                raise ValueError("a bad batch")
            time.sleep(3600)

    def steps(self, kind, mids, batches, generation, plan=None):
        self._maybe_fail("steps")
        if self.left:
            raise GroupBrokenError("the group broke")
        if plan is not None:  # the parts are references: Ray resolves only top-level ones
            self.reads.append([part.hex() for part in batches])
        if kind == "train_step":
            self.count += len(mids)
        if self.fault == ("steps", "unloadable"):
            self.fault = None
            return Unloadable()
        return [None] * len(mids), 0.0, 0.0, self.down

    def shut_down(self):
        self.down = True

    def get_params(self, mid):
        self._maybe_fail("get_params")
        return self.count

    def describe(self, grouped=True):
        context = ray.get_runtime_context()
        return {
            "node": context.get_node_id(),
            "actor": context.get_actor_id(),
            "pid": os.getpid(),
            "cores_name": cores_name(os.sched_getaffinity(0)),
        }

    def rendezvous_address(self):
        return "127.0.0.1:0"

    def leave(self, generation=None):
        self._maybe_fail("leave")
        self.group = None

    def join(self, world, rank, address, backend, timeout_s, generation, place):
        self._maybe_fail("join")
        self.group = (world, rank, generation, place)
        self.left = False

    def applied(self):
        self._maybe_fail("applied")
        return self.count

    def set_count(self, count):
        self.count = count

    def create(self, mid, *args):
        self.calls.append(("create", None))

    def bind(self, mid, *args):
        self._maybe_fail("bind")
        self.calls.append(("bind", _share(*args[-3:])))
        return ["default"]

    def reshape(self, mid, shapes, work_load, index):
        self.calls.append(("reshape", _share(shapes, work_load, index)))

    def set_params(self, mid, *args):
        self.params_at.append(self.count)

    def init_optimizer(self, mid, *args):
        self.calls.append(("init_optimizer", None))

    def set_metric(self, metric):
        pass

    def snapshot(self, mid, expected=None):
        self._maybe_fail("snapshot")
        return Snapshot(b"", b"", None, self.count) if expected in (None, self.count) else None

    def restore(self, mid, snapshot):
        self.count = snapshot.applied
        self.restored += 1

    def state(self):
        return {
            "group": self.group,
            "count": self.count,
            "restored": self.restored,
            "calls": self.calls,
            "reads": self.reads,
            "params_at": self.params_at,
        }


MID = 7  # the one module the stand-ins hold
LATE_S = 6.0  # longer than the controller's silence_s here (twice the collective timeout of 2 s)


@pytest.fixture
def controller(monkeypatch):
    """A controller, in this process, of three stand-in workers holding one module (bound to
    a global batch of 6, parameters set, an optimizer installed), and the membership changes
    it announced."""
    monkeypatch.setenv("RAYMODULE_COLLECTIVE_TIMEOUT_S", "2")
    monkeypatch.setenv("RAYMODULE_MIN_WORKERS_WAIT_S", "2")
    devices = [mx.cpu(i) for i in range(3)]
    ctl = Controller(
        [{"CPU": 0.1}] * 3, ["cpu"] * 3, [str(d) for d in devices], True, "gloo",
        Settings.from_env(), StandIn,
    )  # fmt: skip
    try:
        ctl.start()
        ctl.create(MID, (), [(None, i) for i in range(3)])
        # a shape of MXNet's (a DataDesc) would have each stand-in import MXNet to read it:
        # seconds of CPU, in each test
        shapes = ([SimpleNamespace(name="data", shape=(6, 2))], None)
        ctl.bind(MID, (True, False, None, "write"), shapes, 6, [1] * 3)
        ctl.post("set_params", (MID,))
        ctl.post("init_optimizer", (MID, "sgd", {}, False))
        ctl.sync()
        ctl.seen = []
        yield ctl
    finally:
        ctl.shutdown()


def read(ctl, reply):
    """A reply's value; keeps the membership changes its view announced in ``ctl.seen``."""
    value, view = reply
    ctl.seen.extend(view["events"])
    return value


def call(ctl, method, *args, ranks=None):
    return read(ctl, ctl.call(method, args, None, ranks))


def events_of(ctl) -> list:
    """Every membership change announced so far."""
    read(ctl, (None, ctl.view()))
    return ctl.seen


def spec(ctl) -> dict:
    """A chunk of one global batch of 6, split as the client splits it."""
    cut = split_slices(6, [1] * len(ctl.members.slots))
    return {
        "serials": [0],
        "mids": [MID],
        "sizes": [6],
        "slices": [[(c.start, c.stop) for c in cut]],
        "sources": [ray.put([None]) for _ in cut],
    }


def step(ctl) -> list:
    """One training step through the controller; returns the steps finished: (serial,
    results, slices)."""
    return read(ctl, ctl.advance("train_step", spec(ctl), 0))["steps"]


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


def test_a_lost_worker_is_removed_and_survivors_agree_on_the_last_step(controller):
    ctl = controller
    ctl.limits = Limits(3, min_workers=2, max_failures=1)
    assert (
        ctl.members.generation == 1
        and ctl.members.slots == (0, 1, 2)
        and ctl.state is State.RUNNING
    )
    # a failed step may leave one survivor a step ahead of another: the furthest one counts
    for rank, count in enumerate([5, 5, 6]):
        call(ctl, "set_count", count, ranks=[rank])
    ctl.steps_sent = 6
    kill(ctl.members.handles[1])
    # step 7 fails: a stand-in applies it with a peer gone (a real worker would not, its
    # collective fails), so the survivors agree on step 7 and it is finished without results
    assert step(ctl) == [(0, None, None)]
    assert (
        ctl.members.slots == (0, 2) and ctl.members.generation == 2 and ctl.state is State.RUNNING
    )
    states = call(ctl, "state")
    # both on this machine's cores: each its place among the two (what pins real workers)
    assert [s["group"] for s in states] == [(2, 0, 2, (0, 2)), (2, 1, 2, (1, 2))]
    assert [s["count"] for s in states] == [7, 7]
    assert [s["restored"] for s in states] == [1, 0]  # only the one behind was restored
    # the survivors' share of the batch of 6 was split anew: 3 each, no module made again
    assert [s["calls"][-1] for s in states] == [("reshape", 3), ("reshape", 3)]
    event = events_of(ctl)[-1]
    assert event["world_size"] == 2 and event["lost"] == ["slot 1"] and event["step"] == 7
    assert ctl.members.pending == (1,)  # its replacement is starting

    # the replacement comes up (its bundle is free again) and joins at the next step boundary
    assert ctl.ready(60.0) == [1]
    ctl._next_poll = 0.0
    step(ctl)
    assert ctl.members.slots == (0, 1, 2) and ctl.members.generation == 3
    states = call(ctl, "state")
    assert [s["group"] for s in states] == [(3, r, 3, (r, 3)) for r in range(3)]
    assert [s["count"] for s in states] == [8, 8, 8]
    # the replacement was set up from the journal: made, bound to its share, optimizer
    assert [c for c, _ in states[1]["calls"]] == ["create", "bind", "init_optimizer"]
    assert states[1]["calls"][1] == ("bind", 2)
    assert events_of(ctl)[-1]["change"] == "grown"

    # a second loss is more than max_failures=1: a clear error, and the controller says so
    kill(ctl.members.handles[0])
    with pytest.raises(WorkerLostError, match="max_failures=1"):
        step(ctl)
    assert ctl.state is State.FAILED
    with pytest.raises(WorkerLostError):
        call(ctl, "applied")


def test_a_member_shut_down_leaves_at_the_next_step_boundary_and_it_is_no_failure(controller):
    ctl = controller
    ctl.limits = Limits(3, min_workers=1, max_failures=0)
    call(ctl, "set_count", 3)
    ctl.steps_sent = 3
    call(ctl, "shut_down", ranks=[1])
    step(ctl)  # its results say so; it still ran the step
    assert ctl.view()["leaving"] == [1] and ctl.members.slots == (0, 1, 2)
    with replacements_never_start():  # else one up at once may join in the same call
        step(ctl)  # the next boundary: it leaves before this step is sent
    assert ctl.members.slots == (0, 2) and ctl.failures == 0 and ctl.state is State.RUNNING
    states = call(ctl, "state")
    assert [s["count"] for s in states] == [5, 5] and [s["restored"] for s in states] == [0, 0]
    (event,) = events_of(ctl)
    assert event["change"] == "left" and event["left"] == ["slot 1"] and event["step"] == 4
    assert "SIGTERM" in event["why"] and ctl.members.pending == (1,)


def test_a_member_shut_down_outside_an_elastic_run_ends_it_in_words(controller):
    ctl = controller
    call(ctl, "shut_down", ranks=[0])
    step(ctl)
    with pytest.raises(WorkerLostError, match=r"slot 0 shut down \(SIGTERM\).*RunConfig"):
        step(ctl)


def test_a_member_shut_down_as_its_placement_group_is_removed_gets_no_replacement_there(
    controller,
):
    """Ray Tune stopping a trial removes the trial's placement group: Ray sends its actors
    SIGTERM (a member notes it, to leave at the next step boundary), then kills them. A
    replacement started in the removed group would only die: none is started, and the
    module fails at once, saying why."""
    ctl = controller
    ctl.limits = Limits(3, min_workers=1, max_failures=0)
    call(ctl, "shut_down", ranks=[1])
    step(ctl)
    assert ctl.view()["leaving"] == [1]
    group, _ = ctl._group._placed_in[1]
    ray.util.remove_placement_group(group)
    with pytest.raises(
        WorkerLostError,
        match=rf"slot 1 shut down \(SIGTERM\).*placement group slot 1's worker would start in "
        rf"\({group.id.hex()}\) was removed .*no worker can start in it",
    ):
        step(ctl)
    assert ctl._group.pending == {} and ctl.state is State.FAILED


def test_steps_sent_again_read_the_rows_the_new_split_gives_them():
    """After a re-forming, a worker reads its new rows from the parts put for the old split."""
    batch = Batch([np.arange(12).reshape(6, 2)], [np.arange(6)], [0], [0])
    three = [slice(0, 2), slice(2, 4), slice(4, 6)]
    refs = [ray.put([part]) for part in batch.parts(three)]
    spec = {"serials": [0], "mids": [MID], "sizes": [6], "sources": refs}
    spec["slices"] = [[(s.start, s.stop) for s in three]]
    same = chunks.worker_args(chunks.steps_of(spec), [[1, 1, 1]], 60.0)
    assert [plan for _, plan in same] == [None] * 3  # each reads its own part, as put
    two = chunks.worker_args(chunks.steps_of(spec), [[1, 1]], 60.0)
    rows = []
    for sources, plan in two:
        (got,) = assemble(sources, plan)
        rows.append(got.label[0].tolist())
    assert rows == [[0, 1, 2], [3, 4, 5]]


def test_steps_sent_again_read_a_copy_of_the_part_a_lost_member_read(controller):
    """Ray may fetch an object from any node that holds a copy, a lost one included (it then
    waits out its pull timeout, 10 s, and the survivor is declared silent): the steps sent
    again read the lost member's part from a copy the controller made, and the survivors'
    parts as they were put. (An evaluation step: a training step the survivors applied without
    the lost member is not sent again.)"""
    ctl = controller
    ctl.limits = Limits(3, min_workers=1)
    chunk = spec(ctl)
    parts = [part.hex() for part in chunk["sources"]]
    with replacements_never_start():
        kill(ctl.members.handles[1])
        read(ctl, ctl.advance("eval_step", chunk, 0))
    assert ctl.members.slots == (0, 2)
    survivors = [{part for sources in s["reads"] for part in sources} for s in call(ctl, "state")]
    assert parts[0] in survivors[0] and parts[2] in survivors[1]  # their own
    assert parts[1] not in survivors[0] | survivors[1]  # the lost member's: a copy of it
    assert all(len(read) == 2 for read in survivors)


def test_below_the_floor_training_waits_then_fails_in_words(controller):
    ctl = controller
    ctl.limits = Limits(3, min_workers=3, max_failures=-1)
    with replacements_never_start():
        kill(ctl.members.handles[2])
        with pytest.raises(WorkerLostError, match=r"worker 2 .* was lost.*min_workers=3"):
            step(ctl)


@pytest.mark.parametrize("preempted", [True, False], ids=["sigterm", "other"])
def test_a_plan_stopped_by_sigterm_below_the_floor_stops_with_the_workers_there(
    controller, preempted
):
    """A member lost with min_workers=3 and no replacement coming: while the controller waits
    for one, the client asks the plan to stop. Because of SIGTERM (a preemption notice), the
    wait ends: the group re-forms with the two workers that are there, the step in flight is
    finished and the plan stops before its next batch, with no failure, however long
    RAYMODULE_MIN_WORKERS_WAIT_S is. For any other reason (a callback raised), the floor holds:
    the wait runs its course and the module fails in words, as before."""
    ctl = controller
    ctl.limits = Limits(3, min_workers=3, max_failures=-1)
    waits = 120 if preempted else 3
    ctl.settings = dataclasses.replace(ctl.settings, min_workers_wait_s=waits, steps_per_call=1)
    one = spec(ctl)
    flag = StopFlag()
    plan = {
        **{k: one[k] * 2 for k in ("mids", "sizes", "slices")},
        "serials": [0, 1],
        "sources": [ray.put([None, None]) for _ in one["sources"]],
        "positions": [0, 1],
        "depth": 0,
        "stop_key": flag.key,
    }

    def stop_once_waiting():
        deadline = time.monotonic() + 60
        while ctl.state is not State.WAITING_FOR_WORKERS and time.monotonic() < deadline:
            time.sleep(0.01)
        flag.ask(preempted)

    ray.get(ctl.members.handles[2].set_fault.remote("steps", "die"))
    asking = threading.Thread(target=stop_once_waiting, daemon=True)
    try:
        with replacements_never_start():
            asking.start()
            if not preempted:
                with pytest.raises(WorkerLostError, match="after waiting 3 s .*min_workers=3"):
                    list(ctl.run("train_step", plan))
                return
            replies = [read(ctl, reply) for reply in ctl.run("train_step", plan)]
            # removed as the plan ended, by the controller: a client whose reading of it was
            # interrupted never clears it
            assert not stop_asked(flag.key)
    finally:
        asking.join()
        flag.clear()
    assert replies[-1]["stopped_at"] == 1
    assert [serial for reply in replies for serial, *_ in reply["steps"]] == [0]
    assert ctl.state is State.RUNNING and ctl.members.slots == (0, 1) and ctl.failures == 1
    assert [m["change"] for m in events_of(ctl)] == ["lost"]
    counts = [ray.get(h.state.remote())["count"] for h in ctl.members.handles]
    assert counts == [1, 1]


def test_sigterm_ends_a_wait_below_the_floor_in_any_call_of_the_run(controller):
    """A member lost with min_workers=3 and no replacement coming, found by a call that is no
    plan (a callback reading the workers): while the controller waits for one, the client asks
    the run's flag, which it set up with the run, because of SIGTERM. The wait ends at once,
    however long RAYMODULE_MIN_WORKERS_WAIT_S is: the group re-forms with the two workers there
    and the call says to call it again, which they answer."""
    ctl = controller
    flag = StopFlag()
    read(ctl, ctl.configure(Limits(3, min_workers=3, max_failures=-1), 0, flag.key))
    ctl.settings = dataclasses.replace(ctl.settings, min_workers_wait_s=120)

    def sigterm_once_waiting():
        deadline = time.monotonic() + 60
        while ctl.state is not State.WAITING_FOR_WORKERS and time.monotonic() < deadline:
            time.sleep(0.01)
        flag.ask(preempted=True)

    asking = threading.Thread(target=sigterm_once_waiting, daemon=True)
    try:
        with replacements_never_start():
            kill(ctl.members.handles[2])
            asking.start()
            with pytest.raises(WorkerLostError, match="during state.*call it again") as failed:
                call(ctl, "state")
    finally:
        asking.join()
        flag.clear()
    assert ctl.state is State.RUNNING and ctl.members.slots == (0, 1) and ctl.failures == 1
    assert len(call(ctl, "state")) == 2
    assert [m["change"] for m in failed.value.view["events"]] == ["lost"]


def test_a_silent_worker_is_lost_after_the_collective_timeout(controller):
    ctl = controller
    ctl.limits = Limits(3, min_workers=1)
    # the group broke; ranks 0 and 2 answer, rank 1 stays busy in its steps (alive, silent)
    call(ctl, "set_fault", "steps", "hang", ranks=[1])
    ctl._send("train_step", chunks.steps_of(spec(ctl)), None)
    with replacements_never_start():
        ctl._recover(StepsFailed("steps", {}, "GroupBrokenError: timed out"))
    assert ctl.members.slots == (0, 2)
    (event,) = events_of(ctl)
    assert event["lost"] == ["slot 1"] and "silent" in event["why"]


def test_a_member_whose_call_in_flight_died_is_lost_in_the_same_failure(controller):
    """Two workers die in the steps in flight, and the loss is first seen in a call to one of
    them alone (as a checkpoint's snapshot is asked of one rank): the other's call in flight
    says its process died, so both are lost in that one failure. Before, any answer was taken
    for a survivor's: the dead one was found only as the group re-formed, as a second failure
    (and a run stopping at a SIGTERM then named only that one in its error)."""
    ctl = controller
    ctl.limits = Limits(3, min_workers=1, max_failures=-1)
    call(ctl, "set_fault", "steps", "die", ranks=[0, 1])
    ctl._send("train_step", chunks.steps_of(spec(ctl)), None)
    with replacements_never_start():
        ctl._recover(StepsFailed("snapshot", {0: "ActorDiedError: died"}, ""))
    assert ctl.members.slots == (2,)
    (event,) = events_of(ctl)
    assert event["lost"] == ["slot 0", "slot 1"] and "silent" not in event["why"], event
    assert ctl.failures == 1  # one event


def test_a_survivor_whose_answer_in_flight_cannot_be_read_is_not_lost_with_the_dead(controller):
    """Worker 0 dies in the steps in flight; worker 2 finishes them, but its answer cannot be
    read (Ray raises an error that is neither a death nor the worker's own: here a
    RaySystemError; an ObjectLostError for an answer lost with its node's object store). That
    says nothing of worker 2's death: only worker 0 is lost, and the run goes on. Before, the
    error raised out of the recovery's settling of the calls in flight and ended the fit."""
    ctl = controller
    ctl.limits = Limits(3, min_workers=1, max_failures=-1)
    call(ctl, "set_fault", "steps", "die", ranks=[0])
    call(ctl, "set_fault", "steps", "unloadable", ranks=[2])
    ctl._send("train_step", chunks.steps_of(spec(ctl)), None)
    with replacements_never_start():
        ctl._recover(StepsFailed("snapshot", {0: "ActorDiedError: died"}, ""))
        (event,) = events_of(ctl)
        assert event["lost"] == ["slot 0"], event
        assert ctl.members.slots == (1, 2)
        step(ctl)  # and the run goes on with both
    first, second = [state["count"] for state in call(ctl, "state")]
    assert first == second


def test_a_call_whose_answer_cannot_be_read_fails_in_words_naming_the_worker(controller):
    ctl = controller
    call(ctl, "set_fault", "steps", "unloadable", ranks=[1])
    with pytest.raises(WorkerError, match=r"worker 1 failed in train_step\(\): RaySystemError"):
        step(ctl)


def test_survivors_held_past_the_silence_after_a_peer_died_are_not_lost(controller):
    """Worker 1 is dead when a step is sent; the others are held in it (a gate, a long step)
    for longer than the silence a member is allowed (twice the collective timeout), then fail
    at its sum. Only worker 1 is lost: the silence counts from a peer's failed collective,
    not from a death. Before, the silence ran from the death: both survivors were lost with
    it, and the run with them (an elastic scenario's gate did it on a slow machine)."""
    ctl = controller
    ctl.limits = Limits(3, min_workers=1)
    call(ctl, "set_fault", "steps", "late-broken", ranks=[0, 2])
    kill(ctl.members.handles[1])
    with replacements_never_start():
        step(ctl)
    assert ctl.members.slots == (0, 2)
    (event,) = events_of(ctl)
    assert event["lost"] == ["slot 1"] and "silent" not in event["why"], event
    assert [state["count"] for state in call(ctl, "state")] == [1, 1]


def test_a_survivor_silent_while_the_group_re_forms_is_removed_within_the_bound(controller):
    ctl = controller
    ctl.limits = Limits(3, min_workers=1, max_failures=-1)
    call(ctl, "set_fault", "leave", "hang", ranks=[2])  # SIGSTOPped, as it were
    kill(ctl.members.handles[0])
    with replacements_never_start():
        step(ctl)  # bounded: without the bound, pytest-timeout ends it
    assert ctl.members.slots == (1,)
    # one change, announced once: both slots, and why each went
    (event,) = events_of(ctl)
    assert event["lost"] == ["slot 0", "slot 2"]
    assert "ActorDiedError" in event["why"] and "silent" in event["why"]
    assert ctl.failures == 2  # the kill, then the silent survivor: two events


def test_a_recovery_that_ends_the_run_names_every_worker_it_lost(controller):
    """Worker 0 is lost, and then worker 2 as the group re-forms: one more failure than the
    run allows. The error names both, not only the last (a run told to stop by SIGTERM ends
    so, the error in its metrics)."""
    ctl = controller
    ctl.limits = Limits(3, min_workers=1, max_failures=1)
    call(ctl, "set_fault", "leave", "die", ranks=[2])
    kill(ctl.members.handles[0])
    with replacements_never_start(), pytest.raises(WorkerLostError) as failed:
        step(ctl)
    said = str(failed.value)
    assert "(cpu(0), pid" in said and "(cpu(2), pid" in said and "max_failures=1" in said, said
    assert "during re-form()" in said, said


def test_every_member_in_step_lost_as_a_replacement_joins_restarts_the_run_naming_them(
    controller,
):
    """Both members in step die as a replacement joins them: the replacement holds none of the
    run's state, so nobody survived and the run restarts from storage (fit's part), with an
    error naming both. Before, the replacement counted as a survivor: the group re-formed
    around it and found no state to set it up from, and said only that."""
    ctl = controller
    ctl.limits = Limits(3, min_workers=1, max_failures=-1)
    kill(ctl.members.handles[1])
    step(ctl)
    assert ctl.members.slots == (0, 2) and ctl.ready(60.0) == [1]
    call(ctl, "set_fault", "applied", "die")  # as the replacement is admitted
    ctl._next_poll = 0.0
    with replacements_never_start(), pytest.raises(EveryWorkerLost) as failed:
        step(ctl)
    said = str(failed.value)
    assert "(cpu(0), pid" in said and "(cpu(2), pid" in said and "(cpu(1)" not in said, said


@pytest.mark.parametrize("slot, dies_in", [(2, "applied"), (0, "snapshot")], ids=["any", "source"])
def test_a_survivor_lost_while_a_replacement_joins_is_lost_alone_and_the_replacement_set_up(
    controller, slot, dies_in
):
    """A survivor dies while a replacement is admitted: that survivor alone is lost, and the
    replacement is treated as a new worker (modules set up, state restored from the survivor
    left), not as a survivor in step. ``source``: the survivor dies handing its state to the
    replacement, whose restore then fails with the survivor's ActorDiedError. Before, that
    was taken for the replacement's own death: it was dropped and started again, one more
    failure was counted, and the survivor was found lost only at the next re-forming."""
    ctl = controller
    ctl.limits = Limits(3, min_workers=1, max_failures=-1)
    call(ctl, "set_count", 4)
    ctl.steps_sent = 4
    kill(ctl.members.handles[1])
    step(ctl)
    assert ctl.members.slots == (0, 2) and ctl.ready(60.0) == [1]
    failures = ctl.failures
    call(ctl, "set_fault", dies_in, "die", ranks=[(0, 2).index(slot)])
    ctl._next_poll = 0.0
    with replacements_never_start():
        step(ctl)
    assert ctl.members.slots == tuple(sorted({0, 1, 2} - {slot}))
    states = dict(zip(ctl.members.slots, call(ctl, "state")))
    assert [s["count"] for s in states.values()] == [6, 6]
    survivor = ({0, 2} - {slot}).pop()
    assert states[survivor]["restored"] == 0 and states[1]["restored"] > 0  # it took its state
    assert [c for c, _ in states[1]["calls"]][:2] == ["create", "bind"]  # it is new
    lost = events_of(ctl)[-1]
    assert lost["change"] == "lost" and lost["lost"] == [f"slot {slot}"], lost
    assert ctl.failures == failures + 1


def test_a_group_that_fails_to_form_anew_with_nobody_lost_fails_the_module_in_words(controller):
    """A replacement is admitted, and forming the group with it fails with a worker's own
    error (here a survivor's leave; a join or a set-up alike), nobody lost: the module fails,
    and says so, instead of going on half in the new generation (before: a WorkerError, the
    controller left GROWING with the old members, its next steps refused by every worker, and
    the re-formings that followed evicting healthy survivors)."""
    ctl = controller
    ctl.limits = Limits(3, min_workers=1, max_failures=-1)
    kill(ctl.members.handles[1])
    step(ctl)
    assert ctl.members.slots == (0, 2) and ctl.ready(60.0) == [1]
    call(ctl, "set_fault", "leave", "raise", ranks=[0])
    ctl._next_poll = 0.0  # admit now
    with pytest.raises(WorkerLostError, match="admitting slots .1.; the group could not be"):
        step(ctl)
    assert ctl.state is State.FAILED
    with pytest.raises(WorkerLostError, match="cannot continue"):  # any call after it
        call(ctl, "state")


@pytest.mark.parametrize("refusals", [1, 2], ids=["once", "again"])
@pytest.mark.parametrize("method", ["join", "bind"])
def test_a_replacement_that_fails_to_join_is_dropped_as_lost_and_started_once_more(
    controller, method, refusals
):
    """A replacement's own error as it joins the group (on a node it cannot reach the others
    from, say), or as it is set up (binding the module), drops that replacement as a lost
    worker, counted as a failure: the run goes on with the members it had, and another
    replacement starts, which joins once up. Before, the whole module failed ("the group
    could not be formed again"). If that one fails too, the module fails, in words: each try
    stalls the members (up to the collective timeout), and a node that refuses every
    replacement would do it for good."""
    ctl = controller
    ctl.limits = Limits(3, min_workers=1)
    kill(ctl.members.handles[1])
    step(ctl)
    for tried in range(refusals + 1):
        assert ctl.members.slots == (0, 2) and ctl.ready(60.0) == [1]
        refuses = tried < refusals
        if refuses:
            ray.get(ctl._group.pending[1].set_fault.remote(method, "raise"), timeout=60)
        ctl._next_poll = 0.0  # admit now
        if refuses and tried == 1:
            with pytest.raises(WorkerLostError, match="slots .1.; the group could not be formed"):
                step(ctl)
            assert ctl.state is State.FAILED
            return
        step(ctl)
        if refuses:
            dropped = events_of(ctl)[-1]
            assert ctl.state is State.RUNNING and dropped["change"] == "lost"
            assert dropped["lost"] == ["slot 1"] and dropped["failures"] == 2
            assert "ValueError: a bad batch" in dropped["why"]
    assert ctl.members.slots == (0, 1, 2) and events_of(ctl)[-1]["change"] == "grown"
    counts = [state["count"] for state in call(ctl, "state")]
    assert counts == [3, 3, 3], counts


def test_of_two_replacements_set_up_together_only_the_one_that_fails_is_dropped(controller):
    """Two replacements admitted at one step boundary; one fails as it is set up (binding the
    module): that one is dropped as lost, and the other joins the group."""
    ctl = controller
    ctl.limits = Limits(3, min_workers=1)
    ctl._next_poll = float("inf")  # none admitted until both are up
    kill(ctl.members.handles[1])
    kill(ctl.members.handles[2])
    step(ctl)
    assert ctl.members.slots == (0,)
    wait_until(lambda: ctl.ready(10.0) == [1, 2], 120, "the replacements to come up", 0)
    ray.get(ctl._group.pending[2].set_fault.remote("bind", "raise"), timeout=60)
    with replacements_never_start():  # slot 2's next one
        ctl._next_poll = 0.0  # admit now
        step(ctl)
    assert ctl.members.slots == (0, 1) and ctl.state is State.RUNNING
    dropped = events_of(ctl)[-1]
    assert dropped["change"] == "lost" and dropped["lost"] == ["slot 2"], dropped
    assert "ValueError: a bad batch" in dropped["why"]
    assert [state["count"] for state in call(ctl, "state")] == [2, 2]


def test_a_worker_lost_in_a_read_outside_the_step_loop_is_recovered_from(controller):
    """e.g. the parameters read at an epoch's end: the run goes on, the read is asked again."""
    ctl = controller
    ctl.limits = Limits(3, min_workers=1)
    call(ctl, "set_count", 9)
    ctl.steps_sent = 9
    kill(ctl.members.handles[0])
    with replacements_never_start():
        assert call(ctl, "get_params", MID, ranks=[0]) == [9]
    assert ctl.members.slots == (1, 2) and events_of(ctl)[-1]["lost"] == ["slot 0"]


def test_steps_in_flight_when_a_call_meets_a_loss_are_sent_again_before_any_later_one(controller):
    """A loss seen by a call between two chunks (a callback reading the parameters, a bucket
    bound mid-epoch) re-forms the group there: the chunk in flight is sent again at once, so
    the next chunk follows it and no step is applied twice (the later chunk was once sent
    first, and then again with the older one)."""
    ctl = controller
    ctl.limits = Limits(3, min_workers=1)
    ray.get(ctl.members.handles[0].set_fault.remote("steps", "die"))
    first = read(ctl, ctl.advance("train_step", dict(spec(ctl), serials=[1]), 1))
    with replacements_never_start():
        call(ctl, "get_params", MID, ranks=[0])  # the loss is seen here, and it is asked again
        assert ctl.members.slots == (1, 2)
        later = read(ctl, ctl.advance("train_step", dict(spec(ctl), serials=[2]), 1))
        last = read(ctl, ctl.advance("train_step", None, 0))
    finished = [serial for reply in (first, later, last) for serial, _, _ in reply["steps"]]
    assert finished == [1, 2]
    assert [state["count"] for state in call(ctl, "state")] == [2, 2]
    assert ctl.steps_sent == 2


def test_a_call_posted_while_steps_are_in_flight_follows_them_though_a_loss_resends_them(
    controller,
):
    """A callback's set_params after the steps sent before it: without a loss the workers set
    the parameters after those steps; with one, too, once they are sent again (the survivors
    once set them first, and the voided step then ran on top of the user's parameters)."""
    ctl = controller
    ctl.limits = Limits(3, min_workers=1)
    ray.get(ctl.members.handles[0].set_fault.remote("steps", "die"))
    for survivor in ctl.members.handles[1:]:  # its group broke: the step is not applied
        ray.get(survivor.set_fault.remote("steps", "broken"))
    with replacements_never_start():
        first = read(ctl, ctl.advance("train_step", dict(spec(ctl), serials=[1]), 1))
        ctl.post("set_params", (MID,))
        last = read(ctl, ctl.advance("train_step", None, 0))
    assert ctl.members.slots == (1, 2)
    assert [serial for reply in (first, last) for serial, _, _ in reply["steps"]] == [1]
    states = call(ctl, "state")
    assert [s["params_at"] for s in states] == [[0, 1], [0, 1]]  # the fixture's, then this one
    assert [s["count"] for s in states] == [1, 1]


def test_a_workers_error_in_a_step_is_raised_once_not_again_by_the_next_call(controller):
    """Not a loss: the error is the caller's (the worker named); the next steps run (these
    workers have no group for a failed training step to break)."""
    ctl = controller
    ray.get(ctl.members.handles[1].set_fault.remote("steps", "raise"))
    with pytest.raises(Exception, match="worker 1 failed in train_step.*a bad batch"):
        step(ctl)
    assert [serial for serial, _, _ in step(ctl)] == [0]
    assert ctl.members.slots == (0, 1, 2)


def test_a_workers_error_in_steps_a_post_finished_is_raised_to_the_loop_that_sent_them(
    controller,
):
    ctl = controller
    ctl.set_metric(None, "fit")
    ray.get(ctl.members.handles[2].set_fault.remote("steps", "raise"))
    read(ctl, ctl.advance("train_step", spec(ctl), 1, "fit"))
    ctl.post("set_params", (MID,))  # finishes the step first: its error is fit's
    with pytest.raises(Exception, match="worker 2 failed in train_step.*a bad batch"):
        ctl.advance("train_step", None, 0, "fit")
    assert read(ctl, ctl.advance("train_step", spec(ctl), 0, "fit"))["steps"][0][0] == 0


def test_a_workers_error_in_steps_another_loop_read_is_raised_to_the_loop_that_sent_them(
    controller,
):
    """A callback's score reads fit's step in flight before its own: a worker's error in
    fit's step is fit's, raised at fit's next call; the callback gets its own step (it once
    got fit's error, and fit never learnt that its step failed)."""
    ctl = controller
    ctl.set_metric(None, "fit")
    ctl.set_metric(None, "callback")
    ray.get(ctl.members.handles[2].set_fault.remote("steps", "raise"))
    read(ctl, ctl.advance("train_step", spec(ctl), 1, "fit"))
    scored = read(ctl, ctl.advance("eval_step", spec(ctl), 0, "callback"))["steps"]
    assert [serial for serial, _, _ in scored] == [0]
    with pytest.raises(Exception, match="worker 2 failed in train_step.*a bad batch"):
        ctl.advance("train_step", None, 0, "fit")


def test_a_workers_own_error_in_a_training_step_re_forms_the_group_and_ends_its_loop_there(
    controller,
):
    """Worker 2's training step raises (its data): it leaves the group, whose other members
    fail at that step's sum, and every later step fails on the broken group, as real workers'
    do. fit gets the error, and none of its steps behind it is applied (native MXNet's fit
    stops at the error); a callback's step in flight behind it is sent again; the group
    re-forms at once with all three members at the step they applied, as no failure, and
    training goes on. It once stayed broken: the next step ended the module (outside an
    elastic run), or was recovered from and fit's steps behind the error applied."""
    ctl = controller
    ctl.set_metric(None, "fit")
    ctl.set_metric(None, "callback")
    read(ctl, ctl.advance("train_step", spec(ctl), 0, "fit"))
    call(ctl, "set_fault", "steps", "raise-left", ranks=[2])
    call(ctl, "set_fault", "steps", "broken-left", ranks=[0, 1])
    generation = ctl.members.generation
    read(ctl, ctl.advance("train_step", spec(ctl), 2, "fit"))  # the step that raises
    read(ctl, ctl.advance("train_step", spec(ctl), 2, "fit"))  # one behind it
    scored = read(ctl, ctl.advance("eval_step", spec(ctl), 0, "callback"))["steps"]
    assert [serial for serial, _, _ in scored] == [0]
    with pytest.raises(Exception, match="worker 2 failed in train_step.*a bad batch"):
        ctl.advance("train_step", None, 0, "fit")
    assert (ctl.members.generation, ctl.members.slots) == (generation + 1, (0, 1, 2))
    assert (ctl.steps_sent, ctl.failures, ctl.state) == (1, 0, State.RUNNING)
    assert [state["count"] for state in call(ctl, "state")] == [1, 1, 1]
    changes = [e for e in events_of(ctl) if e["event"] == "membership"]
    assert [(e["change"], e["step"], e["world_size"]) for e in changes] == [("re-formed", 1, 3)]
    assert "a worker's error in a training step" in changes[0]["why"]
    assert read(ctl, ctl.advance("train_step", spec(ctl), 0, "fit"))["steps"][0][0] == 0
    assert [state["count"] for state in call(ctl, "state")] == [2, 2, 2]


def test_a_loss_that_ends_the_run_as_it_re_forms_after_a_workers_error_is_said_once(controller):
    """Worker 2's training step raises; as the group re-forms for it, worker 1 dies (at its
    join) and max_failures=0 ends the run. The error says the step's error, then the loss and
    the limit, once; it once nested them in "the group could not be formed again (...). The
    module cannot continue", said twice."""
    ctl = controller
    ctl.limits = Limits(3, min_workers=1, max_failures=0)
    ctl.set_metric(None, "fit")
    call(ctl, "set_fault", "steps", "raise-left", ranks=[2])
    call(ctl, "set_fault", "steps", "broken-left", ranks=[0])
    call(ctl, "set_fault", "join", "die", ranks=[1])
    read(ctl, ctl.advance("train_step", spec(ctl), 1, "fit"))
    with pytest.raises(WorkerLostError) as failed:
        ctl.advance("train_step", None, 0, "fit")
    said = str(failed.value)
    assert said.startswith("a worker's error in a training step (")
    assert "a bad batch" in said and "max_failures" in said, said
    assert "; then worker 1 " in said and "could not be formed" not in said, said
    assert ctl.state is State.FAILED


def test_a_call_posted_for_an_earlier_generation_is_refused_by_the_next_sync_once(controller):
    """Nobody reads a posted call's reply: its refusal (per-worker arguments made for a group
    that re-formed since) is raised by the next sync, once. It was lost, the call not made and
    nothing said (a forward after the group re-formed under the client)."""
    ctl = controller
    generation = ctl.members.generation
    ctl.post("set_params", (MID,), [()] * 3, None, generation - 1)
    with pytest.raises(WorkerLostError, match=r"set_params\(\): the workers' membership changed"):
        ctl.sync()
    ctl.post("set_params", (MID,), [()] * 3, None, generation)  # the one it is: made
    ctl.sync()


def test_steps_in_flight_that_cannot_be_sent_again_after_a_loss_end_the_run_in_words(
    controller, monkeypatch
):
    """The group re-forms after a loss, but the steps in flight cannot be sent to it again
    (the object store full, say): the run cannot go on, and every later call says why. The
    error once surfaced as the cause alone, the run left with steps its loops wait for."""
    ctl = controller
    ctl.limits = Limits(3, min_workers=1)
    ctl.set_metric(None, "fit")
    call(ctl, "set_fault", "steps", "broken", ranks=[0, 2])  # none applies the step
    call(ctl, "set_fault", "steps", "hang", ranks=[1])
    read(ctl, ctl.advance("train_step", spec(ctl), 1, "fit"))
    kill(ctl.members.handles[1])  # in the step: it is sent again

    def no_room(*_):
        raise ray.exceptions.ObjectStoreFullError("no room in the object store")

    monkeypatch.setattr(ctl, "_send", no_room)  # the fault: the resend's, not under test
    with replacements_never_start():
        for call_again in (lambda: ctl.advance("train_step", None, 0, "fit"), ctl.sync):
            with pytest.raises(WorkerLostError, match="could not be sent again.*no room"):
                call_again()
    assert ctl.members.slots == (0, 2)  # re-formed first


def streamed() -> dict:
    """A chunk of the first step of a pass of a Ray Dataset (10 steps)."""
    stream = {
        "dataset": ray.data.range(60), "key": "train", "pass": 0, "batches": 10,
        "data_names": ["data"], "label_names": [], "positions": [0],
    }  # fmt: skip
    return {"serials": [0], "mids": [MID], "sizes": [6], "labels": [False], "stream": stream}


def test_a_loss_while_a_callbacks_loop_runs_in_a_ray_datasets_pass_restarts_the_run(controller):
    """fit's pass of a Ray Dataset stays open while a callback's score sends other steps: a
    loss then restarts the run, as anywhere in the pass (the streams cannot be re-split). The
    callback's steps once closed the pass, and the group re-formed mid-pass instead."""
    ctl = controller
    ctl.limits = Limits(3, min_workers=1)
    ctl.set_metric(None, "fit")
    ctl.set_metric(None, "callback")
    read(ctl, ctl.advance("train_step", streamed(), 1, "fit"))
    kill(ctl.members.handles[1])
    with replacements_never_start(), pytest.raises(EveryWorkerLost, match="cannot be re-split"):
        ctl.advance("eval_step", spec(ctl), 0, "callback")


def test_a_post_that_meets_a_loss_the_run_cannot_go_on_from_returns_and_the_loop_learns_why(
    controller,
):
    """A callback's set_params finishes the steps in flight first; a loss among them that
    ends the run (mid-pass: it restarts from storage) ends the post too (it once read the
    same failed step again, forever), and fit's next call raises it."""
    ctl = controller
    ctl.limits = Limits(3, min_workers=1)
    ctl.set_metric(None, "fit")
    read(ctl, ctl.advance("train_step", streamed(), 1, "fit"))
    kill(ctl.members.handles[1])
    with replacements_never_start():
        post = threading.Thread(target=ctl.post, args=("set_params", (MID,)), daemon=True)
        post.start()
        post.join(timeout=120)  # returns within seconds; spun forever before
        assert not post.is_alive()
    for call_again in (lambda: ctl.advance("train_step", None, 0, "fit"), ctl.sync):
        with pytest.raises(EveryWorkerLost, match="cannot be re-split"):
            call_again()


def test_a_group_that_keeps_breaking_with_nobody_lost_evicts_its_slowest_member(controller):
    """No livelock: a member late by more than the collective timeout makes every rank report
    a broken group and none lost; after RAYMODULE_MAX_REFORMS re-formings its slowest goes."""
    ctl = controller
    ctl.limits = Limits(3, min_workers=1, max_reforms=2)
    for _ in range(2):
        ctl._recover(StepsFailed("steps", {}, "GroupBrokenError: timed out", slowest=2))
        assert ctl.members.slots == (0, 1, 2) and ctl.failures == 0
    with replacements_never_start():
        ctl._recover(StepsFailed("steps", {}, "GroupBrokenError: timed out", slowest=2))
    assert ctl.members.slots == (0, 1) and ctl.failures == 1
    events = events_of(ctl)
    assert [e["change"] for e in events] == ["re-formed", "re-formed", "lost"]
    assert "evicted" in events[-1]["why"] and "RAYMODULE_MAX_REFORMS=2" in events[-1]["why"]


def test_a_successful_step_ends_a_run_of_re_formings(controller):
    ctl = controller
    ctl.limits = Limits(3, min_workers=1, max_reforms=1)
    ctl._recover(StepsFailed("steps", {}, "GroupBrokenError: timed out", slowest=2))
    step(ctl)
    ctl._recover(StepsFailed("steps", {}, "GroupBrokenError: timed out", slowest=2))
    assert ctl.members.slots == (0, 1, 2) and ctl.broken_in_a_row == 1
