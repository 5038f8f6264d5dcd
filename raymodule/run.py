"""``RunConfig`` and the run folder a ``fit(..., run=...)`` call trains in.

A run is ``<storage>/<name>``: its checkpoints (see :mod:`raymodule.checkpoint`) and
``metrics.jsonl``, one JSON line per epoch. :class:`Run` opens the folder before training
starts (so storage that cannot be used fails first, naming the location and the cause), decides
where training resumes, hands snapshots to the background checkpoint writer and records the
epochs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass

from . import checkpoint
from .checkpoint import Checkpoint, CheckpointWriter
from .errors import CheckpointError, Preempted
from .lease import Lease
from .preemption import SigtermNotice
from .storage import Folder, is_uri, redact, with_suffix

__all__ = ["RunConfig", "Run"]

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
METRICS_MAX_BYTES = 256 * 1024**2
"""The largest ``metrics.jsonl`` read (a line per epoch: a few hundred bytes each)."""
_RESUME = ("auto", "never", "must")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class RunConfig:
    """Where and how a ``fit`` call checkpoints, and whether it resumes.

    Args:
        name: the run's name; ``storage/name`` is its folder (:attr:`location`). None makes
            a new name here, logged.
        storage: a local path (made absolute here) or a URI that
            ``pyarrow.fs.FileSystem.from_uri`` accepts, query options included. Keys come from
            the usual AWS variables (or the URI) and are never logged.
        checkpoint_every: batches between checkpoints; 0 checkpoints only at epoch ends
            (there is always a checkpoint at the end of each epoch).
        keep: committed checkpoints kept, counting only those that verify; older ones are
            deleted after a newer one commits.
        resume: ``"auto"`` continues from the latest committed checkpoint if there is one,
            ``"never"`` refuses to touch an existing run, ``"must"`` fails if there is none.
            A resume is checked against the run (the symbol's parameters, the optimizer type,
            the global batch size, the data's length: :mod:`raymodule.checkpoint.continuity`); the
            learning rate, other hyperparameters and the schedule's settings are the resuming
            ``fit``'s, and the schedule goes on from the restored update count.
        min_workers: the elastic floor (None: every context).
        max_failures: failures tolerated over the run, -1 for unlimited. A failure is one
            event in which workers were lost together (a killed process, a lost node with
            every worker on it, the controller, a worker evicted for holding the group up).
    """

    name: str | None = None
    storage: str = "./raymodule_runs"
    checkpoint_every: int = 0
    keep: int = 2
    resume: str = "auto"
    min_workers: int | None = None
    max_failures: int = 3

    def __post_init__(self):
        def bad(field: str, rule: str) -> ValueError:
            return ValueError(f"RunConfig({field}={getattr(self, field)!r}): {rule}")

        if self.name is None:
            self.name = time.strftime("run-%Y%m%d-%H%M%S-") + secrets.token_hex(2)
            log.warning("RunConfig: no name given; this run is %r", self.name)
        elif not isinstance(self.name, str) or not _NAME.match(self.name):
            raise bad("name", "use letters, digits, '.', '_' and '-' (no '/'), or None")
        if not isinstance(self.storage, str) or not self.storage:
            raise bad("storage", "expected a local path or a URI such as s3://bucket/runs")
        if not is_uri(self.storage):
            self.storage = os.path.abspath(self.storage)
        if not _is_int(self.checkpoint_every) or self.checkpoint_every < 0:
            raise bad("checkpoint_every", "must be an integer >= 0 (0: only at epoch ends)")
        if not _is_int(self.keep) or self.keep < 1:
            raise bad("keep", "must be an integer >= 1")
        if self.resume not in _RESUME:
            raise bad("resume", f"must be one of {', '.join(map(repr, _RESUME))}")
        if self.min_workers is not None and (not _is_int(self.min_workers) or self.min_workers < 1):
            raise bad("min_workers", "must be an integer >= 1, or None for every context")
        if not _is_int(self.max_failures) or self.max_failures < -1:
            raise bad("max_failures", "must be an integer >= 0, or -1 for unlimited")

    def __repr__(self) -> str:  # the storage redacted: a URI may hold keys
        shown = dict(vars(self), storage=redact(self.storage))
        return "RunConfig(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    @property
    def location(self) -> str:
        """The run's folder, ``<storage>/<name>`` (a query stays at the end of a URI)."""
        return with_suffix(self.storage, "/" + self.name)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Run:
    """One ``fit`` call's run folder: where it resumes, its checkpoints and its metrics."""

    def __init__(self, config: RunConfig, settings, static: dict):
        """Opens the run folder and takes its lease (:mod:`raymodule.lease`); raises before
        training if storage cannot be used, another live run of the same name owns the folder,
        or the ``resume`` rule forbids this run. ``static`` is what every checkpoint records about
        the module (``world_size``, ``work_load_list``)."""
        self.config = config
        self._settings = settings
        # resolved from the storage the user gave, so an unusable one is named as given
        self.folder = Folder(config.storage).child(config.name)
        try:
            self.folder.check_writable()
        except OSError as err:
            raise CheckpointError(f"cannot use the run folder {self.folder}: {err}") from None
        self.lease = Lease(self.folder, config.name, settings.lease_ttl_s)
        self.lease.acquire()  # before anything is read to resume from, or written
        try:
            self.resume_from, surveyed = self._resume_point()
            self._static = static
            self._metrics = MetricsFile(self.folder, self._read_metrics(), self.lease)
            self.writer = CheckpointWriter(
                self.folder, config.keep, settings, self.lease.check, surveyed
            )
        except BaseException:
            self.lease.release()
            raise
        self._sigterm = SigtermNotice()

    def _resume_point(self) -> tuple[Checkpoint | None, dict[str, bool]]:
        """The checkpoint the run goes on from (None: it starts afresh), and whether each
        checkpoint read to find it verifies (by name: for the writer's tidying)."""
        if self.config.resume == "never":
            existing = checkpoint.checkpoint_names(self.folder)
            if existing:
                raise CheckpointError(
                    f"run {self.config.name!r} already exists at {self.folder} ({len(existing)} "
                    "checkpoints) and resume='never'; choose another name, delete the run, or "
                    "pass resume='auto' to continue it"
                )
            return None, {}
        found, rejected = checkpoint.survey(self.folder)
        surveyed = {name: False for name, _ in rejected}
        if found is not None:
            surveyed[found.name] = True
        if found is None and self.config.resume == "must":
            raise CheckpointError(
                f"resume='must' but run {self.config.name!r} at {self.folder} has no committed "
                "checkpoint that verifies (see the warnings above for any that were rejected)"
            )
        if found is None and rejected:  # starting afresh would delete them at the first commit
            reasons = "; ".join(f"{name}: {why}" for name, why in rejected)
            raise CheckpointError(
                f"run {self.config.name!r} at {self.folder} holds {len(rejected)} committed "
                f"checkpoints and none verifies, so it neither resumes nor starts afresh over "
                f"them ({reasons}). To start over, pass resume='never' with a new name, or "
                "delete the run's folder by hand"
            )
        if found is not None:
            log.info(
                "run %r resumes from %s: epoch %d, batch %d, step %d",
                self.config.name, found.name, found.epoch, found.batch, found.global_step,
            )  # fmt: skip
        return found, surveyed

    def checkpoint(self, snapshot, files: dict, **position) -> None:
        """Hands a worker's snapshot and the module's own files (its symbols) to the
        background writer (raises if too many checkpoints in a row failed). ``position`` is
        ``epoch``, ``batch`` and ``global_step``, and what a resume is checked against:
        ``batch_size`` and ``batches_per_epoch`` (see :mod:`raymodule.checkpoint.continuity`)."""
        self.writer.submit(snapshot, dict(self._static, files=files, **position))

    def latest(self) -> Checkpoint | None:
        """The run's newest committed checkpoint that verifies, as storage has it once the
        checkpoints handed to the writer are committed or given up (every worker was lost:
        one whose copy was taken is still the run's)."""
        self.writer.settle()
        return checkpoint.latest(self.folder)

    def record_epoch(self, entry: dict) -> None:
        """Appends one line to ``metrics.jsonl`` (object stores cannot append: rewritten)."""
        self._record(dict(entry, checkpoints=self.writer.take_committed()))

    def record_event(self, entry: dict) -> None:
        """Appends a line that is not an epoch's (a membership change) to ``metrics.jsonl``;
        ``entry["during_epoch"]`` says when it happened."""
        self._record(entry)

    def _record(self, entry: dict) -> None:
        entry = dict(entry, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self._metrics.append(json.dumps(entry))

    def _read_metrics(self) -> list[str]:
        """The lines of ``metrics.jsonl`` this run carries on: every one when it starts
        afresh (they are not its to drop), those before the resume point when it resumes."""
        try:
            data = self.folder.read(METRICS, limit=METRICS_MAX_BYTES)
        except FileNotFoundError:
            return []
        except OSError as err:
            if self.resume_from is None:  # rewriting it would lose what it holds
                raise CheckpointError(
                    f"run {self.config.name!r} starts afresh, but its {METRICS} cannot be read "
                    f"to be carried on ({err}); move it away or choose another name"
                ) from None
            log.warning("%s is not carried on: %s", METRICS, err)
            return []
        if self.resume_from is None:
            return data.decode(errors="replace").splitlines()
        kept = []
        for line in data.decode(errors="replace").splitlines():
            try:  # epochs after the resume point are trained again; other lines are dropped
                entry = json.loads(line)
                if entry.get("epoch", entry.get("during_epoch")) < self.resume_from.epoch:
                    kept.append(line)
            except (ValueError, AttributeError, TypeError):
                continue
        return kept

    @property
    def preempted(self) -> bool:
        """Whether this process received SIGTERM while the run trained (see
        :mod:`raymodule.preemption`): training stops at the next batch with a checkpoint."""
        return self._sigterm.received

    def __enter__(self) -> Run:
        self._sigterm.install()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            # a preempted run waits for the checkpoint it stopped with; after another failure,
            # a snapshot a worker has not delivered is not waited for (that worker may be lost)
            stopped = exc_type is not None and issubclass(exc_type, Preempted)
            self.close(raise_failures=exc_type is None or stopped)
            if stopped:  # said here: the signal delivered next may end the process
                log.warning("raymodule: %s", exc)
        finally:
            self._sigterm.restore()

    def close(self, raise_failures: bool = True) -> None:
        """Waits for the checkpoint being written; raises if too many failed in a row (or only
        logs it, when training already failed for another reason: then a snapshot that a
        worker has not delivered is not waited for), then releases the run folder's lease."""
        try:
            try:
                self.writer.close(abandon=not raise_failures)
            finally:
                self._metrics.flush(self._settings.checkpoint_close_timeout_s)
        except CheckpointError as err:
            if raise_failures:
                raise
            log.error("%s", err)
        finally:
            self.lease.release()


class MetricsFile:
    """A run's ``metrics.jsonl``, rewritten whole (object stores cannot append) from a thread
    of its own, so that training never waits on storage for it: lines appended while a write
    is under way go with the next one. A write that fails is made again with the next line,
    or at :meth:`flush`. A run that lost its folder writes nothing more there and raises
    :class:`raymodule.lease.LeaseLost` at the next line or at :meth:`flush`."""

    def __init__(self, folder: Folder, lines: list[str], lease: Lease):
        self._folder, self._lines, self._lease = folder, lines, lease
        self._lock = threading.Lock()
        self._writing = False  # a write is under way or due (guarded by _lock)
        self._dirty = False  # lines not written yet (guarded by _lock)
        self._write_failed = False  # the last write failed: made again at flush (guarded too)
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None  # a daemon: a stalled store delays no exit

    def append(self, line: str) -> None:
        self._lease.known_lost()
        self._raise_failure()
        with self._lock:
            self._lines.append(line)
            self._dirty = True
            self._start_writing()

    def _start_writing(self) -> None:
        """Starts the thread that writes the lines, unless it runs (call with ``_lock``)."""
        if not self._writing:
            self._writing = True
            self._thread = threading.Thread(
                target=self._write, name="raymodule-metrics", daemon=True
            )
            self._thread.start()

    def _write(self) -> None:
        while True:
            with self._lock:
                if not self._dirty or self._failure is not None:
                    self._writing = False
                    return
                self._dirty = self._write_failed = False
                data = ("\n".join(self._lines) + "\n").encode()
            try:
                self._lease.check()  # a run that lost its folder writes nothing more there
                self._folder.write(METRICS, data)
            except OSError as err:  # storage that fails now: written again later, not now
                log.warning("could not write %s: %s", METRICS, err)
                with self._lock:
                    self._dirty = self._write_failed = True
                    self._writing = False
                return
            except BaseException as err:  # noqa: BLE001 - raised on the training thread
                self._failure = err

    def flush(self, timeout_s: float) -> None:
        """Waits up to ``timeout_s`` for the lines appended so far to be written: for the
        write under way, then, if it or the one before failed on storage, for one more."""
        deadline = time.monotonic() + timeout_s
        self._join(deadline, timeout_s)
        with self._lock:
            again = (
                self._write_failed
                and self._failure is None
                and not self._writing
                and time.monotonic() < deadline
            )
            if again:
                self._start_writing()
        if again:
            self._join(deadline, timeout_s)
        self._raise_failure()

    def _join(self, deadline: float, timeout_s: float) -> None:
        """Waits until ``deadline`` (``time.monotonic()``, ``timeout_s`` after the flush
        began) for the writing thread to end."""
        thread = self._thread
        if thread is None:
            return
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            log.warning(
                "%s: its last lines were not written within %g s (storage did not answer)",
                METRICS, timeout_s,
            )  # fmt: skip

    def _raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
