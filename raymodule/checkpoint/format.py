"""The checkpoint format: MXNet's files plus a manifest, committed atomically, verified when
read.

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
Readers trust only a checkpoint whose files match its manifest (see :mod:`.manifest`
for what a reader accepts); when the newest does not, they say which file is wrong and use the
one before. A checkpoint that verifies is never replaced by one of the same step. After each
commit the writer deletes what the run no longer needs: committed checkpoints older than the
newest ``keep`` that verify (one that does not verify does not count, and stays while it is
newer than those), folders without a manifest (interrupted writes) and folders newer than the
commit (left by a run that went on from an earlier checkpoint) that do not verify; a newer one
that verifies is kept, and said. Half-written files a killed process left (``*.part-*``) are
not deleted: they may be another process's write in progress. The run's ownership of the
folder is checked before a checkpoint's first write, before its commit and before each delete
(:mod:`raymodule.lease`).

The parameters are read (are they finite, what shapes they have) as numpy views of the
snapshot's bytes (:mod:`raymodule.ndfile`); MXNet is imported only for what that does not read
(sparse arrays).
"""

from __future__ import annotations

import functools
import json
import logging
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .. import ndfile
from ..errors import CheckpointError
from ..storage import Folder, redact
from . import manifest as manifests
from .manifest import MANIFEST
from .snapshot import Snapshot

__all__ = [
    "LATEST",
    "LATEST_MAX_BYTES",
    "MODEL",
    "Checkpoint",
    "checkpoint_names",
    "folder_name",
    "is_folder_name",
    "latest",
    "latest_checkpoint",
    "params_file_name",
    "read",
    "stage_files",
    "survey",
    "write",
]

log = logging.getLogger(__name__)

MODEL = "model"
LATEST = "latest"
LATEST_MAX_BYTES = 256
"""The largest ``latest`` pointer read (it holds one folder name)."""
_FOLDER = re.compile(r"^ckpt-(\d{10})$")


def params_file_name(epoch: int) -> str:
    """The parameters' file in a checkpoint folder, named as ``mx.mod.Module.load`` reads it."""
    return f"{MODEL}-{epoch:04d}.params"


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
        return self.files[params_file_name(self.epoch)]

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
    finish: bool = False,
    verified: dict[str, bool] | None = None,
) -> str | None:
    """Writes a checkpoint from a worker's ``snapshot`` and commits it; returns its name.

    ``info`` holds ``files`` (the module's own files, such as ``model-symbol.json``, by name),
    ``epoch``, ``batch``, ``global_step``, ``world_size``, ``work_load_list`` and, when known,
    ``batch_size`` and ``batches_per_epoch`` (see :mod:`.continuity`). A folder of the
    same name that does not verify (an earlier, interrupted attempt) is replaced; one that
    verifies raises ``CheckpointError`` and is kept, unless ``finish`` says an attempt before
    committed this very checkpoint and then failed to point ``latest`` at it
    (:class:`LatestNotWritten`): then only ``latest`` and the tidying are done.
    ``drop_newer`` gives up the run's checkpoints from this step on even when they verify (a
    Tune trial continuing from another's). Raises ``CheckpointError`` without writing anything
    when the parameters are not finite. ``check_owner`` (a :class:`raymodule.lease.Lease`'s
    ``check``) is called before the first write, before the commit and before each delete;
    what it raises stops the write. A ``CheckpointError`` raised before a delete, after the
    commit, carries the committed checkpoint's name as ``committed``.

    ``stage(run, snapshot, info)`` writes the files and returns the manifest to commit, or
    None when there is no snapshot (its workers were lost: nothing is committed, and None is
    returned); :func:`stage_files` by default, here. The background writer runs it as a Ray
    task, so the snapshot's bytes never reach this process.

    ``verified`` says, by folder name, whether a committed checkpoint verifies, as far as a
    writer found out before (see :func:`_tidy`); this write adds what it learns. A writer that
    keeps it over its commits reads each older checkpoint once, not at every commit.
    """
    check_owner = check_owner or (lambda: None)
    verified = {} if verified is None else verified
    name = folder_name(info["global_step"])
    check_owner()
    held = run.sizes()  # one listing serves the replace below and the tidying after the commit
    if any(path.startswith(name + "/") for path in held):
        if not drop_newer and _verifies(run, name):
            if finish:
                log.info("checkpoint %s: committed by the attempt before", name)
                verified[name] = True
                return _point_and_tidy(run, name, keep, held, drop_newer, check_owner, verified)
            raise CheckpointError(
                f"checkpoint at step {info['global_step']} not written: {run}/{name} already "
                "holds a committed checkpoint of that step that verifies (another run, or an "
                "earlier attempt of this one, wrote it); it is kept as it is"
            )
        check_owner()
        verified.pop(name, None)
        run.delete_folder(name)
    made = (stage or stage_files)(run, snapshot, info)
    if made is None:
        return None
    check_owner()
    run.write(f"{name}/{MANIFEST}", json.dumps(made, indent=1).encode())
    verified[name] = True  # its manifest was made from the bytes just written
    return _point_and_tidy(run, name, keep, held, drop_newer, check_owner, verified)


