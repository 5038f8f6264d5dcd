"""The client's handle on a module family's controller (and, through it, its workers).

Every call goes to the controller (:mod:`raymodule.controller`), which calls the workers, with
the MXNet objects among its arguments sealed (:mod:`raymodule.sealed`); each
reply carries the controller's view of the membership, kept here for the facades (the work
split, where arrays live) and for the run's record of membership changes. A call the client
does not read (:meth:`ControllerHandle.post`) fails at the next one that it reads, as MXNet's
asynchronous engine reports an error at the next read.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import secrets
import time
import weakref

import mxnet as mx
import ray
from ray._raylet import PlacementGroupID
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

from . import runtime
from .constants import Settings
from .context import local_device, resources_of
from .controller import policy
from .controller.actor import RemoteController
from .controller.failures import EveryWorkerLost
from .controller.membership import Membership
from .controller.plans import STOP_POLL_S, StopFlag
from .controller.waits import ACTOR_LOST, forming_s, in_words, longest_call_s
from .data import batch_size_of
from .errors import WorkerLostError, first_line
from .sealed import seal, seal_objects

__all__ = ["ControllerHandle"]

log = logging.getLogger(__name__)

_MAX_UNCHECKED = 64  # posts between two reads: the controller checks them then


def _shutdown(controller, family: str) -> None:
    """Stops a family's workers and controller, and removes the placement groups it made.
    Ray does not remove an actor's placement groups when the actor dies, and a controller lost
    before it answered never said which it made: they are found by the family's name, after
    the controller is killed (it makes no more). Safe at exit."""
    if not ray.is_initialized():
        return
    with contextlib.suppress(Exception):  # the controller may be gone already
        ray.get(controller.shutdown.remote(), timeout=30)
    with contextlib.suppress(Exception):
        ray.kill(controller, no_restart=True)
    with contextlib.suppress(Exception):  # Ray going down at exit: nothing to release then
        for pg in _placement_groups(family):
            with contextlib.suppress(Exception):  # removed meanwhile
                remove_placement_group(pg)


def _placement_groups(family: str) -> list[PlacementGroup]:
    """The placement groups named after ``family`` that are not removed yet."""
    return [
        PlacementGroup(PlacementGroupID.from_hex(pg_id))
        for pg_id, info in placement_group_table().items()
        if info["name"].startswith(f"{family}-") and info["state"] != "REMOVED"
    ]


class ControllerHandle:
    """A module family's controller, started beside this process; released when closed or
    when no module uses it any more.

    ``handles`` are the live workers in rank order and ``slots`` the contexts they hold; both
    change when an elastic run loses or regains workers.
    """

    def __init__(self, contexts: list[mx.Context], worker_class=None, start_with=None):
        """``start_with``: start once this many workers are up, if not all fit (None: all);
        ``worker_class``: the worker actors' class (tests use a light stand-in)."""
        runtime.ensure_ray()
        gc.collect()  # modules that were dropped release their workers before we ask for more
        self.contexts = contexts
        self.settings = Settings.from_env()
        # names what the controller makes (its placement groups), so that closing finds them
        self.family = f"raymodule-{secrets.token_hex(6)}"
        self.controller = self._new_controller(worker_class)
        self.membership = Membership()  # the controller's, as its last reply gave it
        self.steps_sent = 0  # training steps sent to the workers (the controller counts them)
        self.failures = 0  # failure events of the elastic run
        self.leaving: list[int] = []  # slots shut down (SIGTERM), leaving at the next boundary
        self.departures = 0  # members that left gracefully (SIGTERM, a drained node), counted
        self.steps_per_call = 1  # batches the next chunk should carry (the controller says)
        self.work_load: list[float] | None = None  # work_load_list="auto": the weights, by slot
        self.limits = policy.Limits(len(contexts), elastic=False)
        self.on_membership = None  # set by an elastic run: called with each change, as a dict
        self.lost: WorkerLostError | None = None
        self.params_dirty = False  # the workers' parameters are newer than the client's copy
        self._steps_seen = 0  # the most steps_sent a reply said: more are newer parameters
        self._params_at_end = None  # (module, steps, plan): what a plan's last reply brought
        self._changes = 0  # calls that may have changed the workers' parameters without a step
        self._posted = 0  # posts since the last call read
        self._sigterm = None  # set by an elastic run: whether this process received SIGTERM
        self._preemption: StopFlag | None = None  # the run's flag, asked once SIGTERM came
        self._training_plan: StopFlag | None = None  # the flag of fit's plan under way
        self._finalizer = weakref.finalize(self, _shutdown, self.controller, self.family)
        settings = self.settings
        bound = settings.start_wait_s + settings.placement_timeout_s + forming_s(settings)
        try:
            self._control("start", start_with, waits_s=bound)
        except WorkerLostError as err:
            self.close()
            raise WorkerLostError(
                f"starting {len(contexts)} workers for {contexts} failed: {err}"
            ) from None
        except BaseException as err:  # its own error, or an interrupt (Ctrl-C while it waits)
            if not isinstance(err, Exception):  # killed first: a shutdown call would wait
                with contextlib.suppress(Exception):  # behind start, up to 30 s
                    ray.kill(self.controller, no_restart=True)
            self.close()
            raise
        if self.membership.pending:
            log.warning(
                "raymodule: started with %d of %d workers; the workers of slots %s are waiting "
                "for resources and join an elastic fit as they come up",
                self.world_size,
                len(contexts),
                list(self.membership.pending),
            )

    def _new_controller(self, worker_class):
        """The family's controller, answering. One lost as it comes up (its process died
        before its first answer: nothing of the family exists yet) is replaced once, with a
        warning; a second loss, or no answer within RAYMODULE_CONTROL_TIMEOUT_S, is a
        :class:`WorkerLostError`."""
        contexts = self.contexts
        backend = "nccl" if any(c.device_type == "gpu" for c in contexts) else "gloo"
        bound = self.settings.control_timeout_s
        for attempt in (1, 2):
            controller = RemoteController.options(scheduling_strategy=_beside_client()).remote(
                [resources_of(c) for c in contexts],
                [local_device(c) for c in contexts],
                [str(c) for c in contexts],
                runtime.started_locally(),
                backend,
                self.settings,
                *([worker_class] if worker_class is not None else []),
                family=self.family,
            )
            try:
                ray.get(controller.__ray_ready__.remote(), timeout=bound)
                return controller
            except (*ACTOR_LOST, ray.exceptions.GetTimeoutError) as err:
                with contextlib.suppress(Exception):  # gone already, or never answered
                    ray.kill(controller, no_restart=True)
                why = _unanswered(err, bound)
                if attempt == 2 or isinstance(err, ray.exceptions.GetTimeoutError):
                    raise WorkerLostError(
                        f"starting {len(contexts)} workers for {contexts} failed: the "
                        f"controller was lost as it came up: {why}"
                    ) from None
                log.warning(
                    "raymodule: the controller was lost as it came up (%s); starting another",
                    why,
                )

    def close(self) -> None:
        self._finalizer()
        self.membership = Membership()

    # what the facades and tests read of the membership
    handles = property(lambda self: self.membership.handles)
    slots = property(lambda self: self.membership.slots)
    nodes = property(lambda self: self.membership.nodes)
    generation = property(lambda self: self.membership.generation)
    world_size = property(lambda self: self.membership.world_size)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    # -- calls -------------------------------------------------------------------------------
    def post(self, method: str, *args, per_worker=None, ranks=None) -> None:
        """Calls ``method(*args, *per_worker[rank])`` on every worker (or ``ranks``); its
        error surfaces at the next call read."""
        self._usable()
        self._may_change_params()  # set_params, a restore, ...
        args, per_worker = seal_objects(args), seal_objects(per_worker)
        self.controller.post.remote(method, args, per_worker, ranks, self.generation)
        self._posted += 1
        if self._posted > _MAX_UNCHECKED:
            self.sync()

    def call(self, method: str, *args, per_worker=None, ranks=None) -> list:
        """Calls ``method`` on the workers and returns their results, in rank order."""
        self._may_change_params()
        args, per_worker = seal_objects(args), seal_objects(per_worker)
        return self._read("call", method, args, per_worker, ranks, self.generation)

    def sync(self) -> None:
        """Waits for every posted call and raises the first error among them."""
        self._read("sync")

    def create(self, mid: int, args: tuple, per_slot: list) -> None:
        self._usable()
        self._may_change_params()
        self.controller.create.remote(mid, seal_objects(args), seal_objects(per_slot))

    def bind(
        self, mid: int, args: tuple, shapes: tuple, work_load: list, balance: bool = False
    ) -> dict:
        """Binds a module's replicas to the global ``(data_shapes, label_shapes)``."""
        self._may_change_params()
        size = batch_size_of(shapes[0])
        return self._read("bind", mid, seal_objects(args), seal(shapes), size, work_load, balance)

    def reshape(self, mid: int, shapes: tuple) -> None:
        self._usable()
        self._may_change_params()
        self.controller.reshape.remote(mid, seal(shapes), batch_size_of(shapes[0]))

    def set_metric(self, metric, loop: str | None = None) -> None:
        """The metric the steps of step loop ``loop`` update (:meth:`Controller.set_metric`)."""
        self._usable()
        self.controller.set_metric.remote(seal_objects(metric), loop)

    def end_loop(self, loop: str) -> None:
        """Step loop ``loop`` ended (:meth:`Controller.end_loop`); nothing if the module is
        closed or lost."""
        if self.live:
            self.controller.end_loop.remote(loop)

    def advance(self, kind: str, spec: dict | None, keep: int, loop: str | None = None) -> dict:
        """Sends a chunk of steps of step loop ``loop`` and reads its finished ones
        (:meth:`Controller.advance`)."""
        return self._read("advance", kind, spec, keep, loop)

    def run(self, kind: str, plan: dict, training: bool = False) -> PlanProgress:
        """Starts a plan of a dataset's steps on the controller (:meth:`Controller.run`);
        its progress is read from the returned stream. A ``training`` plan (fit's) is asked
        to stop at its next chunk boundary once this process received SIGTERM during an
        elastic run (:meth:`configure`), whatever call the client waits for then."""
        self._usable()
        self._posted = 0
        flag = StopFlag()
        stream = self.controller.run.remote(kind, dict(plan, stop_key=flag.key))
        progress = PlanProgress(self, stream, flag, plan.get("params_at_end"), self._changes)
        if training:
            self._training_plan = flag
        return progress

    def params(self, mid: int) -> tuple[dict, dict]:
        """Worker 0's parameters and auxiliary states of module ``mid`` (numpy arrays by
        name): those the last plan brought at its end when no step and no call that may
        change them was sent since (and its worker 0 answered within
        RAYMODULE_CONTROL_TIMEOUT_S), else asked for now."""
        self._usable()
        held, self._params_at_end = self._params_at_end, None
        if held is not None and held[:2] == (mid, self.steps_sent):
            with contextlib.suppress(ray.exceptions.RayError):  # lost: asked of the group now
                params = self.hand_over(held[2], "params", self.steps_sent)
                bound = self.settings.control_timeout_s
                value = None if params is None else ray.get(params, timeout=bound)
                if value is not None:
                    return value
        return self._read("call", "get_params", (mid,), None, [0], self.generation)[0]

    def hand_over(self, plan: str, what: str, steps: int) -> ray.ObjectRef | None:
        """The reference plan ``plan`` (its stop key) made for the client after ``steps``
        (:meth:`Controller.hand_over`), or None."""
        ref = self.controller.hand_over.remote(plan, what, steps)
        (value,) = self._answer("hand_over", lambda bound: ray.get(ref, timeout=bound), 0.0)
        return value

    def _brought(self, mid: int, steps: int, plan: str, changes: int) -> None:
        """A plan's last reply says worker 0's parameters of ``mid`` after ``steps`` were
        asked for: taken by :meth:`params` unless a call that may change them was made since
        the plan began (a callback's set_params: it reached the workers after the plan's
        steps)."""
        self._params_at_end = (mid, steps, plan) if changes == self._changes else None

    def _may_change_params(self) -> None:
        """A call that may change the workers' parameters without a step is being sent."""
        self._changes += 1
        self._params_at_end = None

    def snapshot(self, mid: int, steps: int) -> ray.ObjectRef:
        """Worker 0's copy of a module's state after ``steps`` training steps (a reference)."""
        return self._read("snapshot", mid, steps)

    def configure(self, limits: policy.Limits, failures: int, sigterm=None) -> None:
        """Sets the run's limits and the failures it had before (a restarted run's).
        ``sigterm()``: whether this process received SIGTERM (a preemption notice); asked
        every STOP_POLL_S while the client waits for the controller until :meth:`end_run`.
        Once true, the run's flag is asked (:class:`.controller.plans.StopFlag`): it ends the
        controller's wait for replacements below the floor, in whatever call (fit's steps, a
        callback's ``get_params``), and fit's plan under way stops at its next chunk
        boundary, so that the run checkpoints and stops within the preemption's grace."""
        self.limits = limits
        self._end_watch()
        if sigterm is not None:
            self._sigterm, self._preemption = sigterm, StopFlag()
        key = None if self._preemption is None else self._preemption.key
        try:
            self._read("configure", limits, failures, key)
        except BaseException:  # no run follows to end it: its flag is not left behind
            self._end_watch()
            raise

    def end_run(self) -> None:
        """A run ended (``fit`` returned or failed): a lost worker fails again, parameters
        a plan brought and nobody read are let go, and SIGTERM is no longer watched for."""
        self._params_at_end = None
        self.on_membership = None
        self._end_watch()
        self.limits = policy.Limits(len(self.contexts), elastic=False)
        if self.live:
            self.controller.set_limits.remote(self.limits, self.failures)

    def _end_watch(self) -> None:
        if self._preemption is not None:
            self._preemption.clear()
        # a plan's flag stays until its plan ended (the controller removes it then)
        self._sigterm = self._preemption = self._training_plan = None

    def _asks(self):
        """What a wait for the controller asks every STOP_POLL_S (:func:`_await`): during an
        elastic run, :meth:`_asks_to_stop`; else nothing."""
        return None if self._sigterm is None else self._asks_to_stop

    def _asks_to_stop(self) -> bool:
        """Whether SIGTERM came during the run; once it did, asks the run's flag and fit's
        plan under way to stop as preempted (see :meth:`configure`)."""
        if not self._sigterm():
            return False
        self._preemption.ask(preempted=True)
        if self._training_plan is not None:
            self._training_plan.ask(preempted=True)
        return True

    # -- the controller ----------------------------------------------------------------------
    @property
    def live(self) -> bool:
        """Whether the controller may still be called: not lost, not closed
        (:meth:`_usable` raises why not)."""
        return self.lost is None and not self.closed

    def _usable(self) -> None:
        if self.lost is not None:
            raise self.lost
        if self.closed:
            raise WorkerLostError("this module was closed; its workers are gone")

    def _read(self, method: str, *args):
        self._usable()
        self._posted = 0
        waits = longest_call_s(self.settings, len(self.contexts))
        return self._control(method, *args, waits_s=waits)

    def _control(self, method: str, *args, waits_s: float):
        """Calls the controller and applies the view it returns: bounded by what the call
        may wait (``waits_s``) plus RAYMODULE_CONTROL_TIMEOUT_S; during an elastic run,
        whether SIGTERM came is asked meanwhile (:meth:`configure`). A lost controller loses
        the run's workers too (they share its fate), so an elastic run goes on from its latest
        checkpoint, as one more failure; a controller that does not answer is treated the
        same way."""
        ref = getattr(self.controller, method).remote(*args)
        asks = self._asks()

        def get(bound: float):
            if asks is not None:
                _await(ref, bound, asks, f"no answer to {method}")
            return ray.get(ref, timeout=bound)

        value, view = self._answer(method, get, waits_s)
        self._apply(view)
        return value

    def _answer(self, method: str, get, waits_s: float):
        """``get(bound)``: the controller's answer to ``method``, read within ``bound``
        seconds; a failure it reports is raised in words, and a lost or silent controller
        as :meth:`_control` says."""
        bound = self.settings.control_timeout_s + waits_s
        try:
            return get(bound)
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if getattr(cause, "fatal", False):
                self.lost = cause
            view = getattr(cause, "view", None)  # the membership may have changed on the way
            if view is not None:
                del cause.view  # the client's, not the caller's
                with contextlib.suppress(Exception):  # the error is what the caller gets
                    self._apply(view)
            raise in_words(err, f"{method} on the workers failed") from None
        except (*ACTOR_LOST, ray.exceptions.GetTimeoutError) as err:
            why = _unanswered(err, bound)
            lost = max(1, self.world_size)
            decision = policy.on_loss(self.limits, policy.Loss(0, lost, self.failures, 0))
            self.failures += 1
            restart = decision.action is policy.Action.RESTART
            self.lost = (EveryWorkerLost if restart else WorkerLostError)(
                f"the controller and its {self.world_size} workers were lost: {why}"
                + (f"; {decision.reason}" if decision.reason else "")
            )
            raise self.lost from None

    def _apply(self, view: dict) -> None:
        membership = view["membership"]
        if membership is not None:  # changed
            self.membership = membership
            self._steps_seen = -1  # steps a lost worker voided are counted again
        if view["steps_sent"] > self._steps_seen:  # trained since: newer than the client's
            self.params_dirty = True  # (a plan's replies read after a call's may say fewer)
            self._steps_seen = view["steps_sent"]
        self.steps_sent = view["steps_sent"]
        self.steps_per_call = view["steps_per_call"]
        self.failures = view["failures"]
        self.leaving = view["leaving"]
        self.work_load = view["work_load"]
        for event in view["events"]:
            if event["event"] == "work_load":
                log.info(
                    "raymodule: work split re-weighted at step %d: weights %s (compute seconds "
                    "per sample %s)",
                    event["step"],
                    event["weights"],
                    event["seconds_per_sample"],
                )
                if self.on_membership is not None:
                    self.on_membership(event)
                continue
            log.warning(
                "raymodule: %s; world size %d -> %d (generation %d), recovered in %.2f s%s",
                event["why"],
                event["previous_world_size"],
                event["world_size"],
                event["generation"],
                event["recovery_s"],
                f"; replacements pending for slots {event['pending']}" if event["pending"] else "",
            )
            if event["change"] in ("left", "drained"):
                self.departures += len(event["left"])
            if self.on_membership is not None:
                self.on_membership(event)


