"""A training process for the kill tests: trains a run on 2 workers of the Ray at RAY_ADDRESS
(with ``--hog-mid-epoch``, of a Ray it starts).

    python tests/run_child.py STORAGE NAME OUT [--kill-mid-epoch E] [--sigterm-mid-epoch E]
                              [--lose-every-worker] [--hog-mid-epoch E]
                              [--data {client,ndarrayiter,dataset}]

Writes the final parameters to OUT (MXNet's ``.params``). With ``--kill-mid-epoch E`` it
SIGKILLs itself in epoch E, while the workers wait at its batch 8, once a checkpoint from
inside that epoch is committed; with ``--sigterm-mid-epoch E`` worker 0 sends it SIGTERM at
batch 1 of epoch E (as ``ray job stop`` or a preemption would), and nothing else, or, with
``--lose-every-worker`` too, every worker dies (SIGKILL) at batch 2; with
``--hog-mid-epoch E`` it starts a Ray of its own whose memory monitor kills above the
machine's use + 3 GiB, and worker 1 takes memory at batch 8 of epoch E until it is killed
for it. Faults are keyed to the workers' steps (:mod:`stepfaults`), not to the client's
trailing callbacks.
The data is shuffled, from a DataIter the client reads (``--data client``, the default: a
subclass of ``mx.io.NDArrayIter``), a plain ``mx.io.NDArrayIter`` (``ndarrayiter``: fit reads
it as rows) or a :class:`raymodule.data.DatasetIter` (``dataset``); with the last two the
controller runs each epoch's plan.

The tests compare what it writes with plain MXNet trained on the same data in their own
process: :func:`train_data` and :data:`FIT` are both runs' recipe, and
:func:`native_params` that run.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from functools import partial

import mxnet as mx
import numpy as np
import ray

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stepfaults  # noqa: E402
from conftest import ClientIter, dataset, mlp  # noqa: E402

import raymodule  # noqa: E402
import raymodule.controller.plans  # noqa: E402
import raymodule.module  # noqa: E402

FIT = {"num_epoch": 3, "optimizer_params": {"learning_rate": 0.1, "momentum": 0.9}}


def train_data(kind: str) -> mx.io.DataIter:
    """160 samples in shuffled batches of 10, read as ``--data kind`` says; this seeds
    NumPy's generator (NDArrayIter shuffles with it)."""
    x, y = dataset(n=160)
    np.random.seed(5)
    if kind == "dataset":
        return raymodule.data.DatasetIter(
            raymodule.data.ArrayDataset(x, y), 10, shuffle=True, seed=5
        )
    return (ClientIter if kind == "client" else mx.io.NDArrayIter)(
        x, y, batch_size=10, shuffle=True
    )


def saved_params(path) -> dict:
    """The arg parameters a run wrote to OUT (``save_params``), by name."""
    return {k[4:]: v for k, v in mx.nd.load(str(path)).items() if k.startswith("arg:")}


def native_params(kind: str) -> dict:
    """The arg parameters of a run never stopped, trained by plain MXNet on one device."""
    train = train_data(kind)
    mx.random.seed(0)
    mod = mx.mod.Module(mlp(), context=mx.cpu())
    mod.fit(train, **FIT)
    return mod.get_params()[0]


MEMORY_MARGIN_GIB = 3  # memory a worker may take above the machine's use before Ray kills it
MEMORY_CAP_GIB = MEMORY_MARGIN_GIB + 2  # the most it takes (then it fails: not killed)


