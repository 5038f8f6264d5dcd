"""Reports to Tune: MXNet's metrics once per epoch, with a copy of the run checkpoint ``fit``
committed at that epoch's end."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time

from .. import checkpoint
from ..checkpoint import manifest
from ..errors import CheckpointError
from ..run import RunConfig
from ..storage import Folder, redact, unsafe_name
from .runs import SOURCE
from .trial import Trial

log = logging.getLogger(__name__)

COMMIT_WAIT_S = 300.0
"""How long a report waits for the epoch's run checkpoint to be committed before it reports
the metrics without a checkpoint (the writer retries failed writes meanwhile)."""
_POLL_S = 0.05


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
        if Trial.resources is not None:
            Trial.reporters.append(self)  # the trainable flushes it when train_fn returns

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
        self._pending = (epoch, metrics, self._run or Trial.run)
        if not (seen_batches and self in Trial.reporters):
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
            "restored_from": Trial.restored_from,
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
