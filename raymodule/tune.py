"""Ray Tune sweeps over raymodule training.

A trial function builds a :class:`raymodule.Module` and fits it, as a script would::

    def train_fn(config):
        report = raymodule.tune.report_callback()
        with raymodule.Module(net, context=raymodule.tune.workers()) as mod:
            mod.fit(train_iter, eval_data=val_iter, num_epoch=10,
                    optimizer_params={"learning_rate": config["lr"]},
                    batch_end_callback=report, eval_end_callback=report,
                    run=raymodule.tune.run_config())

    tuner = ray.tune.Tuner(
        raymodule.tune.with_workers(train_fn, num_workers=2),
        param_space={"lr": ray.tune.loguniform(1e-3, 1)},
        tune_config=ray.tune.TuneConfig(metric="validation-accuracy", mode="max",
                                        scheduler=ASHAScheduler(), num_samples=8),
    )

- **Reservation.** :func:`with_workers` makes ``train_fn`` a trainable whose trial reserves,
  in one placement group, a head bundle for the trial's own process (``head_cpus``, default 0:
  like the client of a plain run, it reserves nothing) and one bundle per worker. The trial
  process captures the group for what it starts, so the module's controller and workers land
  in the trial's bundles (raymodule's worker group uses the current placement group and makes
  none); a trial starts only once all of them fit, so trials never hold half their workers
  and wait on each other. The module must ask for the workers the trial reserved:
  :func:`workers` gives exactly those.
- **Reports.** :func:`report_callback` reports MXNet's metrics once per epoch (``epoch``,
  ``train-<name>``, ``validation-<name>``) with a Tune checkpoint: the run checkpoint that
  ``fit(run=...)`` committed at that epoch's end, copied as it is (MXNet's files, the optimizer
  state and the manifest; plain ``mx.mod.Module.load(<checkpoint>/model, epoch)`` reads it),
  plus ``raymodule-source.json``: the trial, run checkpoint and restore it came from. A report
  goes out once ``fit`` has recorded the epoch in the run, so a trial that Tune stops at a
  report still leaves a complete run.
- **Restores.** When Tune starts a trial from a checkpoint (PBT exploiting a better trial,
  or a trial restored after a failure), :func:`run_config` verifies that checkpoint and commits
  it into the trial's run as its newest checkpoint (dropping the run's later ones), so
  ``fit(run=...)`` resumes from it by its usual path: parameters, optimizer state, schedule and
  position in the data come back; hyperparameters come from the trial's (new) config.
- **Storage.** Each trial's run is ``<experiment>/raymodule_runs/<trial id>``, under the Tune
  experiment's storage (a local path, or a URI such as ``s3://`` whose keys the trial processes
  get as everywhere in raymodule: from the usual AWS variables or the machine's role), so
  ``raymodule runs <experiment>/raymodule_runs`` lists every trial's run. A ``name`` given to
  :func:`run_config` is a folder holding one run per trial (``<name>/<trial id>``): trials never
  share a run, so none resumes from another's weights but through Tune.

Ray Tune is imported when these functions are called, not with raymodule.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from urllib.parse import urlencode

import ray

from . import checkpoint, runtime
from .checkpoint import Snapshot, manifest
from .constants import Settings
from .errors import CheckpointError, PlacementError
from .lease import Lease
from .run import RunConfig
from .storage import Folder, redact, unsafe_name, with_suffix

__all__ = ["with_workers", "workers", "report_callback", "ReportCallback", "run_config"]

log = logging.getLogger(__name__)

RUNS = "raymodule_runs"
"""The folder of the trials' runs in a Tune experiment."""
SOURCE = "raymodule-source.json"
"""The file in a Tune checkpoint that says which run checkpoint it copies (not part of it)."""
SOURCE_MAX_BYTES = 64 * 1024
COMMIT_WAIT_S = 300.0
"""How long a report waits for the epoch's run checkpoint to be committed before it reports
the metrics without a checkpoint (the writer retries failed writes meanwhile)."""
_POLL_S = 0.05


