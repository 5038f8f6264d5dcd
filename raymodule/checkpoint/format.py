"""Run checkpoints: MXNet's files plus a manifest, committed atomically, verified when read.

A run folder holds::

    ckpt-<global_step:010d>/model-symbol.json       MXNet's checkpoint files, which
                            model-<epoch:04d>.params  ``mx.mod.Module.load`` reads unchanged
                            optimizer.nd               optimizer state arrays (mx.nd.save)
                            optimizer.json             their structure, update counts, schedule
                            manifest.json              size and sha256 of each file; written last
    latest                                          newest committed folder's name; written after
                                                    its manifest, for people and tools

A checkpoint is committed once its manifest is written (object stores make each file appear
whole, or not at all; on a local or network filesystem each file and its folder are synced
before the next is written). A checkpoint whose parameters are not all finite is not committed.
Readers trust only a checkpoint whose files match its manifest (see :mod:`raymodule.manifest`
for what a reader accepts); when the newest does not, they say which file is wrong and use the
one before. A checkpoint that verifies is never replaced by one of the same step. After each
commit the writer deletes what the run no longer needs: committed checkpoints beyond ``keep``,
folders without a manifest (interrupted writes) and folders newer than the commit (left by a
run that went on from an earlier checkpoint) that do not verify; a newer one that verifies is
kept, and said. Half-written files a killed process left (``*.part-*``) are not deleted: they
may be another process's write in progress. The run's ownership of the folder is checked
before a checkpoint's first write, before its commit and before each delete
(:mod:`raymodule.lease`).

:class:`CheckpointWriter` writes in a background thread while training goes on: the files
are written by a Ray task on the training process's node, given the worker's snapshot by
reference (its bytes never pass through the training process), and committed here, by the
run that owns the folder. MXNet is
imported only to read the parameters (are they finite, what shapes they have).
"""

from __future__ import annotations

import functools
import json
import logging
import platform
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from . import manifest as manifests
from .errors import CheckpointError
from .lease import LeaseLost
from .manifest import FORMAT, MANIFEST
from .storage import Folder, redact

__all__ = [
    "FORMAT",
    "MANIFEST",
    "Checkpoint",
    "CheckpointWriter",
    "checkpoint_names",
    "folder_name",
    "latest",
    "latest_checkpoint",
    "read",
    "survey",
    "write",
]

log = logging.getLogger(__name__)

MODEL = "model"
LATEST = "latest"
LATEST_MAX_BYTES = 256
"""The largest ``latest`` pointer read (it holds one folder name)."""
_FOLDER = re.compile(r"^ckpt-(\d{10})$")


def folder_name(global_step: int) -> str:
    return f"ckpt-{global_step:010d}"


def is_folder_name(name: str) -> bool:
    """Whether ``name`` is a checkpoint folder's name (``ckpt-`` and ten digits)."""
    return isinstance(name, str) and _FOLDER.match(name) is not None


