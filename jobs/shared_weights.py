"""What two workers on one node would gain by keeping their weights in shared memory.

A measurement of a design raymodule does not have, to weigh it: two processes, each pinned to
a core of its own, train one of jobs/benchmark.py's models on half of its global batch each,
their training steps as bare as they can be (an executor's forward and backward on a batch
bound once, no metric, no Ray), in two ways:

    today    as raymodule's workers did when this was written (2026-12-04; they have since
             stopped copying the sum back, and update on the host: README, *Benchmark*):
             each copies its gradients into its slot of shared memory; barrier; each adds
             its half of the two slots into a third; barrier; each copies the whole sum
             back into its gradients and updates all of its own weights and momentum
             (sgd_mom_update, a parameter at a time)
    shared   the weights, the momentum and each process's gradients live in shared memory
             (MXNet arrays over it, no copy): each process's executor writes its gradients
             into its slot; barrier; each adds its half of the two slots and updates that
             half of the one copy of the weights and momentum in place; barrier

Both start from the same weights and momentum and take the same steps: the job checks that
they end with the same weights, to the bit, in both processes. Printed: the median
milliseconds a step over ``--steps`` steps (after 50 untimed), each way taking turns for
``--rounds`` rounds, and the samples a second that makes for the global batch.

The barriers are Python's ``multiprocessing.Barrier``, not raymodule's; the threads are
MXNet's defaults for the benchmark (OMP_NUM_THREADS=1, MXNET_CPU_WORKER_NTHREADS=1). The
shared memory is named as raymodule's (``raymodule-<pid>-<start time>-...``): it is removed
when the job ends, and a run killed before that has it removed by the next one (or by any
raymodule worker group on the node).

Run locally:

    python jobs/shared_weights.py
    python jobs/shared_weights.py --model lenet --rounds 3

Run on a Ray cluster (it runs in the job's driver process, on the head node; no Ray workers):

    ray job submit --working-dir . -- python jobs/shared_weights.py
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import multiprocessing as mp
import os
import queue
import secrets
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workload  # noqa: E402 - jobs/ is not a package: its models and thread settings

os.environ.update(workload.THREAD_ENV)  # before MXNet starts its engine, here and in children

import numpy as np  # noqa: E402

from raymodule.worker.shm import remove_stale_segments, segment_prefix  # noqa: E402

WAYS = ["today", "shared"]
WARMUP = 50  # untimed steps a run
REGIONS = ["weights", "momentum", "sum", "grads0", "grads1"]
SGD = {"lr": 0.01, "momentum": 0.9, "wd": 0.0}
TIMEOUT_S = 600  # for a run's two processes to report


def shapes_of(mx, model: str) -> tuple[list[str], dict[str, tuple], int]:
    """The model's parameters (names in order, shapes) and its per-process batch."""
    batch = workload.MODELS[model] // 2
    sym = workload.build_symbol(mx, model)
    arg_shapes, _, _ = sym.infer_shape(
        data=(batch, *workload.SHAPES[model]), softmax_label=(batch,)
    )
    shapes = dict(zip(sym.list_arguments(), arg_shapes))
    names = [n for n in sym.list_arguments() if n not in ("data", "softmax_label")]
    return names, shapes, batch


def train(rank: int, way: str, model: str, segments: dict, steps: int, barrier, report) -> None:
    """One process's run: ``steps`` training steps after WARMUP, reported as (rank, median
    step seconds, SHA-256 of the weights it ends with) or (rank, None, the error)."""
    try:
        report.put((rank, *_train(rank, way, model, segments, steps, barrier)))
    except BaseException as err:  # the parent reports it; the peer's barrier breaks
        barrier.abort()
        report.put((rank, None, f"{type(err).__name__}: {err}"))