class PlanProgress:
    """The progress of a plan the controller runs (:meth:`ControllerHandle.run`): its
    replies, in order, each read within the longest a controller call may take."""

    def __init__(
        self,
        handle: ControllerHandle,
        stream: ray.ObjectRefGenerator,
        flag: StopFlag,
        params_of: int | None,
        changes: int,
    ):
        self._handle, self._stream, self._flag = handle, stream, flag
        # the module whose parameters the last reply brings; the handle's changes at the start
        self._params_of, self._changes = params_of, changes
        # its last reply was read, or it failed, or the controller was lost (not: a hand_over
        # of the controller's failed, or the reading was interrupted)
        self.ended = False

    def __iter__(self) -> PlanProgress:
        return self

    def __next__(self) -> dict:
        handle = self._handle
        waits = longest_call_s(handle.settings, len(handle.contexts))
        try:
            progress, view = handle._answer("run", self._next, waits)
        except Exception:  # its end (StopIteration), the plan failed, the controller lost
            self._end()
            raise
        if progress.get("checkpoint") is not None:  # taken beside the plan, as it runs
            batch, steps = progress["checkpoint"]
            try:
                snapshot = handle.hand_over(self._flag.key, "snapshot", steps)
            except Exception:  # the plan runs on, unless the controller was lost
                if handle.lost is not None:
                    self._end()
                raise
            progress["checkpoint"] = (batch, steps, snapshot)
        if "stopped_at" in progress:  # the last
            steps = progress.pop("params", None)
            if steps is not None and not self._flag.asked:
                handle._brought(self._params_of, steps, self._flag.key, self._changes)
            self._end()
        handle._apply(view)
        return progress

    def _end(self) -> None:
        self.ended = True
        self._flag.clear()
        if self._handle._training_plan is self._flag:
            self._handle._training_plan = None

    def _next(self, bound: float):
        asks = None if self.ended else self._handle._asks()
        _await(self._stream, bound, asks, "no progress of the plan")
        return ray.get(next(self._stream), timeout=bound)

    def stop(self) -> None:
        """Asks the controller to stop the plan at its next chunk boundary: the replies go on
        to the last, whose ``stopped_at`` says where it stopped (the steps in flight are
        finished). A plan that ended has nothing to stop: no flag is left behind for it. (A
        SIGTERM asks fit's plan as the client waits: :meth:`ControllerHandle.configure`.)"""
        if not self.ended:
            self._flag.ask()


