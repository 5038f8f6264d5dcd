"""What the jobs in jobs/ share: the training options (workers, epochs, batch size), the options
of a run (name, storage, checkpoints, resume) and a progress bar per epoch.

The jobs import it first (their folder is on ``sys.path`` when they run); it puts the
repository on ``sys.path`` for ``raymodule``, which a checkout run with
``ray job submit --working-dir .`` needs."""

from __future__ import annotations

import argparse
import os
import sys

import mxnet as mx
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import raymodule  # noqa: E402  (the repository is on sys.path above)


def add_training_options(parser: argparse.ArgumentParser, epochs: int, batch_size: int) -> None:
    """``--workers``, ``--epochs`` and ``--batch-size`` (see :func:`check_training_options`)."""
    parser.add_argument("--workers", type=int, default=2, help="Ray worker actors (1 CPU each)")
    parser.add_argument("--epochs", type=int, default=epochs, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="global batch size")


def check_training_options(parser: argparse.ArgumentParser, args) -> None:
    """Ends the job with a usage error when the training options cannot work."""
    if args.workers < 1:
        parser.error(f"--workers={args.workers}: need at least 1")
    if args.batch_size < args.workers:
        parser.error(f"--batch-size={args.batch_size} must be at least --workers={args.workers}")
    if args.epochs < 1:
        parser.error(f"--epochs={args.epochs}: need at least 1")


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
    """A progress bar per epoch with the running training metric (a ``batch_end_callback``);
    a resumed run starts its bar where the epoch was left."""

    def __init__(self, batches_per_epoch: int, digits: int = 3):
        self.total = batches_per_epoch
        self.digits = digits
        self.bar = None
        self.value = float("nan")  # the training metric at the latest batch

    def __call__(self, param: mx.model.BatchEndParam) -> None:
        if self.bar is None or param.nbatch == 0:
            self.bar = tqdm(
                total=self.total,
                initial=param.nbatch,
                desc=f"epoch {param.epoch + 1}",
                unit="batch",
                leave=True,
                file=sys.stdout,
                mininterval=0.5,
            )
        name, self.value = param.eval_metric.get()
        self.bar.set_postfix({name: f"{self.value:.{self.digits}f}"})
        self.bar.update(1)
        if param.nbatch + 1 == self.total:
            self.bar.close()