def checkpoint_names(run: Folder) -> list[str]:
    """The run's checkpoint folders, committed or not, oldest first."""
    return sorted(name for name in run.folders() if _FOLDER.match(name))


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint whose files matched its manifest when it was read."""

    location: str
    """The checkpoint folder (a local path or URI)."""
    manifest: dict
    files: dict[str, bytes]

    def __repr__(self) -> str:  # the location redacted, the files' bytes left out
        return (
            f"Checkpoint({redact(self.location)!r}, epoch={self.epoch}, batch={self.batch}, "
            f"global_step={self.global_step}, files={sorted(self.files)})"
        )

    @property
    def name(self) -> str:
        return self.location.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]

    @property
    def epoch(self) -> int:
        """Epochs completed when it was taken (MXNet's checkpoint numbering)."""
        return self.manifest["epoch"]

    @property
    def batch(self) -> int:
        """Batches done in the epoch under way when it was taken (0 at an epoch's end)."""
        return self.manifest["batch"]

    @property
    def global_step(self) -> int:
        return self.manifest["global_step"]

    @property
    def prefix(self) -> str:
        """The MXNet prefix: ``Module.load(ckpt.prefix, ckpt.epoch)`` loads it."""
        return Folder(self.location).uri(MODEL)

    def params_file(self) -> bytes:
        return self.files[f"{MODEL}-{self.epoch:04d}.params"]

    def optimizer(self) -> tuple[bytes, dict | None]:
        """The optimizer state arrays (MXNet's NDArray format) and their description."""
        return self.files["optimizer.nd"], json.loads(self.files["optimizer.json"])


def write(
    run: Folder,
    snapshot: dict,
    info: dict,
    keep: int,
    *,
    drop_newer: bool = False,
    check_owner: Callable[[], None] | None = None,
    stage: Callable[[Folder, object, dict], dict | None] | None = None,
) -> str | None:
    """Writes a checkpoint from a worker's ``snapshot`` and commits it; returns its name.

    ``info`` holds ``files`` (the module's own files, such as ``model-symbol.json``, by name),
    ``epoch``, ``batch``, ``global_step``, ``world_size``, ``work_load_list`` and, when known,
    ``batch_size`` and ``batches_per_epoch`` (see :mod:`raymodule.continuity`). A folder of the
    same name that does not verify (an earlier, interrupted attempt) is replaced; one that
    verifies raises ``CheckpointError`` and is kept. ``drop_newer`` gives up the run's
    checkpoints from this step on even when they verify (a Tune trial continuing from
    another's). Raises ``CheckpointError`` without writing anything when the parameters are not
    finite. ``check_owner`` (a :class:`raymodule.lease.Lease`'s ``check``) is called before the
    first write, before the commit and before each delete; what it raises stops the write.

    ``stage(run, snapshot, info)`` writes the files and returns the manifest to commit, or
    None when there is no snapshot (its workers were lost: nothing is committed, and None is
    returned); :func:`stage_files` by default, here. The background writer runs it as a Ray
    task, so the snapshot's bytes never reach this process.
    """
    check_owner = check_owner or (lambda: None)
    name = folder_name(info["global_step"])
    check_owner()
    held = run.sizes()  # one listing serves the replace below and the tidying after the commit
    if any(path.startswith(name + "/") for path in held):
        if not drop_newer and _verifies(run, name):
            raise CheckpointError(
                f"checkpoint at step {info['global_step']} not written: {run}/{name} already "
                "holds a committed checkpoint of that step that verifies (another run, or an "
                "earlier attempt of this one, wrote it); it is kept as it is"
            )
        check_owner()
        run.delete_folder(name)
    made = (stage or stage_files)(run, snapshot, info)
    if made is None:
        return None
    check_owner()
    run.write(f"{name}/{MANIFEST}", json.dumps(made, indent=1).encode())
    run.write(LATEST, name.encode())
    try:
        _tidy(run, name, keep, held, drop_newer, check_owner)
    except OSError as err:  # the checkpoint is committed; a later commit tidies again
        log.warning("checkpoint %s: could not delete old checkpoints: %s", name, err)
    return name


def stage_files(run: Folder, snapshot: dict | None, info: dict) -> dict | None:
    """Writes the files of the checkpoint of ``snapshot`` and ``info`` (see :func:`write`),
    not committed yet, and returns its manifest; None without a snapshot. Writes nothing and
    raises ``CheckpointError`` when the parameters are not finite."""
    if snapshot is None:
        return None
    name = folder_name(info["global_step"])
    arrays = _load(snapshot["params"])
    bad = _not_finite(arrays)
    if bad:
        raise CheckpointError(
            f"checkpoint at step {info['global_step']} not committed: parameters "
            f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} are not finite (NaN or inf)"
        )
    files = {
        **info["files"],
        f"{MODEL}-{info['epoch']:04d}.params": snapshot["params"],
        "optimizer.nd": snapshot["optimizer.nd"],
        "optimizer.json": json.dumps(snapshot["optimizer"]).encode(),
    }
    for file, data in files.items():
        run.write(f"{name}/{file}", data)
    params = {key: list(array.shape) for key, array in arrays.items()}  # arg:w, aux:m
    return manifests.make(files, info, snapshot["optimizer"] or {}, params, _versions())


_stage_task = ray.remote(num_cpus=0, max_retries=0)(stage_files)
"""stage_files as a Ray task: it is given the snapshot's reference, and only the manifest
comes back."""


@ray.remote(num_cpus=0)
def _ready_to_stage() -> None:
    """Imports what :func:`stage_files` needs (MXNet: seconds) in a worker process of this
    node, which Ray then keeps for the tasks that write: the first checkpoint does not pay
    for the imports while training goes on."""
    import mxnet  # noqa: F401