def _await(ref, bound: float, asks, what: str) -> None:
    """Waits up to ``bound`` seconds for ``ref`` (an object, or a stream's next reply) to be
    ready, else raises ``GetTimeoutError`` (``what`` says what did not come). ``asks()``, when
    given, is called first and then every STOP_POLL_S, until it returns true: it asks the
    controller to stop (SIGTERM came; :meth:`ControllerHandle.configure`), which it sees even
    while it waits for replacements."""
    deadline = time.monotonic() + bound
    while True:
        if asks is not None and asks():
            asks = None
        left = max(0.0, deadline - time.monotonic())
        ready, _ = ray.wait([ref], timeout=left if asks is None else min(left, STOP_POLL_S))
        if ready:
            return
        if time.monotonic() >= deadline:
            raise ray.exceptions.GetTimeoutError(f"{what} in {bound:g} s")


def _unanswered(err: Exception, bound: float) -> str:
    """Why the controller gave no answer, in words: lost (:data:`.waits.ACTOR_LOST`, its
    type and first line), or silent for ``bound`` seconds (a ``GetTimeoutError``)."""
    if isinstance(err, ray.exceptions.GetTimeoutError):
        return f"no answer within {bound:g} s (RAYMODULE_CONTROL_TIMEOUT_S)"
    return f"{type(err).__name__}: {first_line(err)}"


def _beside_client():
    """Where the controller goes: on this process's node, which training cannot outlive
    anyway (in a Tune trial: the trial's first bundle, the trainable's own)."""
    pg = get_current_placement_group()
    if pg is not None:
        return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
