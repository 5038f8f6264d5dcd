"""The background checkpoint writer: checkpoints are written while training goes on.

The files are written by a Ray task given the worker's snapshot by reference (its bytes never
pass through the training process), and committed here, by the run that owns the folder. For
object storage the task runs on the node that holds the snapshot, the worker's: the bytes go
from there to storage, not across the cluster first (and from this node when that node cannot
write them); a folder on this machine is written from this node, as the commit is.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time

import ray
from ray.experimental import get_object_locations
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..errors import CheckpointError
from ..lease import LeaseLost
from ..storage import Folder
from .format import LatestNotWritten, folder_name, stage_files, write

__all__ = ["CheckpointWriter"]

log = logging.getLogger(__name__)

_INLINE_BYTES = 100 * 1024  # Ray keeps smaller objects in their owner's memory, on no node
_WRITER_LOST = (  # the task's process or node, not necessarily the snapshot
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.OutOfMemoryError,
)

# what the staging task's snapshot argument raises when it was lost: its worker died before
# making it (or was killed for memory), or its node or owner died with it
_COPY_LOST = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, *_WRITER_LOST)

_SKIPS_COUNTED = (
    " (checkpoints are due faster than the storage commits them; later skips are logged at "
    "INFO and counted when the run ends; a larger checkpoint_every takes fewer)"
)


class _GivenUp(CheckpointError):
    """The run gave up waiting for this checkpoint (:meth:`CheckpointWriter.settle` timed out)
    and went on from an earlier one: it is not committed, unless it already was
    (``committed``)."""


class _Outcome(enum.Enum):
    """What became of a checkpoint the writer took up."""

    COMMITTED = "committed"
    FAILED = "failed"  # counted as a failure: the storage's, or not to be committed
    LOST = "lost"  # its copy was lost with its workers, or not waited for (the run gave up)
    LATE = "late"  # its copy did not come within RAYMODULE_CHECKPOINT_SNAPSHOT_TIMEOUT_S
    GIVEN_UP = "given up"  # not committed within the time settle() waits: the run went on
    # (committed all the same when its commit request was already on its way: said so)


@ray.remote(num_cpus=0, max_retries=0)
def _stage_task(run: Folder, snapshot, info: dict) -> tuple[dict | None, str]:
    """:func:`stage_files` as a Ray task, given the snapshot's reference: the manifest comes
    back, and the node the files were written from."""
    return stage_files(run, snapshot, info), ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=0)
def _ready_to_stage() -> None:
    """Starts a worker process on this node that has imported this module, and with it what
    :func:`stage_files` needs (not MXNet: :mod:`raymodule.ndfile` reads the parameters); Ray
    keeps it for the tasks that write, so the first checkpoint does not wait for a process."""


class CheckpointWriter:
    """Writes checkpoints in a background thread, in order, while training goes on.

    :meth:`submit` hands over a worker's snapshot (an ``ObjectRef``, taken at a step boundary,
    so all workers were at the same step) and returns at once. While one checkpoint is being
    written, the newest submitted one waits and an older waiting one gives way (a newer state
    supersedes it), so memory stays bounded and training never waits for storage. The one that
    gave way last is held beside the newest, and written instead should the newest's copy be
    lost with its workers or not be waited for (:meth:`settle`, a failed run's :meth:`close`),
    when its own copy has come. So up to four copies stay in Ray's object store: the one being
    written and the one it superseded, the one waiting and the one it superseded. A write that
    fails is retried with exponential backoff; a checkpoint that still fails is logged, and once
    more than ``failures_tolerated`` fail in a row, the next :meth:`submit` (or :meth:`close`)
    raises ``CheckpointError``. ``verified`` says of checkpoints already read (when the run
    resumed) whether they verify; the writer's tidying reads the others once (see
    :func:`~raymodule.checkpoint.format.write`).
    """

    def __init__(self, run: Folder, keep: int, settings, check_owner=None, verified=None):
        self.run = run
        self.keep = keep
        self.check_owner = check_owner
        self.attempts = settings.checkpoint_attempts
        self.backoff_s = settings.checkpoint_backoff_s
        self.failures_tolerated = settings.checkpoint_failures_tolerated
        self.snapshot_timeout_s = settings.checkpoint_snapshot_timeout_s
        self.lookup_timeout_s = settings.checkpoint_lookup_timeout_s
        self.close_timeout_s = settings.checkpoint_close_timeout_s
        self._committed: list[dict] = []
        # whether each checkpoint verifies, as read when the run resumed and since
        self._verified: dict[str, bool] = dict(verified or {})
        self._staged_on: str | None = None  # the node the last files were written from
        self._failed_nodes: set[str] = set()  # nodes that could not write files, warned of
        self.failures_in_row = 0
        self.skipped = 0  # checkpoints due while the one before was still being written
        self._skips_said = False  # the first skip is a warning; the others are counted
        self._error: CheckpointError | None = None
        self._waiting: tuple | None = None  # (snapshot, info) of the next to write
        self._superseded: tuple | None = None  # the one it replaced: see the class's docstring
        self._busy = False
        self._closing = False
        self._abandon = False
        self._given_up = 0  # how many times settle() gave up on the checkpoints handed over
        self._taken_up = 0  # _given_up when the writer took up the checkpoints it writes
        self._late: set[str] = set()  # committed after the give-up: the restart's replace them
        self._cond = threading.Condition()
        self._thread = threading.Thread(
            target=self._loop, name="raymodule-checkpoint-writer", daemon=True
        )
        self._thread.start()
        self._warm = None  # the process made ready for the first write, while it starts
        if ray.is_initialized():
            self._warm = _ready_to_stage.options(scheduling_strategy=_this_node()).remote()

    def submit(self, snapshot: ray.ObjectRef, info: dict) -> None:
        with self._cond:
            self._raise_if_failed()
            if self._waiting is not None:
                # said once, then counted: at every skip it would fill a progress bar's screen
                self.skipped += 1
                log.log(
                    logging.INFO if self._skips_said else logging.WARNING,
                    "checkpoint at step %d skipped: the one before is still being written%s",
                    self._waiting[1]["global_step"],
                    "" if self._skips_said else _SKIPS_COUNTED,
                )
                self._skips_said = True
                self._superseded = self._waiting
            self._waiting = (snapshot, info)
            self._cond.notify_all()

    def take_committed(self) -> list[dict]:
        """The checkpoints committed since the last call: name and seconds to write."""
        with self._cond:
            done, self._committed = self._committed, []
        return done

    def close(self, abandon: bool = False) -> None:
        """Writes what is waiting, stops the thread, and raises if too many failed in a row
        or the writing is not done within RAYMODULE_CHECKPOINT_CLOSE_TIMEOUT_S. With
        ``abandon`` (training failed), a snapshot its worker has not delivered yet is not
        waited for: that worker may be the lost one."""
        with self._cond:
            self._closing = True
            self._abandon = abandon
            self._cond.notify_all()
        self._thread.join(timeout=self.close_timeout_s)
        if self.skipped > 1:
            log.warning(
                "%d checkpoints of %s were skipped in all, each due while the one before was "
                "still being written",
                self.skipped,
                self.run,
            )
        with self._cond:
            if self._thread.is_alive():
                raise CheckpointError(
                    f"the last checkpoints of {self.run} were not written within "
                    f"{self.close_timeout_s:g} s (RAYMODULE_CHECKPOINT_CLOSE_TIMEOUT_S); the "
                    "latest committed checkpoint is the one before them. Check the storage"
                )
            self._raise_if_failed()

    def settle(self) -> None:
        """Waits until the checkpoints handed over are committed or given up, at most
        RAYMODULE_CHECKPOINT_CLOSE_TIMEOUT_S; a snapshot its worker has not delivered is not
        waited for (that worker may be lost). For a run that goes on from its latest
        checkpoint: one whose copy was taken is committed first. Those still not committed
        when the time is up are given up (:meth:`_give_up`)."""
        deadline = time.monotonic() + self.close_timeout_s
        with self._cond:
            self._abandon = True
            try:
                while self._waiting is not None or self._busy:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._give_up()
                        break
                    self._cond.wait(timeout=left)
            finally:
                self._abandon = False

    def _give_up(self) -> None:
        """After :meth:`settle` timed out: the checkpoint being written is not committed
        should its storage answer later (its next check of the owner stops it; a commit
        request already on its way still lands, see :meth:`_write`), nor is the one waiting
        written. The run goes on from the latest one committed, and a late commit of the run
        it left would otherwise follow its restart (taking the name of a step it is to write
        again). Called holding the lock."""
        self._given_up += 1
        self._waiting = self._superseded = None
        log.warning(
            "checkpoints not committed within %g s (RAYMODULE_CHECKPOINT_CLOSE_TIMEOUT_S) are "
            "given up: the run goes on from the latest one committed. Check the storage",
            self.close_timeout_s,
        )

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._waiting is None and not self._closing:
                    self._cond.wait()
                if self._waiting is None:
                    return
                (snapshot, info), self._waiting = self._waiting, None
                superseded, self._superseded = self._superseded, None
                self._taken_up = self._given_up  # what _give_up() since then stops
                if self._error is not None:  # training stops at its next submit or close
                    log.warning(
                        "checkpoint at step %d not written: the run's checkpoints already "
                        "failed too often", info["global_step"],
                    )  # fmt: skip
                    self._cond.notify_all()
                    continue
                self._busy = True
            try:
                outcome = self._write_or_fail(snapshot, info)
                if outcome is _Outcome.LOST and superseded is not None:
                    self._write_superseded(*superseded, info["global_step"])
            except Exception as err:  # noqa: BLE001 - counted as a failure, never a silent stop
                self._failed(info["global_step"], f"{type(err).__name__}: {err}")
            finally:
                snapshot = superseded = None  # their copies are not held while the thread waits
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _write_superseded(self, snapshot: ray.ObjectRef, info: dict, newer: int) -> None:
        """Writes the checkpoint that the one at step ``newer``, whose copy was lost,
        superseded, if its own copy came (it is not waited for)."""
        if not _delivered(snapshot):
            return
        log.warning(
            "checkpoint at step %d: writing the one at step %d instead, which it had superseded",
            newer, info["global_step"],
        )  # fmt: skip
        if self._write_or_fail(snapshot, info) is _Outcome.COMMITTED:
            with self._cond:
                self.skipped -= 1  # not skipped after all

    def _write_or_fail(self, snapshot: ray.ObjectRef, info: dict) -> _Outcome:
        """:meth:`_write`, its errors counted as a failure (never a silent stop)."""
        try:
            return self._write(snapshot, info)
        except Exception as err:  # noqa: BLE001
            self._failed(info["global_step"], f"{type(err).__name__}: {err}")
            return _Outcome.FAILED

    def _write(self, snapshot: ray.ObjectRef, info: dict) -> _Outcome:
        """Writes and commits one checkpoint, trying again on storage errors: COMMITTED, or
        FAILED (counted), or LOST when its copy was lost with its workers or the run gave up
        waiting for them, or LATE when it did not come within the snapshot timeout, or
        GIVEN_UP when the run gave up waiting for its commit (:meth:`_give_up`)."""
        step = info["global_step"]
        deadline = time.monotonic() + self.snapshot_timeout_s
        missing = None  # why it is not written: its worker is silent, or the run gave up
        while missing is None and not _delivered(snapshot):  # one that came is written
            if self._abandon:
                missing = _Outcome.LOST
            elif time.monotonic() >= deadline:
                missing = _Outcome.LATE
            else:
                ray.wait([snapshot], timeout=min(1.0, self.snapshot_timeout_s), fetch_local=False)
        if missing is not None:  # not the storage's failure
            log.warning("checkpoint at step %d skipped: its snapshot did not come", step)
            return missing
        tic = time.monotonic()
        finish = False  # an attempt before committed it, and failed at latest
        late = folder_name(step) in self._late  # a given-up one of this step was committed
        given_up = self._taken_up
        check_owner = self._owner_check(given_up)
        for attempt in range(1, self.attempts + 1):
            try:  # given up since: write() stops at its first check_owner()
                name = write(
                    self.run,
                    snapshot,
                    info,
                    self.keep,
                    check_owner=check_owner,
                    stage=self._stage_beside,
                    finish=finish,
                    verified=self._verified,
                    drop_newer=late,  # the restart's replaces it
                )
            except CheckpointError as err:
                committed = err.committed or (folder_name(step) if finish else None)
                if isinstance(err, _GivenUp):
                    if committed is None:
                        break
                    self._late.add(committed)  # its commit request was already on its way
                    log.warning(
                        "checkpoint %s was committed as the run gave up waiting for it (its "
                        "commit was already on its way); a restart's own checkpoint of that "
                        "step replaces it", f"{self.run}/{committed}",
                    )  # fmt: skip
                    return _Outcome.GIVEN_UP
                why = str(err)  # not to be committed: trying again changes nothing
                if committed is not None:  # found as it tidied (a lost lease)
                    why += f" ({self.run}/{committed} was committed before; no more deleted)"
                self._failed(step, why, fatal=isinstance(err, LeaseLost))
                return _Outcome.FAILED
            except OSError as err:
                finish = finish or isinstance(err, LatestNotWritten)  # committed: ours
                if attempt < self.attempts:
                    delay = self.backoff_s * 2 ** (attempt - 1)
                    log.info(
                        "checkpoint at step %d: attempt %d of %d failed (%s); retrying in %.1f s",
                        step, attempt, self.attempts, err, delay,
                    )  # fmt: skip
                    time.sleep(delay)
                    continue
                self._failed(step, f"{self.attempts} attempts failed, the last with: {err}")
                return _Outcome.FAILED
            if name is None:  # workers were lost before it: the steps run again
                log.warning("checkpoint at step %d skipped: workers were lost before it", step)
                return _Outcome.LOST
            seconds = time.monotonic() - tic
            log.info(
                "checkpoint %s committed in %.2f s (its files written from node %s)",
                f"{self.run}/{name}", seconds, self._staged_on,
            )  # fmt: skip
            self._late.discard(name)
            with self._cond:
                self.failures_in_row = 0
                self._committed.append({"name": name, "seconds": round(seconds, 3)})
            return _Outcome.COMMITTED
        log.warning("checkpoint at step %d not committed: the run gave up waiting for it", step)
        return _Outcome.GIVEN_UP

    def _owner_check(self, given_up: int):
        """The check :func:`write` makes before its writes, its commit and each delete: the
        lease's, and that the run did not give this checkpoint up (:meth:`_give_up`) since
        ``given_up``."""

        def check() -> None:
            if self._given_up != given_up:
                raise _GivenUp("the run gave up waiting for it")
            if self.check_owner is not None:
                self.check_owner()

        return check

    def _stage_beside(self, run: Folder, snapshot: ray.ObjectRef, info: dict):
        """:func:`stage_files` as a Ray task beside the snapshot: the bytes go from the
        worker to storage through the object store, not through this process's memory.
        Object storage is written from the node that holds the snapshot
        (:func:`_snapshot_node`); should that fail, from this node at once (the storage was
        checked from here; another node's keys or endpoint may differ). A local folder is
        written from this node. The task sees the environment Ray started with on its node
        (storage credentials come from there). Bounded by
        RAYMODULE_CHECKPOINT_CLOSE_TIMEOUT_S a try; its errors are raised as stage_files'
        own."""
        if self._warm is not None:  # the first write waits for it rather than start another
            ray.wait([self._warm], timeout=self.close_timeout_s)
            self._warm = None
        here = ray.get_runtime_context().get_node_id()
        there = None if run.on_this_machine else _snapshot_node(snapshot, self.lookup_timeout_s)
        if there is None or there == here:
            return self._stage_on(here, False, run, snapshot, info)
        try:
            return self._stage_on(there, True, run, snapshot, info)
        except OSError as err:
            log.log(
                logging.INFO if there in self._failed_nodes else logging.WARNING,
                "checkpoint at step %d: its files could not be written to %s from node %s, "
                "which holds the worker's copy (%s); writing them from the training "
                "process's node",
                info["global_step"], self.run, there, err,
            )  # fmt: skip
            self._failed_nodes.add(there)
            return self._stage_on(here, False, run, snapshot, info)

    def _stage_on(self, node: str, soft: bool, run: Folder, snapshot, info: dict):
        """:func:`stage_files` as a Ray task on ``node`` (with ``soft``, anywhere should it be
        gone); the manifest, or None when the snapshot was lost with the worker that made it
        (or its node, or the controller that owns it)."""
        where = NodeAffinitySchedulingStrategy(node, soft=soft)
        task = _stage_task.options(scheduling_strategy=where).remote(run, snapshot, info)
        try:
            made, self._staged_on = ray.get(task, timeout=self.close_timeout_s)
            return made
        except ray.exceptions.RayActorError:
            return None  # the worker that made the snapshot was lost
        except ray.exceptions.GetTimeoutError:
            # stopped: it would hold the snapshot in the object store, and may write the
            # checkpoint's files after the run released its folder
            with contextlib.suppress(Exception):
                ray.cancel(task, force=True)
            raise OSError(
                f"writing the files took more than {self.close_timeout_s:g} s "
                "(RAYMODULE_CHECKPOINT_CLOSE_TIMEOUT_S)"
            ) from None
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, _COPY_LOST):  # the snapshot's, as the task took it up
                return None
            if isinstance(cause, (OSError, CheckpointError)):
                raise cause from None
            why = f"writing the files failed: {type(cause).__name__}: {cause}"
            raise CheckpointError(why) from None
        except _WRITER_LOST as err:  # the snapshot may still be there: tried again
            raise OSError(f"the process writing the files was lost: {type(err).__name__}") from None
        except ray.exceptions.RayError as err:
            raise CheckpointError(f"the snapshot was lost: {type(err).__name__}") from None

    def _failed(self, step: int, why: str, fatal: bool = False) -> None:
        with self._cond:
            self.failures_in_row += 1
            failures = self.failures_in_row
            log.warning(
                "checkpoint at step %d failed (%d in a row; training goes on through %d): %s",
                step, failures, self.failures_tolerated, why,
            )  # fmt: skip
            if fatal:  # another run owns the folder: nothing more may be written
                self._error = CheckpointError(why)
            elif failures > self.failures_tolerated:
                self._error = CheckpointError(
                    f"{failures} checkpoints in a row could not be written to {self.run}; the "
                    f"last: {why}. Check the storage (RAYMODULE_CHECKPOINT_FAILURES_TOLERATED="
                    f"{self.failures_tolerated})"
                )


def _delivered(snapshot: ray.ObjectRef) -> bool:
    """Whether the worker delivered ``snapshot`` (or its call failed), without fetching it."""
    return bool(ray.wait([snapshot], timeout=0, fetch_local=False)[0])


def _this_node() -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def _snapshot_node(snapshot: ray.ObjectRef, timeout_s: float) -> str | None:
    """The node whose object store holds ``snapshot`` (the node of the worker that made it),
    or None: a snapshot under Ray's 100 KB lives in its owner's memory, on no node, and one
    whose owner does not answer within ``timeout_s`` (RAYMODULE_CHECKPOINT_LOOKUP_TIMEOUT_S)
    is written from here. A large one may be listed on its node a moment after it is ready:
    asked again until then, within the same bound."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            found = get_object_locations([snapshot], timeout_ms=max(1, int(timeout_s * 1000)))
        except Exception as err:  # noqa: BLE001 - where to write from is only a preference
            log.debug("where the snapshot is could not be asked (%s): written from here", err)
            return None
        place = found.get(snapshot) or {}
        nodes, size = place.get("node_ids") or [], place.get("object_size")
        if nodes or (size is not None and size < _INLINE_BYTES):
            return nodes[0] if nodes else None
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)