def _point_and_tidy(
    run: Folder, name: str, keep: int, held, drop_newer, check_owner, verified
) -> str:
    """After the commit of checkpoint ``name``: ``latest`` names it, and the checkpoints the
    run no longer needs are deleted (see :func:`_tidy`); returns ``name``. Raises
    :class:`LatestNotWritten` when ``latest`` cannot be written (nothing is deleted then)."""
    try:
        run.write(LATEST, name.encode())
    except OSError as err:
        raise LatestNotWritten(str(err)) from None
    try:
        _tidy(run, name, keep, held, drop_newer, check_owner, verified)
    except OSError as err:  # the checkpoint is committed; a later commit tidies again
        log.warning("checkpoint %s: could not delete old checkpoints: %s", name, err)
    except CheckpointError as err:  # check_owner() stopped the tidying; the commit stands
        err.committed = name
        raise
    return name


class LatestNotWritten(OSError):
    """A checkpoint was committed (its manifest written), but ``latest`` could not be pointed
    at it: a retry finishes it (:func:`write`'s ``finish``)."""


def stage_files(run: Folder, snapshot: Snapshot | None, info: dict) -> dict | None:
    """Writes the files of the checkpoint of ``snapshot`` and ``info`` (see :func:`write`),
    not committed yet, and returns its manifest; None without a snapshot. Writes nothing and
    raises ``CheckpointError`` when the parameters are not finite."""
    if snapshot is None:
        return None
    name = folder_name(info["global_step"])
    arrays = _arrays(snapshot.params)
    bad = [key for key, array in arrays.items() if not _finite(array)]
    if bad:
        raise CheckpointError(
            f"checkpoint at step {info['global_step']} not committed: parameters "
            f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} are not finite (NaN or inf)"
        )
    files = {**info["files"], **snapshot.files(params_file_name(info["epoch"]))}
    for file, data in files.items():
        run.write(f"{name}/{file}", data)
    params = {key: list(array.shape) for key, array in arrays.items()}  # arg:w, aux:m
    return manifests.make(files, info, snapshot.optimizer or {}, params, _versions())


def _arrays(params) -> dict:
    """The arrays of MXNet's ``.params`` bytes (or a numpy array of them), by name
    (``arg:w``, ``aux:m``): numpy views of the bytes when :mod:`raymodule.ndfile` reads them
    (dense arrays), else MXNet's NDArrays."""
    arrays = ndfile.dense_arrays(params)
    if arrays is None:
        import mxnet as mx

        arrays = mx.nd.load_frombuffer(bytes(params))
    return arrays


def _finite(array) -> bool:
    """Whether a numpy array or an NDArray (copied to numpy alone) holds no NaN or infinity."""
    return bool(np.isfinite(array if isinstance(array, np.ndarray) else array.asnumpy()).all())