def _load(params: bytes) -> dict:
    """The arrays of MXNet's ``.params`` bytes, by name (``arg:w``, ``aux:m``)."""
    import mxnet as mx

    return mx.nd.load_frombuffer(params)


def _not_finite(arrays: dict) -> list[str]:
    """The names of the ``arrays`` that hold a NaN or infinity."""
    import numpy as np

    return [name for name, array in arrays.items() if not np.isfinite(array.asnumpy()).all()]


def _tidy(
    run: Folder,
    committed: str,
    keep: int,
    held: dict[str, int],
    drop_newer: bool,
    check_owner: Callable[[], None],
) -> None:
    """Deletes the checkpoint folders the run folder ``held`` (before ``committed`` was
    written) that the run no longer needs, each once ``check_owner()`` passed; a newer
    checkpoint that verifies stays unless ``drop_newer``."""
    folders = sorted(
        {p.split("/", 1)[0] for p in held if "/" in p and _FOLDER.match(p.split("/", 1)[0])}
    )
    doomed, older = [], []
    for name in folders:
        if name == committed:
            continue
        if f"{name}/{MANIFEST}" not in held:
            doomed.append(name)  # never committed
        elif name > committed:
            if drop_newer or not _verifies(run, name):
                doomed.append(name)
            else:
                log.warning(
                    "checkpoint %s: not deleting %s, which is newer and verifies (another run "
                    "may be writing to %s)", committed, name, run,
                )  # fmt: skip
        else:
            older.append(name)
    for name in doomed + older[: max(0, len(older) - (keep - 1))]:
        check_owner()  # a run that lost the folder deletes nothing more
        run.delete_folder(name)


def _verifies(run: Folder, name: str) -> bool:
    try:
        read(run, name)
    except CheckpointError:
        return False
    return True


def read(run: Folder, name: str) -> Checkpoint:
    """Reads checkpoint ``name`` and checks every file against its manifest.

    Raises ``CheckpointError`` naming the file that is missing, truncated, altered, or that
    the manifest should not name (see :mod:`raymodule.manifest`).
    """
    manifest = manifests.load(run, name)
    return Checkpoint(run.uri(name), manifest, manifests.verified_files(run, name, manifest))


def survey(run: Folder) -> tuple[Checkpoint | None, list[tuple[str, str]]]:
    """The newest checkpoint of the run that verifies (or None), and the committed ones
    newer than it that do not, each with the reason. Every checkpoint that does not verify
    is logged with the reason, and skipped."""
    rejected = []
    for name in reversed(checkpoint_names(run)):
        try:
            return read(run, name), rejected
        except manifests.Uncommitted as err:
            log.warning("not using checkpoint %s: %s", name, err)
        except CheckpointError as err:
            log.warning("not using checkpoint %s: %s", name, err)
            rejected.append((name, str(err)))
    return None, rejected


def latest(run: Folder) -> Checkpoint | None:
    """The newest checkpoint of the run that verifies, or None. Every newer checkpoint that
    does not verify is logged with the reason, and skipped."""
    return survey(run)[0]


