"""Measure what a row-sparse gradient costs to sum across workers, against a dense allreduce.

Two Ray workers (one gloo group on 127.0.0.1, as raymodule's workers form it) each hold the
gradient of a 1,000,000 x 64 float32 embedding in which their own batch touched 1% of the
rows (chosen at random per worker, so the rows differ). Each step sums it across the group in
two ways, with raymodule's own ``Collective.reduce``:

- sparse: as a ``RowSparseNDArray``, which raymodule reduces by gathering every worker's row
  ids and rows (counts first, then ids and rows padded to the most rows a worker has) and
  adding the rows of one id;
- dense: the same gradient as a dense array, reduced by one allreduce, as MXNet's KVStore
  would sum it after densifying.

Reported per way, the median over the steps:

- payload: the bytes this worker handed to the collective calls (``reduce``'s own count);
- sent, computed: what the algorithms put on the wire for that payload, per worker: a ring
  all-gather sends (N-1) x its payload, a ring allreduce 2 (N-1)/N x the array;
- sent, measured: the bytes the worker process wrote to sockets during the call (``wchar`` of
  ``/proc/self/io``, which counts gloo's writes; Linux only);
- seconds per step.

Run locally (starts a Ray on 127.0.0.1 with 4 logical CPUs):

    python jobs/sparse_bytes.py --steps 5

Run on a Ray cluster with room for 2 one-CPU workers:

    ray job submit --working-dir . -- python jobs/sparse_bytes.py --steps 5
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


def written_bytes() -> int | None:
    """Bytes this process has written through write-like calls (sockets included)."""
    try:
        with open("/proc/self/io") as io:
            return next(int(line.split()[1]) for line in io if line.startswith("wchar:"))
    except OSError:
        return None


@ray.remote(num_cpus=1)
class Worker:
    """One member of the gradient group, with its gradient."""

    def __init__(self, rows: int, width: int, touched: float, seed: int):
        rng = np.random.default_rng(seed)
        self.ids = np.sort(rng.choice(rows, int(rows * touched), replace=False)).astype("int64")
        self.rows = rng.standard_normal((len(self.ids), width), dtype="float32")
        self.shape = (rows, width)
        self.collective = None

    def address(self) -> str:
        return free_address()

    def join(self, rank: int, address: str) -> None:
        self.collective = Collective(WORKERS, rank, address, "gloo", 300)

    def step(self, way: str) -> dict:
        """Sums this worker's gradient across the group one ``way``; what it cost here."""
        grad = mx.nd.sparse.row_sparse_array((self.rows, self.ids), shape=self.shape)
        if way == "dense":
            grad = grad.tostype("default")
        grad.wait_to_read()
        before, tic = written_bytes(), time.perf_counter()
        payload = self.collective.reduce([grad], 4 << 20)
        grad.wait_to_read()
        seconds, after = time.perf_counter() - tic, written_bytes()
        return {
            "payload": payload,
            "measured": None if before is None else after - before,
            "seconds": seconds,
            "rows": len(grad.indices) if way == "sparse" else grad.shape[0],
        }

    def close(self) -> None:
        self.collective.close()


def wire_bytes(way: str, payload: int) -> float:
    """Bytes a worker sends for ``payload`` under ring algorithms."""
    if way == "dense":
        return 2 * (WORKERS - 1) / WORKERS * payload
    return (WORKERS - 1) * payload


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=jobtools.HelpFormatter
    )
    parser.add_argument("--steps", type=int, default=5, help="steps measured for each way")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the embedding")
    parser.add_argument("--width", type=int, default=64, help="columns of the embedding")
    parser.add_argument(
        "--touched", type=float, default=0.01, help="fraction of the rows each worker touches"
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rows < 1 or args.width < 1 or not 0 <= args.touched <= 1:
        parser.error("--steps, --rows and --width must be >= 1 and --touched within [0, 1]")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not os.environ.get("RAY_ADDRESS"):
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    workers = [Worker.remote(args.rows, args.width, args.touched, seed) for seed in range(WORKERS)]
    try:
        address = ray.get(workers[0].address.remote(), timeout=300)
        ray.get([w.join.remote(r, address) for r, w in enumerate(workers)], timeout=300)
        dense_bytes = args.rows * args.width * 4
        print(
            f"{WORKERS} workers, a {args.rows:,} x {args.width} float32 gradient "
            f"({dense_bytes / 1e6:.1f} MB dense), {args.touched:.2%} of the rows touched by "
            f"each worker, {args.steps} steps per way (medians; bytes per worker per step)"
        )
        print(
            f"{'way':<7}{'payload':>14}{'sent, computed':>17}{'sent, measured':>17}{'seconds':>10}"
        )
        steps = {  # worker 0's cost of each step (every worker sends as much)
            way: [
                ray.get([w.step.remote(way) for w in workers], timeout=600)[0]
                for _ in range(args.steps)
            ]
            for way in ("sparse", "dense")
        }
        sent = {}
        for way, costs in steps.items():
            payload = statistics.median(c["payload"] for c in costs)
            sent[way] = wire_bytes(way, payload)
            measured = [c["measured"] for c in costs if c["measured"] is not None]
            shown = f"{statistics.median(measured):>17,.0f}" if measured else f"{'n/a':>17}"
            print(
                f"{way:<7}{payload:>14,.0f}{sent[way]:>17,.0f}{shown}"
                f"{statistics.median(c['seconds'] for c in costs):>10.3f}"
            )
        print(
            f"the sparse sum has {steps['sparse'][0]['rows']:,} rows (those any worker "
            f"touched); it sends {sent['dense'] / sent['sparse']:.1f}x fewer bytes than the "
            "dense allreduce"
        )
    finally:
        ray.get([w.close.remote() for w in workers], timeout=60)
    return 0


if __name__ == "__main__":
    jobtools.run_job(main)
