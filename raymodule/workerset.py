"""The client's handle on a module family's controller and workers.

Every call to the workers goes through here: it submits one Ray call per worker, keeps the
calls whose results nobody asked for yet (MXNet's engine is asynchronous too: an error
surfaces at the next call that reads a result), and turns Ray's errors into raymodule's.
"""

from __future__ import annotations

import gc
import logging
import time
import weakref

import mxnet as mx
import ray
from ray.util.placement_group import get_current_placement_group, remove_placement_group
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

from . import policy, runtime
from .constants import Settings
from .context import local_device, resources_of
from .controller import RemoteController
from .errors import GroupBrokenError, RayModuleError, WorkerError, WorkerLostError

__all__ = ["WorkerSet"]

log = logging.getLogger(__name__)

_MAX_UNCHECKED = 64
# calls that read what every replica holds alike: asked again of the new group after a loss
_REPEATABLE = frozenset({"get_params", "optimizer_states"})


def _shutdown(controller, held: dict) -> None:
    """Stops a family's workers and controller, and removes the placement group it made
    (``held["placement_group"]``: a controller that died left it behind); safe at exit."""
    if not ray.is_initialized():
        return
    try:
        ray.get(controller.shutdown.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - the controller may be gone already
        pass
    for release in (
        lambda: ray.kill(controller, no_restart=True),
        lambda: held["placement_group"] and remove_placement_group(held["placement_group"]),
    ):
        try:
            release()
        except Exception:  # noqa: BLE001 - gone already
            pass


class StepsFailed(Exception):
    """Internal: a call to the workers failed because the membership broke (workers ``lost``
    by rank, with why; or none lost, the group broken by a worker that was late). Raised only
    in an elastic run, where the step loop recovers from it."""

    def __init__(
        self,
        method: str,
        lost: dict[int, str],
        broken: str,
        seen_at: float = 0.0,
        slowest: int | None = None,
    ):
        super().__init__(f"{method}: lost {lost or 'no worker'} ({broken})")
        self.method = method
        self.lost = lost
        self.broken = broken
        self.seen_at = seen_at or time.monotonic()  # when the first call failed
        self.slowest = slowest  # the rank whose failed call came back last


class EveryWorkerLost(WorkerLostError):
    """Internal: an elastic run lost every worker; it goes on from its latest checkpoint."""


class WorkerSet:
    """One worker actor per context, started by a controller actor; released when closed or
    when no module uses them any more.

    ``handles`` are the live workers in rank order and ``slots`` the contexts they hold; both
    change when an elastic run loses or regains workers (:meth:`recover`, :meth:`grow`).
    """

    def __init__(self, contexts: list[mx.Context], worker_class=None):
        """``worker_class``: the worker actors' class (tests use a light stand-in)."""
        runtime.ensure_ray()
        gc.collect()  # modules that were dropped release their workers before we ask for more
        self.contexts = contexts
        self.settings = Settings.from_env()
        backend = "nccl" if any(c.device_type == "gpu" for c in contexts) else "gloo"
        self.controller = RemoteController.options(scheduling_strategy=_beside_client()).remote(
            [resources_of(c) for c in contexts],
            [local_device(c) for c in contexts],
            runtime.started_locally(),
            backend,
            self.settings,
            *([worker_class] if worker_class is not None else []),
        )
        self.handles: list = []
        self.slots: list[int] = []
        self.nodes: list[dict] = []
        self.generation = 0
        self.pending: list[int] = []  # slots whose replacement worker is starting
        self.limits = policy.Limits(len(contexts), elastic=False)
        self.failures = 0  # failure events of the elastic run (policy.py says what one is)
        self.broken_in_a_row = 0  # re-formings with no worker lost since a step last succeeded
        self.steps_sent = 0  # training steps posted; a worker's applied() counts the same
        self.committed = 0  # the step every member was at when the group last re-formed
        self.on_membership = None  # set by an elastic run: called with each change, as a dict
        self.modules: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._held = {"placement_group": None}  # what the controller made, for _shutdown
        self._finalizer = weakref.finalize(self, _shutdown, self.controller, self._held)
        self._unchecked: list[tuple[int, ray.ObjectRef, str]] = []
        self._in_flight: dict[ray.ObjectRef, tuple] = {}  # step calls not read: (rank, kind)
        self._synced: set[int] = set()  # slots whose workers hold every module, in step
        self._recovering = False
        self._next_poll = 0.0
        self.lost: WorkerLostError | None = None
        self.params_dirty = False  # the workers' parameters are newer than the client's copy
        bound = (
            self.settings.placement_timeout_s + self._forming_s() + self.settings.control_timeout_s
        )
        try:
            self._adopt(ray.get(self.controller.start.remote(), timeout=bound))
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise WorkerLostError(
                f"starting {len(contexts)} workers for {contexts} took more than {bound:g} s "
                "(RAYMODULE_PLACEMENT_TIMEOUT_S, forming their group, RAYMODULE_CONTROL_TIMEOUT_S)"
            ) from None
        except ray.exceptions.RayError as err:
            self.close()
            raise _in_words(
                err, f"starting {len(contexts)} workers for {contexts} failed"
            ) from None
        self._synced = set(self.slots)

    def close(self) -> None:
        self._finalizer()
        self.handles = []

    @property
    def world_size(self) -> int:
        return len(self.handles)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _adopt(self, membership: dict) -> None:
        self._held["placement_group"] = membership["placement_group"]
        self.handles = membership["handles"]
        self.slots = membership["slots"]
        self.nodes = membership["nodes"]
        self.generation = membership["generation"]
        self.pending = membership["pending"]

    def weights(self, work_load_list: list) -> list:
        """The ``work_load_list`` entries of the live workers, in rank order."""
        return [work_load_list[slot] for slot in self.slots]

    # -- calls -------------------------------------------------------------------------------
    def submit(self, method: str, *args, per_worker=None, ranks=None) -> list[ray.ObjectRef]:
        """Calls ``method(*args, *per_worker[rank])`` on every worker (or ``ranks``), no wait."""
        if self.lost is not None:
            raise self.lost
        if self.closed:
            raise WorkerLostError("this module was closed; its workers are gone")
        refs = []
        for rank in range(len(self.handles)) if ranks is None else ranks:
            extra = per_worker[rank] if per_worker is not None else ()
            refs.append(getattr(self.handles[rank], method).remote(*args, *extra))
        return refs

    def post(self, method: str, *args, per_worker=None, ranks=None) -> None:
        """Like :meth:`submit`, for calls whose result is only checked at the next sync."""
        ranks = list(range(len(self.handles))) if ranks is None else ranks
        refs = self.submit(method, *args, per_worker=per_worker, ranks=ranks)
        self._unchecked.extend((rank, ref, method) for rank, ref in zip(ranks, refs))
        if len(self._unchecked) > _MAX_UNCHECKED:
            self.sync()

    def send_steps(self, kind: str, mids: list[int], parts: list) -> list:
        """Sends a chunk of steps to every worker (``parts[rank]``: that worker's part of each
        batch, in the object store), for this generation of the group; the calls are in flight
        until :meth:`get` reads them (a recovery waits for them first)."""
        per_worker = [(part, self.generation) for part in parts]
        refs = self.submit("steps", kind, mids, per_worker=per_worker)
        self._in_flight.update((ref, (rank, kind)) for rank, ref in enumerate(refs))
        return refs

    def count_step(self) -> int:
        """Counts a training step posted to the workers; returns its number."""
        self.steps_sent += 1
        return self.steps_sent

    def call(self, method: str, *args, per_worker=None, ranks=None) -> list:
        """Calls ``method`` on the workers and returns their results, in rank order.

        In an elastic run a worker lost during the call is recovered from here: a read of
        the replicated state (``_REPEATABLE``) is then asked again of the new group; any other
        call cannot be, and says so."""
        while True:
            refs = self.submit(method, *args, per_worker=per_worker, ranks=ranks)
            try:
                return self.get(refs, method, ranks)
            except StepsFailed as failure:
                self._recover_here(failure)
                if method not in _REPEATABLE or per_worker is not None or ranks not in (None, [0]):
                    raise WorkerLostError(
                        f"a worker was lost during {method}(); the run went on without it "
                        "but this call's result is gone: call it again"
                    ) from None

    def sync(self) -> None:
        """Waits for every posted call and raises the first error among them (in an elastic
        run, a worker lost meanwhile is recovered from: the survivors hold what was posted,
        and replacements take a survivor's state)."""
        unchecked, self._unchecked = self._unchecked, []
        if not unchecked:
            return
        ranks, refs, methods = zip(*unchecked)
        try:
            self.get(list(refs), "/".join(dict.fromkeys(methods)), list(ranks))
        except StepsFailed as failure:
            self._recover_here(failure)

    def _recover_here(self, failure: StepsFailed) -> None:
        """A failure seen outside the step loop (which recovers by itself, to send its steps
        again) is recovered from where it is seen; inside a recovery, that starts again."""
        if self._recovering:
            raise failure
        self.recover(failure)

    def get(self, refs: list, method: str, ranks=None) -> list:
        """``ray.get`` that names the worker, says a lost worker is lost, and never hangs.

        A worker is lost when its process or node is gone, or when it is silent: still busy
        ``RAYMODULE_COLLECTIVE_TIMEOUT_S`` after a peer's call failed (its peers' collective
        timed out waiting for it), or ``RAYMODULE_CALL_TIMEOUT_S`` after the call. In an
        elastic run that raises :class:`StepsFailed` for the step loop to recover from;
        otherwise the module cannot go on and says so.
        """
        ranks = list(range(len(refs))) if ranks is None else ranks
        kinds = {self._in_flight.pop(ref, (None, None))[1] for ref in refs}
        outcomes, seen_at, last = _await(refs, self.settings)
        results, lost, broken, failed = [], {}, "", None
        for rank, (kind, value) in zip(ranks, outcomes):
            if kind == "ok":
                results.append(value)
            elif kind == "broken":
                broken = broken or _first_line(value)
            elif kind == "failed":
                failed = failed or (rank, value)
            elif kind:
                lost.setdefault(rank, _why_lost(kind, value, self.settings))
        if failed and not lost:
            rank, err = failed
            raise _in_words(err, f"worker {rank} failed in {method}()") from None
        if lost or broken:
            if self.limits.elastic:
                slowest = ranks[last] if last is not None else None
                raise StepsFailed(method, lost, broken, seen_at, slowest)
            self.lost = WorkerLostError(
                f"{self._describe_lost(lost) if lost else 'the collective group broke'} during "
                f"{method}(): {'; '.join(lost.values()) or broken}. The module cannot continue; "
                "create a new one, or train with fit(..., run=raymodule.RunConfig(...)) to go "
                "on through lost workers"
            )
            raise self.lost
        if kinds == {"train_step"}:  # the group summed gradients: it works again
            self.broken_in_a_row = 0
        return results

    def _describe_lost(self, lost: dict[int, str]) -> str:
        described = []
        for rank in sorted(lost):
            node = self.nodes[rank]
            described.append(
                f"worker {rank} ({self.contexts[self.slots[rank]]}, pid {node.get('pid', '?')}, "
                f"node {str(node.get('node', '?'))[:8]})"
            )
        return ", ".join(described) + (" was lost" if len(lost) == 1 else " were lost")

    # -- membership ----------------------------------------------------------------------------
    def recover(self, failure: StepsFailed) -> int:
        """Goes on after a failed call: waits for the calls still in flight, removes the lost
        workers (starting replacements), waits for replacements when the policy says so,
        forms the next generation's group and brings every worker to the last step a survivor
        applied. A worker lost while this runs starts it again, as one more failure; the
        change is announced once, with every worker it lost. Returns that step; the caller
        sends the steps after it again. Storage is never read here: when nobody survived,
        :class:`EveryWorkerLost` leaves it to ``fit``."""
        tic, before, during = failure.seen_at, len(self.handles), failure.method
        gone: list[int] = []
        why: list[str] = []
        self._recovering = True
        try:
            while True:
                try:
                    committed = self._recover_once(failure, gone, why)
                    break
                except StepsFailed as again:  # another worker lost while recovering
                    failure = again
        finally:
            self._recovering = False
        extra = {"lost": [f"slot {s}" for s in gone], "step": committed, "during": during}
        self._announce("lost" if gone else "re-formed", "; ".join(why), before, tic, extra)
        return committed

    def _recover_once(self, failure: StepsFailed, gone: list[int], why: list[str]) -> int:
        """One attempt of :meth:`recover`; appends the slots it removes to ``gone`` and says
        why in ``why``."""
        lost = dict(failure.lost)
        self._settle(lost)
        self.broken_in_a_row = 0 if lost else self.broken_in_a_row + 1
        decision = self._decide(lost)
        if decision.action is policy.Action.EVICT:
            rank = failure.slowest if failure.slowest is not None else len(self.handles) - 1
            lost[rank] = f"evicted: {decision.reason}"
            self.broken_in_a_row = 0
            decision = self._decide(lost)
        if lost:
            self.failures += 1
        if decision.action in (policy.Action.FAIL, policy.Action.RESTART):
            # RESTART needs new workers from storage: fit() does that on EveryWorkerLost
            error = WorkerLostError if decision.action is policy.Action.FAIL else EveryWorkerLost
            self.lost = error(
                f"{self._describe_lost(lost) if lost else 'the group broke'} during "
                f"{failure.method}(): {'; '.join(lost.values()) or failure.broken}"
                + (f"; {decision.reason}" if decision.reason else "")
            )
            raise self.lost
        removed = [self.slots[r] for r in sorted(lost)]
        why.append(
            f"{self._describe_lost(lost)}: {'; '.join(lost.values())}"
            if lost
            else f"group broke: {failure.broken}"
        )
        if removed:
            gone.extend(removed)
            self._synced.difference_update(removed)
            self._control("remove", removed, waits_s=0.0)
        live = len(self.handles) - len(removed)
        wait = decision.action is policy.Action.WAIT
        return self._reform(self._wait_for_floor(live, wait, why[-1]))

    def _decide(self, lost: dict, survivors: int | None = None) -> policy.Decision:
        return policy.on_loss(
            self.limits,
            policy.Loss(
                survivors=len(self.handles) - len(lost) if survivors is None else survivors,
                lost=len(lost),
                failures_before=self.failures,
                broken_in_a_row=self.broken_in_a_row,
            ),
        )

    def grow(self, drain) -> bool:
        """At a step boundary: admits replacement workers that are up (one controller call,
        at most every RAYMODULE_ADMIT_INTERVAL_S). ``drain()`` is called first to finish the
        steps in flight. Returns whether the membership changed."""
        if not self.pending or not self.limits.elastic or time.monotonic() < self._next_poll:
            return False
        self._next_poll = time.monotonic() + self.settings.admit_interval_s
        ready = self._control("ready", 0.0, waits_s=0.0)
        admit = ready[: policy.to_admit(len(self.contexts), len(self.handles), len(ready))]
        if not admit:
            return False
        tic, before = time.monotonic(), len(self.handles)
        drain()
        self.sync()
        admit = [slot for slot in admit if slot in self.pending]  # a recovery may have taken it
        if not admit:
            return True
        self._recovering = True
        try:
            committed = self._reform(admit)
        except StepsFailed as failure:  # a worker lost while the replacements joined
            lost_while_joining = failure
        else:
            lost_while_joining = None
        finally:
            self._recovering = False
        if lost_while_joining is not None:
            self.recover(lost_while_joining)
            return True
        joined = ", ".join(f"slot {s}" for s in admit)
        self._announce(
            "grown", f"replacement for {joined} joined", before, tic, {"step": committed}
        )
        return True

    def _wait_for_floor(self, live: int, wait: bool, loss: str) -> list[int]:
        """Replacements to admit now: those already up; while below the floor, waits for
        more (bounded by RAYMODULE_MIN_WORKERS_WAIT_S), then fails as the policy says."""
        ready = self._control("ready", 0.0, waits_s=0.0)
        start = time.monotonic()
        limit = self.settings.min_workers_wait_s
        while wait and live + len(ready) < self.limits.floor:
            waited = time.monotonic() - start
            if waited >= limit:
                break
            log.warning(
                "raymodule: %d of %d workers, below the floor of %d: waiting for replacements "
                "(%.0f s of %.0f s)",
                live + len(ready), len(self.contexts), self.limits.floor, waited, limit,
            )  # fmt: skip
            step = min(limit - waited, self.settings.placement_report_interval_s)
            ready = sorted(set(ready) | set(self._control("ready", step, waits_s=step)))
        decision = policy.after_wait(self.limits, live + len(ready), time.monotonic() - start)
        if decision.action is policy.Action.FAIL:
            self.lost = WorkerLostError(f"{loss}; {decision.reason}")
            raise self.lost
        return ready

    def _reform(self, admit: list[int]) -> int:
        """Forms the next generation's group of the members and the ready replacements of
        ``admit`` (slots), sets up the modules on every worker not yet in step (admitted now,
        or earlier by a re-forming that a later loss cut short) and brings everyone to the
        latest step a member in step applied. A member lost meanwhile raises
        :class:`StepsFailed` (for :meth:`recover`)."""
        membership = self._control("reform", admit, waits_s=self._forming_s())
        self._adopt(membership)
        if membership["lost"]:
            rank_of = {slot: rank for rank, slot in enumerate(self.slots)}
            lost = {rank_of[slot]: why for slot, why in membership["lost"].items()}
            raise StepsFailed("re-form", lost, "")
        new = [rank for rank, slot in enumerate(self.slots) if slot not in self._synced]
        old = [rank for rank, slot in enumerate(self.slots) if slot in self._synced]
        if not old:
            self.lost = EveryWorkerLost("every worker holding the run's state was lost")
            raise self.lost
        applied = self.call("applied", ranks=old)
        committed = max(applied)
        source = old[applied.index(committed)]
        behind = [r for r, a in zip(old, applied) if a < committed] + new
        modules = [self.modules[k] for k in sorted(self.modules)]
        for module in modules:
            module._rejoin(new)
        snapshots = {
            module._id: self.submit("snapshot", module._id, committed, ranks=[source])[0]
            for module in modules
            if behind and module._holds_state()
        }
        for mid, snapshot in snapshots.items():  # parameters, and survivors' optimizer states
            self.post("restore", mid, snapshot, ranks=behind)
        for module in modules:
            module._install_optimizer(new)
        for mid, snapshot in snapshots.items():  # the new workers' optimizer states
            self.post("restore", mid, snapshot, ranks=new)
        self.sync()
        self._synced = set(self.slots)
        self.steps_sent = self.committed = committed
        return committed

    def _forming_s(self) -> float:
        """The longest a re-forming may take: leaving, the rendezvous, then joining (twice
        the collective timeout), each bounded by the collective timeout."""
        return 4 * self.settings.collective_timeout_s

    def _control(self, method: str, *args, waits_s: float):
        """Calls the controller: bounded by what the call itself may wait (``waits_s``) plus
        RAYMODULE_CONTROL_TIMEOUT_S. A lost controller (its node died) loses the run's workers
        too (they share its fate), so the run goes on from its latest checkpoint, as one more
        failure; a controller that does not answer is treated the same way."""
        bound = self.settings.control_timeout_s + waits_s
        try:
            return ray.get(getattr(self.controller, method).remote(*args), timeout=bound)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
            why = (
                f"no answer within {bound:g} s (RAYMODULE_CONTROL_TIMEOUT_S)"
                if isinstance(err, ray.exceptions.GetTimeoutError)
                else _first_line(err)
            )
            lost = {rank: why for rank in range(len(self.handles))} or {0: why}
            decision = self._decide(lost, survivors=0)
            self.failures += 1
            restart = decision.action is policy.Action.RESTART
            self.lost = (EveryWorkerLost if restart else WorkerLostError)(
                f"the controller was lost: {why}"
                + (f"; {decision.reason}" if decision.reason else "")
            )
            raise self.lost from None

    def _settle(self, lost: dict[int, str]) -> None:
        """Waits for the survivors' calls in flight (they fail at once: their group is
        broken); a survivor that does not answer within the collective timeout is lost too."""
        unchecked, self._unchecked = self._unchecked, []
        in_flight, self._in_flight = self._in_flight, {}
        waiting = {ref: rank for ref, (rank, _) in in_flight.items() if rank not in lost}
        waiting.update({ref: rank for rank, ref, _ in unchecked if rank not in lost})
        if not waiting:
            return
        _, late = ray.wait(
            list(waiting), num_returns=len(waiting), timeout=self.settings.collective_timeout_s
        )
        for ref in late:
            lost.setdefault(waiting[ref], _why_lost("silent", None, self.settings))

    def _announce(self, change: str, why: str, before: int, tic: float, extra: dict) -> None:
        seconds = time.monotonic() - tic
        log.warning(
            "raymodule: %s; world size %d -> %d (generation %d), recovered in %.2f s%s",
            why,
            before,
            len(self.handles),
            self.generation,
            seconds,
            f"; replacements pending for slots {self.pending}" if self.pending else "",
        )
        if self.on_membership is not None:
            self.on_membership(
                {
                    "event": "membership",
                    "change": change,
                    "why": why,
                    "world_size": len(self.handles),
                    "previous_world_size": before,
                    "generation": self.generation,
                    "recovery_s": round(seconds, 3),
                    "pending": list(self.pending),
                    "failures": self.failures,
                    **extra,
                }
            )


def _beside_client():
    """Where the controller goes: on this process's node, which training cannot outlive
    anyway (in a Tune trial: the trial's first bundle, the trainable's own)."""
    pg = get_current_placement_group()
    if pg is not None:
        return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def _await(refs: list, settings: Settings) -> tuple[list[tuple[str, object]], float, int | None]:
    """Each call's outcome: ("ok", result), ("broken", err) for a worker whose group broke,
    ("dead", err), ("silent", None) for one that did not answer in time, or ("failed", err)
    for an error of the worker's own, which ends the wait at once (the others: ("", None));
    when the first call that did not succeed was seen (0.0 if none); and the index of the
    failed call that came back last (the slowest member, when the group broke)."""
    outcomes: list = [None] * len(refs)
    seen_at, last = 0.0, None
    index = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    deadline = time.monotonic() + settings.call_timeout_s
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
        if not ready:
            left = max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not ready:
                break
        for ref in ready:
            i = index[ref]
            try:
                outcomes[i] = ("ok", ray.get(ref))
                continue
            except ray.exceptions.RayActorError as err:
                outcomes[i] = ("dead", err)
            except ray.exceptions.RayTaskError as err:
                if not isinstance(getattr(err, "cause", None), GroupBrokenError):
                    outcomes[i] = ("failed", err)
                    return [o or ("", None) for o in outcomes], time.monotonic(), i
                outcomes[i] = ("broken", err)
            last = i
            # a peer is gone or its group broke: the others answer within the collective timeout
            seen_at = seen_at or time.monotonic()
            deadline = min(deadline, seen_at + settings.collective_timeout_s)
    if None in outcomes:
        seen_at = seen_at or time.monotonic()
    return [o or ("silent", None) for o in outcomes], seen_at, last


def _why_lost(kind: str, err, settings: Settings) -> str:
    if kind == "silent":
        return (
            f"silent: no answer within RAYMODULE_COLLECTIVE_TIMEOUT_S="
            f"{settings.collective_timeout_s:g} s after its peers' collective failed"
        )
    return f"{type(err).__name__}: {_first_line(err)}"


def _in_words(err: Exception, what: str) -> Exception:
    """The error to raise for a failed Ray call: raymodule's own error (e.g. a PlacementError,
    already in words) as it is, anything else as a WorkerError saying what failed."""
    cause = getattr(err, "cause", None) or err
    if isinstance(cause, RayModuleError):
        return cause
    return WorkerError(f"{what}: {type(cause).__name__}: {cause}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
