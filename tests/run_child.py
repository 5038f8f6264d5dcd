"""A training process for the kill tests: trains a run on 2 workers of the Ray at RAY_ADDRESS.

    python tests/run_child.py STORAGE NAME OUT [--kill-mid-epoch E] [--sigterm-mid-epoch E]

Writes the final parameters to OUT (MXNet's ``.params``). With ``--kill-mid-epoch E`` it
SIGKILLs itself in epoch E, once a checkpoint from inside that epoch is committed; with
``--sigterm-mid-epoch E`` it sends itself SIGTERM in epoch E (as ``ray job stop`` or a
preemption would), and nothing else.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

import mxnet as mx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import dataset, mlp  # noqa: E402

import raymodule  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("storage")
parser.add_argument("name")
parser.add_argument("out")
parser.add_argument("--kill-mid-epoch", type=int, default=None)
parser.add_argument("--sigterm-mid-epoch", type=int, default=None)
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
run_folder = os.path.join(args.storage, args.name)


def kill_mid_epoch(param):
    # by batch 8's callback the loop has read batch 8, so the checkpoints at batches 3 and 6
    # were handed to the writer
    if param.epoch != args.kill_mid_epoch or param.nbatch != 8:
        return
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ckpt = raymodule.latest_checkpoint(run_folder)
        if ckpt is not None and ckpt.epoch == args.kill_mid_epoch and ckpt.batch > 0:
            print(f"killing myself after {ckpt.name}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.05)
    raise RuntimeError("no mid-epoch checkpoint was committed")


def sigterm_mid_epoch(param):
    if (param.epoch, param.nbatch) == (args.sigterm_mid_epoch, 1):
        print("sending myself SIGTERM", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)


callback = None
if args.kill_mid_epoch is not None:
    callback = kill_mid_epoch
elif args.sigterm_mid_epoch is not None:
    callback = sigterm_mid_epoch
x, y = dataset(n=160)
np.random.seed(5)
train = mx.io.NDArrayIter(x, y, batch_size=10, shuffle=True)
mx.random.seed(0)
with raymodule.Module(mlp(), context=[mx.cpu(0), mx.cpu(1)]) as mod:
    mod.fit(
        train,
        num_epoch=3,
        optimizer_params={"learning_rate": 0.1, "momentum": 0.9},
        batch_end_callback=callback,
        # every 5 in the SIGTERM runs: the checkpoint taken for the signal is none of those
        run=raymodule.RunConfig(
            name=args.name,
            storage=args.storage,
            checkpoint_every=5 if args.sigterm_mid_epoch is not None else 3,
        ),
    )
    mod.save_params(args.out)
print("done", flush=True)