@functools.cache
def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("raymodule", "mxnet", "ray", "pyarrow", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


class CheckpointWriter:
    """Writes checkpoints in a background thread, in order, while training goes on.

    :meth:`submit` hands over a worker's snapshot (an ``ObjectRef``, taken at a step boundary,
    so all workers were at the same step) and returns at once. While one checkpoint is being
    written, the newest submitted one waits; an older waiting one is dropped (a newer state
    supersedes it), so memory stays bounded and training never waits for storage. A write that
    fails is retried with exponential backoff; a checkpoint that still fails is logged, and once
    more than ``failures_tolerated`` fail in a row, the next :meth:`submit` (or :meth:`close`)
    raises ``CheckpointError``.
    """

    def __init__(self, run: Folder, keep: int, settings, check_owner=None):
        self.run = run
        self.keep = keep
        self.check_owner = check_owner
        self.attempts = settings.checkpoint_attempts
        self.backoff_s = settings.checkpoint_backoff_s
        self.failures_tolerated = settings.checkpoint_failures_tolerated
        self.snapshot_timeout_s = settings.checkpoint_snapshot_timeout_s
        self.close_timeout_s = settings.checkpoint_close_timeout_s
        self._committed: list[dict] = []
        self.failures_in_row = 0
        self._error: CheckpointError | None = None
        self._waiting: tuple | None = None
        self._busy = False
        self._closing = False
        self._abandon = False
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
                log.warning(
                    "checkpoint at step %d skipped: the one before is still being written",
                    self._waiting[1]["global_step"],
                )
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
        checkpoint: one whose copy was taken is committed first."""
        deadline = time.monotonic() + self.close_timeout_s
        with self._cond:
            self._abandon = True
            try:
                while self._waiting is not None or self._busy:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(timeout=left)
            finally:
                self._abandon = False

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
                self._busy = True
            try:
                self._write(snapshot, info)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _write(self, snapshot: ray.ObjectRef, info: dict) -> None:
        step = info["global_step"]
        deadline = time.monotonic() + self.snapshot_timeout_s
        ready: list = []
        while not ready and not self._abandon and time.monotonic() < deadline:
            wait = min(1.0, self.snapshot_timeout_s)
            ready, _ = ray.wait([snapshot], timeout=wait, fetch_local=False)
        if not ready:  # its worker is silent, or training failed: not the storage's failure
            log.warning("checkpoint at step %d skipped: its snapshot did not come", step)
            return
        tic = time.monotonic()
        for attempt in range(1, self.attempts + 1):
            try:
                name = write(
                    self.run,
                    snapshot,
                    info,
                    self.keep,
                    check_owner=self.check_owner,
                    stage=self._stage_beside,
                )
            except CheckpointError as err:  # not to be committed: trying again changes nothing
                self._failed(step, str(err), fatal=isinstance(err, LeaseLost))
                return
            except OSError as err:
                if attempt < self.attempts:
                    delay = self.backoff_s * 2 ** (attempt - 1)
                    log.info(
                        "checkpoint at step %d: attempt %d of %d failed (%s); retrying in %.1f s",
                        step, attempt, self.attempts, err, delay,
                    )  # fmt: skip
                    time.sleep(delay)
                    continue
                self._failed(step, f"{self.attempts} attempts failed, the last with: {err}")
                return
            if name is None:  # workers were lost before it: the steps run again
                log.warning("checkpoint at step %d skipped: workers were lost before it", step)
                return
            seconds = time.monotonic() - tic
            log.info("checkpoint %s committed in %.2f s", f"{self.run}/{name}", seconds)
            with self._cond:
                self.failures_in_row = 0
                self._committed.append({"name": name, "seconds": round(seconds, 3)})
            return

    def _stage_beside(self, run: Folder, snapshot: ray.ObjectRef, info: dict):
        """:func:`stage_files` as a Ray task on this node: the bytes go from the worker to
        storage through the object store, not through this process's memory; a local path
        is this node's, as for the commit. The task sees the environment Ray started with
        (storage credentials come from there). Bounded by
        RAYMODULE_CHECKPOINT_CLOSE_TIMEOUT_S; its errors are raised as stage_files' own."""
        if self._warm is not None:  # the first write waits for it rather than start another
            ray.wait([self._warm], timeout=self.close_timeout_s)
            self._warm = None
        task = _stage_task.options(scheduling_strategy=_this_node()).remote(run, snapshot, info)
        try:
            return ray.get(task, timeout=self.close_timeout_s)
        except ray.exceptions.RayActorError:
            return None  # the worker that made the snapshot was lost
        except ray.exceptions.GetTimeoutError:
            raise OSError(
                f"writing the files took more than {self.close_timeout_s:g} s "
                "(RAYMODULE_CHECKPOINT_CLOSE_TIMEOUT_S)"
            ) from None
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, (OSError, CheckpointError)):
                raise cause from None
            why = f"writing the files failed: {type(cause).__name__}: {cause}"
            raise CheckpointError(why) from None
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


def latest_checkpoint(run_location: str) -> Checkpoint | None:
    """The newest verified checkpoint of the run at ``run_location`` (``<storage>/<name>``,
    a local path or URI), or None; ``Module.load(ckpt.prefix, ckpt.epoch)`` loads it."""
    return latest(Folder(run_location))


def _this_node() -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
