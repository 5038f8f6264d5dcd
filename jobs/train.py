"""Train a handwritten-digit classifier with raymodule on 2 Ray workers.

The data are scikit-learn's 8x8 handwritten digits (1,797 images, shipped inside the package:
nothing is downloaded). The model is an MLP; each global batch is split across the workers and
their gradients are summed, so the result is what one MXNet device would train.

With ``--data recordio`` the data are image records instead: an MXNet indexed RecordIO pair
(``--rec``, ``--idx``, as ``im2rec`` or ``jobs/digits_rec.py`` write them; local paths or
URIs such as ``s3://...``) that each worker reads its own rows of, and the model is a small
CNN over ``--data-shape`` images (pixel values 0-255).

The run is checkpointed to ``--storage``/``--name`` (every ``--checkpoint-every`` batches and
at each epoch's end); started again with the same name, it resumes where it stopped.

Run locally (raymodule starts a Ray on 127.0.0.1 with this machine's CPUs):

    python jobs/train.py
    python jobs/train.py --name digits --epochs 20 --output ./digits-model
    python jobs/train.py --data recordio --rec digits_rec/train.rec --idx digits_rec/train.idx \
        --test-rec digits_rec/test.rec --test-idx digits_rec/test.idx --data-shape 1,8,8

Run on a Ray cluster (from the repository root; the job joins the cluster through RAY_ADDRESS),
with the run in object storage so that a resubmitted job resumes it:

    ray job submit --working-dir . -- python jobs/train.py --name digits \
        --storage 's3://my-bucket/runs?region=us-east-1'
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
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
    contexts,
    run_config,
    run_job,
)
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import raymodule


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The optimizer, the seed, the run and the export: this job's and digits_rec.py's."""
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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train an MLP on scikit-learn's handwritten digits (or a small CNN on "
        "MXNet RecordIO image records) with raymodule workers.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--data",
        choices=("digits", "recordio"),
        default="digits",
        help="digits: scikit-learn's digits, an MLP; recordio: the image records of --rec and "
        "--idx, a small CNN, each worker reading its own records",
    )
    parser.add_argument(
        "--rec", default=None, help="with --data recordio: the training .rec (a path or a URI)"
    )
    parser.add_argument(
        "--idx", default=None, help="with --data recordio: the training .rec's .idx file"
    )
    parser.add_argument(
        "--test-rec",
        default=None,
        help="with --data recordio: the .rec to report test accuracy on (with --test-idx; "
        "default: the training records)",
    )
    parser.add_argument(
        "--test-idx", default=None, help="with --data recordio: the --test-rec's .idx file"
    )
    parser.add_argument(
        "--data-shape",
        default="1,8,8",
        help="with --data recordio: channels,height,width the images are resized and cropped to",
    )
    parser.add_argument(
        "--classes", type=int, default=10, help="with --data recordio: labels 0 .. classes-1"
    )
    add_training_options(parser, epochs=15, batch_size=64)
    add_model_options(parser)
    args = parser.parse_args(argv)
    check_training_options(parser, args)
    if args.data == "recordio":
        check_recordio_options(parser, args)
    elif args.rec or args.idx or args.test_rec or args.test_idx:
        parser.error("--rec, --idx, --test-rec and --test-idx need --data recordio")
    args.run = run_config(parser, args)
    return args


def check_recordio_options(parser: argparse.ArgumentParser, args) -> None:
    """Ends the job with a usage error when the RecordIO options cannot work; sets
    ``args.data_shape`` to a tuple."""
    if not (args.rec and args.idx):
        parser.error("--data recordio needs --rec and --idx")
    if bool(args.test_rec) != bool(args.test_idx):
        parser.error("--test-rec and --test-idx go together")
    try:
        shape = tuple(int(d) for d in args.data_shape.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        parser.error(f"--data-shape={args.data_shape!r} must be 3 positive ints: C,H,W")
    args.data_shape = shape
    if args.classes < 2:
        parser.error(f"--classes={args.classes}: need at least 2")


def mlp(classes: int = 10) -> mx.sym.Symbol:
    net = mx.sym.Variable("data")
    for i, width in enumerate((128, 64)):
        net = mx.sym.Activation(
            mx.sym.FullyConnected(net, num_hidden=width, name=f"fc{i}"), act_type="relu"
        )
    net = mx.sym.FullyConnected(net, num_hidden=classes, name="out")
    return mx.sym.SoftmaxOutput(net, name="softmax")


def cnn(classes: int = 10) -> mx.sym.Symbol:
    """A small CNN over images of pixel values 0-255 (any height and width of at least 2)."""
    net = mx.sym.Variable("data") * (1 / 255)
    net = mx.sym.Convolution(net, kernel=(3, 3), pad=(1, 1), num_filter=16, name="conv0")
    net = mx.sym.Pooling(
        mx.sym.Activation(net, act_type="relu"), pool_type="max", kernel=(2, 2), stride=(2, 2)
    )
    net = mx.sym.FullyConnected(mx.sym.flatten(net), num_hidden=64, name="fc0")
    net = mx.sym.FullyConnected(
        mx.sym.Activation(net, act_type="relu"), num_hidden=classes, name="out"
    )
    return mx.sym.SoftmaxOutput(net, name="softmax")


def records(args) -> tuple[raymodule.DatasetIter, raymodule.DatasetIter]:
    """The (training, test) iterators over the RecordIO files the options name: the training
    one shuffles by ``--seed`` (a resumed run gets the same order) and drops a last partial
    batch; the test one is the training records when no test files are given."""
    train = raymodule.RecordIODataset(args.rec, args.idx, args.data_shape)
    test = (
        raymodule.RecordIODataset(args.test_rec, args.test_idx, args.data_shape)
        if args.test_rec
        else train
    )
    return (
        raymodule.DatasetIter(
            train, args.batch_size, shuffle=True, seed=args.seed, last_batch_handle="discard"
        ),
        raymodule.DatasetIter(test, args.batch_size),
    )


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
    if args.data == "recordio":
        try:
            train, test = records(args)
        except ValueError as err:  # files that cannot be read: their error says which
            raise SystemExit(f"{os.path.basename(sys.argv[0])}: error: {err}") from None
        symbol = cnn(args.classes)
        print(
            f"recordio: {train.num_data} training and {test.num_data} test images of "
            f"{args.data_shape} (C,H,W); {args.workers} workers, global batch {args.batch_size}"
        )
    else:
        train, test = digits(args.seed, args.batch_size)
        symbol = mlp()
        print(
            f"digits: {train.num_data} training and {test.num_data} test images of 8x8 "
            f"pixels; {args.workers} workers, global batch {args.batch_size}"
        )
    return fit_and_report(args, symbol, train, test)


def fit_and_report(args, symbol: mx.sym.Symbol, train, test) -> int:
    """Trains ``symbol`` on ``train`` as the options say (SGD, a run in ``--storage``, a
    progress bar), prints its accuracy on ``test`` and where the run and model are."""
    mx.random.seed(args.seed)
    start = time.monotonic()
    with raymodule.Module(symbol, context=contexts(args)) as mod:
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
