"""The controller's changes of membership (a part of :class:`.actor.Controller`, kept apart to
read on its own): members that leave at a step boundary (shut down with SIGTERM, or on a node
Ray drains), replacements admitted there as they come up, the work split re-weighted there,
the group re-formed after a worker's own error in a step, and the recovery from lost workers
wherever the loss is seen: remove them, wait for the floor if below it, re-form the group of
the rest and bring everyone to the latest step a survivor applied.

:class:`MembershipChanges` is a base of the controller and acts on its state (the membership
and its group, the replicas' journal, the steps in flight) through the controller's calls to
the workers; the decisions are :mod:`.policy`'s. Each change is queued for the client as an
event (the client logs and records it), and the state it moves the controller through is
logged once (:mod:`.states`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from typing import NoReturn

import ray

from ..errors import PlacementError, WorkerLostError, first_line
from . import chunks, policy
from .failures import EveryWorkerLost, StepsFailed
from .group import FormFailed
from .plans import STOP_POLL_S
from .replicas import set_up
from .states import State
from .waits import settle_outcomes

__all__ = ["MembershipChanges"]

log = logging.getLogger(__name__)


class MembershipChanges:
    """The controller's membership changes; see the module's docstring. The attributes and
    the calls to the workers it uses are :class:`.actor.Controller`'s."""

    # -- chosen at a step boundary: leaving, growing, re-weighting ---------------------------------
    def _note_drains(self) -> None:
        """Members on a node that Ray is draining (an autoscaler's preemption or idle drain,
        ``ray drain-node``, a node sent SIGTERM) are to leave at this step boundary, as if
        their worker had been sent SIGTERM."""
        for slot in self._group.draining(self.members.slots):
            self._leaving.setdefault(slot, "its node is being drained")

    def _finish_all(self, loop) -> None:
        """Finishes every step in flight (in a call of ``loop``: :meth:`_finish_for`) and waits
        for every posted call: every member is then at the same step boundary."""
        while self._chunks:
            self._finish_for(loop)
        self._sync()

    def _running_again(self) -> None:
        """The group is re-formed: the run goes on in its new generation."""
        self._enter(
            State.RUNNING,
            f"generation {self.members.generation}, {self.members.world_size} workers",
        )

    def _leave(self, loop) -> None:
        """At a step boundary: removes the members that were shut down (SIGTERM) or whose node
        is drained, once the steps in flight are finished (:meth:`_finish_all`), and re-forms
        the group without them. No step fails and nothing is restored: every member is at the
        same step. It is no failure."""
        self._finish_all(loop)
        reasons = {s: why for s, why in self._leaving.items() if s in self.members.slots}
        self._leaving = {}
        if not reasons:
            return
        leaving = sorted(reasons)
        tic, before = time.monotonic(), self.members.world_size
        why = "; ".join(f"slot {s} {reasons[s]}" for s in leaving)
        survivors = self.members.world_size - len(leaving)
        decision = policy.on_leave(self.limits, survivors, mid_pass=self._loops.in_pass)
        if decision.action is policy.Action.FAIL:
            raise self._fail(WorkerLostError(f"{why}; {decision.reason}"))
        if decision.action is policy.Action.RESTART:
            raise self._fail(
                EveryWorkerLost(f"{why}; {decision.reason or 'every worker was shut down'}")
            )
        self._enter(State.LEAVING, why)
        self._synced.difference_update(leaving)
        wait = decision.action is policy.Action.WAIT

        def re_form_without_them() -> int:
            self._group.remove(leaving)  # raises if their replacements cannot start
            return self._reform(self._wait_for_floor(survivors, wait, why))

        committed = self._re_form_or_recover(re_form_without_them, why)
        if committed is None:
            return
        self._running_again()
        extra = {"left": [f"slot {s}" for s in leaving], "step": committed}
        drained = all(reasons[s] == "its node is being drained" for s in leaving)
        self._announce("drained" if drained else "left", why, before, tic, extra)

    def _grow(self, loop) -> None:
        """At a step boundary: admits replacement workers that are up (asked at most every
        RAYMODULE_ADMIT_INTERVAL_S); the steps in flight are finished first
        (:meth:`_finish_all`)."""
        if time.monotonic() < self._next_poll:
            return
        self._next_poll = time.monotonic() + self.settings.admit_interval_s
        try:
            ready = self._group.ready(0.0)  # starts again a replacement that died starting
        except PlacementError as err:
            raise self._fail(WorkerLostError(str(err))) from err
        admit = ready[: policy.to_admit(self._slot_count, self.members.world_size, len(ready))]
        if not admit:
            return
        tic, before = time.monotonic(), self.members.world_size
        self._finish_all(loop)
        admit = [
            slot for slot in admit if slot in self.members.pending
        ]  # a recovery may have taken it
        if not admit:
            return
        why = f"admitting slots {admit}"
        self._enter(State.GROWING, why)
        committed = self._re_form_or_recover(lambda: self._reform(admit), why)
        if committed is None:
            return
        self._enter(State.RUNNING, "replacements joined")
        joined = ", ".join(f"slot {s}" for s in admit)
        self._announce("grown", f"the workers of {joined} joined", before, tic, {"step": committed})

    def _rebalance(self) -> None:
        """``work_load_list="auto"``: every RAYMODULE_BALANCE_EVERY_STEPS training steps, moves
        work from slower members to faster ones (:func:`.policy.rebalanced`). The steps sent
        from here on are split by the new weights (those in flight keep theirs; each worker
        reshapes after them), and the change is logged and recorded in the run's metrics."""
        bound = [r.batch_size for r in self._replicas.values() if r.shapes is not None]
        change = self._balancer.adjust(list(self.members.slots), bound)
        if change is None:
            return
        self._balancer.accept(change)
        work_load = self._balancer.work_load(self._slot_count)
        for mid, replica in sorted(self._replicas.items()):
            replica.work_load = list(work_load)
            if replica.bind is not None:
                self._post("reshape", mid, per_worker=replica.split(self.members.slots))
        log.info("raymodule controller: work split re-weighted: %s", change)
        self._events.append(
            {"event": "work_load", "step": self.steps_sent, "world_size": self.members.world_size}
            | change
        )

    def _re_form_or_recover(self, re_form, why: str | None) -> int | None:
        """Runs ``re_form()`` (a membership change the controller chose, for ``why``: admitting,
        leaving) and returns the step it brought everyone to; a worker lost meanwhile is
        recovered from as a loss, announced as one, and None is returned. Any other error
        fails the module (:meth:`_cannot_form`), unless ``why`` is None: it is the caller's."""
        self._recovering = True
        try:
            return re_form()
        except StepsFailed as failure:
            lost_meanwhile = failure
        except WorkerLostError:  # the module failed already: every worker lost, or the policy
            raise
        except Exception as err:
            if why is None:
                raise
            raise self._cannot_form(why, err) from err
        finally:
            self._recovering = False
        self._recover(lost_meanwhile)
        return None

    def _cannot_form(self, why: str, err: Exception) -> WorkerLostError:
        """Fails the module (FAILED) when forming its group anew for ``why`` raised ``err``,
        no loss (the join or set-up of a member in step failed, or of a slot's replacement a
        second time: :meth:`_drop_joining`): its members may be half in the new generation,
        and going on could apply steps twice or evict healthy workers. An ``err`` that failed the
        module already (a loss the policy does not go on from, a recovery that could not form
        the group) says why itself: it follows ``why`` as it is, not nested in another "could
        not be formed again"."""
        if getattr(err, "fatal", False):
            return self._fail(WorkerLostError(f"{why}; then {err}"))
        return self._fail(
            WorkerLostError(
                f"{why}; the group could not be formed again ({first_line(err)}). "
                "The module cannot continue"
            )
        )

    # -- a worker's own error in a step ------------------------------------------------------------
    def _re_form_after_error(self, failed: chunks.Chunk, err: Exception) -> None:
        """A worker's own error in one of ``failed``'s training steps (its data, its metric,
        its rows) broke the group: that worker left it, so that its peers waiting at the
        step's sum fail at once instead of after the collective timeout. The group re-forms at
        once with every member, at the step they applied, and the module goes on (fit again,
        score, get_params). Nobody is lost: it is no failure. As native MXNet's fit stops at
        an error, none of that loop's steps after it is applied: its steps in flight (which
        fail on the broken group) are dropped. Another loop's (a callback's ``score``) are
        sent again to the re-formed group, but for a Ray Dataset's pass, whose split is fixed:
        that loop gets ``err``. A worker lost meanwhile is recovered from as a loss (outside
        an elastic run it ends the run, as it would have)."""
        voided, self._chunks = list(self._chunks), deque()
        refs = [ref for chunk in [failed, *voided] for ref in chunk.refs]
        for ref in refs:
            self._in_flight.pop(ref, None)
        self._loops.pass_over(failed.loop)
        again = []  # sent again once the group re-formed
        for chunk in voided:
            if chunk.loop == failed.loop:
                continue
            if chunk.steps[0].stream is not None:
                self._loops.keep(chunk.loop, err)
                self._loops.pass_over(chunk.loop)
            else:
                again.append(chunk)
        tic, before = time.monotonic(), self.members.world_size
        why = f"a worker's error in a training step ({first_line(err)[:200]})"
        self._enter(State.RECOVERING, why)
        generation, committed = self.members.generation, None
        try:
            self._sync_posted()  # a loss seen there is recovered from: the group re-forms
            if self.members.generation == generation:
                committed = self._re_form_or_recover(lambda: self._reform([]), None)
        except EveryWorkerLost:  # fit goes on from its latest checkpoint
            raise
        except Exception as during:  # the policy's failure too: said with the step's error
            raise self._cannot_form(why, during) from during
        # done before the members left the group (calls to an actor run in order): read, so
        # that Ray does not report their errors as unhandled
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            with contextlib.suppress(Exception):
                ray.get(ref)
        if committed is not None:  # else a loss meanwhile was recovered from, and announced
            self._running_again()
            self._announce("re-formed", why, before, tic, {"step": committed})
        if again:
            self._chunks.extend(again)
            self._resend(self.committed)

    # -- recovery from lost workers ----------------------------------------------------------------
    def _recover_here(self, failure: StepsFailed) -> None:
        """A failure seen outside the steps in flight is recovered from where it is seen, and
        the steps in flight are sent again to the re-formed group at once, before any step
        sent after them (their training steps are numbered from the step it is at); inside a
        recovery, that starts again."""
        if self._recovering:
            raise failure
        committed = self._recover(failure)
        if self._chunks:
            self._resend(committed)

    def _recover(self, failure: StepsFailed) -> int:
        """Removes the lost workers (their replacements start), re-forms the group of the
        survivors and the replacements already up, and brings them all to the latest step a
        survivor applied. A worker lost meanwhile is removed too, in the same recovery: the
        change is announced once, with every worker it lost. Returns that step; the steps
        after it are sent again. Storage is never read here: when nobody survived,
        :class:`EveryWorkerLost` leaves it to ``fit``."""
        tic, before, during = failure.seen_at, self.members.world_size, failure.method
        gone: list[int] = []
        why: list[str] = []
        self._enter(State.RECOVERING, str(failure))
        self._recovering = True
        try:
            while True:
                try:
                    committed = self._recover_once(failure, gone, why)
                    break
                except StepsFailed as again:  # another worker lost while recovering
                    failure = again
        except WorkerLostError:  # the module failed already: every worker lost, or the policy
            raise
        except Exception as err:
            said = "; ".join(why) or f"the group broke during {failure.method}()"
            raise self._cannot_form(said, err) from err
        finally:
            self._recovering = False
        self._running_again()
        extra = {"lost": [f"slot {s}" for s in gone], "step": committed, "during": during}
        self._announce("lost" if gone else "re-formed", "; ".join(why), before, tic, extra)
        return committed

    def _recover_once(self, failure: StepsFailed, gone: list[int], why: list[str]) -> int:
        """One attempt of :meth:`_recover`; appends the slots it removes to ``gone`` and says
        why in ``why``."""
        lost = dict(failure.lost)
        self._settle(lost)
        self.broken_in_a_row = 0 if lost else self.broken_in_a_row + 1
        decision = self._decide(lost)
        if decision.action is policy.Action.EVICT:
            rank = failure.slowest if failure.slowest is not None else self.members.world_size - 1
            lost[rank] = f"evicted: {decision.reason}"
            self.broken_in_a_row = 0
            decision = self._decide(lost)
        if lost:
            self.failures += 1
        who = self.members.describe_lost(lost, self._names) if lost else None
        if decision.action in (policy.Action.FAIL, policy.Action.RESTART):
            # RESTART needs new workers from storage: fit() does that on EveryWorkerLost
            error = WorkerLostError if decision.action is policy.Action.FAIL else EveryWorkerLost
            # with the losses seen earlier in this recovery: the error names every worker lost
            said = (
                f"{who or 'the group broke'} during "
                f"{failure.method}(): {'; '.join(lost.values()) or failure.broken}"
            )
            reason = f"; {decision.reason}" if decision.reason else ""
            raise self._fail(error("; ".join([*why, said]) + reason))
        removed = [self.members.slots[r] for r in sorted(lost)]
        why.append(
            f"{who}: {'; '.join(lost.values())}" if lost else f"group broke: {failure.broken}"
        )
        if removed:
            gone.extend(removed)
            self._synced.difference_update(removed)
            self._group.remove(removed)
        live = self.members.world_size - len(removed)
        wait = decision.action is policy.Action.WAIT
        return self._reform(self._wait_for_floor(live, wait, "; ".join(why)))

    def _decide(self, lost: dict) -> policy.Decision:
        # a replacement not yet set up holds none of the run's state: with no member in step
        # left, nobody survived, whoever else is in the group
        holders = set(range(self.members.world_size)) - self._not_in_step() - lost.keys()
        return policy.on_loss(
            self.limits,
            policy.Loss(
                survivors=self.members.world_size - len(lost) if holders else 0,
                lost=len(lost),
                failures_before=self.failures,
                broken_in_a_row=self.broken_in_a_row,
                mid_pass=self._loops.in_pass,
            ),
        )

    def _wait_for_floor(self, live: int, wait: bool, loss: str) -> list[int]:
        """Replacements to admit now: those already up; while below the floor, waits for
        more (bounded by RAYMODULE_MIN_WORKERS_WAIT_S), then fails as the policy says. A
        SIGTERM to the client meanwhile (a preemption notice: it flags the run, whatever call
        it waits for) ends the wait: the group re-forms with the workers that are there, below
        the floor, to finish the steps in flight, and the client checkpoints where it stops.
        The module keeps them: a later fit on it trains with them until replacements join."""
        ready = self._group.ready(0.0)
        start = time.monotonic()
        limit = self.settings.min_workers_wait_s
        report = start  # when the wait is next said
        while wait and live + len(ready) < self.limits.floor:
            self._enter(State.WAITING_FOR_WORKERS, loss)
            now = time.monotonic()
            waited = now - start
            if waited >= limit:
                break
            if self._preempted():
                log.warning(
                    "raymodule: %d of %d workers, below the floor of %d: the client received "
                    "SIGTERM, so the run stops with them instead of waiting for replacements",
                    live + len(ready), self._slot_count, self.limits.floor,
                )  # fmt: skip
                self._enter(State.RECOVERING, f"stopping with {live + len(ready)} workers")
                return ready
            if now >= report:
                log.warning(
                    "raymodule: %d of %d workers, below the floor of %d: waiting for "
                    "replacements (%.0f s of %.0f s)",
                    live + len(ready), self._slot_count, self.limits.floor, waited, limit,
                )  # fmt: skip
                report = now + self.settings.placement_report_interval_s
            step = min(limit - waited, report - now, STOP_POLL_S)
            ready = sorted(set(ready) | set(self._group.ready(step)))
        decision = policy.after_wait(self.limits, live + len(ready), time.monotonic() - start)
        if decision.action is policy.Action.FAIL:
            raise self._fail(WorkerLostError(f"{loss}; {decision.reason}"))
        self._enter(State.RECOVERING, f"re-forming with {live + len(ready)} workers")
        return ready

    def _reform(self, admit: list[int]) -> int:
        """Forms the next generation's group of the members and the ready replacements of
        ``admit`` (slots), sets up every module on each worker not yet in step (admitted now,
        or earlier by a re-forming that a later loss cut short) from the journal, splits every
        module's batch anew and brings everyone to the latest step a member in step applied.
        A member lost meanwhile raises :class:`StepsFailed` (for :meth:`_recover`), and so does
        a worker not yet in step whose own call failed as the group formed or as it was set up
        (:meth:`_drop_joining`)."""
        self._group.admit(admit)
        try:
            self.members, lost = self._group.form(self._backend)
        except FormFailed as err:
            self.members = self._group.membership()  # of the generation that failed to form
            self._drop_joining(err.errors, err)
        if lost:
            rank_of = self.members.rank_of()
            raise StepsFailed("re-form", {rank_of[slot]: why for slot, why in lost.items()}, "")
        new = sorted(self._not_in_step())
        old = [rank for rank in range(self.members.world_size) if rank not in new]
        if not old:
            raise self._fail(EveryWorkerLost("every worker holding the run's state was lost"))
        applied = self._call("applied", ranks=old)
        committed = max(applied)
        source = old[applied.index(committed)]
        behind = [r for r, a in zip(old, applied) if a < committed] + new
        set_up(
            self._replicas, self.members.slots, old=old, new=new, behind=behind, source=source,
            committed=committed, post=self._post, submit=self._submit,
        )  # fmt: skip
        if new:
            self._post("set_metric", self._loops.metric, ranks=new)
            self._check_set_up(new)
        self._sync()
        self._synced = set(self.members.slots)
        self._refused_join -= self._synced
        self.steps_sent = self.committed = committed
        return committed

    def _check_set_up(self, new: list[int]) -> None:
        """Waits for the calls posted to the ``new`` ranks (their set-up), each worker's in
        turn; those whose own calls failed are dropped (:meth:`_drop_joining`), the others
        join."""
        failed: dict[int, Exception] = {}
        for rank in new:
            try:
                self._sync(ranks=[rank])
            except StepsFailed:  # a loss: recovered from by the recovery this re-forming is in
                raise
            except Exception as err:
                failed[rank] = err
        if failed:
            errors = {
                self.members.slots[rank]: f"its set-up failed: {first_line(err)[:300]}"
                for rank, err in failed.items()
            }
            self._drop_joining(errors, next(iter(failed.values())))

    def _drop_joining(self, errors: dict[int, str], err: Exception) -> NoReturn:
        """Raises :class:`StepsFailed` losing the workers not yet in step among ``errors``
        (slot: why its call failed as its group formed or it was set up: a replacement on a
        node it cannot reach the others from, say): they are removed and started again, once
        per slot until one joins. ``err`` is raised instead when none is, outside an elastic
        run, or when one of those slots failed so before: a node that fails every replacement
        on it would stall the members at each try (up to the collective timeout) for as long
        as failures are allowed, and Ray starts a slot's replacement on its bundle's node."""
        joining = {s: why for s, why in errors.items() if s not in self._synced}
        if not joining or not self.limits.elastic or joining.keys() & self._refused_join:
            raise err
        self._refused_join.update(joining)
        rank_of = self.members.rank_of()
        lost = {rank_of[slot]: why for slot, why in joining.items()}
        raise StepsFailed("re-form", lost, "") from err

    def _settle(self, lost: dict[int, str]) -> None:
        """Waits for the survivors' calls in flight (they fail at once: their group is
        broken). A survivor whose call says it died, or that does not answer within
        :func:`.waits.silence_s`, is lost too, and so is a member whose death another's call
        says (:func:`.waits.classify_outcomes`). In a Ray Dataset's pass nobody is waited
        for: every worker restarts whatever they say."""
        unchecked, self._unchecked = self._unchecked, []
        in_flight, self._in_flight = self._in_flight, {}
        if self._loops.in_pass:
            return
        waiting = {ref: rank for ref, (rank, _) in in_flight.items() if rank not in lost}
        waiting.update({ref: rank for rank, ref, _ in unchecked if rank not in lost})
        outcomes = settle_outcomes(list(waiting), self.settings)
        _, found, _, _ = self._classify(outcomes, list(waiting.values()))
        for rank, why in found.items():
            lost.setdefault(rank, why)

    def _announce(self, change: str, why: str, before: int, tic: float, extra: dict) -> None:
        """Queues a membership change for the client (:meth:`view`), which logs and records
        it."""
        if self._balancer is not None:  # its tally was of the members before
            self._balancer.reset()
        recovery_s = time.monotonic() - tic
        self._events.append(
            self.members.change_event(change, why, before, recovery_s, self.failures, extra)
        )
