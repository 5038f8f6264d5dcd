"""Train a handwritten-digit classifier with raymodule on 2 Ray workers.

The data are scikit-learn's 8x8 handwritten digits (1,797 images, shipped inside the package:
nothing is downloaded). The model is an MLP; each global batch is split across the workers and
their gradients are summed, so the result is what one MXNet device would train.

The run is checkpointed to ``--storage``/``--name`` (every ``--checkpoint-every`` batches and
at each epoch's end); started again with the same name, it resumes where it stopped.

Run locally (raymodule starts a Ray on 127.0.0.1 with this machine's CPUs):

    python jobs/train.py
    python jobs/train.py --name digits --epochs 20 --output ./digits-model

Run on a Ray cluster (from the repository root; the job joins the cluster through RAY_ADDRESS),
with the run in object storage so that a resubmitted job resumes it:

    ray job submit --working-dir . -- python jobs/train.py --name digits \
        --storage 's3://my-bucket/runs?region=us-east-1'
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import mxnet as mx
import numpy as np
from jobtools import (
    EpochProgress,
    HelpFormatter,
    add_run_options,
    add_training_options,
    check_storage,
    check_training_options,
    run_config,
    run_job,
)
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import raymodule


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train an MLP on scikit-learn's handwritten digits with raymodule workers.",
        formatter_class=HelpFormatter,
    )
    add_training_options(parser, epochs=15, batch_size=64)
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--seed", type=int, default=42, help="seed of the split and the init")
    add_run_options(parser)
    parser.add_argument(
        "--output",
        default=None,
        help="also export the trained model to this folder as a plain MXNet checkpoint "
        "(model-symbol.json, model-NNNN.params)",
    )
    args = parser.parse_args(argv)
    check_training_options(parser, args)
    args.run = run_config(parser, args)
    return args


def mlp(classes: int = 10) -> mx.sym.Symbol:
    net = mx.sym.Variable("data")
    for i, width in enumerate((128, 64)):
        net = mx.sym.Activation(
            mx.sym.FullyConnected(net, num_hidden=width, name=f"fc{i}"), act_type="relu"
        )
    net = mx.sym.FullyConnected(net, num_hidden=classes, name="out")
    return mx.sym.SoftmaxOutput(net, name="softmax")


def digits(seed: int, batch_size: int) -> tuple[mx.io.NDArrayIter, mx.io.NDArrayIter]:
    """scikit-learn's digits as (training, test) iterators: a stratified 80/20 split by
    ``seed``. The training iterator shuffles with numpy's RNG, seeded here, so a process that
    makes it again gets the same order (as a resumed run needs), and drops a last partial
    batch."""
    data = load_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target.astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=seed, stratify=y
    )
    np.random.seed(seed)
    train = mx.io.NDArrayIter(
        x_train, y_train, batch_size=batch_size, shuffle=True, last_batch_handle="discard"
    )
    return train, mx.io.NDArrayIter(x_test, y_test, batch_size=batch_size)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("raymodule.run").setLevel(logging.INFO)  # where the run resumes
    check_storage(args.run)  # before Ray starts: a --storage that cannot be written ends here
    train, test = digits(args.seed, args.batch_size)
    print(
        f"digits: {train.num_data} training and {test.num_data} test images of 8x8 pixels; "
        f"{args.workers} workers, global batch {args.batch_size}"
    )

    mx.random.seed(args.seed)
    start = time.monotonic()
    with raymodule.Module(mlp(), context=raymodule.workers(args.workers)) as mod:
        mod.fit(
            train,
            eval_metric="acc",
            optimizer="sgd",
            optimizer_params={"learning_rate": args.lr, "momentum": args.momentum, "wd": 1e-4},
            initializer=mx.init.Xavier(),
            num_epoch=args.epochs,
            batch_end_callback=EpochProgress(train.num_data // args.batch_size),
            run=args.run,
        )
        elapsed = time.monotonic() - start
        ((_, accuracy),) = mod.score(test, "acc")
        if args.output:
            os.makedirs(args.output, exist_ok=True)
            prefix = os.path.abspath(os.path.join(args.output, "model"))
            mod.save_checkpoint(prefix, args.epochs)
    print(f"test accuracy: {accuracy:.4f} after {args.epochs} epochs ({elapsed:.1f} s)")
    ckpt = raymodule.latest_checkpoint(args.run.location)
    print(f"latest checkpoint: {ckpt.location} (epoch {ckpt.epoch}, step {ckpt.global_step})")
    if args.output:
        print(
            f"model saved to {prefix}-symbol.json and {prefix}-{args.epochs:04d}.params "
            f"(load with mx.mod.Module.load({prefix!r}, {args.epochs}))"
        )
    return 0


if __name__ == "__main__":
    run_job(main)
