"""What the jobs in jobs/ share: the training options (workers, epochs, batch size), the options
of a run (name, storage, checkpoints, resume), a check of the storage before Ray starts, the
way a job ends on raymodule's errors (:func:`run_job`) and a progress bar per epoch.

The jobs import it first (their folder is on ``sys.path`` when they run); it puts the
repository on ``sys.path`` for ``raymodule``, which a checkout run with
``ray job submit --working-dir .`` needs."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable

import mxnet as mx
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import raymodule  # noqa: E402  (the repository is on sys.path above)
from raymodule.storage import Folder, is_uri, redact  # noqa: E402


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, except where there is none (None)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def run_job(main: Callable[[], int]) -> None:
    """Runs a job's ``main`` and exits with its code. A raymodule error (storage that cannot be
    used, workers that cannot be placed, a run that cannot resume as asked, a lost worker) ends
    the job with exit code 1 and its message, in the form argparse gives usage errors (which
    end with code 2), instead of a traceback."""
    try:
        code = main()
    except raymodule.RayModuleError as err:
        prog = os.path.basename(sys.argv[0])
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        code = 1
    sys.exit(code)


def check_storage(run: raymodule.RunConfig) -> None:
    """Raises :class:`raymodule.CheckpointError` saying what to change when the run's folder
    cannot be written (an object store that does not answer, a missing bucket, wrong keys, a
    local path that is a file or read-only). Called before Ray starts, so a job with a bad
    ``--storage`` ends within seconds; ``fit`` checks it again."""
    try:
        Folder(run.location).check_writable()
    except (OSError, ValueError) as err:
        if is_uri(run.storage):
            change = (
                "Pass a --storage whose server answers, whose bucket exists (or add "
                "allow_bucket_creation=true to the URI) and whose keys are right (from "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the URI), or a local folder."
            )
        else:
            change = "Pass a --storage that is a folder this machine can write (made if missing)."
        raise raymodule.CheckpointError(
            f"--storage {redact(run.storage)!r} cannot be used: {err}\n{change}"
        ) from None


def add_training_options(parser: argparse.ArgumentParser, epochs: int, batch_size: int) -> None:
    """``--workers``, ``--max-workers``, ``--epochs`` and ``--batch-size`` (see
    :func:`check_training_options`)."""
    parser.add_argument("--workers", type=int, default=2, help="Ray worker actors (1 CPU each)")
    parser.add_argument(
        "--max-workers",
        type=int,
        default=None,
        help="also ask for workers up to this many: training starts once --workers are up, and "
        "the others join as the cluster (its autoscaler) makes room (default: --workers)",
    )
    parser.add_argument("--epochs", type=int, default=epochs, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="global batch size")


def check_training_options(parser: argparse.ArgumentParser, args) -> None:
    """Ends the job with a usage error when the training options cannot work."""
    if args.workers < 1:
        parser.error(f"--workers={args.workers}: need at least 1")
    if args.max_workers is not None and args.max_workers < args.workers:
        parser.error(f"--max-workers={args.max_workers} must be at least --workers={args.workers}")
    most = max(args.workers, args.max_workers or 0)
    if args.batch_size < most:
        parser.error(f"--batch-size={args.batch_size} must be at least the workers' {most}")
    if args.epochs < 1:
        parser.error(f"--epochs={args.epochs}: need at least 1")


def contexts(args) -> list:
    """The workers the training options ask for: ``raymodule.workers(--workers,
    max_workers=--max-workers)``."""
    return raymodule.workers(args.workers, max_workers=args.max_workers)


def add_run_options(parser: argparse.ArgumentParser, checkpoint_every: int = 10) -> None:
    """``--name``, ``--storage``, ``--checkpoint-every`` and ``--resume``."""
    parser.add_argument(
        "--name",
        default=None,
        help="run name; a run started again with the same name resumes from its latest "
        "checkpoint (default: a new name, printed)",
    )
    parser.add_argument(
        "--storage",
        default="./raymodule_runs",
        help="where runs are kept: a local path or a URI such as "
        "'s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http' (keys from the "
        "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY variables)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=checkpoint_every,
        help="batches between checkpoints; 0 checkpoints only at the end of each epoch",
    )
    parser.add_argument(
        "--resume",
        choices=("auto", "never", "must"),
        default="auto",
        help="auto: continue the named run if it exists; never: refuse an existing run; "
        "must: fail unless there is a checkpoint to continue from",
    )


def run_config(parser: argparse.ArgumentParser, args) -> raymodule.RunConfig:
    """The run the options describe; a bad option ends the job with a usage error."""
    try:
        return raymodule.RunConfig(
            name=args.name,
            storage=args.storage,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
        )
    except ValueError as err:
        parser.error(
            str(err).replace("RunConfig(", "(").replace("checkpoint_every", "checkpoint-every")
        )


class EpochProgress:
    """A progress bar per epoch (a ``batch_end_callback``) showing the running training metric,
    the samples per second trained in this epoch and the number of workers training (the
    module's ``world_size``, which falls while an elastic run has lost workers). A resumed
    run starts its bar where the epoch was left.

    The rate counts from the epoch's start (the loop's ``tic``, as MXNet's fit loop has it):
    raymodule's callbacks trail the workers and come in bursts of a call's steps, so the time
    between two of them says nothing. It stays cheap: the postfix is worked out only when tqdm
    redraws (every ``mininterval`` seconds) and at the epoch's last batch."""

    def __init__(self, batches_per_epoch: int, digits: int = 3, mininterval: float = 0.5):
        self.total = batches_per_epoch
        self.digits = digits
        self.mininterval = mininterval
        self.bar = None
        self.value = float("nan")  # the training metric at the latest batch shown
        self._start = 0.0  # when the bar's epoch started (time.time())
        self._samples = 0  # samples trained since then
        self._shown = -math.inf  # when the postfix was last set

    def __call__(self, param: mx.model.BatchEndParam) -> None:
        now = time.time()
        new_bar = self.bar is None or param.nbatch == 0
        if new_bar:
            self.bar = tqdm(
                total=self.total,
                initial=param.nbatch,
                desc=f"epoch {param.epoch + 1}",
                unit="batch",
                leave=True,
                file=sys.stdout,
                mininterval=self.mininterval,
                smoothing=0,  # the mean rate since the start: reports come in bursts
            )
            self._shown, self._samples = -math.inf, 0
            # without the loop's `tic`, the rate counts from this report, and not its batch,
            # whose start is unknown
            self._start = param.locals.get("tic", now)
            self.bar.start_t = self._start  # tqdm's clock is time.time() too
        if not new_bar or "tic" in param.locals:
            self._samples += _batch_size(param.locals.get("data_batch"))
        last = param.nbatch + 1 == self.total
        if last or now - self._shown >= self.mininterval:
            self._shown = now
            names, values = param.eval_metric.get()
            if not isinstance(names, list):
                names, values = [names], [values]
            self.value = values[0]
            postfix = {n: f"{v:.{self.digits}f}" for n, v in zip(names, values)}
            if now > self._start and self._samples:
                postfix["samples/s"] = f"{self._samples / (now - self._start):,.0f}"
            module = param.locals.get("self")
            if module is not None:
                postfix["workers"] = module.world_size
            self.bar.set_postfix(postfix, refresh=False)  # drawn by update, at its interval
        self.bar.update(1)
        if last:
            self.bar.close()


def _batch_size(data_batch) -> int:
    """The samples in a global batch (its pad included, as MXNet's Speedometer counts them);
    a ``raymodule.DatasetIter``'s batch under ``fit`` holds its indices, not its arrays."""
    if data_batch is None:
        return 0
    if data_batch.data:
        return data_batch.data[0].shape[0]
    return 0 if data_batch.index is None else len(data_batch.index)