def _train(rank: int, way: str, model: str, segments: dict, steps: int, barrier):
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[rank % len(cores)]})  # before MXNet starts its threads
    from multiprocessing.shared_memory import SharedMemory

    import mxnet as mx

    from raymodule.worker import native

    names, shapes, batch = shapes_of(mx, model)
    sizes = [int(np.prod(shapes[n])) for n in names]
    offsets = np.cumsum([0, *sizes])
    count = int(offsets[-1])
    mapped = {}
    for region, name in segments.items():
        mapped[region] = SharedMemory(name)  # the parent's: it unlinks it
    flat = {k: np.ndarray((count,), np.float32, m.buf) for k, m in mapped.items()}
    lo, hi = count * rank // 2, count * (rank + 1) // 2  # this process's half

    def per_parameter(region):
        return [
            flat[region][offsets[i] : offsets[i + 1]].reshape(shapes[n])
            for i, n in enumerate(names)
        ]

    rng = np.random.RandomState(rank)
    args = {
        "data": mx.nd.array(rng.uniform(-1, 1, (batch, *workload.SHAPES[model]))),
        "softmax_label": mx.nd.array(rng.randint(0, 10, batch)),
    }
    kwargs = dict(SGD, rescale_grad=1.0 / workload.MODELS[model])
    halves = None  # the shared way's: (weight, sum, momentum) over its half of each parameter
    if way == "today":
        args.update((n, mx.nd.array(v)) for n, v in zip(names, per_parameter("weights")))
        grads = {n: mx.nd.zeros(shapes[n]) for n in names}
        momentum = [mx.nd.zeros(shapes[n]) for n in names]
    else:
        zero_copy = mx.nd.from_numpy
        args.update((n, zero_copy(v)) for n, v in zip(names, per_parameter("weights")))
        grads = {n: zero_copy(v) for n, v in zip(names, per_parameter(f"grads{rank}"))}
        halves = []
        for i in range(len(names)):
            start, stop = max(lo, offsets[i]), min(hi, offsets[i + 1])
            if start < stop:
                halves.append(
                    tuple(zero_copy(flat[k][start:stop]) for k in ("weights", "sum", "momentum"))
                )
    requests = {n: "write" for n in names} | {"data": "null", "softmax_label": "null"}
    executor = workload.build_symbol(mx, model).bind(
        mx.cpu(), args, args_grad=grads, grad_req=requests
    )
    slots, total = [flat["grads0"], flat["grads1"]], flat["sum"]
    took, views = [], []
    for step in range(WARMUP + steps):
        tic = time.perf_counter()
        executor.forward(is_train=True)
        executor.backward()
        if way == "today":  # the gradients read and written in place, as the workers did
            views = [v.reshape(-1) for v in native.host_views([grads[n] for n in names])]
            for i, v in enumerate(views):
                slots[rank][offsets[i] : offsets[i + 1]] = v
            barrier.wait(TIMEOUT_S)
            np.add(slots[0][lo:hi], slots[1][lo:hi], out=total[lo:hi])
            barrier.wait(TIMEOUT_S)
            for i, v in enumerate(views):
                v[...] = total[offsets[i] : offsets[i + 1]]
            for n, state in zip(names, momentum):
                mx.nd.sgd_mom_update(args[n], grads[n], state, out=args[n], **kwargs)
            for n in names:
                args[n].wait_to_read()
        else:
            mx.nd.waitall()  # no kernel reads the weights once the peer may update its half
            barrier.wait(TIMEOUT_S)
            np.add(slots[0][lo:hi], slots[1][lo:hi], out=total[lo:hi])
            for weight, summed, state in halves:
                mx.nd.sgd_mom_update(weight, summed, state, out=weight, **kwargs)
            for weight, _, _ in halves:
                weight.wait_to_read()
            barrier.wait(TIMEOUT_S)
        if step >= WARMUP:
            took.append(time.perf_counter() - tic)
    if way == "today":
        weights = np.concatenate([args[n].asnumpy().reshape(-1) for n in names])
    else:
        weights = flat["weights"].copy()
    digest = hashlib.sha256(weights.tobytes()).hexdigest()
    # the MXNet arrays over the shared memory are freed (by MXNet's engine) before it is closed
    executor = args = grads = views = slots = total = halves = None
    weight = summed = state = _ = None  # the loops' last arrays, some over the shared memory
    gc.collect()
    mx.nd.waitall()
    flat = None
    for m in mapped.values():
        m.close()
    return statistics.median(took), digest


