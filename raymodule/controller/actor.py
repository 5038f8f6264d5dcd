"""The controller actor (the design's driver actor): one per module family, beside the client.

It owns the family's run on the workers: their membership (placing them, their slots, the
group's generation), the step counter, the work split, the steps in flight and recovery. The
client (:class:`raymodule.handle.ControllerHandle`) calls the controller only; the controller
calls the workers, one Ray call per worker, and returns each reply with its :meth:`view` of
the membership. A training loop hands it a plan of a dataset's steps (:meth:`Controller.run`:
the controller sizes the chunks and places the checkpoints, and the loop reads the progress
as a stream) or chunks of a client iterator's steps (:meth:`Controller.advance`), and reads
back the finished ones, in order; a worker lost meanwhile is recovered from in the
controller, and the steps it voided are sent again to the re-formed group.

This module holds the client's calls, the calls to the workers and the steps in flight;
:mod:`.changes` the changes of membership (leaving, growing, re-weighting the work split,
re-forming after a worker's error, recovering from lost workers), :mod:`.states` the states
it moves through, each change logged once. The decisions are :mod:`.policy`'s; the
controller acts on them.

The controller never imports MXNet: that took seconds of CPU, on the cores its workers start
on. It reads plain arguments only (module ids, sizes, weights, object references); the
MXNet objects it relays and journals (a symbol, shapes, a metric, an optimizer, a dataset)
arrive sealed (:mod:`raymodule.sealed`) and stay so in its process.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque

import ray

from ..constants import Settings
from ..errors import WorkerLostError
from ..sealed import keep_sealed
from ..worker import ModuleWorker  # light: MXNet is imported in the worker process only
from . import chunks, policy
from .balance import Balancer
from .changes import MembershipChanges
from .failures import StepsFailed
from .group import WorkerGroup
from .loops import StepLoops
from .membership import Membership
from .plans import Handed, forget, preempted, stop_asked
from .replicas import Replica, record_call
from .states import State
from .streams import DatasetSplits
from .waits import await_calls, classify_outcomes, in_words

__all__ = ["ACTOR_OPTIONS", "Controller", "RemoteController", "State"]

log = logging.getLogger(__name__)

# calls that read what every replica holds alike: asked again of the new group after a loss
_REPEATABLE = frozenset({"get_params", "optimizer_states"})


class Controller(MembershipChanges):
    """The run of one module family on its workers (see the module's docstring)."""

    def __init__(
        self,
        bundles: list[dict],
        devices: list,
        names: list[str],
        fail_fast: bool,
        backend: str,
        settings: Settings,
        worker_class=ModuleWorker,
        family: str = "",
    ):
        if ray.get_runtime_context().get_actor_id() is not None:
            keep_sealed()  # in the actor's own process (a test may drive one in its own)
        self.settings = settings
        self._group = WorkerGroup(bundles, devices, fail_fast, settings, worker_class, family)
        self._backend = backend
        self._slot_count = len(bundles)
        self._names = names  # each slot's context, as the user wrote it
        self.state = State.STARTING
        self.members = Membership()  # the group now; the client reads it in each view
        self.limits = policy.Limits(self._slot_count, elastic=False)
        self.failures = 0  # failure events of the elastic run (policy.py says what one is)
        self.broken_in_a_row = 0  # re-formings with no worker lost since a step last succeeded
        self.steps_sent = 0  # training steps sent; a worker's applied() counts the same
        self.committed = 0  # the step every member was at when the group last re-formed
        self.lost: WorkerLostError | None = None  # why the run cannot go on (FAILED)
        self._posted_error: Exception | None = None  # see _raise_posted_error
        self._replicas: dict[int, Replica] = {}  # by module id
        self._loops = StepLoops()  # the client's step loops under way
        self._events: list[dict] = []  # membership changes the client has not read yet
        self._seen: Membership | None = None  # the membership the client last saw (see view)
        self._unchecked: list[tuple[int, ray.ObjectRef, str]] = []
        self._in_flight: dict[ray.ObjectRef, tuple] = {}  # step calls not read: (rank, kind)
        self._chunks: deque[chunks.Chunk] = deque()  # in the order sent
        self._synced: set[int] = set()  # slots whose workers hold every module, in step
        self._refused_join: set[int] = set()  # slots whose replacement failed to join, and
        # none of theirs joined since
        self._leaving: dict[int, str] = {}  # slots to remove gracefully: why (SIGTERM, drain)
        self._balancer: Balancer | None = None  # work_load_list="auto" (a module bound so)
        self._recovering = False
        self._next_poll = 0.0
        self._splits = DatasetSplits()  # of the Ray Datasets the members stream
        self._step_s: float | None = None  # a step's seconds on the workers, as last measured
        self._handed = Handed()  # references the latest plans made for the client
        self._stop_key: str | None = None  # the stop flag of the client's plan under way
        self._preemption_key: str | None = None  # the run's flag, asked when SIGTERM came

    # -- the client's calls: those it reads return (value, view), the others nothing ---------------
    def start(self, start_with: int | None = None) -> tuple:
        """Places the workers and forms their group: of every slot, or once ``start_with`` are
        up (the others pending, admitted by an elastic run as they come up)."""
        self.members = self._group.start(self._backend, start_with)
        self._synced = set(self.members.slots)
        pending = f", slots {list(self.members.pending)} pending" if self.members.pending else ""
        self._enter(
            State.RUNNING,
            f"{self.members.world_size} workers in generation {self.members.generation}{pending}",
        )
        return None, self.view()

    def view(self) -> dict:
        """What the client keeps of the run: the membership (when it changed since the last
        view: None otherwise, the reply of every chunk stays small), the step count, and the
        changes it has not read yet. Only the replies the client reads carry one."""
        events, self._events = self._events, []
        changed = not self.members.same_as(self._seen)
        self._seen = self.members
        return {
            "membership": self.members if changed else None,
            "steps_sent": self.steps_sent,
            "failures": self.failures,
            "leaving": sorted(self._leaving),
            "work_load": (
                self._balancer.work_load(self._slot_count) if self._balancer is not None else None
            ),
            "events": events,
            "steps_per_call": self._steps_per_call(),
        }

    @contextlib.contextmanager
    def _errors_carry_view(self):
        """Gives an error raised to the client in this block the :meth:`view`
        (``err.view``), which the client applies before it raises it: the membership may have
        changed on the way to the error (a recovery, the group re-formed after a worker's
        error)."""
        try:
            yield
        except Exception as err:
            view = self.view()
            with contextlib.suppress(AttributeError):  # an exception that takes no attributes
                err.view = view
            raise

    def _raise_posted_error(self) -> None:
        """Raises, once, the first error of a posted call not raised yet: its check refused
        it (:meth:`post`), or it failed while the controller waited for it on its own
        (:meth:`_sync_posted`)."""
        err, self._posted_error = self._posted_error, None
        if err is not None:
            raise err

    def configure(
        self, limits: policy.Limits, failures: int, preemption_key: str | None = None
    ) -> tuple:
        """Sets the run's limits (an elastic run's, or none) and the failures it had before.
        ``preemption_key``: the run's flag (:class:`.plans.StopFlag`), which the client asks
        once SIGTERM came: it ends a wait for replacements in any call."""
        self.set_limits(limits, failures, preemption_key)
        return None, self.view()

    def set_limits(
        self, limits: policy.Limits, failures: int, preemption_key: str | None = None
    ) -> None:
        """:meth:`configure` for a client that does not wait for the reply (a run's end): the
        view, with the changes the client has not read, stays for its next read."""
        self.limits = limits
        self.failures = failures
        self._preemption_key = preemption_key

    def post(self, method: str, args: tuple, per_worker=None, ranks=None, generation=None) -> None:
        """Calls ``method(*args, *per_worker[rank])`` on the workers (or ``ranks``); an error
        surfaces at the next :meth:`sync` or call. ``generation``: the one ``per_worker`` was
        made for. The steps in flight are finished first, so the call follows them even when
        a loss sends them again (a callback's ``set_params`` after the steps sent before it)."""
        self._finish_in_flight()  # may re-form the group: the generation is checked after
        try:
            if per_worker is not None:
                self.members.check_generation(method, generation)
            self._note(method, args)
            self._post(method, *args, per_worker=per_worker, ranks=ranks)
        except Exception as err:  # nobody reads this call's reply
            if self.lost is None:  # else every later call raises that
                self._posted_error = self._posted_error or err

    def call(self, method: str, args: tuple, per_worker=None, ranks=None, generation=None):
        """Calls ``method`` on the workers and returns their results, in rank order."""
        with self._errors_carry_view():
            self._raise_posted_error()
            if per_worker is not None:
                self.members.check_generation(method, generation)
            return self._call(method, *args, per_worker=per_worker, ranks=ranks), self.view()

    def sync(self) -> tuple:
        """Waits for every posted call and raises the first error among them (or why the run
        cannot go on)."""
        with self._errors_carry_view():
            if self.lost is not None:
                raise self.lost
            self._raise_posted_error()
            self._sync()
            return None, self.view()

    def create(self, mid: int, args: tuple, per_slot: list) -> None:
        """Creates a module's replicas (``per_slot``: the arguments that differ by slot)."""
        self._replicas[mid] = replica = Replica(args, per_slot)
        self._post("create", mid, *args, per_worker=replica.per_rank(self.members.slots))

    def bind(
        self,
        mid: int,
        args: tuple,
        shapes,
        batch_size: int,
        work_load: list,
        balance: bool = False,
    ) -> tuple:
        """Binds a module's replicas to the global ``shapes`` ((data, label) shapes, sealed;
        ``batch_size`` samples) split by ``work_load`` (by slot), or with ``balance`` by the
        weights the controller keeps adjusting (``work_load_list="auto"``); returns the storage
        types of worker 0's parameters and their gradients."""
        replica = self._replicas[mid]
        if balance:
            if self._balancer is None:
                self._balancer = Balancer(self.settings.balance_every_steps)
            work_load = self._balancer.work_load(self._slot_count)
        replica.shapes, replica.batch_size, replica.work_load = shapes, batch_size, work_load
        with self._errors_carry_view():
            self._raise_posted_error()
            self._sync()
            per_worker = replica.split(self.members.slots)
            stypes = self._call("bind", mid, *args, per_worker=per_worker)[0]
            replica.bind = args
            return stypes, self.view()

    def reshape(self, mid: int, shapes, batch_size: int) -> None:
        replica = self._replicas[mid]
        replica.shapes, replica.batch_size = shapes, batch_size
        self._post("reshape", mid, per_worker=replica.split(self.members.slots))

    def set_metric(self, metric, loop: str | None = None) -> None:
        """The metric the steps of the client's step loop ``loop`` update on the workers
        (None: they return outputs); set on the workers again before that loop's next steps
        if another loop's steps (a callback's ``score``) ran meanwhile."""
        self._loops.start(loop, metric)
        self._use_metric(loop)

    def end_loop(self, loop: str) -> None:
        """Forgets the client's step loop ``loop``, which ended: its metric, and its steps
        finished or still in flight (read, then dropped)."""
        self._loops.end(loop)

    def advance(
        self,
        kind: str,
        spec: dict | None,
        keep: int,
        loop: str | None = None,
    ) -> tuple:
        """Sends a chunk of steps (``spec``: see :func:`.chunks.steps_of`) of the client's
        step loop ``loop``, then reads the chunks in flight until at most ``keep`` are.
        Replacements that are up join first, at this step boundary. Returns the steps of
        ``loop`` finished, in order, each as ``(serial, results per member or None, the
        slices they ran on)``: None for a step the survivors of a loss had applied already;
        and the seconds each slot spent in them. The steps of another loop finished here (a
        callback's loop reads past fit's steps in flight), or a worker's error in them, are
        kept for that loop's next call."""
        steps = chunks.steps_of(spec) if spec is not None else []
        with self._errors_carry_view():
            self._advance(kind, steps, keep, loop)
            return self._loops.reply(loop, {}), self.view()

    def run(self, kind: str, plan: dict):
        """Runs a plan of a dataset's steps back to back, the chunks sized and the
        checkpoints placed here, and yields ``(progress, view)`` as chunks finish (a Ray
        streaming generator: the client makes this one call, then reads). ``plan``: the
        steps as :func:`.chunks.steps_of` takes a dataset's, each step's batch number
        (``positions``), ``depth`` (chunks in flight), ``stop_key`` (see below), and for a
        checkpointed run ``snapshot`` (the module whose state a checkpoint holds),
        ``checkpoint_every`` (0: none but those a leaving member asks for) and
        ``first_batch`` (no checkpoint before a batch after it), and ``loop``: the client's
        step loop it belongs to (see :meth:`advance`). ``progress`` is
        :meth:`advance`'s reply, with ``checkpoint``: ``(batch, training steps)`` of a
        snapshot of worker 0 taken at a batch boundary before the reply's chunk was sent (or
        None; :meth:`hand_over` gives the snapshot), and in the last one ``stopped_at``: the
        first batch not sent because the client asked the plan to stop (:class:`.plans.StopFlag`
        with ``stop_key``, seen at chunk boundaries; the steps in flight are finished), else
        None. A plan with ``params_at_end`` (a module) that ran to its end has in the last
        reply ``params``: the training steps after which worker 0's parameters of that module
        were asked for, as its last steps were sent, so that the client's read of them at an
        epoch's end waits for no step (:meth:`hand_over` gives the reference, which holds
        None if a step before failed). The calls posted before the plan are waited for first,
        and the first error among them raised (:meth:`sync`: the client need not ask)."""
        self._stop_key = plan["stop_key"]
        try:
            with self._errors_carry_view():
                yield from self._run_plan(kind, plan)
        finally:
            forget(plan["stop_key"])
            if self._stop_key == plan["stop_key"]:  # unless a later plan's (this one closed late)
                self._stop_key = None

    def _run_plan(self, kind: str, plan: dict):
        """:meth:`run`'s work."""
        handed = self._handed.of(plan["stop_key"])
        loop = plan.get("loop")
        self._raise_posted_error()
        self._sync()
        steps = chunks.steps_of(plan)
        positions, every = plan["positions"], plan.get("checkpoint_every")
        start = 0
        while start < len(steps) and not self._stop_asked():
            progress = {"checkpoint": None}
            if self.limits.elastic:
                self._note_drains()
            due = bool(self._leaving)
            if due:  # they leave first, then the run's state is saved without them
                self._leave(loop)
            batch = positions[start]
            due = due or bool(every) and batch % every == 0
            if every is not None and due and batch > plan["first_batch"]:
                mid, steps_done = plan["snapshot"], self.steps_sent
                snapshot = self._submit("snapshot", mid, steps_done, ranks=[0])[0]
                handed["snapshot", steps_done] = snapshot
                progress["checkpoint"] = (batch, steps_done)
            stop = start + 1
            while stop < len(steps) and stop - start < self._steps_per_call():
                if every and positions[stop] % every == 0:
                    break  # a checkpoint's boundary
                stop += 1
            self._advance(kind, steps[start:stop], plan["depth"], loop)
            start = stop
            yield self._loops.reply(loop, progress), self.view()
        last = {}
        last["stopped_at"] = positions[start] if start < len(positions) else None
        wanted = plan.get("params_at_end")
        if wanted is not None and last["stopped_at"] is None and steps:
            params = self._submit("params_after", wanted, self.steps_sent, ranks=[0])[0]
            handed["params", self.steps_sent] = params
            last["params"] = self.steps_sent
        self._advance(kind, [], 0, loop)
        yield self._loops.reply(loop, last), self.view()

    @ray.method(concurrency_group="hand_over")
    def hand_over(self, plan: str, what: str, steps: int) -> tuple:
        """``(reference,)``: what the plan of ``stop_key`` ``plan`` made for the client after
        ``steps`` training steps (``what``: "snapshot", a checkpoint's; "params", worker 0's
        parameters at its end), or ``(None,)`` if it has none (any more: the references of
        all but the latest few plans are let go: ``plans.Handed``). The client takes them here,
        in a call of their own group that runs beside the plan, not from the plan's replies:
        a reference the controller made, read from a streaming generator's reply, can be
        freed by Ray while the client still holds it (ray-project/ray#58080), and one read
        from an ordinary call's reply is counted as the client's."""
        return (self._handed.take(plan, what, steps),)

    def snapshot(self, mid: int, steps: int) -> tuple:
        """Worker 0's copy of a module's state once it has applied ``steps`` (None then if a
        step before failed: it was sent again, and this copy is not the run's)."""
        return self._submit("snapshot", mid, steps, ranks=[0])[0], self.view()

    def ready(self, timeout_s: float = 0.0) -> list[int]:
        """Slots whose replacement worker is up and can be admitted (tests ask)."""
        return self._group.ready(timeout_s)

    def shutdown(self) -> None:
        self._group.stop()
        self._enter(State.CLOSED, "shut down")

    def _advance(self, kind: str, steps: list[chunks.Step], keep: int, loop) -> None:
        """:meth:`advance`'s work: its finished steps are kept by loop (``StepLoops.reply``)."""
        if self.limits.elastic:
            self._note_drains()
        if self._leaving:
            self._leave(loop)
        if steps:
            if self.members.pending and self.limits.elastic and not self._loops.in_pass:
                self._grow(loop)
            if self._balancer is not None and kind == "train_step" and steps[0].stream is None:
                self._rebalance()
            self._send(kind, steps, loop)
        while len(self._chunks) > keep:
            self._finish_for(loop)

    def _finish_for(self, loop) -> None:
        """:meth:`_finish`, in a call of the client's step loop ``loop``: a worker's error in
        the steps of another loop (fit's, read by a callback's ``score``) is that loop's
        (``StepLoops.keep``). Raised here: a worker's error in ``loop``'s own steps, one that
        ends the run, and what a recovery raised."""
        sender = self._chunks[0].loop  # the chunk _finish reads
        err = self._finish()
        if err is None:
            return
        if sender == loop or self.lost is not None:
            raise err
        self._loops.keep(sender, err)

    def _finish_in_flight(self) -> None:
        """Finishes every step in flight, for no loop of its own: an error reading a chunk is
        kept for the loop that sent it (``StepLoops.keep``). Stops when the run cannot go on (every
        later call says why) or a recovery raised."""
        while self._chunks and self.lost is None:
            sender = self._chunks[0].loop  # the chunk _finish reads
            try:
                err = self._finish()
            except Exception as err:  # noqa: BLE001 - a recovery's: its loop's, not this call's
                self._loops.keep(sender, err)
                return
            if err is not None:
                self._loops.keep(sender, err)

    def _use_metric(self, loop) -> None:
        """Sets ``loop``'s metric on the workers, unless it is the one there."""
        if self._loops.switch_metric(loop):
            self._post("set_metric", self._loops.metric)

    def _stop_asked(self) -> bool:
        """Whether the client asked the plan under way to stop (:class:`.plans.StopFlag`)."""
        return self._stop_key is not None and stop_asked(self._stop_key)

    def _preempted(self) -> bool:
        """Whether SIGTERM made the client ask the run, or the plan under way, to stop
        (:func:`.plans.preempted`)."""
        keys = (self._preemption_key, self._stop_key)
        return any(key is not None and preempted(key) for key in keys)

    def _steps_per_call(self) -> int:
        return chunks.steps_per_call(self.settings, self._step_s)

    # -- state -------------------------------------------------------------------------------------
    def _enter(self, state: State, why: str) -> None:
        if state is not self.state:
            log.info("raymodule controller: %s -> %s (%s)", self.state.name, state.name, why)
            self.state = state

    def _fail(self, error: WorkerLostError) -> WorkerLostError:
        error.fatal = True  # the client's handle then refuses further calls itself
        self.lost = error
        self._enter(State.FAILED, str(error))
        return error

    def _classify(self, outcomes: list, ranks: list[int]) -> tuple:
        """:func:`.waits.classify_outcomes` of calls to ``ranks`` of the members."""
        return classify_outcomes(
            outcomes, ranks, self.settings, self.members.rank_of_actor(), self._not_in_step()
        )

    def _not_in_step(self) -> set[int]:
        """The ranks of the members not yet in step (admitted, their modules not yet set up);
        every other one holds every module, in step."""
        return {rank for rank, slot in enumerate(self.members.slots) if slot not in self._synced}

    def _note(self, method: str, args: tuple) -> None:
        """Keeps the journal of what the replicas were set up with, and counts the updates."""
        if method == "update":
            self.steps_sent += 1
        else:
            record_call(self._replicas, method, args)

    # -- calls to the workers --------------------------------------------------------------------
    def _submit(self, method: str, *args, per_worker=None, ranks=None) -> list[ray.ObjectRef]:
        """Calls ``method(*args, *per_worker[rank])`` on every worker (or ``ranks``), no wait."""
        if self.lost is not None:
            raise self.lost
        if self.state is State.CLOSED:
            raise WorkerLostError("this module was closed; its workers are gone")
        if ranks is not None and not all(0 <= rank < self.members.world_size for rank in ranks):
            raise ValueError(
                f"ranks {list(ranks)} asked of {method}(), but the group has "
                f"{self.members.world_size} workers (ranks 0..{self.members.world_size - 1})"
            )
        refs = []
        for rank in range(self.members.world_size) if ranks is None else ranks:
            extra = per_worker[rank] if per_worker is not None else ()
            refs.append(getattr(self.members.handles[rank], method).remote(*args, *extra))
        return refs

    def _post(self, method: str, *args, per_worker=None, ranks=None) -> None:
        ranks = list(range(self.members.world_size)) if ranks is None else ranks
        refs = self._submit(method, *args, per_worker=per_worker, ranks=ranks)
        self._unchecked.extend((rank, ref, method) for rank, ref in zip(ranks, refs))

    def _call(self, method: str, *args, per_worker=None, ranks=None) -> list:
        """In an elastic run a worker lost during the call is recovered from here: a read of
        the replicated state (``_REPEATABLE``) is then asked again of the new group; any other
        call cannot be, and says so."""
        while True:
            refs = self._submit(method, *args, per_worker=per_worker, ranks=ranks)
            try:
                return self._get(refs, method, ranks)
            except StepsFailed as failure:
                self._recover_here(failure)
                if method not in _REPEATABLE or per_worker is not None or ranks not in (None, [0]):
                    raise WorkerLostError(
                        f"a worker was lost during {method}(); the run went on without it "
                        "but this call's result is gone: call it again"
                    ) from None

    def _sync(self, ranks: list[int] | None = None) -> None:
        """Waits for every posted call (to ``ranks``: those only) and raises the first error
        among them (in an elastic run, a worker lost meanwhile is recovered from: the
        survivors hold what was posted, and replacements take a survivor's state)."""
        if ranks is None:
            unchecked, self._unchecked = self._unchecked, []
        else:
            unchecked = [entry for entry in self._unchecked if entry[0] in ranks]
            self._unchecked = [entry for entry in self._unchecked if entry[0] not in ranks]
        if not unchecked:
            return
        ranks, refs, methods = zip(*unchecked)
        try:
            self._get(list(refs), "/".join(dict.fromkeys(methods)), list(ranks))
        except StepsFailed as failure:
            self._recover_here(failure)

    def _sync_posted(self) -> None:
        """:meth:`_sync` in no call of the client's: a posted call's own error is kept for its
        next :meth:`sync` or call (what ends the run is raised)."""
        try:
            self._sync()
        except Exception as err:
            if self.lost is not None:
                raise
            self._posted_error = self._posted_error or err

    def _get(self, refs: list, method: str, ranks=None) -> list:
        """``ray.get`` that names the worker, says a lost worker is lost, and never hangs.

        A worker is lost when its process or node is gone, or when it is silent: still busy
        :func:`.waits.silence_s` after a peer's call failed (its peers' collective timed out waiting
        for it), or ``RAYMODULE_CALL_TIMEOUT_S`` after the call. In an
        elastic run that raises :class:`StepsFailed` to recover from; otherwise the module
        cannot go on and says so.
        """
        ranks = list(range(len(refs))) if ranks is None else ranks
        kinds = {self._in_flight.pop(ref, (None, None))[1] for ref in refs}
        # the survivors are not awaited when what they say changes nothing: a loss ends the
        # call outside an elastic run, and restarts every worker in a Ray Dataset's pass
        dead_ends = self._loops.in_pass or not self.limits.elastic
        outcomes, seen_at, last = await_calls(refs, self.settings, dead_ends=dead_ends)
        results, lost, broken, failed = self._classify(outcomes, ranks)
        if failed and not lost:
            rank, err = failed
            raise in_words(err, f"worker {rank} failed in {method}()") from None
        if lost or broken:
            if self.limits.elastic:
                slowest = ranks[last] if last is not None else None
                raise StepsFailed(method, lost, broken, seen_at, slowest)
            who = self.members.describe_lost(lost, self._names) if lost else None
            raise self._fail(
                WorkerLostError(
                    f"{who or 'the collective group broke'} "
                    f"during {method}(): {'; '.join(lost.values()) or broken}. The module "
                    "cannot continue; create a new one, or train with "
                    "fit(..., run=raymodule.RunConfig(...)) to go on through lost workers"
                )
            )
        if kinds == {"train_step"}:  # the group summed gradients: it works again
            self.broken_in_a_row = 0
        return results

    # -- steps -------------------------------------------------------------------------------------
    def _send(self, kind: str, steps: list[chunks.Step], loop) -> None:
        """Sends ``steps`` of the client's step loop ``loop`` to every member in one call
        each, for this generation, after that loop's metric if another is on the workers."""
        self._use_metric(loop)
        if kind == "train_step":
            for step in steps:
                self.steps_sent += 1
                step.number = self.steps_sent
        weights = [self.members.weights(self._replicas[step.mid].work_load) for step in steps]
        split = None
        if steps[0].stream is not None:
            split = self._splits.shares(steps[0].stream, self.members)
            self._loops.streaming(loop)
        else:
            self._loops.pass_over(loop)  # a loop's pass cut short is over when it sends others
        args = chunks.worker_args(steps, weights, self.settings.data_timeout_s, split)
        mids = [step.mid for step in steps]
        refs = [
            handle.steps.remote(kind, mids, batches, self.members.generation, plan)
            for handle, (batches, plan) in zip(self.members.handles, args)
        ]
        self._in_flight.update((ref, (rank, kind)) for rank, ref in enumerate(refs))
        self._chunks.append(
            chunks.Chunk(
                kind,
                steps,
                refs,
                list(self.members.slots),
                self.members.generation,
                chunks.reads(self.members.handles, args),
                loop,
            )
        )

    def _finish(self) -> Exception | None:
        """Reads the oldest chunk in flight, its steps finished for the loop that sent it;
        after a loss, sends the steps in flight again to the re-formed group (what the
        recovery raises is raised). Returns the error reading the chunk met (a worker's own,
        or the run's end outside an elastic run), the chunk read: the steps after it are read
        next, but for those a worker's own error in a training step voided
        (:meth:`_re_form_after_error`)."""
        chunk = self._chunks[0]
        try:
            per_worker = self._get(chunk.refs, chunk.kind)
        except StepsFailed as failure:
            if chunk.generation == self.members.generation:
                self._resend(self._recover(failure))
            else:  # sent before a re-forming (every recovery sends the steps in flight again)
                self._resend(self.committed)
            return None
        except Exception as err:  # noqa: BLE001 - the caller's or its loop's (_finish_for)
            self._chunks.popleft()
            if (
                chunk.kind == "train_step"
                and self.lost is None  # a worker's own error, not the run's end
                and chunk.generation == self.members.generation
            ):
                self._re_form_after_error(chunk, err)
            return err
        except BaseException:
            self._chunks.popleft()
            raise
        self._chunks.popleft()
        done, seconds = self._loops.finished_of(chunk.loop)
        if any(
            step.stream is not None and step.position == step.stream["batches"] - 1
            for step in chunk.steps
        ):
            self._loops.pass_over(chunk.loop)  # its last step is done
        for slot, (_, took, _, shut_down) in zip(chunk.slots, per_worker):
            seconds[slot] = seconds.get(slot, 0.0) + took
            if shut_down and slot in self.members.slots:
                self._leaving.setdefault(slot, "shut down (SIGTERM)")
        if self._balancer is not None and chunk.kind == "train_step":
            computing = [reply[2] for reply in per_worker]
            self._balancer.record(chunk.slots, computing, [step.slices for step in chunk.steps])
        for index, step in enumerate(chunk.steps):
            results = [per_step[index] for per_step, _, _, _ in per_worker]
            done.append((step.serial, results, step.slices))
        self._step_s = max(reply[1] for reply in per_worker) / len(chunk.steps)
        return None

    def _resend(self, committed: int) -> None:
        """Sends the steps in flight again to the re-formed group, in order, each for the loop
        that sent it, but for training steps applied before it (up to step ``committed``),
        which are finished without results. Steps that could not be sent again are lost, and
        the run with them: its loops would wait for them."""
        void = [(chunk.kind, chunk.loop, step) for chunk in self._chunks for step in chunk.steps]
        members = set(self.members.handles)
        read_by_lost = {
            ref
            for chunk in self._chunks
            for member, read in chunk.reads.items()
            if member not in members
            for ref in read
        }
        self._chunks.clear()
        self._loops.metric_unknown()  # set again on every member before the first step
        again: list[tuple[str, object, list]] = []  # runs of steps of one kind and loop
        per_call = max(1, self.settings.steps_per_call)
        for kind, loop, step in void:
            if kind == "train_step" and step.number <= committed:
                self._loops.finished_of(loop)[0].append((step.serial, None, None))  # applied
            elif again and again[-1][:2] == (kind, loop) and len(again[-1][2]) < per_call:
                again[-1][2].append(step)
            else:
                again.append((kind, loop, [step]))
        try:
            chunks.rehome(
                [step for _, _, step in void], read_by_lost, self.settings.collective_timeout_s
            )
            for kind, loop, steps in again:
                self._send(kind, steps, loop)
        except Exception as err:
            if self.lost is not None:  # said already
                raise
            raise self._fail(
                WorkerLostError(
                    "the steps in flight could not be sent again to the re-formed group "
                    f"({type(err).__name__}: {err}); the module cannot continue"
                )
            ) from err


ACTOR_OPTIONS = {"num_cpus": 0, "max_restarts": 0, "concurrency_groups": {"hand_over": 1}}
"""The controller actor's: no CPU of its own, never restarted by Ray (a lost controller is
handled as its run's loss), and :meth:`Controller.hand_over` in a group of its own."""

RemoteController = ray.remote(**ACTOR_OPTIONS)(Controller)