def _tidy(
    run: Folder,
    committed: str,
    keep: int,
    held: dict[str, int],
    drop_newer: bool,
    check_owner: Callable[[], None],
    verified: dict[str, bool],
) -> None:
    """Deletes the checkpoint folders the run folder ``held`` (before ``committed`` was
    written) that the run no longer needs, each once ``check_owner()`` passed; a newer
    checkpoint that verifies stays unless ``drop_newer`` (read at each commit, warned of once).

    Of the older committed checkpoints, the newest ``keep - 1`` that verify stay (with
    ``committed``, ``keep`` a run can go on from), and those older than them go. One that does
    not verify (altered, truncated), or that cannot be read just now, does not count: it stays
    while it is newer than those kept (a reader skips it, saying why). Whether each verifies
    is read once, when ``verified`` does not say already (``committed`` is taken as
    verifying), and not read again: one altered after that still counts."""
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
            if drop_newer or not _verifies(run, name):  # another writer's: read each time
                doomed.append(name)
            elif not verified.get(name):  # said once
                verified[name] = True
                log.warning(
                    "checkpoint %s: not deleting %s, which is newer and verifies (another run "
                    "may be writing to %s)", committed, name, run,
                )  # fmt: skip
        else:
            older.append(name)
    counted = 0
    for name in reversed(older):  # newest first
        if counted == keep - 1:
            doomed.append(name)
        elif _verifies_once(run, name, verified, committed, keep):
            counted += 1
    for name in doomed:
        check_owner()  # a run that lost the folder deletes nothing more
        verified.pop(name, None)
        run.delete_folder(name)


def _verifies_once(run: Folder, name: str, verified: dict, committed: str, keep: int) -> bool:
    """Whether checkpoint ``name`` verifies, read only when ``verified`` does not say yet;
    one that does not is said once. One that cannot be read (a storage error) does not count
    this time, and is read again at the next commit."""
    if name not in verified:
        try:
            read(run, name)
        except CheckpointError as err:
            verified[name] = False
            log.warning(
                "checkpoint %s: %s does not verify, so it does not count toward keep=%d: %s",
                committed, name, keep, err,
            )  # fmt: skip
        except OSError as err:
            log.warning(
                "checkpoint %s: %s could not be read, so it does not count toward keep=%d "
                "this time: %s",
                committed, name, keep, err,
            )  # fmt: skip
            return False
        else:
            verified[name] = True
    return verified[name]


def _verifies(run: Folder, name: str) -> bool:
    try:
        read(run, name)
    except CheckpointError:
        return False
    return True


def read(run: Folder, name: str) -> Checkpoint:
    """Reads checkpoint ``name`` and checks every file against its manifest.

    Raises ``CheckpointError`` naming the file that is missing, truncated, altered, or that
    the manifest should not name (see :mod:`raymodule.checkpoint.manifest`), or the file a
    resume reads that it does not list or that does not hold what it should; or when the
    folder's name (``ckpt-<global_step>``) and the manifest's step differ: the newest
    checkpoint is found by its name, and a run resumed from it would go on from another step.
    """
    manifest = manifests.load(run, name)
    if is_folder_name(name) and name != folder_name(manifest["global_step"]):
        raise CheckpointError(
            f"{run}/{name}/{MANIFEST} is of step {manifest['global_step']}, not the step its "
            "folder is named for (copied or renamed by hand?)"
        )
    files = manifests.verified_files(run, name, manifest)
    needed = (params_file_name(manifest["epoch"]), "optimizer.nd", "optimizer.json")
    unlisted = [file for file in needed if file not in files]
    if unlisted:
        raise CheckpointError(f"{run}/{name}/{MANIFEST} does not list {', '.join(unlisted)}")
    try:
        optimizer = json.loads(files["optimizer.json"])
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{run}/{name}/optimizer.json is not valid JSON: {err}") from None
    if optimizer is not None and not isinstance(optimizer, dict):
        raise CheckpointError(
            f"{run}/{name}/optimizer.json holds a {type(optimizer).__name__}, not an object"
        )
    return Checkpoint(run.uri(name), manifest, files)


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


def latest_checkpoint(run_location: str) -> Checkpoint | None:
    """The newest verified checkpoint of the run at ``run_location`` (``<storage>/<name>``,
    a local path or URI), or None; ``Module.load(ckpt.prefix, ckpt.epoch)`` loads it."""
    return latest(Folder(run_location))