def start_ray_that_kills_for_memory() -> None:
    """A Ray of this process's own on 127.0.0.1 whose memory monitor kills workers once the
    machine uses :data:`MEMORY_MARGIN_GIB` more than now (Ray's default: 95 %)."""
    with open("/proc/meminfo") as f:
        kib = {line.split(":")[0]: int(line.split()[1]) for line in f}
    used = 1 - kib["MemAvailable"] / kib["MemTotal"]
    threshold = used + MEMORY_MARGIN_GIB * 2**20 / kib["MemTotal"]
    print(f"Ray kills workers for memory above {threshold:.1%} of it", flush=True)
    ray.init(
        num_cpus=4, include_dashboard=False, log_to_driver=False,
        _system_config={"memory_usage_threshold": threshold, "memory_monitor_refresh_ms": 50},
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("storage")
    parser.add_argument("name")
    parser.add_argument("out")
    parser.add_argument("--kill-mid-epoch", type=int, default=None)
    parser.add_argument("--sigterm-mid-epoch", type=int, default=None)
    parser.add_argument("--lose-every-worker", action="store_true")
    parser.add_argument("--hog-mid-epoch", type=int, default=None)
    parser.add_argument("--data", choices=["client", "ndarrayiter", "dataset"], default="client")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    run_folder = os.path.join(args.storage, args.name)

    def kill_self_once_a_mid_epoch_checkpoint_is_committed(mod):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ckpt = raymodule.latest_checkpoint(run_folder)
            if ckpt is not None and ckpt.epoch == args.kill_mid_epoch and ckpt.batch > 0:
                print(f"killing myself after {ckpt.name}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.05)
        raise RuntimeError("no mid-epoch checkpoint was committed")

    # Faults keyed to the workers' own steps: 16 batches an epoch; calls of 4 of them, so that a
    # checkpoint and a stop land inside an epoch this short
    os.environ.setdefault("RAYMODULE_STEPS_PER_CALL", "4")
    plan, actions = {}, {}
    if args.kill_mid_epoch is not None:  # the workers wait at batch 8 while this process dies
        # no call ahead of the one read: the checkpoint at batch 6 is then the newest asked for
        # when the workers stop at batch 8 (a newer one would wait for them, superseding it)
        os.environ["RAYMODULE_PIPELINE_DEPTH"] = "0"
        plan[(16 * args.kill_mid_epoch + 8, None)] = ("gate", "kill")
        actions["kill"] = kill_self_once_a_mid_epoch_checkpoint_is_committed
    elif args.sigterm_mid_epoch is not None:  # worker 0 at batch 1 sends this process SIGTERM
        plan[(16 * args.sigterm_mid_epoch + 1, 0)] = ("signal", os.getpid(), signal.SIGTERM)
        print("sending myself SIGTERM (from worker 0, at batch 1)", flush=True)
        if args.lose_every_worker:  # before the steps in flight end
            plan[(16 * args.sigterm_mid_epoch + 2, None)] = "die"
        if args.data != "client":  # the controller runs ahead of this process: it waits at
            # batch 4 until this process asked it to stop the epoch's plan, so the stop lands
            # inside the epoch
            cancelled = threading.Event()
            cancel = raymodule.controller.plans.StopFlag.ask

            def noted(flag, *args, **kwargs):
                cancelled.set()
                return cancel(flag, *args, **kwargs)

            raymodule.controller.plans.StopFlag.ask = noted
            plan[(16 * args.sigterm_mid_epoch + 4, None)] = ("gate", "cancelled")
            actions["cancelled"] = lambda mod: cancelled.wait(120) or sys.exit("never cancelled")
    if args.hog_mid_epoch is not None:  # worker 1 at batch 8 takes memory until Ray kills it
        plan[(16 * args.hog_mid_epoch + 8, 1)] = ("hog", MEMORY_CAP_GIB)
        start_ray_that_kills_for_memory()
    marks = os.path.join(args.storage, f"{args.name}-faults")  # the test's folder: it is removed
    os.makedirs(marks, exist_ok=True)
    raymodule.module.ControllerHandle = stepfaults.with_workers(
        stepfaults.worker_class(plan, marks)
    )
    train = train_data(args.data)
    mx.random.seed(0)
    with (
        raymodule.Module(mlp(), context=[mx.cpu(0), mx.cpu(1)]) as mod,
        stepfaults.Gates(marks, {name: partial(a, mod) for name, a in actions.items()}),
    ):
        mod.fit(
            train,
            **FIT,
            # every 5 in the SIGTERM runs: a plan's chunks end at each, so that a stop lands
            # inside an epoch; the checkpoint taken for the signal is mostly none of those
            run=raymodule.RunConfig(
                name=args.name,
                storage=args.storage,
                checkpoint_every=5 if args.sigterm_mid_epoch is not None else 3,
            ),
        )
        mod.save_params(args.out)
    print("done", flush=True)


if __name__ == "__main__":
    main()