def run(way: str, model: str, steps: int, start: np.ndarray) -> tuple[list[float], list[str]]:
    """One run of ``way``: each process's median step seconds and weights' digest."""
    from multiprocessing.shared_memory import SharedMemory

    token = secrets.token_hex(4)
    made = {}
    try:
        for number, region in enumerate(REGIONS, 1):
            name = f"{segment_prefix(os.getpid(), token)}{number}"
            # registered with Python's resource tracker (the children's too, as they attach):
            # should this process die first, the tracker unlinks it
            made[region] = SharedMemory(name, create=True, size=start.nbytes)
            np.ndarray(start.shape, start.dtype, made[region].buf)[:] = (
                start if region == "weights" else 0
            )
        context = mp.get_context("spawn")
        barrier, report = context.Barrier(2), context.Queue()
        segments = {region: m.name for region, m in made.items()}
        procs = [
            context.Process(
                target=train, args=(r, way, model, segments, steps, barrier, report), daemon=True
            )
            for r in range(2)
        ]
        for p in procs:
            p.start()
        results = None
        try:
            results = sorted(_reports(way, procs, report))
        finally:
            for p in procs:  # a failed run's survivors may wait at a barrier: not waited for
                p.join(60 if results is not None else 0)
                if p.is_alive():
                    p.kill()
                    p.join(10)
        failed = [why for _, seconds, why in results if seconds is None]
        if failed:
            raise RuntimeError(f"{way}: {'; '.join(failed)}")
        return [seconds for _, seconds, _ in results], [digest for _, _, digest in results]
    finally:
        for m in made.values():
            m.close()
            m.unlink()


def _reports(way: str, procs: list, report) -> list:
    """Each process's report, read as they come; a process that exits without one (killed,
    crashed) ends the run at once, as does TIMEOUT_S without every report (the caller then
    kills the others: one lost inside the barrier may hold its lock for good)."""
    results, deadline = [], time.monotonic() + TIMEOUT_S
    while len(results) < len(procs):
        try:
            results.append(report.get(timeout=1))
            continue
        except queue.Empty:
            pass
        reported = {rank for rank, *_ in results}
        gone = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode is not None]
        gone = [(r, code) for r, code in gone if r not in reported]
        if gone:  # its report may still be on its way: one more look
            try:
                results.append(report.get(timeout=2))
                continue
            except queue.Empty:
                pass
        if gone or time.monotonic() > deadline:
            why = "; ".join(f"process {r} exited ({code}) without a report" for r, code in gone)
            why = why or f"no report from every process in {TIMEOUT_S} s"
            raise RuntimeError(f"{way}: {why} (reports: {results})")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    workload.add_model_option(parser)
    parser.add_argument(
        "--steps", type=int, default=600, help="timed steps a run, after 50 untimed (default 600)"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="runs of each way, taking turns (default 2)"
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1")
    import mxnet as mx

    # SIGTERM ends the job as an exception would: the shared memory is unlinked and the
    # processes (daemonic) are stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    remove_stale_segments()  # a run killed before it removed its shared memory
    names, shapes, _ = shapes_of(mx, args.model)
    count = sum(int(np.prod(shapes[n])) for n in names)
    start = np.random.RandomState(0).uniform(-0.05, 0.05, count).astype(np.float32)
    batch = workload.MODELS[args.model]
    print(
        f"{args.model}: {count:,} parameters ({count * 4 / 1e6:.2f} MB), global batch {batch}, "
        f"2 processes on {min(2, len(os.sched_getaffinity(0)))} core(s)"
    )
    seconds = {way: [] for way in WAYS}
    digests = set()
    for round_ in range(args.rounds):
        for way in WAYS:
            try:
                took, ends = run(way, args.model, args.steps, start)
            except RuntimeError as err:  # a process failed or was lost: said, not a traceback
                print(f"{parser.prog}: error: {err}", file=sys.stderr)
                return 1
            seconds[way].append(max(took))
            digests.update(ends)
            print(
                f"round {round_ + 1} {way:6s}: {1e3 * took[0]:.2f} and {1e3 * took[1]:.2f} ms a "
                f"step (median), {batch / max(took):,.0f} samples/s"
            )
    for way in WAYS:
        best = statistics.median(seconds[way])
        print(f"{way:6s}: {1e3 * best:.2f} ms a step (median of the rounds)")
    ratio = statistics.median(seconds["shared"]) / statistics.median(seconds["today"])
    print(f"shared / today: {ratio:.2f} of the step time")
    same = len(digests) == 1
    ends = "the same bits" if same else "DIFFERENT"
    print(f"weights at the end: {ends} in both ways, every round (and both processes of today's)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
