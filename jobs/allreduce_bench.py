"""Time one dense gradient's sum between co-located workers: shared memory against gloo.

Two Ray workers on one node form raymodule's gradient group twice, each time as raymodule's
workers form it (``Collective``): once summing dense gradients through shared memory (the
default) and once all over gloo on 127.0.0.1 (``shared_memory=False``, what
``RAYMODULE_SHM_ALLREDUCE=0`` gives raymodule's workers). Each worker sums a float32 gradient
(670,000 elements, 2.68 MB: one bucket) ``--calls`` times with ``Collective.reduce``, after
``--warmup`` calls not counted, and times each call (from the call until the sum is back in
the gradient). Printed per way: worker 0's median and 90th percentile, in milliseconds.

Run locally (starts a Ray on 127.0.0.1 with 4 logical CPUs):

    python jobs/allreduce_bench.py --calls 200

Run on a Ray cluster with room for 2 one-CPU workers on one node:

    ray job submit --working-dir . -- python jobs/allreduce_bench.py --calls 200
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray on 127.0.0.1
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import jobtools  # noqa: E402  (puts the repository on sys.path)
import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402

from raymodule.worker.collective import Collective, free_address  # noqa: E402

WORKERS = 2


@ray.remote(num_cpus=1)
class Worker:
    """One member of the gradient group, with its gradient."""

    def __init__(self, elements: int, seed: int):
        self.grad = mx.nd.array(np.random.default_rng(seed).standard_normal(elements, "float32"))
        self.collective = None

    def address(self) -> str:
        return free_address()

    def join(self, rank: int, address: str, shared_memory: bool) -> None:
        self.collective = Collective(WORKERS, rank, address, "gloo", 300, shared_memory)

    def run(self, calls: int, warmup: int) -> list[float]:
        """Seconds of each of ``calls`` sums, after ``warmup`` sums not counted."""
        seconds = []
        for call in range(warmup + calls):
            self.grad.wait_to_read()
            tic = time.perf_counter()
            self.collective.reduce([self.grad], 4 << 20)
            self.grad.wait_to_read()
            if call >= warmup:
                seconds.append(time.perf_counter() - tic)
        return seconds

    def close(self) -> None:
        self.collective.close()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=jobtools.HelpFormatter
    )
    parser.add_argument("--calls", type=int, default=200, help="sums timed per way")
    parser.add_argument("--warmup", type=int, default=20, help="sums before the timed ones")
    parser.add_argument("--elements", type=int, default=670_000, help="float32s in the gradient")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.warmup < 0 or args.elements < 1:
        parser.error("--calls and --elements must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not os.environ.get("RAY_ADDRESS"):
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    workers = [Worker.remote(args.elements, seed) for seed in range(WORKERS)]
    print(
        f"{WORKERS} workers on one node, a {args.elements:,}-element float32 gradient "
        f"({args.elements * 4 / 1e6:.2f} MB), {args.calls} sums per way "
        f"(worker 0's, in ms)"
    )
    print(f"{'way':<15}{'median':>10}{'p90':>10}")
    for way, shared_memory in (("shared memory", True), ("gloo", False)):
        address = ray.get(workers[0].address.remote(), timeout=300)
        ray.get(
            [w.join.remote(r, address, shared_memory) for r, w in enumerate(workers)], timeout=300
        )
        try:
            seconds = ray.get(
                [w.run.remote(args.calls, args.warmup) for w in workers], timeout=3600
            )[0]
        finally:
            ray.get([w.close.remote() for w in workers], timeout=60)
        p90 = statistics.quantiles(seconds, n=10)[-1]
        print(f"{way:<15}{statistics.median(seconds) * 1e3:>10.2f}{p90 * 1e3:>10.2f}")
    return 0


if __name__ == "__main__":
    jobtools.run_job(main)
