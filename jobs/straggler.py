"""What ``work_load_list="auto"`` buys when one worker is slower: samples/s of a static split
against the controller's re-weighted one.

Trains jobs/benchmark.py's MLP (global batch 128) on 2 raymodule workers, one of which is
slowed deterministically: after its forward pass it sleeps ``--slow`` seconds per sample of its
share (a slower machine, without the noise of one). Each of ``--repeats`` rounds runs ``fit``
with ``work_load_list=[1, 1]`` and then with ``"auto"`` (re-weighting every
``RAYMODULE_BALANCE_EVERY_STEPS`` steps, 50 unless set) and prints, per run, the samples/s over
the epochs after the first, the weights the controller ended with and the workers' shares of
a batch. ``--slow 0`` shows what ``"auto"`` costs when no worker is slower.

Run locally (starts a Ray on 127.0.0.1 with 4 logical CPUs, in a temporary folder, and stops
it at the end):

    python jobs/straggler.py
    python jobs/straggler.py --slow 0 --repeats 3

Run on a Ray cluster with room for 2 one-CPU workers:

    ray job submit --working-dir . -- python jobs/straggler.py --slow 0.0002
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workload  # noqa: E402 - jobs/ is not a package: its models and thread settings

BATCH = 128


def slow_worker_class():
    """ModuleWorker with ``set_slow(seconds_per_sample)``: sleeps that long per sample of its
    share of each training step, after its forward pass."""
    from raymodule.worker import ModuleWorker

    class SlowWorker(ModuleWorker):
        _slow = 0.0

        def set_slow(self, seconds_per_sample: float) -> None:
            self._slow = seconds_per_sample

        def _load(self, mid, batch, is_train):
            loaded = super()._load(mid, batch, is_train)
            if self._slow and is_train:
                time.sleep(self._slow * batch.data[0].shape[0])
            return loaded

    return SlowWorker


def one_fit(mx, raymodule, x, y, work_load, args) -> str:
    """One fit of the MLP on 2 workers, worker 1 slowed; its line of the table."""
    mx.random.seed(0)
    symbol = workload.build_symbol(mx, "mlp")
    quiet = logging.getLogger("straggler")  # fit's bind says the module is bound: it is
    quiet.setLevel(logging.ERROR)
    mod = raymodule.Module(
        symbol, context=[mx.cpu(0), mx.cpu(1)], work_load_list=work_load, logger=quiet
    )
    train = mx.io.NDArrayIter(x, y, BATCH, label_name="softmax_label")
    mod.bind(train.provide_data, train.provide_label)  # to slow worker 1 before fit
    mod.workers.call("set_slow", args.slow, ranks=[1])
    marks: list[float] = []
    mod.fit(
        train,
        num_epoch=args.epochs,
        optimizer="sgd",
        optimizer_params={"learning_rate": 0.01, "momentum": 0.9, "rescale_grad": 1 / BATCH},
        epoch_end_callback=lambda *_: marks.append(time.perf_counter()),
    )
    rate = BATCH * args.batches * (len(marks) - 1) / (marks[-1] - marks[0])
    weights = mod.workers.work_load or [1.0, 1.0]
    shares = [cut.stop - cut.start for cut in mod._slices]
    mod.close()
    name = "auto" if work_load == "auto" else str(work_load)
    return (
        f"{name:>8}  {rate:>9,.0f}  {', '.join(f'{w:.3f}' for w in weights):>13}  "
        f"{', '.join(map(str, shares)):>8}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--slow",
        type=float,
        default=2e-4,
        help="seconds worker 1 sleeps per sample of its share (default 0.0002)",
    )
    parser.add_argument(
        "--batches", type=int, default=60, help="global batches per epoch (default 60)"
    )
    parser.add_argument(
        "--epochs", type=int, default=5, help="epochs per fit; the first is warm-up (default 5)"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="rounds of a static and an auto fit (default 2)"
    )
    args = parser.parse_args(argv)
    if args.slow < 0 or args.batches < 1 or args.epochs < 2 or args.repeats < 1:
        parser.error("--slow must be >= 0, --batches and --repeats >= 1, --epochs >= 2")
    os.environ.update(workload.THREAD_ENV)
    os.environ.update(workload.RAY_ENV)

    import mxnet as mx
    import numpy as np
    import ray

    import raymodule
    import raymodule.module
    from raymodule.handle import ControllerHandle

    worker_class = slow_worker_class()
    raymodule.module.ControllerHandle = lambda contexts, **kw: ControllerHandle(
        contexts, worker_class, **kw
    )
    own_tmp = None if os.environ.get("RAY_ADDRESS") else tempfile.mkdtemp(prefix="rst-")
    try:
        if own_tmp is None:  # under `ray job submit`: join the cluster in RAY_ADDRESS
            ray.init(log_to_driver=False)
        else:  # a new private cluster, never someone else's `ray start` one
            os.environ["RAY_TMPDIR"] = own_tmp
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        rng = np.random.default_rng(0)
        x = rng.random((BATCH * args.batches, 784), dtype=np.float32)
        y = rng.integers(0, 10, BATCH * args.batches).astype(np.float32)
        print(
            f"mlp, 2 workers, global batch {BATCH}, worker 1 slowed {args.slow * 1e3:g} ms "
            "per sample"
        )
        print("work_load  samples/s  weights (end)    shares")
        for _ in range(args.repeats):
            for work_load in ([1, 1], "auto"):
                print(one_fit(mx, raymodule, x, y, work_load, args), flush=True)
    finally:
        ray.shutdown()
        if own_tmp is not None:
            shutil.rmtree(own_tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
