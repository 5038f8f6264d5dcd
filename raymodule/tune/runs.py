"""A trial's run: its folder under the Tune experiment's storage, and the Tune checkpoint it is
restored from, verified and committed into the run for ``fit`` to resume from."""

from __future__ import annotations

import json
import logging
import os
from urllib.parse import urlencode

from .. import checkpoint
from ..checkpoint import Snapshot
from ..constants import Settings
from ..errors import CheckpointError
from ..lease import Lease
from ..run import RunConfig
from ..storage import Folder, with_suffix
from .trial import Trial

log = logging.getLogger(__name__)

RUNS = "raymodule_runs"
"""The folder of the trials' runs in a Tune experiment."""
SOURCE = "raymodule-source.json"
"""The file in a Tune checkpoint that says which run checkpoint it copies (not part of it)."""
SOURCE_MAX_BYTES = 64 * 1024


def run_config(storage: str | None = None, name: str | None = None, **options) -> RunConfig:
    """The :class:`raymodule.RunConfig` for this trial's ``fit(run=...)``.

    Its folder is ``<experiment>/raymodule_runs/<trial id>`` under the Tune experiment's
    storage; ``storage`` replaces ``<experiment>/raymodule_runs``, and ``name`` puts the trial's
    run in a folder of that name (``<storage>/<name>/<trial id>``: one run per trial, whatever
    name the trials share). If Tune started the trial from a checkpoint (PBT exploiting another
    trial, or a restore), that checkpoint is verified and committed into the run as its newest,
    so ``fit`` resumes from its parameters and optimizer state.
    ``options`` are other ``RunConfig`` fields (``checkpoint_every``, ``keep``, ...).
    """
    from ray import tune

    if "resume" in options:
        raise ValueError(
            "run_config(resume=...): a trial resumes from the checkpoint Tune gives it, or "
            "continues its own run; it cannot be set"
        )
    context = tune.get_context()
    trial_id = context.get_trial_id()
    if trial_id is None:
        raise RuntimeError("raymodule.tune.run_config() is for trial functions run by Ray Tune")
    if storage is None:
        storage = with_suffix(_experiment_location(context.get_storage()), "/" + RUNS)
    storage, name = _trial_run_location(storage, name, trial_id)
    restore = tune.get_checkpoint()
    run = RunConfig(
        name=name,
        storage=storage,
        resume="must" if restore is not None else "auto",
        **options,
    )
    if restore is not None and (trial_id, restore.path) not in Trial.adopted:
        Trial.restored_from = _adopt(restore, run)
        Trial.adopted.add((trial_id, restore.path))
    Trial.run = run
    return run


def _trial_run_location(storage: str, name: str | None, trial_id: str) -> tuple[str, str]:
    """The ``(storage, name)`` of a trial's run: the trial id is the run's name, inside the
    folder ``name`` when one is given, so that trials sharing a name get a run each."""
    if name is None:
        return storage, trial_id
    RunConfig(name=name, storage=storage)  # a name that is no plain folder name fails here
    return with_suffix(storage, "/" + name), trial_id


def _experiment_location(storage) -> str:
    """The Tune experiment folder as a location raymodule opens (a path or URI). Keys are
    not put in it: trial processes get them as every raymodule process does."""
    import pyarrow.fs as pafs

    fs, path = storage.storage_filesystem, storage.experiment_fs_path
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    options = _reconstruct_options(fs)
    if isinstance(fs, pafs.S3FileSystem):
        query = {
            "region": options.get("region") or None,
            "endpoint_override": options.get("endpoint_override") or None,
            "scheme": options.get("scheme") if options.get("scheme") not in ("", "https") else None,
        }
        return _uri("s3", path, query)
    if type(fs).__name__ == "GcsFileSystem":
        query = {
            "endpoint_override": options.get("endpoint_override") or None,
            "scheme": options.get("scheme") if options.get("scheme") not in ("", "https") else None,
        }
        return _uri("gs", path, query)
    raise ValueError(
        f"raymodule.tune.run_config(): the experiment's storage is a {type(fs).__name__}; pass "
        "storage= (a local path or a URI raymodule can open) to keep the trials' runs there"
    )


def _reconstruct_options(fs) -> dict:
    try:  # pyarrow's filesystems pickle as (reconstructor, (options,))
        args = fs.__reduce__()[1]
        return dict(args[0]) if args and isinstance(args[0], dict) else {}
    except Exception:  # noqa: BLE001 - no options: the defaults apply
        return {}


def _uri(scheme: str, path: str, query: dict) -> str:
    query = {k: v for k, v in query.items() if v is not None}
    return f"{scheme}://{path}" + (f"?{urlencode(query, safe=':')}" if query else "")


def _adopt(restore, run: RunConfig) -> dict:
    """Verifies the Tune checkpoint ``restore`` and commits it into ``run`` as its newest
    checkpoint (dropping the run's later ones, which the trial gives up), for ``fit`` to resume
    from. Returns where it came from: the trial and run checkpoint that took it, its epoch."""
    with restore.as_directory() as local:
        local = local.rstrip("/")
        try:
            ckpt = checkpoint.read(Folder(os.path.dirname(local)), os.path.basename(local))
        except CheckpointError as err:
            raise CheckpointError(
                f"the checkpoint Tune restores this trial from is not a raymodule run "
                f"checkpoint ({err}); report with raymodule.tune.report_callback()"
            ) from None
        source = _read_source(Folder(local))
    snapshot = Snapshot(ckpt.params_file(), *ckpt.optimizer())
    manifest = ckpt.manifest
    own = snapshot.files(checkpoint.params_file_name(ckpt.epoch))  # the rest: the model's
    info = {
        "files": {k: v for k, v in ckpt.files.items() if k not in own},
        "epoch": ckpt.epoch,
        "batch": ckpt.batch,
        "global_step": ckpt.global_step,
        "world_size": manifest.get("world_size"),
        "work_load_list": manifest.get("work_load_list"),
        "batch_size": manifest.get("batch_size"),
        "batches_per_epoch": manifest.get("batches_per_epoch"),
    }
    folder = Folder(run.location)
    try:
        folder.check_writable()
        lease = Lease(folder, run.name, Settings.from_env().lease_ttl_s)
        lease.acquire()  # the trial's own run folder, as fit takes it
        try:
            name = checkpoint.write(
                folder, snapshot, info, run.keep, drop_newer=True, check_owner=lease.check
            )
        finally:
            lease.release()
    except OSError as err:
        raise CheckpointError(f"cannot restore the trial's run at {folder}: {err}") from None
    origin = {
        "trial_id": source.get("trial_id"),
        "run_checkpoint": source.get("checkpoint"),
        "tune_checkpoint": restore.path,
        "epoch": ckpt.epoch,
        "global_step": ckpt.global_step,
    }
    log.info(
        "trial continues from %s (epoch %d, step %d%s) as %s/%s",
        restore.path, ckpt.epoch, ckpt.global_step,
        f", taken by trial {origin['trial_id']}" if origin["trial_id"] else "",
        folder, name,
    )  # fmt: skip
    return origin


def _read_source(folder: Folder) -> dict:
    """The :data:`SOURCE` of a Tune checkpoint, or ``{}`` when it has none that reads."""
    try:
        source = json.loads(folder.read(SOURCE, limit=SOURCE_MAX_BYTES))
    except (OSError, ValueError):
        return {}
    return source if isinstance(source, dict) else {}