# -- reservation ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrialResources:
    """What one trial reserves: its own process and ``num_workers`` workers."""

    num_workers: int
    cpus: float
    gpus: float
    head_cpus: float

    @property
    def worker_bundle(self) -> dict[str, float]:
        return {k: v for k, v in (("CPU", self.cpus), ("GPU", self.gpus)) if v > 0}

    def bundles(self) -> list[dict[str, float]]:
        """The head bundle (empty when ``head_cpus`` is 0), then one bundle per worker."""
        head = {"CPU": self.head_cpus} if self.head_cpus > 0 else {}
        return [head] + [dict(self.worker_bundle) for _ in range(self.num_workers)]

    def describe(self) -> str:
        head = f"{self.head_cpus:g} CPU for the trial process + " if self.head_cpus else ""
        return f"{head}{self.num_workers} workers x {_fmt(self.worker_bundle)}"

    def total(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for bundle in self.bundles():
            for key, value in bundle.items():
                total[key] = total.get(key, 0) + value
        return total


class _Trial:
    """The trial this process runs (set by the trainable of :func:`with_workers`)."""

    resources: TrialResources | None = None
    run: RunConfig | None = None
    restored_from: dict | None = None  # the Tune checkpoint the trial continues from
    reporters: list = []  # this trial's report callbacks, flushed when train_fn returns
    adopted: set = set()  # (trial id, Tune checkpoint path) already committed into the run

    @classmethod
    def start(cls, resources: TrialResources) -> None:
        cls.resources, cls.run, cls.restored_from, cls.reporters = resources, None, None, []


def with_workers(
    train_fn, num_workers: int, cpus: float = 1, gpus: float = 0, *, head_cpus: float = 0
):
    """``train_fn(config)``, which builds a :class:`raymodule.Module` on
    :func:`workers` (or ``raymodule.workers(num_workers, cpus=cpus, gpus=gpus)``) and fits it,
    as a Tune trainable whose trial reserves its process and its workers up front.

    Args:
        train_fn: the trial function, ``train_fn(config)``.
        num_workers: workers each trial's module starts.
        cpus, gpus: what each worker reserves (as :func:`raymodule.workers`).
        head_cpus: CPUs reserved for the trial process itself, which reads the data and runs
            the callbacks (default 0: it shares the first worker's bundle, as the client of a
            plain run reserves nothing).

    Returns a trainable for ``ray.tune.Tuner``. A sweep whose trial cannot fit the cluster
    raises :class:`raymodule.PlacementError` when Tune creates its first trial, saying what a
    trial asks for, what the cluster has, and what to change: at once on a Ray without an
    autoscaler (one this process or raymodule started), after ``RAYMODULE_PLACEMENT_TIMEOUT_S``
    on a cluster that may grow.
    """
    from ray import tune

    if not callable(train_fn):
        raise TypeError(f"with_workers(train_fn={train_fn!r}): expected a function of config")
    if not _is_int(num_workers) or num_workers < 1:
        raise ValueError(f"with_workers(num_workers={num_workers!r}): must be an integer >= 1")
    for name, value in (("cpus", cpus), ("gpus", gpus), ("head_cpus", head_cpus)):
        if not _is_number(value) or value < 0:
            raise ValueError(f"with_workers({name}={value!r}): must be a number >= 0")
    if cpus == 0 and gpus == 0:
        raise ValueError("with_workers(cpus=0, gpus=0): each worker must reserve a CPU or a GPU")
    spec = TrialResources(num_workers, cpus, gpus, head_cpus)
    factory = tune.PlacementGroupFactory(spec.bundles(), strategy="PACK")

    def resources(config) -> tune.PlacementGroupFactory:
        _check_fits(spec)  # called by Tune on the driver for every trial it creates
        return factory

    @functools.wraps(train_fn)
    def trainable(config):
        _Trial.start(spec)
        output = train_fn(config)
        for reporter in _Trial.reporters:  # the last epoch's report
            reporter.flush()
        return output

    return tune.with_resources(trainable, resources)


def workers():
    """The worker contexts the current trial reserved (``context=`` of its module)."""
    from .context import workers as make

    spec = _Trial.resources
    if spec is None:
        raise RuntimeError(
            "raymodule.tune.workers() is for trial functions run through "
            "raymodule.tune.with_workers(train_fn, num_workers, ...)"
        )
    return make(spec.num_workers, cpus=spec.cpus, gpus=spec.gpus)


_checked: set = set()  # TrialResources that fit this cluster


def _check_fits(spec: TrialResources) -> None:
    """Raises ``PlacementError`` if one trial of ``spec`` can never be placed on this cluster
    (waiting, bounded, for a cluster that may grow)."""
    if spec in _checked or not ray.is_initialized():
        return
    problem = _unfit(spec)
    if problem is not None and _can_grow():
        settings = Settings.from_env()
        problem = _wait_for_room(spec, settings)
        if problem is not None:
            problem += (
                f" (waited {settings.placement_timeout_s:g} s for the cluster to grow; "
                "RAYMODULE_PLACEMENT_TIMEOUT_S sets the wait)"
            )
    if problem is not None:
        raise PlacementError(
            f"this sweep's trials cannot fit the cluster: each trial reserves "
            f"{spec.describe()} = {_fmt(spec.total())}, but {problem}. Give "
            "raymodule.tune.with_workers fewer workers (num_workers) or fewer cpus/gpus per "
            "worker (or head_cpus), or run the sweep on a cluster with more resources"
        )
    _checked.add(spec)


def _unfit(spec: TrialResources) -> str | None:
    """Why one trial cannot be placed on the cluster as it is (alive nodes), or None."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total: dict[str, float] = {}
    for resources in nodes:
        for key, value in resources.items():
            total[key] = total.get(key, 0) + value
    need = spec.total()
    short = {k: v for k, v in need.items() if v > total.get(k, 0) + 1e-9}
    if short:
        have = _fmt({k: total.get(k, 0) for k in need})
        return f"the cluster has {have} in all"
    for bundle in [b for b in spec.bundles() if b]:
        if not any(all(n.get(k, 0) + 1e-9 >= v for k, v in bundle.items()) for n in nodes):
            largest = max(nodes, key=lambda n: n.get("CPU", 0), default={})
            return (
                f"no node can hold a bundle of {_fmt(bundle)} (the largest has "
                f"{_fmt({k: largest.get(k, 0) for k in bundle})})"
            )
    return None


def _can_grow() -> bool:
    """False for a Ray that no autoscaler can grow: one raymodule started, or one this
    process started itself (``ray.init()`` without an address)."""
    if runtime.started_locally():
        return False
    node = getattr(ray._private.worker, "_global_node", None)
    return not getattr(node, "head", False)


def _wait_for_room(spec: TrialResources, settings: Settings) -> str | None:
    """Asks the cluster for one trial's bundles (a placement group, which an autoscaler
    sees as demand) and waits, bounded, until they could be placed; None if they can."""
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = [b for b in spec.bundles() if b]
    probe = placement_group(bundles, strategy="PACK")
    start = time.monotonic()
    try:
        while True:
            waited = time.monotonic() - start
            left = settings.placement_timeout_s - waited
            if left <= 0:
                return _unfit(spec) or "the cluster did not find room for it"
            ready, _ = ray.wait(
                [probe.ready()], timeout=min(left, settings.placement_report_interval_s)
            )
            if ready or _unfit(spec) is None:
                return None
            log.warning(
                "raymodule.tune: waiting %.0f s for the cluster to grow to hold one trial "
                "(%s); it has %s",
                time.monotonic() - start, spec.describe(), _fmt(ray.cluster_resources()),
            )  # fmt: skip
    finally:
        remove_placement_group(probe)


# -- storage and restores ---------------------------------------------------------------------
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
    if restore is not None and (trial_id, restore.path) not in _Trial.adopted:
        _Trial.restored_from = _adopt(restore, run)
        _Trial.adopted.add((trial_id, restore.path))
    _Trial.run = run
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


# -- reports ----------------------------------------------------------------------------------
def report_callback(run: RunConfig | None = None) -> ReportCallback:
    """An MXNet callback that reports to Tune once per epoch, with a checkpoint.

    Pass it to ``fit`` as ``batch_end_callback`` (where MXNet shows the training metric) and
    as ``eval_end_callback`` (the validation metric), or, without ``eval_data``, as
    ``epoch_end_callback``::

        report = raymodule.tune.report_callback()
        mod.fit(train, eval_data=val, batch_end_callback=report, eval_end_callback=report,
                run=raymodule.tune.run_config(), ...)

    Each report holds ``epoch`` (epochs completed), ``train-<metric>`` and
    ``validation-<metric>`` for each of MXNet's metric names (``train-accuracy``, ...), and
    the run checkpoint ``fit`` committed at that epoch's end. It is sent once ``fit`` has
    recorded the epoch: at the next training batch's callback, or, after the last epoch, when
    the trial function returns (within :func:`with_workers`; elsewhere, or without batch-end
    calls, at once). ``run`` is the ``RunConfig`` given to ``fit``; by default the one
    :func:`run_config` made in this trial. Without a run the reports carry no checkpoint (PBT
    cannot exploit the trial, Tune cannot restore it).
    """
    return ReportCallback(run)


class ReportCallback:
    """See :func:`report_callback`. Called with one ``BatchEndParam`` it is a batch-end or
    eval-end callback (told apart by the batch MXNet puts in its locals); with
    ``(epoch, symbol, arg_params, aux_params)`` an epoch-end callback.

    An epoch's report is sent once ``fit`` has finished the epoch's bookkeeping (its line in
    the run's ``metrics.jsonl``): at the next training batch's callback, or, after the last
    epoch, when the trial function returns. A trial that Tune stops at a report (ASHA, the
    last epoch) so leaves a complete run behind. Without batch-end calls (nothing marks the
    next epoch) or outside :func:`with_workers` (nothing marks the end), it reports at once.
    """

    def __init__(self, run: RunConfig | None = None):
        self._run = run
        self._train: tuple[int, list] | None = None  # (epoch, name_values) at the latest batch
        self._reported: dict[int, str] = {}  # epoch -> the callback that reported it
        self._pending: tuple[int, dict, RunConfig | None] | None = None
        self._warned: set[str] = set()
        if _Trial.resources is not None:
            _Trial.reporters.append(self)  # the trainable flushes it when train_fn returns

    def __call__(self, *args) -> None:
        if len(args) == 4:  # epoch_end_callback(epoch, symbol, arg_params, aux_params)
            self._epoch_done(args[0], validation=[], via="epoch_end_callback")
            return
        if len(args) != 1 or not hasattr(args[0], "eval_metric"):
            raise TypeError(
                "report_callback() takes MXNet's BatchEndParam (as batch_end_callback or "
                "eval_end_callback) or (epoch, symbol, arg_params, aux_params) (as "
                "epoch_end_callback)"
            )
        param = args[0]
        scope = param.locals if isinstance(param.locals, dict) else {}
        if scope.get("data_batch") is not None:  # a training batch ended
            self.flush()  # the epoch before is recorded by now
            if param.eval_metric is not None:
                self._train = (param.epoch, param.eval_metric.get_global_name_value())
            return
        validation = param.eval_metric.get_name_value() if param.eval_metric is not None else []
        self._epoch_done(param.epoch, validation=validation, via="eval_end_callback")

    def _epoch_done(self, epoch: int, validation: list, via: str) -> None:
        if epoch in self._reported:
            raise ValueError(
                f"report_callback(): epoch {epoch} was reported by {self._reported[epoch]} "
                f"already; pass the callback as eval_end_callback when fit has eval_data, "
                "as epoch_end_callback otherwise, not both"
            )
        self._reported[epoch] = via
        self.flush()
        metrics: dict = {"epoch": epoch + 1}
        seen_batches = self._train is not None and self._train[0] == epoch
        if seen_batches:
            metrics.update({f"train-{k}": float(v) for k, v in self._train[1]})
        else:
            self._warn_once(
                "train",
                "report_callback(): no training metric seen in this epoch; pass the callback "
                "as batch_end_callback too to report train-<metric>",
            )
        metrics.update({f"validation-{k}": float(v) for k, v in validation})
        self._pending = (epoch, metrics, self._run or _Trial.run)
        if not (seen_batches and self in _Trial.reporters):
            self.flush()

    def flush(self) -> None:
        """Sends the report that waits, if any (with the run checkpoint of its epoch)."""
        if self._pending is None:
            return
        (epoch, metrics, run), self._pending = self._pending, None
        _send(epoch, metrics, run, self._warn_once)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)


def _send(epoch: int, metrics: dict, run: RunConfig | None, warn_once) -> None:
    """``tune.report(metrics)`` with a copy of the run checkpoint taken at the end of
    ``epoch`` (0-based), once the background writer has committed it."""
    from ray import tune

    if run is None:
        warn_once(
            "run",
            "report_callback(): fit has no run, so the reports carry no checkpoint (PBT "
            "cannot exploit this trial, Tune cannot restore it); pass "
            "run=raymodule.tune.run_config() to fit",
        )
        tune.report(metrics)
        return
    ckpt = _await_epoch_checkpoint(Folder(run.location), epoch + 1)
    if ckpt is None:
        log.warning(
            "report_callback(): the run checkpoint of epoch %d was not committed within %g s; "
            "reporting without a checkpoint", epoch + 1, COMMIT_WAIT_S,
        )  # fmt: skip
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="raymodule-tune-") as local:
        for name, data in ckpt.files.items():
            _write(local, name, data)
        _write(local, checkpoint.MANIFEST, json.dumps(ckpt.manifest, indent=1).encode())
        source = {
            "trial_id": tune.get_context().get_trial_id(),
            "run": redact(run.location),
            "checkpoint": ckpt.name,
            "restored_from": _Trial.restored_from,
        }
        _write(local, SOURCE, json.dumps(source).encode())
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(local))


def _await_epoch_checkpoint(folder: Folder, epoch: int) -> checkpoint.Checkpoint | None:
    """The run checkpoint taken at the end of ``epoch`` (epochs completed), once the
    background writer has committed it; None if it is not within ``COMMIT_WAIT_S``."""
    deadline = time.monotonic() + COMMIT_WAIT_S
    seen = None
    while time.monotonic() < deadline:
        try:
            name = folder.read(checkpoint.LATEST, limit=checkpoint.LATEST_MAX_BYTES)
            name = name.decode().strip()
        except (OSError, ValueError):
            name = None
        if name and name != seen:
            seen = name
            try:
                if not checkpoint.is_folder_name(name):
                    raise CheckpointError(f"{folder}/{checkpoint.LATEST} names no checkpoint")
                found = manifest.load(folder, name)
                if found["epoch"] == epoch and found["batch"] == 0:
                    return checkpoint.read(folder, name)
            except (OSError, CheckpointError) as err:
                log.warning("report_callback(): cannot read checkpoint %r: %s", name, err)
        time.sleep(_POLL_S)
    return None


def _write(folder: str, name: str, data: bytes) -> None:
    """Writes the file ``name`` (a plain name, as a manifest gives) inside the local
    ``folder``, never outside it."""
    why = unsafe_name(name)
    if why is not None:
        raise CheckpointError(f"not writing {name!r} into {folder}: {why}")
    path = os.path.join(folder, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as out:
        out.write(data)


def _fmt(resources: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
